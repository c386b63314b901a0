//! The OCI figures' registry: the real distribution registry (Debian's `docker-registry`, started on 127.0.0.1
//! over plain HTTP by the test kit's harness) holding the bench images, pushed once per run through the
//! registry API. The images are built here from the module files of `gen`, with manifests written by hand so
//! that each large blob is hashed once:
//!
//! - `bench/o16:v1`, `bench/m256:v1`: single-layer artifacts as the ORAS Python SDK pushes them (config
//!   `application/vnd.unknown.config.v1+json` `{}`, one `application/vnd.module.wasm.content.layer.v1+wasm`
//!   layer: the module itself). `skopeo copy … dir:` copies such an image without interpreting it.
//! - `bench/m256-compat:v1`: OCI compat (an image config, one `tar+gzip` layer: `m256.tar.gz`, which holds
//!   the module as `plugin.wasm`).
//!
//! The process serving them is not the one measured: it holds the blobs while pushing, then waits.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use wasm_ecds_testkit::images::{OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, UNKNOWN_CONFIG, WASM_LAYER};
use wasm_ecds_testkit::registry::{Registry, RegistryConfig};
use wasm_ecds_testkit::server::sha256_hex;

/// The bench images: (repository, module file pushed as its layer, layer media type).
pub const IMAGES: [(&str, &str, &str); 3] = [
    ("bench/o16", "o16.wasm", WASM_LAYER),
    ("bench/m256", "m256.wasm", WASM_LAYER),
    ("bench/m256-compat", "m256.tar.gz", OCI_LAYER),
];
pub const TAG: &str = "v1";

/// Starts the registry, pushes the images from `dir`, writes what the figures need to `info` (registry host,
/// and per repository its `oci://` URL, manifest digest, layer digest and size, module sha256), then serves
/// until the file `stop` appears or `max_secs` pass. The registry and its storage go when this returns.
pub fn serve(dir: &Path, info: &Path, stop: &Path, max_secs: u64) {
    let manifest = crate::inputs::load_manifest(dir);
    let registry = Registry::start(RegistryConfig::plain());
    // The registry itself, not the kit's counting forwarder: nothing between the clients and the registry.
    let host = registry.direct_url().trim_start_matches("http://").to_string();
    let pusher = registry.pusher();
    let mut images = serde_json::Map::new();
    let t = Instant::now();
    for (repo, file, layer_type) in IMAGES {
        let layer = std::fs::read(dir.join(file)).expect("run `gen` first");
        let layer_digest = format!("sha256:{}", sha256_hex(&layer));
        pusher.push_blob(repo, &layer);
        let layer_bytes = layer.len();
        drop(layer);
        let config = if layer_type == WASM_LAYER {
            (UNKNOWN_CONFIG, b"{}".to_vec())
        } else {
            // diff_ids name uncompressed layers; no client here reads them.
            let config = json!({"architecture": "amd64", "os": "linux", "config": {},
                "rootfs": {"type": "layers", "diff_ids": [&layer_digest]}});
            (OCI_CONFIG, serde_json::to_vec(&config).unwrap())
        };
        pusher.push_blob(repo, &config.1);
        let image = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": config.0, "digest": format!("sha256:{}", sha256_hex(&config.1)), "size": config.1.len()},
            "layers": [{"mediaType": layer_type, "digest": &layer_digest, "size": layer_bytes}],
        });
        let manifest_digest = pusher.push_manifest(repo, TAG, OCI_MANIFEST, &serde_json::to_vec(&image).unwrap());
        images.insert(
            repo.to_string(),
            json!({
                "url": format!("oci://{host}/{repo}:{TAG}"),
                "docker": format!("docker://{host}/{repo}:{TAG}"),
                "manifest_digest": manifest_digest,
                "layer_digest": layer_digest,
                "layer_bytes": layer_bytes,
                "module_sha256": manifest[file],
            }),
        );
    }
    let pushed = json!({ "host": host, "push_secs": t.elapsed().as_secs_f64(), "images": images });
    let tmp = info.with_extension("tmp");
    std::fs::write(&tmp, pushed.to_string()).unwrap();
    std::fs::rename(&tmp, info).unwrap();
    let end = Instant::now() + Duration::from_secs(max_secs);
    while !stop.exists() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(registry);
}

/// One image of the info file `serve` wrote.
pub struct BenchImage {
    pub host: String,
    pub url: String,
    pub manifest_digest: String,
    pub layer_digest: String,
    pub module_sha256: String,
}

pub fn image(info: &Path, repo: &str) -> BenchImage {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(info).expect("registry info (run `registry` first)")).unwrap();
    let i = &v["images"][repo];
    let s = |k: &str| i[k].as_str().unwrap_or_else(|| panic!("{repo}: no {k}")).to_string();
    BenchImage {
        host: v["host"].as_str().unwrap().to_string(),
        url: s("url"),
        manifest_digest: s("manifest_digest"),
        layer_digest: s("layer_digest"),
        module_sha256: s("module_sha256"),
    }
}
