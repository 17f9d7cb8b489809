//! The codec's one error type. It never allocates, so a flood of bad input costs nothing extra.

/// Why bytes could not be decoded or rewritten.
///
/// Every variant is a property of the input (or of a request for a rewrite that cannot be
/// expressed on the wire); none is an internal failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The first bytes match no transport fnmesh speaks.
    #[error("not a Thrift or HTTP/2 stream: first bytes {0:02x?}")]
    UnknownProtocol([u8; 4]),
    /// A frame (declared, or found by walking an unframed message) is over `max_frame_size`.
    #[error("frame of {size} bytes is over the limit of {limit} bytes")]
    TooLarge { size: u64, limit: usize },
    /// The bytes are not a well-formed instance of what they claim to be.
    #[error("malformed {what} at byte {offset}: {reason}")]
    Malformed {
        what: &'static str,
        offset: usize,
        reason: &'static str,
    },
    /// A length, count or depth inside a frame is over its limit.
    #[error("{what} of {value} at byte {offset} is over the limit of {limit}")]
    LimitExceeded {
        what: &'static str,
        offset: usize,
        value: u64,
        limit: u64,
    },
    /// A frame or rewrite that the wire format cannot express (e.g. a value over a u16 length).
    #[error("cannot encode {what}: {reason}")]
    Unencodable {
        what: &'static str,
        reason: &'static str,
    },
}

impl CodecError {
    /// True when the input was refused for its size rather than its shape (`too-large` in the
    /// error table, as opposed to `bad-request`).
    pub fn is_too_large(&self) -> bool {
        matches!(self, CodecError::TooLarge { .. })
    }

    pub(crate) fn malformed(what: &'static str, offset: usize, reason: &'static str) -> Self {
        CodecError::Malformed {
            what,
            offset,
            reason,
        }
    }
}
