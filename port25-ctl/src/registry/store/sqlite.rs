//! The embedded registry: one SQLite file in `state_dir`, WAL, synchronous=FULL (a commit is
//! on disk before the daemon acknowledges it), schema versioned by `user_version`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use jiff::Timestamp;
use rusqlite::{
    params, Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior,
};

use super::keys::Keys;
use super::*;

pub const DB_FILE: &str = "port25.db";

/// Each step moves the schema one version up; never edit a shipped step, append one.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE users (
    name   TEXT PRIMARY KEY,
    policy TEXT NOT NULL CHECK (policy IN ('blocked', 'unblocked')),
    until  INTEGER,
    reason TEXT,
    set_by TEXT NOT NULL,
    set_at INTEGER NOT NULL
);
CREATE TABLE sessions (
    id     TEXT PRIMARY KEY,
    user   TEXT NOT NULL REFERENCES users(name),
    since  INTEGER NOT NULL,
    source TEXT NOT NULL
);
CREATE INDEX sessions_by_user ON sessions(user);
-- An address or prefix belongs to at most one live session.
CREATE TABLE session_addrs (
    prefix     TEXT PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    pos        INTEGER NOT NULL
);
CREATE INDEX session_addrs_by_session ON session_addrs(session_id);
CREATE TABLE bindings (
    user   TEXT NOT NULL REFERENCES users(name),
    prefix TEXT NOT NULL,
    PRIMARY KEY (user, prefix)
);
CREATE TABLE entries (
    kind     TEXT NOT NULL CHECK (kind IN ('server', 'exempt')),
    prefix   TEXT NOT NULL,
    until    INTEGER,
    note     TEXT,
    added_by TEXT NOT NULL,
    added_at INTEGER NOT NULL,
    PRIMARY KEY (kind, prefix)
);
CREATE TABLE audit (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      INTEGER NOT NULL,
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,
    subject TEXT NOT NULL,
    old     TEXT,
    new     TEXT,
    reason  TEXT
);
CREATE INDEX audit_by_subject ON audit(subject, id);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"#,
    r#"
-- The time of the last event (up, change, down) per session id, live or gone, so that an
-- older `session sync` snapshot never undoes a newer event. Pruned after an hour.
CREATE TABLE session_events (
    id TEXT PRIMARY KEY,
    at INTEGER NOT NULL
);
"#,
    r#"
-- An abuse hold (`block --hold`): while any of these is set, the user stays blocked whatever
-- a hook, RADIUS or a POP login asks; only `unhold` clears them.
ALTER TABLE users ADD COLUMN hold_reason TEXT;
ALTER TABLE users ADD COLUMN hold_by TEXT;
ALTER TABLE users ADD COLUMN hold_at INTEGER;
"#,
    r#"
-- With a fleet registry (`registry:` in the config) this file is the router's replica of the
-- fleet's policy: the id of the last change of the fleet's change log applied here.
CREATE TABLE replica (
    one            INTEGER PRIMARY KEY CHECK (one = 1),
    last_change_id INTEGER NOT NULL
);
"#,
    r#"
-- `status` counts without a pass over a million users: counters kept by triggers (REPLACE
-- fires the delete triggers: connections set recursive_triggers), and the timed unblocks,
-- which expire by the clock, by an index of their own.
CREATE TABLE counts (
    one       INTEGER PRIMARY KEY CHECK (one = 1),
    users     INTEGER NOT NULL,
    unblocked INTEGER NOT NULL, -- policy unblocked, no end
    held      INTEGER NOT NULL,
    sessions  INTEGER NOT NULL
);
INSERT INTO counts SELECT 1,
    (SELECT COUNT(*) FROM users),
    (SELECT COUNT(*) FROM users WHERE policy = 'unblocked' AND until IS NULL),
    (SELECT COUNT(*) FROM users WHERE hold_reason IS NOT NULL OR hold_by IS NOT NULL OR hold_at IS NOT NULL),
    (SELECT COUNT(*) FROM sessions);
CREATE TRIGGER counts_user_in AFTER INSERT ON users BEGIN
    UPDATE counts SET users = users + 1,
        unblocked = unblocked + (NEW.policy = 'unblocked' AND NEW.until IS NULL),
        held = held + (NEW.hold_reason IS NOT NULL OR NEW.hold_by IS NOT NULL OR NEW.hold_at IS NOT NULL);
END;
CREATE TRIGGER counts_user_out AFTER DELETE ON users BEGIN
    UPDATE counts SET users = users - 1,
        unblocked = unblocked - (OLD.policy = 'unblocked' AND OLD.until IS NULL),
        held = held - (OLD.hold_reason IS NOT NULL OR OLD.hold_by IS NOT NULL OR OLD.hold_at IS NOT NULL);
END;
CREATE TRIGGER counts_user_change AFTER UPDATE ON users BEGIN
    UPDATE counts SET
        unblocked = unblocked - (OLD.policy = 'unblocked' AND OLD.until IS NULL)
                              + (NEW.policy = 'unblocked' AND NEW.until IS NULL),
        held = held - (OLD.hold_reason IS NOT NULL OR OLD.hold_by IS NOT NULL OR OLD.hold_at IS NOT NULL)
                    + (NEW.hold_reason IS NOT NULL OR NEW.hold_by IS NOT NULL OR NEW.hold_at IS NOT NULL);
END;
CREATE TRIGGER counts_session_in AFTER INSERT ON sessions BEGIN
    UPDATE counts SET sessions = sessions + 1;
END;
CREATE TRIGGER counts_session_out AFTER DELETE ON sessions BEGIN
    UPDATE counts SET sessions = sessions - 1;
END;
CREATE INDEX users_timed ON users(until) WHERE policy = 'unblocked' AND until IS NOT NULL;
"#,
    r#"
-- The rows an INSERT into users or sessions adds are counted by the store's statement
-- itself, once per statement: a `session sync` inserts 100,000 of each, and a trigger run
-- (with its statement journal) per row was a tenth of it. Deletes and updates keep their
-- triggers (REPLACE deletes through them, then its insert is counted).
DROP TRIGGER counts_user_in;
DROP TRIGGER counts_session_in;
"#,
];

pub struct SqliteStore {
    conn: Connection,
    pub path: PathBuf,
    /// Write transactions began since the last [`SqliteStore::checkpoint`].
    written: bool,
}

/// Saturates rather than wraps: callers refuse unstorable times first (config::check_storable),
/// and a time past 2262 must never come back as one in the past.
fn ts(t: Timestamp) -> i64 {
    let n = t.as_nanosecond();
    n.clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

fn from_ts(n: i64) -> Timestamp {
    Timestamp::from_nanosecond(n as i128).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn prefix(s: String) -> rusqlite::Result<Prefix> {
    prefix_at(&s)
}

fn prefix_at(s: &str) -> rusqlite::Result<Prefix> {
    s.parse().map_err(|e: String| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into())
    })
}

/// A prefix column read in place: a full read parses a million of them.
fn prefix_col(r: &rusqlite::Row, i: usize) -> rusqlite::Result<Prefix> {
    prefix_at(r.get_ref(i)?.as_str()?)
}

impl SqliteStore {
    /// Opens (creating and migrating) the registry in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<SqliteStore> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        let path = state_dir.join(DB_FILE);
        let mut conn =
            Connection::open(&path).with_context(|| format!("opening {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // INSERT OR REPLACE fires the delete triggers that keep `counts` only with this.
        conn.pragma_update(None, "recursive_triggers", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Every statement of the write path stays prepared (the default keeps 16).
        conn.set_prepared_statement_cache_capacity(64);
        // A transaction's pages stay in memory until its commit (the default 2 MiB spills a
        // `session sync` of 100,000 sessions to the WAL, page by page, several times over).
        conn.pragma_update(None, "cache_size", -65536)?;
        migrate(&mut conn).with_context(|| format!("migrating {}", path.display()))?;
        Ok(SqliteStore {
            conn,
            path,
            written: false,
        })
    }

    /// Opens an existing registry for reading only (`check` with the daemon down).
    pub fn open_read_only(state_dir: &Path) -> Result<SqliteStore> {
        let path = state_dir.join(DB_FILE);
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("opening {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let v: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if v as usize != MIGRATIONS.len() {
            bail!(
                "{} has schema version {v}; this port25-ctl reads version {}",
                path.display(),
                MIGRATIONS.len()
            );
        }
        Ok(SqliteStore {
            conn,
            path,
            written: false,
        })
    }
}

/// How many users, unblocked users and live sessions the registry holds.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Counts {
    pub users: u64,
    pub unblocked: u64,
    pub timed: u64,
    pub sessions: u64,
    pub held: u64,
}

impl SqliteStore {
    pub fn counts(&self, now: Timestamp) -> Result<Counts> {
        let (users, open, held, sessions) = self.conn.query_row(
            "SELECT users, unblocked, held, sessions FROM counts",
            [],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            },
        )?;
        let timed: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM users WHERE policy = 'unblocked' AND until IS NOT NULL AND until > ?1",
            [ts(now)],
            |r| r.get(0),
        )?;
        let n = |v: i64| v.max(0) as u64;
        Ok(Counts {
            users: n(users),
            unblocked: n(open + timed),
            timed: n(timed),
            sessions: n(sessions),
            held: n(held),
        })
    }
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let have: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let have = have as usize;
    if have > MIGRATIONS.len() {
        bail!(
            "schema version {have} is newer than this port25-ctl knows ({}): refusing to touch it",
            MIGRATIONS.len()
        );
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(have) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
        tx.execute_batch(step)
            .with_context(|| format!("schema step {}", i + 1))?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

struct SqliteTx<'a> {
    tx: Transaction<'a>,
}

impl SqliteStore {
    /// [`Tx::map_rows`] with the users' standings read as `search` says (tests of both).
    #[cfg(test)]
    pub fn map_rows_by(&mut self, search: Option<bool>) -> Result<MapRows> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Deferred)?;
        SqliteTx { tx }.map_rows_by(search)
    }

    /// A read transaction (deferred: it takes no write lock, so it also works on a read-only
    /// connection and never waits for, or holds up, the writer).
    pub fn read(&mut self) -> Result<Box<dyn Tx + '_>> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Deferred)?;
        Ok(Box::new(SqliteTx { tx }))
    }
}

/// Rows per statement of the bulk writes (at most 9 columns: far below SQLite's 32,766
/// parameters).
const BULK_ROWS: usize = 100;

/// Names per statement of [`SqliteTx::users_known`].
const BULK_NAMES: usize = 500;

/// A bound on the WAL while checkpoints are deferred (pages; 64 MiB at 4 KiB): past it a
/// commit checkpoints as SQLite does by default.
const DEFERRED_CHECKPOINT_PAGES: i64 = 16384;

impl SqliteStore {
    /// Leaves checkpoints (copying the WAL into the database, with fsyncs of their own) to
    /// [`SqliteStore::checkpoint`] at a quiet moment, instead of to whichever commit crosses
    /// SQLite's 1,000 pages: that commit's caller (an `unblock`) would wait for them.
    pub fn defer_checkpoints(&mut self) -> Result<()> {
        self.conn
            .pragma_update(None, "wal_autocheckpoint", DEFERRED_CHECKPOINT_PAGES)?;
        Ok(())
    }

    /// Whether a write transaction began since the last checkpoint.
    pub fn checkpoint_due(&self) -> bool {
        self.written
    }

    /// Copies what the WAL holds into the database, as far as readers allow (PASSIVE:
    /// never waits for them).
    pub fn checkpoint(&mut self) -> Result<()> {
        self.written = false;
        self.conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
        Ok(())
    }
}

impl Store for SqliteStore {
    fn begin(&mut self) -> Result<Box<dyn Tx + '_>> {
        self.written = true;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        Ok(Box::new(SqliteTx { tx }))
    }
}

/// The timed unblocks that end after `?1`, by the partial index `users_timed`: only they are
/// read. Unsorted (the caller sorts): with `ORDER BY name` SQLite walks every user in name
/// order instead, a million at a fleet's size, at every reconcile.
pub(crate) fn users_timed_sql() -> String {
    format!(
        "SELECT {USER_COLS} FROM users WHERE policy = 'unblocked' AND until IS NOT NULL \
         AND until > ?1"
    )
}

const USER_COLS: &str =
    "name, policy, until, reason, set_by, set_at, hold_reason, hold_by, hold_at";

fn user_row(r: &rusqlite::Row) -> rusqlite::Result<User> {
    let policy = r.get_ref(1)?.as_str()?;
    Ok(User {
        policy: if policy == "unblocked" {
            Policy::Unblocked
        } else {
            Policy::Blocked
        },
        name: r.get(0)?,
        until: r.get::<_, Option<i64>>(2)?.map(from_ts),
        reason: r.get(3)?,
        set_by: r.get(4)?,
        set_at: from_ts(r.get(5)?),
        hold: hold_of(r.get(6)?, r.get(7)?, r.get(8)?),
    })
}

/// A hold with any of its columns set is a hold (a hand-edited, half-cleared row stays held):
/// fail closed.
fn hold_of(reason: Option<String>, by: Option<String>, at: Option<i64>) -> Option<Hold> {
    if reason.is_none() && by.is_none() && at.is_none() {
        return None;
    }
    let unknown = || "(unknown)".to_string();
    Some(Hold {
        reason: reason.unwrap_or_else(unknown),
        by: by.unwrap_or_else(unknown),
        at: at.map(from_ts).unwrap_or(Timestamp::UNIX_EPOCH),
    })
}

impl SqliteTx<'_> {
    /// One statement, prepared once per connection: a `session sync` runs a few of them per
    /// session, and compiling SQL costs more than running it.
    fn exec(&self, sql: &str, p: impl rusqlite::Params) -> rusqlite::Result<usize> {
        self.tx.prepare_cached(sql)?.execute(p)
    }

    /// Writes `rows` by multi-row statements, `head VALUES (?, ...), (?, ...) tail`, each
    /// row's `cols` parameters bound by `bind` from the 1-based index it is given. A bulk
    /// write of 100,000 rows pays a statement's start, end and cache look-up (and a
    /// formatted SQL text) once per [`BULK_ROWS`] rows, not per row.
    fn insert_many<T>(
        &self,
        head: &str,
        tail: &str,
        cols: usize,
        rows: &[T],
        mut bind: impl FnMut(&mut rusqlite::Statement, usize, &T) -> rusqlite::Result<()>,
    ) -> Result<()> {
        let sql = |n: usize| {
            let one = format!("({})", vec!["?"; cols].join(", "));
            format!("{head} VALUES {} {tail}", vec![one; n].join(", "))
        };
        self.by_chunks(rows, BULK_ROWS, sql, |st, chunk| {
            for (i, r) in chunk.iter().enumerate() {
                bind(st, i * cols + 1, r)?;
            }
            st.raw_execute()?;
            Ok(())
        })
    }

    /// Runs `f` on each chunk of at most `size` items with the statement `sql(chunk
    /// length)`. The full chunk's statement is cached; a shorter last one is compiled and
    /// not cached: its length varies from call to call and would push the write path's
    /// statements out.
    fn by_chunks<T>(
        &self,
        items: &[T],
        size: usize,
        sql: impl Fn(usize) -> String,
        mut f: impl FnMut(&mut rusqlite::Statement, &[T]) -> Result<()>,
    ) -> Result<()> {
        let full = sql(size);
        for chunk in items.chunks(size) {
            let (mut cached, mut plain);
            let st: &mut rusqlite::Statement = if chunk.len() == size {
                cached = self.tx.prepare_cached(&full)?;
                &mut cached
            } else {
                plain = self.tx.prepare(&sql(chunk.len()))?;
                &mut plain
            };
            f(st, chunk)?;
        }
        Ok(())
    }

    /// Adds inserted rows to `counts` (no trigger counts an INSERT: see the last schema
    /// step): `users` rows written, with `unblocked` of them unblocked without an end and
    /// `held` held; `sessions` rows.
    fn count_in(&self, users: usize, unblocked: usize, held: usize, sessions: usize) -> Result<()> {
        if users + sessions == 0 {
            return Ok(());
        }
        self.exec(
            "UPDATE counts SET users = users + ?1, unblocked = unblocked + ?2, \
             held = held + ?3, sessions = sessions + ?4",
            params![users as i64, unblocked as i64, held as i64, sessions as i64],
        )?;
        Ok(())
    }

    /// Counts inserted user rows as the old insert trigger did.
    fn count_users_in(&self, users: &[User]) -> Result<()> {
        let unblocked = users
            .iter()
            .filter(|u| u.policy == Policy::Unblocked && u.until.is_none())
            .count();
        let held = users.iter().filter(|u| u.hold.is_some()).count();
        self.count_in(users.len(), unblocked, held, 0)
    }

    /// One user row, by `verb` ("INSERT", or "INSERT OR REPLACE"), not counted yet (see
    /// [`SqliteTx::count_users_in`]). Cached statements: a fleet replica's first start and
    /// a bulk sync write users by the thousand.
    fn write_user(&self, verb: &str, u: &User) -> Result<()> {
        self.exec(
            &format!("{verb} INTO users ({USER_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
            params![
                u.name,
                u.policy.as_str(),
                u.until.map(ts),
                u.reason,
                u.set_by,
                ts(u.set_at),
                u.hold.as_ref().map(|h| &h.reason),
                u.hold.as_ref().map(|h| &h.by),
                u.hold.as_ref().map(|h| ts(h.at)),
            ],
        )?;
        Ok(())
    }

    fn session_addrs(&self, id: &str) -> Result<Vec<Prefix>> {
        let mut st = self.tx.prepare_cached(
            "SELECT prefix FROM session_addrs WHERE session_id = ?1 ORDER BY pos",
        )?;
        let rows = st.query_map([id], |r| prefix(r.get(0)?))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn session_row(&self, r: &rusqlite::Row) -> rusqlite::Result<(String, String, i64, String)> {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
    }

    fn complete(
        &self,
        (id, user, since, source): (String, String, i64, String),
    ) -> Result<Session> {
        Ok(Session {
            addrs: self.session_addrs(&id)?,
            id,
            user,
            since: from_ts(since),
            source,
        })
    }
}

/// The columns of a user's standing (the narrow read).
const STANDING_COLS: &str = "policy, until, \
     hold_reason IS NOT NULL OR hold_by IS NOT NULL OR hold_at IS NOT NULL";

/// Column `i` as text; None when it is not text (NULL, a number, a blob).
fn text<'r>(r: &'r rusqlite::Row, i: usize) -> rusqlite::Result<Option<&'r str>> {
    match r.get_ref(i)? {
        rusqlite::types::ValueRef::Text(t) => Ok(std::str::from_utf8(t).ok()),
        _ => Ok(None),
    }
}

/// A user's standing from [`STANDING_COLS`] at column `at` onwards.
fn standing_at(r: &rusqlite::Row, at: usize) -> rusqlite::Result<Standing> {
    Ok(Standing {
        policy: if r.get_ref(at)?.as_str()? == "unblocked" {
            Policy::Unblocked
        } else {
            Policy::Blocked
        },
        until: r.get::<_, Option<i64>>(at + 1)?.map(from_ts),
        held: r.get::<_, i64>(at + 2)? != 0,
    })
}

impl SqliteTx<'_> {
    /// The narrow read ([`Tx::map_rows`]): each table scanned once, joined here by hashed
    /// keys ([`Keys`]). The standings of the users named come from a scan of `users` too,
    /// unless they are few beside it (`search`: `None` picks): then each is searched for.
    /// A row whose session or user is missing (none while foreign keys hold) is left out,
    /// as an SQL inner join would.
    pub(crate) fn map_rows_by(&self, search: Option<bool>) -> Result<MapRows> {
        let mut rows = MapRows {
            entries: self.entries()?,
            ..Default::default()
        };
        let (n_users, n_sessions): (i64, i64) = self
            .tx
            .query_row("SELECT users, sessions FROM counts", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?
            .unwrap_or((0, 0));
        // Room for what the kept counts say there is, rather than growing a million-row
        // list by copies (a session has one address or more).
        // Capped: a count is a hint, and a wrong one must not reserve a small router's memory.
        let cap = |n: i64| usize::try_from(n).unwrap_or(0).min(1 << 22);
        let sessions = cap(n_sessions);

        // The users named by sessions and bindings. A name is compared with the last one
        // (and the one after it) only: a user named again after others is added again, and
        // its indexes are made one below, once the standings are known. In a registry
        // written in step (a user's first session soon after the user) that costs nothing,
        // where hashing every session's user was a quarter of the read.
        let mut named = Keys::with_capacity(sessions, 12);
        let mut addrs: Vec<(u32, Prefix)> = Vec::with_capacity(sessions);
        {
            let mut ids = Keys::with_capacity(sessions, 12);
            let mut user_of: Vec<u32> = Vec::with_capacity(sessions);
            let mut st = self.tx.prepare_cached("SELECT id, user FROM sessions")?;
            let mut q = st.query([])?;
            let mut last = None;
            while let Some(r) = q.next()? {
                // A key that is not text (NULL is possible in a hand-edited file) joins
                // nothing, as in SQL; its rows are left out (blocked).
                let (Some(id), Some(user)) = (text(r, 0)?, text(r, 1)?) else {
                    continue;
                };
                ids.push(id);
                let u = named.near(user, last).unwrap_or_else(|| named.push(user));
                user_of.push(u);
                last = Some(u);
            }
            let mut st = self
                .tx
                .prepare_cached("SELECT session_id, prefix FROM session_addrs")?;
            let mut q = st.query([])?;
            let mut last = None;
            while let Some(r) = q.next()? {
                let Some(id) = text(r, 0)? else { continue };
                if let Some(s) = ids.find(id, last) {
                    addrs.push((user_of[s as usize], prefix_col(r, 1)?));
                    last = Some(s);
                }
            }
        }
        let mut bound: Vec<(u32, Prefix)> = Vec::new();
        {
            let mut st = self
                .tx
                .prepare_cached("SELECT user, prefix FROM bindings")?;
            let mut q = st.query([])?;
            let mut last = None;
            while let Some(r) = q.next()? {
                let Some(user) = text(r, 0)? else { continue };
                let u = named.near(user, last).unwrap_or_else(|| named.push(user));
                bound.push((u, prefix_col(r, 1)?));
                last = Some(u);
            }
        }

        let mut standing: Vec<Option<Standing>> = vec![None; named.len()];
        // A search costs about what scanning eight users does.
        let search =
            search.unwrap_or(named.len().saturating_mul(8) < usize::try_from(n_users).unwrap_or(0));
        if search {
            let mut st = self.tx.prepare_cached(&format!(
                "SELECT {STANDING_COLS} FROM users WHERE name = ?1"
            ))?;
            for (i, s) in standing.iter_mut().enumerate() {
                *s = st
                    .query_row([named.key(i as u32)], |r| standing_at(r, 0))
                    .optional()?;
            }
        } else if !named.is_empty() {
            let mut st = self
                .tx
                .prepare_cached(&format!("SELECT name, {STANDING_COLS} FROM users"))?;
            let mut q = st.query([])?;
            let mut last = None;
            while let Some(r) = q.next()? {
                let Some(name) = text(r, 0)? else { continue };
                if let Some(i) = named.find(name, last) {
                    standing[i as usize] = Some(standing_at(r, 1)?);
                    last = Some(i);
                }
            }
        }

        // Each name's indexes made one: the one with a standing, if any has one. Only a
        // name without a standing can have another index (the scan gives a standing to one
        // index per name), and a search gives each index its own.
        let n = named.len();
        let mut canon: Vec<u32> = (0..n as u32).collect();
        if search || standing.iter().any(Option::is_none) {
            let mut first: std::collections::HashMap<&str, u32, foldhash::fast::RandomState> =
                std::collections::HashMap::with_capacity_and_hasher(n, Default::default());
            for i in 0..n as u32 {
                let c = first.entry(named.key(i)).or_insert(i);
                if standing[*c as usize].is_none() && standing[i as usize].is_some() {
                    *c = i;
                }
            }
            for (i, c) in canon.iter_mut().enumerate() {
                *c = first[named.key(i as u32)];
            }
        }

        // One row per user, those without a row in `users` left out with their rows.
        const GONE: u32 = u32::MAX;
        let mut at = vec![GONE; n];
        rows.users.reserve(n);
        for i in 0..n {
            if canon[i] as usize == i {
                if let Some(s) = standing[i] {
                    at[i] = rows.users.len() as u32;
                    rows.users.push((named.key(i as u32).into(), s));
                }
            }
        }
        for i in 0..n {
            at[i] = at[canon[i] as usize];
        }
        let keep = |v: &mut Vec<(u32, Prefix)>| {
            v.retain_mut(|(u, _)| {
                *u = at[*u as usize];
                *u != GONE
            })
        };
        keep(&mut addrs);
        keep(&mut bound);
        rows.addrs = addrs;
        rows.bound = bound;
        Ok(rows)
    }
}

impl Tx for SqliteTx<'_> {
    fn user(&self, name: &str) -> Result<Option<User>> {
        let mut st = self
            .tx
            .prepare_cached(&format!("SELECT {USER_COLS} FROM users WHERE name = ?1"))?;
        Ok(st.query_row([name], user_row).optional()?)
    }

    fn users_known(&self, names: &[&str]) -> Result<std::collections::HashSet<String>> {
        // A statement per chunk: one per name was a fifth of a sync's time outside its
        // inserts.
        let sql = |n: usize| {
            format!(
                "SELECT name FROM users WHERE name IN ({})",
                vec!["?"; n].join(", ")
            )
        };
        let mut known = std::collections::HashSet::new();
        self.by_chunks(names, BULK_NAMES, sql, |st, chunk| {
            let mut rows = st.query(rusqlite::params_from_iter(chunk.iter()))?;
            while let Some(r) = rows.next()? {
                known.insert(r.get(0)?);
            }
            Ok(())
        })?;
        Ok(known)
    }

    fn users(&self) -> Result<Vec<User>> {
        let mut st = self
            .tx
            .prepare_cached(&format!("SELECT {USER_COLS} FROM users ORDER BY name"))?;
        let rows = st.query_map([], user_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn users_in_maps(&self) -> Result<Vec<User>> {
        let mut st = self.tx.prepare_cached(&format!(
            "SELECT {USER_COLS} FROM users WHERE name IN \
             (SELECT user FROM sessions UNION SELECT user FROM bindings) ORDER BY name"
        ))?;
        let rows = st.query_map([], user_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn map_rows(&self) -> Result<MapRows> {
        self.map_rows_by(None)
    }

    fn users_unblocked(&self) -> Result<Vec<User>> {
        let mut st = self.tx.prepare_cached(&format!(
            "SELECT {USER_COLS} FROM users WHERE policy = 'unblocked' ORDER BY name"
        ))?;
        let rows = st.query_map([], user_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn users_timed_after(&self, after: Timestamp) -> Result<Vec<User>> {
        let mut st = self.tx.prepare_cached(&users_timed_sql())?;
        let rows = st.query_map([ts(after)], user_row)?;
        let mut users: Vec<User> = rows.collect::<rusqlite::Result<_>>()?;
        users.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        Ok(users)
    }

    fn users_after(&self, after: Option<&str>, n: usize) -> Result<Vec<User>> {
        let mut st = self.tx.prepare_cached(&format!(
            "SELECT {USER_COLS} FROM users WHERE ?1 IS NULL OR name > ?1 ORDER BY name LIMIT ?2"
        ))?;
        let rows = st.query_map(params![after, n.min(i64::MAX as usize) as i64], user_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn put_user(&mut self, u: &User) -> Result<()> {
        // Cached: a fleet replica's first start writes every user of the fleet. A row it
        // replaces left the counts through the delete trigger.
        self.write_user("INSERT OR REPLACE", u)?;
        self.count_users_in(std::slice::from_ref(u))
    }

    fn delete_user(&mut self, name: &str) -> Result<()> {
        self.exec("DELETE FROM bindings WHERE user = ?1", [name])?;
        self.exec("DELETE FROM users WHERE name = ?1", [name])?;
        Ok(())
    }

    fn session(&self, id: &str) -> Result<Option<Session>> {
        let row = {
            let mut st = self
                .tx
                .prepare_cached("SELECT id, user, since, source FROM sessions WHERE id = ?1")?;
            st.query_row([id], |r| self.session_row(r)).optional()?
        };
        row.map(|r| self.complete(r)).transpose()
    }

    fn sessions(&self) -> Result<Vec<Session>> {
        // One ordered scan: each session's rows are adjacent, its addresses in order
        // (a map from a million ids to their addresses was most of a full read).
        let mut st = self.tx.prepare_cached(
            "SELECT s.id, s.user, s.since, s.source, a.prefix FROM sessions s \
             LEFT JOIN session_addrs a ON a.session_id = s.id ORDER BY s.id, a.pos",
        )?;
        let mut rows = st.query([])?;
        let mut out: Vec<Session> = Vec::new();
        while let Some(r) = rows.next()? {
            let same = out
                .last()
                .is_some_and(|s| r.get_ref(0).ok().and_then(|v| v.as_str().ok()) == Some(&s.id));
            if !same {
                out.push(Session {
                    id: r.get(0)?,
                    user: r.get(1)?,
                    since: from_ts(r.get(2)?),
                    source: r.get(3)?,
                    addrs: Vec::new(),
                });
            }
            if r.get_ref(4)? != rusqlite::types::ValueRef::Null {
                let p = prefix_col(r, 4)?;
                out.last_mut().expect("pushed above").addrs.push(p);
            }
        }
        Ok(out)
    }

    fn sessions_of(&self, user: &str) -> Result<Vec<Session>> {
        let rows: Vec<_> = {
            let mut st = self.tx.prepare_cached(
                "SELECT id, user, since, source FROM sessions WHERE user = ?1 ORDER BY id",
            )?;
            let rows = st.query_map([user], |r| self.session_row(r))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        rows.into_iter().map(|r| self.complete(r)).collect()
    }

    fn session_holding(&self, p: &Prefix) -> Result<Option<Session>> {
        let id: Option<String> = self
            .tx
            .prepare_cached("SELECT session_id FROM session_addrs WHERE prefix = ?1")?
            .query_row([p.to_string()], |r| r.get(0))
            .optional()?;
        match id {
            Some(id) => self.session(&id),
            None => Ok(None),
        }
    }

    fn put_session(&mut self, s: &Session) -> Result<()> {
        self.exec(
            "INSERT OR REPLACE INTO sessions (id, user, since, source) VALUES (?1, ?2, ?3, ?4)",
            params![s.id, s.user, ts(s.since), s.source],
        )?;
        // A row it replaced left the count through the delete trigger.
        self.count_in(0, 0, 0, 1)?;
        self.exec("DELETE FROM session_addrs WHERE session_id = ?1", [&s.id])?;
        for (pos, p) in s.addrs.iter().enumerate() {
            self.exec(
                "INSERT INTO session_addrs (prefix, session_id, pos) VALUES (?1, ?2, ?3)",
                params![p.to_string(), s.id, pos as i64],
            )?;
        }
        Ok(())
    }

    fn delete_session(&mut self, id: &str) -> Result<()> {
        self.exec("DELETE FROM session_addrs WHERE session_id = ?1", [id])?;
        self.exec("DELETE FROM sessions WHERE id = ?1", [id])?;
        Ok(())
    }

    fn last_event(&self, id: &str) -> Result<Option<Timestamp>> {
        let mut st = self
            .tx
            .prepare_cached("SELECT at FROM session_events WHERE id = ?1")?;
        Ok(st
            .query_row([id], |r| r.get::<_, i64>(0))
            .optional()?
            .map(from_ts))
    }

    fn put_event(&mut self, id: &str, at: Timestamp) -> Result<()> {
        self.exec(
            "INSERT INTO session_events (id, at) VALUES (?1, ?2)
             ON CONFLICT(id) DO UPDATE SET at = max(at, excluded.at)",
            params![id, ts(at)],
        )?;
        Ok(())
    }

    fn prune_events(&mut self, before: Timestamp) -> Result<()> {
        self.exec("DELETE FROM session_events WHERE at < ?1", [ts(before)])?;
        Ok(())
    }

    fn events_after(&self, after: Timestamp) -> Result<std::collections::HashSet<String>> {
        let mut st = self
            .tx
            .prepare_cached("SELECT id FROM session_events WHERE at > ?1")?;
        let rows = st.query_map([ts(after)], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn insert_users(&mut self, users: &[User]) -> Result<()> {
        // Plain INSERT: a user already stored is an error, never a silent replace.
        self.insert_many(
            &format!("INSERT INTO users ({USER_COLS})"),
            "",
            9,
            users,
            |st, i, u| {
                st.raw_bind_parameter(i, &u.name)?;
                st.raw_bind_parameter(i + 1, u.policy.as_str())?;
                st.raw_bind_parameter(i + 2, u.until.map(ts))?;
                st.raw_bind_parameter(i + 3, &u.reason)?;
                st.raw_bind_parameter(i + 4, &u.set_by)?;
                st.raw_bind_parameter(i + 5, ts(u.set_at))?;
                st.raw_bind_parameter(i + 6, u.hold.as_ref().map(|h| &h.reason))?;
                st.raw_bind_parameter(i + 7, u.hold.as_ref().map(|h| &h.by))?;
                st.raw_bind_parameter(i + 8, u.hold.as_ref().map(|h| ts(h.at)))
            },
        )?;
        self.count_users_in(users)
    }

    fn insert_sessions(&mut self, sessions: &[Session]) -> Result<()> {
        self.insert_many(
            "INSERT INTO sessions (id, user, since, source)",
            "",
            4,
            sessions,
            |st, i, s| {
                st.raw_bind_parameter(i, &s.id)?;
                st.raw_bind_parameter(i + 1, &s.user)?;
                st.raw_bind_parameter(i + 2, ts(s.since))?;
                st.raw_bind_parameter(i + 3, &s.source)
            },
        )?;
        let addrs: Vec<(&str, usize, &Prefix)> = sessions
            .iter()
            .flat_map(|s| {
                s.addrs
                    .iter()
                    .enumerate()
                    .map(|(pos, p)| (s.id.as_str(), pos, p))
            })
            .collect();
        let mut text = String::new();
        self.insert_many(
            "INSERT INTO session_addrs (prefix, session_id, pos)",
            "",
            3,
            &addrs,
            |st, i, (id, pos, p)| {
                use std::fmt::Write as _;
                text.clear();
                let _ = write!(text, "{p}");
                st.raw_bind_parameter(i, text.as_str())?;
                st.raw_bind_parameter(i + 1, *id)?;
                st.raw_bind_parameter(i + 2, *pos as i64)
            },
        )?;
        self.count_in(0, 0, 0, sessions.len())
    }

    fn put_events(&mut self, events: &[(String, Timestamp)]) -> Result<()> {
        // Rows of one statement are written in order: a later row for the same id meets
        // the earlier one as a conflict, as a statement per row would.
        self.insert_many(
            "INSERT INTO session_events (id, at)",
            "ON CONFLICT(id) DO UPDATE SET at = max(at, excluded.at)",
            2,
            events,
            |st, i, (id, at)| {
                st.raw_bind_parameter(i, id)?;
                st.raw_bind_parameter(i + 1, ts(*at))
            },
        )
    }

    fn append_audits(&mut self, records: &[AuditRecord]) -> Result<()> {
        // In order: ids follow the list, as one insert per record gave them.
        self.insert_many(
            "INSERT INTO audit (at, actor, action, subject, old, new, reason)",
            "",
            7,
            records,
            |st, i, r| {
                st.raw_bind_parameter(i, ts(r.at))?;
                st.raw_bind_parameter(i + 1, &r.actor)?;
                st.raw_bind_parameter(i + 2, &r.action)?;
                st.raw_bind_parameter(i + 3, &r.subject)?;
                st.raw_bind_parameter(i + 4, &r.old)?;
                st.raw_bind_parameter(i + 5, &r.new)?;
                st.raw_bind_parameter(i + 6, &r.reason)
            },
        )
    }

    fn bindings(&self) -> Result<Vec<Binding>> {
        let mut st = self
            .tx
            .prepare_cached("SELECT user, prefix FROM bindings ORDER BY user, prefix")?;
        let rows = st.query_map([], |r| {
            Ok(Binding {
                user: r.get(0)?,
                prefix: prefix(r.get(1)?)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn bindings_of(&self, user: &str) -> Result<Vec<Prefix>> {
        let mut st = self
            .tx
            .prepare_cached("SELECT prefix FROM bindings WHERE user = ?1 ORDER BY prefix")?;
        let rows = st.query_map([user], |r| prefix(r.get(0)?))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn put_binding(&mut self, b: &Binding) -> Result<()> {
        self.exec(
            "INSERT OR IGNORE INTO bindings (user, prefix) VALUES (?1, ?2)",
            params![b.user, b.prefix.to_string()],
        )?;
        Ok(())
    }

    fn delete_binding(&mut self, b: &Binding) -> Result<bool> {
        Ok(self.exec(
            "DELETE FROM bindings WHERE user = ?1 AND prefix = ?2",
            params![b.user, b.prefix.to_string()],
        )? > 0)
    }

    fn entries(&self) -> Result<Vec<Entry>> {
        let mut st = self.tx.prepare_cached(
            "SELECT kind, prefix, until, note, added_by, added_at FROM entries ORDER BY kind, prefix",
        )?;
        let rows = st.query_map([], |r| {
            let kind: String = r.get(0)?;
            Ok(Entry {
                kind: if kind == "server" {
                    EntryKind::Server
                } else {
                    EntryKind::Exempt
                },
                prefix: prefix(r.get(1)?)?,
                until: r.get::<_, Option<i64>>(2)?.map(from_ts),
                note: r.get(3)?,
                added_by: r.get(4)?,
                added_at: from_ts(r.get(5)?),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn put_entry(&mut self, e: &Entry) -> Result<()> {
        self.exec(
            "INSERT OR REPLACE INTO entries (kind, prefix, until, note, added_by, added_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                e.kind.as_str(),
                e.prefix.to_string(),
                e.until.map(ts),
                e.note,
                e.added_by,
                ts(e.added_at)
            ],
        )?;
        Ok(())
    }

    fn delete_entry(&mut self, kind: EntryKind, p: &Prefix) -> Result<bool> {
        Ok(self.exec(
            "DELETE FROM entries WHERE kind = ?1 AND prefix = ?2",
            params![kind.as_str(), p.to_string()],
        )? > 0)
    }

    fn append_audit(&mut self, r: &AuditRecord) -> Result<()> {
        self.exec(
            "INSERT INTO audit (at, actor, action, subject, old, new, reason) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                ts(r.at),
                r.actor,
                r.action,
                r.subject,
                r.old,
                r.new,
                r.reason
            ],
        )?;
        Ok(())
    }

    fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>> {
        let limit = if q.limit == 0 {
            i64::MAX
        } else {
            q.limit as i64
        };
        // The newest `limit` matching records, returned oldest first. One statement per
        // filter shape, so that SQLite uses the subject index instead of scanning the log.
        let filter = match (&q.subject, q.since) {
            (Some(_), Some(_)) => "WHERE subject = ?1 AND at >= ?2",
            (Some(_), None) => "WHERE subject = ?1 AND ?2 IS NULL",
            (None, Some(_)) => "WHERE ?1 IS NULL AND at >= ?2",
            (None, None) => "WHERE ?1 IS NULL AND ?2 IS NULL",
        };
        let mut st = self.tx.prepare_cached(&format!(
            "SELECT * FROM (SELECT id, at, actor, action, subject, old, new, reason FROM audit \
             {filter} ORDER BY id DESC LIMIT ?3) ORDER BY id"
        ))?;
        let rows = st.query_map(params![q.subject, q.since.map(ts), limit], |r| {
            Ok(AuditRecord {
                id: r.get(0)?,
                at: from_ts(r.get(1)?),
                actor: r.get(2)?,
                action: r.get(3)?,
                subject: r.get(4)?,
                old: r.get(5)?,
                new: r.get(6)?,
                reason: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn replica_mark(&self) -> Result<i64> {
        Ok(self
            .tx
            .query_row("SELECT last_change_id FROM replica", [], |r| r.get(0))
            .optional()?
            .unwrap_or(0))
    }

    fn set_replica_mark(&mut self, id: i64) -> Result<()> {
        self.exec(
            "INSERT INTO replica (one, last_change_id) VALUES (1, ?1) \
             ON CONFLICT(one) DO UPDATE SET last_change_id = excluded.last_change_id",
            [id],
        )?;
        Ok(())
    }

    fn commit(self: Box<Self>) -> Result<()> {
        self.tx.commit().context("committing to the registry")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `users_known` answers as a `user` per name would, over full chunks of
    /// [`BULK_NAMES`], the short last one, repeated and absent names.
    #[test]
    fn known_users_are_asked_by_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(dir.path()).unwrap();
        let now = Timestamp::from_second(1).unwrap();
        let stored: Vec<User> = (0..2 * BULK_NAMES + 7)
            .filter(|i| i % 3 == 0)
            .map(|i| User {
                name: format!("u{i:05}"),
                policy: Policy::Blocked,
                until: None,
                reason: None,
                set_by: "t".into(),
                set_at: now,
                hold: None,
            })
            .collect();
        let mut tx = s.begin().unwrap();
        tx.insert_users(&stored).unwrap();
        let names: Vec<String> = (0..2 * BULK_NAMES + 7)
            .map(|i| format!("u{i:05}"))
            .collect();
        let mut asked: Vec<&str> = names.iter().map(String::as_str).collect();
        asked.extend(["u00000", "nobody", ""]);
        let known = tx.users_known(&asked).unwrap();
        let one_by_one: std::collections::HashSet<String> = asked
            .iter()
            .filter(|n| tx.user(n).unwrap().is_some())
            .map(|n| n.to_string())
            .collect();
        assert_eq!(known, one_by_one);
        assert_eq!(known.len(), stored.len());
        assert!(tx.users_known(&[]).unwrap().is_empty());
    }

    /// The counts of a registry made before the insert triggers went stay exact through the
    /// step that drops them, and inserts after it (single and bulk) are counted.
    #[test]
    fn counts_survive_the_step_that_drops_the_insert_triggers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        {
            let mut c = Connection::open(&path).unwrap();
            c.pragma_update(None, "recursive_triggers", "ON").unwrap();
            for (i, step) in MIGRATIONS[..5].iter().enumerate() {
                let tx = c.transaction().unwrap();
                tx.execute_batch(step).unwrap();
                tx.pragma_update(None, "user_version", (i + 1) as i64)
                    .unwrap();
                tx.commit().unwrap();
            }
            c.execute_batch(
                "INSERT INTO users (name, policy, set_by, set_at) VALUES ('a', 'unblocked', 't', 0), ('b', 'blocked', 't', 0);
                 INSERT INTO sessions (id, user, since, source) VALUES ('s1', 'a', 0, 't');",
            )
            .unwrap();
        }
        let mut s = SqliteStore::open(dir.path()).unwrap();
        let now = Timestamp::from_second(1).unwrap();
        let exact = |s: &SqliteStore| {
            let c = s.counts(now).unwrap();
            let n = |sql: &str| s.conn.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap() as u64;
            assert_eq!(c.users, n("SELECT COUNT(*) FROM users"));
            assert_eq!(
                c.unblocked,
                n("SELECT COUNT(*) FROM users WHERE policy = 'unblocked'")
            );
            assert_eq!(c.sessions, n("SELECT COUNT(*) FROM sessions"));
            assert_eq!(
                c.held,
                n("SELECT COUNT(*) FROM users WHERE hold_by IS NOT NULL")
            );
            c
        };
        assert_eq!(exact(&s).users, 2);
        let user = |name: &str, policy, held: bool| User {
            name: name.into(),
            policy,
            until: None,
            reason: None,
            set_by: "t".into(),
            set_at: now,
            hold: held.then(|| Hold {
                reason: "r".into(),
                by: "t".into(),
                at: now,
            }),
        };
        let session = |id: &str, user: &str| Session {
            id: id.into(),
            user: user.into(),
            addrs: vec![format!("100.64.0.{}/32", id.len()).parse().unwrap()],
            since: now,
            source: "t".into(),
        };
        let mut tx = s.begin().unwrap();
        // Replaced rows (single writes), then bulk inserts.
        tx.put_user(&user("a", Policy::Blocked, true)).unwrap();
        tx.put_user(&user("c", Policy::Unblocked, false)).unwrap();
        tx.put_session(&session("s1", "b")).unwrap();
        tx.insert_users(&[
            user("d", Policy::Unblocked, false),
            user("e", Policy::Blocked, true),
        ])
        .unwrap();
        tx.insert_sessions(&[session("s22", "d"), session("s333", "e")])
            .unwrap();
        tx.delete_session("s22").unwrap();
        tx.commit().unwrap();
        let c = exact(&s);
        assert_eq!((c.users, c.unblocked, c.held, c.sessions), (5, 2, 2, 2));
    }
}
