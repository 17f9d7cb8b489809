//! `fnmesh run`: not wired yet.
use std::process::ExitCode;

pub fn main(_config: crate::config::Config, _json: bool) -> ExitCode {
    eprintln!("fnmesh: run is not implemented yet");
    ExitCode::from(1)
}
