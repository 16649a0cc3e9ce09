//! Human output of the client verbs, one function per reply type (`--json` prints the reply
//! itself).

use std::{fmt::Display, path::Path};

use jiff::Timestamp;

use crate::{
    control::reply::{
        AuditLog, Bound, Detached, EntryAdded, EntryList, EntryRemoved, PolicyChange, Reloaded,
        SessionDown, SessionUp, SyncSummary, Unbound, UserAdded, UserDetail, UserList, UserRemoved,
        UserView,
    },
    net::Prefix,
    registry::store::{AuditRecord, EntryKind, Policy, Session},
};

/// Times to the second (stored to the nanosecond).
fn time(t: Timestamp) -> String {
    t.round(jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| t.to_string())
}

/// Free text as it always printed: a value that is a time is shown to the second.
fn text(s: &str) -> String {
    match s.parse::<Timestamp>() {
        Ok(t) if s.contains('T') => time(t),
        _ => s.to_string(),
    }
}

/// An optional value, `-` when absent.
fn opt<T>(v: Option<T>, f: impl FnOnce(T) -> String) -> String {
    v.map(f).unwrap_or_else(|| "-".into())
}

fn left(secs: Option<i64>) -> String {
    let Some(n) = secs else {
        return String::new();
    };
    let (h, m, sec) = (n / 3600, (n % 3600) / 60, n % 60);
    if h > 0 {
        format!("{h}h{m:02}m left")
    } else if m > 0 {
        format!("{m}m{sec:02}s left")
    } else {
        format!("{sec}s left")
    }
}

fn policy_line(u: &UserView) -> String {
    let mut line = u.effective.as_str().to_string();
    if u.effective == Policy::Unblocked {
        match u.until {
            None => line.push_str(" (no end)"),
            Some(t) => line.push_str(&format!(" until {} ({})", time(t), left(u.seconds_left))),
        }
    } else if u.policy == Policy::Unblocked {
        line.push_str(&format!(
            " (the timed unblock ended {})",
            opt(u.until, time)
        ));
    }
    if let Some(r) = &u.reason {
        line.push_str(&format!("; reason: {}", text(r)));
    }
    line
}

fn audit_line(r: &AuditRecord) -> String {
    let t = |v: &Option<String>| opt(v.as_deref(), text);
    let mut line = format!(
        "{}  {:<16} {:<14} {}",
        time(r.at),
        text(&r.action),
        text(&r.subject),
        text(&r.actor)
    );
    if r.old.is_some() || r.new.is_some() {
        line.push_str(&format!(": {} -> {}", t(&r.old), t(&r.new)));
    }
    if r.reason.is_some() {
        line.push_str(&format!(" ({})", t(&r.reason)));
    }
    line
}

fn addrs(session: &Session) -> String {
    join(&session.addrs)
}

fn join(v: &[impl Display]) -> String {
    v.iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn unblocked(user: &str, r: &PolicyChange) {
    if r.changed {
        println!("{user}: {}", policy_line(&r.user));
    } else {
        println!("{user}: {}", text(&r.note));
    }
}

pub fn blocked(user: &str, r: &PolicyChange) {
    println!("{user}: {}", policy_line(&r.user));
}

pub fn user_detail(d: &UserDetail) {
    let u = &d.user;
    println!("user:      {}", text(&u.name));
    println!("policy:    {}", policy_line(u));
    println!("set by:    {} at {}", text(&u.set_by), time(u.set_at));
    if d.sessions.is_empty() {
        println!("sessions:  none live");
    }
    for x in &d.sessions {
        println!(
            "session:   {}  {}  since {} ({})",
            text(&x.id),
            addrs(x),
            time(x.since),
            text(&x.source)
        );
    }
    for b in &d.bindings {
        println!("binding:   {b}");
    }
    println!("recent audit:");
    for r in &d.audit {
        println!("  {}", audit_line(r));
    }
}

pub fn user_list(d: &UserList) {
    println!("{:<24} {:>8}  POLICY", "USER", "SESSIONS");
    for u in &d.users {
        println!(
            "{:<24} {:>8}  {}",
            text(&u.user.name),
            u.sessions,
            policy_line(&u.user)
        );
    }
    println!("{} user(s)", d.users.len());
}

pub fn user_added(user: &str, _: &UserAdded) {
    println!("{user}: registered (blocked)");
}

pub fn user_removed(user: &str, r: &UserRemoved) {
    println!(
        "{user}: removed, with {} live session(s)",
        r.sessions_removed
    );
}

pub fn bound(r: &Bound) {
    println!("{}: {} bound", r.user, r.bound);
}

pub fn unbound(r: &Unbound) {
    println!("{}: {} unbound", r.user, r.unbound);
}

pub fn session_up(user: &str, d: &SessionUp) {
    let sess = &d.session;
    println!("session {} of {user} up: {}", text(&sess.id), addrs(sess));
    if d.user_created {
        println!("{user}: new user, blocked");
    }
    for t in &d.taken_over {
        println!(
            "{} was held by session {} of {}: reassigned",
            t.prefix,
            text(&t.session),
            text(&t.user)
        );
    }
}

pub fn session_down(d: &SessionDown) {
    let sess = &d.down;
    println!(
        "session {} of {} down: {}",
        text(&sess.id),
        text(&sess.user),
        addrs(sess)
    );
}

pub fn sync_summary(d: &SyncSummary) {
    println!(
        "sync: {} added, {} changed, {} removed, {} unchanged, {} kept (newer events)",
        d.added, d.changed, d.removed, d.unchanged, d.newer
    );
}

fn entry_name(kind: EntryKind) -> &'static str {
    match kind {
        EntryKind::Server => "mail server",
        EntryKind::Exempt => "exempt",
    }
}

pub fn entry_added(prefix: &Prefix, r: &EntryAdded) {
    println!("{} {prefix} added", entry_name(r.added.kind));
}

pub fn entry_removed(r: &EntryRemoved) {
    println!("{} {} removed", entry_name(r.kind), r.removed);
}

pub fn entry_list(d: &EntryList) {
    for e in &d.entries {
        let mut line = format!("{:<28} {:<8}", e.prefix.to_string(), e.source.as_str());
        if let Some(t) = e.until() {
            line.push_str(&format!(" until {}", time(t)));
        }
        if e.expired() {
            line.push_str(" (expired)");
        }
        if let Some(n) = e.note() {
            line.push_str(&format!("  {}", text(n)));
        }
        println!("{line}");
    }
}

pub fn audit_log(d: &AuditLog) {
    for r in &d.records {
        println!("{}", audit_line(r));
    }
}

/// `theirs`: the config file the daemon reads, when it said.
pub fn reloaded(theirs: Option<&Path>, r: &Reloaded) {
    match theirs {
        Some(t) => println!("reloaded {}: {} map writes", t.display(), r.writes),
        None => println!("reloaded: {} map writes", r.writes),
    }
}

pub fn detached(r: &Detached) {
    println!(
        "detached: {}; port 25 is no longer blocked by port25",
        serde_json::to_string(&r.detached).unwrap_or_default()
    );
}
