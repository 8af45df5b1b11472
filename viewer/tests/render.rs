//! Fixed-state renders of the whole window through egui_kittest on the
//! wgpu renderer (lavapipe where there is no GPU), with no window system:
//! a synthetic metrics stream and conversations go in, the test checks the
//! texts and controls that must be on screen, drives a few controls, and
//! writes the rendered PNG under target/tmp for a person to look at.
//! Pixels are not compared against a stored image, because font
//! rasterisation differs between Mesa versions.

use std::path::PathBuf;
use std::sync::Arc;

use eframe::egui;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;

use lynx::generate::FinishReason;
use lynx::metrics::{LayerMetrics, StepMetrics};
use lynx::selection::ExpertPolicy;
use lynx_viewer::ViewerApp;
use lynx_viewer::driver::{Command, DriverEvent, Finished, ModelInfo, RecordingDriver};
use lynx_viewer::state::{PolicyKind, Tab};

const LAYERS: usize = 30;
const E: usize = 16;
const K: usize = 8;

fn info() -> ModelInfo {
    ModelInfo {
        path: "models/lynx-moe-135m/lynx-moe-135m.Q4_0.gguf".into(),
        description: "mixtral, 30 layers, 16 experts top-8".into(),
        num_layers: LAYERS,
        experts: Some((E, K)),
        has_chat_template: true,
        adapter: "synthetic".into(),
        context_length: 8192,
    }
}

/// A decode step of `b` tokens whose loads drift with the step, as skewed
/// as real routers are: a few busy experts per layer.
fn step(n: u64, b: usize, policy: &str) -> Arc<StepMetrics> {
    let layers = (0..LAYERS)
        .map(|l| {
            let mut counts = vec![0u32; E];
            let mut bins = Vec::with_capacity(b * K);
            let mut remapped = Vec::with_capacity(b * K);
            for t in 0..b {
                for s in 0..K {
                    // Low slots agree across tokens (shared favourites);
                    // high slots spread out, and the mix drifts with the step.
                    let e = if s < 3 {
                        (l + s * 2 + (n as usize / 8)) % E
                    } else {
                        (l * 3 + t * 5 + s * s + n as usize) % E
                    };
                    counts[e] += 1;
                    bins.push(-((s as i32 * 7) / K as i32));
                    remapped.push(policy != "exact" && s >= 5 && (t + s + l) % 2 == 0);
                }
            }
            let distinct = counts.iter().filter(|&&c| c > 0).count();
            LayerMetrics {
                layer: l,
                distinct_exact: (distinct + 2).min(E),
                distinct_selected: distinct,
                tokens_per_expert: counts,
                bins: if policy.starts_with("lynx") { bins } else { vec![] },
                remapped,
                expert_bytes: distinct as u64 * 3 * 576 * 1536 / 2,
            }
        })
        .collect();
    Arc::new(StepMetrics {
        step: n,
        policy: policy.into(),
        decode: true,
        tokens: b,
        top_k: K,
        layers,
        seconds: 0.4 + 0.05 * (n % 5) as f64,
    })
}

fn out_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("lynx-viewer");
    std::fs::create_dir_all(&d).expect("create the output directory");
    d
}

fn harness(app: ViewerApp) -> Harness<'static, ViewerApp> {
    Harness::builder()
        .with_size(egui::vec2(1280.0, 800.0))
        .with_theme(egui::Theme::Dark)
        .wgpu()
        .build_ui_state(|ui, app: &mut ViewerApp| app.frame(ui), app)
}

/// Checks that a rendered frame is a real picture: the right size, and many
/// colours (text, plots), not a blank or single-colour window.
fn assert_rendered(image: &image::RgbaImage, name: &str) -> PathBuf {
    let path = out_dir().join(name);
    image.save(&path).expect("save the PNG");
    assert_eq!((image.width(), image.height()), (1280, 800));
    let mut colours: Vec<[u8; 4]> = image.pixels().map(|p| p.0).collect();
    colours.sort_unstable();
    colours.dedup();
    assert!(colours.len() > 200, "{name}: only {} distinct colours", colours.len());
    path
}

#[test]
fn chat_tabs_and_live_plots_render() {
    let driver = RecordingDriver::default();
    let mut app = ViewerApp::new(Box::new(driver.clone()));
    app.state.apply(DriverEvent::Loaded(info()));
    // Three conversations sent together, then streamed and finished.
    let prompts = [
        "What is the capital of France?",
        "Name three primary colors.",
        "Write about the sea.",
    ];
    let mut ids = vec![0];
    ids.push(app.state.new_conversation());
    ids.push(app.state.new_conversation());
    for (id, p) in ids.iter().zip(prompts) {
        app.state.conversation_mut(*id).expect("tab").draft = p.into();
    }
    assert_eq!(app.state.send_all(), 3);
    app.flush();
    let sent = driver.sent();
    let batch: Vec<u64> = sent
        .iter()
        .find_map(|c| match c {
            Command::Submit(s) => Some(s.iter().map(|x| x.id).collect()),
            _ => None,
        })
        .expect("a Submit command");
    assert_eq!(batch.len(), 3);
    for (i, n) in (0..40u64).enumerate() {
        let policy = if i < 15 { "exact" } else { "lynx" };
        driver.push(DriverEvent::Metrics(step(n, 3, policy)));
    }
    let replies = [
        "The capital of France is Paris.",
        "Red, blue and yellow.",
        "The sea is wide and deep.",
    ];
    for (id, r) in batch.iter().zip(replies) {
        driver.push(DriverEvent::Started {
            id: *id,
            prompt_tokens: 30,
        });
        driver.push(DriverEvent::Text {
            id: *id,
            delta: r.into(),
        });
        driver.push(DriverEvent::Done {
            id: *id,
            finished: Finished {
                prompt_tokens: 30,
                generated_tokens: 8,
                finish: FinishReason::Eos,
                first_token_s: 1.2,
                total_s: 4.0,
            },
        });
    }
    driver.push(DriverEvent::PolicyApplied(ExpertPolicy::Lynx(None)));
    app.state.policy.kind = PolicyKind::Lynx;
    app.state.tab = Tab::Chat(0);

    let mut h = harness(app);
    h.run_steps(4);
    // The events were drained and drawn.
    h.get_by_label("The capital of France is Paris.");
    h.get_by_label_contains("8 tokens (eos)");
    h.get_by_label_contains("batch B = 3");
    h.get_by_label_contains("in force: lynx");
    h.get_by_label_contains("Tokens per expert, current step");
    h.get_by_label_contains("Rolling mean, last 32 decode steps");
    h.get_by_label_contains("Slots of layer 0: tokens × top-8 by bin");
    h.get_by_label_contains("40 decode / 0 prefill steps");
    assert!(
        h.query_by_label_contains("Name three").is_some(),
        "the second tab is listed"
    );
    let path = assert_rendered(&h.render().expect("render"), "chat.png");
    eprintln!("rendered {}", path.display());

    // Switching tabs shows the other conversation.
    h.get_by_label_contains("Name three").click();
    h.run_steps(2);
    h.get_by_label("Red, blue and yellow.");
}

#[test]
fn send_all_and_policy_controls_send_commands() {
    let driver = RecordingDriver::default();
    let mut app = ViewerApp::new(Box::new(driver.clone()));
    app.state.apply(DriverEvent::Loaded(info()));
    let second = app.state.new_conversation();
    app.state.conversation_mut(0).expect("tab").draft = "one".into();
    app.state.conversation_mut(second).expect("tab").draft = "two".into();
    let mut h = harness(app);
    h.run_steps(2);
    h.get_by_label("Send all (2)").click();
    h.run_steps(2);
    let submits: Vec<usize> = driver
        .sent()
        .iter()
        .filter_map(|c| match c {
            Command::Submit(s) => Some(s.len()),
            _ => None,
        })
        .collect();
    assert_eq!(submits, vec![2], "both drafts in one Submit");
    assert!(h.state().state.conversations.iter().all(|c| c.is_busy()));

    // Choosing another policy in the combo box applies it at once.
    h.get_by_label("Policy").click();
    h.run_steps(2);
    h.get_by_label("oea").click();
    h.run_steps(2);
    assert!(
        driver.sent().contains(&Command::SetPolicy(ExpertPolicy::Oea { k0: 4 })),
        "sent: {:?}",
        driver.sent()
    );
    // Stop cancels the shown tab's request.
    h.get_by_label("Stop").click();
    h.run_steps(2);
    assert!(driver.sent().iter().any(|c| matches!(c, Command::Stop(_))));
}

#[test]
fn doc_qa_and_loading_states_render() {
    let driver = RecordingDriver::default();
    let mut app = ViewerApp::new(Box::new(driver.clone()));
    app.state.default_model = "models/lynx-moe-135m/lynx-moe-135m.Q4_0.gguf".into();
    app.state.load_model();
    app.flush();
    assert_eq!(driver.sent(), vec![Command::Load { path: None }]);
    driver.push(DriverEvent::LoadProgress(lynx_viewer::driver::LoadPhase::Uploading {
        done: 12,
        total: 30,
    }));
    let mut h = harness(app);
    h.run_steps(2);
    h.get_by_label_contains("uploading weights: layer 12/30");
    assert!(
        h.query_all_by_label_contains("waiting for decode steps").count() >= 4,
        "empty plots say why"
    );

    h.state_mut().state.apply(DriverEvent::Loaded(info()));
    h.state_mut().state.tab = Tab::DocQa;
    {
        let s = &mut h.state_mut().state;
        s.qa.document = "Lynx is a runtime for MoE models, written in Rust.".into();
        s.qa.questions = "What is Lynx?\nWhat language is it written in?".into();
    }
    h.run_steps(2);
    h.get_by_label("Answer all (2)").click();
    h.run_steps(2);
    let ids: Vec<u64> = driver
        .sent()
        .iter()
        .find_map(|c| match c {
            Command::Submit(s) => Some(s.iter().map(|x| x.id).collect()),
            _ => None,
        })
        .expect("the QA batch");
    assert_eq!(ids.len(), 2);
    driver.push(DriverEvent::Text {
        id: ids[1],
        delta: "It is written in Rust.".into(),
    });
    driver.push(DriverEvent::Done {
        id: ids[1],
        finished: Finished {
            prompt_tokens: 40,
            generated_tokens: 6,
            finish: FinishReason::Eos,
            first_token_s: 0.8,
            total_s: 3.0,
        },
    });
    driver.push(DriverEvent::Failed {
        id: ids[0],
        error: "the prompt has 9000 tokens; the context holds 8192".into(),
    });
    for n in 0..5 {
        driver.push(DriverEvent::Metrics(step(n, 2, "exact")));
    }
    h.run_steps(3);
    h.get_by_label("Q2: What language is it written in?");
    h.get_by_label("It is written in Rust.");
    h.get_by_label_contains("failed: the prompt has 9000 tokens");
    h.get_by_label_contains("(no bins under exact)");
    assert_rendered(&h.render().expect("render"), "docqa.png");
}
