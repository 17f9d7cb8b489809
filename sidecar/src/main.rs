//! `fnmesh`: the function mesh sidecar.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    fnmesh::cli::main()
}
