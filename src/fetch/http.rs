//! HTTP/HTTPS module downloads: Istio's `HTTPFetcher` (`pkg/wasm/httpfetcher.go`) over the shared [`Client`]
//! (agents, retries, backoff). Unlike Istio, a body cut short is retried and the body streams to disk.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ureq::http::Uri;

use super::client::{describe, retryable, AttemptError, Client, GaveUp};
use super::{copy_hashed, CopyError, FetchError, FetchErrorKind, Staged};
use crate::store::files::new_temp_file;

pub(super) struct HttpFetcher {
    client: Arc<Client>,
    max_module_bytes: u64,
}

impl HttpFetcher {
    pub fn new(client: Arc<Client>, max_module_bytes: u64) -> HttpFetcher {
        HttpFetcher { client, max_module_bytes }
    }

    /// Downloads `uri` into a temp file in `temp_dir`, retrying as Istio does, within `deadline`.
    pub fn fetch(&self, uri: &Uri, deadline: Instant, temp_dir: &Path, buf: &mut [u8]) -> Result<Staged, FetchError> {
        let agent = self.client.agent_for(uri);
        let result = self
            .client
            .retrying(deadline, "wasm module download", |timeout| self.attempt(agent, uri, timeout, temp_dir, buf));
        match result {
            Ok(staged) => Ok(staged),
            Err(GaveUp::Fatal(e)) => Err(e),
            Err(GaveUp::Failed { attempts, last_error }) => Err(FetchError::new(
                FetchErrorKind::Download,
                format!("wasm module download failed after {attempts} attempts, last error: {last_error}"),
            )),
        }
    }

    /// One `GET` (following redirects) with `timeout` for the whole exchange, body included.
    fn attempt(
        &self,
        agent: &ureq::Agent,
        uri: &Uri,
        timeout: Duration,
        temp_dir: &Path,
        buf: &mut [u8],
    ) -> Result<Staged, AttemptError<FetchError>> {
        let request = agent.get(uri.clone()).config().timeout_global(Some(timeout)).build();
        let mut response = request.call().map_err(|e| AttemptError::Retry(describe(&e, timeout)))?;
        let status = response.status().as_u16();
        if status != 200 {
            let message = format!("wasm module download request failed: status code {status}");
            return Err(if retryable(status) { AttemptError::Retry(message) } else { AttemptError::Stop(message) });
        }
        // The header is only left in place when ureq does not decompress the body, so then it is the real size.
        let announced = response
            .headers()
            .get(ureq::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if announced.is_some_and(|n| n > self.max_module_bytes) {
            return Err(AttemptError::Fatal(FetchError::too_large(self.max_module_bytes)));
        }
        let mut file = new_temp_file(temp_dir)
            .map_err(|e| AttemptError::Fatal(FetchError::io("cannot create a temp file", temp_dir, &e)))?;
        let mut reader = response.body_mut().as_reader();
        // On any error `file` is dropped here, which deletes it.
        match copy_hashed(&mut reader, file.as_file_mut(), buf, self.max_module_bytes) {
            Ok((sha256, len)) => Ok(Staged { file, sha256, len }),
            Err(CopyError::Read(e)) => {
                let why = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    "connection closed before the full body was received".to_string()
                } else {
                    describe(&ureq::Error::from(e), timeout)
                };
                Err(AttemptError::Retry(format!("reading the response body: {why}")))
            }
            Err(CopyError::Write(e)) => {
                Err(AttemptError::Fatal(FetchError::io("cannot write the module", temp_dir, &e)))
            }
            Err(CopyError::TooLarge) => Err(AttemptError::Fatal(FetchError::too_large(self.max_module_bytes))),
        }
    }
}

/// Parses an http(s) URL; Istio's wording on failure.
pub(super) fn parse_url(url: &str) -> Result<Uri, FetchError> {
    let invalid = |why: String| {
        FetchError::new(FetchErrorKind::InvalidUrl, format!("fail to parse Wasm module fetch url: {url}, error: {why}"))
    };
    // The fragment is never sent.
    let without_fragment = url.split('#').next().unwrap_or_default();
    let uri: Uri = without_fragment.parse().map_err(|e: ureq::http::uri::InvalidUri| invalid(e.to_string()))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid("missing host".to_string()));
    }
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    check_port(authority).map_err(invalid)?;
    Ok(uri)
}

/// What may follow the host: nothing, or `:` and ASCII digits (none meaning the scheme's default port) worth at
/// most 65535. Go's `url.Parse` (`net/url` `validOptionalPort`) refuses anything but digits; a value above 65535
/// passes it and fails in Go's dialer (`net` `lookup.go`: `dial tcp: address 65536: invalid port`, a transport
/// error Istio retries). Both are refused here, before any request, in `url.Parse`'s words. The `http` crate
/// alone would read `:+80` as 80 and `:65536`, `:-1` or twenty digits as no port, so port 80.
fn check_port(authority: &str) -> Result<(), String> {
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    let port = match host_port.strip_prefix('[') {
        // An IPv6 literal: whatever follows `]` (the `http` crate has checked the brackets).
        Some(v6) => v6.split_once(']').map_or("", |(_, rest)| rest),
        None => host_port.rfind(':').map_or("", |colon| &host_port[colon..]),
    };
    let valid = match port.strip_prefix(':') {
        None => port.is_empty(),
        Some(digits) => {
            digits.bytes().all(|b| b.is_ascii_digit())
                && digits.bytes().fold(0u32, |n, b| (n * 10 + u32::from(b - b'0')).min(65536)) <= 65535
        }
    };
    if valid {
        Ok(())
    } else {
        Err(format!("invalid port {port:?} after host"))
    }
}
