//! Generates the C header from `src/ffi.rs` (and the log callback's types in `src/log_bridge.rs`) with
//! cbindgen, into `$OUT_DIR/wasm_ecds.h` only: a build never writes into the source tree. `make header`
//! copies it to `include/wasm_ecds.h`, and `tests/header.rs` fails while the checked-in copy differs.

use std::path::PathBuf;

fn main() {
    // cbindgen reads the whole crate: any source file may declare part of the C API.
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");

    let crate_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("read cbindgen.toml");
    cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen could not generate the header")
        .write_to_file(out_dir.join("wasm_ecds.h"));
}
