//! Opt-in kernel debug messages (`port25-ctl daemon --kernel-log`), through aya-log.
//!
//! Off must cost nothing: the switch is a load-time constant, not a map lookup. It lives in
//! its own read-only section, which aya turns into a frozen array map, so the verifier reads
//! it as a known scalar and prunes the log branches as dead code (and `status` can read the
//! running programs' own switch from that map, named after the section).

use aya_ebpf::{macros::map, maps::PerCpuArray};
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
    fn stage(p: &Parsed, reason: Reason);
}

pub struct Off;
impl Log for Off {
    #[inline(always)]
    fn stage(_: &Parsed, _: Reason) {}
}

pub struct On;
impl Log for On {
    /// The copy is [`port25_klog_stage`], a global function of scalar arguments (as
    /// offender tracking's hand-over, `track.rs`): checked once on its own, and at each call
    /// only its argument types. A static subprogram here was walked once per verifier state
    /// reaching it, and inline it does not fit the stack the verdict leaves.
    #[inline(always)]
    fn stage(p: &Parsed, reason: Reason) {
        let word = |a: &[u8; 16], i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&a[i * 8..i * 8 + 8]);
            u64::from_ne_bytes(w)
        };
        let flags = if p.addrs { ADDRS } else { 0 }
            | if p.v6 { V6 } else { 0 }
            | if p.shape == Shape::Tcp { TCP } else { 0 };
        let meta = p.dport as u64 | (reason as u64 & 0xff) << 16 | (flags as u64) << 24;
        port25_klog_stage(
            word(&p.src, 0),
            word(&p.src, 1),
            word(&p.dst, 0),
            word(&p.dst, 1),
            meta,
        );
    }
}

/// Which program sends a message; each gets its own copy of [`emit`] with its name.
pub trait Hook {
    const NAME: &'static str;
    /// A TC program on a device without a link header.
    const RAW: bool = false;
}
pub struct Xdp;
impl Hook for Xdp {
    const NAME: &'static str = "xdp";
}
pub struct Tc;
impl Hook for Tc {
    const NAME: &'static str = "tc";
}
pub struct TcRaw;
impl Hook for TcRaw {
    const NAME: &'static str = "tc_raw";
    const RAW: bool = true;
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
}
const ADDRS: u8 = 1;
const V6: u8 = 2;
/// A whole TCP header was read (`Shape::Tcp`): the port is known.
const TCP: u8 = 4;

/// Through a map rather than the stack: values read back from a map are unknown to the
/// verifier, so [`emit`] is walked once per verdict, not once for each of the tens of
/// thousands of parse paths (each holding other known values) that reach it. Private to
/// each load, never pinned.
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

/// Sends the message the verdict staged. The reason goes as its number: the controller
/// names it (`reason=8` -> `block_port`).
///
/// Called by each program's entry after its logging copy returned: a subprogram of its own
/// whose stack frame (aya-log builds its record there) is not stacked on the verdict's, which
/// leaves no room under the 512-byte limit; and there every path of the verdict has joined,
/// so the verifier walks it for a handful of states, not once per parse path.
#[inline(never)]
pub fn emit<H: Hook>() {
    let Some(r) = KLOG.get_ptr(0) else {
        return;
    };
    let p = unsafe { core::ptr::read_volatile(r) };
    let reason = Reason::from_u32_or_block(p.reason as u32);
    // A decision on a segment to a blocked port (pass or block) and every fail-closed
    // doubt; never traffic that passes without touching the blocked ports.
    let smtp_pass = p.flags & TCP != 0 && reason as u32 >= Reason::PassNotSubscriber as u32;
    if reason.is_pass() && !smtp_pass {
        return;
    }
    // One call site: each costs the verifier its header's bytes again. IPv4 goes as
    // IPv4-mapped IPv6 and no address as `::`; the controller writes them back as IPv4 and
    // as "(before the addresses)".
    let (src, dst) = if p.flags & ADDRS == 0 {
        ([0; 16], [0; 16])
    } else if p.flags & V6 != 0 {
        (p.src, p.dst)
    } else {
        (mapped(&p.src), mapped(&p.dst))
    };
    let (reason, hook, ctx) = (reason as u32, H::NAME, ());
    debug!(ctx, target: "port25::kernel", "reason={} src={:i} dst={:i} dport={} hook={}",
        reason, src, dst, p.dport, hook);
}

#[inline(always)]
fn mapped(a: &[u8; 16]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}
