//! Result lines, the final table and the Postfix / Dovecot reference figures.

use std::fmt::Write as _;

use crate::procfs::Usage;

/// Reference msgs/s measured on the same kind of 2-core machine with the
/// same method (../shared/peers/RESULTS.md): (peer, msgs/s).
pub fn reference(test: &str, size: usize, conc: usize, reuse: bool) -> Option<(&'static str, f64)> {
    match (test, size, conc, reuse) {
        ("smtp", 1024, 1, false) => Some(("postfix", 350.0)),
        ("smtp", 1024, 10, false) => Some(("postfix", 640.0)),
        ("smtp", 102_400, 10, false) => Some(("postfix", 500.0)),
        ("smtp", 1_048_576, 10, false) => Some(("postfix", 137.0)),
        // smtp-source -d (one connection for many messages)
        ("smtp", 1024, 10, true) => Some(("postfix -d", 787.0)),
        ("pop3", 1024, 10, _) => Some(("dovecot", 2650.0)),
        _ => None,
    }
}

/// "1 KiB", "100 KiB", "1 MiB", "1500 B".
pub fn size_label(size: usize) -> String {
    if size >= 1 << 20 && size.is_multiple_of(1 << 20) {
        format!("{} MiB", size >> 20)
    } else if size >= 1024 && size.is_multiple_of(1024) {
        format!("{} KiB", size >> 10)
    } else {
        format!("{size} B")
    }
}

/// What a cell's line is compared with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Compare {
    /// The static reference figures (no peer measured in this run).
    Static,
    /// A peer measured in this run: (peer, its msgs/s).
    Peer(&'static str, f64),
    /// Nothing (the peer's own lines).
    Nothing,
}

/// One measured cell.
pub struct Cell {
    pub test: &'static str,
    /// "hamail", "postfix" or "dovecot".
    pub server: &'static str,
    pub size: usize,
    pub conc: usize,
    pub reuse: bool,
    pub msgs: u64,
    pub bytes: u64,
    pub secs: f64,
    pub errors: u64,
    pub usage: Usage,
    /// Test-specific key=value pairs, printed after the common ones.
    pub extra: Vec<(&'static str, String)>,
    pub compare: Compare,
}

impl Cell {
    pub fn msgs_per_s(&self) -> f64 {
        self.msgs as f64 / self.secs.max(1e-9)
    }

    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.secs.max(1e-9)
    }

    fn reference(&self) -> Option<(&'static str, f64)> {
        reference(self.test, self.size, self.conc, self.reuse)
    }

    /// The one-line key=value form.
    pub fn line(&self) -> String {
        let u = &self.usage;
        let mut s = format!(
            "test={} server={} size={} conc={} reuse={} msgs={} secs={:.3} msgs_per_s={:.1} mb_per_s={:.2} \
             peak_rss_mb={:.1} hwm_mb={:.1} peak_anon_mb={:.1} peak_file_mb={:.1} peak_pss_mb={:.1} srv_cpu_pct={:.0} srv_cpu_ms_per_msg={:.3} \
             cli_cpu_pct={:.0} sys_busy_pct={:.0} other_cpu_pct={:.0} errors={}",
            self.test,
            self.server,
            self.size,
            self.conc,
            u8::from(self.reuse),
            self.msgs,
            self.secs,
            self.msgs_per_s(),
            self.mb_per_s(),
            u.peak_rss_mb,
            u.hwm_mb,
            u.peak_anon_mb,
            u.peak_file_mb,
            u.peak_pss_mb,
            u.srv_cpu_pct,
            1000.0 * u.srv_cpu_s / self.msgs.max(1) as f64,
            u.cli_cpu_pct,
            u.sys_busy_pct,
            u.other_cpu_pct,
            self.errors,
        );
        if u.procs_peak > 0 {
            let _ = write!(s, " procs_peak={}", u.procs_peak);
        }
        for (k, v) in &self.extra {
            let _ = write!(s, " {k}={v}");
        }
        match (self.compare, self.reference()) {
            (Compare::Static, Some((peer, r))) => {
                let _ = write!(
                    s,
                    " ref={} ref_msgs_per_s={r:.0} ratio={:.2}",
                    peer.replace(' ', ""),
                    self.msgs_per_s() / r
                );
            }
            (Compare::Static, None) => s.push_str(" ref=- ref_msgs_per_s=- ratio=-"),
            (Compare::Peer(peer, r), _) => {
                let _ = write!(s, " peer={peer} peer_msgs_per_s={r:.1} ratio={:.2}", self.msgs_per_s() / r.max(1e-9));
            }
            (Compare::Nothing, _) => {}
        }
        s
    }
}

/// The readable table of all cells.
pub fn table(cells: &[Cell]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<5} {:>8} {:>5} {:>9} {:>9} {:>8} {:>9} {:>8} {:>7} {:>7}  {:<18} {:>6}",
        "test",
        "size",
        "conc",
        "msgs",
        "msgs/s",
        "MB/s",
        "peak RSS",
        "srv CPU",
        "other",
        "errors",
        "reference msgs/s",
        "ratio"
    );
    for c in cells {
        let (reference, ratio) = match c.reference() {
            Some((peer, r)) => (format!("{peer} {r:.0}"), format!("{:.2}", c.msgs_per_s() / r)),
            None => ("-".to_string(), "-".to_string()),
        };
        let test = if c.reuse && c.test == "smtp" { "smtp-d" } else { c.test };
        let _ = writeln!(
            out,
            "{:<5} {:>8} {:>5} {:>9} {:>9.1} {:>8.2} {:>6.1} MB {:>7.0}% {:>6.0}% {:>7}  {:<18} {:>6}",
            test,
            size_label(c.size),
            c.conc,
            c.msgs,
            c.msgs_per_s(),
            c.mb_per_s(),
            c.usage.peak_rss_mb,
            c.usage.srv_cpu_pct,
            c.usage.other_cpu_pct,
            c.errors,
            reference,
            ratio
        );
    }
    out.push_str(
        "MB = 10^6 bytes (SMTP: payload only; POP3: RETR octets). CPU in % of one core; \
         'other' = the rest of the machine's load (noise).\n",
    );
    out
}

/// One cell measured against hamail and a peer in the same run.
pub struct Pair {
    pub hamail: Cell,
    pub peer: Option<Cell>,
    /// Postfix: messages delivered into the maildirs / (time from the
    /// start of the load until the queue was empty).
    pub delivered_per_s: Option<f64>,
    /// Postfix: (landed in the maildirs, accepted).
    pub landed: Option<(u64, u64)>,
}

/// The side-by-side table.
pub fn pair_table(pairs: &[Pair]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<6} {:>8} {:>4} {:>9} {:<7} {:>9} {:>6} {:>9} {:>6} {:>15} {:>9} {:>5} {:>11} {:>6} {:>5}",
        "test",
        "size",
        "conc",
        "hamail/s",
        "peer",
        "peer/s",
        "ratio",
        "deliv/s",
        "ratio",
        "hamail PSS/RSS",
        "peer PSS",
        "procs",
        "landed",
        "errors",
        "other"
    );
    let opt = |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |v| format!("{v:.prec$}"));
    for p in pairs {
        let h = &p.hamail;
        let test = if h.reuse && h.test == "smtp" { "smtp-d" } else { h.test };
        let peer_rate = p.peer.as_ref().map(|c| c.msgs_per_s());
        let ratio = peer_rate.map(|r| h.msgs_per_s() / r.max(1e-9));
        let dratio = p.delivered_per_s.map(|r| h.msgs_per_s() / r.max(1e-9));
        let errors = h.errors + p.peer.as_ref().map_or(0, |c| c.errors);
        let other = p.peer.as_ref().map_or(h.usage.other_cpu_pct, |c| c.usage.other_cpu_pct.max(h.usage.other_cpu_pct));
        let _ = writeln!(
            out,
            "{:<6} {:>8} {:>4} {:>9.1} {:<7} {:>9} {:>6} {:>9} {:>6} {:>15} {:>9} {:>5} {:>11} {:>6} {:>4.0}%",
            test,
            size_label(h.size),
            h.conc,
            h.msgs_per_s(),
            p.peer.as_ref().map_or("-", |c| c.server),
            opt(peer_rate, 1),
            opt(ratio, 2),
            opt(p.delivered_per_s, 1),
            opt(dratio, 2),
            format!("{:.1}/{:.1} MB", h.usage.peak_pss_mb, h.usage.peak_rss_mb),
            p.peer.as_ref().map_or("-".to_string(), |c| format!("{:.1} MB", c.usage.peak_pss_mb)),
            p.peer.as_ref().map_or("-".to_string(), |c| c.usage.procs_peak.to_string()),
            p.landed.map_or("-".to_string(), |(l, a)| format!("{l}/{a}")),
            errors,
            other,
        );
    }
    out.push_str(
        "Measured in one run with the same client. ratio = hamail msgs/s / peer msgs/s (SMTP: messages answered 250; \
         POP3: messages retrieved). deliv/s = Postfix messages in the maildirs / time until its queue was empty, \
         and the ratio next to it compares hamail with that. PSS of the peer = sum over its process tree \
         (master + children; 'procs' = most processes seen). landed = maildir files / messages Postfix accepted. \
         MB = 10^6 bytes; 'other' = the largest load from the rest of the machine in the two runs (% of one core).\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_references() {
        assert_eq!(size_label(1024), "1 KiB");
        assert_eq!(size_label(102_400), "100 KiB");
        assert_eq!(size_label(1_048_576), "1 MiB");
        assert_eq!(size_label(1000), "1000 B");
        assert_eq!(reference("smtp", 1024, 10, false), Some(("postfix", 640.0)));
        assert_eq!(reference("smtp", 1024, 50, false), None);
        assert_eq!(reference("pop3", 1024, 10, false), Some(("dovecot", 2650.0)));
    }

    #[test]
    fn line_has_ratio_or_dash() {
        let mut c = Cell {
            test: "smtp",
            size: 1024,
            conc: 10,
            reuse: false,
            msgs: 1280,
            bytes: 1280 * 1024,
            secs: 1.0,
            errors: 0,
            usage: Usage::default(),
            extra: vec![],
            server: "hamail",
            compare: Compare::Static,
        };
        assert!(c.line().contains(" msgs_per_s=1280.0 "), "{}", c.line());
        assert!(c.line().ends_with("ref=postfix ref_msgs_per_s=640 ratio=2.00"), "{}", c.line());
        c.conc = 50;
        assert!(c.line().ends_with("ratio=-"));
        c.compare = Compare::Peer("postfix", 640.0);
        assert!(c.line().ends_with("peer=postfix peer_msgs_per_s=640.0 ratio=2.00"), "{}", c.line());
        assert!(table(&[c]).contains("1 KiB"));
    }

    #[test]
    fn pair_table_shows_both_servers() {
        let cell = |server, msgs| Cell {
            test: "smtp",
            server,
            size: 1024,
            conc: 10,
            reuse: false,
            msgs,
            bytes: msgs * 1024,
            secs: 2.0,
            errors: 0,
            usage: Usage { peak_pss_mb: 12.5, peak_rss_mb: 14.0, procs_peak: 3, ..Usage::default() },
            extra: vec![],
            compare: Compare::Nothing,
        };
        let pairs = [
            Pair {
                hamail: cell("hamail", 3000),
                peer: Some(cell("postfix", 1000)),
                delivered_per_s: Some(480.0),
                landed: Some((1000, 1000)),
            },
            Pair { hamail: cell("hamail", 100), peer: None, delivered_per_s: None, landed: None },
        ];
        let t = pair_table(&pairs);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[1].contains("postfix") && lines[1].contains(" 3.00 ") && lines[1].contains(" 3.12 "), "{t}");
        assert!(lines[1].contains("1000/1000") && lines[1].contains("12.5/14.0 MB"), "{t}");
        assert!(lines[2].contains(" - "), "{t}");
    }
}
