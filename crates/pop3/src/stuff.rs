//! Byte-stuffing of a message for a RETR or TOP multi-line response.
//!
//! The rules (RFC 1939 section 3, and what clients need):
//!
//! - A line that starts with `.` gets another `.` in front (byte-stuffing),
//!   so that no line of the message can be read as the terminator.
//! - Every line end is sent as CRLF, whatever the store holds: a bare LF or
//!   a bare CR ends a line too. A bare LF on the wire is not a line end for
//!   many clients, and a bare CR followed later by `.` could otherwise smuggle
//!   a terminator past a client that splits on CR.
//! - The last line always ends with CRLF, so that the caller's `.\r\n` is on
//!   a line of its own.
//! - TOP (RFC 1939 section 7) sends the header section, the blank line that
//!   ends it, then at most `n` lines of the body. A message without a blank
//!   line is all headers and is sent whole.
//!
//! An empty body gives nothing.

/// Turns a stored body, fed in chunks of any size, into the payload of a
/// RETR or TOP response (without the terminating `.\r\n`, which the caller
/// sends after [`Stuffer::finish`]). It keeps only where it is in the
/// message, never the message itself: the output of a chunk depends on the
/// chunk and these few fields, so a body of any size is sent through a
/// fixed buffer.
#[derive(Debug, Clone)]
pub struct Stuffer {
    /// Nothing of the current line has been sent yet (a `.` here is stuffed).
    line_start: bool,
    /// The last chunk ended with a CR, already sent as a line end: an LF
    /// at the start of the next chunk is the rest of that CRLF.
    pending_cr: bool,
    /// Still in the header section (RFC 5322 section 2.1: up to the first
    /// empty line).
    in_headers: bool,
    /// TOP: body lines still to send; `None` for RETR (everything).
    body_lines_left: Option<usize>,
}

impl Stuffer {
    /// `top_lines: Some(n)` for TOP n, `None` for RETR.
    pub fn new(top_lines: Option<usize>) -> Self {
        Stuffer { line_start: true, pending_cr: false, in_headers: true, body_lines_left: top_lines }
    }

    /// True when TOP has sent everything it asked for: the rest of the body
    /// need not be read.
    pub fn is_done(&self) -> bool {
        !self.in_headers && self.body_lines_left == Some(0)
    }

    /// Appends the payload for the next `chunk` of the body to `out`: at
    /// most twice the chunk's length (a one-byte line `.` followed by a
    /// bare LF becomes `..` CRLF).
    pub fn feed(&mut self, mut chunk: &[u8], out: &mut Vec<u8>) {
        if chunk.is_empty() {
            return;
        }
        if std::mem::take(&mut self.pending_cr) && chunk[0] == b'\n' {
            chunk = &chunk[1..];
        }
        while !chunk.is_empty() && !self.is_done() {
            let Some(end) = chunk.iter().position(|&b| b == b'\r' || b == b'\n') else {
                self.text(chunk, out);
                return;
            };
            self.text(&chunk[..end], out);
            out.extend_from_slice(b"\r\n");
            self.end_line();
            chunk = match (chunk[end], chunk.get(end + 1)) {
                (b'\r', Some(b'\n')) => &chunk[end + 2..],
                (b'\r', None) => {
                    self.pending_cr = true;
                    &[]
                }
                _ => &chunk[end + 1..],
            };
        }
    }

    /// The body has ended: ends its last line with CRLF if it had none.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.line_start && !self.is_done() {
            out.extend_from_slice(b"\r\n");
            self.end_line();
        }
    }

    /// A piece of a line, without line-end bytes.
    fn text(&mut self, piece: &[u8], out: &mut Vec<u8>) {
        if piece.is_empty() {
            return;
        }
        if self.line_start && piece[0] == b'.' {
            out.push(b'.');
        }
        out.extend_from_slice(piece);
        self.line_start = false;
    }

    /// A line end has been sent.
    fn end_line(&mut self) {
        let empty = std::mem::replace(&mut self.line_start, true);
        if self.in_headers {
            // The first empty line ends the header section; it is sent,
            // and body lines are counted from here.
            self.in_headers = !empty;
        } else if let Some(n) = self.body_lines_left.as_mut() {
            *n = n.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Stuffer;
    use rand::{Rng, SeedableRng};

    /// The whole-buffer form of the rules, line by line: the reference the
    /// resumable [`Stuffer`] is checked against.
    fn reference(body: &[u8], top_lines: Option<usize>) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = body;
        let mut in_headers = true;
        let mut body_lines_left = top_lines;
        while !rest.is_empty() {
            if !in_headers && body_lines_left == Some(0) {
                break;
            }
            let (line, next) = match rest.iter().position(|&b| b == b'\r' || b == b'\n') {
                Some(i) => {
                    let end_len = if rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n') { 2 } else { 1 };
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
                in_headers = !line.is_empty();
            } else if let Some(n) = body_lines_left.as_mut() {
                *n -= 1;
            }
            rest = next;
        }
        out
    }

    /// Feeds `body` in chunks of `size`, stopping when TOP is done, as the
    /// driver does.
    fn in_chunks(body: &[u8], top: Option<usize>, size: usize) -> Vec<u8> {
        let mut stuffer = Stuffer::new(top);
        let mut out = Vec::new();
        for chunk in body.chunks(size) {
            if stuffer.is_done() {
                break;
            }
            let before = out.len();
            stuffer.feed(chunk, &mut out);
            assert!(out.len() - before <= 2 * chunk.len(), "more than twice the chunk");
        }
        stuffer.finish(&mut out);
        out
    }

    /// The payload of `body`, the same whatever the chunking (every size
    /// from 1 octet up) and the same as the reference.
    fn stuff(body: &[u8], top: Option<usize>) -> String {
        let whole = in_chunks(body, top, body.len().max(1));
        for size in 1..body.len() {
            assert_eq!(in_chunks(body, top, size), whole, "chunk size {size} of {body:?}");
        }
        assert_eq!(whole, reference(body, top), "reference of {body:?}");
        String::from_utf8(whole).unwrap()
    }

    #[test]
    fn empty_body_gives_nothing() {
        assert_eq!(stuff(b"", None), "");
        assert_eq!(stuff(b"", Some(0)), "");
        assert_eq!(stuff(b"", Some(5)), "");
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
        // A CR at the very end is a line end of its own.
        assert_eq!(stuff(b"a\r", None), "a\r\n");
        assert_eq!(stuff(b"a\r\r", None), "a\r\n\r\n");
    }

    #[test]
    fn empty_chunks_change_nothing() {
        let mut s = Stuffer::new(None);
        let mut out = Vec::new();
        for chunk in [&b"a\r"[..], b"", b"\n", b"", b".b\r", b"", b"", b"\nc"] {
            s.feed(chunk, &mut out);
        }
        s.finish(&mut out);
        assert_eq!(out, b"a\r\n..b\r\nc\r\n");
    }

    #[test]
    fn empty_lines_are_kept() {
        assert_eq!(stuff(b"a\n\n\nb\n", None), "a\r\n\r\n\r\nb\r\n");
        assert_eq!(stuff(b"\r\n", None), "\r\n");
        assert_eq!(stuff(b"\r\r\n", None), "\r\n\r\n");
        assert_eq!(stuff(b"\n\r", None), "\r\n\r\n");
    }

    #[test]
    fn missing_final_crlf_is_added() {
        assert_eq!(stuff(b"Subject: x\r\n\r\nno end", None), "Subject: x\r\n\r\nno end\r\n");
        assert_eq!(stuff(b"x", None), "x\r\n");
        assert_eq!(stuff(b".", None), "..\r\n");
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
        assert_eq!(stuff(body, Some(3)), "A: 1\r\n\r\nbody 1\r\n..body 2\r\n\r\n");
        // More lines than the body has: the whole message.
        let whole = std::str::from_utf8(&body[..]).unwrap().replace(".body", "..body");
        assert_eq!(stuff(body, Some(100)), whole);
        assert_eq!(stuff(body, Some(usize::MAX)), whole);
    }

    #[test]
    fn top_with_bare_lf_and_no_final_newline() {
        assert_eq!(stuff(b"A: 1\n\nb1\nb2", Some(5)), "A: 1\r\n\r\nb1\r\nb2\r\n");
        assert_eq!(stuff(b"A: 1\n\nb1\nb2", Some(0)), "A: 1\r\n\r\n");
        assert_eq!(stuff(b"A: 1\n\nb1\nb2", Some(1)), "A: 1\r\n\r\nb1\r\n");
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

    #[test]
    fn top_is_done_once_its_lines_are_out() {
        let mut s = Stuffer::new(Some(1));
        let mut out = Vec::new();
        s.feed(b"A: 1\r\n\r\nfirst\r", &mut out);
        assert!(s.is_done());
        s.feed(b"\nsecond\r\n", &mut out);
        s.finish(&mut out);
        assert_eq!(out, b"A: 1\r\n\r\nfirst\r\n");
        // RETR is never done before the end.
        let mut s = Stuffer::new(None);
        s.feed(b"A: 1\r\n\r\n", &mut out);
        assert!(!s.is_done());
    }

    #[test]
    fn random_bodies_match_the_reference_in_random_chunks() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1939);
        // Line-end bytes and dots are frequent, so that every combination
        // of them lands on a chunk boundary somewhere.
        let alphabet = b"\r\n.\r\n.ab :";
        for _ in 0..3000 {
            let len = rng.gen_range(0..80);
            let body: Vec<u8> = (0..len).map(|_| alphabet[rng.gen_range(0..alphabet.len())]).collect();
            let top = match rng.gen_range(0..3) {
                0 => None,
                _ => Some(rng.gen_range(0..6)),
            };
            let expected = reference(&body, top);
            let mut stuffer = Stuffer::new(top);
            let mut out = Vec::new();
            let mut rest = &body[..];
            while !rest.is_empty() && !stuffer.is_done() {
                let (chunk, tail) = rest.split_at(rng.gen_range(0..=rest.len()));
                stuffer.feed(chunk, &mut out);
                rest = tail;
            }
            stuffer.finish(&mut out);
            assert_eq!(out, expected, "{body:?} top {top:?}");
        }
    }
}
