//! The reaper: a small process that removes this node's floating addresses
//! the moment `hamail serve` dies.
//!
//! The kernel lifetime of a floating address (see `ip`) removes it a second
//! or two after its holder stopped renewing it — by then another node has
//! taken the address over, and both answer ARP for it meanwhile. The reaper
//! closes that gap for the commonest failure, the process's death (SIGKILL,
//! OOM kill, abort, panic): it is a child process (`hamail reaper`, started
//! at the first floating address) that reads on a pipe which addresses the
//! server holds; the server says `hold` before it adds an address and
//! `release` after it removed one. When the server dies, however it dies,
//! the kernel closes its end of the pipe: the reaper reads end-of-file,
//! removes every address still held at once (well before another node
//! takes it: lease + stop budget), and exits.
//!
//! What it does not cover: a hung server (the pipe stays open: the
//! address lifetime covers that), a dead reaper (same), a hung kernel
//! (nothing here does). It ignores SIGINT, SIGTERM and SIGHUP: a terminal's
//! Ctrl-C or a service manager's stop reaches the server, which stops its
//! groups itself and then exits, which ends the reaper.
//!
//! The protocol: one line per change, fields separated by a tab —
//! `hold\tRESOURCE\tADDRESS/PREFIX\tINTERFACE` or `release\t...` (same
//! fields). Writes of a line are atomic (well below PIPE_BUF).

use std::collections::BTreeSet;
use std::io::{BufRead, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;

/// An address the server holds: (resource, address with prefix, interface).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct HeldAddress {
    pub resource: String,
    pub address: String,
    pub interface: String,
}

impl HeldAddress {
    fn line(&self, verb: &str) -> Option<String> {
        let fields = [&self.resource, &self.address, &self.interface];
        // Names with a tab or a line end cannot be said on the pipe (they
        // are not valid interface names or addresses either).
        if fields.iter().any(|f| f.is_empty() || f.contains(['\t', '\n', '\r'])) {
            return None;
        }
        Some(format!("{verb}\t{}\t{}\t{}\n", self.resource, self.address, self.interface))
    }
}

/// The reaper's view: what the server holds, from the lines it sent.
#[derive(Debug, Default)]
pub(crate) struct Holdings {
    held: BTreeSet<HeldAddress>,
}

impl Holdings {
    /// Applies one line of the protocol.
    pub(crate) fn apply(&mut self, line: &str) -> Result<(), String> {
        let fields: Vec<&str> = line.trim_end_matches(['\n', '\r']).split('\t').collect();
        let [verb, resource, address, interface] = fields[..] else {
            return Err(format!("malformed line {line:?}"));
        };
        let held = HeldAddress {
            resource: resource.to_string(),
            address: address.to_string(),
            interface: interface.to_string(),
        };
        match verb {
            "hold" => {
                self.held.insert(held);
            }
            "release" => {
                self.held.remove(&held);
            }
            other => return Err(format!("unknown verb {other:?}")),
        }
        Ok(())
    }

    pub(crate) fn into_held(self) -> Vec<HeldAddress> {
        self.held.into_iter().collect()
    }
}

/// The server's end: starts the reaper when first needed and tells it
/// what is held. Failures are logged, never fatal: the address lifetime
/// still removes a dead server's addresses, only later.
#[derive(Default)]
pub(crate) struct Reaper {
    child: Mutex<Option<(Child, ChildStdin)>>,
}

impl Reaper {
    /// Before adding `held`'s address.
    pub(crate) fn hold(&self, held: &HeldAddress) {
        self.say(held, "hold");
    }

    /// After `held`'s address was removed.
    pub(crate) fn release(&self, held: &HeldAddress) {
        self.say(held, "release");
    }

    fn say(&self, held: &HeldAddress, verb: &str) {
        let Some(line) = held.line(verb) else {
            tracing::warn!(resource = %held.resource, "the reaper cannot be told about this address");
            return;
        };
        let mut child = self.child.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // A reaper that has exited (killed by someone) is started again.
        if let Some((process, _)) = child.as_mut() {
            if !matches!(process.try_wait(), Ok(None)) {
                tracing::warn!("the address reaper had exited: starting it again");
                *child = None;
            }
        }
        if child.is_none() {
            if verb == "release" {
                return;
            }
            match spawn() {
                Ok(c) => *child = Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the address reaper: a killed server's addresses expire only with their lifetime");
                    return;
                }
            }
        }
        if let Some((_, stdin)) = child.as_mut() {
            if let Err(e) = stdin.write_all(line.as_bytes()).and_then(|()| stdin.flush()) {
                tracing::warn!(error = %e, "cannot tell the address reaper");
                *child = None;
            }
        }
    }
}

impl Drop for Reaper {
    /// The server ends normally: closing the pipe ends the reaper (with
    /// nothing left to remove, the groups having been stopped).
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some((mut process, stdin)) = child {
            drop(stdin);
            let _ = process.wait();
        }
    }
}

fn spawn() -> std::io::Result<(Child, ChildStdin)> {
    let exe = std::env::current_exe()?;
    // Only the pipe and stderr (the server's log) are inherited: every
    // other descriptor of the server (listeners, the store) is close-on-exec,
    // so the reaper holds none of them.
    let mut child = Command::new(exe).arg("reaper").stdin(Stdio::piped()).stdout(Stdio::null()).spawn()?;
    let stdin = child.stdin.take().ok_or_else(|| std::io::Error::other("no pipe to the reaper"))?;
    Ok((child, stdin))
}

/// `hamail reaper`: reads the server's lines until end-of-file, then
/// removes every address still held. Returns how many it removed.
pub fn run(input: impl BufRead) -> usize {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: signal(2) only sets this process's disposition.
        unsafe {
            libc::signal(signal, libc::SIG_IGN);
        }
    }
    reap(input)
}

/// [`run`] without the signal dispositions.
fn reap(input: impl BufRead) -> usize {
    let mut holdings = Holdings::default();
    for line in input.lines() {
        let Ok(line) = line else { break };
        if let Err(e) = holdings.apply(&line) {
            tracing::warn!("address reaper: {e}");
        }
    }
    let held = holdings.into_held();
    if held.is_empty() {
        return 0;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "address reaper: no runtime: the addresses expire with their lifetime");
            return 0;
        }
    };
    let mut removed = 0;
    for h in held {
        match runtime.block_on(super::ip::floating_stop(&h.resource, &h.address, &h.interface)) {
            Ok(()) => {
                removed += 1;
                tracing::warn!(resource = %h.resource, address = %h.address, interface = %h.interface, "the server died: floating address removed by the reaper");
            }
            Err(e) => tracing::error!(resource = %h.resource, address = %h.address, "address reaper: {e}"),
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(address: &str) -> HeldAddress {
        HeldAddress { resource: "vip".into(), address: address.into(), interface: "eth0".into() }
    }

    #[test]
    fn hold_and_release_lines_round_trip() {
        let mut h = Holdings::default();
        for line in [
            held("198.18.0.100/24").line("hold").unwrap(),
            held("198.18.0.101/24").line("hold").unwrap(),
            held("198.18.0.100/24").line("release").unwrap(),
            held("198.18.0.101/24").line("hold").unwrap(),
        ] {
            h.apply(&line).unwrap();
        }
        assert_eq!(h.into_held(), vec![held("198.18.0.101/24")]);
    }

    #[test]
    fn a_release_of_what_is_not_held_changes_nothing() {
        let mut h = Holdings::default();
        h.apply(&held("198.18.0.100/24").line("release").unwrap()).unwrap();
        assert!(h.into_held().is_empty());
    }

    #[test]
    fn malformed_lines_are_errors_and_change_nothing() {
        let mut h = Holdings::default();
        for bad in ["", "hold", "hold\tvip\t198.18.0.100/24", "grab\tvip\t198.18.0.100/24\teth0", "hold vip a b"] {
            assert!(h.apply(bad).is_err(), "{bad:?}");
        }
        assert!(h.into_held().is_empty());
    }

    #[test]
    fn names_that_cannot_be_said_are_refused() {
        let mut bad = held("198.18.0.100/24");
        bad.interface = "eth\t0".into();
        assert_eq!(bad.line("hold"), None);
        bad.interface = String::new();
        assert_eq!(bad.line("hold"), None);
    }
}
