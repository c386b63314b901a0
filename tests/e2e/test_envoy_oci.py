"""End to end with a real Envoy and a real registry: the basic-auth module as an OCI image (`oci://`).

The flow: the module is pushed to the distribution registry (Debian `docker-registry`, plain HTTP on 127.0.0.1)
through its HTTP API → an ECDS DiscoveryResponse names it `oci://127.0.0.1:PORT/<repo>:<tag>` or `…@sha256:…`
(cluster "_", the sha256 being the manifest digest, as istiod sends for a WasmPlugin) → wasm_ecds.Cache.convert →
the returned bytes replace the .pb file Envoy watches → Envoy runs the module, as in test_envoy_basic_auth.py.

Istio's rules these tests lean on (istio `pkg/wasm/cache.go`, `imagefetcher.go`): the sha256 of an OCI module is
its manifest digest; pull policy `Always` re-resolves the tag when `ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION`
changes; a digest reference is never pulled again.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import tarfile
import time

import pytest

import harness as h
import registry as r
from checks import (assert_basic_auth, assert_converted, assert_network_filter, assert_rbac_fallback,
                    assert_rbac_served, assert_v2_served_in_place, convert, start_v1)

POLICY_ENV = "ISTIO_META_WASM_IMAGE_PULL_POLICY"
RESOURCE_VERSION_ENV = "ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION"


# ----------------------------------------------------------------------------------------------------------
# helpers


def oci_responses(url: str, sha256: str, *, version: str, form: str = "direct", env: dict | None = None,
                  failure_policy: int = 0):
    """The (HTTP, network) ECDS responses naming url (oci://…) remotely, with istiod's internal env vars."""
    out = []
    for build, name in ((h.http_wasm, h.HTTP_FILTER_NAME), (h.net_wasm, h.NET_FILTER_NAME)):
        wasm = build(h.remote_code(url, sha256))
        wasm.config.failure_policy = failure_policy
        for key, value in (env or {}).items():
            wasm.config.vm_config.environment_variables.key_values[key] = value
        out.append((h.discovery_response(name, h.typed_config(wasm, form), version), wasm))
    return out


def cache_options(registry: r.Registry) -> dict:
    # The registry speaks plain HTTP; short timeouts keep a failure quick.
    return {"plain_http_hosts": [registry.host], "http_request_timeout_ms": 5000}


def fetch_count(metrics: str, result: str) -> int:
    """istio_agent_wasm_remote_fetch_count{result="<result>"} from the cache's Prometheus text."""
    m = re.search(r'^istio_agent_wasm_remote_fetch_count\{result="%s"\} (\d+)$' % re.escape(result), metrics, re.M)
    assert m, metrics
    return int(m.group(1))


def layer_module(layer: bytes, fmt: str) -> bytes:
    """The module inside a pushed layer: the layer itself, or plugin.wasm in its tar.gz."""
    if fmt == "artifact":
        return layer
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
        return tar.extractfile("plugin.wasm").read()


# ----------------------------------------------------------------------------------------------------------
# without the library: the registry and the push


@pytest.mark.parametrize("fmt", r.FORMATS)
def test_registry_serves_pushed_image(registry, repo, wasm_modules, fmt):
    """What the tests push reads back by plain GETs: the manifest by tag and by digest, its blobs by digest, and
    the module from the layer."""
    pushed = registry.push_image(repo, "v1", wasm_modules["v1"], fmt)
    for reference in ("v1", pushed.manifest_digest):
        got = registry.get_manifest(repo, reference)
        assert got.status == 200, (reference, got)
        assert got.body == pushed.manifest and got.headers["content-type"] == pushed.media_type, got
        assert got.headers["docker-content-digest"] == pushed.manifest_digest, got.headers
    manifest = json.loads(pushed.manifest)
    for blob in [manifest["config"], *manifest["layers"]]:
        got = registry.get_blob(repo, blob["digest"])
        assert got.status == 200 and r.sha256_digest(got.body) == blob["digest"], (blob, got.status)
        assert len(got.body) == blob["size"]
    assert layer_module(registry.get_blob(repo, pushed.layer).body, fmt) == wasm_modules["v1"]
    assert registry.get_manifest(repo, "missing").status == 404


# ----------------------------------------------------------------------------------------------------------
# through the library


@pytest.mark.parametrize("fmt,form", list(zip(r.FORMATS, ["direct", "udpa", "xds"])))
def test_oci_image_by_tag_runs_module(stack, registry, repo, wasm_modules, wasm_ecds, fmt, form):
    """oci://registry/repo:tag in each image format → wasm_ecds → Envoy: HTTP and network filters run it."""
    pushed = registry.push_image(repo, "v1", wasm_modules["v1"], fmt)
    url = f"oci://{registry.host}/{repo}:v1"
    (http_resp, http_wasm), (net_resp, net_wasm) = oci_responses(url, "", version="1", form=form)
    with wasm_ecds.Cache(cache_dir=str(stack.cache_dir), **cache_options(registry)) as cache:
        http_out = convert(cache, http_resp)
        net_out = convert(cache, net_resp)
    assert_converted(http_out, http_wasm, wasm_modules["v1"], stack.cache_dir, h.HTTP_FILTER_NAME)
    assert_converted(net_out, net_wasm, wasm_modules["v1"], stack.cache_dir, h.NET_FILTER_NAME)
    # The library did resolve the tag, and pulled the layer once for the two resources (content-addressed store).
    assert any(not q.startswith("PUT ") and q.endswith(" 200") for q in registry.manifest_requests(repo)), \
        registry.requests(repo)
    assert len(registry.blob_gets(repo, pushed.layer)) == 1, registry.requests(repo)

    envoy = stack.start_envoy(http_out, net_out)
    assert_basic_auth(envoy, "v1")
    assert_network_filter(envoy, "v1")


@pytest.mark.parametrize("transport", ["plain_http_hosts", "tls_fallback"])
def test_oci_image_by_digest_runs_module(stack, registry, repo, wasm_modules, wasm_ecds, transport):
    """oci://registry/repo@sha256:<manifest digest> with that digest as the sha256 → Envoy runs it. Over plain
    HTTP because the option says so, or by Istio's fallback (a TLS attempt answered in HTTP is retried once
    over plain HTTP). A digest reference is immutable: Always and a new resource version pull nothing again."""
    pushed = registry.push_image(repo, "v1", wasm_modules["v1"], "oci")
    url = f"oci://{registry.host}/{repo}@{pushed.manifest_digest}"
    (http_resp, http_wasm), (net_resp, net_wasm) = oci_responses(url, pushed.manifest_hex, version="1")
    options = cache_options(registry) if transport == "plain_http_hosts" else {"http_request_timeout_ms": 5000}
    with wasm_ecds.Cache(cache_dir=str(stack.cache_dir), **options) as cache:
        http_out = convert(cache, http_resp)
        net_out = convert(cache, net_resp)
        assert_converted(http_out, http_wasm, wasm_modules["v1"], stack.cache_dir, h.HTTP_FILTER_NAME)
        assert_converted(net_out, net_wasm, wasm_modules["v1"], stack.cache_dir, h.NET_FILTER_NAME)
        assert len(registry.blob_gets(repo, pushed.layer)) == 1, registry.requests(repo)

        seen = registry.requests(repo)
        (again, _), _ = oci_responses(url, pushed.manifest_hex, version="2",
                                      env={POLICY_ENV: "Always", RESOURCE_VERSION_ENV: "2"})
        _, wasm = h.decoded_wasm(convert(cache, again))
        first = h.decoded_wasm(http_out)[1].config.vm_config.code.local.filename
        assert wasm.config.vm_config.code.local.filename == first, (wasm, first)
        assert not wasm.config.vm_config.HasField("environment_variables"), wasm
        assert registry.requests(repo) == seen, "a digest reference must not be resolved again"

    envoy = stack.start_envoy(http_out, net_out)
    assert_basic_auth(envoy, "v1")
    assert_network_filter(envoy, "v1")


def test_oci_rejected_then_tag_update_applies(stack, registry, repo, wasm_modules, wasm_ecds):
    """The tag re-pointed to v2 and a response naming a wrong manifest digest → Rejected, nothing written, Envoy
    keeps serving v1; then the tag with pull policy Always and a new resource version → v2 live, same Envoy."""
    fmt = "docker"
    v1 = registry.push_image(repo, "stable", wasm_modules["v1"], fmt)
    url = f"oci://{registry.host}/{repo}:stable"
    (http_v1, _), (net_v1, _) = oci_responses(
        url, v1.manifest_hex, version="1", env={POLICY_ENV: "Always", RESOURCE_VERSION_ENV: "1"})
    with wasm_ecds.Cache(cache_dir=str(stack.cache_dir), **cache_options(registry)) as cache:
        envoy, http_out, pid, reloads, before = start_v1(stack, cache, http_v1, net_v1)

        # Failure path: the tag now names v2, but the response carries another manifest digest.
        v2 = registry.push_image(repo, "stable", wasm_modules["v2"], fmt)
        assert v2.manifest_digest != v1.manifest_digest
        manifests_before = len(registry.manifest_requests(repo))
        wrong = h.sha256_hex(b"not the manifest")
        (http_bad, _), _ = oci_responses(url, wrong, version="2",
                                         env={POLICY_ENV: "Always", RESOURCE_VERSION_ENV: "2"})
        with pytest.raises(wasm_ecds.Rejected) as rejected:
            cache.convert(http_bad)
        reason = rejected.value.reason
        # The library re-resolved the tag (new resource version, Always) and rejected the manifest digest
        # before fetching the v2 layer.
        assert len(registry.manifest_requests(repo)) > manifests_before, registry.requests(repo)
        assert registry.blob_gets(repo, v2.layer) == [], registry.requests(repo)
        assert h.HTTP_FILTER_NAME in reason and f"{repo}:stable" in reason, reason
        assert "checksum" in reason.lower() and wrong in reason, reason
        # Nothing reached Envoy: the watched file is untouched and Envoy keeps serving v1.
        after = os.stat(stack.http_ecds)
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        assert stack.http_ecds.read_bytes() == http_out
        time.sleep(2)
        assert envoy.ecds_stat(h.HTTP_FILTER_NAME, "config_reload") == reloads
        assert_basic_auth(envoy, "v1")

        # Update path: the same tag, pull policy Always, a new resource version, no digest pinned.
        (http_v2, http_v2_wasm), _ = oci_responses(url, "", version="3",
                                                   env={POLICY_ENV: "Always", RESOURCE_VERSION_ENV: "3"})
        out_v2 = convert(cache, http_v2)
        assert_converted(out_v2, http_v2_wasm, wasm_modules["v2"], stack.cache_dir, h.HTTP_FILTER_NAME)
        assert len(registry.blob_gets(repo, v2.layer)) == 1, registry.requests(repo)
        # The same resource version again: Always re-resolves only when the version changes.
        seen = registry.requests(repo)
        assert convert(cache, http_v2) == out_v2
        assert registry.requests(repo) == seen, "the same resource version must not resolve the tag again"

        assert_v2_served_in_place(envoy, stack, out_v2, reloads, pid)


@pytest.mark.parametrize("case", ["fail_open", "on_fetch_failure_deny"])
def test_oci_missing_tag_rbac_fallback_is_served_by_envoy(stack, registry, repo, wasm_modules, wasm_ecds, case):
    """A tag the registry does not have (404 on the manifest) and a filter failing open → allow-all RBAC; failing
    closed with on_fetch_failure "deny" → deny-all RBAC; Envoy enforces both."""
    from envoy.extensions.wasm.v3 import wasm_pb2 as wasm_config_pb2

    registry.push_image(repo, "v1", wasm_modules["v1"], "artifact")
    policy = wasm_config_pb2.FAIL_OPEN if case == "fail_open" else wasm_config_pb2.FAIL_CLOSED
    options = {} if case == "fail_open" else {"on_fetch_failure": "deny"}
    url = f"oci://{registry.host}/{repo}:missing"
    (http_resp, _), (net_resp, _) = oci_responses(url, "", version="1", failure_policy=policy)
    with wasm_ecds.Cache(cache_dir=str(stack.cache_dir), **cache_options(registry), **options) as cache:
        http_out = convert(cache, http_resp)
        net_out = convert(cache, net_resp)
        # Counted as Istio counts a manifest error.
        assert fetch_count(cache.metrics(), "manifest_failure") >= 1, cache.metrics()
    # The library asked the registry, which does not know the tag.
    assert any(q.endswith(f" /v2/{repo}/manifests/missing 404") for q in registry.manifest_requests(repo)), \
        registry.requests(repo)
    assert_rbac_fallback(http_out, net_out, fail_open=(case == "fail_open"))

    envoy = stack.start_envoy(http_out, net_out)
    assert_rbac_served(envoy, fail_open=(case == "fail_open"))
