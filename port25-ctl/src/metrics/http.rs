//! The metrics endpoint: its own thread and runtime, so neither a slow scraper nor a slow
//! scrape (a million-entry map read) touches the daemon's loop. The thread owns the listener;
//! the daemon only tells it where to listen (start, reload) and never waits for it.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Method, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::mpsc};
use tracing::{error, info, warn};

use super::Sources;
use crate::config::MetricsListen;

/// Scrapers served at once; more are closed at once (Prometheus needs one).
const MAX_CONNECTIONS: usize = 16;
/// The request head must arrive within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection (keep-alive included) lives at most this long; the scraper reconnects.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Scrapes start at least this far apart (later ones wait their turn): a scraper in a loop
/// gets at most ten a second, a few per cent of a core, never the writer's CPU.
const SCRAPE_SPACING: Duration = Duration::from_millis(100);

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The daemon's handle on the metrics thread.
pub struct MetricsServer {
    tx: mpsc::UnboundedSender<Listen>,
}

/// What the metrics thread is told to listen on.
pub enum Listen {
    /// Bind it there, or log why not and keep what it has (start; a reload that keeps the
    /// address tries an unbound one again; a move to an address that needs the current one's
    /// port).
    Try(MetricsListen),
    /// A listener the daemon bound (a reload's new address): serve it, drop the old one.
    Bound(std::net::TcpListener),
}

/// A reload's new `metrics_listen`, bound (or found bindable) before the reload applies
/// anything, handed to the thread by [`MetricsServer::commit`] once the reload succeeded.
pub struct Prepared(Listen);

impl MetricsServer {
    /// Starts the thread, listening where `listen` says. A failure to listen is logged by the
    /// thread, naming the address, and the daemon goes on: enforcement and the control socket
    /// never depend on metrics.
    pub fn start(sources: Sources, listen: MetricsListen) -> Result<MetricsServer> {
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(Listen::Try(listen)).expect("the receiver is alive");
        std::thread::Builder::new()
            .name("port25-metrics".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => return error!("metrics: no runtime, serving no metrics: {e}"),
                };
                rt.block_on(serve(sources, rx));
            })
            .context("starting the metrics thread")?;
        Ok(MetricsServer { tx })
    }

    /// A reload's `metrics_listen` (`old` is the running config's): a changed address is
    /// bound now, so that a reload that asks for one that cannot be had is refused whole.
    /// Only a change to an address that needs the current one's port (127.0.0.1:9725 to
    /// 0.0.0.0:9725) cannot be tried while the current one listens: the thread moves it,
    /// keeping the old if the new fails (logged).
    pub fn prepare(old: MetricsListen, new: MetricsListen) -> Result<Prepared> {
        let addr = match new.addr() {
            Some(a) if new != old => a,
            _ => return Ok(Prepared(Listen::Try(new))),
        };
        match std::net::TcpListener::bind(addr) {
            Ok(l) => Ok(Prepared(Listen::Bound(l))),
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && old.addr().is_some_and(|o| o.port() == addr.port()) =>
            {
                Ok(Prepared(Listen::Try(new)))
            }
            Err(e) => Err(anyhow::anyhow!(
                "metrics_listen {addr}: cannot listen there: {e}"
            )),
        }
    }

    /// Hands a reload's prepared listener to the thread (never waits for it).
    pub fn commit(&self, p: Prepared) {
        if self.tx.send(p.0).is_err() {
            error!("metrics: the metrics thread has stopped; no metrics are served");
        }
    }
}

struct Listening {
    addr: SocketAddr,
    listener: TcpListener,
}

/// The sources, and when the last scrape ended: scrapes queue for it in arrival order (a
/// fair lock), so a scraper that hangs up while waiting leaves the queue and costs the
/// others nothing (a start time reserved on arrival was spent by every hung-up request).
struct Shared {
    sources: Mutex<Sources>,
    last: tokio::sync::Mutex<Option<tokio::time::Instant>>,
}

async fn serve(sources: Sources, mut rx: mpsc::UnboundedReceiver<Listen>) {
    let shared = Arc::new(Shared {
        sources: Mutex::new(sources),
        last: tokio::sync::Mutex::new(None),
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut current: Option<Listening> = None;
    loop {
        tokio::select! {
            want = rx.recv() => match want {
                Some(Listen::Try(want)) => current = rebind(current, want),
                Some(Listen::Bound(l)) => match adopt(l) {
                    Ok(l) => {
                        info!(addr = %l.addr, "metrics: serving GET /metrics");
                        current = Some(l);
                    }
                    Err(e) => error!("metrics: the new listener cannot be served: {e}"),
                },
                None => return,
            },
            accepted = accept(current.as_ref()) => match accepted {
                Ok(stream) => match slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        let shared = shared.clone();
                        tokio::spawn(async move {
                            connection(stream, shared).await;
                            drop(slot);
                        });
                    }
                    Err(_) => drop(stream),
                },
                Err(e) => {
                    // EMFILE and the like persist until something closes: do not spin.
                    warn!("metrics: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

async fn accept(l: Option<&Listening>) -> std::io::Result<tokio::net::TcpStream> {
    match l {
        Some(l) => l.listener.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

/// The listener for `want`. The old one is kept when the new address cannot be bound, except
/// when the new one needs its port (127.0.0.1:9725 to 0.0.0.0:9725): then the old is let go
/// first and taken back if the new one still fails.
fn rebind(current: Option<Listening>, want: MetricsListen) -> Option<Listening> {
    let Some(addr) = want.addr() else {
        if let Some(c) = current {
            info!(addr = %c.addr, "metrics: off (metrics_listen: off)");
        }
        return None;
    };
    if current.as_ref().is_some_and(|c| c.addr == addr) {
        return current;
    }
    let fail = |e: &std::io::Error| {
        error!(
            "metrics: cannot listen on metrics_listen {addr}: {e}; no metrics there until it \
             can (fix it and reload); enforcement and the control socket are unaffected"
        )
    };
    match bind(addr) {
        Ok(l) => {
            info!(%addr, "metrics: serving GET /metrics");
            Some(l)
        }
        Err(e)
            if e.kind() == std::io::ErrorKind::AddrInUse
                && current
                    .as_ref()
                    .is_some_and(|c| c.addr.port() == addr.port()) =>
        {
            // Closing the old listener frees the port for the new address.
            let old = current.map(|c| c.addr).expect("checked above");
            match bind(addr) {
                Ok(l) => {
                    info!(%addr, "metrics: serving GET /metrics");
                    Some(l)
                }
                Err(e) => {
                    fail(&e);
                    match bind(old) {
                        Ok(l) => {
                            warn!(addr = %old, "metrics: still serving on the previous address");
                            Some(l)
                        }
                        Err(e2) => {
                            error!(
                                "metrics: the previous address {old} cannot be taken back: {e2}"
                            );
                            None
                        }
                    }
                }
            }
        }
        Err(e) => {
            fail(&e);
            if let Some(c) = &current {
                warn!(addr = %c.addr, "metrics: still serving on the previous address");
            }
            current
        }
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<Listening> {
    // std sets SO_REUSEADDR: a restarted daemon binds again at once.
    adopt(std::net::TcpListener::bind(addr)?)
}

fn adopt(l: std::net::TcpListener) -> std::io::Result<Listening> {
    l.set_nonblocking(true)?;
    Ok(Listening {
        addr: l.local_addr()?,
        listener: TcpListener::from_std(l)?,
    })
}

async fn connection(stream: tokio::net::TcpStream, shared: Arc<Shared>) {
    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(answer(&req, &shared).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    // Over its lifetime or failed: either way the connection is closed, nothing else.
    let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
}

async fn answer<B>(req: &Request<B>, shared: &Shared) -> Response<Full<Bytes>> {
    let reply = |status: u16, ctype: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", ctype)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    if req.uri().path() != "/metrics" {
        return reply(404, "text/plain", "port25 serves GET /metrics\n".into());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(405, "text/plain", "GET /metrics\n".into());
    }
    let mut last = shared.last.lock().await;
    if let Some(at) = *last {
        tokio::time::sleep_until(at + SCRAPE_SPACING).await;
    }
    // A poisoned lock (a panicking scrape) still holds usable sources.
    let text = shared
        .sources
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .scrape();
    *last = Some(tokio::time::Instant::now());
    drop(last);
    reply(200, CONTENT_TYPE, text)
}
