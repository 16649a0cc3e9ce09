//! Toolchain setup and builds. Each step checks first, so a warm machine pays nothing.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Where cargo puts its builds, as cargo itself resolves it (`CARGO_TARGET_DIR`,
/// `CARGO_BUILD_TARGET_DIR`, `build.target-dir` in a config file, relative to the workspace
/// where every cargo this runs is started): asked of cargo once. Binaries are looked for
/// where the build just put them: a guess could find an older build and test that one.
pub fn target_dir() -> Result<PathBuf> {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    if let Some(d) = DIR.get() {
        return Ok(d.clone());
    }
    let meta = output(Command::new("cargo").current_dir(root()).args([
        "metadata",
        "--no-deps",
        "--format-version",
        "1",
    ]))?;
    let meta: serde_json::Value =
        serde_json::from_str(&meta).context("reading cargo metadata's answer")?;
    let dir = meta["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata names no target_directory")?;
    Ok(DIR.get_or_init(|| dir).clone())
}

/// A release binary of the workspace, as `cargo build --release` left it.
pub fn release_bin(name: &str) -> Result<PathBuf> {
    Ok(target_dir()?.join("release").join(name))
}

pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn ensure_rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

/// bpf-linker 0.13 links against LLVM 22, which the nightly toolchain ships as its own
/// libLLVM: build against that, with an rpath to it so it also runs outside `cargo +nightly`.
fn ensure_bpf_linker() -> Result<()> {
    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
    {
        return Ok(());
    }
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let prefix = root().join("target/llvm-prefix");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm, &link)?;
    run(Command::new("cargo")
        .args([
            "+nightly",
            "install",
            "bpf-linker",
            "--version",
            "~0.13",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", &prefix)
        .env(
            "RUSTFLAGS",
            format!("-C link-arg=-Wl,-rpath,{}", lib.display()),
        ))
}

pub fn all() -> Result<()> {
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    run(Command::new("cargo")
        .current_dir(root())
        .args(["build", "--release"]))?;
    eprintln!("xtask: built {}", release_bin("port25-ctl")?.display());
    Ok(())
}

pub fn is_root() -> Result<bool> {
    Ok(output(Command::new("id").arg("-u"))?.trim() == "0")
}

/// BPF and network namespaces need root.
pub fn ensure_root() -> Result<()> {
    if !is_root()? {
        anyhow::bail!("this needs root (BPF, network namespaces)");
    }
    Ok(())
}

/// The namespace lab turns veth offloads off (see tests/src/lab.rs), which needs ethtool; the
/// leak fuzz counts on the far side with nft.
pub fn ensure_lab_tools() -> Result<()> {
    ensure_root()?;
    // (binary, Debian package): ethtool for the lab's veth offloads, nft for the leak fuzz's
    // far-side counter (the internet namespace's own kernel counts what got through).
    let missing: Vec<&str> = [("ethtool", "ethtool"), ("nft", "nftables")]
        .into_iter()
        .filter(|(bin, _)| Command::new(bin).arg("--version").output().is_err())
        .map(|(_, pkg)| pkg)
        // The fleet tests run a private PostgreSQL server from Debian's binaries, which are
        // not on PATH: /usr/lib/postgresql/<version>/bin.
        .chain(postgres_missing().then_some("postgresql"))
        .collect();
    if !missing.is_empty() {
        run(Command::new("apt-get").arg("update"))?;
        run(Command::new("apt-get")
            .args(["install", "-y"])
            .args(&missing))?;
    }
    Ok(())
}

fn postgres_missing() -> bool {
    let Ok(versions) = std::fs::read_dir("/usr/lib/postgresql") else {
        return true;
    };
    !versions
        .flatten()
        .any(|v| v.path().join("bin/initdb").exists())
}

pub fn test(args: &[String]) -> Result<()> {
    all()?;
    if is_root()? {
        ensure_lab_tools()?;
    } else {
        eprintln!("xtask: not root: kernel and namespace tests will skip");
    }
    run(Command::new("cargo")
        .current_dir(root())
        .env("PORT25_CTL", release_bin("port25-ctl")?)
        .args(["test", "--release", "--"])
        .args(args))
}
