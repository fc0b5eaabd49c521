//! Every call this driver makes to the Kubernetes API, in one place.
//!
//! The `pvc` backend needs claims, volumes, CSIDriver objects, secrets and VolumeAttachments;
//! live tuning needs to watch claims and post Events. Each function makes one kind of call and
//! carries an `RBAC: <apiGroup> <resource> <verbs> (<scope>)` line naming the rule it needs;
//! scope `namespace` is the driver's own namespace (backing claims live there), `cluster` is
//! everywhere. `e2e/chart_check.py` derives the chart's rules from those lines and checks that
//! no other module calls the API, so the chart grants exactly what the code calls.

use std::collections::BTreeMap;

use futures_util::Stream;
use k8s_openapi::api::core::v1::{
    ObjectReference, PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec, Secret,
    VolumeResourceRequirements,
};
use k8s_openapi::api::storage::v1::{
    CSIDriver, StorageClass, VolumeAttachment, VolumeAttachmentSource, VolumeAttachmentSpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;

use crate::error::DriverError;

/// Label on every object the driver creates, and the label naming the volume it belongs to.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "csi-interposer");
pub const VOLUME_LABEL: &str = "interposer.csi.dev/volume";

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("no Kubernetes API configuration (in-cluster service account or KUBECONFIG): {0}")]
    Config(String),
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
}

impl From<KubeError> for DriverError {
    fn from(e: KubeError) -> DriverError {
        match e {
            KubeError::Config(_) => DriverError::FailedPrecondition(e.to_string()),
            // Conflicts, timeouts and outages of the API server pass; the CO retries.
            KubeError::Api(_) => DriverError::Unavailable(e.to_string()),
        }
    }
}

type Result<T> = std::result::Result<T, KubeError>;

/// `None` for 404 Not Found.
fn found<T>(r: std::result::Result<T, kube::Error>) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Whether this process has a Kubernetes API to talk to (in a pod, or given KUBECONFIG).
pub fn configured() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        || std::env::var_os("KUBECONFIG").is_some()
}

pub struct Kube {
    client: kube::Client,
    recorder: Recorder,
}

impl Kube {
    /// In-cluster configuration, else KUBECONFIG / ~/.kube/config.
    pub async fn connect(instance: &str) -> Result<Kube> {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| KubeError::Config(e.to_string()))?;
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "csi-interposer".into(),
                instance: Some(instance.to_string()),
            },
        );
        Ok(Kube { client, recorder })
    }

    /// RBAC: "" persistentvolumeclaims create (namespace)
    ///
    /// Create a claim; an existing one of that name is returned as it is.
    pub async fn create_claim(
        &self,
        claim: &PersistentVolumeClaim,
    ) -> Result<PersistentVolumeClaim> {
        let ns = claim.metadata.namespace.as_deref().unwrap_or("default");
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), ns);
        match api.create(&PostParams::default(), claim).await {
            Err(kube::Error::Api(s)) if s.code == 409 => {
                let name = claim.metadata.name.as_deref().unwrap_or_default();
                Ok(self
                    .claim(ns, name)
                    .await?
                    .ok_or_else(|| KubeError::Api(kube::Error::Api(s)))?)
            }
            r => Ok(r?),
        }
    }

    /// RBAC: "" persistentvolumeclaims get (cluster)
    pub async fn claim(&self, ns: &str, name: &str) -> Result<Option<PersistentVolumeClaim>> {
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), ns);
        found(api.get(name).await)
    }

    /// RBAC: "" persistentvolumeclaims delete (namespace)
    ///
    /// Deleting a claim that is gone succeeds.
    pub async fn delete_claim(&self, ns: &str, name: &str) -> Result<()> {
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), ns);
        found(api.delete(name, &DeleteParams::background()).await).map(|_| ())
    }

    /// RBAC: "" persistentvolumeclaims list,watch (cluster)
    ///
    /// The one claim `ns/name`, as it changes (watched, re-listed after any interruption).
    pub fn watch_claim(
        &self,
        ns: &str,
        name: &str,
    ) -> impl Stream<
        Item = std::result::Result<watcher::Event<PersistentVolumeClaim>, watcher::Error>,
    > + Send
    + 'static {
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), ns);
        watcher(
            api,
            watcher::Config::default().fields(&format!("metadata.name={name}")),
        )
    }

    /// RBAC: "" persistentvolumes get (cluster)
    pub async fn volume(&self, name: &str) -> Result<Option<PersistentVolume>> {
        let api: Api<PersistentVolume> = Api::all(self.client.clone());
        found(api.get(name).await)
    }

    /// RBAC: "" secrets get (cluster)
    ///
    /// A secret's data as strings (what CSI calls carry).
    pub async fn secret(&self, ns: &str, name: &str) -> Result<Option<BTreeMap<String, String>>> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        Ok(found(api.get(name).await)?.map(|s| {
            s.data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
                .collect()
        }))
    }

    /// RBAC: storage.k8s.io storageclasses get (cluster)
    pub async fn storage_class(&self, name: &str) -> Result<Option<StorageClass>> {
        let api: Api<StorageClass> = Api::all(self.client.clone());
        found(api.get(name).await)
    }

    /// RBAC: storage.k8s.io csidrivers get (cluster)
    pub async fn csi_driver(&self, name: &str) -> Result<Option<CSIDriver>> {
        let api: Api<CSIDriver> = Api::all(self.client.clone());
        found(api.get(name).await)
    }

    /// RBAC: storage.k8s.io volumeattachments create (cluster)
    pub async fn create_attachment(
        &self,
        name: &str,
        attacher: &str,
        node: &str,
        pv: &str,
    ) -> Result<VolumeAttachment> {
        let api: Api<VolumeAttachment> = Api::all(self.client.clone());
        let va = VolumeAttachment {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                labels: Some(BTreeMap::from([(
                    MANAGED_BY.0.to_string(),
                    MANAGED_BY.1.to_string(),
                )])),
                ..Default::default()
            },
            spec: VolumeAttachmentSpec {
                attacher: attacher.to_string(),
                node_name: node.to_string(),
                source: VolumeAttachmentSource {
                    persistent_volume_name: Some(pv.to_string()),
                    ..Default::default()
                },
            },
            status: None,
        };
        match api.create(&PostParams::default(), &va).await {
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(va),
            r => Ok(r?),
        }
    }

    /// RBAC: storage.k8s.io volumeattachments get (cluster)
    pub async fn attachment(&self, name: &str) -> Result<Option<VolumeAttachment>> {
        let api: Api<VolumeAttachment> = Api::all(self.client.clone());
        found(api.get(name).await)
    }

    /// RBAC: storage.k8s.io volumeattachments delete (cluster)
    pub async fn delete_attachment(&self, name: &str) -> Result<()> {
        let api: Api<VolumeAttachment> = Api::all(self.client.clone());
        found(api.delete(name, &DeleteParams::background()).await).map(|_| ())
    }

    /// RBAC: events.k8s.io events create,patch (cluster)
    ///
    /// An Event about `regarding` (repeats of the same one are counted in a series).
    pub async fn event(
        &self,
        regarding: &ObjectReference,
        warning: bool,
        reason: &str,
        note: String,
    ) -> Result<()> {
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_string(),
            note: Some(note),
            action: "Tune".into(),
            secondary: None,
        };
        Ok(self.recorder.publish(&ev, regarding).await?)
    }
}

/// The annotation the scheduler puts on a WaitForFirstConsumer claim: the node to provision for.
pub const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";

/// A claim for the driver to create: `size` bytes of `class`, labelled as ours; with
/// `selected_node`, provisioned for that node (what the scheduler does for a pod's claim).
pub fn claim_spec(
    ns: &str,
    name: &str,
    class: &str,
    size: i64,
    volume_id: &str,
    selected_node: Option<&str>,
) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(ns.to_string()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
                (VOLUME_LABEL.to_string(), volume_id.to_string()),
            ])),
            annotations: selected_node
                .map(|n| BTreeMap::from([(SELECTED_NODE.to_string(), n.to_string())])),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            // Mounted once, by this driver's node plugin.
            access_modes: Some(vec!["ReadWriteOnce".to_string()]),
            storage_class_name: Some(class.to_string()),
            volume_mode: Some("Filesystem".into()),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(size.to_string()),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    }
}

/// Whether a claim carries our labels for `volume_id` (so deleting it is ours to do).
pub fn is_ours(claim: &PersistentVolumeClaim, volume_id: &str) -> bool {
    let labels = claim.metadata.labels.as_ref();
    let get = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
    get(MANAGED_BY.0) == Some(MANAGED_BY.1) && get(VOLUME_LABEL) == Some(volume_id)
}

/// An object reference to a claim, for Events.
pub fn claim_ref(claim: &PersistentVolumeClaim) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("PersistentVolumeClaim".into()),
        name: claim.metadata.name.clone(),
        namespace: claim.metadata.namespace.clone(),
        uid: claim.metadata.uid.clone(),
        resource_version: claim.metadata.resource_version.clone(),
        field_path: None,
    }
}
