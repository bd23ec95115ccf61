//! Bad input, as a user or a cluster hands it to the runtime through a real containerd and
//! `ctr`: pod annotations, configuration files, OCI specs, mounts, resources, stdio URIs and
//! task requests. Every case must fail with an error that names the offending value (and
//! what was expected), and leave nothing behind: no VM process, mount or directory of the
//! container, and no task.

use std::path::{Path, PathBuf};
use std::process::Output;

use kata_tests::containerd::{text, Containerd, ShimInstall, BUSYBOX, KATA_RUNTIME};
use serde_json::{json, Value};

/// How one case feeds its bad input to the runtime.
enum Input {
    /// `ctr run` flags before the image (annotations, mounts, limits, log URI).
    Flags(Vec<String>),
    /// A configuration file (its text) given with `--runtime-config-path`.
    Config(String),
    /// A configuration path that does not exist.
    ConfigPath(&'static str),
    /// The default OCI spec changed by a function, given with `ctr run --config`.
    Spec(fn(&mut Value)),
    /// A running container, then a `ctr task ...` request (args after the task id's
    /// place-holder `{id}`).
    Task(Vec<&'static str>),
}

struct Case {
    name: &'static str,
    input: Input,
    /// Every one of these must appear in the error.
    expect: Vec<&'static str>,
}

fn case(name: &'static str, input: Input, expect: &[&'static str]) -> Case {
    Case {
        name,
        input,
        expect: expect.to_vec(),
    }
}

fn flags(f: &[&str]) -> Input {
    Input::Flags(f.iter().map(|s| s.to_string()).collect())
}

fn annotation(a: &str) -> Input {
    flags(&["--annotation", a])
}

fn config(text: &str) -> Input {
    Input::Config(text.to_owned())
}

fn cases() -> Vec<Case> {
    vec![
        // Pod annotations.
        case(
            "annotation-memory-above-host",
            annotation("io.katacontainers.config.hypervisor.default_memory=65536"),
            &["default_memory = 65536 MiB exceeds the ceiling"],
        ),
        case(
            "annotation-vcpus-above-max",
            annotation("io.katacontainers.config.hypervisor.default_vcpus=64"),
            &["default_vcpus = 64 vCPUs exceeds the ceiling"],
        ),
        case(
            "annotation-not-a-number",
            annotation("io.katacontainers.config.hypervisor.default_vcpus=two"),
            &["\"two\"", "non-negative integer"],
        ),
        case(
            "annotation-negative",
            annotation("io.katacontainers.config.hypervisor.default_memory=-5"),
            &["\"-5\"", "non-negative integer"],
        ),
        case(
            "annotation-unsupported",
            annotation("io.katacontainers.config.hypervisor.path=/bin/sh"),
            &["io.katacontainers.config.hypervisor.path", "not supported"],
        ),
        case(
            "annotation-not-enabled",
            annotation("io.katacontainers.config.hypervisor.memory_slots=3"),
            &["memory_slots", "enable_annotations"],
        ),
        case(
            "annotation-unknown-kata",
            annotation("io.katacontainers.runtime.foo=1"),
            &["io.katacontainers.runtime.foo", "not supported"],
        ),
        // Configuration files.
        case(
            "config-unknown-key",
            config("[hypervisor.qemu]\ndefault_memroy = 4096\n"),
            &["default_memroy"],
        ),
        case(
            "config-not-toml",
            config("this is = = not toml\n"),
            &["invalid configuration file"],
        ),
        case(
            "config-missing-file",
            Input::ConfigPath("/nonexistent/kata.toml"),
            &["/nonexistent/kata.toml"],
        ),
        case(
            "config-accel",
            config("[hypervisor.qemu]\naccel = \"xen\"\n"),
            &["hypervisor.qemu.accel", "xen", "auto, kvm or tcg"],
        ),
        case(
            "config-small-memory",
            config("[hypervisor.qemu]\ndefault_memory = 64\n"),
            &["default_memory", "64", "at least 128"],
        ),
        case(
            "config-max-below-memory",
            config("[hypervisor.qemu]\ndefault_memory = 2048\ndefault_maxmemory = 1024\n"),
            &["default_maxmemory", "1024", "below default_memory"],
        ),
        case(
            "config-cache",
            config("[hypervisor.qemu]\nvirtio_fs_cache = \"sometimes\"\n"),
            &["virtio_fs_cache", "sometimes"],
        ),
        case(
            "config-shared-fs",
            config("[hypervisor.qemu]\nshared_fs = \"virtio-9p\"\n"),
            &["shared_fs", "virtio-9p", "virtio-fs"],
        ),
        case(
            "config-dial-timeout",
            config("[agent.kata]\ndial_timeout = 0\n"),
            &["dial_timeout", "at least 1"],
        ),
        case(
            "config-virtiofsd-sandbox-off",
            config("[hypervisor.qemu]\nvirtio_fs_extra_args = [\"--sandbox\", \"none\"]\n"),
            &["virtio_fs_extra_args", "--sandbox none"],
        ),
        case(
            "config-virtiofsd-seccomp-off",
            config("[hypervisor.qemu]\nvirtio_fs_extra_args = [\"--seccomp=none\"]\n"),
            &["virtio_fs_extra_args", "--seccomp=none"],
        ),
        case(
            "config-qemu-seccomp",
            config("[hypervisor.qemu]\nseccompsandbox = \"off\"\n"),
            &["seccompsandbox", "off"],
        ),
        case(
            "config-kernel-missing",
            config("[hypervisor.qemu]\nkernel = \"/nonexistent/vmlinuz\"\n"),
            &["hypervisor.qemu.kernel", "/nonexistent/vmlinuz"],
        ),
        case(
            "config-memory-slots",
            config("[hypervisor.qemu]\nmemory_slots = 0\n"),
            &["memory_slots", "1 to 256"],
        ),
        case(
            "config-health-failures",
            config("[agent.kata]\nhealth_check_failures = 0\n"),
            &["health_check_failures", "at least 1"],
        ),
        case(
            "config-wrong-type",
            config("[hypervisor.qemu]\ndefault_vcpus = \"two\"\n"),
            &["default_vcpus"],
        ),
        // Mounts, resources, stdio.
        case(
            "mount-missing-source",
            flags(&[
                "--mount",
                "type=bind,src=/nonexistent/dir,dst=/x,options=rbind:ro",
            ]),
            &["/nonexistent/dir"],
        ),
        case(
            "mount-unsupported-type",
            flags(&["--mount", "type=nfs,src=server:/export,dst=/x,options=ro"]),
            &["nfs"],
        ),
        case(
            "memory-limit-beyond-vm",
            flags(&["--memory-limit", "1099511627776"]),
            &["1048576 MiB"],
        ),
        case(
            "cpus-beyond-vm",
            flags(&["--cpus", "8"]),
            &["9 vCPUs", "default_maxvcpus"],
        ),
        case(
            "log-uri-binary",
            flags(&["--log-uri", "binary:///bin/true"]),
            &["binary"],
        ),
        // OCI specs.
        case(
            "spec-empty-args",
            Input::Spec(|s| s["process"]["args"] = json!([])),
            &["args"],
        ),
        case(
            "spec-missing-program",
            Input::Spec(|s| s["process"]["args"] = json!(["/nonexistent/prog"])),
            &["/nonexistent/prog"],
        ),
        case(
            "spec-relative-cwd",
            Input::Spec(|s| s["process"]["cwd"] = json!("tmp")),
            &["cwd", "tmp"],
        ),
        case(
            "spec-user-namespace",
            Input::Spec(|s| push(&mut s["linux"]["namespaces"], json!({"type": "user"}))),
            &["user"],
        ),
        case(
            "spec-unknown-namespace",
            Input::Spec(|s| push(&mut s["linux"]["namespaces"], json!({"type": "bogus"}))),
            &["bogus"],
        ),
        case(
            "spec-host-sysctl",
            Input::Spec(|s| s["linux"]["sysctl"] = json!({"kernel.panic": "1"})),
            &["kernel.panic"],
        ),
        case(
            "spec-missing-root",
            Input::Spec(|s| s["root"]["path"] = json!("/nonexistent/rootfs")),
            &["root.path /nonexistent/rootfs does not exist"],
        ),
        case(
            "spec-unknown-rlimit",
            Input::Spec(|s| {
                s["process"]["rlimits"] = json!([{"type": "RLIMIT_BOGUS", "hard": 1, "soft": 1}])
            }),
            &["RLIMIT_BOGUS"],
        ),
        case(
            "spec-unknown-capability",
            Input::Spec(|s| s["process"]["capabilities"]["bounding"] = json!(["CAP_BOGUS"])),
            &["CAP_BOGUS"],
        ),
        case(
            "spec-relative-mount-destination",
            Input::Spec(|s| {
                push(
                    &mut s["mounts"],
                    json!({"destination": "relative/dir", "type": "tmpfs", "source": "tmpfs"}),
                )
            }),
            &["relative/dir"],
        ),
        // Requests to a running task.
        case(
            "kill-bad-signal",
            Input::Task(vec!["kill", "-s", "99", "{id}"]),
            &["signal 99"],
        ),
        case(
            "exec-relative-cwd",
            Input::Task(vec![
                "exec",
                "--exec-id",
                "e1",
                "--cwd",
                "some/dir",
                "{id}",
                "true",
            ]),
            &["cwd", "some/dir"],
        ),
        case(
            "exec-missing-program",
            Input::Task(vec!["exec", "--exec-id", "e2", "{id}", "/nonexistent/tool"]),
            &["/nonexistent/tool"],
        ),
    ]
}

fn push(array: &mut Value, item: Value) {
    match array.as_array_mut() {
        Some(a) => a.push(item),
        None => *array = json!([item]),
    }
}

struct Fixture {
    ctd: Containerd,
    shim: ShimInstall,
    scratch: tempfile::TempDir,
    rootfs: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        kata_tests::init_logging();
        let shim = ShimInstall::new();
        let ctd = Containerd::start_with_env(
            shim.bin_dir(),
            &[("KATA_CONF_FILE", shim.config_path().as_path())],
        );
        let scratch = tempfile::Builder::new()
            .prefix("kata-bad-input-")
            .tempdir()
            .unwrap();
        let rootfs = scratch.path().join("rootfs");
        kata_tests::crio::extract_image(&kata_tests::crio::busybox_archive(), &rootfs);
        Self {
            ctd,
            shim,
            scratch,
            rootfs,
        }
    }

    /// The default spec of `ctr oci spec` for our busybox rootfs, running `true`.
    fn base_spec(&self) -> Value {
        let out = std::process::Command::new("ctr")
            .args(["oci", "spec"])
            .output()
            .unwrap();
        assert!(out.status.success(), "ctr oci spec: {}", text(&out));
        let mut spec: Value = serde_json::from_slice(&out.stdout).unwrap();
        spec["root"]["path"] = json!(self.rootfs);
        spec["root"]["readonly"] = json!(false);
        spec["process"]["args"] = json!(["true"]);
        spec
    }

    /// Writes a configuration: the test's one with `text` in place of it (config cases
    /// replace the whole file, keeping the guest image and daemons).
    fn config_file(&self, name: &str, text: &str) -> PathBuf {
        let base = std::fs::read_to_string(self.shim.config_path()).unwrap();
        let merged = merge_toml(&base, text);
        let path = self.scratch.path().join(format!("{name}.toml"));
        std::fs::write(&path, merged).unwrap();
        path
    }

    fn run(&self, id: &str, extra: &[String], cmd: &[&str]) -> Output {
        let mut args: Vec<&str> = vec!["run", "--rm", "--runtime", KATA_RUNTIME];
        args.extend(extra.iter().map(String::as_str));
        args.push(BUSYBOX);
        args.push(id);
        args.extend_from_slice(cmd);
        self.ctd.ctr(&args)
    }

    /// Runs one case; returns its error text.
    fn attempt(&self, case: &Case, id: &str) -> String {
        let out = match &case.input {
            Input::Flags(extra) => self.run(id, extra, &["true"]),
            Input::Config(text) => {
                let path = self.config_file(case.name, text);
                let extra = vec![
                    "--runtime-config-path".to_owned(),
                    path.display().to_string(),
                ];
                self.run(id, &extra, &["true"])
            }
            Input::ConfigPath(path) => {
                let extra = vec!["--runtime-config-path".to_owned(), (*path).to_owned()];
                self.run(id, &extra, &["true"])
            }
            Input::Spec(change) => {
                let mut spec = self.base_spec();
                spec["linux"]["cgroupsPath"] = json!(format!("/kata-test/{id}"));
                change(&mut spec);
                let path = self.scratch.path().join(format!("{}.json", case.name));
                std::fs::write(&path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
                self.ctd.ctr(&[
                    "run",
                    "--rm",
                    "--runtime",
                    KATA_RUNTIME,
                    "--config",
                    &path.to_string_lossy(),
                    id,
                ])
            }
            Input::Task(args) => {
                let out = self.ctd.ctr(&[
                    "run",
                    "-d",
                    "--runtime",
                    KATA_RUNTIME,
                    BUSYBOX,
                    id,
                    "sleep",
                    "1000",
                ]);
                assert!(out.status.success(), "{}: {}", case.name, text(&out));
                let args: Vec<&str> = args
                    .iter()
                    .map(|a| if *a == "{id}" { id } else { a })
                    .collect();
                let mut full = vec!["task"];
                full.extend(args);
                let out = self.ctd.ctr(&full);
                let _ = self.ctd.ctr(&["task", "delete", "-f", id]);
                let _ = self.ctd.ctr(&["container", "delete", id]);
                out
            }
        };
        assert!(
            !out.status.success(),
            "{}: the bad input was accepted: {}",
            case.name,
            text(&out)
        );
        text(&out)
    }
}

/// `base` with the keys of `change` set: a table in `change` replaces the same keys of
/// that table in `base`; text that does not parse is returned as it is (the case wants a
/// parse error).
fn merge_toml(base: &str, change: &str) -> String {
    let Ok(change_doc) = change.parse::<toml::Table>() else {
        return change.to_owned();
    };
    let mut doc: toml::Table = base.parse().unwrap();
    fn merge(into: &mut toml::Table, from: &toml::Table) {
        for (k, v) in from {
            match (into.get_mut(k), v) {
                (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
                _ => {
                    into.insert(k.clone(), v.clone());
                }
            }
        }
    }
    merge(&mut doc, &change_doc);
    toml::to_string(&doc).unwrap()
}

fn exists(p: &Path) -> bool {
    p.exists()
}

#[test]
fn every_bad_input_is_named_and_leaves_nothing() {
    let fx = Fixture::new();
    let cases = cases();
    assert!(cases.len() >= 30, "the table has {} cases", cases.len());
    let mut failures = Vec::new();
    for (n, case) in cases.iter().enumerate() {
        let id = format!("bad-{n}-{}", std::process::id());
        let error = fx.attempt(case, &id);
        let missing: Vec<_> = case.expect.iter().filter(|e| !error.contains(*e)).collect();
        if !missing.is_empty() {
            failures.push(format!("{}: error lacks {missing:?}: {error}", case.name));
        }
        println!(
            "bad-input {:<32} {}",
            case.name,
            error.trim().lines().last().unwrap_or("")
        );
        // Nothing left: no task, no container, no process/mount/directory of it.
        let _ = fx.ctd.ctr(&["container", "delete", &id]);
        let tasks = fx.ctd.ctr(&["task", "ls", "-q"]);
        assert!(
            !String::from_utf8_lossy(&tasks.stdout).contains(&id),
            "{}: task left behind",
            case.name
        );
        kata_tests::assert_no_runtime_leaks(&[&id]);
        assert!(
            !exists(&fx.ctd.task_state_dir().join(&id)),
            "{}: bundle left",
            case.name
        );
    }
    assert!(
        failures.is_empty(),
        "unclear errors:\n{}",
        failures.join("\n")
    );
}
