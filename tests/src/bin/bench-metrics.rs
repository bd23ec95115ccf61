//! Metrics benchmark (`hack/bench-metrics.sh` runs it): kata pods through a private
//! containerd 1.6 with CRI (the tests' harness), the shim given in `SHIM_BIN` (the script
//! passes the release build) with the test configuration (512 MiB guests, agent at info).
//!
//! Prints `key value` lines for the script's table:
//! - `shim_ms`: median of RUNS `GET /metrics` on one shim's socket; `shim_bytes`;
//! - `monitor_ms_1`, `monitor_ms_N`: median of RUNS kata-monitor `/metrics` with 1 and
//!   PODS (default 10) pods, and the sandboxes it saw (`monitor_shims_1/N`: other pods on
//!   the host count too); `monitor_bytes_1/N`, `monitor_gzip_1/N`;
//! - `shim_rss_kib`: median VmRSS of the pods' shims after the scrapes.
//!
//! With `KATA_SHIM_NO_MANAGEMENT_SERVER` set (inherited by containerd and the shims) no
//! scrape happens: only `shim_rss_kib`, for the shims without the server. SIGINT or
//! SIGTERM stops it after the current step, removing its pods and containerd.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kata_tests::containerd::ShimInstall;
use kata_tests::cri::{CriContainerd, Pod, KATA_HANDLER};
use kata_tests::metrics::{http_get, sample, shim_get, shim_socket, KataMonitor};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn handle_signals() -> Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(sig, &action) }.context("sigaction")?;
    }
    Ok(())
}

fn check_stop() -> Result<()> {
    if STOP.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The shim serving sandbox `id`.
fn shim_pid(id: &str) -> Option<i32> {
    kata_tests::processes_naming(&format!("-id {id} "))
        .into_iter()
        .find(|(_, c)| c.contains("containerd-shim-kata-v2"))
        .map(|(p, _)| p)
}

fn vm_rss_kib(pid: i32) -> Option<f64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// kata-monitor's `/metrics`, RUNS times: median ms, bytes, gzipped bytes, shims seen.
fn monitor_round(mon: &KataMonitor, runs: usize) -> Result<(f64, usize, usize, f64)> {
    let mut ms = Vec::new();
    let mut text = String::new();
    for _ in 0..runs {
        check_stop()?;
        let t = Instant::now();
        let a = mon.get("/metrics")?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        if a.status != 200 {
            bail!("kata-monitor answered {}", a.status);
        }
        text = a.text();
    }
    let zipped = http_get(mon.addr, "/metrics", &[("Accept-Encoding", "gzip")])?;
    let shims = sample(&text, "kata_monitor_running_shim_count ").unwrap_or(f64::NAN);
    Ok((median(ms), text.len(), zipped.body.len(), shims))
}

fn run(env: &CriContainerd, pods: &mut Vec<Pod>) -> Result<()> {
    let runs = env_num("RUNS", 20);
    let total = env_num("PODS", 10);
    let scrape = std::env::var_os(kata_shim::monitor::DISABLE_ENV).is_none();
    let new_pod = |i: usize| -> Result<Pod> {
        let name = format!("bench-metrics-{}-{i}", std::process::id());
        env.client.run_pod(&name, KATA_HANDLER)
    };
    pods.push(new_pod(0)?);
    let mut monitor = None;
    if scrape {
        let socket = shim_socket(&pods[0].id);
        let mut ms = Vec::new();
        let mut bytes = 0;
        for _ in 0..runs {
            check_stop()?;
            let t = Instant::now();
            let r = shim_get(&socket, "/metrics")?;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
            bytes = r.body.len();
        }
        println!("shim_ms {:.1}", median(ms));
        println!("shim_bytes {bytes}");
        let mon = KataMonitor::start(&env.ctd.socket());
        let (ms, b, z, n) = monitor_round(&mon, runs)?;
        println!(
            "monitor_ms_1 {ms:.1}\nmonitor_bytes_1 {b}\nmonitor_gzip_1 {z}\nmonitor_shims_1 {n}"
        );
        monitor = Some(mon);
    }
    for i in 1..total {
        check_stop()?;
        pods.push(new_pod(i)?);
        eprintln!("bench-metrics: {} pods", pods.len());
    }
    if let Some(mon) = &monitor {
        let (ms, b, z, n) = monitor_round(mon, runs)?;
        println!(
            "monitor_ms_n {ms:.1}\nmonitor_bytes_n {b}\nmonitor_gzip_n {z}\nmonitor_shims_n {n}\npods_n {total}"
        );
    }
    // Let the shims settle after the last boot.
    std::thread::sleep(Duration::from_secs(2));
    let rss: Vec<f64> = pods
        .iter()
        .filter_map(|p| shim_pid(&p.id).and_then(vm_rss_kib))
        .collect();
    if rss.len() != pods.len() {
        bail!("found {} shims for {} pods", rss.len(), pods.len());
    }
    println!("shim_rss_kib {:.0}", median(rss));
    Ok(())
}

fn main() -> Result<()> {
    handle_signals()?;
    let shim = ShimInstall::new();
    shim.set_config("agent.kata", "enable_debug = false");
    if let Some(bin) = std::env::var_os("SHIM_BIN") {
        let link = shim.bin_dir().join("containerd-shim-kata-v2");
        std::fs::remove_file(&link)?;
        std::os::unix::fs::symlink(&bin, &link)?;
    }
    let env = CriContainerd::start(Some(shim));
    let mut pods = Vec::new();
    let result = run(&env, &mut pods);
    for p in &pods {
        if let Err(e) = env
            .client
            .stop_pod(&p.id)
            .and_then(|()| env.client.remove_pod(&p.id))
        {
            eprintln!("bench-metrics: removing {}: {e:#}", p.id);
        }
    }
    drop(env);
    result
}
