//! The sans-IO SMTP client session (RFC 5321 3, 4.1).
//!
//! [`Client::feed`] takes whatever bytes arrived (any chunking: replies
//! are parsed resumably by smtp-proto's `ResponseReceiver`) and returns
//! [`Action`]s: bytes to send, "start TLS now", "ready for a transaction",
//! the per-recipient results of a transaction, or the end of the session.
//! The driver calls [`Client::start`] for each message (several per
//! connection: one session carries every message for a destination) and
//! [`Client::quit`] at the end; [`Client::connection_lost`] turns a drop
//! into deferrals of whatever was not answered yet.
//!
//! With a server that announces PIPELINING (RFC 2920), MAIL, every RCPT
//! and DATA go in one write and the replies are read in order (one per
//! recipient); otherwise one command at a time. Either way the final `250`
//! after the data is reported the moment it is parsed, before anything
//! else is sent, so the driver can record it first (RFC 1047: the window in
//! which a crash duplicates a message is between that reply and our record
//! of it).

use std::fmt;
use std::sync::Arc;

use base64::Engine;
use smtp_proto::response::parser::ResponseReceiver;

use crate::RelayError;

/// A reply of the remote server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// The enhanced status code (RFC 3463), when the server gave one.
    pub esc: Option<[u8; 3]>,
    /// The text, lines joined by `\n`.
    pub text: String,
}

impl Reply {
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }
    pub fn is_temporary(&self) -> bool {
        (400..500).contains(&self.code)
    }
    /// The enhanced status code as text, or one derived from the class.
    pub fn status(&self) -> String {
        match self.esc {
            Some([a, b, c]) => format!("{a}.{b}.{c}"),
            None if self.is_temporary() => "4.0.0".into(),
            None if self.is_positive() => "2.0.0".into(),
            None => "5.0.0".into(),
        }
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.esc {
            Some([a, b, c]) => write!(f, "{} {a}.{b}.{c} {}", self.code, self.text.replace('\n', " ")),
            None => write!(f, "{} {}", self.code, self.text.replace('\n', " ")),
        }
    }
}

/// What happened to one recipient of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RcptStatus {
    /// The server took responsibility (2xx after the final dot).
    Delivered(Reply),
    /// Try again later: a 4xx, or the connection failed before an answer.
    Deferred(String),
    /// A 5xx: bounce. The text is the remote reply (or our reason).
    Failed(String),
}

impl RcptStatus {
    /// A refusal, by the server's reply or by the driver's own error: a
    /// temporary one is tried again later, any other is final (RFC 5321
    /// 4.2.1).
    pub fn refused(temporary: bool, why: String) -> Self {
        if temporary {
            RcptStatus::Deferred(why)
        } else {
            RcptStatus::Failed(why)
        }
    }
}

/// When to use STARTTLS (RFC 3207).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TlsPolicy {
    /// Never (closed networks, tests).
    Never,
    /// When offered; plaintext otherwise (RFC 3207's common practice).
    #[default]
    Opportunistic,
    /// Refuse to send without TLS (the session fails, mail is deferred).
    Require,
}

/// How a session is opened.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Our name in EHLO/HELO.
    pub helo_name: String,
    pub tls: TlsPolicy,
    /// Credentials for AUTH (a smarthost), used only after TLS unless the
    /// policy is `Never` (a closed network chose so).
    pub auth: Option<(String, String)>,
    /// The connection is already TLS (implicit TLS, port 465).
    pub tls_active: bool,
}

/// One message for this session's destination.
#[derive(Clone, Debug)]
pub struct Envelope {
    /// `None` is the null reverse-path `<>` (bounces).
    pub from: Option<String>,
    pub recipients: Vec<String>,
    /// The message, CRLF line ends, not dot-stuffed.
    pub body: Arc<Vec<u8>>,
}

/// What the driver must do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Write these bytes.
    Send(Vec<u8>),
    /// Do the TLS handshake on the connection now, then call
    /// [`Client::tls_started`]. Nothing was sent after the `220`.
    StartTls,
    /// The session is ready for [`Client::start`] or [`Client::quit`].
    Ready,
    /// A transaction ended: one status per recipient of its envelope, in
    /// order. The session is ready again (unless a `Closed` follows).
    Finished(Vec<RcptStatus>),
    /// The session ended. `Some` when it failed before or outside a
    /// transaction (greeting, EHLO, TLS, AUTH): every message still to
    /// send to this destination should be deferred (or, for a permanent
    /// error, bounced).
    Closed(Option<RelayError>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthStep {
    Plain,
    LoginUser,
    LoginPass,
    LoginDone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting,
    Ehlo,
    Helo,
    StartTls,
    TlsHandshake,
    Auth(AuthStep),
    Idle,
    Mail,
    Rcpt(usize),
    Data,
    Dot,
    Rset,
    Quit,
    Done,
}

/// Extensions the server announced in its EHLO reply.
#[derive(Debug, Default, Clone)]
struct Capabilities {
    starttls: bool,
    size: Option<u64>,
    pipelining: bool,
    auth_plain: bool,
    auth_login: bool,
}

impl Capabilities {
    fn parse(text: &str) -> Self {
        let mut caps = Capabilities::default();
        // The first line is the server's name and greeting.
        for line in text.split('\n').skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else { continue };
            match keyword.to_ascii_uppercase().as_str() {
                "STARTTLS" => caps.starttls = true,
                "PIPELINING" => caps.pipelining = true,
                "SIZE" => caps.size = words.next().and_then(|n| n.parse().ok()).filter(|n| *n > 0),
                "AUTH" => {
                    for m in words {
                        match m.to_ascii_uppercase().as_str() {
                            "PLAIN" => caps.auth_plain = true,
                            "LOGIN" => caps.auth_login = true,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        caps
    }
}

/// One SMTP client session. See the module documentation.
pub struct Client {
    options: ClientOptions,
    state: State,
    receiver: ResponseReceiver,
    caps: Capabilities,
    tls_active: bool,
    /// The transaction in progress.
    envelope: Option<Envelope>,
    /// A recipient's slot is written once: by its RCPT reply, by a
    /// refused MAIL (then the pipelined RCPT replies change nothing), or
    /// after the data.
    statuses: Vec<Option<RcptStatus>>,
}

impl Client {
    /// A session that waits for the server's greeting.
    pub fn new(options: ClientOptions) -> Self {
        let tls_active = options.tls_active;
        Client {
            options,
            state: State::Greeting,
            receiver: ResponseReceiver::default(),
            caps: Capabilities::default(),
            tls_active,
            envelope: None,
            statuses: Vec::new(),
        }
    }

    /// Whether the session runs over TLS now.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// Bytes received from the server.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Vec<Action> {
        let mut actions = Vec::new();
        while !bytes.is_empty() {
            if matches!(self.state, State::Done) {
                break;
            }
            if matches!(self.state, State::Idle | State::TlsHandshake) {
                // Nothing asked: a reply now is the server's fault (or, after
                // the STARTTLS 220, an injection attempt: RFC 3207 6).
                self.fail(&mut actions, RelayError::PeerMisbehaved("unsolicited data from the server".into()));
                break;
            }
            let mut iter = bytes.iter();
            let parsed = self.receiver.parse(&mut iter);
            bytes = iter.as_slice();
            match parsed {
                Ok(r) => {
                    self.receiver.reset();
                    let esc = (r.esc != [0, 0, 0]).then_some(r.esc);
                    let reply = Reply { code: r.code, esc, text: r.message };
                    self.on_reply(reply, &mut actions);
                    if self.state == State::TlsHandshake && !bytes.is_empty() {
                        self.fail(&mut actions, RelayError::PeerMisbehaved("data after the STARTTLS 220".into()));
                        break;
                    }
                }
                Err(smtp_proto::Error::NeedsMoreData { .. }) => break,
                Err(e) => {
                    self.fail(&mut actions, RelayError::PeerMisbehaved(format!("unparsable reply: {e:?}")));
                    break;
                }
            }
        }
        actions
    }

    /// The TLS handshake after `Action::StartTls` succeeded.
    pub fn tls_started(&mut self) -> Vec<Action> {
        if self.state != State::TlsHandshake {
            return Vec::new();
        }
        self.tls_active = true;
        // RFC 3207 4.2: forget everything learnt before TLS.
        self.caps = Capabilities::default();
        self.state = State::Ehlo;
        vec![self.send_line(format!("EHLO {}", self.options.helo_name))]
    }

    /// Starts a transaction (after `Ready` or `Finished`).
    pub fn start(&mut self, envelope: Envelope) -> Vec<Action> {
        if self.state != State::Idle {
            return vec![Action::Finished(
                envelope.recipients.iter().map(|_| RcptStatus::Deferred("session not ready".into())).collect(),
            )];
        }
        if envelope.recipients.is_empty() {
            return vec![Action::Finished(Vec::new())];
        }
        if let Some(max) = self.caps.size {
            if envelope.body.len() as u64 > max {
                // RFC 1870 6: no point sending what the server will refuse.
                let why = format!("552 5.3.4 message size {} exceeds the remote limit {max}", envelope.body.len());
                return vec![Action::Finished(
                    envelope.recipients.iter().map(|_| RcptStatus::Failed(why.clone())).collect(),
                )];
            }
        }
        let mut line = format!("MAIL FROM:<{}>", envelope.from.as_deref().unwrap_or(""));
        if self.caps.size.is_some() {
            line.push_str(&format!(" SIZE={}", envelope.body.len()));
        }
        self.statuses = vec![None; envelope.recipients.len()];
        let batch = if self.pipelined() {
            // RFC 2920 3.1: MAIL, every RCPT and DATA in one group.
            let mut b = format!("{line}\r\n");
            for r in &envelope.recipients {
                b.push_str(&format!("RCPT TO:<{r}>\r\n"));
            }
            b.push_str("DATA\r\n");
            Action::Send(b.into_bytes())
        } else {
            self.send_line(line)
        };
        self.envelope = Some(envelope);
        self.state = State::Mail;
        vec![batch]
    }

    /// Ends the session politely.
    pub fn quit(&mut self) -> Vec<Action> {
        match self.state {
            State::Done | State::Quit => Vec::new(),
            State::Idle => {
                self.state = State::Quit;
                vec![self.send_line("QUIT".into())]
            }
            _ => {
                let mut actions = Vec::new();
                self.finish_deferred(&mut actions, "session ended by us");
                self.state = State::Done;
                actions.push(Action::Closed(None));
                actions
            }
        }
    }

    /// The connection broke (read error, EOF, timeout): recipients not yet
    /// answered are deferred. A drop while waiting for the reply to the
    /// final dot defers them too — the remote server may have taken the
    /// message (RFC 1047), and a duplicate is better than a loss.
    pub fn connection_lost(&mut self, why: &str) -> Vec<Action> {
        let mut actions = Vec::new();
        match self.state {
            State::Done => return actions,
            State::Quit => {
                self.state = State::Done;
                actions.push(Action::Closed(None));
                return actions;
            }
            _ => {}
        }
        let had_transaction = self.envelope.is_some();
        self.finish_deferred(&mut actions, why);
        let error = (!had_transaction && self.state != State::Idle).then(|| RelayError::Temporary(why.to_string()));
        self.state = State::Done;
        actions.push(Action::Closed(error));
        actions
    }

    fn send_line(&self, mut line: String) -> Action {
        line.push_str("\r\n");
        Action::Send(line.into_bytes())
    }

    /// Ends a failed session: a transaction in progress is deferred.
    fn fail(&mut self, actions: &mut Vec<Action>, error: RelayError) {
        let in_transaction = self.envelope.is_some();
        self.finish_deferred(actions, &error.to_string());
        self.state = State::Done;
        actions.push(Action::Closed(if in_transaction { None } else { Some(error) }));
    }

    /// Finishes the transaction in progress (if any): undecided recipients
    /// and accepted-but-not-delivered ones are deferred with `why`.
    fn finish_deferred(&mut self, actions: &mut Vec<Action>, why: &str) {
        if self.envelope.take().is_none() {
            return;
        }
        let statuses = std::mem::take(&mut self.statuses)
            .into_iter()
            .map(|s| match s {
                Some(RcptStatus::Failed(t)) => RcptStatus::Failed(t),
                Some(RcptStatus::Deferred(t)) => RcptStatus::Deferred(t),
                _ => RcptStatus::Deferred(why.to_string()),
            })
            .collect();
        actions.push(Action::Finished(statuses));
    }

    /// Ends the transaction with these statuses, the session stays usable.
    fn finish(&mut self, actions: &mut Vec<Action>) {
        self.envelope = None;
        let statuses = std::mem::take(&mut self.statuses)
            .into_iter()
            .map(|s| s.unwrap_or_else(|| RcptStatus::Deferred("no reply".into())))
            .collect();
        actions.push(Action::Finished(statuses));
    }

    fn after_hello(&mut self, actions: &mut Vec<Action>) {
        let offer_tls = self.caps.starttls && !self.tls_active && self.options.tls != TlsPolicy::Never;
        if offer_tls {
            self.state = State::StartTls;
            actions.push(self.send_line("STARTTLS".into()));
            return;
        }
        if self.options.tls == TlsPolicy::Require && !self.tls_active {
            self.fail(
                actions,
                RelayError::Temporary(
                    "TLS is required for this destination but the server does not offer STARTTLS".into(),
                ),
            );
            return;
        }
        self.start_auth(actions);
    }

    fn start_auth(&mut self, actions: &mut Vec<Action>) {
        let Some((user, pass)) = self.options.auth.clone() else {
            self.state = State::Idle;
            actions.push(Action::Ready);
            return;
        };
        if !self.tls_active && self.options.tls != TlsPolicy::Never {
            // Never send a password in the clear unless told so.
            self.fail(
                actions,
                RelayError::Temporary("refusing AUTH without TLS (set tls = \"never\" to allow it)".into()),
            );
            return;
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        if self.caps.auth_plain {
            self.state = State::Auth(AuthStep::Plain);
            let token = b64.encode(format!("\0{user}\0{pass}"));
            actions.push(self.send_line(format!("AUTH PLAIN {token}")));
        } else if self.caps.auth_login {
            self.state = State::Auth(AuthStep::LoginUser);
            actions.push(self.send_line("AUTH LOGIN".into()));
        } else {
            self.fail(actions, RelayError::Temporary("the relay host offers neither AUTH PLAIN nor AUTH LOGIN".into()));
        }
    }

    fn on_reply(&mut self, reply: Reply, actions: &mut Vec<Action>) {
        let b64 = base64::engine::general_purpose::STANDARD;
        // 421 in any state: the server is closing the channel (RFC 5321 3.8).
        if reply.code == 421 && !matches!(self.state, State::Quit) {
            self.fail_with_reply(actions, &reply);
            return;
        }
        match self.state {
            State::Greeting => {
                if reply.is_positive() {
                    self.state = State::Ehlo;
                    actions.push(self.send_line(format!("EHLO {}", self.options.helo_name)));
                } else {
                    self.fail_with_reply(actions, &reply);
                }
            }
            State::Ehlo => {
                if reply.is_positive() {
                    self.caps = Capabilities::parse(&reply.text);
                    self.after_hello(actions);
                } else if reply.code >= 500 && !self.tls_active {
                    // RFC 5321 3.2: a server that does not know EHLO.
                    self.state = State::Helo;
                    actions.push(self.send_line(format!("HELO {}", self.options.helo_name)));
                } else {
                    self.fail_with_reply(actions, &reply);
                }
            }
            State::Helo => {
                if reply.is_positive() {
                    self.caps = Capabilities::default();
                    self.after_hello(actions);
                } else {
                    self.fail_with_reply(actions, &reply);
                }
            }
            State::StartTls => {
                if reply.code == 220 {
                    self.state = State::TlsHandshake;
                    actions.push(Action::StartTls);
                } else if self.options.tls == TlsPolicy::Require {
                    self.fail_with_reply(actions, &reply);
                } else {
                    self.start_auth(actions);
                }
            }
            State::Auth(step) => match (step, reply.code) {
                (AuthStep::LoginUser, 334) => {
                    let user = self.options.auth.as_ref().map(|a| a.0.clone()).unwrap_or_default();
                    self.state = State::Auth(AuthStep::LoginPass);
                    actions.push(self.send_line(b64.encode(user)));
                }
                (AuthStep::LoginPass, 334) => {
                    let pass = self.options.auth.as_ref().map(|a| a.1.clone()).unwrap_or_default();
                    self.state = State::Auth(AuthStep::LoginDone);
                    actions.push(self.send_line(b64.encode(pass)));
                }
                (AuthStep::Plain | AuthStep::LoginDone, 235) => {
                    self.state = State::Idle;
                    actions.push(Action::Ready);
                }
                _ => {
                    // A refused login is our configuration's fault, never
                    // the message's: defer, do not bounce.
                    self.fail(actions, RelayError::Temporary(format!("authentication refused: {reply}")));
                }
            },
            State::Mail => {
                if reply.is_positive() {
                    self.state = State::Rcpt(0);
                    if !self.pipelined() {
                        actions.push(self.rcpt_line(0));
                    }
                } else {
                    self.statuses = self.statuses.iter().map(|_| Some(refusal(&reply))).collect();
                    if self.pipelined() {
                        // The RCPT and DATA replies are still coming.
                        self.state = State::Rcpt(0);
                    } else {
                        self.state = State::Rset;
                        actions.push(self.send_line("RSET".into()));
                    }
                }
            }
            State::Rcpt(i) if self.pipelined() => {
                // A slot already decided is a refused MAIL's.
                if let Some(slot @ None) = self.statuses.get_mut(i) {
                    *slot = rcpt_status(&reply);
                }
                self.state = if i + 1 < self.statuses.len() { State::Rcpt(i + 1) } else { State::Data };
            }
            State::Rcpt(i) => {
                if let Some(slot) = self.statuses.get_mut(i) {
                    *slot = rcpt_status(&reply);
                }
                let n = self.statuses.len();
                if i + 1 < n {
                    self.state = State::Rcpt(i + 1);
                    actions.push(self.rcpt_line(i + 1));
                } else if self.statuses.iter().any(|s| s.is_none()) {
                    self.state = State::Data;
                    actions.push(self.send_line("DATA".into()));
                } else {
                    self.state = State::Rset;
                    actions.push(self.send_line("RSET".into()));
                }
            }
            State::Data => {
                if reply.code == 354 {
                    self.state = State::Dot;
                    if self.statuses.iter().any(|s| s.is_none()) {
                        let body = self.envelope.as_ref().map(|e| e.body.clone()).unwrap_or_default();
                        actions.push(Action::Send(dot_stuff(&body)));
                    } else {
                        // Pipelined, and no recipient was accepted: RFC
                        // 2920 3.1 says end the data at once.
                        actions.push(Action::Send(b".\r\n".to_vec()));
                    }
                } else {
                    self.decide_accepted(&reply);
                    self.state = State::Rset;
                    actions.push(self.send_line("RSET".into()));
                }
            }
            State::Dot => {
                self.decide_accepted(&reply);
                self.state = State::Idle;
                self.finish(actions);
            }
            State::Rset => {
                // Whatever RSET answers, the transaction is over.
                self.state = State::Idle;
                self.finish(actions);
            }
            State::Quit => {
                self.state = State::Done;
                actions.push(Action::Closed(None));
            }
            State::Idle | State::TlsHandshake | State::Done => {}
        }
    }

    /// The recipients accepted at RCPT get the fate of this reply.
    fn decide_accepted(&mut self, reply: &Reply) {
        for s in self.statuses.iter_mut().filter(|s| s.is_none()) {
            *s = Some(if reply.is_positive() { RcptStatus::Delivered(reply.clone()) } else { refusal(reply) });
        }
    }

    fn fail_with_reply(&mut self, actions: &mut Vec<Action>, reply: &Reply) {
        let error = if reply.is_temporary() || reply.is_positive() {
            RelayError::Temporary(reply.to_string())
        } else {
            RelayError::Permanent(reply.to_string())
        };
        if self.envelope.is_some() {
            // Inside a transaction every undecided recipient gets this reply.
            for s in self.statuses.iter_mut().filter(|s| s.is_none()) {
                *s = Some(refusal(reply));
            }
            self.finish(actions);
            self.state = State::Done;
            actions.push(Action::Closed(None));
        } else {
            self.state = State::Done;
            actions.push(Action::Closed(Some(error)));
        }
    }

    /// This transaction's MAIL, RCPTs and DATA go in one write (RFC 2920)
    /// and the replies are only read, in order. The capabilities are only
    /// learnt before the first transaction, so this holds for a whole one.
    fn pipelined(&self) -> bool {
        self.caps.pipelining
    }

    fn rcpt_line(&self, i: usize) -> Action {
        let rcpt = self.envelope.as_ref().and_then(|e| e.recipients.get(i)).cloned().unwrap_or_default();
        self.send_line(format!("RCPT TO:<{rcpt}>"))
    }
}

/// `None` (accepted, fate decided after DATA) or the refusal.
fn rcpt_status(reply: &Reply) -> Option<RcptStatus> {
    (!reply.is_positive()).then(|| refusal(reply))
}

/// A recipient refused by `reply` (4xx or 5xx).
fn refusal(reply: &Reply) -> RcptStatus {
    RcptStatus::refused(reply.is_temporary(), reply.to_string())
}

/// The DATA payload: lines starting with `.` get another (RFC 5321
/// 4.5.2), a missing final CRLF is added, then the `.` line.
pub fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 64 + 5);
    let mut at_line_start = true;
    for &b in body {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    if !body.is_empty() && !body.ends_with(b"\r\n") {
        if body.ends_with(b"\r") {
            out.push(b'\n');
        } else {
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b".\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> ClientOptions {
        ClientOptions { helo_name: "mx.test".into(), tls: TlsPolicy::Opportunistic, auth: None, tls_active: false }
    }

    fn envelope(rcpts: &[&str]) -> Envelope {
        Envelope {
            from: Some("a@here.test".into()),
            recipients: rcpts.iter().map(|s| s.to_string()).collect(),
            body: Arc::new(b"Subject: x\r\n\r\n.dot\r\nbody\r\n".to_vec()),
        }
    }

    /// Runs a whole session against a scripted server, feeding each reply
    /// in chunks of `chunk` bytes. Returns what was sent and the results.
    fn run(script: &[(&str, &str)], chunk: usize, opts: ClientOptions, env: Envelope) -> (String, Vec<Action>) {
        let mut client = Client::new(opts);
        let mut sent = String::new();
        let mut events = Vec::new();
        let mut pending_env = Some(env);
        for (expect, reply) in script {
            assert!(sent.ends_with(expect), "expected the client to have sent {expect:?}, sent so far:\n{sent}");
            let mut actions = Vec::new();
            for piece in reply.as_bytes().chunks(chunk) {
                actions.extend(client.feed(piece));
            }
            let mut queue: std::collections::VecDeque<Action> = actions.into();
            while let Some(a) = queue.pop_front() {
                match a {
                    Action::Send(b) => sent.push_str(&String::from_utf8_lossy(&b)),
                    Action::Ready => match pending_env.take() {
                        Some(e) => queue.extend(client.start(e)),
                        None => queue.extend(client.quit()),
                    },
                    Action::Finished(s) => {
                        events.push(Action::Finished(s));
                        queue.extend(client.quit());
                    }
                    Action::StartTls => queue.extend(client.tls_started()),
                    other => events.push(other),
                }
            }
        }
        (sent, events)
    }

    const GOOD: &[(&str, &str)] = &[
        ("", "220 sink.test ESMTP\r\n"),
        ("EHLO mx.test\r\n", "250-sink.test\r\n250-SIZE 1000000\r\n250 8BITMIME\r\n"),
        ("MAIL FROM:<a@here.test> SIZE=26\r\n", "250 2.1.0 ok\r\n"),
        ("RCPT TO:<b@there.test>\r\n", "250 2.1.5 ok\r\n"),
        ("RCPT TO:<c@there.test>\r\n", "550 5.1.1 no such user\r\n"),
        ("RCPT TO:<d@there.test>\r\n", "451 4.3.0 try later\r\n"),
        ("DATA\r\n", "354 go ahead\r\n"),
        ("Subject: x\r\n\r\n..dot\r\nbody\r\n.\r\n", "250 2.0.0 queued as X\r\n"),
        ("QUIT\r\n", "221 2.0.0 bye\r\n"),
    ];

    #[test]
    fn per_recipient_results_in_every_chunking() {
        for chunk in 1..=64 {
            let (_, events) = run(GOOD, chunk, options(), envelope(&["b@there.test", "c@there.test", "d@there.test"]));
            assert_eq!(events.len(), 2, "chunk {chunk}: {events:?}");
            let Action::Finished(s) = &events[0] else { panic!("{events:?}") };
            assert!(matches!(&s[0], RcptStatus::Delivered(r) if r.code == 250 && r.esc == Some([2, 0, 0])), "{s:?}");
            assert_eq!(s[1], RcptStatus::Failed("550 5.1.1 no such user".into()));
            assert_eq!(s[2], RcptStatus::Deferred("451 4.3.0 try later".into()));
            assert_eq!(events[1], Action::Closed(None));
        }
    }

    #[test]
    fn pipelined_transaction_in_every_chunking() {
        let script: &[(&str, &str)] = &[
            ("", "220 sink.test ESMTP\r\n"),
            ("EHLO mx.test\r\n", "250-sink.test\r\n250-PIPELINING\r\n250 SIZE 1000000\r\n"),
            (
                "MAIL FROM:<a@here.test> SIZE=26\r\nRCPT TO:<b@there.test>\r\nRCPT TO:<c@there.test>\r\nDATA\r\n",
                "250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 unknown\r\n354 go\r\n",
            ),
            ("Subject: x\r\n\r\n..dot\r\nbody\r\n.\r\n", "250 2.0.0 queued\r\n"),
            ("QUIT\r\n", "221 bye\r\n"),
        ];
        for chunk in 1..=40 {
            let (_, events) = run(script, chunk, options(), envelope(&["b@there.test", "c@there.test"]));
            let Action::Finished(s) = &events[0] else { panic!("{events:?}") };
            assert!(matches!(&s[0], RcptStatus::Delivered(_)), "chunk {chunk}: {s:?}");
            assert_eq!(s[1], RcptStatus::Failed("550 5.1.1 unknown".into()));
        }
    }

    #[test]
    fn pipelined_refusals_end_the_transaction_cleanly() {
        // Every RCPT refused but DATA accepted: an empty data phase.
        let script: &[(&str, &str)] = &[
            ("", "220 x\r\n"),
            ("EHLO mx.test\r\n", "250-x\r\n250 PIPELINING\r\n"),
            ("DATA\r\n", "250 ok\r\n450 4.2.1 busy\r\n354 go\r\n"),
            ("\r\n.\r\n", "554 5.5.1 no valid recipients\r\n"),
            ("QUIT\r\n", "221 bye\r\n"),
        ];
        for chunk in 1..=40 {
            let (sent, events) = run(script, chunk, options(), envelope(&["b@there.test"]));
            assert!(sent.contains("DATA\r\n.\r\n"), "chunk {chunk}: {sent}");
            assert_eq!(
                events[0],
                Action::Finished(vec![RcptStatus::Deferred("450 4.2.1 busy".into())]),
                "chunk {chunk}"
            );
        }
        // MAIL refused: the RCPT replies change nothing, DATA refused, RSET.
        let script: &[(&str, &str)] = &[
            ("", "220 x\r\n"),
            ("EHLO mx.test\r\n", "250-x\r\n250 PIPELINING\r\n"),
            ("DATA\r\n", "553 5.1.8 bad sender\r\n503 5.5.1 no MAIL\r\n503 5.5.1 no valid recipients\r\n"),
            ("RSET\r\n", "250 ok\r\n"),
            ("QUIT\r\n", "221 bye\r\n"),
        ];
        for chunk in 1..=40 {
            let (_, events) = run(script, chunk, options(), envelope(&["b@there.test"]));
            assert_eq!(
                events[0],
                Action::Finished(vec![RcptStatus::Failed("553 5.1.8 bad sender".into())]),
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn helo_fallback_and_all_rejected_means_rset() {
        let script: &[(&str, &str)] = &[
            ("", "220 old.test\r\n"),
            ("EHLO mx.test\r\n", "502 what?\r\n"),
            ("HELO mx.test\r\n", "250 old.test\r\n"),
            ("MAIL FROM:<a@here.test>\r\n", "250 ok\r\n"),
            ("RCPT TO:<b@there.test>\r\n", "550 no\r\n"),
            ("RSET\r\n", "250 ok\r\n"),
            ("QUIT\r\n", "221 bye\r\n"),
        ];
        let (_, events) = run(script, 3, options(), envelope(&["b@there.test"]));
        assert_eq!(events[0], Action::Finished(vec![RcptStatus::Failed("550 no".into())]));
    }

    #[test]
    fn drop_while_waiting_for_the_dot_reply_defers() {
        let mut c = Client::new(options());
        c.feed(b"220 x\r\n");
        let a = c.feed(b"250 x\r\n");
        assert_eq!(a, vec![Action::Ready]);
        c.start(envelope(&["b@there.test"]));
        c.feed(b"250 ok\r\n");
        c.feed(b"250 ok\r\n");
        let a = c.feed(b"354 go\r\n");
        assert!(matches!(&a[0], Action::Send(b) if b.ends_with(b"\r\n.\r\n")));
        let a = c.connection_lost("connection reset");
        assert_eq!(
            a,
            vec![Action::Finished(vec![RcptStatus::Deferred("connection reset".into())]), Action::Closed(None)]
        );
    }

    #[test]
    fn pipelined_drop_between_replies_defers_only_the_undecided() {
        let mut c = Client::new(options());
        c.feed(b"220 x\r\n");
        assert_eq!(c.feed(b"250-x\r\n250 PIPELINING\r\n"), vec![Action::Ready]);
        let a = c.start(envelope(&["b@there.test", "c@there.test"]));
        let batch = b"MAIL FROM:<a@here.test>\r\nRCPT TO:<b@there.test>\r\nRCPT TO:<c@there.test>\r\nDATA\r\n";
        assert_eq!(a, vec![Action::Send(batch.to_vec())]);
        // The DATA reply never comes: b (accepted) is deferred, c keeps its refusal.
        assert_eq!(c.feed(b"250 ok\r\n250 ok\r\n550 5.1.1 unknown\r\n"), vec![]);
        let a = c.connection_lost("connection reset");
        let statuses =
            vec![RcptStatus::Deferred("connection reset".into()), RcptStatus::Failed("550 5.1.1 unknown".into())];
        assert_eq!(a, vec![Action::Finished(statuses), Action::Closed(None)]);
    }

    #[test]
    fn pipelining_offered_only_before_starttls_is_not_used() {
        // RFC 3207 4.2: what the server said before TLS is forgotten.
        let script: &[(&str, &str)] = &[
            ("", "220 relay.test\r\n"),
            ("EHLO mx.test\r\n", "250-relay.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n"),
            ("STARTTLS\r\n", "220 go\r\n"),
            ("EHLO mx.test\r\n", "250 relay.test\r\n"),
            ("MAIL FROM:<a@here.test>\r\n", "250 ok\r\n"),
        ];
        let (sent, _) = run(script, 3, options(), envelope(&["b@there.test"]));
        assert!(sent.ends_with("EHLO mx.test\r\nMAIL FROM:<a@here.test>\r\nRCPT TO:<b@there.test>\r\n"), "{sent}");
    }

    #[test]
    fn starttls_then_auth_plain() {
        let opts = ClientOptions { auth: Some(("u".into(), "p".into())), ..options() };
        let script: &[(&str, &str)] = &[
            ("", "220 relay.test\r\n"),
            ("EHLO mx.test\r\n", "250-relay.test\r\n250 STARTTLS\r\n"),
            ("STARTTLS\r\n", "220 go\r\n"),
            ("EHLO mx.test\r\n", "250-relay.test\r\n250 AUTH LOGIN PLAIN\r\n"),
            ("AUTH PLAIN AHUAcA==\r\n", "235 ok\r\n"),
            ("MAIL FROM:<a@here.test>\r\n", "250 ok\r\n"),
        ];
        let (sent, _) = run(script, 5, opts, envelope(&["b@there.test"]));
        assert!(sent.ends_with("RCPT TO:<b@there.test>\r\n"), "{sent}");
    }

    #[test]
    fn auth_login_and_no_password_in_clear() {
        let opts = ClientOptions { auth: Some(("u".into(), "p".into())), ..options() };
        let mut c = Client::new(opts.clone());
        c.feed(b"220 x\r\n");
        let a = c.feed(b"250-x\r\n250 AUTH LOGIN\r\n");
        assert!(
            matches!(&a[..], [Action::Closed(Some(RelayError::Temporary(m)))] if m.contains("without TLS")),
            "{a:?}"
        );

        let mut c = Client::new(ClientOptions { tls: TlsPolicy::Never, ..opts });
        c.feed(b"220 x\r\n");
        assert_eq!(c.feed(b"250-x\r\n250 AUTH LOGIN\r\n"), vec![Action::Send(b"AUTH LOGIN\r\n".to_vec())]);
        assert_eq!(c.feed(b"334 VXNlcm5hbWU6\r\n"), vec![Action::Send(b"dQ==\r\n".to_vec())]);
        assert_eq!(c.feed(b"334 UGFzc3dvcmQ6\r\n"), vec![Action::Send(b"cA==\r\n".to_vec())]);
        assert_eq!(c.feed(b"235 ok\r\n"), vec![Action::Ready]);
    }

    #[test]
    fn required_tls_not_offered_fails_the_session() {
        let mut c = Client::new(ClientOptions { tls: TlsPolicy::Require, ..options() });
        c.feed(b"220 x\r\n");
        let a = c.feed(b"250 x\r\n");
        assert!(matches!(&a[..], [Action::Closed(Some(RelayError::Temporary(_)))]), "{a:?}");
    }

    #[test]
    fn data_injected_after_starttls_220_is_refused() {
        let mut c = Client::new(options());
        c.feed(b"220 x\r\n");
        c.feed(b"250-x\r\n250 STARTTLS\r\n");
        let a = c.feed(b"220 go\r\n250 injected\r\n");
        assert!(matches!(a.last(), Some(Action::Closed(Some(RelayError::PeerMisbehaved(_))))), "{a:?}");
    }

    #[test]
    fn greeting_and_service_closing() {
        let mut c = Client::new(options());
        let a = c.feed(b"554 go away\r\n");
        assert!(matches!(&a[..], [Action::Closed(Some(RelayError::Permanent(_)))]));
        let mut c = Client::new(options());
        c.feed(b"220 x\r\n");
        c.feed(b"250 x\r\n");
        c.start(envelope(&["b@there.test", "c@there.test"]));
        c.feed(b"250 ok\r\n");
        let a = c.feed(b"421 4.3.2 shutting down\r\n");
        assert_eq!(
            a,
            vec![
                Action::Finished(vec![
                    RcptStatus::Deferred("421 4.3.2 shutting down".into()),
                    RcptStatus::Deferred("421 4.3.2 shutting down".into())
                ]),
                Action::Closed(None)
            ]
        );
    }

    #[test]
    fn size_limit_refuses_locally_and_garbage_is_misbehaviour() {
        let mut c = Client::new(options());
        c.feed(b"220 x\r\n");
        c.feed(b"250-x\r\n250 SIZE 10\r\n");
        let a = c.start(envelope(&["b@there.test"]));
        assert!(
            matches!(&a[..], [Action::Finished(s)] if matches!(&s[0], RcptStatus::Failed(m) if m.starts_with("552")))
        );
        let mut c = Client::new(options());
        let a = c.feed(b"hello\r\n");
        assert!(matches!(&a[..], [Action::Closed(Some(RelayError::PeerMisbehaved(_)))]), "{a:?}");
    }

    #[test]
    fn dot_stuffing() {
        assert_eq!(dot_stuff(b".a\r\nb\r\n..c\r\n"), b"..a\r\nb\r\n...c\r\n.\r\n");
        assert_eq!(dot_stuff(b"no newline"), b"no newline\r\n.\r\n");
        assert_eq!(dot_stuff(b""), b".\r\n");
    }
}
