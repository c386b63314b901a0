#!/usr/bin/env bash
# Runs the Go binding's tests (go test -race) against the static library built by `cargo build --release`.
# Installs Debian's golang-go when `go` is missing; fails (non-zero) on any failure, never skips.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
lib_dir="${WASM_ECDS_LIB_DIR:-$repo/target/release}"

if [[ ! -f "$lib_dir/libwasm_ecds.a" ]]; then
    echo "bindings/go/test.sh: $lib_dir/libwasm_ecds.a not found; run 'cargo build --release' first" >&2
    exit 1
fi

if ! command -v go >/dev/null 2>&1; then
    echo "bindings/go/test.sh: installing golang-go"
    if [[ $(id -u) -eq 0 ]]; then sudo=""; else sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq golang-go
fi
command -v gcc >/dev/null 2>&1 || { echo "bindings/go/test.sh: cgo needs gcc" >&2; exit 1; }

cd "$here"
export CGO_ENABLED=1
# The library directory given by the caller comes first on the linker's search path.
export CGO_LDFLAGS="-L$lib_dir ${CGO_LDFLAGS:-}"
# No network: the module has no dependencies outside the standard library.
export GOFLAGS="${GOFLAGS:-} -mod=mod" GOPROXY=off GOTOOLCHAIN=local
go version
go vet ./...
go test -race -count=1 "$@" ./...
