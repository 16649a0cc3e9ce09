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
        } else if len > start {
            len - start
        } else {
            0
        };
        // keep is 0..=8; a u16 shift avoids the 8-bit overflow at keep == 0.
        let m = ((0xff00u16 >> keep) & 0xff) as u8;
        out[i] = addr[i] & m;
        i += 1;
    }
    out
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
    fn contains_checks_prefix() {
        assert!(contains([100, 64, 0, 0], 10, [100, 127, 1, 1]));
        assert!(!contains([100, 64, 0, 0], 10, [100, 128, 1, 1]));
    }
}
