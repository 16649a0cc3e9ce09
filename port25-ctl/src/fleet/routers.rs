//! Each router's sign of life in the fleet's `routers` table: its follower stamps it at
//! every connect and poll. A decommissioned router's published sessions would otherwise stay
//! in the helpdesk's view for ever: `user show` marks those of a router silent for longer
//! than [`STALE`], and `port25-ctl registry forget-router NAME` removes its rows.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use tokio_postgres::Client;

use super::Fleet;
use crate::registry::store::Session;

/// A router not heard of for this long is marked in `user show` (it stamps every
/// [`super::POLL`] while it runs and reaches the database).
pub const STALE: Duration = Duration::from_secs(10 * 60);

/// This router is alive and reaches the database.
pub async fn stamp(c: &Client, router: &str) -> Result<()> {
    c.execute(
        "INSERT INTO routers (name, seen_at) VALUES ($1, now()) \
         ON CONFLICT (name) DO UPDATE SET seen_at = now()",
        &[&router],
    )
    .await?;
    Ok(())
}

/// A published session, with how long its router has been silent when that is longer than
/// [`STALE`].
pub struct Published {
    pub router: String,
    pub session: Session,
    pub stale_for: Option<Duration>,
}

impl Fleet {
    /// Every router's published sessions of `user`, by router, the silent ones marked.
    pub fn sessions_marked(&mut self, user: &str) -> Result<Vec<Published>> {
        let user = user.to_string();
        self.run(move |c| async move {
            let rows = c
                .query(
                    "SELECT s.router, s.id, s.addrs, s.since, s.source, \
                     extract(epoch FROM now() - r.seen_at)::bigint \
                     FROM sessions s LEFT JOIN routers r ON r.name = s.router \
                     WHERE s.user_name = $1 ORDER BY s.router, s.id",
                    &[&user],
                )
                .await?;
            rows.into_iter()
                .map(|r| {
                    let addrs: Vec<String> = r.get(2);
                    // A router that never stamped (an older version) is not judged.
                    let silent = r.get::<_, Option<i64>>(5).map(|s| s.max(0) as u64);
                    Ok(Published {
                        router: r.get(0),
                        session: Session {
                            id: r.get(1),
                            user: user.clone(),
                            addrs: addrs
                                .iter()
                                .map(|a| a.parse())
                                .collect::<Result<_, _>>()
                                .map_err(|e| anyhow!("a published session's address: {e}"))?,
                            since: jiff::Timestamp::from_nanosecond(r.get::<_, i64>(3) as i128)?,
                            source: r.get(4),
                        },
                        stale_for: silent.map(Duration::from_secs).filter(|s| *s > STALE),
                    })
                })
                .collect()
        })
    }

    /// Removes router `name`'s published sessions and its stamp; refused while it is alive
    /// (stamped within [`STALE`]: it would publish them again). The sessions removed.
    pub fn forget_router(&mut self, name: &str) -> Result<u64> {
        let name = name.to_string();
        let r = self.run(move |c| async move {
            c.batch_execute("BEGIN").await?;
            let r = async {
                let silent: Option<i64> = c
                    .query_opt(
                        "SELECT extract(epoch FROM now() - seen_at)::bigint FROM routers \
                         WHERE name = $1 FOR UPDATE",
                        &[&name],
                    )
                    .await?
                    .map(|r| r.get(0));
                if let Some(s) = silent.filter(|s| *s <= STALE.as_secs() as i64) {
                    return Ok(Err(format!(
                        "router {name} was seen {s}s ago: it is alive and would publish its \
                         sessions again; forget it once it has been silent for {} min",
                        STALE.as_secs() / 60
                    )));
                }
                let n = c
                    .execute("DELETE FROM sessions WHERE router = $1", &[&name])
                    .await?;
                if silent.is_none() && n == 0 {
                    // A typo would otherwise read as done.
                    return Ok(Err(format!(
                        "the fleet has no router {name}: no sign of life, no published \
                         sessions (forgotten already?)"
                    )));
                }
                c.execute("DELETE FROM routers WHERE name = $1", &[&name])
                    .await?;
                Ok::<_, anyhow::Error>(Ok(n))
            }
            .await;
            match &r {
                Ok(Ok(_)) => c.batch_execute("COMMIT").await?,
                _ => c.batch_execute("ROLLBACK").await?,
            }
            r
        })?;
        match r {
            Ok(n) => Ok(n),
            Err(refused) => bail!(crate::registry::Refused(refused)),
        }
    }
}
