//! Subscribers end to end: the helpdesk and the access server drive the real daemon over its
//! socket through the real CLI; real TCP connects from the subscriber namespace tell the truth.

use std::{
    net::IpAddr,
    process::Command,
    time::{Duration, Instant},
};

use port25_ctl::control::{
    proto::{self, ErrorKind},
    reply::{PolicyChange, SessionUp, UserDetail},
};
use port25_ctl::registry::store::Policy;
use port25_tests::{
    lab::{self, Lab},
    require_root, text,
};

const XDP: &str = "  - name: rs\n    hook: xdp\n    xdp_mode: native";
const TC: &str = "  - name: rs\n    hook: tc\n    direction: ingress";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// alice's session: an IPv4 address and a delegated /56 (one address of it is on the host).
const ALICE4: &str = "100.64.0.2";
const ALICE_PD: &str = "2001:db8:1a0::/56";
const ALICE6: &str = "2001:db8:1a0:5::7";
const BOB4: &str = "100.64.0.3";
const BOB_PD: &str = "2001:db8:1a1::/56";
const BOB6: &str = "2001:db8:1a1:5::9";

fn ok(lab: &Lab, args: &[&str]) -> String {
    let o = lab.ctl(args);
    assert!(
        o.status.success(),
        "port25-ctl {args:?} should succeed: {}",
        text(&o)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fails(lab: &Lab, args: &[&str]) -> String {
    let o = lab.ctl(args);
    assert!(
        !o.status.success(),
        "port25-ctl {args:?} should fail: {}",
        text(&o)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn smtp(lab: &Lab, src: &str) -> bool {
    let src = ip(src);
    let dst = if src.is_ipv4() {
        lab::v4().ext
    } else {
        lab::v6().ext
    };
    lab.can_connect(src, dst, 25)
}

fn started(hook: &str) -> Lab {
    let mut lab = Lab::new(hook);
    lab.start_daemon();
    lab
}

#[test]
fn unblock_follows_the_session() {
    require_root!();
    // TC is tcx where the kernel has it, a netlink filter where it does not.
    for hook in [XDP, TC] {
        let lab = started(hook);
        ok(
            &lab,
            &["session", "up", "alice", ALICE4, ALICE_PD, "--id", "42"],
        );
        ok(&lab, &["session", "up", "bob", BOB4, BOB_PD, "--id", "43"]);
        assert!(!smtp(&lab, ALICE4), "a new user is blocked");
        let out: PolicyChange = lab.reply(&["unblock", "alice", "--reason", "ticket 4711"]);
        assert!(out.changed, "{out:?}");
        assert_eq!(out.user.effective, Policy::Unblocked, "{out:?}");
        assert_eq!(out.user.reason.as_deref(), Some("ticket 4711"));
        assert!(smtp(&lab, ALICE4), "alice's address after unblock");
        assert!(smtp(&lab, ALICE6), "alice's delegated prefix after unblock");
        assert!(!smtp(&lab, BOB4), "bob stays blocked (v4)");
        assert!(!smtp(&lab, BOB6), "bob stays blocked (his /56)");
        let check: serde_json::Value = lab.reply(&["check", ALICE6, "2001:db8:ff::80"]);
        assert_eq!(check["verdict"], "pass", "{check}");
        assert_eq!(check["holder"]["user"], "alice", "{check}");
        let check: serde_json::Value = lab.reply(&["check", BOB4, "203.0.113.80"]);
        assert_eq!(check["verdict"], "block", "{check}");
        assert_eq!(check["holder"]["user"], "bob", "{check}");
        assert_eq!(check["holder"]["policy"], "blocked", "{check}");

        ok(&lab, &["session", "down", "--id", "42"]);
        assert!(
            !smtp(&lab, ALICE4),
            "alice's session went down: blocked again"
        );
        assert!(!smtp(&lab, ALICE6), "and her prefix");
        // The unblock stays with the user and follows her next session.
        ok(&lab, &["session", "up", "alice", ALICE4, "--id", "44"]);
        assert!(
            smtp(&lab, ALICE4),
            "the unblock follows alice's next session"
        );
        ok(&lab, &["block", "alice"]);
        assert!(
            !smtp(&lab, ALICE4),
            "block revokes at once on a live session"
        );
        let show: UserDetail = lab.reply(&["user", "show", "alice"]);
        assert_eq!(show.user.effective, Policy::Blocked, "{show:?}");
        assert_eq!(show.user.policy, Policy::Blocked, "{show:?}");
        let ids: Vec<&str> = show.sessions.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["44"], "{show:?}");
        assert!(
            show.audit
                .iter()
                .any(|r| r.reason.as_deref() == Some("ticket 4711")),
            "{show:?}"
        );
    }
}

#[test]
fn a_reused_address_never_inherits_an_unblock() {
    require_root!();
    let lab = started(XDP);
    ok(&lab, &["session", "up", "alice", ALICE4, "--id", "a-1"]);
    ok(&lab, &["unblock", "alice"]);
    assert!(smtp(&lab, ALICE4));
    // The address goes to bob (blocked) before alice's down event arrives.
    let out: SessionUp = lab.reply(&["session", "up", "bob", ALICE4, "--id", "b-1"]);
    assert_eq!(out.taken_over.len(), 1, "{out:?}");
    let t = &out.taken_over[0];
    assert_eq!((t.session.as_str(), t.user.as_str()), ("a-1", "alice"));
    assert_eq!(t.prefix.to_string(), format!("{ALICE4}/32"));
    assert!(!smtp(&lab, ALICE4), "bob on alice's old address is blocked");
    // alice's late down event, both forms: neither removes bob's session nor opens anything.
    let e = fails(&lab, &["session", "down", "--id", "a-1"]);
    assert!(e.contains("a-1"), "{e}");
    let e = fails(&lab, &["session", "down", "alice", ALICE4]);
    assert!(e.contains("bob"), "{e}");
    assert!(
        !smtp(&lab, ALICE4),
        "still blocked after the late down events"
    );
    let show: UserDetail = lab.reply(&["user", "show", "bob"]);
    assert!(
        show.sessions.iter().any(|s| s.id == "b-1"),
        "bob's session survived: {show:?}"
    );
    // And the other way round: bob unblocked, alice's late down must not close it.
    ok(&lab, &["unblock", "bob"]);
    assert!(smtp(&lab, ALICE4));
    let _ = lab.ctl(&["session", "down", "alice", ALICE4]);
    assert!(
        smtp(&lab, ALICE4),
        "alice's late down did not remove bob's unblocked session"
    );
}

#[test]
fn a_timed_unblock_ends_on_time_with_the_daemon_dead() {
    require_root!();
    let mut lab = started(XDP);
    ok(
        &lab,
        &["session", "up", "alice", ALICE4, ALICE_PD, "--id", "7"],
    );
    let out: PolicyChange = lab.reply(&[
        "unblock",
        "alice",
        "--for",
        "4s",
        "--reason",
        "pop-before-smtp",
    ]);
    // From the answer, not the request: the daemon takes its clock in between, which took
    // over 0.5 s in a TCG VM (`cargo xtask test --vm`), so 4.5 s from the request raced.
    let t0 = Instant::now();
    let left = out
        .user
        .seconds_left
        .expect("a timed unblock has time left");
    assert!((1..=4).contains(&left), "{out:?}");
    // A POP login never shortens a longer unblock.
    assert!(
        smtp(&lab, ALICE4) && smtp(&lab, ALICE6),
        "unblocked for now"
    );
    lab.kill9();
    let wait = Duration::from_millis(4500).saturating_sub(t0.elapsed());
    std::thread::sleep(wait);
    assert!(
        !smtp(&lab, ALICE4),
        "the kernel ended the unblock with no daemon"
    );
    assert!(!smtp(&lab, ALICE6), "and on the delegated prefix");
    lab.start_daemon();
    let show: UserDetail = lab.reply(&["user", "show", "alice"]);
    assert!(
        show.user.policy == Policy::Unblocked
            && show.user.effective == Policy::Blocked
            && show.user.until.is_some(),
        "user show tells the unblock ended: {show:?}"
    );
    assert!(!smtp(&lab, ALICE4));
}

#[test]
fn a_timed_unblock_never_shortens_a_longer_one() {
    require_root!();
    let lab = started(XDP);
    ok(&lab, &["user", "add", "carol"]);
    ok(&lab, &["user", "add", "dan"]);
    ok(&lab, &["unblock", "carol"]);
    let st: serde_json::Value = serde_json::from_str(&ok(&lab, &["status", "--json"])).unwrap();
    assert_eq!(st["registry"]["users"], 2, "{st}");
    assert_eq!(st["registry"]["unblocked"], 1, "{st}");
    assert_eq!(st["registry"]["timed"], 0, "{st}");
    let out: PolicyChange = lab.reply(&[
        "unblock",
        "carol",
        "--for",
        "90m",
        "--reason",
        "pop-before-smtp",
    ]);
    assert!(!out.changed && out.user.until.is_none(), "kept: {out:?}");
    let show: UserDetail = lab.reply(&["user", "show", "carol"]);
    assert!(show.user.until.is_none(), "still permanent: {show:?}");
    ok(&lab, &["block", "carol"]);
    ok(&lab, &["unblock", "carol", "--for", "90m"]);
    ok(&lab, &["unblock", "carol", "--for", "10m"]);
    let show: UserDetail = lab.reply(&["user", "show", "carol"]);
    let left = show.user.seconds_left.unwrap();
    assert!(left > 80 * 60, "90m kept over 10m: {left}s left");
}

#[test]
fn a_crash_between_commit_and_apply_is_repaired_at_start() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.start_daemon();
    ok(&lab, &["session", "up", "alice", ALICE4, "--id", "1"]);
    lab.kill9();
    lab.try_start_daemon_env(&[(port25_ctl::control::testing::FAILPOINT_AFTER_COMMIT, "1")])
        .unwrap();
    // The daemon commits, then dies before touching the maps: the CLI sees no answer.
    let o = lab.ctl(&["unblock", "alice"]);
    assert!(
        !o.status.success(),
        "the daemon died mid-change: {}",
        text(&o)
    );
    assert!(
        lab.wait_daemon_exit(Duration::from_secs(5)),
        "the failpoint killed the daemon"
    );
    assert!(!smtp(&lab, ALICE4), "the maps were not written");
    lab.start_daemon();
    assert!(
        smtp(&lab, ALICE4),
        "at start the maps were made equal to the registry"
    );
    let show: UserDetail = lab.reply(&["user", "show", "alice"]);
    assert_eq!(show.user.effective, Policy::Unblocked, "{show:?}");
}

#[test]
fn bad_input_changes_nothing() {
    require_root!();
    let lab = started(XDP);
    ok(&lab, &["session", "up", "alice", ALICE4, "--id", "1"]);
    let before = ok(&lab, &["--json", "audit", "--limit", "0"]);
    // Exit 2: the CLI's parser refused (usage); exit 1: the daemon refused. The messages
    // are checked on purpose: each names what is wrong.
    let cases: &[(&[&str], i32, &str)] = &[
        (&["unblock", "alise"], 1, "did you mean alice"),
        (&["block", "nobody"], 1, "unknown user"),
        (&["session", "up", "bob", "010.0.0.1"], 2, "leading zero"),
        (&["session", "up", "bob", "100.64.0.9/24"], 2, "host bits"),
        (
            &["session", "up", "bob", "100.64.0.9", "--id", "1"],
            1,
            "duplicate session id",
        ),
        (
            &["unblock", "alice", "--until", "2001-01-01T00:00:00Z"],
            1,
            "not in the future",
        ),
        (&["unblock", "alice", "--for", "soon"], 2, "not a duration"),
        (&["unblock", "alice", "--for", "0s"], 2, "at least"),
        (
            &["exempt", "add", "100.64.0.0/10", "--until", "2001-01-01"],
            1,
            "not in the future",
        ),
        (
            &["server", "remove", "198.51.100.99/32"],
            1,
            "not a runtime server",
        ),
        (&["user", "add", "alice"], 1, "already exists"),
    ];
    for (args, code, want) in cases {
        let e = lab.fails_with(args, *code);
        assert!(e.contains(want), "{args:?}: expected `{want}` in: {e}");
    }
    // Over the socket the daemon's refusals are of kind `refused`, not failures.
    let c = lab.client();
    for e in [
        c.call(proto::Block {
            user: "nobody".into(),
            reason: None,
            new: false,
            hold: false,
        })
        .unwrap_err(),
        c.call(proto::UserAdd {
            user: "alice".into(),
        })
        .unwrap_err(),
        c.call(proto::Unblock {
            user: "alice".into(),
            for_secs: None,
            until: Some("2001-01-01T00:00:00Z".parse().unwrap()),
            reason: None,
            new: false,
        })
        .unwrap_err(),
    ] {
        assert!(
            matches!(
                e,
                proto::Error::Daemon {
                    kind: ErrorKind::Refused,
                    ..
                }
            ),
            "{e:?}"
        );
    }
    assert_eq!(
        ok(&lab, &["--json", "audit", "--limit", "0"]),
        before,
        "no audit record added"
    );
    assert!(!smtp(&lab, ALICE4), "and nothing opened");
}

#[test]
fn a_full_map_refuses_the_whole_change() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.write_config("limits:\n  exempt_ips: 3\n");
    lab.start_daemon();
    ok(
        &lab,
        &[
            "session",
            "up",
            "u1",
            "100.64.1.1",
            "100.64.1.2",
            "--id",
            "s1",
        ],
    );
    ok(&lab, &["unblock", "u1"]);
    // Every live session address is a map entry, blocked or not (it decides for its
    // address): the second session does not fit, and is refused whole.
    let e = fails(
        &lab,
        &[
            "session",
            "up",
            "u2",
            "100.64.1.3",
            "100.64.1.4",
            "--id",
            "s2",
        ],
    );
    assert!(e.contains("map full"), "{e}");
    // Over the socket a full map is a refusal (the same change fails again), not a failure.
    let full = lab
        .client()
        .call(proto::SessionUp {
            user: "u2".into(),
            addrs: vec!["100.64.1.3".parse().unwrap(), "100.64.1.4".parse().unwrap()],
            id: Some("s2".into()),
            source: None,
            force_wide: false,
            unblock: false,
            unblock_for_secs: None,
            iface: None,
        })
        .unwrap_err();
    match full {
        proto::Error::Daemon {
            kind: ErrorKind::Refused,
            message,
        } => assert!(message.contains("map full"), "{message}"),
        other => panic!("not a refusal: {other:?}"),
    }
    let show: UserDetail = lab.reply(&["user", "show", "u1"]);
    assert_eq!(show.user.effective, Policy::Unblocked);
    let o = lab.ctl(&["--json", "user", "show", "u2"]);
    assert!(
        !o.status.success(),
        "the refused change is not in the registry: {}",
        text(&o)
    );
}

/// A blocked user's session entries close their addresses, so they go in before anything
/// is removed: a sync that replaces sessions needs room for the new entries while the old
/// ones are still there. A map too full for that moment refuses the change before anything
/// is written (it used to pass the check and fail on the kernel's write, after the registry
/// had taken it).
#[test]
fn a_full_map_counts_closing_entries_before_removals() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.write_config("limits:\n  exempt_ips: 3\n");
    lab.start_daemon();
    let addrs = |a: &[&str]| -> Vec<port25_ctl::net::Prefix> {
        a.iter().map(|a| a.parse().unwrap()).collect()
    };
    lab.client()
        .call(proto::SessionUp {
            user: "u1".into(),
            addrs: addrs(&[ALICE4, BOB4, "100.64.1.3"]),
            id: Some("s1".into()),
            source: None,
            force_wide: false,
            unblock: false,
            unblock_for_secs: None,
            iface: None,
        })
        .expect("three entries fit three");
    // The list has u1 on one new address: three entries go, one comes, and it comes first.
    let sync = lab.client().call(proto::SessionSync {
        sessions: vec![port25_ctl::registry::SyncSession {
            id: "s2".into(),
            user: "u1".into(),
            addrs: addrs(&["100.64.1.4"]),
        }],
        taken_at: None,
    });
    match sync {
        Err(proto::Error::Daemon {
            kind: ErrorKind::Refused,
            message,
        }) => assert!(message.contains("map full"), "{message}"),
        other => panic!("not a map-full refusal: {other:?}"),
    }
    let show: UserDetail = lab.reply(&["user", "show", "u1"]);
    let held: Vec<_> = show.sessions.iter().flat_map(|s| s.addrs.clone()).collect();
    assert_eq!(
        held,
        addrs(&[ALICE4, BOB4, "100.64.1.3"]),
        "the refused change is not in the registry: {show:?}"
    );
    assert!(!smtp(&lab, ALICE4), "still blocked");
}

#[test]
fn the_socket_refuses_peers_that_are_not_allowed() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.write_config("read_group: nogroup\n");
    lab.start_daemon();
    ok(&lab, &["user", "add", "alice"]);
    let as_user = |uid: u32, gid: u32, args: &[&str]| {
        Command::new("setpriv")
            .args([
                &format!("--reuid={uid}"),
                &format!("--regid={gid}"),
                "--clear-groups",
                "--",
            ])
            .arg(port25_tests::lab::ctl_binary())
            .arg("--config")
            .arg(&lab.config)
            .args(args)
            .output()
            .unwrap()
    };
    // nobody's primary group is nogroup, the configured read-only group: it may read only.
    std::fs::set_permissions(
        &lab.dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(
        &lab.config,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let o = as_user(65534, 65534, &["user", "list"]);
    assert!(o.status.success(), "read-only group reads: {}", text(&o));
    let o = as_user(65534, 65534, &["unblock", "alice"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("read-only"),
        "{}",
        text(&o)
    );
    // A peer outside the group is refused by the daemon's credential check, even when the
    // socket file itself is opened up.
    std::fs::set_permissions(
        &lab.socket,
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .unwrap();
    let o = as_user(12345, 12345, &["user", "list"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("permission denied"),
        "{}",
        text(&o)
    );
    let show: UserDetail = lab.reply(&["user", "show", "alice"]);
    assert_eq!(
        show.user.policy,
        Policy::Blocked,
        "nothing changed: {show:?}"
    );
}

#[test]
fn garbage_on_the_socket_is_refused_and_the_daemon_lives_on() {
    require_root!();
    use std::io::{Read, Write};
    let lab = started(XDP);
    let frame = |body: &[u8]| [&(body.len() as u32).to_be_bytes()[..], body].concat();
    for bytes in [
        frame(b"hello"),
        b"\xff\xff\xff\xff".to_vec(),
        frame(br#"{"v":1,"op":{"format_disk":{}}}"#),
        frame(br#"{"v":9,"op":"info"}"#),
        frame(br#"{"v":1,"op":{"session_up":{"user":"x","addrs":["010.0.0.1"]}}}"#),
        frame(br#"{"v":1,"op":{"unblock":{"user":"x"}},"extra":1}"#),
    ] {
        let mut s = std::os::unix::net::UnixStream::connect(&lab.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&bytes).unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        let len = u32::from_be_bytes(answer[..4].try_into().unwrap()) as usize;
        let r: proto::Response = serde_json::from_slice(&answer[4..4 + len]).unwrap();
        assert!(!r.ok, "refused: {r:?}");
        assert_eq!(r.kind, Some(ErrorKind::Refused), "{r:?}");
    }
    ok(&lab, &["user", "list"]);
}

/// A start writes the exempt hash by batch (more entries than one batch call takes) and,
/// on a restart, writes only what differs from the pinned maps: entries the config no
/// longer has are removed, new ones added, and one deleted by hand while no daemon ran is
/// put back.
#[test]
fn a_start_writes_and_compares_many_entries_by_batch() {
    use port25_ctl::bpf::{livemaps::Table, pins::Pins};
    require_root!();
    let mut lab = Lab::new(XDP);
    // 10.0.0.0 + i for i in `range`, as /32 config exempts.
    let exempts = |range: std::ops::Range<u32>| -> (String, Vec<[u8; 4]>) {
        let mut text = String::from("limits:\n  exempt_ips: 40000\nexempt:\n");
        let mut keys = Vec::new();
        for i in range {
            let a = (0x0a00_0000u32 + i).to_be_bytes();
            text.push_str(&format!(
                "  - {{prefix: {}.{}.{}.{}/32}}\n",
                a[0], a[1], a[2], a[3]
            ));
            keys.push(a);
        }
        (text, keys)
    };
    let held = |pin_dir: &std::path::Path| {
        let live = port25_ctl::bpf::livemaps::LiveMaps::open(&Pins::new(pin_dir)).unwrap();
        live.exip4
            .entries()
            .unwrap()
            .into_keys()
            .collect::<Vec<_>>()
    };
    let (text, keys) = exempts(0..20_000);
    lab.write_config(&text);
    lab.start_daemon();
    assert_eq!(held(&lab.pin_dir), keys, "a cold start wrote every entry");
    lab.kill9();

    let (text, keys) = exempts(10_000..30_000);
    lab.write_config(&text);
    {
        // Drift while no daemon runs: an entry the config keeps is gone from the map.
        let mut live = port25_ctl::bpf::livemaps::LiveMaps::open(&Pins::new(&lab.pin_dir)).unwrap();
        live.exip4
            .del((0x0a00_0000u32 + 15_000).to_be_bytes())
            .unwrap();
    }
    lab.start_daemon();
    assert_eq!(
        held(&lab.pin_dir),
        keys,
        "a restart removed the stale entries, added the new ones and repaired the drift"
    );
}

/// The per-user index is made after a start has written the maps (the socket may answer
/// first): a change sent before it is made waits for it, and leaves the maps exactly as the
/// same change sent once it is made. (Planned against a missing index, `session down` would
/// leave the session's entries open.)
#[test]
fn a_change_right_after_a_start_gives_the_maps_of_one_made_later() {
    use port25_ctl::{bpf::livemaps::LiveMaps, bpf::pins::Pins, control::testing::INDEX_GATE};
    require_root!();
    let mut lab = started(XDP);
    let maps = |lab: &Lab| {
        port25_ctl::policy::read_state(&LiveMaps::open(&Pins::new(&lab.pin_dir)).unwrap()).unwrap()
    };
    let made = |lab: &Lab| lab.daemon_log().matches("index made").count();
    ok(
        &lab,
        &["session", "up", "alice", ALICE4, ALICE_PD, "--id", "42"],
    );
    ok(&lab, &["unblock", "alice"]);
    ok(&lab, &["session", "up", "bob", BOB4, BOB_PD, "--id", "43"]);
    let before = maps(&lab);
    let change = |lab: &Lab| {
        ok(lab, &["session", "down", "--id", "42"]);
        ok(lab, &["unblock", "bob"]);
        assert!(!smtp(lab, ALICE4), "alice's session is down");
        assert!(!smtp(lab, ALICE6), "and her prefix");
        assert!(smtp(lab, BOB4) && smtp(lab, BOB6), "bob is unblocked");
        maps(lab)
    };
    let undo = |lab: &Lab| {
        ok(
            lab,
            &["session", "up", "alice", ALICE4, ALICE_PD, "--id", "42"],
        );
        ok(lab, &["block", "bob"]);
        assert_eq!(maps(lab), before, "undone");
    };
    let log = ("PORT25_LOG", "port25_ctl::policy::index=debug");

    // Early: the index is held until the change is seen waiting for it. No sleep decides
    // the order: on a slow machine the programs' verification alone can outlast any delay.
    lab.kill9();
    let waits = "a change waits for the index";
    let waited_before = lab.daemon_log().matches(waits).count();
    let gate = lab.dir.join("index.gate");
    let _ = std::fs::remove_file(&gate);
    lab.try_start_daemon_env(&[(INDEX_GATE, gate.to_str().unwrap()), log])
        .unwrap();
    let opener = {
        let (log_path, gate) = (lab.dir.join("daemon.log"), gate.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30) * port25_tests::patience();
            let seen = loop {
                let text = std::fs::read_to_string(&log_path).unwrap_or_default();
                if text.matches(waits).count() > waited_before {
                    break true;
                }
                if Instant::now() > deadline {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            // Opened either way: a change that never waited must not hang the test.
            std::fs::write(&gate, b"").unwrap();
            seen
        })
    };
    let early = change(&lab);
    assert!(
        opener.join().unwrap(),
        "the change did not wait for the index: {}",
        lab.daemon_log()
    );
    undo(&lab);

    // Late: the same change once the index is made.
    lab.kill9();
    let made_before = made(&lab);
    lab.try_start_daemon_env(&[log]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while made(&lab) == made_before {
        assert!(Instant::now() < deadline, "no index: {}", lab.daemon_log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let late = change(&lab);
    assert_eq!(
        early, late,
        "a change before the index is made and one after"
    );
}

/// A reconcile's build runs off the daemon's loop (at a million sessions it takes seconds):
/// changes made while it runs are answered at once, and the build, once applied, undoes none
/// of them. Built before them, it would open port 25 again to a user blocked meanwhile and
/// close it to one unblocked meanwhile; it is brought up to date with them instead. The
/// build is held by a test gate once it has read the maps and the registry, so the changes
/// surely come after its reads, whatever the machine's speed.
#[test]
fn changes_made_while_a_reconcile_builds_are_kept() {
    use port25_ctl::{bpf::livemaps::LiveMaps, bpf::pins::Pins, control::testing::REBUILD_GATE};
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.write_config("reconcile_interval: 1s\n");
    lab.start_daemon();
    let maps = |lab: &Lab| {
        port25_ctl::policy::read_state(&LiveMaps::open(&Pins::new(&lab.pin_dir)).unwrap()).unwrap()
    };
    // alice unblocked (two sessions), bob blocked, carol unblocked (bob's /56 as hers).
    ok(&lab, &["session", "up", "alice", ALICE4, "--id", "42"]);
    ok(&lab, &["session", "up", "alice", ALICE_PD, "--id", "45"]);
    ok(&lab, &["unblock", "alice"]);
    ok(&lab, &["session", "up", "bob", BOB4, "--id", "43"]);
    ok(&lab, &["session", "up", "carol", BOB_PD, "--id", "44"]);
    ok(&lab, &["unblock", "carol"]);
    assert!(smtp(&lab, ALICE4) && smtp(&lab, ALICE6));
    assert!(!smtp(&lab, BOB4) && smtp(&lab, BOB6));

    // Restarted with the gate shut: the first reconcile's build holds after its reads.
    lab.kill9();
    let gate = lab.dir.join("rebuild.gate");
    let held = lab.dir.join("rebuild.gate.held");
    let _ = std::fs::remove_file(&gate);
    let _ = std::fs::remove_file(&held);
    lab.try_start_daemon_env(&[
        (REBUILD_GATE, gate.to_str().unwrap()),
        ("PORT25_LOG", "port25_ctl::control::server=debug"),
    ])
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30) * port25_tests::patience();
    while !held.exists() {
        assert!(
            Instant::now() < deadline,
            "no reconcile build: {}",
            lab.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // The loop answers while the build holds, and each change takes effect at once.
    ok(&lab, &["block", "carol"]);
    ok(&lab, &["unblock", "bob"]);
    ok(&lab, &["session", "down", "--id", "45"]);
    let check = |lab: &Lab, when: &str| {
        assert!(!smtp(lab, BOB6), "{when}: carol was blocked");
        assert!(smtp(lab, BOB4), "{when}: bob was unblocked");
        assert!(
            !smtp(lab, ALICE6),
            "{when}: alice's second session went down"
        );
        assert!(
            smtp(lab, ALICE4),
            "{when}: alice's first session is still up"
        );
    };
    check(&lab, "while the build holds");
    let before = maps(&lab);

    // Let the build go: it is applied, brought up to date, and changes nothing.
    let applied = "reconcile: applied on the loop";
    std::fs::write(&gate, b"").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30) * port25_tests::patience();
    while !lab.daemon_log().contains(applied) {
        assert!(
            Instant::now() < deadline,
            "the build was not applied: {}",
            lab.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = lab.daemon_log();
    let line = log.lines().find(|l| l.contains(applied)).unwrap();
    assert!(
        line.contains("users=3"),
        "the three changed users were replayed onto the build: {line}"
    );
    assert!(!log.contains("build dropped"), "{log}");
    assert_eq!(maps(&lab), before, "the applied build undid a change");
    check(&lab, "once the build is applied");
    assert!(
        !log.contains("maps had drifted"),
        "no change was taken for drift: {log}"
    );
}
