// Tests of wasm_ecds.hpp against a real HTTP server on loopback (POSIX sockets, one thread per connection).
// Built with -Wall -Wextra -Werror -fsanitize=address,undefined by test.sh. Exits non-zero on any failure.

#include "wasm_ecds.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace fs = std::filesystem;

// ---- a tiny test harness ----------------------------------------------------------------------------------

static int failures = 0;
static const char* current_test = "";

#define CHECK(cond)                                                                              \
  do {                                                                                           \
    if (!(cond)) {                                                                               \
      std::fprintf(stderr, "FAIL %s: %s:%d: %s\n", current_test, __FILE__, __LINE__, #cond);     \
      ++failures;                                                                                \
      return;                                                                                    \
    }                                                                                            \
  } while (0)

#define CHECK_MSG(cond, msg)                                                                     \
  do {                                                                                           \
    if (!(cond)) {                                                                               \
      std::fprintf(stderr, "FAIL %s: %s:%d: %s (%s)\n", current_test, __FILE__, __LINE__, #cond, \
                   std::string(msg).c_str());                                                   \
      ++failures;                                                                                \
      return;                                                                                    \
    }                                                                                            \
  } while (0)

// ---- protobuf encoding and decoding (field numbers from the public Envoy schema) -----------------------

namespace pb {

void varint(std::string& out, std::uint64_t v) {
  while (v >= 0x80) {
    out += static_cast<char>((v & 0x7f) | 0x80);
    v >>= 7;
  }
  out += static_cast<char>(v);
}

struct Msg {
  std::string bytes;
  Msg& u(int field, std::uint64_t v) {
    varint(bytes, static_cast<std::uint64_t>(field) << 3);
    varint(bytes, v);
    return *this;
  }
  Msg& s(int field, std::string_view v) {
    varint(bytes, (static_cast<std::uint64_t>(field) << 3) | 2);
    varint(bytes, v.size());
    bytes.append(v);
    return *this;
  }
  Msg& m(int field, const Msg& v) { return s(field, v.bytes); }
};

struct Field {
  int num;
  std::uint64_t value;
  std::string_view bytes;
};

bool read_varint(std::string_view& in, std::uint64_t& v) {
  v = 0;
  for (int shift = 0; shift < 64 && !in.empty(); shift += 7) {
    auto c = static_cast<unsigned char>(in.front());
    in.remove_prefix(1);
    v |= static_cast<std::uint64_t>(c & 0x7f) << shift;
    if (!(c & 0x80)) return true;
  }
  return false;
}

std::vector<Field> decode(std::string_view in) {
  std::vector<Field> out;
  while (!in.empty()) {
    std::uint64_t key = 0, v = 0;
    if (!read_varint(in, key)) return {};
    Field f{static_cast<int>(key >> 3), 0, {}};
    switch (key & 7) {
      case 0:
        if (!read_varint(in, v)) return {};
        f.value = v;
        break;
      case 2:
        if (!read_varint(in, v) || v > in.size()) return {};
        f.bytes = in.substr(0, v);
        in.remove_prefix(v);
        break;
      case 1:
        if (in.size() < 8) return {};
        in.remove_prefix(8);
        break;
      case 5:
        if (in.size() < 4) return {};
        in.remove_prefix(4);
        break;
      default:
        return {};
    }
    out.push_back(f);
  }
  return out;
}

std::vector<std::string_view> all(std::string_view in, int num) {
  std::vector<std::string_view> out;
  for (auto& f : decode(in)) {
    if (f.num == num) out.push_back(f.bytes);
  }
  return out;
}

std::optional<Field> get(std::string_view in, int num) {
  std::optional<Field> last;
  for (auto& f : decode(in)) {
    if (f.num == num) last = f;
  }
  return last;
}

std::string path(std::string_view in, std::initializer_list<int> nums) {
  for (int n : nums) {
    auto f = get(in, n);
    if (!f) return {};
    in = f->bytes;
  }
  return std::string(in);
}

}  // namespace pb

const std::string kEcdsType = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
const std::string kWasmType = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
const std::string kResource = "extensions.istio.io/wasmplugin/ns.basic-auth";

pb::Msg any_of(const std::string& type, const pb::Msg& value) { return pb::Msg{}.s(1, type).m(2, value); }

pb::Msg remote_wasm(const std::string& uri, const std::string& sha) {
  pb::Msg http_uri = pb::Msg{}.s(1, uri).s(2, "_").m(3, pb::Msg{}.u(1, 30));
  pb::Msg code = pb::Msg{}.m(2, pb::Msg{}.m(1, http_uri).s(2, sha));
  pb::Msg env = pb::Msg{}
                    .m(2, pb::Msg{}.s(1, "ISTIO_META_WASM_IMAGE_PULL_POLICY").s(2, "IfNotPresent"))
                    .m(2, pb::Msg{}.s(1, "USER_KEY").s(2, "kept"));
  pb::Msg vm = pb::Msg{}.s(1, "basic-auth").s(2, "envoy.wasm.runtime.v8").m(3, code).m(7, env);
  pb::Msg plugin = pb::Msg{}.s(1, "ns.basic-auth").s(2, "root").m(3, vm);
  return pb::Msg{}.m(1, plugin);
}

std::string discovery_response(const pb::Msg& wasm, const std::string& type_url = kEcdsType) {
  pb::Msg tec = pb::Msg{}.s(1, kResource).m(2, any_of(kWasmType, wasm));
  return pb::Msg{}.s(1, "v1").m(2, any_of(kEcdsType, tec)).s(4, type_url).s(5, "n1").bytes;
}

// ---- a sample module and its sha256 -----------------------------------------------------------------------

std::string make_module(const std::string& tag) {
  std::string name = "wasm-ecds-test";
  std::string section = std::string(1, static_cast<char>(name.size())) + name + tag;
  return std::string("\0asm\1\0\0\0\0", 9) + static_cast<char>(section.size()) + section;
}

std::string sha256_hex(const std::string& data) {
  // Via the system's sha256sum: the test needs no crypto library.
  char tmpl[] = "/tmp/wasm-ecds-sha-XXXXXX";
  int fd = mkstemp(tmpl);
  if (fd < 0) return {};
  if (write(fd, data.data(), data.size()) != static_cast<ssize_t>(data.size())) return {};
  close(fd);
  std::string cmd = std::string("sha256sum ") + tmpl;
  std::string out;
  if (FILE* p = popen(cmd.c_str(), "r")) {
    char buf[128];
    if (std::fgets(buf, sizeof buf, p)) out = std::string(buf).substr(0, 64);
    pclose(p);
  }
  unlink(tmpl);
  return out;
}

// ---- a loopback HTTP server ---------------------------------------------------------------------------

class Server {
 public:
  Server() {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    if (bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || listen(fd_, 64) != 0) {
      std::perror("bind/listen");
      std::exit(2);
    }
    socklen_t len = sizeof addr;
    getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
    thread_ = std::thread([this] { loop(); });
  }
  ~Server() {
    stop_ = true;
    shutdown(fd_, SHUT_RDWR);
    close(fd_);
    thread_.join();
    for (auto& t : workers_) t.join();
  }
  std::string add(const std::string& path, std::string body) {
    std::lock_guard<std::mutex> lock(mu_);
    files_[path] = std::move(body);
    return url(path);
  }
  std::string url(const std::string& path) const { return "http://127.0.0.1:" + std::to_string(port_) + path; }
  int hits(const std::string& path) {
    std::lock_guard<std::mutex> lock(mu_);
    return hits_[path];
  }
  void set_delay(std::chrono::milliseconds d) { delay_ms_ = static_cast<int>(d.count()); }

 private:
  void loop() {
    while (!stop_) {
      int c = accept(fd_, nullptr, nullptr);
      if (c < 0) {
        if (stop_) return;
        continue;
      }
      std::lock_guard<std::mutex> lock(mu_);
      workers_.emplace_back([this, c] { serve(c); });
    }
  }
  void serve(int c) {
    std::string req;
    char buf[4096];
    while (req.find("\r\n\r\n") == std::string::npos) {
      ssize_t n = read(c, buf, sizeof buf);
      if (n <= 0) {
        close(c);
        return;
      }
      req.append(buf, static_cast<std::size_t>(n));
    }
    std::istringstream line(req.substr(0, req.find("\r\n")));
    std::string method, path;
    line >> method >> path;
    std::optional<std::string> body;
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++hits_[path];
      auto it = files_.find(path);
      if (it != files_.end()) body = it->second;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms_.load()));
    std::string resp;
    if (body) {
      resp = "HTTP/1.1 200 OK\r\nContent-Type: application/wasm\r\nConnection: close\r\nContent-Length: " +
             std::to_string(body->size()) + "\r\n\r\n" + *body;
    } else {
      resp = "HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
    }
    std::size_t off = 0;
    while (off < resp.size()) {
      ssize_t n = write(c, resp.data() + off, resp.size() - off);
      if (n <= 0) break;
      off += static_cast<std::size_t>(n);
    }
    close(c);
  }

  int fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<int> delay_ms_{0};
  std::thread thread_;
  std::mutex mu_;
  std::vector<std::thread> workers_;
  std::map<std::string, std::string> files_;
  std::map<std::string, int> hits_;
};

// ---- fixtures ----------------------------------------------------------------------------------------

struct TempDir {
  fs::path path;
  TempDir() {
    char tmpl[] = "/tmp/wasm-ecds-cpp-XXXXXX";
    path = mkdtemp(tmpl);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

wasm_ecds::Cache open_cache(const TempDir& dir) {
  return wasm_ecds::Cache(wasm_ecds::Options{}.cache_dir(dir.path.string()).max_attempts(1));
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// The local file a converted response points its (only) Wasm filter at.
std::string local_filename(std::string_view converted) {
  auto resources = pb::all(converted, 2);
  if (resources.size() != 1) return {};
  std::string tec = pb::path(resources[0], {2});
  std::string vm = pb::path(tec, {2, 2, 1, 3});  // Any.value -> Wasm.config -> PluginConfig.vm_config
  return pb::path(vm, {3, 1, 1});
}

// What the C API itself says about a failed NACK, for comparing with what the binding reports.
std::pair<std::int32_t, std::string> c_nack_failure(std::string_view response, const char* last_acked,
                                                    const char* detail, bool delta) {
  wasm_ecds_bytes out{nullptr, 0};
  char* reason = nullptr;
  auto data = reinterpret_cast<const std::uint8_t*>(response.data());
  std::int32_t status = delta ? wasm_ecds_nack_delta(data, response.size(), detail, &out, &reason)
                              : wasm_ecds_nack(data, response.size(), last_acked, detail, &out, &reason);
  wasm_ecds_bytes_free(out);
  std::string text = reason ? reason : "";
  wasm_ecds_string_free(reason);
  return {status, text};
}

// ---- tests -----------------------------------------------------------------------------------------------

void test_version_matches_the_header() {
  std::string major_minor =
      std::to_string(WASM_ECDS_VERSION_MAJOR) + "." + std::to_string(WASM_ECDS_VERSION_MINOR) + ".";
  CHECK_MSG(wasm_ecds::version().rfind(major_minor, 0) == 0, std::string(wasm_ecds::version()));
}

void test_convert_points_at_the_local_file() {
  Server server;
  TempDir dir;
  std::string module = make_module("one");
  std::string url = server.add("/basic-auth.wasm", module);
  auto cache = open_cache(dir);

  auto out = cache.convert(discovery_response(remote_wasm(url, sha256_hex(module))));
  CHECK_MSG(out.ok(), out.error().message);
  CHECK(pb::path(*out, {1}) == "v1");
  CHECK(pb::path(*out, {5}) == "n1");
  auto resources = pb::all(*out, 2);
  CHECK(resources.size() == 1);
  std::string tec = pb::path(resources[0], {2});
  CHECK(pb::path(tec, {1}) == kResource);
  std::string vm = pb::path(tec, {2, 2, 1, 3});  // Any.value -> Wasm.config -> PluginConfig.vm_config
  CHECK(pb::path(vm, {1}) == "basic-auth");
  CHECK(pb::path(vm, {3, 2}).empty());
  std::string filename = pb::path(vm, {3, 1, 1});
  CHECK_MSG(!filename.empty() && filename[0] == '/', filename);
  CHECK(read_file(filename) == module);
  std::string env_block = pb::path(vm, {7});  // all() returns views into it: keep it alive
  auto env = pb::all(env_block, 2);
  CHECK(env.size() == 1 && pb::path(env[0], {1}) == "USER_KEY");
  CHECK(server.hits("/basic-auth.wasm") == 1);
}

void test_rejection_without_and_with_exceptions() {
  Server server;
  TempDir dir;
  std::string module = make_module("bad");
  std::string url = server.add("/bad.wasm", module);
  auto cache = open_cache(dir);
  std::string response = discovery_response(remote_wasm(url, std::string(64, '0')));

  auto out = cache.convert(response);
  CHECK(!out.ok());
  CHECK(out.rejected());
  CHECK(out.status() == wasm_ecds::Status::rejected);
  CHECK_MSG(out.error().message.find(kResource) != std::string::npos, out.error().message);
  CHECK_MSG(out.error().message.find(url) != std::string::npos, out.error().message);

  bool thrown = false;
  try {
    (void)cache.convert_or_throw(response);
  } catch (const wasm_ecds::Rejected& e) {
    thrown = true;
    CHECK(e.reason() == out.error().message);
    CHECK(std::string(e.what()).find(kResource) != std::string::npos);
  }
  CHECK(thrown);

  auto request = wasm_ecds::nack(response, "v0", out.error().message);
  CHECK(request.ok());
  CHECK(pb::path(*request, {1}) == "v0");
  CHECK(pb::path(*request, {5}) == "n1");
  CHECK(pb::path(*request, {6, 2}) == out.error().message);
}

void test_pass_through_is_byte_identical() {
  TempDir dir;
  auto cache = open_cache(dir);
  pb::Msg local_code = pb::Msg{}.m(1, pb::Msg{}.s(1, "/etc/istio/x.wasm"));
  pb::Msg wasm = pb::Msg{}.m(1, pb::Msg{}.s(1, "local").m(3, pb::Msg{}.s(2, "envoy.wasm.runtime.v8").m(3, local_code)));
  std::string response = discovery_response(wasm);
  auto out = cache.convert(response);
  CHECK_MSG(out.ok(), out.error().message);
  CHECK(*out == response);
#ifdef WASM_ECDS_HPP_HAS_SPAN
  std::vector<std::uint8_t> raw(response.begin(), response.end());
  auto from_span = cache.convert(std::span<const std::uint8_t>(raw));
  CHECK(from_span.ok() && *from_span == response);
#endif
}

void test_sixteen_threads_share_one_download() {
  Server server;
  server.set_delay(std::chrono::milliseconds(300));
  TempDir dir;
  std::string module = make_module("shared");
  std::string url = server.add("/shared.wasm", module);
  auto cache = open_cache(dir);
  std::string response = discovery_response(remote_wasm(url, sha256_hex(module)));

  std::vector<std::thread> threads;
  std::vector<std::string> outs(16);
  std::atomic<int> errors{0};
  for (int i = 0; i < 16; ++i) {
    threads.emplace_back([&, i] {
      auto out = cache.convert(response);
      if (out) {
        outs[static_cast<std::size_t>(i)] = *out;
      } else {
        ++errors;
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(errors == 0);
  for (auto& o : outs) CHECK(o == outs[0] && !o.empty());
  CHECK(server.hits("/shared.wasm") == 1);
}

void test_metrics() {
  Server server;
  TempDir dir;
  std::string module = make_module("m");
  std::string url = server.add("/m.wasm", module);
  auto cache = open_cache(dir);
  CHECK(cache.convert(discovery_response(remote_wasm(url, sha256_hex(module)))).ok());
  std::string text = cache.metrics();
  CHECK(text.find("# TYPE istio_agent_wasm_remote_fetch_count counter\n") != std::string::npos);
  CHECK_MSG(text.find("istio_agent_wasm_remote_fetch_count{result=\"success\"} 1\n") != std::string::npos, text);
  CHECK_MSG(text.find("istio_agent_wasm_config_conversion_count{result=\"success\"} 1\n") != std::string::npos, text);
  CHECK(text.find("istio_agent_wasm_config_conversion_duration_count 1\n") != std::string::npos);
  auto purged = cache.purge();
  CHECK(purged.ok() && *purged == 0);
}

void test_purge_returns_the_number_of_modules_removed() {
  static_assert(std::is_same_v<decltype(std::declval<wasm_ecds::Cache&>().purge()),
                               wasm_ecds::Result<std::uint64_t>>);
  Server server;
  TempDir dir;
  std::string old_module = make_module("old");
  std::string new_module = make_module("new");
  std::string old_url = server.add("/old.wasm", old_module);
  std::string new_url = server.add("/new.wasm", new_module);
  wasm_ecds::Cache cache(
      wasm_ecds::Options{}.cache_dir(dir.path.string()).max_attempts(1).module_expiry_secs(1));

  auto first = cache.convert(discovery_response(remote_wasm(old_url, sha256_hex(old_module))));
  CHECK_MSG(first.ok(), first.error().message);
  // The latest response references only the new module: the old one may go once it has expired.
  auto second = cache.convert(discovery_response(remote_wasm(new_url, sha256_hex(new_module))));
  CHECK_MSG(second.ok(), second.error().message);
  std::string old_file = local_filename(*first);
  std::string new_file = local_filename(*second);
  CHECK(!old_file.empty() && !new_file.empty() && old_file != new_file);

  auto fresh = cache.purge();
  CHECK_MSG(fresh.ok(), fresh.error().message);
  CHECK(*fresh == 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(1200));
  auto expired = cache.purge();
  CHECK_MSG(expired.ok(), expired.error().message);
  CHECK_MSG(*expired == 1, std::to_string(*expired));
  CHECK(!fs::exists(old_file));
  CHECK(fs::exists(new_file));
}

void test_a_bad_option_is_an_invalid_argument_naming_it() {
  TempDir dir;
  auto bad = wasm_ecds::Cache::open(wasm_ecds::Options{}.cache_dir(dir.path.string()).on_fetch_failure("explode"));
  CHECK(!bad.ok());
  CHECK(bad.status() == wasm_ecds::Status::invalid_argument);
  CHECK_MSG(bad.error().message.find("explode") != std::string::npos, bad.error().message);
  auto unknown = wasm_ecds::Cache::open_json(R"({"cache_size": 3})");
  CHECK(unknown.status() == wasm_ecds::Status::invalid_argument);
  CHECK_MSG(unknown.error().message.find("cache_size") != std::string::npos, unknown.error().message);
  auto not_json = wasm_ecds::Cache::open_json("{");
  CHECK(not_json.status() == wasm_ecds::Status::invalid_argument);
  CHECK(!not_json.error().message.empty());
  bool thrown = false;
  try {
    wasm_ecds::Cache c(wasm_ecds::Options{}.cache_dir(dir.path.string()).max_attempts(0));
  } catch (const wasm_ecds::Error& e) {
    thrown = e.status() == wasm_ecds::Status::invalid_argument &&
             std::string(e.what()).find("max_attempts") != std::string::npos;
  }
  CHECK(thrown);
  CHECK(wasm_ecds::Options{}.cache_dir("a\"b\\c").max_attempts(2).json() == R"({"cache_dir":"a\"b\\c","max_attempts":2})");
}

void test_oci_options_reach_the_library() {
  TempDir dir;
  auto options = wasm_ecds::Options{}
                     .cache_dir(dir.path.string())
                     .plain_http_hosts({"127.0.0.1:5000"})
                     .registry_mirrors({{"ghcr.io", {"https://mirror.corp:5000", "http://127.0.0.1:5001"}}, {"quay.io", {}}});
  CHECK_MSG(options.json().find(R"("plain_http_hosts":["127.0.0.1:5000"],"registry_mirrors":{"ghcr.io":["https://mirror.corp:5000","http://127.0.0.1:5001"],"quay.io":[]})") != std::string::npos,
            options.json());
  auto good = wasm_ecds::Cache::open(options);
  CHECK_MSG(good.ok(), good.error().message);
  auto bad = wasm_ecds::Cache::open(
      wasm_ecds::Options{}.cache_dir(dir.path.string()).registry_mirrors({{"ghcr.io", {"https://mirror.corp?ns=ghcr.io"}}}));
  CHECK(bad.status() == wasm_ecds::Status::invalid_argument);
  CHECK_MSG(bad.error().message.rfind(R"(invalid options: registry_mirrors: ghcr.io: "https://mirror.corp?ns=ghcr.io" is not a mirror endpoint: a query or fragment is not allowed)", 0) == 0,
            bad.error().message);
  auto twice = wasm_ecds::Cache::open(wasm_ecds::Options{}.cache_dir(dir.path.string()).registry_mirrors(
      {{"ghcr.io", {"https://a.corp"}}, {"ghcr.io", {"https://b.corp"}}}));
  CHECK(twice.status() == wasm_ecds::Status::invalid_argument);
  CHECK_MSG(twice.error().message.find(R"(registry_mirrors: registry "ghcr.io" is listed twice)") != std::string::npos,
            twice.error().message);
  auto plain = wasm_ecds::Cache::open(wasm_ecds::Options{}.cache_dir(dir.path.string()).plain_http_hosts({"http://x"}));
  CHECK(plain.status() == wasm_ecds::Status::invalid_argument);
  CHECK_MSG(plain.error().message.find("plain_http_hosts[0]") != std::string::npos, plain.error().message);
}

void test_a_cache_dir_under_a_regular_file_is_an_io_error_naming_the_path() {
  TempDir dir;
  fs::path file = dir.path / "not-a-dir";
  std::ofstream(file) << "x";
  std::string cache_dir = (file / "cache").string();

  auto opened = wasm_ecds::Cache::open(wasm_ecds::Options{}.cache_dir(cache_dir));
  CHECK(!opened.ok());
  CHECK(opened.status() == wasm_ecds::Status::io_error);
  CHECK_MSG(opened.error().message.find(file.string()) != std::string::npos, opened.error().message);

  bool thrown = false;
  try {
    wasm_ecds::Cache c(wasm_ecds::Options{}.cache_dir(cache_dir));
  } catch (const wasm_ecds::Rejected&) {
    CHECK(false);
  } catch (const wasm_ecds::Error& e) {
    thrown = true;
    CHECK(e.status() == wasm_ecds::Status::io_error);
    CHECK(e.message() == opened.error().message);
    CHECK_MSG(std::string(e.what()).rfind("wasm_ecds: I/O error: ", 0) == 0, e.what());
  }
  CHECK(thrown);
  CHECK(fs::is_regular_file(file));
}

void test_move_only_and_moved_from_is_safe() {
  static_assert(!std::is_copy_constructible_v<wasm_ecds::Cache>);
  static_assert(!std::is_copy_assignable_v<wasm_ecds::Cache>);
  static_assert(std::is_nothrow_move_constructible_v<wasm_ecds::Cache>);
  TempDir dir;
  auto a = open_cache(dir);
  wasm_ecds::Cache b = std::move(a);
  CHECK(b && !a);  // NOLINT(bugprone-use-after-move): checking the moved-from state on purpose
  auto out = a.convert("");  // NOLINT
  CHECK(out.status() == wasm_ecds::Status::invalid_argument);
  CHECK(a.metrics().empty());
  auto purged = a.purge();
  CHECK(purged.status() == wasm_ecds::Status::invalid_argument);
  CHECK(!purged.error().message.empty());  // the library's reason
  CHECK(!b.metrics().empty());
  TempDir dir2;
  auto c = open_cache(dir2);
  c = std::move(b);  // frees c's old handle
  CHECK(c && !b);
}

void test_nack_errors_carry_the_library_reason() {
  std::string garbage("\xff\xff", 2);
  auto bad = wasm_ecds::nack(garbage, "v", "r");
  CHECK(bad.status() == wasm_ecds::Status::invalid_argument);
  auto [c_status, c_reason] = c_nack_failure(garbage, "v", "r", false);
  CHECK(c_status == WASM_ECDS_INVALID_ARGUMENT);
  CHECK(!c_reason.empty());
  CHECK_MSG(bad.error().message == c_reason, bad.error().message + " vs " + c_reason);

  auto bad_delta = wasm_ecds::nack_delta(garbage, "r");
  CHECK(bad_delta.status() == wasm_ecds::Status::invalid_argument);
  auto [c_delta_status, c_delta_reason] = c_nack_failure(garbage, nullptr, "r", true);
  CHECK(c_delta_status == WASM_ECDS_INVALID_ARGUMENT);
  CHECK(!c_delta_reason.empty());
  CHECK_MSG(bad_delta.error().message == c_delta_reason, bad_delta.error().message + " vs " + c_delta_reason);

  bool thrown = false;
  try {
    (void)wasm_ecds::nack(garbage, "v", "r").value();
  } catch (const wasm_ecds::Error& e) {
    thrown = e.status() == wasm_ecds::Status::invalid_argument && e.message() == c_reason;
  }
  CHECK(thrown);

  // Checked by the binding before the call: a NUL would silently cut the C string short.
  auto nul = wasm_ecds::nack("", "v", std::string("a\0b", 3));
  CHECK(nul.status() == wasm_ecds::Status::invalid_argument);
  CHECK_MSG(nul.error().message.find("error_detail") != std::string::npos, nul.error().message);
}

void test_nack_delta_builds_the_request() {
  auto delta = wasm_ecds::nack_delta(pb::Msg{}.s(4, kEcdsType).s(5, "dn").bytes, "why");
  CHECK(delta.ok());
  CHECK(pb::path(*delta, {6}) == "dn");     // DeltaDiscoveryRequest.response_nonce
  CHECK(pb::path(*delta, {7, 2}) == "why");  // error_detail.message
}

void test_logger_receives_records() {
  std::mutex mu;
  std::vector<std::string> records;
  wasm_ecds::set_logger(
      [&](wasm_ecds::Level, std::string_view target, std::string_view message) {
        std::lock_guard<std::mutex> lock(mu);
        records.push_back(std::string(target) + ": " + std::string(message));
      },
      wasm_ecds::Level::trace);
  {
    Server server;
    TempDir dir;
    std::string module = make_module("log");
    std::string url = server.add("/log.wasm", module);
    auto cache = open_cache(dir);
    (void)cache.convert(discovery_response(remote_wasm(url, sha256_hex(module))));
    (void)cache.convert(discovery_response(remote_wasm(server.url("/missing.wasm"), std::string(64, '1'))));
  }
  wasm_ecds::set_logger(nullptr);
  std::lock_guard<std::mutex> lock(mu);
  CHECK(!records.empty());
  bool has_target = false;
  for (auto& r : records) has_target |= r.rfind("wasm_ecds", 0) == 0;
  CHECK(has_target);
}

int main(int argc, char** argv) {
  const std::vector<std::pair<const char*, void (*)()>> tests = {
      {"version_matches_the_header", test_version_matches_the_header},
      {"nack_errors_carry_the_library_reason", test_nack_errors_carry_the_library_reason},
      {"nack_delta_builds_the_request", test_nack_delta_builds_the_request},
      {"a_bad_option_is_an_invalid_argument_naming_it", test_a_bad_option_is_an_invalid_argument_naming_it},
      {"oci_options_reach_the_library", test_oci_options_reach_the_library},
      {"a_cache_dir_under_a_regular_file_is_an_io_error_naming_the_path",
       test_a_cache_dir_under_a_regular_file_is_an_io_error_naming_the_path},
      {"move_only_and_moved_from_is_safe", test_move_only_and_moved_from_is_safe},
      {"convert_points_at_the_local_file", test_convert_points_at_the_local_file},
      {"rejection_without_and_with_exceptions", test_rejection_without_and_with_exceptions},
      {"pass_through_is_byte_identical", test_pass_through_is_byte_identical},
      {"sixteen_threads_share_one_download", test_sixteen_threads_share_one_download},
      {"metrics", test_metrics},
      {"purge_returns_the_number_of_modules_removed", test_purge_returns_the_number_of_modules_removed},
      {"logger_receives_records", test_logger_receives_records},
  };
  int run = 0;
  for (auto& [name, fn] : tests) {
    if (argc > 1 && std::string(name).find(argv[1]) == std::string::npos) continue;
    current_test = name;
    int before = failures;
    try {
      fn();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "FAIL %s: exception: %s\n", name, e.what());
      ++failures;
    }
    std::printf("%s %s\n", failures == before ? "ok  " : "FAIL", name);
    ++run;
  }
  std::printf("%d tests, %d failures\n", run, failures);
  return failures == 0 && run > 0 ? 0 : 1;
}
