#!/usr/bin/env bash
# The fuzzing entry points behind the Makefile (docs/fuzzing.md):
#   run.sh fuzz [TARGET...]  builds the libFuzzer binaries on stable Rust and runs each target for FUZZ_SECONDS
#                            (default 600), FUZZ_JOBS (default 2) at a time, niced, in a network namespace
#   run.sh replay            replays every corpus and regression input through every target (cargo test)
#   run.sh seeds             regenerates the seed corpora under corpus/
# Everything that runs a target runs in a new network namespace holding only loopback (see isolated), so that
# no input can make the library send a packet or a DNS query off the machine.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
manifest="$here/Cargo.toml"
targets_all=(convert convert_delta nack nack_delta typed_struct options unbox oci_manifest oci_reference oci_pull_secret
  oci_challenge oci_token)

# The replay and the seed generator build in the library's target directory (artifacts shared with
# `cargo test --release`); the instrumented binaries in their own, as `cargo fuzz` does.
replay_target_dir="${CARGO_TARGET_DIR:-$repo/target}"
fuzz_target_dir="$here/target"

# Runs "$@" in a new network namespace with only `lo` up: as root (`unshare -n`), else in a user namespace
# (`unshare -rn`). With FUZZ_ALLOW_NO_NETNS=1, runs it as it is when neither is possible (the caches still
# block every address but 127.0.0.0/8; only a DNS query for a fuzzed host name could leave the machine).
isolated() {
  local up='ip link set lo up && exec "$@"'
  if unshare -n ip link set lo up 2>/dev/null; then
    unshare -n bash -c "$up" bash "$@"
  elif unshare -rn ip link set lo up 2>/dev/null; then
    unshare -rn bash -c "$up" bash "$@"
  elif [[ "${FUZZ_ALLOW_NO_NETNS:-}" == 1 ]]; then
    echo "note: no network namespace available (unshare, or ip from iproute2, failed); running without one" >&2
    "$@"
  else
    echo "error: cannot create a network namespace with loopback up (unshare -n / unshare -rn, ip from iproute2);" \
      "set FUZZ_ALLOW_NO_NETNS=1 to run without one" >&2
    return 1
  fi
}

build_fuzzers() {
  local host t bins=()
  for t in "${targets_all[@]}"; do bins+=(--bin "$t"); done
  host="$(rustc -vV | sed -n 's/^host: //p')"
  # libFuzzer's coverage instrumentation on stable Rust, as `cargo fuzz` sets it (without its nightly-only
  # AddressSanitizer); debug assertions and overflow checks on, so an arithmetic overflow is a finding.
  # `--target` keeps the flags off build scripts and proc macros.
  RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks" \
    cargo build --release --manifest-path "$manifest" --features libfuzzer "${bins[@]}" \
      --target "$host" --target-dir "$fuzz_target_dir"
  bin_dir="$fuzz_target_dir/$host/release"
}

# One target for FUZZ_SECONDS: new inputs go to work/<target> (not checked in), crashes to artifacts/<target>/.
fuzz_one() {
  local t="$1" seconds="$2"
  mkdir -p "$here/work/$t" "$here/artifacts/$t" "$here/logs"
  local dirs=("$here/work/$t" "$here/corpus/$t")
  [[ -d "$here/regressions/$t" ]] && dirs+=("$here/regressions/$t")
  nice -n 10 "$bin_dir/$t" "${dirs[@]}" \
    -max_total_time="$seconds" -max_len=1048576 -rss_limit_mb=2048 -timeout=60 \
    -artifact_prefix="$here/artifacts/$t/" -print_final_stats=1 \
    >"$here/logs/$t.log" 2>&1
}

# A line per target: executions, final cov/ft, corpus (units/bytes, as libFuzzer counts it), artifacts.
summary() {
  local t log last execs corpus found
  printf '%-14s %12s %10s %10s %12s %s\n' target executions cov ft corpus findings
  for t in "$@"; do
    log="$here/logs/$t.log"
    last="$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)"
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
    corpus="$(sed -n 's/.* corp: \([^ ]*\).*/\1/p' <<<"$last")"
    found="$(find "$here/artifacts/$t" -type f 2>/dev/null | wc -l)"
    printf '%-14s %12s %10s %10s %12s %s\n' "$t" "${execs:-?}" \
      "$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")" "$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")" \
      "$corpus" "$found"
  done
}

cmd="${1:-}"
shift || true
case "$cmd" in
  fuzz)
    build_fuzzers
    seconds="${FUZZ_SECONDS:-600}"
    jobs="${FUZZ_JOBS:-2}"
    targets=("$@")
    [[ ${#targets[@]} -gt 0 ]] || targets=("${targets_all[@]}")
    export -f fuzz_one
    export here bin_dir
    # Each target's exit status goes to logs/<target>.status; a crash is reported, not fatal to the others.
    printf '%s\n' "${targets[@]}" | isolated xargs -P "$jobs" -I{} \
      bash -c 'fuzz_one "$1" "$2"; echo $? >"$here/logs/$1.status"' _ {} "$seconds"
    summary "${targets[@]}"
    failed=0
    for t in "${targets[@]}"; do
      if [[ "$(cat "$here/logs/$t.status")" != 0 ]]; then
        echo "$t: FOUND A FAILURE; see tests/fuzz/logs/$t.log and tests/fuzz/artifacts/$t/" >&2
        failed=1
      fi
    done
    exit "$failed"
    ;;
  replay)
    export CARGO_TARGET_DIR="$replay_target_dir"
    cargo test --release --manifest-path "$manifest" --no-run
    FUZZ_ALLOW_NO_NETNS=1 isolated cargo test --release --offline --manifest-path "$manifest"
    ;;
  seeds)
    export CARGO_TARGET_DIR="$replay_target_dir"
    cargo run --release --manifest-path "$manifest" --bin seeds
    ;;
  *)
    echo "usage: $0 fuzz [TARGET...] | replay | seeds" >&2
    exit 2
    ;;
esac
