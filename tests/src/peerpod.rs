//! Peer pods test harness: the real `peerpod-adaptor` (target/debug) with the local
//! provider on a bridge and subnet of the test's own, the pod VM image from
//! hack/build-podvm.sh, a pod network namespace with a veth as CNI would leave it, and
//! clients for the hypervisor socket and for a pod's agent socket (the shim's hybrid
//! handshake). Dropping an [`Adaptor`] stops it and removes its bridge and directories; a
//! [`PodNetns`] removes its namespace and veth.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kata_proto::hypervisor_ttrpc::HypervisorClient;
use ttrpc::asynchronous::{transport::Socket, Client};

use crate::{repo_root, wait_until};

/// The pod VM image directory (`PODVM_DIR`, default `<repo>/build/podvm`).
pub fn podvm_dir() -> PathBuf {
    let dir = std::env::var_os("PODVM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("build/podvm"));
    assert!(
        dir.join("initrd.img").is_file(),
        "no pod VM image in {}: run hack/build-podvm.sh",
        dir.display()
    );
    dir
}

/// Runs a command, panicking with its stderr on failure; returns stdout.
pub fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A test-unique small number (for names and subnets) from the pid and a counter.
fn unique() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    (std::process::id().wrapping_mul(7) + NEXT.fetch_add(1, Ordering::Relaxed)) % 200
}

/// A running adaptor.
#[derive(Debug)]
pub struct Adaptor {
    child: Option<Child>,
    /// Holds config, state, pods and instances; removed on drop.
    pub dir: tempfile::TempDir,
    /// The pods directory (agent sockets): short, in /run, since a socket path holding a
    /// CRI sandbox id (64 characters) must stay under 108 bytes.
    pub pods: tempfile::TempDir,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub instances_dir: PathBuf,
    pub bridge: String,
    /// The bridge's (the node's) address.
    pub gateway: Ipv4Addr,
    /// `[local]` sizing lines (instance types, allow-list, default); set before `start`.
    pub sizing: String,
    /// Top-level lines and tables (e.g. `limit_per_node`, `[kubernetes]`) written before
    /// `[registries]`; set before `start`.
    pub top: String,
    /// Environment of the adaptor process (the Kubernetes variables are removed otherwise).
    pub env: Vec<(String, String)>,
    n: u32,
    log: PathBuf,
}

impl Adaptor {
    /// An adaptor on a bridge and /24 of its own (MTU 1550: a 1500 pod MTU plus VXLAN),
    /// not started yet ([`Adaptor::start`]).
    pub fn new() -> Self {
        let n = unique();
        let dir = tempfile::Builder::new()
            .prefix("kata-test-peerpod-")
            .tempdir()
            .unwrap();
        let bridge = format!("pptest{n}");
        let gateway = Ipv4Addr::new(10, 231, n as u8, 1);
        let socket = dir.path().join("hypervisor.sock");
        let instances_dir = dir.path().join("instances");
        let config = dir.path().join("adaptor.toml");
        let log = dir.path().join("adaptor.log");
        let pods = tempfile::Builder::new()
            .prefix("pp")
            .tempdir_in("/run")
            .unwrap();
        Self {
            child: None,
            dir,
            pods,
            config,
            socket,
            instances_dir,
            bridge,
            gateway,
            sizing: "instance_types = { tiny = { vcpus = 1, memory_mib = 512 } }\ndefault_instance_type = \"tiny\"".into(),
            top: String::new(),
            env: Vec::new(),
            n,
            log,
        }
    }

    /// Writes the configuration (`insecure` registries, extra `[local]` lines) and starts
    /// the adaptor.
    pub fn start(&mut self, insecure: &[String], extra_local: &str) {
        let podvm = podvm_dir();
        let insecure: Vec<String> = insecure.iter().map(|s| format!("{s:?}")).collect();
        let (n, bridge) = (self.n, &self.bridge);
        std::fs::write(
            &self.config,
            format!(
                r#"socket = "{socket}"
pods_dir = "{pods}"
state_dir = "{d}/state"
proxy_timeout_secs = 120
vxlan_min_vni = {vni}
{top}
[registries]
insecure = [{insecure}]
[local]
instances_dir = "{instances}"
bridge = "{bridge}"
subnet = "10.231.{n}.0/24"
mtu = 1550
images = {{ default = "{podvm}" }}
{sizing}
{extra_local}
"#,
                socket = self.socket.display(),
                d = self.dir.path().display(),
                pods = self.pods.path().display(),
                vni = 600_000 + n * 4096,
                insecure = insecure.join(", "),
                instances = self.instances_dir.display(),
                podvm = podvm.display(),
                top = self.top,
                sizing = self.sizing,
            ),
        )
        .unwrap();
        self.spawn();
    }

    fn binary() -> PathBuf {
        let bin = repo_root().join("target/debug/peerpod-adaptor");
        assert!(
            bin.is_file(),
            "{} is missing: cargo build -p kata-peerpod",
            bin.display()
        );
        bin
    }

    /// Starts the adaptor process and waits for the hypervisor socket.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "adaptor already running");
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(Self::binary())
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "kata_peerpod=debug,info")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .env_remove("NODE_NAME")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start peerpod-adaptor");
        self.child = Some(child);
        let up = wait_until(Duration::from_secs(30), || {
            self.socket.exists() || self.exited()
        });
        assert!(
            up && !self.exited(),
            "adaptor did not serve {}: {}",
            self.socket.display(),
            self.log()
        );
    }

    fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .map(|c| c.try_wait().unwrap().is_some())
            .unwrap_or(true)
    }

    /// Kills the adaptor with SIGKILL (no cleanup of its own) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the adaptor with SIGTERM and reaps it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            if !wait_until(Duration::from_secs(10), || {
                matches!(c.try_wait(), Ok(Some(_)))
            }) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }

    /// The adaptor's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log without its ANSI colours (tracing colours field names).
    pub fn plain_log(&self) -> String {
        let log = self.log();
        let mut out = String::with_capacity(log.len());
        let mut chars = log.chars();
        while let Some(c) = chars.next() {
            if c == '\x1b' {
                // Up to the escape sequence's final letter.
                chars.by_ref().find(|c| c.is_ascii_alphabetic());
            } else {
                out.push(c);
            }
        }
        out
    }

    /// No pod state, no pod directory and no instance of sandbox `id`.
    pub fn assert_nothing_of(&self, id: &str) {
        assert!(!self.dir.path().join("state/pods").join(id).exists());
        assert!(!self.dir.path().join("pods").join(id).exists());
        let instances = self.instances();
        assert!(!instances.iter().any(|i| i.contains(id)), "{instances:?}");
    }

    /// A client of the hypervisor socket.
    pub async fn client(&self) -> HypervisorClient {
        let c = Client::connect(&format!("unix://{}", self.socket.display()))
            .await
            .expect("connect to the adaptor");
        HypervisorClient::new(c)
    }

    /// The instance directories that exist.
    pub fn instances(&self) -> Vec<String> {
        std::fs::read_dir(&self.instances_dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The pid of an instance's QEMU.
    pub fn qemu_pid(&self, instance: &str) -> Option<i32> {
        std::fs::read_to_string(self.instances_dir.join(instance).join("qemu.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// An instance's console log.
    pub fn console(&self, instance: &str) -> String {
        std::fs::read_to_string(self.instances_dir.join(instance).join("console.log"))
            .unwrap_or_default()
    }

    /// Live processes whose command line names this adaptor's instances directory (its
    /// VMs' QEMUs).
    pub fn processes(&self) -> Vec<(i32, String)> {
        crate::processes_naming(&self.instances_dir.display().to_string())
    }

    /// Nothing of any instance is left: no QEMU, no instance directory, no tap on the
    /// bridge.
    pub fn assert_no_instances(&self) {
        let gone = wait_until(Duration::from_secs(15), || self.processes().is_empty());
        assert!(gone, "processes left: {:?}", self.processes());
        assert!(
            self.instances().is_empty(),
            "instances left: {:?}",
            self.instances()
        );
        let taps = sh("ip", &["-o", "link", "show", "master", &self.bridge]);
        assert!(
            taps.trim().is_empty(),
            "taps left on {}: {taps}",
            self.bridge
        );
    }
}

impl Default for Adaptor {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Adaptor {
    fn drop(&mut self) {
        self.stop();
        // Whatever a failed test left: its VMs, then the bridge.
        for (pid, _) in self.processes() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        wait_until(Duration::from_secs(5), || self.processes().is_empty());
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

/// A pod network namespace as CNI leaves it: `/var/run/netns/<name>` holding `eth0` (a
/// veth, MTU 1500) with the pod address and a default route via the host end, which stays
/// in the host namespace with the gateway address.
#[derive(Debug)]
pub struct PodNetns {
    pub name: String,
    pub path: PathBuf,
    pub host_veth: String,
    pub pod_ip: Ipv4Addr,
    pub host_ip: Ipv4Addr,
}

impl PodNetns {
    /// Creates the namespace and veth (subnet 10.232.<n>.0/24).
    pub fn create() -> Self {
        let n = unique();
        let name = format!("pptest-pod{n}");
        let host_veth = format!("ppth{n}");
        let host_ip = Ipv4Addr::new(10, 232, n as u8, 1);
        let pod_ip = Ipv4Addr::new(10, 232, n as u8, 2);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("ip")
            .args(["link", "del", &host_veth])
            .output();
        sh("ip", &["netns", "add", &name]);
        sh(
            "ip",
            &[
                "link", "add", &host_veth, "type", "veth", "peer", "name", "eth0", "netns", &name,
            ],
        );
        sh(
            "ip",
            &["addr", "add", &format!("{host_ip}/24"), "dev", &host_veth],
        );
        sh("ip", &["link", "set", &host_veth, "up"]);
        let ns = |args: &[&str]| {
            let mut v = vec!["-n", name.as_str()];
            v.extend_from_slice(args);
            sh("ip", &v)
        };
        ns(&["addr", "add", &format!("{pod_ip}/24"), "dev", "eth0"]);
        ns(&["link", "set", "eth0", "up"]);
        ns(&["link", "set", "lo", "up"]);
        ns(&["route", "add", "default", "via", &host_ip.to_string()]);
        Self {
            path: PathBuf::from(format!("/var/run/netns/{name}")),
            name,
            host_veth,
            pod_ip,
            host_ip,
        }
    }

    /// Runs `ip <args>` in the namespace.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut v = vec!["-n", self.name.as_str()];
        v.extend_from_slice(args);
        sh("ip", &v)
    }

    /// A statistics counter of a link in the namespace (`rx_packets`, `tx_bytes`, ...).
    pub fn counter(&self, link: &str, counter: &str) -> u64 {
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &self.name,
                "cat",
                &format!("/sys/class/net/{link}/statistics/{counter}"),
            ],
        )
        .trim()
        .parse()
        .unwrap()
    }

    /// Removes the namespace (as the CRI does when the pod goes).
    pub fn remove(&self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_veth])
            .output();
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        self.remove();
    }
}

/// A client of a pod's agent through its agent socket, with the shim's own hybrid dialer.
pub struct PodAgent {
    socket: PathBuf,
    pub health: kata_proto::health_ttrpc::HealthClient,
    pub agent: kata_proto::agent_ttrpc::AgentServiceClient,
    pub containers: kata_proto::agent_ttrpc::ContainerServiceClient,
    pub images: kata_proto::image_ttrpc::ImageServiceClient,
}

impl std::fmt::Debug for PodAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodAgent")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

/// A ttrpc context with a timeout.
pub fn ctx(secs: i64) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(secs * 1_000_000_000)
}

/// The process of a command run in the guest: root, full capabilities (the tests inspect
/// the VM's network), busybox's PATH.
pub fn process(args: &[&str]) -> serde_json::Value {
    let caps: Vec<String> = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_KILL",
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_NET_BIND_SERVICE",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SYS_ADMIN",
        "CAP_SYS_PTRACE",
        "CAP_SYS_CHROOT",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    serde_json::json!({
        "terminal": false,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
        "cwd": "/",
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
        "noNewPrivileges": false,
    })
}

/// A guest OCI spec for container `id` rooted at its pulled image, with `binds`
/// (guest source, container destination).
pub fn guest_spec(id: &str, args: &[&str], binds: &[(&str, &str)]) -> Vec<u8> {
    let mut mounts = vec![
        serde_json::json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        serde_json::json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        serde_json::json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
    ];
    for (src, dst) in binds {
        mounts.push(serde_json::json!({"destination": dst, "type": "bind", "source": src, "options": ["bind"]}));
    }
    serde_json::to_vec(&serde_json::json!({
        "ociVersion": "1.0.2",
        "process": process(args),
        "root": {"path": format!("/run/kata-containers/shared/containers/{id}/rootfs"), "readonly": false},
        "hostname": "peerpod",
        "mounts": mounts,
        "linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]},
    }))
    .unwrap()
}

/// What a process printed and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ran {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl PodAgent {
    /// Dials the agent socket (`CONNECT 1024`) and builds the clients.
    pub async fn connect(socket: &std::path::Path) -> Self {
        let stream = kata_hypervisor::vsock::Endpoint::Hybrid {
            uds: socket.to_owned(),
        }
        .connect(kata_proto::AGENT_VSOCK_PORT, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("dial {}: {e}", socket.display()));
        let c = Client::new(Socket::new(stream));
        Self {
            socket: socket.to_owned(),
            health: kata_proto::health_ttrpc::HealthClient::new(c.clone()),
            agent: kata_proto::agent_ttrpc::AgentServiceClient::new(c.clone()),
            containers: kata_proto::agent_ttrpc::ContainerServiceClient::new(c.clone()),
            images: kata_proto::image_ttrpc::ImageServiceClient::new(c),
        }
    }

    /// Opens one stdio stream of a process (`CONNECT 1026`, then the agent's header).
    pub async fn stream(&self, container: &str, exec: &str, kind: &str) -> tokio::net::UnixStream {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s =
            kata_hypervisor::vsock::hybrid_connect(&self.socket, kata_proto::STDIO_VSOCK_PORT)
                .await
                .expect("dial the stdio port");
        let exec = if exec.is_empty() { "-" } else { exec };
        s.write_all(format!("{container} {exec} {kind}\n").as_bytes())
            .await
            .unwrap();
        let mut ok = [0u8; 3];
        s.read_exact(&mut ok).await.unwrap();
        assert_eq!(&ok, b"OK\n", "stdio attach of {container}/{exec}/{kind}");
        s
    }

    /// Runs `args` as exec `exec_id` in `container`, returning its output and status.
    pub async fn exec(&self, container: &str, exec_id: &str, args: &[&str]) -> Ran {
        use kata_proto::agent::{
            ExecProcessRequest, StartProcessRequest, Stdio, WaitProcessRequest,
        };
        use tokio::io::AsyncReadExt;
        let mut req = ExecProcessRequest::new();
        req.container_id = container.into();
        req.exec_id = exec_id.into();
        req.process = serde_json::to_vec(&process(args)).unwrap();
        let mut stdio = Stdio::new();
        stdio.stdout = true;
        stdio.stderr = true;
        req.stdio = Some(stdio).into();
        self.containers.exec_process(ctx(30), &req).await.unwrap();
        let mut out = self.stream(container, exec_id, "stdout").await;
        let mut err = self.stream(container, exec_id, "stderr").await;
        let mut start = StartProcessRequest::new();
        start.container_id = container.into();
        start.exec_id = exec_id.into();
        self.containers
            .start_process(ctx(30), &start)
            .await
            .unwrap();
        let (mut o, mut e) = (Vec::new(), Vec::new());
        let (r1, r2) = tokio::join!(out.read_to_end(&mut o), err.read_to_end(&mut e));
        r1.unwrap();
        r2.unwrap();
        let mut wait = WaitProcessRequest::new();
        wait.container_id = container.into();
        wait.exec_id = exec_id.into();
        let status = self
            .containers
            .wait_process(ctx(120), &wait)
            .await
            .unwrap()
            .status;
        Ran {
            status,
            stdout: String::from_utf8_lossy(&o).into_owned(),
            stderr: String::from_utf8_lossy(&e).into_owned(),
        }
    }
}
