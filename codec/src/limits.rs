//! Bounds checked before any allocation or walk, so hostile input costs at most these.

/// Limits applied while decoding. Every length read from the wire is checked against one of these
/// before it is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest whole frame accepted, transport header included (`max_frame_size`).
    pub max_frame_size: usize,
    /// Largest TTHeader header (the part counted by its header-size field), in bytes.
    pub max_header_size: usize,
    /// Longest Thrift message name.
    pub max_name_len: usize,
    /// Deepest struct/container nesting walked in an unframed message.
    pub max_depth: usize,
}

impl Limits {
    /// 16 MiB, the default `max_frame_size` of docs/design.md.
    pub const DEFAULT_MAX_FRAME_SIZE: usize = 16 * 1024 * 1024;
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_size: Self::DEFAULT_MAX_FRAME_SIZE,
            max_header_size: 64 * 1024,
            max_name_len: 4 * 1024,
            max_depth: 64,
        }
    }
}
