//! hamail-relay: the pieces of outbound delivery that do not depend on the
//! store or the server.
//!
//! Role:
//! - [`client`]: a sans-IO SMTP *client* session (RFC 5321): EHLO with HELO
//!   fallback, opportunistic or required STARTTLS (RFC 3207), AUTH
//!   PLAIN/LOGIN for a smarthost (RFC 4954), MAIL FROM with SIZE
//!   (RFC 1870), PIPELINING (RFC 2920), one RCPT per recipient with a
//!   result for each, DATA with
//!   dot-stuffing, several transactions per connection, QUIT. It turns
//!   received bytes into bytes to send and results; the driver does I/O.
//! - [`route`]: where mail for a domain goes: a static transport map, a
//!   smarthost, or DNS MX (hickory-resolver) with the A/AAAA fallback of
//!   RFC 5321 5.1 and null MX (RFC 7505).
//! - [`schedule`]: the retry schedule (exponential backoff with a cap), the
//!   queue lifetime and the delay warning, against an injectable clock.
//! - [`dsn`]: RFC 3464 delivery status notifications (bounces and delay
//!   warnings) built with mail-builder.
//!
//! What it does not do: keep the queue (hamail-store does), decide who
//! works it in a cluster, or open connections for the SMTP session (the
//! server's delivery worker drives [`client::Client`] over tokio).

pub mod client;
pub mod dsn;
pub mod route;
pub mod schedule;

/// The one error type of this crate, classified by what the caller does.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RelayError {
    /// Try again later (a 4xx, a connection failure, a DNS timeout).
    #[error("temporary failure: {0}")]
    Temporary(String),
    /// Will never succeed (a 5xx, a null MX, a domain that does not exist).
    #[error("permanent failure: {0}")]
    Permanent(String),
    /// The remote side broke the protocol: treated as temporary for
    /// delivery, logged as its fault.
    #[error("peer misbehaved: {0}")]
    PeerMisbehaved(String),
    /// A resource we need is not reachable now (resolver down).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A bug or an impossible configuration.
    #[error("internal error: {0}")]
    Internal(String),
}

impl RelayError {
    /// True when delivery should be retried later.
    pub fn is_temporary(&self) -> bool {
        !matches!(self, RelayError::Permanent(_) | RelayError::Internal(_))
    }
}

pub type RelayResult<T> = Result<T, RelayError>;

/// The domain of an address (after the last `@`), lower-cased.
pub fn domain_of(address: &str) -> String {
    address.rsplit_once('@').map(|(_, d)| d).unwrap_or("").trim_end_matches('.').to_ascii_lowercase()
}
