//! Registry authentication: pull secrets (a docker `config.json`), `WWW-Authenticate` challenges, the token
//! endpoint's answer, and the safety check of a bearer realm before anything is sent to it.
//! SKELETON: bodies to be written.

use std::fmt;

use ureq::http::Uri;

use crate::guard::AddressPolicy;

/// A user name and password for one registry. Never printed: `Debug` redacts the password.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

/// The credentials a pull secret holds for `registry` (`host[:port]` as in the URL, or a mirror's host),
/// `Ok(None)` for anonymous access (no secret, an empty one, or no entry for this registry). An error says
/// why the secret is unusable and never contains any of it.
pub(crate) fn credentials_for(pull_secret: Option<&[u8]>, registry: &str) -> Result<Option<Credentials>, String> {
    let _ = (pull_secret, registry);
    todo!()
}

/// What a registry's `401` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    Basic,
    Bearer { realm: String, service: Option<String>, scope: Option<String> },
}

/// The challenge to answer among a `401`'s `WWW-Authenticate` header values: Bearer before Basic; `None`
/// when none is understood.
pub(crate) fn parse_challenges<'a>(values: impl IntoIterator<Item = &'a str>) -> Option<Challenge> {
    let _ = values.into_iter();
    todo!()
}

/// The bearer realm as a URL, if it is safe to send a token request (and maybe credentials) to: http(s),
/// with a host, and no address the SSRF rules refuse (link-local, metadata, unspecified, `blocked_cidrs`):
/// literal IPs are checked directly, host names by resolving them here. The error is the reason.
pub(crate) fn check_realm(realm: &str, policy: &AddressPolicy) -> Result<Uri, String> {
    let _ = (realm, policy);
    todo!()
}

/// The token in a token endpoint's JSON answer (`token`, else `access_token`).
pub(crate) fn parse_token_response(body: &[u8]) -> Result<String, String> {
    let _ = body;
    todo!()
}
