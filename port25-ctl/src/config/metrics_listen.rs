//! `metrics_listen`: where the daemon serves Prometheus metrics, or `off`.

use std::{fmt, net::SocketAddr};

use serde::{de, Deserialize, Deserializer, Serialize};

/// The default: loopback only, so nothing is exposed beyond the router until the operator
/// says so.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9725";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsListen {
    Off,
    /// An IP address and port (`127.0.0.1:9725`, `[::1]:9725`); never a host name, which
    /// would make the daemon's start depend on name resolution.
    At(SocketAddr),
}

impl Default for MetricsListen {
    fn default() -> Self {
        MetricsListen::At(DEFAULT_METRICS_LISTEN.parse().expect("a valid address"))
    }
}

impl MetricsListen {
    pub fn addr(&self) -> Option<SocketAddr> {
        match self {
            MetricsListen::Off => None,
            MetricsListen::At(a) => Some(*a),
        }
    }
}

impl fmt::Display for MetricsListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricsListen::Off => f.write_str("off"),
            MetricsListen::At(a) => write!(f, "{a}"),
        }
    }
}

impl std::str::FromStr for MetricsListen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(MetricsListen::Off);
        }
        let bad = |why: &str| {
            format!(
                "metrics_listen `{s}` {why}: give an address and port such as \
                 {DEFAULT_METRICS_LISTEN} or [::1]:9725, or `off`"
            )
        };
        let a: SocketAddr = s
            .parse()
            .map_err(|_| bad("is not an IP address and port"))?;
        if a.port() == 0 {
            return Err(bad("has port 0 (a random port no scraper could find)"));
        }
        Ok(MetricsListen::At(a))
    }
}

impl<'de> Deserialize<'de> for MetricsListen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A YAML `off` is a string for serde_yaml 0.9 (YAML 1.2: no yes/no/on/off booleans);
        // a bare `false` is refused with the same message as any other non-string.
        let s = String::deserialize(d).map_err(|_| {
            de::Error::custom(format!(
                "metrics_listen must be an address and port such as {DEFAULT_METRICS_LISTEN}, or `off`"
            ))
        })?;
        s.parse().map_err(de::Error::custom)
    }
}

impl Serialize for MetricsListen {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses_and_off() {
        assert_eq!("off".parse::<MetricsListen>().unwrap(), MetricsListen::Off);
        assert_eq!(
            "[::1]:9725".parse::<MetricsListen>().unwrap().addr(),
            Some("[::1]:9725".parse().unwrap())
        );
        assert_eq!(MetricsListen::default().to_string(), DEFAULT_METRICS_LISTEN);
        for bad in [
            "",
            "localhost:9725",
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:70000",
            "0177.0.0.1:9725",
            "Off",
            "::1:9725",
        ] {
            let e = bad.parse::<MetricsListen>().unwrap_err();
            assert!(e.contains("metrics_listen"), "{bad}: {e}");
        }
    }
}
