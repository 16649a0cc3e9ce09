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
    fn contains_checks_prefix() {
        assert!(contains([100, 64, 0, 0], 10, [100, 127, 1, 1]));
        assert!(!contains([100, 64, 0, 0], 10, [100, 128, 1, 1]));
    }
}
