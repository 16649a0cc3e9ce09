//! Loading the kernel programs against the pinned maps, and attaching them through pinned
//! links: fresh attach, adoption with an atomic program swap, and removal.

use std::{collections::BTreeSet, ffi::CString};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::MapInfo,
    programs::{
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
        Program, SchedClassifier, TcAttachType, Xdp,
    },
    Ebpf, EbpfLoader,
};

use crate::{
    bpf::{kept::Kept, pins::Pins},
    config::{Config, Direction, Hook, Interface, Limits, Target, XdpMode},
};
use port25_common::maps as m;

/// The kernel programs, built by build.rs and embedded.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/port25"));

pub const PROG_XDP: &str = "port25_xdp";
pub const PROG_TC: &str = "port25_tc";
pub const PROG_TC_RAW: &str = "port25_tc_raw";

/// The TC entry point for a device: the Ethernet one, or the raw one for a device whose
/// frames start at the IP header (tun, PPP).
fn tc_program(ethernet: bool) -> &'static str {
    if ethernet {
        PROG_TC
    } else {
        PROG_TC_RAW
    }
}

/// The offender-tracking programs the entry points tail-call for a blocked segment.
pub const PROG_TRACK_XDP: &str = "port25_track_xdp";
pub const PROG_TRACK_TC: &str = "port25_track_tc";
/// The kernel log's programs (`daemon --kernel-log`; `port25-ebpf/src/klog.rs`): the entry
/// points' logging copies and the programs that send their messages, loaded only with the
/// log on, in the private program arrays the entry points tail-call (map, index, program).
pub const KLOG_PROGRAMS: [(&str, u32, &str); 6] = [
    (KLOG_XDP, 0, "port25_klog_xdp"),
    (KLOG_XDP, 1, "port25_klog_emit_xdp"),
    (KLOG_TC, 0, "port25_klog_tc"),
    (KLOG_TC, 1, "port25_klog_tc_raw"),
    (KLOG_TC, 2, "port25_klog_emit_tc"),
    (KLOG_TC, 3, "port25_klog_emit_tc_raw"),
];
pub const KLOG_XDP: &str = "P25_KLOG_XDP";
pub const KLOG_TC: &str = "P25_KLOG_TC";

/// The map list's names and capacities, where they were before the list existed.
pub use crate::bpf::maps::{capacity, ALL_MAPS};

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct Layout {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {} key {}B value {}B max_entries {} flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// Each map's layout as the embedded object declares it, with the config's capacities.
pub fn expected_layouts(limits: &Limits) -> Result<Vec<(&'static str, Layout)>> {
    if EBPF_OBJECT.is_empty() {
        bail!("this port25-ctl was built with AYA_BUILD_SKIP and has no kernel programs");
    }
    let obj = aya_obj::Object::parse(EBPF_OBJECT).context("parsing the embedded eBPF object")?;
    ALL_MAPS
        .iter()
        .map(|name| {
            let map = obj
                .maps
                .get(*name)
                .ok_or_else(|| anyhow!("embedded object lacks map {name}"))?;
            Ok((
                *name,
                Layout {
                    map_type: map.map_type(),
                    key_size: map.key_size(),
                    value_size: map.value_size(),
                    max_entries: capacity(name, limits).unwrap_or(map.max_entries()),
                    flags: map.map_flags(),
                },
            ))
        })
        .collect()
}

fn pinned_layout(info: &MapInfo, raw_type: u32) -> Layout {
    Layout {
        map_type: raw_type,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    }
}

/// The pinned maps whose layout differs from the one this daemon would create:
/// (name, pinned path, layout pinned, layout wanted).
fn mismatches(
    pins: &Pins,
    limits: &Limits,
) -> Result<Vec<(&'static str, std::path::PathBuf, Layout, Layout)>> {
    let mut out = Vec::new();
    for (name, want) in expected_layouts(limits)? {
        let path = pins.map(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path)
            .with_context(|| format!("reading pinned map {}", path.display()))?;
        let raw_type = info
            .map_type()
            .map(|t| t as u32)
            .map_err(|e| anyhow!("pinned map {}: {e}", path.display()))?;
        let have = pinned_layout(&info, raw_type);
        if have != want {
            out.push((name, path, have, want));
        }
    }
    Ok(out)
}

/// The layout version the pinned settings record claims: its first field, read as raw bytes
/// so that a record of any size (any version) gives it. `None`: no settings pinned, a
/// record never written (0, a fresh map), or a settings map that is not a one-record array
/// (as every version has pinned): those claim nothing, and their shape mismatch is migrated.
pub fn pinned_layout_version(pins: &Pins) -> Result<Option<u32>> {
    let path = pins.map(m::SETTINGS);
    if !path.exists() {
        return Ok(None);
    }
    let what = || format!("reading the pinned settings {}", path.display());
    let info = MapInfo::from_pin(&path).with_context(what)?;
    // Another map type has no element 0 to read with a 4-byte key, and a per-CPU array
    // would copy one value per CPU into a buffer sized for one.
    let array = aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY as u32;
    if info.map_type().map(|t| t as u32).ok() != Some(array)
        || info.key_size() != 4
        || info.value_size() < 4
    {
        return Ok(None);
    }
    let map = aya::maps::MapData::from_pin(&path).with_context(what)?;
    let value = crate::bpf::sys::lookup_raw(&map, &0u32.to_ne_bytes(), info.value_size() as usize)
        .with_context(what)?;
    let version = value
        .get(..4)
        .map(|b| u32::from_ne_bytes(b.try_into().unwrap()))
        .ok_or_else(|| anyhow!("{}: a settings record shorter than its version", what()))?;
    Ok((version != 0).then_some(version))
}

/// Refuses a pin tree written by a newer port25 (a rollback meeting an upgrade's maps): this
/// version can neither reuse maps it does not understand nor migrate them safely, so it
/// changes nothing.
pub fn refuse_newer_layout(pins: &Pins) -> Result<()> {
    match pinned_layout_version(pins)? {
        Some(v) if v > m::LAYOUT_VERSION => bail!(
            "the maps pinned in {} have layout version {v}, newer than this port25-ctl's {}: \
             refusing to reuse or replace them. Run the newer port25-ctl, or detach with it \
             first",
            pins.maps_dir().display(),
            m::LAYOUT_VERSION
        ),
        _ => Ok(()),
    }
}

/// The pinned maps whose layout differs from the one this daemon would create, described;
/// Err for a pin tree of a newer layout version, which is never migrated.
pub fn layout_changes(pins: &Pins, limits: &Limits) -> Result<Vec<String>> {
    refuse_newer_layout(pins)?;
    let mut changes: Vec<String> = mismatches(pins, limits)?
        .into_iter()
        .map(|(name, _, have, want)| format!("{name}: {have} -> {want}"))
        .collect();
    // An older version's maps are migrated even when their shapes happen to match: their
    // meaning changed.
    if let Some(v) = pinned_layout_version(pins)?.filter(|v| *v < m::LAYOUT_VERSION) {
        changes.push(format!("layout version {v} -> {}", m::LAYOUT_VERSION));
    }
    changes.extend(filter_missing(pins));
    changes.extend(unfinished_migration(pins)?);
    Ok(changes)
}

/// Staged maps left behind: a migration died before its commit ended (it removes the
/// staging directory last). Died halfway through the commit, it left a tree of old and new
/// maps whose shapes may all match, and the attached (staged) program reads the new ones
/// only: reused, the filter pinned there could be the old one, and the bits of the keys a
/// start writes would not be in the filter that program reads. Made again from the start.
fn unfinished_migration(pins: &Pins) -> Result<Option<String>> {
    let dir = pins.staging().maps_dir();
    let left = match std::fs::read_dir(&dir) {
        Ok(mut d) => d.next().is_some(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    Ok(left.then(|| format!("an unfinished migration left maps in {}", dir.display())))
}

/// The exempt filter not pinned beside pinned exempt hashes (its pin removed, a tree pieced
/// together). A filter created there would be another map than the one the attached
/// program reads: that one is ready and lacks the bits of every key written next, so until
/// each link swapped (for good where a swap fails) the program would skip a blocked
/// session's new entry and pass its address to a wider allow. Such a tree is migrated: new
/// maps filled beside, while the attached program keeps its own, consistent ones.
fn filter_missing(pins: &Pins) -> Option<String> {
    // Every map whose entries need bits (the ranges' bits only ever enforce).
    let hashes = [m::EXIP4, m::EXIP6, m::EXNET6, m::MAIL4, m::EXPFX4];
    (!pins.map(m::EXBITS).exists() && hashes.iter().any(|h| pins.map(h).exists())).then(|| {
        format!(
            "{}: not pinned beside the exempt hashes (the attached program's is out of reach)",
            m::EXBITS
        )
    })
}

/// Starts a map migration: fresh maps, pinned in the staging directory (a stale one, left
/// by a migration that died, is discarded first). The caller fills them, swaps every link's
/// program to the returned one, then calls [`commit_staged_maps`].
pub fn load_staged(cfg: &Config, pins: &Pins, opts: LoadOptions) -> Result<Ebpf> {
    create_staged(cfg, pins, opts)?.verify_all()
}

/// [`load_staged`]'s first half: the staged maps exist and are pinned when it returns.
pub fn create_staged(cfg: &Config, pins: &Pins, opts: LoadOptions) -> Result<Unverified> {
    let staging = pins.staging();
    discard_staging(pins)?;
    create_with(cfg, &staging, opts)
}

fn discard_staging(pins: &Pins) -> Result<()> {
    let dir = pins.staging().maps_dir();
    if dir.exists() {
        for e in std::fs::read_dir(&dir)? {
            std::fs::remove_file(e?.path())?;
        }
        std::fs::remove_dir(&dir)?;
    }
    Ok(())
}

/// Ends a migration: the staged maps' pins replace the old ones (each rename is atomic; a
/// crash halfway leaves a mismatch that the next start migrates again). The settings record
/// moves last: it carries the layout version, so until every other map has moved the old
/// version stays pinned and a change of version alone is still seen as one.
pub fn commit_staged_maps(pins: &Pins) -> Result<()> {
    let staging = pins.staging();
    let others = ALL_MAPS.iter().filter(|n| **n != m::SETTINGS);
    for name in others.chain([&m::SETTINGS]) {
        std::fs::rename(staging.map(name), pins.map(name))
            .with_context(|| format!("moving the new {name} into place"))?;
    }
    discard_staging(pins)
}

/// Refuses pinned maps whose layout is not the one this daemon would create.
pub fn check_pinned_layouts(pins: &Pins, limits: &Limits) -> Result<()> {
    refuse_newer_layout(pins)?;
    if let Some(what) = filter_missing(pins) {
        bail!(
            "{what} in {}: refusing to create one there. Restart the daemon: at start it \
             moves to new maps with no moment in which port 25 is open",
            pins.maps_dir().display()
        );
    }
    if let Some((_, path, have, want)) = mismatches(pins, limits)?.into_iter().next() {
        let only_capacity = have.max_entries != want.max_entries
            && (Layout {
                max_entries: want.max_entries,
                ..have
            }) == want;
        let hint = if only_capacity {
            " (the config's `limits` changed; capacities of pinned maps cannot change in place)"
        } else {
            ""
        };
        bail!(
            "pinned map {} has {have}, this port25-ctl expects {want}{hint}: refusing to reuse it. \
             Restart the daemon: at start it moves to new maps with no moment in which \
             port 25 is open",
            path.display()
        );
    }
    Ok(())
}

/// What is fixed in the programs at load time, before the verifier sees them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// `daemon --kernel-log`: the programs send debug messages (aya-log) for decisions on
    /// blocked ports and for doubts. Off, the verifier prunes that code as dead.
    pub kernel_log: bool,
}

/// The kernel's switch for its debug messages (`port25-ebpf/src/klog.rs`): a `u8` in a
/// section of its own, which becomes a frozen read-only array map of this name.
pub const KERNEL_LOG_SYMBOL: &str = "PORT25_KERNEL_LOG";
pub const KERNEL_LOG_MAP: &str = ".rodata.p25klog";

/// Loads the programs; maps are reused from pins when present, created and pinned otherwise.
pub fn load(cfg: &Config, pins: &Pins) -> Result<Ebpf> {
    load_with(cfg, pins, LoadOptions::default())
}

/// [`load`], with the load-time switches.
pub fn load_with(cfg: &Config, pins: &Pins, opts: LoadOptions) -> Result<Ebpf> {
    create_with(cfg, pins, opts)?.verify_all()
}

/// The object with its maps created (or taken from their pins) and pinned, and its programs
/// not yet given to the verifier. Verifying is most of a load's time (about a second of
/// kernel CPU for the three entry points): a start reads or fills the maps meanwhile, on
/// the other core. Nothing can be attached from here; [`Unverified::verify`] gives the
/// [`Ebpf`] that can.
pub struct Unverified {
    ebpf: Ebpf,
    opts: LoadOptions,
    /// The entry points the config's interfaces attach ([`entry_points`]).
    entries: Vec<&'static str>,
    /// The programs an earlier start of this build verified ([`Kept`]); none with the
    /// kernel log.
    kept: Option<Kept>,
}

impl Unverified {
    /// Verifies and loads the entry points the config's interfaces attach, and the programs
    /// they tail-call. Each entry point is most of a start's verifier time (the XDP one: 798k
    /// instructions and about 1 s of CPU on Linux 6.18 here, 455k on 6.1; many times that on a
    /// small router's CPU), and most routers use one hook. Another one is verified when an
    /// interface first needs it (a config reload, a device a glob matches).
    pub fn verify(self) -> Result<Ebpf> {
        let entries = self.entries.clone();
        self.verify_entries(&entries)
    }

    /// As [`Unverified::verify`], with every entry point: what [`load_with`] returns (its
    /// callers run any of them, attached or not).
    pub fn verify_all(self) -> Result<Ebpf> {
        self.verify_entries(&[PROG_XDP, PROG_TC, PROG_TC_RAW])
    }

    fn verify_entries(mut self, entries: &[&str]) -> Result<Ebpf> {
        let ebpf = &mut self.ebpf;
        let kept = self.kept.as_ref();
        for p in entries {
            verified(ebpf, p, kept)?;
        }
        set_tracking_programs(ebpf, kept)?;
        if self.opts.kernel_log {
            set_klog_programs(ebpf)?;
        }
        if let Some(k) = kept {
            k.prune();
        }
        Ok(self.ebpf)
    }
}

/// [`load_with`]'s first half: the maps exist and are pinned when it returns.
pub fn create_with(cfg: &Config, pins: &Pins, opts: LoadOptions) -> Result<Unverified> {
    pins.prepare()?;
    check_pinned_layouts(pins, &cfg.limits)?;
    let paths: Vec<_> = ALL_MAPS.iter().map(|n| (*n, pins.map(n))).collect();
    let mut loader = EbpfLoader::new();
    let kept = if opts.kernel_log {
        None
    } else {
        Kept::open(pins)
            .inspect_err(|e| {
                tracing::warn!("every program is verified afresh at each start: {e:#}")
            })
            .ok()
    };
    if let Some(k) = &kept {
        loader.map_pin_path(crate::bpf::kept::TRACK_SCRATCH, k.scratch());
    }
    let kernel_log = u8::from(opts.kernel_log);
    // Must exist: a program without the switch would silently ignore --kernel-log.
    loader.override_global(KERNEL_LOG_SYMBOL, &kernel_log, true);
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
        if let Some(cap) = capacity(name, &cfg.limits) {
            loader.map_max_entries(name, cap);
        }
    }
    let ebpf = loader
        .load(EBPF_OBJECT)
        .context("loading the eBPF object")?;
    Ok(Unverified {
        ebpf,
        opts,
        entries: entry_points(cfg),
        kept,
    })
}

/// Verifies the entry points `cfg`'s interfaces attach that are not verified yet. A reload
/// calls it before it touches any link: a program the kernel refuses refuses the reload,
/// with every attachment as it was.
pub fn verify_entry_points(ebpf: &mut Ebpf, cfg: &Config) -> Result<()> {
    for p in entry_points(cfg) {
        loaded_entry(ebpf, p)?;
    }
    Ok(())
}

fn loaded_entry(ebpf: &mut Ebpf, name: &str) -> Result<()> {
    if name == PROG_XDP {
        loaded_xdp(ebpf)?;
    } else {
        loaded_tc(ebpf, name)?;
    }
    Ok(())
}

/// The entry points `cfg`'s interfaces attach: XDP for `hook: xdp`; for `hook: tc`, the one
/// its device's link type takes (Ethernet or raw), or both for a glob or a device not
/// there yet.
pub fn entry_points(cfg: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    for iface in &cfg.interfaces {
        let wanted = match iface.hook {
            Hook::Xdp => vec![PROG_XDP],
            Hook::Tc if iface.is_glob() => vec![PROG_TC, PROG_TC_RAW],
            Hook::Tc => match link_is_ethernet(&iface.name) {
                Ok(ethernet) => vec![tc_program(ethernet)],
                Err(_) => vec![PROG_TC, PROG_TC_RAW],
            },
        };
        for p in wanted {
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// Loads the kernel log's programs into its program arrays. Without them the entry points'
/// tail call fails and they decide without the log; so they must all be in place before an
/// entry point is attached.
fn set_klog_programs(ebpf: &mut Ebpf) -> Result<()> {
    for (map, index, name) in KLOG_PROGRAMS {
        let prog = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("no program {name}"))?;
        let fd = match prog {
            aya::programs::Program::Xdp(p) => {
                p.load()
                    .with_context(|| format!("verifying the kernel log program {name}"))?;
                p.fd()?.try_clone()?
            }
            aya::programs::Program::SchedClassifier(p) => {
                p.load()
                    .with_context(|| format!("verifying the kernel log program {name}"))?;
                p.fd()?.try_clone()?
            }
            _ => bail!("{name}: neither XDP nor TC"),
        };
        let mut arr: aya::maps::ProgramArray<_> = ebpf
            .map_mut(map)
            .ok_or_else(|| anyhow!("no map {map}"))?
            .try_into()?;
        arr.set(index, &fd, 0)
            .with_context(|| format!("setting {name} in {map}"))?;
    }
    Ok(())
}

/// Loads the tracking programs into the (pinned) program arrays the entry points tail-call.
/// Until this, a pinned array may still hold an earlier load's program: it finds this
/// load's scratch empty and drops (see `port25-ebpf/src/track.rs`).
fn set_tracking_programs(ebpf: &mut Ebpf, kept: Option<&Kept>) -> Result<()> {
    verified(ebpf, PROG_TRACK_XDP, kept).context("the XDP tracking program")?;
    verified(ebpf, PROG_TRACK_TC, kept).context("the TC tracking program")?;
    let xdp_fd = program_xdp_named(ebpf, PROG_TRACK_XDP)?.fd()?.try_clone()?;
    let tc_fd = program_tc(ebpf, PROG_TRACK_TC)?.fd()?.try_clone()?;
    for (map, fd) in [(m::TRACK_XDP, &xdp_fd), (m::TRACK_TC, &tc_fd)] {
        let mut arr: aya::maps::ProgramArray<_> = ebpf
            .map_mut(map)
            .ok_or_else(|| anyhow!("no map {map}"))?
            .try_into()?;
        arr.set(0, fd, 0)
            .with_context(|| format!("setting the tracking program in {map}"))?;
    }
    Ok(())
}

/// Verifies program `name` (an entry point or a tracking program), unless it is loaded
/// already, or takes the one an earlier start of this build kept, if still fit to use
/// ([`Kept::take`]). One it verifies is kept for the next start.
fn verified(ebpf: &mut Ebpf, name: &str, kept: Option<&Kept>) -> Result<()> {
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("no program {name}"))?;
    let (xdp, loaded) = match prog {
        Program::Xdp(p) => (true, p.fd().is_ok()),
        Program::SchedClassifier(p) => (false, p.fd().is_ok()),
        _ => bail!("{name}: neither XDP nor TC"),
    };
    if loaded {
        return Ok(());
    }
    // Wherever it would be verified: a kept program stands for a verified one.
    crate::control::testing::failpoint_refuse(name)?;
    if let Some(p) = kept.and_then(|k| k.take(name, xdp)) {
        *prog = p;
        tracing::debug!(
            program = name,
            "reusing the program this build verified at an earlier start"
        );
        return Ok(());
    }
    match prog {
        Program::Xdp(p) => p.load(),
        Program::SchedClassifier(p) => p.load(),
        _ => unreachable!("matched above"),
    }
    .with_context(|| format!("verifying {name}"))?;
    if let Some(k) = kept {
        k.keep(name, |path| {
            match prog {
                Program::Xdp(p) => p.pin(path),
                Program::SchedClassifier(p) => p.pin(path),
                _ => unreachable!("matched above"),
            }
            .map_err(Into::into)
        });
    }
    Ok(())
}

fn program_xdp_named<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    Ok(ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("no program {name}"))?
        .try_into()?)
}

fn program_xdp(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    Ok(ebpf
        .program_mut(PROG_XDP)
        .ok_or_else(|| anyhow!("no program {PROG_XDP}"))?
        .try_into()?)
}

/// The XDP entry point, verified first if it is not yet ([`Unverified::verify`]).
fn loaded_xdp(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    let prog = program_xdp(ebpf)?;
    if prog.fd().is_err() {
        crate::control::testing::failpoint_refuse(PROG_XDP)?;
        prog.load().context("verifying the XDP program")?;
    }
    Ok(prog)
}

/// A TC entry point, verified first if it is not yet.
fn loaded_tc<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    let prog = program_tc(ebpf, name)?;
    if prog.fd().is_err() {
        crate::control::testing::failpoint_refuse(name)?;
        prog.load()
            .with_context(|| format!("verifying the TC program {name}"))?;
    }
    Ok(prog)
}

fn program_tc<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    Ok(ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("no program {name}"))?
        .try_into()?)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// A new link, now pinned.
    New,
    /// A pinned link found and its program swapped atomically.
    Swapped,
    /// The pinned link was dead (its interface was deleted, perhaps re-created under the same
    /// name): it was unpinned and a new link attached and pinned in its place.
    Replaced,
}

/// How an attach point is attached, as `status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attachment {
    /// `xdp` or `tcx` (a pinned bpf_link), or `netlink` (a recorded TC filter).
    pub kind: &'static str,
    pub link_id: Option<u32>,
    pub prog_id: Option<u32>,
    /// netlink only: the filter's priority and handle.
    pub priority: Option<u16>,
    pub handle: Option<u32>,
}

/// What is attached at the interface's attach point, and why it does not enforce there
/// (None when it does).
pub fn inspect(pins: &Pins, iface: &Interface) -> (Option<Attachment>, Option<String>) {
    let path = pins.link(&iface.attach_point());
    if let Some(rec) = crate::bpf::tc::read_record(&path) {
        let filter = crate::bpf::tc::find(&rec).ok().flatten();
        let a = Attachment {
            kind: "netlink",
            link_id: None,
            prog_id: filter.and_then(|f| f.prog_id),
            priority: Some(rec.priority),
            handle: Some(rec.handle),
        };
        return (Some(a), crate::bpf::tc::problem(&rec, &iface.name));
    }
    // Any other symlink is garbage, never followed: it could lead to a link that is not ours.
    if let Ok(target) = std::fs::read_link(&path) {
        return (
            None,
            Some(format!(
                "a symlink to {} is at the link path, neither a pinned link nor a netlink record",
                target.display()
            )),
        );
    }
    let info = match crate::bpf::linkinfo::read(&path) {
        Ok(i) => i,
        Err(_) => return (None, Some("no pinned link".into())),
    };
    let a = Attachment {
        kind: if iface.hook == Hook::Xdp {
            "xdp"
        } else {
            "tcx"
        },
        link_id: Some(info.link_id),
        prog_id: Some(info.prog_id),
        ..Default::default()
    };
    let want = crate::bpf::linkinfo::ifindex(&iface.name);
    let problem = if want == 0 {
        Some("interface not found in this network namespace".into())
    } else if info.ifindex == 0 {
        Some(format!(
            "the pinned link is defunct (its interface went away); {} is now ifindex {want}",
            iface.name
        ))
    } else if info.ifindex != want {
        Some(format!(
            "link is on ifindex {} but {} is ifindex {want}",
            info.ifindex, iface.name
        ))
    } else {
        None
    };
    (Some(a), problem)
}

/// Why the attachment does not enforce on the interface the config names, or is not of
/// the kind the config asks for; None when all is well.
pub fn link_problem(pins: &Pins, iface: &Interface) -> Option<String> {
    let (a, problem) = inspect(pins, iface);
    if problem.is_some() || iface.hook != Hook::Tc {
        return problem;
    }
    let have_netlink = a.is_some_and(|a| a.kind == "netlink");
    match crate::bpf::tc::uses_netlink(iface) {
        Ok(want) if want != have_netlink => Some(format!(
            "attached through {}, the config asks for {}",
            if have_netlink { "netlink" } else { "tcx" },
            if want { "netlink" } else { "tcx" }
        )),
        Ok(_) => None,
        Err(e) => Some(format!("{e:#}")),
    }
}

/// What can be known before attaching: the interface exists here and suits the hook.
pub fn preflight(iface: &Interface) -> Result<()> {
    let ethernet = link_is_ethernet(&iface.name)?;
    if iface.hook == Hook::Xdp && !ethernet {
        bail!("{}: XDP needs an Ethernet device; use hook: tc", iface.name);
    }
    Ok(())
}

/// Unpins one attach point's link (detaching it unless something else holds it); for a
/// netlink record, deletes port25's filter first, then the record.
pub fn unpin(pins: &Pins, point: &str) -> Result<()> {
    let path = pins.link(point);
    if let Some(rec) = crate::bpf::tc::read_record(&path) {
        if let Err(e) = crate::bpf::tc::detach(&rec) {
            // A filter goes with its device: a record whose ifindex is gone from this
            // namespace has nothing left to delete (a glob device that went away).
            let here = rec.netns.is_none() || rec.netns == crate::bpf::tc::current_netns();
            let gone = here && crate::bpf::linkinfo::ifname(rec.ifindex).is_none();
            if !gone {
                return Err(e.context(format!("detaching {point}")));
            }
        }
    }
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("unpinning link {point}"))
        }
        _ => Ok(()),
    }
}

/// Attaches to one interface, adopting a pinned link if it is alive and on that interface,
/// replacing it otherwise (a swap into a dead link would "succeed" and enforce nothing).
pub fn attach(ebpf: &mut Ebpf, pins: &Pins, iface: &Interface) -> Result<Attached> {
    let point = iface.attach_point();
    let path = pins.link(&point);
    preflight(iface)?;
    let netlink = iface.hook == Hook::Tc && crate::bpf::tc::uses_netlink(iface)?;
    if netlink {
        return attach_netlink(ebpf, &path, iface);
    }
    // A netlink filter recorded here (the kind changed): it keeps enforcing until the new
    // link is pinned, then goes.
    let old_filter = crate::bpf::tc::read_record(&path);
    if old_filter.is_some() {
        std::fs::remove_file(&path).with_context(|| format!("moving {point} off netlink"))?;
    }
    let outcome = retry_while_released(|| attach_link(ebpf, pins, iface));
    if let (Some(rec), Err(_)) = (old_filter, &outcome) {
        crate::bpf::tc::write_record(&path, &rec)?;
    }
    let outcome = outcome?;
    if iface.hook == Hook::Tc {
        // port25's filter at its place goes once the link is in place: the recorded one, and
        // one whose record a crash lost between the two steps.
        // (A device already gone has no filter left: listing ifindex 0 would walk them all.)
        let ifindex = crate::bpf::linkinfo::ifindex(&iface.name);
        let here = (ifindex != 0).then(|| crate::bpf::tc::Record::ours(ifindex, iface.direction));
        for rec in old_filter.into_iter().chain(here) {
            if let Err(e) = crate::bpf::tc::detach(&rec) {
                tracing::warn!(%point, "removing port25's netlink filter after moving to tcx: {e:#}");
            }
        }
    }
    Ok(match (old_filter, outcome) {
        (Some(_), _) => Attached::Replaced,
        (None, how) => how,
    })
}

/// The kernel frees a link whose last pin went (a glob device's release, a lost pin)
/// asynchronously, after an RCU grace period: until then a new tcx attach of the same
/// program is EEXIST and a new XDP link EBUSY. A short wait, bounded, rather than a device
/// left open until the next reconcile.
fn retry_while_released(mut f: impl FnMut() -> Result<Attached>) -> Result<Attached> {
    let t0 = std::time::Instant::now();
    loop {
        match f() {
            Err(e) if t0.elapsed() < std::time::Duration::from_millis(300) && in_use(&e) => {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            r => return r,
        }
    }
}

fn in_use(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            .is_some_and(|n| n == libc::EEXIST || n == libc::EBUSY)
    })
}

/// TC through a netlink filter: ours is given the program in place when it is there.
fn attach_netlink(ebpf: &mut Ebpf, path: &std::path::Path, iface: &Interface) -> Result<Attached> {
    let name = tc_program(link_is_ethernet(&iface.name)?);
    let old = crate::bpf::tc::read_record(path);
    // A tcx link pinned here (the kind changed) is released by the record's rename, once
    // the filter is in place.
    let other_kind = old.is_none() && crate::bpf::tc::occupied(path);
    let (rec, swapped) = crate::bpf::tc::attach(loaded_tc(ebpf, name)?, iface)?;
    crate::bpf::tc::write_record(path, &rec)?;
    Ok(if swapped {
        Attached::Swapped
    } else if other_kind || old.is_some() {
        Attached::Replaced
    } else {
        Attached::New
    })
}

/// XDP, or TC through tcx: a pinned bpf_link.
fn attach_link(ebpf: &mut Ebpf, pins: &Pins, iface: &Interface) -> Result<Attached> {
    let point = iface.attach_point();
    let path = pins.link(&point);
    let ethernet = link_is_ethernet(&iface.name)?;
    // The program is verified before any pinned link is touched: a refusal leaves what
    // enforces there now in place.
    match iface.hook {
        Hook::Xdp if ethernet => loaded_entry(ebpf, PROG_XDP)?,
        Hook::Xdp => {}
        Hook::Tc => loaded_entry(ebpf, tc_program(ethernet))?,
    }
    let mut replaced = false;
    // Not `exists()`, which follows a symlink (a netlink record, or garbage) to nothing.
    let pinned = if crate::bpf::tc::occupied(&path) {
        if let Some(problem) = link_problem(pins, iface) {
            tracing::warn!(%point, %problem, "replacing the pinned link");
            unpin(pins, &point)?;
            replaced = true;
            None
        } else {
            let link = PinnedLink::from_pin(&path)
                .with_context(|| format!("opening pinned link {}", path.display()))?;
            Some(FdLink::from(link))
        }
    } else {
        None
    };
    let outcome = match iface.hook {
        Hook::Xdp => {
            if !ethernet {
                bail!("{}: XDP needs an Ethernet device; use hook: tc", iface.name);
            }
            let prog = loaded_xdp(ebpf)?;
            match pinned {
                Some(fd) => {
                    let link = XdpLink::try_from(fd)
                        .map_err(|e| anyhow!("{} is not an XDP link: {e}", path.display()))?;
                    let id = prog
                        .attach_to_link(link)
                        .context("swapping the XDP program")?;
                    drop(prog.take_link(id)?);
                    Attached::Swapped
                }
                None => {
                    let flags = match iface.xdp_mode {
                        XdpMode::Native => aya::programs::xdp::XdpMode::Driver,
                        XdpMode::Generic => aya::programs::xdp::XdpMode::Skb,
                    };
                    let id = prog.attach(&iface.name, flags).with_context(|| {
                        format!("attaching XDP ({:?}) to {}", iface.xdp_mode, iface.name)
                    })?;
                    let link = prog.take_link(id)?;
                    let fd = FdLink::try_from(link).map_err(|_| {
                        anyhow!(
                            "{}: the kernel attached XDP through netlink (no bpf_link): it cannot \
                             be pinned and would stop with the daemon",
                            iface.name
                        )
                    })?;
                    fd.pin(&path)
                        .with_context(|| format!("pinning {}", path.display()))?;
                    if replaced {
                        Attached::Replaced
                    } else {
                        Attached::New
                    }
                }
            }
        }
        Hook::Tc => {
            let prog = loaded_tc(ebpf, tc_program(ethernet))?;
            match pinned {
                Some(fd) => {
                    let link = SchedClassifierLink::try_from(fd)
                        .map_err(|e| anyhow!("{} is not a TC link: {e}", path.display()))?;
                    let id = prog
                        .attach_to_link(link)
                        .context("swapping the TC program")?;
                    drop(prog.take_link(id)?);
                    Attached::Swapped
                }
                None => {
                    let ty = match iface.direction {
                        Direction::Ingress => TcAttachType::Ingress,
                        Direction::Egress => TcAttachType::Egress,
                    };
                    // tcx explicitly: aya's `attach` picks by kernel version alone.
                    let id = prog
                        .attach_with_options(
                            &iface.name,
                            ty,
                            aya::programs::tc::TcAttachOptions::TcxOrder(Default::default()),
                        )
                        .with_context(|| {
                            format!("attaching TC {} to {} (tcx)", iface.direction, iface.name)
                        })?;
                    let link = prog.take_link(id)?;
                    let fd = FdLink::try_from(link).map_err(|_| {
                        anyhow!(
                            "{}: this kernel has no tcx (Linux < 6.6), so the TC attachment is no \
                             bpf_link and cannot be pinned",
                            iface.name
                        )
                    })?;
                    fd.pin(&path)
                        .with_context(|| format!("pinning {}", path.display()))?;
                    if replaced {
                        Attached::Replaced
                    } else {
                        Attached::New
                    }
                }
            }
        }
    };
    Ok(outcome)
}

/// Unpins (and so detaches) the links of attach points the config no longer names, and
/// those of glob devices that are gone: `targets` is what the config asks on the devices
/// of this namespace ([`Config::targets`]).
pub fn detach_stale(pins: &Pins, targets: &[Target]) -> Result<Vec<String>> {
    let wanted: BTreeSet<String> = targets.iter().map(|t| t.iface.attach_point()).collect();
    let mut removed = Vec::new();
    for point in pins.pinned_links() {
        if !wanted.contains(&point) {
            unpin(pins, &point)?;
            removed.push(point);
        }
    }
    Ok(removed)
}

/// Removes every link (detaching the programs) and then every map pin.
pub fn detach_all(pins: &Pins) -> Result<Vec<String>> {
    let points = pins.pinned_links();
    for p in &points {
        unpin(pins, p)?;
    }
    pins.remove_tree()?;
    Ok(points)
}

/// ARPHRD_ETHER or not, asked of the current network namespace (sysfs may show another one).
pub fn link_is_ethernet(ifname: &str) -> Result<bool> {
    let name = CString::new(ifname).map_err(|_| anyhow!("bad interface name {ifname:?}"))?;
    if name.as_bytes().len() >= libc::IFNAMSIZ {
        bail!("interface name {ifname} is too long");
    }
    // SAFETY: plain ioctl on a socket we own, with a zeroed ifreq holding a NUL-terminated name.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("socket()");
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in name.as_bytes().iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        let rc = libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc < 0 {
            return Err(err).with_context(|| format!("interface {ifname}"));
        }
        Ok(req.ifr_ifru.ifru_hwaddr.sa_family == libc::ARPHRD_ETHER)
    }
}

/// Whether a loaded program was loaded with kernel debug messages on, read from its own
/// frozen switch (the map [`KERNEL_LOG_MAP`] it uses). `None`: the program cannot be read,
/// or has no switch (a port25 older than `--kernel-log`).
pub fn kernel_log_of(prog_id: u32) -> Option<bool> {
    let prog = aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .find(|p| p.id() == prog_id)?;
    for id in prog.map_ids().ok()??.into_iter() {
        let Ok(info) = MapInfo::from_id(id) else {
            continue;
        };
        // The kernel keeps 15 bytes of a map's name; the section name is exactly that long.
        if info.name_as_str() != Some(KERNEL_LOG_MAP) || info.value_size() < 1 {
            continue;
        }
        let map = aya::maps::MapData::from_id(id).ok()?;
        let value =
            crate::bpf::sys::lookup_raw(&map, &0u32.to_ne_bytes(), info.value_size() as usize)
                .ok()?;
        return Some(value.first().copied()? != 0);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The settings record carries the layout version a start compares; if it moved first, a
    /// crash halfway through the commit would leave the new version beside old maps, and a
    /// layout change that kept every map's shape would not be migrated again.
    #[test]
    fn a_commit_that_stops_halfway_leaves_the_old_settings_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let pins = Pins::new(dir.path());
        let staging = pins.staging();
        std::fs::create_dir_all(pins.maps_dir()).unwrap();
        std::fs::create_dir_all(staging.maps_dir()).unwrap();
        for name in ALL_MAPS {
            std::fs::write(pins.map(name), "old").unwrap();
        }
        // One staged map missing: the commit stops at it.
        for name in ALL_MAPS.iter().filter(|n| **n != m::COUNTERS) {
            std::fs::write(staging.map(name), "new").unwrap();
        }
        assert!(commit_staged_maps(&pins).is_err());
        assert_eq!(
            std::fs::read_to_string(pins.map(m::SETTINGS)).unwrap(),
            "old"
        );
    }

    /// Creates a map with raw bpf(2) and pins it at `path`.
    fn pin_map(path: &std::path::Path, map_type: u32, key: u32, value: u32) {
        use aya_obj::generated::{bpf_attr, bpf_cmd};
        use std::os::unix::ffi::OsStrExt as _;
        // SAFETY: bpf_attr is plain data; zeroed is its valid empty state.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        let a = unsafe { &mut attr.__bindgen_anon_1 };
        a.map_type = map_type;
        a.key_size = key;
        a.value_size = value;
        a.max_entries = 4;
        let fd = crate::bpf::sys::sys_bpf(bpf_cmd::BPF_MAP_CREATE, &mut attr).expect("map create");
        let name = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        attr.__bindgen_anon_4.pathname = name.as_ptr() as u64;
        attr.__bindgen_anon_4.bpf_fd = fd as u32;
        crate::bpf::sys::sys_bpf(bpf_cmd::BPF_OBJ_PIN, &mut attr).expect("pin");
        // SAFETY: fd is ours and no longer used.
        unsafe { libc::close(fd as i32) };
    }

    /// A pinned settings map of another shape (not the one-entry array of every release)
    /// claims no version: it is a layout mismatch, migrated like any other, as before the
    /// version was read. Reading it as a record would fail the start (a hash has no key 0)
    /// or, for a per-CPU array, write past the buffer.
    #[test]
    fn a_settings_map_of_another_shape_claims_no_version() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to pin maps");
            return;
        }
        let root = std::path::Path::new("/sys/fs/bpf").join(format!(
            "p25unit{}x{}",
            std::process::id(),
            line!()
        ));
        let pins = Pins::new(&root);
        std::fs::create_dir_all(pins.maps_dir()).unwrap();
        use aya_obj::generated::bpf_map_type as t;
        let shapes = [
            (t::BPF_MAP_TYPE_HASH as u32, 8, 24),
            (t::BPF_MAP_TYPE_PERCPU_ARRAY as u32, 4, 24),
            (t::BPF_MAP_TYPE_ARRAY as u32, 4, 2),
        ];
        let mut got = vec![];
        for (ty, k, v) in shapes {
            let _ = std::fs::remove_file(pins.map(m::SETTINGS));
            pin_map(&pins.map(m::SETTINGS), ty, k, v);
            got.push(pinned_layout_version(&pins).map_err(|e| format!("{e:#}")));
        }
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!(got, vec![Ok(None), Ok(None), Ok(None)]);
    }

    #[test]
    fn a_commit_moves_every_staged_map() {
        let dir = tempfile::tempdir().unwrap();
        let pins = Pins::new(dir.path());
        let staging = pins.staging();
        std::fs::create_dir_all(pins.maps_dir()).unwrap();
        std::fs::create_dir_all(staging.maps_dir()).unwrap();
        for name in ALL_MAPS {
            std::fs::write(pins.map(name), "old").unwrap();
            std::fs::write(staging.map(name), "new").unwrap();
        }
        commit_staged_maps(&pins).unwrap();
        for name in ALL_MAPS {
            assert_eq!(
                std::fs::read_to_string(pins.map(name)).unwrap(),
                "new",
                "{name}"
            );
        }
        assert!(!staging.maps_dir().exists());
    }
}
