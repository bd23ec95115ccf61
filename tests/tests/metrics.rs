//! Metrics end to end: two kata pods through containerd's CRI plugin, each shim's
//! management socket, kata-monitor (the workspace's build) and a private Prometheus
//! (Debian's) scraping it every second; `promtool check metrics` on what the shim and the
//! monitor answer; the Grafana dashboard's queries; a pod's QEMU and then its shim killed
//! while scrapes go on; and the pod overhead against the test's own measurement. Each test
//! ends with a leak check.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kata_tests::containerd::ShimInstall;
use kata_tests::cri::{
    api, pod_config, with_network_mode, CriContainerd, Networking, OrPanic, Pod, BUSYBOX,
    KATA_HANDLER, POD_NAMESPACE,
};
use kata_tests::metrics::{promtool_check, sample, shim_get, shim_socket, KataMonitor, Prometheus};
use kata_tests::{assert_no_runtime_leaks, processes_naming, wait_until};

/// The family groups of a kata node.
const GROUPS: [&str; 6] = [
    "kata_shim_",
    "kata_hypervisor_",
    "kata_virtiofsd_",
    "kata_agent_",
    "kata_guest_",
    "kata_monitor_",
];

/// Kata's names that promtool's style lint flags (no `_total`, `_count` on a counter, a
/// type and `milliseconds` in the name): kept as Kata has them, so dashboards and alerts
/// written for Kata work. Any other complaint fails the test.
const KATA_LEGACY_NAMES: [&str; 7] = [
    "kata_agent_scrape_count",
    "kata_monitor_running_shim_count",
    "kata_shim_rpc_durations_histogram_milliseconds",
    "kata_shim_agent_rpc_durations_histogram_milliseconds",
    "kata_monitor_scrape_count",
    "kata_monitor_scrape_failed_count",
    "kata_monitor_scrape_durations_histogram_milliseconds",
];

fn check_with_promtool(what: &str, text: &str) {
    let (code, complaints) = promtool_check(text);
    assert!(
        code == 0 || code == 3,
        "promtool cannot parse {what} (exit {code}): {complaints:#?}"
    );
    let unexpected: Vec<&String> = complaints
        .iter()
        .filter(|c| {
            !KATA_LEGACY_NAMES
                .iter()
                .any(|n| c.starts_with(&format!("{n} ")))
        })
        .collect();
    assert!(unexpected.is_empty(), "promtool on {what}: {unexpected:#?}");
}

/// A kata pod named `name` on the CNI bridge, with a busybox container sleeping in it.
fn pod_with_sleeper(env: &CriContainerd, name: &str) -> (Pod, String) {
    let config = with_network_mode(pod_config(name, name, None), api::NamespaceMode::Pod);
    let pod = env.client.run_pod_with(config, KATA_HANDLER).or_panic(env);
    let c = env
        .client
        .create_container(&pod, "sleeper", BUSYBOX, &["sleep", "3600"], Vec::new())
        .or_panic(env);
    env.client.start_container(&c).or_panic(env);
    (pod, c)
}

/// The shim serving sandbox `id` (`-id <id>` on its command line).
fn shim_pid(id: &str) -> i32 {
    let shims: Vec<i32> = processes_naming(&format!("-id {id} "))
        .into_iter()
        .filter(|(_, c)| c.contains("containerd-shim-kata-v2"))
        .map(|(p, _)| p)
        .collect();
    assert_eq!(shims.len(), 1, "one shim for {id}: {shims:?}");
    shims[0]
}

/// The children of `pid` (QEMU and its daemons, for a shim).
fn children(pid: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .and_then(|(_, r)| r.split_whitespace().nth(1).map(str::to_owned))
                })
                .is_some_and(|ppid| ppid == pid.to_string())
        })
        .collect()
}

fn qemu_pid(id: &str) -> i32 {
    let q: Vec<i32> = processes_naming(&format!("/run/kata/{id}/"))
        .into_iter()
        .filter(|(_, c)| c.contains("qemu-system"))
        .map(|(p, _)| p)
        .collect();
    assert_eq!(q.len(), 1, "one QEMU for {id}: {q:?}");
    q[0]
}

fn kill9(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap_or_else(|e| panic!("kill -9 {pid}: {e}"));
}

/// A family's first sample value in a text, by the start of its line.
fn value(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

/// What a shim answers on its own socket, checked.
fn check_shim(env: &CriContainerd, pod: &Pod) -> String {
    let socket = shim_socket(&pod.id);
    let mode = std::fs::metadata(&socket)
        .unwrap_or_else(|e| panic!("{}: {e}", socket.display()))
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "management socket mode");
    let bundle = env
        .ctd
        .state_dir()
        .join("io.containerd.runtime.v2.task/k8s.io")
        .join(&pod.id);
    assert_eq!(
        std::fs::read_to_string(bundle.join("monitor_address")).unwrap(),
        format!("unix://{}", socket.display())
    );
    let r = shim_get(&socket, "/metrics").expect("GET /metrics");
    assert_eq!(r.status, 200);
    assert!(
        r.content_type
            .as_deref()
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        r.content_type
    );
    let text = r.text();
    for series in [
        "kata_shim_threads ",
        "kata_shim_fds ",
        "kata_shim_proc_status{item=\"vmrss\"}",
        "kata_shim_proc_stat{item=\"utime\"}",
        "kata_shim_io_stat{item=\"rchar\"}",
        "kata_shim_rpc_durations_histogram_milliseconds_count{action=\"create\"}",
        "kata_shim_rpc_durations_histogram_milliseconds_count{action=\"start\"}",
        "kata_shim_agent_rpc_durations_histogram_milliseconds_count{action=\"grpc.CreateContainerRequest\"}",
        "kata_shim_agent_scrape_failures_total ",
        "kata_shim_pod_overhead_memory_in_bytes ",
        "kata_hypervisor_threads ",
        "kata_hypervisor_fds ",
        "kata_hypervisor_proc_status{item=\"vmrss\"}",
        "kata_hypervisor_proc_stat{item=\"stime\"}",
        "kata_hypervisor_io_stat{item=\"wchar\"}",
        // The pod's network namespace: CNI's veth and the tap QEMU holds.
        "kata_hypervisor_netdev{interface=\"eth0\",item=\"recv_bytes\"}",
        "kata_hypervisor_netdev{interface=\"tap0_kata\",item=\"sent_bytes\"}",
        "kata_virtiofsd_threads ",
        "kata_virtiofsd_fds ",
        "kata_virtiofsd_proc_status{item=\"vmrss\"}",
        "kata_virtiofsd_proc_stat{item=\"utime\"}",
        "kata_agent_scrape_count ",
        "kata_agent_threads ",
        "kata_agent_total_time ",
        "kata_agent_total_vm ",
        "kata_agent_total_rss ",
        "kata_agent_proc_status{item=\"vmrss\"}",
        "kata_agent_proc_stat{item=\"utime\"}",
        "kata_guest_load{item=\"load1\"}",
        "kata_guest_tasks{item=\"cur\"}",
        "kata_guest_cpu_time{cpu=\"0\",item=\"idle\"}",
        "kata_guest_vm_stat{item=\"nr_free_pages\"}",
        "kata_guest_netdev_stat{interface=\"lo\",item=\"recv_bytes\"}",
        "kata_guest_meminfo{item=\"mem_total\"}",
    ] {
        assert!(text.contains(series), "{} has no {series}:\n{text}", pod.id);
    }
    // Values that mean something: the guest has the configured 512 MiB, QEMU holds some.
    let guest_mem = value(&text, "kata_guest_meminfo{item=\"mem_total\"}");
    assert!(
        (300e6..600e6).contains(&guest_mem),
        "guest MemTotal {guest_mem}"
    );
    let qemu_rss = value(&text, "kata_hypervisor_proc_status{item=\"vmrss\"}");
    assert!(qemu_rss > 50e6, "QEMU RSS {qemu_rss} bytes");
    assert_eq!(value(&text, "kata_shim_agent_scrape_failures_total "), 0.0);
    assert!(
        text.len() <= 144 * 1024,
        "{} bytes for one sandbox (Kata's design: 144 KB)",
        text.len()
    );
    let url = shim_get(&socket, "/agent-url")
        .expect("GET /agent-url")
        .text();
    assert!(
        (url.starts_with("vsock://") || url.starts_with("hvsock:///run/kata/"))
            && url.ends_with(":1024"),
        "{url}"
    );
    assert_eq!(shim_get(&socket, "/nope").unwrap().status, 404);
    check_with_promtool(&format!("the shim of {}", pod.id), &text);
    text
}

/// Scrapes kata-monitor's /metrics in a loop until stopped; every status seen.
struct Scraper {
    stop: Arc<AtomicBool>,
    statuses: Arc<Mutex<Vec<u16>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Scraper {
    fn start(monitor: std::net::SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let statuses = Arc::new(Mutex::new(Vec::new()));
        let (s, st) = (stop.clone(), statuses.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let status = kata_tests::metrics::http_get(monitor, "/metrics", &[])
                    .map(|a| a.status)
                    .unwrap_or(0);
                st.lock().unwrap().push(status);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Self {
            stop,
            statuses,
            thread: Some(thread),
        }
    }

    /// Stops once it has scraped at least `min` times (60 s at most).
    fn finish(mut self, min: usize) -> Vec<u16> {
        wait_until(Duration::from_secs(60), || {
            self.statuses.lock().unwrap().len() >= min
        });
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.statuses.lock().unwrap().clone()
    }
}

fn monitor_text(mon: &KataMonitor) -> String {
    let a = mon.get("/metrics").expect("kata-monitor /metrics");
    assert_eq!(a.status, 200, "{}", a.text());
    a.text()
}

/// The labelled series of pod `pod` in kata-monitor's answer, e.g. `kata_hypervisor_threads`.
fn labelled(name: &str, pod: &Pod) -> String {
    let meta = pod.config.metadata.as_ref().unwrap();
    format!(
        "{name}{{sandbox_id=\"{}\",cri_uid=\"{}\",cri_name=\"{}\",cri_namespace=\"{}\"",
        pod.id, meta.uid, meta.name, meta.namespace
    )
}

#[test]
fn two_pods_through_kata_monitor_and_prometheus() {
    let env = CriContainerd::start_with(Some(ShimInstall::new()), Networking::Cni);
    let suffix = std::process::id();
    let (a, _) = pod_with_sleeper(&env, &format!("metrics-a-{suffix}"));
    let (b, b_sleeper) = pod_with_sleeper(&env, &format!("metrics-b-{suffix}"));

    // Each shim's own answer.
    let started = Instant::now();
    let shim_a = check_shim(&env, &a);
    check_shim(&env, &b);
    eprintln!(
        "shim answers checked in {:?}; one sandbox: {} bytes",
        started.elapsed(),
        shim_a.len()
    );

    // kata-monitor: both pods, labelled with their CRI identity.
    let mon = KataMonitor::start(&env.ctd.socket());
    let text = monitor_text(&mon);
    for pod in [&a, &b] {
        assert!(
            text.contains(&labelled("kata_hypervisor_threads", pod)),
            "{} not labelled:\n{text}\nmonitor log:\n{}",
            pod.id,
            mon.log()
        );
        assert!(text.contains(&labelled("kata_guest_meminfo", pod)));
    }
    assert!(value(&text, "kata_monitor_running_shim_count ") >= 2.0);
    // For a reader of the test's output: what a labelled answer looks like.
    for series in [
        "kata_monitor_running_shim_count ",
        &labelled("kata_hypervisor_proc_status", &a),
        &labelled("kata_shim_pod_overhead_memory_in_bytes", &a),
        &labelled("kata_guest_meminfo", &a),
    ] {
        if let Some(line) = text.lines().find(|l| l.starts_with(series)) {
            eprintln!("kata-monitor: {line}");
        }
    }
    assert!(text.contains("kata_monitor_scrape_durations_histogram_milliseconds_bucket"));
    assert!(text.contains("kata_monitor_process_threads "));
    check_with_promtool("kata-monitor", &text);
    let sandboxes = mon.get("/sandboxes").unwrap().text();
    assert!(
        sandboxes.contains(&a.id) && sandboxes.contains(&b.id),
        "{sandboxes}"
    );
    let url = mon.get(&format!("/agent-url?sandbox={}", a.id)).unwrap();
    assert_eq!(
        url.text(),
        shim_get(&shim_socket(&a.id), "/agent-url").unwrap().text()
    );
    let raw = mon
        .get(&format!("/metrics?sandbox={}", a.id))
        .unwrap()
        .text();
    assert!(raw.contains("\nkata_hypervisor_threads ") && !raw.contains("cri_name="));
    let guest = mon.get("/metrics?filter_family=kata_guest").unwrap().text();
    let families = kata_metrics::text::parse(&guest, 64 << 20).unwrap();
    assert!(!families.is_empty() && families.iter().all(|f| f.name().starts_with("kata_guest")));
    assert_eq!(mon.get("/metrics?sandbox=nope").unwrap().status, 404);
    let zipped =
        kata_tests::metrics::http_get(mon.addr, "/metrics", &[("Accept-Encoding", "gzip")])
            .unwrap();
    assert_eq!(zipped.header("Content-Encoding"), Some("gzip"));
    let mut unzipped = String::new();
    flate2::read::GzDecoder::new(&zipped.body[..])
        .read_to_string(&mut unzipped)
        .unwrap();
    assert!(unzipped.contains(&labelled("kata_hypervisor_threads", &a)));
    eprintln!(
        "kata-monitor: {} bytes, {} gzipped",
        unzipped.len(),
        zipped.body.len()
    );

    // Prometheus scrapes kata-monitor: every group, the right labels, the dashboard.
    let prom = Prometheus::start(mon.addr);
    let up = prom.wait_for("kata_monitor_running_shim_count", Duration::from_secs(60));
    assert!(!up.is_empty(), "prometheus has no data:\n{}", prom.log());
    let ours = format!("{}|{}", a.id, b.id);
    for group in GROUPS {
        let expr = if group == "kata_monitor_" {
            format!("count({{__name__=~\"{group}.+\"}})")
        } else {
            format!("count by (sandbox_id) ({{__name__=~\"{group}.+\",sandbox_id=~\"{ours}\"}})")
        };
        let r = prom.wait_for(&expr, Duration::from_secs(30));
        let want = if group == "kata_monitor_" { 1 } else { 2 };
        assert_eq!(r.len(), want, "{expr}: {r:?}");
    }
    for pod in [&a, &b] {
        let meta = pod.config.metadata.as_ref().unwrap();
        let expr = format!(
            "kata_hypervisor_threads{{cri_name=\"{}\",cri_namespace=\"{POD_NAMESPACE}\"}}",
            meta.name
        );
        let r = prom.wait_for(&expr, Duration::from_secs(30));
        assert_eq!(r.len(), 1, "{expr}: {r:?}");
        assert_eq!(r[0]["metric"]["sandbox_id"], pod.id.as_str());
        assert_eq!(r[0]["metric"]["cri_uid"], meta.uid.as_str());
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(kata_tests::repo_root().join("hack/grafana/kata-dashboard.json"))
            .unwrap(),
    )
    .unwrap();
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "30s");
            let r = prom.wait_for(&expr, Duration::from_secs(60));
            assert!(
                !r.is_empty(),
                "dashboard panel {:?}: {expr} returned nothing",
                panel["title"]
            );
            queries += 1;
        }
    }
    assert!(queries >= 9, "{queries} dashboard queries");

    // Faults during scrapes: b's QEMU dies, then b's shim.
    let before = value(&monitor_text(&mon), "kata_monitor_scrape_failed_count ");
    let scraper = Scraper::start(mon.addr);
    let b_shim = shim_pid(&b.id);
    kill9(qemu_pid(&b.id));
    // The shim goes on answering, with its host side and the agent's failures counted.
    let mut b_text = String::new();
    let counted = wait_until(Duration::from_secs(30), || {
        b_text = monitor_text(&mon);
        sample(
            &b_text,
            &labelled("kata_shim_agent_scrape_failures_total", &b),
        )
        .is_some_and(|v| v > 0.0)
    });
    assert!(
        counted,
        "b's dead agent is not counted:\n{b_text}\nmonitor log:\n{}",
        mon.log()
    );
    assert!(b_text.contains(&labelled("kata_shim_threads", &b)));
    assert!(
        Path::new(&format!("/proc/{b_shim}")).exists(),
        "b's shim died with its VM"
    );
    assert!(
        !env.ctd.log().contains("panicked"),
        "a shim panicked:\n{}",
        env.ctd.log()
    );
    kill9(b_shim);
    // Until containerd's cleanup removes b's socket, a scrape of b fails and is counted;
    // once it is removed, b is no longer a running shim. Which of the two a scrape sees
    // first depends on the timing; either way b's old samples must not be served.
    let mut after = String::new();
    let settled = wait_until(Duration::from_secs(30), || {
        after = monitor_text(&mon);
        let failed =
            sample(&after, "kata_monitor_scrape_failed_count ").is_some_and(|v| v > before);
        let gone = sample(&after, "kata_monitor_running_shim_count ") == Some(1.0);
        (failed || gone) && !after.contains(&labelled("kata_shim_threads", &b))
    });
    assert!(
        settled,
        "a dead shim is neither counted as a failed scrape nor dropped:\n{after}"
    );
    assert!(
        after.contains(&labelled("kata_hypervisor_threads", &a)),
        "pod a still reported:\n{after}"
    );
    let statuses = scraper.finish(6);
    assert!(statuses.len() > 5, "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200),
        "kata-monitor answered {statuses:?}"
    );
    assert!(
        Path::new(&format!("/proc/{}", mon.pid())).exists(),
        "kata-monitor died:\n{}",
        mon.log()
    );

    drop(prom);
    drop(mon);
    env.client.stop_pod(&a.id).or_panic(&env);
    env.client.remove_pod(&a.id).or_panic(&env);
    // b's shim died under containerd: the kubelet would stop its container, then the pod,
    // retrying while containerd settles the dead shim's exits.
    let mut last = String::new();
    let removed = wait_until(Duration::from_secs(60), || {
        let r = env
            .client
            .stop_container(&b_sleeper, 0)
            .and_then(|()| env.client.stop_pod(&b.id))
            .and_then(|()| env.client.remove_pod(&b.id));
        match r {
            Ok(()) => true,
            Err(e) => {
                last = format!("{e:#}");
                std::thread::sleep(Duration::from_secs(1));
                false
            }
        }
    });
    assert!(
        removed,
        "pod b with a dead shim could not be removed: {last}"
    );
    drop(env);
    assert_no_runtime_leaks(&[&a.id, &b.id]);
}

/// CPU seconds and proportional memory of `pids` on the host.
fn host_usage(pids: &[i32]) -> (f64, f64) {
    let mut cpu = 0.0;
    let mut mem = 0.0;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        // utime and stime are fields 14 and 15 (1-based), 12 and 13 after the name.
        let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        cpu += ticks / 100.0;
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
        let pss: f64 = rollup
            .lines()
            .find_map(|l| l.strip_prefix("Pss:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        mem += pss * 1024.0;
    }
    (cpu, mem)
}

/// The container's CPU seconds and memory bytes as CRI reports them.
fn container_usage(env: &CriContainerd, id: &str) -> (f64, f64) {
    let s = env.client.container_stats(id).or_panic(env);
    let cpu = s
        .cpu
        .and_then(|c| c.usage_core_nano_seconds)
        .map(|v| v.value as f64 / 1e9)
        .unwrap_or(0.0);
    let mem = s
        .memory
        .and_then(|m| m.usage_bytes)
        .map(|v| v.value as f64)
        .unwrap_or(0.0);
    (cpu, mem)
}

/// The shim's pod overhead against the same quantities measured by the test: the
/// sandbox's host processes (CPU time, PSS) minus the container's usage (CRI stats), over
/// the same window. Only the test scrapes this shim, so its window is the test's.
#[test]
fn pod_overhead_matches_the_tests_own_measurement() {
    let env = CriContainerd::start(Some(ShimInstall::new()));
    // An idle container: under TCG a busy guest's CPU time runs ahead of the host's (the
    // guest charges its task for time its vCPU thread waited on a loaded host), which
    // makes Kata's difference negative; idle, the overhead is QEMU's own work.
    let pod = env
        .client
        .run_pod(&format!("overhead-{}", std::process::id()), KATA_HANDLER)
        .or_panic(&env);
    let c = env
        .client
        .create_container(&pod, "idle", BUSYBOX, &["sleep", "3600"], Vec::new())
        .or_panic(&env);
    env.client.start_container(&c).or_panic(&env);
    let shim = shim_pid(&pod.id);
    let first = shim_get(&shim_socket(&pod.id), "/metrics").unwrap().text();
    assert!(
        !first.contains("kata_hypervisor_netdev"),
        "a host-network VM has no network device"
    );
    let mut pids = vec![shim];
    pids.extend(children(shim));
    assert!(pids.len() >= 3, "shim, QEMU and virtiofsd: {pids:?}");
    let socket = shim_socket(&pod.id);

    // The shim samples at the end of each scrape; ours follow each scrape's answer, so
    // both windows hold the same work (the second scrape's included).
    shim_get(&socket, "/metrics").unwrap();
    let t0 = Instant::now();
    let (host0, _) = host_usage(&pids);
    let (guest0, _) = container_usage(&env, &c);
    std::thread::sleep(Duration::from_secs(12));
    let text = shim_get(&socket, "/metrics").unwrap().text();
    let (host1, host_mem) = host_usage(&pids);
    let span = t0.elapsed().as_secs_f64();
    let (guest1, guest_mem) = container_usage(&env, &c);
    let cpu = value(&text, "kata_shim_pod_overhead_cpu ");
    let mem = value(&text, "kata_shim_pod_overhead_memory_in_bytes ");
    let own_cpu = ((host1 - host0) - (guest1 - guest0)) / span * 100.0;
    let own_mem = host_mem - guest_mem;
    eprintln!(
        "pod overhead: shim cpu {cpu:.2} % / test {own_cpu:.2} % (host {:.2} s, guest {:.2} s over {span:.1} s); \
         shim memory {:.1} MiB / test {:.1} MiB",
        host1 - host0,
        guest1 - guest0,
        mem / 1048576.0,
        own_mem / 1048576.0
    );
    assert!(own_mem > 50e6 && own_cpu > 0.0, "a VM costs something");
    assert!(
        (mem - own_mem).abs() <= 0.2 * own_mem,
        "memory overhead {mem} vs {own_mem}"
    );
    assert!(
        (cpu - own_cpu).abs() <= 0.2 * own_cpu,
        "cpu overhead {cpu} vs {own_cpu}"
    );

    env.client.stop_pod(&pod.id).or_panic(&env);
    env.client.remove_pod(&pod.id).or_panic(&env);
    let id = pod.id.clone();
    drop(env);
    assert_no_runtime_leaks(&[&id]);
}
