//! `oci://` URLs as image references.
//!
//! Istio (`pkg/wasm/cache.go`) parses the URL with Go's `url.Parse` and hands `u.Host + u.Path` to
//! go-containerregistry's `name.ParseReference` (non-strict; `pkg/name/{ref,tag,digest,repository,registry,
//! check,options}.go`). The rules here follow that pair:
//!
//! - The scheme is `oci://` in any case. Everything after it up to the first `/` is the URL's host
//!   (`host`, `host:port`, `[v6]:port`), kept as written, case included (ggcr's `checkRegistry` keeps it).
//! - A query (`?…`) and a fragment (`#…`) are dropped, as `u.Host + u.Path` drops them.
//! - ggcr then reads `host + path` as `[registry/]repository[:tag][@sha256:hex]`:
//!   - a digest needs exactly one `@`, the algorithm `sha256` and 64 lower-case hex digits; a tag before it
//!     (`repo:tag@sha256:…`) is dropped: the digest wins (`NewDigest`);
//!   - a tag is the text after the last `:` when that text has no `/` (so `host:5000/repo` has no tag);
//!     it is `latest` when absent (`NewTag`, `DefaultTag`);
//!   - the first path element is the registry only if it is `localhost` or contains `.` or `:`; otherwise the
//!     whole name is a Docker Hub repository (`NewRepository`), so `oci://myreg/app` means
//!     `index.docker.io/myreg/app`, and `oci://localhost:5000` alone means Docker Hub's `library/localhost`
//!     at tag `5000` — faithful, if surprising;
//!   - no registry, or `docker.io`, means `index.docker.io` (`NewRegistry`), and a one-element Docker Hub
//!     repository gets `library/` (`RepositoryStr`).
//!
//! Where this is stricter than the pair above, the registry would refuse the name anyway, and the error now
//! comes before any request, with a clearer reason:
//! - user info in the URL (`oci://user:pass@host/…`) is refused: credentials belong in the pull secret
//!   (Go drops it silently, ggcr never sees it);
//! - a host must be a DNS name or IPv4 address (letters, digits, `.`, `-`, `_`) or a bracketed IPv6
//!   address, with an optional port 1–65535 (Go accepts more characters and any run of digits);
//! - percent-encoding is refused (Go would decode it into the path);
//! - repository path elements follow the distribution grammar `[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*`
//!   (distribution `reference/regexp.go`), 255 characters at most (ggcr only checks the character set
//!   `[a-z0-9_./-]`); tags follow `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}` (ggcr allows a leading `.` or `-`).

use std::fmt;
use std::net::Ipv6Addr;

/// The registry of references that name none (ggcr `name.DefaultRegistry`).
pub(crate) const DOCKER_HUB: &str = "index.docker.io";
/// Docker Hub's other spelling, rewritten to [`DOCKER_HUB`] (ggcr `defaultRegistryAlias`).
const DOCKER_HUB_ALIAS: &str = "docker.io";
const DEFAULT_TAG: &str = "latest";
const MAX_REPOSITORY_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;
/// A DNS name's 253 characters, brackets, a colon and a port fit well inside this.
const MAX_HOST_LEN: usize = 270;

/// What the manifest is asked for by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A tag; `latest` when the reference has neither tag nor digest.
    Tag(String),
    /// A `sha256:` digest, as lower-case hex without the algorithm. Immutable: never re-resolved.
    Digest(String),
}

/// An image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// The registry as written in the URL (`ghcr.io`, `127.0.0.1:5000`), `index.docker.io` for Docker Hub
    /// (none written, or `docker.io`). The key for `plain_http_hosts`, `insecure_hosts`, `registry_mirrors`
    /// and pull-secret entries.
    pub registry: String,
    /// The repository path (`library/nginx` for Docker Hub's one-component names).
    pub repository: String,
    pub target: Target,
}

impl Reference {
    /// Parses an `oci://` URL (scheme in any case). The error says what is wrong, without the URL (the
    /// caller adds it).
    pub fn parse(url: &str) -> Result<Reference, String> {
        let rest = match url.get(..6) {
            Some(scheme) if scheme.eq_ignore_ascii_case("oci://") => &url[6..],
            _ => return Err("not an oci:// URL".to_string()),
        };
        // Go's url.Parse: the fragment goes first, then the query; Istio uses neither.
        let rest = rest.split('#').next().unwrap_or_default();
        let rest = rest.split('?').next().unwrap_or_default();
        if rest.contains('%') {
            return Err("percent-encoded characters are not supported in an image reference".to_string());
        }
        let (host, path) = match rest.find('/') {
            Some(slash) => rest.split_at(slash),
            None => (rest, ""),
        };
        check_host(host)?;
        parse_name(&format!("{host}{path}"))
    }

    /// The last path element of `/v2/<repository>/manifests/<reference>`: the tag, or `sha256:<hex>`.
    pub fn manifest_reference(&self) -> String {
        match &self.target {
            Target::Tag(tag) => tag.clone(),
            Target::Digest(hex) => format!("sha256:{hex}"),
        }
    }
}

/// `registry/repository:tag` or `registry/repository@sha256:hex`, the reference's canonical name.
impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Target::Tag(tag) => write!(f, "{}/{}:{tag}", self.registry, self.repository),
            Target::Digest(hex) => write!(f, "{}/{}@sha256:{hex}", self.registry, self.repository),
        }
    }
}

/// The URL's host part, before any path: what Go's `url.Parse` would take as `u.Host`, narrowed as the
/// module docs say.
fn check_host(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("no registry or repository after oci://".to_string());
    }
    if let Some((_, after)) = host.rsplit_once('@') {
        if after.starts_with("sha256:") {
            // `oci://nginx@sha256:…`: Go reads `nginx` as a user name, so Istio fails too.
            return Err("a digest needs a repository path: write oci://docker.io/<repository>@sha256:…".to_string());
        }
        return Err("user info in an oci:// URL is not supported: credentials belong in the pull secret".to_string());
    }
    if host.len() > MAX_HOST_LEN {
        return Err(format!("the registry host is longer than {MAX_HOST_LEN} characters"));
    }
    let port = if let Some(bracketed) = host.strip_prefix('[') {
        let (addr, after) = bracketed
            .split_once(']')
            .ok_or_else(|| format!("registry host {host:?}: missing ']' after an IPv6 address"))?;
        if addr.parse::<Ipv6Addr>().is_err() {
            return Err(format!("registry host {host:?}: {addr:?} is not an IPv6 address"));
        }
        match after {
            "" => None,
            _ => Some(after.strip_prefix(':').ok_or_else(|| format!("registry host {host:?}: junk after ']'"))?),
        }
    } else {
        let (name, port) = match host.rsplit_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        };
        if name.is_empty() {
            return Err(format!("registry host {host:?} has no name"));
        }
        if let Some(bad) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))) {
            return Err(format!("registry host {host:?} contains the character {bad:?}"));
        }
        port
    };
    if let Some(port) = port {
        let valid =
            !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok_and(|p| p > 0);
        if !valid {
            return Err(format!("registry host {host:?}: invalid port {port:?}"));
        }
    }
    Ok(())
}

/// ggcr's `ParseReference` on `host + path`.
fn parse_name(name: &str) -> Result<Reference, String> {
    if name.matches('@').count() > 1 {
        return Err("a digest must follow exactly one '@'".to_string());
    }
    let (name, target) = match name.split_once('@') {
        Some((name, digest)) => {
            let hex = parse_digest(digest)?;
            // A tag before the digest is checked, then dropped (ggcr `NewDigest`).
            let (name, _tag) = split_tag(name)?;
            (name, Target::Digest(hex))
        }
        None => {
            let (name, tag) = split_tag(name)?;
            (name, Target::Tag(tag.unwrap_or(DEFAULT_TAG).to_string()))
        }
    };
    let (registry, repository) = match name.split_once('/') {
        Some((first, rest)) if first == "localhost" || first.contains(['.', ':']) => (first, rest),
        _ => ("", name),
    };
    check_repository(repository)?;
    let registry = match registry {
        "" | DOCKER_HUB_ALIAS => DOCKER_HUB,
        other => other,
    };
    let repository = if registry == DOCKER_HUB && !repository.contains('/') {
        format!("library/{repository}")
    } else {
        repository.to_string()
    };
    // Checked again with `library/`: the name the registry gets (and this reference prints) stays in bounds.
    if repository.len() > MAX_REPOSITORY_LEN {
        return Err(format!("the repository name {repository:.20}… is longer than {MAX_REPOSITORY_LEN} characters"));
    }
    Ok(Reference { registry: registry.to_string(), repository, target })
}

/// `name[:tag]` → (name, tag): the text after the last `:` is a tag unless it holds a `/` (then the colon
/// was a port's). An empty or malformed tag is an error.
fn split_tag(name: &str) -> Result<(&str, Option<&str>), String> {
    match name.rsplit_once(':') {
        Some((base, tag)) if !tag.contains('/') => {
            check_tag(tag)?;
            Ok((base, Some(tag)))
        }
        _ => Ok((name, None)),
    }
}

fn check_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() {
        return Err("the tag after ':' is empty".to_string());
    }
    if tag.len() > MAX_TAG_LEN {
        return Err(format!("the tag is longer than {MAX_TAG_LEN} characters"));
    }
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = tag.as_bytes();
    if !word(bytes[0]) || !bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-') {
        return Err(format!("invalid tag {tag:?}: letters, digits, '_', '.' and '-', not starting with '.' or '-'"));
    }
    Ok(())
}

/// `sha256:<64 lower-case hex>` → the hex.
fn parse_digest(digest: &str) -> Result<String, String> {
    let Some(hex) = digest.strip_prefix("sha256:") else {
        let algorithm = digest.split(':').next().unwrap_or_default();
        return Err(format!("unsupported digest algorithm {algorithm:?}: only sha256 is supported"));
    };
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err("a sha256 digest must be 64 lower-case hex digits".to_string());
    }
    Ok(hex.to_string())
}

/// Path elements `[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*` joined by `/`.
fn check_repository(repository: &str) -> Result<(), String> {
    if repository.is_empty() {
        return Err("no repository name".to_string());
    }
    if repository.len() > MAX_REPOSITORY_LEN {
        return Err(format!("the repository name is longer than {MAX_REPOSITORY_LEN} characters"));
    }
    if repository.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(format!("repository {repository:?} must be lower case"));
    }
    for element in repository.split('/') {
        if !is_path_element(element) {
            return Err(format!(
                "invalid repository {repository:?}: each '/'-separated element is lower-case letters and digits, \
                 joined by '.', '_', '__' or dashes"
            ));
        }
    }
    Ok(())
}

fn is_path_element(element: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = element.as_bytes();
    let mut i = 0;
    loop {
        // A run of letters and digits...
        let start = i;
        while i < bytes.len() && alnum(bytes[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == bytes.len() {
            return true;
        }
        // ...then a separator: '.', '_', '__' or one or more '-'.
        match bytes[i] {
            b'.' => i += 1,
            b'_' => i += if bytes.get(i + 1) == Some(&b'_') { 2 } else { 1 },
            b'-' => {
                while bytes.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "4b3c3fc2e1dd6e4ee4f5f3b4f5e0a9a2b3b1c1d2e3f4a5b6c7d8e9f0a1b2c3d4";

    fn tag(registry: &str, repository: &str, tag: &str) -> Reference {
        Reference { registry: registry.into(), repository: repository.into(), target: Target::Tag(tag.into()) }
    }

    fn digest(registry: &str, repository: &str) -> Reference {
        Reference { registry: registry.into(), repository: repository.into(), target: Target::Digest(HEX.into()) }
    }

    #[test]
    fn good_references() {
        let cases: Vec<(String, Reference)> = vec![
            ("oci://ghcr.io/org/plugin:1.0".into(), tag("ghcr.io", "org/plugin", "1.0")),
            ("OCI://ghcr.io/org/plugin:1.0".into(), tag("ghcr.io", "org/plugin", "1.0")),
            ("Oci://ghcr.io/org/plugin".into(), tag("ghcr.io", "org/plugin", "latest")),
            // the registry is kept as written, case included
            ("oci://GHCR.io/org/plugin".into(), tag("GHCR.io", "org/plugin", "latest")),
            ("oci://127.0.0.1:5000/plugin:v1".into(), tag("127.0.0.1:5000", "plugin", "v1")),
            ("oci://127.0.0.1:5000/plugin".into(), tag("127.0.0.1:5000", "plugin", "latest")),
            ("oci://localhost:5000/plugin:v1".into(), tag("localhost:5000", "plugin", "v1")),
            ("oci://localhost/plugin".into(), tag("localhost", "plugin", "latest")),
            ("oci://[::1]:5000/plugin:v1".into(), tag("[::1]:5000", "plugin", "v1")),
            ("oci://[::1]:5000/plugin".into(), tag("[::1]:5000", "plugin", "latest")),
            ("oci://[::1]/a/b".into(), tag("[::1]", "a/b", "latest")),
            ("oci://reg.example:443/a/b/c/d:t_1.-x".into(), tag("reg.example:443", "a/b/c/d", "t_1.-x")),
            ("oci://my_reg.corp/a__b/c-d/e--f/g.h/i_j".into(), tag("my_reg.corp", "a__b/c-d/e--f/g.h/i_j", "latest")),
            // Docker Hub: none written, docker.io, index.docker.io; library/ for one element
            ("oci://nginx".into(), tag(DOCKER_HUB, "library/nginx", "latest")),
            ("oci://docker.io/nginx:1.25".into(), tag(DOCKER_HUB, "library/nginx", "1.25")),
            ("oci://index.docker.io/nginx".into(), tag(DOCKER_HUB, "library/nginx", "latest")),
            ("oci://docker.io/istio/plugin:1".into(), tag(DOCKER_HUB, "istio/plugin", "1")),
            // a first element without '.', ':' or localhost is a Docker Hub namespace
            ("oci://myregistry/app:v2".into(), tag(DOCKER_HUB, "myregistry/app", "v2")),
            // ggcr's reading of a lone host:port: Docker Hub's library/localhost at tag 5000
            ("oci://localhost:5000".into(), tag(DOCKER_HUB, "library/localhost", "5000")),
            // and of a lone host: a Docker Hub repository ('.' is a separator inside a path element)
            ("oci://ghcr.io".into(), tag(DOCKER_HUB, "library/ghcr.io", "latest")),
            // digests; a tag before the digest is dropped
            (format!("oci://ghcr.io/org/plugin@sha256:{HEX}"), digest("ghcr.io", "org/plugin")),
            (format!("oci://ghcr.io/org/plugin:1.0@sha256:{HEX}"), digest("ghcr.io", "org/plugin")),
            (format!("oci://localhost:5000/p:v@sha256:{HEX}"), digest("localhost:5000", "p")),
            (format!("oci://[::1]:5000/p@sha256:{HEX}"), digest("[::1]:5000", "p")),
            (format!("oci://docker.io/nginx@sha256:{HEX}"), digest(DOCKER_HUB, "library/nginx")),
            // query and fragment dropped, as Istio's u.Host + u.Path
            ("oci://ghcr.io/org/plugin:1.0?x=1".into(), tag("ghcr.io", "org/plugin", "1.0")),
            ("oci://ghcr.io/org/plugin:1.0#frag".into(), tag("ghcr.io", "org/plugin", "1.0")),
            (format!("oci://ghcr.io/p@sha256:{HEX}?a=b#c"), digest("ghcr.io", "p")),
            (
                format!("oci://reg.io/{}:{}", "a".repeat(255), "t".repeat(128)),
                tag("reg.io", &"a".repeat(255), &"t".repeat(128)),
            ),
        ];
        for (url, want) in cases {
            assert_eq!(Reference::parse(&url).as_ref(), Ok(&want), "{url}");
        }
    }

    #[test]
    fn bad_references() {
        let cases: Vec<(String, &str)> = vec![
            ("http://ghcr.io/a".into(), "not an oci:// URL"),
            ("oci:/ghcr.io/a".into(), "not an oci:// URL"),
            ("oci:".into(), "not an oci:// URL"),
            ("oci://".into(), "no registry or repository"),
            ("oci:///repo".into(), "no registry or repository"),
            ("oci://?x".into(), "no registry or repository"),
            ("oci://ghcr.io/".into(), "no repository name"),
            ("oci://ghcr.io/:tag".into(), "no repository name"),
            ("oci://ghcr.io/org/".into(), "invalid repository"),
            ("oci://ghcr.io/org//p".into(), "invalid repository"),
            ("oci://ghcr.io/Org/plugin".into(), "must be lower case"),
            ("oci://ghcr.io/org/-p".into(), "invalid repository"),
            ("oci://ghcr.io/org/p-".into(), "invalid repository"),
            ("oci://ghcr.io/org/p..q".into(), "invalid repository"),
            ("oci://ghcr.io/org/p___q".into(), "invalid repository"),
            ("oci://ghcr.io/org/p q".into(), "invalid repository"),
            ("oci://ghcr.io/org/é".into(), "invalid repository"),
            (format!("oci://reg.io/{}", "a".repeat(256)), "longer than 255"),
            // found by fuzzing: Docker Hub's library/ made a 255-character name 263 characters long
            (format!("oci://{}", "a".repeat(255)), "the repository name library/aaaaaaaaaaaa… is longer than 255"),
            (format!("oci://docker.io/{}", "a".repeat(248)), "longer than 255"),
            ("oci://ghcr.io/p:".into(), "tag after ':' is empty"),
            ("oci://ghcr.io/p:.x".into(), "invalid tag"),
            ("oci://ghcr.io/p:-x".into(), "invalid tag"),
            ("oci://ghcr.io/p:a+b".into(), "invalid tag"),
            (format!("oci://ghcr.io/p:{}", "t".repeat(129)), "longer than 128"),
            ("oci://ghcr.io/p%3Atag".into(), "percent-encoded"),
            (format!("oci://ghcr.io/p@sha512:{HEX}{HEX}"), "unsupported digest algorithm \"sha512\""),
            (format!("oci://ghcr.io/p@{HEX}"), "unsupported digest algorithm"),
            (format!("oci://ghcr.io/p@sha256:{}", &HEX[..63]), "64 lower-case hex"),
            (format!("oci://ghcr.io/p@sha256:{HEX}0"), "64 lower-case hex"),
            (format!("oci://ghcr.io/p@sha256:{}", HEX.to_uppercase()), "64 lower-case hex"),
            ("oci://ghcr.io/p@sha256:".into(), "64 lower-case hex"),
            (format!("oci://ghcr.io/p@sha256:{HEX}@sha256:{HEX}"), "exactly one '@'"),
            (format!("oci://ghcr.io/p:.bad@sha256:{HEX}"), "invalid tag"),
            ("oci://user:pass@ghcr.io/p".into(), "user info"),
            ("oci://user@ghcr.io/p".into(), "user info"),
            (format!("oci://nginx@sha256:{HEX}"), "a digest needs a repository path"),
            ("oci://ghcr.io:/p".into(), "invalid port"),
            ("oci://ghcr.io:0/p".into(), "invalid port"),
            ("oci://ghcr.io:65536/p".into(), "invalid port"),
            ("oci://ghcr.io:+80/p".into(), "invalid port"),
            ("oci://nginx:1.0".into(), "invalid port"),
            ("oci://:5000/p".into(), "has no name"),
            ("oci://gh cr.io/p".into(), "contains the character ' '"),
            ("oci://[::1/p".into(), "missing ']'"),
            ("oci://[zz]:5000/p".into(), "is not an IPv6 address"),
            ("oci://[::1]x/p".into(), "junk after ']'"),
            ("oci://[::1]:/p".into(), "invalid port"),
            (format!("oci://{}.io/p", "a".repeat(300)), "longer than 270"),
        ];
        for (url, want) in cases {
            let err = Reference::parse(&url).expect_err(&url);
            assert!(err.contains(want), "{url}: {err:?} should contain {want:?}");
            assert!(url.len() <= 6 || !err.contains(&url), "the caller adds the URL: {err}");
        }
    }

    #[test]
    fn manifest_reference_and_display() {
        let t = Reference::parse("oci://ghcr.io/org/p:v1").unwrap();
        assert_eq!(t.manifest_reference(), "v1");
        assert_eq!(t.to_string(), "ghcr.io/org/p:v1");
        let d = Reference::parse(&format!("oci://nginx:1@sha256:{HEX}")).unwrap_err();
        assert!(d.contains("a digest needs a repository path"), "{d}");
        let d = Reference::parse(&format!("oci://docker.io/nginx:1@sha256:{HEX}")).unwrap();
        assert_eq!(d.manifest_reference(), format!("sha256:{HEX}"));
        assert_eq!(d.to_string(), format!("index.docker.io/library/nginx@sha256:{HEX}"));
    }
}
