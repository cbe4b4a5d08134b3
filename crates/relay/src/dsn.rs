//! Delivery status notifications (RFC 3464) for the envelope sender:
//! `multipart/report; report-type=delivery-status` (RFC 6522) with a
//! human-readable part, a `message/delivery-status` part (per-message and
//! per-recipient fields) and the original message's headers
//! (`text/rfc822-headers`). Built with mail-builder.
//!
//! A DSN is itself sent with the null reverse-path `<>` (RFC 5321 4.5.5),
//! so it can never cause another one; who gets it (the sender, or the
//! postmaster for a bounce that bounced) is the caller's decision.

use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::date::Date;
use mail_builder::headers::raw::Raw;
use mail_builder::mime::MimePart;
use mail_builder::MessageBuilder;

use crate::{RelayError, RelayResult};

/// Why the report is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DsnKind {
    /// Delivery failed for good (`Action: failed`).
    Failure,
    /// Still trying (`Action: delayed`), the warning of RFC 3464 2.3.3.
    Delay,
}

/// One recipient in the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DsnRecipient {
    pub address: String,
    /// The enhanced status code (RFC 3463), `5.1.1`, `4.4.1`...
    pub status: String,
    /// The remote server's reply (`Diagnostic-Code: smtp; ...`), if any.
    pub diagnostic: Option<String>,
    /// Our reason when there is no remote reply (timeouts, null MX...).
    pub reason: String,
    /// The host that answered, if any (`Remote-MTA`).
    pub remote_mta: Option<String>,
    /// When the last attempt was made (Unix seconds).
    pub last_attempt: Option<u64>,
}

/// Everything a report says.
#[derive(Clone, Debug)]
pub struct Dsn<'a> {
    pub kind: DsnKind,
    /// Our host name (`Reporting-MTA`, the `From:` domain).
    pub reporting_mta: &'a str,
    /// The `To:` of the report: the original envelope sender (or the
    /// postmaster for a double bounce).
    pub to: &'a str,
    /// The original message's queue id (`X-Postfix-Queue-ID` style, here
    /// `X-Hamail-Queue-ID`).
    pub queue_id: &'a str,
    /// When the original message was accepted (Unix seconds).
    pub arrival: u64,
    /// When this report is made (Unix seconds).
    pub now: u64,
    pub recipients: &'a [DsnRecipient],
    /// The original message (its headers are included).
    pub original: &'a [u8],
    /// For `Delay`: when we give up (Unix seconds), told to the sender.
    pub will_retry_until: Option<u64>,
}

/// The header part of a message: up to the first empty line (CRLF).
pub fn header_block(message: &[u8]) -> &[u8] {
    if message.starts_with(b"\r\n") {
        return &message[..0];
    }
    match message.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => &message[..i + 2],
        None => message,
    }
}

fn field_safe(s: &str) -> String {
    // A reply text must not start a new header field inside the report.
    s.replace(['\r', '\n'], " ")
}

/// How the delivery worker records a remote server's refusal of a
/// recipient (the queue's last error): the server's name, then its reply,
/// so that a DSN built later, from the queue alone, can name the server
/// that reported the failure (RFC 3464 2.3.5: Remote-MTA is required for
/// recipients relayed over SMTP).
pub fn remote_refusal(mta: &str, reply: &str) -> String {
    format!("{mta} said: {reply}")
}

/// The reply code a recorded error starts with ("550 5.1.1 ..." -> "550"):
/// `Some` when the text is a server's reply (RFC 5321 4.2), `None` for our
/// own reasons ("connection reset").
pub fn reply_code(text: &str) -> Option<&str> {
    text.split_whitespace().next().filter(|w| w.len() == 3 && w.bytes().all(|b| b.is_ascii_digit()))
}

/// Splits an error recorded by [`remote_refusal`] back into the server's
/// name and its reply; any other text is `(None, text)`.
pub fn split_remote_refusal(error: &str) -> (Option<&str>, &str) {
    match error.split_once(" said: ") {
        Some((mta, reply)) if !mta.is_empty() && !mta.contains(char::is_whitespace) => (Some(mta), reply),
        _ => (None, error),
    }
}

/// Builds the report as a complete message (CRLF line ends).
pub fn build(dsn: &Dsn<'_>) -> RelayResult<Vec<u8>> {
    let date = |t: u64| Date::new(t as i64).to_rfc822();
    let (subject, intro) = match dsn.kind {
        DsnKind::Failure => (
            "Undelivered Mail Returned to Sender",
            "This is the mail system at host {host}.\r\n\r\nYour message could not be delivered to one or more recipients. \
             It is attached below (headers only).\r\n",
        ),
        DsnKind::Delay => (
            "Delayed Mail (still being retried)",
            "This is the mail system at host {host}.\r\n\r\n####### THIS IS A WARNING ONLY. YOU DO NOT NEED TO RESEND YOUR MESSAGE. #######\r\n\r\n\
             Your message could not be delivered yet to one or more recipients; delivery will be retried.\r\n",
        ),
    };
    let mut human = intro.replace("{host}", dsn.reporting_mta);
    if let Some(until) = dsn.will_retry_until {
        human.push_str(&format!("It will be retried until {}.\r\n", date(until)));
    }
    human.push_str("\r\n");
    for r in dsn.recipients {
        let why = r.diagnostic.as_deref().unwrap_or(&r.reason);
        human.push_str(&format!("<{}>: {}\r\n", r.address, field_safe(why)));
    }

    // RFC 3464 2.2 (per-message) then 2.3 (per-recipient), blank-line separated.
    let mut status = format!(
        "Reporting-MTA: dns; {}\r\nX-Hamail-Queue-ID: {}\r\nArrival-Date: {}\r\n",
        dsn.reporting_mta,
        dsn.queue_id,
        date(dsn.arrival)
    );
    for r in dsn.recipients {
        status.push_str("\r\n");
        status.push_str(&format!("Final-Recipient: rfc822; {}\r\n", r.address));
        status.push_str(match dsn.kind {
            DsnKind::Failure => "Action: failed\r\n",
            DsnKind::Delay => "Action: delayed\r\n",
        });
        status.push_str(&format!("Status: {}\r\n", r.status));
        if let Some(mta) = &r.remote_mta {
            status.push_str(&format!("Remote-MTA: dns; {mta}\r\n"));
        }
        match &r.diagnostic {
            Some(d) => status.push_str(&format!("Diagnostic-Code: smtp; {}\r\n", field_safe(d))),
            None => status.push_str(&format!("X-Hamail-Reason: {}\r\n", field_safe(&r.reason))),
        }
        if let Some(t) = r.last_attempt {
            status.push_str(&format!("Last-Attempt-Date: {}\r\n", date(t)));
        }
        if let (DsnKind::Delay, Some(until)) = (dsn.kind, dsn.will_retry_until) {
            status.push_str(&format!("Will-Retry-Until: {}\r\n", date(until)));
        }
    }

    let headers = String::from_utf8_lossy(header_block(dsn.original)).into_owned();
    let report = MimePart::new(
        ContentType::new("multipart/report").attribute("report-type", "delivery-status"),
        vec![
            MimePart::new(ContentType::new("text/plain").attribute("charset", "utf-8"), human),
            MimePart::new(ContentType::new("message/delivery-status"), status).transfer_encoding("7bit"),
            MimePart::new(ContentType::new("text/rfc822-headers").attribute("charset", "utf-8"), headers)
                .transfer_encoding("8bit"),
        ],
    );
    let from = format!("MAILER-DAEMON@{}", dsn.reporting_mta);
    let message_id = format!("{}.{}.dsn@{}", dsn.queue_id, dsn.now, dsn.reporting_mta);
    MessageBuilder::new()
        .from(("Mail Delivery System", from.as_str()))
        .to(dsn.to)
        .subject(subject)
        .date(Date::new(dsn.now as i64))
        .message_id(message_id.as_str())
        // RFC 3834 5: automatic responses say so, and nobody answers them.
        .header("Auto-Submitted", Raw::new("auto-replied"))
        .body(report)
        .write_to_vec()
        .map_err(|e| RelayError::Internal(format!("building a DSN: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remote_refusal_splits_back_into_the_server_and_its_reply() {
        let recorded = remote_refusal("mx.there.test", "550 5.1.1 no such user");
        assert_eq!(split_remote_refusal(&recorded), (Some("mx.there.test"), "550 5.1.1 no such user"));
        // Our own reasons name no server, even when they quote one.
        let expired = format!("4.4.7 message expired in the queue; last error: {recorded}");
        assert_eq!(split_remote_refusal(&expired), (None, expired.as_str()));
        assert_eq!(split_remote_refusal("connection refused"), (None, "connection refused"));
        // A server's reply has its code first; our own reasons have none.
        assert_eq!(reply_code("550 5.1.1 no such user"), Some("550"));
        assert_eq!(reply_code("421 "), Some("421"));
        assert_eq!(reply_code("4.4.7 message expired"), None);
        assert_eq!(reply_code("connection reset"), None);
        assert_eq!(reply_code(""), None);
    }

    #[test]
    fn header_block_ends_at_the_blank_line() {
        assert_eq!(header_block(b"A: 1\r\nB: 2\r\n\r\nbody\r\n"), b"A: 1\r\nB: 2\r\n");
        assert_eq!(header_block(b"A: 1\r\n"), b"A: 1\r\n");
        assert_eq!(header_block(b"\r\nbody"), b"");
    }

    #[test]
    fn a_failure_report_parses_back() {
        use mail_parser::MimeHeaders;
        let recipients = vec![
            DsnRecipient {
                address: "bob@there.test".into(),
                status: "5.1.1".into(),
                diagnostic: Some("550 5.1.1 no such user".into()),
                reason: String::new(),
                remote_mta: Some("mx.there.test".into()),
                last_attempt: Some(1_700_000_100),
            },
            DsnRecipient {
                address: "carol@null.test".into(),
                status: "5.1.10".into(),
                diagnostic: None,
                reason: "556 5.1.10 domain null.test accepts no mail\r\nInjected: x".into(),
                remote_mta: None,
                last_attempt: None,
            },
        ];
        let original =
            b"From: alice@here.test\r\nSubject: hello there\r\nMessage-ID: <m1@here.test>\r\n\r\nsecret body\r\n";
        let bytes = build(&Dsn {
            kind: DsnKind::Failure,
            reporting_mta: "mx.here.test",
            to: "alice@here.test",
            queue_id: "00000000002A",
            arrival: 1_700_000_000,
            now: 1_700_000_200,
            recipients: &recipients,
            original,
            will_retry_until: None,
        })
        .unwrap();
        let msg = mail_parser::MessageParser::default().parse(&bytes).expect("parses");
        assert_eq!(msg.subject(), Some("Undelivered Mail Returned to Sender"));
        let ct = msg.content_type().unwrap();
        assert_eq!((ct.ctype(), ct.subtype()), ("multipart", Some("report")));
        assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
        assert_eq!(msg.header_raw("Auto-Submitted").map(str::trim), Some("auto-replied"));
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            text.contains("Final-Recipient: rfc822; bob@there.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"),
            "{text}"
        );
        assert!(text.contains("Diagnostic-Code: smtp; 550 5.1.1 no such user\r\n"));
        assert!(text.contains("Final-Recipient: rfc822; carol@null.test"));
        assert!(!text.contains("\r\nInjected: x"), "a reason cannot add a field");
        assert!(text.contains("Subject: hello there"), "original headers included");
        assert!(!text.contains("secret body"), "only the headers of the original");
        // Three parts in the report, in RFC 3464's order.
        let parts: Vec<String> = msg
            .parts
            .iter()
            .filter_map(|p| p.content_type().map(|c| format!("{}/{}", c.ctype(), c.subtype().unwrap_or(""))))
            .collect();
        assert_eq!(parts, vec!["multipart/report", "text/plain", "message/delivery-status", "text/rfc822-headers"]);
    }

    #[test]
    fn a_delay_warning_says_delayed_and_until_when() {
        let recipients = vec![DsnRecipient {
            address: "bob@there.test".into(),
            status: "4.4.1".into(),
            diagnostic: None,
            reason: "connection refused".into(),
            remote_mta: None,
            last_attempt: Some(10),
        }];
        let bytes = build(&Dsn {
            kind: DsnKind::Delay,
            reporting_mta: "mx.here.test",
            to: "alice@here.test",
            queue_id: "1",
            arrival: 0,
            now: 14_400,
            recipients: &recipients,
            original: b"Subject: s\r\n\r\nb\r\n",
            will_retry_until: Some(432_000),
        })
        .unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("Action: delayed\r\nStatus: 4.4.1\r\n"), "{text}");
        assert!(text.contains("Will-Retry-Until: Tue, 6 Jan 1970"), "{text}");
        assert!(text.contains("Subject: Delayed Mail"));
    }
}
