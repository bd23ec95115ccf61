//! End-to-end checks of what the guest enforces, through a test-owned containerd and `ctr`
//! (real VMs), each also run with runc where the behaviour overlaps: process sizes up to
//! Linux's execve limits and refusals beyond them, the seccomp profile, the device cgroup,
//! mount targets through symlinks; and, through the agent protocol of a booted VM, storage
//! mount points that go through a symlink. Each test ends with a leak check.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use kata_hypervisor::Vm;
use kata_shim::sandbox::agent::{shared_fs_storage, AgentClient, GUEST_SHARED_DIR};
use kata_tests::containerd::{text, Containerd, ShimInstall, BUSYBOX, KATA_RUNTIME, RUNC_RUNTIME};
use kata_tests::{init_logging, wait_until, TestVm};

/// A containerd for one runtime: for ours, with the shim on its PATH and the test
/// configuration (plus `extra_config`) in KATA_CONF_FILE.
struct Env {
    // Field order: containerd stops before the shim directory goes away.
    ctd: Containerd,
    _shim: Option<ShimInstall>,
    runtime: &'static str,
    scratch: tempfile::TempDir,
}

impl Env {
    fn new(runtime: &'static str) -> Self {
        Self::with_config(runtime, "")
    }

    fn with_config(runtime: &'static str, extra_config: &str) -> Self {
        let scratch = tempfile::Builder::new()
            .prefix("kata-hardening-")
            .tempdir()
            .unwrap();
        if runtime == RUNC_RUNTIME {
            return Self {
                ctd: Containerd::start(&std::env::temp_dir()),
                _shim: None,
                runtime,
                scratch,
            };
        }
        let shim = ShimInstall::new();
        if !extra_config.is_empty() {
            let mut config = std::fs::read_to_string(shim.config_path()).unwrap();
            config.push_str(extra_config);
            std::fs::write(shim.config_path(), config).unwrap();
        }
        let ctd = Containerd::start_with_env(
            shim.bin_dir(),
            &[("KATA_CONF_FILE", shim.config_path().as_path())],
        );
        Self {
            ctd,
            _shim: Some(shim),
            runtime,
            scratch,
        }
    }

    fn is_kata(&self) -> bool {
        self.runtime == KATA_RUNTIME
    }

    /// `ctr run --rm --runtime <rt> <extra...> busybox <id> <cmd...>`.
    fn run(&self, id: &str, extra: &[&str], cmd: &[&str]) -> Output {
        let mut args = vec!["run", "--rm", "--runtime", self.runtime];
        args.extend_from_slice(extra);
        args.push(BUSYBOX);
        args.push(id);
        args.extend_from_slice(cmd);
        self.ctd.ctr(&args)
    }

    /// `ctr run --rm --config <spec>` with containerd's default spec (`ctr oci spec`) edited
    /// by `edit`, on a rootfs of the host's static busybox: for strings `ctr`'s own flags
    /// cannot carry (its `--env-file` lines stop at 64 KiB, its own argv at 128 KiB).
    fn run_spec(&self, id: &str, edit: impl FnOnce(&mut serde_json::Value)) -> Output {
        let rootfs = self.scratch.path().join("rootfs");
        if !rootfs.exists() {
            std::fs::create_dir_all(rootfs.join("bin")).unwrap();
            std::fs::copy("/usr/bin/busybox", rootfs.join("bin/busybox")).unwrap();
            for applet in ["sh", "echo", "cat"] {
                std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
            }
            for dir in ["proc", "sys", "dev", "tmp", "etc"] {
                std::fs::create_dir_all(rootfs.join(dir)).unwrap();
            }
        }
        let out = self.ctd.ctr(&["oci", "spec"]);
        assert!(out.status.success(), "{}", text(&out));
        let mut spec: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        spec["root"] = serde_json::json!({"path": rootfs, "readonly": false});
        spec["process"]["env"] = serde_json::json!(["PATH=/bin"]);
        // A cgroup of its own, as ctr gives a container it makes the spec for (the
        // generated spec's "/default" would be shared by every container).
        spec["linux"]["cgroupsPath"] = serde_json::json!(format!("/kata-test/{id}"));
        edit(&mut spec);
        let path = self.scratch.path().join(format!("{id}.json"));
        std::fs::write(&path, serde_json::to_vec(&spec).unwrap()).unwrap();
        self.ctd.ctr(&[
            "run",
            "--rm",
            "--runtime",
            self.runtime,
            "--config",
            path.to_str().unwrap(),
            id,
        ])
    }

    /// A file in this test's scratch directory.
    fn file(&self, name: &str, content: &str) -> PathBuf {
        let path = self.scratch.path().join(name);
        std::fs::write(&path, content).unwrap();
        path
    }

    /// After a refused run: the container record is gone too, and nothing is left.
    fn assert_refused_and_clean(&self, id: &str) {
        let _ = self.ctd.ctr(&["task", "delete", "-f", id]);
        let _ = self.ctd.ctr(&["container", "delete", id]);
        let tasks = self.ctd.ctr(&["task", "ls", "-q"]);
        assert!(
            !String::from_utf8_lossy(&tasks.stdout).contains(id),
            "{}",
            text(&tasks)
        );
        kata_tests::assert_no_runtime_leaks(&[id]);
    }
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

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
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

/// An env file of `count` variables `BIG_<i>` whose entries take `entry` bytes each.
fn env_file(env: &Env, count: usize, entry: usize) -> PathBuf {
    let mut s = String::new();
    for i in 0..count {
        let key = format!("BIG_{i:05}=");
        s.push_str(&key);
        s.push_str(&"v".repeat(entry - key.len()));
        s.push('\n');
    }
    env.file("env", &s)
}

fn megabyte_environment(env: &Env) {
    let id = unique("env1m");
    // 1 MiB in 1024 variables of 1 KiB: beyond the old 192 KiB helper datagram.
    let file = env_file(env, 1024, 1024);
    let out = env.run(
        &id,
        &["--env-file", file.to_str().unwrap()],
        &["sh", "-c", "env | grep -c '^BIG_'; echo ${#BIG_01023}"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stdout(&out), "1024\n1014\n", "{}", text(&out));
    kata_tests::assert_no_runtime_leaks(&[&id]);
}

fn longest_single_string(env: &Env) {
    let id = unique("env128k");
    // "A=" + value + NUL = 131072 = MAX_ARG_STRLEN: the longest Linux takes.
    let value = "x".repeat(131072 - 3);
    let out = env.run_spec(&id, |spec| {
        spec["process"]["args"] = serde_json::json!(["sh", "-c", "echo ${#A}"]);
        spec["process"]["env"] = serde_json::json!(["PATH=/bin", format!("A={value}")]);
    });
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stdout(&out), "131069\n");
    kata_tests::assert_no_runtime_leaks(&[&id]);
}

fn oversized_string_is_refused(env: &Env) {
    let id = unique("env200k");
    let out = env.run_spec(&id, |spec| {
        spec["process"]["args"] = serde_json::json!(["sh", "-c", "echo ran"]);
        spec["process"]["env"] =
            serde_json::json!(["PATH=/bin", format!("A={}", "x".repeat(200 << 10))]);
    });
    assert!(!out.status.success(), "{}", text(&out));
    assert!(!stdout(&out).contains("ran"));
    if env.is_kata() {
        // Refused before anything is created, naming the limit and the size.
        let err = stderr(&out);
        assert!(
            err.contains("invalid argument")
                && err.contains("MAX_ARG_STRLEN")
                && err.contains("131072")
                && err.contains("204803")
                && err.contains("process.env[1]"),
            "{}",
            text(&out)
        );
    } else {
        assert!(
            stderr(&out).contains("argument list too long"),
            "{}",
            text(&out)
        );
    }
    env.assert_refused_and_clean(&id);
}

fn over_total_environment_is_refused(env: &Env) {
    let id = unique("env3m");
    let file = env_file(env, 3072, 1024);
    let out = env.run(
        &id,
        &["--env-file", file.to_str().unwrap()],
        &["sh", "-c", "echo ran"],
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(!stdout(&out).contains("ran"));
    if env.is_kata() {
        let err = stderr(&out);
        assert!(
            err.contains("invalid argument")
                && err.contains("2093056 bytes allowed")
                && err.contains("process.args and process.env take 31"),
            "{}",
            text(&out)
        );
    } else {
        assert!(
            stderr(&out).contains("argument list too long"),
            "{}",
            text(&out)
        );
    }
    env.assert_refused_and_clean(&id);
}

fn over_total_exec_is_refused_and_the_container_runs_on(env: &Env) {
    let id = unique("exec-big");
    // 1.9 MiB of environment runs; an exec adding 300 KiB of arguments does not.
    let file = env_file(env, 1900, 1024);
    let mut args = vec!["run", "-d", "--runtime", env.runtime, "--env-file"];
    args.push(file.to_str().unwrap());
    args.extend([BUSYBOX, &id, "sleep", "1000"]);
    let out = env.ctd.ctr(&args);
    assert!(out.status.success(), "{}", text(&out));
    assert!(wait_until(Duration::from_secs(60), || {
        let ls = env.ctd.ctr(&["task", "ls"]);
        stdout(&ls)
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("RUNNING"))
    }));
    let chunk = "y".repeat(100 << 10);
    let out = env.ctd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "big",
        &id,
        "echo",
        &chunk,
        &chunk,
        &chunk,
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    if env.is_kata() {
        assert!(
            stderr(&out).contains("invalid argument") && stderr(&out).contains("2093056"),
            "{}",
            text(&out)
        );
    } else {
        assert!(
            stderr(&out).contains("argument list too long"),
            "{}",
            text(&out)
        );
    }
    let out = env
        .ctd
        .ctr(&["task", "exec", "--exec-id", "small", &id, "echo", "still"]);
    assert_eq!(stdout(&out), "still\n", "{}", text(&out));
    let _ = env.ctd.ctr(&["task", "kill", "-s", "SIGKILL", &id]);
    wait_until(Duration::from_secs(30), || {
        !stdout(&env.ctd.ctr(&["task", "ls"])).contains("RUNNING")
    });
    let _ = env.ctd.ctr(&["task", "delete", &id]);
    let out = env.ctd.ctr(&["container", "delete", &id]);
    assert!(out.status.success(), "{}", text(&out));
    kata_tests::assert_no_runtime_leaks(&[&id]);
}

/// Denies mkdir/mkdirat with EXDEV (18), allows everything else.
const DENY_MKDIR: &str = r#"{
    "defaultAction": "SCMP_ACT_ALLOW",
    "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "syscalls": [
        {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 18}
    ]
}"#;

fn seccomp_profile_errno(env: &Env) {
    let id = unique("seccomp");
    let profile = env.file("profile.json", DENY_MKDIR);
    let out = env.run(
        &id,
        &["--seccomp", "--seccomp-profile", profile.to_str().unwrap()],
        &[
            "sh",
            "-c",
            "grep '^Seccomp:' /proc/self/status; mkdir /tmp/d; echo rc=$?; touch /tmp/f && echo touched",
        ],
    );
    let all = format!("{}{}", stdout(&out), stderr(&out));
    // The profile's errno (EXDEV), not EPERM: the profile and nothing else denied it.
    assert!(all.contains("Invalid cross-device link"), "{}", text(&out));
    assert!(all.contains("rc=1"), "{}", text(&out));
    assert!(all.contains("touched"), "{}", text(&out));
    assert!(all.contains("Seccomp:\t2"), "{}", text(&out));
    kata_tests::assert_no_runtime_leaks(&[&id]);
}

fn containerd_default_profile(env: &Env) {
    let id = unique("seccomp-default");
    let out = env.run(
        &id,
        &["--seccomp"],
        &[
            "sh",
            "-c",
            "grep '^Seccomp:' /proc/self/status; ls / >/dev/null && echo listed; unshare -U true; echo unshare=$?",
        ],
    );
    let all = format!("{}{}", stdout(&out), stderr(&out));
    assert!(out.status.success(), "{}", text(&out));
    assert!(all.contains("Seccomp:\t2"), "{}", text(&out));
    assert!(all.contains("listed"), "{}", text(&out));
    // unshare(CLONE_NEWUSER) is outside the default profile's allow list: EPERM.
    assert!(all.contains("unshare=1"), "{}", text(&out));
    kata_tests::assert_no_runtime_leaks(&[&id]);
}

fn device_cgroup(env: &Env) {
    let id = unique("devices");
    let out = env.run(
        &id,
        &[],
        &[
            "sh",
            "-c",
            "head -c 4 /dev/zero | wc -c; echo x >/dev/null && echo null-ok; \
             mknod /dev/t-kmsg c 1 11 && echo mknod-ok; \
             echo kata-test >/dev/t-kmsg && echo kmsg-written; \
             mknod /dev/t-sda b 8 0 && head -c 1 /dev/t-sda; true",
        ],
    );
    let (o, e) = (stdout(&out), stderr(&out));
    // Allowed: runc's default devices, and mknod of anything.
    assert!(o.contains("4\n") && o.contains("null-ok"), "{}", text(&out));
    assert!(o.contains("mknod-ok"), "{}", text(&out));
    // Denied by the default rule: opening a node the rules do not allow.
    assert!(!o.contains("kmsg-written"), "{}", text(&out));
    assert!(
        e.matches("Operation not permitted").count() >= 2,
        "{}",
        text(&out)
    );
    kata_tests::assert_no_runtime_leaks(&[&id]);
}

fn symlinked_mount_targets(env: &Env) {
    let id = unique("symlinks");
    // A volume whose symlinks point at "/" and above it: mounts through them must land in
    // the container's root, as runc's securejoin resolves them.
    let vol = env.scratch.path().join("vol");
    std::fs::create_dir_all(&vol).unwrap();
    std::os::unix::fs::symlink("/", vol.join("abs")).unwrap();
    std::os::unix::fs::symlink("../../../../..", vol.join("up")).unwrap();
    let data = env.scratch.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("marker"), "inside\n").unwrap();
    let vol_mount = format!("type=bind,src={},dst=/vol,options=rbind", vol.display());
    let abs = format!(
        "type=bind,src={},dst=/vol/abs/via-abs,options=rbind:ro",
        data.display()
    );
    let up = format!(
        "type=bind,src={},dst=/vol/up/tmp/via-up,options=rbind",
        data.display()
    );
    let out = env.run(
        &id,
        &["--mount", &vol_mount, "--mount", &abs, "--mount", &up],
        &[
            "sh",
            "-c",
            "cat /via-abs/marker /tmp/via-up/marker; touch /via-abs/w 2>/dev/null || echo ro",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stdout(&out), "inside\ninside\nro\n", "{}", text(&out));
    // Nothing was made on the host through the symlinks.
    assert!(!Path::new("/via-abs").exists() && !Path::new("/tmp/via-up").exists());
    kata_tests::assert_no_runtime_leaks(&[&id]);
}

both_runtimes! {
    megabyte_environment_in_many_variables_runs => megabyte_environment;
    a_string_of_max_arg_strlen_runs => longest_single_string;
    a_200k_string_is_refused_naming_the_limit => oversized_string_is_refused;
    an_over_total_environment_is_refused_naming_the_limit => over_total_environment_is_refused;
    an_over_total_exec_is_refused => over_total_exec_is_refused_and_the_container_runs_on;
    seccomp_profile_denies_with_its_errno => seccomp_profile_errno;
    containerd_default_seccomp_profile_applies => containerd_default_profile;
    device_cgroup_denies_what_the_rules_do_not_allow => device_cgroup;
    mount_targets_through_symlinks_stay_in_the_root => symlinked_mount_targets;
}

#[test]
fn disable_guest_seccomp_drops_the_profile() {
    let env = Env::with_config(KATA_RUNTIME, "\n[runtime]\ndisable_guest_seccomp = true\n");
    let id = unique("seccomp-off");
    let profile = env.file("profile.json", DENY_MKDIR);
    let out = env.run(
        &id,
        &["--seccomp", "--seccomp-profile", profile.to_str().unwrap()],
        &[
            "sh",
            "-c",
            "grep '^Seccomp:' /proc/self/status; mkdir /tmp/d && echo made",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stdout(&out), "Seccomp:\t0\nmade\n", "{}", text(&out));
    kata_tests::assert_no_runtime_leaks(&[&id]);
}

#[test]
fn a_profile_the_guest_cannot_apply_is_refused_by_name() {
    let env = Env::new(KATA_RUNTIME);
    let id = unique("seccomp-notify");
    let profile = env.file(
        "profile.json",
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/agent.sock",
            "syscalls": [{"names": ["connect"], "action": "SCMP_ACT_NOTIFY"}]}"#,
    );
    let out = env.run(
        &id,
        &["--seccomp", "--seccomp-profile", profile.to_str().unwrap()],
        &["sh", "-c", "echo ran"],
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        stderr(&out).contains("SCMP_ACT_NOTIFY") && stderr(&out).contains("connect"),
        "{}",
        text(&out)
    );
    env.assert_refused_and_clean(&id);
}

/// Storage mount points and ReadFile paths through a symlink in the share (which the host,
/// or a container writing its rootfs, controls) never reach the guest's own files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_and_read_file_do_not_follow_symlinks_out() {
    init_logging();
    let t = TestVm::new("symlink-storage").with_shared_dir();
    let leaks = t.leak_check();
    std::fs::write(t.shared_dir().join("a.txt"), "in the share\n").unwrap();
    // In the guest, "/etc" is the guest's own /etc.
    std::os::unix::fs::symlink("/etc", t.shared_dir().join("evil")).unwrap();
    std::os::unix::fs::symlink("a.txt", t.shared_dir().join("inner")).unwrap();
    let vm = Vm::start(t.config.clone()).await.expect("VM starts");
    let agent = AgentClient::connect(&vm, Duration::from_secs(60), Duration::from_secs(10))
        .await
        .unwrap();
    agent.add_storages(vec![shared_fs_storage()]).await.unwrap();

    let mut through = shared_fs_storage();
    through.mount_point = format!("{GUEST_SHARED_DIR}/evil/kata-escape");
    let err = agent.add_storages(vec![through]).await.unwrap_err();
    assert_eq!(
        err.agent_code(),
        Some(ttrpc::Code::FAILED_PRECONDITION),
        "{err:?}"
    );
    assert!(format!("{err:?}").contains("symlink"), "{err:?}");

    let err = agent
        .read_file(&format!("{GUEST_SHARED_DIR}/evil/hostname"), 4096)
        .await
        .unwrap_err();
    assert_eq!(
        err.agent_code(),
        Some(ttrpc::Code::INVALID_ARGUMENT),
        "{err:?}"
    );
    let got = agent
        .read_file(&format!("{GUEST_SHARED_DIR}/inner"), 4096)
        .await
        .unwrap();
    assert_eq!(got, b"in the share\n");

    vm.stop(Duration::from_secs(10))
        .await
        .expect("graceful stop");
    leaks.assert_clean();
}
