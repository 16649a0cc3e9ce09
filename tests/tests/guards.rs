//! Control-plane inputs that used to open port 25 (issue 8, section 3: items 2, 8, 12, 13),
//! end to end: the real daemon in the namespace lab, real connections, the real registry.

use std::time::Duration;

use port25_ctl::control::{
    proto::{self, ErrorKind},
    reply::{AuditLog, PolicyChange, UserDetail},
};
use port25_ctl::registry::store::Policy;
use port25_tests::{
    lab::{self, Lab},
    require_root, text,
};

const XDP: &str = "  - name: rs\n    hook: xdp\n    xdp_mode: generic";

fn blocked(lab: &Lab) -> bool {
    !lab.can_connect(lab::v4().sub, lab::v4().ext, 25)
        && !lab.can_connect(lab::v6().sub, lab::v6().ext, 25)
}

fn attached(lab: &Lab) -> bool {
    let st = lab.ctl(&["status"]);
    st.status.success()
}

/// Item 2: a truncated config (config management mid-write) given to SIGHUP or `reload`
/// is refused, and enforcement stays in place: real connections are still blocked.
#[test]
fn empty_or_hollow_config_on_reload_leaves_enforcement_in_place() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.start_daemon();
    assert!(blocked(&lab), "lab: not enforcing at start");
    let good = std::fs::read_to_string(&lab.config).unwrap();
    let hollow = [
        ("empty", String::new()),
        ("whitespace", " \n\t\n".to_string()),
        ("comments only", "# port25\n".to_string()),
        (
            "no interfaces",
            good.replace(&format!("interfaces:\n{XDP}\n"), "interfaces: []\n"),
        ),
        (
            "interfaces cut off",
            good.replace(&format!("interfaces:\n{XDP}\n"), ""),
        ),
        (
            "blocked_ports: []",
            good.replace("blocked_ports: [25]", "blocked_ports: []"),
        ),
    ];
    for (what, text_) in &hollow {
        assert_ne!(text_, &good, "{what}: the test edit did nothing");
        std::fs::write(&lab.config, text_).unwrap();
        lab.signal_daemon(nix::sys::signal::Signal::SIGHUP);
        std::thread::sleep(Duration::from_millis(300));
        assert!(blocked(&lab), "{what}: port 25 opened after SIGHUP");
        // `reload` reads the socket path from the file it is given: point it at a good copy.
        let copy = lab.dir.join("good.yaml");
        std::fs::write(&copy, &good).unwrap();
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", lab.rtr))
            .arg(lab::ctl_binary())
            .args(["--config", copy.to_str().unwrap(), "reload"])
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "{what}: reload accepted\n{}",
            text(&out)
        );
        assert!(blocked(&lab), "{what}: port 25 opened after reload");
        std::fs::write(&lab.config, &good).unwrap();
        assert!(attached(&lab), "{what}: an attachment went missing");
    }
    let log = lab.daemon_log();
    assert!(
        log.contains("empty") && log.contains("no interfaces"),
        "{log}"
    );
}

/// Item 2: allow-list prefixes wider than the floor are refused on every write path unless
/// forced, and a forced one is in the audit log.
#[test]
fn wide_prefixes_need_an_audited_force() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.start_daemon();
    let refused = [
        vec!["exempt", "add", "0.0.0.0/0"],
        vec!["exempt", "add", "::/0"],
        vec!["exempt", "add", "64.0.0.0/2"],
        vec!["server", "add", "0.0.0.0/0"],
        vec!["server", "add", "2000::/3"],
        vec!["user", "add", "wide"],
        vec!["unblock", "wide"],
        vec!["user", "bind", "wide", "0.0.0.0/1"],
        vec!["session", "up", "wide", "0.0.0.0/0"],
        vec!["session", "up", "wide", "100.64.0.2", "::/0"],
    ];
    for args in &refused {
        let out = lab.ctl(args);
        let is_setup = args[0] == "unblock" || args[1] == "add" && args[0] == "user";
        if is_setup {
            assert!(out.status.success(), "{args:?}: {}", text(&out));
            continue;
        }
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?} accepted: {}",
            text(&out)
        );
        // The message names the way out on purpose.
        let t = text(&out);
        assert!(
            t.contains("wider than") && t.contains("--force-wide"),
            "{args:?}: {t}"
        );
        assert!(blocked(&lab), "{args:?}: port 25 opened");
    }
    // A session sync with a wide prefix is refused whole (no force for access servers).
    let list = lab.dir.join("sync.txt");
    std::fs::write(&list, "s1 wide 0.0.0.0/0\n").unwrap();
    let out = lab.ctl(&["session", "sync", list.to_str().unwrap()]);
    assert!(!out.status.success(), "sync accepted: {}", text(&out));
    assert!(blocked(&lab), "sync: port 25 opened");

    // Forced: accepted, effective, audited.
    let out = lab.ctl(&["exempt", "add", "100.0.0.0/6", "--force-wide"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(lab.can_connect(lab::v4().sub, lab::v4().ext, 25));
    let out = lab.ctl(&["--json", "audit"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let forced: Vec<_> = v["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "force_wide")
        .collect();
    assert_eq!(forced.len(), 1, "{v}");
    assert_eq!(forced[0]["subject"], "100.0.0.0/6", "{v}");
}

/// Item 2: a config entry may force a wide prefix; each start records it in the audit log.
#[test]
fn forced_wide_config_entries_are_audited() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.write_config("exempt:\n  - prefix: 100.0.0.0/6\n    force: true\n");
    lab.start_daemon();
    let out = lab.ctl(&["--json", "audit"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = v["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["action"] == "force_wide")
        .unwrap_or_else(|| panic!("no force_wide record: {v}"));
    assert_eq!(r["subject"], "100.0.0.0/6");
    // Without the force the same file is refused at start.
    lab.kill9();
    lab.write_config("exempt:\n  - prefix: 100.0.0.0/6\n");
    let e = lab.try_start_daemon().unwrap_err();
    assert!(e.contains("wider than"), "{e}");
}

/// Item 8: an `--until` after 2262 cannot be stored as i64 nanoseconds and used to wrap to a
/// date in the past; it is refused on the CLI, over the socket and in the config.
#[test]
fn until_after_2262_is_refused_everywhere() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.start_daemon();
    for args in [
        vec!["unblock", "carol", "--new", "--until", "2300-01-01"],
        vec![
            "unblock",
            "carol",
            "--new",
            "--until",
            "2262-04-12T00:00:00Z",
        ],
        vec!["exempt", "add", "100.64.0.2/32", "--until", "2300-01-01"],
    ] {
        let out = lab.ctl(&args);
        assert!(!out.status.success(), "{args:?} accepted: {}", text(&out));
        assert!(
            text(&out).contains("latest time"),
            "{args:?}: {}",
            text(&out)
        );
    }
    // The socket does not go through the CLI's parser.
    let until: jiff::Timestamp = "2300-01-01T00:00:00Z".parse().unwrap();
    let c = lab.client();
    let refusals = [
        c.call(proto::Unblock {
            user: "carol".into(),
            for_secs: None,
            until: Some(until),
            reason: None,
            new: true,
        })
        .map(drop),
        c.call(proto::EntryAdd {
            kind: port25_ctl::registry::store::EntryKind::Exempt,
            prefix: "100.64.0.2/32".parse().unwrap(),
            until: Some(until),
            note: None,
            force_wide: false,
        })
        .map(drop),
    ];
    for r in refusals {
        match r {
            Err(proto::Error::Daemon {
                kind: ErrorKind::Refused,
                message,
            }) => assert!(message.contains("latest time"), "{message}"),
            other => panic!("accepted over the socket, or not refused: {other:?}"),
        }
    }
    assert!(blocked(&lab));
    // Nothing was stored: carol is unknown.
    lab.fails_with(&["user", "show", "carol"], 1);
    // A time that fits is accepted and shown as given.
    let r: PolicyChange = lab.reply(&["unblock", "carol", "--new", "--until", "2262-04-11"]);
    assert_eq!(
        r.user.until,
        Some("2262-04-11T00:00:00Z".parse().unwrap()),
        "{r:?}"
    );
    assert_eq!(r.user.effective, Policy::Unblocked, "{r:?}");
}

/// Item 13: client verbs need the socket path only. A half-edited config (syntax error,
/// unknown key, bad value) must not break the hooks while the daemon runs on the good one.
#[test]
fn client_verbs_work_with_a_broken_config_file() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.start_daemon();
    let good = std::fs::read_to_string(&lab.config).unwrap();
    let socket = lab.socket.display().to_string();
    let broken = [
        (
            "syntax error",
            format!("{good}\nexempt: [ {{prefix: 10.0.0.0/8\n"),
        ),
        ("unknown key", format!("{good}\nmail_server: [1.2.3.4]\n")),
        (
            "bad value",
            good.replace("blocked_ports: [25]", "blocked_ports: [587]"),
        ),
        (
            "truncated mid-key",
            good[..good.find("pin_dir:").unwrap() + 5].to_string(),
        ),
    ];
    for (i, (what, text_)) in broken.iter().enumerate() {
        std::fs::write(&lab.config, text_).unwrap();
        let user = format!("u{i}");
        for args in [
            vec!["unblock", user.as_str(), "--new", "--for", "1h"],
            vec!["user", "show", user.as_str()],
            vec![
                "session",
                "up",
                user.as_str(),
                "100.64.0.2",
                "--id",
                user.as_str(),
            ],
            vec!["session", "down", "--id", user.as_str()],
            vec!["block", user.as_str()],
            vec!["audit", "--user", user.as_str()],
        ] {
            let out = lab.ctl(&args);
            assert!(out.status.success(), "{what}: {args:?}: {}", text(&out));
        }
    }
    // Unreadable as YAML and without a `socket:` line: --socket or PORT25_SOCKET name it.
    std::fs::write(&lab.config, "{{{{ not yaml\n").unwrap();
    let out = lab.ctl(&["--socket", &socket, "user", "show", "u0"]);
    assert!(out.status.success(), "--socket: {}", text(&out));
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.rtr))
        .arg(lab::ctl_binary())
        .args(["--config", "/nonexistent/port25.yaml", "user", "show", "u0"])
        .env("PORT25_SOCKET", &socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "PORT25_SOCKET: {}", text(&out));
    // The daemon itself still refuses the broken file on reload, and keeps enforcing.
    let out = lab.ctl(&["--socket", &socket, "reload"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(blocked(&lab));
}

/// Item 12: a boot with the wall clock behind real time (no RTC, NTP not yet synced) must not
/// revive a timed unblock that has already ended. The daemon's wall clock is shifted back a
/// day through its test hook; the registry and the kernel are real.
#[test]
fn a_wall_clock_behind_the_registry_does_not_revive_expired_unblocks() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.write_config("reconcile_interval: 1s\n");
    lab.start_daemon();
    let sub = lab::v4().sub;
    let until = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3);
    let until = until.round(jiff::Unit::Second).unwrap().to_string();
    for args in [
        vec!["unblock", "alice", "--new", "--until", until.as_str()],
        vec!["session", "up", "alice", "100.64.0.2", "--id", "a1"],
    ] {
        let out = lab.ctl(&args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
    }
    assert!(
        lab.can_connect(sub, lab::v4().ext, 25),
        "timed unblock not live"
    );
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        !lab.can_connect(sub, lab::v4().ext, 25),
        "unblock did not end"
    );
    lab.kill9();
    lab.try_start_daemon_env(&[(port25_ctl::control::testing::FAKE_WALL_SHIFT, "-86400")])
        .unwrap();
    assert!(
        !lab.can_connect(sub, lab::v4().ext, 25),
        "a clock a day behind revived alice's expired unblock"
    );
    let show: UserDetail = lab.reply(&["user", "show", "alice"]);
    assert_eq!(show.user.effective, Policy::Blocked, "{show:?}");
    // A new timed unblock is measured from the recorded time, not from the stale clock.
    let out = lab.ctl(&["unblock", "alice", "--for", "1h"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(lab.can_connect(sub, lab::v4().ext, 25));
    let log = lab.daemon_log();
    assert!(log.contains("wall clock is behind"), "{log}");
    let log: AuditLog = lab.reply(&["audit", "--user", "alice"]);
    assert!(
        log.records.iter().any(|r| r.action == "unblock.ended"),
        "{log:?}"
    );
}

/// The clock is behind at start and the end of a timed unblock was never recorded (the
/// daemon died before its reconcile, or the box was off): nothing can tell whether it has
/// ended, so it is closed, fail closed and audited; a new unblock works at once.
#[test]
fn a_wall_clock_behind_closes_timed_unblocks_it_cannot_judge() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.write_config("reconcile_interval: 600s\n");
    lab.start_daemon();
    let (sub, exempt, ext) = (lab::v4().sub, lab::v4().exempt, lab::v4().ext);
    for args in [
        vec!["unblock", "erin", "--new", "--for", "3s"],
        vec!["session", "up", "erin", "100.64.0.2", "--id", "e1"],
        vec!["unblock", "finn", "--new", "--for", "1h"],
        vec!["session", "up", "finn", "100.64.0.3", "--id", "f1"],
    ] {
        let out = lab.ctl(&args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
    }
    assert!(lab.can_connect(exempt, ext, 25), "finn's unblock not live");
    std::thread::sleep(Duration::from_secs(5));
    assert!(!lab.can_connect(sub, ext, 25), "erin's unblock did not end");
    // Killed before any reconcile recorded the end of erin's unblock.
    lab.kill9();
    lab.try_start_daemon_env(&[(port25_ctl::control::testing::FAKE_WALL_SHIFT, "-86400")])
        .unwrap();
    assert!(
        !lab.can_connect(sub, ext, 25),
        "a clock a day behind revived erin's ended unblock"
    );
    assert!(
        !lab.can_connect(exempt, ext, 25),
        "finn's unblock, which cannot be judged with this clock, stayed open"
    );
    let out = lab.ctl(&["--json", "audit", "--user", "finn"]);
    assert!(text(&out).contains("clock is behind"), "{}", text(&out));
    let out = lab.ctl(&["unblock", "finn", "--for", "1h"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        lab.can_connect(exempt, ext, 25),
        "a new unblock works at once"
    );
}

/// `reload` re-reads the daemon's own file: a client naming another one with --config is
/// told so and nothing changes (it used to print "reloaded").
#[test]
fn reload_with_another_config_file_is_refused_not_ignored() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.start_daemon();
    let other = lab.dir.join("other.yaml");
    std::fs::write(&other, "this: is not the daemon's file\n").unwrap();
    let out = std::process::Command::new(port25_tests::lab::ctl_binary())
        .arg("--config")
        .arg(&other)
        .arg("--socket")
        .arg(&lab.socket)
        .arg("reload")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("nothing was reloaded"),
        "{}",
        text(&out)
    );
    let out = lab.ctl(&["reload"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&lab.config.canonicalize().unwrap().display().to_string()),
        "the reply names the file: {}",
        text(&out)
    );
}

/// A client whose config names no socket (emptied, truncated) is told so, not only that the
/// daemon is not running.
#[test]
fn a_config_without_socket_is_named_when_the_daemon_is_not_found() {
    let dir = std::env::temp_dir().join(port25_tests::unique("p25cfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("port25.yaml");
    std::fs::write(&cfg, "# truncated by config management\n").unwrap();
    let out = std::process::Command::new(port25_tests::lab::ctl_binary())
        .arg("--config")
        .arg(&cfg)
        .env_remove("PORT25_SOCKET")
        .args(["user", "list"])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success(), "{}", text(&out));
    if !std::path::Path::new("/run/port25/ctl.sock").exists() {
        assert!(text(&out).contains("names no `socket:`"), "{}", text(&out));
    }
}
