//! From policy to map contents, and the apply that gets the maps there.
//!
//! The apply never opens port 25 on the way: additions that restrict (blocked ports, enforced
//! ranges) go first and their removals last; removals of allow entries (mail servers, exempt)
//! go before their additions. A change that would overfill any map is refused before the first
//! write, so a full map fails the whole change and nothing is half applied.

use std::{collections::BTreeMap, net::IpAddr};

use anyhow::{bail, Context as _, Result};
use port25_common::maps::{
    Exempt, NetKey6, Settings, FLAG_ENFORCE_LISTED, LAYOUT_VERSION, ORIGIN_CONFIG,
};

use crate::{
    config::Config,
    livemaps::{boot_ns, LiveMaps, Table},
    net::Prefix,
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
                flags: if cfg.subscriber_ranges.is_empty() {
                    0
                } else {
                    FLAG_ENFORCE_LISTED
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
        for p in &cfg.mail_servers {
            match split(p) {
                (Some(k), _) => d.mail4.insert(k, 1),
                (_, Some(k)) => d.mail6.insert(k, 1),
                _ => None,
            };
        }
        for e in &cfg.exempt {
            let Some(expires_ns) = expiry_ns(e.until, now_wall, now_boot) else {
                continue;
            };
            let v = Exempt {
                expires_ns,
                origin: ORIGIN_CONFIG,
                _pad: 0,
            };
            match (e.prefix.addr, e.prefix.is_host()) {
                (IpAddr::V4(a), true) => d.exip4.insert(a.octets(), v),
                (IpAddr::V6(a), true) => d.exip6.insert(a.octets(), v),
                (IpAddr::V4(a), false) => d.expfx4.insert((a.octets(), e.prefix.len as u32), v),
                (IpAddr::V6(a), false) => d.expfx6.insert((a.octets(), e.prefix.len as u32), v),
            };
        }
        d
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

fn plan<T: Table>(
    t: &T,
    want: &BTreeMap<T::K, T::V>,
    name: &str,
    dels_first: bool,
) -> Result<Plan<T::K, T::V>> {
    let have = t.entries().with_context(|| format!("reading {name}"))?;
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

pub fn apply(live: &mut LiveMaps, want: &Desired) -> Result<Applied> {
    use port25_common::maps as m;
    // Every plan first: a map that would overflow stops the change before any write.
    let ports = plan(&live.ports, &want.ports, m::PORTS, false)?;
    let r4 = plan(&live.ranges4, &want.ranges4, m::RANGES4, false)?;
    let r6 = plan(&live.ranges6, &want.ranges6, m::RANGES6, false)?;
    let m4 = plan(&live.mail4, &want.mail4, m::MAIL4, true)?;
    let m6 = plan(&live.mail6, &want.mail6, m::MAIL6, true)?;
    let e4 = plan(&live.exip4, &want.exip4, m::EXIP4, true)?;
    let e6 = plan(&live.exip6, &want.exip6, m::EXIP6, true)?;
    let p4 = plan(&live.expfx4, &want.expfx4, m::EXPFX4, true)?;
    let p6 = plan(&live.expfx6, &want.expfx6, m::EXPFX6, true)?;
    let n6 = plan(&live.exnet6, &want.exnet6, m::EXNET6, true)?;

    let old = live.settings.get(&0, 0).ok();
    let settings_changed = old != Some(want.settings);
    // Enforcing every source is the restrictive direction: write it before anything opens.
    let settings_restrict = want.settings.flags & FLAG_ENFORCE_LISTED == 0;
    let mut writes = 0;

    writes += put_all(&mut live.ports, &ports, m::PORTS)?;
    writes += put_all(&mut live.ranges4, &r4, m::RANGES4)?;
    writes += put_all(&mut live.ranges6, &r6, m::RANGES6)?;
    if settings_changed && settings_restrict {
        live.settings
            .set(0, want.settings, 0)
            .context("writing settings")?;
        writes += 1;
    }
    writes += del_all(&mut live.mail4, &m4, m::MAIL4)?;
    writes += del_all(&mut live.mail6, &m6, m::MAIL6)?;
    writes += del_all(&mut live.exip4, &e4, m::EXIP4)?;
    writes += del_all(&mut live.exip6, &e6, m::EXIP6)?;
    writes += del_all(&mut live.expfx4, &p4, m::EXPFX4)?;
    writes += del_all(&mut live.expfx6, &p6, m::EXPFX6)?;
    writes += del_all(&mut live.exnet6, &n6, m::EXNET6)?;
    writes += put_all(&mut live.mail4, &m4, m::MAIL4)?;
    writes += put_all(&mut live.mail6, &m6, m::MAIL6)?;
    writes += put_all(&mut live.exip4, &e4, m::EXIP4)?;
    writes += put_all(&mut live.exip6, &e6, m::EXIP6)?;
    writes += put_all(&mut live.expfx4, &p4, m::EXPFX4)?;
    writes += put_all(&mut live.expfx6, &p6, m::EXPFX6)?;
    writes += put_all(&mut live.exnet6, &n6, m::EXNET6)?;
    if settings_changed && !settings_restrict {
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
