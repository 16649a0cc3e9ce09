//! The enforcing datapath: one XDP and two TC entry points around the shared verdict core.
//!
//! Entry points are thin: read bytes and maps through the kernel's helpers, call
//! `port25_common::verdict::classify`, count the reason, return the hook's action. The verdict
//! core fails closed by construction: every parse doubt is a `Block*` reason unless the
//! addresses alone decide a pass.
#![no_std]
#![no_main]
// Atomic add/or on map values (offender counters): see `track.rs`.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod klog;
mod maps;
mod reject;
mod track;

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC},
    cty::c_void,
    helpers::generated::{bpf_skb_load_bytes, bpf_xdp_load_bytes},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use port25_common::{
    parse::{parse_flat, Frame, Link},
    plain::parse_plain_first,
    verdict::decide_parsed,
    Reason,
};

use crate::maps::{count, reject_enabled, KernelMaps};

/// The `N` bytes at `offset` read straight from the packet when they lie in its linear part
/// (every frame of a single-buffer XDP program, the pulled head of an skb). A helper call
/// costs about 21 ns here, a bare program's whole run; the parser reads 4-6 times per frame.
/// None: not all in the linear part, and the caller asks the helper, which also sees
/// multi-buffer fragments and an skb's paged data, so both paths give the same bytes.
#[inline(always)]
fn direct<const N: usize>(data: usize, data_end: usize, offset: usize) -> Option<[u8; N]> {
    // The one-byte reads are the parser's "last byte of the datagram" checks, at an offset
    // computed from a length field. Opaque, so the bound below is checked on the very
    // register that is added to the packet pointer: LLVM would otherwise test the length
    // and add `length + k` (a register Linux 6.1 knows no bound for, refused as "math
    // between pkt pointer and register with unbounded min value").
    let offset = if N == 1 {
        let mut o = offset;
        unsafe { core::ptr::read_volatile(&mut o) }
    } else {
        offset
    };
    // The verifier allows packet-pointer arithmetic only with a bounded offset.
    if offset > MAX_DIRECT_OFFSET {
        return None;
    }
    let at = data + offset;
    // Through the stack: for N = 1 the compiler would otherwise test `at >= data_end`, a
    // form the verifier does not take as a bound on `at`; a spilled constant it tracks.
    let mut n = N;
    let n = unsafe { core::ptr::read_volatile(&mut n) };
    if at + n > data_end {
        return None;
    }
    // SAFETY: [at, at + N) lies within [data, data_end), checked just above.
    Some(unsafe { core::ptr::read_unaligned(at as *const [u8; N]) })
}

/// Beyond any header the parser reads in a frame the size of a jumbo MTU.
const MAX_DIRECT_OFFSET: usize = 0x3fff;

struct XdpFrame<'a>(&'a XdpContext);

impl Frame for XdpFrame<'_> {
    #[inline(always)]
    fn bytes<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        if let Some(b) = direct::<N>(self.0.data(), self.0.data_end(), offset) {
            return Some(b);
        }
        // Not zeroed first: the helper writes all N bytes or fails (the verifier takes
        // uninitialised stack for its buffer), and a zeroing loop per read costs the
        // verifier dearly.
        let mut buf = MaybeUninit::<[u8; N]>::uninit();
        // The helper bound-checks against the whole frame (multi-buffer included) and fails
        // rather than read short.
        let ret = unsafe {
            bpf_xdp_load_bytes(
                self.0.ctx,
                offset as u32,
                buf.as_mut_ptr() as *mut c_void,
                N as u32,
            )
        };
        if ret == 0 {
            Some(unsafe { buf.assume_init() })
        } else {
            None
        }
    }

    #[inline(always)]
    fn forget(&self, a: usize, b: usize) -> Option<(usize, usize)> {
        maps::forget(a, b)
    }
}

/// The device a packet came in on (went out on, at TC egress), for offender tracking. Read
/// only for a tracked segment: for XDP it is three dependent loads (`rxq->dev->ifindex`),
/// a tenth of a passed packet's time in the program.
trait Ingress {
    fn ifindex(&self) -> u32;
}

impl Ingress for XdpFrame<'_> {
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.0.ingress_ifindex() as u32
    }
}

impl Ingress for SkbFrame<'_> {
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: the context the kernel passed.
        unsafe { (*self.0.skb.skb).ifindex }
    }
}

struct SkbFrame<'a>(&'a TcContext);

impl Frame for SkbFrame<'_> {
    #[inline(always)]
    fn bytes<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        if let Some(b) = direct::<N>(self.0.data(), self.0.data_end(), offset) {
            return Some(b);
        }
        let mut buf = MaybeUninit::<[u8; N]>::uninit();
        // Reads non-linear data too; fails when the skb is shorter than offset + N. Writes
        // all N bytes on success (see `XdpFrame`).
        let ret = unsafe {
            bpf_skb_load_bytes(
                self.0.skb.skb as *const c_void,
                offset as u32,
                buf.as_mut_ptr() as *mut c_void,
                N as u32,
            )
        };
        if ret == 0 {
            Some(unsafe { buf.assume_init() })
        } else {
            None
        }
    }

    #[inline(always)]
    fn forget(&self, a: usize, b: usize) -> Option<(usize, usize)> {
        maps::forget(a, b)
    }
}

/// The verdict, counted; and whether the segment was handed over for offender tracking.
/// `L` says whether the kernel log sees it.
#[inline(always)]
fn decide<F: Frame + Ingress, L: klog::Log>(frame: &F, link: Link) -> (Reason, bool) {
    // The parser's fast path first (most frames are plain Ethernet, IPv4 or IPv6, TCP or
    // UDP): the same result in a few reads. The logging copies keep the full parse.
    let parsed = if L::ON {
        parse_flat(frame, link)
    } else {
        parse_plain_first(frame, link)
    };
    let reason = decide_parsed(&parsed, &KernelMaps);
    count(reason);
    L::stage(&parsed, reason);
    // A blocked segment whose source is known came from an enforced source (the address
    // rules ran and passed nothing): the offender tracking's business, when it is on.
    let tracked = !reason.is_pass() && parsed.addrs && track::on();
    if tracked {
        track::hand_over(&parsed, reason as u32, frame.ifindex());
    }
    (reason, tracked)
}

// Each entry point's body is `#[inline(always)]`: aya's macro wraps it in the exported
// function, and LLVM left the body of the largest out of line (a bpf-to-bpf call and its
// return on every packet, a tenth of the fast path).

// The kernel log's switch (a load-time constant, see `klog`) is tested once, first thing in
// each entry point; on, the entry tail-calls its logging copy, a program of its own. Off,
// the verifier prunes that branch and walks the program as it is without the log, in the
// same frame: a wrapper frame around the verdict (the first design) does not fit Linux 6.1,
// which charges every frame at least 32 bytes of the 512 (32 + 480 + 32 for the offender
// tracking's hand-over). A failed tail call (the daemon that filled the private program
// arrays has exited) falls through to the verdict without the log.

/// Subscriber-facing ingress on an Ethernet NIC, before the stack.
#[xdp]
#[inline(always)]
pub fn port25_xdp(ctx: XdpContext) -> u32 {
    if klog::enabled() {
        klog::xdp_logged(&ctx);
    }
    let (reason, tracked) = decide::<_, klog::Off>(&XdpFrame(&ctx), Link::Ethernet);
    let action = xdp_verdict(&ctx, reason);
    if tracked {
        // Returns only if the tail call fails: the action stands untracked.
        track::xdp(&ctx, action);
    }
    action
}

/// The XDP program's logging copy (tail-called by [`port25_xdp`] with the log on): the
/// verdict, staged for the message, then on to [`port25_klog_emit_xdp`].
#[xdp]
#[inline(always)]
pub fn port25_klog_xdp(ctx: XdpContext) -> u32 {
    let (reason, tracked) = decide::<_, klog::On>(&XdpFrame(&ctx), Link::Ethernet);
    let action = xdp_verdict(&ctx, reason);
    klog::xdp_emit(&ctx, action, tracked);
    // The message program could not be reached: the action stands, tracked.
    if tracked {
        track::xdp(&ctx, action);
    }
    action
}

/// Sends the message the logging copy staged, then tail-calls the offender tracking: a tail
/// call does not return, so the message goes first. A program of its own: aya-log builds
/// its record in nearly the whole 512-byte stack, room no frame under the verdict's has.
#[xdp]
#[inline(always)]
pub fn port25_klog_emit_xdp(ctx: XdpContext) -> u32 {
    let (action, tracked) = klog::emit::<klog::Xdp>();
    // Only what the logging copy returned goes back (read from a map: the verifier checks
    // each value as a constant).
    let action = match action {
        xdp_action::XDP_PASS => xdp_action::XDP_PASS,
        xdp_action::XDP_TX => xdp_action::XDP_TX,
        _ => xdp_action::XDP_DROP,
    };
    if tracked && action != xdp_action::XDP_PASS {
        track::xdp(&ctx, action);
    }
    action
}

#[inline(always)]
fn xdp_verdict(ctx: &XdpContext, reason: Reason) -> u32 {
    if reason.is_pass() {
        return xdp_action::XDP_PASS;
    }
    // Only a well-formed segment to a blocked port is answered; doubts are dropped silently.
    if reason == Reason::BlockPort && reject_enabled() {
        if let Some(action) = reject::xdp(ctx) {
            return action;
        }
    }
    xdp_action::XDP_DROP
}

/// TC (ingress or egress) on an Ethernet device. Pass = "next": other programs still run.
#[classifier]
#[inline(always)]
pub fn port25_tc(ctx: TcContext) -> i32 {
    if klog::enabled() {
        klog::tc_logged(&ctx, klog::TC_LOGGED);
    }
    tc_action(&ctx, Link::Ethernet)
}

/// TC on a device without a link header (ppp, tun). The skb's protocol, not the first nibble,
/// is what the stack dispatches on (`ppp_receive_nonmp_frame` sets it from the PPP protocol).
#[classifier]
#[inline(always)]
pub fn port25_tc_raw(ctx: TcContext) -> i32 {
    if klog::enabled() {
        klog::tc_logged(&ctx, klog::TC_RAW_LOGGED);
    }
    tc_action(&ctx, raw_link(&ctx))
}

#[inline(always)]
fn raw_link(ctx: &TcContext) -> Link {
    // `__sk_buff.protocol` holds the __be16 as loaded from the skb.
    Link::RawProto(u16::from_be(ctx.skb.protocol() as u16))
}

#[inline(always)]
fn tc_action(ctx: &TcContext, link: Link) -> i32 {
    let (reason, tracked) = decide::<_, klog::Off>(&SkbFrame(ctx), link);
    let action = tc_verdict(ctx, link, reason);
    if tracked {
        track::tc(ctx, action);
    }
    action
}

/// The TC programs' logging copies (as [`port25_klog_xdp`]).
#[classifier]
#[inline(always)]
pub fn port25_klog_tc(ctx: TcContext) -> i32 {
    tc_klog::<klog::Tc>(&ctx, Link::Ethernet)
}

#[classifier]
#[inline(always)]
pub fn port25_klog_tc_raw(ctx: TcContext) -> i32 {
    tc_klog::<klog::TcRaw>(&ctx, raw_link(&ctx))
}

#[inline(always)]
fn tc_klog<H: klog::Hook>(ctx: &TcContext, link: Link) -> i32 {
    let (reason, tracked) = decide::<_, klog::On>(&SkbFrame(ctx), link);
    let action = tc_verdict(ctx, link, reason);
    klog::tc_emit::<H, _>(ctx, action, tracked);
    if tracked {
        track::tc(ctx, action);
    }
    action
}

/// The TC programs' messages (as [`port25_klog_emit_xdp`]).
#[classifier]
#[inline(always)]
pub fn port25_klog_emit_tc(ctx: TcContext) -> i32 {
    tc_emit::<klog::Tc>(&ctx)
}

#[classifier]
#[inline(always)]
pub fn port25_klog_emit_tc_raw(ctx: TcContext) -> i32 {
    tc_emit::<klog::TcRaw>(&ctx)
}

#[inline(always)]
fn tc_emit<H: klog::Hook>(ctx: &TcContext) -> i32 {
    let (action, tracked) = klog::emit::<H>();
    let action = match action as i32 {
        TC_ACT_UNSPEC => TC_ACT_UNSPEC,
        TC_ACT_REDIRECT => TC_ACT_REDIRECT,
        _ => TC_ACT_SHOT,
    };
    if tracked && action != TC_ACT_UNSPEC {
        track::tc(ctx, action);
    }
    action
}

#[inline(always)]
fn tc_verdict(ctx: &TcContext, link: Link, reason: Reason) -> i32 {
    if reason.is_pass() {
        return TC_ACT_UNSPEC;
    }
    if reason == Reason::BlockPort && reject_enabled() {
        if let Some(action) = reject::tc(ctx, link) {
            return action;
        }
    }
    TC_ACT_SHOT
}

/// Offender tracking for the XDP program (tail-called by it for a blocked segment). Only a
/// blocking action comes back: XDP_TX (a RST answered) or XDP_DROP.
#[xdp]
#[inline(always)]
pub fn port25_track_xdp(_ctx: XdpContext) -> u32 {
    match track::run() {
        Some(xdp_action::XDP_TX) => xdp_action::XDP_TX,
        _ => xdp_action::XDP_DROP,
    }
}

/// Offender tracking for the TC programs: TC_ACT_REDIRECT (a RST sent back) or TC_ACT_SHOT.
#[classifier]
#[inline(always)]
pub fn port25_track_tc(_ctx: TcContext) -> i32 {
    match track::run() {
        Some(a) if a == TC_ACT_REDIRECT as u32 => TC_ACT_REDIRECT as i32,
        _ => TC_ACT_SHOT,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
