//! Generates the Volo Thrift code for the example IDL, so tests run real Volo clients and servers.

fn main() {
    println!("cargo:rerun-if-changed=../idl/thrift");
    volo_build::Builder::thrift()
        .add_service("../idl/thrift/echo.thrift")
        .include_dirs(vec!["../idl/thrift".into()])
        .write()
        .expect("volo-build generates code for idl/thrift/echo.thrift");
}
