//! The shim's logging, as Kata does it: every line goes to containerd's (or CRI-O's) `log`
//! fifo in the bundle and, when `/run/systemd/journal/socket` exists, to the systemd
//! journal under the identifier `kata`, so `journalctl -t kata` shows it.
//!
//! - Format: Kata's logfmt (`level=info msg="..." name=containerd-shim-v2 pid=<pid>
//!   sandbox=<id> source=runtime key=value ...`). The journal entry's MESSAGE is that line
//!   (the journal keeps its own time); each field is also a journal field in upper case
//!   (`SANDBOX_ID`, `VMCONSOLE`, ...).
//! - Guest console lines (the hypervisor's target `guest_console`) are logged as
//!   `msg="reading guest console" vmconsole="<line>"`. The agent's own lines (prefixed
//!   `kata-agent: `) keep their level and get `source=agent`; kernel lines get
//!   `source=guest`. All of them are relayed with `[hypervisor.qemu] enable_debug`; without
//!   it only the agent's warnings and errors are.
//! - Helper daemons' stderr (the hypervisor's events with a `process` and a `stderr` field)
//!   goes to the journal under the daemon's own identifier (`journalctl -t virtiofsd`),
//!   with the daemon's line as MESSAGE, as its `--syslog` would have written it; QEMU's
//!   stays under `kata`, as Kata logs it.
//! - Level: info; debug with containerd's `-debug`, `KATA_SHIM_DEBUG`, or `[runtime]
//!   enable_debug` (read at sandbox creation, [`set_debug_switches`]). Other crates' debug
//!   lines stay off.
//! - Nothing blocks: each destination is a [`sink::Sink`], a bounded queue drained by a
//!   thread of its own, dropping (and counting, [`dropped_lines`]) what a stalled reader
//!   does not take.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;

pub mod format;
pub mod journal;
pub mod sink;

use format::Fields;
use sink::Sink;

/// The `name` field of every line (Kata's).
pub const NAME: &str = "containerd-shim-v2";
/// The journal identifier of the shim's own lines.
pub const IDENTIFIER: &str = "kata";
/// The hypervisor crate's target for guest console lines.
pub const CONSOLE_TARGET: &str = "guest_console";
/// The prefix of the agent's console lines.
const AGENT_PREFIX: &str = "kata-agent:";

/// Where and how the shim logs.
#[derive(Debug)]
pub struct Settings {
    /// The sandbox this shim serves (the `sandbox` field and `SANDBOX_ID`).
    pub sandbox_id: String,
    /// Debug from the start (containerd's `-debug`, `KATA_SHIM_DEBUG`).
    pub debug: bool,
    /// containerd's `log` fifo; `None` logs to stderr instead.
    pub fifo: Option<std::fs::File>,
    /// The journal's socket (tests point it elsewhere).
    pub journal_socket: PathBuf,
}

/// The switches that change after start (configuration is read at sandbox creation).
#[derive(Debug, Default)]
pub struct Control {
    debug_flag: bool,
    runtime_debug: AtomicBool,
    console_debug: AtomicBool,
}

impl Control {
    /// Switches with the start-up debug flag.
    pub fn new(debug_flag: bool) -> Self {
        Self {
            debug_flag,
            ..Self::default()
        }
    }

    fn debug(&self) -> bool {
        self.debug_flag || self.runtime_debug.load(Ordering::Relaxed)
    }

    fn console(&self) -> bool {
        self.console_debug.load(Ordering::Relaxed)
    }

    /// `[runtime] enable_debug` and `[hypervisor.qemu] enable_debug`.
    pub fn set(&self, runtime: bool, console: bool) {
        self.runtime_debug.store(runtime, Ordering::Relaxed);
        self.console_debug.store(console, Ordering::Relaxed);
    }
}

/// What the process installed, for the setters below.
struct Installed {
    control: Arc<Control>,
    sinks: Vec<Sink>,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// Installs the shim's logging (once per process; later calls do nothing).
pub fn init(settings: Settings) {
    let control = Arc::new(Control::new(settings.debug));
    let layer = KataLayer::new(&settings, control.clone());
    let sinks = layer.sinks();
    if tracing_subscriber::registry()
        .with(layer)
        .try_init()
        .is_ok()
    {
        let _ = INSTALLED.set(Installed { control, sinks });
    }
}

/// Applies `[runtime] enable_debug` (debug lines) and `[hypervisor.qemu] enable_debug`
/// (every guest console line).
pub fn set_debug_switches(runtime: bool, console: bool) {
    if let Some(i) = INSTALLED.get() {
        i.control.set(runtime, console);
    }
}

/// Waits up to `timeout` for queued lines to be written: call it before the process exits.
pub fn flush(timeout: std::time::Duration) {
    if let Some(i) = INSTALLED.get() {
        for sink in &i.sinks {
            sink.flush(timeout);
        }
    }
}

/// Log lines dropped so far because a reader did not keep up (fifo or journal).
pub fn dropped_lines() -> u64 {
    INSTALLED
        .get()
        .map(|i| i.sinks.iter().map(Sink::dropped).sum())
        .unwrap_or(0)
}

/// How an event is written.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    /// The shim's own line.
    Own,
    /// A guest console line; `agent` when the agent wrote it.
    Console { agent: bool },
    /// A helper daemon's stderr line, journaled under `identifier`.
    Child { identifier: String },
}

/// The layer writing Kata's lines to the fifo (or stderr) and the journal.
pub struct KataLayer {
    control: Arc<Control>,
    sandbox_id: String,
    pid: String,
    fifo: Sink,
    journal: Option<Sink>,
}

impl std::fmt::Debug for KataLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KataLayer")
            .field("sandbox_id", &self.sandbox_id)
            .finish_non_exhaustive()
    }
}

fn level_name(level: Level) -> &'static str {
    match level {
        Level::ERROR => "error",
        Level::WARN => "warning",
        Level::INFO => "info",
        _ => "debug",
    }
}

/// The level word of a line printed by a logger (`INFO`, `warn`, `[ERROR`...).
fn level_word(word: &str) -> Option<Level> {
    let w = word.trim_matches(|c: char| !c.is_ascii_alphabetic());
    Some(match w.to_ascii_uppercase().as_str() {
        "ERROR" | "ERR" | "FATAL" | "CRITICAL" => Level::ERROR,
        "WARN" | "WARNING" => Level::WARN,
        "INFO" => Level::INFO,
        "DEBUG" => Level::DEBUG,
        "TRACE" => Level::TRACE,
        _ => return None,
    })
}

/// The level of an agent console line (`kata-agent:   1.234s  INFO message`).
fn agent_level(line: &str) -> Option<Level> {
    let rest = line.trim_start().strip_prefix(AGENT_PREFIX)?;
    let mut words = rest.split_whitespace();
    let first = words.next()?;
    match level_word(first) {
        Some(level) => Some(level),
        None => words.next().and_then(level_word),
    }
}

/// The level of a daemon's stderr line: the first level word among its first words;
/// QEMU's lines are errors unless they say `warning:` (as Kata logs them).
fn child_level(process: &str, line: &str) -> Level {
    if process == "qemu" {
        return if line.contains("warning:") {
            Level::WARN
        } else {
            Level::ERROR
        };
    }
    line.split_whitespace()
        .take(4)
        .find_map(level_word)
        .unwrap_or(Level::INFO)
}

impl KataLayer {
    /// A layer for `settings`, its switches in `control`. Starts the writer threads.
    pub fn new(settings: &Settings, control: Arc<Control>) -> Self {
        let pid = std::process::id().to_string();
        let notice_fields = (settings.sandbox_id.clone(), pid.clone());
        let notice = move |with_time: bool| {
            let (sandbox, pid) = notice_fields.clone();
            move |n: u64| {
                let time = with_time.then(|| format::rfc3339(SystemTime::now()));
                let mut l = format::line(
                    time.as_deref(),
                    "warning",
                    "log lines dropped: the reader did not keep up",
                    &[("dropped", n.to_string())],
                    &[("name", NAME), ("pid", &pid), ("sandbox", &sandbox)],
                );
                l.push('\n');
                l.into_bytes()
            }
        };
        let fifo_write: sink::WriteFn = match &settings.fifo {
            Some(f) => match f.try_clone() {
                Ok(mut f) => Box::new(move |l| std::io::Write::write_all(&mut f, l)),
                Err(_) => Box::new(|l| std::io::Write::write_all(&mut std::io::stderr(), l)),
            },
            None => Box::new(|l| std::io::Write::write_all(&mut std::io::stderr(), l)),
        };
        let fifo = Sink::spawn(
            "log-fifo",
            sink::QUEUE_LINES,
            fifo_write,
            Box::new(notice(true)),
        )
        .unwrap_or_else(|_| {
            // No thread: a sink whose queue nobody drains drops (and counts) everything.
            Sink::spawn(
                "log-null",
                1,
                Box::new(|_| Ok(())),
                Box::new(|_| Vec::new()),
            )
            .expect("a second thread spawn")
        });
        let journal_notice = notice(false);
        let journal = journal::available(&settings.journal_socket)
            .then(|| journal::writer(settings.journal_socket.clone()).ok())
            .flatten()
            .and_then(|w| {
                let sandbox = settings.sandbox_id.clone();
                let notice = Box::new(move |n| {
                    let message = String::from_utf8_lossy(&journal_notice(n)).into_owned();
                    journal::datagram(&[
                        ("MESSAGE", message.trim_end()),
                        ("PRIORITY", "4"),
                        ("SYSLOG_IDENTIFIER", IDENTIFIER),
                        ("SANDBOX_ID", &sandbox),
                    ])
                });
                Sink::spawn("log-journal", sink::QUEUE_LINES, w, notice).ok()
            });
        KataLayer {
            control,
            sandbox_id: settings.sandbox_id.clone(),
            pid,
            fifo,
            journal,
        }
    }

    /// The sinks, for the drop count.
    pub fn sinks(&self) -> Vec<Sink> {
        self.fifo_and_journal().cloned().collect()
    }

    fn fifo_and_journal(&self) -> impl Iterator<Item = &Sink> {
        std::iter::once(&self.fifo).chain(self.journal.as_ref())
    }

    /// The most verbose level enabled for `target`.
    fn max_level(&self, target: &str) -> Level {
        let ours = target.starts_with("kata_") || target == CONSOLE_TARGET;
        if self.control.debug() && ours {
            Level::DEBUG
        } else {
            Level::INFO
        }
    }

    /// Whether and how `event` is written, at which level.
    fn classify(&self, meta: &Metadata<'_>, fields: &Fields) -> Option<(Level, Kind)> {
        let max = self.max_level(meta.target());
        let (level, kind) = if meta.target() == CONSOLE_TARGET {
            let line = fields.get("vmconsole").unwrap_or_default();
            let agent = agent_level(line);
            let level = agent.unwrap_or(Level::INFO);
            let always = agent.is_some() && level <= Level::WARN;
            if !(self.control.console() || always) {
                return None;
            }
            (
                level,
                Kind::Console {
                    agent: agent.is_some(),
                },
            )
        } else if let (Some(process), Some(line)) = (fields.get("process"), fields.get("stderr")) {
            let identifier = if process == "qemu" {
                IDENTIFIER
            } else {
                process
            };
            (
                child_level(process, line),
                Kind::Child {
                    identifier: identifier.to_owned(),
                },
            )
        } else {
            (*meta.level(), Kind::Own)
        };
        (level <= max).then_some((level, kind))
    }

    fn write(&self, level: Level, kind: &Kind, fields: &Fields) {
        let source = match kind {
            Kind::Own => "runtime",
            Kind::Console { agent: true } => "agent",
            Kind::Console { agent: false } => "guest",
            Kind::Child { .. } => fields.get("process").unwrap_or("runtime"),
        };
        let common = [
            ("name", NAME),
            ("pid", self.pid.as_str()),
            ("sandbox", self.sandbox_id.as_str()),
            ("source", source),
        ];
        let time = format::rfc3339(SystemTime::now());
        let level_text = level_name(level);
        let mut fifo_line = format::line(
            Some(&time),
            level_text,
            &fields.message,
            &fields.fields,
            &common,
        );
        fifo_line.push('\n');
        self.fifo.send(fifo_line.into_bytes());

        let Some(journal) = &self.journal else {
            return;
        };
        let priority = journal::priority(level);
        let entry = match kind {
            Kind::Child { identifier } if identifier != IDENTIFIER => journal::datagram(&[
                ("MESSAGE", fields.get("stderr").unwrap_or_default()),
                ("PRIORITY", priority),
                ("SYSLOG_IDENTIFIER", identifier),
                ("SANDBOX_ID", &self.sandbox_id),
            ]),
            _ => {
                let message =
                    format::line(None, level_text, &fields.message, &fields.fields, &common);
                let names: Vec<(String, &str)> = fields
                    .fields
                    .iter()
                    .filter_map(|(k, v)| journal::field_name(k).map(|n| (n, v.as_str())))
                    .filter(|(n, _)| !RESERVED.contains(&n.as_str()))
                    .collect();
                let mut all: Vec<(&str, &str)> = vec![
                    ("MESSAGE", &message),
                    ("PRIORITY", priority),
                    ("SYSLOG_IDENTIFIER", IDENTIFIER),
                    ("SANDBOX_ID", &self.sandbox_id),
                    ("NAME", NAME),
                    ("SOURCE", source),
                ];
                all.extend(names.iter().map(|(n, v)| (n.as_str(), *v)));
                journal::datagram(&all)
            }
        };
        journal.send(entry);
    }
}

/// Journal fields the layer sets itself; an event field of that name is not repeated.
const RESERVED: [&str; 6] = [
    "MESSAGE",
    "PRIORITY",
    "SYSLOG_IDENTIFIER",
    "SANDBOX_ID",
    "NAME",
    "SOURCE",
];

impl<S: Subscriber> Layer<S> for KataLayer {
    fn enabled(&self, meta: &Metadata<'_>, _ctx: Context<'_, S>) -> bool {
        // Console lines are judged by their content (the agent's level) in on_event.
        meta.target() == CONSOLE_TARGET || *meta.level() <= self.max_level(meta.target())
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        if let Some((level, kind)) = self.classify(event.metadata(), &fields) {
            self.write(level, &kind, &fields);
        }
    }
}

#[cfg(test)]
mod tests;
