//! The error type of tq-onnx: every bad bundle, unsupported graph and runtime failure is typed.

use std::path::PathBuf;

/// Errors of tq-onnx.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file of the bundle is missing.
    #[error("{dir}: missing {what} (looked for {tried})")]
    MissingFile {
        /// The bundle directory.
        dir: PathBuf,
        /// What was looked for (model, tokenizer, config).
        what: &'static str,
        /// The file names tried.
        tried: String,
    },
    /// `config.json` is unreadable or lacks a field.
    #[error("{path}: {reason}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The tokenizer could not be loaded or failed on a text.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be rendered.
    #[error("chat template: {0}")]
    Template(String),
    /// The graph is not a supported decoder-only model (names what is missing or wrong).
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// tract failed to load, optimize or run the graph.
    #[error("tract: {0}")]
    Tract(String),
    /// A caller's argument is out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The quantized KV cache rejected an operation.
    #[error(transparent)]
    Kv(#[from] tq_kv::Error),
    /// Reading or writing a file failed.
    #[error("i/o error on {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Result alias of tq-onnx.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Wraps a tract error with what was being done.
pub(crate) fn tract(what: &str) -> impl FnOnce(tract_onnx::prelude::TractError) -> Error + '_ {
    move |e| Error::Tract(format!("{what}: {e:#}"))
}
