//! What the resource tests share: a running server to drive resources
//! with, and a `Driver` whose script output is captured.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use hamail_server::resources::{Driver, LogSink};
use hamail_store::{LocalStore, StoreOptions};

pub struct Node {
    pub running: hamail_server::Running,
    _dir: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.running.stop();
    }
}

/// A server named `hostname` (also its name as a disk lease holder) on
/// 127.0.0.1 with port-0 listeners, so a group's listeners on another
/// address get ports of their own.
pub async fn node(hostname: &str) -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!(
        "[server]\nhostname = \"{hostname}\"\ndata_dir = \"{}\"\n\n\
         [smtp]\nlisten = [\"127.0.0.1:0\"]\nsubmission = [\"127.0.0.1:0\"]\nsubmissions = [\"127.0.0.1:0\"]\n\n\
         [pop3]\nlisten = [\"127.0.0.1:0\"]\npop3s = [\"127.0.0.1:0\"]\n",
        dir.path().join("data").display()
    );
    let config = hamail_server::Config::parse(&text, "test.toml").expect("config");
    let local = LocalStore::open(&config.store_dir(), StoreOptions::default()).expect("store");
    let running = hamail_server::start(config, local).await.expect("server start");
    Node { running, _dir: dir }
}

/// Script output lines: (resource, line).
pub type Lines = Arc<Mutex<Vec<(String, String)>>>;

pub fn driver(node: &Node) -> (Driver, Lines) {
    let lines: Lines = Arc::default();
    let sink = lines.clone();
    let log: LogSink = Arc::new(move |resource, line| sink.lock().unwrap().push((resource, line)));
    (Driver::new(&node.running.context, log), lines)
}
