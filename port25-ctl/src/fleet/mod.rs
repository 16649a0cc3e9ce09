//! A fleet's shared registry on PostgreSQL (`registry:` in the config).
//!
//! PostgreSQL is the fleet's source of truth and its ordered change log; each router's SQLite
//! registry stays its local replica of the fleet policy and the sole authority for its own
//! sessions. So the read verbs, a restart with the database down, session events and timed
//! expiries work locally, as without a fleet.
//!
//! A policy change (unblock, block, hold, bind, exempt, user add/remove...) runs in one
//! PostgreSQL transaction under one advisory lock (all policy writes of the fleet, one at a
//! time, so change ids commit in id order): the replica first catches up with the log, the
//! registry rules run on it, their row writes go to the fleet's tables and one `changes` row,
//! `NOTIFY port25_changes`, commit; then the same transaction commits locally with the change
//! id. Other routers' followers (LISTEN, and a periodic poll) apply the change in their
//! single writer, in id order, once (an id at or below the replica's mark is skipped).

pub mod export;
pub mod helpdesk;
pub mod prune;
pub mod routers;
pub mod schema;
pub mod snapshot;
pub mod stats;
pub mod tls;
mod tx;

use std::{
    future::Future,
    sync::{mpsc as std_mpsc, Arc},
    time::Duration,
};

use anyhow::{anyhow, Context as _, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client};
use tracing::{info, warn};

pub use tx::FleetTx;

use crate::{
    config::Registry,
    net::Prefix,
    registry::store::{AuditRecord, Binding, Entry, EntryKind, Session, Tx, User},
};

/// The NOTIFY channel of the change log; the payload is the change id.
pub const CHANNEL: &str = "port25_changes";
/// `pg_advisory_xact_lock` key held by every policy write of the fleet.
const WRITE_LOCK: i64 = 0x7032_3566_7772; // "p25fwr"
/// A policy write, or a catch-up read, that takes longer fails: the operator hears at once
/// that the database is unreachable rather than waiting on it.
pub const TIMEOUT: Duration = Duration::from_secs(2);
/// The follower's safety net: the log is read this often even without a notification.
pub const POLL: Duration = Duration::from_secs(5);

/// One row-level write of a change, as the fleet's tables and every replica apply it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Row {
    PutUser {
        user: User,
    },
    DeleteUser {
        name: String,
    },
    /// A user first seen in a session on some router, registered fleet-wide as blocked if
    /// no router knows them yet: `unblock` then finds them everywhere. Never overwrites.
    EnsureUser {
        user: User,
    },
    PutBinding {
        binding: Binding,
    },
    DeleteBinding {
        binding: Binding,
    },
    PutEntry {
        entry: Entry,
    },
    DeleteEntry {
        kind: EntryKind,
        prefix: Prefix,
    },
    Audit {
        record: AuditRecord,
    },
}

/// One entry of the change log.
#[derive(Debug, Clone)]
pub struct Change {
    pub id: i64,
    pub router: String,
    pub rows: Vec<Row>,
}

/// Applies a change's rows to a replica. Idempotent (upserts, deletes), except the audit
/// records, which the replica's mark keeps from being appended twice.
pub fn apply_rows(tx: &mut dyn Tx, rows: &[Row]) -> Result<()> {
    for row in rows {
        match row {
            Row::PutUser { user } => tx.put_user(user)?,
            Row::EnsureUser { user } => {
                if tx.user(&user.name)?.is_none() {
                    tx.put_user(user)?;
                }
            }
            Row::DeleteUser { name } => {
                // The user's sessions on this router go with them (as `user remove` does
                // on the router it was given to).
                for s in tx.sessions_of(name)? {
                    tx.delete_session(&s.id)?;
                }
                tx.delete_user(name)?;
            }
            Row::PutBinding { binding } => tx.put_binding(binding)?,
            Row::DeleteBinding { binding } => {
                tx.delete_binding(binding)?;
            }
            Row::PutEntry { entry } => tx.put_entry(entry)?,
            Row::DeleteEntry { kind, prefix } => {
                tx.delete_entry(*kind, prefix)?;
            }
            Row::Audit { record } => tx.append_audit(record)?,
        }
    }
    Ok(())
}

/// The connection to the fleet's database, driven on a runtime of its own: the daemon's
/// writer is synchronous (it blocks on SQLite too), so it waits for each answer, bounded by
/// [`TIMEOUT`], on a plain channel, never inside the daemon's runtime.
pub struct Fleet {
    /// Always `Some` until dropped (a runtime must not be dropped inside the daemon's own).
    rt: Option<tokio::runtime::Runtime>,
    conn: tokio_postgres::Config,
    /// TLS as the connection string asks (see [`tls`]).
    tls: tls::Connector,
    client: Option<Conn>,
    /// A transaction is open on `client` (the write lock is held).
    in_tx: bool,
    pub router: String,
    /// How errors and `status` name the database (never with a password).
    pub name: String,
    /// Users first seen in a session, to register fleet-wide: sent without waiting, published
    /// by the follower on its own connection (see [`Fleet::ensure_users`]).
    new_users: mpsc::UnboundedSender<Publish>,
    new_users_rx: Option<mpsc::UnboundedReceiver<Publish>>,
    /// For `/metrics` and `status`.
    pub stats: Arc<stats::FleetStats>,
}

/// What a session event leaves for the follower to publish, in the order of the events.
#[derive(Debug)]
pub enum Publish {
    /// A user first seen in a session (see [`Fleet::ensure_users`]).
    User(User),
    /// One of this router's sessions, as it is now (`None`: gone).
    Session(String, Option<Session>),
    /// All of this router's sessions (at start): the published set is replaced.
    AllSessions(Vec<Session>),
}

struct Conn {
    client: Arc<Client>,
    /// The write path's statements, prepared once per connection (see [`Stmts`]).
    stmts: Arc<Stmts>,
    /// Drives the socket; aborted to drop a connection that timed out mid-transaction (the
    /// server then rolls back and releases the lock).
    driver: tokio::task::AbortHandle,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Fleet {
    pub fn new(reg: &Registry) -> Result<Fleet> {
        let (mut conn, tls) = tls::parse(&reg.postgres)
            .map_err(|e| anyhow!("registry.postgres: not a connection string: {e}"))?;
        let tls = tls
            .connector()
            .with_context(|| format!("fleet registry {}", reg.describe()))?;
        if let Some(pw) = reg.password().map_err(|e| anyhow!(e))? {
            conn.password(pw);
        }
        conn.connect_timeout(TIMEOUT);
        conn.application_name("port25-ctl");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("port25-fleet")
            .enable_all()
            .build()?;
        let (new_users, new_users_rx) = mpsc::unbounded_channel();
        Ok(Fleet {
            stats: Arc::default(),
            new_users,
            new_users_rx: Some(new_users_rx),
            rt: Some(rt),
            conn,
            tls,
            client: None,
            in_tx: false,
            router: reg.router_name(),
            name: reg.describe(),
        })
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt
            .as_ref()
            .expect("the fleet runtime lives as long as the Fleet")
    }

    /// The connection string with a password from `password_file`, for a second connection.
    pub fn conn_config(&self) -> tokio_postgres::Config {
        self.conn.clone()
    }

    /// The TLS connector for a connection of [`Fleet::conn_config`].
    pub fn connector(&self) -> tls::Connector {
        self.tls.clone()
    }

    /// An error as the operator reads it: which database, and what happened.
    fn named(&self, e: impl Into<anyhow::Error>) -> anyhow::Error {
        e.into().context(format!("fleet registry {}", self.name))
    }

    fn connect(&mut self) -> Result<Arc<Client>> {
        self.connect_prepared().map(|(c, _)| c)
    }

    /// The connection, with its prepared statements.
    fn connect_prepared(&mut self) -> Result<(Arc<Client>, Arc<Stmts>)> {
        if let Some(c) = &self.client {
            if !c.client.is_closed() {
                return Ok((c.client.clone(), c.stmts.clone()));
            }
            self.client = None;
            self.in_tx = false;
        }
        let cfg = self.conn.clone();
        let tls = self.tls.clone();
        let (tx, rx) = std_mpsc::channel();
        self.rt().spawn(async move {
            let r = async {
                let (client, conn) = cfg.connect(tls).await?;
                let driver = tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        warn!("fleet registry connection: {e}");
                    }
                })
                .abort_handle();
                client
                    .batch_execute(&format!(
                        "SET statement_timeout = {0}; SET lock_timeout = {0}",
                        TIMEOUT.as_millis()
                    ))
                    .await?;
                schema::migrate(&client).await?;
                let stmts = Stmts::prepare(&client).await?;
                Ok::<_, anyhow::Error>(Conn {
                    client: Arc::new(client),
                    stmts: Arc::new(stmts),
                    driver,
                })
            }
            .await;
            let _ = tx.send(r);
        });
        let conn = match rx.recv_timeout(TIMEOUT + Duration::from_secs(1)) {
            Ok(r) => r.map_err(|e| self.named(e))?,
            Err(_) => return Err(self.named(anyhow!("no answer within {TIMEOUT:?}"))),
        };
        let r = (conn.client.clone(), conn.stmts.clone());
        self.client = Some(conn);
        Ok(r)
    }

    /// Runs `f` on the connection and waits for it, at most [`TIMEOUT`] (plus the connect).
    fn run<T, F, Fut>(&mut self, f: F) -> Result<T>
    where
        F: FnOnce(Arc<Client>) -> Fut,
        Fut: Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        self.run_prepared(|c, _| f(c))
    }

    /// As [`Fleet::run`], `f` also given the connection's prepared statements.
    fn run_prepared<T, F, Fut>(&mut self, f: F) -> Result<T>
    where
        F: FnOnce(Arc<Client>, Arc<Stmts>) -> Fut,
        Fut: Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let (client, stmts) = self.connect_prepared()?;
        let fut = f(client, stmts);
        let (tx, rx) = std_mpsc::channel();
        self.rt().spawn(async move {
            let _ = tx.send(fut.await);
        });
        match rx.recv_timeout(TIMEOUT + Duration::from_millis(500)) {
            Ok(Ok(v)) => {
                self.stats.contact();
                Ok(v)
            }
            Ok(Err(e)) => {
                if self.client.as_ref().is_some_and(|c| c.client.is_closed()) {
                    self.drop_connection();
                }
                Err(self.named(e))
            }
            Err(_) => {
                self.drop_connection();
                Err(self.named(anyhow!("no answer within {TIMEOUT:?}")))
            }
        }
    }

    fn drop_connection(&mut self) {
        self.client = None;
        self.in_tx = false;
    }

    /// Connects (migrating the schema if it is older) and says whether the database answers.
    pub fn check(&mut self) -> Result<()> {
        self.connect().map(|_| ())
    }

    /// Opens the write transaction: from here until [`Fleet::publish`] or
    /// [`Fleet::rollback`], no other router writes policy.
    pub fn begin(&mut self) -> Result<()> {
        if self.in_tx {
            self.rollback();
        }
        self.run(|c| async move {
            // One round trip: each costs the write its share of the helpdesk's wait.
            c.batch_execute(&begin_locked()).await?;
            Ok(())
        })?;
        self.in_tx = true;
        Ok(())
    }

    /// [`Fleet::begin`], and what the log holds after `mark` as read under the lock, in one
    /// round trip (the two requests pipelined: the read runs once the lock is held).
    pub fn begin_at(&mut self, mark: i64) -> Result<Log> {
        if self.in_tx {
            self.rollback();
        }
        let r = self.run_prepared(move |c, st| async move {
            let begin = begin_locked();
            let (begun, log) =
                futures_util::future::join(c.batch_execute(&begin), read_log(&c, &st, mark)).await;
            begun?;
            log
        });
        match r {
            Ok(read) => {
                self.in_tx = true;
                self.log_state(mark, read)
            }
            Err(e) => {
                // The BEGIN may have gone through: a fresh connection is clean.
                self.drop_connection();
                Err(e)
            }
        }
    }

    /// What the log holds after `mark`: its changes, or the fleet's whole state when they
    /// were pruned (see [`Fleet::state_read`]). One statement reads both, so no prune can slip
    /// between them.
    pub fn log_after(&mut self, mark: i64) -> Result<Log> {
        let read = self
            .run_prepared(move |c, st| async move { read_log(&c, &st, mark).await })
            .inspect_err(|_| {
                // The read is a statement prepared at connect: one the server can no longer
                // run (its columns' types changed: "cached plan must not change result
                // type") fails on every call until the connection is new, and the follower
                // would never again see a change made elsewhere.
                self.drop_connection();
            })?;
        self.log_state(mark, read)
    }

    fn log_state(
        &mut self,
        mark: i64,
        (changes, through): (Vec<Change>, Option<i64>),
    ) -> Result<Log> {
        self.stats.seen(changes.last().map_or(mark, |c| c.id));
        if through.is_none_or(|t| mark >= t) {
            return Ok(Log::Changes(changes));
        }
        self.state_read().map(Log::Gap)
    }

    /// Ends an open write transaction without a change (a refusal, a failure).
    pub fn rollback(&mut self) {
        if !self.in_tx {
            return;
        }
        self.in_tx = false;
        if let Err(e) = self.run(|c| async move { Ok(c.batch_execute("ROLLBACK").await?) }) {
            warn!("{e:#}; dropping the connection");
            self.drop_connection();
        }
    }

    /// Writes `rows` to the fleet's tables and the change log, notifies, and commits the
    /// open write transaction. Returns the change id.
    pub fn publish(&mut self, actor: String, rows: Vec<Row>) -> Result<i64> {
        anyhow::ensure!(self.in_tx, "no fleet write transaction is open");
        let router = self.router.clone();
        let r = self.run_prepared(move |c, st| async move {
            let body = serde_json::to_value(&rows)?;
            // The rows and the change (with its notification, sent at commit) in one round
            // trip: pipelined, run in this order. The first error ends the transaction
            // (the connection is dropped below), and COMMIT is sent only once every write
            // has answered.
            let writes = futures_util::future::try_join_all(
                rows.iter().map(|row| write_row(&*c, &st, &router, row)),
            );
            let change = async {
                Ok::<_, anyhow::Error>(
                    c.query_one(&st.change, &[&router, &actor, &body, &CHANNEL])
                        .await?
                        .get::<_, i64>(0),
                )
            };
            let (_, id) = futures_util::future::try_join(writes, change).await?;
            c.batch_execute("COMMIT").await?;
            Ok(id)
        });
        self.in_tx = false;
        if r.is_err() {
            // Whatever state the server's transaction is in, a fresh connection is clean.
            self.drop_connection();
        }
        r
    }

    /// Brings a replica up to the log's end (at start, before the maps are computed from
    /// it): each batch of changes in one local transaction.
    pub fn catch_up(&mut self, store: &mut dyn crate::registry::store::Store) -> Result<usize> {
        // A replica that never followed the log starts from the fleet's tables.
        if let Some(l) = self.bootstrap(store)? {
            info!(
                users = l.users,
                mark = l.mark,
                "fleet registry: replica loaded from a snapshot"
            );
        }
        self.stats.applied(store.begin()?.replica_mark()?, false);
        let mut n = 0;
        loop {
            let mark = store.begin()?.replica_mark()?;
            let changes = match self.log_after(mark)? {
                Log::Changes(c) => c,
                Log::Gap(state) => {
                    warn!(mark, through = state.mark, "the fleet's change log was pruned past this replica's mark: reloading the fleet's policy whole");
                    let mut tx = store.begin()?;
                    prune::reload(&mut *tx, &state)?;
                    tx.commit()?;
                    // status and /metrics: the replica is at the reloaded mark.
                    self.stats.applied(state.mark, false);
                    n += 1;
                    continue;
                }
            };
            if changes.is_empty() {
                return Ok(n);
            }
            let mut tx = store.begin()?;
            for c in &changes {
                apply_rows(&mut *tx, &c.rows)
                    .with_context(|| format!("applying fleet change {}", c.id))?;
                tx.set_replica_mark(c.id)?;
            }
            tx.commit()?;
            for c in &changes {
                self.stats.applied(c.id, true);
            }
            n += changes.len();
        }
    }

    /// Starts the follower: a connection of its own that LISTENs, and wakes the writer on a
    /// notification, on (re)connecting, and every [`POLL`]. Wakes carry nothing: the writer
    /// reads the log itself, in order.
    pub fn follow(&mut self) -> mpsc::Receiver<()> {
        let (tx, rx) = mpsc::channel(1);
        let cfg = self.conn.clone();
        let name = self.name.clone();
        let router = self.router.clone();
        let users = self.new_users_rx.take().expect("one follower per Fleet");
        let tls = self.tls.clone();
        let stats = self.stats.clone();
        self.rt()
            .spawn(follower(cfg, tls, name, router, users, tx, stats));
        rx
    }

    /// Queues users first seen in a session on this router for the fleet, as blocked and
    /// "create if absent" (a session's own unblock stays on its router). Never waits nor
    /// fails: the follower publishes them when the database answers, again after a
    /// reconnect if it did not, and a daemon's start queues every user with a session here.
    pub fn ensure_users(&self, users: impl IntoIterator<Item = User>) {
        for u in users {
            let _ = self.new_users.send(Publish::User(User {
                policy: crate::registry::store::Policy::Blocked,
                until: None,
                reason: None,
                hold: None,
                ..u
            }));
        }
    }

    /// Queues this router's sessions for the helpdesk's fleet view (`user show`): never
    /// waits nor fails; the follower writes them when the database answers, and all of
    /// them again after a reconnect.
    pub fn publish_sessions(&self, p: Publish) {
        let _ = self.new_users.send(p);
    }

    /// The fleet's row of `user` (in the write transaction: as the lock holder sees it).
    pub fn user(&mut self, name: &str) -> Result<Option<User>> {
        let name = name.to_string();
        self.run(move |c| async move {
            let sql = format!("SELECT {} FROM users WHERE name = $1", snapshot::USER_COLS);
            match c.query_opt(&sql, &[&name]).await? {
                Some(r) => Ok(Some(snapshot::user_from_row(&r)?)),
                None => Ok(None),
            }
        })
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.client = None;
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Opens a policy write: the transaction and the fleet's write lock.
fn begin_locked() -> String {
    format!("BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK})")
}

/// The log after a mark: the changes (at most 10,000, oldest first) and how far the log was
/// pruned, in one statement (one snapshot); at least one row, `id` NULL when no change.
const READ_LOG: &str = "SELECT c.id, c.router, c.rows, p.through FROM (SELECT 1) one \
     LEFT JOIN changes_pruned p ON p.one = 1 \
     LEFT JOIN LATERAL (SELECT id, router, rows FROM changes WHERE id > $1 ORDER BY id \
     LIMIT 10000) c ON true ORDER BY c.id";

/// The statements of a policy write, prepared once per connection (pipelined: one round
/// trip at connect), so each costs one round trip, not a Parse and then an Execute.
pub(crate) struct Stmts {
    read_log: tokio_postgres::Statement,
    put_user: tokio_postgres::Statement,
    delete_user: tokio_postgres::Statement,
    put_binding: tokio_postgres::Statement,
    delete_binding: tokio_postgres::Statement,
    put_entry: tokio_postgres::Statement,
    delete_entry: tokio_postgres::Statement,
    audit: tokio_postgres::Statement,
    change: tokio_postgres::Statement,
}

impl Stmts {
    /// Prepared on `c`'s connection (a transaction's statements are its connection's).
    async fn prepare(c: &(impl tokio_postgres::GenericClient + Sync)) -> Result<Stmts> {
        let sql = [
            READ_LOG,
            "INSERT INTO users (name, policy, until, reason, set_by, set_at, hold_reason, \
             hold_by, hold_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (name) DO UPDATE SET policy = EXCLUDED.policy, \
             until = EXCLUDED.until, reason = EXCLUDED.reason, set_by = EXCLUDED.set_by, \
             set_at = EXCLUDED.set_at, hold_reason = EXCLUDED.hold_reason, \
             hold_by = EXCLUDED.hold_by, hold_at = EXCLUDED.hold_at",
            "DELETE FROM users WHERE name = $1",
            "INSERT INTO bindings (user_name, prefix) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            "DELETE FROM bindings WHERE user_name = $1 AND prefix = $2",
            "INSERT INTO entries (kind, prefix, until, note, added_by, added_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (kind, prefix) DO UPDATE SET \
             until = EXCLUDED.until, note = EXCLUDED.note, added_by = EXCLUDED.added_by, \
             added_at = EXCLUDED.added_at",
            "DELETE FROM entries WHERE kind = $1 AND prefix = $2",
            "INSERT INTO audit (router, at, actor, action, subject, old, new, reason) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            // The change and its notification (sent at commit) in one statement.
            "WITH c AS (INSERT INTO changes (router, actor, rows) VALUES ($1, $2, $3) \
             RETURNING id) SELECT id, pg_notify($4, id::text) FROM c",
        ];
        let mut p = futures_util::future::try_join_all(sql.iter().map(|q| c.prepare(q)))
            .await?
            .into_iter();
        let mut next = || p.next().expect("one statement per SQL text");
        Ok(Stmts {
            read_log: next(),
            put_user: next(),
            delete_user: next(),
            put_binding: next(),
            delete_binding: next(),
            put_entry: next(),
            delete_entry: next(),
            audit: next(),
            change: next(),
        })
    }
}

/// What a replica at some mark finds in the log.
#[derive(Debug)]
pub enum Log {
    /// The changes after the mark, oldest first (at most a batch).
    Changes(Vec<Change>),
    /// The changes after the mark were pruned: the fleet's whole policy instead.
    Gap(prune::FleetState),
}

/// The changes after `mark` and how far the log was pruned ([`READ_LOG`]).
async fn read_log(c: &Client, st: &Stmts, mark: i64) -> Result<(Vec<Change>, Option<i64>)> {
    let rows = c.query(&st.read_log, &[&mark]).await?;
    let through = rows.first().and_then(|r| r.get::<_, Option<i64>>(3));
    let changes = rows
        .into_iter()
        .filter_map(|r| {
            let id: i64 = r.get::<_, Option<i64>>(0)?;
            let body: serde_json::Value = r.get(2);
            Some(
                serde_json::from_value(body)
                    .with_context(|| format!("fleet change {id} is unreadable"))
                    .map(|rows| Change {
                        id,
                        router: r.get(1),
                        rows,
                    }),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((changes, through))
}

async fn write_row(
    c: &(impl tokio_postgres::GenericClient + Sync),
    st: &Stmts,
    router: &str,
    row: &Row,
) -> Result<()> {
    fn ts(t: jiff::Timestamp) -> i64 {
        t.as_nanosecond().clamp(i64::MIN as i128, i64::MAX as i128) as i64
    }
    match row {
        Row::PutUser { user: u } => {
            c.execute(
                &st.put_user,
                &[
                    &u.name,
                    &u.policy.as_str(),
                    &u.until.map(ts),
                    &u.reason,
                    &u.set_by,
                    &ts(u.set_at),
                    &u.hold.as_ref().map(|h| h.reason.clone()),
                    &u.hold.as_ref().map(|h| h.by.clone()),
                    &u.hold.as_ref().map(|h| ts(h.at)),
                ],
            )
            .await?;
        }
        Row::DeleteUser { name } => {
            c.execute(&st.delete_user, &[name]).await?;
        }
        Row::EnsureUser { .. } => {
            // Only the follower writes these, with `ensure_users` (it needs to know which
            // were absent).
            anyhow::bail!("a create-if-absent row is published by the follower only");
        }
        Row::PutBinding { binding: b } => {
            c.execute(&st.put_binding, &[&b.user, &b.prefix.to_string()])
                .await?;
        }
        Row::DeleteBinding { binding: b } => {
            c.execute(&st.delete_binding, &[&b.user, &b.prefix.to_string()])
                .await?;
        }
        Row::PutEntry { entry: e } => {
            c.execute(
                &st.put_entry,
                &[
                    &e.kind.as_str(),
                    &e.prefix.to_string(),
                    &e.until.map(ts),
                    &e.note,
                    &e.added_by,
                    &ts(e.added_at),
                ],
            )
            .await?;
        }
        Row::DeleteEntry { kind, prefix } => {
            c.execute(&st.delete_entry, &[&kind.as_str(), &prefix.to_string()])
                .await?;
        }
        Row::Audit { record: r } => {
            c.execute(
                &st.audit,
                &[
                    &router,
                    &ts(r.at),
                    &r.actor,
                    &r.action,
                    &r.subject,
                    &r.old,
                    &r.new,
                    &r.reason,
                ],
            )
            .await?;
        }
    }
    Ok(())
}

/// Holds a LISTEN connection for as long as the daemon runs, reconnecting with backoff.
async fn follower(
    cfg: tokio_postgres::Config,
    tls: tls::Connector,
    name: String,
    router: String,
    mut new_users: mpsc::UnboundedReceiver<Publish>,
    wake: mpsc::Sender<()>,
    stats: Arc<stats::FleetStats>,
) {
    use futures_util::StreamExt as _;
    // What is queued and not yet in the database; kept across reconnects.
    let mut pending = Pending::default();
    let mut backoff = Duration::from_millis(500);
    let mut down_logged = false;
    let mut first = true;
    loop {
        match cfg.connect(tls.clone()).await {
            Ok((mut client, mut conn)) => {
                let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
                let sql = format!("LISTEN {CHANNEL}");
                let listen = client.batch_execute(&sql);
                // The connection must be driven for the LISTEN to complete.
                let listened = tokio::select! {
                    r = listen => r.map_err(anyhow::Error::from),
                    m = messages.next() => Err(anyhow!("connection ended: {m:?}")),
                };
                match listened {
                    Ok(()) => {
                        if down_logged {
                            info!(registry = %name, "fleet registry reachable again: catching up");
                        }
                        down_logged = false;
                        backoff = Duration::from_millis(500);
                        stats.set_connected(true);
                        stats.contact();
                        if !std::mem::take(&mut first) {
                            stats.reconnected();
                        }
                        // Changes made while not listening: read the log now.
                        let _ = wake.try_send(());
                        let mut poll = tokio::time::interval(POLL);
                        // This router's row in `routers`: stamped at connect and each poll.
                        let mut stamp = true;
                        loop {
                            if stamp || !pending.is_empty() {
                                // The connection is driven (and notifications heard) while
                                // the router is stamped and the users are written.
                                let r = {
                                    let publish = async {
                                        if std::mem::take(&mut stamp) {
                                            if let Err(e) = routers::stamp(&client, &router).await {
                                                warn!(registry = %name, "stamping this router in the fleet registry: {e:#}");
                                            }
                                        }
                                        if pending.is_empty() {
                                            return Ok(false);
                                        }
                                        pending.write(&mut client, &router).await.map(|()| true)
                                    };
                                    tokio::pin!(publish);
                                    loop {
                                        tokio::select! {
                                            r = &mut publish => break r,
                                            m = messages.next() => match m {
                                                Some(Ok(AsyncMessage::Notification(n))) => {
                                                    heard(&stats, &n);
                                                    let _ = wake.try_send(());
                                                }
                                                Some(Ok(_)) => {}
                                                m => break Err(anyhow!("connection ended: {m:?}")),
                                            },
                                        }
                                    }
                                };
                                match r {
                                    Ok(false) => {}
                                    Ok(true) => {
                                        pending.written();
                                        pending.count(&stats);
                                    }
                                    Err(e) => {
                                        warn!(registry = %name, "publishing session users and sessions to the fleet failed, retrying: {e:#}");
                                        break;
                                    }
                                }
                            }
                            tokio::select! {
                                m = messages.next() => match m {
                                    Some(Ok(AsyncMessage::Notification(n))) => {
                                        heard(&stats, &n);
                                        let _ = wake.try_send(());
                                    }
                                    Some(Ok(_)) => {}
                                    Some(Err(e)) => { warn!(registry = %name, "fleet follower: {e}"); break; }
                                    None => break,
                                },
                                Some(p) = new_users.recv() => {
                                    pending.add(p);
                                    while let Ok(p) = new_users.try_recv() {
                                        pending.add(p);
                                    }
                                    pending.count(&stats);
                                }
                                _ = poll.tick() => {
                                    let _ = wake.try_send(());
                                    stamp = true;
                                }
                                _ = wake.closed() => return,
                            }
                        }
                    }
                    Err(e) => warn!(registry = %name, "fleet follower: LISTEN failed: {e:#}"),
                }
            }
            Err(e) => {
                if !down_logged {
                    warn!(registry = %name, "the fleet registry is unreachable ({e}): enforcing from the local replica, retrying");
                    down_logged = true;
                }
            }
        }
        stats.set_connected(false);
        if wake.is_closed() {
            return;
        }
        // Queued meanwhile: kept for the next connection.
        while let Ok(p) = new_users.try_recv() {
            pending.add(p);
        }
        // A new connection republishes every session (some writes may have been lost).
        pending.reconnected();
        pending.count(&stats);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// A notification's payload is the id of a change the database now holds.
fn heard(stats: &stats::FleetStats, n: &tokio_postgres::Notification) {
    stats.contact();
    if let Ok(id) = n.payload().parse() {
        stats.seen(id);
    }
}

/// Registers `users` fleet-wide if absent, under the write lock, as one change of those the
/// database did not have (none: no change); the change is logged and notified as any other.
async fn ensure_users(
    c: &mut Client,
    router: &str,
    users: &std::collections::BTreeMap<String, User>,
) -> Result<()> {
    if users.is_empty() {
        return Ok(());
    }
    fn ts(t: jiff::Timestamp) -> i64 {
        t.as_nanosecond().clamp(i64::MIN as i128, i64::MAX as i128) as i64
    }
    // Dropped without a commit (an error), the transaction rolls back.
    let t = c.transaction().await?;
    t.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])
        .await?;
    let mut rows = Vec::new();
    for u in users.values() {
        let added = t
            .execute(
                "INSERT INTO users (name, policy, set_by, set_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (name) DO NOTHING",
                &[&u.name, &u.policy.as_str(), &u.set_by, &ts(u.set_at)],
            )
            .await?;
        if added == 1 {
            rows.push(Row::EnsureUser { user: u.clone() });
        }
    }
    if !rows.is_empty() {
        let body = serde_json::to_value(&rows)?;
        let id: i64 = t
            .query_one(
                "INSERT INTO changes (router, actor, rows) VALUES ($1, $2, $3) RETURNING id",
                &[&router, &"session", &body],
            )
            .await?
            .get(0);
        t.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &id.to_string()])
            .await?;
    }
    t.commit().await?;
    Ok(())
}

/// The follower's queue: users to register, and this router's sessions as it knows them
/// (all of them, so a reconnect can replace the published set) with those not yet written.
#[derive(Default)]
struct Pending {
    users: std::collections::BTreeMap<String, User>,
    /// This router's live sessions; `None` until the daemon sent them all (at start).
    sessions: Option<std::collections::BTreeMap<String, Session>>,
    /// Session ids written since the last write.
    dirty: std::collections::BTreeSet<String>,
    /// The published set is to be replaced whole (at start, after a reconnect).
    all: bool,
}

impl Pending {
    fn add(&mut self, p: Publish) {
        match p {
            Publish::User(u) => {
                self.users.insert(u.name.clone(), u);
            }
            Publish::AllSessions(all) => {
                self.sessions = Some(all.into_iter().map(|s| (s.id.clone(), s)).collect());
                self.all = true;
                self.dirty.clear();
            }
            Publish::Session(id, s) => {
                let Some(live) = &mut self.sessions else {
                    return;
                };
                match s {
                    Some(s) => live.insert(id.clone(), s),
                    None => live.remove(&id),
                };
                self.dirty.insert(id);
            }
        }
    }

    /// What waits to be written, for `/metrics` and `status`.
    fn count(&self, stats: &stats::FleetStats) {
        let sessions = match (&self.sessions, self.all) {
            (Some(live), true) => live.len(),
            _ => self.dirty.len(),
        };
        stats.queue(self.users.len(), sessions);
    }

    fn is_empty(&self) -> bool {
        self.users.is_empty() && !self.all && self.dirty.is_empty()
    }

    fn reconnected(&mut self) {
        if self.sessions.is_some() {
            self.all = true;
        }
    }

    fn written(&mut self) {
        self.users.clear();
        self.dirty.clear();
        self.all = false;
    }

    async fn write(&self, c: &mut Client, router: &str) -> Result<()> {
        ensure_users(c, router, &self.users).await?;
        let Some(live) = &self.sessions else {
            return Ok(());
        };
        if !self.all && self.dirty.is_empty() {
            return Ok(());
        }
        // Dropped without a commit (an error), the transaction rolls back.
        let t = c.transaction().await?;
        if self.all {
            t.execute("DELETE FROM sessions WHERE router = $1", &[&router])
                .await?;
            for s in live.values() {
                put_session(&t, router, s).await?;
            }
        } else {
            for id in &self.dirty {
                match live.get(id) {
                    Some(s) => put_session(&t, router, s).await?,
                    None => {
                        t.execute(
                            "DELETE FROM sessions WHERE router = $1 AND id = $2",
                            &[&router, id],
                        )
                        .await?;
                    }
                }
            }
        }
        t.commit().await?;
        Ok(())
    }
}

async fn put_session(
    c: &(impl tokio_postgres::GenericClient + Sync),
    router: &str,
    s: &Session,
) -> Result<()> {
    let addrs: Vec<String> = s.addrs.iter().map(|p| p.to_string()).collect();
    let since = s
        .since
        .as_nanosecond()
        .clamp(i64::MIN as i128, i64::MAX as i128) as i64;
    c.execute(
        "INSERT INTO sessions (router, id, user_name, addrs, since, source) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (router, id) DO UPDATE SET \
         user_name = EXCLUDED.user_name, addrs = EXCLUDED.addrs, since = EXCLUDED.since, \
         source = EXCLUDED.source",
        &[&router, &s.id, &s.user, &addrs, &since, &s.source],
    )
    .await?;
    Ok(())
}
