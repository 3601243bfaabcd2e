//! Lets the gRPC server accept every `:authority` real kubelets send over
//! unix sockets. Older kubelets send the socket path (`/var/lib/kubelet/
//! device-plugins/x.sock`), which is not a valid URI authority, and the
//! HTTP/2 library under tonic resets such streams with PROTOCOL_ERROR.
//! [`AuthorityRepair`] sits between the socket and the server: it follows
//! the client's HTTP/2 frames, decodes each header block (HPACK, keeping
//! the client's dynamic table), replaces an `:authority` that does not
//! parse with `localhost`, and re-encodes the block with literals only, so
//! the server's HPACK table stays consistent. Other frames pass unchanged;
//! bytes that are not HTTP/2 pass through untouched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// The smallest frame size every HTTP/2 peer accepts.
const MAX_FRAME_PAYLOAD: usize = 16_384;
/// The value an unparseable `:authority` becomes.
pub const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

#[derive(Debug)]
enum Mode {
    /// Waiting for the 24-byte client preface.
    Preface,
    /// Following frames.
    Frames,
    /// Not HTTP/2 as expected, or undecodable: hand bytes over as they come.
    PassThrough,
}

/// A header block split over HEADERS and CONTINUATION frames.
#[derive(Debug)]
struct PartialHeaders {
    stream_id: [u8; 4],
    flags: u8,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
}

/// A connection whose incoming HTTP/2 header blocks are repaired.
pub struct AuthorityRepair<S> {
    inner: S,
    mode: Mode,
    /// Bytes read from the socket, not yet processed.
    raw: Vec<u8>,
    /// Processed bytes waiting for the server to read them.
    ready: Vec<u8>,
    ready_pos: usize,
    partial: Option<PartialHeaders>,
    decoder: hpack::Decoder<'static>,
}

impl<S> std::fmt::Debug for AuthorityRepair<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityRepair")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl<S> AuthorityRepair<S> {
    /// Wraps a freshly accepted connection.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            mode: Mode::Preface,
            raw: Vec::new(),
            ready: Vec::new(),
            ready_pos: 0,
            partial: None,
            decoder: hpack::Decoder::new(),
        }
    }

    /// Moves every complete unit from `raw` to `ready`.
    fn process(&mut self) {
        loop {
            match self.mode {
                Mode::PassThrough => {
                    self.ready.append(&mut self.raw);
                    return;
                }
                Mode::Preface => {
                    let n = self.raw.len().min(PREFACE.len());
                    if self.raw[..n] != PREFACE[..n] {
                        self.mode = Mode::PassThrough;
                        continue;
                    }
                    if n < PREFACE.len() {
                        return;
                    }
                    self.ready.extend(self.raw.drain(..PREFACE.len()));
                    self.mode = Mode::Frames;
                }
                Mode::Frames => {
                    if self.raw.len() < FRAME_HEADER_LEN {
                        return;
                    }
                    let length = (usize::from(self.raw[0]) << 16)
                        | (usize::from(self.raw[1]) << 8)
                        | usize::from(self.raw[2]);
                    let total = FRAME_HEADER_LEN + length;
                    if self.raw.len() < total {
                        return;
                    }
                    let frame: Vec<u8> = self.raw.drain(..total).collect();
                    self.handle_frame(&frame);
                }
            }
        }
    }

    fn handle_frame(&mut self, frame: &[u8]) {
        let frame_type = frame[3];
        let flags = frame[4];
        let stream_id = [frame[5], frame[6], frame[7], frame[8]];
        let payload = &frame[FRAME_HEADER_LEN..];
        match frame_type {
            TYPE_HEADERS => {
                let Some((priority, fragment)) = split_headers_payload(flags, payload) else {
                    self.give_up(frame);
                    return;
                };
                self.partial = Some(PartialHeaders {
                    stream_id,
                    flags,
                    priority,
                    block: fragment.to_vec(),
                });
            }
            TYPE_CONTINUATION if self.partial.is_some() => {
                if let Some(partial) = self.partial.as_mut() {
                    partial.block.extend_from_slice(payload);
                }
            }
            _ => {
                self.ready.extend_from_slice(frame);
                return;
            }
        }
        if flags & FLAG_END_HEADERS != 0 {
            if let Some(partial) = self.partial.take() {
                self.emit_repaired(partial);
            }
        }
    }

    /// Decodes, repairs and re-encodes one complete header block.
    fn emit_repaired(&mut self, partial: PartialHeaders) {
        let Ok(mut headers) = self.decoder.decode(&partial.block) else {
            // Our view of the client's table is lost; let the server judge
            // the original bytes and stop interfering with this connection.
            let mut original = Vec::new();
            push_frame(
                &mut original,
                TYPE_HEADERS,
                partial.flags & !FLAG_PADDED & !FLAG_PRIORITY | FLAG_END_HEADERS,
                partial.stream_id,
                &partial.block,
            );
            self.give_up(&original);
            return;
        };
        for (name, value) in &mut headers {
            if name.as_slice() == b":authority"
                && http::uri::Authority::try_from(value.as_slice()).is_err()
            {
                tracing::debug!(authority = %String::from_utf8_lossy(value), "replacing an :authority tonic would refuse");
                *value = REPLACEMENT_AUTHORITY.to_vec();
            }
        }
        let mut payload = Vec::new();
        if let Some(priority) = partial.priority {
            payload.extend_from_slice(&priority);
        }
        for (name, value) in &headers {
            encode_literal(&mut payload, name, value);
        }
        let keep = partial.flags
            & (FLAG_END_STREAM
                | if partial.priority.is_some() {
                    FLAG_PRIORITY
                } else {
                    0
                });
        let mut chunks = payload.chunks(MAX_FRAME_PAYLOAD).peekable();
        let mut first = true;
        if chunks.peek().is_none() {
            push_frame(
                &mut self.ready,
                TYPE_HEADERS,
                keep | FLAG_END_HEADERS,
                partial.stream_id,
                &[],
            );
            return;
        }
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            let end_headers = if last { FLAG_END_HEADERS } else { 0 };
            if first {
                push_frame(
                    &mut self.ready,
                    TYPE_HEADERS,
                    keep | end_headers,
                    partial.stream_id,
                    chunk,
                );
                first = false;
            } else {
                push_frame(
                    &mut self.ready,
                    TYPE_CONTINUATION,
                    end_headers,
                    partial.stream_id,
                    chunk,
                );
            }
        }
    }

    fn give_up(&mut self, pending: &[u8]) {
        self.ready.extend_from_slice(pending);
        self.mode = Mode::PassThrough;
    }
}

/// Splits a HEADERS payload into its priority fields and header block fragment.
fn split_headers_payload(flags: u8, payload: &[u8]) -> Option<(Option<[u8; 5]>, &[u8])> {
    let mut rest = payload;
    let mut pad = 0usize;
    if flags & FLAG_PADDED != 0 {
        pad = usize::from(*rest.first()?);
        rest = &rest[1..];
    }
    let priority = if flags & FLAG_PRIORITY != 0 {
        let fields: [u8; 5] = rest.get(..5)?.try_into().ok()?;
        rest = &rest[5..];
        Some(fields)
    } else {
        None
    };
    let end = rest.len().checked_sub(pad)?;
    Some((priority, &rest[..end]))
}

fn push_frame(out: &mut Vec<u8>, frame_type: u8, flags: u8, stream_id: [u8; 4], payload: &[u8]) {
    let len = payload.len();
    out.extend_from_slice(&[
        (len >> 16) as u8,
        (len >> 8) as u8,
        len as u8,
        frame_type,
        flags,
    ]);
    out.extend_from_slice(&stream_id);
    out.extend_from_slice(payload);
}

/// HPACK integer with an `n`-bit prefix; `first` carries the pattern bits.
fn encode_integer(out: &mut Vec<u8>, first: u8, prefix_bits: u32, value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// "Literal header field without indexing, new name", no Huffman coding.
fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    encode_integer(out, 0x00, 7, name.len());
    out.extend_from_slice(name);
    encode_integer(out, 0x00, 7, value.len());
    out.extend_from_slice(value);
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityRepair<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.ready_pos < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.ready_pos);
                buf.put_slice(&this.ready[this.ready_pos..this.ready_pos + n]);
                this.ready_pos += n;
                if this.ready_pos == this.ready.len() {
                    this.ready.clear();
                    this.ready_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut chunk_buf = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut chunk_buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let filled = chunk_buf.filled();
                    if filled.is_empty() {
                        // End of stream: hand over whatever is left as it is.
                        if this.raw.is_empty() {
                            return Poll::Ready(Ok(()));
                        }
                        this.mode = Mode::PassThrough;
                    } else {
                        this.raw.extend_from_slice(filled);
                    }
                    this.process();
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityRepair<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S> tonic::transport::server::Connected for AuthorityRepair<S> {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn headers_frame(block: &[u8], flags: u8) -> Vec<u8> {
        let mut out = Vec::new();
        push_frame(&mut out, TYPE_HEADERS, flags, [0, 0, 0, 1], block);
        out
    }

    async fn repaired(input: Vec<u8>) -> Vec<u8> {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        client.write_all(&input).await.expect("write");
        drop(client);
        let mut repair = AuthorityRepair::new(server);
        let mut out = Vec::new();
        repair.read_to_end(&mut out).await.expect("read");
        out
    }

    fn decode_headers(frames: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut decoder = hpack::Decoder::new();
        let mut rest = &frames[PREFACE.len()..];
        let mut all = Vec::new();
        while rest.len() >= FRAME_HEADER_LEN {
            let len =
                (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
            if rest[3] == TYPE_HEADERS {
                all.extend(decoder.decode(&rest[9..9 + len]).expect("valid block"));
            }
            rest = &rest[9 + len..];
        }
        all
    }

    #[tokio::test]
    async fn path_authority_becomes_localhost_across_blocks_with_dynamic_table() {
        let mut encoder = hpack::Encoder::new();
        let first = encoder.encode(vec![
            (&b":method"[..], &b"POST"[..]),
            (
                b":authority",
                b"/var/lib/kubelet/device-plugins/tessera.sock",
            ),
            (b"x-custom", b"kept"),
        ]);
        let second = encoder.encode(vec![
            (&b":authority"[..], &b"%2Fvar%2Flib%2Fkubelet%2Fx.sock"[..]),
            (b"x-custom", b"kept"),
        ]);
        let mut input = PREFACE.to_vec();
        input.extend(headers_frame(&first, FLAG_END_HEADERS));
        // A DATA frame in between passes untouched.
        push_frame(&mut input, 0x0, 0, [0, 0, 0, 1], b"hello");
        input.extend(headers_frame(&second, FLAG_END_HEADERS | FLAG_END_STREAM));
        let out = repaired(input).await;
        let headers = decode_headers(&out);
        let authorities: Vec<_> = headers
            .iter()
            .filter(|(n, _)| n == b":authority")
            .map(|(_, v)| v.clone())
            .collect();
        assert_eq!(authorities[0], b"localhost");
        assert_eq!(authorities.len(), 2);
        let customs = headers
            .iter()
            .filter(|(n, v)| n == b"x-custom" && v == b"kept")
            .count();
        assert_eq!(
            customs, 2,
            "headers from the client's dynamic table survive"
        );
        assert!(out.windows(5).any(|w| w == b"hello"));
    }

    #[tokio::test]
    async fn padded_priority_and_continuation_frames_are_joined() {
        let mut encoder = hpack::Encoder::new();
        let block = encoder.encode(vec![
            (&b":authority"[..], &b"/run/x.sock"[..]),
            (b"a", b"b"),
        ]);
        let (head, tail) = block.split_at(block.len() / 2);
        let mut payload = vec![2u8];
        payload.extend([0, 0, 0, 0, 16]);
        payload.extend_from_slice(head);
        payload.extend([0, 0]);
        let mut input = PREFACE.to_vec();
        push_frame(
            &mut input,
            TYPE_HEADERS,
            FLAG_PADDED | FLAG_PRIORITY,
            [0, 0, 0, 3],
            &payload,
        );
        push_frame(
            &mut input,
            TYPE_CONTINUATION,
            FLAG_END_HEADERS,
            [0, 0, 0, 3],
            tail,
        );
        let out = repaired(input).await;
        let frame = &out[PREFACE.len()..];
        assert_eq!(frame[3], TYPE_HEADERS);
        assert_eq!(frame[4], FLAG_PRIORITY | FLAG_END_HEADERS);
        let len = (usize::from(frame[1]) << 8) | usize::from(frame[2]);
        let headers = hpack::Decoder::new()
            .decode(&frame[9 + 5..9 + len])
            .expect("decodes");
        assert_eq!(headers[0], (b":authority".to_vec(), b"localhost".to_vec()));
        assert_eq!(headers[1], (b"a".to_vec(), b"b".to_vec()));
    }

    #[tokio::test]
    async fn valid_authority_and_non_http2_bytes_are_untouched() {
        let mut encoder = hpack::Encoder::new();
        let block = encoder.encode(vec![(&b":authority"[..], &b"localhost:1234"[..])]);
        let mut input = PREFACE.to_vec();
        input.extend(headers_frame(&block, FLAG_END_HEADERS));
        let headers = decode_headers(&repaired(input).await);
        assert_eq!(headers[0].1, b"localhost:1234");
        let plain = b"GET / HTTP/1.1\r\n\r\n".to_vec();
        assert_eq!(repaired(plain.clone()).await, plain);
    }
}
