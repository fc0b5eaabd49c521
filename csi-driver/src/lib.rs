//! csi-interposer: a CSI driver whose volumes are seen through interposer-fs.
//!
//! Start reading at `server::serve`. The map:
//! - `identity`, `controller`, `node`: one file per CSI service, each RPC validating first.
//! - `driver`: configuration, per-volume locks, the blocking-work helper shared by the services.
//! - `state`: persisted records (atomic JSON files), `ids`: safe volume ids.
//! - `context`: StorageClass parameters / volume context → settings → daemon options.
//! - `capability`: supported volume capabilities.
//! - `supervisor`: per-volume interposer-fs daemons; `mounts`: bind mounts and path checks.
//! - `client`: a channel to a CSI endpoint (for the ctl binary and tests).
//! - `error`: `DriverError` and its one conversion to gRPC codes.
//! - `metrics`: the node's one `/metrics`, merging every volume daemon's.
//! - `k8s`: every Kubernetes API call (with the RBAC rule each needs); `lower`: the volume
//!   under a stacked (`pvc`) volume, set up through its own CSI driver; `tuning`: claim
//!   annotations that retune running volumes.
//!
//! Rule: this crate uses interposer-fs only through `interposer_fs::params` (validation),
//! `interposer_fs::mount` (mount-point checks) and the `interposer-fs` binary's command line.

pub mod capability;
pub mod client;
pub mod context;
pub mod controller;
pub mod driver;
pub mod error;
pub mod identity;
pub mod ids;
pub mod k8s;
pub mod lower;
pub mod metrics;
pub mod mounts;
pub mod node;
pub mod server;
pub mod state;
pub mod supervisor;
pub mod tuning;

/// Generated from proto/csi.proto (CSI v1.13.0).
#[allow(clippy::all, missing_docs)]
pub mod csi {
    tonic::include_proto!("csi.v1");
}
