//! The OCI parsers' targets: manifests and indexes with the layer and platform choice, `oci://` references,
//! pull secrets, `WWW-Authenticate` challenges and token answers. They call the crate-private parsers through
//! the hidden `wasm_ecds::fuzzing::oci`; no network, no disk.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::Value;
use wasm_ecds::fuzzing::oci::{self, Challenge, Descriptor, Document, Packing, Target};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const WASM_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
const APPLICATION_WASM: &str = "application/wasm";

/// The most a reason may take: it goes into a NACK and a log line. The parsers quote outside text (media
/// types, JSON errors) at most 200 characters each; a reason names at most a handful.
pub const MAX_REASON_BYTES: usize = 4096;

/// The `Content-Type` of the manifest answer, picked by the first input byte of `oci_manifest` (modulo the
/// length): none, each document type, one with parameters, and a type that is none of them.
pub const CONTENT_TYPES: &[Option<&str>] = &[
    None,
    Some(OCI_MANIFEST),
    Some(OCI_INDEX),
    Some(DOCKER_MANIFEST),
    Some(DOCKER_MANIFEST_LIST),
    Some("application/vnd.oci.image.manifest.v1+json; charset=utf-8"),
    Some("application/json"),
];

fn check_reason(what: &str, reason: &str) {
    assert!(!reason.is_empty(), "{what}: an error has a reason");
    assert!(reason.len() <= MAX_REASON_BYTES, "{what}: a reason of {} bytes: {:.300}…", reason.len(), reason);
}

fn check_descriptor(d: &Descriptor) {
    assert!(
        d.digest.len() == 64 && d.digest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "a descriptor's digest is 64 lower-case hex digits (it goes into a URL): {:?}",
        d.digest
    );
}

/// `oci_manifest`: the first byte picks the answer's `Content-Type` ([`CONTENT_TYPES`]), the rest is the
/// manifest or index. A manifest's chosen layer is one of its layers, packed as its media type says; an
/// index's chosen entry is one of its entries, the first for a Wasm platform when there is one.
pub fn oci_manifest(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else { return };
    let content_type = CONTENT_TYPES[which as usize % CONTENT_TYPES.len()];
    let document = match oci::parse_manifest(body, content_type) {
        Ok(document) => document,
        Err(why) => return check_reason("manifest", &why),
    };
    match document {
        Document::Manifest { media_type, layers } => {
            assert!(media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST, "manifest type {media_type}");
            assert!(layers.len() <= oci::MAX_DESCRIPTORS);
            layers.iter().for_each(check_descriptor);
            match oci::choose_layer(&media_type, &layers) {
                Ok((layer, packing)) => {
                    assert!(layers.contains(&layer), "the chosen layer is one of the manifest's: {layer:?}");
                    match packing {
                        Packing::Raw => assert!(
                            layer.media_type == WASM_LAYER || layer.media_type == APPLICATION_WASM,
                            "a raw module layer of type {}",
                            layer.media_type
                        ),
                        Packing::PluginInTarGz => {
                            assert_eq!(Some(&layer), layers.last(), "the compat formats use the last layer");
                            assert!(layer.media_type == DOCKER_LAYER || layer.media_type == OCI_LAYER);
                        }
                    }
                }
                Err(why) => {
                    check_reason("layer choice", &why);
                    assert!(why.starts_with("the given image is in invalid format"), "{why}");
                }
            }
        }
        Document::Index { manifests } => {
            assert!(manifests.len() <= oci::MAX_DESCRIPTORS);
            manifests.iter().for_each(check_descriptor);
            match oci::pick_platform(&manifests) {
                Ok(entry) => {
                    let is_wasm = |d: &&Descriptor| {
                        matches!(
                            d.platform.as_ref().map(|(o, a)| (o.as_str(), a.as_str())),
                            Some(("wasip1", "wasm") | ("wasi", "wasm32"))
                        )
                    };
                    let want = manifests.iter().find(is_wasm).unwrap_or(&manifests[0]);
                    assert!(std::ptr::eq(entry, want), "picked {entry:?}, want {want:?}");
                }
                Err(why) => {
                    check_reason("platform", &why);
                    assert!(manifests.is_empty(), "only an empty index has no pick: {why}");
                }
            }
        }
    }
}

/// `oci_reference`: the input (UTF-8; other inputs are skipped) is an `oci://` URL. An accepted reference
/// has only URL-safe names, prints as a name that parses back to itself, and its manifest reference is the
/// tag or `sha256:<hex>`.
pub fn oci_reference(data: &[u8]) {
    let Ok(url) = std::str::from_utf8(data) else { return };
    let reference = match oci::parse_reference(url) {
        Ok(reference) => reference,
        Err(why) => return check_reason("reference", &why),
    };
    assert!(!reference.registry.is_empty());
    // The repository and the manifest reference go into request paths: nothing that could leave them.
    let repository = &reference.repository;
    assert!(!repository.is_empty() && repository.len() <= 255, "{repository:?}");
    assert!(
        repository.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-' | b'/')),
        "{repository:?}"
    );
    assert!(repository.split('/').all(|e| !e.is_empty() && e != "." && e != ".."), "{repository:?}");
    let manifest_reference = match &reference.target {
        Target::Tag(tag) => {
            assert!(!tag.starts_with(['.', '-']) && tag.len() <= 128, "{tag:?}");
            assert!(tag.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')), "{tag:?}");
            tag.clone()
        }
        Target::Digest(hex) => {
            assert!(hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')), "{hex:?}");
            format!("sha256:{hex}")
        }
    };
    assert_eq!(reference.manifest_reference(), manifest_reference);
    let printed = format!("oci://{reference}");
    assert_eq!(oci::parse_reference(&printed).as_ref(), Ok(&reference), "{url:?} printed as {printed:?}");
}

/// The password of the `oci_pull_secret` target's secrets: `@P` in an input stands for it, `@A` for the
/// base64 of `fuzz-user:<it>` (an `auth` value).
pub const PASSWORD: &str = "hunter2-Fuzz-pw";
/// The registries `oci_pull_secret` asks for, by its first input byte (modulo the length).
pub const REGISTRIES: &[&str] =
    &["ghcr.io", "127.0.0.1:5000", "index.docker.io", "docker.io", "[::1]:5000", "Registry.Example:443"];

fn auth_of(username: &str, password: &str) -> String {
    STANDARD.encode(format!("{username}:{password}"))
}

/// `bytes` with every `marker` replaced by `with`.
pub fn substitute(bytes: &[u8], marker: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(marker) {
            out.extend_from_slice(with);
            i += marker.len();
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// Whether a key of any object in `value` contains `text` (keys are registry names, which errors may show).
fn key_contains(value: &Value, text: &str) -> bool {
    match value {
        Value::Object(map) => map.iter().any(|(k, v)| k.contains(text) || key_contains(v, text)),
        Value::Array(items) => items.iter().any(|v| key_contains(v, text)),
        _ => false,
    }
}

/// A pull secret input with `@P` and `@A` replaced.
pub fn pull_secret(input: &[u8]) -> Vec<u8> {
    let auth = auth_of("fuzz-user", PASSWORD);
    substitute(&substitute(input, b"@P", PASSWORD.as_bytes()), b"@A", auth.as_bytes())
}

/// `oci_pull_secret`: the first byte picks the registry ([`REGISTRIES`]), the rest is the pull secret with
/// `@P`/`@A` standing for [`PASSWORD`] and an `auth` holding it. An error never shows the password or that
/// `auth` (unless the input made them an `auths` key, which errors may name); credentials found are given back
/// by a secret written from them in either form, and their `Debug` hides the password.
pub fn oci_pull_secret(data: &[u8]) {
    let Some((&which, input)) = data.split_first() else { return };
    let registry = REGISTRIES[which as usize % REGISTRIES.len()];
    let auth = auth_of("fuzz-user", PASSWORD);
    let secret = pull_secret(input);
    match oci::credentials_for(Some(&secret), registry) {
        Err(why) => {
            check_reason("pull secret", &why);
            // Parsed as the library does: ASCII whitespace (a form feed too) trimmed first.
            let json = serde_json::from_slice::<Value>(secret.trim_ascii()).ok();
            for shown in [PASSWORD, auth.as_str()] {
                if !json.as_ref().is_some_and(|j| key_contains(j, shown)) {
                    assert!(!why.contains(shown), "the error shows the secret: {why}");
                }
            }
        }
        Ok(None) => {}
        Ok(Some(found)) => {
            assert!(!found.username.is_empty() || !found.password.is_empty(), "empty credentials are anonymous");
            let header = oci::basic_header(&found);
            let decoded = STANDARD.decode(header.strip_prefix("Basic ").expect("a Basic header")).expect("base64");
            assert_eq!(decoded, format!("{}:{}", found.username, found.password).into_bytes());
            if found.password == PASSWORD && !found.username.contains(PASSWORD) {
                assert!(!format!("{found:?}").contains(PASSWORD), "Debug shows the password");
            }
            let fields = serde_json::json!({"username": found.username, "password": found.password});
            let written = serde_json::json!({"auths": {registry: fields}}).to_string();
            assert_eq!(oci::credentials_for(Some(written.as_bytes()), registry), Ok(Some(found.clone())), "{written}");
            // `auth` is split at the first ':' and NULs are trimmed from the password (docker's decodeAuth).
            if !found.username.is_empty()
                && !found.username.contains(':')
                && !found.password.starts_with('\0')
                && !found.password.ends_with('\0')
            {
                let auth = auth_of(&found.username, &found.password);
                let written = serde_json::json!({"auths": {registry: {"auth": auth}}}).to_string();
                assert_eq!(oci::credentials_for(Some(written.as_bytes()), registry), Ok(Some(found)), "{written}");
            }
        }
    }
}

/// `oci_challenge`: the input (UTF-8, lossily) is `WWW-Authenticate` values, one a line. The answer is the
/// first value's Bearer challenge (with a realm), else Basic if any value has it: each value parsed alone
/// agrees with all of them parsed together. A bearer realm's token URL keeps the realm's scheme and host
/// whatever `service` and `scope` hold.
pub fn oci_challenge(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let values: Vec<&str> = text.split('\n').collect();
    let all = oci::parse_challenges(values.iter().copied());
    let each: Vec<Option<Challenge>> = values.iter().map(|v| oci::parse_challenges([*v])).collect();
    let want = each
        .iter()
        .find(|c| matches!(c, Some(Challenge::Bearer { .. })))
        .cloned()
        .unwrap_or_else(|| each.iter().any(|c| c.is_some()).then_some(Challenge::Basic));
    assert_eq!(all, want, "{values:?}");
    let Some(Challenge::Bearer { realm, service, scope }) = all else { return };
    assert!(!realm.is_empty());
    let Ok(realm_uri) = realm.parse::<ureq::http::Uri>() else { return };
    if !matches!(realm_uri.scheme_str(), Some("http" | "https")) || realm_uri.host().is_none_or(str::is_empty) {
        return; // refused by check_realm before a token URL is made
    }
    let url = oci::token_url(&realm, service.as_deref(), scope.as_deref(), "wasm/filter").expect("the realm parses");
    let uri: ureq::http::Uri = url.parse().unwrap_or_else(|e| panic!("token URL {url:?} from realm {realm:?}: {e}"));
    assert_eq!((uri.scheme(), uri.authority()), (realm_uri.scheme(), realm_uri.authority()), "{url}");
}

/// The token `@T` stands for in an `oci_token` input.
pub const TOKEN: &str = "tok-Fuzz-sEcReT";

/// `oci_token`: the input is a token endpoint's answer, `@T` standing for [`TOKEN`]. A token taken is the
/// answer's `token`, else its `access_token`, and fits an `Authorization` header; an error never shows the
/// token.
pub fn oci_token(data: &[u8]) {
    let body = substitute(data, b"@T", TOKEN.as_bytes());
    match oci::parse_token_response(&body) {
        Ok(token) => {
            assert!(!token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic()), "{token:?}");
            let answer: Value = serde_json::from_slice(&body).expect("a token answer is JSON");
            let named = |name: &str| answer.get(name).and_then(Value::as_str).filter(|t| !t.is_empty());
            assert_eq!(Some(token.as_str()), named("token").or_else(|| named("access_token")));
        }
        Err(why) => {
            check_reason("token", &why);
            assert!(!why.contains(TOKEN), "the error shows the token: {why}");
        }
    }
}
