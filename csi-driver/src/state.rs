//! Persisted state: what the controller created and what the node staged and published.
//!
//! One JSON file per volume and role under `--state-dir` (`controller/<id>.json`,
//! `node/<id>.json`, and `lower/<id>.json` for the volume under a `pvc`-backed one). Promises: a record is either the old or the new version, never a torn
//! one (written to a temporary file, fsynced, renamed, directory fsynced); a missing record means
//! "never created" or "fully removed"; callers hold the volume's lock while reading and writing.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{DriverError, DriverResult};
use crate::ids::VolumeId;

/// A volume the controller created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerRecord {
    pub id: String,
    pub name: String,
    pub capacity_bytes: i64,
    /// Parameters as given (validated), to tell an identical retry from a conflicting one.
    pub parameters: BTreeMap<String, String>,
    /// The node that holds the data (`dir` backend).
    pub node_id: String,
    /// `pvc` backend: the backing claim (namespace, name) this volume created and owns.
    #[serde(default)]
    pub backing_claim: Option<(String, String)>,
}

/// The volume under a `pvc`-backed volume, as this node set it up through the lower driver.
/// Saved before the first step, so a restart in the middle finds what to finish or undo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LowerRecord {
    pub id: String,
    /// The backing PersistentVolume.
    pub pv: String,
    /// The lower CSI driver and its volume handle.
    pub driver: String,
    pub handle: String,
    /// Our VolumeAttachment, when the lower driver requires attach.
    pub attachment: Option<String>,
    /// Lower NodeStage path, when the lower driver stages.
    pub staging_path: Option<PathBuf>,
    /// Lower NodePublish target: the directory the interposer serves.
    pub target_path: PathBuf,
}

/// One bind mount of a staged volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publication {
    pub readonly: bool,
    /// SINGLE_NODE_SINGLE_WRITER: no other publication may coexist.
    #[serde(default)]
    pub single_writer: bool,
}

/// A volume this node staged (or, for ephemeral volumes, published directly).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    /// Directory the interposer serves.
    pub backing_dir: PathBuf,
    /// Where the interposer is mounted (staging path, or the target of an ephemeral volume).
    pub mount_path: PathBuf,
    /// Options given to interposer-fs, in order.
    pub options: Vec<String>,
    /// Daemon process and its start time (clock ticks since boot), to tell it from a reused pid.
    pub pid: u32,
    pub pid_start: u64,
    /// Publications: target path → how.
    pub targets: BTreeMap<PathBuf, Publication>,
    pub ephemeral: bool,
    /// The daemon's Prometheus endpoint (loopback), if it serves one.
    #[serde(default)]
    pub metrics_url: Option<String>,
    /// The pod that last published the volume (podInfoOnMount), for span attributes.
    #[serde(default)]
    pub pod: Option<(String, String)>,
    /// The claim (namespace, name) whose annotations tune this volume live, if known.
    #[serde(default)]
    pub claim: Option<(String, String)>,
    /// Volume parameters from the StorageClass (or PV), before any tuning.
    #[serde(default)]
    pub contract: BTreeMap<String, String>,
    /// Parameters changed live by the claim's annotations (key → value in force).
    #[serde(default)]
    pub tuning: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn open(root: &Path) -> DriverResult<StateDir> {
        for sub in ["controller", "node", "lower", "logs"] {
            fs::create_dir_all(root.join(sub)).map_err(|e| {
                DriverError::internal(format!("creating {}", root.join(sub).display()), e)
            })?;
        }
        Ok(StateDir {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn log_path(&self, id: &VolumeId) -> PathBuf {
        self.root.join("logs").join(format!("{id}.log"))
    }

    /// The file a volume's daemon reads live settings from on SIGUSR1.
    pub fn control_path(&self, id: &VolumeId) -> PathBuf {
        self.root.join("node").join(format!("{id}.control"))
    }

    fn path(&self, kind: &str, id: &VolumeId) -> PathBuf {
        self.root.join(kind).join(format!("{id}.json"))
    }

    fn load<T: DeserializeOwned>(&self, kind: &str, id: &VolumeId) -> DriverResult<Option<T>> {
        let p = self.path(kind, id);
        match fs::read(&p) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| DriverError::internal(format!("reading {}", p.display()), e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(DriverError::internal(format!("reading {}", p.display()), e)),
        }
    }

    fn save<T: Serialize>(&self, kind: &str, id: &VolumeId, value: &T) -> DriverResult<()> {
        let p = self.path(kind, id);
        let bytes = serde_json::to_vec_pretty(value)
            .map_err(|e| DriverError::internal("encoding state", e))?;
        write_atomically(&p, &bytes)
            .map_err(|e| DriverError::internal(format!("writing {}", p.display()), e))
    }

    fn remove(&self, kind: &str, id: &VolumeId) -> DriverResult<()> {
        let p = self.path(kind, id);
        match fs::remove_file(&p) {
            Ok(()) => sync_dir(p.parent().unwrap_or(&self.root))
                .map_err(|e| DriverError::internal(format!("syncing {}", p.display()), e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(DriverError::internal(
                format!("removing {}", p.display()),
                e,
            )),
        }
    }

    fn list<T: DeserializeOwned>(&self, kind: &str) -> DriverResult<Vec<T>> {
        let dir = self.root.join(kind);
        let mut out = Vec::new();
        let entries = fs::read_dir(&dir)
            .map_err(|e| DriverError::internal(format!("listing {}", dir.display()), e))?;
        let mut names: Vec<_> = entries.flatten().map(|e| e.file_name()).collect();
        names.sort();
        for name in names {
            let name = name.to_string_lossy();
            let Some(id) = name.strip_suffix(".json") else {
                continue;
            };
            let Ok(id) = VolumeId::parse(id, "state file") else {
                continue;
            };
            if let Some(v) = self.load(kind, &id)? {
                out.push(v);
            }
        }
        Ok(out)
    }

    pub fn controller(&self, id: &VolumeId) -> DriverResult<Option<ControllerRecord>> {
        self.load("controller", id)
    }
    pub fn save_controller(&self, r: &ControllerRecord) -> DriverResult<()> {
        self.save("controller", &VolumeId::parse(&r.id, "id")?, r)
    }
    pub fn remove_controller(&self, id: &VolumeId) -> DriverResult<()> {
        self.remove("controller", id)
    }
    pub fn controllers(&self) -> DriverResult<Vec<ControllerRecord>> {
        self.list("controller")
    }

    pub fn node(&self, id: &VolumeId) -> DriverResult<Option<NodeRecord>> {
        self.load("node", id)
    }
    pub fn save_node(&self, r: &NodeRecord) -> DriverResult<()> {
        self.save("node", &VolumeId::parse(&r.id, "id")?, r)
    }
    pub fn remove_node(&self, id: &VolumeId) -> DriverResult<()> {
        self.remove("node", id)
    }
    pub fn nodes(&self) -> DriverResult<Vec<NodeRecord>> {
        self.list("node")
    }

    pub fn lower(&self, id: &VolumeId) -> DriverResult<Option<LowerRecord>> {
        self.load("lower", id)
    }
    pub fn save_lower(&self, r: &LowerRecord) -> DriverResult<()> {
        self.save("lower", &VolumeId::parse(&r.id, "id")?, r)
    }
    pub fn remove_lower(&self, id: &VolumeId) -> DriverResult<()> {
        self.remove("lower", id)
    }
}

/// Write `bytes` to `path` so a crash leaves either the old or the new content.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_removal_is_idempotent() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path()).unwrap();
        let id = VolumeId::from_name("v");
        assert_eq!(s.controller(&id).unwrap(), None);
        let r = ControllerRecord {
            id: id.to_string(),
            name: "v".into(),
            capacity_bytes: 42,
            parameters: BTreeMap::from([("layers".into(), "trace".into())]),
            node_id: "n1".into(),
            backing_claim: None,
        };
        s.save_controller(&r).unwrap();
        assert_eq!(s.controller(&id).unwrap(), Some(r.clone()));
        assert_eq!(s.controllers().unwrap(), vec![r]);
        s.remove_controller(&id).unwrap();
        s.remove_controller(&id).unwrap();
        assert_eq!(s.controller(&id).unwrap(), None);
        let leftovers: Vec<_> = fs::read_dir(d.path().join("controller")).unwrap().collect();
        assert!(leftovers.is_empty(), "no temporary files left");
    }
}
