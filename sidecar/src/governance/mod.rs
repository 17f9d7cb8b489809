//! Governance: what a call must pass and how its outcome counts, one mechanism for every
//! protocol. Front ends (`thrift`, `grpc`) call it; it calls the instances layer.
//!
//! - `function`: a function's pool and policy, and admission (method check, rate limit, breaker,
//!   deadline, retry state);
//! - `retry`: the attempt state machine and the retry budget;
//! - `outcome`: which errors and replies are failures, how an attempt failed, the breaker verdict;
//! - `breaker`, `limit`: circuit breakers and rate limiters;
//! - `services`: the services egress calls reach through the registry.

pub mod breaker;
pub mod function;
pub mod limit;
pub mod outcome;
pub mod retry;
pub mod services;

pub use function::{Admitted, Function, Policy, Route};
pub use services::Services;
