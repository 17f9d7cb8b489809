//! The example echo function's handler: a plain Volo `EchoService` that knows nothing of fnmesh.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use pilota::FastStr;
use volo_thrift::{MaybeException, ServerError};

use crate::gen::volo_gen::{
    base::FunctionError,
    echo::{EchoRequest, EchoResponse, EchoService, EchoServiceEchoException},
};
use pilota::thrift::ApplicationExceptionKind;

/// Echo calls this process has received (the `__count__` hook reads it).
static CALLS: AtomicU64 = AtomicU64::new(0);

/// The RPC timeout (TTHeader key 12, in ms; 0 when absent) of the latest request this process
/// received, recorded by [`SeenTimeout`] (the `__timeout__` hook reads it).
static SEEN_TIMEOUT_MS: AtomicU64 = AtomicU64::new(0);

/// A Volo layer that records each request's RPC timeout, as the server decoded it.
#[derive(Clone, Copy, Default)]
pub struct SeenTimeout;

impl<S> volo::Layer<S> for SeenTimeout {
    type Service = SeenTimeoutService<S>;
    fn layer(self, inner: S) -> Self::Service {
        SeenTimeoutService(inner)
    }
}

#[derive(Clone)]
pub struct SeenTimeoutService<S>(S);

impl<S, Req> volo::Service<volo_thrift::context::ServerContext, Req> for SeenTimeoutService<S>
where
    S: volo::Service<volo_thrift::context::ServerContext, Req> + Send + Sync,
    Req: Send,
{
    type Response = S::Response;
    type Error = S::Error;

    async fn call(
        &self,
        cx: &mut volo_thrift::context::ServerContext,
        req: Req,
    ) -> Result<Self::Response, Self::Error> {
        use volo::context::Context;
        let ms = cx
            .rpc_info()
            .config()
            .rpc_timeout()
            .map_or(0, |d| d.as_millis() as u64);
        SEEN_TIMEOUT_MS.store(ms, Ordering::SeqCst);
        self.0.call(cx, req).await
    }
}

/// Replies with the request's message and the instance it ran on (`FNMESH_INSTANCE`), after
/// sleeping `sleep_ms` if asked.
#[derive(Clone, Default)]
pub struct EchoHandler {
    pub instance: Option<FastStr>,
}

impl EchoHandler {
    pub fn from_env() -> Self {
        EchoHandler {
            instance: std::env::var("FNMESH_INSTANCE").ok().map(FastStr::from),
        }
    }
}

impl EchoService for EchoHandler {
    async fn echo(
        &self,
        req: EchoRequest,
    ) -> Result<MaybeException<EchoResponse, EchoServiceEchoException>, ServerError> {
        // Fault hook for tests: the process dies mid-call, as a crashing function would.
        if req.message == "__crash__" {
            std::process::exit(3);
        }
        // Fault hook for tests: only instance N dies mid-call (`__crash_on__ N`); elsewhere it
        // is an ordinary (counted) echo.
        if let Some(n) = req.message.strip_prefix("__crash_on__ ") {
            if self.instance.as_deref() == Some(n) {
                std::process::exit(3);
            }
        }
        // Introspection hook for tests: how many echo calls came before this one.
        let earlier = CALLS.fetch_add(1, Ordering::SeqCst);
        // Fault hooks for tests: a TApplicationException INTERNAL_ERROR (a failure), or the
        // IDL's declared exception (a business outcome).
        if req.message == "__fail__" {
            return Err(ServerError::Application(
                pilota::thrift::ApplicationException::new(
                    ApplicationExceptionKind::INTERNAL_ERROR,
                    "the function failed (__fail__)",
                ),
            ));
        }
        // The same, only on instance N (`__fail_on__ N`): one sick instance among healthy ones.
        if let Some(n) = req.message.strip_prefix("__fail_on__ ") {
            if self.instance.as_deref() == Some(n) {
                return Err(ServerError::Application(
                    pilota::thrift::ApplicationException::new(
                        ApplicationExceptionKind::INTERNAL_ERROR,
                        format!("instance {n} failed (__fail_on__)"),
                    ),
                ));
            }
        }
        if req.message == "__business__" {
            return Ok(MaybeException::Exception(EchoServiceEchoException::Err(
                FunctionError {
                    code: 42,
                    reason: "declared business error".into(),
                },
            )));
        }
        // Introspection hook for tests: the RPC timeout this call arrived with (ms, 0 if none).
        if req.message == "__timeout__" {
            return Ok(MaybeException::Ok(EchoResponse {
                message: SEEN_TIMEOUT_MS.load(Ordering::SeqCst).to_string().into(),
                instance: self.instance.clone(),
            }));
        }
        // Queue hooks for tests: `__meta__ NAME` answers the transient metainfo NAME the call
        // carried (TTHeader `RPC_TRANSIT_NAME`); `__fail_below__ N` fails while the call's
        // `fnmesh-delivery` is below N, then answers `delivery D`.
        let transient = |name: &str| {
            use metainfo::Forward;
            metainfo::METAINFO
                .try_with(|m| {
                    let m = m.borrow();
                    m.get_upstream(name).or_else(|| m.get_transient(name))
                })
                .ok()
                .flatten()
                .unwrap_or_default()
        };
        if let Some(name) = req.message.strip_prefix("__meta__ ") {
            return Ok(MaybeException::Ok(EchoResponse {
                message: transient(name),
                instance: self.instance.clone(),
            }));
        }
        if let Some(n) = req.message.strip_prefix("__fail_below__ ") {
            let delivery: u32 = transient("fnmesh-delivery").parse().unwrap_or(0);
            if delivery < n.parse().unwrap_or(0) {
                return Err(ServerError::Application(
                    pilota::thrift::ApplicationException::new(
                        ApplicationExceptionKind::INTERNAL_ERROR,
                        format!("failing delivery {delivery} (__fail_below__ {n})"),
                    ),
                ));
            }
            return Ok(MaybeException::Ok(EchoResponse {
                message: format!("delivery {delivery}").into(),
                instance: self.instance.clone(),
            }));
        }
        // Introspection hook for tests: the trace context this call arrived with (Kitex/Volo
        // metainfo's transient `traceparent`, sent as TTHeader `RPC_TRANSIT_traceparent`).
        if req.message == "__traceparent__" {
            use metainfo::Forward;
            let seen = metainfo::METAINFO
                .try_with(|m| {
                    let m = m.borrow();
                    m.get_upstream("traceparent")
                        .or_else(|| m.get_transient("traceparent"))
                })
                .ok()
                .flatten()
                .unwrap_or_default();
            return Ok(MaybeException::Ok(EchoResponse {
                message: seen,
                instance: self.instance.clone(),
            }));
        }
        // Egress hook for tests: `__egress__ thrift NAME` / `__egress__ grpc NAME` calls
        // service NAME through the sidecar's egress (FNMESH_EGRESS), passing on what is left
        // of this call's own deadline, as a Volo function forwarding its deadline would; the
        // answer is `in=MS last=WHAT` (this call's RPC timeout in ms, and the deadline the
        // last hop saw: its RPC timeout in ms, or its `grpc-timeout`).
        if let Some(rest) = req.message.strip_prefix("__egress__ ") {
            let inbound = SEEN_TIMEOUT_MS.load(Ordering::SeqCst);
            let message = match egress_call(rest, inbound).await {
                Ok((last, via)) => format!("in={inbound} last={last} via={via}"),
                Err(e) => format!("egress failed: {e}"),
            };
            return Ok(MaybeException::Ok(EchoResponse {
                message: message.into(),
                instance: self.instance.clone(),
            }));
        }
        if req.message == "__count__" {
            return Ok(MaybeException::Ok(EchoResponse {
                message: earlier.to_string().into(),
                instance: self.instance.clone(),
            }));
        }
        if let Some(ms) = req.sleep_ms.filter(|ms| *ms > 0) {
            tokio::time::sleep(Duration::from_millis(ms as u64)).await;
        }
        Ok(MaybeException::Ok(EchoResponse {
            message: req.message,
            instance: self.instance.clone(),
        }))
    }

    async fn ping(&self, _note: FastStr) -> Result<(), ServerError> {
        Ok(())
    }
}

/// One call through FNMESH_EGRESS (`kind` `thrift` or `grpc`, then the service's name) with
/// `timeout_ms` as its deadline: the deadline the last hop saw, and the instance that answered.
async fn egress_call(what: &str, timeout_ms: u64) -> Result<(String, String), String> {
    let (kind, name) = what.split_once(' ').ok_or("usage: __egress__ KIND NAME")?;
    let egress: std::net::SocketAddr = std::env::var("FNMESH_EGRESS")
        .map_err(|_| "FNMESH_EGRESS is not set".to_owned())?
        .parse()
        .map_err(|e| format!("FNMESH_EGRESS: {e}"))?;
    let timeout = Some(Duration::from_millis(timeout_ms.max(1)));
    match kind {
        "thrift" => {
            let client = crate::gen::volo_gen::echo::EchoServiceClientBuilder::new(name)
                .address(egress)
                .rpc_timeout(timeout)
                .build();
            let req = EchoRequest {
                message: "__timeout__".into(),
                sleep_ms: None,
                meta: None,
            };
            match client.echo(req).await.map_err(|e| e.to_string())? {
                MaybeException::Ok(r) => Ok((
                    r.message.to_string(),
                    r.instance.map(|i| i.to_string()).unwrap_or_default(),
                )),
                MaybeException::Exception(e) => Err(format!("{e:?}")),
            }
        }
        "grpc" => {
            let client = crate::proto::proto_gen::echo::EchoClientBuilder::new(name)
                .address(egress)
                .rpc_timeout(timeout)
                .build();
            let req = crate::proto::proto_gen::echo::EchoRequest {
                message: "through egress".into(),
                sleep_ms: 0,
            };
            let reply = client.unary_echo(req).await.map_err(|e| e.to_string())?;
            let seen = reply.metadata().get("x-grpc-timeout");
            let seen = seen
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .to_owned();
            Ok((seen, reply.into_inner().instance.to_string()))
        }
        other => Err(format!("unknown kind {other}")),
    }
}

/// An `EchoService` call as a binary Thrift message, as fnmesh's raw tests and benchmarks send
/// it: `method` (seqid 9) whose `EchoRequest` carries `text` as its message.
pub fn raw_message(method: &str, text: &str) -> bytes::BytesMut {
    use bytes::BufMut;
    let mut m = bytes::BytesMut::new();
    fnmesh_codec::MessageHeader::encode(
        &mut m,
        fnmesh_codec::Protocol::Binary,
        true,
        fnmesh_codec::MessageType::Call,
        method,
        9,
    );
    // Field 1 (the request struct) holding field 1 (a string).
    m.put_slice(&[0x0c, 0, 1, 0x0b, 0, 1]);
    m.put_u32(text.len() as u32);
    m.put_slice(text.as_bytes());
    m.put_slice(&[0, 0]);
    m
}

/// That call in TTHeader, as a Volo client frames it: ToService, method and `isn`.
pub fn raw_ttheader_call(to_service: &str, isn: &str, method: &str, text: &str) -> Vec<u8> {
    use bytes::BufMut;
    let m = raw_message(method, text);
    let b = fnmesh_codec::TTHeaderBuilder {
        seqid: 9,
        str_kvs: vec![(b"isn", isn.as_bytes())],
        int_kvs: vec![(6, to_service.as_bytes()), (9, method.as_bytes())],
        inner_framed: true,
        ..Default::default()
    };
    let mut out = bytes::BytesMut::new();
    b.encode(&mut out, m.len()).unwrap();
    out.put_slice(&m);
    out.to_vec()
}

/// Fault hook for tests (`ECHO_FN_CLOSE_HOOK=1`): the echo server sits behind a byte-copying
/// front in the same process, which closes a caller's connection, without a reply, on a request
/// that carries `__close__`: a live function that drops a connection (its process, and every
/// other connection, go on). A request that carries `__exception__` gets a TApplicationException
/// (PROTOCOL_ERROR) from the front, which then reads nothing more and closes the connection
/// 20 ms later: a Volo server refusing a request it cannot decode, on a loaded machine.
pub async fn closing_front(outer: tokio::net::TcpListener, inner: std::net::SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    while let Ok((caller, _)) = outer.accept().await {
        tokio::spawn(async move {
            let Ok(server) = tokio::net::TcpStream::connect(inner).await else {
                return;
            };
            let (mut from_caller, mut to_caller) = caller.into_split();
            let (mut from_server, mut to_server) = server.into_split();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let mut stop = Some(stop);
            let mut replies = tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::io::copy(&mut from_server, &mut to_caller) => {}
                    _ = stopped => {}
                }
                to_caller
            });
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = match from_caller.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if buf[..n].windows(9).any(|w| w == b"__close__") {
                    break;
                }
                if buf[..n].windows(13).any(|w| w == b"__exception__") {
                    let _ = stop.take().map(|s| s.send(()));
                    if let Ok(mut to_caller) = (&mut replies).await {
                        refuse(&buf[..n], &mut to_caller).await;
                    }
                    break;
                }
                if to_server.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            replies.abort();
        });
    }
}

/// Answers the request in `bytes` with a PROTOCOL_ERROR exception, then closes 20 ms later.
async fn refuse(bytes: &[u8], to_caller: &mut tokio::net::tcp::OwnedWriteHalf) {
    use tokio::io::AsyncWriteExt;
    let mut buf = bytes::BytesMut::from(bytes);
    let decoded = fnmesh_codec::FrameDecoder::new(fnmesh_codec::Limits::default()).decode(&mut buf);
    if let Ok(Some(request)) = decoded {
        let target = fnmesh_codec::ReplyTarget::of(&request);
        let ty = fnmesh_codec::ExceptionType::ProtocolError;
        if let Ok(reply) = fnmesh_codec::encode_exception(&target, ty, "cannot decode", None) {
            let _ = to_caller.write_all(&reply).await;
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
}

/// The Unix socket at $FNMESH_SOCKET, when fnmesh runs the function with `transport = "unix"`.
pub fn unix_listener(who: &str) -> Option<tokio::net::UnixListener> {
    let path = std::env::var_os("FNMESH_SOCKET")?;
    let listener = tokio::net::UnixListener::bind(&path).unwrap_or_else(|e| {
        panic!(
            "{who}: cannot listen on {}: {e}",
            std::path::Path::new(&path).display()
        )
    });
    Some(listener)
}
