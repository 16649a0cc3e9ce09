//! The read verbs' thread: its own read-only registry connection, so a read, however large,
//! never waits for the writer nor holds it up.

use std::{path::PathBuf, sync::Arc};

use anyhow::{Context as _, Result};
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};

use super::ops;
use crate::{config::Config, control::proto::Op, registry::store::sqlite::SqliteStore};

/// What the reader thread is asked.
pub(super) enum ReadJob {
    Op(Op),
    /// Close names for an unknown user.
    Suggest(String),
}

pub(super) type ReadReply = oneshot::Sender<Result<serde_json::Value>>;

/// The read verbs' own thread and read-only registry connection: reads run beside the
/// writer (SQLite WAL lets them), and a large one holds up no change.
#[derive(Clone)]
pub(super) struct Reader {
    tx: mpsc::Sender<(ReadJob, ReadReply)>,
}

impl Reader {
    pub(super) fn start(state_dir: PathBuf, cfg: watch::Receiver<Arc<Config>>) -> Result<Reader> {
        let (tx, mut rx) = mpsc::channel::<(ReadJob, ReadReply)>(64);
        std::thread::Builder::new()
            .name("port25-reader".into())
            .spawn(move || {
                let mut store = SqliteStore::open_read_only(&state_dir).ok();
                // Its own connection to the fleet's database (`registry` cannot change on
                // reload), for `user show`'s view of every router's sessions.
                let mut fleet = cfg.borrow().registry.as_ref().and_then(|r| {
                    crate::fleet::Fleet::new(r)
                        .map_err(|e| tracing::error!("the reader's fleet view: {e:#}"))
                        .ok()
                });
                while let Some((job, reply)) = rx.blocking_recv() {
                    let r = (|| {
                        if store.is_none() {
                            store = Some(SqliteStore::open_read_only(&state_dir)?);
                        }
                        let tx = store.as_mut().expect("opened above").read()?;
                        match job {
                            ReadJob::Op(op) => {
                                let cfg = cfg.borrow().clone();
                                let show = matches!(op, Op::UserShow(_));
                                let mut v = ops::read(&*tx, &cfg, op)?;
                                if let (true, Some(fl)) = (show, fleet.as_mut()) {
                                    fleet_view(fl, &mut v);
                                }
                                Ok(v)
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

    pub(super) async fn ask(&self, job: ReadJob) -> Result<serde_json::Value> {
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

/// Adds every router's sessions of the shown user to a `user show` answer; the database
/// unreachable, says so (the local answer stands, bounded by the fleet's timeout).
fn fleet_view(fleet: &mut crate::fleet::Fleet, v: &mut serde_json::Value) {
    use crate::control::reply::{FleetSessions, RouterSession};
    let Some(user) = v["user"]["name"].as_str().map(str::to_string) else {
        return;
    };
    let view = match fleet.sessions_marked(&user) {
        Ok(s) => FleetSessions {
            sessions: s
                .into_iter()
                .map(|p| RouterSession {
                    router: p.router,
                    router_silent_s: p.stale_for.map(|d| d.as_secs()),
                    session: p.session,
                })
                .collect(),
            unavailable: None,
        },
        Err(e) => FleetSessions {
            sessions: Vec::new(),
            unavailable: Some(format!("{e:#}")),
        },
    };
    v["fleet"] = json!(view);
}
