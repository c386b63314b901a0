//! One fetch's conversation with a registry and its mirrors (distribution-spec `spec.md`, the Registry API v2):
//! which endpoints to ask and in what order, the `401` challenge and the token dance (docker distribution
//! `docs/spec/auth/token.md`; go-containerregistry `pkg/v1/remote/transport`), retries, and Istio's fallback
//! from TLS to plain HTTP.
//!
//! Every request goes through the shared [`Client`]: the SSRF guard on each connection (registry, mirror, token
//! endpoint, redirect hop), `insecure_hosts`, `ca_file`, the retry loop. Nothing secret is logged or put in a
//! reason: not the pull secret, not an `Authorization` header, not a token.

use std::io::Read;
use std::time::{Duration, Instant};

use ureq::http::{Response, Uri};
use ureq::{Agent, Body};

use super::auth::{self, Challenge, Credentials};
use super::manifest::{truncate, MAX_QUOTED_CHARS};
use crate::fetch::client::{describe, retryable, AttemptError, Client, GaveUp};
use crate::fetch::FetchError;

/// The most of a token endpoint's answer read. Tokens are JWTs of a few KiB (Docker Hub's are ~1–4 KiB); the
/// distribution registry's token spec sets no limit. Bounds memory against a hostile or broken endpoint.
pub(crate) const MAX_TOKEN_RESPONSE_BYTES: u64 = 1 << 20;
/// The most of an error answer's body read, for the `code: message` the distribution spec puts there. Enough
/// for any real error document; the rest is not read.
pub(crate) const MAX_ERROR_BODY_BYTES: u64 = 64 * 1024;

/// A place requests can go: a mirror, or the registry itself.
struct Endpoint {
    /// How reasons name it: `mirror http://127.0.0.1:5001`, `registry ghcr.io`.
    label: String,
    /// `scheme://host[:port]`.
    base: String,
    /// `host[:port]`: the key for pull-secret entries.
    host: String,
    credentials: Option<Credentials>,
    /// The `Authorization` value that last worked here (Basic, or `Bearer <token>`), sent first with the next
    /// request of this fetch: the token of the manifest request is reused for the layer.
    authorization: Option<String>,
    /// The registry itself over `https` not by configuration choice: may switch to `http` once (Istio).
    may_fall_back: bool,
    /// Switched to `http` by that fallback: a host the operator did not list in `plain_http_hosts`, whose https
    /// port answered in plain HTTP (or someone on the path made it look so). Credentials are not sent there,
    /// unless the registry is a loopback one ([`is_loopback_registry`]).
    fell_back: bool,
}

/// What the endpoint list for one fetch is made of.
pub(crate) struct Route<'a> {
    /// `registry` as written in the URL (`index.docker.io` for Docker Hub).
    pub registry: &'a str,
    pub repository: &'a str,
    /// Whether the registry is spoken to over plain HTTP (`plain_http_hosts`).
    pub plain_http: bool,
    /// The registry's mirrors (`http(s)://host[:port]`), tried in order before it.
    pub mirrors: &'a [String],
    pub pull_secret: Option<&'a [u8]>,
}

/// One fetch's requests to the endpoints of one registry.
pub(crate) struct Session<'a> {
    client: &'a Client,
    deadline: Instant,
    repository: String,
    endpoints: Vec<Endpoint>,
}

/// How a request failed on every endpoint.
pub(crate) enum Failure {
    /// Each endpoint's reason, joined with `; `.
    Unavailable(String),
    /// Stop the fetch (a disk error, say): not an endpoint's fault.
    Fatal(FetchError),
}

/// Why reading a `200` answer did not give what was asked for.
pub(crate) enum ReadError {
    /// The body was cut short or timed out: ask the same endpoint again (the retry loop).
    Retry(String),
    /// The endpoint's answer is unusable (wrong digest, too large): go on to the next endpoint.
    Reject(String),
    Fatal(FetchError),
}

/// Why one endpoint's retry loop stopped early.
enum Signal {
    /// The https attempt was answered in plain HTTP.
    PlainHttp,
    /// A `401` and its `WWW-Authenticate` values.
    Challenge(Vec<String>),
    Reject(String),
    Fatal(FetchError),
}

/// A `200` answer's reader: given the response and the timeout in force.
pub(crate) type Reader<'r, T> = dyn FnMut(&mut Response<Body>, Duration) -> Result<T, ReadError> + 'r;

impl<'a> Session<'a> {
    /// The endpoints for `route`: its mirrors in order, then the registry (`https://` unless `plain_http`),
    /// each with the pull secret's credentials for its host. The error says why the pull secret is unusable,
    /// without any of it.
    pub fn new(client: &'a Client, deadline: Instant, route: &Route<'_>) -> Result<Session<'a>, String> {
        let mut endpoints = Vec::with_capacity(route.mirrors.len() + 1);
        for mirror in route.mirrors {
            let host = mirror.split_once("://").map_or(mirror.as_str(), |(_, host)| host).to_string();
            endpoints.push(Endpoint {
                label: format!("mirror {mirror}"),
                base: mirror.clone(),
                credentials: auth::credentials_for(route.pull_secret, &host)?,
                host,
                authorization: None,
                may_fall_back: false,
                fell_back: false,
            });
        }
        let scheme = if route.plain_http { "http" } else { "https" };
        endpoints.push(Endpoint {
            label: format!("registry {}", route.registry),
            base: format!("{scheme}://{}", route.registry),
            host: route.registry.to_string(),
            credentials: auth::credentials_for(route.pull_secret, route.registry)?,
            authorization: None,
            may_fall_back: !route.plain_http,
            fell_back: false,
        });
        Ok(Session { client, deadline, repository: route.repository.to_string(), endpoints })
    }

    /// `GET <endpoint>/v2/<repository>/<kind>/<reference>` from each endpoint in turn until one answers `200`
    /// and `read` takes its answer. An endpoint that fails (connection, status, auth, an answer `read`
    /// rejects) is skipped with its reason kept; the reasons of all make the error when none succeeds.
    pub fn get<T>(
        &mut self,
        kind: &str,
        reference: &str,
        accept: Option<&str>,
        read: &mut Reader<'_, T>,
    ) -> Result<T, Failure> {
        let path = format!("/v2/{}/{kind}/{reference}", self.repository);
        let mut reasons = Vec::new();
        for i in 0..self.endpoints.len() {
            match self.get_from(i, &path, accept, read) {
                Ok(value) => return Ok(value),
                Err(Failure::Fatal(e)) => return Err(Failure::Fatal(e)),
                Err(Failure::Unavailable(reason)) => {
                    let reason = format!("{}: {reason}", self.endpoints[i].label);
                    log::debug!("OCI: skipping {reason}");
                    reasons.push(reason);
                }
            }
        }
        Err(Failure::Unavailable(reasons.join("; ")))
    }

    /// One endpoint: the request, answering a challenge once, and falling back to plain HTTP once.
    fn get_from<T>(
        &mut self,
        i: usize,
        path: &str,
        accept: Option<&str>,
        read: &mut Reader<'_, T>,
    ) -> Result<T, Failure> {
        let mut answered_challenge = false;
        loop {
            let endpoint = &self.endpoints[i];
            let url = format!("{}{path}", endpoint.base);
            let uri: Uri = url.parse().map_err(|e| Failure::Unavailable(format!("invalid URL {url}: {e}")))?;
            let authorization = endpoint.authorization.clone();
            let credentials = endpoint.credentials.as_ref();
            let may_fall_back = endpoint.may_fall_back;
            let agent = self.client.agent_for(&uri);
            log::debug!("OCI: GET {url}{}", if authorization.is_some() { " (authorized)" } else { "" });
            let result = self.client.retrying(self.deadline, &format!("OCI GET {url}"), |timeout| {
                let mut response = match send(agent, &uri, accept, authorization.as_deref(), timeout) {
                    Ok(response) => response,
                    Err(e) if may_fall_back && answered_in_plain_http(&e) => {
                        return Err(AttemptError::Fatal(Signal::PlainHttp))
                    }
                    Err(e) => {
                        let secrets = secrets(authorization.as_deref(), credentials);
                        return Err(AttemptError::Retry(quoted_error(&e, timeout, &secrets)));
                    }
                };
                match response.status().as_u16() {
                    200 => read(&mut response, timeout).map_err(|e| match e {
                        ReadError::Retry(why) => AttemptError::Retry(why),
                        ReadError::Reject(why) => AttemptError::Fatal(Signal::Reject(why)),
                        ReadError::Fatal(e) => AttemptError::Fatal(Signal::Fatal(e)),
                    }),
                    401 => Err(AttemptError::Fatal(Signal::Challenge(challenges(&response)))),
                    status => {
                        let why = status_reason(status, &mut response, &secrets(authorization.as_deref(), credentials));
                        Err(if retryable(status) { AttemptError::Retry(why) } else { AttemptError::Stop(why) })
                    }
                }
            });
            match result {
                Ok(value) => return Ok(value),
                Err(GaveUp::Failed { attempts, last_error }) => {
                    let tries = if attempts > 1 { format!(" (after {attempts} attempts)") } else { String::new() };
                    return Err(Failure::Unavailable(format!("GET {url}: {last_error}{tries}")));
                }
                Err(GaveUp::Fatal(Signal::Reject(why))) => {
                    return Err(Failure::Unavailable(format!("GET {url}: {why}")))
                }
                Err(GaveUp::Fatal(Signal::Fatal(e))) => return Err(Failure::Fatal(e)),
                Err(GaveUp::Fatal(Signal::PlainHttp)) => {
                    let endpoint = &mut self.endpoints[i];
                    log::info!(
                        "OCI: {} answered https in plain HTTP; using http for the rest of this fetch",
                        endpoint.label
                    );
                    endpoint.base = format!("http://{}", endpoint.host);
                    endpoint.may_fall_back = false;
                    endpoint.fell_back = !is_loopback_registry(&endpoint.host);
                    if endpoint.fell_back && endpoint.credentials.is_some() {
                        // What worked over https is not sent in clear text (see `authenticate`).
                        endpoint.authorization = None;
                    }
                }
                Err(GaveUp::Fatal(Signal::Challenge(values))) => {
                    if answered_challenge {
                        let endpoint = &self.endpoints[i];
                        let whose = match &endpoint.credentials {
                            Some(_) => format!("the credentials for {}", endpoint.host),
                            None => "anonymous access".to_string(),
                        };
                        return Err(Failure::Unavailable(format!(
                            "GET {url}: unauthorized: {whose} refused (status 401)"
                        )));
                    }
                    answered_challenge = true;
                    self.authenticate(i, &values).map_err(Failure::Unavailable)?;
                }
            }
        }
    }

    /// Answers a `401`'s challenge for endpoint `i`: sets the `Authorization` to send next, or says why not.
    fn authenticate(&mut self, i: usize, values: &[String]) -> Result<(), String> {
        let endpoint = &self.endpoints[i];
        if endpoint.fell_back && endpoint.credentials.is_some() {
            // Istio sends them anyway; here only a host listed in `plain_http_hosts` gets them over plain HTTP
            // (a Basic header, or a token they obtained), not one an answer in plain HTTP downgraded.
            return Err(format!(
                "refusing to send the credentials for {} over plain HTTP: the https request was answered in plain \
                 HTTP, and the registry is not in plain_http_hosts",
                endpoint.host
            ));
        }
        match auth::parse_challenges(values.iter().map(String::as_str)) {
            None => Err("unauthorized (status 401 without a Basic or Bearer challenge)".to_string()),
            Some(Challenge::Basic) => {
                let credentials = endpoint
                    .credentials
                    .as_ref()
                    .ok_or_else(|| format!("unauthorized (no credentials for {})", endpoint.host))?;
                self.endpoints[i].authorization = Some(auth::basic_header(credentials));
                Ok(())
            }
            Some(Challenge::Bearer { realm, service, scope }) => {
                let token = self.token(i, &realm, service.as_deref(), scope.as_deref())?;
                self.endpoints[i].authorization = Some(format!("Bearer {token}"));
                Ok(())
            }
        }
    }

    /// A token from a bearer challenge's realm, asked with the endpoint's credentials when it has some
    /// (anonymous otherwise), for pulling the repository. The realm is checked before anything goes there.
    fn token(&self, i: usize, realm: &str, service: Option<&str>, scope: Option<&str>) -> Result<String, String> {
        let endpoint = &self.endpoints[i];
        let quoted = truncate(realm, MAX_QUOTED_CHARS);
        let realm_uri = auth::check_realm(realm, self.client.policy())
            .map_err(|why| format!("refusing the bearer realm {quoted:?}: {why}"))?;
        // Credentials that reach the registry over https are not sent on in clear text (go-containerregistry's
        // `validateRealmURL` refuses the realm then); a registry spoken to over plain HTTP may name one.
        if endpoint.credentials.is_some()
            && realm_uri.scheme_str() == Some("http")
            && endpoint.base.starts_with("https:")
        {
            return Err(format!(
                "refusing to send the credentials for {} to the plain HTTP bearer realm {quoted:?} of a registry \
                 spoken to over https",
                endpoint.host
            ));
        }
        let url = auth::token_url(&realm_uri, service, scope, &self.repository);
        let uri: Uri = url.parse().map_err(|e| format!("invalid token URL from the bearer realm {quoted:?}: {e}"))?;
        let authorization = endpoint.credentials.as_ref().map(auth::basic_header);
        let agent = self.client.agent_for(&uri);
        log::debug!(
            "OCI: token request GET {url} ({})",
            if authorization.is_some() { "with credentials" } else { "anonymous" }
        );
        let result = self.client.retrying(self.deadline, &format!("OCI token GET {url}"), |timeout| {
            let mut response = send(agent, &uri, None, authorization.as_deref(), timeout).map_err(|e| {
                let secrets = secrets(authorization.as_deref(), endpoint.credentials.as_ref());
                AttemptError::Retry(quoted_error(&e, timeout, &secrets))
            })?;
            match response.status().as_u16() {
                200 => {
                    let body = read_at_most(&mut response, MAX_TOKEN_RESPONSE_BYTES).map_err(|e| match e {
                        Bounded::TooLarge => AttemptError::Fatal(format!(
                            "the token endpoint's answer is larger than the limit of {MAX_TOKEN_RESPONSE_BYTES} bytes"
                        )),
                        Bounded::Read(e) => {
                            AttemptError::Retry(format!("reading the response body: {}", describe(&e.into(), timeout)))
                        }
                    })?;
                    auth::parse_token_response(&body).map_err(AttemptError::Fatal)
                }
                status @ (401 | 403) => Err(AttemptError::Fatal(format!(
                    "unauthorized: the token endpoint refused {} (status {status})",
                    if authorization.is_some() {
                        format!("the credentials for {}", endpoint.host)
                    } else {
                        "an anonymous token".to_string()
                    }
                ))),
                status => {
                    let secrets = secrets(authorization.as_deref(), endpoint.credentials.as_ref());
                    let why = status_reason(status, &mut response, &secrets);
                    Err(if retryable(status) { AttemptError::Retry(why) } else { AttemptError::Stop(why) })
                }
            }
        });
        match result {
            Ok(token) => Ok(token),
            Err(GaveUp::Fatal(why)) => Err(format!("token request GET {url}: {why}")),
            Err(GaveUp::Failed { attempts, last_error }) => {
                let tries = if attempts > 1 { format!(" (after {attempts} attempts)") } else { String::new() };
                Err(format!("token request GET {url}: {last_error}{tries}"))
            }
        }
    }
}

/// One `GET` (following redirects; ureq never forwards `Authorization` to a redirect target).
fn send(
    agent: &Agent,
    uri: &Uri,
    accept: Option<&str>,
    authorization: Option<&str>,
    timeout: Duration,
) -> Result<Response<Body>, ureq::Error> {
    let mut request = agent.get(uri);
    if let Some(accept) = accept {
        request = request.header("Accept", accept);
    }
    if let Some(authorization) = authorization {
        request = request.header("Authorization", authorization);
    }
    request.config().timeout_global(Some(timeout)).build().call()
}

/// Whether an https attempt failed because the server answered in plain HTTP: rustls reads the answer's first
/// byte (`H` of `HTTP/1.1`) as a TLS record's content type and refuses it (`InvalidContentType`). Go reports the
/// same case as "server gave HTTP response to HTTPS client", the condition of Istio's fallback. Connection
/// refused, timeouts and certificate errors are not this.
pub(crate) fn answered_in_plain_http(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::Io(io) => io.get_ref().is_some_and(|inner| format!("{inner:?}").contains("InvalidContentType")),
        _ => false,
    }
}

/// The `WWW-Authenticate` values of a `401`.
fn challenges(response: &Response<Body>) -> Vec<String> {
    response
        .headers()
        .get_all(ureq::http::header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect()
}

/// What an error answer must not be quoted with: the `Authorization` value sent, its credentials or token
/// part, and the password it was made from. Servers and proxies do echo what they got.
fn secrets<'s>(authorization: Option<&'s str>, credentials: Option<&'s Credentials>) -> Vec<&'s str> {
    let mut secrets = Vec::new();
    if let Some(value) = authorization {
        secrets.push(value);
        secrets.extend(value.split_once(' ').map(|(_, credential)| credential.trim()));
    }
    secrets.extend(credentials.map(|c| c.password.as_str()));
    secrets.retain(|s| !s.is_empty());
    secrets
}

/// `text` with each of `secrets` replaced by `<redacted>`.
fn redacted(text: &str, secrets: &[&str]) -> String {
    secrets.iter().fold(text.to_string(), |text, secret| text.replace(secret, "<redacted>"))
}

/// A request's error as a reason quotes it: ureq's message may quote the server (a malformed `Location`, up
/// to the 64 KiB of a response head), so `secrets` are replaced, then it is cut at [`MAX_QUOTED_CHARS`].
fn quoted_error(e: &ureq::Error, timeout: Duration, secrets: &[&str]) -> String {
    truncate(&redacted(&describe(e, timeout), secrets), MAX_QUOTED_CHARS).to_string()
}

/// `status <n>`, with the distribution spec's error `code: message` pairs when the body (read up to
/// [`MAX_ERROR_BODY_BYTES`]) holds them, each of `secrets` in them replaced.
fn status_reason(status: u16, response: &mut Response<Body>, secrets: &[&str]) -> String {
    let detail = read_at_most(response, MAX_ERROR_BODY_BYTES).ok().and_then(|body| error_detail(&body, secrets));
    match detail {
        Some(detail) => format!("status {status} ({detail})"),
        None => format!("status {status}"),
    }
}

/// `CODE: message; …` of a distribution-spec error document (`{"errors":[{"code","message"}]}`), quoted at
/// most [`MAX_QUOTED_CHARS`] characters, each of `secrets` replaced by `<redacted>` (before the cut, which
/// could otherwise leave a secret's first characters).
fn error_detail(body: &[u8], secrets: &[&str]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<Error>,
    }
    #[derive(serde::Deserialize)]
    struct Error {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    let errors: Errors = serde_json::from_slice(body).ok()?;
    let text = errors.errors.iter().map(|e| format!("{}: {}", e.code, e.message)).collect::<Vec<_>>().join("; ");
    let text: String = text.chars().filter(|c| !c.is_control()).collect();
    let text = truncate(&redacted(&text, secrets), MAX_QUOTED_CHARS).to_string();
    (!text.is_empty()).then_some(text)
}

pub(crate) enum Bounded {
    TooLarge,
    Read(std::io::Error),
}

/// A whole body of at most `max` bytes.
pub(crate) fn read_at_most(response: &mut Response<Body>, max: u64) -> Result<Vec<u8>, Bounded> {
    let mut body = Vec::new();
    let reader = response.body_mut().as_reader();
    reader.take(max + 1).read_to_end(&mut body).map_err(Bounded::Read)?;
    if body.len() as u64 > max {
        return Err(Bounded::TooLarge);
    }
    Ok(body)
}

/// A registry go-containerregistry takes for a loopback one (`pkg/name/registry.go` `Scheme`: the name starts
/// with `localhost:`, or holds `127.0.0.1` or `::1`), to which it speaks plain HTTP from the start, so that
/// Istio's tests and local set-ups run such registries without TLS: credentials may follow the fallback to
/// plain HTTP there, as traffic to it does not leave the host. Judged from the name as written, as upstream.
fn is_loopback_registry(host: &str) -> bool {
    host == "localhost" || host.starts_with("localhost:") || host.contains("127.0.0.1") || host.contains("::1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_details_are_bounded_and_plain() {
        let body = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{"Tag":"x"}},{"code":"X","message":"a\nb"}]}"#;
        assert_eq!(error_detail(body, &[]).unwrap(), "MANIFEST_UNKNOWN: manifest unknown; X: ab");
        let long = format!(r#"{{"errors":[{{"code":"C","message":"{}"}}]}}"#, "m".repeat(1000));
        assert_eq!(error_detail(long.as_bytes(), &[]).unwrap().len(), MAX_QUOTED_CHARS);
        assert_eq!(error_detail(b"<html>", &[]), None);
        // A secret split by a control character is joined first, then replaced.
        let echo = br#"{"errors":[{"code":"DENIED","message":"Bearer s3cr\u0000et-token refused"}]}"#;
        assert_eq!(error_detail(echo, &["s3cret-token"]).unwrap(), "DENIED: Bearer <redacted> refused");
    }
}
