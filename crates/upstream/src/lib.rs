//! Upstream clusters for meshgate: endpoint sets with weights and labels, label
//! subsets, the load balancers (round-robin, least-request, random, ring-hash), hash
//! keys, the retry policy, the circuit breaker and endpoint health. These are plain
//! data structures driven by the caller: sockets, timers and the HTTP client live in
//! the proxy, so every decision here is table-testable.

mod balancer;
mod breaker;
mod cluster;
mod health;
mod retry;

pub use balancer::{HashOn, LbPolicy, stable_hash};
pub use breaker::{Breaker, BreakerConfig, BreakerState, Refusal, Ticket};
pub use cluster::{
    Cluster, DEFAULT_PANIC_THRESHOLD, Endpoint, EndpointSet, InFlight, Picked, Selector,
};
pub use health::{
    CheckCounter, Ejection, EndpointState, Health, HealthCheckConfig, HealthView, Observed,
    OutlierConfig, Probe,
};
pub use retry::{Backoff, BudgetConfig, RetryBudget, RetryOn, RetryPolicy, TryOutcome};
