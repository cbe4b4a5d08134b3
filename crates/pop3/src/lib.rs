//! hamail's POP3 server session, sans-IO.
//!
//! [`Session`] is the protocol state machine of one POP3 connection
//! (RFC 1939, with CAPA and response codes from RFC 2449, STLS from
//! RFC 2595, SASL `AUTH PLAIN` from RFC 5034/4616 and the `[SYS/TEMP]`,
//! `[AUTH]` and `[IN-USE]` codes of RFC 3206). It turns the bytes the client
//! sent into reply bytes and into a [`Next`] step that tells the driver what
//! it has to do before the session can go on.
//!
//! What it does not do: no I/O (no sockets, no timers: the driver reads,
//! writes, and calls [`Session::timeout`] when the client was idle too long),
//! no store access (the driver loads the maildrop, opens the bodies and sends
//! them through a [`Stuffer`], and performs the deletions the session asks
//! for), no password checking (the driver verifies
//! credentials and applies the delay after a failure), no locking (the driver
//! takes the maildrop lock on [`Next::OpenMaildrop`] and releases it after
//! [`Next::Update`] or on close), and no TLS (the driver does the handshake on
//! [`Next::StartTls`]). Because all of this is outside, the whole protocol can
//! be tested with plain byte strings.

mod session;
mod stuff;

pub use session::{AuthResult, BodyOpened, Credentials, MaildropResult, Next, Output, PeerInfo, Pop3Config, Session};
pub use stuff::Stuffer;
