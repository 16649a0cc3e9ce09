//! The verdict the README's "What it decides" describes, over any implementation of the
//! policy maps.

use crate::{
    addr::mask_words,
    maps::{
        block6, block_bit, block_word, ip4_bit, ip6_bit_of, net6_bit_of, range6_tag, slash24_bit,
        Exempt, NetKey6, Settings, BLOCKED_NS, EXBITS_LENS6, EXBITS_MAIL4, EXBITS_MAIL6,
        EXBITS_PFX4, EXBITS_PFX6, EXBITS_RANGES4, EXBITS_RANGES6, EXBITS_READY, EXBITS_WIDE6,
        FLAG_LISTED4, FLAG_LISTED6, PROBED_PREFIX_LENS, WIDE6_LENS, WIDE6_MAIL, WIDE6_PFX,
    },
    parse::{parse_flat, Frame, Link, Packet, Parsed, Shape},
    reason::Reason,
};

/// Lookups into the policy maps. The kernel answers from BPF maps, `port25-ctl check` from
/// the pinned maps, the reference model from plain collections. LPM lookups return the
/// longest matching entry, as the kernel's LPM trie does.
pub trait Maps {
    /// The settings record: in place where the implementation holds it (the kernel's map
    /// value, the model's field), a copy otherwise. The kernel's record is 32 bytes (16
    /// lengths): copied to the stack, it cost every blocked packet (IPv4 too) 8 ns, and
    /// stack that the offender hand-over needs.
    type Settings<'a>: core::ops::Deref<Target = Settings>
    where
        Self: 'a;
    /// `None` when the settings record cannot be read; the verdict then enforces every source.
    fn settings(&self) -> Option<Self::Settings<'_>>;
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

/// Rules 3 to 5: the ones that depend only on addresses. `None` = no rule lets it pass.
#[inline(always)]
fn address_rules<M: Maps>(p: &Parsed, maps: &M) -> Option<Reason> {
    // The flags alone: the lengths are read in place where they are probed.
    let settings = maps.settings().map(|s| s.flags);
    // The filter, once ready, answers for the tries and hashes below where it can: a lookup
    // whose bit is clear is skipped, a source whose /24 is surely enforced asks no trie.
    let filtered = matches!(maps.filter_word(EXBITS_READY), Some(w) if w != 0);
    // Per family: a family with no listed range is enforced whole (its flag is clear), so
    // listing only IPv4 ranges never leaves every IPv6 source open. Unreadable settings
    // enforce every source.
    let (v6, src, dst) = (p.v6, p.src, p.dst);
    // IPv6: the source's blocks, hashed once for every region that reads them.
    let near = if v6 && filtered {
        Near6::of(src.be_words().0, maps)
    } else {
        Near6::ANY
    };
    let enforced = match settings {
        None => true,
        Some(flags) if v6 => {
            flags & FLAG_LISTED6 == 0
                || near.surely_enforced(src.be_words().0, maps)
                || maps.in_ranges6(src.bytes())
        }
        Some(flags) => {
            flags & FLAG_LISTED4 == 0
                || surely(filtered, slash24_bit(EXBITS_RANGES4, src.v4()), maps)
                || maps.in_ranges4(src.v4())
        }
    };
    if !enforced {
        return Some(Reason::PassNotSubscriber);
    }
    let mail = if v6 {
        near.mail(dst.be_words().0, maps) && maps.mail_server6(dst.bytes())
    } else {
        let d = dst.v4();
        maybe(filtered, slash24_bit(EXBITS_MAIL4, d), maps) && maps.mail_server4(d)
    };
    if mail {
        return Some(Reason::PassMailServer);
    }
    // Most specific first: the exact address, the session prefixes (longest first), then the
    // LPM. A live session's entry decides alone, so a wider prefix of another user (a
    // binding, a stale delegated prefix) never exempts an address a blocked user holds.
    let decided = if v6 {
        let (hi, lo) = src.be_words();
        let exact = if maybe(filtered, ip6_bit_of(hi, lo), maps) {
            maps.exempt_ip6(src.bytes())
        } else {
            None
        };
        // Not `or_else` closures: LLVM leaves a closure this size out of line (a call, and
        // a frame of its own that the offender hand-over's stack no longer fits beside).
        let mut d = entry(exact, maps, Reason::PassExemptAddr);
        if d.is_none() {
            d = match maps.settings() {
                Some(s) => session_prefix((hi, lo), &s, filtered, near.lens, maps),
                None => None,
            };
        }
        if d.is_none() {
            d = entry(
                prefix6(&near, src.bytes(), maps),
                maps,
                Reason::PassExemptPrefix,
            );
        }
        d
    } else {
        let a = src.v4();
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
                prefix6(&near, src.bytes(), maps)
            } else {
                prefix4(filtered, src.v4(), maps)
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

/// What the IPv6 regions of the filter say about a source's /32 and /48 blocks, read once
/// per packet. Unfiltered (not ready) or unreadable, everything is "maybe".
#[derive(Clone, Copy)]
struct Near6 {
    /// [`EXBITS_WIDE6`].
    wide: u64,
    /// The session prefix lengths near the source (bit `len % 64`).
    lens: u64,
    /// The source's /32 and /48 block hashes.
    h32: u64,
    h48: u64,
    filtered: bool,
}

impl Near6 {
    const ANY: Near6 = Near6 {
        wide: !0,
        lens: !0,
        h32: 0,
        h48: 0,
        filtered: false,
    };

    #[inline(always)]
    fn of<M: Maps>(hi: u64, maps: &M) -> Near6 {
        let (h32, h48) = (block6(hi, 32), block6(hi, 48));
        let word = |w| maps.filter_word(w).unwrap_or(!0);
        let wide = word(EXBITS_WIDE6);
        let lens = (wide & WIDE6_LENS)
            | word(block_word(EXBITS_LENS6, h32))
            | word(block_word(EXBITS_LENS6, h48));
        Near6 {
            wide,
            lens,
            h32,
            h48,
            filtered: true,
        }
    }

    /// The source's /32 is listed as wholly inside a subscriber range (its own tag, not a
    /// colliding block's).
    #[inline(always)]
    fn surely_enforced<M: Maps>(&self, hi: u64, maps: &M) -> bool {
        self.filtered
            && matches!(
                maps.filter_word(block_word(EXBITS_RANGES6, self.h32)),
                Some(w) if w == range6_tag((hi >> 32) as u32)
            )
    }

    /// Whether a mail-server entry may cover the destination (high word `dst_hi`).
    #[inline(always)]
    fn mail<M: Maps>(&self, dst_hi: u64, maps: &M) -> bool {
        !self.filtered
            || self.wide & WIDE6_MAIL != 0
            || maybe(true, block_bit(EXBITS_MAIL6, block6(dst_hi, 32)), maps)
    }

    /// Whether an exempt prefix may cover the source.
    #[inline(always)]
    fn prefix<M: Maps>(&self, maps: &M) -> bool {
        !self.filtered
            || self.wide & WIDE6_PFX != 0
            || maybe(true, block_bit(EXBITS_PFX6, self.h32), maps)
            || maybe(true, block_bit(EXBITS_PFX6, self.h48), maps)
    }
}

/// The IPv6 exempt-prefix trie's answer for `a`, unless the filter says no prefix lies in
/// its blocks.
#[inline(always)]
fn prefix6<M: Maps>(near: &Near6, a: [u8; 16], maps: &M) -> Option<Exempt> {
    if near.prefix(maps) {
        maps.exempt_prefix6(a)
    } else {
        None
    }
}

/// A settings record held by value, for implementations that read a copy.
pub struct Owned(pub Settings);

impl core::ops::Deref for Owned {
    type Target = Settings;
    #[inline(always)]
    fn deref(&self) -> &Settings {
        &self.0
    }
}

/// Probes the session-prefix hash once per prefix length in use, longest first, each only
/// where the filter allows: a length the source's blocks do not name (`near`), then a key
/// whose own bit is clear, is skipped.
#[inline(always)]
fn session_prefix<M: Maps>(
    (hi, lo): (u64, u64),
    s: &Settings,
    filtered: bool,
    near: u64,
    maps: &M,
) -> Option<Decided> {
    // No length has a key in the source's blocks (a source outside every session's
    // neighbourhood): nothing to probe, without walking the list.
    if near == 0 {
        return None;
    }
    let (count, lens) = s.probed_lens();
    let count = count as usize;
    for i in 0..PROBED_PREFIX_LENS {
        if i >= count {
            break;
        }
        let len = (lens[i / 8] >> (8 * (i % 8))) as u8 as u32;
        if near >> (len & 63) & 1 == 0 {
            continue;
        }
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
