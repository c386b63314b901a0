//! Modules from OCI registries (`oci://`). Not implemented yet: every fetch fails with a manifest error.

#[allow(dead_code)]
mod auth;
mod manifest;
#[allow(dead_code)]
mod reference;

use std::path::Path;
use std::time::Instant;

use super::{FetchError, FetchErrorKind, ImageFetched, ImageRequest};
use crate::options::Options;

pub(crate) struct OciFetcher {}

impl OciFetcher {
    pub fn new(_client: std::sync::Arc<super::client::Client>, _options: &Options) -> OciFetcher {
        OciFetcher {}
    }

    pub fn fetch(
        &self,
        req: &ImageRequest<'_>,
        _deadline: Instant,
        _temp_dir: &Path,
        _known: &mut dyn FnMut(&str) -> bool,
    ) -> Result<ImageFetched, FetchError> {
        Err(FetchError::new(
            FetchErrorKind::Manifest,
            format!("could not fetch Wasm OCI image: {}: OCI registries are not supported yet", req.url),
        ))
    }
}
