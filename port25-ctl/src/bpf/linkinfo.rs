//! What a pinned link is attached to: aya's LinkInfo does not expose the interface index.

use std::{
    ffi::CString,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::{anyhow, Result};
use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_link_info, bpf_link_type};

use crate::bpf::sys::sys_bpf;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinnedLinkInfo {
    pub link_id: u32,
    pub prog_id: u32,
    /// 0 when the link is defunct (its interface went away).
    pub ifindex: u32,
}

pub fn read(path: &Path) -> Result<PinnedLinkInfo> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: zeroed is valid for these plain C unions/structs.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.__bindgen_anon_4.pathname = c.as_ptr() as u64;
    let fd =
        sys_bpf(bpf_cmd::BPF_OBJ_GET, &mut attr).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    // SAFETY: BPF_OBJ_GET returned a new fd that we now own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut info: bpf_link_info = unsafe { std::mem::zeroed() };
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.info.bpf_fd = fd.as_raw_fd() as u32;
    attr.info.info_len = std::mem::size_of::<bpf_link_info>() as u32;
    attr.info.info = &mut info as *mut bpf_link_info as u64;
    sys_bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    // SAFETY: the union member read matches the link type the kernel reported.
    let ifindex = unsafe {
        match info.type_ {
            t if t == bpf_link_type::BPF_LINK_TYPE_XDP as u32 => info.__bindgen_anon_1.xdp.ifindex,
            t if t == bpf_link_type::BPF_LINK_TYPE_TCX as u32 => info.__bindgen_anon_1.tcx.ifindex,
            _ => 0,
        }
    };
    Ok(PinnedLinkInfo {
        link_id: info.id,
        prog_id: info.prog_id,
        ifindex,
    })
}

pub fn ifindex(name: &str) -> u32 {
    match CString::new(name) {
        // SAFETY: NUL-terminated name.
        Ok(c) => unsafe { libc::if_nametoindex(c.as_ptr()) },
        Err(_) => 0,
    }
}

/// The name of an ifindex in this network namespace; None when there is none.
pub fn ifname(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer has the IF_NAMESIZE bytes if_indextoname writes at most.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    let c = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(c.to_string_lossy().into_owned())
}

/// Every device of this network namespace: (ifindex, name). Asked of the kernel through
/// the process's own network namespace (sysfs may show another one).
pub fn devices() -> Result<Vec<(u32, String)>> {
    let list = nix::net::if_::if_nameindex().map_err(|e| anyhow!("listing interfaces: {e}"))?;
    Ok(list
        .iter()
        .map(|i| (i.index(), i.name().to_string_lossy().into_owned()))
        .collect())
}
