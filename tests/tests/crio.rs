//! CRI-O contract: the test plays CRI-O's part toward `containerd-shim-kata-v2` exactly as
//! CRI-O's `runtime_type = "vm"` path does (no CRI-O, no containerd): bundles with CRI-O's
//! annotations and layout, `start` with an empty address and TTRPC_ADDRESS, the Task API
//! over ttrpc, Delete then Shutdown per container, exits from Wait + State, OOM from the
//! bundle's `oom` file. See `kata_tests::crio`.
//!
//! Checks that do not stop the flow are collected and reported together at the end, so one
//! run names every broken part of the contract; a step the rest depends on fails at once.

use std::time::{Duration, Instant};

use containerd_shim::protos::types::task::Status;
use kata_tests::crio::{
    leftovers, shim_servers, socket_path, Bundle, Crio, ShimClient, ShimReaper,
};
use kata_tests::wait_until;

/// Kill with signal 0 must succeed on a running container: CRI-O's `IsContainerAlive`,
/// which ReopenContainerLog (kubelet's log rotation) checks first.
const ALIVE_CHECK: &str = "CRI-O's IsContainerAlive, used by ReopenContainerLog";

/// Contract violations found so far.
#[derive(Debug, Default)]
struct Checks(Vec<String>);

impl Checks {
    fn check(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            let what = what.into();
            eprintln!("contract violation: {what}");
            self.0.push(what);
        }
    }

    /// Panics listing every violation, with the shim's log.
    fn finish(self, shim_log: &str) {
        assert!(
            self.0.is_empty(),
            "{} CRI-O contract violation(s):\n- {}\n\nshim log:\n{shim_log}",
            self.0.len(),
            self.0.join("\n- ")
        );
    }
}

/// Runs blocking work (image extraction, `start`) off the async workers.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// State, checked against the expected status and pid and containerd's 2 s bound.
async fn expect_state(
    checks: &mut Checks,
    client: &ShimClient,
    b: &Bundle,
    status: Status,
    pid: u32,
) -> Option<u32> {
    match client.state(&b.id).await {
        Ok((s, took)) => {
            let got = s.status.enum_value_or_default();
            checks.check(
                got == status,
                format!("State({}) status {got:?}, expected {status:?}", b.name),
            );
            checks.check(
                s.pid == pid,
                format!("State({}) pid {}, Create returned {pid}", b.name, s.pid),
            );
            checks.check(
                s.bundle == b.dir.display().to_string(),
                format!("State({}) bundle {:?}", b.name, s.bundle),
            );
            eprintln!("State({}) = {got:?} in {took:?}", b.name);
            Some(s.exit_status)
        }
        Err(e) => {
            checks.check(false, format!("State({}): {e}", b.name));
            None
        }
    }
}

/// Waits for the content CRI-O's stream reader got (output may trail the exit a little).
fn stream_contains(b: &Bundle, needle: &str) -> bool {
    wait_until(Duration::from_secs(5), || {
        b.stdout.contents().contains(needle)
    })
}

/// `start` for a container of a running pod: must print the pod shim's address without a
/// second server.
fn start_in_pod(checks: &mut Checks, crio: &Crio, b: &Bundle, address: &str, server: i32) {
    let started = blocking(|| crio.start_shim(b));
    assert!(
        started.success,
        "start for {} failed: {}",
        b.name, started.output
    );
    checks.check(
        started.output == address,
        format!(
            "start for {} printed {:?}, the pod's shim serves {address:?} (same SandboxID)",
            b.name, started.output
        ),
    );
    checks.check(
        b.address_file().as_deref() == Some(address),
        format!("{}'s bundle address file: {:?}", b.name, b.address_file()),
    );
    eprintln!("start for {} took {:?}", b.name, started.elapsed);
    let servers = shim_servers(address);
    checks.check(
        servers.len() == 1 && servers[0].0 == server,
        format!("servers for the pod after {}'s start: {servers:?}", b.name),
    );
    let spawned: Vec<_> = kata_tests::processes_naming(&b.id)
        .into_iter()
        .filter(|(_, c)| c.contains("containerd-shim-kata-v2"))
        .collect();
    checks.check(
        spawned.is_empty(),
        format!("a shim process for {} exists: {spawned:?}", b.name),
    );
    // A server started in this bundle would have opened its log fifo.
    std::thread::sleep(Duration::from_millis(300));
    let log = b.log.text();
    checks.check(
        log.is_empty(),
        format!(
            "a shim server ran in {}'s bundle (it logged there): {log}",
            b.name
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_driven_as_crio_drives_it() {
    kata_tests::init_logging();
    let mut checks = Checks::default();
    let crio = Crio::new();
    let pod = crio.pod("crio-pod");
    let sandbox = blocking(|| crio.sandbox_bundle(&pod));
    let hello = blocking(|| crio.container_bundle(&pod, "hello", &["sh", "-c", "echo hi; exit 4"]));
    let sleeper = blocking(|| crio.container_bundle(&pod, "sleeper", &["sleep", "1000"]));
    // Dropped first: stops a shim a failed run left (its VM goes with it).
    let mut reaper = ShimReaper::default();
    let log = || sandbox.log.text();

    // RunPodSandbox: start, Create, Start the infra container.
    let started = blocking(|| crio.start_shim(&sandbox));
    assert!(started.success, "sandbox start failed: {}", started.output);
    let address = started.output.clone();
    assert!(
        address.starts_with("unix://") && !address.contains(char::is_whitespace),
        "start must print only the address, got {address:?}"
    );
    reaper.watch(&address);
    eprintln!("sandbox start took {:?}: {address}", started.elapsed);
    checks.check(
        sandbox.address_file().as_deref() == Some(address.as_str()),
        format!("sandbox bundle address file: {:?}", sandbox.address_file()),
    );
    let servers = shim_servers(&address);
    assert_eq!(servers.len(), 1, "one server for the pod: {servers:?}");
    let server = servers[0].0;

    let client = ShimClient::connect(&address)
        .await
        .unwrap_or_else(|e| panic!("connect {address}: {e}"));
    let t = Instant::now();
    let created = client
        .create(&crio.create_request(&sandbox))
        .await
        .unwrap_or_else(|e| panic!("Create(sandbox): {e}\nshim log:\n{}", log()));
    eprintln!(
        "Create(sandbox) took {:?}, pid {}",
        t.elapsed(),
        created.pid
    );
    let pid = created.pid;
    assert!(pid > 0, "Create(sandbox) returned pid 0");
    expect_state(&mut checks, &client, &sandbox, Status::CREATED, pid).await;
    client
        .start(&sandbox.id)
        .await
        .unwrap_or_else(|e| panic!("Start(sandbox): {e}\nshim log:\n{}", log()));
    expect_state(&mut checks, &client, &sandbox, Status::RUNNING, pid).await;
    if let Err(e) = client.kill(&sandbox.id, 0, false).await {
        checks.check(
            false,
            format!("Kill(sandbox, signal 0) ({ALIVE_CHECK}): {e}"),
        );
    }

    // A container that prints and exits 4.
    start_in_pod(&mut checks, &crio, &hello, &address, server);
    let c1 = ShimClient::connect(&address)
        .await
        .unwrap_or_else(|e| panic!("connect for hello: {e}"));
    let created = c1
        .create(&crio.create_request(&hello))
        .await
        .unwrap_or_else(|e| panic!("Create(hello) in the pod: {e}\nshim log:\n{}", log()));
    let hello_pid = created.pid;
    expect_state(&mut checks, &c1, &hello, Status::CREATED, hello_pid).await;
    c1.start(&hello.id)
        .await
        .unwrap_or_else(|e| panic!("Start(hello): {e}\nshim log:\n{}", log()));
    let waited = c1.wait(&hello.id, Duration::from_secs(60)).await;
    match &waited {
        Ok(w) => checks.check(
            w.exit_status == 4,
            format!("Wait(hello) exit_status {}, expected 4", w.exit_status),
        ),
        Err(e) => checks.check(false, format!("Wait(hello): {e}")),
    }
    let status = expect_state(&mut checks, &c1, &hello, Status::STOPPED, hello_pid).await;
    checks.check(
        status == Some(4),
        format!("State(hello) exit_status {status:?}, expected 4"),
    );
    checks.check(
        stream_contains(&hello, "hi"),
        format!(
            "hello's stdout got {:?}, expected \"hi\" (stderr {:?})",
            hello.stdout.contents(),
            hello.stderr.contents()
        ),
    );
    checks.check(
        !hello.oom_file().exists(),
        "hello exited normally but its bundle has an oom file",
    );
    match c1.delete(&hello.id).await {
        Ok(d) => checks.check(
            d.exit_status == 4,
            format!("Delete(hello) exit_status {}, expected 4", d.exit_status),
        ),
        Err(e) => checks.check(false, format!("Delete(hello): {e}")),
    }
    if let Err(e) = c1.shutdown(&hello.id).await {
        checks.check(
            false,
            format!("Shutdown(hello) with the sandbox alive: {e}"),
        );
    }
    checks.check(
        shim_servers(&address).len() == 1,
        "the shim exited on Shutdown while the sandbox still runs",
    );
    checks.check(
        c1.state(&hello.id).await.is_err(),
        "State(hello) still answers after Delete",
    );
    expect_state(&mut checks, &client, &sandbox, Status::RUNNING, pid).await;

    // A long-running container, SIGKILLed. State must answer while it is being created.
    start_in_pod(&mut checks, &crio, &sleeper, &address, server);
    let c2 = ShimClient::connect(&address)
        .await
        .unwrap_or_else(|e| panic!("connect for sleeper: {e}"));
    let create = {
        let c2 = c2.clone();
        let req = crio.create_request(&sleeper);
        tokio::spawn(async move { c2.create(&req).await })
    };
    match client.state(&sandbox.id).await {
        Ok((_, took)) => eprintln!("State(sandbox) during Create(sleeper): {took:?}"),
        Err(e) => checks.check(false, format!("State(sandbox) during Create(sleeper): {e}")),
    }
    let created = create
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("Create(sleeper) in the pod: {e}\nshim log:\n{}", log()));
    let sleeper_pid = created.pid;
    c2.start(&sleeper.id)
        .await
        .unwrap_or_else(|e| panic!("Start(sleeper): {e}\nshim log:\n{}", log()));
    expect_state(&mut checks, &c2, &sleeper, Status::RUNNING, sleeper_pid).await;
    if let Err(e) = c2.kill(&sleeper.id, 0, false).await {
        checks.check(
            false,
            format!("Kill(sleeper, signal 0) ({ALIVE_CHECK}): {e}"),
        );
    }
    let wait = {
        let c2 = c2.clone();
        let id = sleeper.id.clone();
        tokio::spawn(async move { c2.wait(&id, Duration::from_secs(60)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    c2.kill(&sleeper.id, 9, false)
        .await
        .unwrap_or_else(|e| panic!("Kill(sleeper, SIGKILL): {e}\nshim log:\n{}", log()));
    match wait.await.unwrap() {
        Ok(w) => checks.check(
            w.exit_status == 137,
            format!(
                "Wait(sleeper) after SIGKILL: {}, expected 137",
                w.exit_status
            ),
        ),
        Err(e) => checks.check(false, format!("Wait(sleeper): {e}")),
    }
    let status = expect_state(&mut checks, &c2, &sleeper, Status::STOPPED, sleeper_pid).await;
    checks.check(
        status == Some(137),
        format!("State(sleeper) exit_status {status:?}, expected 137"),
    );
    checks.check(
        !sleeper.oom_file().exists(),
        "sleeper was SIGKILLed, not OOM-killed, but its bundle has an oom file",
    );
    match c2.delete(&sleeper.id).await {
        Ok(d) => checks.check(
            d.exit_status == 137,
            format!(
                "Delete(sleeper) exit_status {}, expected 137",
                d.exit_status
            ),
        ),
        Err(e) => checks.check(false, format!("Delete(sleeper): {e}")),
    }
    if let Err(e) = c2.shutdown(&sleeper.id).await {
        checks.check(
            false,
            format!("Shutdown(sleeper) with the sandbox alive: {e}"),
        );
    }

    // StopPodSandbox + RemovePodSandbox: the infra container is killed, waited, deleted,
    // then Shutdown ends the shim.
    let wait = {
        let client = client.clone();
        let id = sandbox.id.clone();
        tokio::spawn(async move { client.wait(&id, Duration::from_secs(60)).await })
    };
    client
        .kill(&sandbox.id, 9, false)
        .await
        .unwrap_or_else(|e| panic!("Kill(sandbox, SIGKILL): {e}\nshim log:\n{}", log()));
    match wait.await.unwrap() {
        Ok(w) => checks.check(
            w.exit_status == 137,
            format!(
                "Wait(sandbox) after SIGKILL: {}, expected 137",
                w.exit_status
            ),
        ),
        Err(e) => checks.check(false, format!("Wait(sandbox): {e}")),
    }
    expect_state(&mut checks, &client, &sandbox, Status::STOPPED, pid).await;
    checks.check(
        !sandbox.oom_file().exists(),
        "the sandbox's bundle has an oom file",
    );
    match client.delete(&sandbox.id).await {
        Ok(d) => checks.check(
            d.exit_status == 137,
            format!(
                "Delete(sandbox) exit_status {}, expected 137",
                d.exit_status
            ),
        ),
        Err(e) => checks.check(false, format!("Delete(sandbox): {e}")),
    }
    match client.shutdown(&sandbox.id).await {
        Ok(_) => {}
        Err(e) if e.is_closed() => {}
        Err(e) => checks.check(false, format!("Shutdown(sandbox): {e}")),
    }
    let exited = wait_until(Duration::from_secs(30), || {
        shim_servers(&address).is_empty()
    });
    checks.check(
        exited,
        format!(
            "the shim still runs after the last Delete and Shutdown: {:?}",
            shim_servers(&address)
        ),
    );
    checks.check(
        wait_until(Duration::from_secs(5), || {
            !std::path::Path::new(socket_path(&address)).exists()
        }),
        format!("the shim's socket {address} is left"),
    );
    let left = leftovers(&[&sandbox.id, &hello.id, &sleeper.id]);
    checks.check(left.is_empty(), format!("left behind: {left:#?}"));
    checks.finish(&log());
}

/// A `container` bundle whose SandboxID names no running sandbox: Create must fail naming
/// the sandbox, no VM may start for it, and Delete + Shutdown (CRI-O's cleanup after a
/// failed create) leave nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_for_a_missing_sandbox_is_refused_and_leaves_nothing() {
    kata_tests::init_logging();
    let mut checks = Checks::default();
    let crio = Crio::new();
    let pod = crio.pod("ghost-pod"); // its sandbox is never started
    let orphan = blocking(|| crio.container_bundle(&pod, "orphan", &["true"]));
    let mut reaper = ShimReaper::default();

    let started = blocking(|| crio.start_shim(&orphan));
    if !started.success {
        // Refusing at `start` is as good, if it says why.
        checks.check(
            started.output.contains(&pod.sandbox_id),
            format!(
                "start failed without naming sandbox {}: {}",
                pod.sandbox_id, started.output
            ),
        );
    } else {
        let address = started.output.clone();
        reaper.watch(&address);
        let client = ShimClient::connect(&address)
            .await
            .unwrap_or_else(|e| panic!("connect {address}: {e}"));
        // Watch for a VM (QEMU names its run directory, /run/kata/<key>/vm) during Create.
        let ids = [pod.sandbox_id.clone(), orphan.id.clone()];
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for id in &ids {
                        seen.extend(
                            kata_tests::processes_naming(&format!("/run/kata/{id}"))
                                .into_iter()
                                .filter(|(_, c)| !c.contains("containerd-shim-kata-v2")),
                        );
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                seen
            })
        };
        let t = Instant::now();
        let created = client.create(&crio.create_request(&orphan)).await;
        let took = t.elapsed();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let vm = watcher.join().unwrap();
        match &created {
            Ok(r) => checks.check(
                false,
                format!(
                    "Create succeeded (pid {}) for a container of sandbox {}, which does not run",
                    r.pid, pod.sandbox_id
                ),
            ),
            Err(e) => {
                eprintln!("Create failed after {took:?}: {e}");
                checks.check(
                    e.to_string().contains(&pod.sandbox_id),
                    format!(
                        "Create's error does not name sandbox {}: {e}",
                        pod.sandbox_id
                    ),
                );
            }
        }
        checks.check(
            vm.is_empty(),
            format!("a VM was started for the missing sandbox: {:?}", vm.first()),
        );
        // CRI-O's cleanup of a failed create: Delete (errors ignored), then Shutdown.
        let _ = client.delete(&orphan.id).await;
        match client.shutdown(&orphan.id).await {
            Ok(_) => {}
            Err(e) if e.is_closed() => {}
            Err(e) => checks.check(false, format!("Shutdown: {e}")),
        }
        checks.check(
            wait_until(Duration::from_secs(30), || {
                shim_servers(&address).is_empty()
            }),
            format!(
                "the shim still runs after Shutdown: {:?}",
                shim_servers(&address)
            ),
        );
        checks.check(
            wait_until(Duration::from_secs(5), || {
                !std::path::Path::new(socket_path(&address)).exists()
            }),
            format!("the shim's socket {address} is left"),
        );
    }
    let left = leftovers(&[&pod.sandbox_id, &orphan.id]);
    checks.check(left.is_empty(), format!("left behind: {left:#?}"));
    checks.finish(&orphan.log.text());
}
