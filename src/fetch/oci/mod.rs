//! Modules from OCI registries (`oci://registry/repository[:tag|@sha256:…]`), as Istio's agent fetches them
//! (`pkg/wasm/imagefetcher.go`, `cache.go`) over go-containerregistry (`pkg/v1/remote`):
//!
//! 1. Resolve the manifest (`GET /v2/<repository>/manifests/<tag or digest>`, every manifest and index type
//!    accepted). Its digest is the sha256 of the exact bytes; a digest reference must match it. An index picks
//!    the entry for a Wasm platform (else the first) and that manifest is fetched by digest. The digest
//!    reported is that of the document the reference names (an index's own digest: what `@sha256:` pins).
//! 2. Compare it with the config's `sha256` (checksum mismatch), then ask the caller whether it already has the
//!    module for it (then nothing more is fetched).
//! 3. Pick the layer by image format (see `manifest`), stream it to a temp file with its digest and size
//!    verified, and for the compat formats extract `plugin.wasm` from it, streaming too.
//!
//! Each request tries the registry's mirrors, then the registry (see `registry`). Errors resolving the manifest
//! are manifest failures (`could not fetch Wasm OCI image: …`); an image in no known format and errors from the
//! layer on are download failures (`could not fetch Wasm binary: …`), as Istio counts them.

#[cfg_attr(not(test), allow(dead_code))]
mod auth;
#[doc(hidden)]
pub mod fuzzing;
mod manifest;
#[cfg_attr(not(test), allow(dead_code))]
mod reference;
mod registry;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::Digest;

use self::manifest::{Descriptor, Document, Packing};
use self::reference::{Reference, Target};
use self::registry::{read_at_most, Bounded, Failure, ReadError, Route, Session};
use super::client::{describe, Client};
use super::unbox;
use super::COPY_BUFFER_BYTES;
use super::{copy_hashed, CopyError, Downloaded, FetchError, FetchErrorKind, ImageFetched, ImageRequest, Staged};
use crate::options::Options;
use crate::store::files::new_temp_file;

/// The most a manifest or index may take: the distribution registry's own limit on what it accepts
/// (`maxManifestBodySize`, 4 MiB); real ones are a few KiB.
pub(crate) const MAX_MANIFEST_BYTES: u64 = 4 << 20;

pub(crate) struct OciFetcher {
    client: Arc<Client>,
    plain_http_hosts: Vec<String>,
    registry_mirrors: Vec<(String, Vec<String>)>,
    max_module_bytes: u64,
}

impl OciFetcher {
    pub fn new(client: Arc<Client>, options: &Options) -> OciFetcher {
        OciFetcher {
            client,
            plain_http_hosts: options.plain_http_hosts.clone(),
            registry_mirrors: options.registry_mirrors.clone(),
            max_module_bytes: options.max_module_bytes,
        }
    }

    /// See [`super::Fetcher::fetch_image`].
    pub fn fetch(
        &self,
        req: &ImageRequest<'_>,
        deadline: Instant,
        temp_dir: &Path,
        known: &mut dyn FnMut(&str) -> bool,
    ) -> Result<ImageFetched, FetchError> {
        // Worded as Istio's `PrepareFetch` (`pkg/wasm/imagefetcher.go`) and `getOrFetch` (`cache.go`); the URL is
        // not repeated: the conversion's reason names it.
        let manifest_error =
            |why: String| FetchError::new(FetchErrorKind::Manifest, format!("could not fetch Wasm OCI image: {why}"));
        let reference = Reference::parse(req.url)
            .map_err(|why| manifest_error(format!("could not parse url in image reference: {why}")))?;
        let route = Route {
            registry: &reference.registry,
            repository: &reference.repository,
            plain_http: self.is_plain_http(&reference.registry),
            mirrors: self.mirrors_of(&reference.registry),
            pull_secret: req.pull_secret,
        };
        let mut session = Session::new(&self.client, deadline, &route)
            .map_err(|why| manifest_error(format!("the pull secret is unusable: {why}")))?;
        let (manifest_digest, media_type, layers) = match resolve(&mut session, &reference) {
            Ok(resolved) => resolved,
            Err(Failure::Unavailable(why)) => return Err(manifest_error(format!("could not fetch manifest: {why}"))),
            Err(Failure::Fatal(e)) => return Err(e),
        };
        log::debug!("OCI: {} resolved to manifest sha256:{manifest_digest}", req.url);
        if let Some(expected) = req.expected_manifest {
            if !expected.eq_ignore_ascii_case(&manifest_digest) {
                return Err(FetchError::new(
                    FetchErrorKind::ChecksumMismatch,
                    format!(
                        "module downloaded from {} has checksum {manifest_digest}, which does not match: {expected}",
                        req.url
                    ),
                ));
            }
        }
        if known(&manifest_digest) {
            return Ok(ImageFetched::Known { manifest_digest });
        }
        // Decided from the manifest, yet counted as Istio does: its binary fetcher finds the format, so an
        // unusable image is a download failure ("could not fetch Wasm binary: …").
        let (layer, packing) = manifest::choose_layer(&media_type, &layers)
            .map_err(|why| FetchError::new(FetchErrorKind::Download, format!("could not fetch Wasm binary: {why}")))?;
        let module = self
            .download(&mut session, &layer, packing, temp_dir)
            .map_err(|e| FetchError { kind: e.kind, message: format!("could not fetch Wasm binary: {}", e.message) })?;
        Ok(ImageFetched::Downloaded { manifest_digest, module })
    }

    /// Whether the registry is spoken to over plain HTTP: `plain_http_hosts` holds it (`host[:port]` as
    /// written) or `*`.
    fn is_plain_http(&self, registry: &str) -> bool {
        self.plain_http_hosts.iter().any(|h| h == "*" || h.eq_ignore_ascii_case(registry))
    }

    /// The mirrors configured for `registry` (Docker Hub's also under `docker.io`).
    fn mirrors_of(&self, registry: &str) -> &[String] {
        let is_key = |key: &str| {
            key.eq_ignore_ascii_case(registry)
                || (registry == "index.docker.io" && key.eq_ignore_ascii_case("docker.io"))
        };
        self.registry_mirrors.iter().find(|(key, _)| is_key(key)).map_or(&[], |(_, endpoints)| endpoints.as_slice())
    }

    /// Streams `layer` to a temp file in `temp_dir`, its digest and size verified, and takes the module out of it.
    fn download(
        &self,
        session: &mut Session<'_>,
        layer: &Descriptor,
        packing: Packing,
        temp_dir: &Path,
    ) -> Result<Downloaded, FetchError> {
        if layer.size > self.max_module_bytes {
            return Err(FetchError::too_large(self.max_module_bytes));
        }
        let mut buf = vec![0u8; COPY_BUFFER_BYTES];
        let reference = format!("sha256:{}", layer.digest);
        let staged = session.get("blobs", &reference, None, &mut |response, timeout| {
            read_blob(response, timeout, layer, temp_dir, &mut buf)
        });
        let staged = match staged {
            Ok(staged) => staged,
            Err(Failure::Unavailable(why)) => return Err(FetchError::new(FetchErrorKind::Download, why)),
            Err(Failure::Fatal(e)) => return Err(e),
        };
        let module = match packing {
            Packing::Raw => staged,
            Packing::PluginInTarGz => unbox::extract_plugin(&staged, temp_dir, self.max_module_bytes, &mut buf)?,
        };
        Ok(Downloaded {
            is_wasm: unbox::is_wasm(&module, temp_dir)?,
            not_unpacked: None,
            file: module.file,
            sha256: module.sha256,
            len: module.len,
        })
    }
}

/// The manifest `reference` resolves to: its digest (of the document the reference names), the media type and
/// layers of the image manifest (through the index, if it is one).
fn resolve(session: &mut Session<'_>, reference: &Reference) -> Result<(String, String, Vec<Descriptor>), Failure> {
    let named_digest = match &reference.target {
        Target::Digest(hex) => Some(hex.as_str()),
        Target::Tag(_) => None,
    };
    let (digest, document) = get_manifest(session, &reference.manifest_reference(), named_digest)?;
    match document {
        Document::Manifest { media_type, layers } => Ok((digest, media_type, layers)),
        Document::Index { manifests } => {
            let entry = manifest::pick_platform(&manifests).map_err(Failure::Unavailable)?;
            log::debug!("OCI: the index picks sha256:{} (platform {:?})", entry.digest, entry.platform);
            let entry_reference = format!("sha256:{}", entry.digest);
            match get_manifest(session, &entry_reference, Some(&entry.digest))? {
                (_, Document::Manifest { media_type, layers }) => Ok((digest, media_type, layers)),
                (_, Document::Index { .. }) => Err(Failure::Unavailable(format!(
                    "the index's entry {entry_reference} is itself an index, which is not followed"
                ))),
            }
        }
    }
}

/// A manifest or index by tag or digest, with its digest. An endpoint whose answer is unusable (not a manifest,
/// too large, or — when `expected` names a digest — other bytes) is skipped like one that is down.
fn get_manifest(
    session: &mut Session<'_>,
    reference: &str,
    expected: Option<&str>,
) -> Result<(String, Document), Failure> {
    session.get("manifests", reference, Some(manifest::MANIFEST_ACCEPT), &mut |response, timeout| {
        let content_type =
            response.headers().get(ureq::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string);
        let too_large =
            || ReadError::Reject(format!("the manifest is larger than the limit of {MAX_MANIFEST_BYTES} bytes"));
        if announced_length(response).is_some_and(|n| n > MAX_MANIFEST_BYTES) {
            return Err(too_large());
        }
        let body = read_at_most(response, MAX_MANIFEST_BYTES).map_err(|e| match e {
            Bounded::TooLarge => too_large(),
            Bounded::Read(e) => ReadError::Retry(body_error(e, timeout)),
        })?;
        let digest = hex::encode(sha2::Sha256::digest(&body));
        if let Some(expected) = expected.filter(|e| !e.eq_ignore_ascii_case(&digest)) {
            return Err(ReadError::Reject(format!(
                "manifest digest mismatch: got sha256:{digest}, want sha256:{expected}"
            )));
        }
        let document = manifest::parse(&body, content_type.as_deref()).map_err(ReadError::Reject)?;
        Ok((digest, document))
    })
}

/// Streams a blob answer into a temp file: no more bytes than the descriptor's size, exactly its digest.
fn read_blob(
    response: &mut ureq::http::Response<ureq::Body>,
    timeout: Duration,
    layer: &Descriptor,
    temp_dir: &Path,
    buf: &mut [u8],
) -> Result<Staged, ReadError> {
    let larger = || ReadError::Reject(format!("the blob is larger than its descriptor's size of {} bytes", layer.size));
    if announced_length(response).is_some_and(|n| n > layer.size) {
        return Err(larger());
    }
    let mut file = new_temp_file(temp_dir)
        .map_err(|e| ReadError::Fatal(FetchError::io("cannot create a temp file", temp_dir, &e)))?;
    let mut reader = response.body_mut().as_reader();
    // On any error `file` is dropped here, which deletes it.
    let (sha256, len) = copy_hashed(&mut reader, file.as_file_mut(), buf, layer.size).map_err(|e| match e {
        CopyError::Read(e) => ReadError::Retry(body_error(e, timeout)),
        CopyError::Write(e) => ReadError::Fatal(FetchError::io("cannot write the module", temp_dir, &e)),
        CopyError::TooLarge => larger(),
    })?;
    if len != layer.size {
        return Err(ReadError::Reject(format!("the blob has {len} bytes, its descriptor declares {}", layer.size)));
    }
    if sha256 != layer.digest {
        return Err(ReadError::Reject(format!(
            "layer digest mismatch: got sha256:{sha256}, want sha256:{}",
            layer.digest
        )));
    }
    Ok(Staged { file, sha256, len })
}

/// `Content-Length`, when ureq left it in place (it removes it when it decompresses the body).
fn announced_length(response: &ureq::http::Response<ureq::Body>) -> Option<u64> {
    response
        .headers()
        .get(ureq::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

fn body_error(e: std::io::Error, timeout: Duration) -> String {
    let why = if e.kind() == std::io::ErrorKind::UnexpectedEof {
        "connection closed before the full body was received".to_string()
    } else {
        describe(&ureq::Error::from(e), timeout)
    };
    format!("reading the response body: {why}")
}
