//! Cache options: parsed from a JSON object (unknown keys rejected), with the Istio agent's environment
//! variables as fallbacks and the agent's defaults. Environment values are read once, when the cache is
//! created. This module only parses and validates; it opens nothing.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

/// What happens when a fail-closed filter's module cannot be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFetchFailure {
    /// Reject the whole response (the caller NACKs it); Envoy keeps its previous config.
    Reject,
    /// Replace the filter by a deny-all RBAC filter of the same name (what recent Istio does).
    Deny,
}

/// Validated options of a [`crate::Cache`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Where modules are stored; created with mode 0700 if missing. Default: `$XDG_CACHE_HOME/wasm-ecds`,
    /// else `$HOME/.cache/wasm-ecds`, else (neither set, as in some containers) `wasm-ecds-<uid>` in the
    /// system's temporary directory (`std::env::temp_dir()`, usually `/tmp`), one per user.
    pub cache_dir: PathBuf,
    pub enable_conversion: bool,
    pub module_expiry: Duration,
    pub purge_interval: Duration,
    pub default_fetch_timeout: Duration,
    pub http_request_timeout: Duration,
    pub max_attempts: u32,
    pub retry_initial_backoff: Duration,
    pub retry_max_backoff: Duration,
    pub max_module_bytes: u64,
    /// Hosts (`host` or `host:port`, as in the URL) whose TLS certificates are not verified; `*` is all.
    pub insecure_hosts: Vec<String>,
    pub ca_file: Option<PathBuf>,
    /// Operator CIDRs refused at connect time, on top of the always-blocked addresses.
    pub blocked_cidrs: Vec<IpNet>,
    pub on_fetch_failure: OnFetchFailure,
    /// OCI registries (`host` or `host:port`, as in the `oci://` URL, or `*` for all) spoken to over plain
    /// HTTP instead of HTTPS. Each entry is checked: not blank, no scheme, path or credentials, a valid port.
    pub plain_http_hosts: Vec<String>,
    /// Registry mirrors: for a registry host as written in the `oci://` URL (`ghcr.io`, `127.0.0.1:5000`;
    /// Docker Hub is `index.docker.io`, and a `docker.io` key is taken as that), endpoints
    /// (`https://mirror.corp:5000`, `http://127.0.0.1:5001`) tried in order for its manifest and blob
    /// requests before the registry itself. Endpoints are `scheme://host[:port]` with scheme http or https,
    /// no trailing slash (one is removed), no credentials, path, query or fragment. In the order written; a
    /// registry or an endpoint of one registry named twice is an error.
    pub registry_mirrors: Vec<(String, Vec<String>)>,
}

/// An option that could not be accepted; the message names the key or environment variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionsError(pub String);

impl fmt::Display for OptionsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OptionsError {}

/// The JSON form: every key optional, unknown keys rejected.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOptions {
    cache_dir: Option<PathBuf>,
    enable_conversion: Option<bool>,
    module_expiry_secs: Option<u64>,
    purge_interval_secs: Option<u64>,
    default_fetch_timeout_ms: Option<u64>,
    http_request_timeout_ms: Option<u64>,
    max_attempts: Option<u32>,
    retry_initial_backoff_ms: Option<u64>,
    retry_max_backoff_ms: Option<u64>,
    max_module_bytes: Option<u64>,
    insecure_hosts: Option<Vec<String>>,
    ca_file: Option<PathBuf>,
    blocked_cidrs: Option<Vec<String>>,
    on_fetch_failure: Option<OnFetchFailure>,
    plain_http_hosts: Option<Vec<String>>,
    registry_mirrors: Option<RawMirrors>,
}

/// Where the environment comes from; a function so tests can supply their own.
pub(crate) type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The built-in defaults, ignoring the Istio environment variables (use [`Options::from_env`] for those);
/// the cache directory is found as [`Options::cache_dir`] says. Never panics.
impl Default for Options {
    fn default() -> Self {
        let cache_location = |name: &str| match name {
            "XDG_CACHE_HOME" | "HOME" => std::env::var(name).ok(),
            _ => None,
        };
        // Infallible: with no option given and no Istio variable read, nothing can be refused.
        Options::from_json_with_env("{}", &cache_location).expect("the built-in defaults are valid")
    }
}

/// The longest options JSON accepted: a few hundred bytes is typical; a megabyte leaves room for long
/// host and CIDR lists while bounding what a caller can make the parser hold.
pub(crate) const MAX_OPTIONS_JSON_BYTES: usize = 1 << 20;

impl Options {
    /// Parses options from JSON (`""`, `"null"` and `"{}"` mean defaults) with the process environment as
    /// fallback.
    /// `json` is at most 1 MiB long.
    pub fn from_json(json: &str) -> Result<Options, OptionsError> {
        Self::from_json_with_env(json, &|name| std::env::var(name).ok())
    }

    /// Defaults plus the process environment, as `from_json("{}")`.
    pub fn from_env() -> Result<Options, OptionsError> {
        Self::from_json("{}")
    }

    pub(crate) fn from_json_with_env(json: &str, env: EnvLookup<'_>) -> Result<Options, OptionsError> {
        if json.len() > MAX_OPTIONS_JSON_BYTES {
            return Err(OptionsError(format!(
                "invalid options: the JSON is {} bytes, more than the limit of {MAX_OPTIONS_JSON_BYTES}",
                json.len()
            )));
        }
        let trimmed = json.trim();
        let raw: RawOptions = if trimmed.is_empty() || trimmed == "null" {
            RawOptions::default()
        } else {
            // Only an object: serde's derived struct would also take an array, its elements by position
            // (found by the options fuzz target).
            if !trimmed.starts_with('{') {
                return Err(OptionsError("invalid options: expected a JSON object".into()));
            }
            let mut de = serde_json::Deserializer::from_str(trimmed);
            let raw = serde_path_to_error::deserialize(&mut de).map_err(|e| {
                let key = e.path().to_string();
                if key == "." {
                    OptionsError(format!("invalid options: {}", e.inner()))
                } else {
                    OptionsError(format!("invalid options: {key}: {}", e.inner()))
                }
            })?;
            // Text after the object is an error, not ignored (found by the options fuzz target).
            de.end().map_err(|e| OptionsError(format!("invalid options: {e}")))?;
            raw
        };
        Self::resolve(raw, env)
    }

    fn resolve(raw: RawOptions, env: EnvLookup<'_>) -> Result<Options, OptionsError> {
        let cache_dir = match raw.cache_dir {
            Some(dir) if dir.as_os_str().is_empty() => {
                return Err(OptionsError("invalid options: cache_dir must not be empty".into()))
            }
            Some(dir) => dir,
            None => default_cache_dir(env),
        };
        let enable_conversion = match raw.enable_conversion {
            Some(v) => v,
            None => match env_value(env, "ISTIO_AGENT_ENABLE_WASM_REMOTE_LOAD_CONVERSION") {
                Some(v) => parse_go_bool(&v)
                    .ok_or_else(|| env_error("ISTIO_AGENT_ENABLE_WASM_REMOTE_LOAD_CONVERSION", &v, "a boolean"))?,
                None => true,
            },
        };
        let module_expiry =
            secs_option(raw.module_expiry_secs, "module_expiry_secs", env, "WASM_MODULE_EXPIRY", 86_400)?;
        let purge_interval =
            secs_option(raw.purge_interval_secs, "purge_interval_secs", env, "WASM_PURGE_INTERVAL", 3_600)?;
        let default_fetch_timeout = Duration::from_millis(raw.default_fetch_timeout_ms.unwrap_or(5_000));
        let http_request_timeout = match raw.http_request_timeout_ms {
            Some(0) => return Err(positive_error("http_request_timeout_ms")),
            Some(ms) => Duration::from_millis(ms),
            None => match env_value(env, "WASM_HTTP_REQUEST_TIMEOUT") {
                Some(v) => env_duration("WASM_HTTP_REQUEST_TIMEOUT", &v)?,
                None => Duration::from_millis(15_000),
            },
        };
        let max_attempts = match raw.max_attempts {
            Some(0) => return Err(positive_error("max_attempts")),
            Some(n) => n,
            None => match env_value(env, "WASM_HTTP_REQUEST_MAX_RETRIES") {
                Some(v) => match v.trim().parse::<u32>() {
                    Ok(n) if n > 0 => n,
                    _ => return Err(env_error("WASM_HTTP_REQUEST_MAX_RETRIES", &v, "a positive integer")),
                },
                None => 5,
            },
        };
        let retry_initial_backoff = Duration::from_millis(raw.retry_initial_backoff_ms.unwrap_or(500));
        let retry_max_backoff = Duration::from_millis(raw.retry_max_backoff_ms.unwrap_or(60_000));
        if retry_max_backoff < retry_initial_backoff {
            return Err(OptionsError(
                "invalid options: retry_max_backoff_ms must not be less than retry_initial_backoff_ms".into(),
            ));
        }
        let max_module_bytes = match raw.max_module_bytes {
            Some(0) => return Err(positive_error("max_module_bytes")),
            Some(n) => n,
            None => 256 * 1024 * 1024,
        };
        let insecure_hosts = match raw.insecure_hosts {
            Some(hosts) => hosts,
            None => env_value(env, "WASM_INSECURE_REGISTRIES").map(|v| comma_list(&v)).unwrap_or_default(),
        };
        let blocked_cidrs = match raw.blocked_cidrs {
            Some(list) => list
                .iter()
                .map(|c| {
                    parse_cidr(c)
                        .map_err(|_| OptionsError(format!("invalid options: blocked_cidrs: {c:?} is not a CIDR")))
                })
                .collect::<Result<Vec<_>, _>>()?,
            None => match env_value(env, "BLOCKED_CIDRS_IN_WASM_FETCH") {
                Some(v) => comma_list(&v)
                    .iter()
                    .map(|c| {
                        parse_cidr(c).map_err(|_| {
                            env_error("BLOCKED_CIDRS_IN_WASM_FETCH", &v, "a comma-separated list of CIDRs")
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                None => Vec::new(),
            },
        };
        Ok(Options {
            cache_dir,
            enable_conversion,
            module_expiry,
            purge_interval,
            default_fetch_timeout,
            http_request_timeout,
            max_attempts,
            retry_initial_backoff,
            retry_max_backoff,
            max_module_bytes,
            insecure_hosts,
            ca_file: raw.ca_file,
            blocked_cidrs,
            on_fetch_failure: raw.on_fetch_failure.unwrap_or(OnFetchFailure::Reject),
            plain_http_hosts: plain_http_hosts(raw.plain_http_hosts.unwrap_or_default())?,
            registry_mirrors: registry_mirrors(raw.registry_mirrors.unwrap_or_default())?,
        })
    }
}

/// `registry_mirrors` as written: a JSON object read in order, with a registry named twice refused (serde's
/// maps keep the last value silently, which would hide a mistake).
#[derive(Debug, Default)]
struct RawMirrors(Vec<(String, Vec<String>)>);

impl<'de> Deserialize<'de> for RawMirrors {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = RawMirrors;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object mapping a registry host to a list of mirror endpoints")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<RawMirrors, A::Error> {
                let mut entries: Vec<(String, Vec<String>)> = Vec::new();
                while let Some((registry, endpoints)) = map.next_entry::<String, Vec<String>>()? {
                    if entries.iter().any(|(r, _)| r == &registry) {
                        return Err(serde::de::Error::custom(format_args!("registry {registry:?} is listed twice")));
                    }
                    entries.push((registry, endpoints));
                }
                Ok(RawMirrors(entries))
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

/// Docker Hub as references name it (go-containerregistry `pkg/name`: `docker.io` is rewritten to
/// `index.docker.io`), so a mirror keyed by either name applies to `oci://docker.io/…` and to `oci://nginx`.
const DOCKER_HUB: &str = "index.docker.io";

/// Checks `registry_mirrors`: every key a registry host (`host` or `host:port`; `docker.io` taken as
/// `index.docker.io`), no registry twice, every endpoint `http://` or `https://` with a host, an optional
/// port and nothing else (a registry's API always lives at `/v2/` of its root), no endpoint twice.
fn registry_mirrors(raw: RawMirrors) -> Result<Vec<(String, Vec<String>)>, OptionsError> {
    let mut mirrors: Vec<(String, Vec<String>)> = Vec::with_capacity(raw.0.len());
    for (written, endpoints) in raw.0 {
        let registry = match written.as_str() {
            "docker.io" => DOCKER_HUB.to_string(),
            _ => written.clone(),
        };
        if let Err(why) = check_host(&registry) {
            return Err(OptionsError(format!(
                "invalid options: registry_mirrors: {written:?} is not a registry host: {why}"
            )));
        }
        if mirrors.iter().any(|(r, _)| r.eq_ignore_ascii_case(&registry)) {
            return Err(OptionsError(format!(
                "invalid options: registry_mirrors: {written:?} names a registry listed before ({registry})"
            )));
        }
        let mut checked: Vec<String> = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            let endpoint_ok = check_endpoint(&endpoint).map_err(|why| {
                OptionsError(format!(
                    "invalid options: registry_mirrors: {written}: {endpoint:?} is not a mirror endpoint: {why}"
                ))
            })?;
            if checked.iter().any(|e| e.eq_ignore_ascii_case(&endpoint_ok)) {
                return Err(OptionsError(format!(
                    "invalid options: registry_mirrors: {written}: {endpoint:?} is listed twice"
                )));
            }
            checked.push(endpoint_ok);
        }
        mirrors.push((registry, checked));
    }
    Ok(mirrors)
}

/// A mirror endpoint without its trailing slash, or why it is not one.
fn check_endpoint(endpoint: &str) -> Result<String, &'static str> {
    let trimmed = endpoint.strip_suffix('/').unwrap_or(endpoint);
    let authority = trimmed
        .strip_prefix("https://")
        .or_else(|| trimmed.strip_prefix("http://"))
        .ok_or("want http:// or https://, a host and an optional port")?;
    if authority.contains('@') {
        return Err("credentials do not belong in an endpoint; put them in the pull secret under the mirror's host");
    }
    if authority.contains('/') {
        return Err("a path is not allowed: a registry's API is at /v2/ of its root");
    }
    if authority.contains(['?', '#']) {
        return Err("a query or fragment is not allowed");
    }
    check_host(authority)?;
    Ok(trimmed.to_string())
}

/// A `host` or `host:port` as written in a URL (IPv6 in brackets), or why it is not one.
fn check_host(host: &str) -> Result<(), &'static str> {
    if host.is_empty() {
        return Err("it is empty");
    }
    if host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("it contains white space or control characters");
    }
    if host.contains("://") {
        return Err("want host or host:port, not a URL");
    }
    if host.contains(['/', '@', '?', '#']) {
        return Err("want host or host:port, without a path, credentials, query or fragment");
    }
    match host.parse::<ureq::http::uri::Authority>() {
        Ok(a) if name_is_valid(a.host()) && port_is_valid(&a) => Ok(()),
        _ => {
            Err("want host or host:port (letters, digits, '.', '-', '_'; IPv6 in brackets) with a port from 1 to 65535")
        }
    }
}

/// A DNS name or IPv4 address (letters, digits, `.`, `-`, `_`), or an IPv6 address in brackets.
fn name_is_valid(name: &str) -> bool {
    match name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')),
    }
}

/// A port, if given, is 1–65535: `Authority` alone accepts an empty port and does not check the range.
fn port_is_valid(authority: &ureq::http::uri::Authority) -> bool {
    match authority.as_str().rsplit_once(':') {
        // An IPv6 literal without a port ends with `]`; its colons are not a port separator.
        Some((_, port)) if !authority.as_str().ends_with(']') => {
            matches!(port.parse::<u16>(), Ok(p) if p > 0) && port.bytes().all(|b| b.is_ascii_digit())
        }
        _ => true,
    }
}

/// Checks `plain_http_hosts`: each `*` or a `host[:port]` as in the URL.
fn plain_http_hosts(hosts: Vec<String>) -> Result<Vec<String>, OptionsError> {
    for (i, host) in hosts.iter().enumerate() {
        if host == "*" {
            continue;
        }
        if let Err(why) = check_host(host) {
            return Err(OptionsError(format!(
                "invalid options: plain_http_hosts[{i}]: {host:?} is not a registry host: {why}"
            )));
        }
    }
    Ok(hosts)
}

/// A set, non-blank environment value.
fn env_value(env: EnvLookup<'_>, name: &str) -> Option<String> {
    env(name).filter(|v| !v.trim().is_empty())
}

fn env_error(name: &str, value: &str, wanted: &str) -> OptionsError {
    OptionsError(format!("invalid environment variable {name}={value:?}: want {wanted}"))
}

fn positive_error(key: &str) -> OptionsError {
    OptionsError(format!("invalid options: {key} must be greater than 0"))
}

/// See [`Options::cache_dir`].
fn default_cache_dir(env: EnvLookup<'_>) -> PathBuf {
    if let Some(xdg) = env_value(env, "XDG_CACHE_HOME") {
        return PathBuf::from(xdg).join("wasm-ecds");
    }
    if let Some(home) = env_value(env, "HOME") {
        return PathBuf::from(home).join(".cache").join("wasm-ecds");
    }
    std::env::temp_dir().join(format!("wasm-ecds-{}", user_id()))
}

/// The real user id, so that users sharing a temporary directory do not share a cache.
#[cfg(unix)]
fn user_id() -> u32 {
    extern "C" {
        fn getuid() -> u32;
    }
    // SAFETY: getuid(2) takes nothing, always succeeds and touches no memory of ours; uid_t is 32 bits
    // wide on every Unix Rust supports.
    unsafe { getuid() }
}

#[cfg(not(unix))]
fn user_id() -> u32 {
    0
}

/// A seconds option, else a Go-duration environment variable, else the default. Zero is refused: Istio
/// replaces zero by the default, which hides a mistake; we name it instead.
fn secs_option(
    value: Option<u64>,
    key: &str,
    env: EnvLookup<'_>,
    var: &str,
    default_secs: u64,
) -> Result<Duration, OptionsError> {
    match value {
        Some(0) => Err(positive_error(key)),
        Some(s) => Ok(Duration::from_secs(s)),
        None => match env_value(env, var) {
            Some(v) => env_duration(var, &v),
            None => Ok(Duration::from_secs(default_secs)),
        },
    }
}

fn env_duration(var: &str, value: &str) -> Result<Duration, OptionsError> {
    match parse_go_duration(value) {
        Some(d) if !d.is_zero() => Ok(d),
        _ => Err(env_error(var, value, "a positive Go duration such as 24h, 90s or 1h30m")),
    }
}

/// Go's `strconv.ParseBool`.
fn parse_go_bool(v: &str) -> Option<bool> {
    match v.trim() {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Go's `time.ParseDuration` for non-negative values: a sequence of decimal numbers, each with an optional
/// fraction and a unit (`ns`, `us`/`µs`, `ms`, `s`, `m`, `h`), e.g. `1h30m`, `1.5s`; `0` alone is zero.
pub(crate) fn parse_go_duration(text: &str) -> Option<Duration> {
    let s = text.trim();
    let s = s.strip_prefix('+').unwrap_or(s);
    if s == "0" {
        return Some(Duration::ZERO);
    }
    if s.is_empty() {
        return None;
    }
    let mut rest = s;
    let mut total_nanos: f64 = 0.0;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let number: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total_nanos += number * scale;
    }
    if !total_nanos.is_finite() || total_nanos > u64::MAX as f64 {
        return None;
    }
    Some(Duration::from_nanos(total_nanos.round() as u64))
}

fn comma_list(v: &str) -> Vec<String> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
}

/// A CIDR, or a bare address meaning a single host.
fn parse_cidr(text: &str) -> Result<IpNet, ()> {
    let t = text.trim();
    if let Ok(net) = t.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    t.parse::<std::net::IpAddr>().map(IpNet::from).map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with_env(json: &str, vars: &[(&str, &str)]) -> Result<Options, OptionsError> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Options::from_json_with_env(json, &move |k| map.get(k).cloned())
    }

    #[test]
    fn defaults_match_the_istio_agent() {
        let o = with_env("{}", &[("HOME", "/home/u")]).unwrap();
        assert_eq!(o.cache_dir, PathBuf::from("/home/u/.cache/wasm-ecds"));
        assert!(o.enable_conversion);
        assert_eq!(o.module_expiry, Duration::from_secs(86_400));
        assert_eq!(o.purge_interval, Duration::from_secs(3_600));
        assert_eq!(o.default_fetch_timeout, Duration::from_secs(5));
        assert_eq!(o.http_request_timeout, Duration::from_secs(15));
        assert_eq!(o.max_attempts, 5);
        assert_eq!(o.max_module_bytes, 268_435_456);
        assert_eq!(o.on_fetch_failure, OnFetchFailure::Reject);
        assert!(o.insecure_hosts.is_empty() && o.blocked_cidrs.is_empty());
    }

    #[test]
    fn without_xdg_cache_home_or_home_the_cache_is_a_private_temp_dir() {
        let o = with_env("{}", &[]).unwrap();
        assert_eq!(o.cache_dir, std::env::temp_dir().join(format!("wasm-ecds-{}", user_id())));
        let blank = with_env("{}", &[("HOME", " "), ("XDG_CACHE_HOME", "")]).unwrap();
        assert_eq!(blank.cache_dir, o.cache_dir);
    }

    #[test]
    fn default_never_panics_and_uses_the_built_in_values() {
        let o = Options::default();
        let name = o.cache_dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        assert!(name.starts_with("wasm-ecds"), "{:?}", o.cache_dir);
        assert!(o.enable_conversion);
        assert_eq!(o.module_expiry, Duration::from_secs(86_400));
        assert_eq!(o.max_attempts, 5);
    }

    #[test]
    fn xdg_cache_home_wins_over_home() {
        let o = with_env("null", &[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/xdg")]).unwrap();
        assert_eq!(o.cache_dir, PathBuf::from("/xdg/wasm-ecds"));
    }

    #[test]
    fn environment_fallbacks_are_read() {
        let o = with_env(
            r#"{"cache_dir":"/c"}"#,
            &[
                ("ISTIO_AGENT_ENABLE_WASM_REMOTE_LOAD_CONVERSION", "false"),
                ("WASM_MODULE_EXPIRY", "1h30m"),
                ("WASM_PURGE_INTERVAL", "10m"),
                ("WASM_HTTP_REQUEST_TIMEOUT", "2.5s"),
                ("WASM_HTTP_REQUEST_MAX_RETRIES", "3"),
                ("WASM_INSECURE_REGISTRIES", "a.example:5000, b.example"),
                ("BLOCKED_CIDRS_IN_WASM_FETCH", "10.0.0.0/8,192.168.1.7"),
            ],
        )
        .unwrap();
        assert!(!o.enable_conversion);
        assert_eq!(o.module_expiry, Duration::from_secs(5_400));
        assert_eq!(o.purge_interval, Duration::from_secs(600));
        assert_eq!(o.http_request_timeout, Duration::from_millis(2_500));
        assert_eq!(o.max_attempts, 3);
        assert_eq!(o.insecure_hosts, vec!["a.example:5000", "b.example"]);
        assert_eq!(o.blocked_cidrs.len(), 2);
        assert_eq!(o.blocked_cidrs[1].to_string(), "192.168.1.7/32");
    }

    #[test]
    fn json_keys_override_the_environment() {
        let o = with_env(
            r#"{"cache_dir":"/c","enable_conversion":true,"max_attempts":1,"insecure_hosts":["*"]}"#,
            &[("ISTIO_AGENT_ENABLE_WASM_REMOTE_LOAD_CONVERSION", "false"), ("WASM_HTTP_REQUEST_MAX_RETRIES", "9")],
        )
        .unwrap();
        assert!(o.enable_conversion);
        assert_eq!(o.max_attempts, 1);
        assert_eq!(o.insecure_hosts, vec!["*"]);
    }

    #[test]
    fn options_json_longer_than_the_limit_is_refused_before_parsing() {
        let hosts = vec!["h"; MAX_OPTIONS_JSON_BYTES / 4];
        let json = serde_json::json!({ "cache_dir": "/c", "insecure_hosts": hosts }).to_string();
        assert!(json.len() > MAX_OPTIONS_JSON_BYTES);
        let e = with_env(&json, &[]).unwrap_err();
        assert!(e.0.contains(&format!("more than the limit of {MAX_OPTIONS_JSON_BYTES}")), "{e}");
        let short = serde_json::json!({ "cache_dir": "/c", "insecure_hosts": vec!["h"; 1000] }).to_string();
        assert_eq!(with_env(&short, &[]).unwrap().insecure_hosts.len(), 1000);
    }

    #[test]
    fn options_other_than_an_object_are_an_error() {
        let fourteen = format!("[\"/c\"{}]", ", null".repeat(13));
        for json in [fourteen.as_str(), "[]", "3", "\"x\"", "true"] {
            let e = with_env(json, &[]).unwrap_err();
            assert_eq!(e.0, "invalid options: expected a JSON object", "{json}");
        }
    }

    #[test]
    fn text_after_the_options_object_is_an_error() {
        for json in [r#"{"cache_dir":"/c"} {"#, r#"{}x"#, r#"{"cache_dir":"/c"}, {"max_attempts":0}"#] {
            let e = with_env(json, &[]).unwrap_err();
            assert!(e.0.contains("trailing characters"), "{json}: {e}");
        }
        assert!(with_env("{}\n\t ", &[]).is_ok());
    }

    #[test]
    fn unknown_key_is_named() {
        let e = with_env(r#"{"cache_dir":"/c","cache_size":3}"#, &[]).unwrap_err();
        assert!(e.0.contains("cache_size"), "{e}");
    }

    #[test]
    fn bad_value_is_named() {
        let e = with_env(r#"{"cache_dir":"/c","max_attempts":-1}"#, &[]).unwrap_err();
        assert!(e.0.contains("max_attempts"), "{e}");
        let e = with_env(r#"{"cache_dir":"/c","enable_conversion":"yes"}"#, &[]).unwrap_err();
        assert!(e.0.starts_with("invalid options: enable_conversion: invalid type"), "{e}");
        let e = with_env(r#"{"insecure_hosts":["a", 3]}"#, &[]).unwrap_err();
        assert!(e.0.contains("insecure_hosts[1]"), "{e}");
        let e = with_env(r#"{"cache_dir":"/c","on_fetch_failure":"explode"}"#, &[]).unwrap_err();
        assert!(e.0.contains("explode"), "{e}");
        let e = with_env(r#"{"cache_dir":"/c","blocked_cidrs":["nope"]}"#, &[]).unwrap_err();
        assert!(e.0.contains("blocked_cidrs"), "{e}");
        let e = with_env(r#"{"cache_dir":"/c","max_attempts":0}"#, &[]).unwrap_err();
        assert!(e.0.contains("max_attempts"), "{e}");
    }

    #[test]
    fn bad_environment_value_names_the_variable() {
        for (var, value) in [
            ("WASM_MODULE_EXPIRY", "tomorrow"),
            ("WASM_PURGE_INTERVAL", "0s"),
            ("WASM_HTTP_REQUEST_TIMEOUT", "5"),
            ("WASM_HTTP_REQUEST_MAX_RETRIES", "x"),
            ("ISTIO_AGENT_ENABLE_WASM_REMOTE_LOAD_CONVERSION", "maybe"),
            ("BLOCKED_CIDRS_IN_WASM_FETCH", "10.0.0.0/33"),
        ] {
            let e = with_env(r#"{"cache_dir":"/c"}"#, &[(var, value)]).unwrap_err();
            assert!(e.0.contains(var), "{var}: {e}");
        }
    }

    fn mirrors(json: &str) -> Result<Vec<(String, Vec<String>)>, OptionsError> {
        with_env(&format!(r#"{{"cache_dir":"/c","registry_mirrors":{json}}}"#), &[]).map(|o| o.registry_mirrors)
    }

    fn plain(json: &str) -> Result<Vec<String>, OptionsError> {
        with_env(&format!(r#"{{"cache_dir":"/c","plain_http_hosts":{json}}}"#), &[]).map(|o| o.plain_http_hosts)
    }

    #[test]
    fn oci_options_default_to_none() {
        let o = with_env("{}", &[("HOME", "/home/u")]).unwrap();
        assert!(o.plain_http_hosts.is_empty() && o.registry_mirrors.is_empty());
    }

    #[test]
    fn registry_mirrors_keep_their_order_and_lose_a_trailing_slash() {
        let m = mirrors(
            r#"{"ghcr.io": ["https://mirror.corp:5000/", "http://127.0.0.1:5001"],
                "127.0.0.1:5000": ["http://[::1]:5002"], "quay.io": []}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            vec![
                ("ghcr.io".to_string(), vec!["https://mirror.corp:5000".to_string(), "http://127.0.0.1:5001".into()]),
                ("127.0.0.1:5000".to_string(), vec!["http://[::1]:5002".to_string()]),
                ("quay.io".to_string(), vec![]),
            ]
        );
        assert!(mirrors("{}").unwrap().is_empty());
        assert!(mirrors("null").unwrap().is_empty());
    }

    #[test]
    fn a_docker_io_mirror_key_is_docker_hub_as_references_name_it() {
        let m = mirrors(r#"{"docker.io": ["https://hub-cache.corp"]}"#).unwrap();
        assert_eq!(m, vec![("index.docker.io".to_string(), vec!["https://hub-cache.corp".to_string()])]);
        let e = mirrors(r#"{"index.docker.io": ["https://a.corp"], "docker.io": ["https://b.corp"]}"#).unwrap_err();
        assert!(e.0.contains(r#""docker.io" names a registry listed before (index.docker.io)"#), "{e}");
    }

    #[test]
    fn a_registry_named_twice_is_refused() {
        let e = mirrors(r#"{"ghcr.io": ["https://a.corp"], "ghcr.io": ["https://b.corp"]}"#).unwrap_err();
        assert!(e.0.starts_with("invalid options: registry_mirrors: registry \"ghcr.io\" is listed twice"), "{e}");
        let e = mirrors(r#"{"ghcr.io": ["https://a.corp"], "GHCR.io": ["https://b.corp"]}"#).unwrap_err();
        assert!(e.0.contains("names a registry listed before"), "{e}");
    }

    #[test]
    fn an_endpoint_listed_twice_for_one_registry_is_refused() {
        let e = mirrors(r#"{"ghcr.io": ["https://a.corp", "https://a.corp/"]}"#).unwrap_err();
        assert_eq!(e.0, r#"invalid options: registry_mirrors: ghcr.io: "https://a.corp/" is listed twice"#);
        // The same endpoint may serve two registries.
        assert_eq!(mirrors(r#"{"a.io": ["https://m.corp"], "b.io": ["https://m.corp"]}"#).unwrap().len(), 2);
    }

    #[test]
    fn a_bad_registry_key_is_named_with_the_reason() {
        for (key, why) in [
            ("", "it is empty"),
            (" ghcr.io", "white space"),
            ("https://ghcr.io", "not a URL"),
            ("ghcr.io/org", "without a path"),
            ("user@ghcr.io", "credentials"),
            ("ghcr.io:", "a port from 1 to 65535"),
            ("ghcr.io:65536", "a port from 1 to 65535"),
            ("ghcr.io:0", "a port from 1 to 65535"),
            ("ghcr.io:+80", "a port from 1 to 65535"),
            ("*", "a port from 1 to 65535"),
        ] {
            let json = serde_json::json!({ key: ["https://m.corp"] }).to_string();
            let e = mirrors(&json).unwrap_err();
            let prefix = format!("invalid options: registry_mirrors: {key:?} is not a registry host: ");
            assert!(e.0.starts_with(&prefix) && e.0.contains(why), "{key:?}: {e}");
        }
    }

    #[test]
    fn a_bad_endpoint_is_named_with_the_reason() {
        for (endpoint, why) in [
            ("mirror.corp:5000", "want http:// or https://"),
            ("ftp://mirror.corp", "want http:// or https://"),
            ("HTTPS://mirror.corp", "want http:// or https://"),
            ("https://", "want http:// or https://"),
            ("https://user:pass@mirror.corp", "put them in the pull secret under the mirror's host"),
            ("https://mirror.corp/v2", "a path is not allowed"),
            ("https://mirror.corp//", "a path is not allowed"),
            ("https://mirror.corp?ns=ghcr.io", "a query or fragment is not allowed"),
            ("https://mirror.corp#x", "a query or fragment is not allowed"),
            ("https://mirror corp", "white space"),
            ("https://mirror.corp:99999", "a port from 1 to 65535"),
            ("http://mirror.corp:", "a port from 1 to 65535"),
        ] {
            let json = serde_json::json!({ "ghcr.io": ["https://ok.corp", endpoint] }).to_string();
            let e = mirrors(&json).unwrap_err();
            let prefix = format!("invalid options: registry_mirrors: ghcr.io: {endpoint:?} is not a mirror endpoint: ");
            assert!(e.0.starts_with(&prefix) && e.0.contains(why), "{endpoint:?}: {e}");
            // The credentials of a refused endpoint are not repeated beyond the value the caller gave.
            assert_eq!(e.0.matches("pass").count(), endpoint.matches("pass").count(), "{e}");
        }
    }

    #[test]
    fn registry_mirrors_of_the_wrong_shape_are_named() {
        for json in [r#"["https://m.corp"]"#, r#"{"ghcr.io": "https://m.corp"}"#, r#"{"ghcr.io": [3]}"#] {
            let e = mirrors(json).unwrap_err();
            assert!(e.0.starts_with("invalid options: registry_mirrors"), "{json}: {e}");
        }
    }

    #[test]
    fn plain_http_hosts_are_hosts_or_a_star() {
        assert_eq!(plain(r#"["127.0.0.1:5000", "registry.local", "[::1]:5000", "*"]"#).unwrap().len(), 4);
        for (i, host, why) in [
            (1, "", "it is empty"),
            (1, "  ", "white space"),
            (1, "http://registry.local", "not a URL"),
            (1, "registry.local/v2", "without a path"),
            (1, "registry.local:x", "a port from 1 to 65535"),
        ] {
            let json = serde_json::json!(["ok.local", host]).to_string();
            let e = plain(&json).unwrap_err();
            let prefix = format!("invalid options: plain_http_hosts[{i}]: {host:?} is not a registry host: ");
            assert!(e.0.starts_with(&prefix) && e.0.contains(why), "{host:?}: {e}");
        }
        let e = plain(r#""registry.local""#).unwrap_err();
        assert!(e.0.starts_with("invalid options: plain_http_hosts: invalid type"), "{e}");
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("24h"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("300ms"), Some(Duration::from_millis(300)));
        assert_eq!(parse_go_duration("1.5h"), Some(Duration::from_secs(5_400)));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("10"), None);
        assert_eq!(parse_go_duration("-1s"), None);
        assert_eq!(parse_go_duration("1d"), None);
    }
}
