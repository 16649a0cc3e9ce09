//! The pin tree, named in one place:
//!
//! ```text
//! <pin_dir>/            (default /sys/fs/bpf/port25, mode 0700)
//!   maps/P25_*          one pin per map (names in port25_common::maps)
//!   links/xdp:<if>      one pin per attach point: xdp:<if>, tc-ingress:<if>, tc-egress:<if>
//!                       (<if> with `.` and `%` %-escaped: bpffs refuses dots); for TC
//!                       through netlink (no tcx), a symlink recording the filter instead
//!                       (see bpf::tc)
//!   maps-next/P25_*     only during a map migration: the new maps, filled before any
//!                       program uses them, then renamed over maps/
//!   progs/<build>/      the programs this build verified, kept for its next start, and
//!                       the scratch they share (see bpf::kept; none with --kernel-log)
//! ```

use std::{
    fs,
    os::unix::fs::{DirBuilderExt, MetadataExt},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

#[derive(Clone, Debug)]
pub struct Pins {
    pub root: PathBuf,
    maps: &'static str,
}

pub const MAPS_DIR: &str = "maps";
pub const STAGING_MAPS_DIR: &str = "maps-next";
/// A link entry being written, renamed over its attach point's name when complete.
pub const TMP_PREFIX: &str = "new~";

impl Pins {
    pub fn new(root: &Path) -> Self {
        Pins {
            root: root.to_owned(),
            maps: MAPS_DIR,
        }
    }
    /// The same tree with its maps in the staging directory (a migration's new maps).
    pub fn staging(&self) -> Pins {
        Pins {
            root: self.root.clone(),
            maps: STAGING_MAPS_DIR,
        }
    }
    pub fn maps_dir(&self) -> PathBuf {
        self.root.join(self.maps)
    }
    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }
    pub fn link(&self, attach_point: &str) -> PathBuf {
        self.links_dir().join(attach_point)
    }

    /// Attach points that have a pinned link, sorted.
    pub fn pinned_links(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.links_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with(TMP_PREFIX))
            .collect();
        v.sort();
        v
    }

    /// Whether the links directory holds anything at all (a half-written record of a crash
    /// included); Err when it cannot be read: a caller about to remove the tree keeps it.
    pub fn any_link_entry(&self) -> std::io::Result<bool> {
        match fs::read_dir(self.links_dir()) {
            Ok(mut d) => Ok(d.next().transpose()?.is_some()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn exists(&self) -> bool {
        self.maps_dir().exists()
    }

    /// Makes sure the pin tree sits on a bpffs that outlives this process, then creates it.
    pub fn prepare(&self) -> Result<()> {
        let bpffs = self
            .root
            .parent()
            .context("pin_dir must not be the filesystem root")?;
        if !is_bpffs(bpffs) {
            if bpffs != Path::new("/sys/fs/bpf") {
                bail!(
                    "{} is not a bpffs mount; mount one there (mount -t bpf bpf {}) or set pin_dir under /sys/fs/bpf",
                    bpffs.display(),
                    bpffs.display()
                );
            }
            if private_mount_namespace() {
                bail!(
                    "/sys/fs/bpf is not mounted and this process runs in a private mount namespace \
                     (e.g. `ip netns exec`): a bpffs mounted here, and every pin in it, would vanish \
                     when the daemon exits, taking enforcement with it. Mount bpffs in the host's \
                     namespace and start the daemon with `nsenter --net=/run/netns/NS` instead"
                );
            }
            nix::mount::mount(
                Some("bpf"),
                bpffs,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .with_context(|| format!("mounting bpffs at {}", bpffs.display()))?;
            tracing::info!("mounted bpffs at {}", bpffs.display());
        }
        for dir in [&self.root, &self.maps_dir(), &self.links_dir()] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(())
    }

    /// Removes the (emptied) pin tree.
    pub fn remove_tree(&self) -> Result<()> {
        crate::bpf::kept::remove_all(self)?;
        let staging = self.root.join(STAGING_MAPS_DIR);
        for dir in [self.maps_dir(), staging, self.links_dir()] {
            if dir.exists() {
                for e in fs::read_dir(&dir)? {
                    let p = e?.path();
                    fs::remove_file(&p).with_context(|| format!("unpinning {}", p.display()))?;
                }
                fs::remove_dir(&dir)?;
            }
        }
        if self.root.exists() {
            fs::remove_dir(&self.root)
                .with_context(|| format!("removing {}", self.root.display()))?;
        }
        Ok(())
    }
}

pub fn is_bpffs(path: &Path) -> bool {
    match nix::sys::statfs::statfs(path) {
        Ok(s) => s.filesystem_type().0 == BPF_FS_MAGIC,
        Err(_) => false,
    }
}

/// True when this process does not share PID 1's mount namespace.
pub fn private_mount_namespace() -> bool {
    match (
        fs::metadata("/proc/self/ns/mnt"),
        fs::metadata("/proc/1/ns/mnt"),
    ) {
        (Ok(a), Ok(b)) => a.ino() != b.ino() || a.dev() != b.dev(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed start removes the tree only on `Ok(false)`: an unreadable links directory
    /// must say so, not pass for an empty one.
    #[test]
    fn any_link_entry_tells_empty_from_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let pins = Pins::new(&dir.path().join("p25"));
        assert!(!pins.any_link_entry().unwrap(), "no tree yet: no link");
        fs::create_dir_all(pins.links_dir()).unwrap();
        assert!(!pins.any_link_entry().unwrap(), "an empty links directory");
        // A half-written record (a crash between the filter and its rename) counts.
        fs::write(pins.links_dir().join(format!("{TMP_PREFIX}x")), b"").unwrap();
        assert!(pins.any_link_entry().unwrap(), "a temporary record");
        assert!(pins.pinned_links().is_empty(), "which is not a pinned link");
        fs::remove_dir_all(pins.links_dir()).unwrap();
        // Not a directory: read_dir fails, as it would on a bpffs that cannot be read.
        fs::write(pins.links_dir(), b"").unwrap();
        assert!(pins.any_link_entry().is_err(), "unreadable is not empty");
    }
}
