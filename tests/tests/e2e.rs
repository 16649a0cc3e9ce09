//! End to end: real TCP connections from a subscriber namespace through a router namespace
//! where the real daemon attached the programs, to an internet namespace.

use std::time::Duration;

use port25_tests::{
    lab::{self, Lab},
    require_root,
};

const XDP: &str = "  - name: rs\n    hook: xdp\n    xdp_mode: native";
const XDP_GENERIC: &str = "  - name: rs\n    hook: xdp\n    xdp_mode: generic";
const TC: &str = "  - name: rs\n    hook: tc\n    direction: ingress";
const TC_EGRESS: &str = "  - name: ru\n    hook: tc\n    direction: egress";
// The netlink clsact filter that kernels without tcx get, forced where tcx exists.
const TC_NETLINK: &str =
    "  - name: rs\n    hook: tc\n    direction: ingress\n    tc_attach: netlink";
const TC_EGRESS_NETLINK: &str =
    "  - name: ru\n    hook: tc\n    direction: egress\n    tc_attach: netlink";
const EXEMPT: &str = "exempt:\n  - prefix: 100.64.0.3/32\n  - prefix: \"2001:db8:100::3/128\"\n";

fn matrix(interfaces: &str) {
    let mut lab = Lab::new(interfaces);
    lab.write_config(EXEMPT);
    // Before enforcement, everything connects: the lab itself works.
    for a in [lab::v4(), lab::v6()] {
        assert!(
            lab.can_connect(a.sub, a.ext, 25),
            "lab broken: {} -> {}:25",
            a.sub,
            a.ext
        );
    }
    // The very first probe after the daemon answers must already be blocked: the daemon binds
    // its socket only once the programs are attached (an earlier lab waited for the socket to
    // accept, which it did before attach, and saw connections pass).
    lab.start_daemon();
    for a in [lab::v4(), lab::v6()] {
        assert!(
            !lab.can_connect(a.sub, a.ext, 25),
            "{} -> external {}:25 must fail",
            a.sub,
            a.ext
        );
        assert!(
            lab.can_connect(a.sub, a.mail, 25),
            "{} -> mail server {}:25 must work",
            a.sub,
            a.mail
        );
        for p in [587, 465, 2525] {
            assert!(
                lab.can_connect(a.sub, a.ext, p),
                "{} -> external {}:{p} must work",
                a.sub,
                a.ext
            );
        }
        assert!(
            lab.can_connect(a.exempt, a.ext, 25),
            "exempt {} -> {}:25 must work",
            a.exempt,
            a.ext
        );
    }
    let st = lab.ctl(&["status", "--json"]);
    assert!(
        st.status.success(),
        "status: {}",
        String::from_utf8_lossy(&st.stdout)
    );
    // The kind status reports is the one asked for (auto: tcx where the kernel has it).
    let js: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    let want = if interfaces.contains("hook: xdp") {
        "xdp"
    } else if interfaces.contains("tc_attach: netlink") || port25_tests::tcx_missing().is_some() {
        "netlink"
    } else {
        "tcx"
    };
    assert_eq!(js["interfaces"][0]["kind"], want, "{js}");
}

#[test]
fn xdp_native_matrix() {
    require_root!();
    matrix(XDP);
}

#[test]
fn xdp_generic_matrix() {
    require_root!();
    matrix(XDP_GENERIC);
}

#[test]
fn tc_ingress_matrix() {
    require_root!();
    matrix(TC);
}

#[test]
fn tc_egress_upstream_matrix() {
    require_root!();
    matrix(TC_EGRESS);
}

#[test]
fn tc_ingress_netlink_matrix() {
    require_root!();
    matrix(TC_NETLINK);
}

#[test]
fn tc_egress_upstream_netlink_matrix() {
    require_root!();
    matrix(TC_EGRESS_NETLINK);
}

/// `action: reject`: the subscriber's connect is refused at once by a RST from the router,
/// instead of timing out; everything else is as with drop.
fn reject(interfaces: &str) {
    let mut lab = Lab::new(interfaces);
    lab.write_config("action: reject\n");
    lab.start_daemon();
    for a in [lab::v4(), lab::v6()] {
        let t = std::time::Instant::now();
        let r = lab.connect_result(a.sub, a.ext, 25, Duration::from_secs(3));
        let took = t.elapsed();
        assert_eq!(
            r.as_ref().map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionRefused),
            "{} -> {}:25 refused by a RST: {r:?}",
            a.sub,
            a.ext
        );
        // Seen about 1 run in 100 (IPv6 only, never reproduced on demand): the RST answers the
        // SYN's retransmission (1 s) instead of the first SYN. Still refused, never through; a
        // drop would time out at 3 s. On a slow answer the message carries what tells the two
        // candidate causes apart: the source's attempts as the kernel tracked them (2 = the
        // program saw the first SYN, 1 = it never reached the router) and both neighbour tables.
        if took >= Duration::from_millis(1500) {
            let ip = |ns: &str| {
                let o = std::process::Command::new("ip")
                    .args(["-n", ns, "neigh"])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&o.stdout).into_owned()
            };
            let top = lab.ctl(&["top", "--json"]);
            panic!(
                "{} -> {}:25 refused after {took:?}, not at once\ntop: {}\nsubscriber neighbours:\n{}router neighbours:\n{}",
                a.sub,
                a.ext,
                String::from_utf8_lossy(&top.stdout),
                ip(&lab.sub),
                ip(&lab.rtr)
            );
        }
        assert_eq!(
            lab.accepted(a.ext, 25),
            0,
            "nothing reached the external MX"
        );
        assert!(
            lab.can_connect(a.sub, a.mail, 25),
            "mail server still reachable"
        );
        assert!(lab.can_connect(a.sub, a.ext, 587), "submission still open");
    }
}

// Native XDP's answer (XDP_TX) is checked byte for byte, checksums included, in the kernel
// tests (tests/datapath.rs). Over veth in this lab, frames that XDP_TX sends back from the
// router side are counted as sent (`rx_queue_0_xdp_tx`) but never reach the subscriber's
// stack; the program is the same one generic mode runs end to end below.

#[test]
fn xdp_generic_reject() {
    require_root!();
    reject(XDP_GENERIC);
}

#[test]
fn tc_ingress_reject() {
    require_root!();
    reject(TC);
}

#[test]
fn tc_ingress_netlink_reject() {
    require_root!();
    reject(TC_NETLINK);
}

#[test]
fn tc_egress_upstream_reject() {
    require_root!();
    reject(TC_EGRESS);
}

/// The config's socket hint (`trusted.port25.socket`), if any, as a string.
fn socket_hint(config: &std::path::Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(config.as_os_str().as_bytes()).unwrap();
    let mut buf = [0u8; 4096 + 64];
    // SAFETY: NUL-terminated path and name, a buffer of the given length.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            c"trusted.port25.socket".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let n = usize::try_from(n).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Waits for a hint naming the lab's socket other than `old`, with no CLI call made (the
/// daemon writes it).
fn hint_appears(lab: &Lab, old: Option<&str>) -> Option<String> {
    let want = format!("found {}", lab.socket.display());
    let deadline = std::time::Instant::now() + Duration::from_secs(5) * port25_tests::patience();
    while std::time::Instant::now() < deadline {
        if let Some(h) = socket_hint(&lab.config) {
            if h.ends_with(&want) && Some(h.as_str()) != old {
                return Some(h);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// The daemon itself leaves the socket hint on its config file at start and at reload, so
/// no client verb (a hook per session event) pays the scan of a big config first.
#[test]
fn the_daemon_leaves_the_socket_hint_on_its_config() {
    require_root!();
    let mut lab = Lab::new(XDP_GENERIC);
    assert_eq!(socket_hint(&lab.config), None, "a fresh config has no hint");
    lab.start_daemon();
    let first = hint_appears(&lab, None).expect("the hint after a start");
    // A rewritten file (another size and time) needs a new hint: a reload (over the
    // socket, not the CLI) leaves it.
    lab.write_config(EXEMPT);
    lab.client()
        .call(port25_ctl::control::proto::Reload)
        .unwrap();
    assert!(
        hint_appears(&lab, Some(&first)).is_some(),
        "the hint after a reload"
    );
}
