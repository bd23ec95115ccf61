//! Peer pods benchmark (`hack/bench-peerpod.sh` runs it): time to a running container in a
//! `kata-remote` pod (the adaptor with its local provider, busybox pulled inside the VM from
//! a private registry on the provider bridge) next to a local `kata` pod (busybox imported
//! on the node), RUNS times each (default 3), through a private containerd 1.6 with CRI
//! (the tests' harness). The shim's log gives the split: CreateVM, StartVM, agent ready,
//! image pull in the VM, CreateContainer in the guest; CRI calls are timed around.
//!
//! Prints `phase peer_ms local_ms` lines (medians; `-` where a phase does not exist).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use kata_tests::containerd::ShimInstall;
use kata_tests::cri::{
    container_config, pod_config, CriContainerd, BUSYBOX, KATA_HANDLER, KATA_REMOTE_HANDLER,
};
use kata_tests::peerpod::Adaptor;
use kata_tests::registry::Registry;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// The last `key=<n>` of the shim's log lines naming `who` (`sandbox=<id>` or
/// `container=<id>`).
fn field(log: &str, who: &str, key: &str) -> Option<f64> {
    let needle = format!("{key}=");
    log.lines()
        .filter(|l| l.contains(who))
        .filter_map(|l| {
            let at = l.find(&needle)?;
            let rest = &l[at + needle.len()..];
            let end = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            rest[..end].parse::<f64>().ok()
        })
        .next_back()
}

type Samples = BTreeMap<&'static str, Vec<f64>>;

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// One pod with one container of `image` through `handler`; records its phases.
fn one(env: &CriContainerd, handler: &str, image: &str, n: usize, out: &mut Samples) -> Result<()> {
    let name = format!("bench-{}-{}-{n}", handler, std::process::id());
    let t = Instant::now();
    let pod = env
        .client
        .run_pod_with(pod_config(&name, "bench", None), handler)?;
    out.entry("RunPodSandbox (CRI)").or_default().push(ms(t));
    let t = Instant::now();
    let c = env.client.create_container_with(
        &pod,
        container_config("c", image, &["sleep", "3600"], vec![]),
    )?;
    out.entry("CreateContainer (CRI)").or_default().push(ms(t));
    let t = Instant::now();
    env.client.start_container(&c)?;
    out.entry("StartContainer (CRI)").or_default().push(ms(t));
    let log = env.ctd.log();
    let sb = format!("sandbox={}", pod.id);
    let ct = format!("container={c}");
    let mut put = |phase, v: Option<f64>| {
        if let Some(v) = v {
            out.entry(phase).or_default().push(v);
        }
    };
    if handler == KATA_REMOTE_HANDLER {
        let create = field(&log, &sb, "create_vm_ms");
        let start = field(&log, &sb, "start_vm_ms");
        put("CreateVM / VM launch", create);
        put("StartVM (instance up, agent over mTLS)", start);
        let ready = field(&log, &sb, "sandbox_ready_ms");
        put(
            "agent ready in the shim",
            ready.zip(create.zip(start)).map(|(r, (c, s))| r - c - s),
        );
        let pull = field(&log, &ct, "image_pull_ms");
        put("image pull in the VM", pull);
        // container_create_ms spans the volume copies, the pull and CreateContainer.
        put(
            "container create in the guest",
            field(&log, &ct, "container_create_ms")
                .zip(pull)
                .map(|(c, p)| c - p),
        );
    } else {
        put(
            "container create in the guest",
            field(&log, &ct, "container_create_ms"),
        );
        put("CreateVM / VM launch", field(&log, &sb, "vm_launch_ms"));
        let launch = field(&log, &sb, "vm_launch_ms");
        put(
            "agent ready in the shim",
            field(&log, &sb, "agent_ready_ms")
                .zip(launch)
                .map(|(a, l)| a - l),
        );
    }
    put(
        "container create in the guest",
        field(&log, &ct, "container_create_ms"),
    );
    env.client.stop_container(&c, 2)?;
    env.client.remove_container(&c)?;
    env.client.stop_pod(&pod.id)?;
    env.client.remove_pod(&pod.id)?;
    Ok(())
}

fn main() -> Result<()> {
    let runs = env_num("RUNS", 3);
    let busybox = kata_tests::repo_root().join("build/images/busybox.tar");
    let mut adaptor = Adaptor::new();
    let registry_addr = SocketAddr::new(adaptor.gateway.into(), Registry::free_port());
    adaptor.start(&[registry_addr.to_string()], "");
    let registry = Registry::start_at(registry_addr);
    registry.push(
        &format!("oci-archive:{}", busybox.display()),
        "busybox:kata",
    );
    let shim = ShimInstall::new();
    shim.set_config("agent.kata", "enable_debug = false");
    let remote_config = shim.write_remote_config(&adaptor.socket);
    let env = CriContainerd::for_remote(shim, &remote_config);
    env.allow_insecure_registry(&registry.host());
    let remote_image = format!("{}/busybox:kata", registry.host());
    env.client
        .pull_image(&remote_image)
        .context("containerd pulling busybox from the test registry")?;
    let (mut peer, mut local) = (Samples::new(), Samples::new());
    for n in 0..runs {
        one(&env, KATA_REMOTE_HANDLER, &remote_image, n, &mut peer)
            .with_context(|| format!("peer pod run {n}"))?;
        one(&env, KATA_HANDLER, BUSYBOX, n, &mut local)
            .with_context(|| format!("local kata run {n}"))?;
    }
    if !adaptor.instances().is_empty() {
        return Err(anyhow!("instances left: {:?}", adaptor.instances()));
    }
    let phases = [
        "CreateVM / VM launch",
        "StartVM (instance up, agent over mTLS)",
        "agent ready in the shim",
        "image pull in the VM",
        "container create in the guest",
        "RunPodSandbox (CRI)",
        "CreateContainer (CRI)",
        "StartContainer (CRI)",
    ];
    let show = |s: &Samples, p: &str| {
        s.get(p)
            .cloned()
            .and_then(median)
            .map(|v| format!("{v:.0}"))
            .unwrap_or_else(|| "-".into())
    };
    for p in phases {
        println!("{p}\t{}\t{}", show(&peer, p), show(&local, p));
    }
    let total = |s: &Samples| {
        [
            "RunPodSandbox (CRI)",
            "CreateContainer (CRI)",
            "StartContainer (CRI)",
        ]
        .iter()
        .filter_map(|p| s.get(p).cloned().and_then(median))
        .sum::<f64>()
    };
    println!(
        "running container (sum of CRI medians)\t{:.0}\t{:.0}",
        total(&peer),
        total(&local)
    );
    println!("runs\t{runs}\t{runs}");
    drop(env);
    drop(registry);
    adaptor.stop();
    Ok(())
}
