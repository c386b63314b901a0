"""The checks shared by the end-to-end tests: the filter's behaviour as Envoy serves it, and the converted output."""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import harness as h

INTERNAL_ENV_PREFIX = "ISTIO_META_"


def assert_basic_auth(envoy: h.Envoy, variant: str) -> None:
    """The walkthrough's checks, against the HTTP listener."""
    port = envoy.ports.http
    r = h.http_request(port, "GET", "/productpage")
    assert r.status == 401, (r.status, r.headers, r.body)
    assert r.headers.get("www-authenticate") == "Basic realm=istio", r.headers
    assert r.headers.get(h.PROOF_HEADER) == variant, r.headers

    for auth in [("ok", "test"), ("admin3", "admin3")]:
        r = h.http_request(port, "GET", "/productpage", auth=auth)
        assert r.status == 200 and r.body == b"upstream ok\n", (auth, r.status, r.body)
        assert r.headers.get(h.PROOF_HEADER) == variant, (auth, r.headers)

    r = h.http_request(port, "POST", "/productpage", auth=("ok", "wrong"))
    assert r.status == 401, (r.status, r.headers)

    for method, path in [("GET", "/"), ("GET", "/reviews"), ("POST", "/other"), ("DELETE", "/productpage")]:
        r = h.http_request(port, method, path)
        assert r.status == 200 and r.body == b"upstream ok\n", (method, path, r.status, r.body)
        assert r.headers.get(h.PROOF_HEADER) == variant, (method, path, r.headers)


def assert_network_filter(envoy: h.Envoy, variant: str) -> None:
    got = h.tcp_roundtrip(envoy.ports.tcp, b"hello wasm\n")
    assert got == h.NET_PROOF_PREFIX.format(variant=variant).encode() + b"hello wasm\n", got


def assert_module_not_running(envoy: h.Envoy) -> None:
    """None of the checks above holds: no 401 challenge, no proof header, no prefix on TCP."""
    for method, path in [("GET", "/productpage"), ("GET", "/other")]:
        r = h.http_request(envoy.ports.http, method, path)
        assert r.status != 401 and "www-authenticate" not in r.headers, (method, path, r.status, r.headers)
        assert h.PROOF_HEADER not in r.headers, (method, path, r.headers)
    if envoy.ports.tcp is not None:
        got = h.tcp_roundtrip(envoy.ports.tcp, b"hello wasm\n")
        assert not got.startswith(b"[basic-auth-net"), got


def assert_converted(out: bytes, original_wasm, module: bytes, cache_dir: Path, name: str) -> None:
    """The converted response names the module by an absolute local path holding exactly the module, and is
    otherwise the original Wasm config (whatever the input form, decoded with the full Envoy schema) without the
    internal `ISTIO_META_*` env vars (Istio's `rewriteVMConfig` strips them: pull secret, policy, version)."""
    tec, wasm = h.decoded_wasm(out)
    assert tec.name == name
    code = wasm.config.vm_config.code
    assert code.WhichOneof("specifier") == "local", code
    filename = code.local.filename
    assert os.path.isabs(filename), filename
    assert Path(filename).resolve().is_relative_to(cache_dir.resolve()), (filename, cache_dir)
    assert hashlib.sha256(Path(filename).read_bytes()).digest() == hashlib.sha256(module).digest()
    expected = copy.deepcopy(original_wasm)
    expected.config.vm_config.code.Clear()
    expected.config.vm_config.code.local.filename = filename
    env = expected.config.vm_config.environment_variables
    for key in [k for k in env.key_values if k.startswith(INTERNAL_ENV_PREFIX)]:
        del env.key_values[key]
    if not env.key_values and not env.host_env_keys:
        expected.config.vm_config.ClearField("environment_variables")
    assert wasm == expected, (wasm, expected)


def convert(cache, response: bytes) -> bytes:
    out = cache.convert(response)
    assert isinstance(out, bytes) and out, out
    return out


def wait_reload(envoy: h.Envoy, filter_name: str, at_least: int) -> None:
    h.wait_until(
        lambda: envoy.ecds_stat(filter_name, "config_reload") >= at_least,
        timeout=20,
        what=f"{filter_name} config_reload >= {at_least}",
    )



def assert_rbac_fallback(http_out: bytes, net_out: bytes, fail_open: bool) -> None:
    """The converted responses are the RBAC fallbacks: allow-all when failing open, deny-all otherwise."""
    prefix = "wasm-default-allow" if fail_open else "wasm-default-deny"
    tec, rbac = h.decoded_rbac(http_out)
    assert tec.name == h.HTTP_FILTER_NAME and tec.typed_config.type_url == h.HTTP_RBAC_TYPE_URL
    assert rbac.rules_stat_prefix == prefix and rbac.HasField("rules") == (not fail_open), rbac
    tec, rbac = h.decoded_rbac(net_out)
    assert tec.name == h.NET_FILTER_NAME and tec.typed_config.type_url == h.NET_RBAC_TYPE_URL
    assert rbac.stat_prefix == prefix and rbac.HasField("rules") == (not fail_open), rbac


def assert_rbac_served(envoy: h.Envoy, fail_open: bool) -> None:
    """Envoy enforces the fallback: everything passes without the module, or 403 and closed TCP connections."""
    if fail_open:
        for method, path in [("GET", "/productpage"), ("DELETE", "/productpage"), ("GET", "/other")]:
            r = h.http_request(envoy.ports.http, method, path)
            assert r.status == 200 and r.body == b"upstream ok\n", (method, path, r.status, r.body)
            assert h.PROOF_HEADER not in r.headers and "www-authenticate" not in r.headers, r.headers
        assert h.tcp_roundtrip(envoy.ports.tcp, b"hello wasm\n") == b"hello wasm\n"
    else:
        for method, path in [("GET", "/productpage"), ("GET", "/other")]:
            r = h.http_request(envoy.ports.http, method, path, auth=("ok", "test"))
            assert r.status == 403 and h.PROOF_HEADER not in r.headers, (method, path, r.status, r.headers)
        assert h.tcp_roundtrip(envoy.ports.tcp, b"hello wasm\n") == b""


def assert_v2_served_in_place(envoy: h.Envoy, stack, out_v2: bytes, reloads: int, pid: int) -> None:
    """Serves the converted v2 response to Envoy and checks that the same Envoy process reloads the HTTP filter
    to the v2 module (its proof header and basic-auth behaviour) without a rejected update."""
    h.write_ecds(stack.http_ecds, out_v2)
    wait_reload(envoy, h.HTTP_FILTER_NAME, reloads + 1)
    h.wait_until(lambda: h.http_request(envoy.ports.http, "GET", "/").headers.get(h.PROOF_HEADER) == "v2",
                 timeout=10, what="v2 proof header")
    assert_basic_auth(envoy, "v2")
    assert envoy.pid() == pid and envoy.proc.alive(), "Envoy must not have restarted"
    assert envoy.ecds_stat(h.HTTP_FILTER_NAME, "update_rejected") == 0


def start_v1(stack, cache, http_v1: bytes, net_v1: bytes):
    """Converts the v1 responses with `cache`, starts Envoy on them and checks the v1 behaviour. Returns the
    Envoy, the converted HTTP response, Envoy's pid, the HTTP filter's reload count and the stat of its ECDS
    file: what an update test compares against afterwards."""
    http_out = convert(cache, http_v1)
    envoy = stack.start_envoy(http_out, convert(cache, net_v1))
    assert_basic_auth(envoy, "v1")
    return envoy, http_out, envoy.pid(), envoy.ecds_stat(h.HTTP_FILTER_NAME, "config_reload"), os.stat(stack.http_ecds)
