//! A function as governance sees it: the pool of its instances, the policy its calls follow, and
//! the state that policy keeps (rate limiters, breakers, the retry budget). Admission, the one
//! gate every protocol's calls pass before they may queue, lives here.

use std::{sync::Arc, time::Duration};

use tokio::time::{sleep, Instant};

use super::{
    breaker::Breakers, limit::RateLimits, outcome::Verdict, retry::Attempts, retry::Budget,
};
use crate::{
    config::{FunctionConfig, Protocol},
    error::{CallError, Kind},
    instances::pool::Pool,
    metrics::{CallMetrics, MethodTable, Outcome},
};

/// A routing table's entry: a function and the IDL service callers name it by.
pub struct Route {
    pub function: Arc<Function>,
    pub service: Option<String>,
}

/// What a function's calls follow: its configuration and the state its policy keeps. A reload
/// swaps it whole; a call keeps the one it was admitted with.
pub struct Policy {
    pub function: Arc<FunctionConfig>,
    /// The function's rate limits, checked before a call queues or touches an instance.
    pub limits: Arc<RateLimits>,
    /// The function's circuit breakers (per method), gated on the request path, moved by a task.
    pub breakers: Arc<Breakers>,
    /// Each method's metrics handles.
    pub metrics: Arc<MethodTable>,
}

impl Policy {
    fn new(function: Arc<FunctionConfig>) -> Policy {
        Policy {
            limits: Arc::new(RateLimits::new(&function)),
            breakers: Arc::new(Breakers::new(&function)),
            metrics: Arc::new(method_table(&function)),
            function,
        }
    }

    /// `function`'s policy after a reload: the rate limiters and breakers (and their state) carry
    /// over when nothing they depend on changed.
    fn next(&self, function: Arc<FunctionConfig>) -> Policy {
        let (a, b) = (&*self.function, &*function);
        let names = |f: &FunctionConfig| {
            f.methods
                .as_ref()
                .map(|ms| ms.iter().map(|m| m.name.clone()).collect::<Vec<_>>())
        };
        if a.policy == b.policy && a.methods_policy == b.methods_policy && names(a) == names(b) {
            Policy {
                function,
                limits: self.limits.clone(),
                breakers: self.breakers.clone(),
                metrics: self.metrics.clone(),
            }
        } else {
            Policy::new(function)
        }
    }
}

/// One function: its instances and its policy.
pub struct Function {
    /// The function's name: fixed for its life.
    pub name: String,
    pub pool: Arc<Pool>,
    policy: arc_swap::ArcSwap<Policy>,
    /// Limits the function's retries to a fifth of its calls (plus a floor).
    pub retry_budget: Budget,
    /// The control runtime, where the breakers' task runs whichever thread reloads.
    control: tokio::runtime::Handle,
    /// The other fnmesh nodes serving this function, as the registry lists them (set once,
    /// with a registry): a call that finds no ready instance here goes to one with a ready
    /// instance before this node starts its own.
    pub peers: std::sync::OnceLock<Arc<Pool>>,
}

/// A call its function admitted: its budget (the policy's timeout capped by the caller's) and
/// deadline, the verdict it leaves in its method's breaker, whether replies must be read for
/// failures, and its retry state when the method's policy retries.
pub struct Admitted {
    pub budget: Option<Duration>,
    pub deadline: Option<Instant>,
    pub verdict: Verdict,
    /// Replies are read for failures when the function has breakers (also for instance
    /// ejection).
    pub classify: bool,
    pub retry: Option<Attempts>,
}

impl Function {
    /// A function serving calls with `pool`'s instances; call it inside the control runtime
    /// (its breakers are moved by a task there).
    pub fn new(config: Arc<FunctionConfig>, pool: Arc<Pool>) -> Arc<Function> {
        let function = Arc::new(Function {
            name: config.name.clone(),
            pool,
            retry_budget: Budget::of(&config.name),
            policy: arc_swap::ArcSwap::from_pointee(Policy::new(config)),
            control: tokio::runtime::Handle::current(),
            peers: std::sync::OnceLock::new(),
        });
        function.tick_breakers();
        function
    }

    /// Before a call goes to a peer: when this node's calls in flight on its peers fill one
    /// of its own instances (`concurrency`), it starts one, so that a node with steady load
    /// serves it itself rather than adding a hop to each call.
    pub fn peer_load_check(&self, peers: &Pool) {
        if peers.snapshot().in_flight >= self.policy().function.scale.concurrency {
            self.pool.start_one();
        }
    }

    /// What calls of this function follow now.
    pub fn policy(&self) -> arc_swap::Guard<Arc<Policy>> {
        self.policy.load()
    }

    /// The function's configuration now.
    pub fn config(&self) -> Arc<FunctionConfig> {
        self.policy.load().function.clone()
    }

    /// Applies a reloaded configuration of this function (same command, environment and
    /// protocol) to the calls that follow: calls in flight keep what they were admitted with,
    /// and instances keep running.
    pub fn reconfigure(self: &Arc<Function>, config: Arc<FunctionConfig>) {
        let old = self.policy.load_full();
        let next = old.next(config.clone());
        let new_breakers = !Arc::ptr_eq(&old.breakers, &next.breakers);
        self.policy.store(Arc::new(next));
        if new_breakers {
            self.tick_breakers();
        }
        self.pool.reconfigure(config);
    }

    /// The method check, rate limits and breaker a call passes before it may queue; `caller`
    /// is the caller's own timeout (TTHeader RPCTimeout, `grpc-timeout`), and the shorter of it
    /// and the policy's bounds the call, queueing included. `oneway` is what the call's message
    /// says it is (Thrift), which must be what the IDL declares: the IDL decides whether a reply
    /// comes. Only an idempotent method whose request is kept whole (not client streaming) may
    /// be sent again once an instance got it.
    #[inline]
    pub fn admit(
        &self,
        method: &str,
        caller: Option<Duration>,
        oneway: Option<bool>,
        parent: Option<&crate::trace::Parent>,
    ) -> Result<Admitted, CallError> {
        let arrived = crate::metrics::now_ns();
        let policy = self.policy.load();
        let f = &policy.function;
        let (declared, calls) = match &f.methods {
            None => (None, policy.metrics.undeclared(method)),
            Some(methods) => match methods.iter().position(|m| m.name == method) {
                Some(i) => (Some(&methods[i]), policy.metrics.declared(i)),
                None => {
                    let e = CallError::new(
                        Kind::NoRoute,
                        format!("function {} has no method {method}", f.name),
                    );
                    return Err(refused(policy.metrics.unknown(), arrived, e));
                }
            },
        };
        if let (Some(m), Some(oneway)) = (declared, oneway) {
            if m.oneway != oneway {
                return Err(refused(calls, arrived, mistyped(&f.name, method, m.oneway)));
            }
        }
        if let Err(e) = policy.limits.admit(&f.name, method) {
            crate::metrics::global().rate_limited(&f.name, calls.method());
            return Err(refused(calls, arrived, e));
        }
        let breaker = policy
            .breakers
            .admit(&f.name, method)
            .map_err(|e| refused(calls, arrived, e))?;
        let method_policy = f.policy_for(method);
        let budget = match (method_policy.timeout, caller) {
            (Some(p), Some(c)) => Some(p.min(c)),
            (p, c) => p.or(c),
        };
        let deadline = budget.map(|b| Instant::now() + b);
        let retry = method_policy.retry.and_then(|policy| {
            let idempotent = method_policy.idempotent.unwrap_or(false)
                && !declared.is_some_and(|m| m.client_streaming);
            Attempts::start(Some(policy), idempotent, &self.retry_budget)
        });
        let span = match crate::trace::enabled() {
            false => None,
            true => traced(parent, calls),
        };
        Ok(Admitted {
            classify: !policy.breakers.is_empty(),
            verdict: Verdict::new(breaker, calls, arrived, budget, span),
            budget,
            deadline,
            retry,
        })
    }

    /// Moves the current breakers' gates, off the request path, until the function is gone or a
    /// reload replaces them; their changes of state are counted in the metrics.
    fn tick_breakers(self: &Arc<Function>) {
        let breakers = self.policy().breakers.clone();
        let Some(every) = breakers.tick_every() else {
            return;
        };
        let function = Arc::downgrade(self);
        self.control.spawn(async move {
            loop {
                sleep(every).await;
                let Some(function) = function.upgrade() else {
                    return;
                };
                if !Arc::ptr_eq(&function.policy().breakers, &breakers) {
                    return;
                }
                breakers.tick(Instant::now(), &function.name);
            }
        });
    }
}

/// A span for an admitted call (traces are on).
#[cold]
fn traced(
    parent: Option<&crate::trace::Parent>,
    calls: &CallMetrics,
) -> Option<crate::trace::CallSpan> {
    crate::trace::CallSpan::start(parent, calls.function(), calls.method(), calls.protocol())
}

/// Counts a call refused at admission, and gives back its error.
#[cold]
fn refused(calls: &CallMetrics, arrived: u64, e: CallError) -> CallError {
    calls.record(
        Outcome::Error(e.kind),
        crate::metrics::now_ns().saturating_sub(arrived),
    );
    e
}

/// The metrics handles of `function`'s methods.
fn method_table(function: &FunctionConfig) -> MethodTable {
    let protocol = match function.protocol {
        Protocol::Thrift => "thrift",
        Protocol::Grpc => "grpc",
    };
    let declared: Vec<&str> = function
        .methods
        .iter()
        .flatten()
        .map(|m| m.name.as_str())
        .collect();
    // Without an IDL, the function-wide breaker is method "*" and other series follow the
    // names callers use.
    let policies: Vec<(&str, bool, bool, bool)> = match declared.is_empty() {
        true => vec![("*", function.policy.circuit_breaker.is_some(), false, false)],
        false => declared
            .iter()
            .map(|m| {
                let p = function.policy_for(m);
                (
                    *m,
                    p.circuit_breaker.is_some(),
                    p.retry.is_some(),
                    p.rate_limit.is_some(),
                )
            })
            .collect(),
    };
    crate::metrics::global().prepare(&function.name, &policies);
    MethodTable::new(&function.name, protocol, &declared)
}

/// A call whose message type is not the one its IDL declares: `bad-request`.
fn mistyped(function: &str, method: &str, declared_oneway: bool) -> CallError {
    let (declared, sent) = match declared_oneway {
        true => ("oneway", "CALL"),
        false => ("two-way", "ONEWAY"),
    };
    CallError::new(
        Kind::BadRequest,
        format!("function {function} method {method} is {declared} in the IDL; a {sent} message cannot call it"),
    )
}
