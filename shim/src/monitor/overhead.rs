//! The pod overhead, as Kata computes it: what the sandbox uses on the host minus what its
//! containers use in the guest.
//!
//! - Host side ([`host_usage`]): the sandbox's host cgroup when QEMU sits in a cgroup that
//!   holds nothing but the sandbox's processes (cgroup v2 `memory.current` and `cpu.stat`,
//!   v1 `memory.usage_in_bytes` and `cpuacct.usage`); otherwise (a shim started in
//!   containerd's own cgroup) the same sum taken over the sandbox's processes themselves —
//!   the shim, QEMU and its daemons: CPU time from `/proc/<pid>/stat` and memory as the sum
//!   of their proportional set sizes (`smaps_rollup` Pss: guest RAM, shared between QEMU
//!   and the vhost-user daemons, counted once).
//! - Guest side: the containers' common cgroup (`memory.current`, `cpu.stat` usage), from
//!   the agent's GetMetrics answer.
//! - `pod_overhead_memory_in_bytes` = host memory - containers' memory, at the scrape.
//! - `pod_overhead_cpu` = (host CPU time - containers' CPU time) over the last
//!   [`CPU_WINDOW`] (at least 1 s), in percent of one CPU; samples come from scrapes, so the
//!   first value shows at the first scrape at least a second after another.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The span the CPU overhead is averaged over, when samples that old exist.
pub const CPU_WINDOW: Duration = Duration::from_secs(10);
/// The shortest span a CPU overhead is computed over.
const MIN_WINDOW: Duration = Duration::from_secs(1);
/// Samples older than this are forgotten.
const KEEP: Duration = Duration::from_secs(60);

/// What the sandbox uses on the host, read at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostUsage {
    /// CPU time so far, seconds.
    pub cpu_seconds: f64,
    /// Memory now, bytes.
    pub memory_bytes: f64,
    /// Whether it comes from the sandbox's own cgroup (else from its processes).
    pub from_cgroup: bool,
}

/// The sandbox's host usage: its exclusive cgroup if it has one, else the sum over
/// `pids` (the first is QEMU's). Blocking (reads /proc and /sys/fs/cgroup).
pub fn host_usage(pids: &[i32]) -> Option<HostUsage> {
    let qemu = *pids.first()?;
    cgroup_usage(qemu, pids).or_else(|| process_usage(pids))
}

fn process_usage(pids: &[i32]) -> Option<HostUsage> {
    let tps = procfs::ticks_per_second() as f64;
    let mut cpu = 0.0;
    let mut memory = 0.0;
    let mut any = false;
    for &pid in pids {
        let Ok(p) = procfs::process::Process::new(pid) else {
            continue;
        };
        let Ok(stat) = p.stat() else { continue };
        any = true;
        cpu += (stat.utime + stat.stime) as f64 / tps;
        memory += pss_bytes(pid).unwrap_or(0.0);
    }
    any.then_some(HostUsage {
        cpu_seconds: cpu,
        memory_bytes: memory,
        from_cgroup: false,
    })
}

/// `Pss:` of `/proc/<pid>/smaps_rollup`, in bytes.
fn pss_bytes(pid: i32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb * 1024.0)
}

/// The cgroup directories of `pid`: (unified v2 path, v1 memory path, v1 cpuacct path).
fn cgroup_dirs(pid: i32) -> (Option<PathBuf>, Option<PathBuf>, Option<PathBuf>) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let (mut v2, mut memory, mut cpuacct) = (None, None, None);
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if rel.is_empty() {
            continue;
        }
        if controllers.is_empty() {
            v2 = Some(Path::new("/sys/fs/cgroup").join(rel));
        } else if controllers.split(',').any(|c| c == "memory") {
            memory = Some(Path::new("/sys/fs/cgroup/memory").join(rel));
        } else if controllers.split(',').any(|c| c == "cpuacct") {
            cpuacct = Some(Path::new("/sys/fs/cgroup").join(controllers).join(rel));
        }
    }
    (v2, memory, cpuacct)
}

/// Whether every process in cgroup `dir` is one of `pids` (and there is one).
fn exclusive(dir: &Path, pids: &[i32]) -> bool {
    let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) else {
        return false;
    };
    let listed: Vec<i32> = procs
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    !listed.is_empty() && listed.iter().all(|p| pids.contains(p))
}

fn read_number(path: &Path) -> Option<f64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn cgroup_usage(qemu: i32, pids: &[i32]) -> Option<HostUsage> {
    let (v2, memory, cpuacct) = cgroup_dirs(qemu);
    if let Some(dir) = v2.filter(|d| d.join("memory.current").exists() && exclusive(d, pids)) {
        let memory = read_number(&dir.join("memory.current"))?;
        let usec = std::fs::read_to_string(dir.join("cpu.stat"))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.trim().parse::<f64>().ok())?;
        return Some(HostUsage {
            cpu_seconds: usec / 1e6,
            memory_bytes: memory,
            from_cgroup: true,
        });
    }
    let memory = memory.filter(|d| exclusive(d, pids))?;
    let cpuacct = cpuacct.filter(|d| exclusive(d, pids))?;
    Some(HostUsage {
        cpu_seconds: read_number(&cpuacct.join("cpuacct.usage"))? / 1e9,
        memory_bytes: read_number(&memory.join("memory.usage_in_bytes"))?,
        from_cgroup: true,
    })
}

/// One moment's CPU counters.
#[derive(Debug, Clone, Copy)]
struct CpuSample {
    at: Instant,
    host_seconds: f64,
    guest_seconds: f64,
}

/// The overhead values of one scrape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Values {
    /// Percent of one CPU; `None` until two samples at least a second apart exist.
    pub cpu_percent: Option<f64>,
    pub memory_bytes: f64,
}

/// CPU samples of recent scrapes.
#[derive(Debug, Default)]
pub struct Overhead {
    samples: Mutex<VecDeque<CpuSample>>,
}

impl Overhead {
    /// Records a scrape's counters (`guest_cpu_usec`, `guest_memory_bytes`: the
    /// containers') at `now` and returns the overhead.
    pub fn observe(
        &self,
        host: HostUsage,
        guest_cpu_usec: u64,
        guest_memory_bytes: u64,
        now: Instant,
    ) -> Values {
        let sample = CpuSample {
            at: now,
            host_seconds: host.cpu_seconds,
            guest_seconds: guest_cpu_usec as f64 / 1e6,
        };
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        while samples
            .front()
            .is_some_and(|s| now.duration_since(s.at) > KEEP)
        {
            samples.pop_front();
        }
        // The newest sample at least CPU_WINDOW old, else the oldest at least a second old.
        let base = samples
            .iter()
            .rev()
            .find(|s| now.duration_since(s.at) >= CPU_WINDOW)
            .or_else(|| {
                samples
                    .front()
                    .filter(|s| now.duration_since(s.at) >= MIN_WINDOW)
            })
            .copied();
        samples.push_back(sample);
        let cpu_percent = base.map(|b| {
            let span = now.duration_since(b.at).as_secs_f64();
            let host = sample.host_seconds - b.host_seconds;
            let guest = sample.guest_seconds - b.guest_seconds;
            (host - guest) / span * 100.0
        });
        Values {
            cpu_percent,
            memory_bytes: host.memory_bytes - guest_memory_bytes as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(cpu: f64, mem: f64) -> HostUsage {
        HostUsage {
            cpu_seconds: cpu,
            memory_bytes: mem,
            from_cgroup: false,
        }
    }

    #[test]
    fn cpu_needs_a_second_and_prefers_the_full_window() {
        let o = Overhead::default();
        let t0 = Instant::now();
        let v = o.observe(host(10.0, 500.0), 1_000_000, 100, t0);
        assert_eq!(v.cpu_percent, None);
        assert_eq!(v.memory_bytes, 400.0);
        let v = o.observe(
            host(10.1, 500.0),
            1_000_000,
            100,
            t0 + Duration::from_millis(500),
        );
        assert_eq!(v.cpu_percent, None, "half a second is too short");
        // 2 s later: host +1 s of CPU, guest +0.5 s => 25 % over 2 s.
        let v = o.observe(
            host(11.0, 600.0),
            1_500_000,
            200,
            t0 + Duration::from_secs(2),
        );
        assert!((v.cpu_percent.unwrap() - 25.0).abs() < 1e-9, "{v:?}");
        // At 12 s the window is [2 s, 12 s]: host +2 s, guest +1 s => 10 %.
        let v = o.observe(
            host(13.0, 600.0),
            2_500_000,
            200,
            t0 + Duration::from_secs(12),
        );
        assert!((v.cpu_percent.unwrap() - 10.0).abs() < 1e-9, "{v:?}");
    }

    #[test]
    fn old_samples_are_forgotten() {
        let o = Overhead::default();
        let t0 = Instant::now();
        o.observe(host(0.0, 0.0), 0, 0, t0);
        o.observe(host(1.0, 0.0), 0, 0, t0 + KEEP + Duration::from_secs(5));
        assert_eq!(o.samples.lock().unwrap().len(), 1);
    }

    #[test]
    fn this_process_is_measured_by_its_own_processes() {
        let me = std::process::id() as i32;
        let u = host_usage(&[me]).unwrap();
        assert!(u.memory_bytes > 0.0 && u.cpu_seconds >= 0.0, "{u:?}");
        // A test process shares its cgroup with others: never taken for the sandbox's.
        assert!(!u.from_cgroup);
        assert!(host_usage(&[]).is_none());
    }

    #[test]
    fn an_exclusive_cgroup_is_recognized() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.procs"), "10\n11\n").unwrap();
        assert!(exclusive(dir.path(), &[10, 11, 12]));
        assert!(!exclusive(dir.path(), &[10]));
        std::fs::write(dir.path().join("cgroup.procs"), "").unwrap();
        assert!(!exclusive(dir.path(), &[10]));
    }
}
