//! The control socket's wire format: a 4-byte big-endian length, then one JSON object.
//! Requests carry a protocol version; frames over [`MAX_FRAME`] are refused unread.

use std::{io::Read, os::unix::net::UnixStream, path::Path, time::Duration};

use anyhow::{anyhow, bail, Context as _, Result};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::{net::Prefix, registry::store::EntryKind, registry::SyncSession};

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
        /// Accepts a prefix wider than the `limits` floor; audited.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        force_wide: bool,
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
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        force_wide: bool,
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
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        force_wide: bool,
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

/// No daemon listens on the socket (absent, or nothing accepting): not a permission problem.
#[derive(Debug, thiserror::Error)]
#[error("the port25 daemon is not running (no answer on {path}: {cause}); enforcement continues from the pinned programs (`port25-ctl status`)")]
pub struct DaemonDown {
    pub path: String,
    // Not `source`: the message already names it, and `{:#}` would print it twice.
    pub cause: std::io::Error,
}

/// Connecting failed for another reason than an absent daemon (most often permissions):
/// saying "not running" then would send the operator the wrong way.
fn connect(socket: &Path) -> Result<UnixStream> {
    use std::io::ErrorKind;
    UnixStream::connect(socket).map_err(|e| match e.kind() {
        ErrorKind::NotFound | ErrorKind::ConnectionRefused => DaemonDown {
            path: socket.display().to_string(),
            cause: e,
        }
        .into(),
        ErrorKind::PermissionDenied => anyhow!(
            "cannot connect to the port25 daemon on {}: {e}: the control socket is root's \
             (members of `read_group` may use the read-only verbs); run as root, e.g. with sudo",
            socket.display()
        ),
        _ => anyhow!(
            "cannot connect to the port25 daemon on {}: {e}",
            socket.display()
        ),
    })
}

/// Writes the whole request without raising SIGPIPE: the CLI restores SIGPIPE's default
/// (so `port25-ctl ... | head` ends quietly), and a daemon that closes early must surface
/// as an error here, not kill the client before it reads the daemon's answer.
fn send_all(s: &UnixStream, mut buf: &[u8]) -> std::io::Result<()> {
    use nix::sys::socket::{send, MsgFlags};
    use std::os::fd::AsRawFd as _;
    while !buf.is_empty() {
        match send(s.as_raw_fd(), buf, MsgFlags::MSG_NOSIGNAL) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// One request, one response, over a blocking socket (the CLI side).
pub fn call(socket: &Path, op: Op, timeout: Duration) -> Result<Response> {
    let mut s = connect(socket)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    // A daemon that refuses a peer answers and closes without reading the request, so the
    // write may fail (EPIPE) while the answer is waiting: read it before reporting the write.
    let written = send_all(&s, &encode(&Request::new(op))?);
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

/// Property tests of the request decoder (issue 8, section 2): arbitrary bytes, arbitrary
/// JSON and arbitrary ops never panic; each is a request or a clear error.
#[cfg(test)]
mod proptests {
    use proptest::prelude::*;
    use serde_json::{json, Value};

    use super::*;

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            prop::sample::select(vec![
                "reload",
                "unblock",
                "alice",
                "0.0.0.0/0",
                "::/0",
                "100.64.0.2",
                "exempt",
                "server",
                "2300-01-01T00:00:00Z",
                "9999-12-31T00:00:00Z",
                "",
                "-x",
            ])
            .prop_map(Value::from),
            "\\PC{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            let key = prop::sample::select(vec![
                "v",
                "op",
                "user",
                "prefix",
                "until",
                "for_secs",
                "kind",
                "addrs",
                "id",
                "sessions",
                "force_wide",
                "new",
                "reason",
                "limit",
                "on_behalf_of",
                "x",
            ]);
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                prop::collection::btree_map(key, inner, 0..6).prop_map(|m| Value::Object(
                    m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
                )),
            ]
        })
    }

    fn check(body: &[u8]) -> Result<(), TestCaseError> {
        match decode_request(body) {
            Ok(req) => {
                // A request that decodes encodes and decodes back to itself.
                let bytes = encode(&req).unwrap();
                prop_assert_eq!(decode_request(&bytes[4..]).unwrap(), req);
            }
            Err(e) => {
                let m = e.to_string();
                prop_assert!(
                    m.starts_with("bad request") || m.contains("protocol version"),
                    "{}",
                    m
                );
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..256)) {
            check(&body)?;
        }

        #[test]
        fn arbitrary_json_never_panics(v in json_value()) {
            check(&serde_json::to_vec(&v).unwrap())?;
        }

        #[test]
        fn arbitrary_ops_never_panic(op in json_value(), variant in prop::sample::select(vec![
            "info", "reload", "detach", "unblock", "block", "user_show", "user_list", "user_add",
            "user_remove", "user_bind", "user_unbind", "session_up", "session_down",
            "session_sync", "entry_add", "entry_remove", "entry_list", "audit", "format_disk",
        ])) {
            let req = json!({ "v": 1, "op": { variant: op } });
            check(&serde_json::to_vec(&req).unwrap())?;
            let req = json!({ "v": 1, "op": variant });
            check(&serde_json::to_vec(&req).unwrap())?;
        }

        #[test]
        fn any_header_is_a_length_or_a_refusal(h in any::<[u8; 4]>()) {
            match frame_len(h) {
                Ok(n) => prop_assert!(n <= MAX_FRAME),
                Err(e) => prop_assert!(e.to_string().contains("over the")),
            }
        }
    }
}
