//! A structure-aware frame generator for the differential fuzz, with its own ground truth.
//!
//! Every frame is built from a plan (addresses drawn from named policy categories, a TCP/UDP/
//! ICMP segment, an IPv4 or IPv6 packet, an encapsulation, mutations), and the plan alone says
//! what Linux would make of it. That truth never calls `port25_common::parse`: it is the oracle
//! that does not share the parser's understanding. Frames are reproducible: frame `i` of seed
//! `s` is always the same bytes ([`case`]).
//!
//! The truth is written against [`CONFIG`] plus the entries of [`fixture_entries`]: change one
//! and the address categories below must follow.

use port25_common::parse::Link;

use crate::frame::test_run_protocol;
use rand::{Rng, RngExt, SeedableRng};
use rand_xorshift::XorShiftRng;

/// The policy the address categories are drawn from.
pub const CONFIG: &str = r#"
interfaces:
  - name: fuzz0
    hook: tc
blocked_ports: [25, 2525]
subscriber_ranges:
  - 100.64.0.0/10
  - "2001:db8:100::/40"
  # Raw-IP frames: BPF_PROG_TEST_RUN gives the skb the protocol in bytes 12-13 of the data,
  # the start of the IPv4 source (8.0 = 0x0800) or bytes 4-5 of the IPv6 source (0x86dd).
  # 8.0.128.0/17 is left outside, still presenting 0x0800.
  - 8.0.0.0/17
  - "2001:db8:86dd::/48"
mail_servers: [198.51.100.25/32, "2001:db8:25::/64"]
exempt:
  - prefix: 100.64.9.9/32
  - prefix: 100.65.0.0/16
  - prefix: "2001:db8:100:9::9/128"
  - prefix: "2001:db8:101::/48"
  - prefix: 8.0.9.9/32
  - prefix: 8.0.65.0/24
  - prefix: "2001:db8:86dd:9::9/128"
  - prefix: "2001:db8:86dd:100::/56"
"#;

pub const BLOCKED_PORTS: [u16; 2] = [25, 2525];

/// Runtime entries the fixture adds on top of [`CONFIG`] (the daemon's session and timed
/// unblocks): an expired exempt address, a live timed one, and a delegated IPv6 /56; the
/// same again inside the raw-IP ranges.
pub struct FixtureEntries {
    pub expired4: [u8; 4],
    pub timed4: [u8; 4],
    pub expired6: [u8; 16],
    pub session56: [u8; 16],
    pub raw_expired4: [u8; 4],
    pub raw_timed4: [u8; 4],
    pub raw_expired6: [u8; 16],
    pub raw_session56: [u8; 16],
}

pub const fn fixture_entries() -> FixtureEntries {
    FixtureEntries {
        expired4: [100, 64, 7, 7],
        timed4: [100, 64, 8, 8],
        expired6: v6_const([0x2001, 0xdb8, 0x100, 0x77, 0, 0, 0, 7]),
        session56: v6_const([0x2001, 0xdb8, 0x100, 0x5500, 0, 0, 0, 0]),
        raw_expired4: [8, 0, 7, 7],
        raw_timed4: [8, 0, 8, 8],
        raw_expired6: v6_const([0x2001, 0xdb8, 0x86dd, 0x77, 0, 0, 0, 7]),
        raw_session56: v6_const([0x2001, 0xdb8, 0x86dd, 0x5500, 0, 0, 0, 0]),
    }
}

const fn v6_const(w: [u16; 8]) -> [u8; 16] {
    let mut o = [0u8; 16];
    let mut i = 0;
    while i < 8 {
        o[2 * i] = (w[i] >> 8) as u8;
        o[2 * i + 1] = w[i] as u8;
        i += 1;
    }
    o
}

/// What Linux would make of the frame, by construction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Truth {
    /// A TCP segment (or a fragment or PPP form of one) to a blocked port, from a non-exempt
    /// enforced source, to a host that is not one of the ISP's mail servers, that Linux would
    /// take in: every program must block it.
    MustBlock,
    /// Linux itself would drop it, or the plan cannot say what Linux makes of it (unknown
    /// option bytes, a header length that moves the TCP header): either verdict is fine.
    KernelDrops,
    /// Nothing to block: not TCP, an open port, an exempt or outside source, a mail server.
    Free,
    /// A raw-IP frame whose bytes 12-13 (the skb protocol BPF_PROG_TEST_RUN derives from
    /// them) are not the protocol the plan assumed: on a real ppp or tun device the protocol
    /// would come from the link, so the plan says nothing about what the program sees. Either
    /// verdict is fine; the kernel must still agree with the model.
    ProtocolNotPlanned,
}

impl Truth {
    pub const fn name(self) -> &'static str {
        match self {
            Truth::MustBlock => "must-block",
            Truth::KernelDrops => "kernel drops: either verdict fine",
            Truth::Free => "free",
            Truth::ProtocolNotPlanned => "raw, test-run protocol not planned: either fine",
        }
    }
}

/// Which PPP forms to generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PppForms {
    /// Only the 2-byte IPv4/IPv6 protocol fields (plus control and non-IP protocols).
    Classic,
    /// Also every form `ppp_generic.c` turns into IP: the 1-byte (PFC) protocol, multilink,
    /// VJ compressed/uncompressed TCP, compressed datagrams, MPLS; and MPLS on raw-IP devices.
    All,
}

#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub ppp: PppForms,
}

#[derive(Clone, Debug)]
pub struct Case {
    pub bytes: Vec<u8>,
    pub link: Link,
    pub truth: Truth,
    /// What the plan put in the frame, for reports ("pppoe", "v6-chain-long", ...).
    pub tags: Vec<&'static str>,
}

/// Frame `index` of the run with `seed`.
pub fn case(seed: u64, index: u64, opts: &Options) -> Case {
    let mut g = Gen {
        rng: XorShiftRng::seed_from_u64(splitmix(seed ^ splitmix(index))),
        tags: Vec::new(),
        drops: false,
        opts: *opts,
    };
    g.build()
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The flow the frame carries, before any encapsulation.
struct Flow {
    v6: bool,
    src: Vec<u8>,
    dst: Vec<u8>,
    proto: u8,
    /// TCP to a blocked port from a non-exempt enforced source to a non-mail host.
    must_block: bool,
}

/// An IP packet and how much of it Linux needs (its total length after trimming).
struct Ip {
    bytes: Vec<u8>,
    need: usize,
}

struct Gen {
    rng: XorShiftRng,
    tags: Vec<&'static str>,
    /// Set by any step after which Linux would drop the frame (or the truth is unclear).
    drops: bool,
    opts: Options,
}

const PPP_IPV4: u16 = 0x0021;
const PPP_IPV6: u16 = 0x0057;

impl Gen {
    fn pct(&mut self, p: u32) -> bool {
        self.rng.random_ratio(p, 100)
    }

    /// Uniform in `lo..=hi`; `lo` when the range is empty.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        if hi <= lo {
            return lo;
        }
        self.rng.random_range(lo..=hi)
    }

    fn fill(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.rng.fill_bytes(&mut v);
        v
    }

    fn tag(&mut self, t: &'static str) {
        self.tags.push(t);
    }

    fn drop_here(&mut self, t: &'static str) {
        self.tag(t);
        self.drops = true;
    }

    fn build(&mut self) -> Case {
        let raw = self.pct(15);
        // VJ forms exist for IPv4 only; decide the family first.
        let mut flow = self.flow(raw);
        let l4 = self.l4(&mut flow);
        let ip = if flow.v6 {
            self.ipv6(&flow, l4)
        } else {
            self.ipv4(&flow, l4)
        };
        // For raw frames, the skb protocol the plan assumes.
        let (mut bytes, need_end, pppoe, mut must_block, planned) = if raw {
            let (b, need, mb, proto) = self.raw(&flow, ip);
            (b, need, None, mb, Some(proto))
        } else {
            let (b, need, pppoe, mb) = self.ethernet(&flow, ip);
            (b, need, pppoe, mb, None)
        };
        // Truncation at a random byte; test runs need at least an Ethernet header's worth.
        if self.pct(6) && bytes.len() > 15 {
            let at = self.range(14, bytes.len() - 1);
            bytes.truncate(at);
            self.tag("truncated");
        }
        if need_end > bytes.len() {
            self.drop_here("cut-short");
        }
        // pppoe_rcv: a length past the frame is dropped, a shorter one trims the frame.
        if let Some((payload_off, declared, inner_need)) = pppoe {
            if payload_off + declared > bytes.len() || declared < inner_need {
                self.drop_here("pppoe-len-drops");
            }
        }
        if must_block && self.drops {
            must_block = false;
        }
        // What BPF_PROG_TEST_RUN will hand the raw program (no skb below 14 bytes).
        let link = match planned {
            None => Link::Ethernet,
            Some(_) if bytes.len() < 14 => Link::RawProto(0),
            Some(_) => Link::RawProto(test_run_protocol(&bytes)),
        };
        let unplanned = match (planned, link) {
            (Some(want), Link::RawProto(got)) => bytes.len() < 14 || want != got,
            _ => false,
        };
        if unplanned {
            self.tag("raw-proto-unplanned");
        }
        let truth = if unplanned {
            Truth::ProtocolNotPlanned
        } else if must_block {
            Truth::MustBlock
        } else if self.drops {
            Truth::KernelDrops
        } else {
            Truth::Free
        };
        Case {
            bytes,
            link,
            truth,
            tags: std::mem::take(&mut self.tags),
        }
    }

    /// `raw`: a raw-IP frame, whose source mostly comes from the raw ranges so that the
    /// test run presents the family's protocol (see [`CONFIG`]).
    fn flow(&mut self, raw: bool) -> Flow {
        let v6 = self.pct(45);
        let raw_src = raw && self.pct(90);
        let (src, enforced) = match (v6, raw_src) {
            (false, false) => self.src4(),
            (true, false) => self.src6(),
            (false, true) => self.raw_src4(),
            (true, true) => self.raw_src6(),
        };
        let (dst, mail) = if v6 { self.dst6() } else { self.dst4() };
        let proto = match self.range(0, 99) {
            0..=84 => 6,
            85..=92 => 17,
            93..=96 => {
                if v6 {
                    58
                } else {
                    1
                }
            }
            _ => *[47u8, 50, 132, 4, 41, 255, 0, 6]
                .get(self.range(0, 7))
                .unwrap(),
        };
        Flow {
            v6,
            src,
            dst,
            proto,
            // Until the transport says TCP to a blocked port.
            must_block: enforced && !mail,
        }
    }

    /// An IPv4 source and whether it is enforced and not exempt.
    fn src4(&mut self) -> (Vec<u8>, bool) {
        let e = fixture_entries();
        let r: [u8; 2] = [self.rng.random(), self.rng.random()];
        let (a, enforced, t) = match self.range(0, 99) {
            // 100.64.0.0/10 without 100.65.0.0/16 and the exempt addresses.
            0..=59 => {
                let mut second = self.range(64, 127) as u8;
                if second == 65 {
                    second = 66;
                }
                let mut a = [100, second, r[0], r[1]];
                if a == [100, 64, 9, 9] || a == e.timed4 {
                    a[3] ^= 0x80;
                }
                (a, true, "src-enforced")
            }
            60..=64 => (e.expired4, true, "src-expired-exempt"),
            65..=67 => (e.timed4, false, "src-exempt-timed"),
            68..=71 => ([100, 64, 9, 9], false, "src-exempt-addr"),
            72..=78 => ([100, 65, r[0], r[1]], false, "src-exempt-prefix"),
            79..=82 => {
                // Just outside the range, either side.
                let a = if r[0] & 1 == 0 {
                    [100, 63, 255, r[1]]
                } else {
                    [100, 128, 0, r[1]]
                };
                (a, false, "src-outside-edge")
            }
            _ => {
                let mut a: [u8; 4] = self.rng.random();
                if a[0] == 100 {
                    a[0] = 101;
                }
                if a[..2] == [8, 0] {
                    a[1] = 1; // the raw range
                }
                (a, false, "src-outside")
            }
        };
        self.tag(t);
        (a.to_vec(), enforced)
    }

    fn src6(&mut self) -> (Vec<u8>, bool) {
        let e = fixture_entries();
        let mut a: [u8; 16] = self.rng.random();
        a[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        let (enforced, t) = match self.range(0, 99) {
            // 2001:db8:100::/40 without 2001:db8:101::/48, the exempt address and the /56.
            0..=59 => {
                a[4] = 0x01;
                if a[5] == 0x01 {
                    a[5] = 0x02;
                }
                if a[5] == 0 && a[6] == 0x55 {
                    a[6] = 0x56;
                }
                (true, "src-enforced")
            }
            60..=64 => {
                a = e.expired6;
                (true, "src-expired-exempt")
            }
            65..=68 => {
                a = v6_const([0x2001, 0xdb8, 0x100, 9, 0, 0, 0, 9]);
                (false, "src-exempt-addr")
            }
            69..=75 => {
                a[4] = 0x01;
                a[5] = 0x01;
                (false, "src-exempt-prefix")
            }
            76..=82 => {
                a[4..7].copy_from_slice(&e.session56[4..7]);
                (false, "src-exempt-session")
            }
            _ => {
                if a[4] == 0x01 {
                    a[4] = 0x02;
                }
                if self.pct(30) {
                    a = self.rng.random();
                    if a[..5] == [0x20, 0x01, 0x0d, 0xb8, 0x01] {
                        a[4] = 0x02;
                    }
                }
                if a[..6] == [0x20, 0x01, 0x0d, 0xb8, 0x86, 0xdd] {
                    a[5] = 0xde; // the raw range
                }
                (false, "src-outside")
            }
        };
        self.tag(t);
        (a.to_vec(), enforced)
    }

    /// A raw-IP IPv4 source: 8.0.x.x (protocol 0x0800) and whether it is enforced and not
    /// exempt; the categories of [`Gen::src4`] inside 8.0.0.0/17.
    fn raw_src4(&mut self) -> (Vec<u8>, bool) {
        let e = fixture_entries();
        let r: [u8; 2] = [self.rng.random(), self.rng.random()];
        let (a, enforced, t) = match self.range(0, 99) {
            // 8.0.0.0/17 without 8.0.65.0/24 and the exempt addresses.
            0..=64 => {
                let mut a = [8, 0, r[0] & 0x7f, r[1]];
                if a[2] == 65 {
                    a[2] = 66;
                }
                if a == [8, 0, 9, 9] || a == e.raw_timed4 {
                    a[3] ^= 0x80;
                }
                (a, true, "src-raw-enforced")
            }
            65..=71 => (e.raw_expired4, true, "src-raw-expired-exempt"),
            72..=76 => (e.raw_timed4, false, "src-raw-exempt-timed"),
            77..=82 => ([8, 0, 9, 9], false, "src-raw-exempt-addr"),
            83..=91 => ([8, 0, 65, r[1]], false, "src-raw-exempt-prefix"),
            // Outside the range, still protocol 0x0800.
            _ => ([8, 0, 0x80 | r[0], r[1]], false, "src-raw-outside"),
        };
        self.tag(t);
        (a.to_vec(), enforced)
    }

    /// A raw-IP IPv6 source: bytes 4-5 0x86dd (the protocol), the categories of
    /// [`Gen::src6`] inside 2001:db8:86dd::/48.
    fn raw_src6(&mut self) -> (Vec<u8>, bool) {
        let e = fixture_entries();
        let mut a: [u8; 16] = self.rng.random();
        a[..6].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0x86, 0xdd]);
        let (enforced, t) = match self.range(0, 99) {
            // Without 2001:db8:86dd:100::/56, the exempt address and the session /56.
            0..=64 => {
                if a[6] == 0x01 {
                    a[6] = 0x02;
                }
                if a[6] == 0x55 {
                    a[6] = 0x56;
                }
                (true, "src-raw-enforced")
            }
            65..=70 => {
                a = e.raw_expired6;
                (true, "src-raw-expired-exempt")
            }
            71..=75 => {
                a = v6_const([0x2001, 0xdb8, 0x86dd, 9, 0, 0, 0, 9]);
                (false, "src-raw-exempt-addr")
            }
            76..=81 => {
                a[6] = 0x01;
                (false, "src-raw-exempt-prefix")
            }
            82..=89 => {
                a[6] = e.raw_session56[6];
                (false, "src-raw-exempt-session")
            }
            // Outside 2001:db8::/32, still protocol 0x86dd.
            _ => {
                if a[..4] == [0x20, 0x01, 0x0d, 0xb8] {
                    a[3] = 0xb9;
                }
                (false, "src-raw-outside")
            }
        };
        self.tag(t);
        (a.to_vec(), enforced)
    }

    fn dst4(&mut self) -> (Vec<u8>, bool) {
        if self.pct(10) {
            self.tag("dst-mail");
            return (vec![198, 51, 100, 25], true);
        }
        let mut a: [u8; 4] = self.rng.random();
        if self.pct(30) {
            a = [198, 51, 100, a[3]];
        }
        if a == [198, 51, 100, 25] {
            a[3] = 26;
        }
        (a.to_vec(), false)
    }

    fn dst6(&mut self) -> (Vec<u8>, bool) {
        let mut a: [u8; 16] = self.rng.random();
        a[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        if self.pct(10) {
            a[4..8].copy_from_slice(&[0, 0x25, 0, 0]);
            self.tag("dst-mail");
            return (a.to_vec(), true);
        }
        if a[4..8] == [0, 0x25, 0, 0] {
            a[7] = 1;
        }
        (a.to_vec(), false)
    }

    fn port(&mut self) -> u16 {
        match self.range(0, 99) {
            0..=39 => 25,
            40..=49 => 2525,
            50..=61 => 587,
            62..=69 => 465,
            70..=74 => *[24u16, 26, 0, 65535, 6400].get(self.range(0, 4)).unwrap(),
            _ => self.rng.random(),
        }
    }

    /// The transport bytes and how many of them Linux must see (TCP: the data offset).
    fn l4(&mut self, flow: &mut Flow) -> (Vec<u8>, usize) {
        let dport = self.port();
        if flow.proto != 6 || !BLOCKED_PORTS.contains(&dport) {
            flow.must_block = false;
        }
        let payload_len = if self.pct(70) { 0 } else { self.range(1, 48) };
        match flow.proto {
            6 => {
                self.tag("tcp");
                let blocked = BLOCKED_PORTS.contains(&dport);
                let mut doff = 5usize;
                let mut header = 20usize;
                match self.range(0, 99) {
                    0..=79 => {}
                    80..=93 => {
                        doff = self.range(6, 15);
                        header = doff * 4;
                        self.tag("tcp-options");
                    }
                    94..=96 => {
                        doff = self.range(0, 4);
                        self.drop_here("tcp-doff-below-5");
                    }
                    _ => {
                        doff = self.range(6, 15);
                        self.drop_here("tcp-doff-past-segment");
                    }
                }
                let mut t = vec![1u8; header]; // NOP options
                let sport: u16 = self.rng.random();
                t[0..2].copy_from_slice(&sport.to_be_bytes());
                t[2..4].copy_from_slice(&dport.to_be_bytes());
                let seq = self.fill(8);
                t[4..12].copy_from_slice(&seq);
                // Reserved and AE bits are noise to Linux; every flag combination counts.
                t[12] = ((doff as u8) << 4) | (self.rng.random::<u8>() & 0x0f);
                t[13] = if self.pct(50) {
                    self.rng.random()
                } else {
                    *[0x02u8, 0x12, 0x10, 0x04, 0x11, 0x18, 0x00, 0xff, 0x14, 0x29]
                        .get(self.range(0, 9))
                        .unwrap()
                };
                let w = self.fill(6);
                t[14..20].copy_from_slice(&w);
                if header > 20 && self.pct(30) {
                    t[header - 1] = 0; // EOL
                }
                let tcp_need = doff * 4;
                if doff > 5 && header == 20 {
                    // Data offset past what follows: keep the payload shorter than it.
                    let room = tcp_need - 20 - 1;
                    let p = self.range(0, room.min(48));
                    t.extend(self.fill(p));
                } else {
                    t.extend(self.fill(payload_len));
                }
                if !blocked {
                    self.tag("port-open");
                }
                let need = tcp_need.max(20);
                (t, need)
            }
            17 => {
                self.tag("udp");
                let mut u = vec![0u8; 8];
                u[0..2].copy_from_slice(&self.rng.random::<u16>().to_be_bytes());
                u[2..4].copy_from_slice(&dport.to_be_bytes());
                u[4..6].copy_from_slice(&((8 + payload_len) as u16).to_be_bytes());
                u.extend(self.fill(payload_len));
                (u, 8)
            }
            1 | 58 => {
                self.tag("icmp");
                let mut i = self.fill(8);
                i[0] = *[0u8, 8, 3, 11, 128, 129].get(self.range(0, 5)).unwrap();
                i.extend(self.fill(payload_len));
                (i, 8)
            }
            _ => {
                self.tag("other-proto");
                (self.fill(8 + payload_len), 0)
            }
        }
    }

    fn ipv4(&mut self, flow: &Flow, (l4, l4_need): (Vec<u8>, usize)) -> Ip {
        self.tag("v4");
        let mut opts_len = 0usize;
        if self.pct(25) {
            opts_len = self.range(1, 10) * 4;
            self.tag("v4-options");
        }
        let mut ihl = 5 + opts_len / 4;
        let mut version = 4u8;
        match self.range(0, 99) {
            0..=2 => {
                ihl = self.range(0, 4);
                self.drop_here("v4-ihl-below-5");
            }
            3..=4 if ihl < 15 => {
                // The TCP header would be read as options: what Linux sees is unclear.
                ihl = self.range(ihl + 1, 15);
                self.drop_here("v4-ihl-too-big");
            }
            5..=6 => {
                version = *[0u8, 5, 6, 15].get(self.range(0, 3)).unwrap();
                self.drop_here("v4-bad-version");
            }
            _ => {}
        }
        let hdr_len = 20 + opts_len;
        let mut payload = l4;
        let mut l4_need = l4_need;
        // Fragments: MF, DF, offsets. A fragment of a blocked segment is as bad as the segment.
        let mut frag: u16 = 0;
        match self.range(0, 99) {
            0..=9 => {
                frag = 0x4000;
                self.tag("v4-df");
            }
            10..=17 => {
                // First fragment: a multiple of 8 bytes of the segment (maybe none of it).
                let keep = self.range(0, payload.len() / 8) * 8;
                payload.truncate(keep);
                l4_need = 0;
                frag = 0x2000;
                self.tag("v4-first-fragment");
            }
            18..=27 => {
                let off = self.range(1, 200) as u16;
                let more = self.pct(50);
                let len = if more {
                    self.range(1, 6) * 8
                } else {
                    self.range(1, 40)
                };
                payload = self.fill(len);
                l4_need = 0;
                frag = off | if more { 0x2000 } else { 0 };
                self.tag("v4-later-fragment");
            }
            _ => {}
        }
        let real_len = hdr_len + payload.len();
        let mut tot_len = real_len;
        let mut padding = 0;
        match self.range(0, 99) {
            0..=9 => {
                padding = self.range(1, 24);
                self.tag("v4-padding");
            }
            10..=13 => {
                tot_len = real_len + self.range(1, 100);
                self.drop_here("v4-tot-len-past-frame");
            }
            14..=15 => {
                tot_len = self.range(0, hdr_len.max(1) - 1);
                self.drop_here("v4-tot-len-below-header");
            }
            16..=23 if !payload.is_empty() => {
                // Shorter than the datagram: Linux trims to it. Fine while the TCP header stays.
                let least = if self.pct(60) { l4_need } else { 0 };
                let hi = payload.len() - 1;
                tot_len = hdr_len + self.range(least.min(hi), hi);
                padding = real_len - tot_len;
                self.tag("v4-tot-len-short");
                if tot_len < hdr_len + l4_need {
                    self.drop_here("v4-trimmed-into-l4");
                }
            }
            _ => {}
        }
        if ihl * 4 > tot_len.max(20) && !self.drops {
            self.drop_here("v4-ihl-past-tot-len");
        }
        let mut h = vec![0u8; hdr_len];
        h[0] = (version << 4) | (ihl as u8 & 0x0f);
        h[1] = self.rng.random();
        h[2..4].copy_from_slice(&(tot_len as u16).to_be_bytes());
        h[4..6].copy_from_slice(&self.rng.random::<u16>().to_be_bytes());
        h[6..8].copy_from_slice(&frag.to_be_bytes());
        h[8] = self.range(1, 255) as u8;
        h[9] = flow.proto;
        h[12..16].copy_from_slice(&flow.src);
        h[16..20].copy_from_slice(&flow.dst);
        for b in &mut h[20..] {
            *b = 1; // NOP
        }
        if opts_len > 0 && self.pct(30) {
            h[hdr_len - 1] = 0; // EOL
        }
        let ck = checksum(&h[..(ihl * 4).clamp(20, hdr_len)]);
        h[10..12].copy_from_slice(&ck.to_be_bytes());
        if self.pct(1) {
            h[10] ^= 0x40;
            self.drop_here("v4-bad-checksum");
        }
        h.extend(payload);
        let pad = self.fill(padding);
        h.extend(pad);
        Ip {
            bytes: h,
            need: tot_len,
        }
    }

    fn ipv6(&mut self, flow: &Flow, (l4, l4_need): (Vec<u8>, usize)) -> Ip {
        self.tag("v6");
        let n = match self.range(0, 99) {
            0..=54 => 0,
            55..=84 => self.range(1, 3),
            _ => {
                self.tag("v6-chain-long");
                self.range(4, 14)
            }
        };
        // Build the chain back to front so each header knows its next header.
        let mut kinds = Vec::with_capacity(n);
        for i in 0..n {
            let k = match self.range(0, 99) {
                0..=14 => 0u8,
                15..=34 => 43,
                35..=62 => 60,
                63..=76 => 51,
                77..=96 => 44,
                97 => 135,
                _ => *[139u8, 140, 253, 254].get(self.range(0, 3)).unwrap(),
            };
            // Hop-by-hop anywhere but first is dropped by Linux; keep it mostly first.
            let k = if k == 0 && i > 0 && self.pct(90) {
                60
            } else {
                k
            };
            kinds.push(k);
        }
        let mut chain: Vec<u8> = Vec::new();
        // The bytes after a later fragment's header are data, not the rest of the chain.
        let mut data_only = false;
        let mut first_frag_at: Option<usize> = None;
        for (i, &k) in kinds.iter().enumerate() {
            let next = kinds.get(i + 1).copied().unwrap_or(flow.proto);
            match k {
                0 | 60 => {
                    if k == 0 {
                        if i > 0 {
                            self.drop_here("v6-hbh-not-first");
                        } else {
                            self.tag("v6-hbh");
                        }
                    } else {
                        self.tag("v6-dstopts");
                    }
                    chain.extend(self.tlv_header(next));
                }
                43 => {
                    self.tag("v6-routing");
                    let units = self.range(0, 3);
                    let mut r = vec![next, units as u8, self.range(0, 4) as u8, 0];
                    if self.pct(5) {
                        r[3] = self.range(1, 3) as u8;
                        self.drop_here("v6-routing-segments-left");
                    }
                    r.resize((units + 1) * 8, 0);
                    chain.extend(r);
                }
                51 => {
                    // With an SA (the attacker owns both ends) Linux takes AH-protected TCP.
                    self.tag("v6-ah");
                    let len = *[2usize, 4, 6].get(self.range(0, 2)).unwrap();
                    let mut a = vec![next, len as u8, 0, 0];
                    a.extend(self.fill((len + 2) * 4 - 4));
                    chain.extend(a);
                }
                44 => {
                    let id = self.fill(4);
                    if self.pct(35) {
                        let off = self.range(1, 200) as u16;
                        let more = self.pct(50);
                        let mut f = vec![next, 0];
                        f.extend(((off << 3) | more as u16).to_be_bytes());
                        f.extend(id);
                        chain.extend(f);
                        let len = if more {
                            self.range(1, 6) * 8
                        } else {
                            self.range(1, 40)
                        };
                        chain.extend(self.fill(len));
                        self.tag("v6-later-fragment");
                        data_only = true;
                        break;
                    }
                    let more = self.pct(60);
                    let mut f = vec![next, 0, 0, more as u8];
                    f.extend(id);
                    chain.extend(f);
                    if more {
                        first_frag_at = Some(chain.len());
                        self.tag("v6-first-fragment");
                    } else {
                        self.tag("v6-atomic-fragment");
                    }
                }
                135 => {
                    self.drop_here("v6-mobility");
                    let units = self.range(0, 2);
                    let mut m = vec![next, units as u8];
                    m.extend(self.fill((units + 1) * 8 - 2));
                    chain.extend(m);
                }
                _ => {
                    self.drop_here("v6-unknown-ext");
                    let units = self.range(0, 2);
                    let mut m = vec![next, units as u8];
                    m.extend(self.fill((units + 1) * 8 - 2));
                    chain.extend(m);
                }
            }
        }
        let mut need_in_payload = chain.len();
        if !data_only {
            need_in_payload += l4_need;
            chain.extend(l4);
            if let Some(start) = first_frag_at {
                // A first fragment carries a multiple of 8 bytes; RFC 8200 4.5 (Linux's
                // ipv6_frag_thdr_truncated) drops one without the whole upper-layer header.
                let frag_len = chain.len() - start;
                let whole = (need_in_payload - start).div_ceil(8);
                let least = if self.pct(60) { whole } else { 0 };
                let keep = self.range(least.min(frag_len / 8), frag_len / 8) * 8;
                chain.truncate(start + keep);
                if chain.len() < need_in_payload {
                    self.drop_here("v6-first-fragment-short");
                }
                need_in_payload = chain.len();
            }
        } else {
            need_in_payload = chain.len();
        }
        let real = chain.len();
        let mut plen = real;
        let mut padding = 0;
        match self.range(0, 99) {
            0..=4 => {
                padding = self.range(1, 24);
                self.tag("v6-padding");
            }
            5..=7 => {
                plen = real + self.range(1, 100);
                self.drop_here("v6-payload-len-past-frame");
            }
            8..=14 if real > 0 => {
                let least = if self.pct(60) { need_in_payload } else { 0 };
                plen = self.range(least.min(real - 1), real - 1);
                padding = real - plen;
                self.tag("v6-payload-len-short");
                if plen < need_in_payload {
                    self.drop_here("v6-trimmed-into-chain");
                }
            }
            15 if real > 0 => {
                plen = 0;
                padding = real;
                self.drop_here("v6-payload-len-zero");
            }
            _ => {}
        }
        let mut h = vec![0u8; 40];
        h[0] = 0x60 | (self.rng.random::<u8>() & 0x0f);
        if self.pct(2) {
            h[0] = (*[4u8, 0, 7, 15].get(self.range(0, 3)).unwrap() << 4) | (h[0] & 0x0f);
            self.drop_here("v6-bad-version");
        }
        h[1..4].copy_from_slice(&self.fill(3));
        h[4..6].copy_from_slice(&(plen as u16).to_be_bytes());
        h[6] = kinds.first().copied().unwrap_or(flow.proto);
        h[7] = self.range(1, 255) as u8;
        h[8..24].copy_from_slice(&flow.src);
        h[24..40].copy_from_slice(&flow.dst);
        h.extend(chain);
        let pad = self.fill(padding);
        h.extend(pad);
        Ip {
            bytes: h,
            need: 40 + plen,
        }
    }

    /// A hop-by-hop or destination options header that Linux accepts: at most 7 bytes of
    /// padding in a row (`ip6_parse_tlv`), the rest unknown skip-type (00xxxxxx) options.
    fn tlv_header(&mut self, next: u8) -> Vec<u8> {
        let units = self.range(0, 3);
        let mut h = vec![next, units as u8, 1, 4, 0, 0, 0, 0]; // PadN of 4
        for _ in 0..units {
            h.extend([0x1e, 6]);
            h.extend(self.fill(6));
        }
        h
    }

    /// A raw-IP device (ppp, tun): the packet itself, or with PPP forms an MPLS stack.
    /// Returns the frame, how far Linux needs it, whether it must be blocked, and the skb
    /// protocol the plan assumes the device gives it.
    fn raw(&mut self, flow: &Flow, ip: Ip) -> (Vec<u8>, usize, bool, u16) {
        self.tag("raw");
        let mb = flow.must_block;
        let family = if flow.v6 { 0x86dd } else { 0x0800 };
        if self.opts.ppp == PppForms::All && self.pct(10) {
            // `ppp_receive_nonmp_frame` gives MPLS its own protocol; `mpls_forward` pops the
            // labels and may route the IP packet inside. The 4th entry's label puts 0x8847
            // (0x8848) in bytes 12-13, where the test run reads the protocol.
            self.tag("raw-mpls");
            let proto = if self.pct(80) { 0x8847u16 } else { 0x8848 };
            let mut b = self.mpls_stack(4, 6);
            b[12..14].copy_from_slice(&proto.to_be_bytes());
            let off = b.len();
            b.extend(ip.bytes);
            return (b, off + ip.need, mb, proto);
        }
        let mut b = ip.bytes;
        if self.pct(3) {
            // Not an IP version nibble: ip_rcv/ipv6_rcv drop it.
            b[0] = (*[0u8, 1, 5, 8, 11, 15].get(self.range(0, 5)).unwrap() << 4) | (b[0] & 15);
            self.drop_here("raw-not-ip");
            return (b, 0, mb, family);
        }
        if self.pct(2) && b.len() >= 14 {
            // The other family's protocol (bytes 12-13 rewritten): ip_rcv/ipv6_rcv drop the
            // wrong version.
            let other: u16 = if flow.v6 { 0x0800 } else { 0x86dd };
            b[12..14].copy_from_slice(&other.to_be_bytes());
            self.drop_here("raw-proto-wrong-family");
            return (b, 0, mb, other);
        }
        (b, ip.need, mb, family)
    }

    /// `lo..=hi` label stack entries, the last with the bottom-of-stack bit.
    fn mpls_stack(&mut self, lo: usize, hi: usize) -> Vec<u8> {
        let n = self.range(lo, hi);
        let mut b = Vec::new();
        for i in 0..n {
            let label: u32 = self.rng.random::<u32>() & 0xfffff;
            let bos = (i + 1 == n) as u32;
            let e = (label << 12) | (self.range(0, 7) as u32) << 9 | bos << 8 | 64;
            b.extend(e.to_be_bytes());
        }
        b
    }

    /// Ethernet, VLAN tags, maybe PPPoE. Returns the frame, the offset by which Linux needs
    /// the frame to reach, the PPPoE (payload offset, declared length, needed length), and
    /// whether the frame must be blocked (before drops are applied).
    #[allow(clippy::type_complexity)]
    fn ethernet(
        &mut self,
        flow: &Flow,
        ip: Ip,
    ) -> (Vec<u8>, usize, Option<(usize, usize, usize)>, bool) {
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        let tags = match self.range(0, 99) {
            0..=54 => 0,
            55..=74 => 1,
            75..=89 => 2,
            _ => 3,
        };
        for _ in 0..tags {
            let tpid = match self.range(0, 39) {
                0..=23 => 0x8100u16,
                24..=37 => 0x88a8,
                _ => 0x9100,
            };
            if tpid == 0x9100 {
                // Linux's eth_type_vlan knows 0x8100 and 0x88a8 only.
                self.drop_here("vlan-9100");
            }
            f.extend(tpid.to_be_bytes());
            f.extend(self.rng.random::<u16>().to_be_bytes());
        }
        match tags {
            1 => self.tag("vlan1"),
            2 => self.tag("vlan2"),
            3 => self.tag("vlan3"),
            _ => {}
        }
        let mut mb = flow.must_block;
        let r = self.range(0, 99);
        if r < 35 {
            return self.pppoe(flow, ip, f);
        }
        let ethertype = if r < 42 {
            // Not IP to Linux, whatever follows.
            mb = false;
            self.tag("ethertype-not-ip");
            *[0x0806u16, 0x8863, 0x88cc, 0x9000, 0x0842, 0x22f0]
                .get(self.range(0, 5))
                .unwrap()
        } else if self.pct(2) {
            // The other family's ethertype: ip_rcv/ipv6_rcv drop the wrong version.
            self.drop_here("ethertype-wrong-family");
            if flow.v6 {
                0x0800
            } else {
                0x86dd
            }
        } else if flow.v6 {
            0x86dd
        } else {
            0x0800
        };
        f.extend(ethertype.to_be_bytes());
        let off = f.len();
        f.extend(ip.bytes);
        if f.len() < 60 && self.pct(50) {
            f.resize(60, 0);
            self.tag("eth-padding");
        }
        (f, off + ip.need, None, mb)
    }

    #[allow(clippy::type_complexity)]
    fn pppoe(
        &mut self,
        flow: &Flow,
        ip: Ip,
        mut f: Vec<u8>,
    ) -> (Vec<u8>, usize, Option<(usize, usize, usize)>, bool) {
        self.tag("pppoe");
        f.extend(0x8864u16.to_be_bytes());
        // pppoe_rcv checks neither version/type nor code.
        let vt = if self.pct(90) {
            0x11
        } else {
            self.rng.random()
        };
        let code = if self.pct(90) { 0 } else { self.rng.random() };
        f.extend([vt, code]);
        f.extend(self.rng.random::<u16>().to_be_bytes());
        let len_at = f.len();
        f.extend([0, 0]);
        let payload_off = f.len();
        let (ppp, inner_need, mb) = self.ppp(flow, ip);
        f.extend(&ppp);
        let exact = ppp.len();
        let declared = match self.range(0, 99) {
            0..=79 => exact,
            80..=87 => {
                self.tag("pppoe-len-short");
                self.range(0, exact)
            }
            88..=96 => {
                self.tag("pppoe-len-long");
                exact + self.range(1, 100)
            }
            _ => {
                self.tag("pppoe-len-zero");
                0
            }
        };
        f[len_at..len_at + 2].copy_from_slice(&(declared as u16).to_be_bytes());
        if f.len() < 60 && self.pct(50) {
            f.resize(60, 0);
            self.tag("eth-padding");
        }
        (
            f,
            payload_off + inner_need,
            Some((payload_off, declared, inner_need)),
            mb,
        )
    }

    /// A PPP protocol field: `ppp_decompress_proto` takes an odd first byte as the whole
    /// (PFC) field, negotiated or not, so the data protocols below 0x100 come in both forms.
    fn ppp_proto(&mut self, out: &mut Vec<u8>, proto: u16) {
        if proto < 0x100 && self.pct(30) {
            out.push(proto as u8);
            self.tag("ppp-pfc-other");
        } else {
            out.extend(proto.to_be_bytes());
        }
    }

    /// A PPP frame (protocol field onwards) carrying the packet, how much of it the kernel
    /// needs, and whether it must be blocked. Mirrors ppp_generic.c's receive path.
    fn ppp(&mut self, flow: &Flow, ip: Ip) -> (Vec<u8>, usize, bool) {
        let ipproto = if flow.v6 { PPP_IPV6 } else { PPP_IPV4 };
        let all = self.opts.ppp == PppForms::All;
        let r = self.range(0, 99);
        let mut out = Vec::new();
        let (need, mb) = match r {
            // Link control and authentication (>= 0xc000, or NCPs): pppd's, not IP.
            0..=5 => {
                let p = *[0xc021u16, 0xc023, 0xc223, 0x8021, 0x8057, 0x80fd]
                    .get(self.range(0, 5))
                    .unwrap();
                self.tag("ppp-control");
                out.extend(p.to_be_bytes());
                (0, false)
            }
            // Data protocols that are not IP: IPX, AppleTalk, bridged (pppd), address and
            // control field (0xff03: protocol >= 0xc000, pppd's).
            6..=8 => {
                let p = *[0x002bu16, 0x0029, 0x0031, 0xff03]
                    .get(self.range(0, 3))
                    .unwrap();
                self.tag("ppp-not-ip");
                out.extend(p.to_be_bytes());
                (0, false)
            }
            // ppp_decompress_proto: an odd first byte is a 1-byte protocol.
            9..=24 if all => {
                self.tag("ppp-pfc");
                out.push(ipproto as u8);
                (1 + ip.need, flow.must_block)
            }
            // Multilink (ppp_receive_mp_frame): short or long sequence header, then a PPP frame.
            25..=32 if all => {
                self.tag("ppp-multilink");
                self.ppp_proto(&mut out, 0x003d);
                let be = *[0xc0u8, 0x80, 0x40, 0x00].get(self.range(0, 3)).unwrap();
                if self.pct(50) {
                    out.extend([be, 0, 0, self.rng.random()]);
                } else {
                    out.extend([be | (self.rng.random::<u8>() & 0x0f), self.rng.random()]);
                }
                if self.pct(50) {
                    out.push(ipproto as u8);
                } else {
                    out.extend(ipproto.to_be_bytes());
                }
                (out.len() + ip.need, flow.must_block)
            }
            // VJ uncompressed TCP (slhc_remember): the protocol byte holds the slot.
            33..=38 if all && !flow.v6 && flow.proto == 6 => {
                self.tag("ppp-vj-uncompressed");
                self.ppp_proto(&mut out, 0x002f);
                let mut b = ip.bytes.clone();
                if b.len() > 9 {
                    b[9] = self.range(0, 15) as u8;
                }
                let off = out.len();
                out.extend(b);
                return (out, off + ip.need, flow.must_block);
            }
            // VJ compressed TCP (slhc_uncompress): deltas against a slot's saved header.
            39..=44 if all && !flow.v6 && flow.proto == 6 => {
                self.tag("ppp-vj-compressed");
                self.ppp_proto(&mut out, 0x002d);
                out.push(0x40 | (self.rng.random::<u8>() & 0x3f));
                out.push(self.range(0, 15) as u8);
                let n = self.range(2, 12);
                out.extend(self.fill(n));
                return (out, 0, flow.must_block);
            }
            // Compressed datagram (ppp_decompress_frame): opaque here.
            45..=49 if all => {
                self.tag("ppp-compressed");
                self.ppp_proto(&mut out, 0x00fd);
                out.extend(self.rng.random::<u16>().to_be_bytes());
                let n = self.range(4, 40);
                out.extend(self.fill(n));
                return (out, 0, flow.must_block);
            }
            // MPLS unicast/multicast: the label stack, then the packet.
            50..=55 if all => {
                self.tag("ppp-mpls");
                let p = if self.pct(80) { 0x0281u16 } else { 0x0283 };
                out.extend(p.to_be_bytes());
                out.extend(self.mpls_stack(1, 3));
                (out.len() + ip.need, flow.must_block)
            }
            _ => {
                out.extend(ipproto.to_be_bytes());
                if self.pct(2) {
                    // The other family's protocol: ip_rcv/ipv6_rcv drop the wrong version.
                    let other = if flow.v6 { PPP_IPV4 } else { PPP_IPV6 };
                    out.clear();
                    out.extend(other.to_be_bytes());
                    self.drop_here("ppp-wrong-family");
                }
                (2 + ip.need, flow.must_block)
            }
        };
        out.extend(ip.bytes);
        (out, need, mb)
    }
}

/// RFC 1071 over an IPv4 header.
fn checksum(h: &[u8]) -> u16 {
    let mut s: u32 = h
        .chunks(2)
        .enumerate()
        .filter(|(i, _)| *i != 5)
        .map(|(_, c)| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const ALL: Options = Options { ppp: PppForms::All };
    const CLASSIC: Options = Options {
        ppp: PppForms::Classic,
    };

    fn histogram(opts: &Options, n: u64) -> (BTreeMap<Truth, u64>, BTreeMap<&'static str, u64>) {
        let (mut truth, mut tags) = (BTreeMap::new(), BTreeMap::new());
        for i in 0..n {
            let c = case(7, i, opts);
            *truth.entry(c.truth).or_insert(0) += 1;
            for t in c.tags {
                *tags.entry(t).or_insert(0) += 1;
            }
        }
        (truth, tags)
    }

    #[test]
    fn a_seed_and_index_give_the_same_frame() {
        for i in [0, 1, 999, 123_456] {
            let (a, b) = (case(42, i, &ALL), case(42, i, &ALL));
            assert_eq!((a.bytes, a.truth, a.tags), (b.bytes, b.truth, b.tags));
        }
        assert_ne!(case(42, 5, &ALL).bytes, case(43, 5, &ALL).bytes);
    }

    /// Every form the brief names shows up, and enough frames must be blocked for the oracle
    /// to mean something.
    #[test]
    fn every_form_is_generated_and_the_truth_is_not_all_drops() {
        let n = 50_000;
        let (truth, tags) = histogram(&ALL, n);
        eprintln!("{truth:?}\n{tags:#?}");
        let share = |t| truth.get(&t).copied().unwrap_or(0) * 100 / n;
        assert!(share(Truth::MustBlock) >= 12, "{truth:?}");
        assert!(share(Truth::Free) >= 25, "{truth:?}");
        assert!(share(Truth::KernelDrops) <= 40, "{truth:?}");
        for t in [
            "vlan1",
            "vlan2",
            "vlan3",
            "vlan-9100",
            "pppoe",
            "pppoe-len-short",
            "pppoe-len-long",
            "pppoe-len-zero",
            "ppp-pfc",
            "ppp-pfc-other",
            "ppp-multilink",
            "ppp-vj-compressed",
            "ppp-vj-uncompressed",
            "ppp-compressed",
            "ppp-mpls",
            "ppp-control",
            "ppp-not-ip",
            "raw",
            "raw-mpls",
            "raw-not-ip",
            "raw-proto-wrong-family",
            "raw-proto-unplanned",
            "src-raw-enforced",
            "src-raw-expired-exempt",
            "src-raw-exempt-addr",
            "src-raw-exempt-prefix",
            "src-raw-exempt-session",
            "src-raw-exempt-timed",
            "src-raw-outside",
            "v4-options",
            "v4-ihl-below-5",
            "v4-ihl-too-big",
            "v4-tot-len-past-frame",
            "v4-tot-len-below-header",
            "v4-tot-len-short",
            "v4-df",
            "v4-first-fragment",
            "v4-later-fragment",
            "v6-hbh",
            "v6-hbh-not-first",
            "v6-routing",
            "v6-dstopts",
            "v6-ah",
            "v6-first-fragment",
            "v6-later-fragment",
            "v6-atomic-fragment",
            "v6-mobility",
            "v6-unknown-ext",
            "v6-chain-long",
            "tcp-options",
            "tcp-doff-below-5",
            "tcp-doff-past-segment",
            "udp",
            "icmp",
            "truncated",
            "src-enforced",
            "src-expired-exempt",
            "src-exempt-addr",
            "src-exempt-prefix",
            "src-exempt-session",
            "src-exempt-timed",
            "src-outside",
            "src-outside-edge",
            "dst-mail",
            "port-open",
        ] {
            assert!(
                tags.get(t).copied().unwrap_or(0) >= 20,
                "{t} too rare: {tags:?}"
            );
        }
    }

    /// Raw frames are only must-block when the test run will present the protocol the plan
    /// assumed, and enough of them are (MPLS among them) for the raw program's oracle to bite.
    #[test]
    fn raw_must_block_frames_present_their_protocol() {
        let n = 50_000;
        let (mut raw, mut must, mut unplanned) = (0u64, 0u64, 0u64);
        let mut by_proto: BTreeMap<u16, u64> = BTreeMap::new();
        for i in 0..n {
            let c = case(7, i, &ALL);
            let Link::RawProto(p) = c.link else { continue };
            raw += 1;
            assert_eq!(p, test_run_protocol(&c.bytes), "#{i}");
            match c.truth {
                Truth::MustBlock => {
                    must += 1;
                    *by_proto.entry(p).or_default() += 1;
                    let nibble = c.bytes[0] >> 4;
                    assert!(
                        matches!(
                            (p, nibble),
                            (0x0800, 4) | (0x86dd, 6) | (0x8847 | 0x8848, _)
                        ),
                        "#{i}: {p:#x} {}",
                        hex(&c.bytes)
                    );
                }
                Truth::ProtocolNotPlanned => unplanned += 1,
                _ => {}
            }
        }
        eprintln!("raw {raw}, must-block {must} {by_proto:x?}, protocol not planned {unplanned}");
        // As high a share as the Ethernet frames have (see the test above).
        assert!(must * 100 / raw >= 12, "{must} of {raw}");
        assert!(unplanned * 100 / raw <= 20, "{unplanned} of {raw}");
        for p in [0x0800, 0x86dd, 0x8847, 0x8848] {
            assert!(
                by_proto.get(&p).copied().unwrap_or(0) >= 20,
                "{p:#x}: {by_proto:?}"
            );
        }
    }

    #[test]
    fn classic_leaves_out_the_ppp_forms_under_repair() {
        let (_, tags) = histogram(&CLASSIC, 20_000);
        for t in tags.keys() {
            assert!(
                !matches!(
                    *t,
                    "ppp-pfc"
                        | "ppp-pfc-other"
                        | "ppp-multilink"
                        | "ppp-vj-compressed"
                        | "ppp-vj-uncompressed"
                        | "ppp-compressed"
                        | "ppp-mpls"
                        | "raw-mpls"
                ),
                "{t}"
            );
        }
    }

    #[test]
    fn ipv4_header_checksum_verifies() {
        let h = [
            0x45u8, 0, 0, 0x28, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 100, 64, 1, 2, 203, 0, 113, 80,
        ];
        let mut h2 = h;
        h2[10..12].copy_from_slice(&checksum(&h).to_be_bytes());
        let s: u32 = h2
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]) as u32)
            .sum();
        assert_eq!((s & 0xffff) + (s >> 16), 0xffff);
    }
}
