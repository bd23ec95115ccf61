//! One `/metrics` answer: read at the time of the request, bounded in time.
//!
//! The agent's GetMetrics, then the host side (the shim, QEMU and virtiofsd from `/proc`,
//! the pod network namespace's devices as QEMU's, on a blocking thread), each with its own
//! deadline. An agent that is dead, slow
//! or answers nonsense costs its families and one count of
//! `kata_shim_agent_scrape_failures_total`; the host side is always answered. What the guest
//! sends is parsed and only its `kata_agent_*` / `kata_guest_*` families are kept, so a
//! guest cannot forge host metrics or break the text format.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kata_metrics::names;
use kata_metrics::process::{self, ProcessSample, Style};
use kata_metrics::{Families, MetricFamily};
use procfs::net::{DeviceStatus, InterfaceDeviceStatus};

use super::overhead::{self, HostUsage};
use super::ShimMonitor;
use crate::sandbox::Sandbox;

/// Deadline of the agent's part of a scrape.
pub const AGENT_TIMEOUT: Duration = Duration::from_millis(2000);
/// Deadline of the host part (reading /proc can stall behind a busy QEMU's mm lock).
pub const HOST_TIMEOUT: Duration = Duration::from_millis(2000);
/// Largest agent answer accepted (a guest has ~40 KiB).
const MAX_AGENT_TEXT: usize = 1 << 20;

/// The host processes of a sandbox, read on a blocking thread.
#[derive(Debug, Default)]
struct HostSide {
    shim: Option<ProcessSample>,
    qemu: Option<ProcessSample>,
    virtiofsd: Option<ProcessSample>,
    usage: Option<HostUsage>,
}

/// Reads `pid` if it is still our child (a recycled pid is someone else's process).
fn read_child(pid: u32) -> Option<ProcessSample> {
    let sample = process::read(Some(i32::try_from(pid).ok()?), false).ok()?;
    (u32::try_from(sample.stat.ppid).ok() == Some(std::process::id())).then_some(sample)
}

/// `net/dev` of the network namespace `netns`, read from a thread that enters it (and
/// ends with it, so no pooled thread is left in the pod's namespace).
fn netns_devices(netns: &Path) -> Option<BTreeMap<String, DeviceStatus>> {
    use procfs::FromBufRead;
    let file = std::fs::File::open(netns).ok()?;
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
        let dev = std::fs::File::open("/proc/thread-self/net/dev").ok()?;
        InterfaceDeviceStatus::from_buf_read(std::io::BufReader::new(dev))
            .ok()
            .map(|d| d.0.into_iter().collect())
    })
    .join()
    .ok()
    .flatten()
}

fn read_host(qemu: u32, daemons: Vec<(String, u32)>, netns: Option<PathBuf>) -> HostSide {
    let virtiofsd = daemons
        .iter()
        .find(|(name, _)| name == "virtiofsd")
        .and_then(|(_, pid)| read_child(*pid));
    let mut pids: Vec<i32> = std::iter::once(qemu)
        .chain(daemons.iter().map(|(_, p)| *p))
        .chain(std::iter::once(std::process::id()))
        .filter_map(|p| i32::try_from(p).ok())
        .collect();
    pids.dedup();
    HostSide {
        shim: process::read(None, false).ok(),
        // QEMU's network devices are the pod's: the taps it holds live in the pod's
        // namespace, next to CNI's interfaces (a host-network VM has none).
        qemu: read_child(qemu).map(|mut q| {
            q.netdev = netns.as_deref().and_then(netns_devices).unwrap_or_default();
            q
        }),
        virtiofsd,
        usage: overhead::host_usage(&pids),
    }
}

/// What the agent answered, validated.
struct AgentSide {
    families: Vec<MetricFamily>,
    containers_cpu_usec: u64,
    containers_memory_bytes: u64,
}

async fn agent_side(sandbox: &Sandbox) -> Result<AgentSide, String> {
    let call = sandbox.agent().get_metrics(AGENT_TIMEOUT);
    // The ttrpc deadline bounds the call; this bounds a transport that ignores it.
    let answer = tokio::time::timeout(AGENT_TIMEOUT + Duration::from_millis(200), call)
        .await
        .map_err(|_| format!("no answer within {AGENT_TIMEOUT:?}"))?
        .map_err(|e| crate::report::chain(&e))?;
    let families = kata_metrics::text::parse(&answer.metrics, MAX_AGENT_TEXT)
        .map_err(|e| format!("malformed metrics from the agent: {e}"))?;
    Ok(AgentSide {
        families: kata_metrics::text::keep_prefixes(families, &names::GUEST_SIDE_PREFIXES),
        containers_cpu_usec: answer.containers_cpu_usage_usec,
        containers_memory_bytes: answer.containers_memory_usage_bytes,
    })
}

/// The text of one `/metrics` answer for `sandbox`.
pub async fn scrape(monitor: &ShimMonitor, sandbox: &Sandbox) -> String {
    let qemu = sandbox.vm_pid();
    let daemons = sandbox.daemon_pids().to_vec();
    let netns = sandbox.netns().map(Path::to_path_buf);
    let host = async {
        let read = tokio::task::spawn_blocking(move || read_host(qemu, daemons, netns));
        match tokio::time::timeout(HOST_TIMEOUT, read).await {
            Ok(Ok(host)) => host,
            Ok(Err(error)) => {
                tracing::warn!(%error, "reading host metrics failed");
                HostSide::default()
            }
            Err(_) => {
                tracing::warn!(timeout = ?HOST_TIMEOUT, "reading host metrics timed out");
                HostSide::default()
            }
        }
    };
    // The agent first: the host side read after it includes what answering cost QEMU, so
    // consecutive scrapes' overhead windows tile without gaps or overlaps.
    let agent = agent_side(sandbox).await;
    let host = host.await;
    let now = Instant::now();

    let mut out = Families::new();
    if let Some(shim) = &host.shim {
        shim.families(names::SHIM_PREFIX, "Shim", Style::Host, &mut out);
    }
    out.extend(monitor.rpc_durations().families());
    out.extend(sandbox.agent().rpc_durations().families());
    let agent = match agent {
        Ok(a) => Some(a),
        Err(reason) => {
            monitor.count_agent_failure();
            tracing::warn!(sandbox = %sandbox.id, %reason, "agent metrics unavailable");
            None
        }
    };
    out.counter(
        names::SHIM_AGENT_SCRAPE_FAILED,
        "Scrapes whose agent part failed or timed out.",
        monitor.agent_failures() as f64,
    );
    out.counter(
        names::SHIM_LOG_DROPPED,
        "Log lines dropped because a log reader (fifo, journal) did not keep up.",
        crate::logging::dropped_lines() as f64,
    );
    if let (Some(usage), Some(a)) = (host.usage, &agent) {
        let v = monitor.overhead().observe(
            usage,
            a.containers_cpu_usec,
            a.containers_memory_bytes,
            now,
        );
        if let Some(cpu) = v.cpu_percent {
            out.gauge(
                names::SHIM_POD_OVERHEAD_CPU,
                "Pod overhead for CPU: the sandbox's host CPU use minus its containers', percent of one CPU.",
                cpu,
            );
        }
        out.gauge(
            names::SHIM_POD_OVERHEAD_MEMORY,
            "Pod overhead for memory: the sandbox's host memory minus its containers', bytes.",
            v.memory_bytes,
        );
    }
    if let Some(qemu) = &host.qemu {
        qemu.families(
            names::HYPERVISOR_PREFIX,
            "Hypervisor",
            Style::Host,
            &mut out,
        );
    }
    if let Some(v) = &host.virtiofsd {
        v.families(names::VIRTIOFSD_PREFIX, "virtiofsd", Style::Host, &mut out);
    }
    if let Some(a) = agent {
        out.extend(a.families);
    }
    let mut text = String::with_capacity(64 * 1024);
    if let Err(error) = out.encode_into(&mut text) {
        // Families are built here: an encoding error is a bug, reported, never a panic.
        tracing::error!(error = %crate::report::chain(&error), "encoding metrics");
    }
    text
}
