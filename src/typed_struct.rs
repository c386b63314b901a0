//! Wasm filter config carried as a `google.protobuf.Struct` inside a `udpa.type.v1.TypedStruct` or
//! `xds.type.v3.TypedStruct`.

use std::collections::BTreeMap;

use crate::schema::{self, Budget, EncodeNotes, JVal, SchemaError, MAX_DEPTH};
use crate::wire::{self, Msg};

/// A decoded TypedStruct: the inner type URL and the `Struct` as a JSON object.
#[derive(Debug, Clone)]
pub(crate) struct TypedStruct {
    pub type_url: String,
    pub value: BTreeMap<String, JVal>,
}

/// Parses a serialized `udpa.type.v1.TypedStruct` / `xds.type.v3.TypedStruct` (both have the same fields),
/// charging the decoded tree to `budget`.
pub(crate) fn parse(bytes: &[u8], budget: &mut Budget) -> Result<TypedStruct, SchemaError> {
    schema::validate(&schema::TYPED_STRUCT, bytes)?;
    let ts = Msg::from(bytes);
    let type_url = ts.last_string(1).map_err(wire_cause)?.to_owned();
    let value = match ts.child(2).map_err(wire_cause)? {
        Some(s) => decode_struct(s, 0, budget)?,
        None => BTreeMap::new(),
    };
    Ok(TypedStruct { type_url, value })
}

fn cause(text: impl Into<String>) -> SchemaError {
    SchemaError { path: Vec::new(), cause: text.into() }
}

fn wire_cause(e: wire::WireError) -> SchemaError {
    cause(e.to_string())
}

// What a decoded tree takes on the heap, charged to the budget before it is allocated. Sizes from Rust's std
// on 64-bit targets: a `BTreeMap` node holds up to 11 entries (`alloc/src/collections/btree/node.rs`:
// `CAPACITY = 2 * B - 1`, `B = 6`) and nodes are at least about half full; an allocation carries the
// allocator's header and rounding (glibc `malloc/malloc.c`: 8 bytes of header, 16-byte granules, 32 at least).

/// A map entry's share of the B-tree: its (key, value) slot twice over.
const MAP_ENTRY: usize = 2 * size_of::<(String, JVal)>();
/// The first node of a non-empty map.
const MAP_NODE: usize = 11 * size_of::<(String, JVal)>() + 16;
/// A value's slot in a list.
const LIST_SLOT: usize = size_of::<JVal>();

/// The heap an allocation of `len` bytes takes (nothing for an empty string or list).
fn block(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        len.saturating_add(16).max(32)
    }
}

/// A `google.protobuf.Struct` (already validated; its occurrences read in place) as a JSON object; a later
/// duplicate key wins.
pub(crate) fn decode_struct(
    s: Msg<'_>,
    depth: usize,
    budget: &mut Budget,
) -> Result<BTreeMap<String, JVal>, SchemaError> {
    if depth > MAX_DEPTH {
        return Err(cause("Struct nested too deep"));
    }
    let mut map = BTreeMap::new();
    for field in s.fields() {
        let field = field.map_err(wire_cause)?;
        if field.number != 1 {
            continue;
        }
        // A map entry is a message of its own: its `value` (2) may occur more than once and merges.
        let entry = Msg::from(field.bytes().map_err(wire_cause)?);
        let key = entry.last_string(1).map_err(wire_cause)?;
        budget.charge(if map.is_empty() { block(MAP_NODE) } else { 0 } + MAP_ENTRY + block(key.len()))?;
        let key = key.to_owned();
        let value = match entry.child(2).map_err(wire_cause)? {
            Some(v) => decode_value(v, depth + 1, budget).map_err(|e| prefix(e, &key))?,
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

/// A `google.protobuf.Value` (`null_value` 1, `number_value` 2, `string_value` 3, `bool_value` 4,
/// `struct_value` 5, `list_value` 6: the oneof `kind` of protobuf `google/protobuf/struct.proto`).
fn decode_value(v: Msg<'_>, depth: usize, budget: &mut Budget) -> Result<JVal, SchemaError> {
    if depth > MAX_DEPTH {
        return Err(cause("Struct nested too deep"));
    }
    let Some(kind) = v.oneof(&[1, 2, 3, 4, 5, 6]).map_err(wire_cause)? else {
        return Err(cause("google.protobuf.Value with no kind set"));
    };
    // The last occurrence decides a scalar member; a message member's occurrences merge.
    Ok(match kind.number {
        1 => JVal::Null,
        2 => {
            let bytes: [u8; 8] = kind.last.payload.try_into().map_err(|_| cause("bad number_value"))?;
            let n = f64::from_le_bytes(bytes);
            if !n.is_finite() {
                return Err(cause("number_value is NaN or infinite, which JSON cannot carry"));
            }
            JVal::Num(n)
        }
        3 => {
            let s = kind.last.string().map_err(wire_cause)?;
            budget.charge(block(s.len()))?;
            JVal::Str(s.to_owned())
        }
        4 => JVal::Bool(kind.last.varint().map_err(wire_cause)? != 0),
        5 => JVal::Obj(decode_struct(kind.merged, depth + 1, budget)?),
        _ => {
            // `ListValue.values` (1), each item a Value of its own.
            let mut items: Vec<JVal> = Vec::new();
            for field in kind.merged.fields() {
                let field = field.map_err(wire_cause)?;
                if field.number != 1 {
                    continue;
                }
                if items.len() == items.capacity() {
                    let more = items.capacity().max(4);
                    budget.charge(more * LIST_SLOT)?;
                    items.reserve_exact(more);
                }
                items.push(decode_value(Msg::from(field.bytes().map_err(wire_cause)?), depth + 1, budget)?);
            }
            JVal::List(items)
        }
    })
}

/// Encodes a JSON object as a `google.protobuf.Struct`, charged to `budget`; `size_hint` is the expected size.
pub(crate) fn encode_struct(
    value: &BTreeMap<String, JVal>,
    budget: &mut Budget,
    size_hint: usize,
) -> Result<Vec<u8>, SchemaError> {
    schema::encode_json_object(&schema::STRUCT, value, &mut EncodeNotes::default(), budget, size_hint)
}

/// The Struct of a Wasm filter as the binary Wasm message `wasm` (HTTP or network): proto3 JSON rules,
/// snake_case or lowerCamelCase keys. The notes list `Any` types we could not encode. The encoding is charged
/// to `budget`; `size_hint` is its expected size (the Struct's size on the wire: the mapping seldom grows it).
pub(crate) fn to_wasm(
    wasm: &'static schema::Message,
    value: &BTreeMap<String, JVal>,
    budget: &mut Budget,
    size_hint: usize,
) -> Result<(Vec<u8>, EncodeNotes), SchemaError> {
    let mut notes = EncodeNotes::default();
    let bytes = schema::encode_json_object(wasm, value, &mut notes, budget, size_hint)?;
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
        let bytes = encode_struct(&m, &mut Budget::unlimited(), 0).unwrap();
        schema::validate(&schema::STRUCT, &bytes).unwrap();
        assert_eq!(decode_struct(Msg::from(&bytes), 0, &mut Budget::unlimited()).unwrap(), m);
        let mut ts = Vec::new();
        wire::put_len(&mut ts, 1, b"type.googleapis.com/x.Y");
        wire::put_len(&mut ts, 2, &bytes);
        let parsed = parse(&ts, &mut Budget::unlimited()).unwrap();
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
        assert!(decode_struct(Msg::from(&s), 0, &mut Budget::unlimited()).is_err());
    }

    /// Cuts a message after each of its fields: the pieces, concatenated, are the message.
    fn split_fields(msg: &[u8]) -> Vec<Vec<u8>> {
        wire::Fields::new(msg).map(|f| f.unwrap().raw.to_vec()).collect()
    }

    /// A TypedStruct whose messages occur several times at every level decodes to the tree of their
    /// concatenation: each `Struct`, `Value` and `ListValue` is split into one occurrence per field (and a
    /// `Value` into an earlier member of another kind first, which the later member replaces).
    #[test]
    fn repeated_occurrences_decode_as_their_concatenation() {
        let m = obj(serde_json::json!({
            "a": [1, "x", [true, [null, {"b": {"c": [2.5]}}]], {"d": "e"}],
            "f": {"g": {"h": [[], {}, "i"]}},
        }));
        let single = encode_struct(&m, &mut Budget::unlimited(), 0).unwrap();
        // Rewrites a Struct (`kind` 5) or ListValue (6) payload with every Value split, recursively.
        fn split_value(value: &[u8]) -> Vec<u8> {
            let member = Msg::from(value).oneof(&[1, 2, 3, 4, 5, 6]).unwrap().unwrap();
            let mut out = Vec::new();
            wire::put_len(&mut out, 3, b"replaced by the next member");
            match member.number {
                5 | 6 => {
                    let payload = member.last.payload;
                    for piece in split_fields(payload) {
                        let field = wire::Fields::new(&piece).next().unwrap().unwrap();
                        let inner = match (member.number, field.number) {
                            (5, 1) => split_entry(field.payload),
                            (6, 1) => split_value(field.payload),
                            _ => unreachable!(),
                        };
                        let mut wrapped = Vec::new();
                        wire::put_len(&mut wrapped, 1, &inner);
                        wire::put_len(&mut out, member.number, &wrapped);
                    }
                    if payload.is_empty() {
                        wire::put_len(&mut out, member.number, b"");
                    }
                }
                _ => out.extend_from_slice(value),
            }
            out
        }
        // A Struct entry: key, then the value in two occurrences (the kind, then nothing more).
        fn split_entry(entry: &[u8]) -> Vec<u8> {
            let e = Msg::from(entry);
            let mut out = Vec::new();
            wire::put_len(&mut out, 1, e.last_string(1).unwrap().as_bytes());
            wire::put_len(&mut out, 2, &split_value(e.last(2).unwrap().unwrap().payload));
            wire::put_len(&mut out, 2, b"");
            out
        }
        let mut split = Vec::new();
        for piece in split_fields(&single) {
            let field = wire::Fields::new(&piece).next().unwrap().unwrap();
            wire::put_len(&mut split, 1, &split_entry(field.payload));
        }
        assert_ne!(split, single);
        schema::validate(&schema::STRUCT, &split).unwrap();
        let mut ts = Vec::new();
        wire::put_len(&mut ts, 1, b"type.googleapis.com/x.Y");
        for piece in split_fields(&split) {
            wire::put_len(&mut ts, 2, &piece); // TypedStruct.value, one occurrence per entry
        }
        assert_eq!(parse(&ts, &mut Budget::unlimited()).unwrap().value, m);
        assert_eq!(decode_struct(Msg::from(&split), 0, &mut Budget::unlimited()).unwrap(), m);
    }

    /// The tree is charged as it is built; past the budget, decoding stops with the budget's reason.
    #[test]
    fn decoding_beyond_the_budget_fails() {
        let items: Vec<serde_json::Value> = (0..1000).map(|i| serde_json::json!({ "k": i })).collect();
        let m = obj(serde_json::json!({ "list": items }));
        let bytes = encode_struct(&m, &mut Budget::unlimited(), 0).unwrap();
        let mut budget = Budget::for_response(0);
        assert!(decode_struct(Msg::from(&bytes), 0, &mut budget).is_ok());
        let mut budget = Budget::for_response(0);
        budget.charge(schema::BUDGET_BASE - 100_000).unwrap();
        let err = decode_struct(Msg::from(&bytes), 0, &mut budget).unwrap_err();
        assert!(budget.exceeded());
        assert_eq!(err.cause, budget.reason());
        assert_eq!(
            budget.reason(),
            "the decoded configuration exceeds the memory budget of 8388608 bytes (4 × the response size + 8 MiB)"
        );
        // the encoding is charged too
        let mut budget = Budget::for_response(0);
        budget.charge(schema::BUDGET_BASE - bytes.len() / 2).unwrap();
        assert!(encode_struct(&m, &mut budget, 0).is_err());
        assert!(budget.exceeded());
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
