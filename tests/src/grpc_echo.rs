//! The example gRPC function's handler: a plain volo-grpc `echo.Echo` server that knows nothing
//! of fnmesh, with one method of each streaming kind and a few fault hooks for tests.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use pilota::FastStr;
use volo_grpc::{BoxStream, Code, RecvStream, Request, Response, Status};

use crate::proto::proto_gen::echo::{Echo, EchoRequest, EchoResponse};

/// Server streams this process stopped sending because the caller went away (the
/// `__cancelled__` hook reads it).
static CANCELLED: AtomicU64 = AtomicU64::new(0);

/// UnaryEcho calls this process has received (the `__count__` hook reads it).
static UNARY: AtomicU64 = AtomicU64::new(0);

/// Counts a server stream as cancelled if it is dropped before its end.
struct Unfinished(bool);

impl Drop for Unfinished {
    fn drop(&mut self) {
        if !self.0 {
            CANCELLED.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Replies with the request's message(s) and the instance it ran on (`FNMESH_INSTANCE`). Hooks:
/// `sleep_ms` sleeps first; message `__crash__` exits the process; `__status__ N text` answers
/// gRPC status N with message `text`; `__cancelled__` answers how many server streams were
/// cancelled by their callers so far; `__count__` how many UnaryEcho calls came before (not
/// counting itself). `__crash_on__ N`, `__unavailable_on__ N` and `__slow_on__ N` exit, answer
/// UNAVAILABLE, or sleep 2 s when this is instance N, and otherwise reply normally.
/// Server streaming: `__bulk__ N` sends N messages of 1 MiB.
/// Request metadata `x-echo` comes back as response
/// metadata `x-echo`, the request's `grpc-timeout` as `x-grpc-timeout` and its `traceparent` as
/// `x-traceparent`.
#[derive(Clone, Default)]
pub struct GrpcEcho {
    pub instance: FastStr,
}

impl GrpcEcho {
    pub fn from_env() -> Self {
        GrpcEcho {
            instance: std::env::var("FNMESH_INSTANCE").unwrap_or_default().into(),
        }
    }

    async fn reply(&self, req: EchoRequest) -> Result<EchoResponse, Status> {
        if req.message == "__crash__" {
            std::process::exit(3);
        }
        let on_this = |hook: &str| {
            req.message
                .strip_prefix(hook)
                .is_some_and(|n| n == self.instance.as_str())
        };
        if on_this("__crash_on__ ") {
            std::process::exit(3);
        }
        if on_this("__unavailable_on__ ") {
            return Err(Status::new(Code::Unavailable, "unavailable on purpose"));
        }
        if on_this("__slow_on__ ") {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        if req.message == "__count__" {
            return Ok(EchoResponse {
                message: UNARY.load(Ordering::SeqCst).to_string().into(),
                instance: self.instance.clone(),
            });
        }
        if req.message == "__cancelled__" {
            return Ok(EchoResponse {
                message: CANCELLED.load(Ordering::SeqCst).to_string().into(),
                instance: self.instance.clone(),
            });
        }
        if let Some(rest) = req.message.strip_prefix("__status__ ") {
            let (code, text) = rest.split_once(' ').unwrap_or((rest, ""));
            let code = Code::from(code.parse::<i32>().unwrap_or(2));
            return Err(Status::new(code, text.to_owned()));
        }
        if req.sleep_ms > 0 {
            tokio::time::sleep(Duration::from_millis(req.sleep_ms as u64)).await;
        }
        Ok(EchoResponse {
            message: req.message,
            instance: self.instance.clone(),
        })
    }
}

fn with_echoed_metadata<T, U>(req: &Request<T>, message: U) -> Response<U> {
    let mut resp = Response::new(message);
    if let Some(v) = req.metadata().get("x-echo") {
        resp.metadata_mut().insert("x-echo", v.clone());
    }
    // The deadline this instance was given, and its trace context, for tests to read.
    if let Some(v) = req.metadata().get("grpc-timeout") {
        resp.metadata_mut().insert("x-grpc-timeout", v.clone());
    }
    if let Some(v) = req.metadata().get("traceparent") {
        resp.metadata_mut().insert("x-traceparent", v.clone());
    }
    resp
}

impl Echo for GrpcEcho {
    async fn unary_echo(
        &self,
        req: Request<EchoRequest>,
    ) -> Result<Response<EchoResponse>, Status> {
        if req.get_ref().message != "__count__" {
            UNARY.fetch_add(1, Ordering::SeqCst);
        }
        let reply = self.reply(req.get_ref().clone()).await?;
        Ok(with_echoed_metadata(&req, reply))
    }

    /// Three replies: `message #0`, `#1`, `#2`, each after `sleep_ms`.
    async fn server_streaming_echo(
        &self,
        req: Request<EchoRequest>,
    ) -> Result<Response<BoxStream<'static, Result<EchoResponse, Status>>>, Status> {
        let first = req.get_ref().clone();
        let this = self.clone();
        let bulk: Option<usize> = first
            .message
            .strip_prefix("__bulk__ ")
            .and_then(|n| n.parse().ok());
        let stream = async_stream::stream! {
            let mut unfinished = Unfinished(false);
            if let Some(n) = bulk {
                let mib: FastStr = "x".repeat(1 << 20).into();
                for _ in 0..n {
                    yield Ok(EchoResponse { message: mib.clone(), instance: this.instance.clone() });
                }
            } else {
                for i in 0..3 {
                    let mut r = first.clone();
                    r.message = format!("{} #{i}", first.message).into();
                    yield this.reply(r).await;
                }
            }
            unfinished.0 = true;
        };
        Ok(with_echoed_metadata(
            &req,
            Box::pin(stream) as BoxStream<'static, _>,
        ))
    }

    /// One reply: the messages received (one over 1 KiB as `<N bytes>`), joined with `,`; each
    /// is read after the previous one's `sleep_ms`.
    async fn client_streaming_echo(
        &self,
        req: Request<RecvStream<EchoRequest>>,
    ) -> Result<Response<EchoResponse>, Status> {
        use futures_util::StreamExt;
        let mut metadata_source = Request::new(());
        if let Some(v) = req.metadata().get("x-echo") {
            metadata_source.metadata_mut().insert("x-echo", v.clone());
        }
        let mut stream = req.into_inner();
        let mut all = Vec::new();
        while let Some(m) = stream.next().await {
            let m = m?;
            // A large message is told by its size, so that a reply to many stays small.
            let size = m.message.len();
            let reply = self.reply(m).await?.message.to_string();
            all.push(if size > 1024 {
                format!("<{size} bytes>")
            } else {
                reply
            });
        }
        Ok(with_echoed_metadata(
            &metadata_source,
            EchoResponse {
                message: all.join(",").into(),
                instance: self.instance.clone(),
            },
        ))
    }

    /// Each message echoed as it arrives.
    async fn bidirectional_streaming_echo(
        &self,
        req: Request<RecvStream<EchoRequest>>,
    ) -> Result<Response<BoxStream<'static, Result<EchoResponse, Status>>>, Status> {
        use futures_util::StreamExt;
        let mut metadata_source = Request::new(());
        if let Some(v) = req.metadata().get("x-echo") {
            metadata_source.metadata_mut().insert("x-echo", v.clone());
        }
        let mut incoming = req.into_inner();
        let this = self.clone();
        let stream = async_stream::stream! {
            while let Some(m) = incoming.next().await {
                match m {
                    Ok(m) => yield this.reply(m).await,
                    Err(e) => { yield Err(e); break; }
                }
            }
        };
        Ok(with_echoed_metadata(
            &metadata_source,
            Box::pin(stream) as BoxStream<'static, _>,
        ))
    }
}
