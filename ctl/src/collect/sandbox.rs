//! One running sandbox's part of a collection, under `sandboxes/<id>/`:
//! - `state.json`: the shim's record of its processes and directories;
//! - `agent-url.txt`, `metrics.txt`, `console.txt`: the shim's management server
//!   (`/agent-url`, `/metrics`, `/console`: the guest console's last lines);
//! - `agent-version.txt`: the agent's answer to `Version` and the guest's kernel release;
//! - `journal.txt`: `journalctl -t kata -t virtiofsd -t vhost-device-vsock
//!   SANDBOX_ID=<id>` (an error is recorded when there is no journal);
//! - `qemu-cmdline.txt`: QEMU's arguments, one per line;
//! - `processes.txt`: the shim's process tree (pid, name, arguments);
//! - `bundles/<container>/config.json`: the OCI spec of each of its containers found next
//!   to the sandbox's bundle (the shim's working directory), redacted;
//! - `configuration.toml`: the file named by the shim's `KATA_CONF_FILE`, when it has one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kata_metrics::names;
use kata_shim::report::chain;
use kata_shim::sandbox::agent::AgentClient;

use super::{add_config_file, command_output, Collection};
use crate::exec::process_args;
use crate::redact::redact_spec;
use crate::sandboxes::{same_process, SandboxDir};

/// How long the agent gets to answer `Version`.
const AGENT_TIMEOUT: Duration = Duration::from_secs(5);
/// The journal identifiers a sandbox's lines are under.
const JOURNAL_IDENTIFIERS: [&str; 3] = ["kata", "virtiofsd", "vhost-device-vsock"];
/// The journal's socket: without it no journal runs on this host.
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";
/// Annotations that name the sandbox a container belongs to (containerd's CRI, CRI-O).
const SANDBOX_ID_ANNOTATIONS: [&str; 2] = [
    "io.kubernetes.cri.sandbox-id",
    "io.kubernetes.cri-o.SandboxID",
];

/// Gathers `sandbox` into `c`; returns the agent's version when it answered.
pub async fn collect(c: &mut Collection, sandbox: &SandboxDir) -> Option<String> {
    let dir = format!("sandboxes/{}", sandbox.id);
    let item = |name: &str| format!("{dir}/{name}");

    match &sandbox.record {
        Some(r) => match serde_json::to_string_pretty(r) {
            Ok(j) => c.add(item("state.json"), j + "\n"),
            Err(e) => c.error(item("state.json"), e.to_string()),
        },
        None => c.error(
            item("state.json"),
            format!("no readable state record in {}", sandbox.dir.display()),
        ),
    }

    // The shim's management server.
    let endpoint = match sandbox.endpoint().await {
        Ok((url, endpoint)) => {
            c.add(item("agent-url.txt"), url + "\n");
            Some(endpoint)
        }
        Err(e) => {
            c.error(item("agent-url.txt"), chain(&e));
            None
        }
    };
    c.add_or_error(&item("metrics.txt"), sandbox.get(names::METRICS_PATH).await);
    c.add_or_error(&item("console.txt"), sandbox.get(names::CONSOLE_PATH).await);

    // The agent's version.
    let mut agent_version = None;
    if let Some(endpoint) = endpoint {
        match AgentClient::connect_endpoint(&endpoint, AGENT_TIMEOUT, AGENT_TIMEOUT).await {
            Ok(agent) => match agent.version().await {
                Ok(v) => {
                    let mut text =
                        format!("agent {} (protocol {})", v.agent_version, v.grpc_version);
                    match agent.guest_details().await {
                        Ok(d) => text.push_str(&format!(", guest kernel {}", d.kernel_release)),
                        Err(e) => c.error(item("agent-version.txt: guest kernel"), chain(&e)),
                    }
                    c.add(item("agent-version.txt"), text.clone() + "\n");
                    agent_version = Some(text);
                }
                Err(e) => c.error(item("agent-version.txt"), chain(&e)),
            },
            Err(e) => c.error(item("agent-version.txt"), chain(&e)),
        }
    }

    // The journal.
    c.add_or_error(&item("journal.txt"), journal(&sandbox.id).await);

    // Host processes.
    let Some(record) = &sandbox.record else {
        return agent_version;
    };
    if record.remote.is_some() || record.qemu_pid == 0 {
        c.error(item("qemu-cmdline.txt"), "no local QEMU (remote VM)");
    } else if !same_process(record.qemu_pid, record.qemu_start_time) {
        c.error(
            item("qemu-cmdline.txt"),
            format!("QEMU (pid {}) is gone", record.qemu_pid),
        );
    } else {
        match process_args(record.qemu_pid) {
            Ok(args) => c.add(
                item("qemu-cmdline.txt"),
                args.iter().map(|a| format!("{a}\n")).collect::<String>(),
            ),
            Err(e) => c.error(
                item("qemu-cmdline.txt"),
                format!("cannot read /proc/{}/cmdline: {e}", record.qemu_pid),
            ),
        }
    }
    let shim = record.shim_pid;
    match process_tree(Path::new("/proc"), shim) {
        Some(tree) => c.add(item("processes.txt"), tree),
        None => c.error(
            item("processes.txt"),
            format!("the shim (pid {shim}) is gone"),
        ),
    }

    // Bundles and the shim's configuration file.
    match std::fs::read_link(format!("/proc/{shim}/cwd")) {
        Ok(bundle) => {
            for (container, path) in bundles_of(&bundle, &sandbox.id) {
                add_bundle(c, &item(&format!("bundles/{container}/config.json")), &path);
            }
        }
        Err(e) => c.error(
            item("bundles"),
            format!("cannot read the shim's working directory (its bundle): {e}"),
        ),
    }
    if let Some(conf) = env_value(shim, kata_shim::config::CONFIG_ENV) {
        add_config_file(c, &dir, Path::new(&conf)).await;
    }
    agent_version
}

/// The journal lines of `id`, or why there are none.
async fn journal(id: &str) -> Result<String, std::io::Error> {
    // A journal that is not running leaves its socket behind: connect to know.
    let probe = std::os::unix::net::UnixDatagram::unbound().and_then(|s| s.connect(JOURNAL_SOCKET));
    if let Err(e) = probe {
        return Err(std::io::Error::new(
            e.kind(),
            format!("no systemd journal answers on {JOURNAL_SOCKET}: {e}"),
        ));
    }
    let filter = format!("SANDBOX_ID={id}");
    let mut args = vec!["--no-pager", "--quiet", "-o", "short-iso"];
    for ident in JOURNAL_IDENTIFIERS {
        args.extend(["-t", ident]);
    }
    args.push(&filter);
    let lines = command_output("journalctl", &args).await?;
    if lines.trim().is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "the journal has no lines with {filter} (journalctl {})",
                args.join(" ")
            ),
        ));
    }
    Ok(lines)
}

/// Adds a bundle's `config.json`, redacted, with its values marked for scrubbing.
fn add_bundle(c: &mut Collection, item: &str, path: &Path) {
    let parsed = std::fs::read(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
        .and_then(|bytes| {
            serde_json::from_slice::<serde_json::Value>(&bytes)
                .map_err(|e| format!("{} is not JSON: {e}", path.display()))
        });
    match parsed {
        Ok(mut spec) => {
            let removed = redact_spec(&mut spec);
            c.secrets(removed);
            match serde_json::to_string_pretty(&spec) {
                Ok(j) => c.add(item, j + "\n"),
                Err(e) => c.error(item, e.to_string()),
            }
        }
        Err(e) => c.error(item, e),
    }
}

/// The `config.json` of every container of sandbox `id`, by container id: the sandbox's
/// own bundle and the bundles beside it (same runtime namespace) whose spec names `id` as
/// their sandbox.
pub fn bundles_of(sandbox_bundle: &Path, id: &str) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let name_of = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| id.to_owned())
    };
    let own = sandbox_bundle.join("config.json");
    if own.is_file() {
        out.insert(name_of(sandbox_bundle), own);
    }
    let Some(parent) = sandbox_bundle.parent() else {
        return out;
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return out;
    };
    for entry in entries.flatten() {
        let config = entry.path().join("config.json");
        if entry.path() == sandbox_bundle || !config.is_file() {
            continue;
        }
        let belongs = std::fs::read(&config)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|spec| {
                SANDBOX_ID_ANNOTATIONS
                    .iter()
                    .any(|k| spec["annotations"][k].as_str() == Some(id))
            });
        if belongs {
            out.insert(name_of(&entry.path()), config);
        }
    }
    out
}

/// One variable of a process's environment (only the one asked for is read out).
fn env_value(pid: u32, name: &str) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{name}=");
    raw.split(|b| *b == 0).find_map(|kv| {
        let kv = String::from_utf8_lossy(kv);
        kv.strip_prefix(&prefix).map(str::to_owned)
    })
}

/// One process as the tree shows it.
#[derive(Debug, Clone)]
struct Proc {
    pid: u32,
    ppid: u32,
    comm: String,
    args: String,
}

/// Reads `<proc>/<pid>/stat` and `cmdline` of every process.
fn processes(proc_root: &Path) -> Vec<Proc> {
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let (comm, ppid) = parse_stat(&stat)?;
            let args = std::fs::read(e.path().join("cmdline"))
                .map(|raw| {
                    raw.split(|b| *b == 0)
                        .filter(|a| !a.is_empty())
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            Some(Proc {
                pid,
                ppid,
                comm,
                args,
            })
        })
        .collect()
}

/// `(comm, ppid)` of a `/proc/<pid>/stat` line (comm may hold spaces and parentheses).
fn parse_stat(stat: &str) -> Option<(String, u32)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    let mut rest = stat.get(close + 1..)?.split_whitespace();
    let _state = rest.next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((comm, ppid))
}

/// The tree of `root` and its descendants, indented by depth (`None`: `root` is gone).
fn process_tree(proc_root: &Path, root: u32) -> Option<String> {
    let all = processes(proc_root);
    render_tree(&all, root)
}

fn render_tree(all: &[Proc], root: u32) -> Option<String> {
    let by_pid: BTreeMap<u32, &Proc> = all.iter().map(|p| (p.pid, p)).collect();
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for p in all {
        children.entry(p.ppid).or_default().push(p.pid);
    }
    by_pid.get(&root)?;
    let mut out = String::from("PID\tPPID\tCOMMAND\tARGS\n");
    let mut stack = vec![(root, 0usize)];
    while let Some((pid, depth)) = stack.pop() {
        let Some(p) = by_pid.get(&pid) else { continue };
        out.push_str(&format!(
            "{}{}\t{}\t{}\t{}\n",
            "  ".repeat(depth),
            p.pid,
            p.ppid,
            p.comm,
            p.args
        ));
        if let Some(kids) = children.get(&pid) {
            for k in kids.iter().rev() {
                stack.push((*k, depth + 1));
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc(pid: u32, ppid: u32, comm: &str) -> Proc {
        Proc {
            pid,
            ppid,
            comm: comm.into(),
            args: format!("/bin/{comm}"),
        }
    }

    #[test]
    fn stat_lines_parse_with_odd_names() {
        assert_eq!(
            parse_stat("42 (qemu (x) y) S 7 42 42 0"),
            Some(("qemu (x) y".into(), 7))
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn the_tree_holds_the_root_and_its_descendants_only() {
        let all = [
            proc(1, 0, "init"),
            proc(10, 1, "shim"),
            proc(11, 10, "qemu"),
            proc(12, 10, "virtiofsd"),
            proc(13, 12, "virtiofsd-child"),
            proc(20, 1, "other"),
        ];
        let tree = render_tree(&all, 10).unwrap();
        let lines: Vec<&str> = tree.lines().collect();
        assert_eq!(lines.len(), 5, "{tree}");
        assert!(lines[1].starts_with("10\t1\tshim"), "{tree}");
        assert!(lines[2].starts_with("  11\t10\tqemu"), "{tree}");
        assert!(
            lines[4].starts_with("    13\t12\tvirtiofsd-child"),
            "{tree}"
        );
        assert!(!tree.contains("other"));
        assert_eq!(render_tree(&all, 99), None);
    }

    #[test]
    fn bundles_of_a_sandbox_are_its_own_and_its_containers() {
        let ns = tempfile::tempdir().unwrap();
        let write = |dir: &str, spec: serde_json::Value| {
            std::fs::create_dir_all(ns.path().join(dir)).unwrap();
            std::fs::write(ns.path().join(dir).join("config.json"), spec.to_string()).unwrap();
        };
        write("sb", serde_json::json!({"annotations": {}}));
        write(
            "c1",
            serde_json::json!({"annotations": {"io.kubernetes.cri.sandbox-id": "sb"}}),
        );
        write(
            "c2",
            serde_json::json!({"annotations": {"io.kubernetes.cri.sandbox-id": "other"}}),
        );
        std::fs::create_dir(ns.path().join("empty")).unwrap();
        let found = bundles_of(&ns.path().join("sb"), "sb");
        assert_eq!(found.keys().collect::<Vec<_>>(), ["c1", "sb"]);
    }
}
