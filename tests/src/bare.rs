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

/// One eBPF instruction (the kernel's `struct bpf_insn`): opcode, registers, offset, immediate.
pub(crate) fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    code as u64
        | ((dst | src << 4) as u64) << 8
        | (off as u16 as u64) << 16
        | (imm as u32 as u64) << 32
}

// Opcodes (class | size or operation | source) of the raw programs here and in `flood`.
pub(crate) const LDXW: u8 = 0x61;
pub(crate) const LDXH: u8 = 0x69;
pub(crate) const LDXB: u8 = 0x71;
pub(crate) const STW: u8 = 0x62;
pub(crate) const STDW: u8 = 0x7a;
pub(crate) const STXW: u8 = 0x63;
pub(crate) const STXH: u8 = 0x6b;
pub(crate) const MOVX: u8 = 0xbf;
pub(crate) const MOVK: u8 = 0xb7;
pub(crate) const ADDK: u8 = 0x07;
pub(crate) const ADDX: u8 = 0x0f;
pub(crate) const ANDK: u8 = 0x57;
pub(crate) const XORK: u8 = 0xa7;
pub(crate) const RSHK: u8 = 0x77;
pub(crate) const BE: u8 = 0xdc;
pub(crate) const JGTX: u8 = 0x2d;
pub(crate) const JNEK: u8 = 0x55;
pub(crate) const JEQK: u8 = 0x15;
pub(crate) const JA: u8 = 0x05;
pub(crate) const CALL: u8 = 0x85;
pub(crate) const EXIT: u8 = 0x95;
const LD_IMM64: u8 = 0x18;
/// BPF_STX | BPF_ATOMIC | BPF_DW, with imm BPF_ADD: `lock *(u64 *)(dst + off) += src`.
const ATOMIC_ADD_DW: u8 = 0xdb;
const PSEUDO_MAP_FD: u8 = 1;
const XDP_DROP: i32 = 1;
const XDP_PASS: i32 = 2;

/// Instructions with forward jumps to named places: `Jump(code, reg, imm, to)` is patched
/// once every place is known.
enum Op {
    I(u64),
    Jump(u8, u8, u8, i32, &'static str),
    At(&'static str),
}

fn assemble(ops: &[Op]) -> Vec<u64> {
    let mut at = std::collections::HashMap::new();
    let mut pc = 0i64;
    for op in ops {
        match op {
            Op::At(name) => {
                at.insert(*name, pc);
            }
            _ => pc += 1,
        }
    }
    let mut out = Vec::new();
    for op in ops {
        match op {
            Op::I(i) => out.push(*i),
            Op::Jump(code, dst, src, imm, to) => {
                let off = at[to] - (out.len() as i64 + 1);
                out.push(insn(*code, *dst, *src, off as i16, *imm));
            }
            Op::At(_) => {}
        }
    }
    out
}

/// The header checks any "drop TCP to 25" program makes, and nothing else: Ethernet type
/// IPv4, protocol TCP, destination port 25 (an IPv4 header without options assumed), read
/// straight from the packet. r2 = data on the way out; r0 = XDP_PASS unless a SYN to 25
/// falls through.
fn port25_check() -> Vec<Op> {
    use Op::*;
    vec![
        I(insn(LDXW, 2, 1, 0, 0)), // r2 = ctx->data
        I(insn(LDXW, 3, 1, 4, 0)), // r3 = ctx->data_end
        I(insn(MOVK, 0, 0, 0, XDP_PASS)),
        I(insn(MOVX, 4, 2, 0, 0)),
        I(insn(ADDK, 4, 0, 0, 38)), // to the end of the TCP ports
        Jump(JGTX, 4, 3, 0, "exit"),
        I(insn(LDXH, 5, 2, 12, 0)),
        Jump(JNEK, 5, 0, 0x0008, "exit"), // 08 00, loaded little-endian
        I(insn(LDXB, 5, 2, 23, 0)),
        Jump(JNEK, 5, 0, 6, "exit"),
        I(insn(LDXH, 5, 2, 36, 0)),
        Jump(JNEK, 5, 0, 0x1900, "exit"), // 00 19
    ]
}

/// The least a filter of TCP to 25 can do: [`port25_check`], then XDP_DROP for a segment to
/// 25 and XDP_PASS for anything else. The bench's floor for what port25's parse costs.
pub fn minimal_check() -> std::io::Result<OwnedFd> {
    use Op::*;
    let mut ops = port25_check();
    ops.extend([
        I(insn(MOVK, 0, 0, 0, XDP_DROP)),
        At("exit"),
        I(insn(EXIT, 0, 0, 0, 0)),
    ]);
    load_insns(XDP, &assemble(&ops), b"p25floorcheck")
}

/// [`minimal_check`], then the least per-source counting can do for a segment to 25: one
/// lookup of its IPv4 source in `lru` (an LRU hash of `key_size`-byte keys, the address in
/// the first 4 bytes, 4 at byte 16 as port25's `OffenderKey` has it) and two atomic adds
/// into the value (port25 adds to its attempts and segments, at bytes 32 and 40), or an
/// insert of a zeroed value of `value_size` bytes for a new source. The bench's floor for
/// what port25's offender tracking costs.
pub fn minimal_tracking(
    lru: &OwnedFd,
    key_size: usize,
    value_size: usize,
) -> std::io::Result<OwnedFd> {
    use Op::*;
    assert!(key_size == 20 && value_size.is_multiple_of(8) && (48..=256).contains(&value_size));
    let fd = lru.as_raw_fd();
    let key = -24i16;
    let value = key - value_size as i16;
    let map = |ops: &mut Vec<Op>| {
        ops.push(I(insn(LD_IMM64, 1, PSEUDO_MAP_FD, 0, fd)));
        ops.push(I(0));
    };
    let mut ops = port25_check();
    ops.extend([
        I(insn(STDW, 10, 0, key, 0)),
        I(insn(STDW, 10, 0, key + 8, 0)),
        I(insn(STW, 10, 0, key + 16, 4)), // family
        I(insn(LDXW, 5, 2, 26, 0)),       // the IPv4 source
        I(insn(STXW, 10, 5, key, 0)),
    ]);
    map(&mut ops);
    ops.extend([
        I(insn(MOVX, 2, 10, 0, 0)),
        I(insn(ADDK, 2, 0, 0, key as i32)),
        I(insn(CALL, 0, 0, 0, 1)), // bpf_map_lookup_elem
        Jump(JEQK, 0, 0, 0, "insert"),
        I(insn(MOVK, 1, 0, 0, 1)),
        I(insn(ATOMIC_ADD_DW, 0, 1, 32, 0)),
        I(insn(ATOMIC_ADD_DW, 0, 1, 40, 0)),
        I(insn(MOVK, 0, 0, 0, XDP_DROP)),
        I(insn(EXIT, 0, 0, 0, 0)),
        At("insert"),
    ]);
    for i in 0..value_size as i16 / 8 {
        ops.push(I(insn(STDW, 10, 0, value + 8 * i, 0)));
    }
    map(&mut ops);
    ops.extend([
        I(insn(MOVX, 2, 10, 0, 0)),
        I(insn(ADDK, 2, 0, 0, key as i32)),
        I(insn(MOVX, 3, 10, 0, 0)),
        I(insn(ADDK, 3, 0, 0, value as i32)),
        I(insn(MOVK, 4, 0, 0, 0)),
        I(insn(CALL, 0, 0, 0, 2)), // bpf_map_update_elem
        I(insn(MOVK, 0, 0, 0, XDP_DROP)),
        At("exit"),
        I(insn(EXIT, 0, 0, 0, 0)),
    ]);
    load_insns(XDP, &assemble(&ops), b"p25floortrack")
}

/// An LRU hash map (BPF_MAP_CREATE), for [`minimal_tracking`].
pub fn lru_hash(key_size: u32, value_size: u32, max_entries: u32) -> std::io::Result<OwnedFd> {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
    // map_type, key_size, value_size, max_entries, map_flags; the rest zero.
    let mut attr = [0u32; 32];
    attr[0] = BPF_MAP_TYPE_LRU_HASH;
    attr[1] = key_size;
    attr[2] = value_size;
    attr[3] = max_entries;
    let fd = bpf(BPF_MAP_CREATE, &mut attr)?;
    // SAFETY: the kernel just gave us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `calls` calls of a helper that does next to nothing (bpf_get_prandom_u32: a per-CPU
/// state step), then XDP_PASS: against [`load`]'s bare program, what a kernel function's
/// call and return cost on this host (mitigations for return-address speculation price
/// every return; port25's offender tracking makes five per segment in the kernel's LRU
/// hash lookup and its own hand-over).
pub fn helper_calls(calls: usize) -> std::io::Result<OwnedFd> {
    const GET_PRANDOM_U32: i32 = 7;
    let mut insns: Vec<u64> = (0..calls)
        .map(|_| insn(CALL, 0, 0, 0, GET_PRANDOM_U32))
        .collect();
    insns.push(insn(MOVK, 0, 0, 0, XDP_PASS));
    insns.push(insn(EXIT, 0, 0, 0, 0));
    load_insns(XDP, &insns, b"p25floorcalls")
}
