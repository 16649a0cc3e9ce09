//! The `abuse:` section: offender tracking in the kernel, block events, and the rule that
//! flags a source as likely infected (`top`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::duration_str;

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Abuse {
    /// Sources the kernel tracks (LRU: the least recently blocked go first); 0 = off, and
    /// the kernel then touches neither the tracking map nor the event ring.
    pub track_sources: u32,
    /// At most one block event (log line) per source per interval, limited in the kernel.
    #[serde(with = "duration_str")]
    pub event_interval: Duration,
    /// Block-event log lines per second, all sources together; the rest are counted and
    /// summarised in one line.
    pub log_per_second: u32,
    /// Likely infected: more than this many distinct destinations within `flag_window`...
    pub flag_destinations: u32,
    /// ... or more than this many connection attempts (SYNs) within `flag_window`.
    pub flag_attempts: u64,
    /// The window of the counters: the kernel rolls a source's counters over after it.
    #[serde(with = "duration_str")]
    pub flag_window: Duration,
}

impl Default for Abuse {
    fn default() -> Self {
        Abuse {
            track_sources: port25_common::maps::DEFAULT_TRACK_SOURCES,
            event_interval: Duration::from_secs(10),
            log_per_second: 20,
            flag_destinations: 20,
            flag_attempts: 100,
            flag_window: Duration::from_secs(600),
        }
    }
}

impl Abuse {
    /// The kernel's copy of this section.
    pub fn kernel(&self) -> port25_common::maps::AbuseSettings {
        port25_common::maps::AbuseSettings {
            track: (self.track_sources > 0) as u32,
            _pad: 0,
            window_ns: self.flag_window.as_nanos() as u64,
            event_interval_ns: self.event_interval.as_nanos() as u64,
        }
    }

    /// The flag rule: more than `flag_destinations` distinct destinations or more than
    /// `flag_attempts` attempts, in the current window or the one just before it.
    pub fn flagged(&self, attempts: u64, destinations: u64) -> bool {
        attempts > self.flag_attempts || destinations > self.flag_destinations as u64
    }
}
