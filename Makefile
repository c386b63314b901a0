# wasm-ecds: one entry point for building, testing and benchmarking.
#   make demo    converts Istio's basic-auth walkthrough example end to end against a local server
#   make test    lint, then every test: Rust, C, C++, Go, Python, protobuf fidelity, real Envoy end to end
#   make lint    rustfmt and clippy (warnings are errors)
#   make bench   benchmarks with baselines side by side (BENCHMARKS.md)
#   make fuzz    runs every fuzz target for FUZZ_SECONDS (default 600), two at a time (docs/fuzzing.md)
#   make header  copies the header the build generated into include/wasm_ecds.h (commit it)
#   make install PREFIX=/usr/local [LIBDIR=… INCLUDEDIR=… DESTDIR=…]  headers, libraries, pkg-config, CMake files

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
REPO := $(abspath .)
export WASM_ECDS_LIB_DIR ?= $(REPO)/target/release
CFLAGS_TEST := -std=c11 -Wall -Wextra -Werror -pedantic -g -fsanitize=address,undefined -fno-omit-frame-pointer

.PHONY: all build demo header lint test test-rust test-deps test-fuzz test-c test-header-cpp test-python test-go test-cpp test-fidelity test-e2e bench fuzz fuzz-seeds clean-tests

all: build

build:
	cargo build --release --lib

demo:
	cargo run --release --example quickstart

# build.rs writes the header into the build's OUT_DIR only; cargo names that directory in its JSON messages.
header:
	out_dir=$$(cargo build --release --lib --message-format=json-render-diagnostics | python3 -c 'import json, sys; \
	  messages = [json.loads(line) for line in sys.stdin]; \
	  print(next(m["out_dir"] for m in messages \
	             if m.get("reason") == "build-script-executed" and "#wasm-ecds@" in m["package_id"]))'); \
	cp "$$out_dir/wasm_ecds.h" include/wasm_ecds.h
	@git diff --stat -- include/ || true

# The fuzz crate (tests/fuzz) is a crate of its own; it shares the library's target directory.
lint:
	cargo fmt --check
	cargo clippy --release --all-targets -- -D warnings
	cargo fmt --check --manifest-path tests/fuzz/Cargo.toml
	CARGO_TARGET_DIR=$(REPO)/target cargo clippy --release --manifest-path tests/fuzz/Cargo.toml --all-targets -- -D warnings

test: lint build test-rust test-fuzz test-c test-header-cpp test-python test-go test-cpp test-fidelity test-e2e test-install
	@echo "make test: all suites passed"

# The OCI tests start the distribution registry; tests/oci/deps.sh installs it when missing.
test-rust: test-deps
	cargo test --release

test-deps:
	bash tests/oci/deps.sh

# Every checked-in corpus and regression input through every fuzz target, on stable (no libFuzzer needed).
test-fuzz:
	bash tests/fuzz/run.sh replay

test-c: build
	mkdir -p target/c
	gcc $(CFLAGS_TEST) -Iinclude tests/c/test_capi.c $(WASM_ECDS_LIB_DIR)/libwasm_ecds.a -lpthread -ldl -lm -o target/c/test_capi
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 ./target/c/test_capi

# The header alone compiles as C and as C++.
test-header-cpp:
	echo '#include "wasm_ecds.h"' | gcc -std=c99 -Wall -Wextra -Werror -pedantic -Iinclude -x c -fsyntax-only -
	echo '#include "wasm_ecds.h"' | g++ -std=c++17 -Wall -Wextra -Werror -pedantic -Iinclude -x c++ -fsyntax-only -

test-python: build
	bash bindings/python/test.sh

test-go: build
	bash bindings/go/test.sh

test-cpp: build
	bash bindings/cpp/test.sh

test-fidelity: build
	bash tests/fidelity/run.sh

test-e2e: build
	bash tests/e2e/run.sh

bench:
	bash benches/run.sh

# libFuzzer on stable Rust: FUZZ_SECONDS per target (default 600), FUZZ_JOBS at a time (default 2),
# FUZZ_TARGETS to choose (default all). Crashes land in tests/fuzz/artifacts/<target>/.
FUZZ_TARGETS ?=
fuzz:
	bash tests/fuzz/run.sh fuzz $(FUZZ_TARGETS)

# Regenerates the checked-in seed corpora (tests/fuzz/corpus/) from the test kit's builders.
fuzz-seeds:
	bash tests/fuzz/run.sh seeds

# Install as C, C++ and Go toolchains expect (bindings/c/install.sh lists the files); DESTDIR stages a package.
.PHONY: install uninstall test-install
PREFIX ?= /usr/local
LIBDIR ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include

install: build
	PREFIX='$(PREFIX)' LIBDIR='$(LIBDIR)' INCLUDEDIR='$(INCLUDEDIR)' DESTDIR='$(DESTDIR)' bash bindings/c/install.sh install

uninstall:
	PREFIX='$(PREFIX)' LIBDIR='$(LIBDIR)' INCLUDEDIR='$(INCLUDEDIR)' DESTDIR='$(DESTDIR)' bash bindings/c/install.sh uninstall

# Every command of the README's "Install" section, run as a new user would, outside the repository.
test-install: build
	bash tests/install/run.sh
