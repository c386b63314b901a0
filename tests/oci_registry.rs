//! The test kit's registry harness on its own, without the library: each mode of the real distribution
//! registry (plain, TLS, htpasswd, token, proxy) takes a pushed image and gives it back, so a failure of the
//! OCI tests points at the fetcher, not at the harness.

use base64::Engine;
use wasm_ecds_testkit::images::{self, agent, Answer, Image, OCI_MANIFEST};
use wasm_ecds_testkit::registry::{Registry, RegistryConfig, TOKEN_SERVICE};
use wasm_ecds_testkit::server::{sha256_hex, wasm_module, TestServer};

/// GET `url` with optional `Authorization`; status, `WWW-Authenticate`, body.
fn get(agent: &ureq::Agent, url: &str, authorization: Option<&str>) -> (u16, String, Vec<u8>) {
    let mut req = agent.get(url).header("Accept", OCI_MANIFEST);
    if let Some(a) = authorization {
        req = req.header("Authorization", a);
    }
    let mut resp = req.call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let challenge = resp.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    (resp.status().as_u16(), challenge, resp.body_mut().read_to_vec().unwrap())
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

/// The manifest and the wasm layer of `image` come back from `base` byte for byte.
fn assert_pulls(agent: &ureq::Agent, base: &str, repo: &str, tag: &str, image: &Image, auth: Option<&str>) {
    let (status, _, manifest) = get(agent, &format!("{base}/v2/{repo}/manifests/{tag}"), auth);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&manifest));
    assert_eq!(manifest, image.manifest());
    let layer = &image.layers[0];
    let (status, _, bytes) = get(agent, &format!("{base}/v2/{repo}/blobs/{}", layer.digest()), auth);
    assert_eq!(status, 200);
    assert_eq!(bytes, layer.bytes);
}

#[test]
fn plain_registry_round_trip_is_counted() {
    let registry = Registry::start(RegistryConfig::plain());
    let image = images::oci_artifact(&wasm_module(300));
    let digest = registry.pusher().push("kit/plain", "v1", &image);
    assert_eq!(digest, image.digest());
    assert!(registry.requests().is_empty(), "pushes bypass the counting forwarder");

    let agent = agent(None);
    assert_pulls(&agent, &registry.base_url(), "kit/plain", "v1", &image, None);
    assert_pulls(&agent, &registry.base_url(), "kit/plain", &format!("sha256:{digest}"), &image, None);
    assert_eq!(registry.manifest_requests("kit/plain"), 2);
    assert_eq!(registry.blob_downloads("kit/plain", &image.layers[0].digest()), 2);
    assert_eq!(registry.all_blob_downloads(), 2);
    let (status, _, _) = get(&agent, &format!("{}/v2/kit/plain/manifests/missing", registry.base_url()), None);
    assert_eq!(status, 404);
    assert!(registry
        .oci_url("kit/plain:v1")
        .starts_with(&format!("oci://127.0.0.1:{}/", registry.host().split(':').nth(1).unwrap())));
}

#[test]
fn every_image_format_is_accepted_by_the_registry() {
    let registry = Registry::start(RegistryConfig::plain());
    let module = wasm_module(100);
    let pusher = registry.pusher();
    let all = [
        images::docker_compat(&module),
        images::docker_compat_named(&module, "./plugin.wasm"),
        images::oci_compat(&module),
        images::oci_artifact(&module),
        images::oci_artifact_ordered(&module, true),
        images::oras_python(&module),
        images::oras_cli(&module, images::WASM_LAYER),
        images::oras_cli(&module, images::APPLICATION_WASM),
        images::unusable::no_wasm_layer(&module),
        images::unusable::three_layers(&module),
        images::unusable::compat_without_plugin(&module),
        images::unusable::not_a_module(),
        images::unusable::single_other_layer(&module),
    ];
    for (i, image) in all.iter().enumerate() {
        let repo = format!("kit/format{i}");
        pusher.push(&repo, "t", image);
        let back = pusher.get(&format!("/v2/{repo}/manifests/t"), &image.media_type);
        assert_eq!(back.status, 200);
        assert_eq!(back.body, image.manifest(), "format {i}");
    }
    let index = images::Index::oci(vec![
        (images::oci_compat(&module), images::platform("linux", "amd64")),
        (images::oci_artifact(&module), images::platform("wasip1", "wasm")),
    ]);
    let digest = pusher.push_index("kit/index", "multi", &index);
    let back: Answer = pusher.get("/v2/kit/index/manifests/multi", images::OCI_INDEX);
    assert_eq!(back.body, index.manifest());
    assert_eq!(digest, sha256_hex(&back.body));
    let docker = images::Index::docker(vec![(images::docker_compat(&module), images::platform("linux", "amd64"))]);
    pusher.push_index("kit/list", "multi", &docker);
}

#[test]
fn tls_registry_trusts_only_its_ca() {
    let registry = Registry::start(RegistryConfig::plain().tls());
    assert!(registry.base_url().starts_with("https://127.0.0.1:"));
    let image = images::oras_python(&wasm_module(50));
    registry.pusher().push("kit/tls", "v1", &image);
    let ca = std::fs::read_to_string(registry.ca_file()).unwrap();
    assert_eq!(Some(ca.as_str()), registry.ca_pem());
    assert_pulls(&agent(Some(&ca)), &registry.base_url(), "kit/tls", "v1", &image, None);
    // Without the CA the handshake fails.
    let other = TestServer::https();
    let wrong = agent(other.ca_pem());
    assert!(wrong.get(format!("{}/v2/", registry.base_url())).call().is_err());
}

#[test]
fn htpasswd_registry_wants_the_right_basic_credentials() {
    let registry = Registry::start(RegistryConfig::plain().htpasswd(&[("alice", "s3cret-pw")]));
    let image = images::oci_compat(&wasm_module(20));
    registry.pusher().push("kit/basic", "v1", &image);
    let agent = agent(None);
    let (status, challenge, _) = get(&agent, &format!("{}/v2/", registry.base_url()), None);
    assert_eq!(status, 401);
    assert!(challenge.starts_with("Basic realm="), "{challenge}");
    let (status, _, _) = get(&agent, &format!("{}/v2/", registry.base_url()), Some(&basic("alice", "wrong")));
    assert_eq!(status, 401);
    assert_pulls(&agent, &registry.base_url(), "kit/basic", "v1", &image, Some(&basic("alice", "s3cret-pw")));
    assert_eq!(registry.requests()[0].auth_scheme, None);
    assert_eq!(registry.requests().last().unwrap().auth_scheme.as_deref(), Some("Basic"));
}

#[test]
fn token_registry_takes_tokens_of_the_token_server() {
    let registry = Registry::start(RegistryConfig::plain().token(&[("bob", "t0ken-pw")], false));
    let image = images::oras_cli(&wasm_module(20), images::WASM_LAYER);
    registry.pusher().push("kit/token", "v1", &image);
    let tokens = registry.token_server().unwrap();
    let pushed = tokens.request_count();
    assert!(pushed >= 1);
    let agent = agent(None);

    let url = format!("{}/v2/kit/token/manifests/v1", registry.base_url());
    let (status, challenge, _) = get(&agent, &url, None);
    assert_eq!(status, 401);
    let expected =
        format!("Bearer realm=\"{}\",service=\"{TOKEN_SERVICE}\",scope=\"repository:kit/token:pull\"", tokens.realm());
    assert_eq!(challenge, expected);

    let token_url = format!("{}?service={TOKEN_SERVICE}&scope=repository%3Akit%2Ftoken%3Apull", tokens.realm());
    let (status, _, _) = get(&agent, &token_url, None);
    assert_eq!(status, 401, "no anonymous tokens");
    let (status, _, _) = get(&agent, &token_url, Some(&basic("bob", "wrong")));
    assert_eq!(status, 401);
    let (status, _, body) = get(&agent, &token_url, Some(&basic("bob", "t0ken-pw")));
    assert_eq!(status, 200);
    let token: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let bearer = format!("Bearer {}", token["token"].as_str().unwrap());
    assert_pulls(&agent, &registry.base_url(), "kit/token", "v1", &image, Some(&bearer));
    let log = tokens.requests();
    assert_eq!(log.len(), pushed + 3);
    assert_eq!(log.last().unwrap().user.as_deref(), Some("bob"));
    assert_eq!(log.last().unwrap().scopes, ["repository:kit/token:pull"]);

    // A token for another repository does not open this one.
    let other = format!("Bearer {}", tokens.token("bob", TOKEN_SERVICE, &[("kit/other", &["pull"])]));
    assert_eq!(get(&agent, &url, Some(&other)).0, 401);
    // Nor does one for another service (audience).
    let elsewhere = format!("Bearer {}", tokens.token("bob", "elsewhere", &[("kit/token", &["pull"])]));
    assert_eq!(get(&agent, &url, Some(&elsewhere)).0, 401);
}

#[test]
fn token_registry_with_anonymous_pulls() {
    let registry = Registry::start(RegistryConfig::plain().token(&[("bob", "pw")], true));
    let image = images::oras_python(&wasm_module(20));
    registry.pusher().push("kit/anon", "v1", &image);
    let tokens = registry.token_server().unwrap();
    let agent = agent(None);
    let token_url = format!("{}?service={TOKEN_SERVICE}&scope=repository:kit/anon:pull,push", tokens.realm());
    let (status, _, body) = get(&agent, &token_url, None);
    assert_eq!(status, 200);
    let token: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let bearer = format!("Bearer {}", token["token"].as_str().unwrap());
    assert_pulls(&agent, &registry.base_url(), "kit/anon", "v1", &image, Some(&bearer));
    // The anonymous token does not allow pushing.
    let upload = format!("{}/v2/kit/anon/blobs/uploads/", registry.base_url());
    let refused = agent.post(&upload).header("Authorization", &bearer).send_empty().unwrap();
    assert_eq!(refused.status(), 401);
}

#[test]
fn proxy_registry_pulls_through_once() {
    let origin = Registry::start(RegistryConfig::plain());
    let image = images::oci_artifact(&wasm_module(500));
    let digest = origin.pusher().push("kit/mirrored", "v1", &image);
    let mirror = Registry::start(RegistryConfig::plain().proxy(&origin.base_url()));
    let agent = agent(None);
    let layer = image.layers[0].digest();
    let reference = format!("sha256:{digest}");
    assert_pulls(&agent, &mirror.base_url(), "kit/mirrored", &reference, &image, None);
    assert!(origin.blob_downloads("kit/mirrored", &layer) >= 1);
    // distribution 2.8 (`registry/proxy/proxyblobstore.go`) streams the first pull from the origin and stores
    // the blob in the background (fetching it once more); once stored, pulls no longer reach the origin.
    let mut served_locally = false;
    for _ in 0..200 {
        let before = origin.blob_downloads("kit/mirrored", &layer);
        assert_pulls(&agent, &mirror.base_url(), "kit/mirrored", &reference, &image, None);
        if origin.blob_downloads("kit/mirrored", &layer) == before {
            served_locally = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(served_locally, "the mirror kept serving from the origin");
    assert!(origin.blob_downloads("kit/mirrored", &layer) <= 3);
}

#[test]
fn served_images_look_like_a_registry() {
    let server = TestServer::http();
    let image = images::oci_artifact(&wasm_module(40));
    images::serve(&server, "kit/served", "v1", &image);
    let agent = agent(None);
    assert_pulls(&agent, &server.base_url(), "kit/served", "v1", &image, None);
    assert_pulls(&agent, &server.base_url(), "kit/served", &format!("sha256:{}", image.digest()), &image, None);
}

#[test]
fn a_tls_handshake_on_a_plain_registry_is_recorded_and_answered_in_http() {
    let registry = Registry::start(RegistryConfig::plain());
    let tls = TestServer::https();
    let https_url = format!("https://{}/v2/", registry.host());
    let err = agent(tls.ca_pem()).get(&https_url).call().unwrap_err();
    assert!(!err.to_string().is_empty());
    assert_eq!(registry.requests()[0].method, "TLS");
    // Plain HTTP still works on the same port.
    let (status, _, _) = get(&agent(None), &format!("{}/v2/", registry.base_url()), None);
    assert_eq!(status, 200);
}
