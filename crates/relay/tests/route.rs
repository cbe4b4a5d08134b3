//! Next-hop resolution against a stub DNS server on loopback (UDP, port
//! 0): MX by preference, the A/AAAA fallback of RFC 5321 5.1, null MX
//! (RFC 7505), a domain that does not exist, and a resolver that does not
//! answer; the transport map and the smarthost need no DNS for addresses.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::str::FromStr;

use hamail_relay::route::{HostPort, RouteConfig, Router};
use hamail_relay::RelayError;
use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, MX};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use hickory_resolver::proto::serialize::binary::BinEncodable;

/// Answers from a fixed zone, forever, on its own thread.
fn stub_dns() -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf) else { continue };
            let Ok(query) = Message::from_vec(&buf[..n]) else { continue };
            let mut reply = Message::new();
            reply.set_id(query.id()).set_message_type(MessageType::Response).set_op_code(query.op_code());
            reply.set_recursion_desired(query.recursion_desired()).set_recursion_available(true);
            reply.set_authoritative(true);
            for q in query.queries() {
                reply.add_query(q.clone());
                let name = q.name().to_ascii().to_ascii_lowercase();
                let mx = |pref: u16, host: &str| RData::MX(MX::new(pref, Name::from_str(host).unwrap()));
                let a = |ip: [u8; 4]| RData::A(A(Ipv4Addr::from(ip)));
                let answers: Option<Vec<RData>> = match (name.as_str(), q.query_type()) {
                    ("two.test.", RecordType::MX) => Some(vec![mx(20, "backup.two.test."), mx(10, "main.two.test.")]),
                    ("main.two.test.", RecordType::A) => Some(vec![a([127, 0, 0, 10])]),
                    ("backup.two.test.", RecordType::A) => Some(vec![a([127, 0, 0, 20])]),
                    ("nomx.test.", RecordType::A) => Some(vec![a([127, 0, 0, 30])]),
                    ("nomx.test.", _) => Some(vec![]),
                    ("null.test.", RecordType::MX) => Some(vec![mx(0, ".")]),
                    ("relay.test.", RecordType::A) => Some(vec![a([127, 0, 0, 40])]),
                    (_, RecordType::AAAA) => Some(vec![]),
                    _ => None,
                };
                match answers {
                    Some(list) => {
                        for rdata in list {
                            reply.add_answer(Record::from_rdata(q.name().clone(), 60, rdata));
                        }
                    }
                    None => {
                        reply.set_response_code(ResponseCode::NXDomain);
                    }
                }
            }
            if let Ok(bytes) = reply.to_bytes() {
                let _ = sock.send_to(&bytes, peer);
            }
        }
    });
    addr
}

fn router(resolver: SocketAddr) -> Router {
    Router::new(RouteConfig { resolver: Some(resolver), mx_port: 2525, ..RouteConfig::default() }).unwrap()
}

#[tokio::test]
async fn mx_by_preference_then_address_fallback_null_mx_and_nxdomain() {
    let r = router(stub_dns());
    let hops = r.hops("two.test").await.unwrap();
    let names: Vec<&str> = hops.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, vec!["main.two.test", "backup.two.test"]);
    assert_eq!(hops[0].addrs, vec!["127.0.0.10:2525".parse().unwrap()]);
    assert_eq!(hops[1].addrs, vec!["127.0.0.20:2525".parse().unwrap()]);

    let hops = r.hops("nomx.test").await.unwrap();
    assert_eq!(hops.len(), 1, "{hops:?}");
    assert_eq!(hops[0].addrs, vec!["127.0.0.30:2525".parse().unwrap()]);

    let e = r.hops("null.test").await.unwrap_err();
    assert!(matches!(&e, RelayError::Permanent(m) if m.contains("5.1.10")), "{e}");
    let e = r.hops("gone.test").await.unwrap_err();
    assert!(matches!(&e, RelayError::Permanent(m) if m.contains("does not exist")), "{e}");
    assert_eq!(r.destination("two.test").0, "two.test");
}

#[tokio::test]
async fn a_silent_resolver_is_a_temporary_failure() {
    // A UDP socket that never answers.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let r = router(silent.local_addr().unwrap());
    let e = r.hops("two.test").await.unwrap_err();
    assert!(e.is_temporary(), "{e}");
}

#[tokio::test]
async fn transport_map_and_smarthost_come_first() {
    let dns = stub_dns();
    let mut transport = std::collections::HashMap::new();
    transport.insert("mapped.test".to_string(), HostPort::parse("127.0.0.5:2600", 25).unwrap());
    let r = Router::new(RouteConfig {
        transport,
        smarthost: Some(HostPort::parse("relay.test:587", 25).unwrap()),
        resolver: Some(dns),
        mx_port: 25,
    })
    .unwrap();
    let hops = r.hops("mapped.test").await.unwrap();
    assert_eq!(hops[0].addrs, vec!["127.0.0.5:2600".parse().unwrap()]);
    assert!(!hops[0].smarthost);
    let hops = r.hops("two.test").await.unwrap();
    assert_eq!((hops[0].name.as_str(), hops[0].smarthost), ("relay.test", true));
    assert_eq!(hops[0].addrs, vec!["127.0.0.40:587".parse().unwrap()]);
    assert_eq!(r.destination("two.test"), r.destination("other.test"), "one smarthost, one destination");
    assert_ne!(r.destination("mapped.test"), r.destination("two.test"));
}
