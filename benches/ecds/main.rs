//! wasm-ecds benchmarks (issue 5). One binary, one subcommand per figure, each printing one JSON object on
//! stdout; `benches/run.sh` runs them (separate processes where the figure needs it), runs the shell
//! baselines and builds the table. See BENCHMARKS.md.
//!
//!   gen      --dir D                                  module files + manifest (deterministic)
//!   serve    --dir D --port-file F [--delay-ms 200] [--max-secs 900]
//!   micro    --server A --dir D --work W              cache-hit / pass-through / large vs copy and prost
//!   abi-rust --cache-dir C --response F               the cache-hit call from Rust in a fresh process
//!   cold     --server A --dir D --work W --module M   one cold conversion (fresh cache dir)
//!   mem      --server A --dir D --work W --module M   peak RSS around one cold conversion
//!   fanin    --server A --dir D --work W --threads N  N threads convert one cold response (slow module)
//!   fanout   --server A --dir D --work W --modules N  one response naming N slow modules
//!   warm     --server A --dir D --cache-dir C --phase download|restart

mod inputs;
mod measure;
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

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
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

fn micro(args: &Args) -> serde_json::Value {
    let manifest = inputs::load_manifest(&args.path("dir"));
    let work = args.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let typical = inputs::typical(&base(args), &manifest, 20);
    let large = inputs::typical(&base(args), &manifest, 200);
    let pass = inputs::pass_through(50);
    // Breakdown of "typical" (information): all 20 direct, all 20 TypedStruct.
    let direct = inputs::typical_with(&base(args), &manifest, 20, |_| false);
    let structs = inputs::typical_with(&base(args), &manifest, 20, |_| true);
    std::fs::write(work.join("typical.pb"), &typical).unwrap();
    std::fs::write(work.join("large.pb"), &large).unwrap();
    std::fs::write(work.join("pass.pb"), &pass).unwrap();

    // The cache the C / Python / Rust ABI drivers reopen: kept in work/hit-cache. Until the library works,
    // only the baselines are measured (the figures are then reported as errors).
    let cache_dir = work.join("hit-cache");
    let _ = std::fs::remove_dir_all(&cache_dir);
    let server = args.get("server").to_string();
    let prepared = std::panic::catch_unwind(|| {
        let cache = open_cache(&cache_dir, json!({}));
        let gets_before = total_gets(&server);
        let t = Instant::now();
        let first_large = cache.convert(&large).expect("large response converts (cold)");
        let cold_large_secs = t.elapsed().as_secs_f64();
        let gets = total_gets(&server) - gets_before;
        let out_typical = cache.convert(&typical).expect("typical converts");
        let out_pass = cache.convert(&pass).expect("pass-through converts");
        assert_eq!(inputs::count_local(&cache.convert(&direct).expect("direct converts")), 20);
        assert_eq!(inputs::count_local(&cache.convert(&structs).expect("TypedStruct converts")), 20);
        assert_eq!(inputs::count_local(&out_typical), 20, "every typical resource should load a local file");
        let sanity = json!({
            "typical_local": inputs::count_local(&out_typical),
            "large_local": inputs::count_local(&first_large),
            "pass_identical": out_pass == pass,
            "setup_downloads": gets,
            "cold_large_secs": cold_large_secs,
            "typical_out_bytes": out_typical.len(),
        });
        (cache, sanity)
    });
    let (cache, sanity) = match prepared {
        Ok((c, s)) => (Some(c), s),
        Err(e) => {
            let why = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
            (None, json!({ "library_error": why.unwrap_or_default() }))
        }
    };
    assert!(!proto::decode_reencode(&typical).is_empty());

    let warm = Duration::from_millis(200);
    let sample = Duration::from_millis(3);
    let rounds = 41;
    let mut results = serde_json::Map::new();
    // Every push istiod sends carries a new nonce (and often a new version_info) even when no resource
    // changed, so a cache hit is measured on pushes that differ there on every call — never on the very
    // same bytes again, which real traffic does not send.
    // One push buffer per input, shared by the library case and its baselines: each reads the very same bytes
    // (same addresses, so the same alignment for the copies).
    let buffers: RefCell<HashMap<usize, Rc<RefCell<FreshPushes>>>> = RefCell::default();
    let pushes_of = |input: &'static [u8]| -> Rc<RefCell<FreshPushes>> {
        let mut buffers = buffers.borrow_mut();
        buffers.entry(input.as_ptr() as usize).or_insert_with(|| Rc::new(RefCell::new(FreshPushes::new(input)))).clone()
    };
    let hit = |name: &'static str, input: &'static [u8]| -> Option<Case<'_>> {
        let cache = cache.as_ref()?;
        let pushes = pushes_of(input);
        Some(Case {
            name,
            run: Box::new(move |n| {
                let mut pushes = pushes.borrow_mut(); // one case runs at a time
                for _ in 0..n {
                    black_box(cache.convert(black_box(pushes.next())).unwrap());
                }
            }),
        })
    };
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
    // Every resource new on every push: the memo never answers, the store does (modules cached).
    let changed = |name: &'static str, input: &'static [u8]| -> Option<Case<'_>> {
        let cache = cache.as_ref()?;
        let mut pushes = FreshPushes::with_changed_configs(input);
        assert_eq!(inputs::count_local(&cache.convert(pushes.next()).expect("changed push converts")), 20);
        Some(Case {
            name,
            run: Box::new(move |n| {
                for _ in 0..n {
                    black_box(cache.convert(black_box(pushes.next())).unwrap());
                }
            }),
        })
    };
    let prost = |name: &'static str, input: &'static [u8]| Case {
        name,
        run: Box::new(move |n| {
            for _ in 0..n {
                black_box(proto::decode_reencode(black_box(input)));
            }
        }),
    };
    // What any pass-through that checks every byte and records its duration must do, with nothing else: the
    // push compared with a kept copy of the resources, the copy out, two readings of the cheapest clock.
    let exact_floor = |name: &'static str, input: &'static [u8]| {
        let pushes = pushes_of(input);
        let (start, end) = resource_span(pushes.borrow_mut().next());
        let kept = pushes.borrow_mut().next()[start..end].to_vec();
        Case {
            name,
            run: Box::new(move |n| {
                let mut pushes = pushes.borrow_mut();
                for _ in 0..n {
                    let t = cheapest_clock();
                    let push = black_box(pushes.next());
                    assert!(push[start..end] == kept[..]);
                    black_box((push.to_vec(), cheapest_clock() - t));
                }
            }),
        }
    };
    let typical: &'static [u8] = typical.leak();
    let large: &'static [u8] = large.leak();
    let pass: &'static [u8] = pass.leak();
    let direct: &'static [u8] = direct.leak();
    let structs: &'static [u8] = structs.leak();
    let groups: Vec<Vec<Option<Case<'_>>>> = vec![
        vec![hit("hit_typical", typical), Some(copy("copy_typical", typical)), Some(prost("prost_typical", typical))],
        vec![hit("hit_pass", pass), Some(copy("copy_pass", pass)), Some(exact_floor("floor_pass", pass))],
        vec![
            hit("hit_large", large),
            Some(copy("copy_large", large)),
            Some(prost("prost_large", large)),
            hit("hit_typical_again", typical),
        ],
        vec![changed("changed_typical", typical), Some(prost("prost_typical_changed", typical))],
        vec![
            hit("hit_direct20", direct),
            Some(copy("copy_direct20", direct)),
            hit("hit_struct20", structs),
            Some(copy("copy_struct20", structs)),
        ],
    ];
    for group in groups {
        let mut cases: Vec<Case<'_>> = group.into_iter().flatten().collect();
        for (name, s) in run_group(&mut cases, warm, sample, rounds) {
            results.insert(name.into(), s.json());
        }
    }
    json!({
        "bytes": { "typical": typical.len(), "large": large.len(), "pass": pass.len() },
        "sanity": sanity,
        "stats": results,
    })
}

/// The cheapest timestamp a call can take: the TSC on x86_64 (one `rdtsc`), the monotonic clock elsewhere.
fn cheapest_clock() -> u64 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `rdtsc` exists on every x86_64 CPU and has no preconditions.
    return unsafe { core::arch::x86_64::_rdtsc() };
    #[cfg(not(target_arch = "x86_64"))]
    {
        static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }
}

/// Where the resource fields of a serialized `DiscoveryResponse` stand (they are contiguous in the inputs).
fn resource_span(response: &[u8]) -> (usize, usize) {
    let (mut pos, mut span) = (0, (usize::MAX, 0));
    while pos < response.len() {
        let mut rest = &response[pos..];
        let key = prost::encoding::decode_varint(&mut rest).unwrap();
        let len = prost::encoding::decode_varint(&mut rest).unwrap() as usize; // every field is length-delimited
        let end = response.len() - rest.len() + len;
        if key >> 3 == 2 {
            span = (span.0.min(pos), end);
        }
        pos = end;
    }
    span
}

/// The pushes istiod sends when no resource changed: the same resources, a new nonce and version each time.
/// One buffer is rewritten in place before every call (a fixed-width counter in both fields), as a receive
/// buffer is: the bytes are new to the library on every call, and hot in the CPU caches as a push that was
/// just received and decoded is.
struct FreshPushes {
    buf: Vec<u8>,
    /// Where the counter digits of the nonce and of the version sit in `buf`.
    slots: [usize; 2],
    /// Where each plugin configuration has a credential whose 7 letters are rewritten too (empty: resources
    /// stay the same).
    config_slots: Vec<usize>,
    count: u64,
}

impl FreshPushes {
    const DIGITS: usize = 16;
    /// The start of each rule's base64 credential in the plugin configurations (`inputs::plugin_configuration`).
    const CREDENTIAL: &'static [u8] = b"YWRtaW4";

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
        FreshPushes { buf, slots, config_slots: Vec::new(), count: 0 }
    }

    /// Pushes whose every Wasm resource also changes: istiod pushing a new configuration for every plugin
    /// (what Istio's agent converts on every push anyway). The base64 credential `YWRtaW4…` of each rule in
    /// the plugin configurations gets 7 new letters per push, so no memo entry ever matches.
    fn with_changed_configs(input: &[u8]) -> FreshPushes {
        let mut pushes = FreshPushes::new(input);
        pushes.config_slots = pushes
            .buf
            .windows(Self::CREDENTIAL.len())
            .enumerate()
            .filter(|(_, w)| *w == Self::CREDENTIAL)
            .map(|(at, _)| at)
            .collect();
        assert!(!pushes.config_slots.is_empty(), "no credential to rewrite");
        pushes
    }

    /// The next push.
    fn next(&mut self) -> &[u8] {
        self.count += 1;
        for &at in &self.config_slots {
            for (i, letter) in self.buf[at..at + Self::CREDENTIAL.len()].iter_mut().enumerate() {
                *letter = b"ABCDEFGHIJKLMNOP"[(self.count >> (4 * i) & 0xf) as usize];
            }
        }
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

fn mem(args: &Args) -> serde_json::Value {
    let manifest = inputs::load_manifest(&args.path("dir"));
    let module = args.get("module").to_string();
    let response = inputs::named(&base(args), &manifest, std::slice::from_ref(&module));
    let work = args.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let dir = tempfile::tempdir_in(&work).unwrap();
    let cache = open_cache(dir.path(), json!({ "max_module_bytes": 1u64 << 30 }));
    let hwm_before = status_kib("VmHWM:");
    let rss_before = status_kib("VmRSS:");
    let t = Instant::now();
    let out = cache.convert(&response).expect("cold conversion succeeds");
    let secs = t.elapsed().as_secs_f64();
    let hwm_after = status_kib("VmHWM:");
    assert_eq!(inputs::count_local(&out), 1);
    json!({
        "secs": secs, "hwm_before_kib": hwm_before, "rss_before_kib": rss_before, "hwm_after_kib": hwm_after,
        "growth_mib": (hwm_after as f64 - hwm_before as f64) / 1024.0,
        "module_bytes": std::fs::metadata(args.path("dir").join(&module)).unwrap().len(),
    })
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

fn hit_loop(args: &Args) -> serde_json::Value {
    let response = std::fs::read(args.path("response")).unwrap();
    let cache = open_cache(&args.path("cache-dir"), json!({}));
    black_box(cache.convert(&response).expect("converts"));
    let iters = args.num("iters", 1000);
    // `--changed 1`: every resource new on every push (the memo never answers).
    let mut pushes = match args.num("changed", 0) {
        0 => FreshPushes::new(&response),
        _ => FreshPushes::with_changed_configs(&response),
    };
    let t = Instant::now();
    for _ in 0..iters {
        black_box(cache.convert(black_box(pushes.next())).unwrap());
    }
    json!({ "iters": iters, "per_iter_ns": t.elapsed().as_nanos() as f64 / iters as f64 })
}
