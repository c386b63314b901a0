//! Replays every checked-in input through its target on stable Rust: `corpus/<target>/` (the seeds) and
//! `regressions/<target>/` (crashes found by `make fuzz`, fixed since). A panic fails the test and names the
//! input; `findings/` (open defects) is not replayed.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else { continue };
        for entry in entries {
            let path = entry.expect("read corpus directory").path();
            if path.is_file() && path.file_name().is_some_and(|n| !n.to_string_lossy().starts_with('.')) {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn replay(target: &str) {
    let (_, run) = wasm_ecds_fuzz::TARGETS.iter().find(|(name, _)| *name == target).expect("a known target");
    let files = inputs(target);
    assert!(!files.is_empty(), "no corpus for {target}: run `make fuzz-seeds`");
    let mut failed = Vec::new();
    for path in &files {
        let data = std::fs::read(path).expect("read input");
        if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(failed.is_empty(), "{target}: {} of {} inputs panicked:\n{}", failed.len(), files.len(), failed.join("\n"));
}

#[test]
fn convert() {
    replay("convert");
}

#[test]
fn convert_delta() {
    replay("convert_delta");
}

#[test]
fn nack() {
    replay("nack");
}

#[test]
fn nack_delta() {
    replay("nack_delta");
}

#[test]
fn typed_struct() {
    replay("typed_struct");
}

#[test]
fn options() {
    replay("options");
}

#[test]
fn unbox() {
    replay("unbox");
}

/// Every target has a test above and a corpus directory.
#[test]
fn every_target_is_replayed() {
    let source = include_str!("replay.rs");
    for (name, _) in wasm_ecds_fuzz::TARGETS {
        assert!(source.contains(&format!("fn {name}() {{\n    replay(\"{name}\");")), "no replay test for {name}");
        assert!(!inputs(name).is_empty(), "no corpus for {name}");
    }
}

/// The seeds reach what they are named for: seeded modules are hits, misses reject or fall back, archives
/// unbox. Without this a broken harness (say, an unseeded cache) would still replay without a panic.
#[test]
fn seeds_take_their_paths() {
    use wasm_ecds_fuzz::{convert_delta_outcome, convert_outcome, typed_struct_outcome, unbox_outcome, Outcome};
    let seed = |target: &str, name: &str| {
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target).join(name))
            .unwrap_or_else(|e| panic!("{target}/{name}: {e}"))
    };
    let ok = |outcome: Outcome, what: &str| match outcome {
        Some(Ok(out)) => out,
        other => panic!("{what}: {other:?}"),
    };
    let rejected = |outcome: Outcome, what: &str| assert!(matches!(outcome, Some(Err(_))), "{what}: {outcome:?}");

    let hits = ok(convert_outcome(&seed("convert", "hits-reject")), "hits");
    let files: Vec<_> = wasm_ecds_testkit::ecds::wasms(&hits).iter().map(|w| w.local_filename()).collect();
    assert!(files.iter().all(Option::is_some), "seeded modules are converted: {files:?}");
    let typical = seed("convert", "typical-off");
    assert_eq!(ok(convert_outcome(&typical), "typical off"), typical[1..]);
    ok(convert_outcome(&seed("convert", "typical-reject")), "typical");
    rejected(convert_outcome(&seed("convert", "misses-reject")), "misses, reject");
    ok(convert_outcome(&seed("convert", "misses-deny")), "misses, deny");

    ok(convert_delta_outcome(&seed("convert_delta", "delta-reject")), "delta");
    rejected(convert_delta_outcome(&seed("convert_delta", "delta-misses-reject")), "delta misses, reject");
    ok(convert_delta_outcome(&seed("convert_delta", "delta-misses-deny")), "delta misses, deny");

    ok(typed_struct_outcome(&seed("typed_struct", "hit-udpa")), "TypedStruct hit");
    ok(typed_struct_outcome(&seed("typed_struct", "network-xds")), "xds TypedStruct hit");
    rejected(typed_struct_outcome(&seed("typed_struct", "unknown-key-udpa")), "TypedStruct with an unknown key");

    for name in ["wasm", "wasm-content-encoding", "gzip", "tar", "tar-gz", "gz-gz", "tar-two-entries"] {
        ok(unbox_outcome(&seed("unbox", name)), name);
    }
    for name in ["html", "tar-not-wasm", "gzip-truncated", "empty"] {
        rejected(unbox_outcome(&seed("unbox", name)), name);
    }
}
