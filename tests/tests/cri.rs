//! End-to-end through containerd's CRI plugin, as the kubelet drives it: a test-owned
//! containerd 1.6 with CRI enabled (`kata_tests::cri`), and CRI v1 gRPC calls on its socket.
//! Every scenario runs twice: with handler `runc` (proving the test itself) and with handler
//! `kata` (`io.containerd.kata.v2`: one QEMU VM per pod, the pod's containers inside it).
//! Pods use host networking (no CNI is configured). Each test ends with a leak check.

use std::path::Path;
use std::time::Duration;

use kata_tests::cri::{
    api, bind_mount, log_text, pod_config, CriContainerd, OrPanic, Pod, PodCgroup, BUSYBOX,
    KATA_HANDLER, RUNC_HANDLER,
};
use kata_tests::wait_until;

/// A name no other test of this run uses (runc and kata variants run at once).
fn unique(name: &str) -> String {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{name}-{}-{n}", std::process::id())
}

fn host_kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap()
        .trim()
        .to_owned()
}

/// The running kernel's boot id: a VM's differs from the host's.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

fn host_boot_id() -> String {
    std::fs::read_to_string(BOOT_ID).unwrap()
}

fn tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir().unwrap()
}

/// QEMU processes of a kata pod: those naming its run directory `/run/kata/<pod id>/`.
fn qemu_pids(pod_id: &str) -> Vec<i32> {
    kata_tests::processes_naming(&format!("/run/kata/{pod_id}/"))
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("qemu-system"))
        .map(|(pid, _)| pid)
        .collect()
}

/// The hostname a host-network pod's config carries. containerd puts it in the sandbox spec
/// while leaving the UTS namespace the host's (network NODE implies UTS NODE), which runc
/// refuses ("unable to set hostname without a private UTS namespace"); the kubelet sends
/// none for host-network pods. So: none for runc (its containers see the node's hostname),
/// and `name` for kata, whose VM always has a UTS namespace of its own.
fn pod_hostname(handler: &str, name: &str) -> String {
    if handler == KATA_HANDLER {
        name.to_owned()
    } else {
        String::new()
    }
}

/// What `hostname` prints in a pod whose config says `hostname` (empty: the node's).
fn expected_hostname(hostname: &str) -> String {
    if hostname.is_empty() {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap()
            .trim()
            .to_owned()
    } else {
        hostname.to_owned()
    }
}

/// A host-network pod named `name` with its own log directory and host cgroup parent.
fn pod_with(name: &str, hostname: &str, logs: &Path, cgroup: &PodCgroup) -> api::PodSandboxConfig {
    let mut config = pod_config(name, hostname, Some(logs));
    if let Some(linux) = config.linux.as_mut() {
        linux.cgroup_parent = cgroup.parent().to_owned();
    }
    config
}

/// Creates and starts a busybox container running `cmd` in `pod`.
fn start_container(
    env: &CriContainerd,
    pod: &Pod,
    name: &str,
    cmd: &[&str],
    mounts: Vec<api::Mount>,
) -> String {
    let id = env
        .client
        .create_container(pod, name, BUSYBOX, cmd, mounts)
        .or_panic(env);
    env.client.start_container(&id).or_panic(env);
    id
}

/// Generates `runc::<name>` and `kata::<name>` tests from one body taking the handler.
macro_rules! both_handlers {
    ($($name:ident => $body:expr;)*) => {
        mod runc {
            use super::*;
            $(#[test] fn $name() { ($body)(RUNC_HANDLER); })*
        }
        mod kata {
            use super::*;
            $(#[test] fn $name() { ($body)(KATA_HANDLER); })*
        }
    };
}

/// One pod through its whole life: two long-running containers sharing an emptyDir and the
/// pod's hostname, a third that exits 3 and logs, stats, exec, stop and removal.
fn pod_lifecycle(handler: &'static str) {
    let kata = handler == KATA_HANDLER;
    let name = unique(&format!("cri-{handler}"));
    // Dropped after `env` (which removes leftover pods first): declared before it.
    let cgroup = PodCgroup::new(&format!("kata-test-{name}"));
    let logs = tempdir("kata-cri-logs-");
    let empty_dir = tempdir("kata-cri-emptydir-");
    let env = CriContainerd::for_handler(handler);
    let client = &env.client;

    let version = client.version().or_panic(&env);
    assert_eq!(version.runtime_name, "containerd", "{version:?}");

    let hostname = pod_hostname(handler, &format!("pod-{}", std::process::id()));
    let pod = client
        .run_pod_with(pod_with(&name, &hostname, logs.path(), &cgroup), handler)
        .or_panic(&env);
    let status = client.pod_status(&pod.id).or_panic(&env);
    assert_eq!(
        status.state,
        api::PodSandboxState::SandboxReady as i32,
        "{status:?}"
    );
    if kata {
        assert_eq!(qemu_pids(&pod.id).len(), 1, "one VM for the pod");
    }

    // Two containers sharing an emptyDir.
    let shared = || vec![bind_mount(empty_dir.path(), "/shared")];
    let c1 = start_container(&env, &pod, "one", &["sleep", "1000"], shared());
    let c2 = start_container(&env, &pod, "two", &["sleep", "1000"], shared());
    for id in [&c1, &c2] {
        let s = client.container_status(id).or_panic(&env);
        assert_eq!(
            s.state,
            api::ContainerState::ContainerRunning as i32,
            "{s:?}"
        );
    }
    if kata {
        assert_eq!(
            qemu_pids(&pod.id).len(),
            1,
            "the pod's containers joined its VM"
        );
    }

    // The pod's hostname, in both containers.
    let exec = |id: &str, cmd: &[&str]| -> String {
        let (code, stdout, stderr) = client.exec_sync(id, cmd).or_panic(&env);
        assert_eq!(
            code, 0,
            "exec {cmd:?} in {id}: stdout {stdout:?} stderr {stderr:?}"
        );
        stdout
    };
    let h1 = exec(&c1, &["hostname"]);
    let h2 = exec(&c2, &["hostname"]);
    assert_eq!(h1, h2, "both containers share the pod's UTS namespace");
    assert_eq!(
        h1.trim(),
        expected_hostname(&hostname),
        "the pod's hostname"
    );
    // containerd's /etc/hostname file for the pod, bind-mounted into each container.
    for id in [&c1, &c2] {
        assert_eq!(
            exec(id, &["cat", "/etc/hostname"]).trim(),
            expected_hostname(&hostname)
        );
    }

    // A file written by one container is read by the other (and is on the host).
    exec(&c1, &["sh", "-c", "echo from-one > /shared/note"]);
    assert_eq!(exec(&c2, &["cat", "/shared/note"]), "from-one\n");
    assert_eq!(
        std::fs::read_to_string(empty_dir.path().join("note")).unwrap(),
        "from-one\n"
    );

    // The kernel the containers run on: one boot (the pod's VM for kata, the host for runc).
    let boot_id = exec(&c1, &["cat", BOOT_ID]);
    assert_eq!(
        boot_id,
        exec(&c2, &["cat", BOOT_ID]),
        "one kernel for the pod"
    );
    assert_eq!(boot_id != host_boot_id(), kata, "boot id {boot_id}");
    let release = exec(&c1, &["uname", "-r"]).trim().to_owned();
    if kata {
        assert_ne!(release, host_kernel_release(), "kata runs a guest kernel");
        assert_eq!(release, kata_tests::GuestImage::find().kernel_release);
    } else {
        assert_eq!(release, host_kernel_release());
    }

    // A container that logs a line and exits 3.
    let c3 = start_container(
        &env,
        &pod,
        "three",
        &[
            "sh",
            "-c",
            "echo line from three; echo to stderr >&2; exit 3",
        ],
        Vec::new(),
    );
    let s3 = client
        .wait_exited(&c3, Duration::from_secs(60))
        .or_panic(&env);
    assert_eq!(s3.exit_code, 3, "{s3:?}");
    let log_path = logs.path().join("three.log");
    assert_eq!(Path::new(&s3.log_path), log_path, "{s3:?}");
    let logged = wait_until(Duration::from_secs(10), || {
        log_text(&log_path, "stdout").contains("line from three\n")
            && log_text(&log_path, "stderr").contains("to stderr\n")
    });
    assert!(
        logged,
        "CRI log {}: {:?}",
        log_path.display(),
        std::fs::read_to_string(&log_path)
    );

    // Stats.
    let stats = client.container_stats(&c1).or_panic(&env);
    assert_eq!(
        stats.attributes.as_ref().map(|a| a.id.as_str()),
        Some(c1.as_str()),
        "{stats:?}"
    );
    let cpu_ns = stats
        .cpu
        .as_ref()
        .and_then(|c| c.usage_core_nano_seconds.as_ref());
    let memory = stats
        .memory
        .as_ref()
        .and_then(|m| m.working_set_bytes.as_ref());
    assert!(
        cpu_ns.is_some() && memory.is_some(),
        "cpu and memory: {stats:?}"
    );
    let pod_stats = client.pod_stats(&pod.id).or_panic(&env);
    assert_eq!(
        pod_stats.attributes.as_ref().map(|a| a.id.as_str()),
        Some(pod.id.as_str()),
        "{pod_stats:?}"
    );
    let in_pod: Vec<&str> = pod_stats
        .linux
        .iter()
        .flat_map(|l| &l.containers)
        .filter_map(|c| c.attributes.as_ref().map(|a| a.id.as_str()))
        .collect();
    assert!(
        in_pod.contains(&c1.as_str()) && in_pod.contains(&c2.as_str()),
        "{pod_stats:?}"
    );
    let listed = client.list_pod_stats(&pod.id).or_panic(&env);
    assert_eq!(listed.len(), 1, "{listed:?}");

    // Stop and remove one container, then the pod (with the rest).
    client.stop_container(&c1, 2).or_panic(&env);
    let s1 = client.container_status(&c1).or_panic(&env);
    assert_eq!(
        s1.state,
        api::ContainerState::ContainerExited as i32,
        "{s1:?}"
    );
    client.remove_container(&c1).or_panic(&env);
    let left: Vec<String> = client
        .list_containers(&pod.id)
        .or_panic(&env)
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert!(!left.contains(&c1), "{c1} still listed: {left:?}");
    assert_eq!(left.len(), 2, "{left:?}");
    client.stop_pod(&pod.id).or_panic(&env);
    client.remove_pod(&pod.id).or_panic(&env);
    let pods = client.list_pods().or_panic(&env);
    assert!(pods.iter().all(|p| p.id != pod.id), "{pods:?}");
    assert!(!env.sandbox_state_dir(&pod.id).exists());
    kata_tests::assert_no_runtime_leaks(&[&pod.id, &c1, &c2, &c3]);
}

/// Three pods at once (started concurrently), each with a container; for kata each pod is
/// its own VM. All removed, nothing left.
fn three_pods(handler: &'static str) {
    let kata = handler == KATA_HANDLER;
    let names: Vec<String> = (0..3)
        .map(|i| unique(&format!("cri3-{handler}-{i}")))
        .collect();
    let cgroups: Vec<PodCgroup> = names
        .iter()
        .map(|n| PodCgroup::new(&format!("kata-test-{n}")))
        .collect();
    let logs = tempdir("kata-cri-logs-");
    let env = CriContainerd::for_handler(handler);
    let client = &env.client;

    let pods: Vec<Pod> = std::thread::scope(|s| {
        let handles: Vec<_> = names
            .iter()
            .zip(&cgroups)
            .map(|(name, cgroup)| {
                let logs = logs.path().join(name);
                std::fs::create_dir_all(&logs).unwrap();
                let hostname = pod_hostname(handler, name);
                s.spawn(move || {
                    client.run_pod_with(pod_with(name, &hostname, &logs, cgroup), handler)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().or_panic(&env))
            .collect()
    });

    // One runtime instance per pod: a QEMU per pod for kata, a shim per pod for runc.
    let mut seen = Vec::new();
    for pod in &pods {
        let pids: Vec<i32> = if kata {
            qemu_pids(&pod.id)
        } else {
            kata_tests::processes_naming(&pod.id)
                .into_iter()
                .filter(|(_, cmd)| cmd.contains("containerd-shim-runc-v2"))
                .map(|(pid, _)| pid)
                .collect()
        };
        assert_eq!(pids.len(), 1, "pod {}: {pids:?}", pod.id);
        assert!(!seen.contains(&pids[0]), "pods share process {}", pids[0]);
        seen.push(pids[0]);
    }
    let stats = client.list_pod_stats("").or_panic(&env);
    for pod in &pods {
        let n = stats
            .iter()
            .filter(|s| s.attributes.as_ref().map(|a| &a.id) == Some(&pod.id))
            .count();
        assert_eq!(n, 1, "ListPodSandboxStats for {}: {stats:?}", pod.id);
    }

    // A container in each pod sees its own pod.
    let mut containers = Vec::new();
    let mut boot_ids = Vec::new();
    for (pod, name) in pods.iter().zip(&names) {
        let id = client
            .create_container(pod, "main", BUSYBOX, &["sleep", "1000"], Vec::new())
            .or_panic(&env);
        client.start_container(&id).or_panic(&env);
        let (code, out, err) = client.exec_sync(&id, &["hostname"]).or_panic(&env);
        let want = expected_hostname(&pod_hostname(handler, name));
        assert_eq!((code, out.trim()), (0, want.as_str()), "stderr {err:?}");
        let (_, boot_id, _) = client.exec_sync(&id, &["cat", BOOT_ID]).or_panic(&env);
        boot_ids.push(boot_id);
        containers.push(id);
    }
    // Each kata pod is a kernel of its own; runc pods all run on the host's.
    let mut distinct = boot_ids.clone();
    distinct.sort();
    distinct.dedup();
    let want = if kata { 3 } else { 1 };
    assert_eq!(distinct.len(), want, "boot ids {boot_ids:?}");

    for pod in &pods {
        client.stop_pod(&pod.id).or_panic(&env);
        client.remove_pod(&pod.id).or_panic(&env);
    }
    assert!(client.list_pods().or_panic(&env).is_empty());
    let mut ids: Vec<&str> = pods.iter().map(|p| p.id.as_str()).collect();
    ids.extend(containers.iter().map(String::as_str));
    kata_tests::assert_no_runtime_leaks(&ids);
}

both_handlers! {
    pod_lifecycle_shared_volume_hostname_logs_stats => pod_lifecycle;
    three_pods_at_once => three_pods;
}

/// The test containerd never reaches for a registry: pulling an image that was not imported
/// fails at once on the loopback stand-in, and CreateContainer with it does not pull.
#[test]
fn a_missing_image_is_never_fetched() {
    let env = CriContainerd::for_handler(RUNC_HANDLER);
    let started = std::time::Instant::now();
    let err = env
        .client
        .pull_image("docker.io/library/busybox:not-imported")
        .expect_err("no registry is reachable");
    assert!(
        format!("{err:#}").contains("127.0.0.1:9"),
        "pull went elsewhere: {err:#}"
    );
    let log = env.ctd.log();
    let elsewhere: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("msg=resolving") && !l.contains("host=\"127.0.0.1:9\""))
        .collect();
    assert!(elsewhere.is_empty(), "resolved elsewhere: {elsewhere:?}");
    let pod = env
        .client
        .run_pod(&unique("noimage"), RUNC_HANDLER)
        .or_panic(&env);
    let err = env
        .client
        .create_container(&pod, "c", "registry.k8s.io/nosuch:1", &["true"], Vec::new())
        .expect_err("the image is not there");
    assert!(format!("{err:#}").contains("not found"), "{err:#}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    env.client.stop_pod(&pod.id).or_panic(&env);
    env.client.remove_pod(&pod.id).or_panic(&env);
    kata_tests::assert_no_runtime_leaks(&[&pod.id]);
}
