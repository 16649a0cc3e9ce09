//! The daemon's wall clock for expiries, kept from running behind the registry's own record
//! of time (a router without an RTC boots in 1970 or in last week).

use anyhow::Result;
use tracing::{error, warn};

use crate::registry::store::{sqlite::SqliteStore, Store};

/// The wall clock as the daemon uses it for expiries: never behind the newest time the
/// registry has recorded (its newest audit record), advanced from there on the boot-time
/// clock. A boot with the clock behind real time would otherwise read an unblock that has
/// ended as one still running and put it back into the maps.
pub(super) struct Wall {
    floor: jiff::Timestamp,
    floor_boot: u64,
    shift: jiff::SignedDuration,
    behind: bool,
    /// Up to when ended unblocks have been recorded.
    noted: Option<jiff::Timestamp>,
}

impl Wall {
    pub(super) fn new(store: &mut SqliteStore) -> Result<Wall> {
        let newest = store
            .begin()?
            .audit(&crate::registry::store::AuditQuery {
                subject: None,
                since: None,
                limit: 1,
            })?
            .pop()
            .map(|r| r.at);
        let shift = crate::control::testing::wall_shift()?;
        Ok(Wall {
            floor: newest.unwrap_or(jiff::Timestamp::UNIX_EPOCH),
            floor_boot: crate::bpf::livemaps::boot_ns(),
            shift,
            behind: false,
            noted: None,
        })
    }

    /// Records, in the audit log, each timed unblock that ended since the last call: the
    /// newest audit time is then past every ended unblock this daemon saw end, so a later
    /// start with a clock behind real time cannot bring one back.
    pub(super) fn record_ended(
        &mut self,
        store: &mut SqliteStore,
        now: jiff::Timestamp,
    ) -> Result<()> {
        let since = self.noted.unwrap_or(self.floor);
        let mut tx = store.begin()?;
        let ended: Vec<_> = tx
            .users_timed_after(since)?
            .into_iter()
            .filter(|u| u.until.is_some_and(|t| t > since && t <= now))
            .collect();
        for u in &ended {
            tx.append_audit(&crate::registry::store::AuditRecord {
                id: 0,
                at: now,
                actor: "port25 daemon".into(),
                action: "unblock.ended".into(),
                subject: u.name.clone(),
                old: u.until.map(|t| format!("unblocked until {t}")),
                new: Some("blocked".into()),
                reason: None,
            })?;
        }
        tx.commit()?;
        self.noted = Some(now);
        Ok(())
    }

    /// At start, with the clock behind the registry: a timed unblock that ends after the
    /// newest recorded time may or may not have ended in real time (the box may have been off
    /// for a day), and nothing here can tell. Each one is ended, fail closed and audited; the
    /// next POP login or helpdesk call opens it again, measured from a time that is never
    /// ahead of real time. Unblocks made while this daemon runs are measured from the same
    /// derived time, which is never ahead of real time, so they are kept.
    pub(super) fn close_uncertain_unblocks(&mut self, store: &mut SqliteStore) -> Result<usize> {
        let now = self.now();
        if !self.behind {
            return Ok(0);
        }
        let mut tx = store.begin()?;
        let uncertain: Vec<_> = tx
            .users_timed_after(self.floor)?
            .into_iter()
            .filter(|u| u.until.is_some_and(|t| t > self.floor))
            .collect();
        let actor = crate::registry::Actor {
            uid: 0,
            name: "port25 daemon".into(),
            on_behalf_of: None,
        };
        for u in &uncertain {
            crate::registry::block(
                &mut *tx,
                &actor,
                &u.name,
                Some(format!(
                    "the clock is behind the registry at start: cannot tell whether the unblock until {} has ended",
                    u.until.unwrap()
                )),
                false,
                false,
                now,
            )?;
        }
        tx.commit()?;
        if !uncertain.is_empty() {
            error!(
                count = uncertain.len(),
                "timed unblocks that may have ended while the clock was wrong are closed (audited)"
            );
        }
        Ok(uncertain.len())
    }

    pub(super) fn now(&mut self) -> jiff::Timestamp {
        let raw = jiff::Timestamp::now()
            .checked_add(self.shift)
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
        let since = crate::bpf::livemaps::boot_ns().saturating_sub(self.floor_boot);
        let derived = self
            .floor
            .checked_add(jiff::SignedDuration::from_nanos(
                since.min(i64::MAX as u64) as i64
            ))
            .unwrap_or(self.floor);
        let behind = raw < derived;
        if behind != self.behind {
            self.behind = behind;
            if behind {
                error!(
                    system = %raw, recorded = %self.floor, using = %derived,
                    "the wall clock is behind the newest time in the registry (no RTC? NTP not \
                     synced?): using the recorded time, advanced on the boot clock, so no \
                     ended unblock comes back"
                );
            } else {
                warn!(system = %raw, "the wall clock has caught up with the registry");
            }
        }
        if behind {
            derived
        } else {
            raw
        }
    }
}
