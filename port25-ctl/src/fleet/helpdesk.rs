//! `port25-ctl --registry-only`: a policy change made straight in the fleet's database, on a
//! helpdesk host that has database access only (no daemon). It runs the same registry rules
//! as a router's writer, under the same write lock, on a scratch replica that holds only the
//! user it is about (read from the fleet under the lock); its rows and change-log entry
//! reach every router through the log like any other change.

use anyhow::{Context as _, Result};
use jiff::Timestamp;

use super::{Fleet, FleetTx};
use crate::{
    config::Registry,
    registry::store::{sqlite::SqliteStore, Store as _, Tx},
};

/// Runs `f` (a rule about `user`) as one fleet change.
pub fn change<R>(
    reg: &Registry,
    user: &str,
    f: impl FnOnce(&mut dyn Tx, Timestamp) -> Result<R>,
) -> Result<R> {
    let mut fleet = Fleet::new(reg)?;
    let scratch = Scratch::new()?;
    let mut store = SqliteStore::open(&scratch.0)?;
    fleet.begin()?;
    let have = match fleet.user(user) {
        Ok(u) => u,
        Err(e) => {
            fleet.rollback();
            return Err(e);
        }
    };
    let mut local = store.begin()?;
    if let Some(u) = &have {
        local.put_user(u)?;
    }
    let mut tx = FleetTx::new(local, &mut fleet);
    let r = f(&mut tx, Timestamp::now())?;
    Box::new(tx).commit()?;
    Ok(r)
}

/// The scratch replica's directory, removed with it.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new() -> Result<Scratch> {
        let dir = std::env::temp_dir().join(format!(
            "port25-registry-only-{}-{}",
            std::process::id(),
            Timestamp::now().as_nanosecond()
        ));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
