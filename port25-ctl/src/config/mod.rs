//! The YAML config (`/etc/port25/port25.yaml`): strict schema, validated values, errors with
//! file, line and column. serde_yaml stays behind this module.

use std::{
    collections::BTreeSet,
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{de, Deserialize, Deserializer, Serialize};

use crate::net::Prefix;

mod fast;
mod metrics_listen;
mod socket_hint;
pub use metrics_listen::{MetricsListen, DEFAULT_METRICS_LISTEN};
mod abuse;
pub use abuse::Abuse;
mod registry;
pub use registry::{check_router, host_name, Registry};

pub const DEFAULT_CONFIG: &str = "/etc/port25/port25.yaml";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/port25";

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default = "default_ports")]
    pub blocked_ports: Vec<BlockedPort>,
    #[serde(default)]
    pub action: Action,
    #[serde(default)]
    pub subscriber_ranges: Vec<Prefix>,
    #[serde(default)]
    pub mail_servers: Vec<MailServer>,
    #[serde(default)]
    pub exempt: Vec<ExemptEntry>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Extension: where maps and links are pinned (one tree per daemon).
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// Extension: how often the daemon repairs drift between policy and maps.
    #[serde(default = "default_reconcile", with = "duration_str")]
    pub reconcile_interval: Duration,
    /// Extension: a group whose members may use the read-only verbs over the socket
    /// (`user show|list`, `audit`, `server|exempt list`); the socket becomes 0660 root:GROUP.
    #[serde(default)]
    pub read_group: Option<String>,
    /// Extension: where the daemon serves Prometheus metrics (`GET /metrics`), or `off`.
    #[serde(default)]
    pub metrics_listen: MetricsListen,
    /// Offender tracking, block events and the likely-infected rule (`top`).
    #[serde(default)]
    pub abuse: Abuse,
    /// A fleet's shared PostgreSQL registry; absent: the embedded SQLite registry alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<Registry>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, try_from = "RawInterface", into = "RawInterface")]
pub struct Interface {
    pub name: String,
    pub hook: Hook,
    pub xdp_mode: XdpMode,
    pub direction: Direction,
    /// Extension, hook: tc only: how the TC program is attached (tcx when the kernel has it).
    pub tc_attach: TcAttach,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawInterface {
    name: String,
    hook: Hook,
    #[serde(skip_serializing_if = "Option::is_none")]
    xdp_mode: Option<XdpMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    direction: Option<Direction>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tc_attach: Option<TcAttach>,
}

/// Written back as it is read: only the keys of its hook.
impl From<Interface> for RawInterface {
    fn from(i: Interface) -> RawInterface {
        RawInterface {
            xdp_mode: (i.hook == Hook::Xdp).then_some(i.xdp_mode),
            direction: (i.hook == Hook::Tc).then_some(i.direction),
            tc_attach: (i.hook == Hook::Tc && i.tc_attach != TcAttach::Auto).then_some(i.tc_attach),
            name: i.name,
            hook: i.hook,
        }
    }
}

impl TryFrom<RawInterface> for Interface {
    type Error = String;
    fn try_from(r: RawInterface) -> Result<Self, String> {
        if is_glob(&r.name) {
            check_glob(&r.name)?;
        } else if r.name.is_empty()
            || r.name.len() > 15
            || r.name.contains(['/', ':', ' ', '\t', '\n', '\0'])
        {
            return Err(format!("`{}` is not a valid interface name", r.name));
        }
        match r.hook {
            Hook::Xdp if r.direction.is_some() => Err(format!(
                "interface {}: `direction` is for hook: tc only (XDP sees ingress)",
                r.name
            )),
            Hook::Tc if r.xdp_mode.is_some() => Err(format!(
                "interface {}: `xdp_mode` is for hook: xdp only",
                r.name
            )),
            Hook::Xdp if r.tc_attach.is_some() => Err(format!(
                "interface {}: `tc_attach` is for hook: tc only",
                r.name
            )),
            _ => Ok(Interface {
                name: r.name,
                hook: r.hook,
                xdp_mode: r.xdp_mode.unwrap_or_default(),
                direction: r.direction.unwrap_or_default(),
                tc_attach: r.tc_attach.unwrap_or_default(),
            }),
        }
    }
}

/// A name with a glob metacharacter is a pattern over the devices of the namespace
/// (`ppp*`, `tun?`, `[ab]*`); any other name is one concrete device, as before globs.
pub fn is_glob(name: &str) -> bool {
    name.contains(['*', '?', '['])
}

/// Refuses a pattern the glob crate cannot read, and one that can never match a valid
/// interface name (a character Linux refuses in one, or more than 15 bytes at the least).
fn check_glob(name: &str) -> Result<(), String> {
    glob::Pattern::new(name)
        .map_err(|e| format!("interface pattern `{name}`: {} (at {})", e.msg, e.pos))?;
    if name.contains(['/', ':', ' ', '\t', '\n', '\0']) {
        return Err(format!(
            "interface pattern `{name}` can never match: interface names have no `/`, `:` or \
             whitespace"
        ));
    }
    let least = glob_min_len(name);
    if least > 15 {
        return Err(format!(
            "interface pattern `{name}` can never match: it needs at least {least} bytes, an \
             interface name has at most 15"
        ));
    }
    Ok(())
}

/// The fewest bytes a name matching the pattern has: `*` none, `?` and a `[...]` class one,
/// a literal its own length.
fn glob_min_len(p: &str) -> usize {
    let mut n = 0;
    let mut chars = p.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' => {}
            '?' => n += 1,
            '[' => {
                n += 1;
                // glob: `[!` negates, and a `]` right after the opening is a member.
                if chars.peek() == Some(&'!') {
                    chars.next();
                }
                if chars.peek() == Some(&']') {
                    chars.next();
                }
                for c in chars.by_ref() {
                    if c == ']' {
                        break;
                    }
                }
            }
            c => n += c.len_utf8(),
        }
    }
    n
}

impl Interface {
    /// A glob entry (see [`is_glob`]).
    pub fn is_glob(&self) -> bool {
        is_glob(&self.name)
    }

    /// Whether this entry names the device: equal for a concrete entry, matching for a glob.
    pub fn matches(&self, device: &str) -> bool {
        if self.is_glob() {
            // Checked when the config was read.
            glob::Pattern::new(&self.name).is_ok_and(|p| p.matches(device))
        } else {
            self.name == device
        }
    }

    /// The entry applied to one device: its hook and options, the device's name.
    pub fn for_device(&self, device: &str) -> Interface {
        Interface {
            name: device.to_owned(),
            ..self.clone()
        }
    }

    /// What two entries compete for on one device: `xdp`, `tc-ingress` or `tc-egress`.
    pub fn kind(&self) -> &'static str {
        match (self.hook, self.direction) {
            (Hook::Xdp, _) => "xdp",
            (Hook::Tc, Direction::Ingress) => "tc-ingress",
            (Hook::Tc, Direction::Egress) => "tc-egress",
        }
    }

    /// Name of the link pin, unique per attach point: `xdp:IF`, `tc-ingress:IF`, `tc-egress:IF`.
    /// bpffs refuses dots in names (EPERM), and VLAN devices have them (`eth1.100`), so `%` and
    /// `.` in the interface name are %-escaped; `:` cannot occur in an interface name.
    pub fn attach_point(&self) -> String {
        let name = self.name.replace('%', "%25").replace('.', "%2e");
        match self.hook {
            Hook::Xdp => format!("xdp:{name}"),
            Hook::Tc => format!("tc-{}:{name}", self.direction),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    Xdp,
    Tc,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    #[default]
    Native,
    Generic,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    #[default]
    Ingress,
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

/// How a `hook: tc` program is attached: `auto` probes the running kernel for tcx (never
/// its version: RHEL 9.4+ backports tcx onto 5.14) and falls back to a netlink clsact filter;
/// `tcx` and `netlink` force one (`netlink` lets a kernel with tcx test the fallback).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum TcAttach {
    #[default]
    Auto,
    Tcx,
    Netlink,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Drop,
    Reject,
}

/// A TCP destination port that may be blocked: never a submission port.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct BlockedPort(pub u16);

impl<'de> Deserialize<'de> for BlockedPort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let p = u64::deserialize(d)?;
        match p {
            587 | 465 => Err(de::Error::custom(format!(
                "port {p} is mail submission (RFC 5068 3.1, RFC 8314) and must never be blocked"
            ))),
            1..=65535 => Ok(BlockedPort(p as u16)),
            _ => Err(de::Error::custom(format!(
                "{p} is not a TCP port (1-65535)"
            ))),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExemptEntry {
    pub prefix: Prefix,
    #[serde(default)]
    pub note: Option<String>,
    #[serde(
        default,
        with = "timestamp_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub until: Option<jiff::Timestamp>,
    /// Allows a prefix wider than the `limits` floor (audited at start and reload).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

/// A `mail_servers` entry: a prefix, or `{prefix: P, force: true}` for one wider than the
/// `limits` floor (audited at start and reload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MailServer {
    pub prefix: Prefix,
    pub force: bool,
}

impl<'de> Deserialize<'de> for MailServer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Full {
            prefix: Prefix,
            #[serde(default)]
            force: bool,
        }
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = MailServer;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a prefix, or a mapping with `prefix` and `force`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MailServer, E> {
                Ok(MailServer {
                    prefix: v.parse().map_err(E::custom)?,
                    force: false,
                })
            }
            fn visit_map<A: de::MapAccess<'de>>(self, m: A) -> Result<MailServer, A::Error> {
                let f = Full::deserialize(de::value::MapAccessDeserializer::new(m))?;
                Ok(MailServer {
                    prefix: f.prefix,
                    force: f.force,
                })
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for MailServer {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.force {
            use serde::ser::SerializeMap;
            let mut m = s.serialize_map(Some(2))?;
            m.serialize_entry("prefix", &self.prefix)?;
            m.serialize_entry("force", &true)?;
            m.end()
        } else {
            self.prefix.serialize(s)
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub exempt_ips: u32,
    pub exempt_prefixes: u32,
    pub mail_servers: u32,
    pub subscriber_ranges: u32,
    /// Extension: per-session IPv6 prefixes (the hash probed by prefix length).
    pub session_prefixes: u32,
    /// Extension: the shortest IPv4 prefix accepted in an allow-list (`exempt`,
    /// `mail_servers`, `exempt add`, `server add`, `user bind`, `session up`) without an
    /// explicit, audited force. /0 is never accepted without it.
    pub min_prefix_v4: u8,
    /// Extension: as `min_prefix_v4`, for IPv6.
    pub min_prefix_v6: u8,
    /// `abuse.track_sources`, copied here at parse time so the map list sizes the offender
    /// map like every other capacity (written in the `abuse:` section, not under `limits`).
    #[serde(skip)]
    pub track_sources: u32,
}

impl Default for Limits {
    fn default() -> Self {
        use port25_common::maps::*;
        Limits {
            exempt_ips: DEFAULT_EXEMPT_IPS,
            exempt_prefixes: DEFAULT_EXEMPT_PREFIXES,
            mail_servers: DEFAULT_MAIL_SERVERS,
            subscriber_ranges: DEFAULT_SUBSCRIBER_RANGES,
            session_prefixes: DEFAULT_SESSION_PREFIXES,
            min_prefix_v4: 8,
            min_prefix_v6: 16,
            track_sources: DEFAULT_TRACK_SOURCES,
        }
    }
}

impl Limits {
    /// The floor `p` is shorter than, when it is: such an allow-list entry opens port 25 for
    /// a whole block of the Internet and needs an explicit force.
    pub fn too_wide(&self, p: &Prefix) -> Option<u8> {
        let floor = if p.addr.is_ipv4() {
            self.min_prefix_v4
        } else {
            self.min_prefix_v6
        };
        (p.len == 0 || p.len < floor).then_some(floor.max(1))
    }

    /// Refuses `p` when too wide and not forced: the error names the way out.
    pub fn check_wide(&self, what: &str, p: &Prefix, force: bool) -> Result<(), String> {
        match self.too_wide(p) {
            Some(floor) if !force => Err(format!(
                "{what} {p} is wider than /{floor} (limits.min_prefix_v{}): it would open port 25 \
                 for a large part of the Internet; force it explicitly if that is meant \
                 (--force-wide, or `force: true` in the config), which is audited",
                if p.addr.is_ipv4() { 4 } else { 6 }
            )),
            _ => Ok(()),
        }
    }
}

/// The last instant every store can hold exactly: registry times are i64 nanoseconds since
/// the epoch (2262-04-11T23:47:16.854775807Z). Later times would wrap to the past.
pub fn latest_storable() -> jiff::Timestamp {
    jiff::Timestamp::from_nanosecond(i64::MAX as i128).expect("in jiff's range")
}

/// Refuses an expiry that cannot be stored exactly.
pub fn check_storable(t: jiff::Timestamp) -> Result<(), String> {
    if t > latest_storable() {
        return Err(format!(
            "{t} is after {}, the latest time port25 can store (64-bit nanoseconds); \
             leave `until` out for no end",
            latest_storable()
        ));
    }
    Ok(())
}

fn default_ports() -> Vec<BlockedPort> {
    vec![BlockedPort(25)]
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/port25")
}
/// The control socket named by the config file at `path`, for client verbs: only the
/// top-level `socket:` is read, leniently, so a half-edited file (syntax errors, unknown
/// keys, bad values elsewhere) still finds the daemon. Unreadable or absent: the default.
pub fn socket_of(path: &Path) -> PathBuf {
    socket_named(path).unwrap_or_else(default_socket)
}

/// The `registry:` section of the config file at `path`, alone (a helpdesk host's config
/// may hold nothing else): for `--registry-only`.
pub fn registry_of(path: &Path) -> anyhow::Result<Registry> {
    use anyhow::Context as _;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_yaml::Value =
        serde_yaml::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let Some(r) = v.get("registry") else {
        anyhow::bail!(
            "{} has no `registry:` section (--registry-only needs one)",
            path.display()
        );
    };
    let r: Registry = serde_yaml::from_value(r.clone())
        .with_context(|| format!("{}: registry", path.display()))?;
    r.validate()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(r)
}

/// Configs up to this size are parsed whole by `status` and `check` (a few ms); bigger ones
/// (hundreds of thousands of entries) by the sections those verbs read.
const WHOLE_BELOW: usize = 1 << 20;

/// The `limits:` of the config file at `path` (the defaults when it has none): the floor a
/// `registry import` holds a file's allow-list prefixes to, as `exempt add` and `user bind`.
pub fn limits_of(path: &Path) -> anyhow::Result<Limits> {
    use anyhow::Context as _;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_yaml::Value =
        serde_yaml::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let l: Limits = match v.get("limits") {
        Some(l) => serde_yaml::from_value(l.clone())
            .with_context(|| format!("{}: limits", path.display()))?,
        None => Limits::default(),
    };
    anyhow::ensure!(
        (1..=32).contains(&l.min_prefix_v4) && (1..=128).contains(&l.min_prefix_v6),
        "{}: limits.min_prefix_v4 must be 1 to 32, limits.min_prefix_v6 1 to 128",
        path.display()
    );
    Ok(l)
}

/// The `socket:` the config file at `path` names, if it names one (see [`socket_of`]).
pub fn socket_named(path: &Path) -> Option<PathBuf> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path).ok()?;
    // Every client verb (a hook per session event) asks this, and YAML takes seconds over a
    // config with a million exempt entries: a line scan answers when it can tell the answer
    // is YAML's, and YAML decides the rest. A sure answer is kept on the file for the file
    // as it was read (see `socket_hint`).
    let before = socket_hint::identity(&f);
    if let Some(answer) = before.as_ref().and_then(|id| socket_hint::read(&f, id)) {
        return answer;
    }
    let mut text = String::new();
    f.read_to_string(&mut text).ok()?;
    let sure = match scan_socket(&text) {
        Scan::Found(p) => Some(Some(p)),
        Scan::Absent => Some(None),
        Scan::Unsure => None,
    };
    if let Some(answer) = sure {
        if let Some(id) = before.filter(|id| socket_hint::identity(&f).as_ref() == Some(id)) {
            socket_hint::write(&f, &id, answer.as_deref());
        }
        return answer;
    }
    if let Ok(serde_yaml::Value::Mapping(m)) = serde_yaml::from_str::<serde_yaml::Value>(&text) {
        return match m.get("socket") {
            Some(serde_yaml::Value::String(s)) if !s.is_empty() => Some(PathBuf::from(s)),
            _ => None,
        };
    }
    // Not YAML as a whole: the last top-level `socket:` line, as YAML would take it.
    text.lines()
        .rev()
        .filter_map(|l| l.strip_prefix("socket:"))
        .filter_map(|v| {
            let v = v.split(" #").next().unwrap_or_default().trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            (!v.is_empty()).then(|| PathBuf::from(v))
        })
        .next()
}

/// The top-level sections named `keep`, as YAML text, when a line scan can tell every
/// top-level key apart (the conditions of [`scan_socket`]); None when it cannot.
fn sections(text: &str, keep: &[&str]) -> Option<String> {
    let mut out = String::new();
    let mut keeping = false;
    let mut keyed = false;
    for line in text.lines() {
        if let Some((key, _)) = top_level_key(line, keyed)? {
            keyed = true;
            keeping = keep.contains(&key);
        }
        if keeping {
            out.push_str(line);
            out.push('\n');
        }
    }
    Some(out)
}

/// One line as a line scan of the top level reads it (`keyed`: a top-level key came
/// before): `Some(Some((key, value)))` a plain top-level `key:`, `Some(None)` a line that
/// opens no key (blank, comment, indented content, sequence item), `None` a form lines
/// cannot tell apart, which YAML must decide.
fn top_level_key(line: &str, keyed: bool) -> Option<Option<(&str, &str)>> {
    if !closes_what_it_opens(line) {
        return None;
    }
    match line.bytes().next() {
        // Indented content before any top-level key: a top level indented as a whole.
        Some(b' ' | b'\t') if !keyed && !blank_or_comment(line) => None,
        None | Some(b' ' | b'\t' | b'#' | b'-') => Some(None),
        Some(b'a'..=b'z' | b'A'..=b'Z' | b'_') => {
            let (key, value) = line.split_once(':')?;
            if !value.is_empty() && !value.starts_with([' ', '\t']) {
                return None;
            }
            // `key :` is YAML's `key`: lines cannot tell it from another key.
            if key.ends_with([' ', '\t']) {
                return None;
            }
            Some(Some((key, value)))
        }
        Some(_) => None,
    }
}

/// What a line scan can tell of the top-level `socket:`.
#[derive(Debug, PartialEq)]
enum Scan {
    Found(PathBuf),
    Absent,
    /// Something YAML would read otherwise than lines do: a flow collection or quoted
    /// scalar that may span lines, an unusual key or value.
    Unsure,
}

/// The top-level `socket:` of a block-style config, line by line. Sure only when every line
/// up to it closes what it opens (so no later line can be inside a flow collection or a
/// quoted scalar), every top-level line is a plain `key:` (or a sequence item, comment or
/// document marker), and the value is a path on one line: YAML reads the same then.
///
/// The scan stops at the first sure `socket:`: YAML (serde_yaml) refuses a top-level key
/// given twice, so in a file YAML reads no later line can name another socket, and a file
/// it refuses names none the daemon could have started with. Lines are found with memchr
/// and told apart by their first byte; only lines holding a bracket or quote are walked.
fn scan_socket(text: &str) -> Scan {
    let mut keyed = false;
    let mut lines = Lines(text).peekable();
    while let Some(line) = lines.next() {
        if !closes_what_it_opens(line) {
            return Scan::Unsure;
        }
        let Some(first) = line.bytes().next() else {
            continue;
        };
        match first {
            // Indented content before any top-level key: a top level indented as a whole.
            b' ' | b'\t' if !keyed && !blank_or_comment(line) => return Scan::Unsure,
            b' ' | b'\t' | b'#' | b'-' | b'.' | b'%' => continue,
            b'a'..=b'z' | b'A'..=b'Z' | b'_' => {}
            _ => return Scan::Unsure,
        }
        let Some((key, value)) = line.split_once(':') else {
            return Scan::Unsure;
        };
        if !value.is_empty() && !value.starts_with([' ', '\t']) {
            return Scan::Unsure;
        }
        // `socket :` is YAML's `socket`.
        if key.ends_with([' ', '\t']) {
            return Scan::Unsure;
        }
        keyed = true;
        if key != "socket" {
            continue;
        }
        // A plain scalar continued on the next, indented line.
        if lines.peek().is_some_and(|next| {
            next.starts_with([' ', '\t'])
                && !next.trim().is_empty()
                && !next.trim().starts_with('#')
        }) {
            return Scan::Unsure;
        }
        let v = value.trim();
        let v = match v.find(" #").or_else(|| v.find("\t#")) {
            Some(i) => v[..i].trim(),
            None => v,
        };
        let path = if let Some(q) = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
            (!q.contains(['"', '\\'])).then_some(q)
        } else if let Some(q) = v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
            (!q.contains('\'')).then_some(q)
        } else {
            // Null, numbers and YAML's other plain scalars are not paths: YAML decides.
            (v.starts_with('/') && !v.contains(['#', '\'', '"']) && !v.contains(": ")).then_some(v)
        };
        return match path {
            Some(p) if !p.is_empty() => Scan::Found(PathBuf::from(p)),
            _ => Scan::Unsure,
        };
    }
    Scan::Absent
}

/// The lines of a text as [`str::lines`] gives them (`\n` or `\r\n` ends one), found by
/// memchr: a config with a million entries is 35 MB.
struct Lines<'a>(&'a str);

impl<'a> Iterator for Lines<'a> {
    type Item = &'a str;
    fn next(&mut self) -> Option<&'a str> {
        if self.0.is_empty() {
            return None;
        }
        let (line, rest) = match memchr::memchr(b'\n', self.0.as_bytes()) {
            Some(i) => (&self.0[..i], &self.0[i + 1..]),
            None => (self.0, ""),
        };
        self.0 = rest;
        Some(line.strip_suffix('\r').unwrap_or(line))
    }
}

fn blank_or_comment(line: &str) -> bool {
    let t = line.trim_start();
    t.is_empty() || t.starts_with('#')
}

/// Whether `line` closes every flow bracket and quoted scalar it opens (a comment ends it),
/// and holds no line break YAML sees and `\n` lines do not.
///
/// One pass: ordinary bytes are skipped in a tight loop (the scan of a config with a million
/// exempt lines, `  - {prefix: 10.0.0.1/32}`, was most of a `status` call), and each byte
/// that may matter is looked at where it stands. The tests compare it with the two-pass
/// form it replaced.
fn closes_what_it_opens(line: &str) -> bool {
    let b = line.as_bytes();
    let (mut depth, mut i) = (0i32, 0);
    loop {
        while i < b.len() && CLASS[b[i] as usize] == 0 {
            i += 1;
        }
        if i == b.len() {
            return depth == 0;
        }
        match b[i] {
            b'"' => loop {
                i += 1;
                match b.get(i) {
                    None => return false,
                    // The escaped byte is skipped, but a line break is one anywhere.
                    Some(b'\\') => {
                        i += 1;
                        if i < b.len() && break_at(b, i) {
                            return false;
                        }
                    }
                    Some(b'"') => break,
                    Some(_) if break_at(b, i) => return false,
                    _ => {}
                }
            },
            // Only at the start of a scalar is `'` a quote (`it's` is plain text).
            b'\'' if i == 0 || matches!(b[i - 1], b' ' | b'\t' | b'[' | b'{' | b',' | b':') => {
                loop {
                    i += 1;
                    match b.get(i) {
                        None => return false,
                        Some(b'\'') if b.get(i + 1) == Some(&b'\'') => i += 1,
                        Some(b'\'') => break,
                        Some(_) if break_at(b, i) => return false,
                        _ => {}
                    }
                }
            }
            // A comment ends what YAML reads of the line, not what a line break splits.
            b'#' if i == 0 || matches!(b[i - 1], b' ' | b'\t') => {
                return depth == 0 && !(i..b.len()).any(|j| break_at(b, j));
            }
            b'[' | b'{' => depth += 1,
            b']' | b'}' => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ if break_at(b, i) => return false,
            _ => {}
        }
        i += 1;
    }
}

/// Whether a line break YAML (libyaml) knows inside what `\n` lines take for one line starts
/// at `i`: a bare CR, NEL, LS or PS. What follows it may be a key of its own. (In a `str`
/// the lead bytes of NEL and LS/PS only ever start a character.)
fn break_at(b: &[u8], i: usize) -> bool {
    match b[i] {
        b'\r' => true,
        0xc2 => b.get(i + 1) == Some(&0x85),
        0xe2 => b.get(i + 1) == Some(&0x80) && matches!(b.get(i + 2), Some(0xa8 | 0xa9)),
        _ => false,
    }
}

/// The bytes [`closes_what_it_opens`] stops at: brackets and quotes (which may open or close
/// something across lines), a comment's `#`, and the first bytes of CR, NEL, LS and PS.
const CLASS: [u8; 256] = {
    let mut t = [0; 256];
    let stops = b"[]{}\"'#\r\xc2\xe2";
    let mut i = 0;
    while i < stops.len() {
        t[stops[i] as usize] = 1;
        i += 1;
    }
    t
};

fn default_socket() -> PathBuf {
    PathBuf::from("/run/port25/ctl.sock")
}
fn default_pin_dir() -> PathBuf {
    PathBuf::from(DEFAULT_PIN_DIR)
}
fn default_reconcile() -> Duration {
    Duration::from_secs(60)
}

mod duration_str {
    use super::*;
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        let sd: jiff::SignedDuration = s.parse().map_err(|e| {
            de::Error::custom(format!("`{s}` is not a duration like 30s or 5m: {e}"))
        })?;
        let d = Duration::try_from(sd).map_err(|_| de::Error::custom("negative duration"))?;
        if d < Duration::from_secs(1) {
            return Err(de::Error::custom("the interval must be at least 1s"));
        }
        Ok(d)
    }
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{}s", d.as_secs()))
    }
}

mod timestamp_opt {
    use super::*;
    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<jiff::Timestamp>, D::Error> {
        let s = String::deserialize(d)?;
        let t = s.parse::<jiff::Timestamp>().map_err(|e| {
            de::Error::custom(format!(
                "`{s}` is not an RFC 3339 time such as 2026-12-31T00:00:00Z: {e}"
            ))
        })?;
        check_storable(t).map_err(de::Error::custom)?;
        Ok(Some(t))
    }
    pub fn serialize<S: serde::Serializer>(
        t: &Option<jiff::Timestamp>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.collect_str(t),
            None => s.serialize_none(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The cause prints once, as the source: every caller prints the chain (`{:#}`).
    #[error("{path}: cannot read")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {msg}")]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        msg: String,
    },
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
}

/// One attach point the daemon enforces: a concrete entry, or a glob entry applied to one
/// device of the namespace.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// The entry with the device's name (a concrete entry as it is).
    pub iface: Interface,
    /// The pattern of the glob entry it comes from.
    pub glob: Option<String>,
}

/// Turns an attach point's pin name back into its interface name (see
/// [`Interface::attach_point`]).
pub fn point_device(point: &str) -> Option<(&str, String)> {
    let (kind, name) = point.split_once(':')?;
    Some((kind, name.replace("%2e", ".").replace("%25", "%")))
}

impl Config {
    /// The entry that governs `device` at one attach kind (`xdp`, `tc-ingress`,
    /// `tc-egress`): the concrete entry naming it, else the first glob in file order that
    /// matches it.
    pub fn owner(&self, device: &str, kind: &str) -> Option<&Interface> {
        let mut of_kind = self.interfaces.iter().filter(|i| i.kind() == kind);
        of_kind
            .clone()
            .find(|i| !i.is_glob() && i.name == device)
            .or_else(|| of_kind.find(|i| i.is_glob() && i.matches(device)))
    }

    /// The entries that also match `device` at `kind` but lose to [`Config::owner`].
    pub fn shadowed(&self, device: &str, kind: &str) -> Vec<&Interface> {
        let owner = self.owner(device, kind);
        self.interfaces
            .iter()
            .filter(|i| i.kind() == kind && i.matches(device))
            .filter(|i| Some(*i) != owner)
            .collect()
    }

    /// What the config asks on one device: one target per attach kind an entry claims.
    pub fn targets_for(&self, device: &str) -> Vec<Target> {
        ["xdp", "tc-ingress", "tc-egress"]
            .into_iter()
            .filter_map(|k| self.owner(device, k))
            .map(|i| Target {
                iface: i.for_device(device),
                glob: i.is_glob().then(|| i.name.clone()),
            })
            .collect()
    }

    /// Every target: each concrete entry (whether its device exists or not), and each glob
    /// entry on each of `devices` it governs.
    pub fn targets(&self, devices: &[String]) -> Vec<Target> {
        let mut out: Vec<Target> = self
            .interfaces
            .iter()
            .filter(|i| !i.is_glob())
            .map(|i| Target {
                iface: i.clone(),
                glob: None,
            })
            .collect();
        if self.interfaces.iter().any(Interface::is_glob) {
            for d in devices {
                out.extend(self.targets_for(d).into_iter().filter(|t| t.glob.is_some()));
            }
        }
        out
    }

    /// The glob entry an attach point's pin belongs to, when a glob governs its device.
    pub fn glob_owner(&self, point: &str) -> Option<&Interface> {
        let (kind, device) = point_device(point)?;
        self.owner(&device, kind).filter(|i| i.is_glob())
    }

    /// A config file as the daemon runs it (start, reload) and the CLI reads it. Beyond
    /// [`Config::parse`], a file must name at least one interface: a truncated write by
    /// config management must never read as "defaults, no interfaces" and detach everything.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let cfg = Config::parse(&text, path)?;
        if cfg.interfaces.is_empty() {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                msg: "no interfaces: port25 would enforce nowhere (a truncated file?); \
                      `port25-ctl detach` removes enforcement on purpose"
                    .into(),
            });
        }
        Ok(cfg)
    }

    /// The policy in `text`. Interfaces may be absent here (kernel tests load the programs
    /// without attaching them); [`Config::load`] requires them.
    /// The config as `status` and `check` need it: interfaces, pin_dir, state_dir, socket.
    /// A million exempt entries take YAML seconds, and these verbs read them from the pins:
    /// in a file over [`WHOLE_BELOW`] whose top-level sections can be told apart line by
    /// line, only those four are parsed (errors elsewhere in such a file are the daemon's and
    /// `reload`'s to report); a smaller file is parsed whole, its errors reported.
    pub fn load_for_reading(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        // A file YAML parses in milliseconds is parsed whole: `status` is where an operator
        // looks, and reports there a config the next reload or start would refuse.
        if text.len() <= WHOLE_BELOW {
            return Config::load(path);
        }
        match sections(&text, &["interfaces", "pin_dir", "state_dir", "socket"]) {
            Some(small) if !small.trim().is_empty() => Config::parse(&small, path),
            _ => Config::load(path),
        }
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        Config::parse_with(text, path, true)
    }

    /// [`Config::parse`]; `fast`: with the plain `exempt:` list read by [`fast`] (the tests
    /// compare it with YAML's reading).
    fn parse_with(text: &str, path: &Path, fast: bool) -> Result<Config, ConfigError> {
        // serde_yaml reads a document without content (blank, comments, `---`) as unit.
        let blank = text
            .lines()
            .map(|l| l.split('#').next().unwrap_or_default().trim())
            .all(|l| l.is_empty() || l == "---" || l == "...");
        if blank {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                msg: "the config is empty (a truncated write?): refused".into(),
            });
        }
        // A plain `exempt:` list (a million entries) is read without YAML; the rest of the
        // file, with the same lines, by YAML.
        let split = if fast { fast::split_exempt(text) } else { None };
        let yaml = split.as_ref().map_or(text, |s| s.rest.as_str());
        let cfg: Config = serde_yaml::from_str(yaml).map_err(|e| match e.location() {
            Some(l) => {
                let msg = strip_location(&e.to_string());
                // serde_yaml points at the mapping that holds a duplicate key; the operator
                // needs the duplicate's own line.
                let (line, column) = duplicate_at(yaml, &msg, l.line(), l.column())
                    .or_else(|| top_level_value_at(yaml, &msg))
                    .unwrap_or((l.line(), l.column()));
                ConfigError::Syntax {
                    path: path.to_owned(),
                    line,
                    column,
                    msg,
                }
            }
            // Whole-file errors (several documents, ...) have no position: never print 0:0.
            None => ConfigError::Invalid {
                path: path.to_owned(),
                msg: e.to_string(),
            },
        })?;
        let mut cfg = cfg;
        if let Some(s) = split {
            cfg.exempt = s.exempt;
        }
        cfg.limits.track_sources = cfg.abuse.track_sources;
        cfg.validate().map_err(|msg| ConfigError::Invalid {
            path: path.to_owned(),
            msg,
        })?;
        Ok(cfg)
    }

    /// Rules that span several fields (so have no single line to point at).
    fn validate(&self) -> Result<(), String> {
        if let Some(r) = &self.registry {
            r.validate()?;
            // At every load (start, reload): a readable-by-others password is refused at
            // once, not at the first connection.
            r.password()?;
        }
        let mut points = BTreeSet::new();
        for i in &self.interfaces {
            if !points.insert(i.attach_point()) {
                return Err(format!(
                    "interface {} is listed twice for the same hook",
                    i.name
                ));
            }
        }
        if self.blocked_ports.is_empty() {
            return Err(
                "blocked_ports is empty: nothing would be blocked (leave it out for [25])".into(),
            );
        }
        let mut seen = BTreeSet::new();
        for p in &self.blocked_ports {
            if !seen.insert(p.0) {
                return Err(format!("blocked_ports lists {} twice", p.0));
            }
        }
        unique("subscriber_ranges", &self.subscriber_ranges)?;
        let mail: Vec<Prefix> = self.mail_servers.iter().map(|m| m.prefix).collect();
        unique("mail_servers", &mail)?;
        if !(1..=32).contains(&self.limits.min_prefix_v4) {
            return Err("limits.min_prefix_v4 must be 1 to 32".into());
        }
        if !(1..=128).contains(&self.limits.min_prefix_v6) {
            return Err("limits.min_prefix_v6 must be 1 to 128".into());
        }
        for m in &self.mail_servers {
            self.limits
                .check_wide("mail_servers:", &m.prefix, m.force)?;
        }
        for e in &self.exempt {
            self.limits.check_wide("exempt:", &e.prefix, e.force)?;
        }
        unique(
            "exempt",
            &self.exempt.iter().map(|e| e.prefix).collect::<Vec<_>>(),
        )?;
        let l = &self.limits;
        for (name, cap) in [
            ("exempt_ips", l.exempt_ips),
            ("exempt_prefixes", l.exempt_prefixes),
            ("mail_servers", l.mail_servers),
            ("subscriber_ranges", l.subscriber_ranges),
            ("session_prefixes", l.session_prefixes),
        ] {
            if cap == 0 {
                return Err(format!("limits.{name} must be at least 1"));
            }
        }
        // Each family has its own map of the configured capacity.
        let fits = |name: &str, cap: u32, list: &[Prefix]| {
            for v4 in [true, false] {
                let n = list.iter().filter(|p| p.addr.is_ipv4() == v4).count();
                if n > cap as usize {
                    return Err(format!(
                        "{name}: {n} entries do not fit limits.{name} = {cap} (map full)"
                    ));
                }
            }
            Ok(())
        };
        fits(
            "subscriber_ranges",
            l.subscriber_ranges,
            &self.subscriber_ranges,
        )?;
        fits("mail_servers", l.mail_servers, &mail)?;
        let hosts: Vec<Prefix> = self
            .exempt
            .iter()
            .map(|e| e.prefix)
            .filter(Prefix::is_host)
            .collect();
        let nets: Vec<Prefix> = self
            .exempt
            .iter()
            .map(|e| e.prefix)
            .filter(|p| !p.is_host())
            .collect();
        fits("exempt_ips", l.exempt_ips, &hosts)?;
        fits("exempt_prefixes", l.exempt_prefixes, &nets)?;
        Ok(())
    }
}

impl Config {
    /// Allow-list entries wider than the floor that the config forces: (key, prefix). The
    /// daemon audits them at start and on each reload.
    pub fn forced_wide(&self) -> Vec<(&'static str, Prefix)> {
        let mail = self
            .mail_servers
            .iter()
            .filter(|m| m.force && self.limits.too_wide(&m.prefix).is_some())
            .map(|m| ("mail_servers", m.prefix));
        let exempt = self
            .exempt
            .iter()
            .filter(|e| e.force && self.limits.too_wide(&e.prefix).is_some())
            .map(|e| ("exempt", e.prefix));
        mail.chain(exempt).collect()
    }
}

fn unique(name: &str, list: &[Prefix]) -> Result<(), String> {
    // A sort finds whether there is a duplicate (a million exempt entries: a set of them
    // took a tenth of a second); the set below names the first one in file order.
    let mut sorted = list.to_vec();
    sorted.sort_unstable();
    if sorted.windows(2).all(|w| w[0] != w[1]) {
        return Ok(());
    }
    let mut seen = BTreeSet::new();
    for p in list {
        if !seen.insert(p) {
            return Err(format!("{name} lists {p} twice"));
        }
    }
    Ok(())
}

/// serde_yaml appends " at line L column C"; the error type already carries them.
fn strip_location(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;

/// serde_yaml places a refused top-level value at the start of the document; for a message
/// that names its key first (`metrics_listen ...`), the key's own line, as YAML takes it (the
/// last one; duplicates are refused before this matters).
fn top_level_value_at(text: &str, msg: &str) -> Option<(usize, usize)> {
    const KEYS: [&str; 1] = ["metrics_listen"];
    let key = KEYS
        .iter()
        .find(|k| msg.strip_prefix(**k).is_some_and(|r| r.starts_with(' ')))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| {
            l.strip_prefix(key)
                .is_some_and(|r| r.trim_start().starts_with(':'))
        })
        .last()
        .map(|(i, _)| (i + 1, 1))
}

/// For "duplicate field `K`" reported at the mapping starting at (`line`, `column`): the
/// line and column of the second `K:` at that mapping's indentation (a block mapping, or
/// the first entry of a list item `- K:`).
fn duplicate_at(text: &str, msg: &str, line: usize, column: usize) -> Option<(usize, usize)> {
    let key = msg.split("duplicate field `").nth(1)?.split('`').next()?;
    let col = column.checked_sub(1)?;
    let mut seen = 0;
    for (i, l) in text.lines().enumerate().skip(line.checked_sub(1)?) {
        let (before, rest) = (l.get(..col), l.get(col..));
        if let (Some(before), Some(rest)) = (before, rest) {
            let is_key = before.chars().all(|c| c == ' ' || c == '-')
                && rest
                    .strip_prefix(key)
                    .is_some_and(|r| r.trim_start().starts_with(':'));
            if is_key {
                seen += 1;
                if seen == 2 {
                    return Some((i + 1, column));
                }
            }
        }
        // A line indented less than the mapping's keys ends the mapping.
        let content = l.trim_start_matches([' ', '-']);
        if i + 1 > line
            && !content.is_empty()
            && !content.starts_with('#')
            && l.len() - content.len() < col
        {
            break;
        }
    }
    None
}
