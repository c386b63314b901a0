#!/usr/bin/env bash
# Where the cache-hit time goes, on the inputs and cache left by benches/run.sh (run it first): syscalls per
# call (strace -c), task clock and page faults (perf stat; the VM has software counters only), instructions
# per call by stage (callgrind, collection switched on inside one function per run) and the whole call's
# instructions by function (self cost).
# The `loop` subcommand converts fresh pushes (new nonce and version each call), as the figures do.
# Usage: bash benches/profile.sh [typical|pass|large]   Output in target/bench/profile/.
set -euo pipefail
cd "$(dirname "$0")/.."
WHICH=${1:-typical}
OUT=target/bench/profile
WORK=target/bench/work
mkdir -p "$OUT"
BENCH=$(cargo build --release --bench ecds --message-format=json-render-diagnostics 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "ecds" and m.get("executable"):
        print(m["executable"])' | tail -1)
RESP=$WORK/$WHICH.pb
[ -f "$RESP" ] || { echo "run benches/run.sh first ($RESP missing)" >&2; exit 1; }

# syscalls: the difference between 220 and 20 calls = 200 cache-hit calls
strace -f -c -o "$OUT/strace_20.txt" "$BENCH" loop --cache-dir "$WORK/hit-cache" --response "$RESP" --iters 20 >/dev/null
strace -f -c -o "$OUT/strace_220.txt" "$BENCH" loop --cache-dir "$WORK/hit-cache" --response "$RESP" --iters 220 >/dev/null
python3 - "$OUT/strace_20.txt" "$OUT/strace_220.txt" <<'PY' | tee "$OUT/syscalls_per_call.txt"
import sys
def calls(p):
    d = {}
    for line in open(p):
        f = line.split()
        if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
            d[f[-1]] = int(f[3])
    return d
a, b = calls(sys.argv[1]), calls(sys.argv[2])
print("syscalls per cache-hit call (200 calls):")
for name in sorted(b, key=lambda n: -(b[n] - a.get(n, 0))):
    per = (b[name] - a.get(name, 0)) / 200
    if per >= 0.05:
        print("  %-20s %.1f" % (name, per))
PY

perf stat -e task-clock,context-switches,page-faults,minor-faults -o "$OUT/perf_stat.txt" -- \
    "$BENCH" loop --cache-dir "$WORK/hit-cache" --response "$RESP" --iters 2000 >"$OUT/loop.json" || true
cat "$OUT/perf_stat.txt" "$OUT/loop.json" 2>/dev/null || true

# callgrind, one run per stage with collection on only inside that function; the difference between 60 and
# 10 calls (the first call after opening also re-verifies the stored files) / 50 = instructions per call.
STAGES=(
    "wasm_ecds::Cache::convert|the whole call"
    "wasm_ecds::schema::validate_at|schema validation, every level (envelope, resources, Wasm, TypedStruct)"
    "wasm_ecds::ecds::analyze::analyze|analysis of each resource, including:"
    "wasm_ecds::typed_struct::parse|  TypedStruct: validate the Struct and decode it into a tree"
    "wasm_ecds::typed_struct::to_wasm|  TypedStruct: encode the tree as the Wasm message"
    "wasm_ecds::ecds::analyze::read_wasm|  read vm_config out of the Wasm message"
    "wasm_ecds::ecds::analyze::request_for|  the module request"
    "<wasm_ecds::store::Store as wasm_ecds::module::ModuleSource>::get_all|store lookups"
    "wasm_ecds::ecds::rewrite::with_local_code|rewrite of the Wasm message (code, env vars)"
    "core::ptr::drop_in_place<wasm_ecds::ecds::analyze::Analysis>|freeing the analyses (the Struct trees)"
    "wasm_ecds::store::Store::set_sotw_in_use|the in-use set"
)
instructions() { # FUNCTION ITERS [LOOP ARGS] -> instructions collected inside FUNCTION
    valgrind --tool=callgrind --collect-atstart=no --toggle-collect="$1" --callgrind-out-file="$OUT/cg.tmp" \
        "$BENCH" loop --cache-dir "$WORK/hit-cache" --response "$RESP" --iters "$2" "${@:3}" >/dev/null \
        2>"$OUT/valgrind.err"
    sed -n 's/^totals: \([0-9]*\).*/\1/p' "$OUT/cg.tmp"
}
per_call() { # FUNCTION [LOOP ARGS]
    local a b
    a=$(instructions "$1" 10 "${@:2}")
    b=$(instructions "$1" 60 "${@:2}")
    echo $(((b - a) / 50))
}
{
    echo "instructions per cache-hit call ($WHICH), by stage:"
    for stage in "${STAGES[@]}"; do
        printf '  %9d  %s\n' "$(per_call "${stage%%|*}")" "${stage#*|}"
    done
    printf '  %9d  %s\n' "$(per_call 'wasm_ecds_testkit::proto::decode_reencode' --prost 1)" \
        "baseline: prost decode + re-encode of the same push"
} | tee "$OUT/stages.txt"
# the whole call's instructions by function (self cost), from the last run of the whole call
valgrind --tool=callgrind --collect-atstart=no --toggle-collect='wasm_ecds::Cache::convert' \
    --callgrind-out-file="$OUT/callgrind.out" "$BENCH" loop --cache-dir "$WORK/hit-cache" --response "$RESP" \
    --iters 60 >/dev/null 2>"$OUT/valgrind.err"
callgrind_annotate --threshold=95 "$OUT/callgrind.out" 2>/dev/null | sed -n '/^Ir/,$p' | head -40 | cut -c1-160 \
    | tee "$OUT/self.txt"
rm -f "$OUT/cg.tmp"
