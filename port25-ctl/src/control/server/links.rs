//! Attachments kept alive: link events from the kernel wake a repair at once (a re-created
//! interface leaves its pinned link dead), and a refused reload takes back what it attached.

use anyhow::Result;
use tracing::{error, warn};

use super::Daemon;
use crate::bpf::datapath;

/// rtnetlink link and TC notifications (RTMGRP_LINK, RTMGRP_TC) of this network namespace;
/// only their arrival matters, so they are drained unread. TC because a netlink filter, unlike
/// a tcx link, can be removed by another tool (`tc qdisc del dev X clsact`): port 25 is open
/// until it is put back, which must not wait for the next reconcile.
pub(super) struct LinkEvents {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl LinkEvents {
    pub(super) fn open() -> Result<LinkEvents> {
        use nix::sys::socket::{
            bind, socket, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType,
        };
        const RTMGRP_LINK: u32 = 1;
        const RTMGRP_TC: u32 = 8;
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &NetlinkAddr::new(0, RTMGRP_LINK | RTMGRP_TC),
        )?;
        // SAFETY: an OwnedFd keeps its descriptor open and the same for its whole life.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(|e| anyhow::anyhow!("registering the netlink socket: {e}"))?;
        Ok(LinkEvents { fd })
    }

    /// Waits for a batch of link events and drains it; never returns without events.
    pub(super) async fn next(events: Option<&LinkEvents>) {
        let Some(ev) = events else {
            return std::future::pending().await;
        };
        let Ok(mut guard) = ev.fd.readable().await else {
            return std::future::pending().await;
        };
        let mut buf = [0u8; 8192];
        // Bounded: a storm of events must not keep this loop from the writer's work.
        for _ in 0..1024 {
            let fd = std::os::fd::AsRawFd::as_raw_fd(ev.fd.get_ref());
            match nix::sys::socket::recv(fd, &mut buf, nix::sys::socket::MsgFlags::empty()) {
                Ok(n) if n > 0 => continue,
                // ENOBUFS: events were lost, which still means "look again".
                Err(nix::errno::Errno::ENOBUFS) => continue,
                _ => break,
            }
        }
        guard.clear_ready();
    }
}

impl Daemon {
    /// Removes the attachments a refused reload made.
    pub(super) fn take_back(&mut self, points: &[String]) {
        for p in points {
            if let Err(e) = datapath::unpin(&self.pins, p) {
                error!("taking back {p} after a refused reload: {e:#}");
            }
        }
    }

    /// Every configured attachment alive and on its interface: one whose interface was
    /// deleted (and perhaps re-created) or whose pin was lost is attached again.
    pub(super) fn repair_links(&mut self) {
        for iface in &self.cfg.interfaces {
            let Some(problem) = datapath::link_problem(&self.pins, iface) else {
                continue;
            };
            let point = iface.attach_point();
            match datapath::attach(&mut self.ebpf, &self.pins, iface) {
                Ok(how) => {
                    self.link_errors.remove(&point);
                    warn!(%point, %problem, ?how, "attachment repaired");
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    if self.link_errors.get(&point) != Some(&msg) {
                        error!(
                            %point, %problem,
                            "cannot attach, port 25 is not blocked there until it can: {msg}"
                        );
                        self.link_errors.insert(point, msg);
                    }
                }
            }
        }
    }
}
