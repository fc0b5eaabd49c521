//! Where telemetry leaves the process: OTLP span export and the `/metrics` HTTP endpoint.
//! The layers produce telemetry; this module only ships it.

pub mod metrics_server;
pub mod otlp;
mod otlp_wire;
pub mod span;
