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
    /// HTTP instead of HTTPS.
    pub plain_http_hosts: Vec<String>,
    /// Registry mirrors: for a registry host as written in the `oci://` URL (`ghcr.io`, `127.0.0.1:5000`),
    /// endpoints (`https://mirror.corp:5000`, `http://127.0.0.1:5001`) tried in order for its manifest and
    /// blob requests before the registry itself. Endpoints are `scheme://host[:port]`, scheme http or https.
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
    registry_mirrors: Option<std::collections::BTreeMap<String, Vec<String>>>,
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
            plain_http_hosts: raw.plain_http_hosts.unwrap_or_default(),
            registry_mirrors: registry_mirrors(raw.registry_mirrors.unwrap_or_default())?,
        })
    }
}

/// Checks every mirror endpoint: `http://` or `https://`, a host, an optional port, nothing else (a
/// registry's API always lives at `/v2/` of its root).
fn registry_mirrors(
    raw: std::collections::BTreeMap<String, Vec<String>>,
) -> Result<Vec<(String, Vec<String>)>, OptionsError> {
    let mut mirrors = Vec::with_capacity(raw.len());
    for (registry, endpoints) in raw {
        if registry.is_empty() || registry.contains(['/', ' ']) {
            return Err(OptionsError(format!(
                "invalid options: registry_mirrors: {registry:?} is not a registry host (host or host:port)"
            )));
        }
        let mut checked = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            let trimmed = endpoint.strip_suffix('/').unwrap_or(&endpoint);
            let rest = trimmed.strip_prefix("https://").or_else(|| trimmed.strip_prefix("http://"));
            match rest {
                Some(authority)
                    if !authority.is_empty()
                        && !authority.contains(['/', '?', '#', '@', ' '])
                        && authority.parse::<ureq::http::uri::Authority>().is_ok() =>
                {
                    checked.push(trimmed.to_string())
                }
                _ => {
                    return Err(OptionsError(format!(
                        "invalid options: registry_mirrors: {registry}: {endpoint:?} is not an endpoint \
                         (http:// or https://, a host and an optional port, no path)"
                    )))
                }
            }
        }
        mirrors.push((registry, checked));
    }
    Ok(mirrors)
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
