//! The pinned map layout: names, key and value types, and the settings record.
//!
//! Every type here crosses the kernel boundary: `#[repr(C)]`, fixed-width fields, explicit
//! padding, sizes asserted at compile time. Changing any of them is a layout change: bump
//! [`LAYOUT_VERSION`] so a daemon refuses a pinned map of the old layout instead of reusing it.

/// Written into [`Settings::layout`]; read from the pinned settings at daemon start: a newer
/// version is refused and left alone, an older one is migrated to new maps.
/// 2: [`EXBITS`]. A daemon of layout 1 must not edit the exempt hashes under a program that
/// skips lookups by the filter (it would not set their bits): it refuses these pins.
/// 3: [`EXBITS_NET6`] eight times larger (the bits of every session-prefix key moved).
/// 4: the IPv4 /24 regions in front of the three IPv4 tries ([`EXBITS_RANGES4`],
/// [`EXBITS_MAIL4`], [`EXBITS_PFX4`]); the ready word moved.
/// 5: the IPv6 regions ([`EXBITS_LENS6`], [`EXBITS_MAIL6`], [`EXBITS_PFX6`],
/// [`EXBITS_RANGES6`], [`EXBITS_WIDE6`]); the ready word moved again; [`Settings`] names up
/// to [`PROBED_PREFIX_LENS`] lengths (was 8).
pub const LAYOUT_VERSION: u32 = 5;

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
/// Offender tracking (LRU hash, [`OffenderKey`] -> [`Offender`]): counters only, never policy.
pub const OFFENDERS: &str = "P25_OFFENDERS";
/// The abuse settings record ([`AbuseSettings`], index 0).
pub const ABUSE: &str = "P25_ABUSE";
/// Block events ([`BlockEvent`]) to the daemon: a ring buffer.
pub const EVENTS: &str = "P25_EVENTS";
/// The tracking programs the entry points tail-call (program arrays, one per program type).
pub const TRACK_XDP: &str = "P25_TRACK_XDP";
pub const TRACK_TC: &str = "P25_TRACK_TC";
/// The exempt filter: an array of u64 words ([`EXBITS_WORDS`]) with one region of bits per
/// exempt hash ([`EXBITS_NET6`], [`EXBITS_IP4`], [`EXBITS_IP6`]), three regions of one bit
/// per IPv4 /24 in front of the IPv4 tries ([`EXBITS_RANGES4`], [`EXBITS_MAIL4`],
/// [`EXBITS_PFX4`]), their IPv6 counterparts by hashed block ([`EXBITS_RANGES6`],
/// [`EXBITS_MAIL6`], [`EXBITS_PFX6`]) with the session lengths near a block
/// ([`EXBITS_LENS6`]) and the wide word ([`EXBITS_WIDE6`]), and the ready word
/// [`EXBITS_READY`]. The bit of every key of those hashes is set, so a lookup whose bit is
/// clear is skipped: an inlined array read instead of a call into the hash or the trie, and
/// on a flood from sources that are not exempt, a cache line of a 13.6 MiB bitmap instead
/// of a bucket of a table of a million.
pub const EXBITS: &str = "P25_EXBITS";

/// Default capacities; the config's `limits` override the resizable ones at load time.
pub const DEFAULT_EXEMPT_IPS: u32 = 1 << 20;
pub const DEFAULT_EXEMPT_PREFIXES: u32 = 65536;
pub const DEFAULT_MAIL_SERVERS: u32 = 4096;
pub const DEFAULT_SUBSCRIBER_RANGES: u32 = 4096;
pub const DEFAULT_SESSION_PREFIXES: u32 = 1 << 20;
/// Default `abuse.track_sources`.
pub const DEFAULT_TRACK_SOURCES: u32 = 65536;
/// Bytes of the block-event ring buffer (a power of two, a multiple of the page size): room
/// for ~2,700 events, far more than one per source per interval reaches between two reads.
pub const EVENTS_BYTES: u32 = 256 * 1024;
/// The ports array covers every TCP port: index = port, value != 0 = blocked.
pub const PORTS_ENTRIES: u32 = 65536;

/// Most distinct IPv6 session prefix lengths a policy may use in [`EXNET6`] (e.g. /48, /56,
/// /60, /64).
pub const MAX_SESSION_PREFIX_LENS: usize = 8;
/// Most lengths the settings name and the datapath probes: twice [`MAX_SESSION_PREFIX_LENS`],
/// so that while a change moves entries from the old lengths to the new, both are probed
/// together (a blocked session's entry is seen from the moment it is written, whichever
/// set its length is in). A length no key near the source has costs a bit test
/// ([`EXBITS_LENS6`]).
pub const PROBED_PREFIX_LENS: usize = 2 * MAX_SESSION_PREFIX_LENS;

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

/// A region of [`EXBITS`]: its first word and its size in words (a power of two).
#[derive(Clone, Copy)]
pub struct Region {
    pub first: u32,
    pub words: u32,
}

/// [`EXNET6`]'s bits: 32 Mi bits in 4 MiB. A blocked IPv6 source reads one bit per session
/// prefix length in use (up to 8), and each set bit costs a hash lookup: at 100,000 session
/// prefixes 0.3% of the bits are set (a false probe for 2.4% of sources with 8 lengths; at
/// 4 Mi bits it was one source in 5), at a million 3%.
pub const EXBITS_NET6: Region = Region {
    first: 0,
    words: 1 << 19,
};
/// [`EXIP4`]'s bits: 16 Mi bits in 2 MiB; at a million addresses one lookup in 16 of a
/// source that is not exempt still reaches the hash.
pub const EXBITS_IP4: Region = Region {
    first: EXBITS_NET6.first + EXBITS_NET6.words,
    words: 1 << 18,
};
/// [`EXIP6`]'s bits: 4 Mi bits in 512 KiB.
pub const EXBITS_IP6: Region = Region {
    first: EXBITS_IP4.first + EXBITS_IP4.words,
    words: 1 << 16,
};

/// [`RANGES4`]'s bits, one per IPv4 /24 (16 Mi bits in 2 MiB): set when the whole /24 lies
/// inside one listed subscriber range, so the source is enforced without the trie (a
/// subscriber pool is a few wide ranges among many). The opposite sense of the other
/// regions, and as safe: a bit set where it should not be only enforces a source, and a
/// clear one asks the trie. Set only after the ranges are written ([`EXBITS_READY`]).
pub const EXBITS_RANGES4: Region = Region {
    first: EXBITS_IP6.first + EXBITS_IP6.words,
    words: 1 << 18,
};
/// [`MAIL4`]'s bits, one per IPv4 /24: set when a mail-server entry covers any address of
/// it. A destination whose /24's bit is clear is no mail server's, without the trie.
pub const EXBITS_MAIL4: Region = Region {
    first: EXBITS_RANGES4.first + EXBITS_RANGES4.words,
    words: 1 << 18,
};
/// [`EXPFX4`]'s bits, one per IPv4 /24: set when an exempt prefix covers any address of it.
pub const EXBITS_PFX4: Region = Region {
    first: EXBITS_MAIL4.first + EXBITS_MAIL4.words,
    words: 1 << 18,
};

/// [`EXNET6`]'s lengths near a source: a word per hashed /32 block (keys of /32 to /47) and
/// per hashed /48 block (keys of /48 or longer), bit `len % 64` set for each session
/// prefix of length `len` there (keys shorter than /32: [`EXBITS_WIDE6`]). A source probes
/// only the lengths its blocks' words name: at 8 lengths in use every probe costs a mask,
/// a hash and a word, and a source in a /48 where no session lives (a flood from an
/// unassigned part of the pool) probes none. Bits of different lengths may share a bit
/// (64 and 0): one more probe, never one less.
pub const EXBITS_LENS6: Region = Region {
    first: EXBITS_PFX4.first + EXBITS_PFX4.words,
    words: 1 << 17,
};
/// [`MAIL6`]'s bits: one per hashed /32 block a mail-server entry of /32 or longer lies in
/// (a shorter one sets [`WIDE6_MAIL`]). The destination's block's bit clear, no trie.
pub const EXBITS_MAIL6: Region = Region {
    first: EXBITS_LENS6.first + EXBITS_LENS6.words,
    words: 1 << 10,
};
/// [`EXPFX6`]'s bits: one per hashed /32 block (prefixes of /32 to /47) or /48 block
/// (/48 and longer) an exempt prefix lies in; a shorter prefix sets [`WIDE6_PFX`].
pub const EXBITS_PFX6: Region = Region {
    first: EXBITS_MAIL6.first + EXBITS_MAIL6.words,
    words: 1 << 12,
};
/// [`RANGES6`]' /32 blocks that lie wholly inside a listed subscriber range, as a table of
/// tags, not bits: the word at the block's hashed slot holds `block << 32 | 1`, and a source
/// is surely enforced only when its own block's tag is there (a hashed bit would say so of
/// another block too: it would enforce a source outside the ranges). Blocks that collide
/// keep the first; the others, and ranges narrower than /32 or wider than /24, ask the trie.
pub const EXBITS_RANGES6: Region = Region {
    first: EXBITS_PFX6.first + EXBITS_PFX6.words,
    words: 1 << 12,
};
/// One word for IPv6 entries too wide for the blocks: bit `len` for each session prefix
/// length under 32 in use, [`WIDE6_MAIL`] and [`WIDE6_PFX`].
pub const EXBITS_WIDE6: u32 = EXBITS_RANGES6.first + EXBITS_RANGES6.words;
/// [`EXBITS_WIDE6`]: a mail-server entry shorter than /32 exists (every IPv6 destination
/// asks the trie).
pub const WIDE6_MAIL: u64 = 1 << 62;
/// [`EXBITS_WIDE6`]: an exempt prefix shorter than /32 exists.
pub const WIDE6_PFX: u64 = 1 << 63;
/// [`EXBITS_WIDE6`]'s bits that name session prefix lengths.
pub const WIDE6_LENS: u64 = 0xffff_ffff;
/// The widest subscriber range whose /32 blocks [`EXBITS_RANGES6`] lists (256 blocks).
pub const RANGES6_WIDEST: u32 = 24;

/// The word of [`EXBITS`] past the regions: non-zero once the daemon has set the bit of every
/// key the exempt hashes hold. The daemon sets a key's bit before it writes the key and
/// clears bits only once their keys are gone, so from then on no entry of the applied state
/// lacks its bit (a key outside it, drift, may be skipped: it is deleted anyway). Zero
/// (a map just created, beside pins that already hold entries), every lookup is made. In
/// the map itself, not in the settings: a filter map recreated empty is never trusted.
pub const EXBITS_READY: u32 = EXBITS_WIDE6 + 1;
/// Entries of [`EXBITS`].
pub const EXBITS_WORDS: u32 = EXBITS_READY + 1;

/// A 64-bit finaliser (splitmix64's): every output bit depends on every input bit.
#[inline(always)]
const fn mix(x: u64) -> u64 {
    let x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// (word, bit in the word) of hash `h` in region `r`.
#[inline(always)]
const fn bit_in(r: Region, h: u64) -> (u32, u32) {
    (
        r.first + ((h >> 32) as u32 & (r.words - 1)),
        ((h >> 26) & 63) as u32,
    )
}

/// An IPv6 address as two big-endian words, the form the filter hashes and masks.
#[inline(always)]
pub const fn words_of(a: &[u8; 16]) -> (u64, u64) {
    (
        u64::from_be_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]),
        u64::from_be_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]),
    )
}

/// An [`EXNET6`] key's filter bit (its address is masked to its length, as every key is).
#[inline(always)]
pub const fn net6_bit(key: &NetKey6) -> (u32, u32) {
    let (hi, lo) = words_of(&key.addr);
    net6_bit_of(hi, lo, key.prefix_len)
}

/// [`net6_bit`] of the key (`len`, the masked address in words): the datapath has the
/// words already, and reading them back from a key's bytes costs 16 byte loads.
#[inline(always)]
pub const fn net6_bit_of(hi: u64, lo: u64, len: u32) -> (u32, u32) {
    bit_in(
        EXBITS_NET6,
        mix(hi ^ lo.rotate_left(31) ^ ((len as u64) << 1)),
    )
}

/// An [`EXIP4`] key's filter bit.
#[inline(always)]
pub const fn ip4_bit(a: [u8; 4]) -> (u32, u32) {
    bit_in(EXBITS_IP4, mix(u32::from_be_bytes(a) as u64))
}

/// An [`EXIP6`] key's filter bit.
#[inline(always)]
pub const fn ip6_bit(a: &[u8; 16]) -> (u32, u32) {
    let (hi, lo) = words_of(a);
    ip6_bit_of(hi, lo)
}

/// [`ip6_bit`] of an address in words.
#[inline(always)]
pub const fn ip6_bit_of(hi: u64, lo: u64) -> (u32, u32) {
    bit_in(EXBITS_IP6, mix(hi ^ lo.rotate_left(31)))
}

/// The bit of the /24 of `a` in one of the /24 regions ([`EXBITS_RANGES4`], [`EXBITS_MAIL4`],
/// [`EXBITS_PFX4`]): the /24's number, not a hash, so a prefix's bits are a run.
#[inline(always)]
pub const fn slash24_bit(r: Region, a: [u8; 4]) -> (u32, u32) {
    let n = u32::from_be_bytes(a) >> 8;
    (r.first + (n >> 6), n & 63)
}

/// The hash of an IPv6 address's /32 (`level` 32) or /48 (48) block, from its high word.
/// Salted by the level, so a /32 and a /48 that share their numbers differ.
#[inline(always)]
pub const fn block6(hi: u64, level: u32) -> u64 {
    mix((hi >> (64 - level)) ^ ((level as u64) << 56))
}

/// The word of block hash `h` in region `r` (the tag table, the lengths' words).
#[inline(always)]
pub const fn block_word(r: Region, h: u64) -> u32 {
    r.first + ((h >> 32) as u32 & (r.words - 1))
}

/// An [`EXNET6`] key's bit among the lengths near it ([`EXBITS_LENS6`], [`EXBITS_WIDE6`]),
/// from its (masked) high word.
#[inline(always)]
pub const fn lens6_bit(hi: u64, len: u32) -> (u32, u32) {
    if len < 32 {
        (EXBITS_WIDE6, len)
    } else if len < 48 {
        (block_word(EXBITS_LENS6, block6(hi, 32)), len & 63)
    } else {
        (block_word(EXBITS_LENS6, block6(hi, 48)), len & 63)
    }
}

/// A [`MAIL6`] entry's bit (address, length).
#[inline(always)]
pub const fn mail6_bit(a: &[u8; 16], len: u32) -> (u32, u32) {
    if len < 32 {
        (EXBITS_WIDE6, 62)
    } else {
        bit_in(EXBITS_MAIL6, block6(words_of(a).0, 32))
    }
}

/// An [`EXPFX6`] entry's bit (address, length).
#[inline(always)]
pub const fn pfx6_bit(a: &[u8; 16], len: u32) -> (u32, u32) {
    let hi = words_of(a).0;
    if len < 32 {
        (EXBITS_WIDE6, 63)
    } else if len < 48 {
        bit_in(EXBITS_PFX6, block6(hi, 32))
    } else {
        bit_in(EXBITS_PFX6, block6(hi, 48))
    }
}

/// The bit of a block hash in a region of bits ([`EXBITS_MAIL6`], [`EXBITS_PFX6`]).
#[inline(always)]
pub const fn block_bit(r: Region, h: u64) -> (u32, u32) {
    bit_in(r, h)
}

/// The tag [`EXBITS_RANGES6`] holds for a /32 block (its number): never 0, the empty slot.
#[inline(always)]
pub const fn range6_tag(block: u32) -> u64 {
    (block as u64) << 32 | 1
}

/// The /24s an IPv4 prefix meets, as (number of the first, how many): one for a prefix of
/// /24 or longer, 2^(24 - len) for a shorter one, all of them whole.
pub const fn slash24s(a: [u8; 4], len: u32) -> (u32, u32) {
    let n = u32::from_be_bytes(a) >> 8;
    if len >= 24 {
        (n, 1)
    } else {
        let count = 1u32 << (24 - len);
        (n & !(count - 1), count)
    }
}

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
    pub session_prefix_lens: [u8; PROBED_PREFIX_LENS],
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

/// The expiry of a blocked user's session entries: over since boot (the verdict knows it
/// expired without reading the clock).
pub const BLOCKED_NS: u64 = 1;

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
    /// The count and the lengths, each read once, before any probe (`lens[w] >> 8 * b` is
    /// length `8 * w + b`). In the kernel the record is read in place, and a userspace write
    /// of it is a plain copy: read field by field between the probes, a packet could take
    /// the old count with a list already shifted by a longer length (the list is longest
    /// first) and never probe a length both name. Read here, it sees at worst what a copy
    /// of the record would (the same few loads).
    #[inline(always)]
    pub fn probed_lens(&self) -> (u32, [u64; 2]) {
        let p = self.session_prefix_lens.as_ptr() as *const u32;
        // SAFETY: 16 bytes of a repr(C) record whose fields are 4-aligned; volatile, so
        // the compiler neither repeats the loads inside the probe loop nor moves them there.
        // `from_le`: byte k of the list in bits 8k.. whatever the host's order (a no-op on
        // BPF and x86; a byte array in between made LLVM store and reload byte by byte).
        let word = |i: usize| u32::from_le(unsafe { core::ptr::read_volatile(p.add(i)) });
        let le = |lo: u32, hi: u32| lo as u64 | (hi as u64) << 32;
        let count = unsafe { core::ptr::read_volatile(&self.session_prefix_count) };
        (count, [le(word(0), word(1)), le(word(2), word(3))])
    }

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

/// Key of [`OFFENDERS`]: one type for both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct OffenderKey {
    /// IPv4 in the first 4 bytes, the rest zero. First, so that the kernel copies it in
    /// words, not bytes.
    pub addr: [u8; 16],
    /// 4 or 6.
    pub family: u32,
}

/// Value of [`OFFENDERS`]: what one source did against the blocked ports. Written in place
/// by the kernel (counters with atomic adds; the rest with plain stores, so two CPUs racing
/// on one source may lose a bitmap bit or a last-destination: an estimate either way).
///
/// Windows: counters cover the current window (`window_ns` on, [`AbuseSettings::window_ns`]
/// long) and the one before it (`prev_*`, zero when the source was quiet for a whole
/// window). A blocked segment after the window rolls the counters over.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Offender {
    /// Boot-clock nanoseconds of the first blocked segment since the entry was created.
    pub first_ns: u64,
    /// Boot-clock nanoseconds of the last blocked segment.
    pub last_ns: u64,
    /// Start of the current window.
    pub window_ns: u64,
    /// Last block event sent for this source (0 = none).
    pub event_ns: u64,
    /// SYNs without ACK in the current window.
    pub attempts: u64,
    /// Every blocked segment in the current window.
    pub segments: u64,
    /// Destination-address hash bitmap of the current window ([`dest_bit`]).
    pub dests: u64,
    pub prev_attempts: u64,
    pub prev_segments: u64,
    pub prev_dests: u64,
    /// The last destination: address (IPv4 in the first 4 bytes) and port.
    pub last_dst: [u8; 16],
    pub last_dport: u16,
    /// The [`crate::Reason`] of the last blocked segment.
    pub last_reason: u8,
    pub _pad: u8,
    /// The interface the last blocked segment came in on.
    pub ifindex: u32,
}

/// Index 0 of [`ABUSE`]. All zero (a fresh map) = tracking off.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AbuseSettings {
    /// Non-zero: track offenders (`abuse.track_sources` > 0). Zero: the kernel never touches
    /// [`OFFENDERS`] or [`EVENTS`].
    pub track: u32,
    pub _pad: u32,
    /// Window of the counters (`abuse.flag_window`), nanoseconds.
    pub window_ns: u64,
    /// At most one event per source per this many nanoseconds (`abuse.event_interval`);
    /// 0 = no events.
    pub event_interval_ns: u64,
}

/// One [`EVENTS`] record: a source blocked, at most once per source per event interval.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BlockEvent {
    pub at_ns: u64,
    pub key: OffenderKey,
    pub ifindex: u32,
    pub dst: [u8; 16],
    pub dport: u16,
    pub reason: u8,
    pub _pad: u8,
    pub _pad2: u32,
    pub attempts: u64,
    pub segments: u64,
    pub dests: u64,
}

/// The bit of a destination address in [`Offender::dests`]: MurmurHash3's 64-bit finalizer
/// of the folded address, top 6 bits. Linear counting's error bound assumes a hash that
/// looks random; a multiplicative one spreads consecutive addresses too evenly (no
/// collisions) and the estimate runs high.
#[inline(always)]
pub fn dest_bit(dst: &[u8; 16]) -> u64 {
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&dst[..8]);
    b.copy_from_slice(&dst[8..]);
    let mut x = u64::from_le_bytes(a) ^ u64::from_le_bytes(b).rotate_left(29);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    1u64 << (x >> 58)
}

const _: () = assert!(core::mem::size_of::<OffenderKey>() == 20);
const _: () = assert!(core::mem::size_of::<Offender>() == 104);
const _: () = assert!(core::mem::size_of::<AbuseSettings>() == 24);
const _: () = assert!(core::mem::size_of::<BlockEvent>() == 80);
const _: () = assert!(core::mem::size_of::<Settings>() == 32);
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
    unsafe impl aya::Pod for super::OffenderKey {}
    unsafe impl aya::Pod for super::Offender {}
    unsafe impl aya::Pod for super::AbuseSettings {}
    unsafe impl aya::Pod for super::BlockEvent {}
}

#[cfg(all(test, feature = "user"))]
mod tests {
    use super::dest_bit;

    /// Linear counting on 64 bits: -64 ln(zeros/64). For 30 random items its standard error
    /// is ~10%; over many consecutive /24s of 30 addresses the estimate stays within 30%.
    #[test]
    fn the_destination_estimate_is_within_its_bound_for_consecutive_addresses() {
        let est = |bits: u64| -64.0 * (bits.count_zeros() as f64 / 64.0).ln();
        let mut worst: f64 = 0.0;
        for net in 0..200u8 {
            let mut bits = 0;
            for host in 1..=30u8 {
                let mut a = [0u8; 16];
                a[..4].copy_from_slice(&[203, net, 113, host]);
                bits |= dest_bit(&a);
            }
            worst = worst.max((est(bits) - 30.0).abs() / 30.0);
        }
        assert!(worst <= 0.3, "worst relative error {worst}");
    }
}

#[cfg(test)]
mod filter_bits {
    use super::*;

    /// The filter's bit of a key is part of the pinned layout: a start reuses a pinned,
    /// ready filter, and until every link swaps the program still attached reads it with the
    /// function it was built with, while the daemon sets (and trims) bits with its own. A
    /// change of [`mix`], of the regions or of what a key hashes makes the old program skip
    /// keys whose bits moved: bump [`LAYOUT_VERSION`] (a migration, fresh filter and all)
    /// and update these values together.
    #[test]
    fn filter_bits_are_pinned_to_the_layout_version() {
        let net = NetKey6 {
            prefix_len: 56,
            addr: [
                0x20, 0x01, 0x0d, 0xb8, 0x01, 0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ],
        };
        let ip6 = [0x20, 0x01, 0x0d, 0xb8, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let got = [
            ip4_bit([100, 64, 0, 2]),
            ip6_bit(&ip6),
            net6_bit(&net),
            slash24_bit(EXBITS_RANGES4, [100, 64, 0, 2]),
            slash24_bit(EXBITS_MAIL4, [198, 51, 100, 25]),
            slash24_bit(EXBITS_PFX4, [10, 1, 2, 3]),
            lens6_bit(words_of(&net.addr).0, 56),
            lens6_bit(words_of(&net.addr).0, 40),
            lens6_bit(words_of(&net.addr).0, 24),
            mail6_bit(&ip6, 128),
            pfx6_bit(&net.addr, 56),
            pfx6_bit(&net.addr, 32),
            (block_word(EXBITS_RANGES6, block6(words_of(&ip6).0, 32)), 0),
        ];
        assert_eq!(LAYOUT_VERSION, 5, "new bits: update the values below");
        assert_eq!(
            got,
            [
                (722054, 29),
                (791682, 2),
                (464032, 27),
                (954624, 0),
                (1317069, 36),
                (1386500, 2),
                (1674507, 56),
                (1657279, 40),
                (1778688, 24),
                (1769919, 60),
                (1773835, 14),
                (1772991, 60),
                (1777087, 0),
            ]
        );
        assert_eq!(
            EXBITS_READY,
            1638400 + (1 << 17) + (1 << 10) + 2 * (1 << 12) + 1
        );
    }

    #[test]
    fn probed_lens_reads_the_list_in_order() {
        let mut s = Settings::default();
        for i in 0..PROBED_PREFIX_LENS {
            s.session_prefix_lens[i] = 128 - i as u8 * 3;
        }
        s.session_prefix_count = 11;
        let (count, lens) = s.probed_lens();
        assert_eq!(count, 11);
        for i in 0..PROBED_PREFIX_LENS {
            assert_eq!(
                (lens[i / 8] >> (8 * (i % 8))) as u8,
                s.session_prefix_lens[i]
            );
        }
    }

    #[test]
    fn a_prefix_meets_its_slash24s() {
        assert_eq!(slash24s([10, 1, 2, 3], 32), (0x0a0102, 1));
        assert_eq!(slash24s([10, 1, 2, 0], 24), (0x0a0102, 1));
        assert_eq!(slash24s([10, 1, 2, 0], 23), (0x0a0102, 2));
        assert_eq!(slash24s([100, 64, 0, 0], 10), (0x644000, 1 << 14));
        assert_eq!(slash24s([0, 0, 0, 0], 0), (0, 1 << 24));
    }
}
