//! CSI Node service: stage = an interposer-fs daemon mounted over the volume's backing
//! directory at the staging path; publish = a bind mount of that to the target (or, for an
//! ephemeral inline volume, a daemon mounted straight at the target).
//!
//! What was staged and published is recorded under `--state-dir` before answering, so after a
//! restart `recover` finds every volume again: live daemons are adopted, dead ones are
//! restarted and their bind mounts redone.
//!
//! A stacked volume (`pvc` backend, or `backingClaim`) first has its lower volume set up by
//! `lower` (the backing PV through its own driver); the interposer then serves that directory.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::capability;
use crate::context::{self, VolumeSettings};
use crate::csi::node_server::Node;
use crate::csi::node_service_capability::{self, rpc};
use crate::csi::*;
use crate::driver::{CONTEXT_PREFIX, Driver, TOPOLOGY_KEY, log_rpc};
use crate::error::{DriverError, DriverResult};
use crate::ids::VolumeId;
use crate::lower::Backing;
use crate::mounts::{self, mkdir, remove_dir};
use crate::state::{NodeRecord, Publication};
use crate::supervisor::Daemon;

pub struct NodeService {
    pub driver: Arc<Driver>,
}

fn daemon(rec: &NodeRecord) -> Daemon {
    Daemon {
        pid: rec.pid,
        start: rec.pid_start,
    }
}

impl Driver {
    /// Capacity to enforce: the controller's record (it follows expansions), else the context.
    fn capacity_of(&self, id: &VolumeId, ctx: &HashMap<String, String>) -> DriverResult<i64> {
        if let Some(r) = self.state.controller(id)? {
            return Ok(r.capacity_bytes);
        }
        Ok(ctx
            .get(&format!("{CONTEXT_PREFIX}capacity"))
            .and_then(|v| v.parse().ok())
            .unwrap_or(self.config.default_capacity))
    }

    fn stage(
        &self,
        id: &VolumeId,
        staging: &Path,
        s: &VolumeSettings,
        capacity: i64,
        read_only: bool,
    ) -> DriverResult<()> {
        if let Some(mut rec) = self.state.node(id)? {
            if rec.ephemeral || rec.mount_path != staging {
                return Err(DriverError::AlreadyExists(format!(
                    "volume {id} is already staged at {}",
                    rec.mount_path.display()
                )));
            }
            if !self.supervisor.healthy(daemon(&rec), staging) {
                log::warn!("volume {id}: staged but its daemon is gone; restarting it");
                self.repair(&mut rec)?;
            }
            return Ok(());
        }
        let backing = if s.stacked() {
            self.lower_up(id, backing_of(s)?)?
        } else {
            self.backing_dir(id)
        };
        if !backing.is_dir() {
            return Err(DriverError::NotFound(format!(
                "volume {id} has no data on node {}",
                self.config.node_id
            )));
        }
        mkdir(staging)?;
        mounts::unmount_if_mounted(staging)?;
        let mut options =
            context::daemon_options(s, id.as_str(), capacity, &self.config.node_id, read_only);
        options.push(format!("control={}", self.state.control_path(id).display()));
        let (d, metrics_url) =
            self.supervisor
                .start(&backing, staging, &options, &self.state.log_path(id))?;
        let rec = NodeRecord {
            metrics_url,
            pod: None,
            id: id.to_string(),
            backing_dir: backing,
            mount_path: staging.to_path_buf(),
            options,
            pid: d.pid,
            pid_start: d.start,
            targets: BTreeMap::new(),
            ephemeral: false,
            claim: s.pvc_namespace.clone().zip(s.pvc_name.clone()),
            contract: s.contract.clone(),
            tuning: BTreeMap::new(),
        };
        if let Err(e) = self.state.save_node(&rec) {
            let _ = self.supervisor.stop(d, staging);
            return Err(e);
        }
        Ok(())
    }

    fn unstage(&self, id: &VolumeId, staging: &Path) -> DriverResult<()> {
        let Some(rec) = self.state.node(id)? else {
            // A stage cut short after its lower volume was set up leaves only that to undo.
            return self.lower_down(id);
        };
        if rec.ephemeral || rec.mount_path != staging {
            return Err(DriverError::NotFound(format!(
                "volume {id} is not staged at {}",
                staging.display()
            )));
        }
        for target in rec.targets.keys() {
            mounts::unmount_if_mounted(target)?;
        }
        self.supervisor.stop(daemon(&rec), staging)?;
        self.lower_down(id)?;
        self.state.remove_node(id)
    }

    fn publish(
        &self,
        id: &VolumeId,
        target: &Path,
        staging: &Path,
        read_only: bool,
        single_writer: bool,
        pod: Option<(String, String)>,
    ) -> DriverResult<()> {
        let mut rec = self.state.node(id)?.ok_or_else(|| {
            DriverError::FailedPrecondition(format!("volume {id} is not staged on this node"))
        })?;
        if rec.ephemeral || rec.mount_path != staging {
            return Err(DriverError::FailedPrecondition(format!(
                "volume {id} is staged at {}, not at {}",
                rec.mount_path.display(),
                staging.display()
            )));
        }
        if let Some(p) = rec.targets.get(target) {
            if p.readonly != read_only {
                return Err(DriverError::AlreadyExists(format!(
                    "volume {id} is already published at {} with readonly={}",
                    target.display(),
                    p.readonly
                )));
            }
            if mounts::is_mount_point(target).unwrap_or(false) {
                return Ok(());
            }
        }
        let others_single = rec
            .targets
            .iter()
            .any(|(t, p)| t != target && p.single_writer);
        let has_others = rec.targets.keys().any(|t| t != target);
        if others_single || (single_writer && has_others) {
            return Err(DriverError::FailedPrecondition(format!(
                "volume {id} is single-writer and already published at another target"
            )));
        }
        if !self.supervisor.healthy(daemon(&rec), staging) {
            self.repair(&mut rec)?;
        }
        mkdir(target)?;
        mounts::bind(staging, target, read_only)?;
        rec.targets.insert(
            target.to_path_buf(),
            Publication {
                readonly: read_only,
                single_writer,
            },
        );
        let pod_changed = pod.is_some() && pod != rec.pod;
        if pod_changed {
            rec.pod = pod;
        }
        self.state.save_node(&rec)?;
        if pod_changed {
            self.push_live_settings(&rec)?;
        }
        Ok(())
    }

    fn publish_ephemeral(
        &self,
        id: &VolumeId,
        target: &Path,
        s: &VolumeSettings,
        read_only: bool,
    ) -> DriverResult<()> {
        if let Some(mut rec) = self.state.node(id)? {
            if !rec.ephemeral || rec.mount_path != target {
                return Err(DriverError::AlreadyExists(format!(
                    "volume {id} is already in use at {}",
                    rec.mount_path.display()
                )));
            }
            if !self.supervisor.healthy(daemon(&rec), target) {
                self.repair(&mut rec)?;
            }
            return Ok(());
        }
        let backing = if s.stacked() {
            let Some((ns, _)) = &s.params.backing_claim else {
                return Err(DriverError::InvalidArgument(
                    "volume_context: an inline volume stacks on an existing claim: set backingClaim".into(),
                ));
            };
            if s.pod_namespace.as_ref() != Some(ns) {
                return Err(DriverError::InvalidArgument(format!(
                    "volume_context: backingClaim must be in the pod's own namespace ({})",
                    s.pod_namespace
                        .as_deref()
                        .unwrap_or("unknown: podInfoOnMount is off")
                )));
            }
            self.lower_up(id, backing_of(s)?)?
        } else {
            let backing = self.ephemeral_dir(id);
            mkdir(&backing)?;
            std::fs::set_permissions(&backing, std::fs::Permissions::from_mode(0o777))
                .map_err(|e| DriverError::internal(format!("chmod {}", backing.display()), e))?;
            backing
        };
        mkdir(target)?;
        let options = context::daemon_options(
            s,
            id.as_str(),
            self.config.default_capacity,
            &self.config.node_id,
            read_only,
        );
        let (d, metrics_url) =
            self.supervisor
                .start(&backing, target, &options, &self.state.log_path(id))?;
        let rec = NodeRecord {
            metrics_url,
            pod: None,
            id: id.to_string(),
            backing_dir: backing,
            mount_path: target.to_path_buf(),
            options,
            pid: d.pid,
            pid_start: d.start,
            targets: BTreeMap::from([(
                target.to_path_buf(),
                Publication {
                    readonly: read_only,
                    single_writer: false,
                },
            )]),
            ephemeral: true,
            claim: None,
            contract: s.contract.clone(),
            tuning: BTreeMap::new(),
        };
        if let Err(e) = self.state.save_node(&rec) {
            let _ = self.supervisor.stop(d, target);
            return Err(e);
        }
        Ok(())
    }

    fn unpublish(&self, id: &VolumeId, target: &Path) -> DriverResult<()> {
        match self.state.node(id)? {
            Some(rec) if rec.ephemeral && rec.mount_path == target => {
                self.supervisor.stop(daemon(&rec), target)?;
                if self.state.lower(id)?.is_some() {
                    // The data is the backing claim's: only undo the lower mount.
                    self.lower_down(id)?;
                } else if let Err(e) = std::fs::remove_dir_all(&rec.backing_dir) {
                    log::warn!("removing {}: {e}", rec.backing_dir.display());
                }
                self.state.remove_node(id)?;
            }
            Some(mut rec) if rec.targets.contains_key(target) => {
                mounts::unmount_if_mounted(target)?;
                rec.targets.remove(target);
                self.state.save_node(&rec)?;
            }
            Some(_) => {
                // Already unpublished (or never here): only undo a mount if one is left there.
                // The staged volume, and its lower volume, stay.
                mounts::unmount_if_mounted(target)?;
            }
            None => {
                // Nothing recorded: undo a mount left there, and the lower volume of an inline
                // publish cut short before its daemon started.
                mounts::unmount_if_mounted(target)?;
                self.lower_down(id)?;
            }
        }
        remove_dir(target);
        Ok(())
    }

    /// Restart a volume's daemon on its mount path and redo its bind mounts.
    fn repair(&self, rec: &mut NodeRecord) -> DriverResult<()> {
        let id = VolumeId::parse(&rec.id, "state")?;
        for target in rec.targets.keys().filter(|t| **t != rec.mount_path) {
            mounts::unmount_if_mounted(target)?;
        }
        self.supervisor.stop(daemon(rec), &rec.mount_path)?;
        if let Some(lower) = self.state.lower(&id)? {
            if !mounts::is_mount_point(&lower.target_path).unwrap_or(false) {
                self.lower_up(&id, Backing::Volume(&lower.pv))?;
            }
        }
        mkdir(&rec.mount_path)?;
        let (d, metrics_url) = self.supervisor.start(
            &rec.backing_dir,
            &rec.mount_path,
            &rec.options,
            &self.state.log_path(&id),
        )?;
        rec.metrics_url = metrics_url;
        rec.pid = d.pid;
        rec.pid_start = d.start;
        for (target, p) in rec.targets.iter().filter(|(t, _)| **t != rec.mount_path) {
            mkdir(target)?;
            mounts::bind(&rec.mount_path, target, p.readonly)?;
        }
        self.state.save_node(rec)?;
        if rec.pod.is_some() || !rec.tuning.is_empty() {
            self.push_live_settings(rec)?;
        }
        Ok(())
    }

    /// At start-up: adopt live volumes, repair dead ones. Returns (adopted, repaired).
    pub fn recover(&self) -> DriverResult<(usize, usize)> {
        let (mut adopted, mut repaired) = (0, 0);
        for mut rec in self.state.nodes()? {
            let targets_ok = rec
                .targets
                .keys()
                .all(|t| *t == rec.mount_path || mounts::is_mount_point(t).unwrap_or(false));
            if self.supervisor.healthy(daemon(&rec), &rec.mount_path) && targets_ok {
                log::info!("volume {}: adopted running daemon pid {}", rec.id, rec.pid);
                adopted += 1;
            } else {
                log::warn!("volume {}: daemon or mounts gone; repairing", rec.id);
                match self.repair(&mut rec) {
                    Ok(()) => repaired += 1,
                    Err(e) => log::error!("volume {}: repair failed: {e}", rec.id),
                }
            }
        }
        Ok((adopted, repaired))
    }

    /// The volume's record, if it is mounted at `path` (staging path or a target).
    fn mounted_at(&self, id: &VolumeId, path: &Path) -> DriverResult<NodeRecord> {
        let rec = self.state.node(id)?.ok_or_else(|| {
            DriverError::NotFound(format!(
                "volume {id} is not staged or published on this node"
            ))
        })?;
        if rec.mount_path != path && !rec.targets.contains_key(path) {
            return Err(DriverError::NotFound(format!(
                "volume {id} is not mounted at {}",
                path.display()
            )));
        }
        Ok(rec)
    }

    fn volume_stats(&self, id: &VolumeId, path: &Path) -> DriverResult<NodeGetVolumeStatsResponse> {
        let rec = self.mounted_at(id, path)?;
        if !self.supervisor.healthy(daemon(&rec), &rec.mount_path) {
            return Err(DriverError::FailedPrecondition(format!(
                "volume {id} is not being served: its interposer-fs daemon (pid {}) is gone; see NodeGetVolumeHealth",
                rec.pid
            )));
        }
        let s = nix::sys::statvfs::statvfs(path)
            .map_err(|e| DriverError::internal(format!("statfs {}", path.display()), e))?;
        let frag = s.fragment_size() as i64;
        Ok(NodeGetVolumeStatsResponse {
            usage: vec![
                VolumeUsage {
                    available: s.blocks_available() as i64 * frag,
                    total: s.blocks() as i64 * frag,
                    used: (s.blocks() as i64 - s.blocks_free() as i64) * frag,
                    unit: volume_usage::Unit::Bytes as i32,
                },
                VolumeUsage {
                    available: s.files_available() as i64,
                    total: s.files() as i64,
                    used: s.files() as i64 - s.files_free() as i64,
                    unit: volume_usage::Unit::Inodes as i32,
                },
            ],
        })
    }

    /// Health: INACCESSIBLE while the volume's daemon is not serving it. (CSI v1.13 moved
    /// volume conditions from NodeGetVolumeStats to this RPC.)
    fn volume_health(&self, id: &VolumeId, path: Option<&Path>) -> DriverResult<VolumeHealth> {
        let rec = match path {
            Some(p) => self.mounted_at(id, p)?,
            None => self.state.node(id)?.ok_or_else(|| {
                DriverError::NotFound(format!(
                    "volume {id} is not staged or published on this node"
                ))
            })?,
        };
        let mut health_statuses = Vec::new();
        if !self.supervisor.alive(daemon(&rec)) {
            health_statuses.push(volume_health::VolumeHealthEntry {
                status: VolumeHealthErrorType::Inaccessible as i32,
                reason: "InterposerNotRunning".into(),
                message: format!(
                    "the interposer-fs daemon of this volume (pid {}) has exited",
                    rec.pid
                ),
            });
        } else if !self.supervisor.healthy(daemon(&rec), &rec.mount_path) {
            health_statuses.push(volume_health::VolumeHealthEntry {
                status: VolumeHealthErrorType::Inaccessible as i32,
                reason: "MountNotAnswering".into(),
                message: format!("{} does not answer", rec.mount_path.display()),
            });
        }
        Ok(VolumeHealth {
            volume_id: id.to_string(),
            health_statuses,
        })
    }

    fn expand(&self, id: &VolumeId, path: &Path, wanted: i64) -> DriverResult<i64> {
        let mut rec = self.state.node(id)?.ok_or_else(|| {
            DriverError::NotFound(format!("volume {id} is not staged on this node"))
        })?;
        if rec.mount_path != path && !rec.targets.contains_key(path) {
            return Err(DriverError::NotFound(format!(
                "volume {id} is not mounted at {}",
                path.display()
            )));
        }
        let capacity = if wanted > 0 {
            wanted
        } else {
            self.capacity_of(id, &HashMap::new())?
        };
        let option = format!("capacity={capacity}");
        let old = rec.options.iter().position(|o| o.starts_with("capacity="));
        if old.map(|i| rec.options[i] == option).unwrap_or(false) {
            return Ok(capacity);
        }
        match old {
            Some(i) => rec.options[i] = option,
            None => rec.options.push(option),
        }
        self.state.save_node(&rec)?;
        self.push_live_settings(&rec)?;
        Ok(capacity)
    }

    /// Tell the running daemon what changed since it started (size, the pod using it, tuned
    /// parameters): write its control file and send SIGUSR1. No remount, no interruption of I/O.
    pub(crate) fn push_live_settings(&self, rec: &NodeRecord) -> DriverResult<()> {
        let id = VolumeId::parse(&rec.id, "state")?;
        let mut text = String::new();
        if let Some(c) = rec.options.iter().find(|o| o.starts_with("capacity=")) {
            text.push_str(c);
            text.push('\n');
        }
        if let Some((name, namespace)) = &rec.pod {
            text.push_str(&format!("podName={name}\npodNamespace={namespace}\n"));
        }
        for (k, v) in crate::tuning::effective(rec) {
            text.push_str(&format!("{k}={v}\n"));
        }
        crate::state::write_atomically(&self.state.control_path(&id), text.as_bytes())
            .map_err(|e| DriverError::internal("writing the control file", e))?;
        if self.supervisor.alive(daemon(rec)) {
            unsafe { libc::kill(rec.pid as i32, libc::SIGUSR1) };
        }
        Ok(())
    }
}

/// Which backing volume a stacked volume's settings name.
fn backing_of(s: &VolumeSettings) -> DriverResult<Backing<'_>> {
    if let Some(pv) = &s.backing_pv {
        return Ok(Backing::Volume(pv));
    }
    if let Some((ns, name)) = &s.params.backing_claim {
        return Ok(Backing::Claim(ns, name));
    }
    Err(DriverError::InvalidArgument(format!(
        "volume_context: a stacked volume needs {CONTEXT_PREFIX}backingPV (set by CreateVolume) or backingClaim"
    )))
}

/// A path the driver will create or mount on, checked (see `mounts::check_path`).
fn checked_path(path: &str, field: &str) -> DriverResult<PathBuf> {
    mounts::check_path(path, field)?;
    Ok(PathBuf::from(path))
}

/// A path that is only compared with recorded mounts (never created or mounted on).
fn lookup_path(path: &str, field: &str) -> DriverResult<PathBuf> {
    if path.is_empty() {
        return Err(DriverError::InvalidArgument(format!("{field} is required")));
    }
    Ok(PathBuf::from(path))
}

#[tonic::async_trait]
impl Node for NodeService {
    /// Idempotent: staging an already staged volume at the same path succeeds (restarting its
    /// daemon if it died); at another path it is AlreadyExists. Returns once the mount answers.
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        let r = async {
            let id = VolumeId::parse(&req.volume_id, "volume_id")?;
            let staging = checked_path(&req.staging_target_path, "staging_target_path")?;
            let cap = req.volume_capability.as_ref().ok_or_else(|| {
                DriverError::InvalidArgument("volume_capability is required".into())
            })?;
            capability::validate(std::slice::from_ref(cap), "volume_capability")?;
            let s = context::settings(&req.volume_context, "volume_context")?;
            let read_only = capability::read_only_mode(cap);
            let ctx = req.volume_context.clone();
            let id2 = id.clone();
            self.driver
                .locked(&id, move |d| {
                    let capacity = d.capacity_of(&id2, &ctx)?;
                    d.stage(&id2, &staging, &s, capacity, read_only)
                })
                .await?;
            Ok(Response::new(NodeStageVolumeResponse {}))
        }
        .await;
        log_rpc("NodeStageVolume", &req.volume_id, &r);
        r
    }

    /// Idempotent: unstaging a volume that is not staged succeeds.
    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        let r = async {
            let id = VolumeId::parse(&req.volume_id, "volume_id")?;
            let staging = checked_path(&req.staging_target_path, "staging_target_path")?;
            let id2 = id.clone();
            self.driver
                .locked(&id, move |d| d.unstage(&id2, &staging))
                .await?;
            Ok(Response::new(NodeUnstageVolumeResponse {}))
        }
        .await;
        log_rpc("NodeUnstageVolume", &req.volume_id, &r);
        r
    }

    /// Idempotent: the same target with the same flags succeeds; other flags are AlreadyExists.
    /// Ephemeral inline volumes (`csi.storage.k8s.io/ephemeral: "true"`) get their own daemon.
    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let r = async {
            let id = VolumeId::parse(&req.volume_id, "volume_id")?;
            let target = checked_path(&req.target_path, "target_path")?;
            let cap = req.volume_capability.as_ref().ok_or_else(|| {
                DriverError::InvalidArgument("volume_capability is required".into())
            })?;
            capability::validate(std::slice::from_ref(cap), "volume_capability")?;
            let s = context::settings(&req.volume_context, "volume_context")?;
            let read_only = req.readonly || capability::read_only_mode(cap);
            let single_writer = capability::single_writer_mode(cap);
            let id2 = id.clone();
            if s.ephemeral {
                self.driver
                    .locked(&id, move |d| {
                        d.publish_ephemeral(&id2, &target, &s, read_only)
                    })
                    .await?;
            } else {
                if req.staging_target_path.is_empty() {
                    return Err(DriverError::FailedPrecondition(
                        "staging_target_path is required: this driver stages volumes first".into(),
                    )
                    .into());
                }
                let staging = checked_path(&req.staging_target_path, "staging_target_path")?;
                let pod = s.pod_name.clone().zip(s.pod_namespace.clone());
                self.driver
                    .locked(&id, move |d| {
                        d.publish(&id2, &target, &staging, read_only, single_writer, pod)
                    })
                    .await?;
            }
            Ok(Response::new(NodePublishVolumeResponse {}))
        }
        .await;
        log_rpc("NodePublishVolume", &req.volume_id, &r);
        r
    }

    /// Idempotent: unpublishing what is not published succeeds; the target directory is removed.
    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let r = async {
            let id = VolumeId::parse(&req.volume_id, "volume_id")?;
            let target = checked_path(&req.target_path, "target_path")?;
            let id2 = id.clone();
            self.driver
                .locked(&id, move |d| d.unpublish(&id2, &target))
                .await?;
            Ok(Response::new(NodeUnpublishVolumeResponse {}))
        }
        .await;
        log_rpc("NodeUnpublishVolume", &req.volume_id, &r);
        r
    }

    /// Bytes and inodes of the mounted volume; FailedPrecondition while its daemon is gone.
    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        let id = VolumeId::parse(&req.volume_id, "volume_id")?;
        let path = lookup_path(&req.volume_path, "volume_path")?;
        let id2 = id.clone();
        let stats = self
            .driver
            .locked(&id, move |d| d.volume_stats(&id2, &path))
            .await?;
        Ok(Response::new(stats))
    }

    /// INACCESSIBLE (with the reason) when the volume's daemon is gone or its mount hangs.
    async fn node_get_volume_health(
        &self,
        request: Request<NodeGetVolumeHealthRequest>,
    ) -> Result<Response<NodeGetVolumeHealthResponse>, Status> {
        let req = request.into_inner();
        let id = VolumeId::parse(&req.volume_id, "volume_id")?;
        let path = [&req.volume_publish_path, &req.staging_target_path]
            .into_iter()
            .find(|p| !p.is_empty())
            .map(PathBuf::from);
        let id2 = id.clone();
        let health = self
            .driver
            .locked(&id, move |d| d.volume_health(&id2, path.as_deref()))
            .await?;
        Ok(Response::new(NodeGetVolumeHealthResponse {
            volume_health: Some(health),
        }))
    }

    async fn node_get_storage_health(
        &self,
        _request: Request<NodeGetStorageHealthRequest>,
    ) -> Result<Response<NodeGetStorageHealthResponse>, Status> {
        Err(Status::unimplemented(
            "NodeGetStorageHealth is not supported",
        ))
    }

    /// Applies the new size to the running interposer, without a remount.
    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let r = async {
            let id = VolumeId::parse(&req.volume_id, "volume_id")?;
            let path = lookup_path(&req.volume_path, "volume_path")?;
            if let Some(cap) = &req.volume_capability {
                capability::validate(std::slice::from_ref(cap), "volume_capability")?;
            }
            let wanted = req
                .capacity_range
                .as_ref()
                .map(|r| r.required_bytes)
                .unwrap_or(0);
            let id2 = id.clone();
            let capacity = self
                .driver
                .locked(&id, move |d| d.expand(&id2, &path, wanted))
                .await?;
            Ok(Response::new(NodeExpandVolumeResponse {
                capacity_bytes: capacity,
            }))
        }
        .await;
        log_rpc("NodeExpandVolume", &req.volume_id, &r);
        r
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let capabilities = [
            rpc::Type::StageUnstageVolume,
            rpc::Type::GetVolumeStats,
            rpc::Type::ExpandVolume,
            rpc::Type::SingleNodeMultiWriter,
            rpc::Type::GetVolumeHealth,
        ]
        .into_iter()
        .map(|t| NodeServiceCapability {
            r#type: Some(node_service_capability::Type::Rpc(
                node_service_capability::Rpc { r#type: t as i32 },
            )),
        })
        .collect();
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(
        &self,
        _request: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        let c = &self.driver.config;
        Ok(Response::new(NodeGetInfoResponse {
            node_id: c.node_id.clone(),
            max_volumes_per_node: c.max_volumes_per_node,
            accessible_topology: Some(Topology {
                segments: HashMap::from([(TOPOLOGY_KEY.to_string(), c.node_id.clone())]),
            }),
        }))
    }
}
