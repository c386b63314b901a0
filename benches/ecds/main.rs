//! wasm-ecds benchmarks. One binary, one subcommand per figure, each printing one JSON object on
//! stdout; `benches/run.sh` runs them (separate processes where the figure needs it), runs the shell
//! baselines and builds the table. See BENCHMARKS.md.
//!
//!   gen      --dir D                                  module files + manifest (deterministic)
//!   serve    --dir D --port-file F [--delay-ms 200] [--max-secs 900]
//!   prepare  --server A --dir D --work W              in-process inputs + the cache they hit (work/hit-cache)
//!   micro    --server A --work W --group G            one group of cache hits (typical, pass, large,
//!                                                     variants) interleaved with its prost and copy baselines
//!   abi-rust --cache-dir C --response F               the cache-hit call from Rust in a fresh process
//!   cold     --server A --dir D --work W --module M   one cold conversion (fresh cache dir)
//!   mem      --server A --dir D --work W --case C [--registry-info F]
//!                                                     peak RSS growth of one cold conversion over the idle
//!                                                     process (fixture, plain, gzip, tar, targz, hostile;
//!                                                     oci, oci-compat: from the registry)
//!   registry --dir D --info F --stop F [--max-secs 900]
//!                                                     the distribution registry with the bench images
//!                                                     pushed, described in F, until the file `--stop` appears
//!   oci-cold --registry-info F --work W --image R     one cold conversion of an `oci://` image (fresh cache
//!                                                     dir); checks the stored module's sha256
//!   fanin    --server A --dir D --work W --threads N  N threads convert one cold response (slow module)
//!   fanout   --server A --dir D --work W --modules N  one response naming N slow modules
//!   warm     --server A --dir D --cache-dir C --phase download|restart
//!   loop     --cache-dir C --response F [--iters N] [--prost 1]
//!                                                     cache hits (or the prost baseline) in a loop, for
//!                                                     benches/profile.sh

mod inputs;
mod measure;
mod registry;
mod server;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::json;
use wasm_ecds::{Cache, Options};
use wasm_ecds_testkit::memory;
use wasm_ecds_testkit::proto;

use measure::{run_group, Case};

struct Args(BTreeMap<String, String>);

impl Args {
    fn parse(raw: &[String]) -> Args {
        let mut m = BTreeMap::new();
        let mut it = raw.iter();
        while let Some(k) = it.next() {
            if let Some(key) = k.strip_prefix("--") {
                if key == "bench" {
                    continue;
                }
                m.insert(key.to_string(), it.next().cloned().unwrap_or_default());
            }
        }
        Args(m)
    }
    fn get(&self, k: &str) -> &str {
        self.0.get(k).map(String::as_str).unwrap_or_else(|| panic!("missing --{k}"))
    }
    fn path(&self, k: &str) -> PathBuf {
        PathBuf::from(self.get(k))
    }
    fn num(&self, k: &str, default: u64) -> u64 {
        self.0.get(k).map(|v| v.parse().expect("number")).unwrap_or(default)
    }
}

fn open_cache(dir: &Path, extra: serde_json::Value) -> Cache {
    let mut opts = json!({ "cache_dir": dir });
    if let serde_json::Value::Object(m) = extra {
        for (k, v) in m {
            opts[k] = v;
        }
    }
    let options = Options::from_json(&opts.to_string()).expect("options");
    Cache::new(options).expect("open cache")
}

fn total_gets(server: &str) -> u64 {
    server::counts(server).values().sum()
}

fn main() {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let cmd = raw.iter().find(|a| !a.starts_with("--")).cloned().unwrap_or_default();
    let args = Args::parse(&raw[raw.iter().position(|a| *a == cmd).map(|p| p + 1).unwrap_or(0)..]);
    let out = match cmd.as_str() {
        "gen" => {
            let m = inputs::generate(&args.path("dir"));
            json!({ "modules": m.len() })
        }
        "serve" => {
            server::serve(
                args.path("dir"),
                args.num("delay-ms", 200),
                args.num("max-secs", 900),
                &args.path("port-file"),
            );
            return;
        }
        "registry" => {
            registry::serve(&args.path("dir"), &args.path("info"), &args.path("stop"), args.num("max-secs", 900));
            return;
        }
        "oci-cold" => oci_cold(&args),
        "prepare" => prepare(&args),
        "micro" => micro(&args),
        "abi-rust" => abi_rust(&args),
        "cold" => cold(&args),
        "mem" => mem(&args),
        "fanin" => fanin(&args),
        "fanout" => fanout(&args),
        "warm" => warm(&args),
        "loop" => hit_loop(&args),
        _ => {
            eprintln!("usage: see the header of benches/ecds/main.rs (run benches/run.sh)");
            return;
        }
    };
    println!("{out}");
}

fn base(args: &Args) -> String {
    format!("http://{}", args.get("server"))
}

/// The in-process inputs, by the name of their file in the work directory.
const INPUTS: [&str; 5] = ["typical", "pass", "large", "direct20", "struct20"];

/// Writes the in-process inputs to the work directory and fills the cache directory they are converted
/// against (work/hit-cache): converting "large" once stores s0..s199, so every later conversion of any input
/// is a cache hit. Checks that each input converts as expected.
fn prepare(args: &Args) -> serde_json::Value {
    let manifest = inputs::load_manifest(&args.path("dir"));
    let work = args.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let responses = [
        inputs::typical(&base(args), &manifest, 20),
        inputs::pass_through(50),
        inputs::typical(&base(args), &manifest, 200),
        // The two halves of "typical": all 20 direct, all 20 TypedStruct.
        inputs::typical_with(&base(args), &manifest, 20, |_| false),
        inputs::typical_with(&base(args), &manifest, 20, |_| true),
    ];
    for (name, bytes) in INPUTS.iter().zip(&responses) {
        std::fs::write(work.join(format!("{name}.pb")), bytes).unwrap();
    }
    let [typical, pass, large, direct, structs] = &responses;
    let cache_dir = work.join("hit-cache");
    let _ = std::fs::remove_dir_all(&cache_dir);
    let cache = open_cache(&cache_dir, json!({}));
    let server = args.get("server");
    let gets_before = total_gets(server);
    let t = Instant::now();
    let out_large = cache.convert(large).expect("large response converts (cold)");
    let cold_large_secs = t.elapsed().as_secs_f64();
    let gets = total_gets(server) - gets_before;
    let out_typical = cache.convert(typical).expect("typical converts");
    let out_pass = cache.convert(pass).expect("pass-through converts");
    assert_eq!(inputs::count_local(&out_large), 200);
    assert_eq!(inputs::count_local(&out_typical), 20, "every typical resource should load a local file");
    assert_eq!(inputs::count_local(&cache.convert(direct).expect("direct converts")), 20);
    assert_eq!(inputs::count_local(&cache.convert(structs).expect("TypedStruct converts")), 20);
    assert!(out_pass == *pass, "a pass-through response leaves byte-identical");
    let bytes: serde_json::Map<_, _> =
        INPUTS.iter().zip(&responses).map(|(n, b)| (n.to_string(), json!(b.len()))).collect();
    json!({
        "bytes": bytes,
        "setup_downloads": gets,
        "cold_large_secs": cold_large_secs,
        "typical_out_bytes": out_typical.len(),
    })
}

/// One group of in-process figures, sampled interleaved, in a process that did nothing before but open the
/// cache `prepare` filled: the library's cache hits beside their prost and copy baselines.
fn micro(args: &Args) -> serde_json::Value {
    let work = args.path("work");
    let input = |name: &str| -> &'static [u8] {
        std::fs::read(work.join(format!("{name}.pb"))).expect("run `prepare` first").leak()
    };
    let cache = open_cache(&work.join("hit-cache"), json!({}));
    let server = args.get("server");
    // istiod sends every push with a new nonce (and usually a new version_info), even when no resource
    // changed. Each input has one push buffer whose nonce and version are rewritten before every call, and
    // the library and its baselines read that very buffer (same bytes, same addresses).
    let buffers: RefCell<HashMap<usize, Rc<RefCell<FreshPushes>>>> = RefCell::default();
    let pushes_of = |input: &'static [u8]| -> Rc<RefCell<FreshPushes>> {
        let mut buffers = buffers.borrow_mut();
        buffers.entry(input.as_ptr() as usize).or_insert_with(|| Rc::new(RefCell::new(FreshPushes::new(input)))).clone()
    };
    // The library: `Cache::convert` with every module already in the store.
    let hit = |name: &'static str, input: &'static [u8]| {
        let pushes = pushes_of(input);
        let cache = &cache;
        Case {
            name,
            run: Box::new(move |n| {
                let mut pushes = pushes.borrow_mut(); // one case runs at a time
                for _ in 0..n {
                    black_box(cache.convert(black_box(pushes.next())).unwrap());
                }
            }),
        }
    };
    // Baseline: one allocation and memcpy of the push.
    let copy = |name: &'static str, input: &'static [u8]| {
        let pushes = pushes_of(input);
        Case {
            name,
            run: Box::new(move |n| {
                let mut pushes = pushes.borrow_mut();
                for _ in 0..n {
                    black_box(black_box(pushes.next()).to_vec());
                }
            }),
        }
    };
    // Baseline: the push decoded into complete prost types (every nested `Any` the kit knows) and re-encoded.
    let prost = |name: &'static str, input: &'static [u8]| {
        let pushes = pushes_of(input);
        Case {
            name,
            run: Box::new(move |n| {
                let mut pushes = pushes.borrow_mut();
                for _ in 0..n {
                    black_box(proto::decode_reencode(black_box(pushes.next())));
                }
            }),
        }
    };
    let group = args.get("group");
    let mut cases = match group {
        "typical" => {
            let typical = input("typical");
            vec![hit("hit_typical", typical), prost("prost_typical", typical), copy("copy_typical", typical)]
        }
        "pass" => {
            let pass = input("pass");
            vec![hit("hit_pass", pass), copy("copy_pass", pass), prost("prost_pass", pass)]
        }
        "large" => {
            let (large, typical) = (input("large"), input("typical"));
            // The typical push again, in a process whose allocator no longer trims (see BENCHMARKS.md).
            vec![
                hit("hit_large", large),
                hit("hit_typical_again", typical),
                copy("copy_large", large),
                prost("prost_large", large),
                prost("prost_typical_again", typical),
            ]
        }
        "variants" => {
            let (direct, structs) = (input("direct20"), input("struct20"));
            vec![
                hit("hit_direct20", direct),
                prost("prost_direct20", direct),
                hit("hit_struct20", structs),
                prost("prost_struct20", structs),
            ]
        }
        other => panic!("unknown group {other:?}"),
    };
    // Every measured conversion must be a cache hit: nothing may be fetched while measuring.
    let gets_before = total_gets(server);
    let stats = run_group(&mut cases, Duration::from_millis(200), Duration::from_millis(3), 41);
    let measured_downloads = total_gets(server) - gets_before;
    json!({
        "group": group,
        "measured_downloads": measured_downloads,
        "stats": stats.into_iter().map(|(name, s)| (name.to_string(), s.json())).collect::<serde_json::Map<_, _>>(),
    })
}

/// The pushes istiod sends when no resource changed: the same resources, a new nonce and version each time.
/// One buffer is rewritten in place before every call (a fixed-width counter in both fields), as a receive
/// buffer is: the bytes are new on every call, and hot in the CPU caches as a push that was just received is.
struct FreshPushes {
    buf: Vec<u8>,
    /// Where the counter digits of the nonce and of the version sit in `buf`.
    slots: [usize; 2],
    count: u64,
}

impl FreshPushes {
    const DIGITS: usize = 16;

    fn new(input: &[u8]) -> FreshPushes {
        use prost::Message;
        let mut push = proto::DiscoveryResponse::decode(input).expect("bench input decodes");
        let zeros = "0".repeat(Self::DIGITS);
        push.nonce = format!("{}-n{zeros}", push.nonce);
        push.version_info = format!("{}-v{zeros}", push.version_info);
        let buf = push.encode_to_vec();
        let find = |needle: &str| {
            let at = buf.windows(needle.len()).position(|w| w == needle.as_bytes()).expect("counter slot");
            at + needle.len() - Self::DIGITS
        };
        let slots = [find(&format!("-n{zeros}")), find(&format!("-v{zeros}"))];
        FreshPushes { buf, slots, count: 0 }
    }

    /// The next push.
    fn next(&mut self) -> &[u8] {
        self.count += 1;
        for at in self.slots {
            for (i, digit) in self.buf[at..at + Self::DIGITS].iter_mut().enumerate() {
                *digit = b"0123456789abcdef"[(self.count >> (4 * (Self::DIGITS - 1 - i)) & 0xf) as usize];
            }
        }
        &self.buf
    }
}

fn abi_rust(args: &Args) -> serde_json::Value {
    let response = std::fs::read(args.path("response")).unwrap();
    let t = Instant::now();
    let cache = open_cache(&args.path("cache-dir"), json!({}));
    black_box(cache.convert(&response).expect("converts"));
    let first = t.elapsed().as_secs_f64();
    let mut cases = vec![Case {
        name: "rust",
        run: Box::new(|n| {
            for _ in 0..n {
                black_box(cache.convert(black_box(&response)).unwrap());
            }
        }),
    }];
    let (_, s) = run_group(&mut cases, Duration::from_millis(300), Duration::from_millis(3), 41).remove(0);
    let mut v = s.json();
    v["open_and_first_convert_secs"] = json!(first);
    v
}

/// Times one conversion in a fresh cache directory; returns (seconds, module GETs, converted output).
fn one_cold(args: &Args, response: &[u8], extra: serde_json::Value) -> (f64, u64, tempfile::TempDir) {
    let work = args.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let dir = tempfile::tempdir_in(&work).unwrap();
    let cache = open_cache(dir.path(), extra);
    let before = total_gets(args.get("server"));
    let t = Instant::now();
    let out = cache.convert(response).expect("cold conversion succeeds");
    let secs = t.elapsed().as_secs_f64();
    let gets = total_gets(args.get("server")) - before;
    assert!(inputs::count_local(&out) > 0);
    (secs, gets, dir)
}

fn cold(args: &Args) -> serde_json::Value {
    let manifest = inputs::load_manifest(&args.path("dir"));
    let module = args.get("module").to_string();
    let response = inputs::named(&base(args), &manifest, std::slice::from_ref(&module));
    let (secs, gets, _dir) = one_cold(args, &response, json!({}));
    json!({ "secs": secs, "downloads": gets, "module_bytes": std::fs::metadata(args.path("dir").join(&module)).unwrap().len() })
}

/// A response naming one bench image (its manifest digest as the `sha256`, as Istio's agent takes it), and
/// the options that let the library speak plain HTTP to the registry.
fn oci_response(image: &registry::BenchImage) -> (Vec<u8>, serde_json::Value) {
    let spec = inputs::WasmSpec { uri: image.url.clone(), sha256: image.manifest_digest.clone(), typed_struct: false };
    (inputs::wasm_response(&[spec]), json!({ "plain_http_hosts": [&image.host] }))
}

/// The sha256 of the one module file a converted response loads.
fn stored_module_sha256(converted: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let files = inputs::local_files(converted);
    assert_eq!(files.len(), 1, "one local module");
    let mut file = std::fs::File::open(&files[0]).unwrap();
    let (mut hasher, mut buf) = (Sha256::new(), vec![0u8; 1 << 20]);
    loop {
        match file.read(&mut buf).unwrap() {
            0 => return hex::encode(hasher.finalize()),
            n => hasher.update(&buf[..n]),
        }
    }
}

/// One cold pull of an `oci://` image into a fresh cache directory, timed around `convert` alone; the stored
/// module is then checked against the module pushed (for a single-layer artifact: the layer itself).
fn oci_cold(args: &Args) -> serde_json::Value {
    let image = registry::image(&args.path("registry-info"), args.get("image"));
    let (response, extra) = oci_response(&image);
    let work = args.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let dir = tempfile::tempdir_in(&work).unwrap();
    let cache = open_cache(dir.path(), extra);
    let t = Instant::now();
    let out = cache.convert(&response).expect("cold OCI pull succeeds");
    let secs = t.elapsed().as_secs_f64();
    let sha256 = stored_module_sha256(&out);
    assert_eq!(sha256, image.module_sha256, "the stored module is the one pushed");
    json!({
        "secs": secs, "module_sha256": sha256, "layer_digest": image.layer_digest,
        "module_bytes": std::fs::metadata(&inputs::local_files(&out)[0]).unwrap().len(),
    })
}

/// The memory figures: one case converted cold, in a fresh cache directory, by a process that did nothing
/// before but open the cache and build the response. The figure is the peak resident memory during
/// `convert` over the idle process's resident memory right before it; the server is another process.
fn mem(args: &Args) -> serde_json::Value {
    let manifest = inputs::load_manifest(&args.path("dir"));
    let case = args.get("case");
    let one = |name: &str| inputs::named(&base(args), &manifest, &[name.to_string()]);
    // (response, what it is, modules it names, whether it must convert, options beyond the cache's)
    let (response, what, modules, converts, mut extra) = match case {
        "fixture" => {
            let what = "large: 200 resources, 100 of them TypedStruct";
            (inputs::typical(&base(args), &manifest, 200), what, 200, true, json!({}))
        }
        "plain" => (one("m256.wasm"), "m256.wasm: a 256 MiB module", 1, true, json!({})),
        "gzip" => (one("m256.wasm.gz"), "m256.wasm.gz: the 256 MiB module gzipped", 1, true, json!({})),
        "tar" => (one("m256.tar"), "m256.tar: the 256 MiB module in a tar", 1, true, json!({})),
        "targz" => (one("m256.tar.gz"), "m256.tar.gz: the 256 MiB module in a gzipped tar", 1, true, json!({})),
        "oci" | "oci-compat" => {
            let (repo, what) = if case == "oci" {
                ("bench/m256", "oci://…/bench/m256:v1: a single-layer artifact whose layer is the 256 MiB module")
            } else {
                (
                    "bench/m256-compat",
                    "oci://…/bench/m256-compat:v1: OCI compat, the 256 MiB module in a tar+gzip layer",
                )
            };
            let image = registry::image(&args.path("registry-info"), repo);
            let (response, extra) = oci_response(&image);
            (response, what, 1, true, extra)
        }
        "hostile" => {
            let names = inputs::hostile_names();
            let what = "8 gzipped tars, each opening with a 200 MiB long-name, long-link, pax or global pax record";
            (inputs::named(&base(args), &manifest, &names), what, names.len(), false, json!({}))
        }
        other => panic!("unknown memory case {other:?}"),
    };
    let work = args.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let dir = tempfile::tempdir_in(&work).unwrap();
    // The 256 MiB module unboxes to exactly the default limit; its tar is a little larger.
    extra["max_module_bytes"] = json!(1u64 << 30);
    let cache = open_cache(dir.path(), extra);
    // The loopback server's GETs (the registry keeps no counts).
    let from_registry = case.starts_with("oci");
    let gets = || if from_registry { 0 } else { total_gets(args.get("server")) };
    let gets_before = gets();
    let hwm_before_reset = memory::status_kib("VmHWM:");
    let (idle, peak, secs, result) = peak_of(|| cache.convert(&response));
    let downloads = gets() - gets_before;
    let outcome = match &result {
        Ok(out) => format!("converted, {} local files", inputs::count_local(out)),
        Err(nack) => format!("rejected: {}", nack.reason),
    };
    match &result {
        Ok(out) if converts => assert_eq!(inputs::count_local(out), modules, "{case}: every filter loads a file"),
        Err(_) if !converts => {}
        _ => panic!("{case}: unexpected outcome: {outcome}"),
    }
    if let (true, Ok(out)) = (from_registry, &result) {
        assert_eq!(stored_module_sha256(out), manifest["m256.wasm"], "{case}: the stored module is m256.wasm");
    }
    let downloads = if from_registry { json!(null) } else { json!(downloads) };
    let mut v = json!({
        "case": case, "what": what, "response_bytes": response.len(), "modules": modules,
        "downloads": downloads, "outcome": outcome, "secs": secs,
        "hwm_before_reset_kib": hwm_before_reset, "idle_rss_kib": idle, "peak_kib": peak,
        "growth_mib": (peak as f64 - idle as f64) / 1024.0,
    });
    if case == "fixture" {
        // The same response again, every module now stored: the conversion of every later push.
        let (idle, peak, secs, again) = peak_of(|| cache.convert(&response));
        assert_eq!(inputs::count_local(&again.expect("cache hit converts")), modules);
        v["hit"] = json!({
            "secs": secs, "idle_rss_kib": idle, "peak_kib": peak, "growth_mib": (peak as f64 - idle as f64) / 1024.0,
        });
    }
    v
}

/// Runs `f` from an idle process (see [`memory::peak_of`]) and returns (resident KiB right before, peak
/// resident KiB during, seconds, what `f` returned).
fn peak_of<T>(f: impl FnOnce() -> T) -> (u64, u64, f64, T) {
    let (idle, peak, (secs, out)) = memory::peak_of(|| {
        let t = Instant::now();
        let out = f();
        (t.elapsed().as_secs_f64(), out)
    });
    (idle, peak, secs, out)
}

fn fanin(args: &Args) -> serde_json::Value {
    let manifest = inputs::load_manifest(&args.path("dir"));
    let threads = args.num("threads", 16) as usize;
    let response = Arc::new(inputs::named(&format!("{}/slow", base(args)), &manifest, &["fanin.wasm".to_string()]));
    let work = args.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let dir = tempfile::tempdir_in(&work).unwrap();
    let cache = Arc::new(open_cache(dir.path(), json!({})));
    let before = server::count_of(args.get("server"), "/slow/fanin.wasm");
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (cache, response, barrier) = (cache.clone(), response.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let t = Instant::now();
                let ok = cache.convert(&response).map(|o| inputs::count_local(&o) == 1).unwrap_or(false);
                (t.elapsed().as_secs_f64(), ok)
            })
        })
        .collect();
    barrier.wait();
    let t = Instant::now();
    let results: Vec<(f64, bool)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let secs = t.elapsed().as_secs_f64();
    let downloads = server::count_of(args.get("server"), "/slow/fanin.wasm") - before;
    json!({
        "threads": threads, "secs": secs, "downloads": downloads,
        "ok": results.iter().filter(|r| r.1).count(),
        "slowest_thread_secs": results.iter().map(|r| r.0).fold(0.0, f64::max),
    })
}

fn fanout(args: &Args) -> serde_json::Value {
    let manifest = inputs::load_manifest(&args.path("dir"));
    let n = args.num("modules", 8) as usize;
    let names: Vec<String> = (0..n).map(|i| format!("f{i}.wasm")).collect();
    let response = inputs::named(&format!("{}/slow", base(args)), &manifest, &names);
    let (secs, gets, _dir) = one_cold(args, &response, json!({}));
    json!({ "modules": n, "secs": secs, "downloads": gets })
}

fn warm(args: &Args) -> serde_json::Value {
    let manifest = inputs::load_manifest(&args.path("dir"));
    let names: Vec<String> = (0..20).map(|i| format!("w{i}.wasm")).collect();
    let response = inputs::named(&base(args), &manifest, &names);
    let before = total_gets(args.get("server"));
    let t = Instant::now();
    let cache = open_cache(&args.path("cache-dir"), json!({}));
    let open_secs = t.elapsed().as_secs_f64();
    let t2 = Instant::now();
    let out = cache.convert(&response).expect("conversion succeeds");
    let convert_secs = t2.elapsed().as_secs_f64();
    let total = t.elapsed().as_secs_f64();
    assert_eq!(inputs::count_local(&out), 20);
    let t3 = Instant::now();
    black_box(cache.convert(&response).expect("second conversion"));
    let second = t3.elapsed().as_secs_f64();
    json!({
        "phase": args.get("phase"), "open_secs": open_secs, "convert_secs": convert_secs, "secs": total,
        "second_convert_secs": second, "downloads": total_gets(args.get("server")) - before,
    })
}

/// The cache-hit conversion in a loop on fresh pushes, as the figures measure it (for `benches/profile.sh`);
/// `--prost 1`: the prost decode and re-encode of the same pushes instead.
fn hit_loop(args: &Args) -> serde_json::Value {
    let response = std::fs::read(args.path("response")).unwrap();
    let cache = open_cache(&args.path("cache-dir"), json!({}));
    black_box(cache.convert(&response).expect("converts"));
    let iters = args.num("iters", 1000);
    let prost = args.num("prost", 0) != 0;
    let mut pushes = FreshPushes::new(&response);
    let t = Instant::now();
    for _ in 0..iters {
        if prost {
            black_box(proto::decode_reencode(black_box(pushes.next())));
        } else {
            black_box(cache.convert(black_box(pushes.next())).unwrap());
        }
    }
    json!({ "iters": iters, "per_iter_ns": t.elapsed().as_nanos() as f64 / iters as f64 })
}
