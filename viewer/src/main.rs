//! The `lynx-viewer` desktop app: an eframe window over the native driver.
//!
//! `lynx-viewer [MODEL]` opens the app and loads MODEL (default: the demo
//! MoE). `lynx-viewer --script chat --screenshot out.png` runs one batched
//! exchange, saves a screenshot and exits 0 only if the exchange completed.

use std::path::PathBuf;

use anyhow::{Context, anyhow};
use clap::Parser;
use eframe::egui;

use lynx_viewer::ViewerApp;
use lynx_viewer::native::NativeDriver;
use lynx_viewer::script::{Script, ScriptKind};

#[derive(Parser)]
#[command(
    name = "lynx-viewer",
    version,
    about = "Lynx desktop app: local MoE chat with a live view of expert selection"
)]
struct Args {
    /// A .gguf file or checkpoint directory [default: the demo MoE].
    model: Option<PathBuf>,
    /// Run a scripted exchange (`chat`: three tabs sent together; `docqa`:
    /// three questions on one document), then exit.
    #[arg(long, value_name = "NAME")]
    script: Option<ScriptKind>,
    /// Where the script saves its screenshot (PNG).
    #[arg(long, value_name = "PNG", requires = "script")]
    screenshot: Option<PathBuf>,
    /// Tokens per reply in the script.
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// Give the script up after this many seconds.
    #[arg(long, default_value_t = 900.0)]
    timeout: f64,
    /// Window size in points, WIDTHxHEIGHT.
    #[arg(long, default_value = "1280x800")]
    size: String,
    /// Start without loading a model.
    #[arg(long, conflicts_with = "script")]
    no_load: bool,
}

fn parse_size(s: &str) -> anyhow::Result<[f32; 2]> {
    let (w, h) = s
        .split_once('x')
        .ok_or_else(|| anyhow!("--size {s}: expected WIDTHxHEIGHT, e.g. 1280x800"))?;
    let w: f32 = w.trim().parse().with_context(|| format!("--size {s}: bad width"))?;
    let h: f32 = h.trim().parse().with_context(|| format!("--size {s}: bad height"))?;
    Ok([w, h])
}

fn save_png(path: &std::path::Path, image: &egui::ColorImage) -> Result<String, String> {
    let [w, h] = image.size;
    let bytes: Vec<u8> = image.pixels.iter().flat_map(|c| c.to_array()).collect();
    let buf = image::RgbaImage::from_raw(w as u32, h as u32, bytes)
        .ok_or_else(|| format!("screenshot of {w}x{h} has the wrong number of pixels"))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    buf.save(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(format!("{} ({w}x{h})", path.display()))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let size = parse_size(&args.size)?;
    let script = args.script.map(|kind| {
        let mut s = Script::new(kind, args.max_tokens);
        s.timeout_s = args.timeout;
        s
    });
    let shot_path = args
        .screenshot
        .clone()
        .unwrap_or_else(|| PathBuf::from("lynx-viewer-screenshot.png"));
    let model = args.model.clone();
    let no_load = args.no_load;
    let exit_code = std::sync::Arc::new(std::sync::Mutex::new(None));
    let exit_for_app = exit_code.clone();

    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_inner_size(size)
            .with_title("Lynx viewer"),
        ..Default::default()
    };
    eframe::run_native(
        "Lynx viewer",
        options,
        Box::new(move |cc| {
            ViewerApp::setup(&cc.egui_ctx);
            let ctx = cc.egui_ctx.clone();
            let driver = NativeDriver::start(std::sync::Arc::new(move || ctx.request_repaint()))?;
            let mut app = ViewerApp::new(Box::new(driver));
            app.exit_code = exit_for_app;
            // The default path is built from the runtime crate's directory
            // (`runtime/../models/...`); show it without the detour.
            app.state.default_model = NativeDriver::default_model()
                .map(|p| p.canonicalize().unwrap_or(p).display().to_string())
                .unwrap_or_default();
            if let Some(m) = &model {
                app.state.model_path = m.display().to_string();
            }
            if let Some(script) = script {
                let path = shot_path.clone();
                app = app.with_script(script, Box::new(move |img| save_png(&path, img)));
            }
            if !no_load {
                app.state.load_model();
            }
            Ok(Box::new(app))
        }),
    )
    .map_err(|e| anyhow!("the window failed: {e}"))?;

    let code = exit_code.lock().ok().and_then(|c| *c);
    match (args.script.is_some(), code) {
        (false, _) | (true, Some(0)) => Ok(()),
        (true, Some(c)) => std::process::exit(c),
        (true, None) => Err(anyhow!("the window closed before the script finished")),
    }
}
