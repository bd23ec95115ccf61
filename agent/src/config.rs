//! Command-line and environment settings.
//!
//! As PID 1 the agent uses the built-in defaults and ignores its arguments (the kernel
//! passes unrecognised boot parameters to init). Run by hand it takes
//! `--listen ADDR` (or `KATA_AGENT_LISTEN`) and `--base-dir DIR` (or
//! `KATA_AGENT_BASE_DIR`), so the service can be tried on a unix socket.

use std::path::PathBuf;

use crate::paths::DEFAULT_BASE_DIR;
use crate::server::default_listen_address;

/// Environment variable overriding the listen address when not PID 1.
pub const ENV_LISTEN: &str = "KATA_AGENT_LISTEN";
/// Environment variable overriding the base directory when not PID 1.
pub const ENV_BASE_DIR: &str = "KATA_AGENT_BASE_DIR";

/// Bad arguments.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A flag the agent does not know.
    #[error("unknown argument {0:?} (usage: kata-agent [--listen ADDR] [--base-dir DIR])")]
    Unknown(String),
    /// A flag without its value.
    #[error("{0} needs a value")]
    MissingValue(String),
}

/// The agent's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Whether the agent is PID 1 (and so does the init duties).
    pub pid1: bool,
    /// The ttrpc listen address.
    pub listen: String,
    /// Requests may only name paths below this directory.
    pub base_dir: PathBuf,
}

impl Config {
    /// Builds the settings; `args` excludes the program name, `env` looks up variables.
    pub fn new(
        pid1: bool,
        args: impl IntoIterator<Item = String>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut cfg = Config {
            pid1,
            listen: default_listen_address(),
            base_dir: PathBuf::from(DEFAULT_BASE_DIR),
        };
        if pid1 {
            return Ok(cfg);
        }
        if let Some(v) = env(ENV_LISTEN) {
            cfg.listen = v;
        }
        if let Some(v) = env(ENV_BASE_DIR) {
            cfg.base_dir = PathBuf::from(v);
        }
        let mut args = args.into_iter();
        while let Some(a) = args.next() {
            let mut value = || {
                args.next()
                    .ok_or_else(|| ConfigError::MissingValue(a.clone()))
            };
            match a.as_str() {
                "--listen" => cfg.listen = value()?,
                "--base-dir" => cfg.base_dir = PathBuf::from(value()?),
                _ => return Err(ConfigError::Unknown(a)),
            }
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn pid1_uses_defaults_and_ignores_arguments() {
        let c = Config::new(true, args(&["quiet", "--listen"]), |_| Some("x".into())).unwrap();
        assert_eq!(c.listen, "vsock://-1:1024");
        assert_eq!(c.base_dir, PathBuf::from("/run/kata-containers"));
    }

    #[test]
    fn by_hand_takes_flags_over_env() {
        let env = |k: &str| (k == ENV_LISTEN).then(|| "unix:///tmp/env.sock".to_string());
        let c = Config::new(false, args(&[]), env).unwrap();
        assert_eq!(c.listen, "unix:///tmp/env.sock");
        let c = Config::new(
            false,
            args(&["--listen", "unix:///a", "--base-dir", "/b"]),
            env,
        )
        .unwrap();
        assert_eq!(c.listen, "unix:///a");
        assert_eq!(c.base_dir, PathBuf::from("/b"));
        assert_eq!(
            Config::new(false, args(&["--listen"]), |_| None),
            Err(ConfigError::MissingValue("--listen".into()))
        );
        assert!(matches!(
            Config::new(false, args(&["-x"]), |_| None),
            Err(ConfigError::Unknown(_))
        ));
    }
}
