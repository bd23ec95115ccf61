//! `kata-ctl`: operator tool. `boot-check` boots a sandbox VM with the installed guest
//! image, waits for the agent, prints what the guest reports, optionally shares a host
//! directory through virtio-fs and reads a file back, then stops the VM.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use kata_hypervisor::{Accel, SharedFsConfig, Vm, VmConfig, VsockMode};
use kata_shim::sandbox::agent::{shared_fs_storage, AgentClient, GUEST_SHARED_DIR};

#[derive(Parser, Debug)]
#[command(version, about = "Operator tool for the kata VM runtime")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a VM, wait for the agent, print the guest's view, stop.
    BootCheck(BootCheck),
}

#[derive(Parser, Debug)]
struct BootCheck {
    #[arg(long, default_value = "/usr/bin/qemu-system-x86_64")]
    qemu: PathBuf,
    #[arg(long, default_value = "/usr/share/kata-containers/vmlinuz.container")]
    kernel: PathBuf,
    #[arg(
        long,
        default_value = "/usr/share/kata-containers/kata-containers-initrd.img"
    )]
    initrd: PathBuf,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 2048)]
    memory: u32,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// auto | kvm | tcg
    #[arg(long, default_value = "auto")]
    accel: String,
    /// auto | vhost | hybrid
    #[arg(long, default_value = "auto")]
    vsock: String,
    #[arg(long, default_value = "/opt/kata-deps/bin/vhost-device-vsock")]
    vsock_daemon: PathBuf,
    /// Share this host directory into the guest and list it through the agent.
    #[arg(long)]
    shared_dir: Option<PathBuf>,
    #[arg(long, default_value = "/opt/kata-deps/bin/virtiofsd")]
    virtiofsd: PathBuf,
    /// Seconds to wait for the agent.
    #[arg(long, default_value_t = 60)]
    dial_timeout: u64,
    /// Print one machine-readable line of timings (milliseconds) instead of a report.
    #[arg(long)]
    timing: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cli.command {
        Command::BootCheck(args) => rt.block_on(boot_check(args)),
    }
}

fn parse_accel(s: &str) -> Result<Accel> {
    s.parse::<Accel>().map_err(|e| anyhow::anyhow!("{e}"))
}

fn parse_vsock(s: &str) -> Result<VsockMode> {
    s.parse::<VsockMode>().map_err(|e| anyhow::anyhow!("{e}"))
}

async fn boot_check(args: BootCheck) -> Result<()> {
    let run_dir = std::env::temp_dir().join(format!("kata-ctl-{}", std::process::id()));
    let config = VmConfig {
        id: format!("boot-check-{}", std::process::id()),
        qemu_path: args.qemu,
        kernel: args.kernel,
        initrd: args.initrd,
        kernel_params: Vec::new(),
        memory_mib: args.memory,
        memory_slots: 10,
        max_memory_mib: args.memory.saturating_mul(4),
        vcpus: args.vcpus,
        max_vcpus: args.vcpus.max(1),
        accel: parse_accel(&args.accel)?,
        vsock: parse_vsock(&args.vsock)?,
        vsock_daemon: args.vsock_daemon,
        shared_fs: args.shared_dir.as_ref().map(|dir| SharedFsConfig {
            daemon: args.virtiofsd.clone(),
            shared_dir: dir.clone(),
            cache: "auto".into(),
            extra_args: Vec::new(),
        }),
        net: Vec::new(),
        run_dir,
        start_timeout: Duration::from_secs(20),
        seccomp_sandbox: String::new(),
        placement: Default::default(),
    };

    if let Some(dir) = &args.shared_dir {
        std::fs::write(
            dir.join(".kata-ctl-probe"),
            format!("hello from the host, pid {}\n", std::process::id()),
        )
        .with_context(|| format!("writing a probe file into {}", dir.display()))?;
    }
    let t0 = Instant::now();
    let vm = Vm::start(config).await.context("starting the VM")?;
    let launched = t0.elapsed();
    let agent = AgentClient::connect(
        &vm,
        Duration::from_secs(args.dial_timeout),
        Duration::from_secs(10),
    )
    .await;
    let agent = match agent {
        Ok(a) => a,
        Err(e) => {
            let tail = vm.console_tail().join("\n");
            let _ = vm.stop(Duration::from_secs(5)).await;
            return Err(e).context(format!("waiting for the agent; guest console:\n{tail}"));
        }
    };
    let ready = t0.elapsed();

    let result = report(
        &vm,
        &agent,
        args.shared_dir.is_some(),
        args.timing,
        launched,
        ready,
    )
    .await;
    let t1 = Instant::now();
    let exit = vm
        .stop(Duration::from_secs(10))
        .await
        .context("stopping the VM")?;
    let stopped = t1.elapsed();
    if let Some(dir) = &args.shared_dir {
        let _ = std::fs::remove_file(dir.join(".kata-ctl-probe"));
    }
    result?;
    if args.timing {
        println!(
            "launch_ms={} agent_ready_ms={} stop_ms={}",
            launched.as_millis(),
            ready.as_millis(),
            stopped.as_millis()
        );
    } else {
        println!("VM stopped in {} ms ({exit:?})", stopped.as_millis());
    }
    Ok(())
}

async fn report(
    vm: &Vm,
    agent: &AgentClient,
    shared: bool,
    quiet: bool,
    launched: Duration,
    ready: Duration,
) -> Result<()> {
    let version = agent.version().await?;
    let details = agent.guest_details().await?;
    if shared {
        agent.add_storages(vec![shared_fs_storage()]).await?;
    }
    if quiet {
        return Ok(());
    }
    println!(
        "VM {} (QEMU pid {}, accel {:?})",
        vm.config().id,
        vm.pid(),
        vm.accel()
    );
    println!("  QEMU launched        {:>6} ms", launched.as_millis());
    println!("  agent answered Check {:>6} ms", ready.as_millis());
    println!(
        "  agent {} (protocol {})",
        version.agent_version, version.grpc_version
    );
    println!("  guest kernel {}", details.kernel_release);
    println!(
        "  guest memory {} MiB, {} online CPU(s), memory block {} MiB",
        details.mem_total_kib / 1024,
        details.online_cpus,
        details.mem_block_size_bytes >> 20
    );
    println!("  modules: {}", details.loaded_modules.join(" "));
    if shared {
        let probe = format!("{GUEST_SHARED_DIR}/.kata-ctl-probe");
        match agent.read_file(&probe, 4096).await {
            Ok(data) => println!(
                "  virtio-fs: read {} bytes of .kata-ctl-probe from the share: {:?}",
                data.len(),
                String::from_utf8_lossy(&data).trim()
            ),
            Err(e) => bail!("reading {probe} through the agent: {e:#}"),
        }
    }
    Ok(())
}
