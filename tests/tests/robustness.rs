//! Control-plane paths that used to open port 25 (issue 8, section 3, items 6, 7, 9, 10, 11):
//! a second daemon on the same pins, a re-created interface behind a dead pinned link, a
//! client that stalls the writer, a reload that half applies, and a detach that systemd undid.

use std::{
    io::Write as _,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use port25_tests::{
    lab::{self, Lab},
    require_root, text,
};

const XDP: &str = "  - name: rs\n    hook: xdp\n    xdp_mode: native";
const EXEMPT_SUB: &str = "exempt:\n  - prefix: 100.64.0.2/32\n";

fn assert_blocked(lab: &Lab, what: &str) {
    for a in [lab::v4(), lab::v6()] {
        assert!(
            !lab.can_connect(a.sub, a.ext, 25),
            "{what}: {} -> {}:25 must be blocked",
            a.sub,
            a.ext
        );
        assert!(
            lab.can_connect(a.sub, a.mail, 25),
            "{what}: {} -> mail server {}:25 must work",
            a.sub,
            a.mail
        );
    }
}

/// The verdict `check` reads from the live maps for the v4 subscriber to the external MX.
fn check_v4(lab: &Lab) -> String {
    let (v4, ext) = (lab::v4().sub.to_string(), lab::v4().ext.to_string());
    let r = lab.ctl(&["check", &v4, &ext, "--json"]);
    assert!(r.status.success(), "check: {}", text(&r));
    let js: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    js["verdict"].as_str().unwrap().to_string()
}

/// Runs `port25-ctl --config CFG ARGS` in the router's namespace; Some(exit code) when it
/// exits within `wait`, None (and killed) when it is still running then.
fn run_for(lab: &Lab, config: &Path, args: &[&str], wait: Duration) -> (Option<i32>, String) {
    let log = lab
        .dir
        .join(format!("run-{}.log", port25_tests::unique("")));
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.rtr))
        .arg(lab::ctl_binary())
        .arg("--config")
        .arg(config)
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + wait;
    let code = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (code, std::fs::read_to_string(&log).unwrap_or_default())
}

/// Item 6: the pin tree is locked, not only the socket.
#[test]
fn second_daemon_on_the_same_pins_is_refused() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.start_daemon();
    assert_blocked(&lab, "first daemon");

    // Same pins, another socket, and a policy that would exempt the subscriber.
    lab.write_config(EXEMPT_SUB);
    let other_socket = lab.dir.join("other.sock");
    let cfg = std::fs::read_to_string(&lab.config).unwrap().replace(
        &format!("socket: {}", lab.socket.display()),
        &format!("socket: {}", other_socket.display()),
    );
    let other: PathBuf = lab.dir.join("other.yaml");
    std::fs::write(&other, cfg).unwrap();
    lab.write_config("");

    let (code, log) = run_for(&lab, &other, &["daemon"], Duration::from_secs(10));
    assert!(
        code.is_some_and(|c| c != 0),
        "a second daemon on the same pin_dir must exit non-zero at once: {code:?} {log}"
    );
    assert!(
        log.contains(&lab.pin_dir.display().to_string()) && log.contains("another port25 daemon"),
        "the refusal names the pin dir: {log}"
    );
    assert!(!other_socket.exists(), "the refused daemon never served");
    assert_eq!(
        check_v4(&lab),
        "block",
        "the maps still hold the first policy"
    );
    assert_blocked(&lab, "after the refused second daemon");
    let st = lab.ctl(&["status"]);
    assert!(
        st.status.success(),
        "the first still enforces: {}",
        text(&st)
    );

    // An offline `detach` through the other socket finds no daemon there, but the pins are
    // held: it must not pull them from under the running daemon.
    let d = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.rtr))
        .arg(lab::ctl_binary())
        .arg("--config")
        .arg(&other)
        .arg("detach")
        .output()
        .unwrap();
    assert!(
        !d.status.success(),
        "offline detach of held pins: {}",
        text(&d)
    );
    assert!(lab.pin_dir.join("links/xdp:rs").exists());
    assert_blocked(&lab, "after the refused offline detach");
}

/// Item 10: a reload applies whole or not at all.
#[test]
fn reload_with_a_failing_attach_changes_nothing() {
    require_root!();
    let mut lab = Lab::new(XDP);
    // A second subscriber-facing veth that attaches fine, to see that a refused reload also
    // takes back what it attached before the failure.
    let rtr = lab.rtr.clone();
    let ok = Command::new("ip")
        .args([
            "-n", &rtr, "link", "add", "rx0", "type", "veth", "peer", "name", "rx1",
        ])
        .status()
        .unwrap();
    assert!(ok.success());
    // A device that exists and is Ethernet but has no native XDP: the kernel refuses the
    // attach itself, after every check the daemon can make beforehand.
    let ok = Command::new("ip")
        .args([
            "-n", &rtr, "link", "add", "link", "rx0", "name", "mv0", "type", "macvlan",
        ])
        .status()
        .unwrap();
    assert!(ok.success());
    lab.start_daemon();
    assert_blocked(&lab, "start");

    let bad_interfaces = [
        "  - name: rs\n    hook: xdp\n  - name: rx0\n    hook: xdp\n  - name: mv0\n    hook: xdp",
        // XDP on a loopback device.
        "  - name: rs\n    hook: xdp\n  - name: rx0\n    hook: xdp\n  - name: lo\n    hook: xdp",
        // An interface that does not exist.
        "  - name: rs\n    hook: xdp\n  - name: rx0\n    hook: xdp\n  - name: nosuch0\n    hook: tc",
    ];
    for bad in bad_interfaces {
        lab.interfaces = bad.to_string();
        lab.write_config(EXEMPT_SUB);
        let r = lab.ctl(&["reload"]);
        assert!(!r.status.success(), "reload must be refused: {}", text(&r));
        assert_eq!(
            check_v4(&lab),
            "block",
            "a refused reload left the old policy in the maps ({bad})"
        );
        assert_blocked(&lab, "after a refused reload");
        let links: Vec<String> = std::fs::read_dir(lab.pin_dir.join("links"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(
            links,
            ["xdp:rs"],
            "no attachment of the refused reload is left"
        );
    }

    // The same change without the bad interface goes through whole.
    lab.interfaces = "  - name: rs\n    hook: xdp\n  - name: rx0\n    hook: xdp".into();
    lab.write_config(EXEMPT_SUB);
    let r = lab.ctl(&["reload"]);
    assert!(r.status.success(), "reload: {}", text(&r));
    assert_eq!(check_v4(&lab), "pass");
    assert!(lab.pin_dir.join("links/xdp:rx0").exists());
}

/// The exit code of a daemon that refuses to attach after `detach` (the unit's
/// RestartPreventExitStatus).
const EXIT_DETACHED: i32 = 10;

/// Item 11: detach sticks until an operator starts enforcement deliberately.
#[test]
fn detach_is_durable() {
    require_root!();
    let mut lab = Lab::new(XDP);
    let v4 = lab::v4();
    lab.start_daemon();
    let d = lab.ctl(&["detach"]);
    assert!(d.status.success(), "detach: {}", text(&d));
    assert!(lab.wait_daemon_exit(Duration::from_secs(5)));

    // What systemd's Restart= does a second later: a plain start. It must not attach.
    let (code, log) = run_for(&lab, &lab.config, &["daemon"], Duration::from_secs(10));
    assert_eq!(code, Some(EXIT_DETACHED), "a start after detach: {log}");
    assert!(
        log.contains("detach") && log.contains("--attach"),
        "it says why and the way out: {log}"
    );
    assert!(!lab.pin_dir.exists(), "nothing pinned");
    assert!(lab.can_connect(v4.sub, v4.ext, 25), "still detached");
    let st = lab.ctl(&["status"]);
    assert_eq!(st.status.code(), Some(3), "{}", text(&st));
    assert!(
        String::from_utf8_lossy(&st.stdout).contains("detached"),
        "status says it was detached on purpose: {}",
        text(&st)
    );

    // The deliberate start attaches, and clears the marker for later restarts.
    lab.try_start_daemon_args(&["daemon", "--attach"], &[])
        .expect("daemon --attach");
    assert_blocked(&lab, "after daemon --attach");
    lab.kill9();
    lab.start_daemon();
    assert_blocked(&lab, "a plain restart after --attach");

    // Detach with the daemon down is as durable; `port25-ctl attach` lifts it.
    lab.kill9();
    let d = lab.ctl(&["detach"]);
    assert!(d.status.success(), "offline detach: {}", text(&d));
    let (code, log) = run_for(&lab, &lab.config, &["daemon"], Duration::from_secs(10));
    assert_eq!(
        code,
        Some(EXIT_DETACHED),
        "a start after an offline detach: {log}"
    );
    let a = lab.ctl(&["attach"]);
    assert!(a.status.success(), "attach: {}", text(&a));
    lab.start_daemon();
    assert_blocked(&lab, "after port25-ctl attach and a start");

    // The unit maps the code to "no restart".
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/port25.service"),
    )
    .unwrap();
    assert!(
        unit.lines()
            .any(|l| l.trim() == format!("RestartPreventExitStatus={EXIT_DETACHED}")),
        "deploy/port25.service maps the detached exit code to no restart"
    );
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deletes the subscriber-facing veth and creates it again with the same names and
/// addresses (what a driver reload or an access server restarting its interfaces does).
fn recreate_rs(lab: &Lab) {
    let (sub, rtr) = (lab.sub.as_str(), lab.rtr.as_str());
    ip(&["-n", rtr, "link", "del", "rs"]);
    ip(&[
        "-n", sub, "link", "add", "name", "s0", "type", "veth", "peer", "name", "rs", "netns", rtr,
    ]);
    for (ns, cmd) in [
        (sub, "addr add 100.64.0.2/24 dev s0"),
        (sub, "addr add 100.64.0.3/24 dev s0"),
        (sub, "addr add 2001:db8:100::2/64 dev s0 nodad"),
        (sub, "addr add 2001:db8:100::3/64 dev s0 nodad"),
        (sub, "addr add 2001:db8:1a0:5::7/128 dev s0 nodad"),
        (sub, "addr add 2001:db8:1a1:5::9/128 dev s0 nodad"),
        (sub, "link set s0 up"),
        (sub, "route add default via 100.64.0.1"),
        (sub, "-6 route add default via 2001:db8:100::1"),
        (rtr, "addr add 100.64.0.1/24 dev rs"),
        (rtr, "addr add 2001:db8:100::1/64 dev rs nodad"),
        (rtr, "link set rs up"),
        (rtr, "-6 route add 2001:db8:1a0::/56 via 2001:db8:100::2"),
        (rtr, "-6 route add 2001:db8:1a1::/56 via 2001:db8:100::2"),
    ] {
        let mut args = vec!["-n", ns];
        args.extend(cmd.split(' '));
        ip(&args);
    }
    let ok = Command::new("ip")
        .args([
            "netns", "exec", sub, "ethtool", "-K", "s0", "tso", "off", "gso", "off",
        ])
        .status()
        .unwrap();
    assert!(ok.success());
}

fn status_code(lab: &Lab) -> Option<i32> {
    lab.ctl(&["status"]).status.code()
}

/// Item 7: a pinned link whose interface went away is noticed and replaced, by the running
/// daemon's reconcile, by a reload and by a start.
#[test]
fn recreated_interface_is_enforced_again() {
    require_root!();
    let mut lab = Lab::new(XDP);
    let (v4, ext) = (lab::v4().sub, lab::v4().ext);
    let interval = Duration::from_secs(2);
    lab.write_config("reconcile_interval: 2s\n");
    lab.start_daemon();
    assert_blocked(&lab, "start");

    recreate_rs(&lab);
    // The first connection on the new interface, right away: it must fail, whether because
    // the daemon was quick or because it is still to come; none may be accepted later.
    let t0 = Instant::now();
    let mut healthy_after = None;
    while t0.elapsed() < interval * 3 {
        if status_code(&lab) == Some(0) {
            healthy_after = Some(t0.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let healthy_after =
        healthy_after.unwrap_or_else(|| panic!("never re-attached: {}", lab.daemon_log()));
    eprintln!("re-attached {healthy_after:?} after the interface was re-created");
    assert!(
        healthy_after <= interval + Duration::from_secs(1),
        "re-attached within the reconcile interval ({healthy_after:?})"
    );
    assert!(
        !lab.can_connect(v4, ext, 25),
        "port 25 is blocked on the re-created interface"
    );
    assert_blocked(&lab, "after the interface came back");

    // A reload also repairs it (the dead link is replaced, not swapped into).
    lab.kill9();
    recreate_rs(&lab);
    assert_eq!(status_code(&lab), Some(3), "status: the link is dead");
    lab.start_daemon();
    assert_eq!(status_code(&lab), Some(0), "a start re-attached");
    assert_blocked(&lab, "after a start on a dead link");
    recreate_rs(&lab);
    let r = lab.ctl(&["reload"]);
    assert!(r.status.success(), "reload: {}", text(&r));
    assert_eq!(status_code(&lab), Some(0), "a reload re-attached");
    assert_blocked(&lab, "after a reload on a dead link");
}

/// Sets this process's soft open-file limit (children inherit it).
fn set_nofile(n: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, n.min(hard), hard).unwrap();
}

fn vm_size_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn daemon_pid(lab: &Lab) -> u32 {
    lab.client()
        .call(port25_ctl::control::proto::Info)
        .unwrap()
        .pid
}

/// Item 9: idle connections, slow clients and big announced frames do not stall the writer.
#[test]
fn a_client_cannot_stall_the_writer() {
    require_root!();
    let mut lab = Lab::new(XDP);
    // The daemon starts with systemd's default soft limit of 1024 open files; the test then
    // needs more than that for itself.
    set_nofile(1024);
    lab.start_daemon();
    set_nofile(8192);
    let pid = daemon_pid(&lab);
    let r = lab.ctl(&["user", "add", "alice"]);
    assert!(r.status.success(), "{}", text(&r));
    let before = vm_size_kib(pid);

    // 1,000 connections that never send anything.
    let idle: Vec<UnixStream> = (0..1000)
        .map(|_| UnixStream::connect(&lab.socket).unwrap())
        .collect();
    // 32 slow clients that announce a 16 MiB request and send its first bytes only.
    let mut slow: Vec<UnixStream> = (0..32)
        .map(|_| {
            let mut s = UnixStream::connect(&lab.socket).unwrap();
            s.write_all(&(16u32 << 20).to_be_bytes()).unwrap();
            s.write_all(b"{\"v\":1,").unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    for round in 0..5 {
        for s in &mut slow {
            let _ = s.write_all(b" ");
        }
        let t = Instant::now();
        let r = lab.ctl(&["unblock", "alice", "--for", "1h"]);
        let took = t.elapsed();
        assert!(r.status.success(), "unblock (round {round}): {}", text(&r));
        assert!(
            took < Duration::from_secs(2),
            "unblock answered in {took:?} with 1,000 idle and 32 slow clients (round {round})"
        );
        let r = lab.ctl(&["user", "list"]);
        assert!(r.status.success(), "user list: {}", text(&r));
        std::thread::sleep(Duration::from_millis(200));
    }
    let grown = vm_size_kib(pid).saturating_sub(before);
    assert!(
        grown < 256 * 1024,
        "the daemon reserved {grown} KiB for requests whose bodies never came"
    );
    drop(idle);
    drop(slow);
    let st = lab.ctl(&["status"]);
    assert!(st.status.success(), "{}", text(&st));
}

/// Review findings: a client's errors name the real problem. A non-root caller was told
/// "the daemon is not running" (it is; the socket is root's), `| head` made every verb panic
/// (exit 101), and `status` after a detach claimed "enforcement continues from the pins".
#[test]
fn client_errors_name_the_real_problem() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.start_daemon();
    assert!(lab.ctl(&["user", "add", "alice"]).status.success());

    let nobody = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(lab::ctl_binary())
        .arg("--config")
        .arg(&lab.config)
        .args(["user", "list"])
        .output()
        .expect("setpriv");
    let err = String::from_utf8_lossy(&nobody.stderr);
    assert!(!nobody.status.success(), "{err}");
    assert!(
        err.contains("Permission denied") && !err.contains("not running"),
        "a permission problem is not an absent daemon: {err}"
    );

    // The reader is gone before the answer is printed: end quietly, never a panic.
    let mut child = Command::new(lab::ctl_binary())
        .arg("--config")
        .arg(&lab.config)
        .args(["audit", "--limit", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("panicked") && out.status.code() != Some(101),
        "a closed stdout: {err}"
    );

    let d = lab.ctl(&["detach"]);
    assert!(d.status.success(), "detach: {}", text(&d));
    assert!(lab.wait_daemon_exit(Duration::from_secs(5)));
    let st = lab.ctl(&["status"]);
    let out = String::from_utf8_lossy(&st.stdout);
    assert!(
        !out.contains("enforcement continues") && out.contains("NOT blocked"),
        "status after a detach must not claim enforcement: {out}"
    );
    assert!(lab.ctl(&["attach"]).status.success());
}

/// The read-only group cannot lock root (the hooks) out: its peers hold at most half of
/// the connection slots.
#[test]
fn read_only_peers_cannot_take_every_connection_slot() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.write_config("read_group: nogroup\n");
    // The daemon raises its open-file limit: 4,096 connection slots, 2,048 of them for
    // peers that are not root.
    set_nofile(8192);
    lab.start_daemon();
    let r = lab.ctl(&["user", "add", "alice"]);
    assert!(r.status.success(), "{}", text(&r));
    for p in [&lab.dir, &lab.config] {
        let mode = if p.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    }
    // Perl is in every Debian base system (python may sit under root's home).
    let script = "use IO::Socket::UNIX; my @s; for (1..4200) { push @s, IO::Socket::UNIX->new(Peer => $ARGV[0], Type => SOCK_STREAM) or die \"connect: $!\"; } $| = 1; print \"open\\n\"; sleep 60;";
    let mut hog = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "/usr/bin/perl",
            "-e",
        ])
        .arg(script)
        .arg(&lab.socket)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("setpriv perl");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(hog.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "open", "the read-only peer could not connect");
    std::thread::sleep(Duration::from_millis(300));
    let r = lab.ctl(&["unblock", "alice", "--for", "1h"]);
    let _ = hog.kill();
    let _ = hog.wait();
    assert!(
        r.status.success(),
        "root locked out by 4,200 read-only connections: {}",
        text(&r)
    );
}

/// A second daemon with its own pins and socket on an interface the first one enforces is
/// refused with the reason named, and leaves no pin tree behind; the first keeps enforcing.
#[test]
fn a_second_pin_tree_on_an_enforced_interface_is_refused_and_cleaned_up() {
    require_root!();
    let mut lab = Lab::new("  - name: rs\n    hook: xdp\n    xdp_mode: native");
    lab.start_daemon();
    let other_pins = format!("/sys/fs/bpf/{}", port25_tests::unique("p25second"));
    let other = lab.dir.join("second");
    std::fs::create_dir_all(&other).unwrap();
    let cfg = other.join("port25.yaml");
    std::fs::write(
        &cfg,
        format!(
            "interfaces:\n{}\n{}state_dir: {}\nsocket: {}\npin_dir: {}\n",
            lab.interfaces,
            port25_tests::lab::POLICY,
            other.display(),
            other.join("ctl.sock").display(),
            other_pins
        ),
    )
    .unwrap();
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.rtr))
        .arg(port25_tests::lab::ctl_binary())
        .arg("--config")
        .arg(&cfg)
        .arg("daemon")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the second daemon started");
    assert!(
        text(&out).contains("already has a program attached"),
        "{}",
        text(&out)
    );
    assert!(
        !std::path::Path::new(&other_pins).exists(),
        "the refused daemon left {other_pins} behind"
    );
    assert!(
        !lab.can_connect(lab::v4().sub, lab::v4().ext, 25),
        "the first daemon stopped enforcing"
    );
}
