//! The bench's floor: a program that does nothing but return, loaded straight through the
//! bpf(2) syscall (two instructions, no ELF, nothing of port25's), and timed with the same
//! BPF_PROG_TEST_RUN the real programs are. What a user compares port25 with is "no filter
//! logic at all", not port25's own program on a frame it ignores.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// Program types (uapi `enum bpf_prog_type`).
pub const SCHED_CLS: u32 = 3;
pub const XDP: u32 = 6;

/// The fields of `union bpf_attr` that BPF_PROG_LOAD reads; the rest stays zero.
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    _rest: [u64; 10],
}

/// The fields of `union bpf_attr` that BPF_PROG_TEST_RUN reads and writes.
#[repr(C)]
#[derive(Default)]
struct TestRun {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _rest: [u32; 9],
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i64> {
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
    let insns: [u64; 2] = [0xb7 | (ret as u32 as u64) << 32, 0x95];
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..4].copy_from_slice(b"bare");
    let mut attr = ProgLoad {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
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
