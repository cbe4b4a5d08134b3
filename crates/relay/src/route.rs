//! Where mail for a domain goes (RFC 5321 5.1).
//!
//! In order: a static transport map (domain → host:port; closed networks
//! and tests), a smarthost (every remote domain through one relay), or DNS:
//! the MX records by preference, each resolved to its addresses; with no
//! MX, the domain's own A/AAAA records ("implicit MX"); a null MX (one MX
//! of `.`, RFC 7505) means the domain accepts no mail: a permanent failure
//! without any connection. A domain that does not exist (NXDOMAIN) is
//! permanent too; a resolver that does not answer is temporary.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use hickory_resolver::error::{ResolveError, ResolveErrorKind};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::TokioAsyncResolver;

use crate::{RelayError, RelayResult};

/// A host name (or address) and a port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl HostPort {
    /// Parses `host`, `host:port`, `[v6]:port` or `v4:port`; `default_port`
    /// when none is given.
    pub fn parse(s: &str, default_port: u16) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty host".into());
        }
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(HostPort { host: addr.ip().to_string(), port: addr.port() });
        }
        if let Some(rest) = s.strip_prefix('[') {
            let (ip, port) = rest.split_once(']').ok_or_else(|| format!("'{s}': missing ']'"))?;
            let port = match port.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| format!("'{s}': bad port"))?,
                None if port.is_empty() => default_port,
                None => return Err(format!("'{s}': junk after ']'")),
            };
            ip.parse::<IpAddr>().map_err(|_| format!("'{s}': not an IP address"))?;
            return Ok(HostPort { host: ip.to_string(), port });
        }
        if s.parse::<IpAddr>().is_ok() {
            return Ok(HostPort { host: s.to_string(), port: default_port });
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|_| format!("'{s}': bad port"))?),
            None => (s, default_port),
        };
        if host.is_empty() || !host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') {
            return Err(format!("'{s}': not a host name"));
        }
        Ok(HostPort { host: host.trim_end_matches('.').to_ascii_lowercase(), port })
    }
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// One host to try, with its addresses, in order of preference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hop {
    /// The name the hop was found under (MX exchange, smarthost, map entry):
    /// for logs and for TLS server-name verification.
    pub name: String,
    pub addrs: Vec<SocketAddr>,
    /// True for the smarthost (AUTH is used there only).
    pub smarthost: bool,
}

/// How next hops are found.
#[derive(Clone, Debug, Default)]
pub struct RouteConfig {
    /// Domain → host:port, tried before anything else.
    pub transport: HashMap<String, HostPort>,
    /// Every other remote domain goes here when set.
    pub smarthost: Option<HostPort>,
    /// The DNS server to ask (the system's resolv.conf when `None`).
    pub resolver: Option<SocketAddr>,
    /// The SMTP port of MX hosts (25; tests use another).
    pub mx_port: u16,
}

/// Finds next hops. See the module documentation.
pub struct Router {
    config: RouteConfig,
    resolver: TokioAsyncResolver,
}

/// The key under which recipients share a connection and a backoff.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DestinationKey(pub String);

impl std::fmt::Display for DestinationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Router {
    /// A router; reads the system's resolver configuration when no resolver
    /// address is given (fails if it cannot be read).
    pub fn new(config: RouteConfig) -> RelayResult<Self> {
        let mut opts = ResolverOpts::default();
        opts.timeout = Duration::from_secs(5);
        opts.attempts = 2;
        let resolver = match config.resolver {
            Some(addr) => {
                let group = NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true);
                opts.use_hosts_file = false;
                TokioAsyncResolver::tokio(ResolverConfig::from_parts(None, Vec::new(), group), opts)
            }
            None => {
                let (conf, _) = hickory_resolver::system_conf::read_system_conf()
                    .map_err(|e| RelayError::Unavailable(format!("reading the system resolver configuration: {e}")))?;
                TokioAsyncResolver::tokio(conf, opts)
            }
        };
        Ok(Router { config, resolver })
    }

    /// The one host configured for `domain`, if any: its transport entry,
    /// else the smarthost (`true`). The order of precedence, written once.
    fn configured_host(&self, domain: &str) -> Option<(&HostPort, bool)> {
        match self.config.transport.get(domain) {
            Some(hp) => Some((hp, false)),
            None => self.config.smarthost.as_ref().map(|hp| (hp, true)),
        }
    }

    /// Recipients of `domain` share connections and backoff with the other
    /// domains of the same key: one smarthost, one map entry, or the domain.
    pub fn destination(&self, domain: &str) -> DestinationKey {
        match self.configured_host(domain) {
            Some((hp, _)) => DestinationKey(format!("[{hp}]")),
            None => DestinationKey(domain.to_string()),
        }
    }

    /// Whether mail for `domain` goes to the smarthost (no transport entry
    /// of its own, and a smarthost is configured): then the session's TLS
    /// policy is the smarthost's, whatever the domain's own.
    pub fn via_smarthost(&self, domain: &str) -> bool {
        matches!(self.configured_host(domain), Some((_, true)))
    }

    /// The hosts to try for `domain`, best first.
    pub async fn hops(&self, domain: &str) -> RelayResult<Vec<Hop>> {
        if let Some((hp, smarthost)) = self.configured_host(domain) {
            return Ok(vec![self.host_hop(hp, smarthost).await?]);
        }
        // An address literal (RFC 5321 4.1.3): that host, nothing to look up.
        if let Some(lit) = domain.strip_prefix('[').and_then(|d| d.strip_suffix(']')) {
            let ip: IpAddr = lit
                .trim_start_matches("IPv6:")
                .parse()
                .map_err(|_| RelayError::Permanent(format!("bad address literal {domain}")))?;
            return Ok(vec![Hop {
                name: domain.into(),
                addrs: vec![SocketAddr::new(ip, self.config.mx_port)],
                smarthost: false,
            }]);
        }
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        let mut exchanges: Vec<(u16, String)> = match self.resolver.mx_lookup(fqdn.as_str()).await {
            Ok(mx) => mx.iter().map(|r| (r.preference(), r.exchange().to_utf8())).collect(),
            Err(e) => match no_records(&e) {
                Some(true) => return Err(RelayError::Permanent(format!("550 5.1.2 domain {domain} does not exist"))),
                // RFC 5321 5.1: no MX, so the domain itself is the host.
                Some(false) => vec![(0, fqdn.clone())],
                None => return Err(RelayError::Temporary(format!("MX lookup for {domain}: {e}"))),
            },
        };
        if exchanges.len() == 1 && (exchanges[0].1 == "." || exchanges[0].1.is_empty()) {
            return Err(RelayError::Permanent(format!(
                "556 5.1.10 domain {domain} accepts no mail (null MX, RFC 7505)"
            )));
        }
        exchanges.retain(|(_, name)| name != "." && !name.is_empty());
        exchanges.sort_by_key(|(pref, _)| *pref);
        let mut hops = Vec::new();
        let mut last_error = None;
        for (_, name) in exchanges {
            match self.resolver.lookup_ip(name.as_str()).await {
                Ok(ips) => {
                    let addrs: Vec<SocketAddr> =
                        ips.iter().map(|ip| SocketAddr::new(ip, self.config.mx_port)).collect();
                    if !addrs.is_empty() {
                        hops.push(Hop { name: name.trim_end_matches('.').to_string(), addrs, smarthost: false });
                    }
                }
                Err(e) => last_error = Some(format!("address lookup for {name}: {e}")),
            }
        }
        if hops.is_empty() {
            return Err(RelayError::Temporary(
                last_error.unwrap_or_else(|| format!("no address for any mail exchanger of {domain}")),
            ));
        }
        Ok(hops)
    }

    async fn host_hop(&self, hp: &HostPort, smarthost: bool) -> RelayResult<Hop> {
        let addrs = match hp.host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, hp.port)],
            Err(_) => self
                .resolver
                .lookup_ip(format!("{}.", hp.host).as_str())
                .await
                .map_err(|e| RelayError::Temporary(format!("address lookup for {}: {e}", hp.host)))?
                .iter()
                .map(|ip| SocketAddr::new(ip, hp.port))
                .collect(),
        };
        Ok(Hop { name: hp.host.clone(), addrs, smarthost })
    }
}

/// `Some(true)`: the name does not exist; `Some(false)`: it exists without
/// records of that type; `None`: no answer (timeout, refusal...).
fn no_records(e: &ResolveError) -> Option<bool> {
    match e.kind() {
        ResolveErrorKind::NoRecordsFound { response_code, .. } => Some(*response_code == ResponseCode::NXDomain),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(
            HostPort::parse("mx.example.org", 25).unwrap(),
            HostPort { host: "mx.example.org".into(), port: 25 }
        );
        assert_eq!(
            HostPort::parse("Relay.Example.org.:587", 25).unwrap(),
            HostPort { host: "relay.example.org".into(), port: 587 }
        );
        assert_eq!(HostPort::parse("127.0.0.1:2525", 25).unwrap(), HostPort { host: "127.0.0.1".into(), port: 2525 });
        assert_eq!(HostPort::parse("[::1]:26", 25).unwrap(), HostPort { host: "::1".into(), port: 26 });
        assert_eq!(HostPort::parse("::1", 25).unwrap(), HostPort { host: "::1".into(), port: 25 });
        assert_eq!(HostPort::parse("[::1]:26", 25).unwrap().to_string(), "[::1]:26");
        assert!(HostPort::parse("", 25).is_err());
        assert!(HostPort::parse("a b:25", 25).is_err());
        assert!(HostPort::parse("host:x", 25).is_err());
    }
}
