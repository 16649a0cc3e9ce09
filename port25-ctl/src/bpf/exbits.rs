//! The exempt filter ([`m::EXBITS`]): one bit per key of the exempt hashes (exact IPv4 and
//! IPv6 addresses, IPv6 session prefixes) and one per IPv4 /24 (IPv6: hashed /32 or /48
//! block) that a mail server or an exempt prefix meets, so the datapath calls into a hash or
//! a trie only where its bit is set; per IPv6 block, the session prefix lengths with a key
//! there, so a source probes only those; and one per IPv4 /24 (a tag per IPv6 /32) that lies
//! wholly inside a subscriber range, so an enforced source asks no trie.
//!
//! The rule that keeps it fail closed: a key's bit is set before the key is written, and a
//! bit is cleared only once no key that maps to it is left ([`trim`], after an apply's
//! deletes); the ready word goes non-zero only after a full apply, when every entry of the
//! hashes has its bit. A skipped lookup is then one whose key is absent. A bit set with no
//! key behind it costs one lookup, nothing else. The ranges' bits say the opposite ("surely
//! enforced") and are only set by [`trim`], after the ranges are written; one left set too
//! long (until the trim after a range's delete) only enforces a source the old ranges did.
//!
//! The daemon maps the array into its memory (`BPF_F_MMAPABLE`) and edits words with
//! atomic stores: a trim at a million entries compares 1,638,400 words without a syscall.

use std::{
    num::NonZeroUsize,
    os::fd::AsFd,
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::{Map, MapData, MapError};
use port25_common::maps::{
    self as m, ip4_bit, ip6_bit, lens6_bit, mail6_bit, net6_bit, pfx6_bit, slash24s, Region,
};

use crate::policy::{slot::Slot, Desired};

const WORDS: usize = m::EXBITS_WORDS as usize;

/// The filter's words as the apply edits them: the live array, or a plain copy in the test
/// that checks the apply's order.
pub trait FilterCell {
    fn load(&self, word: u32) -> u64;
    fn or(&self, word: u32, bits: u64);
    fn store(&self, word: u32, value: u64);
}

/// A run of consecutive filter bits: the first (word * 64 + bit in the word) and how many.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub first: u64,
    pub len: u64,
}

impl Run {
    pub fn one((word, bit): (u32, u32)) -> Run {
        Run {
            first: word as u64 * 64 + bit as u64,
            len: 1,
        }
    }

    /// The bits in `r` of the /24s IPv4 prefix `a`/`len` meets.
    fn slash24s(r: Region, (a, len): ([u8; 4], u32)) -> Run {
        let (n, count) = slash24s(a, len);
        Run {
            first: r.first as u64 * 64 + n as u64,
            len: count as u64,
        }
    }

    /// The run as (word, mask) pairs: a /8's 65,536 bits are 1,024 whole words.
    fn words(self) -> impl Iterator<Item = (u32, u64)> {
        let end = self.first + self.len;
        let mut at = self.first;
        std::iter::from_fn(move || {
            (at < end).then(|| {
                let bit = at % 64;
                let n = (64 - bit).min(end - at);
                let mask = if n == 64 {
                    !0
                } else {
                    ((1u64 << n) - 1) << bit
                };
                let word = (at / 64) as u32;
                at += n;
                (word, mask)
            })
        })
    }
}

/// The filter bits of an exempt key: its own bit, and for an IPv6 session prefix its
/// length's bit among the lengths near it.
pub fn bits_of_slot(slot: &Slot) -> impl Iterator<Item = Run> {
    let (first, second) = match slot {
        Slot::Ip4(a) => (Run::one(ip4_bit(*a)), None),
        Slot::Ip6(a) => (Run::one(ip6_bit(a)), None),
        Slot::Net6(k) => (Run::one(net6_bit(k)), Some(Run::one(lens6_of(k)))),
        Slot::Pfx4(k) => (Run::slash24s(m::EXBITS_PFX4, *k), None),
        Slot::Pfx6((a, len)) => (Run::one(pfx6_bit(a, *len)), None),
    };
    std::iter::once(first).chain(second)
}

fn lens6_of(k: &m::NetKey6) -> (u32, u32) {
    lens6_bit(m::words_of(&k.addr).0, k.prefix_len)
}

/// Every bit `d`'s entries need before they are written: its hash keys', the lengths near
/// its session prefixes, and the /24s (IPv4) or blocks (IPv6) its mail servers and exempt
/// prefixes meet.
fn maybe_bits(d: &Desired) -> impl Iterator<Item = Run> + '_ {
    let ip4 = d.exip4.keys().map(|a| Run::one(ip4_bit(*a)));
    let ip6 = d.exip6.keys().map(|a| Run::one(ip6_bit(a)));
    let net6 = d.exnet6.keys().map(|k| Run::one(net6_bit(k)));
    let lens6 = d.exnet6.keys().map(|k| Run::one(lens6_of(k)));
    let mail4 = d.mail4.keys().map(|k| Run::slash24s(m::EXBITS_MAIL4, *k));
    let pfx4 = d.expfx4.keys().map(|k| Run::slash24s(m::EXBITS_PFX4, *k));
    let mail6 = d.mail6.keys().map(|(a, len)| Run::one(mail6_bit(a, *len)));
    let pfx6 = d.expfx6.keys().map(|(a, len)| Run::one(pfx6_bit(a, *len)));
    ip4.chain(ip6)
        .chain(net6)
        .chain(lens6)
        .chain(mail4)
        .chain(pfx4)
        .chain(mail6)
        .chain(pfx6)
}

/// The /24s that lie wholly inside one of `d`'s IPv4 subscriber ranges (a range of /24 or
/// wider).
fn surely_enforced(d: &Desired) -> impl Iterator<Item = Run> + '_ {
    d.ranges4
        .keys()
        .filter(|(_, len)| *len <= 24)
        .map(|k| Run::slash24s(m::EXBITS_RANGES4, *k))
}

/// The /32 blocks that lie wholly inside one of `d`'s IPv6 subscriber ranges (of /24 to
/// /32), as tags into `want`'s [`m::EXBITS_RANGES6`]: the first block to claim a slot keeps
/// it, in the ranges' order, so the table is the same for the same ranges.
fn surely_enforced6(d: &Desired, want: &mut [u64]) {
    for (a, len) in d.ranges6.keys() {
        if !(m::RANGES6_WIDEST..=32).contains(len) {
            continue;
        }
        let first =
            u32::from_be_bytes([a[0], a[1], a[2], a[3]]) & !((1u64 << (32 - len)) - 1) as u32;
        for block in first..=first + ((1u64 << (32 - len)) - 1) as u32 {
            let slot = m::block_word(m::EXBITS_RANGES6, m::block6((block as u64) << 32, 32));
            if want[slot as usize] == 0 {
                want[slot as usize] = m::range6_tag(block);
            }
        }
    }
}

/// Sets `bits` (before their keys are written).
pub fn grow(f: &dyn FilterCell, bits: impl IntoIterator<Item = Run>) {
    for (w, mask) in bits.into_iter().flat_map(Run::words) {
        f.or(w, mask);
    }
}

/// Sets the bits every entry `d` holds needs (before they are written).
pub fn grow_to(f: &dyn FilterCell, d: &Desired) {
    grow(f, maybe_bits(d));
}

/// Every region's words for `d`, as a finished apply leaves them (ready word aside).
pub fn words_for(d: &Desired) -> Vec<u64> {
    let mut want = vec![0u64; m::EXBITS_READY as usize];
    for (w, mask) in maybe_bits(d).chain(surely_enforced(d)).flat_map(Run::words) {
        want[w as usize] |= mask;
    }
    surely_enforced6(d, &mut want);
    want
}

/// Makes the filter exactly the bits of `d`, then marks it ready. Only once the maps hold
/// `d` (after every delete of an apply): a bit still needed is never cleared, and a /24 is
/// said to be surely enforced only once its range is in the trie.
pub fn trim(f: &dyn FilterCell, d: &Desired) {
    let want = words_for(d);
    for (i, v) in want.iter().enumerate() {
        // Setting a key's bit here would be a bug (grow comes first), but never a hole.
        if f.load(i as u32) != *v {
            f.store(i as u32, *v);
        }
    }
    if f.load(m::EXBITS_READY) == 0 {
        f.store(m::EXBITS_READY, 1);
    }
}

/// The pinned filter array, mapped read-write.
pub struct Bits {
    _map: MapData,
    words: NonNull<AtomicU64>,
    len: usize,
}

// SAFETY: the mapping is shared memory edited only through atomics; it lives as long as the
// value (unmapped on drop).
unsafe impl Send for Bits {}
unsafe impl Sync for Bits {}

impl TryFrom<Map> for Bits {
    type Error = MapError;
    fn try_from(m: Map) -> Result<Self, MapError> {
        let Map::Array(data) = m else {
            return Err(MapError::InvalidMapType { map_type: 0 });
        };
        let bytes = (WORDS * 8).next_multiple_of(page_size());
        // SAFETY: a shared mapping of the map's fd at offset 0, as the kernel allows for
        // a BPF_F_MMAPABLE array; the length covers the array (rounded to a page).
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                NonZeroUsize::new(bytes).unwrap(),
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
                data.fd().as_fd(),
                0,
            )
        }
        .map_err(|e| {
            MapError::SyscallError(aya::sys::SyscallError {
                call: "mmap",
                io_error: std::io::Error::from(e),
            })
        })?;
        Ok(Bits {
            _map: data,
            words: ptr.cast(),
            len: bytes,
        })
    }
}

fn page_size() -> usize {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as usize
}

impl Bits {
    fn word(&self, i: u32) -> &AtomicU64 {
        assert!((i as usize) < WORDS, "filter word {i} out of range");
        // SAFETY: within the mapping (checked above); u64-aligned (page-aligned base).
        unsafe { &*self.words.as_ptr().add(i as usize) }
    }
}

impl FilterCell for Bits {
    fn load(&self, word: u32) -> u64 {
        self.word(word).load(Ordering::SeqCst)
    }
    fn or(&self, word: u32, bits: u64) {
        self.word(word).fetch_or(bits, Ordering::SeqCst);
    }
    fn store(&self, word: u32, value: u64) {
        self.word(word).store(value, Ordering::SeqCst);
    }
}

impl Drop for Bits {
    fn drop(&mut self) {
        // SAFETY: the mapping made in try_from, of that length.
        let _ = unsafe { nix::sys::mman::munmap(self.words.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(r: Run) -> Vec<u64> {
        r.words()
            .flat_map(|(w, mask)| {
                (0..64)
                    .filter(move |b| mask >> b & 1 != 0)
                    .map(move |b| w as u64 * 64 + b)
            })
            .collect()
    }

    #[test]
    fn a_run_is_its_bits_word_by_word() {
        for (first, len) in [
            (0, 1),
            (63, 1),
            (63, 2),
            (60, 70),
            (64, 64),
            (5, 300),
            (128, 1 << 14),
        ] {
            assert_eq!(
                bits(Run { first, len }),
                (first..first + len).collect::<Vec<_>>(),
                "{first}+{len}"
            );
        }
        let whole = Run {
            first: 64 * 10,
            len: 64 * 3,
        }
        .words()
        .collect::<Vec<_>>();
        assert_eq!(whole, vec![(10, !0), (11, !0), (12, !0)]);
    }
}
