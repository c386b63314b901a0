//! Wasm filter config carried as a `google.protobuf.Struct` inside a `udpa.type.v1.TypedStruct` or
//! `xds.type.v3.TypedStruct`.

use std::collections::BTreeMap;

use crate::schema::{self, EncodeNotes, JVal, SchemaError, MAX_DEPTH};
use crate::wire::{self, Fields};

/// A decoded TypedStruct: the inner type URL and the `Struct` as a JSON object.
#[derive(Debug, Clone)]
pub(crate) struct TypedStruct {
    pub type_url: String,
    pub value: BTreeMap<String, JVal>,
}

/// Parses a serialized `udpa.type.v1.TypedStruct` / `xds.type.v3.TypedStruct` (both have the same fields).
pub(crate) fn parse(bytes: &[u8]) -> Result<TypedStruct, SchemaError> {
    schema::validate(&schema::TYPED_STRUCT, bytes)?;
    let err = |e: wire::WireError| SchemaError { path: Vec::new(), cause: e.to_string() };
    let type_url = wire::last_string(bytes, 1).map_err(err)?.to_owned();
    let value = match wire::merged(bytes, 2).map_err(err)? {
        Some(s) => decode_struct(&s, 0)?,
        None => BTreeMap::new(),
    };
    Ok(TypedStruct { type_url, value })
}

fn cause(text: impl Into<String>) -> SchemaError {
    SchemaError { path: Vec::new(), cause: text.into() }
}

/// A `google.protobuf.Struct` (already validated) as a JSON object; a later duplicate key wins.
pub(crate) fn decode_struct(buf: &[u8], depth: usize) -> Result<BTreeMap<String, JVal>, SchemaError> {
    if depth > MAX_DEPTH {
        return Err(cause("Struct nested too deep"));
    }
    let mut map = BTreeMap::new();
    for field in Fields::new(buf) {
        let field = field.map_err(|e| cause(e.to_string()))?;
        if field.number != 1 {
            continue;
        }
        let entry = field.bytes().map_err(|e| cause(e.to_string()))?;
        let key = wire::last_string(entry, 1).map_err(|e| cause(e.to_string()))?.to_owned();
        let value = match wire::merged(entry, 2).map_err(|e| cause(e.to_string()))? {
            Some(v) => decode_value(&v, depth + 1).map_err(|e| prefix(e, &key))?,
            None => return Err(prefix(cause("google.protobuf.Value with no kind set"), &key)),
        };
        map.insert(key, value);
    }
    Ok(map)
}

fn prefix(mut e: SchemaError, key: &str) -> SchemaError {
    e.path.insert(0, key.to_owned());
    e
}

fn decode_value(buf: &[u8], depth: usize) -> Result<JVal, SchemaError> {
    if depth > MAX_DEPTH {
        return Err(cause("Struct nested too deep"));
    }
    let kind = wire::oneof(buf, &[1, 2, 3, 4, 5, 6]).map_err(|e| cause(e.to_string()))?;
    let Some((number, payload)) = kind else {
        return Err(cause("google.protobuf.Value with no kind set"));
    };
    // The last occurrence decides a scalar member; `payload` is its raw value.
    let scalar = || wire::last(buf, number).ok().flatten();
    Ok(match number {
        1 => JVal::Null,
        2 => {
            let f = scalar().ok_or_else(|| cause("bad number_value"))?;
            let bytes: [u8; 8] = f.payload.try_into().map_err(|_| cause("bad number_value"))?;
            let n = f64::from_le_bytes(bytes);
            if !n.is_finite() {
                return Err(cause("number_value is NaN or infinite, which JSON cannot carry"));
            }
            JVal::Num(n)
        }
        3 => JVal::Str(
            scalar().ok_or_else(|| cause("bad string_value"))?.string().map_err(|e| cause(e.to_string()))?.to_owned(),
        ),
        4 => JVal::Bool(
            scalar().ok_or_else(|| cause("bad bool_value"))?.varint().map_err(|e| cause(e.to_string()))? != 0,
        ),
        5 => JVal::Obj(decode_struct(&payload, depth + 1)?),
        _ => {
            let mut items = Vec::new();
            for field in Fields::new(&payload) {
                let field = field.map_err(|e| cause(e.to_string()))?;
                if field.number == 1 {
                    items.push(decode_value(field.payload, depth + 1)?);
                }
            }
            JVal::List(items)
        }
    })
}

/// Encodes a JSON object as a `google.protobuf.Struct`.
pub(crate) fn encode_struct(value: &BTreeMap<String, JVal>) -> Result<Vec<u8>, SchemaError> {
    schema::encode_json_object(&schema::STRUCT, value, &mut EncodeNotes::default())
}

/// The Struct of a Wasm filter as the binary Wasm message `wasm` (HTTP or network): proto3 JSON rules,
/// snake_case or lowerCamelCase keys. The notes list `Any` types we could not encode.
pub(crate) fn to_wasm(
    wasm: &'static schema::Message,
    value: &BTreeMap<String, JVal>,
) -> Result<(Vec<u8>, EncodeNotes), SchemaError> {
    let mut notes = EncodeNotes::default();
    let bytes = schema::encode_json_object(wasm, value, &mut notes)?;
    Ok((bytes, notes))
}

fn get_mut<'a>(map: &'a mut BTreeMap<String, JVal>, snake: &str, camel: &str) -> Option<&'a mut JVal> {
    let key = if map.contains_key(snake) { snake } else { camel };
    map.get_mut(key)
}

/// The Struct rewrite of a converted filter, for when it stays a TypedStruct: `code` becomes
/// `{"local":{"filename":…}}` and `ISTIO_META_*` environment variables are stripped (the block goes when
/// nothing is left). The Struct must already have mapped onto the Wasm schema.
pub(crate) fn rewrite_struct(value: &mut BTreeMap<String, JVal>, filename: &str) -> Result<(), SchemaError> {
    let Some(JVal::Obj(config)) = value.get_mut("config") else {
        return Err(cause("no config"));
    };
    let Some(JVal::Obj(vm)) = get_mut(config, "vm_config", "vmConfig") else {
        return Err(cause("no vm_config"));
    };
    let local = JVal::Obj(BTreeMap::from([("filename".to_owned(), JVal::Str(filename.to_owned()))]));
    vm.insert("code".to_owned(), JVal::Obj(BTreeMap::from([("local".to_owned(), local)])));
    let env_key =
        if vm.contains_key("environment_variables") { "environment_variables" } else { "environmentVariables" };
    let drop_env = match vm.get_mut(env_key) {
        Some(JVal::Obj(env)) => {
            let kv_key = if env.contains_key("key_values") { "key_values" } else { "keyValues" };
            let kv_empty = match env.get_mut(kv_key) {
                Some(JVal::Obj(kv)) => {
                    kv.retain(|k, _| !k.starts_with("ISTIO_META_"));
                    kv.is_empty()
                }
                _ => true,
            };
            if kv_empty {
                env.remove(kv_key);
            }
            let host_key = if env.contains_key("host_env_keys") { "host_env_keys" } else { "hostEnvKeys" };
            let no_hosts = match env.get(host_key) {
                Some(JVal::List(keys)) => keys.is_empty(),
                _ => true,
            };
            kv_empty && no_hosts
        }
        _ => false,
    };
    if drop_env {
        vm.remove(env_key);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jv(v: serde_json::Value) -> JVal {
        match v {
            serde_json::Value::Null => JVal::Null,
            serde_json::Value::Bool(b) => JVal::Bool(b),
            serde_json::Value::Number(n) => JVal::Num(n.as_f64().unwrap()),
            serde_json::Value::String(s) => JVal::Str(s),
            serde_json::Value::Array(a) => JVal::List(a.into_iter().map(jv).collect()),
            serde_json::Value::Object(o) => JVal::Obj(o.into_iter().map(|(k, v)| (k, jv(v))).collect()),
        }
    }

    fn obj(v: serde_json::Value) -> BTreeMap<String, JVal> {
        match jv(v) {
            JVal::Obj(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn struct_round_trip() {
        let m = obj(serde_json::json!({"a": [1, "x", true, null, {"b": {}}], "c": -2.5}));
        let bytes = encode_struct(&m).unwrap();
        schema::validate(&schema::STRUCT, &bytes).unwrap();
        assert_eq!(decode_struct(&bytes, 0).unwrap(), m);
        let mut ts = Vec::new();
        wire::put_len(&mut ts, 1, b"type.googleapis.com/x.Y");
        wire::put_len(&mut ts, 2, &bytes);
        let parsed = parse(&ts).unwrap();
        assert_eq!(parsed.type_url, "type.googleapis.com/x.Y");
        assert_eq!(parsed.value, m);
    }

    #[test]
    fn value_without_kind_is_an_error() {
        let mut entry = Vec::new();
        wire::put_len(&mut entry, 1, b"k");
        wire::put_len(&mut entry, 2, b"");
        let mut s = Vec::new();
        wire::put_len(&mut s, 1, &entry);
        assert!(decode_struct(&s, 0).is_err());
    }

    #[test]
    fn struct_rewrite() {
        let mut m = obj(serde_json::json!({"config": {"vmConfig": {
            "code": {"remote": {"http_uri": {"uri": "u"}}},
            "environment_variables": {"keyValues": {"ISTIO_META_X": "1", "A": "b"}}}}}));
        rewrite_struct(&mut m, "/m.wasm").unwrap();
        assert_eq!(
            m,
            obj(serde_json::json!({"config": {"vmConfig": {
                "code": {"local": {"filename": "/m.wasm"}},
                "environment_variables": {"keyValues": {"A": "b"}}}}}))
        );
        let mut m = obj(serde_json::json!({"config": {"vm_config": {
            "code": {"remote": {}},
            "environmentVariables": {"key_values": {"ISTIO_META_X": "1"}, "hostEnvKeys": ["H"]}}}}));
        rewrite_struct(&mut m, "/m.wasm").unwrap();
        assert_eq!(
            m,
            obj(serde_json::json!({"config": {"vm_config": {
                "code": {"local": {"filename": "/m.wasm"}},
                "environmentVariables": {"hostEnvKeys": ["H"]}}}}))
        );
        let mut m = obj(serde_json::json!({"config": {"vm_config": {
            "code": {"remote": {}}, "environmentVariables": {"key_values": {"ISTIO_META_X": "1"}}}}}));
        rewrite_struct(&mut m, "/m.wasm").unwrap();
        assert_eq!(m, obj(serde_json::json!({"config": {"vm_config": {"code": {"local": {"filename": "/m.wasm"}}}}})));
    }
}
