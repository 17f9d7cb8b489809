//! The example echo function's handler: a plain Volo `EchoService` that knows nothing of fnmesh.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use pilota::FastStr;
use volo_thrift::{MaybeException, ServerError};

use crate::gen::volo_gen::echo::{
    EchoRequest, EchoResponse, EchoService, EchoServiceEchoException,
};

/// Echo calls this process has received (the `__count__` hook reads it).
static CALLS: AtomicU64 = AtomicU64::new(0);

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
        // Introspection hook for tests: how many echo calls came before this one.
        let earlier = CALLS.fetch_add(1, Ordering::SeqCst);
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
