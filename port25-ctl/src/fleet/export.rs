//! Moving a router into a fleet: `registry export` writes a router's SQLite registry as one
//! JSON document, `registry import` writes such a document into the fleet's PostgreSQL as
//! change-log entries, so every running router applies it as any other change.
//!
//! The import is all or nothing, under the fleet's write lock, and idempotent: what the
//! fleet already holds is counted unchanged, an audit record is keyed by the router it came
//! from and its original id (`audit.origin`), and a user (binding, entry) the fleet holds
//! with another policy is a conflict that refuses the whole file unless `overwrite`.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use anyhow::{ensure, Context as _, Result};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::{Row, CHANNEL, WRITE_LOCK};
use crate::{
    config::{Limits, Registry},
    net::Prefix,
    registry::store::{
        sqlite::SqliteStore, AuditQuery, AuditRecord, Binding, Entry, EntryKind, Policy, User,
    },
};

/// `format` of an export document.
pub const FORMAT: &str = "port25-registry";
/// `version` of the document this port25-ctl writes and reads.
pub const VERSION: u32 = 1;
/// Rows per change-log entry of an import (a long audit history makes several).
const ROWS_PER_CHANGE: usize = 1000;

/// A router's registry as `registry export` writes it. Times are RFC 3339 (UTC), prefixes
/// text; sessions are not exported (each router stays their authority).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always [`VERSION`]; another is refused.
    pub version: u32,
    /// The router the registry comes from: its audit records are keyed `router:id` in the
    /// fleet.
    pub router: String,
    pub exported_at: Timestamp,
    pub users: Vec<User>,
    pub bindings: Vec<Binding>,
    /// Runtime mail servers and exempt prefixes (`server add`, `exempt add`).
    pub entries: Vec<Entry>,
    /// The whole audit log, oldest first, with its original ids, times and actors.
    pub audit: Vec<AuditRecord>,
}

/// Reads the SQLite registry in `state_dir` (read-only: the daemon may be running).
pub fn export(state_dir: &Path, router: &str) -> Result<Document> {
    let mut store = SqliteStore::open_read_only(state_dir)?;
    let tx = store.read()?;
    Ok(Document {
        format: FORMAT.into(),
        version: VERSION,
        router: router.into(),
        exported_at: Timestamp::now(),
        users: tx.users()?,
        bindings: tx.bindings()?,
        entries: tx.entries()?,
        audit: tx.audit(&AuditQuery {
            limit: 0,
            ..Default::default()
        })?,
    })
}

/// Parses and checks a document: a bad one is refused before the database is touched.
pub fn parse(text: &str) -> Result<Document> {
    let doc: Document = serde_json::from_str(text).context("not a registry export document")?;
    ensure!(
        doc.format == FORMAT,
        "format `{}`: not a port25 registry export (`{FORMAT}`)",
        doc.format
    );
    ensure!(
        doc.version == VERSION,
        "document version {}: this port25-ctl reads version {VERSION}",
        doc.version
    );
    crate::config::check_router(&doc.router).map_err(|e| anyhow::anyhow!("router: {e}"))?;
    let mut names = BTreeSet::new();
    for u in &doc.users {
        crate::cli::parse::user_name(&u.name)
            .map_err(|e| anyhow::anyhow!("user `{}`: {e}", u.name))?;
        let hold = u.hold.as_ref();
        plain(
            [
                u.reason.as_deref(),
                Some(u.set_by.as_str()),
                hold.map(|h| h.reason.as_str()),
                hold.map(|h| h.by.as_str()),
            ],
            || format!("user `{}`", u.name),
        )?;
        ensure!(names.insert(&u.name), "user `{}` appears twice", u.name);
        for t in [Some(u.set_at), u.until].into_iter().flatten() {
            storable(t).with_context(|| format!("user `{}`", u.name))?;
        }
    }
    for b in &doc.bindings {
        ensure!(
            names.contains(&b.user),
            "binding {} of `{}`: no such user in the document",
            b.prefix,
            b.user
        );
    }
    let mut entries = BTreeSet::new();
    for e in &doc.entries {
        ensure!(
            entries.insert((e.kind, e.prefix.to_string())),
            "{} {} appears twice",
            e.kind.as_str(),
            e.prefix
        );
        plain([e.note.as_deref(), Some(e.added_by.as_str())], || {
            format!("{} {}", e.kind.as_str(), e.prefix)
        })?;
        for t in [Some(e.added_at), e.until].into_iter().flatten() {
            storable(t).with_context(|| format!("{} {}", e.kind.as_str(), e.prefix))?;
        }
    }
    let mut ids = BTreeSet::new();
    for r in &doc.audit {
        ensure!(ids.insert(r.id), "audit record {} appears twice", r.id);
        plain(
            [
                Some(r.actor.as_str()),
                Some(r.action.as_str()),
                Some(r.subject.as_str()),
                r.old.as_deref(),
                r.new.as_deref(),
                r.reason.as_deref(),
            ],
            || format!("audit record {}", r.id),
        )?;
        storable(r.at).with_context(|| format!("audit record {}", r.id))?;
    }
    Ok(doc)
}

/// The document's allow-list prefixes (entries, bindings) wider than `limits`' floor, as
/// (what, prefix, floor): each needs the force `exempt add` and `user bind` need.
pub fn too_wide(doc: &Document, limits: &Limits) -> Vec<(String, Prefix, u8)> {
    let entries = doc
        .entries
        .iter()
        .map(|e| (e.kind.as_str().to_string(), e.prefix));
    let bindings = doc
        .bindings
        .iter()
        .map(|b| (format!("binding of {}", b.user), b.prefix));
    entries
        .chain(bindings)
        .filter_map(|(what, p)| limits.too_wide(&p).map(|floor| (what, p, floor)))
        .collect()
}

/// Texts reach operators' terminals (`user show`, `exempt list`, `audit`): a control
/// character (an escape sequence) is refused, as the verbs that write them refuse it.
fn plain<'a>(
    texts: impl IntoIterator<Item = Option<&'a str>>,
    what: impl Fn() -> String,
) -> Result<()> {
    for t in texts.into_iter().flatten() {
        if let Some(c) = t
            .chars()
            .find(|c| c.is_control() && !matches!(c, '\t' | '\n'))
        {
            anyhow::bail!(
                "{}: a text holds a control character (U+{:04X}): {}",
                what(),
                c as u32,
                t.escape_debug()
            );
        }
    }
    Ok(())
}

/// Times are stored as i64 nanoseconds: one outside that range would come back wrong.
fn storable(t: Timestamp) -> Result<()> {
    ensure!(
        i64::try_from(t.as_nanosecond()).is_ok(),
        "time {t} is out of the storable range"
    );
    Ok(())
}

fn ts(t: Timestamp) -> i64 {
    t.as_nanosecond().clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

/// What an import found and did, per kind.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    pub created: u64,
    pub unchanged: u64,
    pub conflicting: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Imported {
    pub router: String,
    pub users: Counts,
    pub bindings: Counts,
    pub entries: Counts,
    /// Audit records are never conflicting: one the fleet holds (same `router:id`) is
    /// unchanged.
    pub audit: Counts,
    /// Each conflict, as the operator reads it.
    pub conflicts: Vec<String>,
    /// The conflicting rows were written over (`--overwrite`).
    pub overwritten: bool,
    /// The change-log ids written (none: the fleet already held everything).
    pub changes: Vec<i64>,
}

impl Imported {
    pub fn created(&self) -> u64 {
        self.users.created + self.bindings.created + self.entries.created + self.audit.created
    }
}

/// The import was refused: conflicts and no `--overwrite`. Nothing was written.
#[derive(Debug, thiserror::Error)]
#[error(
    "import refused, nothing written: {} conflict(s) with the fleet's registry (give --overwrite to replace the fleet's rows with the file's):\n  {}",
    .0.conflicts.len(),
    .0.conflicts.join("\n  ")
)]
pub struct Conflicts(pub Imported);

/// The parts of a user that make their policy: a user equal in these is unchanged.
fn policy_of(u: &User) -> (Policy, Option<i64>, bool) {
    (u.policy, u.until.map(ts), u.hold.is_some())
}

fn describe(u: &User) -> String {
    let mut s = u.policy.as_str().to_string();
    if let Some(t) = u.until {
        s += &format!(" until {t}");
    }
    if let Some(h) = &u.hold {
        s += &format!(", on hold ({})", h.reason);
    }
    s
}

/// Writes `doc` into the fleet's database of `reg`, as `actor`.
/// `forced`: the file's prefixes wider than the floor ([`too_wide`]) the operator forced,
/// audited as `exempt add --force-wide` is.
pub fn import(
    reg: &Registry,
    doc: &Document,
    actor: &str,
    overwrite: bool,
    forced: &[(String, Prefix, u8)],
) -> Result<Imported> {
    let fleet = super::Fleet::new(reg)?;
    let cfg = fleet.conn_config();
    let name = fleet.name.clone();
    let tls = fleet.connector();
    drop(fleet);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (mut client, conn) = cfg.connect(tls).await?;
        let driver = tokio::spawn(conn);
        let r = async {
            super::schema::migrate(&client).await?;
            import_tx(&mut client, doc, actor, overwrite, forced).await
        }
        .await;
        driver.abort();
        r
    })
    .map_err(|e| {
        if e.is::<Conflicts>() {
            e
        } else {
            e.context(format!("fleet registry {name}"))
        }
    })
}

async fn import_tx(
    client: &mut tokio_postgres::Client,
    doc: &Document,
    actor: &str,
    overwrite: bool,
    forced: &[(String, Prefix, u8)],
) -> Result<Imported> {
    let t = client.transaction().await?;
    // Routers' writes wait for the import, not the other way round for long.
    t.batch_execute("SET LOCAL lock_timeout = '30s'").await?;
    t.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])
        .await?;
    let mut out = Imported {
        router: doc.router.clone(),
        overwritten: overwrite,
        ..Default::default()
    };
    let mut rows = Vec::new();

    let names: Vec<&str> = doc.users.iter().map(|u| u.name.as_str()).collect();
    let have: BTreeMap<String, (Policy, Option<i64>, bool, String)> = t
        .query(
            "SELECT name, policy, until, hold_reason IS NOT NULL OR hold_by IS NOT NULL \
             OR hold_at IS NOT NULL FROM users WHERE name = ANY($1)",
            &[&names],
        )
        .await?
        .into_iter()
        .map(|r| {
            let policy: String = r.get(1);
            let policy = if policy == "unblocked" {
                Policy::Unblocked
            } else {
                Policy::Blocked
            };
            let until: Option<i64> = r.get(2);
            let held: bool = r.get(3);
            let mut text = policy.as_str().to_string();
            if let Some(n) = until {
                if let Ok(t) = Timestamp::from_nanosecond(n as i128) {
                    text += &format!(" until {t}");
                }
            }
            if held {
                text += ", on hold";
            }
            (r.get(0), (policy, until, held, text))
        })
        .collect();
    let mut held = Vec::new();
    for u in &doc.users {
        match have.get(&u.name) {
            None => {
                out.users.created += 1;
                rows.push(Row::PutUser { user: u.clone() });
            }
            Some((p, until, held, _)) if (*p, *until, *held) == policy_of(u) => {
                out.users.unchanged += 1
            }
            Some((_, _, true, theirs)) if u.hold.is_none() => {
                // Only `unhold` lifts an abuse hold: --overwrite does not.
                held.push(format!(
                    "user {}: the fleet has {theirs}, the file {}",
                    u.name,
                    describe(u)
                ));
            }
            Some((.., theirs)) => {
                out.users.conflicting += 1;
                out.conflicts.push(format!(
                    "user {}: the fleet has {theirs}, the file {}",
                    u.name,
                    describe(u)
                ));
                rows.push(Row::PutUser { user: u.clone() });
            }
        }
    }

    anyhow::ensure!(
        held.is_empty(),
        "import refused, nothing written: {} user(s) on an abuse hold in the fleet that the file \
         does not hold (only `port25-ctl unhold` lifts a hold, --overwrite does not; unhold \
         them first, or take them out of the file):\n  {}",
        held.len(),
        held.join("\n  ")
    );

    let mut bound: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in t
        .query("SELECT prefix, user_name FROM bindings", &[])
        .await?
    {
        bound.entry(r.get(0)).or_default().insert(r.get(1));
    }
    for b in &doc.bindings {
        let holders = bound.get(&b.prefix.to_string());
        if holders.is_some_and(|h| h.contains(&b.user)) {
            out.bindings.unchanged += 1;
            continue;
        }
        if let Some(others) = holders.filter(|h| !h.is_empty()) {
            out.bindings.conflicting += 1;
            out.conflicts.push(format!(
                "binding {}: the fleet binds it to {}, the file to {}",
                b.prefix,
                others.iter().cloned().collect::<Vec<_>>().join(", "),
                b.user
            ));
            for other in others {
                let prefix: Prefix = b.prefix;
                rows.push(Row::DeleteBinding {
                    binding: Binding {
                        user: other.clone(),
                        prefix,
                    },
                });
            }
        } else {
            out.bindings.created += 1;
        }
        rows.push(Row::PutBinding { binding: b.clone() });
    }

    let entries: BTreeMap<(String, String), Option<i64>> = t
        .query("SELECT kind, prefix, until FROM entries", &[])
        .await?
        .into_iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect();
    for e in &doc.entries {
        match entries.get(&(e.kind.as_str().to_string(), e.prefix.to_string())) {
            None => {
                out.entries.created += 1;
                rows.push(Row::PutEntry { entry: e.clone() });
            }
            Some(until) if *until == e.until.map(ts) => out.entries.unchanged += 1,
            Some(_) => {
                out.entries.conflicting += 1;
                let until =
                    |t: Option<Timestamp>| t.map_or("no end".to_string(), |t| t.to_string());
                out.conflicts.push(format!(
                    "{} {}: the fleet has another end than the file's ({})",
                    match e.kind {
                        EntryKind::Server => "server",
                        EntryKind::Exempt => "exempt",
                    },
                    e.prefix,
                    until(e.until)
                ));
                rows.push(Row::PutEntry { entry: e.clone() });
            }
        }
    }

    let prefix = format!("{}:", doc.router);
    let known: BTreeSet<String> = t
        .query(
            "SELECT origin FROM audit WHERE starts_with(origin, $1)",
            &[&prefix],
        )
        .await?
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    let mut audit = Vec::new();
    for r in &doc.audit {
        let origin = format!("{prefix}{}", r.id);
        if known.contains(&origin) {
            out.audit.unchanged += 1;
        } else {
            out.audit.created += 1;
            audit.push((origin, r));
        }
    }

    if !out.conflicts.is_empty() && !overwrite {
        // The transaction rolls back when dropped.
        return Err(Conflicts(out).into());
    }
    if rows.is_empty() && audit.is_empty() {
        return Ok(out);
    }
    let st = super::Stmts::prepare(&t).await?;
    for row in &rows {
        super::write_row(&t, &st, &doc.router, row).await?;
    }
    for (origin, r) in &audit {
        t.execute(
            "INSERT INTO audit (router, at, actor, action, subject, old, new, reason, origin) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            &[
                &doc.router,
                &ts(r.at),
                &r.actor,
                &r.action,
                &r.subject,
                &r.old,
                &r.new,
                &r.reason,
                origin,
            ],
        )
        .await?;
        rows.push(Row::Audit {
            record: (*r).clone(),
        });
    }
    let now = Timestamp::now();
    let mut records: Vec<AuditRecord> = forced
        .iter()
        .map(|(what, p, floor)| AuditRecord {
            id: 0,
            at: now,
            actor: actor.to_string(),
            action: "force_wide".into(),
            subject: p.to_string(),
            old: None,
            new: Some(format!("import {what} {p}, wider than /{floor}, forced")),
            reason: None,
        })
        .collect();
    // The import itself is audited (in the fleet and on every replica).
    let summary = AuditRecord {
        id: 0,
        at: Timestamp::now(),
        actor: actor.to_string(),
        action: "import".into(),
        subject: doc.router.clone(),
        old: None,
        new: Some(format!(
            "users {} created, {} overwritten; bindings {}; entries {}; audit {}",
            out.users.created,
            if overwrite { out.users.conflicting } else { 0 },
            out.bindings.created,
            out.entries.created,
            out.audit.created
        )),
        reason: None,
    };
    records.push(summary);
    for record in records {
        super::write_row(
            &t,
            &st,
            &doc.router,
            &Row::Audit {
                record: record.clone(),
            },
        )
        .await?;
        rows.push(Row::Audit { record });
    }
    for chunk in rows.chunks(ROWS_PER_CHANGE) {
        let body = serde_json::to_value(chunk)?;
        let id: i64 = t
            .query_one(
                "INSERT INTO changes (router, actor, rows) VALUES ($1, $2, $3) RETURNING id",
                &[&doc.router, &actor, &body],
            )
            .await?
            .get(0);
        out.changes.push(id);
    }
    let last = out.changes.last().copied().unwrap_or(0);
    t.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &last.to_string()])
        .await?;
    t.commit().await?;
    Ok(out)
}

/// `registry import`'s summary as the operator reads it.
pub fn render(r: &Imported) -> String {
    let line = |what: &str, c: &Counts| {
        format!(
            "{what:<9} {} created, {} unchanged, {} conflicting\n",
            c.created, c.unchanged, c.conflicting
        )
    };
    let mut s = format!("import of router {}:\n", r.router);
    s += &line("users", &r.users);
    s += &line("bindings", &r.bindings);
    s += &line("entries", &r.entries);
    s += &line("audit", &r.audit);
    if r.changes.is_empty() {
        s += "nothing written: the fleet already holds this registry\n";
    } else {
        if r.overwritten && !r.conflicts.is_empty() {
            s += &format!(
                "overwritten in the fleet:\n  {}\n",
                r.conflicts.join("\n  ")
            );
        }
        s += &format!(
            "written as fleet change(s) {}: every router applies them from the log\n",
            r.changes
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> Document {
        let at = Timestamp::from_second(1_700_000_000).unwrap();
        Document {
            format: FORMAT.into(),
            version: VERSION,
            router: "bras-old".into(),
            exported_at: at,
            users: vec![User {
                name: "alice".into(),
                policy: Policy::Unblocked,
                until: None,
                reason: Some("ticket 1".into()),
                set_by: "uid0 root".into(),
                set_at: at,
                hold: None,
            }],
            bindings: vec![],
            entries: vec![Entry {
                kind: EntryKind::Exempt,
                prefix: "100.64.0.9/32".parse().unwrap(),
                until: None,
                note: Some("monitoring".into()),
                added_by: "uid0 root".into(),
                added_at: at,
            }],
            audit: vec![AuditRecord {
                id: 1,
                at,
                actor: "uid0 root".into(),
                action: "unblock".into(),
                subject: "alice".into(),
                old: None,
                new: Some("unblocked".into()),
                reason: Some("ticket 1".into()),
            }],
        }
    }

    /// A file's texts reach operators' terminals (`user show`, `exempt list`, `audit`): the
    /// control characters the verbs refuse (an escape sequence) are refused in a file too.
    #[test]
    fn control_characters_in_a_files_texts_are_refused() {
        let text = |d: &Document| serde_json::to_string(d).unwrap();
        assert!(parse(&text(&doc())).is_ok());
        let esc = "\u{1b}]0;owned\u{7}\u{1b}[2J".to_string();
        let mut bad: Vec<Document> = Vec::new();
        let mut d = doc();
        d.users[0].reason = Some(esc.clone());
        bad.push(d);
        let mut d = doc();
        d.users[0].set_by = esc.clone();
        bad.push(d);
        let mut d = doc();
        d.users[0].hold = Some(crate::registry::store::Hold {
            reason: esc.clone(),
            by: "x".into(),
            at: d.users[0].set_at,
        });
        d.users[0].policy = Policy::Blocked;
        bad.push(d);
        let mut d = doc();
        d.entries[0].note = Some(esc.clone());
        bad.push(d);
        let mut d = doc();
        d.audit[0].new = Some(esc.clone());
        bad.push(d);
        let mut d = doc();
        d.audit[0].actor = esc.clone();
        bad.push(d);
        for d in bad {
            let e = parse(&text(&d)).expect_err("an escape sequence in a file");
            assert!(format!("{e:#}").contains("control character"), "{e:#}");
        }
    }
}
