//! `session sync` against newer events (issue 8 §3.4): a list taken before an address moved
//! or a session went down never undoes that event. Real daemon, real connections.

use port25_ctl::control::reply::UserDetail;
use port25_tests::{
    lab::{self, Lab},
    require_root, text,
};

fn ok(lab: &Lab, args: &[&str]) -> String {
    let o = lab.ctl(args);
    assert!(o.status.success(), "port25-ctl {args:?}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn sync(lab: &Lab, list: &str, taken_at: &str) -> std::process::Output {
    let file = lab.dir.join("sessions.txt");
    std::fs::write(&file, list).unwrap();
    lab.ctl(&[
        "session",
        "sync",
        file.to_str().unwrap(),
        "--taken-at",
        taken_at,
    ])
}

fn smtp(lab: &Lab, src: &str) -> bool {
    lab.can_connect(src.parse().unwrap(), lab::v4().ext, 25)
}

fn sessions_of(lab: &Lab, user: &str) -> Vec<String> {
    // An unknown user has none.
    let o = lab.ctl(&["--json", "user", "show", user]);
    if !o.status.success() {
        return vec![];
    }
    let d: UserDetail = serde_json::from_slice(&o.stdout).unwrap();
    d.sessions.into_iter().map(|s| s.id).collect()
}

fn now() -> String {
    let t = jiff::Timestamp::now().to_string();
    std::thread::sleep(std::time::Duration::from_millis(20));
    t
}

#[test]
fn an_older_snapshot_never_undoes_a_newer_event() {
    require_root!();
    let mut lab = Lab::new("  - name: rs\n    hook: xdp");
    lab.start_daemon();
    ok(
        &lab,
        &["session", "up", "alice", "100.64.0.2", "--id", "a1"],
    );
    ok(&lab, &["unblock", "alice"]);
    assert!(smtp(&lab, "100.64.0.2"));
    let before_move = now();
    // The address moves to bob (blocked) after the list was taken.
    ok(&lab, &["session", "up", "bob", "100.64.0.2", "--id", "b1"]);
    assert!(!smtp(&lab, "100.64.0.2"));
    let o = sync(&lab, "a1 alice 100.64.0.2\n", &before_move);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        sessions_of(&lab, "bob"),
        ["b1"],
        "bob's newer session stays: {}",
        text(&o)
    );
    assert!(
        sessions_of(&lab, "alice").is_empty(),
        "alice's older session does not come back"
    );
    assert!(
        !smtp(&lab, "100.64.0.2"),
        "alice's unblock must not return to her old address"
    );

    // A session that went down after the list was taken stays down.
    ok(
        &lab,
        &["session", "up", "alice", "100.64.0.3", "--id", "a2"],
    );
    let before_down = now();
    ok(&lab, &["session", "down", "--id", "a2"]);
    let o = sync(
        &lab,
        "b1 bob 100.64.0.2\na2 alice 100.64.0.3\n",
        &before_down,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(sessions_of(&lab, "alice").is_empty(), "{}", text(&o));
    assert!(!smtp(&lab, "100.64.0.3"));

    // A newer list applies as before: it takes bob's session down and brings alice's up.
    let o = sync(&lab, "a3 alice 100.64.0.3\n", &now());
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(sessions_of(&lab, "alice"), ["a3"]);
    assert!(sessions_of(&lab, "bob").is_empty());
    assert!(smtp(&lab, "100.64.0.3"));

    // A list from the future or older than the kept event window is refused, unchanged.
    let hour_ago = (jiff::Timestamp::now() - jiff::SignedDuration::from_mins(61)).to_string();
    let later = (jiff::Timestamp::now() + jiff::SignedDuration::from_mins(5)).to_string();
    for t in [hour_ago, later] {
        let o = sync(&lab, "", &t);
        assert!(!o.status.success(), "{t}: {}", text(&o));
        assert_eq!(sessions_of(&lab, "alice"), ["a3"]);
    }
}
