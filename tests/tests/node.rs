//! Node integration, end to end: `kata-ctl check` on this host and on fake capable and
//! incapable `/proc/cpuinfo` + `/sys/module` trees (with the real `/dev/kvm`), the NFD
//! feature file it writes and removes, `kata-ctl env`, and `hack/uninstall.sh` against what
//! the install scripts put into a temporary root — also while a real kata sandbox runs
//! from that root.
//!
//! The binaries are the workspace's debug builds (`cargo build --workspace --bins`, as
//! `hack/test.sh` does before the tests).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use kata_tests::containerd::{
    target_bin_dir, text, Containerd, ShimInstall, BUSYBOX, KATA_RUNTIME,
};
use kata_tests::{assert_no_runtime_leaks, repo_root, wait_until, GuestImage};

const CAPABLE: &str = "System is capable of running Kata Containers";
const NOT_CAPABLE: &str = "ERROR: System is not capable of running Kata Containers";

fn kata_ctl() -> PathBuf {
    let bin = target_bin_dir().join("kata-ctl");
    assert!(
        bin.is_file(),
        "{} missing: run cargo build -p kata-ctl",
        bin.display()
    );
    bin
}

fn run_ctl(args: &[&str]) -> Output {
    Command::new(kata_ctl())
        .args(args)
        .output()
        .expect("run kata-ctl")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The ids on the text report's `FAIL` lines.
fn failed_ids(report: &str) -> Vec<String> {
    report
        .lines()
        .filter_map(|l| l.strip_prefix("FAIL"))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn check_on_this_host_names_what_fails() {
    // A label file left from an earlier run: `--nfd` keeps it only on a capable host.
    let scratch = tempfile::tempdir().unwrap();
    let features = scratch.path().join("features.d");
    std::fs::create_dir_all(&features).unwrap();
    std::fs::write(features.join("kata"), "runtime.kata=true\n").unwrap();
    let out = run_ctl(&["check", "--nfd", &features.to_string_lossy()]);
    let report = stdout(&out);
    let failed = failed_ids(&report);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let hw_virt = kata_hypervisor::accel::cpuinfo_has_hw_virt(&cpuinfo);
    if !hw_virt {
        // This development host: a VM without vmx/svm passed through.
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(
            failed.iter().any(|id| id == "cpu.vmx" || id == "cpu.svm"),
            "the missing virtualization flag is named: {report}"
        );
        assert!(report.contains("TCG is for development only"), "{report}");
    }
    // Whatever the host: the verdict, the exit code and the FAIL lines agree.
    let last = report.lines().last().unwrap_or_default();
    if failed.is_empty() {
        assert_eq!(last, CAPABLE, "{report}");
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    } else {
        assert_eq!(last, NOT_CAPABLE, "{report}");
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(
            report.contains(&format!("failed: {}", failed.join(", "))),
            "{report}"
        );
    }
    assert_eq!(
        features.join("kata").exists(),
        failed.is_empty(),
        "the NFD file follows the verdict: {report}"
    );

    // --json: the same checks, machine-readable.
    let out = run_ctl(&["check", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("check --json is not JSON ({e}): {}", text(&out)));
    assert_eq!(json["capable"], failed.is_empty(), "{json}");
    let json_failed: Vec<&str> = json["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "fail")
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(json_failed, failed, "{json}");
    assert_eq!(
        out.status.code(),
        Some(if failed.is_empty() { 0 } else { 1 })
    );
    assert_no_runtime_leaks(&[&scratch.path().to_string_lossy()]);
}

/// A fake host tree: `proc/cpuinfo` and `sys/module/<name>/parameters/<param>`.
fn fake_host(root: &Path, cpuinfo: &str, modules: &[(&str, &[(&str, &str)])]) {
    std::fs::create_dir_all(root.join("proc")).unwrap();
    std::fs::write(root.join("proc/cpuinfo"), cpuinfo).unwrap();
    for (name, params) in modules {
        let dir = root.join("sys/module").join(name).join("parameters");
        std::fs::create_dir_all(&dir).unwrap();
        for (param, value) in *params {
            std::fs::write(dir.join(param), format!("{value}\n")).unwrap();
        }
    }
}

#[test]
fn check_with_nfd_labels_a_capable_host_and_unlabels_an_incapable_one() {
    let scratch = tempfile::tempdir().unwrap();
    let capable = scratch.path().join("capable");
    fake_host(
        &capable,
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Fake Xeon\n\
         flags\t\t: fpu vmx lm sse4_1 sse4_2\n",
        &[
            ("kvm", &[]),
            ("kvm_intel", &[("unrestricted_guest", "Y"), ("nested", "N")]),
            ("vhost", &[]),
            ("vhost_net", &[]),
            ("vhost_vsock", &[]),
        ],
    );
    let incapable = scratch.path().join("incapable");
    fake_host(
        &incapable,
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Fake Atom\nflags\t\t: fpu lm\n",
        &[("kvm", &[])],
    );
    let features = scratch.path().join("features.d");
    let nfd_file = features.join("kata");
    let root_arg = |p: &Path| p.to_string_lossy().into_owned();

    // Capable: exit 0, the label file appears. /dev/kvm is the real one: it must work.
    let out = run_ctl(&[
        "--host-root",
        &root_arg(&capable),
        "check",
        "--nfd",
        &root_arg(&features),
    ]);
    let report = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "a capable fake host must pass (this host's /dev/kvm must work): {}",
        text(&out)
    );
    assert!(report.contains(CAPABLE), "{report}");
    assert!(report.contains("PASS  cpu.vmx"), "{report}");
    assert!(report.contains("PASS  module.kvm_intel"), "{report}");
    assert!(report.contains("PASS  host.nested"), "{report}");
    assert_eq!(
        std::fs::read_to_string(&nfd_file).unwrap(),
        "runtime.kata=true\n"
    );
    assert!(
        report.contains(&format!("nfd: wrote {}", nfd_file.display())),
        "{report}"
    );

    // Incapable: exit 1, the file is removed (so NFD drops the label).
    let out = run_ctl(&[
        "--host-root",
        &root_arg(&incapable),
        "check",
        "--json",
        "--nfd",
        &root_arg(&features),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["capable"], false);
    assert_eq!(json["verdict"], NOT_CAPABLE);
    assert_eq!(json["nfd"]["action"], "removed", "{json}");
    assert_eq!(
        json["nfd"]["label"],
        "feature.node.kubernetes.io/runtime.kata"
    );
    let failed: Vec<&str> = json["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "fail")
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        failed,
        [
            "cpu.vmx",
            "cpu.sse4_1",
            "module.kvm_intel",
            "module.vhost",
            "module.vhost_net"
        ]
    );
    assert!(!nfd_file.exists(), "the NFD file must be removed");
    let left: Vec<_> = std::fs::read_dir(&features).unwrap().collect();
    assert!(left.is_empty(), "nothing else in features.d: {left:?}");
    assert_no_runtime_leaks(&[&scratch.path().to_string_lossy()]);
}

#[test]
fn env_reports_the_configuration_in_effect_and_the_host() {
    let scratch = tempfile::tempdir().unwrap();
    let config = scratch.path().join("configuration.toml");
    std::fs::write(
        &config,
        "[hypervisor.qemu]\ndefault_memory = 768\ndefault_vcpus = 2\n[agent.kata]\ndial_timeout = 42\n",
    )
    .unwrap();
    let out = run_ctl(&["env", "--json", "--config", &config.to_string_lossy()]);
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["runtime"]["config_source"], "--config");
    assert!(json["runtime"]["config_error"].is_null(), "{json}");
    assert_eq!(json["hypervisor"]["memory_mib"], 768);
    assert_eq!(json["hypervisor"]["vcpus"], 2);
    assert_eq!(json["agent"]["dial_timeout_s"], 42);
    // The default guest: our kernel with the root image on virtio-pmem, qboot.
    assert_eq!(
        json["guest"]["image"]["path"], "/usr/share/kata-containers/kata-containers.img",
        "{json}"
    );
    assert!(json["guest"]["initrd"].is_null(), "{json}");
    assert_eq!(
        json["guest"]["firmware"]["path"], "/usr/share/qemu/qboot.rom",
        "{json}"
    );
    assert_eq!(json["hypervisor"]["binary"]["present"], true, "{json}");
    assert!(
        json["hypervisor"]["binary"]["version"]
            .as_str()
            .unwrap_or_default()
            .starts_with("QEMU emulator version"),
        "{json}"
    );
    // The shim beside kata-ctl (target/debug) answers --version.
    assert!(
        json["runtime"]["shim"]["version"]
            .as_str()
            .unwrap_or_default()
            .starts_with("containerd-shim-kata-v2 version"),
        "{json}"
    );
    // Host facts agree with `check`.
    let check = run_ctl(&["check"]);
    assert_eq!(
        json["host"]["vm_container_capable"],
        check.status.success(),
        "{json}"
    );
    assert_eq!(
        json["host"]["kernel"],
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap()
            .trim()
    );

    // TOML by default; a configuration that does not load is named, the rest still shown.
    std::fs::write(&config, "[hypervisor.qemu]\nbogus = 1\n").unwrap();
    let out = run_ctl(&["env", "--config", &config.to_string_lossy()]);
    assert!(out.status.success(), "{}", text(&out));
    let report = stdout(&out);
    assert!(report.contains("config_error = "), "{report}");
    assert!(report.contains("bogus"), "{report}");
    assert!(report.contains("[host]"), "{report}");
    assert_no_runtime_leaks(&[&scratch.path().to_string_lossy()]);
}

/// Every path under `root` with its kind and size (`dir`, `file <len>`, `link`).
fn tree(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                out.insert(rel, "dir".to_owned());
                walk(root, &path, out);
            } else if meta.is_symlink() {
                out.insert(rel, "link".to_owned());
            } else {
                out.insert(rel, format!("file {}", meta.len()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn hack(script: &str, args: &[&str], envs: &[(&str, &Path)]) -> Output {
    Command::new(repo_root().join("hack").join(script))
        .args(args)
        .envs(envs.iter().map(|(k, v)| (k, v.as_os_str())))
        .output()
        .unwrap_or_else(|e| panic!("run hack/{script}: {e}"))
}

fn deps_prefix() -> PathBuf {
    std::env::var_os("KATA_DEPS_PREFIX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/kata-deps"))
}

/// A root that looks like a Debian node before the install: the standard directories,
/// containerd's packaged config.toml and, when `crio`, CRI-O's drop-in directory.
fn node_root(root: &Path, containerd_config: Option<&str>, crio: bool) {
    for dir in ["usr/local/bin", "usr/share", "opt", "etc"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    if let Some(config) = containerd_config {
        std::fs::create_dir_all(root.join("etc/containerd")).unwrap();
        std::fs::write(root.join("etc/containerd/config.toml"), config).unwrap();
    }
    if crio {
        std::fs::create_dir_all(root.join("etc/crio/crio.conf.d")).unwrap();
    }
}

/// Runs the three install scripts into `root`: install-deps (its daemons are copied from
/// this host's KATA_DEPS_PREFIX first, as compiling them again would take minutes; the
/// script must find them current), build-guest --install of the built image, install-shim
/// with the debug binaries.
fn install_all(root: &Path) {
    let root_s = root.to_string_lossy().into_owned();
    let deps = deps_prefix();
    let seeded = root.join(deps.strip_prefix("/").unwrap());
    std::fs::create_dir_all(seeded.parent().unwrap()).unwrap();
    let cp = Command::new("cp")
        .arg("-a")
        .arg(&deps)
        .arg(&seeded)
        .output()
        .unwrap();
    assert!(
        cp.status.success(),
        "seed {}: {}",
        deps.display(),
        text(&cp)
    );
    let out = hack("install-deps.sh", &["--root", &root_s], &[]);
    assert!(out.status.success(), "install-deps: {}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("virtiofsd 1.14.0: present"), "{stderr}");

    let guest = GuestImage::find();
    let guest_dir = guest.kernel.parent().unwrap();
    let out = hack(
        "build-guest.sh",
        &["--install", "--no-build", "--root", &root_s],
        &[("GUEST_BUILD_DIR", guest_dir)],
    );
    assert!(out.status.success(), "build-guest: {}", text(&out));

    let bins = target_bin_dir();
    assert!(
        bins.join("containerd-shim-kata-v2").is_file() && bins.join("kata-ctl").is_file(),
        "build the binaries first: cargo build --workspace --bins"
    );
    let out = hack(
        "install-shim.sh",
        &["--root", &root_s, "--bin-dir", &bins.to_string_lossy()],
        &[],
    );
    assert!(out.status.success(), "install-shim: {}", text(&out));
}

/// What the install put down, relative to the root.
const INSTALLED: &[&str] = &[
    "usr/local/bin/containerd-shim-kata-v2",
    "usr/local/bin/kata-ctl",
    "etc/kata-containers/configuration.toml",
    "etc/kata-containers/configuration-remote.toml",
    "etc/containerd/conf.d/50-kata.toml",
    "usr/share/kata-containers/vmlinux.container",
    "usr/share/kata-containers/kata-containers.img",
    "usr/share/kata-containers/kata-containers-initrd.img",
    "opt/kata-deps/bin/virtiofsd",
    "opt/kata-deps/bin/vhost-device-vsock",
];

#[test]
fn uninstall_removes_everything_the_install_put_down() {
    let scratch = tempfile::Builder::new()
        .prefix("kata-node-root-")
        .tempdir()
        .unwrap();
    let root = scratch.path().join("debian");
    let debian_config = std::fs::read_to_string("/etc/containerd/config.toml")
        .unwrap_or_else(|_| "version = 2\n\n[plugins]\n".to_owned());
    node_root(&root, Some(&debian_config), true);
    let before = tree(&root);
    install_all(&root);
    let installed = tree(&root);
    for path in INSTALLED
        .iter()
        .copied()
        .chain(["etc/crio/crio.conf.d/50-kata.conf"])
    {
        assert!(installed.contains_key(path), "install put down no {path}");
    }
    let main = root.join("etc/containerd/config.toml");
    let crio = std::fs::read_to_string(root.join("etc/crio/crio.conf.d/50-kata.conf")).unwrap();
    assert!(
        crio.contains("runtime_path = \"/usr/local/bin/containerd-shim-kata-v2\""),
        "paths inside files are the node's, not the staging root's: {crio}"
    );
    assert!(std::fs::read_to_string(&main)
        .unwrap()
        .starts_with("imports = [\"/etc/containerd/conf.d/*.toml\"]"));

    let root_s = root.to_string_lossy().into_owned();
    let out = hack("uninstall.sh", &["--root", &root_s], &[]);
    assert!(out.status.success(), "uninstall: {}", text(&out));
    assert_eq!(tree(&root), before, "uninstall left or took something");
    assert_eq!(
        std::fs::read_to_string(&main).unwrap(),
        debian_config,
        "containerd's own config.toml is restored byte for byte"
    );

    // Idempotent.
    let out = hack("uninstall.sh", &["--root", &root_s], &[]);
    assert!(out.status.success(), "second uninstall: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing of kata is installed"),
        "{}",
        text(&out)
    );
    assert_eq!(tree(&root), before);

    // A bare node (no containerd config.toml, no CRI-O) whose kata configuration was
    // edited: the file install-shim wrote whole goes, the edited configuration stays.
    let bare = scratch.path().join("bare");
    node_root(&bare, None, false);
    let before = tree(&bare);
    install_all(&bare);
    assert!(bare.join("etc/containerd/config.toml").is_file());
    let conf = bare.join("etc/kata-containers/configuration.toml");
    let mut edited = std::fs::read_to_string(&conf).unwrap();
    edited.push_str("# edited on this node\n");
    std::fs::write(&conf, &edited).unwrap();
    let bare_s = bare.to_string_lossy().into_owned();
    let out = hack("uninstall.sh", &["--root", &bare_s], &[]);
    assert!(out.status.success(), "uninstall: {}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{} was edited locally: kept it", conf.display())),
        "{stderr}"
    );
    let mut expected = before;
    expected.insert("etc/kata-containers".to_owned(), "dir".to_owned());
    expected.insert(
        "etc/kata-containers/configuration.toml".to_owned(),
        format!("file {}", edited.len()),
    );
    assert_eq!(
        tree(&bare),
        expected,
        "only the edited configuration is left"
    );
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), edited);
    assert_no_runtime_leaks(&[&root_s, &bare_s]);
}

/// The STATUS column of `ctr task ls` for `id` ("" when absent).
fn task_status(ctd: &Containerd, id: &str) -> String {
    let out = ctd.ctr(&["task", "ls"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn uninstall_refuses_while_a_sandbox_runs_from_the_installation() {
    let scratch = tempfile::Builder::new()
        .prefix("kata-node-root-")
        .tempdir()
        .unwrap();
    let root = scratch.path().join("node");
    node_root(&root, None, false);
    install_all(&root);
    let root_s = root.to_string_lossy().into_owned();
    let installed_shim = root.join("usr/local/bin/containerd-shim-kata-v2");

    // A real sandbox whose shim is the installed binary (the test guest configuration).
    let test_config = ShimInstall::new();
    let ctd = Containerd::start_with_env(
        &root.join("usr/local/bin"),
        &[("KATA_CONF_FILE", test_config.config_path().as_path())],
    );
    let id = format!("node-uninstall-{}", std::process::id());
    let out = ctd.ctr(&[
        "run",
        "-d",
        "--runtime",
        KATA_RUNTIME,
        BUSYBOX,
        &id,
        "sleep",
        "600",
    ]);
    assert!(out.status.success(), "ctr run -d: {}", text(&out));
    assert!(
        wait_until(Duration::from_secs(120), || task_status(&ctd, &id)
            == "RUNNING"),
        "{id} never RUNNING: {}",
        ctd.log()
    );

    let out = hack("uninstall.sh", &["--root", &root_s], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "must refuse: {}", text(&out));
    assert!(stderr.contains("kata sandboxes are running"), "{stderr}");
    assert!(stderr.contains(&id), "the sandbox is named: {stderr}");
    assert!(installed_shim.is_file(), "nothing removed while refusing");

    // --force removes the files; the sandbox keeps running and is still stopped cleanly.
    let out = hack("uninstall.sh", &["--root", &root_s, "--force"], &[]);
    assert!(out.status.success(), "uninstall --force: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&id),
        "{}",
        text(&out)
    );
    assert!(!installed_shim.exists());
    assert_eq!(task_status(&ctd, &id), "RUNNING");

    let _ = ctd.ctr(&["task", "kill", "-s", "SIGKILL", &id]);
    assert!(
        wait_until(Duration::from_secs(60), || {
            let s = task_status(&ctd, &id);
            s == "STOPPED" || s.is_empty()
        }),
        "{id} did not stop"
    );
    let out = ctd.ctr(&["task", "delete", &id]);
    assert!(out.status.success(), "task delete: {}", text(&out));
    let out = ctd.ctr(&["container", "delete", &id]);
    assert!(out.status.success(), "container delete: {}", text(&out));
    drop(ctd);
    assert_no_runtime_leaks(&[&id, &root_s]);
}
