//! The map entries each user contributes, kept so that a change recomputes only the users it
//! touched: an `unblock` costs the same with ten or a million subscribers. The full build
//! ([`Index::build`], [`Desired::build`]) and the per-change update ([`Index::plan`],
//! [`Index::apply`]) share one definition of a user's entries ([`user_slots`]); a property
//! test holds them equal.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use anyhow::Result;
use port25_common::maps::{Exempt, MAX_SESSION_PREFIX_LENS, ORIGIN_BINDING, ORIGIN_SESSION};

use crate::{
    config::Config,
    net::Prefix,
    policy::{
        desired::{expiry_ns, Desired},
        slot::{longer, Slot, BLOCKED_NS},
    },
    registry::store::{Session, Snapshot, User},
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
    let mut out: BTreeMap<Slot, Exempt> = BTreeMap::new();
    for p in sessions.iter().flat_map(|s| s.addrs.iter()) {
        for slot in Slot::of_session(p) {
            out.insert(slot, owner);
        }
    }
    if let Some(expires_ns) = expires_ns {
        let v = Exempt {
            expires_ns,
            origin: ORIGIN_BINDING,
            _pad: 0,
        };
        for p in bindings {
            let slot = Slot::of(p, false);
            let e = out.entry(slot).or_insert(v);
            *e = longer(*e, v);
        }
    }
    out.into_iter().collect()
}

/// The new entries of every user a recorded transaction touched.
pub fn changed_users(
    rec: &crate::registry::store::Recording,
    now_wall: jiff::Timestamp,
    now_boot: u64,
) -> Result<Vec<(String, UserEntries)>> {
    use crate::registry::store::Tx;
    let mut out = Vec::with_capacity(rec.users.len());
    // A change of many users (a `session sync`) reads every session and binding once rather
    // than a few statements per user.
    let bulk = (rec.users.len() >= BULK_USERS)
        .then(|| -> Result<_> {
            let mut sessions: HashMap<String, Vec<Session>> = HashMap::new();
            for s in rec.sessions()? {
                if rec.users.contains(&s.user) {
                    sessions.entry(s.user.clone()).or_default().push(s);
                }
            }
            let mut bindings: HashMap<String, Vec<Prefix>> = HashMap::new();
            for b in rec.bindings()? {
                bindings.entry(b.user).or_default().push(b.prefix);
            }
            Ok((sessions, bindings))
        })
        .transpose()?;
    for name in &rec.users {
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

/// From how many changed users [`changed_users`] reads all sessions at once.
const BULK_USERS: usize = 2048;

/// Who contributes what, beside the config and runtime entries (`base`).
#[derive(Debug, Default, Clone)]
pub struct Index {
    base: Desired,
    per_user: HashMap<String, UserEntries>,
    holders: HashMap<Slot, BTreeMap<String, Exempt>>,
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
        let base = Desired::base(cfg, &snap.entries, now_wall, now_boot);
        Index::build(base, snap, now_wall, now_boot)
    }
}

impl Index {
    /// The whole desired state from `base` (config and runtime entries) and every user.
    pub fn build(
        base: Desired,
        snap: &Snapshot,
        now_wall: jiff::Timestamp,
        now_boot: u64,
    ) -> Result<(Index, Desired)> {
        let mut sessions: HashMap<&str, Vec<Session>> = HashMap::new();
        for s in &snap.sessions {
            sessions.entry(s.user.as_str()).or_default().push(s.clone());
        }
        let mut bindings: HashMap<&str, Vec<Prefix>> = HashMap::new();
        for b in &snap.bindings {
            bindings.entry(b.user.as_str()).or_default().push(b.prefix);
        }
        let mut index = Index {
            base: base.clone(),
            ..Default::default()
        };
        let mut d = base;
        for u in &snap.users {
            let slots = user_slots(
                Some(u),
                sessions
                    .get(u.name.as_str())
                    .map(|v| v.as_slice())
                    .unwrap_or_default(),
                bindings
                    .get(u.name.as_str())
                    .map(|v| v.as_slice())
                    .unwrap_or_default(),
                now_wall,
                now_boot,
            );
            for (slot, v) in &slots {
                index
                    .holders
                    .entry(*slot)
                    .or_default()
                    .insert(u.name.clone(), *v);
                let merged = match d.slot(slot) {
                    Some(have) => longer(have, *v),
                    None => *v,
                };
                d.set_slot(slot, Some(merged));
            }
            if !slots.is_empty() {
                index.per_user.insert(u.name.clone(), slots);
            }
        }
        let lens = lens_of(&d)?;
        set_lens(&mut d, lens);
        Ok((index, d))
    }

    /// The change that gives `changed` users their new entries, checked (prefix lengths)
    /// against `applied` but not made.
    pub fn plan(&self, applied: &Desired, changed: Vec<(String, UserEntries)>) -> Result<Change> {
        let mut affected: BTreeMap<Slot, BTreeMap<String, Exempt>> = BTreeMap::new();
        // Every slot a changed user held or will hold, with all its current holders first
        // (users may share a slot), then the changed users' old entries out, new ones in.
        for (user, new) in &changed {
            for (slot, _) in self.slots_of(user).iter().chain(new.iter()) {
                affected
                    .entry(*slot)
                    .or_insert_with(|| self.holders.get(slot).cloned().unwrap_or_default());
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
            if let Some(old) = self.per_user.remove(user) {
                for (slot, _) in old {
                    if let Some(h) = self.holders.get_mut(&slot) {
                        h.remove(user);
                        if h.is_empty() {
                            self.holders.remove(&slot);
                        }
                    }
                }
            }
            for (slot, v) in new {
                self.holders
                    .entry(*slot)
                    .or_default()
                    .insert(user.clone(), *v);
            }
            if !new.is_empty() {
                self.per_user.insert(user.clone(), new.clone());
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
    d.settings.session_prefix_lens = [0; MAX_SESSION_PREFIX_LENS];
    for (i, l) in lens.iter().enumerate() {
        d.settings.session_prefix_lens[i] = *l;
    }
    d.settings.session_prefix_count = lens.len() as u32;
}

#[cfg(test)]
mod tests;
