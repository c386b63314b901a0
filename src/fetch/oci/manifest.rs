//! Manifests, indexes and the image formats a Wasm module ships in: which layer holds the module, decided from
//! the manifest alone, before any layer is downloaded.
//!
//! Media types: OCI image-spec `media-types.go`, `manifest.md`, `image-index.md`; Docker's distribution
//! manifest v2 and manifest list. Formats: Istio `pkg/wasm/imagefetcher.go` (Docker compat, OCI compat, OCI
//! artifact, tried in that order, with its reasons' wording), plus the single-layer artifact Istio rejects
//! (istio #39990; wasm-to-oci, wasm-pkg, ORAS).

use serde::Deserialize;

pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(crate) const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub(crate) const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub(crate) const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub(crate) const WASM_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
pub(crate) const APPLICATION_WASM: &str = "application/wasm";

/// The `Accept` header of a manifest request: every document type understood, as go-containerregistry sends.
pub(crate) const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

/// The most entries of an index, or layers of a manifest, looked at. Real Wasm images have one or two;
/// multi-platform indexes a few dozen. Bounds the work (and the reasons' length) for a hostile document; the
/// 4 MiB body bound alone would allow tens of thousands.
pub(crate) const MAX_DESCRIPTORS: usize = 1024;
/// The most characters of outside text (a media type, a JSON error quoting the document, an error message from
/// a registry, a realm) quoted in a reason: a hostile 4 MiB manifest must not make a 4 MiB NACK.
pub(crate) const MAX_QUOTED_CHARS: usize = 200;

/// A content descriptor (OCI `descriptor.md`): what a manifest says of a layer or an index of a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    /// Lower-case hex of a `sha256:` digest.
    pub digest: String,
    pub size: u64,
    /// `(os, architecture)` of an index entry.
    pub platform: Option<(String, String)>,
}

/// A manifest or index, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Document {
    Manifest { media_type: String, layers: Vec<Descriptor> },
    Index { manifests: Vec<Descriptor> },
}

#[derive(Deserialize)]
struct RawDocument {
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    manifests: Option<Vec<RawDescriptor>>,
    layers: Option<Vec<RawDescriptor>>,
}

#[derive(Deserialize)]
struct RawDescriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    platform: Option<RawPlatform>,
}

#[derive(Deserialize)]
struct RawPlatform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
}

/// Parses a manifest or index. Its media type is the response's `Content-Type` when that names a known
/// document type (go-containerregistry does the same), else the document's own `mediaType`, else its shape
/// (`manifests` for an index, `layers` for a manifest; OCI makes `mediaType` optional).
pub(crate) fn parse(body: &[u8], content_type: Option<&str>) -> Result<Document, String> {
    let raw: RawDocument = serde_json::from_slice(body)
        .map_err(|e| format!("the manifest is not a valid JSON document: {}", json_error(&e)))?;
    let header = content_type.map(|v| v.split(';').next().unwrap_or_default().trim().to_ascii_lowercase());
    let known = |t: &str| [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST].contains(&t);
    let media_type = match (header.filter(|t| known(t)), raw.media_type.filter(|t| !t.is_empty())) {
        (Some(t), _) | (None, Some(t)) => t,
        (None, None) if raw.manifests.is_some() => OCI_INDEX.to_string(),
        (None, None) => OCI_MANIFEST.to_string(),
    };
    let descriptors = |list: Option<Vec<RawDescriptor>>, what: &str| -> Result<Vec<Descriptor>, String> {
        let list = list.unwrap_or_default();
        if list.len() > MAX_DESCRIPTORS {
            return Err(format!("the {what} lists {} entries, more than the limit of {MAX_DESCRIPTORS}", list.len()));
        }
        list.into_iter().map(descriptor).collect()
    };
    match media_type.as_str() {
        OCI_INDEX | DOCKER_MANIFEST_LIST => Ok(Document::Index { manifests: descriptors(raw.manifests, "index")? }),
        OCI_MANIFEST | DOCKER_MANIFEST => {
            Ok(Document::Manifest { layers: descriptors(raw.layers, "manifest")?, media_type })
        }
        other => Err(format!("unsupported manifest media type {}", shown(other))),
    }
}

/// serde_json's message (which may quote the document: `invalid type: string "…"`), cut short when long.
fn json_error(e: &serde_json::Error) -> String {
    let message = e.to_string();
    match truncate(&message, MAX_QUOTED_CHARS) {
        whole if whole.len() == message.len() => message,
        cut => format!("{cut}… at line {} column {}", e.line(), e.column()),
    }
}

fn descriptor(raw: RawDescriptor) -> Result<Descriptor, String> {
    Ok(Descriptor {
        digest: sha256_hex(&raw.digest)?,
        media_type: raw.media_type,
        size: raw.size,
        platform: raw.platform.map(|p| (p.os, p.architecture)),
    })
}

/// The hex of a `sha256:<64 lower-case hex>` digest; other algorithms are refused (every registry writes
/// sha256, and only it is verified here).
pub(crate) fn sha256_hex(digest: &str) -> Result<String, String> {
    match digest.strip_prefix("sha256:") {
        Some(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) => {
            Ok(hex.to_string())
        }
        _ => Err(format!("unsupported digest {:?} (expect sha256:<64 hex digits>)", truncate(digest, 80))),
    }
}

/// The index entry to use: the first for a Wasm platform (`wasip1`/`wasm`, or `wasi`/`wasm32`), else the only
/// one, else the first.
pub(crate) fn pick_platform(manifests: &[Descriptor]) -> Result<&Descriptor, String> {
    let is_wasm = |d: &&Descriptor| {
        d.platform
            .as_ref()
            .is_some_and(|(os, arch)| (os == "wasip1" && arch == "wasm") || (os == "wasi" && arch == "wasm32"))
    };
    manifests.iter().find(is_wasm).or(manifests.first()).ok_or_else(|| "the index lists no manifest".to_string())
}

/// How the module sits in its layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    /// A gzipped tar holding a file whose base name is `plugin.wasm` (the compat formats).
    PluginInTarGz,
    /// The layer is the module.
    Raw,
}

/// Which layer of a manifest holds the module, and how: the formats in Istio's order, then the single-layer
/// artifact. When none fits, the reason lists why each did not.
pub(crate) fn choose_layer(media_type: &str, layers: &[Descriptor]) -> Result<(Descriptor, Packing), String> {
    let last_layer = |expect: &str| -> Result<Descriptor, String> {
        let layer = layers.last().ok_or_else(|| "number of layers must be greater than zero".to_string())?;
        if layer.media_type != expect {
            return Err(format!("invalid media type {} (expect {expect})", shown(&layer.media_type)));
        }
        Ok(layer.clone())
    };
    let docker = if media_type == DOCKER_MANIFEST {
        last_layer(DOCKER_LAYER)
    } else {
        Err(format!("the manifest's media type is {media_type} (expect {DOCKER_MANIFEST})"))
    };
    let docker = match docker {
        Ok(layer) => return Ok((layer, Packing::PluginInTarGz)),
        Err(why) => why,
    };
    let compat = match last_layer(OCI_LAYER) {
        Ok(layer) => return Ok((layer, Packing::PluginInTarGz)),
        Err(why) => why,
    };
    let artifact = if layers.len() != 2 {
        format!("number of layers must be 2 but got {}", layers.len())
    } else if let Some(layer) = layers.iter().find(|l| l.media_type == WASM_LAYER) {
        return Ok((layer.clone(), Packing::Raw));
    } else {
        format!("could not find the layer of type {WASM_LAYER}")
    };
    let single = match layers {
        [layer] if layer.media_type == WASM_LAYER || layer.media_type == APPLICATION_WASM => {
            return Ok((layer.clone(), Packing::Raw));
        }
        [layer] => {
            format!("invalid media type {} (expect {WASM_LAYER} or {APPLICATION_WASM})", shown(&layer.media_type))
        }
        _ => format!("number of layers must be 1 but got {}", layers.len()),
    };
    Err(format!(
        "the given image is in invalid format as an OCI image: could not parse as Docker image: {docker}; \
         could not parse as compat variant: {compat}; could not parse as oci variant: {artifact}; \
         could not parse as single-layer Wasm artifact: {single}"
    ))
}

/// Outside text as a reason quotes it: at most [`MAX_QUOTED_CHARS`] characters, no control characters.
fn shown(s: &str) -> String {
    truncate(s, MAX_QUOTED_CHARS).chars().filter(|c| !c.is_control()).collect()
}

/// At most `max` characters of `s` (on a character boundary), for quoting outside text in reasons.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn layer(media_type: &str, digest: &str) -> Descriptor {
        Descriptor { media_type: media_type.into(), digest: digest[7..].into(), size: 10, platform: None }
    }

    fn entry(os: &str, arch: &str, digest: &str) -> Descriptor {
        Descriptor { platform: Some((os.into(), arch.into())), ..layer(OCI_MANIFEST, digest) }
    }

    #[test]
    fn media_type_from_header_then_document_then_shape() {
        let manifest =
            format!(r#"{{"schemaVersion":2,"layers":[{{"mediaType":"{WASM_LAYER}","digest":"{D1}","size":3}}]}}"#);
        let doc = parse(manifest.as_bytes(), Some(&format!("{DOCKER_MANIFEST}; charset=utf-8"))).unwrap();
        assert!(matches!(doc, Document::Manifest { ref media_type, .. } if media_type == DOCKER_MANIFEST));
        // An unknown header type falls back to the document, then to the shape.
        let doc = parse(manifest.as_bytes(), Some("application/json")).unwrap();
        let Document::Manifest { media_type, layers } = doc else { panic!() };
        assert_eq!(media_type, OCI_MANIFEST);
        assert_eq!(layers, vec![Descriptor { size: 3, ..layer(WASM_LAYER, D1) }]);
        let index = format!(
            r#"{{"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{D2}","size":5,"platform":{{"os":"wasip1","architecture":"wasm"}}}}]}}"#
        );
        let Document::Index { manifests } = parse(index.as_bytes(), None).unwrap() else { panic!() };
        assert_eq!(manifests[0].platform, Some(("wasip1".into(), "wasm".into())));
        let listed = format!(r#"{{"mediaType":"{DOCKER_MANIFEST_LIST}","manifests":[]}}"#);
        assert!(matches!(parse(listed.as_bytes(), None).unwrap(), Document::Index { .. }));
    }

    #[test]
    fn unusable_documents_are_refused_with_a_reason() {
        for (body, why) in [
            ("not json".to_string(), "the manifest is not a valid JSON document"),
            (
                r#"{"mediaType":"application/vnd.docker.distribution.manifest.v1+prettyjws"}"#.to_string(),
                "unsupported manifest media type application/vnd.docker.distribution.manifest.v1+prettyjws",
            ),
            (r#"{"layers":[{"mediaType":"x","digest":"sha512:ab","size":1}]}"#.to_string(), "unsupported digest"),
            (
                format!(r#"{{"layers":[{{"mediaType":"x","digest":"{}","size":1}}]}}"#, D1.to_uppercase()),
                "unsupported digest",
            ),
            (
                r#"{"layers":[{"mediaType":"x","digest":"sha256:ab","size":-1}]}"#.to_string(),
                "the manifest is not a valid JSON document",
            ),
        ] {
            let err = parse(body.as_bytes(), None).unwrap_err();
            assert!(err.starts_with(why), "{body}: {err}");
        }
        let many: Vec<String> =
            (0..=MAX_DESCRIPTORS).map(|_| format!(r#"{{"mediaType":"x","digest":"{D1}","size":1}}"#)).collect();
        let body = format!(r#"{{"layers":[{}]}}"#, many.join(","));
        assert_eq!(
            parse(body.as_bytes(), None).unwrap_err(),
            "the manifest lists 1025 entries, more than the limit of 1024"
        );
    }

    #[test]
    fn outside_text_in_reasons_is_bounded() {
        let long = "x".repeat(10_000);
        let err = parse(format!(r#"{{"layers":"{long}"}}"#).as_bytes(), None).unwrap_err();
        assert!(err.starts_with("the manifest is not a valid JSON document: invalid type: string"), "{err}");
        assert!(err.ends_with("… at line 1 column 10012"), "{err}");
        let err = parse(format!(r#"{{"mediaType":"{long}"}}"#).as_bytes(), None).unwrap_err();
        assert_eq!(err, format!("unsupported manifest media type {}", &long[..MAX_QUOTED_CHARS]));
        let err = choose_layer(OCI_MANIFEST, &[layer(&format!("a\n{long}"), D1)]).unwrap_err();
        assert!(err.len() < 1000 && !err.contains('\n'), "{err}");
    }

    #[test]
    fn platform_pick() {
        let first = entry("linux", "amd64", D1);
        let wasip1 = entry("wasip1", "wasm", D2);
        let wasi = entry("wasi", "wasm32", D2);
        assert_eq!(pick_platform(&[first.clone(), wasip1.clone()]).unwrap(), &wasip1);
        assert_eq!(pick_platform(&[first.clone(), wasi.clone()]).unwrap(), &wasi);
        assert_eq!(pick_platform(&[first.clone(), entry("wasi", "wasm", D2)]).unwrap(), &first);
        assert_eq!(pick_platform(std::slice::from_ref(&wasi)).unwrap(), &wasi);
        let untagged = layer(OCI_MANIFEST, D2);
        assert_eq!(pick_platform(std::slice::from_ref(&untagged)).unwrap(), &untagged);
        assert_eq!(pick_platform(&[]).unwrap_err(), "the index lists no manifest");
    }

    #[test]
    fn each_format_is_recognised() {
        let docker = [layer(DOCKER_LAYER, D1), layer(DOCKER_LAYER, D2)];
        assert_eq!(choose_layer(DOCKER_MANIFEST, &docker).unwrap(), (docker[1].clone(), Packing::PluginInTarGz));
        let compat = [layer(OCI_LAYER, D1)];
        assert_eq!(choose_layer(OCI_MANIFEST, &compat).unwrap(), (compat[0].clone(), Packing::PluginInTarGz));
        let artifact = [layer(WASM_LAYER, D1), layer("application/vnd.module.wasm.config.v1+json", D2)];
        assert_eq!(choose_layer(OCI_MANIFEST, &artifact).unwrap(), (artifact[0].clone(), Packing::Raw));
        for media_type in [WASM_LAYER, APPLICATION_WASM] {
            let single = [layer(media_type, D2)];
            assert_eq!(choose_layer(OCI_MANIFEST, &single).unwrap(), (single[0].clone(), Packing::Raw));
        }
    }

    #[test]
    fn unusable_formats_list_every_reason() {
        let err = choose_layer(OCI_MANIFEST, &[]).unwrap_err();
        assert_eq!(
            err,
            format!(
                "the given image is in invalid format as an OCI image: could not parse as Docker image: the manifest's \
                 media type is {OCI_MANIFEST} (expect {DOCKER_MANIFEST}); could not parse as compat variant: number \
                 of layers must be greater than zero; could not parse as oci variant: number of layers must be 2 but \
                 got 0; could not parse as single-layer Wasm artifact: number of layers must be 1 but got 0"
            )
        );
        let err = choose_layer(DOCKER_MANIFEST, &[layer("text/plain", D1), layer("text/plain", D2)]).unwrap_err();
        assert!(err.contains(&format!("Docker image: invalid media type text/plain (expect {DOCKER_LAYER})")), "{err}");
        assert!(err.contains(&format!("compat variant: invalid media type text/plain (expect {OCI_LAYER})")), "{err}");
        assert!(err.contains(&format!("oci variant: could not find the layer of type {WASM_LAYER}")), "{err}");
        assert!(err.contains("single-layer Wasm artifact: number of layers must be 1 but got 2"), "{err}");
        let err = choose_layer(OCI_MANIFEST, &[layer("text/plain", D1)]).unwrap_err();
        assert!(
            err.ends_with(&format!("invalid media type text/plain (expect {WASM_LAYER} or {APPLICATION_WASM})")),
            "{err}"
        );
    }
}
