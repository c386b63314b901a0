// Package wasmecds is the Go binding of libwasm_ecds (cgo, static link).
//
// A Cache converts Envoy ECDS DiscoveryResponses whose Wasm filters load remote modules into responses that
// load them from a local, verified on-disk cache, the way the Istio agent does — or returns a *RejectedError
// whose Reason belongs in the NACK (see Nack).
//
// Build the library once before building this package:
//
//	cargo build --release   # in the repository root: target/release/libwasm_ecds.a
//
// The package links ${SRCDIR}/../../target/release/libwasm_ecds.a; to link another build, put its directory
// first with CGO_LDFLAGS="-L/path/to/dir".
package wasmecds

/*
#cgo CFLAGS: -I${SRCDIR}/../../include
#cgo LDFLAGS: -L${SRCDIR}/../../target/release -l:libwasm_ecds.a -ldl -lpthread -lm
#include <stdlib.h>
#include "wasm_ecds.h"
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
)

// ErrClosed is returned by every method of a Cache after Close.
var ErrClosed = errors.New("wasmecds: cache is closed")

// ErrInvalidArgument is matched (errors.Is) by errors where the library refused an argument: an unknown
// option or a bad value (the message names it), or NACK input that does not parse.
var ErrInvalidArgument = errors.New("wasmecds: invalid argument")

// ErrInternal is matched (errors.Is) by errors from a bug inside the library (a caught panic). The cache stays
// usable.
var ErrInternal = errors.New("wasmecds: internal error")

// RejectedError says that a response must not reach Envoy. Reason is the message for the NACK's
// error_detail; it names each failing resource, its URL and the cause. Find it with errors.As.
type RejectedError struct {
	Reason string
}

func (e *RejectedError) Error() string { return "wasmecds: response rejected: " + e.Reason }

// Error is a caller or internal error reported by the library. It matches ErrInvalidArgument or ErrInternal
// with errors.Is.
type Error struct {
	Op      string // the operation, e.g. "open", "convert"
	Status  int32  // the C status (WASM_ECDS_*)
	Message string // the library's message
}

func (e *Error) Error() string { return fmt.Sprintf("wasmecds: %s: %s", e.Op, e.Message) }

// Unwrap makes errors.Is(err, ErrInvalidArgument) and errors.Is(err, ErrInternal) work.
func (e *Error) Unwrap() error {
	switch e.Status {
	case statusInvalidArgument:
		return ErrInvalidArgument
	case statusInternalError:
		return ErrInternal
	}
	return nil
}

func statusError(op string, status int32, message string) error {
	if message == "" {
		message = fmt.Sprintf("failed with status %d", status)
	}
	if status == statusRejected {
		return &RejectedError{Reason: message}
	}
	return &Error{Op: op, Status: status, Message: message}
}

// Version is the version of the linked library, e.g. "0.1.0".
func Version() string { return C.GoString(C.wasm_ecds_version()) }

// Cache is a module cache with its counters. It is safe for use from many goroutines at once. Close frees
// it; the modules stay on disk for the next process.
type Cache struct {
	mu  sync.RWMutex // read-held by every call, write-held by Close: Close waits for calls in flight
	ptr *C.wasm_ecds_cache
}

// Open opens (creating if needed) the cache directory with the given options.
func Open(opts Options) (*Cache, error) {
	js, err := opts.MarshalJSON()
	if err != nil {
		return nil, err
	}
	cjs := C.CString(string(js))
	defer C.free(unsafe.Pointer(cjs))
	var cerr *C.char
	ptr := C.wasm_ecds_cache_new(cjs, &cerr)
	message := takeString(cerr)
	if ptr == nil {
		// wasm_ecds_cache_new has no status: a caught panic is told apart by its "internal error" prefix.
		status := statusInvalidArgument
		if strings.HasPrefix(message, "internal error") {
			status = statusInternalError
		}
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
// converted ECDS state. It returns how many modules it removed.
func (c *Cache) Purge() (int, error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.ptr == nil {
		return 0, ErrClosed
	}
	n := int64(C.wasm_ecds_purge(c.ptr))
	if n < 0 {
		return 0, statusError("purge", int32(n), "")
	}
	return int(n), nil
}

// Nack builds the serialized DiscoveryRequest that NACKs a rejected DiscoveryResponse: its type_url,
// response_nonce = its nonce, version_info = lastAcked, error_detail {code: 13, message: reason}.
func Nack(resp []byte, lastAcked, reason string) ([]byte, error) {
	cv, err := cString("lastAcked", lastAcked)
	if err != nil {
		return nil, err
	}
	defer C.free(unsafe.Pointer(cv))
	cr, err := cString("reason", reason)
	if err != nil {
		return nil, err
	}
	defer C.free(unsafe.Pointer(cr))
	data, n := inputBytes(resp)
	var out C.wasm_ecds_bytes
	status := C.wasm_ecds_nack(data, n, cv, cr, &out)
	runtime.KeepAlive(resp)
	if int32(status) != statusOK {
		return nil, statusError("nack", int32(status), "the response is not a valid DiscoveryResponse")
	}
	return takeBytes(out), nil
}

// NackDelta builds the serialized DeltaDiscoveryRequest that NACKs a rejected DeltaDiscoveryResponse.
func NackDelta(resp []byte, reason string) ([]byte, error) {
	cr, err := cString("reason", reason)
	if err != nil {
		return nil, err
	}
	defer C.free(unsafe.Pointer(cr))
	data, n := inputBytes(resp)
	var out C.wasm_ecds_bytes
	status := C.wasm_ecds_nack_delta(data, n, cr, &out)
	runtime.KeepAlive(resp)
	if int32(status) != statusOK {
		return nil, statusError("nack_delta", int32(status), "the response is not a valid DeltaDiscoveryResponse")
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

// cString copies s for C; a NUL inside would silently truncate it, so it is an error instead.
func cString(name, s string) (*C.char, error) {
	if strings.IndexByte(s, 0) >= 0 {
		return nil, &Error{Op: name, Status: statusInvalidArgument, Message: name + " contains a NUL byte"}
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
