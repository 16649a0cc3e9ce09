//! The kernel tests' shared parts: the reference model holding what a policy wrote into the
//! maps, and one BPF_PROG_TEST_RUN of a loaded program.

use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use port25_common::model::Model;
use port25_ctl::{bpf::datapath::PROG_XDP, policy::Desired};

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

/// The program's return value for one frame; the error keeps the kernel's reason.
pub fn test_run(ebpf: &mut aya::Ebpf, prog: &str, data: &[u8]) -> Result<u32, String> {
    let opts = TestRunOptions {
        data_in: Some(data),
        ..Default::default()
    };
    let p = ebpf.program_mut(prog).unwrap();
    let ret = if prog == PROG_XDP {
        let p: &Xdp = (&*p).try_into().unwrap();
        p.test_run(opts)
    } else {
        let p: &SchedClassifier = (&*p).try_into().unwrap();
        p.test_run(opts)
    };
    ret.map(|r| r.return_value)
        .map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e)))
}
