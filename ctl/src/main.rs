//! `kata-ctl`: the operator's tool. Parses arguments, calls [`kata_ctl`], prints.
//!
//! - `check [--json] [--nfd [DIR]]`: can this node run VM sandboxes; exit 0 when capable,
//!   1 when not;
//! - `env [--json] [--config PATH]`: versions, paths, configuration in effect, host facts;
//! - `boot-check ...`: boot a VM with the installed guest image and ask its agent;
//! - `collect [--output FILE] [--config PATH]`: a must-gather archive of this node;
//! - `exec <sandbox-id>`: the guest's debug console.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kata_ctl::boot_check::BootRoot;
use kata_ctl::{boot_check, check, collect, env, exec, host::HostRoot, nfd, sandboxes};
use kata_hypervisor::{Accel, VsockMode};

#[derive(Parser, Debug)]
#[command(version, about = "Operator tool for the kata VM runtime")]
struct Cli {
    /// Test only: read /proc/cpuinfo and /sys/module under DIR instead of / (/dev/kvm
    /// stays the real one).
    #[arg(long, global = true, hide = true, value_name = "DIR")]
    host_root: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check whether this node can run kata VM sandboxes (exit 0: capable, 1: not).
    Check {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Write the Node Feature Discovery file DIR/kata (runtime.kata=true) when capable,
        /// remove it when not.
        #[arg(long, value_name = "DIR", num_args = 0..=1,
              default_missing_value = nfd::DEFAULT_FEATURES_DIR)]
        nfd: Option<PathBuf>,
    },
    /// Print versions, paths, the configuration in effect and host facts.
    Env {
        /// Print JSON instead of TOML.
        #[arg(long)]
        json: bool,
        /// The configuration file (default: KATA_CONF_FILE, else
        /// /etc/kata-containers/configuration.toml).
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
    /// Boot a VM, wait for the agent, print the guest's view, stop.
    BootCheck(BootCheck),
    /// Write a tar.gz of versions, configuration, host checks and, per running sandbox,
    /// its journal, guest console, metrics, QEMU command line, agent URL and processes
    /// (annotation and environment values outside an allow-list redacted).
    Collect {
        /// The archive to write (default: kata-collect-<UTC time>.tar.gz here); never
        /// overwritten.
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
        /// The configuration file (default: KATA_CONF_FILE, else
        /// /etc/kata-containers/configuration.toml).
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
    /// Open a root shell in the guest of a sandbox, outside its containers (needs
    /// [agent.kata] debug_console_enabled = true when the sandbox started).
    Exec {
        /// The sandbox (pod) id.
        sandbox_id: String,
    },
}

#[derive(Parser, Debug)]
struct BootCheck {
    #[arg(long, default_value = "/usr/bin/qemu-system-x86_64")]
    qemu: PathBuf,
    /// The firmware (`-bios`); "" for QEMU's default.
    #[arg(long, default_value = kata_shim::config::DEFAULT_FIRMWARE)]
    firmware: PathBuf,
    #[arg(long, default_value = "/usr/share/kata-containers/vmlinux.container")]
    kernel: PathBuf,
    /// The root filesystem image (virtio-pmem); not with --initrd.
    #[arg(long, default_value = kata_shim::config::DEFAULT_IMAGE, conflicts_with = "initrd")]
    image: PathBuf,
    /// Boot with this initrd instead of the image (Debian's kernel needs one).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 2048)]
    memory: u32,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// auto | kvm | tcg
    #[arg(long, default_value = "auto")]
    accel: Accel,
    /// auto | vhost | hybrid
    #[arg(long, default_value = "auto")]
    vsock: VsockMode,
    #[arg(long, default_value = "/opt/kata-deps/bin/vhost-device-vsock")]
    vsock_daemon: PathBuf,
    /// Share this host directory into the guest and read a file back through the agent.
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    // boot-check shows the accelerator warning; check and env report it themselves.
    let default_level = match cli.command {
        Command::BootCheck(_) => "warn",
        _ => "error",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kata-ctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let host = cli.host_root.map(HostRoot::at).unwrap_or_default();
    match cli.command {
        Command::Check { json, nfd } => {
            let report = check::run(&host, nfd.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(if report.capable {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Env { json, config } => {
            let report = env::EnvReport::gather(config.as_deref(), &host);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Exec { sandbox_id } => Ok(run_exec(&sandbox_id)),
        Command::Collect { output, config } => {
            let opts = collect::Options {
                output,
                config,
                roots: sandboxes::default_roots(),
                host,
            };
            let summary = runtime()?.block_on(collect::run(opts))?;
            println!(
                "wrote {} ({} running sandbox(es), {} item(s) not gathered: see errors.txt)",
                summary.path.display(),
                summary.sandboxes,
                summary.errors
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::BootCheck(args) => {
            let timing = args.timing;
            let opts = boot_check::Options {
                qemu: args.qemu,
                firmware: Some(args.firmware).filter(|f| !f.as_os_str().is_empty()),
                kernel: args.kernel,
                root: match args.initrd {
                    Some(initrd) => BootRoot::Initrd(initrd),
                    None => BootRoot::Image(args.image),
                },
                memory_mib: args.memory,
                vcpus: args.vcpus,
                accel: args.accel,
                vsock: args.vsock,
                vsock_daemon: args.vsock_daemon,
                shared_dir: args.shared_dir,
                virtiofsd: args.virtiofsd,
                dial_timeout: Duration::from_secs(args.dial_timeout),
            };
            let report = runtime()?.block_on(boot_check::run(opts))?;
            if timing {
                println!("{}", report.timing_line());
            } else {
                print!("{}", report.render());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// `kata-ctl exec`: its own exit path, since stdin is read on a thread that only the end
/// of the process stops.
fn run_exec(sandbox_id: &str) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kata-ctl: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(exec::run(&sandboxes::default_roots(), sandbox_id));
    rt.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kata-ctl: {}", kata_shim::report::chain(&e));
            ExitCode::FAILURE
        }
    }
}
