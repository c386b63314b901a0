//! The request the agent sends upstream when it rejects a response: built whole with prost, since it is
//! a new message and not a rewrite of one.

use prost::Message;

use crate::wire;

/// `google.rpc.Code.INTERNAL`, what Istio puts in a Wasm NACK.
const CODE_INTERNAL: i32 = 13;

#[derive(Clone, PartialEq, prost::Message)]
struct Status {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

/// `envoy.service.discovery.v3.DiscoveryRequest`, the fields a NACK carries.
#[derive(Clone, PartialEq, prost::Message)]
struct DiscoveryRequest {
    #[prost(string, tag = "1")]
    version_info: String,
    #[prost(string, tag = "4")]
    type_url: String,
    #[prost(string, tag = "5")]
    response_nonce: String,
    #[prost(message, optional, tag = "6")]
    error_detail: Option<Status>,
}

/// `envoy.service.discovery.v3.DeltaDiscoveryRequest`, the fields a NACK carries.
#[derive(Clone, PartialEq, prost::Message)]
struct DeltaDiscoveryRequest {
    #[prost(string, tag = "2")]
    type_url: String,
    #[prost(string, tag = "6")]
    response_nonce: String,
    #[prost(message, optional, tag = "7")]
    error_detail: Option<Status>,
}

/// An error building a NACK: the response it answers could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NackError(pub String);

impl std::fmt::Display for NackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NackError {}

/// The `DiscoveryRequest` that NACKs `response` (a serialized `DiscoveryResponse`): same type URL, the
/// response's nonce, the last ACKed version, and `error_detail { code: 13, message: reason }`.
pub fn nack(response: &[u8], last_acked_version: &str, reason: &str) -> Result<Vec<u8>, NackError> {
    let (type_url, nonce) = type_url_and_nonce(response, "DiscoveryResponse")?;
    Ok(DiscoveryRequest {
        version_info: last_acked_version.to_owned(),
        type_url,
        response_nonce: nonce,
        error_detail: Some(Status { code: CODE_INTERNAL, message: reason.to_owned() }),
    }
    .encode_to_vec())
}

/// The `DeltaDiscoveryRequest` that NACKs `response` (a serialized `DeltaDiscoveryResponse`).
pub fn nack_delta(response: &[u8], reason: &str) -> Result<Vec<u8>, NackError> {
    let (type_url, nonce) = type_url_and_nonce(response, "DeltaDiscoveryResponse")?;
    Ok(DeltaDiscoveryRequest {
        type_url,
        response_nonce: nonce,
        error_detail: Some(Status { code: CODE_INTERNAL, message: reason.to_owned() }),
    }
    .encode_to_vec())
}

/// Both response kinds carry `type_url` as field 4 and `nonce` as field 5.
fn type_url_and_nonce(response: &[u8], what: &str) -> Result<(String, String), NackError> {
    let mut type_url = String::new();
    let mut nonce = String::new();
    for field in wire::Fields::new(response) {
        let field = field.map_err(|e| NackError(format!("malformed {what}: {e}")))?;
        match field.number {
            4 => {
                type_url = field.string().map_err(|e| NackError(format!("malformed {what}: type_url: {e}")))?.to_owned()
            }
            5 => nonce = field.string().map_err(|e| NackError(format!("malformed {what}: nonce: {e}")))?.to_owned(),
            _ => {}
        }
    }
    Ok((type_url, nonce))
}
