//! The driver's error type and its one conversion to gRPC status codes.
//!
//! Each variant is named for what went wrong from the caller's point of view and maps to exactly
//! the code the CSI spec names for it; `code_table` below is that mapping, tested as a table.

use tonic::Code;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DriverError {
    /// A request field is missing or malformed (the message names the field).
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    /// The same name or target exists with incompatible settings.
    #[error("{0}")]
    AlreadyExists(String),
    /// The volume is not in a state that allows the call (e.g. publish before stage).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A capacity outside what can be provided.
    #[error("{0}")]
    OutOfRange(String),
    /// No room on this node, or not reachable from the requested topology.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A paging token that is not ours.
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Unimplemented(String),
    /// Not possible yet, worth retrying (a backing claim still binding, the API unreachable).
    #[error("{0}")]
    Unavailable(String),
    /// Something on the node failed (a mount, a daemon, the state directory).
    #[error("{0}")]
    Internal(String),
}

impl DriverError {
    pub fn code(&self) -> Code {
        match self {
            DriverError::InvalidArgument(_) => Code::InvalidArgument,
            DriverError::NotFound(_) => Code::NotFound,
            DriverError::AlreadyExists(_) => Code::AlreadyExists,
            DriverError::FailedPrecondition(_) => Code::FailedPrecondition,
            DriverError::OutOfRange(_) => Code::OutOfRange,
            DriverError::ResourceExhausted(_) => Code::ResourceExhausted,
            DriverError::Aborted(_) => Code::Aborted,
            DriverError::Unimplemented(_) => Code::Unimplemented,
            DriverError::Unavailable(_) => Code::Unavailable,
            DriverError::Internal(_) => Code::Internal,
        }
    }

    /// An internal failure with what was being done.
    pub fn internal(what: impl std::fmt::Display, cause: impl std::fmt::Display) -> Self {
        DriverError::Internal(format!("{what}: {cause}"))
    }
}

impl From<DriverError> for tonic::Status {
    fn from(e: DriverError) -> tonic::Status {
        tonic::Status::new(e.code(), e.to_string())
    }
}

pub type DriverResult<T> = Result<T, DriverError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_becomes_the_code_the_spec_names() {
        let table = [
            (
                DriverError::InvalidArgument("x".into()),
                Code::InvalidArgument,
            ),
            (DriverError::NotFound("x".into()), Code::NotFound),
            (DriverError::AlreadyExists("x".into()), Code::AlreadyExists),
            (
                DriverError::FailedPrecondition("x".into()),
                Code::FailedPrecondition,
            ),
            (DriverError::OutOfRange("x".into()), Code::OutOfRange),
            (
                DriverError::ResourceExhausted("x".into()),
                Code::ResourceExhausted,
            ),
            (DriverError::Aborted("x".into()), Code::Aborted),
            (DriverError::Unimplemented("x".into()), Code::Unimplemented),
            (DriverError::Unavailable("x".into()), Code::Unavailable),
            (DriverError::Internal("x".into()), Code::Internal),
        ];
        for (e, code) in table {
            let status = tonic::Status::from(e.clone());
            assert_eq!(status.code(), code, "{e:?}");
            assert_eq!(status.message(), "x");
        }
    }
}
