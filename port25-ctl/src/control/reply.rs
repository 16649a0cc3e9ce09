//! What each op answers: the `data` of a successful [`Response`](super::proto::Response).
//! The daemon builds these, the CLI decodes them and `--json` prints them; the JSON field
//! names are a promise to hooks and operator scripts (`testdata/golden.json` holds them).

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::{
    config::Config,
    net::Prefix,
    registry::store::{AuditRecord, EntryKind, Hold, Policy, Session, Tx, User},
};

/// The sync summary is the registry's own outcome, sent as is.
pub use crate::registry::SyncOutcome as SyncSummary;

/// One user as `user show`, `user list`, `unblock` and `block` present it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserView {
    pub name: String,
    /// What was set; a timed unblock that ran out is still `unblocked` here...
    pub policy: Policy,
    /// ...and `blocked` here: what the datapath does now.
    pub effective: Policy,
    pub until: Option<Timestamp>,
    /// Of a running timed unblock only.
    pub seconds_left: Option<i64>,
    pub reason: Option<String>,
    pub set_by: String,
    pub set_at: Timestamp,
    /// An abuse hold (who set it, when, why); absent when not held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<Hold>,
}

impl UserView {
    pub fn new(u: &User, now: Timestamp) -> UserView {
        let unblocked = u.unblocked_at(now);
        UserView {
            name: u.name.clone(),
            policy: u.policy,
            effective: if unblocked {
                Policy::Unblocked
            } else {
                Policy::Blocked
            },
            until: u.until,
            seconds_left: match (unblocked, u.until) {
                (true, Some(t)) => Some(t.duration_since(now).as_secs()),
                _ => None,
            },
            reason: u.reason.clone(),
            set_by: u.set_by.clone(),
            set_at: u.set_at,
            hold: u.hold.clone(),
        }
    }
}

/// An address of a held user that an exempt prefix (the config's `exempt`, or `exempt add`)
/// still opens: the operator's network-level decision stands, so the hold does not close
/// port 25 there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HoldGap {
    /// The user's address or prefix (a session's or a binding's).
    pub addr: Prefix,
    /// The exempt prefix covering it.
    pub exempt: Prefix,
    pub source: EntrySource,
    pub note: Option<String>,
}

impl HoldGap {
    /// Where an exempt prefix (config or runtime, not expired) still opens a held user's
    /// addresses: the hold closes the user's own unblock, not the operator's network-level
    /// exemptions, which the datapath applies to an address whoever holds it (a live
    /// session's blocked entry gives way to them). Any overlap counts, wider or narrower
    /// than the user's address or prefix: a false alarm beats a silent gap.
    pub fn find(
        tx: &dyn Tx,
        cfg: &Config,
        sessions: &[Prefix],
        bindings: &[Prefix],
        now: Timestamp,
    ) -> anyhow::Result<Vec<HoldGap>> {
        let live = |until: Option<Timestamp>| until.is_none_or(|t| t > now);
        let mut exempt: Vec<(Prefix, EntrySource, Option<String>)> = cfg
            .exempt
            .iter()
            .filter(|e| live(e.until))
            .map(|e| (e.prefix, EntrySource::Config, e.note.clone()))
            .collect();
        exempt.extend(
            tx.entries()?
                .into_iter()
                .filter(|e| e.kind == EntryKind::Exempt && live(e.until))
                .map(|e| (e.prefix, EntrySource::Runtime, e.note)),
        );
        let mut gaps = vec![];
        for a in sessions.iter().chain(bindings) {
            for (p, source, note) in &exempt {
                if p.contains(a.addr) || a.contains(p.addr) {
                    gaps.push(HoldGap {
                        addr: *a,
                        exempt: *p,
                        source: *source,
                        note: note.clone(),
                    });
                }
            }
        }
        Ok(gaps)
    }
}

/// `unblock` / `block`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyChange {
    pub user: UserView,
    /// False when the user already had that policy (or a longer unblock): see `note`.
    pub changed: bool,
    pub note: String,
}

/// `user add`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserAdded {
    pub user: UserView,
}

/// `user remove`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserRemoved {
    pub removed: String,
    pub sessions_removed: usize,
}

/// `user bind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bound {
    pub user: String,
    pub bound: Prefix,
}

/// `user unbind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unbound {
    pub user: String,
    pub unbound: Prefix,
}

/// `user show`: the user, live sessions, static bindings and the latest audit records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserDetail {
    pub user: UserView,
    pub sessions: Vec<Session>,
    pub bindings: Vec<Prefix>,
    pub audit: Vec<AuditRecord>,
    /// Of a held user: addresses where an exempt prefix keeps port 25 open anyway.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hold_not_effective: Vec<HoldGap>,
    /// With a fleet registry: the user's sessions on every router, as published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetSessions>,
}

/// The fleet's view of a user's sessions (`user show` with a fleet registry).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetSessions {
    pub sessions: Vec<RouterSession>,
    /// Why there is no fleet view (the database unreachable): `sessions` is empty and the
    /// local sessions above are all there is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

/// A session as a router published it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouterSession {
    pub router: String,
    /// The router has not been heard of for this long (more than 10 min): decommissioned,
    /// or cut off from the database; its sessions may be gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_silent_s: Option<u64>,
    #[serde(flatten)]
    pub session: Session,
}

/// A `user list` row: the user and how many live sessions it has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserRow {
    #[serde(flatten)]
    pub user: UserView,
    pub sessions: usize,
}

/// `user list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserList {
    pub users: Vec<UserRow>,
}

/// An address a session took from another one (a reused dynamic address). On the wire a
/// `[session id, user, prefix]` triple.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "(String, String, Prefix)", into = "(String, String, Prefix)")]
pub struct TakenOver {
    pub session: String,
    pub user: String,
    pub prefix: Prefix,
}

impl From<(String, String, Prefix)> for TakenOver {
    fn from((session, user, prefix): (String, String, Prefix)) -> TakenOver {
        TakenOver {
            session,
            user,
            prefix,
        }
    }
}

impl From<TakenOver> for (String, String, Prefix) {
    fn from(t: TakenOver) -> Self {
        (t.session, t.user, t.prefix)
    }
}

/// `session up`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionUp {
    pub session: Session,
    pub user_created: bool,
    pub taken_over: Vec<TakenOver>,
    /// The unblock the session carried (`--unblock`), when it was applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unblock: Option<PolicyChange>,
    /// The session's device when a glob entry governs it: whether port25 enforces there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<SessionDevice>,
}

/// A glob-governed device a `session up` made sure of before answering.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionDevice {
    pub name: String,
    /// Attach points attached for this session (empty: they already enforced).
    pub attached: Vec<String>,
    /// Why an attach point of it does not enforce: port 25 is open there (the session is
    /// recorded all the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl From<crate::registry::SessionUpOutcome> for SessionUp {
    fn from(o: crate::registry::SessionUpOutcome) -> SessionUp {
        SessionUp {
            session: o.session,
            user_created: o.user_created,
            taken_over: o.taken_over.into_iter().map(TakenOver::from).collect(),
            unblock: None,
            device: None,
        }
    }
}

/// `session down`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionDown {
    pub down: Session,
}

/// `server add` / `exempt add`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntryAdded {
    pub added: crate::registry::store::Entry,
}

/// `server remove` / `exempt remove`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntryRemoved {
    pub removed: Prefix,
    pub kind: EntryKind,
}

/// Where a listed entry comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntrySource {
    /// The config file (`mail_servers`, `exempt`).
    Config,
    /// Added with `server add` / `exempt add`, kept in the registry.
    Runtime,
}

impl EntrySource {
    pub fn as_str(self) -> &'static str {
        match self {
            EntrySource::Config => "config",
            EntrySource::Runtime => "runtime",
        }
    }
}

/// A `server list` / `exempt list` row. The fields beyond prefix and source differ by where
/// the entry comes from (a config mail server has only `force`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntryRow {
    pub prefix: Prefix,
    pub source: EntrySource,
    #[serde(flatten)]
    pub detail: EntryDetail,
}

/// Untagged: told apart by their fields, the richest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EntryDetail {
    Runtime {
        until: Option<Timestamp>,
        note: Option<String>,
        added_by: String,
        added_at: Timestamp,
        expired: bool,
    },
    ConfigExempt {
        until: Option<Timestamp>,
        note: Option<String>,
        expired: bool,
    },
    ConfigServer {
        force: bool,
    },
}

impl EntryRow {
    pub fn until(&self) -> Option<Timestamp> {
        match &self.detail {
            EntryDetail::Runtime { until, .. } | EntryDetail::ConfigExempt { until, .. } => *until,
            EntryDetail::ConfigServer { .. } => None,
        }
    }
    pub fn note(&self) -> Option<&str> {
        match &self.detail {
            EntryDetail::Runtime { note, .. } | EntryDetail::ConfigExempt { note, .. } => {
                note.as_deref()
            }
            EntryDetail::ConfigServer { .. } => None,
        }
    }
    pub fn expired(&self) -> bool {
        match &self.detail {
            EntryDetail::Runtime { expired, .. } | EntryDetail::ConfigExempt { expired, .. } => {
                *expired
            }
            EntryDetail::ConfigServer { .. } => false,
        }
    }
}

/// `server list` / `exempt list`: the config's entries, then the runtime ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntryList {
    pub kind: EntryKind,
    pub entries: Vec<EntryRow>,
}

/// `audit`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditLog {
    pub records: Vec<AuditRecord>,
}

/// `top`: the worst sources the kernel tracks, worst first (flagged, then most distinct
/// destinations, then most attempts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Top {
    /// Whether the kernel tracks sources (`abuse.track_sources` > 0 and the map pinned).
    pub tracking: bool,
    /// The flag rule in force.
    pub flag: FlagRule,
    /// Sources tracked in all (before `--since` and `--limit`).
    pub tracked: usize,
    pub sources: Vec<Offender>,
}

/// Likely infected: more than `destinations` distinct destinations or more than `attempts`
/// attempts within one window of `window_secs` (the current one or the one before it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlagRule {
    pub destinations: u32,
    pub attempts: u64,
    pub window_secs: u64,
}

/// One tracked source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Offender {
    pub src: std::net::IpAddr,
    /// The user holding the address (live session, else static binding); None = nobody.
    pub user: Option<String>,
    /// How they hold it (`session ID (PREFIX)`, `static binding PREFIX`).
    pub held_by: Option<String>,
    /// The user is on an abuse hold.
    pub hold: bool,
    /// Connection attempts (SYN without ACK) in the window the flag looks at.
    pub attempts: u64,
    /// Distinct destinations, estimated (linear counting; ~10% error up to 64).
    pub destinations: u64,
    /// The estimate is saturated: at least `destinations`.
    pub destinations_saturated: bool,
    /// Blocked segments (every TCP flag combination and the doubts) in the current window.
    pub segments: u64,
    pub first_seen: Timestamp,
    pub last_seen: Timestamp,
    /// The last destination, `ADDR:PORT` (`[ADDR]:PORT` for IPv6).
    pub last_destination: String,
    /// The counter reason of the last blocked segment (`block_port`, a doubt's).
    pub reason: String,
    pub interface: String,
    pub likely_infected: bool,
}

/// Daemon facts for `status` and `reload`. Fields in name order: `status --json` embeds
/// this struct, and printed it as a sorted JSON object before it was typed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Info {
    /// The config file the daemon reads (absolute).
    pub config: String,
    pub drift_repaired: u64,
    /// With a fleet registry: the replica's and the follower's state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetInfo>,
    /// Entries per policy map as the daemon last applied them (what `status` shows while the
    /// daemon runs: counting a million-entry hash map means reading all of it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub map_fill: Vec<(String, usize)>,
    pub pid: u32,
    pub reconciles: u64,
    pub registry: String,
    pub uptime_s: u64,
}

/// A fleet replica's state (`status`, `/metrics`). Fields in name order, as [`Info`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetInfo {
    /// The last change of the fleet's log the replica holds.
    pub applied_change_id: i64,
    /// Changes of the log applied here since the daemon started (its own not counted).
    pub changes_applied: u64,
    /// The follower's connection (LISTEN) to the database is up.
    pub connected: bool,
    /// Changes the database holds that the replica does not, when the newest is known.
    pub lag_changes: Option<i64>,
    /// When the database last answered (Unix time, ms).
    pub last_contact_unix_ms: Option<i64>,
    pub newest_change_id: Option<i64>,
    /// Sessions and users waiting to be published to the fleet.
    pub publish_queue_sessions: u64,
    pub publish_queue_users: u64,
    /// Times the follower connected again after losing its connection.
    pub reconnects: u64,
}

/// `reload`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reloaded {
    pub writes: usize,
    /// Attach points new in this config.
    pub attached: Vec<String>,
    /// Attach points the config no longer names.
    pub detached: Vec<String>,
}

/// `detach`: the attach points that were removed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detached {
    pub detached: Vec<String>,
}
