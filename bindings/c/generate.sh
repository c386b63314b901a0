#!/usr/bin/env bash
# Writes the files that tell C, C++ and Go toolchains where libwasm_ecds is, into OUT_DIR, laid out as under
# LIBDIR:
#   OUT_DIR/pkgconfig/wasm_ecds.pc, wasm_ecds-static.pc              (bindings/c/*.pc.in)
#   OUT_DIR/cmake/wasm_ecds/wasm_ecdsConfig.cmake, …ConfigVersion.cmake  (bindings/cpp/cmake/*.in)
#
#   bindings/c/generate.sh OUT_DIR PREFIX LIBDIR INCLUDEDIR
#
# `make install` writes them for the installed paths; bindings/go/test.sh for the build tree (LIBDIR =
# target/release, INCLUDEDIR = include). The system libraries a static link needs come from rustc itself
# (`--print native-static-libs` of the staticlib: one extra compile of the crate the first time, then cargo
# replays the note from its cache).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
if [[ $# -ne 4 ]]; then
    echo "usage: $0 OUT_DIR PREFIX LIBDIR INCLUDEDIR" >&2
    exit 2
fi
out="$1" prefix="$2" libdir="$3" includedir="$4"
for path in "$prefix" "$libdir" "$includedir"; do
    if [[ $path != /* ]]; then
        echo "bindings/c/generate.sh: '$path' is not an absolute path" >&2
        exit 2
    fi
done

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/Cargo.toml" | head -n1)"
major="${version%%.*}"

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if ! (cd "$repo" && CARGO_TERM_COLOR=never cargo rustc --release --lib --crate-type staticlib \
        -- --print native-static-libs) >"$log" 2>&1; then
    cat "$log" >&2
    exit 1
fi
native_libs="$(sed -n 's/^note: native-static-libs: //p' "$log" | tail -n1)"
if [[ -z $native_libs ]]; then
    cat "$log" >&2
    echo "bindings/c/generate.sh: rustc printed no native-static-libs" >&2
    exit 1
fi

# In the .pc files, paths under the prefix are written relative to it (pkg-config --define-prefix relocates them).
under_prefix() {
    case "$1" in
        "$prefix") echo '${prefix}' ;;
        "$prefix"/*) echo '${prefix}'"${1#"$prefix"}" ;;
        *) echo "$1" ;;
    esac
}

# fill TEMPLATE OUTPUT NAME=VALUE…: replaces every @NAME@ of the template by its value.
fill() {
    local text name value
    text="$(<"$1")"
    shift
    local output="$1"
    shift
    for pair in "$@"; do
        name="${pair%%=*}" value="${pair#*=}"
        text="${text//@"$name"@/"$value"}"
    done
    if [[ $text == *@[A-Z_]*@* ]]; then
        echo "bindings/c/generate.sh: unfilled placeholder in $output" >&2
        exit 1
    fi
    mkdir -p "$(dirname "$output")"
    printf '%s\n' "$text" >"$output"
}

pc=(PREFIX="$prefix" LIBDIR="$(under_prefix "$libdir")" INCLUDEDIR="$(under_prefix "$includedir")"
    VERSION="$version" NATIVE_LIBS="$native_libs")
fill "$here/wasm_ecds.pc.in" "$out/pkgconfig/wasm_ecds.pc" "${pc[@]}"
fill "$here/wasm_ecds-static.pc.in" "$out/pkgconfig/wasm_ecds-static.pc" "${pc[@]}"

cmake=(LIBDIR="$libdir" INCLUDEDIR="$includedir" VERSION="$version" MAJOR="$major"
       NATIVE_LIBS="$(tr ' ' ';' <<<"$native_libs")")
cmake_in="$repo/bindings/cpp/cmake"
fill "$cmake_in/wasm_ecdsConfig.cmake.in" "$out/cmake/wasm_ecds/wasm_ecdsConfig.cmake" "${cmake[@]}"
fill "$cmake_in/wasm_ecdsConfigVersion.cmake.in" "$out/cmake/wasm_ecds/wasm_ecdsConfigVersion.cmake" "${cmake[@]}"
