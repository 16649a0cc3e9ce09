//! TEMPORARY: captures the JSON the current `json!` code emits, for the golden file.
use super::*;
use crate::registry::store::{sqlite::SqliteStore, Binding, Entry, EntryKind, Policy, Session, Store};
use crate::registry::{SessionUpOutcome, SyncOutcome};

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

#[test]
fn capture() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = SqliteStore::open(dir.path()).unwrap();
    let alice = User {
        name: "alice".into(),
        policy: Policy::Unblocked,
        until: None,
        reason: Some("ticket 1".into()),
        set_by: "root".into(),
        set_at: ts("2026-01-02T03:04:05Z"),
    };
    let bob = User {
        name: "bob".into(),
        policy: Policy::Unblocked,
        until: Some(ts("2001-01-01T00:00:00Z")),
        reason: None,
        set_by: "root (sudo carol)".into(),
        set_at: ts("2000-01-02T03:04:05.123456789Z"),
    };
    let sess = Session {
        id: "s1".into(),
        user: "alice".into(),
        addrs: vec!["100.64.0.2/32".parse().unwrap(), "2001:db8:100::/56".parse().unwrap()],
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
        tx.put_binding(&Binding { user: "alice".into(), prefix: "192.0.2.0/28".parse().unwrap() }).unwrap();
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
    let now = ts("2026-01-02T04:00:00Z");
    let timed = User { until: Some(ts("2026-01-02T05:30:00Z")), ..alice.clone() };
    out.insert("user_view_timed".into(), user_view(&timed, now));
    out.insert("user_view_ended".into(), user_view(&bob, now));
    for (name, op) in [
        ("entry_list_exempt", Op::EntryList { kind: EntryKind::Exempt }),
        ("entry_list_server", Op::EntryList { kind: EntryKind::Server }),
        ("user_show", Op::UserShow { user: "alice".into() }),
        ("user_list", Op::UserList { unblocked: false, expiring: false }),
        ("audit", Op::Audit { user: None, since: None, limit: 0 }),
    ] {
        out.insert(name.into(), read(&*tx, &cfg, op).unwrap());
    }
    // The writer's ops, as ops::run builds them today (same expressions, fixed inputs).
    let prefix: crate::net::Prefix = "192.0.2.0/28".parse().unwrap();
    out.insert("unblock".into(), json!({ "user": user_view(&timed, now), "changed": true, "note": "unblocked until 2026-01-02T05:30:00Z" }));
    out.insert("block".into(), json!({ "user": user_view(&bob, now), "changed": false, "note": "already blocked" }));
    out.insert("user_add".into(), json!({ "user": user_view(&bob, now) }));
    out.insert("user_remove".into(), json!({ "removed": "alice", "sessions_removed": 2usize }));
    out.insert("user_bind".into(), json!({ "user": "alice", "bound": prefix }));
    out.insert("user_unbind".into(), json!({ "user": "alice", "unbound": prefix }));
    out.insert("session_up".into(), serde_json::to_value(SessionUpOutcome {
        session: sess.clone(),
        user_created: true,
        taken_over: vec![("s0".into(), "bob".into(), "100.64.0.2/32".parse().unwrap())],
    }).unwrap());
    out.insert("session_down".into(), json!({ "down": sess }));
    out.insert("session_sync".into(), serde_json::to_value(SyncOutcome { added: 1, changed: 2, removed: 3, unchanged: 4, newer: 5 }).unwrap());
    out.insert("entry_add".into(), json!({ "added": e1 }));
    out.insert("entry_remove".into(), json!({ "removed": prefix, "kind": EntryKind::Exempt }));
    out.insert("detach".into(), json!({ "detached": vec!["xdp/eth1".to_string(), "tc-egress/eth2".to_string()] }));
    out.insert("reload".into(), json!({ "writes": 7usize, "attached": vec!["xdp/eth3".to_string()], "detached": Vec::<String>::new() }));
    out.insert("info".into(), json!({
        "pid": 4242u32,
        "uptime_s": 60u64,
        "config": "/etc/port25/port25.yaml",
        "registry": "/var/lib/port25/registry.sqlite",
        "reconciles": 3u64,
        "drift_repaired": 1u64,
    }));
    std::fs::write(
        concat!(env!("CARGO_MANIFEST_DIR"), "/src/control/testdata/golden.json"),
        serde_json::to_string_pretty(&serde_json::Value::Object(out)).unwrap() + "\n",
    ).unwrap();
}
