"""Builders and decoders of ECDS messages with xds-protos (the real Envoy schema), and a sample module."""

from __future__ import annotations

import hashlib
from typing import Dict, Optional

from envoy.config.core.v3 import extension_pb2, http_uri_pb2
from envoy.extensions.filters.http.wasm.v3 import wasm_pb2 as http_wasm_pb2
from envoy.extensions.wasm.v3 import wasm_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, wrappers_pb2

ECDS_TYPE_URL = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
HTTP_WASM_TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"


def make_module(tag: bytes) -> bytes:
    """A small valid Wasm module: the header plus one custom section whose payload is `tag`."""
    name = b"wasm-ecds-test"
    section = bytes([len(name)]) + name + tag
    assert len(section) < 128
    return b"\0asm\x01\0\0\0" + b"\x00" + bytes([len(section)]) + section


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wasm_filter(name: str, url: Optional[str] = None, sha256: str = "nil", local_file: Optional[str] = None,
                env: Optional[Dict[str, str]] = None) -> http_wasm_pb2.Wasm:
    """An HTTP Wasm filter as Istio writes it for a WasmPlugin (remote code) or with local code."""
    vm = wasm_pb2.VmConfig(vm_id=f"{name}-vm", runtime="envoy.wasm.runtime.v8")
    if local_file is not None:
        vm.code.local.filename = local_file
    else:
        vm.code.remote.http_uri.CopyFrom(
            http_uri_pb2.HttpUri(uri=url or "", cluster="_", timeout={"seconds": 30})
        )
        vm.code.remote.sha256 = sha256
    if env:
        for k, v in env.items():
            vm.environment_variables.key_values[k] = v
    configuration = any_pb2.Any()
    configuration.Pack(wrappers_pb2.StringValue(value='{"realm":"test"}'))
    plugin = wasm_pb2.PluginConfig(name=name, root_id=f"{name}-root", vm_config=vm, configuration=configuration)
    return http_wasm_pb2.Wasm(config=plugin)


def extension_config(name: str, wasm: http_wasm_pb2.Wasm) -> extension_pb2.TypedExtensionConfig:
    typed = any_pb2.Any()
    typed.Pack(wasm)
    return extension_pb2.TypedExtensionConfig(name=name, typed_config=typed)


def discovery_response(*configs: extension_pb2.TypedExtensionConfig, version: str = "v1",
                       nonce: str = "nonce-1", type_url: str = ECDS_TYPE_URL) -> bytes:
    resp = discovery_pb2.DiscoveryResponse(version_info=version, type_url=type_url, nonce=nonce)
    for cfg in configs:
        resp.resources.add().Pack(cfg)
    return resp.SerializeToString()


def decode_response(data: bytes) -> discovery_pb2.DiscoveryResponse:
    resp = discovery_pb2.DiscoveryResponse()
    resp.ParseFromString(data)
    return resp


def unpack_extension(any_msg: any_pb2.Any) -> extension_pb2.TypedExtensionConfig:
    cfg = extension_pb2.TypedExtensionConfig()
    assert any_msg.Unpack(cfg), any_msg.type_url
    return cfg


def unpack_wasm(cfg: extension_pb2.TypedExtensionConfig) -> http_wasm_pb2.Wasm:
    wasm = http_wasm_pb2.Wasm()
    assert cfg.typed_config.Unpack(wasm), cfg.typed_config.type_url
    return wasm



def delta_response(resources: Dict[str, extension_pb2.TypedExtensionConfig], removed: tuple = (),
                   nonce: str = "delta-nonce-1", system_version: str = "sv1") -> bytes:
    resp = discovery_pb2.DeltaDiscoveryResponse(system_version_info=system_version, type_url=ECDS_TYPE_URL,
                                                nonce=nonce, removed_resources=list(removed))
    for name, cfg in resources.items():
        r = resp.resources.add(name=name, version=f"{name}-v1")
        r.resource.Pack(cfg)
    return resp.SerializeToString()


def decode_delta(data: bytes) -> discovery_pb2.DeltaDiscoveryResponse:
    resp = discovery_pb2.DeltaDiscoveryResponse()
    resp.ParseFromString(data)
    return resp
