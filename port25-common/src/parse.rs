//! Frame parsing: Ethernet (with VLAN/QinQ and PPPoE session), or raw IP, then IPv4/IPv6 and
//! the TCP destination port.
//!
//! Every read goes through [`Frame::bytes`], which fails rather than read past the frame, so
//! the same code runs in the kernel (helpers that bound-check) and on a host slice. Any doubt
//! about a packet that could be TCP to a blocked port becomes [`Packet::Doubt`] with its own
//! reason; the verdict turns a doubt into a block unless the addresses alone decide a pass.

use crate::{addr::Addr, reason::Reason};

/// Read access to a frame's bytes.
pub trait Frame {
    /// The `N` bytes at `offset`, or `None` when they are not all inside the frame.
    fn bytes<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;
}

impl Frame for [u8] {
    #[inline(always)]
    fn bytes<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let end = offset.checked_add(N)?;
        let s = self.get(offset..end)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Some(out)
    }
}

/// What sits in front of the IP header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// Ethernet II, possibly VLAN/QinQ tagged, possibly PPPoE session.
    Ethernet,
    /// No link header (ppp, tun): the frame starts with the IP header.
    RawIp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packet {
    NotIp,
    NotTcp,
    Tcp {
        src: Addr,
        dst: Addr,
        dport: u16,
    },
    /// Could be TCP to a blocked port, but the parser cannot be sure. The addresses are the
    /// ones that were read before the doubt arose, if any.
    Doubt {
        reason: Reason,
        src: Option<Addr>,
        dst: Option<Addr>,
    },
}

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const ETH_P_QINQ_OLD: u16 = 0x9100;
pub const ETH_P_PPPOE_SESS: u16 = 0x8864;
pub const PPP_IPV4: u16 = 0x0021;
pub const PPP_IPV6: u16 = 0x0057;
pub const IPPROTO_TCP: u8 = 6;

/// VLAN tags walked (QinQ = 2). One more is a doubt.
pub const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers walked before TCP. One more is a doubt.
pub const MAX_EXT_HEADERS: usize = 8;

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const PPPOE_HLEN: usize = 8; // PPPoE header (6) + PPP protocol (2)

enum L3 {
    V4,
    V6,
    Other,
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// Parses one frame.
#[inline(always)]
pub fn parse<F: Frame + ?Sized>(frame: &F, link: Link) -> Packet {
    let (l3, off) = match link {
        Link::RawIp => match frame.bytes::<1>(0) {
            Some([b]) if b >> 4 == 4 => (L3::V4, 0),
            Some([b]) if b >> 4 == 6 => (L3::V6, 0),
            // A raw-IP device carries only IP; anything else cannot be inspected.
            Some(_) => return doubt(Reason::BlockBadIpHeader),
            None => return Packet::NotIp,
        },
        Link::Ethernet => match ethernet(frame) {
            Ok(v) => v,
            Err(reason) => return doubt(reason),
        },
    };
    match l3 {
        L3::V4 => ipv4(frame, off),
        L3::V6 => ipv6(frame, off),
        L3::Other => Packet::NotIp,
    }
}

#[inline(always)]
fn doubt(reason: Reason) -> Packet {
    Packet::Doubt {
        reason,
        src: None,
        dst: None,
    }
}

/// Walks the link header; returns the L3 protocol and its offset.
#[inline(always)]
fn ethernet<F: Frame + ?Sized>(frame: &F) -> Result<(L3, usize), Reason> {
    // A frame too short for an Ethernet header carries nothing the stack would route.
    let Some(et) = frame.bytes::<2>(12) else {
        return Ok((L3::Other, 0));
    };
    let mut proto = be16(et);
    let mut off = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if !is_vlan(proto) {
            break;
        }
        proto = be16(frame.bytes::<2>(off + 2).ok_or(Reason::BlockTruncated)?);
        off += VLAN_HLEN;
    }
    if is_vlan(proto) {
        return Err(Reason::BlockEncap);
    }
    if proto == ETH_P_PPPOE_SESS {
        let ppp = be16(frame.bytes::<2>(off + 6).ok_or(Reason::BlockTruncated)?);
        off += PPPOE_HLEN;
        return Ok(match ppp {
            PPP_IPV4 => (L3::V4, off),
            PPP_IPV6 => (L3::V6, off),
            // LCP, IPCP, CHAP...: control traffic, not IP.
            _ => (L3::Other, off),
        });
    }
    Ok(match proto {
        ETH_P_IPV4 => (L3::V4, off),
        ETH_P_IPV6 => (L3::V6, off),
        _ => (L3::Other, off),
    })
}

#[inline(always)]
fn is_vlan(proto: u16) -> bool {
    proto == ETH_P_8021Q || proto == ETH_P_8021AD || proto == ETH_P_QINQ_OLD
}

#[inline(always)]
fn ipv4<F: Frame + ?Sized>(frame: &F, off: usize) -> Packet {
    let Some(h) = frame.bytes::<20>(off) else {
        return doubt(Reason::BlockTruncated);
    };
    let src = Addr::V4([h[12], h[13], h[14], h[15]]);
    let dst = Addr::V4([h[16], h[17], h[18], h[19]]);
    let fail = |reason| Packet::Doubt {
        reason,
        src: Some(src),
        dst: Some(dst),
    };
    let ihl = (h[0] & 0x0f) as usize * 4;
    if h[0] >> 4 != 4 || ihl < 20 {
        return fail(Reason::BlockBadIpHeader);
    }
    let tot_len = be16([h[2], h[3]]) as usize;
    if tot_len < ihl {
        return fail(Reason::BlockBadIpHeader);
    }
    // The whole datagram must be in the frame (padding after it is fine).
    if frame.bytes::<1>(off + tot_len - 1).is_none() {
        return fail(Reason::BlockTruncated);
    }
    if h[9] != IPPROTO_TCP {
        return Packet::NotTcp;
    }
    let frag_offset = be16([h[6], h[7]]) & 0x1fff;
    if frag_offset != 0 {
        return fail(Reason::BlockFragment);
    }
    match tcp_dport(frame, off + ihl, off + tot_len) {
        Ok(dport) => Packet::Tcp { src, dst, dport },
        Err(reason) => fail(reason),
    }
}

#[inline(always)]
fn ipv6<F: Frame + ?Sized>(frame: &F, off: usize) -> Packet {
    let Some(h) = frame.bytes::<40>(off) else {
        return doubt(Reason::BlockTruncated);
    };
    let mut s = [0u8; 16];
    let mut d = [0u8; 16];
    s.copy_from_slice(&h[8..24]);
    d.copy_from_slice(&h[24..40]);
    let (src, dst) = (Addr::V6(s), Addr::V6(d));
    let fail = |reason| Packet::Doubt {
        reason,
        src: Some(src),
        dst: Some(dst),
    };
    if h[0] >> 4 != 6 {
        return fail(Reason::BlockBadIpHeader);
    }
    let end = off + 40 + be16([h[4], h[5]]) as usize;
    if end > off + 40 && frame.bytes::<1>(end - 1).is_none() {
        return fail(Reason::BlockTruncated);
    }
    let mut nh = h[6];
    let mut cur = off + 40;
    for _ in 0..MAX_EXT_HEADERS {
        match nh {
            IPPROTO_TCP => {
                return match tcp_dport(frame, cur, end) {
                    Ok(dport) => Packet::Tcp { src, dst, dport },
                    Err(reason) => fail(reason),
                };
            }
            // Hop-by-hop, routing, destination options, mobility, HIP, shim6, experimental:
            // all in the RFC 6564 shape, length in 8-octet units not counting the first.
            0 | 43 | 60 | 135 | 139 | 140 | 253 | 254 => {
                let Some([next, len]) = within::<F, 2>(frame, cur, end) else {
                    return fail(Reason::BlockTruncated);
                };
                nh = next;
                cur += (len as usize + 1) * 8;
            }
            // Authentication header: length in 4-octet units, minus 2.
            51 => {
                let Some([next, len]) = within::<F, 2>(frame, cur, end) else {
                    return fail(Reason::BlockTruncated);
                };
                nh = next;
                cur += (len as usize + 2) * 4;
            }
            // Fragment header: only the first fragment shows the ports.
            44 => {
                let Some(f) = within::<F, 8>(frame, cur, end) else {
                    return fail(Reason::BlockTruncated);
                };
                if be16([f[2], f[3]]) >> 3 != 0 {
                    return fail(Reason::BlockFragment);
                }
                nh = f[0];
                cur += 8;
            }
            // No next header, UDP, ICMPv6, ESP, and everything else that is not TCP.
            _ => return Packet::NotTcp,
        }
    }
    if nh == IPPROTO_TCP || is_ext_header(nh) {
        return fail(Reason::BlockExtChain);
    }
    Packet::NotTcp
}

#[inline(always)]
fn is_ext_header(nh: u8) -> bool {
    matches!(nh, 0 | 43 | 44 | 51 | 60 | 135 | 139 | 140 | 253 | 254)
}

/// `N` bytes at `off`, only if they end at or before `end` (the IP payload's end).
#[inline(always)]
fn within<F: Frame + ?Sized, const N: usize>(frame: &F, off: usize, end: usize) -> Option<[u8; N]> {
    if off + N > end {
        return None;
    }
    frame.bytes::<N>(off)
}

/// The TCP destination port, once the header is known to be whole and sane.
#[inline(always)]
fn tcp_dport<F: Frame + ?Sized>(frame: &F, l4: usize, end: usize) -> Result<u16, Reason> {
    let t = within::<F, 20>(frame, l4, end).ok_or(Reason::BlockTruncated)?;
    let doff = (t[12] >> 4) as usize * 4;
    if doff < 20 {
        return Err(Reason::BlockBadTcpHeader);
    }
    if l4 + doff > end {
        return Err(Reason::BlockTruncated);
    }
    Ok(be16([t[2], t[3]]))
}
