//! The rewrite of a converted resource (istio `rewriteVMConfig` in `pkg/wasm/convert.go`): `vm_config.code`
//! becomes `local { filename }` and the `ISTIO_META_*` env vars go. Lossless: each enclosing message is
//! rebuilt with `wire::rebuild`, which keeps the bytes of every other field, unknown ones included, around the
//! next message rebuilt in place, so that the new resource is written into one buffer.
//!
//! Field numbers from envoy `api/envoy/extensions/wasm/v3/wasm.proto` (`Wasm.config` 1,
//! `PluginConfig.vm_config` 3, `VmConfig.code` 3, `VmConfig.environment_variables` 7,
//! `EnvironmentVariables.host_env_keys` 1 and `key_values` 2), `api/envoy/config/core/v3/base.proto`
//! (`AsyncDataSource.local` 1, `DataSource.filename` 1), `api/envoy/config/core/v3/extension.proto`
//! (`TypedExtensionConfig.typed_config` 2), cncf/xds `udpa/type/v1/typed_struct.proto` (`TypedStruct.value` 2)
//! and protobuf `google/protobuf/any.proto` (`Any.type_url` 1, `value` 2).

use crate::schema::Budget;
use crate::typed_struct;
use crate::wire::{self, Msg, Replace, WireError};

use super::analyze::{Form, Remote};

const TYPE_PREFIX: &str = "type.googleapis.com/";
/// Istio strips every env var with this prefix, not only the ones it reads.
const INTERNAL_ENV_PREFIX: &str = "ISTIO_META_";

/// The new bytes of the resource's `Any` with its code at `path`. A Struct re-encoded is charged to `budget`.
pub(super) fn rewrite(remote: &Remote<'_>, path: &str, budget: &mut Budget) -> Result<Vec<u8>, String> {
    // A Struct naming an `Any` we cannot encode stays a TypedStruct, rewritten as a Struct (its tree is taken,
    // not copied: a resource is rewritten once).
    let new_struct = match &remote.form {
        Form::Struct { encodable: false, value, typed_struct, .. } => {
            let mut value = value.take();
            typed_struct::rewrite_struct(&mut value, path).map_err(|e| e.to_string())?;
            Some(typed_struct::encode_struct(&value, budget, typed_struct.len()).map_err(|e| e.to_string())?)
        }
        _ => None,
    };
    // The size of the new TypedExtensionConfig, about: the old one with the code's path and, for a TypedStruct,
    // its new content in place of the old.
    let new_tec_size = remote.tec.len()
        + path.len()
        + 128
        + match (&remote.form, &new_struct) {
            (Form::Direct { .. }, _) => 0,
            (Form::Struct { typed_struct, .. }, Some(new_struct)) => {
                new_struct.len().saturating_sub(typed_struct.len())
            }
            (Form::Struct { wasm, typed_struct, .. }, None) => wasm.len().saturating_sub(typed_struct.len()),
        };
    let mut any = Vec::new();
    // Any.value (last) -> TypedExtensionConfig.typed_config (merged) -> typed_config's content. The outermost
    // rebuild sizes the buffer for all; the inner ones then fit.
    let typed_config = |out: &mut Vec<u8>| new_typed_config(remote, path, new_struct.as_deref(), out);
    let tec = |out: &mut Vec<u8>| wire::rebuild(out, remote.tec, 2, Replace::Merged, 0, Some(typed_config));
    wire::rebuild(&mut any, remote.any, 2, Replace::Last, new_tec_size, Some(tec)).map_err(|e| e.to_string())?;
    Ok(any)
}

/// The resource's new `typed_config` (an `Any`), appended to `out`; `new_struct` is the rewritten Struct of a
/// TypedStruct that stays one.
fn new_typed_config(
    remote: &Remote<'_>,
    path: &str,
    new_struct: Option<&[u8]>,
    out: &mut Vec<u8>,
) -> Result<(), WireError> {
    match (&remote.form, new_struct) {
        // typed_config.value (last) is the Wasm message
        (Form::Direct { wasm }, _) => {
            let wasm = |out: &mut Vec<u8>| with_local_code(Msg::from(*wasm), path, out);
            wire::rebuild(out, remote.typed_config, 2, Replace::Last, path.len(), Some(wasm))
        }
        // The TypedStruct stays one, with its Struct (`value`, merged) replaced.
        (Form::Struct { typed_struct, .. }, Some(new_struct)) => {
            let value = |out: &mut Vec<u8>| {
                out.extend_from_slice(new_struct);
                Ok(())
            };
            let ts = |out: &mut Vec<u8>| wire::rebuild(out, *typed_struct, 2, Replace::Merged, 0, Some(value));
            wire::rebuild(out, remote.typed_config, 2, Replace::Last, new_struct.len(), Some(ts))
        }
        // The TypedStruct becomes the typed Wasm message it describes (as Istio does).
        (Form::Struct { wasm, .. }, None) => {
            wire::put_len(out, 1, format!("{TYPE_PREFIX}{}", remote.kind.type_name()).as_bytes());
            wire::put_len_with(out, 2, |out| with_local_code(Msg::from(wasm), path, out))?;
            Ok(())
        }
    }
}

/// The Wasm message with `config.vm_config` replaced by [`new_vm_config`] (the occurrences of each merged),
/// appended to `out`.
fn with_local_code(wasm: Msg<'_>, path: &str, out: &mut Vec<u8>) -> Result<(), WireError> {
    let config = wasm.child(1)?.unwrap_or(Msg::from(&[][..]));
    let vm = new_vm_config(config, path)?;
    let vm_config = |out: &mut Vec<u8>| {
        out.extend_from_slice(&vm);
        Ok(())
    };
    let plugin_config = |out: &mut Vec<u8>| wire::rebuild(out, config, 3, Replace::Merged, vm.len(), Some(vm_config));
    wire::rebuild(out, wasm, 1, Replace::Merged, vm.len(), Some(plugin_config))
}

/// `config.vm_config` (of the merged `PluginConfig`) with `code` = `local{filename: path}` and the internal env
/// vars stripped.
pub(super) fn new_vm_config(config: Msg<'_>, path: &str) -> Result<Vec<u8>, WireError> {
    let vm = config.child(3)?.unwrap_or(Msg::from(&[][..]));
    let mut data_source = Vec::with_capacity(path.len() + 4);
    wire::put_len(&mut data_source, 1, path.as_bytes());
    let mut code = Vec::with_capacity(data_source.len() + 4);
    wire::put_len(&mut code, 1, &data_source);
    let mut new_vm = wire::replace_merged(vm, 3, Some(&code))?;
    if let Some(env) = Msg::from(&new_vm).child(7)? {
        let stripped = strip_env(env)?;
        new_vm = wire::replace_merged(&new_vm, 7, stripped.as_deref())?;
    }
    Ok(new_vm)
}

/// `EnvironmentVariables` without `ISTIO_META_*` entries; `None` (the block goes) when neither key/values nor
/// host keys remain.
pub(super) fn strip_env(env: Msg<'_>) -> Result<Option<Vec<u8>>, WireError> {
    let mut out = Vec::new();
    let (mut key_values, mut host_keys) = (0, 0);
    for field in env.fields() {
        let field = field?;
        match field.number {
            1 => host_keys += 1,
            2 => {
                if wire::last_string(field.bytes()?, 1)?.starts_with(INTERNAL_ENV_PREFIX) {
                    continue;
                }
                key_values += 1;
            }
            _ => {}
        }
        out.extend_from_slice(field.raw);
    }
    Ok(if key_values == 0 && host_keys == 0 { None } else { Some(out) })
}

#[cfg(test)]
mod tests {
    use prost::Message as _;
    use wasm_ecds_testkit::ecds::{
        any_bytes, env_vars, extensions, local_file, remote_code, Any, EnvironmentVariables,
    };

    use crate::ecds::convert_sotw;
    use crate::ecds::tests::{counts, out_wasm, policy, resource, response, wasm, wasm_resource, Fake, ECDS, HTTP};
    use crate::metrics::Metrics;
    use crate::wire;

    #[test]
    fn env_stripping_variants() {
        let cases: Vec<(EnvironmentVariables, Option<EnvironmentVariables>)> = vec![
            (env_vars(&[("ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION", "1")], &[]), None),
            (env_vars(&[], &[]), None),
            (env_vars(&[("ISTIO_META_A", "1")], &["HOME"]), Some(env_vars(&[], &["HOME"]))),
            (env_vars(&[("ISTIO_META_A", "1"), ("B", "2")], &["HOME"]), Some(env_vars(&[("B", "2")], &["HOME"]))),
            (env_vars(&[("B", "2")], &[]), Some(env_vars(&[("B", "2")], &[]))),
        ];
        for (input_env, want) in cases {
            let input =
                response(vec![wasm_resource("a", &wasm(Some(remote_code("http://h/m.wasm", "")), Some(input_env)))]);
            let (fake, m) = (Fake::default(), Metrics::new());
            let out = convert_sotw(&input, &fake, &policy(), &m).ok().unwrap();
            let got = out_wasm(&extensions(&out.bytes)[0]);
            assert_eq!(got.config.unwrap().vm_config.unwrap().environment_variables, want);
        }
    }

    /// Hand-encoded input with unknown fields at every level: the output is exactly the input with
    /// `code` replaced and the ancestors' lengths re-encoded.
    #[test]
    fn unknown_fields_and_every_other_byte_survive() {
        let build = |code: &[u8], env: Option<&[u8]>| {
            let mut vm = Vec::new();
            wire::put_len(&mut vm, 1, b"vm");
            wire::put_varint(&mut vm, 50, 7); // unknown
            wire::put_len(&mut vm, 3, code);
            wire::put_len(&mut vm, 4, &Any { type_url: "t/x".into(), value: vec![1, 2, 3] }.encode_to_vec());
            if let Some(env) = env {
                wire::put_len(&mut vm, 7, env);
            }
            vm.extend_from_slice(&[0x5d, 1, 2, 3, 4]); // unknown I32 field 11
            let mut pc = Vec::new();
            wire::put_len(&mut pc, 99, b"unknown");
            wire::put_len(&mut pc, 1, b"ns.p");
            wire::put_len(&mut pc, 3, &vm);
            wire::put_varint(&mut pc, 7, 2);
            let mut w = Vec::new();
            w.extend_from_slice(&[0xeb, 0x04, 0x08, 0x01, 0xec, 0x04]); // unknown group 77
            wire::put_len(&mut w, 1, &pc);
            let mut tc = Vec::new();
            wire::put_len(&mut tc, 1, HTTP.as_bytes());
            wire::put_len(&mut tc, 2, &w);
            wire::put_varint(&mut tc, 3, 1); // unknown in the Any
            let mut tec = Vec::new();
            wire::put_len(&mut tec, 1, b"res");
            wire::put_len(&mut tec, 9, b"?"); // unknown
            wire::put_len(&mut tec, 2, &tc);
            let mut a = Vec::new();
            wire::put_len(&mut a, 1, ECDS.as_bytes());
            wire::put_len(&mut a, 2, &tec);
            wire::put_len(&mut a, 15, b"zz"); // unknown
            let mut r = Vec::new();
            wire::put_len(&mut r, 1, b"v1");
            wire::put_varint(&mut r, 20, 5); // unknown
            wire::put_len(&mut r, 2, &a);
            wire::put_len(&mut r, 4, ECDS.as_bytes());
            wire::put_len(&mut r, 5, b"nonce");
            r
        };
        let remote = remote_code("http://h/m.wasm", "nil").encode_to_vec();
        let mut env_in = Vec::new();
        wire::put_len(&mut env_in, 1, b"HOME");
        wire::put_varint(&mut env_in, 3, 9); // unknown inside env
        let mut entry = Vec::new();
        wire::put_len(&mut entry, 1, b"ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION");
        wire::put_len(&mut entry, 2, b"7");
        wire::put_len(&mut env_in, 2, &entry);
        let mut env_out = Vec::new();
        wire::put_len(&mut env_out, 1, b"HOME");
        wire::put_varint(&mut env_out, 3, 9);
        let local = local_file("/cache/m.wasm").encode_to_vec();
        let input = build(&remote, Some(&env_in));
        let (fake, m) = (Fake::default(), Metrics::new());
        let out = convert_sotw(&input, &fake, &policy(), &m).ok().unwrap();
        assert_eq!(out.bytes, build(&local, Some(&env_out)));
        assert_eq!(fake.requests()[0].resource_version, "7");
        // and without env
        let out = convert_sotw(&build(&remote, None), &fake, &policy(), &m).ok().unwrap();
        assert_eq!(out.bytes, build(&local, None));
    }

    #[test]
    fn merged_fields_and_oneof_last_wins() {
        // vm_config split over two occurrences: vm_id+code in the first, runtime in the second
        let mut vm1 = Vec::new();
        wire::put_len(&mut vm1, 1, b"vm");
        wire::put_len(&mut vm1, 3, &remote_code("http://h/m.wasm", "").encode_to_vec());
        let mut vm2 = Vec::new();
        wire::put_len(&mut vm2, 2, b"rt");
        let mut pc = Vec::new();
        wire::put_len(&mut pc, 3, &vm1);
        wire::put_len(&mut pc, 1, b"ns.p");
        wire::put_len(&mut pc, 3, &vm2);
        let mut w = Vec::new();
        wire::put_len(&mut w, 1, &pc);
        let (fake, m) = (Fake::default(), Metrics::new());
        let out = convert_sotw(&response(vec![resource("a", any_bytes(HTTP, w))]), &fake, &policy(), &m).ok().unwrap();
        let got = out_wasm(&extensions(&out.bytes)[0]);
        assert_eq!(got.local_filename().as_deref(), Some("/cache/m.wasm"));
        let vm = got.config.unwrap().vm_config.unwrap();
        assert_eq!((vm.vm_id.as_str(), vm.runtime.as_str()), ("vm", "rt"));

        // code oneof: local then remote -> remote wins -> converted
        let local = local_file("/l");
        let remote = remote_code("http://h/m.wasm", "");
        // A Wasm message whose `config.vm_config.code` is `code`, as raw bytes (so a oneof can repeat).
        let wasm_with_code = |code: &[u8]| {
            let mut vm = Vec::new();
            wire::put_len(&mut vm, 3, code);
            let mut pc = Vec::new();
            wire::put_len(&mut pc, 3, &vm);
            let mut w = Vec::new();
            wire::put_len(&mut w, 1, &pc);
            w
        };
        let mut code = local.encode_to_vec();
        code.extend(remote.encode_to_vec());
        let w = wasm_with_code(&code);
        let out = convert_sotw(&response(vec![resource("a", any_bytes(HTTP, w))]), &fake, &policy(), &m).ok().unwrap();
        assert_eq!(out.modules.len(), 1);
        // remote then local -> local wins -> untouched
        let mut code = remote.encode_to_vec();
        code.extend(local.encode_to_vec());
        let w = wasm_with_code(&code);
        let input = response(vec![resource("a", any_bytes(HTTP, w))]);
        let out = convert_sotw(&input, &fake, &policy(), &m).ok().unwrap();
        assert_eq!(out.bytes, input);
        assert_eq!(counts(&m), [2, 1, 0, 0, 0, 0]);
    }
}
