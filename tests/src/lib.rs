//! Helpers for the kernel and namespace tests. The tests are plain binaries: they can run
//! prebuilt, without cargo (`PORT25_CTL` names the controller binary).

pub mod bare;
pub mod flood;
pub mod frame;
pub mod fuzz;
pub mod fuzzgen;
pub mod kernel;
pub mod lab;
pub mod leakgen;
pub mod pg;
pub mod sniff;
pub mod table;

/// Skips the calling test, loudly, when not root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !nix::unistd::geteuid().is_root() {
            eprintln!(
                "SKIP {}: needs root (BPF, network namespaces)",
                module_path!()
            );
            return;
        }
    };
}

/// A bpffs at /sys/fs/bpf in this (host) mount namespace.
pub fn ensure_bpffs() {
    let p = std::path::Path::new("/sys/fs/bpf");
    if !port25_ctl::bpf::pins::is_bpffs(p) {
        nix::mount::mount(
            Some("bpf"),
            p,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount bpffs at /sys/fs/bpf");
    }
}

/// A name unique to this process and call, for namespaces and pin trees.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A finished command, for assertion messages.
pub fn text(o: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Why this kernel cannot run a test that needs tcx (a pinnable bpf_link, Linux 6.6+), if it
/// cannot; without it the daemon attaches TC as a netlink clsact filter. Probed, not read from
/// the version: BPF_PROG_QUERY on a tcx attach type is EINVAL on a kernel without tcx.
pub fn tcx_missing() -> Option<String> {
    const BPF_PROG_QUERY: libc::c_long = 16;
    const BPF_TCX_INGRESS: u32 = 46;
    // union bpf_attr's `query`: target_ifindex, attach_type, then zeros (no id buffers).
    let mut attr = [0u32; 32];
    attr[0] = 1; // lo, which every network namespace has
    attr[1] = BPF_TCX_INGRESS;
    // SAFETY: attr is a zeroed bpf_attr-sized buffer that outlives the call; the kernel writes
    // only the count fields inside it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    let err = std::io::Error::last_os_error();
    (rc != 0 && err.raw_os_error() == Some(libc::EINVAL))
        .then(|| "this kernel has no tcx (BPF_PROG_QUERY on BPF_TCX_INGRESS: EINVAL)".to_string())
}

/// Reports that the running test (or `part` of it) cannot run on this kernel, and why: on
/// stderr, and as a line `test<TAB>part<TAB>reason` in `$PORT25_SKIP_LOG` when set, which the VM
/// runner (`cargo xtask test --vm`) counts as skipped rather than passed.
pub fn skip(part: Option<&str>, reason: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("?");
    eprintln!("SKIP {test} {}: {reason}", part.unwrap_or(""));
    if let Some(path) = std::env::var_os("PORT25_SKIP_LOG") {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("open PORT25_SKIP_LOG");
        writeln!(f, "{test}\t{}\t{reason}", part.unwrap_or("whole"))
            .expect("write PORT25_SKIP_LOG");
    }
}

/// Skips the calling test, with the reason, on a kernel without tcx (see [`tcx_missing`]).
#[macro_export]
macro_rules! require_tcx {
    () => {
        if let Some(why) = $crate::tcx_missing() {
            $crate::skip(None, &why);
            return;
        }
    };
}

/// How many times longer than on a real machine to wait for the daemon to come up or
/// answer: `PORT25_TEST_PATIENCE` (default 1). The VM runner sets it, as a kernel emulated
/// by TCG verifies the programs (hundreds of thousands of instructions on 6.1) several
/// times slower, and slower still on a loaded host. Only waits that end early on success
/// are scaled: a test cannot pass by waiting longer for something that should not happen.
pub fn patience() -> u32 {
    std::env::var("PORT25_TEST_PATIENCE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(1)
}
