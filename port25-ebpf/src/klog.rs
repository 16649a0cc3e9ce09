//! Opt-in kernel debug messages (`port25-ctl daemon --kernel-log`), through aya-log.
//!
//! Off must cost nothing: the switch is a load-time constant, not a map lookup. It lives in
//! its own read-only section, which aya turns into a frozen array map, so the verifier reads
//! it as a known scalar and prunes the log branches as dead code (and `status` can read the
//! running programs' own switch from that map, named after the section).

use aya_ebpf::{
    macros::map,
    maps::{PerCpuArray, ProgramArray},
    EbpfContext,
};
use aya_log_ebpf::debug;
use port25_common::{
    parse::{Parsed, Shape},
    Reason,
};

/// Set to 1 by the loader (`EbpfLoader::override_global`) before the programs are verified.
/// The controller names this symbol and its section (`KERNEL_LOG_SYMBOL`, `KERNEL_LOG_MAP`).
#[unsafe(link_section = ".rodata.p25klog")]
#[unsafe(no_mangle)]
static PORT25_KERNEL_LOG: u8 = 0;

#[inline(always)]
pub fn enabled() -> bool {
    // Volatile: the compiler must not fold the initial 0 into the code; the verifier folds
    // the value the loader wrote.
    unsafe { core::ptr::read_volatile(&PORT25_KERNEL_LOG) != 0 }
}

/// Whether a copy of a program logs its verdicts: [`Off`] is the program as it was before
/// the log existed, [`On`] stages each verdict for [`emit`].
pub trait Log {
    const ON: bool;
    fn stage(p: &Parsed, reason: Reason);
}

pub struct Off;
impl Log for Off {
    const ON: bool = false;
    #[inline(always)]
    fn stage(_: &Parsed, _: Reason) {}
}

pub struct On;
impl Log for On {
    const ON: bool = true;
    /// The copy is [`port25_klog_stage`], a global function of scalar arguments (as
    /// offender tracking's hand-over, `track.rs`): checked once on its own, and at each call
    /// only its argument types. A static subprogram here was walked once per verifier state
    /// reaching it, and inline it does not fit the stack the verdict leaves.
    #[inline(always)]
    fn stage(p: &Parsed, reason: Reason) {
        let flags = if p.addrs { ADDRS } else { 0 }
            | if p.v6 { V6 } else { 0 }
            | if p.shape == Shape::Tcp { TCP } else { 0 };
        let meta = p.dport as u64 | (reason as u64 & 0xff) << 16 | (flags as u64) << 24;
        port25_klog_stage(p.src.0[0], p.src.0[1], p.dst.0[0], p.dst.0[1], meta);
    }
}

/// Which program sends a message; each gets its own copy of [`emit`] with its name.
pub trait Hook {
    const NAME: &'static str;
    /// Its message program's index in [`KLOG_TC`] (TC programs only).
    const EMIT: u32 = 0;
}
pub struct Xdp;
impl Hook for Xdp {
    const NAME: &'static str = "xdp";
}
pub struct Tc;
impl Hook for Tc {
    const NAME: &'static str = "tc";
    const EMIT: u32 = 2;
}
pub struct TcRaw;
impl Hook for TcRaw {
    const NAME: &'static str = "tc_raw";
    const EMIT: u32 = 3;
}

/// The logging programs, by type (a program array takes one program type). Filled by the
/// daemon that loads with `--kernel-log` and private to its load (never pinned): the kernel
/// empties them when that daemon exits, and the entry points go on without the log. The
/// controller names them and their indices (`bpf::klog`).
#[map(name = "P25_KLOG_XDP")]
static KLOG_XDP: ProgramArray = ProgramArray::with_max_entries(2, 0);
#[map(name = "P25_KLOG_TC")]
static KLOG_TC: ProgramArray = ProgramArray::with_max_entries(4, 0);
/// [`KLOG_XDP`]: the logging copy, the message program.
const XDP_LOGGED: u32 = 0;
const XDP_EMIT: u32 = 1;
/// [`KLOG_TC`]: the logging copies of `port25_tc` and `port25_tc_raw` (their message
/// programs follow, [`Hook::EMIT`]).
pub const TC_LOGGED: u32 = 0;
pub const TC_RAW_LOGGED: u32 = 1;

/// Tail-calls the XDP logging copy; returns only when that fails.
#[inline(always)]
pub fn xdp_logged<C: EbpfContext>(ctx: &C) {
    // SAFETY: our own program array; a missing entry just returns.
    unsafe { KLOG_XDP.tail_call(ctx, XDP_LOGGED) };
}

/// As [`xdp_logged`], for TC: `index` is [`TC_LOGGED`] or [`TC_RAW_LOGGED`].
#[inline(always)]
pub fn tc_logged<C: EbpfContext>(ctx: &C, index: u32) {
    // SAFETY: as in `xdp_logged`.
    unsafe { KLOG_TC.tail_call(ctx, index) };
}

/// Hands the action (and whether tracking awaits the segment) to the message program, and
/// tail-calls it; returns only when that fails.
#[inline(always)]
pub fn xdp_emit<C: EbpfContext>(ctx: &C, action: u32, tracked: bool) {
    if settle(action, tracked) {
        // SAFETY: as in `xdp_logged`.
        unsafe { KLOG_XDP.tail_call(ctx, XDP_EMIT) };
    }
}

/// As [`xdp_emit`], for TC.
#[inline(always)]
pub fn tc_emit<H: Hook, C: EbpfContext>(ctx: &C, action: i32, tracked: bool) {
    if settle(action as u32, tracked) {
        // SAFETY: as in `xdp_logged`.
        unsafe { KLOG_TC.tail_call(ctx, H::EMIT) };
    }
}

#[inline(always)]
fn settle(action: u32, tracked: bool) -> bool {
    let Some(r) = KLOG.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: the per-CPU slot, valid for this run, no other writer on this CPU.
    unsafe {
        (*r).action = action;
        (*r).tracked = tracked as u8;
    }
    true
}

/// What one message says, handed from the verdict to [`emit`] through a map.
#[repr(C)]
#[derive(Clone, Copy)]
struct Record {
    src: [u8; 16],
    dst: [u8; 16],
    dport: u16,
    reason: u8,
    /// [`ADDRS`] | [`V6`] | [`TCP`]
    flags: u8,
    /// The program's action, as the logging copy decided it.
    action: u32,
    /// 1: the segment was handed over to offender tracking.
    tracked: u8,
    _pad: [u8; 3],
}
const ADDRS: u8 = 1;
const V6: u8 = 2;
/// A whole TCP header was read (`Shape::Tcp`): the port is known.
const TCP: u8 = 4;

/// Through a map: the message program that sends it starts with a fresh stack, after a tail
/// call, and reads back values the verifier does not know, so it is walked a handful of
/// times, not once for each of the tens of thousands of parse paths. Private to each load,
/// never pinned.
#[map(name = "P25_KLOG")]
static KLOG: PerCpuArray<Record> = PerCpuArray::with_max_entries(1, 0);

/// Stages what a message will say. `meta`: destination port (bits 0-15), reason (16-23),
/// [`ADDRS`] | [`V6`] | [`TCP`] (24-31). Exported (see the build script), so its BTF
/// linkage is global. Returns 0.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn port25_klog_stage(s0: u64, s1: u64, d0: u64, d1: u64, meta: u64) -> u64 {
    let Some(r) = KLOG.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: the per-CPU slot, valid for this run, no other writer on this CPU.
    let r = unsafe { &mut *r };
    r.src[..8].copy_from_slice(&s0.to_ne_bytes());
    r.src[8..].copy_from_slice(&s1.to_ne_bytes());
    r.dst[..8].copy_from_slice(&d0.to_ne_bytes());
    r.dst[8..].copy_from_slice(&d1.to_ne_bytes());
    r.dport = meta as u16;
    r.reason = (meta >> 16) as u8;
    r.flags = (meta >> 24) as u8;
    0
}

/// Sends the message the logging copy staged; gives back its action, and whether the
/// segment awaits offender tracking. The reason goes as its number: the controller names it
/// (`reason=8` -> `block_port`).
///
/// Inline in a program of its own ([`Hook`]'s message program): aya-log builds its record in
/// nearly all of the 512-byte stack, so no other frame may sit under it (Linux 6.1 charges
/// even an empty one 32 bytes).
#[inline(always)]
pub fn emit<H: Hook>() -> (u32, bool) {
    let Some(r) = KLOG.get_ptr_mut(0) else {
        // Not reachable (an array's slot 0); an action no program returns: the caller drops.
        return (u32::MAX, false);
    };
    // Read in place, not copied: aya-log's record leaves no stack for a copy.
    // SAFETY: the per-CPU slot, valid for this run, no other writer on this CPU.
    let p = unsafe { &mut *r };
    let done = (p.action, p.tracked != 0);
    let reason = Reason::from_u32_or_block(p.reason as u32);
    // A decision on a segment to a blocked port (pass or block) and every fail-closed
    // doubt; never traffic that passes without touching the blocked ports.
    let smtp_pass = p.flags & TCP != 0 && reason as u32 >= Reason::PassNotSubscriber as u32;
    if reason.is_pass() && !smtp_pass {
        return done;
    }
    // IPv4 goes as IPv4-mapped IPv6 and no address as `::`; the controller writes them back
    // as IPv4 and as "(before the addresses)". Rewritten in the slot, for the same reason.
    if p.flags & ADDRS == 0 {
        p.src = [0; 16];
        p.dst = [0; 16];
    } else if p.flags & V6 == 0 {
        p.src = mapped(&p.src);
        p.dst = mapped(&p.dst);
    }
    let (reason, dport, ctx) = (reason as u32, p.dport, ());
    // One call site per program, its hook in the text: each argument costs stack.
    match H::NAME.len() {
        3 => debug!(ctx, target: "port25::kernel", "reason={} src={:i} dst={:i} dport={} hook=xdp",
            reason, p.src, p.dst, dport),
        2 => debug!(ctx, target: "port25::kernel", "reason={} src={:i} dst={:i} dport={} hook=tc",
            reason, p.src, p.dst, dport),
        _ => {
            debug!(ctx, target: "port25::kernel", "reason={} src={:i} dst={:i} dport={} hook=tc_raw",
            reason, p.src, p.dst, dport)
        }
    }
    done
}

#[inline(always)]
fn mapped(a: &[u8; 16]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}
