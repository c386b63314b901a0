"""Python binding of libwasm_ecds (pure ctypes).

Converts Envoy ECDS ``DiscoveryResponse`` bytes the way the Istio agent does: every Wasm filter whose module is
remote is fetched, verified and cached on disk, and the response comes back pointing at the local file — or a
:class:`Rejected` exception whose reason belongs in the NACK (see :func:`nack`).

Example::

    import wasm_ecds

    with wasm_ecds.Cache(cache_dir="/var/cache/wasm") as cache:
        try:
            forward = cache.convert(response_bytes)
        except wasm_ecds.Rejected as rejected:
            upstream_request = wasm_ecds.nack(response_bytes, last_acked_version, rejected.reason)
        print(cache.metrics())

Every error the library reports is raised as the :class:`WasmEcdsError` subclass of its status (see
:data:`ERRORS`), carrying that ``status`` and the library's own ``reason``. The library's log records go to the
:mod:`logging` logger ``wasm_ecds``.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import logging
import os
import threading
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Type, Union

from . import _native

__all__ = [
    "Cache",
    "WasmEcdsError",
    "Rejected",
    "InvalidArgumentError",
    "InternalError",
    "CacheIOError",
    "ClosedError",
    "LibraryNotFound",
    "ERRORS",
    "nack",
    "nack_delta",
    "version",
    "sync_log_level",
    "TRACE",
]

BytesLike = Union[bytes, bytearray, memoryview]

#: The :mod:`logging` level used for the library's ``trace`` records (below ``DEBUG``).
TRACE = 5

logger = logging.getLogger("wasm_ecds")


class WasmEcdsError(Exception):
    """Base class of every error this package raises on purpose.

    :attr:`status` is the library's ``WASM_ECDS_*`` status (``None`` when the binding itself raised the error,
    as for :class:`ClosedError`); :attr:`reason` is the library's message, and ``str(error)``.
    """

    #: The ``WASM_ECDS_*`` status this class stands for; ``None`` for errors raised by the binding itself.
    status: Optional[int] = None

    def __init__(self, reason: str, status: Optional[int] = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if status is not None:
            self.status = status

    def __str__(self) -> str:
        return self.reason

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status!r}, reason={self.reason!r})"

    def __reduce__(self) -> Any:
        return (type(self), (self.reason, self.status))


class Rejected(WasmEcdsError):
    """``WASM_ECDS_REJECTED``: the response must not reach Envoy. :attr:`reason` is the message for the NACK's
    ``error_detail`` (see :func:`nack`)."""

    status = _native.REJECTED


class InvalidArgumentError(WasmEcdsError, ValueError):
    """``WASM_ECDS_INVALID_ARGUMENT``: the library refused an argument (an unknown option or a bad value, a
    response a NACK cannot be built for, ...); the reason says which."""

    status = _native.INVALID_ARGUMENT


class InternalError(WasmEcdsError):
    """``WASM_ECDS_INTERNAL_ERROR``: a bug inside the library (a caught panic). The cache stays usable."""

    status = _native.INTERNAL_ERROR


class CacheIOError(WasmEcdsError, OSError):
    """``WASM_ECDS_IO_ERROR``: the cache directory cannot be created, locked or used, or :meth:`Cache.purge`
    could not write the cache's index. An :class:`OSError`; the reason names the path and the OS error."""

    status = _native.IO_ERROR


#: The exception class raised for each non-OK ``WASM_ECDS_*`` status. A status missing here (one added by a
#: newer library) raises :class:`WasmEcdsError` itself, with that ``status``.
ERRORS: Mapping[int, Type[WasmEcdsError]] = MappingProxyType(
    {cls.status: cls for cls in (Rejected, InvalidArgumentError, InternalError, CacheIOError)}
)


class ClosedError(WasmEcdsError, ValueError):
    """The cache was used after :meth:`Cache.close`."""


class LibraryNotFound(WasmEcdsError, _native.LibraryNotFound):
    """libwasm_ecds could not be loaded; the message lists the paths tried."""


# ---------------------------------------------------------------------------------------------------------------
# Library loading and logging


_LOG_LEVELS = {
    _native.LOG_ERROR: logging.ERROR,
    _native.LOG_WARN: logging.WARNING,
    _native.LOG_INFO: logging.INFO,
    _native.LOG_DEBUG: logging.DEBUG,
    _native.LOG_TRACE: TRACE,
}


def _on_log(_user_data: Optional[int], level: int, target: Optional[bytes], message: Optional[bytes]) -> None:
    # Runs on whichever thread the library logs from; must never raise into C.
    try:
        py_level = _LOG_LEVELS.get(level, logging.INFO)
        if not logger.isEnabledFor(py_level):
            return
        text = (message or b"").decode("utf-8", errors="replace")
        source = (target or b"").decode("utf-8", errors="replace")
        logger.log(py_level, "%s", text, extra={"wasm_ecds_target": source})
    except Exception:  # noqa: BLE001 - nothing may propagate into the C caller
        pass


# The ctypes callback object must stay alive as long as the library may call it: module lifetime.
_LOG_CALLBACK = _native.LOG_CALLBACK(_on_log)
_log_state_lock = threading.Lock()
_log_installed_level: Optional[int] = None


def _library_level_for(py_level: int) -> int:
    if py_level <= TRACE:
        return _native.LOG_TRACE
    if py_level <= logging.DEBUG:
        return _native.LOG_DEBUG
    if py_level <= logging.INFO:
        return _native.LOG_INFO
    if py_level <= logging.WARNING:
        return _native.LOG_WARN
    if py_level <= logging.ERROR:
        return _native.LOG_ERROR
    return _native.LOG_OFF


def sync_log_level() -> None:
    """Makes the library filter its records at the ``wasm_ecds`` logger's current effective level.

    The library drops records below its threshold before they reach Python (cheap when logging is quiet). The
    threshold is taken from the logger when the library is loaded and whenever a :class:`Cache` is opened; call
    this after changing the logger's level to apply it at once.
    """
    _apply_log_level(_lib())


def _apply_log_level(lib: ctypes.CDLL) -> None:
    global _log_installed_level
    level = _library_level_for(logger.getEffectiveLevel())
    with _log_state_lock:
        if level == _log_installed_level:
            return
        lib.wasm_ecds_set_log_callback(_LOG_CALLBACK, level, None)
        _log_installed_level = level


def _unset_log_callback() -> None:
    lib = _native._lib
    if lib is not None:
        with _log_state_lock:
            lib.wasm_ecds_set_log_callback(_native.LOG_CALLBACK(), _native.LOG_OFF, None)


atexit.register(_unset_log_callback)


def _lib() -> ctypes.CDLL:
    first = _native._lib is None
    try:
        lib = _native.load()
    except _native.LibraryNotFound as e:
        raise LibraryNotFound(str(e)) from None
    if first:
        _apply_log_level(lib)
    return lib


# ---------------------------------------------------------------------------------------------------------------
# Argument helpers


def _as_bytes(value: Any, name: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{name} must be bytes-like (bytes, bytearray, memoryview), not {type(value).__name__}")


def _as_c_string(value: Any, name: str) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be str, not {type(value).__name__}")
    if "\0" in value:
        raise ValueError(f"{name} must not contain NUL characters")
    return value.encode("utf-8", errors="strict")


def _error_for(status: int, reason: Optional[str]) -> WasmEcdsError:
    """The exception for a non-OK status and the library's reason (which it sets with every non-OK status)."""
    return ERRORS.get(status, WasmEcdsError)(reason or "", status)


def _reason_out() -> "ctypes._Pointer[ctypes.c_char]":
    """A NULL ``char *`` for a ``char **reason`` out-parameter."""
    return _native.CString()


# ---------------------------------------------------------------------------------------------------------------
# Public API


def version() -> str:
    """The version of the loaded libwasm_ecds, e.g. ``"0.2.0"``."""
    raw = _lib().wasm_ecds_version()
    return raw.decode("utf-8") if raw else ""


def __getattr__(name: str) -> Any:
    # ``__version__`` is the loaded library's version (PEP 562: asked for, not computed at import, so that the
    # import works before the library is found). A wheel's library and package share one version, the crate's.
    if name == "__version__":
        return version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Cache:
    """A module cache with its counters. Thread-safe: share one per process and call it from any thread.

    ``Cache(cache_dir=..., **options)`` takes the JSON options of the C API as keyword arguments
    (``enable_conversion``, ``module_expiry_secs``, ``purge_interval_secs``, ``default_fetch_timeout_ms``,
    ``http_request_timeout_ms``, ``max_attempts``, ``retry_initial_backoff_ms``, ``retry_max_backoff_ms``,
    ``max_module_bytes``, ``insecure_hosts``, ``ca_file``, ``blocked_cidrs``, ``on_fetch_failure``, and for
    ``oci://`` modules ``plain_http_hosts``, a list of ``"host[:port]"`` spoken to over plain HTTP, and
    ``registry_mirrors``, a dict mapping a registry host as in the URL to a list of mirror endpoints such as
    ``{"ghcr.io": ["https://mirror.corp:5000"]}``, tried in order before the registry). ``None``
    means "the default" (environment fallback included). An unknown key or a bad value raises
    :class:`InvalidArgumentError` (a ``ValueError``) naming it; a cache directory that cannot be created, locked
    or used raises :class:`CacheIOError` (an ``OSError``) naming the path and the OS error.

    Use it as a context manager, or call :meth:`close`. Calls after :meth:`close` raise :class:`ClosedError`.
    """

    def __init__(self, cache_dir: Union[str, "os.PathLike[str]", None] = None, **options: Any) -> None:
        self._handle: Optional["ctypes._Pointer[_native.wasm_ecds_cache]"] = None
        self._cond = threading.Condition(threading.Lock())
        self._active = 0
        lib = _lib()
        _apply_log_level(lib)
        settings = {k: v for k, v in options.items() if v is not None}
        if cache_dir is not None:
            if not isinstance(cache_dir, (str, os.PathLike)):
                raise TypeError(f"cache_dir must be str or os.PathLike, not {type(cache_dir).__name__}")
            settings["cache_dir"] = os.fspath(cache_dir)
        try:
            options_json = json.dumps(settings, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TypeError(f"options must be JSON-serializable: {e}") from None
        if "\0" in options_json:
            raise ValueError("options must not contain NUL characters")
        handle = _native.CachePtr()
        reason = _reason_out()
        status = lib.wasm_ecds_cache_new(options_json.encode("utf-8"), ctypes.byref(handle), ctypes.byref(reason))
        message = _native.take_string(lib, reason)
        if status != _native.OK:
            raise _error_for(status, message)
        self._handle = handle
        self._lib = lib

    # -- lifetime ---------------------------------------------------------------------------------------------

    def _enter(self) -> "ctypes._Pointer[_native.wasm_ecds_cache]":
        with self._cond:
            if self._handle is None:
                raise ClosedError("the cache is closed")
            self._active += 1
            return self._handle

    def _leave(self) -> None:
        with self._cond:
            self._active -= 1
            if self._active == 0:
                self._cond.notify_all()

    def close(self) -> None:
        """Frees the cache (modules stay on disk). Waits for calls in flight on other threads; idempotent."""
        with self._cond:
            handle = self._handle
            if handle is None:
                return
            self._handle = None
            while self._active:
                self._cond.wait()
        self._lib.wasm_ecds_cache_free(handle)

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._handle is None

    def __enter__(self) -> "Cache":
        if self._handle is None:
            raise ClosedError("the cache is closed")
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if getattr(self, "_handle", None) is not None:
                self.close()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass

    def __repr__(self) -> str:
        return f"<wasm_ecds.Cache {'closed' if self.closed else 'open'}>"

    # -- conversion -------------------------------------------------------------------------------------------

    def _convert_with(self, fn: Callable[..., int], data: Any) -> bytes:
        payload = _as_bytes(data, "data")
        handle = self._enter()
        try:
            out = _native.Bytes()
            reason = _reason_out()
            status = fn(handle, _native.as_u8_ptr(payload), len(payload), ctypes.byref(out), ctypes.byref(reason))
            message = _native.take_string(self._lib, reason)
            if status == _native.OK:
                return _native.take_bytes(self._lib, out)
        finally:
            self._leave()
        raise _error_for(status, message)

    def convert(self, data: BytesLike) -> bytes:
        """Converts a serialized ``envoy.service.discovery.v3.DiscoveryResponse``.

        Returns the bytes to forward to Envoy. Raises :class:`Rejected` when the response must not reach Envoy
        (send :func:`nack` upstream instead), or the :data:`ERRORS` class of any other status the library
        returns. Blocks while modules are fetched; the GIL is released meanwhile.
        """
        return self._convert_with(self._lib.wasm_ecds_convert, data)

    def convert_delta(self, data: BytesLike) -> bytes:
        """As :meth:`convert`, for a serialized ``DeltaDiscoveryResponse`` (removed names pass through)."""
        return self._convert_with(self._lib.wasm_ecds_convert_delta, data)

    # -- observability and maintenance -----------------------------------------------------------------------

    def metrics(self) -> str:
        """The cache's counters in Prometheus text exposition format."""
        handle = self._enter()
        try:
            text = _native.take_string(self._lib, self._lib.wasm_ecds_metrics(handle))
        finally:
            self._leave()
        if text is None:
            raise InternalError("wasm_ecds_metrics returned NULL")
        return text

    def purge(self) -> int:
        """Deletes modules unused for longer than the expiry and no longer referenced; returns how many.

        Raises :class:`CacheIOError` (an ``OSError``) when the cache's index cannot be written.
        """
        handle = self._enter()
        try:
            removed = ctypes.c_uint64()
            reason = _reason_out()
            status = self._lib.wasm_ecds_purge(handle, ctypes.byref(removed), ctypes.byref(reason))
            message = _native.take_string(self._lib, reason)
        finally:
            self._leave()
        if status != _native.OK:
            raise _error_for(status, message)
        return removed.value


def nack(response: BytesLike, last_acked_version: str, reason: str) -> bytes:
    """The serialized ``DiscoveryRequest`` that NACKs a rejected ``DiscoveryResponse``.

    It carries the response's ``type_url``, ``response_nonce`` = its nonce, ``version_info`` =
    ``last_acked_version`` and ``error_detail {code: 13, message: reason}``. Raises
    :class:`InvalidArgumentError`, with the library's reason, when ``response`` does not parse.
    """
    payload = _as_bytes(response, "response")
    version_c = _as_c_string(last_acked_version, "last_acked_version")
    detail_c = _as_c_string(reason, "reason")
    lib = _lib()
    out = _native.Bytes()
    error = _reason_out()
    status = lib.wasm_ecds_nack(
        _native.as_u8_ptr(payload), len(payload), version_c, detail_c, ctypes.byref(out), ctypes.byref(error)
    )
    message = _native.take_string(lib, error)
    if status != _native.OK:
        raise _error_for(status, message)
    return _native.take_bytes(lib, out)


def nack_delta(response: BytesLike, reason: str) -> bytes:
    """The serialized ``DeltaDiscoveryRequest`` that NACKs a rejected ``DeltaDiscoveryResponse``.

    It carries the response's ``type_url``, ``response_nonce`` = its nonce and
    ``error_detail {code: 13, message: reason}``. Raises :class:`InvalidArgumentError`, with the library's
    reason, when ``response`` does not parse.
    """
    payload = _as_bytes(response, "response")
    detail_c = _as_c_string(reason, "reason")
    lib = _lib()
    out = _native.Bytes()
    error = _reason_out()
    status = lib.wasm_ecds_nack_delta(
        _native.as_u8_ptr(payload), len(payload), detail_c, ctypes.byref(out), ctypes.byref(error)
    )
    message = _native.take_string(lib, error)
    if status != _native.OK:
        raise _error_for(status, message)
    return _native.take_bytes(lib, out)
