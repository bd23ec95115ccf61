//! A test-owned containerd 1.6: its own root, state and sockets under a temp dir, so tests
//! never touch (or depend on) a system containerd. `ctr` is driven as a user would.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::{repo_root, wait_until};

/// containerd's runtime type for our shim.
pub const KATA_RUNTIME: &str = "io.containerd.kata.v2";
/// The reference runtime the same checks must pass with.
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
/// The busybox test image built by `hack/build-test-images.sh`.
pub const BUSYBOX: &str = "docker.io/library/busybox:kata";
/// Namespace the tests use.
pub const NAMESPACE: &str = "kata-test";

/// Namespace containerd's CRI plugin keeps its pods, containers and images in.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// A running containerd owned by one test; killed and cleaned on drop.
#[derive(Debug)]
pub struct Containerd {
    dir: tempfile::TempDir,
    child: Child,
    /// How the daemon was started (PATH and environment), for [`Containerd::restart`].
    path: String,
    env: Vec<(String, PathBuf)>,
    /// containerd was killed and reaped already.
    killed: bool,
    /// Namespaces whose leftover tasks and containers Drop deletes.
    namespaces: Vec<String>,
}

/// How to start a test containerd: [`Containerd::start`] and
/// [`Containerd::start_with_env`] are the ctr tests' defaults (CRI plugin disabled, busybox
/// imported into [`NAMESPACE`]).
#[derive(Debug, Clone)]
pub struct Options {
    /// Extra environment for containerd and the shims it starts.
    pub env: Vec<(String, PathBuf)>,
    /// `None` disables the CRI plugin; `Some(toml)` enables it and appends `toml` (config
    /// version 2, e.g. a `[plugins."io.containerd.grpc.v1.cri"]` table) to the configuration.
    pub cri: Option<String>,
    /// Image archives under `<repo>/build/images` to import, as (namespace, file name).
    pub imports: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            env: Vec::new(),
            cri: None,
            imports: vec![(NAMESPACE.to_owned(), "busybox.tar".to_owned())],
        }
    }
}

impl Containerd {
    /// Starts containerd with `bin_dir` first on its PATH (where `containerd-shim-kata-v2`
    /// is found) and imports the busybox image.
    pub fn start(bin_dir: &Path) -> Self {
        Self::start_with_env(bin_dir, &[])
    }

    /// Like [`Containerd::start`], with extra environment for containerd and its shims.
    pub fn start_with_env(bin_dir: &Path, env: &[(&str, &Path)]) -> Self {
        let options = Options {
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.to_path_buf()))
                .collect(),
            ..Options::default()
        };
        Self::start_with(bin_dir, options)
    }

    /// Starts containerd as `options` say, with `bin_dir` first on its PATH.
    pub fn start_with(bin_dir: &Path, options: Options) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kata-ctd-")
            .tempdir()
            .expect("containerd temp dir");
        let d = dir.path();
        let disabled = if options.cri.is_some() {
            ""
        } else {
            "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n"
        };
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
{disabled}[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  level = "debug"
{cri}"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = d.join("containerd.sock").display(),
            cri = options.cri.as_deref().unwrap_or_default(),
        );
        std::fs::write(d.join("config.toml"), config).expect("write containerd config");
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let child = spawn_daemon(d, &path, &options.env);
        let mut namespaces = vec![NAMESPACE.to_owned()];
        for (ns, _) in &options.imports {
            if !namespaces.contains(ns) {
                namespaces.push(ns.clone());
            }
        }
        if options.cri.is_some() && !namespaces.iter().any(|ns| ns == CRI_NAMESPACE) {
            namespaces.push(CRI_NAMESPACE.to_owned());
        }
        let this = Self {
            dir,
            child,
            path,
            env: options.env.clone(),
            killed: false,
            namespaces,
        };
        this.wait_ready();
        for (ns, file) in &options.imports {
            let images = repo_root().join("build/images").join(file);
            assert!(
                images.is_file(),
                "{} missing: run hack/build-test-images.sh",
                images.display()
            );
            let out = this.ctr_in(ns, &["images", "import", &images.to_string_lossy()]);
            assert!(
                out.status.success(),
                "image import of {file} into {ns} failed: {}",
                text(&out)
            );
        }
        this
    }

    /// containerd's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// containerd's gRPC socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// containerd's own log (debug level), for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Runs `ctr -a <sock> -n kata-test <args>` and returns its output.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_cmd(args).output().expect("run ctr")
    }

    /// Runs `ctr -a <sock> -n <namespace> <args>` and returns its output.
    pub fn ctr_in(&self, namespace: &str, args: &[&str]) -> Output {
        self.ctr_cmd_in(namespace, args).output().expect("run ctr")
    }

    /// The `ctr` command line, for callers that need stdin or a pty.
    pub fn ctr_cmd(&self, args: &[&str]) -> Command {
        self.ctr_cmd_in(NAMESPACE, args)
    }

    /// The `ctr` command line in `namespace`.
    pub fn ctr_cmd_in(&self, namespace: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.args(["-a", &self.socket().to_string_lossy(), "-n", namespace])
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// containerd's state directory (`state` in its configuration).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// containerd's state dir for v2 tasks of the test namespace (bundles live there).
    pub fn task_state_dir(&self) -> PathBuf {
        self.dir
            .path()
            .join("state/io.containerd.runtime.v2.task")
            .join(NAMESPACE)
    }
}

/// Starts the containerd process of the test directory `d` (appending to its log).
fn spawn_daemon(d: &Path, path: &str, env: &[(String, PathBuf)]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(d.join("containerd.log"))
        .expect("containerd log");
    Command::new("containerd")
        .arg("--config")
        .arg(d.join("config.toml"))
        .env("PATH", path)
        .envs(env.iter().map(|(k, v)| (k, v.as_os_str())))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log)
        .spawn()
        .expect("containerd starts (run hack/install-deps.sh)")
}

impl Containerd {
    fn wait_ready(&self) {
        let sock = self.socket();
        assert!(
            wait_until(Duration::from_secs(20), || {
                sock.exists()
                    && Command::new("ctr")
                        .args(["-a", &sock.to_string_lossy(), "version"])
                        .output()
                        .map(|o| o.status.success())
                        .unwrap_or(false)
            }),
            "containerd did not come up: {}",
            self.log()
        );
    }

    /// SIGKILLs containerd (not its shims), as a crash would, and starts it again on the
    /// same root, state and sockets; it reconnects to the running shims.
    pub fn restart(&mut self) {
        self.kill_daemon();
        self.child = spawn_daemon(self.dir.path(), &self.path, &self.env);
        self.killed = false;
        self.wait_ready();
    }

    /// SIGKILLs containerd now (not its shims), as a crash would.
    pub fn kill_daemon(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.killed = true;
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.killed {
            for (pid, _) in crate::processes_naming(&self.socket().to_string_lossy()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            return;
        }
        // A failed test may leave tasks: delete them through containerd so their shims
        // clean up (VM, mounts, directories) before the shims are killed below.
        // (CRI pods are removed through CRI first by their owner; this catches the rest.)
        for ns in &self.namespaces {
            let tasks = self.ctr_in(ns, &["task", "ls", "-q"]);
            for id in String::from_utf8_lossy(&tasks.stdout).split_whitespace() {
                let _ = self.ctr_in(ns, &["task", "delete", "-f", id]);
                let _ = self.ctr_in(ns, &["container", "delete", id]);
            }
        }
        // SIGTERM by pid, then SIGKILL if it lingers; always reap.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let exited = wait_until(Duration::from_secs(10), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if !exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Shims outlive containerd by design; a failed test must not leave them (and their
        // VMs) running. They name our socket in `-address`.
        for (pid, _) in crate::processes_naming(&self.socket().to_string_lossy()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// stdout and stderr of a command, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Where `cargo build` puts the workspace's binaries (`CARGO_TARGET_DIR` or `<repo>/target`).
pub fn target_bin_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    target.join("debug")
}

/// A directory holding only `containerd-shim-kata-v2` (a symlink to the debug build), to put
/// first on containerd's PATH, and a `configuration.toml` pointing at the test guest image.
#[derive(Debug)]
pub struct ShimInstall {
    pub dir: tempfile::TempDir,
}

impl ShimInstall {
    /// Panics with a hint when the shim has not been built (`cargo build -p kata-shim`).
    pub fn new() -> Self {
        let shim = target_bin_dir().join("containerd-shim-kata-v2");
        assert!(
            shim.is_file(),
            "{} missing: run cargo build -p kata-shim --bins",
            shim.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("kata-shim-bin-")
            .tempdir()
            .expect("shim bin dir");
        std::os::unix::fs::symlink(&shim, dir.path().join("containerd-shim-kata-v2"))
            .expect("link shim");
        let image = crate::GuestImage::find();
        let config = format!(
            r#"[hypervisor.qemu]
{guest}default_memory = 512
virtio_fs_daemon = "{virtiofsd}"
vsock_daemon = "{vsock}"

[agent.kata]
enable_debug = true
dial_timeout = 60
"#,
            guest = image.config_lines(),
            virtiofsd = crate::daemon_path("virtiofsd").display(),
            vsock = crate::daemon_path("vhost-device-vsock").display(),
        );
        std::fs::write(dir.path().join("configuration.toml"), config).expect("write config");
        Self { dir }
    }

    pub fn bin_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("configuration.toml")
    }

    /// Writes `configuration-remote.toml` next to the configuration: the shipped peer pods
    /// configuration (shim/configuration-remote.toml) with the adaptor's socket `socket`
    /// and the agent's debug log on. Returns its path.
    pub fn write_remote_config(&self, socket: &Path) -> PathBuf {
        let shipped = std::fs::read_to_string(repo_root().join("shim/configuration-remote.toml"))
            .expect("read shim/configuration-remote.toml");
        let text = shipped
            .replace(
                "remote_hypervisor_socket = \"/run/peerpod/hypervisor.sock\"",
                &format!("remote_hypervisor_socket = \"{}\"", socket.display()),
            )
            .replace(
                "[agent.kata]\n# The agent logs at debug level.\nenable_debug = false",
                "[agent.kata]\nenable_debug = true",
            );
        assert!(
            text.contains(&socket.display().to_string()),
            "shim/configuration-remote.toml no longer has the default socket line"
        );
        let path = self.dir.path().join("configuration-remote.toml");
        std::fs::write(&path, text).expect("write the remote configuration");
        path
    }

    /// Appends `toml` to the configuration; keys without a table header land in
    /// `[agent.kata]`, the last table.
    pub fn append_config(&self, toml: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.config_path())
            .expect("open shim configuration");
        writeln!(f, "{toml}").expect("append to shim configuration");
    }

    /// Sets `line` (`key = value`) in table `[table]` of the configuration, replacing the
    /// key's line if the table has it, adding the table when it is missing.
    pub fn set_config(&self, table: &str, line: &str) {
        let path = self.config_path();
        let text = std::fs::read_to_string(&path).expect("read config");
        let key = line.split('=').next().unwrap_or_default().trim();
        let header = format!("[{table}]");
        let mut out: Vec<String> = Vec::new();
        let (mut in_table, mut done) = (false, false);
        for l in text.lines() {
            if l.trim_start().starts_with('[') {
                if in_table && !done {
                    out.push(line.to_owned());
                    done = true;
                }
                in_table = l.trim() == header;
            } else if in_table && l.split('=').next().unwrap_or_default().trim() == key {
                out.push(line.to_owned());
                done = true;
                continue;
            }
            out.push(l.to_owned());
        }
        if !done {
            if !in_table {
                out.push(header);
            }
            out.push(line.to_owned());
        }
        std::fs::write(&path, out.join("\n") + "\n").expect("write config");
    }
}

impl Default for ShimInstall {
    fn default() -> Self {
        Self::new()
    }
}
