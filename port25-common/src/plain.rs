//! The parser's fast path: the frames an access router forwards most, read with the fewest
//! reads. Untagged Ethernet or raw IP; IPv4 without options or IPv6 without extension
//! headers; then TCP, UDP off the tunnel ports, or a protocol that is neither.
//!
//! It answers only where [`parse_flat`] gives the same result (shape, addresses, port and
//! flags), with the same checks in the same terms, and defers everywhere else: a tag,
//! PPPoE, MPLS, IP options, an extension header, a tunnel, a fragment, any header the full
//! parser would doubt. What it does not take, the full parser decides. The kernel programs
//! parse through [`parse_plain_first`]; the reference model never does, so the kernel
//! tables and the differential fuzz compare the fast path in the kernel against the full
//! parser, and `plain_agrees_with_parse_flat` (tests crate) does on the host.

use crate::{
    addr::Ip16,
    parse::{
        parse_flat, Frame, Link, Parsed, Shape, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IPV4, ETH_P_IPV6,
        ETH_P_MPLS_MC, ETH_P_MPLS_UC, ETH_P_PPPOE_SESS, ETH_P_QINQ_OLD, GENEVE_PORT, IPPROTO_GRE,
        IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_TCP, IPPROTO_UDP, VXLAN_PORT,
    },
    reason::Reason,
};

/// [`parse_flat`]'s result, read by the fast path when the frame is plain.
#[inline(always)]
pub fn parse_plain_first<F: Frame + ?Sized>(frame: &F, link: Link) -> Parsed {
    let mut out = Parsed::bare(Shape::NotIp, Reason::PassNotIp);
    if plain(frame, link, &mut out) {
        out
    } else {
        parse_flat(frame, link)
    }
}

const ETH_HLEN: usize = 14;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;

#[inline(always)]
fn be16(a: u8, b: u8) -> u16 {
    u16::from_be_bytes([a, b])
}

/// What the transport header settles.
#[derive(Clone, Copy, PartialEq, Eq)]
enum L4 {
    /// Not for the fast path.
    Defer,
    NotTcp,
    /// A whole and sane TCP header: destination port and flags, as [`Parsed`] holds them.
    Tcp(u16, u8),
}

/// Writes the frame's parse to `out` (which starts as "not IP") when it is one of the plain
/// forms; `false` leaves it to the full parser.
#[inline(always)]
pub fn plain<F: Frame + ?Sized>(frame: &F, link: Link, out: &mut Parsed) -> bool {
    let (proto, off) = match link {
        Link::Ethernet => {
            let Some([a, b]) = frame.bytes::<2>(12) else {
                return false;
            };
            match be16(a, b) {
                ETH_P_IPV4 => (ETH_P_IPV4, ETH_HLEN),
                ETH_P_IPV6 => (ETH_P_IPV6, ETH_HLEN),
                ETH_P_8021Q | ETH_P_8021AD | ETH_P_QINQ_OLD | ETH_P_PPPOE_SESS | ETH_P_MPLS_UC
                | ETH_P_MPLS_MC => return false,
                // ARP, LLDP, PPPoE discovery, an 802.3 length: never IP.
                _ => return true,
            }
        }
        Link::RawProto(p @ (ETH_P_IPV4 | ETH_P_IPV6)) => (p, 0),
        Link::RawProto(_) => return false,
    };
    let l4 = if proto == ETH_P_IPV4 {
        ipv4(frame, off, out)
    } else {
        ipv6(frame, off, out)
    };
    match l4 {
        L4::Defer => false,
        L4::NotTcp => {
            out.shape = Shape::NotTcp;
            out.reason = Reason::PassNotTcp;
            true
        }
        L4::Tcp(dport, flags) => {
            out.shape = Shape::Tcp;
            out.reason = Reason::BlockPort;
            out.addrs = true;
            out.dport = dport;
            out.tcp_flags = flags;
            true
        }
    }
}

#[inline(always)]
fn ipv4<F: Frame + ?Sized>(frame: &F, off: usize, out: &mut Parsed) -> L4 {
    let Some(h) = frame.bytes::<IPV4_HLEN>(off) else {
        return L4::Defer;
    };
    // Version 4 and no options; a datagram that is not a fragment.
    if h[0] != 0x45 || be16(h[6], h[7]) & 0x3fff != 0 {
        return L4::Defer;
    }
    let tot_len = be16(h[2], h[3]) as usize;
    // The whole datagram in the frame (padding after it is fine).
    if tot_len < IPV4_HLEN || frame.bytes::<1>(off + tot_len - 1).is_none() {
        return L4::Defer;
    }
    out.v6 = false;
    out.src = Ip16::from_v4([h[12], h[13], h[14], h[15]]);
    out.dst = Ip16::from_v4([h[16], h[17], h[18], h[19]]);
    l4(frame, h[9], off + IPV4_HLEN, off + tot_len)
}

#[inline(always)]
fn ipv6<F: Frame + ?Sized>(frame: &F, off: usize, out: &mut Parsed) -> L4 {
    let Some(h) = frame.bytes::<IPV6_HLEN>(off) else {
        return L4::Defer;
    };
    if h[0] >> 4 != 6 {
        return L4::Defer;
    }
    let start = off + IPV6_HLEN;
    let end = start + be16(h[4], h[5]) as usize;
    if end > start && frame.bytes::<1>(end - 1).is_none() {
        return L4::Defer;
    }
    out.v6 = true;
    out.src = Ip16::from_slice(&h, 8);
    out.dst = Ip16::from_slice(&h, 24);
    match h[6] {
        // Extension headers (hop-by-hop, routing, fragment, destination options, AH,
        // mobility, HIP, shim6, experimental): the full parser walks them.
        0 | 43 | 44 | 51 | 60 | 135 | 139 | 140 | 253 | 254 => L4::Defer,
        nh => l4(frame, nh, start, end),
    }
}

/// The transport header of protocol `proto` at `at`, in an IP payload ending at `end`.
#[inline(always)]
fn l4<F: Frame + ?Sized>(frame: &F, proto: u8, at: usize, end: usize) -> L4 {
    match proto {
        IPPROTO_TCP => {
            if at + TCP_HLEN > end {
                return L4::Defer;
            }
            let Some(t) = frame.bytes::<TCP_HLEN>(at) else {
                return L4::Defer;
            };
            let doff = (t[12] >> 4) as usize * 4;
            if doff < TCP_HLEN || at + doff > end {
                return L4::Defer;
            }
            L4::Tcp(be16(t[2], t[3]), t[13])
        }
        // A UDP tunnel is looked into only on its port; a datagram too short for a header
        // the full parser judges on its own.
        IPPROTO_UDP => {
            if at + UDP_HLEN > end {
                return L4::Defer;
            }
            match frame.bytes::<4>(at) {
                Some(u) if !matches!(be16(u[2], u[3]), VXLAN_PORT | GENEVE_PORT) => L4::NotTcp,
                _ => L4::Defer,
            }
        }
        IPPROTO_IPIP | IPPROTO_IPV6 | IPPROTO_GRE => L4::Defer,
        _ => L4::NotTcp,
    }
}
