//! `port25-ctl daemon`: the single writer. Loads and pins, applies the policy, attaches,
//! then serves the control socket, reloads on SIGHUP and repairs drift periodically.
//! Exiting (signal, crash, kill -9) leaves the pinned programs enforcing.
//!
//! Connections are served concurrently (reading, peer checks, framing), but every request
//! is executed by one loop, in arrival order: a change is committed to the registry, then
//! applied to the maps, then acknowledged.

use std::{
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{bail, Context as _, Result};
use aya::Ebpf;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream},
    signal::unix::{signal, SignalKind},
    sync::{mpsc, oneshot},
};
use tracing::{error, info, warn};

use crate::{
    config::Config,
    datapath,
    incremental::{changed_users, Index},
    livemaps::LiveMaps,
    pins::Pins,
    policy::{self, Clock, Desired},
    proto::{self, Op, Request, Response},
    registry::Actor,
    store::{sqlite::SqliteStore, Recording, Store, Tx},
};

mod ops;

/// Set in the daemon's environment, the daemon aborts right after its first committed change
/// (before the maps are written): the crash-consistency test uses it.
pub const FAILPOINT_AFTER_COMMIT: &str = "PORT25_FAILPOINT_AFTER_COMMIT";

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
}

/// Test hook: seconds added to the system's wall clock as the daemon reads it (negative =
/// a clock behind real time, as after a boot without RTC before NTP has synced).
pub const FAKE_WALL_SHIFT: &str = "PORT25_TEST_WALL_SHIFT_S";

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
            .audit(&crate::store::AuditQuery {
                subject: None,
                since: None,
                limit: 1,
            })?
            .pop()
            .map(|r| r.at);
        let shift = match std::env::var(FAKE_WALL_SHIFT) {
            Ok(s) => jiff::SignedDuration::from_secs(
                s.parse()
                    .with_context(|| format!("{FAKE_WALL_SHIFT}={s}"))?,
            ),
            Err(_) => jiff::SignedDuration::ZERO,
        };
        Ok(Wall {
            floor: newest.unwrap_or(jiff::Timestamp::UNIX_EPOCH),
            floor_boot: crate::livemaps::boot_ns(),
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
            .filter(|u| u.policy == crate::store::Policy::Unblocked)
            .filter(|u| u.until.is_some_and(|t| t > since && t <= now))
            .collect();
        for u in &ended {
            tx.append_audit(&crate::store::AuditRecord {
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

    fn now(&mut self) -> jiff::Timestamp {
        let raw = jiff::Timestamp::now()
            .checked_add(self.shift)
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
        let since = crate::livemaps::boot_ns().saturating_sub(self.floor_boot);
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
    reply: oneshot::Sender<(Response, Option<oneshot::Sender<()>>)>,
}

pub fn run(config_path: &Path) -> Result<()> {
    let cfg = Config::load(config_path)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(config_path.to_owned(), cfg))
}

async fn serve(config_path: PathBuf, cfg: Config) -> Result<()> {
    let pins = Pins::new(&cfg.pin_dir);
    // One daemon per socket, held for the process lifetime (the kernel drops it on any exit).
    let _lock = lock_instance(&cfg.socket)?;
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
    let clock = Clock::sample_at(wall.now());
    // Policy before programs: a fresh attach never runs on empty maps. A change committed
    // by an earlier daemon that died before applying it is applied here.
    let (index, want) = desired(&cfg, &mut store, &clock, wall.now())?;
    policy::check_fits(&live, &want)?;
    let applied = policy::apply(&mut live, &want)?;
    info!(writes = applied.writes, "policy applied");
    for iface in &cfg.interfaces {
        let how = datapath::attach(&mut ebpf, &pins, iface)?;
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
    };
    let (jobs_tx, mut jobs) = mpsc::channel::<Job>(1024);
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(d.cfg.reconcile_interval);
    tick.tick().await;
    let mut quick = tokio::time::interval(std::time::Duration::from_secs(1));
    info!(socket = %d.cfg.socket.display(), "ready");
    // Type=notify units are "started" only once enforcement is in place.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    loop {
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok((stream, _)) => {
                    tokio::spawn(connection(stream, jobs_tx.clone(), read_gid));
                }
                Err(e) => warn!("accept: {e}"),
            },
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
            _ = tick.tick() => d.reconcile(),
            _ = quick.tick(), if d.dirty => d.reconcile(),
            _ = term.recv() => { info!("SIGTERM: exiting; the pinned programs keep enforcing"); break; }
            _ = int.recv() => { info!("SIGINT: exiting; the pinned programs keep enforcing"); break; }
        }
    }
    let _ = std::fs::remove_file(&d.cfg.socket);
    Ok(())
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
        tx.append_audit(&crate::store::AuditRecord {
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

fn failpoint_after_commit() {
    if std::env::var_os(FAILPOINT_AFTER_COMMIT).is_some() {
        // Test hook: dies where a crash hurts most, committed but not yet in the maps.
        std::process::abort();
    }
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

/// One client connection: credentials, framing and limits here; execution in the writer.
async fn connection(
    mut s: UnixStream,
    jobs: mpsc::Sender<Job>,
    read_gid: Option<nix::unistd::Gid>,
) {
    let Ok(cred) = s.peer_cred() else { return };
    let Some(role) = role_of(cred.uid(), cred.gid(), read_gid) else {
        warn!(
            uid = cred.uid(),
            "refused a control connection from a peer that is not allowed"
        );
        let _ = write(&mut s, &Response::err("permission denied: root only")).await;
        return;
    };
    let req = match read_request(&mut s).await {
        Ok(r) => r,
        Err(e) => {
            let _ = write(&mut s, &Response::err(format!("{e:#}"))).await;
            return;
        }
    };
    if matches!(role, Role::ReadOnly) && !req.op.read_only() {
        warn!(uid = cred.uid(), "refused a change from a read-only peer");
        let _ = write(
            &mut s,
            &Response::err("permission denied: the read-only group may not change anything"),
        )
        .await;
        return;
    }
    let actor = actor(cred.uid(), req.on_behalf_of.clone());
    let (reply, answer) = oneshot::channel();
    if jobs.send(Job { req, actor, reply }).await.is_err() {
        let _ = write(&mut s, &Response::err("the daemon is shutting down")).await;
        return;
    }
    if let Ok((resp, written)) = answer.await {
        let _ = write(&mut s, &resp).await;
        if let Some(w) = written {
            let _ = w.send(());
        }
    }
}

impl Daemon {
    fn info(&self) -> serde_json::Value {
        json!({
            "pid": std::process::id(),
            "uptime_s": self.started.elapsed().as_secs(),
            "config": self.config_path.display().to_string(),
            "registry": self.store.path.display().to_string(),
            "reconciles": self.reconciles,
            "drift_repaired": self.drift_repaired,
        })
    }

    /// Everything is validated before the first change; a refused reload changes nothing.
    fn reload(&mut self) -> Result<serde_json::Value> {
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
            datapath::link_is_ethernet(&i.name)?;
        }
        let now = self.wall.now();
        let (index, want) = desired(&new, &mut self.store, &self.clock, now)?;
        policy::check_fits(&self.live, &want)?;
        let applied = policy::apply(&mut self.live, &want)?;
        self.applied = want;
        self.index = index;
        for iface in &new.interfaces {
            datapath::attach(&mut self.ebpf, &self.pins, iface)?;
        }
        let detached = datapath::detach_stale(&self.pins, &new)?;
        if let Err(e) = audit_forced_wide(&mut self.store, &new, &self.config_path) {
            error!("auditing the config's forced wide prefixes failed: {e:#}");
        }
        self.cfg = new;
        info!(writes = applied.writes, ?detached, "reloaded");
        Ok(json!({ "writes": applied.writes, "detached": detached }))
    }

    /// Full comparison of maps and registry: repairs drift and drops what has expired.
    fn reconcile(&mut self) {
        self.reconciles += 1;
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
            let snap = crate::store::snapshot_of(&rec)?;
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

    fn execute(&mut self, req: Request, actor: &Actor) -> (Response, bool) {
        let op_name = format!("{:?}", req.op)
            .split([' ', '{', '('])
            .next()
            .unwrap_or_default()
            .to_string();
        let exit = matches!(req.op, Op::Detach);
        match ops::run(self, req.op, actor) {
            Ok(v) => (Response::ok(v), exit),
            Err(e) => {
                warn!(op = %op_name, %actor, "refused: {e:#}");
                (Response::err(format!("{e:#}")), false)
            }
        }
    }
}

async fn read_request(s: &mut UnixStream) -> Result<proto::Request> {
    let mut header = [0u8; 4];
    tokio::time::timeout(std::time::Duration::from_secs(5), s.read_exact(&mut header))
        .await
        .context("timed out")??;
    let mut body = vec![0u8; proto::frame_len(header)?];
    tokio::time::timeout(std::time::Duration::from_secs(30), s.read_exact(&mut body))
        .await
        .context("timed out")??;
    proto::decode_request(&body)
}

async fn write(s: &mut UnixStream, r: &Response) -> Result<()> {
    s.write_all(&proto::encode(r)?).await?;
    Ok(())
}
