"""Conversion against a real HTTP server on loopback, decoded with xds-protos (the real Envoy schema)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Dict, List

import pytest
from prometheus_client.parser import text_string_to_metric_families

import wasm_ecds
from conftest import ModuleServer
from ecds_testkit import (
    ECDS_TYPE_URL,
    decode_delta,
    decode_response,
    delta_response,
    discovery_response,
    extension_config,
    make_module,
    sha256_hex,
    unpack_extension,
    unpack_wasm,
    wasm_filter,
)

RESOURCE = "extensions.istio.io/wasmplugin/ns.basic-auth"


def remote_response(url: str, module: bytes, *, sha256: str = "", env: Dict[str, str] = None) -> bytes:
    wasm = wasm_filter("ns.basic-auth", url=url, sha256=sha256 or sha256_hex(module), env=env)
    return discovery_response(extension_config(RESOURCE, wasm), version="v1", nonce="n1")


def samples(text: str) -> Dict[tuple, float]:
    """Every sample of a Prometheus text exposition, parsed by prometheus_client, keyed by (name, labels)."""
    out: Dict[tuple, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_remote_module_is_fetched_and_config_points_at_the_local_file(cache, server: ModuleServer, module) -> None:
    url = server.add("/basic-auth.wasm", module)
    response = remote_response(url, module, env={"ISTIO_META_WASM_IMAGE_PULL_POLICY": "IfNotPresent",
                                                 "ISTIO_META_OTHER": "x", "USER_KEY": "kept"})

    converted = decode_response(cache.convert(response))

    assert (converted.version_info, converted.nonce, converted.type_url) == ("v1", "n1", ECDS_TYPE_URL)
    assert len(converted.resources) == 1
    cfg = unpack_extension(converted.resources[0])
    assert cfg.name == RESOURCE
    plugin = unpack_wasm(cfg).config
    vm = plugin.vm_config
    assert vm.code.WhichOneof("specifier") == "local"
    filename = Path(vm.code.local.filename)
    assert filename.is_absolute() and filename.is_file()
    assert filename.read_bytes() == module
    # Everything else is intact.
    original = unpack_wasm(unpack_extension(decode_response(response).resources[0])).config
    assert (plugin.name, plugin.root_id) == (original.name, original.root_id)
    assert plugin.configuration == original.configuration
    assert (vm.vm_id, vm.runtime) == (original.vm_config.vm_id, original.vm_config.runtime)
    # ISTIO_META_* keys are stripped, the others kept.
    assert dict(vm.environment_variables.key_values) == {"USER_KEY": "kept"}
    assert server.count("/basic-auth.wasm") == 1


def test_istio_meta_only_environment_is_dropped(cache, server: ModuleServer, module) -> None:
    url = server.add("/m.wasm", module)
    converted = decode_response(cache.convert(remote_response(url, module, env={"ISTIO_META_X": "1"})))
    vm = unpack_wasm(unpack_extension(converted.resources[0])).config.vm_config
    assert not vm.HasField("environment_variables")


def test_nil_sha256_means_no_checksum(cache, server: ModuleServer, module) -> None:
    url = server.add("/nil.wasm", module)
    converted = decode_response(cache.convert(remote_response(url, module, sha256="nil")))
    vm = unpack_wasm(unpack_extension(converted.resources[0])).config.vm_config
    assert Path(vm.code.local.filename).read_bytes() == module


def test_wrong_sha256_rejects_naming_resource_and_url(cache, server: ModuleServer, module) -> None:
    url = server.add("/bad.wasm", module)
    with pytest.raises(wasm_ecds.Rejected) as info:
        cache.convert(remote_response(url, module, sha256="0" * 64))
    reason = info.value.reason
    assert RESOURCE in reason, reason
    assert url in reason, reason
    assert str(info.value) == reason


def test_rejection_reason_fits_the_nack(cache, server: ModuleServer, module) -> None:
    url = server.add("/bad.wasm", module)
    response = remote_response(url, module, sha256="1" * 64)
    with pytest.raises(wasm_ecds.Rejected) as info:
        cache.convert(response)
    from envoy.service.discovery.v3 import discovery_pb2

    request = discovery_pb2.DiscoveryRequest()
    request.ParseFromString(wasm_ecds.nack(response, "v0", info.value.reason))
    assert request.error_detail.message == info.value.reason
    assert request.response_nonce == "n1"


def test_missing_module_rejects(cache, server: ModuleServer, module) -> None:
    with pytest.raises(wasm_ecds.Rejected) as info:
        cache.convert(remote_response(server.url("/absent.wasm"), module))
    assert "/absent.wasm" in info.value.reason


def test_local_code_passes_through_byte_identical(cache, server: ModuleServer) -> None:
    wasm = wasm_filter("local", local_file="/etc/istio/local.wasm")
    response = discovery_response(extension_config("local-filter", wasm))
    assert cache.convert(response) == response


def test_other_type_url_passes_through_byte_identical(cache, server: ModuleServer, module) -> None:
    url = server.add("/m.wasm", module)
    wasm = wasm_filter("x", url=url, sha256=sha256_hex(module))
    response = discovery_response(extension_config("x", wasm),
                                  type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster")
    assert cache.convert(response) == response
    assert server.count("/m.wasm") == 0


def test_disabled_conversion_passes_through_without_fetching(tmp_path: Path, server: ModuleServer, module) -> None:
    url = server.add("/m.wasm", module)
    response = remote_response(url, module)
    with wasm_ecds.Cache(cache_dir=tmp_path, enable_conversion=False) as cache:
        assert cache.convert(response) == response
    assert server.count("/m.wasm") == 0


def test_delta_response_is_converted_and_removed_names_pass(cache, server: ModuleServer, module) -> None:
    url = server.add("/delta.wasm", module)
    cfg = extension_config(RESOURCE, wasm_filter("ns.basic-auth", url=url, sha256=sha256_hex(module)))
    response = delta_response({RESOURCE: cfg}, removed=("gone-1", "gone-2"), nonce="dn")

    converted = decode_delta(cache.convert_delta(response))

    assert converted.nonce == "dn" and converted.system_version_info == "sv1"
    assert list(converted.removed_resources) == ["gone-1", "gone-2"]
    assert len(converted.resources) == 1
    resource = converted.resources[0]
    assert (resource.name, resource.version) == (RESOURCE, f"{RESOURCE}-v1")
    vm = unpack_wasm(unpack_extension(resource.resource)).config.vm_config
    assert Path(vm.code.local.filename).read_bytes() == module


def test_delta_rejection(cache, server: ModuleServer, module) -> None:
    url = server.add("/delta.wasm", module)
    cfg = extension_config(RESOURCE, wasm_filter("ns.basic-auth", url=url, sha256="2" * 64))
    with pytest.raises(wasm_ecds.Rejected) as info:
        cache.convert_delta(delta_response({RESOURCE: cfg}))
    assert RESOURCE in info.value.reason


def test_sixteen_threads_share_one_download(cache, server: ModuleServer, module) -> None:
    url = server.add("/shared.wasm", module)
    server.delay = 0.3  # keep the download in flight while every thread asks for it
    response = remote_response(url, module)
    barrier = threading.Barrier(16)
    results: List[bytes] = []
    errors: List[BaseException] = []
    lock = threading.Lock()

    def work() -> None:
        try:
            barrier.wait()
            out = cache.convert(response)
            with lock:
                results.append(out)
        except BaseException as e:  # noqa: BLE001 - reported below
            with lock:
                errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert len(results) == 16
    assert len(set(results)) == 1
    assert server.count("/shared.wasm") == 1


def test_second_conversion_is_served_from_the_cache(cache, server: ModuleServer, module) -> None:
    url = server.add("/m.wasm", module)
    response = remote_response(url, module)
    first = cache.convert(response)
    assert cache.convert(response) == first
    assert server.count("/m.wasm") == 1


def test_cache_survives_a_new_handle_on_the_same_directory(tmp_path: Path, server: ModuleServer, module) -> None:
    url = server.add("/m.wasm", module)
    response = remote_response(url, module)
    with wasm_ecds.Cache(cache_dir=tmp_path) as cache:
        first = cache.convert(response)
    with wasm_ecds.Cache(cache_dir=tmp_path) as cache:
        assert cache.convert(response) == first
    assert server.count("/m.wasm") == 1


def test_metrics_count_fetches_conversions_and_durations(cache, server: ModuleServer, module) -> None:
    good = server.add("/good.wasm", module)
    other = make_module(b"other")
    bad = server.add("/bad.wasm", other)
    cache.convert(remote_response(good, module))
    cache.convert(remote_response(good, module))
    with pytest.raises(wasm_ecds.Rejected):
        cache.convert(remote_response(bad, other, sha256="3" * 64))

    text = cache.metrics()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["istio_agent_wasm_remote_fetch_count"].type == "counter"
    assert families["istio_agent_wasm_config_conversion_duration"].type == "histogram"
    assert families["istio_agent_wasm_cache_entries"].type == "gauge"
    got = samples(text)
    fetch = "istio_agent_wasm_remote_fetch_count_total"
    conversion = "istio_agent_wasm_config_conversion_count_total"
    assert got[(fetch, (("result", "success"),))] == 1
    assert got[(fetch, (("result", "checksum_mismatched"),))] == 1
    assert got[(fetch, (("result", "download_failure"),))] == 0
    assert got[(conversion, (("result", "success"),))] == 2
    assert got[(conversion, (("result", "fetch_failure"),))] == 1
    assert got[("istio_agent_wasm_cache_entries", ())] == 1
    assert got[("istio_agent_wasm_config_conversion_duration_count", ())] == 3
    assert got[("istio_agent_wasm_config_conversion_duration_bucket", (("le", "+Inf"),))] == 3
    assert got[("istio_agent_wasm_config_conversion_duration_sum", ())] > 0
    hits = got[("istio_agent_wasm_cache_lookup_count_total", (("hit", "true"),))]
    misses = got[("istio_agent_wasm_cache_lookup_count_total", (("hit", "false"),))]
    assert hits >= 1 and misses >= 1


def test_purge_keeps_modules_in_use(cache, server: ModuleServer, module) -> None:
    url = server.add("/m.wasm", module)
    cache.convert(remote_response(url, module))
    assert cache.purge() == 0


def test_library_logs_reach_the_logging_module(cache, server: ModuleServer, module,
                                               caplog: pytest.LogCaptureFixture) -> None:
    url = server.add("/logged.wasm", module)
    with caplog.at_level(wasm_ecds.TRACE, logger="wasm_ecds"):
        wasm_ecds.sync_log_level()
        try:
            cache.convert(remote_response(url, module))
            with pytest.raises(wasm_ecds.Rejected):
                cache.convert(remote_response(server.url("/missing.wasm"), module, sha256="4" * 64))
        finally:
            pass
    wasm_ecds.sync_log_level()
    records = [r for r in caplog.records if r.name == "wasm_ecds"]
    assert records, "no record from the library reached the wasm_ecds logger"
    assert all(isinstance(getattr(r, "wasm_ecds_target", None), str) for r in records)
    assert any(r.wasm_ecds_target.startswith("wasm_ecds") for r in records)


def test_convert_accepts_bytearray_and_memoryview(cache, server: ModuleServer, module) -> None:
    url = server.add("/m.wasm", module)
    response = remote_response(url, module)
    assert cache.convert(bytearray(response)) == cache.convert(memoryview(response)) == cache.convert(response)


def test_empty_response_passes_through_as_empty(cache) -> None:
    # An empty message is a valid DiscoveryResponse with no type_url: nothing to convert.
    assert cache.convert(b"") == b""
    assert cache.convert_delta(b"") == b""
