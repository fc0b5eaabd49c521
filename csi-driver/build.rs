//! Compile proto/csi.proto into Rust at build time, without a system protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = "../proto";
    println!("cargo:rerun-if-changed={proto_dir}/csi.proto");
    let fds = protox::compile([format!("{proto_dir}/csi.proto")], [proto_dir])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
