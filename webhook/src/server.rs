//! HTTPS serving: the routes, one task per connection, graceful shutdown.
//!
//! - `POST /mutate-v1-pod`: an AdmissionReview ([`crate::review`]); 200 with the answering
//!   review, 400 with a plain-text reason for a body that is not one, 413 above
//!   [`MAX_BODY`];
//! - `GET /healthz`: 200 `ok` (the kubelet's probes);
//! - anything else: 404 (405 for a known path with another method).
//!
//! HTTP/1.1 over TLS. A client gets [`HANDSHAKE_TIMEOUT`] for its TLS handshake and
//! [`HEADER_READ_TIMEOUT`] for its request head. On shutdown the listener closes at once
//! and open connections get [`SHUTDOWN_GRACE`] to finish their requests.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::review::{review, to_json};
use crate::tls::CertStore;

/// Where the API server sends pod admission reviews (the manifest's `clientConfig.path`).
pub const MUTATE_PATH: &str = "/mutate-v1-pod";

/// The health endpoint.
pub const HEALTH_PATH: &str = "/healthz";

/// The largest review body taken: the API server caps objects at 3 MiB, and a review
/// carries the object once on CREATE.
pub const MAX_BODY: usize = 8 << 20;

/// How long a client has for its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client has to send its request head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long open connections get to finish at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A server that could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("listening on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The webhook's HTTPS server.
pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    tls: TlsAcceptor,
    config: Arc<Config>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Listens on `addr` (port 0: any free port) with the store's certificate.
    pub async fn bind(
        addr: SocketAddr,
        certs: &Arc<CertStore>,
        config: Config,
    ) -> Result<Self, ServeError> {
        let bind = |source| ServeError::Bind { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(bind)?;
        let local_addr = listener.local_addr().map_err(bind)?;
        Ok(Self {
            listener,
            local_addr,
            tls: TlsAcceptor::from(certs.server_config()),
            config: Arc::new(config),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` completes, then lets open connections finish.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let graceful = GracefulShutdown::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of file descriptors and the like: wait, do not spin.
                        tracing::warn!("accepting a connection: {err}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let tls = self.tls.clone();
            let config = self.config.clone();
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(err)) => {
                        tracing::debug!(%peer, "TLS handshake failed: {err}");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
                let service = service_fn(move |request| answer(config.clone(), request));
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(err) = watcher.watch(connection).await {
                    tracing::debug!(%peer, "connection ended: {err}");
                }
            });
        }
        drop(self.listener);
        tracing::info!(open = graceful.count(), "shutting down");
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}: closing them");
        }
    }
}

async fn answer(
    config: Arc<Config>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = match (request.uri().path(), request.method()) {
        (MUTATE_PATH, &Method::POST) => mutate(&config, request).await,
        (MUTATE_PATH, _) => method_not_allowed("POST"),
        (HEALTH_PATH, &Method::GET | &Method::HEAD) => text(StatusCode::OK, "ok\n".to_owned()),
        (HEALTH_PATH, _) => method_not_allowed("GET, HEAD"),
        (path, _) => text(
            StatusCode::NOT_FOUND,
            format!("no such path: {path} (this webhook serves POST {MUTATE_PATH} and GET {HEALTH_PATH})\n"),
        ),
    };
    Ok(response)
}

async fn mutate(config: &Config, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(err) if err.is::<LengthLimitError>() => {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the review is larger than {MAX_BODY} bytes\n"),
            )
        }
        Err(err) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("reading the request body: {err}\n"),
            )
        }
    };
    match review(config, &body) {
        Ok(review) => match to_json(&review) {
            Ok(json) => Response::builder()
                .status(StatusCode::OK)
                .header(CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(json)))
                .expect("a response from valid parts"),
            Err(err) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("encoding the review: {err}\n"),
            ),
        },
        Err(err) => {
            tracing::warn!("not an admission review: {err}");
            text(StatusCode::BAD_REQUEST, format!("{err}\n"))
        }
    }
}

fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed (use {allow})\n"),
    );
    response
        .headers_mut()
        .insert(ALLOW, hyper::header::HeaderValue::from_static(allow));
    response
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .expect("a response from valid parts")
}
