//! A schema table of the messages the conversion reads: the xDS envelopes, `TypedExtensionConfig`, the Wasm
//! filter tree (`Wasm` → `PluginConfig` → `VmConfig` → …) and the well-known types it uses. One table drives
//! three things: validation of binary input with the strictness of Go's `proto.Unmarshal` (wire format, wire
//! types of known fields, UTF-8 of strings; unknown fields allowed), the proto3 JSON mapping from a
//! `google.protobuf.Struct` to binary (TypedStruct input), and the key checks of that mapping.
//! Field numbers, names and JSON names are those of the upstream `.proto` files named at each group below.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use prost::encoding::{encode_key, encode_varint, WireType};

use crate::wire::{self, Fields};

/// How deep messages may nest (Go allows 10 000; the callers' stacks are not ours to exhaust).
pub(crate) const MAX_DEPTH: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wkt {
    None,
    Any,
    Duration,
    Struct,
    Value,
    ListValue,
    /// `google.protobuf.*Value` wrappers: field 1 is the value.
    Wrapper,
    Empty,
}

#[derive(Debug)]
pub(crate) struct Message {
    pub name: &'static str,
    pub fields: &'static [FieldDef],
    pub wkt: Wkt,
}

impl Message {
    pub fn field(&self, number: u32) -> Option<&'static FieldDef> {
        self.fields.iter().find(|f| f.number == number)
    }

    fn field_by_json_key(&self, key: &str) -> Option<&'static FieldDef> {
        self.fields.iter().find(|f| f.name == key || f.json == key)
    }
}

#[derive(Debug)]
pub(crate) struct EnumDef {
    pub name: &'static str,
    pub values: &'static [(&'static str, i32)],
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Ty {
    String,
    Bytes,
    Bool,
    Int32,
    Int64,
    UInt32,
    UInt64,
    Double,
    Float,
    Enum(&'static EnumDef),
    Message(&'static Message),
    /// A map field: repeated entries of this message (key 1, value 2).
    Map(&'static Message),
    /// A message whose structure is not modelled: only its wire format is checked.
    Opaque,
}

#[derive(Debug)]
pub(crate) struct FieldDef {
    pub number: u32,
    pub name: &'static str,
    pub json: &'static str,
    pub ty: Ty,
    pub repeated: bool,
    pub oneof: Option<&'static str>,
}

const fn f(number: u32, name: &'static str, json: &'static str, ty: Ty) -> FieldDef {
    FieldDef { number, name, json, ty, repeated: false, oneof: None }
}

const fn rep(number: u32, name: &'static str, json: &'static str, ty: Ty) -> FieldDef {
    FieldDef { number, name, json, ty, repeated: true, oneof: None }
}

const fn one(number: u32, name: &'static str, json: &'static str, ty: Ty, oneof: &'static str) -> FieldDef {
    FieldDef { number, name, json, ty, repeated: false, oneof: Some(oneof) }
}

const fn msg(name: &'static str, fields: &'static [FieldDef]) -> Message {
    Message { name, fields, wkt: Wkt::None }
}

const fn wkt(name: &'static str, fields: &'static [FieldDef], wkt: Wkt) -> Message {
    Message { name, fields, wkt }
}

// ---- well-known types ----
// protocolbuffers/protobuf `src/google/protobuf/{any,duration,empty,struct,wrappers}.proto`

pub(crate) static ANY: Message =
    wkt("google.protobuf.Any", &[f(1, "type_url", "typeUrl", Ty::String), f(2, "value", "value", Ty::Bytes)], Wkt::Any);
pub(crate) static DURATION: Message = wkt(
    "google.protobuf.Duration",
    &[f(1, "seconds", "seconds", Ty::Int64), f(2, "nanos", "nanos", Ty::Int32)],
    Wkt::Duration,
);
pub(crate) static EMPTY: Message = wkt("google.protobuf.Empty", &[], Wkt::Empty);
static NULL_VALUE: EnumDef = EnumDef { name: "google.protobuf.NullValue", values: &[("NULL_VALUE", 0)] };
pub(crate) static STRUCT: Message =
    wkt("google.protobuf.Struct", &[rep(1, "fields", "fields", Ty::Map(&STRUCT_FIELDS_ENTRY))], Wkt::Struct);
static STRUCT_FIELDS_ENTRY: Message = msg(
    "google.protobuf.Struct.FieldsEntry",
    &[f(1, "key", "key", Ty::String), f(2, "value", "value", Ty::Message(&VALUE))],
);
pub(crate) static VALUE: Message = wkt(
    "google.protobuf.Value",
    &[
        one(1, "null_value", "nullValue", Ty::Enum(&NULL_VALUE), "kind"),
        one(2, "number_value", "numberValue", Ty::Double, "kind"),
        one(3, "string_value", "stringValue", Ty::String, "kind"),
        one(4, "bool_value", "boolValue", Ty::Bool, "kind"),
        one(5, "struct_value", "structValue", Ty::Message(&STRUCT), "kind"),
        one(6, "list_value", "listValue", Ty::Message(&LIST_VALUE), "kind"),
    ],
    Wkt::Value,
);
pub(crate) static LIST_VALUE: Message =
    wkt("google.protobuf.ListValue", &[rep(1, "values", "values", Ty::Message(&VALUE))], Wkt::ListValue);
static STRING_VALUE: Message = wkt("google.protobuf.StringValue", &[f(1, "value", "value", Ty::String)], Wkt::Wrapper);
static BYTES_VALUE: Message = wkt("google.protobuf.BytesValue", &[f(1, "value", "value", Ty::Bytes)], Wkt::Wrapper);
static BOOL_VALUE: Message = wkt("google.protobuf.BoolValue", &[f(1, "value", "value", Ty::Bool)], Wkt::Wrapper);
static INT32_VALUE: Message = wkt("google.protobuf.Int32Value", &[f(1, "value", "value", Ty::Int32)], Wkt::Wrapper);
static INT64_VALUE: Message = wkt("google.protobuf.Int64Value", &[f(1, "value", "value", Ty::Int64)], Wkt::Wrapper);
static UINT32_VALUE: Message = wkt("google.protobuf.UInt32Value", &[f(1, "value", "value", Ty::UInt32)], Wkt::Wrapper);
static UINT64_VALUE: Message = wkt("google.protobuf.UInt64Value", &[f(1, "value", "value", Ty::UInt64)], Wkt::Wrapper);
static DOUBLE_VALUE: Message = wkt("google.protobuf.DoubleValue", &[f(1, "value", "value", Ty::Double)], Wkt::Wrapper);
static FLOAT_VALUE: Message = wkt("google.protobuf.FloatValue", &[f(1, "value", "value", Ty::Float)], Wkt::Wrapper);

// ---- xDS envelopes ----
// envoy `api/envoy/service/discovery/v3/discovery.proto`, `api/envoy/config/core/v3/base.proto`
// (ControlPlane), googleapis `google/rpc/status.proto`

pub(crate) static DISCOVERY_RESPONSE: Message = msg(
    "envoy.service.discovery.v3.DiscoveryResponse",
    &[
        f(1, "version_info", "versionInfo", Ty::String),
        rep(2, "resources", "resources", Ty::Message(&ANY)),
        f(3, "canary", "canary", Ty::Bool),
        f(4, "type_url", "typeUrl", Ty::String),
        f(5, "nonce", "nonce", Ty::String),
        f(6, "control_plane", "controlPlane", Ty::Message(&CONTROL_PLANE)),
        rep(7, "resource_errors", "resourceErrors", Ty::Message(&RESOURCE_ERROR)),
    ],
);
pub(crate) static DELTA_DISCOVERY_RESPONSE: Message = msg(
    "envoy.service.discovery.v3.DeltaDiscoveryResponse",
    &[
        f(1, "system_version_info", "systemVersionInfo", Ty::String),
        rep(2, "resources", "resources", Ty::Message(&RESOURCE)),
        f(4, "type_url", "typeUrl", Ty::String),
        f(5, "nonce", "nonce", Ty::String),
        rep(6, "removed_resources", "removedResources", Ty::String),
        f(7, "control_plane", "controlPlane", Ty::Message(&CONTROL_PLANE)),
        rep(8, "removed_resource_names", "removedResourceNames", Ty::Message(&RESOURCE_NAME)),
        rep(9, "resource_errors", "resourceErrors", Ty::Message(&RESOURCE_ERROR)),
    ],
);
static RESOURCE: Message = msg(
    "envoy.service.discovery.v3.Resource",
    &[
        f(1, "version", "version", Ty::String),
        f(2, "resource", "resource", Ty::Message(&ANY)),
        f(3, "name", "name", Ty::String),
        rep(4, "aliases", "aliases", Ty::String),
        f(6, "ttl", "ttl", Ty::Message(&DURATION)),
        f(7, "cache_control", "cacheControl", Ty::Message(&CACHE_CONTROL)),
        f(8, "resource_name", "resourceName", Ty::Message(&RESOURCE_NAME)),
        f(9, "metadata", "metadata", Ty::Opaque),
    ],
);
static CACHE_CONTROL: Message =
    msg("envoy.service.discovery.v3.Resource.CacheControl", &[f(1, "do_not_cache", "doNotCache", Ty::Bool)]);
static CONTROL_PLANE: Message =
    msg("envoy.config.core.v3.ControlPlane", &[f(1, "identifier", "identifier", Ty::String)]);
static RESOURCE_ERROR: Message = msg(
    "envoy.service.discovery.v3.ResourceError",
    &[
        f(1, "resource_name", "resourceName", Ty::Message(&RESOURCE_NAME)),
        f(2, "error_detail", "errorDetail", Ty::Message(&STATUS)),
    ],
);
static RESOURCE_NAME: Message = msg(
    "envoy.service.discovery.v3.ResourceName",
    &[
        f(1, "name", "name", Ty::String),
        f(2, "dynamic_parameter_constraints", "dynamicParameterConstraints", Ty::Opaque),
    ],
);
static STATUS: Message = msg(
    "google.rpc.Status",
    &[
        f(1, "code", "code", Ty::Int32),
        f(2, "message", "message", Ty::String),
        rep(3, "details", "details", Ty::Message(&ANY)),
    ],
);

// ---- ECDS resource ----
// envoy `api/envoy/config/core/v3/extension.proto`; cncf/xds `udpa/type/v1/typed_struct.proto` (the same
// fields as `xds/type/v3/typed_struct.proto`)

pub(crate) static TYPED_EXTENSION_CONFIG: Message = msg(
    "envoy.config.core.v3.TypedExtensionConfig",
    &[f(1, "name", "name", Ty::String), f(2, "typed_config", "typedConfig", Ty::Message(&ANY))],
);
pub(crate) static TYPED_STRUCT: Message = msg(
    "udpa.type.v1.TypedStruct",
    &[f(1, "type_url", "typeUrl", Ty::String), f(2, "value", "value", Ty::Message(&STRUCT))],
);

// ---- Wasm ----
// envoy `api/envoy/extensions/filters/{http,network}/wasm/v3/wasm.proto`,
// `api/envoy/extensions/wasm/v3/wasm.proto`, `api/envoy/config/core/v3/{base,http_uri,backoff}.proto`

pub(crate) static HTTP_WASM: Message =
    msg("envoy.extensions.filters.http.wasm.v3.Wasm", &[f(1, "config", "config", Ty::Message(&PLUGIN_CONFIG))]);
pub(crate) static NETWORK_WASM: Message =
    msg("envoy.extensions.filters.network.wasm.v3.Wasm", &[f(1, "config", "config", Ty::Message(&PLUGIN_CONFIG))]);
static FAILURE_POLICY: EnumDef = EnumDef {
    name: "envoy.extensions.wasm.v3.FailurePolicy",
    values: &[("UNSPECIFIED", 0), ("FAIL_RELOAD", 1), ("FAIL_CLOSED", 2), ("FAIL_OPEN", 3)],
};
static PLUGIN_CONFIG: Message = msg(
    "envoy.extensions.wasm.v3.PluginConfig",
    &[
        f(1, "name", "name", Ty::String),
        f(2, "root_id", "rootId", Ty::String),
        one(3, "vm_config", "vmConfig", Ty::Message(&VM_CONFIG), "vm"),
        f(4, "configuration", "configuration", Ty::Message(&ANY)),
        f(5, "fail_open", "failOpen", Ty::Bool),
        f(6, "capability_restriction_config", "capabilityRestrictionConfig", Ty::Message(&CAPABILITY_RESTRICTION)),
        f(7, "failure_policy", "failurePolicy", Ty::Enum(&FAILURE_POLICY)),
        f(8, "reload_config", "reloadConfig", Ty::Message(&RELOAD_CONFIG)),
        f(9, "allow_on_headers_stop_iteration", "allowOnHeadersStopIteration", Ty::Message(&BOOL_VALUE)),
    ],
);
static VM_CONFIG: Message = msg(
    "envoy.extensions.wasm.v3.VmConfig",
    &[
        f(1, "vm_id", "vmId", Ty::String),
        f(2, "runtime", "runtime", Ty::String),
        f(3, "code", "code", Ty::Message(&ASYNC_DATA_SOURCE)),
        f(4, "configuration", "configuration", Ty::Message(&ANY)),
        f(5, "allow_precompiled", "allowPrecompiled", Ty::Bool),
        f(6, "nack_on_code_cache_miss", "nackOnCodeCacheMiss", Ty::Bool),
        f(7, "environment_variables", "environmentVariables", Ty::Message(&ENVIRONMENT_VARIABLES)),
    ],
);
static ENVIRONMENT_VARIABLES: Message = msg(
    "envoy.extensions.wasm.v3.EnvironmentVariables",
    &[
        rep(1, "host_env_keys", "hostEnvKeys", Ty::String),
        rep(2, "key_values", "keyValues", Ty::Map(&KEY_VALUES_ENTRY)),
    ],
);
static KEY_VALUES_ENTRY: Message = msg(
    "envoy.extensions.wasm.v3.EnvironmentVariables.KeyValuesEntry",
    &[f(1, "key", "key", Ty::String), f(2, "value", "value", Ty::String)],
);
static CAPABILITY_RESTRICTION: Message = msg(
    "envoy.extensions.wasm.v3.CapabilityRestrictionConfig",
    &[rep(1, "allowed_capabilities", "allowedCapabilities", Ty::Map(&ALLOWED_CAPABILITIES_ENTRY))],
);
static ALLOWED_CAPABILITIES_ENTRY: Message = msg(
    "envoy.extensions.wasm.v3.CapabilityRestrictionConfig.AllowedCapabilitiesEntry",
    &[f(1, "key", "key", Ty::String), f(2, "value", "value", Ty::Message(&SANITIZATION_CONFIG))],
);
static SANITIZATION_CONFIG: Message = msg("envoy.extensions.wasm.v3.SanitizationConfig", &[]);
static RELOAD_CONFIG: Message =
    msg("envoy.extensions.wasm.v3.ReloadConfig", &[f(1, "backoff", "backoff", Ty::Message(&BACKOFF_STRATEGY))]);
static ASYNC_DATA_SOURCE: Message = msg(
    "envoy.config.core.v3.AsyncDataSource",
    &[
        one(1, "local", "local", Ty::Message(&DATA_SOURCE), "specifier"),
        one(2, "remote", "remote", Ty::Message(&REMOTE_DATA_SOURCE), "specifier"),
    ],
);
static DATA_SOURCE: Message = msg(
    "envoy.config.core.v3.DataSource",
    &[
        one(1, "filename", "filename", Ty::String, "specifier"),
        one(2, "inline_bytes", "inlineBytes", Ty::Bytes, "specifier"),
        one(3, "inline_string", "inlineString", Ty::String, "specifier"),
        one(4, "environment_variable", "environmentVariable", Ty::String, "specifier"),
        f(5, "watched_directory", "watchedDirectory", Ty::Message(&WATCHED_DIRECTORY)),
    ],
);
static WATCHED_DIRECTORY: Message = msg("envoy.config.core.v3.WatchedDirectory", &[f(1, "path", "path", Ty::String)]);
static REMOTE_DATA_SOURCE: Message = msg(
    "envoy.config.core.v3.RemoteDataSource",
    &[
        f(1, "http_uri", "httpUri", Ty::Message(&HTTP_URI)),
        f(2, "sha256", "sha256", Ty::String),
        f(3, "retry_policy", "retryPolicy", Ty::Message(&RETRY_POLICY)),
    ],
);
static HTTP_URI: Message = msg(
    "envoy.config.core.v3.HttpUri",
    &[
        f(1, "uri", "uri", Ty::String),
        one(2, "cluster", "cluster", Ty::String, "http_upstream_type"),
        f(3, "timeout", "timeout", Ty::Message(&DURATION)),
    ],
);
static RETRY_POLICY: Message = msg(
    "envoy.config.core.v3.RetryPolicy",
    &[
        f(1, "retry_back_off", "retryBackOff", Ty::Message(&BACKOFF_STRATEGY)),
        f(2, "num_retries", "numRetries", Ty::Message(&UINT32_VALUE)),
        f(3, "retry_on", "retryOn", Ty::String),
        f(4, "retry_priority", "retryPriority", Ty::Message(&RETRY_PRIORITY)),
        rep(5, "retry_host_predicate", "retryHostPredicate", Ty::Message(&RETRY_HOST_PREDICATE)),
        f(6, "host_selection_retry_max_attempts", "hostSelectionRetryMaxAttempts", Ty::Int64),
    ],
);
static RETRY_PRIORITY: Message = msg(
    "envoy.config.core.v3.RetryPolicy.RetryPriority",
    &[f(1, "name", "name", Ty::String), one(2, "typed_config", "typedConfig", Ty::Message(&ANY), "config_type")],
);
static RETRY_HOST_PREDICATE: Message = msg(
    "envoy.config.core.v3.RetryPolicy.RetryHostPredicate",
    &[f(1, "name", "name", Ty::String), one(2, "typed_config", "typedConfig", Ty::Message(&ANY), "config_type")],
);
static BACKOFF_STRATEGY: Message = msg(
    "envoy.config.core.v3.BackoffStrategy",
    &[
        f(1, "base_interval", "baseInterval", Ty::Message(&DURATION)),
        f(2, "max_interval", "maxInterval", Ty::Message(&DURATION)),
    ],
);

/// Every message a JSON `Any` may name (by full name) and that we can encode.
static KNOWN: &[&Message] = &[
    &ANY,
    &DURATION,
    &EMPTY,
    &STRUCT,
    &VALUE,
    &LIST_VALUE,
    &STRING_VALUE,
    &BYTES_VALUE,
    &BOOL_VALUE,
    &INT32_VALUE,
    &INT64_VALUE,
    &UINT32_VALUE,
    &UINT64_VALUE,
    &DOUBLE_VALUE,
    &FLOAT_VALUE,
    &TYPED_EXTENSION_CONFIG,
    &HTTP_WASM,
    &NETWORK_WASM,
    &PLUGIN_CONFIG,
    &VM_CONFIG,
    &ENVIRONMENT_VARIABLES,
    &CAPABILITY_RESTRICTION,
    &SANITIZATION_CONFIG,
    &RELOAD_CONFIG,
    &ASYNC_DATA_SOURCE,
    &DATA_SOURCE,
    &WATCHED_DIRECTORY,
    &REMOTE_DATA_SOURCE,
    &HTTP_URI,
    &RETRY_POLICY,
    &RETRY_PRIORITY,
    &RETRY_HOST_PREDICATE,
    &BACKOFF_STRATEGY,
];

/// The message a type URL names (compared by the part after the last `/`), if we model it.
pub(crate) fn by_type_url(type_url: &str) -> Option<&'static Message> {
    let name = short_name(type_url);
    KNOWN.iter().copied().find(|m| m.name == name)
}

/// The part of a type URL after its last `/` (the protobuf rule for resolving `Any`).
pub(crate) fn short_name(type_url: &str) -> &str {
    type_url.rsplit('/').next().unwrap_or(type_url)
}

// ---- errors ----

/// Why a message does not parse or a Struct does not map onto it: the field path and the cause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SchemaError {
    /// Field names from the outermost message inwards.
    pub path: Vec<String>,
    pub cause: String,
}

impl SchemaError {
    fn new(cause: impl Into<String>) -> SchemaError {
        SchemaError { path: Vec::new(), cause: cause.into() }
    }

    fn within(mut self, field: &str) -> SchemaError {
        self.path.insert(0, field.to_owned());
        self
    }
}

impl fmt::Display for SchemaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.cause)
        } else {
            write!(f, "{}: {}", self.path.join("."), self.cause)
        }
    }
}

// ---- the memory budget of a conversion ----

/// What the conversion of one response may allocate for the configurations it decodes (the trees of
/// TypedStructs) and the encodings made from them: 4 × the response size + 8 MiB. On the wire a value costs
/// a few bytes; decoded, it costs a tree node, a map slot, an allocation — many times more for small values —
/// so a hostile response could otherwise take many times its size. Charges estimate the heap bytes about to be
/// allocated and come before the allocation; nothing is refunded, since what is charged lives until the
/// response is done. Once exceeded, every further charge fails too.
#[derive(Debug)]
pub(crate) struct Budget {
    limit: usize,
    used: usize,
    exceeded: bool,
}

/// Bytes of budget per byte of the response.
const BUDGET_PER_RESPONSE_BYTE: usize = 4;
/// Bytes of budget every response has, however small: room for the ordinary configurations of a small
/// response, whose trees are many times their wire size.
pub(crate) const BUDGET_BASE: usize = 8 << 20;

impl Budget {
    /// The budget of a response of `size` bytes.
    pub fn for_response(size: usize) -> Budget {
        let limit = size.saturating_mul(BUDGET_PER_RESPONSE_BYTE).saturating_add(BUDGET_BASE);
        Budget { limit, used: 0, exceeded: false }
    }

    #[cfg(test)]
    pub fn unlimited() -> Budget {
        Budget { limit: usize::MAX, used: 0, exceeded: false }
    }

    /// Takes `bytes` from the budget, or fails when they do not fit.
    pub fn charge(&mut self, bytes: usize) -> Result<(), SchemaError> {
        self.fits(bytes)?;
        self.used += bytes;
        Ok(())
    }

    /// Whether `bytes` more would fit, without taking them (for a buffer that is still growing and is charged
    /// when done); fails when they do not.
    pub fn fits(&mut self, bytes: usize) -> Result<(), SchemaError> {
        if self.exceeded || self.used.saturating_add(bytes) > self.limit {
            self.exceeded = true;
            return Err(SchemaError::new(self.reason()));
        }
        Ok(())
    }

    /// Whether a charge failed: the conversion of the response must stop with [`Budget::reason`].
    pub fn exceeded(&self) -> bool {
        self.exceeded
    }

    pub fn reason(&self) -> String {
        format!(
            "the decoded configuration exceeds the memory budget of {} bytes ({} × the response size + {} MiB)",
            self.limit,
            BUDGET_PER_RESPONSE_BYTE,
            BUDGET_BASE >> 20
        )
    }
}

// ---- binary validation ----

/// Checks that `buf` parses as `msg` the way Go's `proto.Unmarshal` would: valid wire format everywhere in
/// the modelled tree, known fields with their declared wire type, valid UTF-8 in strings. Unknown fields are
/// allowed (and kept by the rewriters).
pub(crate) fn validate(msg: &'static Message, buf: &[u8]) -> Result<(), SchemaError> {
    validate_at(msg, buf, 0)
}

fn validate_at(msg: &'static Message, buf: &[u8], depth: usize) -> Result<(), SchemaError> {
    if depth > MAX_DEPTH {
        return Err(SchemaError::new(format!("{}: nested more than {MAX_DEPTH} levels deep", msg.name)));
    }
    for field in Fields::new(buf) {
        let field = field.map_err(|e| SchemaError::new(format!("{}: {e}", msg.name)))?;
        let Some(def) = msg.field(field.number) else { continue };
        validate_field(def, &field, depth).map_err(|e| e.within(def.name))?;
    }
    Ok(())
}

fn validate_field(def: &'static FieldDef, field: &wire::Field<'_>, depth: usize) -> Result<(), SchemaError> {
    let wrong =
        |want: &str| Err(SchemaError::new(format!("wire type {:?} where {want} was expected", field.wire_type)));
    let packed = def.repeated && field.wire_type == WireType::LengthDelimited;
    match def.ty {
        Ty::String => {
            if field.wire_type != WireType::LengthDelimited {
                return wrong("a string");
            }
            if !field.payload.is_ascii() && std::str::from_utf8(field.payload).is_err() {
                return Err(SchemaError::new("string field contains invalid UTF-8"));
            }
        }
        Ty::Bytes => {
            if field.wire_type != WireType::LengthDelimited {
                return wrong("bytes");
            }
        }
        Ty::Bool | Ty::Int32 | Ty::Int64 | Ty::UInt32 | Ty::UInt64 | Ty::Enum(_) => {
            if packed {
                let mut rest = field.payload;
                while !rest.is_empty() {
                    prost::encoding::decode_varint(&mut rest)
                        .map_err(|e| SchemaError::new(format!("packed varints: {e}")))?;
                }
            } else if field.wire_type != WireType::Varint {
                return wrong("a varint");
            }
        }
        Ty::Double | Ty::Float => {
            let (size, want) = match def.ty {
                Ty::Double => (8, WireType::SixtyFourBit),
                _ => (4, WireType::ThirtyTwoBit),
            };
            if packed {
                if !field.payload.len().is_multiple_of(size) {
                    return Err(SchemaError::new("packed fixed-size values have a partial element"));
                }
            } else if field.wire_type != want {
                return wrong("a fixed-size number");
            }
        }
        Ty::Message(child) | Ty::Map(child) => {
            if field.wire_type != WireType::LengthDelimited {
                return wrong("a message");
            }
            validate_at(child, field.payload, depth + 1)?;
        }
        Ty::Opaque => {
            if field.wire_type != WireType::LengthDelimited {
                return wrong("a message");
            }
            wire::check(field.payload).map_err(|e| SchemaError::new(e.to_string()))?;
        }
    }
    Ok(())
}

// ---- proto3 JSON (as carried by a google.protobuf.Struct) to binary ----

/// A JSON value as a `google.protobuf.Struct` carries it (numbers are doubles).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum JVal {
    Null,
    Num(f64),
    Str(String),
    Bool(bool),
    Obj(BTreeMap<String, JVal>),
    List(Vec<JVal>),
}

impl JVal {
    fn kind(&self) -> &'static str {
        match self {
            JVal::Null => "null",
            JVal::Num(_) => "a number",
            JVal::Str(_) => "a string",
            JVal::Bool(_) => "a bool",
            JVal::Obj(_) => "an object",
            JVal::List(_) => "a list",
        }
    }
}

/// What an encoding met that it could not encode exactly.
#[derive(Debug, Default)]
pub(crate) struct EncodeNotes {
    /// `@type`s of `Any` values we do not model; they were encoded with an empty `value`.
    pub unencodable_any: Vec<String>,
}

/// What an encoding carries along: the notes it takes and the budget it is charged to.
struct Cx<'e> {
    notes: &'e mut EncodeNotes,
    budget: &'e mut Budget,
}

/// Encodes the JSON value `value` as the binary message `msg` by the proto3 JSON mapping: keys may be field
/// names or json names; an unknown key is an error.
#[cfg(test)]
pub(crate) fn encode_json(
    msg: &'static Message,
    value: &JVal,
    notes: &mut EncodeNotes,
) -> Result<Vec<u8>, SchemaError> {
    let mut out = Vec::new();
    encode_message_value(msg, value, &mut Cx { notes, budget: &mut Budget::unlimited() }, 0, &mut out)?;
    Ok(out)
}

/// [`encode_json`] of a JSON object, borrowed as it is (a TypedStruct's tree is encoded without a copy). The
/// encoding is charged to `budget`; `size_hint` is its expected size (the buffer is sized once).
pub(crate) fn encode_json_object(
    msg: &'static Message,
    map: &BTreeMap<String, JVal>,
    notes: &mut EncodeNotes,
    budget: &mut Budget,
    size_hint: usize,
) -> Result<Vec<u8>, SchemaError> {
    budget.fits(size_hint)?;
    let mut out = Vec::with_capacity(size_hint);
    encode_object(msg, map, &mut Cx { notes, budget }, 0, &mut out)?;
    budget.charge(out.capacity())?;
    Ok(out)
}

/// A message-typed value in JSON: well-known types have their special forms. Every encoder appends to `out`,
/// and a nested message is written in place (`wire::put_len_with`), so that no level copies its children.
fn encode_message_value(
    msg: &'static Message,
    value: &JVal,
    cx: &mut Cx<'_>,
    depth: usize,
    out: &mut Vec<u8>,
) -> Result<(), SchemaError> {
    if depth > MAX_DEPTH {
        return Err(SchemaError::new(format!("{}: nested more than {MAX_DEPTH} levels deep", msg.name)));
    }
    match msg.wkt {
        Wkt::Duration => {
            let JVal::Str(s) = value else {
                return Err(SchemaError::new(format!(
                    "{} must be a string like \"30s\", not {}",
                    msg.name,
                    value.kind()
                )));
            };
            let (seconds, nanos) = parse_duration(s)?;
            if seconds != 0 {
                encode_key(1, WireType::Varint, out);
                encode_varint(seconds as u64, out);
            }
            if nanos != 0 {
                encode_key(2, WireType::Varint, out);
                encode_varint(nanos as i64 as u64, out);
            }
        }
        Wkt::Wrapper => {
            let def = &msg.fields[0];
            encode_scalar(def, value, false, out)?;
        }
        Wkt::ListValue => {
            let JVal::List(items) = value else {
                return Err(SchemaError::new(format!("{} must be a list, not {}", msg.name, value.kind())));
            };
            for v in items {
                wire::put_len_with(out, 1, |out| encode_message_value(&VALUE, v, cx, depth + 1, out))?;
                cx.budget.fits(out.capacity())?;
            }
        }
        Wkt::Value => match value {
            JVal::Null => wire::put_varint(out, 1, 0),
            JVal::Num(n) => {
                encode_key(2, WireType::SixtyFourBit, out);
                out.extend_from_slice(&n.to_le_bytes());
            }
            JVal::Str(s) => wire::put_len(out, 3, s.as_bytes()),
            JVal::Bool(b) => wire::put_varint(out, 4, u64::from(*b)),
            JVal::Obj(_) => {
                wire::put_len_with(out, 5, |out| encode_message_value(&STRUCT, value, cx, depth + 1, out))?;
            }
            JVal::List(_) => {
                wire::put_len_with(out, 6, |out| encode_message_value(&LIST_VALUE, value, cx, depth + 1, out))?;
            }
        },
        Wkt::Struct | Wkt::Any | Wkt::None | Wkt::Empty => {
            let JVal::Obj(map) = value else {
                return Err(SchemaError::new(format!("{} must be an object, not {}", msg.name, value.kind())));
            };
            encode_object(msg, map, cx, depth, out)?;
        }
    }
    Ok(())
}

/// A message-typed value given as a JSON object: a `Struct`, an `Any` or a plain message.
fn encode_object(
    msg: &'static Message,
    map: &BTreeMap<String, JVal>,
    cx: &mut Cx<'_>,
    depth: usize,
    out: &mut Vec<u8>,
) -> Result<(), SchemaError> {
    if depth > MAX_DEPTH {
        return Err(SchemaError::new(format!("{}: nested more than {MAX_DEPTH} levels deep", msg.name)));
    }
    match msg.wkt {
        Wkt::Struct => {
            for (k, v) in map {
                wire::put_len_with(out, 1, |entry| {
                    wire::put_len(entry, 1, k.as_bytes());
                    wire::put_len_with(entry, 2, |entry| encode_message_value(&VALUE, v, cx, depth + 1, entry))?;
                    Ok(())
                })?;
                cx.budget.fits(out.capacity())?;
            }
        }
        Wkt::Any => {
            if map.is_empty() {
                return Ok(());
            }
            let Some(JVal::Str(type_url)) = map.get("@type") else {
                return Err(SchemaError::new(format!("{}: missing or invalid \"@type\"", msg.name)));
            };
            wire::put_len(out, 1, type_url.as_bytes());
            let Some(inner) = by_type_url(type_url) else {
                cx.notes.unencodable_any.push(type_url.clone());
                return Ok(());
            };
            let rest = map.iter().filter(|(k, _)| *k != "@type");
            let value = match inner.wkt {
                Wkt::None | Wkt::Empty => None,
                _ => {
                    if let Some((k, _)) = rest.clone().find(|(k, _)| *k != "value") {
                        return Err(SchemaError::new(format!("unknown field {k:?} in {}", inner.name)));
                    }
                    let v = map.get("value").unwrap_or(&JVal::Null);
                    if *v == JVal::Null && inner.wkt != Wkt::Value {
                        return Err(SchemaError::new(format!("{}: missing \"value\" in Any", inner.name)));
                    }
                    Some(v)
                }
            };
            let start = out.len();
            let written = wire::put_len_with(out, 2, |out| match value {
                None => encode_fields(inner, rest, cx, depth + 1, out),
                Some(v) => encode_message_value(inner, v, cx, depth + 1, out),
            })
            .map_err(|e| e.within(type_url))?;
            if written == 0 {
                out.truncate(start); // an empty `value` is not written
            }
        }
        Wkt::None | Wkt::Empty => encode_fields(msg, map.iter(), cx, depth, out)?,
        _ => return Err(SchemaError::new(format!("{} cannot be given as an object", msg.name))),
    }
    Ok(())
}

/// The fields of a plain message from the members of a JSON object, written in field-number order.
fn encode_fields<'v>(
    msg: &'static Message,
    members: impl Iterator<Item = (&'v String, &'v JVal)>,
    cx: &mut Cx<'_>,
    depth: usize,
    out: &mut Vec<u8>,
) -> Result<(), SchemaError> {
    if depth > MAX_DEPTH {
        return Err(SchemaError::new(format!("{}: nested more than {MAX_DEPTH} levels deep", msg.name)));
    }
    let mut chosen: Vec<(&'static FieldDef, &JVal)> = Vec::new();
    for (key, v) in members {
        let Some(def) = msg.field_by_json_key(key) else {
            return Err(SchemaError::new(format!("unknown field {key:?} in {}", msg.name)));
        };
        if chosen.iter().any(|(d, _)| d.number == def.number) {
            return Err(SchemaError::new(format!("duplicate field {:?} in {}", def.json, msg.name)));
        }
        chosen.push((def, v));
    }
    chosen.sort_by_key(|(d, _)| d.number);
    let mut oneofs: Vec<&str> = Vec::new();
    for (def, v) in chosen {
        let is_null_value_field = matches!(def.ty, Ty::Message(m) if m.wkt == Wkt::Value);
        if *v == JVal::Null && !is_null_value_field {
            continue; // null: the field is not set
        }
        if let Some(group) = def.oneof {
            if oneofs.contains(&group) {
                return Err(SchemaError::new(format!("more than one field of oneof {group} in {}", msg.name)));
            }
            oneofs.push(group);
        }
        encode_field(def, v, cx, depth, out).map_err(|e| e.within(def.name))?;
        cx.budget.fits(out.capacity())?;
    }
    Ok(())
}

fn encode_field(
    def: &'static FieldDef,
    value: &JVal,
    cx: &mut Cx<'_>,
    depth: usize,
    out: &mut Vec<u8>,
) -> Result<(), SchemaError> {
    if let Ty::Map(entry) = def.ty {
        let JVal::Obj(map) = value else {
            return Err(SchemaError::new(format!("a map must be an object, not {}", value.kind())));
        };
        let (key_def, value_def) = (&entry.fields[0], &entry.fields[1]);
        for (k, v) in map {
            wire::put_len_with(out, def.number, |e| {
                encode_scalar(key_def, &JVal::Str(k.clone()), true, e)?;
                encode_single(value_def, v, cx, depth, true, e).map_err(|err| err.within(k))
            })?;
            cx.budget.fits(out.capacity())?;
        }
        return Ok(());
    }
    if def.repeated {
        let JVal::List(items) = value else {
            return Err(SchemaError::new(format!("a repeated field must be a list, not {}", value.kind())));
        };
        for item in items {
            if *item == JVal::Null {
                return Err(SchemaError::new("null in a repeated field"));
            }
            encode_single(def, item, cx, depth, true, out)?;
            cx.budget.fits(out.capacity())?;
        }
        return Ok(());
    }
    encode_single(def, value, cx, depth, def.oneof.is_some(), out)
}

/// One value of `def`; `always` writes scalars even when they hold the default.
fn encode_single(
    def: &'static FieldDef,
    value: &JVal,
    cx: &mut Cx<'_>,
    depth: usize,
    always: bool,
    out: &mut Vec<u8>,
) -> Result<(), SchemaError> {
    match def.ty {
        Ty::Message(m) => {
            wire::put_len_with(out, def.number, |out| encode_message_value(m, value, cx, depth + 1, out))?;
            Ok(())
        }
        Ty::Map(_) | Ty::Opaque => Err(SchemaError::new("cannot be given in JSON here")),
        _ => encode_scalar(def, value, always, out),
    }
}

fn encode_scalar(def: &FieldDef, value: &JVal, always: bool, out: &mut Vec<u8>) -> Result<(), SchemaError> {
    let bad = || SchemaError::new(format!("invalid value {} for a {:?} field", value.kind(), def.ty_name()));
    match def.ty {
        Ty::String => {
            let JVal::Str(s) = value else { return Err(bad()) };
            if always || !s.is_empty() {
                wire::put_len(out, def.number, s.as_bytes());
            }
        }
        Ty::Bytes => {
            let JVal::Str(s) = value else { return Err(bad()) };
            let bytes = decode_base64(s)?;
            if always || !bytes.is_empty() {
                wire::put_len(out, def.number, &bytes);
            }
        }
        Ty::Bool => {
            let JVal::Bool(b) = value else { return Err(bad()) };
            if always || *b {
                wire::put_varint(out, def.number, u64::from(*b));
            }
        }
        Ty::Int32 | Ty::Int64 | Ty::UInt32 | Ty::UInt64 => {
            let (min, max): (f64, f64) = match def.ty {
                Ty::Int32 => (i32::MIN as f64, i32::MAX as f64),
                Ty::UInt32 => (0.0, u32::MAX as f64),
                Ty::Int64 => (-9_223_372_036_854_775_808.0, 9_223_372_036_854_775_807.0),
                _ => (0.0, 18_446_744_073_709_551_615.0),
            };
            let wire_value: u64 = match value {
                JVal::Num(n) => {
                    if n.fract() != 0.0 || !n.is_finite() || *n < min || *n > max {
                        return Err(SchemaError::new(format!("{n} is not a valid {}", def.ty_name())));
                    }
                    if min < 0.0 {
                        (*n as i64) as u64
                    } else {
                        *n as u64
                    }
                }
                JVal::Str(s) => {
                    let parsed =
                        if min < 0.0 { s.parse::<i64>().ok().map(|v| v as u64) } else { s.parse::<u64>().ok() };
                    let v =
                        parsed.ok_or_else(|| SchemaError::new(format!("{s:?} is not a valid {}", def.ty_name())))?;
                    let in_range = match def.ty {
                        Ty::Int32 => i32::try_from(v as i64).is_ok(),
                        Ty::UInt32 => u32::try_from(v).is_ok(),
                        _ => true,
                    };
                    if !in_range {
                        return Err(SchemaError::new(format!("{s:?} is not a valid {}", def.ty_name())));
                    }
                    v
                }
                _ => return Err(bad()),
            };
            if always || wire_value != 0 {
                wire::put_varint(out, def.number, wire_value);
            }
        }
        Ty::Enum(e) => {
            let number: i32 = match value {
                JVal::Str(s) => e
                    .values
                    .iter()
                    .find(|(name, _)| name == s)
                    .map(|(_, n)| *n)
                    .ok_or_else(|| SchemaError::new(format!("invalid value {s:?} for enum {}", e.name)))?,
                JVal::Num(n) if n.fract() == 0.0 && *n >= i32::MIN as f64 && *n <= i32::MAX as f64 => *n as i32,
                JVal::Null if e.name == NULL_VALUE.name => 0,
                _ => return Err(bad()),
            };
            if always || number != 0 {
                wire::put_varint(out, def.number, number as i64 as u64);
            }
        }
        Ty::Double | Ty::Float => {
            let n = match value {
                JVal::Num(n) => *n,
                JVal::Str(s) => match s.as_str() {
                    "NaN" => f64::NAN,
                    "Infinity" => f64::INFINITY,
                    "-Infinity" => f64::NEG_INFINITY,
                    other => other.parse::<f64>().map_err(|_| bad())?,
                },
                _ => return Err(bad()),
            };
            if matches!(def.ty, Ty::Double) {
                if always || n.to_bits() != 0 {
                    encode_key(def.number, WireType::SixtyFourBit, out);
                    out.extend_from_slice(&n.to_le_bytes());
                }
            } else {
                let x = n as f32;
                if n.is_finite() && !x.is_finite() {
                    return Err(SchemaError::new(format!("{n} is out of range for a float")));
                }
                if always || x.to_bits() != 0 {
                    encode_key(def.number, WireType::ThirtyTwoBit, out);
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
        Ty::Message(_) | Ty::Map(_) | Ty::Opaque => return Err(bad()),
    }
    Ok(())
}

impl FieldDef {
    fn ty_name(&self) -> &'static str {
        match self.ty {
            Ty::String => "string",
            Ty::Bytes => "bytes",
            Ty::Bool => "bool",
            Ty::Int32 => "int32",
            Ty::Int64 => "int64",
            Ty::UInt32 => "uint32",
            Ty::UInt64 => "uint64",
            Ty::Double => "double",
            Ty::Float => "float",
            Ty::Enum(e) => e.name,
            Ty::Message(m) | Ty::Map(m) => m.name,
            Ty::Opaque => "message",
        }
    }
}

fn decode_base64(s: &str) -> Result<Vec<u8>, SchemaError> {
    use base64::engine::{general_purpose::GeneralPurpose, general_purpose::GeneralPurposeConfig, DecodePaddingMode};
    let config = GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    let alphabet = if s.contains(['-', '_']) { &base64::alphabet::URL_SAFE } else { &base64::alphabet::STANDARD };
    GeneralPurpose::new(alphabet, config)
        .decode(s)
        .map_err(|e| SchemaError::new(format!("invalid base64 for a bytes field: {e}")))
}

/// Parses a proto3 JSON Duration (`"30s"`, `"0.5s"`, `"-1.500s"`).
pub(crate) fn parse_duration(s: &str) -> Result<(i64, i32), SchemaError> {
    let bad = || SchemaError::new(format!("invalid google.protobuf.Duration {s:?}"));
    let body = s.strip_suffix('s').ok_or_else(bad)?;
    let (negative, body) = match body.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, body),
    };
    let (int, frac) = match body.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (body, None),
    };
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let seconds: i64 = int.parse().map_err(|_| bad())?;
    let mut nanos: i32 = 0;
    if let Some(frac) = frac {
        if frac.is_empty() || frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let padded = format!("{frac:0<9}");
        nanos = padded.parse().map_err(|_| bad())?;
    }
    if seconds > 315_576_000_000 {
        return Err(bad());
    }
    Ok(if negative { (-seconds, -nanos) } else { (seconds, nanos) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(pairs: &[(&str, JVal)]) -> JVal {
        JVal::Obj(pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect())
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), (30, 0));
        assert_eq!(parse_duration("0.5s").unwrap(), (0, 500_000_000));
        assert_eq!(parse_duration("1.000340012s").unwrap(), (1, 340_012));
        assert_eq!(parse_duration("-1.500s").unwrap(), (-1, -500_000_000));
        for bad in ["30", "s", "1.s", "1.1234567890s", "abc s", "+1s", "315576000001s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn validation_follows_go() {
        // HttpUri.uri with invalid UTF-8
        let mut m = Vec::new();
        wire::put_len(&mut m, 1, &[0xff]);
        assert!(validate(&HTTP_URI, &m).is_err());
        // a known string field as varint
        let mut m = Vec::new();
        wire::put_varint(&mut m, 1, 3);
        let e = validate(&HTTP_URI, &m).unwrap_err();
        assert_eq!(e.path, vec!["uri"]);
        // unknown fields of any type are fine
        let mut m = Vec::new();
        wire::put_varint(&mut m, 99, 3);
        m.extend_from_slice(&[0xa3, 0x06, 0x08, 0x01, 0xa4, 0x06]); // group 100
        assert!(validate(&HTTP_URI, &m).is_ok());
        // nested: timeout.seconds as LEN
        let mut d = Vec::new();
        wire::put_len(&mut d, 1, b"x");
        let mut m = Vec::new();
        wire::put_len(&mut m, 3, &d);
        assert_eq!(validate(&HTTP_URI, &m).unwrap_err().path, vec!["timeout", "seconds"]);
        // too deep Struct nesting is refused, not a stack overflow
        let mut v = Vec::new();
        for _ in 0..200 {
            let mut list = Vec::new();
            wire::put_len(&mut list, 1, &v);
            let mut value = Vec::new();
            wire::put_len(&mut value, 6, &list);
            v = value;
        }
        assert!(validate(&VALUE, &v).is_err());
    }

    #[test]
    fn json_mapping() {
        let mut notes = EncodeNotes::default();
        let uri = obj(&[
            ("uri", JVal::Str("http://x".into())),
            ("timeout", JVal::Str("1.5s".into())),
            ("cluster", JVal::Str("".into())),
        ]);
        let b = encode_json(&HTTP_URI, &uri, &mut notes).unwrap();
        // uri, cluster (oneof member: written even when empty), timeout{1, 500000000}
        let mut want = Vec::new();
        wire::put_len(&mut want, 1, b"http://x");
        wire::put_len(&mut want, 2, b"");
        let mut d = Vec::new();
        wire::put_varint(&mut d, 1, 1);
        wire::put_varint(&mut d, 2, 500_000_000);
        wire::put_len(&mut want, 3, &d);
        assert_eq!(b, want);
        let err = encode_json(&HTTP_URI, &obj(&[("wrong", JVal::Null)]), &mut notes).unwrap_err();
        assert_eq!(err.to_string(), "unknown field \"wrong\" in envoy.config.core.v3.HttpUri");
        let dup = obj(&[("vm_id", JVal::Str("a".into())), ("vmId", JVal::Str("b".into()))]);
        assert!(encode_json(&VM_CONFIG, &dup, &mut notes).is_err());
        // enums by name and number; int64 as string; wrappers bare; bytes base64 (url-safe, unpadded)
        let pc = obj(&[("failurePolicy", JVal::Str("FAIL_OPEN".into()))]);
        assert_eq!(encode_json(&PLUGIN_CONFIG, &pc, &mut notes).unwrap(), vec![0x38, 3]);
        let pc = obj(&[("failure_policy", JVal::Num(2.0))]);
        assert_eq!(encode_json(&PLUGIN_CONFIG, &pc, &mut notes).unwrap(), vec![0x38, 2]);
        assert!(encode_json(&PLUGIN_CONFIG, &obj(&[("failurePolicy", JVal::Str("NOPE".into()))]), &mut notes).is_err());
        let rp = obj(&[("numRetries", JVal::Num(3.0)), ("hostSelectionRetryMaxAttempts", JVal::Str("7".into()))]);
        assert_eq!(encode_json(&RETRY_POLICY, &rp, &mut notes).unwrap(), vec![0x12, 2, 0x08, 3, 0x30, 7]);
        assert!(encode_json(&RETRY_POLICY, &obj(&[("numRetries", JVal::Num(3.5))]), &mut notes).is_err());
        let ds = obj(&[("inlineBytes", JVal::Str("AGFzbQ".into()))]);
        assert_eq!(encode_json(&DATA_SOURCE, &ds, &mut notes).unwrap(), vec![0x12, 4, 0, b'a', b's', b'm']);
        let two = obj(&[("filename", JVal::Str("a".into())), ("inline_string", JVal::Str("b".into()))]);
        assert!(encode_json(&DATA_SOURCE, &two, &mut notes).is_err());
        // Any: WKT with "value", ordinary message with its fields, unknown type noted
        let any = obj(&[
            ("@type", JVal::Str("type.googleapis.com/google.protobuf.StringValue".into())),
            ("value", JVal::Str("hi".into())),
        ]);
        let b = encode_json(&ANY, &any, &mut notes).unwrap();
        let mut want = Vec::new();
        wire::put_len(&mut want, 1, b"type.googleapis.com/google.protobuf.StringValue");
        wire::put_len(&mut want, 2, &[0x0a, 2, b'h', b'i']);
        assert_eq!(b, want);
        let any = obj(&[
            ("@type", JVal::Str("type.googleapis.com/envoy.config.core.v3.HttpUri".into())),
            ("uri", JVal::Str("u".into())),
        ]);
        let b = encode_json(&ANY, &any, &mut notes).unwrap();
        assert!(b.ends_with(&[0x12, 3, 0x0a, 1, b'u']));
        assert!(notes.unencodable_any.is_empty());
        let any = obj(&[("@type", JVal::Str("type.googleapis.com/some.Unknown".into())), ("x", JVal::Num(1.0))]);
        encode_json(&ANY, &any, &mut notes).unwrap();
        assert_eq!(notes.unencodable_any, vec!["type.googleapis.com/some.Unknown".to_string()]);
    }
}
