//! Byte-stuffing of a message for a RETR or TOP multi-line response.

/// Appends `body` to `out` as the payload of a POP3 multi-line response
/// (RFC 1939 section 3), without the terminating `.\r\n`, which the caller
/// appends after it.
///
/// - A line that starts with `.` gets another `.` in front (byte-stuffing),
///   so that no line of the message can be read as the terminator.
/// - Every line end is sent as CRLF, whatever the store holds: a bare LF or
///   a bare CR ends a line too. A bare LF on the wire is not a line end for
///   many clients, and a bare CR followed later by `.` could otherwise smuggle
///   a terminator past a client that splits on CR.
/// - The last line always ends with CRLF, so that the caller's `.\r\n` is on
///   a line of its own.
/// - `top_lines: Some(n)` sends what TOP asks for (RFC 1939 section 7): the
///   header section, the blank line that ends it, then at most `n` lines of
///   the body. A message without a blank line is all headers and is sent
///   whole. `None` sends everything (RETR).
///
/// An empty body appends nothing.
pub fn dot_stuff_into(out: &mut Vec<u8>, body: &[u8], top_lines: Option<usize>) {
    // Room for the body plus a little for stuffing and normalised line ends.
    out.reserve(body.len() + body.len() / 32 + 2);
    let mut rest = body;
    let mut in_headers = true;
    let mut body_lines_left = top_lines;
    while !rest.is_empty() {
        if !in_headers && body_lines_left == Some(0) {
            break;
        }
        let (line, next) = match rest.iter().position(|&b| b == b'\r' || b == b'\n') {
            Some(i) => {
                let end_len = if rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                (&rest[..i], &rest[i + end_len..])
            }
            None => (rest, &rest[rest.len()..]),
        };
        if line.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
        if in_headers {
            // RFC 5322 section 2.1: the first empty line ends the header
            // section; it is sent, and body lines are counted from here.
            in_headers = !line.is_empty();
        } else if let Some(n) = body_lines_left.as_mut() {
            *n -= 1;
        }
        rest = next;
    }
}

#[cfg(test)]
mod tests {
    use super::dot_stuff_into;

    fn stuff(body: &[u8], top: Option<usize>) -> String {
        let mut out = Vec::new();
        dot_stuff_into(&mut out, body, top);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn empty_body_appends_nothing() {
        assert_eq!(stuff(b"", None), "");
        assert_eq!(stuff(b"", Some(0)), "");
        assert_eq!(stuff(b"", Some(5)), "");
    }

    #[test]
    fn appends_without_clearing() {
        let mut out = b"+OK\r\n".to_vec();
        dot_stuff_into(&mut out, b"a\r\n", None);
        assert_eq!(out, b"+OK\r\na\r\n");
    }

    #[test]
    fn plain_crlf_body_is_unchanged() {
        let body = "Subject: hi\r\n\r\nline 1\r\nline 2\r\n";
        assert_eq!(stuff(body.as_bytes(), None), body);
    }

    #[test]
    fn leading_dots_are_doubled() {
        assert_eq!(
            stuff(b"S: x\r\n\r\n.\r\n..two\r\n. x\r\na.b\r\n.", None),
            "S: x\r\n\r\n..\r\n...two\r\n.. x\r\na.b\r\n..\r\n"
        );
    }

    #[test]
    fn first_line_dot_is_stuffed() {
        assert_eq!(stuff(b".hidden: 1\r\n", None), "..hidden: 1\r\n");
    }

    #[test]
    fn bare_lf_and_bare_cr_become_crlf() {
        assert_eq!(stuff(b"a\nb\rc\r\nd", None), "a\r\nb\r\nc\r\nd\r\n");
        // A bare CR before a dot must not let the dot escape stuffing.
        assert_eq!(stuff(b"a\r.\r\n", None), "a\r\n..\r\n");
        assert_eq!(stuff(b"a\n.\n", None), "a\r\n..\r\n");
    }

    #[test]
    fn empty_lines_are_kept() {
        assert_eq!(stuff(b"a\n\n\nb\n", None), "a\r\n\r\n\r\nb\r\n");
        assert_eq!(stuff(b"\r\n", None), "\r\n");
        assert_eq!(stuff(b"\r\r\n", None), "\r\n\r\n");
    }

    #[test]
    fn missing_final_crlf_is_added() {
        assert_eq!(
            stuff(b"Subject: x\r\n\r\nno end", None),
            "Subject: x\r\n\r\nno end\r\n"
        );
        assert_eq!(stuff(b"x", None), "x\r\n");
    }

    #[test]
    fn top_zero_sends_headers_and_blank_line() {
        let body = b"A: 1\r\nB: 2\r\n\r\nbody 1\r\nbody 2\r\n";
        assert_eq!(stuff(body, Some(0)), "A: 1\r\nB: 2\r\n\r\n");
    }

    #[test]
    fn top_n_sends_n_body_lines() {
        let body = b"A: 1\r\n\r\nbody 1\r\n.body 2\r\n\r\nbody 4\r\n";
        assert_eq!(stuff(body, Some(1)), "A: 1\r\n\r\nbody 1\r\n");
        assert_eq!(stuff(body, Some(2)), "A: 1\r\n\r\nbody 1\r\n..body 2\r\n");
        // Empty lines in the body count as lines.
        assert_eq!(
            stuff(body, Some(3)),
            "A: 1\r\n\r\nbody 1\r\n..body 2\r\n\r\n"
        );
        // More lines than the body has: the whole message.
        assert_eq!(
            stuff(body, Some(100)),
            std::str::from_utf8(&body[..])
                .unwrap()
                .replace(".body", "..body")
        );
    }

    #[test]
    fn top_with_bare_lf_and_no_final_newline() {
        assert_eq!(
            stuff(b"A: 1\n\nb1\nb2", Some(5)),
            "A: 1\r\n\r\nb1\r\nb2\r\n"
        );
        assert_eq!(stuff(b"A: 1\n\nb1\nb2", Some(0)), "A: 1\r\n\r\n");
    }

    #[test]
    fn top_on_headers_only_message_sends_it_all() {
        assert_eq!(stuff(b"A: 1\r\nB: 2", Some(0)), "A: 1\r\nB: 2\r\n");
        assert_eq!(stuff(b"A: 1\r\nB: 2\r\n", Some(3)), "A: 1\r\nB: 2\r\n");
    }

    #[test]
    fn top_on_body_starting_with_blank_line() {
        assert_eq!(stuff(b"\r\nb1\r\nb2\r\n", Some(1)), "\r\nb1\r\n");
        assert_eq!(stuff(b"\r\nb1\r\nb2\r\n", Some(0)), "\r\n");
    }
}
