//! End-to-end: boot the real guest image under QEMU (TCG on hosts without usable KVM),
//! reach the agent over vsock, share a directory through virtio-fs, and tear down leaving
//! nothing behind.

use std::time::Duration;

use kata_hypervisor::{Accel, GuestRoot, Vm, VsockMode};
use kata_shim::sandbox::agent::{shared_fs_storage, AgentClient, GUEST_SHARED_DIR};
use kata_tests::{init_logging, wait_until, GuestImage, KernelFlavour, TestVm};

const DIAL_TIMEOUT: Duration = Duration::from_secs(60);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

fn host_kernel_release() -> String {
    nix::sys::utsname::uname()
        .unwrap()
        .release()
        .to_string_lossy()
        .into_owned()
}

/// Boots, checks health and version, compares the guest's view with the image, stops.
async fn boot_and_check(vsock: VsockMode) {
    init_logging();
    let mut t = TestVm::new(&format!("boot-{vsock:?}").to_lowercase());
    t.config.vsock = vsock;
    let leaks = t.leak_check();
    let vm = Vm::start(t.config.clone()).await.expect("VM starts");
    let agent = AgentClient::connect(&vm, DIAL_TIMEOUT, REQUEST_TIMEOUT)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "agent reachable: {e:?}\nconsole:\n{}",
                vm.console_tail().join("\n")
            )
        });

    assert!(agent.health_check().await.unwrap());
    let version = agent.version().await.unwrap();
    assert_eq!(version.grpc_version, kata_proto::PROTOCOL_VERSION);
    assert!(!version.agent_version.is_empty());

    let details = agent.guest_details().await.unwrap();
    let image = GuestImage::find();
    assert_eq!(details.kernel_release, image.kernel_release);
    assert_ne!(
        details.kernel_release,
        host_kernel_release(),
        "a guest kernel, not the host's"
    );
    assert_eq!(details.online_cpus, 1);
    // 512 MiB of RAM minus what the kernel reserves.
    assert!(
        (400 * 1024..=512 * 1024).contains(&details.mem_total_kib),
        "MemTotal {} KiB for a 512 MiB VM",
        details.mem_total_kib
    );
    assert!(details.mem_block_size_bytes.is_power_of_two());
    match image.flavour {
        // Everything is built in: the agent loads nothing.
        KernelFlavour::Kata => assert!(
            details.loaded_modules.is_empty(),
            "{:?}",
            details.loaded_modules
        ),
        KernelFlavour::Debian => {
            for module in ["vmw_vsock_virtio_transport", "virtiofs", "virtio_pci"] {
                assert!(
                    details.loaded_modules.iter().any(|m| m == module),
                    "{module} not in {:?}",
                    details.loaded_modules
                );
            }
        }
    }
    if !std::fs::read_to_string("/proc/cpuinfo")
        .unwrap()
        .contains(" vmx")
    {
        assert_eq!(vm.accel(), Accel::Tcg);
    }

    let qemu_pid = vm.pid();
    let report = vm.stop(STOP_TIMEOUT).await.expect("graceful stop");
    assert_eq!(report.exit_code(), 0, "QEMU quit cleanly: {report:?}");
    assert!(!std::path::Path::new(&format!("/proc/{qemu_pid}")).exists());
    leaks.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_answers_over_vsock_in_this_hosts_mode() {
    boot_and_check(VsockMode::Auto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_answers_over_hybrid_vsock() {
    boot_and_check(VsockMode::Hybrid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_file_in_shared_dir_is_read_back_through_the_agent() {
    init_logging();
    let t = TestVm::new("virtiofs").with_shared_dir();
    let leaks = t.leak_check();
    let before = format!("written before boot {}\n", std::process::id());
    std::fs::write(t.shared_dir().join("before.txt"), &before).unwrap();

    let vm = Vm::start(t.config.clone()).await.expect("VM starts");
    let agent = AgentClient::connect(&vm, DIAL_TIMEOUT, REQUEST_TIMEOUT)
        .await
        .unwrap();
    agent.add_storages(vec![shared_fs_storage()]).await.unwrap();
    // Mounting twice is idempotent.
    agent.add_storages(vec![shared_fs_storage()]).await.unwrap();

    let got = agent
        .read_file(&format!("{GUEST_SHARED_DIR}/before.txt"), 4096)
        .await
        .unwrap();
    assert_eq!(String::from_utf8(got).unwrap(), before);

    // A file created after the mount is visible too, byte for byte.
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::create_dir(t.shared_dir().join("sub")).unwrap();
    std::fs::write(t.shared_dir().join("sub/after.bin"), &payload).unwrap();
    let got = agent
        .read_file(&format!("{GUEST_SHARED_DIR}/sub/after.bin"), 1 << 20)
        .await
        .unwrap();
    assert!(got == payload, "200 KB file differs after the round trip");

    // The agent enforces its own limits.
    let err = agent
        .read_file(&format!("{GUEST_SHARED_DIR}/sub/after.bin"), 10)
        .await
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("InvalidArgument")
            || format!("{err:?}").contains("INVALID_ARGUMENT"),
        "{err:?}"
    );
    let err = agent.read_file("/etc/passwd", 4096).await.unwrap_err();
    assert!(format!("{err:?}").contains("INVALID_ARGUMENT"), "{err:?}");

    vm.stop(STOP_TIMEOUT).await.expect("graceful stop");
    leaks.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_shutdown_powers_the_vm_off() {
    init_logging();
    let t = TestVm::new("poweroff").with_shared_dir();
    let leaks = t.leak_check();
    let vm = Vm::start(t.config.clone()).await.expect("VM starts");
    let agent = AgentClient::connect(&vm, DIAL_TIMEOUT, REQUEST_TIMEOUT)
        .await
        .unwrap();
    agent.add_storages(vec![shared_fs_storage()]).await.unwrap();
    let qemu_pid = vm.pid();
    agent.shutdown().await.unwrap();
    // QEMU exits by itself (guest power-off with -no-reboot) ...
    assert!(
        wait_until(Duration::from_secs(30), || {
            std::fs::read_to_string(format!("/proc/{qemu_pid}/stat"))
                .map(|s| s.contains(") Z"))
                .unwrap_or(true)
        }),
        "QEMU still running 30 s after the agent powered off"
    );
    // ... and stop() still reaps it and the daemons and cleans up.
    let report = vm.stop(STOP_TIMEOUT).await.expect("stop after power-off");
    assert_eq!(report.exit_code(), 0, "{report:?}");
    leaks.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_running_vm_leaves_nothing() {
    init_logging();
    let t = TestVm::new("drop").with_shared_dir();
    let leaks = t.leak_check();
    let vm = Vm::start(t.config.clone()).await.expect("VM starts");
    let pid = vm.pid();
    assert!(
        !leaks.processes().is_empty(),
        "QEMU and daemons are running"
    );
    drop(vm);
    leaks.assert_clean();
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}

#[tokio::test]
async fn missing_kernel_is_named_and_nothing_is_left() {
    let mut t = TestVm::new("nokernel").with_shared_dir();
    let leaks = t.leak_check();
    t.config.kernel = t.scratch.path().join("no-such-vmlinuz");
    let err = Vm::start(t.config.clone()).await.unwrap_err();
    let msg = error_chain(&err);
    assert!(msg.contains("no-such-vmlinuz"), "{msg}");
    leaks.assert_clean();
}

#[tokio::test]
async fn qemu_start_failure_carries_qemus_message() {
    let mut t = TestVm::new("badqemu").with_shared_dir();
    let leaks = t.leak_check();
    // A file that exists but is no kernel: QEMU itself refuses it at start.
    let bogus = t.scratch.path().join("bogus-kernel");
    std::fs::write(&bogus, vec![0u8; 4096]).unwrap();
    t.config.kernel = bogus;
    // With an initrd, which QEMU refuses to load for such a "kernel".
    t.config.root = GuestRoot::Initrd(GuestImage::find().initrd);
    let err = Vm::start(t.config.clone()).await.unwrap_err();
    let msg = error_chain(&err);
    // QEMU says "qemu: linux kernel too old to load a ram disk".
    assert!(
        msg.contains("kernel too old to load a ram disk"),
        "QEMU's own message missing: {msg}"
    );
    leaks.assert_clean();
}

#[tokio::test]
async fn bad_sizes_are_rejected_before_anything_starts() {
    let mut t = TestVm::new("badsize");
    let leaks = t.leak_check();
    t.config.memory_mib = 8192;
    t.config.max_memory_mib = 4096;
    let err = Vm::start(t.config.clone()).await.unwrap_err();
    let msg = error_chain(&err);
    assert!(msg.contains("8192") && msg.contains("4096"), "{msg}");
    leaks.assert_clean();
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_vsock_daemon_is_reported_not_waited_out() {
    init_logging();
    let mut t = TestVm::new("deadvsock");
    t.config.vsock = VsockMode::Hybrid;
    let leaks = t.leak_check();
    let vm = Vm::start(t.config.clone()).await.expect("VM starts");
    let (pid, _) = leaks
        .processes()
        .into_iter()
        .find(|(_, cmdline)| cmdline.contains("vhost-device-vsock"))
        .expect("the hybrid vsock daemon runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // With a 5-minute dial timeout, only the daemon's death can end this early.
    let err = vm
        .connect(kata_proto::AGENT_VSOCK_PORT, Duration::from_secs(300))
        .await
        .unwrap_err();
    let msg = error_chain(&err);
    assert!(
        msg.contains("vhost-device-vsock exited") && msg.contains("SIGKILL"),
        "{msg}"
    );
    vm.stop(STOP_TIMEOUT)
        .await
        .expect("stop with a dead daemon");
    leaks.assert_clean();
}
