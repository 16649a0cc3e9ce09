//! Fails early, with the fix, when bpf-linker is missing (the eBPF target links with it).
fn main() {
    println!("cargo:rerun-if-env-changed=PATH");
    if which::which("bpf-linker").is_err() {
        panic!("bpf-linker not found on PATH: run `cargo xtask build` once, it installs it");
    }
}
