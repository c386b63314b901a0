"""Finds and loads libwasm_ecds and declares the C prototypes of ``include/wasm_ecds.h``.

This module owns the ctypes view of the C ABI and nothing else: no Python-level policy lives here.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from pathlib import Path
from typing import List, Optional

# Status codes (WASM_ECDS_* in the header).
OK = 0
REJECTED = 1
INVALID_ARGUMENT = -1
INTERNAL_ERROR = -2
IO_ERROR = -3

# The C ABI this module declares (WASM_ECDS_VERSION_MAJOR / _MINOR of the header it follows). From 0.2 on, a
# library of the same major version with this minor or a later one is compatible: functions, types and statuses
# are only ever added within a major version (the header's "ABI stability"; the soname is libwasm_ecds.so.0).
ABI_MAJOR = 0
ABI_MINOR = 2

# Log levels (WASM_ECDS_LOG_* in the header).
LOG_OFF = 0
LOG_ERROR = 1
LOG_WARN = 2
LOG_INFO = 3
LOG_DEBUG = 4
LOG_TRACE = 5

if sys.platform == "darwin":
    LIBRARY_NAME = "libwasm_ecds.dylib"
elif sys.platform == "win32":
    LIBRARY_NAME = "wasm_ecds.dll"
else:
    LIBRARY_NAME = "libwasm_ecds.so"


class wasm_ecds_cache(ctypes.Structure):  # noqa: N801 - the C name
    """``wasm_ecds_cache``: opaque; only ever handled through :data:`CachePtr`."""


#: ``wasm_ecds_cache *``
CachePtr = ctypes.POINTER(wasm_ecds_cache)

#: ``char *`` owned by the library: read with ``ctypes.string_at``, freed with ``wasm_ecds_string_free``.
#: (A ``c_char_p`` would be converted to ``bytes`` and the pointer to free lost.)
CString = ctypes.POINTER(ctypes.c_char)


class Bytes(ctypes.Structure):
    """``wasm_ecds_bytes``: bytes owned by the library, freed with ``wasm_ecds_bytes_free``."""

    _fields_ = [("data", ctypes.POINTER(ctypes.c_uint8)), ("len", ctypes.c_size_t)]


# void (*)(void *user_data, int32_t level, const char *target, const char *message)
LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int32, ctypes.c_char_p, ctypes.c_char_p)


class LibraryNotFound(OSError):
    """No libwasm_ecds could be loaded; the message lists every place that was tried."""


def candidate_paths() -> List[Path]:
    """Where the library is looked for, in order.

    1. ``$WASM_ECDS_LIBRARY`` (a file, or a directory holding the library);
    2. next to this package (a wheel that ships the library);
    3. ``<repo>/target/release`` then ``<repo>/target/debug`` of the cargo workspace this package sits in
       (``$CARGO_TARGET_DIR`` is honoured too).
    """
    paths: List[Path] = []
    env = os.environ.get("WASM_ECDS_LIBRARY")
    if env:
        p = Path(env)
        paths.append(p / LIBRARY_NAME if p.is_dir() else p)
        # An explicit choice is final: never silently fall back to another build.
        return paths
    here = Path(__file__).resolve().parent
    paths.append(here / LIBRARY_NAME)
    target_dirs: List[Path] = []
    cargo_target = os.environ.get("CARGO_TARGET_DIR")
    if cargo_target:
        target_dirs.append(Path(cargo_target))
    for parent in here.parents:
        if (parent / "Cargo.toml").is_file():
            target_dirs.append(parent / "target")
            break
    for target in target_dirs:
        for profile in ("release", "debug"):
            paths.append(target / profile / LIBRARY_NAME)
    return paths


def _declare(lib: ctypes.CDLL) -> None:
    """Declares every prototype of ``include/wasm_ecds.h`` (ABI 0.2), argument for argument."""
    c_char_p, c_size_t, c_int32, c_void_p = ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int32, ctypes.c_void_p
    u8_ptr = ctypes.POINTER(ctypes.c_uint8)  # const uint8_t *
    reason_out = ctypes.POINTER(CString)  # char **reason
    bytes_out = ctypes.POINTER(Bytes)  # wasm_ecds_bytes *out

    # const char *wasm_ecds_version(void)  -- static, never freed
    lib.wasm_ecds_version.argtypes = []
    lib.wasm_ecds_version.restype = c_char_p

    # int32_t wasm_ecds_cache_new(const char *options_json, wasm_ecds_cache **out, char **reason)
    lib.wasm_ecds_cache_new.argtypes = [c_char_p, ctypes.POINTER(CachePtr), reason_out]
    lib.wasm_ecds_cache_new.restype = c_int32

    # void wasm_ecds_cache_free(wasm_ecds_cache *cache)
    lib.wasm_ecds_cache_free.argtypes = [CachePtr]
    lib.wasm_ecds_cache_free.restype = None

    # int32_t wasm_ecds_convert[_delta](const wasm_ecds_cache *cache, const uint8_t *response,
    #                                   size_t response_len, wasm_ecds_bytes *out, char **reason)
    for fn in (lib.wasm_ecds_convert, lib.wasm_ecds_convert_delta):
        fn.argtypes = [CachePtr, u8_ptr, c_size_t, bytes_out, reason_out]
        fn.restype = c_int32

    # int32_t wasm_ecds_nack(const uint8_t *response, size_t response_len, const char *last_acked_version,
    #                        const char *error_detail, wasm_ecds_bytes *out, char **reason)
    lib.wasm_ecds_nack.argtypes = [u8_ptr, c_size_t, c_char_p, c_char_p, bytes_out, reason_out]
    lib.wasm_ecds_nack.restype = c_int32

    # int32_t wasm_ecds_nack_delta(const uint8_t *response, size_t response_len, const char *error_detail,
    #                              wasm_ecds_bytes *out, char **reason)
    lib.wasm_ecds_nack_delta.argtypes = [u8_ptr, c_size_t, c_char_p, bytes_out, reason_out]
    lib.wasm_ecds_nack_delta.restype = c_int32

    # char *wasm_ecds_metrics(const wasm_ecds_cache *cache)
    lib.wasm_ecds_metrics.argtypes = [CachePtr]
    lib.wasm_ecds_metrics.restype = CString

    # int32_t wasm_ecds_purge(const wasm_ecds_cache *cache, uint64_t *removed, char **reason)
    lib.wasm_ecds_purge.argtypes = [CachePtr, ctypes.POINTER(ctypes.c_uint64), reason_out]
    lib.wasm_ecds_purge.restype = c_int32

    # void wasm_ecds_bytes_free(wasm_ecds_bytes bytes)
    lib.wasm_ecds_bytes_free.argtypes = [Bytes]
    lib.wasm_ecds_bytes_free.restype = None

    # void wasm_ecds_string_free(char *s)
    lib.wasm_ecds_string_free.argtypes = [CString]
    lib.wasm_ecds_string_free.restype = None

    # int32_t wasm_ecds_set_log_callback(wasm_ecds_log_callback callback, int32_t max_level, void *user_data)
    lib.wasm_ecds_set_log_callback.argtypes = [LOG_CALLBACK, c_int32, c_void_p]
    lib.wasm_ecds_set_log_callback.restype = c_int32


def abi_compatible(version: str) -> bool:
    """Whether a library reporting ``version`` (``wasm_ecds_version()``) has the ABI :func:`_declare` declares."""
    parts = version.split("-", 1)[0].split("+", 1)[0].split(".")
    try:
        major, minor = int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return False
    return major == ABI_MAJOR and minor >= ABI_MINOR


def _library_version(lib: ctypes.CDLL) -> str:
    # wasm_ecds_version has had the same signature since 0.1, so it is safe to ask before declaring the rest.
    fn = lib.wasm_ecds_version
    fn.argtypes = []
    fn.restype = ctypes.c_char_p
    raw = fn()
    return raw.decode("utf-8", errors="replace") if raw else ""


_lib: Optional[ctypes.CDLL] = None
_lib_path: Optional[Path] = None
_load_lock = threading.Lock()


def load() -> ctypes.CDLL:
    """The loaded library (loaded once per process). Raises :class:`LibraryNotFound`."""
    global _lib, _lib_path
    if _lib is not None:
        return _lib
    with _load_lock:
        if _lib is not None:
            return _lib
        tried = []
        for path in candidate_paths():
            if not path.is_file():
                tried.append(f"{path} (missing)")
                continue
            try:
                # CDLL (not PyDLL): the GIL is released during every call, so threads convert in parallel.
                lib = ctypes.CDLL(str(path))
            except OSError as e:
                tried.append(f"{path} ({e})")
                continue
            found = _library_version(lib)
            if not abi_compatible(found):
                # Calling it through these prototypes would pass the wrong arguments: never use it.
                tried.append(f"{path} (version {found or '?'}; this binding needs ABI {ABI_MAJOR}.{ABI_MINOR})")
                continue
            _declare(lib)
            _lib, _lib_path = lib, path
            return lib
        raise LibraryNotFound(
            "libwasm_ecds not found; build it with `cargo build --release` or set WASM_ECDS_LIBRARY. Tried: "
            + "; ".join(tried)
        )


def library_path() -> Optional[Path]:
    """The path of the loaded library, or None before the first load."""
    return _lib_path


def as_u8_ptr(data: bytes) -> "ctypes._Pointer[ctypes.c_uint8]":
    """A ``const uint8_t *`` to ``data``'s own buffer (no copy); it keeps ``data`` alive."""
    return ctypes.cast(data, ctypes.POINTER(ctypes.c_uint8))


def take_string(lib: ctypes.CDLL, ptr: "Optional[ctypes._Pointer[ctypes.c_char]]") -> Optional[str]:
    """Copies a library-owned C string and frees it. None for NULL."""
    if not ptr:
        return None
    try:
        return ctypes.string_at(ptr).decode("utf-8", errors="replace")
    finally:
        lib.wasm_ecds_string_free(ptr)


def take_bytes(lib: ctypes.CDLL, out: Bytes) -> bytes:
    """Copies library-owned bytes and frees them."""
    try:
        if not out.data or out.len == 0:
            return b""
        return ctypes.string_at(out.data, out.len)
    finally:
        lib.wasm_ecds_bytes_free(out)
