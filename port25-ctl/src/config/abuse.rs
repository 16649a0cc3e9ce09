//! The `abuse:` section: offender tracking in the kernel, block events, the rule that
//! flags a source as likely infected (`top`), and what the daemon does about a flagged
//! user (`auto_hold`, `notify_command`).

use std::{path::PathBuf, time::Duration};

use serde::{de, Deserialize, Deserializer, Serialize};

use super::duration_str;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
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
    /// Put a flagged user on an abuse hold, as `block USER --hold` does.
    pub auto_hold: bool,
    /// How often the daemon reads the whole offender map (besides each block event): the
    /// likely-infected gauge, and sources whose events were lost or came before the flag.
    #[serde(with = "duration_str")]
    pub scan_interval: Duration,
    /// The operator's program, run (never through a shell) when a user is flagged, with
    /// the user, address and figures appended to its arguments.
    #[serde(deserialize_with = "notify_command")]
    pub notify_command: Option<Vec<String>>,
    /// At most one `notify_command` run per user per interval.
    #[serde(with = "duration_str")]
    pub notify_interval: Duration,
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
            auto_hold: false,
            scan_interval: Duration::from_secs(10),
            notify_command: None,
            notify_interval: Duration::from_secs(3600),
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

/// `notify_command: [/path/prog, arg...]`. A string is refused rather than split: whether
/// `"/usr/bin/x 'a b'"` means two words or three is a shell's question, and no shell runs it.
/// The program is checked here, at load (start and reload), not when a user is flagged.
fn notify_command<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    struct Argv;
    impl<'de> de::Visitor<'de> for Argv {
        type Value = Option<Vec<String>>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list: [/absolute/program, argument...]")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
            Err(E::custom(format!(
                "abuse.notify_command must be a list, not a string (no shell splits it): \
                 write [\"{}\", ...] with one item per argument",
                s.split_whitespace().next().unwrap_or("/path/to/program")
            )))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(Argv)
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut argv = Vec::new();
            while let Some(a) = seq.next_element::<String>()? {
                if a.contains('\0') {
                    return Err(de::Error::custom(
                        "abuse.notify_command: an argument holds NUL",
                    ));
                }
                argv.push(a);
            }
            check_program(&argv).map_err(de::Error::custom)?;
            Ok(Some(argv))
        }
    }
    d.deserialize_any(Argv)
}

fn check_program(argv: &[String]) -> Result<(), String> {
    let Some(prog) = argv.first() else {
        return Err(
            "abuse.notify_command is an empty list: leave it out, or name a program".into(),
        );
    };
    let path = PathBuf::from(prog);
    if !path.is_absolute() {
        return Err(format!(
            "abuse.notify_command: `{prog}` is not an absolute path (no PATH search)"
        ));
    }
    let meta =
        std::fs::metadata(&path).map_err(|e| format!("abuse.notify_command: `{prog}`: {e}"))?;
    if !meta.is_file() {
        return Err(format!("abuse.notify_command: `{prog}` is not a file"));
    }
    use std::os::unix::fs::PermissionsExt;
    // access(2) alone says yes to root for any file on some filesystems (and a faccessat
    // that ignores the mode): the mode must have an execute bit too.
    if meta.permissions().mode() & 0o111 == 0
        || nix::unistd::access(&path, nix::unistd::AccessFlags::X_OK).is_err()
    {
        return Err(format!("abuse.notify_command: `{prog}` is not executable"));
    }
    // The daemon runs it as root whenever a subscriber gets flagged, which a subscriber can
    // bring about: a file, or a directory on its way, that another user could change would
    // hand them root. Checked along the path as written and the one its symlinks lead to.
    let real =
        std::fs::canonicalize(&path).map_err(|e| format!("abuse.notify_command: `{prog}`: {e}"))?;
    for p in [&path, &real] {
        for (i, part) in p.ancestors().enumerate() {
            if part.as_os_str().is_empty() {
                continue;
            }
            let m = std::fs::metadata(part)
                .map_err(|e| format!("abuse.notify_command: `{}`: {e}", part.display()))?;
            only_root_can_change(part, &m, i > 0)
                .map_err(|why| format!("abuse.notify_command: `{prog}`: {why}"))?;
        }
    }
    Ok(())
}

/// Owned by root (or the user running this) and writable by no one else; a directory that
/// others may write is accepted when it is sticky (as /tmp: others cannot rename or remove
/// what they do not own in it).
fn only_root_can_change(
    p: &std::path::Path,
    m: &std::fs::Metadata,
    dir: bool,
) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid().as_raw();
    if m.uid() != 0 && m.uid() != me {
        return Err(format!(
            "`{}` is owned by uid {}: only root may own the program and its directories",
            p.display(),
            m.uid()
        ));
    }
    let sticky = m.mode() & 0o1000 != 0;
    if m.mode() & 0o022 != 0 && !(dir && sticky) {
        return Err(format!(
            "`{}` is writable by its group or others (mode {:o}): the daemon runs it as root",
            p.display(),
            m.mode() & 0o7777
        ));
    }
    Ok(())
}
