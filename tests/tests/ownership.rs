//! Ownership (issue 8 §3.3): an address held by a live session follows
//! its user's policy only; a wider prefix of another user (a static binding, a stale
//! delegated prefix) never exempts it. Both orders of events, real connections, the real
//! daemon and maps, on XDP and TC.

use port25_tests::{
    lab::{self, Lab},
    require_root, text,
};

fn ok(lab: &Lab, args: &[&str]) -> String {
    let o = lab.ctl(args);
    assert!(o.status.success(), "port25-ctl {args:?}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
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

/// The blocked user's address is blocked (connection and `check`); the unblocked user's
/// wider prefix still opens what no live session of anyone else holds.
fn assert_owner_decides(lab: &Lab, blocked: &str, other_in_prefix: Option<&str>, what: &str) {
    assert!(
        !smtp(lab, blocked),
        "{what}: {blocked} of the blocked user passed"
    );
    let dst = if blocked.contains(':') {
        "2001:db8:ff::80"
    } else {
        "203.0.113.80"
    };
    let c: serde_json::Value = lab.reply(&["check", blocked, dst]);
    assert_eq!(c["verdict"], "block", "{what}: {c}");
    if let Some(o) = other_in_prefix {
        assert!(
            smtp(lab, o),
            "{what}: the unblocked user's prefix still opens {o}"
        );
    }
}

#[test]
fn a_wider_prefix_of_another_user_never_exempts_a_live_session() {
    require_root!();
    for hook in [
        "  - name: rs\n    hook: xdp\n    xdp_mode: native",
        "  - name: rs\n    hook: tc\n    direction: ingress",
    ] {
        let mut lab = Lab::new(hook);
        lab.start_daemon();
        ok(&lab, &["unblock", "xavier", "--new"]);
        ok(&lab, &["user", "add", "yvonne"]);

        // Binding first, then the blocked user's session inside it.
        ok(&lab, &["user", "bind", "xavier", "100.64.0.0/24"]);
        ok(
            &lab,
            &["session", "up", "yvonne", "100.64.0.2", "--id", "y1"],
        );
        assert_owner_decides(&lab, "100.64.0.2", Some("100.64.0.3"), "bind, then session");
        // Her session going down gives the address back to the binding.
        ok(&lab, &["session", "down", "--id", "y1"]);
        assert!(
            smtp(&lab, "100.64.0.2"),
            "no session holds it: the binding applies"
        );
        ok(&lab, &["user", "unbind", "xavier", "100.64.0.0/24"]);

        // Session first, then the binding around it.
        ok(
            &lab,
            &["session", "up", "yvonne", "100.64.0.2", "--id", "y2"],
        );
        ok(&lab, &["user", "bind", "xavier", "100.64.0.0/24"]);
        assert_owner_decides(&lab, "100.64.0.2", Some("100.64.0.3"), "session, then bind");
        // Unblocking her opens her address; blocking her closes it again under the binding.
        ok(&lab, &["unblock", "yvonne"]);
        assert!(smtp(&lab, "100.64.0.2"));
        ok(&lab, &["block", "yvonne"]);
        assert_owner_decides(&lab, "100.64.0.2", None, "blocked again");
        ok(&lab, &["session", "down", "--id", "y2"]);
        ok(&lab, &["user", "unbind", "xavier", "100.64.0.0/24"]);

        // A stale delegated /56 of xavier (its down event lost), then yvonne gets an
        // address and a /64 inside it.
        ok(
            &lab,
            &[
                "session",
                "up",
                "xavier",
                "2001:db8:1a0::/56",
                "--id",
                "x-pd",
            ],
        );
        assert!(smtp(&lab, "2001:db8:1a0:5::7"));
        ok(
            &lab,
            &["session", "up", "yvonne", "2001:db8:1a0:5::7", "--id", "y3"],
        );
        assert_owner_decides(&lab, "2001:db8:1a0:5::7", None, "stale /56, then /128");
        ok(&lab, &["session", "down", "--id", "y3"]);
        ok(
            &lab,
            &[
                "session",
                "up",
                "yvonne",
                "2001:db8:1a0:5::/64",
                "--id",
                "y4",
            ],
        );
        assert_owner_decides(&lab, "2001:db8:1a0:5::7", None, "stale /56, then /64");
        ok(&lab, &["session", "down", "--id", "y4"]);
        ok(&lab, &["session", "down", "--id", "x-pd"]);

        // The other order: yvonne's /64 first, then xavier's /56 around it.
        ok(
            &lab,
            &[
                "session",
                "up",
                "yvonne",
                "2001:db8:1a0:5::/64",
                "--id",
                "y5",
            ],
        );
        ok(
            &lab,
            &[
                "session",
                "up",
                "xavier",
                "2001:db8:1a0::/56",
                "--id",
                "x-pd2",
            ],
        );
        assert_owner_decides(&lab, "2001:db8:1a0:5::7", None, "/64, then stale /56");

        // A restart rebuilds the same maps from the registry.
        lab.kill9();
        lab.start_daemon();
        assert_owner_decides(&lab, "2001:db8:1a0:5::7", None, "after a restart");
    }
}

/// The operator's own exempts (config `exempt`, `exempt add`) are policy for the address,
/// whoever holds it: a static business customer's session, reported by the access server
/// while the customer is not unblocked by name, stays open. Another user's binding still
/// never opens it (the test above).
#[test]
fn the_operators_exempt_still_opens_a_blocked_users_session() {
    require_root!();
    for hook in [
        "  - name: rs\n    hook: xdp\n    xdp_mode: native",
        "  - name: rs\n    hook: tc\n    direction: ingress",
    ] {
        let mut lab = Lab::new(hook);
        lab.write_config(
            "exempt:\n  - prefix: 100.64.0.3/32\n  - prefix: \"2001:db8:100::3/128\"\n",
        );
        lab.start_daemon();
        ok(&lab, &["user", "add", "acme"]);
        ok(&lab, &["user", "add", "zed"]);
        ok(&lab, &["session", "up", "acme", "100.64.0.3", "--id", "a1"]);
        ok(
            &lab,
            &["session", "up", "acme", "2001:db8:100::3", "--id", "a2"],
        );
        assert!(
            smtp(&lab, "100.64.0.3"),
            "config /32 under a blocked session"
        );
        assert!(
            smtp(&lab, "2001:db8:100::3"),
            "config /128 under a blocked session"
        );
        let c: serde_json::Value = lab.reply(&["check", "100.64.0.3", "203.0.113.80"]);
        assert_eq!(c["verdict"], "pass", "{c}");

        // A runtime exempt prefix around a blocked user's session opens it too; without it,
        // another user's binding around the same session does not.
        ok(&lab, &["session", "up", "zed", "100.64.0.2", "--id", "z1"]);
        ok(&lab, &["unblock", "xavier", "--new"]);
        ok(&lab, &["user", "bind", "xavier", "100.64.0.0/24"]);
        assert_owner_decides(&lab, "100.64.0.2", None, "binding around a blocked session");
        ok(
            &lab,
            &["exempt", "add", "100.64.0.0/30", "--note", "ACME static"],
        );
        assert!(
            smtp(&lab, "100.64.0.2"),
            "runtime exempt /30 under a blocked session"
        );
        ok(&lab, &["exempt", "remove", "100.64.0.0/30"]);
        assert_owner_decides(&lab, "100.64.0.2", None, "exempt removed");

        // A restart rebuilds the same maps from the registry.
        lab.kill9();
        lab.start_daemon();
        assert!(smtp(&lab, "100.64.0.3"), "after a restart");
        assert_owner_decides(&lab, "100.64.0.2", None, "after a restart");
    }
}

/// An IPv4 session prefix (a routed Framed-Route) belongs to its session's user too: a
/// narrower binding of another user inside it, written before or after, never opens it.
#[test]
fn a_narrower_binding_never_opens_a_blocked_ipv4_session_prefix() {
    require_root!();
    let mut lab = Lab::new("  - name: rs\n    hook: xdp\n    xdp_mode: generic");
    lab.start_daemon();
    ok(&lab, &["user", "add", "bea"]);
    ok(&lab, &["unblock", "ulf", "--new"]);

    // Session first, then the narrower binding.
    ok(
        &lab,
        &["session", "up", "bea", "100.64.0.0/29", "--id", "b1"],
    );
    ok(&lab, &["user", "bind", "ulf", "100.64.0.0/30"]);
    assert_owner_decides(&lab, "100.64.0.2", None, "session /29, then binding /30");
    ok(&lab, &["session", "down", "--id", "b1"]);
    assert!(
        smtp(&lab, "100.64.0.2"),
        "no session holds it: the binding applies"
    );

    // Binding first, then the session around it.
    ok(
        &lab,
        &["session", "up", "bea", "100.64.0.0/29", "--id", "b2"],
    );
    assert_owner_decides(&lab, "100.64.0.2", None, "binding /30, then session /29");
    // Unblocking bea opens her whole prefix.
    ok(&lab, &["unblock", "bea"]);
    assert!(smtp(&lab, "100.64.0.3"));
    ok(&lab, &["block", "bea"]);
    assert_owner_decides(&lab, "100.64.0.3", None, "blocked again");

    // Too wide to be written address by address: refused, nothing changes.
    let e = lab.fails_with(&["session", "up", "bea", "100.64.0.0/21", "--id", "b3"], 1);
    // The message names the widest prefix that is accepted, on purpose.
    assert!(e.contains("/22"), "{e}");
    assert_owner_decides(&lab, "100.64.0.3", None, "after the refusal");
}
