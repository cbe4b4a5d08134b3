//! The real failover-group resources of a node: what `ResourceDriver`
//! (crates/cluster/src/groups.rs) does when the cluster tells this node to
//! start, stop or check one resource of a group it owns.
//!
//! Role: the cluster decides *where* a group runs; this module makes it run
//! *here* — a floating address added and announced (`ip`), a loopback
//! address for rootless demos, the mail listeners bound to that address
//! (`mail`), the operator's start/stop scripts with the seed's `CLP_*` /
//! `ARMS_*` environment (`exec`), and a shared disk checked, mounted and
//! released (`disk`).
//!
//! Why one `Driver` holding state: a resource's stop needs what its start
//! made (the listeners to close, the event that started a script, the
//! announcement still scheduled). The state is keyed by (group, resource);
//! every operation is idempotent (start of a running resource, stop of a
//! stopped one: Ok), so the engine may retry freely.
//!
//! Errors say whose fault they are: "configuration:" (the group's spec is
//! wrong — `permanent`, a local retry cannot help), "environment:" (missing
//! privilege, interface, device — also permanent), or what failed at run
//! time (not permanent: worth a local restart).

mod announce;
mod disk;
mod disk_lease;
mod exec;
mod ip;
mod mail;
pub mod reaper;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use hamail_cluster::groups::{GroupSpec, ResourceDriver, ResourceError, ResourceSpec, StartContext};

use crate::Context;

pub use mail::MailAddresses;

/// The name under which the `hamail` binary is `hamail log write` (the
/// original scripts' log command).
pub const ARMLOG: &str = "armlog";

/// The directory, first in the group scripts' `PATH`, that holds the
/// `armlog` link to the binary.
pub fn script_bin_dir(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("bin")
}

/// Makes `armlog` in [`script_bin_dir`] a link to `exe` (replacing an old
/// one: the binary may have moved).
pub fn link_script_tools(data_dir: &std::path::Path, exe: &std::path::Path) -> std::io::Result<()> {
    let dir = script_bin_dir(data_dir);
    std::fs::create_dir_all(&dir)?;
    let link = dir.join(ARMLOG);
    let fresh = dir.join(format!(".{ARMLOG}.new"));
    let _ = std::fs::remove_file(&fresh);
    std::os::unix::fs::symlink(exe, &fresh)?;
    std::fs::rename(&fresh, &link)
}

/// Where the output lines of `Exec` scripts go: `(resource name, line)`.
pub type LogSink = Arc<dyn Fn(String, String) + Send + Sync>;

/// What a started resource holds until it is stopped.
enum Held {
    /// A floating address added here, with the tasks that renew its
    /// lifetime and repeat its announcement (ended on stop or drop).
    Floating(ip::Floating),
    Loopback,
    Mail(mail::MailRunning),
    /// The context the script was started with: its stop gets the same
    /// `CLP_EVENT`/`CLP_SERVER`/`CLP_DISK`.
    Exec(StartContext),
    /// The disk's heartbeat lease (its task stops when dropped, leaving the
    /// record held: only stop releases it).
    Disk(disk_lease::Lease),
}

type Key = (String, String);

fn script_group(group: &GroupSpec) -> exec::ScriptGroup<'_> {
    exec::ScriptGroup {
        name: &group.name,
        has_disk: group.resources.iter().any(|r| matches!(r, ResourceSpec::Disk { .. })),
    }
}

fn held_address(resource: &str, address: &str, interface: &str) -> reaper::HeldAddress {
    reaper::HeldAddress { resource: resource.into(), address: address.into(), interface: interface.into() }
}

/// The server's `ResourceDriver`: real resources on this node.
pub struct Driver {
    /// Weak: the cluster engine holding this driver may itself be reachable
    /// from the context; the mail listeners need the context only while the
    /// server runs.
    context: Weak<Context>,
    log: LogSink,
    held: Mutex<HashMap<Key, Held>>,
    /// Removes the floating addresses held here when this process dies.
    reaper: reaper::Reaper,
}

impl Driver {
    /// `context`: the node's own (the group's mail listeners serve with it);
    /// `log`: receives `Exec` scripts' stdout/stderr lines.
    pub fn new(context: &Arc<Context>, log: LogSink) -> Driver {
        Driver {
            context: Arc::downgrade(context),
            log,
            held: Mutex::new(HashMap::new()),
            reaper: reaper::Reaper::default(),
        }
    }

    /// The addresses the `MailService` resource `resource` of `group` is
    /// listening on, while it runs (with port 0 in the config: the ports
    /// the kernel chose).
    pub fn mail_addresses(&self, group: &str, resource: &str) -> Option<MailAddresses> {
        match self.lock().get(&(group.to_string(), resource.to_string())) {
            Some(Held::Mail(m)) => Some(m.addresses.clone()),
            _ => None,
        }
    }

    /// The kernel lifetime of the floating addresses, from the group lease.
    fn address_lifetime(&self, resource: &str) -> Result<ip::Lifetime, ResourceError> {
        let context = self.context.upgrade().ok_or_else(|| {
            run_error(resource, "the server is shutting down: no group lease to renew the address in")
        })?;
        Ok(ip::Lifetime::for_lease(Duration::from_millis(context.config.cluster.group_lease_ms)))
    }

    /// The group scripts' `PATH`: [`script_bin_dir`] (`armlog`), then ours.
    fn script_path(&self) -> std::ffi::OsString {
        let inherited = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
        let Some(context) = self.context.upgrade() else { return inherited };
        let mut dirs = vec![script_bin_dir(&context.config.server.data_dir)];
        dirs.extend(std::env::split_paths(&inherited));
        std::env::join_paths(dirs).unwrap_or(inherited)
    }

    /// This node's name as a disk lease holder: the `[server] hostname`.
    fn holder(&self) -> Option<String> {
        self.context.upgrade().map(|c| c.config.server.hostname.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Held>> {
        self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn take(&self, key: &Key) -> Option<Held> {
        self.lock().remove(key)
    }

    fn put(&self, key: Key, held: Held) {
        if let Some(old) = self.lock().insert(key, held) {
            release(old);
        }
    }
}

/// Drops what a replaced or forgotten entry still runs.
fn release(held: Held) {
    // The other entries' tasks (a floating address's renewal and
    // announcement, a disk's heartbeat) end when they are dropped.
    if let Held::Mail(m) = held {
        m.shutdown();
    }
}

fn key(group: &GroupSpec, resource: &ResourceSpec) -> Key {
    (group.name.clone(), resource.name().to_string())
}

/// A failure of the spec: a local retry cannot help.
pub(crate) fn config_error(resource: &str, message: impl Into<String>) -> ResourceError {
    ResourceError {
        resource: resource.to_string(),
        message: format!("configuration: {}", message.into()),
        permanent: true,
    }
}

/// Something this node lacks (privilege, interface, device): permanent too.
pub(crate) fn env_error(resource: &str, message: impl Into<String>) -> ResourceError {
    ResourceError {
        resource: resource.to_string(),
        message: format!("environment: {}", message.into()),
        permanent: true,
    }
}

/// A run-time failure worth a local restart.
pub(crate) fn run_error(resource: &str, message: impl Into<String>) -> ResourceError {
    ResourceError { resource: resource.to_string(), message: message.into(), permanent: false }
}

/// The mount point of the group's shared disk, if it has one: the mail
/// service `resource` then keeps the group's mail there. The disk must be
/// started before (listed before) the mail service.
fn group_disk<'g>(group: &'g GroupSpec, resource: &str) -> Result<Option<&'g str>, ResourceError> {
    let Some((d, mount_point)) = group.resources.iter().enumerate().find_map(|(i, r)| match r {
        ResourceSpec::Disk { mount_point, .. } => Some((i, mount_point.as_str())),
        _ => None,
    }) else {
        return Ok(None);
    };
    if group.resources.iter().position(|r| r.name() == resource).is_some_and(|m| d > m) {
        return Err(config_error(
            resource,
            format!("group {}: list the disk resource before the mail service (its store is on the disk)", group.name),
        ));
    }
    Ok(Some(mount_point))
}

/// `198.18.0.100/24` → (address, prefix). `prefix_required`: a floating
/// address must say its prefix (a silent /32 would change routing); a
/// loopback one may omit it.
pub(crate) fn parse_address(resource: &str, text: &str, prefix_required: bool) -> Result<(IpAddr, u8), ResourceError> {
    let (addr, prefix) = match text.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (text, None),
    };
    let ip: IpAddr = addr.trim().parse().map_err(|_| {
        config_error(resource, format!("`{text}` is not an IP address (expected e.g. 198.18.0.100/24)"))
    })?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        Some(p) => p
            .trim()
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| config_error(resource, format!("`{text}`: prefix length must be 0..={max}")))?,
        None if prefix_required => {
            return Err(config_error(resource, format!("`{text}` needs a prefix length (e.g. {addr}/24)")));
        }
        None => max,
    };
    Ok((ip, prefix))
}

/// The group's service address: its first floating or loopback address,
/// without prefix.
pub(crate) fn group_address(group: &GroupSpec, resource: &str) -> Result<IpAddr, ResourceError> {
    for r in &group.resources {
        match r {
            ResourceSpec::FloatingIp { name, address, .. } => {
                return parse_address(name, address, true).map(|(a, _)| a)
            }
            ResourceSpec::LoopbackIp { name, address } => return parse_address(name, address, false).map(|(a, _)| a),
            _ => {}
        }
    }
    Err(config_error(
        resource,
        format!("group `{}` has a mail service but no floating_ip or loopback_ip resource to bind it to", group.name),
    ))
}

/// Binds a TCP socket to `ip` (port 0) and releases it: Ok when the address
/// is local to this host (for 127.0.0.0/8, always on Linux).
pub(crate) fn bind_test(ip: IpAddr) -> std::io::Result<()> {
    std::net::TcpListener::bind(SocketAddr::new(ip, 0)).map(drop)
}

#[async_trait::async_trait]
impl ResourceDriver for Driver {
    async fn start(
        &self,
        group: &GroupSpec,
        resource: &ResourceSpec,
        context: &StartContext,
    ) -> Result<(), ResourceError> {
        let k = key(group, resource);
        match resource {
            ResourceSpec::FloatingIp { name, address, interface } => {
                let ours = matches!(self.lock().get(&k), Some(Held::Floating(_)));
                // Already ours: fine if it is still on the interface.
                if ours && ip::floating_present(name, address, interface).await? {
                    return Ok(());
                }
                let lifetime = self.address_lifetime(name)?;
                self.reaper.hold(&held_address(name, address, interface));
                let floating = ip::floating_start(name, address, interface, lifetime).await?;
                self.put(k, Held::Floating(floating));
                Ok(())
            }
            ResourceSpec::LoopbackIp { name, address } => {
                ip::loopback_check(name, address)?;
                self.put(k, Held::Loopback);
                Ok(())
            }
            ResourceSpec::MailService { name } => {
                if matches!(self.lock().get(&k), Some(Held::Mail(m)) if m.alive()) {
                    return Ok(());
                }
                let ctx = self
                    .context
                    .upgrade()
                    .ok_or_else(|| run_error(name, "the server is shutting down: no context to serve with"))?;
                let addr = group_address(group, name)?;
                let disk_store = match group_disk(group, name)? {
                    Some(mount_point) => Some(mail::open_disk_store(&ctx, name, mount_point).await?),
                    None => None,
                };
                let running = mail::start(&ctx, name, addr, disk_store).await?;
                self.put(k, Held::Mail(running));
                Ok(())
            }
            ResourceSpec::Delivery { name } => {
                let ctx = self
                    .context
                    .upgrade()
                    .ok_or_else(|| run_error(name, "the server is shutting down: no context to deliver with"))?;
                crate::delivery::resource_start(&ctx).map_err(|e| run_error(name, e))
            }
            ResourceSpec::Exec { name, start, timeout_secs, .. } => {
                // Recorded before running: a failed start is still stopped
                // with the event that tried to start it.
                self.put(k, Held::Exec(context.clone()));
                exec::run(&self.log, &self.script_path(), &script_group(group), name, start, context, *timeout_secs)
                    .await
            }
            ResourceSpec::Disk { name, device, mount_point, fs_type } => {
                if let Some(Held::Disk(lease)) = self.lock().get(&k) {
                    if disk::monitor(name, device, mount_point, Some(lease.check())).is_ok() {
                        return Ok(());
                    }
                }
                // A lost or unmounted one: its heartbeat stops, the record
                // (ours unless lost) is retaken below.
                drop(self.take(&k));
                let holder = self
                    .holder()
                    .ok_or_else(|| run_error(name, "the server is shutting down: no host name for the disk lease"))?;
                let lease = disk::start(&self.log, name, device, mount_point, fs_type, &holder).await?;
                self.put(k, Held::Disk(lease));
                Ok(())
            }
        }
    }

    async fn stop(&self, group: &GroupSpec, resource: &ResourceSpec, budget: Duration) -> Result<(), ResourceError> {
        let k = key(group, resource);
        let held = self.take(&k);
        match resource {
            ResourceSpec::FloatingIp { name, address, interface } => {
                if let Some(Held::Floating(floating)) = held {
                    floating.halt().await;
                }
                // Also when not recorded: after a crash the address may
                // still be on the interface, and it must go.
                ip::floating_stop(name, address, interface).await?;
                self.reaper.release(&held_address(name, address, interface));
                Ok(())
            }
            ResourceSpec::LoopbackIp { .. } => Ok(()),
            ResourceSpec::Delivery { .. } => {
                if let Some(ctx) = self.context.upgrade() {
                    ctx.delivery.stop();
                }
                Ok(())
            }
            ResourceSpec::MailService { .. } => {
                if let Some(Held::Mail(m)) = held {
                    // Within the group's stop budget, leaving room for the
                    // resources stopped after it (the address).
                    m.stop((budget / 2).min(mail::DRAIN_GRACE)).await.map_err(|e| run_error(resource.name(), e))?;
                }
                Ok(())
            }
            ResourceSpec::Exec { name, stop, timeout_secs, .. } => {
                let context = match held {
                    Some(Held::Exec(c)) => c,
                    // Never started by this process (e.g. cleanup after a
                    // restart): a plain START at home is the best guess.
                    _ => StartContext { event: hamail_cluster::groups::StartEvent::Start, home: true, disk_ok: true },
                };
                let result = exec::run(
                    &self.log,
                    &self.script_path(),
                    &script_group(group),
                    name,
                    stop,
                    &context,
                    *timeout_secs,
                )
                .await;
                if result.is_err() {
                    // Still held: a later stop retries with the same event.
                    self.put(k, Held::Exec(context));
                }
                result
            }
            ResourceSpec::Disk { name, device, mount_point, .. } => {
                let mut lease = match held {
                    Some(Held::Disk(l)) => Some(l),
                    _ => None,
                };
                let holder = self.holder();
                let result = disk::stop(&self.log, name, device, mount_point, &mut lease, holder.as_deref()).await;
                if let Some(l) = lease {
                    // Still mounted here: the heartbeat goes on.
                    self.put(k, Held::Disk(l));
                }
                result
            }
        }
    }

    async fn reannounce(&self, group: &GroupSpec, resource: &ResourceSpec) {
        let ResourceSpec::FloatingIp { name, address, interface } = resource else { return };
        let k = key(group, resource);
        if !matches!(self.lock().get(&k), Some(Held::Floating(_))) {
            return;
        }
        let lifetime = match self.address_lifetime(name) {
            Ok(l) => l,
            Err(e) => return tracing::warn!(resource = %name, %address, "announcing again: {e}"),
        };
        // A present address gets fresh lifetimes; the announcement is sent.
        match ip::floating_start(name, address, interface, lifetime).await {
            Ok(floating) => {
                // The one it replaces stops its tasks when dropped.
                self.put(k, Held::Floating(floating));
                tracing::info!(resource = %name, %address, "floating address announced again: a node is back");
            }
            Err(e) => tracing::warn!(resource = %name, %address, "announcing again: {e}"),
        }
    }

    async fn recover(&self, group: &GroupSpec, resource: &ResourceSpec, context: &StartContext) {
        if let ResourceSpec::Exec { name, start, timeout_secs, .. } = resource {
            let (path, script) = (self.script_path(), script_group(group));
            if let Err(e) = exec::run(&self.log, &path, &script, name, start, context, *timeout_secs).await {
                tracing::warn!(group = %group.name, resource = %name, "the RECOVER notice failed: {e}");
            }
        }
    }

    async fn monitor(&self, group: &GroupSpec, resource: &ResourceSpec) -> Result<(), ResourceError> {
        let k = key(group, resource);
        let name = resource.name();
        match resource {
            ResourceSpec::FloatingIp { name, address, interface } => {
                if ip::floating_present(name, address, interface).await? {
                    Ok(())
                } else {
                    Err(run_error(
                        name,
                        format!("address {address} is no longer on {interface} (removed by someone else?)"),
                    ))
                }
            }
            ResourceSpec::LoopbackIp { name, address } => {
                if !matches!(self.lock().get(&k), Some(Held::Loopback)) {
                    return Err(run_error(name, "not started on this node"));
                }
                ip::loopback_check(name, address)
            }
            ResourceSpec::MailService { .. } => {
                let (addresses, alive) = match self.lock().get(&k) {
                    Some(Held::Mail(m)) => (m.addresses.clone(), m.alive()),
                    _ => return Err(run_error(name, "not started on this node")),
                };
                if !alive {
                    return Err(run_error(name, "a listener's accept loop has ended"));
                }
                mail::probe(name, &addresses).await
            }
            ResourceSpec::Exec { .. } => Ok(()),
            ResourceSpec::Delivery { name } => match self.context.upgrade() {
                Some(ctx) if ctx.delivery.running() || !ctx.config.relay.enabled => Ok(()),
                _ => Err(run_error(name, "outbound delivery is not running on this node")),
            },
            ResourceSpec::Disk { name, device, mount_point, .. } => {
                let lease = match self.lock().get(&k) {
                    Some(Held::Disk(l)) => Some(l.check()),
                    _ => None,
                };
                disk::monitor(name, device, mount_point, lease)
            }
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Listeners and scheduled announcements do not outlive the driver.
        let held = std::mem::take(&mut *self.lock());
        for (_, h) in held {
            release(h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_with_clear_errors() {
        assert_eq!(parse_address("r", "198.18.0.100/24", true).unwrap(), ("198.18.0.100".parse().unwrap(), 24));
        assert_eq!(parse_address("r", "2001:db8::5/64", true).unwrap(), ("2001:db8::5".parse().unwrap(), 64));
        assert_eq!(parse_address("r", "127.0.0.77", false).unwrap(), ("127.0.0.77".parse().unwrap(), 32));
        let e = parse_address("vip", "198.18.0.100", true).unwrap_err();
        assert!(e.permanent && e.message.contains("prefix"), "{e}");
        let e = parse_address("vip", "198.18.0.100/33", true).unwrap_err();
        assert!(e.message.contains("0..=32"), "{e}");
        let e = parse_address("vip", "mail.example/24", true).unwrap_err();
        assert!(e.message.starts_with("configuration:"), "{e}");
    }

    #[test]
    fn the_mail_service_finds_the_disk_listed_before_it() {
        let disk = ResourceSpec::Disk {
            name: "spool".into(),
            device: "/dev/x".into(),
            mount_point: "/srv/spool".into(),
            fs_type: "ext4".into(),
        };
        let mail = ResourceSpec::MailService { name: "mail".into() };
        let group = |resources| GroupSpec {
            name: "g".into(),
            nodes: vec![],
            failback: Default::default(),
            resources,
            max_restarts: 1,
            stop_timeout_ms: None,
        };
        assert_eq!(group_disk(&group(vec![disk.clone(), mail.clone()]), "mail").unwrap(), Some("/srv/spool"));
        assert_eq!(group_disk(&group(vec![mail.clone()]), "mail").unwrap(), None);
        let e = group_disk(&group(vec![mail, disk]), "mail").unwrap_err();
        assert!(e.permanent && e.message.contains("before the mail service"), "{e}");
    }
}
