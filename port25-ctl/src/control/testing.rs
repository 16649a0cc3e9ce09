//! The daemon's only test hooks, all read from its environment, all used by the kernel
//! and end-to-end tests in `tests/` (which run the shipped binary, so a cargo feature would
//! test a different program than the one that ships).
//!
//! Why they are safe in production: each acts only when its variable is set in the daemon's
//! own environment, which only root (or the unit file) controls, and root can kill the daemon
//! or move the clock anyway. None opens port 25 beyond what the daemon's own absence does:
//! a failpoint aborts with the change committed (the next start applies it; the links keep
//! enforcing from the pins meanwhile) or fails every start as an old kernel would (a running
//! tree keeps enforcing from its pins, timed unblocks ending in the kernel, but with no
//! daemon sessions are not followed and no change is applied; a router with no tree is not
//! enforcing at all); the clock shift only moves when timed unblocks end, exactly as a
//! wrong system clock would, which the daemon already guards against (see `Wall`). The index gate is the one
//! that is not harmless if it leaks into a unit file: the first change after every full
//! build (start, reload, a reconcile made on the loop) waits for it on the daemon's only loop, so link events
//! (a new device is not enforced until attached), signals and clients wait too, for up to
//! a minute per build. Never set `PORT25_TEST_*` or `PORT25_FAILPOINT_*` on a router.

use anyhow::{Context as _, Result};

/// Set: the daemon aborts right after its first committed change, before the maps are
/// written (where a crash hurts most). The crash-consistency test uses it.
pub const FAILPOINT_AFTER_COMMIT: &str = "PORT25_FAILPOINT_AFTER_COMMIT";

/// Set: with a fleet registry, the daemon aborts right after the fleet's database committed
/// its first policy change, before the local replica commits it (the replica then learns it
/// from the log at the next start). The fleet crash test uses it.
pub const FAILPOINT_AFTER_FLEET_COMMIT: &str = "PORT25_FAILPOINT_AFTER_FLEET_COMMIT";

/// Set (to anything, even 0): the daemon's start fails where the kernel would refuse its
/// programs (a new release on a kernel too old for it), after the maps are created. The
/// failed-start tests use it.
pub const FAILPOINT_VERIFY: &str = "PORT25_FAILPOINT_VERIFY";

/// A program name (`port25_tc`...): verifying that entry point fails as if the kernel
/// refused it, wherever it is verified (a start, a reload, an attach). The test of a reload
/// to a hook the kernel refuses uses it.
pub const FAILPOINT_REFUSE_PROGRAM: &str = "PORT25_FAILPOINT_REFUSE_PROGRAM";

/// Seconds added to the system's wall clock as the daemon reads it (negative = a clock
/// behind real time, as after a boot without RTC before NTP has synced). The clock guard
/// tests use it.
pub const FAKE_WALL_SHIFT: &str = "PORT25_TEST_WALL_SHIFT_S";

/// A path: the per-user index of a full build (made after the maps are written, see
/// [`crate::policy::index::Deferred`]) is held until a file is there, for at most a minute.
/// The test of a change sent before the index is made opens it once the change is seen
/// waiting: no sleep decides the order, whatever the machine's speed.
pub const INDEX_GATE: &str = "PORT25_TEST_INDEX_GATE";

/// A path: a reconcile's build off the loop (see `control/server/rebuild.rs`), once it has
/// read the maps and the registry, writes `PATH.held` and waits until a file is at `PATH`,
/// for at most five minutes (a slow VM makes the test's changes meanwhile). The test of
/// changes made while a build runs makes them once the build is seen holding. Not harmful on
/// a router, if not harmless: the loop goes on answering, attaching and applying changes
/// meanwhile (a failed change write is still repaired at once, on the loop); the reconciles
/// wait: drift repair, the recording of ended unblocks, the fleet log's pruning.
pub const REBUILD_GATE: &str = "PORT25_TEST_REBUILD_GATE";

/// Holds the reconcile's build while [`REBUILD_GATE`] names a path with no file (returns at
/// once when unset).
pub fn hold_rebuild() {
    let Some(gate) = std::env::var_os(REBUILD_GATE) else {
        return;
    };
    let gate = std::path::PathBuf::from(gate);
    let mut held = gate.clone().into_os_string();
    held.push(".held");
    let _ = std::fs::write(&held, b"");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !gate.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Holds the index thread while [`INDEX_GATE`] names a path with no file (returns at once
/// when unset).
pub fn hold_index() {
    let Some(gate) = std::env::var_os(INDEX_GATE) else {
        return;
    };
    let gate = std::path::PathBuf::from(gate);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while !gate.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Aborts when [`FAILPOINT_AFTER_COMMIT`] is set.
pub fn failpoint_after_commit() {
    if std::env::var_os(FAILPOINT_AFTER_COMMIT).is_some() {
        std::process::abort();
    }
}

/// Aborts when [`FAILPOINT_AFTER_FLEET_COMMIT`] is set.
pub fn failpoint_after_fleet_commit() {
    if std::env::var_os(FAILPOINT_AFTER_FLEET_COMMIT).is_some() {
        std::process::abort();
    }
}

/// Err when [`FAILPOINT_VERIFY`] is set.
pub fn failpoint_verify() -> Result<()> {
    if std::env::var_os(FAILPOINT_VERIFY).is_some() {
        anyhow::bail!("{FAILPOINT_VERIFY}: the programs are refused as by the verifier");
    }
    Ok(())
}

/// Err when [`FAILPOINT_REFUSE_PROGRAM`] names `program`.
pub fn failpoint_refuse(program: &str) -> Result<()> {
    if std::env::var_os(FAILPOINT_REFUSE_PROGRAM).is_some_and(|v| v == program) {
        anyhow::bail!("{FAILPOINT_REFUSE_PROGRAM}: {program} is refused as by the verifier");
    }
    Ok(())
}

/// The shift [`FAKE_WALL_SHIFT`] asks for (zero when unset); Err when it is not a number.
pub fn wall_shift() -> Result<jiff::SignedDuration> {
    match std::env::var(FAKE_WALL_SHIFT) {
        Ok(s) => Ok(jiff::SignedDuration::from_secs(
            s.parse()
                .with_context(|| format!("{FAKE_WALL_SHIFT}={s}"))?,
        )),
        Err(_) => Ok(jiff::SignedDuration::ZERO),
    }
}
