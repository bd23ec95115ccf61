//! Metrics in tests: a shim's management socket, kata-monitor and a private Prometheus
//! (Debian's, on a port of its own), `promtool check metrics`, and a small HTTP/1.0 GET for
//! the TCP endpoints.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{repo_root, wait_until};

/// The management socket of sandbox `id`.
pub fn shim_socket(id: &str) -> PathBuf {
    kata_metrics::names::management_socket(&Path::new("/run/kata").join(id))
}

/// `GET path` on a shim's management socket (10 s deadline).
pub fn shim_get(socket: &Path, path: &str) -> Result<kata_metrics::client::Response> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(kata_metrics::client::get(
        socket,
        path,
        Duration::from_secs(10),
        64 << 20,
    ))?)
}

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `GET path_and_query` over HTTP/1.0 (so the body ends with the connection), 60 s deadline.
pub fn http_get(
    addr: SocketAddr,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> Result<HttpAnswer> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connect to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut req = format!("GET {path_and_query} HTTP/1.0\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .context("no status line")?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Ok(HttpAnswer {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    })
}

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The value of the first sample of `text` whose line starts with `series` (name and,
/// optionally, the start of its label set).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `promtool check metrics` on `text`: its exit code and its complaints.
pub fn promtool_check(text: &str) -> (i32, Vec<String>) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (package prometheus: hack/install-deps.sh)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    let mut complaints: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&out.stderr).lines())
        .map(str::to_owned)
        .filter(|l| !l.trim().is_empty())
        .collect();
    complaints.dedup();
    (out.status.code().unwrap_or(-1), complaints)
}

/// A child process owned by a test: SIGTERM by pid, then SIGKILL, and reaped, on drop.
#[derive(Debug)]
struct Owned {
    child: Child,
    name: &'static str,
}

impl Drop for Owned {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let gone = wait_until(Duration::from_secs(10), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if !gone {
            eprintln!("{} ignored SIGTERM: killing it", self.name);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// kata-monitor (the workspace's debug build) on a port of its own.
#[derive(Debug)]
pub struct KataMonitor {
    process: Owned,
    pub addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl KataMonitor {
    /// Starts it against the CRI socket `runtime_endpoint` and waits until it answers.
    pub fn start(runtime_endpoint: &Path) -> Self {
        let bin = crate::containerd::target_bin_dir().join("kata-monitor");
        assert!(
            bin.is_file(),
            "{} missing: cargo build -p kata-monitor",
            bin.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("kata-monitor-test-")
            .tempdir()
            .expect("temp dir");
        let log = dir.path().join("kata-monitor.log");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let child = Command::new(&bin)
            .args(["-listen-address", &addr.to_string(), "-runtime-endpoint"])
            .arg(runtime_endpoint)
            .args(["-log-level", "debug"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("log"))
            .stderr(std::fs::File::create(dir.path().join("stderr")).expect("log"))
            .spawn()
            .expect("start kata-monitor");
        let this = Self {
            process: Owned {
                child,
                name: "kata-monitor",
            },
            addr,
            log: dir.path().join("stderr"),
            _dir: dir,
        };
        let up = wait_until(Duration::from_secs(20), || {
            http_get(addr, "/", &[]).is_ok_and(|a| a.status == 200)
        });
        assert!(up, "kata-monitor did not answer:\n{}", this.log());
        this
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.process.child.id()
    }

    /// `GET path` on it.
    pub fn get(&self, path: &str) -> Result<HttpAnswer> {
        http_get(self.addr, path, &[])
    }
}

/// A private Prometheus (Debian's `prometheus`) scraping `target` every second, with the
/// scrape configuration of `hack/prometheus/prometheus.yml`.
#[derive(Debug)]
pub struct Prometheus {
    process: Owned,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Prometheus {
    pub fn start(target: SocketAddr) -> Self {
        let shipped = std::fs::read_to_string(repo_root().join("hack/prometheus/prometheus.yml"))
            .expect("hack/prometheus/prometheus.yml");
        assert!(shipped.contains("127.0.0.1:8090") && shipped.contains("scrape_interval: 15s"));
        let config = shipped
            .replace("127.0.0.1:8090", &target.to_string())
            .replace("scrape_interval: 15s", "scrape_interval: 1s")
            .replace("scrape_timeout: 10s", "scrape_timeout: 1s");
        let dir = tempfile::Builder::new()
            .prefix("kata-prometheus-")
            .tempdir()
            .expect("temp dir");
        std::fs::write(dir.path().join("prometheus.yml"), config).expect("config");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).expect("log"))
            .spawn()
            .expect("start prometheus (package prometheus: hack/install-deps.sh)");
        let this = Self {
            process: Owned {
                child,
                name: "prometheus",
            },
            addr,
            dir,
        };
        let up = wait_until(Duration::from_secs(60), || {
            http_get(addr, "/-/ready", &[]).is_ok_and(|a| a.status == 200)
        });
        assert!(up, "prometheus not ready:\n{}", this.log());
        this
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.process.child.id()
    }

    /// An instant query: the result vector (`[{metric, value}]`).
    pub fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>> {
        let q: String = expr
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let a = http_get(self.addr, &format!("/api/v1/query?query={q}"), &[])?;
        let v: serde_json::Value = serde_json::from_slice(&a.body)
            .with_context(|| format!("query {expr}: {}", a.text()))?;
        if v["status"] != "success" {
            bail!("query {expr}: {v}");
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Waits (up to `timeout`) until `expr` returns at least one sample.
    pub fn wait_for(&self, expr: &str, timeout: Duration) -> Vec<serde_json::Value> {
        let mut last = Vec::new();
        wait_until(timeout, || {
            last = self.query(expr).unwrap_or_default();
            !last.is_empty()
        });
        last
    }
}
