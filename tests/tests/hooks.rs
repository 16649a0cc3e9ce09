//! The shipped router and mail-server hooks, run as pppd, accel-ppp and Dovecot run them
//! (environment, radattr files, stdin), against the real daemon in the namespace lab.

use std::{
    path::PathBuf,
    process::{Command, Output},
    time::{Duration, Instant},
};

use port25_ctl::{control::reply::UserDetail, registry::store::Policy};
use port25_tests::{
    lab::{self, Lab},
    require_root,
};

fn hook(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/hooks")
        .join(name)
}

fn run(
    lab: &Lab,
    script: &str,
    env: &[(&str, &str)],
    args: &[&str],
    stdin: Option<&str>,
) -> Output {
    use std::io::Write;
    let mut cmd = Command::new(hook(script));
    cmd.env("PORT25_CTL", lab::ctl_binary())
        .env("PORT25_CONFIG", &lab.config)
        .env("PORT25_RADATTR_DIR", &lab.dir)
        .envs(env.iter().copied())
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn smtp(lab: &Lab, src: &str) -> bool {
    let src: std::net::IpAddr = src.parse().unwrap();
    let dst = if src.is_ipv4() {
        lab::v4().ext
    } else {
        lab::v6().ext
    };
    lab.can_connect(src, dst, 25)
}

/// The user's reply to `user show`; None while the user is unknown.
fn show(lab: &Lab, user: &str) -> Option<UserDetail> {
    let o = lab.ctl(&["--json", "user", "show", user]);
    o.status
        .success()
        .then(|| serde_json::from_slice(&o.stdout).unwrap())
}

fn effective(lab: &Lab, user: &str) -> Option<Policy> {
    show(lab, user).map(|d| d.user.effective)
}

#[test]
fn pppd_hooks_with_a_radius_unblock_and_a_delegated_prefix() {
    require_root!();
    let mut lab = Lab::new("  - name: rs\n    hook: xdp");
    lab.start_daemon();
    std::fs::write(
        lab.dir.join("radattr.ppp0"),
        "Framed-Protocol PPP\nPort25-Unblock 1\nDelegated-IPv6-Prefix 2001:db8:1a0::/56\n",
    )
    .unwrap();
    let env = [
        ("PEERNAME", "alice"),
        ("IPREMOTE", "100.64.0.2"),
        ("IFNAME", "ppp0"),
    ];
    for script in ["pppd/port25-ip-up", "pppd/port25-ipv6-up"] {
        let o = run(&lab, script, &env, &[], None);
        assert!(o.status.success(), "{script}: {o:?}");
    }
    let js = show(&lab, "alice").unwrap();
    assert_eq!(
        js.user.effective,
        Policy::Unblocked,
        "RADIUS attribute unblocked: {js:?}"
    );
    assert_eq!(js.sessions.len(), 2, "{js:?}");
    assert!(smtp(&lab, "100.64.0.2") && smtp(&lab, "2001:db8:1a0:5::7"));
    // ip-up again for the same interface (ip-down was lost): no duplicate, still one session.
    assert!(run(&lab, "pppd/port25-ip-up", &env, &[], None)
        .status
        .success());
    assert_eq!(show(&lab, "alice").unwrap().sessions.len(), 2);
    for script in ["pppd/port25-ip-down", "pppd/port25-ipv6-down"] {
        assert!(run(&lab, script, &env, &[], None).status.success());
    }
    assert!(!smtp(&lab, "100.64.0.2") && !smtp(&lab, "2001:db8:1a0:5::7"));
    assert!(show(&lab, "alice").unwrap().sessions.is_empty());
    // A hook never fails the PPP session, even with the daemon gone.
    lab.kill9();
    let o = run(&lab, "pppd/port25-ip-up", &env, &[], None);
    assert!(o.status.success(), "{o:?}");
}

#[test]
fn accel_ppp_hooks_and_sync() {
    require_root!();
    let mut lab = Lab::new("  - name: rs\n    hook: xdp");
    lab.start_daemon();
    let env = [
        ("PEERNAME", "bob"),
        ("IPREMOTE", "100.64.0.3"),
        ("IFNAME", "ppp7"),
        ("IPV6_PREFIX", "2001:db8:100:7::/64"),
    ];
    assert!(run(&lab, "accel-ppp/port25-ip-up", &env, &[], None)
        .status
        .success());
    assert_eq!(show(&lab, "bob").unwrap().sessions[0].addrs.len(), 2);
    // The delegated prefix arrives later; the periodic sync picks it up.
    // As accel-cmd prints it: cells padded to the column widths that the separator gives.
    let accel_cmd = " ifname | username |     ip     |         ip6         |       ip6-dp\n\
                     --------+----------+------------+---------------------+-------------------\n \
                     ppp7   | bob      | 100.64.0.3 | 2001:db8:100:7::/64 | 2001:db8:1a1::/56\n \
                     ppp9   | alice    | 100.64.0.2 |                     |\n";
    let o = run(
        &lab,
        "accel-ppp/port25-accel-sync",
        &[],
        &["-"],
        Some(accel_cmd),
    );
    assert!(o.status.success(), "{o:?}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("1 added") && out.contains("1 changed"),
        "{out}"
    );
    assert_eq!(show(&lab, "bob").unwrap().sessions[0].addrs.len(), 3);
    let o = lab.ctl(&["unblock", "bob"]);
    assert!(o.status.success(), "{o:?}");
    let c = lab.ctl(&["check", "2001:db8:1a1:5::9", "2001:db8:ff::80"]);
    assert!(
        smtp(&lab, "2001:db8:1a1:5::9"),
        "bob's late delegated prefix is unblocked: {}",
        String::from_utf8_lossy(&c.stdout)
    );
    assert!(!smtp(&lab, "100.64.0.2"), "alice from the sync, blocked");
    assert!(run(&lab, "accel-ppp/port25-ip-down", &env, &[], None)
        .status
        .success());
    assert!(!smtp(&lab, "100.64.0.3"));
}

#[test]
fn dovecot_post_login_unblocks_and_never_fails_a_login() {
    require_root!();
    let mut lab = Lab::new("  - name: rs\n    hook: xdp");
    lab.start_daemon();
    lab.ctl(&["session", "up", "carol", "100.64.0.2", "--id", "1"]);
    let login = |lab: &Lab, user: &str| {
        let t = Instant::now();
        let o = run(
            lab,
            "dovecot/port25-post-login",
            &[("USER", user), ("IP", "100.64.0.2")],
            &["echo", "login-continues"],
            None,
        );
        (o, t.elapsed())
    };
    let (o, took) = login(&lab, "carol");
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("login-continues"));
    assert!(
        took < Duration::from_secs(2),
        "the login is not delayed: {took:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while effective(&lab, "carol") != Some(Policy::Unblocked) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let js = show(&lab, "carol").unwrap();
    assert_eq!(js.user.effective, Policy::Unblocked, "{js:?}");
    assert!(
        js.user.seconds_left.unwrap() > 85 * 60,
        "about 90 minutes: {js:?}"
    );
    assert!(smtp(&lab, "100.64.0.2"));
    // Unknown user, then the daemon down: the login still continues at once.
    let (o, _) = login(&lab, "mallory");
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("login-continues"));
    lab.kill9();
    let (o, took) = login(&lab, "carol");
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("login-continues"));
    assert!(took < Duration::from_secs(2), "{took:?}");
}
