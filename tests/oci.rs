//! `oci://` modules through the library's Rust API against the real distribution registry on 127.0.0.1
//! (`wasm_ecds_testkit::registry`, Debian's `docker-registry`): every image format, indexes, references,
//! Istio's pull-policy table, checksums, auth (basic, bearer, secrets in both forms), unsafe token realms,
//! secrets kept out of every output, TLS, plain HTTP, registry mirrors, concurrency and restarts.
//!
//! Each test starts its own registries (or uses its own repositories) so tests run in parallel; every pull is
//! bounded by the filter's 10 s timeout and short request timeouts.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Barrier};

use base64::Engine;
use wasm_ecds::{Cache, Options};
use wasm_ecds_testkit::ecds::*;
use wasm_ecds_testkit::images::{self, Image, Index};
use wasm_ecds_testkit::registry::{Registry, RegistryConfig};
use wasm_ecds_testkit::server::{wasm_module, Route, TestServer};

const SUCCESS: &str = r#"istio_agent_wasm_remote_fetch_count{result="success"}"#;
const MANIFEST_FAILURE: &str = r#"istio_agent_wasm_remote_fetch_count{result="manifest_failure"}"#;
const DOWNLOAD_FAILURE: &str = r#"istio_agent_wasm_remote_fetch_count{result="download_failure"}"#;
const CHECKSUM_MISMATCHED: &str = r#"istio_agent_wasm_remote_fetch_count{result="checksum_mismatched"}"#;
const FETCH_FAILURE: &str = r#"istio_agent_wasm_remote_fetch_count{result="fetch_failure"}"#;

const PULL_SECRET: &str = "ISTIO_META_WASM_IMAGE_PULL_SECRET";
const PULL_POLICY: &str = "ISTIO_META_WASM_IMAGE_PULL_POLICY";
const RESOURCE_VERSION: &str = "ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION";

/// A cache in `dir` with short bounds, plus `extra` options.
fn open(dir: &Path, extra: serde_json::Value) -> Cache {
    let mut options = serde_json::json!({
        "cache_dir": dir,
        "max_attempts": 2,
        "retry_initial_backoff_ms": 10,
        "retry_max_backoff_ms": 50,
        "http_request_timeout_ms": 5000,
        "default_fetch_timeout_ms": 10000,
    });
    for (k, v) in extra.as_object().expect("object") {
        options[k] = v.clone();
    }
    Cache::new(Options::from_json(&options.to_string()).expect("options")).expect("cache opens")
}

/// A cache that speaks plain HTTP to these registries.
fn open_plain(dir: &Path, registries: &[&Registry]) -> Cache {
    let hosts: Vec<String> = registries.iter().map(|r| r.host()).collect();
    open(dir, serde_json::json!({ "plain_http_hosts": hosts }))
}

fn sample(cache: &Cache, name: &str) -> f64 {
    metric(&cache.metrics_text(), name)
}

/// The filter of a one-filter response: `url` with `sha256` ("nil" for none) and these environment variables.
fn filter(url: &str, sha256: &str, env: &[(&str, &str)]) -> Wasm {
    remote_wasm(url, sha256).with_timeout(10).with_env(env)
}

/// Converts a one-filter response; the converted bytes, or the rejection reason.
fn convert_raw(cache: &Cache, url: &str, sha256: &str, env: &[(&str, &str)]) -> Result<Vec<u8>, String> {
    cache.convert(&response(&[wasm_extension("ext", &filter(url, sha256, env))])).map_err(|r| r.reason)
}

/// Converts a one-filter response; the module the converted config names, or the rejection reason.
fn pull(cache: &Cache, url: &str, sha256: &str, env: &[(&str, &str)]) -> Result<Vec<u8>, String> {
    let out = convert_raw(cache, url, sha256, env)?;
    let path = wasms(&out)[0].local_filename().expect("converted to a local file");
    Ok(std::fs::read(path).expect("the local file exists"))
}

/// A docker `config.json` with one `auths` entry using the base64 `auth` form.
fn secret_auth(host: &str, user: &str, password: &str) -> String {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    serde_json::json!({"auths": {host: {"auth": auth}}}).to_string()
}

/// The same with the `username`/`password` form.
fn secret_fields(host: &str, user: &str, password: &str) -> String {
    serde_json::json!({"auths": {host: {"username": user, "password": password}}}).to_string()
}

/// A port on 127.0.0.1 where nothing listens.
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

// ---- formats --------------------------------------------------------------------------------------------

/// Builds an image of a module.
type Build = fn(&[u8]) -> Image;

#[test]
fn every_image_format_gives_its_module() {
    let registry = Registry::start(RegistryConfig::plain());
    let formats: Vec<(&str, Build)> = vec![
        ("docker-compat", images::docker_compat),
        ("docker-compat-dot-slash", |m| images::docker_compat_named(m, "./plugin.wasm")),
        ("docker-compat-in-a-dir", |m| images::docker_compat_named(m, "filters/plugin.wasm")),
        ("oci-compat", images::oci_compat),
        ("oci-artifact", images::oci_artifact),
        ("oci-artifact-wasm-last", |m| images::oci_artifact_ordered(m, true)),
        ("oras-python", images::oras_python),
        ("oras-cli", |m| images::oras_cli(m, images::WASM_LAYER)),
        ("oras-cli-application-wasm", |m| images::oras_cli(m, images::APPLICATION_WASM)),
        ("unknown-config-application-wasm", |m| {
            images::single_layer(m, images::UNKNOWN_CONFIG, images::APPLICATION_WASM, None)
        }),
    ];
    let dir = tempfile::tempdir().unwrap();
    let cache = open_plain(dir.path(), &[&registry]);
    for (i, (name, build)) in formats.iter().enumerate() {
        let module = wasm_module(200 + i);
        let image = build(&module);
        let repo = format!("formats/{name}");
        registry.pusher().push(&repo, "v1", &image);
        let url = registry.oci_url(&format!("{repo}:v1"));
        let got = pull(&cache, &url, "nil", &[]).unwrap_or_else(|r| panic!("{name}: {r}"));
        assert_eq!(got, module, "{name}");
        // The config's sha256 is the manifest digest.
        let again = pull(&cache, &url, &image.digest(), &[]).unwrap_or_else(|r| panic!("{name} by digest: {r}"));
        assert_eq!(again, module, "{name}");
    }
    assert_eq!(sample(&cache, SUCCESS), formats.len() as f64);
}

#[test]
fn unusable_images_are_rejected_saying_why() {
    let registry = Registry::start(RegistryConfig::plain());
    let module = wasm_module(64);
    // (repository, image, text the reason must hold)
    let cases: Vec<(&str, Image, &str)> = vec![
        ("unusable/no-wasm-layer", images::unusable::no_wasm_layer(&module), images::WASM_LAYER),
        ("unusable/three-layers", images::unusable::three_layers(&module), "3"),
        ("unusable/compat-without-plugin", images::unusable::compat_without_plugin(&module), "plugin.wasm"),
        ("unusable/single-other-layer", images::unusable::single_other_layer(&module), "application/octet-stream"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let cache = open_plain(dir.path(), &[&registry]);
    for (i, (repo, image, why)) in cases.iter().enumerate() {
        registry.pusher().push(repo, "v1", image);
        let url = registry.oci_url(&format!("{repo}:v1"));
        let reason = pull(&cache, &url, "nil", &[]).unwrap_err();
        assert!(reason.contains(&url) && reason.contains("\"ext\""), "{repo}: {reason}");
        assert!(reason.contains("could not fetch Wasm binary: "), "{repo}: {reason}");
        assert!(reason.contains(why), "{repo}: the reason should say why ({why}): {reason}");
        // As Istio counts them: the binary fetcher finds the format (or the missing plugin.wasm).
        assert_eq!(sample(&cache, DOWNLOAD_FAILURE), (i + 1) as f64, "{repo}: counted as a download failure");
        assert_eq!(sample(&cache, MANIFEST_FAILURE), 0.0, "{repo}");
    }
    // A layer that is not Wasm is an invalid module, as for HTTP.
    registry.pusher().push("unusable/not-wasm", "v1", &images::unusable::not_a_module());
    let url = registry.oci_url("unusable/not-wasm:v1");
    let reason = pull(&cache, &url, "nil", &[]).unwrap_err();
    assert!(reason.contains("invalid") && reason.contains(&url), "{reason}");
    assert_eq!(sample(&cache, FETCH_FAILURE), 1.0);
    assert_eq!(sample(&cache, SUCCESS), 0.0);
    assert_eq!(sample(&cache, "istio_agent_wasm_cache_entries"), 0.0);
}

#[test]
fn an_index_gives_the_wasm_platform_else_the_only_else_the_first_entry() {
    let registry = Registry::start(RegistryConfig::plain());
    let (a, b) = (wasm_module(301), wasm_module(302));
    let cases: Vec<(&str, Index, &[u8])> = vec![
        (
            "index/wasip1",
            Index::oci(vec![
                (images::oci_compat(&a), images::platform("linux", "amd64")),
                (images::oci_artifact(&b), images::platform("wasip1", "wasm")),
            ]),
            &b,
        ),
        (
            "index/wasi-wasm32",
            Index::oci(vec![
                (images::unusable::compat_without_plugin(&a), images::platform("linux", "amd64")),
                (images::oras_python(&b), images::platform("wasi", "wasm32")),
            ]),
            &b,
        ),
        (
            "index/docker-list-only-entry",
            Index::docker(vec![(images::docker_compat(&a), images::platform("linux", "arm64"))]),
            &a,
        ),
        (
            "index/first-entry",
            Index::oci(vec![
                (images::oci_compat(&a), images::platform("linux", "amd64")),
                (images::oci_compat(&b), images::platform("linux", "arm64")),
            ]),
            &a,
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let cache = open_plain(dir.path(), &[&registry]);
    for (repo, index, expected) in &cases {
        registry.pusher().push_index(repo, "v1", index);
        let got = pull(&cache, &registry.oci_url(&format!("{repo}:v1")), "nil", &[])
            .unwrap_or_else(|r| panic!("{repo}: {r}"));
        assert_eq!(&got, expected, "{repo}");
    }
}

// ---- references and checksums -------------------------------------------------------------------------

#[test]
fn tag_digest_and_no_tag() {
    let registry = Registry::start(RegistryConfig::plain());
    let (v1, latest) = (wasm_module(11), wasm_module(12));
    let image = images::oci_artifact(&v1);
    let digest = registry.pusher().push("refs/m", "v1", &image);
    registry.pusher().push("refs/m", "latest", &images::oci_artifact(&latest));
    let dir = tempfile::tempdir().unwrap();
    let cache = open_plain(dir.path(), &[&registry]);
    assert_eq!(pull(&cache, &registry.oci_url("refs/m:v1"), "nil", &[]).unwrap(), v1);
    assert_eq!(pull(&cache, &registry.oci_url(&format!("refs/m@sha256:{digest}")), "nil", &[]).unwrap(), v1);
    assert_eq!(pull(&cache, &registry.oci_url("refs/m"), "nil", &[]).unwrap(), latest, "no tag means latest");
    let asked_latest =
        registry.count("GET", "/v2/refs/m/manifests/latest") + registry.count("HEAD", "/v2/refs/m/manifests/latest");
    assert!(asked_latest > 0, "{:?}", registry.requests());
}

#[test]
fn the_config_sha256_is_the_manifest_digest() {
    let registry = Registry::start(RegistryConfig::plain());
    let module = wasm_module(21);
    let image = images::oras_python(&module);
    let digest = registry.pusher().push("sums/m", "v1", &image);
    let url = registry.oci_url("sums/m:v1");
    let dir = tempfile::tempdir().unwrap();
    let cache = open_plain(dir.path(), &[&registry]);

    let wrong = "ab".repeat(32);
    let reason = pull(&cache, &url, &wrong, &[]).unwrap_err();
    assert!(reason.contains(&url) && reason.contains(&wrong) && reason.contains(&digest), "{reason}");
    assert_eq!(sample(&cache, CHECKSUM_MISMATCHED), 1.0);
    assert_eq!(registry.all_blob_downloads(), 0, "a wrong manifest digest downloads no layer");
    // The layer's own digest is not the module's checksum either.
    let layer_digest = image.layers[0].digest();
    let layer_hex = layer_digest.trim_start_matches("sha256:");
    assert!(pull(&cache, &url, layer_hex, &[]).is_err());
    assert_eq!(sample(&cache, CHECKSUM_MISMATCHED), 2.0);

    assert_eq!(pull(&cache, &url, &digest.to_uppercase(), &[]).unwrap(), module);
    assert_eq!(sample(&cache, SUCCESS), 1.0);
    assert_eq!(registry.blob_downloads("sums/m", &layer_digest), 1);
}

#[test]
fn a_missing_tag_or_repository_is_a_manifest_failure() {
    let registry = Registry::start(RegistryConfig::plain());
    registry.pusher().push("missing/m", "v1", &images::oci_artifact(&wasm_module(5)));
    let dir = tempfile::tempdir().unwrap();
    let cache = open_plain(dir.path(), &[&registry]);
    let references =
        ["missing/m:nope".to_string(), "missing/nothing:v1".into(), format!("missing/m@sha256:{}", "cd".repeat(32))];
    for (i, reference) in references.iter().enumerate() {
        let url = registry.oci_url(reference);
        let reason = pull(&cache, &url, "nil", &[]).unwrap_err();
        assert!(reason.contains(&url), "{reason}");
        assert_eq!(sample(&cache, MANIFEST_FAILURE), (i + 1) as f64, "{reason}");
    }
    assert_eq!(registry.all_blob_downloads(), 0);
}

/// The distribution registry verifies digests on upload, so a lying registry is a `TestServer`.
#[test]
fn a_layer_whose_bytes_do_not_match_its_digest_is_rejected() {
    let server = TestServer::http();
    let module = wasm_module(4000);
    let image = images::oci_artifact(&module);
    images::serve(&server, "lying/m", "v1", &image);
    let layer = image.layers[0].digest();
    let mut forged = wasm_module(4000);
    forged[100] ^= 0xff;
    server.route(&format!("/v2/lying/m/blobs/{layer}"), Route::bytes(forged));
    let dir = tempfile::tempdir().unwrap();
    let host = format!("127.0.0.1:{}", server.port());
    let cache = open(dir.path(), serde_json::json!({ "plain_http_hosts": [host] }));
    let url = format!("oci://{host}/lying/m:v1");
    let reason = pull(&cache, &url, "nil", &[]).unwrap_err();
    assert!(reason.contains(&url), "{reason}");
    assert!(server.requests(&format!("/v2/lying/m/blobs/{layer}")) >= 1);
    assert_eq!(sample(&cache, DOWNLOAD_FAILURE), 1.0);
    assert_eq!(sample(&cache, SUCCESS), 0.0);
    assert_eq!(sample(&cache, "istio_agent_wasm_cache_entries"), 0.0);
}

// ---- pull policy (Istio's pkg/wasm/cache.go) ----------------------------------------------------------

/// A registry with `repo:tag` pushed (module `first`), a cache, and the means to move the tag.
struct PolicyCase {
    registry: Registry,
    repo: String,
    tag: String,
    _dir: tempfile::TempDir,
    cache: Cache,
}

impl PolicyCase {
    fn new(repo: &str, tag: &str, first: &[u8]) -> PolicyCase {
        let registry = Registry::start(RegistryConfig::plain());
        registry.pusher().push(repo, tag, &images::oci_artifact(first));
        let dir = tempfile::tempdir().unwrap();
        let cache = open_plain(dir.path(), &[&registry]);
        PolicyCase { registry, repo: repo.into(), tag: tag.into(), _dir: dir, cache }
    }

    fn move_tag(&self, module: &[u8]) {
        self.registry.pusher().push(&self.repo, &self.tag, &images::oci_artifact(module));
    }

    /// Pulls `url` with the policy (if any) and resource version; the module and whether the registry was
    /// asked for a manifest, and how many blobs it served.
    fn pull(&self, url: &str, policy: Option<&str>, rv: &str) -> (Vec<u8>, bool, usize) {
        let (manifests, blobs) = (self.registry.manifest_requests(&self.repo), self.registry.all_blob_downloads());
        let mut env = vec![(RESOURCE_VERSION, rv)];
        if let Some(p) = policy {
            env.push((PULL_POLICY, p));
        }
        let module = pull(&self.cache, url, "nil", &env).unwrap();
        let resolved = self.registry.manifest_requests(&self.repo) > manifests;
        (module, resolved, self.registry.all_blob_downloads() - blobs)
    }
}

#[test]
fn pull_policy_if_not_present_never_re_resolves() {
    let (a, b) = (wasm_module(31), wasm_module(32));
    let case = PolicyCase::new("policy/ifnotpresent", "v1", &a);
    let url = case.registry.oci_url("policy/ifnotpresent:v1");
    assert_eq!(case.pull(&url, Some("IfNotPresent"), "1"), (a.clone(), true, 1));
    case.move_tag(&b);
    assert_eq!(case.pull(&url, Some("IfNotPresent"), "2"), (a.clone(), false, 0));
    assert_eq!(case.pull(&url, Some("IfNotPresent"), "3"), (a, false, 0));
}

#[test]
fn pull_policy_always_re_resolves_when_the_resource_version_changes() {
    let (a, b) = (wasm_module(41), wasm_module(42));
    let case = PolicyCase::new("policy/always", "v1", &a);
    let url = case.registry.oci_url("policy/always:v1");
    assert_eq!(case.pull(&url, Some("Always"), "1"), (a.clone(), true, 1));
    // Same resource version: the stored answer.
    assert_eq!(case.pull(&url, Some("Always"), "1"), (a.clone(), false, 0));
    // New version, same manifest: re-resolved, no layer downloaded.
    assert_eq!(case.pull(&url, Some("Always"), "2"), (a.clone(), true, 0));
    // New version, the tag moved: the new module.
    case.move_tag(&b);
    assert_eq!(case.pull(&url, Some("Always"), "3"), (b, true, 1));
    assert_eq!(sample(&case.cache, SUCCESS), 2.0);
}

#[test]
fn pull_policy_unspecified_with_latest_behaves_as_always() {
    let (a, b) = (wasm_module(51), wasm_module(52));
    let case = PolicyCase::new("policy/latest", "latest", &a);
    let url = case.registry.oci_url("policy/latest:latest");
    assert_eq!(case.pull(&url, None, "1"), (a.clone(), true, 1));
    assert_eq!(case.pull(&url, None, "1"), (a.clone(), false, 0));
    case.move_tag(&b);
    assert_eq!(case.pull(&url, None, "2"), (b, true, 1));
}

#[test]
fn pull_policy_unspecified_with_another_tag_behaves_as_if_not_present() {
    let (a, b) = (wasm_module(61), wasm_module(62));
    let case = PolicyCase::new("policy/tagged", "v2", &a);
    let url = case.registry.oci_url("policy/tagged:v2");
    assert_eq!(case.pull(&url, None, "1"), (a.clone(), true, 1));
    case.move_tag(&b);
    assert_eq!(case.pull(&url, None, "2"), (a, false, 0));
}

/// No tag means `latest` (the issue's table; go-containerregistry's `name.ParseReference` reads it so), so an
/// unspecified policy behaves as `Always` for it too: Istio's literal check looks only for a `:latest` suffix.
#[test]
fn pull_policy_unspecified_without_a_tag_behaves_as_latest() {
    let (a, b) = (wasm_module(71), wasm_module(72));
    let case = PolicyCase::new("policy/notag", "latest", &a);
    let url = case.registry.oci_url("policy/notag");
    assert_eq!(case.pull(&url, None, "1"), (a.clone(), true, 1));
    assert_eq!(case.pull(&url, None, "1"), (a.clone(), false, 0));
    case.move_tag(&b);
    assert_eq!(case.pull(&url, None, "2"), (b.clone(), true, 1));
    // IfNotPresent keeps what it has.
    case.move_tag(&a);
    assert_eq!(case.pull(&url, Some("IfNotPresent"), "3"), (b, false, 0));
}

#[test]
fn a_digest_reference_is_never_pulled_again() {
    let a = wasm_module(81);
    let case = PolicyCase::new("policy/digest", "v1", &a);
    let digest = images::oci_artifact(&a).digest();
    let url = case.registry.oci_url(&format!("policy/digest@sha256:{digest}"));
    assert_eq!(case.pull(&url, Some("Always"), "1"), (a.clone(), true, 1));
    let before = case.registry.requests().len();
    for (policy, rv) in [(Some("Always"), "2"), (None, "3"), (Some("IfNotPresent"), "4")] {
        assert_eq!(case.pull(&url, policy, rv), (a.clone(), false, 0));
    }
    assert_eq!(case.registry.requests().len(), before, "no request at all");
}

// ---- auth -----------------------------------------------------------------------------------------------

#[test]
fn basic_auth_with_either_secret_form() {
    let registry = Registry::start(RegistryConfig::plain().htpasswd(&[("alice", "basic-pw-1")]));
    let module = wasm_module(91);
    registry.pusher().push("auth/basic", "v1", &images::oci_artifact(&module));
    let url = registry.oci_url("auth/basic:v1");
    let host = registry.host();
    for (i, secret) in
        [secret_auth(&host, "alice", "basic-pw-1"), secret_fields(&host, "alice", "basic-pw-1")].iter().enumerate()
    {
        let dir = tempfile::tempdir().unwrap();
        let cache = open_plain(dir.path(), &[&registry]);
        assert_eq!(pull(&cache, &url, "nil", &[(PULL_SECRET, secret)]).unwrap(), module, "form {i}");
        let blob = registry.requests().into_iter().rfind(|r| r.path.contains("/blobs/")).unwrap();
        assert_eq!(blob.auth_scheme.as_deref(), Some("Basic"));
    }
}

#[test]
fn basic_auth_refuses_a_wrong_password_no_secret_and_a_secret_for_another_registry() {
    let registry = Registry::start(RegistryConfig::plain().htpasswd(&[("alice", "right-pw")]));
    registry.pusher().push("auth/refused", "v1", &images::oci_artifact(&wasm_module(92)));
    let url = registry.oci_url("auth/refused:v1");
    let dir = tempfile::tempdir().unwrap();
    let cache = open_plain(dir.path(), &[&registry]);
    let cases = [
        Some(secret_auth(&registry.host(), "alice", "wrong-pw-xyz")),
        None,
        Some(secret_auth("registry.example.com:5000", "alice", "right-pw")),
    ];
    for (i, secret) in cases.iter().enumerate() {
        let env: Vec<(&str, &str)> = secret.iter().map(|s| (PULL_SECRET, s.as_str())).collect();
        let reason = pull(&cache, &url, "nil", &env).unwrap_err();
        assert!(reason.contains(&url), "case {i}: {reason}");
        assert!(!reason.contains("wrong-pw-xyz") && !reason.contains("right-pw"), "case {i}: {reason}");
        assert_eq!(sample(&cache, MANIFEST_FAILURE), (i + 1) as f64, "case {i}: {reason}");
    }
    assert_eq!(registry.all_blob_downloads(), 0);
}

#[test]
fn bearer_tokens_with_a_secret() {
    let registry = Registry::start(RegistryConfig::plain().token(&[("bob", "bearer-pw-2")], false));
    let module = wasm_module(93);
    registry.pusher().push("auth/bearer", "v1", &images::oci_artifact(&module));
    let tokens = registry.token_server().unwrap();
    let before = tokens.request_count();
    let url = registry.oci_url("auth/bearer:v1");
    let dir = tempfile::tempdir().unwrap();
    let cache = open_plain(dir.path(), &[&registry]);
    let secret = secret_fields(&registry.host(), "bob", "bearer-pw-2");
    assert_eq!(pull(&cache, &url, "nil", &[(PULL_SECRET, &secret)]).unwrap(), module);
    let asked = &tokens.requests()[before..];
    assert_eq!(asked.len(), 1, "one token, reused for the layer: {asked:?}");
    assert_eq!(asked[0].user.as_deref(), Some("bob"));
    assert_eq!(asked[0].scopes, ["repository:auth/bearer:pull"]);
    let blob = registry.requests().into_iter().rfind(|r| r.path.contains("/blobs/")).unwrap();
    assert_eq!(blob.auth_scheme.as_deref(), Some("Bearer"));

    // Without the secret (or with a wrong one) the token server refuses, and so the pull.
    let dir = tempfile::tempdir().unwrap();
    let cache = open_plain(dir.path(), &[&registry]);
    assert!(pull(&cache, &url, "nil", &[]).is_err());
    let wrong = secret_fields(&registry.host(), "bob", "nope");
    assert!(pull(&cache, &url, "nil", &[(PULL_SECRET, &wrong)]).is_err());
    assert_eq!(sample(&cache, MANIFEST_FAILURE), 2.0);
}

#[test]
fn bearer_tokens_without_a_secret_are_anonymous() {
    let registry = Registry::start(RegistryConfig::plain().token(&[("bob", "pw")], true));
    let module = wasm_module(94);
    registry.pusher().push("auth/anonymous", "v1", &images::oras_python(&module));
    let tokens = registry.token_server().unwrap();
    let before = tokens.request_count();
    let dir = tempfile::tempdir().unwrap();
    let cache = open_plain(dir.path(), &[&registry]);
    // No secret, and a secret for another registry: both anonymous.
    let other = secret_auth("ghcr.io", "bob", "pw");
    for env in [vec![], vec![(PULL_SECRET, other.as_str())]] {
        let url = registry.oci_url("auth/anonymous:v1");
        assert_eq!(pull(&cache, &url, "nil", &env).unwrap(), module);
    }
    let asked = &tokens.requests()[before..];
    assert!(!asked.is_empty());
    assert!(asked.iter().all(|r| r.user.is_none() && r.status == 200), "{asked:?}");
}

/// A registry whose challenge names an unsafe token realm: the realm is refused before any request goes there.
#[test]
fn unsafe_bearer_realms_are_never_contacted() {
    // Something listening on 127.0.0.2 that counts connections: the realm blocked by `blocked_cidrs`.
    let trap = TcpListener::bind("127.0.0.2:0").expect("bind 127.0.0.2");
    trap.set_nonblocking(true).unwrap();
    let trap_port = trap.local_addr().unwrap().port();
    let server = TestServer::http();
    let host = format!("127.0.0.1:{}", server.port());
    let realms = [
        "file:///etc/passwd".to_string(),
        "http:///token".to_string(),
        "http://169.254.169.254/latest/meta-data".to_string(),
        format!("http://127.0.0.2:{trap_port}/token"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), serde_json::json!({ "plain_http_hosts": [host], "blocked_cidrs": ["127.0.0.2/32"] }));
    let secret = secret_auth(&host, "eve", "realm-pw-3");
    for (i, realm) in realms.iter().enumerate() {
        let repo = format!("realm/r{i}");
        let challenge = format!("Bearer realm=\"{realm}\",service=\"svc\",scope=\"repository:{repo}:pull\"");
        for path in ["/v2/".to_string(), format!("/v2/{repo}/manifests/v1")] {
            server.route(&path, Route::status(401).header("WWW-Authenticate", &challenge));
        }
        let url = format!("oci://{host}/{repo}:v1");
        let reason = pull(&cache, &url, "nil", &[(PULL_SECRET, &secret)]).unwrap_err();
        assert!(reason.contains(&url), "{realm}: {reason}");
        assert!(!reason.contains("realm-pw-3"), "{reason}");
        assert_eq!(sample(&cache, MANIFEST_FAILURE), (i + 1) as f64, "{realm}: {reason}");
    }
    assert!(trap.accept().is_err(), "the blocked realm was contacted");
}

/// The pull secret reaches none of: the converted config, rejection reasons, metrics, files in the cache
/// directory, log lines.
#[test]
fn the_secret_is_absent_from_every_output() {
    let capturing = wasm_ecds_testkit::logs::capture();
    let password = "Sup3r-S3cret-Pw-8d1f";
    let registry = Registry::start(RegistryConfig::plain().token(&[("carol", password)], false));
    let module = wasm_module(95);
    registry.pusher().push("auth/secret", "v1", &images::oci_artifact(&module));
    let dir = tempfile::tempdir().unwrap();
    let cache = open_plain(dir.path(), &[&registry]);
    let host = registry.host();
    let good = secret_auth(&host, "carol", password);
    let wrong_password = "Wr0ng-S3cret-Pw-55aa";
    let bad = secret_fields(&host, "carol", wrong_password);
    let encoded = |p: &str| base64::engine::general_purpose::STANDARD.encode(format!("carol:{p}"));
    let needles = [password.to_string(), wrong_password.to_string(), encoded(password), encoded(wrong_password)];
    let check = |what: &str, text: &[u8]| {
        let text = String::from_utf8_lossy(text);
        for needle in &needles {
            assert!(!text.contains(needle.as_str()), "{what} holds a secret");
        }
    };

    let url = registry.oci_url("auth/secret:v1");
    let out = convert_raw(&cache, &url, "nil", &[(PULL_SECRET, &good)]).unwrap();
    check("the converted response", &out);
    assert!(!String::from_utf8_lossy(&out).contains(PULL_SECRET), "the secret variable is stripped");
    let reason = convert_raw(&cache, &registry.oci_url("auth/secret:v2"), "nil", &[(PULL_SECRET, &good)]).unwrap_err();
    check("a reason", reason.as_bytes());
    let reason = convert_raw(&cache, &registry.oci_url("auth/other:v1"), "nil", &[(PULL_SECRET, &bad)]).unwrap_err();
    check("a reason", reason.as_bytes());
    check("the metrics", cache.metrics_text().as_bytes());
    drop(cache);
    for entry in walk(dir.path()) {
        check(&format!("{entry:?}"), &std::fs::read(&entry).unwrap());
        check("a file name", entry.to_string_lossy().as_bytes());
    }
    assert!(capturing, "the test binary installs no other logger");
    let lines = wasm_ecds_testkit::logs::lines();
    assert!(lines.iter().any(|l| l.contains("auth/secret")), "the library's log lines of this pull are captured");
    for line in lines {
        check("a log line", line.as_bytes());
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

// ---- transport ------------------------------------------------------------------------------------------

#[test]
fn tls_registry_with_ca_file() {
    let registry = Registry::start(RegistryConfig::plain().tls());
    let module = wasm_module(101);
    registry.pusher().push("tls/m", "v1", &images::oci_artifact(&module));
    let url = registry.oci_url("tls/m:v1");
    let dir = tempfile::tempdir().unwrap();
    let trusting = open(dir.path(), serde_json::json!({ "ca_file": registry.ca_file() }));
    assert_eq!(pull(&trusting, &url, "nil", &[]).unwrap(), module);

    let dir = tempfile::tempdir().unwrap();
    let distrusting = open(dir.path(), serde_json::json!({}));
    let reason = pull(&distrusting, &url, "nil", &[]).unwrap_err();
    assert!(reason.contains(&url), "{reason}");
    assert_eq!(sample(&distrusting, MANIFEST_FAILURE), 1.0);
}

#[test]
fn plain_http_hosts_skip_tls() {
    let registry = Registry::start(RegistryConfig::plain());
    let module = wasm_module(102);
    registry.pusher().push("plain/m", "v1", &images::oci_artifact(&module));
    let url = registry.oci_url("plain/m:v1");
    for hosts in [serde_json::json!([registry.host()]), serde_json::json!(["*"])] {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path(), serde_json::json!({ "plain_http_hosts": hosts }));
        assert_eq!(pull(&cache, &url, "nil", &[]).unwrap(), module);
    }
    assert!(registry.requests().iter().all(|r| r.method != "TLS"), "no TLS attempt");
    // Not listed: HTTPS first; the registry answers in plain HTTP, so (as Istio) the pull is retried once
    // over plain HTTP.
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), serde_json::json!({}));
    assert_eq!(pull(&cache, &url, "nil", &[]).unwrap(), module);
    assert!(registry.requests().iter().any(|r| r.method == "TLS"), "HTTPS was tried first");
}

// ---- mirrors --------------------------------------------------------------------------------------------

fn mirrors(origin: &str, endpoints: &[String]) -> serde_json::Value {
    let mut map = BTreeMap::new();
    map.insert(origin.to_string(), endpoints.to_vec());
    serde_json::json!(map)
}

#[test]
fn a_mirror_that_is_down_is_skipped_for_the_next() {
    let origin = Registry::start(RegistryConfig::plain());
    let copy = Registry::start(RegistryConfig::plain());
    let module = wasm_module(111);
    let image = images::oci_artifact(&module);
    origin.pusher().push("mirror/m", "v1", &image);
    copy.pusher().push("mirror/m", "v1", &image);
    let dir = tempfile::tempdir().unwrap();
    let endpoints = [format!("http://127.0.0.1:{}", closed_port()), copy.base_url()];
    let cache = open(
        dir.path(),
        serde_json::json!({ "plain_http_hosts": [origin.host()], "registry_mirrors": mirrors(&origin.host(), &endpoints) }),
    );
    assert_eq!(pull(&cache, &origin.oci_url("mirror/m:v1"), "nil", &[]).unwrap(), module);
    assert!(copy.manifest_requests("mirror/m") >= 1);
    assert_eq!(copy.blob_downloads("mirror/m", &image.layers[0].digest()), 1);
    assert!(origin.requests().is_empty(), "the origin was not needed: {:?}", origin.requests());
}

/// A pull secret entry for the mirror's host is what the mirror gets.
#[test]
fn a_mirror_uses_the_secret_for_its_own_host() {
    let origin = Registry::start(RegistryConfig::plain());
    let copy = Registry::start(RegistryConfig::plain().htpasswd(&[("mia", "mirror-pw-4")]));
    let module = wasm_module(116);
    let image = images::oci_artifact(&module);
    origin.pusher().push("mirror/secret", "v1", &image);
    copy.pusher().push("mirror/secret", "v1", &image);
    let dir = tempfile::tempdir().unwrap();
    let cache = open(
        dir.path(),
        serde_json::json!({ "plain_http_hosts": [origin.host()], "registry_mirrors": mirrors(&origin.host(), &[copy.base_url()]) }),
    );
    let secret = secret_fields(&copy.host(), "mia", "mirror-pw-4");
    assert_eq!(pull(&cache, &origin.oci_url("mirror/secret:v1"), "nil", &[(PULL_SECRET, &secret)]).unwrap(), module);
    let blob = copy.requests().into_iter().rfind(|r| r.path.contains("/blobs/")).expect("the mirror served the layer");
    assert_eq!(blob.auth_scheme.as_deref(), Some("Basic"));
    assert!(origin.requests().is_empty(), "the origin was not needed: {:?}", origin.requests());
}

#[test]
fn with_every_mirror_down_the_origin_serves() {
    let origin = Registry::start(RegistryConfig::plain());
    let module = wasm_module(112);
    let image = images::oras_python(&module);
    origin.pusher().push("mirror/down", "v1", &image);
    // One mirror refuses connections, one answers 404 and one 503 for everything.
    let (missing, failing) = (TestServer::http(), TestServer::http());
    failing.route("/v2/", Route::status(503));
    failing.route("/v2/mirror/down/manifests/v1", Route::status(503));
    let endpoints = [format!("http://127.0.0.1:{}", closed_port()), missing.base_url(), failing.base_url()];
    let dir = tempfile::tempdir().unwrap();
    let cache = open(
        dir.path(),
        serde_json::json!({ "plain_http_hosts": [origin.host()], "registry_mirrors": mirrors(&origin.host(), &endpoints) }),
    );
    assert_eq!(pull(&cache, &origin.oci_url("mirror/down:v1"), "nil", &[]).unwrap(), module);
    assert!(missing.total_requests() >= 1 && failing.total_requests() >= 1, "each mirror was tried");
    assert_eq!(origin.blob_downloads("mirror/down", &image.layers[0].digest()), 1);
}

#[test]
fn a_pull_through_registry_as_the_mirror() {
    let origin = Registry::start(RegistryConfig::plain());
    let module = wasm_module(113);
    let image = images::oci_artifact(&module);
    let digest = origin.pusher().push("mirror/proxied", "v1", &image);
    let mirror = Registry::start(RegistryConfig::plain().proxy(&origin.base_url()));
    let dir = tempfile::tempdir().unwrap();
    let cache = open(
        dir.path(),
        serde_json::json!({ "plain_http_hosts": [origin.host()], "registry_mirrors": mirrors(&origin.host(), &[mirror.base_url()]) }),
    );
    let url = origin.oci_url(&format!("mirror/proxied@sha256:{digest}"));
    assert_eq!(pull(&cache, &url, "nil", &[]).unwrap(), module);
    assert_eq!(mirror.blob_downloads("mirror/proxied", &image.layers[0].digest()), 1, "{:?}", mirror.requests());
    assert!(mirror.manifest_requests("mirror/proxied") >= 1);
}

/// A mirror cannot change content named by digest: its different manifest is rejected.
#[test]
fn a_mirror_serving_another_manifest_for_a_digest_is_rejected() {
    let good = wasm_module(114);
    let image = images::oci_artifact(&good);
    let digest = image.digest();
    let evil = TestServer::http();
    let other = images::oci_artifact(&wasm_module(115));
    images::serve(&evil, "mirror/pinned", &format!("sha256:{digest}"), &other);

    // The origin is down: the mirror's answer is all there is, and it is refused.
    let down = format!("127.0.0.1:{}", closed_port());
    let dir = tempfile::tempdir().unwrap();
    let cache = open(
        dir.path(),
        serde_json::json!({ "plain_http_hosts": [down], "registry_mirrors": mirrors(&down, &[evil.base_url()]) }),
    );
    let url = format!("oci://{down}/mirror/pinned@sha256:{digest}");
    let reason = pull(&cache, &url, "nil", &[]).unwrap_err();
    assert!(reason.contains(&url) && reason.contains(&other.digest()), "names the mismatch: {reason}");
    assert_eq!(sample(&cache, SUCCESS), 0.0);
    assert_eq!(evil.requests(&format!("/v2/mirror/pinned/blobs/{}", other.layers[0].digest())), 0);

    // The origin is up: its module is used.
    let origin = Registry::start(RegistryConfig::plain());
    origin.pusher().push("mirror/pinned", "v1", &image);
    let dir = tempfile::tempdir().unwrap();
    let cache = open(
        dir.path(),
        serde_json::json!({ "plain_http_hosts": [origin.host()], "registry_mirrors": mirrors(&origin.host(), &[evil.base_url()]) }),
    );
    let url = origin.oci_url(&format!("mirror/pinned@sha256:{digest}"));
    assert_eq!(pull(&cache, &url, "nil", &[]).unwrap(), good);
    assert!(evil.total_requests() >= 1, "the mirror was asked first");
}

// ---- concurrency and restarts ---------------------------------------------------------------------------

#[test]
fn sixteen_threads_pulling_one_image_download_one_layer() {
    let registry = Registry::start(RegistryConfig::plain());
    let module = wasm_module(256 * 1024);
    let image = images::oci_artifact(&module);
    registry.pusher().push("threads/m", "v1", &image);
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(open_plain(dir.path(), &[&registry]));
    let url = registry.oci_url("threads/m:v1");
    let barrier = Arc::new(Barrier::new(16));
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let (cache, barrier, url) = (cache.clone(), barrier.clone(), url.clone());
            std::thread::spawn(move || {
                barrier.wait();
                pull(&cache, &url, "nil", &[])
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap().unwrap(), module);
    }
    assert_eq!(registry.blob_downloads("threads/m", &image.layers[0].digest()), 1);
    assert_eq!(sample(&cache, SUCCESS), 1.0);
}

#[test]
fn a_restart_pulls_nothing_again() {
    let registry = Registry::start(RegistryConfig::plain());
    let (a, b) = (wasm_module(121), wasm_module(122));
    let digest_b = registry.pusher().push("restart/b", "v1", &images::oras_python(&b));
    registry.pusher().push("restart/a", "v1", &images::oci_artifact(&a));
    let by_tag = registry.oci_url("restart/a:v1");
    let by_digest = registry.oci_url(&format!("restart/b@sha256:{digest_b}"));
    let dir = tempfile::tempdir().unwrap();
    {
        let cache = open_plain(dir.path(), &[&registry]);
        assert_eq!(pull(&cache, &by_tag, "nil", &[(RESOURCE_VERSION, "1")]).unwrap(), a);
        assert_eq!(pull(&cache, &by_digest, "nil", &[]).unwrap(), b);
    }
    let before = registry.requests().len();
    let cache = open_plain(dir.path(), &[&registry]);
    assert_eq!(pull(&cache, &by_tag, "nil", &[(RESOURCE_VERSION, "1")]).unwrap(), a);
    assert_eq!(pull(&cache, &by_digest, "nil", &[]).unwrap(), b);
    assert_eq!(pull(&cache, &by_tag, &images::oci_artifact(&a).digest(), &[]).unwrap(), a);
    assert_eq!(registry.requests().len(), before, "{:?}", &registry.requests()[before..]);
    assert_eq!(sample(&cache, SUCCESS), 0.0);
}
