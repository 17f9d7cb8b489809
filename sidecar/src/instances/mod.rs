//! Function instances: each function's pool and scaler, the instances it runs and the idle
//! connections front ends keep to them, the process runtime that starts and stops instances, and
//! the watchdog that stops them if the sidecar dies.

pub mod endpoint;
pub mod instance;
mod owner;
pub mod pool;
pub mod process;
pub mod watchdog;

pub use endpoint::{Endpoint, Stream};
pub use instance::Instance;
pub use pool::{is_local, Lease, Pool, EXIT_GRACE};
