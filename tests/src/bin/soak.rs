//! Soak test (`hack/soak.sh` runs it; not part of the test command): repeats the runtime's
//! lifecycles and checks that nothing accumulates in the long-lived processes.
//!
//! Against a private containerd 1.6 with CRI (the tests' harness: the debug shim with the
//! test configuration), after one warm-up round of each kind (one-time initialisation is
//! not a leak):
//! 1. N containers through `ctr`: run -d, exec, kill, delete — one VM and shim each;
//! 2. N pods through CRI: RunPodSandbox, a container created, started, ExecSync'd,
//!    stopped and removed, StopPodSandbox, RemovePodSandbox — one VM each;
//! 3. meanwhile one long-lived pod whose shim sees N container create/start/exec/stop/
//!    remove cycles (one per pod cycle).
//!
//! It prints containerd's and the long-lived shim's fds, threads and RSS before and after,
//! and fails when fds or threads have not returned to their baseline within SETTLE seconds
//! or RSS ends more than 10 MiB above it. Environment: N (default 100), SETTLE (30).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kata_tests::cri::{CriContainerd, BUSYBOX, KATA_HANDLER};
use kata_tests::tool::{check_stop, env_num, handle_signals};

/// How much RSS may grow over the run.
const RSS_SLACK_KIB: u64 = 10 * 1024;

/// fds, threads and RSS (KiB) of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Usage {
    fds: u64,
    threads: u64,
    rss_kib: u64,
}

fn usage(pid: u32) -> Result<Usage> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("process {pid} is gone"))?
        .count() as u64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(Usage {
        fds,
        threads: field("Threads:"),
        rss_kib: field("VmRSS:"),
    })
}

/// The shim serving pod `pod_id` (its `-id` or its command line names the pod).
fn shim_pid(pod_id: &str) -> Result<u32> {
    kata_tests::processes_naming(pod_id)
        .into_iter()
        .find(|(_, cmd)| cmd.contains("containerd-shim-kata-v2"))
        .map(|(pid, _)| pid as u32)
        .context("no shim for the long-lived pod")
}

struct Soak {
    cri: CriContainerd,
    n: u64,
}

impl Soak {
    fn ctr(&self, args: &[&str]) -> Result<String> {
        let out = self
            .cri
            .ctd
            .ctr_cmd_in(kata_tests::containerd::CRI_NAMESPACE, args)
            .output_checked(args)?;
        Ok(out)
    }

    /// One container through ctr: run -d, exec, kill, delete.
    fn ctr_cycle(&self, i: u64) -> Result<()> {
        let id = format!("soak-ctr-{i}-{}", std::process::id());
        self.ctr(&[
            "run",
            "-d",
            "--runtime",
            kata_tests::containerd::KATA_RUNTIME,
            BUSYBOX,
            &id,
            "sleep",
            "1000",
        ])?;
        let out = self.ctr(&["task", "exec", "--exec-id", "e", &id, "echo", "soak"])?;
        if out.trim() != "soak" {
            bail!("exec in {id} printed {out:?}");
        }
        self.ctr(&["task", "kill", "-s", "SIGKILL", &id])?;
        let stopped = kata_tests::wait_until(Duration::from_secs(30), || {
            self.ctr(&["task", "ls"])
                .map(|l| {
                    l.lines()
                        .any(|l| l.starts_with(&id) && l.contains("STOPPED"))
                })
                .unwrap_or(false)
        });
        if !stopped {
            bail!("{id} did not stop");
        }
        self.ctr(&["task", "delete", &id])?;
        self.ctr(&["container", "delete", &id])?;
        Ok(())
    }

    /// A container in `pod`: create, start, ExecSync, stop, remove.
    fn container_cycle(&self, pod: &kata_tests::cri::Pod, name: &str) -> Result<()> {
        let c = &self.cri.client;
        let id = c.create_container(pod, name, BUSYBOX, &["sleep", "1000"], Vec::new())?;
        c.start_container(&id)?;
        let (code, out, _) = c.exec_sync(&id, &["echo", "soak"])?;
        if code != 0 || out.trim() != "soak" {
            bail!("ExecSync in {name}: {code} {out:?}");
        }
        c.stop_container(&id, 0)?;
        c.remove_container(&id)?;
        Ok(())
    }

    /// One pod through CRI, with one container.
    fn pod_cycle(&self, i: u64) -> Result<()> {
        let c = &self.cri.client;
        let pod = c.run_pod(&format!("soak-pod-{i}"), KATA_HANDLER)?;
        self.container_cycle(&pod, "work")?;
        c.stop_pod(&pod.id)?;
        c.remove_pod(&pod.id)?;
        Ok(())
    }
}

/// Runs a command and returns its stdout, or an error with its output.
trait OutputChecked {
    fn output_checked(&mut self, args: &[&str]) -> Result<String>;
}

impl OutputChecked for std::process::Command {
    fn output_checked(&mut self, args: &[&str]) -> Result<String> {
        let out = self.output().context("run ctr")?;
        if !out.status.success() {
            bail!(
                "ctr {}: {}",
                args.join(" "),
                kata_tests::containerd::text(&out)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Waits up to `settle` for `pid`'s fds and threads to come back to `base`; returns the
/// last reading.
fn settle(pid: u32, base: Usage, settle: Duration) -> Result<Usage> {
    let deadline = Instant::now() + settle;
    loop {
        let now = usage(pid)?;
        if (now.fds <= base.fds && now.threads <= base.threads) || Instant::now() >= deadline {
            return Ok(now);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn main() -> Result<()> {
    handle_signals()?;
    let n = env_num("N", 100);
    let settle_for = Duration::from_secs(env_num("SETTLE", 30));
    eprintln!("soak: N={n}: starting a private containerd with CRI");
    let cri = CriContainerd::for_handler(KATA_HANDLER);
    let soak = Soak { cri, n };
    let ctd_pid = soak.cri.ctd.pid();
    let long = soak.cri.client.run_pod("soak-long-lived", KATA_HANDLER)?;
    let shim = shim_pid(&long.id)?;

    // Warm-up: one of each, so one-time initialisation does not count.
    soak.ctr_cycle(0)?;
    soak.pod_cycle(0)?;
    soak.container_cycle(&long, "warmup")?;
    std::thread::sleep(Duration::from_secs(2));
    let ctd_base = usage(ctd_pid)?;
    let shim_base = usage(shim)?;

    let started = Instant::now();
    for i in 1..=soak.n {
        check_stop()?;
        soak.ctr_cycle(i)
            .with_context(|| format!("ctr cycle {i}"))?;
        if i % 10 == 0 {
            eprintln!("soak: {i}/{} ctr cycles ({:?})", soak.n, started.elapsed());
        }
    }
    for i in 1..=soak.n {
        check_stop()?;
        soak.pod_cycle(i)
            .with_context(|| format!("pod cycle {i}"))?;
        soak.container_cycle(&long, &format!("long-{i}"))
            .with_context(|| format!("long-lived pod, container cycle {i}"))?;
        if i % 10 == 0 {
            eprintln!("soak: {i}/{} pod cycles ({:?})", soak.n, started.elapsed());
        }
    }
    let ctd_end = settle(ctd_pid, ctd_base, settle_for)?;
    let shim_end = settle(shim, shim_base, settle_for)?;
    let c = &soak.cri.client;
    c.stop_pod(&long.id)?;
    c.remove_pod(&long.id)?;

    println!(
        "\nsoak: {n} ctr container cycles + {n} CRI pod cycles + {n} container cycles in one long-lived pod, {:.0} s\n",
        started.elapsed().as_secs_f64()
    );
    println!(
        "{:<28} {:>8} {:>8} {:>12}",
        "process", "fds", "threads", "RSS KiB"
    );
    let mut failures = Vec::new();
    for (name, base, end) in [
        ("containerd", ctd_base, ctd_end),
        ("long-lived shim", shim_base, shim_end),
    ] {
        println!(
            "{:<28} {:>8} {:>8} {:>12}",
            format!("{name} before"),
            base.fds,
            base.threads,
            base.rss_kib
        );
        println!(
            "{:<28} {:>8} {:>8} {:>12}",
            format!("{name} after"),
            end.fds,
            end.threads,
            end.rss_kib
        );
        if end.fds > base.fds {
            failures.push(format!("{name}: fds {} -> {}", base.fds, end.fds));
        }
        if end.threads > base.threads {
            failures.push(format!(
                "{name}: threads {} -> {}",
                base.threads, end.threads
            ));
        }
        if end.rss_kib > base.rss_kib + RSS_SLACK_KIB {
            failures.push(format!(
                "{name}: RSS {} -> {} KiB (more than {} KiB above)",
                base.rss_kib, end.rss_kib, RSS_SLACK_KIB
            ));
        }
    }
    let left = kata_tests::processes_naming("soak-");
    if !left.is_empty() {
        failures.push(format!("processes left: {left:?}"));
    }
    if !failures.is_empty() {
        bail!("soak found growth:\n  {}", failures.join("\n  "));
    }
    println!("\nsoak: no growth");
    Ok(())
}
