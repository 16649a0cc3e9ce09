//! The abuse desk's automatic part end to end (issue 10, parts 3 and 5): a real daemon in
//! the namespace lab under `abuse.auto_hold` and `abuse.notify_command`, real SYNs from the
//! subscriber namespace through XDP.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use port25_ctl::control::reply::{AuditLog, UserDetail};
use port25_tests::{
    lab::{self, in_ns, Lab},
    require_root, text,
};
use socket2::{Domain, Socket, Type};

const XDP: &str = "  - name: rs\n    hook: xdp\n    xdp_mode: native";
const MALLORY: &str = "100.64.0.2";
const ALICE: &str = "100.64.0.3";

/// SYNs from `src`, each abandoned once it is out (nothing retransmits).
fn syns(lab: &Lab, src: &str, dsts: Vec<IpAddr>) {
    let src: IpAddr = src.parse().unwrap();
    in_ns(&lab.sub, move || {
        for dst in dsts {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.bind(&SocketAddr::new(src, 0).into()).unwrap();
            s.set_nonblocking(true).unwrap();
            let _ = s.connect(&SocketAddr::new(dst, 25).into());
            std::thread::sleep(Duration::from_micros(500));
        }
    });
}

/// `rounds` SYNs to each of `n` destinations.
fn spray(n: u8, rounds: usize) -> Vec<IpAddr> {
    let one: Vec<IpAddr> = (1..=n).map(|i| IpAddr::from([203, 0, 113, i])).collect();
    one.iter()
        .copied()
        .cycle()
        .take(n as usize * rounds)
        .collect()
}

/// A notify program that appends its arguments, `|`-separated, one run a line, to `out`.
fn notify_script(dir: &Path) -> (PathBuf, PathBuf) {
    let out = dir.join("notified.txt");
    let prog = dir.join("notify.sh");
    std::fs::write(
        &prog,
        format!(
            "#!/bin/sh\nfor a in \"$@\"; do printf '%s|' \"$a\" >> {out}; done\necho >> {out}\necho \"told the abuse desk about $3\"\n",
            out = out.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
    (prog, out)
}

fn runs(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn show(lab: &Lab, user: &str) -> UserDetail {
    lab.reply(&["user", "show", user])
}

fn wait_for<T>(what: &str, lab: &Lab, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {secs}s\n{}",
            lab.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The samples of `/metrics` (default listen address, in the router's namespace).
fn metrics(lab: &Lab) -> String {
    in_ns(&lab.rtr, || {
        let mut s = TcpStream::connect("127.0.0.1:9725").unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        raw
    })
}

fn sample(m: &str, name: &str) -> f64 {
    m.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{m}"))
}

#[test]
fn a_sprayer_is_held_and_notified_once_and_the_user_retrying_one_server_is_not() {
    require_root!();
    let mut lab = Lab::new(XDP);
    let (prog, out) = notify_script(&lab.dir);
    lab.write_config(&format!(
        "abuse:\n  auto_hold: true\n  scan_interval: 1s\n  event_interval: 1s\n  \
         notify_command: [{}, --desk, noc]\n  notify_interval: 1h\n",
        prog.display()
    ));
    lab.start_daemon();
    for (user, addr) in [("mallory", MALLORY), ("alice", ALICE)] {
        let o = lab.ctl(&["session", "up", user, addr]);
        assert!(o.status.success(), "{}", text(&o));
    }
    assert!(show(&lab, "mallory").user.hold.is_none());
    // alice's mail client retries its one server; mallory's bot sprays 1,000 SYNs at 200.
    syns(&lab, ALICE, vec![IpAddr::from([203, 0, 113, 80]); 5]);
    syns(&lab, MALLORY, spray(200, 5));

    let hold = wait_for("mallory held", &lab, 10, || show(&lab, "mallory").user.hold);
    assert!(hold.by.contains("auto_hold"), "{hold:?}");
    for part in [
        "attempts",
        "distinct destinations",
        MALLORY,
        "600s",
        "session mallory@",
    ] {
        assert!(
            hold.reason.contains(part),
            "{part:?} not in {:?}",
            hold.reason
        );
    }
    // The figures that triggered it: over the rule (more than 100 attempts or 20
    // destinations), and no more than the bot sent.
    let attempts: u64 = hold
        .reason
        .split("likely infected: ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no attempts figure in {:?}", hold.reason));
    assert!(attempts <= 1000, "{}", hold.reason);
    let log: AuditLog = lab.reply(&["audit", "--user", "mallory"]);
    let holds: Vec<_> = log.records.iter().filter(|r| r.action == "hold").collect();
    assert_eq!(holds.len(), 1, "{log:?}");
    assert!(
        holds[0].actor.contains("port25-ctl daemon (auto_hold)"),
        "{:?}",
        holds[0]
    );
    assert_eq!(holds[0].reason.as_deref(), Some(hold.reason.as_str()));

    // What the Dovecot hook runs at a POP login is refused, and port 25 stays closed.
    let err = lab.fails_with(&["unblock", "mallory", "--for", "90m"], 1);
    assert!(err.contains("abuse hold"), "{err}");
    assert!(
        !lab.can_connect(MALLORY.parse().unwrap(), lab::v4().ext, 25),
        "a real connection to :25 crossed"
    );
    assert!(
        show(&lab, "alice").user.hold.is_none(),
        "alice retried one server"
    );

    // The notify program ran once, for mallory, with the documented arguments.
    let lines = wait_for("notify_command ran", &lab, 10, || {
        let r = runs(&out);
        (!r.is_empty()).then_some(r)
    });
    assert_eq!(lines.len(), 1, "{lines:?}");
    let args: Vec<&str> = lines[0].trim_end_matches('|').split('|').collect();
    assert_eq!(args.len(), 7, "{args:?}");
    assert_eq!(
        &args[..4],
        &["--desk", "noc", "mallory", MALLORY],
        "{args:?}"
    );
    let (a, d): (u64, u64) = (args[4].parse().unwrap(), args[5].parse().unwrap());
    assert!(a > 100 || d > 20, "figures over the rule: {args:?}");
    assert_eq!(args[6], "yes", "held when notified: {args:?}");
    let log = wait_for("notify output in the log", &lab, 5, || {
        let l = lab.daemon_log();
        l.contains("told the abuse desk about mallory").then_some(l)
    });
    assert!(log.contains("notify_command ran"), "{log}");

    // Still flagged and still spraying: no second hold, and no second run within
    // notify_interval, even with every decision forgotten (a reload).
    let o = lab.ctl(&["reload"]);
    assert!(o.status.success(), "{}", text(&o));
    syns(&lab, MALLORY, spray(50, 1));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(runs(&out).len(), 1, "{:?}", runs(&out));
    let log: AuditLog = lab.reply(&["audit", "--user", "mallory"]);
    assert_eq!(
        log.records.iter().filter(|r| r.action == "hold").count(),
        1,
        "{log:?}"
    );
    assert!(runs(&out).iter().all(|l| !l.contains("alice")));

    let m = metrics(&lab);
    assert_eq!(sample(&m, "port25_auto_holds_total"), 1.0, "{m}");
    assert_eq!(sample(&m, "port25_likely_infected_sources"), 1.0, "{m}");
    assert!(
        m.contains("port25_notify_runs_total{result=\"ok\"} 1"),
        "{m}"
    );
}

#[test]
fn a_flagged_source_nobody_holds_is_logged_once_and_held_by_nobody() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.write_config("abuse:\n  auto_hold: true\n  scan_interval: 1s\n");
    lab.start_daemon();
    syns(&lab, MALLORY, spray(40, 1));
    std::thread::sleep(Duration::from_secs(4));
    let log = lab.daemon_log();
    let lines: Vec<_> = log
        .lines()
        .filter(|l| l.contains("no live session or binding holds"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains(MALLORY), "{}", lines[0]);
    assert!(!log.contains("put on an abuse hold"), "{log}");
}

/// A dynamic address handed on: the sprayer's counts stay in the kernel's entry for the
/// address, and they are not the next subscriber's.
#[test]
fn the_next_holder_of_a_sprayers_address_is_not_held_on_its_counts() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.write_config("abuse:\n  auto_hold: true\n  scan_interval: 1s\n");
    lab.start_daemon();
    syns(&lab, MALLORY, spray(40, 1));
    std::thread::sleep(Duration::from_millis(1500));
    let o = lab.ctl(&["session", "up", "bob", MALLORY]);
    assert!(o.status.success(), "{}", text(&o));
    // A reload forgets what was decided about the source ("nobody holds it"), so the next
    // scan looks at it again, now with bob holding it.
    let o = lab.ctl(&["reload"]);
    assert!(o.status.success(), "{}", text(&o));
    syns(&lab, MALLORY, spray(1, 1));
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        show(&lab, "bob").user.hold.is_none(),
        "{}",
        lab.daemon_log()
    );
}

/// Sends `frame` out of `dev` in namespace `ns` from an AF_PACKET socket (past the qdisc),
/// paced to `pps`, until `stop`; returns the frames sent.
fn flood(
    ns: &str,
    dev: &'static str,
    frame: Vec<u8>,
    pps: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        // SAFETY: plain socket(2), checked.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        assert!(raw >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor, owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let one: libc::c_int = 1;
        // SAFETY: an int option of its size. PACKET_QDISC_BYPASS: straight to the driver.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                &one as *const _ as *const libc::c_void,
                size_of::<libc::c_int>() as u32,
            )
        };
        // SAFETY: sockaddr_ll is plain data.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = nix::net::if_::if_nametoindex(dev).unwrap() as i32;
        sll.sll_halen = 6;
        let start = Instant::now();
        let mut sent = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            for _ in 0..100 {
                // SAFETY: frame and sll are valid for the lengths given.
                let n = unsafe {
                    libc::sendto(
                        fd.as_raw_fd(),
                        frame.as_ptr() as *const libc::c_void,
                        frame.len(),
                        0,
                        &sll as *const _ as *const libc::sockaddr,
                        size_of::<libc::sockaddr_ll>() as u32,
                    )
                };
                if n > 0 {
                    sent += 1;
                }
            }
            // Paced: ahead of the rate, wait for it.
            let due = Duration::from_secs_f64(sent as f64 / pps as f64);
            if let Some(ahead) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
        sent
    })
}

/// The daemon's CPU time so far (all its threads): utime + stime from /proc.
fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command (which may hold spaces) end with ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest.split(' ').map(|x| x.parse().unwrap_or(0)).collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    let ticks = f[11] + f[12];
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_secs_f64(ticks as f64 / hz as f64)
}

fn block_port(lab: &Lab) -> u64 {
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

fn event_lines(lab: &Lab) -> usize {
    lab.daemon_log()
        .lines()
        .filter(|l| l.contains(" blocked ") && l.contains("src=100.64.0.2 "))
        .count()
}

/// Issue 10: at 50,000 blocked SYN/s from one source, the daemon's CPU stays under 5% and
/// the block events stay within the configured rate (one per source per event_interval).
/// The rate is read from the kernel's own counter, not assumed from the sender.
#[test]
fn a_syn_flood_costs_the_daemon_little_and_events_keep_their_rate() {
    require_root!();
    const PPS: u64 = 50_000;
    const WINDOW: Duration = Duration::from_secs(10);
    let mut lab = Lab::new(XDP);
    lab.write_config("abuse:\n  auto_hold: true\n  event_interval: 1s\n  scan_interval: 2s\n");
    lab.start_daemon();
    let o = lab.ctl(&["session", "up", "mallory", MALLORY]);
    assert!(o.status.success(), "{}", text(&o));
    let pid = lab
        .client()
        .call(port25_ctl::control::proto::Info)
        .unwrap()
        .pid;
    let frame = port25_tests::frame::Frame::eth()
        .ipv4([100, 64, 0, 2], [203, 0, 113, 80])
        .tcp(25)
        .syn()
        .build();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = flood(&lab.sub, "s0", frame, PPS, stop.clone());
    // Warm-up: the first event, the hold, the first scan.
    std::thread::sleep(Duration::from_secs(2));
    let (c0, cpu0, ev0, t0) = (
        block_port(&lab),
        cpu(pid),
        event_lines(&lab),
        Instant::now(),
    );
    std::thread::sleep(WINDOW);
    let (c1, cpu1, ev1, t1) = (
        block_port(&lab),
        cpu(pid),
        event_lines(&lab),
        Instant::now(),
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = sender.join().unwrap();
    let secs = (t1 - t0).as_secs_f64();
    let rate = (c1 - c0) as f64 / secs;
    let share = (cpu1 - cpu0).as_secs_f64() / secs;
    let events = ev1 - ev0;
    eprintln!(
        "blocked {rate:.0}/s by the kernel's counter ({sent} frames sent in all); daemon CPU \
         {:.2}% ({:?} in {secs:.1}s); {events} block events",
        share * 100.0,
        cpu1 - cpu0
    );
    assert!(
        rate >= 0.9 * PPS as f64,
        "the load was not reached: {rate:.0} blocked SYN/s"
    );
    assert!(
        share < 0.05,
        "daemon CPU {:.2}% at {rate:.0} SYN/s",
        share * 100.0
    );
    // One per second, the window's edges give one more.
    let most = secs.ceil() as usize + 1;
    assert!(
        (secs as usize - 1..=most).contains(&events),
        "{events} events in {secs:.1}s at event_interval 1s"
    );
    assert!(
        show(&lab, "mallory").user.hold.is_some(),
        "{}",
        lab.daemon_log()
    );
}

/// Sends each frame once out of `s0` from an AF_PACKET socket (any source address).
fn frames_out(lab: &Lab, frames: Vec<Vec<u8>>) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let path = format!("/run/netns/{}", lab.sub);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        // SAFETY: plain socket(2), checked.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        assert!(raw >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor, owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is plain data.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = nix::net::if_::if_nametoindex("s0").unwrap() as i32;
        sll.sll_halen = 6;
        for (i, f) in frames.iter().enumerate() {
            // SAFETY: f and sll are valid for the lengths given.
            let n = unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    f.as_ptr() as *const libc::c_void,
                    f.len(),
                    0,
                    &sll as *const _ as *const libc::sockaddr,
                    size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(n as usize, f.len(), "{}", std::io::Error::last_os_error());
            // Paced (about 50,000/s): a burst would overrun the veth's queue.
            if i % 50 == 49 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    })
    .join()
    .unwrap();
}

/// Review 4 (known gap, not fixed): the kernel tracks each /128 on its own and the rule is
/// applied per address, so a bot spraying from a new address of its session's /64 for each
/// SYN (1,000 attempts at 1,000 destinations) is never flagged, and its entries push other
/// sources out of the LRU map. Ignored until the figures are summed per holder (or /64).
#[test]
#[ignore = "known gap: the likely-infected rule is per /128"]
fn a_sprayer_rotating_through_its_64_is_held() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.write_config("abuse:\n  auto_hold: true\n  scan_interval: 1s\n  event_interval: 1s\n");
    lab.start_daemon();
    let o = lab.ctl(&["session", "up", "mallory", "2001:db8:100::/64"]);
    assert!(o.status.success(), "{}", text(&o));
    let frames = (0..1000u32)
        .map(|i| {
            port25_tests::frame::Frame::eth()
                .ipv6(
                    &format!("2001:db8:100::{:x}:{:x}", 0x100 + i / 256, i % 256),
                    &format!("2001:db8:ff::{:x}", 0x100 + i),
                )
                .tcp(25)
                .syn()
                .build()
        })
        .collect();
    frames_out(&lab, frames);
    let m = wait_for("blocked", &lab, 5, || {
        let m = metrics(&lab);
        m.contains("port25_likely_infected_sources").then_some(m)
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(block_port(&lab) >= 1000, "the SYNs were blocked as :25");
    assert!(
        show(&lab, "mallory").user.hold.is_some(),
        "1,000 SYNs to 1,000 destinations from one /64, not held: {m}\n{}",
        lab.daemon_log()
    );
}

/// Review 4: one subscriber flagging a source per address of its /64 (60,000 of them, two
/// SYNs each under `flag_attempts: 1`; the default rule takes 21 destinations each) must not
/// stall the daemon's loop: the BNG hook's `session up` for another subscriber still answers
/// promptly. Before the per-second budget of looks it waited 12.7 s.
#[test]
fn many_flagged_sources_of_one_subscriber_do_not_stall_session_up() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.write_config(
        "abuse:\n  auto_hold: true\n  scan_interval: 2s\n  event_interval: 1s\n  flag_attempts: 1\n",
    );
    lab.start_daemon();
    let o = lab.ctl(&["session", "up", "mallory", "2001:db8:100::/64"]);
    assert!(o.status.success(), "{}", text(&o));
    let n: u32 = 60_000;
    let frames = (0..2 * n)
        .map(|j| {
            let i = j % n;
            port25_tests::frame::Frame::eth()
                .ipv6(
                    &format!("2001:db8:100::{:x}:{:x}", 0x100 + i / 65536, i % 65536),
                    "2001:db8:ff::80",
                )
                .tcp(25)
                .syn()
                .build()
        })
        .collect();
    frames_out(&lab, frames);
    let t0 = Instant::now();
    let mut worst = Duration::ZERO;
    let mut k = 0;
    while t0.elapsed() < Duration::from_secs(15) {
        let s = Instant::now();
        let o = lab.ctl(&[
            "session",
            "up",
            &format!("u{k}"),
            &format!("100.64.0.{}", 10 + k),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        worst = worst.max(s.elapsed());
        k += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    let m = metrics(&lab);
    assert!(
        sample(&m, "port25_likely_infected_sources") > 10_000.0,
        "the spray flagged its sources: {m}"
    );
    assert!(show(&lab, "mallory").user.hold.is_some(), "mallory held");
    assert!(
        worst < Duration::from_secs(2),
        "a session up took {worst:?} while {} sources were flagged",
        sample(&m, "port25_likely_infected_sources")
    );
}

/// One subscriber sending as another (the programs run before the stack's rp_filter): the
/// forged source arrives on a device the kernel does not route that address through, and the
/// address's holder is not held on it. Here alice's address is routed through another device
/// (as a BRAS routes each subscriber's address to its own pppN), and her address is sprayed
/// from the lab's subscriber link. Without the check, alice was held (review 4).
#[test]
fn a_forged_source_does_not_get_its_holder_held() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.write_config("abuse:\n  auto_hold: true\n  scan_interval: 1s\n  event_interval: 1s\n");
    lab.start_daemon();
    for (user, addr) in [("mallory", MALLORY), ("alice", ALICE)] {
        let o = lab.ctl(&["session", "up", user, addr]);
        assert!(o.status.success(), "{}", text(&o));
    }
    // alice's own device on the router (a veth pair standing in for her ppp device).
    let rtr = lab.rtr.clone();
    for args in [
        vec![
            "-n", &rtr, "link", "add", "p25al0", "type", "veth", "peer", "name", "p25al1",
        ],
        vec!["-n", &rtr, "link", "set", "p25al0", "up"],
        vec!["-n", &rtr, "link", "set", "p25al1", "up"],
        vec![
            "-n",
            &rtr,
            "route",
            "add",
            &format!("{ALICE}/32"),
            "dev",
            "p25al0",
        ],
    ] {
        let o = std::process::Command::new("ip")
            .args(&args)
            .output()
            .unwrap();
        assert!(o.status.success(), "ip {args:?}: {}", text(&o));
    }
    // Sent as alice, from the subscriber link (rs), to 200 destinations.
    syns(&lab, ALICE, spray(200, 2));
    // Mallory sprays as herself, and is held: the check does not stop the real case.
    syns(&lab, MALLORY, spray(200, 2));
    wait_for("mallory held", &lab, 10, || show(&lab, "mallory").user.hold);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        show(&lab, "alice").user.hold.is_none(),
        "alice held on forged segments: {}",
        lab.daemon_log()
    );
    let log = lab.daemon_log();
    assert!(
        log.contains("a forged source?") && log.contains(ALICE),
        "the forged source is logged: {log}"
    );
}
