//! The Thrift front end: connections are decoded (headers only, `conn`), each call is routed
//! and admitted (`route`), forwarded to an instance as received and its reply returned byte for
//! byte (`forward`). Errors become Thrift replies in one place, [`rescue`].

mod conn;
mod forward;
pub mod http;
pub mod json_call;
mod route;

use bytes::{buf::Chain, Buf, Bytes};
use fnmesh_codec::{encode_exception, Limits, ReplyTarget};

pub use conn::serve;

use std::sync::Arc;

use crate::{
    config::ConnectionLimits,
    drain::Drain,
    error::CallError,
    governance::{Route, Services},
};

/// A reply on its way to the caller: at most two pieces (a rewritten head and the rest), written
/// with one vectored write.
type Reply = Chain<Bytes, Bytes>;

/// What every Thrift connection shares.
pub struct ThriftFront {
    /// The Thrift functions; a reload swaps the table.
    pub functions: arc_swap::ArcSwap<Vec<Route>>,
    pub limits: Limits,
    /// How long a started frame may take, and an idle connection may stay.
    pub connections: ConnectionLimits,
    /// The sidecar's drain, which waits for calls between decode and reply.
    pub drain: Drain,
    /// On the egress listener: the services in the registry, for calls no function here
    /// serves.
    pub services: Option<Arc<Services>>,
}

/// The one place errors become Thrift replies (docs/design.md's table): an EXCEPTION message in the
/// request's transport, TTHeader key `fnmesh-error` = the kind.
fn rescue(target: &ReplyTarget<'_>, e: &CallError) -> Reply {
    let text = e.to_string();
    let bytes = encode_exception(
        target,
        e.kind.thrift_exception(),
        &text,
        Some(e.kind.as_str()),
    )
    .unwrap_or_default();
    bytes.chain(Bytes::new())
}

/// A reply with nothing in it: the place an out-of-order reply held, or no reply at all.
fn empty() -> Reply {
    Bytes::new().chain(Bytes::new())
}
