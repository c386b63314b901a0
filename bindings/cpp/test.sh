#!/usr/bin/env bash
# Builds and runs the C++ binding's test program under ASan/UBSan against the static library built by
# `cargo build --release`. Installs g++ when missing; fails (non-zero) on any failure, never skips.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
lib_dir="${WASM_ECDS_LIB_DIR:-$repo/target/release}"
out_dir="$repo/target/cpp"

if [[ ! -f "$lib_dir/libwasm_ecds.a" ]]; then
    echo "bindings/cpp/test.sh: $lib_dir/libwasm_ecds.a not found; run 'cargo build --release' first" >&2
    exit 1
fi
if ! command -v g++ >/dev/null 2>&1; then
    echo "bindings/cpp/test.sh: installing g++"
    if [[ $(id -u) -eq 0 ]]; then sudo=""; else sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq g++
fi

mkdir -p "$out_dir"
warn=(-Wall -Wextra -Werror -Wpedantic -Wconversion -Wno-sign-conversion)
# The header alone, as C++17 and C++20 (the std::span overloads).
for std in c++17 c++20; do
    echo '#include "wasm_ecds.hpp"' | g++ -std=$std "${warn[@]}" -I"$repo/include" -I"$here" -x c++ -fsyntax-only -
done
# The test program as C++17 (what the header promises) and C++20 (std::span, std::atomic<shared_ptr>).
for std in c++17 c++20; do
    echo "== test_wasm_ecds ($std, ASan/UBSan)"
    g++ -std=$std -Wall -Wextra -Werror -g -O1 -fno-omit-frame-pointer -fsanitize=address,undefined \
        -fno-sanitize-recover=undefined -I"$repo/include" -I"$here" "$here/test_wasm_ecds.cpp" \
        "$lib_dir/libwasm_ecds.a" -lpthread -ldl -lm -o "$out_dir/test_wasm_ecds_$std"
    ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
        "$out_dir/test_wasm_ecds_$std" "$@"
done
