//! The shim's logs, end to end: a real systemd-journald (the one `hack/test.sh` starts),
//! kata pods through containerd's CRI plugin, and the shim driven as CRI-O drives it with a
//! log fifo nobody reads.
//!
//! - `journalctl -t kata` shows the pod's lines with its sandbox id in Kata's logfmt, with
//!   every debug switch on also the guest console (`reading guest console`, the agent's
//!   own lines at their level) and debug lines; `journalctl -t virtiofsd` shows virtiofsd.
//! - Without `[runtime]` and `[hypervisor.qemu] enable_debug` neither debug lines nor the
//!   guest console's info lines appear.
//! - A log reader that stalls never blocks the Task service: the pod runs, a container runs
//!   and exits, everything is deleted, and the shim counts the lines it dropped.
//!
//! Each test ends with a leak check.

use std::time::{Duration, Instant};

use kata_tests::cri::{CriContainerd, OrPanic, KATA_HANDLER};
use kata_tests::crio::{leftovers, Crio, ShimClient, ShimReaper};
use kata_tests::{assert_no_runtime_leaks, journal};

fn unique(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

/// How many lines the shim of `sandbox` sent the journal (0 without a journal).
fn journal_lines(sandbox: &str) -> usize {
    journal::messages("kata", sandbox).len()
}

fn show(lines: &[String]) -> String {
    lines.join("\n")
}

/// The journal entries of one kata pod, every debug switch on.
#[test]
fn journal_shows_the_pod_its_guest_console_and_virtiofsd() {
    journal::require();
    let shim = kata_tests::containerd::ShimInstall::new();
    shim.set_config("runtime", "enable_debug = true");
    shim.set_config("hypervisor.qemu", "enable_debug = true");
    // [agent.kata] enable_debug = true is the test configuration's default.
    let env = CriContainerd::start(Some(shim));
    let pod = env
        .client
        .run_pod(&unique("journal-debug"), KATA_HANDLER)
        .or_panic(&env);
    let id = pod.id.as_str();
    let timeout = Duration::from_secs(30);

    // The pod's own lines: Kata's logfmt, the sandbox id in the line and as SANDBOX_ID.
    let (ready, lines) = journal::wait_for("kata", id, timeout, |m| {
        m.contains("msg=\"sandbox ready\"") && m.contains(&format!("sandbox={id}"))
    });
    assert!(ready, "no 'sandbox ready' line for {id}:\n{}", show(&lines));
    assert!(
        lines.iter().all(|m| m.starts_with("level=")),
        "every MESSAGE is logfmt:\n{}",
        show(&lines)
    );
    assert!(
        lines
            .iter()
            .any(|m| m.starts_with("level=debug") && m.contains("source=runtime")),
        "[runtime] enable_debug: debug lines expected:\n{}",
        show(&lines)
    );
    // The agent's lines arrive inside `reading guest console`, at their own level.
    let (agent, lines) = journal::wait_for("kata", id, timeout, |m| {
        m.contains("msg=\"reading guest console\"")
            && m.contains("source=agent")
            && m.contains(kata_proto::AGENT_READY_MARKER)
    });
    assert!(agent, "no agent console line:\n{}", show(&lines));
    assert!(
        lines
            .iter()
            .any(|m| m.contains("msg=\"reading guest console\"")
                && m.contains("source=agent")
                && m.starts_with("level=debug")),
        "[agent.kata] enable_debug: the agent's debug lines expected:\n{}",
        show(&lines)
    );
    // [hypervisor.qemu] enable_debug: the kernel's console too (`debug`, not `quiet`).
    assert!(
        lines
            .iter()
            .any(|m| m.contains("source=guest") && m.contains("Linux version")),
        "the guest kernel's boot lines expected:\n{}",
        show(&lines)
    );
    // The same values as journal fields.
    let entries = journal::entries("kata", id);
    let console = entries
        .iter()
        .find(|e| {
            e["VMCONSOLE"]
                .as_str()
                .is_some_and(|v| v.contains(kata_proto::AGENT_READY_MARKER))
        })
        .unwrap_or_else(|| panic!("no VMCONSOLE field: {entries:?}"));
    assert_eq!(console["SANDBOX_ID"], id);
    assert_eq!(console["SOURCE"], "agent");
    assert_eq!(console["PRIORITY"], "6", "the agent's INFO line: {console}");
    assert_eq!(console["SYSLOG_IDENTIFIER"], "kata");

    // virtiofsd's stderr, relayed under its own identifier.
    let (virtiofsd, lines) = journal::wait_for("virtiofsd", id, timeout, |m| {
        m.contains("virtiofsd") && m.contains("Client connected")
    });
    assert!(virtiofsd, "virtiofsd's lines:\n{}", show(&lines));

    env.client.stop_pod(id).or_panic(&env);
    env.client.remove_pod(id).or_panic(&env);
    let (gone, lines) = journal::wait_for("kata", id, timeout, |m| {
        m.contains("msg=\"tearing down sandbox\"")
    });
    assert!(gone, "teardown logged:\n{}", show(&lines));
    let pod_id = pod.id.clone();
    drop(env);
    assert_no_runtime_leaks(&[&pod_id]);
}

/// Default switches: info and above, and of the guest console only the agent's warnings.
/// Driven as CRI-O drives the shim (the test containerd runs at debug level, which it
/// passes on to its shims as `-debug`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_debug_switches_the_console_and_debug_lines_stay_out() {
    journal::require();
    let crio = Crio::new();
    crio.shim().set_config("agent.kata", "enable_debug = false");
    let pod = crio.pod("journal-quiet");
    let sandbox = tokio::task::block_in_place(|| crio.sandbox_bundle(&pod));
    let mut reaper = ShimReaper::default();
    let started = tokio::task::block_in_place(|| crio.start_shim(&sandbox));
    assert!(started.success, "start: {}", started.output);
    reaper.watch(&started.output);
    let client = ShimClient::connect(&started.output).await.expect("connect");
    client
        .create(&crio.create_request(&sandbox))
        .await
        .expect("Create(sandbox)");
    client.start(&sandbox.id).await.expect("Start(sandbox)");
    stop_sandbox(&client, &sandbox.id, &started.output).await;
    let id = &sandbox.id;
    let (ready, lines) = journal::wait_for("kata", id, Duration::from_secs(30), |m| {
        m.contains("msg=\"tearing down sandbox\"")
    });
    assert!(ready, "the pod's lines:\n{}", show(&lines));
    assert!(lines.iter().any(|m| m.contains("msg=\"sandbox ready\"")));
    let offending: Vec<&String> = lines
        .iter()
        .filter(|m| {
            m.starts_with("level=debug")
                || (m.contains("msg=\"reading guest console\"")
                    && !(m.starts_with("level=warning") || m.starts_with("level=error")))
        })
        .collect();
    assert!(
        offending.is_empty(),
        "debug or console lines without the switches:\n{offending:#?}"
    );
    let left = leftovers(&[id]);
    assert!(left.is_empty(), "left behind: {left:#?}");
}

/// Kill, Wait, Delete and Shutdown of a sandbox container (CRI-O's StopPodSandbox and
/// RemovePodSandbox); waits for the shim at `address` to exit.
async fn stop_sandbox(client: &ShimClient, id: &str, address: &str) {
    client.kill(id, 9, false).await.expect("Kill(sandbox)");
    client
        .wait(id, Duration::from_secs(60))
        .await
        .expect("Wait(sandbox)");
    client.delete(id).await.expect("Delete(sandbox)");
    match client.shutdown(id).await {
        Ok(_) => {}
        Err(e) if e.is_closed() => {}
        Err(e) => panic!("Shutdown(sandbox): {e}"),
    }
    let exited = kata_tests::wait_until(Duration::from_secs(30), || {
        kata_tests::crio::shim_servers(address).is_empty()
    });
    assert!(exited, "the shim did not exit");
}

/// The bundle's log fifo is held open but never read (a stalled containerd or CRI-O): the
/// pod still runs, a container runs and exits, every RPC answers, and the shim reports the
/// lines it dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_fifo_nobody_reads_never_blocks_the_task_service() {
    let crio = Crio::new();
    // Every debug switch on and the kernel's initcall trace: thousands of lines, beyond
    // the one-page pipe and the shim's queue.
    crio.shim().set_config("runtime", "enable_debug = true");
    crio.shim()
        .set_config("hypervisor.qemu", "enable_debug = true");
    crio.shim()
        .set_config("hypervisor.qemu", "kernel_params = \"initcall_debug\"");
    let pod = crio.pod("stalled-log");
    let sandbox = tokio::task::block_in_place(|| crio.sandbox_bundle(&pod));
    let job = tokio::task::block_in_place(|| {
        crio.container_bundle(&pod, "job", &["sh", "-c", "echo done; exit 7"])
    });
    sandbox.log.stall();
    let mut reaper = ShimReaper::default();

    let started = tokio::task::block_in_place(|| crio.start_shim(&sandbox));
    assert!(started.success, "start: {}", started.output);
    let address = started.output.clone();
    reaper.watch(&address);
    let client = ShimClient::connect(&address).await.expect("connect");
    let began = Instant::now();
    client
        .create(&crio.create_request(&sandbox))
        .await
        .expect("Create(sandbox) with a stalled log reader");
    client.start(&sandbox.id).await.expect("Start(sandbox)");
    let created = client
        .create(&crio.create_request(&job))
        .await
        .expect("Create(job)");
    assert!(created.pid > 0);
    client.start(&job.id).await.expect("Start(job)");
    let waited = client
        .wait(&job.id, Duration::from_secs(60))
        .await
        .expect("Wait(job)");
    assert_eq!(waited.exit_status, 7);
    eprintln!(
        "pod and job ran in {:?} with the log stalled",
        began.elapsed()
    );

    // The shim knows what it could not write.
    let socket = kata_tests::metrics::shim_socket(&sandbox.id);
    let metrics =
        tokio::task::block_in_place(|| kata_tests::metrics::shim_get(&socket, "/metrics"))
            .expect("GET /metrics");
    let dropped =
        kata_tests::metrics::sample(&metrics.text(), "kata_shim_log_dropped_lines_total ")
            .expect("kata_shim_log_dropped_lines_total");
    let journaled = journal_lines(&sandbox.id);
    eprintln!(
        "shim logged {journaled} lines (journal), {} bytes wait in the fifo, {dropped} dropped",
        sandbox.log.pending()
    );
    // The writer filled the pipe and stayed blocked on it through all of the above, while
    // its queue overflowed.
    assert!(sandbox.log.pending() > 0, "the shim wrote into the fifo");
    assert!(
        dropped > 0.0,
        "a stalled reader must cost dropped lines, got {dropped}"
    );

    client.delete(&job.id).await.expect("Delete(job)");
    client.shutdown(&job.id).await.expect("Shutdown(job)");
    // The shim exits although its log writer is stuck on the fifo.
    stop_sandbox(&client, &sandbox.id, &address).await;
    let left = leftovers(&[&sandbox.id, &job.id]);
    assert!(left.is_empty(), "left behind: {left:#?}");
}
