//! The verdict the README's "What it decides" describes, over any implementation of the
//! policy maps.

use crate::{
    addr::mask_words,
    maps::{
        ip4_bit, ip6_bit_of, net6_bit_of, slash24_bit, words_of, Exempt, NetKey6, Settings,
        BLOCKED_NS, EXBITS_MAIL4, EXBITS_PFX4, EXBITS_RANGES4, EXBITS_READY,
        MAX_SESSION_PREFIX_LENS,
    },
    parse::{parse_flat, Frame, Link, Packet, Parsed, Shape},
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
    /// Word `index` of the exempt filter (`EXBITS`); `None` when it cannot be read (the
    /// lookups it would skip are then made).
    fn filter_word(&self, index: u32) -> Option<u64>;
    /// `CLOCK_BOOTTIME` in nanoseconds.
    fn now_ns(&self) -> u64;
}

/// Parses a frame and decides it.
#[inline(always)]
pub fn classify<F: Frame + ?Sized, M: Maps>(frame: &F, link: Link, maps: &M) -> Reason {
    decide_parsed(&parse_flat(frame, link), maps)
}

#[inline(always)]
pub fn decide<M: Maps>(pkt: &Packet, maps: &M) -> Reason {
    decide_parsed(&Parsed::from_packet(pkt), maps)
}

/// The verdict on the datapath's form of a parse (no enum with data: see [`Parsed`]).
#[inline(always)]
pub fn decide_parsed<M: Maps>(p: &Parsed, maps: &M) -> Reason {
    match p.shape {
        Shape::NotIp => Reason::PassNotIp,
        Shape::NotTcp => Reason::PassNotTcp,
        Shape::Tcp => {
            if !maps.port_blocked(p.dport) {
                return Reason::PassPortOpen;
            }
            address_rules(p, maps).unwrap_or(Reason::BlockPort)
        }
        // The port is unknown, so only the address rules can pass it.
        Shape::Doubt if p.addrs => address_rules(p, maps).unwrap_or(p.reason),
        Shape::Doubt => p.reason,
    }
}

#[inline(always)]
fn v4(a: &[u8; 16]) -> [u8; 4] {
    [a[0], a[1], a[2], a[3]]
}

/// Rules 3 to 5: the ones that depend only on addresses. `None` = no rule lets it pass.
#[inline(always)]
fn address_rules<M: Maps>(p: &Parsed, maps: &M) -> Option<Reason> {
    let settings = maps.settings();
    // The filter, once ready, answers for the tries and hashes below where it can: a lookup
    // whose bit is clear is skipped, a source whose /24 is surely enforced asks no trie.
    let filtered = matches!(maps.filter_word(EXBITS_READY), Some(w) if w != 0);
    // Per family: a family with no listed range is enforced whole (its flag is clear), so
    // listing only IPv4 ranges never leaves every IPv6 source open. Unreadable settings
    // enforce every source.
    let (v6, src, dst) = (p.v6, &p.src, &p.dst);
    let enforced = match settings {
        None => true,
        Some(s) if v6 => !s.listed(true) || maps.in_ranges6(*src),
        Some(s) => {
            !s.listed(false)
                || surely(filtered, slash24_bit(EXBITS_RANGES4, v4(src)), maps)
                || maps.in_ranges4(v4(src))
        }
    };
    if !enforced {
        return Some(Reason::PassNotSubscriber);
    }
    let mail = if v6 {
        maps.mail_server6(*dst)
    } else {
        let d = v4(dst);
        maybe(filtered, slash24_bit(EXBITS_MAIL4, d), maps) && maps.mail_server4(d)
    };
    if mail {
        return Some(Reason::PassMailServer);
    }
    // Most specific first: the exact address, the session prefixes (longest first), then the
    // LPM. A live session's entry decides alone, so a wider prefix of another user (a
    // binding, a stale delegated prefix) never exempts an address a blocked user holds.
    let decided = if v6 {
        let a = *src;
        let (hi, lo) = words_of(&a);
        let exact = if maybe(filtered, ip6_bit_of(hi, lo), maps) {
            maps.exempt_ip6(a)
        } else {
            None
        };
        entry(exact, maps, Reason::PassExemptAddr)
            .or_else(|| match settings {
                Some(s) => session_prefix((hi, lo), &s, filtered, maps),
                None => None,
            })
            .or_else(|| entry(maps.exempt_prefix6(a), maps, Reason::PassExemptPrefix))
    } else {
        let a = v4(src);
        let exact = if maybe(filtered, ip4_bit(a), maps) {
            maps.exempt_ip4(a)
        } else {
            None
        };
        entry(exact, maps, Reason::PassExemptAddr)
            .or_else(|| entry(prefix4(filtered, a, maps), maps, Reason::PassExemptPrefix))
    };
    match decided {
        Some(Decided::Pass(r)) => Some(r),
        // A blocked user's session is blocked against other users' prefixes only: the
        // operator's own exempts (config `exempt`, `exempt add`) are policy for the address
        // itself, whoever holds it, so a static business range stays open when its
        // customer's sessions are reported. Only the longest LPM match is visible; when it
        // is not the operator's, the block stands (fail closed).
        Some(Decided::Block) => {
            let e = if v6 {
                maps.exempt_prefix6(*src)
            } else {
                prefix4(filtered, v4(src), maps)
            };
            match e {
                Some(e) if e.operator() && live(&e, maps) => Some(Reason::PassExemptPrefix),
                _ => None,
            }
        }
        None => None,
    }
}

/// A verdict an exempt entry settles: pass, or block (a session of a user not unblocked).
#[derive(Clone, Copy)]
enum Decided {
    Pass(Reason),
    Block,
}

/// [`Exempt::live`], reading the clock only for an entry that expires at a time still to
/// be compared: a clock read is a helper call that cost about a fifth of the blocked path
/// (rdtsc under virtualisation), and most entries need none. Permanent entries (0) are
/// live; a blocked user's session entry, written already expired ([`BLOCKED_NS`]), is
/// not, as the boot clock is past 1 ns whenever a packet is seen.
#[inline(always)]
fn live<M: Maps>(e: &Exempt, maps: &M) -> bool {
    match e.expires_ns {
        0 => true,
        BLOCKED_NS => false,
        t => maps.now_ns() < t,
    }
}

/// `None`: this entry does not decide (absent, or an expired entry that is no session's).
#[inline(always)]
fn entry<M: Maps>(e: Option<Exempt>, maps: &M, pass: Reason) -> Option<Decided> {
    match e {
        Some(e) if live(&e, maps) => Some(Decided::Pass(pass)),
        Some(e) if e.owns() => Some(Decided::Block),
        _ => None,
    }
}

/// Whether a key whose filter bit is `bit` may be in its hash: unfiltered (not ready), its
/// bit set, or the word unreadable. A hash lookup is a call into the kernel (about 20 ns);
/// a filter word is an array read the verifier inlines.
#[inline(always)]
fn maybe<M: Maps>(filtered: bool, (word, bit): (u32, u32), maps: &M) -> bool {
    if !filtered {
        return true;
    }
    match maps.filter_word(word) {
        Some(w) => w >> bit & 1 != 0,
        None => true,
    }
}

/// Whether the filter says a /24 is surely enforced: ready and the bit set. Anything else
/// (not ready, the bit clear, the word unreadable) leaves it to the ranges trie.
#[inline(always)]
fn surely<M: Maps>(filtered: bool, (word, bit): (u32, u32), maps: &M) -> bool {
    filtered && matches!(maps.filter_word(word), Some(w) if w >> bit & 1 != 0)
}

/// The IPv4 exempt-prefix trie's answer for `a`, unless the filter says no prefix meets
/// its /24.
#[inline(always)]
fn prefix4<M: Maps>(filtered: bool, a: [u8; 4], maps: &M) -> Option<Exempt> {
    if maybe(filtered, slash24_bit(EXBITS_PFX4, a), maps) {
        maps.exempt_prefix4(a)
    } else {
        None
    }
}

/// Probes the session-prefix hash once per prefix length in use, longest first, each only
/// where the filter allows.
#[inline(always)]
fn session_prefix<M: Maps>(
    (hi, lo): (u64, u64),
    s: &Settings,
    filtered: bool,
    maps: &M,
) -> Option<Decided> {
    let count = s.session_prefix_count as usize;
    for i in 0..MAX_SESSION_PREFIX_LENS {
        if i >= count {
            break;
        }
        let len = s.session_prefix_lens[i] as u32;
        let (mh, ml) = mask_words(hi, lo, len);
        if !maybe(filtered, net6_bit_of(mh, ml, len), maps) {
            continue;
        }
        let mut addr = [0u8; 16];
        addr[..8].copy_from_slice(&mh.to_be_bytes());
        addr[8..].copy_from_slice(&ml.to_be_bytes());
        let key = NetKey6 {
            prefix_len: len,
            addr,
        };
        if let Some(d) = entry(maps.exempt_net6(&key), maps, Reason::PassExemptSession) {
            return Some(d);
        }
    }
    None
}
