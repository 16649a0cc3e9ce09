//! Interfaces that come and go: glob entries (`g*`) over the router namespace's devices.
//! Each device is a veth pair, `gN` in the router and `hN` in the subscriber namespace, with
//! its own subscriber address 100.64.(10+N).2 routed through it to the external MX.

use std::{
    path::PathBuf,
    process::Command,
    sync::{atomic::AtomicBool, Arc},
    time::{Duration, Instant},
};

use port25_ctl::control::reply;
use port25_tests::{
    lab::{self, Lab},
    require_root,
};

const GLOB_TC: &str = "  - name: 'g*'\n    hook: tc";
const GLOB_TC_NETLINK: &str = "  - name: 'g*'\n    hook: tc\n    tc_attach: netlink";
const GLOB_XDP: &str = "  - name: 'g*'\n    hook: xdp\n    xdp_mode: generic";

fn ip(ns: &str, cmd: &str) {
    let mut c = Command::new("ip");
    c.args(["-n", ns]).args(cmd.split(' '));
    let out = c.output().expect("ip");
    assert!(
        out.status.success(),
        "ip -n {ns} {cmd}: {}",
        port25_tests::text(&out)
    );
}

/// The lab's internet side routes every subscriber address back through the router.
fn route_back(lab: &Lab) {
    ip(&lab.net, "route add 100.64.0.0/10 via 192.0.2.1");
}

/// `gN` (router) <-> `hN` (subscriber), both down, as pppd or a tun owner creates them.
fn create(lab: &Lab, n: u32) {
    ip(
        &lab.rtr,
        &format!("link add g{n} type veth peer name h{n} netns {}", lab.sub),
    );
}

/// Addresses, up, and the external MX routed through `hN` from the subscriber side.
fn bring_up(lab: &Lab, n: u32) {
    let net = 10 + n;
    ip(&lab.rtr, &format!("addr add 100.64.{net}.1/24 dev g{n}"));
    ip(&lab.rtr, &format!("link set g{n} up"));
    ip(&lab.sub, &format!("addr add 100.64.{net}.2/24 dev h{n}"));
    ip(&lab.sub, &format!("link set h{n} up"));
    ip(
        &lab.sub,
        &format!("route replace 203.0.113.80/32 via 100.64.{net}.1 dev h{n}"),
    );
}

fn src(n: u32) -> std::net::IpAddr {
    format!("100.64.{}.2", 10 + n).parse().unwrap()
}

fn pin(lab: &Lab, point: &str) -> PathBuf {
    lab.pin_dir.join("links").join(point)
}

fn pinned(lab: &Lab, point: &str) -> bool {
    std::fs::symlink_metadata(pin(lab, point)).is_ok()
}

/// How long until `cond` holds (polled tightly), or None after `timeout`.
fn wait(timeout: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if cond() {
            return Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    None
}

fn status(lab: &Lab) -> (Option<i32>, serde_json::Value) {
    let o = lab.ctl(&["--json", "status"]);
    let v = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("status: {e}: {}", port25_tests::text(&o)));
    (o.status.code(), v)
}

fn blocks_25_passes_587(lab: &Lab, n: u32, what: &str) {
    let ext = lab::v4().ext;
    assert!(lab.can_connect(src(n), ext, 587), "{what}: 587 passes");
    assert!(!lab.can_connect(src(n), ext, 25), "{what}: 25 is blocked");
}

fn come_and_go(interfaces: &str, netlink: bool) {
    let mut lab = Lab::new(interfaces);
    route_back(&lab);
    // There before the daemon: attached before its socket answers.
    create(&lab, 0);
    bring_up(&lab, 0);
    lab.start_daemon();
    assert!(pinned(&lab, "tc-ingress:g0"), "attached before the answer");
    let (code, s) = status(&lab);
    assert_eq!(code, Some(0), "{s}");
    assert_eq!(s["globs"][0]["pattern"], "g*");
    assert_eq!(s["globs"][0]["enforcing"], 1, "{s}");
    blocks_25_passes_587(&lab, 0, "g0, there at start");

    // Created while the daemon runs.
    create(&lab, 1);
    bring_up(&lab, 1);
    let took = wait(Duration::from_secs(3), || pinned(&lab, "tc-ingress:g1"));
    assert!(took.is_some(), "g1 attached: {}", lab.daemon_log());
    eprintln!("g1 attached {took:?} after it was up");
    let record = port25_ctl::bpf::tc::read_record(&pin(&lab, "tc-ingress:g1"));
    assert_eq!(
        record.is_some(),
        netlink,
        "the attachment's kind (netlink record or tcx)"
    );
    blocks_25_passes_587(&lab, 1, "g1, created later");
    let (code, s) = status(&lab);
    assert_eq!(code, Some(0), "{s}");
    assert_eq!(s["globs"][0]["enforcing"], 2, "{s}");

    // Gone: its pin is released.
    ip(&lab.rtr, "link del g1");
    assert!(
        wait(Duration::from_secs(3), || !pinned(&lab, "tc-ingress:g1")).is_some(),
        "g1's pin released: {}",
        lab.daemon_log()
    );
    let (code, s) = status(&lab);
    assert_eq!(code, Some(0), "{s}");
    assert_eq!(s["unconfigured_links"], serde_json::json!([]), "{s}");
    // Back: attached again.
    create(&lab, 1);
    bring_up(&lab, 1);
    assert!(
        wait(Duration::from_secs(3), || pinned(&lab, "tc-ingress:g1")).is_some(),
        "g1 attached again: {}",
        lab.daemon_log()
    );
    blocks_25_passes_587(&lab, 1, "g1, re-created");

    // Gone while no daemon watches: released at the next start.
    lab.kill9();
    ip(&lab.rtr, "link del g1");
    assert!(pinned(&lab, "tc-ingress:g1"));
    let (_, s) = status(&lab);
    assert_eq!(
        s["unconfigured_links"],
        serde_json::json!([]),
        "not foreign: {s}"
    );
    lab.start_daemon();
    assert!(!pinned(&lab, "tc-ingress:g1"), "released at start");
    assert!(pinned(&lab, "tc-ingress:g0"));
    // Renamed: leaves as g0, enters as g5; renamed out of the glob: released.
    ip(&lab.rtr, "link set g0 down");
    ip(&lab.rtr, "link set g0 name g5");
    assert!(
        wait(Duration::from_secs(3), || pinned(&lab, "tc-ingress:g5")
            && !pinned(&lab, "tc-ingress:g0"))
        .is_some(),
        "renamed g0 -> g5: {}",
        lab.daemon_log()
    );
    ip(&lab.rtr, "link set g5 name x5");
    assert!(
        wait(Duration::from_secs(3), || !pinned(&lab, "tc-ingress:g5")).is_some(),
        "renamed out of the glob: released"
    );
    // `detach` removes glob attachments too.
    create(&lab, 2);
    assert!(wait(Duration::from_secs(3), || pinned(&lab, "tc-ingress:g2")).is_some());
    let o = lab.ctl(&["detach"]);
    assert!(o.status.success(), "{}", port25_tests::text(&o));
    assert!(lab.wait_daemon_exit(Duration::from_secs(5)));
    assert!(!lab.pin_dir.join("links").exists() || !pinned(&lab, "tc-ingress:g2"));
}

#[test]
fn glob_tc_devices_come_and_go() {
    require_root!();
    let netlink = port25_tests::tcx_missing().is_some();
    come_and_go(GLOB_TC, netlink);
}

#[test]
fn glob_tc_netlink_devices_come_and_go() {
    require_root!();
    come_and_go(GLOB_TC_NETLINK, true);
}

/// XDP on a glob: Ethernet devices are attached; a tun device it matches cannot take XDP,
/// which fails that device only, and `status` says so with exit 3.
#[test]
fn glob_xdp_and_a_device_it_cannot_take() {
    require_root!();
    let mut lab = Lab::new(GLOB_XDP);
    route_back(&lab);
    create(&lab, 0);
    bring_up(&lab, 0);
    lab.start_daemon();
    assert!(pinned(&lab, "xdp:g0"));
    blocks_25_passes_587(&lab, 0, "XDP on g0");
    create(&lab, 1);
    bring_up(&lab, 1);
    assert!(wait(Duration::from_secs(3), || pinned(&lab, "xdp:g1")).is_some());
    blocks_25_passes_587(&lab, 1, "XDP on g1");
    ip(&lab.rtr, "tuntap add gt0 mode tun");
    std::thread::sleep(Duration::from_millis(300));
    let (code, s) = status(&lab);
    assert_eq!(code, Some(3), "a matching device not enforced: {s}");
    assert_eq!(s["globs"][0]["enforcing"], 2, "{s}");
    assert_eq!(s["globs"][0]["not_enforced"][0]["name"], "gt0", "{s}");
    assert!(lab.daemon_log().contains("XDP needs an Ethernet device"));
    // A session on it: recorded, and the answer says port 25 is open there (exit 3).
    let o = lab.ctl(&["session", "up", "dave", "100.64.0.9", "--iface", "gt0"]);
    assert_eq!(o.status.code(), Some(3), "{}", port25_tests::text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("device gt0: port 25 NOT blocked there"));
    let shown = lab.ctl(&["user", "show", "dave"]);
    assert!(
        String::from_utf8_lossy(&shown.stdout).contains("100.64.0.9"),
        "recorded"
    );
    ip(&lab.rtr, "link del gt0");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(status(&lab).0, Some(0));
}

/// The race a BRAS has: pppd creates the device down, then sets it up with its address at
/// once, and the subscriber sends from that moment. Counted on the far side: 0 SYNs to 25.
#[test]
fn zero_syns_to_25_cross_a_new_device() {
    require_root!();
    let mut lab = Lab::new(GLOB_TC);
    route_back(&lab);
    lab.start_daemon();
    let sniff = port25_tests::sniff::Sniffer::start(&lab.net, "n0");
    let mut reaction = vec![];
    for n in 1..=20 {
        let point = format!("tc-ingress:g{n}");
        // Watched from just before the creation: the daemon's reaction, `ip` included.
        let path = pin(&lab, &point);
        let watch = std::thread::spawn(move || {
            wait(Duration::from_secs(3), || {
                std::fs::symlink_metadata(&path).is_ok()
            })
        });
        create(&lab, n);
        bring_up(&lab, n);
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let probe = lab.syn_probe_counted(
            src(n),
            lab::v4().ext,
            &[25, 587],
            stop.clone(),
            done.clone(),
        );
        let took = watch.join().unwrap();
        assert!(took.is_some(), "g{n} attached: {}", lab.daemon_log());
        reaction.push(took.unwrap());
        // Rounds sent across the attach, however slow the machine (a fixed 150 ms left a
        // loaded VM with two): the far side's count of 0 SYNs to 25 then means something.
        let seen = done.load(std::sync::atomic::Ordering::Relaxed);
        let enough = wait(Duration::from_secs(5) * port25_tests::patience(), || {
            done.load(std::sync::atomic::Ordering::Relaxed) >= seen + 3
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let rounds = probe.join().unwrap();
        assert!(
            enough.is_some() && rounds > 2,
            "g{n}: the probe sent {rounds} rounds"
        );
        ip(&lab.rtr, &format!("link del g{n}"));
    }
    std::thread::sleep(Duration::from_millis(100));
    reaction.sort();
    eprintln!(
        "creation to pin seen: min {:?}, median {:?}, max {:?}",
        reaction[0],
        reaction[reaction.len() / 2],
        reaction[reaction.len() - 1]
    );
    assert!(
        sniff.syns(587) > 20,
        "the probe reached the far side on 587"
    );
    assert_eq!(sniff.syns(25), 0, "SYNs to 25 crossed a new device");
    // The control: the same on a device no glob matches, and the sniffer sees port 25 cross.
    ip(
        &lab.rtr,
        &format!("link add x30 type veth peer name h30 netns {}", lab.sub),
    );
    ip(&lab.rtr, "addr add 100.64.40.1/24 dev x30");
    ip(&lab.rtr, "link set x30 up");
    ip(&lab.sub, "addr add 100.64.40.2/24 dev h30");
    ip(&lab.sub, "link set h30 up");
    ip(
        &lab.sub,
        "route replace 203.0.113.80/32 via 100.64.40.1 dev h30",
    );
    let stop = Arc::new(AtomicBool::new(false));
    let probe = lab.syn_probe(src(30), lab::v4().ext, &[25], stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    probe.join().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        sniff.syns(25) > 0,
        "the control: SYNs to 25 seen crossing an unenforced device"
    );
}

/// `session up` names a device a glob governs that is not attached (its link was lost):
/// the answer comes once it is attached. Without `--iface`, the route to the address finds it.
#[test]
fn session_up_attaches_its_device_before_answering() {
    require_root!();
    let mut lab = Lab::new(GLOB_TC);
    route_back(&lab);
    lab.start_daemon();
    create(&lab, 1);
    bring_up(&lab, 1);
    let point = "tc-ingress:g1";
    assert!(wait(Duration::from_secs(3), || pinned(&lab, point)).is_some());
    let lose = |lab: &Lab| {
        let pins = port25_ctl::bpf::pins::Pins::new(&lab.pin_dir);
        lab::in_ns(&lab.rtr, move || {
            port25_ctl::bpf::datapath::unpin(&pins, point).unwrap()
        });
        // Without tcx the filter's removal is a TC event, and the daemon may have put it
        // back before this looks.
        assert!(port25_tests::tcx_missing().is_some() || !pinned(lab, point));
    };
    lose(&lab);
    let r: reply::SessionUp =
        lab.reply(&["session", "up", "alice", "100.64.11.2", "--iface", "g1"]);
    assert!(pinned(&lab, point), "attached when the answer arrives");
    let dev = r.device.expect("the device in the answer");
    // With a netlink filter (no tcx, Linux < 6.6), losing it is a TC event the daemon has
    // usually repaired before the session arrives (nothing left to attach); a tcx link
    // unpinned makes no event, so there the session's attach is what puts it back.
    let expected: &[String] = if port25_tests::tcx_missing().is_some() && dev.attached.is_empty() {
        &[]
    } else {
        &[point.to_string()]
    };
    assert_eq!(
        (dev.name.as_str(), dev.attached.as_slice()),
        ("g1", expected)
    );
    assert_eq!(dev.error, None);
    lose(&lab);
    let r: reply::SessionUp = lab.reply(&["session", "up", "bob", "100.64.11.9"]);
    assert!(pinned(&lab, point), "found by its route");
    assert_eq!(r.device.expect("device").name, "g1");
    // An address routed elsewhere, no glob device: no device in the answer.
    let r: reply::SessionUp = lab.reply(&["session", "up", "carol", "100.64.0.7"]);
    assert_eq!(r.device, None);
}

/// Reload: a glob added attaches the devices it matches; removed, releases them.
#[test]
fn reload_adds_and_releases_glob_devices() {
    require_root!();
    let mut lab = Lab::new("  - name: rs\n    hook: tc");
    route_back(&lab);
    create(&lab, 1);
    bring_up(&lab, 1);
    lab.start_daemon();
    assert!(!pinned(&lab, "tc-ingress:g1"));
    lab.interfaces = format!("  - name: rs\n    hook: tc\n{GLOB_XDP}");
    lab.write_config("");
    let r: reply::Reloaded = lab.reply(&["reload"]);
    assert!(pinned(&lab, "xdp:g1"), "{r:?}");
    assert!(r.attached.contains(&"xdp:g1".to_string()), "{r:?}");
    blocks_25_passes_587(&lab, 1, "after reload");
    lab.interfaces = "  - name: rs\n    hook: tc".into();
    lab.write_config("");
    let r: reply::Reloaded = lab.reply(&["reload"]);
    assert!(!pinned(&lab, "xdp:g1"), "{r:?}");
    assert!(pinned(&lab, "tc-ingress:rs"));
}

/// Link events lost (ENOBUFS) around a device deleted and created again with the same name:
/// the full pass attaches the new device, and the old device's DELLINK, read after it, must
/// not release the new device's attachment (its NEWLINK may be among the lost events, so
/// nothing would attach it again before the next reconcile).
#[test]
fn a_late_dellink_does_not_release_the_device_now_by_that_name() {
    require_root!();
    use nix::sys::signal::Signal;
    let mut lab = Lab::new(GLOB_TC);
    route_back(&lab);
    create(&lab, 1);
    bring_up(&lab, 1);
    ip(&lab.rtr, "link add x0 type veth peer name x1");
    lab.start_daemon();
    assert!(pinned(&lab, "tc-ingress:g1"));
    lab.signal_daemon(Signal::SIGSTOP);
    // More than one batch of events queued before the DELLINK, then enough to overflow the
    // daemon's socket buffer, then the new g1 (its NEWLINK lost).
    let batch = |n: usize, from: usize| {
        let cmds: String = (0..n)
            .map(|i| format!("link set x0 mtu {}\n", 1000 + (from + i) % 8000))
            .collect();
        let path = std::env::temp_dir().join(port25_tests::unique("batch"));
        std::fs::write(&path, cmds).unwrap();
        ip(&lab.rtr, &format!("-batch {}", path.display()));
        let _ = std::fs::remove_file(path);
    };
    batch(600, 0);
    ip(&lab.rtr, "link del g1");
    batch(40_000, 600);
    create(&lab, 1);
    bring_up(&lab, 1);
    lab.signal_daemon(Signal::SIGCONT);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        lab.daemon_log().contains("ENOBUFS"),
        "the events overflowed: {}",
        lab.daemon_log()
    );
    assert!(
        pinned(&lab, "tc-ingress:g1"),
        "the new g1 is attached: {}",
        lab.daemon_log()
    );
    blocks_25_passes_587(&lab, 1, "g1, re-created while events were lost");
}
