//! Generates the Volo Thrift code for the example IDL, so tests run real Volo clients and servers.

fn main() {
    println!("cargo:rerun-if-changed=../idl/thrift");
    println!("cargo:rerun-if-changed=../idl/tests/thrift");
    volo_build::Builder::thrift()
        .add_service("../idl/thrift/echo.thrift")
        .add_service("../idl/tests/thrift/types.thrift")
        .include_dirs(vec!["../idl/thrift".into()])
        .write()
        .expect("volo-build generates code for idl/thrift/echo.thrift and the types test IDL");
    println!("cargo:rerun-if-changed=../idl/proto");
    volo_build::Builder::protobuf()
        .add_service("../idl/proto/echo.proto")
        .include_dirs(vec!["../idl/proto".into()])
        .filename("proto_gen.rs".into())
        .write()
        .expect("volo-build generates code for idl/proto/echo.proto");
}
