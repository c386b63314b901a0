//! Registry authentication: pull secrets (a docker `config.json`), `WWW-Authenticate` challenges, the token
//! endpoint's answer, and the safety check of a bearer realm before anything is sent to it.
//!
//! **Pull secrets** follow Istio's `wasmKeyChain` (`pkg/wasm/imagefetcher.go`), which loads the secret with
//! docker cli's `ConfigFile.LoadFromReader` and looks the registry up with `GetAuthConfig`
//! (`cli/config/configfile/file.go`, `cli/config/credentials/file_store.go`):
//! - no secret, or an empty (all-whitespace) one: anonymous (an empty `ISTIO_META_WASM_IMAGE_PULL_SECRET` never
//!   gets here: the conversion fails it first with Istio's "missing image pulling secret"); the JSON literal
//!   `null` is an error (Istio refuses it before docker's loader sees it); more than 1 MiB is refused;
//! - field names match case-insensitively, an exact match first (Go's `encoding/json`);
//! - every entry of `auths` is decoded, so a broken `auth` in any entry makes the secret unusable
//!   (`LoadFromReader`); `auth` is standard base64 (line breaks ignored) of `user:password`, split at the
//!   first `:`, the user not empty, NULs trimmed from the password (`decodeAuth`); when `auth` is set it
//!   wins over `username`/`password`;
//! - the entry is the one keyed exactly by the registry, else the first (in key order) whose key's host
//!   (scheme, user info and path stripped: `ConvertToHostname`) is the registry, compared ignoring ASCII
//!   case; Docker Hub (`index.docker.io`) is keyed `https://index.docker.io/v1/` (`getAuthConfigKey`,
//!   ggcr `authn.DefaultAuthKey`), and — beyond docker, which then finds nothing — a key whose host is
//!   `index.docker.io` or `docker.io` also counts;
//! - no entry, or an entry with nothing in it, means anonymous (Istio turns an empty `AuthConfig` into
//!   `authn.Anonymous`);
//! - not supported: `identitytoken` (an OAuth2 refresh token that ggcr exchanges with `grant_type=
//!   refresh_token`) and `registrytoken` (a bearer token sent as is). ggcr prefers them over a password,
//!   so an entry holding one is an error that says so instead of a silent anonymous or basic pull that
//!   would fail later with a vaguer reason. `credsStore`/`credHelpers` (programs docker would run) are
//!   ignored.
//!
//! No error text contains any byte of the secret: JSON errors give only the kind and position.
//!
//! **Challenges** are parsed as RFC 7235 section 4.1 `WWW-Authenticate` values: one or more comma-separated
//! challenges per value, a case-insensitive scheme, then `name=token` or `name="quoted \"string\""`
//! parameters (names case-insensitive). Bearer (with a `realm`) is answered before Basic, as the
//! distribution token spec (`docs/spec/auth/token.md`) expects; other schemes are ignored. A header value
//! over 8 KiB is ignored.
//!
//! **Bearer realms** are checked before any request goes there (Istio's `validateRealmURL`): http or
//! https, a host, no user info, at most 2 KiB. A literal IP is judged by the SSRF policy; a name is
//! resolved here and every address must pass (a name that does not resolve is refused). This differs
//! from Istio, which refuses every private and loopback IP literal and the name `localhost`: here those are
//! allowed unless `blocked_cidrs` lists them, as for module URLs (a registry's token server often lives
//! beside it). `metadata.google.internal` is refused by name, as Istio does. The connection itself goes
//! through the guarded resolver as well, which catches a name whose answer changes after this check.
//!
//! **Token answers** follow the distribution token spec and ggcr (`pkg/v1/remote/transport/bearer.go`):
//! `token`, else `access_token`; at most 1 MiB; no error text contains the body.

use std::fmt;
use std::net::{IpAddr, ToSocketAddrs};

use base64::Engine;
use serde_json::{Map, Value};
use ureq::http::Uri;

use super::reference::DOCKER_HUB;
use crate::guard::AddressPolicy;

const MAX_PULL_SECRET_BYTES: usize = 1 << 20;
const MAX_CHALLENGE_BYTES: usize = 8 << 10;
const MAX_REALM_BYTES: usize = 2 << 10;
const MAX_TOKEN_RESPONSE_BYTES: usize = 1 << 20;
/// Docker Hub's key in a docker `config.json` (docker cli `authConfigKey`, ggcr `authn.DefaultAuthKey`).
const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";
/// How much of an `auths` key an error shows (keys are registry names, not secrets, but unbounded).
const MAX_KEY_SHOWN: usize = 100;

/// A user name and password for one registry. Never printed: `Debug` redacts the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

/// The credentials a pull secret holds for `registry` (`host[:port]` as in the URL, or a mirror's host),
/// `Ok(None)` for anonymous access (no secret, an empty one, or no entry for this registry). An error says
/// why the secret is unusable and never contains any of it.
pub(crate) fn credentials_for(pull_secret: Option<&[u8]>, registry: &str) -> Result<Option<Credentials>, String> {
    let Some(secret) = pull_secret else { return Ok(None) };
    if secret.len() > MAX_PULL_SECRET_BYTES {
        return Err(format!("the pull secret is larger than {MAX_PULL_SECRET_BYTES} bytes"));
    }
    let secret = secret.trim_ascii();
    if secret.is_empty() {
        return Ok(None);
    }
    if secret == b"null" {
        return Err("the pull secret is the JSON literal null".to_string());
    }
    let config = serde_json::from_slice::<Value>(secret).map_err(|e| json_error("the pull secret", &e))?;
    let Value::Object(config) = config else {
        return Err("the pull secret is not a JSON object (a docker config.json)".to_string());
    };
    let auths = match field(&config, "auths") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(auths)) => auths,
        Some(_) => return Err("the pull secret's \"auths\" is not an object".to_string()),
    };
    // Decode every entry first, as docker's loader does.
    let entries = auths
        .iter()
        .map(|(key, value)| Ok((key.as_str(), Entry::decode(key, value)?)))
        .collect::<Result<Vec<_>, String>>()?;
    let docker_hub = matches!(registry, DOCKER_HUB | "docker.io");
    let exact = if docker_hub { DOCKER_HUB_KEY } else { registry };
    let host_matches = |key: &str| {
        let host = key_host(key);
        if docker_hub {
            host.eq_ignore_ascii_case("index.docker.io") || host.eq_ignore_ascii_case("docker.io")
        } else {
            host.eq_ignore_ascii_case(registry)
        }
    };
    let found =
        entries.iter().find(|(key, _)| *key == exact).or_else(|| entries.iter().find(|(key, _)| host_matches(key)));
    let Some((_, entry)) = found else { return Ok(None) };
    if entry.has_token {
        return Err(format!(
            "the pull secret's entry for {registry} holds an identitytoken or registrytoken, which is not supported: \
             give \"auth\" or \"username\" and \"password\""
        ));
    }
    if entry.username.is_empty() && entry.password.is_empty() {
        return Ok(None);
    }
    Ok(Some(Credentials { username: entry.username.clone(), password: entry.password.clone() }))
}

/// One `auths` entry, decoded.
struct Entry {
    username: String,
    password: String,
    has_token: bool,
}

impl Entry {
    fn decode(key: &str, value: &Value) -> Result<Entry, String> {
        let empty = Map::new();
        let fields = match value {
            Value::Object(fields) => fields,
            Value::Null => &empty,
            _ => return Err(format!("the pull secret's entry {} is not an object", shown_key(key))),
        };
        let text = |name: &str| match field(fields, name) {
            None | Some(Value::Null) => Ok(""),
            Some(Value::String(s)) => Ok(s.as_str()),
            Some(_) => Err(format!("the pull secret's entry {} has a {name:?} that is not a string", shown_key(key))),
        };
        let has_token = !text("identitytoken")?.is_empty() || !text("registrytoken")?.is_empty();
        let auth = text("auth")?;
        let (username, password) = if auth.is_empty() {
            (text("username")?.to_string(), text("password")?.to_string())
        } else {
            decode_auth(auth).map_err(|why| format!("the pull secret's entry {}: {why}", shown_key(key)))?
        };
        Ok(Entry { username, password, has_token })
    }
}

/// docker cli's `decodeAuth`: base64 of `user:password`.
fn decode_auth(auth: &str) -> Result<(String, String), &'static str> {
    let cleaned: String = auth.chars().filter(|c| !matches!(c, '\r' | '\n')).collect();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(cleaned.as_bytes())
        .map_err(|_| "\"auth\" is not valid base64")?;
    let decoded = String::from_utf8(decoded).map_err(|_| "\"auth\" does not decode to UTF-8 text")?;
    match decoded.split_once(':') {
        Some((user, password)) if !user.is_empty() => Ok((user.to_string(), password.trim_matches('\0').to_string())),
        _ => Err("\"auth\" is not base64 of user:password"),
    }
}

/// A JSON object's field, named exactly or else ignoring ASCII case (Go's `encoding/json`).
fn field<'a>(object: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    object.get(name).or_else(|| object.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v))
}

/// The host of an `auths` key (docker cli's `ConvertToHostname`): `https://host:port/v1/` → `host:port`.
fn key_host(key: &str) -> &str {
    let rest = key.split_once("://").map_or(key, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    authority.rsplit_once('@').map_or(authority, |(_, host)| host)
}

fn shown_key(key: &str) -> String {
    match key.char_indices().nth(MAX_KEY_SHOWN) {
        Some((end, _)) => format!("{:?}…", &key[..end]),
        None => format!("{key:?}"),
    }
}

/// A JSON error as its kind and position only: serde_json's message could quote the input.
fn json_error(what: &str, e: &serde_json::Error) -> String {
    let kind = match e.classify() {
        serde_json::error::Category::Eof => "it ends early",
        serde_json::error::Category::Syntax | serde_json::error::Category::Io => "syntax error",
        serde_json::error::Category::Data => "invalid data",
    };
    format!("{what} is not valid JSON: {kind} at line {} column {}", e.line(), e.column())
}

/// What a registry's `401` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer { realm: String, service: Option<String>, scope: Option<String> },
}

/// The challenge to answer among a `401`'s `WWW-Authenticate` header values: Bearer before Basic; `None`
/// when none is understood.
pub(crate) fn parse_challenges<'a>(values: impl IntoIterator<Item = &'a str>) -> Option<Challenge> {
    let mut basic = false;
    for value in values {
        if value.len() > MAX_CHALLENGE_BYTES {
            continue;
        }
        for (scheme, params) in split_challenges(value) {
            if scheme.eq_ignore_ascii_case("bearer") {
                let param =
                    |name: &str| params.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone());
                if let Some(realm) = param("realm").filter(|r| !r.is_empty()) {
                    return Some(Challenge::Bearer { realm, service: param("service"), scope: param("scope") });
                }
            } else if scheme.eq_ignore_ascii_case("basic") {
                basic = true;
            }
        }
    }
    basic.then_some(Challenge::Basic)
}

/// The challenges in one header value: (scheme, parameters). Lenient: a token68 or junk is skipped; an
/// unterminated quoted string ends the value (the challenge it is in is dropped).
fn split_challenges(value: &str) -> Vec<(&str, Vec<(&str, String)>)> {
    let mut cursor = Cursor { s: value, i: 0 };
    let mut challenges = Vec::new();
    loop {
        cursor.skip(|b| b == b',' || is_space(b));
        let scheme = cursor.token();
        if scheme.is_empty() {
            // The end, or junk where a scheme should be.
            if cursor.skip_past_comma() {
                continue;
            }
            return challenges;
        }
        let mut params = Vec::new();
        loop {
            let before = cursor.i;
            cursor.skip(|b| b == b',' || is_space(b));
            let name = cursor.token();
            if name.is_empty() {
                if cursor.skip_past_comma() {
                    continue;
                }
                break;
            }
            cursor.skip(is_space);
            if cursor.peek() != Some(b'=') {
                // A token without '=': the next challenge's scheme (or a token68, skipped as one).
                cursor.i = before;
                break;
            }
            cursor.i += 1;
            cursor.skip(is_space);
            let value = if cursor.peek() == Some(b'"') {
                match cursor.quoted() {
                    Some(v) => v,
                    None => return challenges,
                }
            } else {
                cursor.take(|b| b != b',' && !is_space(b)).to_string()
            };
            params.push((name, value));
        }
        challenges.push((scheme, params));
    }
}

struct Cursor<'a> {
    s: &'a str,
    i: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.i).copied()
    }

    /// Takes bytes while `keep` holds. Every caller stops at an ASCII byte or the end, so the slice ends
    /// on a char boundary.
    fn take(&mut self, keep: impl Fn(u8) -> bool) -> &'a str {
        let start = self.i;
        while self.peek().is_some_and(&keep) {
            self.i += 1;
        }
        &self.s[start..self.i]
    }

    fn skip(&mut self, skip: impl Fn(u8) -> bool) {
        self.take(skip);
    }

    fn token(&mut self) -> &'a str {
        self.take(is_tchar)
    }

    /// Skips to just past the next comma; false at the end.
    fn skip_past_comma(&mut self) -> bool {
        self.take(|b| b != b',');
        if self.peek() == Some(b',') {
            self.i += 1;
            true
        } else {
            false
        }
    }

    /// A quoted-string starting at the opening quote, unescaped; `None` if it never closes.
    fn quoted(&mut self) -> Option<String> {
        let mut out = String::new();
        let mut chars = self.s[self.i + 1..].char_indices();
        while let Some((at, c)) = chars.next() {
            match c {
                '"' => {
                    self.i += 1 + at + 1;
                    return Some(out);
                }
                '\\' => out.push(chars.next()?.1),
                c => out.push(c),
            }
        }
        None
    }
}

fn is_space(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// RFC 7230 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The bearer realm as a URL, if it is safe to send a token request (and maybe credentials) to: http(s),
/// with a host, and no address the SSRF rules refuse (link-local, metadata, unspecified, `blocked_cidrs`):
/// literal IPs are checked directly, host names by resolving them here. The error is the reason.
/// Resolution is synchronous, bounded by the system resolver's own timeout (as in `guard.rs`).
pub(crate) fn check_realm(realm: &str, policy: &AddressPolicy) -> Result<Uri, String> {
    if realm.len() > MAX_REALM_BYTES {
        return Err(format!("rejected unsafe bearer realm: longer than {MAX_REALM_BYTES} bytes"));
    }
    let refuse = |why: String| format!("rejected unsafe bearer realm {realm:?}: {why}");
    // The URI parser refuses `file:///x` and `https:///t` as merely malformed; say what is wrong.
    if let Some((scheme, rest)) = realm.split_once("://") {
        if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
            return Err(refuse(format!("scheme {scheme:?} is not allowed, only http and https")));
        }
        if rest.is_empty() || rest.starts_with(['/', '?', '#']) {
            return Err(refuse("no host".to_string()));
        }
    }
    let uri: Uri = realm.parse().map_err(|e| refuse(format!("not a URL: {e}")))?;
    let default_port = match uri.scheme_str() {
        Some("http") => 80,
        Some("https") => 443,
        Some(other) => return Err(refuse(format!("scheme {other:?} is not allowed, only http and https"))),
        None => return Err(refuse("not an absolute http(s) URL".to_string())),
    };
    let Some(authority) = uri.authority() else { return Err(refuse("no host".to_string())) };
    if authority.as_str().contains('@') {
        return Err(refuse("user info is not allowed".to_string()));
    }
    let host = authority.host();
    if host.is_empty() {
        return Err(refuse("no host".to_string()));
    }
    let literal = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if let Ok(ip) = literal.parse::<IpAddr>() {
        policy.check(ip).map_err(refuse)?;
        return Ok(uri);
    }
    if host.trim_end_matches('.').eq_ignore_ascii_case("metadata.google.internal") {
        return Err(refuse("the host is the cloud metadata service".to_string()));
    }
    let port = uri.port_u16().unwrap_or(default_port);
    let addrs: Vec<_> =
        (host, port).to_socket_addrs().map_err(|e| refuse(format!("cannot resolve {host}: {e}")))?.collect();
    if addrs.is_empty() {
        return Err(refuse(format!("{host} resolves to no address")));
    }
    for addr in addrs {
        policy.check(addr.ip()).map_err(refuse)?;
    }
    Ok(uri)
}

/// The token in a token endpoint's JSON answer (`token`, else `access_token`).
pub(crate) fn parse_token_response(body: &[u8]) -> Result<String, String> {
    if body.len() > MAX_TOKEN_RESPONSE_BYTES {
        return Err(format!("the token endpoint's answer is larger than {MAX_TOKEN_RESPONSE_BYTES} bytes"));
    }
    let answer = serde_json::from_slice::<Value>(body).map_err(|e| json_error("the token endpoint's answer", &e))?;
    let Value::Object(answer) = answer else {
        return Err("the token endpoint's answer is not a JSON object".to_string());
    };
    let text = |name: &str| match answer.get(name) {
        None | Some(Value::Null) => Ok(""),
        Some(Value::String(s)) => Ok(s.as_str()),
        Some(_) => Err(format!("the token endpoint's answer has a {name:?} that is not a string")),
    };
    let token = match text("token")? {
        "" => text("access_token")?,
        token => token,
    };
    if token.is_empty() {
        return Err("the token endpoint's answer holds no token".to_string());
    }
    // It goes into an Authorization header: visible ASCII only.
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the token endpoint's answer holds a token that is not visible ASCII".to_string());
    }
    Ok(token.to_string())
}

/// The token request URL: the realm with `service` and `scope` added to its query (distribution token
/// spec, "Requesting a Token"). Without a scope in the challenge, pull access to `repository` is asked for
/// (ggcr asks for `repository:<repo>:pull` too).
pub(crate) fn token_url(realm: &Uri, service: Option<&str>, scope: Option<&str>, repository: &str) -> String {
    let mut url = realm.to_string();
    let default_scope = format!("repository:{repository}:pull");
    let scope = scope.filter(|s| !s.is_empty()).unwrap_or(&default_scope);
    let params = service.filter(|s| !s.is_empty()).map(|s| ("service", s)).into_iter().chain([("scope", scope)]);
    for (name, value) in params {
        if !url.ends_with(['?', '&']) {
            url.push(if url.contains('?') { '&' } else { '?' });
        }
        url.push_str(name);
        url.push('=');
        percent_encode(value, &mut url);
    }
    url
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(value: &str, out: &mut String) {
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// The `Authorization` header value for basic auth.
pub(crate) fn basic_header(c: &Credentials) -> String {
    let pair = format!("{}:{}", c.username, c.password);
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn creds(username: &str, password: &str) -> Option<Credentials> {
        Some(Credentials { username: username.into(), password: password.into() })
    }

    fn secret_for(key: &str, entry: &str) -> String {
        format!(r#"{{"auths":{{{key:?}:{entry}}}}}"#)
    }

    #[test]
    fn anonymous_without_a_usable_secret() {
        assert_eq!(credentials_for(None, "ghcr.io"), Ok(None));
        for secret in ["", "  \n\t", "{}", r#"{"auths":null}"#, r#"{"auths":{}}"#, r#"{"credsStore":"desktop"}"#] {
            assert_eq!(credentials_for(Some(secret.as_bytes()), "ghcr.io"), Ok(None), "{secret:?}");
        }
        // an entry for another registry, an empty entry, a null entry
        let auth = format!(r#"{{"auth":"{}"}}"#, b64("u:p"));
        assert_eq!(credentials_for(Some(secret_for("quay.io", &auth).as_bytes()), "ghcr.io"), Ok(None));
        assert_eq!(credentials_for(Some(secret_for("ghcr.io", "{}").as_bytes()), "ghcr.io"), Ok(None));
        let empty = r#"{"auth":"","username":"","password":"","email":"x@y"}"#;
        assert_eq!(credentials_for(Some(secret_for("ghcr.io", empty).as_bytes()), "ghcr.io"), Ok(None));
        assert_eq!(credentials_for(Some(secret_for("ghcr.io", "null").as_bytes()), "ghcr.io"), Ok(None));
        // a port is part of the registry
        assert_eq!(credentials_for(Some(secret_for("ghcr.io:5000", &auth).as_bytes()), "ghcr.io"), Ok(None));
    }

    #[test]
    fn both_secret_forms() {
        let auth = format!(r#"{{"auth":"{}"}}"#, b64("alice:s3cr:et\0"));
        assert_eq!(
            credentials_for(Some(secret_for("ghcr.io", &auth).as_bytes()), "ghcr.io"),
            Ok(creds("alice", "s3cr:et"))
        );
        let fields = r#"{"username":"bob","password":"pw"}"#;
        assert_eq!(credentials_for(Some(secret_for("ghcr.io", fields).as_bytes()), "ghcr.io"), Ok(creds("bob", "pw")));
        // auth wins over the fields; field names match ignoring case, as Go's encoding/json
        let both = format!(r#"{{"Username":"bob","Password":"pw","Auth":"{}"}}"#, b64("alice:x"));
        let secret = format!(r#"{{"Auths":{{"ghcr.io":{both}}}}}"#);
        assert_eq!(credentials_for(Some(secret.as_bytes()), "ghcr.io"), Ok(creds("alice", "x")));
        // base64 wrapped over lines, as `base64` without -w0 writes it
        let long = b64(&format!("user:{}", "p".repeat(100)));
        let wrapped = format!(r#"{{"auth":"{}\n{}"}}"#, &long[..76], &long[76..]);
        let got = credentials_for(Some(secret_for("ghcr.io", &wrapped).as_bytes()), "ghcr.io").unwrap().unwrap();
        assert_eq!(got.password, "p".repeat(100));
    }

    #[test]
    fn key_matching() {
        let entry = |user: &str| format!(r#"{{"auth":"{}"}}"#, b64(&format!("{user}:pw")));
        let two =
            |k1: &str, k2: &str| format!(r#"{{"auths":{{{k1:?}:{},{k2:?}:{}}}}}"#, entry("first"), entry("second"));
        let user = |secret: &str, registry: &str| {
            credentials_for(Some(secret.as_bytes()), registry).unwrap().map(|c| c.username)
        };
        // exact key before a host match
        assert_eq!(user(&two("https://ghcr.io/v2/", "ghcr.io"), "ghcr.io").as_deref(), Some("second"));
        // docker's ConvertToHostname: scheme, path and user info stripped; host compared ignoring case
        assert_eq!(user(&secret_for("https://ghcr.io/v1/", &entry("a")), "ghcr.io").as_deref(), Some("a"));
        assert_eq!(user(&secret_for("http://127.0.0.1:5000", &entry("a")), "127.0.0.1:5000").as_deref(), Some("a"));
        assert_eq!(user(&secret_for("127.0.0.1:5000/path", &entry("a")), "127.0.0.1:5000").as_deref(), Some("a"));
        assert_eq!(user(&secret_for("https://[::1]:5000/", &entry("a")), "[::1]:5000").as_deref(), Some("a"));
        assert_eq!(user(&secret_for("GHCR.IO", &entry("a")), "ghcr.io").as_deref(), Some("a"));
        assert_eq!(user(&secret_for("https://127.0.0.1:5000", &entry("a")), "127.0.0.1"), None);
        assert_eq!(user(&secret_for("https://evil.io/ghcr.io", &entry("a")), "ghcr.io"), None);
        // Docker Hub: its historical key, also docker.io and index.docker.io hosts
        for key in ["https://index.docker.io/v1/", "index.docker.io", "docker.io", "https://docker.io"] {
            assert_eq!(user(&secret_for(key, &entry("hub")), "index.docker.io").as_deref(), Some("hub"), "{key}");
        }
        assert_eq!(
            user(&two("docker.io", "https://index.docker.io/v1/"), "index.docker.io").as_deref(),
            Some("second")
        );
        assert_eq!(user(&secret_for("registry-1.docker.io", &entry("hub")), "index.docker.io"), None);
    }

    #[test]
    fn unusable_secrets_say_why_without_the_secret() {
        const PASSWORD: &str = "hunter2-topsecret";
        let good = format!(r#"{{"auth":"{}"}}"#, b64(&format!("u:{PASSWORD}")));
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"null".to_vec(), "JSON literal null"),
            (b" null\n".to_vec(), "JSON literal null"),
            (vec![b' '; MAX_PULL_SECRET_BYTES + 1], "larger than 1048576 bytes"),
            (
                format!(r#"{{"auths":{{"ghcr.io":{{"password":"{PASSWORD}" "x"}}}}}}"#).into_bytes(),
                "not valid JSON: syntax error at line 1",
            ),
            (
                format!(r#"{{"auths":{{"ghcr.io":{{"password":"{PASSWORD}"#).into_bytes(),
                "not valid JSON: it ends early",
            ),
            (format!(r#"{{"auths":{{"ghcr.io":{{"password":"{PASSWORD}\q"}}}}}}"#).into_bytes(), "not valid JSON"),
            (format!(r#"["{PASSWORD}"]"#).into_bytes(), "not a JSON object"),
            (format!(r#"{{"auths":"{PASSWORD}"}}"#).into_bytes(), "\"auths\" is not an object"),
            (secret_for("ghcr.io", &format!(r#""{PASSWORD}""#)).into_bytes(), "entry \"ghcr.io\" is not an object"),
            (
                secret_for("ghcr.io", &format!(r#"{{"password":["{PASSWORD}"]}}"#)).into_bytes(),
                "\"password\" that is not a string",
            ),
            (secret_for("ghcr.io", &format!(r#"{{"auth":"{PASSWORD}!"}}"#)).into_bytes(), "not valid base64"),
            (
                secret_for("ghcr.io", &format!(r#"{{"auth":"{}"}}"#, b64(PASSWORD))).into_bytes(),
                "not base64 of user:password",
            ),
            (
                secret_for("ghcr.io", &format!(r#"{{"auth":"{}"}}"#, b64(&format!(":{PASSWORD}")))).into_bytes(),
                "not base64 of user:password",
            ),
            (secret_for("ghcr.io", r#"{"auth":"/w=="}"#).into_bytes(), "UTF-8"),
            // a broken entry for another registry breaks the secret, as docker's loader decodes them all
            (
                format!(r#"{{"auths":{{"ghcr.io":{good},"quay.io":{{"auth":"{PASSWORD}!"}}}}}}"#).into_bytes(),
                "entry \"quay.io\"",
            ),
            (
                secret_for("ghcr.io", &format!(r#"{{"identitytoken":"{PASSWORD}"}}"#)).into_bytes(),
                "identitytoken or registrytoken",
            ),
            (
                secret_for("ghcr.io", &format!(r#"{{"username":"u","registrytoken":"{PASSWORD}"}}"#)).into_bytes(),
                "not supported",
            ),
        ];
        for (secret, want) in cases {
            let err = credentials_for(Some(&secret), "ghcr.io").expect_err(want);
            assert!(err.contains(want), "{err:?} should contain {want:?}");
            assert!(!err.contains(PASSWORD) && !err.contains("hunter"), "{err:?}");
        }
        // a long key is shown cut short
        let key = "k".repeat(500);
        let err = credentials_for(Some(secret_for(&key, r#"{"auth":"!"}"#).as_bytes()), "ghcr.io").unwrap_err();
        assert!(err.len() < 250, "{err}");
    }

    #[test]
    fn credentials_debug_is_redacted() {
        let c = creds("alice", "hunter2").unwrap();
        let shown = format!("{c:?}");
        assert!(shown.contains("alice") && !shown.contains("hunter2"), "{shown}");
        assert_eq!(basic_header(&c), format!("Basic {}", b64("alice:hunter2")));
    }

    fn bearer(realm: &str, service: Option<&str>, scope: Option<&str>) -> Option<Challenge> {
        Some(Challenge::Bearer { realm: realm.into(), service: service.map(Into::into), scope: scope.map(Into::into) })
    }

    #[test]
    fn challenges() {
        let cases: Vec<(Vec<&str>, Option<Challenge>)> = vec![
            (vec![], None),
            (vec![""], None),
            (vec!["Basic realm=\"Registry Realm\""], Some(Challenge::Basic)),
            (vec!["basic"], Some(Challenge::Basic)),
            (
                vec![
                    r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#,
                ],
                bearer(
                    "https://auth.docker.io/token",
                    Some("registry.docker.io"),
                    Some("repository:library/nginx:pull"),
                ),
            ),
            // scheme and parameter names ignore case; spaces around '=' and ','; token values
            (
                vec![r#"BEARER  Realm = "http://127.0.0.1:1/t" , SERVICE=reg"#],
                bearer("http://127.0.0.1:1/t", Some("reg"), None),
            ),
            // escapes in quoted strings
            (
                vec![r#"Bearer realm="http://h/t?a=\"b\"\\c",scope="s, t""#],
                bearer(r#"http://h/t?a="b"\c"#, None, Some("s, t")),
            ),
            // Bearer wins over Basic, in one value or across values, in either order
            (vec![r#"Basic realm="r", Bearer realm="http://h/t""#], bearer("http://h/t", None, None)),
            (vec![r#"Basic realm="r""#, r#"Bearer realm="http://h/t""#], bearer("http://h/t", None, None)),
            (vec![r#"Bearer realm="http://h/t", Basic realm="r""#], bearer("http://h/t", None, None)),
            // unknown schemes and token68 are skipped
            (vec![r#"Negotiate abc==, Digest realm="x", nonce="y", Basic"#], Some(Challenge::Basic)),
            (vec!["NTLM", "Negotiate"], None),
            (vec![r#"Negotiate YWJj, Bearer realm="http://h/t""#], bearer("http://h/t", None, None)),
            // a bearer challenge without a realm is not understood
            (vec![r#"Bearer service="x""#], None),
            (vec![r#"Bearer realm="""#, "Basic"], Some(Challenge::Basic)),
            // the first parameter of a name wins
            (vec![r#"Bearer realm="http://a/t", realm="http://b/t""#], bearer("http://a/t", None, None)),
            // an unterminated quoted string drops its challenge and the rest of the value
            (vec![r#"Basic realm="r", Bearer realm="http://h/t"#], Some(Challenge::Basic)),
            (vec![r#"Bearer realm="http://h/t"#, r#"Bearer realm="http://ok/t""#], bearer("http://ok/t", None, None)),
            // junk
            (vec![r#"=,"x", Basic"#], Some(Challenge::Basic)),
            (vec!["\"", ",,,", "é, Bearer realm=\"http://h/t\""], bearer("http://h/t", None, None)),
            // junk where a scheme should be drops the value up to the next comma
            (vec!["é Bearer realm=\"http://h/t\""], None),
        ];
        for (values, want) in cases {
            assert_eq!(parse_challenges(values.iter().copied()), want, "{values:?}");
        }
        // a header value over 8 KiB is ignored
        let long = format!(r#"Bearer realm="http://h/t", x="{}""#, "a".repeat(MAX_CHALLENGE_BYTES));
        assert_eq!(parse_challenges([long.as_str(), "Basic"]), Some(Challenge::Basic));
    }

    #[test]
    fn safe_realms() {
        let default = AddressPolicy::default();
        for realm in [
            "http://127.0.0.1:1/t",
            "https://127.0.0.1/token?x=1",
            "http://[::1]:5001/t",
            "HTTP://localhost:1/t",
            "http://10.0.0.1/t",
        ] {
            let uri = check_realm(realm, &default).unwrap_or_else(|e| panic!("{realm}: {e}"));
            assert!(uri.host().is_some());
        }
    }

    #[test]
    fn unsafe_realms() {
        let default = AddressPolicy::default();
        let blocked_loopback = AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]);
        let cases: Vec<(&str, &AddressPolicy, &str)> = vec![
            ("file:///x", &default, "scheme \"file\" is not allowed"),
            ("ftp://h/x", &default, "scheme \"ftp\" is not allowed"),
            ("gopher://127.0.0.1/x", &default, "scheme \"gopher\" is not allowed"),
            ("https:///token", &default, "no host"),
            ("http://?x", &default, "no host"),
            ("http://exa mple/t", &default, "not a URL"),
            ("/token", &default, "not an absolute http(s) URL"),
            ("token", &default, ""),
            ("http://169.254.169.254/token", &default, "link-local"),
            ("http://[::ffff:169.254.169.254]/t", &default, "link-local"),
            ("http://[fe80::1]/t", &default, "link-local"),
            ("http://100.100.100.200/t", &default, "cloud metadata"),
            ("http://metadata.google.internal/t", &default, "cloud metadata"),
            ("http://0.0.0.0/t", &default, "unspecified"),
            ("http://[::]/t", &default, "unspecified"),
            ("http://127.0.0.1:1/t", &blocked_loopback, "blocked CIDR range 127.0.0.0/8"),
            ("http://[::ffff:127.0.0.1]:1/t", &blocked_loopback, "blocked CIDR range 127.0.0.0/8"),
            // a name is resolved: localhost is loopback
            ("http://localhost:1/t", &blocked_loopback, "blocked CIDR range 127.0.0.0/8"),
            ("http://does-not-exist.invalid/t", &default, "cannot resolve does-not-exist.invalid"),
            ("http://user:pw@127.0.0.1/t", &default, "user info"),
        ];
        for (realm, policy, want) in cases {
            let err = check_realm(realm, policy).expect_err(realm);
            assert!(err.starts_with(&format!("rejected unsafe bearer realm {realm:?}: ")), "{err}");
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
        let long = format!("http://127.0.0.1/{}", "a".repeat(MAX_REALM_BYTES));
        assert!(check_realm(&long, &default).unwrap_err().contains("longer than 2048 bytes"));
    }

    #[test]
    fn token_responses() {
        assert_eq!(parse_token_response(br#"{"token":"abc"}"#), Ok("abc".into()));
        assert_eq!(parse_token_response(br#"{"access_token":"xyz","expires_in":300}"#), Ok("xyz".into()));
        assert_eq!(parse_token_response(br#"{"token":"abc","access_token":"xyz"}"#), Ok("abc".into()));
        assert_eq!(parse_token_response(br#"{"token":"","access_token":"xyz"}"#), Ok("xyz".into()));
        assert_eq!(parse_token_response(br#"{"token":null,"access_token":"xyz"}"#), Ok("xyz".into()));
        const SECRET: &str = "tok-sEcReT";
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"".to_vec(), "it ends early"),
            (format!(r#"{{"token":"{SECRET}""#).into_bytes(), "not valid JSON"),
            (format!("<html>{SECRET}</html>").into_bytes(), "not valid JSON: syntax error at line 1 column 1"),
            (format!(r#"["{SECRET}"]"#).into_bytes(), "not a JSON object"),
            (br#"{"token":""}"#.to_vec(), "holds no token"),
            (br#"{}"#.to_vec(), "holds no token"),
            (format!(r#"{{"token":["{SECRET}"]}}"#).into_bytes(), "\"token\" that is not a string"),
            (format!(r#"{{"token":"{SECRET}\r\nX-Evil: 1"}}"#).into_bytes(), "not visible ASCII"),
            (format!(r#"{{"token":"{SECRET} x"}}"#).into_bytes(), "not visible ASCII"),
            (vec![b' '; MAX_TOKEN_RESPONSE_BYTES + 1], "larger than 1048576 bytes"),
        ];
        for (body, want) in cases {
            let err = parse_token_response(&body).expect_err(want);
            assert!(err.contains(want), "{err:?} should contain {want:?}");
            assert!(!err.contains(SECRET), "{err}");
        }
    }

    #[test]
    fn token_urls() {
        let realm: Uri = "https://auth.example/token".parse().unwrap();
        assert_eq!(
            token_url(&realm, Some("registry.example"), Some("repository:a/b:pull"), "ignored"),
            "https://auth.example/token?service=registry.example&scope=repository%3Aa%2Fb%3Apull"
        );
        assert_eq!(
            token_url(&realm, None, None, "org/p"),
            "https://auth.example/token?scope=repository%3Aorg%2Fp%3Apull"
        );
        assert_eq!(
            token_url(&realm, Some(""), Some(""), "p"),
            "https://auth.example/token?scope=repository%3Ap%3Apull"
        );
        assert_eq!(
            token_url(&realm, Some("a b&c=d+é"), Some("x"), "p"),
            "https://auth.example/token?service=a%20b%26c%3Dd%2B%C3%A9&scope=x"
        );
        let with_query: Uri = "http://127.0.0.1:1/t?account=me".parse().unwrap();
        assert_eq!(
            token_url(&with_query, Some("s"), None, "p"),
            "http://127.0.0.1:1/t?account=me&service=s&scope=repository%3Ap%3Apull"
        );
        let trailing: Uri = "http://127.0.0.1:1/t?".parse().unwrap();
        assert_eq!(token_url(&trailing, None, Some("x"), "p"), "http://127.0.0.1:1/t?scope=x");
        let bare: Uri = "http://127.0.0.1:1".parse().unwrap();
        assert_eq!(token_url(&bare, None, Some("x"), "p"), "http://127.0.0.1:1/?scope=x");
    }
}
