//! `kata-ctl collect` and `kata-ctl exec` (the debug console), end to end: kata containers
//! started by a test-owned containerd through `ctr` (one QEMU VM each), the real
//! `kata-ctl` binary run as an operator runs it.
//!
//! - collect with two running sandboxes, one with a secret in an annotation and in an
//!   environment variable: every sandbox has its files (metrics, QEMU command line,
//!   console, agent URL, processes, journal or a recorded error), the allowed keys keep
//!   their values, and the secret values appear in no file of the archive;
//! - exec with `[agent.kata] debug_console_enabled = true`: a shell in the guest, outside
//!   the container (PID 1 is the agent), fed through a pipe;
//! - exec without it (the default): a clear error naming the key; an unknown id: a clear
//!   error naming it.
//!
//! Each test ends with a leak check. The debug console and collect are kata's own: there
//! is nothing to compare with runc.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use kata_tests::containerd::{
    target_bin_dir, text, Containerd, ShimInstall, BUSYBOX, KATA_RUNTIME,
};
use kata_tests::cri::{
    api, container_config, with_pod_namespaces, CriContainerd, OrPanic, KATA_HANDLER,
};
use kata_tests::{assert_no_runtime_leaks, wait_until};

fn kata_ctl() -> PathBuf {
    let bin = target_bin_dir().join("kata-ctl");
    assert!(
        bin.is_file(),
        "{} missing: run cargo build -p kata-ctl",
        bin.display()
    );
    bin
}

fn unique(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

/// A containerd whose kata runtime reads the test configuration.
struct Env {
    // Field order: containerd stops before the shim directory goes away.
    ctd: Containerd,
    shim: ShimInstall,
}

impl Env {
    fn new(configure: impl FnOnce(&ShimInstall)) -> Self {
        let shim = ShimInstall::new();
        configure(&shim);
        let ctd = Containerd::start_with_env(
            shim.bin_dir(),
            &[("KATA_CONF_FILE", shim.config_path().as_path())],
        );
        Self { ctd, shim }
    }

    /// `ctr run -d` of busybox `sleep 600` with `extra` flags; waits until RUNNING.
    fn run_detached(&self, id: &str, extra: &[&str]) {
        let mut args = vec!["run", "-d", "--runtime", KATA_RUNTIME];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[BUSYBOX, id, "sleep", "600"]);
        let out = self.ctd.ctr(&args);
        assert!(out.status.success(), "ctr run -d {id}: {}", text(&out));
        assert!(
            wait_until(Duration::from_secs(90), || self.task_status(id)
                == "RUNNING"),
            "{id} never RUNNING: {:?}",
            self.task_status(id)
        );
    }

    fn task_status(&self, id: &str) -> String {
        let out = self.ctd.ctr(&["task", "ls"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or_default()
            .to_owned()
    }

    /// Kills and deletes the task and the container.
    fn remove(&self, id: &str) {
        let _ = self.ctd.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        wait_until(Duration::from_secs(30), || {
            let s = self.task_status(id);
            s == "STOPPED" || s.is_empty()
        });
        let _ = self.ctd.ctr(&["task", "delete", id]);
        let out = self.ctd.ctr(&["container", "delete", id]);
        assert!(
            out.status.success(),
            "container delete {id}: {}",
            text(&out)
        );
    }
}

/// Runs `kata-ctl args` with `input` on a pipe as stdin; killed (by pid) after 120 s.
fn kata_ctl_with_input(args: &[&str], input: &str) -> Output {
    let mut child = Command::new(kata_ctl())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kata-ctl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .expect("write kata-ctl's stdin");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(out) => out.expect("wait for kata-ctl"),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let out = rx.recv().expect("kata-ctl waited for").expect("wait");
            panic!("kata-ctl {args:?} did not finish in 120 s: {}", text(&out));
        }
    }
}

/// Runs `command` under `script` (a pty as its terminal) with `input` typed on it; killed
/// (by pid) after 120 s.
fn kata_ctl_script(command: &str, input: &str) -> Output {
    let mut child = Command::new("script")
        .args(["-q", "-e", "-c", command, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run script (util-linux)");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).expect("type into script");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let result = rx.recv_timeout(Duration::from_secs(120));
    // Kept open until the session ended: `script` ends its session at its input's end.
    drop(stdin);
    match result {
        Ok(out) => out.expect("wait for script"),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let out = rx.recv().expect("script waited for").expect("wait");
            panic!(
                "{command} under script did not finish in 120 s: {}",
                text(&out)
            );
        }
    }
}

/// `kata-ctl collect --output <tmp>/out.tar.gz [--config config]`, extracted; returns the
/// scratch directory and the archive's top directory in it.
fn collect_and_extract(config: Option<&Path>) -> (tempfile::TempDir, PathBuf) {
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("out.tar.gz");
    let mut cmd = Command::new(kata_ctl());
    cmd.args(["collect", "--output"]).arg(&archive);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    let out = cmd.output().expect("run kata-ctl collect");
    assert!(out.status.success(), "collect: {}", text(&out));
    let extracted = work.path().join("x");
    std::fs::create_dir(&extracted).unwrap();
    let tar = Command::new("tar")
        .arg("-xzf")
        .arg(&archive)
        .arg("-C")
        .arg(&extracted)
        .output()
        .unwrap();
    assert!(tar.status.success(), "tar: {}", text(&tar));
    let top = std::fs::read_dir(&extracted)
        .unwrap()
        .flatten()
        .next()
        .expect("a top directory")
        .path();
    (work, top)
}

/// Whether a direct connection to the debug console port of sandbox `id` (through the
/// agent URL its shim reports) succeeds within 10 s.
fn console_port_open(id: &str) -> bool {
    let url = kata_tests::metrics::shim_get(&kata_tests::metrics::shim_socket(id), "/agent-url")
        .expect("GET /agent-url")
        .text();
    let endpoint = if let Some(rest) = url.trim().strip_prefix("hvsock://") {
        let (uds, _) = rest.rsplit_once(':').unwrap();
        kata_hypervisor::vsock::Endpoint::Hybrid { uds: uds.into() }
    } else {
        let rest = url.trim().strip_prefix("vsock://").unwrap();
        let (cid, _) = rest.rsplit_once(':').unwrap();
        kata_hypervisor::vsock::Endpoint::Vhost {
            cid: cid.parse().unwrap(),
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let connect = endpoint.connect_once(kata_proto::DEBUG_CONSOLE_VSOCK_PORT);
        matches!(
            tokio::time::timeout(Duration::from_secs(10), connect).await,
            Ok(Ok(_))
        )
    })
}

/// Every regular file under `dir`, with its text.
fn files_under(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let data = std::fs::read(&p).unwrap();
                out.push((p, String::from_utf8_lossy(&data).into_owned()));
            }
        }
    }
    out
}

#[test]
fn collect_gathers_every_sandbox_and_redacts_secrets() {
    let env = Env::new(|_| {});
    let (a, b) = (unique("collect-a"), unique("collect-b"));
    let secret_annotation = format!("ann-secret-{}-zq81", std::process::id());
    let secret_env = format!("env-secret-{}-xv27", std::process::id());
    let annotation = format!("example.com/api-token={secret_annotation}");
    let env_var = format!("DB_PASSWORD={secret_env}");
    env.run_detached(
        &a,
        &[
            "--annotation",
            &annotation,
            "--annotation",
            "io.kubernetes.pod.name=visible-pod-name",
            "--env",
            &env_var,
            "--env",
            "LANG=C.visible-lang",
        ],
    );
    env.run_detached(&b, &[]);
    // The secrets are really there on the host before the collection: in the bundle, and
    // (an exec of a command named like the annotation's value, which the agent reports as
    // a failed request on the guest console) in the console and the logs.
    let bundle = env.ctd.task_state_dir().join(&a);
    let spec = std::fs::read_to_string(bundle.join("config.json")).expect("bundle config.json");
    assert!(spec.contains(&secret_annotation) && spec.contains(&secret_env));
    let exec = env
        .ctd
        .ctr(&["task", "exec", "--exec-id", "leak", &a, &secret_annotation]);
    assert!(!exec.status.success(), "{}", text(&exec));
    let socket = kata_tests::metrics::shim_socket(&a);
    let mut console = String::new();
    let logged = wait_until(Duration::from_secs(30), || {
        console = kata_tests::metrics::shim_get(&socket, "/console")
            .map(|r| r.text())
            .unwrap_or_default();
        console.contains(&secret_annotation)
    });
    assert!(logged, "the failed exec on the console:\n{console}");
    let _ = env.ctd.ctr(&["task", "delete", "--exec-id", "leak", &a]);

    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("out.tar.gz");
    let config = env.shim.config_path();
    let out = Command::new(kata_ctl())
        .args(["collect", "--output"])
        .arg(&archive)
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run kata-ctl collect");
    assert!(out.status.success(), "collect: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("wrote"),
        "{}",
        text(&out)
    );
    // Never overwritten; a bad output is named.
    let again = Command::new(kata_ctl())
        .args(["collect", "--output"])
        .arg(&archive)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already exists"),
        "{}",
        text(&again)
    );
    let bad = Command::new(kata_ctl())
        .args(["collect", "--output", "/nonexistent-dir/x.tar.gz"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("/nonexistent-dir does not exist"),
        "{}",
        text(&bad)
    );

    let extracted = work.path().join("x");
    std::fs::create_dir(&extracted).unwrap();
    let tar = Command::new("tar")
        .arg("-xzf")
        .arg(&archive)
        .arg("-C")
        .arg(&extracted)
        .output()
        .unwrap();
    assert!(tar.status.success(), "tar: {}", text(&tar));
    let top = std::fs::read_dir(&extracted)
        .unwrap()
        .flatten()
        .next()
        .expect("a top directory")
        .path();
    assert!(top
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("kata-collect-"));
    let read =
        |rel: &str| std::fs::read_to_string(top.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let errors = read("errors.txt");
    for (path, text) in files_under(&top) {
        println!(
            "{} ({} bytes)",
            path.strip_prefix(&top).unwrap().display(),
            text.len()
        );
    }
    println!("errors.txt:\n{errors}");
    for (path, text) in files_under(&top) {
        for line in text.lines().filter(|l| l.contains("<redacted>")) {
            println!(
                "redacted in {}: {line}",
                path.file_name().unwrap().display()
            );
        }
    }

    // The node.
    let versions = read("versions.txt");
    for want in [
        "kata-ctl ",
        "shim: ",
        "qemu: ",
        "host kernel: ",
        "containerd: ",
    ] {
        assert!(
            versions.contains(want),
            "{want} in versions.txt:\n{versions}"
        );
    }
    assert!(
        versions.contains(&format!("agent of sandbox {a}: agent "))
            && versions.contains(", guest kernel "),
        "{versions}"
    );
    let check: serde_json::Value = serde_json::from_str(&read("host/check.json")).unwrap();
    assert!(check["capable"].is_boolean(), "{check}");
    let env_json: serde_json::Value = serde_json::from_str(&read("env.json")).unwrap();
    assert_eq!(
        env_json["runtime"]["config_path"],
        config.display().to_string()
    );
    assert!(read("config/configuration.toml").contains("[hypervisor.qemu]"));
    let listing = read("sandboxes.txt");

    // Every sandbox.
    for id in [&a, &b] {
        assert!(
            listing.contains(&format!("{id} running")),
            "{id} in sandboxes.txt:\n{listing}"
        );
        let dir = format!("sandboxes/{id}");
        let metrics = read(&format!("{dir}/metrics.txt"));
        assert!(
            metrics.contains("kata_hypervisor_threads") && metrics.contains("kata_guest_meminfo"),
            "{id} metrics:\n{}",
            &metrics[..metrics.len().min(2000)]
        );
        let cmdline = read(&format!("{dir}/qemu-cmdline.txt"));
        assert!(
            cmdline
                .lines()
                .next()
                .unwrap_or_default()
                .contains("qemu-system"),
            "{cmdline}"
        );
        assert!(cmdline.lines().any(|l| l == "-append"), "{cmdline}");
        let url = read(&format!("{dir}/agent-url.txt"));
        assert!(
            url.starts_with("vsock://") || url.starts_with("hvsock://"),
            "{url}"
        );
        let console = read(&format!("{dir}/console.txt"));
        assert!(
            console.contains(kata_proto::AGENT_READY_MARKER),
            "{id} console:\n{console}"
        );
        let processes = read(&format!("{dir}/processes.txt"));
        assert!(
            processes.contains("containerd-shim") && processes.contains("qemu"),
            "{processes}"
        );
        assert!(read(&format!("{dir}/state.json")).contains(id.as_str()));
        let journal = top.join(format!("{dir}/journal.txt"));
        if journal.exists() {
            let j = std::fs::read_to_string(&journal).unwrap();
            assert!(j.contains(id.as_str()), "{id} journal:\n{j}");
        } else {
            assert!(
                errors.contains(&format!("{dir}/journal.txt: ")),
                "no journal and no recorded error for {id}:\n{errors}"
            );
        }
        assert!(
            top.join(format!("{dir}/bundles/{id}/config.json"))
                .is_file(),
            "{id}'s bundle"
        );
    }

    // Redaction: keys kept, allowed values kept, secrets nowhere.
    let spec: serde_json::Value =
        serde_json::from_str(&read(&format!("sandboxes/{a}/bundles/{a}/config.json"))).unwrap();
    assert_eq!(spec["annotations"]["example.com/api-token"], "<redacted>");
    assert_eq!(
        spec["annotations"]["io.kubernetes.pod.name"],
        "visible-pod-name"
    );
    let envs: Vec<&str> = spec["process"]["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(envs.contains(&"DB_PASSWORD=<redacted>"), "{envs:?}");
    assert!(envs.contains(&"LANG=C.visible-lang"), "{envs:?}");
    assert!(envs.iter().any(|e| e.starts_with("PATH=/")), "{envs:?}");
    let console = read(&format!("sandboxes/{a}/console.txt"));
    assert!(
        console
            .lines()
            .any(|l| l.contains("<redacted>") && l.contains("not found")),
        "the failed exec's console line, scrubbed:\n{console}"
    );
    for (path, text) in files_under(&top) {
        for secret in [&secret_annotation, &secret_env] {
            assert!(
                !text.contains(secret.as_str()),
                "{secret} leaked into {}",
                path.display()
            );
        }
    }

    env.remove(&a);
    env.remove(&b);
    drop(env);
    assert_no_runtime_leaks(&[&a, &b]);
}

#[test]
fn exec_opens_a_shell_in_the_guest_when_the_console_is_enabled() {
    let env = Env::new(|shim| shim.set_config("agent.kata", "debug_console_enabled = true"));
    let id = unique("console-on");
    env.run_detached(&id, &[]);
    assert!(console_port_open(&id), "the debug console port is served");

    let out = kata_ctl_with_input(&["exec", &id], "cat /proc/1/comm; echo marker-$((6*7))\n");
    assert!(out.status.success(), "exec: {}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    // PID 1 of the shell's PID namespace is the agent (/init): the guest's root
    // namespaces, not the container's (whose PID 1 is sleep).
    assert!(
        stdout.lines().any(|l| l.trim() == "init"),
        "the agent's comm expected:\n{stdout}"
    );
    assert!(stdout.contains("marker-42"), "{stdout}");

    // On a terminal (util-linux `script` gives kata-ctl a pty): raw mode, the keys go to
    // the guest's shell as typed, and `exit` ends the session.
    let command = format!("{} exec {id}", kata_ctl().display());
    let out = kata_ctl_script(&command, "echo tty-$((7*6)); exit\n");
    assert!(out.status.success(), "exec on a tty: {}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("tty-42"), "{stdout}");

    env.remove(&id);
    drop(env);
    assert_no_runtime_leaks(&[&id]);
}

#[test]
fn exec_without_the_console_or_with_an_unknown_id_is_a_clear_error() {
    let env = Env::new(|_| {});
    let id = unique("console-off");
    env.run_detached(&id, &[]);

    let out = kata_ctl_with_input(&["exec", &id], "echo marker-$((6*7))\n");
    assert!(!out.status.success(), "exec: {}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("the debug console of sandbox {id} is off"))
            && stderr.contains("[agent.kata] debug_console_enabled = true"),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("marker-42"));
    // And the agent does not serve the port: a direct connection is refused.
    assert!(
        !console_port_open(&id),
        "the agent serves the debug console port although it is off"
    );

    let unknown = unique("no-such-sandbox");
    let out = kata_ctl_with_input(&["exec", &unknown], "");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("no sandbox {unknown:?} on this node")),
        "{stderr}"
    );

    env.remove(&id);
    drop(env);
    assert_no_runtime_leaks(&[&id]);
}

/// Through containerd's CRI: the pod's own bundle and its container's (beside it, naming the
/// pod as its sandbox) are both in the archive, the container's environment redacted.
#[test]
fn collect_finds_a_pods_containers_and_redacts_their_environment() {
    let env = CriContainerd::start(Some(ShimInstall::new()));
    let pod = env
        .client
        .run_pod(&unique("collect-pod"), KATA_HANDLER)
        .or_panic(&env);
    let secret = format!("cri-secret-{}-qq19", std::process::id());
    let mut config = with_pod_namespaces(
        container_config("main", BUSYBOX, &["sleep", "600"], Vec::new()),
        &pod,
    );
    config.envs = vec![api::KeyValue {
        key: "API_KEY".into(),
        value: secret.clone(),
    }];
    let cid = env
        .client
        .create_container_with(&pod, config)
        .or_panic(&env);
    env.client.start_container(&cid).or_panic(&env);

    let (_work, top) = collect_and_extract(None);
    let dir = top.join("sandboxes").join(&pod.id);
    assert!(dir.join("metrics.txt").is_file(), "{}", dir.display());
    assert!(
        dir.join("bundles")
            .join(&pod.id)
            .join("config.json")
            .is_file(),
        "the pod's own bundle"
    );
    let spec: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("bundles").join(&cid).join("config.json"))
            .expect("the container's bundle"),
    )
    .unwrap();
    assert_eq!(spec["annotations"]["io.kubernetes.cri.sandbox-id"], pod.id);
    let envs = spec["process"]["env"].to_string();
    assert!(envs.contains("API_KEY=<redacted>"), "{envs}");
    for (path, text) in files_under(&top) {
        assert!(
            !text.contains(&secret),
            "{secret} leaked into {}",
            path.display()
        );
    }

    env.client.stop_container(&cid, 0).or_panic(&env);
    env.client.remove_container(&cid).or_panic(&env);
    env.client.stop_pod(&pod.id).or_panic(&env);
    env.client.remove_pod(&pod.id).or_panic(&env);
    let ids = [pod.id.clone(), cid.clone()];
    drop(env);
    assert_no_runtime_leaks(&[&ids[0], &ids[1]]);
}
