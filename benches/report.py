"""Builds the one table of ratios from the raw JSON of benches/run.sh and writes results.json.
usage: report.py RAW_DIR RESULTS_JSON"""
import glob
import json
import os
import platform
import statistics
import subprocess
import sys

raw, out_path = sys.argv[1], sys.argv[2]


def load(name):
    try:
        with open(os.path.join(raw, name)) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        return {"error": "missing: %s" % e}


def reps(prefix):
    return [load(os.path.basename(p)) for p in sorted(glob.glob(os.path.join(raw, prefix + "_*.json")))]


def cmd(*args):
    try:
        return subprocess.run(args, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return "?"


def read_text(p):
    try:
        return " ".join(open(p).read().split()[:3])
    except OSError:
        return "?"


def machine():
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {
        "nproc": cmd("nproc"),
        "cpu_model": model,
        "mem_total_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "rustc": cmd("rustc", "-V"),
        "commit": cmd("git", "rev-parse", "--short", "HEAD"),
        "loadavg_start": read_text(os.path.join(os.path.dirname(out_path), "loadavg_start.txt")),
        "loadavg_end": read_text(os.path.join(os.path.dirname(out_path), "loadavg_end.txt")),
    }


rows = []


def row(figure, value, unit, baseline, base_value, ratio, target, ok, bound_by, spread=""):
    rows.append({
        "figure": figure, "value": value, "unit": unit, "baseline": baseline, "baseline_value": base_value,
        "ratio": ratio, "target": target, "pass": ok, "spread": spread, "bound_by": bound_by,
    })


def err_row(figure, target, why):
    rows.append({"figure": figure, "value": None, "unit": "", "baseline": "", "baseline_value": None,
                 "ratio": None, "target": target, "pass": None, "spread": "", "error": str(why)[:200]})


def us(ns):
    return round(ns / 1000.0, 2)


def spread_ns(s):
    return "p10-p90 %.1f-%.1f us" % (s["p10_ns"] / 1000, s["p90_ns"] / 1000)


def med(values):
    return statistics.median(values) if values else None


def secs_of(runs):
    good = [r["secs"] for r in runs if "secs" in r]
    return good


def spread_s(values):
    return "min-max %.3f-%.3f s (n=%d)" % (min(values), max(values), len(values)) if values else ""


# ---- micro figures ----
micro = load("micro.json")
st = micro.get("stats", {})
lib_err = micro.get("error") or micro.get("sanity", {}).get("library_error")


def micro_ratio(figure, a, b, target_ratio, bound, scale_a=1.0, scale_b=1.0, unit="us"):
    if a not in st or b not in st:
        err_row(figure, "<= %sx" % target_ratio, lib_err or "not measured")
        return
    va, vb = st[a]["median_ns"] * scale_a, st[b]["median_ns"] * scale_b
    r = va / vb
    if target_ratio is None:  # information only
        row(figure, us(va), unit, b, us(vb), round(r, 3), "-", None, bound, spread_ns(st[a]))
    else:
        row(figure, us(va), unit, b, us(vb), round(r, 3), "<= %gx" % target_ratio, r <= target_ratio, bound,
            spread_ns(st[a]))


micro_ratio("cache-hit typical (20 res) vs copy", "hit_typical", "copy_typical", 10,
            "one comparison of the resources with the kept span, one copy of the converted span, 20 store hits")
micro_ratio("cache-hit typical vs prost decode+encode", "hit_typical", "prost_typical", 0.25,
            "prost allocates every string and nested message; a repeated push is compared and copied")
micro_ratio("pass-through (50 non-Wasm) vs copy", "hit_pass", "copy_pass", 3,
            "an exact comparison of the resources with the kept ones, the copy out, two TSC reads (= floor_pass), "
            "then envelope checks, the memo lock and the counters")
micro_ratio("pass-through floor: compare + copy + 2 TSC reads (info)", "floor_pass", "copy_pass", None,
            "the least an exact pass-through that records its duration can do")
if "hit_large" in st and "hit_typical_again" in st:
    per_large = st["hit_large"]["median_ns"] / 200
    per_typ = st["hit_typical_again"]["median_ns"] / 20
    r = per_large / per_typ
    row("large (200 res): per-resource vs typical", us(per_large), "us/res", "typical per resource", us(per_typ),
        round(r, 3), "<= 1.2x", r <= 1.2, "linear in bytes: same work per resource; cache-size effects only")
else:
    err_row("large (200 res): per-resource vs typical", "<= 1.2x", lib_err or "not measured")
for a, b, what in (("hit_large", "copy_large", "large vs copy (info)"), ("hit_large", "prost_large", "large vs prost (info)")):
    if a in st and b in st:
        r = st[a]["median_ns"] / st[b]["median_ns"]
        row(what, us(st[a]["median_ns"]), "us", b, us(st[b]["median_ns"]), round(r, 3), "-", None, "", spread_ns(st[a]))
micro_ratio("changed push: all 20 typical resources new, modules cached, vs prost (info)", "changed_typical",
            "prost_typical_changed", None,
            "every resource analysed and rewritten (10 TypedStruct decoded and re-encoded as Wasm), 20 store hits: "
            "what Istio's agent does on every push")
for a, b, what in (("hit_direct20", "copy_direct20", "breakdown: 20 direct Wasm vs copy (info)"),
                   ("hit_struct20", "copy_struct20", "breakdown: 20 TypedStruct vs copy (info)")):
    if a in st and b in st:
        r = st[a]["median_ns"] / st[b]["median_ns"]
        row(what, us(st[a]["median_ns"]), "us", b, us(st[b]["median_ns"]), round(r, 3), "-", None, "", spread_ns(st[a]))
for name in ("copy_typical", "prost_typical", "copy_pass", "copy_large", "prost_large"):
    if name in st:
        row("baseline " + name, us(st[name]["median_ns"]), "us", "-", None, None, "-", None, "", spread_ns(st[name]))

# ---- cold fetch ----
lib = secs_of(reps("cold_lib"))
curl = secs_of(reps("cold_curl"))
if lib and curl:
    r = med(lib) / med(curl)
    row("cold fetch 64 MiB vs curl+sha256sum", round(med(lib), 3), "s", "curl -o + sha256sum", round(med(curl), 3),
        round(r, 3), "<= 1.0x", r <= 1.0, "loopback transfer + SHA-256 (+ fsync of the stored file)", spread_s(lib))
else:
    err_row("cold fetch 64 MiB vs curl+sha256sum", "<= 1.0x", [r.get("error") for r in reps("cold_lib")][:1])

# ---- memory ----
mem = load("mem.json")
if "growth_mib" in mem:
    g = mem["growth_mib"]
    time_max = None
    try:
        time_max = int(open(os.path.join(raw, "mem_time.txt")).read().strip().splitlines()[-1])
    except Exception:
        pass
    row("memory: cold fetch 256 MiB, peak RSS growth", round(g, 2), "MiB", "VmHWM before fetch",
        round(mem["hwm_before_kib"] / 1024, 1), None, "<= 16 MiB", g <= 16,
        "streaming buffers only (socket read buffer + write buffer + hasher)",
        "VmHWM after %.1f MiB; /usr/bin/time max RSS %s MiB; fetch %.2f s" %
        (mem["hwm_after_kib"] / 1024, round(time_max / 1024, 1) if time_max else "?", mem["secs"]))
else:
    err_row("memory: cold fetch 256 MiB, peak RSS growth", "<= 16 MiB", mem.get("error"))

# ---- fan-in ----
f16, f1 = reps("fanin16"), reps("fanin1")
s16, s1 = secs_of(f16), secs_of(f1)
if s16 and s1:
    downloads = [r["downloads"] for r in f16]
    oks = [r["ok"] == r["threads"] for r in f16]
    r = med(s16) / med(s1)
    row("fan-in: 16 threads vs 1 (200 ms latency)", round(med(s16), 3), "s", "1 thread", round(med(s1), 3), round(r, 3),
        "<= 1.2x, 1 download", r <= 1.2 and all(d == 1 for d in downloads) and all(oks),
        "the server's 200 ms latency: one download, others wait on it", spread_s(s16) + "; downloads per rep %s" % downloads)
else:
    err_row("fan-in: 16 threads vs 1 (200 ms latency)", "<= 1.2x, 1 download", (f16 or [{}])[0].get("error"))

# ---- fan-out ----
o8, o1 = secs_of(reps("fanout8")), secs_of(reps("fanout1"))
if o8 and o1:
    r = med(o8) / med(o1)
    row("fan-out: 8 slow modules vs 1", round(med(o8), 3), "s", "1 module", round(med(o1), 3), round(r, 3), "<= 1.5x",
        r <= 1.5, "the 200 ms latency, if the 8 fetches run concurrently", spread_s(o8))
else:
    err_row("fan-out: 8 slow modules vs 1", "<= 1.5x", (reps("fanout8") or [{}])[0].get("error"))

# ---- warm restart ----
wd, wr = reps("warm_download"), reps("warm_restart")
sd, sr = secs_of(wd), secs_of(wr)
if sd and sr:
    r = med(sr) / med(sd)
    row("warm restart: 20 x 4 MiB, new process vs downloader", round(med(sr), 3), "s", "downloading process",
        round(med(sd), 3), round(r, 3), "<= 0.5x", r <= 0.5 and all(x.get("downloads") == 0 for x in wr),
        "re-hashing 80 MiB from the page cache (SHA-256) vs transfer + hash + write",
        spread_s(sr) + "; restart downloads %s" % [x.get("downloads") for x in wr])
else:
    err_row("warm restart: 20 x 4 MiB, new process vs downloader", "<= 0.5x", (wd or [{}])[0].get("error"))

# ---- C ABI ----
def abi(prefix):
    runs = [r for r in reps(prefix) if "median_ns" in r]
    if not runs:
        return {"error": (reps(prefix) or [{"error": "missing"}])[0].get("error")}
    meds = [r["median_ns"] for r in runs]
    return {"median_ns": med(meds), "p10_ns": min(r["p10_ns"] for r in runs), "p90_ns": max(r["p90_ns"] for r in runs),
            "runs": meds}


for input, what in (("typical", "typical hit"), ("pass", "pass-through")):
    ar, ac, ap = abi("abi_rust_" + input), abi("abi_c_" + input), abi("abi_py_" + input)
    if "median_ns" in ar:
        base = ar["median_ns"]
        row("ABI %s: Rust Cache::convert" % what, us(base), "us", "-", None, 1.0, "-", None, "", spread_ns(ar))
        for name, d, bound in (("ABI %s: C wasm_ecds_convert" % what, ac, "the same call plus the C-side free"),
                               ("ABI %s: Python ctypes" % what, ap, "ctypes marshalling + string_at copy into bytes")):
            if "median_ns" in d:
                r = d["median_ns"] / base
                row(name, us(d["median_ns"]), "us", "Rust call", us(base), round(r, 3), "-", None, bound, spread_ns(d))
            else:
                err_row(name, "-", d.get("error"))
    else:
        err_row("ABI %s: Rust / C / Python" % what, "-", ar.get("error"))

result = {"machine": machine(), "figures": rows,
          "raw": {os.path.basename(p)[:-5]: load(os.path.basename(p)) for p in sorted(glob.glob(os.path.join(raw, "*.json")))}}
with open(out_path, "w") as f:
    json.dump(result, f, indent=2)

# ---- the table ----
m = result["machine"]
print("\nwasm-ecds benchmarks: %s x %s, %s GiB, %s, %s, commit %s, load avg %s -> %s" %
      (m["nproc"], m["cpu_model"], m["mem_total_gib"], m["kernel"], m["rustc"], m["commit"], m["loadavg_start"],
       m["loadavg_end"]))
hdr = ("figure", "value", "baseline", "ratio", "target", "result")
lines = []
for r in rows:
    if r.get("error") is not None:
        lines.append((r["figure"], "-", "-", "-", r["target"], "ERROR: " + r["error"][:60]))
        continue
    v = "%s %s" % (r["value"], r["unit"])
    b = "" if r["baseline_value"] is None else "%s %s" % (r["baseline_value"], "us" if r["unit"].startswith("us") else r["unit"] if r["unit"] != "MiB" else "MiB")
    ratio = "" if r["ratio"] is None else "%.3fx" % r["ratio"]
    res = "" if r["pass"] is None else ("PASS" if r["pass"] else "MISS")
    lines.append((r["figure"], v, b, ratio, r["target"], res))
w = [max(len(str(x[i])) for x in lines + [hdr]) for i in range(len(hdr))]
print("  ".join(h.ljust(w[i]) for i, h in enumerate(hdr)))
print("  ".join("-" * w[i] for i in range(len(hdr))))
for x in lines:
    print("  ".join(str(c).ljust(w[i]) for i, c in enumerate(x)))
print("\nresults: %s" % out_path)
