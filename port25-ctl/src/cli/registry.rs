//! `port25-ctl registry export|import`: moving a router's SQLite registry into a fleet's
//! PostgreSQL (see [`crate::fleet::export`]).

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result};
use clap::Subcommand;

use crate::{config, fleet::export, registry::store::sqlite::DB_FILE};

#[derive(Subcommand)]
pub(super) enum RegistryVerb {
    /// Write this router's SQLite registry (users, policies, holds, bindings, runtime
    /// entries, the audit log) to stdout as JSON. Reads only: the daemon may be running.
    Export {
        /// The registry: a state directory or its port25.db (default: `state_dir` of the
        /// config).
        #[arg(long, value_name = "PATH")]
        db: Option<PathBuf>,
        /// The router's name in the fleet, which keys its audit records there (default:
        /// `registry.router` of the config, else the host name).
        #[arg(long)]
        router: Option<String>,
    },
    /// Write an export into the fleet's database (`registry:` of the config), as fleet
    /// changes every router applies. All or nothing; a second import changes nothing.
    Import {
        file: PathBuf,
        /// Replace the fleet's users, bindings and entries that differ from the file's
        /// (otherwise such conflicts refuse the whole file).
        #[arg(long)]
        overwrite: bool,
        /// Accept exempt/server entries and bindings wider than the configured floor
        /// (limits.min_prefix_v4/v6), as `exempt add --force-wide`; audited.
        #[arg(long)]
        force_wide: bool,
    },
    /// Removes a decommissioned router's published sessions (and its sign of life) from the
    /// fleet's view; refused while the router is alive (seen within 10 min).
    ForgetRouter { name: String },
}

pub(super) fn run(cli: &super::Cli, verb: &RegistryVerb) -> Result<ExitCode> {
    match verb {
        RegistryVerb::ForgetRouter { name } => {
            let reg = config::registry_of(&cli.config)?;
            let n = crate::fleet::Fleet::new(&reg)?.forget_router(name)?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({ "router": name, "sessions_removed": n })
                );
            } else {
                println!("forgot router {name}: {n} published session(s) removed");
            }
        }
        RegistryVerb::Export { db, router } => {
            let state_dir = match db {
                Some(p) if p.is_dir() => p.clone(),
                Some(p) => {
                    anyhow::ensure!(
                        p.file_name().is_some_and(|n| n == DB_FILE),
                        "--db {}: give a state directory or its {DB_FILE}",
                        p.display()
                    );
                    p.parent().map(PathBuf::from).unwrap_or_default()
                }
                None => config::Config::load(&cli.config)?.state_dir,
            };
            let router = match router {
                Some(r) => {
                    config::check_router(r).map_err(anyhow::Error::msg)?;
                    r.clone()
                }
                None => match config::Config::load(&cli.config) {
                    Ok(c) => c.registry.map(|r| r.router_name()),
                    Err(_) => None,
                }
                .unwrap_or_else(config::host_name),
            };
            let doc = export::export(&state_dir, &router)?;
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
        RegistryVerb::Import {
            file,
            overwrite,
            force_wide,
        } => {
            let reg = config::registry_of(&cli.config)?;
            let limits = config::limits_of(&cli.config)?;
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            let doc = export::parse(&text).with_context(|| format!("{}", file.display()))?;
            // The floor `exempt add` and `user bind` hold to: a file is no way around it.
            let wide = export::too_wide(&doc, &limits);
            if !*force_wide {
                if let Some((what, p, floor)) = wide.first() {
                    anyhow::bail!(
                        "{}: import refused, nothing written: {} prefix(es) wider than the \
                         floor, first {what} {p} (wider than /{floor}, limits.min_prefix_v{}): \
                         it would open port 25 for a large part of the Internet on every \
                         router; give --force-wide if that is meant (audited)",
                        file.display(),
                        wide.len(),
                        if p.addr.is_ipv4() { 4 } else { 6 }
                    );
                }
            }
            let out = export::import(&reg, &doc, &super::actor_name(), *overwrite, &wide)?;
            super::show(cli, &out, export::render)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
