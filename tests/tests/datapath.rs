//! Crafted frames through the real XDP and TC programs (BPF_PROG_TEST_RUN), each checked for
//! verdict and counter reason, and each also decided by the reference model, which must agree.

use std::path::Path;

use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use port25_common::{
    maps::{Exempt, NetKey6, ORIGIN_SESSION},
    model::Model,
    parse::Link,
    verdict::classify,
    Reason,
};
use port25_ctl::{
    config::Config,
    datapath::{self, PROG_TC, PROG_TC_RAW, PROG_XDP},
    livemaps::{boot_ns, LiveMaps},
    pins::Pins,
    policy::{self, Desired},
};
use port25_tests::{frame::*, require_root};

const SUB: [u8; 4] = [100, 64, 1, 2];
const EXT: [u8; 4] = [203, 0, 113, 80];
const MAIL: [u8; 4] = [198, 51, 100, 25];

const CONFIG: &str = r#"
blocked_ports: [25]
subscriber_ranges: [100.64.0.0/10, "2001:db8:100::/40"]
mail_servers: [198.51.100.25/32, "2001:db8:25::/64"]
exempt:
  - prefix: 100.64.9.9/32
  - prefix: 100.65.0.0/16
  - prefix: "2001:db8:100:9::9/128"
  - prefix: "2001:db8:101::/48"
"#;

struct Fixture {
    ebpf: aya::Ebpf,
    live: LiveMaps,
    model: Model,
    pins: Pins,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = datapath::detach_all(&self.pins);
    }
}

fn fixture() -> Fixture {
    port25_tests::ensure_bpffs();
    let pin_dir = format!("/sys/fs/bpf/{}", port25_tests::unique("p25t"));
    let mut cfg = Config::parse(CONFIG, Path::new("inline")).unwrap();
    cfg.pin_dir = pin_dir.into();
    let pins = Pins::new(&cfg.pin_dir);
    let ebpf = datapath::load(&cfg, &pins).expect("load");
    let mut live = LiveMaps::open(&pins).unwrap();
    let now = boot_ns();
    let mut want = Desired::from_config_now(&cfg);
    // Kernel-side expiry: one entry long expired, one live; and a delegated /56 session prefix.
    let e = |expires_ns| Exempt {
        expires_ns,
        origin: ORIGIN_SESSION,
        _pad: 0,
    };
    want.exip4.insert([100, 64, 7, 7], e(now - 1));
    want.exip4
        .insert([100, 64, 8, 8], e(now + 3_600_000_000_000));
    want.exnet6.insert(
        NetKey6 {
            prefix_len: 56,
            addr: v6("2001:db8:100:5500::"),
        },
        e(0),
    );
    want.settings.session_prefix_lens[0] = 56;
    want.settings.session_prefix_count = 1;
    policy::apply(&mut live, &want).unwrap();
    let model = Model {
        settings: Some(want.settings),
        ports: want.ports.keys().copied().collect(),
        ranges4: want.ranges4.keys().copied().collect(),
        ranges6: want.ranges6.keys().copied().collect(),
        mail4: want.mail4.keys().copied().collect(),
        mail6: want.mail6.keys().copied().collect(),
        exip4: want.exip4.clone(),
        exip6: want.exip6.clone(),
        expfx4: want.expfx4.iter().map(|((a, l), e)| (*a, *l, *e)).collect(),
        expfx6: want.expfx6.iter().map(|((a, l), e)| (*a, *l, *e)).collect(),
        exnet6: want.exnet6.iter().map(|(k, e)| (*k, *e)).collect(),
        now_ns: now,
    };
    Fixture {
        ebpf,
        live,
        model,
        pins,
    }
}

fn syn4(src: [u8; 4], dst: [u8; 4], port: u16) -> Vec<u8> {
    V4::new(src, dst).frame(&Tcp::to(port).bytes())
}

fn syn6(src: &str, dst: &str, port: u16) -> Vec<u8> {
    v6_frame(v6(src), v6(dst), 6, &Tcp::to(port).bytes())
}

fn rows() -> Vec<(String, Vec<u8>, Reason)> {
    use Reason::*;
    let mut r: Vec<(String, Vec<u8>, Reason)> = vec![
        ("ARP passes".into(), eth(0x0806, &[0u8; 28]), PassNotIp),
        (
            "UDP to 25 passes".into(),
            {
                let mut v = V4::new(SUB, EXT);
                v.proto = 17;
                v.frame(&[0u8; 8])
            },
            PassNotTcp,
        ),
        (
            "subscriber SYN to external:25".into(),
            syn4(SUB, EXT, 25),
            BlockPort,
        ),
        (
            "subscriber to external:587".into(),
            syn4(SUB, EXT, 587),
            PassPortOpen,
        ),
        (
            "subscriber to external:465".into(),
            syn4(SUB, EXT, 465),
            PassPortOpen,
        ),
        (
            "subscriber to external:2525".into(),
            syn4(SUB, EXT, 2525),
            PassPortOpen,
        ),
        (
            "subscriber to mail server:25".into(),
            syn4(SUB, MAIL, 25),
            PassMailServer,
        ),
        (
            "non-subscriber to external:25".into(),
            syn4([10, 0, 0, 1], EXT, 25),
            PassNotSubscriber,
        ),
        (
            "exempt address".into(),
            syn4([100, 64, 9, 9], EXT, 25),
            PassExemptAddr,
        ),
        (
            "exempt prefix".into(),
            syn4([100, 65, 3, 4], EXT, 25),
            PassExemptPrefix,
        ),
        (
            "expired exempt address".into(),
            syn4([100, 64, 7, 7], EXT, 25),
            BlockPort,
        ),
        (
            "timed exempt address, not expired".into(),
            syn4([100, 64, 8, 8], EXT, 25),
            PassExemptAddr,
        ),
        (
            "IPv4 options, port 25".into(),
            V4::new(SUB, EXT)
                .with_options(40)
                .frame(&Tcp::to(25).bytes()),
            BlockPort,
        ),
        (
            "IPv4 options, port 587".into(),
            V4::new(SUB, EXT)
                .with_options(12)
                .frame(&Tcp::to(587).bytes()),
            PassPortOpen,
        ),
        (
            "Ethernet padding after the datagram".into(),
            {
                let mut f = syn4(SUB, EXT, 25);
                f.resize(64, 0);
                f
            },
            BlockPort,
        ),
        (
            "IHL 4".into(),
            {
                let mut v = V4::new(SUB, EXT);
                v.ihl = 4;
                v.frame(&Tcp::to(25).bytes())
            },
            BlockBadIpHeader,
        ),
        (
            "IHL 0 to port 587".into(),
            {
                let mut v = V4::new(SUB, EXT);
                v.ihl = 0;
                v.frame(&Tcp::to(587).bytes())
            },
            BlockBadIpHeader,
        ),
        (
            "IHL 4 from a non-subscriber".into(),
            {
                let mut v = V4::new([10, 0, 0, 1], EXT);
                v.ihl = 4;
                v.frame(&Tcp::to(25).bytes())
            },
            PassNotSubscriber,
        ),
        (
            "IP version 6 in an IPv4 ethertype".into(),
            {
                let mut v = V4::new(SUB, EXT);
                v.version = 6;
                v.frame(&Tcp::to(25).bytes())
            },
            BlockBadIpHeader,
        ),
        (
            "total length beyond the frame".into(),
            {
                let mut v = V4::new(SUB, EXT);
                v.tot_len = Some(400);
                v.frame(&Tcp::to(25).bytes())
            },
            BlockTruncated,
        ),
        (
            "total length below the header".into(),
            {
                let mut v = V4::new(SUB, EXT);
                v.tot_len = Some(12);
                v.frame(&Tcp::to(25).bytes())
            },
            BlockBadIpHeader,
        ),
        (
            "IPv4 header cut short".into(),
            eth(0x0800, &V4::new(SUB, EXT).packet(&[])[..16]),
            BlockTruncated,
        ),
        (
            "TCP header cut short".into(),
            V4::new(SUB, EXT).frame(
                &Tcp {
                    header_bytes: 10,
                    ..Tcp::to(25)
                }
                .bytes(),
            ),
            BlockTruncated,
        ),
        (
            "TCP data offset 4".into(),
            V4::new(SUB, EXT).frame(
                &Tcp {
                    doff: 4,
                    ..Tcp::to(25)
                }
                .bytes(),
            ),
            BlockBadTcpHeader,
        ),
        (
            "TCP data offset 4 to port 587".into(),
            V4::new(SUB, EXT).frame(
                &Tcp {
                    doff: 4,
                    ..Tcp::to(587)
                }
                .bytes(),
            ),
            BlockBadTcpHeader,
        ),
        (
            "TCP data offset beyond the datagram".into(),
            V4::new(SUB, EXT).frame(
                &Tcp {
                    doff: 15,
                    ..Tcp::to(25)
                }
                .bytes(),
            ),
            BlockTruncated,
        ),
        (
            "non-first fragment".into(),
            {
                let mut v = V4::new(SUB, EXT);
                v.frag = 0x0010;
                v.frame(&[0u8; 16])
            },
            BlockFragment,
        ),
        (
            "non-first fragment to the mail server".into(),
            {
                let mut v = V4::new(SUB, MAIL);
                v.frag = 0x0010;
                v.frame(&[0u8; 16])
            },
            PassMailServer,
        ),
        (
            "first fragment (MF) to 25".into(),
            {
                let mut v = V4::new(SUB, EXT);
                v.frag = 0x2000;
                v.frame(&Tcp::to(25).bytes())
            },
            BlockPort,
        ),
        (
            "VLAN-tagged".into(),
            vlan(&syn4(SUB, EXT, 25), &[0x8100]),
            BlockPort,
        ),
        (
            "QinQ".into(),
            vlan(&syn4(SUB, EXT, 25), &[0x88a8, 0x8100]),
            BlockPort,
        ),
        (
            "QinQ to 587".into(),
            vlan(&syn4(SUB, EXT, 587), &[0x88a8, 0x8100]),
            PassPortOpen,
        ),
        (
            "three VLAN tags".into(),
            vlan(&syn4(SUB, EXT, 587), &[0x88a8, 0x8100, 0x8100]),
            BlockEncap,
        ),
        (
            "VLAN tag cut short".into(),
            eth(0x8100, &[0, 1]),
            BlockTruncated,
        ),
        (
            "PPPoE session IPv4".into(),
            pppoe(0x0021, &V4::new(SUB, EXT).packet(&Tcp::to(25).bytes())),
            BlockPort,
        ),
        (
            "PPPoE session IPv4 to 587".into(),
            pppoe(0x0021, &V4::new(SUB, EXT).packet(&Tcp::to(587).bytes())),
            PassPortOpen,
        ),
        ("PPPoE LCP".into(), pppoe(0xc021, &[1, 1, 0, 4]), PassNotIp),
        (
            "PPPoE inside a VLAN".into(),
            vlan(
                &pppoe(0x0021, &V4::new(SUB, EXT).packet(&Tcp::to(25).bytes())),
                &[0x8100],
            ),
            BlockPort,
        ),
        (
            "PPPoE header cut short".into(),
            eth(0x8864, &[0x11, 0, 0, 1]),
            BlockTruncated,
        ),
        (
            "IPv6 subscriber to external:25".into(),
            syn6("2001:db8:100::2", "2001:db8:ff::80", 25),
            BlockPort,
        ),
        (
            "IPv6 subscriber to external:587".into(),
            syn6("2001:db8:100::2", "2001:db8:ff::80", 587),
            PassPortOpen,
        ),
        (
            "IPv6 subscriber to mail server".into(),
            syn6("2001:db8:100::2", "2001:db8:25::25", 25),
            PassMailServer,
        ),
        (
            "IPv6 non-subscriber".into(),
            syn6("2001:db8:200::2", "2001:db8:ff::80", 25),
            PassNotSubscriber,
        ),
        (
            "IPv6 exempt address".into(),
            syn6("2001:db8:100:9::9", "2001:db8:ff::80", 25),
            PassExemptAddr,
        ),
        (
            "IPv6 exempt prefix".into(),
            syn6("2001:db8:101:1::1", "2001:db8:ff::80", 25),
            PassExemptPrefix,
        ),
        (
            "IPv6 session /56".into(),
            syn6("2001:db8:100:55aa::1", "2001:db8:ff::80", 25),
            PassExemptSession,
        ),
        (
            "IPv6 next to the session /56".into(),
            syn6("2001:db8:100:5600::1", "2001:db8:ff::80", 25),
            BlockPort,
        ),
        (
            "IPv6 hop-by-hop, routing, dest-opts".into(),
            {
                let mut c = ext(43);
                c.extend(ext(60));
                c.extend(ext(6));
                c.extend(Tcp::to(25).bytes());
                v6_frame(v6("2001:db8:100::2"), v6("2001:db8:ff::80"), 0, &c)
            },
            BlockPort,
        ),
        (
            "IPv6 AH".into(),
            {
                let mut c = vec![6, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]; // AH len 1 = 12 bytes
                c.extend(Tcp::to(25).bytes());
                v6_frame(v6("2001:db8:100::2"), v6("2001:db8:ff::80"), 51, &c)
            },
            BlockPort,
        ),
        (
            "IPv6 first fragment".into(),
            {
                let mut c = frag6(6, 0, true);
                c.extend(Tcp::to(25).bytes());
                v6_frame(v6("2001:db8:100::2"), v6("2001:db8:ff::80"), 44, &c)
            },
            BlockPort,
        ),
        (
            "IPv6 non-first fragment".into(),
            {
                let mut c = frag6(6, 10, false);
                c.extend([0u8; 16]);
                v6_frame(v6("2001:db8:100::2"), v6("2001:db8:ff::80"), 44, &c)
            },
            BlockFragment,
        ),
        (
            "IPv6 payload length beyond the frame".into(),
            eth(
                0x86dd,
                &v6_packet(
                    v6("2001:db8:100::2"),
                    v6("2001:db8:ff::80"),
                    6,
                    &Tcp::to(25).bytes(),
                    Some(200),
                ),
            ),
            BlockTruncated,
        ),
        (
            "IPv6 extension length beyond the payload".into(),
            {
                let mut c = vec![6, 30, 0, 0, 0, 0, 0, 0];
                c.extend(Tcp::to(25).bytes());
                v6_frame(v6("2001:db8:100::2"), v6("2001:db8:ff::80"), 0, &c)
            },
            BlockTruncated,
        ),
        (
            "IPv6 UDP".into(),
            v6_frame(v6("2001:db8:100::2"), v6("2001:db8:ff::80"), 17, &[0u8; 8]),
            PassNotTcp,
        ),
        (
            "IPv6 no next header".into(),
            v6_frame(v6("2001:db8:100::2"), v6("2001:db8:ff::80"), 59, &[]),
            PassNotTcp,
        ),
        (
            "IPv6 header cut short".into(),
            eth(
                0x86dd,
                &v6_packet(v6("2001:db8:100::2"), v6("2001:db8:ff::80"), 6, &[], None)[..30],
            ),
            BlockTruncated,
        ),
    ];
    for flags in [0x00u8, 0x01, 0x04, 0x10, 0x11, 0x12, 0x14, 0x18, 0x29, 0xff] {
        r.push((
            format!("TCP flags {flags:#04x} to external:25"),
            V4::new(SUB, EXT).frame(
                &Tcp {
                    flags,
                    ..Tcp::to(25)
                }
                .bytes(),
            ),
            BlockPort,
        ));
    }
    // The walk takes up to MAX_EXT_HEADERS - 1 extension headers before TCP; one more is a doubt.
    for (n, want) in [(7, PassPortOpen), (8, BlockExtChain), (12, BlockExtChain)] {
        let mut c = Vec::new();
        for i in 0..n {
            c.extend(ext(if i + 1 == n { 6 } else { 60 }));
        }
        c.extend(Tcp::to(587).bytes());
        r.push((
            format!("IPv6 chain of {n} extension headers"),
            v6_frame(v6("2001:db8:100::2"), v6("2001:db8:ff::80"), 60, &c),
            want,
        ));
    }
    r
}

fn counter(live: &LiveMaps, reason: Reason) -> u64 {
    live.counters()
        .unwrap()
        .into_iter()
        .find(|(r, _)| *r == reason)
        .unwrap()
        .1
}

fn run(f: &mut Fixture, prog: &str, data: &[u8]) -> u32 {
    try_run(f, prog, data).unwrap_or_else(|e| panic!("{prog} test_run: {e}"))
}

fn try_run(f: &mut Fixture, prog: &str, data: &[u8]) -> Result<u32, String> {
    let opts = TestRunOptions {
        data_in: Some(data),
        ..Default::default()
    };
    let p = f.ebpf.program_mut(prog).unwrap();
    let ret = if prog == PROG_XDP {
        let p: &Xdp = (&*p).try_into().unwrap();
        p.test_run(opts)
    } else {
        let p: &SchedClassifier = (&*p).try_into().unwrap();
        p.test_run(opts)
    };
    ret.map(|r| r.return_value)
        .map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e)))
}

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_UNSPEC: u32 = u32::MAX;
const TC_ACT_SHOT: u32 = 2;

#[test]
fn every_row_agrees_with_the_model_in_xdp_and_tc() {
    require_root!();
    let mut f = fixture();
    let mut failures = Vec::new();
    for (name, frame, want) in rows() {
        let model = classify(frame.as_slice(), Link::Ethernet, &f.model);
        if model != want {
            failures.push(format!("{name}: model says {model:?}, table says {want:?}"));
        }
        for (prog, pass, block) in [
            (PROG_XDP, XDP_PASS, XDP_DROP),
            (PROG_TC, TC_ACT_UNSPEC, TC_ACT_SHOT),
        ] {
            // BPF_PROG_TEST_RUN for skb programs pulls a whole IP header before running the
            // program and refuses shorter frames (EINVAL); XDP runs them.
            if prog == PROG_TC && name.ends_with("IPv4 header cut short")
                || prog == PROG_TC && name.ends_with("IPv6 header cut short")
            {
                continue;
            }
            let before = counter(&f.live, want);
            let ret = match try_run(&mut f, prog, &frame) {
                Ok(r) => r,
                Err(e) => {
                    failures.push(format!("{name}: {prog} test_run failed: {e}"));
                    continue;
                }
            };
            let after = counter(&f.live, want);
            let expect = if want.is_pass() { pass } else { block };
            if ret != expect || after != before + 1 {
                failures.push(format!(
                    "{name}: {prog} returned {ret} (want {expect}), counter {} moved by {}",
                    want.name(),
                    after - before
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Raw-IP devices (ppp, tun): the same rows with the Ethernet header taken off.
#[test]
fn raw_ip_program_agrees_with_the_model() {
    require_root!();
    let mut f = fixture();
    let mut failures = Vec::new();
    for (name, frame, _) in rows() {
        // Only plain Ethernet + IP rows have a raw-IP equivalent.
        if !matches!(u16::from_be_bytes([frame[12], frame[13]]), 0x0800 | 0x86dd)
            || frame.len() < 14 + 20
        {
            continue;
        }
        let raw = &frame[14..];
        let want = classify(raw, Link::RawIp, &f.model);
        let ret = run(&mut f, PROG_TC_RAW, raw);
        let expect = if want.is_pass() {
            TC_ACT_UNSPEC
        } else {
            TC_ACT_SHOT
        };
        if ret != expect {
            failures.push(format!(
                "{name}: raw TC returned {ret}, model says {want:?}"
            ));
        }
    }
    let junk = [0x45u8 ^ 0xf0; 40]; // version nibble 0xb on a raw-IP device
    assert_eq!(
        run(&mut f, PROG_TC_RAW, &junk),
        TC_ACT_SHOT,
        "non-IP on a raw-IP device must block"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn run_out(f: &mut Fixture, prog: &str, data: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; data.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(data),
        data_out: Some(&mut out),
        ..Default::default()
    };
    let p = f.ebpf.program_mut(prog).unwrap();
    let r = if prog == PROG_XDP {
        let p: &Xdp = (&*p).try_into().unwrap();
        p.test_run(opts)
    } else {
        let p: &SchedClassifier = (&*p).try_into().unwrap();
        p.test_run(opts)
    }
    .unwrap_or_else(|e| panic!("{prog}: {e}"));
    let n = r.data_size_out as usize;
    (r.return_value, out[..n].to_vec())
}

const XDP_TX: u32 = 3;

/// RFC 1071, written here independently of the datapath's own code.
fn ones_sum(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum()
}

fn folds_to_ffff(mut s: u32) -> bool {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s == 0xffff
}

/// The IPv4 header checksum and the TCP checksum (with its pseudo header) both verify.
fn checksums_ok(ip: &[u8], v6: bool) -> bool {
    if v6 {
        let tcp = &ip[40..];
        let pseudo = ones_sum(&ip[8..40]) + tcp.len() as u32 + 6;
        folds_to_ffff(pseudo + ones_sum(tcp))
    } else {
        let tcp = &ip[20..];
        let pseudo = ones_sum(&ip[12..20]) + tcp.len() as u32 + 6;
        folds_to_ffff(ones_sum(&ip[..20])) && folds_to_ffff(pseudo + ones_sum(tcp))
    }
}
const TC_ACT_REDIRECT: u32 = 7;

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().unwrap())
}

#[test]
fn reject_answers_a_well_formed_blocked_segment_with_a_rst() {
    require_root!();
    let mut f = fixture();
    let mut s = f.live.settings.get(&0, 0).unwrap();
    s.flags |= port25_common::maps::FLAG_REJECT;
    f.live.settings.set(0, s, 0).unwrap();
    let mut syn = Tcp::to(25);
    syn.flags = SYN;
    let syn4 = V4::new(SUB, EXT).frame(&syn.bytes());
    let syn6 = syn6("2001:db8:100::2", "2001:db8:ff::80", 25);
    let tagged = vlan(&syn4, &[0x8100]);
    for prog in [PROG_XDP, PROG_TC] {
        let answered = if prog == PROG_XDP {
            XDP_TX
        } else {
            TC_ACT_REDIRECT
        };
        for (what, input, l3, v6) in [
            ("IPv4 SYN", &syn4, 14, false),
            ("IPv6 SYN", &syn6, 14, true),
            ("VLAN IPv4 SYN", &tagged, 18, false),
        ] {
            let (ret, out) = run_out(&mut f, prog, input);
            assert_eq!(ret, answered, "{prog} {what}: answered");
            let tcp = l3 + if v6 { 40 } else { 20 };
            assert_eq!(out.len(), tcp + 20, "{prog} {what}: trimmed to the RST");
            assert_eq!(&out[..6], &input[6..12], "{prog} {what}: MACs swapped");
            assert_eq!(&out[6..12], &input[..6]);
            assert_eq!(&out[12..l3], &input[12..l3], "{what}: tags kept");
            let (s, d) = if v6 { (8, 24) } else { (12, 16) };
            let alen = if v6 { 16 } else { 4 };
            assert_eq!(
                &out[l3 + s..l3 + s + alen],
                &input[l3 + d..l3 + d + alen],
                "{what}: addresses swapped"
            );
            assert_eq!(
                &out[tcp..tcp + 2],
                &input[tcp + 2..tcp + 4],
                "{what}: ports swapped"
            );
            assert_eq!(out[tcp + 13], 0x14, "{what}: RST|ACK");
            assert_eq!(be32(&out[tcp + 8..tcp + 12]), 1, "{what}: acks the SYN");
            assert!(
                checksums_ok(&out[l3..], v6),
                "{prog} {what}: checksums: {out:?}"
            );
        }
        let mut rst = Tcp::to(25);
        rst.flags = 0x04;
        let mut opts = V4::new(SUB, EXT);
        opts = opts.with_options(4);
        let mut short = Tcp::to(25);
        short.header_bytes = 12;
        for (what, input) in [
            ("a RST", V4::new(SUB, EXT).frame(&rst.bytes())),
            ("IPv4 options", opts.frame(&syn.bytes())),
            (
                "PPPoE",
                pppoe(0x0021, &V4::new(SUB, EXT).packet(&syn.bytes())),
            ),
            (
                "IPv6 extension header",
                v6_frame(
                    v6("2001:db8:100::2"),
                    v6("2001:db8:ff::80"),
                    0,
                    &[ext(6), syn.bytes()].concat(),
                ),
            ),
            (
                "truncated TCP (a doubt)",
                V4::new(SUB, EXT).frame(&short.bytes()),
            ),
        ] {
            let (ret, out) = run_out(&mut f, prog, &input);
            let drop = if prog == PROG_XDP {
                XDP_DROP
            } else {
                TC_ACT_SHOT
            };
            assert_eq!(ret, drop, "{prog} {what}: dropped, not answered");
            assert_eq!(out, input, "{prog} {what}: untouched");
        }
        let to_587 = V4::new(SUB, EXT).frame(&Tcp::to(587).bytes());
        let (ret, out) = run_out(&mut f, prog, &to_587);
        let pass = if prog == PROG_XDP {
            XDP_PASS
        } else {
            TC_ACT_UNSPEC
        };
        assert_eq!((ret, &out), (pass, &to_587), "{prog}: a pass is untouched");
    }
    let raw = V4::new(SUB, EXT).packet(&syn.bytes());
    let (ret, out) = run_out(&mut f, PROG_TC_RAW, &raw);
    assert_eq!(ret, TC_ACT_REDIRECT, "raw IP answered");
    assert_eq!(out.len(), 40);
    assert_eq!(&out[12..16], &EXT);
    assert!(checksums_ok(&out, false), "raw IP checksums");
}

#[test]
fn batch_reads_return_every_entry_across_chunks() {
    require_root!();
    use port25_ctl::livemaps::{hash_entries_one_by_one, Table};
    let mut f = fixture();
    let e = Exempt {
        expires_ns: 7,
        origin: ORIGIN_SESSION,
        _pad: 0,
    };
    for i in 0..20_000u32 {
        f.live
            .exip4
            .put((0x0a00_0000 + i).to_be_bytes(), e)
            .unwrap();
    }
    let batched = f.live.exip4.entries().unwrap();
    assert_eq!(batched.len(), 20_000 + 3, "20,000 added to the fixture's 3");
    assert_eq!(batched, hash_entries_one_by_one(&f.live.exip4).unwrap());
}
