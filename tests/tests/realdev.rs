//! Real devices that a router has and this host's kernel lacks: an 802.1Q VLAN subinterface
//! and a PPPoE session (`pppoe-server` on the BRAS, `pppd` with the rp-pppoe plugin, i.e. the
//! kernel's pppoe module, on the subscriber, both from Debian's `ppp` and `pppoe` packages). Real daemon, real TCP from the
//! subscriber: port 25 to the external MX is blocked, 587 passes. Run in the VM
//! (`cargo xtask test --vm 6.1 --vm-test realdev`, which carries the modules and binaries);
//! skipped, with the reason, on a kernel without 8021q or pppoe, or without pppd.

use std::{
    net::IpAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use port25_tests::{lab::Lab, require_root, skip};

/// The external MX of the lab (listening on 25, 587, 465, 2525 in the internet namespace).
const EXT: &str = "203.0.113.80";
const VLAN_SUB: &str = "100.64.100.2";
const PPP_SUB: &str = "100.64.50.10";
const PPP_BRAS: &str = "100.64.50.1";

fn try_ip(ns: &str, args: &str) -> Result<String, String> {
    let mut a = vec!["-n", ns];
    a.extend(args.split(' '));
    let out = Command::new("ip").args(&a).output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn ip(ns: &str, args: &str) -> String {
    try_ip(ns, args).unwrap_or_else(|e| panic!("ip -n {ns} {args}: {e}"))
}

fn in_ns(ns: &str, cmd: &[&str]) {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .args(cmd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn addr(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Port 25 to the external MX blocked from `sub`, 587 passing, and nothing reached the MX's 25.
fn assert_enforced(lab: &Lab, sub: &str, what: &str) {
    let (sub, ext) = (addr(sub), addr(EXT));
    let before = lab.accepted(ext, 25);
    assert!(
        !lab.connect(sub, ext, 25, Duration::from_secs(3)),
        "LEAK ({what}): {sub} -> {ext}:25 connected while port25 was enforcing\n{}",
        lab.daemon_log()
    );
    assert!(
        lab.connect(sub, ext, 587, Duration::from_secs(5)),
        "{what}: {sub} -> {ext}:587 must pass"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        lab.accepted(ext, 25),
        before,
        "LEAK ({what}): the MX accepted on 25"
    );
}

// ---------------------------------------------------------------------------------------------
// VLAN

/// The lab with VLAN 100 between the subscriber (`s0.100`, 100.64.100.2) and the router
/// (`rs.100`, 100.64.100.1), the external MX routed over it; None (skipped) without 8021q.
fn vlan_lab(interfaces: &str) -> Option<Lab> {
    let lab = Lab::new(interfaces);
    if let Err(e) = try_ip(&lab.sub, "link add link s0 name s0.100 type vlan id 100") {
        skip(
            None,
            &format!("this kernel cannot make an 802.1Q VLAN device (module 8021q): {e}"),
        );
        return None;
    }
    // The tag in the frame's bytes, as on a wire: with tx VLAN offload veth would carry it in
    // the skb's metadata and XDP on `rs` would see an untagged frame.
    in_ns(&lab.sub, &["ethtool", "-K", "s0", "txvlan", "off"]);
    ip(&lab.rtr, "link add link rs name rs.100 type vlan id 100");
    ip(&lab.sub, "addr add 100.64.100.2/24 dev s0.100");
    ip(&lab.sub, "link set s0.100 up");
    ip(&lab.sub, &format!("route add {EXT}/32 via 100.64.100.1"));
    ip(&lab.rtr, "addr add 100.64.100.1/24 dev rs.100");
    ip(&lab.rtr, "link set rs.100 up");
    ip(&lab.net, "route add 100.64.100.0/24 via 192.0.2.1");
    assert!(
        lab.connect(addr(VLAN_SUB), addr(EXT), 25, Duration::from_secs(5)),
        "lab broken: {VLAN_SUB} -> {EXT}:25 over VLAN 100 fails without port25"
    );
    Some(lab)
}

fn vlan(interfaces: &str, what: &str) {
    let Some(mut lab) = vlan_lab(interfaces) else {
        return;
    };
    // Packets sent on the VLAN device: the probes took it, not the untagged path.
    let tx = |lab: &Lab| -> u64 {
        let j: serde_json::Value =
            serde_json::from_str(&ip(&lab.sub, "-j -s link show dev s0.100")).unwrap();
        j[0]["stats64"]["tx"]["packets"]
            .as_u64()
            .expect("tx packets")
    };
    lab.start_daemon();
    let sent = tx(&lab);
    assert_enforced(&lab, VLAN_SUB, what);
    assert!(
        tx(&lab) > sent,
        "{what}: the probes left through s0.100 (VLAN 100)"
    );
}

/// XDP on the parent Ethernet device parses the 802.1Q tag.
#[test]
fn vlan_xdp_generic_on_parent() {
    require_root!();
    vlan(
        "  - name: rs\n    hook: xdp\n    xdp_mode: generic",
        "XDP generic on rs, tagged",
    );
}

#[test]
fn vlan_xdp_native_on_parent() {
    require_root!();
    vlan(
        "  - name: rs\n    hook: xdp\n    xdp_mode: native",
        "XDP native on rs, tagged",
    );
}

/// XDP on the VLAN device itself (generic: VLAN devices have no driver hook) sees the
/// untagged frame.
#[test]
fn vlan_xdp_generic_on_vlan_device() {
    require_root!();
    vlan(
        "  - name: rs.100\n    hook: xdp\n    xdp_mode: generic",
        "XDP generic on rs.100",
    );
}

// ---------------------------------------------------------------------------------------------
// PPPoE

const PPPD: &str = "/usr/sbin/pppd";
const PPPOE_SERVER: &str = "/usr/sbin/pppoe-server";

/// Why this machine cannot run a PPPoE session, if it cannot.
fn pppoe_missing() -> Option<String> {
    if !Path::new("/proc/net/pppoe").exists() {
        return Some(
            "this kernel has no PPPoE (no /proc/net/pppoe: module pppoe; Debian's cloud-amd64 \
             kernels are built without PPP, `cargo xtask test --vm 6.1 --vm-flavour generic` \
             has it)"
                .into(),
        );
    }
    if !Path::new("/dev/ppp").exists() {
        return Some("no /dev/ppp (module ppp_generic)".into());
    }
    for bin in [PPPD, PPPOE_SERVER, "/usr/sbin/pppoe"] {
        if !Path::new(bin).exists() {
            return Some(format!(
                "no {bin} (Debian packages ppp and pppoe; the VM carries them)"
            ));
        }
    }
    None
}

/// A PPPoE session: pppoe-server on the BRAS (router namespace, on `rs`), pppd on the
/// subscriber (on `s0`). Dropped before its lab: kills the pppds and the server it started.
struct Session {
    children: Vec<Child>,
    namespaces: [String; 2],
    /// The BRAS's ppp device of the session.
    bras_dev: String,
}

impl Drop for Session {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The BRAS's per-session pppd is pppoe-server's child, not ours to wait for: find it
        // by namespace, and only a pppd.
        for ns in &self.namespaces {
            let pids = Command::new("ip")
                .args(["netns", "pids", ns])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.trim() == "pppd" {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }
}

fn logs(lab: &Lab) -> String {
    ["pppoe-server.log", "pppd-bras.log", "pppd-sub.log"]
        .iter()
        .map(|f| {
            format!(
                "--- {f}\n{}",
                std::fs::read_to_string(lab.dir.join(f)).unwrap_or_default()
            )
        })
        .collect()
}

/// Brings up the session and routes the external MX over it; None (skipped) when it cannot.
fn pppoe_session(lab: &Lab) -> Option<Session> {
    if let Some(why) = pppoe_missing() {
        skip(None, &why);
        return None;
    }
    let opts = lab.dir.join("pppoe-server-options");
    std::fs::write(
        &opts,
        format!(
            "noauth\nnodefaultroute\nlcp-echo-interval 0\ndebug\nlogfile {}\n",
            lab.dir.join("pppd-bras.log").display()
        ),
    )
    .unwrap();
    let log = |name: &str| std::fs::File::create(lab.dir.join(name)).unwrap();
    let mut session = Session {
        children: vec![],
        namespaces: [lab.rtr.clone(), lab.sub.clone()],
        bras_dev: String::new(),
    };
    // Debian's pppoe-server has no kernel mode (`-k`): each session is a pppd on a pty with
    // the user-space `pppoe` relaying frames from `rs`. XDP on `rs` runs before that packet
    // socket sees a frame; the BRAS's ppp device is a real one either way.
    session.children.push(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", lab.rtr))
            .arg(PPPOE_SERVER)
            .args(["-F", "-I", "rs", "-L", PPP_BRAS, "-R", PPP_SUB, "-N", "4"])
            .arg("-O")
            .arg(&opts)
            .stdout(log("pppoe-server.log"))
            .stderr(log("pppoe-server.log"))
            .spawn()
            .expect("spawn pppoe-server"),
    );
    std::thread::sleep(Duration::from_millis(500));
    session.children.push(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", lab.sub))
            .arg(PPPD)
            .args([
                "nodetach",
                "plugin",
                "rp-pppoe.so",
                "nic-s0",
                "noauth",
                "noipdefault",
                "nodefaultroute",
                "lcp-echo-interval",
                "0",
                "unit",
                "0",
                "debug",
                "logfile",
            ])
            .arg(lab.dir.join("pppd-sub.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log("pppd-sub.stderr"))
            .spawn()
            .expect("spawn pppd"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let sub = try_ip(&lab.sub, "-o -4 addr show dev ppp0").unwrap_or_default();
        let bras = try_ip(&lab.rtr, "-o link show type ppp").unwrap_or_default();
        if sub.contains(PPP_SUB) {
            if let Some(dev) = bras.split(": ").nth(1) {
                session.bras_dev = dev.split('@').next().unwrap().to_string();
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no PPPoE session after 60 s\n{}",
            logs(lab)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The subscriber reaches the MX over the session; the internet routes the pool back.
    ip(&lab.sub, &format!("route add {EXT}/32 dev ppp0"));
    ip(&lab.net, "route add 100.64.50.0/24 via 192.0.2.1");
    assert!(
        lab.connect(addr(PPP_SUB), addr(EXT), 25, Duration::from_secs(5)),
        "lab broken: {PPP_SUB} -> {EXT}:25 over PPPoE fails without port25\n{}",
        logs(lab)
    );
    Some(session)
}

/// XDP on the BRAS's Ethernet side parses the PPPoE session header and PPP protocol.
fn pppoe_xdp(mode: &str) {
    let mut lab = Lab::new(&format!(
        "  - name: rs\n    hook: xdp\n    xdp_mode: {mode}"
    ));
    let Some(_session) = pppoe_session(&lab) else {
        return;
    };
    lab.start_daemon();
    assert_enforced(
        &lab,
        PPP_SUB,
        &format!("XDP {mode} on the BRAS's Ethernet side"),
    );
}

#[test]
fn pppoe_xdp_generic_on_bras_ethernet() {
    require_root!();
    pppoe_xdp("generic");
}

#[test]
fn pppoe_xdp_native_on_bras_ethernet() {
    require_root!();
    pppoe_xdp("native");
}

/// TC on the BRAS's ppp device (raw IP: only TC can see it): tcx where the kernel has it,
/// a netlink clsact filter where it does not (6.1).
#[test]
fn pppoe_tc_on_bras_ppp_device() {
    require_root!();
    let mut lab = Lab::new("");
    let Some(session) = pppoe_session(&lab) else {
        return;
    };
    lab.interfaces = format!(
        "  - name: {}\n    hook: tc\n    direction: ingress",
        session.bras_dev
    );
    lab.write_config("");
    if let Err(log) = lab.try_start_daemon() {
        panic!("daemon refused TC on {}: {log}", session.bras_dev);
    }
    assert_enforced(
        &lab,
        PPP_SUB,
        &format!("TC ingress on the BRAS's {}", session.bras_dev),
    );
}
