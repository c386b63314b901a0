"""Builds the one table of ratios from the raw JSON of benches/run.sh; writes results.json and table.md.
usage: report.py RAW_DIR RESULTS_JSON

Every ratio is taken inside one process (in-process figures) or between runs that alternate (process
figures); the table gives the median over the REPS repetitions and the range of the per-repetition ratios."""
import glob
import json
import os
import platform
import statistics
import subprocess
import sys

raw, out_path = sys.argv[1], sys.argv[2]
out_dir = os.path.dirname(out_path)


def load(name):
    try:
        with open(os.path.join(raw, name)) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        return {"error": "missing: %s" % e}


def reps(prefix):
    return [load(os.path.basename(p)) for p in sorted(glob.glob(os.path.join(raw, prefix + "_[0-9]*.json")))]


def cmd(*args):
    try:
        return subprocess.run(args, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
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
    try:
        loads = [float(line.split()[0]) for line in open(os.path.join(out_dir, "loadavg.txt"))]
    except (OSError, ValueError, IndexError):
        loads = []
    return {
        "nproc": cmd("nproc"),
        "cpu_model": model,
        "mem_total_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "rustc": cmd("rustc", "-V"),
        "commit": cmd("git", "rev-parse", "--short", "HEAD"),
        "worktree_dirty": cmd("git", "status", "--porcelain", "--untracked-files=no", "--", "src", "benches",
                              "tests/kit", "Cargo.toml", "Cargo.lock", "build.rs") not in ("", "?"),
        "load_1min_min": min(loads) if loads else None,
        "load_1min_max": max(loads) if loads else None,
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


def med(values):
    return statistics.median(values) if values else None


def ratio_range(ratios):
    return "ratio %.2f-%.2fx over %d runs" % (min(ratios), max(ratios), len(ratios)) if len(ratios) > 1 else ""


# ---- in-process figures: each group ran REPS times, each time in a fresh process ----
prepare = load("prepare.json")


def micro_runs(group):
    return [r for r in reps("micro_" + group) if "stats" in r]


def micro_error(group):
    runs = reps("micro_" + group)
    return prepare.get("error") or next((r["error"] for r in runs if "error" in r), "not measured")


def micro_ratio(figure, group, a, b, target, bound, per=(1, 1), unit="us", baseline=None):
    """a / b inside each process of `group`; per: divide a and b by these counts (per-resource figures)."""
    runs = [r for r in micro_runs(group) if a in r["stats"] and b in r["stats"]]
    target_text = "<= %gx" % target if target else "-"
    if not runs:
        err_row(figure, target_text, micro_error(group))
        return
    va = [r["stats"][a]["median_ns"] / per[0] for r in runs]
    vb = [r["stats"][b]["median_ns"] / per[1] for r in runs]
    ratios = [x / y for x, y in zip(va, vb)]
    downloads = [r.get("measured_downloads") for r in runs]
    faults = "page faults per call %.1f vs %.1f" % (med([r["stats"][a]["faults_per_iter"] for r in runs]) / per[0],
                                                   med([r["stats"][b]["faults_per_iter"] for r in runs]) / per[1])
    spread = "; ".join(x for x in (ratio_range(ratios), faults) if x)
    ok = None
    if target:
        ok = med(ratios) <= target and all(d == 0 for d in downloads)
        if any(d != 0 for d in downloads):
            spread += "; downloads while measuring %s (must be 0)" % downloads
    row(figure, round(med(va) / 1000, 2), unit, baseline or b, round(med(vb) / 1000, 2), round(med(ratios), 3),
        target_text, ok, bound, spread)


micro_ratio("cache-hit typical (20 res) vs prost decode+encode", "typical", "hit_typical", "prost_typical", 2.5,
            "every resource validated and analysed; 10 TypedStructs decoded into a tree and encoded as Wasm; "
            "20 store hits; 20 rewrites spliced into the response")
micro_ratio("cache-hit typical vs copy (info)", "typical", "hit_typical", "copy_typical", None,
            "the copy is one allocation and memcpy")
micro_ratio("pass-through (50 non-Wasm) vs copy (info)", "pass", "hit_pass", "copy_pass", None,
            "every resource validated and analysed, then the input copied out")
micro_ratio("pass-through (50 non-Wasm) vs prost (info)", "pass", "hit_pass", "prost_pass", None,
            "prost decodes each TypedExtensionConfig; RBAC and router configs stay bytes")
micro_ratio("large (200 res) per resource vs typical per resource (info)", "large", "hit_large", "hit_typical_again",
            None, "the same work per resource, ten times over", per=(200, 20), unit="us/res",
            baseline="hit_typical (same process) / 20")
micro_ratio("cache-hit typical vs prost, in the large group's process (info)", "large", "hit_typical_again",
            "prost_typical_again", None, "as the headline, in a process whose malloc no longer trims its heap")
micro_ratio("large vs prost (info)", "large", "hit_large", "prost_large", None, "")
micro_ratio("large vs copy (info)", "large", "hit_large", "copy_large", None, "")
micro_ratio("direct Wasm only (20 res) vs prost (info)", "variants", "hit_direct20", "prost_direct20", None,
            "validation, analysis, 20 store hits and rewrites; no Struct")
micro_ratio("TypedStruct only (20 res) vs prost (info)", "variants", "hit_struct20", "prost_struct20", None,
            "as direct, plus each Struct validated, decoded into a tree and encoded as Wasm")


def secs_of(runs):
    return [r["secs"] for r in runs if "secs" in r]


def spread_s(values):
    return "min-max %.3f-%.3f s (n=%d)" % (min(values), max(values), len(values)) if values else ""


# ---- cold fetch ----
lib, curl = secs_of(reps("cold_lib")), secs_of(reps("cold_curl"))
if lib and curl:
    r = med(lib) / med(curl)
    row("cold fetch 64 MiB vs curl+sha256sum", round(med(lib), 3), "s", "curl -o + sha256sum", round(med(curl), 3),
        round(r, 3), "<= 1x", r <= 1.0, "loopback transfer + SHA-256 while writing + fsync of the stored file",
        spread_s(lib) + "; curl " + spread_s(curl))
else:
    err_row("cold fetch 64 MiB vs curl+sha256sum", "<= 1x", [r.get("error") for r in reps("cold_lib")][:1])

# ---- OCI cold pull: the library vs skopeo copy of the same image from the same registry ----
OCI_FIGURE = "OCI cold pull 16 MiB vs skopeo copy dir:"
ol, sk = reps("oci_lib"), reps("oci_skopeo")
lib, sko = secs_of(ol), secs_of(sk)
if lib and sko:
    r = med(lib) / med(sko)
    same = all(x.get("module_sha256") == x.get("layer_digest", "").split(":")[-1] for x in ol if "secs" in x)
    spread = spread_s(lib) + "; skopeo " + spread_s(sko)
    proc = secs_of(reps("oci_libproc"))
    if proc:
        spread += "; the library's whole bench process (start, convert, re-hash to check) median %.3f s" % med(proc)
    if not same:
        spread += "; the stored module differs from the layer pushed"
    errors = [x["error"] for x in ol + sk if "error" in x]
    if errors:
        spread += "; %d failed reps: %s" % (len(errors), errors[0][:100])
    row(OCI_FIGURE, round(med(lib), 3), "s", "skopeo copy docker:// dir:", round(med(sko), 3), round(r, 3), "<= 1x",
        r <= 1.0 and same and not errors,
        "loopback transfer from the registry + manifest resolution + SHA-256 while writing + fsync of the stored "
        "file; skopeo verifies the digest while writing, no fsync, and pays its process start", spread)
else:
    err_row(OCI_FIGURE, "<= 1x", next((x["error"] for x in ol + sk if "error" in x),
                                      load("registry.json").get("error", "not measured")))

# ---- memory: peak RSS growth of one conversion over the idle process, each case a fresh process ----
MEM_TARGET = "<= 16 MiB over idle"


def time_max_kib(run):
    try:
        return int(open(os.path.join(raw, "mem_%s_time.txt" % run)).read().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None


def mem_row(figure, m, bound, extra=""):
    g = m["growth_mib"]
    details = ["peak %.1f MiB" % (m["peak_kib"] / 1024), "%.2f s" % m["secs"]]
    row(figure, round(g, 2), "MiB", "idle RSS", round(m["idle_rss_kib"] / 1024, 1), None, MEM_TARGET, g <= 16,
        bound, "; ".join(details + ([extra] if extra else [])))


def growth_range(runs):
    g = [r["growth_mib"] for r in runs]
    return "the largest of %d processes (%.1f-%.1f MiB)" % (len(g), min(g), max(g)) if len(g) > 1 else ""


MEM_CASES = (
    ("fixture", "memory: largest fixture (large, 200 res) cold, 200 fetches",
     "up to 32 fetch threads (MAX_FETCH_THREADS), each with its HTTP connection's buffers and a 64 KiB copy "
     "buffer"),
    ("plain", "memory: 256 MiB module, plain", "streaming buffers only (socket read buffer + write buffer + hasher)"),
    ("gzip", "memory: 256 MiB module, gzipped", "as plain, plus the inflater's window; the gzip layer unboxed "
     "file to file"),
    ("tar", "memory: 256 MiB module, in a tar", "as plain; the tar's first entry copied file to file"),
    ("targz", "memory: 256 MiB module, in a tar.gz", "as gzipped, then as tar"),
    ("hostile", "memory: 8 hostile tar.gz (200 MiB header records) at once",
     "8 fetch threads; each gunzips to disk, reads one tar header block and rejects the 200 MiB record"),
    ("oci", "memory: OCI 256 MiB single-layer artifact",
     "manifest resolution (a small bounded document), then the layer streamed as a plain module"),
    ("oci-compat", "memory: OCI 256 MiB module in a compat tar+gzip layer",
     "as the single-layer artifact, then the layer unboxed as a tar.gz"),
)
HIT_FIGURE = "memory: largest fixture (large) again, cache hits"
for case, figure, bound in MEM_CASES:
    # A figure is a bound: the largest growth over the case's processes.
    paths = sorted(glob.glob(os.path.join(raw, "mem_%s_[0-9]*.json" % case)))
    runs = [(os.path.basename(p)[len("mem_"):-len(".json")], load(os.path.basename(p))) for p in paths]
    ok = [(run, m) for run, m in runs if "growth_mib" in m]
    if not ok:
        why = next((m.get("error") for _, m in runs), "not measured")
        err_row(figure, MEM_TARGET, why)
        if case == "fixture":
            err_row(HIT_FIGURE, MEM_TARGET, why)
        continue
    run, m = max(ok, key=lambda x: x[1]["growth_mib"])
    # The kernel keeps one peak per process, which each reset lowers: /usr/bin/time's max RSS (the peak at
    # exit) cross-checks the process's last measurement, the cache hits for the fixture.
    tm = time_max_kib(run)
    time_text = "/usr/bin/time max RSS %s MiB" % (round(tm / 1024, 1) if tm else "?")
    outcome = ("%d downloads; " % m["downloads"] if m.get("downloads") is not None else "") + m["outcome"][:100]
    spread = [x for x in (growth_range([x for _, x in ok]), outcome) if x]
    if case != "fixture":
        mem_row(figure, m, bound, "; ".join(spread + [time_text]))
        continue
    mem_row(figure, m, bound, "; ".join(spread))
    hit_run, hm = max(ok, key=lambda x: x[1]["hit"]["growth_mib"])
    hit, tm = hm["hit"], time_max_kib(hit_run)
    mem_row(HIT_FIGURE, hit, "the analyses (Struct trees), the rewritten resources and the output",
            "; ".join(x for x in (
                growth_range([x["hit"] for _, x in ok]),
                "idle after the cold conversion, which left %.1f MiB more resident than the first idle" %
                ((hit["idle_rss_kib"] - hm["idle_rss_kib"]) / 1024),
                "/usr/bin/time max RSS %s MiB" % (round(tm / 1024, 1) if tm else "?")) if x))

# ---- fan-in ----
f16, f1 = reps("fanin16"), reps("fanin1")
s16, s1 = secs_of(f16), secs_of(f1)
if s16 and s1:
    downloads = [r.get("downloads") for r in f16]
    oks = [r.get("ok") == r.get("threads") for r in f16]
    r = med(s16) / med(s1)
    row("fan-in: 16 threads vs 1, one module (200 ms latency)", round(med(s16), 3), "s", "1 thread", round(med(s1), 3),
        round(r, 3), "<= 1.2x, 1 download", r <= 1.2 and all(d == 1 for d in downloads) and all(oks),
        "the server's 200 ms latency: one download, the others wait on it",
        spread_s(s16) + "; downloads per rep %s" % downloads)
else:
    err_row("fan-in: 16 threads vs 1, one module (200 ms latency)", "<= 1.2x, 1 download", (f16 or [{}])[0].get("error"))

# ---- fan-out ----
o8, o1 = secs_of(reps("fanout8")), secs_of(reps("fanout1"))
if o8 and o1:
    r = med(o8) / med(o1)
    row("fan-out: 8 modules vs 1 (200 ms latency)", round(med(o8), 3), "s", "1 module", round(med(o1), 3), round(r, 3),
        "<= 1.5x", r <= 1.5, "the 200 ms latency, the 8 fetches running concurrently", spread_s(o8))
else:
    err_row("fan-out: 8 modules vs 1 (200 ms latency)", "<= 1.5x", (reps("fanout8") or [{}])[0].get("error"))

# ---- warm restart ----
wd, wr = reps("warm_download"), reps("warm_restart")
sd, sr = secs_of(wd), secs_of(wr)
if sd and sr:
    r = med(sr) / med(sd)
    row("warm restart: 20 x 4 MiB, new process vs downloader", round(med(sr), 3), "s", "downloading process",
        round(med(sd), 3), round(r, 3), "<= 0.5x, 0 downloads", r <= 0.5 and all(x.get("downloads") == 0 for x in wr),
        "re-hashing 80 MiB from the page cache (SHA-256) vs transfer + hash + write + fsync",
        spread_s(sr) + "; restart downloads %s" % [x.get("downloads") for x in wr])
else:
    err_row("warm restart: 20 x 4 MiB, new process vs downloader", "<= 0.5x, 0 downloads",
            (wd or [{}])[0].get("error"))


# ---- C ABI: Rust, C and Python, each a fresh process converting the same bytes ----
def abi(prefix):
    runs = [r for r in reps(prefix) if "median_ns" in r]
    if not runs:
        return {"error": (reps(prefix) or [{"error": "missing"}])[0].get("error")}
    return {"median_ns": med([r["median_ns"] for r in runs]), "runs": [r["median_ns"] for r in runs],
            "faults": med([r.get("faults_per_iter", float("nan")) for r in runs])}


for input, what in (("typical", "typical"), ("pass", "pass-through")):
    ar = abi("abi_rust_" + input)
    if "median_ns" not in ar:
        err_row("ABI %s: C / Python vs Rust" % what, "-", ar.get("error"))
        continue
    for lang, bound in (("c", "the same call plus the C-side free"),
                        ("py", "ctypes marshalling + string_at copy into bytes")):
        d = abi("abi_%s_%s" % (lang, input))
        name = "ABI %s: %s vs Rust Cache::convert (info)" % (what, {"c": "C", "py": "Python ctypes"}[lang])
        if "median_ns" in d:
            ratios = [x / y for x, y in zip(d["runs"], ar["runs"])]
            spread = "; ".join(x for x in (ratio_range(ratios), "page faults per call %.1f vs %.1f" %
                                           (d["faults"], ar["faults"])) if x)
            row(name, round(d["median_ns"] / 1000, 2), "us", "Rust", round(ar["median_ns"] / 1000, 2),
                round(d["median_ns"] / ar["median_ns"], 3), "-", None, bound, spread)
        else:
            err_row(name, "-", d.get("error"))

result = {"machine": machine(), "inputs": prepare, "figures": rows,
          "raw": {os.path.basename(p)[:-5]: load(os.path.basename(p)) for p in sorted(glob.glob(os.path.join(raw, "*.json")))}}
with open(out_path, "w") as f:
    json.dump(result, f, indent=2)

# ---- the table ----
m = result["machine"]
head = ("wasm-ecds benchmarks: %s x %s, %s GiB, %s, %s, commit %s%s, 1-min load %s-%s during the run" %
        (m["nproc"], m["cpu_model"], m["mem_total_gib"], m["kernel"], m["rustc"], m["commit"],
         " (+ uncommitted changes)" if m["worktree_dirty"] else "", m["load_1min_min"], m["load_1min_max"]))
hdr = ("figure", "value", "baseline (same run)", "ratio", "target", "result")
lines = []
for r in rows:
    if r.get("error") is not None:
        lines.append((r["figure"], "-", "-", "-", r["target"], "ERROR: " + r["error"][:80]))
        continue
    unit = r["unit"]
    v = "%s %s" % (r["value"], unit)
    b = "" if r["baseline_value"] is None else "%s %s %s" % (r["baseline"], r["baseline_value"], "us" if unit.startswith("us") else unit)
    ratio = "" if r["ratio"] is None else "%.2fx" % r["ratio"]
    if r["spread"].startswith("ratio "):
        ratio += " (%s)" % r["spread"].split(";")[0][len("ratio "):].replace(" over ", ", n=").replace(" runs", "")
    res = "" if r["pass"] is None else ("PASS" if r["pass"] else "FAIL")
    lines.append((r["figure"], v, b, ratio, r["target"], res))
w = [max(len(str(x[i])) for x in lines + [hdr]) for i in range(len(hdr))]
print("\n" + head)
print("  ".join(h.ljust(w[i]) for i, h in enumerate(hdr)))
print("  ".join("-" * w[i] for i in range(len(hdr))))
for x in lines:
    print("  ".join(str(c).ljust(w[i]) for i, c in enumerate(x)))
with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(head + "\n\n| " + " | ".join(hdr) + " |\n|" + "---|" * len(hdr) + "\n")
    for x in lines:
        f.write("| " + " | ".join(str(c) for c in x) + " |\n")
print("\nresults: %s, %s" % (out_path, os.path.join(out_dir, "table.md")))
