package wasmecds

/*
#include "wasm_ecds.h"

extern void goWasmEcdsLog(void *user_data, int32_t level, char *target, char *message);

static int32_t wasm_ecds_go_set_log(int32_t max_level) {
	if (max_level == 0) {
		return wasm_ecds_set_log_callback(NULL, 0, NULL);
	}
	return wasm_ecds_set_log_callback((wasm_ecds_log_callback)goWasmEcdsLog, max_level, NULL);
}
*/
import "C"

import (
	"fmt"
	"sync"
	"sync/atomic"
)

// Level is the severity of a library log record.
type Level int32

// The library's log levels (WASM_ECDS_LOG_*).
const (
	LevelOff   Level = 0
	LevelError Level = Level(C.WASM_ECDS_LOG_ERROR)
	LevelWarn  Level = Level(C.WASM_ECDS_LOG_WARN)
	LevelInfo  Level = Level(C.WASM_ECDS_LOG_INFO)
	LevelDebug Level = Level(C.WASM_ECDS_LOG_DEBUG)
	LevelTrace Level = Level(C.WASM_ECDS_LOG_TRACE)
)

func (l Level) String() string {
	switch l {
	case LevelOff:
		return "off"
	case LevelError:
		return "error"
	case LevelWarn:
		return "warn"
	case LevelInfo:
		return "info"
	case LevelDebug:
		return "debug"
	case LevelTrace:
		return "trace"
	}
	return fmt.Sprintf("Level(%d)", int32(l))
}

// LogFunc receives the library's log records: target is the Rust module path (e.g. "wasm_ecds::fetch"). It
// is called on whichever thread logs, possibly many at once, and must not call SetLogger or SetLogLevel.
type LogFunc func(level Level, target, msg string)

var (
	logFunc  atomic.Value // holds LogFunc; read lock-free by the callback
	logMu    sync.Mutex   // serialises SetLogger/SetLogLevel (never taken by the callback)
	logLevel = LevelInfo
)

// SetLogger routes the library's log records at the current level (SetLogLevel, default LevelInfo) and more
// severe to fn. nil turns logging off (the default: the library never prints). Process-wide.
func SetLogger(fn LogFunc) {
	logMu.Lock()
	defer logMu.Unlock()
	logFunc.Store(fn)
	applyLogLocked()
}

// SetLogLevel sets the most verbose level passed to the logger (LevelOff silences it).
func SetLogLevel(level Level) {
	logMu.Lock()
	defer logMu.Unlock()
	if level < LevelOff {
		level = LevelOff
	}
	if level > LevelTrace {
		level = LevelTrace
	}
	logLevel = level
	applyLogLocked()
}

func applyLogLocked() {
	level := logLevel
	if fn, _ := logFunc.Load().(LogFunc); fn == nil {
		level = LevelOff
	}
	C.wasm_ecds_go_set_log(C.int32_t(level))
}
