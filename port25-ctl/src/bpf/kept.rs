//! Verified programs kept across restarts.
//!
//! Verifying the entry points is most of a restart's CPU (about a second for the XDP one on
//! Linux 6.18 here, many times that on a small router's CPU), and a restart of the same
//! build verifies the same instructions against the same maps again. So each program a
//! start verifies is pinned under `progs/<build>/`, and the next start of that build takes
//! it from there, if it still uses exactly the maps pinned now.
//!
//! What makes a kept program safe to use again:
//! - `<build>` is the digest of the embedded object: another build never finds them;
//! - every pinned map it uses is, by id, the one pinned now under its name (a migration's
//!   new maps, or a map re-created, make it stale: it is dropped and verified afresh);
//! - the offender tracking's scratch (`P25_TRACKTMP`, which an entry point and the tracking
//!   program it tail-calls share) is pinned beside them, so a program kept and one verified
//!   now always share it;
//! - with `--kernel-log` nothing is kept or reused: the log's program arrays are private to
//!   the daemon that filled them, and the kernel empties them when it exits.

use std::{
    fs,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use anyhow::{Context as _, Result};
use aya::{maps::MapInfo, programs::ProgramInfo};
use aya_obj::generated::bpf_prog_type;

use crate::bpf::{
    datapath::{ALL_MAPS, EBPF_OBJECT},
    pins::Pins,
};

/// Under the pin tree's root.
pub const PROGS_DIR: &str = "progs";
/// The shared scratch's pin, in a build's directory.
pub const TRACK_SCRATCH: &str = "P25_TRACKTMP";

/// The kernel keeps names of at most this many bytes.
const NAME_LEN: usize = 15;

/// The embedded object's digest: the first 16 hex digits of its SHA-256.
pub fn build_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        use sha2::Digest as _;
        let d = sha2::Sha256::digest(EBPF_OBJECT);
        d[..8].iter().map(|b| format!("{b:02x}")).collect()
    })
}

/// The programs of this build kept in one pin tree, and the maps they must use.
#[derive(Clone, Debug)]
pub struct Kept {
    dir: PathBuf,
    /// Where the maps are pinned that a kept program must be using.
    maps: Pins,
}

impl Kept {
    /// This build's directory in `pins`' tree (created). `pins` names the maps the
    /// programs are loaded against (a migration's staged ones, during one).
    pub fn open(pins: &Pins) -> Result<Kept> {
        let dir = progs_root(pins).join(build_id());
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        Ok(Kept {
            dir,
            maps: pins.clone(),
        })
    }

    /// Removes other builds' programs, once this build's are verified: a start refused by
    /// the kernel (a rollback's way back) leaves them.
    pub fn prune_others(&self) {
        let Some(all) = self.dir.parent() else { return };
        let others = fs::read_dir(all)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name() != build_id());
        for e in others {
            if let Err(e) = remove_dir(&e.path()) {
                tracing::warn!("removing another build's kept programs: {e:#}");
            }
        }
    }

    /// Where the tracking scratch is pinned.
    pub fn scratch(&self) -> PathBuf {
        self.dir.join(TRACK_SCRATCH)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The kept program `name`'s pin, if there is one still fit to use (see the module);
    /// one that is not is unpinned.
    pub fn usable(&self, name: &str, xdp: bool) -> Option<PathBuf> {
        let path = self.path(name);
        if !path.exists() {
            return None;
        }
        match self.check(&path, name, xdp) {
            Ok(()) => Some(path),
            Err(e) => {
                tracing::info!(program = name, "not reusing the kept program: {e:#}");
                if let Err(e) = fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), "removing a stale kept program: {e}");
                }
                None
            }
        }
    }

    fn check(&self, path: &Path, name: &str, xdp: bool) -> Result<()> {
        let info = ProgramInfo::from_pin(path).context("reading its info")?;
        let want = if xdp {
            bpf_prog_type::BPF_PROG_TYPE_XDP
        } else {
            bpf_prog_type::BPF_PROG_TYPE_SCHED_CLS
        };
        anyhow::ensure!(info.program_type() == want, "another program type");
        anyhow::ensure!(
            info.name_as_str() == Some(short(name)),
            "another name: {:?}",
            info.name_as_str()
        );
        let ids = info
            .map_ids()
            .context("reading its maps")?
            .unwrap_or_default();
        let mut pinned = 0;
        for id in ids {
            let map = MapInfo::from_id(id).with_context(|| format!("map id {id}"))?;
            let Some(map_name) = map.name_as_str() else {
                continue;
            };
            let pin = if map_name == short(TRACK_SCRATCH) {
                self.scratch()
            } else if let Some(full) = ALL_MAPS.iter().find(|n| short(n) == map_name) {
                pinned += 1;
                self.maps.map(full)
            } else {
                // Private to its load (read-only data, the verifier's scratch).
                continue;
            };
            let now = MapInfo::from_pin(&pin)
                .with_context(|| format!("{} is not pinned", pin.display()))?;
            anyhow::ensure!(
                now.id() == id,
                "it uses an earlier {map_name} (id {id}; pinned now: {})",
                now.id()
            );
        }
        anyhow::ensure!(pinned > 0, "it uses none of the pinned maps");
        Ok(())
    }

    /// Pins `name`, just verified, for the next start (replacing a stale pin). A failure
    /// only costs that start a verification: it is logged, not returned.
    pub fn keep(&self, name: &str, pin: impl FnOnce(&Path) -> Result<()>) {
        let path = self.path(name);
        let _ = fs::remove_file(&path);
        if let Err(e) = pin(&path) {
            tracing::warn!(
                program = name,
                "keeping the verified program for the next start: {e:#}"
            );
        }
    }
}

fn short(name: &str) -> &str {
    &name[..name.len().min(NAME_LEN)]
}

/// `progs/` in the tree of `pins`.
pub fn progs_root(pins: &Pins) -> PathBuf {
    pins.root.join(PROGS_DIR)
}

/// Removes every kept program (and the shared scratch's pin): the tree is going, or its
/// maps are.
pub fn remove_all(pins: &Pins) -> Result<()> {
    let all = progs_root(pins);
    if all.exists() {
        for e in fs::read_dir(&all)? {
            remove_dir(&e?.path())?;
        }
        fs::remove_dir(&all).with_context(|| format!("removing {}", all.display()))?;
    }
    Ok(())
}

/// Removes a directory of pins (bpffs has no recursive removal of its own).
fn remove_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        for e in fs::read_dir(dir)? {
            let p = e?.path();
            fs::remove_file(&p).with_context(|| format!("unpinning {}", p.display()))?;
        }
        fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))
    } else {
        fs::remove_file(dir).with_context(|| format!("removing {}", dir.display()))
    }
}
