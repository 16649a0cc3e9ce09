//! Human output of the client verbs (`--json` prints the daemon's data as is).

use serde_json::Value;

use super::{ExemptVerb, ServerVerb, SessionVerb, UserVerb, Verb};

/// Values as text; RFC 3339 times to the second (stored to the nanosecond).
fn s(v: &Value) -> String {
    match v {
        Value::String(s) => match s.parse::<jiff::Timestamp>() {
            Ok(t) if s.contains('T') => t
                .round(jiff::Unit::Second)
                .map(|t| t.to_string())
                .unwrap_or_else(|_| s.clone()),
            _ => s.clone(),
        },
        Value::Null => "-".into(),
        v => v.to_string(),
    }
}

fn left(secs: &Value) -> String {
    let Some(n) = secs.as_i64() else {
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

fn policy_line(u: &Value) -> String {
    let mut line = s(&u["effective"]);
    if u["effective"] == "unblocked" {
        match &u["until"] {
            Value::Null => line.push_str(" (no end)"),
            t => line.push_str(&format!(" until {} ({})", s(t), left(&u["seconds_left"]))),
        }
    } else if u["policy"] == "unblocked" {
        line.push_str(&format!(" (the timed unblock ended {})", s(&u["until"])));
    }
    if !u["reason"].is_null() {
        line.push_str(&format!("; reason: {}", s(&u["reason"])));
    }
    line
}

fn audit_line(r: &Value) -> String {
    let mut line = format!(
        "{}  {:<16} {:<14} {}",
        s(&r["at"]),
        s(&r["action"]),
        s(&r["subject"]),
        s(&r["actor"])
    );
    if !r["old"].is_null() || !r["new"].is_null() {
        line.push_str(&format!(": {} -> {}", s(&r["old"]), s(&r["new"])));
    }
    if !r["reason"].is_null() {
        line.push_str(&format!(" ({})", s(&r["reason"])));
    }
    line
}

fn addrs(session: &Value) -> String {
    session["addrs"]
        .as_array()
        .map(|a| a.iter().map(s).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub fn human(verb: &Verb, d: &Value) {
    match verb {
        Verb::Unblock { user, .. } | Verb::Block { user, .. } => {
            if d["changed"] == false && matches!(verb, Verb::Unblock { .. }) {
                println!("{user}: {}", s(&d["note"]));
            } else {
                println!("{user}: {}", policy_line(&d["user"]));
            }
        }
        Verb::User(UserVerb::Show { .. }) => {
            let u = &d["user"];
            println!("user:      {}", s(&u["name"]));
            println!("policy:    {}", policy_line(u));
            println!("set by:    {} at {}", s(&u["set_by"]), s(&u["set_at"]));
            let sessions = d["sessions"].as_array().cloned().unwrap_or_default();
            if sessions.is_empty() {
                println!("sessions:  none live");
            }
            for x in &sessions {
                println!(
                    "session:   {}  {}  since {} ({})",
                    s(&x["id"]),
                    addrs(x),
                    s(&x["since"]),
                    s(&x["source"])
                );
            }
            for b in d["bindings"].as_array().cloned().unwrap_or_default() {
                println!("binding:   {}", s(&b));
            }
            println!("recent audit:");
            for r in d["audit"].as_array().cloned().unwrap_or_default() {
                println!("  {}", audit_line(&r));
            }
        }
        Verb::User(UserVerb::List { .. }) => {
            let users = d["users"].as_array().cloned().unwrap_or_default();
            println!("{:<24} {:>8}  POLICY", "USER", "SESSIONS");
            for u in &users {
                println!(
                    "{:<24} {:>8}  {}",
                    s(&u["name"]),
                    s(&u["sessions"]),
                    policy_line(u)
                );
            }
            println!("{} user(s)", users.len());
        }
        Verb::User(UserVerb::Add { user }) => println!("{user}: registered (blocked)"),
        Verb::User(UserVerb::Remove { user }) => println!(
            "{user}: removed, with {} live session(s)",
            s(&d["sessions_removed"])
        ),
        Verb::User(UserVerb::Bind { user, prefix, .. }) => println!("{user}: {prefix} bound"),
        Verb::User(UserVerb::Unbind { user, prefix }) => println!("{user}: {prefix} unbound"),
        Verb::Session(SessionVerb::Up { user, .. }) => {
            let sess = &d["session"];
            println!("session {} of {user} up: {}", s(&sess["id"]), addrs(sess));
            if d["user_created"] == true {
                println!("{user}: new user, blocked");
            }
            for t in d["taken_over"].as_array().cloned().unwrap_or_default() {
                println!(
                    "{} was held by session {} of {}: reassigned",
                    s(&t[2]),
                    s(&t[0]),
                    s(&t[1])
                );
            }
        }
        Verb::Session(SessionVerb::Down { .. }) => {
            let sess = &d["down"];
            println!(
                "session {} of {} down: {}",
                s(&sess["id"]),
                s(&sess["user"]),
                addrs(sess)
            );
        }
        Verb::Session(SessionVerb::Sync { .. }) => println!(
            "sync: {} added, {} changed, {} removed, {} unchanged, {} kept (newer events)",
            s(&d["added"]),
            s(&d["changed"]),
            s(&d["removed"]),
            s(&d["unchanged"]),
            s(&d["newer"])
        ),
        Verb::Server(ServerVerb::Add { prefix, .. }) => println!("mail server {prefix} added"),
        Verb::Exempt(ExemptVerb::Add { prefix, .. }) => println!("exempt {prefix} added"),
        Verb::Server(ServerVerb::Remove { prefix }) => println!("mail server {prefix} removed"),
        Verb::Exempt(ExemptVerb::Remove { prefix }) => println!("exempt {prefix} removed"),
        Verb::Server(ServerVerb::List) | Verb::Exempt(ExemptVerb::List) => {
            for e in d["entries"].as_array().cloned().unwrap_or_default() {
                let mut line = format!("{:<28} {:<8}", s(&e["prefix"]), s(&e["source"]));
                if !e["until"].is_null() {
                    line.push_str(&format!(" until {}", s(&e["until"])));
                }
                if e["expired"] == true {
                    line.push_str(" (expired)");
                }
                if !e["note"].is_null() {
                    line.push_str(&format!("  {}", s(&e["note"])));
                }
                println!("{line}");
            }
        }
        Verb::Audit { .. } => {
            for r in d["records"].as_array().cloned().unwrap_or_default() {
                println!("{}", audit_line(&r));
            }
        }
        _ => println!("{}", serde_json::to_string_pretty(d).unwrap_or_default()),
    }
}
