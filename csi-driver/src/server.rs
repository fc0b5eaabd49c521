//! gRPC wiring: the three services on a unix socket (owner-only) or a TCP address.
//!
//! `serve` takes an already-parsed endpoint and a shutdown future, so tests run the real server
//! in-process on a temporary socket.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;

use crate::controller::ControllerService;
use crate::csi::controller_server::ControllerServer;
use crate::csi::identity_server::IdentityServer;
use crate::csi::node_server::NodeServer;
use crate::driver::{Driver, Mode};
use crate::identity::IdentityService;
use crate::node::NodeService;

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
}

impl std::str::FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix://") {
            let p = PathBuf::from(p);
            if !p.is_absolute() {
                return Err(format!("{s}: expected unix:///absolute/path.sock"));
            }
            Ok(Endpoint::Unix(p))
        } else if let Some(a) = s.strip_prefix("tcp://") {
            a.parse()
                .map(Endpoint::Tcp)
                .map_err(|_| format!("{s}: expected tcp://HOST:PORT"))
        } else {
            Err(format!(
                "{s}: expected unix:///path/csi.sock or tcp://HOST:PORT"
            ))
        }
    }
}

/// Serve until `shutdown` resolves.
pub async fn serve(
    driver: Arc<Driver>,
    endpoint: Endpoint,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let mode = driver.config.mode;
    let identity = IdentityServer::new(IdentityService {
        driver: driver.clone(),
    });
    let controller = (mode != Mode::Node).then(|| {
        ControllerServer::new(ControllerService {
            driver: driver.clone(),
        })
    });
    let node = (mode != Mode::Controller).then(|| {
        NodeServer::new(NodeService {
            driver: driver.clone(),
        })
    });
    let router = Server::builder()
        .add_service(identity)
        .add_optional_service(controller)
        .add_optional_service(node);
    match endpoint {
        Endpoint::Unix(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
            let listener = UnixListener::bind(&path)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            log::info!("serving CSI on unix://{}", path.display());
            router
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
                .await?;
            let _ = std::fs::remove_file(&path);
        }
        Endpoint::Tcp(addr) => {
            log::info!("serving CSI on tcp://{addr}");
            router.serve_with_shutdown(addr, shutdown).await?;
        }
    }
    Ok(())
}
