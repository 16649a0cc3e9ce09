//! The parser's fast path (`port25_common::plain`) against the full parser, on the host (no
//! root): wherever the fast path answers, the answer must be `parse_flat`'s, to the
//! addresses, port and flags. The kernel programs parse through the fast path and the model
//! never does, so the kernel tables and the differential fuzz check the same in the kernel.

use port25_common::{
    parse::{parse_flat, Link, Parsed, Shape},
    plain::{parse_plain_first, plain},
};
use port25_tests::{
    frame::{eth, v6, v6_frame, Tcp, V4},
    fuzzgen::{self, Options, PppForms},
};

/// What the verdict and the offender tracking read of a parse.
fn seen(p: &Parsed) -> (port25_common::parse::Packet, u8) {
    (
        p.packet(),
        if p.shape == Shape::Tcp {
            p.tcp_flags
        } else {
            0
        },
    )
}

/// Whether the fast path took the frame; panics when it disagrees with the full parser.
fn agrees(bytes: &[u8], link: Link, what: &dyn Fn() -> String) -> bool {
    let full = parse_flat(bytes, link);
    let fast = parse_plain_first(bytes, link);
    assert_eq!(
        seen(&fast),
        seen(&full),
        "{}: the fast path and the full parser disagree on {link:?} {:02x?}",
        what(),
        bytes
    );
    let mut out = fast;
    plain(bytes, link, &mut out)
}

#[test]
fn plain_agrees_with_parse_flat_on_generated_frames() {
    let opts = Options { ppp: PppForms::All };
    let (mut taken, mut all) = (0u64, 0u64);
    for seed in [1u64, 0x2545f491] {
        for i in 0..150_000 {
            let case = fuzzgen::case(seed, i, &opts);
            all += 1;
            if agrees(&case.bytes, case.link, &|| {
                format!("seed {seed} frame {i} {:?}", case.tags)
            }) {
                taken += 1;
            }
        }
    }
    // The generator favours the forms that hide TCP (tags, tunnels, chains); still, a fast
    // path that never answers would pass the comparison above and test nothing.
    assert!(
        taken * 10 > all,
        "the fast path took only {taken} of {all} frames"
    );
}

/// Plain frames of every kind the fast path takes, as Ethernet and as raw IP.
fn templates() -> Vec<(&'static str, Vec<u8>)> {
    let src = [100, 64, 1, 2];
    let dst = [203, 0, 113, 80];
    let udp = |port: u16, len: usize| {
        let mut u = vec![0u8; len];
        u[0..2].copy_from_slice(&40000u16.to_be_bytes());
        u[2..4].copy_from_slice(&port.to_be_bytes());
        u[4..6].copy_from_slice(&(len as u16).to_be_bytes());
        u
    };
    let v4 = |proto: u8, payload: &[u8]| {
        V4 {
            proto,
            ..V4::new(src, dst)
        }
        .frame(payload)
    };
    let s6 = v6("2001:db8:ff:77::2");
    let d6 = v6("2001:db8:ff::80");
    vec![
        ("tcp4 443", V4::new(src, dst).frame(&Tcp::to(443).bytes())),
        ("tcp4 25", V4::new(src, dst).frame(&Tcp::to(25).bytes())),
        ("udp4 53", v4(17, &udp(53, 40))),
        ("udp4 4789", v4(17, &udp(4789, 40))),
        ("udp4 6081", v4(17, &udp(6081, 16))),
        ("icmp4", v4(1, &[8, 0, 0, 0, 0, 1, 0, 1])),
        ("gre4", v4(47, &[0, 0, 0x08, 0, 0x45, 0, 0, 20])),
        ("tcp6 25", v6_frame(s6, d6, 6, &Tcp::to(25).bytes())),
        ("tcp6 443", v6_frame(s6, d6, 6, &Tcp::to(443).bytes())),
        ("udp6 53", v6_frame(s6, d6, 17, &udp(53, 12))),
        ("icmp6", v6_frame(s6, d6, 58, &[128, 0, 0, 0, 0, 1, 0, 1])),
        ("arp", eth(0x0806, &[0u8; 28])),
    ]
}

/// Every single-byte change, every cut and some padding of each template: the fields the fast
/// path checks (version, IHL, lengths, fragment bits, protocol, ports, data offset) all
/// pass through values on both sides of each check.
#[test]
fn plain_agrees_with_parse_flat_on_every_change_of_plain_frames() {
    let (mut taken, mut all) = (0u64, 0u64);
    for (name, frame) in templates() {
        let raw = frame[14..].to_vec();
        let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
        for (link, base) in [
            (Link::Ethernet, frame.clone()),
            (Link::RawProto(ethertype), raw.clone()),
            (Link::RawProto(0x0800), raw.clone()),
            (Link::RawProto(0x86dd), raw),
        ] {
            let mut check = |bytes: &[u8], what: &dyn Fn() -> String| {
                all += 1;
                if agrees(bytes, link, what) {
                    taken += 1;
                }
            };
            for (what, f) in changes(&base, 0) {
                check(&f, &|| format!("{name}: {what}"));
            }
        }
    }
    assert!(
        taken * 2 > all,
        "the fast path took only {taken} of {all} frames"
    );
}

/// Each change of a frame the tests make, with what it is: every byte set to values on both
/// sides of the fast path's checks (version, IHL, lengths, fragment bits, protocol, ports,
/// data offset), every cut from `shortest` bytes, and some padding.
fn changes(base: &[u8], shortest: usize) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for at in 0..base.len() {
        let b = base[at];
        for v in [
            0u8,
            1,
            2,
            0x05,
            0x06,
            0x11,
            0x12,
            0x14,
            0x20,
            0x3f,
            0x40,
            0x45,
            0x46,
            0x4f,
            0x50,
            0x60,
            0x80,
            0xff,
            b ^ 1,
            b ^ 0x10,
            b ^ 0x80,
            b.wrapping_add(1),
            b.wrapping_sub(1),
        ] {
            let mut f = base.to_vec();
            f[at] = v;
            out.push((format!("byte {at} = {v:#04x}"), f));
        }
    }
    for len in shortest..base.len() {
        out.push((format!("cut to {len}"), base[..len].to_vec()));
    }
    for pad in [1usize, 2, 6, 60] {
        let mut f = base.to_vec();
        f.extend(std::iter::repeat_n(0xa5, pad));
        out.push((format!("{pad} bytes of padding"), f));
    }
    out
}

/// The same changes of plain frames through the kernel programs (XDP and TC, which parse
/// through the fast path with the direct reads) against the model (the full parser): the
/// verdict and the counted reason agree on every frame.
#[test]
fn plain_frames_and_their_changes_get_the_models_verdict_in_the_kernel() {
    port25_tests::require_root!();
    use port25_tests::{
        fuzz::{self, RunOptions},
        fuzzgen::{Case, Truth},
    };
    let cases: Vec<Case> = templates()
        .into_iter()
        // BPF_PROG_TEST_RUN refuses a frame shorter than an Ethernet header.
        .flat_map(|(_, base)| changes(&base, 14))
        .map(|(_, bytes)| Case {
            bytes,
            link: Link::Ethernet,
            // No oracle here: the comparison with the model is the check.
            truth: Truth::KernelDrops,
            tags: vec!["plain-change"],
        })
        .collect();
    let mut f = fuzz::fixture();
    let o = RunOptions {
        frames: cases.len() as u64,
        seed: 0,
        skip: 0,
        gen: Options { ppp: PppForms::All },
        reject: false,
        keep: 10,
    };
    let st = fuzz::run_cases(&mut f, &o, |i| cases[i as usize].clone(), |_| {});
    let failures: Vec<String> = st.failures.iter().map(|x| x.describe(0)).collect();
    assert!(st.ok(), "{st}{}", failures.join("\n"));
    for (p, s) in &st.programs {
        assert!(s.block > 100 && s.pass > 100, "{p}: {s:?}\n{st}");
    }
    assert_eq!(st.programs.len(), 2, "{st}");
}
