//! The management server: HTTP/1.1 on the sandbox's unix socket.
//!
//! `GET /metrics` (Prometheus text 0.0.4), `GET /agent-url`, `GET /console` (the guest
//! console's last lines the shim keeps, for `kata-ctl collect`); anything else is 404. Each
//! scrape runs in a task of its own, so a bug that panics costs that answer (a 500), never
//! the shim; scrapes run two at a time at most and each is bounded in time
//! ([`super::scrape`]). A client gets a few seconds to send its request headers.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use kata_hypervisor::vsock::Endpoint;
use kata_metrics::names;
use tokio::net::UnixListener;
use tokio::sync::Semaphore;

use super::ShimMonitor;
use crate::sandbox::Sandbox;

/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at once; more wait their turn.
const CONCURRENT_SCRAPES: usize = 2;

/// The agent's address as Kata prints it: `vsock://<cid>:<port>` or
/// `hvsock://<uds>:<port>`.
pub fn agent_url(endpoint: &Endpoint) -> String {
    let port = kata_proto::AGENT_VSOCK_PORT;
    match endpoint {
        Endpoint::Vhost { cid } => format!("vsock://{cid}:{port}"),
        Endpoint::Hybrid { uds } => format!("hvsock://{}:{port}", uds.display()),
    }
}

/// Console lines as one text, each ending in a newline.
fn console_text(lines: &[String]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Serves `listener` until the task is aborted.
pub async fn serve(listener: UnixListener, monitor: Arc<ShimMonitor>, sandbox: Arc<Sandbox>) {
    let scrapes = Arc::new(Semaphore::new(CONCURRENT_SCRAPES));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "management socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (monitor, sandbox, scrapes) = (monitor.clone(), sandbox.clone(), scrapes.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                handle(req, monitor.clone(), sandbox.clone(), scrapes.clone())
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(error) = served {
                tracing::debug!(%error, "management connection");
            }
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    monitor: Arc<ShimMonitor>,
    sandbox: Arc<Sandbox>,
    scrapes: Arc<Semaphore>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET {
        return Ok(text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".into(),
        ));
    }
    Ok(match req.uri().path() {
        names::METRICS_PATH => {
            let Ok(_permit) = scrapes.acquire_owned().await else {
                return Ok(text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "shutting down\n".into(),
                ));
            };
            let scrape =
                tokio::spawn(async move { super::scrape::scrape(&monitor, &sandbox).await });
            match scrape.await {
                Ok(body) => text(StatusCode::OK, names::TEXT_FORMAT, body),
                Err(error) => {
                    tracing::error!(%error, "metrics scrape failed");
                    text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        format!("scrape failed: {error}\n"),
                    )
                }
            }
        }
        names::AGENT_URL_PATH => text(
            StatusCode::OK,
            "text/plain",
            agent_url(sandbox.vsock_endpoint()),
        ),
        names::CONSOLE_PATH => text(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            console_text(&sandbox.console_tail()),
        ),
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_urls_are_katas() {
        assert_eq!(agent_url(&Endpoint::Vhost { cid: 3 }), "vsock://3:1024");
        assert_eq!(
            agent_url(&Endpoint::Hybrid {
                uds: "/run/kata/s/vm/vsock.sock".into()
            }),
            "hvsock:///run/kata/s/vm/vsock.sock:1024"
        );
    }

    #[test]
    fn console_lines_end_in_newlines() {
        assert_eq!(console_text(&[]), "");
        assert_eq!(console_text(&["a".into(), "b".into()]), "a\nb\n");
    }
}
