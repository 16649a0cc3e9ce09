//! Counts TCP SYNs on a wire, by destination port: "no SYN to port 25 arrived" is then an
//! observation on the far side of the router, not an inference from a failed connect.

use std::{
    collections::HashMap,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
};

pub struct Sniffer {
    stop: Arc<AtomicBool>,
    syns: Arc<Mutex<HashMap<u16, u32>>>,
    thread: Option<JoinHandle<()>>,
}

/// Destination port of a TCP SYN (without ACK) in an Ethernet frame, IPv4 or IPv6 without
/// extension headers (the lab sends none).
fn syn_port(f: &[u8]) -> Option<u16> {
    let et = u16::from_be_bytes(f.get(12..14)?.try_into().ok()?);
    let tcp = match et {
        0x0800 if *f.get(23)? == 6 => 14 + ((f[14] & 0x0f) as usize) * 4,
        0x86dd if *f.get(20)? == 6 => 14 + 40,
        _ => return None,
    };
    let flags = *f.get(tcp + 13)?;
    (flags & 0x12 == 0x02).then(|| u16::from_be_bytes([f[tcp + 2], f[tcp + 3]]))
}

impl Sniffer {
    /// Starts counting on `dev` in network namespace `ns`.
    pub fn start(ns: &str, dev: &str) -> Sniffer {
        let dev = dev.to_string();
        let fd = crate::lab::in_ns(ns, move || {
            // SAFETY: plain socket(2); the result is checked before use.
            let raw = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    (libc::ETH_P_ALL as u16).to_be() as i32,
                )
            };
            assert!(
                raw >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: raw is a fresh, owned descriptor.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let ifindex = nix::net::if_::if_nametoindex(dev.as_str()).expect("sniff device");
            // SAFETY: sockaddr_ll is plain data; zeroed is a valid start.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            sll.sll_ifindex = ifindex as i32;
            // SAFETY: sll is a valid sockaddr_ll of the size passed.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    &sll as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(rc, 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            // SAFETY: tv is a valid timeval.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &tv as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            };
            fd
        });
        let stop = Arc::new(AtomicBool::new(false));
        let syns = Arc::new(Mutex::new(HashMap::new()));
        let (s, c) = (stop.clone(), syns.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                // SAFETY: buf is valid for its length.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n <= 0 {
                    continue;
                }
                if let Some(port) = syn_port(&buf[..n as usize]) {
                    *c.lock().unwrap().entry(port).or_default() += 1;
                }
            }
        });
        Sniffer {
            stop,
            syns,
            thread: Some(thread),
        }
    }

    pub fn syns(&self, port: u16) -> u32 {
        *self.syns.lock().unwrap().get(&port).unwrap_or(&0)
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
