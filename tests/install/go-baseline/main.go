// The baseline of the footprint measurement in tests/install/run.sh: the Go program of ../go without the
// binding (the same shape and output), so that the difference in size is what the binding adds.
package main

import (
	"fmt"
	"os"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: app CACHE_DIR")
		os.Exit(2)
	}
	typeURL := "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
	response := append([]byte("\x0a\x02v1\x22"), byte(len(typeURL)))
	response = append(append(response, typeURL...), "\x2a\x02n1"...)
	out := append([]byte(nil), response...)
	fmt.Printf("baseline: converted %d bytes unchanged, NACK %d bytes\n", len(out), 0)
}
