//! Test infrastructure for end-to-end tests that boot real VMs.
//!
//! - [`GuestImage`] finds the guest kernel and root filesystem built by
//!   `hack/build-guest.sh`;
//! - [`TestVm`] builds a [`VmConfig`] for a test with its own run directory;
//! - [`LeakCheck`] asserts that nothing a VM started survives it: no process whose command
//!   line names the VM's run directory, no mount under it, and no directory left.
//!
//! [`containerd`] runs a test-owned containerd (for `ctr`), and [`cri`] one with its CRI
//! plugin and a CRI v1 client; [`crio`] plays CRI-O's part toward the shim. [`journal`]
//! reads the systemd journal; [`metrics`] reaches the shims' management sockets and runs
//! kata-monitor and a private Prometheus. [`peerpod`] runs the peer pods adaptor and
//! [`registry`] a private registry for in-guest pulls.
//!
//! Tests fail (never skip) when a prerequisite is missing: a green run must mean the VM booted.

pub mod containerd;
pub mod cri;
pub mod crio;
pub mod journal;
pub mod metrics;
pub mod peerpod;
pub mod registry;
pub mod tool;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kata_hypervisor::{Accel, GuestRoot, SharedFsConfig, VmConfig, VsockMode};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Which kernel the guest image was built with (`hack/build-guest.sh --kernel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFlavour {
    /// Ours: built from linux-source with every driver built in; `vmlinux` booted with the
    /// root filesystem image on virtio-pmem.
    Kata,
    /// Debian's cloud kernel: `vmlinuz` with an initrd carrying the modules the agent loads.
    Debian,
}

/// The guest's kernel and root filesystem.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: PathBuf,
    /// How the VMs get their root filesystem: the image for our kernel, the initrd for
    /// Debian's.
    pub root: GuestRoot,
    /// The initrd, present for both kernels.
    pub initrd: PathBuf,
    /// `uname -r` of the guest kernel, as recorded by the image build.
    pub kernel_release: String,
    pub flavour: KernelFlavour,
    /// The built kernel's configuration (ours only).
    pub kernel_config: Option<PathBuf>,
}

impl GuestImage {
    /// `KATA_TEST_GUEST_DIR` (default `<repo>/build/guest`), as written by `hack/build-guest.sh`.
    pub fn find() -> Self {
        let dir = std::env::var_os("KATA_TEST_GUEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("build/guest"));
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .unwrap_or_default()
                .trim()
                .to_owned()
        };
        let missing = || -> ! {
            panic!(
                "no guest image in {}: run hack/build-guest.sh",
                dir.display()
            )
        };
        let flavour = match read("kernel-flavour").as_str() {
            "kata" => KernelFlavour::Kata,
            "debian" => KernelFlavour::Debian,
            _ => missing(),
        };
        let initrd = dir.join("initrd.img");
        let (kernel, root, kernel_config) = match flavour {
            KernelFlavour::Kata => {
                let root = GuestRoot::image(dir.join("rootfs.img"))
                    .unwrap_or_else(|e| panic!("{e}: run hack/build-guest.sh"));
                (dir.join("vmlinux"), root, Some(dir.join("kernel.config")))
            }
            KernelFlavour::Debian => (dir.join("vmlinuz"), GuestRoot::Initrd(initrd.clone()), None),
        };
        let kernel_release = read("kernel-release");
        if !kernel.is_file() || !initrd.is_file() || kernel_release.is_empty() {
            missing();
        }
        Self {
            kernel,
            root,
            initrd,
            kernel_release,
            flavour,
            kernel_config,
        }
    }

    /// The `[hypervisor.qemu]` lines that name this guest in a `configuration.toml`.
    pub fn config_lines(&self) -> String {
        let root = match &self.root {
            GuestRoot::Image { path, .. } => format!("image = {:?}", path),
            GuestRoot::Initrd(path) => format!("initrd = {:?}", path),
        };
        format!("kernel = {:?}\n{root}\n", self.kernel)
    }
}

/// Path of a helper daemon: `$KATA_DEPS_PREFIX/bin/<name>` (default prefix /opt/kata-deps).
pub fn daemon_path(name: &str) -> PathBuf {
    let prefix = std::env::var_os("KATA_DEPS_PREFIX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/kata-deps"));
    let path = prefix.join("bin").join(name);
    assert!(
        path.is_file(),
        "{} is missing: run hack/install-deps.sh",
        path.display()
    );
    path
}

/// A test's VM configuration and the scratch space it lives in.
#[derive(Debug)]
pub struct TestVm {
    /// Holds the run directory's parent and the shared directory; removed on drop.
    pub scratch: tempfile::TempDir,
    pub config: VmConfig,
}

impl TestVm {
    /// A VM with the guest image, 1 vCPU, 512 MiB, TCG/KVM chosen automatically, vsock auto.
    pub fn new(name: &str) -> Self {
        let image = GuestImage::find();
        let scratch = tempfile::Builder::new()
            .prefix(&format!("kata-test-{name}-"))
            .tempdir()
            .expect("create scratch dir");
        let config = VmConfig {
            id: name.to_owned(),
            qemu_path: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            firmware: Some(PathBuf::from(kata_shim::config::DEFAULT_FIRMWARE)),
            kernel: image.kernel,
            root: image.root,
            kernel_params: vec!["agent.log=debug".to_owned()],
            memory_mib: 512,
            memory_slots: 4,
            max_memory_mib: 4096,
            vcpus: 1,
            max_vcpus: 2,
            accel: Accel::Auto,
            tcg_tb_size_mib: kata_hypervisor::config::DEFAULT_TCG_TB_SIZE_MIB,
            vsock: VsockMode::Auto,
            vsock_daemon: daemon_path("vhost-device-vsock"),
            shared_fs: None,
            net: Vec::new(),
            run_dir: scratch.path().join("run"),
            start_timeout: Duration::from_secs(20),
            seccomp_sandbox: String::new(),
            placement: Default::default(),
        };
        Self { scratch, config }
    }

    /// Shares `<scratch>/shared` into the guest with the Rust virtiofsd.
    pub fn with_shared_dir(mut self) -> Self {
        let dir = self.shared_dir();
        std::fs::create_dir_all(&dir).expect("create shared dir");
        self.config.shared_fs = Some(SharedFsConfig {
            daemon: daemon_path("virtiofsd"),
            shared_dir: dir,
            cache: "auto".to_owned(),
            extra_args: Vec::new(),
        });
        self
    }

    /// The host directory shared into the guest (when [`Self::with_shared_dir`] was used).
    pub fn shared_dir(&self) -> PathBuf {
        self.scratch.path().join("shared")
    }

    /// A leak check bound to this VM's run directory.
    pub fn leak_check(&self) -> LeakCheck {
        LeakCheck {
            run_dir: self.config.run_dir.clone(),
        }
    }
}

/// Runtime processes naming `needle` as "pid: cmdline", not counting `ctr` (its command
/// line names container ids too).
pub fn runtime_processes_naming(needle: &str) -> Vec<String> {
    processes_naming(needle)
        .into_iter()
        .filter(|(_, cmdline)| !cmdline.starts_with("ctr "))
        .map(|(pid, cmdline)| format!("{pid}: {cmdline}"))
        .collect()
}

/// Nothing of the containers or pods `ids` is left on the host: no process naming them
/// (shims, QEMU, daemons; waited for up to 15 s), no mount naming them, no sandbox
/// directory (`/run/kata/<id>`, `/run/kata-containers/shared/sandboxes/<id>`).
pub fn assert_no_runtime_leaks(ids: &[&str]) {
    for id in ids {
        let gone = wait_until(Duration::from_secs(15), || {
            runtime_processes_naming(id).is_empty()
        });
        assert!(
            gone,
            "processes left for {id}: {:?}",
            runtime_processes_naming(id)
        );
        let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(id))
            .map(str::to_owned)
            .collect();
        assert!(mounts.is_empty(), "mounts left for {id}: {mounts:?}");
        for dir in [
            format!("/run/kata/{id}"),
            format!("/run/kata-containers/shared/sandboxes/{id}"),
        ] {
            assert!(!Path::new(&dir).exists(), "{dir} left behind");
        }
        let cgroups = host_cgroups_named(id);
        assert!(
            cgroups.is_empty(),
            "host cgroups left for {id}: {cgroups:?}"
        );
    }
}

/// Host cgroup directories named `name` (a container's or sandbox's id), in every
/// hierarchy under /sys/fs/cgroup, down to a depth of 6.
pub fn host_cgroups_named(name: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, name: &str, depth: u32, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let path = e.path();
            if e.file_name() == name {
                out.push(path.clone());
            }
            if depth > 0 {
                walk(&path, name, depth - 1, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(Path::new("/sys/fs/cgroup"), name, 6, &mut out);
    out
}

/// Polls `f` every 20 ms until it returns true or `timeout` passes; returns its last answer.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts that nothing belonging to a VM is left.
#[derive(Debug, Clone)]
pub struct LeakCheck {
    run_dir: PathBuf,
}

impl LeakCheck {
    /// Processes whose command line mentions the run directory (QEMU's QMP/console sockets,
    /// virtiofsd's and the vsock daemon's sockets all live there), with their pids.
    pub fn processes(&self) -> Vec<(i32, String)> {
        processes_naming(&self.run_dir.to_string_lossy())
    }

    /// Mount points at or under the run directory.
    pub fn mounts(&self) -> Vec<String> {
        let needle = self.run_dir.to_string_lossy().into_owned();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&needle))
            .map(str::to_owned)
            .collect()
    }

    /// Panics naming whatever is left: processes (after a grace period for exits already
    /// under way), mounts, or the run directory itself.
    pub fn assert_clean(&self) {
        wait_until(Duration::from_secs(5), || {
            self.processes().is_empty() && zombie_children().is_empty()
        });
        let procs = self.processes();
        assert!(procs.is_empty(), "processes left behind: {procs:?}");
        let zombies = zombie_children();
        assert!(zombies.is_empty(), "children never reaped: {zombies:?}");
        let mounts = self.mounts();
        assert!(mounts.is_empty(), "mounts left behind: {mounts:?}");
        assert!(
            !self.run_dir.exists(),
            "run directory left behind: {}",
            self.run_dir.display()
        );
    }
}

/// Live processes (not zombies) whose command line contains `needle`, with their pids.
pub fn processes_naming(needle: &str) -> Vec<(i32, String)> {
    proc_pids()
        .filter_map(|pid| {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            (cmdline.contains(needle) && !is_zombie(pid)).then_some((pid, cmdline))
        })
        .collect()
}

/// Children of this process that exited and were never reaped.
pub fn zombie_children() -> Vec<i32> {
    let me = std::process::id().to_string();
    proc_pids()
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // Fields after the command name: state, ppid, ...
            let Some((_, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let mut fields = rest.split_whitespace();
            fields.next() == Some("Z") && fields.next() == Some(me.as_str())
        })
        .collect()
}

/// Every pid in /proc.
fn proc_pids() -> impl Iterator<Item = i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
                .unwrap_or(false)
        })
        .unwrap_or(true)
}

/// Installs a test log subscriber once (RUST_LOG, default info), so guest console lines show
/// up in a failing test's output.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}
