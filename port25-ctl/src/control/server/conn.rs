//! Client connections: accepting within the limits, the peer's role and actor from its
//! credentials, reading one request frame and writing its answer. Changes go to the writer,
//! reads to the reader; nothing here touches the registry or the maps.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot, Semaphore},
};
use tracing::warn;

use super::{
    limits,
    reader::{ReadJob, Reader},
    writer::{Job, Reply},
};
use crate::{
    control::proto::{self, ErrorKind, Op, Response},
    metrics::{DaemonMetrics, UNKNOWN_VERB},
    registry::Actor,
};

/// Accepts connections and hands each to its own task, within [`limits::MAX_CONNECTIONS`].
pub(super) async fn accept_loop(
    listener: UnixListener,
    jobs: mpsc::Sender<Job>,
    reader: Reader,
    read_gid: Option<nix::unistd::Gid>,
    metrics: DaemonMetrics,
) {
    let max = max_connections();
    let slots = Arc::new(Semaphore::new(max));
    // Peers other than root (the read-only group) may hold at most half the slots, so they
    // can never lock the hooks (root) out of the socket.
    let others = Arc::new(Semaphore::new(max / 2));
    let mut last_warn: Option<Instant> = None;
    let mut suppressed = 0u64;
    let mut warn_rarely = |msg: String| {
        if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            warn!("{msg} ({suppressed} more like it since the last warning)");
            last_warn = Some(Instant::now());
            suppressed = 0;
        } else {
            suppressed += 1;
        }
    };
    loop {
        match listener.accept().await {
            Ok((stream, _)) => match (
                slots.clone().try_acquire_owned(),
                stream.peer_cred().map(|c| c.uid()),
            ) {
                (Ok(slot), Ok(uid)) => {
                    let other = if uid == 0 {
                        None
                    } else {
                        match others.clone().try_acquire_owned() {
                            Ok(p) => Some(p),
                            Err(_) => {
                                warn_rarely(format!(
                                    "{} control connections of non-root peers open: refusing more",
                                    max / 2
                                ));
                                busy(stream, max / 2, &metrics);
                                continue;
                            }
                        }
                    };
                    let (jobs, reader, metrics) = (jobs.clone(), reader.clone(), metrics.clone());
                    tokio::spawn(async move {
                        connection(stream, jobs, reader, read_gid, &metrics).await;
                        drop((slot, other));
                    });
                }
                (_, Err(_)) => {}
                (Err(_), _) => {
                    warn_rarely(format!("{max} control connections open: refusing more"));
                    busy(stream, max, &metrics);
                }
            },
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS persist until something closes: retrying at once
                // would spin.
                warn_rarely(format!("accept: {e}; pausing accepts for 100 ms"));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Answers "busy" and closes. Small enough for an empty socket buffer: a non-blocking
/// write of it never waits.
pub(super) fn busy(stream: UnixStream, max: usize, metrics: &DaemonMetrics) {
    metrics.request(UNKNOWN_VERB, Some(ErrorKind::Busy));
    if let (Ok(frame), Ok(mut s)) = (
        proto::encode(&Response::err(
            ErrorKind::Busy,
            format!("busy: {max} control connections are open; try again"),
        )),
        stream.into_std(),
    ) {
        let _ = std::io::Write::write(&mut s, &frame);
    }
}

/// Connections fit in the open-file limit, leaving room for maps, links and the registry.
pub(super) fn max_connections() -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(s, _)| s)
        .unwrap_or(1024);
    (soft.saturating_sub(256) as usize).clamp(16, limits::MAX_CONNECTIONS)
}

pub(super) enum Role {
    Admin,
    ReadOnly,
}

pub(super) fn role_of(uid: u32, gid: u32, read_gid: Option<nix::unistd::Gid>) -> Option<Role> {
    if uid == 0 || uid == nix::unistd::geteuid().as_raw() {
        return Some(Role::Admin);
    }
    let want = read_gid?;
    if gid == want.as_raw() {
        return Some(Role::ReadOnly);
    }
    let user = nix::unistd::User::from_uid(uid.into()).ok()??;
    let name = std::ffi::CString::new(user.name).ok()?;
    let groups = nix::unistd::getgrouplist(&name, user.gid).ok()?;
    groups.contains(&want).then_some(Role::ReadOnly)
}

pub(super) fn actor(uid: u32, on_behalf_of: Option<String>) -> Actor {
    let name = nix::unistd::User::from_uid(uid.into())
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| format!("uid{uid}"));
    Actor {
        uid,
        name,
        on_behalf_of,
    }
}

/// One client connection: credentials, framing and limits here; changes run in the writer,
/// reads in the reader.
pub(super) async fn connection(
    mut s: UnixStream,
    jobs: mpsc::Sender<Job>,
    reader: Reader,
    read_gid: Option<nix::unistd::Gid>,
    metrics: &DaemonMetrics,
) {
    let Ok(cred) = s.peer_cred() else { return };
    let Some(role) = role_of(cred.uid(), cred.gid(), read_gid) else {
        warn!(
            uid = cred.uid(),
            "refused a control connection from a peer that is not allowed"
        );
        let denied = Response::err(ErrorKind::Denied, "permission denied: root only");
        respond(&mut s, metrics, UNKNOWN_VERB, &denied).await;
        return;
    };
    let req = match tokio::time::timeout(limits::REQUEST_DEADLINE, read_request(&mut s)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let bad = Response::err(ErrorKind::Refused, format!("{e:#}"));
            respond(&mut s, metrics, UNKNOWN_VERB, &bad).await;
            return;
        }
        Err(_) => {
            let secs = limits::REQUEST_DEADLINE.as_secs();
            let late = Response::err(
                ErrorKind::Refused,
                format!("timed out: a request must arrive whole within {secs} s"),
            );
            respond(&mut s, metrics, UNKNOWN_VERB, &late).await;
            return;
        }
    };
    let verb = req.op.verb();
    if matches!(role, Role::ReadOnly) && !req.op.read_only() {
        warn!(uid = cred.uid(), "refused a change from a read-only peer");
        let denied = Response::err(
            ErrorKind::Denied,
            "permission denied: the read-only group may not change anything",
        );
        respond(&mut s, metrics, verb, &denied).await;
        return;
    }
    if req.op.read_only() && !matches!(req.op, Op::Info) {
        let resp = match reader.ask(ReadJob::Op(req.op)).await {
            Ok(v) => Response::ok(v),
            Err(e) => explained(e, &reader).await,
        };
        respond(&mut s, metrics, verb, &resp).await;
        return;
    }
    let actor = actor(cred.uid(), req.on_behalf_of.clone());
    let (reply, answer) = oneshot::channel();
    if jobs.send(Job { req, actor, reply }).await.is_err() {
        let down = Response::err(ErrorKind::Internal, "the daemon is shutting down");
        respond(&mut s, metrics, verb, &down).await;
        return;
    }
    if let Ok((resp, written)) = answer.await {
        let resp = match resp {
            Reply::Done(r) => r,
            Reply::Failed(e) => explained(e, &reader).await,
        };
        respond(&mut s, metrics, verb, &resp).await;
        if let Some(w) = written {
            let _ = w.send(());
        }
    }
}

/// An error answer; an unknown user gets the close names, looked up off the writer.
pub(super) async fn explained(e: anyhow::Error, reader: &Reader) -> Response {
    let msg = format!("{e:#}");
    let kind = ErrorKind::of(&e);
    let Some(unknown) = e.downcast_ref::<crate::registry::UnknownUser>() else {
        return Response::err(kind, msg);
    };
    let close: Vec<String> = match reader.ask(ReadJob::Suggest(unknown.name.clone())).await {
        Ok(v) => serde_json::from_value(v).unwrap_or_default(),
        Err(_) => vec![],
    };
    Response::err(
        kind,
        crate::registry::with_suggestions(&msg, &unknown.name, &close),
    )
}

/// Reads one request; the body buffer grows as bytes arrive, so a length header alone
/// reserves nothing. The caller bounds the time.
pub(super) async fn read_request(s: &mut UnixStream) -> Result<proto::Request> {
    let mut header = [0u8; 4];
    s.read_exact(&mut header)
        .await
        .context("reading the request header")?;
    let len = proto::frame_len(header)?;
    let mut body = Vec::with_capacity(len.min(limits::INITIAL_BODY));
    let got = (&mut *s).take(len as u64).read_to_end(&mut body).await?;
    if got != len {
        bail!("the request ended after {got} of its {len} bytes");
    }
    Ok(proto::decode_request(&body)?)
}

/// The frame for an answer; one over the size limit becomes an error that says so, never
/// silence.
pub(super) fn answer_frame(r: &Response) -> Vec<u8> {
    match proto::encode(r) {
        Ok(f) => f,
        Err(e) => {
            warn!("an answer was too large to send: {e:#}");
            proto::encode(&Response::err(
                ErrorKind::Refused,
                format!(
                    "the answer is too large to send ({e:#}); ask for less (e.g. `audit --limit`)"
                ),
            ))
            .expect("a short error fits")
        }
    }
}

/// Counts an answer for `/metrics` (by verb and result) and writes it.
async fn respond(s: &mut UnixStream, metrics: &DaemonMetrics, verb: &'static str, r: &Response) {
    // An error answer without a kind reads as a refusal to clients too (`ErrorKind`).
    metrics.request(verb, (!r.ok).then(|| r.kind.unwrap_or(ErrorKind::Refused)));
    write(s, r).await;
}

/// Writes an answer within [`limits::WRITE_DEADLINE`]; a client that does not read it is
/// dropped.
pub(super) async fn write(s: &mut UnixStream, r: &Response) {
    let frame = answer_frame(r);
    match tokio::time::timeout(limits::WRITE_DEADLINE, s.write_all(&frame)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!("writing an answer: {e}"),
        Err(_) => warn!("a client did not read its answer in time; dropped"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    pub(super) fn an_answer_over_the_limit_becomes_an_error() {
        let big = "x".repeat(proto::MAX_FRAME + 1);
        let frame = answer_frame(&Response::ok(json!({ "records": big })));
        let len = proto::frame_len(frame[..4].try_into().unwrap()).unwrap();
        let r: Response = serde_json::from_slice(&frame[4..4 + len]).unwrap();
        assert!(!r.ok);
        assert!(r.error.unwrap().contains("too large"));
    }
}
