//! Requests a tenant directs (its `upstream` functions, its callback URLs) go only where the
//! operator allows: never to loopback, private, link-local or other internal addresses (where
//! the platform's own collector, dashboard and state store listen), unless the operator lists
//! them (`--allow-outbound`). Addresses are checked after DNS resolution, by the client's own
//! resolver, so a name cannot resolve to one address when checked and another when connected;
//! a URL with an IP literal is checked before it is sent. Redirects are not followed.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// The operator's exceptions: CIDR blocks (`10.1.0.0/16`, `127.0.0.1/32`) or host names.
#[derive(Debug, Clone, Default)]
pub struct OutboundPolicy {
    networks: Vec<(IpAddr, u8)>,
    hosts: Vec<String>,
}

impl OutboundPolicy {
    /// Parses `--allow-outbound` entries.
    pub fn new(allow: &[String]) -> Result<Self, String> {
        let mut policy = Self::default();
        for entry in allow {
            let entry = entry.trim();
            match entry.split_once('/') {
                Some((ip, bits)) => {
                    let ip: IpAddr =
                        ip.parse().map_err(|_| format!("--allow-outbound {entry:?}: not an IP network"))?;
                    let max = if ip.is_ipv4() { 32 } else { 128 };
                    let bits: u8 = bits
                        .parse()
                        .ok()
                        .filter(|b| *b <= max)
                        .ok_or_else(|| format!("--allow-outbound {entry:?}: prefix length must be 0 to {max}"))?;
                    policy.networks.push((ip, bits));
                }
                None => match entry.parse::<IpAddr>() {
                    Ok(ip) => policy.networks.push((ip, if ip.is_ipv4() { 32 } else { 128 })),
                    Err(_) if !entry.is_empty() => policy.hosts.push(entry.to_ascii_lowercase()),
                    Err(_) => return Err("--allow-outbound: empty entry".into()),
                },
            }
        }
        Ok(policy)
    }

    /// Whether a request to `ip` (of host `host`) may go out.
    pub fn allows(&self, host: &str, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        is_public(ip)
            || self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
            || self.networks.iter().any(|(network, bits)| contains(*network, *bits, ip))
    }

    /// Checks a URL whose host is an IP literal (names are checked when they resolve).
    pub fn check_url(&self, url: &str) -> Result<(), String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        let host = parsed.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
        let Ok(ip) = host.parse::<IpAddr>() else { return Ok(()) };
        if self.allows(&ip.to_string(), ip) { Ok(()) } else { Err(denied(&ip.to_string(), ip)) }
    }
}

/// The policy with its client: what tenant-directed requests go through.
#[derive(Debug, Clone)]
pub struct Outbound {
    policy: OutboundPolicy,
    client: reqwest::Client,
}

impl Outbound {
    pub fn new(policy: OutboundPolicy) -> Self {
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(30))
            .dns_resolver(Arc::new(policy.clone()))
            .build()
            .expect("a plain HTTP client builds");
        Self { policy, client }
    }

    /// The client, for `url` if the policy lets it go there (names are checked again when the
    /// client resolves them).
    pub fn to(&self, url: &str) -> Result<&reqwest::Client, String> {
        self.policy.check_url(url)?;
        Ok(&self.client)
    }
}

fn denied(host: &str, ip: IpAddr) -> String {
    format!(
        "outbound request to {host} ({ip}) refused: an internal address (the operator may allow it with --allow-outbound)"
    )
}

impl reqwest::dns::Resolve for OutboundPolicy {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = resolved.iter().copied().filter(|a| policy.allows(&host, a.ip())).collect();
            match (allowed.is_empty(), resolved.first()) {
                (false, _) => Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs),
                (true, Some(first)) => Err(denied(&host, first.ip()).into()),
                (true, None) => Err(format!("{host} did not resolve").into()),
            }
        })
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `ip` is a public unicast address.
fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
                || (a == 192 && b == 0) // IETF protocol assignments
                || (a == 198 && (18..20).contains(&b)) // benchmarking
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            let [first, second, ..] = v6.segments();
            // Global unicast only (2000::/3), and none of its blocks that reach IPv4 or other
            // networks through a gateway (NAT64, 6to4, Teredo): they may lead to private or
            // metadata addresses. (IPv4-mapped addresses were made IPv4 by `canonical`.)
            (first & 0xe000) == 0x2000
                && first != 0x2002 // 6to4
                && !(first == 0x2001 && second == 0) // Teredo
                && !(first == 0x2001 && second == 0xdb8) // documentation
        }
    }
}

fn contains(network: IpAddr, bits: u8, ip: IpAddr) -> bool {
    match (canonical(network), ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let mask = if bits == 0 { 0 } else { u32::MAX << (32 - u32::from(bits)) };
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let mask = if bits == 0 { 0 } else { u128::MAX << (128 - u32::from(bits)) };
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_refused_unless_allowed() {
        let none = OutboundPolicy::default();
        for internal in ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0", "::1"] {
            assert!(!none.allows("h", internal.parse().unwrap()), "{internal}");
        }
        assert!(!none.allows("h", "::ffff:127.0.0.1".parse().unwrap()), "IPv4-mapped loopback");
        assert!(!none.allows("h", "100.64.0.1".parse().unwrap()));
        assert!(none.allows("h", "93.184.216.34".parse().unwrap()));
        assert!(none.allows("h", "2606:2800:220:1::1".parse().unwrap()));
        // IPv6 ways back to IPv4 or other networks: NAT64 (to the metadata address here),
        // IPv4-compatible, 6to4, Teredo, site-local; and IPv4's benchmarking block.
        for gateway in
            ["64:ff9b::a9fe:a9fe", "64:ff9b:1::1", "::a9fe:a9fe", "2002:a9fe:a9fe::1", "2001:0:1::1", "fec0::1"]
        {
            assert!(!none.allows("h", gateway.parse().unwrap()), "{gateway}");
        }
        assert!(!none.allows("h", "198.18.0.1".parse().unwrap()));
        let some = OutboundPolicy::new(&["127.0.0.1/32".into(), "10.0.0.0/8".into(), "s3.internal".into()]).unwrap();
        assert!(some.allows("x", "127.0.0.1".parse().unwrap()));
        assert!(!some.allows("x", "127.0.0.2".parse().unwrap()));
        assert!(some.allows("x", "10.200.0.1".parse().unwrap()));
        assert!(some.allows("S3.internal", "192.168.0.9".parse().unwrap()));
        assert!(none.check_url("http://127.0.0.1:4318/metrics").is_err());
        assert!(none.check_url("http://[::1]/").is_err());
        assert!(none.check_url("http://example.com/").is_ok(), "names are checked when they resolve");
        assert!(OutboundPolicy::new(&["10.0.0.0/33".into()]).is_err());
    }
}
