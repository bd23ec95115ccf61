//! `kata-monitor`: flags, logging to stderr, and [`kata_monitor::run`] until SIGTERM or
//! SIGINT.

use anyhow::Context;
use kata_monitor::flags::{Config, USAGE};

fn main() -> std::process::ExitCode {
    let config = match Config::parse(std::env::args().skip(1)) {
        Ok(c) if c.help => {
            print!("{USAGE}");
            return std::process::ExitCode::SUCCESS;
        }
        Ok(c) => c,
        Err(e) => {
            eprintln!("kata-monitor: {e}\n{USAGE}");
            return std::process::ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_max_level(config.log_level)
        .init();
    match run(config) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("kata-monitor: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        tokio::select! {
            result = kata_monitor::run(config) => result.context("kata-monitor failed"),
            _ = term.recv() => { tracing::info!("SIGTERM"); Ok(()) }
            _ = int.recv() => { tracing::info!("SIGINT"); Ok(()) }
        }
    })
}
