//! The `fnmesh` binary, built inside the test crate so end-to-end tests can run it as a process
//! (`CARGO_BIN_EXE_fnmesh-under-test`): the same code as `sidecar/src/main.rs`.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    fnmesh::cli::main()
}
