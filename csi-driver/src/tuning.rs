//! Live tuning: annotations on a volume's claim change its running layers, without a remount.
//!
//! `interposer.csi.dev/<key>: <value>` on the PersistentVolumeClaim, for any `fault.*` or
//! `throttle.*` key of the parameter contract, overrides the StorageClass value while it is
//! there; removing it restores the StorageClass value. The node plugin watches the claim of
//! every volume it has staged, validates the whole resulting parameter set with the same parser
//! as CreateVolume, hands it to the daemon (control file + SIGUSR1) and posts an Event on the
//! claim: Normal `Retuned` with what changed, or Warning `TuningRefused` with why, in which
//! case the volume keeps the settings it had.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use interposer_fs::params::{LayerKind, VolumeParams};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::runtime::watcher;

use crate::driver::Driver;
use crate::error::{DriverError, DriverResult};
use crate::ids::VolumeId;
use crate::k8s;
use crate::state::NodeRecord;

/// Annotation prefix of tuning keys on a claim.
pub const ANNOTATION_PREFIX: &str = "interposer.csi.dev/";

/// How often the set of watched claims follows the staged volumes.
const RESCAN: Duration = Duration::from_secs(2);

/// Which layer a key tunes, if it can change on a running volume.
fn layer_of(key: &str) -> Option<LayerKind> {
    if key.starts_with("fault.") {
        Some(LayerKind::Fault)
    } else if key.starts_with("throttle.") {
        Some(LayerKind::Throttle)
    } else {
        None
    }
}

/// The parameters in force: the StorageClass's, overridden by the tuning annotations.
pub fn effective(rec: &NodeRecord) -> BTreeMap<String, String> {
    let mut m = rec.contract.clone();
    m.extend(rec.tuning.clone());
    m
}

/// Tuning keys and values from a claim's annotations.
fn wanted(claim: &PersistentVolumeClaim) -> BTreeMap<String, String> {
    claim
        .metadata
        .annotations
        .iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.strip_prefix(ANNOTATION_PREFIX)?.to_string(), v.clone())))
        .collect()
}

/// Check `wanted` against a volume's record; on success, what changes (key, from, to).
fn check(
    rec: &NodeRecord,
    wanted: &BTreeMap<String, String>,
) -> DriverResult<Vec<(String, String, String)>> {
    // One parse of the whole result: unknown keys and bad values are named by the parser.
    let mut merged = rec.contract.clone();
    merged.extend(wanted.clone());
    let params = VolumeParams::parse(merged.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .map_err(|e| {
            DriverError::InvalidArgument(format!("annotations ({ANNOTATION_PREFIX}*): {e}"))
        })?;
    for key in wanted.keys() {
        let Some(layer) = layer_of(key) else {
            return Err(DriverError::FailedPrecondition(format!(
                "annotation {ANNOTATION_PREFIX}{key}: {key} cannot change on a running volume (only fault.* and throttle.* can)"
            )));
        };
        // `layers` itself cannot be tuned, so these are the volume's running layers.
        if !params.has_layer(layer) {
            return Err(DriverError::FailedPrecondition(format!(
                "annotation {ANNOTATION_PREFIX}{key}: the {} layer is not in this volume's layers; add it to the StorageClass (it costs nothing while it injects nothing)",
                layer.name()
            )));
        }
    }
    let old = effective(rec);
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(merged.keys()).collect();
    Ok(keys
        .into_iter()
        .filter(|k| old.get(*k) != merged.get(*k))
        .map(|k| {
            let show = |m: &BTreeMap<String, String>| {
                m.get(k).cloned().unwrap_or_else(|| "(default)".into())
            };
            (k.clone(), show(&old), show(&merged))
        })
        .collect())
}

impl Driver {
    /// Apply `wanted` tuning to a staged volume. `Ok(None)`: nothing changed.
    fn retune(
        &self,
        id: &VolumeId,
        wanted: &BTreeMap<String, String>,
    ) -> DriverResult<Option<String>> {
        let Some(mut rec) = self.state.node(id)? else {
            return Ok(None);
        };
        if &rec.tuning == wanted {
            return Ok(None);
        }
        let changes = check(&rec, wanted)?;
        rec.tuning = wanted.clone();
        self.state.save_node(&rec)?;
        self.push_live_settings(&rec)?;
        if changes.is_empty() {
            return Ok(None);
        }
        Ok(Some(
            changes
                .iter()
                .map(|(k, from, to)| format!("{k}: {from} -> {to}"))
                .collect::<Vec<_>>()
                .join(", "),
        ))
    }
}

/// Keep one claim watch per staged volume that has a claim, for as long as it is staged.
pub async fn run(driver: Arc<Driver>) {
    let mut watches: HashMap<VolumeId, ((String, String), tokio::task::JoinHandle<()>)> =
        HashMap::new();
    loop {
        let records = match driver.state.nodes() {
            Ok(r) => r,
            Err(e) => {
                log::warn!("tuning: reading node state: {e}");
                Vec::new()
            }
        };
        let mut live = HashMap::new();
        for rec in records {
            if let (Some(claim), Ok(id)) = (rec.claim.clone(), VolumeId::parse(&rec.id, "state")) {
                live.insert(id, claim);
            }
        }
        watches.retain(|id, (claim, task)| {
            let keep = live.get(id) == Some(claim) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for (id, claim) in live {
            watches.entry(id.clone()).or_insert_with(|| {
                let task = tokio::spawn(watch(driver.clone(), id, claim.clone()));
                (claim, task)
            });
        }
        tokio::time::sleep(RESCAN).await;
    }
}

/// Follow one claim's annotations and apply them to the volume.
async fn watch(driver: Arc<Driver>, id: VolumeId, (ns, name): (String, String)) {
    let kube = match driver.kube().await {
        Ok(k) => k,
        Err(e) => {
            log::warn!("tuning: volume {id} (claim {ns}/{name}) cannot be tuned live: {e}");
            // Not retried before the next rescan finds the task finished.
            tokio::time::sleep(Duration::from_secs(60)).await;
            return;
        }
    };
    let mut last: Option<BTreeMap<String, String>> = None;
    let mut events = std::pin::pin!(kube.watch_claim(&ns, &name));
    while let Some(ev) = events.next().await {
        let claim = match ev {
            Ok(watcher::Event::Apply(c)) | Ok(watcher::Event::InitApply(c)) => c,
            Ok(_) => continue,
            Err(e) => {
                log::warn!("tuning: watching claim {ns}/{name}: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let w = wanted(&claim);
        if last.as_ref() == Some(&w) {
            continue;
        }
        last = Some(w.clone());
        let id2 = id.clone();
        let result = driver.locked(&id, move |d| d.retune(&id2, &w)).await;
        let (warning, reason, note) = match result {
            Ok(None) => continue,
            Ok(Some(changes)) => (false, "Retuned", format!("volume {id}: {changes}")),
            Err(s) => (
                true,
                "TuningRefused",
                format!("volume {id} keeps its settings: {}", s.message()),
            ),
        };
        log::info!("tuning: claim {ns}/{name}: {reason}: {note}");
        if let Err(e) = kube
            .event(&k8s::claim_ref(&claim), warning, reason, note)
            .await
        {
            log::warn!("tuning: posting an event on {ns}/{name}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn record(contract: &[(&str, &str)]) -> NodeRecord {
        NodeRecord {
            id: "iv-1".into(),
            backing_dir: PathBuf::from("/b"),
            mount_path: PathBuf::from("/m"),
            options: vec![],
            pid: 1,
            pid_start: 1,
            targets: Default::default(),
            ephemeral: false,
            metrics_url: None,
            pod: None,
            claim: None,
            contract: contract
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            tuning: Default::default(),
        }
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn fault_and_throttle_keys_tune_a_volume_that_has_those_layers() {
        let rec = record(&[("layers", "trace,fault"), ("fault.probability", "0")]);
        let changes = check(&rec, &map(&[("fault.probability", "0.2")])).unwrap();
        assert_eq!(
            changes,
            vec![("fault.probability".into(), "0".into(), "0.2".into())]
        );
        let changes = check(&rec, &map(&[("fault.errno", "EACCES")])).unwrap();
        assert_eq!(
            changes,
            vec![("fault.errno".into(), "(default)".into(), "EACCES".into())]
        );
    }

    #[test]
    fn refused_tuning_says_why() {
        let rec = record(&[("layers", "trace,fault")]);
        let e = check(&rec, &map(&[("fault.probability", "2")])).unwrap_err();
        assert!(e.to_string().contains("fault.probability"), "{e}");
        let e = check(&rec, &map(&[("layers", "trace")])).unwrap_err();
        assert!(
            e.to_string().contains("cannot change on a running volume"),
            "{e}"
        );
        let e = check(&rec, &map(&[("throttle.readIOPS", "5")])).unwrap_err();
        assert!(
            e.to_string()
                .contains("throttle layer is not in this volume's layers"),
            "{e}"
        );
        let e = check(&rec, &map(&[("nonsense", "1")])).unwrap_err();
        assert!(e.to_string().contains("unknown parameter"), "{e}");
    }

    #[test]
    fn removing_an_annotation_restores_the_storageclass_value() {
        let mut rec = record(&[("layers", "fault"), ("fault.probability", "0.1")]);
        rec.tuning = map(&[("fault.probability", "1")]);
        assert_eq!(effective(&rec)["fault.probability"], "1");
        let changes = check(&rec, &BTreeMap::new()).unwrap();
        assert_eq!(
            changes,
            vec![("fault.probability".into(), "1".into(), "0.1".into())]
        );
    }
}
