//! Crafted frames, well-formed or deliberately broken.

pub const SYN: u8 = 0x02;

pub fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Inserts VLAN tags (each `tpid`) after the MAC addresses.
pub fn vlan(frame: &[u8], tpids: &[u16]) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    for (i, t) in tpids.iter().enumerate() {
        f.extend_from_slice(&t.to_be_bytes());
        f.extend_from_slice(&(100 + i as u16).to_be_bytes());
    }
    f.extend_from_slice(&frame[12..]);
    f
}

/// Ethernet + PPPoE session + PPP protocol.
pub fn pppoe(ppp_proto: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x11, 0x00, 0x12, 0x34];
    p.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
    p.extend_from_slice(&ppp_proto.to_be_bytes());
    p.extend_from_slice(payload);
    eth(0x8864, &p)
}

#[derive(Clone)]
pub struct Tcp {
    pub dport: u16,
    pub flags: u8,
    /// Data offset in 32-bit words (5 = no options).
    pub doff: u8,
    pub header_bytes: usize,
}

impl Tcp {
    pub fn to(dport: u16) -> Tcp {
        Tcp {
            dport,
            flags: SYN,
            doff: 5,
            header_bytes: 20,
        }
    }
    pub fn bytes(&self) -> Vec<u8> {
        let mut t = vec![0u8; self.header_bytes.max((self.doff as usize * 4).min(60))];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&self.dport.to_be_bytes());
        t[12] = self.doff << 4;
        t[13] = self.flags;
        t.truncate(self.header_bytes);
        t
    }
}

#[derive(Clone)]
pub struct V4 {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub proto: u8,
    pub ihl: u8,
    pub options: usize,
    pub tot_len: Option<u16>,
    pub frag: u16,
    pub version: u8,
}

impl V4 {
    pub fn new(src: [u8; 4], dst: [u8; 4]) -> V4 {
        V4 {
            src,
            dst,
            proto: 6,
            ihl: 5,
            options: 0,
            tot_len: None,
            frag: 0,
            version: 4,
        }
    }
    pub fn with_options(mut self, bytes: usize) -> V4 {
        self.options = bytes;
        self.ihl = 5 + (bytes / 4) as u8;
        self
    }
    pub fn packet(&self, payload: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; 20 + self.options];
        h[0] = (self.version << 4) | (self.ihl & 0x0f);
        let len = self.tot_len.unwrap_or((h.len() + payload.len()) as u16);
        h[2..4].copy_from_slice(&len.to_be_bytes());
        h[6..8].copy_from_slice(&self.frag.to_be_bytes());
        h[8] = 64;
        h[9] = self.proto;
        h[12..16].copy_from_slice(&self.src);
        h[16..20].copy_from_slice(&self.dst);
        h[20..].fill(1); // NOP options
        h.extend_from_slice(payload);
        h
    }
    pub fn frame(&self, payload: &[u8]) -> Vec<u8> {
        eth(0x0800, &self.packet(payload))
    }
}

/// IPv6 with a chain of (next-header, body) extension headers already encoded by [`ext`].
pub fn v6_packet(
    src: [u8; 16],
    dst: [u8; 16],
    first_nh: u8,
    chain: &[u8],
    payload_len: Option<u16>,
) -> Vec<u8> {
    let mut h = vec![0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&payload_len.unwrap_or(chain.len() as u16).to_be_bytes());
    h[6] = first_nh;
    h[7] = 64;
    h[8..24].copy_from_slice(&src);
    h[24..40].copy_from_slice(&dst);
    h.extend_from_slice(chain);
    h
}

pub fn v6_frame(src: [u8; 16], dst: [u8; 16], first_nh: u8, chain: &[u8]) -> Vec<u8> {
    eth(0x86dd, &v6_packet(src, dst, first_nh, chain, None))
}

/// An 8-octet RFC 6564-shaped extension header pointing at `next`.
pub fn ext(next: u8) -> Vec<u8> {
    vec![next, 0, 1, 4, 0, 0, 0, 0]
}

/// A fragment header with the given offset (in 8-octet units) and more-fragments flag.
pub fn frag6(next: u8, offset: u16, more: bool) -> Vec<u8> {
    let v = (offset << 3) | more as u16;
    let mut f = vec![next, 0];
    f.extend_from_slice(&v.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 1]);
    f
}

pub fn v6(s: &str) -> [u8; 16] {
    s.parse::<std::net::Ipv6Addr>().unwrap().octets()
}

/// Ethernet + PPPoE session with the PPP protocol field written as given (`[0x00, 0x21]`, or
/// `[0x21]` compressed) and the PPPoE length field `len` (`None` = exactly what follows).
pub fn pppoe_with(proto: &[u8], payload: &[u8], len: Option<u16>) -> Vec<u8> {
    let mut p = vec![0x11, 0x00, 0x12, 0x34];
    let exact = (proto.len() + payload.len()) as u16;
    p.extend_from_slice(&len.unwrap_or(exact).to_be_bytes());
    p.extend_from_slice(proto);
    p.extend_from_slice(payload);
    eth(0x8864, &p)
}

/// An MPLS label stack entry; `bottom` sets the S bit.
pub fn mpls_label(label: u32, bottom: bool) -> [u8; 4] {
    let v = (label << 12) | ((bottom as u32) << 8) | 64;
    v.to_be_bytes()
}

/// The protocol BPF_PROG_TEST_RUN gives an skb: `eth_type_trans` of the data's first 14
/// bytes, whatever they are (for a raw IP packet: the first two bytes of the IPv4 source
/// address, or bytes 4-5 of the IPv6 source address). Below 0x0600 that is a length, and
/// `eth_type_trans` says 802.3 (raw IPX, 0xffff after the header) or 802.2.
pub fn test_run_protocol(data: &[u8]) -> u16 {
    match u16::from_be_bytes([data[12], data[13]]) {
        p if p >= 0x0600 => p,
        _ if data.get(14..16) == Some(&[0xff, 0xff]) => 0x0001,
        _ => 0x0004,
    }
}

pub fn v4(s: &str) -> [u8; 4] {
    s.parse::<std::net::Ipv4Addr>().unwrap().octets()
}

/// A frame built outside in, read as it goes on the wire:
/// `Frame::eth().vlan(0x8100).ipv4(SUB, EXT).tcp(25).syn().build()`.
/// Built on the free functions above, so both give the same bytes.
#[derive(Clone)]
pub struct Frame {
    /// `None`: a raw IP packet (ppp, tun), no link header.
    link: Option<Vec<LinkLayer>>,
    ip: Option<Ip>,
    l4: L4,
    /// The IP protocol / last next header, when it must not match the transport.
    proto: Option<u8>,
}

#[derive(Clone)]
enum LinkLayer {
    Vlan(u16),
    /// PPPoE session with this PPP protocol field (`None`: 2-byte IPv4/IPv6 by the IP version).
    Pppoe(Option<Vec<u8>>),
}

#[derive(Clone)]
enum Ip {
    V4(V4),
    V6 {
        src: [u8; 16],
        dst: [u8; 16],
        /// Extension headers before the transport, as (kind, encoded header) pairs.
        chain: Vec<(u8, Vec<u8>)>,
        payload_len: Option<u16>,
        nibble: Option<u8>,
    },
}

#[derive(Clone)]
enum L4 {
    None,
    Tcp(Tcp),
    Bytes { proto: u8, bytes: Vec<u8> },
}

impl Frame {
    /// An Ethernet frame; its ethertype is what the next layer is.
    pub fn eth() -> Frame {
        Frame {
            link: Some(Vec::new()),
            ip: None,
            l4: L4::None,
            proto: None,
        }
    }
    /// A raw IP packet, as a raw-IP device delivers it.
    pub fn raw() -> Frame {
        Frame {
            link: None,
            ip: None,
            l4: L4::None,
            proto: None,
        }
    }
    /// A VLAN tag with this TPID (outermost first).
    pub fn vlan(mut self, tpid: u16) -> Frame {
        self.link_mut().push(LinkLayer::Vlan(tpid));
        self
    }
    /// A PPPoE session header with the 2-byte PPP protocol of the IP version that follows.
    pub fn pppoe(mut self) -> Frame {
        self.link_mut().push(LinkLayer::Pppoe(None));
        self
    }
    /// A PPPoE session header with the PPP protocol field written as given (`[0x21]`: PFC).
    pub fn pppoe_proto(mut self, proto: &[u8]) -> Frame {
        self.link_mut().push(LinkLayer::Pppoe(Some(proto.to_vec())));
        self
    }
    pub fn ipv4(mut self, src: [u8; 4], dst: [u8; 4]) -> Frame {
        self.ip = Some(Ip::V4(V4::new(src, dst)));
        self
    }
    pub fn ipv6(mut self, src: &str, dst: &str) -> Frame {
        self.ip = Some(Ip::V6 {
            src: v6(src),
            dst: v6(dst),
            chain: Vec::new(),
            payload_len: None,
            nibble: None,
        });
        self
    }
    /// Changes the IPv4 header (IHL, total length, fragment field, version...).
    pub fn v4_with(mut self, f: impl FnOnce(&mut V4)) -> Frame {
        match &mut self.ip {
            Some(Ip::V4(v)) => f(v),
            _ => panic!("v4_with without ipv4"),
        }
        self
    }
    /// IPv4 options: `bytes` of NOPs, IHL to match.
    pub fn options(self, bytes: usize) -> Frame {
        self.v4_with(|v| *v = v.clone().with_options(bytes))
    }
    /// An 8-octet IPv6 extension header of this kind before what follows.
    pub fn ext(mut self, kind: u8) -> Frame {
        match &mut self.ip {
            Some(Ip::V6 { chain, .. }) => chain.push((kind, vec![0, 0, 1, 4, 0, 0, 0, 0])),
            _ => panic!("ext without ipv6"),
        }
        self
    }
    /// The IPv6 payload length field (`None` = exactly what follows).
    pub fn payload_len(mut self, len: u16) -> Frame {
        match &mut self.ip {
            Some(Ip::V6 { payload_len, .. }) => *payload_len = Some(len),
            _ => panic!("payload_len without ipv6"),
        }
        self
    }
    /// The first nibble of the IPv6 header, when it must lie.
    pub fn ip_version(mut self, version: u8) -> Frame {
        match &mut self.ip {
            Some(Ip::V6 { nibble, .. }) => *nibble = Some(version),
            Some(Ip::V4(v)) => v.version = version,
            None => panic!("ip_version without an IP header"),
        }
        self
    }
    /// A TCP header to `dport` (SYN, no options, 20 bytes).
    pub fn tcp(mut self, dport: u16) -> Frame {
        self.l4 = L4::Tcp(Tcp::to(dport));
        self
    }
    pub fn syn(self) -> Frame {
        self.flags(SYN)
    }
    pub fn flags(self, flags: u8) -> Frame {
        self.tcp_with(|t| t.flags = flags)
    }
    /// The TCP data offset, in 32-bit words.
    pub fn doff(self, doff: u8) -> Frame {
        self.tcp_with(|t| t.doff = doff)
    }
    /// How many bytes of the TCP header are there (cut short, or options zero-filled).
    pub fn tcp_bytes(self, n: usize) -> Frame {
        self.tcp_with(|t| t.header_bytes = n)
    }
    fn tcp_with(mut self, f: impl FnOnce(&mut Tcp)) -> Frame {
        match &mut self.l4 {
            L4::Tcp(t) => f(t),
            _ => panic!("a TCP field without tcp()"),
        }
        self
    }
    /// The IP protocol (or the last next header) whatever the transport is.
    pub fn proto(mut self, proto: u8) -> Frame {
        self.proto = Some(proto);
        self
    }
    /// Any transport as raw bytes under IP protocol / next header `proto`.
    pub fn l4(mut self, proto: u8, bytes: &[u8]) -> Frame {
        self.l4 = L4::Bytes {
            proto,
            bytes: bytes.to_vec(),
        };
        self
    }
    fn link_mut(&mut self) -> &mut Vec<LinkLayer> {
        self.link.as_mut().expect("a link layer on a raw IP packet")
    }

    /// The IP packet (or the transport bytes alone when there is no IP header).
    fn packet(&self) -> (Vec<u8>, bool) {
        let (proto, l4) = match &self.l4 {
            L4::None => (59, Vec::new()),
            L4::Tcp(t) => (6, t.bytes()),
            L4::Bytes { proto, bytes } => (*proto, bytes.clone()),
        };
        let proto = self.proto.unwrap_or(proto);
        match &self.ip {
            None => (l4, false),
            Some(Ip::V4(v)) => {
                let mut v = v.clone();
                if !matches!(self.l4, L4::None) || self.proto.is_some() {
                    v.proto = proto;
                }
                (v.packet(&l4), false)
            }
            Some(Ip::V6 {
                src,
                dst,
                chain,
                payload_len,
                nibble,
            }) => {
                // Each extension header names the next one; the last names the transport.
                let mut bytes = Vec::new();
                for (i, (_, h)) in chain.iter().enumerate() {
                    let mut h = h.clone();
                    h[0] = chain.get(i + 1).map_or(proto, |(k, _)| *k);
                    bytes.extend(h);
                }
                bytes.extend(l4);
                let first = chain.first().map_or(proto, |(k, _)| *k);
                let mut p = v6_packet(*src, *dst, first, &bytes, *payload_len);
                if let Some(n) = nibble {
                    p[0] = (n << 4) | (p[0] & 0x0f);
                }
                (p, true)
            }
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let (packet, is_v6) = self.packet();
        let Some(link) = &self.link else {
            return packet;
        };
        let et = if is_v6 { 0x86dd } else { 0x0800 };
        // Innermost first: PPPoE wraps the packet, tags go in after the MACs.
        let mut frame = match link.iter().find_map(|l| match l {
            LinkLayer::Pppoe(p) => Some(p),
            _ => None,
        }) {
            Some(proto) => {
                let two = if is_v6 { [0x00, 0x57] } else { [0x00, 0x21] };
                pppoe_with(proto.as_deref().unwrap_or(&two), &packet, None)
            }
            None => eth(et, &packet),
        };
        let tags: Vec<u16> = link
            .iter()
            .filter_map(|l| match l {
                LinkLayer::Vlan(t) => Some(*t),
                _ => None,
            })
            .collect();
        if !tags.is_empty() {
            frame = vlan(&frame, &tags);
        }
        frame
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The builder writes the bytes the free functions write (the table relies on both).
    #[test]
    fn builder_matches_the_free_functions() {
        let (s, d) = ([100, 64, 1, 2], [203, 0, 113, 80]);
        let syn = Tcp::to(25).bytes();
        assert_eq!(
            Frame::eth().ipv4(s, d).tcp(25).build(),
            V4::new(s, d).frame(&syn)
        );
        assert_eq!(
            Frame::eth()
                .vlan(0x88a8)
                .vlan(0x8100)
                .ipv4(s, d)
                .tcp(25)
                .build(),
            vlan(&V4::new(s, d).frame(&syn), &[0x88a8, 0x8100])
        );
        assert_eq!(
            Frame::eth()
                .vlan(0x8100)
                .pppoe_proto(&[0x21])
                .ipv4(s, d)
                .tcp(25)
                .build(),
            vlan(
                &pppoe_with(&[0x21], &V4::new(s, d).packet(&syn), None),
                &[0x8100]
            )
        );
        let (s6, d6) = ("2001:db8:100::2", "2001:db8:ff::80");
        assert_eq!(
            Frame::eth().ipv6(s6, d6).ext(0).ext(60).tcp(25).build(),
            v6_frame(v6(s6), v6(d6), 0, &[ext(60), ext(6), syn.clone()].concat())
        );
        assert_eq!(
            Frame::raw().ipv4(s, d).options(8).l4(17, &[0; 8]).build(),
            V4 {
                proto: 17,
                ..V4::new(s, d).with_options(8)
            }
            .packet(&[0; 8])
        );
    }
}
