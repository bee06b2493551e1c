//! Where a customer-configured (custom) provider may send requests. Customers choose those
//! base URLs, so without this guard a gateway key could reach the operator's internal network
//! or a cloud metadata service. The check runs at connect time, on every address DNS returns,
//! so a name that later resolves to a private address (DNS rebinding) is refused too; redirects
//! are never followed.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    hosts: HashSet<String>,
    nets: Vec<IpNet>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("'{0}' is neither a host name, an IP address nor a CIDR block")]
pub struct BadAllowEntry(pub String);

impl EgressPolicy {
    /// Entries are host names (exact, case-insensitive), IP addresses, or CIDR blocks that
    /// custom providers may reach even though they are private, loopback or link-local.
    pub fn new(entries: &[String]) -> Result<EgressPolicy, BadAllowEntry> {
        let mut policy = EgressPolicy::default();
        for e in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            if let Ok(net) = e.parse::<IpNet>() {
                policy.nets.push(net);
            } else if let Ok(ip) = e.parse::<IpAddr>() {
                policy.nets.push(IpNet::from(ip));
            } else if e
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            {
                policy.hosts.insert(e.to_ascii_lowercase());
            } else {
                return Err(BadAllowEntry(e.to_string()));
            }
        }
        Ok(policy)
    }

    pub fn host_allow_listed(&self, host: &str) -> bool {
        self.hosts.contains(&host.to_ascii_lowercase())
    }

    pub fn ip_allowed(&self, ip: IpAddr) -> bool {
        is_public(ip) || self.nets.iter().any(|n| n.contains(&ip))
    }
}

/// Globally routable unicast only: no loopback, private, link-local (which holds the cloud
/// metadata address 169.254.169.254), shared CGNAT, unspecified, multicast or documentation
/// ranges, and IPv4-mapped IPv6 judged as the IPv4 it maps.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80)
        }
    }
}

/// Checks a base URL before use: http(s) only, and an IP literal (which never reaches the
/// resolver) must itself be allowed.
pub fn check_url(policy: &EgressPolicy, url: &str) -> Result<(), String> {
    let u = reqwest::Url::parse(url).map_err(|_| "invalid base URL".to_string())?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err("only http and https are allowed".into());
    }
    let host = u
        .host_str()
        .ok_or_else(|| "the base URL has no host".to_string())?;
    match host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        Ok(ip) if !policy.ip_allowed(ip) => {
            Err(format!("address {ip} is not allowed for custom providers"))
        }
        _ => Ok(()),
    }
}

/// A resolver that drops every address the policy refuses, unless the host name itself is
/// allow-listed.
#[derive(Debug, Clone)]
pub struct GuardedResolver(pub Arc<EgressPolicy>);

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = Arc::clone(&self.0);
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let trusted = policy.host_allow_listed(&host);
            let allowed: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| trusted || policy.ip_allowed(a.ip()))
                .collect();
            if allowed.is_empty() {
                return Err(format!(
                    "{host} resolves only to addresses custom providers may not reach"
                )
                .into());
            }
            let addrs: Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_loopback_link_local_and_metadata_are_refused() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700::1111"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn the_allow_list_opens_named_hosts_ips_and_blocks() {
        let p = EgressPolicy::new(&[
            "10.0.0.0/8".into(),
            "127.0.0.1".into(),
            "ollama.internal".into(),
        ])
        .unwrap();
        assert!(p.ip_allowed("10.9.9.9".parse().unwrap()));
        assert!(p.ip_allowed("127.0.0.1".parse().unwrap()));
        assert!(!p.ip_allowed("192.168.0.1".parse().unwrap()));
        assert!(p.host_allow_listed("Ollama.Internal"));
        assert!(EgressPolicy::new(&["not a host!".into()]).is_err());
        assert!(check_url(&EgressPolicy::default(), "http://169.254.169.254/latest").is_err());
        assert!(check_url(&EgressPolicy::default(), "http://[::1]:8000/v1").is_err());
        assert!(check_url(&EgressPolicy::default(), "file:///etc/passwd").is_err());
        assert!(check_url(&EgressPolicy::default(), "https://llm.example.com/v1").is_ok());
        assert!(check_url(&p, "http://127.0.0.1:11434/v1").is_ok());
    }
}
