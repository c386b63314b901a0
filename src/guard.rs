//! Which addresses a fetch may connect to (SSRF rules), checked on every resolved address.
//!
//! Istio (`pkg/wasm/ssrf.go`) checks the resolved address in the dialer's `Control` hook. Here the same rules
//! sit in a ureq [`Resolver`]: ureq resolves every host it connects to itself through the agent's resolver —
//! the request's host and each redirect hop when no proxy is used, and the proxy's own host — so every such
//! connection is checked. Pooled connections were checked when they were opened (ureq keys its pool by the
//! target's scheme and authority and the proxy).
//!
//! Through an HTTP(S) proxy, ureq does not resolve the target: it sends `CONNECT host:port` and the proxy
//! resolves and connects. So [`ProxiedTargetGuard`], the first link of the agent's connector chain, checks the
//! target of every connection that is about to go through a proxy (the first request and each redirect hop)
//! before anything is sent to the proxy: a literal IP against the rules, a host name by resolving it here —
//! every address it resolves to must be allowed, and a name that does not resolve here is refused. The proxy
//! resolves the name again itself and may get a different answer (another DNS view, or a changed record); the
//! check holds for what this host resolves.
//!
//! Blocked: link-local (169.254.0.0/16, fe80::/10) and link-local multicast (224.0.0.0/24, ff02::/16); the
//! cloud metadata addresses outside link-local (100.100.100.200, fd00:ec2::/32); the unspecified addresses
//! (0.0.0.0, ::), which Linux connects to the local host and where no module server lives — refused whatever
//! `blocked_cidrs` says, unlike Istio, whose rules allow them; and the operator's `blocked_cidrs`. Loopback and
//! private addresses are allowed unless listed. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is judged as
//! the IPv4 address it carries.

use std::io;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use ureq::config::Config;
use ureq::http::Uri;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{ConnectionDetails, Connector, NextTimeout};

/// The SSRF rules: the built-in ones plus the operator's blocked CIDRs.
#[derive(Debug, Clone, Default)]
pub(crate) struct AddressPolicy {
    blocked_cidrs: Vec<IpNet>,
}

impl AddressPolicy {
    pub fn new(blocked_cidrs: Vec<IpNet>) -> AddressPolicy {
        AddressPolicy { blocked_cidrs }
    }

    /// `Ok` if a connection to `ip` is allowed, else the reason, worded as Istio does.
    pub fn check(&self, ip: IpAddr) -> Result<(), String> {
        // Judge an IPv4-mapped IPv6 address as the IPv4 address it carries.
        let canonical = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            IpAddr::V4(_) => ip,
        };
        if is_link_local(canonical) {
            return Err(format!("connection blocked: resolved IP {canonical} is link-local"));
        }
        if is_cloud_metadata(canonical) {
            return Err(format!("connection blocked: resolved IP {canonical} is a known cloud metadata address"));
        }
        if canonical.is_unspecified() {
            return Err(format!("connection blocked: resolved IP {canonical} is unspecified"));
        }
        // Operator CIDRs are matched against both spellings, so `::ffff:0:0/96` blocks mapped addresses and
        // `10.0.0.0/8` blocks `::ffff:10.1.2.3`.
        if let Some(net) = self.blocked_cidrs.iter().find(|net| net.contains(&canonical) || net.contains(&ip)) {
            return Err(format!("connection blocked: resolved IP {canonical} is in blocked CIDR range {net}"));
        }
        Ok(())
    }
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        // 169.254.0.0/16 unicast, 224.0.0.0/24 link-local multicast
        IpAddr::V4(v4) => {
            let o = v4.octets();
            (o[0] == 169 && o[1] == 254) || (o[0] == 224 && o[1] == 0 && o[2] == 0)
        }
        // fe80::/10 unicast, ff02::/16 link-local multicast
        IpAddr::V6(v6) => {
            let s = v6.segments();
            (s[0] & 0xffc0) == 0xfe80 || s[0] == 0xff02
        }
    }
}

fn is_cloud_metadata(ip: IpAddr) -> bool {
    match ip {
        // Alibaba Cloud
        IpAddr::V4(v4) => v4 == Ipv4Addr::new(100, 100, 100, 200),
        // AWS IMDS over IPv6: fd00:ec2::/32
        IpAddr::V6(v6) => v6.segments()[0] == 0xfd00 && v6.segments()[1] == 0x0ec2,
    }
}

/// A ureq resolver that resolves like ureq's default one and then drops the addresses the policy refuses.
/// If every address is refused, resolution fails with the first refusal (an I/O `PermissionDenied` error
/// carrying Istio's wording), which the fetcher treats as a transport error.
///
/// Resolution is synchronous: the default resolver spawns a helper thread when a timeout is set, and that
/// thread may outlive the call; the library promises no thread outlives a call. A stalled DNS lookup is then
/// bounded by the system resolver's own timeout rather than the fetch deadline. Literal IPs resolve at once.
#[derive(Debug)]
pub(crate) struct GuardedResolver {
    inner: DefaultResolver,
    policy: AddressPolicy,
}

impl GuardedResolver {
    pub fn new(policy: AddressPolicy) -> GuardedResolver {
        GuardedResolver { inner: DefaultResolver::default(), policy }
    }

    /// Resolves `uri`'s host synchronously (see the type's docs), unfiltered.
    fn resolve_all(
        &self,
        uri: &Uri,
        config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let sync = NextTimeout { after: ureq::unversioned::transport::time::Duration::NotHappening, ..timeout };
        self.inner.resolve(uri, config, sync)
    }

    /// `Ok` if every address `uri`'s host resolves to is allowed: the check for a target a proxy will connect
    /// to, where which address it picks is not ours to choose. A host that does not resolve here is refused.
    fn check_all(&self, uri: &Uri, config: &Config, timeout: NextTimeout) -> Result<(), ureq::Error> {
        let blocked = |reason: String| ureq::Error::Io(io::Error::new(io::ErrorKind::PermissionDenied, reason));
        let host = uri.host().unwrap_or_default();
        let resolved = self.resolve_all(uri, config, timeout).map_err(|e| {
            let why = match e {
                ureq::Error::Io(e) => e.to_string(),
                other => other.to_string(),
            };
            blocked(format!("connection blocked: cannot check {host} before asking the proxy for it: {why}"))
        })?;
        if resolved.is_empty() {
            return Err(blocked(format!("connection blocked: {host} resolves to no address")));
        }
        for addr in resolved.iter() {
            self.policy.check(addr.ip()).map_err(blocked)?;
        }
        Ok(())
    }
}

impl Resolver for GuardedResolver {
    fn resolve(&self, uri: &Uri, config: &Config, timeout: NextTimeout) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let resolved = self.resolve_all(uri, config, timeout)?;
        let mut allowed = self.inner.empty();
        let mut refusal = None;
        for addr in resolved.iter() {
            match self.policy.check(addr.ip()) {
                Ok(()) => allowed.push(*addr),
                Err(reason) => {
                    log::debug!("wasm fetch: refusing {addr}: {reason}");
                    refusal.get_or_insert(reason);
                }
            }
        }
        if allowed.is_empty() {
            let reason = refusal.unwrap_or_else(|| "connection blocked: no address to connect to".to_string());
            return Err(ureq::Error::Io(io::Error::new(io::ErrorKind::PermissionDenied, reason)));
        }
        Ok(allowed)
    }
}

/// The first link of the agent's connector chain: a connection about to go through a proxy is refused unless
/// its target passes [`GuardedResolver::check_all`]; other connections pass untouched (ureq resolves their host
/// through the [`GuardedResolver`] itself). It runs on every connection ureq opens — the first request and each
/// redirect hop, each attempt — and before any byte goes to the proxy. The proxy's own connection is opened
/// through the same chain with the proxy removed from its config, so it passes here and is checked by the
/// resolver.
#[derive(Debug)]
pub(crate) struct ProxiedTargetGuard {
    resolver: GuardedResolver,
}

impl ProxiedTargetGuard {
    pub fn new(policy: AddressPolicy) -> ProxiedTargetGuard {
        ProxiedTargetGuard { resolver: GuardedResolver::new(policy) }
    }
}

impl Connector for ProxiedTargetGuard {
    type Out = ();

    fn connect(&self, details: &ConnectionDetails, chained: Option<()>) -> Result<Option<()>, ureq::Error> {
        // ureq goes through the proxy exactly when one is set and the host is not in its NO_PROXY list.
        let proxied = details.config.proxy().is_some_and(|p| !p.is_no_proxy(details.uri));
        if proxied {
            self.resolver.check_all(details.uri, details.config, details.timeout)?;
        }
        Ok(chained)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn reason(policy: &AddressPolicy, s: &str) -> String {
        policy.check(ip(s)).unwrap_err()
    }

    #[test]
    fn link_local_is_blocked() {
        let p = AddressPolicy::default();
        for a in ["169.254.169.254", "169.254.0.1", "169.254.255.255", "224.0.0.251", "fe80::1", "febf::1", "ff02::1"] {
            let r = reason(&p, a);
            assert!(r.ends_with("is link-local"), "{a}: {r}");
        }
        assert_eq!(reason(&p, "169.254.169.254"), "connection blocked: resolved IP 169.254.169.254 is link-local");
    }

    #[test]
    fn metadata_addresses_are_blocked() {
        let p = AddressPolicy::default();
        assert_eq!(
            reason(&p, "100.100.100.200"),
            "connection blocked: resolved IP 100.100.100.200 is a known cloud metadata address"
        );
        assert_eq!(
            reason(&p, "fd00:ec2::254"),
            "connection blocked: resolved IP fd00:ec2::254 is a known cloud metadata address"
        );
        assert!(reason(&p, "fd00:ec2:ffff::1").contains("metadata"));
    }

    #[test]
    fn ordinary_addresses_are_allowed_by_default() {
        let p = AddressPolicy::default();
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "100.100.100.201",
            "169.253.255.255",
            "169.255.0.0",
            "224.0.1.1",
            "8.8.8.8",
            "::1",
            "fd00::1",
            "fd00:ec3::1",
            "fec0::1",
            "ff05::1",
            "2001:db8::1",
        ] {
            assert_eq!(p.check(ip(a)), Ok(()), "{a}");
        }
    }

    #[test]
    fn unspecified_is_always_blocked() {
        // Linux connects 0.0.0.0 and :: to the local host; no module server lives there.
        for p in [AddressPolicy::default(), AddressPolicy::new(vec!["10.0.0.0/8".parse().unwrap()])] {
            assert_eq!(reason(&p, "0.0.0.0"), "connection blocked: resolved IP 0.0.0.0 is unspecified");
            assert_eq!(reason(&p, "::"), "connection blocked: resolved IP :: is unspecified");
            assert_eq!(reason(&p, "::ffff:0.0.0.0"), "connection blocked: resolved IP 0.0.0.0 is unspecified");
        }
        // The rest of 0.0.0.0/8 is ordinary unicast to Linux (routed, not local).
        assert_eq!(AddressPolicy::default().check(ip("0.1.2.3")), Ok(()));
    }

    #[test]
    fn ipv4_mapped_ipv6_is_judged_as_ipv4() {
        let p = AddressPolicy::default();
        assert_eq!(
            reason(&p, "::ffff:169.254.169.254"),
            "connection blocked: resolved IP 169.254.169.254 is link-local"
        );
        assert!(reason(&p, "::ffff:100.100.100.200").contains("metadata"));
        assert_eq!(p.check(ip("::ffff:127.0.0.1")), Ok(()));
        let p = AddressPolicy::new(vec!["10.0.0.0/8".parse().unwrap()]);
        assert_eq!(
            reason(&p, "::ffff:10.9.8.7"),
            "connection blocked: resolved IP 10.9.8.7 is in blocked CIDR range 10.0.0.0/8"
        );
        let p = AddressPolicy::new(vec!["::ffff:0:0/96".parse().unwrap()]);
        assert!(reason(&p, "::ffff:8.8.8.8").contains("blocked CIDR range ::ffff:0.0.0.0/96"));
    }

    #[test]
    fn blocked_cidrs() {
        let p = AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap(), "2001:db8::/32".parse().unwrap()]);
        assert_eq!(
            reason(&p, "127.0.0.1"),
            "connection blocked: resolved IP 127.0.0.1 is in blocked CIDR range 127.0.0.0/8"
        );
        assert_eq!(
            reason(&p, "2001:db8::5"),
            "connection blocked: resolved IP 2001:db8::5 is in blocked CIDR range 2001:db8::/32"
        );
        assert_eq!(p.check(ip("128.0.0.1")), Ok(()));
        assert_eq!(p.check(ip("::1")), Ok(()));
        // Built-in rules are reported first.
        let p = AddressPolicy::new(vec!["0.0.0.0/0".parse().unwrap()]);
        assert!(reason(&p, "169.254.1.1").ends_with("is link-local"));
    }

    #[test]
    fn proxied_targets_must_resolve_to_allowed_addresses_only() {
        let cfg = Config::default();
        let check = |policy: AddressPolicy, uri: &str| {
            let uri: Uri = uri.parse().unwrap();
            match GuardedResolver::new(policy).check_all(&uri, &cfg, NextTimeout::default()) {
                Ok(()) => Ok(()),
                Err(ureq::Error::Io(e)) if e.kind() == io::ErrorKind::PermissionDenied => Err(e.to_string()),
                Err(other) => panic!("{other:?}"),
            }
        };
        let loopback = || AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()]);
        // A host name is resolved here: localhost is loopback whichever family /etc/hosts gives it.
        let err = check(loopback(), "http://localhost:1/m.wasm").unwrap_err();
        assert!(err.starts_with("connection blocked: resolved IP ") && err.contains("blocked CIDR range"), "{err}");
        assert_eq!(
            check(loopback(), "https://127.0.0.1/").unwrap_err(),
            "connection blocked: resolved IP 127.0.0.1 is in blocked CIDR range 127.0.0.0/8"
        );
        assert_eq!(
            check(AddressPolicy::default(), "http://[::]/").unwrap_err(),
            "connection blocked: resolved IP :: is unspecified"
        );
        assert_eq!(check(AddressPolicy::default(), "http://localhost:1/"), Ok(()));
        assert_eq!(check(AddressPolicy::default(), "http://198.51.100.7/"), Ok(()));
        // A name that does not resolve here cannot be checked, so it is refused.
        let err = check(AddressPolicy::default(), "http://wasm.example.invalid/").unwrap_err();
        assert!(
            err.starts_with("connection blocked: cannot check wasm.example.invalid before asking the proxy for it: "),
            "{err}"
        );
    }

    #[test]
    fn resolver_filters_and_refuses() {
        let cfg = Config::default();
        let blocked = GuardedResolver::new(AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]));
        let uri: Uri = "http://127.0.0.1:9/x".parse().unwrap();
        let err = blocked.resolve(&uri, &cfg, NextTimeout::default()).unwrap_err();
        match err {
            ureq::Error::Io(e) => {
                assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
                assert_eq!(
                    e.to_string(),
                    "connection blocked: resolved IP 127.0.0.1 is in blocked CIDR range 127.0.0.0/8"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        let open = GuardedResolver::new(AddressPolicy::default());
        let addrs = open.resolve(&uri, &cfg, NextTimeout::default()).unwrap();
        assert_eq!(addrs.len(), 1);
        let metadata: Uri = "http://169.254.169.254/latest/meta-data".parse().unwrap();
        assert!(open.resolve(&metadata, &cfg, NextTimeout::default()).is_err());
        let mapped: Uri = "http://[::ffff:169.254.169.254]/".parse().unwrap();
        assert!(open.resolve(&mapped, &cfg, NextTimeout::default()).is_err());
    }
}
