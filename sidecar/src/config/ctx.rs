//! Where a configuration error is: the file, and the line of a key's span.

use std::net::SocketAddr;

use toml::Spanned;

use super::ConfigError;

pub(super) struct Ctx<'a> {
    path: &'a str,
    text: &'a str,
}

impl<'a> Ctx<'a> {
    pub(super) fn new(path: &'a str, text: &'a str) -> Ctx<'a> {
        Ctx { path, text }
    }

    fn line(&self, at: usize) -> usize {
        self.text[..at.min(self.text.len())].matches('\n').count() + 1
    }

    pub(super) fn invalid<T>(
        &self,
        at: usize,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Result<T, ConfigError> {
        Err(ConfigError::Invalid {
            path: self.path.to_owned(),
            line: self.line(at),
            key: key.into(),
            message: message.into(),
        })
    }

    pub(super) fn addr(&self, v: &Spanned<String>, key: &str) -> Result<SocketAddr, ConfigError> {
        v.get_ref().parse().or_else(|_| {
            self.invalid(
                v.span().start,
                key,
                format!("{:?} is not an ip:port address", v.get_ref()),
            )
        })
    }
}
