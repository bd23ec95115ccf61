//! Pod networking through containerd's CRI plugin and CNI, as on a Kubernetes node: a
//! test-owned containerd 1.6 whose CRI plugin runs Debian's CNI plugins (`/usr/lib/cni`)
//! with `hack/cni/10-kata-bridge.conflist` (bridge `kata-cni0` on this host, gateway
//! 10.88.213.1, host-local IPAM in 10.88.213.0/24, MTU 1450, no masquerade). Pods with
//! `NamespaceOption.network = POD` get a network namespace from CNI with a veth on the bridge;
//! with handler `kata` the shim puts a tap next to the veth and the VM's NIC takes over the
//! veth's MAC, address, MTU and routes (tcfilter), with `runc` the container uses the
//! namespace itself. Every scenario runs with both handlers. All traffic is between this
//! host, its bridge and the pods on it: nothing is routed or masqueraded elsewhere.
//!
//! A host-network pod (`network = NODE`) with kata runs in its VM's own network namespace,
//! which has no NIC: only loopback (see `host_network_kata_pod_has_only_loopback`).

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use kata_tests::cri::{
    api, pod_config, pod_ip, with_network_mode, CniNetwork, CriContainerd, OrPanic, Pod, BUSYBOX,
    KATA_HANDLER, RUNC_HANDLER,
};
use kata_tests::wait_until;

/// A name no other test of this run uses (runc and kata variants run at once).
fn unique(name: &str) -> String {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{name}-{}-{n}", std::process::id())
}

fn tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir().unwrap()
}

fn text(out: &Output) -> String {
    kata_tests::containerd::text(out)
}

/// Runs a host command; panics with its output when it fails.
fn host(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `args` on the host inside the network namespace `netns` (a bind-mounted nsfs file).
fn in_netns(netns: &Path, args: &[&str]) -> String {
    let net = format!("--net={}", netns.display());
    let mut all = vec!["nsenter", net.as_str()];
    all.extend_from_slice(args);
    host(&all)
}

/// Generates `runc::<name>` and `kata::<name>` tests from one body taking the handler.
macro_rules! both_handlers {
    ($($name:ident => $body:expr;)*) => {
        mod runc {
            use super::*;
            $(#[test] fn $name() { ($body)(RUNC_HANDLER); })*
        }
        mod kata {
            use super::*;
            $(#[test] fn $name() { ($body)(KATA_HANDLER); })*
        }
    };
}

/// The HTTP port of the pods' busybox httpd.
const HTTP_PORT: u16 = 8080;

/// A pod `name` in namespace mode `network`, hostname `name`, container logs in `logs`.
fn pod_in(name: &str, network: api::NamespaceMode, logs: &Path) -> api::PodSandboxConfig {
    with_network_mode(pod_config(name, name, Some(logs)), network)
}

/// The page a pod's httpd serves.
fn page_of(pod_name: &str) -> String {
    format!("hello-from-{pod_name}")
}

/// Starts container `web` in `pod`: busybox httpd on [`HTTP_PORT`] serving [`page_of`].
fn start_web(env: &CriContainerd, pod: &Pod, pod_name: &str) -> String {
    let script = format!(
        "mkdir -p /tmp/www && echo {} > /tmp/www/index.html && exec httpd -f -p {HTTP_PORT} -h /tmp/www",
        page_of(pod_name)
    );
    let id = env
        .client
        .create_container(pod, "web", BUSYBOX, &["sh", "-c", &script], Vec::new())
        .or_panic(env);
    env.client.start_container(&id).or_panic(env);
    id
}

/// `GET /index.html` from `ip`:[`HTTP_PORT`] over TCP from this process (the host's root
/// network namespace), retried until the page contains `want` or 30 s pass.
fn fetch_from_host(ip: Ipv4Addr, want: &str) -> Result<(), String> {
    let mut last = String::new();
    let ok = wait_until(Duration::from_secs(30), || {
        let addr = (ip, HTTP_PORT).into();
        let mut conn = match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
            Ok(c) => c,
            Err(e) => {
                last = format!("connect: {e}");
                return false;
            }
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
        if let Err(e) = conn.write_all(b"GET /index.html HTTP/1.0\r\n\r\n") {
            last = format!("send: {e}");
            return false;
        }
        last.clear();
        let _ = conn.read_to_string(&mut last);
        last.contains(want)
    });
    if ok {
        Ok(())
    } else {
        Err(format!("no page {want:?} from {ip}:{HTTP_PORT}: {last:?}"))
    }
}

/// The value after `key` in a whitespace-separated line (`mtu 1450`, `via 10.0.0.1`).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let mut words = line.split_whitespace();
    words.find(|w| *w == key)?;
    words.next()
}

/// (gateway, device) of the default route in `ip route` output (iproute2's or busybox's).
fn default_route(routes: &str) -> Option<(String, String)> {
    let line = routes.lines().find(|l| l.starts_with("default"))?;
    Some((
        field(line, "via")?.to_owned(),
        field(line, "dev")?.to_owned(),
    ))
}

/// The MTU in `ip -o link show <dev>` output.
fn mtu(link: &str) -> Option<u32> {
    field(link, "mtu")?.parse().ok()
}

/// The host end of a pod's veth: in CNI's result (containerd's verbose sandbox info), the
/// interface outside the pod's namespace (`Sandbox` empty) that is not the bridge.
fn host_veth(info: &serde_json::Value, bridge: &str) -> Option<String> {
    info["cniResult"]["Interfaces"]
        .as_object()?
        .iter()
        .find_map(|(name, i)| (i["Sandbox"] == "" && name != bridge).then(|| name.clone()))
}

/// What the test learned about one running pod.
struct Running {
    name: String,
    pod: Pod,
    web: String,
    ip: Ipv4Addr,
    netns: PathBuf,
    host_veth: String,
}

/// Two pods on the CNI bridge, each serving a page with busybox httpd:
/// - PodSandboxStatus's IP is in the CNI subnet and is what `ip -o -4 addr show eth0` shows
///   inside the pod;
/// - `lo` is up: the pod fetches its own page from 127.0.0.1;
/// - the host (this process) fetches each pod's page over TCP;
/// - each pod pings the bridge (the gateway) and reaches the other pod (ping and HTTP);
/// - inside the pod, eth0's MTU and the default route are the ones CNI configured in the pod's
///   network namespace (read on the host with nsenter), and CNI's MTU;
/// - kata: the namespace holds `tap0_kata` and an ingress qdisc on eth0 while the pod runs
///   (the VM's NIC), and no QEMU runs for a removed pod;
/// - after StopPodSandbox and RemovePodSandbox: the namespace is gone or holds no tap and no
///   ingress qdisc, the host veth is gone, host-local released the address, and nothing of
///   the pods is left.
fn pod_network(handler: &'static str) {
    let kata = handler == KATA_HANDLER;
    let net = CniNetwork::kata_bridge();
    let logs = tempdir("kata-cri-net-logs-");
    let env = CriContainerd::for_handler_with_cni(handler);
    let client = &env.client;
    let names: Vec<String> = ["a", "b"]
        .iter()
        .map(|s| unique(&format!("net-{handler}-{s}")))
        .collect();

    // Both pods at once (under TCG a kata pod takes seconds to boot).
    let pods: Vec<Pod> = std::thread::scope(|s| {
        let handles: Vec<_> = names
            .iter()
            .map(|name| {
                let dir = logs.path().join(name);
                std::fs::create_dir_all(&dir).unwrap();
                s.spawn(move || {
                    client.run_pod_with(pod_in(name, api::NamespaceMode::Pod, &dir), handler)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().or_panic(&env))
            .collect()
    });

    let mut running = Vec::new();
    for (name, pod) in names.iter().zip(pods) {
        let (status, info) = client.pod_status_verbose(&pod.id).or_panic(&env);
        assert_eq!(
            status.state,
            api::PodSandboxState::SandboxReady as i32,
            "{status:?}"
        );
        let ip = pod_ip(&status).unwrap_or_else(|e| panic!("pod {name}: {e:#}"));
        assert!(
            net.contains(ip) && ip != net.gateway,
            "pod {name}'s IP {ip} is not a pod address of {}/{}",
            net.subnet.0,
            net.subnet.1
        );
        let netns = client
            .pod_netns(&pod.id)
            .or_panic(&env)
            .unwrap_or_else(|| panic!("pod {name} has no network namespace: {info}"));
        assert!(netns.exists(), "{}", netns.display());
        let web = start_web(&env, &pod, name);
        running.push(Running {
            name: name.clone(),
            pod,
            web,
            ip,
            netns,
            host_veth: host_veth(&info, &net.bridge)
                .unwrap_or_else(|| panic!("pod {name}: no host veth in {info}")),
        });
    }
    let ips: Vec<Ipv4Addr> = running.iter().map(|r| r.ip).collect();
    assert_ne!(ips[0], ips[1], "two pods, two addresses");

    let exec = |id: &str, cmd: &[&str]| -> String {
        let (code, stdout, stderr) = client.exec_sync(id, cmd).or_panic(&env);
        assert_eq!(
            code, 0,
            "exec {cmd:?} in {id}: stdout {stdout:?} stderr {stderr:?}"
        );
        stdout
    };
    let gateway = net.gateway.to_string();
    for r in &running {
        // The address CRI reports is the pod's own.
        let addr = exec(&r.web, &["ip", "-o", "-4", "addr", "show", "eth0"]);
        assert!(
            addr.contains(&format!("inet {}/{} ", r.ip, net.subnet.1)),
            "pod {}: CRI says {}, inside: {addr}",
            r.name,
            r.ip
        );

        // MTU and default route: inside the pod as CNI set them in the pod's namespace.
        let link_in_pod = exec(&r.web, &["ip", "-o", "link", "show", "eth0"]);
        let link_in_ns = in_netns(&r.netns, &["ip", "-o", "link", "show", "eth0"]);
        assert_eq!(mtu(&link_in_ns), Some(net.mtu), "CNI's MTU: {link_in_ns}");
        assert_eq!(
            mtu(&link_in_pod),
            mtu(&link_in_ns),
            "pod {}: inside {link_in_pod} / netns {link_in_ns}",
            r.name
        );
        let routes_in_pod = exec(&r.web, &["ip", "route"]);
        let routes_in_ns = in_netns(&r.netns, &["ip", "route"]);
        let want = Some((gateway.clone(), "eth0".to_owned()));
        assert_eq!(
            default_route(&routes_in_ns),
            want,
            "CNI's route: {routes_in_ns}"
        );
        assert_eq!(
            default_route(&routes_in_pod),
            default_route(&routes_in_ns),
            "pod {}: inside {routes_in_pod:?} / netns {routes_in_ns:?}",
            r.name
        );

        // Loopback is up: the pod reaches its own httpd on 127.0.0.1.
        let lo = exec(&r.web, &["ip", "-o", "link", "show", "lo"]);
        assert!(lo.contains(",UP"), "pod {}: {lo}", r.name);
        let local = format!("http://127.0.0.1:{HTTP_PORT}/index.html");
        let page = exec(&r.web, &["timeout", "20", "wget", "-q", "-O", "-", &local]);
        assert_eq!(page.trim(), page_of(&r.name));

        // The pod reaches the bridge, the host reaches the pod.
        exec(&r.web, &["ping", "-c", "2", "-W", "5", &gateway]);
        fetch_from_host(r.ip, &page_of(&r.name)).unwrap_or_else(|e| panic!("{e}"));

        // kata: the VM's NIC is a tap in the pod's namespace, redirected with tc.
        let links = in_netns(&r.netns, &["ip", "-o", "link"]);
        let qdiscs = in_netns(&r.netns, &["tc", "qdisc", "show", "dev", "eth0"]);
        assert_eq!(links.contains("tap0_kata"), kata, "{links}");
        assert_eq!(qdiscs.contains("ingress"), kata, "{qdiscs}");
    }

    // Pod to pod, both ways: ping and HTTP.
    for (from, to) in [(&running[0], &running[1]), (&running[1], &running[0])] {
        let to_ip = to.ip.to_string();
        exec(&from.web, &["ping", "-c", "2", "-W", "5", &to_ip]);
        let url = format!("http://{to_ip}:{HTTP_PORT}/index.html");
        // (Debian's busybox 1.35 wget crashes with -T: `timeout` bounds it instead.)
        let page = exec(&from.web, &["timeout", "20", "wget", "-q", "-O", "-", &url]);
        assert_eq!(page.trim(), page_of(&to.name), "{} -> {url}", from.name);
    }

    for r in &running {
        client.stop_pod(&r.pod.id).or_panic(&env);
        client.remove_pod(&r.pod.id).or_panic(&env);
    }
    assert!(client.list_pods().or_panic(&env).is_empty());
    for r in &running {
        // containerd removes the namespace at StopPodSandbox; if it is still there, the
        // shim's tap and tc setup must not be.
        if r.netns.exists() {
            let links = in_netns(&r.netns, &["ip", "-o", "link"]);
            assert!(!links.contains("_kata"), "tap left: {links}");
            let qdiscs = in_netns(&r.netns, &["tc", "qdisc", "show"]);
            assert!(!qdiscs.contains("ingress"), "tc left: {qdiscs}");
        }
        let veth = &r.host_veth;
        let out = Command::new("ip")
            .args(["-o", "link", "show", veth])
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "host veth {veth} left: {}",
            text(&out)
        );
        if kata {
            let qemu = kata_tests::processes_naming(&format!("/run/kata/{}/", r.pod.id));
            assert!(qemu.is_empty(), "{qemu:?}");
        }
        // host-local released the address.
        let lease = Path::new("/var/lib/cni/networks")
            .join(&net.name)
            .join(r.ip.to_string());
        assert!(!lease.exists(), "{} left", lease.display());
    }
    let mut ids: Vec<&str> = running.iter().map(|r| r.pod.id.as_str()).collect();
    ids.extend(running.iter().map(|r| r.web.as_str()));
    kata_tests::assert_no_runtime_leaks(&ids);
}

both_handlers! {
    pod_network_via_cni_bridge => pod_network;
}

/// A host-network pod (`network = NODE`) with kata, in a containerd that has CNI: CNI is not
/// called, the shim plumbs no NIC, and the pod runs in its VM's own network namespace. That
/// namespace has loopback only: the pod does not see the node's interfaces (unlike runc's
/// host-network pods, which share the node's namespace) and has no network beyond its VM.
/// Its containers still run.
#[test]
fn host_network_kata_pod_has_only_loopback() {
    let logs = tempdir("kata-cri-net-logs-");
    let env = CriContainerd::for_handler_with_cni(KATA_HANDLER);
    let client = &env.client;
    let name = unique("hostnet-kata");
    let pod = client
        .run_pod_with(
            pod_in(&name, api::NamespaceMode::Node, logs.path()),
            KATA_HANDLER,
        )
        .or_panic(&env);
    let status = client.pod_status(&pod.id).or_panic(&env);
    assert_eq!(
        status.state,
        api::PodSandboxState::SandboxReady as i32,
        "{status:?}"
    );
    assert_eq!(client.pod_netns(&pod.id).or_panic(&env), None);
    let id = client
        .create_container(&pod, "main", BUSYBOX, &["sleep", "1000"], Vec::new())
        .or_panic(&env);
    client.start_container(&id).or_panic(&env);
    let s = client.container_status(&id).or_panic(&env);
    assert_eq!(
        s.state,
        api::ContainerState::ContainerRunning as i32,
        "{s:?}"
    );
    let (code, links, err) = client.exec_sync(&id, &["ip", "-o", "link"]).or_panic(&env);
    assert_eq!(code, 0, "{err}");
    let names: Vec<&str> = links
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(str::trim)
        .collect();
    assert_eq!(names, ["lo"], "interfaces in the pod: {links}");
    // Loopback is up: the pod's containers reach each other on 127.0.0.1.
    let (code, out, err) = client
        .exec_sync(&id, &["ping", "-c", "1", "-W", "5", "127.0.0.1"])
        .or_panic(&env);
    assert_eq!(code, 0, "127.0.0.1 unreachable in the pod: {out} {err}");
    // The host's interfaces are not the pod's: eth0 of this host is not there.
    let (code, _, _) = client
        .exec_sync(&id, &["ip", "link", "show", "eth0"])
        .or_panic(&env);
    assert_ne!(code, 0, "the pod sees an eth0");
    // The shim plumbed nothing on the host: no tap in the host's namespace.
    let host_links = host(&["ip", "-o", "link"]);
    assert!(!host_links.contains("_kata"), "{host_links}");

    client.stop_pod(&pod.id).or_panic(&env);
    client.remove_pod(&pod.id).or_panic(&env);
    kata_tests::assert_no_runtime_leaks(&[&pod.id, &id]);
}
