//! fnmesh, the function mesh sidecar. Its modules are layers, each using only those below it
//! (docs/architecture.md; `tests/layers.rs` checks it):
//!
//! 1. `cli` parses the command line; `server` runs the sidecar (listener, drain, signals);
//!    `status` reads a running sidecar's admin API for `fnmesh status`; `call` makes one
//!    JSON call for `fnmesh call` and prints IDLs for `fnmesh idl`;
//!    `admin` serves the admin API; `mesh` holds the functions and reloads them.
//! 2. Protocol front ends: `thrift` (connections and forwarding) and `grpc` (the HTTP/2 relay).
//! 3. `governance`: routing admission, deadlines, retries and their budget, breakers and outcome
//!    classification, rate limits.
//! 4. `instances`: each function's pool, scaler, process runtime and watchdog; then `access`
//!    (the access log) and `trace` (spans over OTLP).
//! 5. Foundations every layer uses: `drain` (the drain signal and the work it waits for),
//!    `workers` (the worker threads, and the sweep that watches connections for stalls), `unary`
//!    (one gRPC call over HTTP/2, for the calls fnmesh makes itself) and
//!    `metrics` (the Prometheus metrics and their request-path handles), on `config` and
//!    `error` (the error kinds and their protocol mappings).
#![forbid(unsafe_code)]

pub mod access;
pub mod admin;
pub mod call;
pub mod cli;
pub mod config;
pub mod drain;
pub mod error;
pub mod governance;
pub mod grpc;
pub mod instances;
pub mod mesh;
pub mod metrics;
pub mod queue;
pub mod server;
pub mod status;
pub mod thrift;
pub mod trace;
pub mod unary;
pub mod workers;

/// Locks a mutex whose critical sections are a few field updates: a panic inside one leaves the
/// data consistent, so a poisoned lock is used as it is. Never held across an `.await`.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts a repeated event (a refused or failed accept) and says when to log it: at most once a
/// second, with the count so far, so that a flood of them cannot flood the log.
#[derive(Default)]
pub(crate) struct Throttled {
    count: std::cell::Cell<u64>,
    logged: std::cell::Cell<Option<std::time::Instant>>,
}

impl Throttled {
    /// Counts one more; the count so far when it is time to log it.
    pub(crate) fn due(&self) -> Option<u64> {
        self.count.set(self.count.get() + 1);
        let now = std::time::Instant::now();
        let due = self
            .logged
            .get()
            .is_none_or(|at| now >= at + std::time::Duration::from_secs(1));
        due.then(|| {
            self.logged.set(Some(now));
            self.count.get()
        })
    }
}
