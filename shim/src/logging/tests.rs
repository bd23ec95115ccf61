//! Unit tests of the layer: a temp file plays the fifo, a datagram socket the journal.

use std::collections::HashMap;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use super::*;

struct Harness {
    _dir: tempfile::TempDir,
    fifo_path: PathBuf,
    journal: UnixDatagram,
    control: Arc<Control>,
    layer: Option<KataLayer>,
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let fifo_path = dir.path().join("log");
        let socket = dir.path().join("journal.sock");
        let journal = UnixDatagram::bind(&socket).unwrap();
        journal
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let control = Arc::new(Control::new(false));
        let settings = Settings {
            sandbox_id: "sb1".into(),
            debug: false,
            fifo: Some(std::fs::File::create(&fifo_path).unwrap()),
            journal_socket: socket,
        };
        let layer = KataLayer::new(&settings, control.clone());
        Harness {
            _dir: dir,
            fifo_path,
            journal,
            control,
            layer: Some(layer),
        }
    }

    /// Runs `f` with the layer as the thread's subscriber (and a current-thread runtime,
    /// so spawned tasks log through it too).
    fn run<F: FnOnce()>(&mut self, f: F) {
        let subscriber = tracing_subscriber::registry().with(self.layer.take().unwrap());
        tracing::subscriber::with_default(subscriber, f);
    }

    fn fifo_lines(&self) -> Vec<String> {
        // The writer thread may lag a little behind.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut last = String::new();
        while Instant::now() < deadline {
            last = std::fs::read_to_string(&self.fifo_path).unwrap();
            if !last.is_empty() {
                std::thread::sleep(Duration::from_millis(50));
                last = std::fs::read_to_string(&self.fifo_path).unwrap();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        last.lines().map(str::to_owned).collect()
    }

    fn journal_entries(&self) -> Vec<HashMap<String, String>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n) = self.journal.recv(&mut buf) {
            out.push(parse_entry(&buf[..n]));
        }
        out
    }
}

fn parse_entry(mut d: &[u8]) -> HashMap<String, String> {
    let mut fields = HashMap::new();
    while !d.is_empty() {
        let nl = d.iter().position(|b| *b == b'\n').unwrap();
        let line = &d[..nl];
        if let Some(eq) = line.iter().position(|b| *b == b'=') {
            fields.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
            d = &d[nl + 1..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let len = u64::from_le_bytes(d[nl + 1..nl + 9].try_into().unwrap()) as usize;
            let value = &d[nl + 9..nl + 9 + len];
            fields.insert(key, String::from_utf8_lossy(value).into_owned());
            d = &d[nl + 9 + len + 1..];
        }
    }
    fields
}

#[test]
fn own_lines_go_to_the_fifo_and_the_journal_as_katas_logfmt() {
    let mut h = Harness::new();
    h.run(|| {
        tracing::info!(target: "kata_shim::task", container = "c1", "container created");
        tracing::debug!(target: "kata_shim::task", "hidden without debug");
        tracing::debug!(target: "ttrpc::server", "other crates stay quiet");
    });
    let lines = h.fifo_lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let pid = std::process::id();
    assert!(lines[0].starts_with("time=\""), "{}", lines[0]);
    assert!(
        lines[0].ends_with(&format!(
            "level=info msg=\"container created\" container=c1 name=containerd-shim-v2 pid={pid} sandbox=sb1 source=runtime"
        )),
        "{}",
        lines[0]
    );
    let entries = h.journal_entries();
    assert_eq!(entries.len(), 1);
    let e = &entries[0];
    assert_eq!(e["SYSLOG_IDENTIFIER"], "kata");
    assert_eq!(e["SANDBOX_ID"], "sb1");
    assert_eq!(e["PRIORITY"], "6");
    assert_eq!(e["CONTAINER"], "c1");
    assert!(
        e["MESSAGE"].starts_with("level=info msg=\"container created\""),
        "{e:?}"
    );
}

#[test]
fn debug_follows_the_runtime_switch() {
    let mut h = Harness::new();
    h.control.set(true, false);
    h.run(|| {
        tracing::debug!(target: "kata_shim::sandbox", "now visible");
        tracing::debug!(target: "ttrpc::server", "still quiet");
    });
    let lines = h.fifo_lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("level=debug msg=\"now visible\""));
    assert_eq!(h.journal_entries()[0]["PRIORITY"], "7");
}

fn console(line: &str) {
    tracing::info!(target: "guest_console", vm = "sb1", vmconsole = %line, "reading guest console");
}

#[test]
fn console_lines_need_the_hypervisor_switch_but_agent_warnings_always_pass() {
    let mut h = Harness::new();
    h.run(|| {
        console("[    0.000000] Linux version 6.1");
        console("kata-agent:      0.532134s  INFO kata_agent::server: serving ttrpc");
        console("kata-agent:      1.000000s  WARN request failed method=\"X\"");
    });
    let lines = h.fifo_lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("level=warning msg=\"reading guest console\""));
    assert!(lines[0].contains("source=agent"));
    assert!(lines[0].contains("vmconsole=\"kata-agent:      1.000000s  WARN request failed"));
}

#[test]
fn with_console_debug_every_line_is_relayed_at_its_level() {
    let mut h = Harness::new();
    h.control.set(false, true);
    h.run(|| {
        console("[    0.000000] Linux version 6.1");
        console("kata-agent:      0.532134s  INFO serving ttrpc addr=\"vsock://-1:1024\"");
        console("kata-agent:      0.600000s DEBUG noisy");
    });
    let lines = h.fifo_lines();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].contains("source=guest") && lines[0].contains("Linux version"));
    assert!(lines[1].contains("level=info") && lines[1].contains("source=agent"));
    let entries = h.journal_entries();
    assert_eq!(
        entries[1]["VMCONSOLE"],
        "kata-agent:      0.532134s  INFO serving ttrpc addr=\"vsock://-1:1024\""
    );
    assert!(entries[1]["MESSAGE"].contains("msg=\"reading guest console\""));
    assert!(entries[1]["MESSAGE"].contains("sandbox=sb1"));
}

/// The hypervisor crate's child-output events (a real child process) reach the journal
/// under the daemon's own identifier; QEMU's stay under `kata`.
#[test]
fn daemon_stderr_is_journaled_under_its_own_name() {
    use kata_hypervisor::process::{ChildProcess, Stdout};
    let mut h = Harness::new();
    h.run(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            for (name, text) in [
                ("virtiofsd", "[2024-05-01T12:00:00Z INFO  virtiofsd] Waiting for vhost-user socket connection..."),
                ("qemu", "qemu-system-x86_64: warning: host does not support requested feature"),
            ] {
                let mut cmd = tokio::process::Command::new("/bin/sh");
                cmd.arg("-c").arg(format!("echo '{text}' >&2"));
                let child = ChildProcess::spawn(name, "sb1", cmd, Stdout::Null).unwrap();
                child.wait().await;
                let _ = child.final_stderr().await;
            }
        });
    });
    let entries = h.journal_entries();
    let v = entries
        .iter()
        .find(|e| e["SYSLOG_IDENTIFIER"] == "virtiofsd")
        .unwrap_or_else(|| panic!("{entries:?}"));
    assert_eq!(
        v["MESSAGE"],
        "[2024-05-01T12:00:00Z INFO  virtiofsd] Waiting for vhost-user socket connection..."
    );
    assert_eq!(
        (v["PRIORITY"].as_str(), v["SANDBOX_ID"].as_str()),
        ("6", "sb1")
    );
    let q = entries
        .iter()
        .find(|e| e.get("PROCESS").map(String::as_str) == Some("qemu"))
        .unwrap_or_else(|| panic!("{entries:?}"));
    assert_eq!(
        (q["SYSLOG_IDENTIFIER"].as_str(), q["PRIORITY"].as_str()),
        ("kata", "4")
    );
    // Both are in containerd's log too.
    let lines = h.fifo_lines();
    assert!(
        lines.iter().any(|l| l.contains("source=virtiofsd")),
        "{lines:?}"
    );
}

#[test]
fn level_words() {
    assert_eq!(agent_level("kata-agent:   0.1s  INFO x"), Some(Level::INFO));
    assert_eq!(
        agent_level("kata-agent:   0.1s ERROR x"),
        Some(Level::ERROR)
    );
    assert_eq!(agent_level("[ 0.1] kata-agent: x"), None);
    assert_eq!(agent_level("random"), None);
    assert_eq!(
        child_level("virtiofsd", "[t WARN  virtiofsd] x"),
        Level::WARN
    );
    assert_eq!(child_level("virtiofsd", "plain"), Level::INFO);
    assert_eq!(child_level("qemu", "qemu: oops"), Level::ERROR);
}
