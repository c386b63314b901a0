#!/usr/bin/env bash
# `make test-install`: every command of the README's "Install" section, run as a new user runs it, with the
# results used from outside the repository:
#   1. make install into a temporary prefix; into a DESTDIR staging root, and make uninstall from it
#   2. C and C++: tests/c/test_capi.c and bindings/cpp/test_wasm_ecds.cpp built with pkg-config from the prefix,
#      shared (wasm_ecds) and static (wasm_ecds-static), and run
#   3. CMake: a project using the installed CMake package and one using pkg_check_modules
#   4. Go: a program in a temporary module whose go.mod replaces the binding by bindings/go, PKG_CONFIG_PATH
#   5. Python: `pip install ./bindings/python` into a fresh virtualenv; `python -m build bindings/python`, its
#      wheel installed into another one, where the binding's tests run with no WASM_ECDS_LIBRARY and no cargo
#   6. Footprint: the stripped shared library (under 4 MiB) and what the binding adds to a Go program
# Installs cmake and pkg-config (Debian) and Python's `build` when missing. Fails on any failure, never skips.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
python="${PYTHON:-python3}"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/Cargo.toml" | head -n1)"
major="${version%%.*}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
prefix="$work/prefix"
passed=0

step() { printf '\n== install: %s\n' "$*"; }
ok() { passed=$((passed + 1)); echo "ok: $*"; }
fail() { echo "tests/install/run.sh: FAIL: $*" >&2; exit 1; }
# expect_line FILE TEXT: FILE holds a line starting with TEXT.
expect_line() { grep -q "^$2" "$1" || { cat "$1" >&2; fail "expected a line starting with '$2'"; }; }
needed() { readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'; }
# A grep that reads all of its input (grep -q may stop early, and pipefail then sees the writer's SIGPIPE).
matches() { grep "$@" >/dev/null; }

missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v pkg-config >/dev/null || missing+=(pkg-config)
command -v go >/dev/null || missing+=(golang-go)
command -v readelf >/dev/null || missing+=(binutils)
if ((${#missing[@]})); then
    echo "tests/install/run.sh: installing ${missing[*]}"
    if [[ $(id -u) -eq 0 ]]; then sudo=""; else sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# ---- 1. make install -----------------------------------------------------------------------------------------
step "make install PREFIX=$prefix"
make -C "$repo" --no-print-directory install PREFIX="$prefix" >"$work/install.log"
lib="$prefix/lib"
for file in include/wasm_ecds.h include/wasm_ecds.hpp lib/libwasm_ecds.a "lib/libwasm_ecds.so.$version" \
            lib/pkgconfig/wasm_ecds.pc lib/pkgconfig/wasm_ecds-static.pc lib/cmake/wasm_ecds/wasm_ecdsConfig.cmake \
            lib/cmake/wasm_ecds/wasm_ecdsConfigVersion.cmake; do
    [[ -f $prefix/$file ]] || fail "make install did not install $file"
done
[[ $(readlink "$lib/libwasm_ecds.so.$major") == "libwasm_ecds.so.$version" ]] ||
    fail "libwasm_ecds.so.$major does not link to libwasm_ecds.so.$version"
[[ $(readlink "$lib/libwasm_ecds.so") == "libwasm_ecds.so.$major" ]] || fail "libwasm_ecds.so does not link to the soname"
readelf -d "$lib/libwasm_ecds.so.$version" | matches "Library soname: \[libwasm_ecds.so.$major\]" ||
    fail "the installed shared library's soname is not libwasm_ecds.so.$major"
ok "make install: headers, libwasm_ecds.a, libwasm_ecds.so.$version with soname libwasm_ecds.so.$major, .pc, CMake"

export PKG_CONFIG_PATH="$lib/pkgconfig"
[[ $(pkg-config --modversion wasm_ecds) == "$version" ]] || fail "pkg-config --modversion wasm_ecds"
native_libs="$(sed -n 's/^Libs.private: //p' "$lib/pkgconfig/wasm_ecds.pc")"
[[ $native_libs == *-l* ]] || fail "wasm_ecds.pc has no Libs.private"
# pkg_config ARGS…: pkg-config's output with its blanks normalised.
pkg_config() { local out; out="$(pkg-config "$@")"; echo $out; } # shellcheck disable=SC2086
[[ $(pkg_config --libs wasm_ecds) == "-L$lib -lwasm_ecds" ]] || fail "pkg-config --libs wasm_ecds: $(pkg_config --libs wasm_ecds)"
[[ $(pkg_config --static --libs wasm_ecds) == *"-lwasm_ecds $native_libs"* ]] ||
    fail "pkg-config --static --libs wasm_ecds lacks Libs.private: $(pkg_config --static --libs wasm_ecds)"
ok "pkg-config: wasm_ecds $version, Libs.private: $native_libs"

step "make install DESTDIR=… PREFIX=/usr; make uninstall"
stage="$work/stage"
make -C "$repo" --no-print-directory install DESTDIR="$stage" PREFIX=/usr >"$work/install-destdir.log"
[[ -L $stage/usr/lib/libwasm_ecds.so.$major && -f $stage/usr/include/wasm_ecds.h ]] || fail "DESTDIR install"
grep -qx 'prefix=/usr' "$stage/usr/lib/pkgconfig/wasm_ecds.pc" || fail "the staged wasm_ecds.pc does not say prefix=/usr"
grep -q '"/usr/lib/libwasm_ecds.a"' "$stage/usr/lib/cmake/wasm_ecds/wasm_ecdsConfig.cmake" ||
    fail "the staged CMake package does not name /usr/lib/libwasm_ecds.a"
make -C "$repo" --no-print-directory uninstall DESTDIR="$stage" PREFIX=/usr >/dev/null
left="$(find "$stage" ! -type d)"
[[ -z $left ]] || fail "make uninstall left: $left"
ok "DESTDIR staging writes the final paths into the files; make uninstall removes every file"

# ---- 2. C and C++ through pkg-config ---------------------------------------------------------------------------
step "C and C++ tests built with pkg-config against $prefix"
c_flags=(-std=c11 -Wall -Wextra -Werror -pedantic -O1 -pthread)
cxx_flags=(-std=c++17 -Wall -Wextra -Werror -O1 -pthread)
# shellcheck disable=SC2046  # pkg-config's output is a list of flags
{
    gcc "${c_flags[@]}" "$repo/tests/c/test_capi.c" $(pkg-config --cflags --libs wasm_ecds) -o "$work/c_shared"
    gcc "${c_flags[@]}" "$repo/tests/c/test_capi.c" $(pkg-config --static --cflags --libs wasm_ecds-static) \
        -o "$work/c_static"
    g++ "${cxx_flags[@]}" "$repo/bindings/cpp/test_wasm_ecds.cpp" $(pkg-config --cflags --libs wasm_ecds) \
        -o "$work/cpp_shared"
    g++ "${cxx_flags[@]}" "$repo/bindings/cpp/test_wasm_ecds.cpp" \
        $(pkg-config --static --cflags --libs wasm_ecds-static) -o "$work/cpp_static"
}
for program in c_shared cpp_shared; do
    needed "$work/$program" | matches -x "libwasm_ecds.so.$major" || fail "$program does not need libwasm_ecds.so.$major"
    LD_LIBRARY_PATH="$lib" ldd "$work/$program" | matches "libwasm_ecds.so.$major => $lib/" ||
        fail "$program does not load the installed library"
    LD_LIBRARY_PATH="$lib" "$work/$program" >"$work/$program.log" 2>&1 || { cat "$work/$program.log"; fail "$program"; }
    ok "$program: needs libwasm_ecds.so.$major, loads it from the prefix, passes"
done
for program in c_static cpp_static; do
    ! needed "$work/$program" | matches wasm_ecds || fail "$program needs a shared libwasm_ecds"
    "$work/$program" >"$work/$program.log" 2>&1 || { cat "$work/$program.log"; fail "$program"; }
    ok "$program: libwasm_ecds.a linked in, passes"
done

# ---- 3. CMake ------------------------------------------------------------------------------------------------
for project in cmake-package cmake-pkg-config; do
    step "CMake project tests/install/$project against $prefix"
    build="$work/$project"
    # PKG_CONFIG_PATH is left out: pkg_check_modules finds the prefix through CMAKE_PREFIX_PATH, as a user's would.
    env -u PKG_CONFIG_PATH cmake -S "$here/$project" -B "$build" -DCMAKE_PREFIX_PATH="$prefix" >"$build.log" 2>&1 ||
        { cat "$build.log"; fail "cmake configure of $project"; }
    cmake --build "$build" >>"$build.log" 2>&1 || { cat "$build.log"; fail "cmake build of $project"; }
    for app in "$build"/app_*; do
        "$app" "$work/cache" >"$app.out" || fail "$app"
        expect_line "$app.out" "wasm_ecds $version: converted "
        ok "$project/$(basename "$app"): $(cat "$app.out")"
    done
done
! needed "$work/cmake-package/app_static" | matches wasm_ecds || fail "wasm_ecds::static links a shared libwasm_ecds"
needed "$work/cmake-package/app_shared" | matches -x "libwasm_ecds.so.$major" || fail "wasm_ecds::wasm_ecds is not shared"

# ---- 4. Go ---------------------------------------------------------------------------------------------------
step "a Go program outside the repository, against $prefix"
# A build cache of its own: Go's keeps a package's pkg-config result (golang/go#24544), so a cache shared with
# bindings/go/test.sh would link the build tree's library instead of the prefix's.
export GOFLAGS="-mod=mod" GOPROXY=off GOTOOLCHAIN=local CGO_ENABLED=1 GOCACHE="$work/go-cache"
go_module() { # go_module DIR SOURCE_DIR [binding]
    mkdir -p "$1"
    cp "$2/main.go" "$1/"
    printf 'module example.com/wasm-ecds-install-test\n\ngo 1.19\n' >"$1/go.mod"
    if [[ ${3:-} == binding ]]; then
        printf 'require github.com/wasm-ecds/wasm-ecds/bindings/go v0.0.0\n' >>"$1/go.mod"
        printf 'replace github.com/wasm-ecds/wasm-ecds/bindings/go => %s\n' "$repo/bindings/go" >>"$1/go.mod"
    fi
}
go_module "$work/go" "$here/go" binding
(cd "$work/go" && go build -o app .)
! needed "$work/go/app" | matches wasm_ecds || fail "the Go program needs a shared libwasm_ecds"
"$work/go/app" "$work/cache" >"$work/go/app.out" || fail "the Go program"
expect_line "$work/go/app.out" "wasm_ecds $version: converted "
ok "Go (pkg-config wasm_ecds-static): $(cat "$work/go/app.out")"

# ---- 5. Python -----------------------------------------------------------------------------------------------
tools="$work/venv-tools"
"$python" -m venv "$tools"
"$tools/bin/pip" install --quiet --disable-pip-version-check build

step "pip install ./bindings/python into a fresh virtualenv"
"$python" -m venv "$work/venv-pip"
tree() { git -C "$repo" status --porcelain --ignored --untracked-files=all -- bindings/python; }
before="$(tree)"
(cd "$repo" && "$work/venv-pip/bin/pip" install --quiet --disable-pip-version-check ./bindings/python)
[[ $(tree) == "$before" ]] || fail "pip install ./bindings/python left files in the source tree: $(diff <(echo "$before") <(tree))"
# Outside the repository, without WASM_ECDS_LIBRARY and without cargo on the PATH.
smoke='import wasm_ecds, wasm_ecds._native as n
print(wasm_ecds.__version__, n.library_path())'
(cd "$work" && env -u WASM_ECDS_LIBRARY -u PYTHONPATH PATH="$work/venv-pip/bin:/usr/bin:/bin" python -c "$smoke") \
    >"$work/pip.out"
read -r got_version got_library <"$work/pip.out"
[[ $got_version == "$version" && $got_library == "$work/venv-pip/"*/site-packages/wasm_ecds/libwasm_ecds.so ]] ||
    fail "pip install ./bindings/python: $(cat "$work/pip.out")"
ok "pip install ./bindings/python: wasm_ecds $got_version, library $got_library"

step "python -m build bindings/python; the wheel in a fresh virtualenv runs the binding's tests"
# The wheel is built from the sdist, in a scratch copy: a cold build of the crate unless a target dir is shared.
CARGO_TARGET_DIR="${WASM_ECDS_SDIST_TARGET_DIR:-$repo/target/sdist}" \
    "$tools/bin/python" -m build --outdir "$work/dist" "$repo/bindings/python" >"$work/build.log" 2>&1 ||
    { tail -n 50 "$work/build.log"; fail "python -m build bindings/python"; }
wheel="$(echo "$work/dist/"*.whl)"
[[ $(basename "$wheel") == "wasm_ecds-$version-py3-none-linux_$(uname -m).whl" ]] || fail "unexpected wheel $wheel"
"$tools/bin/python" -m zipfile -l "$wheel" | matches "wasm_ecds/libwasm_ecds.so" || fail "the wheel lacks the library"
ok "python -m build: $(basename "$work/dist/"*.tar.gz), $(basename "$wheel")"

venv="$work/venv-wheel"
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "$wheel" pytest prometheus_client xds-protos protobuf
cp -r "$repo/bindings/python/tests" "$work/python-tests"
(cd "$work/python-tests" && env -u WASM_ECDS_LIBRARY -u PYTHONPATH PATH="$venv/bin:/usr/bin:/bin" \
    WASM_ECDS_HEADER="$repo/include/wasm_ecds.h" python -c "$smoke" >"$work/wheel.out" &&
    env -u WASM_ECDS_LIBRARY -u PYTHONPATH PATH="$venv/bin:/usr/bin:/bin" \
    WASM_ECDS_HEADER="$repo/include/wasm_ecds.h" python -m pytest -p no:cacheprovider -q)
read -r got_version got_library <"$work/wheel.out"
[[ $got_version == "$version" && $got_library == "$venv/"*/site-packages/wasm_ecds/libwasm_ecds.so ]] ||
    fail "the wheel's package: $(cat "$work/wheel.out")"
metadata_version="$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("wasm-ecds"))')"
[[ $metadata_version == "$version" ]] || fail "the wheel's metadata says version $metadata_version"
ok "the wheel: the binding's tests pass with its own library ($got_library), version $version"

# ---- 6. Footprint --------------------------------------------------------------------------------------------
step "footprint"
strip -o "$work/libwasm_ecds.so.stripped" "$lib/libwasm_ecds.so.$version"
so_bytes="$(stat -c %s "$work/libwasm_ecds.so.stripped")"
((so_bytes < 4 * 1024 * 1024)) || fail "the stripped shared library is $so_bytes bytes, not under 4 MiB"
go_module "$work/go-baseline" "$here/go-baseline"
(cd "$work/go-baseline" && go build -ldflags="-s -w" -o app . && "$work/go-baseline/app" "$work/cache" >/dev/null)
(cd "$work/go" && go build -ldflags="-s -w" -o app-stripped .)
base_bytes="$(stat -c %s "$work/go-baseline/app")"
go_bytes="$(stat -c %s "$work/go/app-stripped")"
mib() { awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'; }
printf '  %-52s %10d bytes  (%s)\n' "libwasm_ecds.so, stripped" "$so_bytes" "$(mib "$so_bytes")" \
    "Go program without the binding (-ldflags='-s -w')" "$base_bytes" "$(mib "$base_bytes")" \
    "Go program with the binding (-ldflags='-s -w')" "$go_bytes" "$(mib "$go_bytes")" \
    "what the binding adds to a Go program" "$((go_bytes - base_bytes))" "$(mib $((go_bytes - base_bytes)))"
ok "footprint: stripped libwasm_ecds.so is under 4 MiB"

echo
echo "install: $passed passed, 0 failed"
