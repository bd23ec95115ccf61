//! GetMetrics: the agent's and the guest's metrics as Prometheus text, read from the
//! guest's `/proc` at each request (nothing cached), with Kata's family names:
//! `kata_agent_*` (scrape count, this process's threads, times, memory, status, io, stat)
//! and `kata_guest_*` (load, tasks, per-CPU time, vmstat, network devices, disks,
//! meminfo). The answer also carries the containers' total CPU time and memory use (their
//! common cgroup parent), which the shim needs for the pod overhead.

use std::sync::atomic::{AtomicU64, Ordering};

use kata_metrics::process::{self, Style};
use kata_metrics::Families;
use kata_proto::agent::Metrics;

use crate::cgroup::{parse_flat_keyed, parse_single};
use crate::container::CGROUP_ROOT;

/// Failures of GetMetrics (reading a file is not one: an unreadable source is left out).
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The families could not be encoded.
    #[error("encode metrics")]
    Encode(#[from] kata_metrics::FamilyError),
}

/// Counts the requests answered (`kata_agent_scrape_count`).
#[derive(Debug, Default)]
pub struct ScrapeCounter(AtomicU64);

impl ScrapeCounter {
    /// Counts one more scrape and returns the new count.
    pub fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// The agent's scrape count (one agent per guest).
static SCRAPES: ScrapeCounter = ScrapeCounter(AtomicU64::new(0));

/// Answers one GetMetrics request: counts it and gathers. Blocking.
pub fn answer() -> Result<Metrics, MetricsError> {
    gather(SCRAPES.next())
}

/// Builds the GetMetrics answer; `scrape_count` includes this request. Reads files:
/// run it on a blocking thread.
pub fn gather(scrape_count: u64) -> Result<Metrics, MetricsError> {
    let mut families = Families::new();
    families.counter(
        kata_metrics::names::AGENT_SCRAPE_COUNT,
        "Metrics scrape count.",
        scrape_count as f64,
    );
    match process::read(None, false) {
        Ok(me) => me.families(
            kata_metrics::names::AGENT_PREFIX,
            "Agent",
            Style::Agent,
            &mut families,
        ),
        Err(error) => tracing::debug!(%error, "agent process metrics"),
    }
    guest_families(&mut families);
    let mut text = String::new();
    families.encode_into(&mut text)?;
    let (cpu_usec, memory_bytes) = containers_usage();
    Ok(Metrics {
        metrics: text,
        containers_cpu_usage_usec: cpu_usec,
        containers_memory_usage_bytes: memory_bytes,
        ..Default::default()
    })
}

/// CPU time (µs) and memory (bytes) of every container, from their common cgroup
/// parent; zeros before the first container.
fn containers_usage() -> (u64, u64) {
    let read = |file: &str| std::fs::read_to_string(format!("{CGROUP_ROOT}/{file}")).ok();
    let cpu = read("cpu.stat")
        .and_then(|t| parse_flat_keyed(&t).get("usage_usec").copied())
        .unwrap_or(0);
    let memory = read("memory.current")
        .map(|t| parse_single(&t))
        .unwrap_or(0);
    (cpu, memory)
}

fn name(suffix: &str) -> String {
    format!("{}_{suffix}", kata_metrics::names::GUEST_PREFIX)
}

fn guest_families(out: &mut Families) {
    use procfs::{Current, CurrentSI};
    match procfs::LoadAverage::current() {
        Ok(load) => {
            out.gauge_vec(
                &name("load"),
                "Guest system load.",
                &["item"],
                [
                    (["load1"], f64::from(load.one)),
                    (["load5"], f64::from(load.five)),
                    (["load15"], f64::from(load.fifteen)),
                ],
            );
            out.gauge_vec(
                &name("tasks"),
                "Guest scheduling entities (current, maximum).",
                &["item"],
                [
                    (["cur"], f64::from(load.cur)),
                    (["max"], f64::from(load.max)),
                ],
            );
        }
        Err(error) => tracing::debug!(%error, "guest load"),
    }
    match procfs::KernelStats::current() {
        Ok(stats) => {
            let mut samples = Vec::new();
            let cpus = std::iter::once(("total".to_owned(), &stats.total)).chain(
                stats
                    .cpu_time
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (i.to_string(), t)),
            );
            for (cpu, t) in cpus {
                for (item, ms) in cpu_items(t) {
                    samples.push(([cpu.clone(), item.to_owned()], ms as f64));
                }
            }
            out.gauge_vec(
                &name("cpu_time"),
                "Guest CPU time by CPU and state, ms.",
                &["cpu", "item"],
                samples
                    .iter()
                    .map(|([c, i], v)| ([c.as_str(), i.as_str()], *v)),
            );
        }
        Err(error) => tracing::debug!(%error, "guest cpu time"),
    }
    match procfs::vmstat() {
        Ok(vmstat) => {
            let mut items: Vec<_> = vmstat.into_iter().collect();
            items.sort();
            out.gauge_vec(
                &name("vm_stat"),
                "Guest virtual memory statistics (/proc/vmstat).",
                &["item"],
                items.iter().map(|(k, v)| ([k.as_str()], *v as f64)),
            );
        }
        Err(error) => tracing::debug!(%error, "guest vmstat"),
    }
    match procfs::net::dev_status() {
        Ok(devs) => {
            let devs = devs.into_iter().collect();
            out.gauge_vec(
                &name("netdev_stat"),
                "Guest network device statistics.",
                &["interface", "item"],
                process::netdev_samples(&devs),
            );
        }
        Err(error) => tracing::debug!(%error, "guest net/dev"),
    }
    match procfs::diskstats() {
        Ok(disks) => {
            let samples: Vec<_> = disks
                .iter()
                .flat_map(|d| {
                    disk_items(d)
                        .into_iter()
                        .map(move |(item, v)| ([d.name.as_str(), item], v as f64))
                })
                .collect();
            out.gauge_vec(
                &name("diskstat"),
                "Guest disk statistics.",
                &["disk", "item"],
                samples,
            );
        }
        Err(error) => tracing::debug!(%error, "guest diskstats"),
    }
    match procfs::Meminfo::current() {
        Ok(m) => out.gauge_vec(
            &name("meminfo"),
            "Guest memory usage (/proc/meminfo), bytes.",
            &["item"],
            meminfo_items(&m)
                .into_iter()
                .map(|(item, v)| ([item], v.unwrap_or(0) as f64)),
        ),
        Err(error) => tracing::debug!(%error, "guest meminfo"),
    }
}

fn cpu_items(t: &procfs::CpuTime) -> [(&'static str, u64); 10] {
    [
        ("user", t.user_ms()),
        ("nice", t.nice_ms()),
        ("system", t.system_ms()),
        ("idle", t.idle_ms()),
        ("iowait", t.iowait_ms().unwrap_or(0)),
        ("irq", t.irq_ms().unwrap_or(0)),
        ("softirq", t.softirq_ms().unwrap_or(0)),
        ("steal", t.steal_ms().unwrap_or(0)),
        ("guest", t.guest_ms().unwrap_or(0)),
        ("guest_nice", t.guest_nice_ms().unwrap_or(0)),
    ]
}

fn disk_items(d: &procfs::DiskStat) -> [(&'static str, u64); 17] {
    [
        ("reads", d.reads),
        ("merged", d.merged),
        ("sectors_read", d.sectors_read),
        ("time_reading", d.time_reading),
        ("writes", d.writes),
        ("writes_merged", d.writes_merged),
        ("sectors_written", d.sectors_written),
        ("time_writing", d.time_writing),
        ("in_progress", d.in_progress),
        ("time_in_progress", d.time_in_progress),
        ("weighted_time_in_progress", d.weighted_time_in_progress),
        ("discards", d.discards.unwrap_or(0)),
        ("discards_merged", d.discards_merged.unwrap_or(0)),
        ("sectors_discarded", d.sectors_discarded.unwrap_or(0)),
        ("time_discarding", d.time_discarding.unwrap_or(0)),
        ("flushes", d.flushes.unwrap_or(0)),
        ("time_flushing", d.time_flushing.unwrap_or(0)),
    ]
}

/// Kata's meminfo items (procfs field names), in bytes.
fn meminfo_items(m: &procfs::Meminfo) -> Vec<(&'static str, Option<u64>)> {
    vec![
        ("mem_total", Some(m.mem_total)),
        ("mem_free", Some(m.mem_free)),
        ("mem_available", m.mem_available),
        ("buffers", Some(m.buffers)),
        ("cached", Some(m.cached)),
        ("swap_cached", Some(m.swap_cached)),
        ("active", Some(m.active)),
        ("inactive", Some(m.inactive)),
        ("active_anon", m.active_anon),
        ("inactive_anon", m.inactive_anon),
        ("active_file", m.active_file),
        ("inactive_file", m.inactive_file),
        ("unevictable", m.unevictable),
        ("mlocked", m.mlocked),
        ("high_total", m.high_total),
        ("high_free", m.high_free),
        ("low_total", m.low_total),
        ("low_free", m.low_free),
        ("mmap_copy", m.mmap_copy),
        ("swap_total", Some(m.swap_total)),
        ("swap_free", Some(m.swap_free)),
        ("dirty", Some(m.dirty)),
        ("writeback", Some(m.writeback)),
        ("anon_pages", m.anon_pages),
        ("mapped", Some(m.mapped)),
        ("shmem", m.shmem),
        ("slab", Some(m.slab)),
        ("s_reclaimable", m.s_reclaimable),
        ("s_unreclaim", m.s_unreclaim),
        ("kernel_stack", m.kernel_stack),
        ("page_tables", m.page_tables),
        ("quicklists", m.quicklists),
        ("nfs_unstable", m.nfs_unstable),
        ("bounce", m.bounce),
        ("writeback_tmp", m.writeback_tmp),
        ("commit_limit", m.commit_limit),
        ("committed_as", Some(m.committed_as)),
        ("vmalloc_total", Some(m.vmalloc_total)),
        ("vmalloc_used", Some(m.vmalloc_used)),
        ("vmalloc_chunk", Some(m.vmalloc_chunk)),
        ("hardware_corrupted", m.hardware_corrupted),
        ("anon_hugepages", m.anon_hugepages),
        ("shmem_hugepages", m.shmem_hugepages),
        ("shmem_pmd_mapped", m.shmem_pmd_mapped),
        ("cma_total", m.cma_total),
        ("cma_free", m.cma_free),
        ("hugepages_total", m.hugepages_total),
        ("hugepages_free", m.hugepages_free),
        ("hugepages_rsvd", m.hugepages_rsvd),
        ("hugepages_surp", m.hugepages_surp),
        ("hugepagesize", m.hugepagesize),
        ("direct_map_4k", m.direct_map_4k),
        ("direct_map_4M", m.direct_map_4M),
        ("direct_map_2M", m.direct_map_2M),
        ("direct_map_1G", m.direct_map_1G),
        ("hugetlb", m.hugetlb),
        ("per_cpu", m.per_cpu),
        ("k_reclaimable", m.k_reclaimable),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathers_every_family_of_this_system() {
        let counter = ScrapeCounter::default();
        assert_eq!(counter.next(), 1);
        let answer = gather(counter.next()).unwrap();
        let families = kata_metrics::text::parse(&answer.metrics, 1 << 22).unwrap();
        let names: Vec<&str> = families.iter().map(|f| f.name()).collect();
        for expected in [
            "kata_agent_scrape_count",
            "kata_agent_threads",
            "kata_agent_total_time",
            "kata_agent_total_vm",
            "kata_agent_total_rss",
            "kata_agent_proc_status",
            "kata_agent_proc_stat",
            "kata_guest_load",
            "kata_guest_tasks",
            "kata_guest_cpu_time",
            "kata_guest_vm_stat",
            "kata_guest_netdev_stat",
            "kata_guest_meminfo",
        ] {
            assert!(
                names.contains(&expected),
                "{expected} missing from {names:?}"
            );
        }
        assert!(answer.metrics.contains("kata_agent_scrape_count 2\n"));
        assert!(answer
            .metrics
            .contains("kata_guest_cpu_time{cpu=\"total\",item=\"idle\"}"));
        assert!(
            kata_metrics::text::keep_prefixes(
                families.clone(),
                &kata_metrics::names::GUEST_SIDE_PREFIXES
            )
            .len()
                == families.len(),
            "only agent and guest families"
        );
    }
}
