//! A private PostgreSQL server for one test: Debian's binaries (`cargo xtask test` installs
//! the `postgresql` package), a cluster in a temp dir owned by `nobody`, listening on a unix
//! socket in that dir only (no TCP port shared with other tests). Stopped and removed on drop.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

/// The superuser and database the tests use.
pub const USER: &str = "port25";
pub const DB: &str = "port25";

pub struct Postgres {
    pub dir: PathBuf,
    /// The cluster's superuser and the database [`Postgres::psql`] and
    /// [`Postgres::conn_string`] use ([`USER`] and [`DB`] unless [`Postgres::start_as`]).
    superuser: &'static str,
    db: &'static str,
    bin: PathBuf,
    /// The port (of the unix socket, and of TCP once [`Postgres::restart_with`] asked).
    port: std::cell::Cell<u16>,
    /// `postgres -c` options beyond the defaults (see [`Postgres::restart_with`]).
    opts: std::cell::RefCell<String>,
    /// The network namespace the server runs in (its TCP address is that namespace's).
    netns: std::cell::RefCell<Option<String>>,
}

/// The newest installed server's binaries (`/usr/lib/postgresql/<version>/bin`).
pub fn bin_dir() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b)
}

fn run(what: &str, cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(out.status.success(), "{what}: {}", crate::text(&out));
    out
}

impl Postgres {
    /// Starts a server, or `None` (the caller skips, and says why) when not root or when
    /// PostgreSQL is not installed.
    pub fn start() -> Option<Postgres> {
        Postgres::start_as(USER, DB)
    }

    /// As [`Postgres::start`], with `superuser` as the cluster's superuser and `db` as the
    /// database to use (created unless it is `postgres`, which every cluster has).
    pub fn start_as(superuser: &'static str, db: &'static str) -> Option<Postgres> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: PostgreSQL tests need root (to run the server as nobody)");
            return None;
        }
        let Some(bin) = bin_dir() else {
            eprintln!("SKIP: no /usr/lib/postgresql/*/bin/initdb (`cargo xtask test` installs it)");
            return None;
        };
        let dir = std::env::temp_dir().join(format!("port25-pg-{}", crate::unique("")));
        std::fs::create_dir_all(&dir).unwrap();
        let nobody = nix::unistd::User::from_name("nobody")
            .unwrap()
            .expect("user nobody");
        nix::unistd::chown(&dir, Some(nobody.uid), Some(nobody.gid)).unwrap();
        let pg = Postgres {
            dir,
            superuser,
            db,
            bin,
            port: std::cell::Cell::new(5432),
            opts: std::cell::RefCell::new(String::new()),
            netns: std::cell::RefCell::new(None),
        };
        run(
            "initdb",
            pg.as_nobody("initdb").args([
                "-D",
                &pg.data().display().to_string(),
                "-U",
                superuser,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]),
        );
        pg.start_server();
        if db == "postgres" {
            return Some(pg);
        }
        run(
            "createdb",
            Command::new(pg.bin.join("createdb")).args([
                "-h",
                &pg.dir.display().to_string(),
                "-p",
                &pg.port.get().to_string(),
                "-U",
                superuser,
                db,
            ]),
        );
        Some(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn as_nobody(&self, tool: &str) -> Command {
        let mut c = match &*self.netns.borrow() {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg("runuser");
                c
            }
            None => Command::new("runuser"),
        };
        c.args(["-u", "nobody", "--"])
            .arg(self.bin.join(tool))
            .current_dir(&self.dir);
        c
    }

    /// Starts the server (again, after [`Postgres::kill`]) and waits until it answers.
    pub fn start_server(&self) {
        let log = self.dir.join("server.log");
        run(
            "pg_ctl start",
            self.as_nobody("pg_ctl").args([
                "-D",
                &self.data().display().to_string(),
                "-l",
                &log.display().to_string(),
                "-w",
                "-o",
                &format!(
                    "-c unix_socket_directories='{}' -c fsync=off -p {} {}",
                    self.dir.display(),
                    self.port.get(),
                    match self.opts.borrow().as_str() {
                        "" => "-c listen_addresses=''",
                        o => o,
                    }
                ),
                "start",
            ]),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.ready() {
            assert!(Instant::now() < deadline, "PostgreSQL did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn ready(&self) -> bool {
        Command::new(self.bin.join("pg_isready"))
            .args([
                "-h",
                &self.dir.display().to_string(),
                "-p",
                &self.port.get().to_string(),
                "-U",
                self.superuser,
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// Stops the server at once, as a crash would (no checkpoint, connections cut).
    pub fn kill(&self) {
        run(
            "pg_ctl stop",
            self.as_nobody("pg_ctl").args([
                "-D",
                &self.data().display().to_string(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ]),
        );
    }

    /// The libpq-style connection string for `registry.postgres`.
    pub fn conn_string(&self) -> String {
        match self.port.get() {
            5432 => format!(
                "host={} dbname={} user={}",
                self.dir.display(),
                self.db,
                self.superuser
            ),
            p => format!(
                "host={} port={p} dbname={} user={}",
                self.dir.display(),
                self.db,
                self.superuser
            ),
        }
    }

    /// Restarts the server with `opts` (`postgres` options, e.g. `-c ssl=on`), listening on
    /// TCP 127.0.0.1 too, on a port free now (the unix socket moves to it as well), in the
    /// network namespace `netns` (a lab router's: where its daemon connects from).
    pub fn restart_with(&self, opts: &str, netns: &str) {
        self.kill();
        *self.netns.borrow_mut() = Some(netns.to_string());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        self.port.set(port);
        *self.opts.borrow_mut() = format!("-c listen_addresses='127.0.0.1' {opts}");
        self.start_server();
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port.get()
    }

    /// Runs SQL with psql; the rows unaligned, `|`-separated, one per line.
    pub fn psql(&self, sql: &str) -> String {
        let out = run(
            "psql",
            &mut self.psql_as(self.superuser, self.db, &["-c", sql]),
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .trim_end()
            .to_string()
    }

    /// psql connected as `user` to `db`, stopping at the first error, with `args` (`-c SQL`,
    /// `-f FILE`, `-v NAME=VALUE`); not run yet.
    pub fn psql_as(&self, user: &str, db: &str, args: &[&str]) -> Command {
        let mut c = Command::new(self.bin.join("psql"));
        c.args([
            "-h",
            &self.dir.display().to_string(),
            "-p",
            &self.port.get().to_string(),
            "-U",
            user,
            "-d",
            db,
            "-X",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
        ])
        .args(args);
        c
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .as_nobody("pg_ctl")
            .args([
                "-D",
                &self.data().display().to_string(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
