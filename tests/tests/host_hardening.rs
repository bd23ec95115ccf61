//! How the host side of a running pod is locked down, checked on a real VM through real
//! containerd: QEMU runs under its seccomp filter; virtiofsd keeps its own mount namespace
//! and its seccomp filter; the sandbox's state and run directories are owner-only and its
//! sockets 0600.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::Duration;

use kata_tests::containerd::{text, Containerd, ShimInstall, BUSYBOX, KATA_RUNTIME};
use kata_tests::wait_until;

/// `Seccomp:` of /proc/<pid>/status (0 off, 2 filter).
fn seccomp_mode(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn mount_ns(pid: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
        .unwrap()
        .display()
        .to_string()
}

#[test]
fn vm_processes_are_confined_and_their_files_private() {
    kata_tests::init_logging();
    let shim = ShimInstall::new();
    let ctd = Containerd::start_with_env(
        shim.bin_dir(),
        &[("KATA_CONF_FILE", shim.config_path().as_path())],
    );
    let id = format!("hardened-{}", std::process::id());
    let out = ctd.ctr(&[
        "run",
        "-d",
        "--runtime",
        KATA_RUNTIME,
        BUSYBOX,
        &id,
        "sleep",
        "1000",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let run_dir = format!("/run/kata/{id}/vm");
    assert!(wait_until(Duration::from_secs(60), || {
        kata_tests::processes_naming(&run_dir).len() >= 3
    }));
    let procs = kata_tests::processes_naming(&run_dir);
    let qemu = procs
        .iter()
        .find(|(_, c)| c.contains("qemu-system"))
        .expect("QEMU");
    assert_eq!(
        seccomp_mode(qemu.0),
        "2",
        "QEMU runs without its seccomp filter"
    );
    assert!(qemu.1.contains("-sandbox on,"), "{}", qemu.1);

    // virtiofsd forks into its sandbox: the serving process has its own mount namespace
    // and a seccomp filter.
    let host_ns = mount_ns(std::process::id() as i32);
    let virtiofsd: Vec<_> = procs
        .iter()
        .filter(|(_, c)| c.contains("virtiofsd"))
        .collect();
    assert!(!virtiofsd.is_empty(), "no virtiofsd: {procs:?}");
    assert!(
        virtiofsd
            .iter()
            .any(|(pid, _)| seccomp_mode(*pid) == "2" && mount_ns(*pid) != host_ns),
        "no virtiofsd process is both filtered and in a mount namespace of its own: {:?}",
        virtiofsd
            .iter()
            .map(|(p, _)| (p, seccomp_mode(*p), mount_ns(*p)))
            .collect::<Vec<_>>()
    );

    for dir in [format!("/run/kata/{id}"), run_dir.clone()] {
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{dir} is {mode:o}");
    }
    let mut sockets = 0;
    for entry in std::fs::read_dir(&run_dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_socket() {
            sockets += 1;
            let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{} is {mode:o}", entry.path().display());
        }
    }
    assert!(sockets >= 4, "expected QMP, vsock and virtiofsd sockets");

    let _ = ctd.ctr(&["task", "kill", "-s", "SIGKILL", &id]);
    assert!(wait_until(Duration::from_secs(30), || {
        let out = ctd.ctr(&["task", "ls"]);
        text(&out).contains("STOPPED")
    }));
    let out = ctd.ctr(&["task", "delete", &id]);
    assert!(out.status.success(), "{}", text(&out));
    let out = ctd.ctr(&["container", "delete", &id]);
    assert!(out.status.success(), "{}", text(&out));
    kata_tests::assert_no_runtime_leaks(&[&id]);
}
