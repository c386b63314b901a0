//! Complete prost types for everything a "typical" ECDS response contains (field numbers from the
//! envoyproxy/envoy, cncf/xds and google `.proto` files named at each group; the well-known types are
//! `prost_types`'). The tests build and read their messages with them; the benchmarks also use them as a
//! baseline: a full decode and re-encode.

#![allow(dead_code, unused_imports, clippy::large_enum_variant)]

use prost::Message;
pub use prost_types::{value::Kind, Any, Duration, Struct, Value};

// ---- xDS transport ----
// envoy `api/envoy/service/discovery/v3/discovery.proto`, `api/envoy/config/core/v3/base.proto`
// (ControlPlane), googleapis `google/rpc/status.proto`

#[derive(Clone, PartialEq, Message)]
pub struct DiscoveryResponse {
    #[prost(string, tag = "1")]
    pub version_info: String,
    #[prost(message, repeated, tag = "2")]
    pub resources: Vec<Any>,
    #[prost(bool, tag = "3")]
    pub canary: bool,
    #[prost(string, tag = "4")]
    pub type_url: String,
    #[prost(string, tag = "5")]
    pub nonce: String,
    #[prost(message, optional, tag = "6")]
    pub control_plane: Option<ControlPlane>,
    #[prost(message, repeated, tag = "7")]
    pub resource_errors: Vec<ResourceError>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ControlPlane {
    #[prost(string, tag = "1")]
    pub identifier: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct ResourceError {
    #[prost(message, optional, tag = "1")]
    pub resource_name: Option<ResourceName>,
    #[prost(message, optional, tag = "2")]
    pub error_detail: Option<Status>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ResourceName {
    #[prost(string, tag = "1")]
    pub name: String,
}

/// `envoy.service.discovery.v3.DiscoveryRequest` (envoy `api/envoy/service/discovery/v3/discovery.proto`),
/// the fields a NACK carries.
#[derive(Clone, PartialEq, Message)]
pub struct DiscoveryRequest {
    #[prost(string, tag = "1")]
    pub version_info: String,
    #[prost(string, repeated, tag = "3")]
    pub resource_names: Vec<String>,
    #[prost(string, tag = "4")]
    pub type_url: String,
    #[prost(string, tag = "5")]
    pub response_nonce: String,
    #[prost(message, optional, tag = "6")]
    pub error_detail: Option<Status>,
}

/// `envoy.service.discovery.v3.DeltaDiscoveryRequest`, the fields a NACK carries.
#[derive(Clone, PartialEq, Message)]
pub struct DeltaDiscoveryRequest {
    #[prost(string, tag = "2")]
    pub type_url: String,
    #[prost(string, tag = "6")]
    pub response_nonce: String,
    #[prost(message, optional, tag = "7")]
    pub error_detail: Option<Status>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Status {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(message, repeated, tag = "3")]
    pub details: Vec<Any>,
}

#[derive(Clone, PartialEq, Message)]
pub struct DeltaDiscoveryResponse {
    #[prost(string, tag = "1")]
    pub system_version_info: String,
    #[prost(message, repeated, tag = "2")]
    pub resources: Vec<Resource>,
    #[prost(string, tag = "4")]
    pub type_url: String,
    #[prost(string, tag = "5")]
    pub nonce: String,
    #[prost(string, repeated, tag = "6")]
    pub removed_resources: Vec<String>,
    #[prost(message, optional, tag = "7")]
    pub control_plane: Option<ControlPlane>,
    #[prost(message, repeated, tag = "8")]
    pub removed_resource_names: Vec<ResourceName>,
    #[prost(message, repeated, tag = "9")]
    pub resource_errors: Vec<ResourceError>,
}

/// `envoy.service.discovery.v3.Resource`, the fields a delta ECDS resource uses.
#[derive(Clone, PartialEq, Message)]
pub struct Resource {
    #[prost(string, tag = "1")]
    pub version: String,
    #[prost(message, optional, tag = "2")]
    pub resource: Option<Any>,
    #[prost(string, tag = "3")]
    pub name: String,
    #[prost(string, repeated, tag = "4")]
    pub aliases: Vec<String>,
    #[prost(message, optional, tag = "6")]
    pub ttl: Option<Duration>,
}

// ---- ECDS resource ----
// envoy `api/envoy/config/core/v3/extension.proto`; cncf/xds `udpa/type/v1/typed_struct.proto` (the same
// fields as `xds/type/v3/typed_struct.proto`)

#[derive(Clone, PartialEq, Message)]
pub struct TypedExtensionConfig {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub typed_config: Option<Any>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TypedStruct {
    #[prost(string, tag = "1")]
    pub type_url: String,
    #[prost(message, optional, tag = "2")]
    pub value: Option<Struct>,
}

// ---- Wasm ----
// envoy `api/envoy/extensions/filters/{http,network}/wasm/v3/wasm.proto`,
// `api/envoy/extensions/wasm/v3/wasm.proto`

#[derive(Clone, PartialEq, Message)]
pub struct Wasm {
    #[prost(message, optional, tag = "1")]
    pub config: Option<PluginConfig>,
}

#[derive(Clone, PartialEq, Message)]
pub struct PluginConfig {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub root_id: String,
    #[prost(message, optional, tag = "3")]
    pub vm_config: Option<VmConfig>,
    #[prost(message, optional, tag = "4")]
    pub configuration: Option<Any>,
    #[prost(bool, tag = "5")]
    pub fail_open: bool,
    #[prost(message, optional, tag = "6")]
    pub capability_restriction_config: Option<CapabilityRestrictionConfig>,
    #[prost(int32, tag = "7")]
    pub failure_policy: i32,
    #[prost(message, optional, tag = "8")]
    pub reload_config: Option<ReloadConfig>,
    #[prost(message, optional, tag = "9")]
    pub allow_on_headers_stop_iteration: Option<bool>,
}

#[derive(Clone, PartialEq, Message)]
pub struct VmConfig {
    #[prost(string, tag = "1")]
    pub vm_id: String,
    #[prost(string, tag = "2")]
    pub runtime: String,
    #[prost(message, optional, tag = "3")]
    pub code: Option<AsyncDataSource>,
    #[prost(message, optional, tag = "4")]
    pub configuration: Option<Any>,
    #[prost(bool, tag = "5")]
    pub allow_precompiled: bool,
    #[prost(bool, tag = "6")]
    pub nack_on_code_cache_miss: bool,
    #[prost(message, optional, tag = "7")]
    pub environment_variables: Option<EnvironmentVariables>,
}

#[derive(Clone, PartialEq, Message)]
pub struct EnvironmentVariables {
    #[prost(string, repeated, tag = "1")]
    pub host_env_keys: Vec<String>,
    #[prost(btree_map = "string, string", tag = "2")]
    pub key_values: std::collections::BTreeMap<String, String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct CapabilityRestrictionConfig {
    #[prost(btree_map = "string, message", tag = "1")]
    pub allowed_capabilities: std::collections::BTreeMap<String, SanitizationConfig>,
}

#[derive(Clone, PartialEq, Message)]
pub struct SanitizationConfig {}

#[derive(Clone, PartialEq, Message)]
pub struct ReloadConfig {
    #[prost(message, optional, tag = "1")]
    pub backoff: Option<BackoffStrategy>,
}

// ---- code sources ----
// envoy `api/envoy/config/core/v3/{base,http_uri,backoff}.proto`, protobuf `google/protobuf/wrappers.proto`

#[derive(Clone, PartialEq, Message)]
pub struct AsyncDataSource {
    #[prost(oneof = "async_data_source::Specifier", tags = "1, 2")]
    pub specifier: Option<async_data_source::Specifier>,
}

pub mod async_data_source {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Specifier {
        #[prost(message, tag = "1")]
        Local(super::DataSource),
        #[prost(message, tag = "2")]
        Remote(super::RemoteDataSource),
    }
}

#[derive(Clone, PartialEq, Message)]
pub struct DataSource {
    #[prost(oneof = "data_source::Specifier", tags = "1, 2, 3, 4")]
    pub specifier: Option<data_source::Specifier>,
    #[prost(message, optional, tag = "5")]
    pub watched_directory: Option<WatchedDirectory>,
}

pub mod data_source {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Specifier {
        #[prost(string, tag = "1")]
        Filename(String),
        #[prost(bytes, tag = "2")]
        InlineBytes(Vec<u8>),
        #[prost(string, tag = "3")]
        InlineString(String),
        #[prost(string, tag = "4")]
        EnvironmentVariable(String),
    }
}

#[derive(Clone, PartialEq, Message)]
pub struct WatchedDirectory {
    #[prost(string, tag = "1")]
    pub path: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct RemoteDataSource {
    #[prost(message, optional, tag = "1")]
    pub http_uri: Option<HttpUri>,
    #[prost(string, tag = "2")]
    pub sha256: String,
    #[prost(message, optional, tag = "3")]
    pub retry_policy: Option<RetryPolicy>,
}

#[derive(Clone, PartialEq, Message)]
pub struct HttpUri {
    #[prost(string, tag = "1")]
    pub uri: String,
    #[prost(oneof = "http_uri::HttpUpstreamType", tags = "2")]
    pub http_upstream_type: Option<http_uri::HttpUpstreamType>,
    #[prost(message, optional, tag = "3")]
    pub timeout: Option<Duration>,
}

pub mod http_uri {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum HttpUpstreamType {
        #[prost(string, tag = "2")]
        Cluster(String),
    }
}

#[derive(Clone, PartialEq, Message)]
pub struct RetryPolicy {
    #[prost(message, optional, tag = "1")]
    pub retry_back_off: Option<BackoffStrategy>,
    #[prost(message, optional, tag = "2")]
    pub num_retries: Option<u32>,
    #[prost(string, tag = "3")]
    pub retry_on: String,
    #[prost(message, optional, tag = "4")]
    pub retry_priority: Option<TypedNamed>,
    #[prost(message, repeated, tag = "5")]
    pub retry_host_predicate: Vec<TypedNamed>,
    #[prost(int64, tag = "6")]
    pub host_selection_retry_max_attempts: i64,
}

/// RetryPriority and RetryHostPredicate have the same shape.
#[derive(Clone, PartialEq, Message)]
pub struct TypedNamed {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub typed_config: Option<Any>,
}

#[derive(Clone, PartialEq, Message)]
pub struct BackoffStrategy {
    #[prost(message, optional, tag = "1")]
    pub base_interval: Option<Duration>,
    #[prost(message, optional, tag = "2")]
    pub max_interval: Option<Duration>,
}

#[derive(Clone, PartialEq, Message)]
pub struct StringValue {
    #[prost(string, tag = "1")]
    pub value: String,
}

// ---- RBAC (the fallback filters) and other non-Wasm filters ----
// envoy `api/envoy/extensions/filters/{http,network}/rbac/v3/rbac.proto`,
// `api/envoy/extensions/filters/http/router/v3/router.proto`

#[derive(Clone, PartialEq, Message)]
pub struct HttpRbac {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub rules: Option<Vec<u8>>,
    #[prost(string, tag = "6")]
    pub rules_stat_prefix: String,
    #[prost(bool, tag = "7")]
    pub track_per_rule_stats: bool,
}

/// `envoy.extensions.filters.network.rbac.v3.RBAC`, the fields a fallback uses.
#[derive(Clone, PartialEq, Message)]
pub struct NetworkRbac {
    /// An `envoy.config.rbac.v3.RBAC`, kept as bytes: present but empty denies everything.
    #[prost(bytes = "vec", optional, tag = "1")]
    pub rules: Option<Vec<u8>>,
    #[prost(string, tag = "3")]
    pub stat_prefix: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct Router {
    #[prost(message, optional, tag = "1")]
    pub dynamic_stats: Option<bool>,
    #[prost(bool, tag = "3")]
    pub suppress_envoy_headers: bool,
    #[prost(string, repeated, tag = "5")]
    pub strict_check_headers: Vec<String>,
}

pub const ECDS_TYPE: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
pub const HTTP_WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
pub const NETWORK_WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm";
pub const TYPED_STRUCT_TYPE: &str = "type.googleapis.com/udpa.type.v1.TypedStruct";
pub const XDS_TYPED_STRUCT_TYPE: &str = "type.googleapis.com/xds.type.v3.TypedStruct";
pub const STRING_VALUE_TYPE: &str = "type.googleapis.com/google.protobuf.StringValue";
pub const HTTP_RBAC_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
pub const NETWORK_RBAC_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";
pub const ROUTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";

/// Baseline (b): decode the whole response into complete prost types (every nested Any included) and
/// encode it back. Returns the re-encoded bytes.
pub fn decode_reencode(input: &[u8]) -> Vec<u8> {
    let mut response = DiscoveryResponse::decode(input).expect("DiscoveryResponse");
    for any in &mut response.resources {
        let mut ext = TypedExtensionConfig::decode(any.value.as_slice()).expect("TypedExtensionConfig");
        if let Some(typed) = ext.typed_config.as_mut() {
            if typed.type_url == HTTP_WASM_TYPE {
                let mut wasm = Wasm::decode(typed.value.as_slice()).expect("Wasm");
                if let Some(conf) = wasm.config.as_mut().and_then(|c| c.configuration.as_mut()) {
                    if conf.type_url == STRING_VALUE_TYPE {
                        let sv = StringValue::decode(conf.value.as_slice()).expect("StringValue");
                        conf.value = sv.encode_to_vec();
                    }
                }
                typed.value = wasm.encode_to_vec();
            } else if typed.type_url == TYPED_STRUCT_TYPE {
                let ts = TypedStruct::decode(typed.value.as_slice()).expect("TypedStruct");
                typed.value = ts.encode_to_vec();
            }
        }
        any.value = ext.encode_to_vec();
    }
    response.encode_to_vec()
}
