//! Parsers for CLI values: durations, times, prefixes, the session list of `session sync`.

use anyhow::{bail, Context as _, Result};
use jiff::{SignedDuration, Span, SpanRelativeTo, Timestamp, Unit};

use crate::{net::Prefix, registry::SyncSession};

/// `90m`, `3s`, `1h30m`, `2d`, `1w`: a positive duration in whole seconds.
pub fn duration_secs(s: &str) -> Result<u64, String> {
    let secs = match s.parse::<SignedDuration>() {
        Ok(d) => d.as_secs_f64(),
        Err(_) => s
            .parse::<Span>()
            .map_err(|_| format!("`{s}` is not a duration like 90m, 3s, 1h30m or 2d"))?
            .total((Unit::Second, SpanRelativeTo::days_are_24_hours()))
            .map_err(|e| format!("`{s}`: {e}"))?,
    };
    if secs < 1.0 {
        return Err(format!("`{s}`: the duration must be at least 1s"));
    }
    Ok(secs as u64)
}

/// RFC 3339 (`2026-12-31T18:00:00Z`, `...+01:00`) or a date (`2026-12-31`, midnight UTC).
pub fn timestamp(s: &str) -> Result<Timestamp, String> {
    let t = s.parse::<Timestamp>().ok().or_else(|| {
        let d = s.parse::<jiff::civil::Date>().ok()?;
        Some(d.to_zoned(jiff::tz::TimeZone::UTC).ok()?.timestamp())
    });
    if let Some(t) = t {
        crate::config::check_storable(t)?;
        return Ok(t);
    }
    Err(format!(
        "`{s}` is not a time such as 2026-12-31T18:00:00Z or 2026-12-31"
    ))
}

pub fn prefix(s: &str) -> Result<Prefix, String> {
    s.parse()
}

/// A user name argument, refused here already so a hook's bad value never reaches the daemon.
pub fn user_name(s: &str) -> Result<String, String> {
    crate::registry::check_user_name(s)
        .map(|()| s.to_string())
        .map_err(|e| e.to_string())
}

/// The `session sync` list: one session per line, `ID USER ADDR|PREFIX...`. A word that
/// starts with `#` starts a comment; a `#` inside a word is data (user names may hold one,
/// and none may start with one).
pub fn session_list(text: &str, origin: &str) -> Result<Vec<SyncSession>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let mut words = line.split_whitespace().take_while(|w| !w.starts_with('#'));
        let Some(id) = words.next() else { continue };
        let Some(user) = words.next() else {
            bail!("{origin}:{}: expected `ID USER ADDR...`", i + 1);
        };
        crate::registry::check_user_name(user).with_context(|| format!("{origin}:{}", i + 1))?;
        let addrs = words
            .map(|w| w.parse::<Prefix>().map_err(anyhow::Error::msg))
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("{origin}:{}", i + 1))?;
        if addrs.is_empty() {
            bail!("{origin}:{}: session {id} has no address", i + 1);
        }
        out.push(SyncSession {
            id: id.into(),
            user: user.into(),
            addrs,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration_secs("90m"), Ok(5400));
        assert_eq!(duration_secs("3s"), Ok(3));
        assert_eq!(duration_secs("2d"), Ok(172800));
        assert_eq!(duration_secs("1h30m"), Ok(5400));
        for bad in ["0s", "-5m", "soon", "90", ""] {
            assert!(duration_secs(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn times() {
        assert!(timestamp("2026-12-31T18:00:00Z").is_ok());
        assert!(timestamp("2026-12-31").is_ok());
        assert!(timestamp("tomorrow").is_err());
        assert!(timestamp("2026-13-01").is_err());
        // i64 nanoseconds end in 2262: later times would wrap into the past.
        assert!(timestamp("2262-04-11").is_ok());
        for late in ["2262-04-12", "2300-01-01T00:00:00Z", "9999-01-01"] {
            let e = timestamp(late).unwrap_err();
            assert!(e.contains("latest time"), "{late}: {e}");
        }
    }

    #[test]
    fn sync_lists() {
        let l = session_list(
            "# accel-ppp\n42 alice 100.64.3.7 2001:db8:1200::/56\n\n43 bob 100.64.3.8 # note\n",
            "f",
        )
        .unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].addrs.len(), 2);
        let e = session_list("42 alice\n", "f").unwrap_err().to_string();
        assert!(e.contains("f:1"), "{e}");
        let e = format!("{:#}", session_list("1 a 010.0.0.1\n", "f").unwrap_err());
        assert!(e.contains("f:1") && e.contains("leading zero"), "{e}");
        let e = format!(
            "{:#}",
            session_list("1 a 100.64.0.1/24\n", "f").unwrap_err()
        );
        assert!(e.contains("host bits"), "{e}");
    }

    /// A user name is data: a `#` inside it is no comment, and a name that would need
    /// quoting (spaces, invisible characters) is refused with its line, never split into
    /// addresses.
    #[test]
    fn sync_lists_with_hostile_names() {
        let l = session_list("accel:ppp0 x# 100.64.0.9\n", "f").unwrap();
        assert_eq!((l[0].user.as_str(), l[0].addrs.len()), ("x#", 1));
        let l = session_list("accel:ppp0 bob|0.0.0.0/0 100.64.0.9 # note\n", "f").unwrap();
        assert_eq!((l[0].user.as_str(), l[0].addrs.len()), ("bob|0.0.0.0/0", 1));
        for bad in [
            "accel:ppp0 bob\u{202e} 100.64.0.9\n",
            "accel:ppp0 bob\u{200b} 100.64.0.9\n",
            "accel:ppp0 -bob 100.64.0.9\n",
        ] {
            let e = format!("{:#}", session_list(bad, "f").unwrap_err());
            assert!(e.contains("f:1") && e.contains("user name"), "{bad:?}: {e}");
        }
        for bad in ["-h", "#x", "a\u{2066}b", "a\u{feff}", "a b", "a\tb", ""] {
            assert!(user_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            user_name("alice@isp.example"),
            Ok("alice@isp.example".into())
        );
    }
}
