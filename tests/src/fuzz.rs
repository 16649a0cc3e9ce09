//! The differential fuzz: generated frames ([`crate::fuzzgen`]) through every kernel program
//! with BPF_PROG_TEST_RUN and through the reference model. Two counts must stay 0:
//! mismatches (the kernel's verdict or counter reason differs from the model's) and leaks
//! (a program passed a frame the generator's own truth says must be blocked).

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use port25_common::{
    maps::{Exempt, NetKey6, FLAG_REJECT, ORIGIN_SESSION},
    model::Model,
    parse::Link,
    verdict::classify,
    Reason, NUM_REASONS,
};
use port25_ctl::{
    bpf::datapath::{self, PROG_TC, PROG_TC_RAW, PROG_XDP},
    bpf::livemaps::{boot_ns, LiveMaps},
    bpf::pins::Pins,
    config::Config,
    policy::{self, Desired},
};

use crate::fuzzgen::{self, fixture_entries, hex, Case, Options, Truth};

/// The programs loaded once, the policy of [`fuzzgen::CONFIG`] in their maps, and the same
/// policy as a reference model. Nothing is attached; the pin tree is removed on drop.
pub struct Fixture {
    ebpf: aya::Ebpf,
    live: LiveMaps,
    model: Model,
    pins: Pins,
    pin_dir: std::path::PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = datapath::detach_all(&self.pins);
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

pub fn fixture() -> Fixture {
    crate::ensure_bpffs();
    let pin_dir: std::path::PathBuf = format!("/sys/fs/bpf/{}", crate::unique("p25fuzz")).into();
    let mut cfg = Config::parse(fuzzgen::CONFIG, Path::new("fuzzgen::CONFIG")).unwrap();
    cfg.pin_dir = pin_dir.clone();
    let pins = Pins::new(&cfg.pin_dir);
    let ebpf = datapath::load(&cfg, &pins).expect("load the programs");
    let mut live = LiveMaps::open(&pins).unwrap();
    let now = boot_ns();
    let e = fixture_entries();
    // Expiries far from now either way: the model's clock is frozen, the kernel's is not.
    let entry = |expires_ns| Exempt {
        expires_ns,
        origin: ORIGIN_SESSION,
        _pad: 0,
    };
    let mut want = Desired::from_config_now(&cfg);
    want.exip4.insert(e.expired4, entry(1));
    want.exip4
        .insert(e.timed4, entry(now + 24 * 3_600_000_000_000));
    want.exip6.insert(e.expired6, entry(1));
    want.exip4.insert(e.raw_expired4, entry(1));
    want.exip4
        .insert(e.raw_timed4, entry(now + 24 * 3_600_000_000_000));
    want.exip6.insert(e.raw_expired6, entry(1));
    for addr in [e.session56, e.raw_session56] {
        want.exnet6.insert(
            NetKey6 {
                prefix_len: 56,
                addr,
            },
            entry(0),
        );
    }
    want.settings.session_prefix_lens[0] = 56;
    want.settings.session_prefix_count = 1;
    policy::apply(&mut live, &want).unwrap();
    let model = crate::kernel::model_of(&want, now);
    Fixture {
        ebpf,
        live,
        model,
        pins,
        pin_dir,
    }
}

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TC_ACT_UNSPEC: u32 = u32::MAX;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub frames: u64,
    pub seed: u64,
    /// Index of the first frame (to replay one frame of a run: `--skip I --frames 1`).
    pub skip: u64,
    pub gen: Options,
    /// `action: reject`: blocked well-formed segments are answered with a RST (XDP_TX, TC
    /// redirect), which still counts as blocked; the answer path sees every odd frame too.
    pub reject: bool,
    /// Failures kept with their bytes for the report.
    pub keep: usize,
}

#[derive(Clone, Debug, Default)]
pub struct ProgStats {
    pub runs: u64,
    pub pass: u64,
    pub block: u64,
    /// Blocks answered with a RST (XDP_TX, TC redirect) under `reject`.
    pub answered: u64,
    /// BPF_PROG_TEST_RUN refused the input (skb programs want a whole IP header).
    pub refused: u64,
    /// Must-block frames the program decided (not refused): what the leak oracle covered.
    pub must_block: u64,
    pub leaks: u64,
}

#[derive(Clone, Debug)]
pub struct Failure {
    pub index: u64,
    pub what: String,
    pub case: Case,
}

#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub frames: u64,
    pub elapsed: Duration,
    pub truth: BTreeMap<Truth, u64>,
    /// The same for the raw-IP frames alone (all of them go to the raw TC program).
    pub raw_truth: BTreeMap<Truth, u64>,
    pub programs: BTreeMap<&'static str, ProgStats>,
    pub mismatches: u64,
    pub leaks: u64,
    /// Must-block frames the model itself passes (the kernel follows it unless it mismatches).
    pub model_leaks: u64,
    /// Leaks per generator tag: which forms leak.
    pub leak_tags: BTreeMap<&'static str, u64>,
    pub failures: Vec<Failure>,
}

impl Stats {
    pub fn ok(&self) -> bool {
        self.mismatches == 0 && self.leaks == 0 && self.model_leaks == 0
    }
}

/// Per-CPU reason counters, read one reason at a time: each run moves exactly one counter,
/// so seeing the model's reason move by one proves the kernel chose that reason.
struct Counters {
    seen: [u64; NUM_REASONS as usize],
}

impl Counters {
    fn read(live: &LiveMaps, r: Reason) -> u64 {
        live.counters
            .get(&(r as u32), 0)
            .expect("read a counter")
            .iter()
            .sum()
    }

    fn new(live: &LiveMaps) -> Counters {
        let mut seen = [0; NUM_REASONS as usize];
        for r in Reason::ALL {
            seen[r as usize] = Counters::read(live, r);
        }
        Counters { seen }
    }

    /// The reason the last run counted.
    fn moved(&mut self, live: &LiveMaps, expected: Reason) -> Option<Reason> {
        let v = Counters::read(live, expected);
        if v == self.seen[expected as usize] + 1 {
            self.seen[expected as usize] = v;
            return Some(expected);
        }
        let mut found = None;
        for r in Reason::ALL {
            let v = Counters::read(live, r);
            if v != self.seen[r as usize] {
                found = Some(r);
                self.seen[r as usize] = v;
            }
        }
        found
    }
}

fn test_run(f: &mut Fixture, prog: &str, data: &[u8]) -> Result<u32, String> {
    crate::kernel::test_run(&mut f.ebpf, prog, data)
}

/// Pass (true) or block (false), from a program's return value.
fn passed(prog: &str, ret: u32) -> Option<bool> {
    match (prog == PROG_XDP, ret) {
        (true, XDP_PASS) | (false, TC_ACT_UNSPEC) => Some(true),
        (true, XDP_DROP | XDP_TX) | (false, TC_ACT_SHOT | TC_ACT_REDIRECT) => Some(false),
        _ => None,
    }
}

/// Runs `o.frames` frames; `progress` is called now and then with the stats so far.
pub fn run(f: &mut Fixture, o: &RunOptions, progress: impl FnMut(&Stats)) -> Stats {
    run_cases(f, o, |i| fuzzgen::case(o.seed, i, &o.gen), progress)
}

/// [`run`] over frames of the caller's (`case(i)` for each index `i` the options name):
/// the same comparison with the model and the same leak oracle.
pub fn run_cases(
    f: &mut Fixture,
    o: &RunOptions,
    mut case_at: impl FnMut(u64) -> Case,
    mut progress: impl FnMut(&Stats),
) -> Stats {
    let mut st = Stats::default();
    let mut s = f.live.settings.get(&0, 0).expect("read settings");
    s.flags = if o.reject {
        s.flags | FLAG_REJECT
    } else {
        s.flags & !FLAG_REJECT
    };
    f.live.settings.set(0, s, 0).expect("write settings");
    let mut counters = Counters::new(&f.live);
    let start = Instant::now();
    let mut last = start;
    for i in o.skip..o.skip + o.frames {
        let case = case_at(i);
        *st.truth.entry(case.truth).or_default() += 1;
        let model = classify(case.bytes.as_slice(), case.link, &f.model);
        let fail = |st: &mut Stats, what: String| {
            if st.failures.len() < o.keep {
                st.failures.push(Failure {
                    index: i,
                    what,
                    case: case.clone(),
                });
            }
        };
        if case.truth == Truth::MustBlock && model.is_pass() {
            st.model_leaks += 1;
            fail(&mut st, format!("model leak: passed as {}", model.name()));
        }
        // Raw frames carry the protocol BPF_PROG_TEST_RUN gives the skb (fuzzgen sets it).
        let progs: &[&'static str] = match case.link {
            Link::Ethernet => &[PROG_XDP, PROG_TC],
            Link::RawProto(_) => {
                *st.raw_truth.entry(case.truth).or_default() += 1;
                &[PROG_TC_RAW]
            }
        };
        let mut leaked = false;
        for &prog in progs {
            let ps = st.programs.entry(prog).or_default();
            let ret = match test_run(f, prog, &case.bytes) {
                Ok(r) => r,
                // skb test runs pull a whole IP header first; XDP covers those frames.
                Err(_) if prog != PROG_XDP && short_for_skb(&case.bytes) => {
                    ps.refused += 1;
                    continue;
                }
                Err(e) => {
                    st.mismatches += 1;
                    fail(&mut st, format!("{prog}: test_run failed: {e}"));
                    continue;
                }
            };
            ps.runs += 1;
            if case.truth == Truth::MustBlock {
                ps.must_block += 1;
            }
            if matches!(
                (prog == PROG_XDP, ret),
                (true, XDP_TX) | (false, TC_ACT_REDIRECT)
            ) {
                ps.answered += 1;
            }
            let kernel = counters.moved(&f.live, model);
            let pass = passed(prog, ret);
            match pass {
                Some(true) => ps.pass += 1,
                Some(false) => ps.block += 1,
                None => {}
            }
            if pass == Some(true) && case.truth == Truth::MustBlock {
                ps.leaks += 1;
                st.leaks += 1;
                leaked = true;
                fail(
                    &mut st,
                    format!(
                        "{prog} LEAK: passed a must-block frame ({})",
                        kernel.map_or("?", |r| r.name())
                    ),
                );
            }
            if kernel != Some(model) || pass != Some(model.is_pass()) {
                st.mismatches += 1;
                fail(
                    &mut st,
                    format!(
                        "{prog} MISMATCH: returned {ret} counting {}, model says {}",
                        kernel.map_or("nothing", |r| r.name()),
                        model.name()
                    ),
                );
            }
        }
        if leaked || (case.truth == Truth::MustBlock && model.is_pass()) {
            for t in &case.tags {
                *st.leak_tags.entry(t).or_default() += 1;
            }
        }
        st.frames += 1;
        if last.elapsed() > Duration::from_secs(10) {
            last = Instant::now();
            st.elapsed = start.elapsed();
            progress(&st);
        }
    }
    st.elapsed = start.elapsed();
    st
}

/// Frames an skb test run refuses: shorter than an Ethernet header, or than the IP header
/// the protocol in bytes 12-13 promises after it (raw frames included: the test run reads
/// them as Ethernet).
fn short_for_skb(frame: &[u8]) -> bool {
    frame.len() < 14
        || match u16::from_be_bytes([frame[12], frame[13]]) {
            0x0800 => frame.len() < 14 + 20,
            0x86dd => frame.len() < 14 + 40,
            _ => false,
        }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, w: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        writeln!(
            w,
            "{} frames in {:.1} s: {:.0} frames/s",
            self.frames,
            secs,
            self.frames as f64 / secs
        )?;
        for (t, n) in &self.truth {
            let raw = self.raw_truth.get(t).copied().unwrap_or(0);
            writeln!(w, "  truth {:<48} {n:>9} (raw IP {raw})", t.name())?;
        }
        writeln!(
            w,
            "  {:<14} {:>9} {:>9} {:>9} {:>9} {:>8} {:>10} {:>6}",
            "program", "runs", "pass", "block", "answered", "refused", "must-block", "leaks"
        )?;
        for (p, s) in &self.programs {
            writeln!(
                w,
                "  {:<14} {:>9} {:>9} {:>9} {:>9} {:>8} {:>10} {:>6}",
                p, s.runs, s.pass, s.block, s.answered, s.refused, s.must_block, s.leaks
            )?;
        }
        writeln!(w, "mismatches (kernel vs model): {}", self.mismatches)?;
        writeln!(
            w,
            "leaks (must-block frames passed): {} by programs, {} by the model",
            self.leaks, self.model_leaks
        )?;
        if !self.leak_tags.is_empty() {
            let mut tags: Vec<_> = self.leak_tags.iter().collect();
            tags.sort_by(|a, b| b.1.cmp(a.1));
            let list: Vec<String> = tags.iter().map(|(t, n)| format!("{t} {n}")).collect();
            writeln!(w, "leaking frames by tag: {}", list.join(", "))?;
        }
        Ok(())
    }
}

impl Failure {
    pub fn describe(&self, seed: u64) -> String {
        format!(
            "frame #{} (replay: --seed {seed} --skip {} --frames 1): {}\n  truth: {}; link {:?}; tags: {}\n  hex: {}",
            self.index,
            self.index,
            self.what,
            self.case.truth.name(),
            self.case.link,
            self.case.tags.join(" "),
            hex(&self.case.bytes)
        )
    }
}

/// A seed from the clock and the process id, for runs that do not name one.
pub fn random_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.as_nanos() as u64 ^ ((std::process::id() as u64) << 40)
}
