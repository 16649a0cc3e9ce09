//! Abuse holds end to end (issue 10, part 3): the real daemon, its socket, the CLI and the
//! shipped hooks; real TCP from the subscriber namespace, and SYNs counted on the far side.

use std::{
    net::IpAddr,
    path::PathBuf,
    process::{Command, Output},
    time::{Duration, Instant},
};

use port25_ctl::{
    bpf::{
        livemaps::{LiveMaps, Table},
        pins::Pins,
    },
    control::{
        proto::{self, ErrorKind},
        reply::{AuditLog, PolicyChange, UserDetail, UserList},
    },
    registry::store::Policy,
};
use port25_tests::{
    lab::{self, Lab},
    require_root,
    sniff::Sniffer,
    text,
};

const XDP: &str = "  - name: rs\n    hook: xdp\n    xdp_mode: native";
/// mallory's session address: the lab subscriber's own address, so real connects use it.
const MAL4: &str = "100.64.0.2";
const TICKET: &str = "abuse ticket 77: spam bot";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn ok(lab: &Lab, args: &[&str]) -> String {
    let o = lab.ctl(args);
    assert!(
        o.status.success(),
        "port25-ctl {args:?} should succeed: {}",
        text(&o)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn smtp(lab: &Lab) -> bool {
    lab.can_connect(ip(MAL4), lab::v4().ext, 25)
}

fn hook(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/hooks")
        .join(name)
}

/// Runs a shipped hook as its host does (environment, radattr directory).
fn run_hook(lab: &Lab, script: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(hook(script))
        .env("PORT25_CTL", lab::ctl_binary())
        .env("PORT25_CONFIG", &lab.config)
        .env("PORT25_RADATTR_DIR", &lab.dir)
        .envs(env.iter().copied())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

/// Every exempt map's entries, as the datapath reads them.
type Maps = (String, String, String, String, String);

fn maps(lab: &Lab) -> Maps {
    let live = LiveMaps::open(&Pins::new(&lab.pin_dir)).unwrap();
    (
        format!("{:?}", keyed(live.exip4.entries().unwrap())),
        format!("{:?}", keyed(live.exip6.entries().unwrap())),
        format!("{:?}", keyed(live.expfx4.entries().unwrap())),
        format!("{:?}", keyed(live.expfx6.entries().unwrap())),
        format!("{:?}", keyed(live.exnet6.entries().unwrap())),
    )
}

/// (key, expiry, origin): the value's fields that decide.
fn keyed<K: std::fmt::Debug>(
    m: std::collections::BTreeMap<K, port25_common::maps::Exempt>,
) -> Vec<(String, u64, u32)> {
    m.into_iter()
        .map(|(k, v)| (format!("{k:?}"), v.expires_ns, v.origin))
        .collect()
}

fn refused_unblocks(lab: &Lab) -> usize {
    let log: AuditLog = lab.reply(&["audit", "--user", "mallory", "--limit", "0"]);
    log.records
        .iter()
        .filter(|r| r.action == "unblock.refused")
        .count()
}

/// The refusal a held user's unblock gets, over the socket: typed `refused`, naming the hold.
fn assert_refused(r: Result<PolicyChange, proto::Error>) {
    match r {
        Err(proto::Error::Daemon {
            kind: ErrorKind::Refused,
            message,
        }) => assert!(
            message.contains("abuse hold") && message.contains(TICKET),
            "{message}"
        ),
        other => panic!("a held user's unblock must be refused: {other:?}"),
    }
}

#[test]
fn a_hold_keeps_port_25_closed_whatever_asks_until_unhold() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.start_daemon();
    ok(
        &lab,
        &["session", "up", "mallory", MAL4, "--id", "ppp:ppp0"],
    );
    ok(
        &lab,
        &["unblock", "mallory", "--for", "90m", "--reason", "pop"],
    );
    assert!(smtp(&lab), "a running timed unblock (POP-before-SMTP)");

    // --hold needs a reason: clap says so, and the daemon refuses it too.
    let err = lab.fails_with(&["block", "mallory", "--hold"], 2);
    assert!(err.contains("--reason"), "{err}");
    let r = lab.client().call(proto::Block {
        user: "mallory".into(),
        reason: None,
        new: false,
        hold: true,
    });
    assert!(
        matches!(&r, Err(proto::Error::Daemon { kind: ErrorKind::Refused, message }) if message.contains("--reason")),
        "{r:?}"
    );
    assert!(smtp(&lab), "a refused hold changed nothing");

    let out: PolicyChange = lab.reply(&["block", "mallory", "--hold", "--reason", TICKET]);
    let hold = out.user.hold.clone().expect("held");
    assert_eq!(hold.reason, TICKET);
    assert!(hold.by.contains("root"), "{hold:?}");
    assert_eq!(out.user.effective, Policy::Blocked);
    assert!(
        !smtp(&lab),
        "the hold ends the running timed unblock at once"
    );

    // Everything that would reopen port 25, with SYNs counted on the far side.
    let before = maps(&lab);
    let audited = refused_unblocks(&lab);
    let sniff = Sniffer::start(&lab.net, "n0");
    let err = lab.fails_with(
        &[
            "unblock",
            "mallory",
            "--for",
            "90m",
            "--reason",
            "pop-before-smtp",
        ],
        1,
    );
    assert!(
        err.contains("unblock refused")
            && err.contains("abuse hold")
            && err.contains(TICKET)
            && err.contains("root (uid 0)")
            && err.contains("unhold mallory"),
        "{err}"
    );
    lab.fails_with(&["unblock", "mallory"], 1);
    lab.fails_with(&["unblock", "mallory", "--until", "2099-01-01"], 1);
    assert_refused(lab.client().call(proto::Unblock {
        user: "mallory".into(),
        for_secs: Some(5400),
        until: None,
        reason: Some("pop-before-smtp".into()),
        new: true,
    }));
    // The Dovecot POP-before-SMTP hook, as Dovecot runs it: the login continues, the
    // unblock it asks for in the background is refused.
    let o = run_hook(
        &lab,
        "dovecot/port25-post-login",
        &[("USER", "mallory")],
        &["echo", "login-continues"],
    );
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("login-continues"),
        "{o:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while refused_unblocks(&lab) < audited + 5 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        refused_unblocks(&lab),
        audited + 5,
        "the POP hook's unblock was refused and audited"
    );
    // pppd's ip-up with a RADIUS Port25-Unblock: the session is recorded, its unblock is not.
    std::fs::write(lab.dir.join("radattr.ppp0"), "Port25-Unblock 1\n").unwrap();
    let o = run_hook(
        &lab,
        "pppd/port25-ip-up",
        &[
            ("PEERNAME", "mallory"),
            ("IPREMOTE", MAL4),
            ("IFNAME", "ppp0"),
        ],
        &[],
    );
    assert!(o.status.success(), "never fails a PPP session: {o:?}");
    assert_eq!(refused_unblocks(&lab), audited + 6);
    // session up carrying the unblock attribute, straight from the CLI.
    let o = lab.ctl(&[
        "session",
        "up",
        "mallory",
        MAL4,
        "--id",
        "radius-7",
        "--unblock-for",
        "2h",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("session `radius-7` of mallory recorded") && err.contains("abuse hold"),
        "{err}"
    );
    assert_eq!(refused_unblocks(&lab), audited + 7);
    let show: UserDetail = lab.reply(&["user", "show", "mallory"]);
    let ids: Vec<&str> = show.sessions.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["radius-7"], "the session is a fact: recorded");
    assert_eq!(show.user.effective, Policy::Blocked);

    for _ in 0..3 {
        assert!(!smtp(&lab), "port 25 stays closed for a held user");
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(sniff.syns(25), 0, "no SYN to :25 reached the far side");
    assert_eq!(
        lab.accepted(lab::v4().ext, 25),
        2,
        "only the two before the hold"
    );
    assert_eq!(maps(&lab), before, "refusals leave the maps unchanged");

    // The views.
    let hold = show.user.hold.expect("user show has the hold");
    assert_eq!(hold.reason, TICKET);
    assert!(
        show.hold_not_effective.is_empty(),
        "{:?}",
        show.hold_not_effective
    );
    let human = ok(&lab, &["user", "show", "mallory"]);
    assert!(human.contains("hold:") && human.contains(TICKET), "{human}");
    let held: UserList = lab.reply(&["user", "list", "--held"]);
    let names: Vec<&str> = held.users.iter().map(|u| u.user.name.as_str()).collect();
    assert_eq!(names, ["mallory"]);
    ok(&lab, &["user", "add", "carol"]);
    let all: UserList = lab.reply(&["user", "list"]);
    assert_eq!(all.users.len(), 2);
    let check: serde_json::Value = lab.reply(&["check", MAL4, "203.0.113.80"]);
    assert_eq!(check["verdict"], "block", "{check}");
    assert_eq!(check["holder"]["user"], "mallory", "{check}");
    assert_eq!(check["holder"]["hold"]["reason"], TICKET, "{check}");
    assert_eq!(check["holder"]["policy"], "blocked, on hold", "{check}");
    let human = ok(&lab, &["check", MAL4, "203.0.113.80"]);
    assert!(
        human.contains("abuse hold") && human.contains(TICKET),
        "{human}"
    );

    // Only unhold lifts it: not a plain block, not a session going down, not user remove.
    ok(&lab, &["block", "mallory"]);
    ok(&lab, &["session", "down", "--id", "radius-7"]);
    let err = lab.fails_with(&["user", "remove", "mallory"], 1);
    assert!(err.contains("abuse hold"), "{err}");
    ok(
        &lab,
        &["session", "up", "mallory", MAL4, "--id", "ppp:ppp0"],
    );

    // Durable: a restarted daemon still holds her.
    lab.kill9();
    lab.start_daemon();
    let show: UserDetail = lab.reply(&["user", "show", "mallory"]);
    assert_eq!(show.user.hold.map(|h| h.reason).as_deref(), Some(TICKET));
    lab.fails_with(&["unblock", "mallory", "--for", "90m"], 1);
    assert!(!smtp(&lab), "still closed after the restart");

    // An exempt entry is the operator's network-level decision, for an address whoever
    // holds it: it stays, and the views say the hold does not take effect there. A wider
    // prefix (a business range) as well as one for her very address.
    ok(&lab, &["exempt", "add", "100.64.0.0/24", "--note", "wide"]);
    assert!(smtp(&lab), "the operator's exempt prefix opens the address");
    let show: UserDetail = lab.reply(&["user", "show", "mallory"]);
    let gaps: Vec<String> = show
        .hold_not_effective
        .iter()
        .map(|g| g.exempt.to_string())
        .collect();
    assert_eq!(gaps, ["100.64.0.0/24"], "{show:?}");
    ok(&lab, &["exempt", "remove", "100.64.0.0/24"]);
    ok(
        &lab,
        &["exempt", "add", &format!("{MAL4}/32"), "--note", "relay"],
    );
    assert!(smtp(&lab), "the exempt entry opens the address");
    let show: UserDetail = lab.reply(&["user", "show", "mallory"]);
    assert_eq!(show.hold_not_effective.len(), 1, "{show:?}");
    assert_eq!(
        show.hold_not_effective[0].exempt.to_string(),
        format!("{MAL4}/32")
    );
    let check: serde_json::Value = lab.reply(&["check", MAL4, "203.0.113.80"]);
    assert_eq!(check["holder"]["hold_not_effective"], true, "{check}");
    assert!(ok(&lab, &["check", MAL4, "203.0.113.80"]).contains("NOT effective"));
    ok(&lab, &["exempt", "remove", &format!("{MAL4}/32")]);
    assert!(!smtp(&lab));

    // unhold (a reason required) leaves her blocked; then an unblock works again.
    lab.fails_with(&["unhold", "mallory"], 2);
    let out: PolicyChange = lab.reply(&["unhold", "mallory", "--reason", "machine cleaned"]);
    assert!(
        out.user.hold.is_none() && out.user.effective == Policy::Blocked,
        "{out:?}"
    );
    assert!(!smtp(&lab), "unhold does not unblock");
    ok(
        &lab,
        &["unblock", "mallory", "--for", "90m", "--reason", "pop"],
    );
    assert!(smtp(&lab), "unhold, then unblock opens port 25");
    let log: AuditLog = lab.reply(&["audit", "--user", "mallory", "--limit", "0"]);
    let actions: Vec<&str> = log.records.iter().map(|r| r.action.as_str()).collect();
    for a in ["hold", "unblock.refused", "unhold"] {
        assert!(actions.contains(&a), "{a} audited: {actions:?}");
    }
}
