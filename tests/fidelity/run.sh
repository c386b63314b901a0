#!/usr/bin/env bash
# Protobuf fidelity against the real Envoy schema (Python xds-protos), through the C ABI.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
venv="$repo/.venv-test"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check pytest protobuf xds-protos prometheus_client
export WASM_ECDS_LIBRARY="${WASM_ECDS_LIB_DIR:-$repo/target/release}/libwasm_ecds.so"
export PYTHONPATH="$repo/bindings/python/src${PYTHONPATH:+:$PYTHONPATH}"
cd "$repo"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/fidelity
