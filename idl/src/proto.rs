//! `.proto` files: a small scanner that reads what routing needs (package, imports, services and
//! their rpcs, streaming flags) and checks the rest only for balance. Messages and enums are
//! skipped as balanced blocks: fnmesh never decodes a protobuf payload.

use std::path::{Path, PathBuf};

use crate::{line_col, read, resolve, Catalog, IdlError, IdlKind, Method, Service};

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num,
    Punct(char),
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    at: usize,
}

pub(crate) fn load(root: &Path, include_dirs: &[PathBuf]) -> Result<Catalog, IdlError> {
    let mut loaded: Vec<PathBuf> = Vec::new();
    let mut services = Vec::new();
    let mut queue = vec![root.to_owned()];
    while let Some(path) = queue.pop() {
        if loaded.contains(&path) {
            continue;
        }
        let text = read(&path)?;
        let file = Parser::new(&path, &text, include_dirs)?.file()?;
        queue.extend(file.imports);
        services.extend(file.services);
        loaded.push(path);
    }
    Ok(Catalog {
        kind: IdlKind::Proto,
        root: root.to_owned(),
        services,
    })
}

struct ParsedFile {
    imports: Vec<PathBuf>,
    services: Vec<Service>,
}

struct Parser<'a> {
    path: &'a Path,
    text: &'a str,
    include_dirs: &'a [PathBuf],
    tokens: Vec<Token>,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(path: &'a Path, text: &'a str, include_dirs: &'a [PathBuf]) -> Result<Self, IdlError> {
        let mut p = Parser {
            path,
            text,
            include_dirs,
            tokens: Vec::new(),
            pos: 0,
        };
        p.tokens = p.lex()?;
        Ok(p)
    }

    fn error(&self, at: usize, message: String) -> IdlError {
        let (line, column) = line_col(self.text, at);
        IdlError::Syntax {
            path: self.path.to_owned(),
            line,
            column,
            message,
        }
    }

    fn lex(&self) -> Result<Vec<Token>, IdlError> {
        let b = self.text.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            let start = i;
            if c.is_ascii_whitespace() {
                i += 1;
            } else if b[i..].starts_with(b"//") {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            } else if b[i..].starts_with(b"/*") {
                let end = self.text[i + 2..]
                    .find("*/")
                    .ok_or_else(|| self.error(start, "unterminated comment".into()))?;
                i += 2 + end + 2;
            } else if c == b'"' || c == b'\'' {
                i += 1;
                while i < b.len() && b[i] != c && b[i] != b'\n' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                if i >= b.len() || b[i] != c {
                    return Err(self.error(start, "unterminated string".into()));
                }
                i += 1;
                let inner = self.text[start + 1..i - 1].to_owned();
                out.push(Token {
                    tok: Tok::Str(inner),
                    at: start,
                });
            } else if c.is_ascii_alphabetic() || c == b'_' || c == b'.' {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'.')
                {
                    i += 1;
                }
                out.push(Token {
                    tok: Tok::Ident(self.text[start..i].to_owned()),
                    at: start,
                });
            } else if c.is_ascii_digit()
                || (c == b'-' && b.get(i + 1).is_some_and(u8::is_ascii_digit))
            {
                i += 1;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b"._+-".contains(&b[i])) {
                    i += 1;
                }
                out.push(Token {
                    tok: Tok::Num,
                    at: start,
                });
            } else if b"{}()[]<>;=,:-+".contains(&c) {
                i += 1;
                out.push(Token {
                    tok: Tok::Punct(c as char),
                    at: start,
                });
            } else {
                let ch = self.text[i..].chars().next().unwrap_or('?');
                return Err(self.error(start, format!("unexpected character {ch:?}")));
            }
        }
        Ok(out)
    }

    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn end_at(&self) -> usize {
        self.text.len()
    }

    fn next(&mut self, expected: &str) -> Result<Token, IdlError> {
        let t = self.tokens.get(self.pos).cloned().ok_or_else(|| {
            self.error(
                self.end_at(),
                format!("expected {expected}, found end of file"),
            )
        })?;
        self.pos += 1;
        Ok(t)
    }

    fn describe(t: &Tok) -> String {
        match t {
            Tok::Ident(s) => format!("`{s}`"),
            Tok::Str(s) => format!("\"{s}\""),
            Tok::Num => "a number".into(),
            Tok::Punct(c) => format!("`{c}`"),
        }
    }

    fn ident(&mut self, expected: &str) -> Result<(String, usize), IdlError> {
        let t = self.next(expected)?;
        match t.tok {
            Tok::Ident(s) => Ok((s, t.at)),
            other => Err(self.error(
                t.at,
                format!("expected {expected}, found {}", Self::describe(&other)),
            )),
        }
    }

    fn punct(&mut self, c: char) -> Result<(), IdlError> {
        let t = self.next(&format!("`{c}`"))?;
        if t.tok == Tok::Punct(c) {
            Ok(())
        } else {
            Err(self.error(
                t.at,
                format!("expected `{c}`, found {}", Self::describe(&t.tok)),
            ))
        }
    }

    fn string(&mut self, expected: &str) -> Result<(String, usize), IdlError> {
        let t = self.next(expected)?;
        match t.tok {
            Tok::Str(s) => Ok((s, t.at)),
            other => Err(self.error(
                t.at,
                format!("expected {expected}, found {}", Self::describe(&other)),
            )),
        }
    }

    fn keyword(&mut self, word: &str) -> Result<(), IdlError> {
        let (found, at) = self.ident(&format!("`{word}`"))?;
        if found == word {
            Ok(())
        } else {
            Err(self.error(at, format!("expected `{word}`, found `{found}`")))
        }
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek().is_some_and(|t| t.tok == Tok::Punct(c)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// Skips a `{ ... }` block whose `{` is next, checking that braces balance.
    fn skip_block(&mut self) -> Result<(), IdlError> {
        let open = self.next("`{`")?;
        if open.tok != Tok::Punct('{') {
            return Err(self.error(
                open.at,
                format!("expected `{{`, found {}", Self::describe(&open.tok)),
            ));
        }
        let mut depth = 1usize;
        while depth > 0 {
            let t = self
                .next("`}`")
                .map_err(|_| self.error(open.at, "block opened here is never closed".into()))?;
            match t.tok {
                Tok::Punct('{') => depth += 1,
                Tok::Punct('}') => depth -= 1,
                _ => {}
            }
        }
        Ok(())
    }

    /// Skips a statement up to its `;`, stepping over `{ ... }` aggregate option values.
    fn skip_statement(&mut self) -> Result<(), IdlError> {
        loop {
            match self.peek().map(|t| t.tok.clone()) {
                Some(Tok::Punct(';')) => {
                    self.pos += 1;
                    return Ok(());
                }
                Some(Tok::Punct('{')) => self.skip_block()?,
                Some(Tok::Punct('}')) | None => {
                    let at = self.peek().map_or(self.end_at(), |t| t.at);
                    return Err(self.error(at, "expected `;`".into()));
                }
                Some(_) => self.pos += 1,
            }
        }
    }

    fn file(mut self) -> Result<ParsedFile, IdlError> {
        let mut package = String::new();
        let mut imports = Vec::new();
        let mut services = Vec::new();
        while let Some(t) = self.peek().cloned() {
            let word = match &t.tok {
                Tok::Punct(';') => {
                    self.pos += 1;
                    continue;
                }
                Tok::Ident(w) => w.clone(),
                other => {
                    return Err(self.error(
                        t.at,
                        format!(
                            "expected a top-level statement, found {}",
                            Self::describe(other)
                        ),
                    ))
                }
            };
            self.pos += 1;
            match word.as_str() {
                "syntax" | "edition" => {
                    self.punct('=')?;
                    self.string("a version string")?;
                    self.punct(';')?;
                }
                "package" => {
                    package = self.ident("a package name")?.0;
                    self.punct(';')?;
                }
                "import" => {
                    if matches!(self.peek().map(|t| &t.tok), Some(Tok::Ident(w)) if w == "public" || w == "weak") {
                        self.pos += 1;
                    }
                    let (target, at) = self.string("an import path")?;
                    self.punct(';')?;
                    let found = resolve(self.path, &target, self.include_dirs).map_err(|searched| {
                        IdlError::MissingInclude {
                            path: self.path.to_owned(),
                            line: line_col(self.text, at).0,
                            statement: "import",
                            target: target.clone(),
                            searched,
                        }
                    })?;
                    imports.push(found);
                }
                "option" => self.skip_statement()?,
                "message" | "enum" | "extend" => {
                    self.ident("a name")?;
                    self.skip_block()?;
                }
                "service" => {
                    let (name, _) = self.ident("a service name")?;
                    let methods = self.service_body()?;
                    let name = if package.is_empty() {
                        name
                    } else {
                        format!("{package}.{name}")
                    };
                    services.push(Service {
                        name,
                        file: self.path.to_owned(),
                        methods,
                    });
                }
                other => {
                    return Err(self.error(
                        t.at,
                        format!("expected a top-level statement (syntax, package, import, option, message, enum, service, extend), found `{other}`"),
                    ))
                }
            }
        }
        Ok(ParsedFile { imports, services })
    }

    fn service_body(&mut self) -> Result<Vec<Method>, IdlError> {
        self.punct('{')?;
        let mut methods: Vec<Method> = Vec::new();
        loop {
            let t = self.next("`rpc` or `}`")?;
            match t.tok {
                Tok::Punct('}') => return Ok(methods),
                Tok::Punct(';') => {}
                Tok::Ident(w) if w == "option" => self.skip_statement()?,
                Tok::Ident(w) if w == "rpc" => {
                    let (name, at) = self.ident("a method name")?;
                    if methods.iter().any(|m| m.name == name) {
                        return Err(self.error(at, format!("method {name} is declared twice")));
                    }
                    let client_streaming = self.rpc_type()?;
                    self.keyword("returns")?;
                    let server_streaming = self.rpc_type()?;
                    if self.peek().is_some_and(|t| t.tok == Tok::Punct('{')) {
                        self.skip_block()?;
                        self.eat(';');
                    } else {
                        self.punct(';')?;
                    }
                    methods.push(Method {
                        client_streaming,
                        server_streaming,
                        ..Method::unary(&name)
                    });
                }
                other => {
                    return Err(self.error(
                        t.at,
                        format!(
                            "expected `rpc`, `option` or `}}`, found {}",
                            Self::describe(&other)
                        ),
                    ))
                }
            }
        }
    }

    /// `( [stream] Type )`; true when streaming.
    fn rpc_type(&mut self) -> Result<bool, IdlError> {
        self.punct('(')?;
        let (first, _) = self.ident("a message type")?;
        let streaming =
            first == "stream" && matches!(self.peek().map(|t| &t.tok), Some(Tok::Ident(_)));
        if streaming {
            self.ident("a message type")?;
        }
        self.punct(')')?;
        Ok(streaming)
    }
}
