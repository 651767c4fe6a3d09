//! JSON for the answers hyper gives on its own, before a request reaches the router: a head
//! over its limits (431), a target over 65,534 bytes (414), a request line or a header it cannot
//! parse (400). hyper writes those with an empty body and has no hook for them, so the
//! connection's writes are watched here and such an answer is replaced, whole, by one with a
//! JSON body like every other error of the gateway's.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most header fields a request may have (hyper's own default, set so that the message can
/// say it).
pub(crate) const MAX_HEADERS: usize = 100;

/// The most bytes a request's head (request line and headers) may take.
pub(crate) const MAX_HEAD: usize = 256 * 1024;

/// The longest request target hyper takes (its `MAX_URI_LEN`).
const MAX_TARGET: usize = 65_534;

/// A connection's stream whose writes are watched for hyper's own error answers.
pub(crate) struct JsonErrors<S> {
    inner: S,
    /// The replacement answer still to be written; hyper was told its own was written whole.
    pending: Vec<u8>,
}

impl<S> JsonErrors<S> {
    pub(crate) fn new(inner: S) -> JsonErrors<S> {
        JsonErrors { inner, pending: Vec::new() }
    }
}

/// The sentence of a 431, from hyper or from the router's own check ([`head_size`]).
pub(crate) fn head_too_large() -> String {
    format!(
        "the request's head is too large: at most {MAX_HEADERS} header fields and {} KiB with its \
         request line; a space needs only a content-type and a small body",
        MAX_HEAD / 1024
    )
}

/// The bytes of a request's head as sent, near enough: hyper checks [`MAX_HEAD`] only while a
/// head is incomplete in its buffer, so one that arrives in pieces can pass it (hyper issue
/// 4081); the router checks again with this.
pub(crate) fn head_size(req: &axum::http::Request<axum::body::Body>) -> usize {
    let target = req.uri().path_and_query().map_or(1, |p| p.as_str().len());
    let line = req.method().as_str().len() + 1 + target + " HTTP/1.1\r\n".len();
    line + req.headers().iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum::<usize>() + 2
}

/// The JSON answer that replaces `head` when it is one of hyper's own: a 4xx with nothing but
/// `content-length: 0`, `connection: close` and `date` (every answer of the router has a
/// content-type).
pub(crate) fn replacement(head: &[u8]) -> Option<Vec<u8>> {
    let rest = head.strip_prefix(b"HTTP/1.1 ").or_else(|| head.strip_prefix(b"HTTP/1.0 "))?;
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")?;
    if end + 4 != head.len() {
        return None;
    }
    let text = std::str::from_utf8(&head[..end]).ok()?;
    let mut lines = text.split("\r\n").skip(1);
    if !lines.all(|l| {
        let l = l.to_ascii_lowercase();
        l == "content-length: 0" || l == "connection: close" || l.starts_with("date: ")
    }) {
        return None;
    }
    let message = match rest.get(..3)? {
        b"431" => head_too_large(),
        b"414" => format!("the request's target (path and query) is over {MAX_TARGET} bytes"),
        b"400" => "the request is not HTTP/1.1 that can be read: its request line (method, target, \
                   version) or a header is malformed"
            .to_owned(),
        _ => return None,
    };
    let status = std::str::from_utf8(&rest[..3]).ok()?;
    let reason = text.lines().next()?.split_once(' ')?.1.split_once(' ').map_or("", |(_, r)| r);
    let body = serde_json::json!({ "error": message, "status": status.parse::<u16>().ok()? }).to_string();
    Some(
        format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

impl<S: AsyncWrite + Unpin> JsonErrors<S> {
    /// Write what is pending of a replacement; ready once nothing is.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for JsonErrors<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for JsonErrors<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.drain(cx))?;
        if let Some(answer) = replacement(buf) {
            this.pending = answer;
            // Written as far as hyper knows; the rest goes out on the next calls and the flush.
            let _ = this.drain(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.drain(cx))?;
        // hyper's own answers have no body: the head is all there is.
        if let [only] = bufs
            && let Some(answer) = replacement(only)
        {
            this.pending = answer;
            let _ = this.drain(cx)?;
            return Poll::Ready(Ok(only.len()));
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(answer: &[u8]) -> serde_json::Value {
        let text = std::str::from_utf8(answer).unwrap();
        let (_, body) = text.split_once("\r\n\r\n").unwrap();
        serde_json::from_str(body).unwrap()
    }

    #[test]
    fn hypers_own_431_becomes_json_with_its_status() {
        let head = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: Sat, 05 Dec 2026 09:00:00 GMT\r\n\r\n";
        let answer = replacement(head).expect("replaced");
        assert!(answer.starts_with(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
        ));
        let v = body(&answer);
        assert_eq!(v["status"], 431);
        assert!(v["error"].as_str().unwrap().contains("100 header fields"), "{v}");
    }

    #[test]
    fn hypers_own_414_and_400_become_json() {
        let v = body(&replacement(b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\n\r\n").unwrap());
        assert_eq!(v["status"], 414);
        let v = body(&replacement(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").unwrap());
        assert_eq!(v["status"], 400);
    }

    #[test]
    fn an_answer_of_the_router_is_left_as_it_is() {
        let json =
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 30\r\n\r\n";
        assert!(replacement(json).is_none());
        assert!(replacement(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
        // A head followed by its body in one write.
        assert!(replacement(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nxx").is_none());
        assert!(replacement(b"{\"name\":\"HTTP/1.1 431 \"}").is_none());
    }
}
