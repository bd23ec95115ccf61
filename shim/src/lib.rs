//! containerd-shim-kata-v2 (task service comes with the shim issue).
