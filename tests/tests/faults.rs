//! The fault suite: what an operator does to a running pod, through a real containerd and
//! real VMs. Each fault must end the sandbox cleanly: the VM's processes are dead before any
//! process is reported exited, every process gets exit 137 and its TaskExit (execs first), a
//! workload writing to a host volume stops writing at the exit event, `ctr task delete`
//! returns within containerd's bound, and nothing is left behind.
//!
//! Faults: SIGKILL to QEMU, virtiofsd, the vsock daemon and the shim; a guest kernel panic;
//! a hung guest (vCPUs paused over QMP); and containerd restarted under a running task,
//! which must keep working. The time from each fault to its exit event is printed
//! (`fault-timing <fault> <ms>`) for the benchmark table; it is not asserted.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kata_tests::containerd::{text, Containerd, ShimInstall, BUSYBOX, KATA_RUNTIME};
use kata_tests::wait_until;

/// Short liveness settings, so a hung agent is declared lost in ~3 s.
const FAST_HEALTH: &str = "health_check_interval = 1\nhealth_check_failures = 3";
/// A delete slower than this would have been given up on by containerd (its Shutdown
/// bound is 3 s, the dead-shim cleanup 5 s): the test fails it as a hang.
const DELETE_BOUND: Duration = Duration::from_secs(10);

struct Fixture {
    ctd: Containerd,
    _shim: ShimInstall,
    /// Host directory the workload writes to.
    volume: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        kata_tests::init_logging();
        let shim = ShimInstall::new();
        shim.append_config(FAST_HEALTH);
        let ctd = Containerd::start_with_env(
            shim.bin_dir(),
            &[("KATA_CONF_FILE", shim.config_path().as_path())],
        );
        let volume = tempfile::Builder::new()
            .prefix("kata-fault-vol-")
            .tempdir()
            .unwrap();
        Self {
            ctd,
            _shim: shim,
            volume,
        }
    }

    /// Runs a detached container that appends a line to `<volume>/<id>.log` every 50 ms;
    /// `extra` goes before the image (e.g. `--privileged`).
    fn run_writer(&self, id: &str, extra: &[&str]) {
        let mount = format!(
            "type=bind,src={},dst=/data,options=rbind:rw",
            self.volume.path().display()
        );
        let script = format!("while true; do date >> /data/{id}.log; usleep 50000; done");
        let mut args = vec!["run", "-d", "--runtime", KATA_RUNTIME, "--mount", &mount];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[BUSYBOX, id, "sh", "-c", &script]);
        let out = self.ctd.ctr(&args);
        assert!(out.status.success(), "ctr run -d: {}", text(&out));
        assert!(
            wait_until(Duration::from_secs(60), || self.task_status(id)
                == "RUNNING"
                && self.log_len(id) > 0),
            "{id} never ran: {} {}",
            self.task_status(id),
            self.ctd.log()
        );
    }

    fn log_len(&self, id: &str) -> u64 {
        std::fs::metadata(self.volume.path().join(format!("{id}.log")))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// The STATUS column of `ctr task ls` for `id` ("" when absent).
    fn task_status(&self, id: &str) -> String {
        self.task_column(id, 2)
    }

    fn task_column(&self, id: &str, n: usize) -> String {
        let out = self.ctd.ctr(&["task", "ls"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(n))
            .unwrap_or_default()
            .to_owned()
    }

    /// Starts a long-running exec `exec_id` in `id`.
    fn exec_detached(&self, id: &str, exec_id: &str) {
        let out = self.ctd.ctr(&[
            "task",
            "exec",
            "-d",
            "--exec-id",
            exec_id,
            id,
            "sleep",
            "1000",
        ]);
        assert!(out.status.success(), "exec: {}", text(&out));
    }

    /// Pid of the process of sandbox `id` whose command line contains `what`.
    fn vm_process(&self, id: &str, what: &str) -> i32 {
        let run_dir = format!("/run/kata/{id}/vm");
        kata_tests::processes_naming(&run_dir)
            .into_iter()
            .find(|(_, cmd)| cmd.contains(what))
            .unwrap_or_else(|| panic!("no {what} process for {id}"))
            .0
    }

    /// `ctr task delete <id>` (then the container), failing if it hangs; returns how long
    /// the task delete took.
    fn delete(&self, id: &str) -> Duration {
        let started = Instant::now();
        let mut child = self
            .ctd
            .ctr_cmd(&["task", "delete", id])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let done = wait_until(DELETE_BOUND, || matches!(child.try_wait(), Ok(Some(_))));
        if !done {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ctr task delete {id} hung for {DELETE_BOUND:?}");
        }
        let took = started.elapsed();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "task delete {id}: {}", text(&out));
        let out = self.ctd.ctr(&["container", "delete", id]);
        assert!(
            out.status.success(),
            "container delete {id}: {}",
            text(&out)
        );
        took
    }
}

/// `ctr events`, read by a thread that timestamps every line.
struct Events {
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Events {
    fn subscribe(ctd: &Containerd) -> Self {
        let mut child = ctd
            .ctr_cmd(&["events"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push((Instant::now(), line));
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        Self { child, lines }
    }

    /// Waits for the TaskExit of process `exec_id` (the container id for its init) in
    /// container `id`; returns when it was seen and its exit status.
    fn wait_exit(&self, id: &str, exec_id: &str, timeout: Duration) -> (Instant, u32) {
        let needle_c = format!("\"container_id\":\"{id}\"");
        let needle_i = format!("\"id\":\"{exec_id}\"");
        let mut found = None;
        let seen = wait_until(timeout, || {
            found = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|(_, l)| {
                    l.contains("/tasks/exit") && l.contains(&needle_c) && l.contains(&needle_i)
                })
                .cloned();
            found.is_some()
        });
        assert!(
            seen,
            "no TaskExit for {id}/{exec_id} within {timeout:?}; events: {:?}",
            self.all()
        );
        let (at, line) = found.unwrap();
        let status = line
            .split("\"exit_status\":")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        (at, status)
    }

    fn all(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|(_, l)| l.clone())
            .collect()
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unique(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

fn sigkill(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

/// The checks every fault shares, from the moment of `fault`: the exec's and the init's
/// TaskExit with 137 (exec first), no VM process alive at the init's exit event, the
/// volume no longer written, a bounded delete, no leaks.
fn assert_sandbox_ended(fx: &Fixture, events: &Events, id: &str, fault: Instant, name: &str) {
    let (exec_at, exec_status) = events.wait_exit(id, "e1", Duration::from_secs(60));
    let (at, status) = events.wait_exit(id, id, Duration::from_secs(60));
    // Sampled right at the exit event: the VM must already be gone.
    let vm_left = kata_tests::processes_naming(&format!("/run/kata/{id}/vm"));
    let len = fx.log_len(id);
    println!(
        "fault-timing {name} {} ms",
        at.duration_since(fault).as_millis()
    );
    assert_eq!(exec_status, 137, "exec exit status");
    assert_eq!(status, 137, "init exit status");
    assert!(
        exec_at <= at,
        "the exec's TaskExit must come before the init's"
    );
    assert!(
        vm_left.is_empty(),
        "VM processes still alive at the exit event: {vm_left:?}"
    );
    assert_eq!(fx.task_status(id), "STOPPED");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        fx.log_len(id),
        len,
        "the workload kept writing to the host volume after its exit event"
    );
    let took = fx.delete(id);
    println!("fault-delete {name} {} ms", took.as_millis());
    kata_tests::assert_no_runtime_leaks(&[id]);
}

/// Kills the VM process named `what` and checks the sandbox ends cleanly.
fn kill_vm_process(what: &str, name: &str) {
    let fx = Fixture::new();
    let id = unique(name);
    fx.run_writer(&id, &[]);
    fx.exec_detached(&id, "e1");
    let events = Events::subscribe(&fx.ctd);
    let pid = fx.vm_process(&id, what);
    let fault = Instant::now();
    sigkill(pid);
    assert_sandbox_ended(&fx, &events, &id, fault, name);
}

#[test]
fn qemu_killed() {
    kill_vm_process("qemu-system", "qemu-kill");
}

#[test]
fn virtiofsd_killed() {
    kill_vm_process("virtiofsd", "virtiofsd-kill");
}

#[test]
fn vsock_daemon_killed() {
    kill_vm_process("vhost-device-vsock", "vsock-kill");
}

/// After a fault, an exec names the reason at once (no transport timeout), and State,
/// Wait and Delete answer with the recorded exit.
#[test]
fn a_dead_sandbox_answers_with_the_reason() {
    let fx = Fixture::new();
    let id = unique("dead-answers");
    fx.run_writer(&id, &[]);
    fx.exec_detached(&id, "e1");
    let events = Events::subscribe(&fx.ctd);
    sigkill(fx.vm_process(&id, "virtiofsd"));
    events.wait_exit(&id, &id, Duration::from_secs(60));
    let started = Instant::now();
    let out = fx
        .ctd
        .ctr(&["task", "exec", "--exec-id", "late", &id, "true"]);
    assert!(!out.status.success(), "exec on a dead sandbox succeeded");
    let msg = text(&out);
    assert!(
        msg.contains("is down") && msg.contains("virtiofsd"),
        "the error names the reason: {msg}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "exec waited for a transport timeout"
    );
    let out = fx.ctd.ctr(&["task", "ls"]);
    assert!(text(&out).contains("STOPPED"), "{}", text(&out));
    fx.delete(&id);
    kata_tests::assert_no_runtime_leaks(&[&id]);
}

/// A guest kernel panic (sysrq from a privileged container) ends the sandbox; the shim's
/// log says the guest panicked.
#[test]
fn guest_kernel_panic() {
    let fx = Fixture::new();
    let id = unique("panic");
    fx.run_writer(&id, &["--privileged"]);
    fx.exec_detached(&id, "e1");
    let events = Events::subscribe(&fx.ctd);
    let fault = Instant::now();
    // The exec dies with the guest: ctr may report an error; the events tell.
    let _ = fx.ctd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "crash",
        &id,
        "sh",
        "-c",
        "echo c > /proc/sysrq-trigger",
    ]);
    assert_sandbox_ended(&fx, &events, &id, fault, "guest-panic");
    let log = shim_log(&fx.ctd);
    assert!(
        log.contains("guest kernel panicked"),
        "the shim's log names the panic"
    );
}

/// A hung guest (its vCPUs paused over QMP): the agent misses its health checks and the
/// sandbox ends within the liveness bound; the log says so.
#[test]
fn hung_guest() {
    let fx = Fixture::new();
    let id = unique("hung");
    fx.run_writer(&id, &[]);
    fx.exec_detached(&id, "e1");
    let events = Events::subscribe(&fx.ctd);
    let fault = Instant::now();
    qmp(&format!("/run/kata/{id}/vm/qmp-debug.sock"), "stop");
    assert_sandbox_ended(&fx, &events, &id, fault, "hung-guest");
    let log = shim_log(&fx.ctd);
    assert!(
        log.contains("health checks"),
        "the shim's log names the lost agent"
    );
}

/// A SIGKILLed shim: containerd notices, runs the shim's `delete` (SIGKILL at once) and
/// reports the task exited; its VM dies with it.
#[test]
fn shim_killed() {
    let fx = Fixture::new();
    let id = unique("shim-kill");
    fx.run_writer(&id, &[]);
    let events = Events::subscribe(&fx.ctd);
    let qemu = fx.vm_process(&id, "qemu-system");
    let shim = parent_of(qemu);
    let fault = Instant::now();
    sigkill(shim);
    let (at, status) = events.wait_exit(&id, &id, Duration::from_secs(60));
    println!(
        "fault-timing shim-kill {} ms",
        at.duration_since(fault).as_millis()
    );
    assert_eq!(status, 137);
    assert!(
        wait_until(Duration::from_secs(10), || kata_tests::processes_naming(
            &format!("/run/kata/{id}/vm")
        )
        .is_empty()),
        "the VM outlived its shim"
    );
    let len = fx.log_len(&id);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(fx.log_len(&id), len, "the workload kept writing");
    let out = fx.ctd.ctr(&["task", "delete", &id]);
    // containerd already deleted the task of a dead shim; either answer is fine.
    let _ = out;
    let out = fx.ctd.ctr(&["container", "delete", &id]);
    assert!(out.status.success(), "{}", text(&out));
    kata_tests::assert_no_runtime_leaks(&[&id]);
}

/// containerd restarted (SIGKILL, then started again) while a task runs: it reconnects
/// to the shim; exec, kill and delete still work.
#[test]
fn containerd_restarted() {
    let mut fx = Fixture::new();
    let id = unique("ctd-restart");
    fx.run_writer(&id, &[]);
    fx.ctd.restart();
    assert_eq!(fx.task_status(&id), "RUNNING", "{}", fx.ctd.log());
    let out = fx
        .ctd
        .ctr(&["task", "exec", "--exec-id", "after", &id, "echo", "hi"]);
    assert!(out.status.success(), "exec after restart: {}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hi");
    let events = Events::subscribe(&fx.ctd);
    let out = fx.ctd.ctr(&["task", "kill", "-s", "SIGKILL", &id]);
    assert!(out.status.success(), "kill after restart: {}", text(&out));
    let (_, status) = events.wait_exit(&id, &id, Duration::from_secs(30));
    assert_eq!(status, 137);
    fx.delete(&id);
    kata_tests::assert_no_runtime_leaks(&[&id]);
}

/// The parent pid of `pid`.
fn parent_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    after.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Runs one QMP command on `socket` (the VM's diagnostics monitor).
fn qmp(socket: &str, command: &str) {
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("connect {socket}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.contains("QMP"), "greeting: {line}");
    for cmd in ["qmp_capabilities", command] {
        writeln!(stream, "{{\"execute\":\"{cmd}\"}}").unwrap();
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line.contains("\"return\"") || line.contains("\"error\"") {
                assert!(line.contains("\"return\""), "{cmd}: {line}");
                break;
            }
        }
    }
}

/// The shims' logs: containerd writes each shim's log fifo into its own log.
fn shim_log(ctd: &Containerd) -> String {
    ctd.log()
}
