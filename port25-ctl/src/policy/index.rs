//! The map entries each user contributes, kept so that a change recomputes only the users it
//! touched: an `unblock` costs the same with ten or a million subscribers. The full build
//! ([`Index::build`]) and the per-change update ([`Index::plan`], [`Index::apply`]) share one
//! definition of a user's entries ([`user_slots`]); a property test holds them equal.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use anyhow::{bail, Result};
use port25_common::maps::{
    Exempt, NetKey6, MAX_SESSION_PREFIX_LENS, ORIGIN_BINDING, ORIGIN_SESSION,
};

use crate::{
    net::Prefix,
    policy::{expiry_ns, Desired},
    registry::store::{Session, Snapshot, User},
};

/// One key in one of the exempt tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Slot {
    Ip4([u8; 4]),
    Ip6([u8; 16]),
    Pfx4(([u8; 4], u32)),
    Pfx6(([u8; 16], u32)),
    Net6(NetKey6),
}

impl Slot {
    /// Where a prefix lives: exact addresses in the hashes, IPv6 session prefixes in the
    /// per-length hash, other prefixes in the LPM tries.
    pub fn of(p: &Prefix, session: bool) -> Slot {
        match (p.addr, p.is_host()) {
            (IpAddr::V4(a), true) => Slot::Ip4(a.octets()),
            (IpAddr::V6(a), true) => Slot::Ip6(a.octets()),
            (IpAddr::V4(a), false) => Slot::Pfx4((a.octets(), p.len as u32)),
            (IpAddr::V6(a), false) if session => Slot::Net6(NetKey6 {
                prefix_len: p.len as u32,
                addr: a.octets(),
            }),
            (IpAddr::V6(a), false) => Slot::Pfx6((a.octets(), p.len as u32)),
        }
    }

    /// Where a session's address or prefix lives. An IPv4 session prefix (a routed
    /// Framed-Route) is written as one exact entry per address: exact entries are read
    /// before the LPM, so another user's narrower binding inside it never decides for an
    /// address the session holds (DESIGN "Ownership"); IPv4 has no per-length session hash.
    /// The registry keeps such prefixes at most [`crate::registry::MAX_SESSION_PREFIX4`] wide.
    pub fn of_session(p: &Prefix) -> Vec<Slot> {
        match p.addr {
            IpAddr::V4(a) if !p.is_host() => {
                let base = u32::from(a);
                let count = 1u64 << (32 - p.len as u32);
                (0..count)
                    .map(|i| Slot::Ip4((base.wrapping_add(i as u32)).to_be_bytes()))
                    .collect()
            }
            _ => vec![Slot::of(p, true)],
        }
    }

    fn get(&self, d: &Desired) -> Option<Exempt> {
        match self {
            Slot::Ip4(k) => d.exip4.get(k),
            Slot::Ip6(k) => d.exip6.get(k),
            Slot::Pfx4(k) => d.expfx4.get(k),
            Slot::Pfx6(k) => d.expfx6.get(k),
            Slot::Net6(k) => d.exnet6.get(k),
        }
        .copied()
    }

    fn set(&self, d: &mut Desired, v: Option<Exempt>) {
        fn put<K: Ord + Copy>(t: &mut BTreeMap<K, Exempt>, k: &K, v: Option<Exempt>) {
            match v {
                Some(v) => t.insert(*k, v),
                None => t.remove(k),
            };
        }
        match self {
            Slot::Ip4(k) => put(&mut d.exip4, k, v),
            Slot::Ip6(k) => put(&mut d.exip6, k, v),
            Slot::Pfx4(k) => put(&mut d.expfx4, k, v),
            Slot::Pfx6(k) => put(&mut d.expfx6, k, v),
            Slot::Net6(k) => put(&mut d.exnet6, k, v),
        }
    }
}

/// Of two entries for one key, the one that wins, as a maximum over one total order (so
/// the merge is commutative and associative: the result never depends on the order sources
/// are merged in). From the top:
/// 1. live session entries and the operator's own exempts (config, `exempt add`), the one
///    that lasts longer (0 = no expiry), the operator's on a tie: a session entry decides
///    for its address, but the operator's exempt is policy for the address whoever holds it;
/// 2. a blocked user's session entry ([`BLOCKED_NS`]): it beats every user's binding, so no
///    other user's prefix exempts the address (DESIGN "Ownership");
/// 3. bindings, the one that lasts longer.
///
/// Two session entries for one key are not expected (an address has one holder).
pub fn longer(a: Exempt, b: Exempt) -> Exempt {
    let until = |e: &Exempt| {
        if e.expires_ns == 0 {
            u64::MAX
        } else {
            e.expires_ns
        }
    };
    let rank = |e: &Exempt| {
        let class = match (e.owns(), e.operator()) {
            (true, _) if e.expires_ns == BLOCKED_NS => 1,
            (true, _) | (false, true) => 2,
            (false, false) => 0,
        };
        (
            class,
            if class == 1 { 0 } else { until(e) },
            e.operator(),
            std::cmp::Reverse(e.origin),
        )
    };
    if rank(&a) >= rank(&b) {
        a
    } else {
        b
    }
}

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
) -> Vec<(Slot, Exempt)> {
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

/// The expiry of a blocked user's session entries: over since boot.
pub const BLOCKED_NS: u64 = 1;

/// The new entries of every user a recorded transaction touched.
pub fn changed_users(
    rec: &crate::registry::store::Recording,
    now_wall: jiff::Timestamp,
    now_boot: u64,
) -> Result<Vec<(String, Vec<(Slot, Exempt)>)>> {
    use crate::registry::store::Tx;
    let mut out = Vec::with_capacity(rec.users.len());
    for name in &rec.users {
        let slots = match rec.user(name)? {
            Some(u) => user_slots(
                Some(&u),
                &rec.sessions_of(name)?,
                &rec.bindings_of(name)?,
                now_wall,
                now_boot,
            ),
            None => vec![],
        };
        out.push((name.clone(), slots));
    }
    Ok(out)
}

/// Who contributes what, beside the config and runtime entries (`base`).
#[derive(Debug, Default, Clone)]
pub struct Index {
    base: Desired,
    per_user: HashMap<String, Vec<(Slot, Exempt)>>,
    holders: HashMap<Slot, BTreeMap<String, Exempt>>,
}

/// A change computed but not yet made: the users' new entries and each slot's new value.
#[derive(Debug, Default)]
pub struct Plan {
    users: Vec<(String, Vec<(Slot, Exempt)>)>,
    pub slots: Vec<(Slot, Option<Exempt>)>,
    lens: Option<Vec<u8>>,
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
                let merged = match slot.get(&d) {
                    Some(have) => longer(have, *v),
                    None => *v,
                };
                slot.set(&mut d, Some(merged));
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
    pub fn plan(
        &self,
        applied: &Desired,
        changed: Vec<(String, Vec<(Slot, Exempt)>)>,
    ) -> Result<Plan> {
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
                .chain(slot.get(&self.base))
                .reduce(longer);
            let now = slot.get(applied);
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
        Ok(Plan {
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
    pub fn apply(&mut self, applied: &mut Desired, plan: &Plan) -> bool {
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
            slot.set(applied, *v);
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
        bail!(
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
