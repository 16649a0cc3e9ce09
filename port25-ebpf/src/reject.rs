//! `action: reject`: rewrites a blocked segment in place into the RST that answers it and
//! sends it back out of the device it came from. Any failure leaves a plain drop.

use aya_ebpf::{
    bindings::{xdp_action, BPF_F_INGRESS, TC_ACT_REDIRECT},
    cty::c_void,
    helpers::generated::{
        bpf_redirect, bpf_skb_change_tail, bpf_skb_store_bytes, bpf_xdp_adjust_tail,
        bpf_xdp_get_buff_len, bpf_xdp_store_bytes,
    },
    programs::{TcContext, XdpContext},
};
use port25_common::{
    parse::{Frame, Link},
    reject::{locate, rst_len, rst_v4, rst_v6, Located},
};

/// Writes into the frame; false when the helper refused.
trait Writer {
    fn write(&self, offset: usize, bytes: &mut [u8]) -> bool;
}

/// The answer's headers written over the segment's; returns the answer's length.
#[inline(always)]
fn rewrite<F: Frame + Writer>(f: &F, link: Link) -> Option<(Located, usize)> {
    let at = locate(f, link)?;
    // Everything is read and built before the first write: a segment that is not answered
    // (a RST, a bad length) leaves the frame as it was.
    let mut mac = [0u8; 12];
    if link == Link::Ethernet {
        let m = f.bytes::<12>(0)?;
        mac[..6].copy_from_slice(&m[6..]);
        mac[6..].copy_from_slice(&m[..6]);
    }
    let mut ip = [0u8; 40];
    let ip_len = if at.v6 { 40 } else { 20 };
    let mut tcp = if at.v6 {
        let (h, t) = rst_v6(&f.bytes::<40>(at.l3)?, &f.bytes::<20>(at.l3 + 40)?)?;
        ip = h;
        t
    } else {
        let (h, t) = rst_v4(&f.bytes::<20>(at.l3)?, &f.bytes::<20>(at.l3 + 20)?)?;
        ip[..20].copy_from_slice(&h);
        t
    };
    if link == Link::Ethernet && !f.write(0, &mut mac) {
        return None;
    }
    if !(f.write(at.l3, &mut ip[..ip_len]) && f.write(at.l3 + ip_len, &mut tcp)) {
        return None;
    }
    Some((at, rst_len(at)))
}

impl Writer for crate::XdpFrame<'_> {
    #[inline(always)]
    fn write(&self, offset: usize, bytes: &mut [u8]) -> bool {
        // SAFETY: the helper bound-checks offset and length against the frame.
        unsafe {
            bpf_xdp_store_bytes(
                self.0.ctx,
                offset as u32,
                bytes.as_mut_ptr() as *mut c_void,
                bytes.len() as u32,
            ) == 0
        }
    }
}

impl Writer for crate::SkbFrame<'_> {
    #[inline(always)]
    fn write(&self, offset: usize, bytes: &mut [u8]) -> bool {
        // SAFETY: the helper bound-checks offset and length against the skb.
        unsafe {
            bpf_skb_store_bytes(
                self.0.skb.skb,
                offset as u32,
                bytes.as_ptr() as *const c_void,
                bytes.len() as u32,
                0,
            ) == 0
        }
    }
}

/// XDP: the RST leaves through the receiving device (XDP_TX); None = drop instead.
#[inline(always)]
pub fn xdp(ctx: &XdpContext) -> Option<u32> {
    let frame = crate::XdpFrame(ctx);
    let (_, len) = rewrite(&frame, Link::Ethernet)?;
    // SAFETY: plain helper calls on this program's own context.
    let have = unsafe { bpf_xdp_get_buff_len(ctx.ctx) } as i64;
    let delta = len as i64 - have;
    if delta > 0 || unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta as i32) } != 0 {
        return None;
    }
    Some(xdp_action::XDP_TX)
}

/// TC: at ingress the RST goes back out of the same device; at egress (upstream side) it is
/// turned around into the same device's ingress, and routed back to the subscriber.
#[inline(always)]
pub fn tc(ctx: &TcContext, link: Link) -> Option<i32> {
    let frame = crate::SkbFrame(ctx);
    let (_, len) = rewrite(&frame, link)?;
    // SAFETY: plain helper calls and field reads on this program's own context.
    unsafe {
        if bpf_skb_change_tail(ctx.skb.skb, len as u32, 0) != 0 {
            return None;
        }
        let skb = &*ctx.skb.skb;
        let at_ingress = skb.ingress_ifindex == skb.ifindex;
        let flags = if at_ingress { 0 } else { BPF_F_INGRESS as u64 };
        if bpf_redirect(skb.ifindex, flags) != TC_ACT_REDIRECT as i64 {
            return None;
        }
    }
    Some(TC_ACT_REDIRECT as i32)
}
