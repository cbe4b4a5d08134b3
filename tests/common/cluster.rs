//! A cluster of real `hamail` processes on loopback, for the tests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::*;

pub struct Node {
    pub dir: PathBuf,
    pub server: Option<Server>,
}

impl Node {
    pub fn new(root: &Path, name: &str, role: &str) -> Node {
        Node::with(root, name, role, "")
    }
    /// A node whose `[server]` section also has `server_extra`.
    pub fn with(root: &Path, name: &str, role: &str, server_extra: &str) -> Node {
        let dir = root.join(name);
        write_node_config(&dir, name, free_port(), role);
        let config = dir.join("hamail.toml");
        let text = std::fs::read_to_string(&config).expect("config");
        std::fs::write(&config, text.replacen("[server]\n", &format!("[server]\n{server_extra}\n"), 1))
            .expect("config");
        let server = Some(start_in(&dir, ""));
        Node { dir, server }
    }
    pub fn s(&self) -> &Server {
        self.server.as_ref().expect("node is running")
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("hamail.toml")
    }
    pub fn cli(&self, args: &[&str], stdin: &str) -> (bool, String) {
        cli(&self.config(), args, stdin)
    }
    pub fn kill9(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.kill9();
        }
    }
    pub fn restart(&mut self) {
        assert!(self.server.is_none());
        self.server = Some(start_in(&self.dir, ""));
    }
    pub fn status(&self) -> Option<Vec<Value>> {
        let (ok, out) = self.cli(&["cluster", "status", "--json"], "");
        if !ok {
            return None;
        }
        serde_json::from_str::<Value>(&out).ok()?.as_array().cloned()
    }
    /// The leader as this node sees it, when every listed member agrees.
    pub fn leader(&self) -> Option<u64> {
        let st = self.status()?;
        let me = st.iter().find(|m| m["state"] == "leader")?;
        me["id"].as_u64()
    }
}

pub fn pop3_login(s: &Server, user: &str, pass: &str) -> bool {
    let mut c = Line::connect(s.pop3);
    c.line();
    c.send(&format!("USER {user}\r\nPASS {pass}\r\n"));
    c.line();
    let ok = c.line().starts_with("+OK");
    c.send("QUIT\r\n");
    ok
}

/// Node 1 inits (with a user it already had), the others join.
pub fn form(root: &Path, roles: &[&str]) -> Vec<Node> {
    form_with(root, roles, "")
}

/// [`form`] with `server_extra` in every node's `[server]` section.
pub fn form_with(root: &Path, roles: &[&str], server_extra: &str) -> Vec<Node> {
    let mut nodes = Vec::new();
    for (i, role) in roles.iter().enumerate() {
        nodes.push(Node::with(root, &format!("node{}", i + 1), role, server_extra));
    }
    let n1 = &nodes[0];
    assert!(n1.cli(&["domain", "add", "example.org"], "").0);
    let (ok, out) = n1.cli(&["user", "add", "alice@example.org"], "alice-pw\n");
    assert!(ok, "{out}");
    let (ok, out) = n1.cli(&["cluster", "init"], "");
    assert!(ok, "cluster init: {out}");
    let token = out.split_whitespace().find(|w| w.starts_with("hamail1-")).expect("token").to_string();
    for n in &nodes[1..] {
        let (ok, out) = n.cli(&["cluster", "join", &token], "");
        assert!(ok, "join: {out}");
    }
    let mut last = None;
    let formed = poll(Duration::from_secs(30), || {
        let st = nodes[0].status();
        last = st.clone();
        let st = st?;
        (st.len() == roles.len() && st.iter().all(|m| m["healthy"] == true && m["lag"] == 0)).then_some(())
    });
    if formed.is_none() {
        let logs: Vec<String> = nodes.iter().map(|n| n.s().log()).collect();
        panic!("the cluster did not form; last status: {last:#?}\nlogs:\n{}", logs.join("\n=====\n"));
    }
    nodes
}
