//! The errors fnmesh makes, by kind, and the one table of what each kind is in every protocol
//! (docs/design.md "Errors fnmesh makes"). Errors stay typed until the one place per protocol that
//! turns them into replies (`thrift::rescue`, the gRPC relay's `error_block`).

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
    /// A call another fnmesh node forwarded here (it carries the hop marker) found no ready
    /// instance with room: refused at once, so that the node that sent it serves it itself.
    /// Only fnmesh nodes see it; the forwarding node never passes it on.
    NotWarm,
}

impl Kind {
    /// Whether an error of this kind counts against the function: it failed, crashed, hung or
    /// was overwhelmed. Refusals that say nothing about its health (no route, bad request, a
    /// rate limit, an open breaker) do not.
    pub fn is_failure(self) -> bool {
        matches!(self, Kind::Unavailable | Kind::Timeout | Kind::Overloaded)
    }

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
            Kind::NotWarm => "not-warm",
        }
    }

    /// The kind an `fnmesh-error` names.
    pub fn named(name: &str) -> Option<Kind> {
        [
            Kind::NoRoute,
            Kind::BadRequest,
            Kind::TooLarge,
            Kind::Overloaded,
            Kind::CircuitOpen,
            Kind::Unavailable,
            Kind::Timeout,
            Kind::NotWarm,
        ]
        .into_iter()
        .find(|k| k.as_str() == name)
    }

    /// The TApplicationException type a Thrift caller gets.
    pub fn thrift_exception(self) -> ExceptionType {
        match self {
            Kind::NoRoute => ExceptionType::UnknownMethod,
            Kind::BadRequest | Kind::TooLarge => ExceptionType::ProtocolError,
            Kind::Overloaded
            | Kind::CircuitOpen
            | Kind::Unavailable
            | Kind::Timeout
            | Kind::NotWarm => ExceptionType::InternalError,
        }
    }

    /// The HTTP status a gateway caller gets.
    pub fn http_status(self) -> u16 {
        match self {
            Kind::NoRoute => 404,
            Kind::BadRequest => 400,
            Kind::TooLarge => 413,
            Kind::Overloaded => 429,
            Kind::CircuitOpen | Kind::Unavailable | Kind::NotWarm => 503,
            Kind::Timeout => 504,
        }
    }

    /// The `grpc-status` a gRPC caller gets.
    pub fn grpc_status(self) -> u16 {
        match self {
            Kind::NoRoute => 12,                                         // UNIMPLEMENTED
            Kind::BadRequest => 13,                                      // INTERNAL
            Kind::TooLarge | Kind::Overloaded => 8,                      // RESOURCE_EXHAUSTED
            Kind::Unavailable | Kind::CircuitOpen | Kind::NotWarm => 14, // UNAVAILABLE
            Kind::Timeout => 4,                                          // DEADLINE_EXCEEDED
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_maps_as_the_design_table_says() {
        use ExceptionType::*;
        let table = [
            (Kind::NoRoute, "no-route", UnknownMethod, 12),
            (Kind::BadRequest, "bad-request", ProtocolError, 13),
            (Kind::TooLarge, "too-large", ProtocolError, 8),
            (Kind::Overloaded, "overloaded", InternalError, 8),
            (Kind::CircuitOpen, "circuit-open", InternalError, 14),
            (Kind::Unavailable, "unavailable", InternalError, 14),
            (Kind::Timeout, "timeout", InternalError, 4),
            (Kind::NotWarm, "not-warm", InternalError, 14),
        ];
        for (kind, name, thrift, grpc) in table {
            assert_eq!(kind.as_str(), name);
            assert_eq!(kind.thrift_exception(), thrift, "{name}");
            assert_eq!(kind.grpc_status(), grpc, "{name}");
        }
    }
}
