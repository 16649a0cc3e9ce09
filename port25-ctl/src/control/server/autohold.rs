//! What the daemon does about a source the likely-infected rule flags: name the user who
//! holds the address, put them on an abuse hold (`abuse.auto_hold`), run the operator's
//! `abuse.notify_command`.
//!
//! When it looks: at each block event (the kernel sends at most one per source per
//! `event_interval`, and the event carries the source's counts, so only an event over the
//! rule costs more than a comparison: one lookup of its entry), and every
//! `abuse.scan_interval` over the whole offender map (a source whose events were lost, one
//! that crossed the rule between two events, `auto_hold` turned on by a reload; and the
//! likely-infected gauge). Never a walk of the map per event.
//!
//! What counts against a user: only the counts of windows that began while they held the
//! address (since their session started, and since their last `unhold`), so a dynamic
//! address handed on from a sprayer to the next subscriber, or a user the abuse desk has just
//! released, is not held on someone else's (or the old) figures.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use jiff::Timestamp;
use port25_common::maps::{BlockEvent, Offender, OffenderKey};
use tracing::{debug, error, warn};

use super::{
    notify::{Notice, Notifier},
    Daemon,
};
use crate::{
    bpf::{livemaps::boot_ns, offenders},
    registry::{self, store::Tx, Actor},
};

/// A flagged source is looked at again at most this often (its holder looked up, the hold
/// and notification decided): the events and scans in between cost a map lookup only.
const RECHECK: Duration = Duration::from_secs(60);

/// Flagged sources looked at (holder lookup, hold, notification) per second, events and scans
/// together. One subscriber can flag a source per address of its /64 (tens of thousands in
/// a few seconds); each look is registry queries on the daemon's loop, which then stalled
/// every write (a `session up` waited 12 s for 60,000). The rest wait for the next scan.
pub const LOOKS_PER_SECOND: u32 = 200;

/// Who the audit log names for an automatic hold.
pub const ACTOR: &str = "port25-ctl daemon (auto_hold)";

pub(super) struct Flagged {
    seen: HashMap<IpAddr, Seen>,
    notifier: Notifier,
    pub(super) next_scan: tokio::time::Instant,
    /// Start of the current second of [`LOOKS_PER_SECOND`], and the looks taken in it.
    looks: (Instant, u32),
}

struct Seen {
    at: Option<Instant>,
    /// "No user holds it" has been logged for this source (once while it stays flagged).
    logged_no_user: bool,
    /// "Arrived where it is not routed" has been logged for this source.
    logged_forged: bool,
}

impl Flagged {
    pub(super) fn new(scan: Duration) -> Flagged {
        Flagged {
            seen: HashMap::new(),
            notifier: Notifier::default(),
            next_scan: tokio::time::Instant::now() + scan,
            looks: (Instant::now(), 0),
        }
    }

    /// One look from this second's budget, if any is left.
    fn take_look(&mut self) -> bool {
        let (start, used) = &mut self.looks;
        if start.elapsed() >= Duration::from_secs(1) {
            *start = Instant::now();
            *used = 0;
        }
        *used += 1;
        *used <= LOOKS_PER_SECOND
    }

    /// Forgets every decision (a reload may have turned `auto_hold` on, changed the rule).
    pub(super) fn reset(&mut self) {
        self.seen.clear();
    }
}

/// The source's figures that count against a holder since `since` (boot ns; None: all).
/// The kernel keeps two windows; `first_ns` bounds both, `window_ns` the current one.
fn seen_forged(f: &mut Flagged, src: IpAddr) -> &mut bool {
    &mut f
        .seen
        .entry(src)
        .or_insert(Seen {
            at: None,
            logged_no_user: false,
            logged_forged: false,
        })
        .logged_forged
}

fn attributable(o: &Offender, boot: u64, window_ns: u64, since: Option<u64>) -> (u64, u64) {
    let o = match since {
        None => *o,
        Some(s) if o.first_ns >= s => *o,
        Some(s) if o.window_ns >= s => Offender {
            prev_attempts: 0,
            prev_dests: 0,
            ..*o
        },
        Some(_) => return (0, 0),
    };
    let (a, d, _) = offenders::figures(&o, boot, window_ns);
    (a, d)
}

/// The holder of `ip`, how, and since when their figures count (boot ns).
fn holder(
    tx: &dyn Tx,
    ip: IpAddr,
    wall: Timestamp,
    boot: u64,
) -> anyhow::Result<Option<(String, String, Option<u64>)>> {
    let Some((user, how, session)) = registry::holder_since(tx, ip)? else {
        return Ok(None);
    };
    let since = session.max(registry::last_unhold(tx, &user)?);
    let since = since.map(|t| {
        let ago = wall.duration_since(t).as_nanos().max(0) as u64;
        boot.saturating_sub(ago)
    });
    Ok(Some((user, how, since)))
}

impl Daemon {
    /// A block event over the rule: its source's entry is looked at.
    pub(super) fn flag_event(&mut self, e: &BlockEvent) {
        let a = &self.cfg.abuse;
        if !a.flagged(e.attempts, offenders::estimate(e.dests)) {
            return;
        }
        let Some(m) = self.live.offenders.as_ref() else {
            return;
        };
        if let Ok(o) = m.0.get(&e.key, 0) {
            self.consider(&e.key, &o, boot_ns());
        }
    }

    /// The whole offender map: the gauge, and each flagged source considered.
    pub(super) fn scan_offenders(&mut self) {
        self.flagged.next_scan = tokio::time::Instant::now() + self.cfg.abuse.scan_interval;
        if self.cfg.abuse.track_sources == 0 {
            self.metrics.likely_infected.set(0);
            return;
        }
        let entries = match offenders::read_all(&self.live) {
            Ok(e) => e,
            Err(e) => {
                error!("reading the offender map: {e:#}");
                return;
            }
        };
        let boot = boot_ns();
        let window_ns = self.cfg.abuse.flag_window.as_nanos() as u64;
        let mut flagged = HashSet::new();
        for (k, o) in &entries {
            let (a, d, _) = offenders::figures(o, boot, window_ns);
            if self.cfg.abuse.flagged(a, d) {
                flagged.insert(offenders::source(k));
                self.consider(k, o, boot);
            }
        }
        self.flagged.seen.retain(|ip, _| flagged.contains(ip));
        self.metrics.likely_infected.set(flagged.len() as i64);
    }

    /// A source: flagged? held by whom? Then the hold and the notification.
    fn consider(&mut self, k: &OffenderKey, o: &Offender, boot: u64) {
        let a = self.cfg.abuse.clone();
        let window_ns = a.flag_window.as_nanos() as u64;
        let (attempts, dests, _) = offenders::figures(o, boot, window_ns);
        if !a.flagged(attempts, dests) {
            return;
        }
        let src = offenders::source(k);
        let recent = self
            .flagged
            .seen
            .get(&src)
            .and_then(|s| s.at)
            .is_some_and(|t| t.elapsed() < RECHECK);
        if recent || !self.flagged.take_look() {
            return;
        }
        let seen = self.flagged.seen.entry(src).or_insert(Seen {
            at: None,
            logged_no_user: false,
            logged_forged: false,
        });
        seen.at = Some(Instant::now());
        let wall = self.wall.now();
        let found = self
            .store
            .read()
            .and_then(|tx| holder(&*tx, src, wall, boot));
        let (user, how, since) = match found {
            Ok(Some(h)) => h,
            Ok(None) => {
                if !std::mem::replace(&mut seen.logged_no_user, true) {
                    warn!(%src, attempts, destinations = dests, "likely infected, but no live session or binding holds the address: nobody to hold or notify");
                }
                return;
            }
            Err(e) => {
                error!(%src, "looking up who holds a likely infected source: {e:#}");
                return;
            }
        };
        let (attempts, dests) = attributable(o, boot, window_ns, since);
        if !a.flagged(attempts, dests) {
            debug!(%src, %user, "flagged on counts from before {user} held the address (or was last released): not theirs");
            return;
        }
        let forged = !self.arrived_where_routed(src, o.ifindex);
        if forged && !std::mem::replace(seen_forged(&mut self.flagged, src), true) {
            warn!(%src, %user, arrived_ifindex = o.ifindex, "likely infected, but its segments arrived on a device the kernel does not route that address through (a forged source?): not held; notified as not held");
        }
        let held = if a.auto_hold && !forged {
            self.auto_hold(&user, src, &how, attempts, dests)
        } else {
            self.store
                .read()
                .and_then(|tx| Ok(tx.user(&user)?.is_some_and(|u| u.hold.is_some())))
                .unwrap_or(false)
        };
        if let Some(argv) = &a.notify_command {
            let n = Notice {
                user,
                addr: src,
                attempts,
                destinations: dests,
                held,
            };
            self.flagged
                .notifier
                .notify(argv, a.notify_interval, n, &self.metrics);
        }
    }

    /// A reverse-path check at decision time: did the source's last blocked segment arrive
    /// on the device the kernel routes that address through? The programs run before the
    /// stack's own source check (rp_filter), so one subscriber can send as another; on a BRAS
    /// each subscriber has a device (pppN) and a forged source shows as arriving elsewhere.
    /// Segments seen at a TC egress hook (the upstream side) carry the upstream device:
    /// nothing to compare there. On a shared segment (several subscribers behind one device)
    /// this check cannot tell, and anti-spoofing belongs to the access network.
    fn arrived_where_routed(&self, src: IpAddr, arrived: u32) -> bool {
        if arrived == 0 {
            return true;
        }
        if crate::bpf::route::oif(src) == Some(arrived) {
            return true;
        }
        // The devices the link events keep, not a fresh scan: a forged flood reaches here up to
        // 200 times a second, and a BRAS has thousands of devices.
        let targets = self.cfg.targets(&self.devices.names());
        targets.iter().any(|t| {
            t.iface.hook == crate::config::Hook::Tc
                && t.iface.direction == crate::config::Direction::Egress
                && crate::bpf::linkinfo::ifindex(&t.iface.name) == arrived
        })
    }

    /// `block USER --hold` on the flag's figures, unless USER is on a hold already (then
    /// nothing is written, nor audited). Whether USER is held afterwards.
    fn auto_hold(&mut self, user: &str, src: IpAddr, how: &str, attempts: u64, dests: u64) -> bool {
        let a = &self.cfg.abuse;
        let reason = format!(
            "auto_hold: likely infected: {attempts} attempts, {dests} distinct destinations \
             within {}s from {src} ({how}); rule: more than {} destinations or {} attempts",
            a.flag_window.as_secs(),
            a.flag_destinations,
            a.flag_attempts
        );
        let actor = Actor {
            uid: nix::unistd::geteuid().as_raw(),
            name: ACTOR.into(),
            on_behalf_of: None,
        };
        let r = self.change(|tx, now| {
            if tx.user(user)?.is_some_and(|u| u.hold.is_some()) {
                return Ok(false);
            }
            registry::block(tx, &actor, user, Some(reason.clone()), false, true, now)?;
            Ok(true)
        });
        match r {
            Ok(true) => {
                self.metrics.auto_holds.inc();
                warn!(%user, %src, attempts, destinations = dests, "likely infected: put on an abuse hold (auto_hold)");
                true
            }
            Ok(false) => true,
            Err(e) => {
                error!(%user, %src, "auto_hold failed: {e:#}");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_windows_begun_since_the_holder_came_count() {
        let w = 600;
        let o = Offender {
            first_ns: 100,
            window_ns: 700,
            attempts: 5,
            dests: 0b11,
            prev_attempts: 500,
            prev_dests: u64::MAX,
            ..Default::default()
        };
        assert_eq!(attributable(&o, 710, w, None), (500, 266));
        assert_eq!(attributable(&o, 710, w, Some(100)), (500, 266));
        assert_eq!(
            attributable(&o, 710, w, Some(650)),
            (5, 2),
            "the current window only"
        );
        assert_eq!(attributable(&o, 710, w, Some(701)), (0, 0), "none of it");
    }
}
