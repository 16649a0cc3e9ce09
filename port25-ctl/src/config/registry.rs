//! The `registry:` section: a fleet's shared PostgreSQL registry. Absent, the registry is
//! the embedded SQLite file in `state_dir`, as it always was.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// A libpq-style connection string (`host=db dbname=port25 user=port25`), without a
    /// password: it would show in `status`, logs and the config's readers.
    pub postgres: String,
    /// The password, alone in a file of mode 0600 or stricter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// This router's name in the fleet (sessions, the change log). Default: the host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<String>,
    /// How long the fleet's change log keeps a change (`30d`, `720h`); older ones are
    /// pruned, and a router whose mark is older reloads the fleet's policy whole.
    #[serde(default = "default_keep_changes", with = "keep")]
    pub keep_changes: Duration,
}

fn default_keep_changes() -> Duration {
    Duration::from_secs(30 * 86400)
}

/// A retention: a duration with days (`30d`, `2w`, `12h`, `1d 12h`), days of 24 hours.
mod keep {
    use std::time::Duration;

    use serde::{de, Deserialize, Deserializer, Serializer};

    pub fn parse(s: &str) -> Result<Duration, String> {
        let span: jiff::Span = s
            .parse()
            .map_err(|e| format!("`{s}` is not a duration like 30d or 720h: {e}"))?;
        let d = span
            .to_duration(jiff::SpanRelativeTo::days_are_24_hours())
            .map_err(|e| format!("`{s}`: {e}"))?;
        let d = Duration::try_from(d).map_err(|_| format!("`{s}`: negative duration"))?;
        if d < Duration::from_secs(60) {
            return Err(format!("`{s}`: keep the change log at least 1m"));
        }
        Ok(d)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        parse(&String::deserialize(d)?).map_err(de::Error::custom)
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{}s", d.as_secs()))
    }

    #[cfg(test)]
    #[test]
    fn retentions_parse_with_days() {
        assert_eq!(parse("30d"), Ok(Duration::from_secs(30 * 86400)));
        assert_eq!(parse("720h"), Ok(Duration::from_secs(30 * 86400)));
        assert_eq!(parse("1d 12h"), Ok(Duration::from_secs(36 * 3600)));
        assert!(parse("30s").is_err());
        assert!(parse("-2d").is_err());
        assert!(parse("soon").is_err());
    }
}

impl Registry {
    /// Rules serde cannot express; `Err` is the message the config error shows.
    pub(super) fn validate(&self) -> Result<(), String> {
        let (conn, tls) = crate::fleet::tls::parse(&self.postgres)
            .map_err(|e| format!("registry.postgres: not a connection string: {e}"))?;
        if let Some(p) = &tls.rootcert {
            if !p.is_absolute() {
                return Err(format!(
                    "registry.postgres: sslrootcert {} must be an absolute path",
                    p.display()
                ));
            }
        }
        if conn.get_password().is_some() {
            return Err(
                "registry.postgres must not hold a password (it would show in status and logs): \
                 put it in registry.password_file (mode 0600)"
                    .into(),
            );
        }
        if conn.get_hosts().is_empty() {
            return Err("registry.postgres names no host (host=...)".into());
        }
        if conn.get_dbname().is_none() {
            return Err("registry.postgres names no database (dbname=...)".into());
        }
        if let Some(r) = &self.router {
            check_router(r)?;
        }
        if let Some(p) = &self.password_file {
            if !p.is_absolute() {
                return Err(format!(
                    "registry.password_file {} must be an absolute path",
                    p.display()
                ));
            }
        }
        Ok(())
    }

    /// This router's name: the configured one, else the host name.
    pub fn router_name(&self) -> String {
        self.router.clone().unwrap_or_else(host_name)
    }

    /// The password from `password_file`, refused when others than the owner may read it.
    pub fn password(&self) -> Result<Option<String>, String> {
        let Some(p) = &self.password_file else {
            return Ok(None);
        };
        read_password(p).map(Some)
    }

    /// The connection string as shown (it never holds a password: [`Registry::validate`]).
    pub fn describe(&self) -> String {
        format!("PostgreSQL `{}`", self.postgres)
    }
}

/// The host name (a router's default name in the fleet).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

pub fn check_router(r: &str) -> Result<(), String> {
    let ok = !r.is_empty()
        && r.len() <= 64
        && r.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "registry.router `{r}`: 1 to 64 letters, digits, `-`, `_` or `.`"
        ))
    }
}

fn read_password(p: &Path) -> Result<String, String> {
    use std::os::unix::fs::MetadataExt;
    let meta =
        std::fs::metadata(p).map_err(|e| format!("registry.password_file {}: {e}", p.display()))?;
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "registry.password_file {} has mode {:o}: others than its owner may read it; \
             chmod 0600",
            p.display(),
            meta.mode() & 0o777
        ));
    }
    let text = std::fs::read_to_string(p)
        .map_err(|e| format!("registry.password_file {}: {e}", p.display()))?;
    // One line; a trailing newline (echo > file) is not part of the password.
    let pw = text.strip_suffix('\n').unwrap_or(&text);
    let pw = pw.strip_suffix('\r').unwrap_or(pw);
    if pw.is_empty() || pw.contains('\n') {
        return Err(format!(
            "registry.password_file {}: must hold the password on one line",
            p.display()
        ));
    }
    Ok(pw.to_string())
}
