//! `daemon --kernel-log`: the programs' debug messages (aya-log, `port25-ebpf/src/klog.rs`)
//! forwarded into `tracing` under the target [`TARGET`].
//!
//! The messages travel through the ring buffer of the load that made the programs. The
//! programs outlive the daemon: after it exits they keep writing into that ring, which no
//! one reads. That is harmless: once full, a message costs a failed reservation and is
//! dropped, and the ring (128 KiB) is freed with the programs. The next daemon replaces the
//! programs (a new load, switch as its own `--kernel-log` says), and only its own ring is
//! read: messages left in the old one are lost.

use anyhow::{anyhow, Result};
use aya::Ebpf;
use aya_log::EbpfLogger;
use port25_common::Reason;
use tokio::io::unix::AsyncFd;

/// The `tracing` target of every kernel message.
pub const TARGET: &str = "port25::kernel";

/// Starts forwarding: takes the ring from `ebpf` (loaded with the switch on) and reads it
/// on the runtime until the daemon exits.
pub fn start(ebpf: &mut Ebpf) -> Result<tokio::task::JoinHandle<()>> {
    let logger = EbpfLogger::init_with_logger(ebpf, Forward)
        .map_err(|e| anyhow!("starting the kernel log reader: {e}"))?;
    // SAFETY: the logger owns its ring's descriptor for as long as the AsyncFd owns it.
    let mut fd = unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow!("watching the kernel log ring: {e}"))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                tracing::warn!(target: TARGET, "kernel log reader stopped");
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}

/// A `log::Log` that hands aya-log's records to `tracing`.
struct Forward;

impl log::Log for Forward {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let msg = rewrite(&record.args().to_string());
        // tracing's macros need a level known at compile time.
        match record.level() {
            log::Level::Error => tracing::error!(target: TARGET, "{msg}"),
            log::Level::Warn => tracing::warn!(target: TARGET, "{msg}"),
            log::Level::Info => tracing::info!(target: TARGET, "{msg}"),
            log::Level::Debug => tracing::debug!(target: TARGET, "{msg}"),
            log::Level::Trace => tracing::trace!(target: TARGET, "{msg}"),
        }
    }

    fn flush(&self) {}
}

/// The kernel's message as the daemon logs it. The kernel keeps its side cheap for the
/// verifier (one call site, numbers): it sends `reason=N`, IPv4 addresses as IPv4-mapped
/// IPv6, and `::` for addresses a doubt came before. Here the reason gets its name (as in
/// counters and `check`), IPv4 its own form, and a doubt before the addresses says so.
/// Any other message is left as it came.
pub fn rewrite(msg: &str) -> String {
    let mut fields: Vec<(&str, String)> = Vec::new();
    for tok in msg.split(' ') {
        let Some((k, v)) = tok.split_once('=') else {
            return msg.to_string();
        };
        fields.push((k, v.to_string()));
    }
    let get = |k: &str| {
        fields
            .iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.as_str())
    };
    if get("reason").is_none() {
        return msg.to_string();
    }
    let before_addrs = get("src") == Some("::") && get("dst") == Some("::");
    let mut out = Vec::new();
    for (k, v) in &fields {
        let v = match *k {
            "reason" => match v.parse().ok().and_then(Reason::from_u32) {
                Some(r) => r.name().to_string(),
                None => v.clone(),
            },
            "src" | "dst" | "dport" if before_addrs => continue,
            "src" | "dst" => match v.parse::<std::net::Ipv6Addr>() {
                Ok(a) => a.to_canonical().to_string(),
                Err(_) => v.clone(),
            },
            _ => v.clone(),
        };
        out.push(format!("{k}={v}"));
    }
    if before_addrs {
        out.push("(before the addresses)".into());
    }
    out.join(" ")
}

#[cfg(test)]
mod tests {
    use super::rewrite;

    #[test]
    fn numbers_and_mapped_addresses_become_what_operators_read() {
        assert_eq!(
            rewrite("reason=8 src=::ffff:100.64.0.2 dst=::ffff:203.0.113.80 dport=25 hook=xdp"),
            "reason=block_port src=100.64.0.2 dst=203.0.113.80 dport=25 hook=xdp"
        );
        assert_eq!(
            rewrite("reason=4 src=2001:db8:100::2 dst=2001:db8:25::25 dport=25 hook=tc"),
            "reason=pass_mail_server src=2001:db8:100::2 dst=2001:db8:25::25 dport=25 hook=tc"
        );
        assert_eq!(
            rewrite("reason=10 src=:: dst=:: dport=0 hook=tc_raw"),
            "reason=block_truncated hook=tc_raw (before the addresses)"
        );
        // Not the kernel's form: left as it came.
        assert_eq!(rewrite("reason=99 x"), "reason=99 x");
        assert_eq!(rewrite("reason=99 src=1"), "reason=99 src=1");
        assert_eq!(rewrite("other words"), "other words");
    }
}
