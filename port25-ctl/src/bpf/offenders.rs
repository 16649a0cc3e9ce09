//! The abuse desk's side of the kernel: the tracking settings the daemon writes, the
//! offender entries `top` reads, and the block events the daemon logs.

use anyhow::{Context as _, Result};
use port25_common::maps::{BlockEvent, Offender, OffenderKey};

use crate::{
    bpf::{livemaps::LiveMaps, maps::Lru, pins::Pins},
    config::Abuse,
};

/// Writes the `abuse:` section where the kernel reads it (at start, reload, reconcile).
/// A pin tree without the abuse maps (an older daemon's, not yet restarted) has nothing to
/// write.
pub fn write_settings(live: &mut LiveMaps, a: &Abuse) -> Result<()> {
    if let Some(m) = live.abuse.as_mut() {
        m.set(0, a.kernel(), 0)
            .context("writing the abuse settings")?;
    }
    Ok(())
}

/// Every tracked source (empty when tracking is off or the map is absent).
pub fn read_all(live: &LiveMaps) -> Result<Vec<(OffenderKey, Offender)>> {
    match live.offenders.as_ref() {
        Some(m) => read_map(m),
        None => Ok(Vec::new()),
    }
}

/// Every tracked source, from the pin tree alone (None: no tracking map pinned there).
pub fn read_pinned(pins: &Pins) -> Result<Option<Vec<(OffenderKey, Offender)>>> {
    let path = pins.map(port25_common::maps::OFFENDERS);
    if !path.exists() {
        return Ok(None);
    }
    let data = aya::maps::MapData::from_pin(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let map = aya::maps::Map::from_map_data(data)?;
    let lru = Lru::<OffenderKey, Offender>::try_from(map)?;
    read_map(&lru).map(Some)
}

fn read_map(m: &Lru<OffenderKey, Offender>) -> Result<Vec<(OffenderKey, Offender)>> {
    let map = aya::maps::IterableMap::map(&m.0);
    if let Ok(all) = crate::bpf::sys::lookup_all::<OffenderKey, Offender>(map) {
        return Ok(all);
    }
    // An LRU entry evicted mid-walk ends aya's iteration with an error for that key only.
    Ok(m.0.iter().filter_map(|kv| kv.ok()).collect())
}

/// Distinct destinations estimated from a 64-bit hash bitmap by linear counting
/// (Whang et al. 1990): n = -m ln(V/m), with m = 64 bits and V of them still zero. Standard
/// error about 10% up to 64 destinations (9.3% at 20, 9.6% at 30); beyond ~100 it grows
/// fast, and a full bitmap (V = 0) reads as [`SATURATED`], meaning "at least that many".
pub fn estimate(bits: u64) -> u64 {
    let zeros = bits.count_zeros();
    if zeros == 0 {
        return SATURATED;
    }
    let m = 64f64;
    (-m * (zeros as f64 / m).ln()).round() as u64
}

/// The estimate of a full bitmap: m ln m, rounded (where linear counting stops).
pub const SATURATED: u64 = 266;

/// The figures the flag rule looks at: (attempts, distinct destinations, whether that
/// estimate is saturated), each the larger of the current window and the one just before it
/// (a source that sprayed in the last window stays flagged through this one).
pub fn figures(o: &Offender, now_ns: u64, window_ns: u64) -> (u64, u64, bool) {
    let age = now_ns.saturating_sub(o.window_ns);
    // Counters the kernel has not rolled over yet (no blocked segment since) belong to a
    // window that is over: the previous one when it ended less than a window ago.
    let windows = if age < window_ns {
        [(o.attempts, o.dests), (o.prev_attempts, o.prev_dests)]
    } else if age < window_ns.saturating_mul(2) {
        [(o.attempts, o.dests), (0, 0)]
    } else {
        [(0, 0), (0, 0)]
    };
    let attempts = windows[0].0.max(windows[1].0);
    let bits = if estimate(windows[0].1) >= estimate(windows[1].1) {
        windows[0].1
    } else {
        windows[1].1
    };
    (attempts, estimate(bits), bits == u64::MAX)
}

/// The source address of a key or event.
pub fn source(k: &OffenderKey) -> std::net::IpAddr {
    if k.family == 6 {
        std::net::IpAddr::from(k.addr)
    } else {
        std::net::IpAddr::from([k.addr[0], k.addr[1], k.addr[2], k.addr[3]])
    }
}

/// An address of the family of `k` (IPv4 in the first 4 bytes).
pub fn addr_of(k: &OffenderKey, a: &[u8; 16]) -> std::net::IpAddr {
    source(&OffenderKey {
        family: k.family,
        addr: *a,
    })
}

/// The name of interface `ifindex` in this network namespace, or its number.
pub fn ifname(ifindex: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: a buffer of IF_NAMESIZE, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("#{ifindex}");
    }
    // SAFETY: NUL-terminated by if_indextoname on success.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// One ring-buffer record as an event (None for a record of another size).
pub fn parse_event(bytes: &[u8]) -> Option<BlockEvent> {
    if bytes.len() < size_of::<BlockEvent>() {
        return None;
    }
    // SAFETY: BlockEvent is plain data of fixed-width fields; read unaligned from the ring.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const BlockEvent) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_counting_is_close_for_small_counts_and_saturates() {
        assert_eq!(estimate(0), 0);
        assert_eq!(estimate(1), 1);
        // 20 distinct bits set: -64 ln(44/64) = 23.98.
        assert_eq!(estimate((1u64 << 20) - 1), 24);
        assert_eq!(estimate(u64::MAX), SATURATED);
    }

    #[test]
    fn figures_follow_the_windows() {
        let w = 600_000_000_000;
        let o = Offender {
            window_ns: 1_000,
            attempts: 5,
            dests: 1,
            prev_attempts: 150,
            prev_dests: 0,
            ..Default::default()
        };
        assert_eq!(figures(&o, 1_000 + 10, w), (150, 1, false));
        // The current window is over: its counts are the previous window's now.
        assert_eq!(figures(&o, 1_000 + w + 1, w), (5, 1, false));
        assert_eq!(figures(&o, 1_000 + 2 * w, w), (0, 0, false));
    }
}
