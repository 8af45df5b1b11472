//! The viewer's state and the logic behind every control, without any
//! drawing: conversations, batch document QA, the policy editor, the model
//! status, and how driver events update them. Every user action becomes
//! [`Command`]s in [`AppState::outbox`], which the app hands to its driver
//! once per frame, so all of this is testable without a GPU or a window.

use std::collections::HashMap;

use lynx::ChatMessage;
use lynx::generate::GenerateOptions;
use lynx::sampling::SamplingParams;
use lynx::selection::{ExpertPolicy, LynxParams};
use lynx::serving::SchedulerStats;

use crate::aggregate::MetricsAggregate;
use crate::driver::{Command, DriverEvent, Finished, LoadPhase, ModelInfo, RequestId, Submission};

/// Sampling settings as the UI edits them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingSettings {
    pub temperature: f32,
    pub top_p: f32,
    /// 0 turns top-k filtering off.
    pub top_k: usize,
    pub seed: u64,
    pub max_tokens: usize,
}

impl Default for SamplingSettings {
    fn default() -> Self {
        SamplingSettings {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            max_tokens: 96,
        }
    }
}

impl SamplingSettings {
    pub fn options(&self) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens: self.max_tokens.max(1),
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                seed: self.seed,
            },
            stop: Vec::new(),
            stop_on_eos: true,
            // The serving loop applies the policy editor's choice.
            policy: lynx::selection::ExpertPolicy::Exact,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
}

/// Where a reply (or a QA answer) stands.
#[derive(Clone, Debug, PartialEq)]
pub enum ReplyStatus {
    /// Submitted; waiting for a batch slot and its prefill.
    Queued,
    Streaming,
    Done(Finished),
    Stopped,
    Failed(String),
}

impl ReplyStatus {
    pub fn is_active(&self) -> bool {
        matches!(self, ReplyStatus::Queued | ReplyStatus::Streaming)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    pub role: Role,
    pub text: String,
    /// For assistant messages: how the reply went. User messages are `None`.
    pub status: Option<ReplyStatus>,
}

/// One chat tab.
#[derive(Clone, Debug)]
pub struct Conversation {
    /// Stable across closing other tabs.
    pub id: u64,
    pub title: String,
    pub system: String,
    pub messages: Vec<Message>,
    /// The message being typed.
    pub draft: String,
    pub sampling: SamplingSettings,
    /// The request of the reply now streaming, if any.
    pub request: Option<RequestId>,
}

impl Conversation {
    pub fn new(id: u64, sampling: SamplingSettings) -> Conversation {
        Conversation {
            id,
            title: format!("Chat {}", id + 1),
            system: String::new(),
            messages: Vec::new(),
            draft: String::new(),
            sampling,
            request: None,
        }
    }

    pub fn is_busy(&self) -> bool {
        self.request.is_some()
    }

    /// The turns the chat template renders: the system message, then every
    /// user turn and every assistant reply that has text, up to the end.
    pub fn chat_messages(&self) -> Vec<ChatMessage> {
        let mut out = Vec::new();
        if !self.system.trim().is_empty() {
            out.push(ChatMessage::system(self.system.trim()));
        }
        for m in &self.messages {
            match m.role {
                Role::User => out.push(ChatMessage::user(m.text.as_str())),
                // A reply that failed or was stopped before any text is not a turn.
                Role::Assistant if !m.text.is_empty() => out.push(ChatMessage::assistant(m.text.as_str())),
                Role::Assistant => {}
            }
        }
        out
    }

    /// Whether the last turn is the user's, so that a reply can be (re)generated.
    fn ends_with_user(&self) -> bool {
        self.messages
            .iter()
            .rev()
            .find(|m| !(m.role == Role::Assistant && m.text.is_empty()))
            .is_some_and(|m| m.role == Role::User)
    }

    fn reply_mut(&mut self) -> Option<&mut Message> {
        self.messages.last_mut().filter(|m| m.role == Role::Assistant)
    }

    /// A short status for the tab title: streaming, queued or nothing.
    pub fn badge(&self) -> &'static str {
        match self.messages.last().and_then(|m| m.status.as_ref()) {
            Some(ReplyStatus::Queued) => " …",
            Some(ReplyStatus::Streaming) => " •",
            Some(ReplyStatus::Failed(_)) => " !",
            _ => "",
        }
    }
}

/// One question of a document-QA batch.
#[derive(Clone, Debug, PartialEq)]
pub struct QaItem {
    pub question: String,
    pub answer: String,
    pub status: ReplyStatus,
    pub request: Option<RequestId>,
}

/// Batch document QA: one document, N questions, one batch.
#[derive(Clone, Debug)]
pub struct DocQa {
    pub path: String,
    pub document: String,
    /// One question per line.
    pub questions: String,
    pub items: Vec<QaItem>,
    pub sampling: SamplingSettings,
    /// Why the last document read failed, if it did.
    pub read_error: Option<String>,
}

impl Default for DocQa {
    fn default() -> Self {
        DocQa {
            path: String::new(),
            document: String::new(),
            questions: String::new(),
            items: Vec::new(),
            sampling: SamplingSettings {
                max_tokens: 48,
                ..SamplingSettings::default()
            },
            read_error: None,
        }
    }
}

impl DocQa {
    /// The non-empty lines of the questions box.
    pub fn question_list(&self) -> Vec<String> {
        self.questions
            .lines()
            .map(str::trim)
            .filter(|q| !q.is_empty())
            .map(String::from)
            .collect()
    }

    pub fn is_busy(&self) -> bool {
        self.items.iter().any(|i| i.status.is_active())
    }
}

/// The chat turns of one QA question: the document and the question, with
/// an instruction to answer from the document briefly.
pub fn qa_messages(document: &str, question: &str) -> Vec<ChatMessage> {
    vec![
        ChatMessage::system("Answer the question using only the document below. Answer in one short sentence."),
        ChatMessage::user(format!(
            "Document:\n{}\n\nQuestion: {}",
            document.trim(),
            question.trim()
        )),
    ]
}

/// The policy kinds the combo box offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyKind {
    Exact,
    Lynx,
    Oea,
    TopK,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 4] = [PolicyKind::Exact, PolicyKind::Lynx, PolicyKind::Oea, PolicyKind::TopK];

    pub fn label(self) -> &'static str {
        match self {
            PolicyKind::Exact => "exact",
            PolicyKind::Lynx => "lynx",
            PolicyKind::Oea => "oea",
            PolicyKind::TopK => "topk",
        }
    }
}

/// The policy controls: a kind and each kind's parameters, kept while the
/// user switches kinds so that switching back restores them.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyEditor {
    pub kind: PolicyKind,
    /// Lynx with the parameters derived from K/E (`lynx`), or explicit ones.
    pub lynx_auto: bool,
    pub alpha: f32,
    pub beta: u32,
    pub threshold: i32,
    pub oea_k0: usize,
    pub topk: usize,
    /// The model's E and K, which bound the parameters.
    pub experts: usize,
    pub top_k: usize,
}

impl PolicyEditor {
    /// Defaults for a model with E experts and top-K routing.
    pub fn for_model(e: usize, k: usize) -> PolicyEditor {
        let p = LynxParams::for_sparsity(e, k);
        let half = ((k as f32 * ExpertPolicy::DEFAULT_OEA_FRACTION) as usize).max(1);
        PolicyEditor {
            kind: PolicyKind::Exact,
            lynx_auto: true,
            alpha: p.alpha,
            beta: p.beta,
            threshold: p.threshold_bin,
            oea_k0: half,
            topk: half,
            experts: e,
            top_k: k.max(1),
        }
    }

    /// Back to the defaults of the kind's parameters (keeping the kind).
    pub fn reset_params(&mut self) {
        let kind = self.kind;
        *self = PolicyEditor {
            kind,
            ..PolicyEditor::for_model(self.experts, self.top_k)
        };
    }

    pub fn policy(&self) -> ExpertPolicy {
        match self.kind {
            PolicyKind::Exact => ExpertPolicy::Exact,
            PolicyKind::Lynx if self.lynx_auto => ExpertPolicy::Lynx(None),
            PolicyKind::Lynx => ExpertPolicy::Lynx(Some(LynxParams {
                alpha: self.alpha.max(0.0),
                beta: self.beta,
                threshold_bin: self.threshold.min(0),
            })),
            PolicyKind::Oea => ExpertPolicy::Oea {
                k0: self.oea_k0.clamp(1, self.top_k),
            },
            PolicyKind::TopK => ExpertPolicy::TopK(self.topk.clamp(1, self.top_k)),
        }
    }

    /// Shows `policy` in the editor (e.g. the one the driver applied).
    pub fn set_from(&mut self, policy: ExpertPolicy) {
        match policy {
            ExpertPolicy::Exact => self.kind = PolicyKind::Exact,
            ExpertPolicy::Lynx(None) => {
                self.kind = PolicyKind::Lynx;
                self.lynx_auto = true;
            }
            ExpertPolicy::Lynx(Some(p)) => {
                self.kind = PolicyKind::Lynx;
                self.lynx_auto = false;
                self.alpha = p.alpha;
                self.beta = p.beta;
                self.threshold = p.threshold_bin;
            }
            ExpertPolicy::Oea { k0 } => {
                self.kind = PolicyKind::Oea;
                if k0 > 0 {
                    self.oea_k0 = k0;
                }
            }
            ExpertPolicy::TopK(n) => {
                self.kind = PolicyKind::TopK;
                self.topk = n;
            }
        }
    }
}

/// Where the model stands.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelStatus {
    NotLoaded,
    Loading { path: String, phase: LoadPhase },
    Ready(ModelInfo),
    Failed(String),
}

/// Which view the left side shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tab {
    Chat(u64),
    DocQa,
}

/// Who a request belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Chat(u64),
    Qa(usize),
}

/// Everything the UI shows and edits.
pub struct AppState {
    /// The model path field; empty means the default model.
    pub model_path: String,
    /// Shown as the field's hint: the default model's path.
    pub default_model: String,
    pub model: ModelStatus,
    pub conversations: Vec<Conversation>,
    pub tab: Tab,
    pub qa: DocQa,
    pub policy: PolicyEditor,
    /// The policy the driver last confirmed, and its last refusal.
    pub applied_policy: Option<ExpertPolicy>,
    pub policy_error: Option<String>,
    /// The policy last sent, so that an unchanged editor sends nothing.
    sent_policy: Option<ExpertPolicy>,
    pub metrics: MetricsAggregate,
    pub stats: SchedulerStats,
    /// The MoE layer (row) the per-layer plots show; `None` is the mean.
    pub layer_row: Option<usize>,
    /// Sampling settings new tabs start with.
    pub default_sampling: SamplingSettings,
    /// Commands for the driver, sent at the end of the frame.
    pub outbox: Vec<Command>,
    /// Errors not tied to a message, newest last.
    pub notices: Vec<String>,
    routes: HashMap<RequestId, Route>,
    next_request: RequestId,
    next_conversation: u64,
}

impl Default for AppState {
    fn default() -> Self {
        AppState::new()
    }
}

impl AppState {
    pub fn new() -> AppState {
        let mut s = AppState {
            model_path: String::new(),
            default_model: String::new(),
            model: ModelStatus::NotLoaded,
            conversations: Vec::new(),
            tab: Tab::Chat(0),
            qa: DocQa::default(),
            policy: PolicyEditor::for_model(16, 8),
            applied_policy: None,
            policy_error: None,
            sent_policy: None,
            metrics: MetricsAggregate::default(),
            stats: SchedulerStats::default(),
            layer_row: None,
            default_sampling: SamplingSettings::default(),
            outbox: Vec::new(),
            notices: Vec::new(),
            routes: HashMap::new(),
            next_request: 0,
            next_conversation: 0,
        };
        s.new_conversation();
        s
    }

    pub fn is_ready(&self) -> bool {
        matches!(self.model, ModelStatus::Ready(_))
    }

    pub fn model_info(&self) -> Option<&ModelInfo> {
        match &self.model {
            ModelStatus::Ready(info) => Some(info),
            _ => None,
        }
    }

    /// Requests running or waiting, as far as the UI knows.
    pub fn active_requests(&self) -> usize {
        self.routes.len()
    }

    /// Opens a new chat tab and shows it; returns its id.
    pub fn new_conversation(&mut self) -> u64 {
        let id = self.next_conversation;
        self.next_conversation += 1;
        self.conversations.push(Conversation::new(id, self.default_sampling));
        self.tab = Tab::Chat(id);
        id
    }

    /// Closes a tab, cancelling its reply if one is streaming.
    pub fn close_conversation(&mut self, id: u64) {
        if let Some(c) = self.conversation(id)
            && let Some(r) = c.request
        {
            self.outbox.push(Command::Stop(r));
            self.routes.remove(&r);
        }
        self.conversations.retain(|c| c.id != id);
        if self.conversations.is_empty() {
            self.new_conversation();
        } else if self.tab == Tab::Chat(id) {
            self.tab = Tab::Chat(self.conversations[0].id);
        }
    }

    pub fn conversation(&self, id: u64) -> Option<&Conversation> {
        self.conversations.iter().find(|c| c.id == id)
    }

    pub fn conversation_mut(&mut self, id: u64) -> Option<&mut Conversation> {
        self.conversations.iter_mut().find(|c| c.id == id)
    }

    /// Asks the driver for a model; `model_path` empty means the default.
    pub fn load_model(&mut self) {
        let path = self.model_path.trim().to_string();
        let shown = if path.is_empty() {
            self.default_model.clone()
        } else {
            path.clone()
        };
        self.model = ModelStatus::Loading {
            path: shown,
            phase: LoadPhase::Reading,
        };
        self.outbox.push(Command::Load {
            path: (!path.is_empty()).then_some(path),
        });
    }

    fn take_request_id(&mut self, route: Route) -> RequestId {
        let id = self.next_request;
        self.next_request += 1;
        self.routes.insert(id, route);
        id
    }

    /// Turns a tab's draft into a user turn and its reply's submission.
    fn prepare_turn(&mut self, conv: u64) -> Option<Submission> {
        let c = self.conversation(conv)?;
        if c.is_busy() || c.draft.trim().is_empty() {
            return None;
        }
        let id = self.take_request_id(Route::Chat(conv));
        let c = self.conversation_mut(conv)?;
        let text = std::mem::take(&mut c.draft).trim().to_string();
        if c.messages.is_empty() && c.title.starts_with("Chat ") {
            c.title = short_title(&text);
        }
        c.messages.push(Message {
            role: Role::User,
            text,
            status: None,
        });
        Some(Self::start_reply(c, id))
    }

    fn start_reply(c: &mut Conversation, id: RequestId) -> Submission {
        let messages = c.chat_messages();
        c.messages.push(Message {
            role: Role::Assistant,
            text: String::new(),
            status: Some(ReplyStatus::Queued),
        });
        c.request = Some(id);
        Submission {
            id,
            messages,
            options: c.sampling.options(),
        }
    }

    /// Sends one tab's draft. It joins the running batch, if there is one.
    pub fn send(&mut self, conv: u64) -> bool {
        if !self.is_ready() {
            return false;
        }
        match self.prepare_turn(conv) {
            Some(s) => {
                self.outbox.push(Command::Submit(vec![s]));
                true
            }
            None => false,
        }
    }

    /// Sends the drafts of every idle tab at once, so that they are
    /// prefilled together and decode as one batch; returns how many.
    pub fn send_all(&mut self) -> usize {
        if !self.is_ready() {
            return 0;
        }
        let ids: Vec<u64> = self.conversations.iter().map(|c| c.id).collect();
        let batch: Vec<Submission> = ids.into_iter().filter_map(|id| self.prepare_turn(id)).collect();
        let n = batch.len();
        if n > 0 {
            self.outbox.push(Command::Submit(batch));
        }
        n
    }

    /// Stops a tab's streaming reply, keeping the text so far.
    pub fn stop(&mut self, conv: u64) {
        let Some(c) = self.conversation_mut(conv) else { return };
        let Some(r) = c.request.take() else { return };
        if let Some(m) = c.reply_mut() {
            m.status = Some(ReplyStatus::Stopped);
        }
        self.routes.remove(&r);
        self.outbox.push(Command::Stop(r));
    }

    /// Replaces the last reply with a new one for the same user turn.
    pub fn regenerate(&mut self, conv: u64) -> bool {
        if !self.is_ready() {
            return false;
        }
        let Some(c) = self.conversation(conv) else { return false };
        if c.is_busy() || !c.messages.iter().any(|m| m.role == Role::User) {
            return false;
        }
        let id = self.take_request_id(Route::Chat(conv));
        let Some(c) = self.conversation_mut(conv) else {
            return false;
        };
        while c.messages.last().is_some_and(|m| m.role == Role::Assistant) {
            c.messages.pop();
        }
        let s = Self::start_reply(c, id);
        self.outbox.push(Command::Submit(vec![s]));
        true
    }

    /// Whether a tab can regenerate its last reply now.
    pub fn can_regenerate(&self, conv: u64) -> bool {
        self.conversation(conv).is_some_and(|c| {
            !c.is_busy()
                && c.messages.iter().any(|m| m.role == Role::User)
                && (c.ends_with_user() || c.messages.last().is_some_and(|m| m.role == Role::Assistant))
        })
    }

    /// Submits every question of the QA box as one batch; returns how many.
    pub fn submit_qa(&mut self) -> usize {
        if !self.is_ready() || self.qa.is_busy() {
            return 0;
        }
        let questions = self.qa.question_list();
        if questions.is_empty() || self.qa.document.trim().is_empty() {
            return 0;
        }
        // Requests of the previous batch no longer route anywhere.
        self.routes.retain(|_, r| !matches!(r, Route::Qa(_)));
        self.qa.items.clear();
        let mut batch = Vec::with_capacity(questions.len());
        for (i, q) in questions.into_iter().enumerate() {
            let id = self.take_request_id(Route::Qa(i));
            batch.push(Submission {
                id,
                messages: qa_messages(&self.qa.document, &q),
                options: self.qa.sampling.options(),
            });
            self.qa.items.push(QaItem {
                question: q,
                answer: String::new(),
                status: ReplyStatus::Queued,
                request: Some(id),
            });
        }
        let n = batch.len();
        self.outbox.push(Command::Submit(batch));
        n
    }

    /// Stops every unfinished QA answer.
    pub fn stop_qa(&mut self) {
        for item in &mut self.qa.items {
            if let Some(r) = item.request.take()
                && item.status.is_active()
            {
                item.status = ReplyStatus::Stopped;
                self.routes.remove(&r);
                self.outbox.push(Command::Stop(r));
            }
        }
    }

    pub fn read_document(&mut self) {
        let path = self.qa.path.trim().to_string();
        if path.is_empty() {
            self.qa.read_error = Some("enter the path of a text file first".into());
            return;
        }
        self.qa.read_error = None;
        self.outbox.push(Command::ReadDocument { path });
    }

    /// Sends the editor's policy if it differs from the one last sent.
    pub fn sync_policy(&mut self) {
        if !self.model_info().is_some_and(|m| m.experts.is_some()) {
            return;
        }
        let p = self.policy.policy();
        if self.sent_policy != Some(p) {
            self.sent_policy = Some(p);
            self.outbox.push(Command::SetPolicy(p));
        }
    }

    /// Applies one driver event.
    pub fn apply(&mut self, event: DriverEvent) {
        match event {
            DriverEvent::LoadProgress(phase) => {
                let path = match &self.model {
                    ModelStatus::Loading { path, .. } => path.clone(),
                    _ => self.model_path.clone(),
                };
                self.model = ModelStatus::Loading { path, phase };
            }
            DriverEvent::Loaded(info) => {
                self.metrics.reset();
                self.layer_row = None;
                self.stats = SchedulerStats::default();
                if let Some((e, k)) = info.experts {
                    let kind = self.policy.kind;
                    self.policy = PolicyEditor {
                        kind,
                        ..PolicyEditor::for_model(e, k)
                    };
                } else {
                    self.policy = PolicyEditor {
                        kind: PolicyKind::Exact,
                        ..self.policy.clone()
                    };
                }
                // The new model starts exact; the editor's choice is sent next frame.
                self.sent_policy = Some(ExpertPolicy::Exact);
                self.applied_policy = Some(ExpertPolicy::Exact);
                self.policy_error = None;
                self.model = ModelStatus::Ready(info);
                self.sync_policy();
            }
            DriverEvent::LoadFailed(e) => {
                self.model = ModelStatus::Failed(e);
                self.fail_all("the model was unloaded");
            }
            DriverEvent::Started { id, .. } => self.with_reply(id, |status, _| {
                if *status == ReplyStatus::Queued {
                    *status = ReplyStatus::Streaming;
                }
            }),
            DriverEvent::Text { id, delta } => self.with_reply(id, |status, text| {
                *status = ReplyStatus::Streaming;
                text.push_str(&delta);
            }),
            DriverEvent::Done { id, finished } => {
                self.with_reply(id, |status, _| *status = ReplyStatus::Done(finished));
                self.finish_route(id);
            }
            DriverEvent::Failed { id, error } => {
                self.with_reply(id, |status, _| *status = ReplyStatus::Failed(error));
                self.finish_route(id);
            }
            DriverEvent::Metrics(m) => self.metrics.push(m),
            DriverEvent::Stats(s) => self.stats = s,
            DriverEvent::PolicyApplied(p) => {
                self.applied_policy = Some(p);
                self.policy_error = None;
            }
            DriverEvent::PolicyRejected(e) => {
                // Keep the editor as it is, so the user can fix the value.
                self.policy_error = Some(e);
                self.sent_policy = self.applied_policy;
            }
            DriverEvent::Document { path, text } => {
                self.qa.path = path;
                self.qa.document = text;
                self.qa.read_error = None;
            }
            DriverEvent::DocumentFailed(e) => self.qa.read_error = Some(e),
        }
    }

    /// Runs `f` on the status and text of the reply that request `id` feeds.
    fn with_reply(&mut self, id: RequestId, f: impl FnOnce(&mut ReplyStatus, &mut String)) {
        match self.routes.get(&id).copied() {
            Some(Route::Chat(conv)) => {
                if let Some(c) = self.conversation_mut(conv)
                    && c.request == Some(id)
                    && let Some(m) = c.reply_mut()
                    && let Some(status) = m.status.as_mut()
                {
                    f(status, &mut m.text);
                }
            }
            Some(Route::Qa(i)) => {
                if let Some(item) = self.qa.items.get_mut(i)
                    && item.request == Some(id)
                {
                    f(&mut item.status, &mut item.answer);
                }
            }
            // A stopped or closed request may still send a last event.
            None => {}
        }
    }

    fn finish_route(&mut self, id: RequestId) {
        match self.routes.remove(&id) {
            Some(Route::Chat(conv)) => {
                if let Some(c) = self.conversation_mut(conv)
                    && c.request == Some(id)
                {
                    c.request = None;
                }
            }
            Some(Route::Qa(i)) => {
                if let Some(item) = self.qa.items.get_mut(i)
                    && item.request == Some(id)
                {
                    item.request = None;
                }
            }
            None => {}
        }
    }

    /// Fails every unfinished reply (the model went away).
    fn fail_all(&mut self, why: &str) {
        let ids: Vec<RequestId> = self.routes.keys().copied().collect();
        for id in ids {
            self.with_reply(id, |status, _| *status = ReplyStatus::Failed(why.to_string()));
            self.finish_route(id);
        }
    }

    /// Every reply of every tab and every QA answer has ended, and at least
    /// one was submitted.
    pub fn all_replies_ended(&self) -> bool {
        self.routes.is_empty()
            && (self
                .conversations
                .iter()
                .any(|c| c.messages.iter().any(|m| m.role == Role::Assistant))
                || !self.qa.items.is_empty())
    }
}

/// A tab title from the first message: its first few words.
fn short_title(text: &str) -> String {
    let mut title = String::new();
    for w in text.split_whitespace() {
        if title.chars().count() + w.chars().count() > 18 {
            if title.is_empty() {
                title = w.chars().take(18).collect();
            }
            title.push('…');
            break;
        }
        if !title.is_empty() {
            title.push(' ');
        }
        title.push_str(w);
    }
    if title.is_empty() { "Chat".into() } else { title }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lynx::generate::FinishReason;

    fn ready() -> AppState {
        let mut s = AppState::new();
        s.apply(DriverEvent::Loaded(ModelInfo {
            path: "demo.gguf".into(),
            description: "test".into(),
            num_layers: 2,
            experts: Some((16, 8)),
            has_chat_template: true,
            adapter: "none".into(),
            context_length: 2048,
        }));
        s.outbox.clear();
        s
    }

    fn finished(n: usize) -> Finished {
        Finished {
            prompt_tokens: 5,
            generated_tokens: n,
            finish: FinishReason::Eos,
            first_token_s: 0.1,
            total_s: 1.0,
        }
    }

    fn submissions(cmd: &Command) -> &[Submission] {
        match cmd {
            Command::Submit(s) => s,
            other => panic!("expected a Submit, got {other:?}"),
        }
    }

    #[test]
    fn sending_before_the_model_is_ready_does_nothing() {
        let mut s = AppState::new();
        s.conversations[0].draft = "hi".into();
        assert!(!s.send(0));
        assert!(s.outbox.is_empty());
        assert_eq!(s.conversations[0].draft, "hi");
    }

    #[test]
    fn a_turn_streams_and_completes() {
        let mut s = ready();
        s.conversations[0].draft = "  What is the capital of France?  ".into();
        assert!(s.send(0));
        let subs = submissions(&s.outbox[0]).to_vec();
        assert_eq!(subs.len(), 1);
        assert_eq!(
            subs[0].messages,
            vec![ChatMessage::user("What is the capital of France?")]
        );
        assert_eq!(s.conversations[0].title, "What is the capital…");
        assert!(s.conversations[0].draft.is_empty());
        let id = subs[0].id;
        s.apply(DriverEvent::Started { id, prompt_tokens: 12 });
        s.apply(DriverEvent::Text {
            id,
            delta: "Paris".into(),
        });
        s.apply(DriverEvent::Text {
            id,
            delta: " is".into(),
        });
        let reply = s.conversations[0].messages.last().cloned().expect("reply");
        assert_eq!(
            (reply.text.as_str(), reply.status),
            ("Paris is", Some(ReplyStatus::Streaming))
        );
        assert_eq!(s.active_requests(), 1);
        s.apply(DriverEvent::Done {
            id,
            finished: finished(2),
        });
        assert_eq!(
            s.conversations[0].messages[1].status,
            Some(ReplyStatus::Done(finished(2)))
        );
        assert!(!s.conversations[0].is_busy());
        assert!(s.all_replies_ended());
        // The next turn carries the whole conversation.
        s.conversations[0].draft = "And of Spain?".into();
        assert!(s.send(0));
        let next = submissions(&s.outbox[1]);
        assert_eq!(
            next[0].messages,
            vec![
                ChatMessage::user("What is the capital of France?"),
                ChatMessage::assistant("Paris is"),
                ChatMessage::user("And of Spain?")
            ]
        );
    }

    #[test]
    fn send_all_puts_every_idle_draft_in_one_batch() {
        let mut s = ready();
        let b = s.new_conversation();
        let c = s.new_conversation();
        s.conversations[0].draft = "one".into();
        s.conversation_mut(b).expect("tab").draft = "two".into();
        s.conversation_mut(c).expect("tab").draft = "   ".into();
        assert_eq!(s.send_all(), 2);
        assert_eq!(s.outbox.len(), 1, "one Submit command for the whole batch");
        let subs = submissions(&s.outbox[0]);
        let texts: Vec<&str> = subs.iter().map(|x| x.messages[0].content.as_str()).collect();
        assert_eq!(texts, ["one", "two"]);
        assert_ne!(subs[0].id, subs[1].id);
        // Busy tabs are not sent again.
        s.conversations[0].draft = "again".into();
        assert_eq!(s.send_all(), 0);
    }

    #[test]
    fn stop_cancels_the_request_and_ignores_its_late_events() {
        let mut s = ready();
        s.conversations[0].draft = "hi".into();
        s.send(0);
        let id = submissions(&s.outbox[0])[0].id;
        s.apply(DriverEvent::Text {
            id,
            delta: "Hel".into(),
        });
        s.stop(0);
        assert_eq!(s.outbox.last(), Some(&Command::Stop(id)));
        // Text that was already on its way is dropped.
        s.apply(DriverEvent::Text { id, delta: "lo".into() });
        let reply = s.conversations[0].messages.last().cloned().expect("reply");
        assert_eq!((reply.text.as_str(), reply.status), ("Hel", Some(ReplyStatus::Stopped)));
        assert!(!s.conversations[0].is_busy());
        assert_eq!(s.active_requests(), 0);
    }

    #[test]
    fn regenerate_replaces_the_last_reply() {
        let mut s = ready();
        s.conversations[0].draft = "hi".into();
        s.send(0);
        let first = submissions(&s.outbox[0])[0].clone();
        s.apply(DriverEvent::Text {
            id: first.id,
            delta: "Hello".into(),
        });
        s.apply(DriverEvent::Done {
            id: first.id,
            finished: finished(1),
        });
        assert!(s.can_regenerate(0));
        assert!(s.regenerate(0));
        let again = submissions(&s.outbox[1])[0].clone();
        assert_eq!(again.messages, first.messages, "the same prompt, without the old reply");
        assert_ne!(again.id, first.id);
        let msgs = &s.conversations[0].messages;
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[1].status, Some(ReplyStatus::Queued));
        assert!(msgs[1].text.is_empty());
        assert!(!s.can_regenerate(0), "not while the new reply runs");
    }

    #[test]
    fn a_failed_reply_is_shown_and_frees_the_tab() {
        let mut s = ready();
        s.conversations[0].draft = "hi".into();
        s.send(0);
        let id = submissions(&s.outbox[0])[0].id;
        s.apply(DriverEvent::Failed {
            id,
            error: "the prompt has 9000 tokens".into(),
        });
        assert_eq!(
            s.conversations[0].messages[1].status,
            Some(ReplyStatus::Failed("the prompt has 9000 tokens".into()))
        );
        assert!(!s.conversations[0].is_busy());
        assert_eq!(s.conversations[0].badge(), " !");
        // The failed reply had no text, so it is not a turn of the next prompt.
        assert_eq!(s.conversations[0].chat_messages(), vec![ChatMessage::user("hi")]);
    }

    #[test]
    fn closing_a_busy_tab_stops_its_request() {
        let mut s = ready();
        let b = s.new_conversation();
        s.conversation_mut(b).expect("tab").draft = "hi".into();
        s.send(b);
        let id = submissions(&s.outbox[0])[0].id;
        s.close_conversation(b);
        assert_eq!(s.outbox.last(), Some(&Command::Stop(id)));
        assert_eq!(s.conversations.len(), 1);
        assert_eq!(s.tab, Tab::Chat(0));
        // Closing the last tab leaves a fresh one.
        s.close_conversation(0);
        assert_eq!(s.conversations.len(), 1);
        assert_eq!(s.conversations[0].id, 2);
    }

    #[test]
    fn qa_submits_one_request_per_question_in_one_batch() {
        let mut s = ready();
        assert_eq!(s.submit_qa(), 0, "no document, no questions");
        s.qa.document = "Lynx is a runtime. It runs MoE models.".into();
        s.qa.questions = "What is Lynx?\n\n  What does it run?  \n".into();
        assert_eq!(s.submit_qa(), 2);
        let subs = submissions(&s.outbox[0]).to_vec();
        assert_eq!(subs.len(), 2);
        assert_eq!(subs[1].messages, qa_messages(&s.qa.document, "What does it run?"));
        assert!(subs[1].messages[1].content.contains("Lynx is a runtime."));
        assert_eq!(subs[0].options.max_new_tokens, s.qa.sampling.max_tokens);
        s.apply(DriverEvent::Text {
            id: subs[1].id,
            delta: "MoE models.".into(),
        });
        s.apply(DriverEvent::Done {
            id: subs[1].id,
            finished: finished(3),
        });
        assert_eq!(s.qa.items[1].answer, "MoE models.");
        assert!(s.qa.is_busy(), "the first answer is still running");
        assert_eq!(s.submit_qa(), 0, "no second batch while one runs");
        s.stop_qa();
        assert_eq!(s.outbox.last(), Some(&Command::Stop(subs[0].id)));
        assert_eq!(s.qa.items[0].status, ReplyStatus::Stopped);
        assert!(matches!(s.qa.items[1].status, ReplyStatus::Done(_)));
        assert!(!s.qa.is_busy());
    }

    #[test]
    fn policy_editor_builds_each_policy_and_syncs_only_changes() {
        let mut s = ready();
        assert!(s.outbox.is_empty(), "exact is what a fresh model runs");
        s.policy.kind = PolicyKind::Lynx;
        s.sync_policy();
        assert_eq!(s.outbox, vec![Command::SetPolicy(ExpertPolicy::Lynx(None))]);
        s.sync_policy();
        assert_eq!(s.outbox.len(), 1, "an unchanged editor sends nothing");
        s.policy.lynx_auto = false;
        s.policy.alpha = 5.0;
        s.policy.threshold = -1;
        let want = LynxParams {
            alpha: 5.0,
            beta: 7,
            threshold_bin: -1,
        };
        assert_eq!(s.policy.policy(), ExpertPolicy::Lynx(Some(want)));
        s.policy.kind = PolicyKind::Oea;
        assert_eq!(s.policy.policy(), ExpertPolicy::Oea { k0: 4 });
        s.policy.kind = PolicyKind::TopK;
        s.policy.topk = 99;
        assert_eq!(s.policy.policy(), ExpertPolicy::TopK(8), "clamped to K");
        // Every policy the editor builds is one the runtime accepts for E=16, K=8.
        for kind in PolicyKind::ALL {
            s.policy.kind = kind;
            assert!(s.policy.policy().resolve(16, 8).is_ok(), "{kind:?}");
        }
        // A refusal reverts to resending once the editor changes again.
        s.policy.kind = PolicyKind::Oea;
        s.sync_policy();
        s.apply(DriverEvent::PolicyRejected("no".into()));
        assert_eq!(s.policy_error.as_deref(), Some("no"));
        s.sync_policy();
        assert_eq!(s.outbox.last(), Some(&Command::SetPolicy(ExpertPolicy::Oea { k0: 4 })));
    }

    #[test]
    fn policy_editor_defaults_follow_the_model() {
        let p = PolicyEditor::for_model(64, 8);
        let want = LynxParams::for_sparsity(64, 8);
        assert_eq!(
            (p.alpha, p.beta, p.threshold),
            (want.alpha, want.beta, want.threshold_bin)
        );
        let mut e = PolicyEditor::for_model(16, 8);
        e.set_from(ExpertPolicy::Lynx(Some(LynxParams {
            alpha: 2.0,
            beta: 3,
            threshold_bin: -2,
        })));
        assert_eq!((e.kind, e.lynx_auto, e.beta), (PolicyKind::Lynx, false, 3));
        e.reset_params();
        assert_eq!((e.kind, e.lynx_auto, e.beta), (PolicyKind::Lynx, true, 7));
        e.set_from(ExpertPolicy::TopK(3));
        assert_eq!(e.policy(), ExpertPolicy::TopK(3));
    }

    #[test]
    fn load_progress_and_failure() {
        let mut s = AppState::new();
        s.default_model = "models/demo.gguf".into();
        s.load_model();
        assert_eq!(s.outbox, vec![Command::Load { path: None }]);
        s.apply(DriverEvent::LoadProgress(LoadPhase::Uploading { done: 15, total: 30 }));
        match &s.model {
            ModelStatus::Loading { path, phase } => {
                assert_eq!(path, "models/demo.gguf");
                assert!((phase.fraction() - 0.55).abs() < 1e-6);
            }
            other => panic!("expected Loading, got {other:?}"),
        }
        s.apply(DriverEvent::LoadFailed("no such file".into()));
        assert_eq!(s.model, ModelStatus::Failed("no such file".into()));
        s.model_path = " /tmp/x.gguf ".into();
        s.load_model();
        assert_eq!(
            s.outbox.last(),
            Some(&Command::Load {
                path: Some("/tmp/x.gguf".into())
            })
        );
    }

    #[test]
    fn a_failed_reload_fails_the_running_replies() {
        let mut s = ready();
        s.conversations[0].draft = "hi".into();
        s.send(0);
        s.apply(DriverEvent::LoadFailed("bad file".into()));
        assert!(matches!(
            s.conversations[0].messages[1].status,
            Some(ReplyStatus::Failed(_))
        ));
        assert_eq!(s.active_requests(), 0);
    }
}
