//! Crafted frames through the real XDP and TC programs (BPF_PROG_TEST_RUN), each checked for
//! verdict and counter reason, and each also decided by the reference model, which must agree.

use std::path::Path;

use port25_common::{
    maps::{Exempt, NetKey6, ORIGIN_SESSION},
    model::Model,
    parse::Link,
    verdict::classify,
    Reason,
};
use port25_ctl::{
    bpf::datapath::{self, PROG_TC, PROG_TC_RAW, PROG_XDP},
    bpf::livemaps::{boot_ns, LiveMaps},
    bpf::pins::Pins,
    config::Config,
    policy::{self, Desired},
};
use port25_tests::{
    frame::*,
    kernel::{self, RunOptions},
    require_root,
    table::{self, Case, HookWant, CONFIG, EXT, MAIL, NONSUB, RAW_SUB, SUB},
};

struct Fixture {
    ebpf: aya::Ebpf,
    live: LiveMaps,
    model: Model,
    pins: Pins,
    cfg: Config,
    want: Desired,
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
    for (name, prog) in ebpf.programs() {
        let insns = prog
            .info()
            .ok()
            .and_then(|i| i.verified_instruction_count());
        eprintln!("{name}: verified {insns:?} instructions");
    }
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
    let model = port25_tests::kernel::model_of(&want, now);
    Fixture {
        ebpf,
        live,
        model,
        pins,
        cfg,
        want,
    }
}

fn counter(live: &LiveMaps, reason: Reason) -> u64 {
    live.counters()
        .unwrap()
        .into_iter()
        .find(|(r, _)| *r == reason)
        .unwrap()
        .1
}

fn try_run(f: &mut Fixture, prog: &str, data: &[u8]) -> Result<u32, String> {
    port25_tests::kernel::test_run(&mut f.ebpf, prog, data)
}

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_UNSPEC: u32 = u32::MAX;
const TC_ACT_SHOT: u32 = 2;

/// Every row of the named table through the model and through each program as the row
/// says (XDP and TC for Ethernet, raw TC for raw IP): verdict and counter reason both
/// checked, and a refusal by BPF_PROG_TEST_RUN only where the row expects one.
#[test]
fn every_row_agrees_with_the_model_in_xdp_and_tc() {
    require_root!();
    let mut f = fixture();
    let cases = table::cases();
    println!("frame table: {} rows", cases.len());
    assert!(
        cases.len() >= 500,
        "the frame table has {} rows",
        cases.len()
    );
    let mut failures = Vec::new();
    let (mut runs, mut refused) = (0, 0);
    for Case {
        name,
        link,
        frame,
        want,
        xdp,
        tc,
        raw_tc,
    } in cases
    {
        let model = classify(frame.as_slice(), link, &f.model);
        if model != want {
            failures.push(format!("{name}: model says {model:?}, table says {want:?}"));
        }
        if let Link::RawProto(proto) = link {
            if frame.len() >= 14 {
                assert_eq!(proto, test_run_protocol(&frame), "{name}: protocol");
            }
        }
        for (prog, hook, pass, block) in [
            (PROG_XDP, xdp, XDP_PASS, XDP_DROP),
            (PROG_TC, tc, TC_ACT_UNSPEC, TC_ACT_SHOT),
            (PROG_TC_RAW, raw_tc, TC_ACT_UNSPEC, TC_ACT_SHOT),
        ] {
            let reason = match hook {
                HookWant::NotAttached => continue,
                HookWant::Refused => {
                    match try_run(&mut f, prog, &frame) {
                        Err(_) => refused += 1,
                        Ok(r) => failures.push(format!(
                            "{name}: {prog} ran (returned {r}), the row expects a refusal"
                        )),
                    }
                    continue;
                }
                HookWant::Decides(r) => r,
            };
            let before = counter(&f.live, reason);
            let ret = match try_run(&mut f, prog, &frame) {
                Ok(r) => r,
                Err(e) => {
                    failures.push(format!("{name}: {prog} test_run failed: {e}"));
                    continue;
                }
            };
            runs += 1;
            let after = counter(&f.live, reason);
            let expect = if reason.is_pass() { pass } else { block };
            if ret != expect || after != before + 1 {
                failures.push(format!(
                    "{name}: {prog} returned {ret} (want {expect}), counter {} moved by {}",
                    reason.name(),
                    after - before
                ));
            }
        }
    }
    println!("{runs} program runs, {refused} frames refused by BPF_PROG_TEST_RUN (model only)");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Raw-IP devices (ppp, tun): every plain Ethernet IP row with its Ethernet header taken off,
/// the skb protocol being what BPF_PROG_TEST_RUN makes of the bytes; kernel against model.
/// (No such row starts with a source whose bytes read as an IP protocol, so none is refused.)
#[test]
fn raw_ip_program_agrees_with_the_model() {
    require_root!();
    let mut f = fixture();
    let mut failures = Vec::new();
    let mut n = 0;
    for Case { name, frame, .. } in table::cases() {
        if frame.len() < 14 + 20
            || !matches!(u16::from_be_bytes([frame[12], frame[13]]), 0x0800 | 0x86dd)
        {
            continue;
        }
        let raw = &frame[14..];
        let want = classify(raw, Link::RawProto(test_run_protocol(raw)), &f.model);
        let ret = try_run(&mut f, PROG_TC_RAW, raw).unwrap_or_else(|e| panic!("{name}: {e}"));
        n += 1;
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
    println!("{n} raw frames");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn run_out(f: &mut Fixture, prog: &str, data: &[u8]) -> (u32, Vec<u8>) {
    let opts = RunOptions {
        data_out: true,
        ..Default::default()
    };
    let r = kernel::run(&mut f.ebpf, prog, data, opts).unwrap_or_else(|e| panic!("{prog}: {e}"));
    (r.ret, r.out)
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
    let v4 = || Frame::eth().ipv4(SUB, EXT);
    let syn4 = v4().tcp(25).syn().build();
    let syn6 = Frame::eth()
        .ipv6("2001:db8:100::2", "2001:db8:ff::80")
        .tcp(25)
        .syn()
        .build();
    let tagged = Frame::eth()
        .vlan(0x8100)
        .ipv4(SUB, EXT)
        .tcp(25)
        .syn()
        .build();
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
        for (what, input) in [
            ("a RST", v4().tcp(25).flags(0x04).build()),
            ("IPv4 options", v4().options(4).tcp(25).syn().build()),
            (
                "PPPoE",
                Frame::eth().pppoe().ipv4(SUB, EXT).tcp(25).syn().build(),
            ),
            (
                "IPv6 extension header",
                Frame::eth()
                    .ipv6("2001:db8:100::2", "2001:db8:ff::80")
                    .ext(0)
                    .tcp(25)
                    .syn()
                    .build(),
            ),
            (
                "truncated TCP (a doubt)",
                v4().tcp(25).tcp_bytes(12).build(),
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
        let to_587 = v4().tcp(587).build();
        let (ret, out) = run_out(&mut f, prog, &to_587);
        let pass = if prog == PROG_XDP {
            XDP_PASS
        } else {
            TC_ACT_UNSPEC
        };
        assert_eq!((ret, &out), (pass, &to_587), "{prog}: a pass is untouched");
    }
    // Source 8.0.x.x: BPF_PROG_TEST_RUN reads it as skb protocol 0x0800.
    let raw = Frame::raw().ipv4(RAW_SUB, EXT).tcp(25).syn().build();
    let (ret, out) = run_out(&mut f, PROG_TC_RAW, &raw);
    assert_eq!(ret, TC_ACT_REDIRECT, "raw IP answered");
    assert_eq!(out.len(), 40);
    assert_eq!(&out[12..16], &EXT);
    assert_eq!(&out[16..20], &RAW_SUB);
    assert!(checksums_ok(&out, false), "raw IP checksums");
}

#[test]
fn batch_reads_return_every_entry_across_chunks() {
    require_root!();
    use port25_ctl::bpf::livemaps::{hash_entries_one_by_one, Table};
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

/// The ports array read by batch is the array as the kernel answers each index: the
/// blocked ports and nothing else, the last index (65,535) included.
#[test]
fn the_ports_array_reads_by_batch_as_index_by_index() {
    require_root!();
    use port25_ctl::bpf::livemaps::Table;
    let mut f = fixture();
    for p in [0u16, 1, 25, 465, 8191, 8192, 40000, 65535] {
        f.live.ports.put(p, 1).unwrap();
    }
    f.live.ports.del(1).unwrap();
    let batched = f.live.ports.entries().unwrap();
    let mut by_index = std::collections::BTreeMap::new();
    for i in 0..=u16::MAX {
        let v = f.live.ports.get(&(i as u32), 0).unwrap();
        if v != 0 {
            by_index.insert(i, v);
        }
    }
    assert_eq!(batched, by_index);
    for p in [0u16, 25, 465, 8191, 8192, 40000, 65535] {
        assert_eq!(batched.get(&p), Some(&1), "port {p}");
    }
    assert!(
        !batched.contains_key(&1),
        "a cleared port is not read as blocked"
    );
}

/// A counter map pinned by a version with fewer reasons (16 entries before the PPP reasons)
/// is still read, as far as it goes: `status` after an upgrade, before the daemon restarts
/// and migrates it, must not fail.
#[test]
fn counters_read_from_an_older_smaller_counter_map() {
    require_root!();
    use aya::maps::{MapData, PerCpuArray};
    let f = fixture();
    let path = f.pins.map(port25_common::maps::COUNTERS);
    std::fs::remove_file(&path).unwrap();
    let old = PerCpuArray::<MapData, u64>::create(16, 0).expect("create a 16-entry counter map");
    old.pin(&path).expect("pin it");
    let live = LiveMaps::open(&f.pins).expect("open the pins");
    let counters = live.counters().expect("counters of the older map");
    let names: Vec<_> = counters.iter().map(|(r, _)| *r).collect();
    assert_eq!(
        names,
        Reason::ALL[..16].to_vec(),
        "the reasons the older map has"
    );
}

/// A live tun device (with packet information, so the writer sets `skb->protocol` as
/// `ppp_receive_nonmp_frame` does for MPLS) under the raw TC program: the protocol decides,
/// not the nibble.
#[test]
fn raw_tc_on_a_live_tun_device_decides_by_skb_protocol() {
    require_root!();
    use port25_ctl::config::{Direction, Hook, Interface, XdpMode};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let mut f = fixture();
    let name = port25_tests::unique("p25tun");
    // SAFETY: plain open/ioctl on a fresh descriptor with a zeroed, sized ifreq.
    let fd = unsafe {
        let raw = libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR);
        assert!(raw >= 0, "open /dev/net/tun");
        let fd = OwnedFd::from_raw_fd(raw);
        let mut ifr = [0u8; 40];
        ifr[..name.len()].copy_from_slice(name.as_bytes());
        ifr[16..18].copy_from_slice(&(libc::IFF_TUN as i16).to_ne_bytes());
        assert_eq!(
            libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, ifr.as_mut_ptr()),
            0,
            "TUNSETIFF"
        );
        fd
    };
    let up = std::process::Command::new("ip")
        .args(["link", "set", &name, "up"])
        .status()
        .unwrap();
    assert!(up.success(), "ip link set {name} up");
    let iface = Interface {
        name: name.clone(),
        hook: Hook::Tc,
        xdp_mode: XdpMode::default(),
        direction: Direction::Ingress,
        tc_attach: Default::default(),
    };
    datapath::attach(&mut f.ebpf, &f.pins, &iface).expect("attach raw TC to the tun device");
    // The packets: an IPv4 SYN to :587 (a pass as IPv4), a subscriber's SYN
    // to :25, and an IPv6 SYN to :587.
    let v4_587 = V4::new([10, 0, 0, 1], EXT).packet(&Tcp::to(587).bytes());
    let v4_25 = V4::new(SUB, EXT).packet(&Tcp::to(25).bytes());
    let v6_587 = v6_packet(
        v6("2001:db8:200::2"),
        v6("2001:db8:ff::80"),
        6,
        &Tcp::to(587).bytes(),
        None,
    );
    for (what, proto, packet, want) in [
        (
            "MPLS unicast with nibble 4",
            0x8847u16,
            &v4_587,
            Reason::BlockMpls,
        ),
        (
            "MPLS multicast with nibble 4",
            0x8848,
            &v4_587,
            Reason::BlockMpls,
        ),
        ("IPv4 SYN to :25", 0x0800, &v4_25, Reason::BlockPort),
        ("IPv4 SYN to :587", 0x0800, &v4_587, Reason::PassPortOpen),
        (
            "protocol IPv4, nibble 6",
            0x0800,
            &v6_587,
            Reason::BlockBadIpHeader,
        ),
        (
            "protocol IPv6, nibble 4",
            0x86dd,
            &v4_587,
            Reason::BlockBadIpHeader,
        ),
        ("protocol IPX", 0x8137, &v4_25, Reason::PassNotIp),
    ] {
        let before = counter(&f.live, want);
        // struct tun_pi: flags, then the protocol, big-endian.
        let frame = [&[0u8, 0][..], &proto.to_be_bytes(), packet].concat();
        // SAFETY: write of an owned buffer to an owned descriptor.
        let n = unsafe { libc::write(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        assert_eq!(n, frame.len() as isize, "{what}: written to {name}");
        let after = counter(&f.live, want);
        assert_eq!(after, before + 1, "{what}: counted as {}", want.name());
    }
}

/// The exempt filter, read by the real program: a lookup (here a session prefix probe and
/// an exact IPv4 address) is skipped only when the filter is ready and the key's bit is clear. The apply made it ready with the /56's bit
/// set, so the /56 passes; with that bit cleared by hand (a broken filter) the probe is
/// skipped and the source is blocked, which shows the program reads it; with the ready word
/// cleared (a filter map just created beside pins that hold entries) every length is
/// probed again, whatever the bits say.
#[test]
fn exempt_lookups_follow_the_filter() {
    use port25_common::maps::{net6_bit, EXBITS_READY as NET6_FILTER_READY};
    use port25_ctl::bpf::exbits::FilterCell;
    require_root!();
    let mut f = fixture();
    let frame = v6_frame(
        v6("2001:db8:100:5500::7"),
        v6("2001:db8:ff::80"),
        6,
        &Tcp::to(25).bytes(),
    );
    let key = NetKey6 {
        prefix_len: 56,
        addr: v6("2001:db8:100:5500::"),
    };
    let (word, bit) = net6_bit(&key);
    let bits = f.live.exbits.take().expect("the filter map is pinned");
    assert_ne!(
        bits.load(NET6_FILTER_READY),
        0,
        "a full apply leaves it ready"
    );
    assert_ne!(bits.load(word) >> bit & 1, 0, "the /56's bit is set");
    let verdict = |f: &mut Fixture| try_run(f, PROG_XDP, &frame).unwrap();
    assert_eq!(verdict(&mut f), XDP_PASS, "the live /56 session passes");

    let all = bits.load(word);
    bits.store(word, all & !(1 << bit));
    assert_eq!(
        verdict(&mut f),
        XDP_DROP,
        "its bit cleared, the program skips the probe"
    );
    bits.store(NET6_FILTER_READY, 0);
    assert_eq!(
        verdict(&mut f),
        XDP_PASS,
        "not ready: every length is probed, whatever the bits"
    );
    bits.store(word, all);
    bits.store(NET6_FILTER_READY, 1);

    // The same for an exact IPv4 address (the live session entry 100.64.8.8).
    let frame4 = V4::new([100, 64, 8, 8], [203, 0, 113, 80]).frame(&Tcp::to(25).bytes());
    let (word, bit) = port25_common::maps::ip4_bit([100, 64, 8, 8]);
    let all = bits.load(word);
    assert_ne!(all >> bit & 1, 0, "the address's bit is set");
    let verdict4 = |f: &mut Fixture| try_run(f, PROG_XDP, &frame4).unwrap();
    assert_eq!(verdict4(&mut f), XDP_PASS, "the live session passes");
    bits.store(word, all & !(1 << bit));
    assert_eq!(
        verdict4(&mut f),
        XDP_DROP,
        "its bit cleared, the lookup is skipped"
    );
    bits.store(NET6_FILTER_READY, 0);
    assert_eq!(verdict4(&mut f), XDP_PASS, "not ready: the hash is read");
    bits.store(word, all);
    bits.store(NET6_FILTER_READY, 1);
    f.live.exbits = Some(bits);
    // `check` reads the same filter.
    let p = port25_common::parse::Packet::Tcp {
        src: port25_common::Addr::V6(v6("2001:db8:100:5500::7")),
        dst: port25_common::Addr::V6(v6("2001:db8:ff::80")),
        dport: 25,
    };
    assert_eq!(
        port25_common::verdict::decide(&p, &f.live),
        Reason::PassExemptSession
    );
}

/// The IPv4 tries behind their /24 bits, read by the real program. A destination whose /24
/// bit is clear is no mail server's and a source whose /24 bit is clear is in no exempt
/// prefix, without the tries; a source whose /24 is said to be surely enforced is enforced
/// without the ranges trie. Each bit is flipped by hand (a broken filter) to show the
/// program reads it, and each flip resolves to block: a mail server or an exempt prefix
/// skipped, a source outside the ranges enforced. Not ready, the tries decide again.
#[test]
fn ipv4_tries_follow_their_slash24_bits() {
    use port25_common::maps::{slash24_bit, EXBITS_MAIL4, EXBITS_PFX4, EXBITS_RANGES4};
    use port25_ctl::bpf::exbits::FilterCell;
    require_root!();
    let mut f = fixture();
    let bits = f.live.exbits.take().expect("the filter map is pinned");
    let ready = port25_common::maps::EXBITS_READY;
    assert_ne!(bits.load(ready), 0, "a full apply leaves it ready");
    let run = |f: &mut Fixture, frame: &[u8]| try_run(f, PROG_XDP, frame).unwrap();
    let syn = |src: [u8; 4], dst: [u8; 4]| V4::new(src, dst).frame(&Tcp::to(25).bytes());
    let bit_is = |(w, b): (u32, u32)| bits.load(w) >> b & 1 != 0;

    // (what, frame, its /24's bit, whether the apply sets it, the verdict with the bit as
    // applied, with the bit flipped)
    let cases = [
        (
            "a subscriber to the mail server",
            syn(SUB, MAIL),
            slash24_bit(EXBITS_MAIL4, MAIL),
            true,
            XDP_PASS,
            XDP_DROP,
        ),
        (
            "a source in the exempt 100.65.0.0/16",
            syn([100, 65, 1, 1], EXT),
            slash24_bit(EXBITS_PFX4, [100, 65, 1, 1]),
            true,
            XDP_PASS,
            XDP_DROP,
        ),
        (
            "a source outside the ranges",
            syn(NONSUB, EXT),
            slash24_bit(EXBITS_RANGES4, NONSUB),
            false,
            XDP_PASS,
            XDP_DROP,
        ),
        (
            "a subscriber (its /24 inside 100.64.0.0/10)",
            syn(SUB, EXT),
            slash24_bit(EXBITS_RANGES4, SUB),
            true,
            XDP_DROP,
            XDP_DROP,
        ),
    ];
    for (what, frame, (w, b), set, applied, flipped) in cases {
        assert_eq!(bit_is((w, b)), set, "{what}: the bit as the apply left it");
        assert_eq!(run(&mut f, &frame), applied, "{what}: as applied");
        let all = bits.load(w);
        bits.store(w, all ^ (1 << b));
        assert_eq!(run(&mut f, &frame), flipped, "{what}: its bit flipped");
        bits.store(ready, 0);
        assert_eq!(
            run(&mut f, &frame),
            applied,
            "{what}: not ready, the tries decide"
        );
        bits.store(w, all);
        bits.store(ready, 1);
    }

    // `check` reads the same filter: a /24 said surely enforced is enforced there too.
    let (w, b) = slash24_bit(EXBITS_RANGES4, NONSUB);
    let all = bits.load(w);
    bits.store(w, all | 1 << b);
    f.live.exbits = Some(bits);
    let p = port25_common::parse::Packet::Tcp {
        src: port25_common::Addr::V4(NONSUB),
        dst: port25_common::Addr::V4(EXT),
        dport: 25,
    };
    assert_eq!(
        port25_common::verdict::decide(&p, &f.live),
        Reason::BlockPort
    );
    f.live.exbits.as_ref().unwrap().store(w, all);
    assert_eq!(
        port25_common::verdict::decide(&p, &f.live),
        Reason::PassNotSubscriber
    );
}

/// The IPv6 tries and session probes behind their block regions, read by the real program.
/// A destination whose /32's mail bit is clear is no mail server's, a source whose blocks'
/// exempt-prefix bits are clear is in no exempt prefix, a session length its blocks do not
/// name is not probed, all without the trie or the hash; a source whose /32 carries its own
/// tag in the ranges table is enforced without the ranges trie. Each bit is flipped by hand
/// (a broken filter) to show the program reads it, and each flip resolves to block. Not
/// ready, the tries and every length decide again.
#[test]
fn ipv6_tries_follow_their_block_bits() {
    use port25_common::maps::{
        block6, block_word, lens6_bit, mail6_bit, pfx6_bit, range6_tag, words_of, EXBITS_RANGES6,
        EXBITS_WIDE6, WIDE6_MAIL,
    };
    use port25_ctl::bpf::exbits::FilterCell;
    use port25_tests::table::{MAIL6, NONSUB6, SUB6};
    require_root!();
    let mut f = fixture();
    let bits = f.live.exbits.take().expect("the filter map is pinned");
    let ready = port25_common::maps::EXBITS_READY;
    assert_ne!(bits.load(ready), 0, "a full apply leaves it ready");
    let run = |f: &mut Fixture, frame: &[u8]| try_run(f, PROG_XDP, frame).unwrap();
    let syn = |src: &str, dst: &str| v6_frame(v6(src), v6(dst), 6, &Tcp::to(25).bytes());
    let hi = |a: &str| words_of(&v6(a)).0;
    let bit_is = |(w, b): (u32, u32)| bits.load(w) >> b & 1 != 0;
    let ext6 = "2001:db8:ff::80";

    // (what, frame, its bit, whether the apply sets it, verdict as applied, bit flipped)
    let cases = [
        (
            "a subscriber to the IPv6 mail server",
            syn(SUB6, MAIL6),
            mail6_bit(&v6("2001:db8:25::"), 64),
            true,
            XDP_PASS,
            XDP_DROP,
        ),
        (
            "a source in the exempt 2001:db8:101::/48",
            syn("2001:db8:101::7", ext6),
            pfx6_bit(&v6("2001:db8:101::"), 48),
            true,
            XDP_PASS,
            XDP_DROP,
        ),
        (
            "a source in the live /56 session",
            syn("2001:db8:100:5500::7", ext6),
            lens6_bit(hi("2001:db8:100:5500::"), 56),
            true,
            XDP_PASS,
            XDP_DROP,
        ),
    ];
    for (what, frame, (w, b), set, applied, flipped) in cases {
        assert_eq!(bit_is((w, b)), set, "{what}: the bit as the apply left it");
        assert_eq!(run(&mut f, &frame), applied, "{what}: as applied");
        let all = bits.load(w);
        bits.store(w, all ^ (1 << b));
        assert_eq!(run(&mut f, &frame), flipped, "{what}: its bit flipped");
        bits.store(ready, 0);
        assert_eq!(
            run(&mut f, &frame),
            applied,
            "{what}: not ready, the tries decide"
        );
        bits.store(w, all);
        bits.store(ready, 1);
    }

    // The wide word sends every destination to the mail trie, whatever its /32's bit says.
    let (w, b) = mail6_bit(&v6("2001:db8:25::"), 64);
    let all = bits.load(w);
    bits.store(w, all & !(1 << b));
    let to_mail = syn(SUB6, MAIL6);
    assert_eq!(run(&mut f, &to_mail), XDP_DROP, "the mail bit cleared");
    let wide = bits.load(EXBITS_WIDE6);
    bits.store(EXBITS_WIDE6, wide | WIDE6_MAIL);
    assert_eq!(
        run(&mut f, &to_mail),
        XDP_PASS,
        "a wide mail entry: the trie decides"
    );
    bits.store(EXBITS_WIDE6, wide);
    bits.store(w, all);

    // The ranges' tags: the fixture's IPv6 ranges are narrower than /32, so no block is
    // tagged and the trie decides. A source outside them passes; tagging its /32 (a broken
    // table) enforces it; a tag of another block in that slot does not.
    let slot = block_word(EXBITS_RANGES6, block6(hi(NONSUB6), 32));
    let own = range6_tag((hi(NONSUB6) >> 32) as u32);
    assert_eq!(bits.load(slot), 0, "no range of /32 or wider: no tag");
    let outside = syn(NONSUB6, ext6);
    assert_eq!(run(&mut f, &outside), XDP_PASS, "outside the ranges");
    bits.store(slot, own ^ (1 << 32));
    assert_eq!(
        run(&mut f, &outside),
        XDP_PASS,
        "another block's tag in the slot"
    );
    bits.store(slot, own);
    assert_eq!(
        run(&mut f, &outside),
        XDP_DROP,
        "its own tag: surely enforced"
    );
    bits.store(ready, 0);
    assert_eq!(
        run(&mut f, &outside),
        XDP_PASS,
        "not ready, the trie decides"
    );
    bits.store(ready, 1);

    // `check` reads the same table.
    f.live.exbits = Some(bits);
    let p = port25_common::parse::Packet::Tcp {
        src: port25_common::Addr::V6(v6(NONSUB6)),
        dst: port25_common::Addr::V6(v6(ext6)),
        dport: 25,
    };
    assert_eq!(
        port25_common::verdict::decide(&p, &f.live),
        Reason::BlockPort
    );
    f.live.exbits.as_ref().unwrap().store(slot, 0);
    assert_eq!(
        port25_common::verdict::decide(&p, &f.live),
        Reason::PassNotSubscriber
    );
}

/// A start that finds the exempt hashes pinned without the filter beside them (its pin
/// removed by hand, a tree pieced together) must not create a fresh filter and write the
/// hashes under it: the program still attached reads its own filter, ready and without the
/// new keys' bits, so until every link has swapped (for good, if one swap fails) it skips a
/// blocked session's new entry and passes the address to another user's binding, which
/// neither the old nor the new policy does. Such a tree is migrated like a changed layout:
/// the new maps are filled beside, and the attached program keeps its own until the swap.
#[test]
fn a_filter_missing_beside_pinned_hashes_is_a_migration() {
    use port25_common::maps as m;
    require_root!();
    let mut f = fixture();
    let x = X_BLOCKED;
    let frame = V4::new(x, [203, 0, 113, 80]).frame(&Tcp::to(25).bytes());
    assert_eq!(
        try_run(&mut f, PROG_XDP, &frame).unwrap(),
        XDP_DROP,
        "X is not exempt"
    );
    std::fs::remove_file(f.pins.map(m::EXBITS)).unwrap();

    let (_new, map_pins, changes) = start_over(&f);
    let mut live = LiveMaps::open(&map_pins).unwrap();
    policy::apply(&mut live, &binding_over_blocked_session(&f.want, x)).unwrap();
    assert_eq!(
        try_run(&mut f, PROG_XDP, &frame).unwrap(),
        XDP_DROP,
        "the program still attached passes X before its link swaps ({changes:?})"
    );
    assert!(
        changes.iter().any(|c| c.contains(m::EXBITS)),
        "the missing filter is a layout change: {changes:?}"
    );
    let _ = std::fs::remove_dir_all(map_pins.maps_dir());
}

/// A subscriber address blocked under the fixture's policy.
const X_BLOCKED: [u8; 4] = [100, 64, 19, 19];

/// `want` and a policy change both sides of which block `x`: another user's binding over it,
/// and a blocked user's new session on it, whose entry alone decides.
fn binding_over_blocked_session(want: &Desired, x: [u8; 4]) -> Desired {
    use port25_common::maps::{BLOCKED_NS, ORIGIN_BINDING};
    let entry = |expires_ns, origin| Exempt {
        expires_ns,
        origin,
        _pad: 0,
    };
    let mut want = want.clone();
    want.expfx4
        .insert(([x[0], x[1], x[2], 0], 24), entry(0, ORIGIN_BINDING));
    want.exip4.insert(x, entry(BLOCKED_NS, ORIGIN_SESSION));
    let frame = V4::new(x, EXT).frame(&Tcp::to(25).bytes());
    let model = port25_tests::kernel::model_of(&want, boot_ns());
    assert!(
        !classify(frame.as_slice(), Link::Ethernet, &model).is_pass(),
        "the new policy blocks {x:?}"
    );
    want
}

/// A daemon's start over the fixture's pins up to its apply: the programs loaded (staged
/// when the tree is migrated), the pins to apply to, and the layout changes it found.
fn start_over(f: &Fixture) -> (aya::Ebpf, Pins, Vec<String>) {
    let changes = datapath::layout_changes(&f.pins, &f.cfg.limits).unwrap();
    if changes.is_empty() {
        (
            datapath::load(&f.cfg, &f.pins).unwrap(),
            f.pins.clone(),
            changes,
        )
    } else {
        let opts = datapath::LoadOptions::default();
        let staged = datapath::load_staged(&f.cfg, &f.pins, opts).unwrap();
        (staged, f.pins.staging(), changes)
    }
}

/// A migration whose commit stopped halfway (the daemon killed between two renames) leaves
/// the exempt hashes it had moved, which the attached (staged) program reads, beside the old
/// filter, which it does not. Every shape matching, the next start must not reuse that tree:
/// it would set the bits of the keys it writes in the old filter, and the program, reading
/// its own ready one, would skip a blocked session's new entry until its link swapped. The
/// staged maps left behind mark the migration unfinished, and it is made again.
#[test]
fn a_migration_whose_commit_stopped_halfway_is_made_again() {
    use port25_common::maps as m;
    require_root!();
    let f = fixture();
    // The migration: staged maps filled, and their program attached (here: the one run).
    let opts = datapath::LoadOptions::default();
    let mut staged = datapath::load_staged(&f.cfg, &f.pins, opts).unwrap();
    let mut live = LiveMaps::open(&f.pins.staging()).unwrap();
    policy::apply(&mut live, &f.want).unwrap();
    drop(live);
    // Its commit stops with every policy map moved, the filter (and the settings) not.
    std::fs::remove_file(f.pins.staging().map(m::TRACK_TC)).unwrap();
    assert!(datapath::commit_staged_maps(&f.pins).is_err());

    let (_new, map_pins, changes) = start_over(&f);
    let mut live = LiveMaps::open(&map_pins).unwrap();
    policy::apply(&mut live, &binding_over_blocked_session(&f.want, X_BLOCKED)).unwrap();
    let frame = V4::new(X_BLOCKED, EXT).frame(&Tcp::to(25).bytes());
    let verdict = port25_tests::kernel::test_run(&mut staged, PROG_XDP, &frame).unwrap();
    assert_eq!(
        verdict, XDP_DROP,
        "the program still attached passes X before its link swaps ({changes:?})"
    );
    assert!(!changes.is_empty(), "an unfinished migration is a change");
    let _ = std::fs::remove_dir_all(map_pins.maps_dir());
}
