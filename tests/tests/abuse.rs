//! The abuse desk end to end: a real daemon in the namespace lab, real TCP SYNs from the
//! subscriber namespace through XDP, `top` over the CLI, and the daemon's block-event lines.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use port25_ctl::control::reply::{Offender, Top};
use port25_tests::{
    lab::{in_ns, Lab},
    require_root,
};
use socket2::{Domain, Socket, Type};

const XDP: &str = "  - name: rs\n    hook: xdp\n    xdp_mode: native";
const MALLORY: &str = "100.64.0.2";
const ALICE: &str = "100.64.0.3";

/// One SYN from `src` to each destination (the connect is abandoned once the SYN is out, so
/// nothing retransmits).
fn syns(lab: &Lab, src: &str, dsts: Vec<IpAddr>, port: u16) {
    let src: IpAddr = src.parse().unwrap();
    in_ns(&lab.sub, move || {
        for dst in dsts {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.bind(&SocketAddr::new(src, 0).into()).unwrap();
            s.set_nonblocking(true).unwrap();
            let _ = s.connect(&SocketAddr::new(dst, port).into());
            // Let the SYN leave before the socket closes.
            std::thread::sleep(Duration::from_millis(5));
        }
    });
}

fn spray(n: u8) -> Vec<IpAddr> {
    (1..=n).map(|i| IpAddr::from([203, 0, 113, i])).collect()
}

fn row<'a>(t: &'a Top, src: &str) -> &'a Offender {
    let ip: IpAddr = src.parse().unwrap();
    t.sources
        .iter()
        .find(|o| o.src == ip)
        .unwrap_or_else(|| panic!("{src} not in top: {t:?}"))
}

/// `blocked` lines of the daemon log for `user`.
fn event_lines(lab: &Lab, user: &str) -> Vec<String> {
    let want = format!("user={user} ");
    lab.daemon_log()
        .lines()
        .filter(|l| l.contains(" blocked ") && l.contains(&want))
        .map(str::to_string)
        .collect()
}

/// Waits until the daemon has logged `n` lines for `user` (or the deadline passes).
fn wait_lines(lab: &Lab, user: &str, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let lines = event_lines(lab, user);
        if lines.len() >= n || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn top_flags_the_sprayer_by_name_and_not_the_user_retrying_one_server() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.write_config("abuse:\n  event_interval: 3s\n");
    lab.start_daemon();
    for (user, addr) in [("mallory", MALLORY), ("alice", ALICE)] {
        let o = lab.ctl(&["session", "up", user, addr]);
        assert!(o.status.success(), "{}", port25_tests::text(&o));
    }
    let started = Instant::now();
    syns(&lab, MALLORY, spray(30), 25);
    // alice's mail client retries its one server.
    syns(&lab, ALICE, vec![IpAddr::from([203, 0, 113, 80]); 10], 25);
    // And submission passes, tracked nowhere.
    syns(&lab, ALICE, vec![IpAddr::from([203, 0, 113, 80]); 3], 587);
    let burst = started.elapsed();

    let top: Top = lab.reply(&["top"]);
    assert!(top.tracking);
    let m = row(&top, MALLORY);
    assert_eq!(m.user.as_deref(), Some("mallory"), "{m:?}");
    assert_eq!(m.attempts, 30, "{m:?}");
    assert!(
        (21..=39).contains(&m.destinations),
        "30 destinations estimated as {}",
        m.destinations
    );
    assert!(m.likely_infected, "more than 20 destinations: {m:?}");
    assert_eq!(m.interface, "rs");
    let a = row(&top, ALICE);
    assert_eq!(a.user.as_deref(), Some("alice"));
    assert_eq!((a.attempts, a.destinations), (10, 1), "{a:?}");
    assert!(!a.likely_infected, "one server retried 10 times: {a:?}");
    assert_eq!(a.last_destination, "203.0.113.80:25");
    assert_eq!(top.sources[0].src, m.src, "the sprayer comes first");
    assert_eq!(top.sources.len(), 2, "587 leaves no entry: {top:?}");
    let limited: Top = lab.reply(&["top", "--limit", "1"]);
    assert_eq!(limited.sources.len(), 1);
    assert_eq!(limited.tracked, 2);

    // One line per source per interval, not one per SYN.
    let lines = wait_lines(&lab, "mallory", 1);
    assert!(burst < Duration::from_secs(3), "the burst took {burst:?}");
    std::thread::sleep(Duration::from_millis(300));
    let lines_now = event_lines(&lab, "mallory");
    assert_eq!(lines_now.len(), 1, "{lines:?}");
    let l = &lines_now[0];
    for part in [
        "blocked user=mallory",
        "src=100.64.0.2",
        "dst=203.0.113.1:25",
        "iface=rs",
        "attempts=1",
        "destinations=1",
    ] {
        assert!(l.contains(part), "{part:?} not in {l}");
    }
    assert_eq!(event_lines(&lab, "alice").len(), 1);
    // The next interval: one more line, carrying the counts so far.
    std::thread::sleep(Duration::from_millis(3500).saturating_sub(started.elapsed()));
    syns(&lab, MALLORY, spray(5), 25);
    let lines = wait_lines(&lab, "mallory", 2);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[1].contains("attempts=31"), "{}", lines[1]);
}

#[test]
fn an_address_nobody_holds_is_listed_as_such_and_tracking_off_says_so() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.start_daemon();
    syns(&lab, MALLORY, spray(3), 25);
    let top: Top = lab.reply(&["top"]);
    let m = row(&top, MALLORY);
    assert_eq!((m.user.as_deref(), m.hold), (None, false));
    assert_eq!(
        wait_lines(&lab, "-", 1).len(),
        1,
        "user=- when nobody holds it"
    );

    let mut off = Lab::new(XDP);
    off.write_config("abuse:\n  track_sources: 0\n");
    off.start_daemon();
    syns(&off, MALLORY, spray(3), 25);
    let top: Top = off.reply(&["top"]);
    assert!(!top.tracking);
    assert!(top.sources.is_empty(), "{top:?}");
    let text = off.ctl(&["top"]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("offender tracking is off"),
        "{}",
        port25_tests::text(&text)
    );
    assert!(event_lines(&off, "-").is_empty());
}

fn block_port_count(lab: &Lab) -> u64 {
    let st = lab.ctl(&["status", "--json"]);
    let js: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    js["counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c[0] == "block_port")
        .and_then(|c| c[1].as_u64())
        .unwrap_or_else(|| panic!("no block_port counter: {js}"))
}

/// A pin tree written before offender tracking existed lacks the abuse maps: the next start
/// creates them beside the old maps, which it keeps (no migration, counters go on), and
/// no SYN to port 25 crosses meanwhile.
#[test]
fn an_older_pin_tree_gets_the_abuse_maps_without_a_migration() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.start_daemon();
    syns(&lab, MALLORY, spray(4), 25);
    let before = block_port_count(&lab);
    assert!(before >= 4, "{before}");
    lab.kill9();
    for name in [
        "P25_OFFENDERS",
        "P25_ABUSE",
        "P25_EVENTS",
        "P25_TRACK_XDP",
        "P25_TRACK_TC",
    ] {
        std::fs::remove_file(lab.pin_dir.join("maps").join(name)).unwrap();
    }
    let (to25, to587) = lab.start_daemon_under_syn_stream();
    assert!(to587 > 0, "the sniffer sees the control SYNs");
    assert_eq!(
        to25, 0,
        "no SYN to port 25 crossed while the maps were added"
    );
    let log = lab.daemon_log();
    assert!(!log.contains("migrat"), "{log}");
    assert!(
        block_port_count(&lab) >= before,
        "the counters are the old ones"
    );
    for name in ["P25_OFFENDERS", "P25_EVENTS", "P25_TRACK_XDP"] {
        assert!(lab.pin_dir.join("maps").join(name).exists(), "{name}");
    }
    syns(&lab, ALICE, spray(2), 25);
    let top: Top = lab.reply(&["top"]);
    assert_eq!(row(&top, ALICE).attempts, 2, "{top:?}");
}

/// Tracking switched on by a reload (`track_sources` 0 -> 1, the one change that keeps the
/// offender map's size): the entry points, which skip the tracking program while it is off,
/// read the switch per segment, so the next SYN is tracked without a restart.
#[test]
fn tracking_switched_on_by_a_reload_tracks_the_next_syn() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.write_config("abuse:\n  track_sources: 0\n");
    lab.start_daemon();
    syns(&lab, MALLORY, spray(2), 25);
    let top: Top = lab.reply(&["top"]);
    assert!(!top.tracking && top.sources.is_empty(), "{top:?}");
    lab.write_config("abuse:\n  track_sources: 1\n");
    let out = lab.ctl(&["reload"]);
    assert!(out.status.success(), "{}", port25_tests::text(&out));
    syns(&lab, MALLORY, spray(3), 25);
    let top: Top = lab.reply(&["top"]);
    assert!(top.tracking, "{top:?}");
    assert!(row(&top, MALLORY).attempts >= 1, "{top:?}");
}
