//! End-to-end through a test-owned containerd 1.6 and `ctr`, as a user runs containers:
//! every check runs twice, with runc (`io.containerd.runc.v2`, proving the test itself) and
//! with our runtime (`io.containerd.kata.v2`, a QEMU VM per container). Each test ends with
//! a leak check.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use kata_tests::containerd::{text, Containerd, ShimInstall, BUSYBOX, KATA_RUNTIME, RUNC_RUNTIME};
use kata_tests::wait_until;

/// A containerd for one runtime: for ours, with the shim on its PATH and the test
/// configuration in KATA_CONF_FILE.
struct Env {
    // Field order: containerd stops before the shim directory goes away.
    ctd: Containerd,
    _shim: Option<ShimInstall>,
    runtime: &'static str,
}

impl Env {
    fn new(runtime: &'static str) -> Self {
        if runtime == RUNC_RUNTIME {
            let dir = std::env::temp_dir();
            return Self {
                ctd: Containerd::start(&dir),
                _shim: None,
                runtime,
            };
        }
        let shim = ShimInstall::new();
        let ctd = Containerd::start_with_env(
            shim.bin_dir(),
            &[("KATA_CONF_FILE", shim.config_path().as_path())],
        );
        Self {
            ctd,
            _shim: Some(shim),
            runtime,
        }
    }

    fn is_kata(&self) -> bool {
        self.runtime == KATA_RUNTIME
    }

    /// `ctr run --rm --runtime <rt> <extra...> busybox <id> <cmd...>`.
    fn run(&self, id: &str, extra: &[&str], cmd: &[&str]) -> Output {
        self.ctd.ctr(&self.run_args(id, extra, cmd))
    }

    fn run_args<'a>(&self, id: &'a str, extra: &[&'a str], cmd: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec!["run", "--rm", "--runtime", self.runtime];
        args.extend_from_slice(extra);
        args.push(BUSYBOX);
        args.push(id);
        args.extend_from_slice(cmd);
        args
    }

    /// Starts a detached container running `cmd` and waits until it is RUNNING.
    fn run_detached(&self, id: &str, cmd: &[&str]) {
        let mut args = vec!["run", "-d", "--runtime", self.runtime, BUSYBOX, id];
        args.extend_from_slice(cmd);
        let out = self.ctd.ctr(&args);
        assert!(out.status.success(), "ctr run -d: {}", text(&out));
        assert!(
            wait_until(Duration::from_secs(60), || self.task_status(id)
                == "RUNNING"),
            "{id} never RUNNING: {}",
            self.task_status(id)
        );
    }

    /// The STATUS column of `ctr task ls` for `id` ("" when absent).
    fn task_status(&self, id: &str) -> String {
        let out = self.ctd.ctr(&["task", "ls"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or_default()
            .to_owned()
    }

    /// The PID column of `ctr task ls` for `id` (QEMU's pid for ours).
    fn task_pid(&self, id: &str) -> String {
        let out = self.ctd.ctr(&["task", "ls"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or_else(|| panic!("no task {id}: {}", text(&out)))
            .to_owned()
    }

    /// Starts `ctr events`; subscribed once this returns. See [`events_seen`].
    fn subscribe_events(&self) -> std::process::Child {
        let child = self
            .ctd
            .ctr_cmd(&["events"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        child
    }

    /// Kills, deletes the task and the container.
    fn remove(&self, id: &str) {
        let _ = self.ctd.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        wait_until(Duration::from_secs(30), || {
            let s = self.task_status(id);
            s == "STOPPED" || s.is_empty()
        });
        let out = self.ctd.ctr(&["task", "delete", id]);
        let _ = out;
        let out = self.ctd.ctr(&["container", "delete", id]);
        assert!(
            out.status.success(),
            "container delete {id}: {}",
            text(&out)
        );
    }

    /// Nothing of `ids` is left on the host (see [`kata_tests::assert_no_runtime_leaks`]).
    fn assert_no_leaks(&self, ids: &[&str]) {
        kata_tests::assert_no_runtime_leaks(ids);
    }
}

/// What a [`Env::subscribe_events`] subscriber printed, once the last events are out; it is
/// stopped by its pid.
fn events_seen(events: std::process::Child) -> String {
    std::thread::sleep(Duration::from_millis(500));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(events.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let out = events.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A container id no other test of this run uses (runc and kata variants run at once).
fn unique(name: &str) -> String {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{name}-{}-{n}", std::process::id())
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn host_kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap()
        .trim()
        .to_owned()
}

/// Generates `<name>_runc` and `<name>_kata` tests from one body taking `&Env`.
macro_rules! both_runtimes {
    ($($name:ident => $body:expr;)*) => {
        mod runc {
            use super::*;
            $(#[test] fn $name() { let env = Env::new(RUNC_RUNTIME); ($body)(&env); })*
        }
        mod kata {
            use super::*;
            $(#[test] fn $name() { let env = Env::new(KATA_RUNTIME); ($body)(&env); })*
        }
    };
}

fn kernel_release(env: &Env) {
    let id = unique("uname");
    let out = env.run(&id, &[], &["uname", "-r"]);
    assert!(out.status.success(), "{}", text(&out));
    let release = stdout(&out).trim().to_owned();
    if env.is_kata() {
        let guest = kata_tests::GuestImage::find().kernel_release;
        assert_eq!(release, guest, "the container runs on the guest kernel");
        assert_ne!(release, host_kernel_release());
    } else {
        assert_eq!(release, host_kernel_release());
    }
    env.assert_no_leaks(&[&id]);
}

fn exit_code(env: &Env) {
    let id = unique("exit7");
    let out = env.run(&id, &[], &["sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    env.assert_no_leaks(&[&id]);
}

fn piped_stdin(env: &Env) {
    let id = unique("stdin");
    let mut child = env
        .ctd
        .ctr_cmd(&env.run_args(&id, &[], &["sh", "-c", "head -n 2 | tr a-z A-Z; echo done"]))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"hello from the host\nsecond line\n")
        .unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stdout(&out), "HELLO FROM THE HOST\nSECOND LINE\ndone\n");
    env.assert_no_leaks(&[&id]);
}

fn env_and_cwd(env: &Env) {
    let id = unique("envcwd");
    let out = env.run(
        &id,
        &["--env", "GREETING=hi there", "--cwd", "/tmp"],
        &["sh", "-c", "echo \"$GREETING\"; pwd; id -u"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stdout(&out), "hi there\n/tmp\n0\n");
    env.assert_no_leaks(&[&id]);
}

fn big_stdout_is_byte_exact(env: &Env) {
    const SIZE: usize = 32 << 20;
    let id = unique("big");
    // The same generator on both sides: numbers 1.. one per line, cut at 32 MiB.
    let script = format!("seq 1 5000000 | head -c {SIZE}");
    let expected = Command::new("sh")
        .args(["-c", &script])
        .output()
        .unwrap()
        .stdout;
    assert_eq!(expected.len(), SIZE);
    let out = env.run(&id, &[], &["sh", "-c", &script]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), SIZE, "stdout length");
    assert!(out.stdout == expected, "stdout content differs");
    env.assert_no_leaks(&[&id]);
}

/// `ctr -t` needs a terminal: run it under `script`.
fn in_pty(env: &Env, args: &[&str]) -> Output {
    let sock = env.ctd.socket();
    // A known window size, which ctr passes on with ResizePty right after the start (the
    // container must give it a moment: runc and ours alike).
    let mut line = format!(
        "stty rows 37 cols 101; ctr -a {} -n {} ",
        sock.display(),
        kata_tests::containerd::NAMESPACE
    );
    for a in args {
        line.push_str(&format!("'{a}' "));
    }
    Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("script (bsdutils) runs ctr in a pty")
}

fn tty(env: &Env) {
    let id = unique("tty");
    let out = in_pty(
        env,
        &env.run_args(
            &id,
            &["-t"],
            &["sh", "-c", "tty; sleep 1; stty size; exit 3"],
        ),
    );
    let s = stdout(&out);
    assert!(
        s.contains("/dev/pts/"),
        "no pty in the container: {}",
        text(&out)
    );
    assert!(
        s.contains("37 101"),
        "pty size not passed on: {}",
        text(&out)
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    env.assert_no_leaks(&[&id]);
}

fn exec(env: &Env) {
    let id = unique("exec");
    env.run_detached(&id, &["sleep", "1000"]);

    let out = env.ctd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        &id,
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert_eq!(stdout(&out), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");

    let out = env.ctd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e2",
        "--user",
        "1000",
        &id,
        "id",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stdout(&out).starts_with("uid=1000(user) gid=1000(user)"),
        "{}",
        text(&out)
    );

    let out = env.ctd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e3",
        "--cwd",
        "/home/user",
        &id,
        "pwd",
    ]);
    assert_eq!(stdout(&out), "/home/user\n", "{}", text(&out));

    let out = in_pty(env, &["task", "exec", "-t", "--exec-id", "e4", &id, "tty"]);
    assert!(stdout(&out).contains("/dev/pts/"), "{}", text(&out));

    // ps lists the init process and no finished exec.
    let out = env.ctd.ctr(&["task", "ps", &id]);
    assert!(out.status.success(), "{}", text(&out));
    let pids = stdout(&out)
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .count();
    assert!(pids >= 1, "{}", text(&out));

    let out = env.ctd.ctr(&["task", "metrics", &id]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(stdout(&out).contains("memory"), "{}", text(&out));

    env.remove(&id);
    env.assert_no_leaks(&[&id]);
}

fn pause_resume(env: &Env) {
    let id = unique("pause");
    env.run_detached(
        &id,
        &[
            "sh",
            "-c",
            "while true; do date +%s%N > /tmp/tick; sleep 0.05; done",
        ],
    );
    let out = env.ctd.ctr(&["task", "pause", &id]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(env.task_status(&id), "PAUSED");
    let out = env.ctd.ctr(&["task", "resume", &id]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(env.task_status(&id), "RUNNING");
    let out = env
        .ctd
        .ctr(&["task", "exec", "--exec-id", "tick", &id, "cat", "/tmp/tick"]);
    assert!(
        out.status.success(),
        "the container runs after resume: {}",
        text(&out)
    );
    env.remove(&id);
    env.assert_no_leaks(&[&id]);
}

fn sigterm_reaches_a_trapping_shell(env: &Env) {
    let id = unique("term");
    let args = env.run_args(
        &id,
        &[],
        &[
            "sh",
            "-c",
            "trap 'echo got TERM; exit 42' TERM; echo ready; while true; do sleep 0.1; done",
        ],
    );
    let child = env
        .ctd
        .ctr_cmd(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || env.task_status(&id)
            == "RUNNING"),
        "never RUNNING"
    );
    std::thread::sleep(Duration::from_millis(500)); // let the trap be installed
    let out = env.ctd.ctr(&["task", "kill", "-s", "SIGTERM", &id]);
    assert!(out.status.success(), "{}", text(&out));
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(42), "{}", text(&out));
    assert!(stdout(&out).contains("got TERM"), "{}", text(&out));
    env.assert_no_leaks(&[&id]);
}

fn sigkill(env: &Env) {
    let id = unique("kill");
    let child = env
        .ctd
        .ctr_cmd(&env.run_args(&id, &[], &["sleep", "1000"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(60), || env.task_status(&id)
        == "RUNNING"));
    let out = env.ctd.ctr(&["task", "kill", "-s", "SIGKILL", &id]);
    assert!(out.status.success(), "{}", text(&out));
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(137), "{}", text(&out));
    env.assert_no_leaks(&[&id]);
}

fn five_at_once(env: &Env) {
    let ids: Vec<String> = (0..5).map(|i| unique(&format!("five{i}"))).collect();
    let children: Vec<_> = ids
        .iter()
        .map(|id| {
            env.ctd
                .ctr_cmd(&env.run_args(id, &[], &["sh", "-c", "echo $(hostname) up; exit 5"]))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (id, child) in ids.iter().zip(children) {
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(5), "{id}: {}", text(&out));
        assert!(stdout(&out).ends_with(" up\n"), "{id}: {}", text(&out));
    }
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    env.assert_no_leaks(&refs);
}

/// The spec's isolation as `ctr` writes it: read-only root, capability sets (containerd's
/// defaults minus a dropped one), no_new_privileges, the RLIMIT_NOFILE default, masked and
/// read-only /proc paths, a working /dev.
fn isolation(env: &Env) {
    let id = unique("iso");
    let script = "touch /x 2>/dev/null && echo root-rw || echo root-ro; \
        grep -E '^(CapEff|CapBnd|NoNewPrivs):' /proc/self/status; \
        echo nofile=$(ulimit -n); \
        echo timer_list=$(wc -c < /proc/timer_list); \
        grep -q ' /proc/keys ' /proc/self/mountinfo && echo keys-masked; \
        echo firmware=$(ls /sys/firmware | wc -l); \
        (echo 1 > /proc/sys/kernel/ctrl-alt-del) 2>/dev/null && echo sys-rw || echo sys-ro; \
        echo x > /dev/null && echo devnull-ok; \
        test -c /dev/zero && test -L /dev/fd && echo dev-ok";
    let out = env.run(
        &id,
        &["--read-only", "--cap-drop", "CAP_NET_RAW"],
        &["sh", "-c", script],
    );
    assert!(out.status.success(), "{}", text(&out));
    let s = stdout(&out);
    // containerd's default set 0xa80425fb without CAP_NET_RAW (bit 13).
    for want in [
        "root-ro",
        "CapEff:\t00000000a80405fb",
        "CapBnd:\t00000000a80405fb",
        "NoNewPrivs:\t1",
        "nofile=1024",
        "timer_list=0",
        "keys-masked",
        "firmware=0",
        "sys-ro",
        "devnull-ok",
        "dev-ok",
    ] {
        assert!(s.contains(want), "{want:?} missing in:\n{}", text(&out));
    }
    env.assert_no_leaks(&[&id]);
}

/// A memory limit from `ctr` reaches the container's cgroup (seen through the task's
/// metrics, which both runtimes read from the cgroup).
fn limits(env: &Env) {
    let id = unique("lim");
    let out = env.ctd.ctr(&[
        "run",
        "-d",
        "--memory-limit",
        "67108864",
        "--runtime",
        env.runtime,
        BUSYBOX,
        &id,
        "sleep",
        "1000",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(wait_until(Duration::from_secs(60), || env.task_status(&id)
        == "RUNNING"));
    let out = env.ctd.ctr(&["task", "metrics", &id]);
    assert!(out.status.success(), "{}", text(&out));
    let limit = stdout(&out)
        .lines()
        // cgroup v1 metrics (runc on this host) or v2 (the guest).
        .find(|l| l.starts_with("memory.limit_in_bytes") || l.starts_with("memory.usage_limit"))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(str::to_owned);
    assert_eq!(limit.as_deref(), Some("67108864"), "{}", text(&out));
    env.remove(&id);
    env.assert_no_leaks(&[&id]);
}

/// A command that does not exist fails the run with its name in the error, and nothing
/// is left behind.
fn missing_command(env: &Env) {
    let id = unique("nocmd");
    let out = env.run(&id, &[], &["no-such-command-xyz"]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no-such-command-xyz") && err.contains("not found"),
        "{}",
        text(&out)
    );
    let _ = env.ctd.ctr(&["container", "delete", &id]);
    env.assert_no_leaks(&[&id]);
}

/// Host directories and files bound with `--mount` (read-only and read-write) are seen,
/// and their mounts are gone afterwards.
fn bind_mounts(env: &Env) {
    let id = unique("bind");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello"), "from host\n").unwrap();
    // Symlinks in a volume resolve inside the container, never to the host's files.
    std::os::unix::fs::symlink("/etc", dir.path().join("abs")).unwrap();
    std::os::unix::fs::symlink("../../../../etc", dir.path().join("up")).unwrap();
    let files = tempfile::tempdir().unwrap();
    let single = files.path().join("single");
    std::fs::write(&single, "single file\n").unwrap();
    let dir_mount = format!(
        "type=bind,src={},dst=/data,options=rbind:ro",
        dir.path().display()
    );
    let file_mount = format!(
        "type=bind,src={},dst=/etc/single,options=rbind:rw",
        single.display()
    );
    let out = env.run(
        &id,
        &["--mount", &dir_mount, "--mount", &file_mount],
        &[
            "sh",
            "-c",
            "cat /data/hello; touch /data/x 2>/dev/null && echo data-rw || echo data-ro; \
             cat /etc/single; echo changed > /etc/single; \
             grep -c '^user:x:1000:' /data/abs/passwd /data/up/passwd",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        stdout(&out),
        "from host\ndata-ro\nsingle file\n/data/abs/passwd:1\n/data/up/passwd:1\n",
        "{}",
        text(&out)
    );
    assert_eq!(std::fs::read_to_string(&single).unwrap(), "changed\n");
    assert!(!dir.path().join("x").exists());
    env.assert_no_leaks(&[&id]);
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for p in [dir.path(), files.path()] {
        let p = p.display().to_string();
        assert!(!info.contains(&p), "{p} still mounted");
    }
}

/// A bind source that does not exist fails the run naming the path; nothing is left.
fn missing_bind_source(env: &Env) {
    let id = unique("nosrc");
    let out = env.run(
        &id,
        &[
            "--mount",
            "type=bind,src=/no-such-dir-xyz,dst=/data,options=rbind",
        ],
        &["true"],
    );
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/no-such-dir-xyz"), "{}", text(&out));
    let _ = env.ctd.ctr(&["container", "delete", &id]);
    env.assert_no_leaks(&[&id]);
}

/// Task events reach containerd in the order it requires: create, start, exec added,
/// exec started, exec exit, paused, resumed, exit, delete.
fn events_in_order(env: &Env) {
    let id = unique("events");
    let events = env.subscribe_events();
    env.run_detached(&id, &["sleep", "1000"]);
    let out = env
        .ctd
        .ctr(&["task", "exec", "--exec-id", "ev1", &id, "true"]);
    assert!(out.status.success(), "{}", text(&out));
    for verb in ["pause", "resume"] {
        let out = env.ctd.ctr(&["task", verb, &id]);
        assert!(out.status.success(), "{verb}: {}", text(&out));
    }
    env.remove(&id);
    let text_out = events_seen(events);
    let topics: Vec<&str> = text_out
        .lines()
        .filter(|l| l.contains(&format!("\"{id}\"")))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("/tasks/")))
        .collect();
    assert_eq!(
        topics,
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exec-added",
            "/tasks/exec-started",
            "/tasks/exit",
            "/tasks/paused",
            "/tasks/resumed",
            "/tasks/exit",
            "/tasks/delete",
        ],
        "{text_out}"
    );
    env.assert_no_leaks(&[&id]);
}

/// A pod container sharing the pod's pid namespace stops when its init is killed, even
/// though its background children hold its output open (they die with it, as with runc).
fn shared_pid_stop(env: &Env) {
    let sb = unique("pidsb");
    let c1 = unique("pidc");
    let sb_id = format!("io.kubernetes.cri.sandbox-id={sb}");
    let out = env.ctd.ctr(&[
        "run",
        "-d",
        "--runtime",
        env.runtime,
        "--annotation",
        "io.kubernetes.cri.container-type=sandbox",
        "--annotation",
        &sb_id,
        BUSYBOX,
        &sb,
        "sleep",
        "1000",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(wait_until(Duration::from_secs(60), || env.task_status(&sb)
        == "RUNNING"));
    let pid = env.task_pid(&sb);
    let pidns = format!("pid:/proc/{pid}/ns/pid");
    let out = env.ctd.ctr(&[
        "run",
        "-d",
        "--runtime",
        env.runtime,
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--annotation",
        &sb_id,
        "--with-ns",
        &pidns,
        BUSYBOX,
        &c1,
        "sh",
        "-c",
        "sleep 1000 & sleep 1000",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(wait_until(Duration::from_secs(60), || env.task_status(&c1)
        == "RUNNING"));
    let out = env.ctd.ctr(&["task", "kill", "-s", "SIGKILL", &c1]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        wait_until(Duration::from_secs(20), || env.task_status(&c1)
            == "STOPPED"),
        "{c1} did not stop: {}",
        env.task_status(&c1)
    );
    let _ = env.ctd.ctr(&["task", "delete", &c1]);
    let _ = env.ctd.ctr(&["container", "delete", &c1]);
    env.remove(&sb);
    env.assert_no_leaks(&[&sb, &c1]);
}

both_runtimes! {
    shared_pid_container_stops => shared_pid_stop;
    pod_containers_share_namespaces => pod_by_annotations;
    task_events_in_order => events_in_order;
    bind_mounts_share_host_paths => bind_mounts;
    missing_bind_source_is_named => missing_bind_source;
    spec_isolation_applies => isolation;
    cgroup_limits_apply => limits;
    missing_command_is_named => missing_command;
    runs_on_its_kernel => kernel_release;
    exit_code_passes_through => exit_code;
    stdin_is_piped => piped_stdin;
    env_and_cwd_apply => env_and_cwd;
    stdout_32mib_byte_exact => big_stdout_is_byte_exact;
    terminal_gives_a_pty => tty;
    exec_output_code_user_cwd_tty_ps_metrics => exec;
    pause_and_resume => pause_resume;
    sigterm_is_delivered => sigterm_reaches_a_trapping_shell;
    sigkill_gives_137 => sigkill;
    five_containers_at_once => five_at_once;
}

#[test]
fn a_bad_configuration_fails_create_naming_the_key_and_leaves_nothing() {
    let shim = ShimInstall::new();
    std::fs::write(
        shim.config_path(),
        "[hypervisor.qemu]\ndefault_memroy = 1024\n",
    )
    .unwrap();
    let ctd = Containerd::start_with_env(
        shim.bin_dir(),
        &[("KATA_CONF_FILE", shim.config_path().as_path())],
    );
    let id = unique("badconf");
    let out = ctd.ctr(&[
        "run",
        "--rm",
        "--runtime",
        KATA_RUNTIME,
        BUSYBOX,
        &id,
        "true",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("default_memroy"),
        "error does not name the key: {err}"
    );
    let env = Env {
        ctd,
        _shim: Some(shim),
        runtime: KATA_RUNTIME,
    };
    let _ = env.ctd.ctr(&["container", "delete", &id]);
    env.assert_no_leaks(&[&id]);
}

/// A shim killed with SIGKILL takes its VM with it: with containerd gone too (nobody runs
/// the dead shim's cleanup), QEMU and the daemons still die with the shim. The shim's
/// `delete` action, run as containerd would, then removes its mounts and directories.
#[test]
fn a_killed_shim_leaves_no_vm_behind() {
    let mut env = Env::new(KATA_RUNTIME);
    let id = unique("shimkill");
    env.run_detached(&id, &["sleep", "1000"]);
    let run_dir = format!("/run/kata/{id}/");
    let qemu = kata_tests::processes_naming(&run_dir)
        .into_iter()
        .find(|(_, cmd)| cmd.contains("qemu-system"))
        .expect("a QEMU process for the container");
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", qemu.0)).unwrap();
    // Field 4 (after the parenthesised command) is the parent pid: the shim.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let shim: i32 = after.split_whitespace().nth(1).unwrap().parse().unwrap();
    let shim_cmd = std::fs::read_to_string(format!("/proc/{shim}/cmdline")).unwrap();
    assert!(shim_cmd.contains("containerd-shim-kata-v2"), "{shim_cmd}");
    let bundle = env.ctd.task_state_dir().join(&id);
    env.ctd.kill_daemon();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let gone = wait_until(Duration::from_secs(15), || {
        kata_tests::processes_naming(&run_dir).is_empty()
    });
    assert!(
        gone,
        "VM processes outlived the shim: {:?}",
        kata_tests::processes_naming(&run_dir)
    );
    let shim_bin = env
        ._shim
        .as_ref()
        .unwrap()
        .bin_dir()
        .join("containerd-shim-kata-v2");
    let out = Command::new(shim_bin)
        .args(["-namespace", kata_tests::containerd::NAMESPACE, "-address"])
        .arg(env.ctd.socket())
        .args(["-publish-binary", "/bin/true", "-id", &id, "delete"])
        .current_dir(&bundle)
        .env("KATA_CONF_FILE", env._shim.as_ref().unwrap().config_path())
        .output()
        .unwrap();
    assert!(out.status.success(), "shim delete: {}", text(&out));
    env.assert_no_leaks(&[&id]);
}

/// A pod through CRI's annotations as `ctr` can set them: a sandbox container, and a
/// container of the same pod joining its IPC and UTS namespaces (`--with-ns` paths of the
/// sandbox's task pid, as CRI passes them). They share those namespaces and one kernel;
/// with kata both run in the one VM the sandbox booted, and share the pod's /dev/shm.
fn pod_by_annotations(env: &Env) {
    let sb = unique("podsb");
    let c1 = unique("podc");
    let sb_type = "io.kubernetes.cri.container-type=sandbox".to_owned();
    let sb_id = format!("io.kubernetes.cri.sandbox-id={sb}");
    let out = env.ctd.ctr(&[
        "run",
        "-d",
        "--runtime",
        env.runtime,
        "--annotation",
        &sb_type,
        "--annotation",
        &sb_id,
        BUSYBOX,
        &sb,
        "sh",
        "-c",
        "echo from-sandbox > /dev/shm/pod; exec sleep 1000",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(wait_until(Duration::from_secs(60), || env.task_status(&sb)
        == "RUNNING"));
    let pid = env.task_pid(&sb);
    let facts = "readlink /proc/self/ns/uts /proc/self/ns/ipc; cat /proc/sys/kernel/random/boot_id";
    let out = env
        .ctd
        .ctr(&["task", "exec", "--exec-id", "facts", &sb, "sh", "-c", facts]);
    assert!(out.status.success(), "{}", text(&out));
    let sandbox_facts = stdout(&out);
    let ipc = format!("ipc:/proc/{pid}/ns/ipc");
    let uts = format!("uts:/proc/{pid}/ns/uts");
    let c_type = "io.kubernetes.cri.container-type=container".to_owned();
    let script = format!("{facts}; cat /dev/shm/pod 2>/dev/null || echo no-pod-shm");
    let out = env.ctd.ctr(&[
        "run",
        "--rm",
        "--runtime",
        env.runtime,
        "--annotation",
        &c_type,
        "--annotation",
        &sb_id,
        "--with-ns",
        &ipc,
        "--with-ns",
        &uts,
        BUSYBOX,
        &c1,
        "sh",
        "-c",
        &script,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let container_facts = stdout(&out);
    assert!(
        container_facts.starts_with(&sandbox_facts),
        "namespaces or kernel differ:\nsandbox:\n{sandbox_facts}\ncontainer:\n{container_facts}"
    );
    if env.is_kata() {
        assert!(
            container_facts.ends_with("from-sandbox\n"),
            "{container_facts}"
        );
        let vms: Vec<_> = kata_tests::processes_naming("qemu-system")
            .into_iter()
            .filter(|(_, cmd)| cmd.contains(&format!("/run/kata/{sb}/")))
            .collect();
        assert_eq!(vms.len(), 1, "{vms:?}");
        assert!(kata_tests::processes_naming(&format!("/run/kata/{c1}/")).is_empty());
    }
    env.remove(&sb);
    env.assert_no_leaks(&[&sb, &c1]);
}

/// A pod container whose sandbox is not running fails naming the sandbox, and leaves
/// nothing (no VM is booted for it).
#[test]
fn a_container_of_a_missing_pod_is_refused() {
    let env = Env::new(KATA_RUNTIME);
    let id = unique("orphan");
    let missing = unique("nopod");
    let out = env.ctd.ctr(&[
        "run",
        "--rm",
        "--runtime",
        KATA_RUNTIME,
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--annotation",
        &format!("io.kubernetes.cri.sandbox-id={missing}"),
        BUSYBOX,
        &id,
        "true",
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&missing) && err.contains("not running"),
        "{}",
        text(&out)
    );
    let _ = env.ctd.ctr(&["container", "delete", &id]);
    env.assert_no_leaks(&[&id, &missing]);
}

fn mem_total_and_nproc(out: &Output) -> (u64, u32) {
    let s = stdout(out);
    let mut lines = s.lines();
    let mem = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal: {}", text(out)));
    let cpus = lines
        .next()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no nproc: {}", text(out)));
    (mem, cpus)
}

/// A container's memory limit is hot-added to its VM (rounded up to the guest's 128 MiB
/// memory blocks) and its CPU limit brings vCPUs, before it starts.
#[test]
fn limits_hotplug_memory_and_vcpus() {
    let env = Env::new(KATA_RUNTIME);
    let probe = ["sh", "-c", "grep MemTotal /proc/meminfo; nproc"];
    let base_id = unique("hpbase");
    let out = env.run(&base_id, &[], &probe);
    assert!(out.status.success(), "{}", text(&out));
    let (base_mem, base_cpus) = mem_total_and_nproc(&out);
    let id = unique("hp");
    // 200 MiB rounds up to two 128 MiB blocks.
    let out = env.run(&id, &["--memory-limit", "209715200", "--cpus", "1"], &probe);
    assert!(out.status.success(), "{}", text(&out));
    let (mem, cpus) = mem_total_and_nproc(&out);
    assert_eq!(
        mem - base_mem,
        256 * 1024,
        "MemTotal {base_mem} kB -> {mem} kB"
    );
    assert_eq!(cpus, base_cpus + 1);
    env.assert_no_leaks(&[&base_id, &id]);
}

/// Limits the VM cannot meet fail the run with both numbers, and leave nothing.
#[test]
fn limits_beyond_the_vm_are_refused_with_numbers() {
    let env = Env::new(KATA_RUNTIME);
    let id = unique("toobig");
    let out = env.run(&id, &["--cpus", "8"], &["true"]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("needs 9 vCPUs") && err.contains("default_maxvcpus is"),
        "{}",
        text(&out)
    );
    let _ = env.ctd.ctr(&["container", "delete", &id]);
    let id2 = unique("toomuch");
    let out = env.run(&id2, &["--memory-limit", "1099511627776"], &["true"]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("1048576 MiB more") && err.contains("can grow by only"),
        "{}",
        text(&out)
    );
    let _ = env.ctd.ctr(&["container", "delete", &id2]);
    env.assert_no_leaks(&[&id, &id2]);
}

/// `io.katacontainers.config.hypervisor.default_vcpus` sizes the VM when
/// enable_annotations allows it; an annotation it does not allow fails naming it.
#[test]
fn sizing_annotations_are_honoured_only_when_enabled() {
    let env = Env::new(KATA_RUNTIME);
    let id = unique("annvcpu");
    let out = env.run(
        &id,
        &[
            "--annotation",
            "io.katacontainers.config.hypervisor.default_vcpus=2",
        ],
        &["nproc"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stdout(&out), "2\n", "{}", text(&out));
    let bad = unique("annbad");
    let out = env.run(
        &bad,
        &[
            "--annotation",
            "io.katacontainers.config.hypervisor.memory_slots=3",
        ],
        &["true"],
    );
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("io.katacontainers.config.hypervisor.memory_slots")
            && err.contains("enable_annotations"),
        "{}",
        text(&out)
    );
    let _ = env.ctd.ctr(&["container", "delete", &bad]);
    env.assert_no_leaks(&[&id, &bad]);
}

/// Update raises a running container's memory limit: the VM grows first, then the guest
/// cgroup takes the new limit.
#[test]
fn update_raises_a_limit_and_grows_the_vm() {
    let env = Env::new(KATA_RUNTIME);
    let id = unique("upd");
    let out = env.ctd.ctr(&[
        "run",
        "-d",
        "--memory-limit",
        "134217728",
        "--runtime",
        KATA_RUNTIME,
        BUSYBOX,
        &id,
        "sleep",
        "1000",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(wait_until(Duration::from_secs(60), || env.task_status(&id)
        == "RUNNING"));
    let mem_total = |exec: &str| {
        let out = env.ctd.ctr(&[
            "task",
            "exec",
            "--exec-id",
            exec,
            &id,
            "sh",
            "-c",
            "grep MemTotal /proc/meminfo",
        ]);
        assert!(out.status.success(), "{}", text(&out));
        stdout(&out)
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap()
    };
    let before = mem_total("m1");
    // ctr 1.6 has no `task update`: call the shim's Update as containerd would.
    let address =
        std::fs::read_to_string(env.ctd.task_state_dir().join(&id).join("address")).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let shim = kata_tests::crio::ShimClient::connect(address.trim())
            .await
            .unwrap();
        shim.update(&id, br#"{"memory":{"limit":402653184}}"#)
            .await
            .unwrap();
    });
    let after = mem_total("m2");
    assert_eq!(
        after - before,
        256 * 1024,
        "MemTotal {before} kB -> {after} kB"
    );
    let out = env.ctd.ctr(&["task", "metrics", &id]);
    let limit = stdout(&out)
        .lines()
        .find(|l| l.starts_with("memory.usage_limit"))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(str::to_owned);
    assert_eq!(limit.as_deref(), Some("402653184"), "{}", text(&out));
    env.remove(&id);
    env.assert_no_leaks(&[&id]);
}

/// Runs a host command the test needs (the test plays CNI's part with `ip`).
fn host(args: &[&str]) -> Output {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", text(&out));
    out
}

/// Pod networking in the "tcfilter" model, with the test in CNI's place: a network
/// namespace holding one end of a veth (address, MTU 1400, default route), the other end on
/// the host. A sandbox container naming that namespace gets a VM whose NIC carries the
/// veth's MAC, address, MTU and route; the host fetches a page from busybox httpd in the pod
/// and the pod reaches the host's end; deleting the container removes the tap and tc setup.
/// Traffic stays on this veth.
#[test]
fn pod_network_through_a_veth() {
    let env = Env::new(KATA_RUNTIME);
    let id = unique("net");
    let n = std::process::id() % 200 + 20;
    let ns = format!("kt-net-{n}");
    let host_if = format!("ktv{n}");
    let (host_ip, pod_ip) = (format!("10.213.{n}.1"), format!("10.213.{n}.2"));
    let _ = Command::new("ip").args(["netns", "del", &ns]).output();
    host(&["ip", "netns", "add", &ns]);
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            // Deleting the namespace deletes the veth pair.
            let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
        }
    }
    let _cleanup = Cleanup(ns.clone());
    host(&[
        "ip", "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
    ]);
    host(&[
        "ip",
        "addr",
        "add",
        &format!("{host_ip}/24"),
        "dev",
        &host_if,
    ]);
    host(&["ip", "link", "set", &host_if, "up"]);
    host(&[
        "ip",
        "-n",
        &ns,
        "addr",
        "add",
        &format!("{pod_ip}/24"),
        "dev",
        "eth0",
    ]);
    host(&["ip", "-n", &ns, "link", "set", "eth0", "mtu", "1400", "up"]);
    host(&["ip", "-n", &ns, "route", "add", "default", "via", &host_ip]);

    let sb_id = format!("io.kubernetes.cri.sandbox-id={id}");
    let netns = format!("network:/var/run/netns/{ns}");
    let out = env.ctd.ctr(&[
        "run",
        "-d",
        "--runtime",
        KATA_RUNTIME,
        "--annotation",
        "io.kubernetes.cri.container-type=sandbox",
        "--annotation",
        &sb_id,
        "--with-ns",
        &netns,
        BUSYBOX,
        &id,
        "sh",
        "-c",
        "mkdir -p /tmp/www && echo hello-from-the-pod > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(wait_until(Duration::from_secs(60), || env.task_status(&id)
        == "RUNNING"));
    let inside = env.ctd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "ipinfo",
        &id,
        "sh",
        "-c",
        &format!("ip -o -4 addr show dev eth0; ip -o link show dev eth0; ip route; ping -c 1 -W 5 {host_ip} >/dev/null && echo ping-ok"),
    ]);
    let s = stdout(&inside);
    assert!(
        s.contains(&format!("inet {pod_ip}/24")),
        "{}",
        text(&inside)
    );
    assert!(s.contains("mtu 1400"), "{}", text(&inside));
    assert!(
        s.contains(&format!("default via {host_ip} dev eth0")),
        "{}",
        text(&inside)
    );
    assert!(s.contains("ping-ok"), "{}", text(&inside));
    // The host fetches the page from the pod.
    let mut page = String::new();
    let fetched = wait_until(Duration::from_secs(20), || {
        use std::io::Read;
        let Ok(mut conn) = std::net::TcpStream::connect_timeout(
            &format!("{pod_ip}:8080").parse().unwrap(),
            Duration::from_secs(2),
        ) else {
            return false;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        if conn.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").is_err() {
            return false;
        }
        page.clear();
        let _ = conn.read_to_string(&mut page);
        page.contains("hello-from-the-pod")
    });
    assert!(fetched, "no page from {pod_ip}:8080: {page:?}");
    let qdiscs = host(&["tc", "-n", &ns, "qdisc", "show", "dev", "eth0"]);
    assert!(stdout(&qdiscs).contains("ingress"), "{}", text(&qdiscs));
    let links = host(&["ip", "-n", &ns, "-o", "link"]);
    assert!(stdout(&links).contains("tap0_kata"), "{}", text(&links));

    env.remove(&id);
    let links = host(&["ip", "-n", &ns, "-o", "link"]);
    assert!(
        !stdout(&links).contains("tap0_kata"),
        "tap left: {}",
        text(&links)
    );
    let qdiscs = host(&["tc", "-n", &ns, "qdisc", "show", "dev", "eth0"]);
    assert!(
        !stdout(&qdiscs).contains("ingress"),
        "tc left: {}",
        text(&qdiscs)
    );
    env.assert_no_leaks(&[&id]);
}

/// A sandbox whose CRI annotations contradict each other fails naming them; no VM is
/// started and nothing is left.
#[test]
fn malformed_pod_annotations_are_refused() {
    let env = Env::new(KATA_RUNTIME);
    let id = unique("badann");
    let out = env.run(
        &id,
        &[
            "--annotation",
            "io.kubernetes.cri.container-type=pod",
            "--annotation",
            &format!("io.kubernetes.cri.sandbox-id={id}"),
        ],
        &["true"],
    );
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("container type \"pod\"") && err.contains("\"sandbox\" or \"container\""),
        "{}",
        text(&out)
    );
    let _ = env.ctd.ctr(&["container", "delete", &id]);
    env.assert_no_leaks(&[&id]);
}
