//! The peer pods admission webhook.
//!
//! A peer pod's containers run in a VM beside the node, so their CPU and memory must not
//! be counted on the node, while the VM must be sized for them. For every pod of the
//! target runtime class (`kata-remote`) that is created outside the skipped namespaces,
//! the webhook answers the API server's AdmissionReview with a JSON patch that moves the
//! pod's resources into the VM sizing annotations and asks for one
//! `kata.peerpods.io/vm`, the per-node pod VM count the scheduler checks.
//!
//! Modules, each depending only on those listed before it:
//! - [`quantity`]: Kubernetes quantities as exact numbers;
//! - [`sizing`]: a pod's effective CPU, memory and GPUs (Kubernetes' pod request rule);
//! - [`config`]: the target runtime class and the skipped namespaces;
//! - [`mutate`]: the mutation of one pod as a JSON patch;
//! - [`review`]: one AdmissionReview in, one out;
//! - [`tls`]: the serving certificate, reloaded when its files change;
//! - [`server`]: HTTPS serving and routes.

pub mod config;
pub mod mutate;
pub mod quantity;
pub mod review;
pub mod server;
pub mod sizing;
pub mod tls;

/// An error and its causes on one line (`a: b: c`), skipping a cause the message already
/// holds.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}
