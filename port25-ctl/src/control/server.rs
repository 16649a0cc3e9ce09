//! `port25-ctl daemon`: the single writer. Loads and pins, applies the policy, attaches,
//! then serves the control socket, reloads on SIGHUP and repairs drift periodically.
//! Exiting (signal, crash, kill -9) leaves the pinned programs enforcing.
//!
//! Connections are served concurrently (reading, peer checks, framing), but every change
//! is executed by one loop, in arrival order: a change is committed to the registry, then
//! applied to the maps, then acknowledged. Read verbs are answered by a reader thread with
//! its own read-only registry connection, so no read, however large, holds up a change.
//! Every connection is bounded in number, time and memory (see [`limits`]).

use std::{
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use aya::Ebpf;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream},
    signal::unix::{signal, SignalKind},
    sync::{mpsc, oneshot, watch, Semaphore},
};
use tracing::{error, info, warn};

use crate::{
    bpf::datapath,
    bpf::detached,
    bpf::livemaps::LiveMaps,
    bpf::pins::Pins,
    config::Config,
    control::proto::{self, ErrorKind, Op, Request, Response},
    control::reply,
    policy::index::{changed_users, Index},
    policy::{self, Clock, Desired},
    registry::store::{sqlite::SqliteStore, Recording, Store, Tx},
    registry::Actor,
};

mod ops;

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

// The test hooks (a failpoint, a clock shift) are in `control::testing`, with why they are
// safe in production.
use super::testing::failpoint_after_commit;

struct Daemon {
    config_path: PathBuf,
    cfg: Config,
    pins: Pins,
    ebpf: Ebpf,
    live: LiveMaps,
    store: SqliteStore,
    /// What the maps were last made equal to; per-change applies move from here.
    applied: Desired,
    /// Each user's entries in `applied`, so a change recomputes only the users it touched.
    index: Index,
    clock: Clock,
    wall: Wall,
    started: Instant,
    reconciles: u64,
    drift_repaired: u64,
    /// A committed change whose map apply failed: the next tick does a full reconcile.
    dirty: bool,
    /// The config the reader answers from, replaced on reload.
    cfg_tx: watch::Sender<Arc<Config>>,
    /// The last failure logged per attach point, so link events do not repeat it.
    link_errors: std::collections::HashMap<String, String>,
}

/// The wall clock as the daemon uses it for expiries: never behind the newest time the
/// registry has recorded (its newest audit record), advanced from there on the boot-time
/// clock. A boot with the clock behind real time would otherwise read an unblock that has
/// ended as one still running and put it back into the maps.
struct Wall {
    floor: jiff::Timestamp,
    floor_boot: u64,
    shift: jiff::SignedDuration,
    behind: bool,
    /// Up to when ended unblocks have been recorded.
    noted: Option<jiff::Timestamp>,
}

impl Wall {
    fn new(store: &mut SqliteStore) -> Result<Wall> {
        let newest = store
            .begin()?
            .audit(&crate::registry::store::AuditQuery {
                subject: None,
                since: None,
                limit: 1,
            })?
            .pop()
            .map(|r| r.at);
        let shift = super::testing::wall_shift()?;
        Ok(Wall {
            floor: newest.unwrap_or(jiff::Timestamp::UNIX_EPOCH),
            floor_boot: crate::bpf::livemaps::boot_ns(),
            shift,
            behind: false,
            noted: None,
        })
    }

    /// Records, in the audit log, each timed unblock that ended since the last call: the
    /// newest audit time is then past every ended unblock this daemon saw end, so a later
    /// start with a clock behind real time cannot bring one back.
    fn record_ended(&mut self, store: &mut SqliteStore, now: jiff::Timestamp) -> Result<()> {
        let since = self.noted.unwrap_or(self.floor);
        let mut tx = store.begin()?;
        let ended: Vec<_> = tx
            .users()?
            .into_iter()
            .filter(|u| u.policy == crate::registry::store::Policy::Unblocked)
            .filter(|u| u.until.is_some_and(|t| t > since && t <= now))
            .collect();
        for u in &ended {
            tx.append_audit(&crate::registry::store::AuditRecord {
                id: 0,
                at: now,
                actor: "port25 daemon".into(),
                action: "unblock.ended".into(),
                subject: u.name.clone(),
                old: u.until.map(|t| format!("unblocked until {t}")),
                new: Some("blocked".into()),
                reason: None,
            })?;
        }
        tx.commit()?;
        self.noted = Some(now);
        Ok(())
    }

    /// At start, with the clock behind the registry: a timed unblock that ends after the
    /// newest recorded time may or may not have ended in real time (the box may have been off
    /// for a day), and nothing here can tell. Each one is ended, fail closed and audited; the
    /// next POP login or helpdesk call opens it again, measured from a time that is never
    /// ahead of real time. Unblocks made while this daemon runs are measured from the same
    /// derived time, which is never ahead of real time, so they are kept.
    fn close_uncertain_unblocks(&mut self, store: &mut SqliteStore) -> Result<usize> {
        let now = self.now();
        if !self.behind {
            return Ok(0);
        }
        let mut tx = store.begin()?;
        let uncertain: Vec<_> = tx
            .users()?
            .into_iter()
            .filter(|u| u.policy == crate::registry::store::Policy::Unblocked)
            .filter(|u| u.until.is_some_and(|t| t > self.floor))
            .collect();
        let actor = crate::registry::Actor {
            uid: 0,
            name: "port25 daemon".into(),
            on_behalf_of: None,
        };
        for u in &uncertain {
            crate::registry::block(
                &mut *tx,
                &actor,
                &u.name,
                Some(format!(
                    "the clock is behind the registry at start: cannot tell whether the unblock until {} has ended",
                    u.until.unwrap()
                )),
                false,
                now,
            )?;
        }
        tx.commit()?;
        if !uncertain.is_empty() {
            error!(
                count = uncertain.len(),
                "timed unblocks that may have ended while the clock was wrong are closed (audited)"
            );
        }
        Ok(uncertain.len())
    }

    fn now(&mut self) -> jiff::Timestamp {
        let raw = jiff::Timestamp::now()
            .checked_add(self.shift)
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
        let since = crate::bpf::livemaps::boot_ns().saturating_sub(self.floor_boot);
        let derived = self
            .floor
            .checked_add(jiff::SignedDuration::from_nanos(
                since.min(i64::MAX as u64) as i64
            ))
            .unwrap_or(self.floor);
        let behind = raw < derived;
        if behind != self.behind {
            self.behind = behind;
            if behind {
                error!(
                    system = %raw, recorded = %self.floor, using = %derived,
                    "the wall clock is behind the newest time in the registry (no RTC? NTP not \
                     synced?): using the recorded time, advanced on the boot clock, so no \
                     ended unblock comes back"
                );
            } else {
                warn!(system = %raw, "the wall clock has caught up with the registry");
            }
        }
        if behind {
            derived
        } else {
            raw
        }
    }
}

/// One request, from a connection task to the writer loop.
struct Job {
    req: Request,
    actor: Actor,
    /// The answer, and for a last answer (detach) a way to learn it has been written.
    reply: oneshot::Sender<(Reply, Option<oneshot::Sender<()>>)>,
}

/// The writer's answer; a refusal keeps its error so the connection can explain it.
enum Reply {
    Done(Response),
    Failed(anyhow::Error),
}

/// `attach`: start even though an operator detached (`daemon --attach`), lifting the marker.
pub fn run(config_path: &Path, attach: bool) -> Result<()> {
    let cfg = Config::load(config_path)?;
    raise_nofile();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Absolute, so `reload` can tell a client that names another file (its --config) that
    // this is not the file the daemon reads.
    let config_path = std::fs::canonicalize(config_path).unwrap_or_else(|_| config_path.to_owned());
    rt.block_on(serve(config_path, cfg, attach))
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

async fn serve(config_path: PathBuf, cfg: Config, attach: bool) -> Result<()> {
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
    let mut store = SqliteStore::open(&cfg.state_dir)?;
    audit_forced_wide(&mut store, &cfg, &config_path)?;
    // Pinned maps of another layout (changed `limits`, a new version) are replaced, never
    // reused: new maps are filled first, every link then swaps atomically to a program that
    // uses them, and only then do their pins replace the old ones.
    let changes = datapath::layout_changes(&pins, &cfg.limits)?;
    let migrating = !changes.is_empty();
    let (mut ebpf, map_pins) = if migrating {
        warn!(
            ?changes,
            "pinned maps differ from this config: migrating to new maps"
        );
        (datapath::load_staged(&cfg, &pins)?, pins.staging())
    } else {
        (datapath::load(&cfg, &pins)?, pins.clone())
    };
    let mut live = LiveMaps::open(&map_pins)?;
    let mut wall = Wall::new(&mut store)?;
    wall.close_uncertain_unblocks(&mut store)?;
    let clock = Clock::sample_at(wall.now());
    // Policy before programs: a fresh attach never runs on empty maps. A change committed
    // by an earlier daemon that died before applying it is applied here.
    let (index, want) = desired(&cfg, &mut store, &clock, wall.now())?;
    policy::check_fits(&live, &want)?;
    let applied = policy::apply(&mut live, &want)?;
    info!(writes = applied.writes, "policy applied");
    for iface in &cfg.interfaces {
        // A pinned link whose interface went away is replaced, not swapped into.
        let how = match datapath::attach(&mut ebpf, &pins, iface) {
            Ok(how) => how,
            Err(e) => {
                let busy = format!("{e:#}").contains("busy");
                // A start that attached nothing leaves nothing behind; a tree with any link
                // (from before, or attached now on another interface) keeps it and its maps.
                if pins.pinned_links().is_empty() {
                    if let Err(e2) = datapath::detach_all(&pins) {
                        warn!("removing the pins of this failed first start: {e2:#}");
                    }
                }
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
        info!(interface = %iface.name, point = %iface.attach_point(), ?how, "enforcing");
    }
    for gone in datapath::detach_stale(&pins, &cfg)? {
        info!(point = %gone, "detached: no longer in the config");
    }
    if migrating {
        datapath::commit_staged_maps(&pins)?;
        info!("maps migrated; the old maps are released (packet counters start from zero)");
    }
    // The socket is bound only now: a client (or systemd, or a lab) that gets an answer knows
    // the programs are attached and enforcing, not merely that a process has started.
    let listener = bind_socket(&cfg.socket, cfg.read_group.as_deref())?;
    let read_gid = read_gid(cfg.read_group.as_deref())?;
    let (cfg_tx, cfg_rx) = watch::channel(Arc::new(cfg.clone()));
    let reader = Reader::start(cfg.state_dir.clone(), cfg_rx)?;
    let mut d = Daemon {
        config_path,
        cfg,
        pins,
        ebpf,
        live,
        store,
        applied: want,
        index,
        clock,
        wall,
        started: Instant::now(),
        reconciles: 0,
        drift_repaired: 0,
        dirty: false,
        cfg_tx,
        link_errors: Default::default(),
    };
    let (jobs_tx, mut jobs) = mpsc::channel::<Job>(1024);
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(d.cfg.reconcile_interval);
    tick.tick().await;
    let mut quick = tokio::time::interval(std::time::Duration::from_secs(1));
    // Interfaces coming and going (a re-created one leaves its pinned link dead): repair at
    // once rather than at the next reconcile.
    let links = match LinkEvents::open() {
        Ok(l) => Some(l),
        Err(e) => {
            warn!("no link events ({e:#}): dead attachments are repaired at each reconcile only");
            None
        }
    };
    // Accepting lives in its own task: an accept error (EMFILE) pauses it, never this loop.
    let acceptor = tokio::spawn(accept_loop(listener, jobs_tx, reader, read_gid));
    info!(socket = %d.cfg.socket.display(), "ready");
    // Type=notify units are "started" only once enforcement is in place.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    loop {
        tokio::select! {
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
            _ = LinkEvents::next(links.as_ref()) => d.repair_links(),
            _ = tick.tick() => d.reconcile(),
            _ = quick.tick(), if d.dirty => d.reconcile(),
            _ = term.recv() => { info!("SIGTERM: exiting; the pinned programs keep enforcing"); break; }
            _ = int.recv() => { info!("SIGINT: exiting; the pinned programs keep enforcing"); break; }
        }
    }
    acceptor.abort();
    let _ = std::fs::remove_file(&d.cfg.socket);
    Ok(())
}

/// Accepts connections and hands each to its own task, within [`limits::MAX_CONNECTIONS`].
async fn accept_loop(
    listener: UnixListener,
    jobs: mpsc::Sender<Job>,
    reader: Reader,
    read_gid: Option<nix::unistd::Gid>,
) {
    let max = max_connections();
    let slots = Arc::new(Semaphore::new(max));
    // Peers other than root (the read-only group) may hold at most half the slots, so they
    // can never lock the hooks (root) out of the socket.
    let others = Arc::new(Semaphore::new(max / 2));
    let mut last_warn: Option<Instant> = None;
    let mut suppressed = 0u64;
    let mut warn_rarely = |msg: String| {
        if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            warn!("{msg} ({suppressed} more like it since the last warning)");
            last_warn = Some(Instant::now());
            suppressed = 0;
        } else {
            suppressed += 1;
        }
    };
    loop {
        match listener.accept().await {
            Ok((stream, _)) => match (
                slots.clone().try_acquire_owned(),
                stream.peer_cred().map(|c| c.uid()),
            ) {
                (Ok(slot), Ok(uid)) => {
                    let other = if uid == 0 {
                        None
                    } else {
                        match others.clone().try_acquire_owned() {
                            Ok(p) => Some(p),
                            Err(_) => {
                                warn_rarely(format!(
                                    "{} control connections of non-root peers open: refusing more",
                                    max / 2
                                ));
                                busy(stream, max / 2);
                                continue;
                            }
                        }
                    };
                    let (jobs, reader) = (jobs.clone(), reader.clone());
                    tokio::spawn(async move {
                        connection(stream, jobs, reader, read_gid).await;
                        drop((slot, other));
                    });
                }
                (_, Err(_)) => {}
                (Err(_), _) => {
                    warn_rarely(format!("{max} control connections open: refusing more"));
                    busy(stream, max);
                }
            },
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS persist until something closes: retrying at once
                // would spin.
                warn_rarely(format!("accept: {e}; pausing accepts for 100 ms"));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Answers "busy" and closes. Small enough for an empty socket buffer: a non-blocking
/// write of it never waits.
fn busy(stream: UnixStream, max: usize) {
    if let (Ok(frame), Ok(mut s)) = (
        proto::encode(&Response::err(
            ErrorKind::Busy,
            format!("busy: {max} control connections are open; try again"),
        )),
        stream.into_std(),
    ) {
        let _ = std::io::Write::write(&mut s, &frame);
    }
}

/// rtnetlink link notifications (RTMGRP_LINK) of this network namespace; only their arrival
/// matters, so they are drained unread.
struct LinkEvents {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl LinkEvents {
    fn open() -> Result<LinkEvents> {
        use nix::sys::socket::{
            bind, socket, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType,
        };
        const RTMGRP_LINK: u32 = 1;
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &NetlinkAddr::new(0, RTMGRP_LINK),
        )?;
        // SAFETY: an OwnedFd keeps its descriptor open and the same for its whole life.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(|e| anyhow::anyhow!("registering the netlink socket: {e}"))?;
        Ok(LinkEvents { fd })
    }

    /// Waits for a batch of link events and drains it; never returns without events.
    async fn next(events: Option<&LinkEvents>) {
        let Some(ev) = events else {
            return std::future::pending().await;
        };
        let Ok(mut guard) = ev.fd.readable().await else {
            return std::future::pending().await;
        };
        let mut buf = [0u8; 8192];
        // Bounded: a storm of events must not keep this loop from the writer's work.
        for _ in 0..1024 {
            let fd = std::os::fd::AsRawFd::as_raw_fd(ev.fd.get_ref());
            match nix::sys::socket::recv(fd, &mut buf, nix::sys::socket::MsgFlags::empty()) {
                Ok(n) if n > 0 => continue,
                // ENOBUFS: events were lost, which still means "look again".
                Err(nix::errno::Errno::ENOBUFS) => continue,
                _ => break,
            }
        }
        guard.clear_ready();
    }
}

/// Connections fit in the open-file limit, leaving room for maps, links and the registry.
fn max_connections() -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(s, _)| s)
        .unwrap_or(1024);
    (soft.saturating_sub(256) as usize).clamp(16, limits::MAX_CONNECTIONS)
}

/// What the reader thread is asked.
enum ReadJob {
    Op(Op),
    /// Close names for an unknown user.
    Suggest(String),
}

type ReadReply = oneshot::Sender<Result<serde_json::Value>>;

/// The read verbs' own thread and read-only registry connection: reads run beside the
/// writer (SQLite WAL lets them), and a large one holds up no change.
#[derive(Clone)]
struct Reader {
    tx: mpsc::Sender<(ReadJob, ReadReply)>,
}

impl Reader {
    fn start(state_dir: PathBuf, cfg: watch::Receiver<Arc<Config>>) -> Result<Reader> {
        let (tx, mut rx) = mpsc::channel::<(ReadJob, ReadReply)>(64);
        std::thread::Builder::new()
            .name("port25-reader".into())
            .spawn(move || {
                let mut store = SqliteStore::open_read_only(&state_dir).ok();
                while let Some((job, reply)) = rx.blocking_recv() {
                    let r = (|| {
                        if store.is_none() {
                            store = Some(SqliteStore::open_read_only(&state_dir)?);
                        }
                        let tx = store.as_mut().expect("opened above").read()?;
                        match job {
                            ReadJob::Op(op) => {
                                let cfg = cfg.borrow().clone();
                                ops::read(&*tx, &cfg, op)
                            }
                            ReadJob::Suggest(name) => {
                                Ok(json!(crate::registry::suggest(&*tx, &name)))
                            }
                        }
                    })();
                    let _ = reply.send(r);
                }
            })
            .context("starting the reader thread")?;
        Ok(Reader { tx })
    }

    async fn ask(&self, job: ReadJob) -> Result<serde_json::Value> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((job, reply))
            .await
            .map_err(|_| anyhow::anyhow!("the reader has stopped"))?;
        answer
            .await
            .map_err(|_| anyhow::anyhow!("the reader has stopped"))?
    }
}

/// The desired map state from the config and a registry snapshot, with its per-user index.
fn desired(
    cfg: &Config,
    store: &mut SqliteStore,
    clock: &Clock,
    now: jiff::Timestamp,
) -> Result<(Index, Desired)> {
    let snap = store.snapshot()?;
    let (wall, boot) = clock.at(now);
    Desired::build_indexed(cfg, &snap, wall, boot)
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

fn create_parent(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

/// Takes an exclusive lock next to the socket so two daemons never race on the same pins.
fn lock_instance(socket: &Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    let mut name = socket.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    create_parent(&path)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow::anyhow!(
            "another port25 daemon holds {} ({e}); stop it first",
            path.display()
        )
    })
}

/// Takes an exclusive lock on the pin directory itself: whatever socket or path spelling
/// another daemon (or an offline `detach`) uses, the same pin tree is the same inode.
pub fn lock_pins(pins: &Pins) -> Result<nix::fcntl::Flock<std::fs::File>> {
    let dir = std::fs::File::open(&pins.root)
        .with_context(|| format!("opening the pin directory {}", pins.root.display()))?;
    nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow::anyhow!(
            "another port25 daemon holds the pin directory {} ({e}): two daemons on one pin \
             tree would overwrite each other's maps and links; stop it first",
            pins.root.display()
        )
    })
}

fn read_gid(group: Option<&str>) -> Result<Option<nix::unistd::Gid>> {
    let Some(g) = group else { return Ok(None) };
    match nix::unistd::Group::from_name(g)? {
        Some(gr) => Ok(Some(gr.gid)),
        None => bail!("read_group `{g}` does not exist on this system"),
    }
}

/// Binds the control socket: 0600 root, or 0660 root:GROUP with a read-only group.
fn bind_socket(path: &Path, group: Option<&str>) -> Result<UnixListener> {
    create_parent(path)?;
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    // Create with a tight umask so the socket is never briefly open to others.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener.with_context(|| format!("binding {}", path.display()))?;
    if let Some(gid) = read_gid(group)? {
        nix::unistd::chown(path, None, Some(gid))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    } else {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(listener)
}

enum Role {
    Admin,
    ReadOnly,
}

fn role_of(uid: u32, gid: u32, read_gid: Option<nix::unistd::Gid>) -> Option<Role> {
    if uid == 0 || uid == nix::unistd::geteuid().as_raw() {
        return Some(Role::Admin);
    }
    let want = read_gid?;
    if gid == want.as_raw() {
        return Some(Role::ReadOnly);
    }
    let user = nix::unistd::User::from_uid(uid.into()).ok()??;
    let name = std::ffi::CString::new(user.name).ok()?;
    let groups = nix::unistd::getgrouplist(&name, user.gid).ok()?;
    groups.contains(&want).then_some(Role::ReadOnly)
}

fn actor(uid: u32, on_behalf_of: Option<String>) -> Actor {
    let name = nix::unistd::User::from_uid(uid.into())
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| format!("uid{uid}"));
    Actor {
        uid,
        name,
        on_behalf_of,
    }
}

/// One client connection: credentials, framing and limits here; changes run in the writer,
/// reads in the reader.
async fn connection(
    mut s: UnixStream,
    jobs: mpsc::Sender<Job>,
    reader: Reader,
    read_gid: Option<nix::unistd::Gid>,
) {
    let Ok(cred) = s.peer_cred() else { return };
    let Some(role) = role_of(cred.uid(), cred.gid(), read_gid) else {
        warn!(
            uid = cred.uid(),
            "refused a control connection from a peer that is not allowed"
        );
        write(
            &mut s,
            &Response::err(ErrorKind::Denied, "permission denied: root only"),
        )
        .await;
        return;
    };
    let req = match tokio::time::timeout(limits::REQUEST_DEADLINE, read_request(&mut s)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            write(&mut s, &Response::err(ErrorKind::Refused, format!("{e:#}"))).await;
            return;
        }
        Err(_) => {
            let secs = limits::REQUEST_DEADLINE.as_secs();
            write(
                &mut s,
                &Response::err(
                    ErrorKind::Refused,
                    format!("timed out: a request must arrive whole within {secs} s"),
                ),
            )
            .await;
            return;
        }
    };
    if matches!(role, Role::ReadOnly) && !req.op.read_only() {
        warn!(uid = cred.uid(), "refused a change from a read-only peer");
        write(
            &mut s,
            &Response::err(
                ErrorKind::Denied,
                "permission denied: the read-only group may not change anything",
            ),
        )
        .await;
        return;
    }
    if req.op.read_only() && !matches!(req.op, Op::Info) {
        let resp = match reader.ask(ReadJob::Op(req.op)).await {
            Ok(v) => Response::ok(v),
            Err(e) => explained(e, &reader).await,
        };
        write(&mut s, &resp).await;
        return;
    }
    let actor = actor(cred.uid(), req.on_behalf_of.clone());
    let (reply, answer) = oneshot::channel();
    if jobs.send(Job { req, actor, reply }).await.is_err() {
        write(
            &mut s,
            &Response::err(ErrorKind::Internal, "the daemon is shutting down"),
        )
        .await;
        return;
    }
    if let Ok((resp, written)) = answer.await {
        let resp = match resp {
            Reply::Done(r) => r,
            Reply::Failed(e) => explained(e, &reader).await,
        };
        write(&mut s, &resp).await;
        if let Some(w) = written {
            let _ = w.send(());
        }
    }
}

/// An error answer; an unknown user gets the close names, looked up off the writer.
async fn explained(e: anyhow::Error, reader: &Reader) -> Response {
    let msg = format!("{e:#}");
    let kind = ErrorKind::of(&e);
    let Some(unknown) = e.downcast_ref::<crate::registry::UnknownUser>() else {
        return Response::err(kind, msg);
    };
    let close: Vec<String> = match reader.ask(ReadJob::Suggest(unknown.name.clone())).await {
        Ok(v) => serde_json::from_value(v).unwrap_or_default(),
        Err(_) => vec![],
    };
    Response::err(
        kind,
        crate::registry::with_suggestions(&msg, &unknown.name, &close),
    )
}

impl Daemon {
    fn info(&self) -> reply::Info {
        reply::Info {
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs(),
            config: self.config_path.display().to_string(),
            registry: self.store.path.display().to_string(),
            reconciles: self.reconciles,
            drift_repaired: self.drift_repaired,
        }
    }

    /// A reload applies whole or not at all: everything that can be checked is checked
    /// first; new attachments are made while the maps still hold the old policy, and taken
    /// back if a later step fails; the maps are restored if writing them fails.
    fn reload(&mut self) -> Result<reply::Reloaded> {
        let new = Config::load(&self.config_path)?;
        if new.pin_dir != self.cfg.pin_dir
            || new.socket != self.cfg.socket
            || new.state_dir != self.cfg.state_dir
            || new.read_group != self.cfg.read_group
        {
            bail!("pin_dir, socket, state_dir and read_group cannot change on reload; restart the daemon");
        }
        datapath::check_pinned_layouts(&self.pins, &new.limits)?;
        for i in &new.interfaces {
            datapath::preflight(i)?;
        }
        let now = self.wall.now();
        let (index, want) = desired(&new, &mut self.store, &self.clock, now)?;
        policy::check_fits(&self.live, &want)?;
        let old_points: Vec<String> = self
            .cfg
            .interfaces
            .iter()
            .map(|i| i.attach_point())
            .collect();
        let mut added = Vec::new();
        for iface in &new.interfaces {
            let point = iface.attach_point();
            match datapath::attach(&mut self.ebpf, &self.pins, iface) {
                Ok(datapath::Attached::Swapped) => {}
                Ok(_) if old_points.contains(&point) => {}
                Ok(_) => added.push(point),
                Err(e) => {
                    self.take_back(&added);
                    return Err(e.context(format!("attaching {point}")));
                }
            }
        }
        let applied = match policy::apply(&mut self.live, &want) {
            Ok(a) => a,
            Err(e) => {
                if let Err(e2) = policy::apply(&mut self.live, &self.applied) {
                    error!("restoring the maps after a refused reload failed, reconciling: {e2:#}");
                    self.dirty = true;
                }
                self.take_back(&added);
                return Err(e);
            }
        };
        self.applied = want;
        self.index = index;
        let detached = datapath::detach_stale(&self.pins, &new)?;
        if let Err(e) = audit_forced_wide(&mut self.store, &new, &self.config_path) {
            error!("auditing the config's forced wide prefixes failed: {e:#}");
        }
        self.cfg = new;
        self.cfg_tx.send_replace(Arc::new(self.cfg.clone()));
        info!(writes = applied.writes, ?added, ?detached, "reloaded");
        Ok(reply::Reloaded {
            writes: applied.writes,
            attached: added,
            detached,
        })
    }

    /// Removes the attachments a refused reload made.
    fn take_back(&mut self, points: &[String]) {
        for p in points {
            if let Err(e) = datapath::unpin(&self.pins, p) {
                error!("taking back {p} after a refused reload: {e:#}");
            }
        }
    }

    /// Every configured attachment alive and on its interface: one whose interface was
    /// deleted (and perhaps re-created) or whose pin was lost is attached again.
    fn repair_links(&mut self) {
        for iface in &self.cfg.interfaces {
            let Some(problem) = datapath::link_problem(&self.pins, iface) else {
                continue;
            };
            let point = iface.attach_point();
            match datapath::attach(&mut self.ebpf, &self.pins, iface) {
                Ok(how) => {
                    self.link_errors.remove(&point);
                    warn!(%point, %problem, ?how, "attachment repaired");
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    if self.link_errors.get(&point) != Some(&msg) {
                        error!(
                            %point, %problem,
                            "cannot attach, port 25 is not blocked there until it can: {msg}"
                        );
                        self.link_errors.insert(point, msg);
                    }
                }
            }
        }
    }

    /// Full comparison of maps and registry: repairs drift and drops what has expired.
    fn reconcile(&mut self) {
        self.reconciles += 1;
        self.repair_links();
        let now = self.wall.now();
        if self.clock.resync_at(now) {
            warn!("the wall clock stepped: kernel expiry times are recomputed");
        }
        if let Err(e) = self.wall.record_ended(&mut self.store, now) {
            error!("recording ended unblocks failed: {e:#}");
        }
        let result =
            desired(&self.cfg, &mut self.store, &self.clock, now).and_then(|(index, want)| {
                let a = policy::apply(&mut self.live, &want)?;
                self.applied = want;
                self.index = index;
                Ok(a)
            });
        match result {
            Ok(a) => {
                if a.writes > 0 && !self.dirty {
                    self.drift_repaired += a.writes as u64;
                    warn!(
                        repaired = a.writes,
                        "maps had drifted from the registry; repaired"
                    );
                }
                self.dirty = false;
            }
            Err(e) => error!("reconcile failed: {e:#}"),
        }
    }

    /// Runs a registry change: rules and audit in one transaction, the resulting map state
    /// checked to fit, committed (durable), then applied to the maps. Only the users the
    /// transaction touched are recomputed; a change of runtime entries rebuilds everything.
    fn change<R>(
        &mut self,
        f: impl FnOnce(&mut dyn Tx, jiff::Timestamp) -> Result<R>,
    ) -> Result<R> {
        let now = self.wall.now();
        let (wall, boot) = self.clock.at(now);
        let mut rec = Recording::new(self.store.begin()?);
        let r = f(&mut rec, now)?;
        if rec.entries {
            let snap = crate::registry::store::snapshot_of(&rec)?;
            let (index, want) = Desired::build_indexed(&self.cfg, &snap, wall, boot)?;
            policy::check_fits(&self.live, &want)?;
            rec.commit()?;
            failpoint_after_commit();
            match policy::apply_delta(&mut self.live, &self.applied, &want) {
                Ok(_) => {
                    self.applied = want;
                    self.index = index;
                }
                Err(e) => self.apply_failed(e),
            }
            return Ok(r);
        }
        let changed = changed_users(&rec, wall, boot)?;
        let plan = self.index.plan(&self.applied, changed)?;
        policy::check_slots_fit(&self.live, &self.applied, &plan.slots)?;
        rec.commit()?;
        failpoint_after_commit();
        let settings_changed = self.index.apply(&mut self.applied, &plan);
        let settings = settings_changed.then_some(self.applied.settings);
        if let Err(e) = policy::write_slots(&mut self.live, &plan.slots, settings) {
            self.apply_failed(e);
        }
        Ok(r)
    }

    /// Committed, so acknowledged; the maps catch up on the next full reconcile.
    fn apply_failed(&mut self, e: anyhow::Error) {
        error!("applying a committed change to the maps failed, reconciling: {e:#}");
        self.dirty = true;
    }

    fn execute(&mut self, req: Request, actor: &Actor) -> (Reply, bool) {
        let op_name = format!("{:?}", req.op)
            .split([' ', '{', '('])
            .next()
            .unwrap_or_default()
            .to_string();
        let exit = matches!(req.op, Op::Detach);
        match ops::run(self, req.op, actor) {
            Ok(v) => (Reply::Done(Response::ok(v)), exit),
            Err(e) => {
                warn!(op = %op_name, %actor, "refused: {e:#}");
                (Reply::Failed(e), false)
            }
        }
    }
}

/// Reads one request; the body buffer grows as bytes arrive, so a length header alone
/// reserves nothing. The caller bounds the time.
async fn read_request(s: &mut UnixStream) -> Result<proto::Request> {
    let mut header = [0u8; 4];
    s.read_exact(&mut header)
        .await
        .context("reading the request header")?;
    let len = proto::frame_len(header)?;
    let mut body = Vec::with_capacity(len.min(limits::INITIAL_BODY));
    let got = (&mut *s).take(len as u64).read_to_end(&mut body).await?;
    if got != len {
        bail!("the request ended after {got} of its {len} bytes");
    }
    Ok(proto::decode_request(&body)?)
}

/// The frame for an answer; one over the size limit becomes an error that says so, never
/// silence.
fn answer_frame(r: &Response) -> Vec<u8> {
    match proto::encode(r) {
        Ok(f) => f,
        Err(e) => {
            warn!("an answer was too large to send: {e:#}");
            proto::encode(&Response::err(
                ErrorKind::Refused,
                format!(
                    "the answer is too large to send ({e:#}); ask for less (e.g. `audit --limit`)"
                ),
            ))
            .expect("a short error fits")
        }
    }
}

/// Writes an answer within [`limits::WRITE_DEADLINE`]; a client that does not read it is
/// dropped.
async fn write(s: &mut UnixStream, r: &Response) {
    let frame = answer_frame(r);
    match tokio::time::timeout(limits::WRITE_DEADLINE, s.write_all(&frame)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!("writing an answer: {e}"),
        Err(_) => warn!("a client did not read its answer in time; dropped"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_over_the_limit_becomes_an_error() {
        let big = "x".repeat(proto::MAX_FRAME + 1);
        let frame = answer_frame(&Response::ok(json!({ "records": big })));
        let len = proto::frame_len(frame[..4].try_into().unwrap()).unwrap();
        let r: Response = serde_json::from_slice(&frame[4..4 + len]).unwrap();
        assert!(!r.ok);
        assert!(r.error.unwrap().contains("too large"));
    }
}
