//! A minimal HTTP/2 client written frame by frame, so a test can send an
//! `:authority` no URI type would accept (a socket path), as older kubelets
//! do, and see how the server answers a unary gRPC call.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(frame_type: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut out = vec![
        (len >> 16) as u8,
        (len >> 8) as u8,
        len as u8,
        frame_type,
        flags,
    ];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The outcome of one call.
#[derive(Debug)]
pub enum Outcome {
    /// The server answered with these headers and trailers, and this body.
    Answered {
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// The server reset the stream (the HTTP/2 error code).
    Reset(u32),
    /// The server closed the connection (GOAWAY error code).
    GoAway(u32),
}

impl Outcome {
    pub fn grpc_status(&self) -> Option<String> {
        match self {
            Self::Answered { headers, .. } => headers
                .iter()
                .find(|(n, _)| n == "grpc-status")
                .map(|(_, v)| v.clone()),
            _ => None,
        }
    }
}

/// Sends one unary gRPC call with `authority` as the `:authority`.
pub async fn unary(socket: &Path, authority: &[u8], path: &str, message: &[u8]) -> Outcome {
    tokio::time::timeout(
        Duration::from_secs(5),
        unary_inner(socket, authority, path, message),
    )
    .await
    .expect("the server answers within 5 s")
}

async fn unary_inner(socket: &Path, authority: &[u8], path: &str, message: &[u8]) -> Outcome {
    let mut stream = UnixStream::connect(socket).await.expect("connect");
    let mut out = PREFACE.to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    let mut encoder = hpack::Encoder::new();
    let block = encoder.encode(vec![
        (&b":method"[..], &b"POST"[..]),
        (b":scheme", b"http"),
        (b":path", path.as_bytes()),
        (b":authority", authority),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]);
    out.extend(frame(0x1, 0x4, 1, &block));
    let mut body = vec![0u8];
    body.extend_from_slice(&u32::try_from(message.len()).expect("small").to_be_bytes());
    body.extend_from_slice(message);
    out.extend(frame(0x0, 0x1, 1, &body));
    stream.write_all(&out).await.expect("write");

    let mut decoder = hpack::Decoder::new();
    let mut headers = Vec::new();
    let mut data = Vec::new();
    let mut buffer = Vec::new();
    loop {
        while buffer.len() >= 9 {
            let len = (usize::from(buffer[0]) << 16)
                | (usize::from(buffer[1]) << 8)
                | usize::from(buffer[2]);
            if buffer.len() < 9 + len {
                break;
            }
            let f: Vec<u8> = buffer.drain(..9 + len).collect();
            let (kind, flags) = (f[3], f[4]);
            let stream_id = u32::from_be_bytes([f[5], f[6], f[7], f[8]]) & 0x7fff_ffff;
            let payload = &f[9..];
            match kind {
                0x4 if flags & 0x1 == 0 => stream
                    .write_all(&frame(0x4, 0x1, 0, &[]))
                    .await
                    .expect("ack"),
                0x1 if stream_id == 1 => {
                    for (n, v) in decoder.decode(payload).expect("server headers decode") {
                        headers.push((
                            String::from_utf8_lossy(&n).into_owned(),
                            String::from_utf8_lossy(&v).into_owned(),
                        ));
                    }
                    if flags & 0x1 != 0 {
                        return Outcome::Answered {
                            headers,
                            body: data,
                        };
                    }
                }
                0x0 if stream_id == 1 => {
                    data.extend_from_slice(payload);
                    if flags & 0x1 != 0 {
                        return Outcome::Answered {
                            headers,
                            body: data,
                        };
                    }
                }
                0x3 if stream_id == 1 => {
                    return Outcome::Reset(u32::from_be_bytes([
                        payload[0], payload[1], payload[2], payload[3],
                    ]));
                }
                0x7 => {
                    return Outcome::GoAway(u32::from_be_bytes([
                        payload[4], payload[5], payload[6], payload[7],
                    ]))
                }
                _ => {}
            }
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.expect("read");
        assert!(n > 0, "server closed the connection without answering");
        buffer.extend_from_slice(&chunk[..n]);
    }
}
