//! Pod network benchmark (`hack/bench-net.sh` runs it): round-trip latency and TCP
//! throughput between this host and a pod on the CNI bridge of
//! `hack/cni/10-kata-bridge.conflist`, for a runc pod and a kata pod, through a private
//! containerd 1.6 with CRI (`kata_tests::cri`, the tests' harness: the debug shim with the
//! test configuration).
//!
//! - latency: `busybox ping -c PINGS -i 0.2 <pod IP>` from the host's root namespace to the
//!   pod, median of the per-packet times (the first, with ARP, included);
//! - throughput: the pod serves a file of MIB MiB from its /dev/shm (tmpfs: the host's for
//!   runc, the guest's for kata) with busybox httpd, which sends it with sendfile(2); the
//!   host fetches it over HTTP/1.0; MiB/s from connect to the last byte, the median of RUNS
//!   transfers after one warm-up fetch. (busybox nc would measure its own 1 KiB writes.)
//!
//! Environment: PINGS (default 20), MIB (32: it must fit in a runc pod's 64 MiB /dev/shm),
//! RUNS (5). Traffic is between the host and
//! the pods on the bridge only. SIGINT or SIGTERM stops it after the current step, removing
//! its pods and containerd as at the end.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kata_tests::cri::{
    api, pod_config, with_network_mode, CniNetwork, CriContainerd, BUSYBOX, KATA_HANDLER,
    RUNC_HANDLER,
};
use kata_tests::tool::{check_stop, env_num, handle_signals};

const PORT: u16 = 5001;

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// One handler's numbers, and facts about what it ran on.
#[derive(Debug, Default)]
struct Measured {
    ip: String,
    rtt_ms: Vec<f64>,
    mib_s: Vec<f64>,
    kernel: String,
    cpus: String,
    mem: String,
    mtu: String,
}

/// Fetches `/blob` (`bytes` long) from the pod's httpd and returns MiB/s, timed from
/// connect to the last byte (retrying the connect while httpd starts).
fn transfer(ip: Ipv4Addr, bytes: u64) -> Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut conn, started) = loop {
        let started = Instant::now();
        match TcpStream::connect_timeout(&(ip, PORT).into(), Duration::from_secs(3)) {
            Ok(c) => break (c, started),
            Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e).with_context(|| format!("connect to {ip}:{PORT}")),
        }
    };
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    conn.write_all(b"GET /blob HTTP/1.0\r\n\r\n")
        .context("send the request")?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut head = Vec::new();
    let mut body: Option<u64> = None;
    loop {
        let n = conn
            .read(&mut buf)
            .with_context(|| format!("read from {ip}:{PORT}"))?;
        if n == 0 {
            break;
        }
        match body.as_mut() {
            Some(b) => *b += n as u64,
            None => {
                head.extend_from_slice(&buf[..n]);
                if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                    let status = String::from_utf8_lossy(&head[..end]).into_owned();
                    if !status.starts_with("HTTP/1.1 200") && !status.starts_with("HTTP/1.0 200") {
                        bail!("GET /blob from {ip}:{PORT}: {status}");
                    }
                    body = Some((head.len() - end - 4) as u64);
                }
            }
        }
    }
    if body != Some(bytes) {
        bail!("GET /blob from {ip}:{PORT}: {body:?} bytes of {bytes}");
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(bytes as f64 / (1024.0 * 1024.0) / secs)
}

/// `busybox ping` from the host: the per-packet round-trip times in ms.
fn ping(ip: Ipv4Addr, count: u64) -> Result<Vec<f64>> {
    let out = Command::new("busybox")
        .args(["ping", "-c", &count.to_string(), "-i", "0.2", "-W", "5"])
        .arg(ip.to_string())
        .output()
        .context("busybox ping (busybox-static: hack/install-deps.sh)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let times: Vec<f64> = text
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("time="))
        .filter_map(|t| t.parse().ok())
        .collect();
    if times.is_empty() {
        bail!(
            "ping {ip}: no replies: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(times)
}

fn measure(
    env: &CriContainerd,
    handler: &str,
    pings: u64,
    mib: u64,
    runs: u64,
) -> Result<Measured> {
    let client = &env.client;
    let name = format!("bench-net-{handler}-{}", std::process::id());
    let mut config = with_network_mode(pod_config(&name, &name, None), api::NamespaceMode::Pod);
    // Each container its own PID namespace (Kubernetes' default). (In a shared PID namespace
    // a kata container whose init leaves children does not stop: the agent waits for output
    // the orphans still hold.)
    if let Some(ns) = config
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .and_then(|s| s.namespace_options.as_mut())
    {
        ns.pid = api::NamespaceMode::Container as i32;
    }
    eprintln!("bench-net: {handler}: RunPodSandbox");
    let pod = client.run_pod_with(config, handler)?;
    let result = (|| {
        check_stop()?;
        let status = client.pod_status(&pod.id)?;
        let ip = kata_tests::cri::pod_ip(&status)?;
        let script = format!(
            "head -c {} /dev/zero > /dev/shm/blob && exec httpd -f -p {PORT} -h /dev/shm",
            mib << 20
        );
        let id =
            client.create_container(&pod, "srv", BUSYBOX, &["sh", "-c", &script], Vec::new())?;
        client.start_container(&id)?;
        let sh = |cmd: &str| -> Result<String> {
            let (code, out, err) = client.exec_sync(&id, &["sh", "-c", cmd])?;
            if code != 0 {
                bail!("{cmd}: exit {code}: {err}");
            }
            Ok(out.trim().to_owned())
        };
        let mut m = Measured {
            ip: ip.to_string(),
            kernel: sh("uname -r")?,
            cpus: sh("nproc")?,
            mem: sh("awk '/^MemTotal/ {printf \"%d MiB\", $2/1024}' /proc/meminfo")?,
            mtu: sh("cat /sys/class/net/eth0/mtu")?,
            ..Default::default()
        };
        eprintln!("bench-net: {handler}: pod {ip}: {pings} pings");
        m.rtt_ms = ping(ip, pings)?;
        check_stop()?;
        transfer(ip, mib << 20).context("warm-up transfer")?;
        for i in 1..=runs {
            check_stop()?;
            let r = transfer(ip, mib << 20)?;
            eprintln!("bench-net: {handler}: transfer {i}: {mib} MiB at {r:.1} MiB/s");
            m.mib_s.push(r);
        }
        Ok(m)
    })();
    client.stop_pod(&pod.id)?;
    client.remove_pod(&pod.id)?;
    result
}

fn host_facts() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kvm = std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.contains(" vmx") || c.contains(" svm"))
        .unwrap_or(false)
        && std::path::Path::new("/dev/kvm").exists();
    format!(
        "host: {cpus} CPUs, kernel {}, {}",
        kernel.trim(),
        if kvm {
            "vmx/svm and /dev/kvm"
        } else {
            "no vmx/svm: kata runs under TCG"
        }
    )
}

fn main() -> Result<()> {
    handle_signals()?;
    let pings = env_num("PINGS", 20);
    let mib = env_num("MIB", 32);
    let runs = env_num("RUNS", 5);
    let net = CniNetwork::kata_bridge();
    let env = CriContainerd::for_handler_with_cni(KATA_HANDLER);
    let handlers = [RUNC_HANDLER, KATA_HANDLER];
    let results: Vec<Result<Measured>> = handlers
        .iter()
        .map(|h| {
            check_stop()?;
            measure(&env, h, pings, mib, runs)
        })
        .collect();
    let log = env.ctd.log();
    let accel = log
        .split_whitespace()
        .rev()
        .find_map(|w| w.strip_prefix("accel="))
        .unwrap_or("?")
        .trim_matches('"')
        .to_owned();
    drop(env);

    println!();
    println!(
        "pod network benchmark: host <-> pod on CNI network {} (bridge {}, {}/{}, MTU {}, no NAT)",
        net.name, net.bridge, net.subnet.0, net.subnet.1, net.mtu
    );
    println!("{}", host_facts());
    println!(
        "ping: {pings} from the host (busybox ping -i 0.2); TCP: pod -> host, HTTP GET of {mib} MiB (busybox httpd, sendfile from tmpfs), median of {runs} after a warm-up"
    );
    let cell = |r: &Result<Measured>, f: &dyn Fn(&Measured) -> String| match r {
        Ok(m) => f(m),
        Err(_) => "failed".to_owned(),
    };
    let row = |what: &str, f: &dyn Fn(&Measured) -> String| {
        println!(
            "{what:<46} {:>14} {:>14}",
            cell(&results[0], f),
            cell(&results[1], f)
        );
    };
    let num =
        |v: Option<f64>, digits: usize| v.map_or("n/a".to_owned(), |x| format!("{x:.digits$}"));
    println!("{:<46} {:>14} {:>14}", "measure", "runc", "kata");
    row("round-trip latency, median ms", &|m| {
        num(median(m.rtt_ms.clone()), 3)
    });
    row("round-trip latency, min / max ms", &|m| {
        let min = m.rtt_ms.iter().copied().fold(f64::INFINITY, f64::min);
        let max = m.rtt_ms.iter().copied().fold(0.0, f64::max);
        format!("{min:.2}/{max:.2}")
    });
    row("TCP pod -> host, median MiB/s", &|m| {
        num(median(m.mib_s.clone()), 1)
    });
    row("pod IP", &|m| m.ip.clone());
    row("kernel the pod runs on", &|m| m.kernel.clone());
    row("CPUs / memory the pod sees", &|m| {
        format!("{} / {}", m.cpus, m.mem)
    });
    row("eth0 MTU in the pod", &|m| m.mtu.clone());
    println!(
        "kata: QEMU accel {accel}, virtio-net on a tap in the pod's netns (tc mirred to the veth)"
    );
    let mut failed = false;
    for (h, r) in handlers.iter().zip(&results) {
        if let Err(e) = r {
            println!("{h} failed: {e:#}");
            failed = true;
        }
    }
    if failed {
        std::process::exit(1);
    }
    Ok(())
}
