//! The fleet registry on PostgreSQL (issue 11): a private PostgreSQL server from Debian's
//! packages (see `port25_tests::pg`), real daemons in the namespace lab, real TCP.

use std::time::{Duration, Instant};

use port25_ctl::{control::reply::UserDetail, registry::store::Policy};
use port25_tests::{
    lab::{self, Lab},
    pg::Postgres,
    require_root, text,
};

#[test]
fn private_postgres_runs_as_nobody_and_stops() {
    let Some(pg) = Postgres::start() else { return };
    assert_eq!(pg.psql("SELECT 1 + 1"), "2");
    assert_eq!(pg.psql("SELECT current_user"), "port25");
    let uid = std::fs::metadata(pg.path().join("data/PG_VERSION"))
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap();
    assert_ne!(uid, 0, "the cluster belongs to nobody");
    pg.kill();
    pg.start_server();
    assert_eq!(pg.psql("SELECT 2"), "2");
}

const XDP: &str = "  - name: rs\n    hook: xdp\n    xdp_mode: native";
/// alice's address in the lab's subscriber namespace.
const ALICE4: &str = "100.64.0.2";

fn registry(pg: &Postgres, router: &str) -> String {
    format!(
        "registry:\n  postgres: \"{}\"\n  router: {router}\n",
        pg.conn_string()
    )
}

fn ok(lab: &Lab, args: &[&str]) -> String {
    let o = lab.ctl(args);
    assert!(
        o.status.success(),
        "port25-ctl {args:?} should succeed: {}",
        text(&o)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn smtp(lab: &Lab, src: &str) -> bool {
    lab.can_connect(src.parse().unwrap(), lab::v4().ext, 25)
}

fn effective(lab: &Lab, user: &str) -> Policy {
    let show: UserDetail = lab.reply(&["user", "show", user]);
    show.user.effective
}

#[test]
fn a_policy_change_is_the_fleets_and_fails_clearly_with_the_database_down() {
    require_root!();
    let Some(pg) = Postgres::start() else { return };
    let mut lab = Lab::new(XDP);
    lab.write_config(&registry(&pg, "bras-a"));
    lab.start_daemon();
    // A session is the router's own: recorded locally, not a fleet change.
    ok(&lab, &["session", "up", "alice", ALICE4, "--id", "a1"]);
    assert_eq!(pg.psql("SELECT count(*) FROM changes"), "0");
    assert!(!smtp(&lab, ALICE4));
    ok(&lab, &["unblock", "alice", "--reason", "ticket 1"]);
    assert!(smtp(&lab, ALICE4), "the unblock reached this router's maps");
    assert_eq!(
        pg.psql("SELECT policy, reason FROM users WHERE name = 'alice'"),
        "unblocked|ticket 1"
    );
    assert_eq!(
        pg.psql("SELECT router, rows->0->>'op', rows->0->'user'->>'name' FROM changes"),
        "bras-a|put_user|alice"
    );
    assert_eq!(
        pg.psql("SELECT router, action FROM audit WHERE subject = 'alice'"),
        "bras-a|unblock"
    );
    assert_eq!(pg.psql("SELECT version FROM schema_version"), "1");

    pg.kill();
    let t = Instant::now();
    let err = lab.fails_with(&["block", "alice"], 1);
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "a write with the database down fails at once: {:?}",
        t.elapsed()
    );
    assert!(
        err.contains("fleet registry PostgreSQL") && err.contains(&pg.conn_string()),
        "the error names the database: {err}"
    );
    assert!(smtp(&lab, ALICE4), "nothing changed in the maps");
    assert_eq!(
        effective(&lab, "alice"),
        Policy::Unblocked,
        "nor in the replica"
    );
    let err = lab.fails_with(&["unblock", "bob", "--new"], 1);
    assert!(err.contains("fleet registry"), "{err}");
    // Session events carry on without the database.
    ok(&lab, &["session", "down", "--id", "a1"]);
    ok(&lab, &["session", "up", "alice", ALICE4, "--id", "a2"]);
    assert!(smtp(&lab, ALICE4), "enforcement from the local policy");
    // Back: the next change goes through.
    pg.start_server();
    ok(&lab, &["block", "alice"]);
    assert!(!smtp(&lab, ALICE4));
    assert_eq!(
        pg.psql("SELECT policy FROM users WHERE name = 'alice'"),
        "blocked"
    );
    assert_eq!(pg.psql("SELECT count(*) FROM changes"), "2");
}

#[test]
fn a_newer_fleet_schema_is_refused_at_start() {
    require_root!();
    let Some(pg) = Postgres::start() else { return };
    pg.psql("CREATE TABLE schema_version (version INTEGER NOT NULL); INSERT INTO schema_version VALUES (99)");
    let mut lab = Lab::new(XDP);
    lab.write_config(&registry(&pg, "bras-a"));
    let log = lab
        .try_start_daemon()
        .expect_err("a newer schema is refused");
    assert!(
        log.contains("version 99, newer than this port25-ctl knows"),
        "{log}"
    );
    assert_eq!(pg.psql("SELECT version FROM schema_version"), "99");
}
