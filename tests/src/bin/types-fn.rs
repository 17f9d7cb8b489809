//! A plain Volo server of the `Types` service (idl/tests/thrift/types.thrift) on 127.0.0.1:$PORT:
//! `Roundtrip` answers the struct it got, so the JSON codec's round trips go through a real Volo
//! decoder and encoder; `Roundtrip` of a struct whose `s` is `"oops"` throws the declared
//! exception with `i32v` as its code. `Raw(data)` answers `len(data)`. `Two(a, b)` answers
//! `a + len(b)`, plus 1,000,000 when
//! the call came in the Compact protocol (so tests see which protocol reached the function).
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};

use fnmesh_tests::gen::volo_gen::types::{All, Oops, Types, TypesRoundtripException, TypesServer};
use volo::net::incoming::DefaultIncoming;
use volo_thrift::{context::ServerContext, MaybeException, ServerError};

/// Whether the latest call came in the Compact protocol (as Volo's codec detected it).
static COMPACT: AtomicBool = AtomicBool::new(false);

/// A Volo layer that records each call's protocol in [`COMPACT`].
#[derive(Clone, Copy)]
struct SeenProtocol;

impl<S> volo::Layer<S> for SeenProtocol {
    type Service = SeenProtocolService<S>;
    fn layer(self, inner: S) -> Self::Service {
        SeenProtocolService(inner)
    }
}

#[derive(Clone)]
struct SeenProtocolService<S>(S);

impl<S, Req> volo::Service<ServerContext, Req> for SeenProtocolService<S>
where
    S: volo::Service<ServerContext, Req> + Send + Sync,
    Req: Send,
{
    type Response = S::Response;
    type Error = S::Error;

    async fn call(&self, cx: &mut ServerContext, req: Req) -> Result<Self::Response, Self::Error> {
        use volo::context::Context;
        use volo_thrift::codec::default::thrift::ProtocolApacheCompact;
        let compact = cx.extensions().contains::<ProtocolApacheCompact>();
        COMPACT.store(compact, Ordering::SeqCst);
        self.0.call(cx, req).await
    }
}

struct Handler;

impl Types for Handler {
    async fn roundtrip(
        &self,
        all: All,
    ) -> Result<MaybeException<All, TypesRoundtripException>, ServerError> {
        if all.s == "oops" {
            return Ok(MaybeException::Exception(TypesRoundtripException::Oops(
                Oops {
                    code: all.i32v,
                    why: Some("asked for".into()),
                },
            )));
        }
        Ok(MaybeException::Ok(all))
    }

    async fn nothing(&self) -> Result<(), ServerError> {
        Ok(())
    }

    async fn raw(&self, data: pilota::Bytes) -> Result<i64, ServerError> {
        Ok(data.len() as i64)
    }

    async fn two(&self, a: i32, b: pilota::FastStr) -> Result<i64, ServerError> {
        let compact = if COMPACT.load(Ordering::SeqCst) {
            1_000_000
        } else {
            0
        };
        Ok(i64::from(a) + b.len() as i64 + compact)
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8085);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("types-fn: cannot listen on 127.0.0.1:{port}: {e}"));
    let server = TypesServer::new(Handler)
        .layer_front(SeenProtocol)
        .run(DefaultIncoming::from(listener));
    if let Err(e) = server.await {
        eprintln!("types-fn: {e}");
        std::process::exit(1);
    }
}
