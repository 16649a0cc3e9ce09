//! Offender tracking and block events, for a blocked segment whose source is known
//! (`block_port`, or a doubt from an enforced source).
//!
//! The entry points hand the segment over in a per-CPU scratch ([`hand_over`]) and, once
//! their action is decided, tail-call a tracking program of their type ([`xdp`], [`tc`]).
//! A tail call starts a fresh stack and is verified on its own: inline, or as a subprogram,
//! the tracking was walked once per verifier state reaching it (+300k instructions of the
//! 1M budget) and did not fit the 32 bytes of stack the verdict leaves. The tracking program
//! only ever returns a blocking action: a failed tail call, or a scratch that is not this
//! packet's, still drops.
//!
//! One map operation per blocked segment: a lookup and in-place updates (counters with atomic
//! adds), or a single insert for a source not seen yet. LRU: a worm spraying from many
//! addresses evicts the oldest entries, never policy (this map holds none).

use core::intrinsics::{atomic_or, atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    helpers::{bpf_jiffies64, bpf_ktime_get_boot_ns},
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
    EbpfContext,
};
use port25_common::{
    maps::{
        dest_bit, AbuseSettings, BlockEvent, Offender, OffenderKey, DEFAULT_TRACK_SOURCES,
        EVENTS_BYTES,
    },
    parse::Parsed,
};

#[map(name = "P25_ABUSE")]
static ABUSE: Array<AbuseSettings> = Array::with_max_entries(1, 0);

#[map(name = "P25_OFFENDERS")]
static OFFENDERS: LruHashMap<OffenderKey, Offender> =
    LruHashMap::with_max_entries(DEFAULT_TRACK_SOURCES, 0);

#[map(name = "P25_EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Room for the key, a new entry and an event: the entry points leave this subprogram 32
/// bytes of the 512-byte stack, so everything larger is built in map memory. Private to
/// each load (not pinned).
///
/// Addresses at 8-byte aligned offsets: the copies are word moves, not byte moves (which
/// cost ~15 ns of the blocked path).
#[repr(C)]
pub struct Scratch {
    /// The blocked segment, as the caller hands it over.
    src: [u8; 16],
    dst: [u8; 16],
    key: OffenderKey,
    _pad: u32,
    fresh: Offender,
    event: BlockEvent,
    reason: u32,
    ifindex: u32,
    dport: u16,
    tcp_flags: u8,
    v6: u8,
    /// The entry point's action for this packet (a blocking one).
    action: u32,
    /// 1 from [`hand_over`] to the tracking program, which clears it.
    pending: u32,
    /// The boot clock as last read on this CPU, and the jiffies it was read at (see `now`).
    clock_jiffies: u64,
    clock_ns: u64,
}

/// The tracking programs, by type (a program array takes one program type): index 0.
#[map(name = "P25_TRACK_XDP")]
static TRACK_XDP: ProgramArray = ProgramArray::with_max_entries(1, 0);
#[map(name = "P25_TRACK_TC")]
static TRACK_TC: ProgramArray = ProgramArray::with_max_entries(1, 0);

#[map(name = "P25_TRACKTMP")]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

// The BPF target has no compare-and-swap, so core's atomic types lack `fetch_add`; the
// intrinsics lower to the kernel's atomic add/or (the result unused: no fetch needed).
#[inline(always)]
fn add(p: *mut u64, n: u64) {
    // SAFETY: `p` points into a map value the kernel keeps alive for this program run.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, n) };
}

#[inline(always)]
fn or(p: *mut u64, bits: u64) {
    // SAFETY: as `add`.
    unsafe { atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(p, bits) };
}

/// Copies an address between map values as two word moves. A plain copy between two map
/// pointers (which may alias) is a call to a byte-wise `memmove` subprogram in BPF, and
/// consecutive zero stores a call to `memset`: on every tracked segment, a call and 16
/// byte moves. Both sides are 8-byte aligned (map values; the fields at multiples of 8).
#[inline(always)]
fn copy16(dst: &mut [u8; 16], src: &[u8; 16]) {
    let (s, d) = (src.as_ptr() as *const u64, dst.as_mut_ptr() as *mut u64);
    // SAFETY: both 16 bytes long and 8-byte aligned (see above).
    unsafe {
        let (a, b) = (
            core::ptr::read_volatile(s),
            core::ptr::read_volatile(s.add(1)),
        );
        core::ptr::write_volatile(d, a);
        core::ptr::write_volatile(d.add(1), b);
    }
}

/// A store LLVM cannot merge with its neighbours into a `memset` call (see [`copy16`]).
#[inline(always)]
fn set(p: &mut u64, v: u64) {
    // SAFETY: a valid, aligned u64.
    unsafe { core::ptr::write_volatile(p, v) };
}

/// Whether offender tracking is on (`abuse.track_sources` > 0). Off, the entry points hand
/// nothing over and make no tail call: the hand-over, the tail call and the tracking
/// program's start were a fifth of the blocked path, spent to learn that nothing is tracked.
/// The verdict is the same either way: the tracking program gives back the entry point's
/// action.
#[inline(always)]
pub fn on() -> bool {
    matches!(ABUSE.get(0), Some(cfg) if cfg.track != 0)
}

/// Hands a blocked segment (addresses known) over to the tracking program.
///
/// The copy is [`port25_hand_over`], a global function of scalar arguments: the verifier
/// checks it once on its own, and at each call only the argument types. Inlined, the copy
/// did not fit the stack the verdict leaves; as a static subprogram it was walked once per
/// verifier state reaching it (+200k instructions).
#[inline(always)]
pub fn hand_over(p: &Parsed, reason: u32, ifindex: u32) {
    let meta = ifindex as u64
        | (p.dport as u64) << 32
        | (p.tcp_flags as u64) << 48
        | (reason as u64 & 0x3f) << 56
        | (p.v6 as u64) << 62;
    port25_hand_over(p.src.0[0], p.src.0[1], p.dst.0[0], p.dst.0[1], meta);
}

/// The hand-over's copy into the per-CPU scratch. `meta`: ifindex (bits 0-31), destination
/// port (32-47), TCP flags (48-55), reason (56-61; fewer than 64 reasons), v6 (62).
/// Exported (see the build script), so its BTF linkage is global. Returns 0.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn port25_hand_over(s0: u64, s1: u64, d0: u64, d1: u64, meta: u64) -> u64 {
    let Some(tmp) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: the per-CPU scratch value, valid for this run, no other writer on this CPU.
    let tmp = unsafe { &mut *tmp };
    tmp.src[..8].copy_from_slice(&s0.to_ne_bytes());
    tmp.src[8..].copy_from_slice(&s1.to_ne_bytes());
    tmp.dst[..8].copy_from_slice(&d0.to_ne_bytes());
    tmp.dst[8..].copy_from_slice(&d1.to_ne_bytes());
    tmp.ifindex = meta as u32;
    tmp.dport = (meta >> 32) as u16;
    tmp.tcp_flags = (meta >> 48) as u8;
    tmp.reason = ((meta >> 56) & 0x3f) as u32;
    tmp.v6 = ((meta >> 62) & 1) as u8;
    0
}

/// Tail-calls the XDP tracking program with `action`; returns only when that fails.
#[inline(always)]
pub fn xdp<C: EbpfContext>(ctx: &C, action: u32) {
    if arm(action) {
        // SAFETY: index 0 of our own program array; a missing entry just returns.
        unsafe { TRACK_XDP.tail_call(ctx, 0) };
    }
}

/// As [`xdp`], for TC.
#[inline(always)]
pub fn tc<C: EbpfContext>(ctx: &C, action: i32) {
    if arm(action as u32) {
        // SAFETY: as in `xdp`.
        unsafe { TRACK_TC.tail_call(ctx, 0) };
    }
}

#[inline(always)]
fn arm(action: u32) -> bool {
    let Some(tmp) = SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: as in `hand_over`.
    let tmp = unsafe { &mut *tmp };
    tmp.action = action;
    tmp.pending = 1;
    true
}

/// The tracking programs' body: tracks the handed-over segment, and gives back the entry
/// point's action (None: no segment of this packet is pending, so the caller drops).
#[inline(always)]
pub fn run() -> Option<u32> {
    let tmp = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: as in `hand_over`.
    let tmp = unsafe { &mut *tmp };
    if tmp.pending != 1 {
        return None;
    }
    tmp.pending = 0;
    track(tmp);
    Some(tmp.action)
}

/// The boot clock to within a tick: read once per jiffy per CPU. Reading it for every
/// segment cost ~40 ns (rdtsc under virtualisation), a sixth of the whole blocked path;
/// the jiffies counter is a plain load. Seen, window and event times need milliseconds.
#[inline(always)]
fn now(tmp: &mut Scratch) -> u64 {
    let j = unsafe { bpf_jiffies64() };
    if j != tmp.clock_jiffies || tmp.clock_ns == 0 {
        tmp.clock_jiffies = j;
        tmp.clock_ns = unsafe { bpf_ktime_get_boot_ns() };
    }
    tmp.clock_ns
}

#[inline(always)]
fn track(tmp: &mut Scratch) {
    let Some(cfg) = ABUSE.get_ptr(0) else { return };
    // SAFETY: map value pointers, valid for this run; plain stores of estimates may race
    // with another CPU's (a lost bitmap bit or last destination, never a wrong verdict).
    let cfg = unsafe { &*cfg };
    if cfg.track == 0 {
        return;
    }
    let now = now(tmp);
    tmp.key.family = if tmp.v6 != 0 { 6 } else { 4 };
    copy16(&mut tmp.key.addr, &tmp.src);
    let syn = (tmp.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN) as u64;
    let bit = dest_bit(&tmp.dst);
    let (reason, ifindex) = (tmp.reason, tmp.ifindex);
    let Some(e) = OFFENDERS.get_ptr_mut(&tmp.key) else {
        let n = &mut tmp.fresh;
        n.first_ns = now;
        n.last_ns = now;
        n.window_ns = now;
        n.event_ns = now;
        n.attempts = syn;
        n.segments = 1;
        n.dests = bit;
        set(&mut n.prev_attempts, 0);
        set(&mut n.prev_segments, 0);
        set(&mut n.prev_dests, 0);
        copy16(&mut n.last_dst, &tmp.dst);
        n.last_dport = tmp.dport;
        n.last_reason = reason as u8;
        n._pad = 0;
        n.ifindex = ifindex;
        // BPF_NOEXIST: another CPU that inserted first keeps its entry (this segment is lost
        // from the counts, not counted as a second new source).
        if OFFENDERS.insert(&tmp.key, &tmp.fresh, 1).is_ok() && cfg.event_interval_ns != 0 {
            event(tmp, now);
        }
        return;
    };
    let e = unsafe { &mut *e };
    let age = now.wrapping_sub(e.window_ns);
    if age >= cfg.window_ns {
        // A new window; the one before it counts only if it ended just now.
        let adjacent = age < cfg.window_ns.saturating_mul(2);
        set(&mut e.prev_attempts, if adjacent { e.attempts } else { 0 });
        set(&mut e.prev_segments, if adjacent { e.segments } else { 0 });
        set(&mut e.prev_dests, if adjacent { e.dests } else { 0 });
        set(&mut e.attempts, 0);
        set(&mut e.segments, 0);
        set(&mut e.dests, 0);
        e.window_ns = now;
    }
    add(&mut e.attempts, syn);
    add(&mut e.segments, 1);
    // Mostly set already (a worm revisits its targets; a retrying client has one): no
    // locked write then.
    if e.dests & bit == 0 {
        or(&mut e.dests, bit);
    }
    e.last_ns = now;
    copy16(&mut e.last_dst, &tmp.dst);
    e.last_dport = tmp.dport;
    e.last_reason = reason as u8;
    e.ifindex = ifindex;
    if cfg.event_interval_ns != 0 && now.wrapping_sub(e.event_ns) >= cfg.event_interval_ns {
        // Claim the interval before sending: a racing CPU that read the old time sends one
        // more at most.
        e.event_ns = now;
        tmp.fresh = *e;
        event(tmp, now);
    }
}

/// Sends `tmp.fresh` (the entry as it now is) for `tmp.key` as an event.
#[inline(always)]
fn event(tmp: &mut Scratch, now: u64) {
    let ev = &mut tmp.event;
    ev.at_ns = now;
    ev.key = tmp.key;
    ev.ifindex = tmp.fresh.ifindex;
    ev.dst = tmp.fresh.last_dst;
    ev.dport = tmp.fresh.last_dport;
    ev.reason = tmp.fresh.last_reason;
    ev._pad = 0;
    ev._pad2 = 0;
    ev.attempts = tmp.fresh.attempts;
    ev.segments = tmp.fresh.segments;
    ev.dests = tmp.fresh.dests;
    // A full ring (the daemon down or slow) drops the event; the counters still have it.
    let _ = EVENTS.output::<BlockEvent>(&tmp.event, 0);
}
