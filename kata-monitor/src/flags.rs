//! kata-monitor's command line, with Kata's flags in Go's style (`-name value`,
//! `-name=value`, or with two dashes): `-listen-address`, `-runtime-endpoint`,
//! `-log-level`. Every value is checked here.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Default listen address (Kata's): loopback only. Clusters use `:8090`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8090";
/// Default CRI endpoint (Kata's): containerd's socket.
pub const DEFAULT_RUNTIME_ENDPOINT: &str = "/run/containerd/containerd.sock";

/// A bad command line; each names the flag and value at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FlagError {
    #[error("unknown flag {0:?} (expected -listen-address, -runtime-endpoint, -log-level)")]
    Unknown(String),
    #[error("flag {0} needs a value")]
    MissingValue(String),
    #[error("-listen-address {value:?}: expected host:port or :port")]
    ListenAddress { value: String },
    #[error("-log-level {value:?}: expected trace, debug, info, warn or error")]
    LogLevel { value: String },
    #[error("-runtime-endpoint {value:?}: expected a unix socket path (optionally unix://)")]
    RuntimeEndpoint { value: String },
    #[error("unexpected argument {0:?}")]
    Positional(String),
}

/// What to run with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub listen: SocketAddr,
    pub runtime_endpoint: PathBuf,
    pub log_level: tracing::Level,
    /// `-h` / `-help`: print the usage and exit.
    pub help: bool,
}

/// The usage text.
pub const USAGE: &str = "\
Usage: kata-monitor [flags]
  -listen-address ADDR     where to serve /metrics, /sandboxes, /agent-url (default 127.0.0.1:8090; \":8090\" = every address)
  -runtime-endpoint PATH   the CRI runtime's socket, for pod names (default /run/containerd/containerd.sock)
  -log-level LEVEL         trace, debug, info, warn or error (default info)
";

fn parse_listen(value: &str) -> Result<SocketAddr, FlagError> {
    let full = if value.starts_with(':') {
        format!("0.0.0.0{value}")
    } else {
        value.to_owned()
    };
    full.parse().map_err(|_| FlagError::ListenAddress {
        value: value.to_owned(),
    })
}

fn parse_level(value: &str) -> Result<tracing::Level, FlagError> {
    Ok(match value.to_ascii_lowercase().as_str() {
        "trace" => tracing::Level::TRACE,
        "debug" => tracing::Level::DEBUG,
        "info" => tracing::Level::INFO,
        "warn" | "warning" => tracing::Level::WARN,
        "error" | "fatal" | "panic" => tracing::Level::ERROR,
        _ => {
            return Err(FlagError::LogLevel {
                value: value.to_owned(),
            })
        }
    })
}

fn parse_endpoint(value: &str) -> Result<PathBuf, FlagError> {
    let path = value.strip_prefix("unix://").unwrap_or(value);
    if !path.starts_with('/') {
        return Err(FlagError::RuntimeEndpoint {
            value: value.to_owned(),
        });
    }
    Ok(PathBuf::from(path))
}

impl Config {
    /// Parses the arguments after the program name.
    pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Self, FlagError> {
        let mut config = Config {
            listen: parse_listen(DEFAULT_LISTEN)?,
            runtime_endpoint: PathBuf::from(DEFAULT_RUNTIME_ENDPOINT),
            log_level: tracing::Level::INFO,
            help: false,
        };
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let Some(flag) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
                return Err(FlagError::Positional(arg));
            };
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n, Some(v.to_owned())),
                None => (flag, None),
            };
            if matches!(name, "h" | "help") {
                config.help = true;
                continue;
            }
            if !matches!(name, "listen-address" | "runtime-endpoint" | "log-level") {
                return Err(FlagError::Unknown(arg.clone()));
            }
            let value = match inline {
                Some(v) => v,
                None => args
                    .next()
                    .ok_or_else(|| FlagError::MissingValue(format!("-{name}")))?,
            };
            match name {
                "listen-address" => config.listen = parse_listen(&value)?,
                "runtime-endpoint" => config.runtime_endpoint = parse_endpoint(&value)?,
                _ => config.log_level = parse_level(&value)?,
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, FlagError> {
        Config::parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn defaults_are_katas() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8090");
        assert_eq!(
            c.runtime_endpoint,
            PathBuf::from("/run/containerd/containerd.sock")
        );
        assert_eq!(c.log_level, tracing::Level::INFO);
    }

    #[test]
    fn go_style_flags() {
        let c = parse(&[
            "-listen-address",
            ":8090",
            "--runtime-endpoint=unix:///run/crio/crio.sock",
            "-log-level=debug",
        ])
        .unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:8090");
        assert_eq!(c.runtime_endpoint, PathBuf::from("/run/crio/crio.sock"));
        assert_eq!(c.log_level, tracing::Level::DEBUG);
        assert!(parse(&["-help"]).unwrap().help);
    }

    #[test]
    fn bad_values_are_named() {
        assert_eq!(
            parse(&["-listen-address", "localhost"]).unwrap_err(),
            FlagError::ListenAddress {
                value: "localhost".into()
            }
        );
        assert!(parse(&["-log-level", "loud"])
            .unwrap_err()
            .to_string()
            .contains("\"loud\""));
        assert!(parse(&["-runtime-endpoint", "tcp://x"]).is_err());
        assert_eq!(
            parse(&["-port", "1"]).unwrap_err(),
            FlagError::Unknown("-port".into())
        );
        assert_eq!(
            parse(&["-log-level"]).unwrap_err(),
            FlagError::MissingValue("-log-level".into())
        );
        assert_eq!(
            parse(&["extra"]).unwrap_err(),
            FlagError::Positional("extra".into())
        );
    }
}
