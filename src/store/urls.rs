//! What a URL resolved to last time, per consumer resource, and the pull-policy rule that decides whether
//! that answer may be used again. This is Istio's `checksums` map (`pkg/wasm/cache.go`): a request without
//! a sha256 is answered by the checksum its URL resolved to before, so a mutable URL is not downloaded on
//! every push; the resource version stored per consumer resource tells when a `pull_policy: Always`
//! module must be fetched again.

use std::collections::HashMap;
use std::sync::Arc;

use super::files::{is_sha256_hex, sha256_hex};
use crate::module::{ModuleRequest, PullPolicy};

/// The checksum one URL resolved to, and the resource version each consumer asked for it with.
pub(super) struct UrlEntry {
    pub checksum: Arc<str>,
    pub rv_by_resource: HashMap<String, String>,
}

#[derive(Default)]
pub(super) struct UrlMap {
    urls: HashMap<String, UrlEntry>,
    /// Entries from the index, keyed by hex sha256 of the URL (URLs never reach the disk), moved into `urls`
    /// on first use.
    restored: HashMap<String, UrlEntry>,
}

impl UrlMap {
    /// The checksum a checksum-less request resolves to, if it may be used; stores the requester's resource
    /// version either way. As Istio's `getEntry` (`pkg/wasm/cache.go`): the stored checksum is used when the
    /// policy ignores resource versions, or when this resource asked with the same version before.
    pub fn lookup_url(&mut self, req: &ModuleRequest, ignore_rv: bool) -> Option<Arc<str>> {
        if !self.urls.contains_key(req.url.as_str()) {
            if self.restored.is_empty() {
                return None;
            }
            let restored = self.restored.remove(&sha256_hex(req.url.as_bytes()))?;
            self.urls.insert(req.url.clone(), restored);
        }
        let entry = self.urls.get_mut(req.url.as_str())?;
        let stored_rv = entry.rv_by_resource.get(req.resource_name.as_str());
        let found = if ignore_rv || stored_rv.map(String::as_str).unwrap_or("") == req.resource_version {
            Some(entry.checksum.clone())
        } else {
            None
        };
        if stored_rv.map(String::as_str) != Some(req.resource_version.as_str()) {
            entry.rv_by_resource.insert(req.resource_name.clone(), req.resource_version.clone());
        }
        found
    }

    /// Istio's `updateChecksum`: remember what `req.url` resolved to, with the requester's resource version.
    /// Allocates only when something changed.
    pub fn refresh_url(&mut self, req: &ModuleRequest, sha: &Arc<str>) {
        if is_oci_digest_url(&req.url) {
            return;
        }
        match self.urls.get_mut(req.url.as_str()) {
            Some(entry) => {
                if entry.checksum != *sha {
                    entry.checksum = sha.clone();
                }
                if entry.rv_by_resource.get(req.resource_name.as_str()) != Some(&req.resource_version) {
                    entry.rv_by_resource.insert(req.resource_name.clone(), req.resource_version.clone());
                }
            }
            None => {
                let mut rv_by_resource = HashMap::new();
                rv_by_resource.insert(req.resource_name.clone(), req.resource_version.clone());
                self.urls.insert(req.url.clone(), UrlEntry { checksum: sha.clone(), rv_by_resource });
            }
        }
    }

    /// A module left the store: forget the URLs that resolved to it.
    pub fn forget_urls_of(&mut self, sha: &str) {
        self.urls.retain(|_, u| &*u.checksum != sha);
        self.restored.retain(|_, u| &*u.checksum != sha);
    }

    /// An entry read from the index, for the URL whose hex sha256 is `url_sha256`.
    pub fn restore(&mut self, url_sha256: String, entry: UrlEntry) {
        self.restored.insert(url_sha256, entry);
    }

    /// Every entry, keyed by the hex sha256 of its URL: what the index keeps.
    pub fn by_url_sha256(&self) -> impl Iterator<Item = (String, &UrlEntry)> {
        self.urls
            .iter()
            .map(|(url, u)| (sha256_hex(url.as_bytes()), u))
            .chain(self.restored.iter().map(|(h, u)| (h.clone(), u)))
    }
}

/// Whether a checksum-less request may reuse what its URL resolved to whatever its resource version, as
/// Istio's `shouldIgnoreResourceVersion` (`pkg/wasm/cache.go`): `Always` never; `IfNotPresent` always;
/// unspecified always, except for an `oci://` image tagged `latest` (which behaves as `Always`). Istio
/// looks only for a `:latest` suffix; an image reference without tag or digest means `latest` too (as
/// `name.ParseReference` reads it), so `oci://reg/repo` is treated the same.
pub(super) fn ignore_resource_version(policy: PullPolicy, url: &str) -> bool {
    match policy {
        PullPolicy::Always => false,
        PullPolicy::IfNotPresent => true,
        PullPolicy::Unspecified => !(scheme_is(url, "oci") && is_latest(url)),
    }
}

/// Whether the image `oci://` URL `url` names is tagged `latest`, explicitly or by having no tag or digest.
/// As go-containerregistry: the tag follows the last `:` after the last `/` (`reg:5000/repo` has none).
fn is_latest(url: &str) -> bool {
    if url.contains('@') {
        return false;
    }
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let name = rest.split(['?', '#']).next().unwrap_or("");
    let last = name.rsplit('/').next().unwrap_or("");
    match last.rsplit_once(':') {
        Some((_, tag)) => tag == "latest",
        None => true,
    }
}

/// Digest-pinned OCI URLs are immutable: Istio (`pkg/wasm/cache.go`) keeps them out of the URL map.
fn is_oci_digest_url(url: &str) -> bool {
    scheme_is(url, "oci") && url.contains('@')
}

/// The manifest digest an `oci://…@sha256:<hex>` URL names (lower-case hex, without `sha256:`), as Istio's
/// `getEntry` (`pkg/wasm/cache.go`) takes it for the checksum of a request without one. A digest of another
/// algorithm, or a malformed one, gives none: Istio then does without the cache.
pub(super) fn url_manifest_digest(url: &str) -> Option<&str> {
    if !scheme_is(url, "oci") {
        return None;
    }
    let (name, digest) = url.rsplit_once('@')?;
    let hex = digest.strip_prefix("sha256:")?;
    (!name.ends_with("://") && is_sha256_hex(hex)).then_some(hex)
}

fn scheme_is(url: &str, scheme: &str) -> bool {
    url.split_once("://").is_some_and(|(s, _)| s.eq_ignore_ascii_case(scheme))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fixture::{fixture, req, wasm};

    /// One row per case of Istio's pull-policy behaviour (`pkg/wasm/cache.go`: `getEntry` with
    /// `shouldIgnoreResourceVersion`) for HTTP URLs: (policy, url, second resource version, expect a second
    /// download).
    #[test]
    fn pull_policy_table() {
        let rows = [
            (PullPolicy::IfNotPresent, "http://x/m.wasm", "1", false),
            (PullPolicy::IfNotPresent, "http://x/m.wasm", "2", false),
            (PullPolicy::Always, "http://x/m.wasm", "1", false),
            (PullPolicy::Always, "http://x/m.wasm", "2", true),
            (PullPolicy::Unspecified, "http://x/m.wasm", "2", false),
            (PullPolicy::Unspecified, "http://x/m:latest", "2", false),
            (PullPolicy::Unspecified, "http://x/m", "2", false),
        ];
        // The `oci://` rows are in the store's OCI tests.
        for (policy, url, rv2, refetch) in rows {
            let f = fixture();
            f.fetcher.serve(url, &wasm("m"));
            let first = ModuleRequest { pull_policy: policy, ..req(url) };
            f.store().get(&first).unwrap();
            let second = ModuleRequest { resource_version: rv2.into(), ..first.clone() };
            f.store().get(&second).unwrap();
            assert_eq!(f.fetcher.calls(), if refetch { 2 } else { 1 }, "{policy:?} {url} rv {rv2}");
            // The new version was recorded: asking again with it does not download again.
            f.store().get(&second).unwrap();
            assert_eq!(f.fetcher.calls(), if refetch { 2 } else { 1 }, "{policy:?} {url} rv {rv2} again");
        }
    }

    #[test]
    fn always_with_changed_version_picks_up_new_content() {
        let f = fixture();
        let url = "http://x/m.wasm";
        f.fetcher.serve(url, &wasm("v1"));
        let r1 = ModuleRequest { pull_policy: PullPolicy::Always, ..req(url) };
        let m1 = f.store().get(&r1).unwrap();
        f.fetcher.serve(url, &wasm("v2"));
        let m_same = f.store().get(&r1).unwrap();
        assert_eq!(m1, m_same);
        let r2 = ModuleRequest { resource_version: "2".into(), ..r1.clone() };
        let m2 = f.store().get(&r2).unwrap();
        assert_ne!(m1.sha256, m2.sha256);
        assert_eq!(&*m2.sha256, sha256_hex(&wasm("v2")));
        // Resource versions are per resource: another resource at version 1 has no record yet and ignores nothing.
        let other = ModuleRequest { resource_name: "other".into(), ..r1.clone() };
        let m_other = f.store().get(&other).unwrap();
        assert_eq!(m_other, m2);
    }

    #[test]
    fn url_helpers() {
        let unspecified = |url| ignore_resource_version(PullPolicy::Unspecified, url);
        assert!(unspecified("http://x/m:latest"));
        assert!(unspecified("http://x/m"));
        assert!(!unspecified("OCI://reg/m:latest"));
        assert!(!unspecified("oci://reg/m:latest?x=1"));
        // No tag and no digest is `latest`; a registry port is not a tag.
        assert!(!unspecified("oci://reg/m"));
        assert!(!unspecified("oci://reg:5000/team/m"));
        assert!(unspecified("oci://reg:5000/team/m:v1"));
        // As go-containerregistry reads `reg:latest`: Docker Hub's `library/reg`, tagged `latest`.
        assert!(!unspecified("oci://reg:latest"));
        assert!(unspecified("oci://reg/m:v1"));
        assert!(unspecified("oci://reg/m:latest-1"));
        assert!(unspecified(&format!("oci://reg/m@sha256:{}", "a".repeat(64))));
        assert!(!ignore_resource_version(PullPolicy::Always, "http://x"));
        assert!(ignore_resource_version(PullPolicy::IfNotPresent, "oci://reg/m:latest"));
        assert!(ignore_resource_version(PullPolicy::IfNotPresent, "oci://reg/m"));

        let hex = "0123456789abcdef".repeat(4);
        assert_eq!(url_manifest_digest(&format!("oci://reg/m@sha256:{hex}")), Some(hex.as_str()));
        assert_eq!(url_manifest_digest(&format!("OCI://reg:5000/a/m:v1@sha256:{hex}")), Some(hex.as_str()));
        for none in [
            format!("http://reg/m@sha256:{hex}"),
            format!("oci://reg/m@sha512:{hex}"),
            format!("oci://reg/m@sha256:{}", hex.to_ascii_uppercase()),
            format!("oci://reg/m@sha256:{}", &hex[1..]),
            format!("oci://@sha256:{hex}"),
            "oci://reg/m:v1".to_owned(),
        ] {
            assert_eq!(url_manifest_digest(&none), None, "{none}");
        }
    }
}
