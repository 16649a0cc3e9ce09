//! `port25-ctl`: the daemon and its clients.

use std::{net::IpAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use port25_ctl::{
    config::{Config, DEFAULT_CONFIG},
    daemon, datapath,
    net::parse_addr,
    pins::Pins,
    proto::{self, DaemonDown, Op},
    report,
};

/// Outbound SMTP (TCP port 25) control for Linux access routers, enforced in XDP/TC.
#[derive(Parser)]
#[command(name = "port25-ctl", version)]
struct Cli {
    /// Config file.
    #[arg(long, global = true, default_value = DEFAULT_CONFIG, env = "PORT25_CONFIG")]
    config: PathBuf,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Load, pin and attach the programs, apply the policy, serve the control socket.
    Daemon,
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
    /// Remove the programs and every pin: port 25 is no longer blocked.
    Detach,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PORT25_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("port25-ctl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

const CALL_TIMEOUT: Duration = Duration::from_secs(30);

fn run(cli: &Cli) -> Result<ExitCode> {
    if let Verb::Daemon = cli.verb {
        daemon::run(&cli.config)?;
        return Ok(ExitCode::SUCCESS);
    }
    let cfg = Config::load(&cli.config)?;
    match &cli.verb {
        Verb::Daemon => unreachable!(),
        Verb::Reload => {
            let r = proto::call(&cfg.socket, Op::Reload, CALL_TIMEOUT)?;
            if !r.ok {
                bail!(
                    "reload refused, running policy unchanged: {}",
                    r.error.unwrap_or_default()
                );
            }
            if cli.json {
                print_json(&r.data)?;
            } else {
                println!("reloaded: {} map writes", r.data["writes"]);
            }
        }
        Verb::Status => {
            let daemon = match proto::call(&cfg.socket, Op::Info, Duration::from_secs(5)) {
                Ok(r) if r.ok => Some(r.data),
                _ => None,
            };
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
            }
        }
        Verb::Detach => {
            let points = match proto::call(&cfg.socket, Op::Detach, CALL_TIMEOUT) {
                Ok(r) if r.ok => r.data["detached"].clone(),
                Ok(r) => bail!("detach failed: {}", r.error.unwrap_or_default()),
                Err(e) if e.downcast_ref::<DaemonDown>().is_some() => {
                    serde_json::to_value(datapath::detach_all(&Pins::new(&cfg.pin_dir))?)?
                }
                Err(e) => return Err(e),
            };
            if cli.json {
                print_json(&serde_json::json!({ "detached": points }))?;
            } else {
                println!("detached: {points}; port 25 is no longer blocked by port25");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
