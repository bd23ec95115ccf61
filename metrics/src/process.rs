//! One process's families from `/proc/<pid>`: threads, open fds, `status`, `stat`, `io`
//! and, for QEMU, its network namespace's `net/dev`.
//!
//! Two styles, because Kata itself has two: its Go runtime (the shim, QEMU, virtiofsd on
//! the host: memory in bytes, io items `readbytes`...) and its Rust agent (in the guest:
//! `total_time`, `total_vm`, `total_rss`, memory in kB, io items `read_bytes`...). The
//! readers block (they read files); call them from a blocking thread.

use std::collections::BTreeMap;

use procfs::net::DeviceStatus;
use procfs::process::{Io, Process, Stat, Status};

use crate::family::Families;

/// Errors reading a process.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// The process is gone or `/proc/<pid>` is unreadable.
    #[error("cannot read /proc/{pid}")]
    Read {
        pid: i32,
        #[source]
        source: procfs::ProcError,
    },
}

/// What is read of one process at one scrape.
#[derive(Debug, Clone)]
pub struct ProcessSample {
    pub stat: Stat,
    pub status: Status,
    /// Absent when the kernel hides it (no `CONFIG_TASK_IO_ACCOUNTING`) or access is denied.
    pub io: Option<Io>,
    /// Open file descriptors.
    pub fds: Option<usize>,
    /// `net/dev` of the process's network namespace, by interface, when asked for.
    pub netdev: BTreeMap<String, DeviceStatus>,
}

/// Which of Kata's naming styles to emit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Kata's Go runtime: `threads`, `fds`, `proc_status` (bytes), `proc_stat`,
    /// `io_stat` (`readbytes`, ...), `netdev{interface,item}`.
    Host,
    /// Kata's agent: `threads`, `total_time` (s), `total_vm`, `total_rss` (bytes),
    /// `proc_status` (kB), `io_stat` (`read_bytes`, ...), `proc_stat`.
    Agent,
}

/// Reads process `pid` (`None`: this process). `netdev` adds its network namespace's
/// interface counters.
pub fn read(pid: Option<i32>, netdev: bool) -> Result<ProcessSample, ProcError> {
    let pid_or_self = pid.unwrap_or_else(|| i32::try_from(std::process::id()).unwrap_or(0));
    let err = |source| ProcError::Read {
        pid: pid_or_self,
        source,
    };
    let process = match pid {
        Some(p) => Process::new(p),
        None => Process::myself(),
    }
    .map_err(err)?;
    let stat = process.stat().map_err(err)?;
    let status = process.status().map_err(err)?;
    let netdev = if netdev {
        process
            .dev_status()
            .map(|m| m.into_iter().collect())
            .unwrap_or_default()
    } else {
        BTreeMap::new()
    };
    Ok(ProcessSample {
        io: process.io().ok(),
        fds: process.fd_count().ok(),
        stat,
        status,
        netdev,
    })
}

/// `status` items as Kata names them, in kB (as the kernel prints them).
fn status_items(s: &Status) -> [(&'static str, Option<u64>); 18] {
    [
        ("vmpeak", s.vmpeak),
        ("vmsize", s.vmsize),
        ("vmlck", s.vmlck),
        ("vmpin", s.vmpin),
        ("vmhwm", s.vmhwm),
        ("vmrss", s.vmrss),
        ("rssanon", s.rssanon),
        ("rssfile", s.rssfile),
        ("rssshmem", s.rssshmem),
        ("vmdata", s.vmdata),
        ("vmstk", s.vmstk),
        ("vmexe", s.vmexe),
        ("vmlib", s.vmlib),
        ("vmpte", s.vmpte),
        ("vmswap", s.vmswap),
        ("hugetlbpages", s.hugetlbpages),
        ("voluntary_ctxt_switches", s.voluntary_ctxt_switches),
        ("nonvoluntary_ctxt_switches", s.nonvoluntary_ctxt_switches),
    ]
}

/// Whether a `status` item is a size (kB in the file) rather than a count.
fn is_size(item: &str) -> bool {
    !item.ends_with("ctxt_switches")
}

fn netdev_items(d: &DeviceStatus) -> [(&'static str, u64); 16] {
    [
        ("recv_bytes", d.recv_bytes),
        ("recv_packets", d.recv_packets),
        ("recv_errs", d.recv_errs),
        ("recv_drop", d.recv_drop),
        ("recv_fifo", d.recv_fifo),
        ("recv_frame", d.recv_frame),
        ("recv_compressed", d.recv_compressed),
        ("recv_multicast", d.recv_multicast),
        ("sent_bytes", d.sent_bytes),
        ("sent_packets", d.sent_packets),
        ("sent_errs", d.sent_errs),
        ("sent_drop", d.sent_drop),
        ("sent_fifo", d.sent_fifo),
        ("sent_colls", d.sent_colls),
        ("sent_carrier", d.sent_carrier),
        ("sent_compressed", d.sent_compressed),
    ]
}

/// Interface counters of one `net/dev` table as `(interface, item)` samples.
pub fn netdev_samples(netdev: &BTreeMap<String, DeviceStatus>) -> Vec<([&str; 2], f64)> {
    netdev
        .iter()
        .flat_map(|(name, d)| {
            netdev_items(d)
                .into_iter()
                .map(move |(item, v)| ([name.as_str(), item], v as f64))
        })
        .collect()
}

impl ProcessSample {
    /// Adds this process's families under `prefix` (e.g. `kata_hypervisor`); `what` names
    /// the process in the help texts.
    pub fn families(&self, prefix: &str, what: &str, style: Style, out: &mut Families) {
        let name = |suffix: &str| format!("{prefix}_{suffix}");
        out.gauge(
            &name("threads"),
            &format!("{what} process threads."),
            self.stat.num_threads as f64,
        );
        if style == Style::Host {
            if let Some(fds) = self.fds {
                out.gauge(
                    &name("fds"),
                    &format!("{what} open file descriptors."),
                    fds as f64,
                );
            }
        } else {
            let tps = procfs::ticks_per_second() as f64;
            out.gauge(
                &name("total_time"),
                &format!("{what} process CPU time (user + system), seconds."),
                (self.stat.utime + self.stat.stime) as f64 / tps,
            );
            out.gauge(
                &name("total_vm"),
                &format!("{what} process virtual memory size, bytes."),
                self.stat.vsize as f64,
            );
            out.gauge(
                &name("total_rss"),
                &format!("{what} process resident set size, bytes."),
                (self.stat.rss * procfs::page_size()) as f64,
            );
        }
        // The Go runtime reports sizes in bytes, the agent in kB (as /proc prints them).
        let scale = |item: &str| match style {
            Style::Host if is_size(item) => 1024.0,
            _ => 1.0,
        };
        let unit = match style {
            Style::Host => "sizes in bytes",
            Style::Agent => "sizes in kB",
        };
        out.gauge_vec(
            &name("proc_status"),
            &format!("{what} process status (/proc/<pid>/status; {unit})."),
            &["item"],
            status_items(&self.status)
                .into_iter()
                .map(|(item, v)| ([item], v.unwrap_or(0) as f64 * scale(item))),
        );
        out.gauge_vec(
            &name("proc_stat"),
            &format!("{what} process statistics (/proc/<pid>/stat; clock ticks)."),
            &["item"],
            [
                (["utime"], self.stat.utime as f64),
                (["stime"], self.stat.stime as f64),
                (["cutime"], self.stat.cutime as f64),
                (["cstime"], self.stat.cstime as f64),
            ],
        );
        if let Some(io) = &self.io {
            let (read, write, cancelled) = match style {
                Style::Host => ("readbytes", "writebytes", "cancelledwritebytes"),
                Style::Agent => ("read_bytes", "write_bytes", "cancelled_write_bytes"),
            };
            out.gauge_vec(
                &name("io_stat"),
                &format!("{what} process IO statistics (/proc/<pid>/io)."),
                &["item"],
                [
                    (["rchar"], io.rchar as f64),
                    (["wchar"], io.wchar as f64),
                    (["syscr"], io.syscr as f64),
                    (["syscw"], io.syscw as f64),
                    ([read], io.read_bytes as f64),
                    ([write], io.write_bytes as f64),
                    ([cancelled], io.cancelled_write_bytes as f64),
                ],
            );
        }
        if !self.netdev.is_empty() {
            out.gauge_vec(
                &name("netdev"),
                &format!("Network devices of the {what} network namespace (/proc/<pid>/net/dev)."),
                &["interface", "item"],
                netdev_samples(&self.netdev),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(style: Style, netdev: bool) -> String {
        let sample = read(None, netdev).unwrap();
        let mut f = Families::new();
        sample.families("kata_shim", "Shim", style, &mut f);
        let mut out = String::new();
        f.encode_into(&mut out).unwrap();
        out
    }

    #[test]
    fn host_style_reads_this_process_in_bytes() {
        let t = text(Style::Host, true);
        for family in [
            "kata_shim_threads ",
            "kata_shim_fds ",
            "kata_shim_proc_status{item=\"vmrss\"}",
            "kata_shim_proc_stat{item=\"utime\"}",
            "kata_shim_netdev{interface=\"lo\",item=\"recv_bytes\"}",
        ] {
            assert!(t.contains(family), "{family} missing:\n{t}");
        }
        let status = read(None, false).unwrap().status;
        let rss_kb = status.vmrss.unwrap();
        let line = t
            .lines()
            .find(|l| l.starts_with("kata_shim_proc_status{item=\"vmhwm\"}"))
            .unwrap();
        let bytes: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(
            bytes >= rss_kb as f64 * 1024.0 * 0.5,
            "{line} vs {rss_kb} kB"
        );
        assert!(!t.contains("total_rss"));
    }

    #[test]
    fn agent_style_uses_the_agents_names() {
        let t = text(Style::Agent, false);
        for family in [
            "kata_shim_total_time ",
            "kata_shim_total_vm ",
            "kata_shim_total_rss ",
            "item=\"voluntary_ctxt_switches\"",
        ] {
            assert!(t.contains(family), "{family} missing:\n{t}");
        }
        assert!(!t.contains("kata_shim_fds"));
        assert!(!t.contains("netdev"));
        if t.contains("io_stat") {
            assert!(t.contains("item=\"read_bytes\""), "{t}");
        }
    }

    #[test]
    fn a_missing_process_is_an_error_naming_it() {
        let err = read(Some(i32::MAX), false).unwrap_err();
        assert!(err.to_string().contains(&i32::MAX.to_string()), "{err}");
    }
}
