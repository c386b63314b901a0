//! ECDS messages for integration tests: enough of the Envoy schema (prost structs, field numbers from
//! shared/proto-facts.md) to build responses and to read converted ones back.

#![allow(dead_code)]

use prost::Message;
pub use prost_types::Any;

pub const ECDS_TYPE: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
pub const HTTP_WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
pub const NETWORK_WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm";
pub const HTTP_RBAC_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
pub const ROUTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";

#[derive(Clone, PartialEq, Message)]
pub struct DiscoveryResponse {
    #[prost(string, tag = "1")]
    pub version_info: String,
    #[prost(message, repeated, tag = "2")]
    pub resources: Vec<Any>,
    #[prost(string, tag = "4")]
    pub type_url: String,
    #[prost(string, tag = "5")]
    pub nonce: String,
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
}

#[derive(Clone, PartialEq, Message)]
pub struct Resource {
    #[prost(string, tag = "1")]
    pub version: String,
    #[prost(message, optional, tag = "2")]
    pub resource: Option<Any>,
    #[prost(string, tag = "3")]
    pub name: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct TypedExtensionConfig {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub typed_config: Option<Any>,
}

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
    #[prost(int32, tag = "7")]
    pub failure_policy: i32,
}

#[derive(Clone, PartialEq, Message)]
pub struct VmConfig {
    #[prost(string, tag = "1")]
    pub vm_id: String,
    #[prost(string, tag = "2")]
    pub runtime: String,
    #[prost(message, optional, tag = "3")]
    pub code: Option<AsyncDataSource>,
    #[prost(message, optional, tag = "7")]
    pub environment_variables: Option<EnvironmentVariables>,
}

#[derive(Clone, PartialEq, Message)]
pub struct AsyncDataSource {
    #[prost(message, optional, tag = "1")]
    pub local: Option<DataSource>,
    #[prost(message, optional, tag = "2")]
    pub remote: Option<RemoteDataSource>,
}

#[derive(Clone, PartialEq, Message)]
pub struct DataSource {
    #[prost(string, tag = "1")]
    pub filename: String,
    #[prost(string, tag = "3")]
    pub inline_string: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct RemoteDataSource {
    #[prost(message, optional, tag = "1")]
    pub http_uri: Option<HttpUri>,
    #[prost(string, tag = "2")]
    pub sha256: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct HttpUri {
    #[prost(string, tag = "1")]
    pub uri: String,
    #[prost(string, tag = "2")]
    pub cluster: String,
    #[prost(message, optional, tag = "3")]
    pub timeout: Option<prost_types::Duration>,
}

#[derive(Clone, PartialEq, Message)]
pub struct EnvironmentVariables {
    #[prost(string, repeated, tag = "1")]
    pub host_env_keys: Vec<String>,
    #[prost(btree_map = "string, string", tag = "2")]
    pub key_values: std::collections::BTreeMap<String, String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct HttpRbac {
    #[prost(message, optional, tag = "1")]
    pub rules: Option<RbacRules>,
    #[prost(string, tag = "6")]
    pub rules_stat_prefix: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct RbacRules {
    #[prost(int32, tag = "1")]
    pub action: i32,
}

/// A remote HTTP Wasm filter: `vm_config.code.remote { http_uri { uri, cluster "_", timeout 30s }, sha256 }`.
pub fn remote_wasm(uri: &str, sha256: &str) -> Wasm {
    Wasm {
        config: Some(PluginConfig {
            name: "ns.plugin".into(),
            root_id: "root".into(),
            vm_config: Some(VmConfig {
                vm_id: "vm".into(),
                runtime: "envoy.wasm.runtime.v8".into(),
                code: Some(AsyncDataSource {
                    local: None,
                    remote: Some(RemoteDataSource {
                        http_uri: Some(HttpUri {
                            uri: uri.into(),
                            cluster: "_".into(),
                            timeout: Some(prost_types::Duration { seconds: 30, nanos: 0 }),
                        }),
                        sha256: sha256.into(),
                    }),
                }),
                environment_variables: None,
            }),
            configuration: None,
            fail_open: false,
            failure_policy: 0,
        }),
    }
}

impl Wasm {
    pub fn vm(&mut self) -> &mut VmConfig {
        self.config.as_mut().unwrap().vm_config.as_mut().unwrap()
    }

    pub fn with_env(mut self, pairs: &[(&str, &str)]) -> Wasm {
        let env = self.vm().environment_variables.get_or_insert_with(Default::default);
        for (k, v) in pairs {
            env.key_values.insert(k.to_string(), v.to_string());
        }
        self
    }

    pub fn fail_open(mut self) -> Wasm {
        self.config.as_mut().unwrap().fail_open = true;
        self
    }

    pub fn with_timeout(mut self, seconds: i64) -> Wasm {
        let remote = self.vm().code.as_mut().unwrap().remote.as_mut().unwrap();
        remote.http_uri.as_mut().unwrap().timeout = Some(prost_types::Duration { seconds, nanos: 0 });
        self
    }

    /// The local filename after conversion, if any.
    pub fn local_filename(&self) -> Option<String> {
        self.config.as_ref()?.vm_config.as_ref()?.code.as_ref()?.local.as_ref().map(|l| l.filename.clone())
    }
}

pub fn any(type_url: &str, msg: &impl Message) -> Any {
    Any { type_url: type_url.into(), value: msg.encode_to_vec() }
}

pub fn extension(name: &str, typed_config: Any) -> TypedExtensionConfig {
    TypedExtensionConfig { name: name.into(), typed_config: Some(typed_config) }
}

pub fn wasm_extension(name: &str, wasm: &Wasm) -> TypedExtensionConfig {
    extension(name, any(HTTP_WASM_TYPE, wasm))
}

/// A state-of-the-world ECDS response holding these extension configs.
pub fn response(extensions: &[TypedExtensionConfig]) -> Vec<u8> {
    DiscoveryResponse {
        version_info: "v1".into(),
        resources: extensions.iter().map(|e| any(ECDS_TYPE, e)).collect(),
        type_url: ECDS_TYPE.into(),
        nonce: "nonce-1".into(),
    }
    .encode_to_vec()
}

/// The extension configs of a converted response.
pub fn extensions(bytes: &[u8]) -> Vec<TypedExtensionConfig> {
    let resp = DiscoveryResponse::decode(bytes).expect("converted response decodes");
    resp.resources.iter().map(|a| TypedExtensionConfig::decode(a.value.as_slice()).expect("TEC")).collect()
}

/// The Wasm filters of a converted response, in order (panics on a non-Wasm resource).
pub fn wasms(bytes: &[u8]) -> Vec<Wasm> {
    extensions(bytes)
        .iter()
        .map(|e| {
            let tc = e.typed_config.as_ref().expect("typed_config");
            assert!(tc.type_url == HTTP_WASM_TYPE || tc.type_url == NETWORK_WASM_TYPE, "{}", tc.type_url);
            Wasm::decode(tc.value.as_slice()).expect("Wasm")
        })
        .collect()
}

/// The value of one sample in Prometheus text, e.g. `metric(&text, "istio_agent_wasm_cache_entries")` or
/// `metric(&text, r#"istio_agent_wasm_remote_fetch_count{result="success"}"#)`.
pub fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no sample {sample} in\n{text}"))
        .trim()
        .parse()
        .expect("numeric sample")
}
