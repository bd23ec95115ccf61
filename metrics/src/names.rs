//! Names shared by every side: metric family prefixes and names, the labels kata-monitor
//! adds, and where a shim's management socket lives.
//!
//! The names are Kata Containers' (its kata-2-0-metrics design, shim, agent and monitor),
//! so dashboards and alerts written for Kata work unchanged.

use std::path::{Path, PathBuf};

/// Families about the shim process, its RPCs and the pod overhead.
pub const SHIM_PREFIX: &str = "kata_shim";
/// Families about the QEMU process.
pub const HYPERVISOR_PREFIX: &str = "kata_hypervisor";
/// Families about the virtiofsd process.
pub const VIRTIOFSD_PREFIX: &str = "kata_virtiofsd";
/// Families about the agent process in the guest.
pub const AGENT_PREFIX: &str = "kata_agent";
/// Families about the guest operating system.
pub const GUEST_PREFIX: &str = "kata_guest";
/// Families of kata-monitor itself.
pub const MONITOR_PREFIX: &str = "kata_monitor";

/// The families a guest may report (the agent's answer is filtered to these prefixes).
pub const GUEST_SIDE_PREFIXES: [&str; 2] = [AGENT_PREFIX, GUEST_PREFIX];

/// `kata_shim_rpc_durations_histogram_milliseconds{action}`: Task API RPC latency.
pub const SHIM_RPC_DURATIONS: &str = "kata_shim_rpc_durations_histogram_milliseconds";
/// `kata_shim_agent_rpc_durations_histogram_milliseconds{action}`: agent RPC latency.
pub const SHIM_AGENT_RPC_DURATIONS: &str = "kata_shim_agent_rpc_durations_histogram_milliseconds";
/// `kata_shim_pod_overhead_cpu`: the sandbox's host CPU use minus its containers', percent.
pub const SHIM_POD_OVERHEAD_CPU: &str = "kata_shim_pod_overhead_cpu";
/// `kata_shim_pod_overhead_memory_in_bytes`: host memory minus the containers' in the guest.
pub const SHIM_POD_OVERHEAD_MEMORY: &str = "kata_shim_pod_overhead_memory_in_bytes";
/// `kata_shim_agent_scrape_failures_total`: scrapes whose agent part failed or timed out.
pub const SHIM_AGENT_SCRAPE_FAILED: &str = "kata_shim_agent_scrape_failures_total";
/// `kata_shim_log_dropped_lines_total`: log lines dropped because a log reader stalled.
pub const SHIM_LOG_DROPPED: &str = "kata_shim_log_dropped_lines_total";

/// `kata_agent_scrape_count`: GetMetrics requests the agent answered.
pub const AGENT_SCRAPE_COUNT: &str = "kata_agent_scrape_count";

/// `kata_monitor_running_shim_count`: sandboxes with a management socket.
pub const MONITOR_RUNNING_SHIMS: &str = "kata_monitor_running_shim_count";
/// `kata_monitor_scrape_count`: scrapes of kata-monitor's /metrics.
pub const MONITOR_SCRAPE_COUNT: &str = "kata_monitor_scrape_count";
/// `kata_monitor_scrape_failed_count`: shim scrapes that failed or timed out.
pub const MONITOR_SCRAPE_FAILED: &str = "kata_monitor_scrape_failed_count";
/// `kata_monitor_scrape_durations_histogram_milliseconds`: time to scrape every shim.
pub const MONITOR_SCRAPE_DURATIONS: &str = "kata_monitor_scrape_durations_histogram_milliseconds";

/// Label kata-monitor adds: the sandbox (pod) id.
pub const LABEL_SANDBOX_ID: &str = "sandbox_id";
/// Label kata-monitor adds: the pod's Kubernetes UID.
pub const LABEL_CRI_UID: &str = "cri_uid";
/// Label kata-monitor adds: the pod's name.
pub const LABEL_CRI_NAME: &str = "cri_name";
/// Label kata-monitor adds: the pod's Kubernetes namespace.
pub const LABEL_CRI_NAMESPACE: &str = "cri_namespace";
/// The labels kata-monitor adds to every sample, in this order.
pub const SANDBOX_LABELS: [&str; 4] = [
    LABEL_SANDBOX_ID,
    LABEL_CRI_UID,
    LABEL_CRI_NAME,
    LABEL_CRI_NAMESPACE,
];

/// Histogram buckets of every latency family, in ms: 1, 2, 4, ... 512 (Kata's).
pub fn latency_buckets_ms() -> Vec<f64> {
    (0..10).map(|i| f64::from(1u32 << i)).collect()
}

/// Where shims keep one directory per sandbox, named by the sandbox id: ours (and Kata's
/// runtime-rs), then Kata's Go runtime's. kata-monitor watches both.
pub const SANDBOX_ROOTS: [&str; 2] = ["/run/kata", "/run/vc/sbs"];
/// The management socket's file name inside a sandbox directory.
pub const MANAGEMENT_SOCKET: &str = "shim-monitor.sock";
/// The bundle file holding the management socket's address (`unix://<path>`).
pub const MONITOR_ADDRESS_FILE: &str = "monitor_address";

/// The management socket of the sandbox whose directory is `sandbox_dir`.
pub fn management_socket(sandbox_dir: &Path) -> PathBuf {
    sandbox_dir.join(MANAGEMENT_SOCKET)
}

/// The agent port the shim dials (`/agent-url` names it).
pub const AGENT_URL_PATH: &str = "/agent-url";
/// The metrics endpoint.
pub const METRICS_PATH: &str = "/metrics";
/// The guest console's last lines (what the shim keeps of it), one per line.
pub const CONSOLE_PATH: &str = "/console";
/// Content type of the Prometheus text format 0.0.4.
pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_katas() {
        assert_eq!(
            latency_buckets_ms(),
            [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0]
        );
    }

    #[test]
    fn socket_lives_in_the_sandbox_directory() {
        assert_eq!(
            management_socket(Path::new("/run/kata/abc")),
            Path::new("/run/kata/abc/shim-monitor.sock")
        );
    }
}
