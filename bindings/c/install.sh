#!/usr/bin/env bash
# `make install` / `make uninstall`: libwasm_ecds for C, C++ and Go toolchains, the way a distribution lays
# out a library:
#   INCLUDEDIR/wasm_ecds.h, wasm_ecds.hpp        the C header and the header-only C++ layer
#   LIBDIR/libwasm_ecds.a                        the static library
#   LIBDIR/libwasm_ecds.so.X.Y.Z                 the shared library (soname libwasm_ecds.so.X, set by build.rs),
#   LIBDIR/libwasm_ecds.so.X -> .so.X.Y.Z        the link the dynamic loader follows,
#   LIBDIR/libwasm_ecds.so -> .so.X              the link the linker follows for -lwasm_ecds
#   LIBDIR/pkgconfig/wasm_ecds.pc, wasm_ecds-static.pc
#   LIBDIR/cmake/wasm_ecds/wasm_ecdsConfig.cmake, wasm_ecdsConfigVersion.cmake
#
#   bindings/c/install.sh [install|uninstall]
#
# Environment (the Makefile passes its variables): PREFIX (/usr/local), LIBDIR ($PREFIX/lib), INCLUDEDIR
# ($PREFIX/include), DESTDIR (a staging root put before every path written to, never into the files' contents),
# WASM_ECDS_LIB_DIR (the build to install, target/release).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
prefix="${PREFIX:-/usr/local}"
libdir="${LIBDIR:-$prefix/lib}"
includedir="${INCLUDEDIR:-$prefix/include}"
destdir="${DESTDIR:-}"
build="${WASM_ECDS_LIB_DIR:-$repo/target/release}"
action="${1:-install}"

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/Cargo.toml" | head -n1)"
major="${version%%.*}"
real="libwasm_ecds.so.$version"
soname="libwasm_ecds.so.$major"

lib="$destdir$libdir"
inc="$destdir$includedir"
installed=("$inc/wasm_ecds.h" "$inc/wasm_ecds.hpp" "$lib/libwasm_ecds.a" "$lib/$real" "$lib/$soname"
           "$lib/libwasm_ecds.so" "$lib/pkgconfig/wasm_ecds.pc" "$lib/pkgconfig/wasm_ecds-static.pc"
           "$lib/cmake/wasm_ecds/wasm_ecdsConfig.cmake" "$lib/cmake/wasm_ecds/wasm_ecdsConfigVersion.cmake")

case "$action" in
    uninstall)
        rm -f "${installed[@]}"
        rmdir "$lib/cmake/wasm_ecds" 2>/dev/null || true
        echo "uninstalled libwasm_ecds $version from ${destdir}${prefix}"
        exit 0
        ;;
    install) ;;
    *)
        echo "usage: $0 [install|uninstall]" >&2
        exit 2
        ;;
esac

for file in libwasm_ecds.a libwasm_ecds.so; do
    if [[ ! -f $build/$file ]]; then
        echo "bindings/c/install.sh: $build/$file not found; run 'make build' first" >&2
        exit 1
    fi
done
# A shared library without its soname would be found by no program linked against the installed one.
if command -v readelf >/dev/null && ! readelf -d "$build/libwasm_ecds.so" | grep "Library soname: \[$soname\]" >/dev/null; then
    echo "bindings/c/install.sh: $build/libwasm_ecds.so lacks the soname $soname (build.rs sets it)" >&2
    exit 1
fi

generated="$(mktemp -d)"
trap 'rm -rf "$generated"' EXIT
bash "$here/generate.sh" "$generated" "$prefix" "$libdir" "$includedir"

install -d "$inc" "$lib/pkgconfig" "$lib/cmake/wasm_ecds"
install -m 644 "$repo/include/wasm_ecds.h" "$repo/bindings/cpp/wasm_ecds.hpp" "$inc/"
install -m 644 "$build/libwasm_ecds.a" "$lib/"
install -m 755 "$build/libwasm_ecds.so" "$lib/$real"
ln -sfn "$real" "$lib/$soname"
ln -sfn "$soname" "$lib/libwasm_ecds.so"
install -m 644 "$generated/pkgconfig/"*.pc "$lib/pkgconfig/"
install -m 644 "$generated/cmake/wasm_ecds/"*.cmake "$lib/cmake/wasm_ecds/"

# The dynamic loader finds a new library in /usr/local/lib and the like only once its cache is refreshed.
if [[ -z $destdir && $(id -u) -eq 0 ]] && command -v ldconfig >/dev/null; then
    ldconfig
fi

echo "installed libwasm_ecds $version into ${destdir}${prefix}:"
printf '  %s\n' "${installed[@]}"
