//! Attachments kept alive: link events from the kernel attach glob devices as they appear,
//! release them as they go, and repair at once what an event touched (a re-created
//! interface leaves its pinned link dead); a refused reload takes back what it attached.

use std::collections::{BTreeSet, HashMap};

use anyhow::Result;
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{link::LinkAttribute, RouteNetlinkMessage};
use tracing::{error, info, warn};

use super::Daemon;
use crate::{
    bpf::{datapath, linkinfo},
    config::{Config, Target},
};

/// rtnetlink link and TC notifications (RTMGRP_LINK, RTMGRP_TC) of this network namespace.
/// TC because a netlink filter, unlike a tcx link, can be removed by another tool
/// (`tc qdisc del dev X clsact`): port 25 is open until it is put back, which must not wait
/// for the next reconcile.
pub(super) struct LinkEvents {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

/// What one batch of notifications says.
#[derive(Debug, Default)]
pub(super) struct Batch {
    /// In arrival order.
    pub(super) events: Vec<Event>,
    /// ENOBUFS: the kernel dropped notifications; only a full pass is sure to see them.
    pub(super) lost: bool,
    /// A notification could not be read (a parser older than the kernel, a cut datagram):
    /// it may have been a device to attach, so only a full pass is sure to see it.
    pub(super) unreadable: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Event {
    /// RTM_NEWLINK: a device appeared, changed, or was renamed.
    Link { index: u32, name: String },
    /// RTM_DELLINK.
    Gone { index: u32, name: String },
    /// A qdisc or filter changed on this ifindex.
    Tc { index: u32 },
}

/// The events in one datagram of notifications; what is not a link or TC message is skipped.
/// False when a link or TC message could not be read, or the datagram is cut: the caller
/// cannot know what it said (a device that needs attaching?) and checks every device.
pub(super) fn parse(mut buf: &[u8], out: &mut Vec<Event>) -> bool {
    // RTM_NEWLINK, RTM_DELLINK; qdisc, class and filter messages; chain messages.
    let ours = |ty: u16| matches!(ty, 16 | 17 | 36..=47 | 100..=102);
    let mut whole = true;
    while !buf.is_empty() {
        if buf.len() < 16 {
            return false;
        }
        let len = u32::from_ne_bytes(buf[..4].try_into().unwrap()) as usize;
        if len < 16 || len > buf.len() {
            return false;
        }
        let ty = u16::from_ne_bytes(buf[4..6].try_into().unwrap());
        let aligned = (len + 3) & !3;
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[..len]) {
            Ok(msg) => {
                if let NetlinkPayload::InnerMessage(m) = msg.payload {
                    out.extend(event_of(m));
                }
            }
            Err(e) if ours(ty) => {
                warn!("an unreadable link or TC notification (type {ty}): {e}");
                whole = false;
            }
            Err(_) => {}
        }
        buf = &buf[aligned.min(buf.len())..];
    }
    whole
}

fn event_of(m: RouteNetlinkMessage) -> Option<Event> {
    use RouteNetlinkMessage as R;
    let name_of = |l: &netlink_packet_route::link::LinkMessage| {
        l.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
    };
    match m {
        R::NewLink(l) => Some(Event::Link {
            index: l.header.index,
            name: name_of(&l)?,
        }),
        R::DelLink(l) => Some(Event::Gone {
            index: l.header.index,
            name: name_of(&l)?,
        }),
        R::NewQueueDiscipline(t)
        | R::DelQueueDiscipline(t)
        | R::NewTrafficFilter(t)
        | R::DelTrafficFilter(t)
        | R::NewTrafficChain(t)
        | R::DelTrafficChain(t) => Some(Event::Tc {
            index: u32::try_from(t.header.index).ok()?,
        }),
        _ => None,
    }
}

impl LinkEvents {
    pub(super) fn open() -> Result<LinkEvents> {
        use nix::sys::socket::{
            bind, setsockopt, socket, sockopt, AddressFamily, NetlinkAddr, SockFlag, SockProtocol,
            SockType,
        };
        const RTMGRP_LINK: u32 = 1;
        const RTMGRP_TC: u32 = 8;
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        // A BRAS bringing up hundreds of sessions at once: room before ENOBUFS (which costs a
        // full pass) rather than the default ~200 KiB.
        if let Err(e) = setsockopt(&fd, sockopt::RcvBufForce, &(8 << 20)) {
            let _ = setsockopt(&fd, sockopt::RcvBuf, &(8 << 20));
            tracing::debug!("SO_RCVBUFFORCE: {e}");
        }
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

    /// Waits for notifications and reads what is queued; never returns an empty batch.
    pub(super) async fn next(events: Option<&LinkEvents>) -> Batch {
        let Some(ev) = events else {
            return std::future::pending().await;
        };
        loop {
            let Ok(mut guard) = ev.fd.readable().await else {
                return std::future::pending().await;
            };
            let mut batch = Batch::default();
            let mut buf = vec![0u8; 64 << 10];
            // Bounded: a storm of events must not keep this loop from the writer's work.
            for _ in 0..256 {
                let fd = std::os::fd::AsRawFd::as_raw_fd(ev.fd.get_ref());
                match nix::sys::socket::recv(fd, &mut buf, nix::sys::socket::MsgFlags::empty()) {
                    Ok(n) if n > 0 => {
                        if !parse(&buf[..n], &mut batch.events) {
                            batch.unreadable = true;
                        }
                    }
                    Err(nix::errno::Errno::ENOBUFS) => batch.lost = true,
                    Err(nix::errno::Errno::EAGAIN) => {
                        guard.clear_ready();
                        break;
                    }
                    _ => break,
                }
            }
            if batch.lost || batch.unreadable || !batch.events.is_empty() {
                return batch;
            }
        }
    }
}

/// The devices of this namespace, by ifindex, as link events keep them.
#[derive(Debug, Default)]
pub(super) struct Devices(HashMap<u32, String>);

impl Devices {
    pub(super) fn scan() -> Devices {
        match linkinfo::devices() {
            Ok(list) => Devices(list.into_iter().collect()),
            Err(e) => {
                error!("{e:#}");
                Devices::default()
            }
        }
    }
    pub(super) fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.0.values().cloned().collect();
        v.sort();
        v
    }
    fn has(&self, name: &str) -> bool {
        self.0.values().any(|n| n == name)
    }
}

/// The attach points a device has or would have, one per kind.
fn points_of(device: &str) -> impl Iterator<Item = (&'static str, String)> + '_ {
    ["xdp", "tc-ingress", "tc-egress"]
        .into_iter()
        .map(move |k| {
            let escaped = device.replace('%', "%25").replace('.', "%2e");
            (k, format!("{k}:{escaped}"))
        })
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

    /// One batch of link events: only the devices they name are looked at, unless events
    /// were lost.
    pub(super) fn link_events(&mut self, batch: Batch) {
        if batch.lost || batch.unreadable {
            if batch.lost {
                warn!("link events were lost (ENOBUFS): checking every device");
            } else {
                warn!("a link event could not be read: checking every device");
            }
            self.repair_links();
            return;
        }
        let mut touched = BTreeSet::new();
        for ev in batch.events {
            match ev {
                Event::Link { index, name } => {
                    let old = self.devices.0.insert(index, name.clone());
                    if let Some(old) = old.filter(|o| *o != name) {
                        info!(from = %old, to = %name, "interface renamed");
                        if self.another_device_named(&old, index) {
                            touched.insert(old);
                        } else {
                            self.renamed(&old, &name);
                            self.left(&old);
                        }
                    }
                    touched.insert(name);
                }
                Event::Gone { index, name } => {
                    self.devices.0.remove(&index);
                    if self.another_device_named(&name, index) {
                        touched.insert(name);
                    } else {
                        touched.remove(&name);
                        self.left(&name);
                    }
                }
                Event::Tc { index } => {
                    if let Some(name) = self.devices.0.get(&index) {
                        touched.insert(name.clone());
                    }
                }
            }
        }
        for name in touched {
            if self.devices.has(&name) {
                for t in self.cfg.targets_for(&name) {
                    self.repair(&t);
                }
            }
        }
    }

    /// An event read late (events were lost, a full pass ran) may be about a device whose
    /// name another device has now: the pin under that name may be the new device's, so it
    /// is repaired (kept if it enforces), never released because the old device left.
    fn another_device_named(&mut self, name: &str, index: u32) -> bool {
        let now = linkinfo::ifindex(name);
        if now == 0 || now == index {
            return false;
        }
        info!(device = %name, old = index, now, "a late event about a device since replaced");
        self.devices.0.insert(now, name.to_owned());
        true
    }

    /// A glob device renamed to a name a glob also governs keeps its attachment (same
    /// ifindex): the pin moves to its new attach point. Releasing and attaching again would
    /// leave it open meanwhile, and fail while the kernel frees the old link (it does so
    /// asynchronously: the new tcx attach is EEXIST until then).
    fn renamed(&mut self, old: &str, new: &str) {
        for ((kind, from), (_, to)) in points_of(old).zip(points_of(new)) {
            let was_glob = self.cfg.owner(old, kind).is_none_or(|e| e.is_glob());
            let (from, to) = (self.pins.link(&from), self.pins.link(&to));
            if was_glob
                && self.cfg.owner(new, kind).is_some()
                && crate::bpf::tc::occupied(&from)
                && !crate::bpf::tc::occupied(&to)
            {
                if let Err(e) = std::fs::rename(&from, &to) {
                    error!(from = %from.display(), "moving the pin of a renamed device: {e}");
                }
            }
        }
    }

    /// A device left (deleted, or renamed away): a glob's attachment on it is released with
    /// its pin; a concrete entry's stays, to be repaired when the device is back.
    fn left(&mut self, device: &str) {
        for (kind, point) in points_of(device) {
            match self.cfg.owner(device, kind) {
                Some(entry) if !entry.is_glob() => {
                    self.repair(&Target {
                        iface: entry.clone(),
                        glob: None,
                    });
                }
                _ => {
                    if !crate::bpf::tc::occupied(&self.pins.link(&point)) {
                        continue;
                    }
                    self.link_errors.remove(&point);
                    match datapath::unpin(&self.pins, &point) {
                        Ok(()) => info!(%point, "released: the device is gone"),
                        Err(e) => error!(%point, "releasing: {e:#}"),
                    }
                }
            }
        }
    }

    /// Every configured attachment alive and on its interface (one whose interface was
    /// deleted and perhaps re-created, or whose pin was lost, is attached again), every
    /// device a glob matches attached, and the pins of glob devices that are gone released.
    pub(super) fn repair_links(&mut self) {
        self.devices = Devices::scan();
        let targets = self.cfg.targets(&self.devices.names());
        for t in &targets {
            self.repair(t);
        }
        let here: std::collections::HashSet<&String> = self.devices.0.values().collect();
        let mut gone = BTreeSet::new();
        for point in self.pins.pinned_links() {
            let Some((kind, device)) = crate::config::point_device(&point) else {
                continue;
            };
            let glob_or_none = self.cfg.owner(&device, kind).is_none_or(|e| e.is_glob());
            if glob_or_none && !here.contains(&device) {
                gone.insert(device);
            }
        }
        for device in gone {
            self.left(&device);
        }
    }

    /// Attaches one target unless it already enforces; a failure is logged once.
    pub(super) fn repair(&mut self, t: &Target) -> Option<String> {
        let iface = &t.iface;
        let problem = datapath::link_problem(&self.pins, iface)?;
        let point = iface.attach_point();
        match datapath::attach(&mut self.ebpf, &self.pins, iface) {
            Ok(how) => {
                self.link_errors.remove(&point);
                match &t.glob {
                    Some(g) => {
                        let shadowed = self.cfg.shadowed(&iface.name, iface.kind());
                        if !shadowed.is_empty() {
                            let others: Vec<&str> =
                                shadowed.iter().map(|i| i.name.as_str()).collect();
                            warn!(%point, glob = %g, ?others, "several entries match; the first glob in file order applies");
                        }
                        info!(%point, glob = %g, ?how, "enforcing");
                    }
                    None => warn!(%point, %problem, ?how, "attachment repaired"),
                }
                None
            }
            Err(e) => {
                let msg = format!("{e:#}");
                if self.link_errors.get(&point) != Some(&msg) {
                    error!(
                        %point, %problem,
                        "cannot attach, port 25 is not blocked there until it can: {msg}"
                    );
                    self.link_errors.insert(point, msg.clone());
                }
                Some(msg)
            }
        }
    }
}

impl Daemon {
    /// `session up`: the session's device (named, or the one its first address is routed
    /// through), attached now when a glob entry governs it. None when no glob governs it.
    pub(super) fn session_device(
        &mut self,
        named: Option<&str>,
        addrs: &[crate::net::Prefix],
    ) -> Option<crate::control::reply::SessionDevice> {
        let name = match named {
            Some(n) => n.to_owned(),
            None => {
                let addr = addrs.first()?.addr;
                linkinfo::ifname(crate::bpf::route::oif(addr)?)?
            }
        };
        let targets: Vec<Target> = self
            .cfg
            .targets_for(&name)
            .into_iter()
            .filter(|t| t.glob.is_some())
            .collect();
        if targets.is_empty() {
            return None;
        }
        let mut attached = vec![];
        let mut errors = vec![];
        for t in &targets {
            let point = t.iface.attach_point();
            let before = datapath::link_problem(&self.pins, &t.iface);
            if before.is_none() {
                continue;
            }
            match self.repair(t) {
                None => attached.push(point),
                Some(e) => errors.push(format!("{point}: {e}")),
            }
        }
        Some(crate::control::reply::SessionDevice {
            name,
            attached,
            error: (!errors.is_empty()).then(|| errors.join("; ")),
        })
    }
}

/// Every target of `cfg` on the devices of this namespace.
pub(super) fn targets_here(cfg: &Config) -> (Devices, Vec<Target>) {
    let devices = Devices::scan();
    let targets = cfg.targets(&devices.names());
    (devices, targets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload};
    use netlink_packet_route::link::LinkMessage;

    fn emit(m: RouteNetlinkMessage) -> Vec<u8> {
        let mut msg =
            NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::InnerMessage(m));
        msg.finalize();
        let mut b = vec![0; msg.buffer_len()];
        msg.serialize(&mut b);
        b
    }

    #[test]
    fn link_and_tc_events_are_read_from_one_datagram() {
        let mut l = LinkMessage::default();
        l.header.index = 7;
        l.attributes.push(LinkAttribute::IfName("ppp7".into()));
        let mut t = netlink_packet_route::tc::TcMessage::default();
        t.header.index = 9;
        let mut buf = emit(RouteNetlinkMessage::NewLink(l.clone()));
        buf.extend(emit(RouteNetlinkMessage::NewTrafficFilter(t)));
        buf.extend(emit(RouteNetlinkMessage::DelLink(l)));
        let mut out = vec![];
        parse(&buf, &mut out);
        assert_eq!(
            out,
            vec![
                Event::Link {
                    index: 7,
                    name: "ppp7".into()
                },
                Event::Tc { index: 9 },
                Event::Gone {
                    index: 7,
                    name: "ppp7".into()
                },
            ]
        );
        // Truncated: what is whole is read, the rest never panics.
        let mut out = vec![];
        assert!(
            !parse(&buf[..buf.len() - 3], &mut out),
            "a cut message is a doubt"
        );
        assert_eq!(out.len(), 2);
    }

    /// A notification that cannot be read may be a device that must be attached: it is a
    /// doubt (the caller checks every device), never skipped in silence until the next
    /// reconcile.
    #[test]
    fn an_unreadable_link_message_is_a_doubt() {
        let mut l = LinkMessage::default();
        l.header.index = 7;
        l.attributes.push(LinkAttribute::IfName("ppp7".into()));
        l.attributes.push(LinkAttribute::Mtu(1492));
        let mut buf = emit(RouteNetlinkMessage::NewLink(l));
        let mut out = vec![];
        assert!(parse(&buf, &mut out));
        assert_eq!(out.len(), 1);
        // The last attribute (IFLA_MTU, 8 bytes) says it is 3 bytes long: shorter than its
        // own header.
        let mtu = buf.len() - 8;
        buf[mtu..mtu + 2].copy_from_slice(&3u16.to_ne_bytes());
        let mut out = vec![];
        assert!(!parse(&buf, &mut out), "read as {out:?}");
        assert!(out.is_empty());
    }
}
