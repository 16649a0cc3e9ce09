//! The shipped hooks fed hostile values, as their hosts pass them: user names that hold
//! spaces, `|`, `#`, line breaks, bidi or zero-width characters, or look like options. A
//! value is data: nothing that should stay blocked gets exempted, and `x#` breaks no sync.

use std::{path::PathBuf, process::Output};

use port25_ctl::control::reply::{UserDetail, UserList};
use port25_tests::{
    lab::{self, Lab},
    require_root, text,
};

fn run(lab: &Lab, script: &str, env: &[(&str, &str)], args: &[&str], stdin: &str) -> Output {
    use std::io::Write;
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/hooks")
        .join(script);
    let mut child = std::process::Command::new(path)
        .env("PORT25_CTL", lab::ctl_binary())
        .env("PORT25_CONFIG", &lab.config)
        .env("PORT25_RADATTR_DIR", &lab.dir)
        .envs(env.iter().copied())
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// `accel-cmd show sessions ifname,username,ip,ip6,ip6-dp` as accel-ppp prints it: every
/// cell padded to its column's width in bytes, whatever the cell holds.
fn accel_table(rows: &[[&str; 5]]) -> String {
    let head = ["ifname", "username", "ip", "ip6", "ip6-dp"];
    let w: Vec<usize> = (0..5)
        .map(|c| {
            rows.iter()
                .map(|r| r[c].len())
                .chain([head[c].len()])
                .max()
                .unwrap()
        })
        .collect();
    let line = |cells: &[&str; 5]| {
        let v: Vec<String> = (0..5)
            .map(|c| format!(" {:<1$} ", cells[c], w[c]))
            .collect();
        v.join("|")
    };
    let sep: Vec<String> = w.iter().map(|n| "-".repeat(n + 2)).collect();
    let mut out = format!("{}\n{}\n", line(&head), sep.join("+"));
    for r in rows {
        out += &line(r);
        out += "\n";
    }
    out
}

fn smtp(lab: &Lab, src: &str) -> bool {
    lab.can_connect(src.parse().unwrap(), lab::v4().ext, 25)
}

fn user_names(lab: &Lab) -> Vec<String> {
    let list: UserList = lab.reply(&["user", "list"]);
    list.users.into_iter().map(|u| u.user.name).collect()
}

fn addrs_of(lab: &Lab, user: &str) -> Vec<String> {
    // An unknown user has none.
    let o = lab.ctl(&["--json", "user", "show", user]);
    if !o.status.success() {
        return vec![];
    }
    let d: UserDetail = serde_json::from_slice(&o.stdout).unwrap();
    d.sessions
        .iter()
        .flat_map(|s| &s.addrs)
        .map(|a| a.to_string())
        .collect()
}

/// 100.64.0.3 is held by no session: only a wrongly exempted prefix could open it.
const FREE: &str = "100.64.0.3";

#[test]
fn accel_sync_keeps_user_names_data() {
    require_root!();
    let mut lab = Lab::new("  - name: rs\n    hook: xdp");
    lab.start_daemon();
    let ok = |args: &[&str]| {
        let o = lab.ctl(args);
        assert!(o.status.success(), "{args:?}: {}", text(&o));
    };
    ok(&["unblock", "alice", "--new"]);
    assert!(!smtp(&lab, FREE));
    let sync = |rows: &[[&str; 5]]| {
        run(
            &lab,
            "accel-ppp/port25-accel-sync",
            &[],
            &["-"],
            &accel_table(rows),
        )
    };

    // A space or `|` in the name must not make the rest of it alice's address range.
    for name in [
        "alice 100.64.0.0/10",
        "alice|100.64.0.0/10",
        "alice | 100.64.0.0/10 |",
    ] {
        let o = sync(&[["ppp1", name, "100.64.0.9", "", ""]]);
        assert!(addrs_of(&lab, "alice").is_empty(), "{name:?}: {}", text(&o));
        assert!(!smtp(&lab, FREE), "{name:?} opened {FREE}: {}", text(&o));
    }
    // A name with a line break forges a row of its own: the table is refused whole.
    let forged = "alice | 100.64.0.0/10 |  | \n ppp5 | x";
    let o = sync(&[["ppp1", forged, "100.64.0.9", "", ""]]);
    assert!(!o.status.success(), "a forged row is refused: {}", text(&o));
    assert!(addrs_of(&lab, "alice").is_empty() && !smtp(&lab, FREE));
    // Invisible characters: refused with a clear error, no look-alike user registered.
    for name in ["alice\u{202e}", "alice\u{200b}", "-alice"] {
        let o = sync(&[["ppp1", name, "100.64.0.9", "", ""]]);
        assert!(!o.status.success(), "{name:?}: {}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("user name"),
            "{}",
            text(&o)
        );
    }
    let names = user_names(&lab);
    assert!(
        !names
            .iter()
            .any(|n| n.contains(['\u{202e}', '\u{200b}']) || n.starts_with('-')),
        "{names:?}"
    );
    // `x#` is a name like any other: it breaks neither its row nor the others.
    let o = sync(&[
        [
            "ppp7",
            "bob",
            "100.64.0.7",
            "2001:db8:100:7::/64",
            "2001:db8:1a1::/56",
        ],
        ["ppp8", "x#", "100.64.0.8", "", ""],
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(addrs_of(&lab, "bob").len(), 3);
    assert_eq!(addrs_of(&lab, "x#"), ["100.64.0.8/32"]);
    assert!(!smtp(&lab, FREE));
}

#[test]
fn ppp_and_dovecot_hooks_pass_names_as_data() {
    require_root!();
    let mut lab = Lab::new("  - name: rs\n    hook: xdp");
    lab.start_daemon();
    std::fs::write(lab.dir.join("radattr.ppp0"), "Port25-Unblock 1\n").unwrap();
    for name in [
        "alice 100.64.0.0/10",
        "--new",
        "-h",
        "alice\u{200b}",
        "alice\u{2066}",
    ] {
        let env = [("PEERNAME", name), ("IPREMOTE", FREE), ("IFNAME", "ppp0")];
        for script in ["pppd/port25-ip-up", "accel-ppp/port25-ip-up"] {
            let o = run(&lab, script, &env, &[], "");
            assert!(
                o.status.success(),
                "{script} never fails a session: {}",
                text(&o)
            );
            assert!(!smtp(&lab, FREE), "{script} with {name:?} opened {FREE}");
        }
        let o = run(
            &lab,
            "dovecot/port25-post-login",
            &[("USER", name)],
            &["true"],
            "",
        );
        assert!(o.status.success());
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let names = user_names(&lab);
    assert!(names.is_empty(), "no hostile name registered: {names:?}");
    assert!(!smtp(&lab, FREE));
}
