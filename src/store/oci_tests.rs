//! The store's answers to `oci://` requests, with Istio's cache semantics (`pkg/wasm/cache.go` and its
//! `cache_test.go`): the manifest digest is the checksum, the pull-policy table, the second lookup by
//! manifest digest (no layer when it is known), and everything persisted for a restart.

use std::fs;
use std::path::Path;
use std::time::Duration;

use super::files::sha256_hex;
use super::fixture::{digest, fixture, fixture_with, lookups, req, req_sha, sixteen_at_once, wasm, ImageFailure};
use super::{FetchResult, MODULES_DIR};
use crate::module::{ModuleRequest, ModuleSource, PullPolicy};

const TAG: &str = "oci://reg.test/m:v1";

fn digest_url(d: &str) -> String {
    format!("oci://reg.test/m@sha256:{d}")
}

fn module_files(dir: &Path) -> usize {
    fs::read_dir(dir.join(MODULES_DIR)).unwrap().count()
}

/// Istio's pull-policy table for images (`shouldIgnoreResourceVersion` and `getEntry`), one row per case:
/// (policy, url, second resource version, expect the second request to resolve the manifest again). A
/// re-resolve finds the same manifest digest, so no row downloads a second layer.
#[test]
fn pull_policy_table() {
    let d = digest("m");
    let by_digest = digest_url(&d);
    let rows: &[(PullPolicy, &str, &str, bool)] = &[
        (PullPolicy::IfNotPresent, "oci://reg.test/m:v1", "1", false),
        (PullPolicy::IfNotPresent, "oci://reg.test/m:v1", "2", false),
        (PullPolicy::IfNotPresent, "oci://reg.test/m:latest", "2", false),
        (PullPolicy::IfNotPresent, "oci://reg.test/m", "2", false),
        (PullPolicy::Always, "oci://reg.test/m:v1", "1", false),
        (PullPolicy::Always, "oci://reg.test/m:v1", "2", true),
        (PullPolicy::Unspecified, "oci://reg.test/m:v1", "2", false),
        (PullPolicy::Unspecified, "oci://reg.test/m:latest", "1", false),
        (PullPolicy::Unspecified, "oci://reg.test/m:latest", "2", true),
        // No tag means `latest`, with a registry port too.
        (PullPolicy::Unspecified, "oci://reg.test/m", "1", false),
        (PullPolicy::Unspecified, "oci://reg.test/m", "2", true),
        (PullPolicy::Unspecified, "oci://reg.test:5000/team/m", "2", true),
        // A digest reference is immutable: never resolved again, whatever the policy.
        (PullPolicy::Unspecified, &by_digest, "2", false),
        (PullPolicy::Always, &by_digest, "2", false),
        (PullPolicy::IfNotPresent, &by_digest, "2", false),
    ];
    for &(policy, url, rv2, again) in rows {
        let f = fixture();
        f.fetcher.serve_image(url, &d, &wasm("m"));
        let first = ModuleRequest { pull_policy: policy, ..req(url) };
        let m = f.store().get(&first).unwrap();
        assert_eq!(&*m.sha256, sha256_hex(&wasm("m")));
        let second = ModuleRequest { resource_version: rv2.into(), ..first.clone() };
        assert_eq!(f.store().get(&second).unwrap(), m);
        let want = if again { 2 } else { 1 };
        assert_eq!(f.fetcher.resolutions(), want, "{policy:?} {url} rv {rv2}");
        assert_eq!(f.fetcher.layers(), 1, "{policy:?} {url} rv {rv2}");
        // The new version was recorded: asking again with it resolves nothing.
        assert_eq!(f.store().get(&second).unwrap(), m);
        assert_eq!(f.fetcher.resolutions(), want, "{policy:?} {url} rv {rv2} again");
        assert_eq!(f.metrics.fetches(FetchResult::Success), 1);
        // A digest URL's manifest is resolved as the expected one.
        let expected = f.fetcher.asked()[0].expected_manifest.clone();
        assert_eq!(expected.as_deref(), (url == by_digest).then_some(d.as_str()), "{url}");
    }
}

#[test]
fn config_sha256_is_the_manifest_digest() {
    let f = fixture();
    let d = digest("m");
    let body = wasm("m");
    f.fetcher.serve_image(TAG, &d, &body);
    let m = f.store().get(&req_sha(TAG, &d)).unwrap();
    // Stored by the module's own content, not by the manifest digest.
    assert_eq!(&*m.sha256, sha256_hex(&body));
    assert_eq!(fs::read(&*m.path).unwrap(), body);
    assert_eq!(f.fetcher.asked()[0].expected_manifest.as_deref(), Some(d.as_str()));
    assert_eq!((f.fetcher.resolutions(), f.fetcher.layers()), (1, 1));
    assert_eq!(lookups(&f.metrics), (0, 1));
    assert_eq!(f.metrics.fetches(FetchResult::Success), 1);

    // The same digest answers at once: as the config's sha256 (any case, any URL) or in a digest URL.
    for r in [
        req_sha(TAG, &d),
        req_sha("oci://elsewhere.test/other:v9", &d.to_ascii_uppercase()),
        req(&digest_url(&d)),
        ModuleRequest { pull_policy: PullPolicy::Always, resource_version: "9".into(), ..req_sha(TAG, &d) },
    ] {
        assert_eq!(f.store().get(&r).unwrap(), m, "{r:?}");
    }
    assert_eq!(f.fetcher.resolutions(), 1);
    assert_eq!(lookups(&f.metrics), (4, 1));
    assert_eq!(f.metrics.cache_entries(), 1);
}

#[test]
fn url_digest_of_another_algorithm_or_malformed_is_no_checksum() {
    for url in ["oci://reg.test/m@sha512:abcd", &format!("oci://reg.test/m@sha256:{}", &digest("m")[..63])] {
        let f = fixture();
        f.fetcher.serve_image(url, &digest("m"), &wasm("m"));
        f.store().get(&req(url)).unwrap();
        assert_eq!(f.fetcher.asked()[0].expected_manifest, None, "{url}");
        // Checksum-less: two lookups missed, as for any URL without a checksum.
        assert_eq!(lookups(&f.metrics), (0, 2), "{url}");
    }
}

#[test]
fn manifest_mismatch_is_counted_and_stores_nothing() {
    let f = fixture();
    let (served, want) = (digest("m"), digest("other"));
    f.fetcher.serve_image(TAG, &served, &wasm("m"));
    for r in [req_sha(TAG, &want), req(&format!("oci://reg.test/m@sha256:{want}"))] {
        f.fetcher.serve_image(&r.url, &served, &wasm("m"));
        let err = f.store().get(&r).unwrap_err();
        assert_eq!(err.counted_as, Some(FetchResult::ChecksumMismatched));
        assert_eq!(
            err.message,
            format!("module downloaded from {} has checksum {served}, which does not match: {want}", r.url)
        );
    }
    assert_eq!(f.metrics.fetches(FetchResult::ChecksumMismatched), 2);
    assert_eq!(f.metrics.fetches(FetchResult::Success), 0);
    assert_eq!(f.fetcher.layers(), 0);
    assert_eq!(f.metrics.cache_entries(), 0);
    assert_eq!(module_files(&f.cache_dir()), 0);
    assert!(f.store().state().manifests.is_empty());
    assert!(f.temp_files().is_empty());
}

#[test]
fn re_resolve_to_a_known_digest_downloads_no_layer() {
    let f = fixture();
    let d = digest("m");
    f.fetcher.serve_image(TAG, &d, &wasm("m"));
    let always = ModuleRequest { pull_policy: PullPolicy::Always, ..req(TAG) };
    let m = f.store().get(&always).unwrap();
    assert_eq!((f.fetcher.resolutions(), f.fetcher.layers()), (1, 1));
    assert_eq!(lookups(&f.metrics), (0, 2));

    // A new resource version: the manifest is resolved again, its digest is known, no layer is fetched.
    let v2 = ModuleRequest { resource_version: "2".into(), ..always.clone() };
    assert_eq!(f.store().get(&v2).unwrap(), m);
    assert_eq!((f.fetcher.resolutions(), f.fetcher.layers()), (2, 1));
    // First lookup missed, the second (by the manifest digest) hit; not a remote fetch.
    assert_eq!(lookups(&f.metrics), (1, 3));
    assert_eq!(f.metrics.fetches(FetchResult::Success), 1);

    // The tag moves to new content: the next version resolves it and downloads it.
    f.fetcher.serve_image(TAG, &digest("m2"), &wasm("m2"));
    let v3 = ModuleRequest { resource_version: "3".into(), ..always };
    let m2 = f.store().get(&v3).unwrap();
    assert_eq!(&*m2.sha256, sha256_hex(&wasm("m2")));
    assert_eq!((f.fetcher.resolutions(), f.fetcher.layers()), (3, 2));
    assert_eq!(lookups(&f.metrics), (1, 5));
    assert_eq!(f.metrics.fetches(FetchResult::Success), 2);
    assert_eq!(f.metrics.cache_entries(), 2);
}

#[test]
fn invalid_module_counts_fetch_failure() {
    let f = fixture();
    f.fetcher.serve_image(TAG, &digest("m"), b"<html>not wasm</html>");
    let err = f.store().get(&req(TAG)).unwrap_err();
    assert_eq!(err.counted_as, Some(FetchResult::FetchFailure));
    assert_eq!(err.message, format!("fetched Wasm binary from {TAG} is invalid"));
    assert_eq!(f.metrics.fetches(FetchResult::FetchFailure), 1);
    assert_eq!(f.metrics.cache_entries(), 0);
    assert!(f.store().state().manifests.is_empty());
    assert!(f.temp_files().is_empty());
}

#[test]
fn manifest_and_layer_failures_are_counted_apart() {
    let f = fixture();
    f.fetcher.serve_image(TAG, &digest("m"), &wasm("m"));
    f.fetcher.fail_image(TAG, ImageFailure::Manifest);
    let err = f.store().get(&req(TAG)).unwrap_err();
    assert_eq!(err.counted_as, Some(FetchResult::ManifestFailure));
    assert!(err.message.starts_with("could not fetch Wasm OCI image: "), "{}", err.message);
    assert_eq!(f.fetcher.layers(), 0);
    // A URL that names no image served at all fails the same way.
    let err = f.store().get(&req("oci://reg.test/missing:v1")).unwrap_err();
    assert_eq!(err.counted_as, Some(FetchResult::ManifestFailure));
    assert_eq!(f.metrics.fetches(FetchResult::ManifestFailure), 2);

    f.fetcher.fail_image(TAG, ImageFailure::Download);
    let err = f.store().get(&req(TAG)).unwrap_err();
    assert_eq!(err.counted_as, Some(FetchResult::DownloadFailure));
    assert_eq!(err.message, "could not fetch Wasm binary: BLOB_UNKNOWN");
    assert_eq!(f.metrics.fetches(FetchResult::DownloadFailure), 1);
    assert_eq!(f.fetcher.layers(), 1);
    assert_eq!(f.metrics.fetches(FetchResult::Success), 0);
    assert_eq!(f.metrics.cache_entries(), 0);
    assert!(f.store().state().manifests.is_empty());
    assert!(f.temp_files().is_empty());

    // Nothing failed is remembered: served again, it is fetched.
    f.fetcher.serve_image(TAG, &digest("m"), &wasm("m"));
    f.store().get(&req(TAG)).unwrap();
    assert_eq!(f.metrics.fetches(FetchResult::Success), 1);
}

#[test]
fn sixteen_threads_one_resolution_one_layer() {
    let d = digest("m");
    for r in [req(TAG), req_sha(TAG, &d), req(&digest_url(&d))] {
        let f = fixture();
        f.fetcher.serve_image(&r.url, &d, &wasm("m"));
        f.fetcher.set_delay(Duration::from_millis(200));
        let results = sixteen_at_once(|| f.store().get(&r));
        assert_eq!((f.fetcher.resolutions(), f.fetcher.layers()), (1, 1), "{}", r.url);
        let first = results[0].clone().unwrap();
        assert!(results.iter().all(|x| x.as_ref() == Ok(&first)));
        assert_eq!(f.metrics.fetches(FetchResult::Success), 1);
        // Every waiter counts one miss; the leader of a checksum-less request counts two.
        let leader = if r.url == TAG && r.sha256.is_none() { 2 } else { 1 };
        assert_eq!(lookups(&f.metrics), (0, 15 + leader), "{}", r.url);
    }
}

#[test]
fn restart_pulls_nothing() {
    let mut f = fixture();
    let d = digest("m");
    let secret = br#"{"auths":{"reg.test":{"auth":"dXNlcjpzM2NyZXQ="}}}"#.to_vec();
    f.fetcher.serve_image(TAG, &d, &wasm("m"));
    let tagged = ModuleRequest { pull_secret: Some(secret), ..req(TAG) };
    let m = f.store().get(&tagged).unwrap();
    f.close();
    let index = fs::read_to_string(f.cache_dir().join("index.json")).unwrap();
    for hidden in ["reg.test", "dXNlcjpzM2NyZXQ", "auths"] {
        assert!(!index.contains(hidden), "{hidden} reached the disk: {index}");
    }
    assert!(index.contains(&d), "the manifest digest is kept: {index}");

    // By the tag URL the index recorded, by the config's sha256, by a digest URL: no fetch.
    let (store, fetcher, metrics) = f.reopen();
    assert_eq!(store.get(&tagged).unwrap(), m);
    assert_eq!(store.get(&req_sha("oci://elsewhere.test/m:v2", &d)).unwrap(), m);
    assert_eq!(store.get(&req(&digest_url(&d))).unwrap(), m);
    assert_eq!(fetcher.resolutions(), 0);
    assert_eq!(lookups(&metrics), (3, 0));
    drop(store);

    // Each way alone, in a fresh process (nothing verified yet in memory).
    for r in [tagged, req_sha("oci://elsewhere.test/m:v2", &d), req(&digest_url(&d))] {
        let (store, fetcher, _) = f.reopen();
        assert_eq!(store.get(&r).unwrap(), m);
        assert_eq!(fetcher.resolutions(), 0, "{}", r.url);
    }
}

#[test]
fn index_without_manifests_still_loads() {
    let mut f = fixture();
    f.fetcher.serve("http://x/a.wasm", &wasm("a"));
    let m = f.store().get(&req("http://x/a.wasm")).unwrap();
    f.close();
    let path = f.cache_dir().join("index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    assert!(index.as_object_mut().unwrap().remove("manifests").is_some());
    fs::write(&path, serde_json::to_vec(&index).unwrap()).unwrap();
    let (store, fetcher, _) = f.reopen();
    assert_eq!(store.get(&req("http://x/a.wasm")).unwrap(), m);
    assert_eq!(fetcher.calls(), 0);
}

#[test]
fn purge_forgets_the_manifest_mapping() {
    let f = fixture_with(Duration::ZERO, Duration::from_secs(3600));
    let d = digest("m");
    f.fetcher.serve_image(TAG, &d, &wasm("m"));
    let m = f.store().get(&req_sha(TAG, &d)).unwrap();
    assert_eq!(f.store().state().manifests.len(), 1);
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(f.store().purge().unwrap(), 1);
    assert!(!Path::new(&*m.path).exists());
    assert!(f.store().state().manifests.is_empty());
    let index = fs::read_to_string(f.cache_dir().join("index.json")).unwrap();
    assert!(!index.contains(&d), "{index}");
    // Asked again, the image is fetched again.
    assert_eq!(f.store().get(&req_sha(TAG, &d)).unwrap(), m);
    assert_eq!((f.fetcher.resolutions(), f.fetcher.layers()), (2, 2));
}

#[test]
fn pins_and_in_use_sets_keep_oci_modules() {
    let f = fixture_with(Duration::ZERO, Duration::from_secs(3600));
    let urls = ["oci://reg.test/a:v1", "oci://reg.test/b:v1", "oci://reg.test/c:v1"];
    for u in urls {
        f.fetcher.serve_image(u, &digest(u), &wasm(u));
    }
    let pins = f.store().pinning();
    let a = pins.get(&req(urls[0])).unwrap();
    let b = f.store().get(&req(urls[1])).unwrap();
    let c = f.store().get(&req(urls[2])).unwrap();
    f.store().set_sotw_in_use(vec![b.sha256.clone()].into());
    assert_eq!(f.metrics.cache_entries(), 3);
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(f.store().purge().unwrap(), 1);
    assert!(Path::new(&*a.path).exists(), "pinned, yet purged");
    assert!(Path::new(&*b.path).exists(), "in use, yet purged");
    assert!(!Path::new(&*c.path).exists());
    assert_eq!(f.metrics.cache_entries(), 2);
    assert_eq!(f.store().state().manifests.len(), 2);
    drop(pins);
    assert_eq!(f.store().purge().unwrap(), 1);
    assert_eq!(f.metrics.cache_entries(), 1);
}

#[test]
fn same_module_under_two_manifest_digests_is_one_file() {
    let f = fixture();
    let (d1, d2) = (digest("one"), digest("two"));
    f.fetcher.serve_image("oci://reg.test/m:v1", &d1, &wasm("m"));
    f.fetcher.serve_image("oci://mirror.test/m:v1", &d2, &wasm("m"));
    let a = f.store().get(&req_sha("oci://reg.test/m:v1", &d1)).unwrap();
    let b = f.store().get(&req("oci://mirror.test/m:v1")).unwrap();
    assert_eq!(a, b);
    // Two images, two layers fetched and two successful remote fetches (Istio counts per image), one file.
    assert_eq!((f.fetcher.resolutions(), f.fetcher.layers()), (2, 2));
    assert_eq!(f.metrics.fetches(FetchResult::Success), 2);
    assert_eq!(f.metrics.cache_entries(), 1);
    assert_eq!(module_files(&f.cache_dir()), 1);
    assert!(f.temp_files().is_empty());
    // Both digests now answer without a fetch.
    assert_eq!(f.store().get(&req(&digest_url(&d2))).unwrap(), a);
    assert_eq!(f.store().get(&req_sha("oci://x.test/y", &d1)).unwrap(), a);
    assert_eq!(f.fetcher.resolutions(), 2);
}

#[test]
fn get_all_answers_oci_and_http_requests_together() {
    let f = fixture();
    let d = digest("m");
    f.fetcher.serve_image(TAG, &d, &wasm("m"));
    f.fetcher.serve("http://x/a.wasm", &wasm("a"));
    // An HTTP request whose sha256 equals an image's manifest digest asks for other content: its own
    // download, which fails the check.
    f.fetcher.serve("http://x/d.wasm", &wasm("d"));
    let requests = vec![req_sha(TAG, &d), req("http://x/a.wasm"), req(&digest_url(&d)), req_sha("http://x/d.wasm", &d)];
    let results = f.store().pinning().get_all(&requests);
    let m = sha256_hex(&wasm("m"));
    for (i, want) in [(0, &m), (1, &sha256_hex(&wasm("a"))), (2, &m)] {
        assert_eq!(&*results[i].as_ref().unwrap().sha256, want.as_str());
    }
    assert_eq!(results[3].as_ref().unwrap_err().counted_as, Some(FetchResult::ChecksumMismatched));
    assert_eq!((f.fetcher.resolutions(), f.fetcher.layers(), f.fetcher.calls()), (1, 1, 2));
}
