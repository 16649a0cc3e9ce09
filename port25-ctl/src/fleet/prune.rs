//! The change log's retention (`registry.keep_changes`): each daemon deletes the rows older
//! than it, a bounded batch per pass, and records how far the log was cut
//! (`changes_pruned.through`). A replica whose mark is below that point missed changes
//! that are gone: it reloads the fleet's policy tables whole instead of following the log.

use std::time::Duration;

use anyhow::Result;

use super::{
    snapshot::{binding_from_row, entry_from_row, user_from_row, ENTRY_COLS, USER_COLS},
    Fleet,
};
use crate::registry::store::{Binding, Entry, Tx, User};

/// Rows deleted per pass at most: a pass stays well inside the database timeout.
pub const BATCH: i64 = 5000;

/// The fleet's policy as its tables hold it, and the last change it includes.
#[derive(Debug, Clone)]
pub struct FleetState {
    pub mark: i64,
    pub users: Vec<User>,
    pub bindings: Vec<Binding>,
    pub entries: Vec<Entry>,
}

impl Fleet {
    /// Deletes up to [`BATCH`] change-log rows older than `keep`; how many.
    pub fn prune(&mut self, keep: Duration) -> Result<u64> {
        // Under the write lock: the cut and its record never race a change or another
        // router's prune.
        self.begin()?;
        let secs = keep.as_secs_f64();
        let r = self.run(move |c| async move {
            let row = c
                .query_one(
                    "WITH gone AS (DELETE FROM changes WHERE id IN (SELECT id FROM changes \
                     WHERE at < now() - make_interval(secs => $1) ORDER BY id LIMIT $2) \
                     RETURNING id) SELECT count(*), max(id) FROM gone",
                    &[&secs, &BATCH],
                )
                .await?;
            let (n, cut): (i64, Option<i64>) = (row.get(0), row.get(1));
            if let Some(cut) = cut {
                c.execute(
                    "INSERT INTO changes_pruned (one, through) VALUES (1, $1) ON CONFLICT (one) \
                     DO UPDATE SET through = greatest(changes_pruned.through, EXCLUDED.through)",
                    &[&cut],
                )
                .await?;
            }
            c.batch_execute("COMMIT").await?;
            Ok(n as u64)
        });
        self.in_tx = false;
        if r.is_err() {
            self.drop_connection();
        }
        r
    }

    /// The fleet's whole state, for a replica that can no longer follow the log (the
    /// changes after its mark were pruned: see [`Fleet::log_after`]).
    pub(super) fn state_read(&mut self) -> Result<FleetState> {
        // Read under the write lock (already held inside a policy change): no change
        // commits meanwhile, so the tables are the log's state through its last id.
        let own = !self.in_tx;
        if own {
            self.begin()?;
        }
        let r = self.run(|c| async move { read_state(&c).await });
        if own {
            self.rollback();
        }
        r
    }
}

async fn read_state(t: &tokio_postgres::Client) -> Result<FleetState> {
    let mark: i64 = t
        .query_one(
            "SELECT greatest((SELECT max(id) FROM changes), \
                     (SELECT through FROM changes_pruned WHERE one = 1))",
            &[],
        )
        .await?
        .get(0);
    // The same readers as a new replica's snapshot start: one reading of each row kind.
    let users = t
        .query(&format!("SELECT {USER_COLS} FROM users"), &[])
        .await?
        .iter()
        .map(user_from_row)
        .collect::<Result<Vec<_>>>()?;
    let bindings = t
        .query("SELECT user_name, prefix FROM bindings", &[])
        .await?
        .iter()
        .map(binding_from_row)
        .collect::<Result<Vec<_>>>()?;
    let entries = t
        .query(&format!("SELECT {ENTRY_COLS} FROM entries"), &[])
        .await?
        .iter()
        .map(entry_from_row)
        .collect::<Result<Vec<_>>>()?;
    Ok(FleetState {
        mark,
        users,
        bindings,
        entries,
    })
}

/// Makes a replica equal to `state` (users, bindings, entries; its sessions stay, those of
/// users the fleet no longer has go with them) and sets its mark. The audit history of the
/// pruned changes is not replayed: the fleet's `audit` table keeps it.
pub fn reload(tx: &mut dyn Tx, state: &FleetState) -> Result<()> {
    use std::collections::BTreeSet;
    let names: BTreeSet<&str> = state.users.iter().map(|u| u.name.as_str()).collect();
    for b in tx.bindings()? {
        if !state.bindings.contains(&b) {
            tx.delete_binding(&b)?;
        }
    }
    for u in tx.users()? {
        if !names.contains(u.name.as_str()) {
            for s in tx.sessions_of(&u.name)? {
                tx.delete_session(&s.id)?;
            }
            tx.delete_user(&u.name)?;
        }
    }
    for u in &state.users {
        if tx.user(&u.name)?.as_ref() != Some(u) {
            tx.put_user(u)?;
        }
    }
    let have = tx.bindings()?;
    for b in &state.bindings {
        if !have.contains(b) {
            tx.put_binding(b)?;
        }
    }
    for e in tx.entries()? {
        if !state
            .entries
            .iter()
            .any(|f| f.kind == e.kind && f.prefix == e.prefix)
        {
            tx.delete_entry(e.kind, &e.prefix)?;
        }
    }
    let have = tx.entries()?;
    for e in &state.entries {
        if !have.contains(e) {
            tx.put_entry(e)?;
        }
    }
    tx.set_replica_mark(state.mark)
}
