//! A small bearer-token server on 127.0.0.1 for the distribution registry's `auth.token` mode.
//!
//! The registry answers an anonymous request with `WWW-Authenticate: Bearer realm="<this server>/token",
//! service="…",scope="repository:<name>:pull"`; the client asks this server for a token
//! (`GET /token?service=…&scope=…`, with Basic credentials or without) and retries with
//! `Authorization: Bearer <token>`. The token is the JWT distribution v2.8 verifies
//! (`registry/auth/token/token.go`, `accesscontroller.go`): header `{"typ":"JWT","alg":"ES256","x5c":[<leaf
//! cert, DER, base64>]}`, claims `iss`, `sub`, `aud` (= the service), `exp`, `nbf`, `iat`, `jti` and `access`
//! (`[{"type":"repository","name":…,"actions":[…]}]`), signed with ES256 (raw `r‖s`). The leaf certificate is
//! self-signed and is the registry's `rootcertbundle`, so the `x5c` chain verifies against it.
//!
//! Policy: a request with the right Basic credentials gets every action it asks for; with wrong credentials
//! it gets 401; without credentials it gets 401, or, when anonymous pulls are allowed, a token for `pull`
//! only. Every request is counted and recorded (user, scopes), never the password.

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

use crate::loopback::{read_head, Loopback};

/// Who may have tokens.
#[derive(Clone, Debug, Default)]
pub struct TokenPolicy {
    /// `(user, password)` pairs accepted in Basic credentials.
    pub users: Vec<(String, String)>,
    /// Whether a request without credentials gets a pull-only token.
    pub anonymous_pull: bool,
}

/// One request the token server answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRequest {
    /// The Basic user, if credentials were sent.
    pub user: Option<String>,
    pub service: Option<String>,
    pub scopes: Vec<String>,
    /// The HTTP status answered.
    pub status: u16,
}

struct State {
    policy: TokenPolicy,
    key: EcdsaKeyPair,
    cert_der: Vec<u8>,
    issuer: String,
    log: Mutex<Vec<TokenRequest>>,
    rng: ring::rand::SystemRandom,
}

/// A running token server; stops when dropped.
pub struct TokenServer {
    state: Arc<State>,
    cert_pem: String,
    loopback: Loopback,
}

/// The `iss` claim, which the registry's `auth.token.issuer` must equal.
pub const ISSUER: &str = "wasm-ecds-test-token-issuer";

impl TokenServer {
    pub fn start(policy: TokenPolicy) -> TokenServer {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("token key");
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).expect("key");
        let cert_key = rcgen::KeyPair::try_from(pkcs8.as_ref()).expect("rcgen key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("cert params");
        params.distinguished_name.push(rcgen::DnType::CommonName, "wasm-ecds test token signer");
        let cert = params.self_signed(&cert_key).expect("token signing cert");
        let state = Arc::new(State {
            policy,
            key,
            cert_der: cert.der().to_vec(),
            issuer: ISSUER.to_string(),
            log: Mutex::new(Vec::new()),
            rng,
        });
        let s = state.clone();
        let loopback = Loopback::start("127.0.0.1:0", move |stream| {
            let _ = serve(stream, &s);
        });
        TokenServer { state, cert_pem: cert.pem(), loopback }
    }

    /// `http://127.0.0.1:<port>/token`: the registry's `auth.token.realm`.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.loopback.addr())
    }

    /// The PEM of the signing certificate: the registry's `auth.token.rootcertbundle`.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Writes the signing certificate into `dir` and returns its path.
    pub fn write_cert(&self, dir: &Path) -> PathBuf {
        let path = dir.join("token-signer.pem");
        std::fs::write(&path, &self.cert_pem).expect("write token cert");
        path
    }

    pub fn issuer(&self) -> &str {
        &self.state.issuer
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.state.log.lock().unwrap().clone()
    }

    /// How many requests were answered so far.
    pub fn request_count(&self) -> usize {
        self.state.log.lock().unwrap().len()
    }

    /// A signed token for `service` granting `access` (`(repository name, actions)`), as a test may want to
    /// hand-craft one.
    pub fn token(&self, subject: &str, service: &str, access: &[(&str, &[&str])]) -> String {
        let access: Vec<(String, Vec<String>)> = access
            .iter()
            .map(|(name, actions)| (name.to_string(), actions.iter().map(|a| a.to_string()).collect()))
            .collect();
        sign(&self.state, subject, service, &access)
    }
}

fn serve(mut stream: TcpStream, state: &State) -> std::io::Result<()> {
    let Some(head) = read_head(&mut stream)? else { return Ok(()) };
    let (path, query) = head.target.split_once('?').unwrap_or((head.target.as_str(), ""));
    let mut service = None;
    let mut scopes = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        match k {
            "service" => service = Some(v),
            "scope" => scopes.extend(v.split(' ').filter(|s| !s.is_empty()).map(str::to_string)),
            _ => {}
        }
    }
    let credentials = head
        .header("authorization")
        .and_then(|v| v.strip_prefix("Basic ").or_else(|| v.strip_prefix("basic ")))
        .and_then(|b| STANDARD.decode(b.trim()).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.split_once(':').map(|(u, p)| (u.to_string(), p.to_string())));
    let user = credentials.as_ref().map(|(u, _)| u.clone());
    let granted: Option<(String, bool)> = match &credentials {
        Some((u, p)) => state.policy.users.iter().any(|(pu, pp)| pu == u && pp == p).then(|| (u.clone(), true)),
        None => state.policy.anonymous_pull.then(|| (String::new(), false)),
    };
    let (status, body) = match (path, granted) {
        ("/token", Some((subject, full))) => {
            let access: Vec<(String, Vec<String>)> = scopes
                .iter()
                .filter_map(|scope| {
                    // `repository:<name>:<actions>`; the name holds no ':' (distribution's reference grammar).
                    let (kind, rest) = scope.split_once(':')?;
                    let (name, actions) = rest.rsplit_once(':')?;
                    if kind != "repository" {
                        return None;
                    }
                    let actions: Vec<String> =
                        actions.split(',').filter(|a| full || *a == "pull").map(str::to_string).collect();
                    Some((name.to_string(), actions))
                })
                .collect();
            let token = sign(state, &subject, service.as_deref().unwrap_or(""), &access);
            let body = serde_json::json!({"token": token, "access_token": token, "expires_in": 300}).to_string();
            (200, body)
        }
        ("/token", None) => (401, r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#.into()),
        _ => (404, "not found\n".to_string()),
    };
    state.log.lock().unwrap().push(TokenRequest { user, service, scopes, status });
    let reason = match status {
        200 => "OK",
        401 => "Unauthorized",
        _ => "Not Found",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status == 401 {
        head.push_str("WWW-Authenticate: Basic realm=\"token\"\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(())
}

fn sign(state: &State, subject: &str, service: &str, access: &[(String, Vec<String>)]) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [STANDARD.encode(&state.cert_der)]});
    let access: Vec<serde_json::Value> = access
        .iter()
        .map(|(name, actions)| serde_json::json!({"type": "repository", "name": name, "actions": actions}))
        .collect();
    let claims = serde_json::json!({
        "iss": state.issuer,
        "sub": subject,
        "aud": service,
        "exp": now + 300,
        "nbf": now - 10,
        "iat": now,
        "jti": format!("{now}-{}", next_id()),
        "access": access,
    });
    let signing_input =
        format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
    let signature = state.key.sign(&state.rng, signing_input.as_bytes()).expect("ES256 signature");
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
}

/// A process-unique number for `jti`.
fn next_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// `%XX` and `+` decoding of a query value.
pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
