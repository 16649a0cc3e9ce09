//! The subscriber rules, run inside one registry transaction: who may hold an address, what
//! a timed unblock may change, what gets audited. Every function refuses bad input before
//! its first write, and every write it makes is audited in the same transaction.

pub mod store;

use std::collections::{BTreeSet, HashMap, HashSet};

use anyhow::Result;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::{
    net::Prefix,
    registry::store::{AuditRecord, Binding, Entry, EntryKind, Hold, Policy, Session, Tx, User},
};

/// A rule's answer when it refused after recording something that must stay: the audit row
/// of a refusal (a held user's unblock), or a session whose unblock was refused. The caller
/// commits the transaction, then fails with the [`Refused`].
pub type Audited<T> = std::result::Result<T, Refused>;

/// A caller's mistake that a rule refuses: a name that is not one, an address another user
/// holds, a time not in the future... Asking again unchanged fails again, so the daemon
/// answers it as `refused`; any other error out of a rule is the store's failure under it.
/// The ops' own argument checks and config validation on reload are refusals of this kind
/// too.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// `bail!` for refusals: returns a [`Refused`] with the formatted message.
macro_rules! refuse {
    ($($arg:tt)*) => {
        return Err($crate::registry::Refused(format!($($arg)*)).into())
    };
}
pub(crate) use refuse;

/// Who asked: the peer's uid as the kernel reported it, its name, and who it says it acts
/// for (`SUDO_USER`, a helpdesk tool's operator), recorded but not trusted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Actor {
    pub uid: u32,
    pub name: String,
    pub on_behalf_of: Option<String>,
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (uid {})", self.name, self.uid)?;
        if let Some(o) = &self.on_behalf_of {
            write!(f, " for {o}")?;
        }
        Ok(())
    }
}

/// Usernames as RADIUS and PPP carry them: `alice`, `alice@realm`, `0123456789`.
///
/// A name reaches port25 through shell hooks, `accel-cmd` tables and sync lists, where
/// whitespace, control characters or a leading `-`/`#` would turn part of it into an option,
/// an address or a comment; and a bidi or zero-width character shows a helpdesk another
/// name than the one stored. All of them are refused wherever a name enters (CLI, socket,
/// sync), so a name is always one plain word.
pub fn check_user_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 253 {
        refuse!("a user name must be 1 to 253 bytes");
    }
    if let Some(c) = name.chars().find(|c| hidden_char(*c)) {
        refuse!(
            "`{}` is not a valid user name: it holds {} (U+{:04X}); no spaces, control, bidi or zero-width characters",
            name.escape_debug(),
            if c.is_control() {
                "a control character"
            } else if c.is_whitespace() {
                "a space"
            } else {
                "an invisible character"
            },
            c as u32
        );
    }
    if name.starts_with('-') || name.starts_with('#') {
        refuse!(
            "`{}` is not a valid user name: it must not start with `-` or `#`",
            name.escape_debug()
        );
    }
    Ok(())
}

/// Whitespace, control (Cc), format (Cf: bidi controls, zero-width characters, the BOM)
/// and other characters that render as nothing.
fn hidden_char(c: char) -> bool {
    c.is_whitespace()
        || c.is_control()
        || matches!(c as u32,
            0x00AD | 0x034F | 0x061C | 0x115F | 0x1160 | 0x17B4 | 0x17B5 | 0x180B..=0x180F
            | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x206F | 0x3164 | 0xFE00..=0xFE0F
            | 0xFEFF | 0xFFA0 | 0xFFF0..=0xFFFB | 0x1BCA0..=0x1BCA3 | 0x1D173..=0x1D17A
            | 0xE0000..=0xE0FFF)
}

fn check_text(what: &str, s: &Option<String>) -> Result<()> {
    if let Some(s) = s {
        if s.len() > 1024 || s.chars().any(|c| c.is_control() && c != '\t') {
            refuse!("{what} must be at most 1024 characters, without control characters");
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)] // one audit record: every field is its own column
fn audit(
    tx: &mut dyn Tx,
    actor: &Actor,
    now: Timestamp,
    action: &str,
    subject: &str,
    old: Option<String>,
    new: Option<String>,
    reason: Option<String>,
) -> Result<()> {
    let mut r = audit_record(actor, now, action, subject, old, new);
    r.reason = reason;
    tx.append_audit(&r)
}

/// An audit row not yet stored (its id comes from the store), without a reason.
fn audit_record(
    actor: &Actor,
    now: Timestamp,
    action: &str,
    subject: &str,
    old: Option<String>,
    new: Option<String>,
) -> AuditRecord {
    AuditRecord {
        id: 0,
        at: now,
        actor: actor.to_string(),
        action: action.into(),
        subject: subject.into(),
        old,
        new,
        reason: None,
    }
}

fn describe(u: &User, now: Timestamp) -> String {
    if u.hold.is_some() {
        return "blocked, on hold".into();
    }
    match (u.policy, u.until) {
        (Policy::Blocked, _) => "blocked".into(),
        (Policy::Unblocked, None) => "unblocked".into(),
        (Policy::Unblocked, Some(t)) if t <= now => format!("blocked (unblock ended {t})"),
        (Policy::Unblocked, Some(t)) => format!("unblocked until {t}"),
    }
}

/// A user the registry does not know. Raised on the single writer, so it carries no
/// suggestions (finding close names reads every user): the daemon adds them off the writer
/// with [`suggest`].
#[derive(Debug, thiserror::Error)]
#[error("unknown user `{name}` (`--new` registers a new user)")]
pub struct UnknownUser {
    pub name: String,
}

pub fn unknown_user(_tx: &dyn Tx, name: &str) -> anyhow::Error {
    UnknownUser { name: name.into() }.into()
}

/// The known names closest to `name`, best first (at most three).
pub fn suggest(tx: &dyn Tx, name: &str) -> Vec<String> {
    let mut close: Vec<(f64, String)> = tx
        .users()
        .unwrap_or_default()
        .into_iter()
        .map(|u| (strsim::jaro_winkler(name, &u.name), u.name))
        .filter(|(s, _)| *s > 0.8)
        .collect();
    close.sort_by(|a, b| b.0.total_cmp(&a.0));
    close.into_iter().take(3).map(|(_, n)| n).collect()
}

/// An error message with the suggestions for an unknown user spliced in.
pub fn with_suggestions(msg: &str, name: &str, close: &[String]) -> String {
    if close.is_empty() {
        return msg.to_string();
    }
    let head = format!("unknown user `{name}`");
    msg.replacen(
        &head,
        &format!("{head}; did you mean {}?", close.join(", ")),
        1,
    )
}

fn get_user(tx: &dyn Tx, name: &str) -> Result<User> {
    check_user_name(name)?;
    tx.user(name)?.ok_or_else(|| unknown_user(tx, name))
}

fn new_user(name: &str, actor: &Actor, now: Timestamp) -> User {
    User {
        name: name.into(),
        policy: Policy::Blocked,
        until: None,
        reason: None,
        set_by: actor.to_string(),
        set_at: now,
        hold: None,
    }
}

/// The refusal of `what` (an unblock, however it came) for a held user, audited as
/// `<what>.refused` in the caller's transaction, which the caller commits.
fn refuse_held(
    tx: &mut dyn Tx,
    actor: &Actor,
    user: &User,
    hold: &Hold,
    what: &str,
    reason: Option<String>,
    now: Timestamp,
) -> Result<Refused> {
    audit(
        tx,
        actor,
        now,
        &format!("{what}.refused"),
        &user.name,
        Some(format!("on hold ({hold})")),
        None,
        reason,
    )?;
    Ok(Refused(format!(
        "{what} refused: `{}` is on an abuse hold ({hold}); port 25 stays closed until \
         `port25-ctl unhold {} --reason R` lifts it",
        user.name, user.name
    )))
}

/// The user, or with `create` a new (blocked, not yet stored) one: (user, created).
fn user_or_new(
    tx: &dyn Tx,
    actor: &Actor,
    name: &str,
    create: bool,
    now: Timestamp,
) -> Result<(User, bool)> {
    check_user_name(name)?;
    match tx.user(name)? {
        Some(u) => Ok((u, false)),
        None if create => Ok((new_user(name, actor, now), true)),
        None => Err(unknown_user(tx, name)),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyOutcome {
    pub user: User,
    pub changed: bool,
    pub note: String,
}

/// `unblock USER [--for|--until] [--reason]`. A timed unblock never shortens a longer one.
/// A held user's unblock is refused and the refusal audited (hence [`Audited`]): hooks,
/// RADIUS and POP logins all come through here.
pub fn unblock(
    tx: &mut dyn Tx,
    actor: &Actor,
    name: &str,
    until: Option<Timestamp>,
    reason: Option<String>,
    create: bool,
    now: Timestamp,
) -> Result<Audited<PolicyOutcome>> {
    check_text("a reason", &reason)?;
    if let Some(t) = until {
        if t <= now {
            refuse!("the unblock would end at {t}, which is not in the future");
        }
    }
    let (old, created) = user_or_new(tx, actor, name, create, now)?;
    if let Some(hold) = &old.hold {
        return Ok(Err(refuse_held(
            tx, actor, &old, hold, "unblock", reason, now,
        )?));
    }
    let keeps = old.unblocked_at(now)
        && match (old.until, until) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(have), Some(want)) => have >= want,
        };
    let (user, changed, note) = if keeps {
        let note = format!(
            "kept: {} already lasts at least as long (use `block` first to shorten)",
            describe(&old, now)
        );
        (old.clone(), false, note)
    } else {
        let u = User {
            policy: Policy::Unblocked,
            until,
            reason: reason.clone(),
            set_by: actor.to_string(),
            set_at: now,
            ..old.clone()
        };
        let note = describe(&u, now);
        (u, true, note)
    };
    if changed || created {
        tx.put_user(&user)?;
    }
    let old_desc = (!created).then(|| describe(&old, now));
    audit(
        tx,
        actor,
        now,
        "unblock",
        name,
        old_desc,
        Some(describe(&user, now)),
        reason,
    )?;
    Ok(Ok(PolicyOutcome {
        user,
        changed,
        note,
    }))
}

/// `block USER [--hold]`: revokes at once, timed or not, live sessions included. With
/// `hold` (a reason required) the user is also put on an abuse hold; a block without it
/// keeps a hold already set (only `unhold` lifts one).
pub fn block(
    tx: &mut dyn Tx,
    actor: &Actor,
    name: &str,
    reason: Option<String>,
    create: bool,
    hold: bool,
    now: Timestamp,
) -> Result<PolicyOutcome> {
    check_text("a reason", &reason)?;
    let hold_reason = match (&reason, hold) {
        (None, true) => {
            refuse!("`block --hold` needs --reason (a ticket, what the abuse desk saw)")
        }
        (Some(r), true) if r.trim().is_empty() => {
            refuse!("`block --hold` needs a non-empty --reason")
        }
        (r, true) => r.clone(),
        (_, false) => None,
    };
    let (old, created) = user_or_new(tx, actor, name, create, now)?;
    let (new_hold, note) = match (&old.hold, hold_reason) {
        (Some(h), Some(_)) => (Some(h.clone()), format!("blocked; already on hold ({h})")),
        (None, Some(r)) => {
            let h = Hold {
                reason: r,
                by: actor.to_string(),
                at: now,
            };
            let note = format!("blocked and on hold ({h})");
            (Some(h), note)
        }
        (Some(h), None) => (Some(h.clone()), format!("blocked; still on hold ({h})")),
        (None, None) => (None, "blocked".into()),
    };
    let newly_held = new_hold.is_some() && old.hold.is_none();
    let user = User {
        policy: Policy::Blocked,
        until: None,
        reason: reason.clone(),
        set_by: actor.to_string(),
        set_at: now,
        hold: new_hold,
        ..old.clone()
    };
    let changed = old.unblocked_at(now) || created || newly_held;
    tx.put_user(&user)?;
    let old_desc = (!created).then(|| describe(&old, now));
    audit(
        tx,
        actor,
        now,
        if newly_held { "hold" } else { "block" },
        name,
        old_desc,
        Some(describe(&user, now)),
        reason,
    )?;
    Ok(PolicyOutcome {
        note,
        user,
        changed,
    })
}

/// `unhold USER --reason R`: lifts an abuse hold. The user stays blocked: an unblock is a
/// separate, later decision.
pub fn unhold(
    tx: &mut dyn Tx,
    actor: &Actor,
    name: &str,
    reason: Option<String>,
    now: Timestamp,
) -> Result<PolicyOutcome> {
    check_text("a reason", &reason)?;
    if reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
        refuse!("`unhold` needs --reason (why the hold is lifted: the machine was cleaned...)");
    }
    let old = get_user(tx, name)?;
    let Some(h) = &old.hold else {
        refuse!("`{name}` is not on hold: nothing to lift");
    };
    let user = User {
        hold: None,
        ..old.clone()
    };
    tx.put_user(&user)?;
    audit(
        tx,
        actor,
        now,
        "unhold",
        name,
        Some(describe(&old, now)),
        Some(describe(&user, now)),
        reason,
    )?;
    Ok(PolicyOutcome {
        note: format!("hold lifted (it was {h}); still blocked: `unblock` reopens port 25"),
        user,
        changed: true,
    })
}

pub fn user_add(tx: &mut dyn Tx, actor: &Actor, name: &str, now: Timestamp) -> Result<User> {
    check_user_name(name)?;
    if tx.user(name)?.is_some() {
        refuse!("user `{name}` already exists");
    }
    let u = new_user(name, actor, now);
    tx.put_user(&u)?;
    audit(
        tx,
        actor,
        now,
        "user.add",
        name,
        None,
        Some("blocked".into()),
        None,
    )?;
    Ok(u)
}

/// Removes a user with their live sessions and bindings.
/// A held user is not removed: registering the name again would lose the hold.
pub fn user_remove(tx: &mut dyn Tx, actor: &Actor, name: &str, now: Timestamp) -> Result<usize> {
    let old = get_user(tx, name)?;
    if let Some(h) = &old.hold {
        refuse!(
            "`{name}` is on an abuse hold ({h}): not removed (a new registration would lose the \
             hold); `unhold` first"
        );
    }
    let sessions = tx.sessions_of(name)?;
    for s in &sessions {
        tx.delete_session(&s.id)?;
        tx.put_event(&s.id, now)?;
    }
    tx.delete_user(name)?;
    audit(
        tx,
        actor,
        now,
        "user.remove",
        name,
        Some(format!(
            "{}; {} live session(s)",
            describe(&old, now),
            sessions.len()
        )),
        None,
        None,
    )?;
    Ok(sessions.len())
}

fn fmt_addrs(a: &[Prefix]) -> String {
    a.iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionUpOutcome {
    pub session: Session,
    pub user_created: bool,
    /// Addresses taken from other sessions (reused dynamic addresses): (session id, user, prefix).
    pub taken_over: Vec<(String, String, Prefix)>,
}

fn check_session(id: &str, addrs: &[Prefix]) -> Result<()> {
    if id.is_empty() || id.len() > 128 || id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        refuse!("a session id must be 1 to 128 characters without spaces");
    }
    if addrs.is_empty() {
        refuse!("a session needs at least one address or prefix");
    }
    let mut seen = BTreeSet::new();
    for p in addrs {
        if !seen.insert(*p) {
            refuse!("{p} is listed twice");
        }
        if p.addr.is_ipv4() && p.len < MAX_SESSION_PREFIX4 {
            refuse!(
                "{p}: an IPv4 session prefix may be at most /{MAX_SESSION_PREFIX4} ({} addresses): each address is a map entry of its own",
                1u32 << (32 - MAX_SESSION_PREFIX4)
            );
        }
    }
    Ok(())
}

/// The widest IPv4 session prefix (a routed Framed-Route): written address by address.
pub const MAX_SESSION_PREFIX4: u8 = 22;

/// `session up USER ADDR... [--id ID]`. A user not seen before is registered, blocked. An
/// address held by another session is a reused dynamic address: it leaves that session (a
/// late down event for it then finds nothing to remove), so no address has two owners.
pub fn session_up(
    tx: &mut dyn Tx,
    actor: &Actor,
    user: &str,
    id: Option<&str>,
    addrs: Vec<Prefix>,
    source: &str,
    now: Timestamp,
) -> Result<SessionUpOutcome> {
    session_up_at(tx, actor, user, id, addrs, source, now, now)
}

/// `session up ... --unblock`: a session with its access server's unblock attribute (a
/// RADIUS `Port25-Unblock`) in one transaction. The session is a fact and is recorded
/// whatever the user's policy; for a held user only the unblock is refused (audited), and
/// the refusal says the session was recorded.
#[allow(clippy::too_many_arguments)]
pub fn session_up_unblocking(
    tx: &mut dyn Tx,
    actor: &Actor,
    user: &str,
    id: Option<&str>,
    addrs: Vec<Prefix>,
    source: &str,
    until: Option<Timestamp>,
    now: Timestamp,
) -> Result<Audited<(SessionUpOutcome, PolicyOutcome)>> {
    let up = session_up(tx, actor, user, id, addrs, source, now)?;
    let why = Some(format!("session {} ({source})", up.session.id));
    match unblock(tx, actor, user, until, why, true, now)? {
        Ok(p) => Ok(Ok((up, p))),
        Err(Refused(m)) => Ok(Err(Refused(format!(
            "session `{}` of {user} recorded ({}); its {m}",
            up.session.id,
            fmt_addrs(&up.session.addrs)
        )))),
    }
}

/// As [`session_up`], for an event that happened at `event` (a sync's snapshot time).
#[allow(clippy::too_many_arguments)]
fn session_up_at(
    tx: &mut dyn Tx,
    actor: &Actor,
    user: &str,
    id: Option<&str>,
    addrs: Vec<Prefix>,
    source: &str,
    now: Timestamp,
    event: Timestamp,
) -> Result<SessionUpOutcome> {
    check_user_name(user)?;
    let id = match id {
        Some(id) => id.to_string(),
        None => format!(
            "{user}@{}",
            addrs.first().map(|p| p.to_string()).unwrap_or_default()
        ),
    };
    check_session(&id, &addrs)?;
    if let Some(old) = tx.session(&id)? {
        refuse!(
            "duplicate session id `{id}`: it is already up for {} ({}); send `session down --id {id}` first",
            old.user,
            fmt_addrs(&old.addrs)
        );
    }
    let user_created = tx.user(user)?.is_none();
    if user_created {
        let u = new_user(user, actor, now);
        tx.put_user(&u)?;
        audit(
            tx,
            actor,
            now,
            "user.add",
            user,
            None,
            Some("blocked (first session)".into()),
            None,
        )?;
    }
    let mut taken_over = Vec::new();
    for p in &addrs {
        if let Some(mut other) = tx.session_holding(p)? {
            other.addrs.retain(|a| a != p);
            taken_over.push((other.id.clone(), other.user.clone(), *p));
            if other.addrs.is_empty() {
                tx.delete_session(&other.id)?;
            } else {
                tx.put_session(&other)?;
            }
            tx.put_event(&other.id, event)?;
            audit(
                tx,
                actor,
                now,
                "session.takeover",
                &other.user,
                Some(format!("session {} held {p}", other.id)),
                Some(format!("session {id} of {user}")),
                None,
            )?;
        }
    }
    let s = Session {
        id: id.clone(),
        user: user.into(),
        addrs,
        since: now,
        source: source.into(),
    };
    tx.put_session(&s)?;
    tx.put_event(&id, event)?;
    audit(
        tx,
        actor,
        now,
        "session.up",
        user,
        None,
        Some(format!("{id}: {}", fmt_addrs(&s.addrs))),
        None,
    )?;
    Ok(SessionUpOutcome {
        session: s,
        user_created,
        taken_over,
    })
}

/// `session down --id ID`.
pub fn session_down_id(
    tx: &mut dyn Tx,
    actor: &Actor,
    id: &str,
    now: Timestamp,
) -> Result<Session> {
    let Some(s) = tx.session(id)? else {
        refuse!("no live session with id `{id}` (already down, or its addresses were taken over)");
    };
    tx.delete_session(id)?;
    tx.put_event(id, now)?;
    audit(
        tx,
        actor,
        now,
        "session.down",
        &s.user,
        Some(format!("{id}: {}", fmt_addrs(&s.addrs))),
        None,
        None,
    )?;
    Ok(s)
}

/// `session down USER ADDR`: only a session of that user holding that address.
pub fn session_down_addr(
    tx: &mut dyn Tx,
    actor: &Actor,
    user: &str,
    addr: &Prefix,
    now: Timestamp,
) -> Result<Session> {
    check_user_name(user)?;
    match tx.session_holding(addr)? {
        Some(s) if s.user == user => session_down_id(tx, actor, &s.id, now),
        Some(s) => refuse!(
            "{addr} is held by session {} of {}, not by {user}: nothing removed (a late down event?)",
            s.id,
            s.user
        ),
        None => refuse!("no live session of {user} holds {addr}"),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SyncSession {
    pub id: String,
    pub user: String,
    pub addrs: Vec<Prefix>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncOutcome {
    pub added: usize,
    pub changed: usize,
    pub removed: usize,
    pub unchanged: usize,
    /// Sessions and addresses left alone because an event newer than the snapshot touched
    /// them (the list could not know of it).
    #[serde(default)]
    pub newer: usize,
}

/// How old a `session sync` snapshot may be: session event times are kept this long, so a
/// younger snapshot is always compared with every event that happened after it.
pub const SYNC_HORIZON: jiff::SignedDuration = jiff::SignedDuration::from_hours(1);

/// `session sync`: the full list of live sessions as the access server saw it at
/// `taken_at` (default `now`); the registry is made equal to it, except where an event newer
/// than the snapshot touched a session (its id) or took an address: those stay as the event
/// left them, so an older list never restores a moved address's old owner or deletes its
/// new one.
pub fn session_sync(
    tx: &mut dyn Tx,
    actor: &Actor,
    list: Vec<SyncSession>,
    taken_at: Option<Timestamp>,
    now: Timestamp,
) -> Result<SyncOutcome> {
    let taken = taken_at.unwrap_or(now);
    if taken > now {
        refuse!("the snapshot's time {taken} is in the future (now {now}); nothing was changed");
    }
    if taken < now - SYNC_HORIZON {
        refuse!(
            "the snapshot was taken at {taken}, more than an hour ago: take a new one (nothing was changed)"
        );
    }
    let mut ids = HashSet::with_capacity(list.len());
    let mut addrs = HashSet::with_capacity(list.len());
    for s in &list {
        check_user_name(&s.user)?;
        check_session(&s.id, &s.addrs)?;
        if !ids.insert(s.id.as_str()) {
            refuse!("session id `{}` appears twice in the list", s.id);
        }
        for p in &s.addrs {
            if !addrs.insert(*p) {
                refuse!("{p} appears in two sessions of the list");
            }
        }
    }
    tx.prune_events(now - SYNC_HORIZON)?;
    // The whole comparison is made in memory against one read of the stored sessions and
    // of the recent events, and written in bulk: a BRAS lists 100,000 sessions a minute.
    let newer = tx.events_after(taken)?;
    let mut out = SyncOutcome::default();
    let by_id: HashMap<&str, &SyncSession> = list.iter().map(|s| (s.id.as_str(), s)).collect();
    // Sized for the common case (every session new: a user and a session row each).
    let mut audits = Vec::with_capacity(2 * list.len());
    let mut events = Vec::with_capacity(list.len());
    let record =
        |action: &str, subject: &str, old, new| audit_record(actor, now, action, subject, old, new);
    // Gone or changed sessions leave first, so the new list's addresses are free to take.
    let mut gone = Vec::new();
    // The sessions that stay, and who holds each of their addresses.
    let mut kept = HashSet::new();
    let mut held: HashMap<Prefix, String> = HashMap::with_capacity(list.len());
    for old in tx.sessions()? {
        let (what, count) = match by_id.get(old.id.as_str()) {
            _ if newer.contains(&old.id) => {
                out.newer += 1;
                held.extend(old.addrs.iter().map(|p| (*p, old.id.clone())));
                kept.insert(old.id);
                continue;
            }
            Some(s) if s.user == old.user && s.addrs == old.addrs => {
                out.unchanged += 1;
                held.extend(old.addrs.iter().map(|p| (*p, old.id.clone())));
                kept.insert(old.id);
                continue;
            }
            Some(_) => ("sync: changed", &mut out.changed),
            None => ("sync", &mut out.removed),
        };
        *count += 1;
        events.push((old.id.clone(), taken));
        audits.push(record(
            "session.down",
            &old.user,
            Some(format!("{}: {} ({what})", old.id, fmt_addrs(&old.addrs))),
            None,
        ));
        gone.push(old);
    }
    drop(by_id);
    tx.delete_sessions(&gone)?;
    // The list's users that are registered, asked at once (removing sessions removes no
    // user); a new one joins as it is registered below.
    let mut names: Vec<&str> = list
        .iter()
        .filter(|s| !kept.contains(&s.id))
        .map(|s| s.user.as_str())
        .collect();
    names.sort_unstable();
    names.dedup();
    let mut known_users = tx.users_known(&names)?;
    drop(names);
    let mut new_users = Vec::new();
    let mut added = Vec::with_capacity(list.len());
    for mut s in list {
        if kept.contains(&s.id) {
            continue;
        }
        if newer.contains(&s.id) {
            out.newer += 1;
            continue;
        }
        // An address a newer event gave to another session stays there.
        // In place: no new list per session (a sync of 100,000 new sessions keeps them all).
        let before = s.addrs.len();
        let mut bug = None;
        s.addrs.retain(|p| match held.get(p) {
            Some(h) if newer.contains(h) => false,
            // Only a session the list keeps unchanged (and so lists with this address) or
            // one of its own earlier entries could hold it: the list would hold the address
            // twice, which was refused above.
            Some(h) => {
                bug.get_or_insert((*p, h.clone()));
                true
            }
            None => true,
        });
        if let Some((p, h)) = bug {
            anyhow::bail!(
                "session sync: {p} is held by session {h}, which the list keeps (a bug: nothing was changed)"
            );
        }
        out.newer += before - s.addrs.len();
        if s.addrs.is_empty() {
            continue;
        }
        // As `session up`: a user not seen before is registered, blocked.
        if !known_users.contains(s.user.as_str()) {
            new_users.push(new_user(&s.user, actor, now));
            audits.push(record(
                "user.add",
                &s.user,
                None,
                Some("blocked (first session)".into()),
            ));
            known_users.insert(s.user.clone());
        }
        held.extend(s.addrs.iter().map(|p| (*p, s.id.clone())));
        events.push((s.id.clone(), taken));
        audits.push(record(
            "session.up",
            &s.user,
            None,
            Some(format!("{}: {}", s.id, fmt_addrs(&s.addrs))),
        ));
        added.push(Session {
            id: s.id,
            user: s.user,
            addrs: s.addrs,
            since: now,
            source: "sync".into(),
        });
    }
    // In key order: each index then grows at its end rather than page by page all over.
    new_users.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    added.sort_unstable_by(|a, b| a.id.cmp(&b.id));
    out.added = added.len() - out.changed.min(added.len());
    tx.insert_owned(new_users, added)?;
    tx.put_events(&events)?;
    tx.append_audits(&audits)?;
    Ok(out)
}

/// `user bind USER PREFIX`: a static binding (business customers' fixed ranges).
pub fn bind(
    tx: &mut dyn Tx,
    actor: &Actor,
    user: &str,
    prefix: Prefix,
    now: Timestamp,
) -> Result<()> {
    get_user(tx, user)?;
    if let Some(b) = tx.bindings()?.into_iter().find(|b| b.prefix == prefix) {
        refuse!("{prefix} is already bound to {}", b.user);
    }
    tx.put_binding(&Binding {
        user: user.into(),
        prefix,
    })?;
    audit(
        tx,
        actor,
        now,
        "user.bind",
        user,
        None,
        Some(prefix.to_string()),
        None,
    )
}

pub fn unbind(
    tx: &mut dyn Tx,
    actor: &Actor,
    user: &str,
    prefix: Prefix,
    now: Timestamp,
) -> Result<()> {
    get_user(tx, user)?;
    if !tx.delete_binding(&Binding {
        user: user.into(),
        prefix,
    })? {
        refuse!("{prefix} is not bound to {user}");
    }
    audit(
        tx,
        actor,
        now,
        "user.unbind",
        user,
        Some(prefix.to_string()),
        None,
        None,
    )
}

/// `server add` / `exempt add`: adds or updates a runtime entry.
pub fn entry_add(
    tx: &mut dyn Tx,
    actor: &Actor,
    kind: EntryKind,
    prefix: Prefix,
    until: Option<Timestamp>,
    note: Option<String>,
    now: Timestamp,
) -> Result<Entry> {
    check_text("a note", &note)?;
    if let Some(t) = until {
        if t <= now {
            refuse!("--until {t} is not in the future");
        }
    }
    let old = tx
        .entries()?
        .into_iter()
        .find(|e| e.kind == kind && e.prefix == prefix);
    let e = Entry {
        kind,
        prefix,
        until,
        note: note.clone(),
        added_by: actor.to_string(),
        added_at: now,
    };
    tx.put_entry(&e)?;
    let show = |e: &Entry| match e.until {
        Some(t) => format!("{} until {t}", e.prefix),
        None => e.prefix.to_string(),
    };
    audit(
        tx,
        actor,
        now,
        &format!("{}.add", kind.as_str()),
        &prefix.to_string(),
        old.as_ref().map(show),
        Some(show(&e)),
        note,
    )?;
    Ok(e)
}

pub fn entry_remove(
    tx: &mut dyn Tx,
    actor: &Actor,
    kind: EntryKind,
    prefix: Prefix,
    now: Timestamp,
) -> Result<()> {
    if !tx.delete_entry(kind, &prefix)? {
        refuse!(
            "{prefix} is not a runtime {} entry (entries from the config file are changed there)",
            kind.as_str()
        );
    }
    audit(
        tx,
        actor,
        now,
        &format!("{}.remove", kind.as_str()),
        &prefix.to_string(),
        Some(prefix.to_string()),
        None,
        None,
    )
}

/// Who holds `ip` now: the live session holding the longest prefix of it (one indexed
/// lookup per prefix length, so it costs the same with a million sessions), else a static
/// binding containing it. (user, how).
pub fn holder_of(tx: &dyn Tx, ip: std::net::IpAddr) -> Result<Option<(String, String)>> {
    Ok(holder_since(tx, ip)?.map(|(u, how, _)| (u, how)))
}

/// [`holder_of`], and since when: the session's start (None for a static binding, which
/// has no tenure to speak of).
pub fn holder_since(
    tx: &dyn Tx,
    ip: std::net::IpAddr,
) -> Result<Option<(String, String, Option<Timestamp>)>> {
    let max = if ip.is_ipv4() { 32 } else { 128 };
    for len in (0..=max).rev() {
        let p = Prefix { addr: ip, len }.masked();
        if let Some(s) = tx.session_holding(&p)? {
            return Ok(Some((
                s.user,
                format!("session {} ({p})", s.id),
                Some(s.since),
            )));
        }
    }
    Ok(tx
        .bindings()?
        .into_iter()
        .filter(|b| b.prefix.contains(ip))
        .max_by_key(|b| b.prefix.len)
        .map(|b| (b.user, format!("static binding {}", b.prefix), None)))
}

/// When `name`'s last hold was lifted (`unhold`), among their newest audit records.
pub fn last_unhold(tx: &dyn Tx, name: &str) -> Result<Option<Timestamp>> {
    let records = tx.audit(&store::AuditQuery {
        subject: Some(name.to_string()),
        since: None,
        limit: 200,
    })?;
    Ok(records
        .iter()
        .rev()
        .find(|r| r.action == "unhold")
        .map(|r| r.at))
}

#[cfg(test)]
mod tests;
