//! Frames whose headers lie partly or wholly outside the skb's linear part, through a real
//! veth into TC ingress: the datapath reads the linear part directly and asks
//! bpf_skb_load_bytes past it, and the verdict must not depend on where the line falls.
//!
//! An AF_PACKET frame of a page or more with a virtio-net header is built with exactly
//! `hdr_len` bytes in the skb's head and the rest in page fragments (`packet_snd`), and veth
//! hands the skb on as it is; so each `hdr_len` below puts the line at another byte of the
//! Ethernet, IP or TCP header.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use port25_tests::{frame::Frame, lab::Lab, require_root};

const TC: &str = "  - name: rs\n    hook: tc\n    direction: ingress";
/// Past a page: `packet_snd` keeps only `hdr_len` bytes linear then.
const BIG: usize = 5000;

fn counters(lab: &Lab) -> std::collections::BTreeMap<String, u64> {
    let st = lab.ctl(&["status", "--json"]);
    let js: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    js["counters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c[0].as_str().unwrap().to_string(), c[1].as_u64().unwrap()))
        .collect()
}

/// Sends each frame out of `s0` with a virtio-net header saying `hdr_len` bytes are linear.
fn send(lab: &Lab, frames: Vec<(u16, Vec<u8>)>) {
    let path = format!("/run/netns/{}", lab.sub);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        // SAFETY: plain socket(2), checked.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        assert!(raw >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor, owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let one: libc::c_int = 1;
        // SAFETY: an int option of its size.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_VNET_HDR,
                &one as *const _ as *const libc::c_void,
                size_of::<libc::c_int>() as u32,
            )
        };
        assert_eq!(r, 0, "PACKET_VNET_HDR: {}", std::io::Error::last_os_error());
        // SAFETY: sockaddr_ll is plain data.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = nix::net::if_::if_nametoindex("s0").unwrap() as i32;
        sll.sll_halen = 6;
        for (hdr_len, frame) in frames {
            // struct virtio_net_hdr (little-endian here): no checksum, no GSO, hdr_len.
            let mut buf = vec![0u8; 10];
            buf[2..4].copy_from_slice(&hdr_len.to_le_bytes());
            buf.extend(&frame);
            // SAFETY: buf and sll are valid for the lengths given.
            let n = unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    buf.as_ptr() as *const libc::c_void,
                    buf.len(),
                    0,
                    &sll as *const _ as *const libc::sockaddr,
                    size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(
                n as usize,
                buf.len(),
                "sendto: {}",
                std::io::Error::last_os_error()
            );
        }
    })
    .join()
    .unwrap();
}

fn big(f: Frame, len: usize) -> Vec<u8> {
    let head = f.clone().build().len();
    f.tcp_bytes(20 + len - head).build()
}

#[test]
fn headers_split_between_the_linear_part_and_page_fragments_get_the_linear_verdict() {
    require_root!();
    let mut lab = Lab::new(TC);
    for ns in [&lab.sub, &lab.rtr] {
        let dev = if ns == &lab.sub { "s0" } else { "rs" };
        let o = std::process::Command::new("ip")
            .args(["-n", ns, "link", "set", dev, "mtu", "9000"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
    }
    lab.start_daemon();
    let v4 = Frame::eth().ipv4([100, 64, 0, 2], [203, 0, 113, 80]);
    let v6 = Frame::eth().ipv6("2001:db8:100::2", "2001:db8:ff::80");
    let cases = [
        (v4.clone().tcp(25).syn(), "block_port"),
        (v4.clone().options(20).tcp(25).syn(), "block_port"),
        (v6.clone().tcp(25).syn(), "block_port"),
        (v6.clone().ext(0).ext(60).tcp(25).syn(), "block_port"),
    ];
    for (f, want) in cases {
        let frame = big(f, BIG);
        assert!(frame.len() >= BIG, "{}", frame.len());
        // The line at every byte up to past the TCP ports, and the whole frame linear last.
        let lines: Vec<u16> = (14..=80).chain([frame.len() as u16]).collect();
        let n = lines.len() as u64;
        let before = counters(&lab);
        send(
            &lab,
            lines.into_iter().map(|l| (l, frame.clone())).collect(),
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
        let after = counters(&lab);
        // The lab's own ND/MLD traffic is counted too; none of these frames can be non-TCP.
        let moved: Vec<(String, u64)> = after
            .iter()
            .filter(|(k, _)| k.as_str() != "pass_not_tcp")
            .filter_map(|(k, v)| {
                let d = v - before.get(k).copied().unwrap_or(0);
                (d > 0).then(|| (k.clone(), d))
            })
            .collect();
        assert_eq!(
            moved,
            vec![(want.to_string(), n)],
            "a {}-byte frame with {n} different linear lengths",
            frame.len()
        );
    }
}
