//! The errors fnmesh makes, by kind (DESIGN.md "Errors fnmesh makes"). They stay typed until the
//! one place that turns them into protocol replies (`thrift::rescue`).

use fnmesh_codec::ExceptionType;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    NoRoute,
    BadRequest,
    TooLarge,
    Overloaded,
    CircuitOpen,
    Unavailable,
    Timeout,
}

impl Kind {
    /// The name carried in TTHeader key `fnmesh-error`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::NoRoute => "no-route",
            Kind::BadRequest => "bad-request",
            Kind::TooLarge => "too-large",
            Kind::Overloaded => "overloaded",
            Kind::CircuitOpen => "circuit-open",
            Kind::Unavailable => "unavailable",
            Kind::Timeout => "timeout",
        }
    }

    pub fn thrift_exception(self) -> ExceptionType {
        match self {
            Kind::NoRoute => ExceptionType::UnknownMethod,
            Kind::BadRequest | Kind::TooLarge => ExceptionType::ProtocolError,
            Kind::Overloaded | Kind::CircuitOpen | Kind::Unavailable | Kind::Timeout => {
                ExceptionType::InternalError
            }
        }
    }
}

/// An error fnmesh answers a call with: its kind and a message naming the function.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fnmesh {}: {message}", kind.as_str())]
pub struct CallError {
    pub kind: Kind,
    pub message: String,
}

impl CallError {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        CallError {
            kind,
            message: message.into(),
        }
    }
}
