//! Network fetchers. A fetch streams a module into a temp file in the cache directory while hashing it.

mod client;
mod http;
mod oci;
mod unbox;

pub use oci::fuzzing as oci_fuzzing;

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::metrics::FetchResult;
use crate::options::Options;

/// A fetched module: a temp file (deleted on drop unless persisted) holding the final, unboxed bytes.
pub(crate) struct Downloaded {
    pub file: tempfile::NamedTempFile,
    /// Lower-case hex sha256 of the final bytes.
    pub sha256: String,
    pub len: u64,
    /// At least 8 bytes starting with `\0asm`.
    pub is_wasm: bool,
    /// Why a download that looked like gzip or tar was kept as it is (then it is rarely Wasm): added to the
    /// reason of the rejection.
    pub not_unpacked: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FetchErrorKind {
    /// Not http/https: no network call was made.
    UnsupportedScheme,
    InvalidUrl,
    /// Transport errors and HTTP statuses, after the attempts ran out or a non-retryable status.
    Download,
    /// The body exceeded `max_module_bytes`.
    TooLarge,
    /// Writing the temp file failed (disk full, permissions).
    Io,
    /// An OCI image's manifest could not be had or used (resolution, auth, an unusable image).
    Manifest,
    /// An OCI manifest's digest is not the one the config asks for.
    ChecksumMismatch,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FetchError {
    pub kind: FetchErrorKind,
    pub message: String,
}

impl FetchError {
    /// The `istio_agent_wasm_remote_fetch_count` result this error counts as, if any.
    pub fn counted_as(&self) -> Option<FetchResult> {
        match self.kind {
            FetchErrorKind::UnsupportedScheme | FetchErrorKind::InvalidUrl => None,
            FetchErrorKind::Download | FetchErrorKind::TooLarge | FetchErrorKind::Io => {
                Some(FetchResult::DownloadFailure)
            }
            FetchErrorKind::Manifest => Some(FetchResult::ManifestFailure),
            FetchErrorKind::ChecksumMismatch => Some(FetchResult::ChecksumMismatched),
        }
    }
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for FetchError {}

/// What an OCI image fetch needs from the module request.
pub(crate) struct ImageRequest<'a> {
    /// The `oci://` URL as given.
    pub url: &'a str,
    /// `ISTIO_META_WASM_IMAGE_PULL_SECRET` (a docker `config.json`); `None` is anonymous.
    pub pull_secret: Option<&'a [u8]>,
    /// The manifest digest the config asks for (lower-case hex, without `sha256:`): the config's `sha256`,
    /// else the digest of an `@sha256:` reference. A manifest with another digest fails with
    /// [`FetchErrorKind::ChecksumMismatch`] before any layer is fetched.
    pub expected_manifest: Option<&'a str>,
}

/// How an OCI image fetch ended well.
pub(crate) enum ImageFetched {
    /// The manifest resolved to a digest the caller's `known` said it already has a module for: no layer was
    /// fetched.
    Known { manifest_digest: String },
    /// The module, out of the image's layer.
    Downloaded { manifest_digest: String, module: Downloaded },
}

/// Whether `url` names an OCI image (`oci://…`, the scheme in any case).
pub(crate) fn is_oci_url(url: &str) -> bool {
    url.get(..6).is_some_and(|s| s.eq_ignore_ascii_case("oci://"))
}

/// Fetches modules over HTTP/HTTPS and from OCI registries. Cheap to share between threads.
pub(crate) struct Fetcher {
    http: http::HttpFetcher,
    oci: oci::OciFetcher,
    max_module_bytes: u64,
}

impl Fetcher {
    /// Builds the HTTP clients; fails only when the TLS settings (`ca_file`) cannot be loaded.
    pub fn new(options: &Options) -> Result<Fetcher, FetchError> {
        Fetcher::with_proxy(options, ureq::Proxy::try_from_env())
    }

    /// A fetcher whose connections go through `proxy` (see [`client::Client::new`]).
    fn with_proxy(options: &Options, proxy: Option<ureq::Proxy>) -> Result<Fetcher, FetchError> {
        let client = Arc::new(client::Client::new(options, proxy)?);
        Ok(Fetcher {
            http: http::HttpFetcher::new(client.clone(), options.max_module_bytes),
            oci: oci::OciFetcher::new(client, options),
            max_module_bytes: options.max_module_bytes,
        })
    }

    /// Fetches the module of the OCI image `req.url` names into a temp file in `temp_dir`, within `deadline`.
    ///
    /// Resolves the manifest first (errors: [`FetchErrorKind::Manifest`], counted as a manifest failure),
    /// checks its digest against `req.expected_manifest`, then asks `known(manifest_digest)`: when it answers
    /// true, nothing more is fetched. Otherwise the module's layer streams to disk with its digest verified
    /// (errors: [`FetchErrorKind::Download`] and the other download kinds).
    pub fn fetch_image(
        &self,
        req: &ImageRequest<'_>,
        deadline: Instant,
        temp_dir: &Path,
        known: &mut dyn FnMut(&str) -> bool,
    ) -> Result<ImageFetched, FetchError> {
        self.oci.fetch(req, deadline, temp_dir, known)
    }

    /// Fetches `url` into a temp file in `temp_dir`, unboxing gzip/tar, all within `deadline`.
    ///
    /// Only `http` and `https` are fetched; any other scheme fails at once without a network call. The body
    /// streams to a temp file while it is hashed; memory use does not depend on the module's size. On error
    /// no temp file is left behind.
    pub fn fetch(&self, url: &str, deadline: Instant, temp_dir: &Path) -> Result<Downloaded, FetchError> {
        let scheme = url_scheme(url)?;
        if scheme != "http" && scheme != "https" {
            return Err(FetchError::new(
                FetchErrorKind::UnsupportedScheme,
                format!("unsupported Wasm module downloading URL scheme: {scheme}"),
            ));
        }
        let uri = http::parse_url(url)?;
        let mut buf = vec![0u8; COPY_BUFFER_BYTES];
        let downloaded = self.http.fetch(&uri, deadline, temp_dir, &mut buf)?;
        let unboxed = unbox::unbox(downloaded, temp_dir, self.max_module_bytes, &mut buf)?;
        Ok(Downloaded {
            is_wasm: unboxed.len >= 8 && unboxed.head.starts_with(WASM_MAGIC),
            not_unpacked: unboxed.not_unpacked,
            file: unboxed.file,
            sha256: unboxed.sha256,
            len: unboxed.len,
        })
    }
}

/// The scheme of `url`, lower-cased as Go's `url.Parse` does; empty when there is none.
fn url_scheme(url: &str) -> Result<String, FetchError> {
    let Some(colon) = url.find(':') else { return Ok(String::new()) };
    let candidate = &url[..colon];
    let mut chars = candidate.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if valid {
        return Ok(candidate.to_ascii_lowercase());
    }
    if candidate.contains('/') {
        // A colon later in a path ("/a:b"): no scheme.
        return Ok(String::new());
    }
    Err(FetchError::new(
        FetchErrorKind::InvalidUrl,
        format!("fail to parse Wasm module fetch url: {url}, error: missing protocol scheme"),
    ))
}

/// Size of the one buffer a fetch copies through (download and unboxing).
pub(crate) const COPY_BUFFER_BYTES: usize = 64 * 1024;

/// The first bytes of every Wasm binary.
pub(crate) const WASM_MAGIC: &[u8] = b"\0asm";

impl FetchError {
    pub(crate) fn new(kind: FetchErrorKind, message: impl Into<String>) -> FetchError {
        FetchError { kind, message: message.into() }
    }

    pub(crate) fn too_large(max: u64) -> FetchError {
        FetchError::new(
            FetchErrorKind::TooLarge,
            format!("wasm module is larger than the maximum module size (max_module_bytes) of {max} bytes"),
        )
    }

    pub(crate) fn io(what: &str, dir: &Path, e: &std::io::Error) -> FetchError {
        FetchError::new(FetchErrorKind::Io, format!("{what} in {}: {e}", dir.display()))
    }
}

/// A temp file holding (partly processed) module bytes, with their hash.
pub(crate) struct Staged {
    pub file: tempfile::NamedTempFile,
    pub sha256: String,
    pub len: u64,
}

pub(crate) enum CopyError {
    Read(std::io::Error),
    Write(std::io::Error),
    TooLarge,
}

/// Copies `reader` into `file` through `buf`, hashing; fails as soon as more than `max` bytes arrive.
/// Returns the lower-case hex sha256 and the length.
pub(crate) fn copy_hashed(
    reader: &mut dyn std::io::Read,
    file: &mut std::fs::File,
    buf: &mut [u8],
    max: u64,
) -> Result<(String, u64), CopyError> {
    use sha2::Digest;
    use std::io::Write;
    let mut hasher = sha2::Sha256::new();
    let mut len: u64 = 0;
    loop {
        let n = match reader.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        len += n as u64;
        if len > max {
            return Err(CopyError::TooLarge);
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).map_err(CopyError::Write)?;
    }
    file.flush().map_err(CopyError::Write)?;
    Ok((hex::encode(hasher.finalize()), len))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::files::{new_temp_file, TEMP_PREFIX};
    use wasm_ecds_testkit::proxy::TestProxy;
    use wasm_ecds_testkit::server::{gzip, sha256_hex, tar, wasm_module, Route, TestServer};

    /// Every option a fetch reads, set for these tests (and the OCI fetcher's); the rest are the built-in
    /// defaults.
    pub(super) fn options() -> Options {
        Options {
            http_request_timeout: Duration::from_secs(5),
            max_attempts: 3,
            retry_initial_backoff: Duration::from_millis(10),
            retry_max_backoff: Duration::from_millis(50),
            max_module_bytes: 1 << 20,
            insecure_hosts: Vec::new(),
            ca_file: None,
            blocked_cidrs: Vec::new(),
            ..Options::default()
        }
    }

    fn in_10s() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    /// Fetches `url` with `s` into a fresh temp dir; the dir is returned so it outlives the result.
    fn fetch_with(s: &Options, url: &str) -> (tempfile::TempDir, Result<Downloaded, FetchError>) {
        let dir = tempfile::tempdir().unwrap();
        let result = Fetcher::new(s).unwrap().fetch(url, in_10s(), dir.path());
        (dir, result)
    }

    fn fetch_err(s: &Options, url: &str) -> FetchError {
        let (dir, result) = fetch_with(s, url);
        let err = result.err().expect("fetch should fail");
        assert!(files(dir.path()).is_empty(), "temp files left behind: {:?}", files(dir.path()));
        err
    }

    fn assert_module(d: &Downloaded, expected: &[u8]) {
        assert_eq!(d.sha256, sha256_hex(expected));
        assert_eq!(d.len, expected.len() as u64);
        assert_eq!(std::fs::read(d.file.path()).unwrap(), expected);
        assert_eq!(d.is_wasm, expected.len() >= 8 && expected.starts_with(b"\0asm"));
    }

    #[test]
    fn downloads_a_module() {
        let server = TestServer::http();
        let module = wasm_module(100_000);
        server.route("/m.wasm", Route::bytes(module.clone()));
        let (dir, result) = fetch_with(&options(), &server.url("/m.wasm?v=1#frag"));
        let d = result.unwrap();
        assert_module(&d, &module);
        assert!(d.is_wasm);
        assert_eq!(d.file.path().parent().unwrap(), dir.path());
        let name = d.file.path().file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with(&format!("{TEMP_PREFIX}{}-", std::process::id())), "{name}");
        assert_eq!(server.requests("/m.wasm"), 1);
        drop(d);
        assert!(files(dir.path()).is_empty());
    }

    #[test]
    fn non_wasm_body_is_returned_but_flagged() {
        let server = TestServer::http();
        server.route("/short", Route::bytes(b"\0asm\x01".to_vec()));
        server.route("/html", Route::bytes(b"<html>not a module</html>".to_vec()));
        for path in ["/short", "/html"] {
            let (_dir, result) = fetch_with(&options(), &server.url(path));
            let d = result.unwrap();
            assert!(!d.is_wasm, "{path}");
        }
    }

    #[test]
    fn not_found_is_not_retried() {
        let server = TestServer::http();
        let err = fetch_err(&options(), &server.url("/missing.wasm"));
        assert_eq!(err.kind, FetchErrorKind::Download);
        assert_eq!(
            err.message,
            "wasm module download failed after 1 attempts, last error: wasm module download request failed: status code 404"
        );
        assert_eq!(err.counted_as(), Some(FetchResult::DownloadFailure));
        assert_eq!(server.requests("/missing.wasm"), 1);
    }

    #[test]
    fn server_errors_are_retried_then_succeed() {
        let server = TestServer::http();
        let module = wasm_module(10);
        server.route("/m.wasm", Route::bytes(module.clone()).fail_first(&[503, 502]));
        let (_dir, result) = fetch_with(&options(), &server.url("/m.wasm"));
        assert_module(&result.unwrap(), &module);
        assert_eq!(server.requests("/m.wasm"), 3);
    }

    #[test]
    fn some_statuses_stop_at_once() {
        let server = TestServer::http();
        for code in [501, 505, 511, 400, 403, 429, 204, 304] {
            let path = format!("/s{code}");
            server.route(&path, Route::status(code));
            let err = fetch_err(&options(), &server.url(&path));
            assert_eq!(
                err.message,
                format!(
                    "wasm module download failed after 1 attempts, last error: wasm module download request failed: status code {code}"
                )
            );
            assert_eq!(server.requests(&path), 1, "{code}");
        }
    }

    #[test]
    fn retries_run_out() {
        let server = TestServer::http();
        server.route("/m.wasm", Route::status(500));
        let s = Options { max_attempts: 4, ..options() };
        let err = fetch_err(&s, &server.url("/m.wasm"));
        assert_eq!(err.kind, FetchErrorKind::Download);
        assert_eq!(
            err.message,
            "wasm module download failed after 4 attempts, last error: wasm module download request failed: status code 500"
        );
        assert_eq!(server.requests("/m.wasm"), 4);
    }

    #[test]
    fn deadline_bounds_the_whole_fetch() {
        let server = TestServer::http();
        server.route("/m.wasm", Route::status(503));
        let s = Options {
            max_attempts: 5,
            retry_initial_backoff: Duration::from_millis(500),
            retry_max_backoff: Duration::from_secs(60),
            ..options()
        };
        let dir = tempfile::tempdir().unwrap();
        let fetcher = Fetcher::new(&s).unwrap();
        let start = Instant::now();
        let err = fetcher.fetch(&server.url("/m.wasm"), start + Duration::from_secs(1), dir.path()).err().unwrap();
        let elapsed = start.elapsed();
        // Attempts at ~0 s, then after pauses of 250–750 ms, 375–1125 ms, …: it stops as soon as the next pause
        // would reach the deadline, so well before 5 attempts × backoff and never past the deadline.
        assert!(elapsed < Duration::from_millis(1100), "{elapsed:?}");
        let attempts = server.requests("/m.wasm");
        assert!((1..5).contains(&attempts), "{attempts}");
        assert_eq!(
            err.message,
            format!(
                "wasm module download failed after {attempts} attempts, last error: wasm module download request failed: status code 503"
            )
        );
    }

    #[test]
    fn expired_deadline_makes_no_request() {
        let server = TestServer::http();
        server.route("/m.wasm", Route::bytes(wasm_module(1)));
        let dir = tempfile::tempdir().unwrap();
        let err = Fetcher::new(&options()).unwrap().fetch(&server.url("/m.wasm"), Instant::now(), dir.path()).err();
        assert_eq!(err.unwrap().message, "wasm module download failed after 1 attempts, last error: deadline exceeded");
        assert_eq!(server.total_requests(), 0);
    }

    #[test]
    fn request_timeout_applies_per_attempt() {
        let server = TestServer::http();
        server.route("/slow", Route::bytes(wasm_module(10)).delay(Duration::from_secs(3)));
        server.route("/trickle", Route::bytes(wasm_module(2000)).trickle(100, Duration::from_millis(100)));
        let s = Options { http_request_timeout: Duration::from_millis(300), max_attempts: 2, ..options() };
        for path in ["/slow", "/trickle"] {
            let start = Instant::now();
            let err = fetch_err(&s, &server.url(path));
            assert!(start.elapsed() < Duration::from_secs(2), "{path}: {:?}", start.elapsed());
            assert!(err.message.starts_with("wasm module download failed after 2 attempts, last error: "), "{path}");
            assert!(err.message.ends_with("request timed out after 300ms"), "{path}: {}", err.message);
            assert_eq!(server.requests(path), 2, "{path}");
        }
    }

    #[test]
    fn deadline_cuts_a_slow_response() {
        let server = TestServer::http();
        server.route("/slow", Route::bytes(wasm_module(10)).delay(Duration::from_secs(5)));
        let dir = tempfile::tempdir().unwrap();
        let start = Instant::now();
        let err = Fetcher::new(&options())
            .unwrap()
            .fetch(&server.url("/slow"), start + Duration::from_millis(400), dir.path())
            .err()
            .unwrap();
        assert!(start.elapsed() < Duration::from_millis(1000), "{:?}", start.elapsed());
        assert!(err.message.starts_with("wasm module download failed after 1 attempts"), "{}", err.message);
        assert_eq!(server.requests("/slow"), 1);
    }

    #[test]
    fn follows_redirects_up_to_ten() {
        let server = TestServer::http();
        let module = wasm_module(50);
        server.route("/m.wasm", Route::bytes(module.clone()));
        for i in 0..11 {
            let next = if i == 10 { "/m.wasm".to_string() } else { format!("/r{}", i + 1) };
            // Mix relative and absolute locations and redirect statuses.
            let location = if i % 2 == 0 { next } else { server.url(&next) };
            let code = [301, 302, 303, 307, 308][i % 5];
            server.route(&format!("/r{i}"), Route::redirect(code, location));
        }
        // /r1 … /r10 → m.wasm: ten redirects.
        let (_dir, result) = fetch_with(&options(), &server.url("/r1"));
        assert_module(&result.unwrap(), &module);
        // /r0 … /r10 → m.wasm: eleven.
        let s = Options { max_attempts: 1, ..options() };
        let err = fetch_err(&s, &server.url("/r0"));
        assert_eq!(err.message, "wasm module download failed after 1 attempts, last error: stopped after 10 redirects");
    }

    #[test]
    fn truncated_body_is_retried() {
        let server = TestServer::http();
        server.route("/m.wasm", Route::bytes(wasm_module(100_000)).truncate(50_000));
        let s = Options { max_attempts: 2, ..options() };
        let err = fetch_err(&s, &server.url("/m.wasm"));
        assert_eq!(err.kind, FetchErrorKind::Download);
        assert_eq!(
            err.message,
            "wasm module download failed after 2 attempts, last error: reading the response body: connection closed before the full body was received"
        );
        assert_eq!(server.requests("/m.wasm"), 2);
    }

    #[test]
    fn connection_closed_without_response_is_retried() {
        let server = TestServer::http();
        server.route("/m.wasm", Route::hang_up());
        let err = fetch_err(&options(), &server.url("/m.wasm"));
        assert!(
            err.message.starts_with("wasm module download failed after 3 attempts, last error: "),
            "{}",
            err.message
        );
        assert!(err.message.ends_with("connection closed by the server before a complete response"), "{}", err.message);
        assert_eq!(server.requests("/m.wasm"), 3);
    }

    #[test]
    fn connection_refused_is_retried() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let s = Options { max_attempts: 2, ..options() };
        let err = fetch_err(&s, &format!("http://127.0.0.1:{port}/m.wasm"));
        assert!(
            err.message.starts_with("wasm module download failed after 2 attempts, last error: "),
            "{}",
            err.message
        );
        assert!(err.message.to_lowercase().contains("refused"), "{}", err.message);
    }

    #[test]
    fn oversized_body_is_aborted() {
        let server = TestServer::http();
        let module = wasm_module(5000);
        server.route("/announced", Route::bytes(module.clone()));
        // Compressed on the wire: no usable Content-Length, the cap applies while streaming.
        server.route("/streamed", Route::bytes(module.clone()).gzip_encoding());
        let s = Options { max_module_bytes: 1000, ..options() };
        for path in ["/announced", "/streamed"] {
            let err = fetch_err(&s, &server.url(path));
            assert_eq!(err.kind, FetchErrorKind::TooLarge, "{path}");
            assert!(err.message.contains("1000 bytes"), "{}", err.message);
            assert_eq!(err.counted_as(), Some(FetchResult::DownloadFailure));
            assert_eq!(server.requests(path), 1, "{path}: not retried");
        }
        // Exactly at the limit is fine.
        let s = Options { max_module_bytes: module.len() as u64, ..options() };
        let (_dir, result) = fetch_with(&s, &server.url("/announced"));
        assert_module(&result.unwrap(), &module);
    }

    #[test]
    fn oversized_response_head_is_refused() {
        let server = TestServer::http();
        server.route("/m.wasm", Route::bytes(wasm_module(10)).header("X-Filler", &"x".repeat(70_000)));
        server.route("/r", Route::redirect(302, format!("/{}", "a".repeat(70_000))));
        let s = Options { max_attempts: 1, ..options() };
        for path in ["/m.wasm", "/r"] {
            let err = fetch_err(&s, &server.url(path));
            assert_eq!(
                err.message,
                "wasm module download failed after 1 attempts, last error: the response's status line and headers exceed the limit of 65536 bytes",
                "{path}"
            );
        }
    }

    #[test]
    fn content_encoding_gzip_is_decoded() {
        let server = TestServer::http();
        let module = wasm_module(30_000);
        server.route("/m.wasm", Route::bytes(module.clone()).gzip_encoding());
        let (_dir, result) = fetch_with(&options(), &server.url("/m.wasm"));
        assert_module(&result.unwrap(), &module);
    }

    #[test]
    fn gzip_tar_and_tar_gz_are_unboxed() {
        let server = TestServer::http();
        let module = wasm_module(70_000);
        server.route("/m.wasm.gz", Route::bytes(gzip(&module)));
        server.route("/m.tar", Route::bytes(tar(&[("any-name.bin", &module), ("plugin.wasm", b"second")])));
        server.route("/m.tar.gz", Route::bytes(gzip(&tar(&[("./plugin.wasm", &module)]))));
        for path in ["/m.wasm.gz", "/m.tar", "/m.tar.gz"] {
            let (dir, result) = fetch_with(&options(), &server.url(path));
            let d = result.unwrap();
            assert_module(&d, &module);
            // Intermediate layers are gone; only the final file is left.
            assert_eq!(files(dir.path()).len(), 1, "{path}: {:?}", files(dir.path()));
        }
    }

    #[test]
    fn undecodable_gzip_keeps_the_original() {
        let server = TestServer::http();
        let mut broken = gzip(&wasm_module(1000));
        broken.truncate(broken.len() / 2);
        let garbage = b"\x1f\x8bthis is not deflate data at all".to_vec();
        server.route("/broken.gz", Route::bytes(broken.clone()));
        server.route("/garbage.gz", Route::bytes(garbage.clone()));
        for (path, body) in [("/broken.gz", &broken), ("/garbage.gz", &garbage)] {
            let (dir, result) = fetch_with(&options(), &server.url(path));
            let d = result.unwrap();
            assert_module(&d, body);
            assert!(!d.is_wasm);
            assert_eq!(files(dir.path()).len(), 1, "{path}");
        }
    }

    #[test]
    fn https_with_ca_file() {
        let server = TestServer::https();
        let module = wasm_module(20_000);
        server.route("/m.wasm", Route::bytes(module.clone()));
        let ca_dir = tempfile::tempdir().unwrap();
        let s = Options { ca_file: Some(server.write_ca_file(ca_dir.path())), ..options() };
        let (_dir, result) = fetch_with(&s, &server.url("/m.wasm"));
        assert_module(&result.unwrap(), &module);
        // localhost is in the certificate too.
        let url = format!("https://localhost:{}/m.wasm", server.port());
        let (_dir, result) = fetch_with(&s, &url);
        assert_module(&result.unwrap(), &module);
    }

    #[test]
    fn https_self_signed_is_rejected_without_ca_file() {
        let server = TestServer::https();
        server.route("/m.wasm", Route::bytes(wasm_module(10)));
        let s = Options { max_attempts: 2, ..options() };
        let err = fetch_err(&s, &server.url("/m.wasm"));
        assert_eq!(err.kind, FetchErrorKind::Download);
        assert!(err.message.starts_with("wasm module download failed after 2 attempts"), "{}", err.message);
        assert!(err.message.to_lowercase().contains("certificate"), "{}", err.message);
        // Another host being insecure does not help.
        let s =
            Options { max_attempts: 1, insecure_hosts: vec!["127.0.0.1:1".into(), "localhost".into()], ..options() };
        fetch_err(&s, &server.url("/m.wasm"));
    }

    #[test]
    fn https_insecure_hosts_skip_verification() {
        let server = TestServer::https();
        let module = wasm_module(10);
        server.route("/m.wasm", Route::bytes(module.clone()));
        for entry in [format!("127.0.0.1:{}", server.port()), "*".to_string()] {
            let s = Options { insecure_hosts: vec!["other.example".into(), entry.clone()], ..options() };
            let (_dir, result) = fetch_with(&s, &server.url("/m.wasm"));
            assert_module(&result.unwrap(), &module);
        }
        // The bare host does not match a URL that names a port (Istio compares `host[:port]` as written).
        let s = Options { insecure_hosts: vec!["127.0.0.1".into()], max_attempts: 1, ..options() };
        fetch_err(&s, &server.url("/m.wasm"));
    }

    #[test]
    fn ca_file_errors_fail_new() {
        let dir = tempfile::tempdir().unwrap();
        let missing = Options { ca_file: Some(dir.path().join("nope.pem")), ..options() };
        let err = Fetcher::new(&missing).err().unwrap();
        assert!(err.message.starts_with("cannot load ca_file"), "{}", err.message);
        for (name, text) in [
            ("empty.pem", ""),
            ("text.pem", "hello"),
            ("bad.pem", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            let s = Options { ca_file: Some(path), ..options() };
            assert!(Fetcher::new(&s).is_err(), "{name}");
        }
    }

    #[test]
    fn blocked_address_is_refused() {
        let server = TestServer::http();
        server.route("/m.wasm", Route::bytes(wasm_module(10)));
        let s = Options { max_attempts: 1, blocked_cidrs: vec!["127.0.0.0/8".parse().unwrap()], ..options() };
        let err = fetch_err(&s, &server.url("/m.wasm"));
        assert_eq!(err.kind, FetchErrorKind::Download);
        assert_eq!(
            err.message,
            "wasm module download failed after 1 attempts, last error: connection blocked: resolved IP 127.0.0.1 is in blocked CIDR range 127.0.0.0/8"
        );
        assert_eq!(server.total_requests(), 0);
    }

    #[test]
    fn redirect_to_blocked_address_is_refused() {
        let server = TestServer::http();
        server.route("/m.wasm", Route::redirect(302, "http://169.254.169.254/latest/meta-data/"));
        let s = Options { max_attempts: 1, ..options() };
        let err = fetch_err(&s, &server.url("/m.wasm"));
        assert_eq!(
            err.message,
            "wasm module download failed after 1 attempts, last error: connection blocked: resolved IP 169.254.169.254 is link-local"
        );
    }

    /// A fetcher whose clients go through `proxy` (the environment is process-global; tests set it here).
    fn fetcher_with_proxy(s: &Options, proxy: &str) -> Fetcher {
        let proxy = ureq::Proxy::new(proxy).unwrap();
        Fetcher::with_proxy(s, Some(proxy)).unwrap()
    }

    #[test]
    fn proxy_carries_an_allowed_target_and_its_own_address_is_guarded() {
        let server = TestServer::http();
        let module = wasm_module(1000);
        server.route("/m.wasm", Route::bytes(module.clone()));
        let proxy = TestProxy::start();
        let s = Options { max_attempts: 1, ..options() };
        let dir = tempfile::tempdir().unwrap();
        let d = fetcher_with_proxy(&s, &proxy.url()).fetch(&server.url("/m.wasm"), in_10s(), dir.path()).unwrap();
        assert_module(&d, &module);
        drop(d);
        assert_eq!(proxy.requests(), vec![format!("CONNECT 127.0.0.1:{}", server.port())]);
        assert_eq!(server.requests("/m.wasm"), 1);
        // The proxy's own address is checked too.
        let s = Options { blocked_cidrs: vec!["127.0.0.0/8".parse().unwrap()], ..s };
        let f = fetcher_with_proxy(&s, &proxy.url());
        let err = f.fetch("http://198.51.100.7/m.wasm", in_10s(), dir.path()).err().unwrap();
        assert_eq!(
            err.message,
            "wasm module download failed after 1 attempts, last error: connection blocked: resolved IP 127.0.0.1 is in blocked CIDR range 127.0.0.0/8"
        );
        assert_eq!(proxy.requests().len(), 1);
        assert!(files(dir.path()).is_empty());
    }

    /// With a proxy, the proxy resolves and connects to the target: the target is checked before the proxy
    /// is asked for it, and a refused one never reaches the proxy.
    #[test]
    fn blocked_targets_never_reach_the_proxy() {
        let proxy = TestProxy::start();
        let s = Options { max_attempts: 1, blocked_cidrs: vec!["10.0.0.0/8".parse().unwrap()], ..options() };
        let f = fetcher_with_proxy(&s, &proxy.url());
        let dir = tempfile::tempdir().unwrap();
        for (url, reason) in [
            ("http://169.254.169.254/latest/meta-data/", "resolved IP 169.254.169.254 is link-local"),
            ("https://169.254.169.254/latest/meta-data/", "resolved IP 169.254.169.254 is link-local"),
            ("http://[::ffff:169.254.169.254]/", "resolved IP 169.254.169.254 is link-local"),
            (
                "http://100.100.100.200/latest/meta-data/",
                "resolved IP 100.100.100.200 is a known cloud metadata address",
            ),
            ("http://10.1.2.3/m.wasm", "resolved IP 10.1.2.3 is in blocked CIDR range 10.0.0.0/8"),
            ("http://0.0.0.0:8080/m.wasm", "resolved IP 0.0.0.0 is unspecified"),
        ] {
            let err = f.fetch(url, in_10s(), dir.path()).err().unwrap();
            assert_eq!(
                err.message,
                format!("wasm module download failed after 1 attempts, last error: connection blocked: {reason}"),
                "{url}"
            );
        }
        assert_eq!(proxy.requests(), Vec::<String>::new());
        assert!(files(dir.path()).is_empty());
    }

    /// Each redirect hop's target is checked before the proxy is asked for it.
    #[test]
    fn redirect_hops_through_the_proxy_are_checked() {
        let server = TestServer::http();
        server.route("/metadata", Route::redirect(302, "http://169.254.169.254/latest/meta-data/"));
        server.route("/private", Route::redirect(307, "https://10.9.8.7:8443/m.wasm"));
        server.route("/chain", Route::redirect(301, "/private"));
        let proxy = TestProxy::start();
        let s = Options { max_attempts: 1, blocked_cidrs: vec!["10.0.0.0/8".parse().unwrap()], ..options() };
        let f = fetcher_with_proxy(&s, &proxy.url());
        let dir = tempfile::tempdir().unwrap();
        for (path, reason) in [
            ("/metadata", "resolved IP 169.254.169.254 is link-local"),
            ("/private", "resolved IP 10.9.8.7 is in blocked CIDR range 10.0.0.0/8"),
            ("/chain", "resolved IP 10.9.8.7 is in blocked CIDR range 10.0.0.0/8"),
        ] {
            let err = f.fetch(&server.url(path), in_10s(), dir.path()).err().unwrap();
            assert_eq!(
                err.message,
                format!("wasm module download failed after 1 attempts, last error: connection blocked: {reason}"),
                "{path}"
            );
        }
        // Only the allowed hops went to the proxy, each to the loopback server.
        let to_server = format!("CONNECT 127.0.0.1:{}", server.port());
        assert!(proxy.requests().iter().all(|r| *r == to_server), "{:?}", proxy.requests());
        assert_eq!(server.total_requests(), 4);
        assert!(files(dir.path()).is_empty());
    }

    #[test]
    fn unsupported_schemes_make_no_request() {
        let server = TestServer::http();
        let port = server.port();
        let f = Fetcher::new(&options()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        for (url, scheme) in [
            (format!("ftp://127.0.0.1:{port}/m.wasm"), "ftp"),
            (format!("oci://127.0.0.1:{port}/m:latest"), "oci"),
            ("file:///tmp/m.wasm".to_string(), "file"),
            (format!("FTP://127.0.0.1:{port}/m.wasm"), "ftp"),
            ("127.0.0.1/m.wasm".to_string(), ""),
        ] {
            let err = f.fetch(&url, in_10s(), dir.path()).err().unwrap();
            assert_eq!(err.kind, FetchErrorKind::UnsupportedScheme, "{url}");
            assert_eq!(err.message, format!("unsupported Wasm module downloading URL scheme: {scheme}"));
            assert_eq!(err.counted_as(), None);
        }
        assert_eq!(server.total_requests(), 0);
        assert!(files(dir.path()).is_empty());
    }

    #[test]
    fn invalid_urls() {
        let f = Fetcher::new(&options()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        for url in ["http://", "http:///m.wasm", "https://exa mple.com/m.wasm", "1http://x/"] {
            let err = f.fetch(url, in_10s(), dir.path()).err().unwrap();
            assert_eq!(err.kind, FetchErrorKind::InvalidUrl, "{url}: {}", err.message);
            assert!(err.message.starts_with(&format!("fail to parse Wasm module fetch url: {url}, error: ")));
            assert_eq!(err.counted_as(), None);
        }
    }

    /// A port that is not 0–65535 in ASCII digits is a URL error (Go's `url.Parse` checks the digits, its
    /// dialer the range), never a request: not even the proxy, which sees every request, is asked.
    #[test]
    fn invalid_ports_are_url_errors_without_a_request() {
        let proxy = TestProxy::start();
        let f = fetcher_with_proxy(&options(), &proxy.url());
        let dir = tempfile::tempdir().unwrap();
        for (url, port) in [
            ("http://127.0.0.1:99999999/m.wasm", ":99999999"),
            ("http://127.0.0.1:65536/m.wasm", ":65536"),
            ("http://127.0.0.1:-1/m.wasm", ":-1"),
            ("http://127.0.0.1:+80/m.wasm", ":+80"),
            ("http://127.0.0.1:12345678901234567890/m.wasm", ":12345678901234567890"),
            ("https://user@127.0.0.1:8a/m.wasm", ":8a"),
            ("http://[::1]:65536/m.wasm", ":65536"),
            ("http://[::1]x/m.wasm", "x"),
        ] {
            let err = f.fetch(url, in_10s(), dir.path()).err().unwrap();
            assert_eq!(err.kind, FetchErrorKind::InvalidUrl, "{url}: {}", err.message);
            assert_eq!(
                err.message,
                format!("fail to parse Wasm module fetch url: {url}, error: invalid port \"{port}\" after host")
            );
            assert_eq!(err.counted_as(), None);
        }
        assert_eq!(proxy.requests(), Vec::<String>::new());
    }

    #[test]
    fn valid_ports_parse_as_go_does() {
        for (url, port) in [
            ("http://h/m.wasm", None),
            // An empty port means the scheme's default, as in Go.
            ("http://h:/m.wasm", None),
            ("http://[::1]:/m.wasm", None),
            ("http://h:0/m.wasm", Some(0)),
            ("http://h:080/m.wasm", Some(80)),
            ("http://h:00000000000000000080/m.wasm", Some(80)),
            ("http://h:65535/m.wasm", Some(65535)),
            ("http://u:p@[::1]:8443/m.wasm", Some(8443)),
        ] {
            let uri = http::parse_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(uri.port_u16(), port, "{url}");
        }
    }

    #[test]
    fn unusable_temp_dir_is_an_io_error() {
        let server = TestServer::http();
        server.route("/m.wasm", Route::bytes(wasm_module(10)));
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("does-not-exist");
        let err = Fetcher::new(&options()).unwrap().fetch(&server.url("/m.wasm"), in_10s(), &missing).err().unwrap();
        assert_eq!(err.kind, FetchErrorKind::Io);
        assert!(err.message.contains("No such file or directory"), "{}", err.message);
        assert_eq!(server.requests("/m.wasm"), 1, "not retried");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn disk_full_is_reported_with_the_os_message() {
        let mut full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
        let mut buf = vec![0u8; COPY_BUFFER_BYTES];
        let data = vec![7u8; 200_000];
        match copy_hashed(&mut &data[..], &mut full, &mut buf, u64::MAX) {
            Err(CopyError::Write(e)) => {
                let err = FetchError::io("cannot write the module", Path::new("/cache"), &e);
                assert_eq!(err.kind, FetchErrorKind::Io);
                assert!(
                    err.message.starts_with("cannot write the module in /cache: No space left on device"),
                    "{}",
                    err.message
                );
            }
            _ => panic!("expected a write error"),
        }
    }

    #[test]
    fn copy_hashes_and_caps() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = new_temp_file(dir.path()).unwrap();
        let data = wasm_module(300_000);
        let mut buf = vec![0u8; COPY_BUFFER_BYTES];
        let (sha, len) = copy_hashed(&mut &data[..], file.as_file_mut(), &mut buf, data.len() as u64).ok().unwrap();
        assert_eq!((sha, len), (sha256_hex(&data), data.len() as u64));
        let mut file = new_temp_file(dir.path()).unwrap();
        assert!(matches!(
            copy_hashed(&mut &data[..], file.as_file_mut(), &mut buf, data.len() as u64 - 1),
            Err(CopyError::TooLarge)
        ));
    }

    #[test]
    fn backoff_grows_with_jitter_and_cap() {
        // Pauses stay within ±50 % of 100, 150, 225, … ms and never exceed the cap.
        let mut b = client::tests_support::backoff(Duration::from_millis(100), Duration::from_millis(300));
        let mut interval = 100.0f64;
        for _ in 0..10 {
            let p = b.next().as_secs_f64() * 1000.0;
            assert!(p >= interval * 0.5 - 0.001 && p <= (interval * 1.5).min(300.0) + 0.001, "{p} vs {interval}");
            interval = (interval * 1.5).min(300.0);
        }
    }
}
