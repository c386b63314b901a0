// Package wasmecds is the Go binding of libwasm_ecds (cgo, static link through pkg-config).
//
// A Cache converts Envoy ECDS DiscoveryResponses whose Wasm filters load remote modules into responses that
// load them from a local, verified on-disk cache, the way the Istio agent does — or returns a *RejectedError
// whose Reason belongs in the NACK (see Nack).
//
// # Errors
//
// Every error from the library carries the library's own status and message; the binding neither guesses a
// status nor writes a message for it. Tell them apart with errors.As and errors.Is:
//
//   - *RejectedError (errors.As): the response must not reach Envoy; its Reason goes into the NACK.
//   - ErrInvalidArgument: the library refused an argument, e.g. an unknown option or a bad value (the message
//     names it), or NACK input that does not parse.
//   - ErrIO: the cache directory cannot be created, locked or used, or a purge could not write the cache's
//     index; the message names the path and the OS error.
//   - ErrInternal: a bug inside the library (a caught panic); the cache stays usable.
//   - ErrClosed: the Cache was closed.
//
// Every error matching ErrInvalidArgument, ErrIO or ErrInternal is an *Error (errors.As) holding the
// operation, the C status and the library's message. The binding itself refuses only what it cannot hand to
// C faithfully (a string with a NUL byte, a duration that is not a whole number of the option's unit), with
// an *Error matching ErrInvalidArgument that names the argument.
//
// The package links the installed library statically, found by pkg-config (module wasm_ecds-static: the
// header and libwasm_ecds.a with the system libraries it needs). Install it once, then build:
//
//	make install PREFIX=$HOME/.local                          # in the repository root
//	PKG_CONFIG_PATH=$HOME/.local/lib/pkgconfig go build ./...  # the PKG_CONFIG_PATH is not needed for /usr/local
package wasmecds

/*
#cgo pkg-config: wasm_ecds-static
#include <stdlib.h>
#include "wasm_ecds.h"

// From 0.2 on, a later 0.x only adds to the C API (the header's "ABI stability").
#if WASM_ECDS_VERSION_MAJOR != 0 || WASM_ECDS_VERSION_MINOR < 2
#error "this package is written for the C API of ABI 0.2: it needs wasm_ecds.h of major 0, minor 2 or later"
#endif
*/
import "C"

import (
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"unsafe"
)

// Status codes of the C API.
const (
	statusOK              = int32(C.WASM_ECDS_OK)
	statusRejected        = int32(C.WASM_ECDS_REJECTED)
	statusInvalidArgument = int32(C.WASM_ECDS_INVALID_ARGUMENT)
	statusInternalError   = int32(C.WASM_ECDS_INTERNAL_ERROR)
	statusIOError         = int32(C.WASM_ECDS_IO_ERROR)
)

// The ABI version of the header this package was compiled against (compared with Version in the tests).
const (
	headerVersionMajor = int(C.WASM_ECDS_VERSION_MAJOR)
	headerVersionMinor = int(C.WASM_ECDS_VERSION_MINOR)
)

// ErrClosed is returned by every method of a Cache after Close.
var ErrClosed = errors.New("wasmecds: cache is closed")

// ErrInvalidArgument is matched (errors.Is) by errors where the library refused an argument: an unknown
// option or a bad value (the message names it), or NACK input that does not parse.
var ErrInvalidArgument = errors.New("wasmecds: invalid argument")

// ErrInternal is matched (errors.Is) by errors from a bug inside the library (a caught panic). The cache stays
// usable.
var ErrInternal = errors.New("wasmecds: internal error")

// ErrIO is matched (errors.Is) by errors where the cache directory cannot be created, locked or used, or
// where a purge could not write the cache's index. The message names the path and the OS error.
var ErrIO = errors.New("wasmecds: I/O error")

// RejectedError says that a response must not reach Envoy. Reason is the message for the NACK's
// error_detail; it names each failing resource, its URL and the cause. Find it with errors.As.
type RejectedError struct {
	Reason string
}

func (e *RejectedError) Error() string { return "wasmecds: response rejected: " + e.Reason }

// Error is an error status reported by the library (other than a rejection), with the library's message. It
// matches ErrInvalidArgument, ErrIO or ErrInternal with errors.Is, according to Status.
type Error struct {
	Op      string // the operation, e.g. "open", "convert", "purge"
	Status  int32  // the C status (WASM_ECDS_*)
	Message string // the library's message
}

func (e *Error) Error() string {
	if e.Message == "" {
		// The library gives a reason with every error status; say so rather than invent one.
		return fmt.Sprintf("wasmecds: %s: status %d (the library gave no reason)", e.Op, e.Status)
	}
	return fmt.Sprintf("wasmecds: %s: %s", e.Op, e.Message)
}

// Unwrap makes errors.Is(err, ErrInvalidArgument), errors.Is(err, ErrIO) and errors.Is(err, ErrInternal)
// work. A status this binding does not know (added by a newer library) matches none of them.
func (e *Error) Unwrap() error {
	switch e.Status {
	case statusInvalidArgument:
		return ErrInvalidArgument
	case statusIOError:
		return ErrIO
	case statusInternalError:
		return ErrInternal
	}
	return nil
}

// statusError turns a non-OK status and the library's reason into the Go error.
func statusError(op string, status int32, reason string) error {
	if status == statusRejected {
		return &RejectedError{Reason: reason}
	}
	return &Error{Op: op, Status: status, Message: reason}
}

// Version is the version of the linked library, e.g. "0.2.0".
func Version() string { return C.GoString(C.wasm_ecds_version()) }

// Cache is a module cache with its counters. It is safe for use from many goroutines at once. Close frees
// it; the modules stay on disk for the next process.
type Cache struct {
	mu  sync.RWMutex // read-held by every call, write-held by Close: Close waits for calls in flight
	ptr *C.wasm_ecds_cache
}

// Open opens (creating if needed) the cache directory with the given options. A bad option is an error
// matching ErrInvalidArgument whose message names it; a directory that cannot be created, locked or used is
// an error matching ErrIO whose message names the path and the OS error.
func Open(opts Options) (*Cache, error) {
	js, err := opts.MarshalJSON()
	if err != nil {
		return nil, err
	}
	cjs := C.CString(string(js))
	defer C.free(unsafe.Pointer(cjs))
	var ptr *C.wasm_ecds_cache
	var reason *C.char
	status := int32(C.wasm_ecds_cache_new(cjs, &ptr, &reason))
	message := takeString(reason)
	if status != statusOK {
		return nil, statusError("open", status, message)
	}
	c := &Cache{ptr: ptr}
	runtime.SetFinalizer(c, (*Cache).Close)
	return c, nil
}

// Close frees the cache after the calls in flight return. It is idempotent; later calls return ErrClosed.
func (c *Cache) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ptr == nil {
		return nil
	}
	C.wasm_ecds_cache_free(c.ptr)
	c.ptr = nil
	runtime.SetFinalizer(c, nil)
	return nil
}

// Convert converts a serialized envoy.service.discovery.v3.DiscoveryResponse. It returns the bytes to
// forward to Envoy, or a *RejectedError when the response must not reach Envoy (send Nack upstream instead).
// It blocks while modules are fetched.
func (c *Cache) Convert(resp []byte) ([]byte, error) {
	return c.convert("convert", resp, false)
}

// ConvertDelta is Convert for a serialized DeltaDiscoveryResponse; removed resource names pass through.
func (c *Cache) ConvertDelta(resp []byte) ([]byte, error) {
	return c.convert("convert_delta", resp, true)
}

func (c *Cache) convert(op string, resp []byte, delta bool) ([]byte, error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.ptr == nil {
		return nil, ErrClosed
	}
	data, n := inputBytes(resp)
	var out C.wasm_ecds_bytes
	var reason *C.char
	var status C.int32_t
	if delta {
		status = C.wasm_ecds_convert_delta(c.ptr, data, n, &out, &reason)
	} else {
		status = C.wasm_ecds_convert(c.ptr, data, n, &out, &reason)
	}
	runtime.KeepAlive(resp)
	message := takeString(reason)
	if int32(status) != statusOK {
		return nil, statusError(op, int32(status), message)
	}
	return takeBytes(out), nil
}

// Metrics returns the cache's counters in Prometheus text exposition format, or "" after Close.
func (c *Cache) Metrics() string {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.ptr == nil {
		return ""
	}
	return takeString(C.wasm_ecds_metrics(c.ptr))
}

// Purge deletes, now, modules unused for longer than the expiry and no longer referenced by the latest
// converted ECDS state. It returns how many modules it removed; an error matching ErrIO says the cache's
// index could not be written.
func (c *Cache) Purge() (int, error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.ptr == nil {
		return 0, ErrClosed
	}
	var removed C.uint64_t
	var reason *C.char
	status := int32(C.wasm_ecds_purge(c.ptr, &removed, &reason))
	message := takeString(reason)
	if status != statusOK {
		return 0, statusError("purge", status, message)
	}
	return int(removed), nil
}

// Nack builds the serialized DiscoveryRequest that NACKs a rejected DiscoveryResponse: its type_url,
// response_nonce = its nonce, version_info = lastAcked, error_detail {code: 13, message: errorDetail}. Pass
// the RejectedError's Reason as errorDetail. A response that does not parse is an error matching
// ErrInvalidArgument with the library's message.
func Nack(resp []byte, lastAcked, errorDetail string) ([]byte, error) {
	cv, err := cString("nack", "lastAcked", lastAcked)
	if err != nil {
		return nil, err
	}
	defer C.free(unsafe.Pointer(cv))
	cd, err := cString("nack", "errorDetail", errorDetail)
	if err != nil {
		return nil, err
	}
	defer C.free(unsafe.Pointer(cd))
	data, n := inputBytes(resp)
	var out C.wasm_ecds_bytes
	var reason *C.char
	status := int32(C.wasm_ecds_nack(data, n, cv, cd, &out, &reason))
	runtime.KeepAlive(resp)
	message := takeString(reason)
	if status != statusOK {
		return nil, statusError("nack", status, message)
	}
	return takeBytes(out), nil
}

// NackDelta builds the serialized DeltaDiscoveryRequest that NACKs a rejected DeltaDiscoveryResponse: its
// type_url, response_nonce = its nonce, error_detail {code: 13, message: errorDetail}.
func NackDelta(resp []byte, errorDetail string) ([]byte, error) {
	cd, err := cString("nack_delta", "errorDetail", errorDetail)
	if err != nil {
		return nil, err
	}
	defer C.free(unsafe.Pointer(cd))
	data, n := inputBytes(resp)
	var out C.wasm_ecds_bytes
	var reason *C.char
	status := int32(C.wasm_ecds_nack_delta(data, n, cd, &out, &reason))
	runtime.KeepAlive(resp)
	message := takeString(reason)
	if status != statusOK {
		return nil, statusError("nack_delta", status, message)
	}
	return takeBytes(out), nil
}

// inputBytes passes a Go slice to C without copying (cgo rules allow it: the bytes hold no Go pointers and
// the library does not keep them after the call returns).
func inputBytes(b []byte) (*C.uint8_t, C.size_t) {
	if len(b) == 0 {
		return nil, 0
	}
	return (*C.uint8_t)(unsafe.Pointer(&b[0])), C.size_t(len(b))
}

// cString copies s for C. A NUL inside would silently truncate it, so the binding refuses it itself, as the
// library would refuse a bad argument: an *Error matching ErrInvalidArgument that names the parameter.
func cString(op, name, s string) (*C.char, error) {
	if strings.IndexByte(s, 0) >= 0 {
		return nil, &Error{Op: op, Status: statusInvalidArgument, Message: name + " contains a NUL byte"}
	}
	return C.CString(s), nil
}

// takeBytes copies library-owned bytes into Go memory and frees them.
func takeBytes(b C.wasm_ecds_bytes) []byte {
	defer C.wasm_ecds_bytes_free(b)
	if b.data == nil || b.len == 0 {
		return []byte{}
	}
	out := make([]byte, int(b.len))
	copy(out, unsafe.Slice((*byte)(unsafe.Pointer(b.data)), int(b.len)))
	return out
}

// takeString copies a library-owned C string and frees it; "" for NULL.
func takeString(s *C.char) string {
	if s == nil {
		return ""
	}
	defer C.wasm_ecds_string_free(s)
	return C.GoString(s)
}
