//! The DATA phase decoder (RFC 5321 4.1.1.4 and 4.5.2), written here rather
//! than taken from `smtp-proto` because we need guarantees its receiver does
//! not give:
//!
//! * The message ends at `<CRLF>.<CRLF>` and nowhere else. A bare LF or a
//!   bare CR never terminates a line, so `<LF>.<LF>`, `<LF>.<CRLF>`,
//!   `<CR>.<CRLF>` cannot end the message and cannot start a second,
//!   smuggled transaction ("SMTP smuggling", CVE-2023-51764/51765/51766).
//! * Any bare CR or LF anywhere in the data is remembered, and the whole
//!   message is rejected once its real end arrives (RFC 5321 2.3.8: "CR and
//!   LF MUST only occur together as CRLF").
//! * The decoder is resumable at every byte: its whole state is a handful of
//!   flags, so input split anywhere gives the same result.
//! * Memory is bounded: the decoder keeps nothing of the message; what it
//!   decodes goes to the caller's sink as it comes. Once the message is over
//!   the size limit we keep reading (to find its end, RFC 1870 6.1 asks the
//!   server to reject after the end) but pass nothing more on.

/// Why a completed message must be rejected, in order of precedence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataProblem {
    /// A CR or LF not part of a CRLF pair.
    BareCrOrLf,
    /// A line longer than `max_data_line` octets.
    LineTooLong,
    /// The message is larger than `max_message_size`.
    TooBig,
}

impl DataProblem {
    /// The reply to the end of a message refused for this (without CRLF),
    /// as the session sends it and the driver logs it. 554 is the reply
    /// RFC 5321 4.3.2 lists for a failed DATA; 552 for size is RFC 1870
    /// 6.2.
    pub fn reply(self) -> &'static str {
        match self {
            DataProblem::BareCrOrLf => "554 5.6.0 Message rejected: bare CR or LF in message data (RFC 5321 2.3.8)",
            DataProblem::LineTooLong => "554 5.6.0 Message rejected: line too long (RFC 5321 4.5.3.1.6)",
            DataProblem::TooBig => "552 5.3.4 Message size exceeds fixed maximum message size",
        }
    }
}

/// Resumable dot-unstuffing decoder for one message.
#[derive(Debug)]
pub(crate) struct DataDecoder {
    /// SHA-256 of the body, kept as it grows (for resend recognition).
    digest: sha2::Sha256,
    max_size: usize,
    max_line: usize,
    /// The next byte starts a line (the previous two were CRLF, or this is
    /// the first byte after the DATA command's own CRLF).
    line_start: bool,
    /// The current line so far is exactly one "." at its start (the dot is
    /// held back: it is either the terminator or a stuffing dot).
    only_dot: bool,
    /// The previous byte was a CR not yet emitted (it may be half of a CRLF).
    pending_cr: bool,
    /// Octets in the current line, without its CRLF.
    line_len: usize,
    /// Octets of the message, counted even once we stop storing.
    size: usize,
    bare: bool,
    long_line: bool,
}

/// Outcome of feeding bytes to the decoder.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Feed {
    /// Everything given was consumed; the end has not been seen.
    More,
    /// The end-of-data line was seen; this many bytes of the input were
    /// consumed (the rest belongs to the next commands, RFC 2920).
    Done(usize),
}

impl DataDecoder {
    pub(crate) fn new(max_size: usize, max_line: usize) -> Self {
        DataDecoder {
            digest: sha2::Sha256::default(),
            max_size,
            max_line,
            line_start: true,
            only_dot: false,
            pending_cr: false,
            line_len: 0,
            size: 0,
            bare: false,
            long_line: false,
        }
    }

    /// Passes on what fits within the size limit (the first `max_size`
    /// octets, however the input was split); counts all.
    fn emit(&mut self, bytes: &[u8], sink: &mut impl FnMut(&[u8])) {
        let room = self.max_size.saturating_sub(self.size);
        self.size = self.size.saturating_add(bytes.len());
        let kept = &bytes[..bytes.len().min(room)];
        if !kept.is_empty() {
            sink(kept);
            sha2::Digest::update(&mut self.digest, kept);
        }
    }

    fn grow_line(&mut self, n: usize) {
        self.line_len = self.line_len.saturating_add(n);
        if self.line_len > self.max_line {
            self.long_line = true;
        }
    }

    /// Feeds bytes, passing the decoded message data to `sink`; returns
    /// how far it got.
    pub(crate) fn feed(&mut self, input: &[u8], sink: &mut impl FnMut(&[u8])) -> Feed {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            if self.pending_cr {
                self.pending_cr = false;
                if b == b'\n' {
                    i += 1;
                    if self.only_dot {
                        // <CRLF>.<CRLF>: the end of the message.
                        return Feed::Done(i);
                    }
                    self.emit(b"\r\n", sink);
                    self.line_start = true;
                    self.only_dot = false;
                    self.line_len = 0;
                    continue;
                }
                // A CR not followed by LF: a bare CR. It is content, and the
                // message will be rejected; the current byte is processed
                // normally below. The line is not ended.
                self.bare = true;
                self.flush_held_dot();
                self.emit(b"\r", sink);
                self.grow_line(1);
            }
            match b {
                b'\r' => {
                    self.pending_cr = true;
                    i += 1;
                }
                b'\n' => {
                    // A bare LF: content, never a line end.
                    self.bare = true;
                    self.flush_held_dot();
                    self.line_start = false;
                    self.emit(b"\n", sink);
                    self.grow_line(1);
                    i += 1;
                }
                b'.' if self.line_start => {
                    // Hold the dot: "." alone ends the message, otherwise it
                    // is a stuffing dot to delete (RFC 5321 4.5.2).
                    self.line_start = false;
                    self.only_dot = true;
                    self.grow_line(1);
                    i += 1;
                }
                _ => {
                    // The stuffing dot, if held, is dropped here.
                    self.only_dot = false;
                    self.line_start = false;
                    // Copy the run of ordinary bytes in one go.
                    let run = input[i..].iter().position(|&c| c == b'\r' || c == b'\n').unwrap_or(input.len() - i);
                    let (start, end) = (i, i + run);
                    self.emit_range(input, start, end, sink);
                    self.grow_line(run);
                    i = end;
                }
            }
        }
        Feed::More
    }

    fn emit_range(&mut self, input: &[u8], start: usize, end: usize, sink: &mut impl FnMut(&[u8])) {
        if let Some(s) = input.get(start..end) {
            self.emit(s, sink);
        }
    }

    /// A held leading dot followed by a bare CR or LF: the dot was a
    /// stuffing dot (the line is not "." alone), so it is deleted, but the
    /// line is no longer a candidate terminator.
    fn flush_held_dot(&mut self) {
        self.only_dot = false;
        self.line_start = false;
    }

    /// The worst problem of the message, if any.
    pub(crate) fn problem(&self) -> Option<DataProblem> {
        if self.bare {
            Some(DataProblem::BareCrOrLf)
        } else if self.long_line {
            Some(DataProblem::LineTooLong)
        } else if self.size > self.max_size {
            Some(DataProblem::TooBig)
        } else {
            None
        }
    }

    /// Octets of the message so far (counted past the size limit too).
    pub(crate) fn size(&self) -> usize {
        self.size
    }

    /// The SHA-256 of the message data.
    pub(crate) fn finish(self) -> [u8; 32] {
        sha2::Digest::finalize(self.digest).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(input: &[u8]) -> (Option<usize>, Vec<u8>, Option<DataProblem>) {
        let mut d = DataDecoder::new(1 << 20, 1000);
        let mut body = Vec::new();
        let r = match d.feed(input, &mut |b| body.extend_from_slice(b)) {
            Feed::Done(n) => Some(n),
            Feed::More => None,
        };
        (r, body, d.problem())
    }

    #[test]
    fn empty_message() {
        assert_eq!(decode(b".\r\n"), (Some(3), vec![], None));
    }

    #[test]
    fn unstuffing() {
        let (n, body, p) = decode(b"a\r\n..b\r\n.\r\n\r\n.\r\nQUIT\r\n");
        assert_eq!(n, Some(11));
        assert_eq!(body, b"a\r\n.b\r\n");
        assert_eq!(p, None);
    }

    #[test]
    fn dot_with_text_is_content() {
        let (n, body, _) = decode(b".x\r\n.\r\n");
        assert_eq!(n, Some(7));
        assert_eq!(body, b"x\r\n");
    }

    #[test]
    fn smuggling_never_ends() {
        for input in [
            &b"a\n.\nMAIL FROM:<x@y>\r\n"[..],
            b"a\n.\r\nMAIL FROM:<x@y>\r\n",
            b"a\r.\r\nMAIL FROM:<x@y>\r\n",
            b"a\r\n.\n",
            b"a\r\n.\r.\r\n",
            b"a\r\n.\rx\r\n",
        ] {
            let (n, _, p) = decode(input);
            assert_eq!(n, None, "{:?}", String::from_utf8_lossy(input));
            assert_eq!(p, Some(DataProblem::BareCrOrLf));
        }
    }

    #[test]
    fn resumable_at_every_byte() {
        let input = b"x\r\n..y\r\n.\r\n\r\n.z\r\n\r\n.\r\nNOOP\r\n";
        let whole = decode(input);
        for split in 0..input.len() {
            let mut d = DataDecoder::new(1 << 20, 1000);
            let mut done = None;
            let mut body = Vec::new();
            let mut sink = |b: &[u8]| body.extend_from_slice(b);
            match d.feed(&input[..split], &mut sink) {
                Feed::Done(n) => done = Some(n),
                Feed::More => {
                    if let Feed::Done(n) = d.feed(&input[split..], &mut sink) {
                        done = Some(split + n);
                    }
                }
            }
            assert_eq!(done, whole.0);
            let digest = d.finish();
            assert_eq!(body, whole.1);
            // Hashed as it arrived, in whatever pieces: the body's SHA-256.
            assert_eq!(
                digest,
                <[u8; 32]>::from(sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(&body)))
            );
        }
    }

    #[test]
    fn limits() {
        let mut d = DataDecoder::new(4, 1000);
        let mut passed = 0;
        assert_eq!(d.feed(b"hello world\r\n.\r\n", &mut |b| passed += b.len()), Feed::Done(16));
        assert_eq!(d.problem(), Some(DataProblem::TooBig));
        assert_eq!(passed, 4, "nothing past the limit is passed on");
        assert_eq!(d.size(), 13);
        let mut d = DataDecoder::new(100, 4);
        assert_eq!(d.feed(b"hello\r\n.\r\n", &mut |_| ()), Feed::Done(10));
        assert_eq!(d.problem(), Some(DataProblem::LineTooLong));
    }
}
