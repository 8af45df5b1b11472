//! The serving loop: continuous batching over any [`Engine`].
//!
//! Requests wait in a bounded queue and join the running batch between
//! steps, up to `max_batch` sequences; finished or cancelled ones leave it
//! at once, freeing their KV cache. Each iteration of the loop
//!
//! 1. drops requests whose client went away (their event receiver was dropped),
//! 2. admits queued requests while there is room and prefills their prompts
//!    together (a prefill step: the expert policy does not apply),
//! 3. runs one decode step for every running sequence together (a decode
//!    step: the batch-aware expert policy applies to exactly these tokens),
//!
//! and streams each request's new text as [`Event`]s on its own channel.
//! Every request has its own sampling parameters, stop strings and token
//! limit. The loop runs on the caller's thread ([`Scheduler::run`]); other
//! threads submit with [`Scheduler::submit`]. In a browser, where nothing
//! may block, [`Scheduler::run_async`] runs the same iterations on the
//! page's event loop, awaiting each forward pass.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, RecvError, RecvTimeoutError, Sender, TryRecvError, channel};
use std::sync::{Arc, Condvar, Mutex, Weak};
// `web_time::Instant` is `std::time::Instant` natively; std's panics in
// the browser, where the loop runs too (`run_async`).
use web_time::Instant;

use crate::error::{Error, Result};
use crate::generate::{Engine, FinishReason, GenerateOptions, SeqState, StepSpec, check_prompt};
use crate::model::Logits;
use crate::selection::ExpertPolicy;
use crate::tokenizer::Tokenizer;

/// What a request's channel receives.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The prompt was prefilled; generation has started.
    Started { prompt_tokens: usize },
    /// New final text (never empty).
    Text(String),
    /// The request finished; no further events follow.
    Done(Completion),
    /// The request failed; no further events follow.
    Error(String),
}

/// The summary sent with [`Event::Done`].
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub prompt_tokens: usize,
    /// Sampled tokens, including a final EOS token.
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    /// Seconds from submission to the first token, and to the end.
    pub first_token_s: f64,
    pub total_s: f64,
}

/// Limits of the serving loop.
#[derive(Clone, Copy, Debug)]
pub struct SchedulerConfig {
    /// The most sequences decoded together.
    pub max_batch: usize,
    /// The most requests waiting for a slot; more are refused.
    pub max_queue: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_batch: 64,
            max_queue: 256,
        }
    }
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the request queue is full ({0} waiting)")]
    QueueFull(usize),
    #[error("the scheduler is shutting down")]
    ShuttingDown,
    /// The engine panicked and the loop stopped; nothing more will run.
    #[error("the engine failed and the scheduler stopped: {0}")]
    Failed(String),
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// A submitted request, as its client holds it: the stream of its events.
/// Dropping the handle cancels the request; the loop frees its batch slot
/// and KV cache before the next step.
pub struct RequestHandle {
    pub id: u64,
    events: Receiver<Event>,
    _alive: Arc<()>,
}

impl RequestHandle {
    pub fn recv(&self) -> std::result::Result<Event, RecvError> {
        self.events.recv()
    }

    pub fn recv_timeout(&self, d: std::time::Duration) -> std::result::Result<Event, RecvTimeoutError> {
        self.events.recv_timeout(d)
    }

    pub fn try_recv(&self) -> std::result::Result<Event, TryRecvError> {
        self.events.try_recv()
    }

    /// Splits the handle into its event receiver and its cancel guard, so
    /// that one thread can block on the events while another (an async
    /// HTTP response, say) decides when the client has gone: dropping the
    /// guard alone cancels the request, and the receiver then sees the
    /// channel close once the loop has let the request go.
    pub fn into_parts(self) -> (Receiver<Event>, CancelGuard) {
        (self.events, CancelGuard { _alive: self._alive })
    }

    /// Waits for the request to end: its streamed text and the completion.
    pub fn wait(self) -> std::result::Result<(String, Completion), String> {
        let mut text = String::new();
        loop {
            match self.events.recv() {
                Ok(Event::Text(t)) => text.push_str(&t),
                Ok(Event::Started { .. }) => {}
                Ok(Event::Done(c)) => return Ok((text, c)),
                Ok(Event::Error(e)) => return Err(e),
                Err(_) => return Err("the scheduler stopped".into()),
            }
        }
    }
}

/// Keeps a request alive; dropping it cancels the request as dropping its
/// [`RequestHandle`] does (see [`RequestHandle::into_parts`]).
pub struct CancelGuard {
    _alive: Arc<()>,
}

struct Pending {
    id: u64,
    prompt: Vec<u32>,
    opts: GenerateOptions,
    events: Sender<Event>,
    alive: Weak<()>,
    submitted: Instant,
}

struct Running<S> {
    id: u64,
    /// Sampling, stop rules and text: the same per-sequence step as
    /// [`crate::generate::BatchGeneration`].
    state: SeqState<S>,
    events: Sender<Event>,
    alive: Weak<()>,
    submitted: Instant,
    first_token_s: f64,
}

/// How one step left a running request.
enum Outcome {
    Continue,
    Finished(Completion),
    /// It failed; its client was told.
    Failed,
    /// Its client went away mid-stream.
    Gone,
}

/// The requests that ended in one iteration of the loop.
#[derive(Default)]
struct Ended {
    /// Finished requests, with the channel their completion goes to.
    finished: Vec<(u64, Sender<Event>, Completion)>,
    failed: Vec<u64>,
    gone: Vec<u64>,
}

impl Ended {
    fn record(&mut self, id: u64, events: &Sender<Event>, outcome: Outcome) {
        match outcome {
            Outcome::Continue => {}
            Outcome::Finished(c) => self.finished.push((id, events.clone(), c)),
            Outcome::Failed => self.failed.push(id),
            Outcome::Gone => self.gone.push(id),
        }
    }

    fn contains(&self, id: u64) -> bool {
        self.finished.iter().any(|(f, _, _)| *f == id) || self.failed.contains(&id) || self.gone.contains(&id)
    }
}

/// Counters for `/metrics` and the viewer.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SchedulerStats {
    pub queued: usize,
    pub running: usize,
    pub completed: u64,
    pub cancelled: u64,
    pub failed: u64,
    pub generated_tokens: u64,
    pub decode_steps: u64,
    /// Generated tokens per second over the last decode step.
    pub last_step_tok_s: f64,
}

struct Shared {
    queue: VecDeque<Pending>,
    shutdown: bool,
    /// Why the loop stopped, once the engine panicked inside it.
    failure: Option<String>,
    /// The expert policy of the following decode steps.
    policy: ExpertPolicy,
    next_id: u64,
    stats: SchedulerStats,
}

/// The queue and loop state, shared between submitting threads and the
/// thread that runs [`Scheduler::run`].
pub struct Scheduler {
    config: SchedulerConfig,
    shared: Mutex<Shared>,
    wake: Condvar,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Result<Scheduler> {
        if config.max_batch == 0 {
            return Err(Error::InvalidArgument("max_batch must be at least 1".into()));
        }
        Ok(Scheduler {
            config,
            shared: Mutex::new(Shared {
                queue: VecDeque::new(),
                shutdown: false,
                failure: None,
                policy: ExpertPolicy::Exact,
                next_id: 0,
                stats: SchedulerStats::default(),
            }),
            wake: Condvar::new(),
        })
    }

    pub fn config(&self) -> SchedulerConfig {
        self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        // A panic while holding the lock leaves plain data; keep serving.
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a request; its events arrive on the returned handle.
    /// Dropping the handle cancels the request and frees its slot.
    pub fn submit(&self, prompt: Vec<u32>, opts: GenerateOptions) -> std::result::Result<RequestHandle, SubmitError> {
        Self::check(&prompt, &opts)?;
        let mut s = self.lock();
        let r = self.push(&mut s, prompt, opts);
        drop(s);
        self.wake.notify_all();
        r
    }

    /// Queues several requests under one lock, so that the loop admits them
    /// in the same iteration (as far as `max_batch` leaves room): they are
    /// prefilled together and decode as one batch from their first step.
    /// Separate `submit` calls can be split by the loop waking in between.
    /// Each request gets its own result, as from `submit`.
    pub fn submit_batch(
        &self,
        requests: Vec<(Vec<u32>, GenerateOptions)>,
    ) -> Vec<std::result::Result<RequestHandle, SubmitError>> {
        let checked: Vec<_> = requests
            .into_iter()
            .map(|(p, o)| Self::check(&p, &o).map(|()| (p, o)))
            .collect();
        let mut s = self.lock();
        let out = checked
            .into_iter()
            .map(|r| r.and_then(|(p, o)| self.push(&mut s, p, o)))
            .collect();
        drop(s);
        self.wake.notify_all();
        out
    }

    fn check(prompt: &[u32], opts: &GenerateOptions) -> std::result::Result<(), SubmitError> {
        if prompt.is_empty() {
            return Err(SubmitError::Invalid("the prompt is empty".into()));
        }
        if !opts.policy.is_exact() {
            // A policy acts on the whole decode batch, which mixes clients.
            return Err(SubmitError::Invalid(format!(
                "a request cannot choose the expert policy (`{}`); the serving loop applies its own",
                opts.policy
            )));
        }
        opts.validate().map_err(|e| SubmitError::Invalid(e.to_string()))
    }

    /// Queues one checked request; the caller holds the lock and wakes the loop.
    fn push(
        &self,
        s: &mut Shared,
        prompt: Vec<u32>,
        opts: GenerateOptions,
    ) -> std::result::Result<RequestHandle, SubmitError> {
        if let Some(why) = &s.failure {
            return Err(SubmitError::Failed(why.clone()));
        }
        if s.shutdown {
            return Err(SubmitError::ShuttingDown);
        }
        // Requests whose clients left while they waited hold no place in
        // the queue: a full queue of abandoned requests must not refuse a
        // live one.
        Self::drop_abandoned(s);
        if s.queue.len() >= self.config.max_queue {
            return Err(SubmitError::QueueFull(s.queue.len()));
        }
        let (tx, rx) = channel();
        let alive = Arc::new(());
        let id = s.next_id;
        s.next_id += 1;
        s.queue.push_back(Pending {
            id,
            prompt,
            opts,
            events: tx,
            alive: Arc::downgrade(&alive),
            submitted: Instant::now(),
        });
        s.stats.queued = s.queue.len();
        Ok(RequestHandle {
            id,
            events: rx,
            _alive: alive,
        })
    }

    /// Removes queued requests whose clients went away, counting them as
    /// cancelled; dropping them closes their event channels.
    fn drop_abandoned(s: &mut Shared) {
        let before = s.queue.len();
        s.queue.retain(|p| p.alive.strong_count() > 0);
        s.stats.cancelled += (before - s.queue.len()) as u64;
        s.stats.queued = s.queue.len();
    }

    /// Asks [`Scheduler::run`] to finish: queued requests get an error, and
    /// running ones finish their current step and end with `Error`.
    pub fn shutdown(&self) {
        self.lock().shutdown = true;
        self.wake.notify_all();
    }

    pub fn stats(&self) -> SchedulerStats {
        self.lock().stats
    }

    /// Sets the expert policy of the following decode steps (prefills
    /// always route exactly). Check it against the model first
    /// ([`ExpertPolicy::resolve_for`]): a policy the model cannot run fails
    /// the requests of every decode step.
    pub fn set_policy(&self, policy: ExpertPolicy) {
        self.lock().policy = policy;
    }

    pub fn policy(&self) -> ExpertPolicy {
        self.lock().policy
    }

    /// Why the loop stopped, if the engine panicked inside it (see
    /// [`Scheduler::run`]); `None` while it is healthy.
    pub fn failure(&self) -> Option<String> {
        self.lock().failure.clone()
    }

    /// Runs the loop until [`Scheduler::shutdown`]. Engine errors fail the
    /// requests of the step that hit them, not the loop. An engine panic
    /// stops the loop for good: the engine's state (its caches, the
    /// sequences of the step) can no longer be trusted, so every running
    /// and queued request gets an `Error` event, later submissions get
    /// [`SubmitError::Failed`], and [`Scheduler::failure`] says why.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn run<E: Engine>(&self, engine: &E, tok: &Tokenizer) {
        let mut running: Vec<Running<E::Seq>> = Vec::new();
        while let Some(admitted) = self.admit(&mut running, true) {
            // The step consumes `admitted` and may drop finished requests, so
            // the channels to tell of a panic are kept aside first.
            let told: Vec<Sender<Event>> = running
                .iter()
                .map(|r| r.events.clone())
                .chain(admitted.iter().map(|p| p.events.clone()))
                .collect();
            // The one place the loop blocks: natively the GPU engine's
            // read-backs poll the device themselves, so the step's future
            // only waits on the GPU.
            let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pollster::block_on(self.step(engine, tok, &mut running, admitted))
            }));
            if let Err(payload) = step {
                let what = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".into());
                running.clear();
                self.fail(format!("the engine panicked: {what}"), &told);
                return;
            }
        }
    }

    /// Marks the scheduler failed and ends every request it still holds,
    /// and those of `told` (the step that failed), with an error.
    #[cfg(not(target_arch = "wasm32"))]
    fn fail(&self, why: String, told: &[Sender<Event>]) {
        let mut s = self.lock();
        let mut ended = told.len();
        for t in told {
            let _ = t.send(Event::Error(why.clone()));
        }
        for p in s.queue.drain(..) {
            let _ = p.events.send(Event::Error(why.clone()));
            ended += 1;
        }
        s.stats.failed += ended as u64;
        s.stats.queued = 0;
        s.stats.running = 0;
        s.failure = Some(why);
        drop(s);
        self.wake.notify_all();
    }

    /// [`Scheduler::run`] for a thread that must not block (a browser page):
    /// the same iterations, awaiting each forward pass, and awaiting
    /// `pause(busy)` after each iteration, so that the page can draw and
    /// submit in between: `busy` says whether requests are running (pause
    /// briefly) or nothing is left to do (wait longer; nothing else wakes an
    /// idle loop). Returns after [`Scheduler::shutdown`].
    pub async fn run_async<E: Engine, P: std::future::Future<Output = ()>>(
        &self,
        engine: &E,
        tok: &Tokenizer,
        mut pause: impl FnMut(bool) -> P,
    ) {
        let mut running: Vec<Running<E::Seq>> = Vec::new();
        while let Some(admitted) = self.admit(&mut running, false) {
            if !admitted.is_empty() || !running.is_empty() {
                self.step(engine, tok, &mut running, admitted).await;
            }
            pause(!running.is_empty()).await;
        }
    }

    /// Takes the queued requests that fit in the batch. With `block`, sleeps
    /// while there is nothing to do; without, returns an empty list then.
    /// `None` once the scheduler shuts down, after telling every queued and
    /// running request.
    fn admit<S>(&self, running: &mut Vec<Running<S>>, block: bool) -> Option<Vec<Pending>> {
        let mut s = self.lock();
        while block && !s.shutdown && s.queue.is_empty() && running.is_empty() {
            s = self.wake.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        if s.shutdown {
            for p in s.queue.drain(..) {
                let _ = p.events.send(Event::Error("the server is shutting down".into()));
            }
            for r in running.drain(..) {
                let _ = r.events.send(Event::Error("the server is shutting down".into()));
            }
            s.stats.queued = 0;
            s.stats.running = 0;
            return None;
        }
        Self::drop_abandoned(&mut s);
        let room = self.config.max_batch.saturating_sub(running.len());
        let n = room.min(s.queue.len());
        let v: Vec<Pending> = s.queue.drain(..n).collect();
        s.stats.queued = s.queue.len();
        Some(v)
    }

    /// One iteration after admission: drop cancelled requests, prefill the
    /// newcomers together, then one decode step for everyone running.
    async fn step<E: Engine>(
        &self,
        engine: &E,
        tok: &Tokenizer,
        running: &mut Vec<Running<E::Seq>>,
        admitted: Vec<Pending>,
    ) {
        let limit = engine.config().max_position_embeddings;
        let policy = self.lock().policy;
        // Cancelled requests leave before any compute is spent on them;
        // dropping a sequence frees its KV cache.
        let before = running.len();
        running.retain(|r| r.alive.strong_count() > 0);
        let mut cancelled = (before - running.len()) as u64;

        let mut failed = 0u64;
        let mut fresh: Vec<Running<E::Seq>> = Vec::new();
        let mut prompts: Vec<Vec<u32>> = Vec::new();
        for p in admitted {
            if p.alive.strong_count() == 0 {
                cancelled += 1;
                continue;
            }
            // Requests are validated against the model here, where its
            // limits are known; a bad one fails alone.
            let prompt_tokens = p.prompt.len();
            let state = check_prompt(engine.config(), &p.prompt)
                .and_then(|()| SeqState::new(engine.new_sequence(), prompt_tokens, &p.opts, p.opts.sampling));
            match state {
                Ok(state) => {
                    fresh.push(Running {
                        id: p.id,
                        state,
                        events: p.events,
                        alive: p.alive,
                        submitted: p.submitted,
                        first_token_s: 0.0,
                    });
                    prompts.push(p.prompt);
                }
                Err(e) => {
                    failed += 1;
                    let _ = p.events.send(Event::Error(e.to_string()));
                }
            }
        }

        let mut ended = Ended::default();
        // Prefill the newcomers together.
        if !fresh.is_empty() {
            let mut batch: Vec<(&mut E::Seq, &[u32])> = fresh
                .iter_mut()
                .zip(&prompts)
                .map(|(r, p)| (&mut r.state.seq, p.as_slice()))
                .collect();
            match engine.run(&mut batch, StepSpec::prefill(Logits::Last)).await {
                Ok(out) => {
                    for (r, row) in fresh.iter_mut().zip(&out.logits) {
                        let _ = r.events.send(Event::Started {
                            prompt_tokens: r.state.prompt_tokens,
                        });
                        r.first_token_s = r.submitted.elapsed().as_secs_f64();
                        let outcome = Self::advance(r, row, tok, limit);
                        ended.record(r.id, &r.events, outcome);
                    }
                }
                Err(e) => {
                    for r in &fresh {
                        let _ = r.events.send(Event::Error(format!("prefill failed: {e}")));
                        ended.failed.push(r.id);
                    }
                }
            }
            running.extend(fresh);
        }
        running.retain(|r| !ended.contains(r.id));

        // One decode step for everyone still running.
        let mut step_tokens = 0;
        let mut step_s = 0.0;
        if !running.is_empty() {
            let t0 = Instant::now();
            let mut batch: Vec<(&mut E::Seq, &[u32])> = running.iter_mut().map(|r| r.state.decode_input()).collect();
            match engine.run(&mut batch, StepSpec::decode(policy)).await {
                Ok(out) => {
                    step_s = t0.elapsed().as_secs_f64();
                    step_tokens = running.len();
                    for (r, row) in running.iter_mut().zip(&out.logits) {
                        let outcome = Self::advance(r, row, tok, limit);
                        ended.record(r.id, &r.events, outcome);
                    }
                }
                Err(e) => {
                    for r in running.iter() {
                        let _ = r.events.send(Event::Error(format!("decode failed: {e}")));
                        ended.failed.push(r.id);
                    }
                }
            }
            running.retain(|r| !ended.contains(r.id));
        }

        let mut s = self.lock();
        s.stats.running = running.len();
        s.stats.cancelled += cancelled + ended.gone.len() as u64;
        s.stats.failed += failed + ended.failed.len() as u64;
        s.stats.completed += ended.finished.len() as u64;
        if step_tokens > 0 {
            s.stats.decode_steps += 1;
            s.stats.generated_tokens += step_tokens as u64;
            s.stats.last_step_tok_s = step_tokens as f64 / step_s.max(1e-9);
        }
        drop(s);
        // Completions are sent only now that the stats count them, so that
        // a client that has seen its `Done` never reads stale counters.
        for (_, events, c) in ended.finished {
            // A client that left right at the end has nothing to free.
            let _ = events.send(Event::Done(c));
        }
    }

    /// Samples the next token of `r` from `row` ([`SeqState::accept`]) and
    /// streams its text as events; the caller sends the completion of a
    /// finished request.
    fn advance<S>(r: &mut Running<S>, row: &[f32], tok: &Tokenizer, limit: usize) -> Outcome {
        let mut gone = false;
        let events = &r.events;
        let step = r.state.accept(row, tok, limit, |text| {
            gone |= events.send(Event::Text(text.to_string())).is_err();
        });
        let finish = match step {
            Err(e) => {
                let _ = r.events.send(Event::Error(e.to_string()));
                return Outcome::Failed;
            }
            // A client that went away mid-stream has nothing left to tell.
            Ok(_) if gone => return Outcome::Gone,
            Ok(None) => return Outcome::Continue,
            Ok(Some(finish)) => finish,
        };
        Outcome::Finished(Completion {
            prompt_tokens: r.state.prompt_tokens,
            tokens: std::mem::take(&mut r.state.tokens),
            text: std::mem::take(&mut r.state.text),
            finish,
            first_token_s: r.first_token_s,
            total_s: r.submitted.elapsed().as_secs_f64(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submit_batch_queues_every_valid_request_and_refuses_each_bad_one_alone() {
        let sched = Scheduler::new(SchedulerConfig {
            max_batch: 8,
            max_queue: 3,
        })
        .unwrap();
        let ok = GenerateOptions::default();
        let bad = GenerateOptions {
            stop: vec![String::new()],
            ..GenerateOptions::default()
        };
        let r = sched.submit_batch(vec![
            (vec![1, 2], ok.clone()),
            (vec![], ok.clone()),
            (vec![3], bad),
            (vec![4], ok.clone()),
            (vec![5], ok.clone()),
            (vec![6], ok.clone()),
        ]);
        assert!(r[0].is_ok() && r[3].is_ok() && r[4].is_ok());
        assert!(matches!(r[1], Err(SubmitError::Invalid(_))));
        assert!(matches!(r[2], Err(SubmitError::Invalid(_))));
        assert!(matches!(r[5], Err(SubmitError::QueueFull(3))));
        let ids: Vec<u64> = r.iter().filter_map(|h| h.as_ref().ok().map(|h| h.id)).collect();
        assert_eq!(ids, [0, 1, 2]);
        assert_eq!(sched.stats().queued, 3);
        sched.shutdown();
        assert!(matches!(
            sched.submit_batch(vec![(vec![1], ok)])[0],
            Err(SubmitError::ShuttingDown)
        ));
    }

    #[test]
    fn the_policy_belongs_to_the_loop_not_to_a_request() {
        let s = Scheduler::new(SchedulerConfig::default()).unwrap();
        assert_eq!(s.policy(), ExpertPolicy::Exact);
        s.set_policy(ExpertPolicy::TopK(2));
        assert_eq!(s.policy(), ExpertPolicy::TopK(2));
        // A request that names a policy would change its batch-mates' routing.
        let lynx = GenerateOptions {
            policy: ExpertPolicy::Lynx(None),
            ..GenerateOptions::default()
        };
        match s.submit(vec![1], lynx) {
            Err(SubmitError::Invalid(why)) => assert!(why.contains("expert policy"), "{why}"),
            other => panic!("expected a refusal, got {:?}", other.map(|h| h.id)),
        }
        assert!(s.submit(vec![1], GenerateOptions::default()).is_ok());
    }

    #[test]
    fn abandoned_requests_give_up_their_queue_places() {
        // No loop runs, so requests stay queued.
        let s = Scheduler::new(SchedulerConfig {
            max_batch: 1,
            max_queue: 1,
        })
        .unwrap();
        let a = s.submit(vec![1], GenerateOptions::default()).unwrap();
        assert_eq!(
            s.submit(vec![1], GenerateOptions::default()).err(),
            Some(SubmitError::QueueFull(1))
        );
        // A client that keeps the events but drops the guard has gone too.
        let (events, guard) = a.into_parts();
        drop(guard);
        let b = s.submit(vec![2], GenerateOptions::default()).unwrap();
        let st = s.stats();
        assert_eq!((st.queued, st.cancelled), (1, 1), "{st:?}");
        // Dropping the abandoned request closed its channel.
        assert!(matches!(events.try_recv(), Err(TryRecvError::Disconnected)));
        drop(b);
    }
}
