//! The configuration file (TOML) and its built-in defaults.
//!
//! Every field has a default, so `hamail serve` with no file is a working
//! server on loopback. Errors name the file and the line (a typo in a mail
//! server's config must not be a guessing game), and unknown keys are errors
//! rather than silently ignored.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ServerError;

/// When a plaintext password (AUTH PLAIN/LOGIN, POP3 USER/PASS) is accepted
/// on a connection that is not TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlaintextAuth {
    /// Only after STARTTLS/STLS or on implicit TLS ports.
    Never,
    /// Also on connections from 127.0.0.0/8 and ::1 (the default: local tools
    /// and tests; nothing crosses a network in clear).
    Loopback,
    /// Always (closed networks only).
    Always,
}

impl PlaintextAuth {
    pub fn allows(self, peer: &SocketAddr) -> bool {
        match self {
            PlaintextAuth::Never => false,
            PlaintextAuth::Always => true,
            PlaintextAuth::Loopback => peer.ip().is_loopback(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[derive(Default)]
pub struct Config {
    pub server: ServerSection,
    pub smtp: SmtpSection,
    pub pop3: Pop3Section,
    pub tls: TlsSection,
    pub admin: AdminSection,
    pub cluster: ClusterSection,
    pub relay: RelaySection,
}

/// TLS for outbound SMTP (per destination domain, or the default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Never STARTTLS (closed networks, tests).
    Never,
    /// STARTTLS when offered, any certificate (RFC 7435); plaintext otherwise.
    #[default]
    Opportunistic,
    /// STARTTLS or no delivery (deferred), any certificate.
    Require,
    /// STARTTLS with a certificate valid for the host name (system CAs).
    Verify,
}

/// A `host[:port]` from the config file, checked when parsed (so that an
/// error names its line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPortSpec(pub hamail_relay::route::HostPort);

impl<'de> Deserialize<'de> for HostPortSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        hamail_relay::route::HostPort::parse(&s, 25).map(HostPortSpec).map_err(serde::de::Error::custom)
    }
}

/// Outbound delivery (the relay queue).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelaySection {
    /// Whether this node delivers queued mail (false: it waits in the queue).
    pub enabled: bool,
    /// Send all remote mail through this host (`host[:port]`, port 25 by
    /// default) instead of looking up MX records.
    pub smarthost: Option<HostPortSpec>,
    /// AUTH PLAIN/LOGIN credentials for the smarthost (sent only over TLS
    /// unless `smarthost_tls = "never"`).
    pub smarthost_user: Option<String>,
    pub smarthost_password: Option<String>,
    pub smarthost_tls: TlsMode,
    /// The default TLS policy for MX delivery.
    pub tls: TlsMode,
    /// Per-domain TLS policy: `{ "bank.example" = "verify" }`.
    pub tls_policy: std::collections::HashMap<String, TlsMode>,
    /// Static routes: `{ "example.test" = "127.0.0.1:2526" }`, before DNS.
    pub transport: std::collections::HashMap<String, HostPortSpec>,
    /// The DNS server for MX/A/AAAA lookups (default: /etc/resolv.conf).
    pub resolver: Option<SocketAddr>,
    /// The port of MX hosts.
    pub mx_port: u16,
    /// CA certificates for the `verify` policy.
    pub ca_file: PathBuf,
    /// First retry after this; doubled per failure up to `retry_max_secs`.
    pub retry_initial_secs: u64,
    pub retry_max_secs: u64,
    /// Undelivered this long after arrival: bounced (RFC 5321 4.5.4.1).
    pub lifetime_secs: u64,
    /// Undelivered this long: one delay warning to the sender (0: never).
    pub delay_warning_secs: u64,
    /// Outbound sessions at once, in all.
    pub max_connections: usize,
    /// Outbound sessions at once to one destination.
    pub max_per_destination: usize,
    /// Messages carried by one session before it ends.
    pub messages_per_session: usize,
    /// How often the queue is scanned for due mail.
    pub scan_interval_ms: u64,
    pub connect_timeout_secs: u64,
    /// RFC 5321 4.5.3.2 suggests minutes; one value for every command here.
    pub command_timeout_secs: u64,
}

impl Default for RelaySection {
    fn default() -> Self {
        RelaySection {
            enabled: true,
            smarthost: None,
            smarthost_user: None,
            smarthost_password: None,
            smarthost_tls: TlsMode::Opportunistic,
            tls: TlsMode::Opportunistic,
            tls_policy: Default::default(),
            transport: Default::default(),
            resolver: None,
            mx_port: 25,
            ca_file: PathBuf::from("/etc/ssl/certs/ca-certificates.crt"),
            retry_initial_secs: 300,
            retry_max_secs: 4 * 3600,
            lifetime_secs: 5 * 86400,
            delay_warning_secs: 4 * 3600,
            max_connections: 20,
            max_per_destination: 4,
            messages_per_session: 100,
            scan_interval_ms: 1000,
            connect_timeout_secs: 30,
            command_timeout_secs: 300,
        }
    }
}

impl RelaySection {
    pub fn route_config(&self) -> hamail_relay::route::RouteConfig {
        hamail_relay::route::RouteConfig {
            transport: self.transport.iter().map(|(d, hp)| (d.trim_end_matches('.').to_ascii_lowercase(), hp.0.clone())).collect(),
            smarthost: self.smarthost.as_ref().map(|h| h.0.clone()),
            resolver: self.resolver,
            mx_port: self.mx_port,
        }
    }

    pub fn schedule(&self) -> hamail_relay::schedule::Schedule {
        hamail_relay::schedule::Schedule {
            initial_backoff: self.retry_initial_secs,
            max_backoff: self.retry_max_secs,
            lifetime: self.lifetime_secs,
            delay_warning: self.delay_warning_secs,
        }
    }

    pub fn tls_for(&self, domain: &str, smarthost: bool) -> TlsMode {
        if smarthost {
            return self.smarthost_tls;
        }
        self.domain_tls(domain).unwrap_or(self.tls)
    }

    /// The `tls_policy` entry of `domain`, if it has one (domain names
    /// compare without case and trailing dot, as in `transport`).
    pub fn domain_tls(&self, domain: &str) -> Option<TlsMode> {
        let domain = domain.trim_end_matches('.');
        self.tls_policy.iter().find(|(d, _)| d.trim_end_matches('.').eq_ignore_ascii_case(domain)).map(|(_, m)| *m)
    }

    pub fn smarthost_auth(&self) -> Option<(String, String)> {
        match (&self.smarthost_user, &self.smarthost_password) {
            (Some(u), Some(p)) => Some((u.clone(), p.clone())),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Our name in greetings and `Received:` headers.
    pub hostname: String,
    /// Where the store (bodies, metadata), the generated certificate and the
    /// admin socket live.
    pub data_dir: PathBuf,
    /// Other names of this host whose mail is local (the seed's sendmail
    /// `Cw` class): `user@name` is delivered as `user@<a configured domain>`.
    pub local_hostnames: Vec<String>,
    /// Domains created at start if missing (convenience for deployments
    /// managed as files; `hamail domain add` does the same at run time).
    pub domains: Vec<String>,
    /// Delay before answering a failed login (SMTP AUTH, POP3), doubled for
    /// every further failure from the same address (up to 30 s).
    pub auth_failure_delay_ms: u64,
    /// Memory, in MiB, that clients may make this node hold for buffers
    /// (message data before its body file, body copies to other nodes,
    /// reply chunks), all connections together. When it is spent, clients
    /// get a temporary refusal (`451 4.3.1`, `-ERR [SYS/TEMP]`).
    pub memory_budget_mb: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpSection {
    /// MTA port (25 in production): mail for local domains, no AUTH.
    pub listen: Vec<SocketAddr>,
    /// Submission with STARTTLS and AUTH (587, RFC 6409).
    pub submission: Vec<SocketAddr>,
    /// Submission over implicit TLS (465, RFC 8314).
    pub submissions: Vec<SocketAddr>,
    pub max_message_size: usize,
    pub max_recipients: usize,
    pub max_connections: usize,
    /// RFC 5321 4.5.3.2.7 asks for at least 5 minutes. Counted from the
    /// last complete command (a command line trickled in byte by byte does
    /// not reset it), and between reads in DATA.
    pub idle_timeout_secs: u64,
    /// The whole DATA phase of one message, from `354` to its end (RFC
    /// 5321 4.5.3.2.6 asks for at least 10 minutes): then `421` and close.
    pub data_timeout_secs: u64,
    pub plaintext_auth: PlaintextAuth,
    /// RFC 1047: a transaction sent again within this many seconds (same
    /// Message-ID, envelope and data: the client lost our `250`) is
    /// answered `250` and delivered once. 0 turns it off.
    pub resend_window_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pop3Section {
    pub listen: Vec<SocketAddr>,
    /// POP3 over implicit TLS (995).
    pub pop3s: Vec<SocketAddr>,
    pub max_connections: usize,
    /// RFC 1939 3: the autologout timer must be at least 10 minutes.
    pub idle_timeout_secs: u64,
    pub plaintext_auth: PlaintextAuth,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// PEM certificate chain; with `key`. When both are absent a self-signed
    /// certificate is generated at first start under `<data_dir>/tls/`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// The node's part in a cluster. Without `listen` the node never talks to
/// others: a one-node cluster of itself (the store is local).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// The cluster (Raft, replication) listener, mutual TLS. Required for
    /// `hamail cluster init` and `join`.
    pub listen: Option<SocketAddr>,
    /// The address other nodes use to reach this one (default: `listen`).
    pub advertise: Option<String>,
    /// "data" (mail services and mail) or "witness" (votes only: no mail
    /// listeners, no mail).
    pub role: ClusterRole,
    /// Leader heartbeat interval.
    pub heartbeat_ms: u64,
    /// A follower that hears nothing for a random time in this range starts
    /// an election. See the README for the trade-off.
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Durable copies of a message (on distinct data nodes, this one
    /// included) required before `250`. Default: every live data node, at
    /// least one (mail keeps flowing while a node is down; `cluster status`
    /// shows degraded accepts). More than that: refused with 451 instead.
    pub required_copies: Option<usize>,
    /// Failover groups: a node runs its groups only while a quorum lease
    /// renewed every ~100 ms is younger than this.
    pub group_lease_ms: u64,
    /// The longest a group's stop may take (scripts, unmount included),
    /// unless the group sets its own `stop_timeout_ms`; the leader waits
    /// lease + this + a margin before giving a silent node's group to
    /// another.
    pub group_stop_timeout_ms: u64,
    /// The same for a group of addresses and mail listeners only (they stop
    /// in milliseconds) when its node loses the lease: what makes their
    /// takeover sub-second. A move still drains for up to
    /// `group_stop_timeout_ms`.
    pub group_fast_stop_timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterRole {
    Data,
    Witness,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            listen: None,
            advertise: None,
            role: ClusterRole::Data,
            heartbeat_ms: 50,
            election_timeout_min_ms: 150,
            election_timeout_max_ms: 300,
            required_copies: None,
            group_lease_ms: 600,
            group_stop_timeout_ms: 2000,
            group_fast_stop_timeout_ms: 100,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// The admin API's Unix socket; default `<data_dir>/admin.sock`.
    pub socket: Option<PathBuf>,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            hostname: system_hostname(),
            data_dir: PathBuf::from("hamail-data"),
            local_hostnames: Vec::new(),
            domains: Vec::new(),
            auth_failure_delay_ms: 1000,
            memory_budget_mb: 256,
        }
    }
}

impl Default for SmtpSection {
    fn default() -> Self {
        SmtpSection {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 2525))],
            submission: vec![SocketAddr::from(([127, 0, 0, 1], 2587))],
            submissions: Vec::new(),
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 1000,
            max_connections: 500,
            idle_timeout_secs: 300,
            data_timeout_secs: 600,
            plaintext_auth: PlaintextAuth::Loopback,
            resend_window_secs: 3600,
        }
    }
}

impl Default for Pop3Section {
    fn default() -> Self {
        Pop3Section {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 2110))],
            pop3s: Vec::new(),
            max_connections: 500,
            idle_timeout_secs: 600,
            plaintext_auth: PlaintextAuth::Loopback,
        }
    }
}


fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

impl Config {
    /// How this node opens a mail store (its own, or a group's on a shared
    /// disk): its host names are local, bodies and commits are fsynced.
    pub fn store_options(&self) -> Result<hamail_store::StoreOptions, ServerError> {
        let mut hostnames = vec![hamail_store::Domain::parse(&self.server.hostname)?];
        for h in &self.server.local_hostnames {
            hostnames.push(hamail_store::Domain::parse(h)?);
        }
        Ok(hamail_store::StoreOptions { hostnames, ..hamail_store::StoreOptions::default() })
    }

    /// Reads `path`; errors name the file and the line.
    pub fn load(path: &Path) -> Result<Config, ServerError> {
        let text = std::fs::read_to_string(path).map_err(|e| ServerError::Config {
            file: path.display().to_string(),
            line: None,
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses a config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ServerError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|span| line_of(text, span.start));
            ServerError::Config {
                file: origin.to_string(),
                line,
                message: e.message().to_string(),
            }
        })?;
        config.validate(origin)?;
        Ok(config)
    }

    fn validate(&self, origin: &str) -> Result<(), ServerError> {
        let bad = |message: String| ServerError::Config { file: origin.to_string(), line: None, message };
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(bad("[tls] needs both `cert` and `key`, or neither".into()));
        }
        if self.smtp.max_recipients == 0 {
            return Err(bad("[smtp] max_recipients must be at least 1 (RFC 5321 4.5.3.1.8 asks for 100)".into()));
        }
        if self.smtp.max_message_size < 1024 {
            return Err(bad("[smtp] max_message_size must be at least 1024 bytes".into()));
        }
        if self.smtp.data_timeout_secs == 0 {
            return Err(bad("[smtp] data_timeout_secs must be at least 1 (RFC 5321 4.5.3.2.6 asks for 10 minutes)".into()));
        }
        let k = &self.cluster;
        if k.heartbeat_ms == 0 || k.election_timeout_min_ms <= k.heartbeat_ms * 2 {
            return Err(bad("[cluster] election_timeout_min_ms must be more than twice heartbeat_ms".into()));
        }
        if k.election_timeout_max_ms <= k.election_timeout_min_ms {
            return Err(bad("[cluster] election_timeout_max_ms must be above election_timeout_min_ms".into()));
        }
        if k.group_lease_ms < 2 * k.heartbeat_ms || k.group_stop_timeout_ms == 0 || k.group_fast_stop_timeout_ms == 0 {
            return Err(bad(
                "[cluster] group_lease_ms must be at least twice heartbeat_ms, group_stop_timeout_ms and group_fast_stop_timeout_ms above 0"
                    .into(),
            ));
        }
        let r = &self.relay;
        if r.smarthost_user.is_some() != r.smarthost_password.is_some() {
            return Err(bad("[relay] needs both `smarthost_user` and `smarthost_password`, or neither".into()));
        }
        if r.retry_initial_secs == 0 || r.retry_max_secs < r.retry_initial_secs || r.lifetime_secs == 0 {
            return Err(bad("[relay] retry_initial_secs must be above 0 and at most retry_max_secs; lifetime_secs above 0".into()));
        }
        if r.max_connections == 0 || r.max_per_destination == 0 || r.messages_per_session == 0 {
            return Err(bad("[relay] max_connections, max_per_destination and messages_per_session must be at least 1".into()));
        }
        if self.server.hostname.trim().is_empty() {
            return Err(bad("[server] hostname must not be empty".into()));
        }
        Ok(())
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.admin.socket.clone().unwrap_or_else(|| self.server.data_dir.join("admin.sock"))
    }

    pub fn store_dir(&self) -> PathBuf {
        self.server.data_dir.join("store")
    }

    /// Where the node keeps its cluster identity, credentials and Raft log.
    pub fn cluster_dir(&self) -> PathBuf {
        self.server.data_dir.join("cluster")
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_the_documented_defaults() {
        let c = Config::parse("", "t.toml").unwrap();
        assert_eq!(c.smtp.listen, vec!["127.0.0.1:2525".parse().unwrap()]);
        assert_eq!(c.smtp.submission, vec!["127.0.0.1:2587".parse().unwrap()]);
        assert_eq!(c.pop3.listen, vec!["127.0.0.1:2110".parse().unwrap()]);
        assert_eq!(c.smtp.max_recipients, 1000);
        assert_eq!(c.server.data_dir, PathBuf::from("hamail-data"));
    }

    #[test]
    fn errors_name_file_and_line() {
        let text = "[server]\nhostname = \"mx\"\n\n[smtp]\nmax_recipients = \"many\"\n";
        let err = Config::parse(text, "/etc/hamail.toml").unwrap_err().to_string();
        assert!(err.contains("/etc/hamail.toml"), "{err}");
        assert!(err.starts_with("/etc/hamail.toml:5: "), "{err}");
    }

    #[test]
    fn unknown_keys_are_errors_with_their_line() {
        let text = "[smtp]\nlisten = [\"127.0.0.1:25\"]\nmax_recipent = 5\n";
        let err = Config::parse(text, "c.toml").unwrap_err().to_string();
        assert!(err.starts_with("c.toml:3: ") && err.contains("max_recipent"), "{err}");
    }

    #[test]
    fn cert_without_key_is_refused() {
        let err = Config::parse("[tls]\ncert = \"a.pem\"\n", "c.toml").unwrap_err().to_string();
        assert!(err.contains("cert") && err.contains("key"), "{err}");
    }

    #[test]
    fn relay_section_and_its_errors() {
        let text = "[relay]\nsmarthost = \"relay.example.net:587\"\ntransport = { \"Test.Example\" = \"127.0.0.1:2526\" }\n\
                    tls_policy = { \"bank.example\" = \"verify\" }\nresolver = \"127.0.0.1:5353\"\n";
        let c = Config::parse(text, "c.toml").unwrap();
        let route = c.relay.route_config();
        assert_eq!(route.smarthost.unwrap().to_string(), "relay.example.net:587");
        assert_eq!(route.transport["test.example"].to_string(), "127.0.0.1:2526");
        assert_eq!(c.relay.tls_for("bank.example", false), TlsMode::Verify);
        assert_eq!(c.relay.tls_for("other.example", false), TlsMode::Opportunistic);
        // Domain names compare as in `transport`: case and trailing dot aside.
        assert_eq!(c.relay.domain_tls("BANK.example."), Some(TlsMode::Verify));
        assert_eq!(c.relay.domain_tls("other.example"), None);
        assert_eq!(c.relay.schedule().lifetime, 5 * 86400);
        let err = Config::parse("[relay]\n\ntransport = { \"a.test\" = \"bad host:x\" }\n", "c.toml").unwrap_err().to_string();
        assert!(err.starts_with("c.toml:3: "), "{err}");
        let err = Config::parse("[relay]\ntls = \"sometimes\"\n", "c.toml").unwrap_err().to_string();
        assert!(err.starts_with("c.toml:2: "), "{err}");
        let err = Config::parse("[relay]\nsmarthost_user = \"u\"\n", "c.toml").unwrap_err().to_string();
        assert!(err.contains("smarthost_password"), "{err}");
    }

    #[test]
    fn plaintext_policy() {
        let lo: SocketAddr = "127.0.0.5:1".parse().unwrap();
        let far: SocketAddr = "198.18.0.1:1".parse().unwrap();
        assert!(PlaintextAuth::Loopback.allows(&lo));
        assert!(!PlaintextAuth::Loopback.allows(&far));
        assert!(!PlaintextAuth::Never.allows(&lo));
        assert!(PlaintextAuth::Always.allows(&far));
    }
}
