//! Floating and loopback addresses.
//!
//! A floating address is added to an interface over rtnetlink (never by
//! running `ip`: no dependency on iproute2's output format or presence) and
//! announced so that neighbours and switches move their ARP/ND caches and
//! MAC tables to this node at once instead of when their entries expire
//! (see `announce`). Each operation opens its own netlink socket, in the
//! network namespace of the calling thread.
//!
//! A floating address is added with a kernel lifetime (valid and preferred
//! lifetimes, the IFA_CACHEINFO attribute of RTM_NEWADDR, rtnetlink(7)) of a
//! few seconds, renewed by a task held with the resource (RTM_NEWADDR with
//! NLM_F_REPLACE: fresh lifetimes on the same address), and removed at stop
//! as before. What this protects against:
//! - the process hangs (stopped, deadlocked, starved): it stops renewing
//!   (and loses its group lease), the kernel deletes the address when its
//!   valid lifetime runs out, so the node does not keep answering ARP/ND
//!   for long for an address another node has taken over;
//! - the process dies (SIGKILL, abort, OOM kill): the same, but first the
//!   `reaper` process removes the address at once, before another node
//!   takes it over;
//! - not a hung kernel: that one no longer expires anything either; only a
//!   hardware watchdog (resetting the machine) would cover it, and none is
//!   driven here.
//!
//! See [`Lifetime`] for the figures.
//!
//! A loopback address (127.0.0.0/8) needs no configuration on Linux — the
//! whole /8 is local — so it only checks that the address is usable.

use std::net::IpAddr;
use std::time::Duration;

use futures_util::TryStreamExt;
use hamail_cluster::groups::ResourceError;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, CacheInfo};
use rtnetlink::packet_route::link::LinkAttribute;

use super::{announce, config_error, env_error, parse_address, run_error};

/// An interface, as netlink reports it.
pub(crate) struct Link {
    pub index: u32,
    /// Its hardware address when it is an Ethernet-like one (6 bytes).
    pub mac: Option<[u8; 6]>,
}

/// Turns a netlink failure into a message that says whose fault it is.
fn netlink_error(resource: &str, what: &str, e: rtnetlink::Error) -> ResourceError {
    if let rtnetlink::Error::NetlinkError(m) = &e {
        let errno = m.raw_code().abs();
        return match errno {
            libc::EPERM | libc::EACCES => {
                env_error(resource, format!("{what}: operation not permitted: needs root/CAP_NET_ADMIN"))
            }
            libc::ENODEV => env_error(resource, format!("{what}: no such interface on this node")),
            _ => run_error(resource, format!("{what}: {}", std::io::Error::from_raw_os_error(errno))),
        };
    }
    run_error(resource, format!("{what}: {e}"))
}

/// A netlink handle whose connection runs on the current tokio runtime.
fn connect(resource: &str) -> Result<rtnetlink::Handle, ResourceError> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|e| run_error(resource, format!("cannot open a netlink socket: {e}")))?;
    tokio::spawn(connection);
    Ok(handle)
}

async fn link(handle: &rtnetlink::Handle, resource: &str, interface: &str) -> Result<Link, ResourceError> {
    find_link(handle, resource, interface)
        .await?
        .ok_or_else(|| env_error(resource, format!("interface {interface} not found on this node")))
}

/// The interface, or None when this node has none of that name.
async fn find_link(handle: &rtnetlink::Handle, resource: &str, interface: &str) -> Result<Option<Link>, ResourceError> {
    let found = handle.link().get().match_name(interface.to_string()).execute().try_next().await;
    let msg = match found {
        Ok(Some(msg)) => msg,
        Ok(None) => return Ok(None),
        Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code().abs() == libc::ENODEV => return Ok(None),
        Err(e) => return Err(netlink_error(resource, &format!("looking up interface {interface}"), e)),
    };
    let mac = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(bytes) if bytes.len() == 6 && bytes.iter().any(|b| *b != 0) => {
            let mut mac = [0u8; 6];
            mac.copy_from_slice(bytes);
            Some(mac)
        }
        _ => None,
    });
    Ok(Some(Link { index: msg.header.index, mac }))
}

/// The address's entries on the interface (normally zero or one).
async fn find(
    handle: &rtnetlink::Handle,
    resource: &str,
    index: u32,
    ip: IpAddr,
    prefix: u8,
) -> Result<Vec<AddressMessage>, ResourceError> {
    handle
        .address()
        .get()
        .set_link_index_filter(index)
        .set_address_filter(ip)
        .set_prefix_length_filter(prefix)
        .execute()
        .try_collect()
        .await
        .map_err(|e| netlink_error(resource, "listing addresses", e))
}

/// How long the kernel keeps a floating address that is not renewed, and
/// how often it is renewed.
///
/// Derived from the group lease: a node keeps its groups only while its
/// lease (600 ms by default) is younger than that, so an address that
/// outlives a silent process by much more only overlaps with the node that
/// takes the group over. Renewed once per lease (at most every second); the
/// kernel counts lifetimes in whole seconds, so the lifetime is the lease
/// plus two renewals rounded up, at least 2 s: one late renewal never drops
/// the address of a node that still holds its lease, and a dead process's
/// address goes within that (plus up to a second of the kernel's rounding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lifetime {
    pub renew_every: Duration,
    /// ifa_valid and ifa_preferred, in seconds.
    pub seconds: u32,
}

impl Lifetime {
    pub(crate) fn for_lease(lease: Duration) -> Lifetime {
        let renew_every = lease.clamp(Duration::from_millis(100), Duration::from_secs(1));
        let span = lease + 2 * renew_every;
        let seconds = span.as_secs() + u64::from(span.subsec_nanos() > 0);
        Lifetime { renew_every, seconds: u32::try_from(seconds.max(2)).unwrap_or(u32::MAX - 1) }
    }
}

/// A floating address added here: the task that keeps renewing its
/// lifetime, and the one that repeats its announcement. Dropping it stops
/// both (the address then expires, unless stop removes it first).
pub(crate) struct Floating {
    announcer: Option<tokio::task::JoinHandle<()>>,
    renewer: tokio::task::JoinHandle<()>,
}

impl Floating {
    /// Stops both tasks and waits until the renewer has ended: a renewal
    /// in flight must not put back an address that stop then removes.
    pub(crate) async fn halt(mut self) {
        self.abort();
        let _ = (&mut self.renewer).await;
    }

    fn abort(&mut self) {
        if let Some(task) = &self.announcer {
            task.abort();
        }
        self.renewer.abort();
    }
}

impl Drop for Floating {
    fn drop(&mut self) {
        self.abort();
    }
}

/// Adds the address with fresh lifetimes, or gives the one already there
/// fresh lifetimes (NLM_F_REPLACE; e.g. after a restart of this process,
/// or an address added without lifetimes).
async fn add_or_renew(
    handle: &rtnetlink::Handle,
    index: u32,
    ip: IpAddr,
    prefix: u8,
    lifetime: Lifetime,
) -> Result<(), rtnetlink::Error> {
    let mut request = handle.address().add(index, ip, prefix).replace();
    let msg = request.message_mut();
    if ip.is_ipv6() {
        // A moved address was already unique on the link a moment ago:
        // skip duplicate address detection, as keepalived does, so it is
        // usable (and can be the source of the NA) at once.
        msg.header.flags |= AddressHeaderFlags::Nodad;
        msg.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    let mut cache_info = CacheInfo::default();
    cache_info.ifa_preferred = lifetime.seconds;
    cache_info.ifa_valid = lifetime.seconds;
    msg.attributes.push(AddressAttribute::CacheInfo(cache_info));
    request.execute().await
}

/// Adds the address (already there is fine: e.g. after a restart of this
/// process) with a lifetime, announces it, and starts renewing it.
pub(crate) async fn floating_start(
    resource: &str,
    address: &str,
    interface: &str,
    lifetime: Lifetime,
) -> Result<Floating, ResourceError> {
    let (ip, prefix) = parse_address(resource, address, true)?;
    if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
        return Err(config_error(resource, format!("{address} cannot be a floating address")));
    }
    let handle = connect(resource)?;
    let link = link(&handle, resource, interface).await?;
    let present = !find(&handle, resource, link.index, ip, prefix).await?.is_empty();
    add_or_renew(&handle, link.index, ip, prefix, lifetime)
        .await
        .map_err(|e| netlink_error(resource, &format!("adding {address} to {interface}"), e))?;
    if !present {
        tracing::info!(resource, %address, interface, lifetime_secs = lifetime.seconds, "floating address added");
    }
    let renewer = tokio::spawn(renew(resource.to_string(), link.index, ip, prefix, lifetime));
    let announcer = announce::announce(resource, interface, link.index, link.mac, ip).await;
    Ok(Floating { announcer, renewer })
}

/// Gives the address fresh lifetimes every `renew_every`, while it is on
/// the interface. An address someone else removed is not put back: the
/// monitor reports it missing.
async fn renew(resource: String, index: u32, ip: IpAddr, prefix: u8, lifetime: Lifetime) {
    let mut ticks = tokio::time::interval(lifetime.renew_every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    // One netlink socket for the renewals, opened again only after it failed.
    let mut handle: Option<rtnetlink::Handle> = None;
    loop {
        ticks.tick().await;
        let h = match handle.take().map_or_else(|| connect(&resource), Ok) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(resource, "renewing the address lifetime: {e}");
                continue;
            }
        };
        match find(&h, &resource, index, ip, prefix).await {
            Ok(found) if found.is_empty() => {
                handle = Some(h);
                continue;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(resource, "renewing the address lifetime: {e}");
                continue;
            }
        }
        match add_or_renew(&h, index, ip, prefix, lifetime).await {
            Ok(()) => handle = Some(h),
            Err(e) => tracing::warn!(resource, %ip, "renewing the address lifetime: {e}"),
        }
    }
}

/// Removes the address; absent (or the interface gone with it) is fine.
pub(crate) async fn floating_stop(resource: &str, address: &str, interface: &str) -> Result<(), ResourceError> {
    let (ip, prefix) = parse_address(resource, address, true)?;
    let handle = connect(resource)?;
    // No interface, no address on it.
    let Some(link) = find_link(&handle, resource, interface).await? else { return Ok(()) };
    for msg in find(&handle, resource, link.index, ip, prefix).await? {
        match handle.address().del(msg).execute().await {
            Ok(()) => {}
            Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code().abs() == libc::EADDRNOTAVAIL => {}
            Err(e) => return Err(netlink_error(resource, &format!("removing {address} from {interface}"), e)),
        }
        tracing::info!(resource, %address, interface, "floating address removed");
    }
    Ok(())
}

/// Whether the address is on the interface.
pub(crate) async fn floating_present(resource: &str, address: &str, interface: &str) -> Result<bool, ResourceError> {
    let (ip, prefix) = parse_address(resource, address, true)?;
    let handle = connect(resource)?;
    let link = link(&handle, resource, interface).await?;
    Ok(!find(&handle, resource, link.index, ip, prefix).await?.is_empty())
}

/// A loopback address must be in 127.0.0.0/8 and bindable.
pub(crate) fn loopback_check(resource: &str, address: &str) -> Result<(), ResourceError> {
    let (ip, _) = parse_address(resource, address, false)?;
    if !matches!(ip, IpAddr::V4(v4) if v4.is_loopback()) {
        return Err(config_error(resource, format!("loopback_ip {address} is not in 127.0.0.0/8")));
    }
    super::bind_test(ip).map_err(|e| run_error(resource, format!("cannot bind {ip}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lifetime_outlasts_the_lease_and_two_renewals() {
        let default = Lifetime::for_lease(Duration::from_millis(600));
        assert_eq!(default, Lifetime { renew_every: Duration::from_millis(600), seconds: 2 });
        let long = Lifetime::for_lease(Duration::from_secs(5));
        assert_eq!(long, Lifetime { renew_every: Duration::from_secs(1), seconds: 7 });
        let short = Lifetime::for_lease(Duration::from_millis(20));
        assert_eq!(short, Lifetime { renew_every: Duration::from_millis(100), seconds: 2 });
        for ms in [1u64, 150, 600, 999, 1000, 1001, 2500, 60_000] {
            let l = Lifetime::for_lease(Duration::from_millis(ms));
            let valid = Duration::from_secs(l.seconds.into());
            assert!(valid >= 2 * l.renew_every, "{ms} ms: {l:?}");
            assert!(valid >= Duration::from_millis(ms) + 2 * l.renew_every, "{ms} ms: {l:?}");
        }
    }
}
