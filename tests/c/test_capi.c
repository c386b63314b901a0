/*
 * The C API from C: every entry point, every status it can return from C (WASM_ECDS_INTERNAL_ERROR needs a
 * bug; the Rust tests inject one), its argument checks and its ownership rules, against a real HTTP server
 * on 127.0.0.1. Built with -Wall -Wextra -Werror -pedantic and run under AddressSanitizer (which includes
 * LeakSanitizer) and UndefinedBehaviorSanitizer by `make test-c`.
 */
#define _GNU_SOURCE
#include "wasm_ecds.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

static int failures = 0;
static int checks = 0;

#define CHECK(cond, ...)                                                     \
    do {                                                                     \
        checks++;                                                            \
        if (!(cond)) {                                                       \
            failures++;                                                      \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                    \
            fprintf(stderr, "\n");                                           \
        }                                                                    \
    } while (0)

/* ---- a loopback HTTP server that serves one module and counts requests ---- */

static const unsigned char MODULE[] = {0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, 0x00, 0x05, 0x04,
                                       'c',  '-',  'a',  'p'};
/* sha256 of MODULE, checked by test_module_bytes_hash below via the library's own verification. */
static char module_sha[65];

static int server_fd = -1;
static int server_port = 0;
static atomic_int requests_served;
static pthread_t server_thread;

static void *serve(void *arg) {
    (void)arg;
    for (;;) {
        int c = accept(server_fd, NULL, NULL);
        if (c < 0) return NULL;
        char buf[4096];
        ssize_t n = read(c, buf, sizeof buf - 1);
        if (n > 0) {
            buf[n] = 0;
            char head[256];
            if (strncmp(buf, "GET /module.wasm", 16) == 0) {
                int len = snprintf(head, sizeof head,
                                   "HTTP/1.1 200 OK\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n",
                                   sizeof MODULE);
                if (write(c, head, (size_t)len) < 0 || write(c, MODULE, sizeof MODULE) < 0) perror("write");
            } else {
                const char *nf = "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
                if (write(c, nf, strlen(nf)) < 0) perror("write");
            }
            atomic_fetch_add(&requests_served, 1);
        }
        close(c);
    }
}

static void start_server(void) {
    server_fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    if (bind(server_fd, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(server_fd, 16) != 0) {
        perror("server");
        exit(2);
    }
    socklen_t len = sizeof addr;
    getsockname(server_fd, (struct sockaddr *)&addr, &len);
    server_port = ntohs(addr.sin_port);
    pthread_create(&server_thread, NULL, serve, NULL);
}

static void stop_server(void) {
    shutdown(server_fd, SHUT_RDWR);
    close(server_fd);
    pthread_join(server_thread, NULL);
}

/* ---- a tiny protobuf writer, enough for an ECDS response ---- */

typedef struct {
    unsigned char data[4096];
    size_t len;
} buf_t;

static void put_varint(buf_t *b, unsigned long long v) {
    while (v >= 0x80) {
        b->data[b->len++] = (unsigned char)(v | 0x80);
        v >>= 7;
    }
    b->data[b->len++] = (unsigned char)v;
}

static void put_bytes(buf_t *b, unsigned field, const void *data, size_t len) {
    put_varint(b, (field << 3) | 2);
    put_varint(b, len);
    memcpy(b->data + b->len, data, len);
    b->len += len;
}

static void put_str(buf_t *b, unsigned field, const char *s) { put_bytes(b, field, s, strlen(s)); }
static void put_msg(buf_t *b, unsigned field, const buf_t *m) { put_bytes(b, field, m->data, m->len); }

#define ECDS_TYPE "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"

/* TypedExtensionConfig "extensions.istio.io/wasmplugin/ns.basic-auth": an HTTP Wasm filter whose module is
 * remote. */
static buf_t wasm_extension(const char *uri, const char *sha256) {
    buf_t http_uri = {0}, remote = {0}, code = {0}, vm = {0}, plugin = {0}, wasm = {0}, any = {0}, tec = {0},
          timeout = {0};
    put_str(&http_uri, 1, uri);
    put_str(&http_uri, 2, "_");
    put_varint(&timeout, (1 << 3) | 0);
    put_varint(&timeout, 30);
    put_msg(&http_uri, 3, &timeout);
    put_msg(&remote, 1, &http_uri);
    put_str(&remote, 2, sha256);
    put_msg(&code, 2, &remote);
    put_str(&vm, 1, "basic-auth");
    put_str(&vm, 2, "envoy.wasm.runtime.v8");
    put_msg(&vm, 3, &code);
    put_str(&plugin, 1, "ns.basic-auth");
    put_msg(&plugin, 3, &vm);
    put_msg(&wasm, 1, &plugin);
    put_str(&any, 1, "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm");
    put_msg(&any, 2, &wasm);
    put_str(&tec, 1, "extensions.istio.io/wasmplugin/ns.basic-auth");
    put_msg(&tec, 2, &any);
    return tec;
}

/* DiscoveryResponse (version "v1", nonce "nonce-7") with that extension, or with no resource when uri is
 * NULL. */
static buf_t ecds_response(const char *uri, const char *sha256) {
    buf_t res = {0}, resp = {0};
    put_str(&resp, 1, "v1");
    if (uri) {
        buf_t tec = wasm_extension(uri, sha256);
        put_str(&res, 1, ECDS_TYPE);
        put_msg(&res, 2, &tec);
        put_msg(&resp, 2, &res);
    }
    put_str(&resp, 4, ECDS_TYPE);
    put_str(&resp, 5, "nonce-7");
    return resp;
}

/* DeltaDiscoveryResponse (nonce "delta-nonce") adding that extension as resource "ns.basic-auth" version
 * "d1", and removing the resource "gone". */
static buf_t ecds_delta_response(const char *uri, const char *sha256) {
    buf_t tec = wasm_extension(uri, sha256), any = {0}, res = {0}, resp = {0};
    put_str(&any, 1, ECDS_TYPE);
    put_msg(&any, 2, &tec);
    put_str(&res, 1, "d1");
    put_msg(&res, 2, &any);
    put_str(&res, 3, "ns.basic-auth");
    put_msg(&resp, 2, &res);
    put_str(&resp, 4, ECDS_TYPE);
    put_str(&resp, 5, "delta-nonce");
    put_str(&resp, 6, "gone");
    return resp;
}

static int contains(const unsigned char *hay, size_t len, const char *needle) {
    return memmem(hay, len, needle, strlen(needle)) != NULL;
}

/* ---- helpers ---- */

static void remove_tree(const char *dir) {
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    CHECK(system(cmd) == 0, "rm -rf %s", dir);
}

/* Opens a cache in dir with extra JSON options (e.g. ", \"max_attempts\": 1"), or NULL with the failure
 * reported. */
static wasm_ecds_cache *open_cache(const char *dir, const char *extra) {
    char opts[512];
    snprintf(opts, sizeof opts, "{\"cache_dir\": \"%s\"%s}", dir, extra);
    wasm_ecds_cache *cache = NULL;
    char *reason = NULL;
    int32_t status = wasm_ecds_cache_new(opts, &cache, &reason);
    CHECK(status == WASM_ECDS_OK && cache != NULL, "cache_new(%s): %d %s", opts, status, reason ? reason : "");
    wasm_ecds_string_free(reason);
    return cache;
}

static void module_uri(char *uri, size_t size) {
    snprintf(uri, size, "http://127.0.0.1:%d/module.wasm", server_port);
}

/* ---- log callback ---- */

static atomic_int warnings_logged;
static void on_log(void *user_data, int32_t level, const char *target, const char *message) {
    CHECK(user_data == (void *)&warnings_logged, "user_data passed back");
    CHECK(target != NULL && message != NULL, "strings given");
    if (level == WASM_ECDS_LOG_WARN) atomic_fetch_add((atomic_int *)user_data, 1);
}

/* ---- tests ---- */

static void test_version(void) {
    const char *v = wasm_ecds_version();
    CHECK(v != NULL && strlen(v) > 0, "version");
    char expected[32];
    snprintf(expected, sizeof expected, "%d.%d.", WASM_ECDS_VERSION_MAJOR, WASM_ECDS_VERSION_MINOR);
    CHECK(strncmp(v, expected, strlen(expected)) == 0, "version %s matches header macros %s", v, expected);
    CHECK(strcmp(v, "0.2.0") == 0, "ABI 0.2: %s", v);
}

static void test_log_callback_levels(void) {
    CHECK(wasm_ecds_set_log_callback(on_log, WASM_ECDS_LOG_WARN, &warnings_logged) == WASM_ECDS_OK, "log cb");
    CHECK(wasm_ecds_set_log_callback(on_log, 99, NULL) == WASM_ECDS_INVALID_ARGUMENT, "level 99 refused");
    CHECK(wasm_ecds_set_log_callback(on_log, -1, NULL) == WASM_ECDS_INVALID_ARGUMENT, "level -1 refused");
}

/* cache_new refuses a bad option with WASM_ECDS_INVALID_ARGUMENT and a reason that names it; *out is not
 * written. */
static void expect_invalid_option(const char *options, const char *named) {
    wasm_ecds_cache *cache = (wasm_ecds_cache *)&warnings_logged; /* a sentinel that must stay */
    char *reason = NULL;
    int32_t status = wasm_ecds_cache_new(options, &cache, &reason);
    CHECK(status == WASM_ECDS_INVALID_ARGUMENT, "%s: status %d", options, status);
    CHECK(cache == (wasm_ecds_cache *)&warnings_logged, "%s: *out untouched on failure", options);
    CHECK(reason != NULL && strstr(reason, named) != NULL, "%s: reason names %s: %s", options, named,
          reason ? reason : "(null)");
    wasm_ecds_string_free(reason);
}

static void test_cache_new_invalid_arguments(void) {
    expect_invalid_option("{\"cache_dirr\": \"/tmp/x\"}", "cache_dirr");
    expect_invalid_option("{\"cache_dir\": \"/tmp/x\", \"max_attempts\": 0}", "max_attempts");
    expect_invalid_option("{\"cache_dir\": \"/tmp/x\", \"ca_file\": \"/nonexistent/ca.pem\"}", "ca_file");
    expect_invalid_option("{not json", "invalid options");
    expect_invalid_option("{\"cache_dir\": \"/tmp/\xff\"}", "UTF-8");
    /* the OCI options: the library's reason names the key */
    expect_invalid_option("{\"cache_dir\": \"/tmp/x\", \"registry_mirrors\": {\"ghcr.io\": [\"https://u:p@m.corp\"]}}",
                          "registry_mirrors: ghcr.io: \"https://u:p@m.corp\" is not a mirror endpoint: credentials");
    expect_invalid_option("{\"cache_dir\": \"/tmp/x\", \"plain_http_hosts\": [\"\"]}", "plain_http_hosts[0]");

    /* NULL out: nothing is opened */
    char *reason = NULL;
    CHECK(wasm_ecds_cache_new("{}", NULL, &reason) == WASM_ECDS_INVALID_ARGUMENT, "NULL out");
    CHECK(reason != NULL && strstr(reason, "out") != NULL, "reason names out: %s", reason ? reason : "(null)");
    wasm_ecds_string_free(reason);
    /* NULL reason: the status alone */
    wasm_ecds_cache *cache = NULL;
    CHECK(wasm_ecds_cache_new("{\"max_attempts\": 0}", &cache, NULL) == WASM_ECDS_INVALID_ARGUMENT && !cache,
          "NULL reason is fine");
}

static void test_cache_new_io_error(void) {
    /* a cache directory below a regular file cannot be created */
    char dir[] = "/tmp/wasm-ecds-c-io-XXXXXX";
    CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    char file[64], below[96], opts[160];
    snprintf(file, sizeof file, "%s/file", dir);
    FILE *f = fopen(file, "w");
    CHECK(f != NULL, "create %s", file);
    if (f) fclose(f);
    snprintf(below, sizeof below, "%s/cache", file);
    snprintf(opts, sizeof opts, "{\"cache_dir\": \"%s\"}", below);
    wasm_ecds_cache *cache = NULL;
    char *reason = NULL;
    int32_t status = wasm_ecds_cache_new(opts, &cache, &reason);
    CHECK(status == WASM_ECDS_IO_ERROR, "cache_dir below a file: status %d", status);
    CHECK(cache == NULL, "no cache");
    CHECK(reason != NULL && strstr(reason, below) != NULL, "reason names the path: %s", reason ? reason : "");
    CHECK(reason != NULL && strstr(reason, "Not a directory") != NULL, "and the OS error: %s",
          reason ? reason : "");
    wasm_ecds_string_free(reason);
    CHECK(wasm_ecds_cache_new(opts, &cache, NULL) == WASM_ECDS_IO_ERROR, "NULL reason is fine");
    remove_tree(dir);
}

static void test_cache_new_accepts_the_oci_options(void) {
    char dir[] = "/tmp/wasm-ecds-c-oci-XXXXXX";
    CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    wasm_ecds_cache *cache = open_cache(dir, ", \"plain_http_hosts\": [\"127.0.0.1:5000\"], \"registry_mirrors\": "
                                             "{\"ghcr.io\": [\"https://m.corp:5000\", \"http://127.0.0.1:5001\"]}");
    wasm_ecds_cache_free(cache);
    remove_tree(dir);
}

static void test_cache_new_null_options_means_defaults(void) {
    /* the default cache directory is $XDG_CACHE_HOME/wasm-ecds */
    char home[] = "/tmp/wasm-ecds-c-xdg-XXXXXX";
    CHECK(mkdtemp(home) != NULL, "mkdtemp");
    const char *saved = getenv("XDG_CACHE_HOME");
    char *previous = saved ? strdup(saved) : NULL;
    setenv("XDG_CACHE_HOME", home, 1);
    wasm_ecds_cache *cache = NULL;
    CHECK(wasm_ecds_cache_new(NULL, &cache, NULL) == WASM_ECDS_OK && cache != NULL, "NULL options");
    wasm_ecds_cache_free(cache);
    char created[96];
    snprintf(created, sizeof created, "%s/wasm-ecds", home);
    struct stat st;
    CHECK(stat(created, &st) == 0 && S_ISDIR(st.st_mode) && (st.st_mode & 077) == 0, "%s created private",
          created);
    if (previous) {
        setenv("XDG_CACHE_HOME", previous, 1);
        free(previous);
    } else {
        unsetenv("XDG_CACHE_HOME");
    }
    remove_tree(home);
}

static void test_null_arguments(wasm_ecds_cache *cache) {
    wasm_ecds_bytes out = {NULL, 0};
    char *reason = NULL;
    CHECK(wasm_ecds_convert(NULL, (const uint8_t *)"", 0, &out, &reason) == WASM_ECDS_INVALID_ARGUMENT, "NULL cache");
    CHECK(reason != NULL && strstr(reason, "cache") != NULL, "reason names the cache");
    wasm_ecds_string_free(reason);
    reason = NULL;
    CHECK(wasm_ecds_convert(cache, NULL, 5, &out, &reason) == WASM_ECDS_INVALID_ARGUMENT, "NULL data, len 5");
    CHECK(reason != NULL && strstr(reason, "response") != NULL, "reason names the response");
    wasm_ecds_string_free(reason);
    reason = NULL;
    CHECK(wasm_ecds_convert(cache, (const uint8_t *)"", 0, NULL, &reason) == WASM_ECDS_INVALID_ARGUMENT, "NULL out");
    CHECK(reason != NULL && strstr(reason, "out") != NULL, "reason names out");
    wasm_ecds_string_free(reason);
    CHECK(wasm_ecds_convert(cache, (const uint8_t *)"", 0, NULL, NULL) == WASM_ECDS_INVALID_ARGUMENT, "NULL both");
    CHECK(wasm_ecds_convert_delta(NULL, NULL, 0, &out, NULL) == WASM_ECDS_INVALID_ARGUMENT, "delta NULL cache");
    CHECK(wasm_ecds_convert_delta(cache, NULL, 0, NULL, NULL) == WASM_ECDS_INVALID_ARGUMENT, "delta NULL out");
    CHECK(wasm_ecds_metrics(NULL) == NULL, "metrics of NULL");
    CHECK(out.data == NULL && out.len == 0, "out untouched on failure");

    uint64_t removed = 42;
    reason = NULL;
    CHECK(wasm_ecds_purge(NULL, &removed, &reason) == WASM_ECDS_INVALID_ARGUMENT, "purge of NULL");
    CHECK(reason != NULL && strstr(reason, "cache") != NULL, "reason names the cache");
    wasm_ecds_string_free(reason);
    CHECK(wasm_ecds_purge(cache, NULL, NULL) == WASM_ECDS_INVALID_ARGUMENT, "purge with NULL removed");
    CHECK(removed == 42, "removed untouched on failure");

    wasm_ecds_cache_free(NULL);
    wasm_ecds_string_free(NULL);
    wasm_ecds_bytes_free((wasm_ecds_bytes){NULL, 0});
}

static void test_empty_and_malformed(wasm_ecds_cache *cache) {
    wasm_ecds_bytes out = {NULL, 0};
    char *reason = NULL;
    CHECK(wasm_ecds_convert(cache, NULL, 0, &out, &reason) == WASM_ECDS_OK, "empty response converts");
    CHECK(out.len == 0 && reason == NULL, "to empty bytes, no reason");
    wasm_ecds_bytes_free(out);

    const uint8_t garbage[] = {0x12, 0x7f, 0x01};
    out = (wasm_ecds_bytes){NULL, 0};
    CHECK(wasm_ecds_convert(cache, garbage, sizeof garbage, &out, &reason) == WASM_ECDS_REJECTED, "garbage rejected");
    CHECK(reason != NULL && strlen(reason) > 0, "with a reason");
    CHECK(out.data == NULL, "nothing to forward");
    wasm_ecds_string_free(reason);
    reason = NULL;
    CHECK(wasm_ecds_convert(cache, garbage, sizeof garbage, &out, NULL) == WASM_ECDS_REJECTED, "NULL reason ok");
    CHECK(wasm_ecds_convert_delta(cache, garbage, sizeof garbage, &out, &reason) == WASM_ECDS_REJECTED,
          "delta garbage rejected");
    CHECK(reason != NULL && strlen(reason) > 0, "with a reason");
    wasm_ecds_string_free(reason);
}

/* The absolute path of the module file named in converted bytes: the cache directory up to ".wasm". */
static int module_file_in(const wasm_ecds_bytes *out, const char *dir, char *path, size_t size) {
    const unsigned char *p = out->data ? memmem(out->data, out->len, dir, strlen(dir)) : NULL;
    const unsigned char *end = p ? memmem(p, out->len - (size_t)(p - out->data), ".wasm", 5) : NULL;
    if (!end || (size_t)(end + 5 - p) >= size) return 0;
    memcpy(path, p, (size_t)(end + 5 - p));
    path[end + 5 - p] = 0;
    return 1;
}

static void test_convert_fetches_once_and_rewrites(wasm_ecds_cache *cache, const char *dir) {
    char uri[128];
    module_uri(uri, sizeof uri);
    buf_t resp = ecds_response(uri, module_sha);
    int before = atomic_load(&requests_served);

    for (int round = 0; round < 3; round++) {
        wasm_ecds_bytes out = {NULL, 0};
        char *reason = NULL;
        int32_t status = wasm_ecds_convert(cache, resp.data, resp.len, &out, &reason);
        CHECK(status == WASM_ECDS_OK, "convert: %d %s", status, reason ? reason : "");
        CHECK(reason == NULL, "no reason on success");
        wasm_ecds_string_free(reason);
        if (status != WASM_ECDS_OK) return;
        CHECK(!contains(out.data, out.len, uri), "remote URI gone from the output");
        CHECK(contains(out.data, out.len, module_sha), "output names the content-addressed file");
        CHECK(contains(out.data, out.len, "nonce-7") && contains(out.data, out.len, "basic-auth"),
              "other fields kept");
        /* the local filename is an absolute path to a file holding the module */
        char path[512] = {0};
        struct stat st;
        CHECK(module_file_in(&out, dir, path, sizeof path) && stat(path, &st) == 0 &&
                  (size_t)st.st_size == sizeof MODULE,
              "module file %s", path);
        wasm_ecds_bytes_free(out);
    }
    CHECK(atomic_load(&requests_served) - before == 1, "one download for three conversions, got %d",
          atomic_load(&requests_served) - before);
}

static void test_convert_delta(wasm_ecds_cache *cache, const char *dir) {
    char uri[128];
    module_uri(uri, sizeof uri);
    buf_t resp = ecds_delta_response(uri, module_sha);
    wasm_ecds_bytes out = {NULL, 0};
    char *reason = NULL;
    int32_t status = wasm_ecds_convert_delta(cache, resp.data, resp.len, &out, &reason);
    CHECK(status == WASM_ECDS_OK, "convert_delta: %d %s", status, reason ? reason : "");
    wasm_ecds_string_free(reason);
    char path[512] = {0};
    CHECK(module_file_in(&out, dir, path, sizeof path), "delta output loads the module from the cache");
    CHECK(!contains(out.data, out.len, uri), "remote URI gone");
    CHECK(contains(out.data, out.len, "delta-nonce") && contains(out.data, out.len, "gone"),
          "nonce and removed names kept");
    wasm_ecds_bytes_free(out);
}

static void test_checksum_mismatch_rejects_and_nacks(wasm_ecds_cache *cache) {
    char uri[128];
    snprintf(uri, sizeof uri, "http://127.0.0.1:%d/module.wasm?other", server_port);
    buf_t resp = ecds_response(uri, "0000000000000000000000000000000000000000000000000000000000000000");
    wasm_ecds_bytes out = {NULL, 0};
    char *reason = NULL;
    atomic_store(&warnings_logged, 0);
    CHECK(wasm_ecds_convert(cache, resp.data, resp.len, &out, &reason) == WASM_ECDS_REJECTED, "mismatch rejected");
    CHECK(out.data == NULL, "nothing to forward");
    CHECK(reason != NULL && strstr(reason, uri) != NULL && strstr(reason, "ns.basic-auth") != NULL,
          "reason names resource and URL: %s", reason ? reason : "(null)");
    CHECK(reason != NULL && strstr(reason, "checksum") != NULL, "reason says checksum: %s", reason ? reason : "");
    CHECK(atomic_load(&warnings_logged) >= 1, "the rejection was logged through the callback");
    if (!reason) return;

    /* The NACK for it carries the rejection as error_detail */
    wasm_ecds_bytes nack = {NULL, 0};
    char *nack_reason = NULL;
    CHECK(wasm_ecds_nack(resp.data, resp.len, "v0", reason, &nack, &nack_reason) == WASM_ECDS_OK, "nack built");
    CHECK(nack_reason == NULL, "no reason on success");
    CHECK(contains(nack.data, nack.len, "nonce-7") && contains(nack.data, nack.len, ECDS_TYPE) &&
              contains(nack.data, nack.len, "v0"),
          "nack carries nonce, type and version");
    CHECK(contains(nack.data, nack.len, reason), "nack carries error_detail verbatim");
    CHECK(contains(nack.data, nack.len, "\x08\x0d"), "error_detail.code = 13");
    wasm_ecds_bytes_free(nack);
    wasm_ecds_string_free(reason);
}

static void test_nack_arguments(void) {
    buf_t resp = ecds_response(NULL, NULL);
    wasm_ecds_bytes out = {NULL, 0};
    char *reason = NULL;

    CHECK(wasm_ecds_nack(resp.data, resp.len, "v0", NULL, &out, &reason) == WASM_ECDS_INVALID_ARGUMENT,
          "NULL error_detail");
    CHECK(reason != NULL && strstr(reason, "error_detail") != NULL, "reason names it: %s", reason ? reason : "");
    wasm_ecds_string_free(reason);
    reason = NULL;
    CHECK(wasm_ecds_nack(resp.data, resp.len, NULL, "bad", &out, &reason) == WASM_ECDS_INVALID_ARGUMENT,
          "NULL last_acked_version");
    CHECK(reason != NULL && strstr(reason, "last_acked_version") != NULL, "reason names it");
    wasm_ecds_string_free(reason);
    reason = NULL;
    CHECK(wasm_ecds_nack(resp.data, resp.len, "v0", "\xff\xfe", &out, &reason) == WASM_ECDS_INVALID_ARGUMENT,
          "error_detail not UTF-8");
    CHECK(reason != NULL && strstr(reason, "UTF-8") != NULL, "reason says UTF-8: %s", reason ? reason : "");
    wasm_ecds_string_free(reason);
    reason = NULL;
    const uint8_t garbage[] = {0x12, 0x7f, 0x01};
    CHECK(wasm_ecds_nack(garbage, sizeof garbage, "v0", "bad", &out, &reason) == WASM_ECDS_INVALID_ARGUMENT,
          "unparsable response");
    CHECK(reason != NULL && strlen(reason) > 0, "with a reason");
    wasm_ecds_string_free(reason);
    CHECK(wasm_ecds_nack(resp.data, resp.len, "v0", "bad", NULL, NULL) == WASM_ECDS_INVALID_ARGUMENT, "NULL out");
    CHECK(wasm_ecds_nack(NULL, 3, "v0", "bad", &out, NULL) == WASM_ECDS_INVALID_ARGUMENT, "NULL response, len 3");
    CHECK(out.data == NULL && out.len == 0, "out untouched on failure");
}

static void test_nack_delta(void) {
    char uri[128];
    module_uri(uri, sizeof uri);
    buf_t resp = ecds_delta_response(uri, module_sha);
    const char *detail = "Wasm module download failed: the reason, verbatim";
    wasm_ecds_bytes out = {NULL, 0};
    char *reason = NULL;
    CHECK(wasm_ecds_nack_delta(resp.data, resp.len, detail, &out, &reason) == WASM_ECDS_OK, "delta nack built");
    CHECK(reason == NULL, "no reason on success");
    CHECK(contains(out.data, out.len, "delta-nonce") && contains(out.data, out.len, ECDS_TYPE), "nonce and type");
    CHECK(contains(out.data, out.len, detail), "error_detail verbatim");
    CHECK(contains(out.data, out.len, "\x08\x0d"), "error_detail.code = 13");
    wasm_ecds_bytes_free(out);

    out = (wasm_ecds_bytes){NULL, 0};
    CHECK(wasm_ecds_nack_delta(resp.data, resp.len, NULL, &out, &reason) == WASM_ECDS_INVALID_ARGUMENT,
          "NULL error_detail");
    CHECK(reason != NULL && strstr(reason, "error_detail") != NULL, "reason names it");
    wasm_ecds_string_free(reason);
    CHECK(wasm_ecds_nack_delta(resp.data, resp.len, detail, NULL, NULL) == WASM_ECDS_INVALID_ARGUMENT, "NULL out");
    CHECK(out.data == NULL, "out untouched on failure");
}

static void test_metrics(wasm_ecds_cache *cache) {
    char *m = wasm_ecds_metrics(cache);
    CHECK(m != NULL, "metrics");
    if (m) {
        CHECK(strstr(m, "# TYPE istio_agent_wasm_remote_fetch_count counter") != NULL, "typed");
        CHECK(strstr(m, "istio_agent_wasm_remote_fetch_count{result=\"success\"} 1\n") != NULL, "one success:\n%s", m);
        CHECK(strstr(m, "istio_agent_wasm_remote_fetch_count{result=\"checksum_mismatched\"} 1\n") != NULL, "one mismatch");
        CHECK(strstr(m, "istio_agent_wasm_cache_entries 1\n") != NULL, "one entry");
        CHECK(strstr(m, "istio_agent_wasm_config_conversion_duration_count ") != NULL, "histogram");
    }
    wasm_ecds_string_free(m);
}

static void test_purge_counts_removed_modules(void) {
    char dir[] = "/tmp/wasm-ecds-c-purge-XXXXXX";
    CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    wasm_ecds_cache *cache = open_cache(dir, ", \"module_expiry_secs\": 1");
    if (!cache) return;
    char uri[128];
    module_uri(uri, sizeof uri);
    buf_t with_module = ecds_response(uri, module_sha), without = ecds_response(NULL, NULL);
    wasm_ecds_bytes out = {NULL, 0};
    CHECK(wasm_ecds_convert(cache, with_module.data, with_module.len, &out, NULL) == WASM_ECDS_OK, "convert");
    wasm_ecds_bytes_free(out);

    uint64_t removed = 42;
    char *reason = NULL;
    CHECK(wasm_ecds_purge(cache, &removed, &reason) == WASM_ECDS_OK && removed == 0,
          "fresh module kept: removed %llu", (unsigned long long)removed);
    CHECK(reason == NULL, "no reason on success");

    /* the latest state no longer references it, and it expires */
    CHECK(wasm_ecds_convert(cache, without.data, without.len, &out, NULL) == WASM_ECDS_OK, "convert");
    wasm_ecds_bytes_free(out);
    usleep(1200 * 1000);
    removed = 42;
    CHECK(wasm_ecds_purge(cache, &removed, NULL) == WASM_ECDS_OK && removed == 1,
          "expired, unused module removed: removed %llu", (unsigned long long)removed);

    /* the cache directory vanishes: the index cannot be written */
    remove_tree(dir);
    removed = 42;
    int32_t status = wasm_ecds_purge(cache, &removed, &reason);
    CHECK(status == WASM_ECDS_IO_ERROR, "purge without a directory: status %d", status);
    CHECK(removed == 42, "removed untouched on failure");
    CHECK(reason != NULL && strstr(reason, dir) != NULL && strstr(reason, "No such file or directory") != NULL,
          "reason names the path and the OS error: %s", reason ? reason : "(null)");
    wasm_ecds_string_free(reason);
    CHECK(wasm_ecds_purge(cache, &removed, NULL) == WASM_ECDS_IO_ERROR, "NULL reason is fine");
    wasm_ecds_cache_free(cache);
}

static void sha256_hex_of_module(void) {
    /* Ask the library: a conversion with sha "nil" downloads and names the file by its digest. */
    char dir[] = "/tmp/wasm-ecds-c-sha-XXXXXX";
    CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    wasm_ecds_cache *c = open_cache(dir, "");
    char uri[128];
    module_uri(uri, sizeof uri);
    buf_t resp = ecds_response(uri, "nil");
    wasm_ecds_bytes out = {NULL, 0};
    CHECK(c && wasm_ecds_convert(c, resp.data, resp.len, &out, NULL) == WASM_ECDS_OK, "nil sha converts");
    /* the local filename starts with the cache directory and ends with <sha256>.wasm */
    char path[512] = {0};
    CHECK(module_file_in(&out, dir, path, sizeof path) && strlen(path) >= 64 + 5, "file named by digest");
    if (strlen(path) >= 64 + 5) memcpy(module_sha, path + strlen(path) - 5 - 64, 64);
    wasm_ecds_bytes_free(out);
    wasm_ecds_cache_free(c);
    remove_tree(dir);
    /* cross-check with sha256sum */
    FILE *mf = fopen("/tmp/wasm-ecds-c-module.bin", "wb");
    fwrite(MODULE, 1, sizeof MODULE, mf);
    fclose(mf);
    FILE *p = popen("sha256sum /tmp/wasm-ecds-c-module.bin", "r");
    char expect[65] = {0};
    CHECK(p && fread(expect, 1, 64, p) == 64, "sha256sum");
    if (p) pclose(p);
    CHECK(strcmp(expect, module_sha) == 0, "library digest %s equals sha256sum %s", module_sha, expect);
    unlink("/tmp/wasm-ecds-c-module.bin");
}

int main(void) {
    start_server();
    test_version();
    test_log_callback_levels();
    test_cache_new_invalid_arguments();
    test_cache_new_accepts_the_oci_options();
    test_cache_new_io_error();
    test_cache_new_null_options_means_defaults();

    sha256_hex_of_module();
    test_nack_arguments();
    test_nack_delta();
    test_purge_counts_removed_modules();

    char dir[] = "/tmp/wasm-ecds-c-XXXXXX";
    CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    wasm_ecds_cache *cache = open_cache(dir, ", \"max_attempts\": 1");
    if (cache) {
        test_null_arguments(cache);
        test_empty_and_malformed(cache);
        test_convert_fetches_once_and_rewrites(cache, dir);
        test_convert_delta(cache, dir);
        test_checksum_mismatch_rejects_and_nacks(cache);
        test_metrics(cache);
        wasm_ecds_cache_free(cache);
    }
    CHECK(wasm_ecds_set_log_callback(NULL, 0, NULL) == WASM_ECDS_OK, "logging off");
    remove_tree(dir);
    stop_server();
    printf("%d passed, %d failed\n", checks - failures, failures);
    return failures == 0 ? 0 : 1;
}
