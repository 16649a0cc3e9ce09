//! The fleet registry on PostgreSQL (issue 11): a private PostgreSQL server from Debian's
//! packages (see `port25_tests::pg`), real daemons in the namespace lab, real TCP.

use port25_tests::pg::Postgres;

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
