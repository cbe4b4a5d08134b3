//! Failover groups with real processes on loopback: a group with a
//! loopback address, the mail listeners and a start/stop script runs on its
//! home node, moves by command, and fails over when its owner is SIGKILLed;
//! the scripts get the seed's variables; events reach the cluster log.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::cluster::*;
use common::*;
use serde_json::Value;

/// The group's address: every node listens on its own 127.0.0.(10+i), the
/// group's listeners on this one, same port everywhere.
const GROUP_IP: &str = "127.0.0.77";

fn node_with_ports(root: &Path, i: usize, smtp: u16, pop3: u16) -> Node {
    let name = format!("node{i}");
    let dir = root.join(&name);
    std::fs::create_dir_all(&dir).unwrap();
    let ip = format!("127.0.0.{}", 10 + i);
    let text = format!(
        "[server]\nhostname = \"{name}\"\ndata_dir = \"{}\"\nauth_failure_delay_ms = 200\n\n\
         [smtp]\nlisten = [\"{ip}:{smtp}\"]\nsubmission = []\n\n[pop3]\nlisten = [\"{ip}:{pop3}\"]\n\n\
         [cluster]\nlisten = \"{ip}:{}\"\n",
        dir.join("data").display(),
        free_port()
    );
    std::fs::write(dir.join("hamail.toml"), text).unwrap();
    let server = Some(start_in(&dir, ""));
    Node { dir, server }
}

fn group_file(root: &Path) -> PathBuf {
    let script = root.join("record.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\necho \"$1 $(hostname) CLP_EVENT=$CLP_EVENT CLP_SERVER=$CLP_SERVER CLP_DISK=$CLP_DISK \
         CLP_GROUPNAME=$CLP_GROUPNAME CLP_RESOURCENAME=$CLP_RESOURCENAME ARMS_EVENT=$ARMS_EVENT \
         ARMS_SERVER=$ARMS_SERVER\" >> \"$RECORD\"\necho script-said-$1\narmlog armlog-said-$1 \"$HAMAIL_CONFIG\"\n",
    )
    .unwrap();
    let record = root.join("record.txt");
    let file = root.join("groups.toml");
    std::fs::write(
        &file,
        format!(
            // failback and max_restarts left to their defaults: manual, 1.
            "[[group]]\nname = \"mail\"\nnodes = [1, 2, 3]\n\n\
             [[group.resources]]\ntype = \"loopback_ip\"\nname = \"vip\"\naddress = \"{GROUP_IP}\"\n\n\
             [[group.resources]]\ntype = \"exec\"\nname = \"script\"\n\
             start = \"RECORD={r} sh {s} start\"\nstop = \"RECORD={r} sh {s} stop\"\ntimeout_secs = 2\n\n\
             [[group.resources]]\ntype = \"mail_service\"\nname = \"mail\"\n",
            r = record.display(),
            s = script.display()
        ),
    )
    .unwrap();
    file
}

fn owner(n: &Node) -> Option<(u64, String)> {
    let (ok, out) = n.cli(&["group", "status", "--json"], "");
    if !ok {
        return None;
    }
    let v: Value = serde_json::from_str(&out).ok()?;
    let g = v.as_array()?.iter().find(|g| g["spec"]["name"] == "mail")?.clone();
    Some((g["placement"]["owner"].as_u64()?, g["placement"]["state"].as_str()?.to_string()))
}

fn greeting_from(port: u16) -> Option<String> {
    let s =
        std::net::TcpStream::connect_timeout(&format!("{GROUP_IP}:{port}").parse().ok()?, Duration::from_millis(300))
            .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut r = std::io::BufReader::new(s);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut r, &mut line).ok()?;
    line.starts_with("220 ").then(|| line.split_whitespace().nth(1).unwrap_or("").to_string())
}

#[test]
fn a_group_runs_at_home_moves_by_command_and_fails_over_on_sigkill() {
    let root = tempfile::tempdir().unwrap();
    let (smtp, pop3) = (free_port(), free_port());
    let mut nodes: Vec<Node> = (1..=3).map(|i| node_with_ports(root.path(), i, smtp, pop3)).collect();
    let (ok, out) = nodes[0].cli(&["cluster", "init"], "");
    assert!(ok, "{out}");
    let token = out.split_whitespace().find(|w| w.starts_with("hamail1-")).unwrap().to_string();
    for n in &nodes[1..] {
        assert!(n.cli(&["cluster", "join", &token], "").0);
    }
    let file = group_file(root.path());
    let (ok, out) = nodes[1].cli(&["group", "apply", file.to_str().unwrap()], "");
    assert!(ok, "{out}");

    // Home is node 1: the group's address greets as node1.
    let host = eventually(Duration::from_secs(30), "the group online at home", || {
        greeting_from(smtp).filter(|h| h == "node1")
    });
    assert_eq!(host, "node1");
    // Online is committed once the last resource started (its listeners
    // greet a moment before).
    eventually(Duration::from_secs(30), "the group online on node 1 as node 3 sees it", || {
        (owner(&nodes[2])? == (1, "Online".to_string())).then_some(())
    });
    // POP3 through the group address also says which node answers.
    let mut pop = Line::connect(format!("{GROUP_IP}:{pop3}").parse().unwrap());
    assert_eq!(pop.line(), "+OK node1 hamail POP3 ready");

    // Switchover by command.
    let (ok, out) = nodes[2].cli(&["group", "move", "mail", "3"], "");
    assert!(ok, "{out}");
    eventually(Duration::from_secs(30), "the group online on node 3", || greeting_from(smtp).filter(|h| h == "node3"));

    // Power cut of the owner: the next live node in the list takes over.
    nodes[2].kill9();
    let t0 = std::time::Instant::now();
    let host = eventually(Duration::from_secs(30), "failover", || greeting_from(smtp).filter(|h| h != "node3"));
    eprintln!("failover to {host} after {:?}", t0.elapsed());
    assert_eq!(host, "node1", "after node 3, the list wraps to node 1");

    let record = std::fs::read_to_string(root.path().join("record.txt")).unwrap();
    assert!(
        // No disk in this group: no CLP_DISK.
        record.contains("CLP_EVENT=START CLP_SERVER=HOME CLP_DISK= CLP_GROUPNAME=mail CLP_RESOURCENAME=script ARMS_EVENT=START ARMS_SERVER=HOME"),
        "{record}"
    );
    assert!(
        record.contains("CLP_EVENT=START CLP_SERVER=OTHER"),
        "the move starts it as START on another node: {record}"
    );
    assert!(record.contains("stop"), "{record}");
    assert!(record.contains("CLP_EVENT=FAILOVER CLP_SERVER=HOME"), "the takeover on node 1 is a FAILOVER: {record}");

    // The cluster log, from any node, has the script output and the moves.
    let (ok, out) = nodes[1].cli(&["log", "-n", "200"], "");
    assert!(ok, "{out}");
    assert!(out.contains("script-said-start"), "{out}");
    // `armlog`, as the original scripts call it, reaches the cluster log,
    // and the script knows the server's configuration.
    let config = nodes[0].config().display().to_string();
    assert!(out.contains(&format!("armlog-said-start {config}")), "{out}");
    let (ok, _) = nodes[1].cli(&["log", "write", "operator", "note"], "");
    assert!(ok);
    let (_, out) = nodes[0].cli(&["log", "-n", "5"], "");
    assert!(out.contains("operator note"), "{out}");

    // Node 3 returns while the group runs on node 1: its start script is
    // told so (RECOVER, as the original product did), and nothing moves.
    nodes[2].restart();
    let record = root.path().join("record.txt");
    eventually(Duration::from_secs(30), "the RECOVER notice on the returning node", || {
        let text = std::fs::read_to_string(&record).ok()?;
        text.contains("CLP_EVENT=RECOVER CLP_SERVER=OTHER").then_some(())
    });
    assert_eq!(greeting_from(smtp).as_deref(), Some("node1"));
    assert_eq!(owner(&nodes[1]).unwrap(), (1, "Online".to_string()));
}

/// A group's shared disk is mounted in hamail's own mount namespace: the
/// host does not see it, and a SIGKILLed hamail leaves it mounted nowhere
/// (without a restart), so that another node may take it.
#[test]
fn a_killed_owner_leaves_no_mount_behind() {
    if !common::netns::root_or_skip("a_killed_owner_leaves_no_mount_behind") {
        return;
    }
    // Declared before the node: dropped after its process.
    let Some(disk) = common::disk::LoopDisk::new(32) else { return };
    let root = tempfile::tempdir().unwrap();
    let mut node = node_with_ports(root.path(), 1, free_port(), free_port());
    let (ok, out) = node.cli(&["cluster", "init"], "");
    assert!(ok, "{out}");
    let spool = root.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let file = root.path().join("groups.toml");
    std::fs::write(
        &file,
        format!(
            "[[group]]\nname = \"disk\"\nnodes = [1]\nfailback = \"manual\"\nmax_restarts = 1\n\n\
             [[group.resources]]\ntype = \"disk\"\nname = \"spool\"\ndevice = \"{}\"\nmount_point = \"{}\"\nfs_type = \"ext4\"\n",
            disk.device,
            spool.display()
        ),
    )
    .unwrap();
    let (ok, out) = node.cli(&["group", "apply", file.to_str().unwrap()], "");
    assert!(ok, "{out}");

    let pid = node.s().child.as_ref().map(|c| c.id()).expect("hamail's pid");
    eventually(Duration::from_secs(30), "the disk mounted by hamail", || {
        common::disk::mounted_in(pid, &spool).then_some(())
    });
    assert!(!common::disk::mounted_in(std::process::id(), &spool), "the group's mount shows on the host");
    // The kernel keeps /proc/fs/ext4/<device> while the filesystem is
    // mounted anywhere.
    let device = std::path::Path::new(&disk.device).file_name().unwrap().to_string_lossy().to_string();
    let in_use = std::path::PathBuf::from(format!("/proc/fs/ext4/{device}"));
    assert!(in_use.exists(), "{} while mounted", in_use.display());

    node.kill9();
    let killed = std::time::Instant::now();
    eventually(Duration::from_secs(10), "the filesystem released after hamail was killed", || {
        (!in_use.exists()).then_some(())
    });
    eprintln!("shared disk released {:?} after SIGKILL of its owner", killed.elapsed());
}

/// The state of group `name` as node `n` sees it.
fn state_of(n: &Node, name: &str) -> Option<String> {
    let (ok, out) = n.cli(&["group", "status", "--json"], "");
    if !ok {
        return None;
    }
    let v: Value = serde_json::from_str(&out).ok()?;
    let g = v.as_array()?.iter().find(|g| g["spec"]["name"] == name)?.clone();
    Some(g["placement"]["state"].as_str()?.to_string())
}

/// A stop script that outlives the group's stop budget: `group apply`
/// warns of it, the timed-out stop names the budget, the group is
/// StopFailed; a longer budget can be applied while it is, `group clear`
/// (after the operator checked) makes it offline, and it starts again.
#[test]
fn a_timed_out_stop_is_named_and_cleared_by_the_operator() {
    let root = tempfile::tempdir().unwrap();
    let node = node_with_ports(root.path(), 1, free_port(), free_port());
    let (ok, out) = node.cli(&["cluster", "init"], "");
    assert!(ok, "{out}");
    let file = root.path().join("slow.toml");
    let write = |budget_ms: u64| {
        std::fs::write(
            &file,
            format!(
                "[[group]]\nname = \"slow\"\nnodes = [1]\nstop_timeout_ms = {budget_ms}\n\n\
                 [[group.resources]]\ntype = \"exec\"\nname = \"script\"\nstart = \"true\"\nstop = \"sleep 30\"\n\
                 timeout_secs = 30\n"
            ),
        )
        .unwrap();
    };
    write(500);
    let (ok, out) = node.cli(&["group", "apply", file.to_str().unwrap()], "");
    assert!(ok, "{out}");
    assert!(out.contains("warning") && out.contains("stop_timeout_ms = 500"), "{out}");

    // An address started before the group's disk is warned of too (the
    // group lists a node that does not exist: it never starts).
    let early = root.path().join("early.toml");
    std::fs::write(
        &early,
        "[[group]]\nname = \"early\"\nnodes = [9]\n\n\
         [[group.resources]]\ntype = \"floating_ip\"\nname = \"vip\"\naddress = \"198.18.0.100/24\"\ninterface = \"eth9\"\n\n\
         [[group.resources]]\ntype = \"disk\"\nname = \"spool\"\ndevice = \"/dev/null\"\nmount_point = \"/nonexistent\"\n\
         fs_type = \"ext4\"\n",
    )
    .unwrap();
    let (ok, out) = node.cli(&["group", "apply", early.to_str().unwrap()], "");
    assert!(ok && out.contains("starts its floating address before its disk"), "{out}");
    let (ok, out) = node.cli(&["group", "del", "early"], "");
    assert!(ok, "{out}");
    eventually(Duration::from_secs(30), "online", || (state_of(&node, "slow")? == "Online").then_some(()));
    let (ok, out) = node.cli(&["group", "clear", "slow"], "");
    assert!(!ok && out.contains("only a group whose stop failed"), "{out}");

    let (ok, out) = node.cli(&["group", "stop", "slow"], "");
    assert!(ok, "{out}");
    eventually(Duration::from_secs(30), "StopFailed", || (state_of(&node, "slow")? == "StopFailed").then_some(()));
    let (_, log) = node.cli(&["log", "-n", "50"], "");
    assert!(log.contains("stop budget of 500 ms"), "{log}");

    // A longer budget is taken while the group is in that state; a shorter
    // one would not be.
    write(40_000);
    let (ok, out) = node.cli(&["group", "apply", file.to_str().unwrap()], "");
    assert!(ok, "{out}");
    write(400);
    let (ok, out) = node.cli(&["group", "apply", file.to_str().unwrap()], "");
    assert!(!ok && out.contains("shortening a timeout"), "{out}");

    let (ok, out) = node.cli(&["group", "clear", "slow"], "");
    assert!(ok, "{out}");
    assert_eq!(state_of(&node, "slow").as_deref(), Some("Offline"));
    let (ok, out) = node.cli(&["group", "start", "slow"], "");
    assert!(ok, "{out}");
    eventually(Duration::from_secs(30), "online again", || (state_of(&node, "slow")? == "Online").then_some(()));
}
