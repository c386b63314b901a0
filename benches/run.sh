#!/usr/bin/env bash
# wasm-ecds benchmarks: builds in release, runs every figure with its baseline in the same run (the same
# process for in-process figures), prints one table of ratios and writes target/bench/results.json and
# target/bench/table.md. Loopback only; the server it starts is stopped on exit.
# Usage: bash benches/run.sh   (or make bench).   REPS=5 by default: processes per figure.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=$REPO/target/bench
WORK=$OUT/work
MODULES=$OUT/modules
RAW=$OUT/raw
REPS=${REPS:-5}
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY no_proxy NO_PROXY
# no WASM_* / ISTIO_* environment leaks into the caches' options
for v in $(env | sed -n 's/^\(WASM_[A-Z_]*\|ISTIO_AGENT_[A-Z_]*\|BLOCKED_CIDRS_IN_WASM_FETCH\)=.*/\1/p'); do unset "$v"; done
# glibc's allocator with its defaults (its trim threshold shows in the cache-hit figures)
for v in $(env | sed -n 's/^\(MALLOC_[A-Z_]*\|GLIBC_TUNABLES\)=.*/\1/p'); do unset "$v"; done
mkdir -p "$OUT" "$WORK" "$RAW"
rm -f "$RAW"/*.json "$RAW"/*.err "$RAW"/*.txt "$OUT"/loadavg*.txt
# the load average at every step: the machine is shared, so the table says what else was running
log() { printf '== %s\n' "$*" >&2; cut -d' ' -f1-3 /proc/loadavg >>"$OUT/loadavg.txt"; }
# run_json FILE CMD...: CMD's stdout (one JSON object) into FILE; a failing figure is recorded, not fatal.
run_json() {
    local file=$1; shift
    if ! "$@" >"$file" 2>"$file.err"; then
        local why; why=$(grep -v '^note:' "$file.err" | tail -n 3 | tr '\n"\\' "  /" | cut -c1-300)
        echo "{\"error\": \"$why\"}" >"$file"
        printf '   failed: %s (%s)\n' "$file" "$why" >&2
    fi
}
now() { date +%s.%N; }
# need BIN PACKAGE: installs the Debian package when its program is missing (a fresh bookworm machine).
need() {
    [ -x "$1" ] && return 0
    local sudo=(); [ "$(id -u)" -ne 0 ] && sudo=(sudo)
    apt-cache show "$2" >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$2" >/dev/null
    [ -x "$1" ] || { echo "$2 did not install $1" >&2; exit 1; }
}

log "tools: the distribution registry and skopeo (the OCI figures)"
need /usr/bin/docker-registry docker-registry
need /usr/bin/skopeo skopeo

log "build (release): library and bench binary"
cargo build --release --lib --bench ecds --message-format=json-render-diagnostics >"$OUT/build.jsonl"
BENCH=$(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "ecds" and m.get("executable"):
        print(m["executable"])' "$OUT/build.jsonl" | tail -1)
[ -x "$BENCH" ] || { echo "bench binary not found" >&2; exit 1; }
gcc -O2 -std=c11 -Wall -Wextra -Iinclude benches/c/capi_bench.c target/release/libwasm_ecds.a -lpthread -ldl -lm \
    -o "$OUT/capi_bench"

log "inputs: module files and the archives holding them (deterministic; reused when present)"
"$BENCH" gen --dir "$MODULES" >"$RAW/gen.json"

log "loopback server"
SERVER_PID=
REGISTRY_PID=
cleanup() {
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
    # the registry process removes its storage when it sees the stop file (a signal would leave it behind)
    if [ -n "$REGISTRY_PID" ]; then touch "$OUT/registry.stop"; wait "$REGISTRY_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"/tmp* "$WORK"/warm-* "$WORK"/curl.wasm "$WORK"/skopeo-*
}
trap cleanup EXIT
rm -f "$OUT/port"
"$BENCH" serve --dir "$MODULES" --port-file "$OUT/port" --delay-ms 200 --max-secs 900 &
SERVER_PID=$!
for _ in $(seq 1 100); do [ -s "$OUT/port" ] && break; sleep 0.1; done
[ -s "$OUT/port" ] || { echo "server did not start" >&2; exit 1; }
SERVER=127.0.0.1:$(cat "$OUT/port")
COMMON=(--server "$SERVER" --dir "$MODULES" --work "$WORK")

log "distribution registry on 127.0.0.1 (plain HTTP) with the OCI images pushed (16 MiB, 256 MiB, 256 MiB compat)"
rm -f "$OUT/registry.json" "$OUT/registry.stop"
"$BENCH" registry --dir "$MODULES" --info "$OUT/registry.json" --stop "$OUT/registry.stop" --max-secs 900 \
    2>"$RAW/registry.err" &
REGISTRY_PID=$!
for _ in $(seq 1 1200); do
    [ -s "$OUT/registry.json" ] && break
    kill -0 "$REGISTRY_PID" 2>/dev/null || break
    sleep 0.1
done
if [ -s "$OUT/registry.json" ]; then
    cp "$OUT/registry.json" "$RAW/registry.json"
else
    printf '   failed: the registry did not start (%s)\n' "$(tail -n 3 "$RAW/registry.err" | tr '\n' ' ')" >&2
fi

log "in-process inputs and the cache they hit (every module stored once)"
run_json "$RAW/prepare.json" "$BENCH" prepare "${COMMON[@]}"

log "cache hits beside prost and copy: each group in a fresh process, $REPS reps interleaved"
for r in $(seq 1 "$REPS"); do
    for group in typical pass large variants; do
        run_json "$RAW/micro_${group}_$r.json" "$BENCH" micro --server "$SERVER" --work "$WORK" --group "$group"
    done
done

log "C ABI: Rust, C and Python ctypes, each a fresh process on the same cache and response, $REPS reps interleaved"
# The three compare call paths, not heap states: none of them gives heap memory back between calls (Python's
# own heap would otherwise spare it the allocator's trim-and-fault cycle that the other two pay).
NO_TRIM=MALLOC_TRIM_THRESHOLD_=$((64 << 20))
for r in $(seq 1 "$REPS"); do
    for input in typical pass; do
        run_json "$RAW/abi_rust_${input}_$r.json" env "$NO_TRIM" "$BENCH" abi-rust --cache-dir "$WORK/hit-cache" \
            --response "$WORK/$input.pb"
        run_json "$RAW/abi_c_${input}_$r.json" env "$NO_TRIM" "$OUT/capi_bench" "$WORK/hit-cache" "$WORK/$input.pb"
        run_json "$RAW/abi_py_${input}_$r.json" env "$NO_TRIM" python3 benches/py/capi_bench.py \
            "$REPO/target/release/libwasm_ecds.so" "$WORK/hit-cache" "$WORK/$input.pb"
    done
done

log "cold fetch of 64 MiB: library vs curl + sha256sum, alternating, $REPS reps"
M64_SHA=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["m64.wasm"])' "$MODULES/manifest.json")
for r in $(seq 1 "$REPS"); do
    run_json "$RAW/cold_lib_$r.json" "$BENCH" cold "${COMMON[@]}" --module m64.wasm
    rm -f "$WORK/curl.wasm"
    t0=$(now)
    curl -s -o "$WORK/curl.wasm" "http://$SERVER/m64.wasm" && sum=$(sha256sum "$WORK/curl.wasm" | cut -d' ' -f1)
    t1=$(now)
    [ "$sum" = "$M64_SHA" ] || { echo "curl baseline: sha256 mismatch" >&2; exit 1; }
    echo "{\"secs\": $(awk "BEGIN{print $t1 - $t0}")}" >"$RAW/cold_curl_$r.json"
    rm -f "$WORK/curl.wasm"
done

log "OCI cold pull of 16 MiB: library vs skopeo copy docker:// dir:, alternating, $REPS reps"
if [ -s "$OUT/registry.json" ]; then
    read -r O16_DOCKER O16_LAYER < <(python3 -c 'import json,sys; i=json.load(open(sys.argv[1]))["images"]["bench/o16"]
print(i["docker"], i["layer_digest"].split(":")[1])' "$OUT/registry.json")
    skopeo_once() {
        local d=$WORK/skopeo-$1 t0 t1 sum
        rm -rf "$d"
        t0=$(now)
        skopeo copy -q --src-tls-verify=false "$O16_DOCKER" "dir:$d" >"$RAW/oci_skopeo_$1.err" 2>&1 || true
        t1=$(now)
        # dir: names each blob by its digest: the layer's bytes must be the layer pushed
        sum=$(sha256sum "$d/$O16_LAYER" 2>/dev/null | cut -d' ' -f1) || true
        if [ "$sum" = "$O16_LAYER" ]; then
            echo "{\"secs\": $(awk "BEGIN{print $t1 - $t0}"), \"layer_sha256\": \"$sum\"}" >"$RAW/oci_skopeo_$1.json"
        else
            echo "{\"error\": \"skopeo: layer missing or sha256 mismatch ($(tail -n 2 "$RAW/oci_skopeo_$1.err" | tr '\n\"' '  '))\"}" \
                >"$RAW/oci_skopeo_$1.json"
        fi
        rm -rf "$d"
    }
    # the library's figure is its convert call; the whole process (start, open, convert, then re-hashing the
    # stored module to check it) is recorded beside it, as skopeo's figure includes its process start
    lib_once() {
        local t0 t1
        t0=$(now)
        run_json "$RAW/oci_lib_$1.json" "$BENCH" oci-cold --registry-info "$OUT/registry.json" --work "$WORK" --image bench/o16
        t1=$(now)
        echo "{\"secs\": $(awk "BEGIN{print $t1 - $t0}")}" >"$RAW/oci_libproc_$1.json"
    }
    for r in $(seq 1 "$REPS"); do
        # who goes first alternates: the second of a pair finds the registry's files in the page cache too
        if [ $((r % 2)) -eq 1 ]; then
            lib_once "$r"
            skopeo_once "$r"
        else
            skopeo_once "$r"
            lib_once "$r"
        fi
    done
fi

log "memory: peak RSS growth over the idle process, each case a fresh process (and /usr/bin/time max RSS)"
# fixture: the largest response (200 resources) cold, then again as cache hits (3 processes: its peak depends
# on how many of its 200 fetches overlap); a 256 MiB module plain, gzipped, in a tar and in a gzipped tar;
# 8 hostile gzipped tars in one response; the 256 MiB module from the registry, as a single-layer artifact and
# in an OCI compat tar+gzip layer.
for run in fixture_1 fixture_2 fixture_3 plain_1 gzip_1 tar_1 targz_1 hostile_1 oci_1 oci-compat_1; do
    run_json "$RAW/mem_$run.json" /usr/bin/time -f '%M' -o "$RAW/mem_${run}_time.txt" \
        "$BENCH" mem "${COMMON[@]}" --registry-info "$OUT/registry.json" --case "${run%_*}"
done

log "fan-in: 16 threads vs 1 on one cold module served with 200 ms latency, $REPS reps"
for r in $(seq 1 "$REPS"); do
    run_json "$RAW/fanin16_$r.json" "$BENCH" fanin "${COMMON[@]}" --threads 16
    run_json "$RAW/fanin1_$r.json" "$BENCH" fanin "${COMMON[@]}" --threads 1
done

log "fan-out: 8 distinct slow modules vs 1, $REPS reps"
for r in $(seq 1 "$REPS"); do
    run_json "$RAW/fanout8_$r.json" "$BENCH" fanout "${COMMON[@]}" --modules 8
    run_json "$RAW/fanout1_$r.json" "$BENCH" fanout "${COMMON[@]}" --modules 1
done

log "warm restart: 20 x 4 MiB, downloading process vs a new process, $REPS reps"
for r in $(seq 1 "$REPS"); do
    D=$WORK/warm-$r
    rm -rf "$D"
    run_json "$RAW/warm_download_$r.json" "$BENCH" warm --server "$SERVER" --dir "$MODULES" --cache-dir "$D" --phase download
    run_json "$RAW/warm_restart_$r.json" "$BENCH" warm --server "$SERVER" --dir "$MODULES" --cache-dir "$D" --phase restart
    rm -rf "$D"
done

log "report"
python3 benches/report.py "$RAW" "$OUT/results.json"
