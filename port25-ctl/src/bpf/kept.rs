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
use aya::{
    maps::MapInfo,
    programs::{Program, ProgramInfo, SchedClassifier, Xdp},
};
use aya_obj::generated::bpf_prog_type;

use crate::bpf::{
    datapath::{ALL_MAPS, EBPF_OBJECT, KERNEL_LOG_MAP},
    pins::Pins,
};

/// Under the pin tree's root.
pub const PROGS_DIR: &str = "progs";
/// The shared scratch's pin, in a build's directory.
pub const TRACK_SCRATCH: &str = "P25_TRACKTMP";

/// How this daemon loads the object (the globals it sets, the maps it pins): part of the
/// build id, and bumped with any change to it, so that a release loading the same object
/// otherwise never takes another's programs.
const LOADER_ABI: &[u8] = b"port25 loader 1";

/// The kernel keeps names of at most this many bytes.
const NAME_LEN: usize = 15;

/// The embedded object's digest, with the loader's: the first 16 hex digits of a SHA-256.
pub fn build_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update(LOADER_ABI);
        h.update(EBPF_OBJECT);
        h.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
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
    /// This build's directory in `pins`' tree (created), its scratch pin checked (one of
    /// another shape, or not a map, is removed: the load would otherwise fail on it). `pins`
    /// names the maps the programs are loaded against (a migration's staged ones, during
    /// one).
    pub fn open(pins: &Pins) -> Result<Kept> {
        let dir = progs_root(pins).join(build_id());
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let kept = Kept {
            dir,
            maps: pins.clone(),
        };
        let scratch = kept.scratch();
        if fs::symlink_metadata(&scratch).is_ok() {
            if let Err(e) = scratch_fits(&scratch) {
                tracing::warn!(path = %scratch.display(), "replacing the kept scratch: {e:#}");
                remove(&scratch)?;
            }
        }
        Ok(kept)
    }

    /// Where the tracking scratch is pinned.
    pub fn scratch(&self) -> PathBuf {
        self.dir.join(TRACK_SCRATCH)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The kept program `name`, opened, if there is one still fit to use (see the module);
    /// one that is not is unpinned.
    pub fn take(&self, name: &str, xdp: bool) -> Option<Program> {
        let path = self.path(name);
        fs::symlink_metadata(&path).ok()?;
        // Opened first, then checked through the same handle: what is checked is what runs.
        let opened = if xdp {
            Xdp::from_pin(&path, aya_obj::programs::XdpAttachType::Interface).map(Program::Xdp)
        } else {
            SchedClassifier::from_pin(&path).map(Program::SchedClassifier)
        };
        let checked = opened.map_err(anyhow::Error::from).and_then(|p| {
            let info = match &p {
                Program::Xdp(x) => x.info(),
                Program::SchedClassifier(t) => t.info(),
                _ => unreachable!("opened as one of the two"),
            }?;
            self.check(&info, name, Some(xdp))?;
            Ok(p)
        });
        match checked {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::info!(program = name, "not reusing the kept program: {e:#}");
                if let Err(e) = remove(&path) {
                    tracing::warn!("removing a stale kept program: {e:#}");
                }
                None
            }
        }
    }

    fn check(&self, info: &ProgramInfo, name: &str, xdp: Option<bool>) -> Result<()> {
        let ty = info.program_type();
        let want = match xdp {
            Some(true) => ty == bpf_prog_type::BPF_PROG_TYPE_XDP,
            Some(false) => ty == bpf_prog_type::BPF_PROG_TYPE_SCHED_CLS,
            None => matches!(
                ty,
                bpf_prog_type::BPF_PROG_TYPE_XDP | bpf_prog_type::BPF_PROG_TYPE_SCHED_CLS
            ),
        };
        anyhow::ensure!(want, "another program type ({ty:?})");
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
            if map_name == KERNEL_LOG_MAP {
                anyhow::ensure!(
                    kernel_log_switch(id, map.value_size()) == Some(0),
                    "it was loaded with the kernel log"
                );
                continue;
            }
            let pin = if map_name == short(TRACK_SCRATCH) {
                self.scratch()
            } else if let Some(full) = ALL_MAPS.iter().find(|n| short(n) == map_name) {
                pinned += 1;
                self.maps.map(full)
            } else {
                // Private to its load (the verifier's scratch, aya-log's).
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
        let _ = remove(&path);
        if let Err(e) = pin(&path) {
            tracing::warn!(
                program = name,
                "keeping the verified program for the next start: {e:#}"
            );
        }
    }

    /// Once this start's programs are verified: unpins every kept program no longer fit to
    /// use (one this start did not look at, of an entry point it does not attach, would
    /// otherwise hold a migration's old maps in memory), and other builds' directories (a
    /// start whose programs the verifier refuses, a rollback's way back, leaves them).
    pub fn prune(&self) {
        for e in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            if name == TRACK_SCRATCH {
                continue;
            }
            let fit = ProgramInfo::from_pin(e.path())
                .map_err(anyhow::Error::from)
                .and_then(|info| self.check(&info, &name, None));
            if let Err(why) = fit {
                tracing::info!(program = %name, "unpinning a kept program: {why:#}");
                if let Err(e) = remove(&e.path()) {
                    tracing::warn!("{e:#}");
                }
            }
        }
        let Some(all) = self.dir.parent() else { return };
        let others = fs::read_dir(all)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name() != build_id());
        for e in others {
            if let Err(e) = remove(&e.path()) {
                tracing::warn!("removing another build's kept programs: {e:#}");
            }
        }
    }
}

/// The kernel log's switch in a program's read-only map (see `datapath::kernel_log_of`).
fn kernel_log_switch(id: u32, value_size: u32) -> Option<u8> {
    let map = aya::maps::MapData::from_id(id).ok()?;
    let v = crate::bpf::sys::lookup_raw(&map, &0u32.to_ne_bytes(), value_size as usize).ok()?;
    v.first().copied()
}

/// Whether the pin at `path` is a scratch this build's programs can use: the object's
/// per-CPU array of one value of its size.
fn scratch_fits(path: &Path) -> Result<()> {
    static WANT: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    let want = WANT.get_or_init(|| {
        let obj = aya_obj::Object::parse(EBPF_OBJECT).ok()?;
        let m = obj.maps.get(TRACK_SCRATCH)?;
        Some((m.value_size(), m.max_entries()))
    });
    let (value_size, max_entries) = want.context("the object declares no tracking scratch")?;
    let info = MapInfo::from_pin(path).context("not a map")?;
    anyhow::ensure!(
        matches!(info.map_type(), Ok(aya::maps::MapType::PerCpuArray))
            && info.key_size() == 4
            && info.value_size() == value_size
            && info.max_entries() == max_entries
            && info.name_as_str() == Some(short(TRACK_SCRATCH)),
        "another map: type {:?}, key {}B, value {}B, {} entries, name {:?}",
        info.map_type().ok(),
        info.key_size(),
        info.value_size(),
        info.max_entries(),
        info.name_as_str()
    );
    Ok(())
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
    remove(&progs_root(pins))
}

/// Removes a pin, or a directory with whatever it holds; nothing there is fine.
fn remove(path: &Path) -> Result<()> {
    let r = match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
    };
    r.with_context(|| format!("removing {}", path.display()))
}
