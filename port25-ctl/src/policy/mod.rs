//! From policy to map contents, and the apply that gets the maps there.
//!
//! The apply never opens port 25 on the way: additions that restrict (blocked ports, enforced
//! ranges) go first and their removals last; removals of allow entries (mail servers, exempt)
//! go before their additions. A change that would overfill any map is refused before the first
//! write, so a full map fails the whole change and nothing is half applied.

pub mod index;

use std::{collections::BTreeMap, net::IpAddr};

use anyhow::{bail, Context as _, Result};
use port25_common::maps::{
    listed_flags, Exempt, NetKey6, Settings, FLAG_REJECT, LAYOUT_VERSION, LISTED_MASK,
    ORIGIN_CONFIG, ORIGIN_RUNTIME,
};

use crate::{
    bpf::livemaps::{boot_ns, LiveMaps, Table},
    config::{Action, Config},
    net::Prefix,
    policy::index::{Index, Slot},
    registry::store::{EntryKind, Snapshot},
};

type P4 = ([u8; 4], u32);
type P6 = ([u8; 16], u32);

/// Everything the maps should hold.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Desired {
    pub settings: Settings,
    pub ports: BTreeMap<u16, u8>,
    pub ranges4: BTreeMap<P4, u8>,
    pub ranges6: BTreeMap<P6, u8>,
    pub mail4: BTreeMap<P4, u8>,
    pub mail6: BTreeMap<P6, u8>,
    pub exip4: BTreeMap<[u8; 4], Exempt>,
    pub exip6: BTreeMap<[u8; 16], Exempt>,
    pub expfx4: BTreeMap<P4, Exempt>,
    pub expfx6: BTreeMap<P6, Exempt>,
    pub exnet6: BTreeMap<NetKey6, Exempt>,
}

/// Wall clock to boot-time clock, with the offset sampled once: recomputing the desired state
/// later gives the same kernel expiry for the same wall-clock `until`, so unchanged timed
/// entries are not rewritten on every change.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    offset_ns: i128,
}

impl Clock {
    pub fn sample() -> Clock {
        Clock::sample_at(jiff::Timestamp::now())
    }

    /// As [`Clock::sample`], for a wall time read elsewhere (the daemon's guarded clock).
    pub fn sample_at(wall: jiff::Timestamp) -> Clock {
        Clock {
            offset_ns: wall.as_nanosecond() - boot_ns() as i128,
        }
    }

    /// (wall, boot) for `wall`, consistent with every earlier call.
    pub fn at(&self, wall: jiff::Timestamp) -> (jiff::Timestamp, u64) {
        (wall, (wall.as_nanosecond() - self.offset_ns).max(0) as u64)
    }

    /// Re-samples when the wall clock has stepped by more than a second (NTP, an operator).
    pub fn resync(&mut self) -> bool {
        self.resync_at(jiff::Timestamp::now())
    }

    /// As [`Clock::resync`], for a wall time read elsewhere.
    pub fn resync_at(&mut self, wall: jiff::Timestamp) -> bool {
        let now = Clock::sample_at(wall);
        if (now.offset_ns - self.offset_ns).abs() > 1_000_000_000 {
            *self = now;
            true
        } else {
            false
        }
    }
}

/// Converts a wall-clock expiry to the kernel's boot-time clock. `None` = already over.
pub fn expiry_ns(
    until: Option<jiff::Timestamp>,
    now_wall: jiff::Timestamp,
    now_boot: u64,
) -> Option<u64> {
    match until {
        None => Some(0),
        Some(t) => {
            let left = t.duration_since(now_wall);
            if left.is_negative() || left.is_zero() {
                None
            } else {
                let left = left.as_nanos().min(u64::MAX as i128 / 2) as u64;
                Some(now_boot.saturating_add(left).max(1))
            }
        }
    }
}

fn split(p: &Prefix) -> (Option<P4>, Option<P6>) {
    match p.addr {
        IpAddr::V4(a) => (Some((a.octets(), p.len as u32)), None),
        IpAddr::V6(a) => (None, Some((a.octets(), p.len as u32))),
    }
}

impl Desired {
    pub fn from_config(cfg: &Config, now_wall: jiff::Timestamp, now_boot: u64) -> Desired {
        let mut d = Desired {
            settings: Settings {
                layout: LAYOUT_VERSION,
                flags: listed_flags(
                    cfg.subscriber_ranges.iter().any(|p| p.addr.is_ipv4()),
                    cfg.subscriber_ranges.iter().any(|p| p.addr.is_ipv6()),
                ) | if cfg.action == Action::Reject {
                    FLAG_REJECT
                } else {
                    0
                },
                ..Default::default()
            },
            ..Default::default()
        };
        for p in &cfg.blocked_ports {
            d.ports.insert(p.0, 1);
        }
        for p in &cfg.subscriber_ranges {
            match split(p) {
                (Some(k), _) => d.ranges4.insert(k, 1),
                (_, Some(k)) => d.ranges6.insert(k, 1),
                _ => None,
            };
        }
        for m in &cfg.mail_servers {
            match split(&m.prefix) {
                (Some(k), _) => d.mail4.insert(k, 1),
                (_, Some(k)) => d.mail6.insert(k, 1),
                _ => None,
            };
        }
        for e in &cfg.exempt {
            if let Some(expires_ns) = expiry_ns(e.until, now_wall, now_boot) {
                d.exempt(&e.prefix, expires_ns, ORIGIN_CONFIG);
            }
        }
        d
    }

    /// Adds an exempt prefix to the table its shape selects; on a key already present the
    /// longer expiry wins (0 = none), so two sources for one address never shorten each other.
    fn exempt(&mut self, p: &Prefix, expires_ns: u64, origin: u32) {
        fn merge<K: Ord>(t: &mut BTreeMap<K, Exempt>, k: K, v: Exempt) {
            let e = t.entry(k).or_insert(v);
            *e = crate::policy::index::longer(*e, v);
        }
        let v = Exempt {
            expires_ns,
            origin,
            _pad: 0,
        };
        match (p.addr, p.is_host()) {
            (IpAddr::V4(a), true) => merge(&mut self.exip4, a.octets(), v),
            (IpAddr::V6(a), true) => merge(&mut self.exip6, a.octets(), v),
            (IpAddr::V4(a), false) => merge(&mut self.expfx4, (a.octets(), p.len as u32), v),
            (IpAddr::V6(a), false) => merge(&mut self.expfx6, (a.octets(), p.len as u32), v),
        }
    }

    /// Config plus the registry's runtime servers and exempt entries: everything but users.
    pub fn base(
        cfg: &Config,
        entries: &[crate::registry::store::Entry],
        now_wall: jiff::Timestamp,
        now_boot: u64,
    ) -> Desired {
        let mut d = Desired::from_config(cfg, now_wall, now_boot);
        for e in entries {
            match e.kind {
                EntryKind::Server => {
                    if e.until.is_some_and(|t| t <= now_wall) {
                        continue;
                    }
                    match split(&e.prefix) {
                        (Some(k), _) => d.mail4.insert(k, 1),
                        (_, Some(k)) => d.mail6.insert(k, 1),
                        _ => None,
                    };
                }
                EntryKind::Exempt => {
                    if let Some(x) = expiry_ns(e.until, now_wall, now_boot) {
                        d.exempt(&e.prefix, x, ORIGIN_RUNTIME);
                    }
                }
            }
        }
        d
    }

    /// Config plus registry: runtime entries, and the session addresses and static bindings
    /// of users unblocked at `now_wall`. IPv6 session prefixes go to the hash probed per
    /// prefix length; more distinct lengths than the datapath probes is an error.
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

    pub fn from_config_now(cfg: &Config) -> Desired {
        Desired::from_config(cfg, jiff::Timestamp::now(), boot_ns())
    }
}

/// What one table needs: entries to write (new or changed) and keys to delete.
struct Plan<K, V> {
    put: Vec<(K, V)>,
    del: Vec<K>,
}

/// `known`: what the maps hold, when the caller knows it (the last applied state); `None`
/// reads the map (a reconcile, which also finds drift).
fn plan<T: Table>(
    t: &T,
    want: &BTreeMap<T::K, T::V>,
    known: Option<&BTreeMap<T::K, T::V>>,
    name: &str,
    dels_first: bool,
) -> Result<Plan<T::K, T::V>> {
    let read;
    let have = match known {
        Some(k) => k,
        None => {
            read = t.entries().with_context(|| format!("reading {name}"))?;
            &read
        }
    };
    let put: Vec<_> = want
        .iter()
        .filter(|(k, v)| have.get(k) != Some(v))
        .map(|(k, v)| (*k, *v))
        .collect();
    let del: Vec<_> = have
        .keys()
        .filter(|k| !want.contains_key(k))
        .copied()
        .collect();
    let new = put.iter().filter(|(k, _)| !have.contains_key(k)).count();
    let peak = if dels_first {
        have.len() - del.len() + new
    } else {
        have.len() + new
    };
    if peak > t.capacity() as usize {
        bail!(
            "{name}: {} entries do not fit its capacity of {} (map full); nothing was changed",
            peak,
            t.capacity()
        );
    }
    Ok(Plan { put, del })
}

fn put_all<T: Table>(t: &mut T, p: &Plan<T::K, T::V>, name: &str) -> Result<usize> {
    for (k, v) in &p.put {
        t.put(*k, *v)
            .with_context(|| format!("{name}: writing {k:?}"))?;
    }
    Ok(p.put.len())
}

/// An entry that closes its address: a session of a user who is not unblocked.
fn blocks(e: &Exempt) -> bool {
    e.owns() && e.expires_ns == crate::policy::index::BLOCKED_NS
}

fn put_where<T: Table<V = Exempt>>(
    t: &mut T,
    p: &Plan<T::K, Exempt>,
    name: &str,
    pred: impl Fn(&Exempt) -> bool,
) -> Result<usize> {
    let mut n = 0;
    for (k, v) in p.put.iter().filter(|(_, v)| pred(v)) {
        t.put(*k, *v)
            .with_context(|| format!("{name}: writing {k:?}"))?;
        n += 1;
    }
    Ok(n)
}

/// `s` probing the session prefix lengths of `old` too (longest first), when both fit.
fn with_lens_of(s: Settings, old: Option<Settings>) -> Settings {
    use port25_common::maps::MAX_SESSION_PREFIX_LENS;
    let Some(old) = old else { return s };
    let mut lens = std::collections::BTreeSet::new();
    for x in [&s, &old] {
        let n = (x.session_prefix_count as usize).min(MAX_SESSION_PREFIX_LENS);
        lens.extend(x.session_prefix_lens[..n].iter().copied());
    }
    if lens.len() > MAX_SESSION_PREFIX_LENS {
        return s;
    }
    let mut out = s;
    out.session_prefix_lens = [0; MAX_SESSION_PREFIX_LENS];
    for (i, l) in lens.iter().rev().enumerate() {
        out.session_prefix_lens[i] = *l;
    }
    out.session_prefix_count = lens.len() as u32;
    out
}

fn del_all<T: Table>(t: &mut T, p: &Plan<T::K, T::V>, name: &str) -> Result<usize> {
    for k in &p.del {
        t.del(*k)
            .with_context(|| format!("{name}: deleting {k:?}"))?;
    }
    Ok(p.del.len())
}

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

/// Refuses a state that cannot fit the maps, before anything is written or committed.
pub fn check_fits(live: &LiveMaps, want: &Desired) -> Result<()> {
    use port25_common::maps as m;
    let sizes = [
        (m::RANGES4, want.ranges4.len(), live.ranges4.capacity()),
        (m::RANGES6, want.ranges6.len(), live.ranges6.capacity()),
        (m::MAIL4, want.mail4.len(), live.mail4.capacity()),
        (m::MAIL6, want.mail6.len(), live.mail6.capacity()),
        (m::EXIP4, want.exip4.len(), live.exip4.capacity()),
        (m::EXIP6, want.exip6.len(), live.exip6.capacity()),
        (m::EXPFX4, want.expfx4.len(), live.expfx4.capacity()),
        (m::EXPFX6, want.expfx6.len(), live.expfx6.capacity()),
        (m::EXNET6, want.exnet6.len(), live.exnet6.capacity()),
    ];
    for (name, n, cap) in sizes {
        if n > cap as usize {
            bail!("{name}: {n} entries do not fit its capacity of {cap} (map full); nothing was changed");
        }
    }
    Ok(())
}

/// Refuses a per-change plan that would overfill an exempt map, before anything is written.
pub fn check_slots_fit(
    live: &LiveMaps,
    applied: &Desired,
    slots: &[(Slot, Option<Exempt>)],
) -> Result<()> {
    use port25_common::maps as m;
    let mut delta = [0i64; 5];
    for (slot, v) in slots {
        let have = match slot {
            Slot::Ip4(k) => applied.exip4.contains_key(k),
            Slot::Ip6(k) => applied.exip6.contains_key(k),
            Slot::Pfx4(k) => applied.expfx4.contains_key(k),
            Slot::Pfx6(k) => applied.expfx6.contains_key(k),
            Slot::Net6(k) => applied.exnet6.contains_key(k),
        };
        delta[slot_table(slot)] += v.is_some() as i64 - have as i64;
    }
    let tables = [
        (m::EXIP4, applied.exip4.len(), live.exip4.capacity()),
        (m::EXIP6, applied.exip6.len(), live.exip6.capacity()),
        (m::EXPFX4, applied.expfx4.len(), live.expfx4.capacity()),
        (m::EXPFX6, applied.expfx6.len(), live.expfx6.capacity()),
        (m::EXNET6, applied.exnet6.len(), live.exnet6.capacity()),
    ];
    for (i, (name, len, cap)) in tables.into_iter().enumerate() {
        let n = len as i64 + delta[i];
        if n > cap as i64 {
            bail!("{name}: {n} entries do not fit its capacity of {cap} (map full); nothing was changed");
        }
    }
    Ok(())
}

fn slot_table(s: &Slot) -> usize {
    match s {
        Slot::Ip4(_) => 0,
        Slot::Ip6(_) => 1,
        Slot::Pfx4(_) => 2,
        Slot::Pfx6(_) => 3,
        Slot::Net6(_) => 4,
    }
}

/// Writes a per-change plan: removals first (never opens anything), then additions, then the
/// probed prefix lengths (so a new length is probed only once its entries are in).
pub fn write_slots(
    live: &mut LiveMaps,
    slots: &[(Slot, Option<Exempt>)],
    settings: Option<Settings>,
) -> Result<()> {
    // As in a full apply: old and new prefix lengths probed, blocked sessions' entries in,
    // then deletes, then entries that open, then the new lengths alone.
    if let Some(s) = settings {
        let early = with_lens_of(s, live.settings.get(&0, 0).ok());
        if early != s {
            live.settings.set(0, early, 0).context("writing settings")?;
        }
    }
    for (slot, v) in slots {
        let Some(v) = v.filter(blocks) else { continue };
        match slot {
            Slot::Ip4(k) => live.exip4.put(*k, v),
            Slot::Ip6(k) => live.exip6.put(*k, v),
            Slot::Pfx4(k) => live.expfx4.put(*k, v),
            Slot::Pfx6(k) => live.expfx6.put(*k, v),
            Slot::Net6(k) => live.exnet6.put(*k, v),
        }
        .with_context(|| format!("writing {slot:?}"))?;
    }
    for (slot, _) in slots.iter().filter(|(_, v)| v.is_none()) {
        match slot {
            Slot::Ip4(k) => live.exip4.del(*k),
            Slot::Ip6(k) => live.exip6.del(*k),
            Slot::Pfx4(k) => live.expfx4.del(*k),
            Slot::Pfx6(k) => live.expfx6.del(*k),
            Slot::Net6(k) => live.exnet6.del(*k),
        }
        .with_context(|| format!("deleting {slot:?}"))?;
    }
    for (slot, v) in slots {
        let Some(v) = v.filter(|v| !blocks(v)) else {
            continue;
        };
        match slot {
            Slot::Ip4(k) => live.exip4.put(*k, v),
            Slot::Ip6(k) => live.exip6.put(*k, v),
            Slot::Pfx4(k) => live.expfx4.put(*k, v),
            Slot::Pfx6(k) => live.expfx6.put(*k, v),
            Slot::Net6(k) => live.exnet6.put(*k, v),
        }
        .with_context(|| format!("writing {slot:?}"))?;
    }
    if let Some(s) = settings {
        live.settings.set(0, s, 0).context("writing settings")?;
    }
    Ok(())
}

fn apply_from(live: &mut LiveMaps, known: Option<&Desired>, want: &Desired) -> Result<Applied> {
    use port25_common::maps as m;
    let k = known;
    // Every plan first: a map that would overflow stops the change before any write.
    let ports = plan(
        &live.ports,
        &want.ports,
        k.map(|k| &k.ports),
        m::PORTS,
        false,
    )?;
    let r4 = plan(
        &live.ranges4,
        &want.ranges4,
        k.map(|k| &k.ranges4),
        m::RANGES4,
        false,
    )?;
    let r6 = plan(
        &live.ranges6,
        &want.ranges6,
        k.map(|k| &k.ranges6),
        m::RANGES6,
        false,
    )?;
    let m4 = plan(
        &live.mail4,
        &want.mail4,
        k.map(|k| &k.mail4),
        m::MAIL4,
        true,
    )?;
    let m6 = plan(
        &live.mail6,
        &want.mail6,
        k.map(|k| &k.mail6),
        m::MAIL6,
        true,
    )?;
    let e4 = plan(
        &live.exip4,
        &want.exip4,
        k.map(|k| &k.exip4),
        m::EXIP4,
        true,
    )?;
    let e6 = plan(
        &live.exip6,
        &want.exip6,
        k.map(|k| &k.exip6),
        m::EXIP6,
        true,
    )?;
    let p4 = plan(
        &live.expfx4,
        &want.expfx4,
        k.map(|k| &k.expfx4),
        m::EXPFX4,
        true,
    )?;
    let p6 = plan(
        &live.expfx6,
        &want.expfx6,
        k.map(|k| &k.expfx6),
        m::EXPFX6,
        true,
    )?;
    let n6 = plan(
        &live.exnet6,
        &want.exnet6,
        k.map(|k| &k.exnet6),
        m::EXNET6,
        true,
    )?;

    let old = match known {
        Some(k) => Some(k.settings),
        None => live.settings.get(&0, 0).ok(),
    };
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
    let mut writes = 0;

    writes += put_all(&mut live.ports, &ports, m::PORTS)?;
    writes += put_all(&mut live.ranges4, &r4, m::RANGES4)?;
    writes += put_all(&mut live.ranges6, &r6, m::RANGES6)?;
    if old != Some(early) {
        live.settings.set(0, early, 0).context("writing settings")?;
        writes += 1;
    }
    // Blocked sessions' entries close an address, so they go in before anything is deleted:
    // deleting one (or a pass entry) can only then expose what the new state holds.
    writes += put_where(&mut live.exip4, &e4, m::EXIP4, blocks)?;
    writes += put_where(&mut live.exip6, &e6, m::EXIP6, blocks)?;
    writes += put_where(&mut live.expfx4, &p4, m::EXPFX4, blocks)?;
    writes += put_where(&mut live.expfx6, &p6, m::EXPFX6, blocks)?;
    writes += put_where(&mut live.exnet6, &n6, m::EXNET6, blocks)?;
    writes += del_all(&mut live.mail4, &m4, m::MAIL4)?;
    writes += del_all(&mut live.mail6, &m6, m::MAIL6)?;
    writes += del_all(&mut live.exip4, &e4, m::EXIP4)?;
    writes += del_all(&mut live.exip6, &e6, m::EXIP6)?;
    writes += del_all(&mut live.expfx4, &p4, m::EXPFX4)?;
    writes += del_all(&mut live.expfx6, &p6, m::EXPFX6)?;
    writes += del_all(&mut live.exnet6, &n6, m::EXNET6)?;
    writes += put_all(&mut live.mail4, &m4, m::MAIL4)?;
    writes += put_all(&mut live.mail6, &m6, m::MAIL6)?;
    let opens = |e: &Exempt| !blocks(e);
    writes += put_where(&mut live.exip4, &e4, m::EXIP4, opens)?;
    writes += put_where(&mut live.exip6, &e6, m::EXIP6, opens)?;
    writes += put_where(&mut live.expfx4, &p4, m::EXPFX4, opens)?;
    writes += put_where(&mut live.expfx6, &p6, m::EXPFX6, opens)?;
    writes += put_where(&mut live.exnet6, &n6, m::EXNET6, opens)?;
    if early != want.settings {
        live.settings
            .set(0, want.settings, 0)
            .context("writing settings")?;
        writes += 1;
    }
    writes += del_all(&mut live.ports, &ports, m::PORTS)?;
    writes += del_all(&mut live.ranges4, &r4, m::RANGES4)?;
    writes += del_all(&mut live.ranges6, &r6, m::RANGES6)?;
    Ok(Applied { writes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::store::{Policy, Session, User};

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
        assert_eq!(
            with_lens_of(full, Some(lens(&[48]))),
            full,
            "9 do not fit: the new set"
        );
        assert_eq!(with_lens_of(lens(&[56]), None), lens(&[56]));
    }

    fn user(name: &str, policy: Policy, until: Option<&str>) -> User {
        User {
            name: name.into(),
            policy,
            until: until.map(|t| t.parse().unwrap()),
            reason: None,
            set_by: "root".into(),
            set_at: jiff::Timestamp::UNIX_EPOCH,
        }
    }

    fn session(id: &str, user: &str, addrs: &[&str]) -> Session {
        Session {
            id: id.into(),
            user: user.into(),
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            since: jiff::Timestamp::UNIX_EPOCH,
            source: "test".into(),
        }
    }

    #[test]
    fn unblocked_sessions_and_only_those_become_exempt() {
        let cfg = Config::parse(
            "exempt: [{prefix: 100.64.0.2/32, until: 2026-11-23T10:30:00Z}]\n",
            std::path::Path::new("t"),
        )
        .unwrap();
        let now: jiff::Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
        let boot = 1_000_000_000_000;
        let snap = Snapshot {
            users: vec![
                user("alice", Policy::Unblocked, None),
                user("bob", Policy::Blocked, None),
                user("carol", Policy::Unblocked, Some("2026-11-23T09:00:00Z")),
                user("dave", Policy::Unblocked, Some("2026-11-23T11:00:00Z")),
            ],
            sessions: vec![
                session(
                    "1",
                    "alice",
                    &["100.64.0.2", "2001:db8:1a0::/56", "2001:db8:100:1::/64"],
                ),
                session("2", "bob", &["100.64.0.3", "2001:db8:1a1::/56"]),
                session("3", "carol", &["100.64.0.4"]),
                session("4", "dave", &["100.64.0.5", "2001:db8:100:2::9"]),
            ],
            ..Default::default()
        };
        let d = Desired::build(&cfg, &snap, now, boot).unwrap();
        let ip4 = |s: &str| s.parse::<std::net::Ipv4Addr>().unwrap().octets();
        fn live<K>(t: &BTreeMap<K, Exempt>, boot: u64) -> usize {
            t.values().filter(|e| e.live(boot)).count()
        }
        assert_eq!(
            live(&d.exip4, boot),
            2,
            "alice and dave; bob blocked, carol's unblock over"
        );
        assert_eq!(
            d.exip4[&ip4("100.64.0.3")].expires_ns,
            crate::policy::index::BLOCKED_NS,
            "bob's address is there, blocking: no wider prefix may exempt it"
        );
        assert_eq!(d.exip4.len(), 4);
        assert_eq!(
            d.exip4[&ip4("100.64.0.2")].expires_ns,
            0,
            "permanent beats the config's 30 min"
        );
        assert_eq!(
            d.exip4[&ip4("100.64.0.5")].expires_ns,
            boot + 3600 * 1_000_000_000
        );
        assert_eq!(d.exip6.len(), 1, "dave's /128");
        assert_eq!(live(&d.exnet6, boot), 2, "alice's /56 and /64");
        assert_eq!(d.exnet6.len(), 3, "and bob's /56, blocking");
        assert_eq!(d.settings.session_prefix_count, 2);
        assert_eq!(
            &d.settings.session_prefix_lens[..2],
            &[64, 56],
            "longest first"
        );
    }

    #[test]
    fn more_prefix_lengths_than_the_datapath_probes_are_refused() {
        let cfg = Config::parse("interfaces: []\n", std::path::Path::new("t")).unwrap();
        let now: jiff::Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
        let addrs: Vec<String> = (48..=56).map(|l| format!("2001:db8:1a0::/{l}")).collect();
        let sessions = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| session(&i.to_string(), "alice", &[a]))
            .collect();
        let snap = Snapshot {
            users: vec![user("alice", Policy::Unblocked, None)],
            sessions,
            ..Default::default()
        };
        let e = Desired::build(&cfg, &snap, now, 1).unwrap_err().to_string();
        assert!(e.contains("distinct IPv6 prefix lengths"), "{e}");
    }
}
