#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wasm_ecds_fuzz::oci_challenge(data));
