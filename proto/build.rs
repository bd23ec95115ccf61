//! Generates the Rust message types and async ttrpc services from `protos/*.proto`.

fn main() {
    let protos = [
        "protos/health.proto",
        "protos/agent.proto",
        "protos/image.proto",
        "protos/hypervisor.proto",
        "protos/peerpod.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let out_dir = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    ttrpc_codegen::Codegen::new()
        .out_dir(&out_dir)
        .inputs(protos)
        .include("protos")
        .rust_protobuf()
        .customize(ttrpc_codegen::Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ttrpc_codegen::ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("ttrpc code generation failed");

    // The generated files start with inner attributes and docs (`#![..]`, `//!`), which `include!`
    // cannot take; drop them (lib.rs sets the lints for the generated modules instead).
    for name in [
        "health.rs",
        "health_ttrpc.rs",
        "agent.rs",
        "agent_ttrpc.rs",
        "image.rs",
        "image_ttrpc.rs",
        "hypervisor.rs",
        "hypervisor_ttrpc.rs",
        "peerpod.rs",
    ] {
        let path = std::path::Path::new(&out_dir).join(name);
        let text = std::fs::read_to_string(&path).expect("read generated file");
        let kept: String = text
            .lines()
            .filter(|l| !l.starts_with("#!") && !l.starts_with("//!"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&path, kept).expect("write generated file");
    }
}
