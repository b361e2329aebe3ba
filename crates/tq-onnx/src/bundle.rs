//! A decoder bundle on disk: the ONNX graph, `tokenizer.json` and `config.json` (Hugging Face
//! field names), with the chat template when the bundle has one.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::{Error, Result};

/// ONNX file names looked for, in order.
pub const MODEL_FILES: [&str; 3] = [
    "model.onnx",
    "decoder_model_merged.onnx",
    "decoder_model.onnx",
];

/// The model facts read from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Model name (`name` or `_name_or_path`, else the directory name).
    pub name: String,
    /// Decoder layers (`num_hidden_layers`).
    pub layers: usize,
    /// Query heads (`num_attention_heads`).
    pub q_heads: usize,
    /// Key/value heads (`num_key_value_heads`, default `q_heads`).
    pub kv_heads: usize,
    /// Head dimension (`head_dim`, default `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// Vocabulary size (`vocab_size`).
    pub vocab: usize,
    /// Positions the model was trained for (`max_position_embeddings`), when given.
    pub max_positions: Option<usize>,
    /// End-of-sequence ids (`eos_token_id`, a number or a list; may be empty).
    pub eos_token_ids: Vec<u32>,
    /// Jinja chat template (`chat_template` in config.json or tokenizer_config.json).
    pub chat_template: Option<String>,
}

impl ModelConfig {
    /// Parses a `config.json` text; `path` names the file in errors.
    ///
    /// # Errors
    /// [`Error::Config`] for invalid JSON, an encoder-decoder model, or a missing / non-positive
    /// count.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Config {
            path: path.to_path_buf(),
            reason,
        };
        let v: Value = serde_json::from_str(text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        if v.get("is_encoder_decoder").and_then(Value::as_bool) == Some(true) {
            return Err(bad(
                "encoder-decoder models are not supported (decoder-only only)".into(),
            ));
        }
        let count = |key: &str| -> Result<Option<usize>> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => match x.as_u64() {
                    Some(n) if n > 0 => Ok(Some(n as usize)),
                    _ => Err(bad(format!(
                        "`{key}` must be a positive integer, found {x}"
                    ))),
                },
            }
        };
        let need = |key: &str| -> Result<usize> {
            count(key)?.ok_or_else(|| bad(format!("missing `{key}`")))
        };
        let layers = need("num_hidden_layers")?;
        let q_heads = need("num_attention_heads")?;
        let kv_heads = count("num_key_value_heads")?.unwrap_or(q_heads);
        let head_dim = match count("head_dim")? {
            Some(h) => h,
            None => need("hidden_size")? / q_heads,
        };
        let vocab = need("vocab_size")?;
        if head_dim == 0 || !q_heads.is_multiple_of(kv_heads) {
            return Err(bad(format!(
                "{q_heads} query heads, {kv_heads} kv heads and head_dim {head_dim} are inconsistent"
            )));
        }
        let eos_token_ids = match v.get("eos_token_id") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_u64().map(|n| n as u32))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("`eos_token_id` must hold integers".into()))?,
            Some(x) => vec![
                x.as_u64()
                    .ok_or_else(|| bad("`eos_token_id` must be an integer or a list".into()))?
                    as u32,
            ],
        };
        let name = v
            .get("name")
            .or_else(|| v.get("_name_or_path"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| {
                path.parent()
                    .and_then(Path::file_name)
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "model".into())
            });
        Ok(Self {
            name,
            layers,
            q_heads,
            kv_heads,
            head_dim,
            vocab,
            max_positions: count("max_position_embeddings")?,
            eos_token_ids,
            chat_template: v
                .get("chat_template")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }
}

/// A bundle directory, checked to hold its three files, with the tokenizer loaded.
pub struct Bundle {
    /// The directory.
    pub dir: PathBuf,
    /// The ONNX graph found (first of [`MODEL_FILES`]).
    pub model_path: PathBuf,
    /// The parsed `config.json`.
    pub config: ModelConfig,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle")
            .field("dir", &self.dir)
            .field("model_path", &self.model_path)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

impl Bundle {
    /// Opens `dir`: finds the graph, parses `config.json` (and `tokenizer_config.json`'s chat
    /// template when config.json has none) and loads `tokenizer.json`.
    ///
    /// # Errors
    /// [`Error::MissingFile`] naming the missing file, [`Error::Config`], [`Error::Tokenizer`].
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                dir,
                what: "bundle directory",
                tried: "an existing directory".into(),
            });
        }
        let model_path = MODEL_FILES
            .iter()
            .map(|n| dir.join(n))
            .find(|p| p.is_file())
            .ok_or_else(|| Error::MissingFile {
                dir: dir.clone(),
                what: "ONNX graph",
                tried: MODEL_FILES.join(", "),
            })?;
        let cfg_path = dir.join("config.json");
        if !cfg_path.is_file() {
            return Err(Error::MissingFile {
                dir,
                what: "model configuration",
                tried: "config.json".into(),
            });
        }
        let mut config = ModelConfig::parse(&read(&cfg_path)?, &cfg_path)?;
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(Error::MissingFile {
                dir,
                what: "tokenizer",
                tried: "tokenizer.json".into(),
            });
        }
        let tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", tok_path.display())))?;
        if config.chat_template.is_none() {
            let tc = dir.join("tokenizer_config.json");
            if tc.is_file() {
                let v: Value = serde_json::from_str(&read(&tc)?).map_err(|e| Error::Config {
                    path: tc.clone(),
                    reason: format!("invalid JSON: {e}"),
                })?;
                config.chat_template = v
                    .get("chat_template")
                    .and_then(Value::as_str)
                    .map(str::to_string);
            }
        }
        Ok(Self {
            dir,
            model_path,
            config,
            tokenizer,
        })
    }

    /// Token ids of `text` (no special tokens added: templates and prompts carry their own).
    ///
    /// # Errors
    /// [`Error::Tokenizer`].
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens skipped.
    ///
    /// # Errors
    /// [`Error::Tokenizer`].
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// `user` as a one-turn chat through the bundle's template with the generation prompt
    /// appended; the text unchanged when the bundle has no template.
    ///
    /// # Errors
    /// [`Error::Template`] when the template does not parse or render.
    pub fn chat_prompt(&self, user: &str) -> Result<String> {
        let Some(template) = &self.config.chat_template else {
            return Ok(user.to_string());
        };
        let mut env = minijinja::Environment::new();
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| Error::Template(e.to_string()))?;
        let tpl = env
            .get_template("chat")
            .map_err(|e| Error::Template(e.to_string()))?;
        tpl.render(minijinja::context! {
            messages => vec![minijinja::context! { role => "user", content => user }],
            add_generation_prompt => true,
            bos_token => "",
            eos_token => "",
        })
        .map_err(|e| Error::Template(e.to_string()))
    }
}
