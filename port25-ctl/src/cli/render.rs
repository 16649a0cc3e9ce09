//! Human output of the client verbs, one function per reply type (`--json` prints the reply
//! itself). Each returns the text, so tests can hold it to what it was.

use std::{
    fmt::{Display, Write as _},
    path::Path,
};

use jiff::Timestamp;

use crate::{
    control::reply::{
        AuditLog, Bound, Detached, EntryAdded, EntryList, EntryRemoved, PolicyChange, Reloaded,
        SessionDown, SessionUp, SyncSummary, Top, Unbound, UserAdded, UserDetail, UserList,
        UserRemoved, UserView,
    },
    net::Prefix,
    registry::store::{AuditRecord, EntryKind, Policy, Session},
};

/// One line of output (writing to a `String` cannot fail).
macro_rules! out {
    ($o:expr, $($t:tt)*) => {{
        let _ = writeln!($o, $($t)*);
    }};
}

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
    if let Some(h) = &u.hold {
        line.push_str(&format!("; ON HOLD ({})", text(&h.reason)));
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

pub fn unblocked(user: &str, r: &PolicyChange) -> String {
    let mut o = String::new();
    if r.changed {
        out!(o, "{user}: {}", policy_line(&r.user));
    } else {
        out!(o, "{user}: {}", text(&r.note));
    }
    o
}

pub fn blocked(user: &str, r: &PolicyChange) -> String {
    let mut o = String::new();
    out!(o, "{user}: {}", policy_line(&r.user));
    if r.user.hold.is_some() {
        out!(o, "{user}: {}", text(&r.note));
    }
    o
}

pub fn unheld(user: &str, r: &PolicyChange) -> String {
    let mut o = String::new();
    out!(o, "{user}: {}", text(&r.note));
    o
}

pub fn user_detail(d: &UserDetail) -> String {
    let mut o = String::new();
    let u = &d.user;
    out!(o, "user:      {}", text(&u.name));
    out!(o, "policy:    {}", policy_line(u));
    out!(o, "set by:    {} at {}", text(&u.set_by), time(u.set_at));
    if let Some(h) = &u.hold {
        out!(
            o,
            "hold:      set by {} at {}: {}",
            text(&h.by),
            time(h.at),
            text(&h.reason)
        );
        out!(
            o,
            "           every unblock is refused until `port25-ctl unhold`"
        );
    }
    for g in &d.hold_not_effective {
        out!(
            o,
            "hold NOT effective on {}: exempt prefix {} ({}{}) keeps port 25 open there",
            g.addr,
            g.exempt,
            g.source.as_str(),
            opt(g.note.as_deref(), |n| format!(", {}", text(n)))
        );
    }
    if d.sessions.is_empty() {
        out!(o, "sessions:  none live");
    }
    for x in &d.sessions {
        out!(
            o,
            "session:   {}  {}  since {} ({})",
            text(&x.id),
            addrs(x),
            time(x.since),
            text(&x.source)
        );
    }
    match &d.fleet {
        Some(f) if f.unavailable.is_some() => out!(
            o,
            "fleet:     unavailable ({}); the sessions above are this router's",
            text(f.unavailable.as_deref().unwrap_or_default())
        ),
        Some(f) if f.sessions.is_empty() => out!(o, "fleet:     no session on any router"),
        Some(f) => {
            for x in &f.sessions {
                out!(
                    o,
                    "fleet:     {}  {}  {}  since {} ({}){}",
                    text(&x.router),
                    text(&x.session.id),
                    addrs(&x.session),
                    time(x.session.since),
                    text(&x.session.source),
                    match x.router_silent_s {
                        Some(s) => format!(
                            "  [STALE: router silent for {} min; `port25-ctl registry \
                             forget-router {}` once it is decommissioned]",
                            s / 60,
                            text(&x.router)
                        ),
                        None => String::new(),
                    }
                );
            }
        }
        None => {}
    }
    for b in &d.bindings {
        out!(o, "binding:   {b}");
    }
    out!(o, "recent audit:");
    for r in &d.audit {
        out!(o, "  {}", audit_line(r));
    }
    o
}

pub fn user_list(d: &UserList) -> String {
    let mut o = String::new();
    out!(o, "{:<24} {:>8}  POLICY", "USER", "SESSIONS");
    for u in &d.users {
        out!(
            o,
            "{:<24} {:>8}  {}",
            text(&u.user.name),
            u.sessions,
            policy_line(&u.user)
        );
    }
    out!(o, "{} user(s)", d.users.len());
    o
}

pub fn user_added(user: &str, _: &UserAdded) -> String {
    let mut o = String::new();
    out!(o, "{user}: registered (blocked)");
    o
}

pub fn user_removed(user: &str, r: &UserRemoved) -> String {
    let mut o = String::new();
    out!(
        o,
        "{user}: removed, with {} live session(s)",
        r.sessions_removed
    );
    o
}

pub fn bound(r: &Bound) -> String {
    let mut o = String::new();
    out!(o, "{}: {} bound", r.user, r.bound);
    o
}

pub fn unbound(r: &Unbound) -> String {
    let mut o = String::new();
    out!(o, "{}: {} unbound", r.user, r.unbound);
    o
}

pub fn session_up(user: &str, d: &SessionUp) -> String {
    let mut o = String::new();
    let sess = &d.session;
    out!(
        o,
        "session {} of {user} up: {}",
        text(&sess.id),
        addrs(sess)
    );
    if d.user_created {
        out!(o, "{user}: new user, blocked");
    }
    if let Some(dev) = &d.device {
        match (&dev.error, dev.attached.is_empty()) {
            (Some(e), _) => out!(o, "device {}: port 25 NOT blocked there: {e}", dev.name),
            (None, true) => out!(o, "device {}: already enforcing", dev.name),
            (None, false) => out!(
                o,
                "device {}: attached ({})",
                dev.name,
                dev.attached.join(", ")
            ),
        }
    }
    for t in &d.taken_over {
        out!(
            o,
            "{} was held by session {} of {}: reassigned",
            t.prefix,
            text(&t.session),
            text(&t.user)
        );
    }
    if let Some(u) = &d.unblock {
        out!(o, "{user}: {}", policy_line(&u.user));
    }
    o
}

pub fn session_down(d: &SessionDown) -> String {
    let mut o = String::new();
    let sess = &d.down;
    out!(
        o,
        "session {} of {} down: {}",
        text(&sess.id),
        text(&sess.user),
        addrs(sess)
    );
    o
}

pub fn sync_summary(d: &SyncSummary) -> String {
    let mut o = String::new();
    out!(
        o,
        "sync: {} added, {} changed, {} removed, {} unchanged, {} kept (newer events)",
        d.added,
        d.changed,
        d.removed,
        d.unchanged,
        d.newer
    );
    o
}

fn entry_name(kind: EntryKind) -> &'static str {
    match kind {
        EntryKind::Server => "mail server",
        EntryKind::Exempt => "exempt",
    }
}

pub fn entry_added(prefix: &Prefix, r: &EntryAdded) -> String {
    let mut o = String::new();
    out!(o, "{} {prefix} added", entry_name(r.added.kind));
    o
}

pub fn entry_removed(r: &EntryRemoved) -> String {
    let mut o = String::new();
    out!(o, "{} {} removed", entry_name(r.kind), r.removed);
    o
}

pub fn entry_list(d: &EntryList) -> String {
    let mut o = String::new();
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
        out!(o, "{line}");
    }
    o
}

pub fn audit_log(d: &AuditLog) -> String {
    let mut o = String::new();
    for r in &d.records {
        out!(o, "{}", audit_line(r));
    }
    o
}

/// `top`: one line per source, worst first.
pub fn top(t: &Top) -> String {
    let mut o = String::new();
    if !t.tracking {
        out!(o, "offender tracking is off (abuse.track_sources: 0, or the daemon has not started since an upgrade)");
        return o;
    }
    let f = &t.flag;
    out!(
        o,
        "{} sources tracked; flagged = more than {} destinations or {} attempts within {}s",
        t.tracked,
        f.destinations,
        f.attempts,
        f.window_secs
    );
    if t.sources.is_empty() {
        return o;
    }
    out!(
        o,
        "{:<3} {:<39} {:<16} {:>8} {:>6} {:<20} {:<20} {:<10} LAST DESTINATION",
        "",
        "SOURCE",
        "USER",
        "ATTEMPTS",
        "DESTS",
        "FIRST SEEN",
        "LAST SEEN",
        "IFACE"
    );
    for s in &t.sources {
        let flag = match (s.likely_infected, s.hold) {
            (true, true) => "!H",
            (true, false) => "!",
            (false, true) => "H",
            (false, false) => "",
        };
        let dests = if s.destinations_saturated {
            format!(">={}", s.destinations)
        } else {
            s.destinations.to_string()
        };
        out!(
            o,
            "{:<3} {:<39} {:<16} {:>8} {:>6} {:<20} {:<20} {:<10} {}",
            flag,
            s.src.to_string(),
            s.user.as_deref().unwrap_or("-"),
            s.attempts,
            dests,
            time(s.first_seen),
            time(s.last_seen),
            s.interface,
            s.last_destination
        );
    }
    out!(o, "! = likely infected, H = on an abuse hold");
    o
}

/// `theirs`: the config file the daemon reads, when it said.
pub fn reloaded(theirs: Option<&Path>, r: &Reloaded) -> String {
    let mut o = String::new();
    match theirs {
        Some(t) => out!(o, "reloaded {}: {} map writes", t.display(), r.writes),
        None => out!(o, "reloaded: {} map writes", r.writes),
    }
    o
}

pub fn detached(r: &Detached) -> String {
    let mut o = String::new();
    out!(
        o,
        "detached: {}; port 25 is no longer blocked by port25",
        serde_json::to_string(&r.detached).unwrap_or_default()
    );
    o
}

#[cfg(test)]
mod tests;
