//! The detach marker: `detach` leaves a file in `state_dir` that makes every later start
//! refuse to attach, so a supervisor's restart (systemd `Restart=always`) cannot undo an
//! operator's detach. `port25-ctl attach` or `port25-ctl daemon --attach` lifts it.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

pub const FILE: &str = "detached";

/// The daemon's exit code when it refuses to start because of the marker; the systemd unit
/// lists it in `RestartPreventExitStatus=`.
pub const EXIT_CODE: u8 = 10;

/// A start refused because enforcement was detached on purpose.
#[derive(Debug, thiserror::Error)]
#[error(
    "port25 was detached on purpose ({detail}; marker {path}): not attaching. \
     Start enforcement deliberately with `port25-ctl daemon --attach`, or lift the marker \
     with `port25-ctl attach` and start the service again"
)]
pub struct Detached {
    pub path: String,
    pub detail: String,
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// Records a detach, durably, before anything is detached.
pub fn mark(state_dir: &Path, by: &str) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let p = path(state_dir);
    let body = serde_json::json!({
        "at": jiff::Timestamp::now(),
        "by": by,
    });
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&p)
        .with_context(|| format!("writing the detach marker {}", p.display()))?;
    writeln!(f, "{body}")?;
    f.sync_all()?;
    // The marker must survive a crash right after the detach: sync its directory entry too.
    std::fs::File::open(state_dir)?.sync_all()?;
    Ok(())
}

/// The marker's record (who, when), if there is one. An unreadable or garbled marker still
/// counts: the operator asked for a detach.
pub fn read(state_dir: &Path) -> Option<serde_json::Value> {
    let p = path(state_dir);
    if !p.exists() {
        return None;
    }
    Some(
        std::fs::read_to_string(&p)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_else(|| serde_json::json!({ "by": null, "at": null })),
    )
}

/// Refuses a start while the marker is there.
pub fn refuse_if_marked(state_dir: &Path) -> Result<()> {
    match read(state_dir) {
        None => Ok(()),
        Some(v) => Err(Detached {
            path: path(state_dir).display().to_string(),
            detail: format!(
                "by {} at {}",
                v["by"].as_str().unwrap_or("?"),
                v["at"].as_str().unwrap_or("?")
            ),
        }
        .into()),
    }
}

/// Lifts the marker; false when there was none.
pub fn clear(state_dir: &Path) -> Result<bool> {
    let p = path(state_dir);
    match std::fs::remove_file(&p) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing {}", p.display())),
    }
}
