//! The fnmesh IDL catalog: the services and methods a function serves, read from its `.thrift`
//! file (with includes) or `.proto` file (with imports). Routing uses it to refuse unknown methods
//! without starting an instance.
#![forbid(unsafe_code)]

pub mod openapi;
mod openapi_proto;
mod proto;
pub mod proto_json;
pub mod schema;
mod thrift;
pub mod thrift_json;
mod thrift_wire;

use std::path::{Path, PathBuf};

/// The IDL language of a catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdlKind {
    Thrift,
    Proto,
}

/// One method of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Method {
    pub name: String,
    /// Thrift `oneway`: the caller expects no reply.
    pub oneway: bool,
    /// gRPC `stream` on the request / response.
    pub client_streaming: bool,
    pub server_streaming: bool,
}

impl Method {
    pub(crate) fn unary(name: &str) -> Method {
        Method {
            name: name.to_owned(),
            oneway: false,
            client_streaming: false,
            server_streaming: false,
        }
    }
}

/// One service: Thrift services by their bare name (as TTHeader `isn` carries it), protobuf
/// services by `package.Service` (as a gRPC `:path` carries it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    /// The file that declares it.
    pub file: PathBuf,
    /// Its methods, inherited ones (Thrift `extends`) included.
    pub methods: Vec<Method>,
}

impl Service {
    pub fn method(&self, name: &str) -> Option<&Method> {
        self.methods.iter().find(|m| m.name == name)
    }
}

/// Every service declared in an IDL file and the files it includes, the root file's first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalog {
    pub kind: IdlKind,
    pub root: PathBuf,
    pub services: Vec<Service>,
}

/// Why an IDL could not be loaded. Every variant names the file, and the line where there is one.
#[derive(Debug, thiserror::Error)]
pub enum IdlError {
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}:{column}: {message}", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{}:{line}: {statement} \"{target}\" not found (looked in {searched})", path.display())]
    MissingInclude {
        path: PathBuf,
        line: usize,
        /// `include` or `import`.
        statement: &'static str,
        target: String,
        searched: String,
    },
    #[error("{}:{line}: service {service} extends unknown service {parent}", path.display())]
    UnknownParent {
        path: PathBuf,
        line: usize,
        service: String,
        parent: String,
    },
    #[error("{}: unknown type {name}", path.display())]
    UnknownType { path: PathBuf, name: String },
    #[error("{}: not an IDL file fnmesh reads (want .thrift or .proto)", path.display())]
    UnsupportedKind { path: PathBuf },
    #[error("{}: {message}", path.display())]
    Service { path: PathBuf, message: String },
}

impl Catalog {
    /// Loads `path` (`.thrift` or `.proto`), resolving includes and imports relative to the
    /// including file, then in `include_dirs`.
    pub fn load(path: impl AsRef<Path>, include_dirs: &[PathBuf]) -> Result<Catalog, IdlError> {
        let path = path.as_ref();
        match path.extension().and_then(|e| e.to_str()) {
            Some("thrift") => thrift::load(path, include_dirs),
            Some("proto") => proto::load(path, include_dirs),
            _ => Err(IdlError::UnsupportedKind {
                path: path.to_owned(),
            }),
        }
    }

    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }

    /// The types and methods of a `.thrift` file, for encoding calls from JSON
    /// ([`thrift_json`]).
    pub fn thrift_schema(
        path: impl AsRef<Path>,
        include_dirs: &[PathBuf],
    ) -> Result<schema::Schema, IdlError> {
        schema::load(path.as_ref(), include_dirs)
    }

    /// The service a function serves: the one named, or else the root file's only service.
    pub fn select(&self, name: Option<&str>) -> Result<&Service, IdlError> {
        let err = |message: String| IdlError::Service {
            path: self.root.clone(),
            message,
        };
        if let Some(name) = name {
            return self.service(name).ok_or_else(|| {
                err(format!(
                    "no service {name} (services: {})",
                    self.names().join(", ")
                ))
            });
        }
        let mut own = self.services.iter().filter(|s| s.file == self.root);
        match (own.next(), own.next()) {
            (Some(s), None) => Ok(s),
            (None, _) => Err(err("declares no service".into())),
            (Some(_), Some(_)) => Err(err(format!(
                "declares several services ({}); name one with `service`",
                self.names().join(", ")
            ))),
        }
    }

    fn names(&self) -> Vec<&str> {
        self.services.iter().map(|s| s.name.as_str()).collect()
    }
}

/// 1-based line and column of byte offset `at` in `text`.
pub(crate) fn line_col(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// Finds an included file: next to the including file, then in each include directory.
pub(crate) fn resolve(
    from: &Path,
    target: &str,
    include_dirs: &[PathBuf],
) -> Result<PathBuf, String> {
    let mut candidates = Vec::with_capacity(include_dirs.len() + 1);
    candidates.push(from.parent().unwrap_or(Path::new(".")).join(target));
    candidates.extend(include_dirs.iter().map(|d| d.join(target)));
    for c in &candidates {
        if c.is_file() {
            return Ok(c.clone());
        }
    }
    Err(candidates
        .iter()
        .map(|c| c.display().to_string())
        .collect::<Vec<_>>()
        .join(", "))
}

pub(crate) fn read(path: &Path) -> Result<String, IdlError> {
    std::fs::read_to_string(path).map_err(|source| IdlError::Io {
        path: path.to_owned(),
        source,
    })
}
