//! A private registry for in-guest image pull tests: Debian's `docker-registry`, started
//! by the test on an address the pod VMs reach (the peer pods bridge address: inside a VM
//! 127.0.0.1 is the VM itself), with its own storage and log; images copied in with
//! Debian's `skopeo` from OCI archives and layouts. Dropping it stops the registry and
//! removes its storage.

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::wait_until;

/// The registry binary (Debian package `docker-registry`).
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
/// `skopeo` (Debian package `skopeo`).
pub const SKOPEO_BIN: &str = "/usr/bin/skopeo";

/// A running private registry.
#[derive(Debug)]
pub struct Registry {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Where it listens (plain HTTP).
    pub addr: SocketAddr,
}

impl Registry {
    /// A port that is free now (for a registry address that must be known before the
    /// address it binds exists).
    pub fn free_port() -> u16 {
        std::net::TcpListener::bind(("127.0.0.1", 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Starts a registry on `ip` (a free port), waits until it answers `/v2/`.
    pub fn start(ip: IpAddr) -> Self {
        let port = std::net::TcpListener::bind((ip, 0))
            .unwrap_or_else(|e| panic!("no free port on {ip}: {e}"))
            .local_addr()
            .unwrap()
            .port();
        Self::start_at(SocketAddr::new(ip, port))
    }

    /// Starts a registry on `addr`, waits until it answers `/v2/`.
    pub fn start_at(addr: SocketAddr) -> Self {
        for bin in [REGISTRY_BIN, SKOPEO_BIN] {
            assert!(
                Path::new(bin).is_file(),
                "{bin} is missing: run hack/install-deps.sh"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("kata-test-registry-")
            .tempdir()
            .unwrap();
        let storage = dir.path().join("storage");
        std::fs::create_dir(&storage).unwrap();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {addr}\n",
                storage.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let mut r = Self {
            child: Some(child),
            dir,
            addr,
        };
        let up = wait_until(Duration::from_secs(20), || r.answers());
        assert!(up, "registry on {addr} did not answer: {}", r.log());
        r.check_alive();
        r
    }

    fn answers(&self) -> bool {
        let Ok(mut s) = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(format!("GET /v2/ HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr).as_bytes())
            .is_err()
        {
            return false;
        }
        let mut buf = [0u8; 12];
        std::io::Read::read_exact(&mut s, &mut buf).is_ok() && buf.starts_with(b"HTTP/1.")
    }

    fn check_alive(&mut self) {
        if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
            panic!("registry exited with {status}: {}", self.log());
        }
    }

    /// `host:port`, as image references and insecure-registry lists name it.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The registry's log (its access log included).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Log lines of blob downloads (`GET /v2/<repo>/blobs/...`) that came from `ip`.
    pub fn blob_gets_from(&self, ip: IpAddr) -> Vec<String> {
        let prefix = format!("{ip} ");
        self.log()
            .lines()
            .filter(|l| {
                l.starts_with(&prefix) && l.contains("\"GET /v2/") && l.contains("/blobs/sha256:")
            })
            .map(str::to_owned)
            .collect()
    }

    /// Copies an image into the registry with skopeo: `source` is a skopeo reference
    /// (`oci-archive:<file>`, `oci:<dir>:<tag>`), `repo_tag` e.g. `busybox:kata`.
    pub fn push(&self, source: &str, repo_tag: &str) {
        let dest = format!("docker://{}/{repo_tag}", self.host());
        let out = Command::new(SKOPEO_BIN)
            .args([
                "--insecure-policy",
                "copy",
                "--dest-tls-verify=false",
                "--quiet",
            ])
            .arg(source)
            .arg(&dest)
            .output()
            .expect("run skopeo");
        assert!(
            out.status.success(),
            "skopeo copy {source} {dest}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The stored data of blob `digest` (`sha256:<hex>`).
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let gone = wait_until(Duration::from_secs(5), || {
                matches!(c.try_wait(), Ok(Some(_)))
            });
            if !gone {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

/// `sha256:<hex>` of `data`.
pub fn digest_of(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A layer built in memory: its uncompressed tar (diff_id) and its gzip blob.
#[derive(Debug, Clone)]
pub struct Layer {
    pub tar: Vec<u8>,
    pub gzip: Vec<u8>,
}

impl Layer {
    /// A gzip layer of `entries` (path, content); `None` content is a directory. Names
    /// starting with `.wh.` make whiteouts, `.wh..wh..opq` an opaque directory.
    pub fn gzip(entries: &[(&str, Option<&[u8]>)]) -> Self {
        let mut b = tar::Builder::new(Vec::new());
        for (path, content) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            match content {
                Some(data) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(0o644);
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, path, *data).unwrap();
                }
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    b.append_data(&mut h, path, std::io::empty()).unwrap();
                }
            }
        }
        let tar = b.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&tar).unwrap();
        Self {
            tar,
            gzip: gz.finish().unwrap(),
        }
    }
}

/// Writes an OCI image layout at `dir` (tag `tag`): the layers of the OCI archive `base`
/// (uncompressed, as hack/build-test-images.sh makes them) followed by `extra` gzip layers,
/// and `base`'s process configuration. For `skopeo copy oci:<dir>:<tag>`.
pub fn layout_on_top(base: &Path, extra: &[Layer], dir: &Path, tag: &str) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    // The base archive's blobs, by digest.
    let mut archive = tar::Archive::new(std::fs::File::open(base).expect("open the base archive"));
    let mut files: std::collections::HashMap<String, Vec<u8>> = Default::default();
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().display().to_string();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        files.insert(path, data);
    }
    let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
    let blob = |digest: &str| files[&format!("blobs/sha256/{}", &digest[7..])].clone();
    let manifest: serde_json::Value =
        serde_json::from_slice(&blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_slice(&blob(manifest["config"]["digest"].as_str().unwrap())).unwrap();
    let mut layers = manifest["layers"].as_array().unwrap().clone();
    for l in &layers {
        let d = l["digest"].as_str().unwrap();
        std::fs::write(blobs.join(&d[7..]), blob(d)).unwrap();
    }
    for l in extra {
        let d = digest_of(&l.gzip);
        std::fs::write(blobs.join(&d[7..]), &l.gzip).unwrap();
        layers.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": d,
            "size": l.gzip.len(),
        }));
        config["rootfs"]["diff_ids"]
            .as_array_mut()
            .unwrap()
            .push(digest_of(&l.tar).into());
    }
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let config_digest = digest_of(&config_bytes);
    std::fs::write(blobs.join(&config_digest[7..]), &config_bytes).unwrap();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_bytes.len()},
        "layers": layers,
    });
    let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
    let manifest_digest = digest_of(&manifest_bytes);
    std::fs::write(blobs.join(&manifest_digest[7..]), &manifest_bytes).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}
