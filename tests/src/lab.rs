//! A three-namespace lab: subscriber <-> router (the real daemon) <-> internet, where the
//! internet has the ISP's mail server and an external MX, each listening on 25, 587, 465, 2525.

use std::{
    collections::HashMap,
    fs::File,
    net::{IpAddr, SocketAddr, TcpListener},
    os::fd::AsFd,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use port25_ctl::control::proto;
use socket2::{Domain, Socket, Type};

pub const PORTS: [u16; 4] = [25, 587, 465, 2525];

pub struct Addrs {
    pub sub: IpAddr,
    pub exempt: IpAddr,
    pub mail: IpAddr,
    pub ext: IpAddr,
}

pub fn v4() -> Addrs {
    Addrs {
        sub: "100.64.0.2".parse().unwrap(),
        exempt: "100.64.0.3".parse().unwrap(),
        mail: "198.51.100.25".parse().unwrap(),
        ext: "203.0.113.80".parse().unwrap(),
    }
}

pub fn v6() -> Addrs {
    Addrs {
        sub: "2001:db8:100::2".parse().unwrap(),
        exempt: "2001:db8:100::3".parse().unwrap(),
        mail: "2001:db8:25::25".parse().unwrap(),
        ext: "2001:db8:ff::80".parse().unwrap(),
    }
}

/// The policy part of the lab's config; `interfaces` and paths are added by [`Lab::config`].
pub const POLICY: &str = r#"blocked_ports: [25]
subscriber_ranges: [100.64.0.0/10, "2001:db8:100::/40"]
mail_servers: [198.51.100.25/32, "2001:db8:25::/64"]
"#;

pub struct Lab {
    pub sub: String,
    pub rtr: String,
    pub net: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub pin_dir: PathBuf,
    pub socket: PathBuf,
    pub interfaces: String,
    daemon: Option<Child>,
    /// Accepted connections per (server address, port).
    pub accepted: Arc<Mutex<HashMap<(IpAddr, u16), u32>>>,
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

pub fn ctl_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("PORT25_CTL") {
        return p.into();
    }
    // Next to the test binary's target dir: target/<profile>/deps/<test> -> target/<profile>/port25-ctl
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("port25-ctl")
}

/// Runs `f` on a thread inside network namespace `ns`.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).expect("netns");
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .unwrap()
}

impl Lab {
    /// `interfaces` is the YAML list for the router's subscriber side (device `rs`).
    pub fn new(interfaces: &str) -> Lab {
        crate::ensure_bpffs();
        let id = crate::unique("");
        let (sub, rtr, net) = (
            format!("p25s{id}"),
            format!("p25r{id}"),
            format!("p25n{id}"),
        );
        for ns in [&sub, &rtr, &net] {
            sh(&["ip", "netns", "add", ns]);
            // Link-local DAD would hold neighbour discovery for a second or two.
            sh(&[
                "ip",
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                "net.ipv6.conf.default.accept_dad=0",
                "net.ipv6.conf.all.accept_dad=0",
            ]);
        }
        sh(&[
            "ip", "-n", &sub, "link", "add", "name", "s0", "type", "veth", "peer", "name", "rs",
            "netns", &rtr,
        ]);
        sh(&[
            "ip", "-n", &rtr, "link", "add", "name", "ru", "type", "veth", "peer", "name", "n0",
            "netns", &net,
        ]);
        let script = [
            (&sub, "addr add 100.64.0.2/24 dev s0"),
            (&sub, "addr add 100.64.0.3/24 dev s0"),
            (&sub, "addr add 2001:db8:100::2/64 dev s0 nodad"),
            (&sub, "addr add 2001:db8:100::3/64 dev s0 nodad"),
            // Delegated prefixes (DHCPv6-PD /56s) of two subscribers, one address in each.
            (&sub, "addr add 2001:db8:1a0:5::7/128 dev s0 nodad"),
            (&sub, "addr add 2001:db8:1a1:5::9/128 dev s0 nodad"),
            (&sub, "link set s0 up"),
            (&sub, "link set lo up"),
            (&sub, "route add default via 100.64.0.1"),
            (&sub, "-6 route add default via 2001:db8:100::1"),
            (&rtr, "addr add 100.64.0.1/24 dev rs"),
            (&rtr, "addr add 2001:db8:100::1/64 dev rs nodad"),
            (&rtr, "addr add 192.0.2.1/24 dev ru"),
            (&rtr, "addr add 2001:db8:ffff::1/64 dev ru nodad"),
            (&rtr, "link set rs up"),
            (&rtr, "link set ru up"),
            (&rtr, "link set lo up"),
            (&rtr, "-6 route add 2001:db8:1a0::/56 via 2001:db8:100::2"),
            (&rtr, "-6 route add 2001:db8:1a1::/56 via 2001:db8:100::2"),
            (&rtr, "route add 198.51.100.25/32 via 192.0.2.2"),
            (&rtr, "route add 203.0.113.80/32 via 192.0.2.2"),
            (
                &rtr,
                "-6 route add 2001:db8:25::25/128 via 2001:db8:ffff::2",
            ),
            (
                &rtr,
                "-6 route add 2001:db8:ff::80/128 via 2001:db8:ffff::2",
            ),
            (&net, "addr add 192.0.2.2/24 dev n0"),
            (&net, "addr add 2001:db8:ffff::2/64 dev n0 nodad"),
            (&net, "addr add 198.51.100.25/32 dev lo"),
            (&net, "addr add 203.0.113.80/32 dev lo"),
            (&net, "addr add 2001:db8:25::25/128 dev lo"),
            (&net, "addr add 2001:db8:ff::80/128 dev lo"),
            (&net, "link set n0 up"),
            (&net, "link set lo up"),
            (&net, "route add 100.64.0.0/24 via 192.0.2.1"),
            (&net, "-6 route add 2001:db8:100::/64 via 2001:db8:ffff::1"),
            (&net, "-6 route add 2001:db8:1a0::/47 via 2001:db8:ffff::1"),
        ];
        for (ns, cmd) in script {
            let mut args = vec!["ip", "-n", ns.as_str()];
            args.extend(cmd.split(' '));
            sh(&args);
        }
        // veth runs native XDP only on its NAPI path, which TSO-capable local TCP skips unless
        // the receiver forwards GRO: without this, native XDP on `rs` would not see every frame
        // (a veth artefact; a real NIC's driver hook sees all of them).
        sh(&[
            "ip", "netns", "exec", &sub, "ethtool", "-K", "s0", "tso", "off", "gso", "off",
        ]);
        sh(&[
            "ip",
            "netns",
            "exec",
            &rtr,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
        ]);
        let dir = std::env::temp_dir().join(format!("port25-lab-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let lab = Lab {
            config: dir.join("port25.yaml"),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/p25lab{id}")),
            socket: dir.join("ctl.sock"),
            dir,
            sub,
            rtr,
            net,
            interfaces: interfaces.to_string(),
            daemon: None,
            accepted: Arc::default(),
        };
        lab.listen();
        lab.write_config("");
        lab
    }

    /// Writes the config: the lab policy, `extra` YAML, the interfaces and the lab's paths.
    pub fn write_config(&self, extra: &str) {
        self.write_config_policy(POLICY, extra);
    }

    /// As [`Lab::write_config`] with another policy than [`POLICY`].
    pub fn write_config_policy(&self, policy: &str, extra: &str) {
        let text = format!(
            "interfaces:\n{}\n{policy}{extra}\nstate_dir: {}\nsocket: {}\npin_dir: {}\n",
            self.interfaces,
            self.dir.display(),
            self.socket.display(),
            self.pin_dir.display()
        );
        std::fs::write(&self.config, text).unwrap();
    }

    fn listen(&self) {
        for port in PORTS {
            let accepted = self.accepted.clone();
            let listener = in_ns(&self.net, move || {
                let s = Socket::new(Domain::IPV6, Type::STREAM, None).unwrap();
                s.set_only_v6(false).unwrap();
                s.set_reuse_address(true).unwrap();
                s.bind(&SocketAddr::from(([0u16; 8], port)).into()).unwrap();
                s.listen(128).unwrap();
                TcpListener::from(s)
            });
            std::thread::spawn(move || {
                for conn in listener.incoming().flatten() {
                    let local = conn.local_addr().unwrap();
                    let ip = match local.ip() {
                        IpAddr::V6(v6) => v6
                            .to_ipv4_mapped()
                            .map(IpAddr::V4)
                            .unwrap_or(IpAddr::V6(v6)),
                        v4 => v4,
                    };
                    *accepted.lock().unwrap().entry((ip, port)).or_default() += 1;
                }
            });
        }
    }

    /// A real TCP connect from `src` (in the subscriber namespace).
    pub fn connect(&self, src: IpAddr, dst: IpAddr, port: u16, timeout: Duration) -> bool {
        in_ns(&self.sub, move || {
            let domain = if src.is_ipv4() {
                Domain::IPV4
            } else {
                Domain::IPV6
            };
            let s = Socket::new(domain, Type::STREAM, None).unwrap();
            s.bind(&SocketAddr::new(src, 0).into()).unwrap();
            s.connect_timeout(&SocketAddr::new(dst, port).into(), timeout)
                .is_ok()
        })
    }

    /// A real TCP connect from `src`, with how it ended.
    pub fn connect_result(
        &self,
        src: IpAddr,
        dst: IpAddr,
        port: u16,
        timeout: Duration,
    ) -> std::io::Result<()> {
        in_ns(&self.sub, move || {
            let domain = if src.is_ipv4() {
                Domain::IPV4
            } else {
                Domain::IPV6
            };
            let s = Socket::new(domain, Type::STREAM, None)?;
            s.bind(&SocketAddr::new(src, 0).into())?;
            s.connect_timeout(&SocketAddr::new(dst, port).into(), timeout)
        })
    }

    pub fn can_connect(&self, src: IpAddr, dst: IpAddr, port: u16) -> bool {
        self.connect(src, dst, port, Duration::from_millis(1500))
    }

    /// The control socket's client, from the test's side (no CLI in between).
    pub fn client(&self) -> proto::Client {
        proto::Client::new(&self.socket, Duration::from_secs(10) * crate::patience())
    }

    /// Runs a client verb with `--json` and decodes its reply as the CLI's contract says
    /// (`port25_ctl::control::reply`); panics when the verb fails.
    pub fn reply<R: serde::de::DeserializeOwned>(&self, args: &[&str]) -> R {
        let o = self.ctl(&[&["--json"], args].concat());
        assert!(
            o.status.success(),
            "port25-ctl {args:?} should succeed: {}",
            crate::text(&o)
        );
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
            panic!(
                "port25-ctl {args:?}: not its reply ({e}): {}",
                crate::text(&o)
            )
        })
    }

    /// Runs a verb that must fail with exit `code` (1: refused or failed, 2: usage, clap's)
    /// and returns its stderr. The daemon's error kind is checked over the socket
    /// ([`Lab::client`]), where it is.
    pub fn fails_with(&self, args: &[&str], code: i32) -> String {
        let o = self.ctl(args);
        assert_eq!(
            o.status.code(),
            Some(code),
            "port25-ctl {args:?} should exit {code}: {}",
            crate::text(&o)
        );
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.rtr))
            .arg(ctl_binary())
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .expect("spawn port25-ctl")
    }

    /// Starts the real daemon in the router's network namespace (its mounts stay the host's,
    /// so its pins outlive it) and waits until it answers, which it does only once enforcing.
    pub fn start_daemon(&mut self) {
        if let Err(e) = self.try_start_daemon() {
            panic!("{e}");
        }
    }

    /// As [`Lab::start_daemon`]; Err(log) when the daemon exits instead of answering.
    pub fn try_start_daemon(&mut self) -> Result<(), String> {
        self.try_start_daemon_env(&[])
    }

    /// As [`Lab::try_start_daemon`], with extra environment for the daemon.
    pub fn try_start_daemon_env(&mut self, env: &[(&str, &str)]) -> Result<(), String> {
        self.try_start_daemon_args(&["daemon"], env)
    }

    /// As [`Lab::try_start_daemon_env`], with the daemon's arguments (`daemon --attach`).
    pub fn try_start_daemon_args(
        &mut self,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.rtr))
            .arg(ctl_binary())
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn daemon");
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20) * crate::patience();
        while Instant::now() < deadline {
            // An answer, not a connect: the daemon binds its socket only once it enforces.
            match self.client().call(proto::Info) {
                Ok(_) => return Ok(()),
                Err(e @ proto::Error::Daemon { .. }) => panic!("daemon info: {e}"),
                Err(_) => {}
            }
            if let Some(Ok(Some(st))) = self.daemon.as_mut().map(|c| c.try_wait()) {
                self.daemon = None;
                return Err(format!("daemon exited with {st}: {}", self.daemon_log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("daemon did not come up: {}", self.daemon_log()))
    }

    /// Sends SYNs from `src` to each of `ports` on `dst`, round after round, until `stop`;
    /// returns the number of rounds. Each connect is abandoned right after its SYN leaves.
    pub fn syn_probe(
        &self,
        src: IpAddr,
        dst: IpAddr,
        ports: &'static [u16],
        stop: Arc<std::sync::atomic::AtomicBool>,
    ) -> std::thread::JoinHandle<u32> {
        self.syn_probe_counted(src, dst, ports, stop, Arc::default())
    }

    /// As [`Lab::syn_probe`], counting the rounds done so far in `done` (a test waits for
    /// rounds sent, not for a time that a slow VM may not fill).
    pub fn syn_probe_counted(
        &self,
        src: IpAddr,
        dst: IpAddr,
        ports: &'static [u16],
        stop: Arc<std::sync::atomic::AtomicBool>,
        done: Arc<std::sync::atomic::AtomicU32>,
    ) -> std::thread::JoinHandle<u32> {
        let path = format!("/run/netns/{}", self.sub);
        std::thread::spawn(move || {
            let file = File::open(&path).expect("netns");
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let domain = if src.is_ipv4() {
                Domain::IPV4
            } else {
                Domain::IPV6
            };
            let mut rounds = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for &port in ports {
                    let s = Socket::new(domain, Type::STREAM, None).unwrap();
                    s.bind(&SocketAddr::new(src, 0).into()).unwrap();
                    s.set_nonblocking(true).unwrap();
                    let _ = s.connect(&SocketAddr::new(dst, port).into());
                }
                rounds += 1;
                done.store(rounds, std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
            rounds
        })
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Starts the daemon while SYNs from the subscriber (v4 and v6) go to the external MX on
    /// 25 and, as a control, 587; returns the SYNs seen per port on the internet side.
    pub fn start_daemon_under_syn_stream(&mut self) -> (u32, u32) {
        use std::sync::atomic::{AtomicBool, Ordering};
        let sniff = crate::sniff::Sniffer::start(&self.net, "n0");
        let stop = Arc::new(AtomicBool::new(false));
        let probes = [
            self.syn_probe(v4().sub, v4().ext, &[25, 587], stop.clone()),
            self.syn_probe(v6().sub, v6().ext, &[25, 587], stop.clone()),
        ];
        std::thread::sleep(Duration::from_millis(200));
        self.start_daemon();
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        let rounds: u32 = probes.into_iter().map(|p| p.join().unwrap()).sum();
        std::thread::sleep(Duration::from_millis(100));
        assert!(rounds > 10, "the probe ran ({rounds} rounds)");
        (sniff.syns(25), sniff.syns(587))
    }

    /// The running daemon's pid (nsenter execs it), e.g. for `perf record -p`.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(|c| c.id())
    }

    pub fn signal_daemon(&self, sig: nix::sys::signal::Signal) {
        let pid = self.daemon.as_ref().expect("daemon running").id();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            c.kill().unwrap(); // SIGKILL
            c.wait().unwrap();
        }
    }

    pub fn wait_daemon_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(c) = self.daemon.as_mut() {
                if c.try_wait().unwrap().is_some() {
                    self.daemon = None;
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub fn accepted(&self, ip: IpAddr, port: u16) -> u32 {
        *self.accepted.lock().unwrap().get(&(ip, port)).unwrap_or(&0)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.kill9();
        // In the router's namespace: a netlink filter is deleted by its ifindex there.
        let pins = port25_ctl::bpf::pins::Pins::new(&self.pin_dir);
        let _ = in_ns(&self.rtr, move || {
            port25_ctl::bpf::datapath::detach_all(&pins).ok()
        });
        for ns in [&self.sub, &self.rtr, &self.net] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
