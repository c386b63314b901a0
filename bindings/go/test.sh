#!/usr/bin/env bash
# Runs the Go binding's tests (go test -race) against the static library built by `cargo build --release`,
# found as an installed one is: through pkg-config (wasm_ecds-static), here a .pc written for the build tree.
# Installs Debian's golang-go and pkg-config when missing; fails (non-zero) on any failure, never skips.
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
if ! command -v pkg-config >/dev/null 2>&1; then
    echo "bindings/go/test.sh: installing pkg-config"
    if [[ $(id -u) -eq 0 ]]; then sudo=""; else sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq pkg-config
fi
command -v gcc >/dev/null 2>&1 || { echo "bindings/go/test.sh: cgo needs gcc" >&2; exit 1; }

# The pkg-config files of the build tree: the library in $lib_dir, the header in include/.
pc_dir="$repo/target/pkgconfig-build"
bash "$repo/bindings/c/generate.sh" "$pc_dir" "$repo" "$lib_dir" "$repo/include"
export PKG_CONFIG_PATH="$pc_dir/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
# Go's build cache does not see pkg-config's output (golang/go#24544) but does see CGO_LDFLAGS: naming the
# library's directory there too rebuilds the package when WASM_ECDS_LIB_DIR changes.
export CGO_LDFLAGS="-L$lib_dir ${CGO_LDFLAGS:-}"

cd "$here"
export CGO_ENABLED=1
# No network: the module has no dependencies outside the standard library.
export GOFLAGS="${GOFLAGS:-} -mod=mod" GOPROXY=off GOTOOLCHAIN=local
go version
go vet ./...
go test -race -count=1 "$@" ./...
