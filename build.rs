//! Generates `include/wasm_ecds.h` from `src/ffi.rs` with cbindgen.
//!
//! The header is always written to `$OUT_DIR/wasm_ecds.h`; `tests/header.rs` fails when it differs from the
//! checked-in `include/wasm_ecds.h`. Outside CI the checked-in copy is refreshed too, so a developer only has
//! to commit it; in CI (`CI` set) it is never touched, so a stale header is caught, not silently fixed.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=src/ffi.rs");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-env-changed=CI");

    let crate_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("read cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen could not generate the header");
    bindings.write_to_file(out_dir.join("wasm_ecds.h"));
    if std::env::var_os("CI").is_none() {
        bindings.write_to_file(crate_dir.join("include").join("wasm_ecds.h"));
    }
}
