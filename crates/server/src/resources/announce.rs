//! Announcing a floating address after it moved here.
//!
//! Hosts and routers on the link keep the address's old MAC in their ARP or
//! neighbour caches (and switches the old port in their MAC tables) for up to
//! minutes. A burst of announcements makes them switch now:
//!
//! - IPv4: ARP Announcements (RFC 5227 §3 "ARP Announcement": an ARP
//!   Request whose sender and target protocol addresses are both the
//!   address, target hardware address zero, broadcast), sent on an
//!   AF_PACKET socket.
//! - IPv6: unsolicited Neighbor Advertisements (RFC 4861 §7.2.6: to the
//!   all-nodes address ff02::1, Override flag set, Solicited flag clear,
//!   with the Target Link-Layer Address option; hop limit 255 as §7.1.2
//!   requires of receivers), on a raw ICMPv6 socket.
//!
//! Timing follows keepalived: a burst of `BURST` packets `SPACING` apart
//! right away (RFC 5227 §2.3 sends two, 2 s apart; more is harmless and
//! survives a lost frame), then the same burst again after `REPEAT_AFTER`
//! for the switches and hosts that missed the first one while a link came
//! up. Failure to announce is logged, not fatal: the address works, only
//! the caches converge more slowly.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

const BURST: usize = 5;
const SPACING: Duration = Duration::from_millis(100);
const REPEAT_AFTER: Duration = Duration::from_secs(2);

/// Sends the first announcement now and returns the task that sends the
/// rest of the first burst and, later, a second burst. Only the first
/// packet is awaited: the mail listeners start right after it (measured:
/// awaiting the whole burst kept the address refusing connections for
/// 400 ms after a takeover).
/// `mac`: the interface's Ethernet address (None: no ARP/ND on this link,
/// e.g. a tun device — nothing to announce).
pub(crate) async fn announce(
    resource: &str,
    interface: &str,
    index: u32,
    mac: Option<[u8; 6]>,
    ip: IpAddr,
) -> Option<tokio::task::JoinHandle<()>> {
    let Some(mac) = mac else {
        tracing::info!(resource, interface, "interface has no Ethernet address: nothing to announce");
        return None;
    };
    let first = Sender::open(index, mac, ip).and_then(|sender| sender.send().map(|()| sender));
    let sender = match first {
        Ok(sender) => sender,
        Err(e) => {
            tracing::warn!(resource, interface, %ip, error = %e, "cannot announce the floating address; neighbours will learn it when their caches expire");
            return None;
        }
    };
    tracing::info!(resource, interface, %ip, "floating address announced");
    let (resource, interface) = (resource.to_string(), interface.to_string());
    Some(tokio::spawn(async move {
        for _ in 1..BURST {
            tokio::time::sleep(SPACING).await;
            if let Err(e) = sender.send() {
                tracing::warn!(resource, interface, %ip, error = %e, "announcement failed");
                break;
            }
        }
        tokio::time::sleep(REPEAT_AFTER).await;
        if let Err(e) = burst(index, mac, ip).await {
            tracing::warn!(resource, interface, %ip, error = %e, "repeated announcement failed");
        }
    }))
}

async fn burst(index: u32, mac: [u8; 6], ip: IpAddr) -> io::Result<()> {
    let sender = Sender::open(index, mac, ip)?;
    for i in 0..BURST {
        if i > 0 {
            tokio::time::sleep(SPACING).await;
        }
        sender.send()?;
    }
    Ok(())
}

enum Sender {
    Arp { fd: OwnedFd, index: u32, frame: Vec<u8> },
    Na { fd: OwnedFd, index: u32, packet: Vec<u8> },
}

fn check(ret: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if ret < 0 {
        let e = io::Error::last_os_error();
        let hint = match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => " (needs root/CAP_NET_RAW)",
            _ => "",
        };
        return Err(io::Error::new(e.kind(), format!("{what}: {e}{hint}")));
    }
    Ok(ret)
}

fn socket(domain: libc::c_int, kind: libc::c_int, protocol: libc::c_int, what: &str) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned from here on.
    let fd = check(unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) }, what)?;
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn setsockopt_int(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
    what: &str,
) -> io::Result<()> {
    // SAFETY: value outlives the call; the length is its size.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    check(ret, what).map(drop)
}

impl Sender {
    fn open(index: u32, mac: [u8; 6], ip: IpAddr) -> io::Result<Sender> {
        match ip {
            IpAddr::V4(v4) => {
                // Protocol 0: this socket only sends, it receives nothing.
                let fd = socket(libc::AF_PACKET, libc::SOCK_RAW, 0, "opening an AF_PACKET socket for ARP")?;
                Ok(Sender::Arp { fd, index, frame: arp_announcement(mac, v4) })
            }
            IpAddr::V6(v6) => {
                let fd = socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6, "opening a raw ICMPv6 socket")?;
                // RFC 4861 §7.1.2: receivers drop NAs whose hop limit is not 255.
                setsockopt_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_HOPS, 255, "setting the hop limit")?;
                setsockopt_int(
                    &fd,
                    libc::IPPROTO_IPV6,
                    libc::IPV6_MULTICAST_IF,
                    index as libc::c_int,
                    "choosing the interface",
                )?;
                setsockopt_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_LOOP, 0, "disabling multicast loop")?;
                // The NA's source is the floating address itself (added
                // without DAD, so not tentative and bindable right away).
                let src = sockaddr_in6(v6, index);
                // SAFETY: src is a valid sockaddr_in6 of the given length.
                let ret = unsafe {
                    libc::bind(
                        fd.as_raw_fd(),
                        (&src as *const libc::sockaddr_in6).cast(),
                        std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                    )
                };
                check(ret, &format!("binding the NA socket to {v6}"))?;
                // The kernel fills in the ICMPv6 checksum on raw ICMPv6
                // sockets (RFC 3542 §3.1), so it stays zero here.
                Ok(Sender::Na { fd, index, packet: neighbor_advertisement(mac, v6) })
            }
        }
    }

    fn send(&self) -> io::Result<()> {
        match self {
            Sender::Arp { fd, index, frame } => {
                // SAFETY: an all-zero sockaddr_ll is valid; fields set below.
                let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                to.sll_family = libc::AF_PACKET as u16;
                to.sll_protocol = (libc::ETH_P_ARP as u16).to_be();
                to.sll_ifindex = *index as i32;
                to.sll_halen = 6;
                to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
                // SAFETY: frame and to are valid for the lengths given.
                let ret = unsafe {
                    libc::sendto(
                        fd.as_raw_fd(),
                        frame.as_ptr().cast(),
                        frame.len(),
                        0,
                        (&to as *const libc::sockaddr_ll).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                    )
                };
                check(ret as libc::c_int, "sending an ARP announcement").map(drop)
            }
            Sender::Na { fd, index, packet } => {
                let to = sockaddr_in6(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1), *index);
                // SAFETY: packet and to are valid for the lengths given.
                let ret = unsafe {
                    libc::sendto(
                        fd.as_raw_fd(),
                        packet.as_ptr().cast(),
                        packet.len(),
                        0,
                        (&to as *const libc::sockaddr_in6).cast(),
                        std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                    )
                };
                check(ret as libc::c_int, "sending a neighbour advertisement").map(drop)
            }
        }
    }
}

fn sockaddr_in6(ip: Ipv6Addr, scope: u32) -> libc::sockaddr_in6 {
    // SAFETY: an all-zero sockaddr_in6 is valid; fields set below.
    let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    sa.sin6_family = libc::AF_INET6 as u16;
    sa.sin6_addr.s6_addr = ip.octets();
    // Only link-local and multicast-link-scope addresses use the scope id;
    // a global source address ignores it.
    sa.sin6_scope_id = scope;
    sa
}

/// An Ethernet frame carrying an RFC 5227 §3 ARP Announcement for `ip`.
pub(crate) fn arp_announcement(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]); // destination: broadcast
    f.extend_from_slice(&mac); // source
    f.extend_from_slice(&0x0806u16.to_be_bytes()); // EtherType ARP
    f.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f.push(6); // hardware address length
    f.push(4); // protocol address length
    f.extend_from_slice(&1u16.to_be_bytes()); // opcode: Request (RFC 5227 §3)
    f.extend_from_slice(&mac); // sender hardware address
    f.extend_from_slice(&ip.octets()); // sender protocol address
    f.extend_from_slice(&[0; 6]); // target hardware address: zero (ignored)
    f.extend_from_slice(&ip.octets()); // target protocol address = sender's
    f.resize(60, 0); // minimum Ethernet frame (without FCS)
    f
}

/// An ICMPv6 unsolicited Neighbor Advertisement (RFC 4861 §4.4, §7.2.6).
pub(crate) fn neighbor_advertisement(mac: [u8; 6], target: Ipv6Addr) -> Vec<u8> {
    let mut p = Vec::with_capacity(32);
    p.push(136); // type: Neighbor Advertisement
    p.push(0); // code
    p.extend_from_slice(&[0, 0]); // checksum: computed by the kernel
                                  // Flags: R=0 (not a router), S=0 (unsolicited), O=1 (override the
                                  // cached link-layer address), then 29 reserved bits.
    p.extend_from_slice(&[0x20, 0, 0, 0]);
    p.extend_from_slice(&target.octets());
    // Option: Target Link-Layer Address (type 2), length 1 (× 8 octets).
    p.extend_from_slice(&[2, 1]);
    p.extend_from_slice(&mac);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];

    #[test]
    fn arp_announcement_layout() {
        let f = arp_announcement(MAC, Ipv4Addr::new(198, 18, 0, 100));
        assert_eq!(f.len(), 60);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &MAC);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1], "an ARP request");
        assert_eq!(&f[22..28], &MAC);
        assert_eq!(&f[28..32], &[198, 18, 0, 100]);
        assert_eq!(&f[32..38], &[0; 6]);
        assert_eq!(&f[38..42], &[198, 18, 0, 100], "sender IP = target IP");
    }

    #[test]
    fn neighbor_advertisement_layout() {
        let target: Ipv6Addr = "2001:db8::64".parse().unwrap();
        let p = neighbor_advertisement(MAC, target);
        assert_eq!(p.len(), 32);
        assert_eq!(p[0], 136);
        assert_eq!(p[4], 0x20, "override set, solicited and router clear");
        assert_eq!(&p[8..24], &target.octets());
        assert_eq!(&p[24..26], &[2, 1]);
        assert_eq!(&p[26..32], &MAC);
    }
}
