//! CRI-O's part toward the shim, without CRI-O: what CRI-O's `runtime_type = "vm"` path
//! (cri-o `internal/oci/runtime_vm.go`) does for a pod, step by step.
//!
//! - Directories as CRI-O lays them out: the bundle is the container's `userdata`
//!   directory (config.json, the `log` fifo, the pod's hostname/resolv.conf/hosts files for
//!   the sandbox); the root filesystem is elsewhere (the storage mount point, here a
//!   directory the image's layers are extracted into) and `root.path` names it absolutely.
//! - `containerd-shim-kata-v2 -namespace default -address "" -publish-binary <crio>
//!   -id <id> start` in the bundle, environment as containerd's `shim.Command` builds it
//!   (TTRPC_ADDRESS and GRPC_ADDRESS empty, NAMESPACE=default, MAX_SHIM_VERSION=2), in its
//!   own process group, with the `log` fifo opened for reading first; stdout and stderr
//!   together are the address.
//! - A ttrpc Task client on that address; Create with no rootfs mounts, the bundle, stdio
//!   fifos CRI-O created (stdin only for stdin containers) and the runtime options
//!   (`runtimeoptions.v1.Options` with the configuration path).
//! - Stop = Kill (+ Wait), remove = Delete then Shutdown with the container's id, "alive"
//!   = Kill with signal 0; OOM = the bundle's `oom` file after a non-zero exit.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use containerd_shim::api::{
    CreateTaskRequest, CreateTaskResponse, DeleteRequest, DeleteResponse, Empty, KillRequest,
    ShutdownRequest, StartRequest, StartResponse, StateRequest, StateResponse, UpdateTaskRequest,
    WaitRequest, WaitResponse,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::shim_async::{Client, TaskClient};
use serde_json::{json, Value};

use crate::containerd::ShimInstall;
use crate::{processes_naming, repo_root, wait_until};

/// CRI-O's annotation keys (cri-o `pkg/annotations`, `internal/annotations`).
pub mod annotations {
    pub const CONTAINER_TYPE: &str = "io.kubernetes.cri-o.ContainerType";
    pub const SANDBOX_ID: &str = "io.kubernetes.cri-o.SandboxID";
    pub const SANDBOX_NAME: &str = "io.kubernetes.cri-o.SandboxName";
    pub const CONTAINER_ID: &str = "io.kubernetes.cri-o.ContainerID";
    pub const CONTAINER_NAME: &str = "io.kubernetes.cri-o.ContainerName";
    pub const NAME: &str = "io.kubernetes.cri-o.Name";
    pub const NAMESPACE: &str = "io.kubernetes.cri-o.Namespace";
    pub const KUBE_NAME: &str = "io.kubernetes.cri-o.KubeName";
    pub const NAMESPACE_OPTIONS: &str = "io.kubernetes.cri-o.NamespaceOptions";
    pub const HOST_NETWORK: &str = "io.kubernetes.cri-o.HostNetwork";
}

/// The CRI-O binary CRI-O names in `-publish-binary` (its own path; never run).
pub const CRIO_BINARY: &str = "/usr/bin/crio";
/// The runtime options type CRI-O sends with Create (`runtime_config_path` set).
pub const RUNTIME_OPTIONS_TYPE: &str = "runtimeoptions.v1.Options";
/// containerd's bound for State; CRI-O polls it on every status update.
pub const STATE_DEADLINE: Duration = Duration::from_secs(2);
/// How long Create may take (CRI-O's default container_create_timeout is 240 s; a VM boot
/// under TCG takes seconds).
pub const CREATE_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound for the other lifecycle RPCs (Delete of the sandbox stops the VM).
pub const RPC_TIMEOUT: Duration = Duration::from_secs(60);

/// 64 hex digits, like CRI-O's container and sandbox ids.
pub fn new_id() -> String {
    let mut id = String::new();
    while id.len() < 64 {
        let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid").expect("uuid");
        id.extend(uuid.trim().chars().filter(char::is_ascii_hexdigit));
    }
    id.truncate(64);
    id
}

/// The OCI image archive built by `hack/build-test-images.sh`.
pub fn busybox_archive() -> PathBuf {
    let path = repo_root().join("build/images/busybox.tar");
    assert!(
        path.is_file(),
        "{} missing: run hack/build-test-images.sh",
        path.display()
    );
    path
}

fn read_json(path: &Path) -> Value {
    let bytes =
        std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Unpacks an OCI image archive (oci-layout, index.json, blobs) into `rootfs`: the first
/// manifest's layers in order, whiteouts applied, as a storage driver would.
pub fn extract_image(archive: &Path, rootfs: &Path) {
    let layout = tempfile::Builder::new()
        .prefix("kata-crio-image-")
        .tempdir()
        .expect("image temp dir");
    run(Command::new("tar")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(layout.path()));
    let blob = |digest: &str| {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        layout.path().join("blobs/sha256").join(hex)
    };
    let index = read_json(&layout.path().join("index.json"));
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .expect("index.json names a manifest");
    let manifest = read_json(&blob(manifest_digest));
    std::fs::create_dir_all(rootfs).expect("create rootfs");
    for layer in manifest["layers"].as_array().expect("manifest layers") {
        let path = blob(layer["digest"].as_str().expect("layer digest"));
        let media_type = layer["mediaType"].as_str().unwrap_or_default();
        let gzip = media_type.ends_with("gzip");
        let list = run(Command::new("tar")
            .arg(if gzip { "-tzf" } else { "-tf" })
            .arg(&path));
        // Whiteouts delete from the layers below, so before this layer is unpacked.
        let whiteouts: Vec<PathBuf> = list
            .lines()
            .map(|l| Path::new(l.trim_start_matches("./")).to_path_buf())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(".wh."))
            })
            .collect();
        for wh in &whiteouts {
            let name = wh.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let dir = rootfs.join(wh.parent().unwrap_or(Path::new("")));
            if name == ".wh..wh..opq" {
                for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    remove_any(&entry.path());
                }
            } else {
                remove_any(&dir.join(&name[4..]));
            }
        }
        run(Command::new("tar")
            .arg(if gzip { "-xzf" } else { "-xf" })
            .arg(&path)
            .arg("--numeric-owner")
            .arg("-C")
            .arg(rootfs));
        for wh in &whiteouts {
            remove_any(&rootfs.join(wh));
        }
    }
}

fn remove_any(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(path);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
}

/// A fifo CRI-O reads a container's stream from, copied to a file as it arrives. The
/// reader opens it blocking (containerd/fifo opens in the background and reads once a
/// writer came), so the shim's writer open never fails, and sees EOF when the shim closes.
#[derive(Debug)]
pub struct FifoCopy {
    pub fifo: PathBuf,
    pub file: PathBuf,
    thread: Option<JoinHandle<()>>,
}

impl FifoCopy {
    pub fn new(fifo: PathBuf, file: PathBuf) -> Self {
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o700))
            .unwrap_or_else(|e| panic!("mkfifo {}: {e}", fifo.display()));
        let (f, out) = (fifo.clone(), file.clone());
        let mut sink = std::fs::File::create(&out).expect("stream copy file");
        let thread = std::thread::spawn(move || {
            let Ok(mut src) = std::fs::File::open(&f) else {
                return;
            };
            let mut buf = [0u8; 8192];
            while let Ok(n) = src.read(&mut buf) {
                if n == 0 || sink.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        Self {
            fifo,
            file,
            thread: Some(thread),
        }
    }

    /// What arrived so far.
    pub fn contents(&self) -> String {
        std::fs::read_to_string(&self.file).unwrap_or_default()
    }

    /// Ends the copy: unblocks a reader still waiting for a writer (the shim never opened
    /// the fifo), then waits a little for EOF.
    fn finish(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        if !thread.is_finished() {
            // Succeeds only while the reader waits in open(2); closing it gives EOF.
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.fifo);
        }
        if wait_until(Duration::from_secs(2), || thread.is_finished()) {
            let _ = thread.join();
        }
        // Else the shim still holds the writer: the thread ends when it closes.
    }
}

impl Drop for FifoCopy {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The bundle's `log` fifo, held open for reading from before `start` as CRI-O does (the
/// shim opens it for writing without blocking); everything the shim logs is kept.
#[derive(Debug)]
pub struct LogFifo {
    text: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    /// Set: the reader keeps the fifo open but reads nothing more (a stalled containerd).
    stalled: Arc<AtomicBool>,
    /// The read end (owned by the thread).
    raw: std::os::fd::RawFd,
    thread: Option<JoinHandle<()>>,
}

impl LogFifo {
    pub fn new(path: &Path) -> Self {
        nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o700))
            .unwrap_or_else(|e| panic!("mkfifo {}: {e}", path.display()));
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .expect("open the log fifo");
        let raw = std::os::fd::AsRawFd::as_raw_fd(&file);
        let text = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let stalled = Arc::new(AtomicBool::new(false));
        let (t, s, st) = (text.clone(), stop.clone(), stalled.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while !s.load(Ordering::Relaxed) {
                if st.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                match file.read(&mut buf) {
                    Ok(n) if n > 0 => t
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend_from_slice(&buf[..n]),
                    // No writer (0) or nothing to read yet (EAGAIN).
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self {
            text,
            stop,
            stalled,
            raw,
            thread: Some(thread),
        }
    }

    /// Bytes written to the fifo and not read (FIONREAD on the read end).
    pub fn pending(&self) -> usize {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int; the read end stays open while self lives.
        let r = unsafe { libc::ioctl(self.raw, libc::FIONREAD, &mut n) };
        if r < 0 {
            0
        } else {
            usize::try_from(n).unwrap_or(0)
        }
    }

    /// From now on nothing is read, and the pipe holds one page: the shim's writes fill it
    /// at once and then block.
    pub fn stall(&self) {
        self.stalled.store(true, Ordering::Relaxed);
        // SAFETY: fcntl on the fifo's read end, which the reader thread keeps open until
        // this LogFifo is dropped.
        let shrunk = unsafe { libc::fcntl(self.raw, libc::F_SETPIPE_SZ, 4096) };
        assert!(
            shrunk >= 0,
            "F_SETPIPE_SZ: {}",
            std::io::Error::last_os_error()
        );
    }

    /// The shim's log lines so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.text.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

impl Drop for LogFifo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A pod as CRI-O knows it before any runtime call: names, ids and the sandbox's
/// `userdata` directory with the files its containers bind (hostname, resolv.conf, hosts,
/// shm).
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub sandbox_id: String,
    /// `k8s_POD_<name>_<namespace>_<uid>_0`.
    pub sandbox_name: String,
    pub hostname: String,
    /// The sandbox's bundle (`overlay-containers/<sandbox id>/userdata`).
    pub sandbox_dir: PathBuf,
}

/// One container's bundle as CRI-O prepares it, with its stdio fifos and log reader.
#[derive(Debug)]
pub struct Bundle {
    pub id: String,
    /// The CRI container name (`POD` for the sandbox).
    pub name: String,
    pub sandbox_id: String,
    pub is_sandbox: bool,
    /// The bundle directory (cwd of `start`, CreateTaskRequest.bundle).
    pub dir: PathBuf,
    /// The root filesystem (`root.path`), outside the bundle as with CRI-O's storage.
    pub rootfs: PathBuf,
    pub stdout: FifoCopy,
    pub stderr: FifoCopy,
    pub log: LogFifo,
}

impl Bundle {
    /// `<bundle>/oom`: CRI-O's OOM signal (present only after an OOM kill).
    pub fn oom_file(&self) -> PathBuf {
        self.dir.join("oom")
    }

    /// `<bundle>/address` as the shim wrote it (CRI-O reads it after a restart).
    pub fn address_file(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join("address"))
            .ok()
            .map(|s| s.trim().to_owned())
    }
}

/// What `start` did.
#[derive(Debug)]
pub struct StartOutcome {
    pub success: bool,
    /// stdout and stderr together, trimmed (CRI-O's CombinedOutput).
    pub output: String,
    pub elapsed: Duration,
}

/// CRI-O's side: its directories, the shim binary (the debug build) and its configuration.
#[derive(Debug)]
pub struct Crio {
    root: tempfile::TempDir,
    shim: ShimInstall,
}

impl Crio {
    pub fn new() -> Self {
        let root = tempfile::Builder::new()
            .prefix("kata-crio-")
            .tempdir()
            .expect("crio temp dir");
        for d in ["storage", "overlay-containers", "fifo", "pods", "log"] {
            std::fs::create_dir_all(root.path().join(d)).expect("crio dirs");
        }
        Self {
            root,
            shim: ShimInstall::new(),
        }
    }

    /// The shim installation (its configuration can be changed before a pod starts).
    pub fn shim(&self) -> &ShimInstall {
        &self.shim
    }

    /// The `runtime_path`.
    pub fn shim_binary(&self) -> PathBuf {
        self.shim.bin_dir().join("containerd-shim-kata-v2")
    }

    /// The `runtime_config_path` (also given as KATA_CONF_FILE).
    pub fn config_path(&self) -> PathBuf {
        self.shim.config_path()
    }

    /// A new pod: ids, names and the sandbox's userdata files (no runtime call).
    pub fn pod(&self, name: &str) -> Pod {
        let sandbox_id = new_id();
        let uid = uuid();
        let namespace = "default".to_owned();
        let sandbox_dir = self
            .root
            .path()
            .join("overlay-containers")
            .join(&sandbox_id);
        let sandbox_dir = sandbox_dir.join("userdata");
        std::fs::create_dir_all(sandbox_dir.join("shm")).expect("userdata");
        // Host network: CRI-O gives the pod the node's hostname.
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| name.to_owned());
        std::fs::write(sandbox_dir.join("hostname"), format!("{hostname}\n")).unwrap();
        let resolv = std::fs::read_to_string("/etc/resolv.conf")
            .unwrap_or_else(|_| "nameserver 127.0.0.1\n".into());
        std::fs::write(sandbox_dir.join("resolv.conf"), resolv).unwrap();
        std::fs::write(
            sandbox_dir.join("etc-hosts"),
            format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n127.0.1.1\t{hostname}\n"),
        )
        .unwrap();
        Pod {
            sandbox_name: format!("k8s_POD_{name}_{namespace}_{uid}_0"),
            name: name.to_owned(),
            namespace,
            uid,
            sandbox_id,
            hostname,
            sandbox_dir,
        }
    }

    /// The pod's sandbox (infra) container: busybox `sleep infinity` as the pause process.
    pub fn sandbox_bundle(&self, pod: &Pod) -> Bundle {
        self.bundle(pod, None, &["sleep", "infinity"])
    }

    /// A container of `pod` named `name` running `args`.
    pub fn container_bundle(&self, pod: &Pod, name: &str, args: &[&str]) -> Bundle {
        self.bundle(pod, Some(name), args)
    }

    fn bundle(&self, pod: &Pod, container: Option<&str>, args: &[&str]) -> Bundle {
        let is_sandbox = container.is_none();
        let id = if is_sandbox {
            pod.sandbox_id.clone()
        } else {
            new_id()
        };
        let name = container.unwrap_or("POD").to_owned();
        let dir = if is_sandbox {
            pod.sandbox_dir.clone()
        } else {
            let d = self
                .root
                .path()
                .join("overlay-containers")
                .join(&id)
                .join("userdata");
            std::fs::create_dir_all(&d).expect("bundle dir");
            d
        };
        let rootfs = self
            .root
            .path()
            .join("storage/overlay")
            .join(&id)
            .join("merged");
        extract_image(&busybox_archive(), &rootfs);
        let log_dir = self
            .root
            .path()
            .join("log/pods")
            .join(format!("{}_{}_{}", pod.namespace, pod.name, pod.uid))
            .join(&name);
        std::fs::create_dir_all(&log_dir).expect("log dir");
        let termination_log = if is_sandbox {
            None
        } else {
            let d = self
                .root
                .path()
                .join("pods")
                .join(&pod.uid)
                .join("containers")
                .join(&name);
            std::fs::create_dir_all(&d).unwrap();
            let f = d.join(&id[..8]);
            std::fs::write(&f, "").unwrap();
            Some(f)
        };
        let spec = oci_spec(
            pod,
            &id,
            &name,
            args,
            &rootfs,
            &log_dir.join("0.log"),
            termination_log.as_deref(),
        );
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_vec_pretty(&spec).unwrap(),
        )
        .expect("write config.json");
        // cio.NewFIFOSetInDir: <fifo dir>/<random>/<id>-stdout|stderr (no stdin, no tty).
        let fifo_dir = self.root.path().join("fifo").join(&new_id()[..16]);
        std::fs::create_dir_all(&fifo_dir).unwrap();
        let stdout = FifoCopy::new(
            fifo_dir.join(format!("{id}-stdout")),
            log_dir.join("stdout"),
        );
        let stderr = FifoCopy::new(
            fifo_dir.join(format!("{id}-stderr")),
            log_dir.join("stderr"),
        );
        let log = LogFifo::new(&dir.join("log"));
        Bundle {
            id,
            name,
            sandbox_id: pod.sandbox_id.clone(),
            is_sandbox,
            dir,
            rootfs,
            stdout,
            stderr,
            log,
        }
    }

    /// `containerd-shim-kata-v2 -namespace default -address "" -publish-binary <crio>
    /// -id <id> start` in the bundle, environment as containerd's `shim.Command` builds
    /// it for CRI-O. Panics if it does not finish (with its output closed) within 60 s.
    pub fn start_shim(&self, bundle: &Bundle) -> StartOutcome {
        let mut cmd = Command::new(self.shim_binary());
        cmd.args(["-namespace", "default", "-address", "", "-publish-binary"])
            .arg(CRIO_BINARY)
            .args(["-id", &bundle.id, "start"])
            .current_dir(&bundle.dir)
            .env("GOMAXPROCS", "2")
            .env("MAX_SHIM_VERSION", "2")
            .env("TTRPC_ADDRESS", "")
            .env("GRPC_ADDRESS", "")
            .env("NAMESPACE", "default")
            .env("KATA_CONF_FILE", self.config_path())
            .stdin(Stdio::null())
            .process_group(0);
        let started = Instant::now();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(cmd.output());
        });
        let out = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("`start` did not finish or kept its output open for 60 s")
            .expect("run the shim's start");
        let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
        output.push_str(&String::from_utf8_lossy(&out.stderr));
        StartOutcome {
            success: out.status.success(),
            output: output.trim().to_owned(),
            elapsed: started.elapsed(),
        }
    }

    /// The CreateTaskRequest CRI-O sends for `bundle`.
    pub fn create_request(&self, bundle: &Bundle) -> CreateTaskRequest {
        CreateTaskRequest {
            id: bundle.id.clone(),
            bundle: bundle.dir.display().to_string(),
            rootfs: Vec::new(),
            terminal: false,
            stdin: String::new(),
            stdout: bundle.stdout.fifo.display().to_string(),
            stderr: bundle.stderr.fifo.display().to_string(),
            options: Some(runtime_options(&self.config_path())).into(),
            ..Default::default()
        }
    }
}

impl Default for Crio {
    fn default() -> Self {
        Self::new()
    }
}

fn uuid() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .expect("uuid")
        .trim()
        .to_owned()
}

/// `runtimeoptions.v1.Options { config_path = 2 }` as CRI-O marshals it (typeurl: the bare
/// message name as type URL).
pub fn runtime_options(config_path: &Path) -> Any {
    let mut value = Vec::new();
    {
        let mut os = protobuf::CodedOutputStream::vec(&mut value);
        os.write_string(2, &config_path.display().to_string())
            .expect("encode options");
        os.flush().expect("encode options");
    }
    Any {
        type_url: RUNTIME_OPTIONS_TYPE.to_owned(),
        value,
        ..Default::default()
    }
}

const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_KILL",
];

/// The OCI spec CRI-O generates (host network: no network namespace; IPC and UTS
/// namespaces pinned by pinns under /var/run, paths the shim must not pass to the guest).
pub fn oci_spec(
    pod: &Pod,
    id: &str,
    name: &str,
    args: &[&str],
    rootfs: &Path,
    log_path: &Path,
    termination_log: Option<&Path>,
) -> Value {
    let is_sandbox = termination_log.is_none();
    let container_name = if is_sandbox {
        pod.sandbox_name.clone()
    } else {
        format!("k8s_{name}_{}_{}_{}_0", pod.name, pod.namespace, pod.uid)
    };
    let labels = json!({
        "io.kubernetes.pod.name": pod.name,
        "io.kubernetes.pod.namespace": pod.namespace,
        "io.kubernetes.pod.uid": pod.uid,
        "io.kubernetes.container.name": name,
    });
    let metadata = if is_sandbox {
        json!({"name": pod.name, "uid": pod.uid, "namespace": pod.namespace})
    } else {
        json!({"name": name})
    };
    let mut ann: BTreeMap<String, String> = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        ann.insert(k.to_owned(), v);
    };
    use annotations as a;
    put(
        a::CONTAINER_TYPE,
        if is_sandbox { "sandbox" } else { "container" }.into(),
    );
    put(a::SANDBOX_ID, pod.sandbox_id.clone());
    put(a::SANDBOX_NAME, pod.sandbox_name.clone());
    put(a::CONTAINER_ID, id.to_owned());
    put(a::CONTAINER_NAME, container_name.clone());
    put(a::NAME, container_name);
    put(a::NAMESPACE, pod.namespace.clone());
    put(a::KUBE_NAME, pod.name.clone());
    // CRI NamespaceOption: network NODE (2), pid CONTAINER (1).
    put(a::NAMESPACE_OPTIONS, r#"{"network":2,"pid":1}"#.into());
    put(a::HOST_NETWORK, "true".into());
    put("io.kubernetes.cri-o.HostName", pod.hostname.clone());
    put("io.kubernetes.cri-o.Labels", labels.to_string());
    put("io.kubernetes.cri-o.Annotations", "{}".into());
    put("io.kubernetes.cri-o.Metadata", metadata.to_string());
    put(
        "io.kubernetes.cri-o.LogPath",
        log_path.display().to_string(),
    );
    put(
        "io.kubernetes.cri-o.MountPoint",
        rootfs.display().to_string(),
    );
    put("io.kubernetes.cri-o.RuntimeHandler", "kata".into());
    put("io.kubernetes.cri-o.PrivilegedRuntime", "false".into());
    put("io.kubernetes.cri-o.SeccompProfilePath", String::new());
    put("io.kubernetes.cri-o.Created", "2024-01-01T00:00:00Z".into());
    put(
        "io.kubernetes.cri-o.CgroupParent",
        format!("/kubepods/besteffort/pod{}", pod.uid),
    );
    put(
        "io.kubernetes.cri-o.ShmPath",
        pod.sandbox_dir.join("shm").display().to_string(),
    );
    put(
        "io.kubernetes.cri-o.ResolvPath",
        pod.sandbox_dir.join("resolv.conf").display().to_string(),
    );
    put(
        "io.kubernetes.cri-o.HostnamePath",
        pod.sandbox_dir.join("hostname").display().to_string(),
    );
    if is_sandbox {
        put("io.kubernetes.cri-o.PortMappings", "[]".into());
    } else {
        put("io.kubernetes.cri-o.TTY", "false".into());
        put("io.kubernetes.cri-o.Stdin", "false".into());
        put("io.kubernetes.cri-o.StdinOnce", "false".into());
        put(
            "io.kubernetes.cri-o.Image",
            "docker.io/library/busybox:kata".into(),
        );
        put(
            "io.kubernetes.cri-o.ImageName",
            "docker.io/library/busybox:kata".into(),
        );
        put("io.kubernetes.cri-o.Volumes", "[]".into());
        put("io.kubernetes.container.restartCount", "0".into());
        put(
            "io.kubernetes.container.terminationMessagePath",
            "/dev/termination-log".into(),
        );
    }
    for (k, v) in labels.as_object().unwrap() {
        put(k, v.as_str().unwrap().to_owned());
    }
    if is_sandbox {
        put("io.kubernetes.container.name", "POD".into());
    }

    let ro_bind = ["ro", "bind", "nodev", "nosuid", "noexec"];
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620",
                           "gid=5"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
               "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}),
        json!({"destination": "/dev/shm", "type": "bind",
               "source": pod.sandbox_dir.join("shm"), "options": ["rw", "bind"]}),
        json!({"destination": "/etc/resolv.conf", "type": "bind",
               "source": pod.sandbox_dir.join("resolv.conf"), "options": ro_bind}),
        json!({"destination": "/etc/hostname", "type": "bind",
               "source": pod.sandbox_dir.join("hostname"), "options": ro_bind}),
    ];
    if let Some(termination_log) = termination_log {
        let rw_bind = ["rw", "rbind", "rprivate", "bind"];
        mounts.push(json!({"destination": "/etc/hosts", "type": "bind",
            "source": pod.sandbox_dir.join("etc-hosts"), "options": rw_bind}));
        mounts.push(
            json!({"destination": "/dev/termination-log", "type": "bind",
            "source": termination_log, "options": rw_bind}),
        );
    }
    let pinned = |kind: &str| format!("/var/run/{kind}ns/{}", pod.uid);
    json!({
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "TERM=xterm",
                format!("HOSTNAME={}", pod.hostname),
            ],
            "cwd": "/",
            "capabilities": {
                "bounding": DEFAULT_CAPS,
                "effective": DEFAULT_CAPS,
                "permitted": DEFAULT_CAPS,
            },
            "oomScoreAdj": if is_sandbox { -998 } else { 1000 },
        },
        "root": {"path": rootfs, "readonly": is_sandbox},
        "hostname": pod.hostname,
        "mounts": mounts,
        "annotations": ann,
        "linux": {
            "resources": {
                "devices": [{"allow": false, "access": "rwm"}],
                "cpu": {"shares": 2},
            },
            "cgroupsPath": format!("/kubepods/besteffort/pod{}/crio-{id}", pod.uid),
            "namespaces": [
                {"type": "pid"},
                {"type": "ipc", "path": pinned("ipc")},
                {"type": "uts", "path": pinned("uts")},
                {"type": "mount"},
            ],
            "maskedPaths": [
                "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug",
                "/proc/scsi", "/sys/firmware",
            ],
            "readonlyPaths": [
                "/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq",
                "/proc/sys", "/proc/sysrq-trigger",
            ],
        },
    })
}

/// An RPC that failed or did not answer in time.
#[derive(Debug)]
pub enum RpcError {
    Ttrpc(ttrpc::Error),
    Timeout { rpc: &'static str, after: Duration },
}

impl RpcError {
    /// The connection went away (the shim exited), which CRI-O tolerates after Shutdown.
    pub fn is_closed(&self) -> bool {
        match self {
            RpcError::Ttrpc(ttrpc::Error::LocalClosed | ttrpc::Error::RemoteClosed) => true,
            RpcError::Ttrpc(ttrpc::Error::Socket(_) | ttrpc::Error::Eof) => true,
            RpcError::Ttrpc(ttrpc::Error::Others(s)) => s.contains("closed"),
            _ => false,
        }
    }
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RpcError::Ttrpc(ttrpc::Error::RpcStatus(s)) => {
                write!(f, "{:?}: {}", s.code(), s.message())
            }
            RpcError::Ttrpc(e) => write!(f, "{e}"),
            RpcError::Timeout { rpc, after } => write!(f, "{rpc} did not answer within {after:?}"),
        }
    }
}

/// A ttrpc Task client, as CRI-O holds one per `start`.
#[derive(Clone)]
pub struct ShimClient {
    task: TaskClient,
    pub address: String,
}

impl std::fmt::Debug for ShimClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShimClient")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

async fn bounded<T>(
    rpc: &'static str,
    after: Duration,
    fut: impl std::future::Future<Output = ttrpc::Result<T>>,
) -> Result<T, RpcError> {
    match tokio::time::timeout(after, fut).await {
        Ok(r) => r.map_err(RpcError::Ttrpc),
        Err(_) => Err(RpcError::Timeout { rpc, after }),
    }
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::Context::default()
}

impl ShimClient {
    pub async fn connect(address: &str) -> Result<Self, RpcError> {
        let client = bounded("connect", Duration::from_secs(5), Client::connect(address)).await?;
        Ok(Self {
            task: TaskClient::new(client),
            address: address.to_owned(),
        })
    }

    pub async fn create(&self, req: &CreateTaskRequest) -> Result<CreateTaskResponse, RpcError> {
        bounded("Create", CREATE_TIMEOUT, self.task.create(ctx(), req)).await
    }

    pub async fn start(&self, id: &str) -> Result<StartResponse, RpcError> {
        let req = StartRequest {
            id: id.to_owned(),
            ..Default::default()
        };
        bounded("Start", RPC_TIMEOUT, self.task.start(ctx(), &req)).await
    }

    /// State, bounded by containerd's 2 s; returns the time it took too.
    pub async fn state(&self, id: &str) -> Result<(StateResponse, Duration), RpcError> {
        let req = StateRequest {
            id: id.to_owned(),
            ..Default::default()
        };
        let t = Instant::now();
        let r = bounded("State", STATE_DEADLINE, self.task.state(ctx(), &req)).await?;
        Ok((r, t.elapsed()))
    }

    pub async fn wait(&self, id: &str, within: Duration) -> Result<WaitResponse, RpcError> {
        let req = WaitRequest {
            id: id.to_owned(),
            ..Default::default()
        };
        bounded("Wait", within, self.task.wait(ctx(), &req)).await
    }

    pub async fn kill(&self, id: &str, signal: u32, all: bool) -> Result<Empty, RpcError> {
        let req = KillRequest {
            id: id.to_owned(),
            signal,
            all,
            ..Default::default()
        };
        bounded("Kill", RPC_TIMEOUT, self.task.kill(ctx(), &req)).await
    }

    pub async fn delete(&self, id: &str) -> Result<DeleteResponse, RpcError> {
        let req = DeleteRequest {
            id: id.to_owned(),
            ..Default::default()
        };
        bounded("Delete", RPC_TIMEOUT, self.task.delete(ctx(), &req)).await
    }

    /// Shutdown as CRI-O sends it after each Delete (`now` false).
    /// Update with OCI `LinuxResources` JSON.
    pub async fn update(&self, id: &str, resources_json: &[u8]) -> Result<Empty, RpcError> {
        let req = UpdateTaskRequest {
            id: id.to_owned(),
            resources: Some(Any {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into(),
                value: resources_json.to_vec(),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        bounded(
            "Update",
            Duration::from_secs(60),
            self.task.update(ctx(), &req),
        )
        .await
    }

    pub async fn shutdown(&self, id: &str) -> Result<Empty, RpcError> {
        let req = ShutdownRequest {
            id: id.to_owned(),
            now: false,
            ..Default::default()
        };
        bounded("Shutdown", RPC_TIMEOUT, self.task.shutdown(ctx(), &req)).await
    }
}

/// The socket path of a `unix://` address.
pub fn socket_path(address: &str) -> &str {
    address.strip_prefix("unix://").unwrap_or(address)
}

/// Live shim servers serving `address` (their `-socket` names it), with pids.
pub fn shim_servers(address: &str) -> Vec<(i32, String)> {
    processes_naming(socket_path(address))
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("containerd-shim-kata-v2"))
        .collect()
}

/// Stops what a failed test left: shim servers of the given addresses get SIGTERM (they
/// tear their VM down), then SIGKILL after 30 s (QEMU and its daemons die with them).
#[derive(Debug, Default)]
pub struct ShimReaper {
    pub addresses: Vec<String>,
}

impl ShimReaper {
    pub fn watch(&mut self, address: &str) {
        if !self.addresses.iter().any(|a| a == address) {
            self.addresses.push(address.to_owned());
        }
    }
}

impl Drop for ShimReaper {
    fn drop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        for address in &self.addresses {
            let servers = shim_servers(address);
            for (pid, _) in &servers {
                let _ = kill(Pid::from_raw(*pid), Signal::SIGTERM);
            }
            if !wait_until(Duration::from_secs(30), || shim_servers(address).is_empty()) {
                for (pid, _) in shim_servers(address) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
    }
}

/// What is left of a pod: processes naming any of `ids` (shim, QEMU, daemons), mounts
/// naming them, and the shim's directories for them.
pub fn leftovers(ids: &[&str]) -> Vec<String> {
    let mut left = Vec::new();
    for id in ids {
        for (pid, cmd) in processes_naming(id) {
            left.push(format!("process {pid}: {cmd}"));
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for line in mountinfo.lines().filter(|l| l.contains(id)) {
            left.push(format!("mount: {line}"));
        }
        for dir in [
            format!("/run/kata/{id}"),
            format!("/run/kata-containers/shared/sandboxes/{id}"),
        ] {
            if Path::new(&dir).exists() {
                left.push(format!("directory {dir}"));
            }
        }
    }
    left
}
