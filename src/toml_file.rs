//! Reading the TOML files gpuwarden is given (config, host fixture, policy)
//! with errors that name the file, the key and the reason, and the line
//! where there is one: what an operator needs to fix it.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A TOML file that cannot be used as it is.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file was read but a key in it is wrong.
    #[error("{}: {}", path.display(), problem)]
    Invalid { path: PathBuf, problem: KeyProblem },
}

/// What is wrong with which key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyProblem {
    /// Dotted path, e.g. `gpus[2].mig_instances[0].compute_slices`; empty
    /// for the document as a whole.
    pub key: String,
    pub reason: String,
    pub line: Option<usize>,
}

impl fmt::Display for KeyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        if !self.key.is_empty() {
            write!(f, "key `{}`: ", self.key)?;
        }
        f.write_str(&self.reason)
    }
}

impl FileError {
    pub fn invalid(path: &Path, key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            path: path.to_path_buf(),
            problem: KeyProblem {
                key: key.into(),
                reason: reason.into(),
                line: None,
            },
        }
    }

    /// The key at fault, when the error is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Read { .. } => None,
            Self::Invalid { problem, .. } => Some(&problem.key),
        }
    }
}

/// Reads and deserializes `path`. Unknown keys are refused by the target
/// types themselves (`deny_unknown_fields`).
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text)
}

/// Deserializes `text`, the contents of `path` (named in errors only).
pub fn parse<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, FileError> {
    let invalid = |key: String, error: &toml::de::Error| FileError::Invalid {
        path: path.to_path_buf(),
        problem: KeyProblem {
            key,
            reason: error.message().trim_end().to_owned(),
            line: error.span().map(|span| line_of(text, span.start)),
        },
    };
    let document = toml::de::Deserializer::parse(text).map_err(|e| invalid(String::new(), &e))?;
    serde_path_to_error::deserialize(document).map_err(|e| {
        let key = e.path().to_string();
        // serde_path_to_error writes `.` for the root.
        let key = if key == "." { String::new() } else { key };
        invalid(key, e.inner())
    })
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        name: String,
        #[serde(default)]
        inner: Vec<Inner>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        size: u32,
    }

    fn problem(text: &str) -> KeyProblem {
        match parse::<Doc>(Path::new("x.toml"), text) {
            Err(FileError::Invalid { problem, .. }) => problem,
            other => panic!("expected an invalid-key error, got {other:?}"),
        }
    }

    #[test]
    fn unknown_keys_are_named_with_their_path_and_line() {
        let p = problem("name = \"a\"\n[[inner]]\nsize = 1\n[[inner]]\nsise = 2\n");
        assert_eq!(p.key, "inner[1].sise");
        assert!(p.reason.contains("unknown field `sise`"), "{}", p.reason);
        assert_eq!(p.line, Some(5));
    }

    #[test]
    fn wrong_types_and_missing_keys_name_the_key() {
        let p = problem("name = \"a\"\n[[inner]]\nsize = \"big\"\n");
        assert_eq!(p.key, "inner[0].size");
        assert_eq!(p.line, Some(3));
        let p = problem("[[inner]]\nsize = 1\n");
        assert!(p.reason.contains("missing field `name`"), "{}", p.reason);
    }

    #[test]
    fn syntax_errors_give_the_line() {
        let p = problem("name = \"a\"\nnot toml at all\n");
        assert_eq!(p.line, Some(2));
        assert_eq!(p.key, "");
    }

    #[test]
    fn the_message_names_file_key_and_reason() {
        let err = FileError::invalid(Path::new("/etc/x.toml"), "api.listen", "needs a port");
        assert_eq!(
            err.to_string(),
            "/etc/x.toml: key `api.listen`: needs a port"
        );
        assert_eq!(err.key(), Some("api.listen"));
    }
}
