//! The pinned map layout: names, key and value types, and the settings record.
//!
//! Every type here crosses the kernel boundary: `#[repr(C)]`, fixed-width fields, explicit
//! padding, sizes asserted at compile time. Changing any of them is a layout change: bump
//! [`LAYOUT_VERSION`] so a daemon refuses a pinned map of the old layout instead of reusing it.

/// Written into [`Settings::layout`]; read from the pinned settings at daemon start: a newer
/// version is refused and left alone, an older one is migrated to new maps.
pub const LAYOUT_VERSION: u32 = 1;

// Map names (kernel object names are limited to 15 characters). They double as pin file names.
pub const SETTINGS: &str = "P25_SETTINGS";
pub const PORTS: &str = "P25_PORTS";
pub const RANGES4: &str = "P25_RANGES4";
pub const RANGES6: &str = "P25_RANGES6";
pub const MAIL4: &str = "P25_MAIL4";
pub const MAIL6: &str = "P25_MAIL6";
pub const EXIP4: &str = "P25_EXIP4";
pub const EXIP6: &str = "P25_EXIP6";
pub const EXPFX4: &str = "P25_EXPFX4";
pub const EXPFX6: &str = "P25_EXPFX6";
pub const EXNET6: &str = "P25_EXNET6";
pub const COUNTERS: &str = "P25_COUNTERS";

/// Default capacities; the config's `limits` override the resizable ones at load time.
pub const DEFAULT_EXEMPT_IPS: u32 = 1 << 20;
pub const DEFAULT_EXEMPT_PREFIXES: u32 = 65536;
pub const DEFAULT_MAIL_SERVERS: u32 = 4096;
pub const DEFAULT_SUBSCRIBER_RANGES: u32 = 4096;
pub const DEFAULT_SESSION_PREFIXES: u32 = 1 << 20;
/// The ports array covers every TCP port: index = port, value != 0 = blocked.
pub const PORTS_ENTRIES: u32 = 65536;

/// Most distinct IPv6 session prefix lengths probed in [`EXNET6`] (e.g. /48, /56, /60, /64).
pub const MAX_SESSION_PREFIX_LENS: usize = 8;

/// `Settings::flags`, legacy: "only sources inside the subscriber ranges are enforced", for
/// both families at once. The verdict no longer reads it (an unlisted family was left open);
/// it is still written when both families have listed ranges, so an older program that runs
/// against these settings during an upgrade or a rollback is correct then, and enforces every
/// source otherwise. No layout change: the struct is the same, and an older daemon's settings
/// (this bit only) read as "every source of both families enforced", which fails closed
/// until the new daemon rewrites them.
pub const FLAG_ENFORCE_LISTED: u32 = 1 << 0;
/// `Settings::flags`: answer blocked SYNs with a TCP RST (`action: reject`).
pub const FLAG_REJECT: u32 = 1 << 1;
/// `Settings::flags`: IPv4 sources are enforced only inside [`RANGES4`]. Clear (the zero value
/// of a fresh map, or a config that lists no IPv4 range) means every IPv4 source is enforced.
pub const FLAG_LISTED4: u32 = 1 << 2;
/// `Settings::flags`: as [`FLAG_LISTED4`], for IPv6 sources and [`RANGES6`].
pub const FLAG_LISTED6: u32 = 1 << 3;

/// The enforcement flags for a config that lists IPv4 and/or IPv6 subscriber ranges.
pub const fn listed_flags(v4: bool, v6: bool) -> u32 {
    let mut f = 0;
    if v4 {
        f |= FLAG_LISTED4;
    }
    if v6 {
        f |= FLAG_LISTED6;
    }
    if v4 && v6 {
        f |= FLAG_ENFORCE_LISTED;
    }
    f
}

/// Every flag that narrows enforcement to listed ranges.
pub const LISTED_MASK: u32 = FLAG_ENFORCE_LISTED | FLAG_LISTED4 | FLAG_LISTED6;

/// Index 0 of the [`SETTINGS`] array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Settings {
    /// [`LAYOUT_VERSION`] of the daemon that wrote it.
    pub layout: u32,
    pub flags: u32,
    /// How many entries of `session_prefix_lens` are in use.
    pub session_prefix_count: u32,
    pub _pad: u32,
    /// Prefix lengths present in [`EXNET6`], probed longest first.
    pub session_prefix_lens: [u8; MAX_SESSION_PREFIX_LENS],
}

/// Value of the exempt maps ([`EXIP4`], [`EXIP6`], [`EXPFX4`], [`EXPFX6`], [`EXNET6`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Exempt {
    /// `CLOCK_BOOTTIME` nanoseconds after which the entry counts as absent; 0 = never.
    pub expires_ns: u64,
    /// Which kind of policy put it there ([`ORIGIN_CONFIG`], ...); shown by `check`.
    pub origin: u32,
    pub _pad: u32,
}

pub const ORIGIN_CONFIG: u32 = 1;
pub const ORIGIN_RUNTIME: u32 = 2;
/// An address or prefix of a live session. It decides alone (an address a live session holds
/// follows that session's user only): live =
/// pass, expired = block (a blocked user's session is written already expired), and no
/// wider prefix of another user is looked at.
pub const ORIGIN_SESSION: u32 = 3;
/// A user's static binding (`user bind`): exempt while live, like config entries.
pub const ORIGIN_BINDING: u32 = 4;

impl Settings {
    /// Whether sources of this family are enforced only inside its listed ranges (false =
    /// the whole family is enforced).
    #[inline(always)]
    pub const fn listed(&self, v6: bool) -> bool {
        let bit = if v6 { FLAG_LISTED6 } else { FLAG_LISTED4 };
        self.flags & bit != 0
    }
}

impl Exempt {
    /// Expired entries count as absent, in the kernel and in userspace alike; except a
    /// session's, which then blocks ([`ORIGIN_SESSION`]).
    #[inline(always)]
    pub const fn live(&self, now_ns: u64) -> bool {
        self.expires_ns == 0 || now_ns < self.expires_ns
    }

    /// Whether the operator wrote it (config `exempt`, `exempt add`), not a user's policy.
    #[inline(always)]
    pub const fn operator(&self) -> bool {
        self.origin == ORIGIN_CONFIG || self.origin == ORIGIN_RUNTIME
    }

    /// Whether this entry settles the source's verdict on its own (a live session's).
    #[inline(always)]
    pub const fn owns(&self) -> bool {
        self.origin == ORIGIN_SESSION
    }
}

/// Key of [`EXNET6`]: a session prefix, hashed by (length, masked address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct NetKey6 {
    pub prefix_len: u32,
    pub addr: [u8; 16],
}

/// LPM trie keys as the kernel lays them out: a u32 prefix length, then the address bytes.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LpmKey<const N: usize> {
    pub prefix_len: u32,
    pub data: [u8; N],
}

const _: () = assert!(core::mem::size_of::<Settings>() == 24);
const _: () = assert!(core::mem::size_of::<Exempt>() == 16);
const _: () = assert!(core::mem::size_of::<NetKey6>() == 20);
const _: () = assert!(core::mem::size_of::<LpmKey<4>>() == 8);
const _: () = assert!(core::mem::size_of::<LpmKey<16>>() == 20);

#[cfg(feature = "user")]
mod user {
    // SAFETY: repr(C), fixed-width fields, explicit padding, sizes asserted above.
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::Exempt {}
    unsafe impl aya::Pod for super::NetKey6 {}
}
