//! `containerd-shim-kata-v2`: the containerd shim v2 for VM sandboxes. All logic lives in
//! [`kata_shim::bootstrap`].

fn main() {
    std::process::exit(kata_shim::bootstrap::main());
}
