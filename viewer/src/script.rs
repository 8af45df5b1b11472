//! Scripted runs for end-to-end tests and screenshots: load the model,
//! start one batched exchange under exact routing, switch the policy to
//! Lynx halfway through decode (as a person would, to compare), wait until
//! every reply has ended and the plots have caught up, then take a
//! screenshot and exit with a verdict.
//!
//! The script only drives [`AppState`], as a person clicking would, so it
//! runs the same code paths; it is a pure state machine over the state and
//! the time, tested with fake driver events.

use crate::state::{AppState, ModelStatus, PolicyKind, ReplyStatus, Role, Tab};

/// What to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScriptKind {
    /// Three chat tabs sent together with "Send all".
    Chat,
    /// One document and three questions, answered as one batch.
    DocQa,
}

impl std::str::FromStr for ScriptKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "chat" | "demo" => Ok(ScriptKind::Chat),
            "docqa" => Ok(ScriptKind::DocQa),
            _ => Err(format!("unknown script `{s}` (expected chat or docqa)")),
        }
    }
}

/// The prompts of the chat script, one per tab. They ask for answers longer
/// than the script's token limit, so that all three run to the limit and
/// the last decode step still holds the whole batch.
pub const CHAT_PROMPTS: [&str; 3] = [
    "Tell me about the city of Paris.",
    "Explain how rainbows form.",
    "Write a short story about a cat.",
];

/// The document of the QA script, and its questions.
pub const QA_DOCUMENT: &str = "Lynx is a runtime for Mixture-of-Experts language models. It is written in Rust \
and runs its kernels as WGSL compute shaders through wgpu. In a decode step, each token picks its top 8 of 16 \
experts; Lynx's batch-aware selection then lets the tokens of a batch share fewer distinct experts, so each \
step reads fewer expert weights from memory. The project started in 2026 in Lyon.";
pub const QA_QUESTIONS: [&str; 3] = [
    "What language is Lynx written in?",
    "How many experts does each token pick?",
    "Where did the project start?",
];

#[derive(Clone, Debug, PartialEq)]
enum Stage {
    WaitModel,
    Running { since: f64, switched: bool },
    Settling { since: f64 },
    Capture,
    WaitShot,
    Finished,
}

/// What the app should do for the script this frame.
#[derive(Clone, Debug, PartialEq)]
pub enum ScriptAction {
    None,
    /// Take a screenshot of the next frame.
    Screenshot,
}

#[derive(Clone, Debug)]
pub struct Script {
    pub kind: ScriptKind,
    pub max_tokens: usize,
    /// Give up (and fail) after this many seconds.
    pub timeout_s: f64,
    /// How long to keep drawing after the last reply, for the last metrics.
    pub settle_s: f64,
    /// Switch to Lynx halfway through decode. Off, the run stays on exact
    /// routing throughout, so that its replies can be compared with a
    /// plain greedy generation (the browser test does).
    pub switch_to_lynx: bool,
    stage: Stage,
    started: Option<f64>,
    /// Why the run failed, once it has.
    failure: Option<String>,
    /// The exit code, once the screenshot is written (or failed).
    exit: Option<i32>,
    /// The lines the run prints at the end, for the test log.
    pub report: Vec<String>,
}

impl Script {
    pub fn new(kind: ScriptKind, max_tokens: usize) -> Script {
        Script {
            kind,
            max_tokens: max_tokens.max(1),
            timeout_s: 900.0,
            settle_s: 1.0,
            switch_to_lynx: true,
            stage: Stage::WaitModel,
            started: None,
            failure: None,
            exit: None,
            report: Vec::new(),
        }
    }

    /// The number of requests the script submits together.
    pub fn batch_size(&self) -> usize {
        match self.kind {
            ScriptKind::Chat => CHAT_PROMPTS.len(),
            ScriptKind::DocQa => QA_QUESTIONS.len(),
        }
    }

    /// The process exit code, once the script has finished.
    pub fn exit_code(&self) -> Option<i32> {
        self.exit
    }

    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// Advances the script; call once per frame with the time in seconds.
    pub fn step(&mut self, state: &mut AppState, now: f64) -> ScriptAction {
        let started = *self.started.get_or_insert(now);
        if self.failure.is_none()
            && now - started > self.timeout_s
            && !matches!(self.stage, Stage::Capture | Stage::WaitShot | Stage::Finished)
        {
            self.fail(format!("timed out after {:.0} s", now - started));
        }
        match self.stage.clone() {
            Stage::WaitModel => match &state.model {
                ModelStatus::NotLoaded => state.load_model(),
                ModelStatus::Loading { .. } => {}
                ModelStatus::Failed(e) => self.fail(format!("the model failed to load: {e}")),
                ModelStatus::Ready(_) => {
                    self.start(state);
                    self.stage = Stage::Running {
                        since: now,
                        switched: false,
                    };
                }
            },
            Stage::Running { since, switched } => {
                if self.switch_to_lynx && !switched && state.metrics.decode_steps >= self.switch_after() {
                    state.policy.kind = PolicyKind::Lynx;
                    state.policy.lynx_auto = true;
                    state.sync_policy();
                    self.report.push(format!(
                        "switched to lynx after {} decode steps",
                        state.metrics.decode_steps
                    ));
                    self.stage = Stage::Running { since, switched: true };
                }
                if let Some(e) = self.first_error(state) {
                    self.fail(e);
                } else if state.all_replies_ended() {
                    self.report.push(format!(
                        "all {} replies ended after {:.1} s",
                        self.batch_size(),
                        now - since
                    ));
                    self.stage = Stage::Settling { since: now };
                }
            }
            Stage::Settling { since } => {
                if now - since >= self.settle_s {
                    self.verdict(state);
                    self.stage = Stage::Capture;
                }
            }
            Stage::Capture => {
                self.stage = Stage::WaitShot;
                return ScriptAction::Screenshot;
            }
            Stage::WaitShot | Stage::Finished => {}
        }
        ScriptAction::None
    }

    /// The app calls this once the screenshot is saved (or could not be).
    pub fn screenshot_done(&mut self, result: Result<String, String>) {
        match result {
            Ok(path) => self.report.push(format!("screenshot saved to {path}")),
            Err(e) => {
                self.failure.get_or_insert(format!("the screenshot failed: {e}"));
            }
        }
        if let Some(f) = &self.failure {
            self.report.push(format!("FAILED: {f}"));
        }
        self.exit = Some(if self.failure.is_some() { 1 } else { 0 });
        self.stage = Stage::Finished;
    }

    /// A failure still ends with a screenshot, which shows what went wrong.
    fn fail(&mut self, why: String) {
        if self.failure.is_none() {
            self.failure = Some(why);
        }
        if !matches!(self.stage, Stage::WaitShot | Stage::Finished) {
            self.stage = Stage::Capture;
        }
    }

    /// Decode steps under exact routing before the switch to Lynx.
    pub fn switch_after(&self) -> u64 {
        (self.max_tokens as u64 / 2).max(1)
    }

    fn start(&mut self, state: &mut AppState) {
        state.policy.kind = PolicyKind::Exact;
        state.sync_policy();
        match self.kind {
            ScriptKind::Chat => {
                // Reuse the empty first tab, then open one per further prompt.
                let mut ids: Vec<u64> = state
                    .conversations
                    .iter()
                    .filter(|c| c.messages.is_empty())
                    .map(|c| c.id)
                    .take(1)
                    .collect();
                while ids.len() < CHAT_PROMPTS.len() {
                    ids.push(state.new_conversation());
                }
                for (id, prompt) in ids.iter().zip(CHAT_PROMPTS) {
                    if let Some(c) = state.conversation_mut(*id) {
                        c.draft = prompt.to_string();
                        c.sampling.max_tokens = self.max_tokens;
                    }
                }
                state.tab = Tab::Chat(ids[0]);
                let n = state.send_all();
                self.report.push(format!("sent {n} conversations together"));
            }
            ScriptKind::DocQa => {
                state.qa.document = QA_DOCUMENT.to_string();
                state.qa.questions = QA_QUESTIONS.join("\n");
                state.qa.sampling.max_tokens = self.max_tokens;
                state.tab = Tab::DocQa;
                let n = state.submit_qa();
                self.report.push(format!("submitted {n} questions as one batch"));
            }
        }
    }

    fn first_error(&self, state: &AppState) -> Option<String> {
        let chat = state
            .conversations
            .iter()
            .flat_map(|c| &c.messages)
            .filter_map(|m| m.status.as_ref());
        let qa = state.qa.items.iter().map(|i| &i.status);
        chat.chain(qa).find_map(|s| match s {
            ReplyStatus::Failed(e) => Some(format!("a reply failed: {e}")),
            _ => None,
        })
    }

    /// Checks that the exchange really happened: every reply has text, and
    /// the requests decoded together.
    fn verdict(&mut self, state: &AppState) {
        let replies: Vec<(String, Option<&ReplyStatus>)> = match self.kind {
            ScriptKind::Chat => state
                .conversations
                .iter()
                .filter_map(|c| c.messages.iter().rev().find(|m| m.role == Role::Assistant))
                .map(|m| (m.text.clone(), m.status.as_ref()))
                .collect(),
            ScriptKind::DocQa => state
                .qa
                .items
                .iter()
                .map(|i| (i.answer.clone(), Some(&i.status)))
                .collect(),
        };
        for (i, (text, status)) in replies.iter().enumerate() {
            let tokens = match status {
                Some(ReplyStatus::Done(f)) => f.generated_tokens,
                _ => 0,
            };
            self.report.push(format!(
                "reply {i} ({tokens} tokens): {}",
                text.trim().replace('\n', " ")
            ));
        }
        let m = &state.metrics;
        self.report.push(format!(
            "decode steps {}, largest decode batch {}, rolling {:.2} tok/s",
            m.decode_steps,
            m.max_batch,
            m.rolling_tok_s().unwrap_or(0.0)
        ));
        let policies: Vec<String> = m
            .policy_changes()
            .iter()
            .map(|(x, p)| format!("{p} from step {x}"))
            .collect();
        self.report
            .push(format!("policies over the decode steps: {}", policies.join(", ")));
        if let Some((e, s)) = m.rolling_distinct() {
            self.report
                .push(format!("distinct experts per layer: exact {e:.2}, selected {s:.2}"));
        }
        let done = replies
            .iter()
            .filter(|(_, s)| matches!(s, Some(ReplyStatus::Done(f)) if f.generated_tokens > 0))
            .count();
        if replies.len() != self.batch_size() || done != replies.len() {
            self.fail(format!("{done} of {} replies completed", self.batch_size()));
        } else if m.decode_steps == 0 {
            self.fail("no decode-step metrics arrived".into());
        } else if m.max_batch < self.batch_size() {
            self.fail(format!(
                "the largest decode batch was {}, not {}",
                m.max_batch,
                self.batch_size()
            ));
        } else if let Some(first) = m
            .history
            .front()
            .filter(|p| p.index == 0 && p.tokens < self.batch_size())
        {
            // Sent together, they are prefilled together: no step decodes a part of them alone.
            self.fail(format!(
                "the first decode step held {} of the {} requests",
                first.tokens,
                self.batch_size()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::driver::{Command, DriverEvent, Finished, ModelInfo, Submission};
    use lynx::generate::FinishReason;
    use lynx::metrics::{LayerMetrics, StepMetrics};
    use lynx::selection::ExpertPolicy;

    fn info() -> ModelInfo {
        ModelInfo {
            path: "demo.gguf".into(),
            description: "test".into(),
            num_layers: 1,
            experts: Some((4, 2)),
            has_chat_template: true,
            adapter: "none".into(),
            context_length: 2048,
        }
    }

    fn decode_step(tokens: usize) -> Arc<StepMetrics> {
        Arc::new(StepMetrics {
            step: 1,
            policy: "lynx".into(),
            decode: true,
            tokens,
            top_k: 2,
            layers: vec![LayerMetrics {
                layer: 0,
                distinct_exact: 3,
                distinct_selected: 2,
                tokens_per_expert: vec![tokens as u32, tokens as u32, 0, 0],
                bins: vec![0; tokens * 2],
                remapped: vec![false; tokens * 2],
                expert_bytes: 10,
            }],
            seconds: 0.5,
        })
    }

    fn submitted(state: &AppState) -> Vec<Submission> {
        state
            .outbox
            .iter()
            .filter_map(|c| match c {
                Command::Submit(s) => Some(s.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// Runs the chat script against fake events; `batch` is the decode batch
    /// the fake metrics report.
    fn run_chat(batch: usize) -> Script {
        let mut state = AppState::new();
        let mut script = Script::new(ScriptKind::Chat, 8);
        assert_eq!(script.step(&mut state, 0.0), ScriptAction::None);
        assert_eq!(state.outbox, vec![Command::Load { path: None }]);
        state.apply(DriverEvent::Loaded(info()));
        state.outbox.clear();
        script.step(&mut state, 1.0);
        let subs = submitted(&state);
        assert_eq!(subs.len(), 3, "three tabs in one Submit");
        assert_eq!(state.conversations.len(), 3);
        assert!(
            !state.outbox.iter().any(|c| matches!(c, Command::SetPolicy(_))),
            "it starts exact"
        );
        // Halfway through decode (4 of 8 steps) the script switches to Lynx.
        for _ in 0..3 {
            state.apply(DriverEvent::Metrics(decode_step(batch)));
        }
        script.step(&mut state, 1.5);
        assert!(!state.outbox.iter().any(|c| matches!(c, Command::SetPolicy(_))));
        state.apply(DriverEvent::Metrics(decode_step(batch)));
        script.step(&mut state, 1.6);
        assert!(state.outbox.contains(&Command::SetPolicy(ExpertPolicy::Lynx(None))));
        for (i, s) in subs.iter().enumerate() {
            state.apply(DriverEvent::Text {
                id: s.id,
                delta: format!("answer {i}"),
            });
            state.apply(DriverEvent::Done {
                id: s.id,
                finished: Finished {
                    prompt_tokens: 9,
                    generated_tokens: 4,
                    finish: FinishReason::Eos,
                    first_token_s: 0.1,
                    total_s: 2.0,
                },
            });
        }
        assert_eq!(script.step(&mut state, 2.0), ScriptAction::None, "settling");
        assert_eq!(script.step(&mut state, 3.5), ScriptAction::None, "verdict");
        assert_eq!(script.step(&mut state, 3.6), ScriptAction::Screenshot);
        assert_eq!(script.exit_code(), None);
        script.screenshot_done(Ok("shot.png".into()));
        script
    }

    #[test]
    fn chat_script_succeeds_when_all_replies_decode_together() {
        let s = run_chat(3);
        assert_eq!(s.exit_code(), Some(0), "{:?}", s.report);
        assert!(s.report.iter().any(|l| l.contains("answer 2")), "{:?}", s.report);
    }

    #[test]
    fn without_the_switch_the_script_stays_exact() {
        let mut state = AppState::new();
        let mut script = Script::new(ScriptKind::Chat, 4);
        script.switch_to_lynx = false;
        script.step(&mut state, 0.0);
        state.apply(DriverEvent::Loaded(info()));
        script.step(&mut state, 1.0);
        state.outbox.clear();
        for i in 0..6 {
            state.apply(DriverEvent::Metrics(decode_step(3)));
            script.step(&mut state, 1.1 + i as f64 * 0.1);
        }
        assert!(
            !state.outbox.iter().any(|c| matches!(c, Command::SetPolicy(_))),
            "{:?}",
            state.outbox
        );
        assert!(
            !script.report.iter().any(|l| l.contains("switched")),
            "{:?}",
            script.report
        );
    }

    #[test]
    fn chat_script_fails_when_the_replies_never_shared_a_batch() {
        let s = run_chat(1);
        assert_eq!(s.exit_code(), Some(1));
        assert!(
            s.failure().is_some_and(|f| f.contains("largest decode batch was 1")),
            "{:?}",
            s.failure()
        );
    }

    #[test]
    fn a_load_failure_still_takes_a_screenshot_and_fails() {
        let mut state = AppState::new();
        let mut script = Script::new(ScriptKind::DocQa, 8);
        script.step(&mut state, 0.0);
        state.apply(DriverEvent::LoadFailed("no GPU".into()));
        script.step(&mut state, 0.1);
        assert_eq!(script.step(&mut state, 0.2), ScriptAction::Screenshot);
        script.screenshot_done(Ok("shot.png".into()));
        assert_eq!(script.exit_code(), Some(1));
        assert!(script.failure().is_some_and(|f| f.contains("no GPU")));
    }

    #[test]
    fn docqa_script_submits_every_question_at_once_and_times_out() {
        let mut state = AppState::new();
        let mut script = Script::new(ScriptKind::DocQa, 8);
        script.timeout_s = 10.0;
        script.step(&mut state, 0.0);
        state.apply(DriverEvent::Loaded(info()));
        script.step(&mut state, 1.0);
        let subs = submitted(&state);
        assert_eq!(subs.len(), 3);
        assert_eq!(state.tab, Tab::DocQa);
        assert!(subs[2].messages[1].content.contains("Where did the project start?"));
        // Nothing ever answers: the timeout fails the run and takes the screenshot at once.
        assert_eq!(script.step(&mut state, 20.0), ScriptAction::Screenshot);
        script.screenshot_done(Ok("shot.png".into()));
        assert_eq!(script.exit_code(), Some(1));
        assert!(script.failure().is_some_and(|f| f.contains("timed out")));
    }
}
