//! `csi-interposer-ctl`: drive a CSI endpoint by hand, as external-provisioner and kubelet would.
//!
//! `up` provisions a volume and mounts it (CreateVolume, NodeStageVolume, NodePublishVolume);
//! `down` undoes that; `create`/`delete` and `mount`/`unmount` are the halves, for volumes that
//! external-provisioner made; `stats` asks NodeGetVolumeStats and NodeGetVolumeHealth. Useful for
//! demos and for poking a node plugin without a cluster.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use csi_driver::csi::controller_client::ControllerClient;
use csi_driver::csi::node_client::NodeClient;
use csi_driver::csi::volume_capability::access_mode::Mode;
use csi_driver::csi::volume_capability::{AccessMode, AccessType, MountVolume};
use csi_driver::csi::*;
use csi_driver::server::Endpoint;

#[derive(Parser)]
#[command(
    name = "csi-interposer-ctl",
    version,
    about = "Provision and mount csi-interposer volumes by hand"
)]
struct Cli {
    /// The driver's CSI endpoint.
    #[arg(long, default_value = "unix:///csi/csi.sock")]
    endpoint: Endpoint,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// CreateVolume + NodeStageVolume + NodePublishVolume; prints the volume id.
    Up {
        #[command(flatten)]
        create: CreateArgs,
        #[command(flatten)]
        paths: Paths,
        /// The pod the volume is published for, as kubelet's podInfoOnMount says it.
        #[arg(long, value_name = "NAMESPACE/NAME")]
        pod: Option<String>,
    },
    /// NodeUnpublishVolume + NodeUnstageVolume + DeleteVolume.
    Down {
        volume_id: String,
        #[command(flatten)]
        paths: Paths,
    },
    /// CreateVolume only; prints the volume id, then its context as KEY=VALUE lines.
    Create {
        #[command(flatten)]
        create: CreateArgs,
    },
    /// DeleteVolume only.
    Delete { volume_id: String },
    /// NodeStageVolume + NodePublishVolume of an existing volume (a PV's volumeHandle and
    /// volumeAttributes), as kubelet does for a pod.
    Mount {
        volume_id: String,
        #[command(flatten)]
        paths: Paths,
        /// A volume context entry, key=value (repeat).
        #[arg(short = 'c', long = "context", value_name = "KEY=VALUE")]
        context: Vec<String>,
        #[arg(long, value_name = "NAMESPACE/NAME")]
        pod: Option<String>,
    },
    /// NodeUnpublishVolume + NodeUnstageVolume.
    Unmount {
        volume_id: String,
        #[command(flatten)]
        paths: Paths,
        /// NodeUnpublishVolume only: the volume stays staged (as when a pod goes and another
        /// on the node still uses it).
        #[arg(long)]
        keep_staged: bool,
    },
    /// NodeGetVolumeStats and NodeGetVolumeHealth for a mounted volume.
    Stats { volume_id: String, path: PathBuf },
}

#[derive(clap::Args)]
struct CreateArgs {
    /// Volume name (as external-provisioner would send: pvc-<uid>).
    name: String,
    /// Size in bytes.
    #[arg(long, default_value_t = 1 << 30)]
    capacity: i64,
    /// A StorageClass parameter, key=value (repeat).
    #[arg(short = 'p', long = "param", value_name = "KEY=VALUE")]
    params: Vec<String>,
}

#[derive(clap::Args)]
struct Paths {
    /// Where to stage.
    #[arg(long)]
    staging: PathBuf,
    /// Where to publish (the pod's mount).
    #[arg(long)]
    target: PathBuf,
}

fn key_values(pairs: &[String], flag: &str) -> anyhow::Result<HashMap<String, String>> {
    pairs
        .iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) => Ok((k.to_string(), v.to_string())),
            None => bail!("{flag} {p:?}: expected KEY=VALUE"),
        })
        .collect()
}

fn cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // A CSI error shows its code by name (scripts match on it), then the message.
            match e.downcast_ref::<tonic::Status>() {
                Some(s) => eprintln!("Error: {:?}: {}", s.code(), s.message()),
                None => eprintln!("Error: {e:#}"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let ch = csi_driver::client::connect(&cli.endpoint)
        .await
        .with_context(|| format!("connecting to {:?}", cli.endpoint))?;
    let mut ctl = ControllerClient::new(ch.clone());
    let mut node = NodeClient::new(ch);
    match cli.command {
        Cmd::Up { create, paths, pod } => {
            let v = create_volume(&mut ctl, create).await?;
            mount(&mut node, &v.volume_id, &paths, v.volume_context, pod).await?;
            println!("{}", v.volume_id);
        }
        Cmd::Down { volume_id, paths } => {
            unmount(&mut node, &volume_id, &paths, false).await?;
            delete_volume(&mut ctl, volume_id).await?;
        }
        Cmd::Create { create } => {
            let v = create_volume(&mut ctl, create).await?;
            println!("{}", v.volume_id);
            let mut ctx: Vec<_> = v.volume_context.into_iter().collect();
            ctx.sort();
            for (k, v) in ctx {
                println!("{k}={v}");
            }
        }
        Cmd::Delete { volume_id } => delete_volume(&mut ctl, volume_id).await?,
        Cmd::Mount {
            volume_id,
            paths,
            context,
            pod,
        } => {
            let context = key_values(&context, "--context")?;
            mount(&mut node, &volume_id, &paths, context, pod).await?;
        }
        Cmd::Unmount {
            volume_id,
            paths,
            keep_staged,
        } => unmount(&mut node, &volume_id, &paths, keep_staged).await?,
        Cmd::Stats { volume_id, path } => {
            let s = node
                .node_get_volume_stats(NodeGetVolumeStatsRequest {
                    volume_id: volume_id.clone(),
                    volume_path: path.to_string_lossy().into(),
                    staging_target_path: String::new(),
                })
                .await;
            match s {
                Ok(s) => {
                    for u in s.into_inner().usage {
                        let unit = if u.unit == volume_usage::Unit::Inodes as i32 {
                            "inodes"
                        } else {
                            "bytes"
                        };
                        println!(
                            "{unit}: total {} used {} available {}",
                            u.total, u.used, u.available
                        );
                    }
                }
                Err(e) => println!("stats: {}", e.message()),
            }
            let h = node
                .node_get_volume_health(NodeGetVolumeHealthRequest {
                    volume_id,
                    volume_publish_path: path.to_string_lossy().into(),
                    staging_target_path: String::new(),
                })
                .await?
                .into_inner();
            match h
                .volume_health
                .map(|h| h.health_statuses)
                .unwrap_or_default()
                .first()
            {
                None => println!("health: ok"),
                Some(e) => println!("health: {} ({})", e.reason, e.message),
            }
        }
    }
    Ok(())
}

type Ctl = ControllerClient<tonic::transport::Channel>;
type Node = NodeClient<tonic::transport::Channel>;

async fn create_volume(ctl: &mut Ctl, a: CreateArgs) -> anyhow::Result<Volume> {
    ctl.create_volume(CreateVolumeRequest {
        name: a.name,
        capacity_range: Some(CapacityRange {
            required_bytes: a.capacity,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap()],
        parameters: key_values(&a.params, "--param")?,
        ..Default::default()
    })
    .await?
    .into_inner()
    .volume
    .context("CreateVolume returned no volume")
}

async fn delete_volume(ctl: &mut Ctl, volume_id: String) -> anyhow::Result<()> {
    ctl.delete_volume(DeleteVolumeRequest {
        volume_id,
        secrets: Default::default(),
    })
    .await?;
    Ok(())
}

async fn mount(
    node: &mut Node,
    volume_id: &str,
    paths: &Paths,
    context: HashMap<String, String>,
    pod: Option<String>,
) -> anyhow::Result<()> {
    node.node_stage_volume(NodeStageVolumeRequest {
        volume_id: volume_id.to_string(),
        staging_target_path: paths.staging.to_string_lossy().into(),
        volume_capability: Some(cap()),
        volume_context: context.clone(),
        ..Default::default()
    })
    .await?;
    let mut publish_context = context;
    if let Some(pod) = pod {
        let Some((ns, name)) = pod.split_once('/') else {
            bail!("--pod {pod:?}: expected NAMESPACE/NAME")
        };
        publish_context.insert("csi.storage.k8s.io/pod.name".into(), name.into());
        publish_context.insert("csi.storage.k8s.io/pod.namespace".into(), ns.into());
    }
    node.node_publish_volume(NodePublishVolumeRequest {
        volume_id: volume_id.to_string(),
        staging_target_path: paths.staging.to_string_lossy().into(),
        target_path: paths.target.to_string_lossy().into(),
        volume_capability: Some(cap()),
        volume_context: publish_context,
        ..Default::default()
    })
    .await?;
    Ok(())
}

async fn unmount(
    node: &mut Node,
    volume_id: &str,
    paths: &Paths,
    keep_staged: bool,
) -> anyhow::Result<()> {
    node.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: volume_id.to_string(),
        target_path: paths.target.to_string_lossy().into(),
    })
    .await?;
    if keep_staged {
        return Ok(());
    }
    node.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: volume_id.to_string(),
        staging_target_path: paths.staging.to_string_lossy().into(),
    })
    .await?;
    Ok(())
}
