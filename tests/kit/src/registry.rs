//! The real distribution registry (Debian's `docker-registry`, `/usr/bin/docker-registry`, installed by
//! `tests/oci/deps.sh`) started on 127.0.0.1 for a test, with a generated `config.yml` and storage in a
//! temporary directory; killed when dropped.
//!
//! ```ignore
//! let registry = Registry::start(RegistryConfig::plain());          // or .tls(), .htpasswd(..), .token(..)
//! let digest = registry.pusher().push(&"m", "v1", &images::oci_artifact(&module))?;
//! let url = registry.oci_url("m:v1");                                  // oci://127.0.0.1:<port>/m:v1
//! assert_eq!(registry.blob_downloads("m", &layer_digest), 1);
//! ```
//!
//! Modes: plain HTTP, TLS (a certificate for `127.0.0.1`/`localhost` from a CA generated here, see
//! [`Registry::ca_file`]), htpasswd basic auth (a bcrypt file written here: distribution accepts only bcrypt),
//! bearer tokens from the kit's [`TokenServer`], and proxy mode (`proxy.remoteurl`: a pull-through mirror of
//! another registry).
//!
//! Counting: a plain-HTTP registry is reached through a small forwarder on another port, which records each
//! request (method, path, auth scheme) before passing it on with `Connection: close`, so counts are exact
//! when the client returns. [`Registry::host`] and [`Registry::oci_url`] name the forwarder; pushes go to the
//! registry directly and are not counted. A TLS registry is reached directly and keeps no counts.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::images::Pusher;
use crate::loopback::{read_head, Loopback, SOCKET_TIMEOUT};
use crate::token::{TokenPolicy, TokenServer};

/// Where Debian's package installs the registry.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
/// How long a registry may take to answer `/v2/` after it was started.
const START_WAIT: Duration = Duration::from_secs(20);
/// The `service` of the token mode (the tokens' audience).
pub const TOKEN_SERVICE: &str = "wasm-ecds-test-registry";

/// How clients authenticate to the registry.
#[derive(Clone, Debug, Default)]
pub enum Auth {
    #[default]
    Anonymous,
    /// `auth.htpasswd`: Basic credentials checked against these `(user, password)` pairs.
    Htpasswd(Vec<(String, String)>),
    /// `auth.token`: bearer tokens from a [`TokenServer`] started with this policy.
    Token(TokenPolicy),
}

/// What registry to start.
#[derive(Clone, Debug, Default)]
pub struct RegistryConfig {
    pub tls: bool,
    pub auth: Auth,
    /// Proxy mode: the registry (its base URL, `http://127.0.0.1:P`) this one mirrors, and the credentials
    /// it uses there.
    pub proxy_remote: Option<(String, Option<(String, String)>)>,
}

impl RegistryConfig {
    /// Plain HTTP, anonymous.
    pub fn plain() -> RegistryConfig {
        RegistryConfig::default()
    }

    /// HTTPS with a certificate from a generated CA.
    pub fn tls(mut self) -> RegistryConfig {
        self.tls = true;
        self
    }

    pub fn htpasswd(mut self, users: &[(&str, &str)]) -> RegistryConfig {
        self.auth = Auth::Htpasswd(pairs(users));
        self
    }

    /// Token auth; `anonymous_pull` lets requests without credentials have pull-only tokens.
    pub fn token(mut self, users: &[(&str, &str)], anonymous_pull: bool) -> RegistryConfig {
        self.auth = Auth::Token(TokenPolicy { users: pairs(users), anonymous_pull });
        self
    }

    /// A pull-through mirror of the registry at `remote_url` (anonymous there).
    pub fn proxy(mut self, remote_url: &str) -> RegistryConfig {
        self.proxy_remote = Some((remote_url.to_string(), None));
        self
    }
}

fn pairs(users: &[(&str, &str)]) -> Vec<(String, String)> {
    users.iter().map(|(u, p)| (u.to_string(), p.to_string())).collect()
}

/// One request that reached a counted registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path, without the query string.
    pub path: String,
    /// The scheme of the `Authorization` header (`Basic`, `Bearer`), never its value.
    pub auth_scheme: Option<String>,
}

/// A running registry; killed when dropped.
pub struct Registry {
    child: Child,
    dir: tempfile::TempDir,
    backend: SocketAddr,
    config: RegistryConfig,
    forwarder: Option<Forwarder>,
    token: Option<TokenServer>,
    ca_pem: Option<String>,
}

impl Registry {
    /// Starts a registry and waits until `/v2/` answers (panics, with the registry's log, if it does not).
    /// The registry is killed when the `Registry` is dropped or the thread that started it ends.
    pub fn start(config: RegistryConfig) -> Registry {
        assert!(
            Path::new(REGISTRY_BIN).exists(),
            "{REGISTRY_BIN} is missing: run tests/oci/deps.sh (make test-rust does)"
        );
        let dir = tempfile::Builder::new().prefix("wasm-ecds-registry-").tempdir().expect("registry dir");
        let token = match &config.auth {
            Auth::Token(policy) => Some(TokenServer::start(policy.clone())),
            _ => None,
        };
        let tls = config.tls.then(|| write_tls_files(dir.path()));
        let mut last_log = String::new();
        // The free port is found by binding and releasing it; another process may take it meanwhile, so a
        // registry that exits at once is started again on another port.
        for _ in 0..5 {
            let port = free_port();
            let backend: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let yml = config_yml(dir.path(), backend, &config, token.as_ref(), tls.is_some());
            let config_path = dir.path().join("config.yml");
            std::fs::write(&config_path, yml).expect("write config.yml");
            let log_path = dir.path().join("registry.log");
            let log = std::fs::File::create(&log_path).expect("registry log");
            let mut command = Command::new(REGISTRY_BIN);
            command
                .arg("serve")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log);
            // A test process killed before its drops run must not leave registries behind: the kernel kills
            // the registry when the thread that started it ends (PR_SET_PDEATHSIG), so a `Registry` lives
            // no longer than the thread that started it.
            // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
            unsafe {
                command.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let mut child = command.spawn().expect("start docker-registry");
            match wait_ready(&mut child, backend, tls.as_ref().map(|t| t.0.as_str())) {
                Ok(()) => {
                    let forwarder = (!config.tls).then(|| Forwarder::start(backend));
                    return Registry { child, dir, backend, config, forwarder, token, ca_pem: tls.map(|t| t.0) };
                }
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_log = format!("{why}\n{}", std::fs::read_to_string(&log_path).unwrap_or_default());
                }
            }
        }
        panic!("docker-registry did not start:\n{last_log}");
    }

    /// `127.0.0.1:<port>` as written in `oci://` URLs (the counting forwarder for plain HTTP).
    pub fn host(&self) -> String {
        match &self.forwarder {
            Some(f) => f.loopback.addr().to_string(),
            None => self.backend.to_string(),
        }
    }

    /// `http://<host>` or `https://<host>`: the endpoint clients (and mirrors' `remoteurl`) use.
    pub fn base_url(&self) -> String {
        let scheme = if self.config.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.host())
    }

    /// `oci://<host>/<reference>`, e.g. `oci_url("repo:tag")` or `oci_url("repo@sha256:…")`.
    pub fn oci_url(&self, reference: &str) -> String {
        format!("oci://{}/{reference}", self.host())
    }

    /// The registry itself, bypassing the counting forwarder (pushes go here).
    pub fn direct_url(&self) -> String {
        let scheme = if self.config.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.backend)
    }

    /// A pusher to this registry with its first user's credentials (if it has users).
    pub fn pusher(&self) -> Pusher {
        let credentials = match &self.config.auth {
            Auth::Anonymous => None,
            Auth::Htpasswd(users) | Auth::Token(TokenPolicy { users, .. }) => users.first().cloned(),
        };
        Pusher::new(&self.direct_url(), credentials, self.ca_pem.as_deref())
    }

    /// The PEM of the CA that issued a TLS registry's certificate.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// The CA file of a TLS registry (for the `ca_file` option); panics for a plain one.
    pub fn ca_file(&self) -> PathBuf {
        assert!(self.config.tls, "not a TLS registry");
        self.dir.path().join("ca.pem")
    }

    /// The token server of a token-auth registry.
    pub fn token_server(&self) -> Option<&TokenServer> {
        self.token.as_ref()
    }

    /// Every request the registry was asked through its `host()`, in order (panics for a TLS registry).
    pub fn requests(&self) -> Vec<Request> {
        self.forwarder.as_ref().expect("a TLS registry keeps no counts").log.lock().unwrap().clone()
    }

    /// How many `method` requests reached exactly `path`.
    pub fn count(&self, method: &str, path: &str) -> usize {
        self.requests().iter().filter(|r| r.method == method && r.path == path).count()
    }

    /// How many `GET /v2/<repo>/blobs/<digest>` there were (`digest` with or without `sha256:`).
    pub fn blob_downloads(&self, repo: &str, digest: &str) -> usize {
        let digest = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.count("GET", &format!("/v2/{repo}/blobs/sha256:{digest}"))
    }

    /// How many blob GETs there were, any repository.
    pub fn all_blob_downloads(&self) -> usize {
        self.requests().iter().filter(|r| r.method == "GET" && r.path.contains("/blobs/")).count()
    }

    /// How many manifest requests (GET or HEAD, any reference) there were for `repo`.
    pub fn manifest_requests(&self, repo: &str) -> usize {
        let prefix = format!("/v2/{repo}/manifests/");
        self.requests().iter().filter(|r| r.path.starts_with(&prefix)).count()
    }

    /// The registry's own log (stdout and stderr) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Polls `/v2/` until it answers with any HTTP status, the registry exits, or [`START_WAIT`] passes.
fn wait_ready(child: &mut Child, backend: SocketAddr, ca_pem: Option<&str>) -> Result<(), String> {
    let agent = crate::images::agent(ca_pem);
    let scheme = if ca_pem.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{backend}/v2/");
    let end = Instant::now() + START_WAIT;
    loop {
        if let Some(status) = child.try_wait().expect("registry status") {
            return Err(format!("the registry exited: {status}"));
        }
        if TcpStream::connect_timeout(&backend, Duration::from_millis(200)).is_ok() && agent.get(&url).call().is_ok() {
            return Ok(());
        }
        if Instant::now() > end {
            return Err(format!("{url} did not answer within {START_WAIT:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes a CA, and a server certificate for `127.0.0.1`/`localhost` it issued, into `dir`: `ca.pem`,
/// `server.pem` (leaf then CA), `server-key.pem`. Returns the CA PEM and the two server file paths.
fn write_tls_files(dir: &Path) -> (String, PathBuf, PathBuf) {
    let ca = crate::server::TestCa::new("wasm-ecds test registry CA");
    let (cert, key) = (dir.join("server.pem"), dir.join("server-key.pem"));
    std::fs::write(dir.join("ca.pem"), &ca.ca_pem).expect("write CA");
    std::fs::write(&cert, format!("{}{}", ca.leaf_pem, ca.ca_pem)).expect("write cert");
    std::fs::write(&key, &ca.key_pem).expect("write key");
    (ca.ca_pem, cert, key)
}

fn config_yml(dir: &Path, addr: SocketAddr, config: &RegistryConfig, token: Option<&TokenServer>, tls: bool) -> String {
    let q = |p: &Path| serde_json::to_string(&p.to_string_lossy()).unwrap();
    let s = |v: &str| serde_json::to_string(v).unwrap();
    let mut yml = format!(
        "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n  secret: wasm-ecds-test-secret\n",
        q(&dir.join("storage"))
    );
    if tls {
        yml.push_str(&format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            q(&dir.join("server.pem")),
            q(&dir.join("server-key.pem"))
        ));
    }
    yml.push_str("health:\n  storagedriver:\n    enabled: false\n");
    match &config.auth {
        Auth::Anonymous => {}
        Auth::Htpasswd(users) => {
            let file = dir.join("htpasswd");
            let lines: String =
                users.iter().map(|(u, p)| format!("{u}:{}\n", bcrypt::hash(p, 4).expect("bcrypt"))).collect();
            std::fs::write(&file, lines).expect("write htpasswd");
            yml.push_str(&format!("auth:\n  htpasswd:\n    realm: wasm-ecds-test\n    path: {}\n", q(&file)));
        }
        Auth::Token(_) => {
            let token = token.expect("token server");
            let bundle = token.write_cert(dir);
            yml.push_str(&format!(
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                s(&token.realm()),
                s(TOKEN_SERVICE),
                s(token.issuer()),
                q(&bundle)
            ));
        }
    }
    if let Some((remote, credentials)) = &config.proxy_remote {
        yml.push_str(&format!("proxy:\n  remoteurl: {}\n", s(remote)));
        if let Some((u, p)) = credentials {
            yml.push_str(&format!("  username: {}\n  password: {}\n", s(u), s(p)));
        }
    }
    yml
}

/// Records each request, then passes it to the registry with `Connection: close` and pipes the answer back.
/// Request bodies are passed on by `Content-Length` only (pulls send none).
struct Forwarder {
    loopback: Loopback,
    log: Arc<Mutex<Vec<Request>>>,
}

impl Forwarder {
    fn start(backend: SocketAddr) -> Forwarder {
        let log: Arc<Mutex<Vec<Request>>> = Arc::default();
        let l = log.clone();
        let loopback = Loopback::start("127.0.0.1:0", move |client| {
            let _ = forward(client, backend, &l);
        });
        Forwarder { loopback, log }
    }
}

fn forward(mut client: TcpStream, backend: SocketAddr, log: &Mutex<Vec<Request>>) -> io::Result<()> {
    // A TLS ClientHello (record type 22) to this plain-HTTP endpoint is recorded as method `TLS` and answered
    // as the registry (Go's net/http) answers it: a plain `400 Bad Request`.
    let mut first = [0u8; 1];
    if client.peek(&mut first)? == 1 && first[0] == 0x16 {
        log.lock().unwrap().push(Request { method: "TLS".into(), path: String::new(), auth_scheme: None });
        client.write_all(
            b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n400 Bad Request",
        )?;
        let _ = client.shutdown(Shutdown::Both);
        return Ok(());
    }
    let Some(head) = read_head(&mut client)? else { return Ok(()) };
    let auth_scheme = head.header("authorization").and_then(|v| v.split_whitespace().next()).map(str::to_string);
    log.lock().unwrap().push(Request {
        method: head.method.clone(),
        path: head.target.split('?').next().unwrap_or("/").to_string(),
        auth_scheme,
    });
    let mut upstream = TcpStream::connect_timeout(&backend, Duration::from_secs(5))?;
    upstream.set_read_timeout(Some(SOCKET_TIMEOUT))?;
    upstream.set_write_timeout(Some(SOCKET_TIMEOUT))?;
    let mut out = format!("{} {} HTTP/1.1\r\n", head.method, head.target);
    for (k, v) in &head.headers {
        if !k.eq_ignore_ascii_case("connection") && !k.eq_ignore_ascii_case("keep-alive") {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    out.push_str("Connection: close\r\n\r\n");
    upstream.write_all(out.as_bytes())?;
    upstream.write_all(&head.rest)?;
    let body_len: u64 = head.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let remaining = body_len.saturating_sub(head.rest.len() as u64);
    if remaining > 0 {
        io::copy(&mut (&client).take(remaining), &mut upstream)?;
    }
    io::copy(&mut upstream, &mut client)?;
    client.flush()?;
    let _ = client.shutdown(Shutdown::Write);
    Ok(())
}
