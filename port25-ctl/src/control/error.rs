//! What can go wrong talking to the daemon, typed so the CLI (and any other client) can
//! tell "the daemon said no" from "no daemon" from "the daemon failed", and pick an exit code.

use serde::{Deserialize, Serialize};

/// Why the daemon refused, sent as the optional `"kind"` of an error answer. Daemons from
/// before it was added send none; clients read that as [`ErrorKind::Refused`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request is wrong or the rules forbid it (unknown user, bad prefix, too wide...):
    /// asking again unchanged fails again.
    Refused,
    /// The peer may not do this (not root, or a change from the read-only group).
    Denied,
    /// Too many connections: try again.
    Busy,
    /// The daemon could not do it (registry or map failure, shutting down): the request
    /// may be fine.
    Internal,
}

impl ErrorKind {
    /// The kind of an error the daemon's ops raised, by type: `refused` if anything in its
    /// chain is a refusal (a rule's [`Refused`](crate::registry::Refused) or
    /// [`UnknownUser`](crate::registry::UnknownUser), an invalid config, a map that cannot
    /// hold the result), `internal` otherwise. A failure nobody typed is the daemon's: it must
    /// never read to a client as "your request is wrong, do not retry".
    pub fn of(e: &anyhow::Error) -> ErrorKind {
        use crate::config::ConfigError;
        let refused = e.chain().any(|c| {
            c.is::<crate::registry::Refused>()
                || c.is::<crate::registry::UnknownUser>()
                || c.is::<crate::bpf::maps::MapFull>()
                || matches!(
                    c.downcast_ref::<ConfigError>(),
                    Some(ConfigError::Syntax { .. } | ConfigError::Invalid { .. })
                )
        });
        if refused {
            ErrorKind::Refused
        } else {
            ErrorKind::Internal
        }
    }
}

/// A client-side failure: the public control API returns this, never an `anyhow` string.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No daemon listens on the socket.
    #[error(transparent)]
    DaemonDown(#[from] DaemonDown),
    /// The socket is there but this user may not connect (most often: not root).
    #[error(
        "cannot connect to the port25 daemon on {path}: {cause}: the control socket is root's \
         (members of `read_group` may use the read-only verbs); run as root, e.g. with sudo"
    )]
    PermissionDenied { path: String, cause: std::io::Error },
    /// Connecting failed for another reason.
    #[error("cannot connect to the port25 daemon on {path}: {cause}")]
    Connect { path: String, cause: std::io::Error },
    /// Sending the request or reading the answer failed.
    #[error("{context}: {cause}")]
    Io {
        context: &'static str,
        cause: std::io::Error,
    },
    /// A frame over the size limit (either way).
    #[error("{0}")]
    Frame(String),
    /// A request the daemon cannot read (not JSON, unknown op or field, other version).
    #[error("{0}")]
    BadRequest(String),
    /// The answer is not what the op answers.
    // Not `#[from]` (a source): the message names it, and `{:#}` would print it twice.
    #[error("decoding the daemon's answer: {0}")]
    Decode(serde_json::Error),
    /// The daemon answered with an error.
    #[error("{message}")]
    Daemon { kind: ErrorKind, message: String },
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Error {
        Error::Decode(e)
    }
}

impl Error {
    /// What kind of failure this is, as the daemon would name it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Daemon { kind, .. } => *kind,
            Error::PermissionDenied { .. } => ErrorKind::Denied,
            Error::BadRequest(_) => ErrorKind::Refused,
            _ => ErrorKind::Internal,
        }
    }

    /// The CLI's exit code: every failure of a client verb is 1 (usage errors are clap's 2,
    /// a degraded `status` is 3 and a refused start after a detach 10; none of those is a
    /// control call failing).
    pub fn exit_code(&self) -> u8 {
        1
    }
}

/// No daemon listens on the socket (absent, or nothing accepting): not a permission problem.
#[derive(Debug, thiserror::Error)]
#[error("the port25 daemon is not running (no answer on {path}: {cause}); enforcement continues from the pinned programs (`port25-ctl status`)")]
pub struct DaemonDown {
    pub path: String,
    // Not `source`: the message already names it, and `{:#}` would print it twice.
    pub cause: std::io::Error,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn actor() -> crate::registry::Actor {
        crate::registry::Actor {
            uid: 0,
            name: "root".into(),
            on_behalf_of: None,
        }
    }

    #[test]
    fn a_rule_refuses_and_the_machinery_fails() {
        use crate::registry::store::{sqlite::SqliteStore, Store};
        let now: jiff::Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        let mut tx = store.begin().unwrap();
        crate::registry::user_add(&mut *tx, &actor(), "alice", now).unwrap();
        // A rule's refusal, with its message unchanged.
        let again = crate::registry::user_add(&mut *tx, &actor(), "alice", now).unwrap_err();
        assert_eq!(format!("{again:#}"), "user `alice` already exists");
        assert_eq!(ErrorKind::of(&again), ErrorKind::Refused);
        let unknown = crate::registry::block(&mut *tx, &actor(), "bob", None, false, false, now);
        assert_eq!(ErrorKind::of(&unknown.unwrap_err()), ErrorKind::Refused);
        let bad_name = crate::registry::user_add(&mut *tx, &actor(), "-x", now).unwrap_err();
        assert_eq!(ErrorKind::of(&bad_name), ErrorKind::Refused);
        tx.commit().unwrap();
        // The same rule failing in the store under it (a read-only connection) is internal.
        let mut ro = SqliteStore::open_read_only(dir.path()).unwrap();
        let mut rtx = ro.begin().unwrap();
        let e = crate::registry::user_add(&mut *rtx, &actor(), "carol", now).unwrap_err();
        assert_eq!(ErrorKind::of(&e), ErrorKind::Internal, "{e:#}");
        // Config validation refuses; a config that cannot be read is the daemon's problem.
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, "interfaces: []\n").unwrap();
        let e = anyhow::Error::from(crate::config::Config::load(&bad).unwrap_err());
        assert_eq!(ErrorKind::of(&e), ErrorKind::Refused, "{e:#}");
        let e = crate::config::Config::load(&dir.path().join("absent.yaml")).unwrap_err();
        assert_eq!(ErrorKind::of(&e.into()), ErrorKind::Internal);
        // Untyped is internal: only a refusal type makes a refusal.
        let plain = anyhow::anyhow!("a session id must be 1 to 128 characters");
        assert_eq!(ErrorKind::of(&plain), ErrorKind::Internal);
        let io = anyhow::Error::from(std::io::Error::other("disk gone")).context("committing");
        assert_eq!(ErrorKind::of(&io), ErrorKind::Internal);
        let sql = anyhow::Error::from(rusqlite::Error::InvalidQuery).context("reading users");
        assert_eq!(ErrorKind::of(&sql), ErrorKind::Internal);
        // A map that cannot hold the result refuses the change.
        let full = crate::bpf::maps::fits("exempt_v4", 2, 1).unwrap_err();
        assert!(format!("{full:#}").ends_with("(map full); nothing was changed"));
        assert_eq!(ErrorKind::of(&full), ErrorKind::Refused);
        // A refusal under context is still one.
        let wrapped = again.context("running user add");
        assert_eq!(ErrorKind::of(&wrapped), ErrorKind::Refused);
        // The CLI prints `{:#}`: each cause once.
        let bad = serde_json::from_str::<u32>("x").unwrap_err().to_string();
        let e = anyhow::Error::from(Error::from(serde_json::from_str::<u32>("x").unwrap_err()));
        assert_eq!(format!("{e:#}").matches(&bad).count(), 1, "{e:#}");
        assert_eq!(
            serde_json::to_string(&ErrorKind::Internal).unwrap(),
            "\"internal\""
        );
    }
}
