//! Frame parsing: Ethernet (with VLAN/QinQ and PPPoE session), or raw IP, then IPv4/IPv6 and
//! the TCP destination port.
//!
//! Encapsulations are read as the Linux receive path after them takes them in (`pppoe_rcv`,
//! `ppp_input`, `ppp_receive_nonmp_frame`, `__netif_receive_skb_core`): what the kernel
//! would turn into IP but the frame does not show (VJ, multilink, compression, MPLS) is a
//! doubt with its own reason, never "not IP".
//!
//! Tunnels a host on the Internet may decapsulate for anyone (IPIP, 6in4, GRE, VXLAN on UDP
//! 4789, GENEVE on UDP 6081) are looked into exactly one level deep, as the far kernel's
//! receive path takes them in (`ipip_rcv`/`ip_tunnel_rcv`, `ipip6_rcv`, `ip6_tnl_rcv`,
//! `gre_rcv`/`gre_parse_header`, `vxlan_rcv`, `geneve_udp_encap_recv`): the inner packet is
//! the one that decides, by its own addresses and port. A tunnel in the tunnel is a doubt.
//!
//! Every read goes through [`Frame::bytes`], which fails rather than read past the frame, so
//! the same code runs in the kernel (helpers that bound-check) and on a host slice. Any doubt
//! about a packet that could be TCP to a blocked port becomes [`Packet::Doubt`] with its own
//! reason; the verdict turns a doubt into a block unless the addresses alone decide a pass.

use crate::{
    addr::{Addr, Ip16},
    reason::Reason,
};

/// Read access to a frame's bytes.
pub trait Frame {
    /// The `N` bytes at `offset`, or `None` when they are not all inside the frame.
    fn bytes<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;

    /// The same two values, with what the kernel's verifier knows of them forgotten (`None`
    /// only if that fails). The inner layer of a tunnel is reached from many outer paths,
    /// each with its own known range for the offsets; offsets only ever go to bounds-checked
    /// reads, so the verifier needs no range for them, and forgetting lets it verify the
    /// inner layer once per kind instead of once per outer path (over its 1M limit).
    #[inline(always)]
    fn forget(&self, a: usize, b: usize) -> Option<(usize, usize)> {
        Some((a, b))
    }
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
    /// No link header (ppp, tun); the skb's `protocol` (ethertype, host order) says what the
    /// stack will take the frame for (a tun device without packet information sets it from
    /// the version nibble in `tun_get_user`). `ppp_receive_nonmp_frame` sets it from the PPP protocol
    /// (`npindex_to_ethertype`), so an MPLS frame can start with the nibble 4.
    RawProto(u16),
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
pub const ETH_P_MPLS_UC: u16 = 0x8847;
pub const ETH_P_MPLS_MC: u16 = 0x8848;
pub const PPP_IPV4: u16 = 0x0021;
pub const PPP_IPV6: u16 = 0x0057;
/// Van Jacobson compressed TCP/IP (`PPP_VJC_COMP`).
pub const PPP_VJC_COMP: u16 = 0x002d;
/// Van Jacobson uncompressed TCP/IP (`PPP_VJC_UNCOMP`): IPv4 with the slot in the protocol byte.
pub const PPP_VJC_UNCOMP: u16 = 0x002f;
/// Multilink fragment (`PPP_MP`).
pub const PPP_MP: u16 = 0x003d;
/// Individual-link compressed datagram (`PPP_COMPFRAG`, RFC 1962).
pub const PPP_COMPFRAG: u16 = 0x00fb;
/// Compressed datagram (`PPP_COMP`: deflate, BSD, MPPC/MPPE via CCP).
pub const PPP_COMP: u16 = 0x00fd;
pub const PPP_MPLS_UC: u16 = 0x0281;
pub const PPP_MPLS_MC: u16 = 0x0283;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_GRE: u8 = 47;
/// Transparent Ethernet bridging: an Ethernet frame follows (gretap, GENEVE).
pub const ETH_P_TEB: u16 = 0x6558;
/// WCCP redirection: `gre_parse_header` takes it for IPv4.
pub const ETH_P_WCCP: u16 = 0x883e;
pub const VXLAN_PORT: u16 = 4789;
pub const GENEVE_PORT: u16 = 6081;

/// VLAN tags walked (QinQ = 2). One more is a doubt.
pub const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers walked before TCP. One more is a doubt.
pub const MAX_EXT_HEADERS: usize = 8;

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
/// PPPoE header (ver/type, code, session id, length), before the PPP protocol field.
const PPPOE_HLEN: usize = 6;

#[derive(Clone, Copy)]
enum L3 {
    V4,
    /// IPv4 whose protocol byte holds a VJ slot number: TCP once `slhc_remember` restores it.
    V4VjTcp,
    V6,
    Other,
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// Where the next layer to parse starts. A struct with every field set, not an enum with
/// data: the loop carries it, and LLVM may otherwise copy an unset variant field, which the
/// verifier refuses (`!read_ok`).
#[derive(Clone, Copy)]
struct Next {
    kind: Kind,
    /// `Kind::Ip`: the inner packet's protocol (an ethertype); the version nibble must agree.
    proto: u16,
    off: usize,
    /// Where the tunnel payload ends.
    limit: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// An Ethernet frame: the frame itself, or one inside a tunnel (VXLAN, GENEVE, gretap).
    Eth,
    /// An IP packet of a given protocol: a raw device's ([`Link::RawProto`]), or inside a
    /// tunnel (which sets the protocol the same way).
    Ip,
    /// Nothing: the answer is known.
    Done,
}

impl Next {
    #[inline(always)]
    fn eth(off: usize, limit: usize) -> Next {
        Next {
            kind: Kind::Eth,
            proto: 0,
            off,
            limit,
        }
    }
    #[inline(always)]
    fn ip(proto: u16, off: usize, limit: usize) -> Next {
        Next {
            kind: Kind::Ip,
            proto,
            off,
            limit,
        }
    }
}

/// The parse result as the datapath carries it: a plain struct whose every field is set on
/// every path. A [`Packet`] (or any enum with data) merged from many exits leaves the fields
/// of the other variants undefined, and LLVM may move a read of one (a `dport & 0xffff`) into
/// a block every exit shares: the verifier refuses the undefined register (`R9 !read_ok`).
///
/// `repr(C, align(8))` with the addresses first, each two words ([`Ip16`]): offender tracking
/// and the kernel log hand them over as four u64 values, with no byte assembly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C, align(8))]
pub struct Parsed {
    pub src: Ip16,
    pub dst: Ip16,
    pub shape: Shape,
    /// `Shape::Doubt`: why (otherwise unused).
    pub reason: Reason,
    /// Whether `src`/`dst` hold addresses read from the packet (always for `Shape::Tcp`).
    pub addrs: bool,
    /// The addresses are IPv6; IPv4 ones sit in the first 4 bytes, the rest zero.
    pub v6: bool,
    /// `Shape::Tcp`: the destination port (otherwise 0).
    pub dport: u16,
    /// `Shape::Tcp`: the TCP flags byte (SYN, ACK, ...; otherwise 0). Offender tracking
    /// counts a SYN without ACK as a connection attempt; the verdict never reads it.
    pub tcp_flags: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Shape {
    NotIp = 0,
    NotTcp = 1,
    Tcp = 2,
    Doubt = 3,
}

impl Parsed {
    #[inline(always)]
    pub(crate) const fn bare(shape: Shape, reason: Reason) -> Parsed {
        Parsed {
            shape,
            reason,
            addrs: false,
            v6: false,
            src: Ip16::ZERO,
            dst: Ip16::ZERO,
            dport: 0,
            tcp_flags: 0,
        }
    }

    /// The same result as a [`Packet`].
    #[inline(always)]
    pub fn packet(&self) -> Packet {
        let addr = |a: &Ip16| {
            if self.v6 {
                Addr::V6(a.bytes())
            } else {
                Addr::V4(a.v4())
            }
        };
        match self.shape {
            Shape::NotIp => Packet::NotIp,
            Shape::NotTcp => Packet::NotTcp,
            Shape::Tcp => Packet::Tcp {
                src: addr(&self.src),
                dst: addr(&self.dst),
                dport: self.dport,
            },
            Shape::Doubt => Packet::Doubt {
                reason: self.reason,
                src: if self.addrs {
                    Some(addr(&self.src))
                } else {
                    None
                },
                dst: if self.addrs {
                    Some(addr(&self.dst))
                } else {
                    None
                },
            },
        }
    }

    /// A [`Packet`] as a `Parsed` (a doubt with only one address known keeps none).
    pub fn from_packet(p: &Packet) -> Parsed {
        let put = |a: Addr, out: &mut Ip16| match a {
            Addr::V4(b) => *out = Ip16::from_v4(b),
            Addr::V6(b) => *out = Ip16::from_bytes(b),
        };
        match *p {
            Packet::NotIp => Parsed::bare(Shape::NotIp, Reason::PassNotIp),
            Packet::NotTcp => Parsed::bare(Shape::NotTcp, Reason::PassNotTcp),
            Packet::Tcp { src, dst, dport } => {
                let mut out = Parsed::bare(Shape::Tcp, Reason::BlockPort);
                out.addrs = true;
                out.v6 = matches!(src, Addr::V6(_));
                put(src, &mut out.src);
                put(dst, &mut out.dst);
                out.dport = dport;
                out
            }
            Packet::Doubt {
                reason,
                src: Some(src),
                dst: Some(dst),
            } => {
                let mut out = Parsed::bare(Shape::Doubt, reason);
                out.addrs = true;
                out.v6 = matches!(src, Addr::V6(_));
                put(src, &mut out.src);
                put(dst, &mut out.dst);
                out
            }
            Packet::Doubt { reason, .. } => Parsed::bare(Shape::Doubt, reason),
        }
    }
}

const NOT_IP: Parsed = Parsed::bare(Shape::NotIp, Reason::PassNotIp);
const NOT_TCP: Parsed = Parsed::bare(Shape::NotTcp, Reason::PassNotTcp);

/// An answer that carries the addresses the IP layer wrote into the result (see `ipv4`);
/// `tcp` is [`tcp_dport`]'s port and flags (0 for a doubt).
#[inline(always)]
const fn with_addrs(shape: Shape, reason: Reason, tcp: u32) -> Parsed {
    Parsed {
        shape,
        reason,
        addrs: true,
        v6: false,
        src: Ip16::ZERO,
        dst: Ip16::ZERO,
        dport: tcp as u16,
        tcp_flags: (tcp >> 16) as u8,
    }
}

/// What one layer leaves to parse next: the answer is written to the caller's [`Parsed`]
/// instead, and `Kind::Done` says so (one result in place, not copied out of every exit:
/// the copies would outgrow the 512-byte stack).
const DONE: Next = Next {
    kind: Kind::Done,
    proto: 0,
    off: 0,
    limit: 0,
};

#[inline(always)]
fn done(out: &mut Parsed, p: Parsed) -> Next {
    // Only the scalars: the addresses are already in place (written by the IP layer when it
    // read them, and not looked at when `addrs` is false).
    out.shape = p.shape;
    out.reason = p.reason;
    out.addrs = p.addrs;
    out.dport = p.dport;
    out.tcp_flags = p.tcp_flags;
    DONE
}

/// How many IP layers are parsed: the outer one and one inside a tunnel.
const MAX_IP_LAYERS: usize = 2;

/// Parses one frame.
#[inline(always)]
pub fn parse<F: Frame + ?Sized>(frame: &F, link: Link) -> Packet {
    parse_flat(frame, link).packet()
}

/// Parses one frame into the datapath's form (what the kernel programs decide on).
#[inline(always)]
pub fn parse_flat<F: Frame + ?Sized>(frame: &F, link: Link) -> Parsed {
    // One code path for the outer and the inner layer, so that the programs hold the IP
    // parsers once (a second inlined copy would double the verifier's work).
    let mut next = match link {
        Link::Ethernet => Next::eth(0, usize::MAX),
        Link::RawProto(proto) => Next::ip(proto, 0, usize::MAX),
    };
    // The inner packet is itself a tunnel the far side would take in: its inner source,
    // not the one read so far, is what a decapsulator would send from.
    let mut out = doubt(Reason::BlockTunnelDepth);
    for _ in 0..MAX_IP_LAYERS {
        next = layer(frame, next, &mut out);
        if next.kind == Kind::Done {
            break;
        }
        match frame.forget(next.off, next.limit) {
            Some((off, limit)) => {
                next.off = off;
                next.limit = limit;
            }
            // Never in practice (a per-CPU scratch slot that is always there); fail closed.
            None => break,
        }
    }
    // Each exit leaves its own constants (shape, reason, flags), and the verifier would walk
    // the verdict once per exit: forgotten, it walks it once per shape.
    let tag = out.reason as usize
        | (out.shape as usize) << 32
        | (out.addrs as usize) << 40
        | (out.v6 as usize) << 41;
    match frame.forget(tag, out.dport as usize | (out.tcp_flags as usize) << 16) {
        Some((tag, tcp)) => {
            out.reason = Reason::from_u32_or_block(tag as u32);
            out.shape = match (tag >> 32) as u8 {
                0 => Shape::NotIp,
                1 => Shape::NotTcp,
                2 => Shape::Tcp,
                _ => Shape::Doubt,
            };
            out.addrs = (tag >> 40) & 1 == 1;
            out.v6 = (tag >> 41) & 1 == 1;
            out.dport = tcp as u16;
            out.tcp_flags = (tcp >> 16) as u8;
            out
        }
        None => doubt(Reason::BlockTunnelDepth),
    }
}

/// One IP layer at `next`, and the tunnel header after it if there is one.
#[inline(always)]
fn layer<F: Frame + ?Sized>(frame: &F, next: Next, out: &mut Parsed) -> Next {
    // `limit`: where the datagram must end at the latest (the PPPoE payload's or the
    // tunnel payload's end; otherwise no bound but the frame's own end).
    let (l3, off, limit) = match start(frame, next) {
        Ok(Some(v)) => v,
        Ok(None) => return done(out, NOT_IP),
        Err(reason) => return done(out, doubt(reason)),
    };
    match l3 {
        L3::V4 => ipv4(frame, off, limit, false, out),
        L3::V4VjTcp => ipv4(frame, off, limit, true, out),
        L3::V6 => ipv6(frame, off, limit, out),
        L3::Other => done(out, NOT_IP),
    }
}

/// The L3 protocol, offset and limit of the layer `next` points at. `None`: not IP.
#[inline(always)]
fn start<F: Frame + ?Sized>(frame: &F, next: Next) -> Result<Option<(L3, usize, usize)>, Reason> {
    let Next {
        kind,
        proto,
        off,
        limit,
    } = next;
    let (l3, off, limit) = match kind {
        Kind::Eth => ethernet(frame, off, limit)?,
        Kind::Ip => (raw(frame, off, limit, proto)?, off, limit),
        Kind::Done => return Ok(None),
    };
    Ok(Some((l3, off, limit)))
}

/// The tunnel header of `proto` at `at`, in an IP payload ending at `end`: where the inner
/// layer starts, or the answer when there is none (what the far kernel drops is not TCP).
#[inline(always)]
fn decap<F: Frame + ?Sized>(
    frame: &F,
    proto: u8,
    at: usize,
    end: usize,
    v6: bool,
    out: &mut Parsed,
) -> Next {
    match proto {
        // `ipip_rcv` / `ip6_tnl_rcv` (ip4ip6): the payload is an IPv4 packet.
        IPPROTO_IPIP => Next::ip(ETH_P_IPV4, at, end),
        // `ipip6_rcv` (sit, 6in4) / `ip6_tnl_rcv` (ip6ip6): an IPv6 packet.
        IPPROTO_IPV6 => Next::ip(ETH_P_IPV6, at, end),
        IPPROTO_GRE => gre(frame, at, end, out),
        IPPROTO_UDP => udp(frame, at, end, v6, out),
        _ => done(out, NOT_TCP),
    }
}

/// GRE as `gre_rcv` (gre_demux.c) and `gre_parse_header` take it in, version 0 only.
#[inline(always)]
fn gre<F: Frame + ?Sized>(frame: &F, at: usize, end: usize, out: &mut Parsed) -> Next {
    let Some(h) = within::<F, 4>(frame, at, end) else {
        return done(out, doubt(Reason::BlockTruncated));
    };
    // `gre_rcv` hands version 1 to PPTP (a call set up by a control connection: a VPN, not
    // an open decapsulator) and drops the rest; `gre_parse_header` drops the routing bit
    // and any version but 0. Dropped by the far side: not TCP.
    if h[1] & 0x7f != 0 || h[0] & 0x40 != 0 {
        return done(out, NOT_TCP);
    }
    // `gre_calc_hlen`: 4 bytes, plus 4 each for checksum, key and sequence number.
    let mut off = at + 4;
    for bit in [0x80u8, 0x20, 0x10] {
        if h[0] & bit != 0 {
            off += 4;
        }
    }
    let mut proto = be16([h[2], h[3]]);
    // `gre_parse_header`: WCCP with no flags at all is IPv4, after a 4-byte WCCPv2 header
    // unless the first byte already looks like IPv4.
    if h[0] == 0 && h[1] == 0 && proto == ETH_P_WCCP {
        proto = ETH_P_IPV4;
        match within::<F, 1>(frame, off, end) {
            Some([b]) if b >> 4 != 4 => off += 4,
            _ => {}
        }
    }
    inner(proto, off, end)
}

/// UDP tunnels on their IANA ports: VXLAN (`vxlan_rcv`) and GENEVE (`geneve_udp_encap_recv`).
#[inline(always)]
fn udp<F: Frame + ?Sized>(frame: &F, at: usize, end: usize, v6: bool, out: &mut Parsed) -> Next {
    // `__udp4_lib_rcv` / `udpv6_rcv` drop what has no whole header or a length beyond the
    // payload, and trim the payload to the length (0 in IPv6: the whole payload).
    let Some(u) = within::<F, 16>(frame, at, end) else {
        // A UDP header and a tunnel header cannot both be there: nothing to decapsulate, but a
        // cut tunnel header is a doubt (the datagram may go on in the frame; `within` says no).
        return match within::<F, 8>(frame, at, end) {
            Some(u) if is_tunnel_port(be16([u[2], u[3]])) => {
                done(out, doubt(Reason::BlockTruncated))
            }
            _ => done(out, NOT_TCP),
        };
    };
    let dport = be16([u[2], u[3]]);
    if !is_tunnel_port(dport) {
        return done(out, NOT_TCP);
    }
    let mut ulen = be16([u[4], u[5]]) as usize;
    if v6 && ulen == 0 {
        ulen = end - at;
    }
    if ulen < 8 || ulen > end - at {
        return done(out, NOT_TCP);
    }
    let limit = at + ulen;
    let t = at + 8;
    let Some(g) = within::<F, 8>(frame, t, limit) else {
        return done(out, doubt(Reason::BlockTruncated));
    };
    if dport == VXLAN_PORT {
        // `vxlan_rcv`: the I flag must be set; an Ethernet frame follows the 8-byte header.
        if g[0] & 0x08 == 0 {
            return done(out, NOT_TCP);
        }
        return Next::eth(t + 8, limit);
    }
    // GENEVE: version 0 only; options of opt_len 4-byte words; TEB or (with
    // `inner_proto_inherit`) the inner protocol itself.
    if g[0] >> 6 != 0 {
        return done(out, NOT_TCP);
    }
    let off = t + 8 + (g[0] & 0x3f) as usize * 4;
    // Options cut by the datagram's end: a cut tunnel header, as above.
    if off > limit {
        return done(out, doubt(Reason::BlockTruncated));
    }
    inner(be16([g[2], g[3]]), off, limit)
}

#[inline(always)]
fn is_tunnel_port(port: u16) -> bool {
    port == VXLAN_PORT || port == GENEVE_PORT
}

/// A tunnel payload of protocol type `proto` (an ethertype) at `off`.
#[inline(always)]
fn inner(proto: u16, off: usize, limit: usize) -> Next {
    if proto == ETH_P_TEB {
        Next::eth(off, limit)
    } else {
        Next::ip(proto, off, limit)
    }
}

/// A device without a link header: `skb->protocol` decides, as `__netif_receive_skb_core`
/// dispatches by it. The version nibble must agree: `ip_rcv`/`ipv6_rcv` drop a packet whose
/// version is not theirs, so a disagreement is never a pass.
/// Tunnels set the inner packet's protocol the same way (`ip_tunnel_rcv`, `gre_rcv`,
/// `geneve_rx`), so the inner packet at `off` is judged by this too.
#[inline(always)]
fn raw<F: Frame + ?Sized>(frame: &F, off: usize, limit: usize, proto: u16) -> Result<L3, Reason> {
    let (l3, version) = match proto {
        ETH_P_IPV4 => (L3::V4, 4),
        ETH_P_IPV6 => (L3::V6, 6),
        // `mpls_forward` pops labels and may route the inner IP: nothing to look into here.
        ETH_P_MPLS_UC | ETH_P_MPLS_MC => return Err(Reason::BlockMpls),
        _ => return Ok(L3::Other),
    };
    let [b] = within::<F, 1>(frame, off, limit).ok_or(Reason::BlockTruncated)?;
    if b >> 4 != version {
        return Err(Reason::BlockBadIpHeader);
    }
    Ok(l3)
}

#[inline(always)]
fn doubt(reason: Reason) -> Parsed {
    Parsed::bare(Shape::Doubt, reason)
}

/// Walks the link header of the Ethernet frame at `base` (0, or inside a tunnel) that ends at
/// `limit`; returns the L3 protocol, its offset and the datagram's limit.
#[inline(always)]
fn ethernet<F: Frame + ?Sized>(
    frame: &F,
    base: usize,
    limit: usize,
) -> Result<(L3, usize, usize), Reason> {
    // A frame too short for an Ethernet header carries nothing the stack would route (the
    // tunnel drivers drop an inner frame shorter than ETH_HLEN too).
    let Some(et) = within::<F, 2>(frame, base + 12, limit) else {
        return Ok((L3::Other, 0, limit));
    };
    let mut proto = be16(et);
    let mut off = base + ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if !is_vlan(proto) {
            break;
        }
        proto = be16(within::<F, 2>(frame, off + 2, limit).ok_or(Reason::BlockTruncated)?);
        off += VLAN_HLEN;
    }
    if is_vlan(proto) {
        return Err(Reason::BlockEncap);
    }
    match proto {
        ETH_P_PPPOE_SESS => pppoe(frame, off, limit),
        ETH_P_IPV4 => Ok((L3::V4, off, limit)),
        ETH_P_IPV6 => Ok((L3::V6, off, limit)),
        // With `net.mpls.conf.IF.input=1`, `mpls_forward` pops the labels and forwards the
        // inner packet as the route (not the packet) says: IPv4, IPv6 or by its nibble.
        // No subscriber port carries MPLS legitimately; what it hides cannot be told.
        ETH_P_MPLS_UC | ETH_P_MPLS_MC => Err(Reason::BlockMpls),
        _ => Ok((L3::Other, off, limit)),
    }
}

/// PPPoE session (`pppoe_rcv`) and the PPP protocol field (`ppp_input`), at `off`.
#[inline(always)]
fn pppoe<F: Frame + ?Sized>(
    frame: &F,
    off: usize,
    outer: usize,
) -> Result<(L3, usize, usize), Reason> {
    // `pppoe_rcv` checks neither ver/type nor code, only the length: a frame shorter than
    // the PPPoE length is dropped, a longer one is trimmed to it (`pskb_trim_rcsum`). So the
    // PPP frame, and the datagram in it, end at `limit`.
    // One read for the header and two protocol bytes (each read is a helper call in the
    // kernel). A frame ending after a 1-byte protocol has no room for IP: a doubt either way.
    let h = within::<F, { PPPOE_HLEN + 2 }>(frame, off, outer).ok_or(Reason::BlockTruncated)?;
    let len = be16([h[4], h[5]]) as usize;
    let start = off + PPPOE_HLEN;
    let limit = start + len;
    if len == 0 || limit > outer || frame.bytes::<1>(limit - 1).is_none() {
        return Err(Reason::BlockTruncated);
    }
    // `ppp_decompress_proto`: an odd first byte is a 1-byte protocol field (PFC) and gets a
    // 0x00 in front, whether or not PFC was negotiated.
    let (proto, ip) = if h[6] & 1 == 1 {
        (h[6] as u16, start + 1)
    } else if len >= 2 {
        (be16([h[6], h[7]]), start + 2)
    } else {
        return Err(Reason::BlockTruncated);
    };
    Ok((ppp_protocol(proto)?, ip, limit))
}

/// What the kernel's PPP receive path makes of each protocol.
#[inline(always)]
fn ppp_protocol(proto: u16) -> Result<L3, Reason> {
    Ok(match proto {
        // `proto_to_npindex`: NP_IP, NP_IPV6.
        PPP_IPV4 => L3::V4,
        PPP_IPV6 => L3::V6,
        // `ppp_receive_nonmp_frame`: `slhc_remember` sets the protocol byte (the slot) back to
        // TCP and the frame goes on as PPP_IP. The header is whole: parse it as IPv4 TCP.
        PPP_VJC_UNCOMP => L3::V4VjTcp,
        // `slhc_uncompress` rebuilds the TCP/IP header from per-slot state the parser has not
        // seen: the port cannot be known.
        PPP_VJC_COMP => return Err(Reason::BlockPppVj),
        // `ppp_receive_mp_frame` reassembles fragments (with a sequence header whose length
        // was negotiated) and hands the result to `ppp_receive_nonmp_frame`.
        PPP_MP => return Err(Reason::BlockPppMultilink),
        // `ppp_decompress_frame` inflates PPP_COMP (deflate, BSD, MPPE/MPPC) into any
        // protocol. PPP_COMPFRAG goes to pppd in today's kernels ("XXX do channel-level
        // decompression here" in `ppp_receive_frame`), but it is a compressed datagram all
        // the same: blocking it costs nothing and survives that XXX being done.
        PPP_COMP | PPP_COMPFRAG => return Err(Reason::BlockPppCompressed),
        // `proto_to_npindex`: NP_MPLS_UC/MC, handed to `mpls_forward` (see `ethernet`).
        PPP_MPLS_UC | PPP_MPLS_MC => return Err(Reason::BlockMpls),
        // LCP, PAP, CHAP, EAP (>= 0xc000, queued for pppd by `ppp_input`), the NCPs and CCP
        // (no npindex: pppd), IPX and AppleTalk: never IP.
        _ => L3::Other,
    })
}

#[inline(always)]
fn is_vlan(proto: u16) -> bool {
    proto == ETH_P_8021Q || proto == ETH_P_8021AD || proto == ETH_P_QINQ_OLD
}

/// `vj_tcp`: the protocol byte is a VJ slot number and the datagram is TCP (`slhc_remember`).
#[inline(always)]
fn ipv4<F: Frame + ?Sized>(
    frame: &F,
    off: usize,
    limit: usize,
    vj_tcp: bool,
    out: &mut Parsed,
) -> Next {
    let h = match within::<F, 20>(frame, off, limit) {
        Some(h) => h,
        None => return done(out, doubt(Reason::BlockTruncated)),
    };
    // The addresses go straight into the result: one copy of them on the stack, not one per
    // answer (the programs are near the 512-byte stack limit).
    out.v6 = false;
    out.src = Ip16::from_v4([h[12], h[13], h[14], h[15]]);
    out.dst = Ip16::from_v4([h[16], h[17], h[18], h[19]]);
    let fail = |out: &mut Parsed, reason| done(out, with_addrs(Shape::Doubt, reason, 0));
    let ihl = (h[0] & 0x0f) as usize * 4;
    if h[0] >> 4 != 4 || ihl < 20 {
        return fail(out, Reason::BlockBadIpHeader);
    }
    let tot_len = be16([h[2], h[3]]) as usize;
    if tot_len < ihl {
        return fail(out, Reason::BlockBadIpHeader);
    }
    // The whole datagram must be in the frame (padding after it is fine) and, in PPPoE, in
    // the PPPoE payload (`ip_rcv` drops a datagram longer than the trimmed skb).
    if off + tot_len > limit || frame.bytes::<1>(off + tot_len - 1).is_none() {
        return fail(out, Reason::BlockTruncated);
    }
    let frag_offset = be16([h[6], h[7]]) & 0x1fff;
    if !vj_tcp && is_tunnel(h[9]) {
        // A later fragment holds no tunnel header; the first one is judged by what it
        // holds, and the far side cannot reassemble without it.
        if frag_offset != 0 {
            return done(out, NOT_TCP);
        }
        return decap(frame, h[9], off + ihl, off + tot_len, false, out);
    }
    if h[9] != IPPROTO_TCP && !vj_tcp {
        return done(out, NOT_TCP);
    }
    if frag_offset != 0 {
        return fail(out, Reason::BlockFragment);
    }
    match tcp_dport(frame, off + ihl, off + tot_len) {
        Ok(dport) => done(out, with_addrs(Shape::Tcp, Reason::BlockPort, dport)),
        Err(reason) => fail(out, reason),
    }
}

#[inline(always)]
fn ipv6<F: Frame + ?Sized>(frame: &F, off: usize, limit: usize, out: &mut Parsed) -> Next {
    let h = match within::<F, 40>(frame, off, limit) {
        Some(h) => h,
        None => return done(out, doubt(Reason::BlockTruncated)),
    };
    out.v6 = true;
    out.src = Ip16::from_slice(&h, 8);
    out.dst = Ip16::from_slice(&h, 24);
    let fail = |out: &mut Parsed, reason| done(out, with_addrs(Shape::Doubt, reason, 0));
    if h[0] >> 4 != 6 {
        return fail(out, Reason::BlockBadIpHeader);
    }
    let end = off + 40 + be16([h[4], h[5]]) as usize;
    if end > limit || end > off + 40 && frame.bytes::<1>(end - 1).is_none() {
        return fail(out, Reason::BlockTruncated);
    }
    let mut nh = h[6];
    let mut cur = off + 40;
    for _ in 0..MAX_EXT_HEADERS {
        match nh {
            IPPROTO_TCP => {
                return match tcp_dport(frame, cur, end) {
                    Ok(dport) => done(out, with_addrs(Shape::Tcp, Reason::BlockPort, dport)),
                    Err(reason) => fail(out, reason),
                };
            }
            // `ip6_tnl_rcv` (ip4ip6, ip6ip6), `ip6gre_rcv`, UDP tunnels: the caller looks in.
            IPPROTO_IPIP | IPPROTO_IPV6 | IPPROTO_GRE | IPPROTO_UDP => {
                return decap(frame, nh, cur, end, true, out);
            }
            // Hop-by-hop, routing, destination options, mobility, HIP, shim6, experimental:
            // all in the RFC 6564 shape, length in 8-octet units not counting the first.
            0 | 43 | 60 | 135 | 139 | 140 | 253 | 254 => {
                let Some([next, len]) = within::<F, 2>(frame, cur, end) else {
                    return fail(out, Reason::BlockTruncated);
                };
                nh = next;
                cur += (len as usize + 1) * 8;
            }
            // Authentication header: length in 4-octet units, minus 2.
            51 => {
                let Some([next, len]) = within::<F, 2>(frame, cur, end) else {
                    return fail(out, Reason::BlockTruncated);
                };
                nh = next;
                cur += (len as usize + 2) * 4;
            }
            // Fragment header: only the first fragment shows the ports.
            44 => {
                let Some(f) = within::<F, 8>(frame, cur, end) else {
                    return fail(out, Reason::BlockTruncated);
                };
                if be16([f[2], f[3]]) >> 3 != 0 {
                    return fail(out, Reason::BlockFragment);
                }
                nh = f[0];
                cur += 8;
            }
            // No next header, ICMPv6, ESP, and everything else that is not TCP.
            _ => return done(out, NOT_TCP),
        }
    }
    // UDP is no extension header: after a full chain it is judged as anywhere else, not a
    // tunnel unless to a tunnel port (whose header is past what is walked: a doubt).
    if nh == IPPROTO_UDP {
        return match within::<F, 4>(frame, cur, end) {
            Some(u) if !is_tunnel_port(be16([u[2], u[3]])) => done(out, NOT_TCP),
            _ => fail(out, Reason::BlockExtChain),
        };
    }
    if nh == IPPROTO_TCP || is_ext_header(nh) || is_tunnel(nh) {
        return fail(out, Reason::BlockExtChain);
    }
    done(out, NOT_TCP)
}

/// IP protocols whose payload the parser looks into (UDP: only on the tunnel ports).
#[inline(always)]
fn is_tunnel(proto: u8) -> bool {
    matches!(
        proto,
        IPPROTO_IPIP | IPPROTO_IPV6 | IPPROTO_GRE | IPPROTO_UDP
    )
}

#[inline(always)]
fn is_ext_header(nh: u8) -> bool {
    matches!(nh, 0 | 43 | 44 | 51 | 60 | 135 | 139 | 140 | 253 | 254)
}

/// `N` bytes at `off`, only if they end at or before `end` (the IP payload's end).
#[inline(always)]
fn within<F: Frame + ?Sized, const N: usize>(frame: &F, off: usize, end: usize) -> Option<[u8; N]> {
    if off.checked_add(N)? > end {
        return None;
    }
    frame.bytes::<N>(off)
}

/// The TCP destination port (low 16 bits) and flags byte (bits 16-23), once the header is
/// known to be whole and sane.
#[inline(always)]
fn tcp_dport<F: Frame + ?Sized>(frame: &F, l4: usize, end: usize) -> Result<u32, Reason> {
    let t = within::<F, 20>(frame, l4, end).ok_or(Reason::BlockTruncated)?;
    let doff = (t[12] >> 4) as usize * 4;
    if doff < 20 {
        return Err(Reason::BlockBadTcpHeader);
    }
    if l4 + doff > end {
        return Err(Reason::BlockTruncated);
    }
    Ok(be16([t[2], t[3]]) as u32 | (t[13] as u32) << 16)
}
