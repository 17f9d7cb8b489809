//! The catalog reads the example IDLs, follows includes and imports, and names file and line in
//! every error.

use std::path::{Path, PathBuf};

use fnmesh_idl::{Catalog, IdlError, IdlKind};

fn example(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Each method as (name, client streaming, server streaming).
fn streaming_kinds(s: &fnmesh_idl::Service) -> Vec<(&str, bool, bool)> {
    s.methods
        .iter()
        .map(|m| (m.name.as_str(), m.client_streaming, m.server_streaming))
        .collect()
}

/// A scratch directory with the given files, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str, files: &[(&str, &str)]) -> Scratch {
        let dir = std::env::temp_dir().join(format!("fnmesh-idl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (name, text) in files {
            let p = dir.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn example_thrift_idl_lists_echo_service_with_its_include() {
    let c = Catalog::load(example("thrift/echo.thrift"), &[]).unwrap();
    assert_eq!(c.kind, IdlKind::Thrift);
    let names: Vec<_> = c.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["EchoService"]);
    let s = c.select(None).unwrap();
    assert_eq!(s.name, "EchoService");
    assert_eq!(s.file, example("thrift/echo.thrift"));
    let echo = s.method("Echo").unwrap();
    assert!(!echo.oneway);
    assert!(s.method("Ping").unwrap().oneway);
    assert!(s.method("Nope").is_none());
    assert_eq!(s.methods.len(), 2);
}

#[test]
fn example_proto_idl_lists_each_streaming_kind() {
    let c = Catalog::load(example("proto/echo.proto"), &[]).unwrap();
    assert_eq!(c.kind, IdlKind::Proto);
    let s = c.select(None).unwrap();
    assert_eq!(s.name, "echo.Echo");
    assert_eq!(
        streaming_kinds(s),
        [
            ("UnaryEcho", false, false),
            ("ServerStreamingEcho", false, true),
            ("ClientStreamingEcho", true, false),
            ("BidirectionalStreamingEcho", true, true),
        ]
    );
    assert!(c.select(Some("echo.Echo")).is_ok());
    assert!(
        c.select(Some("Echo")).is_err(),
        "gRPC names are package-qualified"
    );
}

#[test]
fn missing_thrift_include_names_file_and_line() {
    let dir = Scratch::new(
        "missing-include",
        &[(
            "a.thrift",
            "namespace rs a\n\ninclude \"nope.thrift\"\n\nservice A { void f() }\n",
        )],
    );
    let err = Catalog::load(dir.path("a.thrift"), &[]).unwrap_err();
    match &err {
        IdlError::MissingInclude {
            path, line, target, ..
        } => {
            assert_eq!(
                (path, *line, target.as_str()),
                (&dir.path("a.thrift"), 3, "nope.thrift")
            );
        }
        other => panic!("expected MissingInclude, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("a.thrift:3") && text.contains("nope.thrift"),
        "{text}"
    );
}

#[test]
fn thrift_syntax_errors_name_file_and_line_also_in_included_files() {
    let bad =
        "namespace rs a\n\nstruct S {\n  1: string x,\n}\n\nservice A {\n  void f(1: i32 a\n}\n";
    let dir = Scratch::new(
        "syntax",
        &[
            ("a.thrift", bad),
            (
                "main.thrift",
                "include \"a.thrift\"\nservice M { void g() }\n",
            ),
        ],
    );
    for root in ["a.thrift", "main.thrift"] {
        let err = Catalog::load(dir.path(root), &[]).unwrap_err();
        match &err {
            IdlError::Syntax { path, line, .. } => {
                assert_eq!(
                    path,
                    &dir.path("a.thrift"),
                    "the error names the file that is wrong"
                );
                assert!((8..=9).contains(line), "line {line}: {err}");
            }
            other => panic!("expected Syntax, got {other:?}"),
        }
        assert!(err.to_string().contains("a.thrift:"), "{err}");
    }
}

#[test]
fn thrift_extends_inherits_methods_across_includes_and_unknown_parents_fail() {
    let dir = Scratch::new(
        "extends",
        &[
            ("inc/base.thrift", "service Base { void health() }\n"),
            ("child.thrift", "include \"base.thrift\"\nservice Child extends base.Base {\n  string hello(1: string who)\n}\n"),
            ("orphan.thrift", "\n\nservice Orphan extends Missing { void f() }\n"),
        ],
    );
    let c = Catalog::load(dir.path("child.thrift"), &[dir.path("inc")]).unwrap();
    let child = c.select(None).unwrap();
    let names: Vec<_> = child.methods.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["hello", "health"]);
    assert!(
        c.service("Base").is_some(),
        "included services are listed too"
    );
    // Without the include directory, the include is missing.
    assert!(matches!(
        Catalog::load(dir.path("child.thrift"), &[]),
        Err(IdlError::MissingInclude { line: 1, .. })
    ));
    match Catalog::load(dir.path("orphan.thrift"), &[]).unwrap_err() {
        IdlError::UnknownParent { line, parent, .. } => {
            assert_eq!((line, parent.as_str()), (3, "Missing"))
        }
        other => panic!("expected UnknownParent, got {other:?}"),
    }
}

#[test]
fn proto_errors_name_file_and_line() {
    let cases = [
        ("syntax = \"proto3\";\npackage p;\nservice S {\n  rpc M(A) (B);\n}\n", 4, "expected `returns`"),
        ("syntax = \"proto3\";\n\nmessage A {\n  string x = 1;\n", 3, "never closed"),
        ("syntax = \"proto3\";\nservce S {}\n", 2, "top-level statement"),
        ("syntax = \"proto3\";\nimport \"missing.proto\";\n", 2, "import \"missing.proto\" not found"),
        ("syntax = \"proto3;\n", 1, "unterminated string"),
        ("syntax = \"proto3\";\nservice S {\n rpc M(A) returns (B);\n rpc M(A) returns (B);\n}\n", 4, "declared twice"),
        ("syntax = \"proto3\";\n/* never\nclosed", 2, "unterminated comment"),
    ];
    for (i, (text, line, needle)) in cases.iter().enumerate() {
        let dir = Scratch::new(&format!("proto-{i}"), &[("x.proto", text)]);
        let err = Catalog::load(dir.path("x.proto"), &[]).unwrap_err();
        let shown = err.to_string();
        assert!(
            shown.contains(&format!("x.proto:{line}")),
            "case {i}: {shown}"
        );
        assert!(shown.contains(needle), "case {i}: {shown}");
    }
}

#[test]
fn proto_imports_options_and_nested_blocks_are_followed_or_skipped() {
    let dir = Scratch::new(
        "proto-ok",
        &[
            ("common/types.proto", "syntax = \"proto3\";\npackage common;\nmessage Empty {}\nservice Admin { rpc Ping(Empty) returns (Empty); }\n"),
            (
                "svc.proto",
                "syntax = \"proto3\";\npackage acme.v1;\nimport public \"common/types.proto\";\noption go_package = \"x/y\";\noption (my.opt) = { a: 1 b: { c: \"}\" } };\nmessage Req { message Inner { enum E { A = 0; } } map<string, Inner> m = 1; reserved 2 to 4; }\nenum Color { RED = 0; GREEN = -1; }\nservice Greeter {\n  option deprecated = true;\n  rpc Hello(Req) returns (.common.Empty) { option idempotency_level = NO_SIDE_EFFECTS; };\n  rpc Watch(Req) returns (stream common.Empty) {}\n  rpc Upload(stream Req) returns (common.Empty);\n}\n",
            ),
        ],
    );
    let c = Catalog::load(dir.path("svc.proto"), &[]).unwrap();
    let s = c.select(None).unwrap();
    assert_eq!(s.name, "acme.v1.Greeter");
    assert_eq!(
        streaming_kinds(s),
        [
            ("Hello", false, false),
            ("Watch", false, true),
            ("Upload", true, false)
        ]
    );
    assert!(
        c.service("common.Admin").is_some(),
        "imported services are listed"
    );
}

#[test]
fn several_services_need_a_name_and_unknown_extensions_are_refused() {
    let dir = Scratch::new(
        "multi",
        &[
            (
                "two.thrift",
                "service A { void a() }\nservice B { void b() }\n",
            ),
            ("x.idl", ""),
        ],
    );
    let c = Catalog::load(dir.path("two.thrift"), &[]).unwrap();
    assert!(c
        .select(None)
        .unwrap_err()
        .to_string()
        .contains("several services"));
    assert_eq!(c.select(Some("B")).unwrap().methods[0].name, "b");
    assert!(c
        .select(Some("C"))
        .unwrap_err()
        .to_string()
        .contains("no service C"));
    assert!(matches!(
        Catalog::load(dir.path("x.idl"), &[]),
        Err(IdlError::UnsupportedKind { .. })
    ));
    assert!(matches!(
        Catalog::load(dir.path("absent.thrift"), &[]),
        Err(IdlError::Io { .. })
    ));
}
