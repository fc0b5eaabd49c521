//! Volume ids: derived safely from names, and checked before they become paths.
//!
//! A volume id is used as a file name under `--data-dir` and `--state-dir`, so nothing in a
//! request may choose a path: names are hashed into ids, and any id that arrives is refused
//! unless it is a plain, bounded name of safe characters.

use sha2::{Digest, Sha256};

use crate::error::{DriverError, DriverResult};

/// Longest id accepted (CSI allows 128 bytes of id; file names allow 255).
pub const MAX_ID_LEN: usize = 128;

/// A volume id that is safe to use as one path component.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VolumeId(String);

impl VolumeId {
    /// The id of the volume created for `name`: same name, same id, on every call.
    pub fn from_name(name: &str) -> VolumeId {
        let digest = Sha256::digest(name.as_bytes());
        let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
        VolumeId(format!("iv-{hex}"))
    }

    /// Check an id from a request; `field` names the request field in the error.
    pub fn parse(id: &str, field: &str) -> DriverResult<VolumeId> {
        if id.is_empty() {
            return Err(DriverError::InvalidArgument(format!("{field} is required")));
        }
        let safe = id.len() <= MAX_ID_LEN
            && id != "."
            && id != ".."
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !safe {
            return Err(DriverError::InvalidArgument(format!(
                "{field} {id:?} is not a valid volume id (1-{MAX_ID_LEN} characters of A-Z a-z 0-9 . _ -)"
            )));
        }
        Ok(VolumeId(id.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for VolumeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_hash_to_stable_safe_ids() {
        let a = VolumeId::from_name("pvc-1234");
        assert_eq!(a, VolumeId::from_name("pvc-1234"));
        assert_ne!(a, VolumeId::from_name("pvc-1235"));
        assert_eq!(VolumeId::parse(a.as_str(), "volume_id").unwrap(), a);
        let hostile = VolumeId::from_name("../../etc/passwd\0");
        assert!(hostile.as_str().starts_with("iv-") && hostile.as_str().len() == 35);
    }

    #[test]
    fn hostile_ids_are_refused() {
        let long = "a".repeat(MAX_ID_LEN + 1);
        for id in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "/abs",
            "a\0b",
            "sp ace",
            long.as_str(),
        ] {
            let e = VolumeId::parse(id, "volume_id").unwrap_err();
            assert!(matches!(e, DriverError::InvalidArgument(_)), "{id:?}");
            assert!(e.to_string().contains("volume_id"));
        }
        assert!(VolumeId::parse("csi-abc.DEF_123", "volume_id").is_ok());
    }
}
