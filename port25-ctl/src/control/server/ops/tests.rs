//! Wire compatibility: every op's reply, built by the code, equals the JSON the untyped
//! `json!` code sent (captured before the replies were typed: `testdata/golden.json`), and
//! every reply type decodes that JSON and encodes it back unchanged.
use serde::{de::DeserializeOwned, Serialize};
use serde_json::{json, Value};

use super::*;
use crate::control::proto::{Audit, Response, UserShow};
use crate::registry::store::{sqlite::SqliteStore, Binding, Entry, Policy, Session, Store, User};
use crate::registry::{SessionUpOutcome, SyncOutcome};

const GOLDEN: &str = include_str!("../../testdata/golden.json");

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

/// The fixed registry, config and replies the golden file was captured from.
fn replies() -> serde_json::Map<String, Value> {
    let dir = tempfile::tempdir().unwrap();
    let mut store = SqliteStore::open(dir.path()).unwrap();
    let alice = User {
        name: "alice".into(),
        policy: Policy::Unblocked,
        until: None,
        reason: Some("ticket 1".into()),
        set_by: "root".into(),
        set_at: ts("2026-01-02T03:04:05Z"),
        hold: None,
    };
    let bob = User {
        name: "bob".into(),
        policy: Policy::Unblocked,
        until: Some(ts("2001-01-01T00:00:00Z")),
        reason: None,
        set_by: "root (sudo carol)".into(),
        set_at: ts("2000-01-02T03:04:05.123456789Z"),
        hold: None,
    };
    let sess = Session {
        id: "s1".into(),
        user: "alice".into(),
        addrs: vec![
            "100.64.0.2/32".parse().unwrap(),
            "2001:db8:100::/56".parse().unwrap(),
        ],
        since: ts("2026-01-02T03:04:06Z"),
        source: "hook".into(),
    };
    let rec = AuditRecord {
        id: 0,
        at: ts("2026-01-02T03:04:07Z"),
        actor: "root".into(),
        action: "unblock".into(),
        subject: "alice".into(),
        old: Some("blocked".into()),
        new: Some("unblocked".into()),
        reason: Some("ticket 1".into()),
    };
    let e1 = Entry {
        kind: EntryKind::Exempt,
        prefix: "203.0.113.0/24".parse().unwrap(),
        until: Some(ts("2000-01-01T00:00:00Z")),
        note: Some("acme".into()),
        added_by: "root".into(),
        added_at: ts("2026-01-02T03:04:08Z"),
    };
    let e2 = Entry {
        kind: EntryKind::Server,
        prefix: "198.51.100.1/32".parse().unwrap(),
        until: None,
        note: None,
        added_by: "root".into(),
        added_at: ts("2026-01-02T03:04:09Z"),
    };
    {
        let mut tx = store.begin().unwrap();
        tx.put_user(&alice).unwrap();
        tx.put_user(&bob).unwrap();
        tx.put_session(&sess).unwrap();
        tx.put_binding(&Binding {
            user: "alice".into(),
            prefix: "192.0.2.0/28".parse().unwrap(),
        })
        .unwrap();
        tx.append_audit(&rec).unwrap();
        tx.put_entry(&e1).unwrap();
        tx.put_entry(&e2).unwrap();
        tx.commit().unwrap();
    }
    let cfg = Config::parse(
        "mail_servers:\n  - 198.51.100.25/32\n  - prefix: 2001:db8:25::/64\n    force: true\nexempt:\n  - prefix: 203.0.113.16/28\n    note: \"ACME\"\n    until: 2200-12-31T00:00:00Z\n  - prefix: 192.0.2.128/25\n",
        std::path::Path::new("t.yaml"),
    ).unwrap();
    let tx = store.read().unwrap();
    let mut out = serde_json::Map::new();
    let mut put = |name: &str, v: Value| {
        out.insert(name.into(), v);
    };
    let now = ts("2026-01-02T04:00:00Z");
    let timed = User {
        until: Some(ts("2026-01-02T05:30:00Z")),
        ..alice.clone()
    };
    let value = |v: &dyn erased::Ser| v.value();
    put("user_view_timed", value(&UserView::new(&timed, now)));
    put("user_view_ended", value(&UserView::new(&bob, now)));
    for (name, op) in [
        (
            "entry_list_exempt",
            Op::EntryList(proto::EntryList {
                kind: EntryKind::Exempt,
            }),
        ),
        (
            "entry_list_server",
            Op::EntryList(proto::EntryList {
                kind: EntryKind::Server,
            }),
        ),
        (
            "user_show",
            Op::UserShow(UserShow {
                user: "alice".into(),
            }),
        ),
        (
            "user_list",
            Op::UserList(proto::UserList {
                unblocked: false,
                expiring: false,
                held: false,
                limit: None,
            }),
        ),
        (
            "audit",
            Op::Audit(Audit {
                user: None,
                since: None,
                limit: 0,
            }),
        ),
    ] {
        put(name, read(&*tx, &cfg, op).unwrap());
    }
    // The writer's ops need a daemon: their replies from the same parts ops.rs uses.
    let prefix: Prefix = "192.0.2.0/28".parse().unwrap();
    let outcome = |user: &User, changed: bool, note: &str| registry::PolicyOutcome {
        user: user.clone(),
        changed,
        note: note.into(),
    };
    put(
        "unblock",
        value(&policy_change(
            outcome(&timed, true, "unblocked until 2026-01-02T05:30:00Z"),
            now,
        )),
    );
    put(
        "block",
        value(&policy_change(outcome(&bob, false, "already blocked"), now)),
    );
    put(
        "user_add",
        value(&reply::UserAdded {
            user: UserView::new(&bob, now),
        }),
    );
    put(
        "user_remove",
        value(&reply::UserRemoved {
            removed: "alice".into(),
            sessions_removed: 2,
        }),
    );
    put(
        "user_bind",
        value(&reply::Bound {
            user: "alice".into(),
            bound: prefix,
        }),
    );
    put(
        "user_unbind",
        value(&reply::Unbound {
            user: "alice".into(),
            unbound: prefix,
        }),
    );
    put(
        "session_up",
        value(&reply::SessionUp::from(SessionUpOutcome {
            session: sess.clone(),
            user_created: true,
            taken_over: vec![("s0".into(), "bob".into(), "100.64.0.2/32".parse().unwrap())],
        })),
    );
    put("session_down", value(&reply::SessionDown { down: sess }));
    put(
        "session_sync",
        value(&SyncOutcome {
            added: 1,
            changed: 2,
            removed: 3,
            unchanged: 4,
            newer: 5,
        }),
    );
    put("entry_add", value(&reply::EntryAdded { added: e1 }));
    put(
        "entry_remove",
        value(&reply::EntryRemoved {
            removed: prefix,
            kind: EntryKind::Exempt,
        }),
    );
    put(
        "detach",
        value(&reply::Detached {
            detached: vec!["xdp/eth1".into(), "tc-egress/eth2".into()],
        }),
    );
    put(
        "reload",
        value(&reply::Reloaded {
            writes: 7,
            attached: vec!["xdp/eth3".into()],
            detached: vec![],
        }),
    );
    put(
        "info",
        value(&reply::Info {
            pid: 4242,
            uptime_s: 60,
            config: "/etc/port25/port25.yaml".into(),
            registry: "/var/lib/port25/registry.sqlite".into(),
            reconciles: 3,
            drift_repaired: 1,
            fleet: None,
            map_fill: vec![],
        }),
    );
    put("top", value(&top_reply()));
    out
}

/// A `top` answer: one flagged source held by a held user, one unknown IPv6 source.
pub(crate) fn top_reply() -> reply::Top {
    reply::Top {
        tracking: true,
        flag: reply::FlagRule {
            destinations: 20,
            attempts: 100,
            window_secs: 600,
        },
        tracked: 3,
        sources: vec![
            reply::Offender {
                src: "100.64.1.2".parse().unwrap(),
                user: Some("mallory".into()),
                held_by: Some("session ppp:ppp0 (100.64.1.2/32)".into()),
                hold: true,
                attempts: 1000,
                destinations: 266,
                destinations_saturated: true,
                segments: 1200,
                first_seen: ts("2026-01-02T03:04:05Z"),
                last_seen: ts("2026-01-02T03:09:05.5Z"),
                last_destination: "203.0.113.80:25".into(),
                reason: "block_port".into(),
                interface: "eth1".into(),
                likely_infected: true,
            },
            reply::Offender {
                src: "2001:db8:100::2".parse().unwrap(),
                user: None,
                held_by: None,
                hold: false,
                attempts: 5,
                destinations: 1,
                destinations_saturated: false,
                segments: 5,
                first_seen: ts("2026-01-02T03:00:00Z"),
                last_seen: ts("2026-01-02T03:01:00Z"),
                last_destination: "[2001:db8:ff::80]:25".into(),
                reason: "block_port".into(),
                interface: "eth1".into(),
                likely_infected: false,
            },
        ],
    }
}

/// Serialising without naming the type, so one table can hold every reply.
mod erased {
    pub trait Ser {
        fn value(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Ser for T {
        fn value(&self) -> serde_json::Value {
            serde_json::to_value(self).unwrap()
        }
    }
}

#[test]
fn every_reply_is_the_json_sent_before_it_was_typed() {
    let golden: serde_json::Map<String, Value> = serde_json::from_str(GOLDEN).unwrap();
    let now = replies();
    assert_eq!(
        now.keys().collect::<Vec<_>>(),
        golden.keys().collect::<Vec<_>>(),
        "one golden reply per op"
    );
    for (name, want) in &golden {
        assert_eq!(&now[name], want, "{name}: the reply's JSON changed");
    }
}

/// Decodes the golden JSON as `T` and encodes it back: nothing lost, nothing added.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(v: &Value) {
    let t: T = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v}"));
    assert_eq!(&serde_json::to_value(&t).unwrap(), v);
    let again: T = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
    assert_eq!(again, t);
}

#[test]
fn every_reply_type_round_trips() {
    let g: serde_json::Map<String, Value> = serde_json::from_str(GOLDEN).unwrap();
    use proto::ReplyOf;
    round_trip::<UserView>(&g["user_view_timed"]);
    round_trip::<UserView>(&g["user_view_ended"]);
    round_trip::<ReplyOf<proto::EntryList>>(&g["entry_list_exempt"]);
    round_trip::<ReplyOf<proto::EntryList>>(&g["entry_list_server"]);
    round_trip::<ReplyOf<proto::UserShow>>(&g["user_show"]);
    round_trip::<ReplyOf<proto::UserList>>(&g["user_list"]);
    round_trip::<ReplyOf<proto::Audit>>(&g["audit"]);
    round_trip::<ReplyOf<proto::Unblock>>(&g["unblock"]);
    round_trip::<ReplyOf<proto::Block>>(&g["block"]);
    round_trip::<ReplyOf<proto::UserAdd>>(&g["user_add"]);
    round_trip::<ReplyOf<proto::UserRemove>>(&g["user_remove"]);
    round_trip::<ReplyOf<proto::UserBind>>(&g["user_bind"]);
    round_trip::<ReplyOf<proto::UserUnbind>>(&g["user_unbind"]);
    round_trip::<ReplyOf<proto::SessionUp>>(&g["session_up"]);
    round_trip::<ReplyOf<proto::SessionDown>>(&g["session_down"]);
    round_trip::<ReplyOf<proto::SessionSync>>(&g["session_sync"]);
    round_trip::<ReplyOf<proto::EntryAdd>>(&g["entry_add"]);
    round_trip::<ReplyOf<proto::EntryRemove>>(&g["entry_remove"]);
    round_trip::<ReplyOf<proto::Detach>>(&g["detach"]);
    round_trip::<ReplyOf<proto::Reload>>(&g["reload"]);
    round_trip::<ReplyOf<proto::Info>>(&g["info"]);
    round_trip::<ReplyOf<proto::Top>>(&g["top"]);
}

#[test]
fn an_error_answer_names_its_kind_and_old_answers_still_decode() {
    let r = Response::err(
        crate::control::proto::ErrorKind::Refused,
        "unknown user `x`",
    );
    assert_eq!(
        serde_json::to_value(&r).unwrap(),
        json!({ "ok": false, "error": "unknown user `x`", "kind": "refused", "data": null })
    );
    // A daemon from before `kind`: a refusal.
    let old: Response = serde_json::from_str(r#"{"ok":false,"error":"no"}"#).unwrap();
    match old.reply::<proto::Info>() {
        Err(crate::control::proto::Error::Daemon { kind, message }) => {
            assert_eq!(kind, crate::control::proto::ErrorKind::Refused);
            assert_eq!(message, "no");
        }
        other => panic!("{other:?}"),
    }
    // An answer that is not the op's reply is a decoding error, not a success.
    let wrong = Response::ok(json!({ "records": [] }));
    assert!(matches!(
        wrong.reply::<proto::Info>(),
        Err(crate::control::proto::Error::Decode(_))
    ));
}

#[test]
fn the_ops_argument_checks_are_refusals() {
    use crate::control::error::ErrorKind;
    let now: Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
    let both = until_from(Some(60), Some(now), now).unwrap_err();
    assert_eq!(format!("{both:#}"), "give --for or --until, not both");
    assert_eq!(ErrorKind::of(&both), ErrorKind::Refused);
    let zero = until_from(Some(0), None, now).unwrap_err();
    assert_eq!(ErrorKind::of(&zero), ErrorKind::Refused);
    let far = storable(Some(Timestamp::MAX)).unwrap_err();
    assert_eq!(ErrorKind::of(&far), ErrorKind::Refused, "{far:#}");
}

/// A held user's views: the hold in `user show` (JSON and text), `user list --held`, and
/// where a live exempt entry (config or runtime) still opens an address: any overlapping a
/// session's address or prefix or a binding, wider or narrower.
#[test]
fn a_held_users_views_name_the_hold_and_where_it_does_not_take_effect() {
    use crate::registry::store::Hold;
    let dir = tempfile::tempdir().unwrap();
    let mut store = SqliteStore::open(dir.path()).unwrap();
    let now = ts("2026-01-02T04:00:00Z");
    let hold = Hold {
        reason: "abuse ticket 77".into(),
        by: "root (uid 0)".into(),
        at: ts("2026-01-02T03:00:00Z"),
    };
    let user = |name: &str, hold: Option<Hold>| User {
        name: name.into(),
        policy: Policy::Blocked,
        until: None,
        reason: None,
        set_by: "root".into(),
        set_at: now,
        hold,
    };
    {
        let mut tx = store.begin().unwrap();
        tx.put_user(&user("mallory", Some(hold.clone()))).unwrap();
        tx.put_user(&user("alice", None)).unwrap();
        tx.put_session(&Session {
            id: "s1".into(),
            user: "mallory".into(),
            addrs: vec![
                "100.64.0.2/32".parse().unwrap(),
                "2001:db8:1a0::/56".parse().unwrap(),
            ],
            since: now,
            source: "t".into(),
        })
        .unwrap();
        tx.put_binding(&Binding {
            user: "mallory".into(),
            prefix: "192.0.2.16/28".parse().unwrap(),
        })
        .unwrap();
        tx.put_entry(&Entry {
            kind: EntryKind::Exempt,
            prefix: "2001:db8:1a0:5::7/128".parse().unwrap(),
            until: None,
            note: Some("relay".into()),
            added_by: "root".into(),
            added_at: now,
        })
        .unwrap();
        tx.commit().unwrap();
    }
    // Wider than the session's /32, wider than the binding; an expired one (no gap).
    let cfg = Config::parse(
        "exempt:\n  - prefix: 100.64.0.0/24\n  - prefix: 192.0.2.0/24\n    note: \"ACME\"\n  - prefix: 100.64.0.2/32\n    until: 2001-01-01T00:00:00Z\n",
        std::path::Path::new("t.yaml"),
    )
    .unwrap();
    let tx = store.read().unwrap();
    let show = user_show(
        &*tx,
        &cfg,
        UserShow {
            user: "mallory".into(),
        },
        now,
    )
    .unwrap();
    assert_eq!(show.user.hold.as_ref(), Some(&hold));
    let gaps: Vec<(String, String, EntrySource)> = show
        .hold_not_effective
        .iter()
        .map(|g| (g.addr.to_string(), g.exempt.to_string(), g.source))
        .collect();
    assert_eq!(
        gaps,
        [
            (
                "100.64.0.2/32".into(),
                "100.64.0.0/24".into(),
                EntrySource::Config
            ),
            (
                "2001:db8:1a0::/56".into(),
                "2001:db8:1a0:5::7/128".into(),
                EntrySource::Runtime
            ),
            (
                "192.0.2.16/28".into(),
                "192.0.2.0/24".into(),
                EntrySource::Config
            ),
        ]
    );
    let text = crate::cli::render::user_detail(&show);
    assert!(
        text.contains("hold:      set by root (uid 0) at 2026-01-02T03:00:00Z: abuse ticket 77"),
        "{text}"
    );
    assert!(
        text.contains(
            "hold NOT effective on 192.0.2.16/28: exempt prefix 192.0.2.0/24 (config, ACME)"
        ),
        "{text}"
    );
    let json = serde_json::to_value(&show).unwrap();
    assert_eq!(json["user"]["hold"]["reason"], "abuse ticket 77", "{json}");
    assert_eq!(json["user"]["hold"]["by"], "root (uid 0)", "{json}");
    let held = user_list(
        &*tx,
        proto::UserList {
            unblocked: false,
            expiring: false,
            held: true,
            limit: None,
        },
        now,
    )
    .unwrap();
    let names: Vec<&str> = held.users.iter().map(|u| u.user.name.as_str()).collect();
    assert_eq!(names, ["mallory"]);
    // Not held: no hold field at all (the JSON of other users is unchanged).
    let alice = user_show(
        &*tx,
        &cfg,
        UserShow {
            user: "alice".into(),
        },
        now,
    )
    .unwrap();
    let json = serde_json::to_value(&alice).unwrap();
    assert!(json["user"].get("hold").is_none() && json.get("hold_not_effective").is_none());
}

/// `user list --limit N`: the first N matching users by name, each with their session
/// count, read page by page (here across pages of 1,000) rather than the whole registry.
#[test]
fn user_list_limit_takes_the_first_matching_users_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = SqliteStore::open(dir.path()).unwrap();
    let now = ts("2026-03-01T00:00:00Z");
    {
        let mut tx = store.begin().unwrap();
        for i in 0..2500u32 {
            tx.put_user(&User {
                name: format!("u{i:04}"),
                // Only every third user is unblocked: the filter spans pages.
                policy: if i % 3 == 0 {
                    Policy::Unblocked
                } else {
                    Policy::Blocked
                },
                until: None,
                reason: None,
                set_by: "root".into(),
                set_at: now,
                hold: None,
            })
            .unwrap();
        }
        tx.put_session(&Session {
            id: "s3".into(),
            user: "u0003".into(),
            addrs: vec!["100.64.0.3/32".parse().unwrap()],
            since: now,
            source: "test".into(),
        })
        .unwrap();
        tx.commit().unwrap();
    }
    let tx = store.read().unwrap();
    let list = |unblocked, limit| {
        user_list(
            &*tx,
            proto::UserList {
                unblocked,
                expiring: false,
                held: false,
                limit,
            },
            now,
        )
        .unwrap()
        .users
    };
    let names = |v: &[UserRow]| v.iter().map(|u| u.user.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&list(false, Some(3))), ["u0000", "u0001", "u0002"]);
    let first = list(true, Some(2));
    assert_eq!(names(&first), ["u0000", "u0003"]);
    assert_eq!((first[0].sessions, first[1].sessions), (0, 1));
    // Across page boundaries, and a limit beyond the matches is all of them.
    let all = list(true, None);
    assert_eq!(all.len(), 834);
    assert_eq!(names(&list(true, Some(800))), names(&all[..800]));
    assert_eq!(names(&list(true, Some(5000))), names(&all));
    assert!(list(false, Some(0)).is_empty());
}
