//! What the fleet side of a daemon counts, for `/metrics` and `status`: set by the writer
//! and the follower (atomics, never a lock the writer waits for), read by the scrape.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};

use crate::control::reply::FleetInfo;

#[derive(Debug, Default)]
pub struct FleetStats {
    /// The follower's LISTEN connection is up.
    connected: AtomicBool,
    /// The replica's mark: the last change of the log it holds.
    applied_id: AtomicI64,
    /// The newest change id the database was seen to hold (0: not known yet).
    newest_id: AtomicI64,
    /// Changes of the log applied here (at start and by the follower; this router's own
    /// changes move the mark but are not counted).
    applied_total: AtomicU64,
    queue_users: AtomicU64,
    queue_sessions: AtomicU64,
    reconnects: AtomicU64,
    /// Unix time in ms of the database's last answer (0: never).
    last_contact_ms: AtomicI64,
}

impl FleetStats {
    /// The database answered.
    pub fn contact(&self) {
        self.last_contact_ms
            .store(jiff::Timestamp::now().as_millisecond(), Relaxed);
    }

    pub fn set_connected(&self, up: bool) {
        self.connected.store(up, Relaxed);
    }

    pub fn reconnected(&self) {
        self.reconnects.fetch_add(1, Relaxed);
    }

    /// The database holds change `id` (or a later one).
    pub fn seen(&self, id: i64) {
        self.newest_id.fetch_max(id, Relaxed);
    }

    /// The replica's mark is `id` now; `logged`: a change of the log applied here.
    pub fn applied(&self, id: i64, logged: bool) {
        self.applied_id.store(id, Relaxed);
        self.seen(id);
        if logged {
            self.applied_total.fetch_add(1, Relaxed);
        }
    }

    pub fn queue(&self, users: usize, sessions: usize) {
        self.queue_users.store(users as u64, Relaxed);
        self.queue_sessions.store(sessions as u64, Relaxed);
    }

    pub fn info(&self) -> FleetInfo {
        let applied = self.applied_id.load(Relaxed);
        let newest = self.newest_id.load(Relaxed);
        let contact = self.last_contact_ms.load(Relaxed);
        FleetInfo {
            applied_change_id: applied,
            changes_applied: self.applied_total.load(Relaxed),
            connected: self.connected.load(Relaxed),
            lag_changes: (newest > 0).then(|| (newest - applied).max(0)),
            last_contact_unix_ms: (contact > 0).then_some(contact),
            newest_change_id: (newest > 0).then_some(newest),
            publish_queue_sessions: self.queue_sessions.load(Relaxed),
            publish_queue_users: self.queue_users.load(Relaxed),
            reconnects: self.reconnects.load(Relaxed),
        }
    }
}
