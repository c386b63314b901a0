//! Generates the C header from `src/ffi.rs` (and the log callback's types in `src/log_bridge.rs`) with
//! cbindgen, into `$OUT_DIR/wasm_ecds.h` only: a build never writes into the source tree. `make header`
//! copies it to `include/wasm_ecds.h`, and `tests/header.rs` fails while the checked-in copy differs.
//!
//! It also gives the shared library its soname, `libwasm_ecds.so.<major>`: the ABI promise in the header
//! holds within a major version, so a program linked against 0.2 loads any later 0.x that `make install`
//! put behind the `libwasm_ecds.so.0` link.

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

    // ELF platforms only: Apple's linker names a library by `-install_name`, Windows has no soname.
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let apple = matches!(target_os.as_str(), "macos" | "ios" | "tvos" | "watchos" | "visionos");
    if std::env::var("CARGO_CFG_TARGET_FAMILY").is_ok_and(|f| f.split(',').any(|f| f == "unix")) && !apple {
        let major = std::env::var("CARGO_PKG_VERSION_MAJOR").expect("CARGO_PKG_VERSION_MAJOR");
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libwasm_ecds.so.{major}");
    }
}
