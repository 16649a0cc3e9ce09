//! The per-change update must always equal the full build: random operations through the
//! real rules on SQLite on disk, the daemon's per-change step after each, compared with a
//! build from scratch. And the full build itself, on a hand-made registry.

use proptest::prelude::*;

use super::*;
use crate::{
    config::Config,
    registry::store::{snapshot_of, sqlite::SqliteStore, Policy, Recording, Store},
    registry::{self, Actor},
};

#[derive(Debug, Clone)]
enum Op {
    Up(usize, usize, Vec<usize>),
    Down(usize),
    Unblock(usize, Option<u8>),
    Block(usize),
    Bind(usize, usize),
    Unbind(usize, usize),
    Remove(usize),
    /// A `session sync` list: (user, id, addresses) each; a bad list is refused.
    Sync(Vec<(usize, usize, Vec<usize>)>),
}

const USERS: [&str; 4] = ["alice", "bob", "carol", "dave"];
/// Session addresses: exact, IPv6 prefixes of two lengths, one also the config's exempt.
const ADDRS: [&str; 7] = [
    "100.64.0.1",
    "100.64.0.2",
    "100.64.0.3",
    "2001:db8:100::5",
    "2001:db8:1a0::/56",
    "2001:db8:1a0::/64",
    "2001:db8:1a1::/48",
];
/// Static bindings: one equal to a session address, so sources overlap.
const BINDINGS: [&str; 3] = ["203.0.113.16/28", "2001:db8:2::/48", "100.64.0.2"];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (
            0..4usize,
            0..6usize,
            prop::collection::vec(0..ADDRS.len(), 1..3)
        )
            .prop_map(|(u, id, a)| Op::Up(u, id, a)),
        (0..6usize).prop_map(Op::Down),
        (0..4usize, prop::option::of(1..4u8)).prop_map(|(u, h)| Op::Unblock(u, h)),
        (0..4usize).prop_map(Op::Block),
        (0..4usize, 0..BINDINGS.len()).prop_map(|(u, b)| Op::Bind(u, b)),
        (0..4usize, 0..BINDINGS.len()).prop_map(|(u, b)| Op::Unbind(u, b)),
        (0..4usize).prop_map(Op::Remove),
        prop::collection::vec(
            (
                0..4usize,
                0..6usize,
                prop::collection::vec(0..ADDRS.len(), 1..3)
            ),
            0..4
        )
        .prop_map(Op::Sync),
    ]
}

fn run(tx: &mut dyn crate::registry::store::Tx, op: &Op, now: jiff::Timestamp) -> Result<()> {
    let a = Actor {
        uid: 0,
        name: "root".into(),
        on_behalf_of: None,
    };
    let p = |s: &str| s.parse::<Prefix>().unwrap();
    match op {
        Op::Up(u, id, addrs) => {
            let addrs = addrs.iter().map(|i| p(ADDRS[*i])).collect();
            registry::session_up(tx, &a, USERS[*u], Some(&id.to_string()), addrs, "t", now)
                .map(|_| ())
        }
        Op::Down(id) => registry::session_down_id(tx, &a, &id.to_string(), now).map(|_| ()),
        Op::Unblock(u, hours) => {
            let until = hours.map(|h| {
                now.checked_add(jiff::SignedDuration::from_hours(h as i64))
                    .unwrap()
            });
            registry::unblock(tx, &a, USERS[*u], until, None, true, now).map(|_| ())
        }
        Op::Block(u) => registry::block(tx, &a, USERS[*u], None, true, false, now).map(|_| ()),
        Op::Bind(u, b) => registry::bind(tx, &a, USERS[*u], p(BINDINGS[*b]), now),
        Op::Unbind(u, b) => registry::unbind(tx, &a, USERS[*u], p(BINDINGS[*b]), now),
        Op::Remove(u) => registry::user_remove(tx, &a, USERS[*u], now).map(|_| ()),
        Op::Sync(list) => {
            let list = list
                .iter()
                .map(|(u, id, addrs)| registry::SyncSession {
                    id: id.to_string(),
                    user: USERS[*u].to_string(),
                    addrs: addrs.iter().map(|i| p(ADDRS[*i])).collect(),
                })
                .collect();
            registry::session_sync(tx, &a, list, None, now).map(|_| ())
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn per_change_update_equals_the_full_build(ops in prop::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        let cfg = Config::parse(
            "exempt: [{prefix: 100.64.0.1/32, until: 2026-11-23T10:30:00Z}, {prefix: \"2001:db8:2::/48\"}]\n",
            std::path::Path::new("t"),
        ).unwrap();
        let now: jiff::Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
        let boot = 5_000_000_000_000;
        let (mut index, mut applied) =
            crate::policy::Desired::build_indexed(&cfg, &store.snapshot().unwrap(), now, boot).unwrap();
        for op in &ops {
            let mut rec = Recording::new(store.begin().unwrap());
            if run(&mut rec, op, now).is_err() {
                continue; // refused: the transaction is dropped, nothing changes
            }
            prop_assert!(!rec.entries);
            let changed = changed_users(&rec, now, boot).unwrap();
            let plan = match index.plan(&applied, changed) {
                Ok(p) => p,
                Err(_) => continue, // too many prefix lengths: refused before commit
            };
            let snap_in_tx = snapshot_of(&rec).unwrap();
            rec.commit().unwrap();
            index.apply(&mut applied, &plan);
            let full = crate::policy::Desired::build(&cfg, &snap_in_tx, now, boot).unwrap();
            prop_assert_eq!(&applied, &full, "after {:?}", op);
        }
    }
}

/// `longer` is a maximum over one order: every way of merging the same entries for one key
/// gives the same winner, and the winners are the ones `longer` documents.
#[test]
fn merging_entries_for_one_key_is_order_independent() {
    use port25_common::maps::{ORIGIN_BINDING, ORIGIN_CONFIG, ORIGIN_RUNTIME, ORIGIN_SESSION};
    let e = |expires_ns, origin| Exempt {
        expires_ns,
        origin,
        _pad: 0,
    };
    let all = [
        e(0, ORIGIN_CONFIG),
        e(500, ORIGIN_CONFIG),
        e(900, ORIGIN_RUNTIME),
        e(0, ORIGIN_SESSION),
        e(700, ORIGIN_SESSION),
        e(BLOCKED_NS, ORIGIN_SESSION),
        e(0, ORIGIN_BINDING),
        e(800, ORIGIN_BINDING),
    ];
    for a in all {
        for b in all {
            assert_eq!(longer(a, b), longer(b, a), "{a:?} {b:?}");
            for c in all {
                assert_eq!(
                    longer(longer(a, b), c),
                    longer(a, longer(b, c)),
                    "{a:?} {b:?} {c:?}"
                );
            }
        }
    }
    let blocked = e(BLOCKED_NS, ORIGIN_SESSION);
    assert_eq!(
        longer(blocked, e(0, ORIGIN_BINDING)),
        blocked,
        "no binding opens a blocked session"
    );
    assert_eq!(
        longer(blocked, e(500, ORIGIN_CONFIG)),
        e(500, ORIGIN_CONFIG),
        "the operator's exempt does"
    );
    assert_eq!(
        longer(e(700, ORIGIN_SESSION), e(0, ORIGIN_RUNTIME)),
        e(0, ORIGIN_RUNTIME)
    );
    assert_eq!(
        longer(e(0, ORIGIN_SESSION), e(0, ORIGIN_BINDING)),
        e(0, ORIGIN_SESSION)
    );
}

// The full build, from config and registry.

fn user(name: &str, policy: Policy, until: Option<&str>) -> User {
    User {
        name: name.into(),
        policy,
        until: until.map(|t| t.parse().unwrap()),
        reason: None,
        set_by: "root".into(),
        set_at: jiff::Timestamp::UNIX_EPOCH,
        hold: None,
    }
}

fn session(id: &str, user: &str, addrs: &[&str]) -> Session {
    Session {
        id: id.into(),
        user: user.into(),
        addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        since: jiff::Timestamp::UNIX_EPOCH,
        source: "test".into(),
    }
}

#[test]
fn unblocked_sessions_and_only_those_become_exempt() {
    let cfg = Config::parse(
        "exempt: [{prefix: 100.64.0.2/32, until: 2026-11-23T10:30:00Z}]\n",
        std::path::Path::new("t"),
    )
    .unwrap();
    let now: jiff::Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
    let boot = 1_000_000_000_000;
    let snap = Snapshot {
        users: vec![
            user("alice", Policy::Unblocked, None),
            user("bob", Policy::Blocked, None),
            user("carol", Policy::Unblocked, Some("2026-11-23T09:00:00Z")),
            user("dave", Policy::Unblocked, Some("2026-11-23T11:00:00Z")),
        ],
        sessions: vec![
            session(
                "1",
                "alice",
                &["100.64.0.2", "2001:db8:1a0::/56", "2001:db8:100:1::/64"],
            ),
            session("2", "bob", &["100.64.0.3", "2001:db8:1a1::/56"]),
            session("3", "carol", &["100.64.0.4"]),
            session("4", "dave", &["100.64.0.5", "2001:db8:100:2::9"]),
        ],
        ..Default::default()
    };
    let d = Desired::build(&cfg, &snap, now, boot).unwrap();
    let ip4 = |s: &str| s.parse::<std::net::Ipv4Addr>().unwrap().octets();
    fn live<K>(t: &BTreeMap<K, Exempt>, boot: u64) -> usize {
        t.values().filter(|e| e.live(boot)).count()
    }
    assert_eq!(
        live(&d.exip4, boot),
        2,
        "alice and dave; bob blocked, carol's unblock over"
    );
    assert_eq!(
        d.exip4[&ip4("100.64.0.3")].expires_ns,
        BLOCKED_NS,
        "bob's address is there, blocking: no wider prefix may exempt it"
    );
    assert_eq!(d.exip4.len(), 4);
    assert_eq!(
        d.exip4[&ip4("100.64.0.2")].expires_ns,
        0,
        "permanent beats the config's 30 min"
    );
    assert_eq!(
        d.exip4[&ip4("100.64.0.5")].expires_ns,
        boot + 3600 * 1_000_000_000
    );
    assert_eq!(d.exip6.len(), 1, "dave's /128");
    assert_eq!(live(&d.exnet6, boot), 2, "alice's /56 and /64");
    assert_eq!(d.exnet6.len(), 3, "and bob's /56, blocking");
    assert_eq!(d.settings.session_prefix_count, 2);
    assert_eq!(
        &d.settings.session_prefix_lens[..2],
        &[64, 56],
        "longest first"
    );
}

#[test]
fn more_prefix_lengths_than_the_datapath_probes_are_refused() {
    let cfg = Config::parse("interfaces: []\n", std::path::Path::new("t")).unwrap();
    let now: jiff::Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
    let addrs: Vec<String> = (48..=56).map(|l| format!("2001:db8:1a0::/{l}")).collect();
    let sessions = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| session(&i.to_string(), "alice", &[a]))
        .collect();
    let snap = Snapshot {
        users: vec![user("alice", Policy::Unblocked, None)],
        sessions,
        ..Default::default()
    };
    let e = Desired::build(&cfg, &snap, now, 1).unwrap_err().to_string();
    assert!(e.contains("distinct IPv6 prefix lengths"), "{e}");
}

#[test]
fn too_many_prefix_lengths_is_a_refusal() {
    // Typed, so the socket answers it as `refused`, as it did when kinds were guessed.
    let lens: std::collections::BTreeSet<u8> = (64..=64 + MAX_SESSION_PREFIX_LENS as u8).collect();
    let e = check_lens(&lens).unwrap_err();
    assert!(e.is::<crate::registry::Refused>(), "{e:#}");
    assert!(
        format!("{e:#}").contains("distinct IPv6 prefix lengths"),
        "{e:#}"
    );
}

/// The users' entries, by name: what two indexes must agree on.
fn per_user(index: &Index) -> BTreeMap<String, UserEntries> {
    index
        .per_user
        .iter()
        .map(|(n, e)| (n.to_string(), e.clone()))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// The start's narrow read (SQLite's `map_rows`: rows of standing and addresses) builds
    /// what the full model builds: the same maps and the same per-user entries, for random
    /// registries through the real rules (sessions, timed and open unblocks, blocks,
    /// bindings, removals), held users (one hand-edited to a half-cleared hold), built now
    /// and after the timed unblocks have run out.
    #[test]
    fn narrow_read_builds_what_the_full_read_builds(
        ops in prop::collection::vec(op(), 1..40),
        held in prop::option::of(0..4usize),
        far in prop::option::of(0..4usize),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        let cfg = Config::parse(
            "exempt: [{prefix: 100.64.0.1/32, until: 2026-11-23T10:30:00Z}, {prefix: \"2001:db8:2::/48\"}]\n",
            std::path::Path::new("t"),
        ).unwrap();
        let now: jiff::Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
        for op in &ops {
            let mut rec = Recording::new(store.begin().unwrap());
            if run(&mut rec, op, now).is_ok() {
                rec.commit().unwrap();
            }
        }
        if let Some(u) = held {
            let conn = rusqlite::Connection::open(dir.path().join("port25.db")).unwrap();
            // A hold with only one of its columns left: still a hold (fail closed).
            conn.execute(
                "UPDATE users SET policy = 'unblocked', until = NULL, hold_by = 'x' WHERE name = ?1",
                [USERS[u]],
            ).unwrap();
        }
        if let Some(u) = far {
            let conn = rusqlite::Connection::open(dir.path().join("port25.db")).unwrap();
            // A user rewritten many times has a rowid far from the others': the read tells
            // users apart by a hash then, not by a table over the range.
            conn.execute("UPDATE users SET rowid = 1 << 40 WHERE name = ?1", [USERS[u]])
                .unwrap();
        }
        for later in [0, 2, 5] {
            let at = now.checked_add(jiff::SignedDuration::from_hours(later)).unwrap();
            let boot = 5_000_000_000_000;
            let full = crate::policy::Desired::build_indexed(&cfg, &store.snapshot().unwrap(), at, boot);
            // The users' standings by a scan of `users` and by a search for each.
            for search in [false, true] {
                let rows = store.map_rows_by(Some(search)).unwrap();
                let narrow = crate::policy::Desired::build_rows(&cfg, rows, at, boot);
                match (&full, narrow) {
                    (Ok((fi, fd)), Ok((ni, nd))) => {
                        prop_assert_eq!(fd, &nd, "at +{}h after {:?}", later, ops);
                        prop_assert_eq!(per_user(fi), per_user(&ni));
                    }
                    (Err(f), Err(n)) => prop_assert_eq!(f.to_string(), n.to_string()),
                    (f, n) => prop_assert!(
                        false,
                        "{:?} / {:?}",
                        f.as_ref().map(|x| &x.1),
                        n.map(|x| x.1)
                    ),
                }
            }
        }
    }
}

/// The expiry checks read the timed unblocks by their partial index, never every user.
#[test]
fn timed_unblocks_are_read_by_their_index() {
    let dir = tempfile::tempdir().unwrap();
    drop(SqliteStore::open(dir.path()).unwrap());
    let conn = rusqlite::Connection::open(dir.path().join("port25.db")).unwrap();
    let sql = crate::registry::store::sqlite::users_timed_sql();
    let plan: Vec<String> = conn
        .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
        .unwrap()
        .query_map([0i64], |r| r.get::<_, String>(3))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(plan, ["SEARCH users USING INDEX users_timed (until>?)"]);
}
