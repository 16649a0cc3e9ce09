//! `daemon --kernel-log`: the programs' aya-log debug messages, on only when asked, and with
//! the switch off the very program the verifier saw before the log existed.

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aya::maps::ProgramArray;
use port25_common::maps::{self as m, OffenderKey};
use port25_ctl::{
    bpf::datapath::{
        self, LoadOptions, KLOG_PROGRAMS, PROG_TC, PROG_TC_RAW, PROG_TRACK_TC, PROG_TRACK_XDP,
        PROG_XDP,
    },
    bpf::livemaps::LiveMaps,
    bpf::offenders,
    bpf::pins::Pins,
    config::Config,
    control::reply::Top,
    policy::{self, Desired},
};
use port25_tests::{
    frame::*,
    kernel,
    lab::{self, Lab},
    require_root,
    table::{CONFIG, EXT, RAW_SUB, SUB, SUB6},
};

/// Loads the programs into a pin tree of their own, with the policy of the frame table and
/// offender tracking on (the default `abuse:` settings, written as the daemon writes them).
fn load(kernel_log: bool) -> (aya::Ebpf, Pins) {
    load_abuse(kernel_log, "")
}

/// As [`load`], with this `abuse:` section.
fn load_abuse(kernel_log: bool, abuse: &str) -> (aya::Ebpf, Pins) {
    port25_tests::ensure_bpffs();
    let text = format!("{CONFIG}abuse:\n{abuse}");
    let mut cfg = Config::parse(&text, Path::new("inline")).unwrap();
    cfg.pin_dir = format!("/sys/fs/bpf/{}", port25_tests::unique("p25kl")).into();
    let pins = Pins::new(&cfg.pin_dir);
    let ebpf = datapath::load_with(&cfg, &pins, LoadOptions { kernel_log }).expect("load");
    let mut live = LiveMaps::open(&pins).unwrap();
    policy::apply(&mut live, &Desired::from_config_now(&cfg)).unwrap();
    offenders::write_settings(&mut live, &cfg.abuse).unwrap();
    (ebpf, pins)
}

/// The sources offender tracking holds (IPv4 ones as 4 bytes).
fn tracked_sources(pins: &Pins) -> Vec<Vec<u8>> {
    let live = LiveMaps::open(pins).unwrap();
    offenders::read_all(&live)
        .unwrap()
        .into_iter()
        .map(|(k, _): (OffenderKey, _)| {
            if k.family == 4 {
                k.addr[..4].to_vec()
            } else {
                k.addr.to_vec()
            }
        })
        .collect()
}

fn loaded(ebpf: &aya::Ebpf, prog: &str) -> bool {
    ebpf.program(prog).unwrap().info().is_ok()
}

fn verified(ebpf: &aya::Ebpf, prog: &str) -> u32 {
    ebpf.program(prog)
        .unwrap()
        .info()
        .unwrap()
        .verified_instruction_count()
        .unwrap()
}

/// aya-log's records, as text.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<String>>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        // As the daemon writes it (`bpf::klog` names the reason, unmaps IPv4).
        let msg = port25_ctl::bpf::klog::rewrite(&r.args().to_string());
        let line = format!("{} {} {msg}", r.level(), r.target());
        self.0.lock().unwrap().push(line);
    }
    fn flush(&self) {}
}

/// With the switch off the verifier prunes the log (the entry points' counts are the plain
/// programs', and the logging programs are not even loaded); with it on, a blocked SYN gives
/// one record naming reason, addresses, port and hook, a passed segment to another port
/// none, and every program stays under the 1M-instruction limit.
#[test]
fn the_switch_is_a_load_time_constant_and_off_logs_nothing() {
    require_root!();
    let (mut off, off_pins) = load(false);
    let (mut on, on_pins) = load(true);
    for prog in [PROG_XDP, PROG_TC, PROG_TC_RAW] {
        let (a, b) = (verified(&off, prog), verified(&on, prog));
        println!("{prog}: verified {a} instructions with the kernel log off, {b} with it on");
        // On, the entry adds its tail call into the logging copy, and falls back to the
        // plain verdict when that fails: +5 on 6.18; the verifier's pruning of the direct
        // packet reads' states moves the count either way (6.1: +370 XDP, -172 TC; 6.18
        // with the parser's fast path in front: +2,934 raw TC). Never a second walk of the
        // verdict (that would be +150k raw TC, +290k XDP and TC).
        assert!(
            b.abs_diff(a) < 10_000,
            "{prog}: the switch costs the entry a branch ({a} off, {b} on)"
        );
    }
    for (_, _, prog) in KLOG_PROGRAMS {
        assert!(!loaded(&off, prog), "{prog} loaded with the log off");
        let n = verified(&on, prog);
        println!("{prog}: verified {n} instructions with the kernel log on");
        assert!(n < 1_000_000, "{prog}: {n} verified with the log on");
    }
    // The tracking programs carry no log: the same with the switch on or off.
    for prog in [PROG_TRACK_XDP, PROG_TRACK_TC] {
        let (a, b) = (verified(&off, prog), verified(&on, prog));
        println!("{prog}: verified {a} instructions with the kernel log off, {b} with it on");
        assert_eq!(a, b, "{prog}");
    }
    for (ebpf, name) in [(&off, "off"), (&on, "on")] {
        for prog in [PROG_XDP, PROG_TC] {
            let id = ebpf.program(prog).unwrap().info().unwrap().id();
            assert_eq!(
                datapath::kernel_log_of(id),
                Some(name == "on"),
                "{prog} loaded with the log {name}: its switch as status reads it"
            );
        }
    }
    let blocked = Frame::eth().ipv4(SUB, EXT).tcp(25).syn().build();
    let blocked6 = Frame::eth()
        .ipv6("2001:db8:100::2", "2001:db8:ff::80")
        .tcp(25)
        .syn()
        .build();
    let submission = Frame::eth().ipv4(SUB, EXT).tcp(587).syn().build();
    // A doubt: TCP data offset < 5 (`block_bad_tcp_header`), its port unknown.
    let doubt = Frame::eth().ipv4(SUB, EXT).tcp(25).doff(2).syn().build();
    let run_all = |ebpf: &mut aya::Ebpf| {
        for prog in [PROG_XDP, PROG_TC] {
            for f in [&blocked, &blocked6, &submission, &doubt] {
                kernel::test_run(ebpf, prog, f).unwrap();
            }
        }
    };
    let read = |ebpf: &mut aya::Ebpf| {
        let cap = Capture::default();
        let mut logger = aya_log::EbpfLogger::init_with_logger(ebpf, cap.clone()).unwrap();
        logger.flush();
        let lines = cap.0.lock().unwrap().clone();
        lines
    };
    run_all(&mut off);
    let lines = read(&mut off);
    assert!(lines.is_empty(), "switch off, yet: {lines:?}");

    run_all(&mut on);
    let lines = read(&mut on);
    println!("{lines:#?}");
    for want in [
        "DEBUG port25::kernel reason=block_port src=100.64.1.2 dst=203.0.113.80 dport=25 hook=xdp",
        "DEBUG port25::kernel reason=block_port src=100.64.1.2 dst=203.0.113.80 dport=25 hook=tc",
        "DEBUG port25::kernel reason=block_port src=2001:db8:100::2 dst=2001:db8:ff::80 dport=25 hook=xdp",
        "DEBUG port25::kernel reason=block_port src=2001:db8:100::2 dst=2001:db8:ff::80 dport=25 hook=tc",
        "DEBUG port25::kernel reason=block_bad_tcp_header src=100.64.1.2 dst=203.0.113.80 dport=0 hook=xdp",
        "DEBUG port25::kernel reason=block_bad_tcp_header src=100.64.1.2 dst=203.0.113.80 dport=0 hook=tc",
    ] {
        assert!(lines.iter().any(|l| l == want), "no {want:?} in {lines:#?}");
    }
    assert!(
        !lines.iter().any(|l| l.contains("dport=587")),
        "a passed segment to an open port is never logged: {lines:#?}"
    );
    assert_eq!(lines.len(), 6, "one record per blocked frame: {lines:#?}");
    // The message goes before the tail call into the tracker, which still runs.
    for (pins, name) in [(&off_pins, "off"), (&on_pins, "on")] {
        let sources = tracked_sources(pins);
        assert!(
            sources.contains(&SUB.to_vec()) && sources.contains(&v6(SUB6).to_vec()),
            "log {name}: the blocked sources are tracked: {sources:?}"
        );
    }
    drop((off, on));
    datapath::detach_all(&off_pins).unwrap();
    datapath::detach_all(&on_pins).unwrap();
}

const XDP_DROP: u32 = 1;
const TC_ACT_SHOT: u32 = 2;

/// A blocked segment is logged, and still dropped, whether offender tracking is off
/// (`abuse: track_sources: 0`: the tracker is tail-called and leaves its map alone) or the
/// tail call fails (no tracker in the program array); so is a doubt before the addresses
/// (never handed to the tracker), and the raw TC program's segments.
#[test]
fn blocked_segments_are_logged_with_tracking_off_and_without_the_tracker() {
    require_root!();
    let (mut ebpf, pins) = load_abuse(true, "  track_sources: 0\n");
    let blocked = Frame::eth().ipv4(SUB, EXT).tcp(25).syn().build();
    // A VLAN tag cut short: a doubt (`block_truncated`) before the addresses.
    let cut = eth(0x8100, &[0, 1]);
    let raw = Frame::raw().ipv4(RAW_SUB, EXT).tcp(25).syn().build();
    let run_all = |ebpf: &mut aya::Ebpf| {
        for prog in [PROG_XDP, PROG_TC] {
            let drop = if prog == PROG_XDP {
                XDP_DROP
            } else {
                TC_ACT_SHOT
            };
            for f in [&blocked, &cut] {
                assert_eq!(kernel::test_run(ebpf, prog, f).unwrap(), drop, "{prog}");
            }
        }
        assert_eq!(
            kernel::test_run(ebpf, PROG_TC_RAW, &raw).unwrap(),
            TC_ACT_SHOT,
            "raw"
        );
    };
    let cap = Capture::default();
    let mut logger = aya_log::EbpfLogger::init_with_logger(&mut ebpf, cap.clone()).unwrap();
    let want = [
        "DEBUG port25::kernel reason=block_port src=100.64.1.2 dst=203.0.113.80 dport=25 hook=xdp",
        "DEBUG port25::kernel reason=block_port src=100.64.1.2 dst=203.0.113.80 dport=25 hook=tc",
        "DEBUG port25::kernel reason=block_truncated hook=xdp (before the addresses)",
        "DEBUG port25::kernel reason=block_truncated hook=tc (before the addresses)",
        "DEBUG port25::kernel reason=block_port src=8.0.1.2 dst=203.0.113.80 dport=25 hook=tc_raw",
    ];
    let mut check = |when: &str, ebpf: &mut aya::Ebpf| {
        cap.0.lock().unwrap().clear();
        run_all(ebpf);
        logger.flush();
        let lines = cap.0.lock().unwrap().clone();
        for w in want {
            assert!(
                lines.iter().any(|l| l == w),
                "{when}: no {w:?} in {lines:#?}"
            );
        }
        assert_eq!(lines.len(), want.len(), "{when}: {lines:#?}");
    };
    check("tracking off", &mut ebpf);
    assert_eq!(
        tracked_sources(&pins),
        Vec::<Vec<u8>>::new(),
        "tracking off"
    );
    // No tracker to tail-call: the entry's action stands, and the message was sent already.
    for name in [m::TRACK_XDP, m::TRACK_TC] {
        let mut progs = ProgramArray::try_from(ebpf.map_mut(name).unwrap()).unwrap();
        progs.clear_index(&0).unwrap();
    }
    check("no tracker", &mut ebpf);
    // The logging daemon gone, the kernel empties its private arrays: the entry points
    // decide without the log, and still drop.
    for (name, index, _) in KLOG_PROGRAMS {
        let mut progs = ProgramArray::try_from(ebpf.map_mut(name).unwrap()).unwrap();
        progs.clear_index(&index).unwrap();
    }
    cap.0.lock().unwrap().clear();
    run_all(&mut ebpf);
    logger.flush();
    let lines = cap.0.lock().unwrap().clone();
    assert!(lines.is_empty(), "no logging copy, yet: {lines:#?}");
    drop(ebpf);
    datapath::detach_all(&pins).unwrap();
}

const XDP: &str = "  - name: rs\n    hook: xdp\n    xdp_mode: native";

fn kernel_lines(lab: &Lab) -> Vec<String> {
    lab.daemon_log()
        .lines()
        // The target, then the message (colours may sit between them).
        .filter(|l| l.contains("port25::kernel") && l.contains(" reason="))
        .map(str::to_string)
        .collect()
}

fn status_kernel_log(lab: &Lab) -> serde_json::Value {
    let out = lab.ctl(&["--json", "status"]);
    let js: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    js["kernel_log"].clone()
}

fn stop(lab: &mut Lab) {
    lab.signal_daemon(nix::sys::signal::Signal::SIGTERM);
    assert!(
        lab.wait_daemon_exit(Duration::from_secs(10)),
        "daemon exits"
    );
}

/// Through the namespace lab: a blocked SYN is named in the daemon's log (target
/// `port25::kernel`) only under `daemon --kernel-log`, `status` says which, and the next
/// daemon without the flag replaces the programs with the switch off.
#[test]
fn daemon_kernel_log_names_a_blocked_syn_only_when_asked() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.write_config("");
    let (a, a6) = (lab::v4(), lab::v6());

    lab.start_daemon();
    assert!(!lab.can_connect(a.sub, a.ext, 25), "blocked");
    assert!(lab.can_connect(a.sub, a.ext, 587), "587 passes");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        kernel_lines(&lab),
        Vec::<String>::new(),
        "no flag, no lines"
    );
    assert_eq!(status_kernel_log(&lab), false);
    stop(&mut lab);

    lab.try_start_daemon_args(&["daemon", "--kernel-log"], &[])
        .unwrap();
    assert_eq!(status_kernel_log(&lab), true);
    let human = String::from_utf8_lossy(&lab.ctl(&["status"]).stdout).to_string();
    assert!(human.contains("kernel log: on"), "{human}");
    assert!(
        !lab.can_connect(a.sub, a.ext, 25),
        "blocked with the log on"
    );
    assert!(
        !lab.can_connect(a6.sub, a6.ext, 25),
        "blocked with the log on"
    );
    assert!(
        lab.can_connect(a.sub, a.ext, 587),
        "587 passes with the log on"
    );
    let want4 = format!(
        "reason=block_port src={} dst={} dport=25 hook=xdp",
        a.sub, a.ext
    );
    let want6 = format!(
        "reason=block_port src={} dst={} dport=25 hook=xdp",
        a6.sub, a6.ext
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let lines = loop {
        let lines = kernel_lines(&lab);
        let seen = |w: &str| lines.iter().any(|l| l.contains(w));
        if (seen(&want4) && seen(&want6)) || Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for w in [&want4, &want6] {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(w.as_str()) && l.contains("DEBUG")),
            "no {w:?} among the kernel lines: {lines:#?}\n{}",
            lab.daemon_log()
        );
    }
    assert!(
        !lines.iter().any(|l| l.contains("dport=587")),
        "a passed segment to an open port is never logged: {lines:#?}"
    );
    // The message goes before the tail call into offender tracking, which still counts.
    let top: Top = lab.reply(&["top"]);
    assert!(top.tracking);
    for src in [a.sub, a6.sub] {
        let o = top.sources.iter().find(|o| o.src == src);
        assert!(
            o.is_some_and(|o| o.attempts >= 1),
            "{src} tracked with the log on: {top:?}"
        );
    }
    stop(&mut lab);

    // The next daemon without the flag loads the programs again, switch off.
    let before = kernel_lines(&lab).len();
    lab.start_daemon();
    assert_eq!(status_kernel_log(&lab), false);
    assert!(!lab.can_connect(a.sub, a.ext, 25), "blocked");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(kernel_lines(&lab).len(), before, "{}", lab.daemon_log());
}

/// After a `--kernel-log` daemon exits nothing reads or even writes the log (its private
/// program arrays are emptied), so `status` with the daemon down must not say it is on.
#[test]
fn status_with_the_logging_daemon_gone_does_not_say_the_log_is_on() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.write_config("");
    lab.try_start_daemon_args(&["daemon", "--kernel-log"], &[])
        .unwrap();
    stop(&mut lab);
    let human = String::from_utf8_lossy(&lab.ctl(&["status"]).stdout).to_string();
    assert!(!human.contains("kernel log: on"), "{human}");
    assert!(
        human.contains("kernel log: off (the programs were loaded with `daemon --kernel-log`"),
        "{human}"
    );
    // --json keeps saying what the programs were loaded with.
    assert_eq!(status_kernel_log(&lab), true);
}
