//! `csi-interposer-ctl`: drive a CSI endpoint by hand, as external-provisioner and kubelet would.
//!
//! `up` provisions a volume and mounts it (CreateVolume, NodeStageVolume, NodePublishVolume);
//! `down` undoes that; `stats` asks NodeGetVolumeStats and NodeGetVolumeHealth. Useful for
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
        /// Volume name (as external-provisioner would send: pvc-<uid>).
        name: String,
        /// Where to stage.
        #[arg(long)]
        staging: PathBuf,
        /// Where to publish (the pod's mount).
        #[arg(long)]
        target: PathBuf,
        /// Size in bytes.
        #[arg(long, default_value_t = 1 << 30)]
        capacity: i64,
        /// A StorageClass parameter, key=value (repeat).
        #[arg(short = 'p', long = "param", value_name = "KEY=VALUE")]
        params: Vec<String>,
        /// The pod the volume is published for, as kubelet's podInfoOnMount says it.
        #[arg(long, value_name = "NAMESPACE/NAME")]
        pod: Option<String>,
    },
    /// NodeUnpublishVolume + NodeUnstageVolume + DeleteVolume.
    Down {
        volume_id: String,
        #[arg(long)]
        staging: PathBuf,
        #[arg(long)]
        target: PathBuf,
    },
    /// NodeGetVolumeStats and NodeGetVolumeHealth for a mounted volume.
    Stats { volume_id: String, path: PathBuf },
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
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let ch = csi_driver::client::connect(&cli.endpoint)
        .await
        .with_context(|| format!("connecting to {:?}", cli.endpoint))?;
    let (mut ctl, mut node) = (ControllerClient::new(ch.clone()), NodeClient::new(ch));
    match cli.command {
        Cmd::Up {
            name,
            staging,
            target,
            capacity,
            params,
            pod,
        } => {
            let mut parameters = HashMap::new();
            for p in params {
                let Some((k, v)) = p.split_once('=') else {
                    bail!("--param {p:?}: expected KEY=VALUE")
                };
                parameters.insert(k.to_string(), v.to_string());
            }
            let v = ctl
                .create_volume(CreateVolumeRequest {
                    name,
                    capacity_range: Some(CapacityRange {
                        required_bytes: capacity,
                        limit_bytes: 0,
                    }),
                    volume_capabilities: vec![cap()],
                    parameters,
                    ..Default::default()
                })
                .await?
                .into_inner()
                .volume
                .context("CreateVolume returned no volume")?;
            node.node_stage_volume(NodeStageVolumeRequest {
                volume_id: v.volume_id.clone(),
                staging_target_path: staging.to_string_lossy().into(),
                volume_capability: Some(cap()),
                volume_context: v.volume_context.clone(),
                ..Default::default()
            })
            .await?;
            let mut publish_context = v.volume_context;
            if let Some(pod) = pod {
                let Some((ns, name)) = pod.split_once('/') else {
                    bail!("--pod {pod:?}: expected NAMESPACE/NAME")
                };
                publish_context.insert("csi.storage.k8s.io/pod.name".into(), name.into());
                publish_context.insert("csi.storage.k8s.io/pod.namespace".into(), ns.into());
            }
            node.node_publish_volume(NodePublishVolumeRequest {
                volume_id: v.volume_id.clone(),
                staging_target_path: staging.to_string_lossy().into(),
                target_path: target.to_string_lossy().into(),
                volume_capability: Some(cap()),
                volume_context: publish_context,
                ..Default::default()
            })
            .await?;
            println!("{}", v.volume_id);
        }
        Cmd::Down {
            volume_id,
            staging,
            target,
        } => {
            node.node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: volume_id.clone(),
                target_path: target.to_string_lossy().into(),
            })
            .await?;
            node.node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: volume_id.clone(),
                staging_target_path: staging.to_string_lossy().into(),
            })
            .await?;
            ctl.delete_volume(DeleteVolumeRequest {
                volume_id,
                secrets: Default::default(),
            })
            .await?;
        }
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
