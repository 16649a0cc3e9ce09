//! `status` and `check`: read from the pins, so they tell the truth with the daemon down.

use std::net::IpAddr;

use anyhow::Result;
use port25_common::{parse::Packet, verdict::decide, Addr, Reason};
use serde::Serialize;

use crate::{
    bpf::datapath,
    bpf::livemaps::LiveMaps,
    bpf::pins::Pins,
    config::{Config, Hook},
    registry,
    registry::store::{sqlite::SqliteStore, Store},
};

#[derive(Debug, Serialize)]
pub struct IfaceStatus {
    pub name: String,
    pub hook: String,
    pub attach_point: String,
    pub attached: bool,
    /// `xdp`, `tcx` or `netlink` (None when nothing is attached).
    pub kind: Option<&'static str>,
    pub link_id: Option<u32>,
    pub prog_id: Option<u32>,
    /// netlink only: port25's filter priority and handle (`tc filter show`'s pref, handle).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handle: Option<String>,
    pub problem: Option<String>,
    /// Whether the attached program was loaded with `daemon --kernel-log`, read from its
    /// own load-time switch (None when it cannot be read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_log: Option<bool>,
}

/// One glob entry over the devices of this network namespace.
#[derive(Debug, Serialize)]
pub struct GlobStatus {
    pub pattern: String,
    pub hook: String,
    /// Matching devices (this entry governs them) on which port25 enforces.
    pub enforcing: usize,
    /// Matching devices where it does not (exit 3).
    pub not_enforced: Vec<IfaceStatus>,
    /// Every device it governs, enforcing or not.
    pub devices: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct MapFill {
    pub map: String,
    pub entries: usize,
    pub capacity: u32,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub daemon: Option<crate::control::reply::Info>,
    pub pin_dir: String,
    pub loaded: bool,
    pub interfaces: Vec<IfaceStatus>,
    /// Glob entries: how many devices each enforces, and which matching ones it does not.
    pub globs: Vec<GlobStatus>,
    /// Pinned links the config does not name (still enforcing).
    pub unconfigured_links: Vec<String>,
    pub maps: Vec<MapFill>,
    pub counters: Vec<(String, u64)>,
    /// Users and sessions in the registry (None before any daemon created it).
    pub registry: Option<crate::registry::store::sqlite::Counts>,
    /// Detached on purpose (who, when): daemon starts refuse to attach until `attach`.
    pub detached: Option<serde_json::Value>,
    /// How each family's sources are enforced, read from the pinned settings (None when
    /// the maps are not loaded).
    pub enforced: Option<Enforced>,
    /// Whether the attached programs send kernel debug messages (`daemon --kernel-log`):
    /// true when any does, None when no attached program's switch could be read.
    pub kernel_log: Option<bool>,
}

/// Which sources of each family are enforced: `"listed ranges"` or `"whole family"`.
#[derive(Debug, Serialize)]
pub struct Enforced {
    pub ipv4: &'static str,
    pub ipv6: &'static str,
}

fn family_scope(listed: bool) -> &'static str {
    if listed {
        "listed ranges"
    } else {
        "whole family"
    }
}

/// Settings unreadable = every source enforced, as the datapath does.
fn enforced_of(live: &LiveMaps) -> Enforced {
    let s = live.settings.get(&0, 0).ok();
    Enforced {
        ipv4: family_scope(s.is_some_and(|s| s.listed(false))),
        ipv6: family_scope(s.is_some_and(|s| s.listed(true))),
    }
}

impl Status {
    /// Healthy = every configured attachment is in place.
    pub fn healthy(&self) -> bool {
        self.loaded
            && self.interfaces.iter().all(|i| i.attached)
            && self.globs.iter().all(|g| g.not_enforced.is_empty())
    }
}

fn hook_text(i: &crate::config::Interface) -> String {
    match i.hook {
        Hook::Xdp => format!("xdp ({:?})", i.xdp_mode).to_lowercase(),
        Hook::Tc => format!("tc {}", i.direction),
    }
}

fn iface_status(pins: &Pins, i: &crate::config::Interface) -> IfaceStatus {
    let (a, problem) = datapath::inspect(pins, i);
    let a = a.unwrap_or_default();
    IfaceStatus {
        name: i.name.clone(),
        hook: hook_text(i),
        attach_point: i.attach_point(),
        attached: problem.is_none(),
        kind: (!a.kind.is_empty()).then_some(a.kind),
        link_id: a.link_id,
        prog_id: a.prog_id,
        priority: a.priority,
        handle: a.handle.map(|h| format!("{h:#x}")),
        problem,
        kernel_log: a.prog_id.and_then(datapath::kernel_log_of),
    }
}

/// Map fill: as the running daemon last applied it (it repairs drift at each reconcile), or
/// counted in the maps when no daemon answers.
fn fill(
    live: &LiveMaps,
    daemon: Option<&crate::control::reply::Info>,
) -> Result<Vec<(&'static str, usize, u32)>> {
    let known = daemon.map(|d| d.map_fill.as_slice()).unwrap_or_default();
    let of = |map: &str| known.iter().find(|(m, _)| m == map).map(|(_, n)| *n);
    let caps = live.capacities();
    // A daemon of an older version sends no fill (or not for every map): count.
    if caps.iter().any(|(map, _)| of(map).is_none()) {
        return live.fill();
    }
    Ok(caps
        .into_iter()
        .map(|(map, cap)| (map, of(map).unwrap_or_default(), cap))
        .collect())
}

pub fn status(cfg: &Config, daemon: Option<crate::control::reply::Info>) -> Result<Status> {
    let pins = Pins::new(&cfg.pin_dir);
    let interfaces: Vec<IfaceStatus> = cfg
        .interfaces
        .iter()
        .filter(|i| !i.is_glob())
        .map(|i| iface_status(&pins, i))
        .collect();
    let devices: Vec<String> = crate::bpf::linkinfo::devices()?
        .into_iter()
        .map(|(_, n)| n)
        .collect();
    let targets = cfg.targets(&devices);
    // Every attached program's switch, glob devices' included (their statuses are not kept).
    let mut kernel_logs: Vec<bool> = interfaces.iter().filter_map(|i| i.kernel_log).collect();
    let globs = cfg
        .interfaces
        .iter()
        .filter(|i| i.is_glob())
        .map(|g| {
            let mine: Vec<_> = targets
                .iter()
                .filter(|t| t.glob.as_deref() == Some(&g.name) && t.iface.kind() == g.kind())
                .map(|t| iface_status(&pins, &t.iface))
                .collect();
            kernel_logs.extend(mine.iter().filter_map(|i| i.kernel_log));
            GlobStatus {
                pattern: g.name.clone(),
                hook: hook_text(g),
                enforcing: mine.iter().filter(|i| i.attached).count(),
                devices: mine.iter().map(|i| i.name.clone()).collect(),
                not_enforced: mine.into_iter().filter(|i| !i.attached).collect(),
            }
        })
        .collect();
    let configured: Vec<String> = targets.iter().map(|t| t.iface.attach_point()).collect();
    // A glob device's pin whose device is gone is the daemon's to release, not foreign.
    let unconfigured_links = pins
        .pinned_links()
        .into_iter()
        .filter(|p| !configured.contains(p) && cfg.glob_owner(p).is_none())
        .collect();
    let (loaded, maps, counters, enforced) = match LiveMaps::open(&pins) {
        Ok(live) => (
            true,
            fill(&live, daemon.as_ref())?
                .into_iter()
                .map(|(map, entries, capacity)| MapFill {
                    map: map.into(),
                    entries,
                    capacity,
                })
                .collect(),
            live.counters()?
                .into_iter()
                .map(|(r, n)| (r.name().to_string(), n))
                .collect(),
            Some(enforced_of(&live)),
        ),
        Err(_) => (false, vec![], vec![], None),
    };
    let registry = SqliteStore::open_read_only(&cfg.state_dir)
        .and_then(|s| s.counts(jiff::Timestamp::now()))
        .ok();
    let kernel_log = kernel_logs.into_iter().reduce(|a, b| a || b);
    Ok(Status {
        kernel_log,
        detached: crate::bpf::detached::read(&cfg.state_dir),
        registry,
        daemon,
        pin_dir: pins.root.display().to_string(),
        loaded,
        interfaces,
        globs,
        unconfigured_links,
        maps,
        counters,
        enforced,
    })
}

/// The fleet replica's line of `status`.
fn fleet_text(f: &crate::control::reply::FleetInfo, now: jiff::Timestamp) -> String {
    let lag = match f.lag_changes {
        Some(n) => format!("{n} behind"),
        None => "lag unknown".into(),
    };
    let contact = match f.last_contact_unix_ms {
        Some(ms) => format!(
            "last answer {:.1}s ago",
            (now.as_millisecond() - ms).max(0) as f64 / 1e3
        ),
        None => "never answered".into(),
    };
    format!(
        "{}; change {} applied ({lag}), {} applied since start; publish queue {} users, {} \
         sessions; {} reconnects; {contact}",
        if f.connected {
            "connected"
        } else {
            "DISCONNECTED"
        },
        f.applied_change_id,
        f.changes_applied,
        f.publish_queue_users,
        f.publish_queue_sessions,
        f.reconnects,
    )
}

pub fn print_status(s: &Status) {
    match &s.daemon {
        Some(d) => println!(
            "daemon:     running (pid {}, up {}s, {} reconciles, {} drifted entries repaired)",
            d.pid, d.uptime_s, d.reconciles, d.drift_repaired
        ),
        None if s.interfaces.iter().any(|i| i.attached)
            || s.globs.iter().any(|g| g.enforcing > 0)
            || !s.unconfigured_links.is_empty() =>
        {
            println!("daemon:     DOWN (enforcement continues from the pins; figures below are read from them)")
        }
        // After a detach (or before the first start) nothing enforces: never claim it does.
        None => println!("daemon:     DOWN, and no program is attached: port 25 is NOT blocked"),
    }
    if let Some(f) = s.daemon.as_ref().and_then(|d| d.fleet.as_ref()) {
        println!("fleet:      {}", fleet_text(f, jiff::Timestamp::now()));
    }
    if let Some(d) = &s.detached {
        println!(
            "detached:   on purpose by {} at {}: starts refuse to attach until `port25-ctl attach` (or `daemon --attach`)",
            d["by"].as_str().unwrap_or("?"),
            d["at"].as_str().unwrap_or("?")
        );
    }
    println!(
        "pins:       {}{}",
        s.pin_dir,
        if s.loaded { "" } else { " (not loaded)" }
    );
    if let Some(r) = &s.registry {
        println!(
            "registry:   {} users, {} unblocked ({} timed), {} live sessions, {} held",
            r.users, r.unblocked, r.timed, r.sessions, r.held
        );
    }
    if let Some(e) = &s.enforced {
        println!(
            "enforced:   IPv4 {}, IPv6 {}",
            scope_text(e.ipv4),
            scope_text(e.ipv6)
        );
    }
    match s.kernel_log {
        // The logging programs sit in arrays private to the daemon that loaded them: with it
        // gone the kernel has emptied them and nothing is logged, whatever the switch says.
        Some(true) if s.daemon.is_none() => println!(
            "kernel log: off (the programs were loaded with `daemon --kernel-log`, but that daemon has exited: nothing is logged)"
        ),
        Some(true) => println!(
            "kernel log: on (the programs were loaded with `daemon --kernel-log`; target port25::kernel)"
        ),
        Some(false) => println!("kernel log: off"),
        None => {}
    }
    for i in &s.interfaces {
        let state = if i.attached { "attached" } else { "MISSING" };
        let ids = match (i.kind, i.link_id, i.prog_id, i.priority, &i.handle) {
            (Some(k), Some(l), Some(p), _, _) => format!(" {k} link {l} prog {p}"),
            (Some(k), None, p, Some(pref), Some(h)) => format!(
                " {k} pref {pref} handle {h}{}",
                p.map(|p| format!(" prog {p}")).unwrap_or_default()
            ),
            _ => String::new(),
        };
        let problem = i
            .problem
            .as_deref()
            .map(|p| format!(" ({p})"))
            .unwrap_or_default();
        println!(
            "interface:  {:<12} {:<16} {state}{ids}{problem}",
            i.name, i.hook
        );
    }
    for g in &s.globs {
        let missing = if g.not_enforced.is_empty() {
            String::new()
        } else {
            format!(", {} NOT enforced", g.not_enforced.len())
        };
        println!(
            "interface:  {:<12} {:<16} glob: enforcing on {} device{}{missing}",
            g.pattern,
            g.hook,
            g.enforcing,
            if g.enforcing == 1 { "" } else { "s" }
        );
        for i in &g.not_enforced {
            let problem = i.problem.as_deref().unwrap_or("not attached");
            println!("  {:<10} MISSING ({problem})", i.name);
        }
    }
    for l in &s.unconfigured_links {
        println!("interface:  {l} pinned but not in the config (still enforcing)");
    }
    if !s.maps.is_empty() {
        println!("maps:");
        for m in &s.maps {
            println!("  {:<14} {:>9} / {}", m.map, m.entries, m.capacity);
        }
        println!("counters (packets by reason):");
        for (r, n) in &s.counters {
            println!("  {r:<22} {n}");
        }
    }
}

fn scope_text(scope: &str) -> &'static str {
    if scope == "listed ranges" {
        "inside the listed subscriber_ranges"
    } else {
        "WHOLE (no subscriber_ranges of this family: every source)"
    }
}

#[derive(Debug, Serialize)]
pub struct Holder {
    pub user: String,
    pub via: String,
    pub policy: String,
    /// The holder's abuse hold (who set it, when, why); absent when not held.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold: Option<crate::registry::store::Hold>,
    /// Held, yet the live maps pass SRC: an exempt entry (config `exempt` or `exempt add`)
    /// keeps port 25 open on this address whatever the hold says.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub hold_not_effective: bool,
}

#[derive(Debug, Serialize)]
pub struct CheckResult {
    /// The user holding SRC per the registry (a live session or a static binding).
    pub holder: Option<Holder>,
    /// The registry read, or None when it could not be (no daemon has run here yet).
    pub registry: Option<String>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub port: u16,
    pub verdict: &'static str,
    pub reason: &'static str,
    pub explanation: &'static str,
    /// SRC's family has no listed subscriber range, so every source of it is enforced.
    pub family_enforced_whole: bool,
}

/// The verdict for a TCP packet SRC -> DST:PORT, decided by the shared core on the live maps.
pub fn check(cfg: &Config, src: IpAddr, dst: IpAddr, port: u16) -> Result<CheckResult> {
    if src.is_ipv4() != dst.is_ipv4() {
        anyhow::bail!("source and destination must be the same IP version");
    }
    let live = LiveMaps::open(&Pins::new(&cfg.pin_dir))?;
    let pkt = Packet::Tcp {
        src: Addr::from(src),
        dst: Addr::from(dst),
        dport: port,
    };
    let reason: Reason = decide(&pkt, &live);
    let scope = enforced_of(&live);
    let family_enforced_whole = if src.is_ipv4() {
        scope.ipv4
    } else {
        scope.ipv6
    } != "listed ranges";
    let (holder, registry) = match SqliteStore::open_read_only(&cfg.state_dir) {
        Ok(mut store) => {
            let tx = store.begin()?;
            let now = jiff::Timestamp::now();
            let holder = match registry::holder_of(&*tx, src)? {
                Some((user, via)) => {
                    let u = tx.user(&user)?;
                    let policy = match &u {
                        Some(u) => match (u.unblocked_at(now), u.until) {
                            (true, Some(t)) => format!("unblocked until {t}"),
                            (true, None) => "unblocked".to_string(),
                            (false, _) if u.hold.is_some() => "blocked, on hold".to_string(),
                            (false, _) => "blocked".to_string(),
                        },
                        None => "unknown".into(),
                    };
                    let hold = u.and_then(|u| u.hold);
                    // Port 25 itself (not another port, not a mail server) passing from a
                    // held user's address: only an exempt entry does that.
                    let hold_not_effective = hold.is_some()
                        && matches!(
                            reason,
                            Reason::PassExemptAddr
                                | Reason::PassExemptPrefix
                                | Reason::PassExemptSession
                        );
                    Some(Holder {
                        user,
                        via,
                        policy,
                        hold,
                        hold_not_effective,
                    })
                }
                None => None,
            };
            drop(tx);
            (holder, Some(store.path.display().to_string()))
        }
        Err(_) => (None, None),
    };
    Ok(CheckResult {
        holder,
        registry,
        src,
        dst,
        port,
        verdict: if reason.is_pass() { "pass" } else { "block" },
        reason: reason.name(),
        explanation: reason.explain(),
        family_enforced_whole,
    })
}
