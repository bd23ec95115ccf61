//! Line capture of child output: the guest serial console and daemons' stderr.
//!
//! A reader task splits a pipe into lines, logs each one and keeps the last lines in a
//! [`LineRing`] so errors can show what the guest or a daemon printed last.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Lines longer than this are split.
const MAX_LINE: u64 = 4096;

/// A bounded buffer of the most recent lines; cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct LineRing {
    lines: Arc<Mutex<VecDeque<String>>>,
    capacity: usize,
}

impl LineRing {
    /// A ring keeping the last `capacity` lines.
    pub fn new(capacity: usize) -> LineRing {
        LineRing {
            lines: Arc::new(Mutex::new(VecDeque::with_capacity(capacity))),
            capacity,
        }
    }

    /// Appends a line, dropping the oldest when full.
    pub fn push(&self, line: String) {
        let mut lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        if lines.len() == self.capacity {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    /// The kept lines, oldest first.
    pub fn tail(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// The kept lines joined with newlines.
    pub fn text(&self) -> String {
        self.tail().join("\n")
    }
}

/// How captured lines are logged.
#[derive(Debug, Clone)]
pub enum LogAs {
    /// Guest serial console lines of VM `vm` ("reading guest console").
    GuestConsole { vm: String },
    /// stderr of the process `name` belonging to VM `vm`.
    Stderr { vm: String, name: String },
}

impl LogAs {
    fn log(&self, line: &str) {
        match self {
            LogAs::GuestConsole { vm } => {
                tracing::info!(target: "guest_console", vm = %vm, vmconsole = %line, "reading guest console")
            }
            LogAs::Stderr { vm, name } => {
                tracing::info!(vm = %vm, process = %name, stderr = %line, "child output")
            }
        }
    }
}

/// Reads `reader` line by line until EOF, logging each line and pushing it into `ring`.
/// The returned watch turns `true` once EOF (or a read error) was reached.
pub fn spawn_line_reader<R>(
    reader: R,
    ring: LineRing,
    log: LogAs,
) -> (JoinHandle<()>, watch::Receiver<bool>)
where
    R: AsyncRead + Send + Unpin + 'static,
{
    let (done_tx, done_rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut reader = BufReader::new(reader);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match (&mut reader)
                .take(MAX_LINE)
                .read_until(b'\n', &mut buf)
                .await
            {
                Ok(0) => break,
                Ok(_) => {
                    let line = clean_line(&buf);
                    log.log(&line);
                    ring.push(line);
                }
                Err(error) => {
                    tracing::debug!(%error, ?log, "reading child output failed");
                    break;
                }
            }
        }
        let _ = done_tx.send(true);
    });
    (task, done_rx)
}

/// Decodes a raw line lossily and drops the newline and control characters.
fn clean_line(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw)
        .chars()
        .filter(|c| !c.is_control() || *c == '\t')
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn ring_keeps_last_lines() {
        let ring = LineRing::new(2);
        for l in ["a", "b", "c"] {
            ring.push(l.into());
        }
        assert_eq!(ring.tail(), ["b", "c"]);
        assert_eq!(ring.text(), "b\nc");
    }

    #[tokio::test]
    async fn reader_splits_and_cleans_lines() {
        let (mut w, r) = tokio::io::duplex(64);
        let ring = LineRing::new(10);
        let (task, mut done) =
            spawn_line_reader(r, ring.clone(), LogAs::GuestConsole { vm: "t".into() });
        w.write_all(b"hello\r\nworld\x1b[0m\npartial")
            .await
            .unwrap();
        drop(w);
        task.await.unwrap();
        assert!(*done.wait_for(|d| *d).await.unwrap());
        assert_eq!(ring.tail(), ["hello", "world[0m", "partial"]);
    }
}
