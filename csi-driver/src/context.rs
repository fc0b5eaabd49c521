//! From StorageClass parameters and volume contexts to validated settings and daemon options.
//!
//! Kubernetes adds its own keys next to ours: external-provisioner's `csi.storage.k8s.io/*` and
//! `storage.kubernetes.io/*`, kubelet's pod info on publish. Those are recognised and set
//! apart; every other key must belong to the parameter contract, which interposer-fs validates
//! (`interposer_fs::params`), so a StorageClass and a shell user are refused alike.

use std::collections::{BTreeMap, HashMap};

use interposer_fs::params::VolumeParams;

use crate::driver::CONTEXT_PREFIX;
use crate::error::{DriverError, DriverResult};

/// Keys that Kubernetes components add; never parameters of ours.
const FOREIGN_PREFIXES: &[&str] = &["csi.storage.k8s.io/", "storage.kubernetes.io/"];

/// Parameters of a volume, split into the contract and what Kubernetes told us about it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VolumeSettings {
    /// Contract keys exactly as given (validated).
    pub contract: BTreeMap<String, String>,
    pub params: VolumeParams,
    pub pvc_name: Option<String>,
    pub pvc_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
    /// `csi.storage.k8s.io/ephemeral: "true"` on an inline volume.
    pub ephemeral: bool,
    /// `pvc` backend: the backing PersistentVolume CreateVolume bound (volume context).
    pub backing_pv: Option<String>,
}

/// Validate a parameter map or volume context. `field` names it in errors.
pub fn settings(map: &HashMap<String, String>, field: &str) -> DriverResult<VolumeSettings> {
    let mut s = VolumeSettings::default();
    for (k, v) in map {
        match k.as_str() {
            "csi.storage.k8s.io/pvc/name" => s.pvc_name = Some(v.clone()),
            "csi.storage.k8s.io/pvc/namespace" => s.pvc_namespace = Some(v.clone()),
            "csi.storage.k8s.io/pod.name" => s.pod_name = Some(v.clone()),
            "csi.storage.k8s.io/pod.namespace" => s.pod_namespace = Some(v.clone()),
            "csi.storage.k8s.io/ephemeral" => s.ephemeral = v == "true",
            _ if k.starts_with(CONTEXT_PREFIX) => {
                let key = &k[CONTEXT_PREFIX.len()..];
                match key {
                    "pvcName" => s.pvc_name = Some(v.clone()),
                    "pvcNamespace" => s.pvc_namespace = Some(v.clone()),
                    "backingPV" => s.backing_pv = Some(v.clone()),
                    _ => {}
                }
            }
            _ if FOREIGN_PREFIXES.iter().any(|p| k.starts_with(p)) => {}
            _ => {
                s.contract.insert(k.clone(), v.clone());
            }
        }
    }
    s.params = VolumeParams::parse(s.contract.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .map_err(|e| DriverError::InvalidArgument(format!("{field}: {e}")))?;
    Ok(s)
}

/// The volume context CreateVolume returns: the contract plus what NodeStage needs to know.
pub fn volume_context(s: &VolumeSettings) -> HashMap<String, String> {
    let mut ctx: HashMap<String, String> = s
        .contract
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(n) = &s.pvc_name {
        ctx.insert(format!("{CONTEXT_PREFIX}pvcName"), n.clone());
    }
    if let Some(n) = &s.pvc_namespace {
        ctx.insert(format!("{CONTEXT_PREFIX}pvcNamespace"), n.clone());
    }
    if let Some(pv) = &s.backing_pv {
        ctx.insert(format!("{CONTEXT_PREFIX}backingPV"), pv.clone());
    }
    ctx
}

impl VolumeSettings {
    /// Whether the data lives in another volume (a backing PVC) rather than a node directory.
    pub fn stacked(&self) -> bool {
        self.params.backend == interposer_fs::params::Backend::Pvc
            || self.params.backing_claim.is_some()
            || self.backing_pv.is_some()
    }
}

/// `-o` options for the volume's interposer-fs daemon.
pub fn daemon_options(
    s: &VolumeSettings,
    volume_id: &str,
    capacity: i64,
    node: &str,
    read_only: bool,
) -> Vec<String> {
    let mut o: Vec<String> = s.contract.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if !s.contract.contains_key("layers") {
        // State the default explicitly so a later change of default never changes a volume.
        o.push("layers=trace,metrics".into());
    }
    if s.params
        .has_layer(interposer_fs::params::LayerKind::Metrics)
    {
        // Loopback only, port chosen by the kernel; the node plugin reads it from the log.
        o.push("metrics.address=127.0.0.1:0".into());
    }
    o.push(format!("volumeId={volume_id}"));
    o.push(format!("nodeName={node}"));
    if capacity > 0 {
        o.push(format!("capacity={capacity}"));
    }
    for (k, v) in [
        ("pvcName", &s.pvc_name),
        ("pvcNamespace", &s.pvc_namespace),
        ("podName", &s.pod_name),
        ("podNamespace", &s.pod_namespace),
    ] {
        if let Some(v) = v {
            o.push(format!("{k}={v}"));
        }
    }
    if read_only {
        o.push("ro".into());
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn kubernetes_keys_are_set_apart_and_ours_validated() {
        let s = settings(
            &map(&[
                ("layers", "trace,fault"),
                ("fault.probability", "0.5"),
                ("csi.storage.k8s.io/pvc/name", "data"),
                ("csi.storage.k8s.io/pvc/namespace", "team"),
                ("storage.kubernetes.io/csiProvisionerIdentity", "123-node"),
            ]),
            "parameters",
        )
        .unwrap();
        assert_eq!(s.contract.len(), 2);
        assert_eq!(s.pvc_name.as_deref(), Some("data"));
        let ctx = volume_context(&s);
        let again = settings(&ctx, "volume_context").unwrap();
        assert_eq!(again.contract, s.contract);
        assert_eq!(again.pvc_namespace.as_deref(), Some("team"));
        let opts = daemon_options(&again, "iv-1", 1 << 20, "n1", false);
        assert!(opts.contains(&"fault.probability=0.5".to_string()));
        assert!(opts.contains(&"capacity=1048576".to_string()));
        assert!(opts.contains(&"pvcName=data".to_string()));
    }

    #[test]
    fn bad_parameters_are_refused_naming_the_key() {
        let e = settings(&map(&[("fault.probability", "2")]), "parameters").unwrap_err();
        assert!(matches!(e, DriverError::InvalidArgument(_)));
        assert!(e.to_string().contains("fault.probability"), "{e}");
        let e = settings(&map(&[("nonsense", "1")]), "parameters").unwrap_err();
        assert!(e.to_string().contains("nonsense"), "{e}");
    }
}
