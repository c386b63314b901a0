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

#[test]
fn oci_manifest() {
    replay("oci_manifest");
}

#[test]
fn oci_reference() {
    replay("oci_reference");
}

#[test]
fn oci_pull_secret() {
    replay("oci_pull_secret");
}

#[test]
fn oci_challenge() {
    replay("oci_challenge");
}

#[test]
fn oci_token() {
    replay("oci_token");
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

/// The OCI seeds reach what they are named for: every usable format yields a layer, every unusable one a
/// reason, an index its Wasm entry, the secrets and answers their credentials and tokens.
#[test]
fn oci_seeds_take_their_paths() {
    use wasm_ecds::fuzzing::oci::{self, Challenge, Document, Target};
    use wasm_ecds_fuzz::oci::{pull_secret, substitute, CONTENT_TYPES, PASSWORD, REGISTRIES, TOKEN};
    let seed = |target: &str, name: &str| {
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target).join(name))
            .unwrap_or_else(|e| panic!("{target}/{name}: {e}"))
    };
    let document = |name: &str| {
        let data = seed("oci_manifest", name);
        oci::parse_manifest(&data[1..], CONTENT_TYPES[data[0] as usize]).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let formats = ["docker-compat", "oci-compat", "oci-artifact", "oci-artifact-wasm-last", "oras-python", "oras-cli"];
    let unusable = ["no-wasm-layer", "three-layers", "single-other-layer"];
    for suffix in ["no-type", "typed"] {
        for (name, usable) in formats
            .iter()
            .map(|f| (f.to_string(), true))
            .chain(unusable.iter().map(|u| (format!("unusable-{u}"), false)))
        {
            let Document::Manifest { media_type, layers } = document(&format!("{name}-{suffix}")) else {
                panic!("{name}: not a manifest")
            };
            assert_eq!(oci::choose_layer(&media_type, &layers).is_ok(), usable, "{name}-{suffix}");
        }
        let Document::Index { manifests } = document(&format!("index-wasip1-{suffix}")) else { panic!("an index") };
        let picked = oci::pick_platform(&manifests).unwrap();
        assert_eq!(picked.platform, Some(("wasip1".to_string(), "wasm".to_string())));
    }

    let reference = |name: &str| oci::parse_reference(std::str::from_utf8(&seed("oci_reference", name)).unwrap());
    assert!(matches!(reference("digest").unwrap().target, Target::Digest(_)));
    assert!(reference("bad-digest-traversal").is_err());

    for name in ["auth", "username-password", "docker-hub-key", "docker-io-host", "url-key", "case"] {
        let data = seed("oci_pull_secret", name);
        let registry = REGISTRIES[data[0] as usize];
        let found = oci::credentials_for(Some(&pull_secret(&data[1..])), registry).unwrap().expect(name);
        assert_eq!(found.password, PASSWORD, "{name}");
    }
    let data = seed("oci_pull_secret", "identitytoken");
    assert!(oci::credentials_for(Some(&pull_secret(&data[1..])), REGISTRIES[data[0] as usize]).is_err());

    let challenge = String::from_utf8(seed("oci_challenge", "docker-hub")).unwrap();
    assert!(matches!(oci::parse_challenges([challenge.as_str()]), Some(Challenge::Bearer { .. })));

    for name in ["token", "access-token", "both"] {
        let body = substitute(&seed("oci_token", name), b"@T", TOKEN.as_bytes());
        assert_eq!(oci::parse_token_response(&body).as_deref(), Ok(TOKEN), "{name}");
    }
}
