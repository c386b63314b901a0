/* The cache-hit conversion through the C ABI: same method as the Rust side (benches/ecds/measure.rs):
 * warm-up, calibration to ~3 ms samples, 41 samples, median and spread, minor page faults per call.
 * Prints one JSON object.
 * usage: capi_bench CACHE_DIR RESPONSE_FILE */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/resource.h>
#include "wasm_ecds.h"

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static wasm_ecds_cache *cache;
static unsigned char *resp;
static size_t resp_len;

static void run(long n) {
    for (long i = 0; i < n; i++) {
        wasm_ecds_bytes out;
        char *reason = NULL;
        int32_t rc = wasm_ecds_convert(cache, resp, resp_len, &out, &reason);
        if (rc != WASM_ECDS_OK) {
            fprintf(stderr, "convert failed (%d): %s\n", rc, reason ? reason : "?");
            exit(1);
        }
        wasm_ecds_bytes_free(out);
    }
}

static long minor_faults(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return u.ru_minflt;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s CACHE_DIR RESPONSE_FILE\n", argv[0]); return 2; }
    FILE *f = fopen(argv[2], "rb");
    if (!f) { perror("response"); return 1; }
    fseek(f, 0, SEEK_END);
    resp_len = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    resp = malloc(resp_len);
    if (fread(resp, 1, resp_len, f) != resp_len) { perror("read"); return 1; }
    fclose(f);

    char opts[4096];
    snprintf(opts, sizeof opts, "{\"cache_dir\": \"%s\"}", argv[1]);
    double t0 = now_ns();
    char *reason = NULL;
    int32_t status = wasm_ecds_cache_new(opts, &cache, &reason);
    if (status != WASM_ECDS_OK) {
        fprintf(stderr, "cache_new failed (%d): %s\n", status, reason ? reason : "?");
        return 1;
    }
    run(1);
    double first = (now_ns() - t0) / 1e9;

    /* warm-up 300 ms, doubling batches */
    double start = now_ns();
    long done = 0, n = 1;
    while (now_ns() - start < 300e6) { run(n); done += n; if (n < (1 << 20)) n *= 2; }
    double per = (now_ns() - start) / (double)done;
    long iters = (long)(3e6 / per) + 1;

    enum { ROUNDS = 41 };
    double s[ROUNDS], faults[ROUNDS];
    for (int r = 0; r < ROUNDS; r++) {
        long f = minor_faults();
        double t = now_ns();
        run(iters);
        s[r] = (now_ns() - t) / (double)iters;
        faults[r] = (double)(minor_faults() - f) / (double)iters;
    }
    qsort(s, ROUNDS, sizeof s[0], cmp);
    qsort(faults, ROUNDS, sizeof faults[0], cmp);
    printf("{\"median_ns\": %.1f, \"p10_ns\": %.1f, \"p90_ns\": %.1f, \"min_ns\": %.1f, \"faults_per_iter\": %.2f, "
           "\"samples\": %d, \"iters_per_sample\": %ld, \"open_and_first_convert_secs\": %.6f}\n",
           s[ROUNDS / 2], s[(int)((ROUNDS - 1) * 0.1 + 0.5)], s[(int)((ROUNDS - 1) * 0.9 + 0.5)], s[0],
           faults[ROUNDS / 2], ROUNDS, iters, first);
    wasm_ecds_cache_free(cache);
    free(resp);
    return 0;
}
