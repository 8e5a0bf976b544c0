//! Compiles proto/*.proto with protox (pure Rust: no protoc needed) and generates tonic client and server code.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/common.proto", "proto/server.proto", "proto/controller.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    // Payloads (up to 1 GiB) are decoded as slices of the received buffer, not copied out of it.
    tonic_prost_build::configure()
        .bytes(".SerializedObject.definition")
        // A secret's value must never reach a log through `{:?}`: its `Debug` is written by hand (lib.rs).
        .skip_debug([".controller.SetSecretRequest"])
        .compile_fds(descriptors)?;
    Ok(())
}
