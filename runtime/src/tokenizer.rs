//! Tokenisation (via the `tokenizers` crate) and chat templates (via
//! `minijinja`), loaded from a Hugging Face checkpoint directory or rebuilt
//! from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! The GGUF path reproduces what Hugging Face transformers (5.x,
//! `integrations/gguf/gguf_tokenizer_mapping.py`) builds from the same
//! metadata, because transformers is the reference our golden outputs come
//! from: a byte-level BPE over the file's tokens and merges, tokens marked
//! CONTROL added as special tokens and USER_DEFINED ones as plain added
//! tokens, and a pre-tokenizer chosen from `tokenizer.ggml.pre` (see
//! [`gguf_pre_tokenizer_regex`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{Error, Result};
use crate::gguf::{GgufArray, GgufFile, GgufValue};

/// One turn of a conversation, as chat templates expect it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// The template used when a model ships none: plain ChatML, which is what
/// most instruction-tuned models in the supported families use.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// llama.cpp's `tokenizer.ggml.token_type` values that matter here.
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// A text tokenizer with its special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The file the tokenizer came from, for error messages.
    source: PathBuf,
    vocab_size: usize,
    bos_id: Option<u32>,
    bos_token: Option<String>,
    eos_ids: Vec<u32>,
    eos_token: Option<String>,
    /// Whether `encode(.., true)` must prepend BOS itself because the
    /// tokenizer's post-processor does not.
    prepend_bos: bool,
    /// Whether `encode(.., true)` must append EOS itself.
    append_eos: bool,
    /// Whether the post-processor adds a BOS that the configuration says not
    /// to add (`add_bos_token: false`), so `encode` removes it.
    strip_bos: bool,
    chat_template: Option<String>,
    /// `tokenizer.ggml.pre` when loaded from GGUF, kept so that writing the
    /// tokenizer back to GGUF reproduces the same pre-tokenizer.
    gguf_pre: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size)
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

fn tok_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Tokenizer {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads an optional JSON file: `Ok(None)` when it does not exist.
fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map(Some).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        format: "JSON",
        reason: e.to_string(),
    })
}

/// A special token in `tokenizer_config.json` is either a string or an
/// `AddedToken` object with a `content` field.
fn special_token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

/// `eos_token_id` in `generation_config.json` is an integer or a list.
fn json_ids(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().and_then(|x| u32::try_from(x).ok()).into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
            .collect(),
        _ => Vec::new(),
    }
}

/// `chat_template` in `tokenizer_config.json` is a string or, in newer
/// files, a list of `{name, template}` of which `default` is the chat one.
fn config_chat_template(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => {
            let named = |n: &str| {
                list.iter()
                    .find(|t| t.get("name").and_then(|x| x.as_str()) == Some(n))
                    .and_then(|t| t.get("template")?.as_str().map(String::from))
            };
            named("default").or_else(|| list.first()?.get("template")?.as_str().map(String::from))
        }
        _ => None,
    }
}

fn push_unique(ids: &mut Vec<u32>, id: u32) {
    if !ids.contains(&id) {
        ids.push(id);
    }
}

/// GPT-2's reversible byte-to-character table: printable bytes map to
/// themselves, the rest to code points from U+0100 up. Byte-level BPE
/// vocabularies are spelled in these characters.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let cp = if printable {
            u32::from(b)
        } else {
            next += 1;
            next - 1
        };
        table[b as usize] = char::from_u32(cp).unwrap_or('\u{FFFD}');
    }
    table
}

/// The pre-tokenizer split regex transformers uses for a GGUF's
/// `tokenizer.ggml.pre`, or `None` for GPT-2's own byte-level regex (which
/// transformers uses for every other value, including SmolLM2's `smollm`).
///
/// Note that llama.cpp itself splits digits individually before the GPT-2
/// regex for `smollm`; the two agree except on whitespace directly before a
/// digit (e.g. `"  1"`), and we follow transformers.
pub fn gguf_pre_tokenizer_regex(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN35: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2"
        | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3,
        "tekken" => TEKKEN,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2,
        "qwen35" => QWEN35,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O,
        _ => return None,
    })
}

impl Tokenizer {
    /// From a Hugging Face directory: `tokenizer.json` (required; `Ok(None)`
    /// without it), `tokenizer_config.json` (`chat_template`, `bos_token`,
    /// `eos_token`, `add_bos_token`), `chat_template.jinja` (preferred over
    /// the config's template, as transformers does) and
    /// `generation_config.json` (`eos_token_id`, an integer or a list, adds
    /// to the ids that end generation).
    pub fn from_hf_dir(dir: &Path) -> Result<Option<Tokenizer>> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Ok(None);
        }
        let inner = tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| tok_err(&tok_path, e.to_string()))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = read_json(&cfg_path)?;
        let gen_cfg = read_json(&dir.join("generation_config.json"))?;
        let field = |k: &str| cfg.as_ref().and_then(|c| c.get(k));

        // A named special token that is not in the vocabulary would make
        // BOS/EOS handling silently wrong, so it is an error.
        let lookup = |key: &str| -> Result<Option<(String, u32)>> {
            match special_token_string(field(key)) {
                None => Ok(None),
                Some(s) => match inner.token_to_id(&s) {
                    Some(id) => Ok(Some((s, id))),
                    None => Err(tok_err(
                        &cfg_path,
                        format!("{key} `{s}` is not in the vocabulary of {}", tok_path.display()),
                    )),
                },
            }
        };
        let bos = lookup("bos_token")?;
        let eos = lookup("eos_token")?;
        let gen_field = |k: &str| gen_cfg.as_ref().and_then(|c| c.get(k));

        let bos_id = bos
            .as_ref()
            .map(|b| b.1)
            .or_else(|| json_ids(gen_field("bos_token_id")).first().copied());
        let bos_token = bos.map(|b| b.0).or_else(|| bos_id.and_then(|id| inner.id_to_token(id)));
        let mut eos_ids = Vec::new();
        if let Some((_, id)) = &eos {
            eos_ids.push(*id);
        }
        for id in json_ids(gen_field("eos_token_id")) {
            push_unique(&mut eos_ids, id);
        }
        let eos_token = eos
            .map(|e| e.0)
            .or_else(|| eos_ids.first().and_then(|&id| inner.id_to_token(id)));

        let jinja_path = dir.join("chat_template.jinja");
        let chat_template = if jinja_path.is_file() {
            Some(std::fs::read_to_string(&jinja_path).map_err(|e| Error::io(&jinja_path, e))?)
        } else if let Some(t) = config_chat_template(field("chat_template")) {
            Some(t)
        } else {
            // Older multimodal checkpoints keep it in chat_template.json.
            config_chat_template(
                read_json(&dir.join("chat_template.json"))?
                    .as_ref()
                    .and_then(|c| c.get("chat_template")),
            )
        };

        // Whether the tokenizer.json post-processor already adds BOS is
        // learnt by encoding the empty string once.
        let probe = inner.encode("", true).map_err(|e| tok_err(&tok_path, e.to_string()))?;
        let pp_adds_bos = bos_id.is_some() && probe.get_ids().first().copied() == bos_id;
        let want_bos = field("add_bos_token").and_then(|v| v.as_bool()).unwrap_or(pp_adds_bos);

        Ok(Some(Tokenizer::assemble(
            inner,
            tok_path,
            bos_id,
            bos_token,
            eos_ids,
            eos_token,
            want_bos && !pp_adds_bos && bos_id.is_some(),
            false,
            !want_bos && pp_adds_bos,
            chat_template,
        )))
    }

    /// From GGUF metadata (`tokenizer.ggml.*`). `Ok(None)` if the file has no
    /// tokenizer. Only byte-level BPE (`tokenizer.ggml.model = "gpt2"`) is
    /// supported; SentencePiece (`"llama"`) gives a clear error.
    pub fn from_gguf(g: &GgufFile) -> Result<Option<Tokenizer>> {
        let path = g.path.as_path();
        let model = match g.opt_str("tokenizer.ggml.model")? {
            None | Some("none") | Some("") => return Ok(None),
            Some(m) => m,
        };
        match model {
            "gpt2" => {}
            "llama" => {
                return Err(tok_err(
                    path,
                    "tokenizer.ggml.model = \"llama\" (SentencePiece) is not supported yet; \
                     only byte-level BPE (\"gpt2\") tokenizers can be read from GGUF",
                ));
            }
            other => {
                return Err(tok_err(
                    path,
                    format!("tokenizer.ggml.model = {other:?} is not supported (only \"gpt2\", byte-level BPE)"),
                ));
            }
        }

        let tokens = g.get_str_array("tokenizer.ggml.tokens")?;
        if tokens.len() > u32::MAX as usize {
            return Err(tok_err(path, "tokenizer.ggml.tokens has more than 2^32 entries"));
        }
        let token_types = g.opt_i64_array("tokenizer.ggml.token_type")?.unwrap_or_default();
        if !token_types.is_empty() && token_types.len() != tokens.len() {
            return Err(tok_err(
                path,
                format!(
                    "tokenizer.ggml.token_type has {} entries but tokenizer.ggml.tokens has {}",
                    token_types.len(),
                    tokens.len()
                ),
            ));
        }
        let merges_raw = g.get_str_array("tokenizer.ggml.merges")?;
        let pre = g.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");

        // transformers re-spells a token that uses characters outside the
        // byte-level alphabet (as some converters store added tokens) into
        // that alphabet; later tokens win on duplicates, as in its dict.
        let spelling = bytes_to_unicode();
        let alphabet: std::collections::HashSet<char> = spelling.iter().copied().collect();
        let mut vocab = Vocab::default();
        for (i, t) in tokens.iter().enumerate() {
            let key = if t.chars().all(|c| alphabet.contains(&c)) {
                t.clone()
            } else {
                t.bytes().map(|b| spelling[b as usize]).collect()
            };
            vocab.insert(key, i as u32);
        }
        let mut merges: Merges = Vec::with_capacity(merges_raw.len());
        for (i, m) in merges_raw.iter().enumerate() {
            let (a, b) = m.split_once(' ').ok_or_else(|| {
                tok_err(
                    path,
                    format!("tokenizer.ggml.merges[{i}] = {m:?} is not \"left right\""),
                )
            })?;
            merges.push((a.to_string(), b.to_string()));
        }
        let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| {
            tok_err(
                path,
                format!("building the BPE model from tokenizer.ggml.tokens/merges: {e}"),
            )
        })?;

        let mut inner = tokenizers::Tokenizer::new(bpe);
        let pre_tokenizer: PreTokenizerWrapper = match gguf_pre_tokenizer_regex(pre) {
            Some(regex) => {
                let split = Split::new(
                    SplitPattern::Regex(regex.to_string()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| {
                    tok_err(
                        path,
                        format!("pre-tokenizer regex for tokenizer.ggml.pre = {pre:?}: {e}"),
                    )
                })?;
                Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into()
            }
            None => ByteLevel::new(false, true, true).into(),
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));

        let id_of = |key: &str| -> Result<Option<u32>> {
            match g.opt_u32(key)? {
                Some(id) if (id as usize) < tokens.len() => Ok(Some(id)),
                Some(id) => Err(tok_err(
                    path,
                    format!("{key} = {id} is outside the vocabulary ({} tokens)", tokens.len()),
                )),
                None => Ok(None),
            }
        };
        let bos_id = id_of("tokenizer.ggml.bos_token_id")?;
        let eos_id = id_of("tokenizer.ggml.eos_token_id")?;
        let mut eos_ids = Vec::new();
        // llama.cpp also stops at end-of-turn and end-of-message tokens.
        for id in [
            eos_id,
            id_of("tokenizer.ggml.eot_token_id")?,
            id_of("tokenizer.ggml.eom_token_id")?,
        ]
        .into_iter()
        .flatten()
        {
            push_unique(&mut eos_ids, id);
        }

        // CONTROL tokens become special added tokens (so `<|im_start|>` in a
        // rendered prompt stays one token and is skipped when decoding with
        // skip_special_tokens), skipping any spelled outside the byte
        // alphabet as transformers does (those are llama.cpp mislabels).
        // USER_DEFINED tokens are matched whole but are not special.
        let mut specials = Vec::new();
        let mut user_defined = Vec::new();
        for (t, &ty) in tokens.iter().zip(&token_types) {
            if ty == TOKEN_TYPE_CONTROL && t.chars().all(|c| alphabet.contains(&c)) {
                specials.push(AddedToken::from(t.clone(), true).normalized(false));
            } else if ty == TOKEN_TYPE_USER_DEFINED && inner.token_to_id(t).is_some() {
                user_defined.push(AddedToken::from(t.clone(), false).normalized(false));
            }
        }
        // BOS/EOS are special in transformers even when not typed CONTROL.
        for id in [bos_id, eos_id].into_iter().flatten() {
            let t = &tokens[id as usize];
            if !specials.iter().any(|s| &s.content == t) {
                specials.push(AddedToken::from(t.clone(), true).normalized(false));
            }
        }
        inner.add_special_tokens(&specials);
        inner.add_tokens(&user_defined);

        let add_bos = g.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
        let add_eos = g.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        let chat_template = g.opt_str("tokenizer.chat_template")?.map(String::from);
        let bos_token = bos_id.map(|id| tokens[id as usize].clone());
        let eos_token = eos_id.map(|id| tokens[id as usize].clone());
        let mut tok = Tokenizer::assemble(
            inner,
            g.path.clone(),
            bos_id,
            bos_token,
            eos_ids,
            eos_token,
            add_bos && bos_id.is_some(),
            add_eos && eos_id.is_some(),
            false,
            chat_template,
        );
        // The model's embedding has one row per GGUF token, duplicates included.
        tok.vocab_size = tok.vocab_size.max(tokens.len());
        tok.gguf_pre = Some(pre.to_string());
        Ok(Some(tok))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        inner: tokenizers::Tokenizer,
        source: PathBuf,
        bos_id: Option<u32>,
        bos_token: Option<String>,
        eos_ids: Vec<u32>,
        eos_token: Option<String>,
        prepend_bos: bool,
        append_eos: bool,
        strip_bos: bool,
        chat_template: Option<String>,
    ) -> Tokenizer {
        // One past the largest id, so ids with holes below are still counted.
        let vocab: HashMap<String, u32> = inner.get_vocab(true);
        let vocab_size = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
        Tokenizer {
            inner,
            source,
            vocab_size,
            bos_id,
            bos_token,
            eos_ids,
            eos_token,
            prepend_bos,
            append_eos,
            strip_bos,
            chat_template,
            gguf_pre: None,
        }
    }

    /// Token ids for `text`. Special tokens written in the text (such as
    /// `<|im_start|>` in a rendered chat prompt) always map to their ids;
    /// `add_special_tokens` decides whether BOS/EOS are added around the text
    /// as the model's configuration asks.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| tok_err(&self.source, format!("encoding failed: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        if add_special_tokens {
            if self.strip_bos && !ids.is_empty() && ids.first().copied() == self.bos_id {
                ids.remove(0);
            }
            if let (true, Some(bos)) = (self.prepend_bos, self.bos_id) {
                ids.insert(0, bos);
            }
            if let (true, Some(&eos)) = (self.append_eos, self.eos_ids.first()) {
                ids.push(eos);
            }
        }
        Ok(ids)
    }

    /// Text for `ids`. Ids outside the vocabulary (a model's embedding may be
    /// padded past the tokenizer's size) are skipped, as transformers does.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| tok_err(&self.source, format!("decoding failed: {e}")))
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// All ids that end generation: the tokenizer's EOS first, then any
    /// others the configuration lists (generation_config, GGUF EOT/EOM).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.inner.token_to_id(s)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The model's own chat template, if it has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Renders the chat template as transformers does (Jinja with
    /// `trim_blocks` and `lstrip_blocks`), passing `messages`,
    /// `add_generation_prompt`, `bos_token`, `eos_token` and a
    /// `raise_exception` function; Python string methods such as `.strip()`
    /// work through minijinja-contrib's pycompat layer.
    ///
    /// If the model has no template, the plain ChatML template
    /// [`CHATML_TEMPLATE`] is used instead.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        render_chat_template(
            self.chat_template.as_deref().unwrap_or(CHATML_TEMPLATE),
            messages,
            add_generation_prompt,
            self.bos_token.as_deref().unwrap_or(""),
            self.eos_token.as_deref().unwrap_or(""),
        )
    }

    /// The token prompt for a chat: `messages` rendered with the chat
    /// template and a generation prompt, then tokenized. This is the one
    /// place every front end (CLI, server, eval, viewer, browser) turns
    /// messages into ids. No special tokens are added again: the template
    /// writes the BOS token (and every other special token) into the text
    /// itself, as Hugging Face's `apply_chat_template(tokenize=True)`
    /// assumes. A template error is [`Error::ChatTemplate`]; a tokenizer
    /// error names the tokenizer file.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let text = self.apply_chat_template(messages, true)?;
        self.encode(&text, false)
    }
}

impl Tokenizer {
    /// The tokenizer as llama.cpp `tokenizer.ggml.*` metadata (plus
    /// `tokenizer.chat_template`), for writing a GGUF that
    /// [`Tokenizer::from_gguf`] reads back to the same encodings.
    ///
    /// Only byte-level BPE tokenizers can be expressed: the BPE model without
    /// byte fallback or subword affixes, and a pre-tokenizer that is GPT-2's
    /// byte-level regex (optionally after splitting digits, written as
    /// `smollm` as llama.cpp does) or one of the split regexes of
    /// [`gguf_pre_tokenizer_regex`]. An NFC normalizer (Qwen2) is dropped,
    /// matching what transformers builds from such a GGUF. Anything else is
    /// an [`Error::Tokenizer`].
    pub fn gguf_metadata(&self) -> Result<Vec<(String, GgufValue)>> {
        let err = |reason: String| tok_err(&self.source, format!("cannot write as GGUF: {reason}"));
        let json: serde_json::Value = self
            .inner
            .to_string(false)
            .map_err(|e| err(e.to_string()))
            .and_then(|s| serde_json::from_str(&s).map_err(|e| err(e.to_string())))?;

        let model = &json["model"];
        if model["type"].as_str() != Some("BPE") {
            return Err(err(format!("model type {} is not BPE", model["type"])));
        }
        if model["byte_fallback"].as_bool() == Some(true) {
            return Err(err(
                "BPE with byte_fallback (SentencePiece-style) is not byte-level".into()
            ));
        }
        for affix in ["continuing_subword_prefix", "end_of_word_suffix"] {
            if model[affix].as_str().is_some_and(|s| !s.is_empty()) {
                return Err(err(format!("BPE {affix} is not supported")));
            }
        }
        match json["normalizer"]["type"].as_str() {
            None | Some("NFC") => {}
            Some(other) => return Err(err(format!("normalizer {other} has no GGUF equivalent"))),
        }
        if !matches!(json["decoder"]["type"].as_str(), Some("ByteLevel")) {
            return Err(err(format!("decoder {} is not ByteLevel", json["decoder"])));
        }
        let pre = match &self.gguf_pre {
            // Files written by earlier Lynx versions say `gpt2`.
            Some(p) if p == "gpt2" => "gpt-2".to_string(),
            Some(p) => p.clone(),
            None => gguf_pre_name(&json["pre_tokenizer"]).ok_or_else(|| {
                err(format!(
                    "pre-tokenizer {} has no GGUF equivalent",
                    json["pre_tokenizer"]
                ))
            })?,
        };

        // Tokens in id order; ids nobody uses are filled the way llama.cpp's
        // converter does, so the array index stays the token id.
        const NORMAL: i32 = 1;
        const UNUSED: i32 = 5;
        let mut tokens: Vec<Option<String>> = vec![None; self.vocab_size];
        for (t, id) in self.inner.get_vocab(true) {
            if let Some(slot) = tokens.get_mut(id as usize) {
                *slot = Some(t);
            }
        }
        let added = self.inner.get_added_tokens_decoder();
        let mut types = Vec::with_capacity(tokens.len());
        let tokens: Vec<String> = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                let ty = match added.get(&(i as u32)) {
                    Some(a) if a.special => TOKEN_TYPE_CONTROL as i32,
                    Some(_) => TOKEN_TYPE_USER_DEFINED as i32,
                    None if t.is_some() => NORMAL,
                    None => UNUSED,
                };
                types.push(ty);
                t.unwrap_or_else(|| format!("[PAD{i}]"))
            })
            .collect();

        // Merges are "a b" strings in GGUF; tokenizer.json has either form.
        let merges = model["merges"]
            .as_array()
            .ok_or_else(|| err("BPE model has no merges".into()))?
            .iter()
            .map(|m| match m {
                serde_json::Value::String(s) => Ok(s.clone()),
                serde_json::Value::Array(p) => {
                    match (p.first().and_then(|x| x.as_str()), p.get(1).and_then(|x| x.as_str())) {
                        (Some(a), Some(b)) if p.len() == 2 => Ok(format!("{a} {b}")),
                        _ => Err(err(format!("malformed merge {m}"))),
                    }
                }
                _ => Err(err(format!("malformed merge {m}"))),
            })
            .collect::<Result<Vec<String>>>()?;

        // Whether encode() adds BOS/EOS is read off its behaviour, which
        // covers post-processors and configuration flags alike.
        let probe = self.encode("", true)?;
        let add_bos = self.bos_id.is_some() && probe.first().copied() == self.bos_id;
        let eos = self.eos_ids.first().copied();
        let add_eos = eos.is_some() && probe.len() > usize::from(add_bos) && probe.last().copied() == eos;

        let mut meta: Vec<(String, GgufValue)> = vec![
            ("tokenizer.ggml.model".into(), "gpt2".into()),
            ("tokenizer.ggml.pre".into(), pre.into()),
            ("tokenizer.ggml.tokens".into(), tokens.into()),
            (
                "tokenizer.ggml.token_type".into(),
                GgufValue::Array(GgufArray::I32(types)),
            ),
            ("tokenizer.ggml.merges".into(), merges.into()),
        ];
        if let Some(id) = self.bos_id {
            meta.push(("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(id)));
        }
        if let Some(id) = eos {
            meta.push(("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(id)));
        }
        // GGUF has one more stop-token slot; a second EOS id goes there.
        if let Some(&id) = self.eos_ids.get(1) {
            meta.push(("tokenizer.ggml.eot_token_id".into(), GgufValue::U32(id)));
        }
        meta.push(("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(add_bos)));
        meta.push(("tokenizer.ggml.add_eos_token".into(), GgufValue::Bool(add_eos)));
        if let Some(t) = &self.chat_template {
            meta.push(("tokenizer.chat_template".into(), t.as_str().into()));
        }
        Ok(meta)
    }
}

/// The `tokenizer.ggml.pre` name for a tokenizer.json pre-tokenizer, if the
/// GGUF reader can rebuild it.
fn gguf_pre_name(pt: &serde_json::Value) -> Option<String> {
    let is_byte_level = |v: &serde_json::Value, regex: bool| {
        v["type"].as_str() == Some("ByteLevel")
            && v["use_regex"].as_bool().unwrap_or(true) == regex
            && !v["add_prefix_space"].as_bool().unwrap_or(false)
    };
    // llama.cpp spells GPT-2's pre-tokenizer `gpt-2` and refuses `gpt2`;
    // any name the reader does not know gets GPT-2's regex, so both load here.
    if is_byte_level(pt, true) {
        return Some("gpt-2".into());
    }
    if pt["type"].as_str() != Some("Sequence") {
        return None;
    }
    let parts = pt["pretokenizers"].as_array()?;
    match parts.as_slice() {
        [d, b]
            if d["type"].as_str() == Some("Digits")
                && d["individual_digits"].as_bool() == Some(true)
                && is_byte_level(b, true) =>
        {
            Some("smollm".into())
        }
        [s, b]
            if s["type"].as_str() == Some("Split")
                && s["behavior"].as_str() == Some("Isolated")
                && !s["invert"].as_bool().unwrap_or(false)
                && is_byte_level(b, false) =>
        {
            let re = s["pattern"]["Regex"].as_str()?;
            ["llama-bpe", "qwen2", "qwen35", "tekken", "gpt-4o"]
                .into_iter()
                .find(|name| gguf_pre_tokenizer_regex(name) == Some(re))
                .map(String::from)
        }
        _ => None,
    }
}

/// Renders a Hugging Face chat template (see [`Tokenizer::apply_chat_template`]).
pub fn render_chat_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    // transformers renders with these two Jinja options; without them the
    // block tags of most templates leave stray newlines and indentation.
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<minijinja::Value, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        },
    );
    let tmpl = env
        .template_from_str(template)
        .map_err(|e| Error::ChatTemplate(format!("template does not parse: {e}")))?;
    tmpl.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(|e| Error::ChatTemplate(format!("rendering failed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::write_gguf;

    /// A fresh directory under the system temp dir for one test.
    fn temp_dir(tag: &str) -> PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("lynx-tok-test-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A tiny byte-level BPE: the 256 byte characters, a few merges, and
    /// four added special tokens after them.
    fn tiny_vocab() -> (Vec<String>, Vec<String>) {
        let mut tokens: Vec<String> = bytes_to_unicode().iter().map(|c| c.to_string()).collect();
        let merges = [
            "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d",
        ];
        for m in merges {
            tokens.push(m.replace(' ', ""));
        }
        for s in ["<s>", "</s>", "<|im_start|>", "<|im_end|>"] {
            tokens.push(s.to_string());
        }
        (tokens, merges.iter().map(|m| m.to_string()).collect())
    }

    fn write_hf_dir(dir: &Path, config: serde_json::Value, generation: Option<serde_json::Value>) {
        let (tokens, merges) = tiny_vocab();
        let vocab: serde_json::Map<String, serde_json::Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), serde_json::json!(i)))
            .collect();
        let added: Vec<serde_json::Value> = tokens
            .iter()
            .enumerate()
            .skip(tokens.len() - 4)
            .map(|(i, t)| {
                serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                                   "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let tj = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "vocab": vocab, "merges": merges}
        });
        std::fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
        if let Some(g) = generation {
            std::fs::write(dir.join("generation_config.json"), g.to_string()).unwrap();
        }
    }

    const STRIP_TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}\n\
{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}\n\
[{{ m['role'] | upper }}] {{ m['content'].strip() }}{{ eos_token }}\n\
{% endfor %}\n\
{% if add_generation_prompt %}[ASSISTANT] {% endif %}";

    #[test]
    fn hf_dir_tokenizer_specials_and_roundtrip() {
        let dir = temp_dir("hf");
        write_hf_dir(
            &dir,
            serde_json::json!({"bos_token": "<s>", "eos_token": {"content": "<|im_end|>"}, "add_bos_token": true,
                               "chat_template": STRIP_TEMPLATE}),
            Some(serde_json::json!({"eos_token_id": [268, 266]})),
        );
        let tok = Tokenizer::from_hf_dir(&dir).unwrap().unwrap();
        let (tokens, _) = tiny_vocab();
        let id = |s: &str| tokens.iter().position(|t| t == s).unwrap() as u32;
        assert_eq!(tok.vocab_size(), tokens.len());
        assert_eq!(tok.bos_token_id(), Some(id("<s>")));
        // tokenizer_config's EOS first, then generation_config's others.
        assert_eq!(tok.eos_token_ids(), &[id("<|im_end|>"), id("</s>")]);
        assert_eq!(tok.token_to_id("Ġworld"), Some(id("Ġworld")));

        let plain = tok.encode("hello world", false).unwrap();
        assert_eq!(plain, vec![id("hello"), id("Ġworld")]);
        let with_bos = tok.encode("hello world", true).unwrap();
        assert_eq!(with_bos, vec![id("<s>"), id("hello"), id("Ġworld")]);
        assert_eq!(tok.decode(&plain, false).unwrap(), "hello world");
        // Special tokens in text are single ids, and skippable when decoding.
        let chat = tok.encode("<|im_start|>hello<|im_end|>", false).unwrap();
        assert_eq!(chat, vec![id("<|im_start|>"), id("hello"), id("<|im_end|>")]);
        assert_eq!(tok.decode(&chat, true).unwrap(), "hello");
        assert_eq!(tok.decode(&chat, false).unwrap(), "<|im_start|>hello<|im_end|>");
        // Ids past the vocabulary (padded embeddings) decode to nothing.
        assert_eq!(tok.decode(&[id("hello"), 1_000_000], false).unwrap(), "hello");

        let msgs = [ChatMessage::user("  hi there \n"), ChatMessage::assistant("ok")];
        assert_eq!(
            tok.apply_chat_template(&msgs, true).unwrap(),
            "<s>[USER] hi there<|im_end|>\n[ASSISTANT] ok<|im_end|>\n[ASSISTANT] "
        );
        assert_eq!(
            tok.apply_chat_template(&msgs[..1], false).unwrap(),
            "<s>[USER] hi there<|im_end|>\n"
        );
        match tok.apply_chat_template(&[ChatMessage::system("x")], true) {
            Err(Error::ChatTemplate(m)) => assert!(m.contains("no system role"), "{m}"),
            other => panic!("expected a ChatTemplate error, got {other:?}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn hf_dir_template_file_fallbacks_and_absence() {
        let dir = temp_dir("hf-jinja");
        write_hf_dir(
            &dir,
            serde_json::json!({"eos_token": "</s>", "chat_template": "config"}),
            None,
        );
        std::fs::write(dir.join("chat_template.jinja"), "{{ messages[0].content.upper() }}").unwrap();
        let tok = Tokenizer::from_hf_dir(&dir).unwrap().unwrap();
        assert_eq!(tok.bos_token_id(), None);
        assert_eq!(tok.encode("hello", true).unwrap().len(), 1, "no BOS to add");
        assert_eq!(
            tok.apply_chat_template(&[ChatMessage::user("abc")], false).unwrap(),
            "ABC"
        );

        // Without any template, ChatML is used.
        std::fs::remove_file(dir.join("chat_template.jinja")).unwrap();
        write_hf_dir(&dir, serde_json::json!({"eos_token": "</s>"}), None);
        let tok = Tokenizer::from_hf_dir(&dir).unwrap().unwrap();
        assert_eq!(tok.chat_template(), None);
        assert_eq!(
            tok.apply_chat_template(&[ChatMessage::user("hi")], true).unwrap(),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );

        // A named special token outside the vocabulary is reported.
        write_hf_dir(&dir, serde_json::json!({"eos_token": "<nope>"}), None);
        match Tokenizer::from_hf_dir(&dir) {
            Err(Error::Tokenizer { reason, .. }) => assert!(reason.contains("<nope>"), "{reason}"),
            other => panic!("expected a Tokenizer error, got {other:?}"),
        }

        // No tokenizer.json at all: no tokenizer, no error.
        let empty = temp_dir("hf-empty");
        assert!(Tokenizer::from_hf_dir(&empty).unwrap().is_none());
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&empty);
    }

    #[test]
    fn template_errors_are_chat_template_errors() {
        let r = render_chat_template("{% for %}", &[], false, "", "");
        assert!(matches!(r, Err(Error::ChatTemplate(_))), "{r:?}");
        let s = render_chat_template(
            "{% if messages[0]['content'].startswith('/') %}cmd{% endif %}|{{ messages | length }}",
            &[ChatMessage::user("/x")],
            false,
            "",
            "",
        )
        .unwrap();
        assert_eq!(s, "cmd|1");
    }

    fn tiny_gguf(dir: &Path, model: &str, add_bos: bool) -> GgufFile {
        let (tokens, merges) = tiny_vocab();
        let n = tokens.len();
        let mut types = vec![1i32; n];
        types[n - 4..].fill(3);
        // Mark "hello" as user-defined: it must then be matched whole.
        types[256 + 3] = 4;
        let meta = vec![
            ("general.architecture".to_string(), GgufValue::from("llama")),
            ("tokenizer.ggml.model".into(), model.into()),
            ("tokenizer.ggml.pre".into(), "smollm".into()),
            ("tokenizer.ggml.tokens".into(), tokens.clone().into()),
            (
                "tokenizer.ggml.token_type".into(),
                GgufValue::Array(GgufArray::I32(types)),
            ),
            ("tokenizer.ggml.merges".into(), merges.into()),
            ("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(n as u32 - 4)),
            ("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(n as u32 - 1)),
            ("tokenizer.ggml.eot_token_id".into(), GgufValue::U32(n as u32 - 3)),
            ("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(add_bos)),
        ];
        let path = dir.join("tiny.gguf");
        write_gguf(&path, &meta, &[]).unwrap();
        GgufFile::open(&path).unwrap()
    }

    #[test]
    fn gguf_tokenizer_from_metadata() {
        let dir = temp_dir("gguf");
        let g = tiny_gguf(&dir, "gpt2", true);
        let tok = Tokenizer::from_gguf(&g).unwrap().unwrap();
        let (tokens, _) = tiny_vocab();
        let n = tokens.len() as u32;
        let id = |s: &str| tokens.iter().position(|t| t == s).unwrap() as u32;
        assert_eq!(tok.vocab_size(), tokens.len());
        assert_eq!(tok.bos_token_id(), Some(n - 4));
        assert_eq!(tok.eos_token_ids(), &[n - 1, n - 3]);
        let ids = tok.encode("<|im_start|>hello world<|im_end|>", true).unwrap();
        assert_eq!(ids, vec![n - 4, n - 2, id("hello"), id("Ġworld"), n - 1]);
        assert_eq!(tok.decode(&ids, true).unwrap(), "hello world");
        assert_eq!(
            tok.decode(&ids[1..], false).unwrap(),
            "<|im_start|>hello world<|im_end|>"
        );
        // The user-defined token is matched whole even inside a word.
        assert_eq!(
            tok.encode("xhellox", false).unwrap(),
            vec![id("x"), id("hello"), id("x")]
        );
        assert!(tok.chat_template().is_none());
        assert!(
            tok.apply_chat_template(&[ChatMessage::user("hi")], true)
                .unwrap()
                .ends_with("assistant\n")
        );

        let g = tiny_gguf(&dir, "llama", false);
        match Tokenizer::from_gguf(&g) {
            Err(Error::Tokenizer { reason, .. }) => assert!(reason.contains("SentencePiece"), "{reason}"),
            other => panic!("expected a Tokenizer error, got {other:?}"),
        }
        // A GGUF without tokenizer metadata has no tokenizer.
        let path = dir.join("bare.gguf");
        write_gguf(&path, &[("general.architecture".into(), "llama".into())], &[]).unwrap();
        assert!(Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn pre_tokenizer_regexes_compile() {
        for pre in ["llama-bpe", "qwen2", "qwen35", "tekken", "gpt-4o"] {
            let re = gguf_pre_tokenizer_regex(pre).unwrap();
            assert!(
                Split::new(SplitPattern::Regex(re.into()), SplitDelimiterBehavior::Isolated, false).is_ok(),
                "{pre}"
            );
        }
        assert_eq!(gguf_pre_tokenizer_regex("smollm"), None);
        assert_eq!(bytes_to_unicode()[b' ' as usize], 'Ġ');
        assert_eq!(bytes_to_unicode()[b'\n' as usize], 'Ċ');
    }

    fn smollm2() -> Option<Tokenizer> {
        let p = crate::gguf::tests::smollm2_path()?;
        let g = GgufFile::open(&p).unwrap();
        Some(Tokenizer::from_gguf(&g).unwrap().unwrap())
    }

    #[test]
    fn smollm2_gguf_tokenizer_basics() {
        let Some(tok) = smollm2() else { return };
        assert_eq!(tok.vocab_size(), 49152);
        assert_eq!(tok.bos_token_id(), Some(1));
        assert_eq!(tok.eos_token_ids(), &[2]);
        assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
        assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));

        let text = "Hello, world! 12345";
        let ids = tok.encode(text, true).unwrap();
        // add_bos_token is false in this file; digits are one token each.
        assert_ne!(ids[0], 1);
        let toks: Vec<String> = ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
        assert_eq!(&toks[toks.len() - 6..], ["Ġ", "1", "2", "3", "4", "5"]);
        assert_eq!(toks[..4], ["Hello", ",", "Ġworld", "!"]);
        assert_eq!(tok.decode(&ids, false).unwrap(), text);

        let prompt = tok
            .apply_chat_template(&[ChatMessage::user("What is the capital of France?")], true)
            .unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        );
        let ids = tok.encode(&prompt, true).unwrap();
        assert_eq!(ids[0], 1);
        assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 3);
        assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 2);
        assert_eq!(tok.decode(&ids, false).unwrap(), prompt);
    }

    /// Edge cases encoded by transformers 5.23 (tokenizers 0.23) from the
    /// SmolLM2 GGUF: `[text, ids, decode(ids, skip_special_tokens=True)]`.
    /// `"  1"` giving `Ġ Ġ 1` shows transformers uses the plain GPT-2
    /// byte-level regex for `smollm`, without llama.cpp's digit pre-split.
    const TRANSFORMERS_EXTRA_PROBES: &str = r#"[["  1", [216, 216, 33], "  1"], ["a  12 b", [81, 216, 216, 33, 34, 278], "a  12 b"], ["x\n\n\n 7", [104, 16506, 216, 39], "x\n\n\n 7"], ["Hello, world! 12345", [19556, 28, 905, 17, 216, 33, 34, 35, 36, 37], "Hello, world! 12345"], ["<|endoftext|><repo_name>x", [0, 3, 104], "x"], ["\u00a0nbsp\u3000ideo", [15442, 94, 32093, 12109, 218, 8496], "\u00a0nbsp\u3000ideo"], ["   ", [333], "   "], ["", [], ""], ["tab\t\t1\n", [15999, 197, 197, 33, 198], "tab\t\t1\n"], ["\u00e9moji \ud83d\udc4d\ud83c\udffd ok", [2756, 15771, 10381, 15107, 235, 231, 10813, 233, 138, 10907], "\u00e9moji \ud83d\udc4d\ud83c\udffd ok"], ["<|im_start|><|im_end|>", [1, 2], ""], ["<think>", [44, 17400, 46], "<think>"], ["3.14159e-10", [35, 30, 33, 36, 33, 37, 41, 85, 29, 33, 32], "3.14159e-10"], ["A\r\n\r\nB", [49, 7209, 198, 50], "A\r\n\r\nB"]]"#;

    #[test]
    fn smollm2_gguf_tokenizer_matches_transformers_edge_cases() {
        let Some(tok) = smollm2() else { return };
        let probes: Vec<(String, Vec<u32>, String)> = serde_json::from_str(TRANSFORMERS_EXTRA_PROBES).unwrap();
        for (text, ids, decoded) in probes {
            assert_eq!(tok.encode(&text, true).unwrap(), ids, "encode {text:?}");
            assert_eq!(tok.decode(&ids, true).unwrap(), decoded, "decode {text:?}");
        }
    }

    #[test]
    fn gguf_metadata_roundtrips_through_a_file() {
        let dir = temp_dir("export");
        write_hf_dir(
            &dir,
            serde_json::json!({"bos_token": "<s>", "eos_token": "<|im_end|>", "add_bos_token": true,
                               "chat_template": STRIP_TEMPLATE}),
            Some(serde_json::json!({"eos_token_id": [268, 266]})),
        );
        let mut sources = vec![("tiny hf".to_string(), Tokenizer::from_hf_dir(&dir).unwrap().unwrap())];
        if let Some(t) = smollm2() {
            sources.push(("smollm2".into(), t));
        }
        let texts = [
            "<|im_start|>user\nhello  world 12<|im_end|>\n",
            "  1 hello\tworld ÿ",
            "",
        ];
        for (name, src) in sources {
            let meta = src.gguf_metadata().unwrap();
            let path = dir.join("tok.gguf");
            write_gguf(&path, &meta, &[]).unwrap();
            let back = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap().unwrap();
            assert_eq!(back.vocab_size(), src.vocab_size(), "{name}");
            assert_eq!(back.bos_token_id(), src.bos_token_id(), "{name}");
            assert_eq!(back.eos_token_ids(), src.eos_token_ids(), "{name}");
            assert_eq!(back.chat_template(), src.chat_template(), "{name}");
            for t in texts {
                for special in [false, true] {
                    let ids = src.encode(t, special).unwrap();
                    assert_eq!(back.encode(t, special).unwrap(), ids, "{name}: {t:?}");
                    assert_eq!(
                        back.decode(&ids, true).unwrap(),
                        src.decode(&ids, true).unwrap(),
                        "{name}"
                    );
                }
            }
            let msgs = [ChatMessage::user(" hi ")];
            assert_eq!(
                back.apply_chat_template(&msgs, true).unwrap(),
                src.apply_chat_template(&msgs, true).unwrap()
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn gguf_pre_names_for_tokenizer_json_pre_tokenizers() {
        let bl = |regex: bool| serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "use_regex": regex});
        assert_eq!(gguf_pre_name(&bl(true)).as_deref(), Some("gpt-2"));
        let digits = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, bl(true)]});
        assert_eq!(gguf_pre_name(&digits).as_deref(), Some("smollm"));
        let qwen = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": gguf_pre_tokenizer_regex("qwen2").unwrap()},
             "behavior": "Isolated", "invert": false}, bl(false)]});
        assert_eq!(gguf_pre_name(&qwen).as_deref(), Some("qwen2"));
        assert_eq!(gguf_pre_name(&serde_json::json!({"type": "Whitespace"})), None);
    }

    /// Compares with the ids transformers produced from the same GGUF
    /// (models/fixtures/smollm2_golden.json, written by make_real_golden.py).
    #[test]
    fn smollm2_gguf_tokenizer_matches_transformers() {
        let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/fixtures/smollm2_golden.json");
        let Ok(text) = std::fs::read_to_string(&golden) else {
            eprintln!("skipping: {} not found", golden.display());
            return;
        };
        let Some(tok) = smollm2() else { return };
        let j: serde_json::Value = serde_json::from_str(&text).unwrap();
        let ids_of = |v: &serde_json::Value| -> Vec<u32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        };
        let mut checked = 0;
        for probe in j["tokenizer_probes"].as_array().unwrap() {
            let s = probe["text"].as_str().unwrap();
            let want = ids_of(&probe["ids"]);
            assert_eq!(tok.encode(s, true).unwrap(), want, "probe {s:?}");
            assert_eq!(
                tok.decode(&want, false).unwrap(),
                probe["decoded"].as_str().unwrap(),
                "decode {s:?}"
            );
            checked += 1;
        }
        for (name, p) in j["prompts"].as_object().unwrap() {
            let s = p["prompt_text"].as_str().unwrap();
            assert_eq!(tok.encode(s, true).unwrap(), ids_of(&p["prompt_ids"]), "prompt {name}");
            let new_ids = ids_of(&p["greedy_new_ids"]);
            assert_eq!(
                tok.decode(&new_ids, false).unwrap(),
                p["greedy_text"].as_str().unwrap(),
                "{name}"
            );
            assert_eq!(
                tok.decode(&new_ids, true).unwrap(),
                p["greedy_text_skip_special"].as_str().unwrap(),
                "{name}"
            );
            checked += 1;
        }
        // The chat prompt is what our template rendering produces.
        let chat = tok
            .apply_chat_template(&[ChatMessage::user("What is the capital of France?")], true)
            .unwrap();
        assert_eq!(chat, j["prompts"]["chat"]["prompt_text"].as_str().unwrap());
        assert_eq!(tok.chat_template(), j["tokenizer"]["chat_template"].as_str());
        assert!(checked >= 8, "golden file has too few cases");
    }
}
