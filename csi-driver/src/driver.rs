//! The driver shared by the three CSI services: configuration, state, per-volume locks and the
//! daemon supervisor.
//!
//! Every RPC has the same shape: validate the request into typed values, take the volume's
//! lock, then do the work on a blocking thread (mounts and daemon start-up block), persisting
//! state before answering.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::error::{DriverError, DriverResult};
use crate::ids::VolumeId;
use crate::k8s::Kube;
use crate::state::StateDir;
use crate::supervisor::Supervisor;

/// Topology key whose value is the node that holds a volume's data.
pub const TOPOLOGY_KEY: &str = "interposer.csi.dev/node";
/// Volume-context keys the driver adds (never parameters).
pub const CONTEXT_PREFIX: &str = "interposer.csi.dev/";

/// Which services this process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Controller,
    Node,
    All,
}

/// Driver settings (from the command line). Units are bytes.
#[derive(Debug, Clone)]
pub struct Config {
    /// CSI driver name, as in the CSIDriver object and StorageClass `provisioner`.
    pub driver_name: String,
    pub node_id: String,
    pub mode: Mode,
    /// Records of created, staged and published volumes.
    pub state_dir: PathBuf,
    /// Backing directories of `dir` volumes (one per volume id).
    pub data_dir: PathBuf,
    /// The interposer-fs binary started per volume.
    pub interposer_bin: PathBuf,
    /// Volumes this node may hold (NodeGetInfo's max_volumes_per_node).
    pub max_volumes_per_node: i64,
    /// Size of a volume created without a capacity range.
    pub default_capacity: i64,
    /// `pvc` backend: the namespace of the backing claims the controller creates.
    pub namespace: String,
    /// `pvc` backend: how long CreateVolume waits for a backing claim to bind before
    /// answering Unavailable (the provisioner retries).
    pub bind_timeout: Duration,
    /// kubelet's plugins directory: lower drivers' sockets are `<dir>/<driver>/csi.sock`.
    pub plugins_dir: PathBuf,
    /// Where lower volumes are staged and published for us; lower drivers must see it (it
    /// should be under kubelet's directory, which they mount).
    pub lower_dir: PathBuf,
    /// A central controller (Deployment) that holds no data: it refuses `dir` volumes.
    pub stacked_only: bool,
}

/// Per-volume locks: RPCs on one volume run one at a time, on different volumes in parallel.
#[derive(Default)]
pub struct VolumeLocks {
    /// Guards only the map; each volume's lock is held across its RPC's awaits.
    map: Mutex<HashMap<VolumeId, Arc<tokio::sync::Mutex<()>>>>,
}

impl VolumeLocks {
    pub async fn lock(&self, id: &VolumeId) -> tokio::sync::OwnedMutexGuard<()> {
        let m = self.map.lock().entry(id.clone()).or_default().clone();
        m.lock_owned().await
    }
}

pub struct Driver {
    pub config: Config,
    pub state: StateDir,
    pub supervisor: Supervisor,
    pub locks: VolumeLocks,
    /// The runtime serving the RPCs; blocking work reaches async clients through it.
    rt: tokio::runtime::Handle,
    /// The Kubernetes API, connected on first use (only `pvc` volumes and tuning need it).
    kube: tokio::sync::OnceCell<Kube>,
}

impl Driver {
    /// Call from within the Tokio runtime that will serve the driver.
    pub fn new(config: Config) -> DriverResult<Arc<Driver>> {
        let state = StateDir::open(&config.state_dir)?;
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            DriverError::internal(format!("creating {}", config.data_dir.display()), e)
        })?;
        let supervisor = Supervisor::new(config.interposer_bin.clone());
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|e| DriverError::internal("the driver needs a Tokio runtime", e))?;
        Ok(Arc::new(Driver {
            config,
            state,
            supervisor,
            locks: VolumeLocks::default(),
            rt,
            kube: tokio::sync::OnceCell::new(),
        }))
    }

    /// Run a future from blocking work (the RPC workers of [`Driver::locked`]).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// The Kubernetes API client, connected on first use.
    pub async fn kube(&self) -> DriverResult<&Kube> {
        Ok(self
            .kube
            .get_or_try_init(|| Kube::connect(&self.config.node_id))
            .await?)
    }

    /// Backing directory of a `dir` volume.
    pub fn backing_dir(&self, id: &VolumeId) -> PathBuf {
        self.config.data_dir.join(id.as_str())
    }

    /// Backing directory of an ephemeral inline volume.
    pub fn ephemeral_dir(&self, id: &VolumeId) -> PathBuf {
        self.config.data_dir.join("ephemeral").join(id.as_str())
    }

    /// Run blocking work for an RPC on the blocking pool, holding the volume's lock.
    pub async fn locked<T, F>(self: &Arc<Self>, id: &VolumeId, f: F) -> Result<T, tonic::Status>
    where
        T: Send + 'static,
        F: FnOnce(&Driver) -> DriverResult<T> + Send + 'static,
    {
        let _guard = self.locks.lock(id).await;
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .map_err(|e| tonic::Status::internal(format!("worker failed: {e}")))?
            .map_err(tonic::Status::from)
    }
}

/// Log an RPC's outcome in one line (secrets never reach here: requests are not logged whole).
pub fn log_rpc<T>(method: &str, subject: &str, r: &Result<T, tonic::Status>) {
    match r {
        Ok(_) => log::info!("{method} {subject}: ok"),
        Err(s) => log::warn!("{method} {subject}: {:?}: {}", s.code(), s.message()),
    }
}
