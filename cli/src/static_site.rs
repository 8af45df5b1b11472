//! A tiny static file server for the browser demo (`lynx web`), on the
//! standard library only: HTTP/1.1 GET and HEAD, one thread per connection,
//! bound to the loopback address. It sends the headers a browser needs and
//! nothing more: the right `Content-Type` (WebAssembly.instantiateStreaming
//! insists on `application/wasm`) and `Content-Length` (the page's download
//! progress bar reads it), with files streamed in pieces so a 75 MiB model
//! is never in memory.
//!
//! It serves one folder (the site that `web/build.sh` writes) and refuses
//! paths that would leave it. It is a development server, not a web server:
//! no TLS, no keep-alive, no ranges.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};

use lynx::error::{Error, Result};

/// The `Content-Type` for a file name.
pub fn content_type(path: &Path) -> &'static str {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("html") | Some("htm") => "text/html; charset=utf-8",
        Some("js") | Some("mjs") => "text/javascript; charset=utf-8",
        Some("wasm") => "application/wasm",
        Some("css") => "text/css; charset=utf-8",
        Some("json") => "application/json",
        Some("png") => "image/png",
        Some("svg") => "image/svg+xml",
        Some("ico") => "image/x-icon",
        Some("txt") | Some("md") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// Binds `127.0.0.1:port` (0 picks a free port). Only the loopback address
/// is ever bound: the demo is for the person at this machine.
pub fn bind(port: u16) -> Result<TcpListener> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpListener::bind(addr).map_err(|e| Error::io(format!("127.0.0.1:{port}"), e))
}

/// Serves `site` on `listener` until the process ends. Each connection gets
/// its own thread, so a large download does not hold up the page.
pub fn serve(listener: TcpListener, site: &Path) -> Result<()> {
    let site = site.canonicalize().map_err(|e| Error::io(site, e))?;
    if !site.join("index.html").is_file() {
        return Err(Error::InvalidArgument(format!(
            "{} has no index.html; build the site first with `bash web/build.sh`",
            site.display()
        )));
    }
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let site = site.clone();
        std::thread::spawn(move || {
            // A client that goes away mid-response is not an error worth
            // reporting: browsers cancel requests all the time.
            let _ = handle(stream, &site);
        });
    }
    Ok(())
}

/// Maps a request path (`/pkg/lynx_web.js?x=1`) to a file under `site`, or
/// `None` when it would leave the site (`..`, absolute components) or does
/// not name a file. `/` and directories mean their `index.html`.
pub fn resolve(site: &Path, request_path: &str) -> Option<PathBuf> {
    let path = request_path.split(['?', '#']).next().unwrap_or("");
    let decoded = percent_decode(path)?;
    let mut out = site.to_path_buf();
    for c in Path::new(decoded.trim_start_matches('/')).components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            _ => return None,
        }
    }
    if out.is_dir() {
        out.push("index.html");
    }
    out.is_file().then_some(out)
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn handle(stream: TcpStream, site: &Path) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Read (and ignore) the headers up to the blank line.
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    let mut out = stream;
    if method != "GET" && method != "HEAD" {
        return respond(&mut out, "405 Method Not Allowed", "text/plain", b"only GET and HEAD\n");
    }
    let Some(file) = resolve(site, target) else {
        return respond(&mut out, "404 Not Found", "text/plain", b"not found\n");
    };
    let mut f = std::fs::File::open(&file)?;
    let len = f.metadata()?.len();
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {len}\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n",
        content_type(&file)
    )?;
    if method == "GET" {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n])?;
        }
    }
    out.flush()
}

fn respond(out: &mut TcpStream, status: &str, ty: &str, body: &[u8]) -> std::io::Result<()> {
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: {ty}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    out.write_all(body)?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lynx-static-site-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("pkg")).unwrap();
        std::fs::write(dir.join("index.html"), "<html>hi</html>").unwrap();
        std::fs::write(dir.join("pkg/a b.wasm"), [0u8, 97, 115, 109]).unwrap();
        dir
    }

    fn get(addr: SocketAddr, req: &str) -> (String, Vec<u8>) {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        let split = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        (
            String::from_utf8(all[..split].to_vec()).unwrap(),
            all[split + 4..].to_vec(),
        )
    }

    #[test]
    fn serves_files_with_type_and_length_and_refuses_escapes() {
        let dir = site();
        let listener = bind(0).unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(addr.ip().is_loopback());
        let root = dir.clone();
        std::thread::spawn(move || serve(listener, &root));

        let (head, body) = get(addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.contains("text/html") && head.contains("Content-Length: 15"),
            "{head}"
        );
        assert_eq!(body, b"<html>hi</html>");

        let (head, body) = get(addr, "GET /pkg/a%20b.wasm?v=2 HTTP/1.1\r\n\r\n");
        assert!(head.contains("Content-Type: application/wasm"), "{head}");
        assert!(head.contains("Content-Length: 4"), "{head}");
        assert_eq!(body, [0u8, 97, 115, 109]);

        let (head, body) = get(addr, "HEAD /pkg/a%20b.wasm HTTP/1.1\r\n\r\n");
        assert!(head.contains("Content-Length: 4") && body.is_empty(), "{head}");

        for bad in ["/../index.html", "/pkg/../../etc/passwd", "/%2e%2e/x", "/missing.js"] {
            let (head, _) = get(addr, &format!("GET {bad} HTTP/1.1\r\n\r\n"));
            assert!(head.starts_with("HTTP/1.1 404"), "{bad}: {head}");
        }
        let (head, _) = get(addr, "POST / HTTP/1.1\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 405"), "{head}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn content_types() {
        assert_eq!(content_type(Path::new("x.wasm")), "application/wasm");
        assert!(content_type(Path::new("x.JS")).starts_with("text/javascript"));
        assert_eq!(content_type(Path::new("m.gguf")), "application/octet-stream");
    }
}
