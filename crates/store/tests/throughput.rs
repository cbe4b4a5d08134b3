//! Group-commit throughput: 10 concurrent callers accepting 1 KB messages
//! with fsync on. Ignored by default (it measures, it does not check much);
//! run with
//! `cargo test -p hamail-store --release --test throughput -- --ignored --nocapture`.

use std::time::Instant;

use hamail_store::*;

#[test]
#[ignore]
fn accept_throughput() {
    let callers = 10;
    let per_caller = 400;
    let dir = tempfile::tempdir_in(std::env::var("HAMAIL_BENCH_DIR").unwrap_or_else(|_| ".".into())).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let store = LocalStore::open(dir.path(), StoreOptions::default()).unwrap();
        let user = Address::parse("bench@x.test").unwrap();
        let start = Instant::now();
        let mut tasks = Vec::new();
        for t in 0..callers {
            let store = store.clone();
            let user = user.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..per_caller {
                    let mut body = format!("Subject: bench {t} {i}\r\n\r\n").into_bytes();
                    body.resize(1024, b'x');
                    let msg = Incoming {
                        return_path: Some("s@far.test".into()),
                        local: vec![user.clone()],
                        remote: vec![],
                        body: body.into(),
                        queue_id: store.next_queue_id().await.unwrap(),
                        resend: None,
                    };
                    store.accept(msg).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        let n = callers * per_caller;
        println!("{n} messages of 1 KB, {callers} callers, fsync on: {:.0} msgs/s", n as f64 / secs);
        assert_eq!(store.mailbox(&user).await.unwrap().len(), n);
    });
}
