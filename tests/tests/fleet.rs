//! The fleet registry on PostgreSQL (issue 11): a private PostgreSQL server from Debian's
//! packages (see `port25_tests::pg`), real daemons in the namespace lab, real TCP.

use std::time::{Duration, Instant};

use port25_ctl::{
    control::{proto, reply::UserDetail},
    registry::store::Policy,
};
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
    // The password is read from its file (the test server trusts the socket: it is sent if
    // asked for), and never shown.
    let pw = lab.dir.join("pg.pass");
    std::fs::write(&pw, "s3cret-pw\n").unwrap();
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    lab.write_config(&format!(
        "{}  password_file: {}\n",
        registry(&pg, "bras-a"),
        pw.display()
    ));
    lab.start_daemon();
    let status = ok(&lab, &["--json", "status"]);
    assert!(
        status.contains(&pg.conn_string()),
        "status names the fleet registry: {status}"
    );
    // A session is the router's own: recorded locally, not a fleet policy change (alice,
    // new, is only registered fleet-wide as blocked, see the session users test).
    ok(&lab, &["session", "up", "alice", ALICE4, "--id", "a1"]);
    assert_eq!(pg.psql(POLICY_CHANGES), "0");
    assert!(!smtp(&lab, ALICE4));
    ok(&lab, &["unblock", "alice", "--reason", "ticket 1"]);
    assert!(smtp(&lab, ALICE4), "the unblock reached this router's maps");
    assert_eq!(
        pg.psql("SELECT policy, reason FROM users WHERE name = 'alice'"),
        "unblocked|ticket 1"
    );
    assert_eq!(
        pg.psql("SELECT router, rows->0->>'op', rows->0->'user'->>'name' FROM changes WHERE rows->0->>'op' <> 'ensure_user'"),
        "bras-a|put_user|alice"
    );
    assert_eq!(
        pg.psql("SELECT router, action FROM audit WHERE subject = 'alice'"),
        "bras-a|unblock"
    );
    assert_eq!(
        pg.psql("SELECT version FROM schema_version"),
        port25_ctl::fleet::schema::MIGRATIONS.len().to_string()
    );

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
    assert_eq!(pg.psql(POLICY_CHANGES), "2");
    assert!(!lab.daemon_log().contains("s3cret"), "{}", lab.daemon_log());
    assert!(!ok(&lab, &["--json", "status"]).contains("s3cret"));
}

/// The change log's policy changes (not the registrations of session users).
const POLICY_CHANGES: &str = "SELECT count(*) FROM changes WHERE rows->0->>'op' <> 'ensure_user'";

/// Polls `sql` until it answers `want`; whether it did within `within`.
fn until_db(pg: &Postgres, sql: &str, want: &str, within: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < within {
        if pg.psql(sql) == want {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn a_user_first_seen_in_a_session_is_known_to_every_router() {
    require_root!();
    let Some(pg) = Postgres::start() else { return };
    let (a, b) = two_routers(&pg);
    // alice is new on B: her session registers her fleet-wide (blocked), without --new.
    ok(&b, &["session", "up", "alice", ALICE4, "--id", "b1"]);
    assert!(!smtp(&b, ALICE4));
    let alice = "SELECT policy FROM users WHERE name = 'alice'";
    assert!(until_db(&pg, alice, "blocked", Duration::from_secs(3)));
    assert!(until_policy(&a, "alice", Policy::Blocked, Duration::from_secs(2)).is_some());
    ok(&a, &["unblock", "alice", "--reason", "helpdesk"]);
    assert!(
        until_policy(&b, "alice", Policy::Unblocked, Duration::from_secs(2)).is_some(),
        "the unblock reached B"
    );
    assert!(smtp(&b, ALICE4), "port 25 opened for alice on B (real TCP)");
    // A session's own unblock stays on its router: dave is registered blocked elsewhere.
    ok(
        &b,
        &[
            "session",
            "up",
            "dave",
            "100.64.0.4",
            "--id",
            "d1",
            "--unblock",
        ],
    );
    let dave = "SELECT policy FROM users WHERE name = 'dave'";
    assert!(until_db(&pg, dave, "blocked", Duration::from_secs(3)));
    assert!(until_policy(&a, "dave", Policy::Blocked, Duration::from_secs(2)).is_some());
    assert_eq!(effective(&b, "dave"), Policy::Unblocked);
    // A known user's next session registers nothing.
    let n = pg.psql("SELECT count(*) FROM changes");
    ok(&b, &["session", "down", "--id", "b1"]);
    ok(&b, &["session", "up", "alice", ALICE4, "--id", "b2"]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(pg.psql("SELECT count(*) FROM changes"), n);

    // The database down: the session event answers at once, its user queued; back, the
    // user is published and reaches A.
    pg.kill();
    let t = Instant::now();
    ok(&b, &["session", "up", "carol", "100.64.0.3", "--id", "c1"]);
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "a session event never waits for the database: {:?}",
        t.elapsed()
    );
    pg.start_server();
    let carol = "SELECT policy FROM users WHERE name = 'carol'";
    assert!(
        until_db(&pg, carol, "blocked", Duration::from_secs(15)),
        "carol published after the reconnect: {}",
        b.daemon_log()
    );
    assert!(until_policy(&a, "carol", Policy::Blocked, Duration::from_secs(2)).is_some());
    ok(&a, &["unblock", "carol"]);
    assert!(until_policy(&b, "carol", Policy::Unblocked, Duration::from_secs(2)).is_some());
}

/// `router:id` of every published session of `user`.
fn published(user: &str) -> String {
    format!(
        "SELECT coalesce(string_agg(router || ':' || id, ',' ORDER BY router, id), '') \
         FROM sessions WHERE user_name = '{user}'"
    )
}

#[test]
fn user_show_lists_every_routers_sessions() {
    require_root!();
    let Some(pg) = Postgres::start() else { return };
    let (a, b) = two_routers(&pg);
    ok(&a, &["session", "up", "alice", ALICE4, "--id", "a1"]);
    ok(&b, &["session", "up", "alice", "100.64.0.5", "--id", "b1"]);
    assert!(until_db(
        &pg,
        &published("alice"),
        "bras-a:a1,bras-b:b1",
        Duration::from_secs(3)
    ));
    let show: UserDetail = a.reply(&["user", "show", "alice"]);
    assert_eq!(show.sessions.len(), 1, "the local sessions: A's");
    let fleet = show.fleet.expect("a fleet view");
    assert_eq!(fleet.unavailable, None);
    let seen: Vec<String> = fleet
        .sessions
        .iter()
        .map(|s| format!("{}:{}:{}", s.router, s.session.id, s.session.addrs[0]))
        .collect();
    assert_eq!(seen, ["bras-a:a1:100.64.0.2/32", "bras-b:b1:100.64.0.5/32"]);
    let text = ok(&a, &["user", "show", "alice"]);
    assert!(text.contains("bras-b  b1  100.64.0.5"), "{text}");
    ok(&b, &["session", "down", "--id", "b1"]);
    assert!(until_db(
        &pg,
        &published("alice"),
        "bras-a:a1",
        Duration::from_secs(3)
    ));

    // The database down: user show answers from local data and says so; session events
    // carry on and are published once it is back.
    pg.kill();
    let t = Instant::now();
    let show: UserDetail = a.reply(&["user", "show", "alice"]);
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert_eq!(show.sessions.len(), 1);
    let fleet = show.fleet.expect("a fleet view");
    assert!(
        fleet
            .unavailable
            .as_deref()
            .unwrap_or("")
            .contains("fleet registry"),
        "{fleet:?}"
    );
    let text = ok(&a, &["user", "show", "alice"]);
    assert!(text.contains("fleet:     unavailable"), "{text}");
    ok(&b, &["session", "up", "alice", "100.64.0.5", "--id", "b2"]);
    ok(&a, &["session", "down", "--id", "a1"]);
    pg.start_server();
    assert!(
        until_db(
            &pg,
            &published("alice"),
            "bras-b:b2",
            Duration::from_secs(15)
        ),
        "published after the reconnect: {}",
        pg.psql(&published("alice"))
    );
    let show: UserDetail = a.reply(&["user", "show", "alice"]);
    assert_eq!(show.fleet.unwrap().sessions.len(), 1);
}

/// `port25-ctl --registry-only ARGS` on a "helpdesk host": a config with `registry:` only,
/// no daemon, no socket.
fn helpdesk(lab: &Lab, pg: &Postgres, args: &[&str]) -> std::process::Output {
    let cfg = lab.dir.join("helpdesk.yaml");
    std::fs::write(&cfg, registry(pg, "helpdesk")).unwrap();
    std::process::Command::new(lab::ctl_binary())
        .arg("--config")
        .arg(&cfg)
        .arg("--socket")
        .arg(lab.dir.join("no-daemon.sock"))
        .arg("--registry-only")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn registry_only_writes_reach_the_routers_through_the_log() {
    require_root!();
    let Some(pg) = Postgres::start() else { return };
    let (a, b) = two_routers(&pg);
    ok(&b, &["session", "up", "alice", ALICE4, "--id", "b1"]);
    assert!(!smtp(&b, ALICE4));
    let o = helpdesk(
        &a,
        &pg,
        &["unblock", "alice", "--new", "--reason", "ticket 7"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("unblocked"),
        "{}",
        text(&o)
    );
    assert!(
        until_policy(&b, "alice", Policy::Unblocked, Duration::from_secs(2)).is_some(),
        "the helpdesk's unblock reached B"
    );
    assert!(smtp(&b, ALICE4), "port 25 opened on B (real TCP)");
    assert!(until_policy(&a, "alice", Policy::Unblocked, Duration::from_secs(2)).is_some());
    assert_eq!(
        pg.psql("SELECT router, action, reason FROM audit WHERE subject = 'alice' AND action = 'unblock'"),
        "helpdesk|unblock|ticket 7"
    );
    // The rules are the routers': a held user stays closed, the refusal audited.
    ok(&a, &["block", "alice", "--hold", "--reason", "spam run"]);
    assert!(until_policy(&b, "alice", Policy::Blocked, Duration::from_secs(2)).is_some());
    let o = helpdesk(&a, &pg, &["unblock", "alice"]);
    assert!(!o.status.success(), "a held user is refused: {}", text(&o));
    assert!(!smtp(&b, ALICE4));
    let o = helpdesk(&a, &pg, &["block", "bob"]);
    assert!(
        !o.status.success(),
        "an unknown user without --new: {}",
        text(&o)
    );
    let o = helpdesk(&a, &pg, &["status"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("--registry-only takes"), "{}", text(&o));
    // The database down: a clear error naming it.
    pg.kill();
    let o = helpdesk(&a, &pg, &["block", "alice"]);
    assert!(!o.status.success());
    assert!(text(&o).contains(&pg.conn_string()), "{}", text(&o));
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

/// Polls `user show` on `lab` (the replica the daemon's writer applied; its maps are written
/// in the same step) until `user`'s effective policy is `want`; the time it took.
fn until_policy(lab: &Lab, user: &str, want: Policy, within: Duration) -> Option<Duration> {
    let client = lab.client();
    let t = Instant::now();
    while t.elapsed() < within {
        if let Ok(d) = client.call(proto::UserShow { user: user.into() }) {
            if d.user.effective == want {
                return Some(t.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

fn two_routers(pg: &Postgres) -> (Lab, Lab) {
    let mut a = Lab::new(XDP);
    a.write_config(&registry(pg, "bras-a"));
    a.start_daemon();
    let mut b = Lab::new(XDP);
    b.write_config(&registry(pg, "bras-b"));
    b.start_daemon();
    (a, b)
}

#[test]
fn a_change_through_one_router_reaches_the_other() {
    require_root!();
    let Some(pg) = Postgres::start() else { return };
    let (a, b) = two_routers(&pg);
    ok(&b, &["session", "up", "alice", ALICE4, "--id", "b1"]);
    assert!(!smtp(&b, ALICE4));
    // alice is known on B only (her session): on A she is registered with the unblock.
    ok(&a, &["unblock", "alice", "--new", "--reason", "helpdesk"]);
    assert!(
        until_policy(&b, "alice", Policy::Unblocked, Duration::from_secs(2)).is_some(),
        "the unblock reached B"
    );
    assert!(smtp(&b, ALICE4), "port 25 opened for alice on B (real TCP)");
    // She reconnects through A as well.
    ok(&a, &["session", "up", "alice", ALICE4, "--id", "a1"]);
    assert!(smtp(&a, ALICE4), "and on A");
    ok(&b, &["block", "alice"]);
    assert!(!smtp(&b, ALICE4), "closed on B");
    assert!(
        until_policy(&a, "alice", Policy::Blocked, Duration::from_secs(2)).is_some(),
        "the block reached A"
    );
    assert!(!smtp(&a, ALICE4), "closed on A (real TCP)");
    // Both audited, on both routers, in the fleet's order.
    let actions = |lab: &Lab| {
        let log: port25_ctl::control::reply::AuditLog = lab.reply(&["audit", "--user", "alice"]);
        log.records
            .into_iter()
            .filter(|r| r.action == "unblock" || r.action == "block")
            .map(|r| r.action)
            .collect::<Vec<_>>()
    };
    assert_eq!(actions(&a), ["unblock", "block"]);
    assert_eq!(actions(&b), ["unblock", "block"]);
    assert_eq!(
        pg.psql("SELECT string_agg(router || ':' || action, ',' ORDER BY id) FROM audit WHERE action IN ('unblock', 'block')"),
        "bras-a:unblock,bras-b:block"
    );

    // Propagation A -> B: from A's acknowledgement to B's writer having applied it.
    let ca = a.client();
    let mut took = Vec::new();
    for i in 0..50 {
        let (want, t) = if i % 2 == 0 {
            let t = Instant::now();
            ca.call(proto::Unblock {
                user: "alice".into(),
                for_secs: None,
                until: None,
                reason: None,
                new: false,
            })
            .unwrap();
            (Policy::Unblocked, t)
        } else {
            let t = Instant::now();
            ca.call(proto::Block {
                user: "alice".into(),
                reason: None,
                new: false,
                hold: false,
            })
            .unwrap();
            (Policy::Blocked, t)
        };
        let acked = t.elapsed();
        let seen = until_policy(&b, "alice", want, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("change {i} never reached B"));
        took.push((acked, acked + seen));
    }
    let mut write: Vec<_> = took.iter().map(|t| t.0).collect();
    let mut prop: Vec<_> = took.iter().map(|t| t.1).collect();
    write.sort();
    prop.sort();
    let pct = |v: &[Duration], p: usize| v[(v.len() * p / 100).min(v.len() - 1)];
    eprintln!(
        "MEASURED fleet (50 changes): policy write on A p50 {:?} p99 {:?}; A -> B applied p50 {:?} p99 {:?}",
        pct(&write, 50),
        pct(&write, 99),
        pct(&prop, 50),
        pct(&prop, 99)
    );
    assert!(
        pct(&prop, 99) < Duration::from_secs(1),
        "p99 {:?}",
        pct(&prop, 99)
    );
}

/// The users as the fleet's database has them: `name|policy`, by name.
fn db_users(pg: &Postgres) -> Vec<String> {
    pg.psql("SELECT name || '|' || policy FROM users ORDER BY name")
        .lines()
        .map(str::to_string)
        .collect()
}

/// The users as a router's replica has them, in the same form.
fn replica_users(lab: &Lab) -> Vec<String> {
    let list: port25_ctl::control::reply::UserList = lab.reply(&["user", "list"]);
    let mut v: Vec<String> = list
        .users
        .into_iter()
        .map(|r| format!("{}|{}", r.user.name, r.user.policy.as_str()))
        .collect();
    v.sort();
    v
}

#[test]
fn the_database_killed_and_back_every_router_catches_up() {
    require_root!();
    let Some(pg) = Postgres::start() else { return };
    let (mut a, b) = two_routers(&pg);
    ok(&a, &["unblock", "alice", "--new"]);
    ok(&a, &["session", "up", "alice", ALICE4, "--id", "a1"]);
    ok(&b, &["session", "up", "alice", ALICE4, "--id", "b1"]);
    assert!(until_policy(&b, "alice", Policy::Unblocked, Duration::from_secs(2)).is_some());
    assert!(smtp(&a, ALICE4) && smtp(&b, ALICE4));

    pg.kill();
    // Enforcement and session events carry on; a policy write fails, naming the database.
    assert!(smtp(&a, ALICE4) && smtp(&b, ALICE4));
    ok(&a, &["session", "down", "--id", "a1"]);
    assert!(
        !smtp(&a, ALICE4),
        "session down applied without the database"
    );
    ok(&a, &["session", "up", "alice", ALICE4, "--id", "a2"]);
    assert!(smtp(&a, ALICE4));
    let err = b.fails_with(&["block", "alice"], 1);
    assert!(err.contains(&pg.conn_string()), "{err}");

    // Back: B's change (made before A has reconnected) reaches A from the log.
    pg.start_server();
    ok(&b, &["block", "alice"]);
    ok(&b, &["unblock", "carol", "--new"]);
    assert!(!smtp(&b, ALICE4));
    assert!(
        until_policy(&a, "alice", Policy::Blocked, Duration::from_secs(15)).is_some(),
        "A caught up after the outage: {}",
        a.daemon_log()
    );
    assert!(!smtp(&a, ALICE4), "closed on A (real TCP)");
    assert!(until_policy(&a, "carol", Policy::Unblocked, Duration::from_secs(2)).is_some());
    assert_eq!(replica_users(&a), db_users(&pg), "A equals the database");
    assert_eq!(replica_users(&b), db_users(&pg), "B equals the database");
    // Nothing applied twice: one audit record per change on each router.
    for lab in [&a, &b] {
        let log: port25_ctl::control::reply::AuditLog = lab.reply(&["audit", "--user", "alice"]);
        let blocks = log.records.iter().filter(|r| r.action == "block").count();
        assert_eq!(blocks, 1, "{:?}", log.records);
    }

    // A restarts with the database down: it enforces from its replica.
    a.kill9();
    pg.kill();
    a.start_daemon();
    assert!(
        a.daemon_log().contains("STARTING FROM THE LOCAL REPLICA"),
        "{}",
        a.daemon_log()
    );
    assert_eq!(effective(&a, "alice"), Policy::Blocked);
    assert_eq!(effective(&a, "carol"), Policy::Unblocked);
    assert!(!smtp(&a, ALICE4), "still closed after the restart");
    ok(&a, &["session", "up", "carol", "100.64.0.3", "--id", "c1"]);
    assert!(smtp(&a, "100.64.0.3"), "carol's unblock from the replica");
    pg.start_server();
    ok(&b, &["unblock", "alice"]);
    assert!(
        until_policy(&a, "alice", Policy::Unblocked, Duration::from_secs(15)).is_some(),
        "A follows again: {}",
        a.daemon_log()
    );
    assert!(smtp(&a, ALICE4));
}

/// The verdict of the live maps of `lab` for TCP from `src` to port 25 outside.
fn verdict(lab: &Lab, src: &str) -> String {
    let v: serde_json::Value = lab.reply(&["check", src, "203.0.113.7"]);
    v["verdict"].as_str().unwrap().to_string()
}

/// `port25-ctl registry import FILE` with `lab`'s config (its `registry:`).
fn import(lab: &Lab, file: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["--json", "registry", "import", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    lab.ctl(&args)
}

fn created(out: &std::process::Output) -> Vec<u64> {
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(out)));
    ["users", "bindings", "entries", "audit"]
        .iter()
        .map(|k| v[k]["created"].as_u64().unwrap())
        .collect()
}

#[test]
fn a_routers_sqlite_registry_moves_into_the_fleet() {
    require_root!();
    let Some(pg) = Postgres::start() else { return };
    // A router on its own SQLite registry, filled through the daemon's verbs.
    let mut old = Lab::new(XDP);
    old.start_daemon();
    ok(&old, &["unblock", "alice", "--new", "--reason", "ticket 1"]);
    ok(&old, &["unblock", "bob", "--new", "--for", "2d"]);
    ok(
        &old,
        &["block", "carol", "--new", "--hold", "--reason", "spam run"],
    );
    ok(&old, &["user", "add", "erin"]);
    ok(&old, &["unblock", "erin"]);
    ok(&old, &["user", "bind", "erin", "100.64.0.6/32"]);
    ok(
        &old,
        &["exempt", "add", "100.64.0.9/32", "--note", "monitoring"],
    );
    let history: port25_ctl::control::reply::AuditLog = old.reply(&["audit", "--limit", "0"]);
    // Exported with the daemon running.
    let doc = ok(&old, &["registry", "export", "--router", "bras-old"]);
    let file = old.dir.join("reg.json");
    std::fs::write(&file, &doc).unwrap();
    let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(v["format"], "port25-registry");
    assert_eq!(v["users"].as_array().unwrap().len(), 4, "{doc}");

    // A fleet router runs while the file is imported: it applies it from the log.
    let mut b = Lab::new(XDP);
    b.write_config(&registry(&pg, "bras-b"));
    b.start_daemon();
    ok(&b, &["session", "up", "alice", ALICE4, "--id", "b1"]);
    ok(&b, &["session", "up", "bob", "100.64.0.4", "--id", "b2"]);
    ok(&b, &["session", "up", "carol", "100.64.0.3", "--id", "b3"]);
    assert!(until_db(
        &pg,
        "SELECT count(*) FROM users",
        "3",
        Duration::from_secs(3)
    ));
    assert!(!smtp(&b, ALICE4));
    // The session users are in the fleet already, blocked: alice, bob and carol (held in
    // the file) conflict; erin is new.
    let changes = pg.psql("SELECT count(*) FROM changes");
    let o = import(&b, &file, &[]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("user alice: the fleet has blocked, the file unblocked"),
        "{}",
        text(&o)
    );
    assert_eq!(
        pg.psql("SELECT count(*) FROM changes"),
        changes,
        "nothing written"
    );
    assert_eq!(pg.psql("SELECT count(*) FROM audit"), "0");
    let o = import(&b, &file, &["--overwrite"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(created(&o), [1, 1, 1, history.records.len() as u64]);

    // B enforces the imported registry (real TCP).
    assert!(until_policy(&b, "alice", Policy::Unblocked, Duration::from_secs(2)).is_some());
    assert!(smtp(&b, ALICE4), "alice's unblock");
    assert_eq!(verdict(&b, "100.64.0.4"), "pass", "bob's timed unblock");
    let bob: UserDetail = b.reply(&["user", "show", "bob"]);
    assert!(bob.user.until.is_some(), "bob's unblock is timed");
    assert!(!smtp(&b, "100.64.0.3"), "carol's hold");
    let carol: UserDetail = b.reply(&["user", "show", "carol"]);
    assert!(carol.user.hold.is_some(), "carol is held");
    assert_eq!(verdict(&b, "100.64.0.6"), "pass", "erin's binding");
    assert_eq!(verdict(&b, "100.64.0.9"), "pass", "the runtime exempt");
    assert_eq!(verdict(&b, "100.64.0.10"), "block", "and nothing more");
    assert_eq!(replica_users(&b), db_users(&pg));
    // The audit history, with its original times and actors, in the fleet and on B.
    let first = &history.records[0];
    assert_eq!(
        pg.psql(&format!(
            "SELECT at, actor, action, subject FROM audit WHERE origin = 'bras-old:{}'",
            first.id
        )),
        format!(
            "{}|{}|{}|{}",
            first.at.as_nanosecond(),
            first.actor,
            first.action,
            first.subject
        )
    );
    let on_b: port25_ctl::control::reply::AuditLog = b.reply(&["audit", "--user", "alice"]);
    assert!(
        on_b.records
            .iter()
            .any(|r| r.action == "unblock" && r.at == first.at && r.actor == first.actor),
        "{:?}",
        on_b.records
    );

    // A second import: nothing created, nothing written.
    let changes = pg.psql("SELECT count(*) FROM changes");
    let audit = pg.psql("SELECT count(*) FROM audit");
    let o = import(&b, &file, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(created(&o), [0, 0, 0, 0]);
    let o = b.ctl(&["registry", "import", file.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("nothing written"),
        "{}",
        text(&o)
    );
    assert_eq!(pg.psql("SELECT count(*) FROM changes"), changes);
    assert_eq!(pg.psql("SELECT count(*) FROM audit"), audit);

    // A policy changed in the fleet since: the file conflicts, refused whole.
    ok(&b, &["block", "alice"]);
    let changes = pg.psql("SELECT count(*) FROM changes");
    let o = import(&b, &file, &[]);
    assert!(!o.status.success());
    assert!(text(&o).contains("user alice"), "{}", text(&o));
    assert_eq!(pg.psql("SELECT count(*) FROM changes"), changes);
    assert_eq!(effective(&b, "alice"), Policy::Blocked);

    // A bad file: a clear error, nothing written.
    let bad = old.dir.join("bad.json");
    std::fs::write(&bad, doc.replace("\"port25-registry\"", "\"other\"")).unwrap();
    let o = import(&b, &bad, &[]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("not a port25 registry export"),
        "{}",
        text(&o)
    );
    std::fs::write(&bad, &doc[..doc.len() / 2]).unwrap();
    let o = import(&b, &bad, &[]);
    assert!(!o.status.success());
    assert!(text(&o).contains("bad.json"), "{}", text(&o));
    assert_eq!(pg.psql("SELECT count(*) FROM changes"), changes);
}

#[test]
fn an_import_holds_the_prefix_floor_as_exempt_add_and_user_bind() {
    require_root!();
    let Some(pg) = Postgres::start() else { return };
    let mut old = Lab::new(XDP);
    old.start_daemon();
    ok(&old, &["user", "add", "erin"]);
    ok(&old, &["unblock", "erin"]);
    ok(&old, &["user", "bind", "erin", "100.64.0.6/32"]);
    ok(&old, &["exempt", "add", "100.64.0.9/32"]);
    ok(&old, &["unblock", "alice", "--new"]);
    let doc = ok(&old, &["registry", "export", "--router", "bras-old"]);
    // A hand-edited (or hostile) file: what `exempt add` and `user bind` refuse unforced.
    let file = old.dir.join("wide.json");
    let wide = doc
        .replace("100.64.0.9/32", "0.0.0.0/0")
        .replace("100.64.0.6/32", "100.0.0.0/6");
    assert_ne!(wide, doc);
    std::fs::write(&file, &wide).unwrap();

    let mut b = Lab::new(XDP);
    b.write_config(&registry(&pg, "bras-b"));
    b.start_daemon();
    // Since the export, alice was caught spamming: held in the fleet.
    ok(
        &b,
        &["block", "alice", "--new", "--hold", "--reason", "spam run"],
    );
    ok(&b, &["session", "up", "alice", ALICE4, "--id", "b1"]);
    let changes = pg.psql("SELECT count(*) FROM changes");
    let o = import(&b, &file, &["--overwrite"]);
    assert!(!o.status.success(), "a /0 exempt from a file: {}", text(&o));
    assert!(text(&o).contains("wider than"), "{}", text(&o));
    assert!(text(&o).contains("--force-wide"), "{}", text(&o));
    assert_eq!(
        pg.psql("SELECT count(*) FROM changes"),
        changes,
        "nothing written"
    );
    assert_eq!(pg.psql("SELECT count(*) FROM entries"), "0");
    assert_eq!(pg.psql("SELECT count(*) FROM bindings"), "0");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(verdict(&b, "100.64.0.10"), "block");
    assert!(!smtp(&b, ALICE4), "port 25 stays closed");

    // Only `unhold` lifts a hold: not an import, even with --overwrite.
    let o = import(&b, &file, &["--force-wide", "--overwrite"]);
    assert!(!o.status.success(), "a held user overwritten: {}", text(&o));
    assert!(text(&o).contains("unhold"), "{}", text(&o));
    assert_eq!(
        pg.psql("SELECT count(*) FROM changes"),
        changes,
        "nothing written"
    );
    std::thread::sleep(Duration::from_millis(500));
    let alice: UserDetail = b.reply(&["user", "show", "alice"]);
    assert!(alice.user.hold.is_some(), "alice is still held");
    assert_eq!(alice.user.effective, Policy::Blocked);
    assert!(!smtp(&b, ALICE4), "port 25 stays closed for alice");

    // Forced, as `exempt add --force-wide`: written, and audited per prefix.
    ok(&b, &["unhold", "alice", "--reason", "cleaned up"]);
    let o = import(&b, &file, &["--force-wide", "--overwrite"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        pg.psql("SELECT count(*) FROM audit WHERE action = 'force_wide'"),
        "2"
    );
    let start = Instant::now();
    while verdict(&b, "100.64.0.10") != "pass" {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "the forced import applied"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A CA and a server certificate for `localhost` it signed: (CA pem, cert pem, key pem).
fn certificates() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

/// `port25-ctl --registry-only ARGS` with `postgres` as the connection string, from `lab`'s
/// router namespace (where the TLS test's server listens).
fn helpdesk_with(lab: &Lab, postgres: &str, args: &[&str]) -> std::process::Output {
    let cfg = lab.dir.join("helpdesk.yaml");
    std::fs::write(
        &cfg,
        format!("registry:\n  postgres: \"{postgres}\"\n  router: helpdesk\n"),
    )
    .unwrap();
    std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.rtr))
        .arg(lab::ctl_binary())
        .arg("--config")
        .arg(&cfg)
        .arg("--registry-only")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn tls_to_the_database_is_verified_as_the_connection_string_asks() {
    require_root!();
    let Some(pg) = Postgres::start() else { return };
    let mut lab = Lab::new(XDP);
    let (ca, cert, key) = certificates();
    let (other_ca, ..) = certificates();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    for (name, pem) in [("server.crt", &cert), ("server.key", &key)] {
        let p = pg.path().join(name);
        std::fs::write(&p, pem).unwrap();
        nix::unistd::chown(&p, Some(nobody.uid), Some(nobody.gid)).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }
    let ssl_on = format!(
        "-c ssl=on -c ssl_cert_file='{0}/server.crt' -c ssl_key_file='{0}/server.key'",
        pg.path().display()
    );
    pg.restart_with(&ssl_on, &lab.rtr);
    let ca_pem = lab.dir.join("ca.pem");
    std::fs::write(&ca_pem, &ca).unwrap();
    let other_pem = lab.dir.join("other-ca.pem");
    std::fs::write(&other_pem, &other_ca).unwrap();
    let tcp = |extra: &str| {
        format!(
            "host=localhost hostaddr=127.0.0.1 port={} dbname=port25 user=port25 {extra}",
            pg.port()
        )
    };

    // verify-full against the right CA: the daemon works, over TLS.
    let good = tcp(&format!(
        "sslmode=verify-full sslrootcert={}",
        ca_pem.display()
    ));
    lab.write_config(&format!(
        "registry:\n  postgres: \"{good}\"\n  router: bras-a\n"
    ));
    lab.start_daemon();
    ok(&lab, &["unblock", "alice", "--new", "--reason", "over tls"]);
    assert_eq!(
        pg.psql("SELECT policy FROM users WHERE name = 'alice'"),
        "unblocked"
    );
    assert_eq!(
        pg.psql(
            "SELECT string_agg(DISTINCT s.ssl::text, ',') FROM pg_stat_ssl s \
             JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'port25-ctl'"
        ),
        "true",
        "every connection of the daemon is TLS"
    );

    // Another CA: refused, named, nothing written, never plaintext instead.
    let changes = pg.psql("SELECT count(*) FROM changes");
    let bad = tcp(&format!(
        "sslmode=verify-full sslrootcert={}",
        other_pem.display()
    ));
    let o = helpdesk_with(&lab, &bad, &["unblock", "bob", "--new"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("fleet registry PostgreSQL") && text(&o).contains("certificate"),
        "{}",
        text(&o)
    );
    // verify-ca checks the chain, not the name; verify-full both.
    let by_ip = |mode: &str| {
        format!(
            "host=127.0.0.1 port={} dbname=port25 user=port25 sslmode={mode} sslrootcert={}",
            pg.port(),
            ca_pem.display()
        )
    };
    let o = helpdesk_with(&lab, &by_ip("verify-ca"), &["block", "alice"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = helpdesk_with(&lab, &by_ip("verify-full"), &["unblock", "alice"]);
    assert!(
        !o.status.success(),
        "the name 127.0.0.1 is not the certificate's"
    );
    // The daemon on the other CA: it starts from its replica, and a write fails clearly.
    lab.kill9();
    lab.write_config(&format!(
        "registry:\n  postgres: \"{bad}\"\n  router: bras-a\n"
    ));
    lab.start_daemon();
    let err = lab.fails_with(&["unblock", "alice"], 1);
    assert!(err.contains("certificate"), "{err}");
    assert_eq!(
        pg.psql("SELECT policy FROM users WHERE name = 'alice'"),
        "blocked"
    );
    assert_eq!(
        pg.psql("SELECT count(*) FROM changes")
            .parse::<u32>()
            .unwrap(),
        changes.parse::<u32>().unwrap() + 1,
        "only the verify-ca block"
    );

    // sslmode=require against a server without TLS: no connection.
    pg.restart_with("-c ssl=off", &lab.rtr);
    let o = helpdesk_with(&lab, &tcp("sslmode=require"), &["unblock", "alice"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("fleet registry PostgreSQL"),
        "{}",
        text(&o)
    );
    assert_eq!(
        pg.psql("SELECT policy FROM users WHERE name = 'alice'"),
        "blocked"
    );
    let o = helpdesk_with(&lab, &tcp("sslmode=prefer"), &["unblock", "alice"]);
    assert!(o.status.success(), "prefer goes plaintext: {}", text(&o));
}

#[test]
fn a_router_whose_changes_were_pruned_reloads_the_fleets_policy() {
    require_root!();
    let Some(pg) = Postgres::start() else { return };
    let mut a = Lab::new(XDP);
    a.write_config(&format!(
        "{}reconcile_interval: 1s\n",
        registry(&pg, "bras-a")
    ));
    a.start_daemon();
    let mut b = Lab::new(XDP);
    b.write_config(&registry(&pg, "bras-b"));
    b.start_daemon();
    ok(&a, &["user", "add", "carol"]);
    ok(&b, &["session", "up", "alice", ALICE4, "--id", "b1"]);
    assert!(until_policy(&b, "carol", Policy::Blocked, Duration::from_secs(2)).is_some());
    assert!(until_policy(&a, "alice", Policy::Blocked, Duration::from_secs(2)).is_some());
    assert!(!smtp(&b, ALICE4));
    // B is off while the fleet changes, and those changes age past the retention.
    b.kill9();
    ok(&a, &["unblock", "alice", "--reason", "while B was off"]);
    ok(&a, &["user", "remove", "carol"]);
    ok(&a, &["unblock", "dave", "--new"]);
    ok(&a, &["exempt", "add", "100.64.0.9/32"]);
    pg.psql("UPDATE changes SET at = now() - interval '31 days'");
    assert!(
        until_db(
            &pg,
            "SELECT count(*) FROM changes",
            "0",
            Duration::from_secs(5)
        ),
        "A prunes the changes older than 30 days: {}",
        a.daemon_log()
    );
    assert_ne!(pg.psql("SELECT through FROM changes_pruned"), "");
    // Younger ones stay.
    ok(&a, &["unblock", "erin", "--new"]);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(pg.psql("SELECT count(*) FROM changes"), "1");

    // B starts: its mark is below the cut, so it reloads the fleet's tables whole.
    b.start_daemon();
    assert!(
        b.daemon_log()
            .contains("reloading the fleet's policy whole"),
        "{}",
        b.daemon_log()
    );
    assert_eq!(replica_users(&b), db_users(&pg), "B equals the fleet");
    // And says so: status and /metrics show the reloaded mark, not the one before it.
    let f = fleet_info(&b);
    assert_eq!(
        f["applied_change_id"].to_string(),
        pg.psql("SELECT max(id) FROM changes"),
        "{f}"
    );
    assert_eq!(f["lag_changes"], 0, "B is up to date: {f}");
    assert_eq!(effective(&b, "alice"), Policy::Unblocked);
    assert!(
        smtp(&b, ALICE4),
        "alice's unblock reached B's maps (real TCP)"
    );
    assert_eq!(
        verdict(&b, "100.64.0.9"),
        "pass",
        "the exempt added meanwhile"
    );
    // And B follows the log again.
    ok(&a, &["block", "alice"]);
    assert!(until_policy(&b, "alice", Policy::Blocked, Duration::from_secs(2)).is_some());
    assert!(!smtp(&b, ALICE4));
}

/// A prune that commits between a replica's look at the cut and its read of the log: the
/// replica must not take the changes after the cut for all it missed. Made deterministic by
/// a hook in the database: the first read of `changes_pruned` (the replica's gap check)
/// prunes as another router would, after the reader's snapshot.
#[test]
fn a_prune_between_the_gap_check_and_the_log_read_loses_nothing() {
    require_root!();
    let Some(pg) = Postgres::start() else { return };
    let (mut a, mut b) = two_routers(&pg);
    ok(&a, &["user", "add", "alice"]);
    assert!(until_policy(&b, "alice", Policy::Blocked, Duration::from_secs(2)).is_some());
    b.kill9();
    ok(&a, &["unblock", "alice", "--reason", "while B was off"]);
    let x1 = pg.psql("SELECT max(id) FROM changes");
    ok(&a, &["unblock", "bob", "--new"]);
    // A would trip the hook itself.
    a.kill9();
    pg.psql(&format!(
        "ALTER TABLE changes_pruned RENAME TO changes_pruned_t;
         INSERT INTO changes_pruned_t (one, through) VALUES (1, 0);
         CREATE TABLE hook_fired (x INTEGER);
         CREATE FUNCTION port25_test_prune() RETURNS boolean LANGUAGE plpgsql AS $$
         BEGIN
           IF NOT EXISTS (SELECT 1 FROM hook_fired) THEN
             INSERT INTO hook_fired VALUES (1);
             DELETE FROM changes WHERE id <= {x1};
             UPDATE changes_pruned_t SET through = {x1};
           END IF;
           RETURN true;
         END $$;
         CREATE VIEW changes_pruned AS
           SELECT one, through FROM changes_pruned_t WHERE port25_test_prune();"
    ));
    b.start_daemon();
    assert!(until_policy(&b, "bob", Policy::Unblocked, Duration::from_secs(3)).is_some());
    assert_eq!(
        pg.psql("SELECT count(*) FROM hook_fired"),
        "1",
        "the race was run"
    );
    assert_eq!(
        effective(&b, "alice"),
        Policy::Unblocked,
        "alice's unblock, pruned while B read the log: {}",
        b.daemon_log()
    );
    ok(&b, &["session", "up", "alice", ALICE4, "--id", "b1"]);
    assert!(
        smtp(&b, ALICE4),
        "alice's unblock reached B's maps (real TCP)"
    );
}

/// `status --json`'s fleet figures (`daemon.fleet`).
fn fleet_info(lab: &Lab) -> serde_json::Value {
    let js: serde_json::Value = serde_json::from_str(&ok(lab, &["--json", "status"])).unwrap();
    js["daemon"]["fleet"].clone()
}

/// Polls `lab`'s fleet figures until `ok` holds; the last figures if it never did.
fn until_fleet(
    lab: &Lab,
    within: Duration,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value, serde_json::Value> {
    let t = Instant::now();
    loop {
        let f = fleet_info(lab);
        if ok(&f) {
            return Ok(f);
        }
        if t.elapsed() > within {
            return Err(f);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET /metrics` on the lab's default listener: `port25_fleet_*` samples, name -> value.
fn fleet_metrics(lab: &Lab) -> std::collections::BTreeMap<String, f64> {
    use std::io::{Read as _, Write as _};
    let raw = lab::in_ns(&lab.rtr, || {
        let mut s = std::net::TcpStream::connect("127.0.0.1:9725").unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: port25\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        raw
    });
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
    scrape
        .samples
        .into_iter()
        .filter(|s| s.metric.starts_with("port25_fleet_"))
        .map(|s| {
            let name = match s.labels.get("kind") {
                Some(k) => format!("{}{{{k}}}", s.metric),
                None => s.metric.clone(),
            };
            let v = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                ref other => panic!("{name}: {other:?}"),
            };
            (name, v)
        })
        .collect()
}

/// `/metrics` says what `status --json` says (a scrape and a status a moment apart: only
/// figures that cannot move meanwhile are compared).
fn assert_metrics_are_status(m: &std::collections::BTreeMap<String, f64>, f: &serde_json::Value) {
    let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no {k} in {m:?}"));
    assert_eq!(
        get("port25_fleet_connected"),
        f["connected"].as_bool().unwrap() as u8 as f64
    );
    assert_eq!(
        get("port25_fleet_applied_change_id"),
        f["applied_change_id"].as_f64().unwrap()
    );
    assert_eq!(
        get("port25_fleet_changes_applied_total"),
        f["changes_applied"].as_f64().unwrap()
    );
    assert_eq!(
        get("port25_fleet_reconnects_total"),
        f["reconnects"].as_f64().unwrap()
    );
    assert_eq!(
        get("port25_fleet_publish_queue{users}"),
        f["publish_queue_users"].as_f64().unwrap()
    );
    assert_eq!(
        m.get("port25_fleet_lag_changes").copied(),
        f["lag_changes"].as_f64()
    );
}

#[test]
fn fleet_figures_move_in_status_and_metrics() {
    require_root!();
    let Some(pg) = Postgres::start() else { return };
    let (a, b) = two_routers(&pg);
    let f = until_fleet(&b, Duration::from_secs(3), |f| f["connected"] == true)
        .unwrap_or_else(|f| panic!("B's follower connects: {f}"));
    assert_eq!(f["reconnects"], 0, "{f}");
    assert!(f["last_contact_unix_ms"].as_i64().is_some(), "{f}");
    let before = f["changes_applied"].as_u64().unwrap();
    // A change through A: B applies it, its count and mark move, no lag left.
    ok(&a, &["unblock", "alice", "--new"]);
    let mark_a = fleet_info(&a)["applied_change_id"].as_i64().unwrap();
    assert!(mark_a > 0);
    let f = until_fleet(&b, Duration::from_secs(2), |f| {
        f["applied_change_id"] == mark_a && f["lag_changes"] == 0
    })
    .unwrap_or_else(|f| panic!("B applies A's change {mark_a}: {f}"));
    assert_eq!(f["changes_applied"].as_u64().unwrap(), before + 1, "{f}");
    assert_metrics_are_status(&fleet_metrics(&b), &f);
    let text = ok(&b, &["status"]);
    assert!(
        text.contains(&format!(
            "fleet:      connected; change {mark_a} applied (0 behind)"
        )),
        "{text}"
    );
    // A's own change moved its mark, not its count of changes applied from the log.
    assert_eq!(fleet_info(&a)["changes_applied"], 0);

    // The database killed: B says it is disconnected; a session user waits in the queue.
    pg.kill();
    let f = until_fleet(&b, Duration::from_secs(3), |f| f["connected"] == false)
        .unwrap_or_else(|f| panic!("B sees the database gone: {f}"));
    assert_eq!(fleet_metrics(&b)["port25_fleet_connected"], 0.0);
    assert!(ok(&b, &["status"]).contains("fleet:      DISCONNECTED"));
    assert_metrics_are_status(&fleet_metrics(&b), &fleet_info(&b));
    let _ = f;
    ok(&b, &["session", "up", "carol", "100.64.0.3", "--id", "c1"]);
    until_fleet(&b, Duration::from_secs(7), |f| {
        f["publish_queue_users"] == 1
    })
    .unwrap_or_else(|f| panic!("carol waits to be published: {f}"));
    // Back: connected again, one reconnect, the queue written.
    pg.start_server();
    let f = until_fleet(&b, Duration::from_secs(8), |f| {
        f["connected"] == true && f["publish_queue_users"] == 0
    })
    .unwrap_or_else(|f| panic!("B reconnects and publishes: {f}"));
    assert_eq!(f["reconnects"], 1, "{f}");
    assert_metrics_are_status(&fleet_metrics(&b), &fleet_info(&b));
}

/// A new router (empty replica) loads the fleet from a snapshot of its tables, audit history
/// included, and follows the log from the snapshot's newest change: with a million users,
/// replaying the log from its start is what made a start slow (see `cargo xtask bench`).
/// A user only in the tables (a bulk load) is there too, which a replay could not give.
#[test]
fn a_new_router_starts_from_a_snapshot_of_the_fleet() {
    require_root!();
    let Some(pg) = Postgres::start() else { return };
    let mut a = Lab::new(XDP);
    a.write_config(&registry(&pg, "bras-a"));
    a.start_daemon();
    ok(&a, &["unblock", "alice", "--new", "--reason", "ticket 9"]);
    ok(&a, &["block", "bob", "--new"]);
    pg.psql(
        "INSERT INTO users (name, policy, set_by, set_at) VALUES ('carol', 'unblocked', 'import', 0)",
    );
    let mark_a = fleet_info(&a)["applied_change_id"].as_i64().unwrap();
    let mut b = Lab::new(XDP);
    b.write_config(&registry(&pg, "bras-b"));
    b.start_daemon();
    assert!(
        b.daemon_log().contains("replica loaded from a snapshot"),
        "{}",
        b.daemon_log()
    );
    let f = fleet_info(&b);
    assert_eq!(f["applied_change_id"], mark_a, "{f}");
    assert_eq!(f["changes_applied"], 0, "nothing replayed: {f}");
    assert_eq!(effective(&b, "alice"), Policy::Unblocked);
    assert_eq!(effective(&b, "bob"), Policy::Blocked);
    assert_eq!(effective(&b, "carol"), Policy::Unblocked);
    let log: port25_ctl::control::reply::AuditLog = b.reply(&["audit", "--user", "alice"]);
    assert!(
        log.records
            .iter()
            .any(|r| r.action == "unblock" && r.reason.as_deref() == Some("ticket 9")),
        "{log:?}"
    );
    // And it follows the log from there.
    ok(&b, &["session", "up", "alice", ALICE4, "--id", "b1"]);
    assert!(smtp(&b, ALICE4));
    ok(&a, &["block", "alice"]);
    assert!(until_policy(&b, "alice", Policy::Blocked, Duration::from_secs(2)).is_some());
    assert!(!smtp(&b, ALICE4));
    assert_eq!(fleet_info(&b)["changes_applied"], 1);
}

/// A decommissioned router's published sessions would stay in the helpdesk's view for ever:
/// each router stamps its sign of life, `user show` marks the sessions of one silent for
/// more than 10 min, and `registry forget-router` removes its rows (refused while alive).
#[test]
fn a_silent_routers_sessions_are_marked_and_can_be_forgotten() {
    require_root!();
    let Some(pg) = Postgres::start() else { return };
    let mut a = Lab::new(XDP);
    a.write_config(&registry(&pg, "bras-a"));
    a.start_daemon();
    assert!(until_db(
        &pg,
        "SELECT count(*) FROM routers WHERE name = 'bras-a' AND seen_at > now() - interval '1 minute'",
        "1",
        Duration::from_secs(3)
    ));
    ok(&a, &["unblock", "alice", "--new"]);
    ok(&a, &["session", "up", "alice", ALICE4, "--id", "a1"]);
    // bras-old: gone an hour ago, its session still published.
    pg.psql(
        "INSERT INTO routers (name, seen_at) VALUES ('bras-old', now() - interval '1 hour'); \
         INSERT INTO sessions (router, id, user_name, addrs, since, source) \
         VALUES ('bras-old', 'o1', 'alice', '{100.64.9.9/32}', 0, 'radius')",
    );
    assert!(until_db(
        &pg,
        "SELECT count(*) FROM sessions WHERE router = 'bras-a'",
        "1",
        Duration::from_secs(3)
    ));
    let show: UserDetail = a.reply(&["user", "show", "alice"]);
    let fleet = show.fleet.expect("a fleet view");
    let silent: Vec<_> = fleet
        .sessions
        .iter()
        .map(|s| (s.router.as_str(), s.router_silent_s.map(|s| s >= 3500)))
        .collect();
    assert_eq!(silent, [("bras-a", None), ("bras-old", Some(true))]);
    let text = ok(&a, &["user", "show", "alice"]);
    assert!(
        text.contains("STALE: router silent for 60 min") && text.contains("forget-router bras-old"),
        "{text}"
    );
    // A live router is not forgotten (it would publish its sessions again).
    let err = a.fails_with(&["registry", "forget-router", "bras-a"], 1);
    assert!(
        err.contains("bras-a was seen") && err.contains("alive"),
        "{err}"
    );
    assert_eq!(
        pg.psql("SELECT count(*) FROM sessions WHERE router = 'bras-a'"),
        "1"
    );
    let out = ok(&a, &["registry", "forget-router", "bras-old"]);
    assert!(out.contains("1 published session(s) removed"), "{out}");
    assert_eq!(
        pg.psql("SELECT count(*) FROM sessions s FULL JOIN routers r ON r.name = s.router WHERE coalesce(s.router, r.name) = 'bras-old'"),
        "0"
    );
    // A name the fleet does not know (a typo, forgotten already): an error, not "0 removed".
    for name in ["bras-old", "bras-0ld"] {
        let err = a.fails_with(&["registry", "forget-router", name], 1);
        assert!(err.contains(&format!("no router {name}")), "{err}");
    }
    let show: UserDetail = a.reply(&["user", "show", "alice"]);
    let routers: Vec<_> = show
        .fleet
        .unwrap()
        .sessions
        .into_iter()
        .map(|s| s.router)
        .collect();
    assert_eq!(routers, ["bras-a"]);
}

/// `deploy/port25-fleet.sql` as an operator runs it, and nothing more: the owner role
/// migrates the schema once, the script's grants are run, and then a daemon connecting as
/// the `port25` role serves policy writes, sessions and their publication, and that role can
/// neither change the schema nor rewrite the audit log.
#[test]
fn the_deploy_scripts_roles_are_enough_and_no_more() {
    require_root!();
    let Some(pg) = Postgres::start_as("postgres", "postgres") else {
        return;
    };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/port25-fleet.sql");
    let o = pg
        .psql_as(
            "postgres",
            "postgres",
            &["-v", "fleet_password='unused'", "-f", script],
        )
        .output()
        .unwrap();
    assert!(o.status.success(), "the deploy script: {}", text(&o));
    // The owner migrates: one run with the owner's role (a superuser's connection that
    // takes that role, as the script's comment says).
    let dir = pg.dir.display().to_string();
    let owner = format!("host={dir} dbname=port25 user=postgres options='-c role=port25_owner'");
    let mut lab = Lab::new(XDP);
    lab.write_config(&format!(
        "registry:\n  postgres: \"{owner}\"\n  router: bras-owner\n"
    ));
    lab.start_daemon();
    lab.kill9();
    assert_eq!(
        pg.psql_as(
            "postgres",
            "port25",
            &[
                "-c",
                "SELECT tableowner FROM pg_tables WHERE tablename = 'users'"
            ]
        )
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap(),
        "port25_owner"
    );
    // The script's grants for the tables the migration created.
    let grants: String = std::fs::read_to_string(script)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("--   GRANT"))
        .map(|l| format!("GRANT{};\n", l.split(';').next().unwrap()))
        .collect();
    assert!(grants.contains("changes_pruned"), "{grants}");
    let o = pg
        .psql_as("postgres", "port25", &["-c", &grants])
        .output()
        .unwrap();
    assert!(o.status.success(), "the script's grants: {}", text(&o));

    // Day to day as `port25`.
    let mut b = Lab::new(XDP);
    b.write_config(&format!(
        "registry:\n  postgres: \"host={dir} dbname=port25 user=port25\"\n  router: bras-b\n"
    ));
    b.start_daemon();
    ok(&b, &["session", "up", "alice", ALICE4, "--id", "b1"]);
    assert!(!smtp(&b, ALICE4));
    ok(&b, &["unblock", "alice", "--reason", "ticket 7"]);
    assert!(smtp(&b, ALICE4));
    ok(&b, &["block", "alice", "--hold", "--reason", "spam"]);
    assert!(!smtp(&b, ALICE4));
    assert!(until_db_as(
        &pg,
        "SELECT count(*) FROM sessions WHERE router = 'bras-b'",
        "1"
    ));
    let show: UserDetail = b.reply(&["user", "show", "alice"]);
    assert!(show.fleet.is_some_and(|f| f.unavailable.is_none()));
    for sql in [
        "CREATE TABLE x (a int)",
        "DROP TABLE users",
        "DELETE FROM audit",
        "UPDATE audit SET actor = 'nobody'",
    ] {
        let o = pg
            .psql_as("port25", "port25", &["-c", sql])
            .output()
            .unwrap();
        assert!(!o.status.success(), "`port25` may not: {sql}");
    }
    b.kill9();
}

/// Polls `sql` (as the superuser) until it answers `want`, for up to 3 s.
fn until_db_as(pg: &Postgres, sql: &str, want: &str) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        let o = pg
            .psql_as("postgres", "port25", &["-c", sql])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&o.stdout).trim() == want {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Two operators change the same user at once through two routers: the writes are
/// serialised by the fleet's lock, every one is audited once, and both routers end with the
/// policy of the last change in the database, in their registry and in their maps.
#[test]
fn two_operators_changing_one_user_at_once_are_serialised() {
    require_root!();
    let Some(pg) = Postgres::start() else { return };
    let (a, b) = two_routers(&pg);
    ok(&a, &["session", "up", "alice", ALICE4, "--id", "a1"]);
    ok(&b, &["session", "up", "alice", ALICE4, "--id", "b1"]);
    const EACH: usize = 20;
    let operator = |lab: &Lab, first_unblocks: bool| {
        let client = lab.client();
        for i in 0..EACH {
            if (i % 2 == 0) == first_unblocks {
                client
                    .call(proto::Unblock {
                        user: "alice".into(),
                        for_secs: None,
                        until: None,
                        reason: Some(format!("op {i}")),
                        new: false,
                    })
                    .unwrap();
            } else {
                client
                    .call(proto::Block {
                        user: "alice".into(),
                        reason: Some(format!("op {i}")),
                        new: false,
                        hold: false,
                    })
                    .unwrap();
            }
        }
    };
    std::thread::scope(|s| {
        s.spawn(|| operator(&a, true));
        s.spawn(|| operator(&b, false));
    });
    // Every write audited once in the fleet, from both routers.
    assert_eq!(
        pg.psql("SELECT router, count(*) FROM audit WHERE subject = 'alice' AND action IN ('unblock', 'block') GROUP BY router ORDER BY router"),
        format!("bras-a|{EACH}\nbras-b|{EACH}")
    );
    // The final state: the last change's, in the database and on both routers.
    let last = pg.psql("SELECT action FROM audit WHERE subject = 'alice' AND action IN ('unblock', 'block') ORDER BY id DESC LIMIT 1");
    let want = if last == "unblock" {
        Policy::Unblocked
    } else {
        Policy::Blocked
    };
    assert_eq!(
        pg.psql("SELECT policy FROM users WHERE name = 'alice'"),
        if want == Policy::Unblocked {
            "unblocked"
        } else {
            "blocked"
        }
    );
    for lab in [&a, &b] {
        assert!(
            until_policy(lab, "alice", want, Duration::from_secs(3)).is_some(),
            "{last} is the final state on every router"
        );
        assert_eq!(
            smtp(lab, ALICE4),
            want == Policy::Unblocked,
            "the maps agree"
        );
        let log: port25_ctl::control::reply::AuditLog =
            lab.reply(&["audit", "--user", "alice", "--limit", "0"]);
        let n = log
            .records
            .iter()
            .filter(|r| r.action == "unblock" || r.action == "block")
            .count();
        assert_eq!(n, 2 * EACH, "each router's replica has every write once");
    }
}

/// An acknowledged fleet change is never lost, nor applied twice, by a crash of the router
/// that made it: killed after the fleet's database committed it but before the local replica
/// did, the restart takes it from the log; killed after both (before the reply), the restart
/// finds it applied and skips it. Either way: in the maps, audited once here and in the fleet.
#[test]
fn a_fleet_change_survives_a_crash_between_its_commits_applied_once() {
    use port25_ctl::control::testing::{FAILPOINT_AFTER_COMMIT, FAILPOINT_AFTER_FLEET_COMMIT};
    require_root!();
    let Some(pg) = Postgres::start() else { return };
    let mut a = Lab::new(XDP);
    a.write_config(&registry(&pg, "bras-a"));
    a.start_daemon();
    ok(&a, &["session", "up", "alice", ALICE4, "--id", "a1"]);
    assert!(!smtp(&a, ALICE4));
    let unblocks = |a: &Lab| {
        let log: port25_ctl::control::reply::AuditLog = a.reply(&["audit", "--user", "alice"]);
        log.records.iter().filter(|r| r.action == "unblock").count()
    };
    for (round, failpoint) in [FAILPOINT_AFTER_FLEET_COMMIT, FAILPOINT_AFTER_COMMIT]
        .into_iter()
        .enumerate()
    {
        a.kill9();
        a.try_start_daemon_env(&[(failpoint, "1")]).unwrap();
        let o = a.ctl(&["unblock", "alice", "--reason", &format!("round {round}")]);
        assert!(
            !o.status.success(),
            "{failpoint}: the daemon died before its reply"
        );
        assert!(
            a.wait_daemon_exit(Duration::from_secs(5)),
            "{failpoint}: aborted"
        );
        assert_eq!(
            pg.psql("SELECT policy, reason FROM users WHERE name = 'alice'"),
            format!("unblocked|round {round}"),
            "{failpoint}: the fleet's database has the change"
        );
        a.start_daemon();
        assert_eq!(effective(&a, "alice"), Policy::Unblocked, "{failpoint}");
        assert!(
            smtp(&a, ALICE4),
            "{failpoint}: in the maps after the restart"
        );
        assert_eq!(unblocks(&a), round + 1, "{failpoint}: audited once here");
        assert_eq!(
            pg.psql("SELECT count(*) FROM audit WHERE subject = 'alice' AND action = 'unblock'"),
            (round + 1).to_string(),
            "{failpoint}: audited once in the fleet"
        );
        let mark = fleet_info(&a)["applied_change_id"].as_i64().unwrap();
        assert_eq!(
            pg.psql("SELECT max(id) FROM changes")
                .parse::<i64>()
                .unwrap(),
            mark,
            "{failpoint}: the replica's mark is the log's end"
        );
        ok(&a, &["block", "alice"]);
        assert!(!smtp(&a, ALICE4));
    }
}

/// A router's statements are prepared once per connection: a change of the log's column
/// types under a live connection (a DBA's ALTER, another version's migration) makes the
/// prepared read fail with "cached plan must not change result type" on every call. The
/// follower must heal on a fresh connection, not keep failing while blocks made elsewhere
/// never reach this router (alice's port 25 left open: fail-open).
#[test]
fn the_follower_heals_after_the_logs_column_types_change() {
    require_root!();
    let Some(pg) = Postgres::start() else { return };
    let mut b = Lab::new(XDP);
    b.write_config(&registry(&pg, "bras-b"));
    b.start_daemon();
    ok(&b, &["session", "up", "alice", ALICE4, "--id", "b1"]);
    ok(&b, &["unblock", "alice", "--reason", "ticket 9"]);
    assert!(smtp(&b, ALICE4));
    // B's connection (and its prepared log read) predates this.
    pg.psql("ALTER TABLE changes ALTER COLUMN router TYPE varchar(200)");
    let o = helpdesk(&b, &pg, &["block", "alice", "--reason", "spam"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        until_policy(&b, "alice", Policy::Blocked, Duration::from_secs(12)).is_some(),
        "the helpdesk's block reached B"
    );
    assert!(
        !smtp(&b, ALICE4),
        "port 25 closed for alice on B (real TCP)"
    );
}

/// A policy write's rows and change are pipelined: the database refusing one of the later
/// statements (here the audit row, after the user's row has been written) fails the whole
/// change: the CLI gets an error, nothing of it is in the fleet or the replica, port 25
/// stays closed; the retry is applied once.
#[test]
fn a_write_refused_mid_pipeline_leaves_nothing_and_its_retry_applies_once() {
    require_root!();
    let Some(pg) = Postgres::start() else { return };
    let mut b = Lab::new(XDP);
    b.write_config(&registry(&pg, "bras-b"));
    b.start_daemon();
    ok(&b, &["session", "up", "alice", ALICE4, "--id", "b1"]);
    pg.psql(
        "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN IF NEW.reason = 'poison' THEN RAISE EXCEPTION 'refused row'; END IF; \
         RETURN NEW; END $$; \
         CREATE TRIGGER poison BEFORE INSERT ON audit FOR EACH ROW EXECUTE FUNCTION poison()",
    );
    let changes = pg.psql("SELECT count(*) FROM changes");
    let o = b.ctl(&["unblock", "alice", "--reason", "poison"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert_eq!(pg.psql("SELECT count(*) FROM changes"), changes);
    assert_eq!(
        pg.psql("SELECT count(*) FROM users WHERE name = 'alice' AND policy = 'unblocked'"),
        "0"
    );
    assert_eq!(effective(&b, "alice"), Policy::Blocked);
    assert!(!smtp(&b, ALICE4));
    pg.psql("DROP TRIGGER poison ON audit");
    ok(&b, &["unblock", "alice", "--reason", "poison"]);
    assert_eq!(
        pg.psql("SELECT count(*) FROM changes")
            .parse::<u64>()
            .unwrap(),
        changes.parse::<u64>().unwrap() + 1
    );
    assert_eq!(
        pg.psql("SELECT count(*) FROM audit WHERE subject = 'alice' AND action = 'unblock'"),
        "1"
    );
    assert_eq!(effective(&b, "alice"), Policy::Unblocked);
    assert!(smtp(&b, ALICE4));
}
