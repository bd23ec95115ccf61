//! Logging to the guest console.
//!
//! Every event is one line, prefixed `kata-agent: ` so the host can tell agent lines
//! from kernel lines in the captured console, and written with a single write(2). The
//! level comes from the kernel command line (`agent.log=debug`), default `info`.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::fmt::MakeWriter;

/// The prefix of every log line.
pub const PREFIX: &[u8] = b"kata-agent: ";

/// A bad logging setting.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoggingError {
    /// `agent.log=` names no level.
    #[error("unknown log level {0:?}")]
    Level(String),
}

/// Reads `agent.log=<level>` from a kernel command line (the last one wins); `info`
/// when absent.
pub fn level_from_cmdline(cmdline: &str) -> Result<LevelFilter, LoggingError> {
    match cmdline
        .split_whitespace()
        .rev()
        .find_map(|w| w.strip_prefix("agent.log="))
    {
        None => Ok(LevelFilter::INFO),
        Some(v) => parse_level(v),
    }
}

fn parse_level(v: &str) -> Result<LevelFilter, LoggingError> {
    Ok(match v.to_ascii_lowercase().as_str() {
        "trace" => LevelFilter::TRACE,
        "debug" => LevelFilter::DEBUG,
        "info" => LevelFilter::INFO,
        "warn" | "warning" => LevelFilter::WARN,
        "error" | "critical" | "fatal" | "panic" => LevelFilter::ERROR,
        "off" => LevelFilter::OFF,
        _ => return Err(LoggingError::Level(v.to_owned())),
    })
}

/// Where log lines go.
#[derive(Debug)]
enum Sink {
    Console(File),
    Stderr,
}

/// A [`MakeWriter`] producing [`LineWriter`]s.
#[derive(Debug)]
pub struct ConsoleMakeWriter {
    sink: Sink,
}

impl ConsoleMakeWriter {
    /// Opens `/dev/console` (without making it our controlling terminal) when `console`
    /// is set, falling back to stderr.
    pub fn new(console: bool) -> Self {
        let sink = if console {
            OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NOCTTY)
                .open("/dev/console")
                .map_or(Sink::Stderr, Sink::Console)
        } else {
            Sink::Stderr
        };
        Self { sink }
    }
}

impl<'a> MakeWriter<'a> for ConsoleMakeWriter {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            sink: &self.sink,
            buf: PREFIX.to_vec(),
        }
    }
}

/// Buffers one event and writes it, prefixed, in one call when dropped.
#[derive(Debug)]
pub struct LineWriter<'a> {
    sink: &'a Sink,
    buf: Vec<u8>,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter<'_> {
    fn drop(&mut self) {
        if self.buf.len() == PREFIX.len() {
            return;
        }
        // Nothing sensible can be done about a failed log write.
        let _ = match self.sink {
            Sink::Console(f) => (&*f).write_all(&self.buf),
            Sink::Stderr => io::stderr().write_all(&self.buf),
        };
    }
}

/// Installs the global subscriber. `cmdline` is the kernel command line (or any text
/// carrying `agent.log=`). Returns the level error, if any, after logging it.
pub fn init(console: bool, cmdline: &str) {
    let (level, bad) = match level_from_cmdline(cmdline) {
        Ok(l) => (l, None),
        Err(e) => (LevelFilter::INFO, Some(e)),
    };
    let installed = tracing_subscriber::fmt()
        .with_writer(ConsoleMakeWriter::new(console))
        .with_max_level(level)
        .with_ansi(false)
        .with_timer(tracing_subscriber::fmt::time::uptime())
        .with_target(false)
        .try_init();
    if let Err(e) = installed {
        let _ = writeln!(io::stderr(), "kata-agent: logging not initialised: {e}");
    }
    if let Some(e) = bad {
        tracing::warn!(error = %e, "using log level info");
    }
}

/// Formats an error and its sources as `a: b: c`, for logs and status messages.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_defaults_to_info() {
        assert_eq!(
            level_from_cmdline("console=ttyS0 quiet"),
            Ok(LevelFilter::INFO)
        );
        assert_eq!(level_from_cmdline(""), Ok(LevelFilter::INFO));
    }

    #[test]
    fn level_from_agent_log() {
        assert_eq!(
            level_from_cmdline("console=ttyS0 agent.log=debug\n"),
            Ok(LevelFilter::DEBUG)
        );
        assert_eq!(
            level_from_cmdline("agent.log=info agent.log=TRACE"),
            Ok(LevelFilter::TRACE)
        );
        assert_eq!(
            level_from_cmdline("agent.log=warning"),
            Ok(LevelFilter::WARN)
        );
        assert_eq!(
            level_from_cmdline("xagent.log=debug"),
            Ok(LevelFilter::INFO)
        );
        assert_eq!(
            level_from_cmdline("agent.log=loud"),
            Err(LoggingError::Level("loud".into()))
        );
    }

    #[test]
    fn chain_joins_sources() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] io::Error);
        let e = Outer(io::Error::other("inner"));
        assert_eq!(chain(&e), "outer: inner");
    }

    #[test]
    fn line_writer_prefixes_and_skips_empty() {
        let mk = ConsoleMakeWriter { sink: Sink::Stderr };
        let mut w = mk.make_writer();
        w.write_all(b"hello\n").unwrap();
        assert_eq!(w.buf, b"kata-agent: hello\n");
        std::mem::forget(w);
    }
}
