//! `/metrics` (issue 10, part 5): the real daemon in the namespace lab, scraped over real TCP
//! from the router's namespace, the output read with a Prometheus text-format parser.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use port25_ctl::control::proto;
use port25_tests::{
    lab::{self, in_ns, Lab},
    require_root,
};

const XDP: &str = "  - name: rs\n    hook: xdp\n    xdp_mode: native";
const DEFAULT: &str = "127.0.0.1:9725";

/// `GET /metrics` at `addr` in the router's namespace: the body of a 200, or the failure.
fn get(lab: &Lab, addr: &str) -> Result<String, String> {
    let addr: SocketAddr = addr.parse().unwrap();
    in_ns(&lab.rtr, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: port25\r\nConnection: close\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut raw = String::new();
        s.read_to_string(&mut raw).map_err(|e| e.to_string())?;
        let (head, body) = raw.split_once("\r\n\r\n").ok_or("no HTTP head")?;
        if !head.starts_with("HTTP/1.1 200") {
            return Err(format!("not a 200: {head}"));
        }
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/openmetrics-text"),
            "{head}"
        );
        Ok(body.to_string())
    })
}

struct Scrape {
    samples: Vec<prometheus_parse::Sample>,
    text: String,
}

/// Parses a scrape; every line must be a comment the format defines or a sample the parser
/// took (it skips what it cannot read, which would hide a broken line).
fn parse(text: String) -> Scrape {
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "OpenMetrics ends with # EOF");
    let sample_lines = lines
        .iter()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count();
    for l in lines.iter().filter(|l| l.starts_with('#')) {
        assert!(
            ["# HELP ", "# TYPE ", "# UNIT ", "# EOF"]
                .iter()
                .any(|p| l.starts_with(p)),
            "unknown comment line: {l}"
        );
    }
    let s = prometheus_parse::Scrape::parse(lines.iter().map(|l| Ok(l.to_string())))
        .expect("a Prometheus text-format scrape");
    assert_eq!(
        s.samples.len(),
        sample_lines,
        "every sample line parses:\n{text}"
    );
    Scrape {
        samples: s.samples,
        text,
    }
}

fn scrape(lab: &Lab) -> Scrape {
    parse(get(lab, DEFAULT).unwrap_or_else(|e| panic!("scrape: {e}\n{}", lab.daemon_log())))
}

impl Scrape {
    /// The value of `metric` with these labels (exactly these, no others).
    fn value(&self, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.metric == metric
                    && s.labels.len() == labels.len()
                    && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
            })
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                ref other => panic!("{metric}: not a plain value: {other:?}"),
            })
    }

    fn must(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(metric, labels)
            .unwrap_or_else(|| panic!("no {metric}{labels:?} in:\n{}", self.text))
    }

    fn packets(&self, reason: &str) -> u64 {
        let verdict = if reason.starts_with("pass") {
            "pass"
        } else {
            "block"
        };
        self.must(
            "port25_packets_total",
            &[("reason", reason), ("verdict", verdict)],
        ) as u64
    }
}

/// The kernel's counters as `status --json` reads them from the pinned map.
fn status_counters(lab: &Lab) -> Vec<(String, u64)> {
    let o = lab.ctl(&["status", "--json"]);
    let js: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("status --json: {e}: {}", port25_tests::text(&o)));
    serde_json::from_value(js["counters"].clone()).unwrap()
}

/// The map fill in `s` equals what `status --json` reads from the pinned maps.
fn assert_fill_is_the_kernels(lab: &Lab, s: &Scrape) {
    let o = lab.ctl(&["status", "--json"]);
    let js: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let maps = js["maps"].as_array().unwrap();
    assert_eq!(maps.len(), 10, "{js}");
    for m in maps {
        let name = m["map"].as_str().unwrap();
        for (metric, field) in [
            ("port25_map_entries", "entries"),
            ("port25_map_capacity_entries", "capacity"),
        ] {
            assert_eq!(
                s.must(metric, &[("map", name)]),
                m[field].as_f64().unwrap(),
                "{metric} of {name}"
            );
        }
    }
}

/// `n` SYNs from the subscriber to the external MX on 25, one per socket, each socket dropped
/// right after its SYN leaves (no retransmissions).
fn syns(lab: &Lab, src: IpAddr, dst: IpAddr, n: usize) {
    in_ns(&lab.sub, move || {
        for _ in 0..n {
            let s = socket2::Socket::new(
                socket2::Domain::for_address(SocketAddr::new(src, 0)),
                socket2::Type::STREAM,
                None,
            )
            .unwrap();
            s.bind(&SocketAddr::new(src, 0).into()).unwrap();
            s.set_nonblocking(true).unwrap();
            let _ = s.connect(&SocketAddr::new(dst, 25).into());
            std::thread::sleep(Duration::from_millis(2));
        }
    });
}

#[test]
fn packet_counters_equal_the_kernels_and_count_blocked_syns() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.start_daemon();
    let before = scrape(&lab).packets("block_port");
    const N: usize = 40;
    syns(&lab, lab::v4().sub, lab::v4().ext, N);
    syns(&lab, lab::v6().sub, lab::v6().ext, N);
    std::thread::sleep(Duration::from_millis(200));
    // Counters only grow: the kernel's before and after the scrape bound the scrape's.
    let low = status_counters(&lab);
    let s = scrape(&lab);
    let high = status_counters(&lab);
    assert_eq!(low.len(), port25_common::Reason::ALL.len());
    for ((reason, lo), (_, hi)) in low.iter().zip(&high) {
        let got = s.packets(reason);
        assert!(
            *lo <= got && got <= *hi,
            "{reason}: /metrics says {got}, the kernel {lo}..{hi}"
        );
    }
    let after = s.packets("block_port");
    assert!(
        after >= before + 2 * N as u64,
        "block_port went from {before} to {after} after {} SYNs",
        2 * N
    );
    assert_eq!(
        low.iter().find(|(r, _)| r == "block_port").unwrap().1,
        high.iter().find(|(r, _)| r == "block_port").unwrap().1,
        "no SYN was still in flight"
    );
    // The rest of the list, present and sane.
    assert_eq!(s.must("port25_datapath_loaded", &[]), 1.0);
    assert_eq!(s.must("port25_registry_up", &[]), 1.0);
    assert_eq!(
        s.must(
            "port25_attachment_up",
            &[("point", "xdp:rs"), ("kind", "xdp")]
        ),
        1.0
    );
    assert_eq!(
        s.must("port25_map_capacity_entries", &[("map", "P25_EXIP4")]),
        port25_common::maps::DEFAULT_EXEMPT_IPS as f64,
        "{}",
        s.text
    );
    assert_eq!(s.must("port25_map_entries", &[("map", "P25_PORTS")]), 1.0);
    assert_fill_is_the_kernels(&lab, &s);
    assert_eq!(
        s.must(
            "port25_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert_eq!(s.must("port25_registry_users", &[]), 0.0);
    s.must("port25_reconciles_total", &[]);
    if std::env::var_os("PORT25_SHOW_SCRAPE").is_some() {
        eprintln!("{}", s.text);
    }
    // The sample dashboard asks only for metrics that exist.
    let dash = include_str!("../../deploy/grafana-port25.json");
    serde_json::from_str::<serde_json::Value>(dash).expect("the dashboard is JSON");
    let names: std::collections::BTreeSet<&str> =
        s.samples.iter().map(|x| x.metric.as_str()).collect();
    let used: Vec<&str> = dash
        .match_indices("port25_")
        .map(|(i, _)| {
            let rest = &dash[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect();
    assert!(used.len() > 10, "{used:?}");
    for m in used {
        assert!(
            names.contains(m),
            "the dashboard uses {m}, which /metrics lacks"
        );
    }
    s.must("port25_drift_repaired_total", &[]);
}

#[test]
fn requests_are_counted_by_verb_and_result() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.start_daemon();
    let count = |s: &Scrape, verb: &str, result: &str| {
        s.value(
            "port25_requests_total",
            &[("verb", verb), ("result", result)],
        )
        .unwrap_or(0.0)
    };
    let s0 = scrape(&lab);
    let o = lab.ctl(&["user", "add", "alice"]);
    assert!(o.status.success(), "{}", port25_tests::text(&o));
    lab.fails_with(&["user", "add", "alice"], 1);
    lab.fails_with(&["block", "nobody"], 1);
    let s1 = scrape(&lab);
    assert_eq!(
        count(&s1, "user_add", "ok"),
        count(&s0, "user_add", "ok") + 1.0
    );
    assert_eq!(
        count(&s1, "user_add", "refused"),
        count(&s0, "user_add", "refused") + 1.0
    );
    assert_eq!(
        count(&s1, "block", "refused"),
        count(&s0, "block", "refused") + 1.0
    );
    assert_eq!(count(&s1, "block", "ok"), count(&s0, "block", "ok"));
    assert_eq!(s1.must("port25_registry_users", &[]), 1.0);
    // A change that writes the maps shows in their fill at once.
    assert_eq!(s1.must("port25_map_entries", &[("map", "P25_EXIP4")]), 0.0);
    lab.reply::<serde_json::Value>(&["unblock", "alice"]);
    lab.reply::<serde_json::Value>(&["session", "up", "alice", "100.64.0.2"]);
    let s2 = scrape(&lab);
    assert_eq!(s2.must("port25_map_entries", &[("map", "P25_EXIP4")]), 1.0);
    assert_fill_is_the_kernels(&lab, &s2);
    assert_eq!(s2.must("port25_registry_sessions", &[]), 1.0);
    assert_eq!(s2.must("port25_registry_unblocked_users", &[]), 1.0);
}

#[test]
fn off_serves_nothing_and_reload_moves_the_endpoint() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.write_config("metrics_listen: off\n");
    lab.start_daemon();
    let e = get(&lab, DEFAULT).unwrap_err();
    assert!(e.contains("refused"), "nothing listens: {e}");
    lab.write_config("metrics_listen: \"127.0.0.1:9726\"\n");
    lab.reply::<serde_json::Value>(&["reload"]);
    parse(wait_for(&lab, "127.0.0.1:9726"));
    assert!(get(&lab, DEFAULT).is_err());
    // To an address that needs the current one's port.
    lab.write_config("metrics_listen: \"0.0.0.0:9726\"\n");
    lab.reply::<serde_json::Value>(&["reload"]);
    parse(wait_for(&lab, "192.0.2.1:9726"));
    lab.write_config("metrics_listen: off\n");
    lab.reply::<serde_json::Value>(&["reload"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(&lab, "127.0.0.1:9726").is_ok() {
        assert!(Instant::now() < deadline, "still served after off");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The metrics thread rebinds after the reload is answered: poll briefly.
fn wait_for(lab: &Lab, addr: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match get(lab, addr) {
            Ok(body) => return body,
            Err(e) if Instant::now() > deadline => {
                panic!("{addr}: {e}\n{}", lab.daemon_log())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[test]
fn a_bad_metrics_listen_is_a_config_error() {
    require_root!();
    let mut lab = Lab::new(XDP);
    // The exit code of another config error, for comparison.
    lab.write_config("action: bounce\n");
    let other = lab.ctl(&["daemon"]);
    assert!(!other.status.success());
    for bad in [
        "localhost:9725",
        "127.0.0.1",
        "127.0.0.1:0",
        "yes please",
        "[::1]:99999",
    ] {
        lab.write_config(&format!("metrics_listen: \"{bad}\"\n"));
        let o = lab.ctl(&["daemon"]);
        assert_eq!(
            o.status.code(),
            other.status.code(),
            "{bad}: {}",
            port25_tests::text(&o)
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("metrics_listen") && err.contains(&lab.config.display().to_string()),
            "{bad}: names the key and the file: {err}"
        );
    }
    // On reload: refused, the running endpoint unchanged.
    lab.write_config("");
    lab.start_daemon();
    lab.write_config("metrics_listen: \"localhost:1\"\n");
    let o = lab.ctl(&["reload"]);
    assert_eq!(o.status.code(), Some(1), "{}", port25_tests::text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("metrics_listen"));
    scrape(&lab);
}

#[test]
fn a_taken_address_leaves_the_daemon_enforcing_and_says_so() {
    require_root!();
    let mut lab = Lab::new(XDP);
    let squatter = in_ns(&lab.rtr, || std::net::TcpListener::bind(DEFAULT).unwrap());
    lab.start_daemon();
    assert!(
        !lab.can_connect(lab::v4().sub, lab::v4().ext, 25),
        "enforcing without metrics"
    );
    let log = lab.daemon_log();
    assert!(
        log.contains("cannot listen on metrics_listen 127.0.0.1:9725"),
        "names the address: {log}"
    );
    // A reload is not held up by it...
    lab.reply::<serde_json::Value>(&["reload"]);
    assert!(get(&lab, DEFAULT).is_err());
    // ...but a reload that asks for another address that cannot be had is refused whole.
    let other = in_ns(&lab.rtr, || {
        std::net::TcpListener::bind("127.0.0.1:9727").unwrap()
    });
    let a = lab::v4();
    assert!(lab.can_connect(a.sub, a.ext, 2525));
    lab.write_config_policy(
        &lab::POLICY.replace("blocked_ports: [25]", "blocked_ports: [25, 2525]"),
        "metrics_listen: \"127.0.0.1:9727\"\n",
    );
    let err = lab.fails_with(&["reload"], 1);
    assert!(
        err.contains("metrics_listen 127.0.0.1:9727") && err.contains("in use"),
        "{err}"
    );
    assert!(
        lab.can_connect(a.sub, a.ext, 2525),
        "the refused reload changed the policy"
    );
    drop(other);
    // Freed: a reload takes it.
    lab.write_config("");
    drop(squatter);
    lab.reply::<serde_json::Value>(&["reload"]);
    parse(wait_for(&lab, DEFAULT));
}

#[test]
fn slow_scrapers_hold_up_neither_the_socket_nor_other_scrapes() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.start_daemon();
    // Scrapers that send half a request, or a request and never read the answer.
    let slow: Vec<TcpStream> = (0..8)
        .map(|i| {
            in_ns(&lab.rtr, move || {
                let mut s = TcpStream::connect(DEFAULT).unwrap();
                let req: &[u8] = if i % 2 == 0 {
                    b"GET /metr"
                } else {
                    b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
                };
                s.write_all(req).unwrap();
                s
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..5 {
        let t = Instant::now();
        lab.client().call(proto::Info).expect("the socket answers");
        let o = lab.ctl(&["user", "add", &port25_tests::unique("u")]);
        assert!(o.status.success(), "{}", port25_tests::text(&o));
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "the socket answered in {:?}",
            t.elapsed()
        );
    }
    scrape(&lab);
    drop(slow);
}

/// Measurement (run by hand, `--ignored --nocapture`): the scrape time with a million exempt
/// addresses pinned, and the control socket's change latency with and without a scraper
/// scraping back to back.
#[test]
#[ignore]
fn measure_scrape_cost_with_a_million_entries() {
    require_root!();
    let mut lab = Lab::new(XDP);
    // No reconcile during the measurement: the entries below are drift it would remove.
    lab.write_config("reconcile_interval: 1h\n");
    lab.start_daemon();
    let t = Instant::now();
    scrape(&lab);
    eprintln!("scrape with empty maps: {:?}", t.elapsed());
    let pins = port25_ctl::bpf::pins::Pins::new(&lab.pin_dir);
    let mut live = port25_ctl::bpf::livemaps::LiveMaps::open(&pins).unwrap();
    let t = Instant::now();
    const N: u32 = 1_000_000;
    for i in 0..N {
        let v = port25_common::maps::Exempt {
            expires_ns: 0,
            origin: 1,
            _pad: 0,
        };
        live.exip4
            .insert((0x0a00_0000 + i).to_be_bytes(), v, 0)
            .unwrap();
    }
    eprintln!("filled {N} entries in {:?}", t.elapsed());
    let mut took = vec![];
    for _ in 0..5 {
        let t = Instant::now();
        let s = scrape(&lab);
        took.push(t.elapsed());
        // What the daemon wrote; the entries above are drift, for the reconcile to remove.
        assert_eq!(s.must("port25_map_entries", &[("map", "P25_EXIP4")]), 0.0);
    }
    eprintln!("scrape with {N} entries: {took:?}");
    // A million users, a tenth of them unblocked, straight into the registry.
    let t = Instant::now();
    let db = rusqlite::Connection::open(lab.dir.join("port25.db")).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    db.execute_batch(
        "BEGIN;
         WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 999999)
         INSERT INTO users (name, policy, until, reason, set_by, set_at)
         SELECT 'm' || i, CASE WHEN i % 10 = 0 THEN 'unblocked' ELSE 'blocked' END,
                NULL, NULL, 'bench', 0 FROM n;
         COMMIT;",
    )
    .unwrap();
    eprintln!("registry filled in {:?}", t.elapsed());
    let mut took = vec![];
    for _ in 0..5 {
        let t = Instant::now();
        let s = scrape(&lab);
        took.push(t.elapsed());
        assert_eq!(s.must("port25_registry_users", &[]), 1_000_000.0);
    }
    eprintln!("scrape with 1M users: {took:?}");
    let changes = |tag: &str| {
        let mut lat: Vec<Duration> = (0..100)
            .map(|i| {
                let t = Instant::now();
                lab.client()
                    .call(proto::UserAdd {
                        user: format!("{tag}{i}"),
                    })
                    .unwrap();
                t.elapsed()
            })
            .collect();
        lat.sort();
        (lat[50], lat[95], lat[99])
    };
    eprintln!("user add p50/p95/max, no scraper: {:?}", changes("quiet"));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scraper = {
        let stop = stop.clone();
        let rtr = lab.rtr.clone();
        std::thread::spawn(move || {
            let file = std::fs::File::open(format!("/run/netns/{rtr}")).unwrap();
            nix::sched::setns(
                std::os::fd::AsFd::as_fd(&file),
                nix::sched::CloneFlags::CLONE_NEWNET,
            )
            .unwrap();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut s = TcpStream::connect(DEFAULT).unwrap();
                s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
                let mut out = Vec::new();
                s.read_to_end(&mut out).unwrap();
                n += 1;
            }
            n
        })
    };
    eprintln!(
        "user add p50/p95/max, scraping back to back: {:?}",
        changes("busy")
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    eprintln!("scrapes meanwhile: {}", scraper.join().unwrap());
}

/// Scrapers that send a request and hang up at once (a local user in a loop) must not push
/// the next real scrape into the future: a reserved start time is only spent by a scrape.
#[test]
fn scrapers_that_hang_up_do_not_delay_later_scrapes() {
    require_root!();
    let mut lab = Lab::new(XDP);
    lab.start_daemon();
    scrape(&lab);
    let sent = in_ns(&lab.rtr, || {
        let until = Instant::now() + Duration::from_secs(2);
        let mut n = 0;
        while Instant::now() < until {
            if let Ok(mut s) = TcpStream::connect(DEFAULT) {
                let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
                n += 1;
            }
        }
        n
    });
    let t = Instant::now();
    scrape(&lab);
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "after {sent} hung-up requests a scrape took {:?}",
        t.elapsed()
    );
}
