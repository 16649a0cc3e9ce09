//! What each control-socket op does in the daemon.

use anyhow::{bail, Result};
use jiff::{SignedDuration, Timestamp};
use serde_json::Value;

use super::Daemon;
use crate::{
    bpf::datapath,
    config::{check_storable, Config, Limits},
    control::proto::{self, Op, ReplyOf},
    control::reply::{self, EntryDetail, EntryRow, EntrySource, HoldGap, UserRow, UserView},
    net::Prefix,
    registry::store::{AuditQuery, AuditRecord, EntryKind, Tx, User},
    registry::{self, refuse, Actor, Audited, Refused},
};

/// The answer of a change whose rule refused after recording (an audited refusal, a session
/// whose unblock was refused): the transaction has been committed, then the refusal is the
/// op's error, so it reads to the client as `refused` and exits non-zero.
fn audited<R>(r: Result<Audited<R>>) -> Result<R> {
    Ok(r??)
}

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
        limits.check_wide(what, p, force).map_err(Refused)?;
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
        check_storable(t).map_err(Refused)?;
    }
    Ok(until)
}

fn until_from(
    for_secs: Option<u64>,
    until: Option<Timestamp>,
    now: Timestamp,
) -> Result<Option<Timestamp>> {
    match (for_secs, until) {
        (Some(_), Some(_)) => refuse!("give --for or --until, not both"),
        (Some(0), None) => refuse!("--for must be longer than zero"),
        (Some(s), None) => {
            let d = SignedDuration::from_secs(s.min(100 * 365 * 86400) as i64);
            Ok(Some(now.checked_add(d)?.round(jiff::Unit::Second)?))
        }
        (None, t) => storable(t.map(|t| t.round(jiff::Unit::Second)).transpose()?),
    }
}

/// Runs a writer op; the typed reply becomes the answer's `data`.
pub(super) fn run(d: &mut Daemon, op: Op, actor: &Actor) -> Result<Value> {
    match op {
        Op::Info => data(Ok(d.info())),
        Op::Reload => data(d.reload()),
        Op::Detach => data(detach(d, actor)),
        Op::Unblock(r) => data(unblock(d, r, actor)),
        Op::Block(r) => data(block(d, r, actor)),
        Op::Unhold(r) => data(unhold(d, r, actor)),
        Op::UserAdd(r) => data(user_add(d, r, actor)),
        Op::UserRemove(r) => data(user_remove(d, r, actor)),
        Op::UserBind(r) => data(user_bind(d, r, actor)),
        Op::UserUnbind(r) => data(user_unbind(d, r, actor)),
        Op::SessionUp(r) => data(session_up(d, r, actor)),
        Op::SessionDown(r) => data(session_down(d, r, actor)),
        Op::SessionSync(r) => data(session_sync(d, r, actor)),
        Op::EntryAdd(r) => data(entry_add(d, r, actor)),
        Op::EntryRemove(r) => data(entry_remove(d, r, actor)),
        // Served by the reader, off this loop; kept here so the writer can answer too.
        op @ (Op::EntryList(_) | Op::UserShow(_) | Op::UserList(_) | Op::Audit(_) | Op::Top(_)) => {
            read(&*d.store.read()?, &d.cfg, op)
        }
    }
}

/// The read verbs: a registry read transaction and the config, nothing of the writer's.
pub(super) fn read(tx: &dyn Tx, cfg: &Config, op: Op) -> Result<Value> {
    let now = Timestamp::now();
    match op {
        Op::EntryList(r) => data(entry_list(tx, cfg, r, now)),
        Op::UserShow(r) => data(user_show(tx, cfg, r, now)),
        Op::UserList(r) => data(user_list(tx, r, now)),
        Op::Audit(r) => data(audit(tx, r)),
        Op::Top(r) => data(top(tx, cfg, r, now)),
        other => bail!("{other:?} is not a read verb"),
    }
}

/// A reply as the answer's `data`.
fn data<R: serde::Serialize>(r: Result<R>) -> Result<Value> {
    Ok(serde_json::to_value(r?)?)
}

fn detach(d: &mut Daemon, actor: &Actor) -> Result<ReplyOf<proto::Detach>> {
    // The marker first: a detach that a restart could undo is no detach.
    crate::bpf::detached::mark(&d.cfg.state_dir, &actor.to_string())?;
    let points = datapath::detach_all(&d.pins)?;
    tracing::info!(?points, "detached everything; exiting");
    Ok(reply::Detached { detached: points })
}

fn unblock(d: &mut Daemon, r: proto::Unblock, actor: &Actor) -> Result<ReplyOf<proto::Unblock>> {
    let proto::Unblock {
        user,
        for_secs,
        until,
        reason,
        new,
    } = r;
    let out = audited(d.change(|tx, now| {
        let until = until_from(for_secs, until, now)?;
        registry::unblock(tx, actor, &user, until, reason, new, now)
    }))?;
    Ok(policy_change(out, d.wall.now()))
}

fn block(d: &mut Daemon, r: proto::Block, actor: &Actor) -> Result<ReplyOf<proto::Block>> {
    let out =
        d.change(|tx, now| registry::block(tx, actor, &r.user, r.reason, r.new, r.hold, now))?;
    Ok(policy_change(out, d.wall.now()))
}

fn unhold(d: &mut Daemon, r: proto::Unhold, actor: &Actor) -> Result<ReplyOf<proto::Unhold>> {
    let out = d.change(|tx, now| registry::unhold(tx, actor, &r.user, r.reason, now))?;
    Ok(policy_change(out, d.wall.now()))
}

fn policy_change(out: registry::PolicyOutcome, now: Timestamp) -> reply::PolicyChange {
    reply::PolicyChange {
        user: UserView::new(&out.user, now),
        changed: out.changed,
        note: out.note,
    }
}

fn user_add(d: &mut Daemon, r: proto::UserAdd, actor: &Actor) -> Result<ReplyOf<proto::UserAdd>> {
    let u = d.change(|tx, now| registry::user_add(tx, actor, &r.user, now))?;
    Ok(reply::UserAdded {
        user: UserView::new(&u, d.wall.now()),
    })
}

fn user_remove(
    d: &mut Daemon,
    r: proto::UserRemove,
    actor: &Actor,
) -> Result<ReplyOf<proto::UserRemove>> {
    let n = d.change(|tx, now| registry::user_remove(tx, actor, &r.user, now))?;
    Ok(reply::UserRemoved {
        removed: r.user,
        sessions_removed: n,
    })
}

fn user_bind(
    d: &mut Daemon,
    r: proto::UserBind,
    actor: &Actor,
) -> Result<ReplyOf<proto::UserBind>> {
    let limits = d.cfg.limits;
    d.change(|tx, now| {
        guard_wide(
            tx,
            actor,
            &limits,
            "user bind",
            &[r.prefix],
            r.force_wide,
            now,
        )?;
        registry::bind(tx, actor, &r.user, r.prefix, now)
    })?;
    Ok(reply::Bound {
        user: r.user,
        bound: r.prefix,
    })
}

fn user_unbind(
    d: &mut Daemon,
    r: proto::UserUnbind,
    actor: &Actor,
) -> Result<ReplyOf<proto::UserUnbind>> {
    d.change(|tx, now| registry::unbind(tx, actor, &r.user, r.prefix, now))?;
    Ok(reply::Unbound {
        user: r.user,
        unbound: r.prefix,
    })
}

/// Session events are this router's own (a fleet registry never delays or loses them).
fn session_up(
    d: &mut Daemon,
    r: proto::SessionUp,
    actor: &Actor,
) -> Result<ReplyOf<proto::SessionUp>> {
    let limits = d.cfg.limits;
    let unblock = r.unblock || r.unblock_for_secs.is_some();
    // Before the answer, and before the exemption is written: the device a glob governs
    // enforces when the client hears back. A failure is told in the answer, and the
    // session recorded all the same: blocking is the default, only its exemption is at
    // stake, and the access server's view of the session must not be lost.
    let device = d.session_device(r.iface.as_deref(), &r.addrs);
    let (up, unblocked) = audited(d.change_session(|tx, now| {
        guard_wide(
            tx,
            actor,
            &limits,
            "session up",
            &r.addrs,
            r.force_wide,
            now,
        )?;
        let source = r.source.as_deref().unwrap_or("cli");
        if !unblock {
            let up =
                registry::session_up(tx, actor, &r.user, r.id.as_deref(), r.addrs, source, now)?;
            return Ok(Ok((up, None)));
        }
        let until = until_from(r.unblock_for_secs, None, now)?;
        Ok(registry::session_up_unblocking(
            tx,
            actor,
            &r.user,
            r.id.as_deref(),
            r.addrs,
            source,
            until,
            now,
        )?
        .map(|(up, p)| (up, Some(p))))
    }))?;
    let now = d.wall.now();
    let mut out = reply::SessionUp::from(up);
    out.unblock = unblocked.map(|p| policy_change(p, now));
    out.device = device;
    Ok(out)
}

fn session_down(
    d: &mut Daemon,
    r: proto::SessionDown,
    actor: &Actor,
) -> Result<ReplyOf<proto::SessionDown>> {
    let down = d.change_session(|tx, now| match (r.id, r.user, r.addr) {
        (Some(id), None, None) => registry::session_down_id(tx, actor, &id, now),
        (None, Some(user), Some(addr)) => registry::session_down_addr(tx, actor, &user, &addr, now),
        _ => refuse!("session down takes --id ID, or USER ADDR"),
    })?;
    Ok(reply::SessionDown { down })
}

fn session_sync(
    d: &mut Daemon,
    r: proto::SessionSync,
    actor: &Actor,
) -> Result<ReplyOf<proto::SessionSync>> {
    let limits = d.cfg.limits;
    d.change_session(|tx, now| {
        // A sync has no force: a wide prefix in an access server's list is refused.
        for s in &r.sessions {
            guard_wide(tx, actor, &limits, "session sync", &s.addrs, false, now)?;
        }
        registry::session_sync(tx, actor, r.sessions, r.taken_at, now)
    })
}

fn entry_add(
    d: &mut Daemon,
    r: proto::EntryAdd,
    actor: &Actor,
) -> Result<ReplyOf<proto::EntryAdd>> {
    let limits = d.cfg.limits;
    let until = storable(r.until)?;
    let what = format!("{} add", r.kind.as_str());
    let added = d.change(|tx, now| {
        guard_wide(tx, actor, &limits, &what, &[r.prefix], r.force_wide, now)?;
        registry::entry_add(tx, actor, r.kind, r.prefix, until, r.note, now)
    })?;
    Ok(reply::EntryAdded { added })
}

fn entry_remove(
    d: &mut Daemon,
    r: proto::EntryRemove,
    actor: &Actor,
) -> Result<ReplyOf<proto::EntryRemove>> {
    d.change(|tx, now| registry::entry_remove(tx, actor, r.kind, r.prefix, now))?;
    Ok(reply::EntryRemoved {
        removed: r.prefix,
        kind: r.kind,
    })
}

fn entry_list(
    tx: &dyn Tx,
    cfg: &Config,
    r: proto::EntryList,
    now: Timestamp,
) -> Result<ReplyOf<proto::EntryList>> {
    let expired = |until: Option<Timestamp>| until.is_some_and(|t| t <= now);
    let config: Vec<EntryRow> = match r.kind {
        EntryKind::Server => cfg
            .mail_servers
            .iter()
            .map(|m| EntryRow {
                prefix: m.prefix,
                source: EntrySource::Config,
                detail: EntryDetail::ConfigServer { force: m.force },
            })
            .collect(),
        EntryKind::Exempt => cfg
            .exempt
            .iter()
            .map(|e| EntryRow {
                prefix: e.prefix,
                source: EntrySource::Config,
                detail: EntryDetail::ConfigExempt {
                    until: e.until,
                    note: e.note.clone(),
                    expired: expired(e.until),
                },
            })
            .collect(),
    };
    let runtime = tx
        .entries()?
        .into_iter()
        .filter(|e| e.kind == r.kind)
        .map(|e| EntryRow {
            prefix: e.prefix,
            source: EntrySource::Runtime,
            detail: EntryDetail::Runtime {
                expired: expired(e.until),
                until: e.until,
                note: e.note,
                added_by: e.added_by,
                added_at: e.added_at,
            },
        });
    Ok(reply::EntryList {
        kind: r.kind,
        entries: config.into_iter().chain(runtime).collect(),
    })
}

fn user_show(
    tx: &dyn Tx,
    cfg: &Config,
    r: proto::UserShow,
    now: Timestamp,
) -> Result<ReplyOf<proto::UserShow>> {
    registry::check_user_name(&r.user)?;
    let Some(u) = tx.user(&r.user)? else {
        return Err(registry::unknown_user(tx, &r.user));
    };
    let sessions = tx.sessions_of(&r.user)?;
    let bindings = tx.bindings_of(&r.user)?;
    let hold_not_effective = if u.hold.is_some() {
        let addrs: Vec<Prefix> = sessions
            .iter()
            .flat_map(|s| s.addrs.iter().copied())
            .collect();
        HoldGap::find(tx, cfg, &addrs, &bindings, now)?
    } else {
        vec![]
    };
    Ok(reply::UserDetail {
        user: UserView::new(&u, now),
        sessions,
        bindings,
        audit: tx.audit(&AuditQuery {
            subject: Some(r.user.clone()),
            since: None,
            limit: 10,
        })?,
        hold_not_effective,
        fleet: None,
    })
}

fn user_list(tx: &dyn Tx, r: proto::UserList, now: Timestamp) -> Result<ReplyOf<proto::UserList>> {
    let wanted = |u: &User| {
        (!r.unblocked || u.unblocked_at(now))
            && (!r.expiring || (u.unblocked_at(now) && u.until.is_some()))
            && (!r.held || u.hold.is_some())
    };
    if let Some(limit) = r.limit {
        // Page by page in name order until `limit` match: each listed user's sessions by
        // the index, never the whole registry.
        let mut users = Vec::new();
        let mut after: Option<String> = None;
        while users.len() < limit {
            let page = tx.users_after(after.as_deref(), 1000)?;
            let Some(last) = page.last() else { break };
            after = Some(last.name.clone());
            for u in page
                .into_iter()
                .filter(|u| wanted(u))
                .take(limit - users.len())
            {
                users.push(UserRow {
                    sessions: tx.sessions_of(&u.name)?.len(),
                    user: UserView::new(&u, now),
                });
            }
        }
        return Ok(reply::UserList { users });
    }
    let mut per_user = std::collections::HashMap::<String, usize>::new();
    for s in tx.sessions()? {
        *per_user.entry(s.user).or_default() += 1;
    }
    let users = tx
        .users()?
        .into_iter()
        .filter(|u| wanted(u))
        .map(|u| UserRow {
            sessions: per_user.get(&u.name).copied().unwrap_or(0),
            user: UserView::new(&u, now),
        })
        .collect();
    Ok(reply::UserList { users })
}

fn audit(tx: &dyn Tx, r: proto::Audit) -> Result<ReplyOf<proto::Audit>> {
    let records = tx.audit(&AuditQuery {
        subject: r.user,
        since: r.since,
        limit: r.limit,
    })?;
    Ok(reply::AuditLog { records })
}

#[cfg(test)]
mod tests;

/// The tracked sources from the pinned map, with who holds each address.
fn top(tx: &dyn Tx, cfg: &Config, r: proto::Top, now: Timestamp) -> Result<ReplyOf<proto::Top>> {
    use crate::bpf::{livemaps::boot_ns, offenders, pins::Pins};
    let a = &cfg.abuse;
    let window_ns = a.flag_window.as_nanos() as u64;
    let entries = offenders::read_pinned(&Pins::new(&cfg.pin_dir))?;
    let tracking = a.track_sources > 0 && entries.is_some();
    let entries = entries.unwrap_or_default();
    let tracked = entries.len();
    let boot = boot_ns();
    let since_ns = r
        .since_secs
        .map(|s| s.saturating_mul(1_000_000_000))
        .unwrap_or(window_ns);
    let wall = |ns: u64| {
        let ago = boot.saturating_sub(ns).min(i64::MAX as u64) as i64;
        now.checked_sub(SignedDuration::from_nanos(ago))
            .unwrap_or(now)
    };
    let mut rows: Vec<reply::Offender> = entries
        .iter()
        .filter(|(_, o)| boot.saturating_sub(o.last_ns) <= since_ns)
        .map(|(k, o)| {
            let (attempts, destinations, saturated) = offenders::figures(o, boot, window_ns);
            let dst = match offenders::addr_of(k, &o.last_dst) {
                std::net::IpAddr::V6(d) => format!("[{d}]:{}", o.last_dport),
                d => format!("{d}:{}", o.last_dport),
            };
            reply::Offender {
                src: offenders::source(k),
                user: None,
                held_by: None,
                hold: false,
                attempts,
                destinations,
                destinations_saturated: saturated,
                segments: o.segments,
                first_seen: wall(o.first_ns),
                last_seen: wall(o.last_ns),
                last_destination: dst,
                reason: port25_common::Reason::from_u32_or_block(o.last_reason as u32)
                    .name()
                    .to_string(),
                interface: offenders::ifname(o.ifindex),
                likely_infected: a.flagged(attempts, destinations),
            }
        })
        .collect();
    rows.sort_by(|x, y| {
        (y.likely_infected, y.destinations, y.attempts, y.last_seen).cmp(&(
            x.likely_infected,
            x.destinations,
            x.attempts,
            x.last_seen,
        ))
    });
    if r.limit > 0 {
        rows.truncate(r.limit);
    }
    // Only the rows shown are looked up: each is one indexed query per prefix length.
    for row in &mut rows {
        if let Some((user, how)) = registry::holder_of(tx, row.src)? {
            row.hold = tx.user(&user)?.is_some_and(|u| u.hold.is_some());
            row.user = Some(user);
            row.held_by = Some(how);
        }
    }
    Ok(reply::Top {
        tracking,
        flag: reply::FlagRule {
            destinations: a.flag_destinations,
            attempts: a.flag_attempts,
            window_secs: a.flag_window.as_secs(),
        },
        tracked,
        sources: rows,
    })
}
