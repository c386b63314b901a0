package wasmecds

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

const resourceName = "extensions.istio.io/wasmplugin/ns.basic-auth"

// module is a small valid Wasm module: the header plus a custom section carrying tag.
func module(tag string) []byte {
	name := "wasm-ecds-test"
	section := append([]byte{byte(len(name))}, name...)
	section = append(section, tag...)
	return append([]byte("\x00asm\x01\x00\x00\x00\x00"), append([]byte{byte(len(section))}, section...)...)
}

func sum(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// moduleServer serves files on loopback and counts requests per path.
type moduleServer struct {
	*httptest.Server
	mu    sync.Mutex
	files map[string][]byte
	hits  map[string]int
	delay time.Duration
}

func newModuleServer(t *testing.T) *moduleServer {
	s := &moduleServer{files: map[string][]byte{}, hits: map[string]int{}}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		s.hits[r.URL.Path]++
		body, ok := s.files[r.URL.Path]
		delay := s.delay
		s.mu.Unlock()
		time.Sleep(delay)
		if !ok {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/wasm")
		_, _ = w.Write(body)
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *moduleServer) add(p string, body []byte) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.files[p] = body
	return s.URL + p
}

func (s *moduleServer) count(p string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.hits[p]
}

func openCache(t *testing.T) *Cache {
	t.Helper()
	c, err := Open(Options{CacheDir: t.TempDir(), MaxAttempts: 1})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func remoteResponse(url string, mod []byte, sha string, env map[string]string) []byte {
	if sha == "" {
		sha = sum(mod)
	}
	return discoveryResponse("v1", "n1", ecdsTypeURL, extensionConfig(resourceName, remoteWasm("ns.basic-auth", url, sha, env)))
}

// vmConfig digs resource i's VmConfig out of a DiscoveryResponse.
func vmConfig(t *testing.T, resp []byte, i int) []byte {
	t.Helper()
	resources := all(resp, 2)
	if len(resources) <= i {
		t.Fatalf("response has %d resources", len(resources))
	}
	if got := str(resources[i], 1); got != ecdsTypeURL {
		t.Fatalf("resource type %q", got)
	}
	tec := path(resources[i], 2)
	if got := str(tec, 2, 1); got != httpWasmTypeURL {
		t.Fatalf("typed_config type %q", got)
	}
	return path(tec, 2, 2, 1, 3) // Any.value -> Wasm.config -> PluginConfig.vm_config
}

func TestVersion(t *testing.T) {
	if !regexp.MustCompile(`^\d+\.\d+\.\d+`).MatchString(Version()) {
		t.Fatalf("Version() = %q", Version())
	}
}

func TestLinkedLibraryHasTheHeadersABI(t *testing.T) {
	// From 0.2 on, a library of the header's major version and at least its minor has everything the header
	// declares (functions and statuses are only added within a major version).
	var major, minor int
	if _, err := fmt.Sscanf(Version(), "%d.%d.", &major, &minor); err != nil {
		t.Fatalf("Version() = %q: %v", Version(), err)
	}
	if major != headerVersionMajor || minor < headerVersionMinor {
		t.Fatalf("linked library %q, header %d.%d", Version(), headerVersionMajor, headerVersionMinor)
	}
	if headerVersionMajor != 0 || headerVersionMinor < 2 {
		t.Fatalf("header is ABI %d.%d, this binding needs 0.2 or a later 0.x", headerVersionMajor, headerVersionMinor)
	}
}

func TestConvertFetchesTheModuleAndPointsAtTheLocalFile(t *testing.T) {
	srv := newModuleServer(t)
	mod := module("one")
	url := srv.add("/basic-auth.wasm", mod)
	c := openCache(t)

	in := remoteResponse(url, mod, "", map[string]string{"ISTIO_META_WASM_IMAGE_PULL_POLICY": "IfNotPresent", "USER_KEY": "kept"})
	out, err := c.Convert(in)
	if err != nil {
		t.Fatalf("Convert: %v", err)
	}
	if str(out, 1) != "v1" || str(out, 5) != "n1" || str(out, 4) != ecdsTypeURL {
		t.Fatalf("version/nonce/type_url changed")
	}
	if got := str(path(all(out, 2)[0], 2), 1); got != resourceName {
		t.Fatalf("resource name %q", got)
	}
	vm := vmConfig(t, out, 0)
	if path(vm, 3, 2) != nil {
		t.Fatalf("code is still remote")
	}
	filename := str(vm, 3, 1, 1)
	if !strings.HasPrefix(filename, "/") {
		t.Fatalf("filename %q is not absolute", filename)
	}
	data, err := os.ReadFile(filename)
	if err != nil || !bytes.Equal(data, mod) {
		t.Fatalf("local file %q: %v (equal=%v)", filename, err, bytes.Equal(data, mod))
	}
	if str(vm, 1) != "ns.basic-auth-vm" || str(vm, 2) != "envoy.wasm.runtime.v8" {
		t.Fatalf("vm_id/runtime changed")
	}
	entries := all(path(vm, 7), 2)
	if len(entries) != 1 || str(entries[0], 1) != "USER_KEY" || str(entries[0], 2) != "kept" {
		t.Fatalf("environment not stripped to USER_KEY: %d entries", len(entries))
	}
	plugin := path(all(out, 2)[0], 2, 2, 2, 1)
	if str(plugin, 1) != "ns.basic-auth" || str(plugin, 2) != "ns.basic-auth-root" || str(plugin, 4, 1) != stringValueURL {
		t.Fatalf("plugin fields changed")
	}
	if n := srv.count("/basic-auth.wasm"); n != 1 {
		t.Fatalf("server saw %d downloads", n)
	}
}

func TestLocalCodePassesThroughByteIdentical(t *testing.T) {
	c := openCache(t)
	in := discoveryResponse("v1", "n1", ecdsTypeURL, extensionConfig("local", localWasm("local", "/etc/istio/x.wasm")))
	out, err := c.Convert(in)
	if err != nil || !bytes.Equal(out, in) {
		t.Fatalf("Convert = %v, identical=%v", err, bytes.Equal(out, in))
	}
}

func TestWrongChecksumIsARejectedError(t *testing.T) {
	srv := newModuleServer(t)
	mod := module("bad")
	url := srv.add("/bad.wasm", mod)
	c := openCache(t)

	_, err := c.Convert(remoteResponse(url, mod, strings.Repeat("0", 64), nil))
	var rejected *RejectedError
	if !errors.As(err, &rejected) {
		t.Fatalf("error %v (%T) is not a *RejectedError", err, err)
	}
	if !strings.Contains(rejected.Reason, resourceName) || !strings.Contains(rejected.Reason, url) {
		t.Fatalf("reason %q names neither the resource nor the URL", rejected.Reason)
	}
	if errors.Is(err, ErrInvalidArgument) || errors.Is(err, ErrInternal) {
		t.Fatalf("a rejection must not look like a caller error")
	}
}

func TestEmptyResponsePassesThroughAsEmpty(t *testing.T) {
	c := openCache(t)
	for _, in := range [][]byte{nil, {}} {
		if out, err := c.Convert(in); err != nil || len(out) != 0 {
			t.Fatalf("Convert(%v) = %v, %v", in, out, err)
		}
		if out, err := c.ConvertDelta(in); err != nil || len(out) != 0 {
			t.Fatalf("ConvertDelta(%v) = %v, %v", in, out, err)
		}
	}
}

func TestGarbageIsRejectedNotACrash(t *testing.T) {
	c := openCache(t)
	_, err := c.Convert([]byte{0xff, 0xff, 0xff})
	var rejected *RejectedError
	if !errors.As(err, &rejected) || rejected.Reason == "" {
		t.Fatalf("Convert(garbage) = %v", err)
	}
}

func TestConvertDelta(t *testing.T) {
	srv := newModuleServer(t)
	mod := module("delta")
	url := srv.add("/delta.wasm", mod)
	c := openCache(t)

	in := deltaResponse("dn", map[string]msg{resourceName: extensionConfig(resourceName, remoteWasm("d", url, sum(mod), nil))}, "gone")
	out, err := c.ConvertDelta(in)
	if err != nil {
		t.Fatalf("ConvertDelta: %v", err)
	}
	if str(out, 5) != "dn" || str(out, 6) != "gone" {
		t.Fatalf("nonce/removed changed")
	}
	res := all(out, 2)
	if len(res) != 1 || str(res[0], 3) != resourceName {
		t.Fatalf("resources changed")
	}
	filename := str(res[0], 2, 2, 2, 2, 1, 3, 3, 1, 1)
	if data, err := os.ReadFile(filename); err != nil || !bytes.Equal(data, mod) {
		t.Fatalf("local file %q: %v", filename, err)
	}
}

func TestNack(t *testing.T) {
	req, err := Nack(discoveryResponse("v9", "n-42", ecdsTypeURL), "v8", "because")
	if err != nil {
		t.Fatal(err)
	}
	// DiscoveryRequest: version_info 1, type_url 4, response_nonce 5, error_detail 6.
	if str(req, 1) != "v8" || str(req, 4) != ecdsTypeURL || str(req, 5) != "n-42" {
		t.Fatalf("version/type_url/nonce wrong")
	}
	if f := get(path(req, 6), 1); f == nil || f.varint != 13 {
		t.Fatalf("error_detail.code is not 13")
	}
	if str(req, 6, 2) != "because" {
		t.Fatalf("error_detail.message wrong")
	}
	d, err := NackDelta(deltaResponse("dn", nil), "why")
	if err != nil {
		t.Fatal(err)
	}
	// DeltaDiscoveryRequest: type_url 2, response_nonce 6, error_detail 7.
	if str(d, 6) != "dn" || str(d, 2) != ecdsTypeURL || str(d, 7, 2) != "why" {
		t.Fatalf("delta nack wrong")
	}
}

func TestNackOfAMalformedResponseCarriesTheLibrarysReason(t *testing.T) {
	for _, tc := range []struct {
		op, what string
		nack     func() ([]byte, error)
	}{
		{"nack", "malformed DiscoveryResponse", func() ([]byte, error) { return Nack([]byte{0xff, 0xff}, "v", "r") }},
		{"nack_delta", "malformed DeltaDiscoveryResponse", func() ([]byte, error) { return NackDelta([]byte{0xff, 0xff}, "r") }},
	} {
		_, err := tc.nack()
		var e *Error
		if !errors.As(err, &e) || !errors.Is(err, ErrInvalidArgument) {
			t.Fatalf("%s(garbage) = %v (%T), want an *Error matching ErrInvalidArgument", tc.op, err, err)
		}
		if e.Op != tc.op || e.Status != statusInvalidArgument {
			t.Fatalf("%s(garbage): Op %q, Status %d", tc.op, e.Op, e.Status)
		}
		if !strings.Contains(e.Message, tc.what) || err.Error() != "wasmecds: "+tc.op+": "+e.Message {
			t.Fatalf("%s(garbage): message %q is not the library's reason", tc.op, err)
		}
	}
}

func TestNackRefusesANulByteInTheErrorDetail(t *testing.T) {
	_, err := Nack(discoveryResponse("v9", "n", ecdsTypeURL), "v", "r\x00x")
	if !errors.Is(err, ErrInvalidArgument) || !strings.Contains(err.Error(), "errorDetail") {
		t.Fatalf("Nack(NUL error detail) = %v", err)
	}
	_, err = NackDelta(deltaResponse("dn", nil), "r\x00x")
	if !errors.Is(err, ErrInvalidArgument) || !strings.Contains(err.Error(), "errorDetail") {
		t.Fatalf("NackDelta(NUL error detail) = %v", err)
	}
}

func TestOpenErrorsNameTheOption(t *testing.T) {
	_, err := Open(Options{CacheDir: t.TempDir(), OnFetchFailure: "explode"})
	if !errors.Is(err, ErrInvalidArgument) || !strings.Contains(err.Error(), "explode") {
		t.Fatalf("Open(bad on_fetch_failure) = %v", err)
	}
	_, err = Open(Options{CacheDir: t.TempDir(), BlockedCIDRs: []string{"nope"}})
	if !errors.Is(err, ErrInvalidArgument) || !strings.Contains(err.Error(), "blocked_cidrs") {
		t.Fatalf("Open(bad blocked_cidrs) = %v", err)
	}
	_, err = Open(Options{CacheDir: t.TempDir(), ModuleExpiry: 1500 * time.Millisecond})
	if !errors.Is(err, ErrInvalidArgument) || !strings.Contains(err.Error(), "ModuleExpiry") {
		t.Fatalf("Open(fractional expiry) = %v", err)
	}
}

func TestOCIOptionsReachTheLibrary(t *testing.T) {
	c, err := Open(Options{CacheDir: t.TempDir(), PlainHTTPHosts: []string{"127.0.0.1:5000"},
		RegistryMirrors: map[string][]string{"ghcr.io": {"https://mirror.corp:5000", "http://127.0.0.1:5001"}}})
	if err != nil {
		t.Fatalf("Open(valid OCI options) = %v", err)
	}
	c.Close()
	// Refusals come from the library, with its reason naming the key.
	_, err = Open(Options{CacheDir: t.TempDir(), RegistryMirrors: map[string][]string{"ghcr.io": {"https://mirror.corp/v2"}}})
	if !errors.Is(err, ErrInvalidArgument) ||
		!strings.Contains(err.Error(), `invalid options: registry_mirrors: ghcr.io: "https://mirror.corp/v2" is not a mirror endpoint: a path is not allowed`) {
		t.Fatalf("Open(mirror endpoint with a path) = %v", err)
	}
	_, err = Open(Options{CacheDir: t.TempDir(), PlainHTTPHosts: []string{"http://127.0.0.1:5000"}})
	if !errors.Is(err, ErrInvalidArgument) || !strings.Contains(err.Error(), "invalid options: plain_http_hosts[0]") {
		t.Fatalf("Open(plain_http_hosts URL) = %v", err)
	}
}

func TestOpenWithABadOptionIsAnInvalidArgumentFromTheLibrary(t *testing.T) {
	_, err := Open(Options{CacheDir: t.TempDir(), OnFetchFailure: "explode"})
	var e *Error
	if !errors.As(err, &e) || e.Op != "open" || e.Status != statusInvalidArgument || e.Message == "" {
		t.Fatalf("Open(bad option) = %v (%T), want an *Error with status %d and the library's reason", err, err, statusInvalidArgument)
	}
	if !errors.Is(err, ErrInvalidArgument) || errors.Is(err, ErrIO) || errors.Is(err, ErrInternal) {
		t.Fatalf("Open(bad option) = %v matches the wrong sentinel", err)
	}
}

func TestOpenUnderARegularFileIsAnIOErrorNamingThePath(t *testing.T) {
	file := filepath.Join(t.TempDir(), "not-a-directory")
	if err := os.WriteFile(file, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(file, "cache")
	c, err := Open(Options{CacheDir: dir})
	if err == nil {
		c.Close()
		t.Fatalf("Open(%q) succeeded", dir)
	}
	if !errors.Is(err, ErrIO) {
		t.Fatalf("Open(cache dir under a file) = %v (%T), want ErrIO", err, err)
	}
	if errors.Is(err, ErrInvalidArgument) || errors.Is(err, ErrInternal) {
		t.Fatalf("Open(cache dir under a file) = %v matches another sentinel too", err)
	}
	var e *Error
	if !errors.As(err, &e) || e.Op != "open" || e.Status != statusIOError {
		t.Fatalf("Open(cache dir under a file) = %#v", err)
	}
	if !strings.Contains(e.Message, dir) {
		t.Fatalf("message %q does not name the path %q", e.Message, dir)
	}
}

func TestErrorMatchesTheSentinelOfItsStatus(t *testing.T) {
	for status, want := range map[int32]error{
		statusInvalidArgument: ErrInvalidArgument,
		statusIOError:         ErrIO,
		statusInternalError:   ErrInternal,
	} {
		err := statusError("op", status, "the library's reason")
		for _, sentinel := range []error{ErrInvalidArgument, ErrIO, ErrInternal} {
			if got := errors.Is(err, sentinel); got != (sentinel == want) {
				t.Errorf("status %d: errors.Is(err, %v) = %v", status, sentinel, got)
			}
		}
		if err.Error() != "wasmecds: op: the library's reason" {
			t.Errorf("status %d: Error() = %q", status, err)
		}
	}
	var rejected *RejectedError
	if err := statusError("convert", statusRejected, "why"); !errors.As(err, &rejected) || rejected.Reason != "why" {
		t.Errorf("a rejection is %v (%T)", err, err)
	}
	// A status added by a newer library matches no sentinel but keeps its number and reason.
	var e *Error
	err := statusError("op", -99, "new")
	if !errors.As(err, &e) || e.Status != -99 || errors.Is(err, ErrInvalidArgument) || errors.Is(err, ErrIO) || errors.Is(err, ErrInternal) {
		t.Errorf("unknown status: %v", err)
	}
}

func TestOptionsJSON(t *testing.T) {
	off := false
	js, err := Options{CacheDir: "/c", EnableConversion: &off, ModuleExpiry: time.Hour, HTTPRequestTimeout: 2500 * time.Millisecond,
		MaxAttempts: 3, InsecureHosts: []string{"*"}}.MarshalJSON()
	if err != nil {
		t.Fatal(err)
	}
	want := `{"cache_dir":"/c","enable_conversion":false,"module_expiry_secs":3600,"http_request_timeout_ms":2500,"max_attempts":3,"insecure_hosts":["*"]}`
	if string(js) != want {
		t.Fatalf("got %s\nwant %s", js, want)
	}
	js, err = Options{PlainHTTPHosts: []string{"*"}, RegistryMirrors: map[string][]string{
		"quay.io": {"https://q.corp"}, "ghcr.io": {"https://a.corp", "http://b.corp:5001"}}}.MarshalJSON()
	want = `{"plain_http_hosts":["*"],"registry_mirrors":{"ghcr.io":["https://a.corp","http://b.corp:5001"],"quay.io":["https://q.corp"]}}`
	if err != nil || string(js) != want {
		t.Fatalf("got %s, %v\nwant %s", js, err, want)
	}
	if js, _ := (Options{}).MarshalJSON(); string(js) != "{}" {
		t.Fatalf("zero Options = %s", js)
	}
}

func TestDisabledConversionPassesThrough(t *testing.T) {
	srv := newModuleServer(t)
	mod := module("off")
	url := srv.add("/off.wasm", mod)
	off := false
	c, err := Open(Options{CacheDir: t.TempDir(), EnableConversion: &off})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	in := remoteResponse(url, mod, "", nil)
	if out, err := c.Convert(in); err != nil || !bytes.Equal(out, in) {
		t.Fatalf("Convert = %v", err)
	}
	if srv.count("/off.wasm") != 0 {
		t.Fatalf("fetched although conversion is off")
	}
}

func TestThirtyTwoGoroutinesShareOneDownload(t *testing.T) {
	srv := newModuleServer(t)
	srv.delay = 300 * time.Millisecond
	mod := module("shared")
	url := srv.add("/shared.wasm", mod)
	c := openCache(t)
	in := remoteResponse(url, mod, "", nil)

	var wg sync.WaitGroup
	start := make(chan struct{})
	outs := make([][]byte, 32)
	errs := make([]error, 32)
	for i := 0; i < 32; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			<-start
			outs[i], errs[i] = c.Convert(in)
			_ = c.Metrics()
		}(i)
	}
	close(start)
	wg.Wait()
	for i := range outs {
		if errs[i] != nil {
			t.Fatalf("goroutine %d: %v", i, errs[i])
		}
		if !bytes.Equal(outs[i], outs[0]) {
			t.Fatalf("goroutine %d got a different response", i)
		}
	}
	if n := srv.count("/shared.wasm"); n != 1 {
		t.Fatalf("server saw %d downloads, want 1", n)
	}
}

// parseMetrics reads the Prometheus text format: "name{labels} value" lines, comments kept apart.
func parseMetrics(t *testing.T, text string) (map[string]float64, map[string]string) {
	t.Helper()
	samples := map[string]float64{}
	types := map[string]string{}
	line := regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)$`)
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		l := sc.Text()
		if strings.HasPrefix(l, "# TYPE ") {
			f := strings.Fields(l)
			types[f[2]] = f[3]
			continue
		}
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		m := line.FindStringSubmatch(l)
		if m == nil {
			t.Fatalf("not a sample line: %q", l)
		}
		v, err := strconv.ParseFloat(m[2], 64)
		if err != nil {
			t.Fatalf("bad value in %q", l)
		}
		samples[m[1]] = v
	}
	return samples, types
}

func TestMetrics(t *testing.T) {
	srv := newModuleServer(t)
	mod := module("m")
	url := srv.add("/m.wasm", mod)
	c := openCache(t)
	if _, err := c.Convert(remoteResponse(url, mod, "", nil)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Convert(remoteResponse(url, mod, strings.Repeat("1", 64), nil)); err == nil {
		t.Fatal("wrong checksum accepted")
	}
	samples, types := parseMetrics(t, c.Metrics())
	for name, typ := range map[string]string{
		"istio_agent_wasm_cache_lookup_count":         "counter",
		"istio_agent_wasm_cache_entries":              "gauge",
		"istio_agent_wasm_remote_fetch_count":         "counter",
		"istio_agent_wasm_config_conversion_count":    "counter",
		"istio_agent_wasm_config_conversion_duration": "histogram",
	} {
		if types[name] != typ {
			t.Errorf("# TYPE %s = %q, want %q", name, types[name], typ)
		}
	}
	for key, want := range map[string]float64{
		`istio_agent_wasm_remote_fetch_count{result="success"}`:             1,
		`istio_agent_wasm_remote_fetch_count{result="checksum_mismatched"}`: 1,
		`istio_agent_wasm_config_conversion_count{result="success"}`:        1,
		`istio_agent_wasm_config_conversion_count{result="fetch_failure"}`:  1,
		`istio_agent_wasm_config_conversion_duration_count`:                 2,
		`istio_agent_wasm_config_conversion_duration_bucket{le="+Inf"}`:     2,
		`istio_agent_wasm_cache_entries`:                                    1,
	} {
		if got, ok := samples[key]; !ok || got != want {
			t.Errorf("%s = %v (present %v), want %v", key, got, ok, want)
		}
	}
}

func TestCloseSemantics(t *testing.T) {
	c, err := Open(Options{CacheDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := c.Convert(nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("Convert after Close = %v", err)
	}
	if _, err := c.ConvertDelta(nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("ConvertDelta after Close = %v", err)
	}
	if _, err := c.Purge(); !errors.Is(err, ErrClosed) {
		t.Fatalf("Purge after Close = %v", err)
	}
	if m := c.Metrics(); m != "" {
		t.Fatalf("Metrics after Close = %q", m)
	}
}

func TestCloseWhileInUse(t *testing.T) {
	c, err := Open(Options{CacheDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var closedSeen int32
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < 200; j++ {
				if _, err := c.Purge(); errors.Is(err, ErrClosed) {
					atomic.AddInt32(&closedSeen, 1)
					return
				} else if err != nil {
					t.Errorf("Purge: %v", err)
					return
				}
			}
		}()
	}
	time.Sleep(5 * time.Millisecond)
	_ = c.Close()
	wg.Wait()
}

func TestPurgeOfAFreshCacheRemovesNothing(t *testing.T) {
	c := openCache(t)
	if n, err := c.Purge(); err != nil || n != 0 {
		t.Fatalf("Purge = %d, %v", n, err)
	}
}

func TestPurgeCountsTheExpiredModulesNoLongerReferenced(t *testing.T) {
	srv := newModuleServer(t)
	mod := module("purge")
	url := srv.add("/purge.wasm", mod)
	c, err := Open(Options{CacheDir: t.TempDir(), ModuleExpiry: time.Second, PurgeInterval: time.Hour, MaxAttempts: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	out, err := c.Convert(remoteResponse(url, mod, "", nil))
	if err != nil {
		t.Fatal(err)
	}
	filename := str(vmConfig(t, out, 0), 3, 1, 1)
	time.Sleep(1100 * time.Millisecond) // past the one-second expiry

	// The latest response still references the module: it stays.
	if n, err := c.Purge(); err != nil || n != 0 {
		t.Fatalf("Purge while referenced = %d, %v", n, err)
	}
	// The next response no longer does: the expired module goes, and is counted.
	if _, err := c.Convert(discoveryResponse("v2", "n2", ecdsTypeURL, extensionConfig("local", localWasm("local", "/etc/istio/x.wasm")))); err != nil {
		t.Fatal(err)
	}
	if n, err := c.Purge(); err != nil || n != 1 {
		t.Fatalf("Purge after the reference went = %d, %v, want 1", n, err)
	}
	if _, err := os.Stat(filename); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("module file %q: %v, want it gone", filename, err)
	}
	if n, err := c.Purge(); err != nil || n != 0 {
		t.Fatalf("second Purge = %d, %v", n, err)
	}
}

func TestLoggerReceivesRecords(t *testing.T) {
	var mu sync.Mutex
	var records []string
	SetLogLevel(LevelTrace)
	SetLogger(func(level Level, target, msg string) {
		mu.Lock()
		defer mu.Unlock()
		records = append(records, level.String()+" "+target+": "+msg)
	})
	defer func() {
		SetLogger(nil)
		SetLogLevel(LevelInfo)
	}()
	srv := newModuleServer(t)
	mod := module("log")
	url := srv.add("/log.wasm", mod)
	c := openCache(t)
	if _, err := c.Convert(remoteResponse(url, mod, "", nil)); err != nil {
		t.Fatal(err)
	}
	_, _ = c.Convert(remoteResponse(srv.URL+"/missing.wasm", mod, strings.Repeat("2", 64), nil))
	mu.Lock()
	defer mu.Unlock()
	if len(records) == 0 {
		t.Fatal("no log record reached the Go logger")
	}
	if !strings.Contains(strings.Join(records, "\n"), "wasm_ecds") {
		t.Fatalf("no record has a wasm_ecds target: %q", records)
	}
}
