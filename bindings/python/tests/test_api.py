"""The parts of the binding that need no module server: version, NACKs, arguments, lifetime, loading."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from envoy.service.discovery.v3 import discovery_pb2

import wasm_ecds
from ecds_testkit import ECDS_TYPE_URL, delta_response, discovery_response


def test_version_is_the_library_semver() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+([-+].*)?", wasm_ecds.version())


def test_dunder_version_is_the_loaded_librarys() -> None:
    assert wasm_ecds.__version__ == wasm_ecds.version()


def test_nack_carries_type_url_nonce_last_acked_version_and_reason() -> None:
    response = discovery_response(version="v7", nonce="n-42")
    raw = wasm_ecds.nack(response, "v6", 'resource "x": checksum mismatch')
    request = discovery_pb2.DiscoveryRequest()
    request.ParseFromString(raw)
    assert request.type_url == ECDS_TYPE_URL
    assert request.response_nonce == "n-42"
    assert request.version_info == "v6"
    assert request.error_detail.code == 13
    assert request.error_detail.message == 'resource "x": checksum mismatch'


def test_nack_accepts_bytearray_and_memoryview() -> None:
    response = discovery_response(nonce="n-1")
    assert wasm_ecds.nack(bytearray(response), "", "r") == wasm_ecds.nack(memoryview(response), "", "r")


def test_nack_delta_carries_type_url_nonce_and_reason() -> None:
    raw = wasm_ecds.nack_delta(delta_response({}, nonce="d-9"), "no module")
    request = discovery_pb2.DeltaDiscoveryRequest()
    request.ParseFromString(raw)
    assert request.type_url == ECDS_TYPE_URL
    assert request.response_nonce == "d-9"
    assert request.error_detail.code == 13
    assert request.error_detail.message == "no module"


def test_nack_of_unparsable_response_is_a_value_error() -> None:
    with pytest.raises(wasm_ecds.InvalidArgumentError):
        wasm_ecds.nack(b"\xff\xff\xff", "v", "r")
    with pytest.raises(ValueError):
        wasm_ecds.nack_delta(b"\x0a\x05ab", "r")


@pytest.mark.parametrize("bad", ["text", None, 42, ["x"]])
def test_nack_rejects_non_bytes_response_with_type_error(bad: object) -> None:
    with pytest.raises(TypeError):
        wasm_ecds.nack(bad, "v", "r")  # type: ignore[arg-type]


def test_nack_rejects_non_str_strings_with_type_error() -> None:
    with pytest.raises(TypeError):
        wasm_ecds.nack(b"", b"v", "r")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        wasm_ecds.nack(b"", "v", None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        wasm_ecds.nack_delta(b"", 3)  # type: ignore[arg-type]


def test_nul_inside_a_string_is_a_value_error_not_a_truncation() -> None:
    with pytest.raises(ValueError):
        wasm_ecds.nack(b"", "v", "bad\0reason")


def test_unknown_option_is_a_value_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(wasm_ecds.InvalidArgumentError, match="cache_size"):
        wasm_ecds.Cache(cache_dir=tmp_path, cache_size=3)


@pytest.mark.parametrize(
    "option, value",
    [("max_attempts", 0), ("max_attempts", -1), ("on_fetch_failure", "explode"), ("blocked_cidrs", ["nope"]),
     ("enable_conversion", "yes")],
)
def test_bad_option_value_is_a_value_error_naming_the_key(tmp_path: Path, option: str, value: object) -> None:
    with pytest.raises(ValueError) as info:
        wasm_ecds.Cache(cache_dir=tmp_path, **{option: value})
    assert isinstance(info.value, wasm_ecds.WasmEcdsError)
    message = str(info.value)
    assert option in message or repr(value).strip("'[]") in message, message


def test_oci_options_reach_the_library(tmp_path: Path) -> None:
    mirrors = {"ghcr.io": ["https://mirror.corp:5000", "http://127.0.0.1:5001"], "docker.io": []}
    with wasm_ecds.Cache(cache_dir=tmp_path, plain_http_hosts=["127.0.0.1:5000"], registry_mirrors=mirrors):
        pass


@pytest.mark.parametrize(
    "option, value, reason",
    [
        ("registry_mirrors", {"ghcr.io": ["https://user:pw@mirror.corp"]},
         'invalid options: registry_mirrors: ghcr.io: "https://user:pw@mirror.corp" is not a mirror endpoint: '
         "credentials do not belong in an endpoint"),
        ("registry_mirrors", {"ghcr.io/org": ["https://mirror.corp"]},
         'invalid options: registry_mirrors: "ghcr.io/org" is not a registry host'),
        ("registry_mirrors", ["https://mirror.corp"], "invalid options: registry_mirrors: invalid type"),
        ("plain_http_hosts", ["127.0.0.1:5000", ""], 'invalid options: plain_http_hosts[1]: "" is not a registry host'),
        ("plain_http_hosts", ["registry.local/v2"], "invalid options: plain_http_hosts[0]"),
    ],
)
def test_bad_oci_option_is_refused_with_the_library_reason(
    tmp_path: Path, option: str, value: object, reason: str
) -> None:
    with pytest.raises(wasm_ecds.InvalidArgumentError) as info:
        wasm_ecds.Cache(cache_dir=tmp_path, **{option: value})
    assert str(info.value).startswith(reason), str(info.value)


def test_unserializable_option_is_a_type_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        wasm_ecds.Cache(cache_dir=tmp_path, max_attempts=object())


def test_cache_dir_of_wrong_type_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        wasm_ecds.Cache(cache_dir=42)  # type: ignore[arg-type]


def test_cache_dir_accepts_pathlike_and_is_created(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "cache"
    with wasm_ecds.Cache(cache_dir=target) as cache:
        assert not cache.closed
    assert target.is_dir()


@pytest.mark.parametrize("bad", ["text", None, 42, 1.5, [1, 2]])
def test_convert_rejects_non_bytes_with_type_error(tmp_path: Path, bad: object) -> None:
    with wasm_ecds.Cache(cache_dir=tmp_path) as cache:
        with pytest.raises(TypeError):
            cache.convert(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            cache.convert_delta(bad)  # type: ignore[arg-type]


def test_garbage_response_is_rejected_not_a_crash(tmp_path: Path) -> None:
    with wasm_ecds.Cache(cache_dir=tmp_path) as cache:
        with pytest.raises(wasm_ecds.Rejected) as info:
            cache.convert(b"\xff\xff\xff\xff")
        assert info.value.reason
        assert isinstance(info.value, wasm_ecds.WasmEcdsError)


def test_use_after_close_raises_and_close_is_idempotent(tmp_path: Path) -> None:
    cache = wasm_ecds.Cache(cache_dir=tmp_path)
    cache.close()
    cache.close()
    assert cache.closed
    for call in (lambda: cache.convert(b""), lambda: cache.convert_delta(b""), cache.metrics, cache.purge):
        with pytest.raises(wasm_ecds.ClosedError):
            call()
    with pytest.raises(ValueError):
        cache.metrics()
    with pytest.raises(wasm_ecds.ClosedError):
        with cache:
            pass


def test_context_manager_closes(tmp_path: Path) -> None:
    with wasm_ecds.Cache(cache_dir=tmp_path) as cache:
        cache.metrics()
    assert cache.closed


def test_close_waits_for_calls_in_flight(tmp_path: Path) -> None:
    cache = wasm_ecds.Cache(cache_dir=tmp_path)
    stop = threading.Event()
    errors: list = []

    def hammer() -> None:
        while not stop.is_set():
            try:
                cache.metrics()
            except wasm_ecds.ClosedError:
                return
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)
                return

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    cache.close()
    stop.set()
    for t in threads:
        t.join()
    assert errors == []


def test_purge_of_an_empty_cache_removes_nothing(tmp_path: Path) -> None:
    with wasm_ecds.Cache(cache_dir=tmp_path) as cache:
        assert cache.purge() == 0


def _run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_missing_library_is_a_clear_error_listing_the_path(tmp_path: Path) -> None:
    env = dict(os.environ, WASM_ECDS_LIBRARY=str(tmp_path / "nope.so"))
    proc = _run_python(
        "import wasm_ecds\n"
        "try:\n    wasm_ecds.version()\n"
        "except wasm_ecds.LibraryNotFound as e:\n    print('NOTFOUND', e)\n",
        env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "NOTFOUND" in proc.stdout and "nope.so" in proc.stdout


def test_library_next_to_the_package_is_found(tmp_path: Path) -> None:
    # A copy of the package with the library beside it, and no WASM_ECDS_LIBRARY.
    import shutil

    import wasm_ecds._native as native

    wasm_ecds.version()
    loaded = native.library_path()
    assert loaded is not None
    pkg = tmp_path / "wasm_ecds"
    shutil.copytree(Path(wasm_ecds.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(loaded, pkg / native.LIBRARY_NAME)
    env = {k: v for k, v in os.environ.items() if k != "WASM_ECDS_LIBRARY"}
    env["PYTHONPATH"] = str(tmp_path)
    proc = _run_python(
        "import wasm_ecds, wasm_ecds._native as n\nwasm_ecds.version()\nprint(n.library_path())", env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(pkg / native.LIBRARY_NAME)
