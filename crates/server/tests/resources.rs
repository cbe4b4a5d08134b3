//! The real failover-group resources (`hamail_server::resources::Driver`).
//!
//! Exec and loopback + mail tests run anywhere. The floating address and
//! shared disk tests need root (network namespaces, loop devices, mount):
//! they print why and pass without doing anything otherwise. The namespace
//! test uses only 198.18.0.0/15 (RFC 2544 benchmarking range) inside its
//! own namespaces, with no route out; everything it creates is removed by
//! guards, also when it fails.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hamail_cluster::groups::{Failback, GroupSpec, ResourceDriver, ResourceSpec, StartContext, StartEvent};

mod common;
use common::*;

fn group(name: &str, resources: Vec<ResourceSpec>) -> GroupSpec {
    GroupSpec {
        name: name.into(),
        nodes: vec![1.into(), 2.into()],
        failback: Failback::Manual,
        resources,
        max_restarts: 1,
        stop_timeout_ms: None,
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

// ---------------------------------------------------------------- Exec

/// A script that writes its CLP_/ARMS_ environment to the file named by its
/// first argument, and says something on stdout and stderr.
fn env_script(dir: &Path) -> String {
    let script = dir.join("env.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nenv | grep -E '^(CLP|ARMS)_' | sort > \"$1\"\necho \"hello from $CLP_EVENT\"\necho \"to stderr\" >&2\nexit 0\n",
    )
    .unwrap();
    // Run through sh: no exec bit needed, and no ETXTBSY from a file
    // just written while another test thread forks.
    format!("/bin/sh {}", script.display())
}

fn read_env(path: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

/// `disk`: `None` for a group without a disk (no `*_DISK` variable).
fn expected_env(event: &str, server: &str, disk: Option<&str>) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for p in ["CLP_", "ARMS_"] {
        m.insert(format!("{p}EVENT"), event.to_string());
        m.insert(format!("{p}SERVER"), server.to_string());
        if let Some(disk) = disk {
            m.insert(format!("{p}DISK"), disk.to_string());
        }
        m.insert(format!("{p}GROUPNAME"), "mailgroup".to_string());
        m.insert(format!("{p}RESOURCENAME"), "script".to_string());
    }
    m
}

#[tokio::test]
async fn exec_scripts_get_the_seeds_environment_and_their_output_is_logged() {
    let n = node("mx.test").await;
    let (d, lines) = driver(&n);
    let tmp = tempfile::tempdir().unwrap();
    let script = env_script(tmp.path());
    // The disk of the group is only named (its resource is not started
    // here): a group with a disk gives its scripts *_DISK, one without
    // does not.
    let disk_resource = ResourceSpec::Disk {
        name: "spool".into(),
        device: "/dev/null".into(),
        mount_point: "/nonexistent".into(),
        fs_type: "ext4".into(),
    };
    let cases = [
        (StartEvent::Start, true, true, "START", "HOME", Some("SUCCESS")),
        (StartEvent::Failover, false, true, "FAILOVER", "OTHER", Some("SUCCESS")),
        (StartEvent::Recover, true, false, "RECOVER", "HOME", Some("FAILURE")),
        (StartEvent::Start, true, true, "START", "HOME", None),
    ];
    for (i, (event, home, disk_ok, ev, server, disk)) in cases.into_iter().enumerate() {
        let start_out = tmp.path().join(format!("start-{i}"));
        let stop_out = tmp.path().join(format!("stop-{i}"));
        let r = ResourceSpec::Exec {
            name: "script".into(),
            start: format!("{script} {}", start_out.display()),
            stop: format!("{script} {}", stop_out.display()),
            timeout_secs: 10,
        };
        let resources = if disk.is_some() { vec![disk_resource.clone(), r.clone()] } else { vec![r.clone()] };
        let g = group("mailgroup", resources);
        d.start(&g, &r, &StartContext { event, home, disk_ok }).await.expect("start script");
        d.monitor(&g, &r).await.expect("exec monitor is always ok");
        assert_eq!(read_env(&start_out), expected_env(ev, server, disk), "start, {ev}");
        d.stop(&g, &r, std::time::Duration::from_secs(2)).await.expect("stop script");
        // The stop script gets the event that started the resource.
        assert_eq!(read_env(&stop_out), expected_env(ev, server, disk), "stop, {ev}");
    }
    let lines = lines.lock().unwrap().clone();
    for (ev, runs) in [("START", 2), ("FAILOVER", 1), ("RECOVER", 1)] {
        let n = lines.iter().filter(|(r, l)| r == "script" && *l == format!("hello from {ev}")).count();
        assert_eq!(n, 2 * runs, "start and stop stdout lines for {ev}: {lines:?}");
    }
    assert!(lines.iter().any(|(_, l)| l == "to stderr"), "{lines:?}");
}

#[tokio::test]
async fn exec_failures_are_errors_and_a_timeout_kills_the_whole_process_group() {
    let n = node("mx.test").await;
    let (d, _lines) = driver(&n);
    let tmp = tempfile::tempdir().unwrap();
    let ctx = StartContext { event: StartEvent::Start, home: true, disk_ok: true };

    let r = ResourceSpec::Exec { name: "bad".into(), start: "exit 3".into(), stop: String::new(), timeout_secs: 5 };
    let g = group("g", vec![r.clone()]);
    let e = d.start(&g, &r, &ctx).await.expect_err("non-zero exit");
    assert!(e.message.contains("status 3") && !e.permanent, "{e}");
    d.stop(&g, &r, std::time::Duration::from_secs(2)).await.expect("an empty stop command does nothing");

    // The script starts a grandchild in its group, then hangs: both die.
    let pidfile = tmp.path().join("grandchild.pid");
    let r = ResourceSpec::Exec {
        name: "slow".into(),
        start: format!("sleep 300 & echo $! > {}; sleep 300", pidfile.display()),
        stop: String::new(),
        timeout_secs: 1,
    };
    let g = group("g", vec![r.clone()]);
    let t = Instant::now();
    let e = d.start(&g, &r, &ctx).await.expect_err("timeout");
    assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
    assert!(e.message.contains("did not finish within 1 s"), "{e}");
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // The grandchild is re-parented (to init or a subreaper) and reaped
        // there; until then it may linger as a zombie.
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
        let gone = state
            .as_deref()
            .is_none_or(|s| s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')));
        if gone {
            break;
        }
        assert!(Instant::now() < deadline, "grandchild {pid} survived the timeout: {state:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------- LoopbackIp + MailService

fn greeting(addr: std::net::SocketAddr) -> std::io::Result<String> {
    let tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    tcp.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    BufReader::new(&tcp).read_line(&mut line)?;
    let _ = (&tcp).write_all(b"QUIT\r\n");
    Ok(line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_service_on_a_loopback_address_serves_there_until_stopped() {
    let n = node("mx.test").await;
    let (d, _) = driver(&n);
    let ip = ResourceSpec::LoopbackIp { name: "addr".into(), address: "127.0.0.77".into() };
    let mail = ResourceSpec::MailService { name: "mail".into() };
    let g = group("mailgroup", vec![ip.clone(), mail.clone()]);
    let ctx = StartContext { event: StartEvent::Start, home: true, disk_ok: true };

    assert!(d.monitor(&g, &ip).await.is_err(), "not started yet");
    d.start(&g, &ip, &ctx).await.expect("loopback ip");
    d.monitor(&g, &ip).await.expect("loopback monitor");
    d.start(&g, &mail, &ctx).await.expect("mail service");
    d.start(&g, &mail, &ctx).await.expect("starting a running service again is fine");

    let a = d.mail_addresses("mailgroup", "mail").expect("bound addresses");
    for (what, v) in [
        ("smtp", &a.smtp),
        ("submission", &a.submission),
        ("submissions", &a.submissions),
        ("pop3", &a.pop3),
        ("pop3s", &a.pop3s),
    ] {
        assert_eq!(v.len(), 1, "{what}: {a:?}");
        assert_eq!(v[0].ip().to_string(), "127.0.0.77", "{what}: {a:?}");
    }
    let smtp = a.smtp[0];
    let g1 = tokio::task::spawn_blocking(move || greeting(smtp)).await.unwrap().expect("greeting");
    assert!(g1.starts_with("220 "), "{g1}");
    let sub = a.submission[0];
    let g2 = tokio::task::spawn_blocking(move || greeting(sub)).await.unwrap().expect("greeting");
    assert!(g2.starts_with("220 "), "{g2}");
    let pop3 = a.pop3[0];
    let g3 = tokio::task::spawn_blocking(move || greeting(pop3)).await.unwrap().expect("greeting");
    assert!(g3.starts_with("+OK"), "{g3}");
    d.monitor(&g, &mail).await.expect("mail monitor");

    // A session waiting for a command when the service stops gets 421.
    let mut idle = std::net::TcpStream::connect(smtp).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut line = String::new();
    BufReader::new(&idle).read_line(&mut line).unwrap();
    assert!(line.starts_with("220"), "{line}");

    d.stop(&g, &mail, std::time::Duration::from_secs(2)).await.expect("stop mail");
    d.stop(&g, &mail, std::time::Duration::from_secs(2)).await.expect("stopping again is fine");
    assert!(d.mail_addresses("mailgroup", "mail").is_none());
    // The listener closes when the aborted accept loop is dropped.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let e =
        tokio::task::spawn_blocking(move || std::net::TcpStream::connect(smtp)).await.unwrap().expect_err("refused");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
    // The idle session is told why (RFC 5321 3.8) and closed.
    let mut rest = String::new();
    let n_read = std::io::Read::read_to_string(&mut idle, &mut rest);
    assert!(n_read.is_ok() && rest.starts_with("421 4.3.2 "), "session not closed with 421: {n_read:?} {rest:?}");
    assert!(d.monitor(&g, &mail).await.is_err(), "monitor of a stopped service");

    d.stop(&g, &ip, std::time::Duration::from_secs(2)).await.expect("stop ip");
    assert!(d.monitor(&g, &ip).await.is_err());
}

#[tokio::test]
async fn mail_service_needs_a_group_address_and_loopback_needs_127() {
    let n = node("mx.test").await;
    let (d, _) = driver(&n);
    let ctx = StartContext { event: StartEvent::Start, home: true, disk_ok: true };
    let mail = ResourceSpec::MailService { name: "mail".into() };
    let g = group("bare", vec![mail.clone()]);
    let e = d.start(&g, &mail, &ctx).await.expect_err("no address");
    assert!(e.permanent && e.message.contains("no floating_ip or loopback_ip"), "{e}");
    let ip = ResourceSpec::LoopbackIp { name: "addr".into(), address: "198.18.0.5".into() };
    let e = d.start(&group("g", vec![ip.clone()]), &ip, &ctx).await.expect_err("not loopback");
    assert!(e.permanent && e.message.contains("127.0.0.0/8"), "{e}");
}

// ------------------------------------------------------------ FloatingIp

fn sh(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{args:?}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Two namespaces joined by a veth pair; deleted on drop.
struct Namespaces {
    owner: String,
    peer: String,
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth, and so the pair.
        let _ = sh(&["ip", "netns", "del", &self.owner]);
        let _ = sh(&["ip", "netns", "del", &self.peer]);
    }
}

impl Namespaces {
    fn create(tag: &str) -> Result<Namespaces, String> {
        let pid = std::process::id();
        let ns = Namespaces { owner: format!("hamail-t-{pid}-{tag}a"), peer: format!("hamail-t-{pid}-{tag}b") };
        let (a, b) = (ns.owner.as_str(), ns.peer.as_str());
        sh(&["ip", "netns", "add", a])?;
        sh(&["ip", "netns", "add", b])?;
        sh(&["ip", "link", "add", "name", "hv0", "netns", a, "type", "veth", "peer", "name", "hv1", "netns", b])?;
        for (n, dev, addr) in [(a, "hv0", "198.18.0.1/24"), (b, "hv1", "198.18.0.2/24")] {
            sh(&["ip", "-n", n, "link", "set", "lo", "up"])?;
            sh(&["ip", "-n", n, "addr", "add", addr, "dev", dev])?;
            sh(&["ip", "-n", n, "link", "set", dev, "up"])?;
        }
        Ok(ns)
    }

    fn mac(&self) -> Result<String, String> {
        let out = sh(&["ip", "-n", &self.owner, "-o", "link", "show", "hv0"])?;
        out.split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .map(str::to_string)
            .ok_or_else(|| format!("no MAC in {out}"))
    }
}

/// Runs `body` on a thread that has entered namespace `ns` (the sockets it
/// opens, netlink included, live there), on a runtime of its own.
fn in_namespace<T: Send + 'static>(
    ns: &str,
    body: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>> + Send + 'static,
) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("namespace file");
        // SAFETY: setns(2) on this thread only, with a namespace fd.
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(body())
    })
    .join()
    .expect("namespace thread")
}

fn wait_for(what: &str, mut check: impl FnMut() -> Result<bool, String>) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match check() {
            Ok(true) => return,
            Ok(false) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            other => panic!("{what}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floating_ip_is_added_announced_and_removed_in_a_namespace() {
    if !is_root() {
        eprintln!("SKIPPED floating_ip test: needs root (network namespaces); run the tests as root");
        return;
    }
    let n = node("mx.test").await;
    let (d, _) = driver(&n);
    let d = Arc::new(d);
    let ns = match Namespaces::create("fip") {
        Ok(ns) => ns,
        Err(e) if e.contains("No such file") => {
            eprintln!("SKIPPED floating_ip test: iproute2 (`ip`) is not installed: {e}");
            return;
        }
        Err(e) => panic!("creating the test namespaces: {e}"),
    };
    let mac = ns.mac().expect("owner MAC");
    let (owner, peer) = (ns.owner.clone(), ns.peer.clone());
    // The peer has a stale entry for the address, pointing elsewhere (the
    // previous owner): the announcement must override it. arp_accept lets
    // it also learn entries it had not.
    sh(&[
        "ip",
        "-n",
        &peer,
        "neigh",
        "add",
        "198.18.0.100",
        "lladdr",
        "02:00:00:00:00:99",
        "dev",
        "hv1",
        "nud",
        "stale",
    ])
    .unwrap();
    sh(&["ip", "netns", "exec", &peer, "sysctl", "-qw", "net.ipv4.conf.hv1.arp_accept=1"]).unwrap();
    sh(&["ip", "-n", &peer, "-6", "addr", "add", "2001:db8:18::2/64", "dev", "hv1", "nodad"]).unwrap();
    sh(&[
        "ip",
        "-n",
        &peer,
        "-6",
        "neigh",
        "add",
        "2001:db8:18::100",
        "lladdr",
        "02:00:00:00:00:99",
        "dev",
        "hv1",
        "nud",
        "stale",
    ])
    .unwrap();

    let v4 =
        ResourceSpec::FloatingIp { name: "vip".into(), address: "198.18.0.100/24".into(), interface: "hv0".into() };
    let v6 = ResourceSpec::FloatingIp {
        name: "vip6".into(),
        address: "2001:db8:18::100/64".into(),
        interface: "hv0".into(),
    };
    let bad = ResourceSpec::FloatingIp {
        name: "nodev".into(),
        address: "198.18.0.101/24".into(),
        interface: "nosuch0".into(),
    };
    let g = group("mailgroup", vec![v4.clone(), v6.clone()]);
    let ctx = StartContext { event: StartEvent::Failover, home: false, disk_ok: true };

    let (dd, gg, owner2, peer2, mac2) = (d.clone(), g.clone(), owner.clone(), peer.clone(), mac.clone());
    in_namespace(&owner, move || {
        Box::pin(async move {
            dd.start(&gg, &v4, &ctx).await.expect("start v4");
            dd.start(&gg, &v6, &ctx).await.expect("start v6");
            dd.start(&gg, &v4, &ctx).await.expect("starting again is fine");
            let addrs = sh(&["ip", "-n", &owner2, "-o", "addr", "show", "dev", "hv0"]).unwrap();
            assert!(addrs.contains("198.18.0.100/24"), "{addrs}");
            assert!(addrs.contains("2001:db8:18::100/64"), "{addrs}");
            dd.monitor(&gg, &v4).await.expect("monitor v4");
            dd.monitor(&gg, &v6).await.expect("monitor v6");
            // The peer's caches now point at the owner (RFC 5227 / RFC 4861).
            let lower = mac2.to_lowercase();
            wait_for("ARP announcement reached the peer", || {
                sh(&["ip", "-n", &peer2, "neigh", "show", "198.18.0.100", "dev", "hv1"])
                    .map(|o| o.to_lowercase().contains(&lower))
            });
            wait_for("NA reached the peer", || {
                sh(&["ip", "-n", &peer2, "-6", "neigh", "show", "2001:db8:18::100", "dev", "hv1"])
                    .map(|o| o.to_lowercase().contains(&lower))
            });

            let e = dd.start(&gg, &bad, &ctx).await.expect_err("no such interface");
            assert!(e.permanent && e.message.contains("nosuch0"), "{e}");

            dd.stop(&gg, &v4, std::time::Duration::from_secs(2)).await.expect("stop v4");
            dd.stop(&gg, &v6, std::time::Duration::from_secs(2)).await.expect("stop v6");
            dd.stop(&gg, &v4, std::time::Duration::from_secs(2)).await.expect("stopping again is fine");
            let addrs = sh(&["ip", "-n", &owner2, "-o", "addr", "show", "dev", "hv0"]).unwrap();
            assert!(!addrs.contains("198.18.0.100") && !addrs.contains("2001:db8:18::100"), "{addrs}");
            let e = dd.monitor(&gg, &v4).await.expect_err("gone");
            assert!(e.message.contains("no longer on hv0"), "{e}");
        })
    });
    drop(ns);
}

// ------------------------------------------------------------------ Disk

/// A loop device over a small ext4 image; detached (and unmounted) on drop.
struct LoopDisk {
    device: String,
    mount_point: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        let _ = sh(&["umount", &self.mount_point.display().to_string()]);
        let _ = sh(&["losetup", "-d", &self.device]);
    }
}

fn loop_disk() -> Result<LoopDisk, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let image = dir.path().join("disk.img").display().to_string();
    sh(&["truncate", "-s", "16M", &image])?;
    // The device's last 1 MiB is the disk heartbeat lease area.
    sh(&["mkfs.ext4", "-q", "-F", &image, "15M"])?;
    let device = sh(&["losetup", "--find", "--show", &image])?.trim().to_string();
    let mount_point = dir.path().join("mnt");
    Ok(LoopDisk { device, mount_point, _dir: dir })
}

#[tokio::test]
async fn disk_is_checked_mounted_and_released_killing_its_users() {
    if !is_root() {
        eprintln!("SKIPPED disk test: needs root (loop devices, mount); run the tests as root");
        return;
    }
    let disk = match loop_disk() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("SKIPPED disk test: no loop device here: {e}");
            return;
        }
    };
    let n = node("mx.test").await;
    let (d, lines) = driver(&n);
    let mp = disk.mount_point.display().to_string();
    let r = ResourceSpec::Disk {
        name: "disk".into(),
        device: disk.device.clone(),
        mount_point: mp.clone(),
        fs_type: "ext4".into(),
    };
    let g = group("mailgroup", vec![r.clone()]);
    let ctx = StartContext { event: StartEvent::Start, home: true, disk_ok: true };

    assert!(d.monitor(&g, &r).await.is_err(), "not mounted yet");
    d.start(&g, &r, &ctx).await.expect("start disk");
    d.start(&g, &r, &ctx).await.expect("starting again is fine");
    d.monitor(&g, &r).await.expect("monitor");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(mounts.lines().any(|l| l.starts_with(&format!("{} {mp} ext4", disk.device))), "{mounts}");

    // A process holding a file open on the disk, with its cwd there too.
    let mut holder = Command::new("/bin/sh")
        .args(["-c", "exec 3>held-file; exec sleep 300"])
        .current_dir(&disk.mount_point)
        .spawn()
        .expect("holder");
    std::thread::sleep(Duration::from_millis(200));
    assert!(holder.try_wait().unwrap().is_none(), "holder runs");

    d.stop(&g, &r, std::time::Duration::from_secs(2)).await.expect("stop disk");
    let status = holder.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "the holder was killed");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(&format!(" {mp} ")), "{mounts}");
    let e = d.monitor(&g, &r).await.expect_err("unmounted");
    assert!(e.message.contains("no longer mounted"), "{e}");
    d.stop(&g, &r, std::time::Duration::from_secs(2)).await.expect("stopping again is fine");
    let lines = lines.lock().unwrap().clone();
    assert!(lines.iter().any(|(_, l)| l.starts_with("killing process") && l.contains(&mp)), "{lines:?}");

    // Mounted again: the file written before is there (fsck ran clean).
    d.start(&g, &r, &ctx).await.expect("start again");
    assert!(disk.mount_point.join("held-file").exists());
    d.stop(&g, &r, std::time::Duration::from_secs(2)).await.expect("stop again");
}
