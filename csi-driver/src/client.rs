//! A gRPC channel to a CSI endpoint (unix socket or TCP), for `csi-interposer-ctl` and tests.

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Uri};

use crate::server::Endpoint;

/// Connect to `endpoint`.
pub async fn connect(endpoint: &Endpoint) -> Result<Channel, tonic::transport::Error> {
    match endpoint {
        Endpoint::Tcp(addr) => {
            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                .connect()
                .await
        }
        Endpoint::Unix(path) => {
            let path = path.clone();
            // The URI is required by the API and unused: the connector dials the socket.
            tonic::transport::Endpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await
        }
    }
}
