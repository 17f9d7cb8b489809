//! fnmesh, the function mesh sidecar: configuration, the Thrift listener and proxy, function
//! instances and their scaling, the admin API. The binary (`main.rs`) only parses the command line.
#![forbid(unsafe_code)]

pub mod admin;
pub mod cli;
pub mod config;
pub mod error;
pub mod pool;
pub mod run;
pub mod runtime;
pub mod thrift;
pub mod watchdog;
