//! `port25-ctl daemon`: the single writer. Loads and pins, applies the policy, attaches,
//! then serves the control socket, reloads on SIGHUP and repairs drift periodically.
//! Exiting (signal, crash, kill -9) leaves the pinned programs enforcing.
//!
//! Connections are served concurrently (reading, peer checks, framing), but every change
//! is executed by one loop, in arrival order: a change is committed to the registry, then
//! applied to the maps, then acknowledged. Read verbs are answered by a reader thread with
//! its own read-only registry connection, so no read, however large, holds up a change.
//! Every connection is bounded in number, time and memory (see [`limits`]).

//!
//! Its parts: `socket` (the locks that make this daemon the only one, the socket it binds),
//! `conn` (connections: limits, peer roles, frames), `writer` (the single writer: changes,
//! reloads, reconciles), `rebuild` (a reconcile's full build, off the loop), `ops` (what
//! each op does), `reader` (the read verbs' thread),
//! `links` (attachments kept alive), `wall` (the wall clock never behind the registry).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use anyhow::Result;
use aya::Ebpf;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{mpsc, oneshot, watch},
};
use tracing::{debug, error, info, warn};

use crate::{
    bpf::datapath,
    bpf::detached,
    bpf::livemaps::LiveMaps,
    bpf::pins::Pins,
    config::Config,
    control::reply,
    fleet::Fleet,
    metrics::{http::MetricsServer, DaemonMetrics, Sources},
    policy::index::{Deferred, Entries},
    policy::{self, Clock, Desired},
    registry::store::{sqlite::SqliteStore, Store},
};

use autohold::Flagged;
use conn::accept_loop;
use events::Events;
use links::LinkEvents;
use reader::Reader;
use socket::{bind_socket, lock_instance, read_gid};
use wall::Wall;
use writer::Job;

mod autohold;
mod conn;
mod events;
mod links;
mod notify;
mod ops;
mod reader;
mod rebuild;
mod socket;
mod wall;
mod writer;

pub use socket::lock_pins;

/// How much one client may take of the daemon.
pub mod limits {
    use std::time::Duration;
    /// Connections served at once; more are answered "busy" and closed at once.
    pub const MAX_CONNECTIONS: usize = 4096;
    /// A request must arrive whole within this time of the connection being accepted.
    pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
    /// An answer must be taken by the client within this time.
    pub const WRITE_DEADLINE: Duration = Duration::from_secs(10);
    /// The body buffer grows as bytes arrive, from at most this much up front.
    pub const INITIAL_BODY: usize = 64 << 10;
    /// The open-file limit the daemon raises itself to (bounded by the hard limit).
    pub const NOFILE: u64 = 65536;
}

/// How long the daemon waits without a request before it checkpoints the registry's WAL.
const CHECKPOINT_IDLE: std::time::Duration = std::time::Duration::from_millis(500);

struct Daemon {
    config_path: PathBuf,
    cfg: Config,
    pins: Pins,
    ebpf: Ebpf,
    live: LiveMaps,
    store: SqliteStore,
    /// The fleet's shared registry (`registry:`); `store` is then its local replica.
    fleet: Option<Fleet>,
    /// The fleet registry answered at its last use (so an outage is logged once, not at
    /// every poll).
    fleet_up: bool,
    /// What the maps were last made equal to; per-change applies move from here.
    applied: Desired,
    /// Each user's entries in `applied`, so a change recomputes only the users it touched;
    /// made after a full build has been applied, and waited for by the first change.
    index: Deferred,
    clock: Clock,
    wall: Wall,
    started: Instant,
    reconciles: u64,
    drift_repaired: u64,
    /// A committed change whose map apply failed: the next tick (at once, then each second
    /// while it fails) does a full reconcile on the loop (a build running off it is dropped).
    dirty: bool,
    /// A reconcile's build running off the loop, with the changes made since it began.
    rebuild: Option<rebuild::Rebuild>,
    /// Builds dropped in a row (a change they could not be brought up to date with); past a
    /// few, the next reconcile is made on the loop, as before builds ran off it.
    spoiled_runs: u32,
    /// A build was dropped: the next second's tick starts another.
    retry: bool,
    /// The config the reader answers from, replaced on reload.
    cfg_tx: watch::Sender<Arc<Config>>,
    /// The last failure logged per attach point, so link events do not repeat it.
    link_errors: std::collections::HashMap<String, String>,
    /// The devices of the namespace, kept by link events (glob entries range over them).
    devices: links::Devices,
    /// What the daemon counts for `/metrics` (reconciles, drift; requests in `conn`).
    metrics: DaemonMetrics,
    metrics_server: MetricsServer,
    /// Block events from the kernel (None: tracking off, or no ring).
    events: Option<Events>,
    /// Flagged sources: what has been decided about each, the notifier, the next scan.
    flagged: Flagged,
}

/// `attach`: start even though an operator detached (`daemon --attach`), lifting the marker.
/// `kernel_log`: load the programs with their debug messages on and forward them
/// (`daemon --kernel-log`, see [`crate::bpf::klog`]).
pub fn run(config_path: &Path, attach: bool, kernel_log: bool) -> Result<()> {
    let t = Instant::now();
    let cfg = Config::load(config_path)?;
    debug!(ms = t.elapsed().as_millis() as u64, "start: config parsed");
    // Now, beside the start's own work (seconds at a million entries): begun at "ready",
    // it raced the first hooks, which then scanned the file themselves.
    warm_socket_hint(config_path);
    raise_nofile();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Absolute, so `reload` can tell a client that names another file (its --config) that
    // this is not the file the daemon reads.
    let config_path = std::fs::canonicalize(config_path).unwrap_or_else(|_| config_path.to_owned());
    rt.block_on(serve(config_path, cfg, attach, kernel_log))
}

/// A scoped thread's result; its panic goes on in the caller.
fn join<T>(h: std::thread::ScopedJoinHandle<'_, T>) -> T {
    h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// What the read half and the apply of a start fail with once the load half has failed:
/// a consequence, not an error of their own (the load's error is the one reported).
#[derive(Debug, thiserror::Error)]
#[error("the programs did not load: the maps are left unwritten")]
struct LoadFailed;

/// A start that fails before anything is attached leaves nothing behind: its maps may be
/// filled and stamped with this release's layout (they are written while the programs are
/// verified), which an older release refuses as newer, so a rollback after a failed upgrade
/// would meet them. A tree with any link (from before, or attached now on another
/// interface) keeps it and its maps: they enforce.
/// A links directory that cannot be read counts as holding links: the tree is kept.
fn leave_nothing_unattached(pins: &Pins) {
    match pins.any_link_entry() {
        Ok(false) => {
            if let Err(e) = datapath::detach_all(pins) {
                warn!("removing the pins of this failed start: {e:#}");
            }
        }
        Ok(true) => {}
        Err(e) => warn!(
            "the pins of this failed start are kept: {} cannot be read ({e})",
            pins.links_dir().display()
        ),
    }
}

/// CPU time the calling thread has used, in ms.
fn thread_cpu_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

/// Idle clients each hold a descriptor: systemd's default soft limit (1024) would turn a
/// thousand of them into EMFILE for everyone else.
fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let want = limits::NOFILE.min(hard);
        if want > soft {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, want, hard) {
                warn!("raising the open-file limit to {want}: {e}");
            }
        }
    }
}

async fn serve(config_path: PathBuf, cfg: Config, attach: bool, kernel_log: bool) -> Result<()> {
    // An operator's detach holds until an operator attaches again: a supervisor's restart
    // is not one.
    if !attach {
        detached::refuse_if_marked(&cfg.state_dir)?;
    }
    let pins = Pins::new(&cfg.pin_dir);
    // One daemon per socket and one per pin tree, held for the process lifetime (the kernel
    // drops them on any exit). Two daemons with different sockets on the same pins would
    // rewrite each other's maps and detach each other's links.
    let _lock = lock_instance(&cfg.socket)?;
    pins.prepare()?;
    let _pin_lock = lock_pins(&pins)?;
    // Before anything is written (marker, registry, maps): a newer version's pin tree is
    // refused with everything left as it was.
    datapath::refuse_newer_layout(&pins)?;
    if attach && detached::clear(&cfg.state_dir)? {
        info!("the detach marker is lifted (--attach)");
    }
    // Where a start's time goes (PORT25_LOG=port25_ctl::control::server=debug).
    let t = Instant::now();
    // With the CPU time of the thread that reached it: on a shared machine, wall time alone
    // does not say which half of the start bounds it.
    let phase = |what: &str| {
        debug!(
            ms = t.elapsed().as_millis() as u64,
            thread_cpu_ms = thread_cpu_ms(),
            "start: {what}"
        )
    };
    let mut store = SqliteStore::open(&cfg.state_dir)?;
    store.defer_checkpoints()?;
    let mut fleet = match &cfg.registry {
        Some(r) => Some(Fleet::new(r)?),
        None => None,
    };
    // A router that was off catches up before it computes its maps and answers; with the
    // database down it starts from its replica: enforcement never waits for the database.
    let fleet_up = match &mut fleet {
        Some(f) => fleet_start(f, &mut store)?,
        None => false,
    };
    audit_forced_wide(&mut store, &cfg, &config_path)?;
    // Pinned maps of another layout (changed `limits`, a new version) are replaced, never
    // reused: new maps are filled first, every link then swaps atomically to a program that
    // uses them, and only then do their pins replace the old ones.
    let changes = datapath::layout_changes(&pins, &cfg.limits)?;
    let migrating = !changes.is_empty();
    let opts = datapath::LoadOptions { kernel_log };
    let map_pins = if migrating {
        pins.staging()
    } else {
        pins.clone()
    };
    // Three jobs on two cores, none waiting for more than it needs: the kernel verifies the
    // programs (a second of its CPU), the maps are read once they exist (what a restart
    // compares against), the registry is read and the desired state built. The maps are
    // written as soon as the last two are done, while the verifier may still run (a cold
    // start's million writes overlap it); programs attach only after both.
    // Set when the programs fail to load: the maps are then not written (a start that will
    // exit anyway, e.g. a new release on an old kernel restarted in a loop by systemd,
    // would otherwise refill a million staged entries each time). Best effort: a verifier
    // that refuses late, once the writes have begun, does not stop them.
    let load_failed = std::sync::atomic::AtomicBool::new(false);
    let (loaded, started) = std::thread::scope(|s| {
        let (created_tx, created_rx) = std::sync::mpsc::channel::<()>();
        let load_failed = &load_failed;
        let load = s.spawn(|| -> Result<_> {
            // Owned here: dropped when this thread ends, whatever happens.
            let created_tx = created_tx;
            let r = (|| -> Result<_> {
                let created = if migrating {
                    warn!(
                        ?changes,
                        "pinned maps differ from this config: migrating to new maps"
                    );
                    datapath::create_staged(&cfg, &pins, opts)?
                } else {
                    datapath::create_with(&cfg, &pins, opts)?
                };
                // The test's refusal is known before the maps are read: like a kernel that
                // refuses at once, the apply then never starts.
                let refused = crate::control::testing::failpoint_verify();
                // Raised again below for every failure; here only to come before the send.
                if refused.is_err() {
                    load_failed.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                let _ = created_tx.send(());
                phase("maps created or opened");
                refused?;
                let ebpf = created.verify()?;
                phase("programs verified");
                Ok(ebpf)
            })();
            if r.is_err() {
                load_failed.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            r
        });
        let (map_pins, phase) = (&map_pins, &phase);
        let read = s.spawn(move || -> Result<_> {
            // Disconnected: the load failed before the maps were all there (some may be
            // pinned); its error is the one reported.
            created_rx.recv().map_err(|_| LoadFailed)?;
            let live = LiveMaps::open(map_pins)?;
            let have = policy::read_state(&live)?;
            phase("pinned maps read");
            Ok((live, have))
        });
        let built = (|| -> Result<_> {
            let mut wall = Wall::new(&mut store)?;
            wall.close_uncertain_unblocks(&mut store)?;
            let clock = Clock::sample_at(wall.now());
            // A change committed by an earlier daemon that died before applying it is
            // applied here.
            let (want, entries) = desired(&cfg, &mut store, &clock, wall.now())?;
            phase("desired state built");
            Ok((wall, clock, entries, want))
        })();
        let read = join(read);
        let started = (|| -> Result<_> {
            let (wall, clock, entries, want) = built?;
            let (mut live, have) = read?;
            if load_failed.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(LoadFailed.into());
            }
            // Policy before programs: a fresh attach never runs on empty maps.
            policy::check_fits(&live, &want)?;
            // A verify that fails after this point leaves these maps rewritten under the
            // programs already attached (on a restart) or pinned with nothing attached (then
            // removed below). Safe only because every change in what an entry means bumps
            // LAYOUT_VERSION: such maps are migrated (staged, new pins), never rewritten in
            // place under programs of another meaning.
            // From what the maps were just read to hold: only the difference is written.
            let applied = policy::apply_delta(&mut live, &have, &want)?;
            drop(have);
            phase("maps applied");
            // The per-user index is for changes, not for enforcing: made on a core of its
            // own while the programs are verified and attached; the first change waits for
            // it.
            let index = Deferred::spawn(entries);
            Ok((live, wall, clock, index, want, applied))
        })();
        (join(load), started)
    });
    // The load's error is the one returned; the other half's, when both failed on their
    // own, is not lost.
    if let (Err(_), Err(e)) = (&loaded, &started) {
        if !e.is::<LoadFailed>() {
            warn!("the start failed here too: {e:#}");
        }
    }
    let prepared = (|| -> Result<_> {
        let mut ebpf = loaded?;
        let (mut live, wall, clock, index, want, applied) = started?;
        // Read from before the programs attach: their first messages are not lost. Without
        // the flag the programs carry no log code (pruned by the verifier) and nothing is read.
        let klog = if kernel_log {
            let task = crate::bpf::klog::start(&mut ebpf)?;
            info!(
                log_target = crate::bpf::klog::TARGET,
                "kernel debug messages on (--kernel-log)"
            );
            Some(task)
        } else {
            None
        };
        info!(writes = applied.writes, "policy applied");
        crate::bpf::offenders::write_settings(&mut live, &cfg.abuse)?;
        let events = match live.events.take() {
            Some(ring) if cfg.abuse.track_sources > 0 => Some(Events::open(ring.0)?),
            _ => None,
        };
        Ok((ebpf, live, wall, clock, index, want, klog, events))
    })();
    let (mut ebpf, live, wall, clock, index, want, klog, events) =
        prepared.inspect_err(|_| leave_nothing_unattached(&pins))?;
    // Interfaces coming and going (a re-created one leaves its pinned link dead), and TC
    // filters removed by another tool: repair at once rather than at the next reconcile.
    // Subscribed before the devices are listed: one created in between is in the queue.
    let links = match LinkEvents::open() {
        Ok(l) => Some(l),
        Err(e) => {
            warn!("no link events ({e:#}): dead attachments are repaired at each reconcile only");
            None
        }
    };
    // Glob entries over the devices there are now: attached, like concrete ones, before
    // the socket answers.
    let (devices, targets) = links::targets_here(&cfg);
    let mut link_errors = std::collections::HashMap::new();
    for t in &targets {
        let iface = &t.iface;
        // A pinned link whose interface went away is replaced, not swapped into.
        let how = match datapath::attach(&mut ebpf, &pins, iface) {
            Ok(how) => how,
            // One device of a glob that cannot take the hook (XDP on a tun) fails that
            // device, not the start: `status` shows it (exit 3).
            Err(e) if t.glob.is_some() => {
                let msg = format!("{e:#}");
                error!(point = %iface.attach_point(), glob = ?t.glob, "cannot attach, port 25 is not blocked there until it can: {msg}");
                link_errors.insert(iface.attach_point(), msg);
                continue;
            }
            Err(e) => {
                let busy = format!("{e:#}").contains("busy");
                leave_nothing_unattached(&pins);
                let e = e.context(format!("attaching {}", iface.attach_point()));
                return Err(if busy {
                    e.context(format!(
                        "{} already has a program attached (another port25 pin tree, or another XDP program?)",
                        iface.name
                    ))
                } else {
                    e
                });
            }
        };
        info!(interface = %iface.name, point = %iface.attach_point(), glob = ?t.glob, ?how, "enforcing");
    }
    // Also the pins of glob devices that went while no daemon was watching.
    for gone in datapath::detach_stale(&pins, &targets)? {
        info!(point = %gone, "detached: no longer in the config, or its device is gone");
    }
    if migrating {
        datapath::commit_staged_maps(&pins)?;
        info!("maps migrated; the old maps are released (packet counters start from zero)");
    }
    phase("attached");
    // The socket is bound only now: a client (or systemd, or a lab) that gets an answer knows
    // the programs are attached and enforcing, not merely that a process has started.
    let listener = bind_socket(&cfg.socket, cfg.read_group.as_deref())?;
    let read_gid = read_gid(cfg.read_group.as_deref())?;
    let (cfg_tx, cfg_rx) = watch::channel(Arc::new(cfg.clone()));
    let reader = Reader::start(cfg.state_dir.clone(), cfg_rx.clone())?;
    let metrics = DaemonMetrics::with_fleet(fleet.as_ref().map(|f| f.stats.clone()));
    let metrics_server =
        MetricsServer::start(Sources::new(metrics.clone(), cfg_rx), cfg.metrics_listen)?;
    let mut d = Daemon {
        config_path,
        cfg,
        pins,
        ebpf,
        live,
        store,
        fleet,
        fleet_up,
        applied: want,
        index,
        clock,
        wall,
        started: Instant::now(),
        reconciles: 0,
        drift_repaired: 0,
        dirty: false,
        rebuild: None,
        spoiled_runs: 0,
        retry: false,
        cfg_tx,
        link_errors,
        devices,
        metrics: metrics.clone(),
        metrics_server,
        flagged: Flagged::new(std::time::Duration::from_secs(1)),
        events,
    };
    let (jobs_tx, mut jobs) = mpsc::channel::<Job>(1024);
    let mut fleet_wake = d.fleet.as_mut().map(Fleet::follow);
    if let Some(fl) = &d.fleet {
        // A previous run's queue of session users is gone with it: queue every user with a
        // session here again (those the fleet has already are no change).
        fl.ensure_users(session_users(&mut d.store)?);
        fl.publish_sessions(crate::fleet::Publish::AllSessions(
            d.store.read()?.sessions()?,
        ));
    }
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(d.cfg.reconcile_interval);
    tick.tick().await;
    let mut quick = tokio::time::interval(std::time::Duration::from_secs(1));
    // Polled only while a reconcile is due: the seconds missed meanwhile are skipped, not
    // made up for by reconciles one after another (each a full one, on the loop when dirty).
    quick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // Accepting lives in its own task: an accept error (EMFILE) pauses it, never this loop.
    let acceptor = tokio::spawn(accept_loop(listener, jobs_tx, reader, read_gid, metrics));
    info!(socket = %d.cfg.socket.display(), "ready");
    // Type=notify units are "started" only once enforcement is in place.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    loop {
        // Whatever ran last (a change, reload, reconcile) may have changed the maps.
        d.metrics.map_fill(&d.applied.fill());
        tokio::select! {
            // Link events first: until a new device is attached, port 25 is open on it.
            biased;
            batch = LinkEvents::next(links.as_ref()) => d.link_events(batch),
            Some(job) = jobs.recv() => {
                let (resp, exit) = d.execute(job.req, &job.actor);
                if exit {
                    let (written, wait) = oneshot::channel();
                    if job.reply.send((resp, Some(written))).is_ok() {
                        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), wait).await;
                    }
                    break;
                }
                let _ = job.reply.send((resp, None));
            }
            _ = hup.recv() => {
                if let Err(e) = d.reload() {
                    error!("reload refused, running policy unchanged: {e:#}");
                }
            }
            _ = Events::ready(d.events.as_ref()) => d.log_events(),
            _ = tokio::time::sleep_until(d.flagged.next_scan) => d.scan_offenders(),
            Some(()) = wake(&mut fleet_wake) => d.follow(),
            // The WAL is checkpointed when no request has come for a while (see
            // `SqliteStore::defer_checkpoints`).
            _ = tokio::time::sleep(CHECKPOINT_IDLE), if d.store.checkpoint_due() => {
                if let Err(e) = d.store.checkpoint() {
                    warn!("checkpointing the registry: {e:#}");
                }
            }
            built = rebuild::wait(&mut d.rebuild) => d.rebuilt(built),
            _ = tick.tick() => d.reconcile(),
            _ = quick.tick(), if d.dirty || d.retry => d.reconcile(),
            _ = term.recv() => { info!("SIGTERM: exiting; the pinned programs keep enforcing"); break; }
            _ = int.recv() => { info!("SIGINT: exiting; the pinned programs keep enforcing"); break; }
        }
    }
    acceptor.abort();
    if let Some(k) = klog {
        // The programs stay, writing into a ring no one reads until a daemon replaces them.
        k.abort();
    }
    let _ = std::fs::remove_file(&d.cfg.socket);
    Ok(())
}

/// Client verbs find the socket in the config file, whose answer is kept on the file (see
/// `config::socket_hint`): found here, once per start and reload and off the request path,
/// so that no hook's call after either scans a config of a million entries (70-80 ms).
fn warm_socket_hint(config: &Path) {
    let config = config.to_path_buf();
    std::thread::spawn(move || crate::config::socket_named(&config));
}

impl Daemon {
    fn info(&self) -> reply::Info {
        reply::Info {
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs(),
            config: self.config_path.display().to_string(),
            registry: match &self.fleet {
                Some(f) => format!(
                    "{} (replica of the fleet registry {}, router {})",
                    self.store.path.display(),
                    f.name,
                    f.router
                ),
                None => self.store.path.display().to_string(),
            },
            reconciles: self.reconciles,
            drift_repaired: self.drift_repaired,
            fleet: self.fleet.as_ref().map(|f| f.stats.info()),
            map_fill: self
                .applied
                .fill()
                .into_iter()
                .map(|(m, n)| (m.to_string(), n))
                .collect(),
        }
    }
}

/// Connects to the fleet's database and brings the replica up to date; says whether the
/// database answered. A schema newer than this binary is refused (a deployment mistake, not
/// an outage); an unreachable database is not: the replica has the fleet's last policy.
fn fleet_start(fleet: &mut Fleet, store: &mut SqliteStore) -> Result<bool> {
    match fleet.check().and_then(|()| fleet.catch_up(store)) {
        Ok(n) => {
            info!(registry = %fleet.name, router = %fleet.router, changes = n, "fleet registry: replica up to date");
            Ok(true)
        }
        Err(e)
            if e.chain()
                .any(|c| c.is::<crate::fleet::schema::NewerSchema>()) =>
        {
            Err(e)
        }
        Err(e) => {
            error!(
                "{e:#}: STARTING FROM THE LOCAL REPLICA ({}); policy changes fail until the \
                 database answers, then the replica catches up",
                store.path.display()
            );
            Ok(false)
        }
    }
}

/// The users with a session on this router.
fn session_users(store: &mut SqliteStore) -> Result<Vec<crate::registry::store::User>> {
    let tx = store.read()?;
    let names: std::collections::BTreeSet<String> =
        tx.sessions()?.into_iter().map(|s| s.user).collect();
    let mut users = Vec::new();
    for n in names {
        users.extend(tx.user(&n)?);
    }
    Ok(users)
}

/// The next wake of the fleet follower; never, without a fleet.
async fn wake(rx: &mut Option<mpsc::Receiver<()>>) -> Option<()> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The desired map state from the config and a registry snapshot, with the users' entries
/// its per-user index is made of ([`Deferred::spawn`]).
fn desired(
    cfg: &Config,
    store: &mut SqliteStore,
    clock: &Clock,
    now: jiff::Timestamp,
) -> Result<(Desired, Entries)> {
    let t = Instant::now();
    // The narrow read: rows of what the maps need, not the users and sessions themselves.
    let rows = store.read()?.map_rows()?;
    debug!(
        ms = t.elapsed().as_millis() as u64,
        thread_cpu_ms = thread_cpu_ms(),
        users = rows.users.len(),
        addrs = rows.addrs.len(),
        bindings = rows.bound.len(),
        "full build: registry read"
    );
    let (wall, boot) = clock.at(now);
    Desired::build_entries(cfg, rows, wall, boot)
}

/// Records the config's forced wide allow-list entries in the audit log (each start and
/// reload that applies them), and says so loudly.
fn audit_forced_wide(store: &mut SqliteStore, cfg: &Config, path: &Path) -> Result<()> {
    let forced = cfg.forced_wide();
    if forced.is_empty() {
        return Ok(());
    }
    let now = jiff::Timestamp::now();
    let mut tx = store.begin()?;
    for (key, p) in forced {
        warn!(%p, key, "the config forces an allow-list prefix wider than its floor");
        tx.append_audit(&crate::registry::store::AuditRecord {
            id: 0,
            at: now,
            actor: format!("config {}", path.display()),
            action: "force_wide".into(),
            subject: p.to_string(),
            old: None,
            new: Some(format!("{key}: {p} (force: true)")),
            reason: None,
        })?;
    }
    tx.commit()
}
