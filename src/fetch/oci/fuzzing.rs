//! The OCI parsers as the fuzz targets reach them (`tests/fuzz`, `docs/fuzzing.md`), through the hidden
//! `wasm_ecds::fuzzing`: thin wrappers over the crate-private functions, with the types they return. Not part
//! of the API.

pub use super::auth::{Challenge, Credentials};
pub use super::manifest::{Descriptor, Document, Packing};
pub use super::reference::{Reference, Target};

/// The most entries of an index, or layers of a manifest, [`parse_manifest`] accepts.
pub const MAX_DESCRIPTORS: usize = super::manifest::MAX_DESCRIPTORS;
/// The most a manifest may take on the wire.
pub const MAX_MANIFEST_BYTES: u64 = super::MAX_MANIFEST_BYTES;

pub fn parse_manifest(body: &[u8], content_type: Option<&str>) -> Result<Document, String> {
    super::manifest::parse(body, content_type)
}

pub fn pick_platform(manifests: &[Descriptor]) -> Result<&Descriptor, String> {
    super::manifest::pick_platform(manifests)
}

pub fn choose_layer(media_type: &str, layers: &[Descriptor]) -> Result<(Descriptor, Packing), String> {
    super::manifest::choose_layer(media_type, layers)
}

pub fn parse_reference(url: &str) -> Result<Reference, String> {
    Reference::parse(url)
}

pub fn credentials_for(pull_secret: Option<&[u8]>, registry: &str) -> Result<Option<Credentials>, String> {
    super::auth::credentials_for(pull_secret, registry)
}

pub fn basic_header(credentials: &Credentials) -> String {
    super::auth::basic_header(credentials)
}

pub fn parse_challenges<'a>(values: impl IntoIterator<Item = &'a str>) -> Option<Challenge> {
    super::auth::parse_challenges(values)
}

pub fn parse_token_response(body: &[u8]) -> Result<String, String> {
    super::auth::parse_token_response(body)
}

/// The token request URL for a realm that parses as a URI (`None` when it does not).
pub fn token_url(realm: &str, service: Option<&str>, scope: Option<&str>, repository: &str) -> Option<String> {
    let realm = realm.parse().ok()?;
    Some(super::auth::token_url(&realm, service, scope, repository))
}
