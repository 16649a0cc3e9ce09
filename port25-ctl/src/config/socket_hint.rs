//! What the socket scan found in a config file, kept on the file itself: an extended
//! attribute `trusted.port25.socket` naming the file's size and modification time and the
//! answer. Every client verb (a hook per session event) asks for the socket, and a config
//! with a million exempt entries is 35 MB to scan; the hint answers in a `getxattr`.
//!
//! Only root (CAP_SYS_ADMIN) reads or writes `trusted.*`, so no other user can plant an
//! answer; any write to the file changes its size or modification time and voids the hint,
//! and a file replaced (an editor's rename) has no hint. Without the capability, or on a
//! filesystem without extended attributes, the scan runs as before.

use std::{
    ffi::CString,
    fs::File,
    os::{fd::AsRawFd, unix::ffi::OsStrExt as _, unix::fs::MetadataExt as _},
    path::PathBuf,
};

const NAME: &[u8] = b"trusted.port25.socket\0";

/// What identifies the bytes of a file here: its size and modification time (ns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Identity {
    size: u64,
    mtime: i64,
    mtime_ns: i64,
}

pub(super) fn identity(f: &File) -> Option<Identity> {
    let m = f.metadata().ok()?;
    Some(Identity {
        size: m.size(),
        mtime: m.mtime(),
        mtime_ns: m.mtime_nsec(),
    })
}

fn prefix(id: &Identity) -> String {
    format!("port25 1 {} {}.{:09} ", id.size, id.mtime, id.mtime_ns)
}

/// The answer recorded for the file as it is now: Some(None) for "names no socket".
pub(super) fn read(f: &File, id: &Identity) -> Option<Option<PathBuf>> {
    let mut buf = [0u8; 4096 + 64];
    // SAFETY: a valid fd, a NUL-terminated name and a buffer of the given length.
    let n = unsafe {
        libc::fgetxattr(
            f.as_raw_fd(),
            NAME.as_ptr().cast(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let v = buf.get(..usize::try_from(n).ok()?)?;
    let rest = v.strip_prefix(prefix(id).as_bytes())?;
    if rest == b"absent" {
        return Some(None);
    }
    let p = rest.strip_prefix(b"found ")?;
    let p = std::str::from_utf8(p).ok()?;
    (!p.is_empty()).then(|| Some(PathBuf::from(p)))
}

/// Records the scan's sure answer for the file as it was read (best effort).
pub(super) fn write(f: &File, id: &Identity, socket: Option<&std::path::Path>) {
    let mut v = prefix(id).into_bytes();
    match socket {
        Some(p) => {
            v.extend_from_slice(b"found ");
            v.extend_from_slice(p.as_os_str().as_bytes());
        }
        None => v.extend_from_slice(b"absent"),
    }
    if v.len() > 4096 || CString::new(v.clone()).is_err() {
        return;
    }
    // SAFETY: a valid fd, a NUL-terminated name and a value of the given length.
    unsafe {
        libc::fsetxattr(
            f.as_raw_fd(),
            NAME.as_ptr().cast(),
            v.as_ptr().cast(),
            v.len(),
            0,
        );
    }
}
