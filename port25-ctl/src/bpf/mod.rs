//! The kernel side seen from userspace: loading and attaching the programs, the pin tree,
//! link info, raw syscalls, the one list of maps and the live maps.

pub mod datapath;
pub mod detached;
pub mod exbits;
pub mod kept;
pub mod klog;
pub mod linkinfo;
pub mod livemaps;
pub mod maps;
pub mod offenders;
pub mod pins;
pub mod route;
pub mod sys;
pub mod tc;
