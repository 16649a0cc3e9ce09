//! A replica that has never followed the log (a new router, a wiped `state_dir`) starts from
//! a snapshot of the fleet's tables, not by replaying the log from its first change: a fleet
//! of a million users has a log at least that long, and replaying it (one JSON change, one
//! local write at a time) is what made a new router's start scale with the fleet's history
//! instead of its size.

use anyhow::{anyhow, Context as _, Result};
use tokio_postgres::Row as PgRow;

use super::Fleet;
use crate::registry::store::{AuditRecord, Binding, Entry, EntryKind, Hold, Policy, Store, User};

/// Users read per query: bounded memory whatever the fleet's size.
const PAGE: i64 = 50_000;

/// The columns [`user_from_row`] reads, in its order.
pub const USER_COLS: &str =
    "name, policy, until, reason, set_by, set_at, hold_reason, hold_by, hold_at";

/// A `users` row (selected as [`USER_COLS`]).
pub fn user_from_row(r: &PgRow) -> Result<User> {
    let t = |n: i64| jiff::Timestamp::from_nanosecond(n as i128);
    let policy: String = r.get(1);
    let hold = match (
        r.get::<_, Option<String>>(6),
        r.get::<_, Option<String>>(7),
        r.get::<_, Option<i64>>(8),
    ) {
        (Some(reason), Some(by), Some(at)) => Some(Hold {
            reason,
            by,
            at: t(at)?,
        }),
        _ => None,
    };
    Ok(User {
        name: r.get(0),
        // The schema allows only these two; anything else is a block.
        policy: if policy == "unblocked" {
            Policy::Unblocked
        } else {
            Policy::Blocked
        },
        until: r.get::<_, Option<i64>>(2).map(t).transpose()?,
        reason: r.get(3),
        set_by: r.get(4),
        set_at: t(r.get(5))?,
        hold,
    })
}

/// A `bindings` row (`user_name, prefix`).
pub fn binding_from_row(r: &PgRow) -> Result<Binding> {
    Ok(Binding {
        user: r.get(0),
        prefix: prefix(r.get(1))?,
    })
}

/// The columns [`entry_from_row`] reads, in its order.
pub const ENTRY_COLS: &str = "kind, prefix, until, note, added_by, added_at";

/// An `entries` row (selected as [`ENTRY_COLS`]). A kind this port25-ctl does not know is
/// an error, never read as one it knows (an exemption least of all).
pub fn entry_from_row(r: &PgRow) -> Result<Entry> {
    let t = |n: i64| jiff::Timestamp::from_nanosecond(n as i128);
    let kind: String = r.get(0);
    Ok(Entry {
        kind: match kind.as_str() {
            "server" => EntryKind::Server,
            "exempt" => EntryKind::Exempt,
            k => return Err(anyhow!("a fleet entry of unknown kind {k:?}")),
        },
        prefix: prefix(r.get(1))?,
        until: r.get::<_, Option<i64>>(2).map(t).transpose()?,
        note: r.get(3),
        added_by: r.get(4),
        added_at: t(r.get(5))?,
    })
}

/// What [`Fleet::bootstrap`] loaded.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    pub users: usize,
    /// The newest change the snapshot holds: the replica's mark.
    pub mark: i64,
}

impl Fleet {
    /// Loads the fleet's users, bindings and runtime entries into a replica that has never
    /// followed the log (mark 0), as of one consistent snapshot, in one local transaction,
    /// and marks it with the newest change that snapshot holds; the log is then followed
    /// from there. `None`: the replica follows the log already.
    ///
    /// The snapshot is one REPEATABLE READ transaction: every page comes from the same
    /// state, and since every change commits under the write lock in id order, that state
    /// holds exactly the changes up to its newest id.
    pub fn bootstrap(&mut self, store: &mut dyn Store) -> Result<Option<Loaded>> {
        if store.begin()?.replica_mark()? != 0 {
            return Ok(None);
        }
        let mut local = store.begin()?;
        let r = self.read_snapshot(|batch| {
            match batch {
                Batch::Users(users) => {
                    for u in &users {
                        local.put_user(u)?;
                    }
                }
                Batch::Bindings(bs) => {
                    for b in &bs {
                        local.put_binding(b)?;
                    }
                }
                Batch::Entries(es) => {
                    for e in &es {
                        local.put_entry(e)?;
                    }
                }
                Batch::Audit(rs) => {
                    for r in &rs {
                        local.append_audit(r)?;
                    }
                }
            }
            Ok(())
        });
        let loaded = r?;
        if loaded.mark > 0 {
            local.set_replica_mark(loaded.mark)?;
        }
        local.commit()?;
        self.stats.applied(loaded.mark, false);
        Ok(Some(loaded))
    }

    fn read_snapshot(&mut self, mut sink: impl FnMut(Batch) -> Result<()>) -> Result<Loaded> {
        let mark = self.run(|c| async move {
            c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await?;
            Ok(c.query_one("SELECT coalesce(max(id), 0) FROM changes", &[])
                .await?
                .get::<_, i64>(0))
        })?;
        let r: Result<usize> = (|| {
            let mut after = String::new();
            let mut users = 0;
            loop {
                let from = after.clone();
                let page = self.run(move |c| async move {
                    let rows = c
                        .query(
                            &format!(
                                "SELECT {USER_COLS} FROM users WHERE name > $1 ORDER BY name \
                                 LIMIT $2"
                            ),
                            &[&from, &PAGE],
                        )
                        .await?;
                    rows.iter().map(user_from_row).collect::<Result<Vec<_>>>()
                })?;
                let Some(last) = page.last() else { break };
                after = last.name.clone();
                users += page.len();
                let full = page.len() as i64 == PAGE;
                sink(Batch::Users(page))?;
                if !full {
                    break;
                }
            }
            let bindings = self.run(|c| async move {
                c.query("SELECT user_name, prefix FROM bindings", &[])
                    .await?
                    .iter()
                    .map(binding_from_row)
                    .collect::<Result<Vec<_>>>()
            })?;
            sink(Batch::Bindings(bindings))?;
            let entries = self.run(|c| async move {
                c.query(&format!("SELECT {ENTRY_COLS} FROM entries"), &[])
                    .await?
                    .iter()
                    .map(entry_from_row)
                    .collect::<Result<Vec<_>>>()
            })?;
            sink(Batch::Entries(entries))?;
            // The audit history too, as replaying the log would have written it: `audit`
            // on a new router shows what happened before it joined.
            let mut after = 0i64;
            loop {
                let page = self.run(move |c| async move {
                    c.query(
                        "SELECT id, at, actor, action, subject, old, new, reason FROM audit \
                         WHERE id > $1 ORDER BY id LIMIT $2",
                        &[&after, &PAGE],
                    )
                    .await?
                    .iter()
                    .map(|r| {
                        Ok(AuditRecord {
                            id: r.get(0),
                            at: jiff::Timestamp::from_nanosecond(r.get::<_, i64>(1) as i128)?,
                            actor: r.get(2),
                            action: r.get(3),
                            subject: r.get(4),
                            old: r.get(5),
                            new: r.get(6),
                            reason: r.get(7),
                        })
                    })
                    .collect::<Result<Vec<_>>>()
                })?;
                let Some(last) = page.last() else { break };
                after = last.id;
                let full = page.len() as i64 == PAGE;
                sink(Batch::Audit(page))?;
                if !full {
                    break;
                }
            }
            Ok(users)
        })();
        // Read-only: ending it either way changes nothing.
        let end = self.run(|c| async move { Ok(c.batch_execute("COMMIT").await?) });
        let users = r.context("loading the fleet's snapshot into the replica")?;
        end?;
        Ok(Loaded { users, mark })
    }
}

enum Batch {
    Users(Vec<User>),
    Bindings(Vec<Binding>),
    Entries(Vec<Entry>),
    Audit(Vec<AuditRecord>),
}

fn prefix(s: String) -> Result<crate::net::Prefix> {
    s.parse()
        .map_err(|e: String| anyhow!("a fleet prefix {s:?}: {e}"))
}
