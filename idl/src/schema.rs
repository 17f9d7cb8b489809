//! A Thrift IDL's types, resolved for encoding at run time: structs, unions and exceptions with
//! their fields, enums, typedefs followed to what they name, and each service's methods (those
//! it `extends` included) with their arguments, result and declared exceptions. Types are
//! looked up in the scope of the file that names them (`base.Meta` is `Meta` of the file
//! included as `base`).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use pilota_thrift_parser::{Item, Ty};

use crate::IdlError;

/// A Thrift type, with typedefs resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TType {
    Bool,
    I8,
    I16,
    I32,
    I64,
    Double,
    String,
    Binary,
    Uuid,
    List(Box<TType>),
    Set(Box<TType>),
    Map(Box<TType>, Box<TType>),
    /// An index into [`Schema::structs`].
    Struct(usize),
    /// An index into [`Schema::enums`].
    Enum(usize),
}

/// Whether a field must be set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requiredness {
    Required,
    Optional,
    Default,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDef {
    pub id: i16,
    pub name: String,
    pub required: Requiredness,
    pub ty: TType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StructKind {
    Struct,
    Union,
    Exception,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StructDef {
    pub name: String,
    pub kind: StructKind,
    pub fields: Vec<FieldDef>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnumDef {
    pub name: String,
    pub values: Vec<(String, i32)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodDef {
    pub name: String,
    pub oneway: bool,
    pub args: Vec<FieldDef>,
    /// `None` for `void`.
    pub result: Option<TType>,
    pub throws: Vec<FieldDef>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceDef {
    pub name: String,
    pub methods: Vec<MethodDef>,
}

/// Every type and service of an IDL file and the files it includes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schema {
    pub structs: Vec<StructDef>,
    pub enums: Vec<EnumDef>,
    pub services: Vec<ServiceDef>,
}

impl Schema {
    pub fn service(&self, name: &str) -> Option<&ServiceDef> {
        self.services.iter().find(|s| s.name == name)
    }
}

impl ServiceDef {
    pub fn method(&self, name: &str) -> Option<&MethodDef> {
        self.methods.iter().find(|m| m.name == name)
    }
}

/// A parsed file's declarations, by name, and its includes by scope.
#[derive(Default)]
struct Scope {
    structs: HashMap<String, usize>,
    enums: HashMap<String, usize>,
    typedefs: HashMap<String, pilota_thrift_parser::Type>,
    services: HashMap<String, pilota_thrift_parser::Service>,
    includes: HashMap<String, PathBuf>,
}

/// The files, each with its scope and the struct-like items still to resolve.
struct Files {
    scopes: HashMap<PathBuf, Scope>,
    order: Vec<PathBuf>,
}

/// The schema of `root` and what it includes.
pub(crate) fn load(root: &Path, include_dirs: &[PathBuf]) -> Result<Schema, IdlError> {
    let mut schema = Schema {
        structs: Vec::new(),
        enums: Vec::new(),
        services: Vec::new(),
    };
    let mut pending: Vec<(PathBuf, usize, Vec<pilota_thrift_parser::Field>)> = Vec::new();
    let mut files = Files {
        scopes: HashMap::new(),
        order: Vec::new(),
    };
    let mut queue = vec![root.to_owned()];
    while let Some(path) = queue.pop() {
        if files.scopes.contains_key(&path) {
            continue;
        }
        let file = crate::thrift::parse_items(&path, include_dirs)?;
        let mut scope = Scope {
            includes: file.includes,
            ..Scope::default()
        };
        queue.extend(scope.includes.values().cloned());
        for item in file.items {
            declare(&mut schema, &mut scope, &mut pending, &path, item);
        }
        files.order.push(path.clone());
        files.scopes.insert(path, scope);
    }
    for (path, index, fields) in pending {
        let resolved = fields_of(&files, &path, &fields)?;
        schema.structs[index].fields = resolved;
    }
    for path in &files.order {
        let scope = &files.scopes[path];
        let mut names: Vec<&String> = scope.services.keys().collect();
        names.sort();
        for name in names {
            let mut methods = Vec::new();
            collect(&files, path, &scope.services[name], &mut methods, 0)?;
            schema.services.push(ServiceDef {
                name: name.clone(),
                methods,
            });
        }
    }
    Ok(schema)
}

/// Records one item's name in its file's scope (struct-like fields are resolved later, once
/// every name is known).
fn declare(
    schema: &mut Schema,
    scope: &mut Scope,
    pending: &mut Vec<(PathBuf, usize, Vec<pilota_thrift_parser::Field>)>,
    path: &Path,
    item: Item,
) {
    let mut struct_like = |like: &pilota_thrift_parser::StructLike, kind| {
        let index = schema.structs.len();
        schema.structs.push(StructDef {
            name: like.name.to_string(),
            kind,
            fields: Vec::new(),
        });
        scope.structs.insert(like.name.to_string(), index);
        pending.push((path.to_owned(), index, like.fields.clone()));
    };
    match item {
        Item::Struct(s) => struct_like(&s, StructKind::Struct),
        Item::Union(u) => struct_like(&u, StructKind::Union),
        Item::Exception(e) => struct_like(&e, StructKind::Exception),
        Item::Enum(e) => {
            let mut next = 0i64;
            let values = e
                .values
                .iter()
                .map(|v| {
                    let value = v.value.map_or(next, |c| c.0);
                    next = value + 1;
                    (v.name.to_string(), value as i32)
                })
                .collect();
            scope.enums.insert(e.name.to_string(), schema.enums.len());
            schema.enums.push(EnumDef {
                name: e.name.to_string(),
                values,
            });
        }
        Item::Typedef(t) => {
            scope.typedefs.insert(t.alias.to_string(), t.r#type);
        }
        Item::Service(s) => {
            scope.services.insert(s.name.to_string(), s);
        }
        _ => {}
    }
}

fn unknown_type(path: &Path, name: &str) -> IdlError {
    IdlError::UnknownType {
        path: path.to_owned(),
        name: name.to_owned(),
    }
}

/// `ty` as named in file `path`, typedefs followed (at most 32 deep).
fn resolve(
    files: &Files,
    path: &Path,
    ty: &pilota_thrift_parser::Type,
    depth: usize,
) -> Result<TType, IdlError> {
    let sub = |t: &pilota_thrift_parser::Type| resolve(files, path, t, depth).map(Box::new);
    Ok(match &ty.0 {
        Ty::String => TType::String,
        Ty::Binary => TType::Binary,
        Ty::Bool => TType::Bool,
        Ty::Byte | Ty::I8 => TType::I8,
        Ty::I16 => TType::I16,
        Ty::I32 => TType::I32,
        Ty::I64 => TType::I64,
        Ty::Double => TType::Double,
        Ty::Uuid => TType::Uuid,
        Ty::Void => return Err(unknown_type(path, "void (as a field's type)")),
        Ty::List { value, .. } => TType::List(sub(value)?),
        Ty::Set { value, .. } => TType::Set(sub(value)?),
        Ty::Map { key, value, .. } => TType::Map(sub(key)?, sub(value)?),
        Ty::Path(p) => {
            let segments: Vec<&str> = p.segments.iter().map(|s| s.as_str()).collect();
            let name = segments.join(".");
            if depth > 32 {
                return Err(unknown_type(path, &name));
            }
            let (file, local) = match segments.as_slice() {
                [local] => (path.to_owned(), *local),
                [scope, local] => {
                    let includes = &files.scopes[path].includes;
                    match includes.get(*scope) {
                        Some(f) => (f.clone(), *local),
                        None => return Err(unknown_type(path, &name)),
                    }
                }
                _ => return Err(unknown_type(path, &name)),
            };
            let scope = files
                .scopes
                .get(&file)
                .ok_or_else(|| unknown_type(path, &name))?;
            if let Some(i) = scope.structs.get(local) {
                TType::Struct(*i)
            } else if let Some(i) = scope.enums.get(local) {
                TType::Enum(*i)
            } else if let Some(t) = scope.typedefs.get(local) {
                resolve(files, &file, t, depth + 1)?
            } else {
                return Err(unknown_type(path, &name));
            }
        }
    })
}

fn fields_of(
    files: &Files,
    path: &Path,
    fields: &[pilota_thrift_parser::Field],
) -> Result<Vec<FieldDef>, IdlError> {
    fields
        .iter()
        .map(|f| {
            Ok(FieldDef {
                id: f.id as i16,
                name: f.name.to_string(),
                required: match f.attribute {
                    pilota_thrift_parser::Attribute::Required => Requiredness::Required,
                    pilota_thrift_parser::Attribute::Optional => Requiredness::Optional,
                    pilota_thrift_parser::Attribute::Default => Requiredness::Default,
                },
                ty: resolve(files, path, &f.ty, 0)?,
            })
        })
        .collect()
}

/// The methods of service `s` of file `path`, then those of the service it extends.
fn collect(
    files: &Files,
    path: &Path,
    s: &pilota_thrift_parser::Service,
    out: &mut Vec<MethodDef>,
    depth: usize,
) -> Result<(), IdlError> {
    for f in &s.functions {
        if out.iter().any(|m| m.name == *f.name) {
            continue;
        }
        let result = match &f.result_type.0 {
            Ty::Void => None,
            _ => Some(resolve(files, path, &f.result_type, 0)?),
        };
        out.push(MethodDef {
            name: f.name.to_string(),
            oneway: f.oneway,
            args: fields_of(files, path, &f.arguments)?,
            result,
            throws: fields_of(files, path, &f.throws)?,
        });
    }
    let Some(parent) = &s.extends else {
        return Ok(());
    };
    let segments: Vec<&str> = parent.segments.iter().map(|i| i.as_str()).collect();
    let name = segments.join(".");
    let (file, local) = match segments.as_slice() {
        [local] => (path.to_owned(), *local),
        [scope, local] => match files.scopes[path].includes.get(*scope) {
            Some(f) => (f.clone(), *local),
            None => return Err(unknown_type(path, &name)),
        },
        _ => return Err(unknown_type(path, &name)),
    };
    let parent = files
        .scopes
        .get(&file)
        .and_then(|s| s.services.get(local))
        .filter(|_| depth < 32)
        .ok_or_else(|| unknown_type(path, &name))?;
    collect(files, &file, parent, out, depth + 1)
}
