//! The human output is what it was before the replies were typed: each renderer, given the
//! golden reply of its op (`control/testdata/golden.json`), prints the text the untyped
//! renderer printed for it (`testdata/human.json`, captured from that renderer).

use std::path::PathBuf;

use serde_json::Value;

use super::super::{ExemptVerb, ServerVerb, SessionVerb, UserVerb, Verb};
use super::*;

const GOLDEN: &str = include_str!("../../control/testdata/golden.json");
const HUMAN: &str = include_str!("../testdata/human.json");

fn typed<T: serde::de::DeserializeOwned>(v: &Value) -> T {
    serde_json::from_value(v.clone()).unwrap()
}

/// (case, the verb, its golden reply, the text of the typed renderer).
fn cases() -> Vec<(&'static str, Verb, &'static str, String)> {
    let g: serde_json::Map<String, Value> = serde_json::from_str(GOLDEN).unwrap();
    let p = |s: &str| -> Prefix { s.parse().unwrap() };
    let user = || "alice".to_string();
    let mut v = vec![];
    let mut case = |name, verb, key: &'static str, new: String| v.push((name, verb, key, new));
    let unblock = || Verb::Unblock {
        user: user(),
        for_secs: None,
        until: None,
        reason: None,
        new: false,
    };
    case(
        "unblock",
        unblock(),
        "unblock",
        unblocked("alice", &typed(&g["unblock"])),
    );
    case(
        "unblock_kept",
        unblock(),
        "block",
        unblocked("alice", &typed(&g["block"])),
    );
    case(
        "block",
        Verb::Block {
            user: user(),
            reason: None,
            new: false,
            hold: false,
        },
        "block",
        blocked("alice", &typed(&g["block"])),
    );
    case(
        "user_show",
        Verb::User(UserVerb::Show { user: user() }),
        "user_show",
        user_detail(&typed(&g["user_show"])),
    );
    case(
        "user_list",
        Verb::User(UserVerb::List {
            unblocked: false,
            expiring: false,
            held: false,
            limit: None,
        }),
        "user_list",
        user_list(&typed(&g["user_list"])),
    );
    case(
        "user_add",
        Verb::User(UserVerb::Add { user: user() }),
        "user_add",
        user_added("alice", &typed(&g["user_add"])),
    );
    case(
        "user_remove",
        Verb::User(UserVerb::Remove { user: user() }),
        "user_remove",
        user_removed("alice", &typed(&g["user_remove"])),
    );
    case(
        "user_bind",
        Verb::User(UserVerb::Bind {
            user: user(),
            prefix: p("192.0.2.0/28"),
            force_wide: false,
        }),
        "user_bind",
        bound(&typed(&g["user_bind"])),
    );
    case(
        "user_unbind",
        Verb::User(UserVerb::Unbind {
            user: user(),
            prefix: p("192.0.2.0/28"),
        }),
        "user_unbind",
        unbound(&typed(&g["user_unbind"])),
    );
    case(
        "session_up",
        Verb::Session(SessionVerb::Up {
            user: user(),
            addrs: vec![p("100.64.0.2/32")],
            id: None,
            source: None,
            force_wide: false,
            unblock: false,
            unblock_for: None,
            iface: None,
        }),
        "session_up",
        session_up("alice", &typed(&g["session_up"])),
    );
    case(
        "session_down",
        Verb::Session(SessionVerb::Down {
            id: Some("s1".into()),
            user: None,
            addr: None,
        }),
        "session_down",
        session_down(&typed(&g["session_down"])),
    );
    case(
        "session_sync",
        Verb::Session(SessionVerb::Sync {
            file: PathBuf::from("-"),
            taken_at: None,
        }),
        "session_sync",
        sync_summary(&typed(&g["session_sync"])),
    );
    case(
        "exempt_add",
        Verb::Exempt(ExemptVerb::Add {
            prefix: p("203.0.113.0/24"),
            until: None,
            note: None,
            force_wide: false,
        }),
        "entry_add",
        entry_added(&p("203.0.113.0/24"), &typed(&g["entry_add"])),
    );
    case(
        "exempt_remove",
        Verb::Exempt(ExemptVerb::Remove {
            prefix: p("192.0.2.0/28"),
        }),
        "entry_remove",
        entry_removed(&typed(&g["entry_remove"])),
    );
    case(
        "exempt_list",
        Verb::Exempt(ExemptVerb::List),
        "entry_list_exempt",
        entry_list(&typed(&g["entry_list_exempt"])),
    );
    case(
        "server_list",
        Verb::Server(ServerVerb::List),
        "entry_list_server",
        entry_list(&typed(&g["entry_list_server"])),
    );
    case(
        "audit",
        Verb::Audit {
            user: None,
            since: None,
            limit: 0,
        },
        "audit",
        audit_log(&typed(&g["audit"])),
    );
    case(
        "reload",
        Verb::Reload,
        "reload",
        reloaded(
            Some(Path::new("/etc/port25/port25.yaml")),
            &typed(&g["reload"]),
        ),
    );
    case(
        "detach",
        Verb::Detach,
        "detach",
        detached(&typed(&g["detach"])),
    );
    case(
        "top",
        Verb::Top {
            since: None,
            limit: 20,
        },
        "top",
        top(&typed(&g["top"])),
    );
    v
}

#[test]
fn every_renderer_prints_what_it_printed_before() {
    let want: serde_json::Map<String, Value> = serde_json::from_str(HUMAN).unwrap();
    let cases = cases();
    assert_eq!(cases.len(), want.len(), "one text per case");
    for (name, _verb, _key, text) in cases {
        assert_eq!(Some(text.as_str()), want[name].as_str(), "{name}");
    }
}

/// Tracking off says so instead of an empty table.
#[test]
fn top_with_tracking_off_says_so() {
    let g: serde_json::Map<String, Value> = serde_json::from_str(GOLDEN).unwrap();
    let mut t: Top = typed(&g["top"]);
    t.tracking = false;
    assert!(
        top(&t).starts_with("offender tracking is off"),
        "{}",
        top(&t)
    );
}
