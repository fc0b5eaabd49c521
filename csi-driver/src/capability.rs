//! Which volume capabilities the driver supports: filesystem volumes on one node.

use crate::csi::VolumeCapability;
use crate::csi::volume_capability::AccessType;
use crate::csi::volume_capability::access_mode::Mode;
use crate::error::{DriverError, DriverResult};

/// Why `cap` is not supported, if it is not.
pub fn unsupported(cap: &VolumeCapability) -> Option<String> {
    match &cap.access_type {
        Some(AccessType::Mount(_)) => {}
        Some(AccessType::Block(_)) => {
            return Some("block volumes are not supported (filesystem only)".into());
        }
        None => return Some("access_type is required (mount)".into()),
    }
    let mode = cap
        .access_mode
        .as_ref()
        .map(|m| Mode::try_from(m.mode).unwrap_or(Mode::Unknown));
    match mode {
        Some(Mode::SingleNodeWriter)
        | Some(Mode::SingleNodeReaderOnly)
        | Some(Mode::SingleNodeSingleWriter)
        | Some(Mode::SingleNodeMultiWriter) => None,
        Some(Mode::Unknown) | None => Some("access_mode is required".into()),
        Some(m) => Some(format!(
            "access mode {} is not supported: data lives on one node",
            m.as_str_name()
        )),
    }
}

/// Check every capability of a request; `field` names the request field.
pub fn validate(caps: &[VolumeCapability], field: &str) -> DriverResult<()> {
    if caps.is_empty() {
        return Err(DriverError::InvalidArgument(format!("{field} is required")));
    }
    for cap in caps {
        if let Some(why) = unsupported(cap) {
            return Err(DriverError::InvalidArgument(format!("{field}: {why}")));
        }
    }
    Ok(())
}

/// Whether a capability asks for read-only access.
pub fn read_only_mode(cap: &VolumeCapability) -> bool {
    cap.access_mode.as_ref().map(|m| m.mode) == Some(Mode::SingleNodeReaderOnly as i32)
}

/// Like [`validate`], for requests where capabilities are optional.
pub fn validate_optional(caps: &[VolumeCapability]) -> DriverResult<()> {
    if caps.is_empty() {
        Ok(())
    } else {
        validate(caps, "volume_capabilities")
    }
}

/// Whether a capability asks for exactly one writer on the node.
pub fn single_writer_mode(cap: &VolumeCapability) -> bool {
    cap.access_mode.as_ref().map(|m| m.mode) == Some(Mode::SingleNodeSingleWriter as i32)
}
