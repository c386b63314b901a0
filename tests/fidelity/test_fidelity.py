"""Protobuf fidelity against the real Envoy schema (xds-protos), through the C ABI (the Python binding).

Inputs are built with the full Envoy schema, including fields our library does not model and field numbers
no schema knows; outputs are decoded with the same schema. Istio's own conversion cases
(pkg/wasm/convert_test.go) are here too, with a real HTTP server in place of Istio's mock cache.
"""

import hashlib
import http.server
import os
import threading

import pytest
from google.protobuf import any_pb2, duration_pb2, json_format, struct_pb2, unknown_fields, wrappers_pb2

from envoy.config.core.v3 import base_pb2, extension_pb2, http_uri_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.http.wasm.v3 import wasm_pb2 as http_wasm_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as net_rbac_pb2
from envoy.extensions.filters.network.wasm.v3 import wasm_pb2 as net_wasm_pb2
from envoy.extensions.wasm.v3 import wasm_pb2 as plugin_pb2
from envoy.service.discovery.v3 import discovery_pb2
from udpa.type.v1 import typed_struct_pb2 as udpa_ts_pb2
from xds.type.v3 import typed_struct_pb2 as xds_ts_pb2

import wasm_ecds

ECDS_TYPE = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
MODULE = b"\x00asm\x01\x00\x00\x00\x00\x09\x08fidelity"
MODULE_SHA = hashlib.sha256(MODULE).hexdigest()
# A varint field number 999 = 7999 varint 42: unknown to every message involved.
UNKNOWN = bytes([0xB8, 0x3E, 0x2A])


class ModuleServer:
    """A real HTTP server on 127.0.0.1: serves MODULE at any path except /missing; counts requests."""

    def __init__(self):
        self.requests = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                if self.path.startswith("/missing"):
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(MODULE)))
                self.end_headers()
                self.wfile.write(MODULE)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server():
    s = ModuleServer()
    yield s
    s.close()


@pytest.fixture
def cache(tmp_path):
    with wasm_ecds.Cache(cache_dir=str(tmp_path / "cache"), max_attempts=1) as c:
        yield c


def pack(msg):
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def response(*extensions, type_url=ECDS_TYPE):
    resp = discovery_pb2.DiscoveryResponse(version_info="v1", type_url=type_url, nonce="n1")
    for ext in extensions:
        resp.resources.append(pack(ext))
    return resp.SerializeToString()


def remote_wasm(uri, sha256="", fail_open=False, env=None, timeout_s=30, network=False, **plugin):
    module = net_wasm_pb2 if network else http_wasm_pb2
    vm = plugin_pb2.VmConfig(vm_id="vm", runtime="envoy.wasm.runtime.v8")
    vm.code.remote.http_uri.CopyFrom(
        http_uri_pb2.HttpUri(uri=uri, cluster="_", timeout=duration_pb2.Duration(seconds=timeout_s))
    )
    vm.code.remote.sha256 = sha256
    if env:
        vm.environment_variables.key_values.update(env)
    config = plugin_pb2.PluginConfig(name="ns.plugin", root_id="root", vm_config=vm, fail_open=fail_open, **plugin)
    config.configuration.Pack(wrappers_pb2.StringValue(value='{"a":1}'))
    return module.Wasm(config=config)


def typed_struct(wasm, kind=udpa_ts_pb2):
    ts = kind.TypedStruct(type_url="type.googleapis.com/" + wasm.DESCRIPTOR.full_name)
    ts.value.CopyFrom(struct_pb2.Struct())
    json_format.ParseDict(json_format.MessageToDict(wasm), ts.value)
    return ts


def extension(name, msg):
    return extension_pb2.TypedExtensionConfig(name=name, typed_config=pack(msg))


def decode(out):
    resp = discovery_pb2.DiscoveryResponse()
    resp.ParseFromString(out)
    exts = []
    for res in resp.resources:
        ext = extension_pb2.TypedExtensionConfig()
        assert res.Unpack(ext)
        exts.append(ext)
    return resp, exts


def local_version(wasm, path):
    """What Istio's conversion makes of `wasm`: code -> local filename, ISTIO_META_* env stripped."""
    want = type(wasm)()
    want.CopyFrom(wasm)
    vm = want.config.vm_config
    vm.code.Clear()
    vm.code.local.filename = path
    for key in [k for k in vm.environment_variables.key_values if k.startswith("ISTIO_META_")]:
        del vm.environment_variables.key_values[key]
    if not vm.environment_variables.key_values and not vm.environment_variables.host_env_keys:
        vm.ClearField("environment_variables")
    return want


def converted_wasm(ext, kind=http_wasm_pb2):
    wasm = kind.Wasm()
    assert ext.typed_config.Unpack(wasm), ext.typed_config.type_url
    path = wasm.config.vm_config.code.local.filename
    assert os.path.isabs(path), path
    with open(path, "rb") as f:
        assert f.read() == MODULE
    return wasm, path


# --- Istio's convert_test.go cases ---------------------------------------------------------------


def test_remote_load_success_typed_struct_becomes_typed_wasm(server, cache):
    wasm = remote_wasm(server.url("/test.wasm"))
    out = cache.convert(response(extension("remote-load-success", typed_struct(wasm))))
    _, (ext,) = decode(out)
    assert ext.name == "remote-load-success"
    got, path = converted_wasm(ext)
    assert got == local_version(wasm, path)


def test_remote_load_fail_rejects_naming_resource_and_url(server, cache):
    url = server.url("/missing/test.wasm")
    with pytest.raises(wasm_ecds.Rejected) as err:
        cache.convert(response(extension("remote-load-fail", typed_struct(remote_wasm(url)))))
    assert "remote-load-fail" in err.value.reason and url in err.value.reason


def test_mix_of_failure_and_success_rejects_whole_response(server, cache):
    bad = extension("remote-load-fail", typed_struct(remote_wasm(server.url("/missing/a.wasm"))))
    good = extension("remote-load-success", typed_struct(remote_wasm(server.url("/b.wasm"))))
    with pytest.raises(wasm_ecds.Rejected):
        cache.convert(response(bad, good))


def test_remote_load_fail_open_becomes_allow_all_rbac(server, cache):
    ext = extension("remote-load-fail", typed_struct(remote_wasm(server.url("/missing/a.wasm"), fail_open=True)))
    _, (got,) = decode(cache.convert(response(ext)))
    assert got.name == "remote-load-fail"
    rbac = http_rbac_pb2.RBAC()
    assert got.typed_config.Unpack(rbac)
    assert rbac == http_rbac_pb2.RBAC(rules_stat_prefix="wasm-default-allow")
    assert not rbac.HasField("rules")


def test_fail_closed_with_deny_option_becomes_deny_all_rbac(server, tmp_path):
    with wasm_ecds.Cache(cache_dir=str(tmp_path / "c"), max_attempts=1, on_fetch_failure="deny") as c:
        ext = extension("x", remote_wasm(server.url("/missing/a.wasm")))
        _, (got,) = decode(c.convert(response(ext)))
    rbac = http_rbac_pb2.RBAC()
    assert got.typed_config.Unpack(rbac)
    assert rbac.HasField("rules") and len(rbac.rules.policies) == 0 and rbac.rules.action == 0
    assert rbac.rules_stat_prefix == "wasm-default-deny"


def test_network_fail_open_sets_required_stat_prefix(server, cache):
    ext = extension("net", remote_wasm(server.url("/missing/a.wasm"), fail_open=True, network=True))
    _, (got,) = decode(cache.convert(response(ext)))
    rbac = net_rbac_pb2.RBAC()
    assert got.typed_config.Unpack(rbac)
    assert rbac.stat_prefix == "wasm-default-allow"


@pytest.mark.parametrize(
    "ext",
    [
        extension("empty", struct_pb2.Struct()),
        extension("no-wasm", udpa_ts_pb2.TypedStruct(type_url="type.googleapis.com/sometype")),
        extension(
            "no-remote-load",
            typed_struct(
                http_wasm_pb2.Wasm(
                    config=plugin_pb2.PluginConfig(
                        vm_config=plugin_pb2.VmConfig(
                            runtime="envoy.wasm.runtime.null",
                            code=base_pb2.AsyncDataSource(
                                local=base_pb2.DataSource(inline_string="envoy.wasm.metadata_exchange")
                            ),
                        )
                    )
                )
            ),
        ),
        extension("router", router_pb2.Router()),
    ],
    ids=["empty", "no-wasm", "no-remote-load", "router"],
)
def test_nothing_to_convert_is_byte_identical(cache, ext):
    data = response(ext)
    assert cache.convert(data) == data


def test_no_http_uri_rejects(cache):
    wasm = http_wasm_pb2.Wasm(
        config=plugin_pb2.PluginConfig(
            vm_config=plugin_pb2.VmConfig(code=base_pb2.AsyncDataSource(remote=base_pb2.RemoteDataSource()))
        )
    )
    with pytest.raises(wasm_ecds.Rejected) as err:
        cache.convert(response(extension("no-remote-load", typed_struct(wasm))))
    assert "httpUri" in err.value.reason or "http_uri" in err.value.reason


def test_pull_secret_is_used_and_stripped(server, cache):
    wasm = remote_wasm(server.url("/test.wasm"), env={"ISTIO_META_WASM_IMAGE_PULL_SECRET": "secret"})
    out = cache.convert(response(extension("remote-load-success", typed_struct(wasm))))
    assert b"ISTIO_META_WASM_IMAGE_PULL_SECRET" not in out  # (the cache path holds the test name)
    _, (ext,) = decode(out)
    got, path = converted_wasm(ext)
    assert got == local_version(wasm, path)
    assert not got.config.vm_config.HasField("environment_variables")


def test_empty_pull_secret_fails_the_fetch(server, cache):
    wasm = remote_wasm(server.url("/test.wasm"), env={"ISTIO_META_WASM_IMAGE_PULL_SECRET": ""})
    before = len(server.requests)
    with pytest.raises(wasm_ecds.Rejected) as err:
        cache.convert(response(extension("x", wasm)))
    assert "secret" in err.value.reason
    assert len(server.requests) == before


def test_malformed_resources_reject(cache):
    empty_any = any_pb2.Any()
    empty_any.Pack(struct_pb2.Struct())
    resp = discovery_pb2.DiscoveryResponse(type_url=ECDS_TYPE)
    resp.resources.add().Pack(wrappers_pb2.StringValue(value="not an extension config"))
    with pytest.raises(wasm_ecds.Rejected):
        cache.convert(resp.SerializeToString())
    no_typed_config = extension_pb2.TypedExtensionConfig(name="x")
    with pytest.raises(wasm_ecds.Rejected):
        cache.convert(response(no_typed_config))
    bad_struct = udpa_ts_pb2.TypedStruct(type_url="type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm")
    json_format.ParseDict({"wrong": "value"}, bad_struct.value)
    with pytest.raises(wasm_ecds.Rejected) as err:
        cache.convert(response(extension("x", bad_struct)))
    assert "wrong" in err.value.reason
    neither = http_wasm_pb2.Wasm(config=plugin_pb2.PluginConfig(vm_config=plugin_pb2.VmConfig(vm_id="v")))
    with pytest.raises(wasm_ecds.Rejected):
        cache.convert(response(extension("x", neither)))


# --- fidelity beyond Istio's cases ---------------------------------------------------------------


def with_unknown(msg):
    """`msg` re-parsed from its bytes plus an unknown field: protobuf keeps it as an unknown field."""
    again = type(msg)()
    again.ParseFromString(msg.SerializeToString() + UNKNOWN)
    return again


def unknown_numbers(msg):
    return [f.field_number for f in unknown_fields.UnknownFieldSet(msg)]


def test_direct_wasm_keeps_every_other_field_and_unknown_fields(server, cache):
    wasm = remote_wasm(
        server.url("/m.wasm"),
        sha256=MODULE_SHA.upper(),
        env={"USER_KEY": "v", "ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION": "7", "ISTIO_META_OTHER": "x"},
        failure_policy=plugin_pb2.FAIL_CLOSED,
    )
    vm = wasm.config.vm_config
    vm.allow_precompiled = True
    vm.nack_on_code_cache_miss = True
    vm.environment_variables.host_env_keys.append("HOME")
    wasm.config.capability_restriction_config.allowed_capabilities["proxy_log"].CopyFrom(plugin_pb2.SanitizationConfig())
    wasm.config.allow_on_headers_stop_iteration.value = True
    # unknown fields at every level on the path that gets rewritten
    vm = with_unknown(vm)
    wasm.config.vm_config.CopyFrom(vm)
    wasm.config.CopyFrom(with_unknown(wasm.config))
    wasm = with_unknown(wasm)
    ext = with_unknown(extension("direct", wasm))
    data = response(ext) + bytes([0xC0, 0x3E, 0x01])  # unknown field 1000 on the response itself

    out = cache.convert(data)
    resp, (got_ext,) = decode(out)
    assert unknown_numbers(resp) == [1000]
    assert unknown_numbers(got_ext) == [999]
    got, path = converted_wasm(got_ext)
    assert unknown_numbers(got) == [999]
    assert unknown_numbers(got.config) == [999]
    assert unknown_numbers(got.config.vm_config) == [999]
    want = local_version(wasm, path)
    assert got == want
    assert dict(got.config.vm_config.environment_variables.key_values) == {"USER_KEY": "v"}
    assert list(got.config.vm_config.environment_variables.host_env_keys) == ["HOME"]


def test_only_host_env_keys_left_keeps_them(server, cache):
    wasm = remote_wasm(server.url("/m.wasm"), env={"ISTIO_META_WASM_IMAGE_PULL_POLICY": "Always"})
    wasm.config.vm_config.environment_variables.host_env_keys.append("POD_NAME")
    _, (ext,) = decode(cache.convert(response(extension("e", wasm))))
    got, _ = converted_wasm(ext)
    env = got.config.vm_config.environment_variables
    assert list(env.host_env_keys) == ["POD_NAME"] and len(env.key_values) == 0


@pytest.mark.parametrize("kind", [udpa_ts_pb2, xds_ts_pb2], ids=["udpa", "xds"])
def test_typed_struct_forms_convert_to_the_same_wasm_as_the_direct_form(server, cache, kind):
    wasm = remote_wasm(server.url("/m.wasm"), sha256=MODULE_SHA, env={"K": "v", "ISTIO_META_X": "y"})
    _, (direct,) = decode(cache.convert(response(extension("d", wasm))))
    _, (wrapped,) = decode(cache.convert(response(extension("d", typed_struct(wasm, kind)))))
    d, _ = converted_wasm(direct)
    if wrapped.typed_config.type_url.endswith("TypedStruct"):
        # allowed: kept as a TypedStruct with the rewritten Struct; must still mean the same Wasm
        ts = kind.TypedStruct()
        assert wrapped.typed_config.Unpack(ts)
        w = http_wasm_pb2.Wasm()
        json_format.ParseDict(json_format.MessageToDict(ts.value), w)
    else:
        w, _ = converted_wasm(wrapped)
    assert w == d


def test_camel_and_snake_keys_mixed_in_typed_struct(server, cache):
    ts = udpa_ts_pb2.TypedStruct(type_url="type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm")
    json_format.ParseDict(
        {
            "config": {
                "root_id": "r",
                "vmConfig": {
                    "vm_id": "v",
                    "code": {"remote": {"httpUri": {"uri": server.url("/m.wasm"), "timeout": "5s"}, "sha256": "nil"}},
                    "environmentVariables": {"key_values": {"ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION": "1"}},
                },
                "failOpen": True,
            }
        },
        ts.value,
    )
    _, (ext,) = decode(cache.convert(response(extension("mixed", ts))))
    got, path = converted_wasm(ext)
    assert got.config.root_id == "r" and got.config.vm_config.vm_id == "v" and got.config.fail_open
    assert not got.config.vm_config.HasField("environment_variables")


def test_network_wasm_converts(server, cache):
    wasm = remote_wasm(server.url("/n.wasm"), network=True)
    _, (ext,) = decode(cache.convert(response(extension("net", wasm))))
    got, path = converted_wasm(ext, kind=net_wasm_pb2)
    assert got == local_version(wasm, path)


def test_other_type_url_passes_untouched(server, cache):
    data = response(extension("x", remote_wasm(server.url("/m.wasm"))), type_url="type.googleapis.com/envoy.config.listener.v3.Listener")
    assert cache.convert(data) == data
    assert server.requests == []


def test_non_wasm_resources_beside_a_converted_one_stay_byte_identical(server, cache):
    router = extension("router", router_pb2.Router())
    rbac = extension("rbac", http_rbac_pb2.RBAC(rules_stat_prefix="keep"))
    wasm = extension("wasm", remote_wasm(server.url("/m.wasm")))
    data = response(router, wasm, rbac)
    resp_in = discovery_pb2.DiscoveryResponse()
    resp_in.ParseFromString(data)
    resp_out, _ = decode(cache.convert(data))
    assert resp_out.resources[0].SerializeToString() == resp_in.resources[0].SerializeToString()
    assert resp_out.resources[2].SerializeToString() == resp_in.resources[2].SerializeToString()
    assert (resp_out.version_info, resp_out.nonce, resp_out.type_url) == ("v1", "n1", ECDS_TYPE)


def test_delta_response_converts_and_keeps_removed_names(server, cache):
    wasm = remote_wasm(server.url("/d.wasm"))
    delta = discovery_pb2.DeltaDiscoveryResponse(system_version_info="s1", type_url=ECDS_TYPE, nonce="dn")
    res = delta.resources.add(name="delta-wasm", version="3")
    res.resource.Pack(extension("delta-wasm", wasm))
    delta.removed_resources.append("gone")
    out = discovery_pb2.DeltaDiscoveryResponse()
    out.ParseFromString(cache.convert_delta(delta.SerializeToString()))
    assert list(out.removed_resources) == ["gone"]
    assert (out.resources[0].name, out.resources[0].version, out.nonce) == ("delta-wasm", "3", "dn")
    ext = extension_pb2.TypedExtensionConfig()
    assert out.resources[0].resource.Unpack(ext)
    got, path = converted_wasm(ext)
    assert got == local_version(wasm, path)


def test_nack_is_a_discovery_request_with_internal_code():
    resp = discovery_pb2.DiscoveryResponse(type_url=ECDS_TYPE, nonce="abc", version_info="v9")
    req = discovery_pb2.DiscoveryRequest()
    req.ParseFromString(wasm_ecds.nack(resp.SerializeToString(), "v8", "module x: checksum mismatch"))
    assert (req.type_url, req.response_nonce, req.version_info) == (ECDS_TYPE, "abc", "v8")
    assert (req.error_detail.code, req.error_detail.message) == (13, "module x: checksum mismatch")
    dreq = discovery_pb2.DeltaDiscoveryRequest()
    delta = discovery_pb2.DeltaDiscoveryResponse(type_url=ECDS_TYPE, nonce="d1")
    dreq.ParseFromString(wasm_ecds.nack_delta(delta.SerializeToString(), "bad"))
    assert (dreq.type_url, dreq.response_nonce, dreq.error_detail.code, dreq.error_detail.message) == (
        ECDS_TYPE,
        "d1",
        13,
        "bad",
    )
