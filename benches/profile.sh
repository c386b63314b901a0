#!/usr/bin/env bash
# Where the cache-hit time goes: syscalls per call (strace -c), CPU split (perf stat), instruction profile
# (callgrind) of the `loop` subcommand on the inputs and cache left by benches/run.sh. Run run.sh first.
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
run() { "$BENCH" loop --cache-dir "$WORK/hit-cache" --response "$RESP" --iters "$1"; }
# syscalls: difference between 220 and 20 calls = 200 cache-hit calls
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
perf stat -e task-clock,context-switches,page-faults -o "$OUT/perf_stat.txt" -- "$BENCH" loop --cache-dir "$WORK/hit-cache" --response "$RESP" --iters 500 || true
cat "$OUT/perf_stat.txt" 2>/dev/null || true
valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" "$BENCH" loop --cache-dir "$WORK/hit-cache" --response "$RESP" --iters 100 2>/dev/null >/dev/null
callgrind_annotate --inclusive=yes "$OUT/callgrind.out" 2>/dev/null | grep -E "wasm_ecds::|malloc|_int_free|memcpy|memmove|thread" | grep -v "'2" | head -40 | cut -c1-180 \
    | tee "$OUT/callgrind_inclusive.txt"
echo "(callgrind covers 101 calls plus Cache::new; divide by 101 for per call)"
