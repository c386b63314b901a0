// A Go program using the wasm-ecds binding against an installed library: it converts a small
// DiscoveryResponse (no Wasm filter, so it comes back byte for byte) and builds the NACK of it.
// tests/install/run.sh builds it outside the repository (a go.mod that replaces the binding's module by
// bindings/go) with PKG_CONFIG_PATH=<prefix>/lib/pkgconfig, and checks the line it prints.
//
//	app CACHE_DIR
package main

import (
	"bytes"
	"fmt"
	"os"

	wasmecds "github.com/wasm-ecds/wasm-ecds/bindings/go"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: app CACHE_DIR")
		os.Exit(2)
	}
	// DiscoveryResponse { version_info: "v1" (1), type_url: ECDS (4), nonce: "n1" (5) }, encoded by hand.
	typeURL := "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
	response := append([]byte("\x0a\x02v1\x22"), byte(len(typeURL)))
	response = append(append(response, typeURL...), "\x2a\x02n1"...)

	cache, err := wasmecds.Open(wasmecds.Options{CacheDir: os.Args[1]})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer cache.Close()
	out, err := cache.Convert(response)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if !bytes.Equal(out, response) {
		fmt.Fprintln(os.Stderr, "convert changed a response without Wasm filters")
		os.Exit(1)
	}
	nack, err := wasmecds.Nack(response, "v0", "install test")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("wasm_ecds %s: converted %d bytes unchanged, NACK %d bytes\n", wasmecds.Version(), len(out), len(nack))
}
