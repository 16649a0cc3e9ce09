//! TC where the kernel has no tcx (Linux < 6.6 without a backport): a cls_bpf filter in
//! direct-action mode on the clsact qdisc, added over rtnetlink.
//!
//! Such a filter is no bpf_link: it cannot be pinned, and it stays in the kernel when the
//! daemon exits (aya would delete it when its link is dropped, so the link is forgotten).
//! port25 owns exactly one filter per attach point, at a fixed place:
//! priority [`PRIORITY`] and handle [`HANDLE`] (`tc filter show` prints `pref 25 ... handle
//! 0x25`), protocol all. Lower priorities run first: another user's filter at a priority
//! below 25 runs before port25's, one above after it (port25 passes with TC_ACT_UNSPEC, so
//! later filters still see what port25 lets through). A foreign filter at priority 25 is
//! refused rather than grouped with ours.
//!
//! Where a tcx link would be pinned, a record is kept instead: a bpffs symlink
//! `links/tc-<dir>:<if>` whose target is `netlink:<ifindex>:<dir>:<priority>:<handle>`,
//! followed by `:net=<inode>`, the network namespace the ifindex belongs to (records written
//! before it have none). On
//! start the filter found there gets the new program in place (RTM_NEWTFILTER without
//! CREATE: cls_bpf swaps it atomically), so there is no moment without a filter and never a
//! second one.

use std::{
    ffi::CStr,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    sync::OnceLock,
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::programs::{
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
    SchedClassifier, TcAttachType,
};
use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd};

use crate::{
    bpf::{linkinfo, sys::sys_bpf},
    config::{Direction, Interface, TcAttach},
};

/// port25's filter priority on every clsact hook (ingress and egress).
pub const PRIORITY: u16 = 25;
/// port25's filter handle at [`PRIORITY`].
pub const HANDLE: u32 = 0x25;
/// Filters whose program name starts with this are port25's (`port25_tc`, `port25_tc_raw`),
/// when they are also at port25's place (see [`Filter::is_ours`]).
const PROG_PREFIX: &str = "port25_tc";
/// ETH_P_ALL in network byte order, as the kernel keeps a filter's protocol.
const PROTOCOL_ALL: u16 = (libc::ETH_P_ALL as u16).to_be();
const RECORD_PREFIX: &str = "netlink:";

/// Where port25's netlink filter is: what a tcx link's pin would tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub ifindex: u32,
    pub direction: Direction,
    pub priority: u16,
    pub handle: u32,
    /// The inode of the network namespace the ifindex is in (None: an older record).
    pub netns: Option<u64>,
}

impl Record {
    /// port25's place on one hook of an interface.
    pub fn ours(ifindex: u32, direction: Direction) -> Record {
        Record {
            ifindex,
            direction,
            priority: PRIORITY,
            handle: HANDLE,
            netns: current_netns(),
        }
    }

    fn target(&self) -> String {
        let net = self.netns.map(|n| format!(":net={n}")).unwrap_or_default();
        format!(
            "{RECORD_PREFIX}{}:{}:{}:{:#x}{net}",
            self.ifindex, self.direction, self.priority, self.handle
        )
    }

    /// Why this record cannot be acted on from here: its ifindex is another namespace's.
    fn elsewhere(&self) -> Option<String> {
        let there = self.netns?;
        (current_netns() != Some(there)).then(|| {
            format!(
                "port25's netlink filter is in another network namespace (net:[{there}]); run \
                 this there (nsenter --net=...)"
            )
        })
    }

    fn parse(s: &str) -> Option<Record> {
        let mut f = s.strip_prefix(RECORD_PREFIX)?.split(':');
        let ifindex = f.next()?.parse().ok()?;
        let direction = match f.next()? {
            "ingress" => Direction::Ingress,
            "egress" => Direction::Egress,
            _ => return None,
        };
        let priority = f.next()?.parse().ok()?;
        let handle = u32::from_str_radix(f.next()?.strip_prefix("0x")?, 16).ok()?;
        let netns = match f.next() {
            None => None,
            Some(n) => Some(n.strip_prefix("net=")?.parse().ok()?),
        };
        f.next().is_none().then_some(Record {
            ifindex,
            direction,
            priority,
            handle,
            netns,
        })
    }
}

/// The inode of the calling thread's network namespace (what `ip netns identify` compares).
pub fn current_netns() -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    // The calling thread's: a thread that entered a namespace with setns (a test, a
    // helper thread) is there while /proc/self names the main thread's.
    std::fs::metadata("/proc/thread-self/ns/net")
        .ok()
        .map(|m| m.ino())
}

/// The record at a link path, if that path holds one (and not a pinned link).
pub fn read_record(path: &Path) -> Option<Record> {
    let target = std::fs::read_link(path).ok()?;
    Record::parse(target.to_str()?)
}

/// True when something (a pinned link or a record) is at `path`; `Path::exists` follows the
/// record's symlink to nothing.
pub fn occupied(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

/// Writes the record over whatever is at `path` in one rename: a tcx link pinned there is
/// released only once the filter is in place.
pub fn write_record(path: &Path, rec: &Record) -> Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("bad link path {}", path.display()))?;
    // Not an attach point's name (those start with xdp: or tc-), and no dot: bpffs refuses dots.
    let tmp = path.with_file_name(format!("{}{name}", crate::bpf::pins::TMP_PREFIX));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(rec.target(), &tmp)
        .with_context(|| format!("recording the netlink filter at {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("recording the netlink filter at {}", path.display()))
}

/// Whether the running kernel has tcx, probed once: BPF_PROG_QUERY on BPF_TCX_INGRESS is
/// EINVAL on a kernel without it, whatever version it reports.
pub fn tcx_available() -> bool {
    static PROBE: OnceLock<bool> = OnceLock::new();
    *PROBE.get_or_init(|| {
        // SAFETY: bpf_attr is plain data; zeroed is its valid empty state.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        attr.query.__bindgen_anon_1.target_ifindex = 1; // lo, in every network namespace
        attr.query.attach_type = bpf_attach_type::BPF_TCX_INGRESS as u32;
        sys_bpf(bpf_cmd::BPF_PROG_QUERY, &mut attr).is_ok()
    })
}

/// Whether this `hook: tc` interface is attached through netlink (else tcx).
pub fn uses_netlink(iface: &Interface) -> Result<bool> {
    match iface.tc_attach {
        TcAttach::Netlink => Ok(true),
        TcAttach::Auto => Ok(!tcx_available()),
        TcAttach::Tcx if tcx_available() => Ok(false),
        TcAttach::Tcx => bail!(
            "{}: `tc_attach: tcx`, but this kernel has no tcx (BPF_PROG_QUERY on \
             BPF_TCX_INGRESS is EINVAL); use `tc_attach: auto`",
            iface.name
        ),
    }
}

fn attach_type(d: Direction) -> TcAttachType {
    match d {
        Direction::Ingress => TcAttachType::Ingress,
        Direction::Egress => TcAttachType::Egress,
    }
}

/// Attaches `prog` as port25's filter on the interface's clsact hook: the program of our
/// filter is replaced in place when it is there (true), a filter is created otherwise.
pub fn attach(prog: &mut SchedClassifier, iface: &Interface) -> Result<(Record, bool)> {
    let ifindex = linkinfo::ifindex(&iface.name);
    if ifindex == 0 {
        bail!("interface {} not found", iface.name);
    }
    let ty = attach_type(iface.direction);
    match tc::qdisc_add_clsact(&iface.name) {
        Ok(()) => {}
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => {
            return Err(e).with_context(|| format!("adding the clsact qdisc to {}", iface.name))
        }
    }
    let at_ours: Vec<Filter> = filters(ifindex, iface.direction)
        .with_context(|| format!("listing the TC filters on {}", iface.name))?
        .into_iter()
        .filter(|f| f.priority == PRIORITY)
        .collect();
    if let Some(f) = at_ours.iter().find(|f| f.handle != 0 && !f.is_ours()) {
        bail!(
            "{}: another {} filter (handle {:#x}{}) holds priority {PRIORITY} on {}, which \
             port25 needs for its own filter; move it to another priority",
            iface.name,
            f.kind,
            f.handle,
            f.name
                .as_deref()
                .map(|n| format!(", {n}"))
                .unwrap_or_default(),
            iface.direction
        );
    }
    let swap = at_ours.iter().any(|f| f.is_ours());
    let id = if swap {
        let link = SchedClassifierLink::attached(&iface.name, ty, PRIORITY, HANDLE.into(), None)?;
        prog.attach_to_link(link).with_context(|| {
            format!("replacing the program of port25's filter on {}", iface.name)
        })?
    } else {
        prog.attach_with_options(
            &iface.name,
            ty,
            TcAttachOptions::Netlink(NlOptions {
                priority: PRIORITY,
                handle: TcHandle::from(HANDLE),
                ..Default::default()
            }),
        )
        .with_context(|| format!("adding port25's TC filter on {}", iface.name))?
    };
    // Dropping the link would delete the filter: it must outlive the daemon.
    std::mem::forget(prog.take_link(id)?);
    Ok((Record::ours(ifindex, iface.direction), swap))
}

/// Why the recorded filter does not enforce (None when it does).
pub fn problem(rec: &Record, iface_name: &str) -> Option<String> {
    if let Some(e) = rec.elsewhere() {
        return Some(e);
    }
    let want = linkinfo::ifindex(iface_name);
    if want == 0 {
        return Some("interface not found in this network namespace".into());
    }
    if rec.ifindex != want {
        return Some(format!(
            "the netlink filter was on ifindex {} (the interface went away); {iface_name} is \
             now ifindex {want}",
            rec.ifindex
        ));
    }
    match find(rec) {
        Ok(Some(_)) => None,
        Ok(None) => Some(format!(
            "port25's netlink filter (pref {} handle {:#x}) is missing from {iface_name} {}",
            rec.priority, rec.handle, rec.direction
        )),
        Err(e) => Some(format!("listing the TC filters on {iface_name}: {e}")),
    }
}

/// port25's filter at the recorded place, if it is there.
pub fn find(rec: &Record) -> io::Result<Option<Filter>> {
    if rec.elsewhere().is_some() {
        return Ok(None);
    }
    Ok(filters(rec.ifindex, rec.direction)?
        .into_iter()
        .find(|f| f.priority == rec.priority && f.handle == rec.handle && f.is_ours()))
}

/// Deletes port25's filter at the recorded place, and nothing else: a filter there that is
/// not port25's stays. Gone already (or its interface gone) is fine. A record from another
/// network namespace is refused: its ifindex means another device here, and dropping it
/// would leave the filter there, unrecorded, while saying port 25 flows.
pub fn detach(rec: &Record) -> Result<()> {
    if let Some(e) = rec.elsewhere() {
        bail!("{e}");
    }
    let Some(f) = find(rec).context("listing TC filters")? else {
        return Ok(());
    };
    match delete(rec.ifindex, rec.direction, f.priority, f.protocol, f.handle) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENODEV)) => Ok(()),
        r => r.with_context(|| {
            format!(
                "deleting port25's TC filter (ifindex {}, {}, pref {}, handle {:#x})",
                rec.ifindex, rec.direction, rec.priority, rec.handle
            )
        }),
    }
}

/// One TC filter as `tc filter show` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub priority: u16,
    /// Network byte order, as the kernel keeps it.
    pub protocol: u16,
    /// 0 for the line that stands for a priority's classifier itself.
    pub handle: u32,
    /// The filter chain (0 is the one packets enter; others only by `goto chain`).
    pub chain: u32,
    pub kind: String,
    /// cls_bpf: the name given at attach (aya gives the program's).
    pub name: Option<String>,
    pub prog_id: Option<u32>,
}

impl Filter {
    /// port25's filter: a `port25_tc*` bpf filter at port25's exact place. A look-alike
    /// elsewhere (another handle at priority 25, another protocol, a chain packets never
    /// enter without a `goto`) is another user's: never adopted, swapped or counted as
    /// enforcing.
    pub fn is_ours(&self) -> bool {
        self.kind == "bpf"
            && self
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with(PROG_PREFIX))
            && self.priority == PRIORITY
            && self.handle == HANDLE
            && self.protocol == PROTOCOL_ALL
            && self.chain == 0
    }
}

// rtnetlink, as in linux/rtnetlink.h, linux/pkt_cls.h.
const RTM_DELTFILTER: u16 = 45;
const RTM_GETTFILTER: u16 = 46;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_NAME: u16 = 7;
const TCA_CHAIN: u16 = 11;
const TCA_BPF_ID: u16 = 11;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLMSG_HDR: usize = 16;
const TCMSG: usize = 20;

fn parent(d: Direction) -> u32 {
    // TC_H_CLSACT's major with TC_H_MIN_INGRESS / TC_H_MIN_EGRESS.
    match d {
        Direction::Ingress => 0xffff_fff2,
        Direction::Egress => 0xffff_fff3,
    }
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Receive with a timeout: a kernel that never answers must not hang the daemon.
    let tv = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: setsockopt with a timeval that outlives the call.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        );
    }
    Ok(fd)
}

fn request(ty: u16, flags: u16, ifindex: u32, d: Direction, handle: u32, info: u32) -> Vec<u8> {
    let len = (NLMSG_HDR + TCMSG) as u32;
    let mut b = Vec::with_capacity(len as usize);
    b.extend_from_slice(&len.to_ne_bytes());
    b.extend_from_slice(&ty.to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&1u32.to_ne_bytes()); // seq
    b.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel's
    b.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    b.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    b.extend_from_slice(&handle.to_ne_bytes());
    b.extend_from_slice(&parent(d).to_ne_bytes());
    b.extend_from_slice(&info.to_ne_bytes());
    b
}

fn send(fd: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: sockaddr_nl is plain data; zeroed with the family set addresses the kernel.
    let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    to.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: msg and `to` outlive the call.
    let rc = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr() as *const libc::c_void,
            msg.len(),
            0,
            &to as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads answers until the end of a dump or an acknowledgement, handing each message's
/// payload (after the netlink header) to `each`.
fn receive(fd: &OwnedFd, mut each: impl FnMut(&[u8])) -> io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        // SAFETY: buf outlives the call and its length is passed.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut rest = &buf[..n as usize];
        while rest.len() >= NLMSG_HDR {
            let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
            let ty = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
            if len < NLMSG_HDR || len > rest.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "bad netlink message",
                ));
            }
            let payload = &rest[NLMSG_HDR..len];
            match ty as i32 {
                libc::NLMSG_DONE => return Ok(()),
                libc::NLMSG_ERROR => {
                    let errno = payload
                        .get(..4)
                        .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                        .unwrap_or(-libc::EIO);
                    return if errno == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(-errno))
                    };
                }
                _ => each(payload),
            }
            rest = &rest[((len + 3) & !3).min(rest.len())..];
        }
    }
}

/// Netlink attributes: (type, value).
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            return None;
        }
        let value = &b[4..len];
        b = &b[((len + 3) & !3).min(b.len())..];
        Some((ty, value))
    })
}

fn c_string(b: &[u8]) -> String {
    CStr::from_bytes_until_nul(b)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(b).into_owned())
}

/// Every filter on one clsact hook of an interface (none when the interface is gone).
pub fn filters(ifindex: u32, d: Direction) -> io::Result<Vec<Filter>> {
    let fd = socket()?;
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    send(&fd, &request(RTM_GETTFILTER, flags, ifindex, d, 0, 0))?;
    let mut out = Vec::new();
    receive(&fd, |p| {
        if p.len() < TCMSG {
            return;
        }
        let handle = u32::from_ne_bytes(p[8..12].try_into().unwrap());
        let info = u32::from_ne_bytes(p[16..20].try_into().unwrap());
        let mut f = Filter {
            priority: (info >> 16) as u16,
            protocol: info as u16,
            handle,
            chain: 0,
            kind: String::new(),
            name: None,
            prog_id: None,
        };
        for (ty, v) in attrs(&p[TCMSG..]) {
            match ty {
                TCA_KIND => f.kind = c_string(v),
                TCA_CHAIN if v.len() >= 4 => {
                    f.chain = u32::from_ne_bytes(v[..4].try_into().unwrap())
                }
                TCA_OPTIONS => {
                    for (ty, v) in attrs(v) {
                        match ty {
                            TCA_BPF_NAME => f.name = Some(c_string(v)),
                            TCA_BPF_ID if v.len() >= 4 => {
                                f.prog_id = Some(u32::from_ne_bytes(v[..4].try_into().unwrap()))
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        out.push(f);
    })?;
    Ok(out)
}

fn delete(ifindex: u32, d: Direction, priority: u16, protocol: u16, handle: u32) -> io::Result<()> {
    let fd = socket()?;
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    let info = (u32::from(priority) << 16) | u32::from(protocol);
    send(
        &fd,
        &request(RTM_DELTFILTER, flags, ifindex, d, handle, info),
    )?;
    receive(&fd, |_| {})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back() {
        let r = Record {
            ifindex: 7,
            direction: Direction::Egress,
            priority: PRIORITY,
            handle: HANDLE,
            netns: None,
        };
        assert_eq!(r.target(), "netlink:7:egress:25:0x25");
        assert_eq!(Record::parse(&r.target()), Some(r));
        let r = Record {
            netns: Some(4026531840),
            ..r
        };
        assert_eq!(r.target(), "netlink:7:egress:25:0x25:net=4026531840");
        assert_eq!(Record::parse(&r.target()), Some(r));
        for bad in [
            "netlink:7:egress:25",
            "tcx:7:egress:25:0x25",
            "netlink:7:up:25:0x25",
            "netlink:7:egress:25:0x25:1",
            "netlink:7:egress:25:0x25:net=x",
            "netlink:7:egress:25:0x25:net=1:2",
        ] {
            assert_eq!(Record::parse(bad), None, "{bad}");
        }
    }
}
