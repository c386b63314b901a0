//! The HTTP client HTTP modules and OCI registries share: the secure and insecure ureq agents behind the SSRF
//! guard, `ca_file`'s roots, `insecure_hosts`, and Istio's retry loop with backoff, bounded by a deadline.
//!
//! Istio's `HTTPFetcher` (`pkg/wasm/httpfetcher.go`): a secure and an insecure client, `GET` with up to 10
//! redirects, up to `max_attempts` attempts; transport errors and 5xx other than 501/505/511 are retried with
//! exponential backoff (×1.5, ±50 % jitter, capped); any other status stops at once. Unlike Istio, the backoff
//! sleeps end at the deadline.

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ureq::http::Uri;
use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig};
use ureq::unversioned::transport::{Connector, DefaultConnector};
use ureq::{Agent, Proxy};

use super::{FetchError, FetchErrorKind};
use crate::guard::{AddressPolicy, GuardedResolver, ProxiedTargetGuard};
use crate::options::Options;

/// Redirects followed per request, as Go's default client.
pub(crate) const MAX_REDIRECTS: u32 = 10;
/// The most a response's status line and headers (a redirect's `Location` included) may take. ureq's default,
/// named here because it bounds what a server can make the client buffer; Go allows 1 MiB, no module server
/// or registry needs more than a few KiB.
pub(crate) const MAX_RESPONSE_HEAD_BYTES: usize = 64 * 1024;
/// Per-attempt timeout when the options say zero (Istio's `NewHTTPFetcher` does the same).
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The agents and the rules to use them by. Cheap to share (`Arc`) between the HTTP and OCI fetchers.
pub(crate) struct Client {
    /// The secure and the insecure agent, built on first use: loading the system trust store costs
    /// milliseconds (hundreds of files), which a process serving only cached modules never needs to pay.
    agents: OnceLock<(Agent, Agent)>,
    /// `ca_file`'s certificates, read (and checked) when the client is made.
    ca_certs: Vec<Certificate<'static>>,
    proxy: Option<Proxy>,
    policy: AddressPolicy,
    insecure_hosts: Vec<String>,
    request_timeout: Duration,
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
}

/// How one attempt ended, when it did not produce what it was for.
pub(crate) enum AttemptError<F> {
    /// Worth another attempt (transport error, retryable status, body cut short).
    Retry(String),
    /// Not worth another attempt (a status that is not retried): stop, reporting it as the last error.
    Stop(String),
    /// Ends the loop at once with something the caller handles (too large, disk error, a challenge).
    Fatal(F),
}

/// How a retry loop ended without a result.
pub(crate) enum GaveUp<F> {
    /// Attempts ran out, the deadline came, or an attempt said stop.
    Failed {
        attempts: u32,
        last_error: String,
    },
    Fatal(F),
}

impl Client {
    /// Agents that use `proxy` (the callers pass `Proxy::try_from_env()`: `ALL_PROXY`/`HTTPS_PROXY`/
    /// `HTTP_PROXY`, first set wins, except hosts in `NO_PROXY`). The SSRF rules apply to the proxy's address
    /// and to every target before the proxy is asked for it (see `guard`). Fails only when `ca_file` cannot be
    /// loaded.
    pub fn new(options: &Options, proxy: Option<Proxy>) -> Result<Client, FetchError> {
        let ca_certs = match options.ca_file.as_deref() {
            Some(path) => ca_file_certs(path)?,
            None => Vec::new(),
        };
        let request_timeout =
            if options.http_request_timeout.is_zero() { DEFAULT_REQUEST_TIMEOUT } else { options.http_request_timeout };
        Ok(Client {
            agents: OnceLock::new(),
            ca_certs,
            proxy,
            policy: AddressPolicy::new(options.blocked_cidrs.clone()),
            insecure_hosts: options.insecure_hosts.clone(),
            request_timeout,
            max_attempts: options.max_attempts.max(1),
            initial_backoff: options.retry_initial_backoff,
            max_backoff: options.retry_max_backoff,
        })
    }

    /// The SSRF rules every connection follows.
    pub fn policy(&self) -> &AddressPolicy {
        &self.policy
    }

    /// The agent for `uri`: the one that skips certificate verification when its `host[:port]`, exactly as
    /// written, is in `insecure_hosts` or `insecure_hosts` holds `*`; else the verifying one.
    pub fn agent_for(&self, uri: &Uri) -> &Agent {
        let (secure, insecure) = self.agents();
        if self.is_insecure(uri) {
            insecure
        } else {
            secure
        }
    }

    fn is_insecure(&self, uri: &Uri) -> bool {
        let Some(authority) = uri.authority() else { return false };
        let host_port = authority.as_str().rsplit('@').next().unwrap_or_default();
        self.insecure_hosts.iter().any(|h| h == "*" || h.eq_ignore_ascii_case(host_port))
    }

    fn agents(&self) -> &(Agent, Agent) {
        self.agents.get_or_init(|| {
            let roots = root_certs(&self.ca_certs);
            let agent = |tls: TlsConfig| {
                let config = Agent::config_builder()
                    .http_status_as_error(false)
                    .max_redirects(MAX_REDIRECTS)
                    .max_response_header_size(MAX_RESPONSE_HEAD_BYTES)
                    .max_redirects_will_error(true)
                    // Said out loud although it is ureq's default: a registry's `Authorization` must not follow
                    // a blob redirect to object storage (another host) — nor anywhere else.
                    .redirect_auth_headers(ureq::config::RedirectAuthHeaders::Never)
                    .proxy(self.proxy.clone())
                    .tls_config(tls)
                    .user_agent(concat!("wasm-ecds/", env!("CARGO_PKG_VERSION")))
                    .build();
                // The SSRF rules: the resolver checks every host ureq resolves, the guard in front of the
                // connectors every target handed to a proxy (see `guard`).
                let connector = ProxiedTargetGuard::new(self.policy.clone()).chain(DefaultConnector::new());
                Agent::with_parts(config, connector, GuardedResolver::new(self.policy.clone()))
            };
            let secure = agent(TlsConfig::builder().root_certs(roots.clone()).build());
            let insecure = agent(TlsConfig::builder().root_certs(roots).disable_verification(true).build());
            (secure, insecure)
        })
    }

    /// Runs `attempt` (given the timeout for its whole exchange, body included: the per-request timeout or
    /// what is left before `deadline`, whichever is shorter) until it succeeds, stops, or the attempts or the
    /// time run out, sleeping the backoff between attempts. `what` names the request in debug logs.
    pub fn retrying<T, F>(
        &self,
        deadline: Instant,
        what: &str,
        mut attempt: impl FnMut(Duration) -> Result<T, AttemptError<F>>,
    ) -> Result<T, GaveUp<F>> {
        let mut backoff = Backoff::new(self.initial_backoff, self.max_backoff);
        let mut attempts = 0u32;
        let last_error = loop {
            attempts += 1;
            let result = match remaining(deadline) {
                None => Err(AttemptError::Retry("deadline exceeded".to_string())),
                Some(remaining) => attempt(remaining.min(self.request_timeout)),
            };
            let message = match result {
                Ok(value) => return Ok(value),
                Err(AttemptError::Fatal(f)) => return Err(GaveUp::Fatal(f)),
                Err(AttemptError::Stop(message)) => break message,
                Err(AttemptError::Retry(message)) => message,
            };
            log::debug!("{what}: attempt {attempts} failed: {message}");
            if attempts >= self.max_attempts {
                break message;
            }
            // Sleep the backoff unless it ends at or past the deadline: then no attempt could follow, so stop
            // now rather than sleep until the deadline.
            let Some(remaining) = remaining(deadline) else { break message };
            let pause = backoff.next();
            if pause >= remaining {
                break message;
            }
            std::thread::sleep(pause);
        };
        Err(GaveUp::Failed { attempts, last_error })
    }
}

/// The time left before `deadline`, `None` when it has come.
fn remaining(deadline: Instant) -> Option<Duration> {
    deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())
}

/// Istio's `retryable`: 5xx except 501 Not Implemented, 505 HTTP Version Not Supported and 511 Network
/// Authentication Required.
pub(crate) fn retryable(status: u16) -> bool {
    status >= 500 && !matches!(status, 501 | 505 | 511)
}

/// An error as an operator reads it: without ureq's variant prefixes where they add nothing.
pub(crate) fn describe(e: &ureq::Error, timeout: Duration) -> String {
    match e {
        ureq::Error::Timeout(_) => format!("request timed out after {timeout:?}"),
        ureq::Error::Io(io) => match io.kind() {
            std::io::ErrorKind::TimedOut => format!("request timed out after {timeout:?}"),
            std::io::ErrorKind::UnexpectedEof => {
                "connection closed by the server before a complete response".to_string()
            }
            _ => io.to_string(),
        },
        ureq::Error::Other(other) => other.to_string(),
        ureq::Error::TooManyRedirects => format!("stopped after {MAX_REDIRECTS} redirects"),
        ureq::Error::LargeResponseHeader(..) => {
            format!("the response's status line and headers exceed the limit of {MAX_RESPONSE_HEAD_BYTES} bytes")
        }
        other => other.to_string(),
    }
}

/// The trust roots: the system's, plus the certificates of `ca_file`. With neither (no system store found and
/// no `ca_file`), the Mozilla roots bundled with ureq.
fn root_certs(ca_certs: &[Certificate<'static>]) -> RootCerts {
    let mut certs: Vec<Certificate<'static>> = Vec::new();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        log::debug!("loading the system trust store: {e}");
    }
    certs.extend(native.certs.iter().map(|c| Certificate::from_der(c.as_ref()).to_owned()));
    certs.extend(ca_certs.iter().cloned());
    if certs.is_empty() {
        log::debug!("no system trust store found; using the bundled Mozilla roots");
        return RootCerts::WebPki;
    }
    RootCerts::new_with_certs(&certs)
}

/// The most `ca_file` may hold. PEM roots are far smaller (the whole Mozilla bundle is about 220 KiB); the limit
/// keeps a mistaken path (a log, a device) from being read into memory.
const MAX_CA_FILE_BYTES: u64 = 4 << 20;

/// `O_NONBLOCK` of `<fcntl.h>` (the crate has no libc dependency): opening a FIFO with it returns at once
/// instead of waiting for a writer. Linux's generic value and MIPS's and SPARC's own; the BSDs' and macOS's.
/// Other targets open without it.
#[cfg(unix)]
const O_NONBLOCK: i32 = if cfg!(any(target_os = "linux", target_os = "android")) {
    if cfg!(any(target_arch = "mips", target_arch = "mips64", target_arch = "mips32r6", target_arch = "mips64r6")) {
        0o200
    } else if cfg!(any(target_arch = "sparc", target_arch = "sparc64")) {
        0x4000
    } else {
        0o4000
    }
} else if cfg!(any(
    target_os = "macos",
    target_os = "ios",
    target_os = "freebsd",
    target_os = "netbsd",
    target_os = "openbsd",
    target_os = "dragonfly"
)) {
    0x4
} else {
    0
};

/// The bytes of `ca_file`: a regular file (checked on the opened handle, so a FIFO, a device such as
/// `/dev/zero` or a directory is refused before anything is read) of at most [`MAX_CA_FILE_BYTES`].
fn read_ca_file(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, O_NONBLOCK);
    let file = options.open(path).map_err(|e| e.to_string())?;
    if !file.metadata().map_err(|e| e.to_string())?.is_file() {
        return Err("not a regular file".to_string());
    }
    let mut pem = Vec::new();
    file.take(MAX_CA_FILE_BYTES + 1).read_to_end(&mut pem).map_err(|e| e.to_string())?;
    if pem.len() as u64 > MAX_CA_FILE_BYTES {
        return Err(format!("larger than the limit of {MAX_CA_FILE_BYTES} bytes for PEM roots"));
    }
    Ok(pem)
}

/// The certificates of `ca_file` (PEM): at least one, each a DER SEQUENCE.
fn ca_file_certs(path: &Path) -> Result<Vec<Certificate<'static>>, FetchError> {
    let mut certs: Vec<Certificate<'static>> = Vec::new();
    {
        let tls_error =
            |why: String| FetchError::new(FetchErrorKind::Io, format!("cannot load ca_file {}: {why}", path.display()));
        let pem = read_ca_file(path).map_err(tls_error)?;
        let mut found = 0;
        for item in ureq::tls::parse_pem(&pem) {
            match item {
                Ok(PemItem::Certificate(cert)) => {
                    if !is_der_sequence(cert.der()) {
                        return Err(tls_error("a certificate is not valid DER".to_string()));
                    }
                    certs.push(cert);
                    found += 1;
                }
                Ok(_) => {}
                Err(e) => return Err(tls_error(e.to_string())),
            }
        }
        if found == 0 {
            return Err(tls_error("no PEM certificate found".to_string()));
        }
    }
    Ok(certs)
}

/// A cheap sanity check of a certificate: one DER SEQUENCE spanning exactly the bytes.
fn is_der_sequence(der: &[u8]) -> bool {
    if der.len() < 2 || der[0] != 0x30 {
        return false;
    }
    let (len, header) = match der[1] {
        n if n < 0x80 => (n as usize, 2),
        n => {
            let count = (n & 0x7f) as usize;
            if count == 0 || count > 4 || der.len() < 2 + count {
                return false;
            }
            (der[2..2 + count].iter().fold(0usize, |acc, b| (acc << 8) | *b as usize), 2 + count)
        }
    };
    header + len == der.len()
}

/// Exponential backoff as Istio's (cenkalti/backoff): start at `initial`, ×1.5 per step, each pause drawn
/// uniformly within ±50 % of the current interval, intervals and pauses capped at `max`.
struct Backoff {
    current: Duration,
    max: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff { current: initial.min(max), max }
    }

    fn next(&mut self) -> Duration {
        let base = self.current.as_secs_f64();
        let pause = base * (0.5 + fastrand::f64()); // [0.5, 1.5) × current
        self.current = Duration::from_secs_f64((base * 1.5).min(self.max.as_secs_f64()));
        Duration::from_secs_f64(pause).min(self.max)
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    pub(crate) struct TestBackoff(Backoff);

    impl TestBackoff {
        pub(crate) fn next(&mut self) -> Duration {
            self.0.next()
        }
    }

    pub(crate) fn backoff(initial: Duration, max: Duration) -> TestBackoff {
        TestBackoff(Backoff::new(initial, max))
    }
}
