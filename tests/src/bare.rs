//! The bench's floor: a program that does nothing but return, loaded straight through the
//! bpf(2) syscall (two instructions, no ELF, nothing of port25's), and timed with the same
//! BPF_PROG_TEST_RUN the real programs are. What a user compares port25 with is "no filter
//! logic at all", not port25's own program on a frame it ignores.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub(crate) const BPF_PROG_LOAD: libc::c_long = 5;
pub(crate) const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// Program types (uapi `enum bpf_prog_type`).
pub const SCHED_CLS: u32 = 3;
pub const XDP: u32 = 6;

/// The fields of `union bpf_attr` that BPF_PROG_LOAD reads; the rest stays zero.
#[repr(C)]
#[derive(Default)]
pub(crate) struct ProgLoad {
    pub(crate) prog_type: u32,
    pub(crate) insn_cnt: u32,
    pub(crate) insns: u64,
    pub(crate) license: u64,
    pub(crate) log_level: u32,
    pub(crate) log_size: u32,
    pub(crate) log_buf: u64,
    pub(crate) kern_version: u32,
    pub(crate) prog_flags: u32,
    pub(crate) prog_name: [u8; 16],
    pub(crate) _rest: [u64; 10],
}

/// The fields of `union bpf_attr` that BPF_PROG_TEST_RUN reads and writes.
#[repr(C)]
#[derive(Default)]
pub(crate) struct TestRun {
    pub(crate) prog_fd: u32,
    pub(crate) retval: u32,
    pub(crate) data_size_in: u32,
    pub(crate) data_size_out: u32,
    pub(crate) data_in: u64,
    pub(crate) data_out: u64,
    pub(crate) repeat: u32,
    pub(crate) duration: u32,
    pub(crate) ctx_size_in: u32,
    pub(crate) ctx_size_out: u32,
    pub(crate) ctx_in: u64,
    pub(crate) ctx_out: u64,
    pub(crate) flags: u32,
    pub(crate) cpu: u32,
    pub(crate) batch_size: u32,
    pub(crate) _rest: [u32; 9],
}

pub(crate) fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: `attr` is a live, zero-padded bpf_attr of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>(),
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `r0 = ret; exit` as a program of `prog_type`.
pub fn load(prog_type: u32, ret: i32) -> std::io::Result<OwnedFd> {
    // BPF_ALU64|BPF_MOV|BPF_K into r0, then BPF_JMP|BPF_EXIT.
    load_insns(
        prog_type,
        &[0xb7 | (ret as u32 as u64) << 32, 0x95],
        b"bare",
    )
}

/// A program of raw instructions (each as the kernel's 8-byte `struct bpf_insn`).
pub fn load_insns(prog_type: u32, insns: &[u64], name: &[u8]) -> std::io::Result<OwnedFd> {
    let license = c"GPL";
    let mut prog_name = [0u8; 16];
    prog_name[..name.len()].copy_from_slice(name);
    let mut attr = ProgLoad {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name,
        ..Default::default()
    };
    let fd = bpf(BPF_PROG_LOAD, &mut attr)?;
    // SAFETY: the kernel just gave us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Mean ns per run of `frame` through `prog`, as the kernel times it (`repeat` runs).
pub fn ns_per_run(prog: &OwnedFd, frame: &[u8], repeat: u32) -> std::io::Result<u32> {
    let mut attr = TestRun {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat,
        ..Default::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok(attr.duration)
}

/// Attaches `prog` (a SCHED_CLS program) to the tcx ingress of `ifindex` through a link
/// (BPF_LINK_CREATE), as the daemon does; the link lives as long as the descriptor.
pub fn tcx_attach(prog: &OwnedFd, ifindex: u32) -> std::io::Result<OwnedFd> {
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_TCX_INGRESS: u32 = 46;
    // link_create: prog_fd, target_ifindex, attach_type, flags; the rest (tcx's relative
    // program and expected revision) zero: appended, any revision.
    let mut attr = [0u32; 32];
    attr[0] = prog.as_raw_fd() as u32;
    attr[1] = ifindex;
    attr[2] = BPF_TCX_INGRESS;
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: the kernel just gave us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
