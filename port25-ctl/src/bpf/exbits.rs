//! The exempt filter ([`m::EXBITS`]): one bit per key of the exempt hashes (exact IPv4 and
//! IPv6 addresses, IPv6 session prefixes), so the datapath calls into a hash only for a key
//! whose bit is set.
//!
//! The rule that keeps it fail closed: a key's bit is set before the key is written, and a
//! bit is cleared only once no key that maps to it is left ([`trim`], after an apply's
//! deletes); the ready word goes non-zero only after a full apply, when every entry of the
//! hashes has its bit. A skipped lookup is then one whose key is absent. A bit set with no
//! key behind it costs one lookup, nothing else.
//!
//! The daemon maps the array into its memory (`BPF_F_MMAPABLE`) and edits words with
//! atomic stores: a trim at a million entries compares 851,969 words without a syscall.

use std::{
    num::NonZeroUsize,
    os::fd::AsFd,
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::{Map, MapData, MapError};
use port25_common::maps::{self as m, ip4_bit, ip6_bit, net6_bit};

use crate::policy::{slot::Slot, Desired};

const WORDS: usize = m::EXBITS_WORDS as usize;

/// The filter's words as the apply edits them: the live array, or a plain copy in the test
/// that checks the apply's order.
pub trait FilterCell {
    fn load(&self, word: u32) -> u64;
    fn or(&self, word: u32, bits: u64);
    fn store(&self, word: u32, value: u64);
}

/// The filter bit of an exempt key that lives in a hash (`None`: a trie's, never filtered).
pub fn bit_of(slot: &Slot) -> Option<(u32, u32)> {
    match slot {
        Slot::Ip4(a) => Some(ip4_bit(*a)),
        Slot::Ip6(a) => Some(ip6_bit(a)),
        Slot::Net6(k) => Some(net6_bit(k)),
        Slot::Pfx4(_) | Slot::Pfx6(_) => None,
    }
}

/// Every hash key of `d` with its filter bit.
fn bits_of(d: &Desired) -> impl Iterator<Item = (u32, u32)> + '_ {
    let ip4 = d.exip4.keys().map(|a| ip4_bit(*a));
    let ip6 = d.exip6.keys().map(ip6_bit);
    let net6 = d.exnet6.keys().map(net6_bit);
    ip4.chain(ip6).chain(net6)
}

/// Sets `bits` (before their keys are written).
pub fn grow(f: &dyn FilterCell, bits: impl IntoIterator<Item = (u32, u32)>) {
    for (w, b) in bits {
        f.or(w, 1 << b);
    }
}

/// Sets the bits of every hash key `d` holds (before they are written).
pub fn grow_to(f: &dyn FilterCell, d: &Desired) {
    grow(f, bits_of(d));
}

/// Makes the filter exactly the bits of `d`'s hash keys, then marks it ready. Only once the
/// hashes hold `d` (after every delete of an apply): a bit still needed is never cleared.
pub fn trim(f: &dyn FilterCell, d: &Desired) {
    let mut want = vec![0u64; m::EXBITS_READY as usize];
    for (w, b) in bits_of(d) {
        want[w as usize] |= 1 << b;
    }
    for (i, v) in want.iter().enumerate() {
        // Setting a bit here would be a bug (grow comes first), but never a hole.
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
