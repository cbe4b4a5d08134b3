//! The POP3 state machine of one connection.

use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine as _;
use hamail_store::{Address, BodyHash, EntryId, MailboxEntry, StoreError};

/// What the session needs to know about this server.
#[derive(Debug, Clone)]
pub struct Pop3Config {
    /// This node's host name (in the greeting: which node of a cluster
    /// answered, as the SMTP greeting says).
    pub hostname: String,
    /// Advertise and accept STLS (RFC 2595) while the connection is not TLS.
    pub tls_available: bool,
    /// Allow USER/PASS and AUTH PLAIN without TLS. RFC 2595 section 2.1
    /// says clear-text passwords should only cross a protected link; the
    /// driver sets this for loopback connections.
    pub plaintext_auth_allowed: bool,
    /// After this many client errors the session answers
    /// `-ERR too many errors` and closes: a client that only produces errors
    /// is broken or probing.
    pub max_errors: usize,
    /// The longest command line accepted, without its CRLF. RFC 2449
    /// section 4 limits commands to 255 octets; we are lenient.
    pub max_line: usize,
    /// Once the replies to pipelined commands reach this many octets, the
    /// session stops and asks the driver to send them ([`Next::Flush`])
    /// before it runs the next buffered command: a pipeline of small
    /// commands with large answers (LIST of a big maildrop) is answered
    /// through a bounded buffer, at the pace the client reads.
    pub reply_flush: usize,
}

impl Default for Pop3Config {
    fn default() -> Self {
        Pop3Config {
            hostname: "localhost".to_string(),
            tls_available: false,
            plaintext_auth_allowed: false,
            max_errors: 20,
            max_line: 512,
            reply_flush: 64 * 1024,
        }
    }
}

/// The other end of the connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    /// The connection is already TLS (POP3S on port 995, or after STLS).
    pub tls: bool,
}

/// What the session returns after every step: bytes to send (possibly
/// empty), then what the driver must do next.
#[derive(Debug)]
pub struct Output {
    pub reply: Vec<u8>,
    pub next: Next,
}

/// What the driver does after writing [`Output::reply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Read more input and call [`Session::handle`].
    NeedInput,
    /// Verify these credentials (and delay on failure), then call
    /// [`Session::authenticated`].
    Authenticate(Credentials),
    /// Take the maildrop lock of this user and load its entries, then call
    /// [`Session::maildrop_opened`].
    OpenMaildrop(Address),
    /// RETR or TOP: open this body for reading (and take the buffers to
    /// send it), then call [`Session::body_opened`]. Nothing of the answer
    /// has been sent yet, so it can still be `-ERR`.
    OpenBody(BodyHash),
    /// Send the reply (the `+OK` line and the `Return-Path:` line), then
    /// the opened body through a [`crate::Stuffer`] for `top`, then `.\r\n`;
    /// then call [`Session::body_sent`]. If the body cannot be read to its
    /// end, the multi-line answer cannot be taken back: the connection is
    /// closed without the terminator, so the client sees the failure.
    SendBody { top: Option<usize> },
    /// Send the reply now, then call [`Session::handle`] with no new input:
    /// more commands are buffered (see [`Pop3Config::reply_flush`]).
    Flush,
    /// The client said QUIT in TRANSACTION state (RFC 1939 section 6):
    /// delete these entries atomically, call [`Session::updated`], and
    /// release the maildrop lock afterwards. `delete` may be empty.
    Update { user: Address, delete: Vec<EntryId> },
    /// Do the TLS handshake (the `+OK` has been sent), then call
    /// [`Session::tls_established`].
    StartTls,
    /// Flush the reply and close the connection, releasing the maildrop
    /// lock if it is held. Nothing is deleted.
    Close,
}

/// A user name and password as the client sent them. The driver maps the
/// user name to an [`Address`].
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    // Never let a password reach a log line through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

/// The driver's answer to [`Next::Authenticate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthResult {
    Success(Address),
    /// Unknown user or wrong password (the client must not learn which).
    Failure,
    /// The directory could not answer; the text is shown to the client.
    TemporaryFailure(String),
}

/// The driver's answer to [`Next::OpenMaildrop`].
#[derive(Debug)]
pub enum MaildropResult {
    /// The lock is taken; the entries, oldest first.
    Opened(Vec<MailboxEntry>),
    /// Another session holds the lock (RFC 1939 section 8, RFC 3206 IN-USE).
    /// The driver holds no lock.
    InUse,
    /// The maildrop could not be loaded. The driver holds no lock.
    Failed(StoreError),
}

/// The driver's answer to [`Next::OpenBody`].
#[derive(Debug)]
pub enum BodyOpened {
    /// The body is open and the buffers to send it are reserved.
    Ready,
    /// No memory for the buffers now (the node-wide budget is spent).
    Busy,
    /// The store could not open the body.
    Failed(StoreError),
}

/// The open maildrop of an authenticated user: TRANSACTION state data.
#[derive(Debug)]
struct Maildrop {
    user: Address,
    entries: Vec<MailboxEntry>,
    /// Marked by DELE, indexed like `entries`; only QUIT makes it real.
    deleted: Vec<bool>,
}

impl Maildrop {
    fn new(user: Address, entries: Vec<MailboxEntry>) -> Self {
        let deleted = vec![false; entries.len()];
        Maildrop { user, entries, deleted }
    }
    /// Messages and octets not marked as deleted (STAT, RFC 1939 section 5).
    fn stat(&self) -> (usize, u64) {
        self.live().fold((0, 0), |(n, size), (_, e)| (n + 1, size + e.size))
    }
    /// (message number, entry) of every message not marked as deleted.
    fn live(&self) -> impl Iterator<Item = (usize, &MailboxEntry)> {
        self.entries.iter().enumerate().filter(|(i, _)| !self.deleted[*i]).map(|(i, e)| (i + 1, e))
    }
    /// The index of message `arg` (1-based, decimal), unless it does not
    /// exist or is marked as deleted (RFC 1939: "may not refer to a message
    /// marked as deleted").
    fn lookup(&self, arg: &str) -> Option<usize> {
        let n = parse_number(arg)?;
        let i = n.checked_sub(1)?;
        (i < self.entries.len() && !self.deleted[i]).then_some(i)
    }
}

/// The RFC 1939 states, plus the points where the session waits for the
/// driver. Each state carries only its own data.
#[derive(Debug)]
enum State {
    /// AUTHORIZATION; `user` is the name given by USER, waiting for PASS.
    Authorization { user: Option<String> },
    /// AUTHORIZATION, after `AUTH PLAIN` without an initial response: the
    /// next line is the client's SASL response, not a command (RFC 5034 4).
    SaslResponse,
    /// Waiting for [`Session::authenticated`].
    Authenticating,
    /// Waiting for [`Session::maildrop_opened`] for this user.
    OpeningMaildrop { user: Address },
    /// TRANSACTION.
    Transaction(Maildrop),
    /// TRANSACTION, waiting for [`Session::body_opened`] for RETR or TOP.
    OpeningBody { maildrop: Maildrop, index: usize, top: Option<usize> },
    /// TRANSACTION, waiting for [`Session::body_sent`].
    SendingBody(Maildrop),
    /// UPDATE, waiting for [`Session::updated`].
    Updating { user: Address, remaining: usize },
    /// Waiting for [`Session::tls_established`].
    StartingTls,
    /// Done: every further step answers [`Next::Close`].
    Closed,
}

/// One complete command line from the input buffer.
enum Line {
    Ok(Vec<u8>),
    TooLong,
}

/// The POP3 session of one connection.
pub struct Session {
    config: Arc<Pop3Config>,
    peer: PeerInfo,
    state: State,
    /// Input not yet processed: partial lines, and complete lines that
    /// arrived while waiting for the driver (PIPELINING, RFC 2449 6.6).
    buffer: Vec<u8>,
    /// Octets at the start of `buffer` already taken as lines; removed when
    /// `process` returns, so that a long pipeline is not moved line by line.
    consumed: usize,
    /// A line was too long: drop input up to the next LF.
    discarding: bool,
    /// Client errors so far, for [`Pop3Config::max_errors`].
    errors: usize,
}

const INTERNAL_ERROR: &[u8] = b"-ERR [SYS/TEMP] internal error\r\n";

impl Session {
    pub fn new(config: Arc<Pop3Config>, peer: PeerInfo) -> Session {
        Session {
            config,
            peer,
            state: State::Authorization { user: None },
            buffer: Vec::new(),
            consumed: 0,
            discarding: false,
            errors: 0,
        }
    }

    /// The greeting (RFC 1939 section 4). It carries no APOP timestamp
    /// (`<pid.clock@host>`): APOP needs the clear-text password on the server
    /// to compute MD5(timestamp + secret), and we only keep argon2 hashes, so
    /// APOP is not offered.
    pub fn greeting(&self) -> Vec<u8> {
        format!("+OK {} hamail POP3 ready\r\n", self.config.hostname).into_bytes()
    }

    /// The authenticated user, once the maildrop has been opened.
    pub fn user(&self) -> Option<&Address> {
        match &self.state {
            State::Transaction(m) | State::OpeningBody { maildrop: m, .. } | State::SendingBody(m) => Some(&m.user),
            State::Updating { user, .. } => Some(user),
            _ => None,
        }
    }

    /// Appends client input and processes every complete line it can.
    /// While the session waits for the driver, the input is only buffered
    /// and the answer is an empty reply with [`Next::NeedInput`]; the
    /// pending call (e.g. [`Session::body_opened`]) is still owed. Input that
    /// arrives while waiting for the TLS handshake is dropped (RFC 2595 4).
    pub fn handle(&mut self, input: &[u8]) -> Output {
        match self.state {
            State::Closed => return self.output(Vec::new(), Next::Close),
            State::StartingTls => return self.output(Vec::new(), Next::NeedInput),
            _ => {}
        }
        self.buffer.extend_from_slice(input);
        let mut reply = Vec::new();
        let next = self.process(&mut reply);
        self.output(reply, next)
    }

    /// The driver's answer to [`Next::Authenticate`].
    pub fn authenticated(&mut self, result: AuthResult) -> Output {
        if !matches!(self.state, State::Authenticating) {
            return self.internal_error();
        }
        let mut reply = Vec::new();
        match result {
            AuthResult::Success(user) => {
                self.state = State::OpeningMaildrop { user: user.clone() };
                return self.output(reply, Next::OpenMaildrop(user));
            }
            AuthResult::Failure => {
                self.state = State::Authorization { user: None };
                // The driver has already delayed this answer.
                self.client_error(&mut reply, "-ERR [AUTH] Invalid credentials");
            }
            AuthResult::TemporaryFailure(why) => {
                self.state = State::Authorization { user: None };
                reply.extend_from_slice(format!("-ERR [SYS/TEMP] {}\r\n", sanitize(&why)).as_bytes());
            }
        }
        let next = self.process(&mut reply);
        self.output(reply, next)
    }

    /// The driver's answer to [`Next::OpenMaildrop`].
    pub fn maildrop_opened(&mut self, result: MaildropResult) -> Output {
        let user = match std::mem::replace(&mut self.state, State::Closed) {
            State::OpeningMaildrop { user } => user,
            other => {
                self.state = other;
                return self.internal_error();
            }
        };
        let mut reply = Vec::new();
        match result {
            MaildropResult::Opened(entries) => {
                let maildrop = Maildrop::new(user, entries);
                let (n, size) = maildrop.stat();
                reply.extend_from_slice(format!("+OK maildrop has {n} messages ({size} octets)\r\n").as_bytes());
                self.state = State::Transaction(maildrop);
            }
            MaildropResult::InUse => {
                self.state = State::Authorization { user: None };
                reply.extend_from_slice(b"-ERR [IN-USE] Maildrop is locked by another session\r\n");
            }
            MaildropResult::Failed(e) => {
                self.state = State::Authorization { user: None };
                // The error text may name paths or internals: it is for the
                // driver's log, not for the client.
                let code = if e.is_temporary() { "SYS/TEMP" } else { "SYS/PERM" };
                reply.extend_from_slice(format!("-ERR [{code}] Unable to open maildrop\r\n").as_bytes());
            }
        }
        let next = self.process(&mut reply);
        self.output(reply, next)
    }

    /// The driver's answer to [`Next::OpenBody`]. When the body is ready,
    /// the reply is the first lines of the answer and the next step is
    /// [`Next::SendBody`]; otherwise the reply is `-ERR` and the session
    /// goes on with the next command.
    pub fn body_opened(&mut self, result: BodyOpened) -> Output {
        let (maildrop, index, top) = match std::mem::replace(&mut self.state, State::Closed) {
            State::OpeningBody { maildrop, index, top } => (maildrop, index, top),
            other => {
                self.state = other;
                return self.internal_error();
            }
        };
        let mut reply = Vec::new();
        let code = match result {
            BodyOpened::Ready => {
                let entry = &maildrop.entries[index];
                match top {
                    // RFC 1939 section 7 suggests the size in the RETR answer;
                    // it is the size LIST gave, before byte-stuffing.
                    None => reply.extend_from_slice(format!("+OK {} octets\r\n", entry.size).as_bytes()),
                    Some(_) => reply.extend_from_slice(b"+OK top of message follows\r\n"),
                }
                // The Return-Path line is part of the header section (RFC
                // 5321 4.4), so TOP sends it too. It never starts with '.'.
                reply.extend_from_slice(entry.return_path_line().as_bytes());
                self.state = State::SendingBody(maildrop);
                return self.output(reply, Next::SendBody { top });
            }
            BodyOpened::Busy => {
                reply.extend_from_slice(b"-ERR [SYS/TEMP] server busy, try again\r\n");
                None
            }
            BodyOpened::Failed(e) if e.is_temporary() => Some("SYS/TEMP"),
            BodyOpened::Failed(_) => Some("SYS/PERM"),
        };
        if let Some(code) = code {
            reply.extend_from_slice(format!("-ERR [{code}] Unable to read message\r\n").as_bytes());
        }
        self.state = State::Transaction(maildrop);
        let next = self.process(&mut reply);
        self.output(reply, next)
    }

    /// The driver's answer to [`Next::SendBody`]: the body and its
    /// terminator are out, and the session goes on with the next command;
    /// or the body broke off mid-way, and the session ends (the driver
    /// closes the connection without sending the terminator).
    pub fn body_sent(&mut self, result: Result<(), StoreError>) -> Output {
        let maildrop = match std::mem::replace(&mut self.state, State::Closed) {
            State::SendingBody(maildrop) => maildrop,
            other => {
                self.state = other;
                return self.internal_error();
            }
        };
        if result.is_err() {
            return self.output(Vec::new(), Next::Close);
        }
        self.state = State::Transaction(maildrop);
        let mut reply = Vec::new();
        let next = self.process(&mut reply);
        self.output(reply, next)
    }

    /// The driver's answer to [`Next::Update`]. Either way the session ends.
    pub fn updated(&mut self, result: Result<(), StoreError>) -> Output {
        let remaining = match self.state {
            State::Updating { remaining, .. } => remaining,
            _ => return self.internal_error(),
        };
        let reply = match result {
            Ok(()) => format!("+OK hamail signing off ({remaining} messages left)\r\n").into_bytes(),
            // RFC 1939 section 6: report that some deleted messages were not
            // removed. The delete is atomic, so in fact none were.
            Err(_) => b"-ERR [SYS/TEMP] some deleted messages not removed\r\n".to_vec(),
        };
        self.state = State::Closed;
        self.output(reply, Next::Close)
    }

    /// The driver finished the TLS handshake after [`Next::StartTls`].
    /// RFC 2595 section 4: the session is back at the start of
    /// AUTHORIZATION, and forgets anything learnt before (a USER name).
    pub fn tls_established(&mut self) -> Output {
        if !matches!(self.state, State::StartingTls) {
            return self.internal_error();
        }
        self.peer.tls = true;
        self.state = State::Authorization { user: None };
        self.drop_input();
        self.output(Vec::new(), Next::NeedInput)
    }

    /// The client was idle too long (RFC 1939 section 3: the autologout
    /// timer). Nothing is deleted; the driver closes the connection.
    pub fn timeout(&mut self) -> Vec<u8> {
        self.state = State::Closed;
        b"-ERR autologout; idle for too long\r\n".to_vec()
    }

    fn output(&self, reply: Vec<u8>, next: Next) -> Output {
        Output { reply, next }
    }

    /// A resume method was called when the session was not waiting for it:
    /// a driver bug. The state can no longer be trusted, so end the session
    /// (nothing is deleted) rather than panic.
    fn internal_error(&mut self) -> Output {
        self.state = State::Closed;
        self.output(INTERNAL_ERROR.to_vec(), Next::Close)
    }

    fn plaintext_allowed(&self) -> bool {
        self.peer.tls || self.config.plaintext_auth_allowed
    }

    /// Writes a `-ERR` for something the client did wrong and counts it;
    /// once the count reaches `max_errors` the answer is
    /// `-ERR too many errors` instead and the session ends.
    fn client_error(&mut self, reply: &mut Vec<u8>, line: &str) {
        self.errors += 1;
        if self.errors >= self.config.max_errors {
            reply.extend_from_slice(b"-ERR too many errors\r\n");
            self.state = State::Closed;
        } else {
            reply.extend_from_slice(line.as_bytes());
            reply.extend_from_slice(b"\r\n");
        }
    }

    /// Runs every complete line in the buffer (PIPELINING, RFC 2449 6.6)
    /// until the buffer holds no complete line or the driver must act.
    fn process(&mut self, reply: &mut Vec<u8>) -> Next {
        let next = self.run_lines(reply);
        self.buffer.drain(..self.consumed);
        self.consumed = 0;
        next
    }

    fn run_lines(&mut self, reply: &mut Vec<u8>) -> Next {
        loop {
            match self.state {
                State::Closed => return Next::Close,
                State::Authorization { .. } | State::SaslResponse | State::Transaction(_) => {}
                // Waiting for the driver: keep the input for later.
                _ => return Next::NeedInput,
            }
            if reply.len() >= self.config.reply_flush && self.has_line() {
                return Next::Flush;
            }
            match self.next_line() {
                None => return Next::NeedInput,
                Some(Line::TooLong) => self.client_error(reply, "-ERR line too long"),
                Some(Line::Ok(line)) => {
                    if let Some(next) = self.execute(&line, reply) {
                        return next;
                    }
                }
            }
        }
    }

    /// Takes the next complete line (without its CRLF or bare LF) off the
    /// buffer. A line longer than `max_line` is reported once, and the rest
    /// of it, up to the next LF, is dropped unread.
    fn next_line(&mut self) -> Option<Line> {
        if self.discarding {
            match self.buffer[self.consumed..].iter().position(|&b| b == b'\n') {
                Some(lf) => {
                    self.consumed += lf + 1;
                    self.discarding = false;
                }
                None => {
                    self.drop_input();
                    self.discarding = true;
                    return None;
                }
            }
        }
        let max = self.config.max_line;
        let pending = &self.buffer[self.consumed..];
        match pending.iter().position(|&b| b == b'\n') {
            Some(lf) => {
                let mut line = &pending[..lf];
                self.consumed += lf + 1;
                if line.last() == Some(&b'\r') {
                    line = &line[..line.len() - 1];
                }
                if line.len() > max {
                    Some(Line::TooLong)
                } else {
                    Some(Line::Ok(line.to_vec()))
                }
            }
            // +1: the line may be complete but for its LF after a CR.
            None if pending.len() > max + 1 => {
                self.drop_input();
                self.discarding = true;
                Some(Line::TooLong)
            }
            None => None,
        }
    }

    /// Whether the buffer holds the end of a line, so that the next call
    /// to [`Self::next_line`] has something to run or refuse.
    fn has_line(&self) -> bool {
        let pending = &self.buffer[self.consumed..];
        pending.contains(&b'\n') || pending.len() > self.config.max_line + 1
    }

    /// Forgets all buffered input.
    fn drop_input(&mut self) {
        self.buffer.clear();
        self.consumed = 0;
        self.discarding = false;
    }

    /// Runs one line in the current state; `Some` when the driver must act.
    fn execute(&mut self, line: &[u8], reply: &mut Vec<u8>) -> Option<Next> {
        // Commands are ASCII (RFC 1939 section 3); anything else in a line can
        // only be an argument, and a password with invalid UTF-8 simply fails.
        let line = String::from_utf8_lossy(line);
        if matches!(self.state, State::SaslResponse) {
            self.state = State::Authorization { user: None };
            return self.sasl_plain_response(line.trim(), reply);
        }
        let (verb, rest) = match line.split_once(' ') {
            Some((verb, rest)) => (verb, rest),
            None => (&*line, ""),
        };
        let verb = verb.to_ascii_uppercase();
        match self.state {
            State::Authorization { .. } => self.authorization(&verb, rest, reply),
            State::Transaction(_) => self.transaction(&verb, rest, reply),
            // `process` only runs lines in the states above.
            _ => None,
        }
    }

    /// A command in AUTHORIZATION state (RFC 1939 sections 4 and 7,
    /// RFC 2449, RFC 2595, RFC 5034).
    fn authorization(&mut self, verb: &str, rest: &str, reply: &mut Vec<u8>) -> Option<Next> {
        let args: Vec<&str> = rest.split_ascii_whitespace().collect();
        match verb {
            "CAPA" => self.capa(reply),
            "USER" => {
                if !self.plaintext_allowed() {
                    self.client_error(reply, PLAINTEXT_DISALLOWED);
                } else if args.len() != 1 {
                    self.client_error(reply, "-ERR syntax error");
                } else {
                    // Not "valid mailbox" (RFC 1939's example): the answer must
                    // not tell whether the user exists.
                    self.state = State::Authorization { user: Some(args[0].to_string()) };
                    reply.extend_from_slice(b"+OK send PASS\r\n");
                }
            }
            "PASS" => {
                // RFC 1939 section 7: after a failed PASS the client starts
                // again with USER.
                let user = match &mut self.state {
                    State::Authorization { user } => user.take(),
                    _ => None,
                };
                if !self.plaintext_allowed() {
                    self.client_error(reply, PLAINTEXT_DISALLOWED);
                } else if let Some(username) = user {
                    // RFC 1939 section 7: PASS has exactly one argument, so a
                    // server may treat spaces in it as part of the password.
                    if rest.is_empty() {
                        self.client_error(reply, "-ERR syntax error");
                    } else {
                        self.state = State::Authenticating;
                        return Some(Next::Authenticate(Credentials { username, password: rest.to_string() }));
                    }
                } else {
                    self.client_error(reply, "-ERR send USER first");
                }
            }
            "AUTH" => return self.auth(&args, reply),
            "STLS" => {
                if self.peer.tls {
                    self.client_error(reply, "-ERR already using TLS");
                } else if !self.config.tls_available {
                    self.client_error(reply, "-ERR STLS not available");
                } else {
                    reply.extend_from_slice(b"+OK Begin TLS negotiation\r\n");
                    // RFC 2595 section 4 (and CVE-2011-0411 in other
                    // servers): anything the client pipelined after STLS came
                    // in clear text and must never run as if it had come
                    // over TLS.
                    self.drop_input();
                    self.state = State::StartingTls;
                    return Some(Next::StartTls);
                }
            }
            "QUIT" => {
                reply.extend_from_slice(b"+OK hamail signing off\r\n");
                self.state = State::Closed;
                return Some(Next::Close);
            }
            // No APOP: see `greeting`.
            "APOP" => self.client_error(reply, "-ERR APOP not supported"),
            "STAT" | "LIST" | "RETR" | "DELE" | "NOOP" | "RSET" | "TOP" | "UIDL" => {
                self.client_error(reply, "-ERR command not valid in this state")
            }
            _ => self.client_error(reply, "-ERR unknown command"),
        }
        None
    }

    /// CAPA (RFC 2449 section 5). What is listed depends on the state and
    /// on whether a password may be sent now.
    fn capa(&self, reply: &mut Vec<u8>) {
        reply.extend_from_slice(b"+OK Capability list follows\r\n");
        reply.extend_from_slice(b"TOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n");
        if matches!(self.state, State::Authorization { .. }) {
            if self.plaintext_allowed() {
                reply.extend_from_slice(b"USER\r\nSASL PLAIN\r\n");
            }
            if self.config.tls_available && !self.peer.tls {
                reply.extend_from_slice(b"STLS\r\n");
            }
        }
        reply.extend_from_slice(b"IMPLEMENTATION hamail\r\n.\r\n");
    }

    /// AUTH (RFC 5034). Only PLAIN (RFC 4616) is offered: the password
    /// hashes rule out the challenge-response mechanisms.
    fn auth(&mut self, args: &[&str], reply: &mut Vec<u8>) -> Option<Next> {
        if args.is_empty() {
            // The RFC 1734 form, still used by clients to list mechanisms.
            reply.extend_from_slice(b"+OK\r\n");
            if self.plaintext_allowed() {
                reply.extend_from_slice(b"PLAIN\r\n");
            }
            reply.extend_from_slice(b".\r\n");
            return None;
        }
        if args.len() > 2 {
            self.client_error(reply, "-ERR syntax error");
            return None;
        }
        if !args[0].eq_ignore_ascii_case("PLAIN") {
            self.client_error(reply, "-ERR unsupported authentication mechanism");
            return None;
        }
        if !self.plaintext_allowed() {
            self.client_error(reply, PLAINTEXT_DISALLOWED);
            return None;
        }
        match args.get(1) {
            // RFC 5034 section 4: "=" is an empty initial response.
            Some(&"=") => self.sasl_plain_response("", reply),
            Some(initial) => self.sasl_plain_response(initial, reply),
            None => {
                // An empty challenge: "+" and a space (RFC 5034 section 4).
                reply.extend_from_slice(b"+ \r\n");
                self.state = State::SaslResponse;
                None
            }
        }
    }

    /// The client's PLAIN response: base64 of `authzid NUL authcid NUL
    /// passwd` (RFC 4616 section 2). The state is AUTHORIZATION.
    fn sasl_plain_response(&mut self, response: &str, reply: &mut Vec<u8>) -> Option<Next> {
        if response == "*" {
            // RFC 5034 section 4: the client cancelled; reject with -ERR.
            self.client_error(reply, "-ERR authentication cancelled");
            return None;
        }
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(response) else {
            self.client_error(reply, "-ERR invalid base64");
            return None;
        };
        let mut parts = decoded.split(|&b| b == 0);
        let (Some(authzid), Some(authcid), Some(passwd), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            self.client_error(reply, "-ERR invalid PLAIN response");
            return None;
        };
        // RFC 4616 section 2: all three are UTF-8, and authcid and passwd
        // are not empty.
        let (Ok(authzid), Ok(authcid), Ok(passwd)) =
            (std::str::from_utf8(authzid), std::str::from_utf8(authcid), std::str::from_utf8(passwd))
        else {
            self.client_error(reply, "-ERR invalid PLAIN response");
            return None;
        };
        if authcid.is_empty() || passwd.is_empty() {
            self.client_error(reply, "-ERR invalid PLAIN response");
            return None;
        }
        // Acting as another user is not supported; naming oneself is fine.
        if !authzid.is_empty() && !authzid.eq_ignore_ascii_case(authcid) {
            self.client_error(reply, "-ERR [AUTH] Authorization identity not supported");
            return None;
        }
        self.state = State::Authenticating;
        Some(Next::Authenticate(Credentials { username: authcid.to_string(), password: passwd.to_string() }))
    }

    /// A command in TRANSACTION state (RFC 1939 sections 5 and 7).
    fn transaction(&mut self, verb: &str, rest: &str, reply: &mut Vec<u8>) -> Option<Next> {
        let args: Vec<&str> = rest.split_ascii_whitespace().collect();
        let State::Transaction(maildrop) = &mut self.state else {
            return None;
        };
        match verb {
            "STAT" => {
                let (n, size) = maildrop.stat();
                reply.extend_from_slice(format!("+OK {n} {size}\r\n").as_bytes());
            }
            "LIST" | "UIDL" => {
                let uidl = verb == "UIDL";
                // UIDL: the EntryId, stable and never reused (RFC 1939 7).
                let item = |n: usize, e: &MailboxEntry| {
                    if uidl {
                        format!("{n} {}", e.id)
                    } else {
                        format!("{n} {}", e.size)
                    }
                };
                match args.as_slice() {
                    [] => {
                        if uidl {
                            reply.extend_from_slice(b"+OK\r\n");
                        } else {
                            let (n, size) = maildrop.stat();
                            reply.extend_from_slice(format!("+OK {n} messages ({size} octets)\r\n").as_bytes());
                        }
                        for (n, e) in maildrop.live() {
                            reply.extend_from_slice(item(n, e).as_bytes());
                            reply.extend_from_slice(b"\r\n");
                        }
                        reply.extend_from_slice(b".\r\n");
                    }
                    [msg] => match maildrop.lookup(msg) {
                        Some(i) => {
                            let line = item(i + 1, &maildrop.entries[i]);
                            reply.extend_from_slice(format!("+OK {line}\r\n").as_bytes());
                        }
                        None => self.client_error(reply, NO_SUCH_MESSAGE),
                    },
                    _ => self.client_error(reply, "-ERR syntax error"),
                }
            }
            "RETR" | "TOP" => {
                let parsed = match (verb, args.as_slice()) {
                    ("RETR", [msg]) => Some((*msg, None)),
                    ("TOP", [msg, lines]) => parse_line_count(lines).map(|n| (*msg, Some(n))),
                    _ => None,
                };
                let Some((msg, top)) = parsed else {
                    self.client_error(reply, "-ERR syntax error");
                    return None;
                };
                let Some(index) = maildrop.lookup(msg) else {
                    self.client_error(reply, NO_SUCH_MESSAGE);
                    return None;
                };
                let body = maildrop.entries[index].body;
                if let State::Transaction(maildrop) = std::mem::replace(&mut self.state, State::Closed) {
                    self.state = State::OpeningBody { maildrop, index, top };
                }
                return Some(Next::OpenBody(body));
            }
            "DELE" => match args.as_slice() {
                [msg] => match maildrop.lookup(msg) {
                    Some(i) => {
                        maildrop.deleted[i] = true;
                        reply.extend_from_slice(format!("+OK message {} deleted\r\n", i + 1).as_bytes());
                    }
                    None => self.client_error(reply, NO_SUCH_MESSAGE),
                },
                _ => self.client_error(reply, "-ERR syntax error"),
            },
            "RSET" => {
                maildrop.deleted.iter_mut().for_each(|d| *d = false);
                let (n, size) = maildrop.stat();
                reply.extend_from_slice(format!("+OK maildrop has {n} messages ({size} octets)\r\n").as_bytes());
            }
            "NOOP" => reply.extend_from_slice(b"+OK\r\n"),
            "CAPA" => self.capa(reply),
            "QUIT" => {
                // RFC 1939 section 6: only QUIT from TRANSACTION enters
                // UPDATE; a dropped connection deletes nothing.
                let (remaining, _) = maildrop.stat();
                let delete =
                    maildrop.entries.iter().zip(&maildrop.deleted).filter(|(_, d)| **d).map(|(e, _)| e.id).collect();
                let user = maildrop.user.clone();
                self.state = State::Updating { user: user.clone(), remaining };
                // Whatever the client pipelined after QUIT is never run.
                self.drop_input();
                return Some(Next::Update { user, delete });
            }
            "USER" | "PASS" | "AUTH" | "STLS" | "APOP" => {
                self.client_error(reply, "-ERR command not valid in this state")
            }
            _ => self.client_error(reply, "-ERR unknown command"),
        }
        None
    }
}

const PLAINTEXT_DISALLOWED: &str = "-ERR [AUTH] Plaintext authentication disallowed without TLS";
const NO_SUCH_MESSAGE: &str = "-ERR no such message";

/// A decimal number of ASCII digits only (`usize::from_str` would also
/// take a leading `+`); at most 9 digits, so it cannot overflow.
fn parse_number(s: &str) -> Option<usize> {
    if s.is_empty() || s.len() > 9 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The line count of TOP: RFC 1939 section 7 makes it any non-negative
/// number, so one too large to count is more lines than any message has
/// (the whole message), not an error. Only ASCII digits.
fn parse_line_count(s: &str) -> Option<usize> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // All digits: parsing can only fail by overflow.
    Some(s.parse().unwrap_or(usize::MAX))
}

/// Text from the driver made safe for one reply line.
fn sanitize(s: &str) -> String {
    let s: String = s.chars().map(|c| if c.is_control() { ' ' } else { c }).take(200).collect();
    if s.trim().is_empty() {
        "Temporary failure, try again later".to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hamail_store::QueueId;

    const BODY1: &[u8] = b"Subject: one\r\n\r\nHello\r\n.dot\r\n";
    const BODY2: &[u8] = b"Subject: two\r\n\r\nBye\r\n";

    fn entry(id: u64, body: &[u8], return_path: Option<&str>) -> MailboxEntry {
        let mut e = MailboxEntry {
            id: EntryId(id),
            body: BodyHash::of(body),
            return_path: return_path.map(str::to_string),
            size: 0,
            received_at: 0,
            queue_id: QueueId(id),
        };
        e.size = (e.return_path_line().len() + body.len()) as u64;
        e
    }

    fn entries() -> Vec<MailboxEntry> {
        vec![entry(1, BODY1, Some("a@example.com")), entry(0x2a, BODY2, None)]
    }

    fn alice() -> Address {
        Address::parse("alice@example.org").unwrap()
    }

    fn config(plaintext: bool, tls_available: bool) -> Arc<Pop3Config> {
        Arc::new(Pop3Config { plaintext_auth_allowed: plaintext, tls_available, ..Pop3Config::default() })
    }

    fn session(plaintext: bool, tls_available: bool, tls: bool) -> Session {
        let peer = PeerInfo { addr: "192.0.2.1:40000".parse().unwrap(), tls };
        Session::new(config(plaintext, tls_available), peer)
    }

    fn text(out: &Output) -> &str {
        std::str::from_utf8(&out.reply).unwrap()
    }

    /// A session in TRANSACTION with [`entries`], logged in by USER/PASS.
    fn transaction() -> Session {
        let mut s = session(true, false, false);
        let out = s.handle(b"USER alice@example.org\r\nPASS secret\r\n");
        assert_eq!(text(&out), "+OK send PASS\r\n");
        assert_eq!(
            out.next,
            Next::Authenticate(Credentials { username: "alice@example.org".into(), password: "secret".into() })
        );
        let out = s.authenticated(AuthResult::Success(alice()));
        assert_eq!(out.next, Next::OpenMaildrop(alice()));
        assert_eq!(text(&out), "");
        let out = s.maildrop_opened(MaildropResult::Opened(entries()));
        assert_eq!(text(&out), "+OK maildrop has 2 messages (97 octets)\r\n");
        assert_eq!(out.next, Next::NeedInput);
        assert_eq!(s.user(), Some(&alice()));
        s
    }

    #[derive(Clone, Copy, Debug)]
    enum Setup {
        /// Plaintext allowed, STLS available, not TLS.
        AuthPlainOk,
        /// Plaintext not allowed, STLS available, not TLS.
        AuthNoPlain,
        /// Plaintext not allowed (but TLS makes it fine), already TLS.
        AuthTls,
        /// Plaintext allowed, USER already given.
        AuthAfterUser,
        /// TRANSACTION with two messages.
        Trans,
        /// TRANSACTION with message 1 marked as deleted.
        TransDeleted,
    }

    fn setup(which: Setup) -> Session {
        match which {
            Setup::AuthPlainOk => session(true, true, false),
            Setup::AuthNoPlain => session(false, true, false),
            Setup::AuthTls => session(false, true, true),
            Setup::AuthAfterUser => {
                let mut s = session(true, true, false);
                assert_eq!(text(&s.handle(b"USER bob@example.org\r\n")), "+OK send PASS\r\n");
                s
            }
            Setup::Trans => transaction(),
            Setup::TransDeleted => {
                let mut s = transaction();
                assert_eq!(text(&s.handle(b"DELE 1\r\n")), "+OK message 1 deleted\r\n");
                s
            }
        }
    }

    const CAPA_PLAIN_STLS: &str = "+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nUSER\r\nSASL PLAIN\r\nSTLS\r\nIMPLEMENTATION hamail\r\n.\r\n";
    const CAPA_STLS: &str = "+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nSTLS\r\nIMPLEMENTATION hamail\r\n.\r\n";
    const CAPA_TLS: &str = "+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nUSER\r\nSASL PLAIN\r\nIMPLEMENTATION hamail\r\n.\r\n";
    const CAPA_TRANS: &str = "+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nIMPLEMENTATION hamail\r\n.\r\n";
    const PLAIN_NO: &str = "-ERR [AUTH] Plaintext authentication disallowed without TLS\r\n";
    const WRONG_STATE: &str = "-ERR command not valid in this state\r\n";
    const NO_MSG: &str = "-ERR no such message\r\n";
    const SYNTAX: &str = "-ERR syntax error\r\n";
    const UNKNOWN: &str = "-ERR unknown command\r\n";

    fn creds(user: &str, pass: &str) -> Next {
        Next::Authenticate(Credentials { username: user.into(), password: pass.into() })
    }

    fn b64(s: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn every_command_in_every_state() {
        use Next::*;
        use Setup::*;
        let plain = format!("AUTH PLAIN {}\r\n", b64(b"\0alice@example.org\0pw d"));
        let plain_self = format!("AUTH plain {}\r\n", b64(b"alice@example.org\0alice@example.org\0pw"));
        let plain_other = format!("AUTH PLAIN {}\r\n", b64(b"root\0alice@example.org\0pw"));
        let plain_two = format!("AUTH PLAIN {}\r\n", b64(b"alice\0pw"));
        let plain_empty_pw = format!("AUTH PLAIN {}\r\n", b64(b"\0alice\0"));
        let retr1 = OpenBody(BodyHash::of(BODY1));
        let retr2 = OpenBody(BodyHash::of(BODY2));
        let update = |ids: &[u64]| Update { user: alice(), delete: ids.iter().map(|&i| EntryId(i)).collect() };
        let list_all = "+OK 2 messages (97 octets)\r\n1 59\r\n2 38\r\n.\r\n";
        let list_one = "+OK 1 messages (38 octets)\r\n2 38\r\n.\r\n";
        let uidl_all = "+OK\r\n1 0000000000000001\r\n2 000000000000002a\r\n.\r\n";
        let rows: Vec<(Setup, &str, &str, Next)> = vec![
            // AUTHORIZATION, plaintext allowed.
            (AuthPlainOk, "CAPA\r\n", CAPA_PLAIN_STLS, NeedInput),
            (AuthPlainOk, "capa\r\n", CAPA_PLAIN_STLS, NeedInput),
            (AuthPlainOk, "USER alice@example.org\r\n", "+OK send PASS\r\n", NeedInput),
            (AuthPlainOk, "user alice\n", "+OK send PASS\r\n", NeedInput),
            (AuthPlainOk, "USER\r\n", SYNTAX, NeedInput),
            (AuthPlainOk, "USER a b\r\n", SYNTAX, NeedInput),
            (AuthPlainOk, "PASS secret\r\n", "-ERR send USER first\r\n", NeedInput),
            (AuthPlainOk, "AUTH\r\n", "+OK\r\nPLAIN\r\n.\r\n", NeedInput),
            (AuthPlainOk, "AUTH PLAIN\r\n", "+ \r\n", NeedInput),
            (AuthPlainOk, &plain, "", creds("alice@example.org", "pw d")),
            (AuthPlainOk, &plain_self, "", creds("alice@example.org", "pw")),
            (AuthPlainOk, &plain_other, "-ERR [AUTH] Authorization identity not supported\r\n", NeedInput),
            (AuthPlainOk, &plain_two, "-ERR invalid PLAIN response\r\n", NeedInput),
            (AuthPlainOk, &plain_empty_pw, "-ERR invalid PLAIN response\r\n", NeedInput),
            (AuthPlainOk, "AUTH PLAIN =\r\n", "-ERR invalid PLAIN response\r\n", NeedInput),
            (AuthPlainOk, "AUTH PLAIN !!!\r\n", "-ERR invalid base64\r\n", NeedInput),
            (AuthPlainOk, "AUTH PLAIN *\r\n", "-ERR authentication cancelled\r\n", NeedInput),
            (AuthPlainOk, "AUTH PLAIN a b\r\n", SYNTAX, NeedInput),
            (AuthPlainOk, "AUTH CRAM-MD5\r\n", "-ERR unsupported authentication mechanism\r\n", NeedInput),
            (AuthPlainOk, "STLS\r\n", "+OK Begin TLS negotiation\r\n", StartTls),
            (AuthPlainOk, "QUIT\r\n", "+OK hamail signing off\r\n", Close),
            (AuthPlainOk, "APOP alice 0123456789abcdef\r\n", "-ERR APOP not supported\r\n", NeedInput),
            (AuthPlainOk, "NOOP\r\n", WRONG_STATE, NeedInput),
            (AuthPlainOk, "STAT\r\n", WRONG_STATE, NeedInput),
            (AuthPlainOk, "LIST\r\n", WRONG_STATE, NeedInput),
            (AuthPlainOk, "UIDL\r\n", WRONG_STATE, NeedInput),
            (AuthPlainOk, "RETR 1\r\n", WRONG_STATE, NeedInput),
            (AuthPlainOk, "TOP 1 0\r\n", WRONG_STATE, NeedInput),
            (AuthPlainOk, "DELE 1\r\n", WRONG_STATE, NeedInput),
            (AuthPlainOk, "RSET\r\n", WRONG_STATE, NeedInput),
            (AuthPlainOk, "HELO x\r\n", UNKNOWN, NeedInput),
            (AuthPlainOk, "\r\n", UNKNOWN, NeedInput),
            // AUTHORIZATION, plaintext not allowed.
            (AuthNoPlain, "CAPA\r\n", CAPA_STLS, NeedInput),
            (AuthNoPlain, "USER alice\r\n", PLAIN_NO, NeedInput),
            (AuthNoPlain, "PASS secret\r\n", PLAIN_NO, NeedInput),
            (AuthNoPlain, "AUTH\r\n", "+OK\r\n.\r\n", NeedInput),
            (AuthNoPlain, "AUTH PLAIN\r\n", PLAIN_NO, NeedInput),
            (AuthNoPlain, &plain, PLAIN_NO, NeedInput),
            (AuthNoPlain, "STLS\r\n", "+OK Begin TLS negotiation\r\n", StartTls),
            (AuthNoPlain, "QUIT\r\n", "+OK hamail signing off\r\n", Close),
            (AuthNoPlain, "NOOP\r\n", WRONG_STATE, NeedInput),
            // AUTHORIZATION over TLS.
            (AuthTls, "CAPA\r\n", CAPA_TLS, NeedInput),
            (AuthTls, "STLS\r\n", "-ERR already using TLS\r\n", NeedInput),
            (AuthTls, "USER alice\r\n", "+OK send PASS\r\n", NeedInput),
            (AuthTls, &plain, "", creds("alice@example.org", "pw d")),
            (AuthTls, "AUTH\r\n", "+OK\r\nPLAIN\r\n.\r\n", NeedInput),
            // AUTHORIZATION after USER.
            (AuthAfterUser, "PASS secret\r\n", "", creds("bob@example.org", "secret")),
            (AuthAfterUser, "pass  two  spaces \r\n", "", creds("bob@example.org", " two  spaces ")),
            (AuthAfterUser, "PASS\r\n", SYNTAX, NeedInput),
            (AuthAfterUser, "USER carol\r\nPASS x\r\n", "+OK send PASS\r\n", creds("carol", "x")),
            (AuthAfterUser, "QUIT\r\n", "+OK hamail signing off\r\n", Close),
            // TRANSACTION.
            (Trans, "STAT\r\n", "+OK 2 97\r\n", NeedInput),
            (Trans, "stat\r\n", "+OK 2 97\r\n", NeedInput),
            (Trans, "LIST\r\n", list_all, NeedInput),
            (Trans, "LIST 2\r\n", "+OK 2 38\r\n", NeedInput),
            (Trans, "LIST 3\r\n", NO_MSG, NeedInput),
            (Trans, "LIST 0\r\n", NO_MSG, NeedInput),
            (Trans, "LIST x\r\n", NO_MSG, NeedInput),
            (Trans, "LIST +1\r\n", NO_MSG, NeedInput),
            (Trans, "LIST 1 2\r\n", SYNTAX, NeedInput),
            (Trans, "UIDL\r\n", uidl_all, NeedInput),
            (Trans, "UIDL 2\r\n", "+OK 2 000000000000002a\r\n", NeedInput),
            (Trans, "UIDL 9\r\n", NO_MSG, NeedInput),
            (Trans, "RETR 1\r\n", "", retr1.clone()),
            (Trans, "RETR 2\r\n", "", retr2.clone()),
            (Trans, "RETR 3\r\n", NO_MSG, NeedInput),
            (Trans, "RETR\r\n", SYNTAX, NeedInput),
            (Trans, "TOP 1 0\r\n", "", retr1.clone()),
            // RFC 1939 7: any non-negative number of lines, even one too
            // large to count (the whole message).
            (Trans, "TOP 1 99999999999999999999\r\n", "", retr1.clone()),
            (Trans, "TOP 1\r\n", SYNTAX, NeedInput),
            (Trans, "TOP 1 x\r\n", SYNTAX, NeedInput),
            (Trans, "TOP 1 -1\r\n", SYNTAX, NeedInput),
            (Trans, "TOP 1 +1\r\n", SYNTAX, NeedInput),
            (Trans, "TOP 1 1 1\r\n", SYNTAX, NeedInput),
            (Trans, "TOP 5 1\r\n", NO_MSG, NeedInput),
            (Trans, "DELE 1\r\n", "+OK message 1 deleted\r\n", NeedInput),
            (Trans, "DELE 3\r\n", NO_MSG, NeedInput),
            (Trans, "DELE\r\n", SYNTAX, NeedInput),
            (Trans, "RSET\r\n", "+OK maildrop has 2 messages (97 octets)\r\n", NeedInput),
            (Trans, "NOOP\r\n", "+OK\r\n", NeedInput),
            (Trans, "CAPA\r\n", CAPA_TRANS, NeedInput),
            (Trans, "QUIT\r\n", "", update(&[])),
            (Trans, "USER alice\r\n", WRONG_STATE, NeedInput),
            (Trans, "PASS x\r\n", WRONG_STATE, NeedInput),
            (Trans, "AUTH PLAIN\r\n", WRONG_STATE, NeedInput),
            (Trans, "STLS\r\n", WRONG_STATE, NeedInput),
            (Trans, "APOP a b\r\n", WRONG_STATE, NeedInput),
            (Trans, "XYZZY\r\n", UNKNOWN, NeedInput),
            // TRANSACTION with message 1 marked as deleted.
            (TransDeleted, "STAT\r\n", "+OK 1 38\r\n", NeedInput),
            (TransDeleted, "LIST\r\n", list_one, NeedInput),
            (TransDeleted, "LIST 1\r\n", NO_MSG, NeedInput),
            (TransDeleted, "UIDL\r\n", "+OK\r\n2 000000000000002a\r\n.\r\n", NeedInput),
            (TransDeleted, "UIDL 1\r\n", NO_MSG, NeedInput),
            (TransDeleted, "RETR 1\r\n", NO_MSG, NeedInput),
            (TransDeleted, "TOP 1 1\r\n", NO_MSG, NeedInput),
            (TransDeleted, "DELE 1\r\n", NO_MSG, NeedInput),
            (TransDeleted, "RSET\r\nSTAT\r\n", "+OK maildrop has 2 messages (97 octets)\r\n+OK 2 97\r\n", NeedInput),
            (TransDeleted, "QUIT\r\n", "", update(&[1])),
            (TransDeleted, "DELE 2\r\nQUIT\r\n", "+OK message 2 deleted\r\n", update(&[1, 0x2a])),
        ];
        for (which, input, reply, next) in rows {
            let mut s = setup(which);
            let out = s.handle(input.as_bytes());
            assert_eq!((text(&out), &out.next), (reply, &next), "{which:?} {input:?}");
        }
    }

    #[test]
    fn sasl_continuation() {
        let mut s = session(true, false, false);
        assert_eq!(text(&s.handle(b"AUTH PLAIN\r\n")), "+ \r\n");
        let out = s.handle(format!("{}\r\n", b64(b"\0alice\0pw")).as_bytes());
        assert_eq!((text(&out), &out.next), ("", &creds("alice", "pw")));

        // "*" cancels, and the next line is a command again.
        let mut s = session(true, false, false);
        let out = s.handle(b"AUTH PLAIN\r\n*\r\nCAPA\r\n");
        assert!(text(&out).starts_with("+ \r\n-ERR authentication cancelled\r\n+OK Capability"));
        // An empty response is invalid.
        let mut s = session(true, false, false);
        assert_eq!(text(&s.handle(b"AUTH PLAIN\r\n\r\n")), "+ \r\n-ERR invalid PLAIN response\r\n");
        // The response line is not a command.
        let mut s = session(true, false, false);
        assert_eq!(text(&s.handle(b"AUTH PLAIN\r\nQUIT\r\n")), "+ \r\n-ERR invalid PLAIN response\r\n");
        let mut s = session(true, false, false);
        assert_eq!(text(&s.handle(b"AUTH PLAIN\r\nNOOP!\r\n")), "+ \r\n-ERR invalid base64\r\n");
    }

    #[test]
    fn greeting_and_timeout() {
        let mut s = session(true, false, false);
        assert_eq!(s.greeting(), b"+OK localhost hamail POP3 ready\r\n");
        assert_eq!(s.timeout(), b"-ERR autologout; idle for too long\r\n");
        assert_eq!(s.handle(b"CAPA\r\n").next, Next::Close);
    }

    #[test]
    fn auth_failure_and_temporary_failure_return_to_authorization() {
        let mut s = session(true, false, false);
        assert_eq!(s.handle(b"USER a\r\nPASS b\r\n").next, creds("a", "b"));
        // Input pipelined while the driver verifies waits for the answer.
        let out = s.handle(b"PASS c\r\n");
        assert_eq!((text(&out), &out.next), ("", &Next::NeedInput));
        let out = s.authenticated(AuthResult::Failure);
        // USER is forgotten after a failed PASS.
        assert_eq!(text(&out), "-ERR [AUTH] Invalid credentials\r\n-ERR send USER first\r\n");
        assert_eq!(s.user(), None);
        assert_eq!(s.handle(b"USER a\r\nPASS b\r\n").next, creds("a", "b"));
        let out = s.authenticated(AuthResult::TemporaryFailure("directory\r\ndown".into()));
        assert_eq!((text(&out), &out.next), ("-ERR [SYS/TEMP] directory  down\r\n", &Next::NeedInput));
        assert_eq!(text(&s.handle(b"NOOP\r\n")), WRONG_STATE);
    }

    #[test]
    fn maildrop_in_use_or_failed() {
        for (result, reply) in [
            (MaildropResult::InUse, "-ERR [IN-USE] Maildrop is locked by another session\r\n"),
            (
                MaildropResult::Failed(StoreError::Temporary("disk".into())),
                "-ERR [SYS/TEMP] Unable to open maildrop\r\n",
            ),
            (MaildropResult::Failed(StoreError::Internal("bad".into())), "-ERR [SYS/PERM] Unable to open maildrop\r\n"),
        ] {
            let mut s = session(true, false, false);
            s.handle(b"USER alice@example.org\r\nPASS x\r\n");
            assert_eq!(s.authenticated(AuthResult::Success(alice())).next, Next::OpenMaildrop(alice()));
            let out = s.maildrop_opened(result);
            assert_eq!((text(&out), &out.next), (reply, &Next::NeedInput));
            assert_eq!(s.user(), None);
            // Back in AUTHORIZATION.
            assert_eq!(text(&s.handle(b"STAT\r\n")), WRONG_STATE);
            assert_eq!(text(&s.handle(b"USER a\r\n")), "+OK send PASS\r\n");
        }
    }

    #[test]
    fn retr_and_top_replies() {
        let mut s = transaction();
        assert_eq!(s.handle(b"RETR 1\r\n").next, Next::OpenBody(BodyHash::of(BODY1)));
        let out = s.body_opened(BodyOpened::Ready);
        assert_eq!(
            (text(&out), &out.next),
            ("+OK 59 octets\r\nReturn-Path: <a@example.com>\r\n", &Next::SendBody { top: None })
        );
        let out = s.body_sent(Ok(()));
        assert_eq!((text(&out), &out.next), ("", &Next::NeedInput));
        for (command, top) in [("TOP 2 0\r\n", 0), ("TOP 2 7\r\n", 7), ("TOP 2 99999999999999999999\r\n", usize::MAX)] {
            assert_eq!(s.handle(command.as_bytes()).next, Next::OpenBody(BodyHash::of(BODY2)));
            let out = s.body_opened(BodyOpened::Ready);
            assert_eq!(
                (text(&out), &out.next),
                ("+OK top of message follows\r\nReturn-Path: <>\r\n", &Next::SendBody { top: Some(top) })
            );
            assert_eq!(s.body_sent(Ok(())).next, Next::NeedInput);
        }
        // A body that cannot be opened, or no memory to send it: -ERR,
        // and the session stays in TRANSACTION.
        for (result, reply) in [
            (BodyOpened::Failed(StoreError::Unavailable("x".into())), "-ERR [SYS/TEMP] Unable to read message\r\n"),
            (BodyOpened::Failed(StoreError::Permanent("gone".into())), "-ERR [SYS/PERM] Unable to read message\r\n"),
            (BodyOpened::Busy, "-ERR [SYS/TEMP] server busy, try again\r\n"),
        ] {
            assert_eq!(s.handle(b"RETR 2\r\n").next, Next::OpenBody(BodyHash::of(BODY2)));
            let out = s.body_opened(result);
            assert_eq!((text(&out), &out.next), (reply, &Next::NeedInput));
        }
        assert_eq!(text(&s.handle(b"NOOP\r\n")), "+OK\r\n");
        assert_eq!(s.user(), Some(&alice()));
    }

    #[test]
    fn body_broken_mid_way_ends_the_session() {
        let mut s = transaction();
        s.handle(b"RETR 1\r\nDELE 1\r\nQUIT\r\n");
        assert_eq!(s.body_opened(BodyOpened::Ready).next, Next::SendBody { top: None });
        assert_eq!(s.user(), Some(&alice()));
        let out = s.body_sent(Err(StoreError::Internal("truncated".into())));
        // Nothing more: no terminator, no answer to the pipelined commands,
        // and no UPDATE.
        assert_eq!((text(&out), &out.next), ("", &Next::Close));
        assert_eq!(s.handle(b"NOOP\r\n").next, Next::Close);
    }

    #[test]
    fn pipelined_retr_waits_for_each_body() {
        let mut s = transaction();
        let out = s.handle(b"RETR 2\r\nRETR 2\r\nNOOP\r\n");
        assert_eq!((text(&out), &out.next), ("", &Next::OpenBody(BodyHash::of(BODY2))));
        assert_eq!(s.body_opened(BodyOpened::Ready).next, Next::SendBody { top: None });
        // Input arriving meanwhile waits.
        let out = s.handle(b"STAT\r\n");
        assert_eq!((text(&out), &out.next), ("", &Next::NeedInput));
        let out = s.body_sent(Ok(()));
        assert_eq!((text(&out), &out.next), ("", &Next::OpenBody(BodyHash::of(BODY2))));
        let out = s.body_opened(BodyOpened::Busy);
        assert_eq!(
            (text(&out), &out.next),
            ("-ERR [SYS/TEMP] server busy, try again\r\n+OK\r\n+OK 2 97\r\n", &Next::NeedInput)
        );
    }

    #[test]
    fn large_pipelined_replies_are_flushed_in_bounded_pieces() {
        let mut s = session(true, false, false);
        let capa = text(&s.handle(b"CAPA\r\n")).to_string();
        let count = 3000;
        let mut out = s.handle("CAPA\r\n".repeat(count).as_bytes());
        let mut written = String::new();
        let mut flushes = 0;
        loop {
            assert!(out.reply.len() < 64 * 1024 + capa.len(), "{}", out.reply.len());
            written.push_str(text(&out));
            match out.next {
                Next::Flush => {
                    assert!(out.reply.len() >= 64 * 1024);
                    flushes += 1;
                    out = s.handle(b"");
                }
                Next::NeedInput => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(written, capa.repeat(count));
        // Each piece holds just enough CAPA answers to reach the threshold;
        // there is no flush after the last piece.
        let per_piece = (64 * 1024usize).div_ceil(capa.len());
        assert_eq!(flushes, (count - 1) / per_piece);
        // The last flush leaves nothing behind that would need another.
        let out = s.handle(b"");
        assert_eq!((text(&out), &out.next), ("", &Next::NeedInput));
    }

    #[test]
    fn quit_updates_then_closes() {
        let mut s = transaction();
        let out = s.handle(b"DELE 2\r\nQUIT\r\nNOOP\r\n");
        assert_eq!(text(&out), "+OK message 2 deleted\r\n");
        assert_eq!(out.next, Next::Update { user: alice(), delete: vec![EntryId(0x2a)] });
        assert_eq!(s.user(), Some(&alice()));
        let out = s.updated(Ok(()));
        // The NOOP pipelined after QUIT is never answered.
        assert_eq!((text(&out), &out.next), ("+OK hamail signing off (1 messages left)\r\n", &Next::Close));
        assert_eq!(s.handle(b"NOOP\r\n").next, Next::Close);

        let mut s = transaction();
        s.handle(b"DELE 1\r\nQUIT\r\n");
        let out = s.updated(Err(StoreError::Temporary("disk".into())));
        assert_eq!((text(&out), &out.next), ("-ERR [SYS/TEMP] some deleted messages not removed\r\n", &Next::Close));
    }

    #[test]
    fn resume_in_wrong_state_is_an_internal_error() {
        let internal = "-ERR [SYS/TEMP] internal error\r\n";
        type Resume = fn(&mut Session) -> Output;
        let resumes: [Resume; 6] = [
            |s| s.authenticated(AuthResult::Success(alice())),
            |s| s.maildrop_opened(MaildropResult::Opened(vec![])),
            |s| s.body_opened(BodyOpened::Ready),
            |s| s.body_sent(Ok(())),
            |s| s.updated(Ok(())),
            |s| s.tls_established(),
        ];
        for (i, resume) in resumes.iter().enumerate() {
            for mut s in [session(true, true, false), transaction()] {
                let out = resume(&mut s);
                assert_eq!((text(&out), &out.next), (internal, &Next::Close), "resume {i}");
            }
        }
        // The right resume in another waiting state is still wrong.
        let mut s = transaction();
        s.handle(b"RETR 1\r\n");
        assert_eq!(text(&s.authenticated(AuthResult::Failure)), internal);
    }

    #[test]
    fn stls_discards_pipelined_input() {
        let mut s = session(false, true, false);
        let out = s.handle(b"STLS\r\nUSER evil\r\nPASS evil\r\n");
        assert_eq!((text(&out), &out.next), ("+OK Begin TLS negotiation\r\n", &Next::StartTls));
        // Clear-text input before the handshake finishes is dropped too.
        let out = s.handle(b"PASS evil2\r\n");
        assert_eq!((text(&out), &out.next), ("", &Next::NeedInput));
        let out = s.tls_established();
        assert_eq!((text(&out), &out.next), ("", &Next::NeedInput));
        // Nothing of the above runs: PASS has no USER, STLS is now refused.
        assert_eq!(text(&s.handle(b"PASS x\r\n")), "-ERR send USER first\r\n");
        assert_eq!(text(&s.handle(b"STLS\r\n")), "-ERR already using TLS\r\n");
        assert_eq!(text(&s.handle(b"CAPA\r\n")), CAPA_TLS);
        assert_eq!(s.handle(b"USER a\r\nPASS b\r\n").next, creds("a", "b"));
    }

    #[test]
    fn stls_forgets_user() {
        let mut s = session(true, true, false);
        s.handle(b"USER a\r\n");
        assert_eq!(s.handle(b"STLS\r\n").next, Next::StartTls);
        s.tls_established();
        assert_eq!(text(&s.handle(b"PASS b\r\n")), "-ERR send USER first\r\n");
    }

    #[test]
    fn stls_unavailable() {
        let mut s = session(true, false, false);
        assert_eq!(text(&s.handle(b"STLS\r\n")), "-ERR STLS not available\r\n");
    }

    #[test]
    fn long_lines_are_refused_and_skipped() {
        let mut s = session(true, false, false);
        // Exactly max_line octets is fine.
        let ok = format!("USER {}\r\n", "a".repeat(507));
        assert_eq!(text(&s.handle(ok.as_bytes())), "+OK send PASS\r\n");
        // One more is not, complete or not.
        let long = format!("USER {}\r\nCAPA\r\n", "a".repeat(508));
        assert!(text(&s.handle(long.as_bytes())).starts_with("-ERR line too long\r\n+OK Capability"));
        // A long line arriving in pieces: one error, then the rest of it up
        // to LF is dropped.
        let mut s = session(true, false, false);
        assert_eq!(text(&s.handle("x".repeat(600).as_bytes())), "-ERR line too long\r\n");
        assert_eq!(text(&s.handle("PASS x".repeat(100).as_bytes())), "");
        assert_eq!(text(&s.handle(b"QUIT\r\nNOOP\r\n")), WRONG_STATE);
        // CRLF split after the CR of a max-length line is not too long.
        let mut s = session(true, false, false);
        let line = format!("USER {}\r", "b".repeat(507));
        assert_eq!(text(&s.handle(line.as_bytes())), "");
        assert_eq!(text(&s.handle(b"\n")), "+OK send PASS\r\n");
    }

    #[test]
    fn too_many_errors_closes() {
        let mut s = session(true, false, false);
        let mut input = Vec::new();
        for _ in 0..30 {
            input.extend_from_slice(b"BOGUS\r\n");
        }
        let out = s.handle(&input);
        let expected = format!("{}-ERR too many errors\r\n", UNKNOWN.repeat(19));
        assert_eq!((text(&out), &out.next), (expected.as_str(), &Next::Close));
        assert_eq!(s.handle(b"CAPA\r\n").next, Next::Close);
    }

    #[test]
    fn credentials_debug_hides_password() {
        let c = Credentials { username: "u".into(), password: "hunter2".into() };
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn odd_input_never_panics() {
        let inputs: [&[u8]; 8] = [
            b"\xff\xfe\r\n",
            b"RETR 99999999999999999999\r\n",
            b"TOP 1 -99999999999999999999\r\n",
            b"LIST -1\r\n",
            b"\0\0\0\n",
            b"\r\r\r\n",
            b"    \r\n",
            b"DELE \xff\r\n",
        ];
        for input in inputs {
            for setup_kind in [Setup::AuthPlainOk, Setup::Trans, Setup::TransDeleted] {
                let mut s = setup(setup_kind);
                let out = s.handle(input);
                assert!(out.reply.starts_with(b"-ERR"), "{input:?}");
            }
        }
    }
}
