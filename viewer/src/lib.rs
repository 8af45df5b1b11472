//! Lynx viewer: local MoE chat with a live view of expert selection.
//!
//! - [`driver`]: the command/event interface between the UI and whatever
//!   runs the model, and a recording fake for tests;
//! - [`native`]: the native driver (the serving loop on std threads);
//! - [`state`]: conversations, document QA, the policy editor, and how
//!   driver events update them (pure logic);
//! - [`aggregate`]: rolling averages and time series over the metrics stream;
//! - [`plots`], [`view`]: drawing;
//! - [`script`]: scripted end-to-end runs that end in a screenshot.
//!
//! [`ViewerApp`] ties them together as an `eframe::App`. The UI never
//! blocks on the model: it drains driver events once per frame.

pub mod aggregate;
pub mod driver;
#[cfg(not(target_arch = "wasm32"))]
pub mod native;
pub mod plots;
pub mod script;
pub mod state;
pub mod view;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use eframe::egui;

use driver::Driver;
use script::{Script, ScriptAction};
use state::AppState;

/// Saves a screenshot and returns where it went.
pub type ScreenshotSink = Box<dyn FnMut(&egui::ColorImage) -> Result<String, String>>;

/// How often the UI redraws while the model works: often enough for
/// streaming text and plots to look live, rarely enough that drawing does
/// not compete with decode for the CPU (on a software GPU they share it).
const BUSY_REPAINT: Duration = Duration::from_millis(100);

pub struct ViewerApp {
    pub state: AppState,
    driver: Box<dyn Driver>,
    script: Option<Script>,
    screenshot_sink: Option<ScreenshotSink>,
    shot: Arc<Mutex<Option<Arc<egui::ColorImage>>>>,
    /// Set when a script has finished: the process exit code.
    pub exit_code: Arc<Mutex<Option<i32>>>,
}

impl ViewerApp {
    pub fn new(driver: Box<dyn Driver>) -> ViewerApp {
        ViewerApp {
            state: AppState::new(),
            driver,
            script: None,
            screenshot_sink: None,
            shot: Arc::new(Mutex::new(None)),
            exit_code: Arc::new(Mutex::new(None)),
        }
    }

    /// Runs `script`, saving its screenshot with `sink`.
    pub fn with_script(mut self, script: Script, sink: ScreenshotSink) -> ViewerApp {
        self.script = Some(script);
        self.screenshot_sink = Some(sink);
        self
    }

    /// Applies the style the app is drawn in (dark, slightly larger text).
    pub fn setup(ctx: &egui::Context) {
        ctx.set_theme(egui::Theme::Dark);
    }

    /// The running script's report so far (empty without a script).
    pub fn script_report(&self) -> &[String] {
        self.script.as_ref().map_or(&[], |s| s.report.as_slice())
    }

    /// Drains the driver's events into the state.
    pub fn poll_driver(&mut self) {
        for e in self.driver.poll() {
            self.state.apply(e);
        }
    }

    /// Sends the commands the state queued this frame.
    pub fn flush(&mut self) {
        for c in self.state.outbox.drain(..) {
            self.driver.send(c);
        }
    }

    /// One frame: events in, script, drawing, commands out.
    pub fn frame(&mut self, ui: &mut egui::Ui) {
        self.poll_driver();
        let ctx = ui.ctx().clone();
        let now = ctx.input(|i| i.time);
        if let Some(script) = &mut self.script {
            // The pointer rests mid-window under Xvfb; a tooltip would hide a plot.
            plots::set_tooltips(&ctx, false);
            if script.step(&mut self.state, now) == ScriptAction::Screenshot {
                let slot = self.shot.clone();
                let waker = ctx.clone();
                ctx.request_screenshot(move |image| {
                    if let Ok(mut s) = slot.lock() {
                        *s = Some(image);
                    }
                    waker.request_repaint();
                });
            }
            let image = self.shot.lock().ok().and_then(|mut s| s.take());
            if let Some(image) = image {
                let result = match &mut self.screenshot_sink {
                    Some(sink) => sink(&image),
                    None => Err("no screenshot sink".into()),
                };
                script.screenshot_done(result);
                for line in &script.report {
                    eprintln!("[script] {line}");
                }
                if let (Some(code), Ok(mut exit)) = (script.exit_code(), self.exit_code.lock()) {
                    *exit = Some(code);
                }
                ctx.send_viewport_cmd(egui::ViewportCommand::Close);
            }
        }
        view::root(ui, &mut self.state);
        self.flush();
        let busy = self.state.active_requests() > 0 || matches!(self.state.model, state::ModelStatus::Loading { .. });
        if busy || self.script.is_some() {
            ctx.request_repaint_after(BUSY_REPAINT);
        }
    }
}

impl eframe::App for ViewerApp {
    /// Also runs while the window is hidden (the driver's waker asks for
    /// it), so that events never pile up in the channel unread.
    fn logic(&mut self, _ctx: &egui::Context, _frame: &mut eframe::Frame) {
        self.poll_driver();
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.frame(ui);
    }
}
