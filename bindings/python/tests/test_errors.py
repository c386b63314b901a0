"""Errors: each library status is raised as one class carrying the library's own status and reason."""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path
from typing import Dict

import pytest

import wasm_ecds
import wasm_ecds._native as native
from ecds_testkit import delta_response, discovery_response

# The repository's header; $WASM_ECDS_HEADER names it when these tests run from a copy outside the repository.
HEADER = Path(os.environ.get("WASM_ECDS_HEADER") or Path(__file__).resolve().parents[3] / "include" / "wasm_ecds.h")


def header_defines() -> Dict[str, int]:
    text = HEADER.read_text(encoding="utf-8")
    return {name: int(value) for name, value in re.findall(r"#define WASM_ECDS_(\w+) (-?\d+)\b", text)}


# -- the status table ------------------------------------------------------------------------------------------


def test_status_numbers_and_abi_version_are_the_headers() -> None:
    defines = header_defines()
    for name in ("OK", "REJECTED", "INVALID_ARGUMENT", "INTERNAL_ERROR", "IO_ERROR"):
        assert getattr(native, name) == defines[name], name
    assert (native.ABI_MAJOR, native.ABI_MINOR) == (defines["VERSION_MAJOR"], defines["VERSION_MINOR"])


def test_every_error_status_of_the_header_maps_to_its_own_class() -> None:
    defines = header_defines()
    statuses = {defines[n] for n in ("REJECTED", "INVALID_ARGUMENT", "INTERNAL_ERROR", "IO_ERROR")}
    assert set(wasm_ecds.ERRORS) == statuses
    assert len(set(wasm_ecds.ERRORS.values())) == len(statuses)
    for status, cls in wasm_ecds.ERRORS.items():
        assert issubclass(cls, wasm_ecds.WasmEcdsError)
        assert cls.status == status


def test_io_error_class_is_an_os_error_and_a_wasm_ecds_error() -> None:
    cls = wasm_ecds.ERRORS[native.IO_ERROR]
    assert cls is wasm_ecds.CacheIOError
    assert issubclass(cls, OSError) and issubclass(cls, wasm_ecds.WasmEcdsError)


def test_a_status_unknown_to_the_binding_raises_the_base_error_with_that_status() -> None:
    error = wasm_ecds._error_for(-99, "a newer library's reason")
    assert type(error) is wasm_ecds.WasmEcdsError
    assert error.status == -99
    assert error.reason == str(error) == "a newer library's reason"


# -- the library in use has the ABI the binding declares -------------------------------------------------------


def test_the_loaded_library_has_the_abi_the_binding_declares() -> None:
    assert native.abi_compatible(wasm_ecds.version())
    assert wasm_ecds.version().startswith(f"{native.ABI_MAJOR}.")


@pytest.mark.parametrize(
    "version, compatible",
    [("0.2.0", True), ("0.2.7", True), ("0.2.0-rc.1", True), ("0.3.0", True), ("0.10.1", True),
     ("0.1.0", False), ("1.2.0", False), ("", False), ("garbage", False)],
)
def test_a_library_of_the_same_major_and_a_minor_at_least_the_bindings_is_compatible(
    version: str, compatible: bool
) -> None:
    assert native.abi_compatible(version) is compatible


# -- Cache(...) ------------------------------------------------------------------------------------------------


def test_cache_dir_under_a_regular_file_is_an_os_error_naming_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"not a directory")
    cache_dir = blocker / "cache"
    with pytest.raises(OSError) as info:
        wasm_ecds.Cache(cache_dir=cache_dir)
    error = info.value
    assert isinstance(error, wasm_ecds.CacheIOError)
    assert isinstance(error, wasm_ecds.WasmEcdsError)
    assert error.status == native.IO_ERROR
    assert str(cache_dir) in str(error)
    assert error.reason == str(error)


def test_bad_option_is_an_invalid_argument_error_with_the_librarys_status_and_reason(tmp_path: Path) -> None:
    with pytest.raises(wasm_ecds.InvalidArgumentError) as info:
        wasm_ecds.Cache(cache_dir=tmp_path, max_attempts=0)
    assert info.value.status == native.INVALID_ARGUMENT
    assert "max_attempts" in info.value.reason
    assert str(info.value) == info.value.reason


# -- nack / nack_delta -----------------------------------------------------------------------------------------


def _library_nack_reason(response: bytes, delta: bool) -> str:
    """What the C function itself says about `response`, called without the binding's wrappers."""
    lib = native.load()
    out = native.Bytes()
    reason = native.CString()
    data = native.as_u8_ptr(response)
    if delta:
        status = lib.wasm_ecds_nack_delta(data, len(response), b"r", ctypes.byref(out), ctypes.byref(reason))
    else:
        status = lib.wasm_ecds_nack(data, len(response), b"v", b"r", ctypes.byref(out), ctypes.byref(reason))
    assert status == native.INVALID_ARGUMENT
    text = native.take_string(lib, reason)
    assert text
    return text


def test_nack_error_carries_the_librarys_status_and_reason() -> None:
    garbage = b"\xff\xff\xff"
    with pytest.raises(wasm_ecds.InvalidArgumentError) as info:
        wasm_ecds.nack(garbage, "v", "r")
    assert info.value.status == native.INVALID_ARGUMENT
    assert info.value.reason == _library_nack_reason(garbage, delta=False)


def test_nack_delta_error_carries_the_librarys_status_and_reason() -> None:
    truncated = b"\x0a\x05ab"
    with pytest.raises(wasm_ecds.InvalidArgumentError) as info:
        wasm_ecds.nack_delta(truncated, "r")
    assert info.value.status == native.INVALID_ARGUMENT
    assert info.value.reason == _library_nack_reason(truncated, delta=True)


def test_nack_of_an_empty_response_builds_a_request() -> None:
    # (data, 0) is the empty message, a valid response with no nonce.
    assert isinstance(wasm_ecds.nack(b"", "v", "r"), bytes)
    assert isinstance(wasm_ecds.nack_delta(b"", "r"), bytes)
    assert wasm_ecds.nack(discovery_response(nonce="n"), "v", "r")
    assert wasm_ecds.nack_delta(delta_response({}, nonce="d"), "r")


# -- purge -----------------------------------------------------------------------------------------------------


def test_purge_returns_an_int(tmp_path: Path) -> None:
    with wasm_ecds.Cache(cache_dir=tmp_path) as cache:
        removed = cache.purge()
    assert type(removed) is int
    assert removed == 0


def test_purge_that_cannot_write_the_index_is_an_os_error(tmp_path: Path) -> None:
    with wasm_ecds.Cache(cache_dir=tmp_path) as cache:
        # The index is written by renaming a temp file onto index.json: a directory there makes that fail.
        index = tmp_path / "index.json"
        if index.exists():
            index.unlink()
        (index / "blocker").mkdir(parents=True)
        with pytest.raises(OSError) as info:
            cache.purge()
    error = info.value
    assert isinstance(error, wasm_ecds.CacheIOError)
    assert error.status == native.IO_ERROR
    assert str(tmp_path) in error.reason
