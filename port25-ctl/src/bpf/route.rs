//! Which device the kernel routes an address through (RTM_GETROUTE), so a `session up`
//! finds its ppp device without being told.

use std::net::IpAddr;

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_route::{
    route::{RouteAttribute, RouteHeader, RouteMessage},
    AddressFamily, RouteNetlinkMessage,
};

/// The output ifindex of the route to `addr` in this network namespace; None when there is
/// no route or the lookup fails.
pub fn oif(addr: IpAddr) -> Option<u32> {
    use nix::sys::socket::{
        recv, send, socket, AddressFamily as Af, MsgFlags, SockFlag, SockProtocol, SockType,
    };
    use std::os::fd::AsRawFd as _;
    let mut msg = RouteMessage::default();
    msg.header.address_family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    msg.header.destination_prefix_length = if addr.is_ipv4() { 32 } else { 128 };
    msg.header.table = RouteHeader::RT_TABLE_UNSPEC;
    msg.attributes
        .push(RouteAttribute::Destination(addr.into()));
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    header.sequence_number = 1;
    let mut req = NetlinkMessage::new(
        header,
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetRoute(msg)),
    );
    req.finalize();
    let mut buf = vec![0u8; req.buffer_len()];
    req.serialize(&mut buf);
    let fd = socket(
        Af::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .ok()?;
    send(fd.as_raw_fd(), &buf, MsgFlags::empty()).ok()?;
    let mut answer = vec![0u8; 16 << 10];
    let n = recv(fd.as_raw_fd(), &mut answer, MsgFlags::empty()).ok()?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer[..n]).ok()?;
    match reply.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(r)) => {
            r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    /// Loopback is routed through `lo` in every namespace.
    #[test]
    fn loopback_is_routed_through_lo() {
        let lo = crate::bpf::linkinfo::ifindex("lo");
        assert_eq!(super::oif("127.0.0.1".parse().unwrap()), Some(lo));
    }
}
