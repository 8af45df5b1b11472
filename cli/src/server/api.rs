//! The OpenAI request bodies the server accepts, parsed by hand from JSON
//! so that every refusal names the offending field, and the OpenAI-style
//! error that every refusal becomes.
//!
//! Parsing never panics and never trusts the input: a body that is not
//! UTF-8, not JSON, not an object, or has a field of the wrong type or out
//! of range gives an [`ApiError`] with a 4xx status. Fields this server
//! does not know are ignored, as most OpenAI-compatible servers do, but
//! known features it cannot honour (`n > 1`, log-probabilities, tools,
//! penalties) are refused rather than silently dropped, because a client
//! that asked for them would otherwise get a different answer than it
//! expects.

use axum::http::StatusCode;
use serde_json::{Map, Value};

use lynx::generate::GenerateOptions;
use lynx::sampling::SamplingParams;
use lynx::selection::ExpertPolicy;
use lynx::tokenizer::ChatMessage;

/// OpenAI's limit on stop sequences per request.
pub const MAX_STOP_SEQUENCES: usize = 4;

/// An error as an OpenAI client expects it: an HTTP status and the body
/// `{"error": {"message", "type", "param", "code"}}`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's error type: `invalid_request_error`, `rate_limit_error`,
    /// `server_error`, ...
    pub kind: &'static str,
    /// The request field at fault, when there is one (`messages[2].role`).
    pub param: Option<String>,
    /// A machine-readable code (`model_not_found`, `queue_full`, ...).
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 `invalid_request_error` about `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
        }
    }

    /// A 400 `invalid_request_error` about the body as a whole.
    pub fn bad_body(message: impl Into<String>, code: &'static str) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some(code),
        }
    }

    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    /// A failure on the server's side, with `status` (5xx).
    pub fn server(status: StatusCode, message: impl Into<String>, code: &'static str) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: Some(code),
        }
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("not_found"),
        }
    }

    /// The `error` object alone, as sent inside an SSE stream.
    pub fn body(&self) -> Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

/// What parsing checks requests against: the served model's id and the
/// server's token limit.
#[derive(Clone, Debug)]
pub struct RequestRules {
    /// The id `/v1/models` lists; a request naming another model gets 404.
    /// A request without `model` uses this one.
    pub model_id: String,
    /// The most tokens one request may ask for; `max_tokens` above it is
    /// refused (400), not clamped, so that a client never receives less
    /// than it asked for without being told.
    pub max_tokens: usize,
}

/// Sampling and streaming fields shared by both endpoints.
#[derive(Clone, Debug, PartialEq)]
pub struct CommonParams {
    /// `max_tokens` (or `max_completion_tokens`); `None` takes the server's
    /// default.
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_p: f32,
    /// A common extension (vLLM, llama.cpp); 0 is off.
    pub top_k: usize,
    pub seed: u64,
    pub stop: Vec<String>,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the token counts.
    pub include_usage: bool,
    /// vLLM's `ignore_eos`: generate exactly `max_tokens` tokens, for
    /// benchmarks.
    pub ignore_eos: bool,
}

impl Default for CommonParams {
    /// OpenAI's defaults, except that the temperature is 0 (greedy): a
    /// local runtime is mostly driven by tools and tests that want
    /// reproducible output.
    fn default() -> Self {
        CommonParams {
            max_tokens: None,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            stop: Vec::new(),
            stream: false,
            include_usage: false,
            ignore_eos: false,
        }
    }
}

impl CommonParams {
    pub fn options(&self, default_max_tokens: usize) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens: self.max_tokens.unwrap_or(default_max_tokens),
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                seed: self.seed,
            },
            stop: self.stop.clone(),
            stop_on_eos: !self.ignore_eos,
            // The server's decode batches run its own policy.
            policy: ExpertPolicy::Exact,
        }
    }
}

/// A parsed `/v1/chat/completions` body.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    pub params: CommonParams,
}

/// The `prompt` of a `/v1/completions` body: text, or token ids.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// A parsed `/v1/completions` body.
#[derive(Clone, Debug, PartialEq)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    pub params: CommonParams,
}

/// Parses a `/v1/chat/completions` body.
pub fn parse_chat_request(body: &[u8], rules: &RequestRules) -> Result<ChatRequest, ApiError> {
    let obj = parse_object(body)?;
    let f = Fields(&obj);
    check_model(&f, rules)?;
    let messages = match f.get("messages") {
        None => return Err(ApiError::invalid("messages", "`messages` is required")),
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(ApiError::invalid(
                "messages",
                "`messages` is empty; it needs at least one message",
            ));
        }
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, m)| parse_message(i, m))
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => return Err(wrong_type("messages", "an array of messages", other)),
    };
    // `max_completion_tokens` is the newer name; when both are given, it wins
    // as it does at OpenAI.
    let max_tokens = match f.count("max_completion_tokens", rules.max_tokens)? {
        Some(n) => Some(n),
        None => f.count("max_tokens", rules.max_tokens)?,
    };
    if f.bool("logprobs")?.unwrap_or(false) || f.get("top_logprobs").is_some() {
        return Err(unsupported("logprobs", "log-probabilities are not supported"));
    }
    if let Some(tools) = f.get("tools").or_else(|| f.get("functions"))
        && !matches!(tools, Value::Array(a) if a.is_empty())
    {
        return Err(unsupported("tools", "tool and function calling are not supported"));
    }
    if let Some(rf) = f.get("response_format") {
        let kind = rf.get("type").and_then(Value::as_str);
        if kind != Some("text") {
            return Err(unsupported(
                "response_format",
                "only `{\"type\": \"text\"}` is supported",
            ));
        }
    }
    Ok(ChatRequest {
        messages,
        params: common_params(&f, max_tokens)?,
    })
}

/// Parses a `/v1/completions` body.
pub fn parse_completion_request(body: &[u8], rules: &RequestRules) -> Result<CompletionRequest, ApiError> {
    let obj = parse_object(body)?;
    let f = Fields(&obj);
    check_model(&f, rules)?;
    let prompt = match f.get("prompt") {
        None => return Err(ApiError::invalid("prompt", "`prompt` is required")),
        Some(v) => parse_prompt(v)?,
    };
    let max_tokens = f.count("max_tokens", rules.max_tokens)?;
    if matches!(f.get("logprobs"), Some(v) if v.as_u64() != Some(0)) {
        return Err(unsupported("logprobs", "log-probabilities are not supported"));
    }
    if f.bool("echo")?.unwrap_or(false) {
        return Err(unsupported("echo", "`echo` is not supported"));
    }
    if matches!(f.get("best_of"), Some(v) if v.as_u64() != Some(1)) {
        return Err(unsupported("best_of", "`best_of` other than 1 is not supported"));
    }
    if f.str("suffix")?.is_some_and(|s| !s.is_empty()) {
        return Err(unsupported("suffix", "`suffix` is not supported"));
    }
    Ok(CompletionRequest {
        prompt,
        params: common_params(&f, max_tokens)?,
    })
}

/// The body as a JSON object, or the reason it is not one.
fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::bad_body(
            format!(
                "the request body is not valid UTF-8 (invalid byte at offset {})",
                e.valid_up_to()
            ),
            "invalid_utf8",
        )
    })?;
    if text.trim().is_empty() {
        return Err(ApiError::bad_body(
            "the request body is empty; expected a JSON object",
            "invalid_json",
        ));
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(ApiError::bad_body(
            format!("the request body must be a JSON object, not {}", type_name(&other)),
            "invalid_json",
        )),
        Err(e) => Err(ApiError::bad_body(
            format!("the request body is not valid JSON: {e}"),
            "invalid_json",
        )),
    }
}

fn check_model(f: &Fields, rules: &RequestRules) -> Result<(), ApiError> {
    match f.str("model")? {
        None => Ok(()),
        Some(m) if m == rules.model_id => Ok(()),
        Some(m) => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "the model `{m}` does not exist; this server serves `{}`",
                rules.model_id
            ),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }),
    }
}

fn parse_message(i: usize, m: &Value) -> Result<ChatMessage, ApiError> {
    let at = |field: &str| format!("messages[{i}].{field}");
    let Value::Object(obj) = m else {
        return Err(wrong_type(&format!("messages[{i}]"), "a message object", m));
    };
    let role = match obj.get("role") {
        Some(Value::String(r)) => r.as_str(),
        None | Some(Value::Null) => return Err(ApiError::invalid(at("role"), format!("`{}` is required", at("role")))),
        Some(other) => return Err(wrong_type(&at("role"), "a string", other)),
    };
    // `developer` is OpenAI's newer name for the system role; chat templates
    // only know `system`.
    let role = match role {
        "system" | "developer" => "system",
        "user" | "assistant" => role,
        other => {
            return Err(ApiError::invalid(
                at("role"),
                format!(
                    "`{}` is `{other}`; expected system, developer, user or assistant",
                    at("role")
                ),
            ));
        }
    };
    let content = match obj.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                let here = format!("messages[{i}].content[{j}]");
                match (part.get("type").and_then(Value::as_str), part.get("text")) {
                    (Some("text"), Some(Value::String(t))) => texts.push(t.as_str()),
                    (Some("text"), _) => {
                        return Err(ApiError::invalid(
                            format!("{here}.text"),
                            format!("`{here}.text` must be a string"),
                        ));
                    }
                    _ => {
                        return Err(unsupported(
                            &here,
                            "only text content parts (`{\"type\": \"text\"}`) are supported",
                        ));
                    }
                }
            }
            texts.join("\n")
        }
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(
                at("content"),
                format!("`{}` is required", at("content")),
            ));
        }
        Some(other) => return Err(wrong_type(&at("content"), "a string or an array of text parts", other)),
    };
    Ok(ChatMessage::new(role, content))
}

fn parse_prompt(v: &Value) -> Result<Prompt, ApiError> {
    let prompt = match v {
        Value::String(s) => Prompt::Text(s.clone()),
        Value::Array(a) if a.len() == 1 && a[0].is_string() => {
            Prompt::Text(a[0].as_str().unwrap_or_default().to_string())
        }
        Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_number) => {
            let ids = a
                .iter()
                .enumerate()
                .map(|(i, t)| match t.as_u64() {
                    Some(id) if id <= u32::MAX as u64 => Ok(id as u32),
                    _ => Err(ApiError::invalid(
                        format!("prompt[{i}]"),
                        format!("`prompt[{i}]` is not a token id: {t}"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Prompt::Tokens(ids)
        }
        Value::Array(a) if a.len() > 1 && a.iter().all(Value::is_string) => {
            return Err(unsupported(
                "prompt",
                "one prompt per request is supported, not a batch of prompts",
            ));
        }
        other => {
            return Err(wrong_type(
                "prompt",
                "a string, an array of one string, or an array of token ids",
                other,
            ));
        }
    };
    match &prompt {
        Prompt::Text(s) if s.is_empty() => Err(ApiError::invalid("prompt", "`prompt` is empty")),
        Prompt::Tokens(t) if t.is_empty() => Err(ApiError::invalid("prompt", "`prompt` is empty")),
        _ => Ok(prompt),
    }
}

fn common_params(f: &Fields, max_tokens: Option<usize>) -> Result<CommonParams, ApiError> {
    let d = CommonParams::default();
    let temperature = match f.number("temperature")? {
        None => d.temperature,
        Some(t) if (0.0..=2.0).contains(&t) => t as f32,
        Some(t) => {
            return Err(ApiError::invalid(
                "temperature",
                format!("`temperature` must be in [0, 2], got {t}"),
            ));
        }
    };
    let top_p = match f.number("top_p")? {
        None => d.top_p,
        Some(p) if p > 0.0 && p <= 1.0 => p as f32,
        Some(p) => {
            return Err(ApiError::invalid(
                "top_p",
                format!("`top_p` must be in (0, 1], got {p}"),
            ));
        }
    };
    let top_k = f.integer("top_k")?.map_or(Ok(0), |k| {
        // -1 is vLLM's spelling of "off".
        if k == -1 {
            Ok(0)
        } else {
            usize::try_from(k).map_err(|_| ApiError::invalid("top_k", format!("`top_k` must be >= 0, got {k}")))
        }
    })?;
    // Any integer seeds the generator; negative ones wrap, so that every
    // seed a client may send is accepted and reproducible.
    let seed = f.integer("seed")?.map_or(d.seed, |s| s as u64);
    let stop = match f.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            let mut v = Vec::with_capacity(a.len());
            for (i, s) in a.iter().enumerate() {
                match s {
                    Value::String(s) => v.push(s.clone()),
                    other => return Err(wrong_type(&format!("stop[{i}]"), "a string", other)),
                }
            }
            v
        }
        Some(other) => return Err(wrong_type("stop", "a string or an array of strings", other)),
    };
    if stop.len() > MAX_STOP_SEQUENCES {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "`stop` has {} sequences; at most {MAX_STOP_SEQUENCES} are allowed",
                stop.len()
            ),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "`stop` sequences must not be empty"));
    }
    if let Some(n) = f.integer("n")?
        && n != 1
    {
        return Err(unsupported("n", "only `n: 1` is supported"));
    }
    for penalty in ["presence_penalty", "frequency_penalty"] {
        if f.number(penalty)?.is_some_and(|p| p != 0.0) {
            return Err(unsupported(penalty, &format!("`{penalty}` is not supported (only 0)")));
        }
    }
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => Fields(o).bool("include_usage")?.unwrap_or(false),
        Some(other) => return Err(wrong_type("stream_options", "an object", other)),
    };
    Ok(CommonParams {
        max_tokens,
        temperature,
        top_p,
        top_k,
        seed,
        stop,
        stream,
        include_usage,
        ignore_eos: f.bool("ignore_eos")?.unwrap_or(false),
    })
}

/// Typed access to a JSON object's fields; `null` counts as absent, as
/// OpenAI's clients send it for unset options.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn str(&self, key: &str) -> Result<Option<&str>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(wrong_type(key, "a string", other)),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(wrong_type(key, "a boolean", other)),
        }
    }

    fn number(&self, key: &str) -> Result<Option<f64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_f64()
                .map(Some)
                .ok_or_else(|| wrong_type(key, "a number", &Value::Number(n.clone()))),
            Some(other) => Err(wrong_type(key, "a number", other)),
        }
    }

    /// An integer field. A float without a fraction (`8.0`, as some JSON
    /// encoders write integers) counts; one with a fraction, or beyond
    /// the range of i64, is refused.
    fn integer(&self, key: &str) -> Result<Option<i128>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                if let Some(i) = n.as_i64() {
                    Ok(Some(i as i128))
                } else if let Some(u) = n.as_u64() {
                    Ok(Some(u as i128))
                } else {
                    match n.as_f64() {
                        Some(x) if x.fract() == 0.0 && x.abs() < 9.2e18 => Ok(Some(x as i128)),
                        _ => Err(ApiError::invalid(key, format!("`{key}` must be an integer, got {n}"))),
                    }
                }
            }
            Some(other) => Err(wrong_type(key, "an integer", other)),
        }
    }

    /// A token count in `1..=max`. Huge whole numbers, even beyond any
    /// integer type (`1e300`), are refused as too large, not as malformed.
    fn count(&self, key: &str, max: usize) -> Result<Option<usize>, ApiError> {
        let too_large = || ApiError::invalid(key, format!("`{key}` must be at most {max} on this server"));
        if let Some(Value::Number(n)) = self.get(key)
            && let Some(x) = n.as_f64()
            && x.fract() == 0.0
            && x > max as f64
        {
            return Err(too_large());
        }
        match self.integer(key)? {
            None => Ok(None),
            Some(n) if n < 1 => Err(ApiError::invalid(key, format!("`{key}` must be at least 1, got {n}"))),
            Some(n) if n > max as i128 => Err(too_large()),
            Some(n) => Ok(Some(n as usize)),
        }
    }
}

fn wrong_type(param: &str, expected: &str, got: &Value) -> ApiError {
    ApiError::invalid(param, format!("`{param}` must be {expected}, not {}", type_name(got)))
}

fn unsupported(param: &str, message: &str) -> ApiError {
    ApiError::invalid(param, message).with_code("unsupported_parameter")
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> RequestRules {
        RequestRules {
            model_id: "demo".into(),
            max_tokens: 100,
        }
    }

    fn chat(body: &str) -> Result<ChatRequest, ApiError> {
        parse_chat_request(body.as_bytes(), &rules())
    }

    fn completion(body: &str) -> Result<CompletionRequest, ApiError> {
        parse_completion_request(body.as_bytes(), &rules())
    }

    fn param(r: Result<impl std::fmt::Debug, ApiError>) -> (u16, Option<String>) {
        let e = r.expect_err("expected an error");
        (e.status.as_u16(), e.param)
    }

    #[test]
    fn a_full_chat_request_maps_onto_generation_options() {
        let r = chat(
            r#"{"model":"demo","messages":[{"role":"developer","content":"Be brief."},
               {"role":"user","content":[{"type":"text","text":"Hi"},{"type":"text","text":"there"}]}],
               "max_completion_tokens":7,"max_tokens":50,"temperature":0.5,"top_p":0.9,"seed":-1,
               "stop":["\n","END"],"stream":true,"stream_options":{"include_usage":true},"user":"ignored"}"#,
        )
        .unwrap();
        assert_eq!(
            r.messages,
            [ChatMessage::system("Be brief."), ChatMessage::user("Hi\nthere")]
        );
        let o = r.params.options(16);
        assert_eq!(o.max_new_tokens, 7);
        assert_eq!(o.sampling.temperature, 0.5);
        assert_eq!(o.sampling.top_p, 0.9);
        assert_eq!(o.sampling.seed, u64::MAX);
        assert_eq!(o.stop, ["\n", "END"]);
        assert!(o.stop_on_eos);
        assert!(r.params.stream && r.params.include_usage);
    }

    #[test]
    fn absent_and_null_fields_take_defaults() {
        let r = chat(r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":null,"stop":null}"#).unwrap();
        assert_eq!(r.params, CommonParams::default());
        assert_eq!(r.params.options(16).max_new_tokens, 16);
        let r = chat(r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":5.0,"seed":3.0}"#).unwrap();
        assert_eq!((r.params.max_tokens, r.params.seed), (Some(5), 3));
    }

    #[test]
    fn bad_chat_bodies_name_their_field() {
        assert_eq!(param(chat(r#"{"messages":[]}"#)), (400, Some("messages".into())));
        assert_eq!(param(chat(r#"{"model":"demo"}"#)), (400, Some("messages".into())));
        assert_eq!(param(chat(r#"{"messages":"hi"}"#)), (400, Some("messages".into())));
        assert_eq!(
            param(chat(r#"{"messages":[{"role":"user"}]}"#)),
            (400, Some("messages[0].content".into()))
        );
        assert_eq!(
            param(chat(
                r#"{"messages":[{"role":"user","content":"a"},{"role":"robot","content":"b"}]}"#
            )),
            (400, Some("messages[1].role".into()))
        );
        assert_eq!(
            param(chat(r#"{"messages":[{"role":"user","content":5}]}"#)),
            (400, Some("messages[0].content".into()))
        );
        let image = r#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}"#;
        assert_eq!(param(chat(image)), (400, Some("messages[0].content[0]".into())));
        let m = r#""messages":[{"role":"user","content":"x"}]"#;
        for (field, value) in [
            ("max_tokens", "-1"),
            ("max_tokens", "0"),
            ("max_tokens", "101"),
            ("max_tokens", "1e300"),
            ("max_tokens", "99999999999999999999999"),
            ("max_tokens", "2.5"),
            ("max_tokens", "\"10\""),
            ("temperature", "-0.1"),
            ("temperature", "\"hot\""),
            ("top_p", "0"),
            ("top_k", "-2"),
            ("seed", "1.5"),
            ("stop", "[\"\"]"),
            ("stop", "[\"a\",\"b\",\"c\",\"d\",\"e\"]"),
            ("stop", "[1]"),
            ("stream", "\"yes\""),
            ("n", "2"),
            ("logprobs", "true"),
            ("presence_penalty", "0.5"),
            ("tools", "[{\"type\":\"function\"}]"),
            ("response_format", "{\"type\":\"json_object\"}"),
        ] {
            let (status, p) = param(chat(&format!("{{{m},\"{field}\":{value}}}")));
            assert_eq!(status, 400, "{field}: {value}");
            let p = p.unwrap_or_default();
            assert!(p.starts_with(field), "{field}: {value} gave param {p}");
        }
    }

    #[test]
    fn unknown_model_is_404_and_the_served_one_is_accepted() {
        let e = chat(r#"{"model":"gpt-4","messages":[{"role":"user","content":"x"}]}"#).unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (404, Some("model_not_found")));
        assert!(
            e.message.contains("gpt-4") && e.message.contains("demo"),
            "{}",
            e.message
        );
        assert!(chat(r#"{"model":"demo","messages":[{"role":"user","content":"x"}]}"#).is_ok());
        assert_eq!(param(chat(r#"{"model":7,"messages":[]}"#)), (400, Some("model".into())));
    }

    #[test]
    fn bodies_that_are_not_json_objects() {
        for (body, code) in [
            (&b"\xff\xfe{}"[..], "invalid_utf8"),
            (b"{\"messages\": \"\xc3\x28\"}", "invalid_utf8"),
            (b"", "invalid_json"),
            (b"  \n", "invalid_json"),
            (b"{\"messages\": [", "invalid_json"),
            (b"[1,2]", "invalid_json"),
            (b"null", "invalid_json"),
            (b"{\"a\":1}{", "invalid_json"),
        ] {
            let e = parse_chat_request(body, &rules()).unwrap_err();
            assert_eq!((e.status.as_u16(), e.code), (400, Some(code)), "{body:?}: {e}");
        }
    }

    #[test]
    fn completion_prompts() {
        assert_eq!(
            completion(r#"{"prompt":"Once"}"#).unwrap().prompt,
            Prompt::Text("Once".into())
        );
        assert_eq!(
            completion(r#"{"prompt":["Once"]}"#).unwrap().prompt,
            Prompt::Text("Once".into())
        );
        assert_eq!(
            completion(r#"{"prompt":[1,2,3]}"#).unwrap().prompt,
            Prompt::Tokens(vec![1, 2, 3])
        );
        assert_eq!(param(completion(r#"{"prompt":""}"#)), (400, Some("prompt".into())));
        assert_eq!(param(completion(r#"{"prompt":[]}"#)), (400, Some("prompt".into())));
        assert_eq!(
            param(completion(r#"{"prompt":["a","b"]}"#)),
            (400, Some("prompt".into()))
        );
        assert_eq!(
            param(completion(r#"{"prompt":[1,-2]}"#)),
            (400, Some("prompt[1]".into()))
        );
        assert_eq!(
            param(completion(r#"{"prompt":[1,5000000000]}"#)),
            (400, Some("prompt[1]".into()))
        );
        assert_eq!(
            param(completion(r#"{"prompt":{"text":"x"}}"#)),
            (400, Some("prompt".into()))
        );
        assert_eq!(param(completion(r#"{"max_tokens":5}"#)), (400, Some("prompt".into())));
        assert_eq!(
            param(completion(r#"{"prompt":"x","echo":true}"#)),
            (400, Some("echo".into()))
        );
        assert_eq!(
            param(completion(r#"{"prompt":"x","best_of":3}"#)),
            (400, Some("best_of".into()))
        );
        let r = completion(r#"{"prompt":"x","max_tokens":3,"ignore_eos":true,"stop":"\n"}"#).unwrap();
        let o = r.params.options(16);
        assert_eq!(
            (o.max_new_tokens, o.stop_on_eos, o.stop),
            (3, false, vec!["\n".to_string()])
        );
    }

    #[test]
    fn error_body_is_openai_shaped() {
        let b = ApiError::invalid("max_tokens", "too big").body();
        assert_eq!(
            b,
            serde_json::json!({"error": {"message": "too big", "type": "invalid_request_error", "param": "max_tokens", "code": null}})
        );
    }
}
