//! The operator's start and stop scripts (the seed's EXEC resources).
//!
//! A script is run as `/bin/sh -c <command>` (so it may be a path or a path
//! with arguments) with the environment the seed's scripts expect, under
//! both of its names (`CLP_*` as CLUSTERPRO's, `ARMS_*` as ARMS'):
//!
//! | variable                  | value                                     |
//! |---------------------------|-------------------------------------------|
//! | `CLP_EVENT`/`ARMS_EVENT`  | `START`, `FAILOVER`; a stop script gets the event that started the resource; `RECOVER` to the start script of a node that returns while the group runs elsewhere (take note only) |
//! | `CLP_SERVER`/`ARMS_SERVER`| `HOME` on the group's first node, else `OTHER` |
//! | `CLP_DISK`/`ARMS_DISK`    | `SUCCESS` or `FAILURE` (the group's disk taken over); only for a group with a disk resource |
//! | `CLP_GROUPNAME`/`ARMS_GROUPNAME` | the group                          |
//! | `CLP_RESOURCENAME`/`ARMS_RESOURCENAME` | the resource                 |
//!
//! Besides: `HAMAIL_CONFIG` (the server's configuration, so that `hamail`
//! commands in the script reach it), `HAMAIL` (the binary) and a `PATH`
//! that starts with a directory holding `armlog` (the original scripts'
//! log command: `armlog TEXT` appends TEXT to the cluster log).
//!
//! The script runs in its own process group; when it outlives its timeout
//! the whole group is killed (SIGKILL) and the resource fails. A non-zero
//! exit (or death by a signal) fails it too. Each line of its stdout and
//! stderr goes to the driver's log sink. An empty command does nothing
//! (a resource with only a start or only a stop script); a timeout of 0
//! means no timeout.
//!
//! A script that leaves a background process holding its stdout open (a
//! daemon started without redirecting its output) is not waited for: its
//! output is read for a short while after the script exits, then no more.

use std::process::Stdio;
use std::time::Duration;

use hamail_cluster::groups::{ResourceError, StartContext};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

use super::{run_error, LogSink};

/// How long the output of a finished script is still read (see above).
const DRAIN: Duration = Duration::from_millis(500);

/// The `CLP_*` and `ARMS_*` variables of a run.
pub(crate) fn environment(group: &ScriptGroup<'_>, resource: &str, context: &StartContext) -> Vec<(String, String)> {
    let disk = group.has_disk.then(|| ("DISK", if context.disk_ok { "SUCCESS" } else { "FAILURE" }.to_string()));
    let values = [
        Some(("EVENT", context.event.to_string())),
        Some(("SERVER", if context.home { "HOME" } else { "OTHER" }.to_string())),
        disk,
        Some(("GROUPNAME", group.name.to_string())),
        Some(("RESOURCENAME", resource.to_string())),
    ];
    let mut env = Vec::new();
    for prefix in ["CLP_", "ARMS_"] {
        for (k, v) in values.iter().flatten() {
            env.push((format!("{prefix}{k}"), v.clone()));
        }
    }
    env
}

/// What a script's environment says of its group.
pub(crate) struct ScriptGroup<'a> {
    pub name: &'a str,
    /// It has a disk resource: only then do scripts get `CLP_DISK` /
    /// `ARMS_DISK`, as in the original product.
    pub has_disk: bool,
}

/// Kills the process group unless disarmed (the script was reaped): on
/// timeout, and if the future running the script is dropped.
struct GroupKiller {
    pgid: Option<i32>,
}

impl GroupKiller {
    fn kill(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            // SAFETY: kill(2) on a process group we created.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}

fn forward<R: AsyncRead + Unpin + Send + 'static>(
    log: LogSink,
    resource: String,
    out: R,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = BufReader::new(out).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            log(resource.clone(), line);
        }
    })
}

/// Runs `command` to completion; Ok on exit status 0.
pub(crate) async fn run(
    log: &LogSink,
    path: &std::ffi::OsStr,
    group: &ScriptGroup<'_>,
    resource: &str,
    command: &str,
    context: &StartContext,
    timeout_secs: u64,
) -> Result<(), ResourceError> {
    if command.trim().is_empty() {
        return Ok(());
    }
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(command)
        .envs(environment(group, resource, context))
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills what it started too.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| run_error(resource, format!("cannot run `{command}`: {e}")))?;
    let mut killer = GroupKiller { pgid: child.id().map(|p| p as i32) };
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(forward(log.clone(), resource.to_string(), out));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(forward(log.clone(), resource.to_string(), err));
    }
    let status = if timeout_secs == 0 {
        Some(child.wait().await)
    } else {
        tokio::time::timeout(Duration::from_secs(timeout_secs), child.wait()).await.ok()
    };
    let result = match status {
        None => {
            killer.kill();
            let _ = child.wait().await;
            Err(run_error(
                resource,
                format!("`{command}` did not finish within {timeout_secs} s: killed (its whole process group)"),
            ))
        }
        Some(Err(e)) => Err(run_error(resource, format!("waiting for `{command}`: {e}"))),
        Some(Ok(status)) => {
            // Reaped: its process group may now hold daemons it started on
            // purpose, which must live on.
            killer.pgid = None;
            if status.success() {
                Ok(())
            } else if let Some(code) = status.code() {
                Err(run_error(resource, format!("`{command}` exited with status {code}")))
            } else {
                use std::os::unix::process::ExitStatusExt;
                let signal = status.signal().unwrap_or(0);
                Err(run_error(resource, format!("`{command}` was killed by signal {signal}")))
            }
        }
    };
    let deadline = tokio::time::Instant::now() + DRAIN;
    let mut abandoned = false;
    for r in readers {
        let abort = r.abort_handle();
        if tokio::time::timeout_at(deadline, r).await.is_err() {
            abort.abort();
            abandoned = true;
        }
    }
    if abandoned {
        log(resource.to_string(), "(output still held open by a background process; no longer read)".to_string());
    }
    result
}
