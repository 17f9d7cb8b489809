//! `.thrift` files, parsed with pilota's parser (the one volo-build uses), includes followed.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use pilota_thrift_parser::{FileParser, FileSource, Item};

use crate::{line_col, read, resolve, Catalog, IdlError, IdlKind, Method, Service};

/// A parsed file: its text (for line numbers), the services it declares, the files it includes
/// by the name the Thrift scope uses (`base` for `include "x/base.thrift"`).
struct Parsed {
    text: String,
    services: Vec<pilota_thrift_parser::Service>,
    includes: HashMap<String, PathBuf>,
}

pub(crate) fn load(root: &Path, include_dirs: &[PathBuf]) -> Result<Catalog, IdlError> {
    let mut files: Vec<(PathBuf, Parsed)> = Vec::new();
    let mut queue = vec![root.to_owned()];
    while let Some(path) = queue.pop() {
        if files.iter().any(|(p, _)| *p == path) {
            continue;
        }
        let parsed = parse_file(&path, include_dirs)?;
        queue.extend(parsed.includes.values().cloned());
        files.push((path, parsed));
    }
    let mut services = Vec::new();
    for (path, parsed) in &files {
        for s in &parsed.services {
            let mut methods = Vec::new();
            collect_methods(&files, path, s, &mut methods, 0)?;
            services.push(Service {
                name: s.name.to_string(),
                file: path.clone(),
                methods,
            });
        }
    }
    Ok(Catalog {
        kind: IdlKind::Thrift,
        root: root.to_owned(),
        services,
    })
}

/// A file's items as pilota parsed them, and its includes by the scope that names them.
pub(crate) struct Items {
    pub(crate) text: String,
    pub(crate) items: Vec<Item>,
    pub(crate) includes: HashMap<String, PathBuf>,
}

/// Parses `path` and finds the files it includes.
pub(crate) fn parse_items(path: &Path, include_dirs: &[PathBuf]) -> Result<Items, IdlError> {
    let text = read(path)?;
    let source =
        FileSource::new_with_path(path.to_owned(), &text).map_err(|e| convert(path, &text, e))?;
    let file = FileParser::new(source)
        .parse()
        .map_err(|e| convert(path, &text, e))?;
    let mut includes = HashMap::new();
    let mut items = Vec::new();
    for item in file.items {
        match item {
            Item::Include(inc) => {
                let target: &str = &inc.path;
                let found = resolve(path, target, include_dirs).map_err(|searched| {
                    IdlError::MissingInclude {
                        path: path.to_owned(),
                        line: line_of(&text, target),
                        statement: "include",
                        target: target.to_owned(),
                        searched,
                    }
                })?;
                let scope = Path::new(target)
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or(target)
                    .to_owned();
                includes.insert(scope, found);
            }
            other => items.push(other),
        }
    }
    Ok(Items {
        text,
        items,
        includes,
    })
}

fn parse_file(path: &Path, include_dirs: &[PathBuf]) -> Result<Parsed, IdlError> {
    let Items {
        text,
        items,
        includes,
    } = parse_items(path, include_dirs)?;
    let services = items
        .into_iter()
        .filter_map(|item| match item {
            Item::Service(s) => Some(s),
            _ => None,
        })
        .collect();
    Ok(Parsed {
        text,
        services,
        includes,
    })
}

/// The line of the first quoted occurrence of `literal` (for errors about includes and services,
/// which pilota's tree does not locate).
fn line_of(text: &str, literal: &str) -> usize {
    let at = text
        .find(&format!("\"{literal}\""))
        .or_else(|| text.find(literal))
        .unwrap_or(0);
    line_col(text, at).0
}

/// The methods of `s`, then those of the service it extends, and so on (bounded depth).
fn collect_methods(
    files: &[(PathBuf, Parsed)],
    path: &Path,
    s: &pilota_thrift_parser::Service,
    out: &mut Vec<Method>,
    depth: usize,
) -> Result<(), IdlError> {
    for f in &s.functions {
        if out.iter().all(|m| m.name != *f.name) {
            out.push(Method {
                oneway: f.oneway,
                ..Method::unary(&f.name)
            });
        }
    }
    let Some(parent) = &s.extends else {
        return Ok(());
    };
    let segments: Vec<&str> = parent.segments.iter().map(|i| i.as_str()).collect();
    let parsed = &files.iter().find(|(p, _)| p == path).map(|(_, f)| f);
    let unknown = || IdlError::UnknownParent {
        path: path.to_owned(),
        line: parsed.map_or(0, |f| {
            line_of(&f.text, &format!("service {}", s.name.as_str()))
        }),
        service: s.name.to_string(),
        parent: segments.join("."),
    };
    if depth > 32 {
        return Err(unknown());
    }
    let (file, name) = match segments.as_slice() {
        [name] => (path.to_owned(), *name),
        [scope, name] => {
            let inc = parsed
                .and_then(|f| f.includes.get(*scope))
                .ok_or_else(unknown)?;
            (inc.clone(), *name)
        }
        _ => return Err(unknown()),
    };
    let (_, target) = files.iter().find(|(p, _)| *p == file).ok_or_else(unknown)?;
    let parent = target
        .services
        .iter()
        .find(|p| p.name.as_str() == name)
        .ok_or_else(unknown)?;
    collect_methods(files, &file, parent, out, depth + 1)
}

/// Turns pilota's error into ours. pilota reports a syntax error as a summary "… at line L:C -
/// reason" (one error) or "… N. Line L:C - reason" (several); we take the first location.
fn convert(path: &Path, text: &str, e: pilota_thrift_parser::Error) -> IdlError {
    match e {
        pilota_thrift_parser::Error::IO(source) => IdlError::Io {
            path: path.to_owned(),
            source,
        },
        pilota_thrift_parser::Error::FileNotFound(p) => IdlError::Io {
            path: p,
            source: std::io::ErrorKind::NotFound.into(),
        },
        pilota_thrift_parser::Error::Syntax { summary, .. } => {
            let (line, column, message) = first_location(&summary).unwrap_or_else(|| {
                let (l, c) = line_col(text, text.len());
                (l, c, summary.to_string())
            });
            IdlError::Syntax {
                path: path.to_owned(),
                line,
                column,
                message,
            }
        }
    }
}

fn first_location(summary: &str) -> Option<(usize, usize, String)> {
    let lower = summary.to_ascii_lowercase();
    let at = lower.find("line ")? + "line ".len();
    let rest = &summary[at..];
    let (loc, reason) = rest.split_once(" - ").unwrap_or((rest, ""));
    let (line, column) = loc.trim().split_once(':')?;
    let reason = reason.lines().next().unwrap_or("").trim();
    Some((
        line.parse().ok()?,
        column.parse().ok()?,
        format!("syntax error: {reason}"),
    ))
}
