//! Whether a pod still exists on the node, for an adaptor that restarts and must tell its
//! pods from orphans (instances whose pod went away while it was down).
//!
//! A pod is alive when its network namespace (the one CreateVM named) still exists — the
//! CRI removes it when it tears the pod down — or, for a pod without one, when a shim for
//! its sandbox id still runs (a process whose arguments hold `-id <sandbox id>`, as
//! containerd and CRI-O start shims). A pod with neither is gone: its instance is an
//! orphan and is deleted.

use std::path::Path;

/// Whether the pod is still on the node. Blocking (reads /proc).
pub fn pod_alive(sandbox_id: &str, netns: Option<&Path>) -> bool {
    match netns {
        Some(ns) => ns.exists(),
        None => shim_running(Path::new("/proc"), sandbox_id),
    }
}

/// Whether a process under `proc` has `-id <sandbox_id>` among its arguments.
pub fn shim_running(proc: &Path, sandbox_id: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(proc) else {
        return false;
    };
    entries.flatten().any(|e| {
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            return false;
        };
        let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
        args.windows(2)
            .any(|w| w[0] == b"-id" && w[1] == sandbox_id.as_bytes())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_or_shim() {
        let t = tempfile::tempdir().unwrap();
        let proc = t.path().join("proc");
        std::fs::create_dir_all(proc.join("42")).unwrap();
        std::fs::write(
            proc.join("42/cmdline"),
            b"/usr/bin/containerd-shim-kata-v2\0-namespace\0k8s.io\0-id\0sb1\0-address\0/run/c.sock\0",
        )
        .unwrap();
        assert!(shim_running(&proc, "sb1"));
        assert!(!shim_running(&proc, "sb2"));
        let ns = t.path().join("netns");
        assert!(!pod_alive("sb2", Some(&ns)));
        std::fs::write(&ns, b"").unwrap();
        assert!(pod_alive("sb2", Some(&ns)));
    }
}
