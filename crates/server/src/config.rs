//! The configuration file (TOML) and its built-in defaults.
//!
//! Every field has a default, so `hamail serve` with no file is a working
//! server on loopback. Errors name the file and the line (a typo in a mail
//! server's config must not be a guessing game), and unknown keys are errors
//! rather than silently ignored.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::limits::Network;
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

impl std::fmt::Display for TlsMode {
    /// As written in the config file.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsMode::Never => "never",
            TlsMode::Opportunistic => "opportunistic",
            TlsMode::Require => "require",
            TlsMode::Verify => "verify",
        })
    }
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
    #[serde(deserialize_with = "optional_socket_addr")]
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
    /// Who gets a bounce that could not be returned (a double bounce).
    /// Unset: `[server] postmaster`, else `postmaster@` the first local
    /// domain.
    pub double_bounce_to: Option<String>,
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
            double_bounce_to: None,
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
            transport: self
                .transport
                .iter()
                .map(|(d, hp)| (d.trim_end_matches('.').to_ascii_lowercase(), hp.0.clone()))
                .collect(),
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
    /// The user or alias that gets `postmaster@d` for a domain `d` without
    /// a postmaster of its own (RFC 5321 4.5.1). Unset: such mail is
    /// refused as an unknown user; give every domain a postmaster alias.
    pub postmaster: Option<String>,
    /// Delay before answering a failed login (SMTP AUTH, POP3), doubled for
    /// every further failure from the same address or to the same account
    /// (up to 5 s). A client that hangs up meanwhile frees its slot at once.
    pub auth_failure_delay_ms: u64,
    /// Failed logins from one client address (an IPv6 /64) within
    /// `login_failure_window_secs` that ban the address for
    /// `login_ban_secs`: every login from it is then refused, a correct
    /// password included (`454 4.7.0`, `-ERR [SYS/TEMP]`).
    pub login_failures_per_address: u32,
    /// The same for one account, from any number of addresses.
    pub login_failures_per_account: u32,
    pub login_failure_window_secs: u64,
    pub login_ban_secs: u64,
    /// Connections open at once from one client address (an IPv6 /64), all
    /// mail ports together. More: `421 4.7.0` / `-ERR [SYS/TEMP]`.
    pub max_connections_per_address: u32,
    /// New connections from one client address per minute (refused ones
    /// included).
    pub connections_per_address_per_minute: u32,
    /// Connection slots of the users' ports, submission (587, 465) and POP3
    /// (110, 995) together: port 25 (`[smtp] max_connections`) has its own,
    /// so no load on port 25 takes them.
    pub max_user_connections: usize,
    /// Clients to which the per-address limits and address bans do not
    /// apply (local tools, a webmail on this host); their accounts are
    /// still counted.
    #[serde(deserialize_with = "networks")]
    pub limits_exempt: Vec<Network>,
    /// The longest a TLS handshake may take (ports 465 and 995, STARTTLS,
    /// STLS) before the connection is closed.
    pub tls_handshake_timeout_secs: u64,
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
    #[serde(deserialize_with = "socket_addrs")]
    pub listen: Vec<SocketAddr>,
    /// Submission with STARTTLS and AUTH (587, RFC 6409).
    #[serde(deserialize_with = "socket_addrs")]
    pub submission: Vec<SocketAddr>,
    /// Submission over implicit TLS (465, RFC 8314).
    #[serde(deserialize_with = "socket_addrs")]
    pub submissions: Vec<SocketAddr>,
    pub max_message_size: usize,
    pub max_recipients: usize,
    pub max_connections: usize,
    /// RFC 5321 4.5.3.2.7 asks for at least 5 minutes. Counted from the
    /// last complete command (a command line trickled in byte by byte does
    /// not reset it), and between reads in DATA.
    pub idle_timeout_secs: u64,
    /// The whole DATA phase of one message, from `354` to its end: then
    /// `421` and close. A local policy against clients that hold a slot by
    /// trickling data; RFC 5321 4.5.3.2.5 only bounds the wait for each
    /// data block (3 minutes; `idle_timeout_secs` between reads here), the
    /// total bound is ours, so a large message on a slow link needs a
    /// larger value.
    pub data_timeout_secs: u64,
    pub plaintext_auth: PlaintextAuth,
    /// RFC 1047: a transaction sent again within this many seconds (same
    /// Message-ID, envelope and data: the client lost our `250`) is
    /// answered `250` and delivered once. 0 turns it off.
    pub resend_window_secs: u64,
    /// On the MTA port, mail whose envelope sender is in one of our domains
    /// from a client that did not log in is refused (`550 5.7.1`): our
    /// users send through submission.
    pub local_sender_requires_auth: bool,
    /// Envelope senders a user may use besides their own address and the
    /// aliases that reach them: `{ "alice@example.org" =
    /// ["sales@example.org", "*@lists.example.org"] }` (`*` alone: any).
    pub allowed_senders: std::collections::HashMap<String, Vec<String>>,
    /// Authorization identities (the AUTH PLAIN authzid, RFC 4616) a login
    /// may act for, in the same form; any other authzid is refused with
    /// `535 5.7.8`.
    pub may_act_for: std::collections::HashMap<String, Vec<String>>,
}

/// `pattern` (an address, `*@domain`, or `*`) matches `address`, without
/// regard to case.
pub fn address_pattern_matches(pattern: &str, address: &str) -> bool {
    match pattern.strip_prefix("*@") {
        _ if pattern == "*" => true,
        Some(domain) => address.rsplit_once('@').is_some_and(|(_, d)| d.eq_ignore_ascii_case(domain)),
        None => pattern.eq_ignore_ascii_case(address),
    }
}

/// Whether one of the patterns of `map` for `user` matches `address`
/// (`smtp.allowed_senders`, `smtp.may_act_for`).
pub fn pattern_allows(map: &std::collections::HashMap<String, Vec<String>>, user: &str, address: &str) -> bool {
    patterns_of(map, user).iter().any(|p| address_pattern_matches(p, address))
}

/// The list of `map` for `user` (keys compare without case).
pub fn patterns_of<'a>(map: &'a std::collections::HashMap<String, Vec<String>>, user: &str) -> &'a [String] {
    map.iter().find(|(k, _)| k.eq_ignore_ascii_case(user)).map(|(_, v)| v.as_slice()).unwrap_or_default()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pop3Section {
    #[serde(deserialize_with = "socket_addrs")]
    pub listen: Vec<SocketAddr>,
    /// POP3 over implicit TLS (995).
    #[serde(deserialize_with = "socket_addrs")]
    pub pop3s: Vec<SocketAddr>,
    pub max_connections: usize,
    /// RFC 1939 3: the autologout timer must be at least 10 minutes. It
    /// runs from the last complete command (bytes that do not complete one
    /// do not reset it), and is also how long a reply may wait for the
    /// client to read it before the connection is cut.
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
    #[serde(deserialize_with = "optional_socket_addr")]
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
    /// The longest a change or a linearizable read waits for the cluster
    /// (a quorum): a message's acceptance, a login, POP3 deletions and
    /// admin commands give up past it, the mail clients with a temporary
    /// error (SMTP `451 4.3.0`, POP3 `-ERR [SYS/TEMP]`), as on a node cut
    /// off from the others. The client retries (a resend of the same
    /// message is recognised and delivered once).
    pub commit_timeout_ms: u64,
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
            commit_timeout_ms: 5000,
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
            postmaster: None,
            auth_failure_delay_ms: 1000,
            login_failures_per_address: 10,
            login_failures_per_account: 30,
            login_failure_window_secs: 15 * 60,
            login_ban_secs: 15 * 60,
            max_connections_per_address: 20,
            connections_per_address_per_minute: 120,
            max_user_connections: 500,
            limits_exempt: vec![Network::LOOPBACK_V4, Network::LOOPBACK_V6],
            tls_handshake_timeout_secs: 10,
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
            local_sender_requires_auth: true,
            allowed_senders: Default::default(),
            may_act_for: Default::default(),
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
        let postmaster = self.server.postmaster.as_deref().map(hamail_store::Address::parse).transpose()?;
        Ok(hamail_store::StoreOptions { hostnames, postmaster, ..hamail_store::StoreOptions::default() })
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
            ServerError::Config { file: origin.to_string(), line, message: e.message().to_string() }
        })?;
        config.validate(text, origin)?;
        Ok(config)
    }

    fn validate(&self, text: &str, origin: &str) -> Result<(), ServerError> {
        let bad = |message: String| ServerError::Config { file: origin.to_string(), line: None, message };
        // An error about one key: names its line and its value.
        let bad_key = |section: &str, key: &str, value: &dyn std::fmt::Display, why: &str| ServerError::Config {
            file: origin.to_string(),
            line: key_line(text, section, key),
            message: format!("[{section}] {key} = {value}: {why}"),
        };
        let (s, p, v) = (&self.server, &self.pop3, &self.smtp);
        let at_least_one: [(&str, &str, u64); 13] = [
            ("smtp", "max_connections", v.max_connections as u64),
            ("smtp", "idle_timeout_secs", v.idle_timeout_secs),
            // RFC 5321 4.5.3.2.6 asks for 10 minutes.
            ("smtp", "data_timeout_secs", v.data_timeout_secs),
            ("pop3", "max_connections", p.max_connections as u64),
            ("pop3", "idle_timeout_secs", p.idle_timeout_secs),
            ("server", "max_user_connections", s.max_user_connections as u64),
            ("server", "max_connections_per_address", s.max_connections_per_address.into()),
            ("server", "connections_per_address_per_minute", s.connections_per_address_per_minute.into()),
            ("server", "login_failures_per_address", s.login_failures_per_address.into()),
            ("server", "login_failures_per_account", s.login_failures_per_account.into()),
            ("server", "login_failure_window_secs", s.login_failure_window_secs),
            ("server", "login_ban_secs", s.login_ban_secs),
            ("server", "tls_handshake_timeout_secs", s.tls_handshake_timeout_secs),
        ];
        // 0 would refuse every connection or login, or cut every session.
        if let Some((section, key, value)) = at_least_one.iter().find(|(_, _, value)| *value == 0) {
            return Err(bad_key(section, key, value, "must be at least 1"));
        }
        // Timers are set as `now + value`: past what the clock holds that
        // would panic, and no timer here needs more than days.
        let r = &self.relay;
        let at_most_a_week = [
            ("smtp", "idle_timeout_secs", v.idle_timeout_secs),
            ("smtp", "data_timeout_secs", v.data_timeout_secs),
            ("pop3", "idle_timeout_secs", p.idle_timeout_secs),
            ("server", "login_failure_window_secs", s.login_failure_window_secs),
            ("server", "login_ban_secs", s.login_ban_secs),
            ("server", "tls_handshake_timeout_secs", s.tls_handshake_timeout_secs),
            ("relay", "connect_timeout_secs", r.connect_timeout_secs),
            ("relay", "command_timeout_secs", r.command_timeout_secs),
        ];
        let max = crate::limits::MAX_CONFIG_SECS;
        if let Some((section, key, value)) = at_most_a_week.iter().find(|(_, _, value)| *value > max) {
            return Err(bad_key(section, key, value, &format!("must be at most {max} (7 days)")));
        }
        if s.hostname.trim().is_empty() {
            return Err(bad_key(
                "server",
                "hostname",
                &"\"\"",
                "must not be empty (our name in greetings and Received: lines)",
            ));
        }
        let names = std::iter::once(("hostname", &s.hostname))
            .chain(s.local_hostnames.iter().map(|h| ("local_hostnames", h)))
            .chain(s.domains.iter().map(|d| ("domains", d)));
        for (key, name) in names {
            if hamail_store::Domain::parse(name).is_err() {
                return Err(bad_key("server", key, &format!("{name:?}"), &format!("`{name}` is not a domain name")));
            }
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(bad("[tls] needs both `cert` and `key`, or neither".into()));
        }
        if self.smtp.max_recipients == 0 {
            return Err(bad("[smtp] max_recipients must be at least 1 (RFC 5321 4.5.3.1.8 asks for 100)".into()));
        }
        if self.smtp.max_message_size < 1024 {
            return Err(bad("[smtp] max_message_size must be at least 1024 bytes".into()));
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
        if k.commit_timeout_ms < 10 * k.heartbeat_ms {
            return Err(bad(format!(
                "[cluster] commit_timeout_ms = {} is too short: at least ten heartbeats ({} ms) are needed for a commit to have a chance",
                k.commit_timeout_ms,
                10 * k.heartbeat_ms
            )));
        }
        if let Some(to) = &r.double_bounce_to {
            if hamail_store::Address::parse(to).is_err() {
                return Err(bad(format!("[relay] double_bounce_to = \"{to}\" is not a mail address")));
            }
        }
        if r.smarthost_user.is_some() != r.smarthost_password.is_some() {
            return Err(bad("[relay] needs both `smarthost_user` and `smarthost_password`, or neither".into()));
        }
        if r.retry_initial_secs == 0 || r.retry_max_secs < r.retry_initial_secs || r.lifetime_secs == 0 {
            return Err(bad(
                "[relay] retry_initial_secs must be above 0 and at most retry_max_secs; lifetime_secs above 0".into(),
            ));
        }
        if r.max_connections == 0 || r.max_per_destination == 0 || r.messages_per_session == 0 {
            return Err(bad(
                "[relay] max_connections, max_per_destination and messages_per_session must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The connection admission rules of `[server]` and the pools' sizes.
    pub fn admission(&self) -> crate::limits::AdmissionLimits {
        let s = &self.server;
        crate::limits::AdmissionLimits {
            mta: self.smtp.max_connections,
            users: s.max_user_connections,
            pop3: self.pop3.max_connections,
            per_address: s.max_connections_per_address,
            per_address_per_minute: s.connections_per_address_per_minute,
            exempt: s.limits_exempt.clone(),
        }
    }

    /// The failed-login rules of `[server]`.
    pub fn login_policy(&self) -> crate::limits::LoginPolicy {
        let s = &self.server;
        crate::limits::LoginPolicy {
            per_address: s.login_failures_per_address,
            per_account: s.login_failures_per_account,
            window: Duration::from_secs(s.login_failure_window_secs),
            ban: Duration::from_secs(s.login_ban_secs),
            base_delay: Duration::from_millis(s.auth_failure_delay_ms),
            exempt: s.limits_exempt.clone(),
        }
    }

    pub fn tls_handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.server.tls_handshake_timeout_secs)
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

/// The line (from 1) of `key = ...` in the table `[section]`, for errors
/// found after parsing (a value that parses but is not allowed).
fn key_line(text: &str, section: &str, key: &str) -> Option<usize> {
    let mut current = "";
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[').and_then(|h| h.split(']').next()) {
            current = header.trim();
        } else if current == section && line.strip_prefix(key).is_some_and(|rest| rest.trim_start().starts_with('=')) {
            return Some(i + 1);
        }
    }
    None
}

/// `[server] limits_exempt`: networks in CIDR notation.
fn networks<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Network>, D::Error> {
    Vec::<String>::deserialize(d)?.iter().map(|n| Network::parse(n).map_err(serde::de::Error::custom)).collect()
}

/// A listener's `address:port`, with an error that names the value.
fn socket_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    match s.rsplit_once(':').map(|(_, port)| port.parse::<u64>()) {
        Some(Ok(port)) if port > 65535 => Err(format!("`{s}`: port {port} is over 65535")),
        _ => Err(format!("`{s}` is not an address:port (IPv6 in brackets: [::1]:25)")),
    }
}

fn socket_addrs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    Vec::<String>::deserialize(d)?.iter().map(|a| socket_addr(a).map_err(serde::de::Error::custom)).collect()
}

fn optional_socket_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    Option::<String>::deserialize(d)?.map(|a| socket_addr(&a).map_err(serde::de::Error::custom)).transpose()
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_modes_display_as_written_in_the_config() {
        for mode in [TlsMode::Never, TlsMode::Opportunistic, TlsMode::Require, TlsMode::Verify] {
            let parsed: TlsMode = toml::from_str::<toml::Value>(&format!("m = \"{mode}\""))
                .ok()
                .and_then(|v| v.get("m").cloned())
                .and_then(|m| m.try_into().ok())
                .expect("parses");
            assert_eq!(parsed, mode);
        }
    }

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
        let text =
            "[relay]\nsmarthost = \"relay.example.net:587\"\ntransport = { \"Test.Example\" = \"127.0.0.1:2526\" }\n\
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
        let err = Config::parse("[relay]\n\ntransport = { \"a.test\" = \"bad host:x\" }\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("c.toml:3: "), "{err}");
        let err = Config::parse("[relay]\ntls = \"sometimes\"\n", "c.toml").unwrap_err().to_string();
        assert!(err.starts_with("c.toml:2: "), "{err}");
        let err = Config::parse("[relay]\nsmarthost_user = \"u\"\n", "c.toml").unwrap_err().to_string();
        assert!(err.contains("smarthost_password"), "{err}");
    }

    #[test]
    fn checks_after_parsing_name_the_key_line_of_its_own_section() {
        let text = "[pop3]\nmax_connections = 5\n\n[smtp]\n  # max_connections = 1\n  max_connections = 0\n";
        let err = Config::parse(text, "c.toml").unwrap_err().to_string();
        assert_eq!(err, "c.toml:6: [smtp] max_connections = 0: must be at least 1");
        assert_eq!(key_line(text, "pop3", "max_connections"), Some(2));
        assert_eq!(key_line(text, "server", "max_connections"), None);
        assert_eq!(key_line("[smtp]\nmax_connections_x = 1\nmax_connections= 0\n", "smtp", "max_connections"), Some(3));
        let err =
            Config::parse("[server]\nlimits_exempt = [\"192.0.2.0/24\", \"x\"]\n", "c.toml").unwrap_err().to_string();
        assert!(err.starts_with("c.toml:2: `x` is not an IP address"), "{err}");
        let c = Config::parse("[server]\nlimits_exempt = [\"192.0.2.0/24\"]\n", "c.toml").unwrap();
        assert_eq!(c.admission().exempt, vec![Network::parse("192.0.2.0/24").unwrap()]);
        let err = Config::parse("[smtp]\n\ndata_timeout_secs = 0\n", "c.toml").unwrap_err().to_string();
        assert_eq!(err, "c.toml:3: [smtp] data_timeout_secs = 0: must be at least 1");
        // Values the clock cannot add to `now` are refused, with their line.
        let huge = "[server]\nlogin_ban_secs = 9223372036854775807\n";
        let err = Config::parse(huge, "c.toml").unwrap_err().to_string();
        assert_eq!(err, "c.toml:2: [server] login_ban_secs = 9223372036854775807: must be at most 604800 (7 days)");
        for (section, key) in
            [("smtp", "idle_timeout_secs"), ("pop3", "idle_timeout_secs"), ("relay", "command_timeout_secs")]
        {
            let err = Config::parse(&format!("[{section}]\n{key} = 604801\n"), "c.toml").unwrap_err().to_string();
            assert_eq!(err, format!("c.toml:2: [{section}] {key} = 604801: must be at most 604800 (7 days)"));
            assert!(Config::parse(&format!("[{section}]\n{key} = 604800\n"), "c.toml").is_ok());
        }
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
