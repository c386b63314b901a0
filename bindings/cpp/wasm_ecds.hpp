// wasm_ecds.hpp — header-only C++17 layer over the C API of libwasm_ecds (include/wasm_ecds.h).
//
// Converts Envoy ECDS DiscoveryResponses whose Wasm filters load remote modules into responses that load them
// from a local, verified on-disk cache, the way the Istio agent does — or gives the reason to NACK them.
//
//   auto cache = wasm_ecds::Cache::open(wasm_ecds::Options{}.cache_dir("/var/cache/wasm"));
//   if (!cache) { std::cerr << cache.error().message; return 1; }
//   auto out = cache->convert(response);           // no exceptions: a Result
//   if (out) forward(*out);
//   else if (out.rejected()) send_upstream(wasm_ecds::nack(response, last_acked, out.error().message).value());
//   std::cout << cache->metrics();
//
// Every function is usable without exceptions (Result); the *_or_throw variants and Result::value() throw
// wasm_ecds::Error (wasm_ecds::Rejected for rejections). Every error carries the C API's status and the
// library's own reason, unchanged; the only messages this header writes itself are for the checks it makes
// before calling the library (a NUL byte inside a string). Bytes are std::string, as in protobuf's C++ API.
// A Cache is move-only and thread-safe (many threads may convert at once); a moved-from Cache reports
// Status::invalid_argument from every call instead of crashing.
//
// Written for the C API of ABI 0.2 (include/wasm_ecds.h with WASM_ECDS_VERSION_MAJOR 0, _MINOR 2 or later).
// Link: `pkg-config --cflags --libs wasm_ecds` (the shared library) or `wasm_ecds-static` (libwasm_ecds.a),
// or the CMake targets wasm_ecds::wasm_ecds / wasm_ecds::static (see bindings/cpp/README.md).

#ifndef WASM_ECDS_HPP
#define WASM_ECDS_HPP

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#if __cplusplus >= 202002L && __has_include(<span>)
#include <span>
#define WASM_ECDS_HPP_HAS_SPAN 1
#endif

#include "wasm_ecds.h"

// From 0.2 on, a later 0.x only adds to the C API (see "ABI stability" in wasm_ecds.h): any 0.x, x >= 2, will do.
#if WASM_ECDS_VERSION_MAJOR != 0 || WASM_ECDS_VERSION_MINOR < 2
#error "wasm_ecds.hpp is written for the C API of ABI 0.2 (needs wasm_ecds.h of major 0, minor 2 or later)"
#endif

namespace wasm_ecds {

/// The C API's status codes. A status a newer library adds still arrives, as its number.
enum class Status : std::int32_t {
  ok = WASM_ECDS_OK,
  /// The response must not reach Envoy; the message is the NACK's error_detail.
  rejected = WASM_ECDS_REJECTED,
  /// The caller broke the contract: a bad option, a NULL or moved-from cache, an unparsable response.
  invalid_argument = WASM_ECDS_INVALID_ARGUMENT,
  /// A bug inside the library (a caught panic); the cache is still usable.
  internal_error = WASM_ECDS_INTERNAL_ERROR,
  /// The cache directory cannot be created, locked or used, or purge could not write its index; the
  /// message names the path and the OS error.
  io_error = WASM_ECDS_IO_ERROR,
};

/// Why a call failed: the status and the library's reason (for a rejection, the NACK's error_detail).
struct ErrorInfo {
  Status status = Status::internal_error;
  std::string message;
};

/// Thrown by the throwing conveniences; status() tells the kind (Status::io_error, Status::invalid_argument, ...).
class Error : public std::runtime_error {
 public:
  explicit Error(ErrorInfo info)
      : std::runtime_error(describe(info)), info_(std::move(info)) {}
  Status status() const noexcept { return info_.status; }
  /// The library's message without decoration (for a rejection: the NACK reason).
  const std::string& message() const noexcept { return info_.message; }
  const ErrorInfo& info() const noexcept { return info_; }

 private:
  static std::string describe(const ErrorInfo& info) {
    switch (info.status) {
      case Status::rejected: return "wasm_ecds: response rejected: " + info.message;
      case Status::invalid_argument: return "wasm_ecds: invalid argument: " + info.message;
      case Status::internal_error: return "wasm_ecds: internal error: " + info.message;
      case Status::io_error: return "wasm_ecds: I/O error: " + info.message;
      default:
        return "wasm_ecds: status " + std::to_string(static_cast<std::int32_t>(info.status)) + ": " + info.message;
    }
  }
  ErrorInfo info_;
};

/// A response that must not reach Envoy; reason() goes into the NACK's error_detail.
class Rejected : public Error {
 public:
  explicit Rejected(std::string reason) : Error(ErrorInfo{Status::rejected, std::move(reason)}) {}
  const std::string& reason() const noexcept { return message(); }
};

[[noreturn]] inline void throw_error(ErrorInfo info) {
  if (info.status == Status::rejected) throw Rejected(std::move(info.message));
  throw Error(std::move(info));
}

/// Either a value or an ErrorInfo, like std::expected<T, ErrorInfo>.
template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::in_place_index<0>, std::move(value)) {}          // NOLINT: implicit on purpose
  Result(ErrorInfo error) : v_(std::in_place_index<1>, std::move(error)) {}  // NOLINT

  bool ok() const noexcept { return v_.index() == 0; }
  explicit operator bool() const noexcept { return ok(); }
  /// True when the response was rejected (the caller should NACK with error().message).
  bool rejected() const noexcept { return !ok() && error().status == Status::rejected; }
  Status status() const noexcept { return ok() ? Status::ok : error().status; }

  /// The value; throws Error / Rejected when there is none.
  T& value() & {
    if (!ok()) throw_error(std::get<1>(v_));
    return std::get<0>(v_);
  }
  const T& value() const& {
    if (!ok()) throw_error(std::get<1>(v_));
    return std::get<0>(v_);
  }
  T&& value() && {
    if (!ok()) throw_error(std::move(std::get<1>(v_)));
    return std::move(std::get<0>(v_));
  }
  /// Unchecked access: only after ok().
  T& operator*() & noexcept { return *std::get_if<0>(&v_); }
  const T& operator*() const& noexcept { return *std::get_if<0>(&v_); }
  T* operator->() noexcept { return std::get_if<0>(&v_); }
  const T* operator->() const noexcept { return std::get_if<0>(&v_); }

  /// The error; only when !ok() (Status::ok with an empty message otherwise).
  const ErrorInfo& error() const noexcept {
    static const ErrorInfo none{Status::ok, {}};
    const ErrorInfo* e = std::get_if<1>(&v_);
    return e ? *e : none;
  }

 private:
  std::variant<T, ErrorInfo> v_;
};

namespace detail {

inline std::string take_string(char* s) {
  if (s == nullptr) return {};
  std::string out(s);
  wasm_ecds_string_free(s);
  return out;
}

inline std::string take_bytes(wasm_ecds_bytes b) {
  std::string out;
  if (b.data != nullptr && b.len != 0) out.assign(reinterpret_cast<const char*>(b.data), b.len);
  wasm_ecds_bytes_free(b);
  return out;
}

/// The ErrorInfo of a failed C call: its status and the library's reason (freed here).
inline ErrorInfo failure(std::int32_t status, char* reason) {
  return ErrorInfo{static_cast<Status>(status), take_string(reason)};
}

inline const std::uint8_t* data_of(std::string_view s) noexcept {
  return reinterpret_cast<const std::uint8_t*>(s.data());
}

/// A NUL-terminated copy for the C API; a NUL inside would silently truncate, so it is an error instead.
inline std::optional<std::string> c_string(std::string_view s) {
  if (s.find('\0') != std::string_view::npos) return std::nullopt;
  return std::string(s);
}

inline void json_string(std::string& out, std::string_view s) {
  static const char hex[] = "0123456789abcdef";
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          out += "\\u00";
          out += hex[c >> 4];
          out += hex[c & 15];
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
}

}  // namespace detail

/// The library's JSON options; unset fields are left to the library's defaults and environment fallbacks.
class Options {
 public:
  Options& cache_dir(std::string v) { return set("cache_dir", quoted(v)); }
  Options& enable_conversion(bool v) { return set("enable_conversion", v ? "true" : "false"); }
  Options& module_expiry_secs(std::uint64_t v) { return set("module_expiry_secs", std::to_string(v)); }
  Options& purge_interval_secs(std::uint64_t v) { return set("purge_interval_secs", std::to_string(v)); }
  Options& default_fetch_timeout_ms(std::uint64_t v) { return set("default_fetch_timeout_ms", std::to_string(v)); }
  Options& http_request_timeout_ms(std::uint64_t v) { return set("http_request_timeout_ms", std::to_string(v)); }
  Options& max_attempts(std::uint32_t v) { return set("max_attempts", std::to_string(v)); }
  Options& retry_initial_backoff_ms(std::uint64_t v) { return set("retry_initial_backoff_ms", std::to_string(v)); }
  Options& retry_max_backoff_ms(std::uint64_t v) { return set("retry_max_backoff_ms", std::to_string(v)); }
  Options& max_module_bytes(std::uint64_t v) { return set("max_module_bytes", std::to_string(v)); }
  Options& insecure_hosts(const std::vector<std::string>& v) { return set("insecure_hosts", list(v)); }
  Options& ca_file(std::string v) { return set("ca_file", quoted(v)); }
  Options& blocked_cidrs(const std::vector<std::string>& v) { return set("blocked_cidrs", list(v)); }
  /// "reject" (default) or "deny".
  Options& on_fetch_failure(std::string v) { return set("on_fetch_failure", quoted(v)); }
  /// OCI registries ("host" or "host:port" as in the oci:// URL; "*": all) spoken to over plain HTTP.
  Options& plain_http_hosts(const std::vector<std::string>& v) { return set("plain_http_hosts", list(v)); }
  /// For each registry host as written in the oci:// URL ("ghcr.io", "127.0.0.1:5000"; "docker.io" for
  /// Docker Hub), mirror endpoints ("https://mirror.corp:5000": scheme, host, optional port) tried in order
  /// before the registry itself, e.g. `.registry_mirrors({{"ghcr.io", {"https://mirror.corp:5000"}}})`.
  /// Written as a JSON object in this order; the library refuses a registry named twice.
  Options& registry_mirrors(const std::vector<std::pair<std::string, std::vector<std::string>>>& v) {
    std::string out = "{";
    for (std::size_t i = 0; i < v.size(); ++i) {
      if (i) out += ',';
      detail::json_string(out, v[i].first);
      out += ':';
      out += list(v[i].second);
    }
    return set("registry_mirrors", out + "}");
  }

  /// The JSON object handed to wasm_ecds_cache_new.
  std::string json() const {
    std::string out = "{";
    for (std::size_t i = 0; i < fields_.size(); ++i) {
      if (i) out += ',';
      detail::json_string(out, fields_[i].first);
      out += ':';
      out += fields_[i].second;
    }
    return out + "}";
  }

 private:
  static std::string quoted(std::string_view s) {
    std::string out;
    detail::json_string(out, s);
    return out;
  }
  static std::string list(const std::vector<std::string>& v) {
    std::string out = "[";
    for (std::size_t i = 0; i < v.size(); ++i) {
      if (i) out += ',';
      detail::json_string(out, v[i]);
    }
    return out + "]";
  }
  Options& set(const char* key, std::string value) {
    for (auto& f : fields_) {
      if (f.first == key) {
        f.second = std::move(value);
        return *this;
      }
    }
    fields_.emplace_back(key, std::move(value));
    return *this;
  }
  std::vector<std::pair<std::string, std::string>> fields_;
};

/// The library version, e.g. "0.2.0".
inline std::string_view version() noexcept { return wasm_ecds_version(); }

/// A module cache with its counters. Move-only; thread-safe (except that it must not be destroyed or
/// moved from while another thread uses it).
class Cache {
 public:
  /// Opens a cache. Errors: invalid_argument for an unknown option or a bad value (the message names it);
  /// io_error when the cache directory cannot be created, locked or used (the message names the path and
  /// the OS error); internal_error for a bug inside the library.
  static Result<Cache> open(const Options& options = Options{}) { return open_json(options.json()); }

  /// Opens a cache from a JSON options object ("" or "{}" for defaults); errors as open.
  static Result<Cache> open_json(std::string_view options_json) {
    auto json = detail::c_string(options_json);
    if (!json) return ErrorInfo{Status::invalid_argument, "options contain a NUL byte"};
    wasm_ecds_cache* handle = nullptr;
    char* reason = nullptr;
    std::int32_t status = wasm_ecds_cache_new(json->c_str(), &handle, &reason);
    if (status != WASM_ECDS_OK) return detail::failure(status, reason);
    return Cache(handle);
  }

  /// Throwing convenience: opens or throws wasm_ecds::Error (status() as for open).
  explicit Cache(const Options& options) : Cache(open(options).value()) {}

  Cache(Cache&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
  Cache& operator=(Cache&& other) noexcept {
    if (this != &other) {
      wasm_ecds_cache_free(handle_);
      handle_ = std::exchange(other.handle_, nullptr);
    }
    return *this;
  }
  Cache(const Cache&) = delete;
  Cache& operator=(const Cache&) = delete;
  ~Cache() { wasm_ecds_cache_free(handle_); }

  /// Converts a serialized DiscoveryResponse: the bytes to forward to Envoy, or an error — rejected()
  /// means "NACK with error().message"; every other error carries the library's status and reason.
  /// Blocks while modules are fetched.
  Result<std::string> convert(std::string_view response) const {
    return call(wasm_ecds_convert, response);
  }
  /// As convert, for a serialized DeltaDiscoveryResponse.
  Result<std::string> convert_delta(std::string_view response) const {
    return call(wasm_ecds_convert_delta, response);
  }
  /// Throwing conveniences: the converted bytes, or throws Rejected / Error.
  std::string convert_or_throw(std::string_view response) const { return convert(response).value(); }
  std::string convert_delta_or_throw(std::string_view response) const {
    return convert_delta(response).value();
  }

#ifdef WASM_ECDS_HPP_HAS_SPAN
  Result<std::string> convert(std::span<const std::uint8_t> response) const {
    return convert(std::string_view(reinterpret_cast<const char*>(response.data()), response.size()));
  }
  Result<std::string> convert_delta(std::span<const std::uint8_t> response) const {
    return convert_delta(std::string_view(reinterpret_cast<const char*>(response.data()), response.size()));
  }
#endif

  /// The counters in Prometheus text exposition format ("" for a moved-from cache).
  std::string metrics() const { return detail::take_string(wasm_ecds_metrics(handle_)); }

  /// Purges now: deletes modules unused for longer than the expiry that the latest converted ECDS state
  /// does not reference. The number of modules removed, or an error: io_error when the index could not be
  /// written (the message names the path and the OS error), invalid_argument for a moved-from cache.
  Result<std::uint64_t> purge() const {
    std::uint64_t removed = 0;
    char* reason = nullptr;
    std::int32_t status = wasm_ecds_purge(handle_, &removed, &reason);
    if (status != WASM_ECDS_OK) return detail::failure(status, reason);
    return removed;
  }

  /// The C handle (still owned by this object), for calls this header does not wrap.
  wasm_ecds_cache* native_handle() const noexcept { return handle_; }
  explicit operator bool() const noexcept { return handle_ != nullptr; }

 private:
  explicit Cache(wasm_ecds_cache* handle) noexcept : handle_(handle) {}

  using ConvertFn = decltype(&wasm_ecds_convert);
  static_assert(std::is_same_v<ConvertFn, decltype(&wasm_ecds_convert_delta)>);
  Result<std::string> call(ConvertFn fn, std::string_view response) const {
    wasm_ecds_bytes out{nullptr, 0};
    char* reason = nullptr;
    std::int32_t status = fn(handle_, detail::data_of(response), response.size(), &out, &reason);
    if (status != WASM_ECDS_OK) return detail::failure(status, reason);
    return detail::take_bytes(out);
  }

  wasm_ecds_cache* handle_ = nullptr;
};

/// The serialized DiscoveryRequest that NACKs a rejected DiscoveryResponse (type_url, response_nonce,
/// version_info = last_acked_version, error_detail {code 13, message error_detail}). An invalid_argument
/// error with the library's reason when the response does not parse or a string is not UTF-8.
inline Result<std::string> nack(std::string_view response, std::string_view last_acked_version,
                                std::string_view error_detail) {
  auto version = detail::c_string(last_acked_version);
  if (!version) return ErrorInfo{Status::invalid_argument, "last_acked_version contains a NUL byte"};
  auto detail_text = detail::c_string(error_detail);
  if (!detail_text) return ErrorInfo{Status::invalid_argument, "error_detail contains a NUL byte"};
  wasm_ecds_bytes out{nullptr, 0};
  char* reason = nullptr;
  std::int32_t status = wasm_ecds_nack(detail::data_of(response), response.size(), version->c_str(),
                                       detail_text->c_str(), &out, &reason);
  if (status != WASM_ECDS_OK) return detail::failure(status, reason);
  return detail::take_bytes(out);
}

/// The serialized DeltaDiscoveryRequest that NACKs a rejected DeltaDiscoveryResponse (type_url,
/// response_nonce, error_detail {code 13, message error_detail}); errors as nack.
inline Result<std::string> nack_delta(std::string_view response, std::string_view error_detail) {
  auto detail_text = detail::c_string(error_detail);
  if (!detail_text) return ErrorInfo{Status::invalid_argument, "error_detail contains a NUL byte"};
  wasm_ecds_bytes out{nullptr, 0};
  char* reason = nullptr;
  std::int32_t status =
      wasm_ecds_nack_delta(detail::data_of(response), response.size(), detail_text->c_str(), &out, &reason);
  if (status != WASM_ECDS_OK) return detail::failure(status, reason);
  return detail::take_bytes(out);
}

// ---- logging --------------------------------------------------------------------------------------------

enum class Level : std::int32_t {
  off = 0,
  error = WASM_ECDS_LOG_ERROR,
  warn = WASM_ECDS_LOG_WARN,
  info = WASM_ECDS_LOG_INFO,
  debug = WASM_ECDS_LOG_DEBUG,
  trace = WASM_ECDS_LOG_TRACE,
};

/// Receives log records on whichever thread logs; must not call set_logger.
using Logger = std::function<void(Level level, std::string_view target, std::string_view message)>;

namespace detail {

struct LogState {
  // Read without a lock by the trampoline (which runs under the library's sink lock): set_logger must never
  // make the trampoline wait for a lock that set_logger holds while it calls into the library.
#if defined(__cpp_lib_atomic_shared_ptr) && __cpp_lib_atomic_shared_ptr >= 201711L
  std::atomic<std::shared_ptr<const Logger>> logger;
  std::shared_ptr<const Logger> load() const { return logger.load(); }
  void store(std::shared_ptr<const Logger> l) { logger.store(std::move(l)); }
#else
  std::shared_ptr<const Logger> logger;
  std::shared_ptr<const Logger> load() const { return std::atomic_load(&logger); }
  void store(std::shared_ptr<const Logger> l) { std::atomic_store(&logger, std::move(l)); }
#endif
  std::mutex set_mutex;  // serialises set_logger calls only
};

inline LogState& log_state() {
  static LogState* state = new LogState();  // never destroyed: the library may log during static teardown
  return *state;
}

extern "C" inline void log_trampoline(void*, std::int32_t level, const char* target, const char* message) {
  std::shared_ptr<const Logger> logger = log_state().load();
  if (!logger || !*logger) return;
  try {
    (*logger)(static_cast<Level>(level), target ? target : "", message ? message : "");
  } catch (...) {
    // An exception must not unwind into the library.
  }
}

}  // namespace detail

/// Routes the library's records at max_level and more severe to logger; an empty logger or Level::off turns
/// logging off (the default). Process-wide; the latest call wins.
inline void set_logger(Logger logger, Level max_level = Level::info) {
  auto& state = detail::log_state();
  std::lock_guard<std::mutex> lock(state.set_mutex);
  bool on = static_cast<bool>(logger) && max_level != Level::off;
  state.store(on ? std::make_shared<const Logger>(std::move(logger)) : std::shared_ptr<const Logger>());
  if (on) {
    wasm_ecds_set_log_callback(&detail::log_trampoline, static_cast<std::int32_t>(max_level), nullptr);
  } else {
    wasm_ecds_set_log_callback(nullptr, 0, nullptr);
  }
}

}  // namespace wasm_ecds

#endif  // WASM_ECDS_HPP
