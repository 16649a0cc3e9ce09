//! The kernel tests' shared parts: the reference model holding what a policy wrote into the
//! maps, and one BPF_PROG_TEST_RUN of a loaded program (tests and bench alike).

use std::time::Duration;

use aya::programs::{Program, TestRun, TestRunOptions};
use port25_common::model::Model;
use port25_ctl::policy::Desired;

/// The model of the maps `want` was applied to, at boot time `now_ns`.
pub fn model_of(want: &Desired, now_ns: u64) -> Model {
    Model {
        settings: Some(want.settings),
        ports: want.ports.keys().copied().collect(),
        ranges4: want.ranges4.keys().copied().collect(),
        ranges6: want.ranges6.keys().copied().collect(),
        mail4: want.mail4.keys().copied().collect(),
        mail6: want.mail6.keys().copied().collect(),
        exip4: want.exip4.clone(),
        exip6: want.exip6.clone(),
        expfx4: want.expfx4.iter().map(|((a, l), e)| (*a, *l, *e)).collect(),
        expfx6: want.expfx6.iter().map(|((a, l), e)| (*a, *l, *e)).collect(),
        exnet6: want.exnet6.iter().map(|(k, e)| (*k, *e)).collect(),
        now_ns,
    }
}

/// What a run asks for beyond the return value.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    /// Collect the frame as the program left it (an answered RST, say).
    pub data_out: bool,
    /// Run the frame this many times (0 = once); the kernel reports the mean time per run.
    pub repeat: u32,
}

/// One BPF_PROG_TEST_RUN's result.
#[derive(Debug)]
pub struct Run {
    pub ret: u32,
    /// The frame after the program (empty unless asked for).
    pub out: Vec<u8>,
    /// The kernel's mean per run (meaningful with `repeat`).
    pub duration: Duration,
}

/// Room beyond the input for a program that grows the frame.
const OUT_HEADROOM: usize = 256;

/// Runs `data` through the loaded XDP or TC program `prog`; the error keeps the kernel's
/// reason (BPF_PROG_TEST_RUN refuses some frames, see `table::Run::Refused`).
pub fn run(ebpf: &mut aya::Ebpf, prog: &str, data: &[u8], opts: RunOptions) -> Result<Run, String> {
    let mut out = vec![
        0u8;
        if opts.data_out {
            data.len() + OUT_HEADROOM
        } else {
            0
        }
    ];
    let topts = TestRunOptions {
        data_in: Some(data),
        data_out: opts.data_out.then_some(out.as_mut_slice()),
        repeat: opts.repeat.max(1),
        ..Default::default()
    };
    let r = match ebpf.program_mut(prog) {
        Some(Program::Xdp(p)) => p.test_run(topts),
        Some(Program::SchedClassifier(p)) => p.test_run(topts),
        Some(_) => return Err(format!("{prog}: neither XDP nor TC")),
        None => return Err(format!("{prog}: no such program")),
    }
    .map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e)))?;
    out.truncate(r.data_size_out as usize);
    Ok(Run {
        ret: r.return_value,
        out,
        duration: r.duration,
    })
}

/// The program's return value for one frame; the error keeps the kernel's reason.
pub fn test_run(ebpf: &mut aya::Ebpf, prog: &str, data: &[u8]) -> Result<u32, String> {
    run(ebpf, prog, data, RunOptions::default()).map(|r| r.ret)
}
