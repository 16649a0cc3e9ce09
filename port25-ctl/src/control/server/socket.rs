//! What makes this daemon the only one: the instance and pin-tree locks, and the control
//! socket bound with the permissions that decide who may talk to it.

use std::{
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use tokio::net::UnixListener;

use crate::bpf::pins::Pins;

pub(super) fn create_parent(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

/// Takes an exclusive lock next to the socket so two daemons never race on the same pins.
pub(super) fn lock_instance(socket: &Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    let mut name = socket.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    create_parent(&path)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow::anyhow!(
            "another port25 daemon holds {} ({e}); stop it first",
            path.display()
        )
    })
}

/// Takes an exclusive lock on the pin directory itself: whatever socket or path spelling
/// another daemon (or an offline `detach`) uses, the same pin tree is the same inode.
pub fn lock_pins(pins: &Pins) -> Result<nix::fcntl::Flock<std::fs::File>> {
    let dir = std::fs::File::open(&pins.root)
        .with_context(|| format!("opening the pin directory {}", pins.root.display()))?;
    nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow::anyhow!(
            "another port25 daemon holds the pin directory {} ({e}): two daemons on one pin \
             tree would overwrite each other's maps and links; stop it first",
            pins.root.display()
        )
    })
}

pub(super) fn read_gid(group: Option<&str>) -> Result<Option<nix::unistd::Gid>> {
    let Some(g) = group else { return Ok(None) };
    match nix::unistd::Group::from_name(g)? {
        Some(gr) => Ok(Some(gr.gid)),
        None => bail!("read_group `{g}` does not exist on this system"),
    }
}

/// Binds the control socket: 0600 root, or 0660 root:GROUP with a read-only group.
pub(super) fn bind_socket(path: &Path, group: Option<&str>) -> Result<UnixListener> {
    create_parent(path)?;
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    // Create with a tight umask so the socket is never briefly open to others.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener.with_context(|| format!("binding {}", path.display()))?;
    if let Some(gid) = read_gid(group)? {
        nix::unistd::chown(path, None, Some(gid))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    } else {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(listener)
}
