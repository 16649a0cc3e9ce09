//! `cargo xtask build | test | lab | bench | fuzz`: the project's own tooling, runnable on a
//! fresh machine.

mod bench;
mod build;
mod fuzz;
mod lab;
mod vm;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// The 6.1 VM run's bound. Under TCG the suite took 16 minutes on one machine of this kind
/// and over 40 on another (slow memory); a hang still ends within `.ci/run`'s 90 minutes,
/// after the host suite's 30 or so.
const VM_TIMEOUT_S: u64 = 3300;

/// The project's own tooling: build, test, lab, bench and fuzz, runnable on a fresh machine.
#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing (rust-src, bpf-linker) and build everything (release).
    Build,
    /// Build, then run every test (unit, kernel, end-to-end) on this machine's kernel, then
    /// again in a VM on Debian 12's Linux 6.1 (the kernel most access routers run). Root
    /// needed for kernel tests and the VM.
    Test {
        /// Run in a QEMU VM on Debian's kernel KERNEL (6.1 or 6.12) only, not on this
        /// machine's kernel.
        #[arg(long, value_name = "KERNEL", conflicts_with = "host_only")]
        vm: Option<String>,
        /// This machine's kernel only: skip the Linux 6.1 VM run.
        #[arg(long)]
        host_only: bool,
        /// With --vm: a test binary (tests/tests/NAME.rs) to run, repeatable; default: the
        /// kernel tables, e2e, lifecycle and subscribers.
        #[arg(long = "vm-test", value_name = "NAME", requires = "vm")]
        vm_tests: Vec<String>,
        /// With --vm: give up (and fail) after this many seconds.
        #[arg(long, default_value_t = VM_TIMEOUT_S, requires = "vm")]
        vm_timeout: u64,
        /// With --vm: Debian's kernel flavour, `cloud` (cloud-amd64) or `generic` (amd64, the
        /// one with PPP: the cloud kernels are built without it, so `realdev`'s PPPoE tests
        /// skip there).
        #[arg(long, value_name = "FLAVOUR", default_value = "cloud", requires = "vm",
              value_parser = ["cloud", "generic"])]
        vm_flavour: String,
        /// Extra arguments for the test harness (e.g. a test name filter), on the host and
        /// in the VM.
        args: Vec<String>,
    },
    /// A three-namespace lab with the real daemon: blocked and allowed connections, explained.
    Lab {
        /// Options for the lab: --hook xdp|xdp-generic|tc|tc-egress, --keep.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Speed and memory, as ratios against baselines measured in the same run (root).
    ///
    /// `PORT25_BENCH_QUICK=1`: the datapath only, with empty exempt maps.
    Bench,
    /// Differential fuzz: generated frames through every program (BPF_PROG_TEST_RUN) and the
    /// reference model; fails on any mismatch or any blocked-port frame passed (root).
    Fuzz {
        /// How many frames.
        #[arg(long, default_value_t = 1_000_000)]
        frames: u64,
        /// Seed to replay a run (random when absent; always printed).
        #[arg(long)]
        seed: Option<u64>,
        /// Index of the first frame: `--seed S --skip I --frames 1` replays one frame.
        #[arg(long, default_value_t = 0)]
        skip: u64,
        /// `all` includes every PPP form the kernel turns into IP (1-byte protocol,
        /// multilink, VJ, compressed, MPLS); `classic` only the 2-byte IPv4/IPv6 protocol.
        #[arg(long, default_value = "all", value_parser = ["all", "classic"])]
        ppp_forms: String,
        /// `reject` answers blocked segments with a TCP RST, as `action: reject` does.
        #[arg(long, default_value = "drop", value_parser = ["drop", "reject"])]
        action: String,
        /// Failing frames printed in full.
        #[arg(long, default_value_t = 20)]
        show: usize,
    },
}

/// The host suite, then the Linux 6.1 VM suite (prepared first, so a missing package or
/// kernel fails before the long part); both run even when the first fails.
fn test_host_and_vm(host_only: bool, args: &[String]) -> Result<()> {
    let vm = if host_only {
        None
    } else if !build::is_root()? {
        eprintln!("xtask: not root: the Linux 6.1 VM run is skipped");
        None
    } else {
        // The kernel of Debian 12 access routers, in the flavour that has PPP (the cloud
        // kernels lack it), with the real-device tests in the default set.
        let tests: Vec<String> = vm::DEFAULT_TESTS.iter().map(|s| s.to_string()).collect();
        Some(vm::prepare(&vm::Opts {
            kernel: "6.1",
            flavour: "generic",
            tests: &tests,
            args,
            timeout: std::time::Duration::from_secs(VM_TIMEOUT_S),
        })?)
    };
    // Host first, then the VM: run side by side on 2 cores, TCG's load made the host suite's
    // timing checks flaky (a RST "at once" took 1.04 s under it).
    let host = build::test(args);
    let Some(vm) = vm else {
        return host;
    };
    let vm = vm::boot(&vm, &mut std::io::stdout());
    match (host, vm) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(h), Ok(())) => Err(h.context("host suite failed (the 6.1 VM passed)")),
        (Ok(()), Err(v)) => Err(v.context("Linux 6.1 VM suite failed (the host suite passed)")),
        (Err(h), Err(v)) => Err(h.context(format!("host suite failed, and the 6.1 VM too: {v:#}"))),
    }
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Build => build::all(),
        Cmd::Test {
            vm: Some(kernel),
            vm_tests,
            vm_timeout,
            vm_flavour,
            args,
            ..
        } => vm::test(&vm::Opts {
            kernel: &kernel,
            flavour: &vm_flavour,
            tests: &vm_tests,
            args: &args,
            timeout: std::time::Duration::from_secs(vm_timeout),
        }),
        Cmd::Test {
            host_only, args, ..
        } => test_host_and_vm(host_only, &args),
        Cmd::Lab { args } => lab::run(&args),
        Cmd::Bench => bench::run(),
        Cmd::Fuzz {
            frames,
            seed,
            skip,
            ppp_forms,
            action,
            show,
        } => {
            let mut args = vec![
                format!("--frames={frames}"),
                format!("--skip={skip}"),
                format!("--ppp-forms={ppp_forms}"),
                format!("--action={action}"),
                format!("--show={show}"),
            ];
            args.extend(seed.map(|s| format!("--seed={s}")));
            fuzz::run(&args)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_options_parse_with_and_without_vm() {
        let plain = Cli::try_parse_from(["xtask", "test", "filter"]).unwrap();
        assert!(
            matches!(plain.cmd, Cmd::Test { vm: None, host_only: false, ref args, .. } if args == &["filter"])
        );
        let host = Cli::try_parse_from(["xtask", "test", "--host-only"]).unwrap();
        assert!(matches!(
            host.cmd,
            Cmd::Test {
                vm: None,
                host_only: true,
                ..
            }
        ));
        assert!(Cli::try_parse_from(["xtask", "test", "--host-only", "--vm", "6.1"]).is_err());
        let vm = Cli::try_parse_from([
            "xtask",
            "test",
            "--vm",
            "6.1",
            "--vm-test",
            "e2e",
            "--vm-test",
            "lifecycle",
            "--",
            "--test-threads=1",
        ])
        .unwrap();
        let Cmd::Test {
            vm: Some(k),
            vm_tests,
            vm_timeout,
            vm_flavour,
            args,
            ..
        } = vm.cmd
        else {
            panic!("not test --vm");
        };
        assert_eq!(k, "6.1");
        assert_eq!(vm_tests, ["e2e", "lifecycle"]);
        assert_eq!(vm_timeout, VM_TIMEOUT_S);
        assert_eq!(vm_flavour, "cloud");
        assert_eq!(args, ["--test-threads=1"]);
        let generic = ["xtask", "test", "--vm", "6.1", "--vm-flavour", "generic"];
        assert!(matches!(
            Cli::try_parse_from(generic).unwrap().cmd,
            Cmd::Test { ref vm_flavour, .. } if vm_flavour == "generic"
        ));
        assert!(
            Cli::try_parse_from(["xtask", "test", "--vm", "6.1", "--vm-flavour", "rt"]).is_err()
        );
        assert!(Cli::try_parse_from(["xtask", "test", "--vm-flavour", "generic"]).is_err());
        // VM-only options without --vm are an error, not silently ignored.
        assert!(Cli::try_parse_from(["xtask", "test", "--vm-test", "e2e"]).is_err());
        assert!(Cli::try_parse_from(["xtask", "test", "--vm-timeout", "5"]).is_err());
    }
}
