//! Which addresses a fetch may connect to (SSRF rules), checked on every resolved address.
//!
//! Istio (`pkg/wasm/ssrf.go`) checks the resolved address in the dialer's `Control` hook. Here the same rules
//! sit in a ureq [`Resolver`]: ureq resolves every host it connects to through the agent's resolver — the
//! request's host, each redirect hop, and a CONNECT/SOCKS proxy — so every connection is checked. Pooled
//! connections were checked when they were opened.
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
use ureq::unversioned::transport::NextTimeout;

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
}

impl Resolver for GuardedResolver {
    fn resolve(&self, uri: &Uri, config: &Config, timeout: NextTimeout) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let sync = NextTimeout { after: ureq::unversioned::transport::time::Duration::NotHappening, ..timeout };
        let resolved = self.inner.resolve(uri, config, sync)?;
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
