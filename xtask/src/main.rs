//! `cargo xtask build | test | lab`: the project's own tooling, runnable on a fresh machine.

mod bench;
mod build;
mod lab;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing (rust-src, bpf-linker) and build everything (release).
    Build,
    /// Build, then run every test (unit, kernel, end-to-end). Root needed for kernel tests.
    Test {
        /// Extra arguments for the test harness (e.g. a test name filter).
        args: Vec<String>,
    },
    /// A three-namespace lab with the real daemon: blocked and allowed connections, explained.
    /// Speed and memory, as ratios against baselines measured in the same run (root).
    Bench,
    Lab {
        /// Options for the lab: --hook xdp|xdp-generic|tc|tc-egress, --keep.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Build => build::all(),
        Cmd::Test { args } => build::test(&args),
        Cmd::Lab { args } => lab::run(&args),
        Cmd::Bench => bench::run(),
    }
}
