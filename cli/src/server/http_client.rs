//! A minimal blocking HTTP/1.1 client over `std::net`, for the server's
//! tests and the load generator on loopback. It sends one request per
//! connection (`Connection: close`), reads `Content-Length`, chunked and
//! until-close bodies, and parses server-sent events as they arrive. It is
//! not a general HTTP client: no TLS, redirects or keep-alive.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A whole response.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> io::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).map_err(|e| bad(format!("response body is not JSON ({e}): {}", self.text())))
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Connects and writes one request; `timeout` bounds every read and write.
fn send(addr: SocketAddr, method: &str, path: &str, body: Option<&[u8]>, timeout: Duration) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    let mut msg = head.into_bytes();
    msg.extend_from_slice(body.unwrap_or_default());
    s.write_all(&msg)?;
    Ok(s)
}

/// The status line and headers.
fn read_head(r: &mut impl BufRead) -> io::Result<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(bad("the connection closed inside the headers"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            return Ok((status, headers));
        }
        let (k, v) = l.split_once(':').ok_or_else(|| bad(format!("bad header {l:?}")))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
}

/// The body of a response as a reader, whatever its framing.
enum Body<R> {
    Length(std::io::Take<R>),
    Chunked { inner: R, left: u64, done: bool },
    UntilClose(R),
}

impl<R: BufRead> Body<R> {
    fn new(r: R, headers: &[(String, String)]) -> io::Result<Body<R>> {
        let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            Ok(Body::Chunked {
                inner: r,
                left: 0,
                done: false,
            })
        } else if let Some(n) = get("content-length") {
            let n = n.parse().map_err(|_| bad(format!("bad content-length {n:?}")))?;
            Ok(Body::Length(r.take(n)))
        } else {
            Ok(Body::UntilClose(r))
        }
    }
}

impl<R: BufRead> Read for Body<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Body::Length(r) => r.read(buf),
            Body::UntilClose(r) => r.read(buf),
            Body::Chunked { inner, left, done } => {
                if *done {
                    return Ok(0);
                }
                if *left == 0 {
                    let mut line = String::new();
                    inner.read_line(&mut line)?;
                    let size = line.trim().split(';').next().unwrap_or("");
                    *left = u64::from_str_radix(size, 16).map_err(|_| bad(format!("bad chunk size {line:?}")))?;
                    if *left == 0 {
                        *done = true;
                        return Ok(0);
                    }
                }
                let want = buf.len().min(*left as usize);
                let n = inner.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(bad("the connection closed inside a chunk"));
                }
                *left -= n as u64;
                if *left == 0 {
                    let mut crlf = [0u8; 2];
                    inner.read_exact(&mut crlf)?;
                }
                Ok(n)
            }
        }
    }
}

/// Sends one request and reads the whole response.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> io::Result<HttpResponse> {
    let s = send(addr, method, path, body, timeout)?;
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r)?;
    let mut body = Vec::new();
    Body::new(r, &headers)?.read_to_end(&mut body)?;
    Ok(HttpResponse { status, headers, body })
}

/// One server-sent event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SseMessage {
    /// The `event:` field; empty for plain messages.
    pub event: String,
    pub data: String,
}

/// A response read as server-sent events, one at a time. Dropping it
/// closes the connection, as a client that goes away does.
pub struct SseStream {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    body: BufReader<Body<BufReader<TcpStream>>>,
}

impl SseStream {
    /// Sends a request and reads the response head; the events follow
    /// from [`SseStream::next_event`].
    pub fn open(
        addr: SocketAddr,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> io::Result<SseStream> {
        let s = send(addr, method, path, body, timeout)?;
        let mut r = BufReader::new(s);
        let (status, headers) = read_head(&mut r)?;
        let body = BufReader::new(Body::new(r, &headers)?);
        Ok(SseStream { status, headers, body })
    }

    /// The next event, or `None` at the end of the stream. Comments (the
    /// keep-alives) are skipped.
    pub fn next_event(&mut self) -> io::Result<Option<SseMessage>> {
        let mut msg = SseMessage {
            event: String::new(),
            data: String::new(),
        };
        let mut any = false;
        let mut has_data = false;
        let mut line = String::new();
        loop {
            line.clear();
            if self.body.read_line(&mut line)? == 0 {
                return Ok(any.then_some(msg));
            }
            let l = line.trim_end_matches(['\r', '\n']);
            if l.is_empty() {
                if any {
                    return Ok(Some(msg));
                }
                continue;
            }
            if l.starts_with(':') {
                continue;
            }
            let (field, value) = l
                .split_once(':')
                .map_or((l, ""), |(f, v)| (f, v.strip_prefix(' ').unwrap_or(v)));
            match field {
                "data" => {
                    // Several data lines make one message, joined by newlines.
                    if has_data {
                        msg.data.push('\n');
                    }
                    msg.data.push_str(value);
                    has_data = true;
                    any = true;
                }
                "event" => {
                    msg.event = value.to_string();
                    any = true;
                }
                _ => {}
            }
        }
    }

    /// The rest of the body as text (for a response that is not a stream).
    pub fn rest(mut self) -> io::Result<String> {
        let mut s = String::new();
        self.body.read_to_string(&mut s)?;
        Ok(s)
    }
}
