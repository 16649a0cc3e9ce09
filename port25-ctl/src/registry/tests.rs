//! The rules against a real SQLite file on disk.

use super::*;
use crate::registry::store::{sqlite::SqliteStore, AuditQuery, Store};

fn actor() -> Actor {
    Actor {
        uid: 0,
        name: "root".into(),
        on_behalf_of: Some("helpdesk-7".into()),
    }
}

fn p(s: &str) -> Prefix {
    s.parse().unwrap()
}

fn t(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn mins(m: i64) -> jiff::SignedDuration {
    jiff::SignedDuration::from_mins(m)
}

const NOW: &str = "2026-11-23T10:00:00Z";

struct Db {
    _dir: tempfile::TempDir,
    store: SqliteStore,
}

fn db() -> Db {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    Db { _dir: dir, store }
}

impl Db {
    /// Runs `f` in a transaction and commits only on success, as the daemon does.
    fn run<R>(&mut self, f: impl FnOnce(&mut dyn Tx) -> Result<R>) -> Result<R> {
        let mut tx = self.store.begin()?;
        let r = f(&mut *tx)?;
        tx.commit()?;
        Ok(r)
    }
    fn user(&mut self, name: &str) -> User {
        self.store.begin().unwrap().user(name).unwrap().unwrap()
    }
    fn audit_len(&mut self) -> usize {
        let tx = self.store.begin().unwrap();
        tx.audit(&AuditQuery::default()).unwrap().len()
    }
    fn sessions(&mut self) -> Vec<Session> {
        self.store.snapshot().unwrap().sessions
    }
}

/// An unblock whose audited refusal (a hold) is an error too, as the daemon answers it.
fn unblock_ok(
    tx: &mut dyn Tx,
    a: &Actor,
    name: &str,
    until: Option<Timestamp>,
    reason: Option<String>,
    create: bool,
    now: Timestamp,
) -> Result<PolicyOutcome> {
    Ok(unblock(tx, a, name, until, reason, create, now)??)
}

fn up(d: &mut Db, user: &str, id: &str, addrs: &[&str]) -> Result<SessionUpOutcome> {
    let addrs = addrs.iter().map(|a| p(a)).collect();
    d.run(|tx| session_up(tx, &actor(), user, Some(id), addrs, "cli", t(NOW)))
}

#[test]
fn survives_reopen_and_refuses_a_newer_schema() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = SqliteStore::open(dir.path()).unwrap();
        let mut tx = s.begin().unwrap();
        user_add(&mut *tx, &actor(), "alice", t(NOW)).unwrap();
        tx.commit().unwrap();
    }
    let mut s = SqliteStore::open(dir.path()).unwrap();
    assert!(
        s.begin().unwrap().user("alice").unwrap().is_some(),
        "committed = on disk"
    );
    {
        let mut tx = s.begin().unwrap();
        user_add(&mut *tx, &actor(), "bob", t(NOW)).unwrap();
        // dropped without commit
    }
    assert!(
        s.begin().unwrap().user("bob").unwrap().is_none(),
        "uncommitted = gone"
    );
    drop(s);
    let c = rusqlite::Connection::open(dir.path().join("port25.db")).unwrap();
    c.pragma_update(None, "user_version", 99).unwrap();
    drop(c);
    let e = format!("{:#}", SqliteStore::open(dir.path()).err().unwrap());
    assert!(e.contains("newer"), "{e}");
}

#[test]
fn the_audit_log_is_append_only() {
    let mut d = db();
    d.run(|tx| user_add(tx, &actor(), "alice", t(NOW))).unwrap();
    let c = rusqlite::Connection::open(&d.store.path).unwrap();
    assert!(c.execute("DELETE FROM audit", []).is_err());
    assert!(c.execute("UPDATE audit SET actor = 'x'", []).is_err());
}

#[test]
fn unblock_rules() {
    let mut d = db();
    let now = t(NOW);
    let a = actor();
    let e = d
        .run(|tx| unblock_ok(tx, &a, "alice", None, None, false, now))
        .unwrap_err();
    assert!(e.to_string().contains("unknown user"), "{e}");
    d.run(|tx| user_add(tx, &a, "alice", now)).unwrap();
    let e = d
        .run(|tx| unblock_ok(tx, &a, "alcie", None, None, false, now))
        .unwrap_err();
    let name = &e.downcast_ref::<UnknownUser>().expect("typed").name;
    let close = d.run(|tx| Ok(suggest(tx, name))).unwrap();
    assert_eq!(close, ["alice"]);
    let msg = with_suggestions(&e.to_string(), name, &close);
    assert!(msg.contains("did you mean alice?"), "{msg}");
    let e = d
        .run(|tx| unblock_ok(tx, &a, "alice", Some(now), None, false, now))
        .unwrap_err();
    assert!(e.to_string().contains("not in the future"), "{e}");

    let in90 = now.checked_add(mins(90)).unwrap();
    let in10 = now.checked_add(mins(10)).unwrap();
    let pop = Some("pop".to_string());
    let o = d
        .run(|tx| unblock_ok(tx, &a, "alice", Some(in90), pop, false, now))
        .unwrap();
    assert!(o.changed);
    let o = d
        .run(|tx| unblock_ok(tx, &a, "alice", Some(in10), None, false, now))
        .unwrap();
    assert!(!o.changed, "10m does not shorten 90m");
    assert_eq!(d.user("alice").until, Some(in90));
    let o = d
        .run(|tx| unblock_ok(tx, &a, "alice", None, None, false, now))
        .unwrap();
    assert!(o.changed, "permanent extends a timed one");
    let o = d
        .run(|tx| unblock_ok(tx, &a, "alice", Some(in90), None, false, now))
        .unwrap();
    assert!(!o.changed, "a timed one never shortens a permanent one");
    assert_eq!(d.user("alice").until, None);
    d.run(|tx| block(tx, &a, "alice", None, false, false, now))
        .unwrap();
    assert!(!d.user("alice").unblocked_at(now));
    // An unblock that ran out is a block: a new, shorter timed one applies.
    d.run(|tx| unblock_ok(tx, &a, "alice", Some(in90), None, false, now))
        .unwrap();
    let later = in90.checked_add(mins(1)).unwrap();
    assert!(!d.user("alice").unblocked_at(later));
    let until = later.checked_add(mins(10)).unwrap();
    let o = d
        .run(|tx| unblock_ok(tx, &a, "alice", Some(until), None, false, later))
        .unwrap();
    assert!(o.changed);
    // --new registers an unknown user.
    d.run(|tx| unblock_ok(tx, &a, "dave@isp.example", None, None, true, now))
        .unwrap();
    assert!(d.user("dave@isp.example").unblocked_at(now));
    let e = d
        .run(|tx| unblock_ok(tx, &a, "bad name", None, None, true, now))
        .unwrap_err();
    assert!(e.to_string().contains("not a valid user name"), "{e}");
}

#[test]
fn sessions_are_keyed_by_id_and_an_address_has_one_owner() {
    let mut d = db();
    let now = t(NOW);
    let a = actor();
    let o = up(&mut d, "alice", "1", &["100.64.0.2", "2001:db8:1a0::/56"]).unwrap();
    assert!(o.user_created);
    assert!(!d.user("alice").unblocked_at(now), "a new user is blocked");
    let e = up(&mut d, "bob", "1", &["100.64.0.9"]).unwrap_err();
    assert!(e.to_string().contains("duplicate session id"), "{e}");
    // bob takes the IPv4 address: alice's session keeps only her prefix.
    let o = up(&mut d, "bob", "2", &["100.64.0.2"]).unwrap();
    assert_eq!(
        o.taken_over,
        vec![("1".to_string(), "alice".to_string(), p("100.64.0.2/32"))]
    );
    let s = d.sessions();
    let alice = s.iter().find(|s| s.id == "1").unwrap();
    assert_eq!(alice.addrs, vec![p("2001:db8:1a0::/56")]);
    // Late down for alice by address: refused, bob's session intact.
    let e = d
        .run(|tx| session_down_addr(tx, &a, "alice", &p("100.64.0.2"), now))
        .unwrap_err();
    assert!(e.to_string().contains("held by session 2 of bob"), "{e}");
    d.run(|tx| session_down_id(tx, &a, "1", now)).unwrap();
    let s = d.sessions();
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].user, "bob");
    // A session whose every address is taken over is gone; its late down finds nothing.
    up(&mut d, "carol", "3", &["100.64.0.2"]).unwrap();
    let e = d.run(|tx| session_down_id(tx, &a, "2", now)).unwrap_err();
    assert!(e.to_string().contains("no live session"), "{e}");
    let tx = d.store.begin().unwrap();
    let holder = |ip: &str| holder_of(&*tx, ip.parse().unwrap()).unwrap();
    assert_eq!(holder("100.64.0.2").unwrap().0, "carol");
    // A session prefix holds every address in it; nobody holds what no session covers.
    assert_eq!(
        holder("2001:db8:1a0:5::7"),
        None,
        "alice's session 1 went down"
    );
    drop(tx);
    up(&mut d, "dave", "4", &["2001:db8:1a0::/56"]).unwrap();
    d.run(|tx| bind(tx, &a, "dave", p("203.0.113.16/28"), now))
        .unwrap();
    let tx = d.store.begin().unwrap();
    let holder = |ip: &str| holder_of(&*tx, ip.parse().unwrap()).unwrap();
    let (user, how) = holder("2001:db8:1a0:5::7").unwrap();
    assert_eq!(
        (user.as_str(), how.as_str()),
        ("dave", "session 4 (2001:db8:1a0::/56)")
    );
    assert_eq!(holder("203.0.113.20").unwrap().0, "dave", "static binding");
    assert_eq!(holder("100.64.0.9"), None);
}

fn sync(id: &str, user: &str, addrs: &[&str]) -> SyncSession {
    SyncSession {
        id: id.into(),
        user: user.into(),
        addrs: addrs.iter().map(|a| p(a)).collect(),
    }
}

#[test]
fn sync_makes_the_registry_equal_to_the_list() {
    let mut d = db();
    let now = t(NOW);
    let a = actor();
    up(&mut d, "alice", "1", &["100.64.0.2"]).unwrap();
    up(&mut d, "bob", "2", &["100.64.0.3"]).unwrap();
    let list = vec![
        sync("2", "bob", &["100.64.0.3"]),
        sync("3", "carol", &["100.64.0.2", "2001:db8:1a0::/56"]),
    ];
    let o = d
        .run(|tx| session_sync(tx, &a, list.clone(), None, now))
        .unwrap();
    assert_eq!((o.added, o.removed, o.unchanged, o.changed), (1, 1, 1, 0));
    let ids: Vec<_> = d.sessions().into_iter().map(|s| s.id).collect();
    assert_eq!(ids, vec!["2", "3"]);
    let o = d.run(|tx| session_sync(tx, &a, list, None, now)).unwrap();
    assert_eq!((o.added, o.removed, o.unchanged), (0, 0, 2), "idempotent");
    let before = d.audit_len();
    let dup = vec![
        sync("4", "a", &["100.64.0.5"]),
        sync("5", "b", &["100.64.0.5"]),
    ];
    assert!(d.run(|tx| session_sync(tx, &a, dup, None, now)).is_err());
    assert_eq!(d.audit_len(), before, "a refused sync writes nothing");
}

/// The bulk sync writes what one change at a time wrote: the same sessions, events, counts
/// and audit rows, in the same order (stored sessions by id first, then the list's order).
#[test]
fn a_sync_writes_each_rows_and_audit_as_single_changes_did() {
    let mut d = db();
    let a = actor();
    up(&mut d, "alice", "1", &["100.64.0.2"]).unwrap();
    up(&mut d, "bob", "2", &["100.64.0.3"]).unwrap();
    up(&mut d, "carol", "3", &["100.64.0.4"]).unwrap();
    let taken = t(NOW).checked_add(mins(1)).unwrap();
    let later = t(NOW).checked_add(mins(2)).unwrap();
    // After the snapshot: the list cannot know of this session.
    d.run(|tx| {
        session_up(
            tx,
            &a,
            "erin",
            Some("6"),
            vec![p("100.64.0.8")],
            "cli",
            later,
        )
    })
    .unwrap();
    let before = d.audit_len();
    let list = vec![
        sync("2", "bob", &["100.64.0.3"]),
        sync("3", "carol", &["100.64.0.5"]),
        sync("4", "dave", &["100.64.0.6"]),
        sync("5", "bob", &["100.64.0.7"]),
        sync("7", "frank", &["100.64.0.8"]),
    ];
    let o = d
        .run(|tx| session_sync(tx, &a, list, Some(taken), later))
        .unwrap();
    assert_eq!(
        o,
        SyncOutcome {
            added: 2,
            changed: 1,
            removed: 1,
            unchanged: 1,
            newer: 2,
        }
    );
    let tx = d.store.begin().unwrap();
    let recs = tx.audit(&AuditQuery::default()).unwrap();
    let rows: Vec<_> = recs[before..]
        .iter()
        .map(|r| {
            assert_eq!((r.at, r.actor.as_str()), (later, a.to_string().as_str()));
            (
                r.action.as_str(),
                r.subject.as_str(),
                r.old.as_deref(),
                r.new.as_deref(),
            )
        })
        .collect();
    let (a2, a4, a5, a6, a7) = (
        p("100.64.0.2"),
        p("100.64.0.4"),
        p("100.64.0.5"),
        p("100.64.0.6"),
        p("100.64.0.7"),
    );
    assert_eq!(
        rows,
        vec![
            (
                "session.down",
                "alice",
                Some(&*format!("1: {a2} (sync)")),
                None
            ),
            (
                "session.down",
                "carol",
                Some(&*format!("3: {a4} (sync: changed)")),
                None
            ),
            ("session.up", "carol", None, Some(&*format!("3: {a5}"))),
            ("user.add", "dave", None, Some("blocked (first session)")),
            ("session.up", "dave", None, Some(&*format!("4: {a6}"))),
            ("session.up", "bob", None, Some(&*format!("5: {a7}"))),
        ]
    );
    let ids: Vec<_> = tx.sessions().unwrap().into_iter().map(|s| s.id).collect();
    assert_eq!(ids, ["2", "3", "4", "5", "6"]);
    let s3 = tx.session("3").unwrap().unwrap();
    assert_eq!((s3.since, s3.source.as_str()), (later, "sync"));
    assert_eq!(tx.user("dave").unwrap().unwrap().policy, Policy::Blocked);
    assert!(tx.user("frank").unwrap().is_none(), "no session, no user");
    for id in ["1", "3", "4", "5"] {
        assert_eq!(tx.last_event(id).unwrap(), Some(taken), "{id}");
    }
    assert_eq!(tx.last_event("6").unwrap(), Some(later));
    drop(tx);
    let c = d.store.counts(later).unwrap();
    assert_eq!((c.users, c.sessions), (5, 5));
}

#[test]
fn every_change_is_audited_with_its_actor() {
    let mut d = db();
    let now = t(NOW);
    let a = actor();
    d.run(|tx| user_add(tx, &a, "alice", now)).unwrap();
    let why = Some("ticket 1".to_string());
    d.run(|tx| unblock_ok(tx, &a, "alice", None, why, false, now))
        .unwrap();
    let server = p("198.51.100.26/32");
    d.run(|tx| entry_add(tx, &a, EntryKind::Server, server, None, None, now))
        .unwrap();
    d.run(|tx| bind(tx, &a, "alice", p("203.0.113.16/28"), now))
        .unwrap();
    let q = AuditQuery {
        subject: Some("alice".into()),
        ..Default::default()
    };
    let recs = d.store.begin().unwrap().audit(&q).unwrap();
    assert_eq!(recs.len(), 3);
    assert_eq!(recs[1].action, "unblock");
    assert_eq!(recs[1].old.as_deref(), Some("blocked"));
    assert_eq!(recs[1].new.as_deref(), Some("unblocked"));
    assert_eq!(recs[1].reason.as_deref(), Some("ticket 1"));
    assert!(recs[1].actor.contains("root") && recs[1].actor.contains("helpdesk-7"));
    assert_eq!(d.audit_len(), 4);
}

/// Everything a held user's table row holds, to check that a refusal leaves it as it was.
fn row(d: &mut Db, name: &str) -> (User, Vec<Session>) {
    let u = d.user(name);
    let s = d.store.begin().unwrap().sessions_of(name).unwrap();
    (u, s)
}

fn last_audit(d: &mut Db) -> AuditRecord {
    let tx = d.store.begin().unwrap();
    tx.audit(&AuditQuery::default()).unwrap().pop().unwrap()
}

#[test]
fn a_hold_needs_a_reason_and_ends_a_running_unblock() {
    let mut d = db();
    let now = t(NOW);
    let a = actor();
    up(&mut d, "mallory", "s1", &["100.64.0.9"]).unwrap();
    let in90 = now.checked_add(mins(90)).unwrap();
    d.run(|tx| unblock_ok(tx, &a, "mallory", Some(in90), None, false, now))
        .unwrap();
    let before = d.audit_len();
    for reason in [None, Some("  ".to_string())] {
        let e = d
            .run(|tx| block(tx, &a, "mallory", reason, false, true, now))
            .unwrap_err();
        assert!(e.is::<Refused>(), "{e:#}");
        assert!(format!("{e:#}").contains("--reason"), "{e:#}");
    }
    assert_eq!(d.audit_len(), before, "a refused hold writes nothing");
    assert!(d.user("mallory").unblocked_at(now));
    let why = Some("abuse ticket 77: spam bot".to_string());
    let o = d
        .run(|tx| block(tx, &a, "mallory", why, false, true, now))
        .unwrap();
    assert!(o.changed);
    let u = d.user("mallory");
    assert!(!u.unblocked_at(now), "the timed unblock ends at once");
    assert_eq!(u.until, None);
    let h = u.hold.expect("held, durably");
    assert_eq!(h.reason, "abuse ticket 77: spam bot");
    assert_eq!(h.at, now);
    assert!(h.by.contains("root") && h.by.contains("uid 0"), "{}", h.by);
    let rec = last_audit(&mut d);
    assert_eq!(
        (rec.action.as_str(), rec.new.as_deref()),
        ("hold", Some("blocked, on hold"))
    );
}

#[test]
fn only_unhold_lifts_a_hold() {
    let mut d = db();
    let now = t(NOW);
    let a = actor();
    up(&mut d, "mallory", "s1", &["100.64.0.9"]).unwrap();
    let why = || Some("abuse ticket 77".to_string());
    d.run(|tx| block(tx, &a, "mallory", why(), false, true, now))
        .unwrap();
    let held = row(&mut d, "mallory");
    let in90 = now.checked_add(mins(90)).unwrap();
    // Every way an unblock comes: plain, timed, --until, --new, a POP hook's reason.
    let tries: [(Option<Timestamp>, Option<String>, bool); 4] = [
        (None, None, false),
        (Some(in90), Some("pop-before-smtp".into()), false),
        (Some(in90), None, true),
        (None, Some("radius Port25-Unblock".into()), true),
    ];
    for (until, reason, new) in tries {
        let before = d.audit_len();
        let r = d
            .run(|tx| unblock(tx, &a, "mallory", until, reason.clone(), new, now))
            .unwrap();
        let e = r.unwrap_err().0;
        assert!(
            e.contains("unblock refused")
                && e.contains("abuse hold")
                && e.contains("abuse ticket 77")
                && e.contains("root (uid 0)")
                && e.contains(&now.to_string())
                && e.contains("unhold mallory"),
            "{e}"
        );
        assert_eq!(
            row(&mut d, "mallory"),
            held,
            "nothing but the audit changes"
        );
        assert_eq!(d.audit_len(), before + 1);
        let rec = last_audit(&mut d);
        assert_eq!(rec.action, "unblock.refused");
        assert_eq!(rec.subject, "mallory");
        assert_eq!(rec.reason, reason);
        assert!(rec.old.unwrap().contains("abuse ticket 77"));
    }
    // A block without --hold, a session going down and up: the hold stays.
    d.run(|tx| block(tx, &a, "mallory", None, false, false, now))
        .unwrap();
    d.run(|tx| session_down_id(tx, &a, "s1", now)).unwrap();
    up(&mut d, "mallory", "s2", &["100.64.0.10"]).unwrap();
    assert!(d.user("mallory").hold.is_some());
    // A held user cannot be removed (a new registration would lose the hold).
    let e = d.run(|tx| user_remove(tx, &a, "mallory", now)).unwrap_err();
    assert!(
        e.is::<Refused>() && format!("{e}").contains("hold"),
        "{e:#}"
    );
    assert!(d.user("mallory").hold.is_some());
    // Unhold needs a reason, and leaves the user blocked.
    assert!(d
        .run(|tx| unhold(tx, &a, "mallory", None, now))
        .unwrap_err()
        .is::<Refused>());
    let o = d
        .run(|tx| unhold(tx, &a, "mallory", Some("machine cleaned".into()), now))
        .unwrap();
    assert!(o.user.hold.is_none() && !o.user.unblocked_at(now));
    assert_eq!(last_audit(&mut d).action, "unhold");
    let e = d
        .run(|tx| unhold(tx, &a, "mallory", Some("again".into()), now))
        .unwrap_err();
    assert!(format!("{e}").contains("not on hold"), "{e:#}");
    d.run(|tx| unblock_ok(tx, &a, "mallory", Some(in90), None, false, now))
        .unwrap();
    assert!(
        d.user("mallory").unblocked_at(now),
        "unhold, then unblock works"
    );
}

#[test]
fn a_held_sessions_unblock_attribute_is_refused_but_the_session_is_recorded() {
    let mut d = db();
    let now = t(NOW);
    let a = actor();
    d.run(|tx| user_add(tx, &a, "mallory", now)).unwrap();
    d.run(|tx| block(tx, &a, "mallory", Some("ticket 9".into()), false, true, now))
        .unwrap();
    let r = d
        .run(|tx| {
            session_up_unblocking(
                tx,
                &a,
                "mallory",
                Some("ppp:ppp0"),
                vec![p("100.64.0.9/32")],
                "pppd",
                None,
                now,
            )
        })
        .unwrap();
    let e = r.unwrap_err().0;
    assert!(
        e.contains("session `ppp:ppp0` of mallory recorded")
            && e.contains("unblock refused")
            && e.contains("ticket 9"),
        "{e}"
    );
    let (u, s) = row(&mut d, "mallory");
    assert!(!u.unblocked_at(now) && u.hold.is_some());
    assert_eq!(s.len(), 1, "the session is a fact: recorded");
    assert_eq!(last_audit(&mut d).action, "unblock.refused");
    // Not held: the same request unblocks.
    let o = d
        .run(|tx| {
            session_up_unblocking(
                tx,
                &a,
                "bob",
                None,
                vec![p("100.64.0.7/32")],
                "pppd",
                None,
                now,
            )
        })
        .unwrap()
        .unwrap();
    assert!(o.0.user_created && o.1.user.unblocked_at(now));
}

#[test]
fn a_hold_survives_reopen_and_a_half_cleared_row_stays_held() {
    let dir = tempfile::tempdir().unwrap();
    let now = t(NOW);
    {
        let mut s = SqliteStore::open(dir.path()).unwrap();
        let mut tx = s.begin().unwrap();
        user_add(&mut *tx, &actor(), "mallory", now).unwrap();
        block(
            &mut *tx,
            &actor(),
            "mallory",
            Some("t".into()),
            false,
            true,
            now,
        )
        .unwrap();
        tx.commit().unwrap();
    }
    let c = rusqlite::Connection::open(dir.path().join("port25.db")).unwrap();
    let v: i64 = c
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(v, 6);
    // A hand edit that clears part of the hold and sets the policy to unblocked.
    c.execute(
        "UPDATE users SET hold_reason = NULL, hold_by = NULL, policy = 'unblocked'",
        [],
    )
    .unwrap();
    drop(c);
    let mut s = SqliteStore::open(dir.path()).unwrap();
    let u = s.begin().unwrap().user("mallory").unwrap().unwrap();
    assert!(u.hold.is_some(), "any hold column set = held");
    assert!(!u.unblocked_at(now), "a held user is never unblocked");
    assert_eq!(s.counts(now).unwrap().held, 1);
}

/// The full rebuild and the expiry checks read only the users they need (a fleet replica
/// holds a million): SQLite's queries return what filtering every user would.
#[test]
fn the_narrow_user_reads_equal_filtering_every_user() {
    let mut db = db();
    let user = plain_user;
    db.run(|tx| {
        for (n, pol) in [
            ("a-session", Policy::Blocked),
            ("b-binding", Policy::Unblocked),
            ("c-neither", Policy::Unblocked),
            ("d-neither", Policy::Blocked),
            ("e-both", Policy::Unblocked),
        ] {
            tx.put_user(&user(n, pol))?;
        }
        for (id, u, a) in [
            ("s1", "a-session", "100.64.0.2/32"),
            ("s2", "e-both", "100.64.0.3/32"),
        ] {
            tx.put_session(&Session {
                id: id.into(),
                user: u.into(),
                addrs: vec![p(a)],
                since: t(NOW),
                source: "t".into(),
            })?;
        }
        for (u, a) in [("b-binding", "100.64.9.0/24"), ("e-both", "100.64.8.0/24")] {
            tx.put_binding(&Binding {
                user: u.into(),
                prefix: p(a),
            })?;
        }
        Ok(())
    })
    .unwrap();
    let tx = db.store.begin().unwrap();
    let names = |v: Vec<User>| v.into_iter().map(|u| u.name).collect::<Vec<_>>();
    assert_eq!(
        names(tx.users_in_maps().unwrap()),
        ["a-session", "b-binding", "e-both"]
    );
    assert_eq!(
        names(tx.users_unblocked().unwrap()),
        ["b-binding", "c-neither", "e-both"]
    );
    drop(tx);
    // Timed unblocks (and a blocked user with an end time left over): the indexed read
    // returns what filtering every unblocked user by its end time does.
    let at = |secs: i64| t(NOW) + jiff::SignedDuration::from_secs(secs);
    let timed = |name: &str, policy, until: i64| User {
        until: Some(at(until)),
        ..user(name, policy)
    };
    db.run(|tx| {
        tx.put_user(&timed("f-ended", Policy::Unblocked, -60))?;
        tx.put_user(&timed("g-now", Policy::Unblocked, 0))?;
        tx.put_user(&timed("h-later", Policy::Unblocked, 60))?;
        tx.put_user(&timed("i-blocked", Policy::Blocked, 60))
    })
    .unwrap();
    let tx = db.store.begin().unwrap();
    for after in [-120, -60, -1, 0, 1, 59, 60, 600] {
        let after = at(after);
        let want: Vec<_> = tx
            .users()
            .unwrap()
            .into_iter()
            .filter(|u| u.policy == Policy::Unblocked && u.until.is_some_and(|e| e > after))
            .map(|u| u.name)
            .collect();
        assert_eq!(
            names(tx.users_timed_after(after).unwrap()),
            want,
            "after {after}"
        );
    }
    assert_eq!(
        names(tx.users_timed_after(at(-61)).unwrap()),
        ["f-ended", "g-now", "h-later"]
    );
}

/// `status` reads counts kept by triggers instead of a pass over every user: they equal a
/// count of the rows after every kind of change (REPLACE included, and an address taken
/// over, a user removed with their sessions, a timed unblock that ends by the clock).
#[test]
fn kept_counts_equal_a_count_of_the_rows() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = SqliteStore::open(dir.path()).unwrap();
    let now = t("2026-03-01T00:00:00Z");
    let counted = |s: &mut SqliteStore, at: Timestamp| {
        let tx = s.read().unwrap();
        let users = tx.users().unwrap();
        let unblocked = users.iter().filter(|u| u.unblocked_at(at)).count() as u64;
        // A held user's row may say unblocked (a hand edit): counted as the row says.
        let row_unblocked = users
            .iter()
            .filter(|u| u.policy == store::Policy::Unblocked && u.until.is_none_or(|x| x > at))
            .count() as u64;
        let timed = users
            .iter()
            .filter(|u| u.policy == store::Policy::Unblocked && u.until.is_some_and(|x| x > at))
            .count() as u64;
        let held = users.iter().filter(|u| u.hold.is_some()).count() as u64;
        let sessions = tx.sessions().unwrap().len() as u64;
        assert_eq!(unblocked, row_unblocked);
        (users.len() as u64, unblocked, timed, sessions, held)
    };
    let kept = |s: &mut SqliteStore, at: Timestamp| {
        let c = s.counts(at).unwrap();
        (c.users, c.unblocked, c.timed, c.sessions, c.held)
    };
    let check = |s: &mut SqliteStore, at: Timestamp| {
        assert_eq!(kept(s, at), counted(s, at));
    };
    check(&mut s, now);
    let a = actor();
    let mut tx = s.begin().unwrap();
    session_up(&mut *tx, &a, "u1", None, vec![p("100.64.0.1/32")], "t", now).unwrap();
    session_up(&mut *tx, &a, "u2", None, vec![p("100.64.0.2/32")], "t", now).unwrap();
    session_up(
        &mut *tx,
        &a,
        "u3",
        Some("x"),
        vec![p("100.64.0.3/32")],
        "t",
        now,
    )
    .unwrap();
    unblock(&mut *tx, &a, "u1", None, None, false, now)
        .unwrap()
        .unwrap();
    unblock(&mut *tx, &a, "u2", Some(now + mins(10)), None, false, now)
        .unwrap()
        .unwrap();
    user_add(&mut *tx, &a, "u4", now).unwrap();
    tx.commit().unwrap();
    check(&mut s, now);
    // The timed unblock ends by the clock alone.
    check(&mut s, now + mins(11));
    let mut tx = s.begin().unwrap();
    // Unblocked again (a REPLACE of the row), held, an address taken over, a removal.
    unblock(&mut *tx, &a, "u2", None, None, false, now)
        .unwrap()
        .unwrap();
    block(&mut *tx, &a, "u3", Some("spam".into()), false, true, now).unwrap();
    session_up(&mut *tx, &a, "u4", None, vec![p("100.64.0.3/32")], "t", now).unwrap();
    user_remove(&mut *tx, &a, "u1", now).unwrap();
    tx.commit().unwrap();
    check(&mut s, now);
    let mut tx = s.begin().unwrap();
    unhold(&mut *tx, &a, "u3", Some("cleaned".into()), now).unwrap();
    session_sync(
        &mut *tx,
        &a,
        vec![SyncSession {
            id: "y".into(),
            user: "u5".into(),
            addrs: vec![p("100.64.0.9/32")],
        }],
        None,
        now,
    )
    .unwrap();
    tx.commit().unwrap();
    check(&mut s, now);
}

/// A sync's bulk writes go by multi-row statements of 100 rows: around that size (none,
/// one, a full statement, a full one and one row, a short last statement) every session,
/// address (in its order), user, event and audit row is written once, audit ids follow the
/// list, and the kept counts equal the rows.
#[test]
fn a_sync_writes_every_row_around_the_statement_size() {
    let a = actor();
    let now = t(NOW);
    for n in [0usize, 1, 99, 100, 101, 250] {
        let mut d = db();
        // Every third session has two addresses: the address rows cross 100 elsewhere.
        let list: Vec<SyncSession> = (0..n)
            .map(|i| {
                let mut addrs = vec![p(&format!("100.64.{}.{}/32", i / 200, i % 200))];
                if i % 3 == 0 {
                    addrs.push(p(&format!("2001:db8:{i:x}::/56")));
                }
                SyncSession {
                    id: format!("s{i:04}"),
                    user: format!("u{i:04}"),
                    addrs,
                }
            })
            .collect();
        let o = d
            .run(|tx| session_sync(tx, &a, list.clone(), None, now))
            .unwrap();
        assert_eq!((o.added, o.removed, o.changed), (n, 0, 0), "n={n}");
        let got: Vec<_> = d
            .sessions()
            .into_iter()
            .map(|s| (s.id, s.user, s.addrs))
            .collect();
        let want: Vec<_> = list
            .iter()
            .map(|s| (s.id.clone(), s.user.clone(), s.addrs.clone()))
            .collect();
        assert_eq!(got, want, "n={n}");
        let tx = d.store.read().unwrap();
        assert_eq!(tx.users().unwrap().len(), n, "n={n}");
        let recs = tx.audit(&AuditQuery::default()).unwrap();
        // A user created and a session up per entry, ids consecutive.
        assert_eq!(recs.len(), 2 * n, "n={n}");
        assert!(recs.windows(2).all(|w| w[1].id == w[0].id + 1), "n={n}");
        for s in &list {
            assert!(tx.last_event(&s.id).unwrap().is_some(), "n={n} {}", s.id);
        }
        drop(tx);
        let c = d.store.counts(now).unwrap();
        assert_eq!((c.users, c.sessions), (n as u64, n as u64), "n={n}");
    }
}

/// A row refused in the middle of a bulk write (here the 151st of 250 users, already
/// stored, in the second statement) fails the write, and the transaction left uncommitted
/// writes nothing.
#[test]
fn a_bulk_write_refused_midway_writes_nothing() {
    let a = actor();
    let now = t(NOW);
    let mut d = db();
    up(&mut d, "u0150", "x", &["100.64.9.9"]).unwrap();
    let before = d.store.counts(now).unwrap();
    let users: Vec<User> = (0..250)
        .map(|i| new_user(&format!("u{i:04}"), &a, now))
        .collect();
    assert!(d.run(|tx| tx.insert_users(&users)).is_err());
    assert_eq!(d.store.read().unwrap().users().unwrap().len(), 1);
    assert_eq!(d.store.counts(now).unwrap().users, before.users);
}

/// The narrow read with users named out of step: sessions of one user far apart, users
/// written in another order than their sessions, a binding of a user with a session, a user
/// without a row (foreign keys off, as a hand-edited file may be): one row per user, each
/// address with its own user's standing, by a scan of `users` and by searches alike.
#[test]
fn narrow_read_joins_users_named_out_of_step() {
    use crate::registry::store::{Binding, Session};
    let dir = tempfile::tempdir().unwrap();
    let mut s = SqliteStore::open(dir.path()).unwrap();
    let user = plain_user;
    let session = |id: &str, user: &str, addr: &str| Session {
        id: id.into(),
        user: user.into(),
        addrs: vec![addr.parse().unwrap()],
        since: t(NOW),
        source: "t".into(),
    };
    let mut tx = s.begin().unwrap();
    for (n, p) in [
        ("carol", Policy::Blocked),
        ("alice", Policy::Unblocked),
        ("bob", Policy::Blocked),
    ] {
        tx.put_user(&user(n, p)).unwrap();
    }
    for (id, u, a) in [
        ("s1", "alice", "100.64.0.1/32"),
        ("s2", "bob", "100.64.0.2/32"),
        ("s3", "alice", "100.64.0.3/32"),
        ("s4", "carol", "100.64.0.4/32"),
        ("s5", "bob", "100.64.0.5/32"),
        ("s6", "alice", "100.64.0.6/32"),
    ] {
        tx.put_session(&session(id, u, a)).unwrap();
    }
    tx.put_binding(&Binding {
        user: "carol".into(),
        prefix: "100.64.1.0/24".parse().unwrap(),
    })
    .unwrap();
    tx.commit().unwrap();
    let conn = rusqlite::Connection::open(dir.path().join("port25.db")).unwrap();
    conn.execute_batch(
        "PRAGMA foreign_keys = OFF;
         INSERT INTO sessions (id, user, since, source) VALUES ('s7', 'ghost', 0, 't');
         INSERT INTO session_addrs (prefix, session_id, pos) VALUES ('100.64.0.7/32', 's7', 0);",
    )
    .unwrap();
    drop(conn);
    for search in [false, true] {
        let rows = s.map_rows_by(Some(search)).unwrap();
        let mut names: Vec<&str> = rows.users.iter().map(|(n, _)| &**n).collect();
        names.sort();
        assert_eq!(names, ["alice", "bob", "carol"], "search {search}");
        let of = |i: u32| {
            let (n, st) = &rows.users[i as usize];
            (n.to_string(), st.policy)
        };
        let mut addrs: Vec<(String, String, Policy)> = rows
            .addrs
            .iter()
            .map(|(i, p)| (p.to_string(), of(*i).0, of(*i).1))
            .collect();
        addrs.sort_by(|a, b| a.0.cmp(&b.0));
        let want = [
            ("100.64.0.1/32", "alice", Policy::Unblocked),
            ("100.64.0.2/32", "bob", Policy::Blocked),
            ("100.64.0.3/32", "alice", Policy::Unblocked),
            ("100.64.0.4/32", "carol", Policy::Blocked),
            ("100.64.0.5/32", "bob", Policy::Blocked),
            ("100.64.0.6/32", "alice", Policy::Unblocked),
        ]
        .map(|(p, n, pol)| (p.to_string(), n.to_string(), pol));
        assert_eq!(
            addrs, want,
            "search {search}: the ghost's address is left out"
        );
        let bound: Vec<(String, String)> = rows
            .bound
            .iter()
            .map(|(i, p)| (of(*i).0, p.to_string()))
            .collect();
        assert_eq!(bound, [("carol".to_string(), "100.64.1.0/24".to_string())]);
    }
}

/// A user with `policy` and nothing else set, as the read tests write them.
fn plain_user(name: &str, policy: Policy) -> User {
    User {
        name: name.into(),
        policy,
        until: None,
        reason: None,
        set_by: "t".into(),
        set_at: t(NOW),
        hold: None,
    }
}
