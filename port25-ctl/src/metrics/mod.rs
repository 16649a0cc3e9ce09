//! Prometheus metrics (`metrics_listen`, `GET /metrics`, OpenMetrics text).
//!
//! Two sources, so that a scrape never waits for, nor slows, the daemon's single writer:
//! - the daemon's own figures ([`DaemonMetrics`]: requests, reconciles, drift, map fill),
//!   atomics the daemon sets and the scrape reads;
//! - everything else read by the scrape itself, on the metrics thread ([`http`]): the kernel's
//!   packet counters from the pinned map, the attachments from the pins, the registry sizes
//!   from its own read-only SQLite connection (a WAL read snapshot: it takes no lock the
//!   writer waits for).
//!
//! Map fill comes from the writer, not the kernel: counting a hash map's entries means
//! walking all its buckets (measured: 0.16 s per scrape with the default empty maps, 0.7 s
//! with a million exempt addresses), CPU the writer shares. The writer publishes what it
//! last made the maps hold, which is what the kernel holds but for drift (counted by
//! `port25_drift_repaired_total`; `status` reads the kernel's own).
//!
//! The kernel counts packets per reason in a per-CPU array, not per interface: the packet
//! counter has a `reason` label (and `verdict`, derived from it), no `interface` label.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};
use tokio::sync::watch;

use crate::{
    bpf::{datapath, livemaps::LiveMaps, pins::Pins},
    config::Config,
    control::error::ErrorKind,
    registry::store::sqlite::{Counts, SqliteStore},
};

pub mod http;

/// What the daemon itself counts; cloning shares the counters.
#[derive(Clone, Debug, Default)]
pub struct DaemonMetrics {
    requests: Family<RequestLabels, Counter>,
    pub reconciles: Counter,
    pub drift_repaired: Counter,
    map_entries: Family<MapLabels, Gauge<i64>>,
    /// Tracked sources the likely-infected rule flags, as of the daemon's last scan.
    pub likely_infected: Gauge<i64>,
    pub auto_holds: Counter,
    notify_runs: Family<ResultLabels, Counter>,
    /// With a fleet registry: what its writer and follower count.
    fleet: Option<Arc<crate::fleet::stats::FleetStats>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    verb: &'static str,
    result: &'static str,
}

/// A request that failed before its op could be read (busy, denied peer, bad frame).
pub const UNKNOWN_VERB: &str = "unknown";

impl DaemonMetrics {
    pub fn with_fleet(fleet: Option<Arc<crate::fleet::stats::FleetStats>>) -> DaemonMetrics {
        DaemonMetrics {
            fleet,
            ..Default::default()
        }
    }

    /// One answer on the control socket: `error` is None for a success.
    pub fn request(&self, verb: &'static str, error: Option<ErrorKind>) {
        let result = match error {
            None => "ok",
            Some(ErrorKind::Refused) => "refused",
            Some(ErrorKind::Denied) => "denied",
            Some(ErrorKind::Busy) => "busy",
            Some(ErrorKind::Internal) => "internal",
        };
        self.requests
            .get_or_create(&RequestLabels { verb, result })
            .inc();
    }

    /// One `notify_command` run ended (`ok`, `failed`, `timeout`, `error`) or was not
    /// started (`busy`).
    pub fn notify_run(&self, result: &'static str) {
        self.notify_runs
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// What the writer last made the policy maps hold: (map name, entries).
    pub fn map_fill(&self, fill: &[(&'static str, usize)]) {
        for &(map, n) in fill {
            self.map_entries
                .get_or_create(&MapLabels { map })
                .set(n as i64);
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PacketLabels {
    reason: &'static str,
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttachLabels {
    point: String,
    kind: &'static str,
}

/// What a scrape reads from: the daemon's counters and where the rest lives.
pub struct Sources {
    pub daemon: DaemonMetrics,
    /// The running config (replaced on reload): interfaces, pin tree, state dir.
    pub cfg: watch::Receiver<Arc<Config>>,
    /// This thread's own read-only registry connection, opened on first use.
    store: Option<(PathBuf, SqliteStore)>,
    /// The last registry sizes, when they were read and how long that took.
    counts: Option<(Counts, Instant, Duration)>,
}

/// Registry sizes are read again only once this many times their last reading's duration has
/// passed: a small registry is read every scrape, a million users (counting scans the table)
/// at most a tenth of the time, whatever the scrape rate.
const COUNTS_REUSE_FACTOR: u32 = 10;

impl Sources {
    pub fn new(daemon: DaemonMetrics, cfg: watch::Receiver<Arc<Config>>) -> Sources {
        Sources {
            daemon,
            cfg,
            store: None,
            counts: None,
        }
    }

    /// One scrape, encoded. What cannot be read (maps not loaded, registry unreadable) is left
    /// out, and `port25_datapath_loaded` / `port25_registry_up` say so.
    pub fn scrape(&mut self) -> String {
        let cfg = self.cfg.borrow().clone();
        let mut reg = Registry::default();
        reg.register(
            "port25_build",
            "The running port25-ctl",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        self.kernel(&cfg, &mut reg);
        self.maps(&cfg, &mut reg);
        attachments(&cfg, &mut reg);
        self.registry(&cfg, &mut reg);
        if let Some(f) = &self.daemon.fleet {
            fleet(&f.info(), &mut reg);
        }
        let d = &self.daemon;
        reg.register(
            "port25_requests",
            "Control socket requests answered, by verb and result",
            d.requests.clone(),
        );
        reg.register(
            "port25_reconciles",
            "Full reconciles of the maps to the registry",
            d.reconciles.clone(),
        );
        reg.register(
            "port25_drift_repaired",
            "Map writes made by reconciles to repair drift from the registry",
            d.drift_repaired.clone(),
        );
        reg.register(
            "port25_likely_infected_sources",
            "Tracked sources the likely-infected rule (abuse.flag_*) flags, as of the daemon's \
             last scan of the offender map",
            d.likely_infected.clone(),
        );
        reg.register(
            "port25_auto_holds",
            "Users put on an abuse hold by abuse.auto_hold",
            d.auto_holds.clone(),
        );
        reg.register(
            "port25_notify_runs",
            "abuse.notify_command runs, by result (ok, failed, timeout, error; busy: not \
             started, too many running)",
            d.notify_runs.clone(),
        );
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg)
            .expect("encoding into a String cannot fail");
        out
    }

    /// Packet counters, from the pinned map (re-opened each scrape: a migration at start
    /// replaces it).
    fn kernel(&self, cfg: &Config, reg: &mut Registry) {
        let loaded = Gauge::<i64>::default();
        reg.register(
            "port25_datapath_loaded",
            "1 when the pinned maps could be read",
            loaded.clone(),
        );
        let live = match LiveMaps::open(&Pins::new(&cfg.pin_dir)) {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!("metrics: pinned maps not readable: {e:#}");
                return;
            }
        };
        loaded.set(1);
        let packets = Family::<PacketLabels, Counter>::default();
        match live.counters() {
            Ok(counters) => {
                for (r, n) in counters {
                    let verdict = if r.is_pass() { "pass" } else { "block" };
                    packets
                        .get_or_create(&PacketLabels {
                            reason: r.name(),
                            verdict,
                        })
                        .inc_by(n);
                }
            }
            Err(e) => tracing::warn!("metrics: reading the packet counters: {e:#}"),
        }
        reg.register(
            "port25_packets",
            "Packets seen by the port25 programs, by verdict reason (all interfaces together)",
            packets,
        );
    }

    /// Map fill: entries as the writer last applied them, capacities from the config (a
    /// reload cannot change them; a start migrates the pinned maps to them).
    fn maps(&self, cfg: &Config, reg: &mut Registry) {
        use crate::bpf::maps::{Capacity, Stage, MAPS};
        let capacity = Family::<MapLabels, Gauge<i64>>::default();
        for d in MAPS.iter().filter(|d| d.stage != Stage::Other) {
            let cap = match d.capacity {
                Capacity::Fixed(n) => n,
                Capacity::Limit(_, f) => f(&cfg.limits),
            };
            capacity
                .get_or_create(&MapLabels { map: d.name })
                .set(cap as i64);
        }
        reg.register(
            "port25_map_entries",
            "Entries in each policy map, as the daemon last wrote them",
            self.daemon.map_entries.clone(),
        );
        reg.register(
            "port25_map_capacity_entries",
            "Capacity of each policy map (config `limits`)",
            capacity,
        );
    }

    /// Registry sizes, on this thread's own read-only connection.
    fn registry(&mut self, cfg: &Config, reg: &mut Registry) {
        let up = Gauge::<i64>::default();
        reg.register(
            "port25_registry_up",
            "1 when the registry could be read",
            up.clone(),
        );
        if self.store.as_ref().is_none_or(|(d, _)| *d != cfg.state_dir) {
            self.store = SqliteStore::open_read_only(&cfg.state_dir)
                .ok()
                .map(|s| (cfg.state_dir.clone(), s));
        }
        let Some((_, store)) = &self.store else {
            return;
        };
        let counts = match self.counts {
            Some((c, at, took)) if at.elapsed() < took * COUNTS_REUSE_FACTOR => c,
            _ => {
                let t = Instant::now();
                match store.counts(jiff::Timestamp::now()) {
                    Ok(c) => {
                        self.counts = Some((c, t, t.elapsed()));
                        c
                    }
                    Err(e) => {
                        tracing::warn!("metrics: reading the registry sizes: {e:#}");
                        self.store = None;
                        self.counts = None;
                        return;
                    }
                }
            }
        };
        up.set(1);
        // The likely-infected count is the daemon's (its scan of the offender map), not read
        // here: walking 65k entries per scrape is the writer's CPU too.
        for (name, help, v) in [
            (
                "port25_registry_users",
                "Users in the registry",
                counts.users,
            ),
            (
                "port25_registry_unblocked_users",
                "Users whose port 25 is open now (timed unblocks included)",
                counts.unblocked,
            ),
            (
                "port25_registry_timed_unblocked_users",
                "Users with a running timed unblock",
                counts.timed,
            ),
            (
                "port25_registry_sessions",
                "Live sessions in the registry",
                counts.sessions,
            ),
            (
                "port25_registry_held_users",
                "Users on an abuse hold (no unblock reopens port 25 for them until unhold)",
                counts.held,
            ),
        ] {
            let g = Gauge::<i64>::default();
            g.set(v as i64);
            reg.register(name, help, g);
        }
    }
}

/// The fleet replica's state, as `status` shows it (`status --json`: `daemon.fleet`).
fn fleet(f: &crate::control::reply::FleetInfo, reg: &mut Registry) {
    let gauge = |v: i64| {
        let g = Gauge::<i64>::default();
        g.set(v);
        g
    };
    let counter = |v: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        c
    };
    reg.register(
        "port25_fleet_connected",
        "1 when the follower's connection to the fleet registry is up",
        gauge(f.connected as i64),
    );
    reg.register(
        "port25_fleet_applied_change_id",
        "The last change of the fleet's log the local replica holds",
        gauge(f.applied_change_id),
    );
    if let Some(n) = f.newest_change_id {
        reg.register(
            "port25_fleet_newest_change_id",
            "The newest change id the fleet registry was seen to hold",
            gauge(n),
        );
    }
    if let Some(n) = f.lag_changes {
        reg.register(
            "port25_fleet_lag_changes",
            "Changes the fleet registry holds that the local replica does not (when known)",
            gauge(n),
        );
    }
    reg.register(
        "port25_fleet_changes_applied",
        "Changes of the fleet's log applied to the local replica (this router's own not counted)",
        counter(f.changes_applied),
    );
    let queue = Family::<QueueLabels, Gauge<i64>>::default();
    for (kind, n) in [
        ("users", f.publish_queue_users),
        ("sessions", f.publish_queue_sessions),
    ] {
        queue.get_or_create(&QueueLabels { kind }).set(n as i64);
    }
    reg.register(
        "port25_fleet_publish_queue",
        "Session users and sessions waiting to be published to the fleet registry",
        queue,
    );
    reg.register(
        "port25_fleet_reconnects",
        "Times the fleet follower connected again after losing its connection",
        counter(f.reconnects),
    );
    if let Some(ms) = f.last_contact_unix_ms {
        let g = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        g.set(ms as f64 / 1e3);
        reg.register(
            "port25_fleet_last_contact_timestamp_seconds",
            "When the fleet registry last answered (Unix time)",
            g,
        );
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    kind: &'static str,
}

/// Each configured attach point, 1 when it enforces, from the pins (as `status` reads them).
fn attachments(cfg: &Config, reg: &mut Registry) {
    let pins = Pins::new(&cfg.pin_dir);
    let up = Family::<AttachLabels, Gauge<i64>>::default();
    // Concrete entries whether or not their device is there (a missing one is down), and
    // every device a glob entry matches now.
    let devices = crate::bpf::linkinfo::devices()
        .map(|d| d.into_iter().map(|(_, n)| n).collect::<Vec<_>>())
        .unwrap_or_default();
    let mut targets: Vec<crate::config::Interface> =
        cfg.targets(&devices).into_iter().map(|t| t.iface).collect();
    for i in cfg.interfaces.iter().filter(|i| !i.is_glob()) {
        if !targets.iter().any(|t| t.attach_point() == i.attach_point()) {
            targets.push(i.clone());
        }
    }
    for iface in &targets {
        let (a, problem) = datapath::inspect(&pins, iface);
        let kind = a
            .map(|a| a.kind)
            .filter(|k| !k.is_empty())
            .unwrap_or("none");
        up.get_or_create(&AttachLabels {
            point: iface.attach_point(),
            kind,
        })
        .set(problem.is_none() as i64);
    }
    reg.register(
        "port25_attachment_up",
        "1 when the attach point's program is attached and enforcing, 0 when not; kind is \
         xdp, tcx or netlink as attached (none when nothing is)",
        up,
    );
}
