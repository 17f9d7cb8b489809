//! A plain Volo server of the `Types` service (idl/tests/thrift/types.thrift) on 127.0.0.1:$PORT:
//! `Roundtrip` answers the struct it got, so the JSON codec's round trips go through a real Volo
//! decoder and encoder; `Roundtrip` of a struct whose `s` is `"oops"` throws the declared
//! exception with `i32v` as its code.
#![forbid(unsafe_code)]

use fnmesh_tests::gen::volo_gen::types::{All, Oops, Types, TypesRoundtripException, TypesServer};
use volo::net::incoming::DefaultIncoming;
use volo_thrift::{MaybeException, ServerError};

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

    async fn two(&self, a: i32, b: pilota::FastStr) -> Result<i64, ServerError> {
        Ok(i64::from(a) + b.len() as i64)
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
    let server = TypesServer::new(Handler).run(DefaultIncoming::from(listener));
    if let Err(e) = server.await {
        eprintln!("types-fn: {e}");
        std::process::exit(1);
    }
}
