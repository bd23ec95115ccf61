//! The harness of the webhook's end-to-end tests: a test PKI, the real binary started on a
//! loopback port with a certificate from it, and an HTTPS client that trusts only that
//! PKI's CA.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// How long the webhook may take to start or stop; generous for a loaded machine.
const PATIENCE: Duration = Duration::from_secs(60);

/// A CA and a serving certificate it signed for `localhost` and `127.0.0.1`.
pub struct Pki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Pki {
    pub fn new(name: &str) -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);

        let key = KeyPair::generate().unwrap();
        let mut leaf =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        leaf.distinguished_name
            .push(DnType::CommonName, "kata-peerpods-webhook");
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        Self {
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// The files `hack/k8s/peerpods-webhook-cert.sh --out DIR` wrote.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .with_context(|| format!("{name} in {}", dir.display()))
        };
        Ok(Self {
            ca_pem: read("ca.crt")?,
            cert_pem: read("tls.crt")?,
            key_pem: read("tls.key")?,
        })
    }

    /// Writes `tls.crt` and `tls.key` into `dir`, as a mounted Secret has them.
    pub fn write_serving(&self, dir: &Path) {
        std::fs::write(dir.join("tls.crt"), &self.cert_pem).unwrap();
        std::fs::write(dir.join("tls.key"), &self.key_pem).unwrap();
    }
}

/// The webhook binary, running; killed and reaped on drop.
pub struct Webhook {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub pki: Pki,
    pub cert_dir: PathBuf,
    log: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

/// The settings a test may give the webhook through its environment.
const SETTINGS: [&str; 7] = [
    "TARGET_RUNTIMECLASS",
    "SKIP_NAMESPACES",
    "POD_NAMESPACE",
    "WEBHOOK_LISTEN",
    "WEBHOOK_TLS_CERT",
    "WEBHOOK_TLS_KEY",
    "WEBHOOK_TLS_RELOAD_SECONDS",
];

impl Webhook {
    /// Starts the webhook on 127.0.0.1 (a free port) with a fresh PKI and `env`, and
    /// waits until it listens.
    pub fn start(env: &[(&str, &str)]) -> Result<Self> {
        Self::start_with(env, Pki::new("first"))
    }

    /// Like [`Self::start`] with the given PKI's serving certificate.
    pub fn start_with(env: &[(&str, &str)], pki: Pki) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let cert_dir = dir.path().join("tls");
        std::fs::create_dir(&cert_dir)?;
        pki.write_serving(&cert_dir);

        let mut command = Command::new(env!("CARGO_BIN_EXE_kata-peerpods-webhook"));
        for key in SETTINGS {
            command.env_remove(key);
        }
        command
            .env("RUST_LOG", "info")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--tls-cert")
            .arg(cert_dir.join("tls.crt"))
            .arg("--tls-key")
            .arg(cert_dir.join("tls.key"))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().context("starting kata-peerpods-webhook")?;

        let log = Arc::new(Mutex::new(String::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().expect("stderr is piped");
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on ").nth(1) {
                    let _ = addr_tx.send(addr.trim().to_owned());
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut webhook = Self {
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            pki,
            cert_dir,
            log,
            _dir: dir,
        };
        let mut reader = Some(reader);
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(addr) = addr_rx.recv_timeout(Duration::from_millis(100)) {
                webhook.addr = addr
                    .parse()
                    .with_context(|| format!("listen address {addr:?}"))?;
                return Ok(webhook);
            }
            if let Some(status) = webhook.child.as_mut().unwrap().try_wait()? {
                // Its whole log: the reader ends at the pipe's EOF.
                if let Some(reader) = reader.take() {
                    let _ = reader.join();
                }
                bail!(
                    "the webhook exited ({status}) before listening:\n{}",
                    webhook.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the webhook did not listen within {PATIENCE:?}:\n{}",
                    webhook.log()
                );
            }
        }
    }

    /// What the webhook logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Sends `method path` with `body` over HTTPS, trusting only `ca_pem`.
    pub async fn request_with_ca(
        &self,
        ca_pem: &str,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Vec<u8>)> {
        self.request_as("localhost", ca_pem, method, path, body)
            .await
    }

    /// Sends `method path` with `body` over HTTPS to the server named `server_name` (the
    /// name the certificate must hold), trusting only `ca_pem`.
    pub async fn request_as(
        &self,
        server_name: &str,
        ca_pem: &str,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Vec<u8>)> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(cert?)?;
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = TcpStream::connect(self.addr).await?;
        let tls = TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from(server_name.to_owned())?, tcp)
            .await
            .context("TLS handshake")?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        let driver = tokio::spawn(connection);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", format!("{server_name}:{}", self.addr.port()))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes().to_vec();
        driver.abort();
        Ok((status, body))
    }

    /// Sends `method path` with `body` over HTTPS, trusting the webhook's CA.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Vec<u8>)> {
        let ca = self.pki.ca_pem.clone();
        self.request_with_ca(&ca, method, path, body).await
    }

    /// Sends SIGTERM and waits for the exit; the process is reaped (by `Drop` if it does
    /// not exit in time).
    pub fn terminate(mut self) -> Result<ExitStatus> {
        let child = self.child.as_mut().expect("running");
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits"));
        kill(pid, Signal::SIGTERM).context("SIGTERM")?;
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(anyhow!(
            "no exit within {PATIENCE:?} of SIGTERM:\n{}",
            self.log()
        ))
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `check` until it holds or `PATIENCE` passes.
pub async fn wait_until<F, Fut>(what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        if check().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("{what}: not within {PATIENCE:?}")
}
