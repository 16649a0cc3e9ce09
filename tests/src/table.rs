//! The named frame table: every case is a frame, the link it arrives on, and the reason it
//! must get under [`CONFIG`], written down here by hand (never computed by the parser).
//!
//! `tests/tests/datapath.rs` runs every case through the real XDP, TC and raw TC programs
//! (BPF_PROG_TEST_RUN) and through the reference model. Cross products (encapsulation x IP
//! form x flow) are generated, but each part carries its own name and expectation.

use port25_common::{parse::Link, Reason};

use crate::frame::*;

/// The policy every case is decided under.
pub const CONFIG: &str = r#"
blocked_ports: [25]
subscriber_ranges:
  - 100.64.0.0/10
  - "2001:db8:100::/40"
  # Raw cases: BPF_PROG_TEST_RUN takes bytes 12-13 of the data as the skb's protocol, which
  # for a raw IP packet is the start of the IPv4 source (8.0 = 0x0800) or bytes 4-5 of the
  # IPv6 source (:86dd: = 0x86dd).
  - 8.0.0.0/16
  - "2001:db8:86dd::/48"
mail_servers: [198.51.100.25/32, "2001:db8:25::/64"]
exempt:
  - prefix: 100.64.9.9/32
  - prefix: 100.65.0.0/16
  - prefix: "2001:db8:100:9::9/128"
  - prefix: "2001:db8:101::/48"
"#;

pub const SUB: [u8; 4] = [100, 64, 1, 2];
pub const EXT: [u8; 4] = [203, 0, 113, 80];
pub const MAIL: [u8; 4] = [198, 51, 100, 25];
pub const NONSUB: [u8; 4] = [10, 0, 0, 1];
pub const SUB6: &str = "2001:db8:100::2";
pub const EXT6: &str = "2001:db8:ff::80";
pub const MAIL6: &str = "2001:db8:25::25";
pub const NONSUB6: &str = "2001:db8:200::2";
/// Raw-IP subscriber sources whose bytes give the protocol under BPF_PROG_TEST_RUN.
pub const RAW_SUB: [u8; 4] = [8, 0, 1, 2];
pub const RAW_SUB6: &str = "2001:db8:86dd::2";

/// One row: a frame, the link it arrives on, and what the model and each program must make
/// of it.
pub struct Case {
    pub name: String,
    pub link: Link,
    pub frame: Vec<u8>,
    /// The reference model's reason.
    pub want: Reason,
    /// What the XDP program does with it (Ethernet links).
    pub xdp: HookWant,
    /// What the TC program does with it (Ethernet links).
    pub tc: HookWant,
    /// What the raw-IP TC program does with it (raw-IP links).
    pub raw_tc: HookWant,
}

/// What one program must do with a row's frame under BPF_PROG_TEST_RUN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookWant {
    /// The program is not attached to this kind of link: not run.
    NotAttached,
    /// The program returns the verdict of this reason and counts it.
    Decides(Reason),
    /// BPF_PROG_TEST_RUN refuses the input, so the model decides alone: any frame shorter
    /// than an Ethernet header, and for skb programs (TC, raw TC) also a frame whose
    /// protocol is IPv4 or IPv6 but whose IP header is not all there.
    Refused,
}

impl Case {
    /// XDP and TC both refuse it (shorter than an Ethernet header).
    fn refused(&mut self) -> &mut Case {
        self.xdp = HookWant::Refused;
        self.tc = HookWant::Refused;
        self
    }
    /// The skb programs refuse it (IP protocol, IP header incomplete); XDP decides.
    fn skb_refuses(&mut self) -> &mut Case {
        if self.link == Link::Ethernet {
            self.tc = HookWant::Refused;
        } else {
            self.raw_tc = HookWant::Refused;
        }
        self
    }
}

#[derive(Default)]
struct Table(Vec<Case>);

impl Table {
    /// An Ethernet frame, decided alike by the model, XDP and TC.
    fn eth(&mut self, name: impl Into<String>, frame: Vec<u8>, want: Reason) -> &mut Case {
        self.0.push(Case {
            name: name.into(),
            link: Link::Ethernet,
            frame,
            want,
            xdp: HookWant::Decides(want),
            tc: HookWant::Decides(want),
            raw_tc: HookWant::NotAttached,
        });
        self.0.last_mut().unwrap()
    }
    /// A raw-IP device; the skb's protocol is what BPF_PROG_TEST_RUN will give it.
    fn raw(&mut self, name: impl Into<String>, packet: Vec<u8>, want: Reason) -> &mut Case {
        let proto = test_run_protocol(&packet);
        self.raw_as(name, proto, packet, want)
    }
    fn raw_as(
        &mut self,
        name: impl Into<String>,
        proto: u16,
        packet: Vec<u8>,
        want: Reason,
    ) -> &mut Case {
        self.0.push(Case {
            name: format!("raw {}", name.into()),
            link: Link::RawProto(proto),
            frame: packet,
            want,
            xdp: HookWant::NotAttached,
            tc: HookWant::NotAttached,
            raw_tc: HookWant::Decides(want),
        });
        self.0.last_mut().unwrap()
    }
}

/// The bytes an skb test run insists on for a frame of this ethertype: the Ethernet header,
/// and the IP header after it when the ethertype says IP.
fn skb_minimum(ethertype: u16) -> usize {
    match ethertype {
        0x0800 => 14 + 20,
        0x86dd => 14 + 40,
        _ => 14,
    }
}

fn syn(port: u16) -> Vec<u8> {
    Tcp::to(port).bytes()
}

fn syn4(src: [u8; 4], dst: [u8; 4], port: u16) -> Vec<u8> {
    V4::new(src, dst).frame(&syn(port))
}

fn ip4(src: [u8; 4], dst: [u8; 4], port: u16) -> Vec<u8> {
    V4::new(src, dst).packet(&syn(port))
}

fn ip6(src: &str, dst: &str, port: u16) -> Vec<u8> {
    v6_packet(v6(src), v6(dst), 6, &syn(port), None)
}

fn syn6(src: &str, dst: &str, port: u16) -> Vec<u8> {
    eth(0x86dd, &ip6(src, dst, port))
}

fn v6_chain(first: u8, chain: &[u8]) -> Vec<u8> {
    v6_frame(v6(SUB6), v6(EXT6), first, chain)
}

/// Every case, in a stable order.
pub fn cases() -> Vec<Case> {
    let mut t = Table::default();
    basics(&mut t);
    cross_product(&mut t);
    ipv4_forms(&mut t);
    ipv6_forms(&mut t);
    tcp_forms(&mut t);
    ppp(&mut t);
    mpls(&mut t);
    truncations(&mut t);
    raw(&mut t);
    tunnels(&mut t);
    t.0
}

fn basics(t: &mut Table) {
    use Reason::*;
    t.eth("ARP passes", eth(0x0806, &[0u8; 28]), PassNotIp);
    t.eth(
        "PPPoE discovery (PADI) passes",
        eth(0x8863, &[0x11, 0x09, 0, 0, 0, 0]),
        PassNotIp,
    );
    t.eth(
        "frame shorter than an Ethernet header",
        vec![0u8; 10],
        PassNotIp,
    )
    .refused();
    t.eth(
        "subscriber SYN to external:25",
        syn4(SUB, EXT, 25),
        BlockPort,
    );
    for port in [587, 465, 2525, 24, 26, 125, 250, 6425] {
        t.eth(
            format!("subscriber SYN to external:{port}"),
            syn4(SUB, EXT, port),
            PassPortOpen,
        );
    }
    t.eth(
        "subscriber to mail server:25",
        syn4(SUB, MAIL, 25),
        PassMailServer,
    );
    t.eth(
        "non-subscriber to external:25",
        syn4(NONSUB, EXT, 25),
        PassNotSubscriber,
    );
    t.eth(
        "exempt address",
        syn4([100, 64, 9, 9], EXT, 25),
        PassExemptAddr,
    );
    t.eth(
        "exempt prefix",
        syn4([100, 65, 3, 4], EXT, 25),
        PassExemptPrefix,
    );
    t.eth(
        "expired exempt address",
        syn4([100, 64, 7, 7], EXT, 25),
        BlockPort,
    );
    t.eth(
        "timed exempt address, not expired",
        syn4([100, 64, 8, 8], EXT, 25),
        PassExemptAddr,
    );
    t.eth(
        "Ethernet padding after the datagram",
        {
            let mut f = syn4(SUB, EXT, 25);
            f.resize(64, 0);
            f
        },
        BlockPort,
    );
    t.eth(
        "IPv6 subscriber to external:25",
        syn6(SUB6, EXT6, 25),
        BlockPort,
    );
    t.eth(
        "IPv6 subscriber to external:587",
        syn6(SUB6, EXT6, 587),
        PassPortOpen,
    );
    t.eth(
        "IPv6 subscriber to mail server",
        syn6(SUB6, MAIL6, 25),
        PassMailServer,
    );
    t.eth(
        "IPv6 non-subscriber",
        syn6(NONSUB6, EXT6, 25),
        PassNotSubscriber,
    );
    t.eth(
        "IPv6 exempt address",
        syn6("2001:db8:100:9::9", EXT6, 25),
        PassExemptAddr,
    );
    t.eth(
        "IPv6 exempt prefix",
        syn6("2001:db8:101:1::1", EXT6, 25),
        PassExemptPrefix,
    );
    t.eth(
        "IPv6 session /56",
        syn6("2001:db8:100:55aa::1", EXT6, 25),
        PassExemptSession,
    );
    t.eth(
        "IPv6 next to the session /56",
        syn6("2001:db8:100:5600::1", EXT6, 25),
        BlockPort,
    );
    t.eth("VLAN tag cut short", eth(0x8100, &[0, 1]), BlockTruncated);
}

/// One flow: addresses, the segment, and the reason it gets when nothing else interferes.
struct Flow {
    name: &'static str,
    src4: [u8; 4],
    dst4: [u8; 4],
    src6: &'static str,
    dst6: &'static str,
    /// `None`: UDP to port 25.
    tcp: Option<Tcp>,
    want: Reason,
}

fn flows() -> Vec<Flow> {
    use Reason::*;
    let tcp = |port, flags, doff| {
        Some(Tcp {
            flags,
            doff,
            ..Tcp::to(port)
        })
    };
    let f = |name, src4, dst4, src6, dst6, tcp, want| Flow {
        name,
        src4,
        dst4,
        src6,
        dst6,
        tcp,
        want,
    };
    vec![
        f(
            "SYN to external:25",
            SUB,
            EXT,
            SUB6,
            EXT6,
            tcp(25, SYN, 5),
            BlockPort,
        ),
        f(
            "SYN to external:587",
            SUB,
            EXT,
            SUB6,
            EXT6,
            tcp(587, SYN, 5),
            PassPortOpen,
        ),
        f(
            "FIN|ACK to external:25",
            SUB,
            EXT,
            SUB6,
            EXT6,
            tcp(25, 0x11, 5),
            BlockPort,
        ),
        f(
            "data offset 4 to :25",
            SUB,
            EXT,
            SUB6,
            EXT6,
            tcp(25, SYN, 4),
            BlockBadTcpHeader,
        ),
        f(
            "non-subscriber SYN to :25",
            NONSUB,
            EXT,
            NONSUB6,
            EXT6,
            tcp(25, SYN, 5),
            PassNotSubscriber,
        ),
        f(
            "SYN to the mail server:25",
            SUB,
            MAIL,
            SUB6,
            MAIL6,
            tcp(25, SYN, 5),
            PassMailServer,
        ),
        f("UDP to external:25", SUB, EXT, SUB6, EXT6, None, PassNotTcp),
    ]
}

#[derive(Clone, Copy)]
enum IpForm {
    V4,
    V4Options,
    V6,
    V6HopByHop,
}

impl IpForm {
    const ALL: [IpForm; 4] = [
        IpForm::V4,
        IpForm::V4Options,
        IpForm::V6,
        IpForm::V6HopByHop,
    ];
    fn name(self) -> &'static str {
        match self {
            IpForm::V4 => "IPv4",
            IpForm::V4Options => "IPv4 with 8 bytes of options",
            IpForm::V6 => "IPv6",
            IpForm::V6HopByHop => "IPv6 with hop-by-hop",
        }
    }
    fn is_v6(self) -> bool {
        matches!(self, IpForm::V6 | IpForm::V6HopByHop)
    }
    fn packet(self, f: &Flow) -> Vec<u8> {
        let (proto, l4) = match &f.tcp {
            Some(t) => (6u8, t.bytes()),
            None => (17u8, vec![0x9c, 0x40, 0, 25, 0, 8, 0, 0]),
        };
        match self {
            IpForm::V4 | IpForm::V4Options => {
                let mut v = V4::new(f.src4, f.dst4);
                v.proto = proto;
                if matches!(self, IpForm::V4Options) {
                    v = v.with_options(8);
                }
                v.packet(&l4)
            }
            IpForm::V6 => v6_packet(v6(f.src6), v6(f.dst6), proto, &l4, None),
            IpForm::V6HopByHop => {
                let chain = [ext(proto), l4].concat();
                v6_packet(v6(f.src6), v6(f.dst6), 0, &chain, None)
            }
        }
    }
}

/// Wraps an IP packet (IPv6 or not) into a link frame.
type Wrap = Box<dyn Fn(&[u8], bool) -> Vec<u8>>;

/// How the IP packet reaches the NIC. `None` as the override: the flow decides.
fn encapsulations() -> Vec<(String, Wrap, Option<Reason>)> {
    let et = |v6: bool| if v6 { 0x86dd } else { 0x0800 };
    let ppp2 = |v6: bool| {
        if v6 {
            vec![0x00, 0x57]
        } else {
            vec![0x00, 0x21]
        }
    };
    let ppp1 = |v6: bool| if v6 { vec![0x57] } else { vec![0x21] };
    let tpids = [0x8100u16, 0x88a8, 0x9100];
    let mut out: Vec<(String, Wrap, Option<Reason>)> = vec![(
        "Ethernet".into(),
        Box::new(move |ip: &[u8], v6| eth(et(v6), ip)),
        None,
    )];
    for a in tpids {
        out.push((
            format!("VLAN {a:#06x}"),
            Box::new(move |ip: &[u8], v6| vlan(&eth(et(v6), ip), &[a])),
            None,
        ));
    }
    for a in tpids {
        for b in tpids {
            out.push((
                format!("QinQ {a:#06x}/{b:#06x}"),
                Box::new(move |ip: &[u8], v6| vlan(&eth(et(v6), ip), &[a, b])),
                None,
            ));
        }
    }
    out.push((
        "PPPoE, 2-byte PPP protocol".into(),
        Box::new(move |ip: &[u8], v6| pppoe_with(&ppp2(v6), ip, None)),
        None,
    ));
    out.push((
        "PPPoE, 1-byte PPP protocol (PFC)".into(),
        Box::new(move |ip: &[u8], v6| pppoe_with(&ppp1(v6), ip, None)),
        None,
    ));
    out.push((
        "VLAN 0x8100 + PPPoE, 2-byte protocol".into(),
        Box::new(move |ip: &[u8], v6| vlan(&pppoe_with(&ppp2(v6), ip, None), &[0x8100])),
        None,
    ));
    out.push((
        "QinQ 0x88a8/0x8100 + PPPoE, 1-byte protocol".into(),
        Box::new(move |ip: &[u8], v6| vlan(&pppoe_with(&ppp1(v6), ip, None), &[0x88a8, 0x8100])),
        None,
    ));
    // A third tag is deeper than the parser walks: a doubt with no address to decide by.
    for a in tpids {
        out.push((
            format!("three VLAN tags {a:#06x}"),
            Box::new(move |ip: &[u8], v6| vlan(&eth(et(v6), ip), &[a, a, a])),
            Some(Reason::BlockEncap),
        ));
    }
    out.push((
        "three VLAN tags + PPPoE".into(),
        Box::new(move |ip: &[u8], v6| {
            vlan(&pppoe_with(&ppp2(v6), ip, None), &[0x88a8, 0x8100, 0x8100])
        }),
        Some(Reason::BlockEncap),
    ));
    out
}

fn cross_product(t: &mut Table) {
    for (encap, wrap, over) in encapsulations() {
        for form in IpForm::ALL {
            for flow in flows() {
                t.eth(
                    format!("{encap} / {} / {}", form.name(), flow.name),
                    wrap(&form.packet(&flow), form.is_v6()),
                    over.unwrap_or(flow.want),
                );
            }
        }
    }
}

fn ipv4_forms(t: &mut Table) {
    use Reason::*;
    let with =
        |f: &dyn Fn(&mut V4), port: u16| Frame::eth().ipv4(SUB, EXT).tcp(port).v4_with(f).build();
    for ihl in 0..5u8 {
        t.eth(
            format!("IHL {ihl} to :587"),
            with(&|v| v.ihl = ihl, 587),
            BlockBadIpHeader,
        );
    }
    t.eth(
        "IHL 4 from a non-subscriber",
        Frame::eth()
            .ipv4(NONSUB, EXT)
            .tcp(25)
            .v4_with(|v| v.ihl = 4)
            .build(),
        PassNotSubscriber,
    );
    for words in 1..=10usize {
        let opts = V4::new(SUB, EXT).with_options(words * 4);
        t.eth(
            format!("IPv4 with {} bytes of options to :25", words * 4),
            opts.frame(&syn(25)),
            BlockPort,
        );
        t.eth(
            format!("IPv4 with {} bytes of options to :587", words * 4),
            opts.frame(&syn(587)),
            PassPortOpen,
        );
    }
    t.eth(
        "IHL 15 but total length 40",
        Frame::eth()
            .ipv4(SUB, EXT)
            .options(40)
            .v4_with(|v| v.tot_len = Some(40))
            .tcp(587)
            .build(),
        BlockBadIpHeader,
    );
    for version in [0u8, 1, 2, 3, 5, 6, 7, 8, 15] {
        t.eth(
            format!("IP version {version} in an IPv4 ethertype"),
            with(&|v| v.version = version, 587),
            BlockBadIpHeader,
        );
    }
    for (what, len, want) in [
        ("0", 0u16, BlockBadIpHeader),
        ("12 (below the header)", 12, BlockBadIpHeader),
        ("19", 19, BlockBadIpHeader),
        ("20 (no room for TCP)", 20, BlockTruncated),
        ("39 (TCP one byte short)", 39, BlockTruncated),
        ("41 (one beyond the frame)", 41, BlockTruncated),
        ("400 (beyond the frame)", 400, BlockTruncated),
        ("65535", 65535, BlockTruncated),
    ] {
        t.eth(
            format!("IPv4 total length {what} to :587"),
            with(&|v| v.tot_len = Some(len), 587),
            want,
        );
    }
    t.eth(
        "IPv4 total length 40 with trailing bytes (ip_rcv trims)",
        {
            let mut v = V4::new(SUB, EXT);
            v.tot_len = Some(40);
            v.frame(&[syn(25), vec![0xee; 30]].concat())
        },
        BlockPort,
    );
    // Fragments: flags DF 0x4000, MF 0x2000; offset in 8-byte units.
    for (what, frag, port, want) in [
        ("DF", 0x4000u16, 25, BlockPort),
        ("DF", 0x4000, 587, PassPortOpen),
        ("MF (first fragment)", 0x2000, 25, BlockPort),
        ("MF (first fragment)", 0x2000, 587, PassPortOpen),
        ("reserved flag", 0x8000, 25, BlockPort),
        ("offset 1 (8 bytes)", 0x0001, 587, BlockFragment),
        ("offset 2 with MF", 0x2002, 587, BlockFragment),
        ("offset 185 with MF", 0x20b9, 587, BlockFragment),
        ("last fragment, offset 0x1fff", 0x1fff, 587, BlockFragment),
        ("DF and offset 3", 0x4003, 587, BlockFragment),
    ] {
        t.eth(
            format!("IPv4 {what} to :{port}"),
            with(&|v| v.frag = frag, port),
            want,
        );
    }
    let nonfirst = |src, dst| {
        Frame::eth()
            .ipv4(src, dst)
            .v4_with(|v| v.frag = 0x0010)
            .l4(6, &[0u8; 16])
            .build()
    };
    t.eth("non-first fragment", nonfirst(SUB, EXT), BlockFragment);
    t.eth(
        "non-first fragment to the mail server",
        nonfirst(SUB, MAIL),
        PassMailServer,
    );
    t.eth(
        "non-first fragment from a non-subscriber",
        nonfirst(NONSUB, EXT),
        PassNotSubscriber,
    );
    t.eth(
        "non-first fragment from an exempt prefix",
        nonfirst([100, 65, 1, 1], EXT),
        PassExemptPrefix,
    );
    for (proto, name) in [(17u8, "UDP"), (1, "ICMP"), (132, "SCTP"), (136, "UDP-Lite")] {
        t.eth(
            format!("IPv4 {name} to :25"),
            Frame::eth().ipv4(SUB, EXT).tcp(25).proto(proto).build(),
            PassNotTcp,
        );
    }
}

fn ipv6_forms(t: &mut Table) {
    use Reason::*;
    // Every walked extension kind, alone before TCP.
    for (kind, name) in [
        (0u8, "hop-by-hop"),
        (43, "routing"),
        (60, "destination options"),
        (135, "mobility"),
        (139, "HIP"),
        (140, "shim6"),
        (253, "experimental 253"),
        (254, "experimental 254"),
    ] {
        for (port, want) in [(25u16, BlockPort), (587, PassPortOpen)] {
            t.eth(
                format!("IPv6 {name} header, TCP to :{port}"),
                Frame::eth().ipv6(SUB6, EXT6).ext(kind).tcp(port).build(),
                want,
            );
        }
        t.eth(
            format!("IPv6 {name} header cut short"),
            v6_chain(kind, &[6, 0, 0, 0]),
            BlockTruncated,
        );
        t.eth(
            format!("IPv6 {name} header longer than the payload"),
            v6_chain(kind, &[vec![6, 30, 0, 0, 0, 0, 0, 0], syn(25)].concat()),
            BlockTruncated,
        );
    }
    // Authentication header: length in 4-octet units minus 2 (len 1 = 12 bytes).
    let ah = |next| vec![next, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0];
    t.eth(
        "IPv6 AH, TCP to :25",
        v6_chain(51, &[ah(6), syn(25)].concat()),
        BlockPort,
    );
    t.eth(
        "IPv6 AH, TCP to :587",
        v6_chain(51, &[ah(6), syn(587)].concat()),
        PassPortOpen,
    );
    t.eth(
        "IPv6 AH then destination options, TCP to :25",
        v6_chain(51, &[ah(60), ext(6), syn(25)].concat()),
        BlockPort,
    );
    for (what, chain, want) in [
        (
            "first fragment",
            [frag6(6, 0, true), syn(25)].concat(),
            BlockPort,
        ),
        (
            "atomic fragment",
            [frag6(6, 0, false), syn(25)].concat(),
            BlockPort,
        ),
        (
            "first fragment to :587",
            [frag6(6, 0, true), syn(587)].concat(),
            PassPortOpen,
        ),
        (
            "non-first fragment",
            [frag6(6, 10, false), vec![0; 16]].concat(),
            BlockFragment,
        ),
        (
            "middle fragment",
            [frag6(6, 1, true), vec![0; 16]].concat(),
            BlockFragment,
        ),
        (
            "last fragment at 0x1fff",
            [frag6(6, 0x1fff, false), vec![0; 16]].concat(),
            BlockFragment,
        ),
        (
            "fragment header cut short",
            vec![6, 0, 0, 0],
            BlockTruncated,
        ),
        (
            "first fragment of UDP",
            [frag6(17, 0, true), vec![0; 8]].concat(),
            PassNotTcp,
        ),
    ] {
        t.eth(format!("IPv6 {what}"), v6_chain(44, &chain), want);
    }
    t.eth(
        "IPv6 non-first fragment from a non-subscriber",
        v6_frame(
            v6(NONSUB6),
            v6(EXT6),
            44,
            &[frag6(6, 10, false), vec![0; 16]].concat(),
        ),
        PassNotSubscriber,
    );
    // Chains at the bound: up to MAX_EXT_HEADERS - 1 = 7 extension headers before TCP.
    let kinds = [0u8, 60, 43, 60, 135, 139, 140, 253, 254, 60, 60];
    for n in 1..=10usize {
        let chain = kinds[..n]
            .iter()
            .fold(Frame::eth().ipv6(SUB6, EXT6), |f, k| f.ext(*k));
        let want = if n <= 7 { PassPortOpen } else { BlockExtChain };
        t.eth(
            format!("IPv6 chain of {n} extension headers, TCP to :587"),
            chain.tcp(587).build(),
            want,
        );
    }
    for (n, last, want) in [
        (8usize, 17u8, PassNotTcp),
        (8, 59, PassNotTcp),
        (9, 58, BlockExtChain),
    ] {
        let mut c = Vec::new();
        for i in 0..n {
            c.extend(ext(if i + 1 == n { last } else { 60 }));
        }
        c.extend([0u8; 8]);
        t.eth(
            format!("IPv6 chain of {n} extension headers ending in protocol {last}"),
            v6_chain(60, &c),
            want,
        );
    }
    t.eth(
        "IPv6 payload length beyond the frame",
        Frame::eth()
            .ipv6(SUB6, EXT6)
            .tcp(25)
            .payload_len(200)
            .build(),
        BlockTruncated,
    );
    t.eth(
        "IPv6 payload length 0 (jumbogram) with hop-by-hop",
        Frame::eth()
            .ipv6(SUB6, EXT6)
            .ext(0)
            .tcp(25)
            .payload_len(0)
            .build(),
        BlockTruncated,
    );
    t.eth(
        "IPv6 payload length short of the TCP header",
        Frame::eth()
            .ipv6(SUB6, EXT6)
            .tcp(25)
            .payload_len(12)
            .build(),
        BlockTruncated,
    );
    t.eth(
        "IPv6 trailing bytes after the payload",
        eth(0x86dd, &[ip6(SUB6, EXT6, 25), vec![0xee; 20]].concat()),
        BlockPort,
    );
    for (nh, name) in [(17u8, "UDP"), (58, "ICMPv6"), (59, "no next header")] {
        t.eth(format!("IPv6 {name}"), v6_chain(nh, &[0u8; 8]), PassNotTcp);
    }
    t.eth(
        "IP version 4 in an IPv6 ethertype",
        Frame::eth().ipv6(SUB6, EXT6).tcp(587).ip_version(4).build(),
        BlockBadIpHeader,
    );
}

fn tcp_forms(t: &mut Table) {
    use Reason::*;
    let v4 = || Frame::eth().ipv4(SUB, EXT);
    let v6 = || Frame::eth().ipv6(SUB6, EXT6);
    for doff in 0..=15u8 {
        let want = if doff < 5 {
            BlockBadTcpHeader
        } else {
            BlockPort
        };
        t.eth(
            format!("TCP data offset {doff} to :25"),
            v4().tcp(25)
                .doff(doff)
                .tcp_bytes((doff as usize * 4).max(20))
                .build(),
            want,
        );
    }
    for doff in [0u8, 4] {
        t.eth(
            format!("TCP data offset {doff} to :587"),
            v4().tcp(587).doff(doff).build(),
            BlockBadTcpHeader,
        );
    }
    for doff in [6u8, 10, 15] {
        t.eth(
            format!("TCP data offset {doff} beyond the datagram"),
            v4().tcp(25).doff(doff).build(),
            BlockTruncated,
        );
        t.eth(
            format!("IPv6 TCP data offset {doff} beyond the datagram"),
            v6().tcp(25).doff(doff).build(),
            BlockTruncated,
        );
    }
    for flags in [
        0x00u8, 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0x03, 0x06, 0x11, 0x12, 0x14, 0x18,
        0x29, 0xc2, 0xff,
    ] {
        t.eth(
            format!("TCP flags {flags:#04x} to :25"),
            v4().tcp(25).flags(flags).build(),
            BlockPort,
        );
        t.eth(
            format!("IPv6 TCP flags {flags:#04x} to :25"),
            v6().tcp(25).flags(flags).build(),
            BlockPort,
        );
    }
    for (what, bytes) in [
        ("10 bytes", 10usize),
        ("19 bytes", 19),
        ("4 bytes (ports only)", 4),
    ] {
        t.eth(
            format!("TCP header cut to {what}"),
            v4().tcp(25).tcp_bytes(bytes).build(),
            BlockTruncated,
        );
    }
}

/// PPP as `pppoe_rcv`, `ppp_input` and `ppp_receive_nonmp_frame` take it.
fn ppp(t: &mut Table) {
    use Reason::*;
    let v4_25 = ip4(SUB, EXT, 25);
    let v4_587 = ip4(SUB, EXT, 587);
    // Protocols the kernel turns into IP only after state the parser cannot see.
    for (proto, name, want) in [
        (0x003du16, "multilink", BlockPppMultilink),
        (0x00fd, "compressed datagram", BlockPppCompressed),
        (
            0x00fb,
            "individual-link compressed datagram",
            BlockPppCompressed,
        ),
        (0x002d, "VJ compressed TCP", BlockPppVj),
        (0x0281, "MPLS unicast", BlockMpls),
        (0x0283, "MPLS multicast", BlockMpls),
    ] {
        for (payload, what) in [
            (&v4_587, "IPv4 to :587"),
            (&v4_25, "IPv4 to :25"),
            (&vec![0x5a; 24], "junk"),
        ] {
            t.eth(
                format!("PPPoE {name} ({proto:#06x}) carrying {what}"),
                pppoe_with(&proto.to_be_bytes(), payload, None),
                want,
            );
            // Only protocols with an odd low byte and a zero high byte compress (PFC).
            if proto >> 8 == 0 {
                t.eth(
                    format!(
                        "PPPoE {name}, 1-byte protocol {:#04x}, carrying {what}",
                        proto as u8
                    ),
                    pppoe_with(&[proto as u8], payload, None),
                    want,
                );
            }
        }
        t.eth(
            format!("PPPoE {name} from behind a VLAN tag"),
            vlan(&pppoe_with(&proto.to_be_bytes(), &v4_587, None), &[0x8100]),
            want,
        );
    }
    // VJ uncompressed: IPv4 whose protocol byte is the slot number; slhc_remember restores TCP.
    let vj = |src, dst, port, slot: u8| {
        let mut v = V4::new(src, dst);
        v.proto = slot;
        v.packet(&syn(port))
    };
    for (proto, form) in [(&[0x00u8, 0x2f][..], "2-byte"), (&[0x2f][..], "1-byte")] {
        for (what, packet, want) in [
            ("slot 0 to :25", vj(SUB, EXT, 25, 0), BlockPort),
            ("slot 6 to :25", vj(SUB, EXT, 25, 6), BlockPort),
            ("slot 17 to :25", vj(SUB, EXT, 25, 17), BlockPort),
            ("slot 3 to :587", vj(SUB, EXT, 587, 3), PassPortOpen),
            (
                "slot 3 from a non-subscriber",
                vj(NONSUB, EXT, 25, 3),
                PassNotSubscriber,
            ),
            (
                "slot 3 to the mail server",
                vj(SUB, MAIL, 25, 3),
                PassMailServer,
            ),
            (
                "slot 3, TCP cut short",
                vj(SUB, EXT, 25, 3)[..30].to_vec(),
                BlockTruncated,
            ),
            (
                "slot 3, IHL 4",
                {
                    let mut p = vj(SUB, EXT, 587, 3);
                    p[0] = 0x44;
                    p
                },
                BlockBadIpHeader,
            ),
        ] {
            t.eth(
                format!("PPPoE VJ uncompressed ({form}) {what}"),
                pppoe_with(proto, &packet, None),
                want,
            );
        }
    }
    // Control, authentication, NCPs and non-IP network protocols: never IP, whatever follows.
    for (proto, name) in [
        (0xc021u16, "LCP"),
        (0xc023, "PAP"),
        (0xc223, "CHAP"),
        (0xc227, "EAP"),
        (0xc025, "LQR"),
        (0xc02b, "BACP"),
        (0x8021, "IPCP"),
        (0x8057, "IPV6CP"),
        (0x80fd, "CCP"),
        (0x80fb, "individual-link CCP"),
        (0x8281, "MPLSCP"),
        (0x803d, "multilink control"),
        (0x002b, "IPX"),
        (0x0029, "AppleTalk"),
        (0x0031, "bridging (BCP)"),
        (0x0001, "padding"),
        (0x0023, "OSI"),
    ] {
        t.eth(
            format!("PPPoE {name} ({proto:#06x}) carrying an IPv4 SYN to :25"),
            pppoe_with(&proto.to_be_bytes(), &v4_25, None),
            PassNotIp,
        );
    }
    t.eth(
        "PPPoE LCP echo",
        pppoe_with(&[0xc0, 0x21], &[9, 1, 0, 8, 0, 0, 0, 0], None),
        PassNotIp,
    );
    // `ppp_decompress_proto` reads an odd first byte as the whole protocol.
    t.eth(
        "PPPoE bytes 0x01 0x21: 1-byte protocol 0x01, not IPv4",
        pppoe_with(&[0x01, 0x21], &v4_25, None),
        PassNotIp,
    );
    t.eth(
        "PPPoE 1-byte 0x81 is protocol 0x0081, not MPLS",
        pppoe_with(&[0x81], &v4_25, None),
        PassNotIp,
    );
    t.eth(
        "PPPoE 1-byte 0x21, IHL 4",
        pppoe_with(
            &[0x21],
            &{
                let mut p = v4_587.clone();
                p[0] = 0x44;
                p
            },
            None,
        ),
        BlockBadIpHeader,
    );
    // `pppoe_rcv` checks only the length field, not ver/type/code.
    t.eth(
        "PPPoE ver/type 0 and code 9, IPv4 to :25",
        {
            let mut f = pppoe_with(&[0x00, 0x21], &v4_25, None);
            f[14] = 0x00;
            f[15] = 0x09;
            f
        },
        BlockPort,
    );
    t.eth(
        "PPPoE session id 0, IPv4 to :25",
        {
            let mut f = pppoe_with(&[0x21], &v4_25, None);
            f[16] = 0;
            f[17] = 0;
            f
        },
        BlockPort,
    );
    // The PPPoE length bounds the PPP frame (`pskb_trim_rcsum`); a frame shorter than it is
    // dropped by the kernel.
    for (proto, form) in [(&[0x00u8, 0x21][..], "2-byte"), (&[0x21][..], "1-byte")] {
        let exact = (proto.len() + 40) as u16;
        for (what, packet, len, want) in [
            (
                "length one short of the datagram, to :587",
                &v4_587,
                exact - 1,
                BlockTruncated,
            ),
            (
                "length cutting the TCP header, to :587",
                &v4_587,
                exact - 20,
                BlockTruncated,
            ),
            (
                "length cutting the IP header, to :587",
                &v4_587,
                exact - 30,
                BlockTruncated,
            ),
            (
                "length beyond the frame, to :587",
                &v4_587,
                exact + 1,
                BlockTruncated,
            ),
            (
                "length beyond the frame, to :25",
                &v4_25,
                exact + 200,
                BlockTruncated,
            ),
            ("length 0", &v4_587, 0, BlockTruncated),
            (
                "length covering the protocol only",
                &v4_587,
                proto.len() as u16,
                BlockTruncated,
            ),
        ] {
            t.eth(
                format!("PPPoE ({form}) {what}"),
                pppoe_with(proto, packet, Some(len)),
                want,
            );
        }
        t.eth(
            format!("PPPoE ({form}) with Ethernet padding after the payload"),
            {
                let mut f = pppoe_with(proto, &v4_25, None);
                f.resize(f.len() + 12, 0);
                f
            },
            BlockPort,
        );
        t.eth(
            format!("PPPoE ({form}) length covering bytes after the datagram"),
            pppoe_with(proto, &[v4_25.clone(), vec![0xee; 8]].concat(), None),
            BlockPort,
        );
        let proto6: &[u8] = if proto.len() == 2 {
            &[0x00, 0x57]
        } else {
            &[0x57]
        };
        let p6 = ip6(SUB6, EXT6, 587);
        t.eth(
            format!("PPPoE ({form}) IPv6 payload length beyond the PPPoE length"),
            pppoe_with(proto6, &p6, Some((proto6.len() + p6.len() - 4) as u16)),
            BlockTruncated,
        );
    }
    t.eth(
        "PPPoE header cut short",
        eth(0x8864, &[0x11, 0, 0, 1]),
        BlockTruncated,
    );
    t.eth(
        "PPPoE protocol byte missing",
        eth(0x8864, &[0x11, 0, 0x12, 0x34, 0, 2]),
        BlockTruncated,
    );
}

/// Labelled frames: `mpls_forward` pops labels when `net.mpls.conf.IF.input` is set and
/// forwards the inner packet as its route says.
fn mpls(t: &mut Table) {
    use Reason::*;
    let inner = ip4(SUB, EXT, 587);
    for (et, name) in [(0x8847u16, "unicast"), (0x8848, "multicast")] {
        for labels in 1..=3u32 {
            let mut p = Vec::new();
            for i in 0..labels {
                p.extend(mpls_label(100 + i, i + 1 == labels));
            }
            p.extend(&inner);
            t.eth(
                format!("MPLS {name}, {labels} labels over IPv4 to :587"),
                eth(et, &p),
                BlockMpls,
            );
        }
        let p = [mpls_label(16, true).to_vec(), ip6(SUB6, EXT6, 25)].concat();
        t.eth(
            format!("MPLS {name} over IPv6 to :25"),
            eth(et, &p),
            BlockMpls,
        );
        t.eth(
            format!("MPLS {name} from behind QinQ"),
            vlan(
                &eth(et, &[mpls_label(16, true).to_vec(), inner.clone()].concat()),
                &[0x88a8, 0x8100],
            ),
            BlockMpls,
        );
    }
}

/// A blocked segment cut at every byte: never a pass once the ethertype is there.
fn truncations(t: &mut Table) {
    use Reason::*;
    for (what, full) in [
        ("IPv4 SYN", syn4(SUB, EXT, 25)),
        ("IPv6 SYN", syn6(SUB6, EXT6, 25)),
        ("VLAN IPv4 SYN", vlan(&syn4(SUB, EXT, 25), &[0x8100])),
        (
            "PPPoE 1-byte IPv4 SYN",
            pppoe_with(&[0x21], &ip4(SUB, EXT, 25), None),
        ),
    ] {
        for len in 0..full.len() {
            let mut f = full[..len].to_vec();
            // PPPoE keeps its length field honest, so that only the cut is tested.
            if what.starts_with("PPPoE") && len >= 20 {
                let l = (len - 20) as u16;
                f[18..20].copy_from_slice(&l.to_be_bytes());
            }
            let want = if len < 14 { PassNotIp } else { BlockTruncated };
            let row = t.eth(format!("{what} cut to {len} bytes"), f, want);
            if len < 14 {
                row.refused();
            } else if len < skb_minimum(u16::from_be_bytes([full[12], full[13]])) {
                row.skb_refuses();
            }
        }
    }
}

/// Raw-IP devices (ppp, tun): the skb's protocol decides; the version nibble must agree.
fn raw(t: &mut Table) {
    use Reason::*;
    let raw_v4 = |src, dst, port| ip4(src, dst, port);
    t.raw("IPv4 SYN to :25", raw_v4(RAW_SUB, EXT, 25), BlockPort);
    t.raw("IPv4 SYN to :587", raw_v4(RAW_SUB, EXT, 587), PassPortOpen);
    t.raw(
        "IPv4 SYN to the mail server",
        raw_v4(RAW_SUB, MAIL, 25),
        PassMailServer,
    );
    // 28 bytes: short of the 14 + 20 an skb test run wants for protocol IPv4.
    t.raw(
        "IPv4 UDP to :25",
        Frame::raw().ipv4(RAW_SUB, EXT).l4(17, &[0u8; 8]).build(),
        PassNotTcp,
    )
    .skb_refuses();
    t.raw(
        "IPv4 UDP to :25, with a payload",
        Frame::raw().ipv4(RAW_SUB, EXT).l4(17, &[0u8; 16]).build(),
        PassNotTcp,
    );
    t.raw(
        "IPv4 options, SYN to :25",
        V4::new(RAW_SUB, EXT).with_options(12).packet(&syn(25)),
        BlockPort,
    );
    t.raw(
        "IPv4 non-first fragment",
        {
            let mut v = V4::new(RAW_SUB, EXT);
            v.frag = 0x0020;
            v.packet(&[0u8; 16])
        },
        BlockFragment,
    );
    t.raw("IPv6 SYN to :25", ip6(RAW_SUB6, EXT6, 25), BlockPort);
    t.raw("IPv6 SYN to :587", ip6(RAW_SUB6, EXT6, 587), PassPortOpen);
    t.raw(
        "IPv6 hop-by-hop, SYN to :25",
        v6_packet(v6(RAW_SUB6), v6(EXT6), 0, &[ext(6), syn(25)].concat(), None),
        BlockPort,
    );
    // skb->protocol MPLS: after `ppp_receive_nonmp_frame` (NP_MPLS_UC/MC) the first nibble
    // is a label's, whatever it happens to be. Source 136.71 = 0x8847, 136.72 = 0x8848.
    t.raw(
        "MPLS unicast skb with nibble 4, to :587",
        raw_v4([136, 71, 0, 1], EXT, 587),
        BlockMpls,
    );
    t.raw(
        "MPLS unicast skb with nibble 4, to :25",
        raw_v4([136, 71, 0, 1], EXT, 25),
        BlockMpls,
    );
    t.raw(
        "MPLS multicast skb with nibble 4",
        raw_v4([136, 72, 0, 1], EXT, 587),
        BlockMpls,
    );
    t.raw(
        "MPLS unicast skb with nibble 6",
        ip6("2001:db8:8847::1", EXT6, 587),
        BlockMpls,
    );
    // Protocol and nibble disagree: ip_rcv/ipv6_rcv drop it; never a pass.
    t.raw(
        "protocol IPv4, nibble 6",
        ip6("2001:db8:800::1", EXT6, 587),
        BlockBadIpHeader,
    );
    // 40 bytes: short of the 14 + 40 an skb test run wants for protocol IPv6.
    t.raw(
        "protocol IPv6, nibble 4 (134.221 = 0x86dd)",
        raw_v4([134, 221, 0, 1], EXT, 587),
        BlockBadIpHeader,
    )
    .skb_refuses();
    t.raw(
        "protocol IPv6, nibble 4, 60 bytes",
        Frame::raw()
            .ipv4([134, 221, 0, 1], EXT)
            .l4(6, &[syn(587), vec![0; 20]].concat())
            .build(),
        BlockBadIpHeader,
    );
    t.raw(
        "protocol IPv4, nibble 0xb",
        {
            let mut p = raw_v4(RAW_SUB, EXT, 587);
            p[0] = 0xb5;
            p
        },
        BlockBadIpHeader,
    );
    // Other protocols never reach ip_rcv, whatever their bytes look like.
    t.raw(
        "protocol 0x6440 (not IP), IPv4 bytes to :25",
        raw_v4(SUB, EXT, 25),
        PassNotIp,
    );
    t.raw(
        "protocol ARP, IPv4 bytes to :25",
        raw_v4([8, 6, 0, 1], EXT, 25),
        PassNotIp,
    );
    t.raw(
        "protocol IPX, IPv4 bytes to :25",
        raw_v4([0x81, 0x37, 0, 1], EXT, 25),
        PassNotIp,
    );
    t.raw(
        "protocol PPPoE session, IPv4 bytes to :25",
        raw_v4([0x88, 0x64, 0, 1], EXT, 25),
        PassNotIp,
    );
    let full = raw_v4(RAW_SUB, EXT, 25);
    for len in 0..full.len() {
        let row = t.raw_as(
            format!("IPv4 SYN (protocol IPv4) cut to {len} bytes"),
            0x0800,
            full[..len].to_vec(),
            BlockTruncated,
        );
        // Below 14 bytes there is no "Ethernet header" for the test run to read the
        // protocol from; from there on it reads 0x0800 and wants the IP header.
        if len < skb_minimum(0x0800) {
            row.skb_refuses();
        }
    }
}

/// The far end of a tunnel: an open decapsulator on the Internet.
const DECAP: [u8; 4] = [192, 0, 2, 2];
const DECAP6: &str = "2001:db8:ff::2";

/// A GRE header: `flags` (C, K, S bits of the first byte; second byte 0) and the optional
/// fields they call for.
fn gre(flags: u8, proto: u16) -> Vec<u8> {
    let mut h = vec![flags, 0];
    h.extend_from_slice(&proto.to_be_bytes());
    for bit in [0x80u8, 0x20, 0x10] {
        if flags & bit != 0 {
            h.extend_from_slice(&[0, 0, 0, 7]);
        }
    }
    h
}

fn udp(dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = vec![0xc0, 0x00];
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

fn vxlan(inner_eth: &[u8]) -> Vec<u8> {
    let mut v = vec![0x08, 0, 0, 0, 0, 0, 5, 0];
    v.extend_from_slice(inner_eth);
    udp(4789, &v)
}

/// GENEVE with `opt_words` 4-byte words of options.
fn geneve(proto: u16, opt_words: u8, payload: &[u8]) -> Vec<u8> {
    let mut g = vec![opt_words & 0x3f, 0];
    g.extend_from_slice(&proto.to_be_bytes());
    g.extend_from_slice(&[0, 0, 5, 0]);
    for w in 0..opt_words {
        g.extend_from_slice(&[0x01, 0x02, 0x80 | w, 0]);
    }
    g.extend_from_slice(payload);
    udp(6081, &g)
}

/// Outer IPv4 (subscriber to the decapsulator) carrying `payload` as protocol `proto`.
fn outer4(proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = V4::new(SUB, DECAP);
    v.proto = proto;
    v.frame(payload)
}

fn outer6(nh: u8, payload: &[u8]) -> Vec<u8> {
    v6_frame(v6(SUB6), v6(DECAP6), nh, payload)
}

/// Inner packets: (name, IP packet, is IPv6, want).
fn inner_flows() -> Vec<(&'static str, Vec<u8>, bool, Reason)> {
    use Reason::*;
    vec![
        ("inner SYN to :25", ip4(SUB, EXT, 25), false, BlockPort),
        ("inner SYN to :587", ip4(SUB, EXT, 587), false, PassPortOpen),
        (
            "inner non-subscriber to :25",
            ip4(NONSUB, EXT, 25),
            false,
            PassNotSubscriber,
        ),
        (
            "inner exempt to :25",
            ip4([100, 64, 9, 9], EXT, 25),
            false,
            PassExemptAddr,
        ),
        (
            "inner to the mail server:25",
            ip4(SUB, MAIL, 25),
            false,
            PassMailServer,
        ),
        (
            "inner SYN with data offset 4",
            V4::new(SUB, EXT).packet(
                &Tcp {
                    doff: 4,
                    ..Tcp::to(25)
                }
                .bytes(),
            ),
            false,
            BlockBadTcpHeader,
        ),
        (
            "inner TCP header cut",
            {
                let mut p = ip4(SUB, EXT, 25);
                p.truncate(30);
                p[2..4].copy_from_slice(&30u16.to_be_bytes());
                p
            },
            false,
            BlockTruncated,
        ),
        (
            "inner IPv4 header cut",
            ip4(SUB, EXT, 25)[..12].to_vec(),
            false,
            BlockTruncated,
        ),
        (
            "inner UDP to :25",
            {
                let mut v = V4::new(SUB, EXT);
                v.proto = 17;
                v.packet(&[0x9c, 0x40, 0, 25, 0, 8, 0, 0])
            },
            false,
            PassNotTcp,
        ),
        (
            "inner IPv6 SYN to :25",
            ip6(SUB6, EXT6, 25),
            true,
            BlockPort,
        ),
        (
            "inner IPv6 SYN to :587",
            ip6(SUB6, EXT6, 587),
            true,
            PassPortOpen,
        ),
        (
            "inner IPv6 non-subscriber to :25",
            ip6(NONSUB6, EXT6, 25),
            true,
            PassNotSubscriber,
        ),
        (
            "inner IPv6 exempt to :25",
            ip6("2001:db8:100:9::9", EXT6, 25),
            true,
            PassExemptAddr,
        ),
        (
            "inner IPv6 header cut",
            ip6(SUB6, EXT6, 25)[..30].to_vec(),
            true,
            BlockTruncated,
        ),
    ]
}

/// One level into the tunnels an open decapsulator takes in; the inner packet decides.
fn tunnels(t: &mut Table) {
    use Reason::*;
    let et = |v6: bool| if v6 { 0x86dd } else { 0x0800 };
    // (name, wrap(inner IP packet, inner is v6) -> frame, carries inner IPv6?)
    type W = Box<dyn Fn(&[u8], bool) -> Vec<u8>>;
    let forms: Vec<(&str, W, bool, bool)> = vec![
        // (name, wrap, carries IPv4, carries IPv6)
        ("IPIP", Box::new(|p: &[u8], _| outer4(4, p)), true, false),
        ("6in4", Box::new(|p: &[u8], _| outer4(41, p)), false, true),
        (
            "IPv6 next header 4",
            Box::new(|p: &[u8], _| outer6(4, p)),
            true,
            false,
        ),
        (
            "IPv6 next header 41",
            Box::new(|p: &[u8], _| outer6(41, p)),
            false,
            true,
        ),
        (
            "IPv6 hop-by-hop then 41",
            Box::new(|p: &[u8], _| outer6(0, &[ext(41), p.to_vec()].concat())),
            false,
            true,
        ),
        (
            "GRE",
            Box::new(move |p: &[u8], v6| outer4(47, &[gre(0, et(v6)), p.to_vec()].concat())),
            true,
            true,
        ),
        (
            "GRE with key",
            Box::new(move |p: &[u8], v6| outer4(47, &[gre(0x20, et(v6)), p.to_vec()].concat())),
            true,
            true,
        ),
        (
            "GRE with checksum, key and sequence",
            Box::new(move |p: &[u8], v6| outer4(47, &[gre(0xb0, et(v6)), p.to_vec()].concat())),
            true,
            true,
        ),
        (
            "GRE transparent Ethernet bridging",
            Box::new(move |p: &[u8], v6| outer4(47, &[gre(0x20, 0x6558), eth(et(v6), p)].concat())),
            true,
            true,
        ),
        (
            "GRE in IPv6",
            Box::new(move |p: &[u8], v6| outer6(47, &[gre(0x10, et(v6)), p.to_vec()].concat())),
            true,
            true,
        ),
        (
            "GRE WCCPv2",
            Box::new(|p: &[u8], _| {
                outer4(
                    47,
                    &[gre(0, 0x883e), vec![0x00, 0, 0, 0], p.to_vec()].concat(),
                )
            }),
            true,
            false,
        ),
        (
            "VXLAN",
            Box::new(move |p: &[u8], v6| outer4(17, &vxlan(&eth(et(v6), p)))),
            true,
            true,
        ),
        (
            "VXLAN, inner VLAN",
            Box::new(move |p: &[u8], v6| outer4(17, &vxlan(&vlan(&eth(et(v6), p), &[0x8100])))),
            true,
            true,
        ),
        (
            "VXLAN in IPv6",
            Box::new(move |p: &[u8], v6| outer6(17, &vxlan(&eth(et(v6), p)))),
            true,
            true,
        ),
        (
            "GENEVE Ethernet, 2 option words",
            Box::new(move |p: &[u8], v6| outer4(17, &geneve(0x6558, 2, &eth(et(v6), p)))),
            true,
            true,
        ),
        (
            "GENEVE IP (inner_proto_inherit)",
            Box::new(move |p: &[u8], v6| outer4(17, &geneve(et(v6), 0, p))),
            true,
            true,
        ),
        (
            "GENEVE in IPv6, 1 option word",
            Box::new(move |p: &[u8], v6| outer6(17, &geneve(0x6558, 1, &eth(et(v6), p)))),
            true,
            true,
        ),
    ];
    for (form, wrap, carries4, carries6) in &forms {
        for (flow, packet, v6, want) in inner_flows() {
            if (v6 && !carries6) || (!v6 && !carries4) {
                continue;
            }
            t.eth(format!("tunnel {form} / {flow}"), wrap(&packet, v6), want);
        }
        // The outer source does not matter: the decapsulator sends from the inner one.
        let spoofed = {
            let mut f = wrap(&ip4(SUB, EXT, 25), false);
            if *carries4 {
                f[26..30].copy_from_slice(&NONSUB);
            }
            f
        };
        if *carries4 && f_is_v4(&spoofed) {
            t.eth(
                format!("tunnel {form} / outer source not a subscriber, inner SYN to :25"),
                spoofed,
                BlockPort,
            );
        }
        // Nested: the second level is not looked into.
        if *carries4 {
            t.eth(
                format!("tunnel {form} / inner IPIP (nested)"),
                wrap(
                    &{
                        let mut v = V4::new(NONSUB, DECAP);
                        v.proto = 4;
                        v.packet(&ip4(SUB, EXT, 25))
                    },
                    false,
                ),
                BlockTunnelDepth,
            );
            t.eth(
                format!("tunnel {form} / inner VXLAN (nested)"),
                wrap(
                    &{
                        let mut v = V4::new(NONSUB, DECAP);
                        v.proto = 17;
                        v.packet(&vxlan(&eth(0x0800, &ip4(SUB, EXT, 587))))
                    },
                    false,
                ),
                BlockTunnelDepth,
            );
        }
        if *carries6 {
            t.eth(
                format!("tunnel {form} / inner IPv6 GRE (nested)"),
                wrap(
                    &v6_packet(
                        v6(NONSUB6),
                        v6(DECAP6),
                        47,
                        &[gre(0, 0x0800), ip4(SUB, EXT, 25)].concat(),
                        None,
                    ),
                    true,
                ),
                BlockTunnelDepth,
            );
        }
    }
    // GRE as `gre_rcv`/`gre_parse_header` drop it: routing bit, version 1 (PPTP), 7.
    for (what, b0, b1) in [
        ("routing bit", 0x40u8, 0u8),
        ("version 1", 0, 1),
        ("version 7", 0, 7),
    ] {
        let mut g = gre(0, 0x0800);
        g[0] |= b0;
        g[1] |= b1;
        t.eth(
            format!("tunnel GRE {what} (dropped by the far side)"),
            outer4(47, &[g, ip4(SUB, EXT, 25)].concat()),
            PassNotTcp,
        );
    }
    t.eth(
        "tunnel GRE carrying ARP",
        outer4(47, &[gre(0, 0x0806), vec![0u8; 28]].concat()),
        PassNotIp,
    );
    t.eth(
        "tunnel GRE carrying MPLS",
        outer4(47, &[gre(0, 0x8847), ip4(SUB, EXT, 25)].concat()),
        BlockMpls,
    );
    t.eth(
        "tunnel GRE IPv4 protocol, IPv6 inside",
        outer4(47, &[gre(0, 0x0800), ip6(SUB6, EXT6, 25)].concat()),
        BlockBadIpHeader,
    );
    t.eth("tunnel GRE header cut", outer4(47, &[0, 0]), BlockTruncated);
    t.eth(
        "tunnel GRE key announced, not there",
        outer4(47, &[0x20, 0, 0x08, 0x00]),
        BlockTruncated,
    );
    t.eth(
        "tunnel VXLAN without the I flag (dropped by the far side)",
        outer4(17, &{
            let mut u = vxlan(&eth(0x0800, &ip4(SUB, EXT, 25)));
            u[8] = 0;
            u
        }),
        PassNotTcp,
    );
    t.eth(
        "tunnel VXLAN header cut",
        outer4(17, &udp(4789, &[0x08, 0, 0])),
        BlockTruncated,
    );
    t.eth(
        "tunnel VXLAN inner frame shorter than Ethernet",
        outer4(17, &vxlan(&[0u8; 10])),
        PassNotIp,
    );
    t.eth(
        "tunnel VXLAN inner ARP",
        outer4(17, &vxlan(&eth(0x0806, &[0u8; 28]))),
        PassNotIp,
    );
    t.eth(
        "tunnel VXLAN, three inner VLAN tags",
        outer4(
            17,
            &vxlan(&vlan(
                &eth(0x0800, &ip4(SUB, EXT, 25)),
                &[0x8100, 0x8100, 0x8100],
            )),
        ),
        BlockEncap,
    );
    t.eth(
        "tunnel GENEVE version 1 (dropped by the far side)",
        outer4(17, &{
            let mut u = geneve(0x6558, 0, &eth(0x0800, &ip4(SUB, EXT, 25)));
            u[8] |= 0x40;
            u
        }),
        PassNotTcp,
    );
    t.eth(
        "tunnel GENEVE options reach past the datagram",
        outer4(17, &{
            let mut u = geneve(0x6558, 0, &eth(0x0800, &ip4(SUB, EXT, 25)));
            u[8] = 0x3f;
            u
        }),
        BlockTruncated,
    );
    t.eth(
        "UDP to :53 with VXLAN bytes (not a tunnel port)",
        outer4(17, &{
            let mut u = vxlan(&eth(0x0800, &ip4(SUB, EXT, 25)));
            u[2..4].copy_from_slice(&53u16.to_be_bytes());
            u
        }),
        PassNotTcp,
    );
    t.eth(
        "tunnel VXLAN, UDP length beyond the datagram (dropped)",
        outer4(17, &{
            let mut u = vxlan(&eth(0x0800, &ip4(SUB, EXT, 25)));
            u[4..6].copy_from_slice(&1400u16.to_be_bytes());
            u
        }),
        PassNotTcp,
    );
    t.eth(
        "tunnel VXLAN, UDP length cuts the inner SYN",
        outer4(17, &{
            let mut u = vxlan(&eth(0x0800, &ip4(SUB, EXT, 25)));
            let l = (u.len() - 10) as u16;
            u[4..6].copy_from_slice(&l.to_be_bytes());
            u
        }),
        BlockTruncated,
    );
    // Outer fragments: a later fragment holds no tunnel header (the first decides); a first
    // fragment that cuts the inner header is a doubt.
    t.eth(
        "tunnel IPIP, outer non-first fragment",
        {
            let mut v = V4::new(SUB, DECAP);
            v.proto = 4;
            v.frag = 0x0020;
            v.frame(&[0u8; 24])
        },
        PassNotTcp,
    );
    t.eth(
        "tunnel IPIP, outer first fragment cutting the inner TCP header",
        {
            let mut v = V4::new(SUB, DECAP);
            v.proto = 4;
            v.frag = 0x2000;
            v.frame(&ip4(SUB, EXT, 25)[..32])
        },
        BlockTruncated,
    );
    t.eth(
        "tunnel IPv6 41, outer non-first fragment",
        outer6(44, &[frag6(41, 8, false), vec![0u8; 24]].concat()),
        BlockFragment,
    );
    t.eth(
        "tunnel IPv6 hop-by-hop chain too long before 41",
        outer6(
            0,
            &[
                (0..MAX_EXT).map(|_| ext(0)).collect::<Vec<_>>().concat(),
                ext(41),
            ]
            .concat(),
        ),
        BlockExtChain,
    );
    // Every cut of a tunnelled SYN from a subscriber blocks.
    for (what, full) in [
        (
            "VXLAN",
            outer4(17, &vxlan(&eth(0x0800, &ip4(SUB, EXT, 25)))),
        ),
        (
            "GRE with key",
            outer4(47, &[gre(0x20, 0x0800), ip4(SUB, EXT, 25)].concat()),
        ),
        ("IPv6 in IPv6", outer6(41, &ip6(SUB6, EXT6, 25))),
    ] {
        for len in 14..full.len() {
            let row = t.eth(
                format!("tunnel {what} SYN cut to {len} bytes"),
                full[..len].to_vec(),
                BlockTruncated,
            );
            if len < skb_minimum(u16::from_be_bytes([full[12], full[13]])) {
                row.skb_refuses();
            }
        }
    }
}

const MAX_EXT: usize = port25_common::parse::MAX_EXT_HEADERS;

/// The frame's outer header is IPv4 (so bytes 26..30 are its source).
fn f_is_v4(f: &[u8]) -> bool {
    f[12..14] == [0x08, 0x00]
}
