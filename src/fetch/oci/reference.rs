//! `oci://` URLs as image references, parsed as go-containerregistry's `name.ParseReference` does (Istio's
//! `imagefetcher.go` hands it `host + path` of the URL). SKELETON: bodies to be written.

/// What the manifest is asked for by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// A tag; `latest` when the reference has neither tag nor digest.
    Tag(String),
    /// A `sha256:` digest, as lower-case hex without the algorithm. Immutable: never re-resolved.
    Digest(String),
}

/// An image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reference {
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
        let _ = url;
        todo!("parse oci:// references")
    }

    /// The last path element of `/v2/<repository>/manifests/<reference>`: the tag, or `sha256:<hex>`.
    pub fn manifest_reference(&self) -> String {
        match &self.target {
            Target::Tag(tag) => tag.clone(),
            Target::Digest(hex) => format!("sha256:{hex}"),
        }
    }
}
