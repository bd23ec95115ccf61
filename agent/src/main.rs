//! `kata-agent`: `/init` of the guest, or the agent service on a chosen address when run
//! by hand. See the library for everything.

use std::process::ExitCode;

use kata_agent::config::Config;
use kata_agent::logging::chain;

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some(kata_agent::container::child::HELPER_ARG) {
        kata_agent::container::child::helper_main();
    }
    let pid1 = std::process::id() == 1;
    let cfg = match Config::new(pid1, std::env::args().skip(1), |k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kata-agent: {e}");
            return ExitCode::from(2);
        }
    };
    match kata_agent::init::run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kata-agent: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}
