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
    c_void_p, c_char_p, c_size_t = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
    # Strings the library allocates are received as c_void_p so that they can be freed afterwards
    # (a c_char_p result would be converted to bytes and the pointer lost).
    out_str = ctypes.POINTER(ctypes.c_void_p)

    lib.wasm_ecds_version.argtypes = []
    lib.wasm_ecds_version.restype = c_char_p

    lib.wasm_ecds_cache_new.argtypes = [c_char_p, out_str]
    lib.wasm_ecds_cache_new.restype = c_void_p

    lib.wasm_ecds_cache_free.argtypes = [c_void_p]
    lib.wasm_ecds_cache_free.restype = None

    for name in ("wasm_ecds_convert", "wasm_ecds_convert_delta"):
        fn = getattr(lib, name)
        fn.argtypes = [c_void_p, c_char_p, c_size_t, ctypes.POINTER(Bytes), out_str]
        fn.restype = ctypes.c_int32

    lib.wasm_ecds_nack.argtypes = [c_char_p, c_size_t, c_char_p, c_char_p, ctypes.POINTER(Bytes)]
    lib.wasm_ecds_nack.restype = ctypes.c_int32

    lib.wasm_ecds_nack_delta.argtypes = [c_char_p, c_size_t, c_char_p, ctypes.POINTER(Bytes)]
    lib.wasm_ecds_nack_delta.restype = ctypes.c_int32

    lib.wasm_ecds_metrics.argtypes = [c_void_p]
    lib.wasm_ecds_metrics.restype = c_void_p

    lib.wasm_ecds_purge.argtypes = [c_void_p]
    lib.wasm_ecds_purge.restype = ctypes.c_int64

    lib.wasm_ecds_bytes_free.argtypes = [Bytes]
    lib.wasm_ecds_bytes_free.restype = None

    lib.wasm_ecds_string_free.argtypes = [c_void_p]
    lib.wasm_ecds_string_free.restype = None

    lib.wasm_ecds_set_log_callback.argtypes = [LOG_CALLBACK, ctypes.c_int32, c_void_p]
    lib.wasm_ecds_set_log_callback.restype = ctypes.c_int32


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


def take_string(lib: ctypes.CDLL, ptr: Optional[int]) -> Optional[str]:
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
