//! The fleet's tables in PostgreSQL, versioned like the SQLite registry's: a step per
//! version, applied in order, a newer schema refused.

use anyhow::{Context as _, Result};
use tokio_postgres::Client;

/// Serialises migrations of several daemons starting at once (`pg_advisory_xact_lock`).
const MIGRATE_LOCK: i64 = 0x7032_3566_6d67; // "p25fmg"

/// Each step moves the schema one version up; never edit a shipped step, append one.
/// Times are nanoseconds since the epoch, as in SQLite; prefixes are text.
pub const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE users (
    name        TEXT PRIMARY KEY,
    policy      TEXT NOT NULL CHECK (policy IN ('blocked', 'unblocked')),
    until       BIGINT,
    reason      TEXT,
    set_by      TEXT NOT NULL,
    set_at      BIGINT NOT NULL,
    hold_reason TEXT,
    hold_by     TEXT,
    hold_at     BIGINT
);
CREATE TABLE bindings (
    user_name TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    prefix    TEXT NOT NULL,
    PRIMARY KEY (user_name, prefix)
);
CREATE TABLE entries (
    kind     TEXT NOT NULL CHECK (kind IN ('server', 'exempt')),
    prefix   TEXT NOT NULL,
    until    BIGINT,
    note     TEXT,
    added_by TEXT NOT NULL,
    added_at BIGINT NOT NULL,
    PRIMARY KEY (kind, prefix)
);
CREATE TABLE audit (
    id      BIGSERIAL PRIMARY KEY,
    router  TEXT NOT NULL,
    at      BIGINT NOT NULL,
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,
    subject TEXT NOT NULL,
    old     TEXT,
    new     TEXT,
    reason  TEXT
);
CREATE INDEX audit_by_subject ON audit(subject, id);
CREATE FUNCTION port25_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$;
CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION port25_append_only();
-- The ordered change log every router follows: one row per policy change, its row-level
-- writes in `rows`. Written under one advisory lock, so ids commit in id order.
CREATE TABLE changes (
    id     BIGSERIAL PRIMARY KEY,
    at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    router TEXT NOT NULL,
    actor  TEXT NOT NULL,
    rows   JSONB NOT NULL
);
-- Each router's live sessions, published for the helpdesk's view; the router stays their
-- authority.
CREATE TABLE sessions (
    router    TEXT NOT NULL,
    id        TEXT NOT NULL,
    user_name TEXT NOT NULL,
    addrs     TEXT[] NOT NULL,
    since     BIGINT NOT NULL,
    source    TEXT NOT NULL,
    PRIMARY KEY (router, id)
);
CREATE INDEX sessions_by_user ON sessions(user_name);
"#,
    r#"
-- An audit record carried over from a router's SQLite registry (`registry import`) keeps
-- where it came from, `router:original id`: a second import finds it and adds nothing.
ALTER TABLE audit ADD COLUMN origin TEXT;
CREATE UNIQUE INDEX audit_by_origin ON audit(origin);
"#,
    r#"
-- How far `registry.keep_changes` has cut the change log: a replica whose mark is below
-- `through` missed changes that are gone, and reloads the policy tables whole.
CREATE TABLE changes_pruned (
    one     INTEGER PRIMARY KEY CHECK (one = 1),
    through BIGINT NOT NULL
);
CREATE INDEX changes_by_at ON changes(at);
"#,
    r#"
-- Each router's last sign of life (its follower stamps it while it reaches the database):
-- `user show` marks the sessions of a router silent for long, `registry forget-router`
-- removes a decommissioned one's rows.
CREATE TABLE routers (
    name    TEXT PRIMARY KEY,
    seen_at TIMESTAMPTZ NOT NULL
);
"#,
];

/// The database holds a schema of a later port25-ctl: refused, never touched.
#[derive(Debug, thiserror::Error)]
#[error(
    "the fleet schema is version {0}, newer than this port25-ctl knows ({n}): refusing to touch \
     it (upgrade port25-ctl)",
    n = MIGRATIONS.len()
)]
pub struct NewerSchema(pub usize);

/// Creates or upgrades the schema; refuses one newer than this port25-ctl knows.
pub async fn migrate(c: &Client) -> Result<()> {
    c.batch_execute("BEGIN").await?;
    let r = steps(c).await;
    match r {
        Ok(()) => c.batch_execute("COMMIT").await?,
        Err(e) => {
            let _ = c.batch_execute("ROLLBACK").await;
            return Err(e);
        }
    }
    Ok(())
}

async fn steps(c: &Client) -> Result<()> {
    let mut have = version(c).await?;
    // Only an out-of-date schema takes the lock and writes (the fleet role of
    // deploy/port25-fleet.sql has no DDL rights); after the lock, read again: another
    // daemon may have migrated meanwhile.
    if have != Some(MIGRATIONS.len()) {
        c.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
            .await?;
        have = version(c).await?;
    }
    if have.is_none() {
        c.batch_execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            .await?;
    }
    let have = have.unwrap_or(0);
    if have > MIGRATIONS.len() {
        return Err(NewerSchema(have).into());
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(have) {
        c.batch_execute(step)
            .await
            .with_context(|| format!("fleet schema step {}", i + 1))?;
        c.execute("DELETE FROM schema_version", &[]).await?;
        c.execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[&((i + 1) as i32)],
        )
        .await?;
    }
    Ok(())
}

/// The schema's version; `None` when there is no schema at all.
async fn version(c: &Client) -> Result<Option<usize>> {
    let exists: Option<String> = c
        .query_one("SELECT to_regclass('schema_version')::text", &[])
        .await?
        .get(0);
    if exists.is_none() {
        return Ok(None);
    }
    let v: Option<i32> = c
        .query_one("SELECT max(version) FROM schema_version", &[])
        .await?
        .get(0);
    Ok(Some(v.unwrap_or(0) as usize))
}
