//! `cargo xtask lab`: three network namespaces (subscriber, router, internet), the real
//! daemon attached on the router, a table of real connections, and `port25-ctl check`
//! explaining one blocked and one allowed. Exits non-zero if any connection surprises.

use std::{io::BufRead, net::IpAddr, process::ExitCode};

use clap::{Parser, ValueEnum};
use port25_tests::lab::{self, Lab};

#[derive(Clone, Copy, ValueEnum)]
enum HookChoice {
    /// XDP, native mode, on the subscriber-facing device.
    Xdp,
    /// XDP, generic (skb) mode.
    XdpGeneric,
    /// TC ingress on the subscriber-facing device.
    Tc,
    /// TC egress on the upstream device.
    TcEgress,
}

#[derive(Parser)]
#[command(name = "port25-lab")]
struct Args {
    #[arg(long, value_enum, default_value = "xdp")]
    hook: HookChoice,
    /// Leave the lab up until Enter is pressed (explore with `ip netns exec`).
    #[arg(long)]
    keep: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !nix::unistd::geteuid().is_root() {
        eprintln!("port25-lab: needs root (network namespaces, BPF)");
        return ExitCode::FAILURE;
    }
    let interfaces = match args.hook {
        HookChoice::Xdp => "  - name: rs\n    hook: xdp\n    xdp_mode: native",
        HookChoice::XdpGeneric => "  - name: rs\n    hook: xdp\n    xdp_mode: generic",
        HookChoice::Tc => "  - name: rs\n    hook: tc\n    direction: ingress",
        HookChoice::TcEgress => "  - name: ru\n    hook: tc\n    direction: egress",
    };
    let mut lab = Lab::new(interfaces);
    lab.write_config("exempt:\n  - prefix: 100.64.0.3/32\n  - prefix: \"2001:db8:100::3/128\"\n");
    println!(
        "lab: subscriber {} <-> router {} <-> internet {}",
        lab.sub, lab.rtr, lab.net
    );
    println!(
        "config ({}):\n{}",
        lab.config.display(),
        indent(&std::fs::read_to_string(&lab.config).unwrap())
    );
    lab.start_daemon();
    println!(
        "daemon enforcing; control socket {}\n",
        lab.socket.display()
    );

    let mut surprises = 0;
    println!(
        "{:<18} {:<34} {:>5}  {:<8} {:<8}",
        "FROM", "TO", "PORT", "EXPECTED", "GOT"
    );
    for a in [lab::v4(), lab::v6()] {
        let rows: [(IpAddr, IpAddr, &str, u16, bool); 7] = [
            (a.sub, a.ext, "external MX", 25, false),
            (a.sub, a.mail, "ISP mail server", 25, true),
            (a.sub, a.ext, "external MX", 587, true),
            (a.sub, a.ext, "external MX", 465, true),
            (a.sub, a.ext, "external MX", 2525, true),
            (a.exempt, a.ext, "external MX", 25, true),
            (a.exempt, a.mail, "ISP mail server", 25, true),
        ];
        for (src, dst, what, port, want) in rows {
            let got = lab.can_connect(src, dst, port);
            let word = |b: bool| if b { "allowed" } else { "blocked" };
            let mark = if got == want { "" } else { "  <-- UNEXPECTED" };
            surprises += (got != want) as u32;
            println!(
                "{:<18} {:<34} {:>5}  {:<8} {:<8}{mark}",
                src.to_string(),
                format!("{dst} ({what})"),
                port,
                word(want),
                word(got)
            );
        }
    }
    let (v4, _) = (lab::v4(), lab::v6());
    for (src, dst) in [(v4.sub, v4.ext), (v4.sub, v4.mail), (v4.exempt, v4.ext)] {
        let (s, d) = (src.to_string(), dst.to_string());
        println!("\n$ port25-ctl check {s} {d}");
        print!(
            "{}",
            String::from_utf8_lossy(&lab.ctl(&["check", &s, &d]).stdout)
        );
    }
    println!("\n$ port25-ctl status");
    print!("{}", String::from_utf8_lossy(&lab.ctl(&["status"]).stdout));
    if args.keep {
        println!(
            "\nlab kept: try `ip netns exec {} nc -vz 203.0.113.80 25`; press Enter to tear down",
            lab.sub
        );
        let _ = std::io::stdin().lock().lines().next();
    }
    if surprises > 0 {
        eprintln!("\nport25-lab: {surprises} unexpected result(s)");
        return ExitCode::FAILURE;
    }
    println!("\nport25-lab: every connection as expected");
    ExitCode::SUCCESS
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}
