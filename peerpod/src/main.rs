//! `peerpod-adaptor [--config FILE]`: the peer pods adaptor. See the library.

use std::path::PathBuf;
use std::process::ExitCode;

use kata_peerpod::config::{AdaptorConfig, DEFAULT_CONFIG};
use kata_peerpod::report::chain;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let mut config = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" => match args.next() {
                Some(p) => config = Some(PathBuf::from(p)),
                None => return usage("--config needs a file"),
            },
            "--version" => {
                println!("peerpod-adaptor {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            other => return usage(&format!("unknown argument {other:?}")),
        }
    }
    let cfg = match config {
        Some(path) => AdaptorConfig::load(&path),
        None if std::path::Path::new(DEFAULT_CONFIG).exists() => {
            AdaptorConfig::load(std::path::Path::new(DEFAULT_CONFIG))
        }
        None => Ok(AdaptorConfig::defaults()),
    };
    let cfg = match cfg {
        Ok(c) => c,
        Err(e) => {
            eprintln!("peerpod-adaptor: {}", chain(&e));
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("peerpod-adaptor: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(kata_peerpod::server::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peerpod-adaptor: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("peerpod-adaptor: {msg} (usage: peerpod-adaptor [--config FILE] [--version])");
    ExitCode::from(2)
}
