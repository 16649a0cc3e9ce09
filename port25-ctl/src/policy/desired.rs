//! The desired state: everything the maps should hold, built from the config and the
//! registry's runtime entries; the users' entries are added by [`crate::policy::index`].

use std::{collections::BTreeMap, net::IpAddr};

use port25_common::maps::{
    listed_flags, Exempt, Settings, FLAG_REJECT, LAYOUT_VERSION, ORIGIN_CONFIG, ORIGIN_RUNTIME,
};

use crate::{
    bpf::{
        livemaps::{boot_ns, Contents, Table},
        maps::{decl::*, map_list},
    },
    config::{Action, Config},
    net::Prefix,
    policy::slot::{longer, Slot},
    registry::store::EntryKind,
};

type P4 = ([u8; 4], u32);
type P6 = ([u8; 16], u32);

/// The first expression, or the second when there is one.
macro_rules! copy_or_merge {
    ($copy:expr) => {
        $copy
    };
    ($copy:expr, $merge:expr) => {
        $merge
    };
}

macro_rules! desired {
    (
        $sf:ident: $sn:ident = $st:ty;
        policy { $( $stage:ident { $( $f:ident: $n:ident = $t:ty, $cap:expr $(, $slot:ident)?; )* } )* }
        $cf:ident: $cn:ident = $ct:ty, $ccap:expr;
        abuse { $( $af:ident: $an:ident = $at:ty, $acap:expr; )* }
    ) => {
        /// Everything the maps should hold: the settings record and one collection per
        /// policy map of the map list.
        #[derive(Debug, Default, Clone, PartialEq)]
        pub struct Desired {
            pub $sf: Settings,
            $( $( pub $f: Contents<$t>, )* )*
        }

        impl Desired {
            /// The entry at an exempt key.
            pub fn slot(&self, s: &Slot) -> Option<Exempt> {
                match s {
                    $( $( $( Slot::$slot(k) => self.$f.get(k).copied(), )? )* )*
                }
            }

            /// Sets (`Some`) or removes (`None`) the entry at an exempt key.
            pub fn set_slot(&mut self, s: &Slot, v: Option<Exempt>) {
                fn put<K: Ord + Copy>(t: &mut BTreeMap<K, Exempt>, k: &K, v: Option<Exempt>) {
                    match v {
                        Some(v) => t.insert(*k, v),
                        None => t.remove(k),
                    };
                }
                match s {
                    $( $( $( Slot::$slot(k) => put(&mut self.$f, k, v), )? )* )*
                }
            }

            /// Merges `v` into the entry at an exempt key: the [`longer`] of the two.
            pub fn merge_slot(&mut self, s: &Slot, v: Exempt) {
                fn merge<K: Ord + Copy>(t: &mut BTreeMap<K, Exempt>, k: &K, v: Exempt) {
                    t.entry(*k)
                        .and_modify(|have| *have = longer(*have, v))
                        .or_insert(v);
                }
                match s {
                    $( $( $( Slot::$slot(k) => merge(&mut self.$f, k, v), )? )* )*
                }
            }

            /// (map name, entries) for every policy map: what the maps hold once applied.
            pub fn fill(&self) -> Vec<(&'static str, usize)> {
                vec![ $( $( (port25_common::maps::$n, self.$f.len()), )* )* ]
            }

            /// `self` with every entry of `entries` merged in: equal to [`Desired::merge_slot`]
            /// of each in turn ([`longer`] is order-free), but each map's new entries are
            /// sorted once and merged with its entries into a map built whole (a million
            /// tree inserts one by one were most of a start's build).
            pub fn merged(&self, entries: impl Iterator<Item = (Slot, Exempt)>) -> Desired {
                $( $( $( let mut $f: Vec<(<$t as Table>::K, Exempt)> = Vec::new(); let _ = stringify!($slot); )? )* )*
                for (s, v) in entries {
                    match s {
                        $( $( $( Slot::$slot(k) => $f.push((k, v)), )? )* )*
                    }
                }
                Desired {
                    $sf: self.$sf,
                    $( $(
                        // A map no slot names is copied; an exempt map, merged.
                        $f: copy_or_merge!(self.$f.clone() $(, { let _ = stringify!($slot); merge_sorted(&self.$f, $f) })?),
                    )* )*
                }
            }

            /// How many entries the map of an exempt key holds.
            pub fn slot_map_len(&self, s: &Slot) -> usize {
                match s {
                    $( $( $( Slot::$slot(_) => self.$f.len(), )? )* )*
                }
            }
        }
    };
}
map_list!(desired);

/// `have` with `add` merged in, entry by entry the [`longer`] of the two for a key.
fn merge_sorted<K: Ord + Copy>(
    have: &BTreeMap<K, Exempt>,
    mut add: Vec<(K, Exempt)>,
) -> BTreeMap<K, Exempt> {
    if add.is_empty() {
        return have.clone();
    }
    add.sort_unstable_by_key(|(k, _)| *k);
    add.dedup_by(|(k, v), (kept_k, kept_v)| {
        if k == kept_k {
            *kept_v = longer(*kept_v, *v);
            true
        } else {
            false
        }
    });
    let mut out = Vec::with_capacity(have.len() + add.len());
    let (mut h, mut a) = (have.iter().peekable(), add.into_iter().peekable());
    loop {
        match (h.peek(), a.peek()) {
            (Some((hk, hv)), Some((ak, av))) if *hk == ak => {
                out.push((**hk, longer(**hv, *av)));
                h.next();
                a.next();
            }
            (Some((hk, hv)), Some((ak, _))) if *hk < ak => {
                out.push((**hk, **hv));
                h.next();
            }
            (Some((hk, hv)), None) => {
                out.push((**hk, **hv));
                h.next();
            }
            (_, Some(_)) => out.extend(a.next()),
            (None, None) => break,
        }
    }
    // Sorted and unique: the tree is built bottom-up from it, not by a search per entry.
    BTreeMap::from_iter(out)
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

fn exempt(expires_ns: u64, origin: u32) -> Exempt {
    Exempt {
        expires_ns,
        origin,
        _pad: 0,
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
        // A million config exempts: merged by map at once, not one by one.
        d.merged(cfg.exempt.iter().filter_map(|e| {
            let expires_ns = expiry_ns(e.until, now_wall, now_boot)?;
            Some((
                Slot::of(&e.prefix, false),
                exempt(expires_ns, ORIGIN_CONFIG),
            ))
        }))
    }

    /// Adds an exempt prefix to the table its shape selects; on a key already present the
    /// longer expiry wins (0 = none), so two sources for one address never shorten each other.
    fn exempt(&mut self, p: &Prefix, expires_ns: u64, origin: u32) {
        self.merge_slot(&Slot::of(p, false), exempt(expires_ns, origin));
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

    pub fn from_config_now(cfg: &Config) -> Desired {
        Desired::from_config(cfg, jiff::Timestamp::now(), boot_ns())
    }
}
