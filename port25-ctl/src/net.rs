//! Strictly parsed addresses and prefixes, as config, CLI and socket accept them.

use std::{fmt, net::IpAddr, str::FromStr};

use port25_common::addr::mask;
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// An address with a prefix length and no host bits. A bare address is a /32 or /128.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    pub fn max_len(&self) -> u8 {
        if self.addr.is_ipv4() {
            32
        } else {
            128
        }
    }
    pub fn is_host(&self) -> bool {
        self.len == self.max_len()
    }
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => mask(a.octets(), self.len as u32) == n.octets(),
            (IpAddr::V6(n), IpAddr::V6(a)) => mask(a.octets(), self.len as u32) == n.octets(),
            _ => false,
        }
    }
}

/// Parses an address, refusing the forms that mean different things to different parsers.
pub fn parse_addr(s: &str) -> Result<IpAddr, String> {
    let s = s.trim();
    if s.contains(':') {
        return s
            .parse::<std::net::Ipv6Addr>()
            .map(IpAddr::V6)
            .map_err(|_| format!("`{s}` is not a valid IPv6 address"));
    }
    // Counted, not collected: the registry's full read parses a million of these.
    if s.split('.').count() != 4 {
        return Err(format!("`{s}` is not a dotted-quad IPv4 address"));
    }
    for p in s.split('.') {
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("`{s}` is not a valid IPv4 address"));
        }
        if p.len() > 1 && p.starts_with('0') {
            return Err(format!(
                "`{s}` has a leading zero: some tools read it as octal, so it is refused"
            ));
        }
    }
    s.parse::<std::net::Ipv4Addr>()
        .map(IpAddr::V4)
        .map_err(|_| format!("`{s}` is not a valid IPv4 address"))
}

impl FromStr for Prefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = match s.trim().split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s.trim(), None),
        };
        let addr = parse_addr(a)?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            None => max,
            Some(l) => {
                if l.is_empty() || !l.bytes().all(|b| b.is_ascii_digit()) || l.len() > 3 {
                    return Err(format!("`{s}`: prefix length `{l}` is not a number"));
                }
                let len: u8 = l.parse().map_err(|_| format!("`{s}`: bad prefix length"))?;
                if len > max {
                    return Err(format!("`{s}`: prefix length {len} is longer than {max}"));
                }
                len
            }
        };
        let network = Prefix { addr, len }.network();
        if network != addr {
            return Err(format!(
                "`{s}` has host bits set; the network is {network}/{len}"
            ));
        }
        Ok(Prefix { addr, len })
    }
}

impl Prefix {
    /// The same prefix with its host bits cleared.
    pub fn masked(self) -> Prefix {
        Prefix {
            addr: self.network(),
            len: self.len,
        }
    }

    fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => IpAddr::from(mask(a.octets(), self.len as u32)),
            IpAddr::V6(a) => IpAddr::from(mask(a.octets(), self.len as u32)),
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl<'de> Deserialize<'de> for Prefix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

impl Serialize for Prefix {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_networks_and_hosts() {
        let p: Prefix = "100.64.0.0/10".parse().unwrap();
        assert_eq!(p.len, 10);
        let h: Prefix = "198.51.100.25".parse().unwrap();
        assert!(h.is_host());
        let v6: Prefix = "2001:db8:100::/40".parse().unwrap();
        assert_eq!(v6.len, 40);
        assert!(v6.contains("2001:db8:100:ff::1".parse().unwrap()));
    }

    #[test]
    fn refuses_ambiguous_or_wrong_forms() {
        for bad in [
            "010.0.0.1",
            "10.0.0.01/32",
            "10.1.2.3/8",
            "2001:db8::1/64",
            "10.0.0.0/33",
            "10.0.0/24",
            "1.2.3.4/",
            "1.2.3.4/-1",
            "0x7f.0.0.1",
            "256.1.1.1",
            "",
            "::/129",
        ] {
            assert!(bad.parse::<Prefix>().is_err(), "{bad} should be refused");
        }
        let e = "10.1.2.3/8".parse::<Prefix>().unwrap_err();
        assert!(e.contains("host bits") && e.contains("10.0.0.0/8"), "{e}");
        let e = "010.0.0.1".parse::<Prefix>().unwrap_err();
        assert!(e.contains("octal"), "{e}");
    }
}
