//! The differential fuzz, bounded, as part of the normal suite: generated frames through every
//! program (BPF_PROG_TEST_RUN) and the model; 0 mismatches and 0 leaks by the generator's own
//! truth. `cargo xtask fuzz --frames N` runs the same loop at any size.

use port25_tests::{
    fuzz::{self, RunOptions},
    fuzzgen::{Options, PppForms},
    require_root,
};

/// 50,000 in all: most with `action: drop`, the rest with `action: reject`.
const FRAMES: u64 = 40_000;
const FRAMES_REJECT: u64 = 10_000;

/// Every PPP form `ppp_generic.c` turns into IP (1-byte protocol, multilink, VJ, compressed,
/// MPLS), as the parser now reads them. `PORT25_FUZZ_PPP_FORMS=all|classic` overrides it.
const PPP_FORMS: PppForms = PppForms::All;

fn ppp_forms() -> PppForms {
    match std::env::var("PORT25_FUZZ_PPP_FORMS").as_deref() {
        Ok("all") => PppForms::All,
        Ok("classic") => PppForms::Classic,
        Ok(other) => panic!("PORT25_FUZZ_PPP_FORMS: all or classic, not {other:?}"),
        Err(_) => PPP_FORMS,
    }
}

fn seed() -> u64 {
    match std::env::var("PORT25_FUZZ_SEED") {
        Ok(s) => s.parse().expect("PORT25_FUZZ_SEED: a u64"),
        Err(_) => fuzz::random_seed(),
    }
}

fn run(ppp: PppForms, frames: u64, reject: bool) {
    let seed = seed();
    let mut f = fuzz::fixture();
    let o = RunOptions {
        frames,
        seed,
        skip: 0,
        gen: Options { ppp },
        reject,
        keep: 10,
    };
    let st = fuzz::run(&mut f, &o, |_| {});
    eprint!("seed {seed}, ppp forms {ppp:?}, reject {reject}\n{st}");
    let failures: Vec<String> = st.failures.iter().map(|x| x.describe(seed)).collect();
    assert!(
        st.ok(),
        "differential fuzz failed (replay: PORT25_FUZZ_SEED={seed}, or cargo xtask fuzz --seed {seed}):\n{st}{}",
        failures.join("\n")
    );
    // The oracle only means something if it saw frames to block, on every program.
    assert!(
        st.truth
            .get(&port25_tests::fuzzgen::Truth::MustBlock)
            .copied()
            .unwrap_or(0)
            > frames / 20,
        "{st}"
    );
    for (p, s) in &st.programs {
        assert!(s.block > 0 && s.pass > 0, "{p}: {s:?}");
        // The raw program sees a sixth of the frames; its must-block ones present the
        // protocol the plan assumed.
        assert!(s.must_block > frames / 100, "{p}: {s:?}");
    }
}

#[test]
fn differential_fuzz_agrees_with_the_model_and_leaks_nothing() {
    require_root!();
    run(ppp_forms(), FRAMES, false);
}

#[test]
fn differential_fuzz_with_action_reject() {
    require_root!();
    run(ppp_forms(), FRAMES_REJECT, true);
}
