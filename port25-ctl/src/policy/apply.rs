//! Writing the desired state to the maps, in an order that never opens port 25 on the way.
//!
//! Every map's writes follow its stage in the map list ([`Stage`]): additions that restrict
//! (blocked ports, enforced ranges) go first and their removals last. Allow maps (mail
//! servers, exempt): exempt entries that close an address (a blocked user's session) go in
//! before anything is removed; then (when old and new prefix lengths are probed together)
//! the settings and the bindings in the exempt tries ([`Class::Hiding`]), removals of
//! entries that open (the operator's before bindings), the settings otherwise, removals of
//! entries that close, and last additions that open. The test module `order` checks every
//! write of both paths against the reference model. A change that would overfill any map
//! is refused before the first write ([`crate::bpf::maps::fits`]), so a full map fails the
//! whole change and nothing is half applied.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use port25_common::maps::{self as m, Exempt, Settings, LISTED_MASK, PROBED_PREFIX_LENS};

use crate::{
    bpf::{
        exbits::{self, FilterCell},
        livemaps::{LiveMaps, Table},
        maps::{decl::*, fits, map_list, Stage, ALL_MAPS},
    },
    policy::{
        desired::Desired,
        slot::{closes, Slot},
    },
};

/// How many map writes an apply made; on a reconcile, each one is repaired drift.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub writes: usize,
}

/// Makes the maps equal to `want`, reading them first (start, reload, reconcile).
pub fn apply(live: &mut LiveMaps, want: &Desired) -> Result<Applied> {
    apply_from(live, None, want)
}

/// Moves the maps from `have` (the state last applied) to `want` without reading them: the
/// per-change path. Drift from `have` is left to the periodic reconcile.
pub fn apply_delta(live: &mut LiveMaps, have: &Desired, want: &Desired) -> Result<Applied> {
    apply_from(live, Some(have), want)
}

/// What writing or removing an entry can do to port 25 for the addresses it covers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Class {
    /// A blocked user's session entry: closes its address.
    Closing,
    /// A user's binding in an exempt trie: it opens addresses that have no session entry,
    /// and for a blocked session's address it can only hide a shorter operator exempt (the
    /// verdict sees the longest match only) or, removed, reveal one.
    Hiding,
    /// Everything else: opens (the operator's exempts, live sessions, mail servers).
    Opening,
}

/// A value's [`Class`] in a map; `trie`: one of the exempt tries.
trait Classify {
    fn class(&self, trie: bool) -> Class;
}

impl Classify for u8 {
    fn class(&self, _: bool) -> Class {
        Class::Opening
    }
}

impl Classify for Exempt {
    fn class(&self, trie: bool) -> Class {
        class(self, trie)
    }
}

fn class(e: &Exempt, trie: bool) -> Class {
    if closes(e) {
        Class::Closing
    } else if trie && !e.operator() {
        Class::Hiding
    } else {
        Class::Opening
    }
}

/// What one map needs: entries to write (new or changed) and keys to delete, each with
/// the class of the value it removes.
struct Diff<K, V> {
    put: Vec<(K, V)>,
    del: Vec<(K, Class)>,
}

/// Which of a diff's additions or removals a step makes: by the class of the value written
/// (or removed).
#[derive(Clone, Copy)]
enum Puts {
    All,
    Only(Class),
}

impl Puts {
    fn takes(self, c: Class) -> bool {
        match self {
            Puts::All => true,
            Puts::Only(x) => x == c,
        }
    }
}

/// One map's pending change with the map borrowed to make it, so that one loop per step of
/// the apply serves every map.
trait Pending {
    fn stage(&self) -> Stage;
    fn put(&mut self, which: Puts) -> Result<usize>;
    fn del(&mut self, which: Puts) -> Result<usize>;
}

struct MapDiff<'a, T: Table + ?Sized> {
    name: &'static str,
    stage: Stage,
    map: &'a mut T,
    /// An exempt trie, where an entry can hide another ([`Class::Hiding`]).
    trie: bool,
    diff: Diff<T::K, T::V>,
}

impl<'a, T: Table + ?Sized> MapDiff<'a, T>
where
    T::V: Classify,
{
    /// `known`: what the map holds, when the caller knows it (the last applied state);
    /// `None` reads the map (a reconcile, which also finds drift). Refuses a change whose
    /// peak does not fit: restrict maps remove last; allow maps take the entries that close
    /// an address (and bindings in the tries) before any removal and the rest after them,
    /// so their peak is the larger of those two moments.
    fn new(
        map: &'a mut T,
        name: &'static str,
        trie: bool,
        stage: Stage,
        want: &BTreeMap<T::K, T::V>,
        known: Option<&BTreeMap<T::K, T::V>>,
    ) -> Result<Self> {
        let read;
        let have = match known {
            Some(k) => k,
            None => {
                read = map.entries().with_context(|| format!("reading {name}"))?;
                &read
            }
        };
        // Both sides in key order: one merge pass instead of a tree search per entry (a
        // restart compares two million entries).
        let (mut put, mut del) = (Vec::new(), Vec::new());
        let (mut new, mut new_early) = (0, 0);
        let (mut w, mut h) = (want.iter().peekable(), have.iter().peekable());
        loop {
            match (w.peek(), h.peek()) {
                (Some((wk, wv)), Some((hk, hv))) if wk == hk => {
                    if wv != hv {
                        put.push((**wk, **wv));
                    }
                    w.next();
                    h.next();
                }
                (Some((wk, wv)), hk) if hk.is_none_or(|(hk, _)| wk < hk) => {
                    put.push((**wk, **wv));
                    new += 1;
                    if wv.class(trie) != Class::Opening {
                        new_early += 1;
                    }
                    w.next();
                }
                (_, Some((hk, hv))) => {
                    del.push((**hk, hv.class(trie)));
                    h.next();
                }
                (None, None) => break,
                (Some(_), None) => unreachable!("taken by the arm above"),
            }
        }
        let peak = match stage {
            Stage::Allow => (have.len() + new_early).max(have.len() - del.len() + new),
            _ => have.len() + new,
        };
        fits(name, peak, map.capacity())?;
        Ok(MapDiff {
            name,
            stage,
            map,
            trie,
            diff: Diff { put, del },
        })
    }
}

impl<T: Table + ?Sized> Pending for MapDiff<'_, T>
where
    T::V: Classify,
{
    fn stage(&self) -> Stage {
        self.stage
    }

    fn put(&mut self, which: Puts) -> Result<usize> {
        // One step's entries in one call: a hash map takes them by batch.
        let step: Vec<(T::K, T::V)> = self
            .diff
            .put
            .iter()
            .filter(|(_, v)| which.takes(v.class(self.trie)))
            .copied()
            .collect();
        self.map
            .put_all(&step)
            .with_context(|| format!("{}: writing {} entries", self.name, step.len()))?;
        Ok(step.len())
    }

    fn del(&mut self, which: Puts) -> Result<usize> {
        let mut n = 0;
        for (k, class) in &self.diff.del {
            if which.takes(*class) {
                self.map
                    .del(*k)
                    .with_context(|| format!("{}: deleting {k:?}", self.name))?;
                n += 1;
            }
        }
        Ok(n)
    }
}

/// The settings record as the apply reads and writes it.
pub trait SettingsCell {
    fn read(&self) -> Option<Settings>;
    fn write(&mut self, s: Settings) -> Result<()>;
}

impl SettingsCell for Arr<Settings> {
    fn read(&self) -> Option<Settings> {
        self.get(&0, 0).ok()
    }
    fn write(&mut self, s: Settings) -> Result<()> {
        self.set(0, s, 0).context("writing settings")
    }
}

macro_rules! per_map {
    (
        $sf:ident: $sn:ident = $st:ty;
        policy { $( $stage:ident { $( $f:ident: $n:ident = $t:ty, $cap:expr $(, $slot:ident)?; )* } )* }
        $cf:ident: $cn:ident = $ct:ty, $ccap:expr;
        abuse { $( $af:ident: $an:ident = $at:ty, $acap:expr; )* }
    ) => {
        /// Every map an apply writes, as tables: the live maps ([`LiveMaps::tables`]), or
        /// plain collections in the test that checks the order against the reference model.
        pub struct Tables<'a> {
            pub $sf: &'a mut dyn SettingsCell,
            $( $( pub $f: &'a mut dyn Table<K = <$t as Table>::K, V = <$t as Table>::V>, )* )*
            /// The exempt filter (absent from an older pin tree, where the datapath that
            /// reads it is not loaded either).
            pub filter: Option<&'a dyn FilterCell>,
        }

        impl LiveMaps {
            pub fn tables(&mut self) -> Tables<'_> {
                let LiveMaps { $sf, $( $( $f, )* )* exbits, .. } = self;
                let filter = exbits.as_ref().map(|b| b as &dyn FilterCell);
                Tables { $sf, $( $( $f, )* )* filter }
            }
        }

        impl Tables<'_> {
            /// Writes the entries, map by map in list order, each map's in one call (a hash
            /// map takes them by batch: a `session sync` writes 100,000), as a full apply's
            /// step does.
            fn put_slots<'s>(
                &mut self,
                entries: impl Iterator<Item = (&'s Slot, Exempt)>,
            ) -> Result<()> {
                $( $( $( let mut $f: Vec<(<$t as Table>::K, Exempt)> = Vec::new(); let _ = stringify!($slot); )? )* )*
                for (s, v) in entries {
                    match s {
                        $( $( $( Slot::$slot(k) => $f.push((*k, v)), )? )* )*
                    }
                }
                $( $( $(
                    let _ = stringify!($slot);
                    if !$f.is_empty() {
                        self.$f
                            .put_all(&$f)
                            .with_context(|| format!("{}: writing {} entries", m::$n, $f.len()))?;
                    }
                )? )* )*
                Ok(())
            }

            fn del_slot(&mut self, s: &Slot) -> Result<()> {
                match s {
                    $( $( $( Slot::$slot(k) => self.$f.del(*k), )? )* )*
                }
            }
        }

        /// Every policy map's diff, in list order, computed before anything is written (a
        /// map that would overflow stops the change here), and the settings map beside them.
        fn diff_all<'a>(
            t: Tables<'a>,
            known: Option<&Desired>,
            want: &Desired,
        ) -> Result<(&'a mut dyn SettingsCell, Vec<Box<dyn Pending + 'a>>)> {
            let Tables { $sf, $( $( $f, )* )* filter: _ } = t;
            let maps: Vec<Box<dyn Pending + 'a>> = vec![
                $( $(
                    Box::new(MapDiff::new($f, m::$n, trie(m::$n), Stage::$stage, &want.$f, known.map(|k| &k.$f))?),
                )* )*
            ];
            Ok(($sf, maps))
        }

        /// What the maps hold, as one state: a start reads it beside the registry and then
        /// writes only the difference ([`apply_delta`]), as [`apply`] would.
        pub fn read_state(live: &LiveMaps) -> Result<Desired> {
            Ok(Desired {
                $sf: live.$sf.read().unwrap_or_default(),
                $( $( $f: live.$f.entries().with_context(|| format!("reading {}", m::$n))?, )* )*
            })
        }

        /// Refuses a state that cannot fit the maps, before anything is written or committed.
        pub fn check_fits(live: &LiveMaps, want: &Desired) -> Result<()> {
            $( $( fits(m::$n, want.$f.len(), live.$f.capacity())?; )* )*
            Ok(())
        }
    };
}
map_list!(per_map);

/// The exempt tries: the maps where the verdict sees only the longest match, so a longer
/// entry can hide a shorter one from a blocked session's address.
fn trie(name: &str) -> bool {
    name == m::EXPFX4 || name == m::EXPFX6
}

fn apply_from(live: &mut LiveMaps, known: Option<&Desired>, want: &Desired) -> Result<Applied> {
    apply_to(live.tables(), known, want)
}

/// The apply's order of writes, over any tables.
fn apply_to(t: Tables<'_>, known: Option<&Desired>, want: &Desired) -> Result<Applied> {
    let old = match known {
        Some(k) => Some(k.settings),
        None => t.settings.read(),
    };
    // What the settings record holds, for the writes; `old` below, for what must be probed.
    let held = old;
    let old = match old {
        Some(o) if !probes_all(with_lens_of(want.settings, Some(o)), Some(o)) => {
            let present = match known {
                Some(k) => lengths_of(k.exnet6.keys()),
                None => lengths_of(
                    t.exnet6
                        .entries()
                        .context("reading the session prefixes")?
                        .keys(),
                ),
            };
            Some(named_in_use(o, &present))
        }
        o => o,
    };
    // Every hash key the change writes has its filter bit before the first write.
    let filter = t.filter;
    if let Some(f) = filter {
        exbits::grow_to(f, want);
    }
    let (settings, mut maps) = diff_all(t, known, want)?;
    // Enforcing a whole family is the restrictive direction: early on, a family stays
    // narrowed to its listed ranges only if it is narrowed both before and after (one family
    // may narrow while the other widens); the wanted flags follow once the ranges are in.
    let early = Settings {
        flags: (want.settings.flags & !LISTED_MASK)
            | (want.settings.flags & old.map_or(0, |o| o.flags) & LISTED_MASK),
        ..want.settings
    };
    // Session prefix lengths: old and new both probed until the entries have moved, so a
    // blocked session's entry is seen from the moment it is written.
    let early = with_lens_of(early, old);
    // Whether old and new lengths are probed together (no more than the datapath probes).
    let together = probes_all(early, old);
    let mut writes = 0;
    let write_early = |settings: &mut dyn SettingsCell| -> Result<usize> {
        Ok(if held != Some(early) {
            settings.write(early)?;
            1
        } else {
            0
        })
    };
    let all = |maps: &mut [Box<dyn Pending + '_>], stage, del: bool, which| -> Result<usize> {
        let mut n = 0;
        for p in in_stage(maps, stage) {
            n += if del { p.del(which)? } else { p.put(which)? };
        }
        Ok(n)
    };
    use Class::*;
    writes += all(&mut maps, Stage::Restrict, false, Puts::All)?;
    // Blocked sessions' entries close an address, so they go in before anything is deleted.
    writes += all(&mut maps, Stage::Allow, false, Puts::Only(Closing))?;
    if together {
        // Every blocked session's entry, old and new, is seen from here on: a binding can
        // now open only addresses the new state opens, and it goes in before any entry it
        // replaces goes out, so no operator exempt it hides is revealed on the way.
        writes += write_early(&mut *settings)?;
        writes += all(&mut maps, Stage::Allow, false, Puts::Only(Hiding))?;
    }
    // Entries that open go out next, the operator's before the bindings that may hide them:
    // removing an allow never opens an address without a session entry.
    writes += all(&mut maps, Stage::Allow, true, Puts::Only(Opening))?;
    writes += all(&mut maps, Stage::Allow, true, Puts::Only(Hiding))?;
    if !together {
        // More lengths than the datapath probes (only when the settings read are a merged
        // set an apply that stopped halfway left behind: two applied states' lengths always
        // fit): the new set alone is written only now, and
        // an old length that goes out of sight then hides only entries the new state no
        // longer has, with every allow that the new state drops already gone and every
        // closing entry it keeps in place.
        writes += write_early(&mut *settings)?;
    }
    // Removing an entry that closes an address can open it, but only to an allow the new
    // state keeps.
    writes += all(&mut maps, Stage::Allow, true, Puts::Only(Closing))?;
    if !together {
        writes += all(&mut maps, Stage::Allow, false, Puts::Only(Hiding))?;
    }
    writes += all(&mut maps, Stage::Allow, false, Puts::Only(Opening))?;
    if early != want.settings {
        settings.write(want.settings)?;
        writes += 1;
    }
    writes += all(&mut maps, Stage::Restrict, true, Puts::All)?;
    // Every delete is done: the hashes hold `want`'s keys (drift aside, which an apply that
    // read the maps has just removed), so the filter can be exactly their bits, and ready.
    if let Some(f) = filter {
        exbits::trim(f, want);
    }
    Ok(Applied { writes })
}

/// The distinct lengths of session prefix keys.
fn lengths_of<'k>(keys: impl Iterator<Item = &'k m::NetKey6>) -> std::collections::BTreeSet<u8> {
    keys.map(|k| k.prefix_len as u8).collect()
}

/// `old` naming exactly `present` (longest first), when they fit, else `old` as it is.
/// Called with the lengths that have keys: an apply that stopped halfway leaves the settings
/// naming old and new lengths merged, and with the next state's they may be more than the
/// datapath probes; the lengths without a key hide nothing, and dropping them keeps old and
/// new probed together (the order that never shows a blocked session's address a wider
/// exempt while one binding replaces another). Also [`with_lens_of`]'s union of two lists.
fn named_in_use(old: Settings, present: &std::collections::BTreeSet<u8>) -> Settings {
    if present.len() > PROBED_PREFIX_LENS {
        return old;
    }
    let mut out = old;
    out.session_prefix_lens = [0; PROBED_PREFIX_LENS];
    for (i, l) in present.iter().rev().enumerate() {
        out.session_prefix_lens[i] = *l;
    }
    out.session_prefix_count = present.len() as u32;
    out
}

fn lens(s: &Settings) -> &[u8] {
    &s.session_prefix_lens[..(s.session_prefix_count as usize).min(PROBED_PREFIX_LENS)]
}

/// Whether `s` probes every prefix length `old` probes.
fn probes_all(s: Settings, old: Option<Settings>) -> bool {
    old.is_none_or(|o| lens(&o).iter().all(|l| lens(&s).contains(l)))
}

fn in_stage<'m, 'a>(
    maps: &'m mut [Box<dyn Pending + 'a>],
    s: Stage,
) -> impl Iterator<Item = &'m mut Box<dyn Pending + 'a>> {
    maps.iter_mut().filter(move |p| p.stage() == s)
}

/// Refuses a per-change plan that would overfill an exempt map, before anything is written.
pub fn check_slots_fit(
    live: &LiveMaps,
    applied: &Desired,
    slots: &[(Slot, Option<Exempt>)],
) -> Result<()> {
    // Per map, in list order: (entries after the change, entries once the closing ones (and
    // the tries' bindings) are in and nothing is removed yet, capacity). `write_slots`
    // writes those first.
    let mut after: BTreeMap<(usize, &str), (usize, usize, u32)> = BTreeMap::new();
    for (slot, v) in slots {
        let order = ALL_MAPS.iter().position(|n| *n == slot.map()).unwrap_or(0);
        let n = after.entry((order, slot.map())).or_insert_with(|| {
            let len = applied.slot_map_len(slot);
            (len, len, slot.capacity(live))
        });
        match (applied.slot(slot).is_some(), v) {
            (false, Some(v)) => {
                n.0 += 1;
                if class(v, trie(slot.map())) != Class::Opening {
                    n.1 += 1;
                }
            }
            (true, None) => n.0 -= 1,
            _ => {}
        }
    }
    for ((_, name), (n, early, cap)) in after {
        fits(name, n.max(early), cap)?;
    }
    Ok(())
}

/// `s` probing the session prefix lengths of `old` too (longest first), when both fit: they
/// always do when `old` is an applied state (each has at most [`m::MAX_SESSION_PREFIX_LENS`]);
/// not after an apply that stopped halfway left a merged set behind.
fn with_lens_of(s: Settings, old: Option<Settings>) -> Settings {
    let Some(old) = old else { return s };
    let both = lens(&s).iter().chain(lens(&old)).copied().collect();
    named_in_use(s, &both)
}

/// Writes a per-change plan in the order of a full apply. `old`: what each slot held before
/// the change (the last applied state), in `slots` order.
pub fn write_slots(
    live: &mut LiveMaps,
    slots: &[(Slot, Option<Exempt>)],
    old: &[Option<Exempt>],
    settings: Option<Settings>,
) -> Result<()> {
    write_slots_to(live.tables(), slots, old, settings)
}

/// [`write_slots`]' order of writes, over any tables.
fn write_slots_to(
    mut t: Tables<'_>,
    slots: &[(Slot, Option<Exempt>)],
    old: &[Option<Exempt>],
    settings: Option<Settings>,
) -> Result<()> {
    debug_assert_eq!(slots.len(), old.len());
    let trie = |s: &Slot| matches!(s, Slot::Pfx4(_) | Slot::Pfx6(_));
    // The steps of `apply_to`, slot by slot.
    let puts = |c: Class| {
        slots
            .iter()
            .filter_map(move |(s, v)| v.filter(|v| class(v, trie(s)) == c).map(|v| (s, v)))
    };
    let dels = |c: Class| {
        slots.iter().zip(old).filter_map(move |((s, v), o)| {
            (v.is_none() && o.is_some_and(|o| class(&o, trie(s)) == c)).then_some(s)
        })
    };
    if let Some(f) = t.filter {
        let written = slots.iter().filter(|(_, v)| v.is_some());
        exbits::grow(f, written.flat_map(|(s, _)| exbits::bits_of_slot(s)));
    }
    let have = t.settings.read();
    let early = settings.map(|s| with_lens_of(s, have));
    let together = early.is_none_or(|e| probes_all(e, have));
    let write_early = |t: &mut Tables<'_>| match early {
        Some(e) if have != Some(e) => t.settings.write(e),
        _ => Ok(()),
    };
    use Class::*;
    t.put_slots(puts(Closing))?;
    if together {
        write_early(&mut t)?;
        t.put_slots(puts(Hiding))?;
    }
    for slot in dels(Opening).chain(dels(Hiding)) {
        t.del_slot(slot)
            .with_context(|| format!("deleting {slot:?}"))?;
    }
    if !together {
        write_early(&mut t)?;
    }
    for slot in dels(Closing) {
        t.del_slot(slot)
            .with_context(|| format!("deleting {slot:?}"))?;
    }
    let late = if together {
        vec![]
    } else {
        puts(Hiding).collect()
    };
    // `late` (Hiding) before Opening, as the full apply's steps.
    t.put_slots(late.into_iter())?;
    t.put_slots(puts(Opening))?;
    if let Some(s) = settings.filter(|s| early != Some(*s)) {
        t.settings.write(s)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// While entries move between prefix lengths, both lengths are probed (so a blocked
    /// session's new entry is seen as soon as it is written), unless they do not fit.
    #[test]
    fn old_and_new_session_prefix_lengths_are_probed_together() {
        let lens = |l: &[u8]| {
            let mut s = Settings::default();
            s.session_prefix_lens[..l.len()].copy_from_slice(l);
            s.session_prefix_count = l.len() as u32;
            s
        };
        let s = with_lens_of(lens(&[64]), Some(lens(&[128, 56])));
        assert_eq!(s.session_prefix_count, 3);
        assert_eq!(&s.session_prefix_lens[..3], &[128, 64, 56]);
        let full = lens(&[64, 63, 62, 61, 60, 59, 58, 57]);
        let other = lens(&[56, 55, 54, 53, 52, 51, 50, 49]);
        let both = with_lens_of(full, Some(other));
        assert_eq!(both.session_prefix_count, 16, "two policies' worth fit");
        assert!(probes_all(both, Some(other)));
        let merged = lens(&[56, 55, 54, 53, 52, 51, 50, 49, 48]);
        assert_eq!(
            with_lens_of(full, Some(merged)),
            full,
            "17 (a merged set left by an apply that stopped) do not fit: the new set"
        );
        assert_eq!(with_lens_of(lens(&[56]), None), lens(&[56]));
    }
}

#[cfg(test)]
mod order;
