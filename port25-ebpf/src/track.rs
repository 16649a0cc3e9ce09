//! Offender tracking and block events: run only for a blocked segment whose source is known
//! (`block_port`, or a doubt from an enforced source), in a subprogram of its own so that the
//! verifier walks it once per call, not inlined into every exit of the verdict.
//!
//! One map operation per blocked segment: a lookup and in-place updates (counters with atomic
//! adds), or a single insert for a source not seen yet. LRU: a worm spraying from many
//! addresses evicts the oldest entries, never policy (this map holds none).

use core::intrinsics::{atomic_or, atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    helpers::bpf_ktime_get_boot_ns,
    macros::map,
    maps::{Array, LruHashMap, RingBuf},
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

/// Records one blocked segment of `p` (addresses known). `reason` is the verdict's.
#[inline(never)]
pub fn blocked(p: &Parsed, reason: u32, ifindex: u32) {
    let Some(cfg) = ABUSE.get(0) else { return };
    if cfg.track == 0 {
        return;
    }
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let key = OffenderKey {
        family: if p.v6 { 6 } else { 4 },
        addr: p.src,
    };
    let syn = (p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN) as u64;
    let bit = dest_bit(&p.dst);
    let Some(e) = OFFENDERS.get_ptr_mut(&key) else {
        let fresh = Offender {
            first_ns: now,
            last_ns: now,
            window_ns: now,
            event_ns: if cfg.event_interval_ns != 0 { now } else { 0 },
            attempts: syn,
            segments: 1,
            dests: bit,
            last_dst: p.dst,
            last_dport: p.dport,
            last_reason: reason as u8,
            ifindex,
            ..Offender::default()
        };
        // BPF_NOEXIST: another CPU that inserted first keeps its entry (this segment is lost
        // from the counts, not double-counted as a new source).
        if OFFENDERS.insert(&key, &fresh, 1).is_ok() && cfg.event_interval_ns != 0 {
            event(&key, &fresh, now);
        }
        return;
    };
    // SAFETY: a map value pointer, valid for this run; plain stores of estimates may race.
    let e = unsafe { &mut *e };
    if now.wrapping_sub(e.window_ns) >= cfg.window_ns {
        // A new window; the one before it counts only if it ended just now.
        let adjacent = now.wrapping_sub(e.window_ns) < cfg.window_ns.saturating_mul(2);
        e.prev_attempts = if adjacent { e.attempts } else { 0 };
        e.prev_segments = if adjacent { e.segments } else { 0 };
        e.prev_dests = if adjacent { e.dests } else { 0 };
        e.attempts = 0;
        e.segments = 0;
        e.dests = 0;
        e.window_ns = now;
    }
    add(&mut e.attempts, syn);
    add(&mut e.segments, 1);
    or(&mut e.dests, bit);
    e.last_ns = now;
    e.last_dst = p.dst;
    e.last_dport = p.dport;
    e.last_reason = reason as u8;
    e.ifindex = ifindex;
    if cfg.event_interval_ns != 0 && now.wrapping_sub(e.event_ns) >= cfg.event_interval_ns {
        // Claim the interval before sending: a racing CPU that read the old time sends one
        // more at most.
        e.event_ns = now;
        let copy = *e;
        event(&key, &copy, now);
    }
}

#[inline(always)]
fn event(key: &OffenderKey, e: &Offender, now: u64) {
    let ev = BlockEvent {
        at_ns: now,
        key: *key,
        ifindex: e.ifindex,
        dst: e.last_dst,
        dport: e.last_dport,
        reason: e.last_reason,
        attempts: e.attempts,
        segments: e.segments,
        dests: e.dests,
        ..BlockEvent::default()
    };
    // A full ring (the daemon down or slow) drops the event; the counters still have it.
    let _ = EVENTS.output::<BlockEvent>(&ev, 0);
}
