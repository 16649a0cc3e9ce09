//! Fails early, with the fix, when bpf-linker is missing (the eBPF target links with it).
fn main() {
    println!("cargo:rerun-if-env-changed=PATH");
    // Keeps the offender tracking's hand-over a global function (verified on its own, see
    // src/track.rs): bpf-linker internalizes every symbol it is not told to export.
    println!("cargo:rustc-link-arg-bins=--export=port25_hand_over");
    // The kernel log's staging, likewise (src/klog.rs).
    println!("cargo:rustc-link-arg-bins=--export=port25_klog_stage");
    if which::which("bpf-linker").is_err() {
        panic!("bpf-linker not found on PATH: run `cargo xtask build` once, it installs it");
    }
}
