//! A log destination that never blocks the caller: lines go through a bounded queue to a
//! thread of their own, which does the (possibly blocking) write. When the queue is full
//! because the reader stalled (containerd stopped reading its fifo, journald is busy), new
//! lines are dropped and counted; where lines are missing, the writer puts a notice saying
//! how many.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

/// Lines a sink queues before it drops.
pub const QUEUE_LINES: usize = 1024;

/// Writes one line; `Err` means the line is lost (counted, never retried).
pub type WriteFn = Box<dyn FnMut(&[u8]) -> std::io::Result<()> + Send>;
/// Formats the notice about `n` dropped lines.
pub type NoticeFn = Box<dyn Fn(u64) -> Vec<u8> + Send>;

/// A numbered line on its way to the writer.
type Numbered = (u64, Vec<u8>);

/// The sending side of a sink; cheap to share.
#[derive(Debug, Clone)]
pub struct Sink {
    /// Numbers every line offered, so the writer sees where lines went missing. Held only
    /// around a non-blocking `try_send`, so the numbers follow the queue's order.
    tx: Arc<Mutex<(u64, SyncSender<Numbered>)>>,
    dropped: Arc<AtomicU64>,
    /// Lines queued and not yet written (or given up).
    pending: Arc<AtomicU64>,
}

impl Sink {
    /// Starts the writer thread `name` with a queue of `capacity` lines.
    pub fn spawn(
        name: &str,
        capacity: usize,
        write: WriteFn,
        notice: NoticeFn,
    ) -> std::io::Result<Sink> {
        let (tx, rx) = sync_channel(capacity);
        let dropped = Arc::new(AtomicU64::new(0));
        let pending = Arc::new(AtomicU64::new(0));
        let (counter, left) = (dropped.clone(), pending.clone());
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || run(rx, counter, left, write, notice))?;
        Ok(Sink {
            tx: Arc::new(Mutex::new((0, tx))),
            dropped,
            pending,
        })
    }

    /// Queues `line`, or drops and counts it when the queue is full. Never blocks.
    pub fn send(&self, line: Vec<u8>) {
        let mut tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let seq = tx.0;
        tx.0 += 1;
        self.pending.fetch_add(1, Ordering::Relaxed);
        match tx.1.try_send((seq, line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.pending.fetch_sub(1, Ordering::Relaxed);
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Waits up to `timeout` for the queued lines to be written (before the process
    /// exits); false if some are still waiting (a stalled reader).
    pub fn flush(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while self.pending.load(Ordering::Relaxed) > 0 {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        true
    }

    /// Lines dropped so far (queue full or write failed).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Writes lines in order; where numbers are missing, first a notice of how many.
fn run(
    rx: Receiver<Numbered>,
    dropped: Arc<AtomicU64>,
    pending: Arc<AtomicU64>,
    mut write: WriteFn,
    notice: NoticeFn,
) {
    let mut expected = 0;
    while let Ok((seq, line)) = rx.recv() {
        if seq > expected {
            // A lost notice is not worth another.
            let _ = write(&notice(seq - expected));
        }
        expected = seq + 1;
        if write(&line).is_err() {
            dropped.fetch_add(1, Ordering::Relaxed);
        }
        pending.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    use std::time::{Duration, Instant};

    #[test]
    fn lines_arrive_in_order_and_drops_are_announced() {
        let got = Arc::new(Mutex::new(Vec::<String>::new()));
        let g = got.clone();
        let (entered_tx, entered_rx) = std::sync::mpsc::channel::<()>();
        let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
        let gate = Mutex::new((entered_tx, gate_rx));
        let sink = Sink::spawn(
            "test-sink",
            2,
            Box::new(move |l| {
                // Each write announces itself and waits for the test to let it through.
                let gate = gate.lock().unwrap();
                let _ = gate.0.send(());
                let _ = gate.1.recv();
                g.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(l).into_owned());
                Ok(())
            }),
            Box::new(|n| format!("dropped {n}").into_bytes()),
        )
        .unwrap();
        sink.send(b"line 0".to_vec());
        entered_rx.recv().unwrap();
        // The writer is stuck on line 0: two lines fit the queue, seven are dropped.
        for i in 1..10 {
            sink.send(format!("line {i}").into_bytes());
        }
        assert_eq!(sink.dropped(), 7);
        for _ in 0..3 {
            gate_tx.send(()).unwrap();
            if entered_rx.recv_timeout(Duration::from_secs(10)).is_err() {
                break;
            }
        }
        // Line 2 is being written: the queue is empty again.
        sink.send(b"after".to_vec());
        for _ in 0..3 {
            let _ = gate_tx.send(());
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.lock().unwrap().len() < 5 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(sink.flush(Duration::from_secs(10)));
        assert_eq!(
            *got.lock().unwrap(),
            ["line 0", "line 1", "line 2", "dropped 7", "after"],
            "the notice stands where the lines went missing"
        );
    }

    /// A fifo whose reader never reads: the writer thread blocks once the pipe is full,
    /// the caller never does.
    #[test]
    fn a_fifo_nobody_reads_never_blocks_the_logger() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let mut reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        let mut fifo = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let sink = Sink::spawn(
            "test-fifo",
            QUEUE_LINES,
            Box::new(move |l| std::io::Write::write_all(&mut fifo, l)),
            Box::new(|n| format!("dropped {n}\n").into_bytes()),
        )
        .unwrap();
        let line = vec![b'x'; 1023];
        // 40 MiB: far more than the pipe (64 KiB) and the queue (1024 lines) hold.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let s = sink.clone();
        std::thread::spawn(move || {
            for _ in 0..40 * 1024 {
                s.send(line.clone());
            }
            let _ = done_tx.send(());
        });
        // A blocked logger would never finish; a generous bound keeps a failure finite.
        assert!(
            done_rx.recv_timeout(Duration::from_secs(120)).is_ok(),
            "logging blocked on a fifo nobody reads"
        );
        let dropped = sink.dropped();
        assert!(dropped > 30 * 1024, "only {dropped} lines dropped");
        // The pipe holds what the writer managed before it blocked, nothing was lost
        // silently: written + queued + dropped = sent.
        let mut buf = vec![0u8; 1 << 20];
        let n = reader.read(&mut buf).unwrap_or(0);
        assert!(n > 0, "the writer wrote until the pipe was full");
    }
}
