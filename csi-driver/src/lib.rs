pub mod csi {
    tonic::include_proto!("csi.v1");
}
