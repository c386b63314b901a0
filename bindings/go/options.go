package wasmecds

import (
	"encoding/json"
	"fmt"
	"time"
)

// Options of a Cache. The zero value of every field means the library's default (which may come from the
// Istio agent's environment variables, read when the cache is opened). Durations must be whole seconds or
// milliseconds as noted.
type Options struct {
	// CacheDir is the module directory (created with mode 0700). Default: $XDG_CACHE_HOME/wasm-ecds, else
	// $HOME/.cache/wasm-ecds.
	CacheDir string
	// EnableConversion false makes responses pass through byte-identical. Default (nil): env
	// ISTIO_AGENT_ENABLE_WASM_REMOTE_LOAD_CONVERSION, else true.
	EnableConversion *bool
	// ModuleExpiry (whole seconds): unused modules older than this are purged. Default 24h.
	ModuleExpiry time.Duration
	// PurgeInterval (whole seconds): how often purges run, lazily inside calls. Default 1h.
	PurgeInterval time.Duration
	// DefaultFetchTimeout (whole milliseconds): one module's whole fetch when http_uri.timeout is unset.
	DefaultFetchTimeout time.Duration
	// HTTPRequestTimeout (whole milliseconds): one HTTP attempt. Default 15s.
	HTTPRequestTimeout time.Duration
	// MaxAttempts per fetch (attempts, not retries). Default 5.
	MaxAttempts int
	// RetryInitialBackoff and RetryMaxBackoff (whole milliseconds). Defaults 500ms and 60s.
	RetryInitialBackoff time.Duration
	RetryMaxBackoff     time.Duration
	// MaxModuleBytes aborts larger downloads. Default 256 MiB.
	MaxModuleBytes int64
	// InsecureHosts are hosts whose TLS certificates are not verified ("*": all).
	InsecureHosts []string
	// CAFile holds extra PEM roots trusted besides the system's.
	CAFile string
	// BlockedCIDRs are refused at connect time, on top of the always-blocked addresses.
	BlockedCIDRs []string
	// OnFetchFailure is "reject" (default) or "deny".
	OnFetchFailure string
	// PlainHTTPHosts are OCI registries ("host" or "host:port" as in the oci:// URL; "*": all) spoken to over
	// plain HTTP instead of HTTPS.
	PlainHTTPHosts []string
	// RegistryMirrors maps a registry host as written in the oci:// URL ("ghcr.io", "127.0.0.1:5000";
	// "docker.io" or "index.docker.io" for Docker Hub) to mirror endpoints ("https://mirror.corp:5000",
	// "http://127.0.0.1:5001": scheme, host and optional port only) tried in order for that registry's
	// manifest and blob requests, before the registry itself. Digests are verified as always.
	RegistryMirrors map[string][]string
}

// optionsJSON is the library's JSON form; omitempty leaves unset options to the library.
type optionsJSON struct {
	CacheDir              string              `json:"cache_dir,omitempty"`
	EnableConversion      *bool               `json:"enable_conversion,omitempty"`
	ModuleExpirySecs      uint64              `json:"module_expiry_secs,omitempty"`
	PurgeIntervalSecs     uint64              `json:"purge_interval_secs,omitempty"`
	DefaultFetchTimeoutMs uint64              `json:"default_fetch_timeout_ms,omitempty"`
	HTTPRequestTimeoutMs  uint64              `json:"http_request_timeout_ms,omitempty"`
	MaxAttempts           int                 `json:"max_attempts,omitempty"`
	RetryInitialBackoffMs uint64              `json:"retry_initial_backoff_ms,omitempty"`
	RetryMaxBackoffMs     uint64              `json:"retry_max_backoff_ms,omitempty"`
	MaxModuleBytes        int64               `json:"max_module_bytes,omitempty"`
	InsecureHosts         []string            `json:"insecure_hosts,omitempty"`
	CAFile                string              `json:"ca_file,omitempty"`
	BlockedCIDRs          []string            `json:"blocked_cidrs,omitempty"`
	OnFetchFailure        string              `json:"on_fetch_failure,omitempty"`
	PlainHTTPHosts        []string            `json:"plain_http_hosts,omitempty"`
	RegistryMirrors       map[string][]string `json:"registry_mirrors,omitempty"`
}

// MarshalJSON renders the options as the library's JSON options object.
func (o Options) MarshalJSON() ([]byte, error) {
	var err error
	in := func(name string, d, unit time.Duration) uint64 {
		if err != nil {
			return 0
		}
		if d < 0 || d%unit != 0 {
			err = &Error{Op: "open", Status: statusInvalidArgument,
				Message: fmt.Sprintf("invalid options: %s %v must be a non-negative whole number of %v", name, d, unit)}
			return 0
		}
		return uint64(d / unit)
	}
	j := optionsJSON{
		CacheDir:              o.CacheDir,
		EnableConversion:      o.EnableConversion,
		ModuleExpirySecs:      in("ModuleExpiry", o.ModuleExpiry, time.Second),
		PurgeIntervalSecs:     in("PurgeInterval", o.PurgeInterval, time.Second),
		DefaultFetchTimeoutMs: in("DefaultFetchTimeout", o.DefaultFetchTimeout, time.Millisecond),
		HTTPRequestTimeoutMs:  in("HTTPRequestTimeout", o.HTTPRequestTimeout, time.Millisecond),
		MaxAttempts:           o.MaxAttempts,
		RetryInitialBackoffMs: in("RetryInitialBackoff", o.RetryInitialBackoff, time.Millisecond),
		RetryMaxBackoffMs:     in("RetryMaxBackoff", o.RetryMaxBackoff, time.Millisecond),
		MaxModuleBytes:        o.MaxModuleBytes,
		InsecureHosts:         o.InsecureHosts,
		CAFile:                o.CAFile,
		BlockedCIDRs:          o.BlockedCIDRs,
		OnFetchFailure:        o.OnFetchFailure,
		PlainHTTPHosts:        o.PlainHTTPHosts,
		RegistryMirrors:       o.RegistryMirrors,
	}
	if err != nil {
		return nil, err
	}
	return json.Marshal(j)
}
