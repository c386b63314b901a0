package wasmecds

// This file holds only the cgo export: a file with //export may declare, not define, C functions.

// #include <stdint.h>
import "C"

import "unsafe"

//export goWasmEcdsLog
func goWasmEcdsLog(_ unsafe.Pointer, level C.int32_t, target *C.char, message *C.char) {
	fn, _ := logFunc.Load().(LogFunc)
	if fn == nil {
		return
	}
	defer func() { _ = recover() }() // a panicking logger must not unwind into the library
	fn(Level(level), C.GoString(target), C.GoString(message))
}
