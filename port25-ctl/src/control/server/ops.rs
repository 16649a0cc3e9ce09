//! What each control-socket op does in the daemon.

use anyhow::{bail, Result};
use jiff::{SignedDuration, Timestamp};
use serde_json::{json, Value};

use super::Daemon;
use crate::{
    bpf::datapath,
    config::{check_storable, Config, Limits},
    control::proto::Op,
    net::Prefix,
    registry::store::{AuditQuery, AuditRecord, Tx, User},
    registry::{self, Actor},
};

/// Refuses allow-list prefixes wider than the `limits` floor unless forced; a forced one is
/// audited in the same transaction as the change it belongs to.
fn guard_wide(
    tx: &mut dyn Tx,
    actor: &Actor,
    limits: &Limits,
    what: &str,
    prefixes: &[Prefix],
    force: bool,
    now: Timestamp,
) -> Result<()> {
    for p in prefixes {
        limits
            .check_wide(what, p, force)
            .map_err(anyhow::Error::msg)?;
        if let Some(floor) = limits.too_wide(p) {
            tx.append_audit(&AuditRecord {
                id: 0,
                at: now,
                actor: actor.to_string(),
                action: "force_wide".into(),
                subject: p.to_string(),
                old: None,
                new: Some(format!("{what} {p}, wider than /{floor}, forced")),
                reason: None,
            })?;
        }
    }
    Ok(())
}

/// Refuses an expiry that the registry (i64 nanoseconds) cannot hold: it would wrap.
fn storable(until: Option<Timestamp>) -> Result<Option<Timestamp>> {
    if let Some(t) = until {
        check_storable(t).map_err(anyhow::Error::msg)?;
    }
    Ok(until)
}

/// `user show` / `user list` view of one user.
fn user_view(u: &User, now: Timestamp) -> Value {
    let unblocked = u.unblocked_at(now);
    let left = match (unblocked, u.until) {
        (true, Some(t)) => Some(t.duration_since(now).as_secs()),
        _ => None,
    };
    json!({
        "name": u.name,
        "policy": u.policy,
        "effective": if unblocked { "unblocked" } else { "blocked" },
        "until": u.until,
        "seconds_left": left,
        "reason": u.reason,
        "set_by": u.set_by,
        "set_at": u.set_at,
    })
}

fn until_from(
    for_secs: Option<u64>,
    until: Option<Timestamp>,
    now: Timestamp,
) -> Result<Option<Timestamp>> {
    match (for_secs, until) {
        (Some(_), Some(_)) => bail!("give --for or --until, not both"),
        (Some(0), None) => bail!("--for must be longer than zero"),
        (Some(s), None) => {
            let d = SignedDuration::from_secs(s.min(100 * 365 * 86400) as i64);
            Ok(Some(now.checked_add(d)?.round(jiff::Unit::Second)?))
        }
        (None, t) => storable(t.map(|t| t.round(jiff::Unit::Second)).transpose()?),
    }
}

pub(super) fn run(d: &mut Daemon, op: Op, actor: &Actor) -> Result<Value> {
    let limits = d.cfg.limits;
    Ok(match op {
        Op::Info => d.info(),
        Op::Reload => d.reload()?,
        Op::Detach => {
            // The marker first: a detach that a restart could undo is no detach.
            crate::bpf::detached::mark(&d.cfg.state_dir, &actor.to_string())?;
            let points = datapath::detach_all(&d.pins)?;
            tracing::info!(?points, "detached everything; exiting");
            json!({ "detached": points })
        }
        Op::Unblock {
            user,
            for_secs,
            until,
            reason,
            new,
        } => {
            let out = d.change(|tx, now| {
                let until = until_from(for_secs, until, now)?;
                registry::unblock(tx, actor, &user, until, reason, new, now)
            })?;
            json!({ "user": user_view(&out.user, d.wall.now()), "changed": out.changed, "note": out.note })
        }
        Op::Block { user, reason, new } => {
            let out = d.change(|tx, now| registry::block(tx, actor, &user, reason, new, now))?;
            json!({ "user": user_view(&out.user, d.wall.now()), "changed": out.changed, "note": out.note })
        }
        Op::UserAdd { user } => {
            let u = d.change(|tx, now| registry::user_add(tx, actor, &user, now))?;
            json!({ "user": user_view(&u, d.wall.now()) })
        }
        Op::UserRemove { user } => {
            let n = d.change(|tx, now| registry::user_remove(tx, actor, &user, now))?;
            json!({ "removed": user, "sessions_removed": n })
        }
        Op::UserBind {
            user,
            prefix,
            force_wide,
        } => {
            d.change(|tx, now| {
                guard_wide(tx, actor, &limits, "user bind", &[prefix], force_wide, now)?;
                registry::bind(tx, actor, &user, prefix, now)
            })?;
            json!({ "user": user, "bound": prefix })
        }
        Op::UserUnbind { user, prefix } => {
            d.change(|tx, now| registry::unbind(tx, actor, &user, prefix, now))?;
            json!({ "user": user, "unbound": prefix })
        }
        Op::SessionUp {
            user,
            addrs,
            id,
            source,
            force_wide,
        } => {
            let out = d.change(|tx, now| {
                guard_wide(tx, actor, &limits, "session up", &addrs, force_wide, now)?;
                registry::session_up(
                    tx,
                    actor,
                    &user,
                    id.as_deref(),
                    addrs,
                    source.as_deref().unwrap_or("cli"),
                    now,
                )
            })?;
            serde_json::to_value(out)?
        }
        Op::SessionDown { id, user, addr } => {
            let s = d.change(|tx, now| match (id, user, addr) {
                (Some(id), None, None) => registry::session_down_id(tx, actor, &id, now),
                (None, Some(user), Some(addr)) => {
                    registry::session_down_addr(tx, actor, &user, &addr, now)
                }
                _ => bail!("session down takes --id ID, or USER ADDR"),
            })?;
            json!({ "down": s })
        }
        Op::SessionSync { sessions, taken_at } => {
            let out = d.change(|tx, now| {
                // A sync has no force: a wide prefix in an access server's list is refused.
                for s in &sessions {
                    guard_wide(tx, actor, &limits, "session sync", &s.addrs, false, now)?;
                }
                registry::session_sync(tx, actor, sessions, taken_at, now)
            })?;
            serde_json::to_value(out)?
        }
        Op::EntryAdd {
            kind,
            prefix,
            until,
            note,
            force_wide,
        } => {
            let until = storable(until)?;
            let what = format!("{} add", kind.as_str());
            let e = d.change(|tx, now| {
                guard_wide(tx, actor, &limits, &what, &[prefix], force_wide, now)?;
                registry::entry_add(tx, actor, kind, prefix, until, note, now)
            })?;
            json!({ "added": e })
        }
        Op::EntryRemove { kind, prefix } => {
            d.change(|tx, now| registry::entry_remove(tx, actor, kind, prefix, now))?;
            json!({ "removed": prefix, "kind": kind })
        }
        op @ (Op::EntryList { .. }
        | Op::UserShow { .. }
        | Op::UserList { .. }
        | Op::Audit { .. }) => {
            // Served by the reader, off this loop; kept here so the writer can answer too.
            read(&*d.store.read()?, &d.cfg, op)?
        }
    })
}

/// The read verbs: a registry read transaction and the config, nothing of the writer's.
pub(super) fn read(tx: &dyn Tx, cfg: &Config, op: Op) -> Result<Value> {
    Ok(match op {
        Op::EntryList { kind } => {
            let now = Timestamp::now();
            let runtime: Vec<Value> = tx
                .entries()?
                .into_iter()
                .filter(|e| e.kind == kind)
                .map(|e| {
                    json!({ "prefix": e.prefix, "until": e.until, "note": e.note, "added_by": e.added_by,
                            "added_at": e.added_at, "source": "runtime",
                            "expired": e.until.is_some_and(|t| t <= now) })
                })
                .collect();
            let config: Vec<Value> = match kind {
                crate::registry::store::EntryKind::Server => cfg
                    .mail_servers
                    .iter()
                    .map(|m| json!({ "prefix": m.prefix, "source": "config", "force": m.force }))
                    .collect(),
                crate::registry::store::EntryKind::Exempt => cfg
                    .exempt
                    .iter()
                    .map(|e| json!({ "prefix": e.prefix, "until": e.until, "note": e.note, "source": "config",
                                     "expired": e.until.is_some_and(|t| t <= now) }))
                    .collect(),
            };
            json!({ "kind": kind, "entries": config.into_iter().chain(runtime).collect::<Vec<_>>() })
        }
        Op::UserShow { user } => {
            let now = Timestamp::now();
            registry::check_user_name(&user)?;
            let Some(u) = tx.user(&user)? else {
                return Err(registry::unknown_user(tx, &user));
            };
            let sessions = tx.sessions_of(&user)?;
            let bindings = tx.bindings_of(&user)?;
            let audit = tx.audit(&AuditQuery {
                subject: Some(user.clone()),
                since: None,
                limit: 10,
            })?;
            json!({ "user": user_view(&u, now), "sessions": sessions, "bindings": bindings, "audit": audit })
        }
        Op::UserList {
            unblocked,
            expiring,
        } => {
            let now = Timestamp::now();
            let mut per_user = std::collections::HashMap::<String, usize>::new();
            for s in tx.sessions()? {
                *per_user.entry(s.user).or_default() += 1;
            }
            let users: Vec<Value> = tx
                .users()?
                .into_iter()
                .filter(|u| !unblocked || u.unblocked_at(now))
                .filter(|u| !expiring || (u.unblocked_at(now) && u.until.is_some()))
                .map(|u| {
                    let n = per_user.get(&u.name).copied().unwrap_or(0);
                    let mut v = user_view(&u, now);
                    v["sessions"] = json!(n);
                    v
                })
                .collect();
            json!({ "users": users })
        }
        Op::Audit { user, since, limit } => {
            let records = tx.audit(&AuditQuery {
                subject: user,
                since,
                limit,
            })?;
            json!({ "records": records })
        }
        other => bail!("{other:?} is not a read verb"),
    })
}

#[cfg(test)]
#[path = "capture.rs"]
mod capture;
