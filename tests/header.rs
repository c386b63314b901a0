//! The checked-in C header is exactly what cbindgen generates from the sources (build.rs writes the fresh
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

/// The C API of ABI 0.2, declaration by declaration (whitespace aside): a change here is a change of the ABI.
#[test]
fn header_declares_the_whole_c_api() {
    let header = include_str!("../include/wasm_ecds.h").split_whitespace().collect::<Vec<_>>().join(" ");
    for declaration in [
        "#define WASM_ECDS_VERSION_MAJOR 0",
        "#define WASM_ECDS_VERSION_MINOR 2",
        "#define WASM_ECDS_OK 0",
        "#define WASM_ECDS_REJECTED 1",
        "#define WASM_ECDS_INVALID_ARGUMENT -1",
        "#define WASM_ECDS_INTERNAL_ERROR -2",
        "#define WASM_ECDS_IO_ERROR -3",
        "#define WASM_ECDS_LOG_ERROR 1",
        "#define WASM_ECDS_LOG_WARN 2",
        "#define WASM_ECDS_LOG_INFO 3",
        "#define WASM_ECDS_LOG_DEBUG 4",
        "#define WASM_ECDS_LOG_TRACE 5",
        "typedef struct wasm_ecds_cache wasm_ecds_cache;",
        "typedef struct wasm_ecds_bytes { uint8_t *data; size_t len; } wasm_ecds_bytes;",
        "typedef void (*wasm_ecds_log_callback)(void *user_data, int32_t level, const char *target, \
         const char *message);",
        "const char *wasm_ecds_version(void);",
        "int32_t wasm_ecds_cache_new(const char *options_json, struct wasm_ecds_cache **out, char **reason);",
        "void wasm_ecds_cache_free(struct wasm_ecds_cache *cache);",
        "int32_t wasm_ecds_convert(const struct wasm_ecds_cache *cache, const uint8_t *response, \
         size_t response_len, struct wasm_ecds_bytes *out, char **reason);",
        "int32_t wasm_ecds_convert_delta(const struct wasm_ecds_cache *cache, const uint8_t *response, \
         size_t response_len, struct wasm_ecds_bytes *out, char **reason);",
        "int32_t wasm_ecds_nack(const uint8_t *response, size_t response_len, const char *last_acked_version, \
         const char *error_detail, struct wasm_ecds_bytes *out, char **reason);",
        "int32_t wasm_ecds_nack_delta(const uint8_t *response, size_t response_len, const char *error_detail, \
         struct wasm_ecds_bytes *out, char **reason);",
        "char *wasm_ecds_metrics(const struct wasm_ecds_cache *cache);",
        "int32_t wasm_ecds_purge(const struct wasm_ecds_cache *cache, uint64_t *removed, char **reason);",
        "void wasm_ecds_bytes_free(struct wasm_ecds_bytes bytes);",
        "void wasm_ecds_string_free(char *s);",
        "int32_t wasm_ecds_set_log_callback(wasm_ecds_log_callback callback, int32_t max_level, void *user_data);",
    ] {
        assert!(header.contains(declaration), "header lacks {declaration:?}");
    }
}
