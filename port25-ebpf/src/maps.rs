//! The BPF maps and the kernel's answers to the verdict's lookups.
//!
//! Capacities here are defaults; the controller sets them from the config's `limits` at load.
//! Every pinned map here is one entry of the controller's map list (`port25-ctl/src/bpf/
//! maps.rs`, `map_list!`), and every other map is named there as kernel-private; a test
//! there compares names, types, key and value sizes, capacities and flags with this file.

use aya_ebpf::{
    helpers::bpf_ktime_get_boot_ns,
    macros::map,
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray},
};
use port25_common::{
    maps::{
        Exempt, NetKey6, Settings, DEFAULT_EXEMPT_IPS, DEFAULT_EXEMPT_PREFIXES,
        DEFAULT_MAIL_SERVERS, DEFAULT_SESSION_PREFIXES, DEFAULT_SUBSCRIBER_RANGES, EXBITS_WORDS,
        PORTS_ENTRIES,
    },
    verdict::Maps,
    Reason, NUM_REASONS,
};

const NO_PREALLOC: u32 = aya_ebpf::bindings::BPF_F_NO_PREALLOC;

#[map(name = "P25_SETTINGS")]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

#[map(name = "P25_PORTS")]
static PORTS: Array<u8> = Array::with_max_entries(PORTS_ENTRIES, 0);

#[map(name = "P25_RANGES4")]
static RANGES4: LpmTrie<[u8; 4], u8> =
    LpmTrie::with_max_entries(DEFAULT_SUBSCRIBER_RANGES, NO_PREALLOC);
#[map(name = "P25_RANGES6")]
static RANGES6: LpmTrie<[u8; 16], u8> =
    LpmTrie::with_max_entries(DEFAULT_SUBSCRIBER_RANGES, NO_PREALLOC);

#[map(name = "P25_MAIL4")]
static MAIL4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(DEFAULT_MAIL_SERVERS, NO_PREALLOC);
#[map(name = "P25_MAIL6")]
static MAIL6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(DEFAULT_MAIL_SERVERS, NO_PREALLOC);

#[map(name = "P25_EXIP4")]
static EXIP4: HashMap<[u8; 4], Exempt> = HashMap::with_max_entries(DEFAULT_EXEMPT_IPS, NO_PREALLOC);
#[map(name = "P25_EXIP6")]
static EXIP6: HashMap<[u8; 16], Exempt> =
    HashMap::with_max_entries(DEFAULT_EXEMPT_IPS, NO_PREALLOC);

#[map(name = "P25_EXPFX4")]
static EXPFX4: LpmTrie<[u8; 4], Exempt> =
    LpmTrie::with_max_entries(DEFAULT_EXEMPT_PREFIXES, NO_PREALLOC);
#[map(name = "P25_EXPFX6")]
static EXPFX6: LpmTrie<[u8; 16], Exempt> =
    LpmTrie::with_max_entries(DEFAULT_EXEMPT_PREFIXES, NO_PREALLOC);

#[map(name = "P25_EXNET6")]
static EXNET6: HashMap<NetKey6, Exempt> =
    HashMap::with_max_entries(DEFAULT_SESSION_PREFIXES, NO_PREALLOC);

/// Mappable, so the daemon sets and clears bits with plain atomic stores (no syscall a word).
#[map(name = "P25_EXBITS")]
static EXBITS: Array<u64> =
    Array::with_max_entries(EXBITS_WORDS, aya_ebpf::bindings::BPF_F_MMAPABLE);

#[map(name = "P25_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_REASONS, 0);

/// `action: reject` in the settings.
#[inline(always)]
pub fn reject_enabled() -> bool {
    matches!(SETTINGS.get(0), Some(s) if s.flags & port25_common::maps::FLAG_REJECT != 0)
}

#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(c) = COUNTERS.get_ptr_mut(reason as u32) {
        // Per-CPU slot: no other writer.
        unsafe { *c += 1 };
    }
}

pub struct KernelMaps;

impl Maps for KernelMaps {
    type Settings<'a> = &'static Settings;
    #[inline(always)]
    fn settings(&self) -> Option<&'static Settings> {
        SETTINGS.get(0)
    }
    #[inline(always)]
    fn port_blocked(&self, port: u16) -> bool {
        matches!(PORTS.get(port as u32), Some(v) if *v != 0)
    }
    #[inline(always)]
    fn in_ranges4(&self, a: [u8; 4]) -> bool {
        RANGES4.get(Key::new(32, a)).is_some()
    }
    #[inline(always)]
    fn in_ranges6(&self, a: [u8; 16]) -> bool {
        RANGES6.get(Key::new(128, a)).is_some()
    }
    #[inline(always)]
    fn mail_server4(&self, a: [u8; 4]) -> bool {
        MAIL4.get(Key::new(32, a)).is_some()
    }
    #[inline(always)]
    fn mail_server6(&self, a: [u8; 16]) -> bool {
        MAIL6.get(Key::new(128, a)).is_some()
    }
    #[inline(always)]
    fn exempt_ip4(&self, a: [u8; 4]) -> Option<Exempt> {
        unsafe { EXIP4.get(a) }.copied()
    }
    #[inline(always)]
    fn exempt_ip6(&self, a: [u8; 16]) -> Option<Exempt> {
        unsafe { EXIP6.get(a) }.copied()
    }
    #[inline(always)]
    fn exempt_prefix4(&self, a: [u8; 4]) -> Option<Exempt> {
        EXPFX4.get(Key::new(32, a)).copied()
    }
    #[inline(always)]
    fn exempt_prefix6(&self, a: [u8; 16]) -> Option<Exempt> {
        EXPFX6.get(Key::new(128, a)).copied()
    }
    #[inline(always)]
    fn exempt_net6(&self, key: &NetKey6) -> Option<Exempt> {
        unsafe { EXNET6.get(key) }.copied()
    }
    #[inline(always)]
    fn filter_word(&self, index: u32) -> Option<u64> {
        // An array read: the verifier inlines it (bounds check and address, no call).
        let mut word = 0u64;
        let found = match EXBITS.get(index) {
            Some(w) => {
                word = *w;
                true
            }
            None => false,
        };
        // Through the stack, so the word is defined on both paths. Otherwise LLVM folds a
        // test like `ready && w != 0` into `!found | (w == 0)`, reading on the not-found
        // path a register the lookup call clobbered: Linux 6.1 walks that path (it does not
        // know an array lookup at a constant index in range cannot fail) and refuses the
        // read ("R1 !read_ok").
        let word = unsafe { core::ptr::read_volatile(&word) };
        found.then_some(word)
    }
    #[inline(always)]
    fn now_ns(&self) -> u64 {
        unsafe { bpf_ktime_get_boot_ns() }
    }
}

/// Scratch slot for [`port25_common::parse::Frame::forget`]: a value read back from a map is
/// one the verifier knows nothing about. Not pinned: private to each load.
#[map(name = "P25_SCRATCH")]
static SCRATCH: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn forget(a: usize, b: usize) -> Option<(usize, usize)> {
    let p = SCRATCH.get_ptr_mut(0)?;
    // Volatile: the compiler must not forward the stored values past the map.
    let v = unsafe {
        core::ptr::write_volatile(p, [a as u64, b as u64]);
        core::ptr::read_volatile(p)
    };
    Some((v[0] as usize, v[1] as usize))
}
