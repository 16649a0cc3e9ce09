//! Verified programs kept for the next start of the same build (`pin_dir/progs/<build>/`):
//! a restart attaches the very programs an earlier start verified, and offender tracking goes
//! on through them; `--kernel-log` never reuses them; a map migration verifies afresh
//! against its new maps and keeps those programs, never ones that use the old maps.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use port25_ctl::{
    bpf::{kept, pins::Pins},
    control::reply::Top,
};
use port25_tests::{
    lab::{self, in_ns, Lab},
    require_root,
};
use socket2::{Domain, Socket, Type};

const XDP: &str = "  - name: rs\n    hook: xdp\n    xdp_mode: native";
const SRC: &str = "100.64.0.2";

fn assert_blocked(lab: &Lab, what: &str) {
    let a = lab::v4();
    assert!(!lab.can_connect(a.sub, a.ext, 25), "{what}: port 25 open");
    assert!(
        lab.can_connect(a.sub, a.mail, 25),
        "{what}: the mail server unreachable"
    );
}

/// The program of the lab's one attachment, as `status` reports it.
fn prog_id(lab: &Lab) -> u64 {
    let st = lab.ctl(&["status", "--json"]);
    let js: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    js["interfaces"][0]["prog_id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no program id: {js}"))
}

/// `n` SYNs from the subscriber to port 25 of distinct outside hosts (blocked, so tracked),
/// and the attempts the kernel counted for them.
fn tracked(lab: &Lab, n: u8) -> u64 {
    let before = attempts(lab);
    syns(lab, n);
    attempts(lab) - before
}

fn syns(lab: &Lab, n: u8) {
    let src: IpAddr = SRC.parse().unwrap();
    in_ns(&lab.sub, move || {
        for i in 1..=n {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.bind(&SocketAddr::new(src, 0).into()).unwrap();
            s.set_nonblocking(true).unwrap();
            let _ = s.connect(&SocketAddr::new(IpAddr::from([203, 0, 113, i]), 25).into());
            std::thread::sleep(Duration::from_millis(5));
        }
    });
}

/// The attempts the kernel counted for the subscriber (0 when it is not tracked).
fn attempts(lab: &Lab) -> u64 {
    let top: Top = lab.reply(&["top"]);
    let src: IpAddr = SRC.parse().unwrap();
    top.sources
        .iter()
        .find(|o| o.src == src)
        .map_or(0, |o| o.attempts)
}

/// The ids of the maps a program uses.
fn maps_of(prog_id: u64) -> Vec<u32> {
    let p = aya::programs::loaded_programs()
        .flatten()
        .find(|p| u64::from(p.id()) == prog_id)
        .expect("the program is loaded");
    p.map_ids().unwrap().unwrap_or_default()
}

fn pinned_map_id(lab: &Lab, name: &str) -> u32 {
    aya::maps::MapInfo::from_pin(Pins::new(&lab.pin_dir).map(name))
        .unwrap()
        .id()
}

#[test]
fn a_restart_attaches_the_programs_an_earlier_start_verified() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.start_daemon();
    let first = prog_id(&lab);
    let dir = lab.pin_dir.join(kept::PROGS_DIR).join(kept::build_id());
    for p in [
        "port25_xdp",
        "port25_track_xdp",
        "port25_track_tc",
        kept::TRACK_SCRATCH,
    ] {
        assert!(dir.join(p).exists(), "{p} not kept in {}", dir.display());
    }
    assert_eq!(tracked(&lab, 3), 3, "tracked before the restart");

    lab.kill9();
    lab.start_daemon();
    assert_eq!(
        prog_id(&lab),
        first,
        "the restart verified the XDP program again"
    );
    assert_blocked(&lab, "after a restart on the kept programs");
    // The entry point and the tracking program it tail-calls still share their scratch.
    assert_eq!(tracked(&lab, 2), 2, "tracked after the restart");

    // The kernel log: programs of its own, verified at this start, kept for none.
    lab.kill9();
    lab.try_start_daemon_args(&["daemon", "--kernel-log"], &[])
        .unwrap();
    let logged = prog_id(&lab);
    assert_ne!(
        logged, first,
        "--kernel-log took the kept programs (without the log)"
    );
    assert_blocked(&lab, "with the kernel log");
    assert_eq!(tracked(&lab, 1), 1, "tracked with the kernel log");

    // Without it again: the programs kept since the first start.
    lab.kill9();
    lab.start_daemon();
    assert_eq!(prog_id(&lab), first);
    assert_blocked(&lab, "back on the kept programs");
    assert_eq!(
        tracked(&lab, 1),
        1,
        "tracked after the kernel log's programs went"
    );

    // A reload to TC verifies that entry point now (no start did): it and the TC tracking
    // program kept from the first start share the kept scratch, so tracking goes on.
    lab.interfaces = "  - name: rs\n    hook: tc\n    direction: ingress".into();
    lab.write_config("");
    let r = lab.ctl(&["reload"]);
    assert!(r.status.success(), "reload: {}", port25_tests::text(&r));
    assert_ne!(prog_id(&lab), first, "not moved to TC");
    assert_blocked(&lab, "through TC");
    assert_eq!(
        tracked(&lab, 2),
        2,
        "tracked by a fresh TC entry point and a kept tracking program"
    );
}

#[test]
fn a_migration_keeps_the_programs_of_its_new_maps_only() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.start_daemon();
    let first = prog_id(&lab);
    let exip4 = pinned_map_id(&lab, "P25_EXIP4");
    assert!(maps_of(first).contains(&exip4));

    // New capacities: new maps, filled and swapped in at this start.
    lab.kill9();
    lab.write_config("limits:\n  exempt_ips: 5000\n");
    lab.start_daemon();
    let migrated = prog_id(&lab);
    let exip4_now = pinned_map_id(&lab, "P25_EXIP4");
    assert_ne!(exip4_now, exip4, "no migration happened");
    assert_ne!(
        migrated, first,
        "the programs of the old maps were attached again"
    );
    assert!(maps_of(migrated).contains(&exip4_now));
    assert_blocked(&lab, "after the migration");

    // What was kept is what the migration verified: the next restart attaches it.
    lab.kill9();
    lab.start_daemon();
    assert_eq!(prog_id(&lab), migrated);
    assert!(maps_of(prog_id(&lab)).contains(&exip4_now));
    assert_blocked(&lab, "after a restart on the migration's programs");
    assert_eq!(tracked(&lab, 2), 2, "tracked on the migration's programs");
}

/// `detach` leaves no kept program behind (a program pinned there would hold its maps).
#[test]
fn detach_removes_the_kept_programs() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.start_daemon();
    assert!(lab.pin_dir.join(kept::PROGS_DIR).exists());
    let r = lab.ctl(&["detach"]);
    assert!(r.status.success(), "{}", port25_tests::text(&r));
    assert!(
        !lab.pin_dir.join(kept::PROGS_DIR).exists(),
        "detach left progs/ behind"
    );
}

/// What lies in the kept directory is checked, never trusted: a map pinned where the XDP
/// program, a program this start does not attach and the shared scratch should be is
/// replaced (the entry point verified afresh, the scratch created anew), and the start
/// enforces and tracks as ever.
#[test]
fn garbage_in_the_kept_directory_is_replaced_not_trusted() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.start_daemon();
    let first = prog_id(&lab);
    let dir = lab.pin_dir.join(kept::PROGS_DIR).join(kept::build_id());
    lab.kill9();
    let other = aya::maps::MapData::from_pin(Pins::new(&lab.pin_dir).map("P25_SETTINGS"))
        .expect("the settings map");
    for name in ["port25_xdp", "port25_tc_raw", kept::TRACK_SCRATCH] {
        let _ = std::fs::remove_file(dir.join(name));
        other.pin(dir.join(name)).expect("pin a map in its place");
    }
    lab.start_daemon();
    assert_ne!(
        prog_id(&lab),
        first,
        "a map pinned as the XDP program did not stop its reuse"
    );
    assert!(
        !dir.join("port25_tc_raw").exists(),
        "a map pinned as a program no start attached is left"
    );
    let scratch = aya::maps::MapInfo::from_pin(dir.join(kept::TRACK_SCRATCH)).unwrap();
    assert_eq!(scratch.name_as_str(), Some("P25_TRACKTMP"));
    assert_blocked(&lab, "after the garbage went");
    assert_eq!(tracked(&lab, 2), 2, "tracked through the new scratch");
    // And kept again, for the next restart.
    let now = prog_id(&lab);
    lab.kill9();
    lab.start_daemon();
    assert_eq!(prog_id(&lab), now);
}
