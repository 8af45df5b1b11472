//! Autoregressive generation: prefill, sample, decode one token at a time,
//! with streaming detokenisation, stop strings and EOS handling.
//!
//! Several prompts can be generated together: their decode steps share one
//! `Engine::run` call per token, and sequences leave the batch as they
//! finish.

use std::sync::Arc;

use crate::config::ModelConfig;
use crate::metrics::StepMetrics;
use crate::sampling::{Sampler, SamplingParams};
use crate::selection::{ExpertPolicy, Resolved};
use crate::{Error, Logits, Model, Result, Sequence, Tokenizer};

/// Which part of generation a forward call is. Selection policies apply to
/// decode steps only; a prefill always routes exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Prompt tokens (any number per sequence).
    Prefill,
    /// One new token for each sequence, after its prompt.
    Decode,
}

/// What one forward call computes: which logits to return, the phase, and
/// the expert policy of a decode step. The caller, which knows what it is
/// running, says so with each call; the engine keeps no policy of its own.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepSpec {
    pub logits: Logits,
    pub phase: Phase,
    /// The expert-selection policy; it applies only when `phase` is
    /// `Decode`, and must suit the model ([`ExpertPolicy::resolve_for`]).
    pub policy: ExpertPolicy,
    /// Return the step's routing metrics ([`StepOutput::metrics`]). The GPU
    /// engine also computes them while anyone subscribes to its metrics
    /// stream; collecting them costs one small read-back per step.
    pub metrics: bool,
}

impl StepSpec {
    /// A prefill: exact routing, no metrics asked for.
    pub fn prefill(logits: Logits) -> StepSpec {
        StepSpec {
            logits,
            phase: Phase::Prefill,
            policy: ExpertPolicy::Exact,
            metrics: false,
        }
    }

    /// A decode step under `policy`, returning each sequence's last logits.
    pub fn decode(policy: ExpertPolicy) -> StepSpec {
        StepSpec {
            logits: Logits::Last,
            phase: Phase::Decode,
            policy,
            metrics: false,
        }
    }

    /// The same step, with its metrics returned.
    pub fn with_metrics(self) -> StepSpec {
        StepSpec { metrics: true, ..self }
    }
}

/// What a forward call returns: one logits row per sequence (or per new
/// token, with `Logits::All`), and the routing metrics of each engine step
/// it ran, when they were collected (a long prefill runs in several steps;
/// the CPU reference reports none).
#[derive(Clone, Debug, Default)]
pub struct StepOutput {
    pub logits: Vec<Vec<f32>>,
    pub metrics: Vec<Arc<StepMetrics>>,
}

impl StepSpec {
    /// The routing of this call's MoE layers, for a batch of (cached
    /// length, new tokens): exact in a prefill; in a decode step the policy
    /// resolved for the model, after checking that the batch is one: one new
    /// token for each sequence, after its prompt. Both engines ask this, so
    /// a policy never rewrites a prefill's routing.
    pub(crate) fn routing(
        &self,
        config: &ModelConfig,
        batch: impl IntoIterator<Item = (usize, usize)>,
    ) -> Result<Resolved> {
        if self.phase == Phase::Prefill {
            return Ok(Resolved::Exact);
        }
        for (cached, new) in batch {
            if new != 1 || cached == 0 {
                return Err(Error::InvalidArgument(format!(
                    "a decode step feeds one token to each sequence after its prompt; \
                     got {new} new tokens after {cached} cached"
                )));
            }
        }
        self.policy.resolve_for(config)
    }
}

/// Checks a forward call's batch of (cached length, whether the engine
/// made this sequence, new tokens) before any cache is touched, as both
/// engines do: every sequence has new tokens and belongs to the engine,
/// its cache and new tokens fit in the context, and every id is in the
/// vocabulary. The first sequence at fault names the error.
pub(crate) fn check_batch<'a>(
    config: &ModelConfig,
    batch: impl IntoIterator<Item = (usize, bool, &'a [u32])>,
) -> Result<()> {
    let (limit, vocab) = (config.max_position_embeddings, config.vocab_size);
    for (cached, owned, tokens) in batch {
        if tokens.is_empty() {
            return Err(Error::InvalidArgument("forward: a sequence has no new tokens".into()));
        }
        if !owned {
            return Err(Error::InvalidArgument(
                "forward: sequence belongs to another model".into(),
            ));
        }
        let requested = cached + tokens.len();
        if requested > limit {
            return Err(Error::ContextOverflow { requested, limit });
        }
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::TokenOutOfRange { id, vocab });
        }
    }
    Ok(())
}

/// A forward pass that generation and serving drive: the CPU reference
/// ([`Model`]) or the GPU engine ([`crate::gpu::GpuModel`]). Both take a
/// batch of sequences with their new tokens and a [`StepSpec`], with the
/// same validation and errors.
///
/// The pass is async because the GPU engine's read-backs complete on the
/// JS event loop in a browser; the CPU reference never waits. Native code
/// blocks once, at the top (`generate_batch`, `Scheduler::run`).
// The futures are awaited where they are made (a page, or `block_on`), so
// they need no `Send` bound.
#[allow(async_fn_in_trait)]
pub trait Engine {
    /// Per-sequence state (the KV cache).
    type Seq;
    fn config(&self) -> &ModelConfig;
    fn new_sequence(&self) -> Self::Seq;
    async fn run(&self, batch: &mut [(&mut Self::Seq, &[u32])], spec: StepSpec) -> Result<StepOutput>;
}

impl Engine for Model {
    type Seq = Sequence;
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn new_sequence(&self) -> Sequence {
        Model::new_sequence(self)
    }
    async fn run(&self, batch: &mut [(&mut Sequence, &[u32])], spec: StepSpec) -> Result<StepOutput> {
        Model::run(self, batch, spec)
    }
}

impl Engine for crate::gpu::GpuModel {
    type Seq = crate::gpu::GpuSequence;
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn new_sequence(&self) -> Self::Seq {
        crate::gpu::GpuModel::new_sequence(self)
    }
    async fn run(&self, batch: &mut [(&mut Self::Seq, &[u32])], spec: StepSpec) -> Result<StepOutput> {
        crate::gpu::GpuModel::run(self, batch, spec).await
    }
}

/// What to generate and when to stop.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    /// The most tokens to generate per sequence.
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop as soon as the generated text contains one of these strings. The
    /// returned and streamed text end just before the stop string.
    pub stop: Vec<String>,
    /// Stop when the model produces one of the tokenizer's EOS tokens.
    pub stop_on_eos: bool,
    /// The expert-selection policy of the decode steps (prefill always
    /// routes exactly). A policy acts on a whole decode batch, so the
    /// serving loop, which batches many clients' requests, applies its own
    /// ([`crate::serving::Scheduler::set_policy`]) and refuses requests
    /// that name one.
    pub policy: ExpertPolicy,
}

impl GenerateOptions {
    /// Checks what can be checked without a model: the sampling parameters
    /// and the stop strings. The one check of a request's options, for
    /// [`BatchGeneration`] and the serving loop's `submit`.
    pub fn validate(&self) -> Result<()> {
        self.sampling.validate()?;
        if let Some(i) = self.stop.iter().position(|s| s.is_empty()) {
            // An empty stop string would match before the first token.
            return Err(Error::InvalidArgument(format!("stop string {i} is empty")));
        }
        Ok(())
    }
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 128,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            stop_on_eos: true,
            policy: ExpertPolicy::Exact,
        }
    }
}

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an EOS token.
    Eos,
    /// The generated text contained a stop string.
    Stop,
    /// `max_new_tokens` were generated, or the context length was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

impl std::fmt::Display for FinishReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The result of generating from one prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// Number of prompt tokens.
    pub prompt_tokens: usize,
    /// Every sampled token, including a final EOS token or the token that
    /// completed a stop string, so that `tokens.len()` is the number of
    /// decode steps the model ran for this sequence.
    pub tokens: Vec<u32>,
    /// The generated text: special tokens (EOS included) are skipped, and
    /// with `FinishReason::Stop` it ends just before the stop string.
    pub text: String,
    pub finish: FinishReason,
}

/// Generates from one prompt; see `generate_batch`. The sampler is seeded
/// with `opts.sampling.seed` itself.
#[cfg(not(target_arch = "wasm32"))]
pub fn generate<E: Engine>(
    model: &E,
    tok: &Tokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    let prompts = [prompt.to_vec()];
    let mut out = generate_batch(model, tok, &prompts, opts, |_, text| on_text(text))?;
    out.pop()
        .ok_or_else(|| Error::InvalidArgument("generation returned no result".into()))
}

/// Generates for several prompts at once, decoding them as one batch through
/// `Engine::run`, and streams each sequence's new text through
/// `on_text(seq_index, text)` as soon as it is final (never with an empty
/// string). Sequences that finish drop out of the batch.
///
/// Sequence `i` samples with its own `Sampler` seeded with
/// `opts.sampling.seed + i` (wrapping). Distinct seeds keep identical prompts
/// in one batch from producing identical samples, and a sequence's output
/// depends only on its prompt, its index and the options, not on which other
/// sequences share the batch. Sequence 0 therefore matches `generate` with
/// the same options.
///
/// Errors before any compute: an empty prompt or invalid options give
/// `Error::InvalidArgument`, a prompt that leaves no room for a generated
/// token in the context (`len >= max_position_embeddings`) gives
/// `Error::ContextOverflow`, and an id outside the model's vocabulary gives
/// `Error::TokenOutOfRange`.
#[cfg(not(target_arch = "wasm32"))]
pub fn generate_batch<E: Engine>(
    model: &E,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    on_text: impl FnMut(usize, &str),
) -> Result<Vec<Generation>> {
    // The one place generation blocks: natively the GPU engine's read-backs
    // poll the device themselves, so the future only waits on the GPU.
    pollster::block_on(generate_batch_async(model, tok, prompts, opts, on_text))
}

/// [`generate_batch`] without blocking: the same steps, sampling, stop
/// strings and streaming ([`BatchGeneration`]), awaiting each forward pass.
pub async fn generate_batch_async<E: Engine>(
    model: &E,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(usize, &str),
) -> Result<Vec<Generation>> {
    let mut g = BatchGeneration::new(model.config(), tok, prompts, opts, || model.new_sequence())?;
    while let Some((spec, mut batch)) = g.next_batch() {
        let out = model.run(&mut batch, spec).await?;
        g.accept(out.logits, &mut on_text)?;
    }
    Ok(g.finish())
}

/// A forward call's batch: each sequence's engine state and its new tokens.
pub type Batch<'a, S> = Vec<(&'a mut S, &'a [u32])>;

/// A batched generation driven one forward pass at a time, by whoever runs
/// the engine: [`generate_batch`] blocks on each pass, [`generate_batch_async`]
/// awaits it, and a page can await it and repaint between steps. All the
/// sampling, EOS, stop-string, context-limit and streaming logic lives here,
/// once.
///
/// ```text
/// let mut g = BatchGeneration::new(config, tok, prompts, opts, || engine.new_sequence())?;
/// while let Some((spec, mut batch)) = g.next_batch() {
///     let out = engine.run(&mut batch, spec).await?;
///     g.accept(out.logits, |seq, text| ...)?;
/// }
/// let generations = g.finish();
/// ```
pub struct BatchGeneration<'t, S> {
    tok: &'t Tokenizer,
    prompts: Vec<Vec<u32>>,
    states: Vec<SeqState<S>>,
    /// `active[j]` is the index of the sequence whose logits are row `j` of
    /// the next [`BatchGeneration::accept`].
    active: Vec<usize>,
    prefilled: bool,
    /// The model's context length.
    limit: usize,
    policy: ExpertPolicy,
}

impl<'t, S> BatchGeneration<'t, S> {
    /// Validates the prompts and options (see [`generate_batch`] for the
    /// errors) and makes one sequence per prompt with `new_sequence`.
    pub fn new(
        config: &ModelConfig,
        tok: &'t Tokenizer,
        prompts: &[Vec<u32>],
        opts: &GenerateOptions,
        mut new_sequence: impl FnMut() -> S,
    ) -> Result<Self> {
        opts.validate()?;
        opts.policy.resolve_for(config)?;
        for (i, prompt) in prompts.iter().enumerate() {
            check_prompt(config, prompt).map_err(|e| match e {
                Error::InvalidArgument(why) => Error::InvalidArgument(format!("prompt {i}: {why}")),
                e => e,
            })?;
        }

        let mut states: Vec<SeqState<S>> = Vec::with_capacity(prompts.len());
        for (i, prompt) in prompts.iter().enumerate() {
            let sampling = SamplingParams {
                seed: opts.sampling.seed.wrapping_add(i as u64),
                ..opts.sampling
            };
            states.push(SeqState::new(new_sequence(), prompt.len(), opts, sampling)?);
        }
        // With nothing to generate there is no reason to run the prompts.
        let active = if opts.max_new_tokens == 0 {
            states.iter_mut().for_each(|s| s.finish = Some(FinishReason::Length));
            Vec::new()
        } else {
            (0..states.len()).collect()
        };
        Ok(BatchGeneration {
            tok,
            prompts: prompts.to_vec(),
            states,
            active,
            prefilled: false,
            limit: config.max_position_embeddings,
            policy: opts.policy,
        })
    }

    /// The next forward pass to run, or `None` when every sequence has
    /// finished: first every prompt in one batched prefill (only each
    /// prompt's last logits are needed), then one decode step (under the
    /// options' expert policy) for every unfinished sequence. Run the batch
    /// with its [`StepSpec`] and hand the logits to
    /// [`BatchGeneration::accept`].
    pub fn next_batch(&mut self) -> Option<(StepSpec, Batch<'_, S>)> {
        if self.active.is_empty() {
            return None;
        }
        if !self.prefilled {
            return Some((
                StepSpec::prefill(Logits::Last),
                self.states
                    .iter_mut()
                    .zip(&self.prompts)
                    .map(|(s, p)| (&mut s.seq, p.as_slice()))
                    .collect(),
            ));
        }
        Some((
            StepSpec::decode(self.policy),
            self.states
                .iter_mut()
                .filter(|s| s.finish.is_none())
                .map(SeqState::decode_input)
                .collect(),
        ))
    }

    /// Samples one token per sequence of the last batch from its logits and
    /// streams each sequence's newly final text through `on_text(seq, text)`
    /// (never an empty string); sequences that finish leave the batch.
    pub fn accept(&mut self, logits: Vec<Vec<f32>>, mut on_text: impl FnMut(usize, &str)) -> Result<()> {
        check_logits(&logits, self.active.len())?;
        self.prefilled = true;
        for (&i, row) in self.active.iter().zip(&logits) {
            self.states[i]
                .accept(row, self.tok, self.limit, |text| on_text(i, text))
                .map_err(StepFailure::into_error)?;
        }
        let states = &self.states;
        self.active.retain(|&i| states[i].finish.is_none());
        Ok(())
    }

    /// Sequences still generating.
    pub fn active(&self) -> usize {
        self.active.len()
    }

    /// Tokens generated so far, over all sequences.
    pub fn generated_tokens(&self) -> usize {
        self.states.iter().map(|s| s.tokens.len()).sum()
    }

    /// The text generated so far by sequence `i` (final once it finished).
    pub fn text(&self, i: usize) -> Option<&str> {
        self.states.get(i).map(|s| s.text.as_str())
    }

    /// One [`Generation`] per prompt, in prompt order.
    pub fn finish(self) -> Vec<Generation> {
        self.states.into_iter().map(SeqState::into_generation).collect()
    }
}

/// Checks that `prompt` can start a generation on a model with `config`:
/// it is not empty, every id is in the vocabulary, and at least one
/// generated token fits after it in the context. Every front end checks its
/// prompts with this one function, before any compute: [`BatchGeneration`],
/// the serving loop, and the HTTP server (which answers 400 with it).
///
/// Errors: `Error::InvalidArgument` for an empty prompt,
/// `Error::ContextOverflow` when `len >= max_position_embeddings`, and
/// `Error::TokenOutOfRange` for an id outside the vocabulary.
pub fn check_prompt(config: &ModelConfig, prompt: &[u32]) -> Result<()> {
    if prompt.is_empty() {
        return Err(Error::InvalidArgument("the prompt is empty".into()));
    }
    let limit = config.max_position_embeddings;
    if prompt.len() >= limit {
        // At least one generated token must fit after the prompt.
        return Err(Error::ContextOverflow {
            requested: prompt.len() + 1,
            limit,
        });
    }
    let vocab = config.vocab_size;
    if let Some(&id) = prompt.iter().find(|&&id| id as usize >= vocab) {
        return Err(Error::TokenOutOfRange { id, vocab });
    }
    Ok(())
}

/// One sequence being generated: its engine state (KV cache), sampler,
/// tokens and streamed text. [`SeqState::accept`] is the one per-sequence
/// step: sampling, EOS, stop strings, the token and context limits and
/// streaming are decided there, for [`BatchGeneration`] and the serving
/// loop alike.
pub(crate) struct SeqState<S> {
    pub(crate) seq: S,
    sampler: Sampler,
    pub(crate) prompt_tokens: usize,
    pub(crate) tokens: Vec<u32>,
    /// The last sampled token, as the slice the next forward call feeds.
    last: [u32; 1],
    stream: TextStream,
    /// The generated text so far (final once `finish` is set).
    pub(crate) text: String,
    pub(crate) finish: Option<FinishReason>,
    max_new_tokens: usize,
    stop_on_eos: bool,
}

/// Why [`SeqState::accept`] failed; the serving loop reports the stage.
#[derive(Debug)]
pub(crate) enum StepFailure {
    Sampling(Error),
    Detokenising(Error),
}

impl StepFailure {
    pub(crate) fn into_error(self) -> Error {
        match self {
            StepFailure::Sampling(e) | StepFailure::Detokenising(e) => e,
        }
    }
}

impl std::fmt::Display for StepFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepFailure::Sampling(e) => write!(f, "sampling failed: {e}"),
            StepFailure::Detokenising(e) => write!(f, "detokenising failed: {e}"),
        }
    }
}

impl<S> SeqState<S> {
    /// A sequence about to prefill a prompt of `prompt_tokens` tokens,
    /// stopping as `opts` says and sampling with `sampling` (the caller
    /// picks the seed).
    pub(crate) fn new(seq: S, prompt_tokens: usize, opts: &GenerateOptions, sampling: SamplingParams) -> Result<Self> {
        Ok(SeqState {
            seq,
            sampler: Sampler::new(sampling)?,
            prompt_tokens,
            tokens: Vec::new(),
            last: [0],
            stream: TextStream::new(&opts.stop),
            text: String::new(),
            finish: None,
            max_new_tokens: opts.max_new_tokens,
            stop_on_eos: opts.stop_on_eos,
        })
    }

    /// The engine state and the token the next decode step feeds.
    pub(crate) fn decode_input(&mut self) -> (&mut S, &[u32]) {
        (&mut self.seq, self.last.as_slice())
    }

    /// Samples the next token from `row` (this sequence's logits), streams
    /// its newly final text through `on_text` (never an empty string), and
    /// returns the reason it finished, if it did. `limit` is the model's
    /// context length.
    pub(crate) fn accept(
        &mut self,
        row: &[f32],
        tok: &Tokenizer,
        limit: usize,
        mut on_text: impl FnMut(&str),
    ) -> std::result::Result<Option<FinishReason>, StepFailure> {
        let mut emit = |text: &str| {
            if !text.is_empty() {
                on_text(text)
            }
        };
        let id = self.sampler.sample(row).map_err(StepFailure::Sampling)?;
        self.tokens.push(id);
        self.last = [id];
        let finish = if self.stop_on_eos && tok.eos_token_ids().contains(&id) {
            // EOS adds no text, so the text decoded at the previous step is
            // the final text and everything held back is released.
            emit(self.stream.finish(&self.text));
            Some(FinishReason::Eos)
        } else {
            self.text = tok.decode(&self.tokens, true).map_err(StepFailure::Detokenising)?;
            let step = self.stream.update(&self.text);
            emit(step.emit);
            if let Some(end) = step.stop_at {
                self.text.truncate(end);
                Some(FinishReason::Stop)
            } else if self.tokens.len() >= self.max_new_tokens || self.prompt_tokens + self.tokens.len() >= limit {
                // The prompt and every generated token must fit in the
                // context, so the next token can only be sampled if this
                // one can be fed.
                emit(self.stream.finish(&self.text));
                Some(FinishReason::Length)
            } else {
                None
            }
        };
        self.finish = finish;
        Ok(finish)
    }

    /// The finished generation (a sequence stopped early counts as `Length`).
    pub(crate) fn into_generation(self) -> Generation {
        Generation {
            prompt_tokens: self.prompt_tokens,
            tokens: self.tokens,
            text: self.text,
            finish: self.finish.unwrap_or(FinishReason::Length),
        }
    }
}

/// `Engine::run` promises one logits row per sequence; checking it turns a
/// broken promise into an error instead of a silently dropped sequence.
fn check_logits(logits: &[Vec<f32>], expected: usize) -> Result<()> {
    if logits.len() != expected {
        return Err(Error::InvalidArgument(format!(
            "model returned logits for {} sequences, expected {expected}",
            logits.len()
        )));
    }
    Ok(())
}

/// The result of feeding the current text to `TextStream::update`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct StreamStep<'a> {
    /// New text that is now final, possibly empty.
    pub emit: &'a str,
    /// Set when a stop string was found: the byte length the text must be
    /// truncated to (the start of the earliest stop string).
    pub stop_at: Option<usize>,
}

/// Incremental detokenisation: given the decoded text of all generated
/// tokens after each step, releases only text that can no longer change or
/// turn out to be part of a stop string.
///
/// Two kinds of tail are held back: a trailing run of U+FFFD, which is what
/// a tokenizer decodes an incomplete UTF-8 sequence (a byte-fallback token
/// still waiting for the rest of its character) to, and a tail that is a
/// prefix of some stop string, which the next tokens may complete.
pub(crate) struct TextStream {
    stop: Vec<String>,
    /// Bytes of the text already released.
    emitted: usize,
}

impl TextStream {
    pub(crate) fn new(stop: &[String]) -> Self {
        TextStream {
            stop: stop.to_vec(),
            emitted: 0,
        }
    }

    /// Feeds the decoded text of all tokens so far.
    pub(crate) fn update<'a>(&mut self, text: &'a str) -> StreamStep<'a> {
        if let Some(at) = find_stop(text, &self.stop) {
            return StreamStep {
                emit: self.release(text, at),
                stop_at: Some(at),
            };
        }
        let complete = utf8_complete_len(text);
        let safe = stop_prefix_start(&text[..complete], &self.stop);
        StreamStep {
            emit: self.release(text, safe),
            stop_at: None,
        }
    }

    /// Generation ended without a stop string: everything left is final,
    /// including a held-back stop prefix or a genuine trailing U+FFFD.
    pub(crate) fn finish<'a>(&mut self, text: &'a str) -> &'a str {
        self.release(text, text.len())
    }

    /// Releases `text[emitted..end]`. Decoding the whole id list again each
    /// step normally only appends to the text; should a tokenizer rewrite
    /// what was already released, this releases nothing rather than panic
    /// on a position that is no longer a character boundary.
    fn release<'a>(&mut self, text: &'a str, end: usize) -> &'a str {
        if end <= self.emitted || !text.is_char_boundary(self.emitted) {
            return "";
        }
        let out = &text[self.emitted..end];
        self.emitted = end;
        out
    }
}

/// Byte offset of the earliest occurrence of any stop string in `text`.
pub(crate) fn find_stop(text: &str, stop: &[String]) -> Option<usize> {
    stop.iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

/// Length of `text` without its trailing run of U+FFFD replacement
/// characters, i.e. the part that no later token can change.
pub(crate) fn utf8_complete_len(text: &str) -> usize {
    text.trim_end_matches('\u{FFFD}').len()
}

/// Start of the longest tail of `text` that is a proper prefix of some stop
/// string (a tail that later text could complete into a stop string), or
/// `text.len()` if there is none.
pub(crate) fn stop_prefix_start(text: &str, stop: &[String]) -> usize {
    let mut start = text.len();
    for s in stop {
        // Only tails shorter than `s` can be proper prefixes of it; whole
        // occurrences were already handled by `find_stop`.
        let lo = text.len().saturating_sub(s.len().saturating_sub(1));
        for k in lo..start {
            if text.is_char_boundary(k) && s.starts_with(&text[k..]) {
                start = k;
                break;
            }
        }
    }
    start
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    /// Feeds successive decoded texts, collecting what is streamed, and
    /// returns (streamed text, final text, stopped).
    fn run(texts: &[&str], stop: &[&str]) -> (String, String, bool) {
        let mut stream = TextStream::new(&stops(stop));
        let mut out = String::new();
        for t in texts {
            let step = stream.update(t);
            out.push_str(step.emit);
            if let Some(at) = step.stop_at {
                return (out, t[..at].to_string(), true);
            }
        }
        let last = texts.last().copied().unwrap_or("");
        out.push_str(stream.finish(last));
        (out, last.to_string(), false)
    }

    #[test]
    fn plain_text_streams_everything() {
        let mut s = TextStream::new(&[]);
        assert_eq!(s.update("Hel").emit, "Hel");
        assert_eq!(s.update("Hello").emit, "lo");
        assert_eq!(s.update("Hello world").emit, " world");
        assert_eq!(s.finish("Hello world"), "");
    }

    #[test]
    fn incomplete_utf8_is_held_back() {
        assert_eq!(utf8_complete_len("ab\u{FFFD}"), 2);
        assert_eq!(utf8_complete_len("ab\u{FFFD}\u{FFFD}"), 2);
        assert_eq!(utf8_complete_len("a\u{FFFD}b"), "a\u{FFFD}b".len());
        assert_eq!(utf8_complete_len("\u{FFFD}"), 0);

        // A three-byte character arriving as three byte tokens.
        let mut s = TextStream::new(&[]);
        assert_eq!(s.update("x").emit, "x");
        assert_eq!(s.update("x\u{FFFD}").emit, "");
        assert_eq!(s.update("x\u{FFFD}\u{FFFD}").emit, "");
        assert_eq!(s.update("x€").emit, "€");
        assert_eq!(s.update("x€!").emit, "!");
    }

    #[test]
    fn trailing_replacement_char_is_flushed_at_the_end() {
        let (streamed, text, stopped) = run(&["a", "a\u{FFFD}"], &[]);
        assert!(!stopped);
        assert_eq!(streamed, "a\u{FFFD}");
        assert_eq!(text, streamed);
    }

    #[test]
    fn stop_prefix_tail_detection() {
        let st = stops(&["</s>", "\n\n"]);
        assert_eq!(stop_prefix_start("hello", &st), 5);
        assert_eq!(stop_prefix_start("hello<", &st), 5);
        assert_eq!(stop_prefix_start("hello</", &st), 5);
        assert_eq!(stop_prefix_start("hello\n", &st), 5);
        assert_eq!(stop_prefix_start("a<b", &st), 3);
        // The longest tail over all stop strings wins.
        let st = stops(&["abc", "bcX"]);
        assert_eq!(stop_prefix_start("zab", &st), 1);
        assert_eq!(stop_prefix_start("zabc", &st), 2);
        // Multi-byte characters: offsets stay on char boundaries.
        let st = stops(&["éé"]);
        assert_eq!(stop_prefix_start("aé", &st), 1);
        assert_eq!(stop_prefix_start("é", &stops(&["xé"])), 2);
    }

    #[test]
    fn find_stop_takes_the_earliest() {
        let st = stops(&["world", "lo"]);
        assert_eq!(find_stop("hello world", &st), Some(3));
        assert_eq!(find_stop("hi", &st), None);
        assert_eq!(find_stop("anything", &[]), None);
    }

    #[test]
    fn stop_string_split_across_tokens_is_never_streamed() {
        let (streamed, text, stopped) = run(&["Hi", "Hi<", "Hi</", "Hi</s", "Hi</s> more"], &["</s>"]);
        assert!(stopped);
        assert_eq!(streamed, "Hi");
        assert_eq!(text, "Hi");
    }

    #[test]
    fn stop_string_inside_one_token() {
        let (streamed, text, stopped) = run(&["A", "A.\n\nB"], &["\n\n"]);
        assert!(stopped);
        assert_eq!(streamed, "A.");
        assert_eq!(text, "A.");
    }

    #[test]
    fn false_alarm_prefix_is_released() {
        let mut s = TextStream::new(&stops(&["</s>"]));
        assert_eq!(s.update("a<").emit, "a");
        assert_eq!(s.update("a</").emit, "");
        let step = s.update("a</b");
        assert_eq!(step.emit, "</b");
        assert_eq!(step.stop_at, None);
    }

    #[test]
    fn held_back_prefix_is_flushed_when_generation_ends() {
        let (streamed, text, stopped) = run(&["x", "x#", "x##"], &["###"]);
        assert!(!stopped);
        assert_eq!(streamed, "x##");
        assert_eq!(text, "x##");
    }

    #[test]
    fn streamed_text_always_equals_returned_text() {
        let cases: &[(&[&str], &[&str])] = &[
            (&["a", "ab", "abc", "abcd"], &["cd"]),
            (&["a", "ab", "abc", "abcd"], &["bd", "c"]),
            (&["S", "ST", "STO", "STOP", "STOP!"], &["STOP"]),
            (&["é", "é\u{FFFD}", "éé", "ééS", "ééST"], &["ST", "éS"]),
            (&["one", "one two", "one two three"], &["x", "y"]),
        ];
        for (texts, stop) in cases {
            let (streamed, text, _) = run(texts, stop);
            assert_eq!(streamed, text, "texts {texts:?}, stop {stop:?}");
            for s in *stop {
                assert!(!text.contains(s), "{text:?} contains {s:?}");
            }
        }
    }

    #[test]
    fn finish_reason_names() {
        assert_eq!(FinishReason::Eos.to_string(), "eos");
        assert_eq!(FinishReason::Stop.to_string(), "stop");
        assert_eq!(FinishReason::Length.to_string(), "length");
    }
}
