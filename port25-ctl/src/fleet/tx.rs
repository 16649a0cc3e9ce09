//! A policy change's transaction with a fleet: the registry rules read and write the local
//! replica (caught up with the log under the fleet's write lock, so it holds the fleet's
//! state), and every write of a fleet row is also kept as a [`Row`] of the change that
//! commit publishes. Sessions and their events stay local.

use anyhow::Result;
use jiff::Timestamp;

use super::{Fleet, Row};
use crate::{
    net::Prefix,
    registry::store::{AuditQuery, AuditRecord, Binding, Entry, EntryKind, Session, Tx, User},
};

pub struct FleetTx<'a> {
    local: Box<dyn Tx + 'a>,
    fleet: Open<'a>,
    rows: Vec<Row>,
}

/// The fleet's open write transaction; dropped without a publish (a refusal, a failure),
/// it ends with nothing written.
struct Open<'a>(&'a mut Fleet);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.rollback();
    }
}

impl<'a> FleetTx<'a> {
    /// `fleet` must be in its write transaction ([`Fleet::begin`]), and `local` caught up.
    pub fn new(local: Box<dyn Tx + 'a>, fleet: &'a mut Fleet) -> FleetTx<'a> {
        FleetTx {
            local,
            fleet: Open(fleet),
            rows: Vec::new(),
        }
    }
}

impl Tx for FleetTx<'_> {
    fn user(&self, name: &str) -> Result<Option<User>> {
        self.local.user(name)
    }
    fn users_known(&self, names: &[&str]) -> Result<std::collections::HashSet<String>> {
        self.local.users_known(names)
    }
    fn users(&self) -> Result<Vec<User>> {
        self.local.users()
    }
    fn users_in_maps(&self) -> Result<Vec<User>> {
        self.local.users_in_maps()
    }
    fn users_unblocked(&self) -> Result<Vec<User>> {
        self.local.users_unblocked()
    }
    fn users_timed_after(&self, after: jiff::Timestamp) -> Result<Vec<User>> {
        self.local.users_timed_after(after)
    }
    fn put_user(&mut self, u: &User) -> Result<()> {
        self.local.put_user(u)?;
        self.rows.push(Row::PutUser { user: u.clone() });
        Ok(())
    }
    fn delete_user(&mut self, name: &str) -> Result<()> {
        self.local.delete_user(name)?;
        self.rows.push(Row::DeleteUser {
            name: name.to_string(),
        });
        Ok(())
    }
    fn session(&self, id: &str) -> Result<Option<Session>> {
        self.local.session(id)
    }
    fn sessions(&self) -> Result<Vec<Session>> {
        self.local.sessions()
    }
    fn sessions_of(&self, user: &str) -> Result<Vec<Session>> {
        self.local.sessions_of(user)
    }
    fn session_holding(&self, p: &Prefix) -> Result<Option<Session>> {
        self.local.session_holding(p)
    }
    fn put_session(&mut self, s: &Session) -> Result<()> {
        self.local.put_session(s)
    }
    fn delete_session(&mut self, id: &str) -> Result<()> {
        self.local.delete_session(id)
    }
    fn last_event(&self, id: &str) -> Result<Option<Timestamp>> {
        self.local.last_event(id)
    }
    fn put_event(&mut self, id: &str, at: Timestamp) -> Result<()> {
        self.local.put_event(id, at)
    }
    fn prune_events(&mut self, before: Timestamp) -> Result<()> {
        self.local.prune_events(before)
    }
    fn events_after(&self, after: Timestamp) -> Result<std::collections::HashSet<String>> {
        self.local.events_after(after)
    }
    fn bindings(&self) -> Result<Vec<Binding>> {
        self.local.bindings()
    }
    fn bindings_of(&self, user: &str) -> Result<Vec<Prefix>> {
        self.local.bindings_of(user)
    }
    fn put_binding(&mut self, b: &Binding) -> Result<()> {
        self.local.put_binding(b)?;
        self.rows.push(Row::PutBinding { binding: b.clone() });
        Ok(())
    }
    fn delete_binding(&mut self, b: &Binding) -> Result<bool> {
        let gone = self.local.delete_binding(b)?;
        if gone {
            self.rows.push(Row::DeleteBinding { binding: b.clone() });
        }
        Ok(gone)
    }
    fn entries(&self) -> Result<Vec<Entry>> {
        self.local.entries()
    }
    fn put_entry(&mut self, e: &Entry) -> Result<()> {
        self.local.put_entry(e)?;
        self.rows.push(Row::PutEntry { entry: e.clone() });
        Ok(())
    }
    fn delete_entry(&mut self, kind: EntryKind, p: &Prefix) -> Result<bool> {
        let gone = self.local.delete_entry(kind, p)?;
        if gone {
            self.rows.push(Row::DeleteEntry { kind, prefix: *p });
        }
        Ok(gone)
    }
    fn append_audit(&mut self, r: &AuditRecord) -> Result<()> {
        self.local.append_audit(r)?;
        self.rows.push(Row::Audit { record: r.clone() });
        Ok(())
    }
    fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>> {
        self.local.audit(q)
    }
    fn replica_mark(&self) -> Result<i64> {
        self.local.replica_mark()
    }
    fn set_replica_mark(&mut self, id: i64) -> Result<()> {
        self.local.set_replica_mark(id)
    }

    /// The fleet first: a change the database did not take is not made here either. Then
    /// the replica, with its new mark; should that fail, the follower applies the change
    /// from the log later (the mark is still below it).
    fn commit(mut self: Box<Self>) -> Result<()> {
        let rows = std::mem::take(&mut self.rows);
        if rows.is_empty() {
            self.fleet.0.rollback();
        } else {
            let actor = rows
                .iter()
                .find_map(|r| match r {
                    Row::Audit { record } => Some(record.actor.clone()),
                    _ => None,
                })
                .unwrap_or_else(|| self.fleet.0.router.clone());
            let id = self.fleet.0.publish(actor, rows)?;
            crate::control::testing::failpoint_after_fleet_commit();
            self.local.set_replica_mark(id)?;
            // Not committed here yet; should that fail, the follower applies it later.
            self.fleet.0.stats.applied(id, false);
        }
        // The fleet's side is done: `Open`'s rollback finds no open transaction.
        let FleetTx { local, .. } = *self;
        local.commit()
    }
}
