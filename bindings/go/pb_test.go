package wasmecds

// A tiny protobuf encoder/decoder (standard library only) to build ECDS inputs and inspect outputs. Field
// numbers are those of the public Envoy schema (envoy.service.discovery.v3, envoy.config.core.v3,
// envoy.extensions.filters.http.wasm.v3, envoy.extensions.wasm.v3).

import (
	"encoding/binary"
	"fmt"
)

const (
	ecdsTypeURL     = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
	httpWasmTypeURL = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
	stringValueURL  = "type.googleapis.com/google.protobuf.StringValue"
)

type msg []byte

func (m msg) varintField(field int, v uint64) msg {
	m = binary.AppendUvarint(m, uint64(field<<3|0))
	return binary.AppendUvarint(m, v)
}

func (m msg) bytesField(field int, b []byte) msg {
	m = binary.AppendUvarint(m, uint64(field<<3|2))
	m = binary.AppendUvarint(m, uint64(len(b)))
	return append(m, b...)
}

func (m msg) str(field int, s string) msg { return m.bytesField(field, []byte(s)) }
func (m msg) sub(field int, s msg) msg    { return m.bytesField(field, s) }

func anyOf(typeURL string, value msg) msg { return msg(nil).str(1, typeURL).sub(2, value) }

// remoteWasm is envoy.extensions.filters.http.wasm.v3.Wasm{config: PluginConfig{name, root_id, vm_config:
// VmConfig{vm_id, runtime, code: AsyncDataSource{remote: {http_uri: {uri, cluster "_", timeout 30s},
// sha256}}, environment_variables}, configuration: StringValue}}.
func remoteWasm(name, uri, sha256 string, env map[string]string) msg {
	httpURI := msg(nil).str(1, uri).str(2, "_").sub(3, msg(nil).varintField(1, 30))
	code := msg(nil).sub(2, msg(nil).sub(1, httpURI).str(2, sha256))
	vm := msg(nil).str(1, name+"-vm").str(2, "envoy.wasm.runtime.v8").sub(3, code)
	if len(env) > 0 {
		var ev msg
		for k, v := range env {
			ev = ev.sub(2, msg(nil).str(1, k).str(2, v))
		}
		vm = vm.sub(7, ev)
	}
	configuration := anyOf(stringValueURL, msg(nil).str(1, `{"realm":"test"}`))
	plugin := msg(nil).str(1, name).str(2, name+"-root").sub(3, vm).sub(4, configuration)
	return msg(nil).sub(1, plugin)
}

func localWasm(name, filename string) msg {
	code := msg(nil).sub(1, msg(nil).str(1, filename))
	vm := msg(nil).str(1, name+"-vm").str(2, "envoy.wasm.runtime.v8").sub(3, code)
	return msg(nil).sub(1, msg(nil).str(1, name).sub(3, vm))
}

func extensionConfig(name string, wasm msg) msg {
	return msg(nil).str(1, name).sub(2, anyOf(httpWasmTypeURL, wasm))
}

func discoveryResponse(version, nonce, typeURL string, configs ...msg) []byte {
	m := msg(nil).str(1, version)
	for _, c := range configs {
		m = m.sub(2, anyOf(ecdsTypeURL, c))
	}
	return m.str(4, typeURL).str(5, nonce)
}

func deltaResponse(nonce string, configs map[string]msg, removed ...string) []byte {
	m := msg(nil).str(1, "sv1")
	for name, c := range configs {
		m = m.sub(2, msg(nil).str(1, name+"-v1").sub(2, anyOf(ecdsTypeURL, c)).str(3, name))
	}
	m = m.str(4, ecdsTypeURL).str(5, nonce)
	for _, r := range removed {
		m = m.str(6, r)
	}
	return m
}

// field is one decoded field: varint value or length-delimited bytes.
type field struct {
	num    int
	varint uint64
	bytes  []byte
}

func decode(b []byte) ([]field, error) {
	var out []field
	for len(b) > 0 {
		key, n := binary.Uvarint(b)
		if n <= 0 {
			return nil, fmt.Errorf("bad key")
		}
		b = b[n:]
		f := field{num: int(key >> 3)}
		switch key & 7 {
		case 0:
			v, n := binary.Uvarint(b)
			if n <= 0 {
				return nil, fmt.Errorf("bad varint")
			}
			f.varint, b = v, b[n:]
		case 1:
			if len(b) < 8 {
				return nil, fmt.Errorf("short i64")
			}
			b = b[8:]
		case 2:
			l, n := binary.Uvarint(b)
			if n <= 0 || uint64(len(b)-n) < l {
				return nil, fmt.Errorf("bad length")
			}
			f.bytes, b = b[n:n+int(l)], b[n+int(l):]
		case 5:
			if len(b) < 4 {
				return nil, fmt.Errorf("short i32")
			}
			b = b[4:]
		default:
			return nil, fmt.Errorf("wire type %d", key&7)
		}
		out = append(out, f)
	}
	return out, nil
}

// get returns the last occurrence of a field (protobuf's "last one wins"), or nil.
func get(b []byte, num int) *field {
	fs, err := decode(b)
	if err != nil {
		return nil
	}
	var last *field
	for i := range fs {
		if fs[i].num == num {
			last = &fs[i]
		}
	}
	return last
}

func all(b []byte, num int) [][]byte {
	fs, _ := decode(b)
	var out [][]byte
	for _, f := range fs {
		if f.num == num {
			out = append(out, f.bytes)
		}
	}
	return out
}

// path follows nested message fields; nil when one is missing.
func path(b []byte, nums ...int) []byte {
	for _, n := range nums {
		f := get(b, n)
		if f == nil {
			return nil
		}
		b = f.bytes
	}
	return b
}

func str(b []byte, nums ...int) string { return string(path(b, nums...)) }
