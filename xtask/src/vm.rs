//! `cargo xtask test --vm 6.1|6.12`: the kernel and end-to-end tests inside a QEMU VM running
//! Debian's cloud kernel, the kernels access routers run (DESIGN.md "Build", VM recipe).
//!
//! Everything comes from Debian apt and rustup, cached under `target/vm/`: the kernel package
//! is unpacked with `dpkg-deb -x` (never installed as the host's kernel); the initramfs holds
//! busybox, the host's iproute2 and util-linux tools, the modules the tests need (by path: the
//! package has no modules.dep), the host's release builds of port25-ctl and of the chosen test
//! binaries, all with their shared libraries (ldd), and an /init that runs them and prints the
//! summary. TCG only: KVM is unusable on these machines.
//!
//! Not static musl builds: port25-ctl does not compile for musl today (`libc::ioctl`'s request
//! is a c_int there, and statfs's f_type an i64), and the host's glibc serves as well.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::build::{ensure_root, root, run};

/// The test binaries run when none are named: the kernel tables, end to end, lifecycle and
/// the programs kept across restarts, the subscriber flow, devices that come and go (globs),
/// the real devices (whose PPPoE part skips, with its reason, on the cloud kernels, built
/// without PPP) and the kernel log (its stack fits 6.1's frame rounding).
pub const DEFAULT_TESTS: &[&str] = &[
    "datapath",
    "families",
    "tunnels",
    "e2e",
    "lifecycle",
    "kept",
    "subscribers",
    "globs",
    "realdev",
    "kernlog",
];

/// Modules the tests need (with their dependencies, resolved from each module's .modinfo):
/// veth for the lab, clsact and cls_bpf for netlink TC, vxlan for the tunnel test, tun for
/// the raw-IP device test; 8021q, pppoe (pppox, ppp_generic, slhc) for the real VLAN and PPPoE
/// devices (`tests/realdev.rs`), and ppp_async, the tty discipline of pppoe-server's sessions.
const MODULES: &[&str] = &[
    "veth",
    "sch_ingress",
    "cls_bpf",
    "act_bpf",
    "vxlan",
    "tun",
    "8021q",
    "pppoe",
    "ppp_async",
];

/// PPP for `tests/realdev.rs`, on their Debian paths (pppoe-server runs `/usr/sbin/pppd` with
/// `pty /usr/sbin/pppoe`: Debian builds it without kernel mode `-k`, whose plugin path
/// `/etc/ppp/plugins/rp-pppoe.so` is carried too): Debian's `ppp` and `pppoe` packages.
const PPP_FILES: &[&str] = &[
    "/usr/sbin/pppd",
    "/usr/sbin/pppoe-server",
    "/usr/sbin/pppoe",
];

/// Host tools the tests call (busybox's `ip` cannot make namespaces or veth pairs).
const HOST_TOOLS: &[&str] = &["ip", "tc", "nsenter", "setpriv", "ethtool"];

pub struct Opts<'a> {
    pub kernel: &'a str,
    /// `cloud` (linux-image-*-cloud-amd64) or `generic` (linux-image-*-amd64).
    pub flavour: &'a str,
    pub tests: &'a [String],
    pub args: &'a [String],
    pub timeout: Duration,
}

pub fn test(o: &Opts) -> Result<()> {
    let vm = prepare(o)?;
    boot(&vm, &mut std::io::stdout())
}

/// A VM ready to boot: its kernel, its initramfs with the tests, and its time limit.
pub struct Prepared {
    vmlinuz: PathBuf,
    initrd: PathBuf,
    timeout: Duration,
}

/// Everything before the boot: host tools, the kernel package, the binaries, the initramfs.
pub fn prepare(o: &Opts) -> Result<Prepared> {
    ensure_root()?;
    ensure_host_tools()?;
    let cache = root().join("target/vm");
    let kernel = kernel_tree(&cache, o.kernel, o.flavour)?;
    let tests: Vec<String> = if o.tests.is_empty() {
        DEFAULT_TESTS.iter().map(|s| s.to_string()).collect()
    } else {
        o.tests.to_vec()
    };
    let bins = build_binaries(&tests)?;
    let initrd = initramfs(
        &cache.join(match o.flavour {
            "cloud" => format!("initrd-{}", o.kernel),
            f => format!("initrd-{}-{f}", o.kernel),
        }),
        &kernel,
        &bins,
        o.args,
    )?;
    Ok(Prepared {
        vmlinuz: kernel.vmlinuz,
        initrd,
        timeout: o.timeout,
    })
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn ensure_host_tools() -> Result<()> {
    // (binary, Debian package)
    let missing: Vec<&str> = [
        ("/usr/bin/qemu-system-x86_64", "qemu-system-x86"),
        ("/bin/busybox", "busybox-static"),
        ("/usr/sbin/ethtool", "ethtool"),
        ("/usr/bin/setpriv", "util-linux"),
        ("/usr/sbin/pppd", "ppp"),
        ("/usr/sbin/pppoe-server", "pppoe"),
    ]
    .into_iter()
    .filter(|(bin, _)| !Path::new(bin).exists())
    .map(|(_, pkg)| pkg)
    .collect();
    if !missing.is_empty() {
        run(Command::new("apt-get").arg("update"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing))?;
    }
    // A dynamic busybox would need its libraries in the initramfs and the static one replaces
    // it in the same path: check it is the static one.
    if Command::new("ldd")
        .arg("/bin/busybox")
        .output()?
        .status
        .success()
    {
        bail!("/bin/busybox is not static: install busybox-static");
    }
    Ok(())
}

/// The apt package of Debian's kernel `series` (6.1, 6.12) of `flavour` (`cloud`: the
/// cloud-amd64 kernel; `generic`: the amd64 one, which has PPP): the newest ABI.
fn kernel_package(series: &str, flavour: &str) -> Result<Option<String>> {
    let suffix = match flavour {
        "cloud" => "-cloud-amd64",
        "generic" => "-amd64",
        f => bail!("unknown kernel flavour {f} (cloud or generic)"),
    };
    let re = format!(
        "^linux-image-{}[.-][0-9][^ ]*{suffix}$",
        series.replace('.', "\\.")
    );
    let found = output(Command::new("apt-cache").args(["search", "--names-only", &re]))?;
    let key = |name: &str| -> Vec<u64> {
        name.split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect()
    };
    Ok(found
        .lines()
        .filter_map(|l| l.split(' ').next())
        .filter(|n| !n.ends_with("-dbg") && !n.ends_with("-unsigned"))
        // `-amd64` also ends the cloud and realtime flavours' names.
        .filter(|n| flavour != "generic" || !(n.contains("-cloud-") || n.contains("-rt-")))
        .map(str::to_string)
        .max_by_key(|n| key(n)))
}

struct Kernel {
    vmlinuz: PathBuf,
    /// `lib/modules/<release>/kernel` of the unpacked package.
    modules: PathBuf,
}

/// Downloads and unpacks the kernel package once; later runs reuse the tree.
fn kernel_tree(cache: &Path, series: &str, flavour: &str) -> Result<Kernel> {
    let mut pkg = kernel_package(series, flavour)?;
    if pkg.is_none() {
        run(Command::new("apt-get").arg("update"))?;
        pkg = kernel_package(series, flavour)?;
    }
    let pkg = pkg.with_context(|| format!("no linux-image-{series}* ({flavour}) in apt"))?;
    let dir = cache.join(&pkg);
    let tree = dir.join("tree");
    if !dir.join("unpacked").exists() {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        run(Command::new("apt-get")
            .current_dir(&dir)
            .args(["download", &pkg]))?;
        let deb = std::fs::read_dir(&dir)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .context("apt-get download left no .deb")?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
        std::fs::remove_file(&deb)?;
        std::fs::write(dir.join("unpacked"), "")?;
    }
    let find = |d: &Path, prefix: &str| -> Result<PathBuf> {
        std::fs::read_dir(d)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
            .with_context(|| format!("no {prefix}* in {}", d.display()))
    };
    let vmlinuz = find(&tree.join("boot"), "vmlinuz-")?;
    let modules = find(&tree.join("lib/modules"), "")?.join("kernel");
    eprintln!("xtask: kernel {}", vmlinuz.display());
    Ok(Kernel { vmlinuz, modules })
}

struct Binaries {
    ctl: PathBuf,
    /// (test name, executable)
    tests: Vec<(String, PathBuf)>,
}

/// The host's release builds (the same the host suite runs); their libraries go along.
fn build_binaries(tests: &[String]) -> Result<Binaries> {
    crate::build::all()?; // rust-src, bpf-linker, and the release build of port25-ctl
    let ctl = crate::build::release_bin("port25-ctl")?;
    let mut cmd = Command::new("nice");
    cmd.current_dir(root()).args([
        "-n",
        "10",
        "cargo",
        "test",
        "--release",
        "-p",
        "port25-tests",
        "--no-run",
        "--message-format=json",
    ]);
    for t in tests {
        cmd.args(["--test", t]);
    }
    eprintln!("xtask: {cmd:?}");
    let out = cmd.stderr(Stdio::inherit()).output()?;
    if !out.status.success() {
        bail!("building the test binaries failed");
    }
    let mut found = BTreeMap::new();
    for line in out.stdout.split(|b| *b == b'\n') {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" || v["profile"]["test"] != true {
            continue;
        }
        if let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str()) {
            found.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    let tests = tests
        .iter()
        .map(|t| {
            let exe = found
                .remove(t)
                .with_context(|| format!("cargo built no test binary `{t}`"))?;
            Ok((t.clone(), exe))
        })
        .collect::<Result<_>>()?;
    Ok(Binaries { ctl, tests })
}

/// Copies `src` to `root/dst` (following symlinks), creating parents.
fn install(src: &Path, root: &Path, dst: &str) -> Result<()> {
    let to = root.join(dst.trim_start_matches('/'));
    std::fs::create_dir_all(to.parent().unwrap())?;
    std::fs::copy(src, &to).with_context(|| format!("copying {}", src.display()))?;
    Ok(())
}

/// Shared libraries of a host binary, with the loader, from ldd.
fn libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let text = output(Command::new("ldd").arg(bin))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once(" => ") {
                Some((_, rest)) => rest.split(' ').next()?,
                None => l.split(' ').next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// The module file of every module by name (`-` and `_` are one), under `modules`.
fn module_index(dir: &Path, index: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir)?.flatten() {
        let p = e.path();
        if p.is_dir() {
            module_index(&p, index)?;
        } else if let Some(name) = p.file_name().and_then(|n| n.to_str()) {
            if let Some(stem) = name.split(".ko").next().filter(|_| name.contains(".ko")) {
                index.insert(stem.replace('-', "_"), p.clone());
            }
        }
    }
    Ok(())
}

/// A module's bytes, uncompressed (busybox insmod takes plain ELF).
fn module_bytes(p: &Path) -> Result<Vec<u8>> {
    let name = p.to_string_lossy();
    if name.ends_with(".xz") {
        Ok(Command::new("xz").arg("-dc").arg(p).output()?.stdout)
    } else if name.ends_with(".zst") {
        Ok(Command::new("zstd").arg("-dc").arg(p).output()?.stdout)
    } else {
        Ok(std::fs::read(p)?)
    }
}

/// `depends=a,b` from the module's .modinfo strings.
fn module_depends(bytes: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    let Some(at) = bytes.windows(key.len()).position(|w| w == key) else {
        return vec![];
    };
    let rest = &bytes[at + key.len()..];
    let end = rest.iter().position(|b| *b == 0).unwrap_or(0);
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('-', "_"))
        .collect()
}

/// The modules to load, dependencies first, as (name, bytes). A module that is not a file is
/// built in (or absent, which `insmod` of its dependents will show).
fn modules(k: &Kernel) -> Result<Vec<(String, Vec<u8>)>> {
    let mut index = BTreeMap::new();
    module_index(&k.modules, &mut index)?;
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<(String, Vec<u8>)>,
    ) -> Result<()> {
        if !seen.insert(name.to_string()) {
            return Ok(());
        }
        let Some(path) = index.get(name) else {
            eprintln!("xtask: module {name}: no file, taken as built in");
            return Ok(());
        };
        let bytes = module_bytes(path)?;
        for dep in module_depends(&bytes) {
            visit(&dep, index, seen, order)?;
        }
        order.push((name.to_string(), bytes));
        Ok(())
    }
    for m in MODULES {
        visit(m, &index, &mut seen, &mut order)?;
    }
    Ok(order)
}

const INIT: &str = r#"#!/bin/sh
# port25 VM init: mounts, modules, the test binaries, a summary, power off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# pppoe-server's pppd talks to its session's pppoe through a pseudo-tty.
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
mount -t bpf bpf /sys/fs/bpf
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /sys/fs/cgroup /run/netns /var && mount -t cgroup2 cgroup2 /sys/fs/cgroup
ln -s /run /var/run
ip link set lo up
failed=0
for m in $(cat /modules/order); do
    insmod /modules/$m.ko || { echo "P25VM insmod $m failed"; failed=$((failed + 1)); }
done
echo "P25VM uname -r: $(uname -r)"
export PORT25_CTL=/usr/local/bin/port25-ctl PORT25_SKIP_LOG=/tmp/skipped RUST_BACKTRACE=1
# TCG is slow, and slower on a loaded host: the daemon's waits scale (tests/src/lib.rs).
export PORT25_TEST_PATIENCE=6
passed=0
for t in $(cat /tests/list); do
    echo "P25VM test binary $t"
    start=$(date +%s)
    # --show-output: what passing tests print too (the verifier's instruction counts).
    /tests/$t --show-output $(cat /tests/args) > /tmp/$t.out 2>&1
    rc=$?
    cat /tmp/$t.out
    p=$(awk '/^test result:/ { for (i = 1; i < NF; i++) if ($(i+1) ~ /^passed/) s += $i } END { print s + 0 }' /tmp/$t.out)
    f=$(awk '/^test result:/ { for (i = 1; i < NF; i++) if ($(i+1) ~ /^failed/) s += $i } END { print s + 0 }' /tmp/$t.out)
    if [ "$rc" != 0 ] && [ "$f" = 0 ]; then f=1; echo "P25VM $t exited $rc"; fi
    echo "P25VM $t: $p passed, $f failed in $(( $(date +%s) - start )) s"
    passed=$((passed + p)); failed=$((failed + f))
done
touch /tmp/skipped
cat /tmp/*.out | grep -a ': verified .* instructions$' | sort -u | sed 's/^/P25VM verifier: /'
whole=$(awk -F '\t' '$2 == "whole"' /tmp/skipped | wc -l)
skipped=$(wc -l < /tmp/skipped)
awk -F '\t' '{ print "P25VM SKIPPED " $1 ($2 == "whole" ? "" : " (" $2 ")") ": " $3 }' /tmp/skipped
echo "$((passed - whole)) passed, $failed failed, $skipped skipped"
poweroff -f
"#;

/// Lays out the initramfs tree and packs it (`busybox cpio`: the host has no cpio).
fn initramfs(dir: &Path, k: &Kernel, bins: &Binaries, args: &[String]) -> Result<PathBuf> {
    let tree = dir.join("root");
    let _ = std::fs::remove_dir_all(&tree);
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run", "etc",
    ] {
        std::fs::create_dir_all(tree.join(d))?;
    }
    install(Path::new("/bin/busybox"), &tree, "/bin/busybox")?;
    let applets = output(Command::new("/bin/busybox").arg("--list-full"))?;
    for a in applets.lines().filter(|a| !a.is_empty()) {
        let link = tree.join(a);
        std::fs::create_dir_all(link.parent().unwrap())?;
        let _ = std::os::unix::fs::symlink("/bin/busybox", &link);
    }
    // Host tools on the same paths, replacing busybox's applets of the same name.
    for tool in HOST_TOOLS {
        let path = output(Command::new("sh").args(["-c", &format!("command -v {tool}")]))?;
        let path = PathBuf::from(path.trim());
        let dst = format!("/usr/local/sbin/{tool}");
        install(&path, &tree, &dst)?;
        for lib in libraries(&path)? {
            install(&lib, &tree, &lib.to_string_lossy())?;
        }
    }
    ppp(&tree)?;
    std::fs::write(tree.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n")?;
    std::fs::write(tree.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    let mut order = String::new();
    for (name, bytes) in modules(k)? {
        std::fs::create_dir_all(tree.join("modules"))?;
        std::fs::write(tree.join(format!("modules/{name}.ko")), bytes)?;
        order.push_str(&name);
        order.push('\n');
    }
    std::fs::write(tree.join("modules/order"), order)?;
    install(&bins.ctl, &tree, "/usr/local/bin/port25-ctl")?;
    for lib in libraries(&bins.ctl)? {
        install(&lib, &tree, &lib.to_string_lossy())?;
    }
    let mut list = String::new();
    for (name, exe) in &bins.tests {
        install(exe, &tree, &format!("/tests/{name}"))?;
        for lib in libraries(exe)? {
            install(&lib, &tree, &lib.to_string_lossy())?;
        }
        list.push_str(name);
        list.push('\n');
    }
    std::fs::write(tree.join("tests/list"), list)?;
    // Harness arguments, split by the shell: a test name filter, --test-threads=N, ...
    // One test at a time unless told otherwise: under TCG on a busy host, a daemon starting
    // beside two verifier-heavy table tests missed the lab's 20 s start bound.
    let mut args = args.to_vec();
    if !args.iter().any(|a| a.starts_with("--test-threads")) {
        args.push("--test-threads=1".into());
    }
    std::fs::write(tree.join("tests/args"), args.join(" "))?;
    let init = tree.join("init");
    std::fs::write(&init, INIT)?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))?;
    // Debug info is most of a test binary; the VM unpacks the archive into its RAM.
    let mut strip = Command::new("strip");
    strip
        .arg("--strip-debug")
        .arg(tree.join("usr/local/bin/port25-ctl"));
    for (name, _) in &bins.tests {
        strip.arg(tree.join(format!("tests/{name}")));
    }
    run(&mut strip)?;
    let initrd = dir.join("initrd.cpio");
    run(Command::new("sh").current_dir(&tree).args([
        "-c",
        &format!(
            "find . | /bin/busybox cpio -o -H newc > {}",
            initrd.display()
        ),
    ]))?;
    Ok(initrd)
}

/// pppd, the rp-pppoe plugin and pppoe-server with their libraries, and an /etc/ppp whose
/// options file is empty: Debian's asks for `auth`, a modem and a lock, and the tests pass
/// their options on the command line.
fn ppp(tree: &Path) -> Result<()> {
    let mut files: Vec<PathBuf> = PPP_FILES.iter().map(PathBuf::from).collect();
    // /usr/lib/pppd/<version>/: the plugins, built for that pppd only.
    for dir in std::fs::read_dir("/usr/lib/pppd")?.flatten() {
        for so in std::fs::read_dir(dir.path())?.flatten() {
            let name = so.file_name();
            if name == "rp-pppoe.so" || name == "pppoe.so" {
                files.push(so.path());
            }
        }
    }
    let plugin = files
        .iter()
        .find(|p| p.ends_with("rp-pppoe.so"))
        .context("no /usr/lib/pppd/*/rp-pppoe.so (Debian package pppoe)")?
        .clone();
    for f in &files {
        install(f, tree, &f.to_string_lossy())?;
        for lib in libraries(f)? {
            install(&lib, tree, &lib.to_string_lossy())?;
        }
    }
    install(&plugin, tree, "/etc/ppp/plugins/rp-pppoe.so")?;
    std::fs::write(
        tree.join("etc/ppp/options"),
        "# port25 VM: the tests give pppd its options\n",
    )?;
    std::fs::create_dir_all(tree.join("var/lock"))?;
    Ok(())
}

/// Boots the VM, streams its console, and reads the verdict from it (QEMU exits 0 on poweroff
/// whatever happened inside).
/// Boots the VM and runs the tests, the console going to `out` (stdout, or a log file while
/// the host suite runs beside it); the summary line also goes to stdout.
pub fn boot(vm: &Prepared, out: &mut dyn std::io::Write) -> Result<()> {
    let (result, started) = boot_once(vm, out);
    if result.is_err() && !started {
        // The kernel died before /init ran (seen once: "IO-APIC + timer doesn't work" under
        // TCG on a loaded host): that says nothing of port25; boot again, once.
        println!("xtask: the VM kernel never reached /init; booting it again");
        return boot_once(vm, out).0;
    }
    result
}

/// One boot; also whether /init started (the tests ran, or began to).
fn boot_once(vm: &Prepared, out: &mut dyn std::io::Write) -> (Result<()>, bool) {
    let mut started = false;
    let r = boot_and_watch(vm, out, &mut started);
    (r, started)
}

fn boot_and_watch(vm: &Prepared, out: &mut dyn std::io::Write, started: &mut bool) -> Result<()> {
    let (vmlinuz, initrd, timeout) = (&vm.vmlinuz, &vm.initrd, vm.timeout);
    let mut cmd = Command::new("nice");
    cmd.args([
        "-n",
        "10",
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-m",
        "2048",
    ])
    .args(["-smp", "2", "-nographic", "-no-reboot", "-kernel"])
    .arg(vmlinuz)
    .arg("-initrd")
    .arg(initrd)
    // no_timer_check: under TCG on a loaded host the kernel's check that the timer interrupt
    // works can time out and panic ("IO-APIC + timer doesn't work"); virtual machines skip it.
    .args(["-append", "console=ttyS0 panic=-1 quiet no_timer_check"])
    .stdin(Stdio::null())
    .stdout(Stdio::piped());
    let _ = writeln!(out, "xtask: {cmd:?}");
    let start = Instant::now();
    let mut child = cmd.spawn()?;
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let line = String::from_utf8_lossy(&line).trim_end().to_string();
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = start + timeout;
    let mut uname = None;
    let mut summary = None;
    let mut booted = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let _ = writeln!(out, "{line}");
                // The first line after the BIOS carries its terminal escapes in front.
                if let Some((_, r)) = line.split_once("P25VM uname -r: ") {
                    uname = Some(r.to_string());
                    booted = Some(start.elapsed());
                    *started = true;
                }
                if let Some(s) = parse_summary(&line) {
                    summary = Some((line, s));
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("VM timed out after {timeout:?} (summary: {summary:?})");
            }
        }
    }
    let status = child.wait()?;
    let total = start.elapsed();
    println!(
        "xtask: VM kernel {}, tests started after {:.1?}, finished after {total:.1?} (qemu {status})",
        uname.as_deref().unwrap_or("?"),
        booted.unwrap_or_default()
    );
    let (summary, [passed, failed, _skipped]) =
        summary.context("the VM printed no summary (boot or /init failed)")?;
    let _ = writeln!(out, "{summary}");
    println!("VM {summary}");
    if failed > 0 || passed == 0 {
        bail!("VM tests: {summary}");
    }
    Ok(())
}

/// The last line /init prints, `N passed, M failed, K skipped`, as [N, M, K].
fn parse_summary(line: &str) -> Option<[u64; 3]> {
    let mut out = [0; 3];
    let mut parts = line.split(", ");
    for (n, word) in out.iter_mut().zip(["passed", "failed", "skipped"]) {
        let (num, w) = parts.next()?.split_once(' ')?;
        if w != word {
            return None;
        }
        *n = num.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_is_the_exact_line_only() {
        assert_eq!(
            parse_summary("23 passed, 0 failed, 6 skipped"),
            Some([23, 0, 6])
        );
        for other in [
            "test result: ok. 5 passed; 0 failed; 0 ignored",
            "P25VM e2e: 7 passed, 0 failed in 45 s",
            "23 passed, 0 failed",
            "x passed, 0 failed, 0 skipped",
            "1 passed, 0 failed, 0 skipped, 2 more",
            "[  3.1] 1 passed, 0 failed, 0 skipped",
        ] {
            assert_eq!(parse_summary(other), None, "{other}");
        }
    }

    #[test]
    fn module_dependencies_come_from_modinfo() {
        let ko = b"\x7fELF...\0license=GPL\0depends=udp_tunnel,ip6-udp-tunnel\0intree=Y\0";
        assert_eq!(module_depends(ko), ["udp_tunnel", "ip6_udp_tunnel"]);
        assert!(module_depends(b"\0depends=\0name=veth\0").is_empty());
        assert!(module_depends(b"\0name=veth\0").is_empty());
    }
}
