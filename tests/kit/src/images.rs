//! OCI and Docker images of Wasm modules, built in memory and pushed through the registry API v2.
//!
//! Builders for every format the OCI fetcher knows (the names of Istio's `pkg/wasm/imagefetcher.go`): Docker
//! compat ([`docker_compat`]), OCI compat ([`oci_compat`]), the two-layer OCI artifact ([`oci_artifact`]),
//! single-layer artifacts as the ORAS Python SDK ([`oras_python`]) and the `oras` CLI 1.1+ ([`oras_cli`]) write
//! them, indexes ([`Index`]), and images no fetcher can use ([`unusable`]).
//!
//! [`Pusher`] uploads blobs (`POST /v2/<repo>/blobs/uploads/` then `PUT <location>&digest=…`) and manifests
//! (`PUT /v2/<repo>/manifests/<ref>` with the manifest's media type), answering Basic and Bearer challenges
//! with its credentials. [`serve`] puts an image on a [`TestServer`] instead, for hostile registries.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::json;

use crate::server::{gzip, sha256_hex, tar, Route, TestServer};

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
/// The config of the Wasm OCI artifact (solo.io's spec, which Istio follows).
pub const WASM_CONFIG: &str = "application/vnd.module.wasm.config.v1+json";
pub const WASM_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
pub const APPLICATION_WASM: &str = "application/wasm";
/// What the ORAS Python SDK writes as the config media type.
pub const UNKNOWN_CONFIG: &str = "application/vnd.unknown.config.v1+json";

/// A blob and the media type its descriptor gives it.
#[derive(Clone, Debug)]
pub struct Blob {
    pub media_type: String,
    pub bytes: Vec<u8>,
}

impl Blob {
    pub fn new(media_type: &str, bytes: impl Into<Vec<u8>>) -> Blob {
        Blob { media_type: media_type.to_string(), bytes: bytes.into() }
    }

    /// `sha256:<hex>`.
    pub fn digest(&self) -> String {
        format!("sha256:{}", sha256_hex(&self.bytes))
    }

    pub fn descriptor(&self) -> serde_json::Value {
        json!({"mediaType": self.media_type, "digest": self.digest(), "size": self.bytes.len()})
    }
}

/// An image manifest with its config and layers.
#[derive(Clone, Debug)]
pub struct Image {
    /// The manifest's media type ([`DOCKER_MANIFEST`] or [`OCI_MANIFEST`]).
    pub media_type: String,
    pub config: Blob,
    pub layers: Vec<Blob>,
    /// The manifest's `artifactType` (what `oras` 1.1+ writes).
    pub artifact_type: Option<String>,
}

impl Image {
    pub fn manifest(&self) -> Vec<u8> {
        let mut m = json!({
            "schemaVersion": 2,
            "mediaType": self.media_type,
            "config": self.config.descriptor(),
            "layers": self.layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
        });
        if let Some(t) = &self.artifact_type {
            m["artifactType"] = json!(t);
        }
        serde_json::to_vec_pretty(&m).unwrap()
    }

    /// The manifest digest, lower hex without `sha256:` (what a filter's `sha256` holds for OCI).
    pub fn digest(&self) -> String {
        sha256_hex(&self.manifest())
    }

    /// Config and layers.
    pub fn blobs(&self) -> impl Iterator<Item = &Blob> {
        std::iter::once(&self.config).chain(&self.layers)
    }
}

/// `os`/`architecture` of an index entry.
#[derive(Clone, Debug)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
}

pub fn platform(os: &str, architecture: &str) -> Option<Platform> {
    Some(Platform { os: os.to_string(), architecture: architecture.to_string() })
}

/// An OCI index (or Docker manifest list) of images, each with an optional platform.
#[derive(Clone, Debug)]
pub struct Index {
    pub media_type: String,
    pub entries: Vec<(Image, Option<Platform>)>,
}

impl Index {
    pub fn oci(entries: Vec<(Image, Option<Platform>)>) -> Index {
        Index { media_type: OCI_INDEX.to_string(), entries }
    }

    pub fn docker(entries: Vec<(Image, Option<Platform>)>) -> Index {
        Index { media_type: DOCKER_MANIFEST_LIST.to_string(), entries }
    }

    pub fn manifest(&self) -> Vec<u8> {
        let manifests: Vec<serde_json::Value> = self
            .entries
            .iter()
            .map(|(image, platform)| {
                let mut d = json!({
                    "mediaType": image.media_type,
                    "digest": format!("sha256:{}", image.digest()),
                    "size": image.manifest().len(),
                });
                if let Some(p) = platform {
                    d["platform"] = json!({"os": p.os, "architecture": p.architecture});
                }
                d
            })
            .collect();
        serde_json::to_vec_pretty(&json!({"schemaVersion": 2, "mediaType": self.media_type, "manifests": manifests}))
            .unwrap()
    }

    /// The index digest, lower hex.
    pub fn digest(&self) -> String {
        sha256_hex(&self.manifest())
    }
}

// ---- formats ------------------------------------------------------------------------------------------

/// A gzip-compressed tar of these files.
pub fn tar_gz(entries: &[(&str, &[u8])]) -> Vec<u8> {
    gzip(&tar(entries))
}

fn image_config(layers: &[Blob]) -> Vec<u8> {
    // diff_ids are the digests of the uncompressed layers; no fetcher reads them, registries do not check.
    let diff_ids: Vec<String> = layers.iter().map(|l| l.digest()).collect();
    serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "config": {},
    }))
    .unwrap()
}

/// Docker compat: a Docker v2 manifest whose last layer (`rootfs.diff.tar.gzip`) holds `plugin.wasm`, after a
/// first layer holding something else.
pub fn docker_compat(module: &[u8]) -> Image {
    docker_compat_named(module, "plugin.wasm")
}

/// [`docker_compat`] with the module at `path` in the last layer (`./plugin.wasm`, `dir/plugin.wasm`, …).
pub fn docker_compat_named(module: &[u8], path: &str) -> Image {
    let layers = vec![
        Blob::new(DOCKER_LAYER, tar_gz(&[("etc/base.txt", b"a base layer\n")])),
        Blob::new(DOCKER_LAYER, tar_gz(&[("README", b"readme\n"), (path, module)])),
    ];
    Image {
        media_type: DOCKER_MANIFEST.into(),
        config: Blob::new(DOCKER_CONFIG, image_config(&layers)),
        layers,
        artifact_type: None,
    }
}

/// OCI compat: an OCI manifest whose last layer (`tar+gzip`) holds `plugin.wasm`.
pub fn oci_compat(module: &[u8]) -> Image {
    let layers = vec![
        Blob::new(OCI_LAYER, tar_gz(&[("etc/base.txt", b"a base layer\n")])),
        Blob::new(OCI_LAYER, tar_gz(&[("plugin.wasm", module)])),
    ];
    Image {
        media_type: OCI_MANIFEST.into(),
        config: Blob::new(OCI_CONFIG, image_config(&layers)),
        layers,
        artifact_type: None,
    }
}

/// The OCI artifact of the Wasm image spec Istio follows: config [`WASM_CONFIG`], two layers, one of them
/// [`WASM_LAYER`] holding the module (second when `wasm_last`).
pub fn oci_artifact(module: &[u8]) -> Image {
    oci_artifact_ordered(module, false)
}

pub fn oci_artifact_ordered(module: &[u8], wasm_last: bool) -> Image {
    let wasm = Blob::new(WASM_LAYER, module);
    let other = Blob::new("application/vnd.module.wasm.source.layer.v1+tar", tar(&[("src/lib.rs", b"// source\n")]));
    let layers = if wasm_last { vec![other, wasm] } else { vec![wasm, other] };
    Image {
        media_type: OCI_MANIFEST.into(),
        config: Blob::new(WASM_CONFIG, br#"{"created":"2024-01-01T00:00:00Z","runtime":"proxy-wasm"}"#.to_vec()),
        layers,
        artifact_type: None,
    }
}

/// A single-layer artifact as the ORAS Python SDK pushes it: config [`UNKNOWN_CONFIG`] `{}`, one
/// [`WASM_LAYER`].
pub fn oras_python(module: &[u8]) -> Image {
    single_layer(module, UNKNOWN_CONFIG, WASM_LAYER, None)
}

/// A single-layer artifact as the `oras` CLI 1.1+ pushes it: the OCI empty config, `artifactType`, one layer
/// of `layer_media_type` ([`WASM_LAYER`] or [`APPLICATION_WASM`]).
pub fn oras_cli(module: &[u8], layer_media_type: &str) -> Image {
    single_layer(module, OCI_EMPTY, layer_media_type, Some(WASM_LAYER))
}

pub fn single_layer(
    module: &[u8],
    config_media_type: &str,
    layer_media_type: &str,
    artifact_type: Option<&str>,
) -> Image {
    Image {
        media_type: OCI_MANIFEST.into(),
        config: Blob::new(config_media_type, b"{}".to_vec()),
        layers: vec![Blob::new(layer_media_type, module)],
        artifact_type: artifact_type.map(str::to_string),
    }
}

/// Images that hold no usable module, each for a different reason.
pub mod unusable {
    use super::*;

    /// A Wasm-config artifact with two layers, neither of them [`WASM_LAYER`].
    pub fn no_wasm_layer(module: &[u8]) -> Image {
        Image {
            media_type: OCI_MANIFEST.into(),
            config: Blob::new(WASM_CONFIG, b"{}".to_vec()),
            layers: vec![
                Blob::new("application/octet-stream", module),
                Blob::new("application/vnd.oci.image.layer.v1.tar", tar(&[("a", b"a")])),
            ],
            artifact_type: None,
        }
    }

    /// A Wasm-config artifact with three layers, one of them the module.
    pub fn three_layers(module: &[u8]) -> Image {
        let mut image = oci_artifact(module);
        image.layers.push(Blob::new("application/vnd.oci.image.layer.v1.tar", tar(&[("b", b"b")])));
        image
    }

    /// OCI compat whose last layer holds no `plugin.wasm` (the module is there under another name).
    pub fn compat_without_plugin(module: &[u8]) -> Image {
        let layers = vec![Blob::new(OCI_LAYER, tar_gz(&[("filter.wasm", module), ("README", b"x")]))];
        Image {
            media_type: OCI_MANIFEST.into(),
            config: Blob::new(OCI_CONFIG, image_config(&layers)),
            layers,
            artifact_type: None,
        }
    }

    /// A single-layer Wasm artifact whose layer is not a Wasm module.
    pub fn not_a_module() -> Image {
        oras_python(b"<html>this is not wasm</html>")
    }

    /// A single-layer artifact whose one layer is neither Wasm media type.
    pub fn single_other_layer(module: &[u8]) -> Image {
        single_layer(module, OCI_EMPTY, "application/octet-stream", Some(WASM_LAYER))
    }
}

// ---- pushing ------------------------------------------------------------------------------------------

/// A ureq agent for the kit's registries: statuses are not errors, no redirects followed, no proxy from the
/// environment, a 30 s bound per request, and `ca_pem` as the only root when given.
pub fn agent(ca_pem: Option<&str>) -> ureq::Agent {
    let mut config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(30)));
    if let Some(pem) = ca_pem {
        use ureq::tls::{Certificate, RootCerts, TlsConfig};
        let cert = Certificate::from_pem(pem.as_bytes()).expect("CA PEM");
        config = config.tls_config(TlsConfig::builder().root_certs(RootCerts::Specific(Arc::new(vec![cert]))).build());
    }
    config.build().into()
}

/// Pushes blobs and manifests to one registry, authenticating when challenged.
pub struct Pusher {
    agent: ureq::Agent,
    base: String,
    credentials: Option<(String, String)>,
    /// The last `Authorization` value that worked, tried first.
    authorization: Mutex<Option<String>>,
}

/// A response: status, headers (lower-case names) and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

impl Pusher {
    /// To the registry at `base` (`http(s)://host:port`), with Basic credentials for challenges.
    pub fn new(base: &str, credentials: Option<(String, String)>, ca_pem: Option<&str>) -> Pusher {
        Pusher {
            agent: agent(ca_pem),
            base: base.trim_end_matches('/').to_string(),
            credentials,
            authorization: Mutex::new(None),
        }
    }

    /// Uploads every blob, then the manifest under `tag` (an empty tag pushes it by digest only). Returns the
    /// manifest digest (lower hex).
    pub fn push(&self, repo: &str, tag: &str, image: &Image) -> String {
        for blob in image.blobs() {
            self.push_blob(repo, &blob.bytes);
        }
        self.push_manifest(repo, tag, &image.media_type, &image.manifest())
    }

    /// Pushes every entry by digest, then the index under `tag`. Returns the index digest.
    pub fn push_index(&self, repo: &str, tag: &str, index: &Index) -> String {
        for (image, _) in &index.entries {
            self.push(repo, "", image);
        }
        self.push_manifest(repo, tag, &index.media_type, &index.manifest())
    }

    /// Uploads a blob (monolithic: POST then PUT with the digest) unless the repository has it.
    pub fn push_blob(&self, repo: &str, bytes: &[u8]) {
        let digest = format!("sha256:{}", sha256_hex(bytes));
        let head = self.call("HEAD", &format!("{}/v2/{repo}/blobs/{digest}", self.base), None, &[]);
        if head.status == 200 {
            return;
        }
        let start = self.call("POST", &format!("{}/v2/{repo}/blobs/uploads/", self.base), None, &[]);
        assert_eq!(start.status, 202, "start upload to {repo}: {start:?}");
        let location = start.header("location").expect("upload location").to_string();
        let location = if location.starts_with('/') { format!("{}{location}", self.base) } else { location };
        let separator = if location.contains('?') { '&' } else { '?' };
        let put = self.call(
            "PUT",
            &format!("{location}{separator}digest={}", digest.replace(':', "%3A")),
            Some("application/octet-stream"),
            bytes,
        );
        assert_eq!(put.status, 201, "upload blob {digest} to {repo}: {}", String::from_utf8_lossy(&put.body));
    }

    /// Puts a manifest under `reference` (a tag, or empty for its digest). Returns its digest (lower hex).
    pub fn push_manifest(&self, repo: &str, reference: &str, media_type: &str, manifest: &[u8]) -> String {
        let digest = sha256_hex(manifest);
        let reference = if reference.is_empty() { format!("sha256:{digest}") } else { reference.to_string() };
        let put =
            self.call("PUT", &format!("{}/v2/{repo}/manifests/{reference}", self.base), Some(media_type), manifest);
        assert_eq!(put.status, 201, "push manifest {repo}:{reference}: {}", String::from_utf8_lossy(&put.body));
        assert_eq!(put.header("docker-content-digest"), Some(format!("sha256:{digest}").as_str()));
        digest
    }

    /// Deletes a manifest by digest (the registry has `storage.delete` enabled).
    pub fn delete_manifest(&self, repo: &str, digest: &str) {
        let del = self.call("DELETE", &format!("{}/v2/{repo}/manifests/sha256:{digest}", self.base), None, &[]);
        assert_eq!(del.status, 202, "delete {repo}@{digest}: {}", String::from_utf8_lossy(&del.body));
    }

    /// A GET with the pusher's credentials (e.g. to read a manifest back).
    pub fn get(&self, path: &str, accept: &str) -> Answer {
        self.call_with("GET", &format!("{}{path}", self.base), &[("Accept", accept)], &[])
    }

    fn call(&self, method: &str, url: &str, content_type: Option<&str>, body: &[u8]) -> Answer {
        let headers: Vec<(&str, &str)> = content_type.map(|c| ("Content-Type", c)).into_iter().collect();
        self.call_with(method, url, &headers, body)
    }

    /// One request; on a 401 challenge, authorizes (Basic, or a token from the challenge's realm) and retries
    /// once.
    fn call_with(&self, method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
        let mut authorization = self.authorization.lock().unwrap().clone();
        for attempt in 0..2 {
            let answer = self.send(method, url, headers, authorization.as_deref(), body);
            if answer.status != 401 || attempt == 1 {
                if answer.status != 401 {
                    *self.authorization.lock().unwrap() = authorization;
                }
                return answer;
            }
            let challenge = answer.header("www-authenticate").unwrap_or_default().to_string();
            authorization = Some(self.authorize(&challenge));
        }
        unreachable!()
    }

    fn authorize(&self, challenge: &str) -> String {
        let (user, password) =
            self.credentials.clone().expect("the registry asks for credentials and the pusher has none");
        let basic = format!("Basic {}", STANDARD.encode(format!("{user}:{password}")));
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return basic;
        }
        let params = challenge_params(params);
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str()).unwrap_or_default();
        let url = format!("{}?service={}&scope={}", get("realm"), get("service"), get("scope"));
        let answer = self.send("GET", &url, &[], Some(&basic), &[]);
        assert_eq!(answer.status, 200, "token from {url}: {}", String::from_utf8_lossy(&answer.body));
        let token: serde_json::Value = serde_json::from_slice(&answer.body).expect("token JSON");
        format!("Bearer {}", token["token"].as_str().expect("token"))
    }

    fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        authorization: Option<&str>,
        body: &[u8],
    ) -> Answer {
        let mut request = ureq::http::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        if let Some(a) = authorization {
            request = request.header("Authorization", a);
        }
        let result = match method {
            "GET" | "HEAD" | "DELETE" => self.agent.run(request.body(()).expect("request")),
            _ => self.agent.run(request.body(body.to_vec()).expect("request")),
        };
        let mut response = result.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        let body = if method == "HEAD" {
            Vec::new()
        } else {
            response.body_mut().with_config().limit(64 << 20).read_to_vec().unwrap_or_default()
        };
        Answer { status, headers, body }
    }
}

/// `key="value", key2=value2` pairs of a challenge.
fn challenge_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else { break };
        let key = key.trim().trim_start_matches(',').trim().to_string();
        let (value, after) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"').unwrap_or(quoted.len());
            (quoted[..end].to_string(), quoted.get(end + 1..).unwrap_or(""))
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        out.push((key, value));
        rest = after.trim_start_matches(',').trim();
    }
    out
}

// ---- serving without a registry -------------------------------------------------------------------------

/// Serves `image` on a [`TestServer`] as a registry would: `/v2/`, the manifest under `reference` and under
/// its digest (with `Content-Type` and `Docker-Content-Digest`), and each blob by digest. A test then replaces
/// routes to make the server lie.
pub fn serve(server: &TestServer, repo: &str, reference: &str, image: &Image) {
    serve_manifest(server, repo, reference, &image.media_type, &image.manifest());
    for blob in image.blobs() {
        server.route(&format!("/v2/{repo}/blobs/{}", blob.digest()), Route::bytes(blob.bytes.clone()));
    }
}

/// Serves one manifest under `reference` and under its own digest, and `/v2/`.
pub fn serve_manifest(server: &TestServer, repo: &str, reference: &str, media_type: &str, manifest: &[u8]) {
    server.route("/v2/", Route::bytes(b"{}".to_vec()).header("Docker-Distribution-API-Version", "registry/2.0"));
    let digest = format!("sha256:{}", sha256_hex(manifest));
    let route =
        Route::bytes(manifest.to_vec()).header("Content-Type", media_type).header("Docker-Content-Digest", &digest);
    server.route(&format!("/v2/{repo}/manifests/{reference}"), route.clone());
    server.route(&format!("/v2/{repo}/manifests/{digest}"), route);
}
