//! Floating and loopback addresses.
//!
//! A floating address is added to an interface over rtnetlink (never by
//! running `ip`: no dependency on iproute2's output format or presence) and
//! announced so that neighbours and switches move their ARP/ND caches and
//! MAC tables to this node at once instead of when their entries expire
//! (see `announce`). Each operation opens its own netlink socket, in the
//! network namespace of the calling thread.
//!
//! A loopback address (127.0.0.0/8) needs no configuration on Linux — the
//! whole /8 is local — so it only checks that the address is usable.

use std::net::IpAddr;

use futures_util::TryStreamExt;
use hamail_cluster::groups::ResourceError;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage};
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

/// Adds the address (already there is fine: e.g. after a restart of this
/// process) and announces it; returns the task that repeats the
/// announcement later.
pub(crate) async fn floating_start(
    resource: &str,
    address: &str,
    interface: &str,
) -> Result<Option<tokio::task::JoinHandle<()>>, ResourceError> {
    let (ip, prefix) = parse_address(resource, address, true)?;
    if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
        return Err(config_error(resource, format!("{address} cannot be a floating address")));
    }
    let handle = connect(resource)?;
    let link = link(&handle, resource, interface).await?;
    if find(&handle, resource, link.index, ip, prefix).await?.is_empty() {
        let mut request = handle.address().add(link.index, ip, prefix);
        if ip.is_ipv6() {
            // A moved address was already unique on the link a moment ago:
            // skip duplicate address detection, as keepalived does, so it is
            // usable (and can be the source of the NA) at once.
            let msg = request.message_mut();
            msg.header.flags |= AddressHeaderFlags::Nodad;
            msg.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match request.execute().await {
            Ok(()) => {}
            // Raced with someone adding the same address: it is there.
            Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code().abs() == libc::EEXIST => {}
            Err(e) => return Err(netlink_error(resource, &format!("adding {address} to {interface}"), e)),
        }
        tracing::info!(resource, %address, interface, "floating address added");
    }
    Ok(announce::announce(resource, interface, link.index, link.mac, ip).await)
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
