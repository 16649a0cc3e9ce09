//! `port25-ctl daemon`: the single writer. Loads and pins, applies the policy, attaches,
//! then serves the control socket, reloads on SIGHUP and repairs drift periodically.
//! Exiting (signal, crash, kill -9) leaves the pinned programs enforcing.

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
};
use tracing::{error, info, warn};

use crate::{
    config::Config,
    datapath,
    livemaps::LiveMaps,
    pins::Pins,
    policy::{self, Desired},
    proto::{self, Op, Response},
};

struct Daemon {
    config_path: PathBuf,
    cfg: Config,
    pins: Pins,
    ebpf: Ebpf,
    live: LiveMaps,
    started: Instant,
    reconciles: u64,
    drift_repaired: u64,
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
    let mut ebpf = datapath::load(&cfg, &pins)?;
    let mut live = LiveMaps::open(&pins)?;
    // Policy before programs: a fresh attach never runs on empty maps.
    let applied = policy::apply(&mut live, &Desired::from_config_now(&cfg))?;
    info!(writes = applied.writes, "policy applied");
    for iface in &cfg.interfaces {
        let how = datapath::attach(&mut ebpf, &pins, iface)?;
        info!(interface = %iface.name, point = %iface.attach_point(), ?how, "enforcing");
    }
    for gone in datapath::detach_stale(&pins, &cfg)? {
        info!(point = %gone, "detached: no longer in the config");
    }
    // The socket is bound only now: a client (or systemd, or a lab) that gets an answer knows
    // the programs are attached and enforcing, not merely that a process has started.
    let listener = bind_socket(&cfg.socket)?;
    let mut d = Daemon {
        config_path,
        cfg,
        pins,
        ebpf,
        live,
        started: Instant::now(),
        reconciles: 0,
        drift_repaired: 0,
    };
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(d.cfg.reconcile_interval);
    tick.tick().await;
    info!(socket = %d.cfg.socket.display(), "ready");
    // Type=notify units are "started" only once enforcement is in place.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    loop {
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok((stream, _)) => {
                    if d.handle(stream).await {
                        break;
                    }
                }
                Err(e) => warn!("accept: {e}"),
            },
            _ = hup.recv() => {
                if let Err(e) = d.reload() {
                    error!("reload refused, running policy unchanged: {e:#}");
                }
            }
            _ = tick.tick() => d.reconcile(),
            _ = term.recv() => { info!("SIGTERM: exiting; the pinned programs keep enforcing"); break; }
            _ = int.recv() => { info!("SIGINT: exiting; the pinned programs keep enforcing"); break; }
        }
    }
    let _ = std::fs::remove_file(&d.cfg.socket);
    Ok(())
}

/// Takes an exclusive lock next to the socket so two daemons never race on the same pins.
fn lock_instance(socket: &Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    let mut name = socket.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
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

/// Binds the control socket (mode 0600), refusing to steal one a live daemon answers on.
fn bind_socket(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("another port25 daemon answers on {}", path.display());
        }
        std::fs::remove_file(path)?;
    }
    // Create with a tight umask so the socket is never briefly open to others.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener.with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

impl Daemon {
    /// Serves one connection; true when the daemon should exit.
    async fn handle(&mut self, mut s: UnixStream) -> bool {
        let allowed = match s.peer_cred() {
            Ok(c) => c.uid() == 0 || c.uid() == nix::unistd::geteuid().as_raw(),
            Err(_) => false,
        };
        if !allowed {
            warn!("refused a control connection from a peer that is not root");
            let _ = write(&mut s, &Response::err("permission denied: root only")).await;
            return false;
        }
        let req = match read_request(&mut s).await {
            Ok(r) => r,
            Err(e) => {
                let _ = write(&mut s, &Response::err(format!("{e:#}"))).await;
                return false;
            }
        };
        let (resp, exit) = match req.op {
            Op::Info => (Response::ok(self.info()), false),
            Op::Reload => match self.reload() {
                Ok(v) => (Response::ok(v), false),
                Err(e) => {
                    error!("reload refused, running policy unchanged: {e:#}");
                    (Response::err(format!("{e:#}")), false)
                }
            },
            Op::Detach => match datapath::detach_all(&self.pins) {
                Ok(points) => {
                    info!(?points, "detached everything; exiting");
                    (Response::ok(json!({ "detached": points })), true)
                }
                Err(e) => (Response::err(format!("{e:#}")), false),
            },
        };
        let _ = write(&mut s, &resp).await;
        exit
    }

    fn info(&self) -> serde_json::Value {
        json!({
            "pid": std::process::id(),
            "uptime_s": self.started.elapsed().as_secs(),
            "config": self.config_path.display().to_string(),
            "reconciles": self.reconciles,
            "drift_repaired": self.drift_repaired,
        })
    }

    /// Everything is validated before the first change; a refused reload changes nothing.
    fn reload(&mut self) -> Result<serde_json::Value> {
        let new = Config::load(&self.config_path)?;
        if new.pin_dir != self.cfg.pin_dir || new.socket != self.cfg.socket {
            bail!("pin_dir and socket cannot change on reload; restart the daemon");
        }
        datapath::check_pinned_layouts(&self.pins, &new.limits)?;
        for i in &new.interfaces {
            datapath::link_is_ethernet(&i.name)?;
        }
        let applied = policy::apply(&mut self.live, &Desired::from_config_now(&new))?;
        for iface in &new.interfaces {
            datapath::attach(&mut self.ebpf, &self.pins, iface)?;
        }
        let detached = datapath::detach_stale(&self.pins, &new)?;
        self.cfg = new;
        info!(writes = applied.writes, ?detached, "reloaded");
        Ok(json!({ "writes": applied.writes, "detached": detached }))
    }

    fn reconcile(&mut self) {
        self.reconciles += 1;
        match policy::apply(&mut self.live, &Desired::from_config_now(&self.cfg)) {
            Ok(a) if a.writes > 0 => {
                self.drift_repaired += a.writes as u64;
                warn!(
                    repaired = a.writes,
                    "maps had drifted from the policy; repaired"
                );
            }
            Ok(_) => {}
            Err(e) => error!("reconcile failed: {e:#}"),
        }
    }
}

async fn read_request(s: &mut UnixStream) -> Result<proto::Request> {
    let mut header = [0u8; 4];
    tokio::time::timeout(std::time::Duration::from_secs(5), s.read_exact(&mut header))
        .await
        .context("timed out")??;
    let mut body = vec![0u8; proto::frame_len(header)?];
    tokio::time::timeout(std::time::Duration::from_secs(5), s.read_exact(&mut body))
        .await
        .context("timed out")??;
    proto::decode_request(&body)
}

async fn write(s: &mut UnixStream, r: &Response) -> Result<()> {
    s.write_all(&proto::encode(r)?).await?;
    Ok(())
}
