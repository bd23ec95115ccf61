//! OOM kills and OOM priorities, end to end through a test-owned containerd: `ctr` for the
//! task events, containerd's CRI plugin for what the kubelet sees. Each check runs with runc
//! (proving the test) and with our runtime, except the one that needs a whole machine to run
//! out of memory, which only a VM gives safely. Each test ends with a leak check.
//!
//! - A child of the init killed by the OOM killer: TaskOOM is published (one per kill with
//!   kata), the container keeps running, and CRI reports its reason as `OOMKilled`.
//! - An init killed by the OOM killer: exit 137, TaskOOM before its TaskExit (exactly one
//!   with kata, whether the guest's OOM watch or the exit reported it first), CRI reason
//!   `OOMKilled`.
//! - `process.oomScoreAdj`: every process of a container (init, its child, an exec) has the
//!   spec's value; with kata in the guest, where the kubelet's -997 (Guaranteed) and 1000
//!   (BestEffort) also decide which container the guest's OOM killer picks.

use std::process::{Child, Stdio};
use std::time::Duration;

use kata_tests::containerd::{
    text, Containerd, ShimInstall, BUSYBOX, CRI_NAMESPACE, KATA_RUNTIME, RUNC_RUNTIME,
};
use kata_tests::cri::{
    api, container_config, pod_config, with_pod_namespaces, CriContainerd, OrPanic, Pod, PodCgroup,
    KATA_HANDLER, RUNC_HANDLER,
};
use kata_tests::wait_until;

/// The memory limit the OOM tests give a container: `tail /dev/zero` outgrows it at once.
const LIMIT: i64 = 32 << 20;

/// A name no other test of this run uses (runc and kata variants run at once).
fn unique(name: &str) -> String {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{name}-{}-{n}", std::process::id())
}

// ---------------------------------------------------------------------------------------
// Through ctr.

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
            return Self {
                ctd: Containerd::start(&std::env::temp_dir()),
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

    /// `ctr run <detach-or-rm> --runtime <rt> --memory-limit LIMIT busybox <id> <cmd...>`.
    fn run_limited(&self, mode: &str, id: &str, cmd: &[&str]) -> std::process::Output {
        let limit = LIMIT.to_string();
        let mut args = vec![
            "run",
            mode,
            "--runtime",
            self.runtime,
            "--memory-limit",
            &limit,
            BUSYBOX,
            id,
        ];
        args.extend_from_slice(cmd);
        self.ctd.ctr(&args)
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

    /// Kills, deletes the task and the container.
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

/// `ctr events` into a file that is read while it runs; stopped by its pid on drop.
struct Events {
    child: Child,
    file: tempfile::NamedTempFile,
}

impl Events {
    /// Subscribed once this returns.
    fn start(ctd: &Containerd) -> Self {
        let file = tempfile::NamedTempFile::new().unwrap();
        let child = ctd
            .ctr_cmd(&["events"])
            .stdout(Stdio::from(file.reopen().unwrap()))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        Self { child, file }
    }

    /// The topics of the events about container `id` so far, in order.
    fn topics(&self, id: &str) -> Vec<String> {
        let needle = format!("\"{id}\"");
        std::fs::read_to_string(self.file.path())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&needle))
            .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("/tasks/")))
            .map(str::to_owned)
            .collect()
    }

    /// How many events of `topic` about container `id` so far.
    fn count(&self, id: &str, topic: &str) -> usize {
        self.topics(id).iter().filter(|t| *t == topic).count()
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// Generates `runc::<name>` and `kata::<name>` tests from one body taking `&Env`.
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

/// Two children of the init, one after the other, outgrow the container's limit and are
/// OOM-killed; the init (a shell) outlives them: a TaskOOM for each, no exit, the task
/// still running.
fn child_oom(env: &Env) {
    let id = unique("oomchild");
    let events = Events::start(&env.ctd);
    let out = env.run_limited(
        "-d",
        &id,
        &[
            "sh",
            "-c",
            "tail /dev/zero; tail /dev/zero; exec sleep 1000",
        ],
    );
    assert!(out.status.success(), "ctr run -d: {}", text(&out));
    let both = wait_until(Duration::from_secs(120), || {
        events.count(&id, "/tasks/oom") >= 2
    });
    assert!(
        both,
        "expected a TaskOOM for each of the two killed children of {id}: {:?}",
        events.topics(&id)
    );
    assert_eq!(
        env.task_status(&id),
        "RUNNING",
        "the init outlives its children"
    );
    env.remove(&id);
    let topics = events.topics(&id);
    drop(events);
    let ooms = topics.iter().filter(|t| *t == "/tasks/oom").count();
    if env.is_kata() {
        // One per kill, never repeated (the kills happened long before the exit).
        assert_eq!(ooms, 2, "{topics:?}");
    } else {
        assert!(ooms >= 2, "{topics:?}");
    }
    let exit = topics.iter().position(|t| t == "/tasks/exit");
    let last_oom = topics.iter().rposition(|t| t == "/tasks/oom");
    assert!(
        exit.is_some() && last_oom < exit,
        "TaskOOMs before the (later, SIGKILL) TaskExit: {topics:?}"
    );
    kata_tests::assert_no_runtime_leaks(&[&id]);
}

/// A container over its memory limit is OOM-killed: exit 137, and a TaskOOM before its
/// TaskExit (with kata exactly one: the guest's OOM watch and the exit both know the kill).
fn init_oom(env: &Env) {
    let id = unique("oom");
    let events = Events::start(&env.ctd);
    // tail buffers its "line" from /dev/zero without bound.
    let out = env.run_limited("--rm", &id, &["tail", "/dev/zero"]);
    assert_eq!(out.status.code(), Some(137), "{}", text(&out));
    let complete = wait_until(Duration::from_secs(10), || {
        events.count(&id, "/tasks/delete") >= 1
    });
    let topics = events.topics(&id);
    drop(events);
    assert!(complete, "no TaskDelete for {id}: {topics:?}");
    let oom = topics.iter().position(|t| t == "/tasks/oom");
    let exit = topics.iter().position(|t| t == "/tasks/exit");
    assert!(oom.is_some(), "no TaskOOM for {id}: {topics:?}");
    assert!(oom < exit, "TaskOOM must precede TaskExit: {topics:?}");
    if env.is_kata() {
        let ooms = topics.iter().filter(|t| *t == "/tasks/oom").count();
        assert_eq!(ooms, 1, "one kill, one TaskOOM: {topics:?}");
    }
    kata_tests::assert_no_runtime_leaks(&[&id]);
}

both_runtimes! {
    a_killed_child_is_reported_and_its_container_runs_on => child_oom;
    a_killed_init_exits_137_after_its_task_oom => init_oom;
}

// ---------------------------------------------------------------------------------------
// Through containerd's CRI plugin.

/// Generates `cri_runc::<name>` and `cri_kata::<name>` tests from one body taking the
/// handler.
macro_rules! both_handlers {
    ($($name:ident => $body:expr;)*) => {
        mod cri_runc {
            use super::*;
            $(#[test] fn $name() { ($body)(RUNC_HANDLER); })*
        }
        mod cri_kata {
            use super::*;
            $(#[test] fn $name() { ($body)(KATA_HANDLER); })*
        }
    };
}

/// A host-network pod `name` in its own host cgroup (no hostname: runc refuses one without
/// a UTS namespace of its own, and the checks here do not need it).
fn run_pod(env: &CriContainerd, name: &str, cgroup: &PodCgroup, handler: &str) -> Pod {
    let mut config = pod_config(name, "", None);
    if let Some(linux) = config.linux.as_mut() {
        linux.cgroup_parent = cgroup.parent().to_owned();
    }
    env.client.run_pod_with(config, handler).or_panic(env)
}

/// A busybox container `name` running `cmd` with `resources`; `own_pid_ns` gives it a pid
/// namespace of its own (its init is pid 1 there, and it sees only its own processes).
fn container(
    pod: &Pod,
    name: &str,
    cmd: &[&str],
    resources: api::LinuxContainerResources,
    own_pid_ns: bool,
) -> api::ContainerConfig {
    let mut config = with_pod_namespaces(container_config(name, BUSYBOX, cmd, Vec::new()), pod);
    let linux = config.linux.get_or_insert_with(Default::default);
    linux.resources = Some(resources);
    if own_pid_ns {
        if let Some(ns) = linux
            .security_context
            .get_or_insert_with(Default::default)
            .namespace_options
            .as_mut()
        {
            ns.pid = api::NamespaceMode::Container as i32;
        }
    }
    config
}

fn start(env: &CriContainerd, pod: &Pod, config: api::ContainerConfig) -> String {
    let id = env.client.create_container_with(pod, config).or_panic(env);
    env.client.start_container(&id).or_panic(env);
    id
}

fn limited() -> api::LinuxContainerResources {
    api::LinuxContainerResources {
        memory_limit_in_bytes: LIMIT,
        ..Default::default()
    }
}

fn with_oom_score_adj(adj: i64) -> api::LinuxContainerResources {
    api::LinuxContainerResources {
        oom_score_adj: adj,
        ..Default::default()
    }
}

const RUNNING: i32 = api::ContainerState::ContainerRunning as i32;

/// What the kubelet sees: an init OOM-killed exits 137 with reason `OOMKilled`; a container
/// whose child was OOM-killed keeps running and reports `OOMKilled` too (containerd keeps
/// the reason of a TaskOOM); a container that just ends is `Completed`.
fn cri_reasons(handler: &'static str) {
    let name = unique(&format!("cri-oom-{handler}"));
    let cgroup = PodCgroup::new(&format!("kata-test-{name}"));
    let env = CriContainerd::for_handler(handler);
    let client = &env.client;
    let pod = run_pod(&env, &name, &cgroup, handler);

    let hog = start(
        &env,
        &pod,
        container(&pod, "hog", &["tail", "/dev/zero"], limited(), false),
    );
    let parent = start(
        &env,
        &pod,
        container(
            &pod,
            "parent",
            &["sh", "-c", "tail /dev/zero; exec sleep 1000"],
            limited(),
            false,
        ),
    );
    let done = start(
        &env,
        &pod,
        container(&pod, "done", &["true"], Default::default(), false),
    );

    let s = client
        .wait_exited(&hog, Duration::from_secs(120))
        .or_panic(&env);
    assert_eq!(
        (s.exit_code, s.reason.as_str()),
        (137, "OOMKilled"),
        "{s:?}"
    );

    let mut last = None;
    let reported = wait_until(Duration::from_secs(120), || {
        let s = client.container_status(&parent).or_panic(&env);
        let ok = s.reason == "OOMKilled";
        last = Some(s);
        ok
    });
    let s = last.unwrap();
    assert!(reported, "the child's OOM kill is not reported: {s:?}");
    assert_eq!(s.state, RUNNING, "the init outlives its child: {s:?}");

    let s = client
        .wait_exited(&done, Duration::from_secs(60))
        .or_panic(&env);
    assert_eq!((s.exit_code, s.reason.as_str()), (0, "Completed"), "{s:?}");

    client.stop_pod(&pod.id).or_panic(&env);
    client.remove_pod(&pod.id).or_panic(&env);
    drop(env);
    kata_tests::assert_no_runtime_leaks(&[&pod.id, &hog, &parent, &done]);
}

/// `process.oomScoreAdj` of the spec containerd gave the runtime for container `id`.
fn spec_oom_score_adj(env: &CriContainerd, id: &str) -> i64 {
    let out = env
        .ctd
        .ctr_in(CRI_NAMESPACE, &["containers", "info", "--spec", id]);
    assert!(out.status.success(), "ctr containers info: {}", text(&out));
    let spec: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    spec["process"]["oomScoreAdj"]
        .as_i64()
        .unwrap_or_else(|| panic!("no process.oomScoreAdj in the spec of {id}: {spec}"))
}

/// `(pid, command, oom_score_adj)` of every process container `id` sees (its own pid
/// namespace: its init, the init's child, and the exec doing the reading).
fn oom_score_adjs(env: &CriContainerd, id: &str) -> Vec<(u32, String, i64)> {
    let script = "for p in /proc/[0-9]*; do \
                  a=$(cat $p/oom_score_adj 2>/dev/null) && echo ${p#/proc/} $(cat $p/comm) $a; \
                  done";
    let (code, stdout, stderr) = env
        .client
        .exec_sync(id, &["sh", "-c", script])
        .or_panic(env);
    assert_eq!(code, 0, "{stdout} {stderr}");
    stdout
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((
                f.next()?.parse().ok()?,
                f.next()?.to_owned(),
                f.next()?.parse().ok()?,
            ))
        })
        .collect()
}

/// Every process of container `id` (init, child, exec) has the spec's oom_score_adj, and
/// the spec has `expected`.
fn assert_oom_score_adj(env: &CriContainerd, id: &str, expected: i64) {
    assert_eq!(spec_oom_score_adj(env, id), expected, "the spec of {id}");
    let seen = oom_score_adjs(env, id);
    let has = |pid: u32, comm: &str| seen.iter().any(|(p, c, _)| *p == pid && c == comm);
    assert!(
        has(1, "sleep") && seen.iter().filter(|(_, c, _)| c == "sleep").count() >= 2,
        "the init (pid 1) and its child in {id}: {seen:?}"
    );
    assert!(
        seen.iter().all(|(_, _, adj)| *adj == expected),
        "every process of {id} has oom_score_adj {expected}: {seen:?}"
    );
}

/// The init of each container and its child run `sleep`.
const SLEEPERS: &[&str] = &["sh", "-c", "sleep 1000 & exec sleep 1001"];

/// Two containers of one pod with the oom_score_adj of a BestEffort (1000) and a Burstable
/// (500) pod container: each process has its spec's value.
fn cri_oom_score_adj(handler: &'static str) {
    let name = unique(&format!("cri-adj-{handler}"));
    let cgroup = PodCgroup::new(&format!("kata-test-{name}"));
    let env = CriContainerd::for_handler(handler);
    let pod = run_pod(&env, &name, &cgroup, handler);
    let besteffort = start(
        &env,
        &pod,
        container(&pod, "besteffort", SLEEPERS, with_oom_score_adj(1000), true),
    );
    let burstable = start(
        &env,
        &pod,
        container(&pod, "burstable", SLEEPERS, with_oom_score_adj(500), true),
    );
    assert_oom_score_adj(&env, &besteffort, 1000);
    assert_oom_score_adj(&env, &burstable, 500);
    env.client.stop_pod(&pod.id).or_panic(&env);
    env.client.remove_pod(&pod.id).or_panic(&env);
    drop(env);
    kata_tests::assert_no_runtime_leaks(&[&pod.id, &besteffort, &burstable]);
}

both_handlers! {
    oom_kills_show_as_oom_killed => cri_reasons;
    processes_get_the_specs_oom_score_adj => cri_oom_score_adj;
}

/// With the kubelet's values passed through (containerd's `restrict_oom_score_adj` off),
/// a Guaranteed container (-997) and a BestEffort one (1000) share a pod's VM: the guest
/// applies -997, which this host would refuse any process, and when the Guaranteed
/// container fills the guest's memory the guest's OOM killer picks the BestEffort
/// container's small process first, then the hog; the Guaranteed init lives on.
/// Kata only: with runc the whole host would run out of memory.
#[test]
fn kata_guaranteed_and_besteffort_share_the_guest_as_qos_says() {
    let name = unique("qos-kata");
    let cgroup = PodCgroup::new(&format!("kata-test-{name}"));
    let env = CriContainerd::for_kata_with_unrestricted_oom_score_adj();
    let client = &env.client;
    let pod = run_pod(&env, &name, &cgroup, KATA_HANDLER);
    let besteffort = start(
        &env,
        &pod,
        container(&pod, "besteffort", SLEEPERS, with_oom_score_adj(1000), true),
    );
    let guaranteed = start(
        &env,
        &pod,
        container(&pod, "guaranteed", SLEEPERS, with_oom_score_adj(-997), true),
    );
    assert_oom_score_adj(&env, &besteffort, 1000);
    assert_oom_score_adj(&env, &guaranteed, -997);

    // No container limit: tail grows until the guest as a whole runs out of memory.
    let hog = client
        .exec_sync_with_timeout(&guaranteed, &["tail", "/dev/zero"], 110)
        .or_panic(&env);
    assert_eq!(hog.exit_code, 137, "the hog is killed in the end: {hog:?}");
    let s = client
        .wait_exited(&besteffort, Duration::from_secs(30))
        .or_panic(&env);
    assert_eq!(
        (s.exit_code, s.reason.as_str()),
        (137, "OOMKilled"),
        "the BestEffort container goes first: {s:?}"
    );
    let s = client.container_status(&guaranteed).or_panic(&env);
    assert_eq!(s.state, RUNNING, "the Guaranteed init lives on: {s:?}");
    assert_eq!(s.reason, "OOMKilled", "its exec's kill is reported: {s:?}");

    client.stop_pod(&pod.id).or_panic(&env);
    client.remove_pod(&pod.id).or_panic(&env);
    drop(env);
    kata_tests::assert_no_runtime_leaks(&[&pod.id, &besteffort, &guaranteed]);
}
