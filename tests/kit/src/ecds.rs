//! Builders of ECDS responses and Wasm filters, and readers of converted responses, over [`crate::proto`].

use prost::Message;

pub use crate::proto::*;

use crate::proto::async_data_source::Specifier as Code;
use crate::proto::data_source::Specifier as Local;

/// `AsyncDataSource.remote { http_uri { uri, cluster "_", timeout 30s }, sha256 }`, as istiod writes it.
pub fn remote_code(uri: &str, sha256: &str) -> AsyncDataSource {
    AsyncDataSource {
        specifier: Some(Code::Remote(RemoteDataSource {
            http_uri: Some(HttpUri {
                uri: uri.into(),
                http_upstream_type: Some(http_uri::HttpUpstreamType::Cluster("_".into())),
                timeout: Some(Duration { seconds: 30, nanos: 0 }),
            }),
            sha256: sha256.into(),
            retry_policy: None,
        })),
    }
}

/// `AsyncDataSource.local { filename }`.
pub fn local_file(path: &str) -> AsyncDataSource {
    AsyncDataSource {
        specifier: Some(Code::Local(DataSource {
            specifier: Some(Local::Filename(path.into())),
            ..Default::default()
        })),
    }
}

/// `AsyncDataSource.local { inline_string }`.
pub fn inline_code(code: &str) -> AsyncDataSource {
    AsyncDataSource {
        specifier: Some(Code::Local(DataSource {
            specifier: Some(Local::InlineString(code.into())),
            ..Default::default()
        })),
    }
}

impl AsyncDataSource {
    /// The remote source (panics on anything else).
    pub fn remote_mut(&mut self) -> &mut RemoteDataSource {
        match self.specifier.as_mut() {
            Some(Code::Remote(remote)) => remote,
            _ => panic!("not remote code"),
        }
    }
}

/// `EnvironmentVariables { key_values, host_env_keys }`.
pub fn env_vars(pairs: &[(&str, &str)], host_keys: &[&str]) -> EnvironmentVariables {
    EnvironmentVariables {
        host_env_keys: host_keys.iter().map(|s| s.to_string()).collect(),
        key_values: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    }
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
                code: Some(remote_code(uri, sha256)),
                ..Default::default()
            }),
            ..Default::default()
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
        if let Some(Code::Remote(remote)) = self.vm().code.as_mut().and_then(|c| c.specifier.as_mut()) {
            remote.http_uri.as_mut().unwrap().timeout = Some(Duration { seconds, nanos: 0 });
        }
        self
    }

    /// The local filename after conversion, if any.
    pub fn local_filename(&self) -> Option<String> {
        match self.config.as_ref()?.vm_config.as_ref()?.code.as_ref()?.specifier.as_ref()? {
            Code::Local(DataSource { specifier: Some(Local::Filename(f)), .. }) => Some(f.clone()),
            _ => None,
        }
    }
}

pub fn any(type_url: &str, msg: &impl Message) -> Any {
    Any { type_url: type_url.into(), value: msg.encode_to_vec() }
}

/// An `Any` holding these bytes as they are (malformed ones included).
pub fn any_bytes(type_url: &str, value: Vec<u8>) -> Any {
    Any { type_url: type_url.into(), value }
}

/// A JSON object as a `google.protobuf.Struct` (panics on anything but an object).
pub fn to_struct(json: serde_json::Value) -> Struct {
    match to_value(json).kind {
        Some(Kind::StructValue(s)) => s,
        _ => panic!("not a JSON object"),
    }
}

/// A JSON value as a `google.protobuf.Value`.
pub fn to_value(json: serde_json::Value) -> Value {
    let kind = match json {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().expect("finite number")),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(a) => {
            Kind::ListValue(prost_types::ListValue { values: a.into_iter().map(to_value).collect() })
        }
        serde_json::Value::Object(o) => {
            Kind::StructValue(Struct { fields: o.into_iter().map(|(k, v)| (k, to_value(v))).collect() })
        }
    };
    Value { kind: Some(kind) }
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
        ..Default::default()
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
