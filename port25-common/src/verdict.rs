//! The verdict of DESIGN.md, over any implementation of the policy maps.

use crate::{
    addr::{mask, Addr},
    maps::{Exempt, NetKey6, Settings, FLAG_ENFORCE_LISTED, MAX_SESSION_PREFIX_LENS},
    parse::{parse, Frame, Link, Packet},
    reason::Reason,
};

/// Lookups into the policy maps. The kernel answers from BPF maps, `port25-ctl check` from
/// the pinned maps, the reference model from plain collections. LPM lookups return the
/// longest matching entry, as the kernel's LPM trie does.
pub trait Maps {
    /// `None` when the settings record cannot be read; the verdict then enforces every source.
    fn settings(&self) -> Option<Settings>;
    fn port_blocked(&self, port: u16) -> bool;
    fn in_ranges4(&self, a: [u8; 4]) -> bool;
    fn in_ranges6(&self, a: [u8; 16]) -> bool;
    fn mail_server4(&self, a: [u8; 4]) -> bool;
    fn mail_server6(&self, a: [u8; 16]) -> bool;
    fn exempt_ip4(&self, a: [u8; 4]) -> Option<Exempt>;
    fn exempt_ip6(&self, a: [u8; 16]) -> Option<Exempt>;
    fn exempt_prefix4(&self, a: [u8; 4]) -> Option<Exempt>;
    fn exempt_prefix6(&self, a: [u8; 16]) -> Option<Exempt>;
    fn exempt_net6(&self, key: &NetKey6) -> Option<Exempt>;
    /// `CLOCK_BOOTTIME` in nanoseconds.
    fn now_ns(&self) -> u64;
}

/// Parses a frame and decides it.
#[inline(always)]
pub fn classify<F: Frame + ?Sized, M: Maps>(frame: &F, link: Link, maps: &M) -> Reason {
    decide(&parse(frame, link), maps)
}

#[inline(always)]
pub fn decide<M: Maps>(pkt: &Packet, maps: &M) -> Reason {
    match *pkt {
        Packet::NotIp => Reason::PassNotIp,
        Packet::NotTcp => Reason::PassNotTcp,
        Packet::Tcp { src, dst, dport } => {
            if !maps.port_blocked(dport) {
                return Reason::PassPortOpen;
            }
            address_rules(src, dst, maps).unwrap_or(Reason::BlockPort)
        }
        // The port is unknown, so only the address rules can pass it.
        Packet::Doubt {
            reason,
            src: Some(src),
            dst: Some(dst),
        } => address_rules(src, dst, maps).unwrap_or(reason),
        Packet::Doubt { reason, .. } => reason,
    }
}

/// Rules 3 to 5: the ones that depend only on addresses. `None` = no rule lets it pass.
#[inline(always)]
fn address_rules<M: Maps>(src: Addr, dst: Addr, maps: &M) -> Option<Reason> {
    let settings = maps.settings();
    let listed_only = match settings {
        Some(s) => s.flags & FLAG_ENFORCE_LISTED != 0,
        None => false,
    };
    if listed_only {
        let enforced = match src {
            Addr::V4(a) => maps.in_ranges4(a),
            Addr::V6(a) => maps.in_ranges6(a),
        };
        if !enforced {
            return Some(Reason::PassNotSubscriber);
        }
    }
    let mail = match dst {
        Addr::V4(a) => maps.mail_server4(a),
        Addr::V6(a) => maps.mail_server6(a),
    };
    if mail {
        return Some(Reason::PassMailServer);
    }
    let now = maps.now_ns();
    // Most specific first: the exact address, the session prefixes (longest first), then the
    // LPM. A live session's entry decides alone, so a wider prefix of another user (a
    // binding, a stale delegated prefix) never exempts an address a blocked user holds.
    let decided = match src {
        Addr::V4(a) => entry(maps.exempt_ip4(a), now, Reason::PassExemptAddr)
            .or_else(|| entry(maps.exempt_prefix4(a), now, Reason::PassExemptPrefix)),
        Addr::V6(a) => entry(maps.exempt_ip6(a), now, Reason::PassExemptAddr)
            .or_else(|| match settings {
                Some(s) => session_prefix(a, &s, maps, now),
                None => None,
            })
            .or_else(|| entry(maps.exempt_prefix6(a), now, Reason::PassExemptPrefix)),
    };
    match decided {
        Some(Decided::Pass(r)) => Some(r),
        Some(Decided::Block) | None => None,
    }
}

/// A verdict an exempt entry settles: pass, or block (a session of a user not unblocked).
#[derive(Clone, Copy)]
enum Decided {
    Pass(Reason),
    Block,
}

/// `None`: this entry does not decide (absent, or an expired entry that is no session's).
#[inline(always)]
fn entry(e: Option<Exempt>, now: u64, pass: Reason) -> Option<Decided> {
    match e {
        Some(e) if e.live(now) => Some(Decided::Pass(pass)),
        Some(e) if e.owns() => Some(Decided::Block),
        _ => None,
    }
}

/// Probes the session-prefix hash once per prefix length in use, longest first.
#[inline(always)]
fn session_prefix<M: Maps>(a: [u8; 16], s: &Settings, maps: &M, now: u64) -> Option<Decided> {
    let count = s.session_prefix_count as usize;
    for i in 0..MAX_SESSION_PREFIX_LENS {
        if i >= count {
            break;
        }
        let len = s.session_prefix_lens[i] as u32;
        let key = NetKey6 {
            prefix_len: len,
            addr: mask(a, len),
        };
        if let Some(d) = entry(maps.exempt_net6(&key), now, Reason::PassExemptSession) {
            return Some(d);
        }
    }
    None
}
