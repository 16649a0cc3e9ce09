//! A live flood for the bench: real frames into a real veth, the receiver's cost measured as the
//! kernel accounts it. The method of issue 9:
//! - the sender is an XDP program run by BPF_PROG_TEST_RUN in live-frames mode
//!   (`BPF_F_TEST_XDP_LIVE_FRAMES`): each run redirects its frame into a veth, on CPU 0;
//! - each receiving veth's NAPI runs threaded, pinned to CPU 1, so the receiver's whole cost
//!   (the XDP program, the skb, nftables, the forwarding) is CPU 1's busy time in /proc/stat;
//! - what arrived is the receiving queue's own count (`rx_queue_N_xdp_packets`: every frame the
//!   veth's NAPI took off its ring, whatever happened to it next).
//!
//! The sender rewrites the IPv4 source of each frame it sends (the low 16 bits count through
//! 65,535 values, the header checksum kept valid), so a flood comes from many sources as a
//! botnet's does, and forwarded frames pass the stack's header checks.

use std::{
    os::fd::{AsRawFd, OwnedFd},
    process::Command,
    time::{Duration, Instant},
};

use crate::bare::{
    bpf, insn, load_insns, TestRun, ADDK, ADDX, ANDK, BE, BPF_PROG_TEST_RUN, CALL, EXIT, JA, JEQK,
    JGTX, LDXH, LDXW, MOVK, MOVX, RSHK, STXH, XDP, XORK,
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
const BPF_FUNC_REDIRECT: i32 = 23;

/// The receiving veths' MAC (every receiver has the same: they are on separate links).
pub const RX_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x25, 0x01];

/// The sender: bumps the IPv4 source of an Ethernet/IPv4 frame (offset 26) and fixes the
/// header checksum (RFC 1624: the low 16 bits go up by one, or from 0xfffe to 0, so the
/// one's-complement sum goes up by one), then redirects the frame into `ifindex`.
pub fn sender(ifindex: u32) -> std::io::Result<OwnedFd> {
    let insns = [
        insn(LDXW, 2, 1, 0, 0),      // r2 = ctx->data
        insn(LDXW, 3, 1, 4, 0),      // r3 = ctx->data_end
        insn(MOVX, 4, 2, 0, 0),      // r4 = r2
        insn(ADDK, 4, 0, 0, 34),     // r4 += 34 (Ethernet + IPv4 header)
        insn(JGTX, 4, 3, 19, 0),     // short: just send it (to 24)
        insn(LDXH, 5, 2, 28, 0),     // r5 = source, low half
        insn(BE, 5, 0, 0, 16),       // to host order
        insn(JEQK, 5, 0, 2, 0xfffe), // the last value: wrap to 0 (to 10)
        insn(ADDK, 5, 0, 0, 1),
        insn(JA, 0, 0, 1, 0), // (to 11)
        insn(MOVK, 5, 0, 0, 0),
        insn(BE, 5, 0, 0, 16),
        insn(STXH, 2, 5, 28, 0),
        insn(LDXH, 6, 2, 24, 0), // r6 = header checksum
        insn(BE, 6, 0, 0, 16),
        insn(XORK, 6, 0, 0, 0xffff), // the sum
        insn(ADDK, 6, 0, 0, 1),
        insn(MOVX, 7, 6, 0, 0),
        insn(RSHK, 7, 0, 0, 16),
        insn(ANDK, 6, 0, 0, 0xffff),
        insn(ADDX, 6, 7, 0, 0), // end-around carry
        insn(XORK, 6, 0, 0, 0xffff),
        insn(BE, 6, 0, 0, 16),
        insn(STXH, 2, 6, 24, 0),
        insn(MOVK, 1, 0, 0, ifindex as i32), // 24
        insn(MOVK, 2, 0, 0, 0),
        insn(CALL, 0, 0, 0, BPF_FUNC_REDIRECT),
        insn(EXIT, 0, 0, 0, 0),
    ];
    load_insns(XDP, &insns, b"p25flood")
}

/// Pins `fd` at `path` (a bpffs path), for `ip link set ... xdpdrv pinned`.
pub fn pin(fd: &OwnedFd, path: &str) -> std::io::Result<()> {
    #[repr(C)]
    #[derive(Default)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        _rest: [u64; 4],
    }
    let c = std::ffi::CString::new(path).unwrap();
    let mut attr = ObjPin {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// Sends `frame` `count` times through `sender` (live frames), on the calling thread.
pub fn send(sender: &OwnedFd, frame: &[u8], count: u32) -> std::io::Result<()> {
    let mut attr = TestRun {
        prog_fd: sender.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat: count,
        flags: BPF_F_TEST_XDP_LIVE_FRAMES,
        ..Default::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr).map(|_| ())
}

/// One's-complement checksum of an IPv4 header.
fn ip_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet/IPv4 frame to the receivers' MAC: `proto` 6 (a TCP segment with `flags` to
/// `dport`) or 17 (a UDP datagram to `dport`, no checksum), 64 bytes on the wire.
pub fn frame(src: [u8; 4], dst: [u8; 4], proto: u8, dport: u16, flags: u8) -> Vec<u8> {
    let mut l4 = vec![0u8; if proto == 6 { 20 } else { 8 }];
    l4[0..2].copy_from_slice(&40000u16.to_be_bytes());
    l4[2..4].copy_from_slice(&dport.to_be_bytes());
    if proto == 6 {
        l4[12] = 5 << 4;
        l4[13] = flags;
        l4[14..16].copy_from_slice(&64240u16.to_be_bytes());
    } else {
        l4.resize(18, 0);
        let len = l4.len() as u16;
        l4[4..6].copy_from_slice(&len.to_be_bytes());
    }
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let c = ip_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&RX_MAC);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0x25, 0x02]);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&l4);
    f.resize(60, 0);
    f
}

/// Busy time of `cpu` so far (user, nice, system, irq, softirq, steal), in ns.
pub fn cpu_busy_ns(cpu: usize) -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let name = format!("cpu{cpu} ");
    let line = stat
        .lines()
        .find(|l| l.starts_with(&name))
        .expect("cpu line");
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy = f[0] + f[1] + f[2] + f[5] + f[6] + f[7];
    // USER_HZ is 100 on every Linux the project supports (the clock tick is not exposed
    // otherwise); sysconf says which.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    busy * 1_000_000_000 / hz
}

/// Frames the veth `dev` in namespace `ns` took off its receive rings.
pub fn rx_packets(ns: &str, dev: &str) -> u64 {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ethtool", "-S", dev])
        .output()
        .expect("ethtool");
    assert!(out.status.success(), "ethtool -S {dev}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (k, v) = l.trim().split_once(": ")?;
            (k.starts_with("rx_queue_") && k.ends_with("_xdp_packets"))
                .then(|| v.parse::<u64>().ok())?
        })
        .sum()
}

/// The threaded NAPI kthreads of `dev` (named `napi/<dev>-<id>`).
pub fn napi_threads(dev: &str) -> Vec<i32> {
    let want = format!("napi/{dev}-");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|p| {
            let pid = p.file_name().to_string_lossy().parse::<i32>().ok()?;
            let comm = std::fs::read_to_string(p.path().join("comm")).ok()?;
            comm.trim_end().starts_with(&want).then_some(pid)
        })
        .collect()
}

/// Pins `dev`'s NAPI threads to `cpu`; their pids.
pub fn pin_napi(dev: &str, cpu: usize) -> Vec<i32> {
    let pids = napi_threads(dev);
    assert!(!pids.is_empty(), "no NAPI thread for {dev}");
    for &pid in &pids {
        let mut set = nix::sched::CpuSet::new();
        set.set(cpu).unwrap();
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(pid), &set)
            .expect("pin the NAPI thread");
    }
    pids
}

/// CPU time a thread has run, in ns (the scheduler's own sum, `/proc/PID/schedstat`).
pub fn thread_runtime_ns(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The calling thread onto `cpu`.
pub fn pin_self(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).expect("pin thread");
}

/// One measured run.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    /// The receiver's NAPI thread time per frame it took in.
    pub ns_per_packet: f64,
    /// CPU 1's busy time per frame (the receiver's CPU: the NAPI thread and anything else
    /// that ran there, such as interrupts).
    pub cpu_ns_per_packet: f64,
    pub packets: u64,
    pub sent: u64,
}

/// Sends `chunks` ((sender index, frame, count)) in turn, over and over for `secs`, from a
/// thread in namespace `gen_ns` on CPU 0, into the veth `dev` in `rx_ns`, whose NAPI runs on
/// CPU 1.
pub fn run(
    gen_ns: &str,
    senders: std::sync::Arc<Vec<OwnedFd>>,
    chunks: &[(usize, Vec<u8>, u32)],
    rx_ns: &str,
    dev: &str,
    secs: f64,
) -> Run {
    let napi = pin_napi(dev, 1);
    let rx_before = rx_packets(rx_ns, dev);
    let busy_before = cpu_busy_ns(1);
    let thread_before: u64 = napi.iter().map(|&p| thread_runtime_ns(p)).sum();
    let chunks = chunks.to_vec();
    let sent = crate::lab::in_ns(gen_ns, move || {
        pin_self(0);
        let t = Instant::now();
        let mut sent = 0u64;
        while t.elapsed() < Duration::from_secs_f64(secs) {
            for (s, f, n) in &chunks {
                send(&senders[*s], f, *n).expect("live frames test run");
                sent += *n as u64;
            }
        }
        sent
    });
    // Let the receiver drain its ring.
    std::thread::sleep(Duration::from_millis(50));
    let thread = napi.iter().map(|&p| thread_runtime_ns(p)).sum::<u64>() - thread_before;
    let busy = cpu_busy_ns(1) - busy_before;
    let packets = rx_packets(rx_ns, dev) - rx_before;
    Run {
        ns_per_packet: thread as f64 / packets.max(1) as f64,
        cpu_ns_per_packet: busy as f64 / packets.max(1) as f64,
        packets,
        sent,
    }
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A figure of the flood arm, for the bench's goal table.
pub struct Figure {
    pub what: String,
    pub figure: String,
    pub goal: String,
    pub ok: bool,
}

/// What each receiving veth runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Arm {
    /// No program: the stack forwards (or drops) what arrives.
    None,
    /// A program that only returns XDP_DROP (two instructions, nothing of port25's).
    BareDrop,
    /// nftables: a netdev ingress chain, the same policy and the same exempt set.
    Nft,
    /// port25: its real daemon and config, native XDP.
    Port25,
}

const ARMS: [Arm; 4] = [Arm::None, Arm::BareDrop, Arm::Nft, Arm::Port25];

/// The live flood and the live mix (issue 9): `ctl` is the controller binary; `exempts` the
/// size of the exempt set (1M in the full bench).
pub fn bench(ctl: &std::path::Path, exempts: u32, rounds: usize, secs: f64) -> Vec<Figure> {
    crate::ensure_bpffs();
    let id = crate::unique("");
    let (gen_ns, rx_ns) = (format!("p25fg{id}"), format!("p25fr{id}"));
    let dir = std::env::temp_dir().join(format!("port25-flood-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    for ns in [&gen_ns, &rx_ns] {
        sh(&["ip", "netns", "add", ns]);
    }
    let mut cleanup = Cleanup {
        netns: vec![gen_ns.clone(), rx_ns.clone()],
        pins: vec![
            format!("/sys/fs/bpf/p25fl{id}"),
            format!("/sys/fs/bpf/p25flbare{id}"),
        ],
        daemon: None,
        dir: dir.clone(),
    };
    sh(&[
        "ip",
        "netns",
        "exec",
        &rx_ns,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.default.rp_filter=0",
    ]);
    // Forwarded traffic leaves through a veth to a sink that drops it in XDP, its NAPI on
    // the sender's CPU: the receiver pays the forwarding and the transmit, no far side.
    let sink_dev = format!("fo{id}");
    sh(&[
        "ip", "-n", &rx_ns, "link", "add", "o0", "type", "veth", "peer", "name", &sink_dev,
        "netns", &gen_ns,
    ]);
    for cmd in [
        "link set lo up",
        "link set o0 up",
        "addr add 192.0.2.1/24 dev o0",
        "neigh add 192.0.2.2 lladdr 02:00:00:00:25:03 dev o0 nud permanent",
        "route add 203.0.113.0/24 via 192.0.2.2",
        "route add 198.51.100.0/24 via 192.0.2.2",
    ] {
        let mut a = vec!["ip", "-n", &rx_ns];
        a.extend(cmd.split(' '));
        sh(&a);
    }
    let sink = crate::bare::load(XDP, 1).expect("bare XDP_DROP");
    let sink_pin = format!("/sys/fs/bpf/p25flsink{id}");
    pin(&sink, &sink_pin).expect("pin sink");
    cleanup.pins.push(sink_pin.clone());
    sh(&[
        "ip",
        "-n",
        &gen_ns,
        "link",
        "set",
        &sink_dev,
        "address",
        "02:00:00:00:25:03",
    ]);
    sh(&["ip", "-n", &gen_ns, "link", "set", &sink_dev, "up"]);
    // nsenter, not `ip -n`: that one mounts its own /sys, without the bpffs the pin is on.
    let net = |ns: &str| format!("--net=/run/netns/{ns}");
    sh(&[
        "nsenter",
        &net(&gen_ns),
        "ip",
        "link",
        "set",
        &sink_dev,
        "xdpdrv",
        "pinned",
        &sink_pin,
    ]);
    sh(&[
        "ip",
        "netns",
        "exec",
        &gen_ns,
        "sh",
        "-c",
        &format!("echo 1 > /sys/class/net/{sink_dev}/threaded"),
    ]);
    let mac = RX_MAC
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let devs: Vec<String> = (0..ARMS.len()).map(|i| format!("fl{i}{id}")).collect();
    for (i, dev) in devs.iter().enumerate() {
        let g = format!("g{i}");
        sh(&[
            "ip", "-n", &gen_ns, "link", "add", &g, "type", "veth", "peer", "name", dev, "netns",
            &rx_ns,
        ]);
        sh(&["ip", "-n", &rx_ns, "link", "set", dev, "address", &mac]);
        sh(&["ip", "-n", &gen_ns, "link", "set", &g, "up"]);
        sh(&["ip", "-n", &rx_ns, "link", "set", dev, "up"]);
        // NAPI on a veth without a program needs GRO asked for; threaded, it can be pinned.
        sh(&[
            "ip", "netns", "exec", &rx_ns, "ethtool", "-K", dev, "gro", "on",
        ]);
        sh(&[
            "ip",
            "netns",
            "exec",
            &rx_ns,
            "sh",
            "-c",
            &format!("echo 1 > /sys/class/net/{dev}/threaded"),
        ]);
    }
    let dev_of = |arm: Arm| devs[ARMS.iter().position(|a| *a == arm).unwrap()].clone();

    // The exempt set: 100.64.0.1 upwards; the flood's sources (100.80.x.x) are not in it.
    let exempt: Vec<String> = (0..exempts)
        .map(|i| std::net::Ipv4Addr::from((100u32 << 24 | 64 << 16) + i + 1).to_string())
        .collect();

    // Bare XDP_DROP.
    let bare = crate::bare::load(XDP, 1).expect("bare XDP_DROP");
    let bare_pin = format!("/sys/fs/bpf/p25flbare{id}");
    pin(&bare, &bare_pin).expect("pin bare");
    sh(&[
        "nsenter",
        &net(&rx_ns),
        "ip",
        "link",
        "set",
        &dev_of(Arm::BareDrop),
        "xdpdrv",
        "pinned",
        &bare_pin,
    ]);

    // nftables: what an operator would write for the same policy, the set loaded from a file.
    let nft = dir.join("flood.nft");
    let t = Instant::now();
    std::fs::write(
        &nft,
        format!(
            "table netdev p25flood {{\n  set exempt {{ type ipv4_addr; size {}; elements = {{ {} }} }}\n  \
             chain in {{ type filter hook ingress device \"{}\" priority 0; policy accept;\n    \
             tcp dport 25 ip saddr 100.64.0.0/10 ip daddr != 198.51.100.25 ip saddr != @exempt counter drop\n  }}\n}}\n",
            exempts.max(1) + 1024,
            if exempt.is_empty() { "100.63.255.255".to_string() } else { exempt.join(", ") },
            dev_of(Arm::Nft)
        ),
    )
    .unwrap();
    sh(&[
        "ip",
        "netns",
        "exec",
        &rx_ns,
        "nft",
        "-f",
        nft.to_str().unwrap(),
    ]);
    let nft_load = t.elapsed();

    // port25: the real daemon, its config holding the same exempt set.
    let cfg = dir.join("port25.yaml");
    let t = Instant::now();
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&cfg).unwrap());
        writeln!(
            f,
            "interfaces:\n  - name: {}\n    hook: xdp\nsubscriber_ranges: [100.64.0.0/10]\n\
             mail_servers: [198.51.100.25/32]\nstate_dir: {}\nsocket: {}\npin_dir: /sys/fs/bpf/p25fl{id}\n\
             metrics_listen: off\nexempt:",
            dev_of(Arm::Port25),
            dir.display(),
            dir.join("ctl.sock").display()
        )
        .unwrap();
        if exempt.is_empty() {
            writeln!(f, "  []").unwrap();
        }
        for a in &exempt {
            writeln!(f, "  - prefix: {a}/32").unwrap();
        }
    }
    let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
    let child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{rx_ns}"))
        .arg(ctl)
        .arg("--config")
        .arg(&cfg)
        .arg("daemon")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn daemon");
    cleanup.daemon = Some(child);
    let client =
        port25_ctl::control::proto::Client::new(dir.join("ctl.sock"), Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(120);
    while client.call(port25_ctl::control::proto::Info).is_err() {
        assert!(
            Instant::now() < deadline,
            "port25 daemon did not come up: {}",
            std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let p25_start = t.elapsed();
    println!(
        "live flood ({exempts} exempt addresses; nft set loaded in {nft_load:.1?}, port25 daemon \
         written, started and enforcing in {p25_start:.1?}):"
    );

    // One sender per receiver: it redirects into the veth whose peer is that receiver.
    let senders: Vec<OwnedFd> = (0..ARMS.len())
        .map(|i| {
            let ifindex = crate::lab::in_ns(&gen_ns, move || {
                nix::net::if_::if_nametoindex(format!("g{i}").as_str()).unwrap()
            });
            sender(ifindex).expect("sender")
        })
        .collect();
    let senders = std::sync::Arc::new(senders);
    // The sink's NAPI work stays off the receiver's CPU.
    for pid in napi_threads(&sink_dev) {
        let mut set = nix::sched::CpuSet::new();
        set.set(0).unwrap();
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(pid), &set);
    }
    let syn25 = frame([100, 80, 0, 1], [203, 0, 113, 80], 6, 25, 0x02);
    let tcp443 = frame([100, 80, 0, 1], [203, 0, 113, 80], 6, 443, 0x10);
    let udp443 = frame([100, 80, 0, 1], [203, 0, 113, 80], 17, 443, 0);
    // Frames per test run: each run sets up and tears down a page pool, whose teardown
    // waits for an RCU grace period (milliseconds): with small runs that wait, not the
    // sending, set the rate (2,048 frames a run sent ~85,000 a second).
    const CHUNK: u32 = 1 << 17;
    let flood = |i: usize| vec![(i, syn25.clone(), CHUNK)];
    // 95% forwarded (TCP and UDP to 443), 5% SYNs to 25: 19 chunks to one.
    let mix = |i: usize| {
        let mut c = Vec::new();
        for k in 0..19 {
            c.push((
                i,
                if k % 2 == 0 {
                    tcp443.clone()
                } else {
                    udp443.clone()
                },
                CHUNK,
            ));
        }
        c.push((i, syn25.clone(), CHUNK));
        c
    };

    // Interleaved rounds: every arm once per round; the median of the rounds.
    // port25 again with its offender tracking off (the default config tracks): what the
    // tracking of 65,535 sources costs.
    let config = port25_ctl::config::Config::load(&cfg).expect("the flood's config");
    let mut live = port25_ctl::bpf::livemaps::LiveMaps::open(&port25_ctl::bpf::pins::Pins::new(
        &config.pin_dir,
    ))
    .expect("port25's pinned maps");
    let untracked = port25_ctl::config::Abuse {
        track_sources: 0,
        ..config.abuse.clone()
    };
    let mut off_runs = Vec::new();
    let mut flood_runs: Vec<Vec<Run>> = vec![Vec::new(); ARMS.len()];
    let mut mix_runs: Vec<Vec<Run>> = vec![Vec::new(); ARMS.len()];
    // PORT25_BENCH_PERF=PREFIX: `perf record -g` of the receiver's CPU during port25's first
    // flood run, tracking on (PREFIX.on) and off (PREFIX.off).
    let perf_prefix = std::env::var("PORT25_BENCH_PERF").ok();
    for round in 0..rounds {
        let perf = |tag: &str| {
            perf_prefix
                .as_ref()
                .filter(|_| round == 0)
                .map(|p| Perf::start(&format!("{p}.{tag}")))
        };
        for (i, dev) in devs.iter().enumerate() {
            let on = (ARMS[i] == Arm::Port25).then(|| perf("on")).flatten();
            flood_runs[i].push(run(&gen_ns, senders.clone(), &flood(i), &rx_ns, dev, secs));
            drop(on);
            if ARMS[i] == Arm::Port25 {
                use port25_ctl::bpf::offenders::write_settings;
                write_settings(&mut live, &untracked).unwrap();
                let off = perf("off");
                off_runs.push(run(&gen_ns, senders.clone(), &flood(i), &rx_ns, dev, secs));
                drop(off);
                write_settings(&mut live, &config.abuse).unwrap();
            }
        }
        for (i, dev) in devs.iter().enumerate() {
            if matches!(ARMS[i], Arm::None | Arm::Port25 | Arm::Nft) {
                mix_runs[i].push(run(&gen_ns, senders.clone(), &mix(i), &rx_ns, dev, secs));
            }
        }
    }
    let median = |runs: &[Run]| -> Run {
        let mut v = runs.to_vec();
        v.sort_by(|a, b| a.ns_per_packet.total_cmp(&b.ns_per_packet));
        v[v.len() / 2]
    };
    let label = |a: Arm| match a {
        Arm::None => "no program (the stack forwards)",
        Arm::BareDrop => "bare XDP_DROP",
        Arm::Nft => "nftables netdev ingress, same set",
        Arm::Port25 => "port25 daemon, native XDP",
    };
    let mut fl = [0f64; 4];
    println!("  SYNs to 25 from 65,535 sources, receiver ns per packet (median of {rounds}; NAPI thread / whole CPU):");
    for (i, arm) in ARMS.iter().enumerate() {
        let m = median(&flood_runs[i]);
        fl[i] = m.ns_per_packet;
        println!(
            "    {:<40} {:>7.0} ns  (CPU {:>5.0} ns; {} received of {} sent)",
            label(*arm),
            m.ns_per_packet,
            m.cpu_ns_per_packet,
            m.packets,
            m.sent
        );
    }
    let off = median(&off_runs);
    println!(
        "    {:<40} {:>7.0} ns  (CPU {:>5.0} ns; {} received of {} sent)",
        "port25, offender tracking off",
        off.ns_per_packet,
        off.cpu_ns_per_packet,
        off.packets,
        off.sent
    );
    let mut mx = [0f64; 4];
    println!("  mix: 95% TCP and UDP to 443 forwarded, 5% SYNs to 25:");
    for (i, arm) in ARMS.iter().enumerate() {
        if mix_runs[i].is_empty() {
            continue;
        }
        let m = median(&mix_runs[i]);
        mx[i] = m.ns_per_packet;
        println!(
            "    {:<40} {:>7.0} ns  (CPU {:>5.0} ns; {} received of {} sent)",
            label(*arm),
            m.ns_per_packet,
            m.cpu_ns_per_packet,
            m.packets,
            m.sent
        );
    }
    let p25 = ARMS.iter().position(|a| *a == Arm::Port25).unwrap();
    let nft_i = ARMS.iter().position(|a| *a == Arm::Nft).unwrap();
    let bare_i = ARMS.iter().position(|a| *a == Arm::BareDrop).unwrap();
    let none_i = ARMS.iter().position(|a| *a == Arm::None).unwrap();
    let out = vec![
        Figure {
            what: format!(
                "live flood, port25 / nftables, ns per blocked packet ({exempts} exempt)"
            ),
            figure: format!("x{:.2}", fl[p25] / fl[nft_i]),
            goal: "<= x0.33".into(),
            ok: fl[p25] / fl[nft_i] <= 0.33,
        },
        Figure {
            what: "live flood, port25 / bare XDP_DROP, ns per blocked packet".into(),
            figure: format!("x{:.2}", fl[p25] / fl[bare_i]),
            goal: "report".into(),
            ok: true,
        },
        Figure {
            what: "live mix (95% forwarded), port25 / no program, ns per packet".into(),
            figure: format!("x{:.2}", mx[p25] / mx[none_i]),
            goal: "<= x1.10".into(),
            ok: mx[p25] / mx[none_i] <= 1.10,
        },
    ];
    drop(cleanup);
    out
}

/// `perf record` of the receiver's CPU (1), from `start` to drop.
struct Perf(std::process::Child);

impl Perf {
    fn start(out: &str) -> Perf {
        let c = Command::new("perf")
            .args(["record", "-a", "-C", "1", "-g", "-F", "4999", "-o", out])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("perf (PORT25_BENCH_PERF)");
        std::thread::sleep(Duration::from_millis(300));
        Perf(c)
    }
}

impl Drop for Perf {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let _ = self.0.wait();
    }
}

/// Tears the flood's lab down however the bench ends.
struct Cleanup {
    netns: Vec<String>,
    pins: Vec<String>,
    daemon: Option<std::process::Child>,
    dir: std::path::PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        for ns in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        for p in &self.pins {
            let _ = std::fs::remove_dir_all(p).or_else(|_| std::fs::remove_file(p));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
