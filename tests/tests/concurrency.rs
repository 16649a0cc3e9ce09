//! 8 concurrent CLI writers x 1,000 operations against the real daemon: afterwards the maps
//! equal what the registry says they should hold, and the audit log holds one record for
//! every acknowledged change.

use std::{collections::BTreeSet, process::Command, sync::Arc, time::Instant};

use port25_ctl::{
    bpf::livemaps::{LiveMaps, Table},
    bpf::pins::Pins,
    config::Config,
    policy::Desired,
    registry::store::{sqlite::SqliteStore, Store},
};
use port25_tests::{lab::Lab, require_root};

const WRITERS: u32 = 8;
const OPS: u32 = 1000;

/// The i-th operation of writer w; every one is valid and writes exactly one audit record.
fn op(w: u32, i: u32) -> Vec<String> {
    let k = i / 4;
    let user = format!("u{w}");
    let addr = format!("100.96.{w}.{k}");
    let id = format!("{w}-{k}");
    let v: Vec<&str> = match (i % 4, k % 2) {
        (0, _) => vec!["session", "up", &user, &addr, "--id", &id],
        (1, _) => vec!["unblock", &user, "--reason", "load"],
        (2, 0) => vec!["session", "down", "--id", &id],
        (2, _) => vec!["block", &user],
        (3, 0) => vec!["block", &user],
        (3, _) => vec!["unblock", &user, "--for", "1h"],
        _ => unreachable!(),
    };
    v.into_iter().map(String::from).collect()
}

#[test]
fn concurrent_writers_leave_registry_maps_and_audit_in_agreement() {
    require_root!();
    let mut lab = Lab::new("  - name: rs\n    hook: xdp\n    xdp_mode: native");
    lab.start_daemon();
    let ctl = port25_tests::lab::ctl_binary();
    for w in 0..WRITERS {
        let o = Command::new(&ctl)
            .arg("--config")
            .arg(&lab.config)
            .args(["user", "add", &format!("u{w}")])
            .output()
            .unwrap();
        assert!(o.status.success());
    }
    let config = Arc::new(lab.config.clone());
    let t0 = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (ctl, config) = (ctl.clone(), config.clone());
            std::thread::spawn(move || {
                let mut acked = 0u32;
                let mut lat = Vec::new();
                for i in 0..OPS {
                    let t = Instant::now();
                    let o = Command::new(&ctl)
                        .arg("--config")
                        .arg(&*config)
                        .args(op(w, i))
                        .output()
                        .unwrap();
                    lat.push(t.elapsed());
                    assert!(
                        o.status.success(),
                        "writer {w} op {i} {:?}: {}",
                        op(w, i),
                        String::from_utf8_lossy(&o.stderr)
                    );
                    acked += 1;
                }
                (acked, lat)
            })
        })
        .collect();
    let mut acked = 0;
    let mut lat = Vec::new();
    for h in writers {
        let (a, l) = h.join().unwrap();
        acked += a;
        lat.extend(l);
    }
    let wall = t0.elapsed();
    lat.sort();
    eprintln!(
        "{acked} CLI operations in {wall:?} ({:.0}/s); per call p50 {:?} p99 {:?}",
        acked as f64 / wall.as_secs_f64(),
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100]
    );

    // The audit log holds every acknowledged change (and the 8 `user add`s).
    let o = Command::new(&ctl)
        .arg("--config")
        .arg(&lab.config)
        .args(["--json", "audit", "--limit", "0"])
        .output()
        .unwrap();
    let js: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let records = js["records"].as_array().unwrap();
    assert_eq!(
        records.len() as u32,
        acked + WRITERS,
        "one audit record per acknowledged change"
    );
    let ids: BTreeSet<i64> = records.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!(ids.len(), records.len(), "distinct records");

    // The maps hold exactly what the registry implies.
    let cfg = Config::load(&lab.config).unwrap();
    let mut store = SqliteStore::open_read_only(&cfg.state_dir).unwrap();
    let snap = store.snapshot().unwrap();
    let want = Desired::build(
        &cfg,
        &snap,
        jiff::Timestamp::now(),
        port25_ctl::bpf::livemaps::boot_ns(),
    )
    .unwrap();
    let live = LiveMaps::open(&Pins::new(&cfg.pin_dir)).unwrap();
    let have = live.exip4.entries().unwrap();
    assert_eq!(
        have.keys().collect::<Vec<_>>(),
        want.exip4.keys().collect::<Vec<_>>(),
        "exempt addresses: maps == registry"
    );
    for (k, v) in &have {
        assert_eq!(
            v.expires_ns == 0,
            want.exip4[k].expires_ns == 0,
            "{k:?}: timed or not"
        );
    }
    // Each writer ends unblocked for 1h with its odd-numbered sessions live.
    assert_eq!(snap.sessions.len() as u32, WRITERS * OPS / 8);
    assert_eq!(have.len() as u32, WRITERS * OPS / 8);
    assert!(have.values().all(|v| v.expires_ns != 0));
    lab.kill9();
}
