//! kata-monitor's HTTP endpoints:
//! - `/metrics`: kata-monitor's own families and every running shim's, labelled;
//!   `?sandbox=<id>` passes one shim's answer through unchanged; `?filter_family=a,b`
//!   keeps the families whose name starts with one of them; gzip when the client accepts it;
//! - `/sandboxes`: the sandbox ids (an HTML list for browsers);
//! - `/agent-url?sandbox=<id>`: that sandbox's agent address;
//! - `/`: an index. Anything else is 404.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ACCEPT, ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use kata_metrics::names;
use tokio::net::TcpListener;

use crate::scrape;
use crate::Monitor;

/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

const INDEX: &str = "kata-monitor\n\
/metrics                      every sandbox's metrics (?sandbox=<id> one shim's, unchanged; ?filter_family=a,b)\n\
/sandboxes                    the sandboxes on this node\n\
/agent-url?sandbox=<id>       the agent's address of a sandbox\n";

type Answer = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Answer {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn not_found(what: String) -> Answer {
    reply(StatusCode::NOT_FOUND, "text/plain", what + "\n")
}

/// `%XX` and `+` decoding of a query component (a bad escape stays as it is).
fn decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'+', _, _) => out.push(b' '),
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 2;
            }
            (b, _, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The query parameters (the last of a repeated name wins).
pub fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    parse_query(req.uri().query().unwrap_or(""))
}

fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

fn wants(req: &Request<Incoming>, header: hyper::header::HeaderName, what: &str) -> bool {
    req.headers()
        .get_all(header)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains(what))
}

fn gzip(body: &[u8]) -> Option<Vec<u8>> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(body).ok()?;
    e.finish().ok()
}

/// Serves `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, monitor: Arc<Monitor>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let monitor = monitor.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let monitor = monitor.clone();
                async move { Ok::<_, Infallible>(handle(req, &monitor).await) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(error) = served {
                tracing::debug!(%error, "HTTP connection");
            }
        });
    }
}

async fn handle(req: Request<Incoming>, monitor: &Monitor) -> Answer {
    if req.method() != Method::GET {
        return not_found(format!("no {} {}", req.method(), req.uri().path()));
    }
    let params = query(&req);
    match req.uri().path() {
        "/metrics" => metrics(&req, &params, monitor).await,
        "/sandboxes" => {
            let ids: Vec<String> = monitor.sandboxes.list().into_iter().map(|s| s.id).collect();
            if wants(&req, ACCEPT, "text/html") {
                let items: String = ids
                    .iter()
                    .map(|id| format!("<li><a href=\"/metrics?sandbox={id}\">{id}</a></li>\n"))
                    .collect();
                reply(
                    StatusCode::OK,
                    "text/html; charset=utf-8",
                    format!("<html><body><h1>Sandboxes</h1><ul>\n{items}</ul></body></html>\n"),
                )
            } else {
                let mut text = ids.join("\n");
                text.push('\n');
                reply(StatusCode::OK, "text/plain; charset=utf-8", text)
            }
        }
        "/agent-url" => {
            let Some(id) = params.get("sandbox") else {
                return reply(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    "missing ?sandbox=<id>\n",
                );
            };
            let Some(sandbox) = monitor.sandboxes.get(id) else {
                return not_found(format!("unknown sandbox {id:?}"));
            };
            match scrape::shim_text(&sandbox, names::AGENT_URL_PATH).await {
                Ok(url) => reply(StatusCode::OK, "text/plain", url),
                Err(error) => reply(
                    StatusCode::BAD_GATEWAY,
                    "text/plain",
                    crate::cri::chain(&error) + "\n",
                ),
            }
        }
        "/" => reply(StatusCode::OK, "text/plain", INDEX),
        other => not_found(format!("no page {other}")),
    }
}

async fn metrics(
    req: &Request<Incoming>,
    params: &HashMap<String, String>,
    monitor: &Monitor,
) -> Answer {
    let body = if let Some(id) = params.get("sandbox") {
        let Some(sandbox) = monitor.sandboxes.get(id) else {
            return not_found(format!("unknown sandbox {id:?}"));
        };
        match scrape::shim_text(&sandbox, names::METRICS_PATH).await {
            Ok(text) => text,
            Err(error) => {
                monitor.stats.failed();
                return reply(
                    StatusCode::BAD_GATEWAY,
                    "text/plain",
                    crate::cri::chain(&error) + "\n",
                );
            }
        }
    } else {
        let mut families = scrape::collect(monitor).await;
        if let Some(filter) = params.get("filter_family") {
            let prefixes: Vec<&str> = filter.split(',').filter(|p| !p.is_empty()).collect();
            if !prefixes.is_empty() {
                families = scrape::filter_families(families, &prefixes);
            }
        }
        let mut text = String::with_capacity(256 * 1024);
        if let Err(error) = kata_metrics::encode_into(&families, &mut text) {
            tracing::error!(error = %crate::cri::chain(&error), "encoding metrics");
        }
        text
    };
    if wants(req, ACCEPT_ENCODING, "gzip") {
        if let Some(zipped) = gzip(body.as_bytes()) {
            let mut r = reply(StatusCode::OK, names::TEXT_FORMAT, zipped);
            r.headers_mut()
                .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            return r;
        }
    }
    reply(StatusCode::OK, names::TEXT_FORMAT, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_decoded() {
        let q = parse_query("sandbox=abc&filter_family=kata_guest%2Ckata_agent&x&y=a+b&z=%zz");
        assert_eq!(q["sandbox"], "abc");
        assert_eq!(q["filter_family"], "kata_guest,kata_agent");
        assert_eq!(q["x"], "");
        assert_eq!(q["y"], "a b");
        assert_eq!(q["z"], "%zz");
        assert_eq!(decode("%4"), "%4");
        assert_eq!(decode("é%"), "é%");
    }

    #[test]
    fn gzip_round_trips() {
        use std::io::Read;
        let z = gzip(b"kata_monitor_scrape_count 1\n").unwrap();
        let mut out = String::new();
        flate2::read::GzDecoder::new(&z[..])
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, "kata_monitor_scrape_count 1\n");
    }
}
