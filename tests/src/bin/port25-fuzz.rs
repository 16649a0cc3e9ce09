//! `cargo xtask fuzz`: the differential fuzz (see `port25_tests::fuzz`). Needs root (BPF).
//! Exits non-zero on any mismatch or leak, after printing each failing frame in hex with the
//! seed and index that replay it.

use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use port25_tests::{
    fuzz::{self, RunOptions},
    fuzzgen::{Options, PppForms},
};

#[derive(Parser)]
#[command(about = "Differential fuzz: generated frames through every program and the model")]
struct Args {
    /// How many frames.
    #[arg(long, default_value_t = 1_000_000)]
    frames: u64,
    /// Seed of the run (random when absent; always printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Index of the first frame (replay one frame: --seed S --skip I --frames 1).
    #[arg(long, default_value_t = 0)]
    skip: u64,
    /// PPP forms: `all` includes the 1-byte protocol, multilink, VJ, compressed and MPLS;
    /// `classic` only the 2-byte IPv4/IPv6 protocol.
    #[arg(long, value_enum, default_value_t = Ppp::All)]
    ppp_forms: Ppp,
    /// `reject` answers blocked segments with a RST (XDP_TX / redirect): still a block.
    #[arg(long, value_enum, default_value_t = Action::Drop)]
    action: Action,
    /// Failing frames printed in full.
    #[arg(long, default_value_t = 20)]
    show: usize,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Action {
    Drop,
    Reject,
}

#[derive(Clone, Copy, ValueEnum)]
enum Ppp {
    Classic,
    All,
}

fn main() -> ExitCode {
    let a = Args::parse();
    if !nix::unistd::geteuid().is_root() {
        eprintln!("port25-fuzz: needs root (BPF_PROG_TEST_RUN)");
        return ExitCode::from(2);
    }
    let seed = a.seed.unwrap_or_else(fuzz::random_seed);
    let ppp = match a.ppp_forms {
        Ppp::Classic => PppForms::Classic,
        Ppp::All => PppForms::All,
    };
    let o = RunOptions {
        frames: a.frames,
        seed,
        skip: a.skip,
        gen: Options { ppp },
        reject: matches!(a.action, Action::Reject),
        keep: a.show,
    };
    println!(
        "port25 differential fuzz: seed {seed}, frames {}..{}, ppp forms {:?}, action {:?}",
        a.skip,
        a.skip + a.frames,
        ppp,
        a.action
    );
    let mut f = fuzz::fixture();
    let st = fuzz::run(&mut f, &o, |st| {
        eprintln!(
            "  ... {} frames, {:.0}/s, {} mismatches, {} leaks",
            st.frames,
            st.frames as f64 / st.elapsed.as_secs_f64(),
            st.mismatches,
            st.leaks + st.model_leaks
        )
    });
    print!("{st}");
    for fl in &st.failures {
        println!("{}", fl.describe(seed));
    }
    println!("seed {seed}");
    if st.ok() {
        println!("PASS");
        ExitCode::SUCCESS
    } else {
        println!("FAIL: replay with --seed {seed}");
        ExitCode::FAILURE
    }
}
