//! The daemon's life in the namespace lab: reload, refused reloads, kill -9, a restart under
//! a stream of SYNs, a map migration (changed limits) under the same, a lost link pin, and
//! detach.

use std::time::Duration;

use port25_common::maps::{Settings, LAYOUT_VERSION};
use port25_ctl::{
    bpf::livemaps::LiveMaps,
    control::proto::{self, ErrorKind},
};
use port25_tests::{
    lab::{self, Lab},
    require_root, text,
};

const XDP: &str = "  - name: rs\n    hook: xdp\n    xdp_mode: native";
const EXEMPT_SUB: &str = "exempt:\n  - prefix: 100.64.0.2/32\n";

fn assert_blocked(lab: &Lab, what: &str) {
    for a in [lab::v4(), lab::v6()] {
        assert!(
            !lab.can_connect(a.sub, a.ext, 25),
            "{what}: {} -> {}:25 must be blocked",
            a.sub,
            a.ext
        );
        assert!(
            lab.can_connect(a.sub, a.mail, 25),
            "{what}: {} -> mail server {}:25 must work",
            a.sub,
            a.mail
        );
    }
}

#[test]
fn lifecycle() {
    require_root!();
    let mut lab = Lab::new(XDP);
    let (v4, v6) = (lab::v4(), lab::v6());
    lab.start_daemon();
    assert_blocked(&lab, "fresh start");

    // A reload applies to new connections.
    lab.write_config(EXEMPT_SUB);
    let r = lab.ctl(&["reload"]);
    assert!(r.status.success(), "reload: {}", text(&r));
    assert!(lab.can_connect(v4.sub, v4.ext, 25), "exempted by reload");
    assert!(
        !lab.can_connect(v6.sub, v6.ext, 25),
        "only the v4 address was exempted"
    );

    // A bad file is refused, by `reload` and by SIGHUP, and changes nothing.
    let good = std::fs::read_to_string(&lab.config).unwrap();
    std::fs::write(&lab.config, good.replace("blocked_ports:", "blocked_port:")).unwrap();
    let r = lab.ctl(&["reload"]);
    assert!(!r.status.success(), "a bad reload must fail: {}", text(&r));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("blocked_port") && err.contains(&lab.config.display().to_string()),
        "the error names the key and the file: {err}"
    );
    lab.signal_daemon(nix::sys::signal::Signal::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        lab.can_connect(v4.sub, v4.ext, 25),
        "bad reload left the exemption in place"
    );
    assert!(
        !lab.can_connect(v6.sub, v6.ext, 25),
        "bad reload left the block in place"
    );
    assert!(
        lab.daemon_log().contains("reload refused"),
        "SIGHUP with a bad file is logged: {}",
        lab.daemon_log()
    );
    lab.write_config("");
    let r = lab.ctl(&["reload"]);
    assert!(r.status.success(), "reload: {}", text(&r));
    assert_blocked(&lab, "exemption removed by reload");

    // kill -9: enforcement continues from the pins; status still reports, from the pins.
    lab.kill9();
    assert_blocked(&lab, "after kill -9");
    let st = lab.ctl(&["status", "--json"]);
    assert!(
        st.status.success(),
        "status with the daemon down: {}",
        text(&st)
    );
    let js: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert!(
        js["daemon"].is_null(),
        "status says the daemon is down: {js}"
    );
    assert_eq!(js["interfaces"][0]["attached"], true, "{js}");
    let human = lab.ctl(&["status"]);
    assert!(
        String::from_utf8_lossy(&human.stdout)
            .to_lowercase()
            .contains("down"),
        "{}",
        text(&human)
    );

    // A restart under a stream of SYNs: none to port 25 crosses the router, while SYNs to
    // 587 in the same rounds do (so the sniffer is seen to work).
    let (to25, to587) = lab.start_daemon_under_syn_stream();
    assert!(to587 > 0, "the sniffer sees the control SYNs");
    assert_eq!(to25, 0, "no SYN to port 25 crossed during the restart");
    assert!(
        lab.daemon_log().contains("Swapped"),
        "the restart adopted the pinned link: {}",
        lab.daemon_log()
    );
    assert_blocked(&lab, "after restart");

    // Changed limits: a reload refuses them (the maps cannot grow in place) and changes
    // nothing...
    lab.write_config("limits:\n  mail_servers: 17\n");
    let r = lab.ctl(&["reload"]);
    let err = String::from_utf8_lossy(&r.stderr).to_string();
    assert!(!r.status.success(), "{}", text(&r));
    assert!(
        err.contains("P25_MAIL4") && err.contains("Restart the daemon"),
        "the refusal names the map and the way out: {err}"
    );
    // Over the socket it is a refusal (the same reload fails again), not a daemon failure.
    match lab.client().call(proto::Reload) {
        Err(proto::Error::Daemon {
            kind: ErrorKind::Refused,
            message,
        }) => assert!(message.contains("P25_MAIL4"), "{message}"),
        other => panic!("not a refusal: {other:?}"),
    }
    assert_blocked(&lab, "after a refused reload");
    // ...and a restart moves to new maps with no SYN to port 25 crossing meanwhile.
    lab.kill9();
    let (to25, to587) = lab.start_daemon_under_syn_stream();
    assert!(to587 > 0, "the sniffer sees the control SYNs");
    assert_eq!(to25, 0, "no SYN to port 25 crossed during the migration");
    assert!(
        lab.daemon_log().contains("maps migrated"),
        "{}",
        lab.daemon_log()
    );
    let st = lab.ctl(&["status", "--json"]);
    let js: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    let mail4 = js["maps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["map"] == "P25_MAIL4")
        .unwrap();
    assert_eq!(mail4["capacity"], 17, "the new maps are in place: {js}");
    assert_eq!(mail4["entries"], 1, "and filled");
    assert!(
        !lab.pin_dir.join("maps-next").exists(),
        "no staging left behind"
    );
    assert_blocked(&lab, "after the migration");
    lab.kill9();
    lab.write_config("");

    // A lost link pin: status says so and exits 3; the next start attaches afresh.
    let pin = lab.pin_dir.join("links").join("xdp:rs");
    std::fs::remove_file(&pin).unwrap();
    let st = lab.ctl(&["status"]);
    assert_eq!(st.status.code(), Some(3), "{}", text(&st));
    assert!(
        String::from_utf8_lossy(&st.stdout).contains("no pinned link"),
        "{}",
        text(&st)
    );
    lab.start_daemon();
    assert_blocked(&lab, "after a fresh attach");

    // detach: programs and every pin gone, port 25 flows.
    let d = lab.ctl(&["detach"]);
    assert!(d.status.success(), "detach: {}", text(&d));
    assert!(
        lab.wait_daemon_exit(Duration::from_secs(5)),
        "the daemon exits on detach"
    );
    for a in [v4, v6] {
        assert!(
            lab.can_connect(a.sub, a.ext, 25),
            "after detach {} -> {}:25",
            a.sub,
            a.ext
        );
    }
    assert!(
        !lab.pin_dir.exists(),
        "no pin left under {}",
        lab.pin_dir.display()
    );
}

const TC_NETLINK: &str =
    "  - name: rs\n    hook: tc\n    direction: ingress\n    tc_attach: netlink";

/// `tc filter show` on the router's subscriber side, ingress.
fn tc_filters(lab: &Lab) -> String {
    let o = std::process::Command::new("tc")
        .args(["-n", &lab.rtr, "filter", "show", "dev", "rs", "ingress"])
        .output()
        .unwrap();
    assert!(o.status.success(), "tc filter show: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn tc(lab: &Lab, args: &[&str]) {
    let o = std::process::Command::new("tc")
        .args(["-n", &lab.rtr])
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "tc {args:?}: {}", text(&o));
}

/// Another user's filter at `prio`: classic BPF that matches nothing (`ret 0`), so packets
/// go on to the next filter; a `bpf` filter like port25's, but not port25's.
fn foreign_filter(lab: &Lab, prio: &str) {
    tc(
        lab,
        &[
            "filter",
            "add",
            "dev",
            "rs",
            "ingress",
            "prio",
            prio,
            "bpf",
            "bytecode",
            "1,6 0 0 0,",
        ],
    );
}

/// port25's own filters: at its fixed priority and handle, in direct-action mode.
fn own_filters(lab: &Lab) -> usize {
    tc_filters(lab)
        .lines()
        .filter(|l| {
            l.contains("pref 25 bpf")
                && l.contains("handle 0x25")
                && l.contains("port25_tc")
                && l.contains("direct-action")
        })
        .count()
}

/// TC through a netlink clsact filter (what kernels without tcx get; forced here so a
/// kernel with tcx tests it too): the filter outlives the daemon, a restart under a SYN
/// stream replaces its program in place with none to port 25 through and never a second
/// filter, a lost filter is reported and repaired, and detach removes exactly port25's
/// filter while another user's filter on the same hook stays.
#[test]
fn netlink_tc_lifecycle() {
    require_root!();
    let mut lab = Lab::new(TC_NETLINK);
    // Other users of clsact, one before port25 (pref 10) and one after it (pref 30).
    tc(&lab, &["qdisc", "add", "dev", "rs", "clsact"]);
    foreign_filter(&lab, "10");
    foreign_filter(&lab, "30");
    lab.start_daemon();
    assert_blocked(&lab, "fresh start");
    assert_eq!(own_filters(&lab), 1, "{}", tc_filters(&lab));
    let st = lab.ctl(&["status", "--json"]);
    assert!(st.status.success(), "status: {}", text(&st));
    let js: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    let i = &js["interfaces"][0];
    assert_eq!(i["kind"], "netlink", "{js}");
    assert_eq!(i["priority"], 25, "{js}");
    assert_eq!(i["handle"], "0x25", "{js}");
    let human = text(&lab.ctl(&["status"]));
    assert!(human.contains("netlink pref 25 handle 0x25"), "{human}");

    // kill -9: the filter stays and enforces; status reads it with the daemon down.
    lab.kill9();
    assert_blocked(&lab, "after kill -9");
    let st = lab.ctl(&["status", "--json"]);
    assert!(st.status.success(), "status, daemon down: {}", text(&st));

    // A restart under a stream of SYNs: the program is replaced in place.
    let (to25, to587) = lab.start_daemon_under_syn_stream();
    assert!(to587 > 0, "the sniffer sees the control SYNs");
    assert_eq!(to25, 0, "no SYN to port 25 crossed during the restart");
    assert!(
        lab.daemon_log().contains("Swapped"),
        "the restart adopted the filter: {}",
        lab.daemon_log()
    );
    assert_eq!(
        own_filters(&lab),
        1,
        "never a second filter: {}",
        tc_filters(&lab)
    );
    assert_blocked(&lab, "after restart");

    // A restart with the record lost: the filter is found by its place, not stacked.
    lab.kill9();
    std::fs::remove_file(lab.pin_dir.join("links").join("tc-ingress:rs")).unwrap();
    lab.start_daemon();
    assert_eq!(own_filters(&lab), 1, "{}", tc_filters(&lab));
    assert_blocked(&lab, "after a start without the record");

    // A filter lost while the daemon is down: status says so and exits 3; the start repairs
    // it. (With the daemon up it is put back at once: see
    // `netlink_filter_removed_under_the_daemon_is_put_back_at_once`.)
    lab.kill9();
    tc(
        &lab,
        &[
            "filter", "del", "dev", "rs", "ingress", "prio", "25", "handle", "0x25", "bpf",
        ],
    );
    let st = lab.ctl(&["status"]);
    assert_eq!(st.status.code(), Some(3), "{}", text(&st));
    assert!(text(&st).contains("missing"), "{}", text(&st));
    lab.start_daemon();
    assert_eq!(own_filters(&lab), 1, "{}", tc_filters(&lab));
    assert_blocked(&lab, "after the repair");

    // A filter of another user at port25's priority is refused, not grouped with ours.
    lab.kill9();
    tc(
        &lab,
        &[
            "filter", "del", "dev", "rs", "ingress", "prio", "25", "handle", "0x25", "bpf",
        ],
    );
    foreign_filter(&lab, "25");
    let e = lab
        .try_start_daemon()
        .expect_err("a foreign filter at priority 25 is refused");
    assert!(e.contains("priority 25"), "{e}");
    tc(
        &lab,
        &["filter", "del", "dev", "rs", "ingress", "prio", "25"],
    );
    lab.start_daemon();
    assert_eq!(own_filters(&lab), 1, "{}", tc_filters(&lab));

    // detach: port25's filter goes, the other users' stay.
    let d = lab.ctl(&["detach"]);
    assert!(d.status.success(), "detach: {}", text(&d));
    assert!(
        lab.wait_daemon_exit(Duration::from_secs(5)),
        "the daemon exits on detach"
    );
    let left = tc_filters(&lab);
    assert_eq!(own_filters(&lab), 0, "{left}");
    for p in ["pref 10 bpf", "pref 30 bpf"] {
        assert!(left.contains(p), "the foreign filter at {p} stays: {left}");
    }
    let (v4, v6) = (lab::v4(), lab::v6());
    for a in [v4, v6] {
        assert!(
            lab.can_connect(a.sub, a.ext, 25),
            "after detach {} -> {}:25",
            a.sub,
            a.ext
        );
    }
    assert!(
        !lab.pin_dir.exists(),
        "no pin left under {}",
        lab.pin_dir.display()
    );
}

/// The kind changes by reload (tcx to netlink and back): the new attachment is in place
/// before the old one goes, and the old one does go (no filter left over tcx, no tcx link
/// left under the filter's record).
#[test]
fn tc_attach_kind_changes_by_reload() {
    require_root!();
    port25_tests::require_tcx!();
    let tc_auto = TC_NETLINK.replace("\n    tc_attach: netlink", "");
    let mut lab = Lab::new(&tc_auto);
    lab.start_daemon();
    let kind = |lab: &Lab| {
        let st = lab.ctl(&["status", "--json"]);
        assert!(st.status.success(), "status: {}", text(&st));
        let js: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
        js["interfaces"][0]["kind"].as_str().unwrap().to_string()
    };
    assert_eq!(kind(&lab), "tcx");
    assert_eq!(own_filters(&lab), 0, "{}", tc_filters(&lab));
    let tcx_link = port25_ctl::bpf::linkinfo::read(&lab.pin_dir.join("links/tc-ingress:rs"))
        .unwrap()
        .link_id;

    lab.interfaces = TC_NETLINK.to_string();
    lab.write_config("");
    let r = lab.ctl(&["reload"]);
    assert!(r.status.success(), "reload: {}", text(&r));
    assert_eq!(kind(&lab), "netlink");
    assert_eq!(own_filters(&lab), 1, "{}", tc_filters(&lab));
    // The tcx link was released with its pin: the kernel no longer has it.
    assert!(
        !aya::programs::loaded_links()
            .flatten()
            .any(|l| l.id() == tcx_link),
        "tcx link {tcx_link} still there"
    );
    assert_blocked(&lab, "after tcx -> netlink");

    lab.interfaces = tc_auto;
    lab.write_config("");
    let r = lab.ctl(&["reload"]);
    assert!(r.status.success(), "reload: {}", text(&r));
    assert_eq!(kind(&lab), "tcx");
    assert_eq!(
        own_filters(&lab),
        0,
        "the filter went: {}",
        tc_filters(&lab)
    );
    assert_blocked(&lab, "after netlink -> tcx");

    // A filter whose record was lost (a crash between the steps of a move to tcx) goes too.
    lab.interfaces = TC_NETLINK.to_string();
    lab.write_config("");
    let r = lab.ctl(&["reload"]);
    assert!(r.status.success(), "reload: {}", text(&r));
    assert_eq!(own_filters(&lab), 1, "{}", tc_filters(&lab));
    lab.kill9();
    std::fs::remove_file(lab.pin_dir.join("links").join("tc-ingress:rs")).unwrap();
    lab.interfaces = TC_NETLINK.replace("\n    tc_attach: netlink", "");
    lab.write_config("");
    lab.start_daemon();
    assert_eq!(kind(&lab), "tcx");
    assert_eq!(
        own_filters(&lab),
        0,
        "the orphan filter went: {}",
        tc_filters(&lab)
    );
    assert_blocked(&lab, "after a start that found an orphan filter");
}

/// Another tool removes port25's netlink filter under a running daemon (`tc qdisc del dev
/// X clsact`, or `tc filter del`): unlike a tcx link, which `tc` cannot touch, the filter
/// can go, and port 25 is open until the daemon puts it back. It must do so at once (on the
/// kernel's TC notification), not at the next reconcile (60 s by default).
#[test]
fn netlink_filter_removed_under_the_daemon_is_put_back_at_once() {
    require_root!();
    let mut lab = Lab::new(TC_NETLINK);
    lab.start_daemon();
    assert_eq!(own_filters(&lab), 1, "{}", tc_filters(&lab));
    for (what, args) in [
        (
            "the clsact qdisc",
            &["qdisc", "del", "dev", "rs", "clsact"][..],
        ),
        (
            "the filter",
            &[
                "filter", "del", "dev", "rs", "ingress", "prio", "25", "handle", "0x25", "bpf",
            ][..],
        ),
    ] {
        tc(&lab, args);
        let t = std::time::Instant::now();
        while own_filters(&lab) == 0 && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            own_filters(&lab),
            1,
            "{what} removed: not put back within 5 s: {}\n{}",
            tc_filters(&lab),
            lab.daemon_log()
        );
        eprintln!("{what} removed: filter back after {:?}", t.elapsed());
        assert_blocked(&lab, &format!("after {what} was removed and put back"));
    }
    let st = lab.ctl(&["status"]);
    assert!(st.status.success(), "status: {}", text(&st));
}

/// Ingress and egress of one device, both through netlink: one filter on each hook, each at
/// port25's place, and `detach` removes both and nothing else.
#[test]
fn netlink_ingress_and_egress_on_one_device() {
    require_root!();
    let both = format!(
        "{TC_NETLINK}\n{}",
        TC_NETLINK.replace("direction: ingress", "direction: egress")
    );
    let mut lab = Lab::new(&both);
    tc(&lab, &["qdisc", "add", "dev", "rs", "clsact"]);
    foreign_filter(&lab, "30");
    lab.start_daemon();
    let egress = |lab: &Lab| {
        let o = std::process::Command::new("tc")
            .args(["-n", &lab.rtr, "filter", "show", "dev", "rs", "egress"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert_eq!(own_filters(&lab), 1, "{}", tc_filters(&lab));
    let eg = egress(&lab);
    assert_eq!(
        eg.lines()
            .filter(|l| l.contains("pref 25 bpf")
                && l.contains("handle 0x25")
                && l.contains("port25_tc"))
            .count(),
        1,
        "{eg}"
    );
    assert_blocked(&lab, "ingress + egress");
    let st = lab.ctl(&["status", "--json"]);
    assert!(st.status.success(), "status: {}", text(&st));
    let js: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    for i in 0..2 {
        assert_eq!(js["interfaces"][i]["kind"], "netlink", "{js}");
    }
    let d = lab.ctl(&["detach"]);
    assert!(d.status.success(), "detach: {}", text(&d));
    assert!(lab.wait_daemon_exit(Duration::from_secs(5)));
    assert_eq!(own_filters(&lab), 0, "{}", tc_filters(&lab));
    assert!(!egress(&lab).contains("port25_tc"), "{}", egress(&lab));
    assert!(
        tc_filters(&lab).contains("pref 30 bpf"),
        "{}",
        tc_filters(&lab)
    );
}

/// A filter from another loader whose program is named like port25's (`port25_tc...`), but
/// that is not at port25's exact place (handle 0x25, protocol all, chain 0): it is another
/// user's filter at priority 25, refused at start rather than grouped (stacked) with ours or
/// taken for ours.
#[test]
fn netlink_a_look_alike_filter_at_priority_25_is_refused() {
    require_root!();
    // The foreign loader: port25's own TC program, loaded apart and pinned as `port25_tc`,
    // which tc names `port25_tc:[*fsobj]`.
    let mut ebpf = aya::EbpfLoader::new()
        .load(port25_ctl::bpf::datapath::EBPF_OBJECT)
        .unwrap();
    let prog: &mut aya::programs::SchedClassifier =
        ebpf.program_mut("port25_tc").unwrap().try_into().unwrap();
    prog.load().unwrap();
    let dir = std::path::PathBuf::from("/sys/fs/bpf").join(port25_tests::unique("p25-lookalike-"));
    std::fs::create_dir_all(&dir).unwrap();
    let pinned = dir.join("port25_tc");
    prog.pin(&pinned).unwrap();
    let pinned = pinned.to_str().unwrap().to_string();
    let cases: [(&str, &[&str]); 3] = [
        (
            "another handle",
            &["protocol", "all", "pref", "25", "handle", "0x7"],
        ),
        (
            "protocol ip",
            &["protocol", "ip", "pref", "25", "handle", "0x25"],
        ),
        (
            "chain 1",
            &[
                "protocol", "all", "chain", "1", "pref", "25", "handle", "0x25",
            ],
        ),
    ];
    let mut lab = Lab::new(TC_NETLINK);
    tc(&lab, &["qdisc", "add", "dev", "rs", "clsact"]);
    for (what, place) in cases {
        let mut args = vec!["filter", "add", "dev", "rs", "ingress"];
        args.extend_from_slice(place);
        args.extend_from_slice(&["bpf", "da", "object-pinned", &pinned]);
        // Not `tc -n`: it mounts a fresh /sys, without the bpffs that holds the pin.
        let o = std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", lab.rtr))
            .arg("tc")
            .args(&args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{what}: tc {args:?}: {}", text(&o));
        let before = tc_filters(&lab);
        assert!(before.contains("port25_tc:[*fsobj]"), "{what}: {before}");
        let r = lab.try_start_daemon();
        let after = tc_filters(&lab);
        if r.is_ok() {
            lab.kill9();
        }
        let e = r.expect_err(&format!(
            "{what}: a look-alike at priority 25 is refused: {after}"
        ));
        assert!(e.contains("priority 25"), "{what}: {e}");
        assert_eq!(
            before, after,
            "{what}: the foreign filter is left as it was"
        );
        let mut del = vec!["filter", "del", "dev", "rs", "ingress"];
        del.extend_from_slice(&place[..place.len() - 2]);
        tc(&lab, &del);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The record names an ifindex, which means something only in its network namespace. An
/// offline `detach` (or `status`) run from another namespace (the host's, without `nsenter`)
/// must not act on whatever has that ifindex there, nor drop the record and say "port 25 is
/// no longer blocked" while the filter goes on in the daemon's namespace.
#[test]
fn netlink_record_from_another_netns_is_not_acted_on() {
    require_root!();
    let mut lab = Lab::new(TC_NETLINK);
    lab.start_daemon();
    lab.kill9();
    let record = lab.pin_dir.join("links").join("tc-ingress:rs");
    let target = std::fs::read_link(&record).unwrap();
    // From the test's own (the host's) network namespace.
    let here = |args: &[&str]| {
        std::process::Command::new(port25_tests::lab::ctl_binary())
            .arg("--config")
            .arg(&lab.config)
            .args(args)
            .output()
            .unwrap()
    };
    let st = here(&["status"]);
    assert_eq!(st.status.code(), Some(3), "{}", text(&st));
    assert!(text(&st).contains("network namespace"), "{}", text(&st));
    let d = here(&["detach"]);
    assert!(
        !d.status.success(),
        "detach from another netns: {}",
        text(&d)
    );
    assert!(text(&d).contains("network namespace"), "{}", text(&d));
    assert_eq!(own_filters(&lab), 1, "{}", tc_filters(&lab));
    assert_eq!(
        std::fs::read_link(&record).unwrap(),
        target,
        "the record stays"
    );
    assert_blocked(&lab, "after a refused detach");
    // From the daemon's namespace it works (the refused detach left its marker: lift it).
    let d = lab.ctl(&["detach"]);
    assert!(d.status.success(), "detach: {}", text(&d));
    assert_eq!(own_filters(&lab), 0, "{}", tc_filters(&lab));
}

/// Something at a TC attach point's path that is neither a pinned link nor a netlink record
/// (a symlink with a garbage target, say from a hand edit): with tcx it is replaced by the
/// link, never left to make every start and repair fail with "File exists".
#[test]
fn tcx_garbage_at_the_link_path_is_replaced() {
    require_root!();
    port25_tests::require_tcx!();
    let tc_auto = TC_NETLINK.replace("\n    tc_attach: netlink", "");
    let mut lab = Lab::new(&tc_auto);
    let links = lab.pin_dir.join("links");
    std::fs::create_dir_all(&links).unwrap();
    std::os::unix::fs::symlink("netlink:garbage", links.join("tc-ingress:rs")).unwrap();
    lab.start_daemon();
    let st = lab.ctl(&["status", "--json"]);
    assert!(st.status.success(), "status: {}", text(&st));
    let js: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(js["interfaces"][0]["kind"], "tcx", "{js}");
    assert_blocked(&lab, "after garbage at the link path");
}

/// Every pin in the tree with the kernel id behind it, and the settings record: what a
/// refused start must leave exactly as it was.
fn pin_snapshot(pins: &port25_ctl::bpf::pins::Pins) -> (Vec<(String, u32)>, Vec<String>, Settings) {
    use aya::maps::MapInfo;
    let maps = port25_ctl::bpf::datapath::ALL_MAPS
        .iter()
        .map(|n| {
            let info = MapInfo::from_pin(pins.map(n)).unwrap_or_else(|e| panic!("{n}: {e}"));
            (n.to_string(), info.id())
        })
        .collect();
    let live = LiveMaps::open(pins).expect("open the pins");
    let settings = live.settings.get(&0, 0).expect("settings");
    (maps, pins.pinned_links(), settings)
}

/// A pin tree written by a newer version (settings layout LAYOUT_VERSION + 1, as after an
/// upgrade that a rollback now meets) is refused at start, with a clear error, and left
/// exactly as it was: the older daemon neither reuses nor migrates maps it does not
/// understand, and enforcement goes on from the pins.
#[test]
fn a_newer_pinned_layout_is_refused_at_start_and_left_alone() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.start_daemon();
    lab.kill9();
    let pins = port25_ctl::bpf::pins::Pins::new(&lab.pin_dir);
    {
        let mut live = LiveMaps::open(&pins).expect("open the pins");
        let mut s = live.settings.get(&0, 0).unwrap();
        assert_eq!(
            s.layout, LAYOUT_VERSION,
            "the daemon writes its layout version"
        );
        s.layout = LAYOUT_VERSION + 1;
        live.settings.set(0, s, 0).unwrap();
    }
    let before = pin_snapshot(&pins);
    let err = lab
        .try_start_daemon()
        .expect_err("a daemon must refuse pins of a newer layout");
    assert!(
        err.contains(&format!("layout version {}", LAYOUT_VERSION + 1)) && err.contains("newer"),
        "the error says why: {err}"
    );
    assert_eq!(
        pin_snapshot(&pins),
        before,
        "the refused start changed the pins"
    );
    assert_blocked(&lab, "refused start, enforcing from the pins");
}

/// Every file under `dir` (none when it does not exist).
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                todo.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

/// A first start (nothing pinned) that fails after its maps exist leaves no pin: its maps
/// are written while the programs are verified and stamped with this release's layout, which
/// an older release refuses as newer, so a rollback after a failed upgrade would be stuck
/// until an offline detach.
#[test]
fn a_failed_first_start_leaves_no_pin() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.start_daemon();
    for (user, a, b, id) in [
        ("u1", "100.64.1.1", "100.64.1.2", "s1"),
        ("u2", "100.64.1.3", "100.64.1.4", "s2"),
    ] {
        let o = lab.ctl(&["session", "up", user, a, b, "--id", id]);
        assert!(o.status.success(), "session up {user}: {}", text(&o));
    }
    let d = lab.ctl(&["detach"]);
    assert!(d.status.success(), "detach: {}", text(&d));
    assert!(
        lab.wait_daemon_exit(Duration::from_secs(5)),
        "the daemon exits on detach"
    );
    assert_eq!(files_under(&lab.pin_dir), Vec::<std::path::PathBuf>::new());
    // The registry keeps four session addresses; the maps now have room for three. The
    // config alone is valid: the start fails only once the maps are created and compared.
    lab.write_config("limits:\n  exempt_ips: 3\n");
    let err = lab
        .try_start_daemon_args(&["daemon", "--attach"], &[])
        .expect_err("four session addresses cannot fit three entries");
    assert!(
        err.contains("map full; raise limits.exempt_ips"),
        "the error says why, and which key to raise: {err}"
    );
    assert_eq!(
        files_under(&lab.pin_dir),
        Vec::<std::path::PathBuf>::new(),
        "a failed first start leaves no pin under {}",
        lab.pin_dir.display()
    );
    // And the tree is as a later start expects it: with room again, it enforces.
    lab.write_config("");
    lab.start_daemon();
    assert_blocked(&lab, "a start after the failed one");
}

/// Programs the kernel refuses (a new release on a kernel too old for it; a failpoint here):
/// a first start leaves no pin; a restart over a running tree, with a config changed in a
/// way that keeps the layout, leaves its links and maps in place, still enforcing, and the
/// start after it (the kernel fixed) takes over.
#[test]
fn a_start_whose_programs_are_refused_leaves_the_tree_as_it_found_it() {
    require_root!();
    const WHY: &str = "refused as by the verifier";
    let mut lab = Lab::new(XDP);
    let refused = [(port25_ctl::control::testing::FAILPOINT_VERIFY, "1")];
    let err = lab
        .try_start_daemon_env(&refused)
        .expect_err("a start whose programs are refused fails");
    assert!(err.contains(WHY), "{err}");
    assert_eq!(
        files_under(&lab.pin_dir),
        Vec::<std::path::PathBuf>::new(),
        "a failed first start leaves no pin under {}",
        lab.pin_dir.display()
    );

    lab.start_daemon();
    lab.kill9();
    let pins = port25_ctl::bpf::pins::Pins::new(&lab.pin_dir);
    let before = pin_snapshot(&pins);
    let state = || {
        port25_ctl::policy::read_state(&LiveMaps::open(&pins).expect("open the pins"))
            .expect("read the maps")
    };
    let held = state();
    // The daemon's log is appended start after start: only a new line says this one failed.
    let seen = lab.daemon_log().matches(WHY).count();
    lab.write_config("exempt:\n  - prefix: 100.64.0.99/32\n");
    let err = lab
        .try_start_daemon_env(&refused)
        .expect_err("a restart whose programs are refused fails");
    assert!(err.matches(WHY).count() > seen, "{err}");
    assert_eq!(
        pin_snapshot(&pins),
        before,
        "the failed restart changed the maps' pins, the links or the settings"
    );
    // Refused before the apply began: the new exempt is not written under the old programs.
    assert!(state() == held, "the refused restart wrote the maps");
    assert_blocked(&lab, "after a failed restart, from the pins");
    lab.start_daemon();
    assert_blocked(&lab, "the next start");
}

/// The names of the programs the daemon holds open (its file descriptors).
fn daemon_programs(lab: &Lab) -> Vec<String> {
    let pid = lab.daemon_pid().expect("daemon running");
    let mut ids = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .flatten()
    {
        let info = std::fs::read_to_string(e.path()).unwrap_or_default();
        ids.extend(info.lines().filter_map(|l| {
            l.strip_prefix("prog_id:")
                .and_then(|v| v.trim().parse::<u32>().ok())
        }));
    }
    let mut names: Vec<String> = aya::programs::loaded_programs()
        .flatten()
        .filter(|p| ids.contains(&p.id()))
        .filter_map(|p| p.name_as_str().map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// A start verifies only the entry points its interfaces attach (XDP here); a reload that
/// moves the device to TC has the TC program verified then, and the device is enforced
/// through it, blocked before and after.
#[test]
fn an_entry_point_no_interface_attaches_is_verified_when_a_reload_needs_it() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.start_daemon();
    let held = daemon_programs(&lab);
    assert!(held.iter().any(|p| p == "port25_xdp"), "{held:?}");
    assert!(
        !held
            .iter()
            .any(|p| p == "port25_tc" || p == "port25_tc_raw"),
        "a start with XDP interfaces only verified a TC entry point: {held:?}"
    );
    assert_blocked(&lab, "XDP");

    lab.interfaces = TC_NETLINK.replace("\n    tc_attach: netlink", "");
    lab.write_config("");
    let r = lab.ctl(&["reload"]);
    assert!(r.status.success(), "reload: {}", text(&r));
    let held = daemon_programs(&lab);
    assert!(held.iter().any(|p| p == "port25_tc"), "{held:?}");
    let st = lab.ctl(&["status", "--json"]);
    let js: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(js["interfaces"][0]["attached"], true, "{js}");
    assert!(
        matches!(
            js["interfaces"][0]["kind"].as_str(),
            Some("tcx" | "netlink")
        ),
        "{js}"
    );
    assert_blocked(&lab, "after the reload to TC");
}

/// A reload to a hook whose program the kernel refuses (the failpoint stands in for the
/// verifier) is refused before any link moves: the XDP attachment stays, and port 25 stays
/// blocked. For a glob too, whose devices would otherwise each fail after their old links
/// went.
#[test]
fn a_reload_to_a_hook_the_kernel_refuses_leaves_the_attachment_in_place() {
    require_root!();
    use port25_ctl::control::testing::FAILPOINT_REFUSE_PROGRAM;
    let mut lab = Lab::new(XDP);
    lab.try_start_daemon_env(&[(FAILPOINT_REFUSE_PROGRAM, "port25_tc")])
        .unwrap();
    assert_blocked(&lab, "XDP");
    let link = lab.pin_dir.join("links/xdp:rs");
    let before = port25_ctl::bpf::linkinfo::read(&link).unwrap().link_id;
    for interfaces in [
        TC_NETLINK.replace("\n    tc_attach: netlink", ""),
        "  - name: \"r*\"\n    hook: tc\n    direction: ingress".to_string(),
    ] {
        lab.interfaces = interfaces;
        lab.write_config("");
        let r = lab.ctl(&["reload"]);
        assert!(
            !r.status.success(),
            "the reload must be refused: {}",
            text(&r)
        );
        assert!(
            text(&r).contains("port25_tc"),
            "the refusal names the program: {}",
            text(&r)
        );
        assert_eq!(
            port25_ctl::bpf::linkinfo::read(&link).unwrap().link_id,
            before,
            "the XDP link moved"
        );
        assert_blocked(&lab, "after a refused reload");
    }
}
