//! The OCI fetcher against real HTTP on 127.0.0.1: a small registry written here (manifests, blobs, Basic and
//! Bearer auth with a token endpoint, scripted failures, every request recorded with its `Authorization`), and
//! the test kit's `TestServer` for HTTPS and redirects. The real distribution registry is exercised by the
//! integration tests (`tests/oci.rs`).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine;
use wasm_ecds_testkit::server::{gzip, sha256_hex, tar, wasm_module, Route, TestServer};

use super::manifest::{
    APPLICATION_WASM, DOCKER_LAYER, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_LAYER, OCI_MANIFEST,
    WASM_LAYER,
};
use crate::fetch::{FetchError, FetchErrorKind, Fetcher, ImageFetched, ImageRequest};
use crate::options::Options;

// ---------------------------------------------------------------------------------------------------------
// A loopback registry.

/// A request as the server read it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    query: String,
    authorization: Option<String>,
    accept: Option<String>,
}

/// An answer.
#[derive(Clone)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Announce the whole body but send only this many bytes, then close.
    truncate_to: Option<usize>,
    /// Send the body a byte every [`TRICKLE_PAUSE`] (a server that never quite ends its answer).
    trickle: bool,
}

/// The pause between the bytes of a trickled body.
const TRICKLE_PAUSE: Duration = Duration::from_millis(100);

impl Reply {
    fn ok(content_type: &str, body: Vec<u8>) -> Reply {
        Reply {
            status: 200,
            headers: vec![("Content-Type".into(), content_type.into())],
            body,
            truncate_to: None,
            trickle: false,
        }
    }

    fn status(status: u16) -> Reply {
        let body = format!(r#"{{"errors":[{{"code":"CODE_{status}","message":"status {status}"}}]}}"#);
        Reply {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: body.into(),
            truncate_to: None,
            trickle: false,
        }
    }

    fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// How a request the server cannot parse (a TLS ClientHello) is recorded.
const UNPARSEABLE: &str = "<unparseable>";

type Handler = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

/// A plain HTTP/1.1 server on 127.0.0.1 answering one request per connection with `handler`, recording each.
/// A request it cannot parse (a TLS ClientHello, say) gets `400 Bad Request` in plain HTTP, as Go's server
/// answers.
struct Server {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(handler: Handler) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(stream) = stream {
                        serve(stream, &handler, &seen);
                    }
                }
            })
        };
        Server { port, seen, stop, thread: Some(thread) }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Requests whose path contains `part`.
    fn count(&self, part: &str) -> usize {
        self.seen().iter().filter(|s| s.path.contains(part)).count()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(mut stream: TcpStream, handler: &Handler, seen: &Mutex<Vec<Seen>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
        if head == [0x16] {
            // A TLS handshake record: take the hello (one segment) and answer at once, as a plain server does.
            let mut hello = [0u8; 16 * 1024];
            let _ = stream.read(&mut hello);
            break;
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let request_line: Vec<&str> = lines.next().unwrap_or_default().split(' ').collect();
    let reply = match request_line.as_slice() {
        ["GET", target, version] if version.starts_with("HTTP/1.") && head.ends_with(b"\r\n\r\n") => {
            let (path, query) = target.split_once('?').unwrap_or((target, ""));
            let header = |name: &str| {
                text.split("\r\n").skip(1).find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                })
            };
            let request = Seen {
                path: path.to_string(),
                query: query.to_string(),
                authorization: header("authorization"),
                accept: header("accept"),
            };
            seen.lock().unwrap().push(request.clone());
            handler(&request)
        }
        _ => {
            seen.lock().unwrap().push(Seen {
                path: UNPARSEABLE.into(),
                query: String::new(),
                authorization: None,
                accept: None,
            });
            Reply { status: 400, headers: vec![], body: b"400 Bad Request".to_vec(), truncate_to: None, trickle: false }
        }
    };
    let mut out =
        format!("HTTP/1.1 {} X\r\nContent-Length: {}\r\nConnection: close\r\n", reply.status, reply.body.len());
    for (name, value) in &reply.headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    let body = &reply.body[..reply.truncate_to.unwrap_or(reply.body.len()).min(reply.body.len())];
    let _ = stream.write_all(out.as_bytes());
    if reply.trickle {
        // Until the client hangs up (a write fails) or the body is out.
        for byte in body {
            std::thread::sleep(TRICKLE_PAUSE);
            if stream.write_all(std::slice::from_ref(byte)).and_then(|_| stream.flush()).is_err() {
                return;
            }
        }
        return;
    }
    let _ = stream.write_all(body);
    let _ = stream.flush();
}

/// What a repository holds: blobs by hex digest, manifests by tag and by `sha256:<hex>`.
#[derive(Default, Clone)]
struct Repo {
    blobs: HashMap<String, Vec<u8>>,
    manifests: HashMap<String, (String, Vec<u8>)>,
    /// Answer blob requests with a redirect to `<this>/<hex>` (object storage).
    blob_redirect: Option<String>,
}

impl Repo {
    /// Adds a blob; its descriptor JSON.
    fn blob(&mut self, media_type: &str, bytes: &[u8]) -> String {
        let hex = sha256_hex(bytes);
        self.blobs.insert(hex.clone(), bytes.to_vec());
        format!(r#"{{"mediaType":"{media_type}","digest":"sha256:{hex}","size":{}}}"#, bytes.len())
    }

    /// Adds a manifest document under its digest and `tag`; its digest (hex).
    fn manifest(&mut self, tag: Option<&str>, media_type: &str, body: &str) -> String {
        let hex = sha256_hex(body.as_bytes());
        let entry = (media_type.to_string(), body.as_bytes().to_vec());
        self.manifests.insert(format!("sha256:{hex}"), entry.clone());
        if let Some(tag) = tag {
            self.manifests.insert(tag.to_string(), entry);
        }
        hex
    }

    /// An image manifest of these layers (descriptor JSON) under `tag`; its digest.
    fn image(&mut self, tag: Option<&str>, media_type: &str, config_type: &str, layers: &[String]) -> String {
        let config = self.blob(config_type, b"{}");
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{media_type}","config":{config},"layers":[{}]}}"#,
            layers.join(",")
        );
        self.manifest(tag, media_type, &body)
    }
}

/// How the registry wants to be spoken to.
#[derive(Clone)]
enum Auth {
    Anonymous,
    /// Basic with this user and password.
    Basic(&'static str, &'static str),
    /// Bearer tokens from `realm` (None: this server's `/token`), which hands them out anonymously or, when
    /// given, only for these credentials.
    Bearer {
        realm: Option<String>,
        credentials: Option<(&'static str, &'static str)>,
    },
}

const TOKEN: &str = "tok3n-for-tests";

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

/// A one-off answer instead of the registry's: to the first request whose path contains `.0`.
#[derive(Clone)]
enum Fault {
    Status(&'static str, u16),
    Truncate(&'static str, usize),
    /// Trickle the answer (see [`Reply::trickle`]).
    Trickle(&'static str),
}

/// A registry serving `repo` under the name `wasm/filter`, with `auth`.
fn registry(repo: Repo, auth: Auth) -> Server {
    registry_with(repo, auth, Vec::new())
}

fn registry_with(repo: Repo, auth: Auth, faults: Vec<Fault>) -> Server {
    let faults = Mutex::new(faults);
    let port = Arc::new(Mutex::new(0u16));
    let handler_port = port.clone();
    let handler: Handler = Arc::new(move |req: &Seen| {
        let own_realm = format!("http://127.0.0.1:{}/token", handler_port.lock().unwrap());
        if req.path == "/token" {
            if let Auth::Bearer { credentials, .. } = &auth {
                let allowed = match credentials {
                    None => true,
                    Some((u, p)) => req.authorization.as_deref() == Some(basic(u, p).as_str()),
                };
                return if allowed {
                    Reply::ok("application/json", format!(r#"{{"token":"{TOKEN}"}}"#).into_bytes())
                } else {
                    Reply::status(401)
                };
            }
        }
        let challenge = match &auth {
            Auth::Anonymous => None,
            Auth::Basic(u, p) => (req.authorization.as_deref() != Some(basic(u, p).as_str()))
                .then(|| r#"Basic realm="test""#.to_string()),
            Auth::Bearer { realm, .. } => {
                (req.authorization.as_deref() != Some(&format!("Bearer {TOKEN}"))).then(|| {
                    format!(
                        r#"Bearer realm="{}",service="test-registry",scope="repository:wasm/filter:pull""#,
                        realm.clone().unwrap_or(own_realm.clone())
                    )
                })
            }
        };
        if let Some(challenge) = challenge {
            return Reply::status(401).header("WWW-Authenticate", &challenge);
        }
        let (mut truncate_to, mut trickle) = (None, false);
        {
            let mut faults = faults.lock().unwrap();
            let hit = faults.iter().position(|f| match f {
                Fault::Status(part, _) | Fault::Truncate(part, _) | Fault::Trickle(part) => req.path.contains(part),
            });
            match hit.map(|i| faults.remove(i)) {
                Some(Fault::Status(_, status)) => return Reply::status(status),
                Some(Fault::Truncate(_, n)) => truncate_to = Some(n),
                Some(Fault::Trickle(_)) => trickle = true,
                None => {}
            }
        }
        let Some(rest) = req.path.strip_prefix("/v2/wasm/filter/") else { return Reply::status(404) };
        if let Some(reference) = rest.strip_prefix("manifests/") {
            return match repo.manifests.get(reference) {
                Some((media_type, body)) => Reply { trickle, ..Reply::ok(media_type, body.clone()) },
                None => Reply::status(404),
            };
        }
        if let Some(hex) = rest.strip_prefix("blobs/sha256:") {
            if let Some(base) = &repo.blob_redirect {
                return Reply::status(307).header("Location", &format!("{base}/{hex}"));
            }
            return match repo.blobs.get(hex) {
                Some(body) => Reply { truncate_to, trickle, ..Reply::ok("application/octet-stream", body.clone()) },
                None => Reply::status(404),
            };
        }
        Reply::status(404)
    });
    let server = Server::start(handler);
    *port.lock().unwrap() = server.port;
    server
}

// ---------------------------------------------------------------------------------------------------------
// Helpers.

/// The HTTP fetch tests' options, with every registry spoken to over plain HTTP (the loopback registry below).
fn options() -> Options {
    Options { plain_http_hosts: vec!["*".into()], ..crate::fetch::tests::options() }
}

struct Outcome {
    dir: tempfile::TempDir,
    result: Result<ImageFetched, FetchError>,
    /// The digests `known` was asked about.
    asked: Vec<String>,
}

impl Outcome {
    fn module(&self) -> (&str, Vec<u8>, bool) {
        match &self.result {
            Ok(ImageFetched::Downloaded { manifest_digest, module }) => {
                let bytes = std::fs::read(module.file.path()).unwrap();
                assert_eq!(module.sha256, sha256_hex(&bytes));
                assert_eq!(module.len, bytes.len() as u64);
                (manifest_digest, bytes, module.is_wasm)
            }
            Ok(ImageFetched::Known { manifest_digest }) => panic!("known {manifest_digest}"),
            Err(e) => panic!("{:?}: {}", e.kind, e.message),
        }
    }

    fn error(&self) -> &FetchError {
        match &self.result {
            Err(e) => e,
            Ok(_) => panic!("the fetch should fail"),
        }
    }

    fn files_left(&self) -> usize {
        std::fs::read_dir(self.dir.path()).unwrap().count()
    }
}

fn fetch_with(
    s: &Options,
    url: &str,
    secret: Option<&str>,
    expected: Option<&str>,
    known: &mut dyn FnMut(&str) -> bool,
) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let req = ImageRequest { url, pull_secret: secret.map(str::as_bytes), expected_manifest: expected };
    let mut asked = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let result = Fetcher::new(s).unwrap().fetch_image(&req, deadline, dir.path(), &mut |d| {
        asked.push(d.to_string());
        known(d)
    });
    Outcome { dir, result, asked }
}

fn fetch(s: &Options, url: &str) -> Outcome {
    fetch_with(s, url, None, None, &mut |_| false)
}

fn url(server: &Server, reference: &str) -> String {
    format!("oci://{}/wasm/filter{reference}", server.host())
}

/// A repository with the single-layer artifact `module` under `v1`; its manifest digest.
fn single_layer(module: &[u8]) -> (Repo, String) {
    let mut repo = Repo::default();
    let layer = repo.blob(WASM_LAYER, module);
    let digest = repo.image(Some("v1"), OCI_MANIFEST, "application/vnd.oci.empty.v1+json", &[layer]);
    (repo, digest)
}

fn secret(host: &str, user: &str, password: &str) -> String {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#)
}

// ---------------------------------------------------------------------------------------------------------
// Formats and manifests.

#[test]
fn every_format_is_fetched() {
    let module = wasm_module(20_000);
    let archive = gzip(&tar(&[("README", b"x"), ("out/plugin.wasm", &module)]));
    let mut repo = Repo::default();
    let docker_layers = [repo.blob(DOCKER_LAYER, &gzip(&tar(&[("a", b"b")]))), repo.blob(DOCKER_LAYER, &archive)];
    let docker =
        repo.image(Some("docker"), DOCKER_MANIFEST, "application/vnd.docker.container.image.v1+json", &docker_layers);
    let compat = repo.image(
        Some("compat"),
        OCI_MANIFEST,
        "application/vnd.oci.image.config.v1+json",
        &[repo.clone().blob(OCI_LAYER, &archive)],
    );
    let artifact_layers =
        [repo.blob(WASM_LAYER, &module), repo.blob("application/vnd.module.wasm.config.v1+json", b"{}")];
    let artifact =
        repo.image(Some("artifact"), OCI_MANIFEST, "application/vnd.module.wasm.config.v1+json", &artifact_layers);
    let wasm_layer = repo.blob(APPLICATION_WASM, &module);
    let oras = repo.image(Some("oras"), OCI_MANIFEST, "application/vnd.unknown.config.v1+json", &[wasm_layer]);
    let single_layer = repo.blob(WASM_LAYER, &module);
    let single = repo.image(Some("single"), OCI_MANIFEST, "application/vnd.oci.empty.v1+json", &[single_layer]);
    let server = registry(repo, Auth::Anonymous);
    for (tag, digest) in
        [("docker", docker), ("compat", compat), ("artifact", artifact), ("oras", oras), ("single", single)]
    {
        let outcome = fetch(&options(), &url(&server, &format!(":{tag}")));
        let (manifest_digest, bytes, is_wasm) = outcome.module();
        assert_eq!((manifest_digest, bytes == module, is_wasm), (digest.as_str(), true, true), "{tag}");
        assert_eq!(outcome.asked, vec![digest.clone()], "{tag}");
    }
    // The manifest was asked for with every type accepted.
    let accept = server.seen().iter().find(|s| s.path.contains("/manifests/")).unwrap().accept.clone().unwrap();
    for t in [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST] {
        assert!(accept.contains(t), "{accept}");
    }
}

#[test]
fn an_unusable_image_lists_every_format_and_fetches_no_layer() {
    let mut repo = Repo::default();
    let layers = [repo.blob("text/plain", b"a"), repo.blob("text/plain", b"b"), repo.blob("text/plain", b"c")];
    repo.image(Some("v1"), OCI_MANIFEST, "application/vnd.oci.image.config.v1+json", &layers);
    let server = registry(repo, Auth::Anonymous);
    let outcome = fetch(&options(), &url(&server, ":v1"));
    let err = outcome.error();
    assert_eq!(err.kind, FetchErrorKind::Download);
    assert!(
        err.message.starts_with(
            "could not fetch Wasm binary: the given image is in invalid format as an OCI image: could not parse as \
             Docker image: "
        ),
        "{}",
        err.message
    );
    for reason in [
        format!("invalid media type text/plain (expect {OCI_LAYER})"),
        "number of layers must be 2 but got 3".to_string(),
        "number of layers must be 1 but got 3".to_string(),
    ] {
        assert!(err.message.contains(&reason), "{reason}: {}", err.message);
    }
    assert_eq!(server.count("/blobs/"), 0);
}

#[test]
fn plugin_wasm_missing_from_a_compat_layer_is_a_download_error() {
    let mut repo = Repo::default();
    let layer = repo.blob(OCI_LAYER, &gzip(&tar(&[("module.wasm", &wasm_module(10))])));
    repo.image(Some("v1"), OCI_MANIFEST, "application/vnd.oci.image.config.v1+json", &[layer]);
    let server = registry(repo, Auth::Anonymous);
    let outcome = fetch(&options(), &url(&server, ":v1"));
    let err = outcome.error();
    assert_eq!(err.kind, FetchErrorKind::Download);
    assert_eq!(err.message, "could not fetch Wasm binary: plugin.wasm not found in the archive");
    assert_eq!(outcome.files_left(), 0);
}

#[test]
fn an_index_picks_the_wasm_platform_and_reports_its_own_digest() {
    let module = wasm_module(100);
    let (mut repo, wasm_digest) = single_layer(&module);
    let other = repo.image(None, OCI_MANIFEST, "x", &[repo.clone().blob("text/plain", b"linux")]);
    let entry = |digest: &str, os: &str, arch: &str| {
        let size = repo.manifests[&format!("sha256:{digest}")].1.len();
        format!(
            r#"{{"mediaType":"{OCI_MANIFEST}","digest":"sha256:{digest}","size":{size},"platform":{{"os":"{os}","architecture":"{arch}"}}}}"#
        )
    };
    let cases = [
        (
            "wasip1",
            format!(
                r#"{{"manifests":[{},{}]}}"#,
                entry(&other, "linux", "amd64"),
                entry(&wasm_digest, "wasip1", "wasm")
            ),
        ),
        (
            "wasi",
            format!(
                r#"{{"manifests":[{},{}]}}"#,
                entry(&other, "linux", "amd64"),
                entry(&wasm_digest, "wasi", "wasm32")
            ),
        ),
        ("only", format!(r#"{{"manifests":[{}]}}"#, entry(&wasm_digest, "linux", "arm64"))),
        (
            "first",
            format!(
                r#"{{"manifests":[{},{}]}}"#,
                entry(&wasm_digest, "linux", "arm64"),
                entry(&other, "linux", "amd64")
            ),
        ),
    ];
    let mut index_digests = Vec::new();
    for (tag, body) in &cases {
        let media_type = if *tag == "first" { DOCKER_MANIFEST_LIST } else { OCI_INDEX };
        index_digests.push(repo.manifest(Some(tag), media_type, body));
    }
    let server = registry(repo, Auth::Anonymous);
    for ((tag, _), index_digest) in cases.iter().zip(&index_digests) {
        let outcome = fetch(&options(), &url(&server, &format!(":{tag}")));
        let (manifest_digest, bytes, _) = outcome.module();
        assert_eq!((manifest_digest, bytes == module), (index_digest.as_str(), true), "{tag}");
        // By digest too: the index's digest is what `@sha256:` pins.
        let outcome = fetch(&options(), &url(&server, &format!("@sha256:{index_digest}")));
        assert_eq!(outcome.module().0, index_digest, "{tag}");
    }
    assert!(server.seen().iter().any(|s| s.path.ends_with(&format!("/manifests/sha256:{wasm_digest}"))));
}

#[test]
fn a_manifest_over_4_mib_is_refused() {
    let mut repo = Repo::default();
    let padding = " ".repeat(4 << 20);
    repo.manifest(Some("big"), OCI_MANIFEST, &format!(r#"{{"layers":[]{padding}}}"#));
    let server = registry(repo, Auth::Anonymous);
    let outcome = fetch(&options(), &url(&server, ":big"));
    let err = outcome.error();
    assert_eq!(err.kind, FetchErrorKind::Manifest);
    assert!(err.message.ends_with("the manifest is larger than the limit of 4194304 bytes"), "{}", err.message);
}

#[test]
fn a_digest_reference_must_match_the_bytes() {
    let (mut repo, digest) = single_layer(&wasm_module(10));
    // Another document under the digest.
    let wrong = repo.manifests["v1"].1.iter().copied().chain(*b" ").collect::<Vec<u8>>();
    let named = "a".repeat(64);
    repo.manifests.insert(format!("sha256:{named}"), (OCI_MANIFEST.into(), wrong));
    let server = registry(repo, Auth::Anonymous);
    let outcome = fetch(&options(), &url(&server, &format!("@sha256:{named}")));
    let err = outcome.error();
    assert_eq!(err.kind, FetchErrorKind::Manifest);
    assert!(err.message.contains("manifest digest mismatch: got sha256:"), "{}", err.message);
    assert!(err.message.ends_with(&format!("want sha256:{named}")), "{}", err.message);
    assert_eq!(server.count("/blobs/"), 0);
    // The right one is fine.
    assert_eq!(fetch(&options(), &url(&server, &format!("@sha256:{digest}"))).module().0, digest);
}

#[test]
fn expected_manifest_mismatch_and_known_digests_fetch_no_layer() {
    let (repo, digest) = single_layer(&wasm_module(10));
    let server = registry(repo, Auth::Anonymous);
    let want = "b".repeat(64);
    let outcome = fetch_with(&options(), &url(&server, ":v1"), None, Some(&want), &mut |_| false);
    let err = outcome.error();
    assert_eq!(err.kind, FetchErrorKind::ChecksumMismatch);
    assert_eq!(
        err.message,
        format!("module downloaded from {} has checksum {digest}, which does not match: {want}", url(&server, ":v1"))
    );
    assert!(outcome.asked.is_empty());
    let outcome = fetch_with(&options(), &url(&server, ":v1"), None, Some(&digest), &mut |_| true);
    assert!(matches!(&outcome.result, Ok(ImageFetched::Known { manifest_digest }) if *manifest_digest == digest));
    assert_eq!(outcome.asked, vec![digest.clone()]);
    assert_eq!(server.count("/blobs/"), 0);
    assert_eq!(outcome.files_left(), 0);
}

#[test]
fn a_layer_with_wrong_bytes_leaves_nothing() {
    let module = wasm_module(5000);
    let (mut repo, _) = single_layer(&module);
    let hex = sha256_hex(&module);
    repo.blobs.insert(hex.clone(), repo_tampered(&module));
    let server = registry(repo, Auth::Anonymous);
    let outcome = fetch(&options(), &url(&server, ":v1"));
    let err = outcome.error();
    assert_eq!(err.kind, FetchErrorKind::Download);
    assert!(err.message.starts_with("could not fetch Wasm binary: registry "), "{}", err.message);
    let got = sha256_hex(&repo_tampered(&module));
    assert!(
        err.message.ends_with(&format!("layer digest mismatch: got sha256:{got}, want sha256:{hex}")),
        "{}",
        err.message
    );
    assert_eq!(outcome.files_left(), 0);
}

fn repo_tampered(module: &[u8]) -> Vec<u8> {
    let mut tampered = module.to_vec();
    tampered[100] ^= 1;
    tampered
}

#[test]
fn a_layer_larger_than_declared_or_allowed_is_refused() {
    let module = wasm_module(5000);
    let (mut repo, _) = single_layer(&module);
    repo.blobs.get_mut(&sha256_hex(&module)).unwrap().extend_from_slice(b"more");
    let server = registry(repo, Auth::Anonymous);
    let outcome = fetch(&options(), &url(&server, ":v1"));
    assert!(
        outcome
            .error()
            .message
            .ends_with(&format!("the blob is larger than its descriptor's size of {} bytes", module.len())),
        "{}",
        outcome.error().message
    );
    assert_eq!(outcome.files_left(), 0);
    // Over max_module_bytes: refused before any blob request.
    let blob_requests = server.count("/blobs/");
    let s = Options { max_module_bytes: 4999, ..options() };
    let outcome = fetch(&s, &url(&server, ":v1"));
    assert_eq!(outcome.error().kind, FetchErrorKind::TooLarge);
    assert_eq!(server.count("/blobs/"), blob_requests);
}

#[test]
fn a_body_cut_short_and_503s_are_retried() {
    let module = wasm_module(50_000);
    let (repo, digest) = single_layer(&module);
    let faults =
        vec![Fault::Status("/manifests/", 503), Fault::Status("/manifests/", 502), Fault::Truncate("/blobs/", 1000)];
    let server = registry_with(repo, Auth::Anonymous, faults);
    let outcome = fetch(&options(), &url(&server, ":v1"));
    assert_eq!(outcome.module().0, digest);
    assert_eq!((server.count("/manifests/"), server.count("/blobs/")), (3, 2));
    // Attempts run out: the last status is the reason.
    let faults = vec![Fault::Status("/manifests/", 503); 3];
    let (repo, _) = single_layer(&module);
    let server = registry_with(repo, Auth::Anonymous, faults);
    let err = fetch(&options(), &url(&server, ":v1")).error().message.clone();
    assert!(err.ends_with("status 503 (CODE_503: status 503) (after 3 attempts)"), "{err}");
    // A status that is not retried stops at once.
    let (repo, _) = single_layer(&module);
    let server = registry_with(repo, Auth::Anonymous, vec![Fault::Status("/manifests/", 403)]);
    let err = fetch(&options(), &url(&server, ":v1")).error().message.clone();
    assert!(err.ends_with("/manifests/v1: status 403 (CODE_403: status 403)"), "{err}");
    assert_eq!(server.count("/manifests/"), 1);
}

// ---------------------------------------------------------------------------------------------------------
// Auth.

#[test]
fn basic_auth_with_and_without_credentials() {
    let module = wasm_module(100);
    let (repo, digest) = single_layer(&module);
    let server = registry(repo, Auth::Basic("alice", "s3cret-pw"));
    let good = secret(&server.host(), "alice", "s3cret-pw");
    let outcome = fetch_with(&options(), &url(&server, ":v1"), Some(&good), None, &mut |_| false);
    assert_eq!(outcome.module().0, digest);
    // Anonymous first; then the header, kept for the blob.
    let auths: Vec<Option<String>> = server.seen().iter().map(|s| s.authorization.clone()).collect();
    let header = Some(basic("alice", "s3cret-pw"));
    assert_eq!(auths, vec![None, header.clone(), header]);

    let outcome = fetch(&options(), &url(&server, ":v1"));
    let err = outcome.error();
    assert_eq!(err.kind, FetchErrorKind::Manifest);
    assert!(err.message.ends_with(&format!("unauthorized (no credentials for {})", server.host())), "{}", err.message);

    let wrong = secret(&server.host(), "alice", "wrong-pw");
    let outcome = fetch_with(&options(), &url(&server, ":v1"), Some(&wrong), None, &mut |_| false);
    let err = outcome.error();
    assert!(
        err.message.contains(&format!("unauthorized: the credentials for {} refused (status 401)", server.host())),
        "{}",
        err.message
    );
    assert!(!err.message.contains("wrong-pw") && !err.message.contains("alice"), "{}", err.message);
    // A secret for another registry means anonymous.
    let elsewhere = secret("other.example", "alice", "s3cret-pw");
    let outcome = fetch_with(&options(), &url(&server, ":v1"), Some(&elsewhere), None, &mut |_| false);
    assert!(outcome.error().message.ends_with(&format!("unauthorized (no credentials for {})", server.host())));
}

#[test]
fn a_malformed_pull_secret_is_a_manifest_error_without_its_text() {
    let (repo, _) = single_layer(&wasm_module(10));
    let server = registry(repo, Auth::Anonymous);
    let outcome =
        fetch_with(&options(), &url(&server, ":v1"), Some(r#"{"auths": "hunter2-secret"#), None, &mut |_| false);
    let err = outcome.error();
    assert_eq!(err.kind, FetchErrorKind::Manifest);
    assert!(err.message.contains("the pull secret is unusable: "), "{}", err.message);
    assert!(!err.message.contains("hunter2"), "{}", err.message);
    assert_eq!(server.seen().len(), 0);
}

#[test]
fn bearer_tokens_anonymous_and_with_credentials_are_reused() {
    let module = wasm_module(100);
    let (repo, digest) = single_layer(&module);
    let anonymous = registry(repo.clone(), Auth::Bearer { realm: None, credentials: None });
    let outcome = fetch(&options(), &url(&anonymous, ":v1"));
    assert_eq!(outcome.module().0, digest);
    let seen = anonymous.seen();
    let tokens: Vec<&Seen> = seen.iter().filter(|s| s.path == "/token").collect();
    assert_eq!(tokens.len(), 1, "{seen:?}");
    assert_eq!(tokens[0].authorization, None);
    assert_eq!(tokens[0].query, "service=test-registry&scope=repository%3Awasm%2Ffilter%3Apull");
    let bearer = Some(format!("Bearer {TOKEN}"));
    assert_eq!(seen.iter().filter(|s| s.authorization == bearer).count(), 2, "manifest and blob: {seen:?}");

    let with_credentials = registry(repo, Auth::Bearer { realm: None, credentials: Some(("bob", "t0ken-pw")) });
    let good = secret(&with_credentials.host(), "bob", "t0ken-pw");
    let outcome = fetch_with(&options(), &url(&with_credentials, ":v1"), Some(&good), None, &mut |_| false);
    assert_eq!(outcome.module().0, digest);
    let token_request = with_credentials.seen().into_iter().find(|s| s.path == "/token").unwrap();
    assert_eq!(token_request.authorization, Some(basic("bob", "t0ken-pw")));
    // Without a secret the token endpoint refuses.
    let outcome = fetch(&options(), &url(&with_credentials, ":v1"));
    let err = outcome.error();
    assert!(
        err.message.contains("unauthorized: the token endpoint refused an anonymous token (status 401)"),
        "{}",
        err.message
    );
    let wrong = secret(&with_credentials.host(), "bob", "nope-pw");
    let outcome = fetch_with(&options(), &url(&with_credentials, ":v1"), Some(&wrong), None, &mut |_| false);
    let err = outcome.error();
    assert!(
        err.message.contains(&format!("the token endpoint refused the credentials for {}", with_credentials.host())),
        "{}",
        err.message
    );
    assert!(!err.message.contains("nope-pw"), "{}", err.message);
}

#[test]
fn an_unsafe_realm_is_never_contacted() {
    let (repo, _) = single_layer(&wasm_module(10));
    let token_server = Server::start(Arc::new(|_: &Seen| Reply::ok("application/json", br#"{"token":"x"}"#.to_vec())));
    let blocked = Options { blocked_cidrs: vec!["10.0.0.0/8".parse().unwrap()], ..options() };
    for realm in [
        "http://169.254.169.254/latest/api/token".to_string(),
        "http://100.100.100.200/token".to_string(),
        "http://10.1.2.3/token".to_string(),
        format!("ftp://{}/token", token_server.host()),
        format!("file://{}/token", token_server.host()),
        "http:///token".to_string(),
    ] {
        let server = registry(repo.clone(), Auth::Bearer { realm: Some(realm.clone()), credentials: None });
        let outcome = fetch(&blocked, &url(&server, ":v1"));
        let err = outcome.error();
        assert_eq!(err.kind, FetchErrorKind::Manifest);
        assert!(err.message.contains("refusing the bearer realm"), "{realm}: {}", err.message);
        assert_eq!(server.seen().len(), 1, "only the first manifest request");
    }
    assert_eq!(token_server.seen().len(), 0);
}

// ---------------------------------------------------------------------------------------------------------
// Mirrors, transport.

#[test]
fn mirrors_are_tried_in_order_then_the_registry() {
    let module = wasm_module(300);
    let (repo, digest) = single_layer(&module);
    let origin = registry(repo.clone(), Auth::Anonymous);
    let mirror = registry(repo.clone(), Auth::Anonymous);
    let empty = registry(Repo::default(), Auth::Anonymous);
    let down = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let origin_host = origin.host();
    let mirrors = |list: Vec<String>| Options { registry_mirrors: vec![(origin_host.clone(), list)], ..options() };
    // Down → next mirror serves it all.
    let s = mirrors(vec![format!("http://127.0.0.1:{down}"), format!("http://{}", mirror.host())]);
    assert_eq!(fetch(&s, &url(&origin, ":v1")).module().0, digest);
    assert_eq!((mirror.count("/manifests/"), mirror.count("/blobs/"), origin.seen().len()), (1, 1, 0));
    // A mirror's 404 → the registry.
    let s = mirrors(vec![format!("http://{}", empty.host())]);
    assert_eq!(fetch(&s, &url(&origin, ":v1")).module().0, digest);
    assert_eq!((empty.count("/manifests/"), origin.count("/manifests/"), origin.count("/blobs/")), (1, 1, 1));
    // A mirror answering something that is no manifest → the registry.
    let junk = Server::start(Arc::new(|_: &Seen| Reply::ok(OCI_MANIFEST, b"<html>captive portal</html>".to_vec())));
    let s = mirrors(vec![format!("http://{}", junk.host())]);
    assert_eq!(fetch(&s, &url(&origin, ":v1")).module().0, digest);
    // (Its blob answer is refused too: the bytes do not hash to the digest.)
    assert_eq!((junk.seen().len(), origin.count("/manifests/"), origin.count("/blobs/")), (2, 2, 2));
    // Every endpoint down: each reason.
    let gone = origin.host();
    drop(origin);
    let outcome = fetch(
        &mirrors(vec![format!("http://127.0.0.1:{down}"), format!("http://{}", empty.host())]),
        &format!("oci://{gone}/wasm/filter:v1"),
    );
    let err = outcome.error();
    assert_eq!(err.kind, FetchErrorKind::Manifest);
    let message = &err.message;
    assert!(
        message.contains(&format!(
            "mirror http://127.0.0.1:{down}: GET http://127.0.0.1:{down}/v2/wasm/filter/manifests/v1: "
        )),
        "{message}"
    );
    assert!(message.contains(&format!("; mirror http://{}: GET http://{}/v2/wasm/filter/manifests/v1: status 404 (CODE_404: status 404); registry {gone}: GET http://{gone}/v2/", empty.host(), empty.host())), "{message}");
    assert!(message.to_lowercase().contains("connection refused"), "{message}");
}

#[test]
fn a_mirror_cannot_change_content_named_by_digest() {
    let module = wasm_module(300);
    let (repo, digest) = single_layer(&module);
    let origin = registry(repo.clone(), Auth::Anonymous);
    // The mirror answers the digest with another manifest.
    let (mut evil, _) = single_layer(&wasm_module(301));
    let other = evil.manifests["v1"].clone();
    evil.manifests.insert(format!("sha256:{digest}"), other);
    let mirror = registry(evil, Auth::Anonymous);
    let s = Options { registry_mirrors: vec![(origin.host(), vec![format!("http://{}", mirror.host())])], ..options() };
    let outcome = fetch(&s, &url(&origin, &format!("@sha256:{digest}")));
    let (got, bytes, _) = outcome.module();
    assert_eq!((got, bytes == module), (digest.as_str(), true));
    assert_eq!((mirror.count("/manifests/"), origin.count("/manifests/")), (1, 1));
}

#[test]
fn a_mirror_uses_its_own_pull_secret_entry() {
    let (repo, digest) = single_layer(&wasm_module(10));
    let mirror = registry(repo, Auth::Basic("m", "mirror-pw"));
    let origin = "registry.invalid:5000";
    let s = Options { registry_mirrors: vec![(origin.into(), vec![format!("http://{}", mirror.host())])], ..options() };
    let secret = secret(&mirror.host(), "m", "mirror-pw");
    let outcome = fetch_with(&s, &format!("oci://{origin}/wasm/filter:v1"), Some(&secret), None, &mut |_| false);
    assert_eq!(outcome.module().0, digest);
}

#[test]
fn plain_http_only_where_allowed_else_tls_falls_back_once() {
    let (repo, digest) = single_layer(&wasm_module(10));
    let server = registry(repo, Auth::Anonymous);
    // plain_http_hosts names it: no TLS attempt (the server would see a request it cannot parse).
    let s = Options { plain_http_hosts: vec![server.host()], ..options() };
    assert_eq!(fetch(&s, &url(&server, ":v1")).module().0, digest);
    let paths = |server: &Server| server.seen().into_iter().map(|s| s.path).collect::<Vec<_>>();
    let manifest = "/v2/wasm/filter/manifests/v1".to_string();
    let blob = format!("/v2/wasm/filter/blobs/sha256:{}", sha256_hex(&wasm_module(10)));
    assert_eq!(paths(&server), vec![manifest.clone(), blob.clone()]);
    // Not named: https first; its plain HTTP answer makes it fall back once, and the layer goes over http too.
    let server = registry(single_layer(&wasm_module(10)).0, Auth::Anonymous);
    let s = Options { plain_http_hosts: vec!["other:5000".into()], ..options() };
    assert_eq!(fetch(&s, &url(&server, ":v1")).module().0, digest);
    assert_eq!(paths(&server), vec![UNPARSEABLE.to_string(), manifest, blob]);
}

#[test]
fn connection_refused_does_not_fall_back() {
    let down = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let s = Options { plain_http_hosts: vec![], max_attempts: 1, ..options() };
    let outcome = fetch(&s, &format!("oci://127.0.0.1:{down}/wasm/filter:v1"));
    let err = outcome.error();
    assert!(
        err.message.contains(&format!("registry 127.0.0.1:{down}: GET https://127.0.0.1:{down}/v2/")),
        "{}",
        err.message
    );
}

#[test]
fn an_https_registry_with_ca_file() {
    let module = wasm_module(1000);
    let (repo, digest) = single_layer(&module);
    let server = TestServer::https();
    for (reference, (media_type, body)) in &repo.manifests {
        server.route(
            &format!("/v2/wasm/filter/manifests/{reference}"),
            Route::bytes(body.clone()).header("Content-Type", media_type),
        );
    }
    for (hex, body) in &repo.blobs {
        server.route(&format!("/v2/wasm/filter/blobs/sha256:{hex}"), Route::bytes(body.clone()));
    }
    let dir = tempfile::tempdir().unwrap();
    let s = Options { ca_file: Some(server.write_ca_file(dir.path())), plain_http_hosts: vec![], ..options() };
    let url = format!("oci://127.0.0.1:{}/wasm/filter:v1", server.port());
    assert_eq!(fetch(&s, &url).module().0, digest);
    // Without the CA: a certificate error, no fallback to http.
    let s = Options { plain_http_hosts: vec![], max_attempts: 1, ..options() };
    let err = fetch(&s, &url).error().message.clone();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    // insecure_hosts skips verification.
    let s =
        Options { insecure_hosts: vec![format!("127.0.0.1:{}", server.port())], plain_http_hosts: vec![], ..options() };
    assert_eq!(fetch(&s, &url).module().0, digest);
}

#[test]
fn a_blob_redirect_is_followed_without_the_authorization() {
    let module = wasm_module(2000);
    let (mut repo, digest) = single_layer(&module);
    let served = module.clone();
    let storage = Server::start(Arc::new(move |_: &Seen| Reply::ok("application/octet-stream", served.clone())));
    repo.blob_redirect = Some(format!("http://{}/bucket", storage.host()));
    let server = registry(repo, Auth::Basic("alice", "pw-redirect"));
    let good = secret(&server.host(), "alice", "pw-redirect");
    let outcome = fetch_with(&options(), &url(&server, ":v1"), Some(&good), None, &mut |_| false);
    assert_eq!(outcome.module().0, digest);
    let seen = storage.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, format!("/bucket/{}", sha256_hex(&module)));
    assert_eq!(seen[0].authorization, None);
    // The registry's blob request carried it.
    assert!(server.seen().iter().any(|s| s.path.contains("/blobs/") && s.authorization.is_some()));
    // A redirect to a blocked address is refused like any connection.
    let (mut repo, _) = single_layer(&module);
    repo.blob_redirect = Some("http://169.254.169.254/bucket".into());
    let server = registry(repo, Auth::Anonymous);
    let err = fetch(&Options { max_attempts: 1, ..options() }, &url(&server, ":v1")).error().clone();
    assert_eq!(err.kind, FetchErrorKind::Download);
    assert!(err.message.ends_with("connection blocked: resolved IP 169.254.169.254 is link-local"), "{}", err.message);
}

#[test]
fn a_token_the_registry_refuses_is_unauthorized() {
    let (repo, _) = single_layer(&wasm_module(10));
    let token_server =
        Server::start(Arc::new(|_: &Seen| Reply::ok("application/json", br#"{"access_token":"not-it"}"#.to_vec())));
    let realm = format!("http://{}/token", token_server.host());
    let server = registry(repo, Auth::Bearer { realm: Some(realm), credentials: None });
    let outcome = fetch(&options(), &url(&server, ":v1"));
    let err = outcome.error();
    assert_eq!(err.kind, FetchErrorKind::Manifest);
    assert!(err.message.ends_with("unauthorized: anonymous access refused (status 401)"), "{}", err.message);
    assert!(!err.message.contains("not-it"), "{}", err.message);
    // One challenge answered, not a loop.
    assert_eq!((server.seen().len(), token_server.seen().len()), (2, 1));
}

#[test]
fn a_bad_reference_makes_no_request() {
    let server = registry(Repo::default(), Auth::Anonymous);
    for reference in [":", ":Bad Tag", "@sha256:abc"] {
        let outcome = fetch(&options(), &url(&server, reference));
        let err = outcome.error();
        assert_eq!(err.kind, FetchErrorKind::Manifest, "{reference}");
        let prefix = "could not fetch Wasm OCI image: could not parse url in image reference: ";
        assert!(err.message.starts_with(prefix), "{reference}: {}", err.message);
    }
    assert_eq!(server.seen().len(), 0);
}

#[test]
fn the_deadline_bounds_every_endpoint() {
    // A registry that never answers: each attempt times out; the deadline ends the fetch.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let s = Options { http_request_timeout: Duration::from_millis(300), max_attempts: 100, ..options() };
    let dir = tempfile::tempdir().unwrap();
    let req = ImageRequest { url: &format!("oci://{host}/wasm/filter:v1"), pull_secret: None, expected_manifest: None };
    let deadline = Instant::now() + Duration::from_secs(1);
    let err = Fetcher::new(&s).unwrap().fetch_image(&req, deadline, dir.path(), &mut |_| false).err().unwrap();
    assert_eq!(err.kind, FetchErrorKind::Manifest);
    assert!(err.message.contains("request timed out after"), "{}", err.message);
    drop(listener);
}

// ---------------------------------------------------------------------------------------------------------
// Hostile registries.

#[test]
fn a_trickled_answer_ends_at_the_request_timeout() {
    // Manifest, blob and token answers sent a byte every 100 ms: each attempt ends at the request timeout, long
    // before the body would (the fetch's deadline is 20 s; the bodies would take 30 s or more).
    let module = wasm_module(2000);
    let s = Options { http_request_timeout: Duration::from_millis(500), max_attempts: 1, ..options() };
    for part in ["/manifests/", "/blobs/"] {
        let (repo, _) = single_layer(&module);
        let server = registry_with(repo, Auth::Anonymous, vec![Fault::Trickle(part)]);
        let err = fetch(&s, &url(&server, ":v1")).error().clone();
        assert!(err.message.contains("request timed out after 500ms"), "{part}: {}", err.message);
    }
    let answer = format!(r#"{{"padding":"{}","token":"{TOKEN}"}}"#, "x".repeat(300));
    let token_server = Server::start(Arc::new(move |_: &Seen| Reply {
        trickle: true,
        ..Reply::ok("application/json", answer.clone().into_bytes())
    }));
    let realm = Some(format!("http://{}/token", token_server.host()));
    let server = registry(single_layer(&module).0, Auth::Bearer { realm, credentials: None });
    let err = fetch(&s, &url(&server, ":v1")).error().clone();
    assert!(err.message.contains("token request GET http://"), "{}", err.message);
    assert!(err.message.contains("request timed out after 500ms"), "{}", err.message);
}

#[test]
fn a_token_endpoint_redirect_is_guarded() {
    let (repo, _) = single_layer(&wasm_module(10));
    let s = Options { blocked_cidrs: vec!["10.0.0.0/8".parse().unwrap()], max_attempts: 1, ..options() };
    for (target, why) in [
        ("http://169.254.169.254/latest/api/token", "resolved IP 169.254.169.254 is link-local"),
        ("http://10.1.2.3/token", "resolved IP 10.1.2.3 is in blocked CIDR range 10.0.0.0/8"),
    ] {
        let token_server = Server::start(Arc::new(move |_: &Seen| Reply::status(307).header("Location", target)));
        let realm = Some(format!("http://{}/token", token_server.host()));
        let server = registry(repo.clone(), Auth::Bearer { realm, credentials: None });
        let err = fetch(&s, &url(&server, ":v1")).error().clone();
        assert_eq!(err.kind, FetchErrorKind::Manifest);
        assert!(err.message.contains("token request GET") && err.message.contains(why), "{}", err.message);
        assert_eq!(token_server.seen().len(), 1);
    }
}

/// Whether `text` shows any 6 characters in a row of `secret`.
fn shows_part_of(text: &str, secret: &str) -> bool {
    secret.as_bytes().windows(6).any(|w| text.contains(std::str::from_utf8(w).unwrap()))
}

/// An error document quoting `authorization` and, for Basic, the `user:password` in it, after `pad` characters.
fn echo(authorization: &str, pad: usize) -> Reply {
    let decoded = authorization
        .strip_prefix("Basic ")
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .map(|b| String::from_utf8(b).unwrap())
        .unwrap_or_default();
    let message = format!("{}{authorization} refused; {decoded}", "x".repeat(pad));
    let body = format!(r#"{{"errors":[{{"code":"DENIED","message":"{message}"}}]}}"#);
    Reply { status: 403, ..Reply::ok("application/json", body.into_bytes()) }
}

/// Who echoes the `Authorization` it gets in an error document.
#[derive(Clone, Copy, Debug)]
enum Echo {
    /// A Basic registry.
    BasicRegistry,
    /// A Bearer registry, echoing the token (its token endpoint hands one out for the credentials).
    BearerRegistry,
    /// A Bearer registry's token endpoint, echoing the Basic header (status 400).
    TokenEndpoint,
    /// A Basic registry redirecting to a malformed `Location` holding the header (ureq quotes it).
    MalformedLocation,
}

fn echo_server(who: Echo, pad: usize) -> Server {
    let port = Arc::new(Mutex::new(0u16));
    let handler_port = port.clone();
    let server = Server::start(Arc::new(move |seen: &Seen| {
        let bearer = || {
            let realm = format!("http://127.0.0.1:{}/token", handler_port.lock().unwrap());
            Reply::status(401).header("WWW-Authenticate", &format!(r#"Bearer realm="{realm}""#))
        };
        match (who, seen.path.as_str(), &seen.authorization) {
            (Echo::BasicRegistry, _, None) => Reply::status(401).header("WWW-Authenticate", r#"Basic realm="r""#),
            (Echo::BasicRegistry, _, Some(a)) => echo(a, pad),
            (Echo::BearerRegistry, "/token", _) => {
                Reply::ok("application/json", format!(r#"{{"token":"{TOKEN}"}}"#).into_bytes())
            }
            (Echo::BearerRegistry, _, Some(a)) if a.starts_with("Bearer ") => echo(a, pad),
            (Echo::TokenEndpoint, "/token", Some(a)) => Reply { status: 400, ..echo(a, pad) },
            (Echo::MalformedLocation, _, None) => Reply::status(401).header("WWW-Authenticate", r#"Basic realm="r""#),
            (Echo::MalformedLocation, _, Some(a)) => {
                Reply::status(307).header("Location", &format!("http://[bad {}{a}", "x".repeat(pad)))
            }
            _ => bearer(),
        }
    }));
    *port.lock().unwrap() = server.port;
    server
}

#[test]
fn an_error_quoting_the_authorization_is_shown_without_it() {
    const PASSWORD: &str = "echo-Pa55word";
    let header = basic("alice", PASSWORD);
    let credential = header.strip_prefix("Basic ").unwrap().to_string();
    // 174: the 200-character cut of a quote falls inside the credential.
    for pad in [0, 174] {
        for who in [Echo::BasicRegistry, Echo::BearerRegistry, Echo::TokenEndpoint, Echo::MalformedLocation] {
            let server = echo_server(who, pad);
            let secret = secret(&server.host(), "alice", PASSWORD);
            let s = Options { max_attempts: 1, ..options() };
            let outcome = fetch_with(&s, &url(&server, ":v1"), Some(&secret), None, &mut |_| false);
            let message = &outcome.error().message;
            let shown = match who {
                Echo::TokenEndpoint => "status 400 (DENIED: ",
                Echo::MalformedLocation => "location header is malformed: http://[bad ",
                _ => "status 403 (DENIED: ",
            };
            assert!(message.contains(shown), "{who:?}: {message}");
            for shown in [credential.as_str(), PASSWORD, TOKEN] {
                assert!(!shows_part_of(message, shown), "{who:?} shows {shown:?}: {message}");
            }
        }
    }
}

#[test]
fn credentials_are_not_sent_over_an_unlisted_plain_http_fallback() {
    let (repo, digest) = single_layer(&wasm_module(10));
    let unlisted = Options { plain_http_hosts: vec![], ..options() };
    for auth in
        [Auth::Basic("alice", "fallback-pw"), Auth::Bearer { realm: None, credentials: Some(("alice", "fallback-pw")) }]
    {
        let server = registry(repo.clone(), auth);
        // `[::ffff:7f00:1]` reaches the loopback server, but is not a name go-containerregistry (nor the
        // fallback) takes for a loopback registry: it stands for a registry across the network.
        let host = format!("[::ffff:7f00:1]:{}", server.host().rsplit_once(':').unwrap().1);
        let remote_url = format!("oci://{host}/wasm/filter:v1");
        let remote_secret = secret(&host, "alice", "fallback-pw");
        let outcome = fetch_with(&unlisted, &remote_url, Some(&remote_secret), None, &mut |_| false);
        let message = &outcome.error().message;
        assert!(
            message.ends_with(&format!(
                "refusing to send the credentials for {host} over plain HTTP: the https request was answered in plain \
                 HTTP, and the registry is not in plain_http_hosts"
            )),
            "{message}"
        );
        assert!(server.seen().iter().all(|s| s.authorization.is_none()), "{:?}", server.seen());
        // Listed in plain_http_hosts: the operator's choice, the credentials are sent.
        let listed = Options { plain_http_hosts: vec![host.clone()], ..options() };
        assert_eq!(fetch_with(&listed, &remote_url, Some(&remote_secret), None, &mut |_| false).module().0, digest);
        // A loopback registry (as written: 127.0.0.1, localhost, [::1]): nothing leaves the host, the
        // credentials follow the fallback, as go-containerregistry speaks plain HTTP to it from the start.
        let loopback = secret(&server.host(), "alice", "fallback-pw");
        assert_eq!(
            fetch_with(&unlisted, &url(&server, ":v1"), Some(&loopback), None, &mut |_| false).module().0,
            digest
        );
    }
}

#[test]
fn credentials_are_not_sent_to_a_plain_http_realm_of_an_https_registry() {
    // An https registry whose challenge names an http token endpoint: the credentials would cross the network
    // in clear text (go-containerregistry refuses such a realm for a registry that is not insecure).
    let token_server =
        Server::start(Arc::new(|_: &Seen| Reply::ok("application/json", format!(r#"{{"token":"{TOKEN}"}}"#).into())));
    let server = TestServer::https();
    let challenge = format!(r#"Bearer realm="http://{}/token",service="s""#, token_server.host());
    server.route("/v2/wasm/filter/manifests/v1", Route::status(401).header("WWW-Authenticate", &challenge));
    let dir = tempfile::tempdir().unwrap();
    let s = Options { ca_file: Some(server.write_ca_file(dir.path())), plain_http_hosts: vec![], ..options() };
    let host = format!("127.0.0.1:{}", server.port());
    let url = format!("oci://{host}/wasm/filter:v1");
    let secret = secret(&host, "alice", "realm-downgrade-pw");
    let outcome = fetch_with(&s, &url, Some(&secret), None, &mut |_| false);
    let message = &outcome.error().message;
    assert!(
        message.ends_with(&format!(
            "refusing to send the credentials for {host} to the plain HTTP bearer realm \"http://{}/token\" of a \
             registry spoken to over https",
            token_server.host()
        )),
        "{message}"
    );
    assert_eq!(token_server.seen().len(), 0);
    // Anonymous: an anonymous token is asked for there (no secret to lose).
    let _ = fetch(&s, &url);
    assert_eq!(token_server.seen().len(), 1);
    assert_eq!(token_server.seen()[0].authorization, None);
}
