#!/usr/bin/env bash
# Runs the Python binding's test suite against the library built by `cargo build --release`.
# Creates <repo>/.venv-test when missing, installs the test dependencies into it, runs the package from src/,
# and fails (non-zero) on any failure: a missing library or dependency is an error, never a skip.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
lib_dir="${WASM_ECDS_LIB_DIR:-$repo/target/release}"
lib="$lib_dir/libwasm_ecds.so"
venv="${WASM_ECDS_VENV:-$repo/.venv-test}"
python="${PYTHON:-python3}"

if [[ ! -f "$lib" ]]; then
    echo "bindings/python/test.sh: $lib not found; run 'cargo build --release' first" >&2
    exit 1
fi

if [[ ! -x "$venv/bin/python" ]]; then
    echo "bindings/python/test.sh: creating $venv"
    "$python" -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import pytest, prometheus_client, envoy.service.discovery.v3.discovery_pb2, google.protobuf' 2>/dev/null; then
    "$venv/bin/pip" install --quiet pytest prometheus_client xds-protos protobuf
fi
# The package from the source tree, against the library under test. What `pip install ./bindings/python` gives
# (a wheel carrying its own library) is tested by tests/install/run.sh, in a fresh virtualenv.
export PYTHONPATH="$here/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1
export WASM_ECDS_LIBRARY="$lib"
cd "$here"
# -p no:cacheprovider: leave no .pytest_cache in the tree.
exec "$venv/bin/python" -m pytest -p no:cacheprovider -q "$@"
