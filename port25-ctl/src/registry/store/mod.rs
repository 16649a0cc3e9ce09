//! The subscriber registry behind a backend-neutral interface. A backend offers transactions
//! of plain reads and writes ([`Tx`]); the rules (who may hold an address, what a timed
//! unblock may do) live in [`crate::registry`] and run inside one transaction, so a shared
//! PostgreSQL backend for a fleet needs only another [`Store`].

pub mod keys;
pub mod sqlite;

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::net::Prefix;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    Blocked,
    Unblocked,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Blocked => "blocked",
            Policy::Unblocked => "unblocked",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    pub policy: Policy,
    /// End of a timed unblock (wall clock); `None` = until changed.
    pub until: Option<Timestamp>,
    pub reason: Option<String>,
    pub set_by: String,
    pub set_at: Timestamp,
    /// An abuse hold: while set, nothing reopens port 25 for the user; only `unhold` lifts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<Hold>,
}

impl User {
    /// Unblocked now (a timed unblock that has run out is a block). A held user never is,
    /// whatever the stored policy says (a hand-edited row): the hold wins, fail closed.
    pub fn unblocked_at(&self, now: Timestamp) -> bool {
        self.standing().unblocked_at(now)
    }

    pub fn standing(&self) -> Standing {
        Standing {
            policy: self.policy,
            until: self.until,
            held: self.hold.is_some(),
        }
    }
}

/// What of a user decides its map entries: the one rule, for the full model ([`User`]) and
/// the narrow start-up read ([`MapRows`]) alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    pub policy: Policy,
    pub until: Option<Timestamp>,
    pub held: bool,
}

impl Standing {
    /// See [`User::unblocked_at`].
    pub fn unblocked_at(&self, now: Timestamp) -> bool {
        !self.held && self.policy == Policy::Unblocked && self.until.is_none_or(|t| t > now)
    }
}

/// What the maps are derived from, narrow: each user that can put entries in the maps (a
/// session address or a binding) once, with its standing, and the session addresses and
/// bindings by index into `users`. A million sessions read this way are a million small
/// rows, not a million [`User`] and [`Session`] values.
#[derive(Debug, Clone, Default)]
pub struct MapRows {
    pub users: Vec<(std::sync::Arc<str>, Standing)>,
    pub addrs: Vec<(u32, Prefix)>,
    pub bound: Vec<(u32, Prefix)>,
    pub entries: Vec<Entry>,
}

impl MapRows {
    /// The same rows from the full model (what a backend without a narrow read gives).
    pub fn from_snapshot(snap: &Snapshot) -> MapRows {
        let mut rows = MapRows {
            entries: snap.entries.clone(),
            ..Default::default()
        };
        let mut at: std::collections::HashMap<&str, u32> = Default::default();
        for u in &snap.users {
            at.insert(&u.name, rows.users.len() as u32);
            rows.users.push((u.name.as_str().into(), u.standing()));
        }
        for s in &snap.sessions {
            if let Some(i) = at.get(s.user.as_str()) {
                rows.addrs.extend(s.addrs.iter().map(|p| (*i, *p)));
            }
        }
        for b in &snap.bindings {
            if let Some(i) = at.get(b.user.as_str()) {
                rows.bound.push((*i, b.prefix));
            }
        }
        rows
    }
}

/// Who put a user on an abuse hold, when, and why (`block USER --hold --reason R`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hold {
    pub reason: String,
    /// The actor as the audit log records it (the socket peer's uid and name).
    pub by: String,
    pub at: Timestamp,
}

impl std::fmt::Display for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = self.at.round(jiff::Unit::Second).unwrap_or(self.at);
        write!(f, "set by {} at {at}: {}", self.by, self.reason)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub id: String,
    pub user: String,
    /// The session's IPv4 address and IPv6 prefixes (framed /64, delegated /56...).
    pub addrs: Vec<Prefix>,
    pub since: Timestamp,
    /// What reported it: `cli`, `sync`, a hook name.
    pub source: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    Server,
    Exempt,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Server => "server",
            EntryKind::Exempt => "exempt",
        }
    }
}

/// A mail server or exempt prefix added at runtime (beside those in the config file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub kind: EntryKind,
    pub prefix: Prefix,
    pub until: Option<Timestamp>,
    pub note: Option<String>,
    pub added_by: String,
    pub added_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Binding {
    pub user: String,
    pub prefix: Prefix,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub id: i64,
    pub at: Timestamp,
    pub actor: String,
    pub action: String,
    /// The user, session or prefix acted on.
    pub subject: String,
    pub old: Option<String>,
    pub new: Option<String>,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub subject: Option<String>,
    pub since: Option<Timestamp>,
    pub limit: usize,
}

/// Everything the maps are derived from.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub users: Vec<User>,
    pub sessions: Vec<Session>,
    pub bindings: Vec<Binding>,
    pub entries: Vec<Entry>,
}

/// Reads and writes inside one transaction; nothing is visible to others before `commit`,
/// and dropping a transaction without committing discards it.
pub trait Tx {
    fn user(&self, name: &str) -> Result<Option<User>>;
    /// Which of `names` are registered users: a `session sync` asks for 100,000 at once.
    fn users_known(&self, names: &[&str]) -> Result<std::collections::HashSet<String>> {
        let mut known = std::collections::HashSet::new();
        for n in names {
            if self.user(n)?.is_some() {
                known.insert(n.to_string());
            }
        }
        Ok(known)
    }
    fn users(&self) -> Result<Vec<User>>;
    /// The users whose policy can put entries in the maps: those with a session or a
    /// binding. A fleet replica holds every user of the fleet, most of them on no router
    /// here; a full rebuild reads only these.
    fn users_in_maps(&self) -> Result<Vec<User>> {
        let mut names: std::collections::BTreeSet<String> =
            self.sessions()?.into_iter().map(|s| s.user).collect();
        names.extend(self.bindings()?.into_iter().map(|b| b.user));
        Ok(self
            .users()?
            .into_iter()
            .filter(|u| names.contains(&u.name))
            .collect())
    }
    /// What the maps are derived from, narrow (the daemon's start and full rebuilds).
    fn map_rows(&self) -> Result<MapRows> {
        Ok(MapRows::from_snapshot(&Snapshot {
            users: self.users_in_maps()?,
            sessions: self.sessions()?,
            bindings: self.bindings()?,
            entries: self.entries()?,
        }))
    }
    /// The users unblocked (maybe until a time that has passed): what the expiry checks read.
    fn users_unblocked(&self) -> Result<Vec<User>> {
        Ok(self
            .users()?
            .into_iter()
            .filter(|u| u.policy == Policy::Unblocked)
            .collect())
    }
    /// The users unblocked until a time later than `after`: what the daemon's expiry checks
    /// read at every reconcile (a million unblocked users without an end time are not).
    fn users_timed_after(&self, after: Timestamp) -> Result<Vec<User>> {
        Ok(self
            .users_unblocked()?
            .into_iter()
            .filter(|u| u.until.is_some_and(|t| t > after))
            .collect())
    }
    /// At most `n` users in name order, from the first whose name is after `after`: a page
    /// of [`Tx::users`] (`user list --limit` reads no more of a million users than it shows).
    fn users_after(&self, after: Option<&str>, n: usize) -> Result<Vec<User>> {
        Ok(self
            .users()?
            .into_iter()
            .filter(|u| after.is_none_or(|a| u.name.as_str() > a))
            .take(n)
            .collect())
    }
    fn put_user(&mut self, u: &User) -> Result<()>;
    fn delete_user(&mut self, name: &str) -> Result<()>;

    fn session(&self, id: &str) -> Result<Option<Session>>;
    fn sessions(&self) -> Result<Vec<Session>>;
    fn sessions_of(&self, user: &str) -> Result<Vec<Session>>;
    /// The session whose address list holds exactly `p`.
    fn session_holding(&self, p: &Prefix) -> Result<Option<Session>>;
    fn put_session(&mut self, s: &Session) -> Result<()>;
    fn delete_session(&mut self, id: &str) -> Result<()>;

    /// When the last event of session `id` happened (up, change, down), if within the
    /// retained window.
    fn last_event(&self, id: &str) -> Result<Option<Timestamp>>;
    /// Records an event of session `id` at `at` (never moves a recorded time back).
    fn put_event(&mut self, id: &str, at: Timestamp) -> Result<()>;
    /// Forgets events older than `before`.
    fn prune_events(&mut self, before: Timestamp) -> Result<()>;
    /// The ids of the sessions whose last recorded event is later than `after` (a `session
    /// sync` compares its whole list with them at once).
    fn events_after(&self, after: Timestamp) -> Result<std::collections::HashSet<String>>;

    // Bulk writes (a `session sync` of 100,000 sessions): the same rows as the single
    // writes, in order; a backend may write them faster than one by one.

    /// Registers users not stored yet.
    fn insert_users(&mut self, users: &[User]) -> Result<()> {
        users.iter().try_for_each(|u| self.put_user(u))
    }
    /// Stores sessions whose ids are not stored yet.
    fn insert_sessions(&mut self, sessions: &[Session]) -> Result<()> {
        sessions.iter().try_for_each(|s| self.put_session(s))
    }
    /// As [`Tx::insert_users`] and [`Tx::insert_sessions`], the rows given away: a
    /// [`Recording`] keeps them as written without a copy of each.
    fn insert_owned(&mut self, users: Vec<User>, sessions: Vec<Session>) -> Result<()> {
        self.insert_users(&users)?;
        self.insert_sessions(&sessions)
    }
    /// Deletes sessions, given as they are stored.
    fn delete_sessions(&mut self, sessions: &[Session]) -> Result<()> {
        sessions.iter().try_for_each(|s| self.delete_session(&s.id))
    }
    fn put_events(&mut self, events: &[(String, Timestamp)]) -> Result<()> {
        events
            .iter()
            .try_for_each(|(id, at)| self.put_event(id, *at))
    }
    fn append_audits(&mut self, records: &[AuditRecord]) -> Result<()> {
        records.iter().try_for_each(|r| self.append_audit(r))
    }

    fn bindings(&self) -> Result<Vec<Binding>>;
    fn bindings_of(&self, user: &str) -> Result<Vec<Prefix>> {
        Ok(self
            .bindings()?
            .into_iter()
            .filter(|b| b.user == user)
            .map(|b| b.prefix)
            .collect())
    }
    fn put_binding(&mut self, b: &Binding) -> Result<()>;
    fn delete_binding(&mut self, b: &Binding) -> Result<bool>;

    fn entries(&self) -> Result<Vec<Entry>>;
    fn put_entry(&mut self, e: &Entry) -> Result<()>;
    fn delete_entry(&mut self, kind: EntryKind, p: &Prefix) -> Result<bool>;

    fn append_audit(&mut self, r: &AuditRecord) -> Result<()>;
    fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>>;

    /// A fleet replica's position in the fleet's change log: the id of the last change
    /// applied (0: none). A store that is no replica has none.
    fn replica_mark(&self) -> Result<i64> {
        Ok(0)
    }
    fn set_replica_mark(&mut self, _id: i64) -> Result<()> {
        anyhow::bail!("this registry is no fleet replica")
    }

    fn commit(self: Box<Self>) -> Result<()>;
}

pub trait Store: Send {
    fn begin(&mut self) -> Result<Box<dyn Tx + '_>>;

    fn snapshot(&mut self) -> Result<Snapshot> {
        let tx = self.begin()?;
        snapshot_of(&*tx)
    }
}

/// The snapshot as a transaction sees it (its own uncommitted writes included).
pub fn snapshot_of(tx: &dyn Tx) -> Result<Snapshot> {
    Ok(Snapshot {
        users: tx.users_in_maps()?,
        sessions: tx.sessions()?,
        bindings: tx.bindings()?,
        entries: tx.entries()?,
    })
}

/// A transaction that remembers what it changed: the users whose map entries may differ
/// afterwards, and whether runtime entries changed.
pub struct Recording<'a> {
    inner: Box<dyn Tx + 'a>,
    pub users: std::collections::BTreeSet<String>,
    pub entries: bool,
    /// Users this transaction created (as last written).
    pub created: std::collections::BTreeMap<String, User>,
    /// The ids of the sessions this transaction wrote or deleted.
    pub session_ids: std::collections::BTreeSet<String>,
    /// Each session this transaction wrote (as last written) or deleted (None): with
    /// `created`, every session of a user the transaction created (rows referencing a user
    /// cannot predate it), so its entries need no read back (a `session sync` creates
    /// 100,000 users).
    pub sessions_written: std::collections::BTreeMap<String, Option<Session>>,
    /// The users whose bindings this transaction changed.
    pub bound: std::collections::BTreeSet<String>,
}

impl<'a> Recording<'a> {
    pub fn new(inner: Box<dyn Tx + 'a>) -> Recording<'a> {
        Recording {
            inner,
            users: Default::default(),
            entries: false,
            created: Default::default(),
            session_ids: Default::default(),
            sessions_written: Default::default(),
            bound: Default::default(),
        }
    }

    pub fn commit(self) -> Result<()> {
        self.inner.commit()
    }

    fn touch_session(&mut self, id: &str) -> Result<()> {
        if let Some(old) = self.inner.session(id)? {
            self.users.insert(old.user);
        }
        Ok(())
    }
}

impl Tx for Recording<'_> {
    fn user(&self, name: &str) -> Result<Option<User>> {
        self.inner.user(name)
    }
    fn users_known(&self, names: &[&str]) -> Result<std::collections::HashSet<String>> {
        self.inner.users_known(names)
    }
    fn users(&self) -> Result<Vec<User>> {
        self.inner.users()
    }
    fn users_in_maps(&self) -> Result<Vec<User>> {
        self.inner.users_in_maps()
    }
    fn users_unblocked(&self) -> Result<Vec<User>> {
        self.inner.users_unblocked()
    }
    fn users_timed_after(&self, after: Timestamp) -> Result<Vec<User>> {
        self.inner.users_timed_after(after)
    }
    fn map_rows(&self) -> Result<MapRows> {
        self.inner.map_rows()
    }
    fn users_after(&self, after: Option<&str>, n: usize) -> Result<Vec<User>> {
        self.inner.users_after(after, n)
    }
    fn put_user(&mut self, u: &User) -> Result<()> {
        if self.created.contains_key(&u.name) || self.inner.user(&u.name)?.is_none() {
            self.created.insert(u.name.clone(), u.clone());
        }
        self.users.insert(u.name.clone());
        self.inner.put_user(u)
    }
    fn delete_user(&mut self, name: &str) -> Result<()> {
        self.created.remove(name);
        self.users.insert(name.to_string());
        self.inner.delete_user(name)
    }
    fn session(&self, id: &str) -> Result<Option<Session>> {
        self.inner.session(id)
    }
    fn sessions(&self) -> Result<Vec<Session>> {
        self.inner.sessions()
    }
    fn sessions_of(&self, user: &str) -> Result<Vec<Session>> {
        self.inner.sessions_of(user)
    }
    fn session_holding(&self, p: &Prefix) -> Result<Option<Session>> {
        self.inner.session_holding(p)
    }
    fn put_session(&mut self, s: &Session) -> Result<()> {
        self.session_ids.insert(s.id.clone());
        self.sessions_written.insert(s.id.clone(), Some(s.clone()));
        self.touch_session(&s.id)?;
        self.users.insert(s.user.clone());
        self.inner.put_session(s)
    }
    fn delete_session(&mut self, id: &str) -> Result<()> {
        self.session_ids.insert(id.to_string());
        self.sessions_written.insert(id.to_string(), None);
        self.touch_session(id)?;
        self.inner.delete_session(id)
    }
    fn last_event(&self, id: &str) -> Result<Option<Timestamp>> {
        self.inner.last_event(id)
    }
    fn put_event(&mut self, id: &str, at: Timestamp) -> Result<()> {
        self.inner.put_event(id, at)
    }
    fn prune_events(&mut self, before: Timestamp) -> Result<()> {
        self.inner.prune_events(before)
    }
    fn events_after(&self, after: Timestamp) -> Result<std::collections::HashSet<String>> {
        self.inner.events_after(after)
    }
    // The bulk writes know their users and ids up front: recorded without a read per row.
    fn insert_users(&mut self, users: &[User]) -> Result<()> {
        for u in users {
            self.created.insert(u.name.clone(), u.clone());
            self.users.insert(u.name.clone());
        }
        self.inner.insert_users(users)
    }
    fn insert_sessions(&mut self, sessions: &[Session]) -> Result<()> {
        for s in sessions {
            self.session_ids.insert(s.id.clone());
            self.sessions_written.insert(s.id.clone(), Some(s.clone()));
            self.users.insert(s.user.clone());
        }
        self.inner.insert_sessions(sessions)
    }
    fn insert_owned(&mut self, users: Vec<User>, sessions: Vec<Session>) -> Result<()> {
        self.inner.insert_users(&users)?;
        self.inner.insert_sessions(&sessions)?;
        // Each record built from the whole batch and merged in one pass (`append`: the
        // batch's value wins, as `insert` would): a sync's 100,000 sorted keys inserted one
        // by one into four trees were an eighth of its time.
        let mut names: BTreeSet<String> = users.iter().map(|u| u.name.clone()).collect();
        names.extend(sessions.iter().map(|s| s.user.clone()));
        self.users.append(&mut names);
        let mut ids: BTreeSet<String> = sessions.iter().map(|s| s.id.clone()).collect();
        self.session_ids.append(&mut ids);
        let mut created: BTreeMap<String, User> =
            users.into_iter().map(|u| (u.name.clone(), u)).collect();
        self.created.append(&mut created);
        let mut written: BTreeMap<String, Option<Session>> = sessions
            .into_iter()
            .map(|s| (s.id.clone(), Some(s)))
            .collect();
        self.sessions_written.append(&mut written);
        Ok(())
    }
    fn delete_sessions(&mut self, sessions: &[Session]) -> Result<()> {
        for s in sessions {
            self.session_ids.insert(s.id.clone());
            self.sessions_written.insert(s.id.clone(), None);
            self.users.insert(s.user.clone());
        }
        self.inner.delete_sessions(sessions)
    }
    fn put_events(&mut self, events: &[(String, Timestamp)]) -> Result<()> {
        self.inner.put_events(events)
    }
    fn append_audits(&mut self, records: &[AuditRecord]) -> Result<()> {
        self.inner.append_audits(records)
    }
    fn bindings(&self) -> Result<Vec<Binding>> {
        self.inner.bindings()
    }
    fn bindings_of(&self, user: &str) -> Result<Vec<Prefix>> {
        self.inner.bindings_of(user)
    }
    fn put_binding(&mut self, b: &Binding) -> Result<()> {
        self.users.insert(b.user.clone());
        self.bound.insert(b.user.clone());
        self.inner.put_binding(b)
    }
    fn delete_binding(&mut self, b: &Binding) -> Result<bool> {
        self.users.insert(b.user.clone());
        self.bound.insert(b.user.clone());
        self.inner.delete_binding(b)
    }
    fn entries(&self) -> Result<Vec<Entry>> {
        self.inner.entries()
    }
    fn put_entry(&mut self, e: &Entry) -> Result<()> {
        self.entries = true;
        self.inner.put_entry(e)
    }
    fn delete_entry(&mut self, kind: EntryKind, p: &Prefix) -> Result<bool> {
        self.entries = true;
        self.inner.delete_entry(kind, p)
    }
    fn append_audit(&mut self, r: &AuditRecord) -> Result<()> {
        self.inner.append_audit(r)
    }
    fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>> {
        self.inner.audit(q)
    }
    fn replica_mark(&self) -> Result<i64> {
        self.inner.replica_mark()
    }
    fn set_replica_mark(&mut self, id: i64) -> Result<()> {
        self.inner.set_replica_mark(id)
    }
    fn commit(self: Box<Self>) -> Result<()> {
        self.inner.commit()
    }
}
