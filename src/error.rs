//! The library's one error type.
//!
//! Every variant carries the path (and where it applies the tensor or setting) it happened on,
//! so the message printed at the edge names what the user has to look at; [`Error::reason`]
//! gives the short stable name logs and metrics carry. Variants are grouped by what the caller
//! should do: [`Error::NotReady`] means "not finished yet, look again later"; everything else
//! about an input means "this input is bad, reject it and say why"; [`Error::Usage`] and
//! [`Error::Config`] are the user's to fix (exit code 2); [`Error::Internal`] is a bug in pmad.
//! The binary wraps these in `anyhow` only at its edge.

use std::io;
use std::path::{Path, PathBuf};

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, with the file, tensor or setting it concerns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system call failed on `path`.
    // The OS error is part of this message and deliberately not exposed as `source()`, so
    // an error chain printed with `{:#}` does not repeat it.
    #[error("{path}: {op}: {cause}")]
    Io {
        /// What pmad was doing ("open", "read", "fsync", ...).
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error (its `raw_os_error` is the errno reported in logs).
        cause: io::Error,
    },
    /// A file that is not (or not yet) a complete, valid checkpoint file.
    #[error("{path}: {detail}")]
    Invalid {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it, naming the tensor and byte offset where known.
        detail: String,
    },
    /// A checkpoint that is still being written: try again later.
    #[error("{path}: not ready: {detail}")]
    NotReady {
        /// The checkpoint or file that is incomplete.
        path: PathBuf,
        /// Why it is not ready yet.
        detail: String,
    },
    /// Inputs that cannot be merged together (names, shapes or dtypes differ).
    #[error("{path}: {detail}")]
    Mismatch {
        /// The input that differs from the first one.
        path: PathBuf,
        /// The first difference found.
        detail: String,
    },
    /// NaN or Inf found in an input (refused unless explicitly allowed).
    #[error(
        "{path}: tensor {tensor}: {count} non-finite value(s) (NaN/Inf) in the inputs{more}; \
         set {allow} to merge anyway"
    )]
    NonFinite {
        /// The first checkpoint file in which a non-finite value was found.
        path: PathBuf,
        /// The first tensor (in output order) holding one.
        tensor: String,
        /// Total number of non-finite input elements found.
        count: u64,
        /// Extra text naming the other tensors affected, if any.
        more: String,
        /// The setting that allows merging them, as spelt where the merge was asked for
        /// (`--allow-nonfinite` on the command line, `watch.allow_nonfinite = true` in the
        /// daemon's config).
        allow: &'static str,
    },
    /// A tensor whose dtype pmad cannot average.
    #[error("{path}: tensor {tensor}: dtype {dtype} cannot be averaged: {hint}")]
    Unsupported {
        /// The file holding the tensor.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Its dtype as written in the header.
        dtype: String,
        /// What the user can do about it.
        hint: &'static str,
    },
    /// A source file changed (size, mtime or inode) after it was validated and pinned.
    #[error("{path}: changed since it was validated ({detail}); not reading it")]
    SourceChanged {
        /// The file that changed.
        path: PathBuf,
        /// Which fingerprint field differs.
        detail: String,
    },
    /// Invalid usage of a command; exit code 2.
    #[error("{0}")]
    Usage(String),
    /// An invalid configuration file; exit code 2.
    #[error("{}{detail}", file.as_ref().map(|f| format!("{}: ", f.display())).unwrap_or_default())]
    Config {
        /// The config file, when the text came from one.
        file: Option<PathBuf>,
        /// What is wrong, starting with the key (`recipe[1].window: must be at least 1`).
        detail: String,
    },
    /// A bug in pmad: an invariant that should hold did not. Never the user's input.
    #[error("internal error (a bug in pmad): {0}")]
    Internal(String),
    /// The operation was cancelled (shutdown).
    #[error("cancelled")]
    Cancelled,
}

impl Error {
    /// Wrap an I/O error with the operation and path it happened on.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            cause: source,
        }
    }

    /// An invalid-input error on `path`.
    pub fn invalid(path: &Path, detail: impl Into<String>) -> Self {
        Error::Invalid {
            path: path.to_path_buf(),
            detail: detail.into(),
        }
    }

    /// A "still being written" error on `path`.
    pub fn not_ready(path: &Path, detail: impl Into<String>) -> Self {
        Error::NotReady {
            path: path.to_path_buf(),
            detail: detail.into(),
        }
    }

    /// The OS error number behind this error, if any (logged as `errno`).
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Io { cause, .. } => cause.raw_os_error(),
            _ => None,
        }
    }

    /// Whether this is the user's to fix in how pmad was called or configured (exit code 2).
    pub fn is_usage(&self) -> bool {
        matches!(self, Error::Usage(_) | Error::Config { .. })
    }

    /// A short stable machine-readable reason, used as the `reason` log field and metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Io { cause, .. } if cause.raw_os_error() == Some(28) => "no_space",
            Error::Io { .. } => "io",
            Error::Invalid { .. } => "invalid",
            Error::NotReady { .. } => "not_ready",
            Error::Mismatch { .. } => "mismatch",
            Error::NonFinite { .. } => "non_finite",
            Error::Unsupported { .. } => "unsupported_dtype",
            Error::SourceChanged { .. } => "source_changed",
            Error::Usage(_) => "usage",
            Error::Config { .. } => "config",
            Error::Internal(_) => "internal",
            Error::Cancelled => "cancelled",
        }
    }
}

/// Extension to attach a path and operation to `std::io::Result`s.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T> {
        self.map_err(|e| Error::io(op, path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_variant_names_what_to_look_at_and_has_its_own_reason() {
        let p = Path::new("/ckpt/checkpoint-100/model.safetensors");
        let all = [
            Error::io("fsync", p, io::Error::from_raw_os_error(5)),
            Error::io("write", p, io::Error::from_raw_os_error(28)),
            Error::invalid(p, "tensor a: offsets overlap"),
            Error::not_ready(p, "file is shorter than its header says"),
            Error::Mismatch {
                path: p.into(),
                detail: "tensor a: shape [2] differs".into(),
            },
            Error::NonFinite {
                path: p.into(),
                tensor: "a".into(),
                count: 3,
                more: String::new(),
                allow: "watch.allow_nonfinite = true",
            },
            Error::Unsupported {
                path: p.into(),
                tensor: "a".into(),
                dtype: "F4".into(),
                hint: "dequantize",
            },
            Error::SourceChanged {
                path: p.into(),
                detail: "modified".into(),
            },
            Error::Usage("--threads must be at least 1".into()),
            Error::Config {
                file: Some("/etc/pmad/pmad.toml".into()),
                detail: "recipe[0].window: must be at least 1".into(),
            },
            Error::Internal("a pass before the accumulators exist".into()),
            Error::Cancelled,
        ];
        let reasons: std::collections::BTreeSet<&str> = all.iter().map(|e| e.reason()).collect();
        assert_eq!(reasons.len(), all.len(), "{reasons:?}");
        for e in &all[..8] {
            assert!(e.to_string().starts_with("/ckpt/checkpoint-100/"), "{e}");
        }
        assert_eq!(all[1].reason(), "no_space");
        assert_eq!(all[0].errno(), Some(5));
        // The non-finite error says which setting allows it, as spelt where it was asked.
        assert!(all[5]
            .to_string()
            .contains("set watch.allow_nonfinite = true"));
        assert!(all[8].is_usage() && all[9].is_usage() && !all[10].is_usage());
        assert_eq!(
            all[9].to_string(),
            "/etc/pmad/pmad.toml: recipe[0].window: must be at least 1"
        );
        assert!(all[10].to_string().contains("a bug in pmad"));
    }
}
