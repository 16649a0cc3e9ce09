//! The pinned maps, opened by path: read by `check` and `status`, written by the daemon.

use std::collections::BTreeMap;

use anyhow::{anyhow, Context as _, Result};
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, Map, MapData, MapError},
    Pod,
};
use port25_common::{
    maps::{self as m, Exempt, NetKey6, Settings},
    verdict::Maps,
    Reason,
};

use crate::bpf::{
    maps::{decl::*, map_list},
    pins::Pins,
};

macro_rules! live_maps {
    (
        $sf:ident: $sn:ident = $st:ty;
        policy { $( $stage:ident { $( $f:ident: $n:ident = $t:ty, $cap:expr $(, $slot:ident)?; )* } )* }
        $cf:ident: $cn:ident = $ct:ty, $ccap:expr;
        abuse { $( $af:ident: $an:ident = $at:ty, $acap:expr; )* }
    ) => {
        /// Every pinned map, opened: one field per entry of the map list. The abuse maps
        /// are `None` in a pin tree an older port25 wrote (until the daemon's next start).
        pub struct LiveMaps {
            pub $sf: $st,
            $( $( pub $f: $t, )* )*
            pub $cf: $ct,
            $( pub $af: Option<$at>, )*
        }

        impl LiveMaps {
            pub fn open(pins: &Pins) -> Result<LiveMaps> {
                Ok(LiveMaps {
                    $sf: open(pins, m::$sn)?,
                    $( $( $f: open(pins, m::$n)?, )* )*
                    $cf: open(pins, m::$cn)?,
                    $( $af: open_optional(pins, m::$an)?, )*
                })
            }

            /// (map name, capacity) for every policy map.
            pub fn capacities(&self) -> Vec<(&'static str, u32)> {
                vec![ $( $( (m::$n, self.$f.capacity()), )* )* ]
            }

            /// (map name, entries, capacity) for every policy map.
            pub fn fill(&self) -> Result<Vec<(&'static str, usize, u32)>> {
                Ok(vec![
                    $( $( (m::$n, self.$f.entry_count()?, self.$f.capacity()), )* )*
                ])
            }
        }
    };
}
map_list!(live_maps);

/// A map a pin tree of an older version may lack.
fn open_optional<T>(pins: &Pins, name: &str) -> Result<Option<T>>
where
    T: TryFrom<Map, Error = MapError>,
{
    if !pins.map(name).exists() {
        return Ok(None);
    }
    open(pins, name).map(Some)
}

/// A policy map's contents as a plain collection: what `policy::Desired` holds per map.
pub type Contents<T> = BTreeMap<<T as Table>::K, <T as Table>::V>;

fn open<T>(pins: &Pins, name: &str) -> Result<T>
where
    T: TryFrom<Map, Error = MapError>,
{
    let path = pins.map(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "opening pinned map {} (is port25 loaded? `port25-ctl daemon` pins it)",
            path.display()
        )
    })?;
    let map = Map::from_map_data(data).map_err(|e| anyhow!("{name}: {e}"))?;
    T::try_from(map).map_err(|e| anyhow!("pinned map {name} has an unexpected type: {e}"))
}

impl LiveMaps {
    /// Packets per reason, summed over CPUs. A counter map pinned by an older version has
    /// fewer entries (until the daemon migrates it at start): only the reasons it has.
    pub fn counters(&self) -> Result<Vec<(Reason, u64)>> {
        let len = self.counters.len();
        Reason::ALL
            .iter()
            .filter(|r| (**r as u32) < len)
            .map(|r| {
                let per_cpu = self
                    .counters
                    .get(&(*r as u32), 0)
                    .with_context(|| format!("reading counter {}", r.name()))?;
                Ok((*r, per_cpu.iter().sum()))
            })
            .collect()
    }
}

/// `CLOCK_BOOTTIME`, the clock `bpf_ktime_get_boot_ns` reads.
pub fn boot_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).expect("CLOCK_BOOTTIME");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// A policy map seen as a key-value table, so one diff routine serves every map.
pub trait Table {
    type K: Ord + Copy + std::fmt::Debug;
    type V: PartialEq + Copy;
    fn entries(&self) -> Result<BTreeMap<Self::K, Self::V>>;
    fn put(&mut self, k: Self::K, v: Self::V) -> Result<()>;
    /// Writes every entry (distinct keys, in no order that matters); a failure leaves some
    /// written (here, the ones before it; a hash map's batch write, any of them).
    fn put_all(&mut self, entries: &[(Self::K, Self::V)]) -> Result<()> {
        for (k, v) in entries {
            self.put(*k, *v).with_context(|| format!("writing {k:?}"))?;
        }
        Ok(())
    }
    fn del(&mut self, k: Self::K) -> Result<()>;
    fn capacity(&self) -> u32;
    /// How many entries it holds (`fill`: `status`, `/metrics`).
    fn entry_count(&self) -> Result<usize> {
        Ok(self.entries()?.len())
    }
}

/// A delete of a key that is not there has done its job (the maps may have drifted).
fn absent_ok(r: Result<(), MapError>) -> Result<()> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => Ok(r?),
    }
}

/// The kernel's own "operation not supported" (not in libc): a map type without batch calls.
const ENOTSUPP: i32 = 524;

fn full(e: MapError, what: &str) -> anyhow::Error {
    if let MapError::SyscallError(s) = &e {
        if s.io_error.raw_os_error() == Some(libc::E2BIG) {
            return anyhow!("{what}: map full");
        }
    }
    anyhow!("{what}: {e}")
}

fn info_capacity(d: &MapData) -> u32 {
    d.info().map(|i| i.max_entries()).unwrap_or(0)
}

/// The blocked-ports array: index = port, non-zero = blocked. Absent = 0.
impl Table for Array<MapData, u8> {
    type K = u16;
    type V = u8;
    fn entries(&self) -> Result<BTreeMap<u16, u8>> {
        // 65,536 ports in 8 batch calls rather than a lookup each (a start's and each
        // reconcile's read).
        if let Ok(all) = crate::bpf::sys::lookup_all::<u32, u8>(aya::maps::IterableMap::map(self)) {
            return Ok(all
                .into_iter()
                .filter(|(_, v)| *v != 0)
                .filter_map(|(i, v)| Some((u16::try_from(i).ok()?, v)))
                .collect());
        }
        tracing::debug!("the ports array read index by index: no batch read here");
        let mut out = BTreeMap::new();
        for (i, v) in self.iter().enumerate() {
            let v = v?;
            if v != 0 {
                out.insert(i as u16, v);
            }
        }
        Ok(out)
    }
    fn put(&mut self, k: u16, v: u8) -> Result<()> {
        Ok(self.set(k as u32, v, 0)?)
    }
    fn del(&mut self, k: u16) -> Result<()> {
        Ok(self.set(k as u32, 0, 0)?)
    }
    fn capacity(&self) -> u32 {
        m::PORTS_ENTRIES
    }
}

impl<const N: usize, V: Pod + PartialEq> Table for LpmTrie<MapData, [u8; N], V>
where
    [u8; N]: Pod + Ord,
{
    type K = ([u8; N], u32);
    type V = V;
    fn entries(&self) -> Result<BTreeMap<([u8; N], u32), V>> {
        let mut out = BTreeMap::new();
        for kv in self.iter() {
            let (k, v) = kv?;
            out.insert((k.data(), k.prefix_len()), v);
        }
        Ok(out)
    }
    fn put(&mut self, k: ([u8; N], u32), v: V) -> Result<()> {
        self.insert(&Key::new(k.1, k.0), v, 0)
            .map_err(|e| full(e, "insert"))
    }
    fn del(&mut self, k: ([u8; N], u32)) -> Result<()> {
        absent_ok(self.remove(&Key::new(k.1, k.0)))
    }
    fn capacity(&self) -> u32 {
        info_capacity(aya::maps::IterableMap::map(self))
    }
}

impl<K: Pod + Ord + Sync + std::fmt::Debug, V: Pod + PartialEq + Sync> Table
    for HashMap<MapData, K, V>
{
    type K = K;
    type V = V;
    fn entries(&self) -> Result<BTreeMap<K, V>> {
        // A million exempt entries are read in ~130 batch calls instead of 2M lookups.
        if let Ok(mut all) = crate::bpf::sys::lookup_all::<K, V>(aya::maps::IterableMap::map(self))
        {
            // Keys are unique in a hash map: an unstable sort, then the tree is built from
            // sorted entries (collecting the hash order sorted it stably: a tenth of a start).
            all.sort_unstable_by_key(|(k, _)| *k);
            return Ok(all.into_iter().collect());
        }
        hash_entries_one_by_one(self)
    }
    fn entry_count(&self) -> Result<usize> {
        let map = aya::maps::IterableMap::map(self);
        if let Ok(n) = crate::bpf::sys::count_all(map, size_of::<K>(), size_of::<V>()) {
            return Ok(n);
        }
        Ok(hash_entries_one_by_one(self)?.len())
    }
    fn put(&mut self, k: K, v: V) -> Result<()> {
        self.insert(k, v, 0).map_err(|e| full(e, "insert"))
    }
    fn put_all(&mut self, entries: &[(K, V)]) -> Result<()> {
        let map = aya::maps::IterableMap::map(self);
        match crate::bpf::sys::update_batch(map, entries) {
            Ok(()) => Ok(()),
            Err((_, e)) if e.raw_os_error() == Some(libc::E2BIG) => {
                Err(anyhow!("insert: map full"))
            }
            // Kernels without batch writes: one at a time, from where it stopped (none
            // was written: the call is refused before it starts).
            Err((done, e))
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(ENOTSUPP)
                ) && done == 0 =>
            {
                for (k, v) in entries {
                    self.put(*k, *v).with_context(|| format!("writing {k:?}"))?;
                }
                Ok(())
            }
            Err((done, e)) => Err(anyhow!("insert (batch, after {done} entries): {e}")),
        }
    }
    fn del(&mut self, k: K) -> Result<()> {
        absent_ok(self.remove(&k))
    }
    fn capacity(&self) -> u32 {
        info_capacity(aya::maps::IterableMap::map(self))
    }
}

/// The fallback for kernels without batch lookups (and the bench's baseline).
pub fn hash_entries_one_by_one<K: Pod + Ord, V: Pod>(
    map: &HashMap<MapData, K, V>,
) -> Result<BTreeMap<K, V>> {
    let mut out = BTreeMap::new();
    for kv in map.iter() {
        let (k, v) = kv?;
        out.insert(k, v);
    }
    Ok(out)
}

/// The live maps answer the verdict's lookups, so `check` runs the kernel's own decision.
impl Maps for LiveMaps {
    type Settings<'a> = port25_common::verdict::Owned;
    fn settings(&self) -> Option<port25_common::verdict::Owned> {
        self.settings
            .get(&0, 0)
            .ok()
            .map(port25_common::verdict::Owned)
    }
    fn port_blocked(&self, port: u16) -> bool {
        matches!(self.ports.get(&(port as u32), 0), Ok(v) if v != 0)
    }
    fn in_ranges4(&self, a: [u8; 4]) -> bool {
        self.ranges4.get(&Key::new(32, a), 0).is_ok()
    }
    fn in_ranges6(&self, a: [u8; 16]) -> bool {
        self.ranges6.get(&Key::new(128, a), 0).is_ok()
    }
    fn mail_server4(&self, a: [u8; 4]) -> bool {
        self.mail4.get(&Key::new(32, a), 0).is_ok()
    }
    fn mail_server6(&self, a: [u8; 16]) -> bool {
        self.mail6.get(&Key::new(128, a), 0).is_ok()
    }
    fn exempt_ip4(&self, a: [u8; 4]) -> Option<Exempt> {
        self.exip4.get(&a, 0).ok()
    }
    fn exempt_ip6(&self, a: [u8; 16]) -> Option<Exempt> {
        self.exip6.get(&a, 0).ok()
    }
    fn exempt_prefix4(&self, a: [u8; 4]) -> Option<Exempt> {
        self.expfx4.get(&Key::new(32, a), 0).ok()
    }
    fn exempt_prefix6(&self, a: [u8; 16]) -> Option<Exempt> {
        self.expfx6.get(&Key::new(128, a), 0).ok()
    }
    fn exempt_net6(&self, key: &NetKey6) -> Option<Exempt> {
        self.exnet6.get(key, 0).ok()
    }
    fn filter_word(&self, index: u32) -> Option<u64> {
        use crate::bpf::exbits::FilterCell as _;
        self.exbits.as_ref().map(|b| b.load(index))
    }
    fn now_ns(&self) -> u64 {
        boot_ns()
    }
}
