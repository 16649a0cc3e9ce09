//! Frames for the live leak fuzz: generated from a seed, addressed to the router's MAC so the
//! router's stack forwards what it can, and injected on the subscriber's wire with an
//! AF_PACKET socket. The oracle is the far side's kernel (see tests/leakfuzz.rs), not our parser.
//!
//! Most frames are valid (right IPv4 header checksums, lengths the kernel accepts, TCP checksums
//! too) so that without port25 many of them reach the far side: the positive control. The rest
//! are broken on purpose (bad lengths, truncation, overlapping fragments, VLAN stacks) for the
//! parser's sake, whatever the router's stack then does with them.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

/// One unit of traffic: a frame, or the fragments of one datagram (in sending order).
#[derive(Clone, Debug)]
pub struct Case {
    pub kind: &'static str,
    pub frames: Vec<Vec<u8>>,
}

/// Where the generated traffic comes from and goes to.
#[derive(Clone, Debug)]
pub struct Ends {
    /// The router's MAC on the subscriber side (the frames' destination).
    pub router_mac: [u8; 6],
    /// The subscriber's MAC (the frames' source).
    pub sub_mac: [u8; 6],
    pub src4: Vec<Ipv4Addr>,
    pub dst4: Ipv4Addr,
    pub src6: Vec<Ipv6Addr>,
    pub dst6: Ipv6Addr,
}

const TCP: u8 = 6;
const V6_HOP: u8 = 0;
const V6_ROUTING: u8 = 43;
const V6_FRAG: u8 = 44;
const V6_AH: u8 = 51;
const V6_DEST: u8 = 60;

pub struct Gen {
    rng: fastrand::Rng,
    ends: Ends,
    /// Fragment identification, unique per case so datagrams never mix.
    next_id: u32,
}

/// RFC 1071 sum, folded, not inverted.
fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [b] = chunks.remainder() {
        acc += (*b as u32) << 8;
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc
}

fn checksum(data: &[u8], acc: u32) -> [u8; 2] {
    (!(sum16(data, acc) as u16)).to_be_bytes()
}

/// An L3 endpoint pair; the pseudo-header sum for TCP depends on it.
#[derive(Clone, Copy)]
enum Ip {
    V4(Ipv4Addr, Ipv4Addr),
    V6(Ipv6Addr, Ipv6Addr),
}

impl Ip {
    fn pseudo(&self, l4_len: usize) -> u32 {
        match self {
            Ip::V4(s, d) => {
                let acc = sum16(&s.octets(), 0);
                let acc = sum16(&d.octets(), acc);
                acc + TCP as u32 + l4_len as u32
            }
            Ip::V6(s, d) => {
                let acc = sum16(&s.octets(), 0);
                let acc = sum16(&d.octets(), acc);
                acc + TCP as u32 + (l4_len as u32 >> 16) + (l4_len as u32 & 0xffff)
            }
        }
    }
}

/// An IPv4 header with the given options, lengths and checksum filled in.
struct V4Hdr {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    id: u16,
    /// Flags (DF 0x4000, MF 0x2000) and offset in 8-octet units.
    frag: u16,
    options: Vec<u8>,
    /// None: the true length.
    tot_len: Option<u16>,
    /// None: from the options' length.
    ihl: Option<u8>,
    proto: u8,
}

impl V4Hdr {
    fn bytes(&self, payload_len: usize) -> Vec<u8> {
        let mut h = vec![0u8; 20];
        let ihl = self.ihl.unwrap_or(5 + (self.options.len() / 4) as u8);
        h[0] = 0x40 | (ihl & 0x0f);
        let len = self
            .tot_len
            .unwrap_or((20 + self.options.len() + payload_len) as u16);
        h[2..4].copy_from_slice(&len.to_be_bytes());
        h[4..6].copy_from_slice(&self.id.to_be_bytes());
        h[6..8].copy_from_slice(&self.frag.to_be_bytes());
        h[8] = 64;
        h[9] = self.proto;
        h[12..16].copy_from_slice(&self.src.octets());
        h[16..20].copy_from_slice(&self.dst.octets());
        h.extend_from_slice(&self.options);
        let c = checksum(&h, 0);
        h[10..12].copy_from_slice(&c);
        h
    }
}

fn v6_hdr(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload_len: u16, flow: u32) -> Vec<u8> {
    let mut h = vec![0u8; 40];
    h[0..4].copy_from_slice(&(0x6000_0000u32 | (flow & 0xfffff)).to_be_bytes());
    h[4..6].copy_from_slice(&payload_len.to_be_bytes());
    h[6] = next;
    h[7] = 64;
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&dst.octets());
    h
}

impl Gen {
    pub fn new(seed: u64, ends: Ends) -> Gen {
        Gen {
            rng: fastrand::Rng::with_seed(seed),
            ends,
            next_id: seed as u32,
        }
    }

    fn chance(&mut self, percent: u32) -> bool {
        self.rng.u32(0..100) < percent
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.rng.u8(..)).collect()
    }

    fn id(&mut self) -> u32 {
        self.next_id = self.next_id.wrapping_add(1);
        self.next_id
    }

    fn eth(&self, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = self.ends.router_mac.to_vec();
        f.extend_from_slice(&self.ends.sub_mac);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// Sometimes bytes after the IP datagram, as Ethernet padding (the stack trims them by
    /// the IP length).
    fn padded(&mut self, mut frame: Vec<u8>) -> Vec<u8> {
        if self.chance(10) {
            let n = self.rng.usize(1..=46);
            let b = self.bytes(n);
            frame.extend_from_slice(&b);
        }
        frame
    }

    /// Mostly 25, some 587 (the control), a few anything.
    fn dport(&mut self) -> u16 {
        match self.rng.u32(0..100) {
            0..70 => 25,
            70..95 => 587,
            _ => self.rng.u16(..),
        }
    }

    fn v4_ends(&mut self) -> Ip {
        let s = self.ends.src4[self.rng.usize(..self.ends.src4.len())];
        Ip::V4(s, self.ends.dst4)
    }

    fn v6_ends(&mut self) -> Ip {
        let s = self.ends.src6[self.rng.usize(..self.ends.src6.len())];
        Ip::V6(s, self.ends.dst6)
    }

    /// A TCP segment (header, options, payload) with its checksum for `ip`: every flag
    /// combination, sometimes a data offset that does not fit the segment.
    fn tcp(&mut self, ip: Ip, dport: u16) -> Vec<u8> {
        let opt_words = if self.chance(30) {
            self.rng.usize(1..=10)
        } else {
            0
        };
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&self.rng.u16(1024..).to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[4..12].copy_from_slice(&self.bytes(8));
        let doff = if self.chance(10) {
            self.rng.u8(0..16)
        } else {
            5 + opt_words as u8
        };
        t[12] = doff << 4 | self.rng.u8(0..2);
        t[13] = match self.rng.u32(0..4) {
            0 => 0x02,
            1 => 0x10,
            _ => self.rng.u8(..),
        };
        t[14..16].copy_from_slice(&self.rng.u16(..).to_be_bytes());
        for _ in 0..opt_words {
            // NOP padding or random option bytes: the stack forwards either way.
            let w = if self.chance(50) {
                vec![1; 4]
            } else {
                self.bytes(4)
            };
            t.extend_from_slice(&w);
        }
        let payload = self.rng.usize(0..=64);
        let p = self.bytes(payload);
        t.extend_from_slice(&p);
        let c = checksum(&t, ip.pseudo(t.len()));
        t[16..18].copy_from_slice(&c);
        t
    }

    /// IPv4 options: mostly ones Linux forwards (NOP, EOL, record route, timestamp, router
    /// alert, unknown types), padded to a multiple of 4; sometimes random bytes.
    fn v4_options(&mut self) -> Vec<u8> {
        if !self.chance(30) {
            return Vec::new();
        }
        let mut o = Vec::new();
        if self.chance(15) {
            let n = self.rng.usize(1..=10) * 4;
            return self.bytes(n);
        }
        for _ in 0..self.rng.usize(1..=4) {
            match self.rng.u32(0..5) {
                0 => o.push(1),
                1 => {
                    let slots = self.rng.usize(1..=4);
                    o.extend_from_slice(&[7, 3 + 4 * slots as u8, 4]);
                    o.extend(std::iter::repeat_n(0, 4 * slots));
                }
                2 => {
                    let slots = self.rng.usize(1..=4);
                    o.extend_from_slice(&[68, 4 + 4 * slots as u8, 5, 0]);
                    o.extend(std::iter::repeat_n(0, 4 * slots));
                }
                3 => o.extend_from_slice(&[148, 4, 0, 0]),
                _ => {
                    let len = self.rng.u8(2..8);
                    o.extend_from_slice(&[0x1e, len]);
                    let b = self.bytes(len as usize - 2);
                    o.extend_from_slice(&b);
                }
            }
        }
        o.truncate(40);
        while o.len() % 4 != 0 {
            o.push(0);
        }
        o
    }

    fn v4_header(&mut self, ip: Ip) -> V4Hdr {
        let Ip::V4(src, dst) = ip else { unreachable!() };
        let options = self.v4_options();
        V4Hdr {
            src,
            dst,
            id: self.id() as u16,
            frag: if self.chance(50) { 0x4000 } else { 0 },
            options,
            tot_len: None,
            ihl: None,
            proto: TCP,
        }
    }

    /// An extension header of `kind` pointing at `next`, 8-octet aligned.
    fn v6_ext(&mut self, kind: u8, next: u8) -> Vec<u8> {
        match kind {
            V6_AH => {
                // Length in 4-octet units minus 2: 4 = 24 bytes (SPI, sequence, 12-byte ICV).
                let mut h = vec![next, 4, 0, 0];
                let b = self.bytes(20);
                h.extend_from_slice(&b);
                h
            }
            V6_ROUTING => {
                let len = self.rng.u8(0..3);
                let mut h = vec![next, len, self.rng.u8(0..5), 0];
                h.extend(std::iter::repeat_n(0, 4 + 8 * len as usize));
                h
            }
            _ => {
                // Hop-by-hop or destination options: one option filling the header, PadN
                // when short (Linux drops more than 7 bytes of padding), else an unknown
                // type whose high bits say "skip"; now and then an over-long PadN anyway.
                let len = self.rng.u8(0..3);
                let body = 6 + 8 * len as usize;
                let kind = if body <= 7 || self.chance(10) {
                    1
                } else {
                    0x1e
                };
                let mut h = vec![next, len, kind, (body - 2) as u8];
                let data = if kind == 1 {
                    vec![0; body - 2]
                } else {
                    self.bytes(body - 2)
                };
                h.extend_from_slice(&data);
                h
            }
        }
    }

    /// An extension chain of `kinds` ending in `last`: returns (first next-header, bytes).
    fn v6_chain(&mut self, kinds: &[u8], last: u8) -> (u8, Vec<u8>) {
        let mut bytes = Vec::new();
        for (i, &k) in kinds.iter().enumerate() {
            let next = kinds.get(i + 1).copied().unwrap_or(last);
            let e = self.v6_ext(k, next);
            bytes.extend_from_slice(&e);
        }
        (kinds.first().copied().unwrap_or(last), bytes)
    }

    fn random_ext_kinds(&mut self) -> Vec<u8> {
        // Now and then longer than the parser walks (8): the kernel forwards any length.
        let n = match self.rng.u32(0..100) {
            0..50 => 0,
            50..95 => self.rng.usize(1..=5),
            _ => self.rng.usize(6..=12),
        };
        // AH only now and then: nftables (the far side's counter) stops at AH and calls it the
        // transport, so TCP behind AH is for the parser only, never counted.
        let mut kinds: Vec<u8> = (0..n)
            .map(|_| match self.rng.u32(0..10) {
                0..5 => V6_DEST,
                5..9 => V6_ROUTING,
                _ => V6_AH,
            })
            .collect();
        // Hop-by-hop belongs first (a later one is the destination's problem, not the router's).
        if self.chance(30) {
            kinds.insert(0, V6_HOP);
        } else if self.chance(5) && !kinds.is_empty() {
            let at = self.rng.usize(..kinds.len());
            kinds.insert(at, V6_HOP);
        }
        kinds
    }

    pub fn v4_plain(&mut self) -> Case {
        let ip = self.v4_ends();
        let dport = self.dport();
        let seg = self.tcp(ip, dport);
        let h = self.v4_header(ip);
        let mut p = h.bytes(seg.len());
        p.extend_from_slice(&seg);
        let f = self.eth(0x0800, &p);
        Case {
            kind: "v4",
            frames: vec![self.padded(f)],
        }
    }

    pub fn v6_plain(&mut self) -> Case {
        let ip = self.v6_ends();
        let Ip::V6(src, dst) = ip else { unreachable!() };
        let dport = self.dport();
        let seg = self.tcp(ip, dport);
        let kinds = self.random_ext_kinds();
        let (first, mut body) = self.v6_chain(&kinds, TCP);
        body.extend_from_slice(&seg);
        let flow = self.rng.u32(..);
        let mut p = v6_hdr(src, dst, first, body.len() as u16, flow);
        p.extend_from_slice(&body);
        let f = self.eth(0x86dd, &p);
        Case {
            kind: "v6",
            frames: vec![self.padded(f)],
        }
    }

    /// Lengths that disagree with the frame: IHL against options, total or payload length
    /// shorter (the kernel trims) or longer (the kernel drops) than what is there.
    pub fn bad_lengths(&mut self) -> Case {
        let mut c = if self.chance(50) {
            self.v4_plain()
        } else {
            self.v6_plain()
        };
        let f = &mut c.frames[0];
        let l3 = f.len() - 14;
        let v4 = f[12..14] == [0x08, 0x00];
        let delta = self.rng.i32(-40..=16);
        let new = (l3 as i32 + delta).max(0) as usize;
        if v4 {
            if self.chance(30) {
                f[14] = 0x40 | self.rng.u8(0..16);
            } else {
                f[16..18].copy_from_slice(&(new as u16).to_be_bytes());
            }
            let ihl = ((f[14] & 0x0f) as usize * 4).clamp(20, f.len() - 14);
            f[24..26].copy_from_slice(&[0, 0]);
            let cs = checksum(&f[14..14 + ihl], 0);
            f[24..26].copy_from_slice(&cs);
        } else {
            let pl = new.saturating_sub(40) as u16;
            f[18..20].copy_from_slice(&pl.to_be_bytes());
        }
        c.kind = if v4 { "v4 bad length" } else { "v6 bad length" };
        c
    }

    /// Fragments `payload` (the fragmentable part) into pieces: random sizes (multiples of 8
    /// but the last), sometimes a tiny first piece, overlaps (sometimes with other bytes, such
    /// as another port), duplicates, a missing piece, a last piece that claims more; then
    /// sent in order, reversed or shuffled. Returns (offset in bytes, bytes, more-fragments).
    fn fragment_plan(&mut self, payload: &[u8]) -> Vec<(usize, Vec<u8>, bool)> {
        let mut pieces = Vec::new();
        let mut off = 0;
        let first_tiny = self.chance(30);
        while off < payload.len() {
            let size = if off == 0 && first_tiny {
                8
            } else if self.chance(3) {
                // Not a multiple of 8 although more follow: the stack trims or drops it.
                self.rng.usize(1..8)
            } else {
                self.rng.usize(1..=6) * 8
            };
            let end = (off + size).min(payload.len());
            pieces.push((off, payload[off..end].to_vec(), end < payload.len()));
            off = end;
        }
        if self.chance(20) {
            // Overlap: a piece starting 8..24 bytes before another one's start.
            let i = self.rng.usize(..pieces.len());
            let start = pieces[i].0.saturating_sub(8 * self.rng.usize(1..=3));
            let end = (start + 8 * self.rng.usize(1..=4)).min(payload.len());
            let mut b = payload[start..end].to_vec();
            if self.chance(50) {
                // Other bytes under the overlap: for offset 0, the port (587 <-> 25).
                if start == 0 && b.len() >= 4 {
                    let p = u16::from_be_bytes([b[2], b[3]]);
                    let q: u16 = if p == 25 { 587 } else { 25 };
                    b[2..4].copy_from_slice(&q.to_be_bytes());
                } else if let Some(x) = b.last_mut() {
                    *x ^= 0xff;
                }
            }
            pieces.push((start, b, end < payload.len()));
        }
        if self.chance(10) {
            let i = self.rng.usize(..pieces.len());
            pieces.push(pieces[i].clone());
        }
        if self.chance(10) && pieces.len() > 1 {
            let i = self.rng.usize(..pieces.len());
            pieces.remove(i);
        }
        if self.chance(5) {
            if let Some(last) = pieces.iter_mut().find(|p| !p.2) {
                last.2 = true;
            }
        }
        match self.rng.u32(0..3) {
            0 => {}
            1 => pieces.reverse(),
            _ => self.rng.shuffle(&mut pieces),
        }
        pieces
    }

    pub fn v4_fragments(&mut self) -> Case {
        let ip = self.v4_ends();
        let dport = self.dport();
        let seg = self.tcp(ip, dport);
        let mut h = self.v4_header(ip);
        let mut frames = Vec::new();
        for (off, bytes, more) in self.fragment_plan(&seg) {
            h.frag = (off / 8) as u16 | if more { 0x2000 } else { 0 };
            let mut p = h.bytes(bytes.len());
            p.extend_from_slice(&bytes);
            frames.push(self.eth(0x0800, &p));
        }
        Case {
            kind: "v4 fragments",
            frames,
        }
    }

    pub fn v6_fragments(&mut self) -> Case {
        let ip = self.v6_ends();
        let Ip::V6(src, dst) = ip else { unreachable!() };
        let dport = self.dport();
        let seg = self.tcp(ip, dport);
        // Unfragmentable part (hop-by-hop, routing, destination options before the fragment
        // header), then the fragmentable part (maybe destination options, then TCP).
        let mut unfrag_kinds = Vec::new();
        if self.chance(20) {
            unfrag_kinds.push(V6_HOP);
        }
        if self.chance(20) {
            unfrag_kinds.push([V6_DEST, V6_ROUTING][self.rng.usize(..2)]);
        }
        let frag_kinds = if self.chance(25) {
            vec![if self.chance(80) { V6_DEST } else { V6_AH }]
        } else {
            Vec::new()
        };
        let (first_frag_nh, mut fragmentable) = self.v6_chain(&frag_kinds, TCP);
        fragmentable.extend_from_slice(&seg);
        let (first, unfrag) = self.v6_chain(&unfrag_kinds, V6_FRAG);
        let id = self.id();
        let flow = self.rng.u32(..);
        let mut frames = Vec::new();
        let plan = self.fragment_plan(&fragmentable);
        for (off, bytes, more) in plan {
            let mut body = unfrag.clone();
            let v = ((off / 8) as u16) << 3 | more as u16;
            body.extend_from_slice(&[first_frag_nh, 0]);
            body.extend_from_slice(&v.to_be_bytes());
            body.extend_from_slice(&id.to_be_bytes());
            body.extend_from_slice(&bytes);
            let mut p = v6_hdr(src, dst, first, body.len() as u16, flow);
            p.extend_from_slice(&body);
            frames.push(self.eth(0x86dd, &p));
        }
        Case {
            kind: "v6 fragments",
            frames,
        }
    }

    /// A frame cut short: either as is (lengths now lie; the kernel drops it) or with the IP
    /// lengths and header checksum made to agree with the cut (the kernel forwards it).
    pub fn truncated(&mut self) -> Case {
        let mut c = if self.chance(50) {
            self.v4_plain()
        } else {
            self.v6_plain()
        };
        let len = c.frames[0].len();
        let cut = self.rng.usize(0..len);
        let consistent = self.chance(60);
        c.frames[0] = cut_frame(&c.frames[0], cut, consistent);
        c.kind = if consistent {
            "truncated, lengths fixed"
        } else {
            "truncated"
        };
        c
    }

    /// Another case's frames behind 1 to 4 VLAN tags. This kernel has no 802.1Q module, so
    /// the router's stack drops them whatever port25 does: they are here for the parser.
    pub fn vlan(&mut self) -> Case {
        let mut c = self.any_unwrapped();
        let tags = self.rng.usize(1..=4);
        let tpids: Vec<u16> = (0..tags)
            .map(|_| [0x8100, 0x88a8, 0x9100][self.rng.usize(..3)])
            .collect();
        for f in &mut c.frames {
            let mut g = f[..12].to_vec();
            for &t in &tpids {
                g.extend_from_slice(&t.to_be_bytes());
                g.extend_from_slice(&self.rng.u16(0..4096).to_be_bytes());
            }
            g.extend_from_slice(&f[12..]);
            *f = g;
        }
        c.kind = "vlan";
        c
    }

    /// Another case's frames in PPPoE session frames (IPv4/IPv6 protocol, PFC form, or
    /// other protocols). There is no PPPoE in this kernel: the router drops them.
    pub fn pppoe(&mut self) -> Case {
        let mut c = self.any_unwrapped();
        for f in &mut c.frames {
            let v6 = f[12..14] == [0x86, 0xdd];
            let proto: &[u8] = match self.rng.u32(0..4) {
                0 if v6 => &[0x57],
                0 => &[0x21],
                1 => &[0x00, 0x3d],
                _ if v6 => &[0x00, 0x57],
                _ => &[0x00, 0x21],
            };
            let payload = &f[14..];
            let mut g = f[..12].to_vec();
            g.extend_from_slice(&[0x88, 0x64, 0x11, 0x00, 0x12, 0x34]);
            g.extend_from_slice(&((payload.len() + proto.len()) as u16).to_be_bytes());
            g.extend_from_slice(proto);
            g.extend_from_slice(payload);
            *f = g;
        }
        c.kind = "pppoe";
        c
    }

    /// A valid frame with a few random bytes changed past the Ethernet header, the IPv4
    /// header checksum then made right again.
    pub fn mutated(&mut self) -> Case {
        let mut c = if self.chance(50) {
            self.v4_plain()
        } else {
            self.v6_plain()
        };
        let f = &mut c.frames[0];
        for _ in 0..self.rng.usize(1..=3) {
            let i = self.rng.usize(14..f.len());
            f[i] ^= 1 << self.rng.u8(0..8);
        }
        fix_v4_checksum(f);
        c.kind = "mutated";
        c
    }

    fn any_unwrapped(&mut self) -> Case {
        match self.rng.u32(0..4) {
            0 => self.v4_plain(),
            1 => self.v6_plain(),
            2 => self.v4_fragments(),
            _ => self.v6_fragments(),
        }
    }

    /// One case of a random kind.
    pub fn case(&mut self) -> Case {
        match self.rng.u32(0..100) {
            0..20 => self.v4_plain(),
            20..40 => self.v6_plain(),
            40..55 => self.v4_fragments(),
            55..70 => self.v6_fragments(),
            70..76 => self.bad_lengths(),
            76..84 => self.truncated(),
            84..91 => self.mutated(),
            91..96 => self.vlan(),
            _ => self.pppoe(),
        }
    }

    /// A TCP/25 frame (IPv4 and IPv6 with a hop-by-hop header) cut at every byte, as is and
    /// with its lengths made to agree with the cut.
    pub fn truncation_sweep(&mut self) -> Vec<Case> {
        let v4 = {
            let ip = self.v4_ends();
            let seg = self.tcp_clean(ip, 25);
            let h = self.v4_header(ip);
            let mut p = h.bytes(seg.len());
            p.extend_from_slice(&seg);
            self.eth(0x0800, &p)
        };
        let v6 = {
            let ip = self.v6_ends();
            let Ip::V6(src, dst) = ip else { unreachable!() };
            let seg = self.tcp_clean(ip, 25);
            let (first, mut body) = self.v6_chain(&[V6_HOP], TCP);
            body.extend_from_slice(&seg);
            let mut p = v6_hdr(src, dst, first, body.len() as u16, 0);
            p.extend_from_slice(&body);
            self.eth(0x86dd, &p)
        };
        let mut cases = Vec::new();
        for f in [v4, v6] {
            for cut in 0..f.len() {
                for consistent in [false, true] {
                    cases.push(Case {
                        kind: "truncation sweep",
                        frames: vec![cut_frame(&f, cut, consistent)],
                    });
                }
            }
        }
        cases
    }

    /// A plain SYN with one MSS option and a few bytes of payload.
    fn tcp_clean(&mut self, ip: Ip, dport: u16) -> Vec<u8> {
        let mut t = vec![0u8; 24];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 6 << 4;
        t[13] = 0x02;
        t[14..16].copy_from_slice(&64240u16.to_be_bytes());
        t[20..24].copy_from_slice(&[2, 4, 0x05, 0xb4]);
        t.extend_from_slice(b"EHLO x\r\n");
        let c = checksum(&t, ip.pseudo(t.len()));
        t[16..18].copy_from_slice(&c);
        t
    }

    /// A fragmented TCP/25 datagram, v4 and v6, in order, no tricks: the positive control
    /// for the far side's reassembly.
    pub fn clean_fragmented(&mut self) -> [Case; 2] {
        let ip4 = self.v4_ends();
        let seg = self.tcp_clean(ip4, 25);
        let mut h = self.v4_header(ip4);
        h.options.clear();
        let mut f4 = Vec::new();
        for (off, chunk, more) in [(0, &seg[..16], true), (16, &seg[16..], false)] {
            h.frag = (off / 8) as u16 | if more { 0x2000 } else { 0 };
            let mut p = h.bytes(chunk.len());
            p.extend_from_slice(chunk);
            f4.push(self.eth(0x0800, &p));
        }
        let ip6 = self.v6_ends();
        let Ip::V6(src, dst) = ip6 else {
            unreachable!()
        };
        let seg = self.tcp_clean(ip6, 25);
        let id = self.id();
        let mut f6 = Vec::new();
        for (off, chunk, more) in [(0, &seg[..16], true), (16, &seg[16..], false)] {
            let mut body = vec![TCP, 0];
            body.extend_from_slice(&((((off / 8) as u16) << 3) | more as u16).to_be_bytes());
            body.extend_from_slice(&id.to_be_bytes());
            body.extend_from_slice(chunk);
            let mut p = v6_hdr(src, dst, V6_FRAG, body.len() as u16, 0);
            p.extend_from_slice(&body);
            f6.push(self.eth(0x86dd, &p));
        }
        [
            Case {
                kind: "clean v4 fragments",
                frames: f4,
            },
            Case {
                kind: "clean v6 fragments",
                frames: f6,
            },
        ]
    }
}

/// `frame` cut to `cut` bytes; when `consistent`, the IP length fields (and the IPv4 header
/// checksum) are made to agree with the cut, so the kernel forwards what is left.
fn cut_frame(frame: &[u8], cut: usize, consistent: bool) -> Vec<u8> {
    let mut f = frame[..cut].to_vec();
    if consistent && f.len() >= 14 {
        let l3 = f.len() - 14;
        match f[12..14] {
            [0x08, 0x00] if l3 >= 20 => {
                f[16..18].copy_from_slice(&(l3 as u16).to_be_bytes());
                fix_v4_checksum(&mut f);
            }
            [0x86, 0xdd] if l3 >= 40 => {
                f[18..20].copy_from_slice(&((l3 - 40) as u16).to_be_bytes());
            }
            _ => {}
        }
    }
    f
}

/// Recomputes the IPv4 header checksum of an untagged Ethernet frame, if it has one whole.
fn fix_v4_checksum(f: &mut [u8]) {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] {
        return;
    }
    let ihl = ((f[14] & 0x0f) as usize * 4).max(20);
    if f.len() < 14 + ihl {
        return;
    }
    f[24..26].copy_from_slice(&[0, 0]);
    let c = checksum(&f[14..14 + ihl], 0);
    f[24..26].copy_from_slice(&c);
}

/// Frames as a hex line each, for saving and reporting.
pub fn hex(frames: &[Vec<u8>]) -> String {
    frames
        .iter()
        .map(|f| f.iter().map(|b| format!("{b:02x}")).collect::<String>())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Writes whole Ethernet frames onto one device, below the sender's stack.
pub struct Injector {
    fd: OwnedFd,
    ifindex: i32,
}

impl Injector {
    /// An AF_PACKET socket on `dev`, made inside network namespace `ns`.
    pub fn new(ns: &str, dev: &str) -> Injector {
        let dev = dev.to_string();
        crate::lab::in_ns(ns, move || {
            // Protocol 0: send only, this socket receives nothing.
            // SAFETY: plain socket(2); the result is checked before use.
            let raw =
                unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
            assert!(
                raw >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: raw is a fresh, owned descriptor.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let ifindex = nix::net::if_::if_nametoindex(dev.as_str()).expect("inject device");
            Injector {
                fd,
                ifindex: ifindex as i32,
            }
        })
    }

    /// Sends one frame; Err when the kernel refuses it (too short, too long).
    pub fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid start.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = self.ifindex;
        sll.sll_halen = 6;
        if let Some(dst) = frame.get(..6) {
            sll.sll_addr[..6].copy_from_slice(dst);
        }
        // SAFETY: frame and sll are valid for the lengths passed.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}
