//! CSI Controller service.
//!
//! `dir` backend: volumes are directories under `--data-dir` on the node that serves this
//! controller (external-provisioner's distributed mode), so creation and deletion happen where
//! the data lives. `pvc` backend: a volume is a backing claim of another StorageClass, which
//! this controller creates, waits for and deletes (`create_stacked_volume`).

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use interposer_fs::params::Backend;
use tonic::{Request, Response, Status};

use crate::capability;
use crate::context::{self, VolumeSettings};
use crate::csi::controller_server::Controller;
use crate::csi::controller_service_capability::{self, rpc};
use crate::csi::*;
use crate::driver::{CONTEXT_PREFIX, Driver, TOPOLOGY_KEY, log_rpc};
use crate::error::{DriverError, DriverResult};
use crate::ids::VolumeId;
use crate::k8s;
use crate::state::ControllerRecord;

pub struct ControllerService {
    pub driver: Arc<Driver>,
}

fn unimplemented<T>(what: &str) -> Result<Response<T>, Status> {
    Err(Status::unimplemented(format!(
        "{what} is not supported by this driver"
    )))
}

impl Driver {
    fn topology(&self) -> Topology {
        Topology {
            segments: HashMap::from([(TOPOLOGY_KEY.to_string(), self.config.node_id.clone())]),
        }
    }

    /// Whether the requested topology lets the volume live on this node.
    fn reachable(&self, req: Option<&TopologyRequirement>) -> bool {
        let Some(req) = req else { return true };
        let ours = |t: &Topology| t.segments.get(TOPOLOGY_KEY) == Some(&self.config.node_id);
        if !req.requisite.is_empty() {
            return req.requisite.iter().any(ours);
        }
        req.preferred.is_empty() || req.preferred.iter().any(ours)
    }

    /// The node a volume is wanted on: the first preferred (else requisite) topology naming a
    /// node, else this one.
    fn wanted_node(&self, req: Option<&TopologyRequirement>) -> String {
        req.into_iter()
            .flat_map(|r| r.preferred.iter().chain(r.requisite.iter()))
            .find_map(|t| t.segments.get(TOPOLOGY_KEY).cloned())
            .unwrap_or_else(|| self.config.node_id.clone())
    }

    /// Bytes on the data directory's filesystem: (total, available).
    fn data_space(&self) -> DriverResult<(i64, i64)> {
        let s = nix::sys::statvfs::statvfs(&self.config.data_dir)
            .map_err(|e| DriverError::internal("statfs of the data directory", e))?;
        let frag = s.fragment_size() as i64;
        Ok((s.blocks() as i64 * frag, s.blocks_available() as i64 * frag))
    }

    fn create_volume(
        &self,
        req: &CreateVolumeRequest,
        id: &VolumeId,
        s: &VolumeSettings,
        capacity: i64,
    ) -> DriverResult<Volume> {
        let volume = |capacity: i64| volume(id, s, capacity, vec![self.topology()]);
        if let Some(existing) = self.existing(req, id, s, capacity)? {
            return Ok(volume(existing.capacity_bytes));
        }
        let (total, _) = self.data_space()?;
        if capacity > total {
            return Err(DriverError::OutOfRange(format!(
                "capacity {capacity} is more than this node's data directory holds ({total})"
            )));
        }
        let dir = self.backing_dir(id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| DriverError::internal(format!("creating {}", dir.display()), e))?;
        // Pods run as any uid: the volume root is open to all (like a fresh filesystem), and
        // fsGroup can tighten it.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
            .map_err(|e| DriverError::internal(format!("chmod {}", dir.display()), e))?;
        self.state.save_controller(&ControllerRecord {
            id: id.to_string(),
            name: req.name.clone(),
            capacity_bytes: capacity,
            parameters: s.contract.clone(),
            node_id: self.config.node_id.clone(),
            backing_claim: None,
        })?;
        Ok(volume(capacity))
    }

    /// The record of an identical earlier CreateVolume; AlreadyExists if it differs.
    fn existing(
        &self,
        req: &CreateVolumeRequest,
        id: &VolumeId,
        s: &VolumeSettings,
        capacity: i64,
    ) -> DriverResult<Option<ControllerRecord>> {
        let Some(existing) = self.state.controller(id)? else {
            return Ok(None);
        };
        if existing.name != req.name {
            return Err(DriverError::Internal(format!(
                "volume id {id} collides with volume {:?}",
                existing.name
            )));
        }
        if existing.capacity_bytes != capacity || existing.parameters != s.contract {
            return Err(DriverError::AlreadyExists(format!(
                "volume {:?} exists with capacity {} and other parameters",
                req.name, existing.capacity_bytes
            )));
        }
        Ok(Some(existing))
    }

    /// `pvc` backend: create (or find) the backing claim, record it before waiting so that
    /// DeleteVolume can always clean it up, then wait up to `--bind-timeout` for it to bind.
    /// A claim still pending is Unavailable: the provisioner retries, and the retry finds it.
    fn create_stacked_volume(
        &self,
        req: &CreateVolumeRequest,
        id: &VolumeId,
        s: &VolumeSettings,
        capacity: i64,
    ) -> DriverResult<Volume> {
        let class = s.params.backing_storage_class.clone().ok_or_else(|| {
            DriverError::InvalidArgument(
                "parameters: backingClaim wraps one existing claim, for a static PV or an inline volume; a StorageClass names backingStorageClass".into(),
            )
        })?;
        let ns = self.config.namespace.clone();
        let name = backing_claim_name(id);
        if self.existing(req, id, s, capacity)?.is_none() {
            self.state.save_controller(&ControllerRecord {
                id: id.to_string(),
                name: req.name.clone(),
                capacity_bytes: capacity,
                parameters: s.contract.clone(),
                node_id: self.config.node_id.clone(),
                backing_claim: Some((ns.clone(), name.clone())),
            })?;
        }
        let pv = self.block_on(async {
            let kube = self.kube().await?;
            let wait_for_consumer = kube
                .storage_class(&class)
                .await?
                .ok_or_else(|| {
                    DriverError::InvalidArgument(format!(
                        "parameter \"backingStorageClass\": StorageClass {class} does not exist"
                    ))
                })?
                .volume_binding_mode
                .as_deref()
                == Some("WaitForFirstConsumer");
            // No pod will ever consume the backing claim: choose its node as the scheduler
            // would, the node this volume is wanted on.
            let node = wait_for_consumer.then(|| self.wanted_node(req.accessibility_requirements.as_ref()));
            let spec = k8s::claim_spec(&ns, &name, &class, capacity, id.as_str(), node.as_deref());
            let claim = kube.create_claim(&spec).await?;
            if !k8s::is_ours(&claim, id.as_str()) {
                return Err(DriverError::AlreadyExists(format!(
                    "claim {ns}/{name} exists and was not made for volume {id}"
                )));
            }
            let deadline = std::time::Instant::now() + self.config.bind_timeout;
            loop {
                let claim = kube.claim(&ns, &name).await?;
                let status = claim.as_ref().and_then(|c| c.status.as_ref());
                let bound = status.and_then(|s| s.phase.as_deref()) == Some("Bound");
                let pv = claim.and_then(|c| c.spec).and_then(|s| s.volume_name);
                if let (true, Some(pv)) = (bound, pv) {
                    return Ok(pv);
                }
                if std::time::Instant::now() > deadline {
                    return Err(DriverError::Unavailable(format!(
                        "backing claim {ns}/{name} of StorageClass {class} is not bound after {}s; retry (see its events: kubectl -n {ns} describe pvc {name})",
                        self.config.bind_timeout.as_secs()
                    )));
                }
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
        })?;
        let mut s = s.clone();
        s.backing_pv = Some(pv);
        // Not pinned to a node: the backing claim's own class decides where the data can go.
        Ok(volume(id, &s, capacity, Vec::new()))
    }

    fn delete_volume(&self, id: &VolumeId) -> DriverResult<()> {
        if let Some(n) = self.state.node(id)? {
            return Err(DriverError::FailedPrecondition(format!(
                "volume {id} is still staged at {}",
                n.mount_path.display()
            )));
        }
        let record = self.state.controller(id)?;
        // Another replica or node may have created it: the claim's name and labels, not local
        // state, say whether a stacked volume exists.
        let claim = match record.as_ref().map(|r| r.backing_claim.clone()) {
            Some(claim) => claim,
            None if k8s::configured() => {
                Some((self.config.namespace.clone(), backing_claim_name(id)))
            }
            None => None,
        };
        if let Some((ns, name)) = claim {
            let found = self.block_on(async {
                let kube = self.kube().await?;
                let claim = kube.claim(&ns, &name).await?;
                match &claim {
                    Some(c) if !k8s::is_ours(c, id.as_str()) => {
                        log::warn!("claim {ns}/{name} is not ours for volume {id}: left alone")
                    }
                    Some(_) => kube.delete_claim(&ns, &name).await?,
                    None => {}
                }
                Ok::<_, DriverError>(claim.is_some())
            })?;
            if found || record.is_some() {
                return self.state.remove_controller(id);
            }
        }
        let dir = self.backing_dir(id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(DriverError::internal(
                    format!("removing {}", dir.display()),
                    e,
                ));
            }
        }
        self.state.remove_controller(id)
    }
}

/// The volume CreateVolume answers: its context carries the contract, what NodeStage needs to
/// know, and the size.
fn volume(id: &VolumeId, s: &VolumeSettings, capacity: i64, topology: Vec<Topology>) -> Volume {
    let mut ctx = context::volume_context(s);
    ctx.insert(format!("{CONTEXT_PREFIX}capacity"), capacity.to_string());
    Volume {
        capacity_bytes: capacity,
        volume_id: id.to_string(),
        volume_context: ctx,
        content_source: None,
        accessible_topology: topology,
    }
}

/// The backing claim of a stacked volume: one name per volume, the same from every replica.
fn backing_claim_name(id: &VolumeId) -> String {
    format!("interposer-{id}")
}

/// The capacity to provide for a range: required if given, else the default within the limit.
fn capacity_for(range: Option<&CapacityRange>, default: i64) -> DriverResult<i64> {
    let Some(r) = range else { return Ok(default) };
    if r.required_bytes < 0 || r.limit_bytes < 0 {
        return Err(DriverError::InvalidArgument(
            "capacity_range: bytes must not be negative".into(),
        ));
    }
    if r.limit_bytes > 0 && r.required_bytes > r.limit_bytes {
        return Err(DriverError::InvalidArgument(format!(
            "capacity_range: required_bytes {} exceeds limit_bytes {}",
            r.required_bytes, r.limit_bytes
        )));
    }
    Ok(match (r.required_bytes, r.limit_bytes) {
        (0, 0) => default,
        (0, limit) => default.min(limit),
        (required, _) => required,
    })
}

#[tonic::async_trait]
impl Controller for ControllerService {
    /// Idempotent by name: the same name with the same capacity and parameters returns the same
    /// volume; with different ones, AlreadyExists. Every parameter is validated first.
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        let r = async {
            if req.name.is_empty() {
                return Err(DriverError::InvalidArgument("name is required".into()).into());
            }
            capability::validate(&req.volume_capabilities, "volume_capabilities")?;
            let s = context::settings(&req.parameters, "parameters")?;
            if req.volume_content_source.is_some() {
                return Err(DriverError::InvalidArgument("volume_content_source: snapshots and clones are not supported".into()).into());
            }
            let capacity = capacity_for(req.capacity_range.as_ref(), self.driver.config.default_capacity)?;
            let id = VolumeId::from_name(&req.name);
            if s.params.backend == Backend::Pvc || s.params.backing_claim.is_some() {
                let (req2, id2) = (req.clone(), id.clone());
                let volume = self
                    .driver
                    .locked(&id, move |d| d.create_stacked_volume(&req2, &id2, &s, capacity))
                    .await?;
                return Ok(Response::new(CreateVolumeResponse { volume: Some(volume) }));
            }
            if self.driver.config.stacked_only {
                return Err(DriverError::InvalidArgument(
                    "parameters: this controller provisions stacked volumes only (backend: pvc); a dir volume is created by the provisioner of the node that holds it (chart: controller.enabled=false)".into(),
                )
                .into());
            }
            if !self.driver.reachable(req.accessibility_requirements.as_ref()) {
                return Err(DriverError::ResourceExhausted(format!(
                    "accessibility_requirements exclude node {}, the only node this controller serves",
                    self.driver.config.node_id
                ))
                .into());
            }
            let req2 = req.clone();
            let id2 = id.clone();
            let volume = self
                .driver
                .locked(&id, move |d| d.create_volume(&req2, &id2, &s, capacity))
                .await?;
            Ok(Response::new(CreateVolumeResponse { volume: Some(volume) }))
        }
        .await;
        log_rpc("CreateVolume", &req.name, &r);
        r
    }

    /// Idempotent: deleting an unknown volume succeeds.
    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        let r = async {
            let id = VolumeId::parse(&req.volume_id, "volume_id")?;
            let id2 = id.clone();
            self.driver
                .locked(&id, move |d| d.delete_volume(&id2))
                .await?;
            Ok(Response::new(DeleteVolumeResponse {}))
        }
        .await;
        log_rpc("DeleteVolume", &req.volume_id, &r);
        r
    }

    async fn controller_publish_volume(
        &self,
        _request: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        unimplemented("ControllerPublishVolume")
    }

    async fn controller_unpublish_volume(
        &self,
        _request: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        unimplemented("ControllerUnpublishVolume")
    }

    /// Confirms the capabilities if every one is supported; NotFound for an unknown volume.
    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        let id = VolumeId::parse(&req.volume_id, "volume_id")?;
        if req.volume_capabilities.is_empty() {
            return Err(
                DriverError::InvalidArgument("volume_capabilities is required".into()).into(),
            );
        }
        let id2 = id.clone();
        let record = self
            .driver
            .locked(&id, move |d| d.state.controller(&id2))
            .await?;
        if record.is_none() {
            return Err(DriverError::NotFound(format!("volume {id} does not exist")).into());
        }
        if !req.parameters.is_empty() {
            context::settings(&req.parameters, "parameters")?;
        }
        let problems: Vec<String> = req
            .volume_capabilities
            .iter()
            .filter_map(capability::unsupported)
            .collect();
        let response = if problems.is_empty() {
            ValidateVolumeCapabilitiesResponse {
                confirmed: Some(validate_volume_capabilities_response::Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: req.volume_capabilities,
                    parameters: req.parameters,
                    mutable_parameters: Default::default(),
                }),
                message: String::new(),
            }
        } else {
            ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: problems.join("; "),
            }
        };
        Ok(Response::new(response))
    }

    /// Volumes sorted by id; `starting_token` is the index to continue from.
    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let req = request.into_inner();
        if req.max_entries < 0 {
            return Err(
                DriverError::InvalidArgument("max_entries must not be negative".into()).into(),
            );
        }
        let start: usize = if req.starting_token.is_empty() {
            0
        } else {
            req.starting_token.parse().map_err(|_| {
                DriverError::Aborted(format!(
                    "starting_token {:?} is not one of ours",
                    req.starting_token
                ))
            })?
        };
        let mut records = self.driver.state.controllers()?;
        records.sort_by(|a, b| a.id.cmp(&b.id));
        if start > records.len() {
            return Err(
                DriverError::Aborted(format!("starting_token {start} is past the end")).into(),
            );
        }
        let take = if req.max_entries == 0 {
            usize::MAX
        } else {
            req.max_entries as usize
        };
        let page: Vec<_> = records.iter().skip(start).take(take).collect();
        let next = start + page.len();
        let entries = page
            .into_iter()
            .map(|r| list_volumes_response::Entry {
                volume: Some(Volume {
                    capacity_bytes: r.capacity_bytes,
                    volume_id: r.id.clone(),
                    volume_context: r.parameters.clone().into_iter().collect(),
                    content_source: None,
                    accessible_topology: vec![self.driver.topology()],
                }),
                status: None,
            })
            .collect();
        Ok(Response::new(ListVolumesResponse {
            entries,
            next_token: if next < records.len() {
                next.to_string()
            } else {
                String::new()
            },
        }))
    }

    async fn controller_list_volume_health(
        &self,
        _request: Request<ControllerListVolumeHealthRequest>,
    ) -> Result<Response<ControllerListVolumeHealthResponse>, Status> {
        unimplemented("ControllerListVolumeHealth")
    }

    async fn controller_get_volume_health(
        &self,
        _request: Request<ControllerGetVolumeHealthRequest>,
    ) -> Result<Response<ControllerGetVolumeHealthResponse>, Status> {
        unimplemented("ControllerGetVolumeHealth")
    }

    /// Free bytes of the data directory, or 0 for a topology that is not this node.
    async fn get_capacity(
        &self,
        request: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        let req = request.into_inner();
        capability::validate_optional(&req.volume_capabilities)?;
        if !req.parameters.is_empty() {
            context::settings(&req.parameters, "parameters")?;
        }
        let here = req
            .accessible_topology
            .as_ref()
            .is_none_or(|t| t.segments.get(TOPOLOGY_KEY) == Some(&self.driver.config.node_id));
        let (total, available) = self.driver.data_space()?;
        Ok(Response::new(GetCapacityResponse {
            available_capacity: if here { available } else { 0 },
            maximum_volume_size: if here { Some(total) } else { None },
            minimum_volume_size: None,
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        let capabilities = [
            rpc::Type::CreateDeleteVolume,
            rpc::Type::ListVolumes,
            rpc::Type::GetCapacity,
            rpc::Type::ExpandVolume,
            rpc::Type::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(|t| ControllerServiceCapability {
            r#type: Some(controller_service_capability::Type::Rpc(
                controller_service_capability::Rpc { r#type: t as i32 },
            )),
        })
        .collect();
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_snapshot(
        &self,
        _request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        unimplemented("CreateSnapshot")
    }

    async fn delete_snapshot(
        &self,
        _request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        unimplemented("DeleteSnapshot")
    }

    async fn list_snapshots(
        &self,
        _request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        unimplemented("ListSnapshots")
    }

    async fn get_snapshot(
        &self,
        _request: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        unimplemented("GetSnapshot")
    }

    /// Grows the recorded size (never shrinks); the node then applies it to the running
    /// interposer (node_expansion_required).
    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let r = async {
            let id = VolumeId::parse(&req.volume_id, "volume_id")?;
            let Some(range) = req.capacity_range else {
                return Err(
                    DriverError::InvalidArgument("capacity_range is required".into()).into(),
                );
            };
            let wanted = capacity_for(Some(&range), 0)?;
            let id2 = id.clone();
            let capacity = self
                .driver
                .locked(&id, move |d| {
                    let mut rec = d.state.controller(&id2)?.ok_or_else(|| {
                        DriverError::NotFound(format!("volume {id2} does not exist"))
                    })?;
                    if rec.backing_claim.is_some() {
                        return Err(DriverError::FailedPrecondition(format!(
                            "volume {id2} is stacked on a backing claim; expanding it is not supported yet"
                        )));
                    }
                    let (total, _) = d.data_space()?;
                    if wanted > total {
                        return Err(DriverError::OutOfRange(format!(
                            "capacity {wanted} exceeds the node's {total}"
                        )));
                    }
                    if range.limit_bytes > 0 && rec.capacity_bytes > range.limit_bytes {
                        return Err(DriverError::OutOfRange(format!(
                            "volume is already {} bytes, above limit_bytes {}",
                            rec.capacity_bytes, range.limit_bytes
                        )));
                    }
                    if wanted > rec.capacity_bytes {
                        rec.capacity_bytes = wanted;
                        d.state.save_controller(&rec)?;
                    }
                    Ok(rec.capacity_bytes)
                })
                .await?;
            Ok(Response::new(ControllerExpandVolumeResponse {
                capacity_bytes: capacity,
                node_expansion_required: true,
            }))
        }
        .await;
        log_rpc("ControllerExpandVolume", &req.volume_id, &r);
        r
    }

    async fn controller_get_volume(
        &self,
        _request: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        unimplemented("ControllerGetVolume")
    }

    async fn controller_modify_volume(
        &self,
        _request: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        unimplemented("ControllerModifyVolume")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_ranges_resolve_as_the_spec_says() {
        let r = |req, lim| CapacityRange {
            required_bytes: req,
            limit_bytes: lim,
        };
        assert_eq!(capacity_for(None, 100).unwrap(), 100);
        assert_eq!(capacity_for(Some(&r(0, 0)), 100).unwrap(), 100);
        assert_eq!(capacity_for(Some(&r(0, 50)), 100).unwrap(), 50);
        assert_eq!(capacity_for(Some(&r(70, 0)), 100).unwrap(), 70);
        assert_eq!(capacity_for(Some(&r(70, 80)), 100).unwrap(), 70);
        assert!(capacity_for(Some(&r(90, 80)), 100).is_err());
        assert!(capacity_for(Some(&r(-1, 0)), 100).is_err());
    }
}
