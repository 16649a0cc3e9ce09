//! The single writer's work, run by the daemon's loop one at a time in arrival order: a
//! change (registry first, then maps), a reload, a full reconcile.

use std::sync::Arc;

use anyhow::Result;
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use super::{audit_forced_wide, desired, ops, Daemon};
use crate::{
    bpf::datapath,
    config::Config,
    control::proto::{Op, Request, Response},
    control::reply,
    // The failpoint is a test hook; `control::testing` says why it is safe in production.
    control::testing::failpoint_after_commit,
    metrics::http::MetricsServer,
    policy::index::changed_users,
    policy::{self, Desired},
    registry::store::{Recording, Store, Tx},
    registry::Actor,
};

/// One request, from a connection task to the writer loop.
pub(super) struct Job {
    pub(super) req: Request,
    pub(super) actor: Actor,
    /// The answer, and for a last answer (detach) a way to learn it has been written.
    pub(super) reply: oneshot::Sender<(Reply, Option<oneshot::Sender<()>>)>,
}

/// The writer's answer; a refusal keeps its error so the connection can explain it.
pub(super) enum Reply {
    Done(Response),
    Failed(anyhow::Error),
}

impl Daemon {
    /// A reload applies whole or not at all: everything that can be checked is checked
    /// first; new attachments are made while the maps still hold the old policy, and taken
    /// back if a later step fails; the maps are restored if writing them fails.
    pub(super) fn reload(&mut self) -> Result<reply::Reloaded> {
        let new = Config::load(&self.config_path)?;
        if new.pin_dir != self.cfg.pin_dir
            || new.socket != self.cfg.socket
            || new.state_dir != self.cfg.state_dir
            || new.read_group != self.cfg.read_group
        {
            crate::registry::refuse!("pin_dir, socket, state_dir and read_group cannot change on reload; restart the daemon");
        }
        // What the new config asks of the kernel side (other `limits`, XDP on a device that
        // cannot take it) is the operator's request refused, not a failure of the daemon.
        let refused =
            |e: anyhow::Error| anyhow::Error::from(crate::registry::Refused(format!("{e:#}")));
        datapath::check_pinned_layouts(&self.pins, &new.limits).map_err(refused)?;
        let (_, targets) = super::links::targets_here(&new);
        // A glob device that cannot take the hook fails that device only (as at start).
        for t in targets.iter().filter(|t| t.glob.is_none()) {
            datapath::preflight(&t.iface).map_err(refused)?;
        }
        // Bound now, handed over only if the reload succeeds (dropped, unbound, if not).
        let metrics =
            MetricsServer::prepare(self.cfg.metrics_listen, new.metrics_listen).map_err(refused)?;
        let now = self.wall.now();
        let (index, want) = desired(&new, &mut self.store, &self.clock, now)?;
        policy::check_fits(&self.live, &want)?;
        let old_points: Vec<String> = self
            .cfg
            .targets(&self.devices.names())
            .iter()
            .map(|t| t.iface.attach_point())
            .collect();
        let mut added = Vec::new();
        for t in &targets {
            let iface = &t.iface;
            let point = iface.attach_point();
            match datapath::attach(&mut self.ebpf, &self.pins, iface) {
                Ok(datapath::Attached::Swapped) => {}
                Ok(_) if old_points.contains(&point) => {}
                Ok(_) => added.push(point),
                Err(e) if t.glob.is_some() => {
                    let msg = format!("{e:#}");
                    error!(%point, "cannot attach, port 25 is not blocked there until it can: {msg}");
                    self.link_errors.insert(point, msg);
                }
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
        if let Err(e) = crate::bpf::offenders::write_settings(&mut self.live, &new.abuse) {
            error!("the new abuse settings did not reach the kernel: {e:#}");
        }
        let detached = datapath::detach_stale(&self.pins, &targets)?;
        if let Err(e) = audit_forced_wide(&mut self.store, &new, &self.config_path) {
            error!("auditing the config's forced wide prefixes failed: {e:#}");
        }
        self.cfg = new;
        self.cfg_tx.send_replace(Arc::new(self.cfg.clone()));
        self.flagged.reset();
        // Also when unchanged: a listener that could not bind before is tried again.
        self.metrics_server.commit(metrics);
        info!(writes = applied.writes, ?added, ?detached, "reloaded");
        Ok(reply::Reloaded {
            writes: applied.writes,
            attached: added,
            detached,
        })
    }

    /// Full comparison of maps and registry: repairs drift and drops what has expired.
    pub(super) fn reconcile(&mut self) {
        self.reconciles += 1;
        self.metrics.reconciles.inc();
        self.repair_links();
        let now = self.wall.now();
        if self.clock.resync_at(now) {
            warn!("the wall clock stepped: kernel expiry times are recomputed");
        }
        if let Err(e) = self.wall.record_ended(&mut self.store, now) {
            error!("recording ended unblocks failed: {e:#}");
        }
        if let Err(e) = crate::bpf::offenders::write_settings(&mut self.live, &self.cfg.abuse) {
            error!("writing the abuse settings failed: {e:#}");
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
                    self.metrics.drift_repaired.inc_by(a.writes as u64);
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
    pub(super) fn change<R>(
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
        let before: Vec<_> = plan
            .slots
            .iter()
            .map(|(s, _)| self.applied.slot(s))
            .collect();
        let settings_changed = self.index.apply(&mut self.applied, &plan);
        let settings = settings_changed.then_some(self.applied.settings);
        if let Err(e) = policy::write_slots(&mut self.live, &plan.slots, &before, settings) {
            self.apply_failed(e);
        }
        Ok(r)
    }

    /// Committed, so acknowledged; the maps catch up on the next full reconcile.
    pub(super) fn apply_failed(&mut self, e: anyhow::Error) {
        error!("applying a committed change to the maps failed, reconciling: {e:#}");
        self.dirty = true;
    }

    pub(super) fn execute(&mut self, req: Request, actor: &Actor) -> (Reply, bool) {
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
