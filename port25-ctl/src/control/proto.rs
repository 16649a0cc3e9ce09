//! The control socket's wire format: a 4-byte big-endian length, then one JSON object.
//! Requests carry a protocol version; frames over [`MAX_FRAME`] are refused unread.
//!
//! Each op is a request struct tied to its reply type ([`Call`]): [`Client::call`] sends one
//! and decodes its reply ([`super::reply`]) or a typed [`Error`]. Adding a verb: a request
//! struct and an [`Op`] variant and a `calls!` line here, its reply in `reply.rs`, its
//! handler in `server/ops.rs`, its clap arguments and dispatch arm in `cli/mod.rs`, its
//! renderer in `cli/render.rs`.

use std::{io::Read, os::unix::net::UnixStream, path::Path, time::Duration};

use std::path::PathBuf;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

pub use super::error::{DaemonDown, Error, ErrorKind};
use super::reply;
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

/// The requests, one struct per op (the wire form is `{"op_name": {fields}}`, or a bare
/// `"op_name"` for those without fields). Each says what it answers through [`Call`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    /// Daemon facts (pid, uptime, reconcile counts) for `status`.
    Info,
    Reload,
    Detach,
    Unblock(Unblock),
    Block(Block),
    Unhold(Unhold),
    UserShow(UserShow),
    UserList(UserList),
    UserAdd(UserAdd),
    UserRemove(UserRemove),
    UserBind(UserBind),
    UserUnbind(UserUnbind),
    SessionUp(SessionUp),
    SessionDown(SessionDown),
    SessionSync(SessionSync),
    EntryAdd(EntryAdd),
    EntryRemove(EntryRemove),
    EntryList(EntryList),
    Audit(Audit),
    Top(Top),
}

/// A request and the type of its answer's `data`: a client that sends a `C` decodes a
/// `C::Reply`, and the daemon's handler for `C` returns one.
pub trait Call: Into<Op> {
    type Reply: Serialize + serde::de::DeserializeOwned;
}

/// The answer type of request `C`.
pub type ReplyOf<C> = <C as Call>::Reply;

/// Ties each request to its reply type and its [`Op`] variant.
macro_rules! calls {
    ($($req:ident => $reply:ty),* $(,)?) => {$(
        impl Call for $req {
            type Reply = $reply;
        }
        impl From<$req> for Op {
            fn from(r: $req) -> Op {
                Op::$req(r)
            }
        }
    )*};
}

calls! {
    Unblock => reply::PolicyChange,
    Block => reply::PolicyChange,
    Unhold => reply::PolicyChange,
    UserShow => reply::UserDetail,
    UserList => reply::UserList,
    UserAdd => reply::UserAdded,
    UserRemove => reply::UserRemoved,
    UserBind => reply::Bound,
    UserUnbind => reply::Unbound,
    SessionUp => reply::SessionUp,
    SessionDown => reply::SessionDown,
    SessionSync => reply::SyncSummary,
    EntryAdd => reply::EntryAdded,
    EntryRemove => reply::EntryRemoved,
    EntryList => reply::EntryList,
    Audit => reply::AuditLog,
    Top => reply::Top,
}

/// The ops without fields.
macro_rules! unit_calls {
    ($($req:ident => $reply:ty),* $(,)?) => {$(
        #[derive(Debug, Clone, Copy, PartialEq)]
        pub struct $req;
        impl Call for $req {
            type Reply = $reply;
        }
        impl From<$req> for Op {
            fn from(_: $req) -> Op {
                Op::$req
            }
        }
    )*};
}

unit_calls! {
    Info => reply::Info,
    Reload => reply::Reloaded,
    Detach => reply::Detached,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Unblock {
    pub user: String,
    #[serde(default)]
    pub for_secs: Option<u64>,
    #[serde(default)]
    pub until: Option<Timestamp>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub new: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Block {
    pub user: String,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub new: bool,
    /// Also put the user on an abuse hold (needs `reason`): nothing reopens port 25 for
    /// them until `unhold`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hold: bool,
}

/// Lifts an abuse hold; the user stays blocked.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Unhold {
    pub user: String,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UserShow {
    pub user: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UserList {
    #[serde(default)]
    pub unblocked: bool,
    #[serde(default)]
    pub expiring: bool,
    /// Only users on an abuse hold.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
    /// At most this many users (the first by name): reads no more of the registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UserAdd {
    pub user: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UserRemove {
    pub user: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UserBind {
    pub user: String,
    pub prefix: Prefix,
    /// Accepts a prefix wider than the `limits` floor; audited.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force_wide: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UserUnbind {
    pub user: String,
    pub prefix: Prefix,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SessionUp {
    pub user: String,
    pub addrs: Vec<Prefix>,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force_wide: bool,
    /// The access server's unblock attribute (RADIUS) carried with the session: unblocks
    /// the user, for `unblock_for_secs` if given. Refused for a held user (the session is
    /// still recorded).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unblock: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unblock_for_secs: Option<u64>,
    /// The session's device (`pppN`): attached before the answer when a glob entry governs
    /// it. Absent: the device the first address is routed through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iface: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SessionDown {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub addr: Option<Prefix>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SessionSync {
    pub sessions: Vec<SyncSession>,
    /// When the list was taken; events after it win over the list. Default: now.
    #[serde(default)]
    pub taken_at: Option<Timestamp>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EntryAdd {
    pub kind: EntryKind,
    pub prefix: Prefix,
    #[serde(default)]
    pub until: Option<Timestamp>,
    #[serde(default)]
    pub note: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force_wide: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EntryRemove {
    pub kind: EntryKind,
    pub prefix: Prefix,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EntryList {
    pub kind: EntryKind,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Audit {
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub since: Option<Timestamp>,
    #[serde(default)]
    pub limit: usize,
}

/// The worst offending sources the kernel tracks (`top`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Top {
    /// Only sources blocked within this many seconds (default: `abuse.flag_window`).
    #[serde(default)]
    pub since_secs: Option<u64>,
    /// At most this many sources (0 = all).
    #[serde(default)]
    pub limit: usize,
}

impl Op {
    /// The op's wire name (its `rename_all = "snake_case"` key), as metrics label it.
    pub fn verb(&self) -> &'static str {
        match self {
            Op::Info => "info",
            Op::Reload => "reload",
            Op::Detach => "detach",
            Op::Unblock(_) => "unblock",
            Op::Block(_) => "block",
            Op::Unhold(_) => "unhold",
            Op::UserShow(_) => "user_show",
            Op::UserList(_) => "user_list",
            Op::UserAdd(_) => "user_add",
            Op::UserRemove(_) => "user_remove",
            Op::UserBind(_) => "user_bind",
            Op::UserUnbind(_) => "user_unbind",
            Op::SessionUp(_) => "session_up",
            Op::SessionDown(_) => "session_down",
            Op::SessionSync(_) => "session_sync",
            Op::EntryAdd(_) => "entry_add",
            Op::EntryRemove(_) => "entry_remove",
            Op::EntryList(_) => "entry_list",
            Op::Audit(_) => "audit",
            Op::Top(_) => "top",
        }
    }

    /// Ops that change nothing: open to the configured read-only group.
    pub fn read_only(&self) -> bool {
        matches!(
            self,
            Op::Info
                | Op::UserShow(_)
                | Op::UserList(_)
                | Op::EntryList(_)
                | Op::Audit(_)
                | Op::Top(_)
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Of an error: lets a client tell a refusal from a failure (absent from older daemons).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ErrorKind>,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Response {
    pub fn ok(data: serde_json::Value) -> Response {
        Response {
            ok: true,
            error: None,
            kind: None,
            data,
        }
    }
    pub fn err(kind: ErrorKind, msg: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(msg.into()),
            kind: Some(kind),
            data: serde_json::Value::Null,
        }
    }

    /// The reply of a `C`, or the daemon's error.
    pub fn reply<C: Call>(self) -> Result<C::Reply, Error> {
        if !self.ok {
            return Err(Error::Daemon {
                kind: self.kind.unwrap_or(ErrorKind::Refused),
                message: self.error.unwrap_or_default(),
            });
        }
        Ok(serde_json::from_value(self.data)?)
    }
}

pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, Error> {
    let body = serde_json::to_vec(msg).map_err(|e| Error::Frame(format!("encoding: {e}")))?;
    if body.len() > MAX_FRAME {
        return Err(Error::Frame(format!(
            "message of {} bytes is over the {MAX_FRAME}-byte limit",
            body.len()
        )));
    }
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    Ok(out)
}

/// Length of the frame announced by a 4-byte header, refused when over the limit.
pub fn frame_len(header: [u8; 4]) -> Result<usize, Error> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(Error::Frame(format!(
            "frame of {len} bytes is over the {MAX_FRAME}-byte limit"
        )));
    }
    Ok(len)
}

/// The daemon's side: a request it can serve, or why not ([`Error::BadRequest`]).
pub fn decode_request(body: &[u8]) -> Result<Request, Error> {
    let req: Request =
        serde_json::from_slice(body).map_err(|e| Error::BadRequest(format!("bad request: {e}")))?;
    if req.v != VERSION {
        return Err(Error::BadRequest(format!(
            "protocol version {} is not supported (this daemon speaks {VERSION})",
            req.v
        )));
    }
    Ok(req)
}

/// Connecting failed for another reason than an absent daemon (most often permissions):
/// saying "not running" then would send the operator the wrong way.
fn connect(socket: &Path) -> Result<UnixStream, Error> {
    use std::io::ErrorKind as Io;
    UnixStream::connect(socket).map_err(|cause| {
        let path = socket.display().to_string();
        match cause.kind() {
            Io::NotFound | Io::ConnectionRefused => DaemonDown { path, cause }.into(),
            Io::PermissionDenied => Error::PermissionDenied { path, cause },
            _ => Error::Connect { path, cause },
        }
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

/// The daemon's control socket, from the client side: one request, one answer, over a
/// blocking socket.
#[derive(Debug, Clone)]
pub struct Client {
    pub socket: PathBuf,
    pub timeout: Duration,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Client {
        Client {
            socket: socket.into(),
            timeout,
        }
    }

    /// Sends `c` and decodes its reply; a refusal is [`Error::Daemon`].
    pub fn call<C: Call>(&self, c: C) -> Result<C::Reply, Error> {
        self.exchange(c.into())?.reply::<C>()
    }

    /// Sends any op and returns the answer undecoded.
    pub fn exchange(&self, op: Op) -> Result<Response, Error> {
        let io = |context| move |cause| Error::Io { context, cause };
        let mut s = connect(&self.socket)?;
        s.set_read_timeout(Some(self.timeout))
            .map_err(io("setting the socket timeout"))?;
        s.set_write_timeout(Some(self.timeout))
            .map_err(io("setting the socket timeout"))?;
        let frame = encode(&Request::new(op))?;
        // A daemon that refuses a peer answers and closes without reading the request, so
        // the write may fail (EPIPE) while the answer is waiting: read it before reporting
        // the write.
        let written = send_all(&s, &frame);
        let mut header = [0u8; 4];
        if let Err(e) = s.read_exact(&mut header) {
            written.map_err(io("sending the request"))?;
            return Err(io("reading the daemon's answer")(e));
        }
        let len = frame_len(header)?;
        let mut body = vec![0u8; len];
        s.read_exact(&mut body)
            .map_err(io("reading the daemon's answer"))?;
        Ok(serde_json::from_slice(&body)?)
    }
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
                prop_assert_eq!(&decode_request(&bytes[4..]).unwrap(), &req);
                // The metrics' verb label is the wire name.
                let wire = match serde_json::to_value(&req.op).unwrap() {
                    Value::String(s) => s,
                    Value::Object(m) => m.keys().next().unwrap().clone(),
                    other => panic!("an op encodes as a name or a one-key object: {other}"),
                };
                prop_assert_eq!(wire.as_str(), req.op.verb());
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
            "info", "reload", "detach", "unblock", "block", "unhold", "user_show", "user_list", "user_add",
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
