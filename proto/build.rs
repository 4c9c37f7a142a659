//! Generates the gantry.v1 code with protox, so a bare machine needs no system `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/gantry/v1/gantry.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
