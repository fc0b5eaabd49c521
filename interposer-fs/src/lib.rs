//! interposer-fs: a passthrough FUSE filesystem seen through layers (trace, metrics, fault,
//! throttle) chosen by the parameter contract.
//!
//! Start reading at `daemon::run`. The map:
//! - `params`: the parameter contract (shared with the CSI driver): parsing and validation.
//! - `config`: daemon-only options, and the `-o key=value` list as a whole.
//! - `fs`: the passthrough filesystem (inodes by file handle, caller credentials, `*at()` calls).
//! - `layers`: the layer trait, the stack, and the four layers.
//! - `adapter`: the only module that speaks fuser (requests in, replies out).
//! - `telemetry`: OTLP span export and the `/metrics` HTTP endpoint.
//! - `mount`: mount(2)/umount2(2) of a FUSE connection without fusermount.
//! - `glob`: path globs for `fault.paths`.
//!
//! Rule: this crate never depends on tonic services or kube; the CSI driver uses it only
//! through `params` (validation) and the `interposer-fs` binary's command line.

pub mod adapter;
pub mod config;
pub mod daemon;
pub mod fs;
pub mod glob;
pub mod layers;
pub mod mount;
pub mod params;
pub mod telemetry;
