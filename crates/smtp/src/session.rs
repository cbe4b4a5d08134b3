//! The SMTP server session: a state machine fed with bytes, answering with
//! reply bytes and, when it needs the outside world (a recipient lookup, a
//! password check, a store commit, a TLS handshake), with a request to the
//! driver, which calls the matching resume method with the answer.

use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use hamail_store::{Address, Committed, QueueId, StoreError};
use smtp_proto::{Error as ProtoError, Request};

pub use crate::data::DataProblem;
use crate::data::{DataDecoder, Feed};
use crate::stamp::{Missing, Stamper, Trace};

/// Limits and policy of one listener.
#[derive(Debug, Clone)]
pub struct SmtpConfig {
    /// Our name: in the greeting, the EHLO reply and `Received:`.
    pub hostname: String,
    /// The SIZE we advertise and enforce (RFC 1870).
    pub max_message_size: usize,
    /// Recipients per transaction; RFC 5321 4.5.3.1.8 asks for at least 100.
    pub max_recipients: usize,
    /// Octets in a command line including CRLF (RFC 5321 4.5.3.1.4: 512).
    pub max_command_line: usize,
    /// Octets in a line of message data without its CRLF (RFC 5321
    /// 4.5.3.1.6 says 1000 with CRLF; we are lenient by default).
    pub max_data_line: usize,
    /// The submission service (RFC 6409): AUTH offered, MAIL requires it.
    pub submission: bool,
    /// STARTTLS is possible (a certificate is configured).
    pub tls_available: bool,
    /// AUTH PLAIN/LOGIN allowed without TLS (loopback, tests).
    pub plaintext_auth_allowed: bool,
    /// Protocol errors before `421` and close.
    pub max_errors: usize,
    /// Ask the driver about an unauthenticated client's sender
    /// ([`Next::CheckSender`]), so that mail claiming one of our own
    /// domains can be refused unless the client logged in.
    pub check_unauthenticated_sender: bool,
    /// The IP addresses this connection reached us on: a recipient address
    /// literal (RFC 5321 4.1.3, `user@[192.0.2.1]`) naming one of them is
    /// ours, and means `user@hostname`.
    pub local_addresses: Vec<std::net::IpAddr>,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            hostname: "localhost".into(),
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 1000,
            max_command_line: 512,
            max_data_line: 64 * 1024,
            submission: false,
            tls_available: false,
            plaintext_auth_allowed: false,
            max_errors: 20,
            check_unauthenticated_sender: false,
            local_addresses: Vec::new(),
        }
    }
}

/// Who is on the other end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    /// The connection is TLS from the start (implicit TLS, RFC 8314, port 465).
    pub tls: bool,
}

/// What the driver must do after a call: send `reply` (possibly empty), then
/// act on `next`.
#[derive(Debug)]
pub struct Output {
    pub reply: Vec<u8>,
    pub next: Next,
}

/// The driver's next action.
#[derive(Debug)]
pub enum Next {
    /// Flush the reply, read more, call [`Session::handle`].
    NeedInput,
    /// Resolve the recipient, call [`Session::recipient_checked`].
    CheckRecipient(Address),
    /// Judge whether this client may use this envelope sender, call
    /// [`Session::sender_checked`]. Asked for every sender of an
    /// authenticated client (submission binds the sender to the login) and,
    /// with [`SmtpConfig::check_unauthenticated_sender`], of the others.
    CheckSender(SenderCheck),
    /// Verify the credentials, call [`Session::authenticated`].
    Authenticate(Credentials),
    /// A valid DATA: get a queue id, the date and a spool for the message
    /// from the store, call [`Session::data_started`] (which answers `354`).
    /// From then on, after every call, move
    /// [`Session::take_message_data`] to the spool.
    StartData,
    /// The end of the message data: finish the spool, commit, call
    /// [`Session::delivered`].
    Deliver(Transaction),
    /// The message was refused after its end (the reply says why): drop
    /// the spool, log, then call [`Session::handle`] with no new input.
    Refused { txn: Transaction, problem: DataProblem },
    /// Flush the reply, do the TLS handshake, call [`Session::tls_established`].
    StartTls,
    /// Flush the reply and close the connection.
    Close,
}

/// What a recipient means, as the driver found out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptVerdict {
    /// Local maildrops (a user, or an alias's targets).
    Local(Vec<Address>),
    /// Not one of our domains: relayed only for authenticated clients.
    Remote,
    /// One of our aliases whose targets include other domains: accepted
    /// from anyone (the alias is ours, so this is forwarding, not relaying);
    /// `local` go to maildrops, `remote` to the outbound queue.
    Forward { local: Vec<Address>, remote: Vec<String> },
    /// One of our domains, no such user.
    UnknownUser,
    /// The lookup failed; the client should retry.
    TemporaryFailure(String),
}

/// The question of [`Next::CheckSender`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderCheck {
    /// The `MAIL FROM` address (never the null path: `<>` needs no owner).
    pub sender: Address,
    /// Who logged in, if anyone.
    pub authenticated: Option<String>,
}

/// The driver's answer to [`Next::CheckSender`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderVerdict {
    Allowed,
    /// An authenticated user used an address that is not theirs.
    NotOwned,
    /// An unauthenticated client claims a sender in one of our domains.
    LocalNeedsAuthentication,
    /// The lookup failed; the client should retry.
    TemporaryFailure(String),
}

/// The driver's verdict on [`Credentials`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthResult {
    Success,
    Failure,
    TemporaryFailure(String),
}

/// What a client presented with AUTH PLAIN or LOGIN.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The PLAIN authorization identity, when given and not empty.
    pub authzid: Option<String>,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    // Never let a password reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("authzid", &self.authzid)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// What the driver got from the store for [`Next::StartData`].
#[derive(Debug, Clone)]
pub struct DataStart {
    /// The queue id of the message, from the store.
    pub queue_id: QueueId,
    /// The RFC 5322 date-time of `Received:` (and of `Date:` when a
    /// submission lacks one).
    pub date: String,
}

/// One received message, to commit (its data went to the driver's spool).
#[derive(Debug, Clone)]
pub struct Transaction {
    /// The envelope sender as given, `None` for the null path `<>`.
    pub return_path: Option<String>,
    /// Local maildrops, deduplicated.
    pub local: Vec<Address>,
    /// Accepted relay recipients (only ever non-empty when authenticated).
    pub remote: Vec<String>,
    /// Every accepted RCPT TO address as given (for the log line).
    pub recipients: Vec<String>,
    pub queue_id: QueueId,
    /// Octets of the message data as the client sent it (dot-unstuffed,
    /// without our headers), counted past the size limit too.
    pub data_size: u64,
    /// SHA-256 of the message data as the client sent it, computed as it
    /// arrived.
    pub body_sha256: [u8; 32],
    /// The client's `Message-ID:` (see [`Transaction::message_id`]).
    pub(crate) client_message_id: Option<String>,
    pub helo: String,
    pub peer: SocketAddr,
    pub tls: bool,
    pub authenticated: Option<String>,
    /// EHLO (true) or HELO (false), for the `with` clause of `Received:`.
    pub esmtp: bool,
}

#[derive(Debug, Clone)]
struct Helo {
    name: String,
    esmtp: bool,
}

/// The envelope of a transaction: exists only after MAIL FROM.
#[derive(Debug)]
struct Envelope {
    return_path: Option<String>,
    local: Vec<Address>,
    remote: Vec<String>,
    recipients: Vec<String>,
}

#[derive(Debug)]
enum SaslStep {
    /// `AUTH PLAIN` without initial response: waiting for it.
    PlainResponse,
    /// `AUTH LOGIN`: waiting for the user name.
    LoginUser,
    /// `AUTH LOGIN`: waiting for the password.
    LoginPassword { user: String },
}

/// Each state carries only its own data.
#[derive(Debug)]
enum State {
    /// No (valid) HELO/EHLO yet, or just after STARTTLS.
    Connected,
    Greeted {
        helo: Helo,
    },
    /// MAIL accepted, no recipient accepted yet.
    Mail {
        helo: Helo,
        env: Envelope,
    },
    /// At least one recipient accepted.
    Rcpt {
        helo: Helo,
        env: Envelope,
    },
    /// After `354`, reading the message.
    Data {
        helo: Helo,
        env: Envelope,
        queue_id: QueueId,
        /// Boxed: the decoder's running hash would make every state as
        /// large as this one.
        decoder: Box<DataDecoder>,
        stamper: Stamper,
    },
    /// An AUTH exchange (RFC 4954 4): lines are SASL responses, not commands.
    Sasl {
        helo: Helo,
        step: SaslStep,
    },
    Closed,
}

/// What the session waits for from the driver.
#[derive(Debug)]
enum Waiting {
    Sender { return_path: String },
    Rcpt { given: String },
    Auth { username: String },
    DataStart,
    Deliver,
    StartTls,
}

/// RFC 6531 3.7.4.1 (the reply when UTF-8 addresses cannot be taken):
/// SMTPUTF8 is not offered, so an address must be ASCII (RFC 5321 4.1.2).
const NON_ASCII_ADDRESS: &str = "553 5.6.7 Non-ASCII address: this server does not offer SMTPUTF8 (RFC 6531)";

/// The address of `RCPT TO:<local@[literal]>` (no parameters), if `line`
/// is that.
fn literal_rcpt(line: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(line).ok()?.trim_end_matches(['\r', '\n']);
    let head = text.get(..9)?;
    if !head.eq_ignore_ascii_case("RCPT TO:<") {
        return None;
    }
    let address = text[9..].strip_suffix('>')?;
    let (local, literal) = split_literal(address)?;
    let plain = |c: char| c.is_ascii_graphic() && !"<>[]@\"".contains(c);
    (!local.is_empty()
        && local.chars().all(plain)
        && literal.chars().all(|c| c.is_ascii_alphanumeric() || ".:".contains(c)))
    .then(|| address.to_string())
}

/// `local@[literal]` as (local part, what is between the brackets).
fn split_literal(address: &str) -> Option<(&str, &str)> {
    let (local, domain) = address.rsplit_once('@')?;
    Some((local, domain.strip_prefix('[')?.strip_suffix(']')?))
}

/// A recipient whose domain may be an address literal.
enum Literal {
    /// The domain is a name, not a literal.
    Absent,
    /// One of our addresses: the local part.
    Ours(String),
    NotOurs,
    Malformed,
}

/// RFC 4954 4: a SASL response line may be up to 12288 octets.
const SASL_LINE: usize = 12288;

/// One SMTP server session, without I/O.
#[derive(Debug)]
pub struct Session {
    config: Arc<SmtpConfig>,
    peer: PeerInfo,
    tls: bool,
    auth_user: Option<String>,
    state: State,
    waiting: Option<Waiting>,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    /// Message data (our headers and the client's data) not yet taken by
    /// the driver ([`Session::take_message_data`]).
    data: Vec<u8>,
    errors: usize,
    /// A line over the limit is being skipped up to its LF.
    discarding: bool,
}

/// The reply to a store failure: `451` for what may heal (`4.3.1` when this
/// node is out of resources, RFC 3463), `554` for what will not.
fn store_failure(e: &StoreError) -> &'static str {
    match e {
        StoreError::Busy(_) => "451 4.3.1 Insufficient system resources, try again later",
        e if e.is_temporary() => "451 4.3.0 Temporary failure in the mail store, try again later",
        _ => "554 5.0.0 Transaction failed",
    }
}

/// Replaces controls so that text from the peer or the driver can never
/// break a reply line.
fn clean(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).take(200).collect()
}

impl Session {
    pub fn new(config: Arc<SmtpConfig>, peer: PeerInfo) -> Session {
        Session {
            config,
            tls: peer.tls,
            peer,
            auth_user: None,
            state: State::Connected,
            waiting: None,
            inbuf: Vec::new(),
            out: Vec::new(),
            data: Vec::new(),
            errors: 0,
            discarding: false,
        }
    }

    /// The `220` greeting (RFC 5321 4.3.1).
    pub fn greeting(&self) -> Vec<u8> {
        format!("220 {} ESMTP hamail\r\n", self.config.hostname).into_bytes()
    }

    /// The authenticated user name, once AUTH succeeded.
    pub fn authenticated_user(&self) -> Option<&str> {
        self.auth_user.as_deref()
    }

    /// Appends input and processes every complete command (RFC 2920
    /// pipelining) until more input or the driver is needed.
    pub fn handle(&mut self, input: &[u8]) -> Output {
        if matches!(self.state, State::Closed) {
            return self.finish(Next::Close);
        }
        if let Some(w) = &self.waiting {
            // The driver must act on our last Next before feeding input.
            if !matches!(w, Waiting::StartTls) {
                self.inbuf.extend_from_slice(input);
            }
            self.reply(&format!(
                "421 4.3.0 {} Internal error: input while waiting for the server (driver bug)",
                self.config.hostname
            ));
            self.state = State::Closed;
            self.waiting = None;
            return self.finish(Next::Close);
        }
        self.inbuf.extend_from_slice(input);
        self.run()
    }

    /// The answer to [`Next::CheckRecipient`].
    pub fn recipient_checked(&mut self, verdict: RcptVerdict) -> Output {
        let given = match self.waiting.take() {
            Some(Waiting::Rcpt { given }) => given,
            other => return self.wrong_state(other, "recipient_checked"),
        };
        let authenticated = self.auth_user.is_some();
        let state = std::mem::replace(&mut self.state, State::Closed);
        let (helo, mut env) = match state {
            State::Mail { helo, env } | State::Rcpt { helo, env } => (helo, env),
            other => {
                self.state = other;
                return self.wrong_state(None, "recipient_checked");
            }
        };
        let accepted = match verdict {
            RcptVerdict::Local(targets) => {
                for t in targets {
                    if !env.local.contains(&t) {
                        env.local.push(t);
                    }
                }
                true
            }
            RcptVerdict::Forward { local, remote } => {
                for t in local {
                    if !env.local.contains(&t) {
                        env.local.push(t);
                    }
                }
                for r in remote {
                    if !env.remote.contains(&r) {
                        env.remote.push(r);
                    }
                }
                true
            }
            RcptVerdict::Remote if authenticated => {
                if !env.remote.contains(&given) {
                    env.remote.push(given.clone());
                }
                true
            }
            RcptVerdict::Remote => {
                self.error("554 5.7.1 Relay access denied");
                false
            }
            RcptVerdict::UnknownUser => {
                self.error("550 5.1.1 Recipient address rejected: user unknown");
                false
            }
            RcptVerdict::TemporaryFailure(why) => {
                self.reply(&format!("451 4.3.0 Temporary lookup failure: {}", clean(&why)));
                false
            }
        };
        if accepted {
            env.recipients.push(given);
            self.reply("250 2.1.5 Ok");
        }
        self.state = if env.recipients.is_empty() { State::Mail { helo, env } } else { State::Rcpt { helo, env } };
        self.run()
    }

    /// The answer to [`Next::CheckSender`].
    pub fn sender_checked(&mut self, verdict: SenderVerdict) -> Output {
        let return_path = match self.waiting.take() {
            Some(Waiting::Sender { return_path }) => return_path,
            other => return self.wrong_state(other, "sender_checked"),
        };
        match verdict {
            SenderVerdict::Allowed => self.open_envelope(Some(return_path)),
            // Postfix's reject_sender_login_mismatch answers the same.
            SenderVerdict::NotOwned => {
                let user = clean(self.auth_user.as_deref().unwrap_or(""));
                self.error(&format!(
                    "553 5.7.1 <{}>: Sender address rejected: not owned by user {user}",
                    clean(&return_path)
                ))
            }
            SenderVerdict::LocalNeedsAuthentication => self.error(&format!(
                "550 5.7.1 <{}>: Sender address rejected: mail from a local domain must be sent with authentication",
                clean(&return_path)
            )),
            SenderVerdict::TemporaryFailure(why) => {
                self.reply(&format!("451 4.3.0 Temporary lookup failure: {}", clean(&why)))
            }
        }
        self.run()
    }

    /// The answer to [`Next::Authenticate`].
    pub fn authenticated(&mut self, result: AuthResult) -> Output {
        let username = match self.waiting.take() {
            Some(Waiting::Auth { username }) => username,
            other => return self.wrong_state(other, "authenticated"),
        };
        match result {
            AuthResult::Success => {
                self.auth_user = Some(username);
                self.reply("235 2.7.0 Authentication successful");
            }
            // RFC 4954 6: 535 5.7.8, counted against the error limit to
            // slow password guessing down.
            AuthResult::Failure => self.error("535 5.7.8 Authentication credentials invalid"),
            AuthResult::TemporaryFailure(why) => {
                self.reply(&format!("454 4.7.0 Temporary authentication failure: {}", clean(&why)))
            }
        }
        self.run()
    }

    /// The answer to [`Next::StartData`]: with the store's queue id and
    /// date, our `Received:` line (RFC 5321 4.4) is the first message data,
    /// and the client gets `354`; if the store could not start a message,
    /// `451` and the envelope stays (the client may try DATA again).
    pub fn data_started(&mut self, start: Result<DataStart, StoreError>) -> Output {
        match self.waiting.take() {
            Some(Waiting::DataStart) => {}
            other => return self.wrong_state(other, "data_started"),
        }
        let start = match start {
            Ok(start) => start,
            Err(e) => {
                self.reply(store_failure(&e));
                return self.run();
            }
        };
        let state = std::mem::replace(&mut self.state, State::Closed);
        let State::Rcpt { helo, env } = state else {
            self.state = state;
            return self.wrong_state(None, "data_started");
        };
        let trace = Trace {
            helo: &helo.name,
            esmtp: helo.esmtp,
            peer: &self.peer.addr,
            tls: self.tls,
            authenticated: self.auth_user.as_deref(),
            hostname: &self.config.hostname,
            queue_id: start.queue_id,
            recipients: &env.recipients,
            date: &start.date,
        };
        self.data.extend_from_slice(crate::stamp::received(&trace).as_bytes());
        let missing = self.auth_user.is_some().then(|| Missing {
            message_id: format!("<{}.{:016x}@{}>", start.queue_id, rand::random::<u64>(), self.config.hostname),
            date: start.date,
        });
        let decoder = Box::new(DataDecoder::new(self.config.max_message_size, self.config.max_data_line));
        self.state = State::Data { helo, env, queue_id: start.queue_id, decoder, stamper: Stamper::new(missing) };
        self.reply("354 End data with <CR><LF>.<CR><LF>");
        self.run()
    }

    /// The message data produced so far (dot-unstuffed, our headers
    /// included), for the driver's spool. At most what the last input
    /// decoded to, plus our headers.
    pub fn take_message_data(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.data)
    }

    /// Octets the session holds in memory for the peer's input: unread
    /// input, replies not yet taken, message data not yet taken, the kept
    /// start of a header section.
    pub fn buffered(&self) -> usize {
        let stamper = match &self.state {
            State::Data { stamper, .. } => stamper.held(),
            _ => 0,
        };
        self.inbuf.len() + self.out.len() + self.data.len() + stamper
    }

    /// The answer to [`Next::Deliver`]: only a [`Committed`] (which only the
    /// store can make) lets us say `250`.
    /// A recognised resend (RFC 1047) gets `250` too, naming the
    /// transaction that delivered it.
    pub fn delivered(&mut self, result: Result<Committed, StoreError>) -> Output {
        self.finish_delivery_with(result.map(|c| match c.resend_of() {
            Some(original) => format!("250 2.0.0 Ok: already delivered as {original}"),
            None => format!("250 2.0.0 Ok: queued as {}", c.queue_id()),
        }))
    }

    /// `result`: the `250` line to send, or why not.
    fn finish_delivery_with(&mut self, result: Result<String, StoreError>) -> Output {
        match self.waiting.take() {
            Some(Waiting::Deliver) => {}
            other => return self.wrong_state(other, "delivered"),
        }
        match result {
            Ok(line) => self.reply(&line),
            Err(e) => self.reply(store_failure(&e)),
        }
        self.run()
    }

    /// After the driver's TLS handshake (RFC 3207 4.2): everything the
    /// client said before is forgotten, including any input pipelined after
    /// STARTTLS (CVE-2011-0411), HELO and authentication.
    pub fn tls_established(&mut self) -> Output {
        match self.waiting.take() {
            Some(Waiting::StartTls) => {}
            other => return self.wrong_state(other, "tls_established"),
        }
        self.inbuf.clear();
        self.discarding = false;
        self.tls = true;
        self.auth_user = None;
        self.state = State::Connected;
        self.run()
    }

    /// The driver's read timeout: `421` (RFC 5321 4.5.3.2), then it closes.
    pub fn timeout(&mut self) -> Vec<u8> {
        self.state = State::Closed;
        self.waiting = None;
        format!("421 4.4.2 {} Error: timeout exceeded\r\n", self.config.hostname).into_bytes()
    }

    // ---- internals ----

    fn wrong_state(&mut self, waiting: Option<Waiting>, method: &str) -> Output {
        // Put back what we were really waiting for: the driver may still
        // deliver the right answer.
        self.waiting = waiting;
        self.reply(&format!("451 4.3.0 Internal error: {method}() called in the wrong state (driver bug)"));
        if matches!(self.state, State::Closed) {
            return self.finish(Next::Close);
        }
        self.finish(Next::NeedInput)
    }

    fn finish(&mut self, next: Next) -> Output {
        Output { reply: std::mem::take(&mut self.out), next }
    }

    fn reply(&mut self, line: &str) {
        self.out.extend_from_slice(line.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    /// A reply that counts against `max_errors`: protocol errors (unknown
    /// command, bad syntax, bad sequence, over-long lines), failed AUTH
    /// (slows password guessing), rejected recipients (slows address
    /// harvesting; Postfix's hard error limit counts them too) and rejected
    /// smuggling attempts. Limits (552, 452) and temporary failures do not
    /// count: a well-behaved client meets them.
    fn error(&mut self, line: &str) {
        self.errors += 1;
        self.reply(line);
    }

    fn run(&mut self) -> Output {
        loop {
            if matches!(self.state, State::Closed) {
                return self.finish(Next::Close);
            }
            if self.errors > 0 && self.errors >= self.config.max_errors {
                self.reply(&format!("421 4.7.0 {} Error: too many errors", self.config.hostname));
                self.state = State::Closed;
                return self.finish(Next::Close);
            }
            if let Some(next) = self.step() {
                return self.finish(next);
            }
        }
    }

    /// Processes one unit of input. `None`: go on; `Some`: stop there.
    fn step(&mut self) -> Option<Next> {
        if let State::Data { decoder, stamper, .. } = &mut self.state {
            let data = &mut self.data;
            return match decoder.feed(&self.inbuf, &mut |bytes| stamper.push(bytes, data)) {
                Feed::More => {
                    self.inbuf.clear();
                    Some(Next::NeedInput)
                }
                Feed::Done(n) => {
                    self.inbuf.drain(..n);
                    self.end_of_data()
                }
            };
        }
        let in_sasl = matches!(self.state, State::Sasl { .. });
        // RFC 4954 4: SASL responses may be 12288 octets; we allow the same
        // for an AUTH command line, whose initial response (a long
        // password) can exceed 512 octets.
        let auth_line = self.inbuf.len() >= 5 && self.inbuf[..5].eq_ignore_ascii_case(b"AUTH ");
        let limit = if in_sasl || auth_line {
            SASL_LINE.max(self.config.max_command_line)
        } else {
            self.config.max_command_line
        };
        let Some(pos) = self.inbuf.iter().position(|&b| b == b'\n') else {
            if self.inbuf.len() > limit {
                // Keep memory bounded; the reply comes at the line's end so
                // that replies stay in command order (RFC 2920).
                self.discarding = true;
                self.inbuf.clear();
            }
            return Some(Next::NeedInput);
        };
        let line: Vec<u8> = self.inbuf.drain(..=pos).collect();
        if self.discarding || line.len() > limit {
            self.discarding = false;
            if in_sasl {
                self.leave_sasl();
                // RFC 4954 6: 500 5.5.6 for an over-long SASL line.
                self.error("500 5.5.6 Authentication exchange line is too long");
            } else {
                self.error("500 5.5.2 Line too long");
            }
            return None;
        }
        if in_sasl {
            self.sasl_line(&line)
        } else {
            self.command(&line)
        }
    }

    fn end_of_data(&mut self) -> Option<Next> {
        let state = std::mem::replace(&mut self.state, State::Closed);
        let State::Data { helo, env, queue_id, decoder, stamper } = state else {
            self.state = state;
            return None;
        };
        self.state = State::Greeted { helo: helo.clone() };
        let client_message_id = stamper.finish(&mut self.data);
        let problem = decoder.problem();
        let data_size = decoder.size() as u64;
        let txn = Transaction {
            return_path: env.return_path,
            local: env.local,
            remote: env.remote,
            recipients: env.recipients,
            queue_id,
            data_size,
            body_sha256: decoder.finish(),
            client_message_id,
            helo: helo.name,
            peer: self.peer.addr,
            tls: self.tls,
            authenticated: self.auth_user.clone(),
            esmtp: helo.esmtp,
        };
        match problem {
            // RFC 5321 2.3.8 forbids bare CR and LF; accepting them is what
            // makes SMTP smuggling possible. We do not guess a line end:
            // the message is refused whole after its real end. The session
            // stays usable (Postfix instead answers 521 and hangs up), but
            // a malformed message counts as an error; one too big does not.
            Some(problem @ (DataProblem::BareCrOrLf | DataProblem::LineTooLong)) => {
                self.error(problem.reply());
                Some(Next::Refused { txn, problem })
            }
            Some(problem @ DataProblem::TooBig) => {
                self.reply(problem.reply());
                Some(Next::Refused { txn, problem })
            }
            None => {
                self.waiting = Some(Waiting::Deliver);
                Some(Next::Deliver(txn))
            }
        }
    }

    /// RSET semantics (RFC 5321 4.1.1.5): drop the envelope, keep HELO.
    fn reset_transaction(&mut self) {
        let state = std::mem::replace(&mut self.state, State::Closed);
        self.state = match state {
            State::Mail { helo, .. }
            | State::Rcpt { helo, .. }
            | State::Data { helo, .. }
            | State::Sasl { helo, .. } => State::Greeted { helo },
            other => other,
        };
    }

    fn leave_sasl(&mut self) {
        self.reset_transaction();
    }

    fn helo(&self) -> Option<&Helo> {
        match &self.state {
            State::Greeted { helo }
            | State::Mail { helo, .. }
            | State::Rcpt { helo, .. }
            | State::Data { helo, .. }
            | State::Sasl { helo, .. } => Some(helo),
            State::Connected | State::Closed => None,
        }
    }

    fn in_transaction(&self) -> bool {
        matches!(self.state, State::Mail { .. } | State::Rcpt { .. } | State::Data { .. })
    }

    fn auth_offered(&self) -> bool {
        self.config.submission && (self.tls || self.config.plaintext_auth_allowed)
    }

    fn ehlo_reply(&mut self) {
        let mut lines = vec![
            self.config.hostname.clone(),
            "PIPELINING".to_string(),
            format!("SIZE {}", self.config.max_message_size),
            "8BITMIME".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
        ];
        if self.config.tls_available && !self.tls {
            lines.push("STARTTLS".to_string());
        }
        if self.auth_offered() {
            lines.push("AUTH PLAIN LOGIN".to_string());
        }
        lines.push("HELP".to_string());
        let last = lines.len() - 1;
        for (i, l) in lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            self.out.extend_from_slice(format!("250{sep}{l}\r\n").as_bytes());
        }
    }

    fn command(&mut self, line: &[u8]) -> Option<Next> {
        let request = match Request::parse(&mut line.iter()) {
            Ok(r) => r.into_owned(),
            // The parser knows no address literals (RFC 5321 4.1.3), which
            // are valid syntax: a plain `RCPT TO:<local@[literal]>` is
            // taken here.
            Err(e) => {
                if let (ProtoError::InvalidRecipientAddress, Some(address)) = (&e, literal_rcpt(line)) {
                    let to = smtp_proto::RcptTo { address, orcpt: None, rrvs: 0, flags: 0 };
                    return self.rcpt(to, line);
                }
                let text = match e {
                    ProtoError::UnknownCommand => "500 5.5.1 Command unrecognized".to_string(),
                    ProtoError::InvalidSenderAddress => "501 5.1.7 Bad sender address syntax".to_string(),
                    ProtoError::InvalidRecipientAddress => "501 5.1.3 Bad recipient address syntax".to_string(),
                    ProtoError::SyntaxError { syntax } => format!("501 5.5.4 Syntax: {syntax}"),
                    ProtoError::InvalidParameter { param } => {
                        format!("501 5.5.4 Invalid value for parameter {param}")
                    }
                    // RFC 5321 4.1.1.11: 555 for a parameter not recognised.
                    ProtoError::UnsupportedParameter { param } => {
                        format!("555 5.5.4 Unsupported parameter {}", clean(&param))
                    }
                    _ => "501 5.5.4 Syntax error".to_string(),
                };
                self.error(&text);
                return None;
            }
        };
        match request {
            Request::Ehlo { host } | Request::Helo { host } if host.is_empty() => {
                self.error("501 5.5.4 Syntax: EHLO domain");
                None
            }
            Request::Ehlo { host } => {
                // RFC 5321 4.1.4: EHLO mid-session resets like RSET.
                self.state = State::Greeted { helo: Helo { name: clean(&host), esmtp: true } };
                self.ehlo_reply();
                None
            }
            Request::Helo { host } => {
                self.state = State::Greeted { helo: Helo { name: clean(&host), esmtp: false } };
                let text = format!("250 {}", self.config.hostname);
                self.reply(&text);
                None
            }
            Request::Mail { from } => self.mail(from, line),
            Request::Rcpt { to } => self.rcpt(to, line),
            Request::Data => {
                let state = std::mem::replace(&mut self.state, State::Closed);
                match state {
                    // The store starts the message first (queue id, date,
                    // spool); `data_started` answers 354.
                    State::Rcpt { helo, env } => {
                        self.state = State::Rcpt { helo, env };
                        self.waiting = Some(Waiting::DataStart);
                        return Some(Next::StartData);
                    }
                    // RFC 2920 3.1 / RFC 5321 3.3: DATA after every RCPT
                    // failed is answered 554 "no valid recipients".
                    State::Mail { helo, env } => {
                        self.state = State::Mail { helo, env };
                        // Not counted as an error: a pipelining client
                        // (RFC 2920) sends DATA before it knows.
                        self.reply("554 5.5.1 Error: no valid recipients");
                    }
                    other => {
                        self.state = other;
                        self.error("503 5.5.1 Error: need RCPT command");
                    }
                }
                None
            }
            Request::Rset => {
                self.reset_transaction();
                self.reply("250 2.0.0 Ok");
                None
            }
            Request::Noop { .. } => {
                self.reply("250 2.0.0 Ok");
                None
            }
            Request::Quit => {
                self.reply("221 2.0.0 Bye");
                self.state = State::Closed;
                Some(Next::Close)
            }
            // RFC 5321 3.5.3: 252 when we will not verify.
            Request::Vrfy { .. } => {
                self.reply("252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery");
                None
            }
            Request::Help { .. } => {
                self.reply("214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS AUTH");
                None
            }
            Request::StartTls => self.starttls(line),
            Request::Auth { mechanism, initial_response } => self.auth(mechanism, &initial_response),
            // LMTP is not spoken here.
            Request::Lhlo { .. } => {
                self.error("500 5.5.1 Command unrecognized");
                None
            }
            // Known to RFC 5321 or its extensions, not offered here.
            Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. }
            | Request::Bdat { .. } => {
                self.error("502 5.5.1 Command not implemented");
                None
            }
        }
    }

    fn mail(&mut self, from: smtp_proto::MailFrom<String>, line: &[u8]) -> Option<Next> {
        match &self.state {
            State::Connected => {
                self.error("503 5.5.1 Error: send HELO/EHLO first");
                return None;
            }
            State::Greeted { .. } => {}
            _ => {
                self.error("503 5.5.1 Error: nested MAIL command");
                return None;
            }
        }
        // RFC 6409 4.3 / RFC 4954 6: submission needs authentication.
        if self.config.submission && self.auth_user.is_none() {
            self.error("530 5.7.0 Authentication required");
            return None;
        }
        // Only what we advertise: SIZE (RFC 1870), BODY=7BIT/8BITMIME (RFC
        // 6152), and AUTH= (RFC 4954 5, which must be accepted).
        let allowed = smtp_proto::MAIL_BODY_7BIT | smtp_proto::MAIL_BODY_8BITMIME;
        if from.flags & !allowed != 0
            || from.trans_id.is_some()
            || from.env_id.is_some()
            || from.solicit.is_some()
            || from.mtrk.is_some()
            || from.by != 0
            || from.hold_for != 0
            || from.hold_until != 0
            || from.mt_priority != 0
        {
            self.error("555 5.5.4 Unsupported MAIL parameter");
            return None;
        }
        // RFC 1870 6.1: refuse a declared size over the limit at once.
        if from.size > self.config.max_message_size {
            self.reply("552 5.3.4 Message size exceeds fixed maximum message size");
            return None;
        }
        if !line.is_ascii() {
            self.error(NON_ASCII_ADDRESS);
            return None;
        }
        if from.address.is_empty() {
            // RFC 6409 4.3 binds a submission's sender to the user; the
            // null path is for bounces, which a user does not send.
            if self.auth_user.is_some() {
                self.error(
                    "553 5.7.1 <>: Sender address rejected: the null sender is not allowed after authentication",
                );
                return None;
            }
            self.open_envelope(None);
            return None;
        }
        let Ok(sender) = Address::parse(&from.address) else {
            self.error("501 5.1.7 Bad sender address syntax");
            return None;
        };
        if self.auth_user.is_none() && !self.config.check_unauthenticated_sender {
            self.open_envelope(Some(from.address));
            return None;
        }
        self.waiting = Some(Waiting::Sender { return_path: from.address });
        Some(Next::CheckSender(SenderCheck { sender, authenticated: self.auth_user.clone() }))
    }

    /// MAIL accepted: the transaction starts (RFC 5321 4.1.1.2).
    fn open_envelope(&mut self, return_path: Option<String>) {
        let state = std::mem::replace(&mut self.state, State::Closed);
        let State::Greeted { helo } = state else {
            self.state = state;
            return;
        };
        self.state = State::Mail {
            helo,
            env: Envelope { return_path, local: Vec::new(), remote: Vec::new(), recipients: Vec::new() },
        };
        self.reply("250 2.1.0 Ok");
    }

    fn rcpt(&mut self, to: smtp_proto::RcptTo<String>, line: &[u8]) -> Option<Next> {
        let count = match &self.state {
            State::Mail { env, .. } | State::Rcpt { env, .. } => env.recipients.len(),
            _ => {
                self.error("503 5.5.1 Error: need MAIL command");
                return None;
            }
        };
        if to.orcpt.is_some() || to.flags != 0 || to.rrvs != 0 {
            self.error("555 5.5.4 Unsupported RCPT parameter");
            return None;
        }
        // RFC 5321 4.5.3.1.8: 452 for too many recipients, so the client
        // sends the rest in another transaction.
        if count >= self.config.max_recipients {
            self.reply("452 4.5.3 Error: too many recipients");
            return None;
        }
        if !line.is_ascii() {
            self.error(NON_ASCII_ADDRESS);
            return None;
        }
        let given = if to.address.is_empty() {
            // smtp-proto turns <Postmaster> into "": RFC 5321 4.5.1 requires
            // accepting it without a domain; it means our postmaster.
            if String::from_utf8_lossy(line).to_ascii_lowercase().contains("<postmaster>") {
                format!("postmaster@{}", self.config.hostname)
            } else {
                self.error("501 5.1.3 Bad recipient address syntax");
                return None;
            }
        } else {
            to.address
        };
        // RFC 5321 4.1.3: an address literal is a valid domain; one of the
        // addresses the client reached us on means this host.
        let lookup = match self.literal_recipient(&given) {
            Literal::Absent => given.clone(),
            Literal::Ours(local_part) => format!("{local_part}@{}", self.config.hostname),
            Literal::NotOurs => {
                self.error("550 5.1.2 Recipient address rejected: that address literal is not this host");
                return None;
            }
            Literal::Malformed => {
                self.error("501 5.1.3 Bad recipient address syntax");
                return None;
            }
        };
        match Address::parse(&lookup) {
            Ok(address) => {
                self.waiting = Some(Waiting::Rcpt { given });
                Some(Next::CheckRecipient(address))
            }
            Err(_) => {
                self.error("501 5.1.3 Bad recipient address syntax");
                None
            }
        }
    }

    /// What `address` is when its domain is an address literal.
    fn literal_recipient(&self, address: &str) -> Literal {
        let Some((local_part, inner)) = split_literal(address) else {
            return Literal::Absent;
        };
        // RFC 5321 4.1.3: IPv4-address-literal or "IPv6:" IPv6-addr.
        let ip = match inner.get(..5) {
            Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => {
                inner[5..].parse::<std::net::Ipv6Addr>().map(std::net::IpAddr::V6)
            }
            _ => inner.parse::<std::net::Ipv4Addr>().map(std::net::IpAddr::V4),
        };
        let Ok(ip) = ip else {
            return Literal::Malformed;
        };
        let ours = self.config.local_addresses.iter().any(|a| match (a, ip) {
            (std::net::IpAddr::V6(a), std::net::IpAddr::V4(v4)) => a.to_ipv4_mapped() == Some(v4),
            (a, ip) => *a == ip,
        });
        if local_part.is_empty() {
            Literal::Malformed
        } else if ours {
            Literal::Ours(local_part.to_string())
        } else {
            Literal::NotOurs
        }
    }

    fn starttls(&mut self, line: &[u8]) -> Option<Next> {
        // RFC 3207 4: "501 Syntax error (no parameters allowed)".
        let args = line.get(8..).unwrap_or_default();
        if args.iter().any(|b| !b.is_ascii_whitespace()) {
            self.error("501 5.5.4 Syntax error (no parameters allowed)");
            return None;
        }
        if self.tls {
            self.error("503 5.5.1 Error: TLS already active");
            return None;
        }
        if !self.config.tls_available {
            self.error("502 5.5.1 Error: command not implemented");
            return None;
        }
        if self.in_transaction() {
            self.error("503 5.5.1 Error: STARTTLS not permitted during a mail transaction");
            return None;
        }
        self.reply("220 2.0.0 Ready to start TLS");
        // CVE-2011-0411: whatever followed STARTTLS in the same plaintext
        // read was injectable by a man in the middle; never execute it.
        self.inbuf.clear();
        self.discarding = false;
        self.waiting = Some(Waiting::StartTls);
        Some(Next::StartTls)
    }

    fn auth(&mut self, mechanism: u64, initial: &str) -> Option<Next> {
        if !self.config.submission {
            self.error("503 5.5.1 Error: authentication not enabled");
            return None;
        }
        if self.helo().is_none() {
            self.error("503 5.5.1 Error: send EHLO first");
            return None;
        }
        if self.auth_user.is_some() {
            self.error("503 5.5.1 Error: already authenticated");
            return None;
        }
        // RFC 4954 4: "AUTH command is not permitted during a mail transaction".
        if self.in_transaction() {
            self.error("503 5.5.1 Error: AUTH not permitted during a mail transaction");
            return None;
        }
        // RFC 4954 6 defines exactly this case: 538 5.7.11 "Encryption
        // required for requested authentication mechanism" (530 5.7.0 is
        // for "authentication required", a different condition).
        if !self.tls && !self.config.plaintext_auth_allowed {
            self.error("538 5.7.11 Encryption required for requested authentication mechanism");
            return None;
        }
        let step = if mechanism == smtp_proto::AUTH_PLAIN {
            if initial.is_empty() {
                SaslStep::PlainResponse
            } else {
                return self.plain(initial);
            }
        } else if mechanism == smtp_proto::AUTH_LOGIN {
            if initial.is_empty() {
                SaslStep::LoginUser
            } else {
                match self.decode(initial) {
                    Some(user) => SaslStep::LoginPassword { user },
                    None => return None,
                }
            }
        } else {
            self.error("504 5.5.4 Unrecognized authentication type");
            return None;
        };
        self.enter_sasl(step);
        None
    }

    /// Enters (or continues) the SASL exchange with the matching challenge.
    fn enter_sasl(&mut self, step: SaslStep) {
        let state = std::mem::replace(&mut self.state, State::Closed);
        let helo = match state {
            State::Greeted { helo } | State::Sasl { helo, .. } => helo,
            other => {
                self.state = other;
                return;
            }
        };
        self.reply(match step {
            SaslStep::PlainResponse => "334 ",
            SaslStep::LoginUser => "334 VXNlcm5hbWU6", // "Username:"
            SaslStep::LoginPassword { .. } => "334 UGFzc3dvcmQ6", // "Password:"
        });
        self.state = State::Sasl { helo, step };
    }

    /// Base64 (RFC 4954 4: "=" is an empty initial response) to UTF-8;
    /// on failure replies 501 5.5.2 and leaves the exchange.
    fn decode(&mut self, text: &str) -> Option<String> {
        let text = text.trim_end_matches(['\r', '\n']);
        if text == "=" {
            return Some(String::new());
        }
        let bytes = base64::engine::general_purpose::STANDARD.decode(text).ok();
        match bytes.and_then(|b| String::from_utf8(b).ok()) {
            Some(s) => Some(s),
            None => {
                self.leave_sasl();
                self.error("501 5.5.2 Invalid base64 data");
                None
            }
        }
    }

    /// An AUTH PLAIN response (RFC 4616 2): authzid NUL authcid NUL passwd.
    fn plain(&mut self, response: &str) -> Option<Next> {
        let decoded = self.decode(response)?;
        let parts: Vec<&str> = decoded.split('\0').collect();
        let [authzid, user, pass] = parts.as_slice() else {
            self.leave_sasl();
            self.error("501 5.5.2 Invalid PLAIN response");
            return None;
        };
        if user.is_empty() {
            self.leave_sasl();
            self.error("501 5.5.2 Invalid PLAIN response");
            return None;
        }
        let creds = Credentials {
            authzid: (!authzid.is_empty()).then(|| authzid.to_string()),
            username: user.to_string(),
            password: pass.to_string(),
        };
        Some(self.ask_auth(creds))
    }

    fn ask_auth(&mut self, creds: Credentials) -> Next {
        self.leave_sasl();
        // RFC 4616 2: the client acts as the authorization identity when it
        // gives one; the driver refuses one the login may not act for.
        self.waiting =
            Some(Waiting::Auth { username: creds.authzid.clone().unwrap_or_else(|| creds.username.clone()) });
        Next::Authenticate(creds)
    }

    fn sasl_line(&mut self, line: &[u8]) -> Option<Next> {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches(['\r', '\n']);
        // RFC 4954 4: "*" cancels the exchange, answered with 501.
        if text == "*" {
            self.leave_sasl();
            self.error("501 5.0.0 Authentication cancelled");
            return None;
        }
        let step = match &mut self.state {
            State::Sasl { step, .. } => std::mem::replace(step, SaslStep::PlainResponse),
            _ => return None,
        };
        match step {
            SaslStep::PlainResponse => self.plain(text),
            SaslStep::LoginUser => {
                let user = self.decode(text)?;
                self.enter_sasl(SaslStep::LoginPassword { user });
                None
            }
            SaslStep::LoginPassword { user } => {
                let password = self.decode(text)?;
                Some(self.ask_auth(Credentials { authzid: None, username: user, password }))
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use hamail_store::QueueId;

    impl Session {
        /// `delivered` without a store: a queue id stands for the proof.
        pub(crate) fn finish_delivery(&mut self, result: Result<QueueId, StoreError>) -> Output {
            self.finish_delivery_with(result.map(|id| format!("250 2.0.0 Ok: queued as {id}")))
        }
    }

    /// A fake driver: `@local.example` users exist (except `nobody`),
    /// `alias@local.example` expands to two users, other domains are remote;
    /// the password is `secret`; messages get queue ids 1, 2, 3... and the
    /// date `DATE`; their data is collected in `bodies` (refused ones too).
    pub(crate) struct Harness {
        pub s: Session,
        pub replies: String,
        pub txns: Vec<Transaction>,
        pub bodies: Vec<Vec<u8>>,
        pub refused: Vec<DataProblem>,
        spool: Vec<u8>,
        started: u64,
        pub closed: bool,
        pub starttls: usize,
    }

    /// Users own their address; `local.example` is ours.
    pub(crate) fn sender_verdict(c: &SenderCheck) -> SenderVerdict {
        match &c.authenticated {
            Some(user) if user.eq_ignore_ascii_case(c.sender.as_str()) => SenderVerdict::Allowed,
            Some(_) => SenderVerdict::NotOwned,
            None if c.sender.domain() == "local.example" => SenderVerdict::LocalNeedsAuthentication,
            None => SenderVerdict::Allowed,
        }
    }

    pub(crate) fn verdict(a: &Address) -> RcptVerdict {
        match (a.local_part(), a.domain()) {
            ("nobody", "local.example") => RcptVerdict::UnknownUser,
            ("fwd", "local.example") => RcptVerdict::Forward {
                local: vec![Address::parse("carol@local.example").unwrap()],
                remote: vec!["far@remote.example".into()],
            },
            ("tempfail", _) => RcptVerdict::TemporaryFailure("db\r\ndown".into()),
            ("alias", "local.example") => RcptVerdict::Local(vec![
                Address::parse("u1@local.example").unwrap(),
                Address::parse("u2@local.example").unwrap(),
            ]),
            (_, "local.example" | "localhost") => RcptVerdict::Local(vec![a.clone()]),
            _ => RcptVerdict::Remote,
        }
    }

    impl Harness {
        pub fn new(config: SmtpConfig) -> Self {
            let peer = PeerInfo { addr: "192.0.2.7:5000".parse().unwrap(), tls: false };
            Harness {
                s: Session::new(Arc::new(config), peer),
                replies: String::new(),
                txns: Vec::new(),
                bodies: Vec::new(),
                refused: Vec::new(),
                spool: Vec::new(),
                started: 0,
                closed: false,
                starttls: 0,
            }
        }
        pub fn feed(&mut self, input: &[u8]) {
            let mut out = self.s.handle(input);
            loop {
                self.spool.extend_from_slice(&self.s.take_message_data());
                self.replies.push_str(&String::from_utf8(out.reply).unwrap());
                out = match out.next {
                    Next::NeedInput => return,
                    Next::Close => {
                        self.closed = true;
                        return;
                    }
                    Next::CheckRecipient(a) => self.s.recipient_checked(verdict(&a)),
                    Next::CheckSender(c) => self.s.sender_checked(sender_verdict(&c)),
                    Next::Authenticate(c) => self.s.authenticated(if c.password == "secret" {
                        AuthResult::Success
                    } else {
                        AuthResult::Failure
                    }),
                    Next::StartData => {
                        assert!(self.spool.is_empty(), "message data before DATA");
                        self.started += 1;
                        self.s.data_started(Ok(DataStart { queue_id: QueueId(self.started), date: "DATE".into() }))
                    }
                    Next::Deliver(t) => {
                        let id = t.queue_id;
                        self.txns.push(t);
                        self.bodies.push(std::mem::take(&mut self.spool));
                        self.s.finish_delivery(Ok(id))
                    }
                    Next::Refused { problem, .. } => {
                        self.refused.push(problem);
                        self.bodies.push(std::mem::take(&mut self.spool));
                        self.s.handle(&[])
                    }
                    Next::StartTls => {
                        self.starttls += 1;
                        self.s.tls_established()
                    }
                };
            }
        }
        pub fn lines(&self) -> Vec<&str> {
            self.replies.split("\r\n").filter(|l| !l.is_empty()).collect()
        }
        pub fn last(&self) -> &str {
            self.lines().last().copied().unwrap_or("")
        }
        pub fn clear(&mut self) {
            self.replies.clear();
        }
    }

    const EHLO: &str = "EHLO client.example\r\n";
    const MAIL: &str = "EHLO client.example\r\nMAIL FROM:<s@remote.example>\r\n";
    const RCPT: &str = "EHLO client.example\r\nMAIL FROM:<s@remote.example>\r\nRCPT TO:<u@local.example>\r\n";

    /// Every command in every state: (state script, command, expected start
    /// of the last reply line).
    #[test]
    fn command_state_table() {
        let table: &[(&str, &str, &str)] = &[
            // Connected
            ("", "EHLO c.example", "250 HELP"),
            ("", "HELO c.example", "250 localhost"),
            ("", "EHLO", "501 5.5.4"),
            ("", "MAIL FROM:<a@b.example>", "503 5.5.1"),
            ("", "RCPT TO:<u@local.example>", "503 5.5.1"),
            ("", "DATA", "503 5.5.1"),
            ("", "RSET", "250 2.0.0"),
            ("", "NOOP", "250 2.0.0"),
            ("", "QUIT", "221 2.0.0"),
            ("", "VRFY u", "252 2.5.0"),
            ("", "HELP", "214 2.0.0"),
            ("", "STARTTLS", "220 2.0.0"),
            ("", "AUTH PLAIN", "503 5.5.1"),
            ("", "EXPN list", "502 5.5.1"),
            ("", "BDAT 10 LAST", "502 5.5.1"),
            ("", "FOO bar", "500 5.5.1"),
            ("", "LHLO c.example", "500 5.5.1"),
            // Greeted
            (EHLO, "EHLO c.example", "250 HELP"),
            (EHLO, "HELO c.example", "250 localhost"),
            (EHLO, "MAIL FROM:<a@b.example>", "250 2.1.0"),
            (EHLO, "MAIL FROM:<>", "250 2.1.0"),
            (EHLO, "MAIL FROM:<a@b.example> BODY=8BITMIME SIZE=1000", "250 2.1.0"),
            (EHLO, "MAIL FROM:<a@b.example> SIZE=999999999999", "552 5.3.4"),
            (EHLO, "MAIL FROM:<a@b.example> SMTPUTF8", "555 5.5.4"),
            (EHLO, "MAIL FROM:<a@b.example> FOO=BAR", "555 5.5.4"),
            (EHLO, "MAIL FROM:<not an address>", "501"),
            (EHLO, "MAIL FROM:a@b.example", "501 5.5.4"),
            (EHLO, "RCPT TO:<u@local.example>", "503 5.5.1"),
            (EHLO, "DATA", "503 5.5.1"),
            (EHLO, "RSET", "250 2.0.0"),
            (EHLO, "NOOP", "250 2.0.0"),
            (EHLO, "QUIT", "221 2.0.0"),
            (EHLO, "VRFY u", "252 2.5.0"),
            (EHLO, "HELP", "214 2.0.0"),
            (EHLO, "STARTTLS", "220 2.0.0"),
            (EHLO, "AUTH PLAIN", "503 5.5.1"),
            (EHLO, "FOO", "500 5.5.1"),
            // Mail (no recipient yet)
            (MAIL, "EHLO c.example", "250 HELP"),
            (MAIL, "MAIL FROM:<a@b.example>", "503 5.5.1"),
            (MAIL, "RCPT TO:<u@local.example>", "250 2.1.5"),
            (MAIL, "RCPT TO:<Postmaster>", "250 2.1.5"),
            (MAIL, "RCPT TO:<nobody@local.example>", "550 5.1.1"),
            (MAIL, "RCPT TO:<x@remote.example>", "554 5.7.1"),
            (MAIL, "RCPT TO:<tempfail@local.example>", "451 4.3.0"),
            (MAIL, "RCPT TO:<a b>", "501"),
            (MAIL, "RCPT TO:<>", "501 5.1.3"),
            (MAIL, "RCPT TO:<u@local.example> NOTIFY=NEVER", "555 5.5.4"),
            (MAIL, "DATA", "554 5.5.1"),
            (MAIL, "RSET", "250 2.0.0"),
            (MAIL, "NOOP", "250 2.0.0"),
            (MAIL, "QUIT", "221 2.0.0"),
            (MAIL, "VRFY u", "252 2.5.0"),
            (MAIL, "HELP", "214 2.0.0"),
            (MAIL, "STARTTLS", "503 5.5.1"),
            (MAIL, "AUTH PLAIN", "503 5.5.1"),
            (MAIL, "FOO", "500 5.5.1"),
            // Rcpt (one recipient accepted)
            (RCPT, "EHLO c.example", "250 HELP"),
            (RCPT, "MAIL FROM:<a@b.example>", "503 5.5.1"),
            (RCPT, "RCPT TO:<u2@local.example>", "250 2.1.5"),
            (RCPT, "DATA", "354"),
            (RCPT, "RSET", "250 2.0.0"),
            (RCPT, "NOOP", "250 2.0.0"),
            (RCPT, "QUIT", "221 2.0.0"),
            (RCPT, "VRFY u", "252 2.5.0"),
            (RCPT, "HELP", "214 2.0.0"),
            (RCPT, "STARTTLS", "503 5.5.1"),
            (RCPT, "AUTH PLAIN", "503 5.5.1"),
            (RCPT, "FOO", "500 5.5.1"),
        ];
        let config = SmtpConfig { tls_available: true, ..SmtpConfig::default() };
        for (script, cmd, want) in table {
            let mut h = Harness::new(config.clone());
            h.feed(script.as_bytes());
            h.clear();
            h.feed(format!("{cmd}\r\n").as_bytes());
            assert!(h.last().starts_with(want), "after {script:?} {cmd:?}: got {:?}", h.replies);
            assert_eq!(h.closed, *cmd == "QUIT");
        }
    }

    /// State after a command: the reply to a probe that depends on it.
    #[test]
    fn transitions() {
        let table: &[(&str, &str, &str)] = &[
            (RCPT, "RSET", "503 5.5.1"),           // envelope gone
            (RCPT, "EHLO c.example", "503 5.5.1"), // EHLO resets too
            (RCPT, "NOOP", "354"),                 // NOOP keeps it
            (RCPT, "VRFY x", "354"),
            (RCPT, "RCPT TO:<nobody@local.example>", "354"), // one still good
            (MAIL, "RCPT TO:<nobody@local.example>", "554 5.5.1"),
            (MAIL, "RCPT TO:<u@local.example>", "354"),
        ];
        for (script, cmd, want) in table {
            let mut h = Harness::new(SmtpConfig::default());
            h.feed(format!("{script}{cmd}\r\n").as_bytes());
            h.clear();
            h.feed(b"DATA\r\n");
            assert!(h.last().starts_with(want), "after {script:?} {cmd:?}: {:?}", h.replies);
        }
    }

    #[test]
    fn alias_forwarding_to_other_domains_is_not_relaying() {
        let mut h = Harness::new(SmtpConfig::default());
        h.feed(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<fwd@local.example>\r\nRCPT TO:<x@elsewhere.example>\r\nDATA\r\nhi\r\n.\r\n");
        assert!(h.replies.contains("554 5.7.1"), "a plain remote rcpt is still relaying: {}", h.replies);
        assert_eq!(h.txns.len(), 1, "{}", h.replies);
        let t = &h.txns[0];
        assert_eq!(t.local, vec![Address::parse("carol@local.example").unwrap()]);
        assert_eq!(t.remote, vec!["far@remote.example".to_string()]);
        assert_eq!(t.recipients, vec!["fwd@local.example".to_string()]);
    }

    #[test]
    fn data_in_data_state_is_not_a_command() {
        let mut h = Harness::new(SmtpConfig::default());
        h.feed(RCPT.as_bytes());
        h.feed(b"DATA\r\nQUIT\r\nRSET\r\n..\r\n.\r\nNOOP\r\n");
        assert_eq!(h.txns.len(), 1);
        // Not a header field: our Received:, an empty line, then the data.
        let body = String::from_utf8(h.bodies[0].clone()).unwrap();
        assert!(body.starts_with("Received: from client.example ([192.0.2.7])\r\n"), "{body}");
        assert!(body.ends_with(";\r\n\tDATE\r\n\r\nQUIT\r\nRSET\r\n.\r\n"), "{body}");
        assert!(!h.closed);
        let lines = h.lines();
        let n = lines.len();
        assert_eq!(
            &lines[n - 3..],
            &["354 End data with <CR><LF>.<CR><LF>", "250 2.0.0 Ok: queued as 000000000001", "250 2.0.0 Ok"]
        );
    }

    #[test]
    fn transaction_contents_and_dedup() {
        let mut h = Harness::new(SmtpConfig::default());
        h.feed(b"EHLO c.example\r\nMAIL FROM:<S@Remote.example>\r\nRCPT TO:<alias@local.example>\r\nRCPT TO:<U1@local.example>\r\nRCPT TO:<alias@local.example>\r\nDATA\r\nhi\r\n.\r\n");
        assert_eq!(h.txns.len(), 1);
        let t = &h.txns[0];
        assert_eq!(t.return_path.as_deref(), Some("S@Remote.example"));
        let local: Vec<&str> = t.local.iter().map(|a| a.as_str()).collect();
        assert_eq!(local, ["u1@local.example", "u2@local.example"]);
        assert_eq!(t.recipients.len(), 3);
        assert!(t.remote.is_empty());
        assert_eq!(t.helo, "c.example");
        assert!(t.esmtp && !t.tls && t.authenticated.is_none());
        // The session is back to Greeted: a new MAIL is fine.
        h.feed(b"MAIL FROM:<>\r\n");
        assert_eq!(h.last(), "250 2.1.0 Ok");
    }

    #[test]
    fn store_failures() {
        for (err, want) in
            [(StoreError::Temporary("x".into()), "451 4.3.0"), (StoreError::Permanent("x".into()), "554 5.0.0")]
        {
            let mut s = Session::new(
                Arc::new(SmtpConfig::default()),
                PeerInfo { addr: "[::1]:25".parse().unwrap(), tls: false },
            );
            let mut out = s.handle(RCPT.as_bytes());
            let Next::CheckRecipient(a) = out.next else { panic!() };
            out = s.recipient_checked(verdict(&a));
            assert!(matches!(out.next, Next::NeedInput));
            out = s.handle(b"DATA\r\nx\r\n.\r\nNOOP\r\n");
            assert!(matches!(out.next, Next::StartData));
            out = s.data_started(Ok(DataStart { queue_id: QueueId(7), date: "D".into() }));
            assert!(matches!(out.next, Next::Deliver(_)));
            out = s.finish_delivery(Err(err));
            let reply = String::from_utf8(out.reply).unwrap();
            assert!(reply.starts_with(want), "{reply}");
            assert!(reply.ends_with("250 2.0.0 Ok\r\n"), "pipelined NOOP runs after");
        }
    }

    #[test]
    fn data_waits_for_the_store_and_a_failed_start_keeps_the_envelope() {
        for (err, want) in [
            (StoreError::Busy("no memory".into()), "451 4.3.1 Insufficient system resources"),
            (StoreError::Unavailable("x".into()), "451 4.3.0"),
        ] {
            let mut s = Session::new(
                Arc::new(SmtpConfig::default()),
                PeerInfo { addr: "127.0.0.1:25".parse().unwrap(), tls: false },
            );
            let out = s.handle(RCPT.as_bytes());
            let Next::CheckRecipient(a) = out.next else { panic!("{:?}", out.next) };
            s.recipient_checked(verdict(&a));
            // No 354 before the store started the message; the pipelined
            // input waits.
            let out = s.handle(b"DATA\r\nhi\r\n.\r\n");
            assert!(matches!(out.next, Next::StartData) && out.reply.is_empty());
            assert!(s.take_message_data().is_empty());
            let out = s.data_started(Err(err));
            let reply = String::from_utf8(out.reply).unwrap();
            // The data lines are then commands: "hi" is unknown, "." too.
            assert!(reply.starts_with(want), "{reply}");
            assert!(s.take_message_data().is_empty());
            // The envelope is kept: DATA again, and this time it starts.
            let out = s.handle(b"DATA\r\n");
            assert!(matches!(out.next, Next::StartData));
            let out = s.data_started(Ok(DataStart { queue_id: QueueId(9), date: "D".into() }));
            assert_eq!(out.reply, b"354 End data with <CR><LF>.<CR><LF>\r\n");
            assert!(s.take_message_data().starts_with(b"Received: from client.example ([127.0.0.1])\r\n"));
        }
    }

    #[test]
    fn resume_in_wrong_state() {
        let mut s = Session::new(
            Arc::new(SmtpConfig::default()),
            PeerInfo { addr: "127.0.0.1:25".parse().unwrap(), tls: false },
        );
        for out in [
            s.recipient_checked(RcptVerdict::Remote),
            s.authenticated(AuthResult::Success),
            s.finish_delivery(Ok(QueueId(1))),
            s.tls_established(),
            s.data_started(Ok(DataStart { queue_id: QueueId(1), date: "D".into() })),
        ] {
            assert!(String::from_utf8(out.reply).unwrap().starts_with("451 4.3.0 Internal error"));
        }
        assert!(s.authenticated_user().is_none());
        // Still usable.
        let out = s.handle(b"NOOP\r\n");
        assert_eq!(out.reply, b"250 2.0.0 Ok\r\n");
        // Input while the driver owes us an answer is a driver bug: 421.
        let out = s.handle(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@local.example>\r\n");
        assert!(matches!(out.next, Next::CheckRecipient(_)));
        let out = s.handle(b"NOOP\r\n");
        assert!(matches!(out.next, Next::Close));
        assert!(out.reply.starts_with(b"421 4.3.0"));
    }
}
