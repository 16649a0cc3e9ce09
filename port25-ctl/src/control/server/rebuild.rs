//! A reconcile's full build, made off the daemon's loop.
//!
//! At a million sessions the build (registry read, desired state, the maps read back) takes
//! seconds. On the loop it held every request, signal and link event that long at each
//! reconcile: a hook's `session up` waited, and a new device matching a glob was not
//! enforced until it was over. Here a thread of its own reads the registry (its own
//! read-only connection) and the pinned maps, and makes the desired state and its index,
//! while the loop goes on.
//!
//! The loop goes on changing things meanwhile, and the build must not undo any of it: a
//! build read before an `unblock` would close the user again, one read before a `block`
//! would open port 25 to a user just blocked. So every change the loop makes while the build
//! runs is recorded here, and the build's result is brought up to date with them before it
//! is applied ([`super::Daemon::rebuilt`]): each user a change gave new entries gets its
//! latest entries again (they are whole, not a delta: replaying one already in the build's
//! read changes nothing), and each slot a change wrote to the maps is taken as the loop last
//! wrote it rather than as the build read it. A change the replay cannot carry (the config
//! reloaded, runtime entries changed, a map write that failed) spoils the build: it is
//! dropped and made again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use anyhow::{anyhow, Result};
use tokio::sync::oneshot;

use crate::{
    bpf::{livemaps::LiveMaps, pins::Pins},
    config::Config,
    control::testing,
    policy::{
        self,
        index::{Index, UserEntries},
        slot::Slot,
        Clock, Desired,
    },
    registry::store::sqlite::SqliteStore,
};

/// What the thread made: the maps as it read them, the desired state and its index.
pub(super) struct Built {
    pub(super) have: Desired,
    pub(super) want: Desired,
    pub(super) index: Index,
}

/// A build running, and the loop's changes since it began.
pub(super) struct Rebuild {
    done: oneshot::Receiver<Result<Built>>,
    /// Each user a change gave new entries: the latest ones.
    pub(super) users: BTreeMap<String, UserEntries>,
    /// Each slot a change wrote to the maps.
    pub(super) slots: BTreeSet<Slot>,
    /// A change wrote the settings (session prefix lengths).
    pub(super) settings: bool,
    /// Why the build cannot be brought up to date, if it cannot.
    pub(super) spoiled: Option<&'static str>,
}

impl Rebuild {
    /// Starts the build of the desired state for `cfg` at `now`.
    pub(super) fn start(cfg: Arc<Config>, clock: Clock, now: jiff::Timestamp) -> Rebuild {
        let (tx, done) = oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("port25-rebuild".into())
            .spawn(move || {
                let _ = tx.send(build(&cfg, &clock, now));
            });
        if let Err(e) = spawned {
            // The sender went with the closure: `wait` answers at once, with an error, and
            // the failure counts toward a reconcile made on the loop.
            tracing::warn!("no thread for the reconcile's build: {e}");
        }
        Rebuild {
            done,
            users: BTreeMap::new(),
            slots: BTreeSet::new(),
            settings: false,
            spoiled: None,
        }
    }

    /// A change committed and written to the maps: the users' new entries, the slots it wrote.
    pub(super) fn changed(
        &mut self,
        users: Vec<(String, UserEntries)>,
        slots: impl IntoIterator<Item = Slot>,
        settings: bool,
    ) {
        self.users.extend(users);
        self.slots.extend(slots);
        self.settings |= settings;
    }

    /// A change the replay cannot carry.
    pub(super) fn spoil(&mut self, why: &'static str) {
        self.spoiled.get_or_insert(why);
    }
}

/// The running build's result, once there (never, when none runs).
pub(super) async fn wait(r: &mut Option<Rebuild>) -> Result<Built> {
    match r {
        Some(r) => (&mut r.done)
            .await
            .unwrap_or_else(|_| Err(anyhow!("the reconcile's build ended without an answer"))),
        None => std::future::pending().await,
    }
}

/// The thread's work. The maps are read before the registry, each with handles of its own
/// (the loop's are its own to write with).
fn build(cfg: &Config, clock: &Clock, now: jiff::Timestamp) -> Result<Built> {
    let t = std::time::Instant::now();
    let have = policy::read_state(&LiveMaps::open(&Pins::new(&cfg.pin_dir))?)?;
    let mut store = SqliteStore::open_read_only(&cfg.state_dir)?;
    let (want, entries) = super::desired(cfg, &mut store, clock, now)?;
    let index = entries.index();
    tracing::debug!(
        ms = t.elapsed().as_millis() as u64,
        "reconcile: built off the loop"
    );
    testing::hold_rebuild();
    Ok(Built { have, want, index })
}
