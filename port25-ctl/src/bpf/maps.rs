//! The one list of maps: [`map_list!`]. Adding a map is one entry there (and its kernel
//! declaration, its verdict lookup and its model, which the list cannot write).
//!
//! Everything else about the maps is derived from the list: [`MAPS`] (names, capacities,
//! apply stages, layouts), [`ALL_MAPS`], [`capacity`], the live handles
//! ([`crate::bpf::livemaps::LiveMaps`]: struct, `open`, `fill`), the desired contents
//! ([`crate::policy::Desired`]), the exempt keys ([`crate::policy::Slot`]), the apply order
//! (`policy::apply`) and its one "map full" check ([`fits`]).
//!
//! The kernel declares its maps in `port25-ebpf/src/maps.rs` with `#[map(name = "...")]`
//! literals that cannot come from Rust constants; the tests below hold the embedded object's
//! maps equal to this list, so a map declared on one side only fails a test.

use anyhow::Result;
use aya::Pod;
use aya_obj::generated::{bpf_map_type, BPF_F_NO_PREALLOC};

use crate::config::Limits;

/// The names the list's entries are written with; a module that expands the list imports
/// them with `use crate::bpf::maps::decl::*`.
pub mod decl {
    pub use super::Capacity::{Fixed, Limit};
    pub use super::{Lru, Progs, Ring};
    pub use crate::bpf::exbits::Bits;
    pub use port25_common::maps::{
        AbuseSettings, Exempt, NetKey6, Offender, OffenderKey, Settings,
    };
    pub type Arr<V> = aya::maps::Array<aya::maps::MapData, V>;
    pub type Trie<K, V> = aya::maps::LpmTrie<aya::maps::MapData, K, V>;
    pub type Hash<K, V> = aya::maps::HashMap<aya::maps::MapData, K, V>;
    pub type PerCpu<V> = aya::maps::PerCpuArray<aya::maps::MapData, V>;
}

/// Every pinned map, in the order the apply visits them. Hands the list to macro `$then`:
///
/// - first the settings record (`field: NAME = type;`), written by the apply's own steps;
/// - then the policy maps in groups named by their [`Stage`], each entry
///   `field: NAME = type, capacity[, Slot variant];` (a slot variant marks an exempt map,
///   whose value is [`port25_common::maps::Exempt`] and whose key a `Slot` names);
/// - then the counters (`field: NAME = type, capacity;`), written only by the kernel;
/// - last the maps a pin tree of an older port25 may lack (`abuse { field: NAME = type,
///   capacity; }`): the abuse desk's offender tracking (written by the kernel), its settings
///   record (by the daemon at start and reload) and the block-event ring, never policy; and
///   the exempt filter, which only ever skips a lookup whose key is absent
///   ([`crate::bpf::exbits`]). They are created beside an older tree at start, and
///   [`crate::bpf::livemaps::LiveMaps`] opens them as optional; except the filter beside
///   pinned exempt hashes, which is migrated instead (`datapath::filter_missing`): the
///   attached program reads the filter it was loaded with.
///
/// `NAME` is the constant in [`port25_common::maps`] (the kernel name and pin file name).
/// Within a stage, the order is the order of writes: mail servers before exempt entries.
macro_rules! map_list {
    ($then:ident) => {
        $then! {
            settings: SETTINGS = Arr<Settings>;
            policy {
            Restrict {
                ports: PORTS = Arr<u8>, Fixed(port25_common::maps::PORTS_ENTRIES);
                ranges4: RANGES4 = Trie<[u8; 4], u8>, Limit("limits.subscriber_ranges", |l| l.subscriber_ranges);
                ranges6: RANGES6 = Trie<[u8; 16], u8>, Limit("limits.subscriber_ranges", |l| l.subscriber_ranges);
            }
            Allow {
                mail4: MAIL4 = Trie<[u8; 4], u8>, Limit("limits.mail_servers", |l| l.mail_servers);
                mail6: MAIL6 = Trie<[u8; 16], u8>, Limit("limits.mail_servers", |l| l.mail_servers);
                exip4: EXIP4 = Hash<[u8; 4], Exempt>, Limit("limits.exempt_ips", |l| l.exempt_ips), Ip4;
                exip6: EXIP6 = Hash<[u8; 16], Exempt>, Limit("limits.exempt_ips", |l| l.exempt_ips), Ip6;
                expfx4: EXPFX4 = Trie<[u8; 4], Exempt>, Limit("limits.exempt_prefixes", |l| l.exempt_prefixes), Pfx4;
                expfx6: EXPFX6 = Trie<[u8; 16], Exempt>, Limit("limits.exempt_prefixes", |l| l.exempt_prefixes), Pfx6;
                exnet6: EXNET6 = Hash<NetKey6, Exempt>, Limit("limits.session_prefixes", |l| l.session_prefixes), Net6;
            }
            }
            counters: COUNTERS = PerCpu<u64>, Fixed(port25_common::NUM_REASONS);
            abuse {
                abuse: ABUSE = Arr<AbuseSettings>, Fixed(1);
                // At least 1: the kernel cannot create an empty map; 0 (off) is said in ABUSE.
                offenders: OFFENDERS = Lru<OffenderKey, Offender>, Limit("abuse.track_sources", |l| l.track_sources.max(1));
                events: EVENTS = Ring, Fixed(port25_common::maps::EVENTS_BYTES);
                // Pinned so the tracking goes on while the daemon is down (a program array
                // is emptied when no file or pin holds it); each load sets its programs.
                track_xdp: TRACK_XDP = Progs, Fixed(1);
                track_tc: TRACK_TC = Progs, Fixed(1);
                // The key bits and the ready word.
                exbits: EXBITS = Bits, Fixed(port25_common::maps::EXBITS_WORDS);
            }
        }
    };
}
pub(crate) use map_list;

/// Maps the kernel object declares that are not policy: never in [`MAPS`], never in
/// `maps/`. `P25_SCRATCH` is the verifier's scratch slot (`Frame::forget`), private to each
/// load; `P25_TRACKTMP` is offender tracking's scratch (its structs do not fit the stack),
/// pinned beside the programs kept for the next start (`bpf::kept`), private to the load
/// with the kernel log;
/// `AYA_LOGS` (aya-log's ring), `P25_KLOG` (a message being staged) and the program arrays
/// `P25_KLOG_XDP`/`P25_KLOG_TC` carry the kernel log (`daemon --kernel-log`, `bpf::klog`):
/// unpinned, those arrays are emptied by the kernel when the daemon that filled them exits.
pub const KERNEL_PRIVATE: [&str; 6] = [
    "P25_SCRATCH",
    "P25_TRACKTMP",
    "AYA_LOGS",
    "P25_KLOG",
    "P25_KLOG_XDP",
    "P25_KLOG_TC",
];

/// Where a map's writes go in an apply, so that no moment of it opens port 25.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Not policy: the settings record (the apply writes it between the stages) and the
    /// counters (the kernel's).
    Other,
    /// Entries that close (blocked ports, enforced ranges): added first, removed last.
    Restrict,
    /// Entries that open (mail servers, exempt): removed before added; an exempt entry that
    /// closes its address (a blocked user's session) is added before anything is removed.
    Allow,
}

/// How many entries a map holds.
#[derive(Clone, Copy)]
pub enum Capacity {
    /// Set by the kernel declaration; the config cannot change it.
    Fixed(u32),
    /// Set at load from a field of the config (its key, as an operator writes it, and how
    /// to read it): the key is what a "map full" error tells the operator to raise.
    Limit(&'static str, fn(&Limits) -> u32),
}

/// One entry of the list, as data.
#[derive(Clone, Copy)]
pub struct MapDef {
    pub name: &'static str,
    pub stage: Stage,
    pub capacity: Capacity,
    /// The layout the kernel declaration must have (checked against the object in tests).
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub flags: u32,
}

/// The kernel layout of an aya map type, as our kernel declarations make it.
pub trait Declared {
    const MAP_TYPE: bpf_map_type;
    const KEY_SIZE: usize;
    const VALUE_SIZE: usize;
    const FLAGS: u32;
}

impl<V: Pod> Declared for decl::Arr<V> {
    const MAP_TYPE: bpf_map_type = bpf_map_type::BPF_MAP_TYPE_ARRAY;
    const KEY_SIZE: usize = 4;
    const VALUE_SIZE: usize = size_of::<V>();
    const FLAGS: u32 = 0;
}

impl<V: Pod> Declared for decl::PerCpu<V> {
    const MAP_TYPE: bpf_map_type = bpf_map_type::BPF_MAP_TYPE_PERCPU_ARRAY;
    const KEY_SIZE: usize = 4;
    const VALUE_SIZE: usize = size_of::<V>();
    const FLAGS: u32 = 0;
}

/// LPM tries need `BPF_F_NO_PREALLOC`; the key is the prefix length, then the address.
impl<K: Pod, V: Pod> Declared for decl::Trie<K, V> {
    const MAP_TYPE: bpf_map_type = bpf_map_type::BPF_MAP_TYPE_LPM_TRIE;
    const KEY_SIZE: usize = 4 + size_of::<K>();
    const VALUE_SIZE: usize = size_of::<V>();
    const FLAGS: u32 = BPF_F_NO_PREALLOC;
}

/// Policy hashes are sized for a million entries and mostly empty: not preallocated.
impl<K: Pod, V: Pod> Declared for decl::Hash<K, V> {
    const MAP_TYPE: bpf_map_type = bpf_map_type::BPF_MAP_TYPE_HASH;
    const KEY_SIZE: usize = size_of::<K>();
    const VALUE_SIZE: usize = size_of::<V>();
    const FLAGS: u32 = BPF_F_NO_PREALLOC;
}

/// The offender-tracking LRU hash (a hash map to aya, an LRU to the kernel).
pub struct Lru<K, V>(pub aya::maps::HashMap<aya::maps::MapData, K, V>);

impl<K: Pod, V: Pod> TryFrom<aya::maps::Map> for Lru<K, V> {
    type Error = aya::maps::MapError;
    fn try_from(m: aya::maps::Map) -> Result<Self, Self::Error> {
        // aya takes a plain hash too; the pinned layout check tells them apart.
        Ok(Lru(m.try_into()?))
    }
}

/// Preallocated (the LRU's own free lists), so the kernel's insert never allocates.
impl<K: Pod, V: Pod> Declared for Lru<K, V> {
    const MAP_TYPE: bpf_map_type = bpf_map_type::BPF_MAP_TYPE_LRU_HASH;
    const KEY_SIZE: usize = size_of::<K>();
    const VALUE_SIZE: usize = size_of::<V>();
    const FLAGS: u32 = 0;
}

/// The block-event ring buffer; its "entries" are its size in bytes.
pub struct Ring(pub aya::maps::RingBuf<aya::maps::MapData>);

impl TryFrom<aya::maps::Map> for Ring {
    type Error = aya::maps::MapError;
    fn try_from(m: aya::maps::Map) -> Result<Self, Self::Error> {
        Ok(Ring(m.try_into()?))
    }
}

impl Declared for Ring {
    const MAP_TYPE: bpf_map_type = bpf_map_type::BPF_MAP_TYPE_RINGBUF;
    const KEY_SIZE: usize = 0;
    const VALUE_SIZE: usize = 0;
    const FLAGS: u32 = 0;
}

/// The exempt filter: an array the daemon maps into its memory.
impl Declared for Bits {
    const MAP_TYPE: bpf_map_type = bpf_map_type::BPF_MAP_TYPE_ARRAY;
    const KEY_SIZE: usize = 4;
    const VALUE_SIZE: usize = 8;
    const FLAGS: u32 = aya_obj::generated::BPF_F_MMAPABLE;
}

/// A program array (the tracking programs' slot).
pub struct Progs(pub aya::maps::ProgramArray<aya::maps::MapData>);

impl TryFrom<aya::maps::Map> for Progs {
    type Error = aya::maps::MapError;
    fn try_from(m: aya::maps::Map) -> Result<Self, Self::Error> {
        Ok(Progs(m.try_into()?))
    }
}

impl Declared for Progs {
    const MAP_TYPE: bpf_map_type = bpf_map_type::BPF_MAP_TYPE_PROG_ARRAY;
    const KEY_SIZE: usize = 4;
    const VALUE_SIZE: usize = 4;
    const FLAGS: u32 = 0;
}

const fn def<T: Declared>(name: &'static str, stage: Stage, capacity: Capacity) -> MapDef {
    MapDef {
        name,
        stage,
        capacity,
        map_type: T::MAP_TYPE as u32,
        key_size: T::KEY_SIZE as u32,
        value_size: T::VALUE_SIZE as u32,
        flags: T::FLAGS,
    }
}

macro_rules! map_defs {
    (
        $sf:ident: $sn:ident = $st:ty;
        policy { $( $stage:ident { $( $f:ident: $n:ident = $t:ty, $cap:expr $(, $slot:ident)?; )* } )* }
        $cf:ident: $cn:ident = $ct:ty, $ccap:expr;
        abuse { $( $af:ident: $an:ident = $at:ty, $acap:expr; )* }
    ) => {
        /// Every pinned map, settings first, then policy, counters and the abuse maps.
        pub const MAPS: &[MapDef] = &[
            def::<$st>(port25_common::maps::$sn, Stage::Other, Fixed(1)),
            $( $( def::<$t>(port25_common::maps::$n, Stage::$stage, $cap), )* )*
            def::<$ct>(port25_common::maps::$cn, Stage::Other, $ccap),
            $( def::<$at>(port25_common::maps::$an, Stage::Other, $acap), )*
        ];
    };
}
use decl::*;
map_list!(map_defs);

/// Every pinned map's name (= pin file name).
pub const ALL_MAPS: [&str; MAPS.len()] = {
    let mut out = [""; MAPS.len()];
    let mut i = 0;
    while i < MAPS.len() {
        out[i] = MAPS[i].name;
        i += 1;
    }
    out
};

/// The list's entry for a map name.
pub fn def_of(name: &str) -> Option<&'static MapDef> {
    MAPS.iter().find(|d| d.name == name)
}

/// The capacity the config asks for, for the maps whose size it sets.
pub fn capacity(name: &str, l: &Limits) -> Option<u32> {
    match def_of(name)?.capacity {
        Capacity::Limit(_, f) => Some(f(l)),
        Capacity::Fixed(_) => None,
    }
}

/// The one "map full" check: `n` entries in a map of capacity `cap`. Every path that
/// writes a map (full apply, per-change update, start, reload) calls it before its first
/// write, so a full map fails the whole change and nothing is half applied.
pub fn fits(name: &str, n: usize, cap: u32) -> Result<()> {
    if n > cap as usize {
        let raise = match def_of(name).map(|d| d.capacity) {
            Some(Capacity::Limit(key, _)) => format!("; raise {key}"),
            _ => String::new(),
        };
        return Err(MapFull {
            name: name.to_string(),
            n,
            cap,
            raise,
        }
        .into());
    }
    Ok(())
}

/// What [`fits`] refuses: typed, so the control socket answers it as a refusal (the same
/// change fails again until the config's `limits` grow), not as the daemon failing.
#[derive(Debug, thiserror::Error)]
#[error(
    "{name}: {n} entries do not fit its capacity of {cap} (map full{raise}); nothing was changed"
)]
pub struct MapFull {
    pub name: String,
    pub n: usize,
    pub cap: u32,
    /// "; raise limits.KEY" for a map the config sizes, empty for a fixed one.
    pub raise: String,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::bpf::datapath::EBPF_OBJECT;

    fn object() -> Option<aya_obj::Object> {
        if EBPF_OBJECT.is_empty() {
            eprintln!("skipped: built with AYA_BUILD_SKIP, no kernel object");
            return None;
        }
        Some(aya_obj::Object::parse(EBPF_OBJECT).expect("parse the embedded object"))
    }

    /// The object's maps, less the sections aya turns into maps (`.rodata`, `.bss`, ...).
    fn declared(obj: &aya_obj::Object) -> BTreeSet<String> {
        obj.maps
            .keys()
            .filter(|n| !n.starts_with('.'))
            .cloned()
            .collect()
    }

    #[test]
    fn the_kernel_declares_exactly_the_listed_maps() {
        let Some(obj) = object() else { return };
        let listed: BTreeSet<String> = ALL_MAPS
            .iter()
            .chain(KERNEL_PRIVATE.iter())
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            declared(&obj),
            listed,
            "port25-ebpf/src/maps.rs and bpf::maps::map_list! must name the same maps"
        );
    }

    #[test]
    fn kernel_declarations_have_the_listed_layouts() {
        let Some(obj) = object() else { return };
        let defaults = Limits::default();
        for d in MAPS {
            let map = &obj.maps[d.name];
            let max_entries = match d.capacity {
                Capacity::Fixed(n) => n,
                Capacity::Limit(_, f) => f(&defaults),
            };
            let have = (
                map.map_type(),
                map.key_size(),
                map.value_size(),
                map.max_entries(),
                map.map_flags(),
            );
            let want = (d.map_type, d.key_size, d.value_size, max_entries, d.flags);
            assert_eq!(
                have, want,
                "{}: kernel declaration (type, key, value, max_entries, flags) differs from the list",
                d.name
            );
        }
    }

    /// The same, as the kernel creates them: the object loaded (maps only, nothing pinned).
    #[test]
    fn maps_the_kernel_creates_have_the_listed_layouts() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to create maps");
            return;
        }
        if EBPF_OBJECT.is_empty() {
            return;
        }
        let ebpf = aya::EbpfLoader::new()
            .load(EBPF_OBJECT)
            .expect("load the object");
        let created: BTreeSet<String> = ebpf
            .maps()
            .map(|(n, _)| n.to_string())
            .filter(|n| !n.starts_with('.'))
            .collect();
        let listed: BTreeSet<String> = ALL_MAPS
            .iter()
            .chain(KERNEL_PRIVATE.iter())
            .map(|s| s.to_string())
            .collect();
        assert_eq!(created, listed);
        let defaults = Limits::default();
        for d in MAPS {
            let map = ebpf.map(d.name).unwrap();
            let info = map_data(map).info().expect("map info");
            let max_entries = match d.capacity {
                Capacity::Fixed(n) => n,
                Capacity::Limit(_, f) => f(&defaults),
            };
            let have = (
                info.map_type().map(|t| t as u32).expect("known map type"),
                info.key_size(),
                info.value_size(),
                info.max_entries(),
                info.map_flags(),
            );
            let want = (d.map_type, d.key_size, d.value_size, max_entries, d.flags);
            assert_eq!(have, want, "{}: created map differs from the list", d.name);
        }
    }

    fn map_data(map: &aya::maps::Map) -> &aya::maps::MapData {
        use aya::maps::Map;
        match map {
            Map::Array(d)
            | Map::PerCpuArray(d)
            | Map::LpmTrie(d)
            | Map::HashMap(d)
            | Map::PerCpuHashMap(d)
            | Map::LruHashMap(d)
            | Map::ProgramArray(d)
            | Map::RingBuf(d) => d,
            other => panic!("a map type the list does not use: {other:?}"),
        }
    }

    #[test]
    fn only_the_config_sets_the_sizes_of_limit_maps() {
        let l = Limits {
            exempt_ips: 7,
            ..Limits::default()
        };
        assert_eq!(capacity(port25_common::maps::EXIP6, &l), Some(7));
        assert_eq!(capacity(port25_common::maps::PORTS, &l), None);
        assert!(fits("X", 7, 7).is_ok());
        let e = fits("X", 8, 7).unwrap_err().to_string();
        assert!(e.contains("map full"), "{e}");
        // A map the config sizes names the key to raise; a fixed one has none to name.
        let e = fits(port25_common::maps::EXIP4, 8, 7)
            .unwrap_err()
            .to_string();
        assert!(e.contains("(map full; raise limits.exempt_ips)"), "{e}");
        let e = fits(port25_common::maps::OFFENDERS, 8, 7)
            .unwrap_err()
            .to_string();
        assert!(e.contains("raise abuse.track_sources"), "{e}");
        let e = fits(port25_common::maps::PORTS, 70000, 65536)
            .unwrap_err()
            .to_string();
        assert!(e.contains("(map full); nothing"), "{e}");
    }
}
