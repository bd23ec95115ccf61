//! `kata-peerpods-webhook`: the peer pods admission webhook. Reads its settings from
//! flags or the environment, loads the serving certificate, serves HTTPS until SIGTERM or
//! SIGINT.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use kata_peerpods_webhook::config::{Config, DEFAULT_RUNTIME_CLASS, DEFAULT_SKIP_NAMESPACES};
use kata_peerpods_webhook::server::Server;
use kata_peerpods_webhook::tls::{self, CertStore};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Admission webhook for peer pods: moves pod resources into VM sizing annotations and requests one kata.peerpods.io/vm"
)]
struct Cli {
    /// The runtime class whose pods are mutated.
    #[arg(long, env = "TARGET_RUNTIMECLASS", default_value = DEFAULT_RUNTIME_CLASS)]
    runtime_class: String,
    /// Namespaces whose pods are left alone, comma-separated.
    #[arg(long, env = "SKIP_NAMESPACES", default_value = DEFAULT_SKIP_NAMESPACES)]
    skip_namespaces: String,
    /// The webhook's own namespace (from the downward API), always skipped.
    #[arg(long, env = "POD_NAMESPACE")]
    own_namespace: Option<String>,
    /// Address and port to serve HTTPS on.
    #[arg(long, env = "WEBHOOK_LISTEN", default_value = "0.0.0.0:9443")]
    listen: SocketAddr,
    /// The serving certificate chain (PEM).
    #[arg(
        long,
        env = "WEBHOOK_TLS_CERT",
        default_value = "/etc/kata-peerpods-webhook/tls/tls.crt"
    )]
    tls_cert: PathBuf,
    /// The serving certificate's private key (PEM).
    #[arg(
        long,
        env = "WEBHOOK_TLS_KEY",
        default_value = "/etc/kata-peerpods-webhook/tls/tls.key"
    )]
    tls_key: PathBuf,
    /// How often to look for a renewed certificate, in seconds.
    #[arg(long, env = "WEBHOOK_TLS_RELOAD_SECONDS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    tls_reload_seconds: u64,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // The whole chain on one line.
            eprintln!("kata-peerpods-webhook: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();

    let config = Config::new(
        &cli.runtime_class,
        &cli.skip_namespaces,
        cli.own_namespace.as_deref(),
    )
    .context("invalid configuration")?;
    let certs =
        CertStore::load(&cli.tls_cert, &cli.tls_key).context("loading the serving certificate")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    tracing::info!(
        runtime_class = config.target_runtime_class(),
        skipped_namespaces = config.skipped_namespaces().collect::<Vec<_>>().join(","),
        "configuration"
    );
    let server = Server::bind(cli.listen, &certs, config).await?;
    tracing::info!("listening on {}", server.local_addr());
    let watcher = tokio::spawn(tls::watch(
        certs,
        Duration::from_secs(cli.tls_reload_seconds),
    ));
    server
        .run(async {
            tokio::select! {
                _ = sigterm.recv() => tracing::info!("SIGTERM"),
                _ = sigint.recv() => tracing::info!("SIGINT"),
            }
        })
        .await;
    watcher.abort();
    Ok(())
}
