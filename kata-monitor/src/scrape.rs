//! One scrape of every running shim: all at once, each bounded by [`SHIM_TIMEOUT`]; each
//! answer parsed, every sample labelled with `sandbox_id`, `cri_uid`, `cri_name` and
//! `cri_namespace`, and the families of all shims merged by name. A shim that is gone,
//! slow, or answers nonsense costs one `kata_monitor_scrape_failed_count`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kata_metrics::names;
use kata_metrics::process::{self, Style};
use kata_metrics::{Families, MetricFamily};
use prometheus::core::Collector;
use prometheus::{Histogram, HistogramOpts};

use crate::cri::PodMeta;
use crate::sandboxes::Sandbox;
use crate::Monitor;

/// Deadline of one shim's answer (Kata's).
pub const SHIM_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest shim answer accepted.
const MAX_SHIM_TEXT: usize = 16 << 20;

/// Why a shim could not be scraped.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("scraping sandbox {sandbox}")]
    Request {
        sandbox: String,
        #[source]
        source: kata_metrics::client::ClientError,
    },
    #[error("sandbox {sandbox} answered HTTP {status}")]
    Status { sandbox: String, status: u16 },
    #[error("sandbox {sandbox} answered malformed metrics")]
    Parse {
        sandbox: String,
        #[source]
        source: kata_metrics::text::ParseError,
    },
}

/// kata-monitor's own counters.
#[derive(Debug)]
pub struct Stats {
    scrapes: AtomicU64,
    failed: AtomicU64,
    durations: Histogram,
}

impl Default for Stats {
    fn default() -> Self {
        let opts = HistogramOpts::new(
            names::MONITOR_SCRAPE_DURATIONS,
            "Time to scrape every shim, ms.",
        )
        .buckets(names::latency_buckets_ms());
        Self {
            scrapes: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            durations: Histogram::with_opts(opts).expect("a constant name and buckets are valid"),
        }
    }
}

impl Stats {
    /// Counts a failed shim scrape.
    pub fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }
}

/// `GET /metrics` of one shim: its text, unchanged.
pub async fn shim_text(sandbox: &Sandbox, path: &str) -> Result<String, ShimError> {
    let r = kata_metrics::client::get(&sandbox.socket(), path, SHIM_TIMEOUT, MAX_SHIM_TEXT)
        .await
        .map_err(|source| ShimError::Request {
            sandbox: sandbox.id.clone(),
            source,
        })?;
    if r.status != 200 {
        return Err(ShimError::Status {
            sandbox: sandbox.id.clone(),
            status: r.status,
        });
    }
    Ok(r.text())
}

async fn shim_families(sandbox: &Sandbox) -> Result<Vec<MetricFamily>, ShimError> {
    let text = shim_text(sandbox, names::METRICS_PATH).await?;
    kata_metrics::text::parse(&text, MAX_SHIM_TEXT).map_err(|source| ShimError::Parse {
        sandbox: sandbox.id.clone(),
        source,
    })
}

fn own_families(monitor: &Monitor, running: usize) -> Vec<MetricFamily> {
    let stats = &monitor.stats;
    let mut f = Families::new();
    f.gauge(
        names::MONITOR_RUNNING_SHIMS,
        "Running shims (sandboxes with a management socket).",
        running as f64,
    );
    f.counter(
        names::MONITOR_SCRAPE_COUNT,
        "Scrapes of kata-monitor's /metrics.",
        stats.scrapes.load(Ordering::Relaxed) as f64,
    );
    f.counter(
        names::MONITOR_SCRAPE_FAILED,
        "Shim scrapes that failed or timed out.",
        stats.failed.load(Ordering::Relaxed) as f64,
    );
    f.extend(stats.durations.collect());
    if let Ok(me) = process::read(None, false) {
        me.families("kata_monitor_process", "kata-monitor", Style::Host, &mut f);
    }
    f.into_vec()
}

/// Every running shim's families, labelled and merged, after kata-monitor's own.
pub async fn collect(monitor: &Monitor) -> Vec<MetricFamily> {
    let started = Instant::now();
    monitor.stats.scrapes.fetch_add(1, Ordering::Relaxed);
    let running = monitor.sandboxes.running().await;
    let ids: Vec<String> = running.iter().map(|s| s.id.clone()).collect();
    let scrapes = futures::future::join_all(running.iter().map(shim_families));
    let (meta, answers) = tokio::join!(monitor.cri.metadata(&ids), scrapes);
    let mut merged: Vec<MetricFamily> = Vec::new();
    for (sandbox, answer) in running.iter().zip(answers) {
        match answer {
            Ok(mut families) => {
                let m = meta.get(&sandbox.id).cloned().unwrap_or_else(|| {
                    tracing::debug!(sandbox = %sandbox.id, "no CRI metadata");
                    PodMeta::default()
                });
                kata_metrics::text::add_labels(
                    &mut families,
                    &[
                        (names::LABEL_SANDBOX_ID, &sandbox.id),
                        (names::LABEL_CRI_UID, &m.uid),
                        (names::LABEL_CRI_NAME, &m.name),
                        (names::LABEL_CRI_NAMESPACE, &m.namespace),
                    ],
                );
                for conflict in kata_metrics::text::merge(&mut merged, families) {
                    tracing::warn!(sandbox = %sandbox.id, family = %conflict, "family type differs from other shims'; left out");
                }
            }
            Err(error) => {
                monitor.stats.failed();
                tracing::warn!(error = %crate::cri::chain(&error), "shim scrape failed");
            }
        }
    }
    monitor
        .stats
        .durations
        .observe(started.elapsed().as_secs_f64() * 1000.0);
    let mut all = own_families(monitor, running.len());
    all.extend(merged);
    all
}

/// Keeps the families whose name starts with one of `prefixes` (`filter_family`).
pub fn filter_families(families: Vec<MetricFamily>, prefixes: &[&str]) -> Vec<MetricFamily> {
    families
        .into_iter()
        .filter(|f| prefixes.iter().any(|p| f.name().starts_with(p)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cri::Cri;
    use crate::sandboxes::Sandboxes;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    /// A fake shim answering every request with `body` (or never, when `None`).
    fn fake_shim(dir: &std::path::Path, id: &str, body: Option<&'static str>) {
        std::fs::create_dir_all(dir.join(id)).unwrap();
        let listener = UnixListener::bind(dir.join(id).join(names::MANAGEMENT_SOCKET)).unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                if let Some(body) = body {
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(answer.as_bytes()).await;
                } else {
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        drop(s);
                    });
                }
            }
        });
    }

    #[tokio::test]
    async fn shims_are_labelled_merged_and_failures_counted() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("kata");
        let body = "# TYPE kata_hypervisor_threads gauge\nkata_hypervisor_threads{sandbox_id=\"forged\"} 5\n";
        fake_shim(&root, "pod-a", Some(body));
        fake_shim(&root, "pod-b", Some(body));
        fake_shim(&root, "pod-c", Some("not metrics at all\n"));
        fake_shim(&root, "pod-d", None);
        // A killed shim's socket before the cleanup removes it: connections are refused.
        std::fs::create_dir_all(root.join("pod-dead")).unwrap();
        drop(
            std::os::unix::net::UnixListener::bind(
                root.join("pod-dead").join(names::MANAGEMENT_SOCKET),
            )
            .unwrap(),
        );
        std::fs::create_dir_all(root.join("pod-no-socket")).unwrap();
        let sandboxes = Sandboxes::new(vec![root]);
        sandboxes.scan().await;
        let monitor = Monitor {
            sandboxes,
            cri: Cri::new(&dir.path().join("no-cri.sock")),
            stats: Stats::default(),
        };
        let families = collect(&monitor).await;
        let mut text = String::new();
        kata_metrics::encode_into(&families, &mut text).unwrap();
        assert!(
            text.contains("kata_monitor_running_shim_count 5\n"),
            "{text}"
        );
        assert!(text.contains("kata_monitor_scrape_count 1\n"), "{text}");
        // pod-c answered garbage, pod-d nothing within the deadline, pod-dead refused.
        assert!(
            text.contains("kata_monitor_scrape_failed_count 3\n"),
            "{text}"
        );
        assert!(text.contains(
            "kata_hypervisor_threads{sandbox_id=\"pod-a\",cri_uid=\"\",cri_name=\"\",cri_namespace=\"\"} 5\n"
        ), "{text}");
        assert!(text.contains("sandbox_id=\"pod-b\""), "{text}");
        assert_eq!(text.matches("# TYPE kata_hypervisor_threads").count(), 1);
        assert!(!text.contains("forged"));
        assert!(text.contains("kata_monitor_scrape_durations_histogram_milliseconds_count 1\n"));
        let only = filter_families(families, &["kata_hypervisor"]);
        assert_eq!(only.len(), 1);
    }
}
