//! Istio's decision table (istio `pkg/wasm/convert.go`, `MaybeConvertWasmExtensionConfig`) as a pure
//! function: from what a resource is and what the store answered, what becomes of it and under which
//! conversion counter. The pipeline applies the decision.

use crate::metrics::ConversionResult;
use crate::module::{Module, ModuleError};
use crate::options::OnFetchFailure;
use crate::wire;

use super::analyze::{Analysis, Remote, WasmKind};

const HTTP_RBAC_URL: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
const NETWORK_RBAC_URL: &str = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";

/// What becomes of one resource.
pub(super) enum Decision<'r, 'a> {
    /// Leave it as it came (`no_remote_load`).
    Pass,
    /// Point its code at the stored module (`success`, unless the rewrite fails: `marshal_failure`).
    Convert { remote: &'r Remote<'a>, module: Module },
    /// The module could not be had: replace the filter by an RBAC stand-in, counted under `status`. `what`
    /// says what failed, for the log.
    Fallback { remote: &'r Remote<'a>, rbac: Rbac, status: ConversionResult, what: String },
    /// Reject the whole response with `reason`, counted under `status`.
    Reject { status: ConversionResult, reason: String },
}

impl Decision<'_, '_> {
    /// The conversion counter of the decision as taken (a conversion counts `success` once its rewrite
    /// succeeded).
    pub(super) fn counter(&self) -> ConversionResult {
        match self {
            Decision::Pass => ConversionResult::NoRemoteLoad,
            Decision::Convert { .. } => ConversionResult::Success,
            Decision::Fallback { status, .. } | Decision::Reject { status, .. } => *status,
        }
    }
}

/// Decides one resource. `answer` is the store's answer to the resource's module request (`None` when it
/// made none, or the store gave no answer).
pub(super) fn decide<'r, 'a>(
    analysis: &'r Analysis<'a>,
    answer: Option<Result<Module, ModuleError>>,
    on_fetch_failure: OnFetchFailure,
) -> Decision<'r, 'a> {
    let remote = match analysis {
        Analysis::NoRemoteCode => return Decision::Pass,
        Analysis::Malformed(reason) => {
            return Decision::Reject { status: ConversionResult::UnmarshalFailure, reason: reason.clone() }
        }
        Analysis::Remote(remote) => remote,
    };
    let (status, cause) = match (&remote.want, answer) {
        (Err((status, cause)), _) => (*status, cause.clone()),
        (Ok(_), Some(Ok(module))) => return Decision::Convert { remote, module },
        (Ok(_), Some(Err(e))) => (ConversionResult::FetchFailure, e.message),
        (Ok(_), None) => (ConversionResult::FetchFailure, "no answer".to_owned()),
    };
    let what = if remote.url.is_empty() { cause } else { format!("module {}: {cause}", remote.url) };
    // A plugin that fails open gets an allow-all RBAC filter. One that fails closed gets a deny-all one
    // (Istio since 1.24) or rejects the response (older Istio): `on_fetch_failure` chooses.
    let rbac = if remote.fail_open {
        Rbac::Allow
    } else if on_fetch_failure == OnFetchFailure::Deny {
        Rbac::Deny
    } else {
        return Decision::Reject { status, reason: format!("{}: {what}", remote.label) };
    };
    Decision::Fallback { remote, rbac, status, what }
}

/// Istio's stand-in for a Wasm filter whose module could not be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Rbac {
    Allow,
    Deny,
}

impl Rbac {
    pub(super) fn word(self) -> &'static str {
        match self {
            Rbac::Allow => "allow",
            Rbac::Deny => "deny",
        }
    }
}

/// `TypedExtensionConfig{name, typed_config: RBAC}`: Istio's allow-all / deny-all stand-in (istio
/// `pkg/wasm/convert.go`). Field numbers from envoy `api/envoy/extensions/filters/{http,network}/rbac/v3/
/// rbac.proto`: `rules` 1 in both; `rules_stat_prefix` 6 (HTTP), `stat_prefix` 3 (network, required).
pub(super) fn rbac_extension_config(name: &str, kind: WasmKind, rbac: Rbac) -> Vec<u8> {
    let mut filter = Vec::new();
    let (url, prefix_field) = match kind {
        WasmKind::Http => (HTTP_RBAC_URL, 6),
        WasmKind::Network => (NETWORK_RBAC_URL, 3),
    };
    let prefix = match rbac {
        Rbac::Allow => "wasm-default-allow",
        Rbac::Deny => {
            wire::put_len(&mut filter, 1, &[]); // rules present but empty: ALLOW with no policies = deny all
            "wasm-default-deny"
        }
    };
    wire::put_len(&mut filter, prefix_field, prefix.as_bytes());
    let mut any = Vec::new();
    wire::put_len(&mut any, 1, url.as_bytes());
    wire::put_len(&mut any, 2, &filter);
    let mut tec = Vec::new();
    if !name.is_empty() {
        wire::put_len(&mut tec, 1, name.as_bytes());
    }
    wire::put_len(&mut tec, 2, &any);
    tec
}

#[cfg(test)]
mod tests {
    use prost::Message as _;
    use wasm_ecds_testkit::ecds::{
        env_vars, extensions, remote_code, AsyncDataSource, HttpRbac, NetworkRbac, RemoteDataSource,
    };

    use super::*;
    use crate::ecds::analyze::analyze;
    use crate::ecds::convert_sotw;
    use crate::ecds::tests::{
        counts, deny_policy, failing, policy, remote_wasm, response, wasm, wasm_resource, Fake, HTTP, NET,
    };
    use crate::metrics::Metrics;

    /// The table itself, without a response around it: what the fetch outcome and the policy make of one
    /// remote filter.
    #[test]
    fn a_failed_fetch_falls_back_or_rejects_by_fail_open_and_policy() {
        let any = wasm_resource("p", &remote_wasm("http://h/m.wasm")).encode_to_vec();
        let mut budget = crate::schema::Budget::for_response(any.len());
        let analysis = analyze((&any).into(), 1, None, std::time::Duration::from_secs(5), &mut budget);
        let module = Module { path: "/cache/m.wasm".into(), sha256: "s".into() };
        let failed = || Some(Err(ModuleError { counted_as: None, message: "gone".to_owned() }));
        assert!(matches!(
            decide(&analysis, Some(Ok(module.clone())), OnFetchFailure::Reject),
            Decision::Convert { module: m, .. } if m == module
        ));
        match decide(&analysis, failed(), OnFetchFailure::Reject) {
            Decision::Reject { status, reason } => {
                assert_eq!(status, ConversionResult::FetchFailure);
                assert_eq!(reason, "resource \"p\": module http://h/m.wasm: gone");
            }
            _ => panic!("rejected"),
        }
        assert!(matches!(
            decide(&analysis, failed(), OnFetchFailure::Deny),
            Decision::Fallback { rbac: Rbac::Deny, status: ConversionResult::FetchFailure, .. }
        ));
        assert!(matches!(decide(&analysis, None, OnFetchFailure::Deny), Decision::Fallback { what, .. }
            if what == "module http://h/m.wasm: no answer"));
        assert!(matches!(decide(&Analysis::NoRemoteCode, None, OnFetchFailure::Deny), Decision::Pass));
        let malformed = Analysis::Malformed("bad".to_owned());
        assert!(matches!(decide(&malformed, None, OnFetchFailure::Deny), Decision::Reject { status, reason }
            if status == ConversionResult::UnmarshalFailure && reason == "bad"));
    }

    #[test]
    fn fetch_failures_fail_open_closed_and_deny() {
        let (fake, m) = (Fake::default(), Metrics::new());
        // fail-open via failure_policy, and via the deprecated bool with the policy unset
        let input =
            response(vec![failing("a", false, 3, HTTP), failing("b", true, 0, HTTP), failing("c", true, 0, NET)]);
        let out = convert_sotw(&input, &fake, &policy(), &m).ok().unwrap();
        let t = extensions(&out.bytes);
        assert_eq!(t[0].name, "a");
        let tc = t[0].typed_config.as_ref().unwrap();
        assert_eq!(tc.type_url, HTTP_RBAC_URL);
        assert_eq!(
            tc.value,
            HttpRbac { rules: None, rules_stat_prefix: "wasm-default-allow".into(), ..Default::default() }
                .encode_to_vec()
        );
        assert_eq!(t[1].typed_config.as_ref().unwrap().type_url, HTTP_RBAC_URL);
        let tc = t[2].typed_config.as_ref().unwrap();
        assert_eq!(tc.type_url, NETWORK_RBAC_URL);
        assert_eq!(NetworkRbac::decode(tc.value.as_slice()).unwrap().stat_prefix, "wasm-default-allow");
        assert!(out.modules.is_empty());
        assert_eq!(counts(&m), [0, 0, 0, 0, 3, 0]);

        // fail_open true but failure_policy FAIL_CLOSED: closed -> rejected with the module's cause
        let m = Metrics::new();
        let input = response(vec![failing("extensions.istio.io/wasmplugin/ns.basic-auth", true, 2, HTTP)]);
        let err = convert_sotw(&input, &fake, &policy(), &m).err().unwrap();
        assert_eq!(
            err.reason,
            "resource \"extensions.istio.io/wasmplugin/ns.basic-auth\": module http://h/bad.wasm: \
             checksum mismatch: want aa, got bb"
        );
        assert_eq!(counts(&m), [0, 0, 0, 0, 1, 0]);

        // the same with on_fetch_failure = deny: deny-all RBAC, rules present but empty
        let m = Metrics::new();
        let input = response(vec![failing("h", false, 0, HTTP), failing("n", false, 1, NET)]);
        let out = convert_sotw(&input, &fake, &deny_policy(), &m).ok().unwrap();
        let t = extensions(&out.bytes);
        let tc = t[0].typed_config.as_ref().unwrap();
        assert_eq!(tc.type_url, HTTP_RBAC_URL);
        assert!(tc.value.starts_with(&[0x0a, 0x00]));
        assert_eq!(
            HttpRbac::decode(tc.value.as_slice()).unwrap(),
            HttpRbac { rules: Some(Vec::new()), rules_stat_prefix: "wasm-default-deny".into(), ..Default::default() }
        );
        let tc = t[1].typed_config.as_ref().unwrap();
        assert_eq!(tc.type_url, NETWORK_RBAC_URL);
        assert_eq!(
            NetworkRbac::decode(tc.value.as_slice()).unwrap(),
            NetworkRbac { rules: Some(Vec::new()), stat_prefix: "wasm-default-deny".into() }
        );
        assert_eq!(counts(&m), [0, 0, 0, 0, 2, 0]);
    }

    #[test]
    fn missing_secret_and_missing_http_uri() {
        let (fake, m) = (Fake::default(), Metrics::new());
        let secret = wasm(
            Some(remote_code("http://h/m.wasm", "")),
            Some(env_vars(&[("ISTIO_META_WASM_IMAGE_PULL_SECRET", "")], &[])),
        );
        let no_uri = wasm(
            Some(AsyncDataSource {
                specifier: Some(wasm_ecds_testkit::proto::async_data_source::Specifier::Remote(RemoteDataSource {
                    http_uri: None,
                    sha256: "x".into(),
                    retry_policy: None,
                })),
            }),
            None,
        );
        let input = response(vec![wasm_resource("s", &secret), wasm_resource("u", &no_uri)]);
        let err = convert_sotw(&input, &fake, &policy(), &m).err().unwrap();
        assert_eq!(
            err.reason,
            "resource \"s\": module http://h/m.wasm: missing image pulling secret; \
             resource \"u\": wasm remote fetch does not have httpUri specified for config \"ns.plugin\""
        );
        assert_eq!(fake.call_count(), 0, "nothing to fetch");
        assert_eq!(counts(&m), [0, 0, 0, 0, 1, 1]);
        // fail-open turns both into allow RBAC
        let mut s2 = secret.clone();
        s2.config.as_mut().unwrap().failure_policy = 3;
        let mut u2 = no_uri.clone();
        u2.config.as_mut().unwrap().fail_open = true;
        let out = convert_sotw(&response(vec![wasm_resource("s", &s2), wasm_resource("u", &u2)]), &fake, &policy(), &m)
            .ok()
            .unwrap();
        assert!(extensions(&out.bytes).iter().all(|t| t.typed_config.as_ref().unwrap().type_url == HTTP_RBAC_URL));
    }
}
