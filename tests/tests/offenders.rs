//! Offender tracking and block events in the real kernel (BPF_PROG_TEST_RUN): what one
//! blocked source leaves in the LRU map and the event ring, what passed packets leave (no
//! entry), and tracking off (the kernel leaves the map alone).

use std::{path::Path, time::Duration};

use aya::maps::{MapData, RingBuf};
use port25_common::{
    maps::{BlockEvent, Offender, OffenderKey},
    Reason,
};
use port25_ctl::{
    bpf::{
        datapath::{self, PROG_TC, PROG_XDP},
        livemaps::LiveMaps,
        offenders::{self, estimate},
        pins::Pins,
    },
    config::Config,
    policy::{self, Desired},
};
use port25_tests::{
    frame::*,
    kernel, require_root,
    table::{CONFIG, SUB, SUB6},
};

struct Fixture {
    ebpf: aya::Ebpf,
    live: LiveMaps,
    events: RingBuf<MapData>,
    pins: Pins,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = datapath::detach_all(&self.pins);
    }
}

/// The table's policy with this `abuse:` section, loaded and applied; tracking settings
/// written as the daemon writes them.
fn fixture(abuse: &str) -> Fixture {
    port25_tests::ensure_bpffs();
    let text = format!("{CONFIG}abuse:\n{abuse}");
    let mut cfg = Config::parse(&text, Path::new("inline")).unwrap();
    cfg.pin_dir = format!("/sys/fs/bpf/{}", port25_tests::unique("p25o")).into();
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
    policy::apply(&mut live, &Desired::from_config_now(&cfg)).unwrap();
    offenders::write_settings(&mut live, &cfg.abuse).unwrap();
    let events = live.events.take().expect("the event ring is pinned").0;
    Fixture {
        ebpf,
        live,
        events,
        pins,
    }
}

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

fn run(f: &mut Fixture, prog: &str, frame: &[u8]) -> u32 {
    kernel::test_run(&mut f.ebpf, prog, frame).expect("test run")
}

fn entries(f: &Fixture) -> Vec<(OffenderKey, Offender)> {
    offenders::read_all(&f.live).unwrap()
}

fn key4(a: [u8; 4]) -> OffenderKey {
    let mut addr = [0; 16];
    addr[..4].copy_from_slice(&a);
    OffenderKey { family: 4, addr }
}

fn entry(f: &Fixture, k: OffenderKey) -> Offender {
    entries(f)
        .into_iter()
        .find(|(e, _)| *e == k)
        .unwrap_or_else(|| panic!("no entry for {k:?}"))
        .1
}

fn drain(f: &mut Fixture) -> Vec<BlockEvent> {
    let mut out = Vec::new();
    while let Some(item) = f.events.next() {
        out.push(offenders::parse_event(&item).expect("an event record"));
    }
    out
}

fn dst(i: u8) -> [u8; 4] {
    [203, 0, 113, i]
}

/// The documented bound of the distinct-destination estimate (linear counting on 64 bits:
/// standard error ~10% at 30): within 30%.
fn within_bound(est: u64, n: u64) -> bool {
    est * 10 >= n * 7 && est * 10 <= n * 13
}

#[test]
fn thirty_destinations_make_one_entry_with_the_figures() {
    require_root!();
    let mut f = fixture("  event_interval: 10s\n");
    for i in 1..=30 {
        let frame = Frame::eth().ipv4(SUB, dst(i)).tcp(25).syn().build();
        assert_eq!(run(&mut f, PROG_XDP, &frame), XDP_DROP);
    }
    // Not an attempt (no SYN), still a blocked segment.
    let ack = Frame::eth().ipv4(SUB, dst(30)).tcp(25).flags(0x10).build();
    assert_eq!(run(&mut f, PROG_XDP, &ack), XDP_DROP);
    let all = entries(&f);
    assert_eq!(all.len(), 1, "one source, one entry: {all:?}");
    let (k, e) = all[0];
    assert_eq!(k, key4(SUB));
    assert_eq!(e.attempts, 30);
    assert_eq!(e.segments, 31);
    let est = estimate(e.dests);
    assert!(within_bound(est, 30), "estimate {est} for 30 destinations");
    assert_eq!(&e.last_dst[..4], &dst(30));
    assert_eq!(e.last_dport, 25);
    assert_eq!(e.last_reason, Reason::BlockPort as u8);
    // BPF_PROG_TEST_RUN runs on the loopback device.
    assert_eq!(e.ifindex, 1);
    assert!(e.first_ns > 0 && e.first_ns <= e.last_ns);
    // A burst within the interval: one event, sent on the first segment.
    let ev = drain(&mut f);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0].key, key4(SUB));
    assert_eq!(&ev[0].dst[..4], &dst(1));
    assert_eq!((ev[0].dport, ev[0].attempts), (25, 1));
}

#[test]
fn passed_packets_leave_no_entry() {
    require_root!();
    let mut f = fixture("  track_sources: 1024\n");
    let passes = [
        // Submission.
        Frame::eth().ipv4(SUB, dst(1)).tcp(587).syn().build(),
        // Exempt source (config exempt 100.64.9.9/32).
        Frame::eth()
            .ipv4([100, 64, 9, 9], dst(1))
            .tcp(25)
            .syn()
            .build(),
        // The ISP's mail server.
        Frame::eth()
            .ipv4(SUB, [198, 51, 100, 25])
            .tcp(25)
            .syn()
            .build(),
        // Not a subscriber.
        Frame::eth()
            .ipv4([10, 0, 0, 1], dst(1))
            .tcp(25)
            .syn()
            .build(),
    ];
    for frame in &passes {
        assert_eq!(run(&mut f, PROG_XDP, frame), XDP_PASS);
    }
    assert_eq!(entries(&f), vec![]);
    assert!(drain(&mut f).is_empty());
}

#[test]
fn tracking_off_leaves_the_map_alone() {
    require_root!();
    let mut f = fixture("  track_sources: 0\n");
    for i in 1..=5 {
        let frame = Frame::eth().ipv4(SUB, dst(i)).tcp(25).syn().build();
        assert_eq!(run(&mut f, PROG_XDP, &frame), XDP_DROP);
    }
    assert_eq!(entries(&f), vec![]);
    assert!(drain(&mut f).is_empty());
}

#[test]
fn one_event_per_source_per_interval() {
    require_root!();
    let mut f = fixture("  event_interval: 1s\n");
    let frame = Frame::eth().ipv4(SUB, dst(7)).tcp(25).syn().build();
    for _ in 0..200 {
        run(&mut f, PROG_XDP, &frame);
    }
    assert_eq!(drain(&mut f).len(), 1);
    std::thread::sleep(Duration::from_millis(1100));
    for _ in 0..200 {
        run(&mut f, PROG_XDP, &frame);
    }
    let ev = drain(&mut f);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0].attempts, 201);
    // Another source has its own interval.
    let other = Frame::eth()
        .ipv4([100, 64, 1, 3], dst(7))
        .tcp(25)
        .syn()
        .build();
    run(&mut f, PROG_XDP, &other);
    assert_eq!(drain(&mut f).len(), 1);
}

#[test]
fn doubts_from_an_enforced_source_and_ipv6_are_tracked() {
    require_root!();
    let mut f = fixture("  event_interval: 10s\n");
    // A non-first fragment: the ports are hidden, the source is known and enforced.
    let frag = Frame::eth()
        .ipv4(SUB, dst(9))
        .tcp(25)
        .v4_with(|v| v.frag = 100)
        .build();
    assert_eq!(run(&mut f, PROG_TC, &frag), 2 /* TC_ACT_SHOT */);
    let e = entry(&f, key4(SUB));
    assert_eq!(e.last_reason, Reason::BlockFragment as u8);
    assert_eq!((e.attempts, e.segments), (0, 1));
    let frame6 = Frame::eth()
        .ipv6(SUB6, "2001:db8:ff::80")
        .tcp(25)
        .syn()
        .build();
    assert_eq!(run(&mut f, PROG_XDP, &frame6), XDP_DROP);
    let k6 = OffenderKey {
        family: 6,
        addr: v6(SUB6),
    };
    let e6 = entry(&f, k6);
    assert_eq!((e6.attempts, e6.last_dst), (1, v6("2001:db8:ff::80")));
}

#[test]
fn counters_roll_over_after_the_window() {
    require_root!();
    let mut f = fixture("  flag_window: 1s\n");
    for i in 1..=5 {
        let frame = Frame::eth().ipv4(SUB, dst(i)).tcp(25).syn().build();
        run(&mut f, PROG_XDP, &frame);
    }
    std::thread::sleep(Duration::from_millis(1100));
    let frame = Frame::eth().ipv4(SUB, dst(1)).tcp(25).syn().build();
    run(&mut f, PROG_XDP, &frame);
    let e = entry(&f, key4(SUB));
    assert_eq!((e.attempts, e.prev_attempts), (1, 5));
    assert_eq!(e.dests.count_ones(), 1);
    assert!(e.first_ns < e.window_ns);
}

/// The entry points skip the hand-over and the tail call when tracking is off: the action
/// must be the one the tracking program gives back when it is on, for a dropped segment
/// and for one answered with a RST (`action: reject`: XDP_TX, TC_ACT_REDIRECT, the same
/// answer frame); and tracking switched on in the settings map (a reload, or `abuse:`
/// edited) is seen by the very next segment.
#[test]
fn tracking_off_and_on_give_the_same_action_and_on_takes_effect_at_once() {
    require_root!();
    const XDP_TX: u32 = 3;
    const TC_ACT_SHOT: u32 = 2;
    const TC_ACT_REDIRECT: u32 = 7;
    let mut f = fixture("  track_sources: 1024\n");
    let on = f.live.abuse.as_ref().unwrap().get(&0, 0).unwrap();
    assert_eq!(on.track, 1);
    let set_track = |f: &mut Fixture, track: u32| {
        let abuse = f.live.abuse.as_mut().unwrap();
        abuse
            .set(0, port25_common::maps::AbuseSettings { track, ..on }, 0)
            .unwrap();
    };
    let set_reject = |f: &mut Fixture, reject: bool| {
        let mut s = f.live.settings.get(&0, 0).unwrap();
        s.flags &= !port25_common::maps::FLAG_REJECT;
        if reject {
            s.flags |= port25_common::maps::FLAG_REJECT;
        }
        f.live.settings.set(0, s, 0).unwrap();
    };
    let syn = |i: u8| Frame::eth().ipv4(SUB, dst(i)).tcp(25).syn().build();
    let out = |f: &mut Fixture, prog: &str, frame: &[u8]| {
        let opts = kernel::RunOptions {
            data_out: true,
            repeat: 0,
        };
        let r = kernel::run(&mut f.ebpf, prog, frame, opts).expect("test run");
        (r.ret, r.out)
    };
    let mut seen = Vec::new();
    for reject in [false, true] {
        set_reject(&mut f, reject);
        for (prog, blocked) in [
            (PROG_XDP, if reject { XDP_TX } else { XDP_DROP }),
            (PROG_TC, if reject { TC_ACT_REDIRECT } else { TC_ACT_SHOT }),
        ] {
            let frame = syn(1);
            set_track(&mut f, 0);
            let off = out(&mut f, prog, &frame);
            set_track(&mut f, 1);
            let tracked = out(&mut f, prog, &frame);
            assert_eq!(off.0, blocked, "{prog} reject={reject}: tracking off");
            assert_eq!(
                tracked, off,
                "{prog} reject={reject}: the same with tracking on"
            );
            seen.push((prog, reject, off.0));
        }
    }
    // Off: nothing tracked; switched on: the next segment is.
    set_reject(&mut f, false);
    offenders_cleared(&mut f);
    set_track(&mut f, 0);
    assert_eq!(run(&mut f, PROG_XDP, &syn(2)), XDP_DROP);
    assert_eq!(entries(&f), vec![], "tracking off: {seen:?}");
    set_track(&mut f, 1);
    assert_eq!(run(&mut f, PROG_XDP, &syn(3)), XDP_DROP);
    let e = entry(&f, key4(SUB));
    assert_eq!((e.attempts, &e.last_dst[..4]), (1, &dst(3)[..]));
}

/// Empties the offender map (the segments before were tracked) and the event ring.
fn offenders_cleared(f: &mut Fixture) {
    let keys: Vec<OffenderKey> = entries(f).into_iter().map(|(k, _)| k).collect();
    let m = &mut f.live.offenders.as_mut().unwrap().0;
    for k in keys {
        m.remove(&k).unwrap();
    }
    drain(f);
}
