//! Tunnels to an open decapsulator: a subscriber sends a SYN to port 25 from its own
//! (enforced) address inside VXLAN to a host on the Internet that takes in VXLAN from anyone;
//! that kernel turns the inner frame into a TCP segment from the subscriber's address, and the
//! answer comes back natively. The parser looks one level into the tunnel and blocks it
//! (it read the outer UDP only before: the whole SMTP session worked). Real daemon, real
//! kernels; skipped when the kernel cannot make a vxlan device.

use std::time::Duration;

use port25_tests::{lab::Lab, require_root};

const XDP_GENERIC: &str = "  - name: rs\n    hook: xdp\n    xdp_mode: generic";

fn ip(ns: &str, args: &str) {
    let mut a = vec!["-n", ns];
    a.extend(args.split(' '));
    let out = std::process::Command::new("ip").args(&a).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ip` that may fail (the vxlan module may be missing): whether it worked, and why not.
fn try_ip(ns: &str, args: &str) -> Result<(), String> {
    let mut a = vec!["-n", ns];
    a.extend(args.split(' '));
    let out = std::process::Command::new("ip").args(&a).output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn sysctl(ns: &str, kv: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "sysctl", "-qw"])
        .args(kv)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn tunnelled_syn_from_enforced_source_is_blocked() {
    require_root!();
    let mut lab = Lab::new(XDP_GENERIC);
    // The far side: a VXLAN endpoint that accepts any sender (an open decapsulator).
    if let Err(e) = try_ip(
        &lab.net,
        "link add vx0 type vxlan id 5 dstport 4789 local 192.0.2.2",
    ) {
        eprintln!("skipped: cannot create a vxlan device ({e})");
        return;
    }
    ip(&lab.net, "link set vx0 address 02:00:00:00:25:02");
    ip(&lab.net, "addr add 10.99.0.1/24 dev vx0");
    ip(&lab.net, "link set vx0 up");
    sysctl(
        &lab.net,
        &[
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.vx0.rp_filter=0",
        ],
    );
    // The subscriber: sends its SYN (source = its own address) inside VXLAN to that endpoint.
    ip(
        &lab.sub,
        "link add vx0 type vxlan id 5 dstport 4789 local 100.64.0.2 remote 192.0.2.2",
    );
    ip(&lab.sub, "link set vx0 up");
    ip(
        &lab.sub,
        "neigh add 203.0.113.80 lladdr 02:00:00:00:25:02 dev vx0",
    );
    ip(&lab.sub, "route add 203.0.113.80/32 dev vx0 src 100.64.0.2");
    sysctl(
        &lab.sub,
        &[
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.s0.rp_filter=0",
        ],
    );
    let (sub, ext) = (
        "100.64.0.2".parse().unwrap(),
        "203.0.113.80".parse().unwrap(),
    );
    assert!(
        lab.connect(sub, ext, 25, Duration::from_secs(3)),
        "lab broken: the tunnelled connect fails even without port25"
    );
    lab.start_daemon();
    // Enforcing: without the tunnel the same connect is blocked.
    ip(&lab.sub, "route del 203.0.113.80/32 dev vx0");
    assert!(
        !lab.connect(sub, ext, 25, Duration::from_secs(2)),
        "port25 not enforcing"
    );
    ip(&lab.sub, "route add 203.0.113.80/32 dev vx0 src 100.64.0.2");
    let before = lab.accepted(ext, 25);
    let leaked = lab.connect(sub, ext, 25, Duration::from_secs(3));
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !leaked && lab.accepted(ext, 25) == before,
        "LEAK: enforced {sub} completed a TCP connection to {ext}:25 through a tunnel while \
         port25 was enforcing"
    );
}
