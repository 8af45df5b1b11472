//! Drawing: the top bar (model picker, status), the chat and document-QA
//! views on the left, and the live expert-selection panel on the right.
//! Everything here reads and edits [`AppState`]; it never calls the driver.

use eframe::egui::{self, Color32, RichText, ScrollArea, Ui, vec2};

use crate::aggregate::skew_of;
use crate::plots::{self, EXACT_COLOR, MARK_COLOR, RATE_COLOR, SELECTED_COLOR, Series};
use crate::state::{AppState, ModelStatus, PolicyKind, ReplyStatus, Role, SamplingSettings, Tab};

const ERROR_COLOR: Color32 = Color32::from_rgb(240, 110, 100);

/// The whole window.
pub fn root(ui: &mut Ui, s: &mut AppState) {
    egui::Panel::top("top").show(ui, |ui| top_bar(ui, s));
    egui::Panel::right("viz")
        .resizable(true)
        .default_size(ui.available_width() * 0.62)
        .min_size(360.0)
        .show(ui, |ui| {
            viz_panel(ui, s);
        });
    egui::CentralPanel::default().show(ui, |ui| {
        tab_strip(ui, s);
        ui.separator();
        match s.tab {
            Tab::Chat(id) => chat_view(ui, s, id),
            Tab::DocQa => qa_view(ui, s),
        }
    });
}

fn top_bar(ui: &mut Ui, s: &mut AppState) {
    ui.add_space(2.0);
    ui.horizontal(|ui| {
        ui.heading("Lynx");
        ui.separator();
        ui.label("Model:");
        let loading = matches!(s.model, ModelStatus::Loading { .. });
        let hint = if s.default_model.is_empty() {
            "the demo model".to_string()
        } else {
            s.default_model.clone()
        };
        ui.add(
            egui::TextEdit::singleline(&mut s.model_path)
                .hint_text(hint)
                .desired_width(300.0),
        );
        if ui
            .add_enabled(!loading, egui::Button::new("Load"))
            .on_hover_text("Load the model at this path (.gguf or a checkpoint folder); empty loads the demo model")
            .clicked()
        {
            s.load_model();
        }
        ui.separator();
        match &s.model {
            ModelStatus::NotLoaded => {
                ui.label("no model loaded");
            }
            ModelStatus::Loading { path, phase } => {
                let name = file_name(path);
                ui.add(
                    egui::ProgressBar::new(phase.fraction())
                        .desired_width(260.0)
                        .text(format!("{name}: {}", phase.describe())),
                );
            }
            ModelStatus::Ready(info) => {
                ui.label(RichText::new(file_name(&info.path)).strong())
                    .on_hover_text(format!(
                        "{}\n{}\ncontext {} tokens{}\nGPU: {}",
                        info.path,
                        info.description,
                        info.context_length,
                        if info.has_chat_template {
                            ""
                        } else {
                            "\nno chat template: using ChatML"
                        },
                        info.adapter
                    ));
                ui.label(RichText::new(&info.description).weak());
            }
            ModelStatus::Failed(e) => {
                ui.colored_label(ERROR_COLOR, format!("load failed: {e}"));
            }
        }
    });
    ui.add_space(2.0);
}

fn file_name(path: &str) -> String {
    std::path::Path::new(path)
        .file_name()
        .map_or(path.to_string(), |f| f.to_string_lossy().into_owned())
}

fn tab_strip(ui: &mut Ui, s: &mut AppState) {
    ui.horizontal_wrapped(|ui| {
        let qa_title = if s.qa.is_busy() { "Doc QA •" } else { "Doc QA" };
        if ui.selectable_label(s.tab == Tab::DocQa, qa_title).clicked() {
            s.tab = Tab::DocQa;
        }
        ui.separator();
        let mut close = None;
        let tabs: Vec<(u64, String, bool)> = s
            .conversations
            .iter()
            .map(|c| (c.id, format!("{}{}", c.title, c.badge()), c.is_busy()))
            .collect();
        for (id, title, _) in &tabs {
            let r = ui.selectable_label(s.tab == Tab::Chat(*id), title.as_str());
            if r.clicked() {
                s.tab = Tab::Chat(*id);
            }
            if r.middle_clicked() {
                close = Some(*id);
            }
        }
        if ui.button("+").on_hover_text("New conversation").clicked() {
            s.new_conversation();
        }
        if let Some(id) = close {
            s.close_conversation(id);
        }
    });
}

fn sampling_ui(ui: &mut Ui, id: &str, settings: &mut SamplingSettings) {
    egui::CollapsingHeader::new("Sampling").id_salt(id).show(ui, |ui| {
        egui::Grid::new(id)
            .num_columns(4)
            .spacing(vec2(8.0, 4.0))
            .show(ui, |ui| {
                labelled(
                    ui,
                    "temperature",
                    egui::DragValue::new(&mut settings.temperature)
                        .range(0.0..=2.0)
                        .speed(0.01),
                );
                labelled(
                    ui,
                    "top-p",
                    egui::DragValue::new(&mut settings.top_p).range(0.01..=1.0).speed(0.01),
                );
                ui.end_row();
                labelled(
                    ui,
                    "top-k (0 = off)",
                    egui::DragValue::new(&mut settings.top_k).range(0..=1000),
                );
                labelled(ui, "seed", egui::DragValue::new(&mut settings.seed));
                ui.end_row();
                labelled(
                    ui,
                    "max tokens",
                    egui::DragValue::new(&mut settings.max_tokens).range(1..=4096),
                );
                ui.end_row();
            });
    });
}

fn status_line(ui: &mut Ui, status: &ReplyStatus) {
    match status {
        // No spinner: it would repaint at full frame rate, and on a software
        // GPU drawing shares the CPU with the prefill it is waiting for.
        ReplyStatus::Queued => {
            ui.label(RichText::new("queued: waiting for prefill…").weak().small());
        }
        ReplyStatus::Streaming => {
            ui.label(RichText::new("• streaming").color(SELECTED_COLOR).small());
        }
        ReplyStatus::Done(f) => {
            let rate = if f.total_s > f.first_token_s && f.generated_tokens > 1 {
                format!(
                    ", {:.2} tok/s",
                    (f.generated_tokens - 1) as f64 / (f.total_s - f.first_token_s)
                )
            } else {
                String::new()
            };
            ui.label(
                RichText::new(format!(
                    "{} tokens ({}), first token {:.1} s, total {:.1} s{rate}",
                    f.generated_tokens, f.finish, f.first_token_s, f.total_s
                ))
                .weak()
                .small(),
            );
        }
        ReplyStatus::Stopped => {
            ui.label(RichText::new("stopped").color(MARK_COLOR).small());
        }
        ReplyStatus::Failed(e) => {
            ui.colored_label(ERROR_COLOR, RichText::new(format!("failed: {e}")).small());
        }
    }
}

fn chat_view(ui: &mut Ui, s: &mut AppState, id: u64) {
    let ready = s.is_ready();
    let idle_drafts = s
        .conversations
        .iter()
        .filter(|c| !c.is_busy() && !c.draft.trim().is_empty())
        .count();
    let Some(c) = s.conversation(id) else { return };
    let busy = c.is_busy();
    let can_regen = s.can_regenerate(id);
    let (mut send, mut send_all, mut stop, mut regen, mut close) = (false, false, false, false, false);
    let Some(c) = s.conversation_mut(id) else { return };
    egui::Panel::bottom("composer").show(ui, |ui| {
        ui.add_space(4.0);
        let r = ui.add(
            egui::TextEdit::multiline(&mut c.draft)
                .hint_text("Message (Ctrl+Enter sends)")
                .desired_rows(2)
                .desired_width(f32::INFINITY),
        );
        if r.has_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter) && i.modifiers.command) {
            send = true;
        }
        ui.horizontal_wrapped(|ui| {
            send |= ui.add_enabled(ready && !busy, egui::Button::new("Send")).clicked();
            send_all |= ui
                .add_enabled(
                    ready && idle_drafts > 0,
                    egui::Button::new(format!("Send all ({idle_drafts})")),
                )
                .on_hover_text("Send the draft of every idle tab together: they decode as one batch")
                .clicked();
            stop |= ui.add_enabled(busy, egui::Button::new("Stop")).clicked();
            regen |= ui
                .add_enabled(ready && can_regen, egui::Button::new("Regenerate"))
                .clicked();
            close |= ui.button("Close tab").clicked();
        });
        ui.horizontal(|ui| {
            ui.label("System:");
            ui.add(
                egui::TextEdit::singleline(&mut c.system)
                    .hint_text("optional system message")
                    .desired_width(f32::INFINITY),
            );
        });
        sampling_ui(ui, &format!("sampling-{id}"), &mut c.sampling);
    });
    egui::CentralPanel::default().show(ui, |ui| {
        ScrollArea::vertical()
            .id_salt(("chat", id))
            .stick_to_bottom(true)
            .auto_shrink([false, false])
            .show(ui, |ui| {
                if c.messages.is_empty() {
                    ui.label(
                        RichText::new(
                            "Type a message below. Messages sent from several tabs at once decode as one batch.",
                        )
                        .weak(),
                    );
                }
                for m in &c.messages {
                    let (who, color) = match m.role {
                        Role::User => ("You", Color32::from_rgb(140, 180, 255)),
                        Role::Assistant => ("Lynx", SELECTED_COLOR),
                    };
                    egui::Frame::group(ui.style()).show(ui, |ui| {
                        ui.set_width(ui.available_width());
                        ui.label(RichText::new(who).strong().color(color));
                        if !m.text.is_empty() {
                            ui.label(m.text.as_str());
                        }
                        if let Some(st) = &m.status {
                            status_line(ui, st);
                        }
                    });
                }
            });
    });
    if send {
        s.send(id);
    }
    if send_all {
        s.send_all();
    }
    if stop {
        s.stop(id);
    }
    if regen {
        s.regenerate(id);
    }
    if close {
        s.close_conversation(id);
    }
}

fn qa_view(ui: &mut Ui, s: &mut AppState) {
    let ready = s.is_ready();
    let busy = s.qa.is_busy();
    let n = s.qa.question_list().len();
    let (mut read, mut submit, mut stop) = (false, false, false);
    ScrollArea::vertical()
        .id_salt("qa")
        .auto_shrink([false, false])
        .show(ui, |ui| {
            let qa = &mut s.qa;
            ui.label(
                RichText::new("Batch document QA: one document, one question per line, all answered in one batch.")
                    .weak(),
            );
            ui.horizontal(|ui| {
                ui.label("File:");
                ui.add(
                    egui::TextEdit::singleline(&mut qa.path)
                        .hint_text("path of a text file")
                        .desired_width(220.0),
                );
                read = ui.button("Read").clicked();
            });
            if let Some(e) = &qa.read_error {
                ui.colored_label(ERROR_COLOR, e.as_str());
            }
            ui.label(format!(
                "Document ({} characters; or paste it here):",
                qa.document.chars().count()
            ));
            ScrollArea::vertical()
                .id_salt("qa-doc")
                .max_height(120.0)
                .show(ui, |ui| {
                    ui.add(
                        egui::TextEdit::multiline(&mut qa.document)
                            .desired_rows(4)
                            .desired_width(f32::INFINITY),
                    );
                });
            ui.label("Questions:");
            ui.add(
                egui::TextEdit::multiline(&mut qa.questions)
                    .hint_text("one question per line")
                    .desired_rows(3)
                    .desired_width(f32::INFINITY),
            );
            ui.horizontal(|ui| {
                submit = ui
                    .add_enabled(
                        ready && !busy && n > 0 && !qa.document.trim().is_empty(),
                        egui::Button::new(format!("Answer all ({n})")),
                    )
                    .clicked();
                stop = ui.add_enabled(busy, egui::Button::new("Stop")).clicked();
            });
            sampling_ui(ui, "sampling-qa", &mut qa.sampling);
            ui.separator();
            for (i, item) in qa.items.iter().enumerate() {
                egui::Frame::group(ui.style()).show(ui, |ui| {
                    ui.set_width(ui.available_width());
                    ui.label(RichText::new(format!("Q{}: {}", i + 1, item.question)).strong());
                    if !item.answer.is_empty() {
                        ui.label(item.answer.as_str());
                    }
                    status_line(ui, &item.status);
                });
            }
        });
    if read {
        s.read_document();
    }
    if submit {
        s.submit_qa();
    }
    if stop {
        s.stop_qa();
    }
}

/// The policy controls, one row, applied as soon as they change.
fn policy_controls(ui: &mut Ui, s: &mut AppState) {
    let moe = s.model_info().and_then(|m| m.experts);
    ui.horizontal_wrapped(|ui| {
        let label = ui.label(RichText::new("Policy").strong());
        let enabled = moe.is_some() || s.model_info().is_none();
        let p = &mut s.policy;
        ui.add_enabled_ui(enabled, |ui| {
            egui::ComboBox::from_id_salt("policy-kind")
                .selected_text(p.kind.label())
                .width(70.0)
                .show_ui(ui, |ui| {
                    for k in PolicyKind::ALL {
                        ui.selectable_value(&mut p.kind, k, k.label());
                    }
                })
                .response
                .labelled_by(label.id);
            let k = p.top_k;
            match p.kind {
                PolicyKind::Exact => {
                    ui.label(RichText::new("every token keeps its top-K").weak());
                }
                PolicyKind::Lynx => {
                    ui.checkbox(&mut p.lynx_auto, "auto")
                        .on_hover_text("alpha and beta from the sparsity K/E");
                    ui.add_enabled_ui(!p.lynx_auto, |ui| {
                        labelled(
                            ui,
                            "α",
                            egui::DragValue::new(&mut p.alpha)
                                .range(0.0..=50.0)
                                .speed(0.05)
                                .max_decimals(2),
                        );
                        labelled(ui, "β", egui::DragValue::new(&mut p.beta).range(0..=16));
                        let beta = p.beta as i32;
                        labelled(
                            ui,
                            "threshold",
                            egui::DragValue::new(&mut p.threshold).range(-beta.max(1)..=0),
                        );
                    });
                }
                PolicyKind::Oea => {
                    labelled(ui, "k0", egui::Slider::new(&mut p.oea_k0, 1..=k));
                }
                PolicyKind::TopK => {
                    labelled(ui, "N", egui::Slider::new(&mut p.topk, 1..=k));
                }
            }
            if p.kind != PolicyKind::Exact && ui.small_button("defaults").clicked() {
                p.reset_params();
            }
        });
        if moe.is_none() && s.model_info().is_some() {
            ui.label(RichText::new("(dense model: exact only)").weak());
        }
    });
    s.sync_policy();
    if let Some(e) = &s.policy_error {
        ui.colored_label(ERROR_COLOR, e.as_str());
    }
}

fn viz_panel(ui: &mut Ui, s: &mut AppState) {
    policy_controls(ui, s);
    // Status: what the runtime is doing right now.
    let applied = s.applied_policy.map_or("-".to_string(), |p| p.to_string());
    let batch = s.metrics.last_decode.as_ref().map_or(0, |m| m.tokens);
    let rate = s.metrics.rolling_tok_s();
    ui.horizontal_wrapped(|ui| {
        ui.label(format!("in force: {applied}"));
        ui.separator();
        ui.label(format!("running {} · queued {}", s.stats.running, s.stats.queued))
            .on_hover_text("sequences in the batch and waiting for a slot (scheduler stats)");
        ui.separator();
        ui.label(RichText::new(format!("batch B = {batch}")).strong())
            .on_hover_text("tokens in the last decode step");
        ui.separator();
        ui.label(match rate {
            Some(r) => format!("{r:.2} tok/s (last {} steps)", s.metrics.window_len()),
            None => "- tok/s".to_string(),
        });
        ui.separator();
        ui.label(format!(
            "{} decode / {} prefill steps",
            s.metrics.decode_steps, s.metrics.prefill_steps
        ));
    });
    ui.horizontal_wrapped(|ui| {
        let mut w = s.metrics.window();
        if labelled(
            ui,
            "rolling window",
            egui::DragValue::new(&mut w)
                .range(1..=crate::aggregate::MAX_WINDOW)
                .suffix(" steps"),
        )
        .changed()
        {
            s.metrics.set_window(w);
        }
        ui.separator();
        let rows = s.metrics.last_decode.as_ref().map_or(0, |m| m.layers.len());
        let layer_name = |row: Option<usize>| match (row, &s.metrics.last_decode) {
            (Some(r), Some(m)) => m
                .layers
                .get(r)
                .map_or(format!("row {r}"), |l| format!("layer {}", l.layer)),
            (Some(r), None) => format!("row {r}"),
            (None, _) => "mean of layers".into(),
        };
        let label = ui.label("layer");
        let current = layer_name(s.layer_row);
        let mut choice = s.layer_row;
        egui::ComboBox::from_id_salt("layer")
            .selected_text(current)
            .show_ui(ui, |ui| {
                ui.selectable_value(&mut choice, None, "mean of layers");
                for r in 0..rows {
                    ui.selectable_value(&mut choice, Some(r), layer_name(Some(r)));
                }
            })
            .response
            .labelled_by(label.id);
        s.layer_row = choice;
        if let Some((e, sel)) = s.metrics.rolling_distinct() {
            ui.separator();
            ui.label(
                RichText::new(format!("distinct experts per layer: exact {e:.2}, selected {sel:.2}"))
                    .color(SELECTED_COLOR),
            );
        }
    });
    ui.separator();

    ScrollArea::vertical()
        .id_salt("viz-scroll")
        .auto_shrink([false, false])
        .show(ui, |ui| {
            let m = &s.metrics;
            let half = ((ui.available_width() - 12.0) / 2.0).max(160.0);
            let current = m.heatmap_current();
            let rolling = m.heatmap_rolling();
            // Both heatmaps share one colour scale so that they compare.
            let scale = current.iter().chain(rolling.iter()).map(|h| h.max).fold(0.0, f64::max);
            let heat_h = current
                .as_ref()
                .map_or(120.0, |h| (h.rows.len() as f32 * 5.0).clamp(100.0, 200.0) + 14.0);
            ui.columns(2, |cols| {
                cols[0].label(
                    RichText::new("Tokens per expert, current step (layers × experts)")
                        .small()
                        .strong(),
                );
                match &current {
                    Some(h) => plots::heatmap(&mut cols[0], h, vec2(half, heat_h), scale),
                    None => placeholder(&mut cols[0], vec2(half, heat_h)),
                }
                cols[1].label(
                    RichText::new(format!("Rolling mean, last {} decode steps", m.window_len()))
                        .small()
                        .strong(),
                );
                match &rolling {
                    Some(h) => plots::heatmap(&mut cols[1], h, vec2(half, heat_h), scale),
                    None => placeholder(&mut cols[1], vec2(half, heat_h)),
                }
            });
            plots::colorbar(ui, half, scale);

            ui.add_space(4.0);
            ui.columns(2, |cols| {
                let (exact, selected) = m.distinct_series(s.layer_row);
                cols[0].label(RichText::new("Distinct experts per layer over time").small().strong());
                let experts = s.policy.experts as f64;
                plots::line_chart(
                    &mut cols[0],
                    vec2(half, 130.0),
                    &[
                        Series {
                            name: "exact",
                            color: EXACT_COLOR,
                            points: &exact,
                        },
                        Series {
                            name: "after selection",
                            color: SELECTED_COLOR,
                            points: &selected,
                        },
                    ],
                    &m.policy_changes(),
                    Some(experts.min(exact.iter().map(|p| p[1]).fold(0.0, f64::max))),
                );
                cols[1].label(
                    RichText::new("Distinct experts by layer, current step")
                        .small()
                        .strong(),
                );
                match &m.last_decode {
                    Some(step) => {
                        let layers: Vec<usize> = step.layers.iter().map(|l| l.layer).collect();
                        let exact: Vec<f64> = step.layers.iter().map(|l| l.distinct_exact as f64).collect();
                        let sel: Vec<f64> = step.layers.iter().map(|l| l.distinct_selected as f64).collect();
                        plots::layer_bars(
                            &mut cols[1],
                            vec2(half, 118.0),
                            &layers,
                            &exact,
                            &sel,
                            experts,
                            (EXACT_COLOR, SELECTED_COLOR),
                        );
                        cols[1].label(RichText::new("outline: exact · filled: after selection").small().weak());
                    }
                    None => placeholder(&mut cols[1], vec2(half, 118.0)),
                }
            });

            ui.add_space(4.0);
            ui.columns(2, |cols| {
                let row = s.layer_row.unwrap_or(0);
                match &m.last_decode {
                    Some(step) if !step.layers.is_empty() => {
                        let l = &step.layers[row.min(step.layers.len() - 1)];
                        let beta = s.policy.beta.max(1);
                        let note = if l.bins.is_empty() {
                            format!(" (no bins under {})", step.policy)
                        } else {
                            String::new()
                        };
                        cols[0].label(
                            RichText::new(format!(
                                "Slots of layer {}: tokens × top-{} by bin{note}",
                                l.layer, step.top_k
                            ))
                            .small()
                            .strong(),
                        );
                        let h = (step.tokens as f32 * 18.0).clamp(40.0, 150.0) + 14.0;
                        plots::bin_grid(
                            &mut cols[0],
                            vec2(half, h),
                            step.tokens,
                            step.top_k,
                            &l.bins,
                            &l.remapped,
                            beta,
                        );
                        plots::bin_legend(&mut cols[0], beta);
                        let moved = l.remapped.iter().filter(|&&r| r).count();
                        cols[0].label(
                            RichText::new(format!(
                                "{moved} of {} slots replaced",
                                l.remapped.len().max(step.tokens * step.top_k)
                            ))
                            .small(),
                        );
                    }
                    _ => {
                        cols[0].label(RichText::new("Slots by bin").small().strong());
                        placeholder(&mut cols[0], vec2(half, 60.0));
                    }
                }
                cols[1].label(RichText::new("Skew by layer (rolling): max/mean").small().strong());
                match m.heatmap_rolling().map(|h| skew_of(&h)) {
                    Some(sk) => {
                        let layers: Vec<usize> = sk.per_layer.iter().map(|(l, _)| *l).collect();
                        let mom: Vec<f64> = sk.per_layer.iter().map(|(_, k)| k.max_over_mean).collect();
                        let cur = m.skew_summary(false);
                        let cur_mom: Vec<f64> = cur
                            .as_ref()
                            .map_or(vec![], |c| c.per_layer.iter().map(|(_, k)| k.max_over_mean).collect());
                        let max = mom.iter().chain(&cur_mom).copied().fold(1.0, f64::max).ceil();
                        plots::layer_bars(
                            &mut cols[1],
                            vec2(half, 90.0),
                            &layers,
                            &cur_mom,
                            &mom,
                            max,
                            (EXACT_COLOR, RATE_COLOR),
                        );
                        cols[1].label(RichText::new("outline: current step · filled: rolling").small().weak());
                        egui::Grid::new("skew")
                            .num_columns(4)
                            .spacing(vec2(10.0, 2.0))
                            .show(&mut cols[1], |ui| {
                                ui.label(RichText::new("mean of layers").small());
                                ui.label(RichText::new("max/mean").small());
                                ui.label(RichText::new("entropy").small());
                                ui.label(RichText::new("Gini").small());
                                ui.end_row();
                                for (name, v) in [("current step", cur.map(|c| c.mean)), ("rolling", Some(sk.mean))] {
                                    ui.label(RichText::new(name).small());
                                    match v {
                                        Some(v) => {
                                            ui.label(
                                                RichText::new(format!("{:.2}", v.max_over_mean)).small().monospace(),
                                            );
                                            ui.label(RichText::new(format!("{:.3}", v.entropy)).small().monospace());
                                            ui.label(RichText::new(format!("{:.3}", v.gini)).small().monospace());
                                        }
                                        None => {
                                            ui.label("-");
                                        }
                                    }
                                    ui.end_row();
                                }
                            });
                    }
                    None => placeholder(&mut cols[1], vec2(half, 90.0)),
                }
            });

            ui.add_space(4.0);
            ui.label(
                RichText::new("Decode tokens/s per step (markers: policy changes)")
                    .small()
                    .strong(),
            );
            let rate = m.tok_s_series();
            plots::line_chart(
                ui,
                vec2(ui.available_width(), 100.0),
                &[Series {
                    name: "tok/s",
                    color: RATE_COLOR,
                    points: &rate,
                }],
                &m.policy_changes(),
                None,
            );
            if let Some(p) = m.history.back() {
                let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
                ui.label(
                    RichText::new(format!(
                        "last step: B = {}, expert weights read {:.1} MiB (exact routing: {:.1} MiB)",
                        p.tokens,
                        mib(p.expert_bytes),
                        mib(p.exact_expert_bytes)
                    ))
                    .small(),
                );
            }
        });
}

/// A label and the widget it names (for screen readers and UI tests).
fn labelled(ui: &mut Ui, label: &str, widget: impl egui::Widget) -> egui::Response {
    let l = ui.label(label);
    ui.add(widget).labelled_by(l.id)
}

/// An empty plot's frame, with a label saying why it is empty.
fn placeholder(ui: &mut Ui, size: egui::Vec2) {
    let (r, _) = ui.allocate_exact_size(size, egui::Sense::hover());
    ui.painter().rect_stroke(
        r,
        2.0,
        egui::Stroke::new(1.0, Color32::from_gray(60)),
        egui::StrokeKind::Inside,
    );
    ui.put(
        r,
        egui::Label::new(RichText::new("waiting for decode steps").weak().small()),
    );
}
