//! IP addresses as the datapath sees them: network byte order, no std.

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Addr {
    V4([u8; 4]),
    V6([u8; 16]),
}

impl Addr {
    pub const fn max_prefix_len(&self) -> u32 {
        match self {
            Addr::V4(_) => 32,
            Addr::V6(_) => 128,
        }
    }
}

/// An address as the datapath carries it from the parse to the verdict: its 16 bytes in
/// network order (IPv4 in the first four, the rest zero), held as two native-endian words,
/// so the same bytes in memory. Held as `[u8; 16]`, LLVM split each address into sixteen
/// one-byte values and spilled them on every packet's path, a non-IP frame's included
/// (about 60 BPF instructions); as words they are two registers or two stack slots.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct Ip16(pub [u64; 2]);

impl Ip16 {
    pub const ZERO: Ip16 = Ip16([0; 2]);

    #[inline(always)]
    pub const fn from_bytes(b: [u8; 16]) -> Ip16 {
        Ip16([
            u64::from_ne_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            u64::from_ne_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        ])
    }

    /// An IPv4 address, the rest zero.
    #[inline(always)]
    pub const fn from_v4(b: [u8; 4]) -> Ip16 {
        Ip16([u64::from_ne_bytes([b[0], b[1], b[2], b[3], 0, 0, 0, 0]), 0])
    }

    /// The 16 bytes at `at` of a header read from the packet.
    #[inline(always)]
    pub fn from_slice<const N: usize>(h: &[u8; N], at: usize) -> Ip16 {
        let mut b = [0u8; 16];
        b.copy_from_slice(&h[at..at + 16]);
        Ip16::from_bytes(b)
    }

    #[inline(always)]
    pub const fn bytes(&self) -> [u8; 16] {
        let (a, b) = (self.0[0].to_ne_bytes(), self.0[1].to_ne_bytes());
        [
            a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], b[0], b[1], b[2], b[3], b[4], b[5],
            b[6], b[7],
        ]
    }

    /// The first four bytes: the address of an IPv4 parse.
    #[inline(always)]
    pub const fn v4(&self) -> [u8; 4] {
        let a = self.0[0].to_ne_bytes();
        [a[0], a[1], a[2], a[3]]
    }

    /// As two big-endian words, the form the filter hashes and masks
    /// ([`crate::maps::words_of`] of [`Ip16::bytes`]).
    #[inline(always)]
    pub const fn be_words(&self) -> (u64, u64) {
        (
            u64::from_be_bytes(self.0[0].to_ne_bytes()),
            u64::from_be_bytes(self.0[1].to_ne_bytes()),
        )
    }
}

impl core::fmt::Debug for Ip16 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.bytes().fmt(f)
    }
}

/// `addr` with every bit past `len` cleared.
#[inline(always)]
pub fn mask<const N: usize>(addr: [u8; N], len: u32) -> [u8; N] {
    let mut out = [0u8; N];
    let mut i = 0;
    while i < N {
        let start = (i as u32) * 8;
        let keep = if len >= start + 8 {
            8
        } else {
            len.saturating_sub(start)
        };
        // keep is 0..=8; a u16 shift avoids the 8-bit overflow at keep == 0.
        let m = ((0xff00u16 >> keep) & 0xff) as u8;
        out[i] = addr[i] & m;
        i += 1;
    }
    out
}

/// [`mask`] for an IPv6 address, in two 64-bit words: the datapath masks once per session
/// prefix length probed, and the byte loop compiles to about a hundred BPF instructions a
/// probe where this is about a dozen.
#[inline(always)]
pub fn mask6(addr: [u8; 16], len: u32) -> [u8; 16] {
    let hi = u64::from_be_bytes([
        addr[0], addr[1], addr[2], addr[3], addr[4], addr[5], addr[6], addr[7],
    ]);
    let lo = u64::from_be_bytes([
        addr[8], addr[9], addr[10], addr[11], addr[12], addr[13], addr[14], addr[15],
    ]);
    let (hi, lo) = mask_words(hi, lo, len);
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&hi.to_be_bytes());
    out[8..].copy_from_slice(&lo.to_be_bytes());
    out
}

/// [`mask6`] of an address in two big-endian words.
#[inline(always)]
pub fn mask_words(hi: u64, lo: u64, len: u32) -> (u64, u64) {
    (hi & keep64(len), lo & keep64(len.saturating_sub(64)))
}

/// The top `len` bits of a word set (all for 64 and over, none for 0).
#[inline(always)]
fn keep64(len: u32) -> u64 {
    if len >= 64 {
        u64::MAX
    } else if len == 0 {
        0
    } else {
        u64::MAX << (64 - len)
    }
}

/// True when `addr` lies inside `net/len` (both in network byte order).
pub fn contains<const N: usize>(net: [u8; N], len: u32, addr: [u8; N]) -> bool {
    mask(addr, len) == net
}

#[cfg(feature = "user")]
mod user {
    use super::Addr;
    use std::net::IpAddr;

    impl From<IpAddr> for Addr {
        fn from(ip: IpAddr) -> Self {
            match ip {
                IpAddr::V4(v4) => Addr::V4(v4.octets()),
                IpAddr::V6(v6) => Addr::V6(v6.octets()),
            }
        }
    }

    impl From<Addr> for IpAddr {
        fn from(a: Addr) -> Self {
            match a {
                Addr::V4(o) => IpAddr::from(o),
                Addr::V6(o) => IpAddr::from(o),
            }
        }
    }

    impl std::fmt::Display for Addr {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            IpAddr::from(*self).fmt(f)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_clears_host_bits() {
        assert_eq!(mask([10, 1, 2, 3], 8), [10, 0, 0, 0]);
        assert_eq!(mask([10, 255, 2, 3], 10), [10, 192, 0, 0]);
        assert_eq!(mask([10, 1, 2, 3], 0), [0, 0, 0, 0]);
        assert_eq!(mask([10, 1, 2, 3], 32), [10, 1, 2, 3]);
        let mut v6 = [0xffu8; 16];
        v6 = mask(v6, 56);
        assert_eq!(&v6[..8], &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
    }

    #[test]
    fn mask6_is_mask() {
        let addrs = [
            [0xffu8; 16],
            [0u8; 16],
            *b"\x20\x01\x0d\xb8\x01\xa0\x00\x05\x80\x01\x02\x03\xfe\xdc\xba\x98",
        ];
        for a in addrs {
            for len in 0..=130 {
                assert_eq!(mask6(a, len), mask(a, len), "{a:?}/{len}");
            }
        }
    }

    #[test]
    fn ip16_holds_the_bytes_as_they_are() {
        let b = *b"\x20\x01\x0d\xb8\x01\xa0\x00\x05\x80\x01\x02\x03\xfe\xdc\xba\x98";
        let a = Ip16::from_bytes(b);
        assert_eq!(a.bytes(), b);
        // The same memory as the bytes: what the offender hand-over reads as words.
        assert_eq!(unsafe { core::mem::transmute::<Ip16, [u8; 16]>(a) }, b);
        assert_eq!(a.be_words(), crate::maps::words_of(&b));
        let mut h = [0u8; 19];
        h[3..].copy_from_slice(&b);
        assert_eq!(Ip16::from_slice(&h, 3), a);
        let v4 = Ip16::from_v4([192, 0, 2, 7]);
        assert_eq!(v4.v4(), [192, 0, 2, 7]);
        assert_eq!(
            v4.bytes(),
            [192, 0, 2, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn contains_checks_prefix() {
        assert!(contains([100, 64, 0, 0], 10, [100, 127, 1, 1]));
        assert!(!contains([100, 64, 0, 0], 10, [100, 128, 1, 1]));
    }
}
