//! The control socket's wire format: a 4-byte big-endian length, then one JSON object.
//! Requests carry a protocol version; frames over [`MAX_FRAME`] are refused unread.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::{net::Prefix, registry::SyncSession, store::EntryKind};

pub const VERSION: u32 = 1;
/// Large enough for a `session sync` of ~200k sessions; larger frames are refused unread.
pub const MAX_FRAME: usize = 16 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub v: u32,
    pub op: Op,
    /// Who the caller says it acts for (e.g. `SUDO_USER`): recorded in the audit log beside
    /// the uid the kernel reports, never used to decide anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_behalf_of: Option<String>,
}

impl Request {
    pub fn new(op: Op) -> Request {
        Request {
            v: VERSION,
            op,
            on_behalf_of: std::env::var("SUDO_USER").ok().filter(|s| !s.is_empty()),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    /// Daemon facts (pid, uptime, reconcile counts) for `status`.
    Info,
    Reload,
    Detach,
    Unblock {
        user: String,
        #[serde(default)]
        for_secs: Option<u64>,
        #[serde(default)]
        until: Option<Timestamp>,
        #[serde(default)]
        reason: Option<String>,
        #[serde(default)]
        new: bool,
    },
    Block {
        user: String,
        #[serde(default)]
        reason: Option<String>,
        #[serde(default)]
        new: bool,
    },
    UserShow {
        user: String,
    },
    UserList {
        #[serde(default)]
        unblocked: bool,
        #[serde(default)]
        expiring: bool,
    },
    UserAdd {
        user: String,
    },
    UserRemove {
        user: String,
    },
    UserBind {
        user: String,
        prefix: Prefix,
    },
    UserUnbind {
        user: String,
        prefix: Prefix,
    },
    SessionUp {
        user: String,
        addrs: Vec<Prefix>,
        #[serde(default)]
        id: Option<String>,
        #[serde(default)]
        source: Option<String>,
    },
    SessionDown {
        #[serde(default)]
        id: Option<String>,
        #[serde(default)]
        user: Option<String>,
        #[serde(default)]
        addr: Option<Prefix>,
    },
    SessionSync {
        sessions: Vec<SyncSession>,
        /// When the list was taken; events after it win over the list. Default: now.
        #[serde(default)]
        taken_at: Option<Timestamp>,
    },
    EntryAdd {
        kind: EntryKind,
        prefix: Prefix,
        #[serde(default)]
        until: Option<Timestamp>,
        #[serde(default)]
        note: Option<String>,
    },
    EntryRemove {
        kind: EntryKind,
        prefix: Prefix,
    },
    EntryList {
        kind: EntryKind,
    },
    Audit {
        #[serde(default)]
        user: Option<String>,
        #[serde(default)]
        since: Option<Timestamp>,
        #[serde(default)]
        limit: usize,
    },
}

impl Op {
    /// Ops that change nothing: open to the configured read-only group.
    pub fn read_only(&self) -> bool {
        matches!(
            self,
            Op::Info
                | Op::UserShow { .. }
                | Op::UserList { .. }
                | Op::EntryList { .. }
                | Op::Audit { .. }
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Response {
    pub fn ok(data: serde_json::Value) -> Response {
        Response {
            ok: true,
            error: None,
            data,
        }
    }
    pub fn err(msg: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(msg.into()),
            data: serde_json::Value::Null,
        }
    }
}

pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        bail!(
            "message of {} bytes is over the {MAX_FRAME}-byte limit",
            body.len()
        );
    }
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    Ok(out)
}

/// Length of the frame announced by a 4-byte header, refused when over the limit.
pub fn frame_len(header: [u8; 4]) -> Result<usize> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        bail!("frame of {len} bytes is over the {MAX_FRAME}-byte limit");
    }
    Ok(len)
}

pub fn decode_request(body: &[u8]) -> Result<Request> {
    let req: Request = serde_json::from_slice(body).map_err(|e| anyhow!("bad request: {e}"))?;
    if req.v != VERSION {
        bail!(
            "protocol version {} is not supported (this daemon speaks {VERSION})",
            req.v
        );
    }
    Ok(req)
}

#[derive(Debug, thiserror::Error)]
#[error("the port25 daemon is not running (no answer on {path}): {source}; enforcement continues from the pinned programs")]
pub struct DaemonDown {
    pub path: String,
    #[source]
    pub source: std::io::Error,
}

/// One request, one response, over a blocking socket (the CLI side).
pub fn call(socket: &Path, op: Op, timeout: Duration) -> Result<Response> {
    let mut s = UnixStream::connect(socket).map_err(|source| DaemonDown {
        path: socket.display().to_string(),
        source,
    })?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    // A daemon that refuses a peer answers and closes without reading the request, so the
    // write may fail (EPIPE) while the answer is waiting: read it before reporting the write.
    let written = s.write_all(&encode(&Request::new(op))?);
    let mut header = [0u8; 4];
    if let Err(e) = s.read_exact(&mut header) {
        written?;
        return Err(e).context("reading the daemon's answer");
    }
    let mut body = vec![0u8; frame_len(header)?];
    s.read_exact(&mut body)
        .context("reading the daemon's answer")?;
    serde_json::from_slice(&body).context("decoding the daemon's answer")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_limits() {
        let bytes = encode(&Request::new(Op::Reload)).unwrap();
        let len = frame_len(bytes[..4].try_into().unwrap()).unwrap();
        assert_eq!(decode_request(&bytes[4..4 + len]).unwrap().op, Op::Reload);
        assert!(frame_len((MAX_FRAME as u32 + 1).to_be_bytes()).is_err());
        assert!(decode_request(br#"{"v":2,"op":"reload"}"#)
            .unwrap_err()
            .to_string()
            .contains("version"));
        assert!(decode_request(br#"{"v":1,"op":"format_disk"}"#).is_err());
        assert!(decode_request(b"\xff\x00garbage").is_err());
        assert!(decode_request(br#"{"v":1,"op":"reload","x":1}"#).is_err());
    }
}
