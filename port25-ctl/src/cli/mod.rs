//! `port25-ctl`: the daemon and its clients.

use std::{net::IpAddr, path::PathBuf, process::ExitCode, time::Duration};

use crate::{
    bpf::datapath,
    bpf::detached,
    bpf::pins::Pins,
    config::{self, Config, DEFAULT_CONFIG},
    control::proto::{self, Client},
    control::{reply, server},
    net::{parse_addr, Prefix},
    registry::store::EntryKind,
};
use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

pub mod parse;
mod registry;
pub(crate) mod render;
pub mod report;

/// Outbound SMTP (TCP port 25) control for Linux access routers, enforced in XDP/TC.
#[derive(Parser)]
#[command(name = "port25-ctl", version)]
struct Cli {
    /// Config file.
    #[arg(long, global = true, default_value = DEFAULT_CONFIG, env = "PORT25_CONFIG")]
    config: PathBuf,
    /// Control socket for client verbs (default: `socket:` from the config file, read
    /// leniently, or /run/port25/ctl.sock).
    #[arg(long, global = true, env = "PORT25_SOCKET")]
    socket: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
    /// `unblock` and `block` straight in the fleet's database (`registry:` of the config;
    /// no daemon needed, e.g. on a helpdesk host): the routers apply it from the log.
    #[arg(long, global = true)]
    registry_only: bool,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Load, pin and attach the programs, apply the policy, serve the control socket.
    /// Refuses to start (exit 10) after `detach` until started with `--attach`.
    Daemon {
        /// Start enforcing although an operator detached, and lift the detach marker.
        #[arg(long)]
        attach: bool,
        /// Kernel debug messages (log target `port25::kernel`): each decision on a segment
        /// to a blocked port and each fail-closed doubt. Off: absent from the programs.
        #[arg(long)]
        kernel_log: bool,
    },
    /// Re-read the config; a bad file leaves the running policy untouched.
    Reload,
    /// Attachments, program ids, map fill levels and counters (works with the daemon down).
    /// Exits 3 when a configured attachment is missing.
    Status,
    /// The verdict for TCP from SRC to DST:PORT on the live maps, and the rule that decided it.
    Check {
        src: String,
        dst: String,
        #[arg(long, default_value_t = 25)]
        port: u16,
    },
    /// Remove the programs and every pin: port 25 is no longer blocked. Durable: later
    /// daemon starts refuse to attach until `attach` (or `daemon --attach`).
    Detach,
    /// Lift a detach: the next daemon start attaches again (then start the service).
    Attach,
    /// Reopen port 25 for a user (their live and future sessions' addresses).
    Unblock {
        #[arg(value_parser = parse::user_name)]
        user: String,
        /// A timed unblock, e.g. 90m (POP-before-SMTP), 2d. Never shortens a longer one.
        #[arg(long = "for", value_name = "DURATION", value_parser = parse::duration_secs, conflicts_with = "until")]
        for_secs: Option<u64>,
        /// End of the unblock: RFC 3339 time or a date (midnight UTC).
        #[arg(long, value_parser = parse::timestamp)]
        until: Option<jiff::Timestamp>,
        /// Why (a ticket number): kept with the user and in the audit log.
        #[arg(long)]
        reason: Option<String>,
        /// Register the user if unknown (e.g. offline when the helpdesk acts).
        #[arg(long)]
        new: bool,
    },
    /// Close port 25 for a user again, at once, live sessions included.
    Block {
        #[arg(value_parser = parse::user_name)]
        user: String,
        #[arg(long)]
        reason: Option<String>,
        /// Register the user if unknown.
        #[arg(long)]
        new: bool,
        /// Abuse hold (needs --reason): every unblock (CLI, hooks, RADIUS, POP logins) is
        /// refused and audited until `unhold`.
        #[arg(long, requires = "reason")]
        hold: bool,
    },
    /// Lift an abuse hold (the user stays blocked; `unblock` is a separate step).
    Unhold {
        #[arg(value_parser = parse::user_name)]
        user: String,
        /// Why the hold is lifted (the machine was cleaned, a ticket).
        #[arg(long, required = true)]
        reason: String,
    },
    /// Users: show, list, add, remove, and static prefix bindings.
    #[command(subcommand)]
    User(UserVerb),
    /// Sessions as the access server reports them (PPP/DHCP up and down, full sync).
    #[command(subcommand)]
    Session(SessionVerb),
    /// The ISP's mail servers added at runtime (beside `mail_servers` in the config).
    #[command(subcommand)]
    Server(ServerVerb),
    /// Exempt prefixes added at runtime (beside `exempt` in the config).
    #[command(subcommand)]
    Exempt(ExemptVerb),
    /// The audit log: who changed what, when, and why.
    Audit {
        #[arg(long)]
        user: Option<String>,
        /// RFC 3339 time or a date.
        #[arg(long, value_parser = parse::timestamp)]
        since: Option<jiff::Timestamp>,
        /// At most this many (the newest), 0 = all.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// The fleet registry itself (`registry:` of the config): moving a router into a fleet
    /// (`export` its SQLite registry as JSON, `import` such a file into the fleet's
    /// PostgreSQL) and forgetting a decommissioned router.
    #[command(subcommand)]
    Registry(registry::RegistryVerb),
    /// The worst offending sources the kernel tracks: who holds each address, attempts,
    /// distinct destinations, first and last seen, and the likely-infected flag.
    Top {
        /// Only sources blocked within this long (default: abuse.flag_window).
        #[arg(long, value_name = "DURATION", value_parser = parse::duration_secs)]
        since: Option<u64>,
        /// At most this many sources, 0 = all.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

#[derive(Subcommand)]
enum UserVerb {
    /// Policy, time left, live sessions and addresses, recent audit.
    Show {
        #[arg(value_parser = parse::user_name)]
        user: String,
    },
    /// All users, or only the unblocked, the expiring (timed) or the held ones.
    List {
        #[arg(long)]
        unblocked: bool,
        #[arg(long)]
        expiring: bool,
        /// Only users on an abuse hold.
        #[arg(long)]
        held: bool,
        /// At most N users (the first by name).
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
    },
    /// Register a user (blocked).
    Add {
        #[arg(value_parser = parse::user_name)]
        user: String,
    },
    /// Forget a user, their sessions and bindings.
    Remove {
        #[arg(value_parser = parse::user_name)]
        user: String,
    },
    /// Bind a static prefix to a user (business customers): exempt while the user is unblocked.
    Bind {
        #[arg(value_parser = parse::user_name)]
        user: String,
        #[arg(value_parser = parse::prefix)]
        prefix: Prefix,
        /// Accept a prefix wider than the configured floor (limits.min_prefix_v4/v6); audited.
        #[arg(long)]
        force_wide: bool,
    },
    /// Remove a static binding.
    Unbind {
        #[arg(value_parser = parse::user_name)]
        user: String,
        #[arg(value_parser = parse::prefix)]
        prefix: Prefix,
    },
}

#[derive(Subcommand)]
enum SessionVerb {
    /// A session came up: its IPv4 address and IPv6 prefixes (framed /64, delegated /56).
    Up {
        #[arg(value_parser = parse::user_name)]
        user: String,
        #[arg(required = true, value_parser = parse::prefix)]
        addrs: Vec<Prefix>,
        /// The access server's session id (Acct-Session-Id); default USER@first-address.
        #[arg(long)]
        id: Option<String>,
        /// What reports it (recorded with the session).
        #[arg(long)]
        source: Option<String>,
        /// Accept a prefix wider than the configured floor (limits.min_prefix_v4/v6); audited.
        #[arg(long)]
        force_wide: bool,
        /// The access server's unblock attribute (RADIUS) came with the session: unblock
        /// the user (registering them if unknown). Refused for a held user; the session is
        /// recorded all the same.
        #[arg(long)]
        unblock: bool,
        /// As --unblock, for this long (e.g. 90m).
        #[arg(long, value_name = "DURATION", value_parser = parse::duration_secs)]
        unblock_for: Option<u64>,
        /// The session's device (pppN): when a glob entry governs it, it is attached before
        /// the answer. Default: the device the first address is routed through.
        #[arg(long)]
        iface: Option<String>,
    },
    /// A session went down: by id, or by user and address.
    Down {
        #[arg(long, conflicts_with_all = ["user", "addr"])]
        id: Option<String>,
        #[arg(requires = "addr", value_parser = parse::user_name)]
        user: Option<String>,
        #[arg(value_parser = parse::prefix)]
        addr: Option<Prefix>,
    },
    /// The full list of live sessions (`ID USER ADDR...` per line; `-` = stdin); others go.
    Sync {
        file: PathBuf,
        /// When the list was taken (RFC 3339, sub-second allowed): events after it are kept
        /// over the list. Default: when this command started. At most an hour old.
        #[arg(long, value_parser = parse::timestamp)]
        taken_at: Option<jiff::Timestamp>,
    },
}

#[derive(Subcommand)]
enum ServerVerb {
    Add {
        #[arg(value_parser = parse::prefix)]
        prefix: Prefix,
        #[arg(long)]
        note: Option<String>,
        /// Accept a prefix wider than the configured floor (limits.min_prefix_v4/v6); audited.
        #[arg(long)]
        force_wide: bool,
    },
    Remove {
        #[arg(value_parser = parse::prefix)]
        prefix: Prefix,
    },
    List,
}

#[derive(Subcommand)]
enum ExemptVerb {
    Add {
        #[arg(value_parser = parse::prefix)]
        prefix: Prefix,
        #[arg(long, value_parser = parse::timestamp)]
        until: Option<jiff::Timestamp>,
        #[arg(long)]
        note: Option<String>,
        /// Accept a prefix wider than the configured floor (limits.min_prefix_v4/v6); audited.
        #[arg(long)]
        force_wide: bool,
    },
    Remove {
        #[arg(value_parser = parse::prefix)]
        prefix: Prefix,
    },
    List,
}

/// When this command started: the default time of a `session sync` list (the list cannot
/// know of events after it was handed to us).
static STARTED: std::sync::LazyLock<jiff::Timestamp> =
    std::sync::LazyLock::new(jiff::Timestamp::now);

pub fn main() -> ExitCode {
    std::sync::LazyLock::force(&STARTED);
    let cli = Cli::parse();
    // The daemon and the verbs that read whole pinned maps allocate millions of blocks.
    if matches!(
        cli.verb,
        Verb::Daemon { .. } | Verb::Status | Verb::Check { .. }
    ) {
        crate::alloc::use_mimalloc();
    }
    if !matches!(cli.verb, Verb::Daemon { .. }) {
        // Rust ignores SIGPIPE, so `port25-ctl user list | head` panicked on the closed pipe
        // (exit 101). A client ends quietly instead, like any Unix tool; its socket writes
        // use MSG_NOSIGNAL. The daemon keeps SIGPIPE ignored: a client hanging up must not
        // kill it.
        // SAFETY: single-threaded here, before anything else runs.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PORT25_LOG")
                // netlink-packet-route warns on every link event whose attributes a newer
                // kernel grew (IFLA_INET6_CONF); what port25 reads is not among them.
                .unwrap_or_else(|_| {
                    // `port25::kernel` (debug) is emitted only under `daemon --kernel-log`.
                    tracing_subscriber::EnvFilter::new(
                        "info,netlink_packet_route=error,port25::kernel=debug",
                    )
                }),
        )
        .with_writer(std::io::stderr)
        // Escape codes only for a person at a terminal: a journal or log file (and the
        // `blocked user=...` lines scripts read) gets plain `key=value` text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("port25-ctl: error: {e:#}");
            // A truncated or emptied config sends clients to the default socket: say so,
            // rather than leave "not running" as the only clue.
            if matches!(e.downcast_ref(), Some(proto::Error::DaemonDown(_)))
                && cli.socket.is_none()
                && cli.config.exists()
                && config::socket_named(&cli.config).is_none()
            {
                eprintln!(
                    "port25-ctl: note: {} names no `socket:` (is it truncated?), so the default socket was tried; give --socket",
                    cli.config.display()
                );
            }
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The exit code of a failed verb.
fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<detached::Detached>().is_some() {
        // The unit's RestartPreventExitStatus: a detach is not undone by a restart.
        return detached::EXIT_CODE;
    }
    match e.downcast_ref::<proto::Error>() {
        Some(e) => e.exit_code(),
        None => 1,
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

const CALL_TIMEOUT: Duration = Duration::from_secs(30);

fn run(cli: &Cli) -> Result<ExitCode> {
    if let Verb::Daemon { attach, kernel_log } = cli.verb {
        server::run(&cli.config, attach, kernel_log)?;
        return Ok(ExitCode::SUCCESS);
    }
    // Client verbs talk to the daemon only: they need the socket path and nothing else
    // from the config, so a half-edited file never breaks a hook.
    let client = || {
        Client::new(
            cli.socket
                .clone()
                .unwrap_or_else(|| config::socket_of(&cli.config)),
            CALL_TIMEOUT,
        )
    };
    if let Verb::Registry(v) = &cli.verb {
        return registry::run(cli, v);
    }
    if cli.registry_only {
        return registry_only(cli);
    }
    match &cli.verb {
        Verb::Daemon { .. } => unreachable!(),
        Verb::Status | Verb::Check { .. } | Verb::Detach | Verb::Attach => local(cli),
        Verb::Reload => {
            // The daemon re-reads the file it was started with; a --config naming another
            // file would otherwise be silently ignored and the reply read as "applied".
            let theirs = match client().call(proto::Info) {
                Ok(info) => Some(PathBuf::from(info.config)),
                Err(proto::Error::Daemon { .. }) => None,
                Err(e) => return Err(e.into()),
            };
            if let (Some(theirs), Ok(mine)) = (&theirs, std::fs::canonicalize(&cli.config)) {
                if *theirs != mine {
                    bail!(
                        "the daemon reads {}, not {}: nothing was reloaded (edit {0}, or restart the daemon with --config {1})",
                        theirs.display(),
                        mine.display()
                    );
                }
            }
            let r = match client().call(proto::Reload) {
                Err(proto::Error::Daemon { message, .. }) => {
                    bail!("reload refused, running policy unchanged: {message}")
                }
                r => r?,
            };
            show(cli, &r, |r| render::reloaded(theirs.as_deref(), r))
        }
        verb => client_verb(cli, &client(), verb),
    }
}

/// Prints a reply: as JSON with `--json`, else as text.
fn show<R: serde::Serialize>(
    cli: &Cli,
    r: &R,
    human: impl FnOnce(&R) -> String,
) -> Result<ExitCode> {
    if cli.json {
        // As the daemon sends it: an object with its keys in name order (as before the
        // replies were typed), whatever the order of the type's fields.
        print_json(&serde_json::to_value(r)?)?;
    } else {
        print!("{}", human(r));
    }
    Ok(ExitCode::SUCCESS)
}

/// Verbs that read the pins and the registry themselves: they need the whole config.
fn local(cli: &Cli) -> Result<ExitCode> {
    let mut cfg = match cli.verb {
        Verb::Status | Verb::Check { .. } => Config::load_for_reading(&cli.config)?,
        _ => Config::load(&cli.config)?,
    };
    if let Some(s) = &cli.socket {
        cfg.socket = s.clone();
    }
    match &cli.verb {
        Verb::Status => {
            let daemon = Client::new(&cfg.socket, Duration::from_secs(5))
                .call(proto::Info)
                .ok();
            let s = report::status(&cfg, daemon)?;
            if cli.json {
                print_json(&s)?;
            } else {
                report::print_status(&s);
            }
            if !s.healthy() {
                return Ok(ExitCode::from(3));
            }
        }
        Verb::Check { src, dst, port } => {
            let src: IpAddr = parse_addr(src).map_err(anyhow::Error::msg)?;
            let dst: IpAddr = parse_addr(dst).map_err(anyhow::Error::msg)?;
            let r = report::check(&cfg, src, dst, *port)?;
            if cli.json {
                print_json(&r)?;
            } else {
                println!(
                    "{}: TCP {} -> {}:{}: {} ({})",
                    r.verdict.to_uppercase(),
                    r.src,
                    r.dst,
                    r.port,
                    r.explanation,
                    r.reason
                );
                if r.family_enforced_whole {
                    println!(
                        "{} sources are enforced whole: the config lists no subscriber range of this family",
                        if r.src.is_ipv4() { "IPv4" } else { "IPv6" }
                    );
                }
                match &r.holder {
                    Some(h) => {
                        println!(
                            "source {} is held by user {} ({}), who is {}",
                            r.src, h.user, h.via, h.policy
                        );
                        if let Some(hold) = &h.hold {
                            println!("{} is on an abuse hold, {hold}", h.user);
                        }
                        if h.hold_not_effective {
                            println!(
                                "the hold is NOT effective on {}: an exempt entry (config `exempt` or `exempt add`) keeps port 25 open there",
                                r.src
                            );
                        }
                    }
                    None if r.registry.is_some() => {
                        println!("source {}: no known user holds it", r.src)
                    }
                    None => {}
                }
            }
        }
        Verb::Detach => {
            let r = match Client::new(&cfg.socket, CALL_TIMEOUT).call(proto::Detach) {
                Ok(r) => r,
                Err(proto::Error::Daemon { message, .. }) => bail!("detach failed: {message}"),
                Err(proto::Error::DaemonDown(_)) => {
                    let pins = Pins::new(&cfg.pin_dir);
                    // A daemon on another socket may still own these pins: never pull them
                    // from under it.
                    let _lock = if pins.root.exists() {
                        Some(server::lock_pins(&pins)?)
                    } else {
                        None
                    };
                    let by = std::env::var("SUDO_USER")
                        .unwrap_or_else(|_| format!("uid{}", nix::unistd::getuid()));
                    detached::mark(&cfg.state_dir, &format!("{by} (offline detach)"))?;
                    reply::Detached {
                        detached: datapath::detach_all(&pins)?,
                    }
                }
                Err(e) => return Err(e.into()),
            };
            return show(cli, &r, render::detached);
        }
        Verb::Attach => {
            if detached::clear(&cfg.state_dir)? {
                println!(
                    "detach lifted: the next daemon start attaches (e.g. systemctl start port25)"
                );
            } else {
                println!("not detached: nothing to lift");
            }
        }
        _ => unreachable!("client verbs are handled in run"),
    }
    Ok(ExitCode::SUCCESS)
}

fn user_of(uid: nix::unistd::Uid) -> String {
    nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| format!("uid{uid}"))
}

/// Who runs this command, as the audit log names an actor (`uid0 root (sudo: alice)`).
fn actor_name() -> String {
    let uid = nix::unistd::getuid();
    crate::registry::Actor {
        uid: uid.as_raw(),
        name: user_of(uid),
        on_behalf_of: std::env::var("SUDO_USER").ok(),
    }
    .to_string()
}

/// `--registry-only`: a policy verb run against the fleet's database alone.
fn registry_only(cli: &Cli) -> Result<ExitCode> {
    let reg = config::registry_of(&cli.config)?;
    let uid = nix::unistd::getuid();
    let actor = crate::registry::Actor {
        uid: uid.as_raw(),
        name: user_of(uid),
        on_behalf_of: std::env::var("SUDO_USER").ok(),
    };
    let view = |out: crate::registry::PolicyOutcome| reply::PolicyChange {
        user: reply::UserView::new(&out.user, jiff::Timestamp::now()),
        changed: out.changed,
        note: out.note,
    };
    match &cli.verb {
        Verb::Unblock {
            user,
            for_secs,
            until,
            reason,
            new,
        } => {
            let out = crate::fleet::helpdesk::change(&reg, user, |tx, now| {
                let until = match (for_secs, until) {
                    (Some(_), Some(_)) => bail!("give --for or --until, not both"),
                    (Some(s), None) => Some(
                        now.checked_add(jiff::SignedDuration::from_secs(
                            (*s).min(100 * 365 * 86400) as i64,
                        ))?
                        .round(jiff::Unit::Second)?,
                    ),
                    (None, t) => *t,
                };
                crate::registry::unblock(tx, &actor, user, until, reason.clone(), *new, now)
            })??;
            show(cli, &view(out), |r| render::unblocked(user, r))
        }
        Verb::Block {
            user,
            reason,
            new,
            hold,
        } => {
            let out = crate::fleet::helpdesk::change(&reg, user, |tx, now| {
                crate::registry::block(tx, &actor, user, reason.clone(), *new, *hold, now)
            })?;
            show(cli, &view(out), |r| render::blocked(user, r))
        }
        _ => bail!("--registry-only takes `unblock` or `block`"),
    }
}

/// A verb the daemon answers: its request, the typed reply, and how to show it.
fn client_verb(cli: &Cli, client: &Client, verb: &Verb) -> Result<ExitCode> {
    match verb {
        Verb::Unblock {
            user,
            for_secs,
            until,
            reason,
            new,
        } => {
            let r = client.call(proto::Unblock {
                user: user.clone(),
                for_secs: *for_secs,
                until: *until,
                reason: reason.clone(),
                new: *new,
            })?;
            show(cli, &r, |r| render::unblocked(user, r))
        }
        Verb::Block {
            user,
            reason,
            new,
            hold,
        } => {
            let r = client.call(proto::Block {
                user: user.clone(),
                reason: reason.clone(),
                new: *new,
                hold: *hold,
            })?;
            show(cli, &r, |r| render::blocked(user, r))
        }
        Verb::Unhold { user, reason } => {
            let r = client.call(proto::Unhold {
                user: user.clone(),
                reason: Some(reason.clone()),
            })?;
            show(cli, &r, |r| render::unheld(user, r))
        }
        Verb::User(u) => match u {
            UserVerb::Show { user } => {
                let r = client.call(proto::UserShow { user: user.clone() })?;
                show(cli, &r, render::user_detail)
            }
            UserVerb::List {
                unblocked,
                expiring,
                held,
                limit,
            } => {
                let r = client.call(proto::UserList {
                    unblocked: *unblocked,
                    expiring: *expiring,
                    held: *held,
                    limit: *limit,
                })?;
                show(cli, &r, render::user_list)
            }
            UserVerb::Add { user } => {
                let r = client.call(proto::UserAdd { user: user.clone() })?;
                show(cli, &r, |r| render::user_added(user, r))
            }
            UserVerb::Remove { user } => {
                let r = client.call(proto::UserRemove { user: user.clone() })?;
                show(cli, &r, |r| render::user_removed(user, r))
            }
            UserVerb::Bind {
                user,
                prefix,
                force_wide,
            } => {
                let r = client.call(proto::UserBind {
                    user: user.clone(),
                    prefix: *prefix,
                    force_wide: *force_wide,
                })?;
                show(cli, &r, render::bound)
            }
            UserVerb::Unbind { user, prefix } => {
                let r = client.call(proto::UserUnbind {
                    user: user.clone(),
                    prefix: *prefix,
                })?;
                show(cli, &r, render::unbound)
            }
        },
        Verb::Session(s) => match s {
            SessionVerb::Up {
                user,
                addrs,
                id,
                source,
                force_wide,
                unblock,
                unblock_for,
                iface,
            } => {
                let r = client.call(proto::SessionUp {
                    user: user.clone(),
                    addrs: addrs.clone(),
                    id: id.clone(),
                    source: source.clone(),
                    force_wide: *force_wide,
                    unblock: *unblock,
                    unblock_for_secs: *unblock_for,
                    iface: iface.clone(),
                })?;
                let code = show(cli, &r, |r| render::session_up(user, r))?;
                // Recorded, but port 25 is open on its device: the same code as `status`.
                if r.device.as_ref().is_some_and(|d| d.error.is_some()) {
                    return Ok(ExitCode::from(3));
                }
                Ok(code)
            }
            SessionVerb::Down { id, user, addr } => {
                if id.is_none() && addr.is_none() {
                    bail!("session down takes --id ID, or USER ADDR");
                }
                let r = client.call(proto::SessionDown {
                    id: id.clone(),
                    user: user.clone(),
                    addr: *addr,
                })?;
                show(cli, &r, render::session_down)
            }
            SessionVerb::Sync { file, taken_at } => {
                let (text, origin) = if file.as_os_str() == "-" {
                    let mut t = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut t)?;
                    (t, "stdin".to_string())
                } else {
                    (
                        std::fs::read_to_string(file)
                            .with_context(|| format!("reading {}", file.display()))?,
                        file.display().to_string(),
                    )
                };
                let r = client.call(proto::SessionSync {
                    sessions: parse::session_list(&text, &origin)?,
                    taken_at: Some(taken_at.unwrap_or(*STARTED)),
                })?;
                show(cli, &r, render::sync_summary)
            }
        },
        Verb::Server(s) => match s {
            ServerVerb::Add {
                prefix,
                note,
                force_wide,
            } => {
                let r = client.call(proto::EntryAdd {
                    kind: EntryKind::Server,
                    prefix: *prefix,
                    until: None,
                    note: note.clone(),
                    force_wide: *force_wide,
                })?;
                show(cli, &r, |r| render::entry_added(prefix, r))
            }
            ServerVerb::Remove { prefix } => {
                let r = client.call(proto::EntryRemove {
                    kind: EntryKind::Server,
                    prefix: *prefix,
                })?;
                show(cli, &r, render::entry_removed)
            }
            ServerVerb::List => {
                let r = client.call(proto::EntryList {
                    kind: EntryKind::Server,
                })?;
                show(cli, &r, render::entry_list)
            }
        },
        Verb::Exempt(e) => match e {
            ExemptVerb::Add {
                prefix,
                until,
                note,
                force_wide,
            } => {
                let r = client.call(proto::EntryAdd {
                    kind: EntryKind::Exempt,
                    prefix: *prefix,
                    until: *until,
                    note: note.clone(),
                    force_wide: *force_wide,
                })?;
                show(cli, &r, |r| render::entry_added(prefix, r))
            }
            ExemptVerb::Remove { prefix } => {
                let r = client.call(proto::EntryRemove {
                    kind: EntryKind::Exempt,
                    prefix: *prefix,
                })?;
                show(cli, &r, render::entry_removed)
            }
            ExemptVerb::List => {
                let r = client.call(proto::EntryList {
                    kind: EntryKind::Exempt,
                })?;
                show(cli, &r, render::entry_list)
            }
        },
        Verb::Audit { user, since, limit } => {
            let r = client.call(proto::Audit {
                user: user.clone(),
                since: *since,
                limit: *limit,
            })?;
            show(cli, &r, render::audit_log)
        }
        Verb::Top { since, limit } => {
            let r = client.call(proto::Top {
                since_secs: *since,
                limit: *limit,
            })?;
            show(cli, &r, render::top)
        }
        Verb::Daemon { .. }
        | Verb::Reload
        | Verb::Status
        | Verb::Check { .. }
        | Verb::Detach
        | Verb::Attach
        | Verb::Registry(_) => {
            unreachable!("handled above")
        }
    }
}
