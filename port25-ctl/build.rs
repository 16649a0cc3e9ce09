//! Builds the eBPF programs (nightly, bpfel-unknown-none) so they can be embedded.
//! `AYA_BUILD_SKIP=1` skips it, for `cargo check`/`clippy` without bpf-linker.
use anyhow::{anyhow, Context as _};
use aya_build::{build_ebpf, Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let out_dir = std::env::var("OUT_DIR").context("OUT_DIR")?;
    let skipping = matches!(
        std::env::var("AYA_BUILD_SKIP").as_deref(),
        Ok("1") | Ok("true")
    );
    if skipping {
        // An empty object keeps include_bytes! happy; loading it fails with a clear error.
        std::fs::write(format!("{out_dir}/port25"), b"")?;
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../port25-ebpf");
    build_ebpf(
        [Package {
            name: "port25-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::Nightly,
    )
    .map_err(|e| anyhow!("building the eBPF programs failed: {e:#}"))
}
