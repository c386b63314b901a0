"""The cache-hit conversion through the C ABI from Python ctypes (direct calls to libwasm_ecds.so), measured
like the Rust and C drivers: warm-up, calibration to ~3 ms samples, 41 samples, median and spread, minor page
faults per call.
usage: capi_bench.py LIBWASM_ECDS_SO CACHE_DIR RESPONSE_FILE"""
import ctypes
import json
import resource
import sys
import time


class Bytes(ctypes.Structure):
    _fields_ = [("data", ctypes.POINTER(ctypes.c_uint8)), ("len", ctypes.c_size_t)]


def main():
    lib_path, cache_dir, response_file = sys.argv[1:4]
    lib = ctypes.CDLL(lib_path)
    lib.wasm_ecds_cache_new.restype = ctypes.c_int32
    lib.wasm_ecds_cache_new.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p),
                                        ctypes.POINTER(ctypes.c_char_p)]
    lib.wasm_ecds_cache_free.argtypes = [ctypes.c_void_p]
    lib.wasm_ecds_convert.restype = ctypes.c_int32
    lib.wasm_ecds_convert.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
                                      ctypes.POINTER(Bytes), ctypes.POINTER(ctypes.c_void_p)]
    lib.wasm_ecds_bytes_free.argtypes = [Bytes]
    lib.wasm_ecds_bytes_free.restype = None

    with open(response_file, "rb") as f:
        response = f.read()
    t0 = time.perf_counter()
    cache, reason = ctypes.c_void_p(), ctypes.c_char_p()
    status = lib.wasm_ecds_cache_new(json.dumps({"cache_dir": cache_dir}).encode(), ctypes.byref(cache),
                                     ctypes.byref(reason))
    if status != 0:
        sys.exit("cache_new failed (%d): %s" % (status, reason.value))
    convert, free = lib.wasm_ecds_convert, lib.wasm_ecds_bytes_free
    n_resp = len(response)

    def run(n):
        out = Bytes()
        reason = ctypes.c_void_p()
        for _ in range(n):
            rc = convert(cache, response, n_resp, ctypes.byref(out), ctypes.byref(reason))
            if rc != 0:
                sys.exit("convert failed: %d" % rc)
            # what a caller does with the result: take the bytes, free the library's copy
            data = ctypes.string_at(out.data, out.len)
            free(out)
        return data

    run(1)
    first = time.perf_counter() - t0
    start = time.perf_counter_ns()
    done, n = 0, 1
    while time.perf_counter_ns() - start < 300e6:
        run(n)
        done += n
        n = min(n * 2, 1 << 20)
    per = (time.perf_counter_ns() - start) / done
    iters = int(3e6 / per) + 1
    samples, faults = [], []
    for _ in range(41):
        f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter_ns()
        run(iters)
        samples.append((time.perf_counter_ns() - t) / iters)
        faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f) / iters)
    samples.sort()
    faults.sort()
    pick = lambda p: samples[round((len(samples) - 1) * p)]
    print(json.dumps({"median_ns": pick(0.5), "p10_ns": pick(0.1), "p90_ns": pick(0.9), "min_ns": samples[0],
                      "faults_per_iter": faults[len(faults) // 2], "samples": len(samples), "iters_per_sample": iters,
                      "open_and_first_convert_secs": first}))
    lib.wasm_ecds_cache_free(cache)


if __name__ == "__main__":
    main()
