//! An HTTP/1.1 `GET` to a shim's management socket (a unix socket), bounded in time and
//! size: what kata-monitor, tools and tests use to read `/metrics` and `/agent-url`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

/// Failures of one request.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket did not accept the connection (no shim serves it).
    #[error("cannot connect to {}", .socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed (the shim closed the connection, sent garbage, ...).
    #[error("HTTP request to {} failed", .socket.display())]
    Http {
        socket: PathBuf,
        #[source]
        source: hyper::Error,
    },
    /// The request could not be built (a path that is not a valid URI).
    #[error("invalid request path {path:?}")]
    Request {
        path: String,
        #[source]
        source: hyper::http::Error,
    },
    /// The body was larger than allowed or broke off.
    #[error("reading the answer of {} failed", .socket.display())]
    Body {
        socket: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The whole request took longer than allowed.
    #[error("no answer from {} within {timeout:?}", .socket.display())]
    Timeout { socket: PathBuf, timeout: Duration },
}

/// An answer.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Bytes,
}

impl Response {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `GET path_and_query` on the unix socket `socket`, with at most `max_body` bytes of
/// answer, all within `timeout`.
pub async fn get(
    socket: &Path,
    path_and_query: &str,
    timeout: Duration,
    max_body: usize,
) -> Result<Response, ClientError> {
    match tokio::time::timeout(timeout, get_unbounded(socket, path_and_query, max_body)).await {
        Ok(result) => result,
        Err(_) => Err(ClientError::Timeout {
            socket: socket.to_path_buf(),
            timeout,
        }),
    }
}

async fn get_unbounded(
    socket: &Path,
    path_and_query: &str,
    max_body: usize,
) -> Result<Response, ClientError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::Connect {
            socket: socket.to_path_buf(),
            source,
        })?;
    let http = |source| ClientError::Http {
        socket: socket.to_path_buf(),
        source,
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    // Drives the connection; ends when the exchange is over or the request is dropped.
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = hyper::Request::get(path_and_query)
        .header(hyper::header::HOST, "localhost")
        .body(Empty::<Bytes>::new())
        .map_err(|source| ClientError::Request {
            path: path_and_query.to_owned(),
            source,
        })?;
    let result = async {
        let response = sender.send_request(request).await.map_err(http)?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = Limited::new(response.into_body(), max_body)
            .collect()
            .await
            .map_err(|source| ClientError::Body {
                socket: socket.to_path_buf(),
                source,
            })?
            .to_bytes();
        Ok(Response {
            status,
            content_type,
            body,
        })
    }
    .await;
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    async fn serve_once(listener: UnixListener, answer: &'static [u8]) {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"GET /metrics HTTP/1.1\r\n"));
        s.write_all(answer).await.unwrap();
    }

    #[tokio::test]
    async fn gets_status_type_and_body() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(serve_once(
            listener,
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nhello",
        ));
        let r = get(&path, "/metrics", Duration::from_secs(5), 100)
            .await
            .unwrap();
        server.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.content_type.as_deref(), Some("text/plain"));
        assert_eq!(r.text(), "hello");
    }

    #[tokio::test]
    async fn limits_size_and_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(serve_once(
            listener,
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
        ));
        let err = get(&path, "/metrics", Duration::from_secs(5), 3)
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Body { .. }), "{err}");
        server.await.unwrap();

        // A server that accepts and never answers.
        let silent = dir.path().join("silent.sock");
        let _listener = UnixListener::bind(&silent).unwrap();
        let err = get(&silent, "/metrics", Duration::from_millis(200), 100)
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Timeout { .. }), "{err}");

        let err = get(&dir.path().join("none"), "/", Duration::from_secs(1), 1)
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    }
}
