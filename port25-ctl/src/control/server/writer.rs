//! The single writer's work, run by the daemon's loop one at a time in arrival order: a
//! change (registry first, then maps), a reload, a full reconcile.

use std::sync::Arc;

use anyhow::Result;
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use super::{
    audit_forced_wide, desired, ops,
    rebuild::{Built, Rebuild},
    Daemon,
};
use crate::{
    bpf::datapath,
    config::Config,
    control::proto::{Op, Request, Response},
    control::reply,
    // The failpoint is a test hook; `control::testing` says why it is safe in production.
    control::testing::failpoint_after_commit,
    metrics::http::MetricsServer,
    policy::index::{changed_users, Deferred},
    policy::{self, Desired},
    registry::store::{Recording, Store, Tx},
    registry::Actor,
};

/// Builds dropped in a row before a reconcile is made on the loop instead.
const MAX_SPOILED_RUNS: u32 = 3;

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
        // A running reconcile's build read the old config.
        if let Some(r) = self.rebuild.as_mut() {
            r.spoil("reload");
        }
        super::warm_socket_hint(&self.config_path);
        if new.pin_dir != self.cfg.pin_dir
            || new.socket != self.cfg.socket
            || new.state_dir != self.cfg.state_dir
            || new.read_group != self.cfg.read_group
            || new.registry != self.cfg.registry
        {
            crate::registry::refuse!("pin_dir, socket, state_dir, read_group and registry cannot change on reload; restart the daemon");
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
        // A hook no interface used until now: its program is verified here, before any link
        // moves (a refused one would otherwise fail each glob device in turn, after their
        // old links went).
        datapath::verify_entry_points(&mut self.ebpf, &new).map_err(refused)?;
        // Bound now, handed over only if the reload succeeds (dropped, unbound, if not).
        let metrics =
            MetricsServer::prepare(self.cfg.metrics_listen, new.metrics_listen).map_err(refused)?;
        let now = self.wall.now();
        let (want, entries) = desired(&new, &mut self.store, &self.clock, now)?;
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
        self.index = Deferred::spawn(entries);
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

    /// Full comparison of maps and registry: repairs drift and drops what has expired. The
    /// build runs off the loop ([`super::rebuild`]) and is applied when it is done
    /// ([`Daemon::rebuilt`]); one at a time.
    pub(super) fn reconcile(&mut self) {
        // With PORT25_LOG=port25_ctl::control::server=debug: where a reconcile's time goes
        // on the loop (which answers nothing meanwhile).
        let t = std::time::Instant::now();
        let phase = |what: &str| debug!(ms = t.elapsed().as_millis() as u64, "reconcile: {what}");
        self.repair_links();
        phase("links repaired");
        if self.dirty {
            // A change's map write failed: what the maps hold is not known, and an address
            // may be open that should not be. Repaired here and now, as before builds ran
            // off the loop, not after a build that can no longer be used.
            self.rebuild = None;
        } else if self.rebuild.is_some() {
            // The running build answers for this tick too.
            return;
        }
        self.reconciles += 1;
        self.metrics.reconciles.inc();
        let now = self.wall.now();
        if self.clock.resync_at(now) {
            warn!("the wall clock stepped: kernel expiry times are recomputed");
        }
        if let Err(e) = self.wall.record_ended(&mut self.store, now) {
            error!("recording ended unblocks failed: {e:#}");
        }
        phase("ended unblocks recorded");
        if let Err(e) = crate::bpf::offenders::write_settings(&mut self.live, &self.cfg.abuse) {
            error!("writing the abuse settings failed: {e:#}");
        }
        self.prune_changes();
        self.retry = false;
        if self.spoiled_runs < MAX_SPOILED_RUNS && !self.dirty {
            self.rebuild = Some(Rebuild::start(
                self.cfg_tx.borrow().clone(),
                self.clock,
                now,
            ));
            phase("build started off the loop");
            return;
        }
        // Builds keep being dropped (changes they cannot be brought up to date with): one
        // made here, where no change can come between.
        self.spoiled_runs = 0;
        let result =
            desired(&self.cfg, &mut self.store, &self.clock, now).and_then(|(want, entries)| {
                phase("desired state built on the loop");
                let a = policy::apply(&mut self.live, &want)?;
                phase("maps compared and written");
                self.applied = want;
                self.index = Deferred::spawn(entries);
                Ok(a)
            });
        self.reconciled(result);
    }

    /// A reconcile's build is done: brought up to date with the changes made meanwhile, then
    /// applied from the maps as they now are (see [`super::rebuild`]).
    pub(super) fn rebuilt(&mut self, built: Result<Built>) {
        let Some(r) = self.rebuild.take() else {
            return;
        };
        let t = std::time::Instant::now();
        // A build that failed counts as one dropped: builds that keep failing (no thread,
        // the pins or the registry unreadable from a thread) give way to one on the loop.
        let built = match (built, r.spoiled) {
            (Err(e), _) => {
                self.spoiled_runs += 1;
                error!(runs = self.spoiled_runs, "reconcile's build failed: {e:#}");
                self.retry = true;
                return;
            }
            (Ok(_), Some(why)) => {
                self.spoiled_runs += 1;
                debug!(
                    why,
                    runs = self.spoiled_runs,
                    "reconcile: build dropped, made again"
                );
                self.retry = true;
                return;
            }
            (Ok(b), None) => b,
        };
        self.spoiled_runs = 0;
        let Built {
            mut have,
            mut want,
            mut index,
        } = built;
        let (users, changes) = (r.users.len(), r.slots.len());
        // Set once the maps may be written: a refusal before it (the replay's prefix lengths,
        // a map full) leaves them as they were.
        let mut writing = false;
        let result = (|| {
            if !r.users.is_empty() {
                let plan = index.plan(&want, r.users.into_iter().collect())?;
                index.apply(&mut want, &plan);
            }
            // The maps as the loop last wrote them, where it wrote since the build read them.
            for s in &r.slots {
                have.set_slot(s, self.applied.slot(s));
            }
            if r.settings {
                have.settings = self.applied.settings;
            }
            writing = true;
            policy::apply_delta(&mut self.live, &have, &want)
        })();
        match &result {
            Ok(_) => {
                let old = (
                    std::mem::replace(&mut self.applied, want),
                    std::mem::replace(&mut self.index, index.into()),
                );
                // Freeing three states of a million entries each took over a second: not on
                // the loop (where a thread cannot be had, here after all).
                let _ = std::thread::Builder::new()
                    .name("port25-free".into())
                    .spawn(move || drop((old, have)));
            }
            // Written in part, maybe: the loop's record of the maps no longer holds, so the
            // next tick reconciles on the loop. A map full is refused before the first write.
            Err(e) if writing && !e.chain().any(|c| c.is::<crate::bpf::maps::MapFull>()) => {
                self.dirty = true;
            }
            Err(_) => {}
        }
        debug!(
            ms = t.elapsed().as_millis() as u64,
            users,
            slots = changes,
            "reconcile: applied on the loop, brought up to date with the changes made meanwhile"
        );
        self.reconciled(result);
    }

    fn reconciled(&mut self, result: Result<policy::Applied>) {
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

    /// Runs a policy change. With a fleet registry, it is the fleet's: under the fleet's
    /// write lock the replica first catches up with the log, then the change is published
    /// to the fleet before it commits here (see [`crate::fleet`]); the database unreachable,
    /// it fails at once and nothing changes here.
    pub(super) fn change<R>(
        &mut self,
        f: impl FnOnce(&mut dyn Tx, jiff::Timestamp) -> Result<R>,
    ) -> Result<R> {
        if self.fleet.is_none() {
            return self.change_in(Scope::Local, f);
        }
        let t = std::time::Instant::now();
        let r = self.catch_up_locked();
        debug!(
            us = t.elapsed().as_micros() as u64,
            "change: fleet begun and caught up"
        );
        self.fleet_seen(&r);
        if let Err(e) = r {
            if let Some(fleet) = self.fleet.as_mut() {
                fleet.rollback();
            }
            return Err(e);
        }
        let r = self.change_in(Scope::Fleet, f);
        self.fleet_seen(&r);
        r
    }

    /// A change that is this router's alone (sessions, their events): never waits for,
    /// nor needs, the fleet's database.
    pub(super) fn change_local<R>(
        &mut self,
        f: impl FnOnce(&mut dyn Tx, jiff::Timestamp) -> Result<R>,
    ) -> Result<R> {
        self.change_in(Scope::Local, f)
    }

    /// A session event: this router's own, as [`Daemon::change_local`]; the users it first
    /// sees are queued for the fleet (never waited for, see [`crate::fleet::Fleet::ensure_users`]).
    pub(super) fn change_session<R>(
        &mut self,
        f: impl FnOnce(&mut dyn Tx, jiff::Timestamp) -> Result<R>,
    ) -> Result<R> {
        self.change_in(Scope::Session, f)
    }

    /// Cuts the fleet's change log to `registry.keep_changes` (a bounded batch per pass).
    fn prune_changes(&mut self) {
        let (Some(fleet), Some(reg)) = (self.fleet.as_mut(), self.cfg.registry.as_ref()) else {
            return;
        };
        match fleet.prune(reg.keep_changes) {
            Ok(0) => {}
            Ok(n) => info!(pruned = n, "fleet change log pruned"),
            // The database down is told by the follower, once.
            Err(e) if self.fleet_up => warn!("pruning the fleet change log: {e:#}"),
            Err(_) => {}
        }
    }

    /// Applies the fleet's changes the replica has not seen, in order, each once.
    pub(super) fn follow(&mut self) {
        let r = self.catch_up();
        self.fleet_seen(&r);
        if let Err(e) = r {
            // Logged once per outage by fleet_seen; a local failure is always told.
            if self.fleet_up {
                error!("following the fleet registry: {e:#}");
            }
        }
    }

    fn catch_up(&mut self) -> Result<()> {
        self.catch_up_with(false)
    }

    /// As [`Daemon::catch_up`], opening a policy change: the fleet's write transaction
    /// begun, its lock held, and the log's first read in the same round trip.
    fn catch_up_locked(&mut self) -> Result<()> {
        self.catch_up_with(true)
    }

    fn catch_up_with(&mut self, mut begin: bool) -> Result<()> {
        loop {
            let mark = self.store.read()?.replica_mark()?;
            let Some(fleet) = self.fleet.as_mut() else {
                return Ok(());
            };
            let log = if std::mem::take(&mut begin) {
                fleet.begin_at(mark)?
            } else {
                fleet.log_after(mark)?
            };
            let changes = match log {
                crate::fleet::Log::Changes(c) => c,
                crate::fleet::Log::Gap(state) => {
                    warn!(mark, through = state.mark, "the fleet's change log was pruned past this replica's mark: reloading the fleet's policy whole");
                    self.change_local(|tx, _| crate::fleet::prune::reload(tx, &state))?;
                    self.dirty = true;
                    if let Some(fl) = &self.fleet {
                        // status and /metrics: the replica is at the reloaded mark.
                        fl.stats.applied(state.mark, false);
                    }
                    continue;
                }
            };
            if changes.is_empty() {
                return Ok(());
            }
            for c in &changes {
                self.apply_change(c)?;
            }
        }
    }

    fn apply_change(&mut self, c: &crate::fleet::Change) -> Result<()> {
        let applied = self
            .change_local(|tx, _| {
                if tx.replica_mark()? >= c.id {
                    return Ok(false);
                }
                crate::fleet::apply_rows(tx, &c.rows)?;
                tx.set_replica_mark(c.id)?;
                Ok(true)
            })
            .map_err(|e| e.context(format!("applying fleet change {} from {}", c.id, c.router)))?;
        if let (true, Some(fl)) = (applied, &self.fleet) {
            fl.stats.applied(c.id, true);
        }
        Ok(())
    }

    /// Queues the sessions a committed change wrote or deleted for the fleet's view (never
    /// waits for the database).
    fn publish_sessions(&mut self, ids: std::collections::BTreeSet<String>) {
        if ids.is_empty() || self.fleet.is_none() {
            return;
        }
        let now: Result<Vec<_>> = (|| {
            let tx = self.store.read()?;
            ids.into_iter()
                .map(|id| Ok((tx.session(&id)?, id)))
                .collect()
        })();
        match (now, &self.fleet) {
            (Ok(now), Some(fl)) => {
                for (s, id) in now {
                    fl.publish_sessions(crate::fleet::Publish::Session(id, s));
                }
            }
            // The published view lags until the next start; enforcement is not at stake.
            (Err(e), _) => error!("reading sessions to publish to the fleet: {e:#}"),
            _ => {}
        }
    }

    /// Logs the fleet registry going away and coming back, once each.
    fn fleet_seen<R>(&mut self, r: &Result<R>) {
        let Some(fleet) = &self.fleet else { return };
        // Only the database's own failures count (a refusal of the rules is no outage).
        let down = matches!(r, Err(e) if format!("{e:#}").contains(&fleet.name));
        if down && self.fleet_up {
            error!("the fleet registry is unreachable: enforcing from the local replica; policy changes fail until it answers");
        } else if r.is_ok() && !self.fleet_up {
            info!(registry = %fleet.name, "the fleet registry answers again");
        }
        self.fleet_up = !down;
    }

    /// Runs a registry change: rules and audit in one transaction, the resulting map state
    /// checked to fit, committed (durable), then applied to the maps. Only the users the
    /// transaction touched are recomputed; a change of runtime entries rebuilds everything.
    fn change_in<R>(
        &mut self,
        scope: Scope,
        f: impl FnOnce(&mut dyn Tx, jiff::Timestamp) -> Result<R>,
    ) -> Result<R> {
        let now = self.wall.now();
        let (wall, boot) = self.clock.at(now);
        let has_fleet = self.fleet.is_some();
        let local = self.store.begin()?;
        let inner: Box<dyn Tx + '_> = match self.fleet.as_mut() {
            Some(fl) if scope == Scope::Fleet => Box::new(crate::fleet::FleetTx::new(local, fl)),
            _ => local,
        };
        let mut rec = Recording::new(inner);
        // With PORT25_LOG=port25_ctl::control::server=debug: where a big change's time goes.
        let t = std::time::Instant::now();
        let phase = |what: &str| debug!(us = t.elapsed().as_micros() as u64, "change: {what}");
        let r = f(&mut rec, now)?;
        phase("rules");
        let created = match (has_fleet, scope) {
            (true, Scope::Session) => std::mem::take(&mut rec.created),
            _ => Default::default(),
        };
        let session_ids = match has_fleet {
            true => std::mem::take(&mut rec.session_ids),
            false => Default::default(),
        };
        // Only once committed here (both paths below commit before the maps).
        let publish = |d: &mut Self| {
            if let Some(fl) = &d.fleet {
                fl.ensure_users(created.into_values());
            }
            d.publish_sessions(session_ids);
        };
        if rec.entries {
            if let Some(r) = self.rebuild.as_mut() {
                r.spoil("runtime entries changed");
            }
            let (want, entries) = Desired::build_entries(&self.cfg, rec.map_rows()?, wall, boot)?;
            policy::check_fits(&self.live, &want)?;
            rec.commit()?;
            publish(self);
            failpoint_after_commit();
            match policy::apply_delta(&mut self.live, &self.applied, &want) {
                Ok(_) => {
                    self.applied = want;
                    self.index = Deferred::spawn(entries);
                }
                Err(e) => self.apply_failed(e),
            }
            return Ok(r);
        }
        let changed = changed_users(&rec, wall, boot)?;
        phase("users' entries");
        // For a reconcile's build running meanwhile: replayed onto it once it is done.
        let replay = self.rebuild.as_ref().map(|_| changed.clone());
        // Waits for the index of the last full build if it is still being made.
        let plan = self.index.get().plan(&self.applied, changed)?;
        policy::check_slots_fit(&self.live, &self.applied, &plan.slots)?;
        phase("planned");
        rec.commit()?;
        phase("committed");
        publish(self);
        failpoint_after_commit();
        let before: Vec<_> = plan
            .slots
            .iter()
            .map(|(s, _)| self.applied.slot(s))
            .collect();
        let settings_changed = self.index.get().apply(&mut self.applied, &plan);
        if let (Some(r), Some(users)) = (self.rebuild.as_mut(), replay) {
            r.changed(users, plan.slots.iter().map(|(s, _)| *s), settings_changed);
        }
        let settings = settings_changed.then_some(self.applied.settings);
        if let Err(e) = policy::write_slots(&mut self.live, &plan.slots, &before, settings) {
            self.apply_failed(e);
        }
        phase("maps written");
        Ok(r)
    }

    /// Committed, so acknowledged; the maps catch up on the next full reconcile.
    pub(super) fn apply_failed(&mut self, e: anyhow::Error) {
        error!("applying a committed change to the maps failed, reconciling: {e:#}");
        self.dirty = true;
        // What the maps hold is no longer known to the loop: a running build cannot be
        // brought up to date from it.
        if let Some(r) = self.rebuild.as_mut() {
            r.spoil("a change's map write failed");
        }
    }

    pub(super) fn execute(&mut self, req: Request, actor: &Actor) -> (Reply, bool) {
        let op_name = op_name(&req.op);
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

/// The op's variant name, for the log: the start of its Debug form, which is cut off
/// there (a `session sync` op holds 100,000 sessions; formatting them all took longer
/// than many a request).
fn op_name(op: &Op) -> String {
    struct Head(String);
    impl std::fmt::Write for Head {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            match s.find([' ', '{', '(']) {
                Some(i) => {
                    self.0.push_str(&s[..i]);
                    Err(std::fmt::Error)
                }
                None => {
                    self.0.push_str(s);
                    Ok(())
                }
            }
        }
    }
    let mut h = Head(String::new());
    let _ = std::fmt::write(&mut h, format_args!("{op:?}"));
    h.0
}

/// Which registry a change is made in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// The fleet's (with a fleet registry), else the local one.
    Fleet,
    /// This router's alone.
    Local,
    /// This router's alone, the users it creates registered fleet-wide afterwards.
    Session,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::proto;

    /// The log's op name is the variant's, with or without fields.
    #[test]
    fn op_names() {
        assert_eq!(op_name(&Op::Info), "Info");
        let sync = proto::SessionSync {
            sessions: vec![crate::registry::SyncSession {
                id: "a".into(),
                user: "b".into(),
                addrs: vec!["100.64.0.1/32".parse().unwrap()],
            }],
            taken_at: None,
        };
        assert_eq!(op_name(&Op::SessionSync(sync)), "SessionSync");
    }
}
