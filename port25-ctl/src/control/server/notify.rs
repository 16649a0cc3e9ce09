//! `abuse.notify_command`: the operator's program, run when a user is flagged likely
//! infected. Never through a shell (the argv is the config's list, the figures appended as
//! separate arguments), no stdin, a clean environment, a time limit, its output bounded into
//! the daemon log, at most [`MAX_RUNNING`] at once and one per user per `notify_interval`.
//! A failure is logged and counted; it never reaches the daemon's loop.

use std::{
    collections::HashMap,
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{io::AsyncReadExt, process::Command, sync::Semaphore};
use tracing::{info, warn};

use crate::metrics::DaemonMetrics;

/// Runs at once, all users together; a flag past this is retried at the next evaluation.
pub const MAX_RUNNING: usize = 4;
/// A run still going after this is killed (its whole process group).
pub const TIME_LIMIT: Duration = Duration::from_secs(10);
/// Bytes of stdout and of stderr kept for the log; the rest is read and dropped.
const OUTPUT_KEPT: usize = 4096;

/// What the program is told, in this order after the config's own arguments.
pub struct Notice {
    pub user: String,
    pub addr: std::net::IpAddr,
    pub attempts: u64,
    pub destinations: u64,
    pub held: bool,
}

impl Notice {
    fn args(&self) -> [String; 5] {
        [
            self.user.clone(),
            self.addr.to_string(),
            self.attempts.to_string(),
            self.destinations.to_string(),
            if self.held { "yes" } else { "no" }.to_string(),
        ]
    }
}

pub struct Notifier {
    slots: Arc<Semaphore>,
    /// When each user's last run started. Kept for `notify_interval` only (pruned as it
    /// grows), so its size follows the flagged users of an interval, not all time.
    last: HashMap<String, Instant>,
}

impl Default for Notifier {
    fn default() -> Self {
        Notifier {
            slots: Arc::new(Semaphore::new(MAX_RUNNING)),
            last: HashMap::new(),
        }
    }
}

impl Notifier {
    /// Starts a run for `n` unless one ran for this user within `interval` or
    /// [`MAX_RUNNING`] are running. Needs the tokio runtime (the daemon's loop).
    pub fn notify(
        &mut self,
        argv: &[String],
        interval: Duration,
        n: Notice,
        metrics: &DaemonMetrics,
    ) {
        if self
            .last
            .get(&n.user)
            .is_some_and(|t| t.elapsed() < interval)
        {
            return;
        }
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            warn!(user = %n.user, "notify_command not run: {MAX_RUNNING} runs still going; retried at the next evaluation");
            metrics.notify_run("busy");
            return;
        };
        if self.last.len() > 1024 {
            self.last.retain(|_, t| t.elapsed() < interval);
        }
        self.last.insert(n.user.clone(), Instant::now());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .args(n.args())
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group, so a timeout kills what it started too (and their hold on
            // the pipes); kill_on_drop covers a daemon that exits meanwhile.
            .process_group(0)
            .kill_on_drop(true);
        let metrics = metrics.clone();
        let user = n.user;
        tokio::spawn(async move {
            let result = run(cmd, &user).await;
            metrics.notify_run(result);
            drop(slot);
        });
    }
}

/// One run; its result label.
async fn run(mut cmd: Command, user: &str) -> &'static str {
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            warn!(%user, "notify_command could not start: {e}");
            return "error";
        }
    };
    let pid = child.id();
    let out = child.stdout.take();
    let err = child.stderr.take();
    let work = async {
        let (o, e, status) = tokio::join!(bounded(out), bounded(err), child.wait());
        (o, e, status)
    };
    match tokio::time::timeout(TIME_LIMIT, work).await {
        Ok((o, e, status)) => {
            log_output(user, "stdout", &o);
            log_output(user, "stderr", &e);
            match status {
                Ok(s) if s.success() => {
                    info!(%user, "notify_command ran");
                    "ok"
                }
                Ok(s) => {
                    warn!(%user, "notify_command failed: {s}");
                    "failed"
                }
                Err(e) => {
                    warn!(%user, "notify_command: waiting for it: {e}");
                    "error"
                }
            }
        }
        Err(_) => {
            if let Some(pid) = pid {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.kill().await;
            warn!(%user, "notify_command killed: still running after {TIME_LIMIT:?}");
            "timeout"
        }
    }
}

/// The first [`OUTPUT_KEPT`] bytes of a pipe, read to its end; whether more came.
async fn bounded<R: tokio::io::AsyncRead + Unpin>(r: Option<R>) -> (Vec<u8>, bool) {
    let Some(mut r) = r else {
        return (Vec::new(), false);
    };
    let mut kept = Vec::new();
    let mut cut = false;
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return (kept, cut),
            Ok(n) => {
                let room = OUTPUT_KEPT - kept.len();
                kept.extend_from_slice(&buf[..n.min(room)]);
                cut |= n > room;
            }
        }
    }
}

fn log_output(user: &str, stream: &str, (bytes, cut): &(Vec<u8>, bool)) {
    let text = String::from_utf8_lossy(bytes);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        info!(%user, stream, "notify_command: {}", line.escape_debug());
    }
    if *cut {
        info!(%user, stream, "notify_command: output cut at {OUTPUT_KEPT} bytes");
    }
}
