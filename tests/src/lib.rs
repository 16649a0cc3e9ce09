//! Helpers for the kernel and namespace tests. The tests are plain binaries: they can run
//! prebuilt, without cargo (`PORT25_CTL` names the controller binary).

pub mod frame;
pub mod fuzz;
pub mod fuzzgen;
pub mod kernel;
pub mod lab;
pub mod leakgen;
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
