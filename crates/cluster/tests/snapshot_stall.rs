//! Benchmark, not part of the test run (prints figures): how long building
//! and installing a snapshot of a large state holds up the other tasks of
//! a one-worker runtime (the worst case of the heartbeat tasks sharing a
//! worker with the snapshot). A ticker task asks for a wake-up every
//! millisecond; its largest lateness during the build, and during the
//! install on a second node, is the stall.
//!
//! `cargo test -p hamail-cluster --release --test snapshot_stall -- --ignored --nocapture`
//! (`HAMAIL_BENCH_MESSAGES`, default 100,000 message records).

use std::io::Cursor;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hamail_cluster::state_machine::StateMachine;
use hamail_store::{Address, BodyHash, LocalStore, MailChange, QueueId, StateChange, StoreOptions};
use openraft::storage::RaftStateMachine;
use openraft::RaftSnapshotBuilder;

fn open(dir: &std::path::Path) -> Arc<LocalStore> {
    LocalStore::open(&dir.join("store"), StoreOptions { fsync: false, ..StoreOptions::default() }).expect("store")
}

/// Runs `work` while a ticker measures its own largest lateness; returns
/// that lateness and the time `work` took.
async fn stall_of<T>(work: impl std::future::Future<Output = T>) -> (Duration, Duration, T) {
    let stop = Arc::new(AtomicBool::new(false));
    let ticker = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut worst = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let asked = Instant::now();
                tokio::time::sleep(Duration::from_millis(1)).await;
                worst = worst.max(asked.elapsed().saturating_sub(Duration::from_millis(1)));
            }
            worst
        }
    });
    tokio::task::yield_now().await;
    let t0 = Instant::now();
    let out = work.await;
    let took = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    (ticker.await.expect("ticker"), took, out)
}

#[test]
#[ignore]
fn snapshot_stall_benchmark() {
    let messages: u64 = std::env::var("HAMAIL_BENCH_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    rt.block_on(async {
        let (dir, dir2) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
        let from = open(dir.path());
        for batch in 0..messages.div_ceil(1000) {
            let changes = (batch * 1000..((batch + 1) * 1000).min(messages))
                .map(|i| {
                    StateChange::Mail(MailChange::Accept {
                        queue_id: QueueId(i + 1),
                        return_path: None,
                        local: vec![Address::parse(&format!("u{}@a.test", i % 500)).expect("address")],
                        remote: vec![],
                        body: BodyHash::of(&i.to_le_bytes()),
                        size: 1000,
                        at: 1_700_000_000,
                        resend: None,
                    })
                })
                .collect();
            from.apply_state(changes, None).await.expect("apply");
        }
        let mut sm = StateMachine::open(from, dir.path()).await.expect("state machine");
        let mut builder = sm.get_snapshot_builder().await;
        let (stall, took, snap) = stall_of(builder.build_snapshot()).await;
        let snap = snap.expect("snapshot");
        let data = snap.snapshot.into_inner();
        eprintln!(
            "{messages} message records, snapshot {} bytes: build took {took:?}, worst stall of the other tasks {stall:?}",
            data.len()
        );
        let mut sm2 = StateMachine::open(open(dir2.path()), dir2.path()).await.expect("state machine");
        let (stall, took, done) = stall_of(sm2.install_snapshot(&snap.meta, Box::new(Cursor::new(data)))).await;
        done.expect("install");
        eprintln!("install took {took:?}, worst stall of the other tasks {stall:?}");
        let (stall, took, current) = stall_of(sm.get_current_snapshot()).await;
        assert!(current.expect("current snapshot").is_some());
        eprintln!("handing the current snapshot to openraft took {took:?}, worst stall {stall:?}");
    });
}
