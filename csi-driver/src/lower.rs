//! The volume under a stacked (`pvc`-backed) volume, set up the way kubelet would set up the
//! backing PV, but by us, straight against the lower driver's socket under kubelet's plugins
//! directory: a VolumeAttachment when its CSIDriver requires attach, NodeStage when it stages,
//! NodePublish into a directory of ours. The interposer then serves that directory.
//!
//! Every step is recorded (`state::LowerRecord`) before it is taken and every CSI call is
//! idempotent, so a restart in the middle is finished by the next call, and teardown undoes
//! whatever was done, in reverse.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{CSIPersistentVolumeSource, PersistentVolume, SecretReference};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

use crate::client;
use crate::csi::node_client::NodeClient;
use crate::csi::node_service_capability::{self, rpc};
use crate::csi::volume_capability::{AccessMode, AccessType, MountVolume, access_mode};
use crate::csi::*;
use crate::driver::Driver;
use crate::error::{DriverError, DriverResult};
use crate::ids::VolumeId;
use crate::mounts::{mkdir, remove_dir};
use crate::server::Endpoint;
use crate::state::LowerRecord;

/// How long to wait for an external attacher to attach the lower volume.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);

/// Which backing volume to stack on.
pub enum Backing<'a> {
    /// The PV CreateVolume bound for a dynamically provisioned volume.
    Volume(&'a str),
    /// An existing claim (namespace, name): static PVs and inline volumes.
    Claim(&'a str, &'a str),
}

/// Crash the process here if `CSI_INTERPOSER_CRASH_AT` names this point: lets the e2e suite
/// restart the node plugin at an exact step, as a power cut would.
pub fn crash_point(name: &str) {
    if std::env::var("CSI_INTERPOSER_CRASH_AT").as_deref() == Ok(name) {
        log::error!("crash point {name}: exiting as asked by CSI_INTERPOSER_CRASH_AT");
        std::process::exit(86);
    }
}

fn lower_status(what: &str, driver: &str, e: tonic::Status) -> DriverError {
    let msg = format!(
        "lower driver {driver}: {what}: {:?}: {}",
        e.code(),
        e.message()
    );
    match e.code() {
        tonic::Code::InvalidArgument | tonic::Code::NotFound | tonic::Code::FailedPrecondition => {
            DriverError::FailedPrecondition(msg)
        }
        _ => DriverError::Unavailable(msg),
    }
}

/// The CSI access mode matching the PV's first access mode.
fn access_mode_of(pv: &PersistentVolume) -> access_mode::Mode {
    let first = pv
        .spec
        .as_ref()
        .and_then(|s| s.access_modes.as_ref())
        .and_then(|m| m.first())
        .map(String::as_str);
    match first {
        Some("ReadWriteMany") => access_mode::Mode::MultiNodeMultiWriter,
        Some("ReadOnlyMany") => access_mode::Mode::MultiNodeReaderOnly,
        Some("ReadWriteOncePod") => access_mode::Mode::SingleNodeSingleWriter,
        _ => access_mode::Mode::SingleNodeWriter,
    }
}

/// kubelet's name for the attachment of `pv` to `node` by `driver`.
fn attachment_name(pv: &str, driver: &str, node: &str) -> String {
    let digest = Sha256::digest(format!("{pv}{driver}{node}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("csi-{hex}")
}

impl Driver {
    fn lower_socket(&self, driver: &str) -> PathBuf {
        self.config.plugins_dir.join(driver).join("csi.sock")
    }

    async fn lower_client(&self, driver: &str) -> DriverResult<NodeClient<Channel>> {
        let sock = self.lower_socket(driver);
        if !sock.exists() {
            return Err(DriverError::FailedPrecondition(format!(
                "lower driver {driver} has no socket at {}: is its node plugin running on node {}?",
                sock.display(),
                self.config.node_id
            )));
        }
        let channel = client::connect(&Endpoint::Unix(sock.clone()))
            .await
            .map_err(|e| {
                DriverError::Unavailable(format!(
                    "lower driver {driver}: connecting to {}: {e}",
                    sock.display()
                ))
            })?;
        Ok(NodeClient::new(channel))
    }

    async fn secrets(&self, r: Option<&SecretReference>) -> DriverResult<HashMap<String, String>> {
        let Some(r) = r else {
            return Ok(HashMap::new());
        };
        let ns = r.namespace.as_deref().unwrap_or("default");
        let name = r.name.as_deref().unwrap_or_default();
        let data = self.kube().await?.secret(ns, name).await?.ok_or_else(|| {
            DriverError::FailedPrecondition(format!("secret {ns}/{name} does not exist"))
        })?;
        Ok(data.into_iter().collect())
    }

    /// The backing PV, checked to be a bound CSI volume.
    async fn backing_volume(&self, backing: &Backing<'_>) -> DriverResult<PersistentVolume> {
        let kube = self.kube().await?;
        let pv_name = match backing {
            Backing::Volume(pv) => pv.to_string(),
            Backing::Claim(ns, name) => {
                let claim = kube.claim(ns, name).await?.ok_or_else(|| {
                    DriverError::FailedPrecondition(format!(
                        "backing claim {ns}/{name} does not exist"
                    ))
                })?;
                let phase = claim.status.as_ref().and_then(|s| s.phase.clone());
                match claim.spec.and_then(|s| s.volume_name) {
                    Some(pv) if phase.as_deref() == Some("Bound") => pv,
                    _ => {
                        return Err(DriverError::FailedPrecondition(format!(
                            "backing claim {ns}/{name} is not bound (phase {})",
                            phase.unwrap_or_else(|| "unknown".into())
                        )));
                    }
                }
            }
        };
        kube.volume(&pv_name).await?.ok_or_else(|| {
            DriverError::FailedPrecondition(format!("backing volume {pv_name} does not exist"))
        })
    }

    /// Set up the lower volume of `id` and return the directory to serve. Idempotent.
    pub fn lower_up(&self, id: &VolumeId, backing: Backing<'_>) -> DriverResult<PathBuf> {
        self.block_on(self.lower_up_async(id, backing))
    }

    async fn lower_up_async(&self, id: &VolumeId, backing: Backing<'_>) -> DriverResult<PathBuf> {
        let pv = self.backing_volume(&backing).await?;
        let pv_name = pv.metadata.name.clone().unwrap_or_default();
        let spec = pv.spec.clone().unwrap_or_default();
        let csi: CSIPersistentVolumeSource = spec.csi.clone().ok_or_else(|| {
            DriverError::FailedPrecondition(format!(
                "backing volume {pv_name} is not a CSI volume: only CSI volumes can be stacked"
            ))
        })?;
        if let Some(rec) = self.state.lower(id)? {
            if rec.pv != pv_name {
                return Err(DriverError::AlreadyExists(format!(
                    "volume {id} is already stacked on {}, not {pv_name}",
                    rec.pv
                )));
            }
        }
        let mut node = self.lower_client(&csi.driver).await?;
        let caps = node
            .node_get_capabilities(NodeGetCapabilitiesRequest {})
            .await
            .map_err(|e| lower_status("NodeGetCapabilities", &csi.driver, e))?
            .into_inner();
        let stages = caps.capabilities.iter().any(|c| {
            matches!(&c.r#type, Some(node_service_capability::Type::Rpc(r))
                if r.r#type == rpc::Type::StageUnstageVolume as i32)
        });
        let kube = self.kube().await?;
        let attach = kube
            .csi_driver(&csi.driver)
            .await?
            .and_then(|d| d.spec.attach_required)
            .unwrap_or(true);
        let dir = self.config.lower_dir.join(id.as_str());
        let rec = LowerRecord {
            id: id.to_string(),
            pv: pv_name.clone(),
            driver: csi.driver.clone(),
            handle: csi.volume_handle.clone(),
            attachment: attach
                .then(|| attachment_name(&pv_name, &csi.driver, &self.config.node_id)),
            staging_path: stages.then(|| dir.join("stage")),
            target_path: dir.join("mount"),
        };
        self.state.save_lower(&rec)?;

        let mut publish_context = HashMap::new();
        if let Some(name) = &rec.attachment {
            publish_context = self.attach(name, &csi.driver, &pv_name).await?;
        }
        let capability = VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: csi.fs_type.clone().unwrap_or_default(),
                mount_flags: spec.mount_options.clone().unwrap_or_default(),
                volume_mount_group: String::new(),
            })),
            access_mode: Some(AccessMode {
                mode: access_mode_of(&pv) as i32,
            }),
        };
        let volume_context: HashMap<String, String> = csi
            .volume_attributes
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        if let Some(staging) = &rec.staging_path {
            mkdir(staging)?;
            node.node_stage_volume(NodeStageVolumeRequest {
                volume_id: csi.volume_handle.clone(),
                publish_context: publish_context.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(capability.clone()),
                secrets: self.secrets(csi.node_stage_secret_ref.as_ref()).await?,
                volume_context: volume_context.clone(),
            })
            .await
            .map_err(|e| lower_status("NodeStageVolume", &csi.driver, e))?;
        }
        mkdir(&dir)?;
        node.node_publish_volume(NodePublishVolumeRequest {
            volume_id: csi.volume_handle.clone(),
            publish_context,
            staging_target_path: rec
                .staging_path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            target_path: rec.target_path.display().to_string(),
            volume_capability: Some(capability),
            readonly: csi.read_only.unwrap_or(false),
            secrets: self.secrets(csi.node_publish_secret_ref.as_ref()).await?,
            volume_context,
        })
        .await
        .map_err(|e| lower_status("NodePublishVolume", &csi.driver, e))?;
        crash_point("after-lower-publish");
        Ok(rec.target_path)
    }

    /// Create our VolumeAttachment and wait for the lower driver's attacher; returns its
    /// attachment metadata (the publish context).
    async fn attach(
        &self,
        name: &str,
        driver: &str,
        pv: &str,
    ) -> DriverResult<HashMap<String, String>> {
        let kube = self.kube().await?;
        kube.create_attachment(name, driver, &self.config.node_id, pv)
            .await?;
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        loop {
            let status = kube.attachment(name).await?.and_then(|va| va.status);
            if let Some(s) = status {
                if s.attached {
                    return Ok(s
                        .attachment_metadata
                        .unwrap_or_default()
                        .into_iter()
                        .collect());
                }
                if let Some(e) = s.attach_error.and_then(|e| e.message) {
                    return Err(DriverError::Unavailable(format!(
                        "attaching {pv} to node {}: {e}",
                        self.config.node_id
                    )));
                }
            }
            if Instant::now() > deadline {
                return Err(DriverError::Unavailable(format!(
                    "VolumeAttachment {name} of {pv} is not attached after {}s: is {driver}'s attacher running?",
                    ATTACH_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Undo [`Driver::lower_up`] for `id`, whatever part of it was done. Idempotent.
    pub fn lower_down(&self, id: &VolumeId) -> DriverResult<()> {
        let Some(rec) = self.state.lower(id)? else {
            return Ok(());
        };
        self.block_on(async {
            let mut node = self.lower_client(&rec.driver).await?;
            node.node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: rec.handle.clone(),
                target_path: rec.target_path.display().to_string(),
            })
            .await
            .map_err(|e| lower_status("NodeUnpublishVolume", &rec.driver, e))?;
            if let Some(staging) = &rec.staging_path {
                node.node_unstage_volume(NodeUnstageVolumeRequest {
                    volume_id: rec.handle.clone(),
                    staging_target_path: staging.display().to_string(),
                })
                .await
                .map_err(|e| lower_status("NodeUnstageVolume", &rec.driver, e))?;
            }
            if let Some(name) = &rec.attachment {
                self.kube().await?.delete_attachment(name).await?;
            }
            Ok::<_, DriverError>(())
        })?;
        let dir = self.config.lower_dir.join(id.as_str());
        for p in [dir.join("mount"), dir.join("stage"), dir] {
            remove_dir(&p);
        }
        self.state.remove_lower(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attachment_names_are_kubelets() {
        // kubelet: "csi-" + sha256(pv + driver + node) in hex.
        let n = attachment_name("pv-1", "lower.csi.dev", "node-a");
        assert!(n.starts_with("csi-") && n.len() == 4 + 64, "{n}");
        assert_eq!(n, attachment_name("pv-1", "lower.csi.dev", "node-a"));
        assert_ne!(n, attachment_name("pv-2", "lower.csi.dev", "node-a"));
    }
}
