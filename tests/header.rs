//! The checked-in C header is exactly what cbindgen generates from `src/ffi.rs` (build.rs writes the fresh
//! one to OUT_DIR). A stale header fails here; refresh it with `make header` and commit it.

#[test]
fn checked_in_header_matches_cbindgen_output() {
    let generated = std::fs::read_to_string(concat!(env!("OUT_DIR"), "/wasm_ecds.h")).expect("generated header");
    let checked_in = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/include/wasm_ecds.h"))
        .expect("include/wasm_ecds.h is missing");
    assert!(
        generated == checked_in,
        "include/wasm_ecds.h is stale: run `make header` and commit it (first differing line: {:?})",
        generated.lines().zip(checked_in.lines()).find(|(a, b)| a != b)
    );
}

#[test]
fn header_declares_the_whole_c_api() {
    let header = include_str!("../include/wasm_ecds.h");
    for symbol in [
        "wasm_ecds_cache *wasm_ecds_cache_new(const char *options_json",
        "void wasm_ecds_cache_free(struct wasm_ecds_cache *cache)",
        "int32_t wasm_ecds_convert(struct wasm_ecds_cache *cache",
        "int32_t wasm_ecds_convert_delta(struct wasm_ecds_cache *cache",
        "int32_t wasm_ecds_nack(const uint8_t *response",
        "char *wasm_ecds_metrics(const struct wasm_ecds_cache *cache)",
        "int64_t wasm_ecds_purge(struct wasm_ecds_cache *cache)",
        "void wasm_ecds_bytes_free(struct wasm_ecds_bytes bytes)",
        "void wasm_ecds_string_free(char *s)",
        "const char *wasm_ecds_version(void)",
        "#define WASM_ECDS_OK 0",
        "#define WASM_ECDS_REJECTED 1",
        "#define WASM_ECDS_INVALID_ARGUMENT -1",
        "#define WASM_ECDS_INTERNAL_ERROR -2",
    ] {
        assert!(header.contains(symbol), "header lacks {symbol:?}");
    }
}
