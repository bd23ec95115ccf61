//! Peer pods, the adaptor's side, with real parts: the `peerpod-adaptor` binary with its
//! local provider (pod VMs as QEMU on a test bridge, booted from hack/build-podvm.sh's
//! image), driven over its ttrpc socket as the shim would; the pod's agent reached through
//! the returned socket with the shim's hybrid dialer; a private Debian `docker-registry`
//! on the bridge address holding the offline busybox image (copied in with `skopeo`) and an
//! image with whiteouts; a pod network namespace with a veth as CNI leaves it.
//!
//! Needs: hack/install-deps.sh, hack/build-test-images.sh, hack/build-podvm.sh and
//! `cargo build -p kata-peerpod`.

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use kata_proto::agent::{
    CreateContainerRequest, RemoveContainerRequest, StartContainerRequest, Stdio,
    WaitProcessRequest,
};
use kata_proto::health::{health_check_response::ServingStatus, CheckRequest};
use kata_proto::hypervisor::{CreateVMRequest, StartVMRequest, StopVMRequest, VersionRequest};
use kata_proto::image::PullImageRequest;
use kata_tests::peerpod::{ctx, guest_spec, sh, Adaptor, PodAgent, PodNetns};
use kata_tests::registry::{layout_on_top, Layer, Registry};
use kata_tests::{init_logging, repo_root, wait_until};

/// The host's count of IPv4 fragments it created (`Ip: FragCreates` of /proc/net/snmp).
fn ip_fragments_created() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap();
    let mut lines = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    let i = names
        .split_whitespace()
        .position(|n| n == "FragCreates")
        .unwrap();
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

fn code(e: ttrpc::Error) -> (ttrpc::Code, String) {
    match e {
        ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_owned()),
        other => panic!("expected an RPC status, got {other:?}"),
    }
}

fn create_req(id: &str, name: &str, netns: Option<&PodNetns>) -> CreateVMRequest {
    let mut req = CreateVMRequest::new();
    req.id = id.into();
    req.annotations = HashMap::from([
        ("io.kubernetes.cri.sandbox-name".to_owned(), name.to_owned()),
        (
            "io.kubernetes.cri.sandbox-namespace".to_owned(),
            "peerpods-test".to_owned(),
        ),
    ]);
    if let Some(ns) = netns {
        req.networkNamespacePath = ns.path.display().to_string();
    }
    req
}

fn sandbox_id(tag: &str) -> String {
    format!("{tag}{:x}{:08x}", std::process::id(), rand_u32())
}

fn rand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}

/// CreateVM + StartVM; returns the agent socket.
async fn start_pod(
    adaptor: &Adaptor,
    id: &str,
    name: &str,
    netns: Option<&PodNetns>,
) -> std::path::PathBuf {
    let client = adaptor.client().await;
    let resp = client
        .create_vm(ctx(30), &create_req(id, name, netns))
        .await
        .unwrap_or_else(|e| panic!("CreateVM: {e:?}\n{}", adaptor.log()));
    let socket = std::path::PathBuf::from(resp.agentSocketPath);
    assert_eq!(socket, adaptor.pods.path().join(id).join("agent.ttrpc"));
    assert!(!socket.exists(), "the agent socket exists before StartVM");
    let mut start = StartVMRequest::new();
    start.id = id.into();
    if let Err(e) = client.start_vm(ctx(600), &start).await {
        panic!("StartVM: {e:?}\nadaptor log:\n{}", adaptor.log());
    }
    assert!(socket.exists());
    socket
}

async fn stop_pod(adaptor: &Adaptor, id: &str) {
    let mut stop = StopVMRequest::new();
    stop.id = id.into();
    adaptor
        .client()
        .await
        .stop_vm(ctx(60), &stop)
        .await
        .unwrap_or_else(|e| panic!("StopVM: {e:?}\n{}", adaptor.log()));
}

/// The instance of a pod and its address, from the local provider's record.
fn instance_of(adaptor: &Adaptor) -> (String, IpAddr) {
    let names = adaptor.instances();
    assert_eq!(names.len(), 1, "instances: {names:?}");
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(adaptor.instances_dir.join(&names[0]).join("meta.json")).unwrap(),
    )
    .unwrap();
    (
        names[0].clone(),
        meta["address"].as_str().unwrap().parse().unwrap(),
    )
}

async fn pull(
    agent: &PodAgent,
    container: &str,
    image: &str,
) -> Result<kata_proto::image::PullImageResponse, ttrpc::Error> {
    let mut req = PullImageRequest::new();
    req.container_id = container.into();
    req.image = image.into();
    agent.images.pull_image(ctx(60), &req).await
}

async fn create_container(agent: &PodAgent, id: &str, spec: Vec<u8>, sandbox: bool, output: bool) {
    let mut req = CreateContainerRequest::new();
    req.container_id = id.into();
    req.oci_spec = spec;
    req.sandbox = sandbox;
    let mut stdio = Stdio::new();
    stdio.stdout = output;
    stdio.stderr = output;
    req.stdio = Some(stdio).into();
    agent
        .containers
        .create_container(ctx(60), &req)
        .await
        .unwrap_or_else(|e| panic!("CreateContainer {id}: {e:?}"));
}

async fn start_container(agent: &PodAgent, id: &str) {
    let mut req = StartContainerRequest::new();
    req.container_id = id.into();
    agent
        .containers
        .start_container(ctx(60), &req)
        .await
        .unwrap();
}

/// The image with whiteouts: busybox, then a layer that removes /etc/group (whiteout),
/// hides everything in /home (opaque directory) and adds /home/new-file.
fn push_whiteout_image(registry: &Registry, busybox: &std::path::Path) {
    let layout = tempfile::tempdir().unwrap();
    let layer = Layer::gzip(&[
        ("etc/.wh.group", Some(b"")),
        ("home/", None),
        ("home/.wh..wh..opq", Some(b"")),
        ("home/new-file", Some(b"from the top layer\n")),
    ]);
    layout_on_top(busybox, &[layer], layout.path(), "kata");
    registry.push(
        &format!("oci:{}:kata", layout.path().display()),
        "whiteout:kata",
    );
}

/// An image whose top layer is corrupted in the registry's storage after the push (same
/// size, other bytes): its digest no longer matches. Returns that layer's digest.
fn push_corrupt_image(registry: &Registry, busybox: &std::path::Path) -> String {
    let layout = tempfile::tempdir().unwrap();
    let payload: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
    let layer = Layer::gzip(&[("corrupt-me", Some(payload.as_slice()))]);
    let digest = kata_tests::registry::digest_of(&layer.gzip);
    layout_on_top(busybox, &[layer], layout.path(), "kata");
    registry.push(
        &format!("oci:{}:kata", layout.path().display()),
        "corrupt:kata",
    );
    let file = registry.blob_file(&digest);
    let mut data = std::fs::read(&file).unwrap();
    let mid = data.len() / 2;
    for b in &mut data[mid..mid + 16] {
        *b ^= 0xff;
    }
    std::fs::write(&file, data).unwrap();
    digest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_vm_pulls_images_in_the_guest_and_tunnels_the_pod_network() {
    init_logging();
    let busybox = repo_root().join("build/images/busybox.tar");
    assert!(busybox.is_file(), "run hack/build-test-images.sh");
    let netns = PodNetns::create();
    let mut adaptor = Adaptor::new();
    let registry_addr = SocketAddr::new(adaptor.gateway.into(), Registry::free_port());
    adaptor.start(&[registry_addr.to_string()], "");
    let registry = Registry::start_at(registry_addr);
    registry.push(
        &format!("oci-archive:{}", busybox.display()),
        "busybox:kata",
    );
    push_whiteout_image(&registry, &busybox);
    let corrupt_digest = push_corrupt_image(&registry, &busybox);

    let client = adaptor.client().await;
    let mut v = VersionRequest::new();
    v.version = "test".into();
    assert_eq!(
        client.version(ctx(5), &v).await.unwrap().version,
        env!("CARGO_PKG_VERSION")
    );

    let sid = sandbox_id("pp");
    let t0 = std::time::Instant::now();
    let socket = start_pod(&adaptor, &sid, "web", Some(&netns)).await;
    eprintln!("CreateVM+StartVM (agent ready): {:?}", t0.elapsed());
    let (instance, vm_ip) = instance_of(&adaptor);
    assert!(
        instance.starts_with("podvm-peerpods-test-web-"),
        "instance name {instance} does not trace back to the pod"
    );

    // The VM: QEMU with neither virtio-fs nor vsock, and no virtiofsd for it.
    let pid = adaptor.qemu_pid(&instance).expect("QEMU pid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(!cmdline.contains("vhost-user-fs"), "{cmdline}");
    assert!(!cmdline.contains("vsock"), "{cmdline}");
    assert!(cmdline.contains("virtio-net-pci"), "{cmdline}");
    let virtiofsd: Vec<_> = kata_tests::processes_naming("virtiofsd")
        .into_iter()
        .filter(|(_, c)| c.contains(&instance) || c.contains(&sid))
        .collect();
    assert!(virtiofsd.is_empty(), "{virtiofsd:?}");
    // The user data does not travel on the kernel command line.
    let append = cmdline.split(" -append ").nth(1).unwrap_or_default();
    assert!(!append.contains("BEGIN"), "{append}");

    // The agent, through the returned socket with the hybrid handshake.
    let agent = Arc::new(PodAgent::connect(&socket).await);
    let health = agent
        .health
        .check(ctx(10), &CheckRequest::new())
        .await
        .unwrap();
    assert_eq!(health.status.enum_value(), Ok(ServingStatus::SERVING));

    // In-guest pull: the layers come from the VM's address.
    let busybox_ref = format!("{}/busybox:kata", registry.host());
    let t1 = std::time::Instant::now();
    let pulled = pull(&agent, "sb", &busybox_ref).await.unwrap_or_else(|e| {
        panic!(
            "PullImage: {e:?}\nconsole:\n{}\nregistry:\n{}",
            adaptor.console(&instance),
            registry.log()
        )
    });
    eprintln!("PullImage busybox: {:?}", t1.elapsed());
    assert_eq!(
        pulled.rootfs,
        "/run/kata-containers/shared/containers/sb/rootfs"
    );
    assert!(pulled.manifest_digest.starts_with("sha256:"));
    let config: serde_json::Value = serde_json::from_slice(&pulled.config).unwrap();
    assert_eq!(config["rootfs"]["type"], "layers");
    let gets = registry.blob_gets_from(vm_ip);
    assert!(
        !gets.is_empty(),
        "no blob GET from the VM's address {vm_ip} in the registry log:\n{}",
        registry.log()
    );
    assert!(
        registry.blob_gets_from(adaptor.gateway.into()).is_empty(),
        "blobs were fetched from the node's address"
    );
    let (c, m) = code(pull(&agent, "sb", &busybox_ref).await.unwrap_err());
    assert_eq!(c, ttrpc::Code::ALREADY_EXISTS, "{m}");

    // The pod's sandbox container, in the pod network namespace of the VM.
    create_container(
        &agent,
        "sb",
        guest_spec(
            "sb",
            &["sleep", "3600"],
            &[("/run/kata-containers/peerpod/vm-netns", "/vmns")],
        ),
        true,
        false,
    )
    .await;
    start_container(&agent, "sb").await;

    // The pod IP is on the pod's interface in the VM, and not on the VM's NIC.
    let pod_addrs = agent.exec("sb", "ip1", &["ip", "-o", "-4", "addr"]).await;
    assert_eq!(pod_addrs.status, 0, "{pod_addrs:?}");
    assert!(
        pod_addrs
            .stdout
            .contains(&format!("eth0    inet {}/24", netns.pod_ip))
            || pod_addrs
                .stdout
                .contains(&format!("inet {}/24", netns.pod_ip)),
        "{pod_addrs:?}"
    );
    assert!(
        !pod_addrs.stdout.contains(&vm_ip.to_string()),
        "{pod_addrs:?}"
    );
    let vm_addrs = agent
        .exec(
            "sb",
            "ip2",
            &["nsenter", "--net=/vmns", "ip", "-o", "-4", "addr"],
        )
        .await;
    assert_eq!(vm_addrs.status, 0, "{vm_addrs:?}");
    assert!(vm_addrs.stdout.contains(&vm_ip.to_string()), "{vm_addrs:?}");
    assert!(
        !vm_addrs.stdout.contains(&netns.pod_ip.to_string()),
        "{vm_addrs:?}"
    );

    // The tunnel: the host reaches the pod IP, the pod reaches the host, the node-side
    // VXLAN device counts the traffic.
    let vxlan = netns
        .ip(&["-o", "link", "show", "type", "vxlan"])
        .split(':')
        .nth(1)
        .map(|s| s.trim().split('@').next().unwrap().to_owned())
        .expect("a vxlan device in the pod's namespace");
    let rx0 = netns.counter(&vxlan, "rx_packets");
    let tx0 = netns.counter(&vxlan, "tx_packets");
    let ping = sh(
        "busybox",
        &["ping", "-c", "3", "-W", "10", &netns.pod_ip.to_string()],
    );
    assert!(ping.contains("3 packets received"), "{ping}");
    let back = agent
        .exec(
            "sb",
            "ping",
            &["ping", "-c", "3", "-W", "10", &netns.host_ip.to_string()],
        )
        .await;
    assert_eq!(back.status, 0, "{back:?}");
    assert!(netns.counter(&vxlan, "rx_packets") >= rx0 + 6);
    assert!(netns.counter(&vxlan, "tx_packets") >= tx0 + 6);

    // A full-MTU transfer: 4 MiB host -> pod over TCP in 1500-byte packets (the pod MTU),
    // each carried whole through the tunnel: the host fragments no outer packet.
    let frags0 = ip_fragments_created();
    let bytes0 = netns.counter(&vxlan, "tx_bytes");
    let listener = {
        let agent = agent.clone();
        tokio::spawn(async move {
            agent
                .exec("sb", "nc", &["sh", "-c", "nc -l -p 5001 | wc -c"])
                .await
        })
    };
    const SIZE: usize = 4 << 20;
    let target = SocketAddr::new(netns.pod_ip.into(), 5001);
    tokio::task::spawn_blocking(move || {
        let mut stream = None;
        wait_until(Duration::from_secs(30), || {
            stream = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2)).ok();
            stream.is_some()
        });
        let mut s = stream.expect("connect to the pod's listener");
        s.write_all(&vec![0x5a; SIZE]).unwrap();
    })
    .await
    .unwrap();
    let received = tokio::time::timeout(Duration::from_secs(120), listener)
        .await
        .expect("the pod's listener did not finish")
        .unwrap();
    assert_eq!(received.stdout.trim(), SIZE.to_string(), "{received:?}");
    let tunneled = netns.counter(&vxlan, "tx_bytes") - bytes0;
    let frags = ip_fragments_created() - frags0;
    eprintln!(
        "tunnel: {tunneled} bytes into the VXLAN device, {frags} IP fragments created on the host"
    );
    assert!(
        tunneled >= SIZE as u64,
        "{tunneled} bytes through the tunnel"
    );
    assert_eq!(
        frags, 0,
        "the host fragmented outer packets: the pod MTU does not fit the underlay"
    );
    assert_eq!(
        netns
            .ip(&["-o", "link", "show", "eth0"])
            .split("mtu ")
            .nth(1)
            .and_then(|s| s.split(' ').next()),
        Some("1500")
    );

    // An image with whiteouts: a deleted file and an opaque directory.
    let whiteout_ref = format!("{}/whiteout:kata", registry.host());
    pull(&agent, "wh", &whiteout_ref).await.unwrap();
    create_container(
        &agent,
        "wh",
        guest_spec(
            "wh",
            &["sh", "-c", "cat /etc/group; echo ---; ls -a /home; cat /home/new-file; test -x /bin/busybox && echo lower-layer-present"],
            &[],
        ),
        false,
        true,
    )
    .await;
    let mut out = agent.stream("wh", "", "stdout").await;
    let mut err = agent.stream("wh", "", "stderr").await;
    start_container(&agent, "wh").await;
    let (mut o, mut e) = (Vec::new(), Vec::new());
    use tokio::io::AsyncReadExt;
    let _ = tokio::join!(out.read_to_end(&mut o), err.read_to_end(&mut e));
    let mut wait = WaitProcessRequest::new();
    wait.container_id = "wh".into();
    agent.containers.wait_process(ctx(60), &wait).await.unwrap();
    let (o, e) = (String::from_utf8_lossy(&o), String::from_utf8_lossy(&e));
    assert!(e.contains("/etc/group"), "stderr: {e}");
    let home: Vec<&str> = o
        .split("---\n")
        .nth(1)
        .unwrap_or_default()
        .lines()
        .take(3)
        .collect();
    assert_eq!(home, [".", "..", "new-file"], "stdout: {o}");
    assert!(o.contains("from the top layer"), "{o}");
    assert!(o.contains("lower-layer-present"), "{o}");
    let mut rm = RemoveContainerRequest::new();
    rm.container_id = "wh".into();
    agent
        .containers
        .remove_container(ctx(60), &rm)
        .await
        .unwrap();

    // Bad pulls: a missing image, a layer whose digest does not match.
    let missing = format!("{}/no-such-image:kata", registry.host());
    let (c, m) = code(pull(&agent, "missing", &missing).await.unwrap_err());
    assert_eq!(c, ttrpc::Code::NOT_FOUND, "{m}");
    assert!(m.contains(&missing), "{m}");
    let corrupt = format!("{}/corrupt:kata", registry.host());
    let (c, m) = code(pull(&agent, "corrupt", &corrupt).await.unwrap_err());
    assert_eq!(c, ttrpc::Code::DATA_LOSS, "{m}");
    assert!(m.contains(&corrupt) && m.contains(&corrupt_digest), "{m}");
    // Nothing of the failed pulls stays: the same container ids pull a good image.
    pull(&agent, "corrupt", &busybox_ref).await.unwrap();

    // StopVM deletes the instance and everything the adaptor made for the pod.
    drop(agent);
    stop_pod(&adaptor, &sid).await;
    assert!(!socket.exists());
    assert!(!adaptor.dir.path().join("state/pods").join(&sid).exists());
    assert!(netns
        .ip(&["-o", "link", "show", "type", "vxlan"])
        .trim()
        .is_empty());
    let qdiscs = netns.ip(&["link", "show", "eth0"]);
    assert!(
        !sh(
            "tc",
            &["-n", &netns.name, "qdisc", "show", "dev", "eth0", "ingress"]
        )
        .contains("ingress"),
        "{qdiscs}"
    );
    stop_pod(&adaptor, &sid).await;
    adaptor.assert_no_instances();
    kata_tests::assert_no_runtime_leaks(&[&sid]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_adaptor_serves_its_pods_again_and_deletes_orphans() {
    init_logging();
    let kept_ns = PodNetns::create();
    let gone_ns = PodNetns::create();
    let mut adaptor = Adaptor::new();
    adaptor.start(&[], "");
    let kept = sandbox_id("pk");
    let gone = sandbox_id("pg");
    let kept_socket = start_pod(&adaptor, &kept, "kept", Some(&kept_ns)).await;
    start_pod(&adaptor, &gone, "gone", Some(&gone_ns)).await;
    let instances = adaptor.instances();
    assert_eq!(instances.len(), 2);
    let kept_instance = instances
        .iter()
        .find(|i| i.contains("-kept-"))
        .unwrap()
        .clone();
    let gone_instance = instances
        .iter()
        .find(|i| i.contains("-gone-"))
        .unwrap()
        .clone();
    let kept_pid = adaptor.qemu_pid(&kept_instance).unwrap();
    let gone_pid = adaptor.qemu_pid(&gone_instance).unwrap();

    // The adaptor dies; meanwhile one pod goes away (the CRI removes its namespace).
    adaptor.kill();
    gone_ns.remove();
    assert!(std::path::Path::new(&format!("/proc/{kept_pid}")).exists());
    adaptor.spawn();

    // The kept pod's VM ran on, and its agent socket works again.
    assert_eq!(adaptor.qemu_pid(&kept_instance), Some(kept_pid));
    let agent = PodAgent::connect(&kept_socket).await;
    let health = agent
        .health
        .check(ctx(10), &CheckRequest::new())
        .await
        .unwrap();
    assert_eq!(health.status.enum_value(), Ok(ServingStatus::SERVING));
    let ping = sh(
        "busybox",
        &["ping", "-c", "2", "-W", "10", &kept_ns.pod_ip.to_string()],
    );
    assert!(ping.contains("2 packets received"), "{ping}");

    // The vanished pod's instance was deleted at start.
    let reaped = wait_until(Duration::from_secs(20), || {
        !std::path::Path::new(&format!("/proc/{gone_pid}")).exists()
    });
    assert!(reaped, "the orphan's QEMU {gone_pid} still runs");
    assert_eq!(adaptor.instances(), std::slice::from_ref(&kept_instance));
    assert!(adaptor.log().contains("went away"), "{}", adaptor.log());
    assert!(!adaptor.dir.path().join("state/pods").join(&gone).exists());

    drop(agent);
    stop_pod(&adaptor, &kept).await;
    stop_pod(&adaptor, &gone).await;
    adaptor.assert_no_instances();
    kata_tests::assert_no_runtime_leaks(&[&kept, &gone]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_by_name_and_leave_nothing() {
    init_logging();
    let mut adaptor = Adaptor::new();
    adaptor.start(&[], "");
    let client = adaptor.client().await;

    let mut stop = StopVMRequest::new();
    stop.id = "never-created".into();
    client.stop_vm(ctx(10), &stop).await.unwrap();
    let mut start = StartVMRequest::new();
    start.id = "never-created".into();
    let (c, m) = code(client.start_vm(ctx(10), &start).await.unwrap_err());
    assert_eq!(c, ttrpc::Code::NOT_FOUND, "{m}");

    let base = || create_req("bad1", "web", None);
    let mut no_ns = base();
    no_ns
        .annotations
        .remove("io.kubernetes.cri.sandbox-namespace");
    let mut gpu = base();
    gpu.annotations.insert(
        "io.katacontainers.config.hypervisor.default_gpus".into(),
        "1".into(),
    );
    let mut image = base();
    image.annotations.insert(
        "io.katacontainers.config.hypervisor.image".into(),
        "no-such-podvm".into(),
    );
    let mut memory = base();
    memory.annotations.insert(
        "io.katacontainers.config.hypervisor.default_memory".into(),
        "lots".into(),
    );
    let mut netns = base();
    netns.networkNamespacePath = "/var/run/netns/no-such-pod".into();
    let mut id = base();
    id.id = "../escape".into();
    for (req, needle) in [
        (no_ns, "io.kubernetes.cri.sandbox-namespace"),
        (gpu, "default_gpus"),
        (image, "no-such-podvm"),
        (memory, "default_memory"),
        (netns, "/var/run/netns/no-such-pod"),
        (id, "../escape"),
    ] {
        let (c, m) = code(client.create_vm(ctx(10), &req).await.unwrap_err());
        assert_eq!(c, ttrpc::Code::INVALID_ARGUMENT, "{needle}: {m}");
        assert!(m.contains(needle), "{needle}: {m}");
    }

    // A pod MTU the provider network cannot carry through VXLAN.
    let jumbo = PodNetns::create();
    jumbo.ip(&["link", "set", "eth0", "mtu", "9000"]);
    let (c, m) = code(
        client
            .create_vm(ctx(10), &create_req("bad2", "jumbo", Some(&jumbo)))
            .await
            .unwrap_err(),
    );
    assert_eq!(c, ttrpc::Code::INVALID_ARGUMENT, "{m}");
    assert!(m.contains("MTU 9000"), "{m}");

    // CreateVM twice; StopVM of a pod never started removes its state.
    client
        .create_vm(ctx(10), &create_req("dup", "dup", None))
        .await
        .unwrap();
    let (c, m) = code(
        client
            .create_vm(ctx(10), &create_req("dup", "dup", None))
            .await
            .unwrap_err(),
    );
    assert_eq!(c, ttrpc::Code::ALREADY_EXISTS, "{m}");
    stop.id = "dup".into();
    client.stop_vm(ctx(10), &stop).await.unwrap();

    let pods: Vec<_> = std::fs::read_dir(adaptor.dir.path().join("state/pods"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(pods.is_empty(), "pod state left: {pods:?}");
    let sockets: Vec<_> = std::fs::read_dir(adaptor.pods.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(sockets.is_empty(), "pod directories left: {sockets:?}");
    adaptor.assert_no_instances();
}

/// The stand-in Kubernetes API server of peerpods-k8s's tests.
#[path = "../../peerpods-k8s/tests/support/stand_in.rs"]
mod stand_in;

/// Instance types for the sizing tests: memory sizes far enough apart that the guest's
/// MemTotal tells them apart; `huge` exists but is not allowed.
const SIZES: &str = r#"instance_types = { tiny = { vcpus = 1, memory_mib = 512 }, wide = { vcpus = 2, memory_mib = 640 }, tall = { vcpus = 1, memory_mib = 896 }, huge = { vcpus = 4, memory_mib = 2048 } }
allowed_instance_types = ["tall", "wide", "tiny"]
default_instance_type = "tiny""#;

fn sized_req(id: &str, name: &str, sizing: &[(&str, &str)]) -> CreateVMRequest {
    let mut req = create_req(id, name, None);
    for (k, v) in sizing {
        req.annotations.insert(
            format!("io.katacontainers.config.hypervisor.{k}"),
            v.to_string(),
        );
    }
    req
}

/// Starts a pod from `req` (CreateVM + StartVM); returns the agent socket.
async fn start_req(adaptor: &Adaptor, req: CreateVMRequest) -> std::path::PathBuf {
    let client = adaptor.client().await;
    let id = req.id.clone();
    let resp = client
        .create_vm(ctx(30), &req)
        .await
        .unwrap_or_else(|e| panic!("CreateVM {id}: {e:?}\n{}", adaptor.log()));
    let mut start = StartVMRequest::new();
    start.id = id.clone();
    if let Err(e) = client.start_vm(ctx(600), &start).await {
        panic!("StartVM {id}: {e:?}\nadaptor log:\n{}", adaptor.log());
    }
    std::path::PathBuf::from(resp.agentSocketPath)
}

/// The instance directory whose name holds the pod name `name`.
fn instance_named(adaptor: &Adaptor, name: &str) -> String {
    adaptor
        .instances()
        .into_iter()
        .find(|i| i.contains(&format!("-{name}-")))
        .unwrap_or_else(|| panic!("no instance for pod {name}: {:?}", adaptor.instances()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_sizes_are_chosen_at_create_vm_and_seen_in_the_guest() {
    init_logging();
    let mut adaptor = Adaptor::new();
    adaptor.sizing = SIZES.into();
    adaptor.start(&[], "");
    let client = adaptor.client().await;

    // Refused before anything is made: a type outside the allow-list (known or not), a pod
    // larger than every allowed type, GPUs (the local provider has none).
    for (sizing, needles) in [
        (
            vec![("machine_type", "huge")],
            vec!["\"huge\"", "allowed: tiny, wide, tall"],
        ),
        (
            vec![("machine_type", "m5.xlarge")],
            vec!["\"m5.xlarge\"", "allowed: tiny, wide, tall"],
        ),
        (
            vec![("default_vcpus", "1"), ("default_memory", "4096")],
            vec!["1 vCPUs and 4096 MiB", "tall (1 vCPUs, 896 MiB)"],
        ),
        (
            vec![("default_vcpus", "3")],
            vec!["asks for 3 vCPUs", "largest allowed instance type tall"],
        ),
        (
            vec![("default_gpus", "1"), ("default_gpu_model", "a100")],
            vec![
                "no GPUs",
                "1 GPU(s) of model a100",
                "io.katacontainers.config.hypervisor.default_gpus=1",
                "io.katacontainers.config.hypervisor.default_gpu_model=a100",
            ],
        ),
    ] {
        let (c, m) = code(
            client
                .create_vm(ctx(10), &sized_req("refused", "refused", &sizing))
                .await
                .unwrap_err(),
        );
        assert_eq!(c, ttrpc::Code::INVALID_ARGUMENT, "{sizing:?}: {m}");
        for n in needles {
            assert!(m.contains(n), "{sizing:?}: {n:?} not in {m}");
        }
        adaptor.assert_nothing_of("refused");
    }

    // A named allowed type, a size derived from default_vcpus/default_memory (the smallest
    // allowed type with 2 vCPUs and 600 MiB: wide), and the default.
    let (named, derived, default) = (sandbox_id("sn"), sandbox_id("sd"), sandbox_id("sf"));
    let (s_named, s_derived, s_default) = tokio::join!(
        start_req(
            &adaptor,
            sized_req(&named, "named", &[("machine_type", "tall")])
        ),
        start_req(
            &adaptor,
            sized_req(
                &derived,
                "derived",
                &[("default_vcpus", "2"), ("default_memory", "600")]
            )
        ),
        start_req(&adaptor, sized_req(&default, "default", &[])),
    );
    let qemus = adaptor.processes();
    for (pod, id, socket, ty, vcpus, mib) in [
        ("named", &named, &s_named, "tall", 1u32, 896u64),
        ("derived", &derived, &s_derived, "wide", 2, 640),
        ("default", &default, &s_default, "tiny", 1, 512),
    ] {
        // Recorded on the instance and in the pod's state, and logged.
        let instance = instance_named(&adaptor, pod);
        let meta: serde_json::Value = serde_json::from_slice(
            &std::fs::read(adaptor.instances_dir.join(&instance).join("meta.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(meta["instance_type"], ty, "{pod}: {meta}");
        assert_eq!(meta["size"]["vcpus"], vcpus, "{pod}: {meta}");
        assert_eq!(meta["size"]["memory_mib"], mib, "{pod}: {meta}");
        let record: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                adaptor
                    .dir
                    .path()
                    .join("state/pods")
                    .join(id)
                    .join("pod.json"),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(record["instance_type"], ty, "{pod}: {record}");
        let log = adaptor.plain_log();
        assert!(log.contains(&format!("instance_type={ty}")), "{log}");
        // QEMU booted with that size.
        let (_, cmdline) = qemus
            .iter()
            .find(|(_, c)| c.contains(&instance))
            .unwrap_or_else(|| panic!("no QEMU for {instance}: {qemus:?}"));
        assert!(
            cmdline.contains(&format!(" -smp {vcpus} "))
                && cmdline.contains(&format!(" -m {mib}M ")),
            "{pod}: {cmdline}"
        );
        // And the guest sees it (the agent's GetGuestDetails: online CPUs, MemTotal).
        let agent = PodAgent::connect(socket).await;
        let details = agent
            .agent
            .get_guest_details(ctx(30), &kata_proto::agent::GuestDetailsRequest::new())
            .await
            .unwrap();
        assert_eq!(details.online_cpus, vcpus, "{pod}: {details:?}");
        let kib = details.mem_total_kib;
        assert!(
            kib <= mib * 1024 && kib > mib * 1024 * 8 / 10,
            "{pod}: MemTotal {kib} KiB for a {mib} MiB VM"
        );
    }
    // No API server configured: no node capacity.
    assert!(
        adaptor.log().contains("not advertised"),
        "{}",
        adaptor.log()
    );

    for id in [&named, &derived, &default] {
        stop_pod(&adaptor, id).await;
    }
    adaptor.assert_no_instances();
    kata_tests::assert_no_runtime_leaks(&[&named, &derived, &default]);
}

/// The capacity requests the stand-in API server saw: ("add", value) or ("remove", "").
fn capacity_requests(api: &stand_in::StandIn) -> Vec<(String, String)> {
    api.seen()
        .iter()
        .map(|s| {
            assert_eq!(s.method, "PATCH");
            assert_eq!(s.path, "/api/v1/nodes/node-a/status");
            assert_eq!(s.headers["authorization"], "Bearer adaptor-token");
            let op = &s.body[0];
            assert_eq!(
                op["path"], "/status/capacity/kata.peerpods.io~1vm",
                "{}",
                s.body
            );
            (
                op["op"].as_str().unwrap().to_owned(),
                op["value"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

fn wait_for_requests(api: &stand_in::StandIn, n: usize, adaptor: &Adaptor) {
    let seen = wait_until(Duration::from_secs(30), || api.seen().len() >= n);
    assert!(
        seen,
        "the API server saw {:?}, expected {n} requests\n{}",
        api.seen(),
        adaptor.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pod_vm_limit_counts_live_pods_across_restarts_and_is_the_node_capacity() {
    init_logging();
    // The stand-in API server and a service account trusting it.
    let pki = stand_in::pki();
    let api = stand_in::StandIn::start(
        &pki,
        hyper::StatusCode::OK,
        serde_json::json!({"kind": "Node", "apiVersion": "v1"}),
    )
    .await
    .unwrap();
    let sa = tempfile::tempdir().unwrap();
    std::fs::write(sa.path().join("ca.crt"), &pki.ca_pem).unwrap();
    std::fs::write(sa.path().join("token"), "adaptor-token\n").unwrap();

    let mut adaptor = Adaptor::new();
    adaptor.top = format!(
        "limit_per_node = 2\n[kubernetes]\nservice_account_dir = \"{}\"\nwithdraw_capacity_on_shutdown = true\n",
        sa.path().display()
    );
    adaptor.env = vec![
        ("KUBERNETES_SERVICE_HOST".into(), "127.0.0.1".into()),
        (
            "KUBERNETES_SERVICE_PORT".into(),
            api.addr.port().to_string(),
        ),
        ("NODE_NAME".into(), "node-a".into()),
    ];
    adaptor.start(&[], "");
    wait_for_requests(&api, 1, &adaptor);
    assert_eq!(capacity_requests(&api), [("add".into(), "2".into())]);

    let (ns1, ns2, ns3, nsb) = (
        PodNetns::create(),
        PodNetns::create(),
        PodNetns::create(),
        PodNetns::create(),
    );
    let (p1, p2, p3, pb) = (
        sandbox_id("l1"),
        sandbox_id("l2"),
        sandbox_id("l3"),
        sandbox_id("lb"),
    );
    let client = adaptor.client().await;
    start_pod(&adaptor, &p1, "one", Some(&ns1)).await;

    // A pod whose StartVM fails (its network namespace went away) gives its slot back...
    client
        .create_vm(ctx(30), &create_req(&pb, "broken", Some(&nsb)))
        .await
        .unwrap();
    nsb.remove();
    let mut start = StartVMRequest::new();
    start.id = pb.clone();
    client.start_vm(ctx(120), &start).await.unwrap_err();
    // ...so a second pod fits.
    start_pod(&adaptor, &p2, "two", Some(&ns2)).await;

    // A third is refused, naming the limit, and leaves nothing; so is a retried StartVM of
    // the failed pod (it needs a slot again).
    let limited = |(c, m): (ttrpc::Code, String)| {
        assert_eq!(c, ttrpc::Code::RESOURCE_EXHAUSTED, "{m}");
        assert!(m.contains("limit_per_node = 2"), "{m}");
    };
    limited(code(
        client
            .create_vm(ctx(30), &create_req(&p3, "three", Some(&ns3)))
            .await
            .unwrap_err(),
    ));
    adaptor.assert_nothing_of(&p3);
    limited(code(client.start_vm(ctx(30), &start).await.unwrap_err()));
    assert_eq!(adaptor.instances().len(), 2, "{:?}", adaptor.instances());

    // The count survives a restart (the capacity is withdrawn at the stop, as configured,
    // and advertised again at the start).
    drop(client);
    adaptor.stop();
    adaptor.spawn();
    wait_for_requests(&api, 3, &adaptor);
    assert_eq!(
        capacity_requests(&api),
        [
            ("add".into(), "2".into()),
            ("remove".into(), "".into()),
            ("add".into(), "2".into())
        ]
    );
    let client = adaptor.client().await;
    limited(code(
        client
            .create_vm(ctx(30), &create_req(&p3, "three", Some(&ns3)))
            .await
            .unwrap_err(),
    ));
    adaptor.assert_nothing_of(&p3);

    // StopVM frees a slot: the third pod starts.
    stop_pod(&adaptor, &p1).await;
    start_pod(&adaptor, &p3, "three", Some(&ns3)).await;
    assert_eq!(adaptor.instances().len(), 2, "{:?}", adaptor.instances());

    for id in [&p2, &p3, &pb] {
        stop_pod(&adaptor, id).await;
    }
    drop(client);
    adaptor.stop();
    wait_for_requests(&api, 4, &adaptor);
    assert_eq!(capacity_requests(&api)[3], ("remove".into(), "".into()));
    adaptor.assert_no_instances();
    kata_tests::assert_no_runtime_leaks(&[&p1, &p2, &p3, &pb]);
}
