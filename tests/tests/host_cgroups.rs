//! The VM's cost in the pod's host cgroup, through containerd's CRI (cgroupfs driver) as the
//! kubelet drives it: a pod's sandbox gets `linux.cgroupsPath = <cgroup parent>/<sandbox
//! id>`; the shim, QEMU, virtiofsd and the vsock daemon must run there in every cgroup v1
//! hierarchy of this host, the cgroup's memory usage must match what the VM's processes
//! hold, and the cgroup must go with the pod — also when the shim was killed. With no
//! kubelet, the tests make the pod's parent cgroup themselves and give it a memory limit.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kata_tests::cri::{api, pod_config, CriContainerd, Pod, BUSYBOX, KATA_HANDLER};
use kata_tests::wait_until;

/// The cgroup v1 hierarchies of this host the sandbox must be in.
const HIERARCHIES: &[&str] = &[
    "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids", "systemd",
];

/// A pod parent cgroup made by the test (as the kubelet would), removed on drop.
struct PodParent {
    rel: String,
}

impl PodParent {
    fn new(name: &str) -> Self {
        let rel = format!("kata-test-pods/{name}-{}", std::process::id());
        for h in HIERARCHIES {
            let dir = Path::new("/sys/fs/cgroup").join(h).join(&rel);
            if *h == "cpuset" {
                make_cpuset(&dir);
            } else {
                std::fs::create_dir_all(&dir).unwrap();
            }
        }
        Self { rel }
    }

    fn dir(&self, hierarchy: &str) -> PathBuf {
        Path::new("/sys/fs/cgroup").join(hierarchy).join(&self.rel)
    }

    fn set_memory_limit(&self, bytes: u64) {
        std::fs::write(
            self.dir("memory").join("memory.limit_in_bytes"),
            bytes.to_string(),
        )
        .unwrap();
    }
}

impl Drop for PodParent {
    fn drop(&mut self) {
        for h in HIERARCHIES {
            let _ = std::fs::remove_dir(self.dir(h));
        }
    }
}

/// cpuset directories need cpus and mems before anything joins them.
fn make_cpuset(dir: &Path) {
    let mut cur = PathBuf::from("/sys/fs/cgroup/cpuset");
    for part in dir.strip_prefix(&cur).unwrap().components() {
        let parent = cur.clone();
        cur.push(part);
        if !cur.exists() {
            std::fs::create_dir(&cur).unwrap();
            for f in ["cpuset.cpus", "cpuset.mems"] {
                let v = std::fs::read_to_string(parent.join(f)).unwrap();
                std::fs::write(cur.join(f), v.trim()).unwrap();
            }
        }
    }
}

fn run_pod(cri: &CriContainerd, name: &str, parent: &PodParent) -> Pod {
    let mut config = pod_config(name, "", None);
    config.linux.as_mut().unwrap().cgroup_parent = format!("/{}", parent.rel);
    cri.client
        .run_pod_with(config, KATA_HANDLER)
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e:#}\n{}", cri.ctd.log()))
}

/// Pids of the pod's VM processes (QEMU, virtiofsd, vsock daemon) and its shim.
fn vm_processes(pod_id: &str) -> Vec<(i32, String)> {
    kata_tests::processes_naming(&format!("/run/kata/{pod_id}/vm"))
}

fn shim_of(pod_id: &str) -> i32 {
    kata_tests::processes_naming(pod_id)
        .into_iter()
        .find(|(_, c)| c.contains("containerd-shim-kata-v2"))
        .expect("the pod's shim")
        .0
}

fn procs(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// A `/proc/<pid>/status` field in KiB.
fn status_kib(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// PSS in KiB (`/proc/<pid>/smaps_rollup`).
fn pss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn the_vm_runs_in_the_pod_cgroup_and_leaves_with_the_pod() {
    kata_tests::init_logging();
    let cri = CriContainerd::for_handler(KATA_HANDLER);
    let parent = PodParent::new("placed");
    let pod = run_pod(&cri, "placed", &parent);
    let sb_dir = |h: &str| parent.dir(h).join(&pod.id);
    let vm = vm_processes(&pod.id);
    assert!(
        vm.len() >= 3,
        "QEMU, virtiofsd and the vsock daemon: {vm:?}"
    );
    let shim = shim_of(&pod.id);
    for h in HIERARCHIES {
        let inside = procs(&sb_dir(h));
        for (pid, cmd) in vm.iter().chain([&(shim, "shim".to_owned())]) {
            assert!(
                inside.contains(pid),
                "{cmd} ({pid}) is not in the pod's {h} cgroup {}: {inside:?}",
                sb_dir(h).display()
            );
        }
    }
    // The cgroup is charged what the VM's processes own: their anonymous memory and the
    // guest's RAM (a shared memfd). Their file pages (QEMU's and the daemons' binaries and
    // libraries) are page cache charged to whoever read them first, usually another pod.
    std::thread::sleep(Duration::from_secs(2));
    let usage_kib: u64 = std::fs::read_to_string(sb_dir("memory").join("memory.usage_in_bytes"))
        .unwrap()
        .trim()
        .parse::<u64>()
        .unwrap()
        / 1024;
    let sum = |f: &str| -> u64 { vm.iter().map(|(pid, _)| status_kib(*pid, f)).sum() };
    let (rss, anon, shmem, file) = (
        sum("VmRSS:"),
        sum("RssAnon:"),
        sum("RssShmem:"),
        sum("RssFile:"),
    );
    let pss: u64 = vm.iter().map(|(pid, _)| pss_kib(*pid)).sum();
    println!(
        "pod cgroup memory usage {} MiB; VM processes: RSS {} MiB (anon {}, shmem {}, file {}), PSS {} MiB",
        usage_kib / 1024,
        rss / 1024,
        anon / 1024,
        shmem / 1024,
        file / 1024,
        pss / 1024
    );
    let owned = anon + shmem;
    let diff = usage_kib.abs_diff(owned) as f64 / owned as f64;
    assert!(
        diff <= 0.10,
        "cgroup usage {usage_kib} KiB vs the VM processes' anonymous + shared RSS {owned} KiB ({:.0}% apart)",
        diff * 100.0
    );
    cri.client.stop_pod(&pod.id).unwrap();
    cri.client.remove_pod(&pod.id).unwrap();
    for h in HIERARCHIES {
        assert!(
            !sb_dir(h).exists(),
            "{} left after RemovePodSandbox",
            sb_dir(h).display()
        );
    }
    kata_tests::assert_no_runtime_leaks(&[&pod.id]);
}

#[test]
fn a_killed_shims_cgroup_is_removed_by_containerds_cleanup() {
    kata_tests::init_logging();
    let cri = CriContainerd::for_handler(KATA_HANDLER);
    let parent = PodParent::new("shimkill");
    let pod = run_pod(&cri, "shimkill", &parent);
    let sb_mem = parent.dir("memory").join(&pod.id);
    assert!(sb_mem.exists());
    let shim = shim_of(&pod.id);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // containerd sees the shim die and runs its `delete`, which removes the cgroups.
    let gone = wait_until(Duration::from_secs(30), || {
        HIERARCHIES
            .iter()
            .all(|h| !parent.dir(h).join(&pod.id).exists())
    });
    assert!(
        gone,
        "cgroups left after the dead shim's cleanup: {:?}",
        kata_tests::host_cgroups_named(&pod.id)
    );
    let _ = cri.client.stop_pod(&pod.id);
    let _ = cri.client.remove_pod(&pod.id);
    kata_tests::assert_no_runtime_leaks(&[&pod.id]);
}

/// A container that allocates without bound in a pod with limits: with a pod limit that
/// covers the VM, the guest's OOM killer ends it (137, OOMKilled); with a pod limit
/// below what the VM needs, the host's OOM killer kills QEMU and the sandbox is fenced,
/// its log naming the host cgroup limit.
#[test]
fn pod_memory_limits_end_in_a_guest_oom_or_a_named_host_oom() {
    kata_tests::init_logging();
    let cri = CriContainerd::for_handler(KATA_HANDLER);

    // The limit covers the VM (512 MiB guest + QEMU and daemons): the container's own
    // 64 MiB limit is what it hits, in the guest.
    let roomy = PodParent::new("roomy");
    roomy.set_memory_limit(2 << 30);
    let pod = run_pod(&cri, "roomy", &roomy);
    let mut config = kata_tests::cri::with_pod_namespaces(
        kata_tests::cri::container_config("hog", BUSYBOX, &["tail", "/dev/zero"], Vec::new()),
        &pod,
    );
    config.linux = Some(api::LinuxContainerConfig {
        resources: Some(api::LinuxContainerResources {
            memory_limit_in_bytes: 64 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = cri.client.create_container_with(&pod, config).unwrap();
    cri.client.start_container(&id).unwrap();
    let status = cri
        .client
        .wait_exited(&id, Duration::from_secs(120))
        .unwrap();
    assert_eq!(status.exit_code, 137, "{status:?}");
    assert_eq!(status.reason, "OOMKilled", "{status:?}");
    cri.client.stop_pod(&pod.id).unwrap();
    cri.client.remove_pod(&pod.id).unwrap();
    kata_tests::assert_no_runtime_leaks(&[&pod.id]);

    // The limit is below what the VM grows to: the host kills QEMU.
    let tight = PodParent::new("tight");
    let pod = run_pod(&cri, "tight", &tight);
    let usage: u64 = std::fs::read_to_string(tight.dir("memory").join("memory.usage_in_bytes"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Room for the idle VM, not for the guest filling its memory.
    tight.set_memory_limit(usage + (96 << 20));
    let config = kata_tests::cri::with_pod_namespaces(
        kata_tests::cri::container_config("hog", BUSYBOX, &["tail", "/dev/zero"], Vec::new()),
        &pod,
    );
    let id = cri.client.create_container_with(&pod, config).unwrap();
    cri.client.start_container(&id).unwrap();
    let status = cri
        .client
        .wait_exited(&id, Duration::from_secs(120))
        .unwrap();
    assert_eq!(status.exit_code, 137, "{status:?}");
    let log = cri.ctd.log();
    assert!(
        log.contains("the host's OOM killer in the pod's host cgroup")
            && log.contains("memory limit"),
        "the shim's log names the host cgroup limit"
    );
    cri.client.stop_pod(&pod.id).unwrap();
    cri.client.remove_pod(&pod.id).unwrap();
    kata_tests::assert_no_runtime_leaks(&[&pod.id]);
}

/// Thread ids of `pid` whose name marks a vCPU (`CPU 0/TCG`, `CPU 0/KVM`).
fn vcpu_threads(pid: i32) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|t| {
            let tid: i32 = t.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            comm.starts_with("CPU ").then_some(tid)
        })
        .collect()
}

/// `sandbox_cgroup_only = false`: only QEMU's vCPU threads run in the pod's cgroup (for
/// CPU); QEMU's other threads, the daemons and the shim run in `/kata_overhead/<pod>`.
#[test]
fn with_sandbox_cgroup_only_off_only_vcpus_are_in_the_pod_cgroup() {
    kata_tests::init_logging();
    let shim = kata_tests::containerd::ShimInstall::new();
    shim.append_config("[runtime]\nsandbox_cgroup_only = false");
    let cri = CriContainerd::start(Some(shim));
    let parent = PodParent::new("vcpus");
    let pod = run_pod(&cri, "vcpus", &parent);
    let vm = vm_processes(&pod.id);
    let qemu = vm
        .iter()
        .find(|(_, c)| c.contains("qemu-system"))
        .expect("QEMU")
        .0;
    let vcpus = vcpu_threads(qemu);
    assert!(!vcpus.is_empty(), "no vCPU threads in QEMU");
    let tasks = |dir: PathBuf| -> Vec<i32> {
        std::fs::read_to_string(dir.join("tasks"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    for h in ["cpu", "cpuacct", "cpuset"] {
        let inside = tasks(parent.dir(h).join(&pod.id));
        for tid in &vcpus {
            assert!(
                inside.contains(tid),
                "vCPU thread {tid} not in the pod's {h} cgroup"
            );
        }
        assert!(
            !inside.contains(&qemu),
            "QEMU's main thread is in the pod's {h} cgroup"
        );
    }
    let overhead = |h: &str| {
        Path::new("/sys/fs/cgroup")
            .join(h)
            .join("kata_overhead")
            .join(&pod.id)
    };
    for h in ["memory", "pids"] {
        let inside = procs(&overhead(h));
        for (pid, cmd) in vm.iter().chain([&(shim_of(&pod.id), "shim".to_owned())]) {
            assert!(
                inside.contains(pid),
                "{cmd} ({pid}) not in the overhead {h} cgroup"
            );
        }
    }
    cri.client.stop_pod(&pod.id).unwrap();
    cri.client.remove_pod(&pod.id).unwrap();
    assert!(!overhead("memory").exists(), "the overhead cgroup stayed");
    kata_tests::assert_no_runtime_leaks(&[&pod.id]);
}
