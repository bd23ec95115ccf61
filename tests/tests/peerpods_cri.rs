//! Peer pods end to end through containerd's CRI, as the kubelet drives them: a test-owned
//! containerd 1.6 with handler `kata-remote` (the shim with a `[hypervisor.remote]`
//! configuration), the real `peerpod-adaptor` with its local provider (pod VMs as QEMU on a
//! test bridge, booted from hack/build-podvm.sh's image), and a private Debian
//! `docker-registry` on the bridge address holding busybox (pushed with `skopeo`):
//! containerd pulls the image on the node (containerd 1.6 does that for CreateContainer),
//! the shim ignores that copy and the agent pulls it again inside the VM. Host-network pods
//! (no netns: the tunnel is covered by tests/tests/peerpods_adaptor.rs). Each test ends with
//! a leak check.
//!
//! Needs: hack/install-deps.sh, hack/build-test-images.sh, hack/build-podvm.sh and
//! `cargo build --workspace --bins`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kata_tests::containerd::ShimInstall;
use kata_tests::cri::{
    api, bind_mount, container_config, log_text, pod_config, pod_ip, with_network_mode,
    CriContainerd, Networking, OrPanic, KATA_REMOTE_HANDLER,
};
use kata_tests::peerpod::{sh, Adaptor};
use kata_tests::registry::{layout_on_top, Layer, Registry};
use kata_tests::{init_logging, repo_root, wait_until};

/// The test's world: adaptor, registry (busybox pushed) and a containerd with
/// `kata-remote` that may pull from the registry.
struct World {
    env: CriContainerd,
    registry: Registry,
    adaptor: Adaptor,
    busybox: String,
}

impl World {
    fn start() -> Self {
        Self::start_with_reconnect(None)
    }

    /// The world with CNI pod networking (pods with network POD get a bridge address).
    fn start_with_cni() -> Self {
        Self::start_full(None, Networking::Cni)
    }

    /// The world with `agent_reconnect_timeout` set to `secs` (the shipped value if `None`).
    fn start_with_reconnect(secs: Option<u64>) -> Self {
        Self::start_full(secs, Networking::HostOnly)
    }

    fn start_full(secs: Option<u64>, networking: Networking) -> Self {
        init_logging();
        let busybox = repo_root().join("build/images/busybox.tar");
        assert!(busybox.is_file(), "run hack/build-test-images.sh");
        let mut adaptor = Adaptor::new();
        let registry_addr = SocketAddr::new(adaptor.gateway.into(), Registry::free_port());
        adaptor.start(&[registry_addr.to_string()], "");
        let registry = Registry::start_at(registry_addr);
        registry.push(
            &format!("oci-archive:{}", busybox.display()),
            "busybox:kata",
        );
        let shim = ShimInstall::new();
        let remote_config = shim.write_remote_config(&adaptor.socket);
        if let Some(secs) = secs {
            let text = std::fs::read_to_string(&remote_config).unwrap();
            let line = "agent_reconnect_timeout = 60";
            assert!(
                text.contains(line),
                "the remote configuration lacks {line:?}"
            );
            std::fs::write(
                &remote_config,
                text.replace(line, &format!("agent_reconnect_timeout = {secs}")),
            )
            .unwrap();
        }
        let env = CriContainerd::for_remote_with(shim, &remote_config, networking);
        env.allow_insecure_registry(&registry.host());
        let busybox = format!("{}/busybox:kata", registry.host());
        env.client.pull_image(&busybox).or_panic(&env);
        Self {
            env,
            registry,
            adaptor,
            busybox,
        }
    }

    /// The one instance of the adaptor and its address (the local provider's record).
    fn instance(&self) -> (String, IpAddr) {
        let names = self.adaptor.instances();
        assert_eq!(names.len(), 1, "instances: {names:?}");
        let meta: serde_json::Value = serde_json::from_slice(
            &std::fs::read(self.adaptor.instances_dir.join(&names[0]).join("meta.json")).unwrap(),
        )
        .unwrap();
        (
            names[0].clone(),
            meta["address"].as_str().unwrap().parse().unwrap(),
        )
    }
}

/// The shim's lines in containerd's log (for failure messages).
fn shim_lines(env: &CriContainerd) -> String {
    env.ctd
        .log()
        .lines()
        .filter(|l| l.contains("source=runtime") || l.contains("containerd-shim-v2"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn unique(name: &str) -> String {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{name}-{}-{n}", std::process::id())
}

/// A configMap volume as the kubelet lays it out: `..<generation>/key`, `..data` linking
/// to the generation, `key` linking through `..data`.
struct ConfigMapDir {
    dir: PathBuf,
    generation: u32,
}

impl ConfigMapDir {
    fn create(pod_dir: &Path, value: &str) -> Self {
        let dir = pod_dir.join("volumes/kubernetes.io~configmap/cfg");
        std::fs::create_dir_all(&dir).unwrap();
        let mut this = Self { dir, generation: 0 };
        this.update(value);
        std::os::unix::fs::symlink("..data/key", this.dir.join("key")).unwrap();
        this
    }

    /// A new generation swapped in atomically (a renamed symlink), as the kubelet does.
    fn update(&mut self, value: &str) {
        self.generation += 1;
        let generation = format!("..2026_11_30_{:02}", self.generation);
        std::fs::create_dir(self.dir.join(&generation)).unwrap();
        std::fs::write(self.dir.join(&generation).join("key"), value).unwrap();
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&generation, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }
}

#[test]
fn kata_remote_pod_runs_with_images_pulled_in_the_vm_and_copied_volumes() {
    let w = World::start();
    let env = &w.env;
    let name = unique("pp-cri");
    let logs = tempfile::Builder::new()
        .prefix("kata-pp-logs-")
        .tempdir()
        .unwrap();
    let pod_dir = tempfile::Builder::new()
        .prefix("kata-pp-kubelet-")
        .tempdir()
        .unwrap();
    let mut cm = ConfigMapDir::create(pod_dir.path(), "value-1");
    let empty_dir = pod_dir.path().join("volumes/kubernetes.io~empty-dir/cache");
    std::fs::create_dir_all(&empty_dir).unwrap();
    std::fs::write(empty_dir.join("node-only"), b"stays on the node").unwrap();

    let t0 = std::time::Instant::now();
    let pod = env
        .client
        .run_pod_with(
            pod_config(&name, "pp-host", Some(logs.path())),
            KATA_REMOTE_HANDLER,
        )
        .or_panic(env);
    eprintln!("RunPodSandbox (kata-remote): {:?}", t0.elapsed());
    let (instance, vm_ip) = w.instance();
    assert!(
        instance.contains(&name),
        "instance {instance} does not name the pod {name}"
    );
    // No virtio-fs: no virtiofsd for the pod, no vhost-user-fs device on its QEMU.
    let qemu = w.adaptor.qemu_pid(&instance).expect("the instance's QEMU");
    let cmdline = String::from_utf8_lossy(&std::fs::read(format!("/proc/{qemu}/cmdline")).unwrap())
        .replace('\0', " ");
    assert!(!cmdline.contains("vhost-user-fs"), "{cmdline}");
    let virtiofsd: Vec<_> = kata_tests::processes_naming("virtiofsd")
        .into_iter()
        .filter(|(_, c)| c.contains(&pod.id) || c.contains(&instance))
        .collect();
    assert!(
        virtiofsd.is_empty(),
        "virtiofsd for a remote pod: {virtiofsd:?}"
    );

    let mounts = || {
        vec![
            api::Mount {
                readonly: true,
                ..bind_mount(&cm.dir, "/etc/cfg")
            },
            bind_mount(&empty_dir, "/cache"),
        ]
    };
    let gets_before = w.registry.blob_gets_from(vm_ip).len();
    let c1 = env
        .client
        .create_container_with(
            &pod,
            container_config(
                "app",
                &w.busybox,
                &[
                    "sh",
                    "-c",
                    "echo out-1; echo err-1 >&2; cat /etc/cfg/key; echo; echo shared > /cache/x; exec sleep 3600",
                ],
                mounts(),
            ),
        )
        .or_panic(env);
    // containerd creates the task (the shim's Create) at StartContainer.
    env.client.start_container(&c1).or_panic(env);
    // The image came into the VM from the registry, fetched from the VM's address.
    let gets = w.registry.blob_gets_from(vm_ip);
    assert!(
        gets.len() > gets_before,
        "no blob GET from the VM's address {vm_ip}:\n{}\nshim:\n{}",
        w.registry.log(),
        shim_lines(env)
    );
    // containerd's host rootfs of the container is not mounted: the shim ignored it.
    let host_rootfs_mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&format!("/{c1}/rootfs")))
        .map(str::to_owned)
        .collect();
    assert!(host_rootfs_mounts.is_empty(), "{host_rootfs_mounts:?}");

    let c2 = env
        .client
        .create_container_with(
            &pod,
            container_config(
                "check",
                &w.busybox,
                &[
                    "sh",
                    "-c",
                    "while [ ! -e /cache/x ]; do sleep 0.2; done; cat /cache/x; ls /cache; exit 3",
                ],
                mounts(),
            ),
        )
        .or_panic(env);
    env.client.start_container(&c2).or_panic(env);

    // Exit codes: the second container ends with 3 after reading what the first wrote into
    // the pod's emptyDir in the VM (created empty: the node's file is not there).
    let st = env
        .client
        .wait_exited(&c2, Duration::from_secs(120))
        .or_panic(env);
    assert_eq!(st.exit_code, 3, "{st:?}");
    let check_log = logs.path().join("check.log");
    let out2 = log_text(&check_log, "stdout");
    assert!(out2.contains("shared\n"), "{out2:?}");
    assert!(
        out2.contains("x\n") && !out2.contains("node-only"),
        "{out2:?}"
    );

    // Logs of the first container, both streams, and the configMap's value in the VM.
    let app_log = logs.path().join("app.log");
    let arrived = wait_until(Duration::from_secs(30), || {
        log_text(&app_log, "stdout").contains("value-1")
            && log_text(&app_log, "stderr").contains("err-1\n")
    });
    assert!(
        arrived,
        "stdout {:?} stderr {:?}",
        log_text(&app_log, "stdout"),
        log_text(&app_log, "stderr")
    );
    assert!(log_text(&app_log, "stdout").starts_with("out-1\n"));

    // ExecSync: output and exit codes.
    let (code, out, _) = env
        .client
        .exec_sync(&c1, &["cat", "/etc/cfg/key"])
        .or_panic(env);
    assert_eq!((code, out.as_str()), (0, "value-1"));
    let (code, _, err) = env
        .client
        .exec_sync(&c1, &["sh", "-c", "echo bad >&2; exit 7"])
        .or_panic(env);
    assert_eq!((code, err.as_str()), (7, "bad\n"));
    // The root is the image's, in the VM; the configMap is read-only there.
    let (code, out, _) = env
        .client
        .exec_sync(&c1, &["sh", "-c", "touch /etc/cfg/new 2>&1; echo $?"])
        .or_panic(env);
    assert_eq!(code, 0);
    assert!(
        out.trim_end().ends_with('1'),
        "write to a read-only configMap: {out}"
    );

    // A configMap update on the node reaches the container.
    cm.update("value-2");
    let mut last = String::new();
    let updated = wait_until(Duration::from_secs(30), || {
        last = env
            .client
            .exec_sync(&c1, &["cat", "/etc/cfg/key"])
            .map(|(_, out, _)| out)
            .unwrap_or_default();
        last == "value-2"
    });
    assert!(updated, "the configMap update did not arrive: {last:?}");

    // Teardown through CRI: the instance goes with the pod.
    env.client.stop_container(&c1, 5).or_panic(env);
    let st = env.client.container_status(&c1).or_panic(env);
    // SIGTERM ends sleep (not the pid namespace's init: the pod shares one).
    assert_eq!(st.exit_code, 143, "{st:?}");
    env.client.remove_container(&c1).or_panic(env);
    env.client.remove_container(&c2).or_panic(env);
    env.client.stop_pod(&pod.id).or_panic(env);
    env.client.remove_pod(&pod.id).or_panic(env);
    w.adaptor.assert_no_instances();
    kata_tests::assert_no_runtime_leaks(&[&pod.id, &c1, &c2]);
}

#[test]
fn kata_remote_bad_inputs_are_named_and_leave_nothing() {
    let mut w = World::start();
    let env = &w.env;

    // An image containerd has on the node but the registry no longer serves: the pull in
    // the VM fails and says so.
    let busybox_tar = repo_root().join("build/images/busybox.tar");
    let layout = tempfile::tempdir().unwrap();
    let layer = Layer::gzip(&[("gone-marker", Some(b"x".as_slice()))]);
    layout_on_top(&busybox_tar, &[layer], layout.path(), "kata");
    w.registry.push(
        &format!("oci:{}:kata", layout.path().display()),
        "gone:kata",
    );
    let gone = format!("{}/gone:kata", w.registry.host());
    env.client.pull_image(&gone).or_panic(env);
    sh(
        "skopeo",
        &["delete", "--tls-verify=false", &format!("docker://{gone}")],
    );
    let name = unique("pp-bad");
    let pod = env
        .client
        .run_pod_with(pod_config(&name, "pp-bad", None), KATA_REMOTE_HANDLER)
        .or_panic(env);
    let bad = env
        .client
        .create_container_with(&pod, container_config("gone", &gone, &["true"], vec![]))
        .or_panic(env);
    // The shim's Create (and so the pull) runs at StartContainer.
    let e = env.client.start_container(&bad).unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.contains(&gone) && e.contains("in the VM") && e.contains("NotFound"),
        "the error does not name the image: {e}"
    );
    eprintln!("missing image: {e}");
    env.client.remove_container(&bad).or_panic(env);
    // The pod still works after the refused container.
    let ok = env
        .client
        .create_container_with(
            &pod,
            container_config("ok", &w.busybox, &["sleep", "3600"], vec![]),
        )
        .or_panic(env);
    env.client.start_container(&ok).or_panic(env);
    let (code, out, _) = env.client.exec_sync(&ok, &["echo", "fine"]).or_panic(env);
    assert_eq!((code, out.as_str()), (0, "fine\n"));
    // An update that would grow the VM: a remote VM was sized for the pod and cannot be
    // hot-plugged; the refusal says how to size the pod VM instead, and the container
    // runs on with its old limits.
    let e = env
        .client
        .update_container_resources(
            &ok,
            api::LinuxContainerResources {
                memory_limit_in_bytes: 8 << 30,
                cpu_period: 100_000,
                cpu_quota: 400_000,
                ..Default::default()
            },
        )
        .unwrap_err();
    let e = format!("{e:#}");
    eprintln!("hotplug needed: {e}");
    assert!(
        e.contains("cannot be hot-plugged") && e.contains("default_memory"),
        "the refusal does not name the missing hotplug: {e}"
    );
    let (code, _, _) = env.client.exec_sync(&ok, &["true"]).or_panic(env);
    assert_eq!(code, 0);
    env.client.stop_container(&ok, 2).or_panic(env);
    env.client.remove_container(&ok).or_panic(env);
    env.client.stop_pod(&pod.id).or_panic(env);
    env.client.remove_pod(&pod.id).or_panic(env);
    w.adaptor.assert_no_instances();
    kata_tests::assert_no_runtime_leaks(&[&pod.id, &ok, &bad]);

    // A machine type outside the adaptor's allow-list: RunPodSandbox fails naming it and
    // the allowed types; no instance, pod or shim is left.
    let name = unique("pp-size");
    let mut sized = pod_config(&name, "pp-size", None);
    sized.annotations.insert(
        "io.katacontainers.config.hypervisor.machine_type".to_owned(),
        "enormous".to_owned(),
    );
    let e = format!(
        "{:#}",
        env.client
            .run_pod_with(sized, KATA_REMOTE_HANDLER)
            .unwrap_err()
    );
    eprintln!("disallowed machine type: {e}");
    assert!(
        e.contains("enormous") && e.contains("tiny"),
        "the refusal does not name the type and the allowed ones: {e}"
    );
    w.adaptor.assert_no_instances();

    // The adaptor is not running: RunPodSandbox fails naming its socket, nothing is left.
    w.adaptor.stop();
    let env = &w.env;
    let name = unique("pp-noadaptor");
    let e = env
        .client
        .run_pod_with(pod_config(&name, "pp-x", None), KATA_REMOTE_HANDLER)
        .unwrap_err();
    let e = format!("{e:#}");
    eprintln!("no adaptor: {e}");
    let socket = w.adaptor.socket.display().to_string();
    assert!(
        e.contains(&socket) && e.contains("adaptor"),
        "the error does not name the adaptor's socket {socket}: {e}"
    );
    let pods = env.client.list_pods().or_panic(env);
    assert!(
        pods.iter()
            .all(|p| p.metadata.as_ref().is_none_or(|m| m.name != name)),
        "{pods:?}"
    );
    let shims = || -> Vec<_> {
        kata_tests::processes_naming(&env.ctd.socket().display().to_string())
            .into_iter()
            .filter(|(_, c)| c.contains("containerd-shim-kata-v2"))
            .collect()
    };
    // The failed sandbox's shim is shut down by containerd right after the error.
    wait_until(Duration::from_secs(15), || shims().is_empty());
    assert!(shims().is_empty(), "shims left: {:?}", shims());
    w.adaptor.assert_no_instances();
}

#[test]
fn a_killed_shims_remote_vm_is_deleted_by_the_cleanup() {
    let w = World::start();
    let env = &w.env;
    let name = unique("pp-kill");
    let pod = env
        .client
        .run_pod_with(pod_config(&name, "pp-kill", None), KATA_REMOTE_HANDLER)
        .or_panic(env);
    let c = env
        .client
        .create_container_with(
            &pod,
            container_config("app", &w.busybox, &["sleep", "3600"], vec![]),
        )
        .or_panic(env);
    env.client.start_container(&c).or_panic(env);
    assert_eq!(w.adaptor.instances().len(), 1);
    let shims: Vec<i32> = kata_tests::processes_naming(&pod.id)
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("containerd-shim-kata-v2") && cmd.contains(" -id "))
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(shims.len(), 1, "the pod's shim: {shims:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shims[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // containerd runs the shim's `delete` cleanup, which calls StopVM: the adaptor (which
    // does not watch pods while it runs) deletes the instance.
    let deleted = wait_until(Duration::from_secs(60), || w.adaptor.instances().is_empty());
    assert!(
        deleted,
        "the instance outlived its killed shim: {:?}\nadaptor log:\n{}",
        w.adaptor.instances(),
        w.adaptor.log()
    );
    let _ = env.client.stop_container(&c, 2);
    let _ = env.client.remove_container(&c);
    env.client.stop_pod(&pod.id).or_panic(env);
    env.client.remove_pod(&pod.id).or_panic(env);
    w.adaptor.assert_no_instances();
    kata_tests::assert_no_runtime_leaks(&[&pod.id, &c]);
}

/// The numbers of the `tick-<n>` lines of a CRI log.
fn ticks(log: &Path) -> Vec<u64> {
    log_text(log, "stdout")
        .lines()
        .filter_map(|l| l.strip_prefix("tick-")?.parse().ok())
        .collect()
}

/// A pod whose container prints `tick-<n>` every 0.5 s: (pod, container, its log).
fn ticking_pod(w: &World, name: &str, logs: &Path) -> (kata_tests::cri::Pod, String, PathBuf) {
    let env = &w.env;
    let pod = env
        .client
        .run_pod_with(
            pod_config(name, "pp-redial", Some(logs)),
            KATA_REMOTE_HANDLER,
        )
        .or_panic(env);
    let c = env
        .client
        .create_container_with(
            &pod,
            container_config(
                "ticker",
                &w.busybox,
                &[
                    "sh",
                    "-c",
                    "i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.5; done",
                ],
                vec![],
            ),
        )
        .or_panic(env);
    env.client.start_container(&c).or_panic(env);
    let log = logs.join("ticker.log");
    assert!(
        wait_until(Duration::from_secs(60), || ticks(&log).len() >= 3),
        "no ticks: {:?}\n{}",
        log_text(&log, "stdout"),
        shim_lines(env)
    );
    (pod, c, log)
}

#[test]
fn a_restarted_adaptor_is_dialed_again_and_the_pod_keeps_running() {
    let mut w = World::start();
    let name = unique("pp-redial");
    let logs = tempfile::Builder::new()
        .prefix("kata-pp-logs-")
        .tempdir()
        .unwrap();
    let (pod, c, log) = ticking_pod(&w, &name, logs.path());
    let instance = w.instance().0;

    // SIGKILL: the adaptor's agent socket and its relays to the VM vanish at once.
    w.adaptor.kill();
    std::thread::sleep(Duration::from_secs(3));
    w.adaptor.spawn();
    let env = &w.env;

    // Calls work again (ExecSync: ExecProcess, StartProcess, WaitProcess and stdio).
    let (code, out, err) = env
        .client
        .exec_sync(&c, &["echo", "after-restart"])
        .or_panic(env);
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (0, "after-restart\n", ""),
        "{}",
        shim_lines(env)
    );
    // The container's output is attached again: its log keeps growing.
    let seen = ticks(&log).last().copied().unwrap_or(0);
    assert!(
        wait_until(Duration::from_secs(60), || ticks(&log)
            .last()
            .is_some_and(|n| *n >= seen + 4)),
        "the log stopped at tick {seen}: {:?}\n{}",
        ticks(&log),
        shim_lines(env)
    );
    // No line twice, none out of order (lines in flight in the killed adaptor may be lost).
    let all = ticks(&log);
    assert!(
        all.windows(2).all(|p| p[0] < p[1]),
        "ticks repeated or out of order: {all:?}"
    );
    let st = env.client.container_status(&c).or_panic(env);
    assert_eq!(
        st.state,
        api::ContainerState::ContainerRunning as i32,
        "{st:?}\n{}",
        shim_lines(env)
    );
    assert_eq!(w.adaptor.instances(), vec![instance]);
    assert!(
        shim_lines(env).contains("agent connection re-established"),
        "{}",
        shim_lines(env)
    );

    env.client.stop_container(&c, 2).or_panic(env);
    env.client.remove_container(&c).or_panic(env);
    env.client.stop_pod(&pod.id).or_panic(env);
    env.client.remove_pod(&pod.id).or_panic(env);
    assert!(
        wait_until(Duration::from_secs(30), || w.adaptor.instances().is_empty()),
        "the instance outlived its pod: {:?}\nadaptor log:\n{}",
        w.adaptor.instances(),
        w.adaptor.plain_log()
    );
    w.adaptor.assert_no_instances();
    kata_tests::assert_no_runtime_leaks(&[&pod.id, &c]);
}

#[test]
fn an_adaptor_not_back_within_the_reconnect_bound_ends_the_pod() {
    let mut w = World::start_with_reconnect(Some(5));
    let name = unique("pp-redial-bound");
    let logs = tempfile::Builder::new()
        .prefix("kata-pp-logs-")
        .tempdir()
        .unwrap();
    let (pod, c, _log) = ticking_pod(&w, &name, logs.path());

    w.adaptor.kill();
    let env = &w.env;
    // The shim dials for 5 s, then ends the pod as for a lost agent.
    let exited = wait_until(Duration::from_secs(60), || {
        env.client
            .container_status(&c)
            .is_ok_and(|st| st.state == api::ContainerState::ContainerExited as i32)
    });
    assert!(exited, "the container still runs\n{}", shim_lines(env));
    let st = env.client.container_status(&c).or_panic(env);
    assert_eq!(st.exit_code, 137, "{st:?}");
    let shim = shim_lines(env);
    assert!(
        shim.contains("could not be re-established within 5s"),
        "the reason does not name the bound:\n{shim}"
    );

    // The adaptor comes back: the pod's removal deletes the instance.
    w.adaptor.spawn();
    let env = &w.env;
    let _ = env.client.stop_container(&c, 2);
    env.client.remove_container(&c).or_panic(env);
    env.client.stop_pod(&pod.id).or_panic(env);
    env.client.remove_pod(&pod.id).or_panic(env);
    assert!(
        wait_until(Duration::from_secs(30), || w.adaptor.instances().is_empty()),
        "the instance outlived its pod: {:?}\nadaptor log:\n{}",
        w.adaptor.instances(),
        w.adaptor.plain_log()
    );
    w.adaptor.assert_no_instances();
    kata_tests::assert_no_runtime_leaks(&[&pod.id, &c]);
}

/// A kata-remote pod on the CNI bridge: its address lives in the pod VM (reached through
/// the adaptor's VXLAN tunnel from the pod's network namespace on the node), and the host
/// fetches a page from the pod's httpd at that address.
#[test]
fn a_kata_remote_pod_on_the_cni_network_is_reached_at_its_pod_ip() {
    let w = World::start_with_cni();
    let env = &w.env;
    let name = unique("pp-net");
    let config = with_network_mode(pod_config(&name, "pp-net", None), api::NamespaceMode::Pod);
    let pod = env
        .client
        .run_pod_with(config, KATA_REMOTE_HANDLER)
        .or_panic(env);
    let status = env.client.pod_status(&pod.id).or_panic(env);
    let ip = pod_ip(&status).unwrap_or_else(|e| panic!("pod {name}: {e:#}"));
    let page = format!("hello-from-{name}");
    let script =
        format!("mkdir -p /tmp/www && echo {page} > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www");
    let web = env
        .client
        .create_container_with(
            &pod,
            container_config("web", &w.busybox, &["sh", "-c", &script], vec![]),
        )
        .or_panic(env);
    env.client.start_container(&web).or_panic(env);
    // The pod's address is inside the VM: the container sees it on its interface.
    let (code, addrs, _) = env
        .client
        .exec_sync(&web, &["ip", "-4", "addr"])
        .or_panic(env);
    assert_eq!(code, 0);
    assert!(
        addrs.contains(&ip.to_string()),
        "pod IP {ip} not in the container: {addrs}"
    );
    let mut last = String::new();
    let fetched = wait_until(Duration::from_secs(30), || {
        use std::io::{Read, Write};
        let Ok(mut conn) =
            std::net::TcpStream::connect_timeout(&(ip, 8080).into(), Duration::from_secs(3))
        else {
            return false;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
        if conn.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").is_err() {
            return false;
        }
        last.clear();
        let _ = conn.read_to_string(&mut last);
        last.contains(&page)
    });
    assert!(
        fetched,
        "no page from the pod at {ip}:8080: {last:?}\n{}",
        shim_lines(env)
    );
    env.client.stop_container(&web, 2).or_panic(env);
    env.client.remove_container(&web).or_panic(env);
    env.client.stop_pod(&pod.id).or_panic(env);
    env.client.remove_pod(&pod.id).or_panic(env);
    w.adaptor.assert_no_instances();
    kata_tests::assert_no_runtime_leaks(&[&pod.id, &web]);
}
