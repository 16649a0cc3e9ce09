//! The map entries each user contributes, kept so that a change recomputes only the users it
//! touched: an `unblock` costs the same with ten or a million subscribers. The full build
//! ([`Index::build`], [`Desired::build`]) and the per-change update ([`Index::plan`],
//! [`Index::apply`]) share one definition of a user's entries ([`user_slots`]); a property
//! test holds them equal.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use anyhow::Result;
use port25_common::maps::{
    Exempt, MAX_SESSION_PREFIX_LENS, ORIGIN_BINDING, ORIGIN_SESSION, PROBED_PREFIX_LENS,
};
use tracing::{debug, warn};

use crate::{
    config::Config,
    net::Prefix,
    policy::{
        desired::{expiry_ns, Desired},
        slot::{longer, Slot, BLOCKED_NS},
    },
    registry::store::{MapRows, Session, Snapshot, Standing, User},
};

/// A user's map entries, one per exempt key, in key order.
pub type UserEntries = Vec<(Slot, Exempt)>;

/// What a user puts in the maps. Every live session address and prefix, whatever the
/// policy, as an owner entry: with the unblock's expiry while unblocked, already expired
/// (= block) otherwise, so that no other user's wider prefix exempts it. Static bindings
/// only while unblocked.
///
/// Why entries for blocked sessions rather than refusing overlaps at write time: a session
/// comes from the access server and cannot be refused (the address is in use either way),
/// and a stale delegated prefix is exactly the overlap nobody wrote on purpose. The most
/// specific owner deciding in the datapath covers every order of events; it costs one map
/// entry per live session address instead of per unblocked one.
pub fn user_slots(
    user: Option<&User>,
    sessions: &[Session],
    bindings: &[Prefix],
    now_wall: jiff::Timestamp,
    now_boot: u64,
) -> UserEntries {
    let Some(u) = user else {
        return vec![];
    };
    entries_of(
        &u.standing(),
        sessions.iter().flat_map(|s| s.addrs.iter()),
        bindings,
        now_wall,
        now_boot,
    )
}

/// [`user_slots`] of a user, from the addresses of its sessions.
fn entries_of<'a>(
    u: &Standing,
    addrs: impl Iterator<Item = &'a Prefix>,
    bindings: &[Prefix],
    now_wall: jiff::Timestamp,
    now_boot: u64,
) -> UserEntries {
    let expires_ns = if u.unblocked_at(now_wall) {
        expiry_ns(u.until, now_wall, now_boot)
    } else {
        None
    };
    let owner = Exempt {
        // 1 ns after boot: expired at any time the datapath reads it.
        expires_ns: expires_ns.unwrap_or(BLOCKED_NS),
        origin: ORIGIN_SESSION,
        _pad: 0,
    };
    let binding = expires_ns.map(|expires_ns| Exempt {
        expires_ns,
        origin: ORIGIN_BINDING,
        _pad: 0,
    });
    merged_entries(addrs, owner, bindings, binding)
}

/// A user's entries: `owner` at every session slot, `binding` (while unblocked) at every
/// bound prefix; two values for one key merge by [`longer`], which is order-free, so a sort
/// and one pass give the same entries as inserting them one by one. (A plain Vec: the full
/// build makes one per user, a million at once.)
fn merged_entries<'a>(
    addrs: impl Iterator<Item = &'a Prefix>,
    owner: Exempt,
    bindings: &[Prefix],
    binding: Option<Exempt>,
) -> UserEntries {
    let mut out: UserEntries = Vec::new();
    for p in addrs {
        Slot::each_of_session(p, |slot| out.push((slot, owner)));
    }
    if let Some(v) = binding {
        out.extend(bindings.iter().map(|p| (Slot::of(p, false), v)));
    }
    if out.len() > 1 {
        out.sort_unstable_by_key(|(slot, _)| *slot);
        out.dedup_by(|(k, v), (kept_k, kept_v)| {
            if k == kept_k {
                *kept_v = longer(*kept_v, *v);
                true
            } else {
                false
            }
        });
    }
    out
}

/// The new entries of every user a recorded transaction touched.
pub fn changed_users(
    rec: &crate::registry::store::Recording,
    now_wall: jiff::Timestamp,
    now_boot: u64,
) -> Result<Vec<(String, UserEntries)>> {
    use crate::registry::store::Tx;
    let mut out = Vec::with_capacity(rec.users.len());
    // A user this transaction created (and bound nothing to) holds only the sessions it
    // wrote: taken from the recording, not read back.
    let own = |name: &str| rec.created.get(name).filter(|_| !rec.bound.contains(name));
    // By reference: a sync creates 100,000 users, and copying their sessions here (and
    // freeing the copies) cost a tenth of its planning.
    let mut own_sessions: FastMap<&str, Vec<&Session>> = FastMap::default();
    for s in rec.sessions_written.values().flatten() {
        if own(&s.user).is_some() {
            own_sessions.entry(&s.user).or_default().push(s);
        }
    }
    let read = rec.users.iter().filter(|n| own(n).is_none()).count();
    // A change of many users (a `session sync`) reads every session and binding once rather
    // than a few statements per user.
    let bulk = (read >= BULK_USERS)
        .then(|| -> Result<_> {
            let mut sessions: FastMap<String, Vec<Session>> = FastMap::default();
            for s in rec.sessions()? {
                if rec.users.contains(&s.user) {
                    sessions.entry(s.user.clone()).or_default().push(s);
                }
            }
            let mut bindings: FastMap<String, Vec<Prefix>> = FastMap::default();
            for b in rec.bindings()? {
                bindings.entry(b.user).or_default().push(b.prefix);
            }
            Ok((sessions, bindings))
        })
        .transpose()?;
    for name in &rec.users {
        if let Some(u) = own(name) {
            let sessions = own_sessions.get(name.as_str());
            let slots = entries_of(
                &u.standing(),
                sessions.into_iter().flatten().flat_map(|s| s.addrs.iter()),
                &[],
                now_wall,
                now_boot,
            );
            out.push((name.clone(), slots));
            continue;
        }
        // A user this transaction created is as it wrote it: no read.
        let user = match rec.created.get(name) {
            Some(u) => Some(u.clone()),
            None => rec.user(name)?,
        };
        let slots = match (user, &bulk) {
            (Some(u), None) => user_slots(
                Some(&u),
                &rec.sessions_of(name)?,
                &rec.bindings_of(name)?,
                now_wall,
                now_boot,
            ),
            (Some(u), Some((sessions, bindings))) => user_slots(
                Some(&u),
                sessions.get(name).map(|v| v.as_slice()).unwrap_or_default(),
                bindings.get(name).map(|v| v.as_slice()).unwrap_or_default(),
                now_wall,
                now_boot,
            ),
            (None, _) => vec![],
        };
        out.push((name.clone(), slots));
    }
    Ok(out)
}

/// A hash map keyed by a fast, per-process seeded hasher: the full build fills two with a
/// million keys each, where SipHash was a tenth of the start.
type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// The users holding one slot with their entries, by name; almost always one, so a small
/// Vec rather than a map per slot (a million of those were most of the build's memory).
type Holders = Vec<(Arc<str>, Exempt)>;

/// From how many changed users [`changed_users`] reads all sessions at once.
const BULK_USERS: usize = 2048;

/// Who contributes what, beside the config and runtime entries (`base`).
#[derive(Debug, Default, Clone)]
pub struct Index {
    base: Desired,
    per_user: FastMap<Arc<str>, UserEntries>,
    holders: FastMap<Slot, Holders>,
}

/// A full build's users and their entries, from which its [`Index`] is made: kept apart so
/// that the maps can be written first and the index (two hash maps of a million keys each)
/// made after, off the start's path to enforcing (see [`Deferred`]).
#[derive(Debug, Default)]
pub struct Entries {
    base: Desired,
    users: Vec<(Arc<str>, UserEntries)>,
}

impl Entries {
    /// The desired state from `base` (config and runtime entries) and every user's entries,
    /// with those entries for the index.
    pub fn build(
        base: Desired,
        rows: MapRows,
        now_wall: jiff::Timestamp,
        now_boot: u64,
    ) -> Result<(Desired, Entries)> {
        let MapRows {
            users,
            mut addrs,
            mut bound,
            ..
        } = rows;
        // Each user's session addresses and bindings: a run in a list sorted by user index,
        // walked in step with the users (no map of a million small Vecs).
        addrs.sort_unstable_by_key(|(u, _)| *u);
        bound.sort_unstable_by_key(|(u, _)| *u);
        fn run<'s>(all: &'s [(u32, Prefix)], at: &mut usize, user: u32) -> &'s [(u32, Prefix)] {
            let from = *at + all[*at..].iter().take_while(|(u, _)| *u < user).count();
            let to = from + all[from..].iter().take_while(|(u, _)| *u == user).count();
            *at = to;
            &all[from..to]
        }
        let (mut addrs_at, mut bound_at) = (0, 0);
        let mut out = Vec::with_capacity(users.len());
        let mut bindings = Vec::new();
        for (i, (name, standing)) in users.into_iter().enumerate() {
            let i = i as u32;
            bindings.clear();
            bindings.extend(run(&bound, &mut bound_at, i).iter().map(|(_, p)| *p));
            let slots = entries_of(
                &standing,
                run(&addrs, &mut addrs_at, i).iter().map(|(_, p)| p),
                &bindings,
                now_wall,
                now_boot,
            );
            if !slots.is_empty() {
                out.push((name, slots));
            }
        }
        let mut d = base.merged(out.iter().flat_map(|(_, e)| e.iter().copied()));
        let lens = lens_of(&d)?;
        set_lens(&mut d, lens);
        Ok((d, Entries { base, users: out }))
    }

    /// The index of these entries: who holds each slot, and each user's entries.
    pub fn index(self) -> Index {
        let mut index = Index {
            base: self.base,
            ..Default::default()
        };
        index
            .holders
            .reserve(self.users.iter().map(|(_, e)| e.len()).sum());
        index.per_user.reserve(self.users.len());
        for (name, slots) in self.users {
            for (slot, v) in &slots {
                hold(index.holders.entry(*slot).or_default(), &name, *v);
            }
            index.per_user.insert(name, slots);
        }
        index
    }
}

/// The index of the last full build: ready, or still being made on its own thread from the
/// build's [`Entries`]. A change takes it with [`Deferred::get`], which waits for the thread:
/// no change is ever planned against a half-made index.
#[derive(Debug)]
pub enum Deferred {
    Ready(Box<Index>),
    Building(std::thread::JoinHandle<Index>),
}

impl Deferred {
    /// Makes the index of `entries` on a thread of its own (held back only by a test's
    /// hook, [`crate::control::testing::hold_index`]).
    pub fn spawn(entries: Entries) -> Deferred {
        // Handed over once the thread exists: without one, the entries are still here.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Entries>(1);
        let t = std::thread::Builder::new()
            .name("port25-index".into())
            .spawn(move || {
                // Sent right after the spawn; never an empty index in its place.
                let entries = rx.recv().expect("the entries follow the spawn");
                crate::control::testing::hold_index();
                let t = std::time::Instant::now();
                let users = entries.users.len();
                let index = entries.index();
                debug!(ms = t.elapsed().as_millis() as u64, users, "index made");
                index
            });
        match t {
            Ok(h) => match tx.send(entries) {
                Ok(()) => Deferred::Building(h),
                Err(std::sync::mpsc::SendError(entries)) => {
                    Deferred::Ready(Box::new(entries.index()))
                }
            },
            Err(e) => {
                warn!("no thread for the index ({e}): made on the daemon's");
                Deferred::Ready(Box::new(entries.index()))
            }
        }
    }

    /// The index, once made (waiting for its thread, or making it, if need be).
    pub fn get(&mut self) -> &mut Index {
        if let Deferred::Building(_) = self {
            let Deferred::Building(h) = std::mem::replace(self, Deferred::Ready(Box::default()))
            else {
                unreachable!()
            };
            if !h.is_finished() {
                debug!("a change waits for the index of the last full build");
            }
            let index = h.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            *self = Deferred::Ready(Box::new(index));
        }
        match self {
            Deferred::Ready(i) => i,
            Deferred::Building(_) => unreachable!("joined above"),
        }
    }
}

impl From<Index> for Deferred {
    fn from(i: Index) -> Deferred {
        Deferred::Ready(Box::new(i))
    }
}

/// Sets `user`'s entry among a slot's holders (kept in name order).
fn hold(h: &mut Holders, user: &Arc<str>, v: Exempt) {
    match h.binary_search_by(|(n, _)| (**n).cmp(&**user)) {
        Ok(i) => h[i].1 = v,
        Err(i) => h.insert(i, (user.clone(), v)),
    }
}

/// A change computed but not yet made: the users' new entries and each slot's new value.
#[derive(Debug, Default)]
pub struct Change {
    users: Vec<(String, UserEntries)>,
    pub slots: Vec<(Slot, Option<Exempt>)>,
    lens: Option<Vec<u8>>,
}

impl Desired {
    /// Config plus registry: runtime entries, and the session addresses and static bindings
    /// of users unblocked at `now_wall`. IPv6 session prefixes go to the hash probed per
    /// prefix length; more distinct lengths than the datapath probes is an error. (Here, not
    /// in `desired.rs`: the full build is the index's, so both builds are one.)
    pub fn build(
        cfg: &Config,
        snap: &Snapshot,
        now_wall: jiff::Timestamp,
        now_boot: u64,
    ) -> Result<Desired> {
        Ok(Desired::build_indexed(cfg, snap, now_wall, now_boot)?.1)
    }

    /// As [`Desired::build`], with the per-user index that later changes update.
    pub fn build_indexed(
        cfg: &Config,
        snap: &Snapshot,
        now_wall: jiff::Timestamp,
        now_boot: u64,
    ) -> Result<(Index, Desired)> {
        Desired::build_rows(cfg, MapRows::from_snapshot(snap), now_wall, now_boot)
    }

    /// As [`Desired::build_indexed`], from the registry's narrow rows ([`Tx::map_rows`]):
    /// the one build, whichever read gave the rows.
    ///
    /// [`Tx::map_rows`]: crate::registry::store::Tx::map_rows
    pub fn build_rows(
        cfg: &Config,
        rows: MapRows,
        now_wall: jiff::Timestamp,
        now_boot: u64,
    ) -> Result<(Index, Desired)> {
        let (d, entries) = Desired::build_entries(cfg, rows, now_wall, now_boot)?;
        Ok((entries.index(), d))
    }

    /// As [`Desired::build_rows`], with the users' entries in place of the index they make
    /// ([`Entries::index`]): the daemon writes the maps before it makes the index.
    pub fn build_entries(
        cfg: &Config,
        rows: MapRows,
        now_wall: jiff::Timestamp,
        now_boot: u64,
    ) -> Result<(Desired, Entries)> {
        let base = Desired::base(cfg, &rows.entries, now_wall, now_boot);
        Entries::build(base, rows, now_wall, now_boot)
    }
}

impl Index {
    /// The whole desired state from `base` (config and runtime entries) and every user.
    pub fn build(
        base: Desired,
        rows: MapRows,
        now_wall: jiff::Timestamp,
        now_boot: u64,
    ) -> Result<(Index, Desired)> {
        let (d, entries) = Entries::build(base, rows, now_wall, now_boot)?;
        Ok((entries.index(), d))
    }

    /// The change that gives `changed` users their new entries, checked (prefix lengths)
    /// against `applied` but not made.
    pub fn plan(&self, applied: &Desired, changed: Vec<(String, UserEntries)>) -> Result<Change> {
        let mut affected: BTreeMap<Slot, BTreeMap<String, Exempt>> = BTreeMap::new();
        // Every slot a changed user held or will hold, with all its current holders first
        // (users may share a slot), then the changed users' old entries out, new ones in.
        for (user, new) in &changed {
            for (slot, _) in self.slots_of(user).iter().chain(new.iter()) {
                affected.entry(*slot).or_insert_with(|| {
                    self.holders
                        .get(slot)
                        .map(|h| h.iter().map(|(n, v)| (n.to_string(), *v)).collect())
                        .unwrap_or_default()
                });
            }
        }
        for (user, new) in &changed {
            for (slot, _) in self.slots_of(user) {
                affected.get_mut(slot).unwrap().remove(user);
            }
            for (slot, v) in new {
                affected.get_mut(slot).unwrap().insert(user.clone(), *v);
            }
        }
        let mut slots = Vec::new();
        let mut net6_delta: BTreeMap<u32, i64> = BTreeMap::new();
        for (slot, holders) in &affected {
            let merged = holders
                .values()
                .copied()
                .chain(self.base.slot(slot))
                .reduce(longer);
            let now = applied.slot(slot);
            if merged != now {
                if let Slot::Net6(k) = slot {
                    *net6_delta.entry(k.prefix_len).or_default() +=
                        merged.is_some() as i64 - now.is_some() as i64;
                }
                slots.push((*slot, merged));
            }
        }
        // Prefix lengths in use after the change.
        let mut lens = None;
        if net6_delta.values().any(|d| *d != 0) {
            let mut count: BTreeMap<u32, i64> = BTreeMap::new();
            for k in applied.exnet6.keys() {
                *count.entry(k.prefix_len).or_default() += 1;
            }
            for (l, d) in net6_delta {
                *count.entry(l).or_default() += d;
            }
            let in_use: BTreeSet<u8> = count
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .map(|(l, _)| l as u8)
                .collect();
            check_lens(&in_use)?;
            lens = Some(in_use.into_iter().rev().collect());
        }
        Ok(Change {
            users: changed,
            slots,
            lens,
        })
    }

    fn slots_of(&self, user: &str) -> &[(Slot, Exempt)] {
        self.per_user
            .get(user)
            .map(|v| v.as_slice())
            .unwrap_or_default()
    }

    /// Makes a planned change in the index and in `applied` (the maps are written by the
    /// caller from `plan.slots`). Returns whether the settings (prefix lengths) changed.
    pub fn apply(&mut self, applied: &mut Desired, plan: &Change) -> bool {
        for (user, new) in &plan.users {
            if let Some(old) = self.per_user.remove(user.as_str()) {
                for (slot, _) in old {
                    if let Some(h) = self.holders.get_mut(&slot) {
                        h.retain(|(n, _)| **n != **user);
                        if h.is_empty() {
                            self.holders.remove(&slot);
                        }
                    }
                }
            }
            let name: Arc<str> = Arc::from(user.as_str());
            for (slot, v) in new {
                hold(self.holders.entry(*slot).or_default(), &name, *v);
            }
            if !new.is_empty() {
                self.per_user.insert(name, new.clone());
            }
        }
        for (slot, v) in &plan.slots {
            applied.set_slot(slot, *v);
        }
        match &plan.lens {
            Some(lens) => {
                let before = applied.settings;
                set_lens(applied, lens.clone());
                before != applied.settings
            }
            None => false,
        }
    }
}

fn check_lens(lens: &BTreeSet<u8>) -> Result<()> {
    if lens.len() > MAX_SESSION_PREFIX_LENS {
        // A refusal, as a full map is: the same session up fails again until others go down.
        crate::registry::refuse!(
            "live sessions would use {} distinct IPv6 prefix lengths ({:?}); the datapath probes at most {MAX_SESSION_PREFIX_LENS}",
            lens.len(),
            lens
        );
    }
    Ok(())
}

fn lens_of(d: &Desired) -> Result<Vec<u8>> {
    let lens: BTreeSet<u8> = d.exnet6.keys().map(|k| k.prefix_len as u8).collect();
    check_lens(&lens)?;
    Ok(lens.into_iter().rev().collect())
}

/// Longest first: the most specific probe comes first.
fn set_lens(d: &mut Desired, lens: Vec<u8>) {
    d.settings.session_prefix_lens = [0; PROBED_PREFIX_LENS];
    for (i, l) in lens.iter().enumerate() {
        d.settings.session_prefix_lens[i] = *l;
    }
    d.settings.session_prefix_count = lens.len() as u32;
}

#[cfg(test)]
mod tests;
