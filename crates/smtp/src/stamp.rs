//! Trace and missing headers added to an accepted message before it is
//! committed: `Received:` (RFC 5321 4.4), and for authenticated submissions
//! `Message-ID:` and `Date:` when missing (RFC 6409 8.2 and 8.3: a
//! submission server may add them). `Return-Path:` is not added here: the
//! store adds it on delivery (RFC 5321 4.4, "final delivery").

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
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let month = MONTHS[(m as usize).saturating_sub(1) % 12];
    format!(
        "{weekday}, {d:02} {month} {y:04} {:02}:{:02}:{:02} +0000",
        secs / 3600,
        (secs % 3600) / 60,
        secs % 60
    )
}

/// The header block of a message: up to the first empty line, or all of it.
fn header_block(body: &[u8]) -> &[u8] {
    if body.starts_with(b"\r\n") {
        return &[];
    }
    match body.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(p) => &body[..p + 2],
        None => body,
    }
}

/// Whether the header block has a field named `name` (case-insensitive, at
/// the start of a line, so folded continuation lines never match).
pub fn has_field(headers: &[u8], name: &str) -> bool {
    headers.split(|&b| b == b'\n').any(|line| is_field(line, name))
}

/// Whether header line `line` is a field named `name` (case-insensitive).
fn is_field(line: &[u8], name: &str) -> bool {
    line.len() > name.len() && line[..name.len()].eq_ignore_ascii_case(name.as_bytes()) && line[name.len()] == b':'
}

/// The unfolded value (RFC 5322 2.2.3) of the first field named `name`,
/// trimmed; `None` when absent or empty.
fn field_value(headers: &[u8], name: &str) -> Option<String> {
    let mut lines = headers.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let first = lines.find(|line| is_field(line, name))?;
    let mut value = first[name.len() + 1..].to_vec();
    for cont in lines.take_while(|l| l.first().is_some_and(|b| *b == b' ' || *b == b'\t')) {
        value.extend_from_slice(cont);
    }
    let value = String::from_utf8_lossy(&value).trim().to_string();
    (!value.is_empty()).then_some(value)
}

impl Transaction {
    /// The `Message-ID:` of the message as the client sent it (what
    /// recognises a resend, RFC 1047), if it has one.
    pub fn message_id(&self) -> Option<String> {
        field_value(header_block(&self.body), "Message-ID")
    }
}

/// Strips anything that could break a header line out of peer-supplied text
/// (the HELO name is the client's): CR, LF and other controls.
fn clean(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(255).collect()
}

/// The `with` protocol keyword of RFC 3848 (registered in RFC 5321 4.4's
/// "with" clause registry).
fn protocol(txn: &Transaction) -> &'static str {
    match (txn.esmtp, txn.tls, txn.authenticated.is_some()) {
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

/// The message as it is committed: our `Received:` on top, then (for
/// authenticated submissions only) `Message-ID:` and `Date:` if missing, then
/// the client's message unchanged.
pub fn stamp_message(
    txn: &Transaction,
    queue_id: QueueId,
    hostname: &str,
    date_rfc5322: &str,
    message_id_domain: &str,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(txn.body.len() + 512);
    // RFC 5321 4.4: "from" the EHLO name with the TCP-info of the peer (we do
    // no reverse DNS, so only the literal), "by" us, "with", "id", and "for"
    // only when there is exactly one recipient (more would disclose Bcc).
    let mut received = format!(
        "Received: from {} ({})\r\n\tby {} (hamail) with {} id {}",
        clean(&txn.helo),
        address_literal(&txn.peer),
        hostname,
        protocol(txn),
        queue_id
    );
    if let [one] = txn.recipients.as_slice() {
        received.push_str(&format!("\r\n\tfor <{}>", clean(one)));
    }
    received.push_str(&format!(";\r\n\t{date_rfc5322}\r\n"));
    out.extend_from_slice(received.as_bytes());

    if txn.authenticated.is_some() {
        let headers = header_block(&txn.body);
        if !has_field(headers, "Message-ID") {
            let random: u64 = rand::random();
            out.extend_from_slice(
                format!("Message-ID: <{queue_id}.{random:016x}@{message_id_domain}>\r\n")
                    .as_bytes(),
            );
        }
        if !has_field(headers, "Date") {
            out.extend_from_slice(format!("Date: {date_rfc5322}\r\n").as_bytes());
        }
    }
    out.extend_from_slice(&txn.body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txn(body: &[u8], auth: bool, rcpts: &[&str]) -> Transaction {
        Transaction {
            return_path: Some("a@b.example".into()),
            local: vec![],
            remote: vec![],
            recipients: rcpts.iter().map(|s| s.to_string()).collect(),
            body: body.to_vec(),
            body_sha256: sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(body)).into(),
            helo: "client.example".into(),
            peer: "192.0.2.1:4000".parse().unwrap(),
            tls: true,
            authenticated: auth.then(|| "u@b.example".to_string()),
            esmtp: true,
        }
    }

    #[test]
    fn message_id_is_read_from_the_header_block_only() {
        let t = txn(b"Subject: x\r\nmessage-ID:  <a@b>\r\n\r\nhi\r\n", false, &["r@x"]);
        assert_eq!(t.message_id().as_deref(), Some("<a@b>"));
        let t = txn(b"Message-ID:\r\n <folded@b>\r\nSubject: x\r\n\r\n", false, &["r@x"]);
        assert_eq!(t.message_id().as_deref(), Some("<folded@b>"));
        let t = txn(b"Subject: x\r\n\r\nMessage-ID: <in-body@b>\r\n", false, &["r@x"]);
        assert_eq!(t.message_id(), None);
        let t = txn(b"Message-IDX: <a@b>\r\nMessage-ID: \r\n\r\n", false, &["r@x"]);
        assert_eq!(t.message_id(), None, "another field, then an empty one");
    }

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_700_000_000),
            "Tue, 14 Nov 2023 22:13:20 +0000"
        );
        assert_eq!(rfc5322_date(-1), "Wed, 31 Dec 1969 23:59:59 +0000");
    }

    #[test]
    fn received_only_for_relay() {
        let t = txn(b"Subject: x\r\n\r\nhi\r\n", false, &["r@x.example"]);
        let out =
            String::from_utf8(stamp_message(&t, QueueId(255), "mx.example", "DATE", "d")).unwrap();
        assert_eq!(
            out,
            "Received: from client.example ([192.0.2.1])\r\n\tby mx.example (hamail) with ESMTPS id 0000000000FF\r\n\tfor <r@x.example>;\r\n\tDATE\r\nSubject: x\r\n\r\nhi\r\n"
        );
    }

    #[test]
    fn submission_gets_message_id_and_date() {
        let t = txn(
            b"Subject: x\r\n\r\nMessage-ID: not a header\r\n",
            true,
            &["a@x", "b@x"],
        );
        let out =
            String::from_utf8(stamp_message(&t, QueueId(1), "mx", "DATE", "d.example")).unwrap();
        assert!(out.contains("with ESMTPSA id 000000000001;\r\n"), "{out}");
        assert!(!out.contains("for <"));
        assert!(out.contains("\r\nMessage-ID: <000000000001."));
        assert!(out.contains("@d.example>\r\nDate: DATE\r\nSubject: x"));

        let t = txn(
            b"message-id: <x@y>\r\nDATE: now\r\n\r\nhi\r\n",
            true,
            &["a@x"],
        );
        let out = String::from_utf8(stamp_message(&t, QueueId(1), "mx", "DATE", "d")).unwrap();
        assert_eq!(out.matches("essage-").count(), 1);
        assert!(!out.contains("Date: DATE"));
    }
}
