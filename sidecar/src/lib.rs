//! fnmesh, the function mesh sidecar: configuration, the Thrift listener and proxy, function
//! instances and their scaling, the admin API. The binary (`main.rs`) only parses the command line.
#![forbid(unsafe_code)]

pub mod admin;
pub mod breaker;
pub mod cli;
pub mod config;
pub mod error;
pub mod grpc;
pub mod limit;
pub mod mesh;
pub mod pool;
pub mod relay;
pub mod retry;
pub mod run;
pub mod runtime;
pub mod thrift;
pub mod watchdog;
pub mod workers;

/// Locks a mutex whose critical sections are a few field updates: a panic inside one leaves the
/// data consistent, so a poisoned lock is used as it is. Never held across an `.await`.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
