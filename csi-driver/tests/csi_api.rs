//! The driver through the CSI API, as kubelet and external-provisioner use it: the real
//! `csi-interposer` binary, real interposer-fs daemons, real mounts.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use csi_driver::csi::controller_client::ControllerClient;
use csi_driver::csi::identity_client::IdentityClient;
use csi_driver::csi::node_client::NodeClient;
use csi_driver::csi::volume_capability::access_mode::Mode;
use csi_driver::csi::volume_capability::{AccessMode, AccessType, MountVolume};
use csi_driver::csi::*;
use tonic::Code;
use tonic::transport::Channel;

const DRIVER: &str = env!("CARGO_BIN_EXE_csi-interposer");

fn interposer_bin() -> PathBuf {
    let p = Path::new(DRIVER).with_file_name("interposer-fs");
    assert!(
        p.is_file(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        p.display()
    );
    p
}

fn require_root() {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "these tests mount filesystems and must run as root"
    );
    assert!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing");
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let d = dir.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| m.starts_with(&d))
        .collect()
}

/// A running driver over temporary directories; dropping it stops everything it started.
struct Driver {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Driver {
    fn start() -> Driver {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let mut d = Driver { dir, child: None };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("driver.log"))
            .unwrap();
        let child = Command::new(DRIVER)
            .arg("--endpoint")
            .arg(format!("unix://{}", self.socket().display()))
            .args(["--node-id", "node-a"])
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--interposer-fs")
            .arg(interposer_bin())
            .env("RUST_LOG", "info")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start csi-interposer");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(self.socket()).is_err() {
            assert!(
                Instant::now() < deadline,
                "driver did not listen:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A socket of this test's own: no port races between parallel tests.
    fn socket(&self) -> PathBuf {
        self.dir.path().join("csi.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("driver.log")).unwrap_or_default()
    }

    /// SIGKILL the driver (its daemons live on).
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    async fn channel(&self) -> Channel {
        csi_driver::client::connect(&csi_driver::server::Endpoint::Unix(self.socket()))
            .await
            .expect("connect to the driver's socket")
    }
    async fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel().await)
    }
    async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel().await)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.kill();
        let d = self.dir.path().to_string_lossy().to_string();
        let _ = Command::new("pkill")
            .args(["-TERM", "-f", &format!("interposer-fs {d}/")])
            .status();
        std::thread::sleep(Duration::from_millis(300));
        let _ = Command::new("pkill")
            .args(["-KILL", "-f", &format!("interposer-fs {d}/")])
            .status();
        let mut left = mounts_under(self.dir.path());
        left.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in left {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
    }
}

fn mount_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }
}

fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn create(
    d: &Driver,
    name: &str,
    bytes: i64,
    p: &[(&str, &str)],
) -> Result<Volume, tonic::Status> {
    d.controller()
        .await
        .create_volume(CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter)],
            parameters: params(p),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().volume.unwrap())
}

async fn stage(d: &Driver, v: &Volume, staging: &Path) -> Result<(), tonic::Status> {
    d.node()
        .await
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: staging.to_string_lossy().into(),
            volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
            volume_context: v.volume_context.clone(),
            ..Default::default()
        })
        .await
        .map(drop)
}

async fn publish(
    d: &Driver,
    v: &Volume,
    staging: &Path,
    target: &Path,
) -> Result<(), tonic::Status> {
    d.node()
        .await
        .node_publish_volume(NodePublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: staging.to_string_lossy().into(),
            target_path: target.to_string_lossy().into(),
            volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
            volume_context: v.volume_context.clone(),
            ..Default::default()
        })
        .await
        .map(drop)
}

async fn unpublish(d: &Driver, id: &str, target: &Path) -> Result<(), tonic::Status> {
    d.node()
        .await
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: id.into(),
            target_path: target.to_string_lossy().into(),
        })
        .await
        .map(drop)
}

async fn unstage(d: &Driver, id: &str, staging: &Path) -> Result<(), tonic::Status> {
    d.node()
        .await
        .node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.to_string_lossy().into(),
        })
        .await
        .map(drop)
}

async fn delete(d: &Driver, id: &str) -> Result<(), tonic::Status> {
    d.controller()
        .await
        .delete_volume(DeleteVolumeRequest {
            volume_id: id.into(),
            secrets: Default::default(),
        })
        .await
        .map(drop)
}

fn is_mounted(p: &Path) -> bool {
    let p = p.to_string_lossy().to_string();
    mounts_under(Path::new("/")).contains(&p)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_volume_goes_through_its_whole_life_with_layers_from_parameters() {
    let d = Driver::start();
    let info = IdentityClient::new(d.channel().await)
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "interposer.csi.dev");

    let v = create(
        &d,
        "pvc-life",
        64 << 20,
        &[
            ("layers", "trace,metrics,fault,throttle"),
            ("fault.ops", "unlink"),
            ("fault.probability", "1"),
            ("fault.errno", "EPERM"),
            ("throttle.writeBytesPerSecond", "100Mi"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(v.capacity_bytes, 64 << 20);
    assert_eq!(
        v.accessible_topology[0]
            .segments
            .get("interposer.csi.dev/node")
            .map(String::as_str),
        Some("node-a")
    );
    let again = create(
        &d,
        "pvc-life",
        64 << 20,
        &[
            ("layers", "trace,metrics,fault,throttle"),
            ("fault.ops", "unlink"),
            ("fault.probability", "1"),
            ("fault.errno", "EPERM"),
            ("throttle.writeBytesPerSecond", "100Mi"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        again.volume_id, v.volume_id,
        "CreateVolume is idempotent by name"
    );
    let conflict = create(&d, "pvc-life", 32 << 20, &[]).await.unwrap_err();
    assert_eq!(conflict.code(), Code::AlreadyExists);

    let (staging, target) = (
        d.path("kubelet/staging/pv"),
        d.path("kubelet/pods/uid/volumes/pv/mount"),
    );
    stage(&d, &v, &staging).await.unwrap();
    stage(&d, &v, &staging)
        .await
        .expect("NodeStage is idempotent");
    publish(&d, &v, &staging, &target).await.unwrap();
    publish(&d, &v, &staging, &target)
        .await
        .expect("NodePublish is idempotent");
    assert!(is_mounted(&staging) && is_mounted(&target));

    std::fs::write(target.join("hello.txt"), b"through the interposer").unwrap();
    let backing = d.path("data").join(&v.volume_id);
    assert_eq!(
        std::fs::read(backing.join("hello.txt")).unwrap(),
        b"through the interposer"
    );
    let e = std::fs::remove_file(target.join("hello.txt")).unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(libc::EPERM),
        "the fault layer from the parameters is on"
    );

    let stats = d
        .node()
        .await
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: v.volume_id.clone(),
            volume_path: target.to_string_lossy().into(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stats.usage[0].total,
        64 << 20,
        "stats show the volume's size"
    );

    unpublish(&d, &v.volume_id, &target).await.unwrap();
    unpublish(&d, &v.volume_id, &target)
        .await
        .expect("NodeUnpublish is idempotent");
    assert!(!target.exists(), "the target directory is removed");
    unstage(&d, &v.volume_id, &staging).await.unwrap();
    unstage(&d, &v.volume_id, &staging)
        .await
        .expect("NodeUnstage is idempotent");
    assert!(!is_mounted(&staging));
    delete(&d, &v.volume_id).await.unwrap();
    delete(&d, &v.volume_id)
        .await
        .expect("DeleteVolume is idempotent");
    assert!(!backing.exists(), "the backing directory is gone");
    assert!(mounts_under(d.dir.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_parameters_are_refused_at_create_volume_naming_the_key() {
    let d = Driver::start();
    for (key, value) in [
        ("fault.probability", "2"),
        ("layers", "trace,telepathy"),
        ("throttle.readIOPS", "-3"),
        ("no.such.key", "1"),
        ("backend", "nfs"),
    ] {
        let e = create(&d, "pvc-bad", 1 << 20, &[(key, value)])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{key}={value}");
        assert!(e.message().contains(key), "{key}: {}", e.message());
    }
    assert!(
        std::fs::read_dir(d.path("data")).unwrap().next().is_none(),
        "nothing was created"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn capacity_is_enforced_and_expansion_applies_to_the_running_volume() {
    let d = Driver::start();
    let v = create(&d, "pvc-cap", 8 << 20, &[("layers", "metrics")])
        .await
        .unwrap();
    let (staging, target) = (d.path("staging"), d.path("target"));
    stage(&d, &v, &staging).await.unwrap();
    publish(&d, &v, &staging, &target).await.unwrap();
    let size = |p: &Path| {
        let s = nix::sys::statvfs::statvfs(p).unwrap();
        s.blocks() * s.fragment_size()
    };
    assert_eq!(
        size(&target),
        8 << 20,
        "df in the pod shows the volume's size"
    );
    let e = std::fs::write(target.join("big"), vec![0u8; 10 << 20]).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    std::fs::remove_file(target.join("big")).unwrap();

    let r = d
        .controller()
        .await
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 32 << 20,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.node_expansion_required);
    d.node()
        .await
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            volume_path: target.to_string_lossy().into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 32 << 20,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while size(&target) != 32 << 20 {
        assert!(
            Instant::now() < deadline,
            "the new size did not reach the running volume"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::write(target.join("big"), vec![0u8; 10 << 20])
        .expect("room after expansion, without a remount");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_driver_comes_back_to_volumes_that_still_serve_with_nothing_lost() {
    let mut d = Driver::start();
    let v = create(&d, "pvc-restart", 64 << 20, &[("layers", "trace,metrics")])
        .await
        .unwrap();
    let (staging, target) = (d.path("staging"), d.path("target"));
    stage(&d, &v, &staging).await.unwrap();
    publish(&d, &v, &staging, &target).await.unwrap();
    std::fs::write(target.join("a"), b"before the crash").unwrap();

    // 1. The driver dies; the volume's daemon does not: I/O goes on, and a new driver adopts it.
    d.kill();
    std::fs::write(target.join("b"), b"while the driver was down").unwrap();
    d.spawn();
    assert!(d.log().contains("1 adopted, 0 repaired"), "{}", d.log());
    std::fs::write(target.join("c"), b"after the restart").unwrap();

    // 2. Driver and daemon both die (a node-plugin container restart): the next driver repairs.
    d.kill();
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(d.path("state/node").join(format!("{}.json", v.volume_id))).unwrap(),
    )
    .unwrap();
    let pid = state["pid"].as_u64().unwrap() as i32;
    unsafe { libc::kill(pid, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        std::fs::read(target.join("a")).is_err(),
        "with its daemon dead the mount is broken"
    );
    d.spawn();
    assert!(d.log().contains("0 adopted, 1 repaired"), "{}", d.log());
    for (name, content) in [
        ("a", "before the crash"),
        ("b", "while the driver was down"),
        ("c", "after the restart"),
    ] {
        assert_eq!(
            std::fs::read_to_string(target.join(name)).unwrap(),
            content,
            "{name} survived"
        );
    }
    std::fs::write(target.join("d"), b"served again").unwrap();
    unpublish(&d, &v.volume_id, &target).await.unwrap();
    unstage(&d, &v.volume_id, &staging).await.unwrap();
    delete(&d, &v.volume_id).await.unwrap();
    assert!(mounts_under(d.dir.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_ids_and_paths_are_refused_and_nothing_lands_outside_the_data_directory() {
    let d = Driver::start();
    // Names are hashed, never used as paths.
    let v = create(&d, "../../../../tmp/evil", 1 << 20, &[])
        .await
        .unwrap();
    assert!(v.volume_id.starts_with("iv-") && !v.volume_id.contains('/'));
    assert!(d.path("data").join(&v.volume_id).is_dir());
    let long = "x".repeat(200);
    for id in ["../escape", "a/b", "..", long.as_str(), "nul\0byte"] {
        let e = delete(&d, id).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{id:?}");
        let e = d
            .node()
            .await
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: d.path("s").to_string_lossy().into(),
                volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{id:?}");
    }
    // Paths: relative, with .., or through a planted symlink.
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), d.path("planted")).unwrap();
    for staging in [
        "relative/staging".to_string(),
        format!("{}/a/../b", d.dir.path().display()),
        format!("{}/planted/staging", d.dir.path().display()),
    ] {
        let e = stage(&d, &v, Path::new(&staging)).await.unwrap_err();
        assert_eq!(
            e.code(),
            Code::InvalidArgument,
            "{staging}: {}",
            e.message()
        );
    }
    let staging = d.path("staging");
    stage(&d, &v, &staging).await.unwrap();
    let e = publish(&d, &v, &staging, &d.path("planted/target"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        std::fs::read_dir(outside.path()).unwrap().next().is_none(),
        "nothing created through the symlink"
    );
    assert!(!Path::new("/tmp/evil").exists());
    unstage(&d, &v.volume_id, &staging).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn parallel_calls_on_one_volume_are_serialized_and_start_one_daemon() {
    let d = Driver::start();
    let v = create(&d, "pvc-parallel", 1 << 20, &[("layers", "")])
        .await
        .unwrap();
    let staging = d.path("staging");
    let mut calls = Vec::new();
    for _ in 0..6 {
        let (mut node, v, staging) = (d.node().await, v.clone(), staging.clone());
        calls.push(tokio::spawn(async move {
            node.node_stage_volume(NodeStageVolumeRequest {
                volume_id: v.volume_id.clone(),
                staging_target_path: staging.to_string_lossy().into(),
                volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
                volume_context: v.volume_context.clone(),
                ..Default::default()
            })
            .await
        }));
    }
    for c in calls {
        c.await.unwrap().expect("every parallel stage succeeds");
    }
    let daemons = Command::new("pgrep")
        .args(["-f", &format!("interposer-fs {}", d.path("data").display())])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&daemons.stdout).lines().count(),
        1,
        "exactly one daemon"
    );
    assert_eq!(mounts_under(&staging).len(), 1, "exactly one mount");
    unstage(&d, &v.volume_id, &staging).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ephemeral_inline_volume_lives_from_publish_to_unpublish() {
    let d = Driver::start();
    let target = d.path("pods/uid/volumes/inline/mount");
    let mut ctx = params(&[
        ("layers", "metrics,fault"),
        ("fault.ops", "write"),
        ("fault.paths", "*.log"),
        ("fault.probability", "1"),
    ]);
    ctx.insert("csi.storage.k8s.io/ephemeral".into(), "true".into());
    ctx.insert("csi.storage.k8s.io/pod.name".into(), "app-0".into());
    let req = NodePublishVolumeRequest {
        volume_id: "csi-0123abcd".into(),
        target_path: target.to_string_lossy().into(),
        volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
        volume_context: ctx,
        ..Default::default()
    };
    d.node()
        .await
        .node_publish_volume(req.clone())
        .await
        .unwrap();
    d.node()
        .await
        .node_publish_volume(req)
        .await
        .expect("idempotent");
    std::fs::write(target.join("data.bin"), b"inline").unwrap();
    assert!(
        std::fs::write(target.join("app.log"), b"x").is_err(),
        "layers from volumeAttributes apply"
    );
    let backing = d.path("data/ephemeral/csi-0123abcd");
    assert_eq!(std::fs::read(backing.join("data.bin")).unwrap(), b"inline");
    unpublish(&d, "csi-0123abcd", &target).await.unwrap();
    assert!(
        !backing.exists() && !target.exists(),
        "backing directory and target removed"
    );
    assert!(mounts_under(d.dir.path()).is_empty());
}

#[test]
fn the_unix_socket_is_owner_only() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("csi.sock");
    let mut child = Command::new(DRIVER)
        .args([
            "--endpoint",
            &format!("unix://{}", sock.display()),
            "--node-id",
            "n",
        ])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--interposer-fs")
        .arg(interposer_bin())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
}
