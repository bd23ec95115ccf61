//! The systemd journal as the tests read it: `journalctl` on the host's journal, which
//! `hack/test.sh` starts when none runs (`hack/lib/journald.sh`).

use std::process::Command;
use std::time::Duration;

use crate::wait_until;

/// The journal's socket (global: one journald per host).
pub const SOCKET: &str = "/run/systemd/journal/socket";

/// Panics with a hint unless a journal answers on [`SOCKET`].
pub fn require() {
    let sock = std::os::unix::net::UnixDatagram::unbound().expect("datagram socket");
    let probe = b"MESSAGE=kata-tests probe\nPRIORITY=7\nSYSLOG_IDENTIFIER=kata-test-probe\n";
    assert!(
        sock.send_to(probe, SOCKET).is_ok(),
        "no systemd journal on {SOCKET}: hack/test.sh starts one \
         (or: source hack/lib/journald.sh && journald_start)"
    );
}

fn journalctl(args: &[&str]) -> String {
    let out = Command::new("journalctl")
        .args(["--no-pager", "--quiet"])
        .args(args)
        .output()
        .expect("run journalctl (package systemd)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `journalctl -t <identifier> SANDBOX_ID=<sandbox> -o cat`: the MESSAGE of each entry.
pub fn messages(identifier: &str, sandbox: &str) -> Vec<String> {
    journalctl(&[
        "-t",
        identifier,
        &format!("SANDBOX_ID={sandbox}"),
        "-o",
        "cat",
    ])
    .lines()
    .map(str::to_owned)
    .collect()
}

/// The entries of [`messages`] with every field (`-o json`).
pub fn entries(identifier: &str, sandbox: &str) -> Vec<serde_json::Value> {
    journalctl(&[
        "-t",
        identifier,
        &format!("SANDBOX_ID={sandbox}"),
        "-o",
        "json",
    ])
    .lines()
    .filter_map(|l| serde_json::from_str(l).ok())
    .collect()
}

/// Waits (up to `timeout`) until a message of `identifier` for `sandbox` satisfies `pred`;
/// returns whether one did and the messages seen last.
pub fn wait_for(
    identifier: &str,
    sandbox: &str,
    timeout: Duration,
    pred: impl Fn(&str) -> bool,
) -> (bool, Vec<String>) {
    let mut last = Vec::new();
    let found = wait_until(timeout, || {
        last = messages(identifier, sandbox);
        last.iter().any(|m| pred(m))
    });
    (found, last)
}
