//! End to end: the real app in a real window under Xvfb, on the GPU engine
//! (lavapipe where there is no GPU), with the demo model. The app's `chat`
//! script opens three tabs, sends them together (one batch), waits for
//! every reply, and saves a screenshot; this test checks the exit status,
//! the script's report and the PNG, and leaves the PNG under
//! target/tmp/lynx-viewer/e2e-chat.png for a person to look at.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The whole run: model load, prefill, 16 decode steps at B = 3, drawing.
const TIMEOUT: Duration = Duration::from_secs(900);

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

/// An X display number that no server is using.
fn free_display() -> u32 {
    (90..200)
        .find(|n| {
            !Path::new(&format!("/tmp/.X11-unix/X{n}")).exists() && !Path::new(&format!("/tmp/.X{n}-lock")).exists()
        })
        .expect("no free X display number between :90 and :199")
}

/// Kills the child when dropped, so that a failed assertion leaves no Xvfb.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn batched_chat_under_xvfb_ends_in_a_screenshot() {
    let xvfb = which("Xvfb").unwrap_or_else(|| {
        panic!("this test needs Xvfb to open a real window: `apt-get install xvfb` (.ci/run installs it)")
    });
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("lynx-viewer");
    std::fs::create_dir_all(&out).expect("create the output directory");
    let shot = out.join("e2e-chat.png");
    let _ = std::fs::remove_file(&shot);
    // Mesa and winit want a private runtime directory.
    let runtime_dir = out.join("xdg-runtime");
    std::fs::create_dir_all(&runtime_dir).expect("create XDG_RUNTIME_DIR");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&runtime_dir, std::fs::Permissions::from_mode(0o700)).expect("chmod XDG_RUNTIME_DIR");
    }

    let display = format!(":{}", free_display());
    let server = Reaped(
        Command::new(&xvfb)
            .args([display.as_str(), "-screen", "0", "1280x800x24", "-nolisten", "tcp"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start Xvfb"),
    );
    let socket = PathBuf::from(format!("/tmp/.X11-unix/X{}", &display[1..]));
    let start = Instant::now();
    while !socket.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "Xvfb did not open {display} within 20 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let mut app = Command::new(env!("CARGO_BIN_EXE_lynx-viewer"))
        .args([
            "--script",
            "chat",
            "--max-tokens",
            "16",
            "--size",
            "1280x800",
            "--timeout",
            "800",
            "--screenshot",
        ])
        .arg(&shot)
        .env("DISPLAY", &display)
        .env("XDG_RUNTIME_DIR", &runtime_dir)
        .env_remove("WAYLAND_DISPLAY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start lynx-viewer");
    let mut stderr = app.stderr.take().expect("stderr");
    let log = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(s) = app.try_wait().expect("wait for lynx-viewer") {
            break s;
        }
        if start.elapsed() > TIMEOUT {
            let _ = app.kill();
            let _ = app.wait();
            panic!("lynx-viewer did not finish within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let log = log.join().unwrap_or_default();
    drop(server);
    eprintln!("{log}");
    eprintln!("took {:.1} s", start.elapsed().as_secs_f64());
    assert!(status.success(), "lynx-viewer exited with {status}; its log:\n{log}");
    assert!(log.contains("[script] sent 3 conversations together"), "{log}");
    assert!(log.contains("[script] all 3 replies ended"), "{log}");

    let image = image::open(&shot)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", shot.display()))
        .to_rgba8();
    assert_eq!((image.width(), image.height()), (1280, 800), "the window's size");
    let mut colours: Vec<[u8; 4]> = image.pixels().map(|p| p.0).collect();
    colours.sort_unstable();
    colours.dedup();
    assert!(colours.len() > 200, "the screenshot has only {} colours", colours.len());
    eprintln!("screenshot: {}", shot.display());
}
