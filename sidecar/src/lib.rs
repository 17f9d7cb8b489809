//! fnmesh, the function mesh sidecar: configuration, the Thrift listener and proxy, function
//! instances and their scaling. The binary (`main.rs`) only parses the command line.
#![forbid(unsafe_code)]

pub mod config;
pub mod run;
