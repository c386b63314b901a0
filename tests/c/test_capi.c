/*
 * The C API from C: every entry point, its argument checks and its ownership rules, against a real HTTP
 * server on 127.0.0.1. Built with -Wall -Wextra -Werror -pedantic and run under AddressSanitizer (which
 * includes LeakSanitizer) by `make test-c`.
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

/* DiscoveryResponse with one HTTP Wasm filter whose module is remote. */
static buf_t ecds_response(const char *uri, const char *sha256) {
    buf_t http_uri = {0}, remote = {0}, code = {0}, vm = {0}, plugin = {0}, wasm = {0}, any = {0}, tec = {0},
          res = {0}, resp = {0}, timeout = {0};
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
    put_str(&res, 1, ECDS_TYPE);
    put_msg(&res, 2, &tec);
    put_str(&resp, 1, "v1");
    put_msg(&resp, 2, &res);
    put_str(&resp, 4, ECDS_TYPE);
    put_str(&resp, 5, "nonce-7");
    return resp;
}

static int contains(const unsigned char *hay, size_t len, const char *needle) {
    return memmem(hay, len, needle, strlen(needle)) != NULL;
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
}

static void test_bad_options(void) {
    char *error = NULL;
    wasm_ecds_cache *c = wasm_ecds_cache_new("{\"cache_dirr\": \"/tmp/x\"}", &error);
    CHECK(c == NULL, "unknown key refused");
    CHECK(error != NULL && strstr(error, "cache_dirr") != NULL, "error names the key: %s", error ? error : "(null)");
    wasm_ecds_string_free(error);

    error = NULL;
    c = wasm_ecds_cache_new("{not json", &error);
    CHECK(c == NULL && error != NULL, "bad JSON refused");
    wasm_ecds_string_free(error);

    CHECK(wasm_ecds_cache_new("{\"max_attempts\": 0}", NULL) == NULL, "NULL error pointer is fine");
    wasm_ecds_cache_free(NULL);
    wasm_ecds_string_free(NULL);
    wasm_ecds_bytes_free((wasm_ecds_bytes){NULL, 0});
}

static void test_null_arguments(wasm_ecds_cache *cache) {
    wasm_ecds_bytes out = {NULL, 0};
    char *reason = NULL;
    CHECK(wasm_ecds_convert(NULL, (const uint8_t *)"", 0, &out, &reason) == WASM_ECDS_INVALID_ARGUMENT, "NULL cache");
    CHECK(reason != NULL && strstr(reason, "cache") != NULL, "reason names the cache");
    wasm_ecds_string_free(reason);
    reason = NULL;
    CHECK(wasm_ecds_convert(cache, NULL, 5, &out, &reason) == WASM_ECDS_INVALID_ARGUMENT, "NULL data, len 5");
    wasm_ecds_string_free(reason);
    CHECK(wasm_ecds_convert(cache, (const uint8_t *)"", 0, NULL, NULL) == WASM_ECDS_INVALID_ARGUMENT, "NULL out");
    CHECK(wasm_ecds_convert_delta(NULL, NULL, 0, &out, NULL) == WASM_ECDS_INVALID_ARGUMENT, "delta NULL cache");
    CHECK(wasm_ecds_metrics(NULL) == NULL, "metrics of NULL");
    CHECK(wasm_ecds_purge(NULL) == WASM_ECDS_INVALID_ARGUMENT, "purge of NULL");
    CHECK(wasm_ecds_nack(NULL, 0, NULL, "r", &out) == WASM_ECDS_INVALID_ARGUMENT, "nack NULL version");
    CHECK(out.data == NULL && out.len == 0, "out untouched on failure");
}

static void test_empty_and_malformed(wasm_ecds_cache *cache) {
    wasm_ecds_bytes out = {NULL, 0};
    char *reason = NULL;
    CHECK(wasm_ecds_convert(cache, NULL, 0, &out, &reason) == WASM_ECDS_OK, "empty response converts");
    CHECK(out.len == 0, "to empty bytes");
    wasm_ecds_bytes_free(out);

    const uint8_t garbage[] = {0x12, 0x7f, 0x01};
    CHECK(wasm_ecds_convert(cache, garbage, sizeof garbage, &out, &reason) == WASM_ECDS_REJECTED, "garbage rejected");
    CHECK(reason != NULL && strlen(reason) > 0, "with a reason");
    wasm_ecds_string_free(reason);
    reason = NULL;
    /* reason may be NULL */
    CHECK(wasm_ecds_convert(cache, garbage, sizeof garbage, &out, NULL) == WASM_ECDS_REJECTED, "NULL reason ok");
}

static void test_convert_fetches_once_and_rewrites(wasm_ecds_cache *cache) {
    char uri[128];
    snprintf(uri, sizeof uri, "http://127.0.0.1:%d/module.wasm", server_port);
    buf_t resp = ecds_response(uri, module_sha);
    int before = atomic_load(&requests_served);

    for (int round = 0; round < 3; round++) {
        wasm_ecds_bytes out = {NULL, 0};
        char *reason = NULL;
        int32_t status = wasm_ecds_convert(cache, resp.data, resp.len, &out, &reason);
        CHECK(status == WASM_ECDS_OK, "convert: %d %s", status, reason ? reason : "");
        wasm_ecds_string_free(reason);
        if (status != WASM_ECDS_OK) return;
        CHECK(!contains(out.data, out.len, uri), "remote URI gone from the output");
        CHECK(contains(out.data, out.len, module_sha), "output names the content-addressed file");
        CHECK(contains(out.data, out.len, "nonce-7") && contains(out.data, out.len, "basic-auth"),
              "other fields kept");
        /* the local filename is an absolute path to a file holding the module */
        const unsigned char *p = memmem(out.data, out.len, "/tmp/wasm-ecds-c-", 17);
        char path[512] = {0};
        size_t i = 0;
        const unsigned char *end = p ? memmem(p, out.len - (size_t)(p - out.data), ".wasm", 5) : NULL;
        while (end && p + i < end + 5 && i < sizeof path - 1) {
            path[i] = (char)p[i];
            i++;
        }
        struct stat st;
        CHECK(stat(path, &st) == 0 && (size_t)st.st_size == sizeof MODULE, "module file %s", path);
        wasm_ecds_bytes_free(out);
    }
    CHECK(atomic_load(&requests_served) - before == 1, "one download for three conversions, got %d",
          atomic_load(&requests_served) - before);
}

static void test_checksum_mismatch_rejects(wasm_ecds_cache *cache) {
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

    /* The NACK for it */
    wasm_ecds_bytes nack = {NULL, 0};
    CHECK(wasm_ecds_nack(resp.data, resp.len, "v0", reason ? reason : "x", &nack) == WASM_ECDS_OK, "nack built");
    CHECK(contains(nack.data, nack.len, "nonce-7") && contains(nack.data, nack.len, ECDS_TYPE) &&
              contains(nack.data, nack.len, "v0"),
          "nack carries nonce, type and version");
    CHECK(contains(nack.data, nack.len, "\x08\x0d"), "error_detail.code = 13");
    wasm_ecds_bytes_free(nack);
    wasm_ecds_string_free(reason);
}

static void test_metrics_and_purge(wasm_ecds_cache *cache) {
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
    CHECK(wasm_ecds_purge(cache) == 0, "nothing expired yet");
}

static void sha256_hex_of_module(void) {
    /* Ask the library: a conversion with sha "nil" downloads and names the file by its digest. */
    char dir[] = "/tmp/wasm-ecds-c-sha-XXXXXX";
    CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    char opts[256];
    snprintf(opts, sizeof opts, "{\"cache_dir\": \"%s\"}", dir);
    wasm_ecds_cache *c = wasm_ecds_cache_new(opts, NULL);
    char uri[128];
    snprintf(uri, sizeof uri, "http://127.0.0.1:%d/module.wasm", server_port);
    buf_t resp = ecds_response(uri, "nil");
    wasm_ecds_bytes out = {NULL, 0};
    CHECK(c && wasm_ecds_convert(c, resp.data, resp.len, &out, NULL) == WASM_ECDS_OK, "nil sha converts");
    /* the local filename starts with the cache directory and ends with <sha256>.wasm */
    const unsigned char *f = out.data ? memmem(out.data, out.len, dir, strlen(dir)) : NULL;
    const unsigned char *w = f ? memmem(f, out.len - (size_t)(f - out.data), ".wasm", 5) : NULL;
    CHECK(w != NULL && w - f >= 64, "file named by digest");
    if (w) memcpy(module_sha, w - 64, 64);
    wasm_ecds_bytes_free(out);
    wasm_ecds_cache_free(c);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    CHECK(system(cmd) == 0, "cleanup");
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
    test_bad_options();
    CHECK(wasm_ecds_set_log_callback(on_log, WASM_ECDS_LOG_WARN, &warnings_logged) == WASM_ECDS_OK, "log cb");
    CHECK(wasm_ecds_set_log_callback(on_log, 99, NULL) == WASM_ECDS_INVALID_ARGUMENT, "bad level");

    sha256_hex_of_module();

    char dir[] = "/tmp/wasm-ecds-c-XXXXXX";
    CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    char opts[256];
    snprintf(opts, sizeof opts, "{\"cache_dir\": \"%s\", \"max_attempts\": 1}", dir);
    char *error = NULL;
    wasm_ecds_cache *cache = wasm_ecds_cache_new(opts, &error);
    CHECK(cache != NULL, "cache_new: %s", error ? error : "");
    wasm_ecds_string_free(error);
    if (cache) {
        test_null_arguments(cache);
        test_empty_and_malformed(cache);
        test_convert_fetches_once_and_rewrites(cache);
        test_checksum_mismatch_rejects(cache);
        test_metrics_and_purge(cache);
        wasm_ecds_cache_free(cache);
    }
    wasm_ecds_set_log_callback(NULL, 0, NULL);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    CHECK(system(cmd) == 0, "cleanup");
    stop_server();
    printf("%d passed, %d failed\n", checks - failures, failures);
    return failures == 0 ? 0 : 1;
}
