//! Block events from the kernel's ring buffer, as log lines: one per source per
//! `abuse.event_interval` (limited in the kernel), and at most `abuse.log_per_second` lines
//! a second in all (limited here; what is left out is counted in one summary line).

use std::time::{Duration, Instant};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

use crate::{
    bpf::offenders::{self, estimate},
    registry,
};

use super::Daemon;

pub(super) struct Events {
    ring: AsyncFd<RingBuf<MapData>>,
    window: Instant,
    logged: u32,
    suppressed: u64,
}

impl Events {
    pub(super) fn open(ring: RingBuf<MapData>) -> Result<Events> {
        Ok(Events {
            // SAFETY: the ring owns its fd, which stays open as long as it is registered.
            ring: unsafe { AsyncFd::register(ring) }
                .map_err(|e| anyhow::anyhow!("watching the block-event ring: {e}"))?,
            window: Instant::now(),
            logged: 0,
            suppressed: 0,
        })
    }

    /// Waits until the ring has records; never returns without a ring.
    pub(super) async fn ready(events: Option<&Events>) {
        match events {
            Some(e) => match e.ring.readable().await {
                Ok(mut g) => g.clear_ready(),
                Err(_) => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }
}

impl Daemon {
    /// Logs what the ring holds.
    pub(super) fn log_events(&mut self) {
        let Some(mut ev) = self.events.take() else {
            return;
        };
        let cap = self.cfg.abuse.log_per_second;
        let mut read = Vec::new();
        while let Some(item) = ev.ring.get_mut().next() {
            if let Some(e) = offenders::parse_event(&item) {
                read.push(e);
            }
        }
        for e in &read {
            if ev.window.elapsed() >= Duration::from_secs(1) {
                if ev.suppressed > 0 {
                    warn!(
                        suppressed = ev.suppressed,
                        "block events not logged: more than abuse.log_per_second ({cap}) in a second"
                    );
                }
                ev.window = Instant::now();
                ev.logged = 0;
                ev.suppressed = 0;
            }
            if ev.logged >= cap {
                ev.suppressed += 1;
                continue;
            }
            ev.logged += 1;
            let src = offenders::source(&e.key);
            let dst = offenders::addr_of(&e.key, &e.dst);
            let user = self.user_of(src).unwrap_or_else(|| "-".into());
            let dst = match dst {
                std::net::IpAddr::V6(a) => format!("[{a}]:{}", e.dport),
                a => format!("{a}:{}", e.dport),
            };
            info!(
                user = %user,
                src = %src,
                dst = %dst,
                iface = %offenders::ifname(e.ifindex),
                attempts = e.attempts,
                destinations = estimate(e.dests),
                reason = %port25_common::Reason::from_u32_or_block(e.reason as u32).name(),
                "blocked"
            );
        }
        self.events = Some(ev);
        // After the lines: a hold's own log line reads after the event that led to it.
        for e in &read {
            self.flag_event(e);
        }
    }

    fn user_of(&mut self, ip: std::net::IpAddr) -> Option<String> {
        let tx = self.store.read().ok()?;
        registry::holder_of(&*tx, ip).ok().flatten().map(|(u, _)| u)
    }
}
