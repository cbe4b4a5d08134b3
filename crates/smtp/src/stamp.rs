//! Trace and missing headers added to a message while it streams in:
//! `Received:` (RFC 5321 4.4) as its first bytes, and for authenticated
//! submissions `Message-ID:` and `Date:` when missing (RFC 6409 8.2 and
//! 8.3: a submission server may add them) at the end of the client's header
//! section. `Return-Path:` is not added here: the store adds it on delivery
//! (RFC 5321 4.4, "final delivery").

use hamail_store::QueueId;

use crate::Transaction;

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day)
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// An RFC 5322 3.3 date-time in UTC, e.g. `Thu, 01 Jan 1970 00:00:00 +0000`.
pub fn rfc5322_date(unix_secs: i64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let month = MONTHS[(m as usize).saturating_sub(1) % 12];
    format!("{weekday}, {d:02} {month} {y:04} {:02}:{:02}:{:02} +0000", secs / 3600, (secs % 3600) / 60, secs % 60)
}

/// Whether the header block has a field named `name` (case-insensitive, at
/// the start of a line, so folded continuation lines never match).
pub fn has_field(headers: &[u8], name: &str) -> bool {
    headers.split(|&b| b == b'\n').any(|line| field_body(line, name).is_some())
}

/// When header line `line` is a field named `name` (case-insensitive,
/// white space allowed before the colon as in RFC 5322 4.5.3's obsolete
/// syntax), what follows its colon.
fn field_body<'a>(line: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let rest =
        line.get(..name.len()).filter(|n| n.eq_ignore_ascii_case(name.as_bytes())).and(line.get(name.len()..))?;
    let colon = rest.iter().position(|&b| b != b' ' && b != b'\t')?;
    (rest[colon] == b':').then(|| &rest[colon + 1..])
}

/// The unfolded value (RFC 5322 2.2.3) of the first field named `name`,
/// trimmed; `None` when absent or empty.
fn field_value(headers: &[u8], name: &str) -> Option<String> {
    let mut lines = headers.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let mut value = lines.find_map(|line| field_body(line, name))?.to_vec();
    for cont in lines.take_while(|l| l.first().is_some_and(|b| *b == b' ' || *b == b'\t')) {
        value.extend_from_slice(cont);
    }
    let value = String::from_utf8_lossy(&value).trim().to_string();
    (!value.is_empty()).then_some(value)
}

impl Transaction {
    /// The `Message-ID:` of the message as the client sent it (what
    /// recognises a resend, RFC 1047), if it has one in the part of its
    /// header section the session kept ([`HEADER_KEPT`]).
    pub fn message_id(&self) -> Option<String> {
        self.client_message_id.clone()
    }
}

/// Strips anything that could break a header line out of peer-supplied text
/// (the HELO name is the client's): CR, LF and other controls.
fn clean(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(255).collect()
}

/// The `with` protocol keyword of RFC 3848 (registered in RFC 5321 4.4's
/// "with" clause registry).
fn protocol(esmtp: bool, tls: bool, authenticated: bool) -> &'static str {
    match (esmtp, tls, authenticated) {
        (false, _, _) => "SMTP",
        (true, false, false) => "ESMTP",
        (true, true, false) => "ESMTPS",
        (true, false, true) => "ESMTPA",
        (true, true, true) => "ESMTPSA",
    }
}

/// The peer address as an RFC 5321 4.1.3 address literal.
fn address_literal(peer: &std::net::SocketAddr) -> String {
    match peer.ip() {
        std::net::IpAddr::V4(ip) => format!("[{ip}]"),
        std::net::IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => format!("[{v4}]"),
            None => format!("[IPv6:{ip}]"),
        },
    }
}

/// What our `Received:` line says about a transaction (RFC 5321 4.4).
pub(crate) struct Trace<'a> {
    pub helo: &'a str,
    pub esmtp: bool,
    pub peer: &'a std::net::SocketAddr,
    pub tls: bool,
    pub authenticated: Option<&'a str>,
    pub hostname: &'a str,
    pub queue_id: QueueId,
    pub recipients: &'a [String],
    pub date: &'a str,
}

/// Our `Received:` field, CRLF-terminated: "from" the EHLO name with the
/// TCP-info of the peer (we do no reverse DNS, so only the literal), the
/// authenticated user on a line of its own as Postfix writes it, "by" us,
/// "with", "id", and "for" only when there is exactly one recipient (more
/// would disclose Bcc).
pub(crate) fn received(t: &Trace<'_>) -> String {
    let mut received = format!("Received: from {} ({})", clean(t.helo), address_literal(t.peer));
    if let Some(user) = t.authenticated {
        received.push_str(&format!("\r\n\t(Authenticated sender: {})", clean(user)));
    }
    received.push_str(&format!(
        "\r\n\tby {} (hamail) with {} id {}",
        t.hostname,
        protocol(t.esmtp, t.tls, t.authenticated.is_some()),
        t.queue_id
    ));
    if let [one] = t.recipients {
        received.push_str(&format!("\r\n\tfor <{}>", clean(one)));
    }
    received.push_str(&format!(";\r\n\t{}\r\n", t.date));
    received
}

/// Octets of the client's header section kept to read its `Message-ID:`
/// from; a longer section counts as having none.
pub const HEADER_KEPT: usize = 64 * 1024;

/// Octets a field name (with the white space before its colon) may have
/// before the line is taken for body text (RFC 5322 2.1.1: 998 per line).
const FIELD_NAME_MAX: usize = 998;

/// Where the [`Stamper`] is in the client's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// At the start of a line of the header section (`first`: of the message).
    LineStart { first: bool },
    /// A CR at the start of a line: an empty line if an LF follows.
    EmptyLine,
    /// In what may be a field name (held back until its colon).
    Name,
    /// White space after the name, before its colon (RFC 5322 4.5.3,
    /// obsolete syntax, still seen).
    NameSpace,
    /// The rest of a field's line, or a folded continuation line.
    Field,
    /// After the header section: passed through untouched.
    Body,
}

/// Fields a submission server adds when the client's message lacks them
/// (RFC 6409 8.2 and 8.3).
#[derive(Debug)]
pub(crate) struct Missing {
    pub message_id: String,
    pub date: String,
}

/// Passes the client's message data through, resumably at any byte, and
/// inserts the missing `Message-ID:` and `Date:` of a submission at the end
/// of the client's header section, as Postfix's cleanup does. A line that
/// is not a header field ends the header section: an empty line is put
/// before it, so that a message without headers keeps its first line in
/// its body (our `Received:` comes first). Keeps the start of the header
/// section ([`HEADER_KEPT`]) for its `Message-ID:`.
#[derive(Debug)]
pub(crate) struct Stamper {
    part: Part,
    /// The current line so far, while it may still be a field name.
    held: Vec<u8>,
    missing: Option<Missing>,
    has_message_id: bool,
    has_date: bool,
    /// The client's header section, up to [`HEADER_KEPT`].
    headers: Vec<u8>,
    headers_cut: bool,
}

fn is_ftext(b: u8) -> bool {
    (33..=126).contains(&b) && b != b':'
}

impl Stamper {
    /// `missing`: for an authenticated submission, the fields to add if the
    /// client did not send them; `None` adds nothing.
    pub(crate) fn new(missing: Option<Missing>) -> Stamper {
        Stamper {
            part: Part::LineStart { first: true },
            held: Vec::new(),
            missing,
            has_message_id: false,
            has_date: false,
            headers: Vec::new(),
            headers_cut: false,
        }
    }

    /// Octets held in memory.
    pub(crate) fn held(&self) -> usize {
        self.held.len() + self.headers.len()
    }

    fn keep(&mut self, bytes: &[u8]) {
        if self.headers_cut {
            return;
        }
        if self.headers.len() + bytes.len() > HEADER_KEPT {
            self.headers_cut = true;
            self.headers = Vec::new();
        } else {
            self.headers.extend_from_slice(bytes);
        }
    }

    /// The end of the header section: our fields, then (`blank`) the empty
    /// line the client did not send.
    fn end_headers(&mut self, out: &mut Vec<u8>, blank: bool) {
        if let Some(missing) = self.missing.take() {
            if !self.has_message_id {
                out.extend_from_slice(format!("Message-ID: {}\r\n", missing.message_id).as_bytes());
            }
            if !self.has_date {
                out.extend_from_slice(format!("Date: {}\r\n", missing.date).as_bytes());
            }
        }
        if blank {
            out.extend_from_slice(b"\r\n");
        }
        self.part = Part::Body;
    }

    /// The held start of the current line is body text.
    fn not_a_field(&mut self, out: &mut Vec<u8>) {
        self.end_headers(out, true);
        out.append(&mut self.held);
    }

    /// The held start of the current line is a field name and its colon.
    fn field(&mut self, out: &mut Vec<u8>) {
        let name = self.held.strip_suffix(b":").unwrap_or(&self.held);
        let name = name.trim_ascii_end();
        self.has_message_id |= name.eq_ignore_ascii_case(b"Message-ID");
        self.has_date |= name.eq_ignore_ascii_case(b"Date");
        let held = std::mem::take(&mut self.held);
        self.keep(&held);
        out.extend_from_slice(&held);
        self.part = Part::Field;
    }

    /// Passes `bytes` of the client's message on to `out`.
    pub(crate) fn push(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            match self.part {
                Part::Body => {
                    out.extend_from_slice(&bytes[i..]);
                    return;
                }
                Part::Field => {
                    let rest = &bytes[i..];
                    let line = match rest.iter().position(|&c| c == b'\n') {
                        Some(p) => {
                            self.part = Part::LineStart { first: false };
                            &rest[..=p]
                        }
                        None => rest,
                    };
                    self.keep(line);
                    out.extend_from_slice(line);
                    i += line.len();
                }
                Part::LineStart { first } => match b {
                    b' ' | b'\t' if !first => self.part = Part::Field,
                    b'\r' => {
                        self.held.push(b);
                        self.part = Part::EmptyLine;
                        i += 1;
                    }
                    _ if is_ftext(b) => {
                        self.held.push(b);
                        self.part = Part::Name;
                        i += 1;
                    }
                    _ => self.not_a_field(out),
                },
                Part::EmptyLine => {
                    if b == b'\n' {
                        self.held.clear();
                        self.end_headers(out, false);
                        self.keep(b"\r\n");
                        out.extend_from_slice(b"\r\n");
                        i += 1;
                    } else {
                        self.not_a_field(out);
                    }
                }
                Part::Name | Part::NameSpace => {
                    let fits = self.held.len() < FIELD_NAME_MAX;
                    match b {
                        b':' => {
                            self.held.push(b);
                            i += 1;
                            self.field(out);
                        }
                        _ if is_ftext(b) && self.part == Part::Name && fits => {
                            self.held.push(b);
                            i += 1;
                        }
                        b' ' | b'\t' if fits => {
                            self.held.push(b);
                            self.part = Part::NameSpace;
                            i += 1;
                        }
                        _ => self.not_a_field(out),
                    }
                }
            }
        }
    }

    /// The end of the message. Returns the `Message-ID:` of the client's
    /// header section, if it kept it whole.
    pub(crate) fn finish(mut self, out: &mut Vec<u8>) -> Option<String> {
        match self.part {
            Part::Body => {}
            // The message ended in its header section (or is empty): our
            // fields after the client's.
            Part::LineStart { .. } | Part::Field => self.end_headers(out, false),
            Part::EmptyLine | Part::Name | Part::NameSpace => self.not_a_field(out),
        }
        if self.headers_cut {
            return None;
        }
        field_value(&self.headers, "Message-ID")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message as it is spooled: `Received:` (with the authenticated
    /// user, if `auth`), then the client's `data` fed in pieces of `chunk`
    /// octets; and the client's Message-ID as read.
    fn stamp(data: &[u8], auth: bool, rcpts: &[&str], chunk: usize) -> (String, Option<String>) {
        let recipients: Vec<String> = rcpts.iter().map(|s| s.to_string()).collect();
        let peer = "192.0.2.1:4000".parse().unwrap();
        let trace = Trace {
            helo: "client.example",
            esmtp: true,
            peer: &peer,
            tls: true,
            authenticated: auth.then_some("alice@example.org\r\nX-Evil: 1"),
            hostname: "mx.example",
            queue_id: QueueId(255),
            recipients: &recipients,
            date: "DATE",
        };
        let mut out = received(&trace).into_bytes();
        let missing = auth.then(|| Missing { message_id: "<ID@mx.example>".into(), date: "DATE".into() });
        let mut stamper = Stamper::new(missing);
        for piece in data.chunks(chunk.max(1)) {
            stamper.push(piece, &mut out);
        }
        let id = stamper.finish(&mut out);
        (String::from_utf8(out).unwrap(), id)
    }

    /// [`stamp`] with every chunk size from 1 octet up: the same result.
    fn stamp_in_chunks(data: &[u8], auth: bool, rcpts: &[&str]) -> (String, Option<String>) {
        let whole = stamp(data, auth, rcpts, data.len());
        for chunk in 1..=data.len() {
            assert_eq!(stamp(data, auth, rcpts, chunk), whole, "in chunks of {chunk}");
        }
        whole
    }

    const RELAY_RECEIVED: &str =
        "Received: from client.example ([192.0.2.1])\r\n\tby mx.example (hamail) with ESMTPS id 0000000000FF\r\n\tfor <r@x.example>;\r\n\tDATE\r\n";

    #[test]
    fn relayed_mail_gets_received_only() {
        let (out, id) = stamp_in_chunks(b"Subject: x\r\nMessage-ID: <a@b>\r\n\r\nhi\r\n", false, &["r@x.example"]);
        assert_eq!(out, format!("{RELAY_RECEIVED}Subject: x\r\nMessage-ID: <a@b>\r\n\r\nhi\r\n"));
        assert_eq!(id.as_deref(), Some("<a@b>"));
        // No Message-ID or Date added without authentication.
        let (out, id) = stamp_in_chunks(b"Subject: x\r\n\r\nhi\r\n", false, &["r@x.example"]);
        assert_eq!(out, format!("{RELAY_RECEIVED}Subject: x\r\n\r\nhi\r\n"));
        assert_eq!(id, None);
    }

    #[test]
    fn a_message_without_headers_keeps_its_first_line_in_the_body() {
        let (out, id) = stamp_in_chunks(b"hello world\r\nMessage-ID: <no@b>\r\n", false, &["r@x.example"]);
        assert_eq!(out, format!("{RELAY_RECEIVED}\r\nhello world\r\nMessage-ID: <no@b>\r\n"));
        assert_eq!(id, None);
        // A first line starting with white space, or with a colon, or
        // a name too long for a field: not a field either.
        for data in [&b" x: y\r\n"[..], b":x\r\n", &[b"a".repeat(1000), b": y\r\n".to_vec()].concat()] {
            let (out, _) = stamp_in_chunks(data, false, &["r@x.example"]);
            let data = String::from_utf8(data.to_vec()).unwrap();
            assert_eq!(out, format!("{RELAY_RECEIVED}\r\n{data}"));
        }
        // Body text after some fields, without the empty line: the empty
        // line is put before it.
        let (out, _) = stamp_in_chunks(b"Subject: x\r\n folded\r\nbody text\r\n", false, &["r@x.example"]);
        assert_eq!(out, format!("{RELAY_RECEIVED}Subject: x\r\n folded\r\n\r\nbody text\r\n"));
    }

    #[test]
    fn submission_gets_message_id_and_date_at_the_end_of_its_header_section() {
        let auth_received = "Received: from client.example ([192.0.2.1])\r\n\t(Authenticated sender: alice@example.orgX-Evil: 1)\r\n\tby mx.example (hamail) with ESMTPSA id 0000000000FF;\r\n\tDATE\r\n";
        let (out, id) =
            stamp_in_chunks(b"Subject: x\r\nTo: a@x\r\n\r\nMessage-ID: not a header\r\n", true, &["a@x", "b@x"]);
        assert_eq!(
            out,
            format!("{auth_received}Subject: x\r\nTo: a@x\r\nMessage-ID: <ID@mx.example>\r\nDate: DATE\r\n\r\nMessage-ID: not a header\r\n")
        );
        assert_eq!(id, None);
        // Present (any case, white space before the colon): not added.
        let (out, id) = stamp_in_chunks(b"message-id : <x@y>\r\nDATE: now\r\n\r\nhi\r\n", true, &["a@x", "b@x"]);
        assert_eq!(out, format!("{auth_received}message-id : <x@y>\r\nDATE: now\r\n\r\nhi\r\n"));
        assert_eq!(id.as_deref(), Some("<x@y>"));
        // Only a Date: the Message-ID is added.
        let (out, _) = stamp_in_chunks(b"Date: now\r\n\r\n", true, &["a@x", "b@x"]);
        assert_eq!(out, format!("{auth_received}Date: now\r\nMessage-ID: <ID@mx.example>\r\n\r\n"));
        // No headers at all: ours, then the empty line, then the body.
        let (out, _) = stamp_in_chunks(b"hi\r\n", true, &["a@x", "b@x"]);
        assert_eq!(out, format!("{auth_received}Message-ID: <ID@mx.example>\r\nDate: DATE\r\n\r\nhi\r\n"));
        // Headers only, and an empty message: ours at the end.
        let (out, _) = stamp_in_chunks(b"Subject: x\r\n", true, &["a@x", "b@x"]);
        assert_eq!(out, format!("{auth_received}Subject: x\r\nMessage-ID: <ID@mx.example>\r\nDate: DATE\r\n"));
        let (out, _) = stamp(b"", true, &["a@x", "b@x"], 1);
        assert_eq!(out, format!("{auth_received}Message-ID: <ID@mx.example>\r\nDate: DATE\r\n"));
    }

    #[test]
    fn message_id_is_read_from_the_kept_header_section_only() {
        let (_, id) = stamp_in_chunks(b"Message-ID:\r\n <folded@b>\r\nSubject: x\r\n\r\n", false, &["r@x"]);
        assert_eq!(id.as_deref(), Some("<folded@b>"));
        let (_, id) = stamp_in_chunks(b"Message-IDX: <a@b>\r\nMessage-ID: \r\n\r\n", false, &["r@x"]);
        assert_eq!(id, None, "another field, then an empty one");
        // A header section longer than what is kept counts as having none.
        let long = [b"Message-ID: <a@b>\r\n".to_vec(), b"X: y\r\n".repeat(HEADER_KEPT / 6 + 1), b"\r\nhi\r\n".to_vec()]
            .concat();
        assert_eq!(stamp(&long, false, &["r@x"], 7).1, None);
        let short = [b"Message-ID: <a@b>\r\n".to_vec(), b"X: y\r\n".repeat(100), b"\r\nhi\r\n".to_vec()].concat();
        assert_eq!(stamp(&short, false, &["r@x"], 7).1.as_deref(), Some("<a@b>"));
    }

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(rfc5322_date(1_700_000_000), "Tue, 14 Nov 2023 22:13:20 +0000");
        assert_eq!(rfc5322_date(-1), "Wed, 31 Dec 1969 23:59:59 +0000");
    }
}
