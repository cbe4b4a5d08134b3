//! hamail-smtp: the SMTP server session of hamail, sans I/O.
//!
//! Role: speak the server side of SMTP (RFC 5321) with PIPELINING (RFC
//! 2920), SIZE (RFC 1870), 8BITMIME (RFC 6152), ENHANCEDSTATUSCODES (RFC
//! 2034/3463), STARTTLS (RFC 3207) and AUTH PLAIN/LOGIN (RFC 4954) for the
//! MTA and submission (RFC 6409) ports. A [`Session`] is fed the bytes the
//! client sent and answers with the bytes to send back plus a [`Next`] step:
//! read more, or ask the driver to look up a recipient, judge whether the
//! client may use a sender, check a password, start or commit a message or
//! do a TLS handshake, then resume the session with the answer. The message data streams out of the session in bounded
//! pieces ([`Session::take_message_data`]) with our trace headers already
//! in place, for the driver to write to the store's spool.
//!
//! What it does not do: any I/O (sockets, TLS, timers: the tokio driver in
//! `hamail-server` does that), any store or directory access (the driver
//! resolves recipients, verifies passwords and commits through
//! `hamail-store`), DNS, or outbound delivery. It never answers `250` to
//! DATA without a [`hamail_store::Committed`] proof from the store.

mod data;
mod session;
mod stamp;

pub use session::{
    AuthResult, Credentials, DataProblem, DataStart, Next, Output, PeerInfo, RcptVerdict, SenderCheck, SenderVerdict,
    Session, SmtpConfig, Transaction,
};
pub use stamp::{has_field, rfc5322_date, HEADER_KEPT};
