//! `csi-interposer`: the CSI driver binary.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use csi_driver::driver::{Config, Driver, Mode};
use csi_driver::server::{self, Endpoint};

#[derive(Parser, Debug)]
#[command(
    name = "csi-interposer",
    version,
    about = "CSI driver: volumes seen through a traced, fault-injecting, throttled FUSE interposer"
)]
struct Cli {
    /// Where to serve CSI: unix:///path/csi.sock or tcp://HOST:PORT.
    #[arg(long, default_value = "unix:///csi/csi.sock")]
    endpoint: Endpoint,
    /// This node's id (Kubernetes node name).
    #[arg(long, env = "NODE_ID")]
    node_id: String,
    /// The CSI driver name (CSIDriver object, StorageClass provisioner).
    #[arg(long, default_value = "interposer.csi.dev")]
    driver_name: String,
    /// Which services to serve.
    #[arg(long, value_enum, default_value_t = Mode::All)]
    mode: Mode,
    /// Where created, staged and published volumes are recorded.
    #[arg(long, default_value = "/var/lib/csi-interposer/state")]
    state_dir: PathBuf,
    /// Where `dir` volumes keep their data.
    #[arg(long, default_value = "/var/lib/csi-interposer/data")]
    data_dir: PathBuf,
    /// The interposer-fs binary (default: next to this one).
    #[arg(long)]
    interposer_fs: Option<PathBuf>,
    /// Volumes this node may hold.
    #[arg(long, default_value_t = 256)]
    max_volumes_per_node: i64,
    /// Size of a volume created without a capacity range, in bytes.
    #[arg(long, default_value_t = 1 << 30)]
    default_capacity: i64,
    /// Serve the node's Prometheus `/metrics` (all volumes on this node) on HOST:PORT.
    #[arg(long)]
    metrics_address: Option<std::net::SocketAddr>,
    /// `pvc` backend: namespace of the backing claims the controller creates (its own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    namespace: String,
    /// `pvc` backend: seconds CreateVolume waits for a backing claim to bind before answering
    /// Unavailable (keep it below external-provisioner's --timeout; the provisioner retries).
    #[arg(long, default_value_t = 8)]
    bind_timeout_seconds: u64,
    /// kubelet's plugins directory, where lower CSI drivers have `<driver>/csi.sock`.
    #[arg(long, default_value = "/var/lib/kubelet/plugins")]
    plugins_dir: PathBuf,
    /// Where lower volumes of stacked volumes are staged and published (lower drivers must
    /// see it: keep it under kubelet's directory).
    #[arg(
        long,
        default_value = "/var/lib/kubelet/plugins/kubernetes.io/csi/interposer.csi.dev-lower"
    )]
    lower_dir: PathBuf,
    /// Provision stacked (`backend: pvc`) volumes only: for a central controller Deployment,
    /// which holds no data of its own.
    #[arg(long)]
    stacked_only: bool,
    /// Turn on the kernel's FUSE over io_uring switch (fuse module parameter enable_uring) at
    /// start, so volume daemons started here serve over io_uring (Linux 6.14+): about twice the
    /// metadata rate, at two daemon threads per CPU per volume. If that fails, volumes use
    /// /dev/fuse and the reason is logged.
    #[arg(long)]
    enable_fuse_uring: bool,
    /// OTLP/gRPC collector for the volumes' spans (sets OTEL_EXPORTER_OTLP_ENDPOINT for daemons).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    if let Some(e) = &cli.otlp_endpoint {
        // Inherited by every daemon this process starts. Set before any other thread runs work.
        unsafe { std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", e) };
    }
    let interposer_bin = match cli.interposer_fs {
        Some(p) => p,
        None => std::env::current_exe()
            .context("locating this binary")?
            .with_file_name("interposer-fs"),
    };
    anyhow::ensure!(
        interposer_bin.is_file(),
        "interposer-fs binary {} not found (use --interposer-fs)",
        interposer_bin.display()
    );
    let driver = Driver::new(Config {
        driver_name: cli.driver_name,
        node_id: cli.node_id,
        mode: cli.mode,
        state_dir: cli.state_dir,
        data_dir: cli.data_dir,
        interposer_bin,
        max_volumes_per_node: cli.max_volumes_per_node,
        default_capacity: cli.default_capacity,
        namespace: cli.namespace,
        bind_timeout: std::time::Duration::from_secs(cli.bind_timeout_seconds),
        plugins_dir: cli.plugins_dir,
        lower_dir: cli.lower_dir,
        stacked_only: cli.stacked_only,
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    if cli.mode != Mode::Controller && cli.enable_fuse_uring {
        match interposer_fs::mount::enable_uring() {
            Ok(()) => log::info!("FUSE over io_uring on: volumes staged here use it"),
            Err(e) => log::warn!(
                "cannot turn on FUSE over io_uring ({}): {e}; volumes use /dev/fuse",
                interposer_fs::mount::URING_SWITCH
            ),
        }
    }
    if cli.mode != Mode::Controller {
        let d = driver.clone();
        let (adopted, repaired) = tokio::task::spawn_blocking(move || d.recover())
            .await?
            .map_err(|e| anyhow::anyhow!("recovering volumes: {e}"))?;
        log::info!("recovered volumes: {adopted} adopted, {repaired} repaired");
        tokio::spawn(csi_driver::tuning::run(driver.clone()));
    }
    if let Some(addr) = cli.metrics_address {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding --metrics-address {addr}"))?;
        let d = driver.clone();
        tokio::spawn(async move {
            if let Err(e) = csi_driver::metrics::serve(d, listener).await {
                log::error!("metrics server on {addr}: {e}");
            }
        });
    }
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        log::info!("shutting down (volumes stay mounted; their daemons keep running)");
    };
    server::serve(driver, cli.endpoint, shutdown).await
}
