//! Repairs the HTTP/2 `:authority` that gRPC clients send on Unix sockets,
//! so every standard client works unchanged. grpcio (C-core ≥ 1.57) sends
//! the socket path percent-encoded (`tmp%2Fx%2Flfmd.sock`), grpc-java and
//! grpc-swift the raw path; `h2` (under hyper and tonic) resets any stream
//! whose `:authority` is not a valid URI authority (hyperium/h2#487). On a
//! Unix socket the authority names nothing, so the client-to-server byte
//! stream passes through [`AuthorityFix`]: frames go through untouched except
//! header blocks, which are decoded (HPACK, in step with the client's
//! encoder), given `localhost` for an invalid `:authority`, and encoded again
//! for h2 with an encoder of our own (its table in step with h2's decoder).
//! Everything else (settings, data, the server's replies) is not touched.
//!
//! Bounded: a header block may hold at most [`MAX_BLOCK_BYTES`] encoded and
//! [`MAX_HEADER_LIST_BYTES`] decoded (RFC 7540 sizes: name + value + 32 per
//! field; h2 then applies its own, smaller limit). A malformed or oversized
//! block closes the connection, as h2's own connection errors do. A stream
//! that does not start with the HTTP/2 preface is passed through for h2 to
//! refuse.

use loona_hpack::{Decoder, Encoder};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface (RFC 7540 §3.5).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The frame size every HTTP/2 peer accepts (SETTINGS_MAX_FRAME_SIZE's
/// minimum and h2's default): re-encoded blocks are cut to it.
const FRAME_MAX: usize = 16_384;
/// The largest encoded header block accepted (all of its frames).
pub const MAX_BLOCK_BYTES: usize = 64 * 1024;
/// The largest decoded header list accepted (RFC 7540 §6.5.2 sizes).
pub const MAX_HEADER_LIST_BYTES: usize = 64 * 1024;
/// HPACK's dynamic table size (SETTINGS_HEADER_TABLE_SIZE's default, which
/// h2 advertises): the client encodes against at most this much.
const TABLE_BYTES: usize = 4096;
/// What an invalid `:authority` becomes.
const LOCAL: &[u8] = b"localhost";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AuthorityError {
    #[error("HTTP/2 header block over {MAX_BLOCK_BYTES} bytes (stream {stream})")]
    BlockTooLarge { stream: u32 },
    #[error("HTTP/2 header list over {MAX_HEADER_LIST_BYTES} bytes decoded (stream {stream})")]
    ListTooLarge { stream: u32 },
    #[error("HTTP/2 frame of type {got:#x} where stream {stream}'s CONTINUATION was due")]
    ContinuationExpected { stream: u32, got: u8 },
    #[error("HTTP/2 HEADERS frame on stream {stream} with bad padding or priority fields")]
    BadPadding { stream: u32 },
    #[error("HPACK decoding failed on stream {stream}: {reason}")]
    Hpack { stream: u32, reason: String },
}

/// Where the byte stream is.
#[derive(Debug)]
enum State {
    /// Matching the preface: this many bytes matched so far.
    Preface(usize),
    /// Not HTTP/2 (or not ours to judge): bytes pass unchanged.
    Raw,
    /// Reading a frame header into `head`.
    Head,
    /// Passing `left` payload bytes of a frame through.
    Pass { left: usize },
    /// Collecting a HEADERS or CONTINUATION payload of `len` bytes.
    Collect { len: usize },
}

/// The client-to-server rewriter, independent of I/O (so it can be fuzzed):
/// bytes in, bytes out.
pub struct Rewriter {
    state: State,
    head: Vec<u8>,
    payload: Vec<u8>,
    /// The header block being gathered: its stream, its HEADERS flags, and
    /// its fragments so far.
    block: Option<(u32, u8, Vec<u8>)>,
    decoder: Decoder<'static>,
    encoder: Encoder<'static>,
    /// How many `:authority` values were replaced.
    pub rewritten: u64,
}

impl Default for Rewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl Rewriter {
    pub fn new() -> Rewriter {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_BYTES);
        Rewriter {
            state: State::Preface(0),
            head: Vec::with_capacity(FRAME_HEADER),
            payload: Vec::new(),
            block: None,
            decoder,
            encoder: Encoder::new(),
            rewritten: 0,
        }
    }

    /// Consumes `input`, appending what h2 should read to `out`.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), AuthorityError> {
        while !input.is_empty() {
            match self.state {
                State::Raw => {
                    out.extend_from_slice(input);
                    return Ok(());
                }
                State::Preface(seen) => {
                    let n = (PREFACE.len() - seen).min(input.len());
                    if input[..n] == PREFACE[seen..seen + n] {
                        out.extend_from_slice(&input[..n]);
                        input = &input[n..];
                        self.state = if seen + n == PREFACE.len() {
                            State::Head
                        } else {
                            State::Preface(seen + n)
                        };
                    } else {
                        // Not the preface: h2 answers it (and closes).
                        self.state = State::Raw;
                    }
                }
                State::Head => {
                    let n = (FRAME_HEADER - self.head.len()).min(input.len());
                    self.head.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if self.head.len() == FRAME_HEADER {
                        self.frame_start(out)?;
                    }
                }
                State::Pass { left } => {
                    let n = left.min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.state = if n == left {
                        State::Head
                    } else {
                        State::Pass { left: left - n }
                    };
                }
                State::Collect { len } => {
                    let n = (len - self.payload.len()).min(input.len());
                    self.payload.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if self.payload.len() == len {
                        self.frame_end(out)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A frame header is complete: pass the frame on or start collecting it.
    fn frame_start(&mut self, out: &mut Vec<u8>) -> Result<(), AuthorityError> {
        let h = &self.head;
        let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        let (kind, stream) = (h[3], stream_id(h));
        if let Some((want, ..)) = self.block
            && (kind != CONTINUATION || stream != want)
        {
            return Err(AuthorityError::ContinuationExpected {
                stream: want,
                got: kind,
            });
        }
        if kind == HEADERS || kind == CONTINUATION && self.block.is_some() {
            let so_far = self.block.as_ref().map_or(0, |b| b.2.len());
            if so_far + len > MAX_BLOCK_BYTES + 256 + 5 {
                return Err(AuthorityError::BlockTooLarge { stream });
            }
            self.payload.clear();
            self.state = State::Collect { len };
            if len == 0 {
                self.frame_end(out)?;
            }
        } else {
            out.extend_from_slice(&self.head);
            self.head.clear();
            self.state = if len == 0 {
                State::Head
            } else {
                State::Pass { left: len }
            };
        }
        Ok(())
    }

    /// A HEADERS or CONTINUATION payload is complete.
    fn frame_end(&mut self, out: &mut Vec<u8>) -> Result<(), AuthorityError> {
        let (kind, flags, stream) = (self.head[3], self.head[4], stream_id(&self.head));
        self.head.clear();
        self.state = State::Head;
        let mut frag: &[u8] = &self.payload;
        if kind == HEADERS {
            if flags & PADDED != 0 {
                let (&pad, rest) = frag
                    .split_first()
                    .ok_or(AuthorityError::BadPadding { stream })?;
                let keep = rest
                    .len()
                    .checked_sub(usize::from(pad))
                    .ok_or(AuthorityError::BadPadding { stream })?;
                frag = &rest[..keep];
            }
            if flags & PRIORITY != 0 {
                // Stream dependency and weight: deprecated (RFC 9113 §5.3.2),
                // and h2 ignores them.
                frag = frag.get(5..).ok_or(AuthorityError::BadPadding { stream })?;
            }
            self.block = Some((stream, flags, Vec::with_capacity(frag.len())));
        }
        let Some((_, first_flags, block)) = self.block.as_mut() else {
            unreachable!("a CONTINUATION is collected only inside a block");
        };
        block.extend_from_slice(frag);
        if block.len() > MAX_BLOCK_BYTES {
            return Err(AuthorityError::BlockTooLarge { stream });
        }
        let end_stream = *first_flags & END_STREAM;
        if flags & END_HEADERS == 0 {
            return Ok(());
        }
        let (_, _, block) = self.block.take().expect("checked above");
        let encoded = self.reencode(stream, &block)?;
        write_block(stream, end_stream, &encoded, out);
        Ok(())
    }

    /// Decodes a complete header block, repairs `:authority`, encodes it
    /// again for h2.
    fn reencode(&mut self, stream: u32, block: &[u8]) -> Result<Vec<u8>, AuthorityError> {
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut size = 0usize;
        let mut over = false;
        self.decoder
            .decode_with_cb(block, |name, value| {
                size += name.len() + value.len() + 32;
                over |= size > MAX_HEADER_LIST_BYTES;
                if !over {
                    fields.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(|e| AuthorityError::Hpack {
                stream,
                reason: format!("{e:?}"),
            })?;
        if over {
            return Err(AuthorityError::ListTooLarge { stream });
        }
        for (name, value) in &mut fields {
            if name == b":authority" && http::uri::Authority::try_from(value.as_slice()).is_err() {
                *value = LOCAL.to_vec();
                self.rewritten += 1;
            }
        }
        Ok(self
            .encoder
            .encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice()))))
    }
}

fn stream_id(head: &[u8]) -> u32 {
    u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff
}

/// `block` as a HEADERS frame and as many CONTINUATIONs as it needs.
fn write_block(stream: u32, end_stream: u8, block: &[u8], out: &mut Vec<u8>) {
    let mut chunks = block.chunks(FRAME_MAX).peekable();
    let mut kind = HEADERS;
    let mut flags = end_stream;
    if chunks.peek().is_none() {
        frame(out, HEADERS, flags | END_HEADERS, stream, &[]);
        return;
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        frame(
            out,
            kind,
            flags | if last { END_HEADERS } else { 0 },
            stream,
            chunk,
        );
        (kind, flags) = (CONTINUATION, 0);
    }
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// A connection whose client-to-server bytes pass through a [`Rewriter`];
/// writes go straight to the inner stream.
pub struct AuthorityFix<S> {
    inner: S,
    rewriter: Rewriter,
    /// Rewritten bytes not yet read, from `at`.
    out: Vec<u8>,
    at: usize,
    raw: Box<[u8]>,
    logged: bool,
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        AuthorityFix {
            inner,
            rewriter: Rewriter::new(),
            out: Vec::new(),
            at: 0,
            raw: vec![0u8; 16 * 1024].into_boxed_slice(),
            logged: false,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.at < this.out.len() {
                let n = (this.out.len() - this.at).min(buf.remaining());
                buf.put_slice(&this.out[this.at..this.at + n]);
                this.at += n;
                if this.at == this.out.len() {
                    this.out.clear();
                    this.at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut rb = ReadBuf::new(&mut this.raw);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                return Poll::Ready(Ok(())); // end of stream
            }
            if let Err(e) = this.rewriter.feed(&this.raw[..n], &mut this.out) {
                crate::debug!("closing a gRPC connection: {e}");
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
            if this.rewriter.rewritten > 0 && !this.logged {
                this.logged = true;
                crate::debug!("a gRPC client sent an invalid :authority; served as localhost");
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for AuthorityFix<tokio::net::UnixStream> {
    type ConnectInfo = tonic::transport::server::UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client's request headers, HPACK-encoded by an encoder of the test's.
    fn headers(enc: &mut Encoder<'_>, authority: &[u8]) -> Vec<u8> {
        enc.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", b"/grpc.health.v1.Health/Check"),
            (b":authority", authority),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ])
    }

    /// The frames h2 would read for `input`, split into `(type, flags,
    /// stream, payload)`, after the preface.
    fn frames(out: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert_eq!(&out[..24], PREFACE);
        let mut v = Vec::new();
        let mut b = &out[24..];
        while !b.is_empty() {
            let len = usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]);
            v.push((b[3], b[4], stream_id(b), b[9..9 + len].to_vec()));
            b = &b[9 + len..];
        }
        v
    }

    /// Feeds `input` in pieces of `step` bytes.
    fn run(input: &[u8], step: usize) -> (Vec<u8>, Rewriter) {
        let mut rw = Rewriter::new();
        let mut out = Vec::new();
        for piece in input.chunks(step) {
            rw.feed(piece, &mut out).unwrap();
        }
        (out, rw)
    }

    #[test]
    fn invalid_authorities_become_localhost_and_the_rest_is_kept() {
        let mut enc = Encoder::new();
        let mut input = PREFACE.to_vec();
        frame(&mut input, 0x4, 0, 0, &[0, 3, 0, 0, 0, 100]); // SETTINGS
        // Three requests: percent-encoded path (grpcio), raw path (grpc-java),
        // a valid authority; the second and third reuse the client's table.
        let authorities: [&[u8]; 4] = [
            b"tmp%2Fx%2Flfmd.sock",
            b"/tmp/x/lfmd.sock",
            b"localhost:50051",
            b"tmp%2Fx%2Flfmd.sock",
        ];
        for (i, a) in authorities.iter().enumerate() {
            let stream = 1 + 2 * i as u32;
            frame(
                &mut input,
                HEADERS,
                END_HEADERS,
                stream,
                &headers(&mut enc, a),
            );
            frame(&mut input, 0x0, END_STREAM, stream, b"\0\0\0\0\0");
        }
        for step in [1, 7, 4096] {
            let (out, rw) = run(&input, step);
            assert_eq!(rw.rewritten, 3);
            let fs = frames(&out);
            assert_eq!(fs.len(), 9);
            assert_eq!(
                (fs[0].0, fs[0].3.as_slice()),
                (0x4, &[0, 3, 0, 0, 0, 100][..])
            );
            // h2's side: decode what we wrote with a fresh decoder.
            let mut dec = Decoder::new();
            for (i, want) in [
                &b"localhost"[..],
                b"localhost",
                b"localhost:50051",
                b"localhost",
            ]
            .iter()
            .enumerate()
            {
                let (kind, flags, stream, block) = &fs[1 + 2 * i];
                assert_eq!(
                    (*kind, *flags, *stream),
                    (HEADERS, END_HEADERS, 1 + 2 * i as u32)
                );
                let got = dec.decode(block).unwrap();
                let auth = got.iter().find(|(n, _)| n == b":authority").unwrap();
                assert_eq!(auth.1, *want);
                assert!(
                    got.iter()
                        .any(|(n, v)| n == b":path" && v == b"/grpc.health.v1.Health/Check")
                );
                assert_eq!(got.len(), 6);
                let data = &fs[2 + 2 * i];
                assert_eq!(
                    (data.0, data.1, data.3.as_slice()),
                    (0x0, END_STREAM, &b"\0\0\0\0\0"[..])
                );
            }
        }
    }

    #[test]
    fn padding_priority_and_continuations_are_undone_and_end_stream_kept() {
        let mut enc = Encoder::new();
        let block = headers(&mut enc, b"/raw/path.sock");
        let (a, b) = block.split_at(10);
        let mut payload = vec![3u8]; // pad length
        payload.extend_from_slice(&[0, 0, 0, 0, 16]); // priority
        payload.extend_from_slice(a);
        payload.extend_from_slice(&[0, 0, 0]);
        let mut input = PREFACE.to_vec();
        frame(
            &mut input,
            HEADERS,
            PADDED | PRIORITY | END_STREAM,
            5,
            &payload,
        );
        frame(&mut input, CONTINUATION, END_HEADERS, 5, b);
        let (out, rw) = run(&input, 3);
        assert_eq!(rw.rewritten, 1);
        let fs = frames(&out);
        assert_eq!(fs.len(), 1);
        assert_eq!(
            (fs[0].0, fs[0].1, fs[0].2),
            (HEADERS, END_STREAM | END_HEADERS, 5)
        );
        let got = Decoder::new().decode(&fs[0].3).unwrap();
        assert!(got.contains(&(b":authority".to_vec(), b"localhost".to_vec())));
    }

    #[test]
    fn a_large_block_is_cut_into_continuations() {
        let mut enc = Encoder::new();
        let big = vec![b'a'; 40_000];
        let block = enc.encode([(&b":authority"[..], &b"/x"[..]), (b"x-big", &big)]);
        let mut input = PREFACE.to_vec();
        let (a, b) = block.split_at(16_000);
        frame(&mut input, HEADERS, 0, 1, a);
        frame(&mut input, CONTINUATION, END_HEADERS, 1, b);
        let fs = frames(&run(&input, 5000).0);
        let kinds: Vec<(u8, u8)> = fs.iter().map(|f| (f.0, f.1)).collect();
        assert_eq!(
            kinds,
            [(HEADERS, 0), (CONTINUATION, 0), (CONTINUATION, END_HEADERS)]
        );
        assert!(fs.iter().all(|f| f.3.len() <= FRAME_MAX));
        let joined: Vec<u8> = fs.iter().flat_map(|f| f.3.clone()).collect();
        let got = Decoder::new().decode(&joined).unwrap();
        assert_eq!(got[0].1, b"localhost");
        assert_eq!(got[1].1, big);
    }

    #[test]
    fn bad_input_is_an_error_or_passes_through() {
        let err = |input: &[u8]| {
            let mut out = Vec::new();
            Rewriter::new().feed(input, &mut out).unwrap_err()
        };
        // Not HTTP/2: passed through untouched for h2 to refuse.
        let (out, _) = run(b"GET / HTTP/1.1\r\n\r\n", 2);
        assert_eq!(out, b"GET / HTTP/1.1\r\n\r\n");
        let mut input = PREFACE.to_vec();
        frame(&mut input, HEADERS, 0, 1, &[0x82]);
        frame(&mut input, 0x0, 0, 1, b"x");
        assert_eq!(
            err(&input),
            AuthorityError::ContinuationExpected { stream: 1, got: 0 }
        );
        let mut input = PREFACE.to_vec();
        frame(&mut input, HEADERS, PADDED | END_HEADERS, 1, &[9, 0x82]);
        assert_eq!(err(&input), AuthorityError::BadPadding { stream: 1 });
        let mut input = PREFACE.to_vec();
        frame(
            &mut input,
            HEADERS,
            END_HEADERS,
            3,
            &[0xff, 0xff, 0xff, 0xff, 0x0f],
        );
        assert!(matches!(
            err(&input),
            AuthorityError::Hpack { stream: 3, .. }
        ));
        // One block past the limit, announced in a frame header.
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&[0x02, 0x00, 0x00, HEADERS, 0, 0, 0, 0, 1]);
        assert_eq!(err(&input), AuthorityError::BlockTooLarge { stream: 1 });
        // A small block that decodes to a huge list (one indexed field of
        // 4 KB repeated): refused by its decoded size.
        let mut enc = Encoder::new();
        let mut block = enc.encode([(&b"x-a"[..], &vec![b'v'; 4000][..])]);
        let again = enc.encode([(&b"x-a"[..], &vec![b'v'; 4000][..])]);
        for _ in 0..20 {
            block.extend_from_slice(&again);
        }
        let mut input = PREFACE.to_vec();
        frame(&mut input, HEADERS, END_HEADERS, 1, &block);
        assert_eq!(err(&input), AuthorityError::ListTooLarge { stream: 1 });
    }

    /// What grpcio 1.85 sent to a Unix socket for two health checks
    /// (captured; also the fuzz target's seed): its literal `:authority`
    /// goes into its HPACK table, the second request names it by index.
    const GRPCIO: &[u8] = include_bytes!("../fuzz/corpus/authority/grpcio-1.85-health");

    #[test]
    fn a_real_grpcio_stream_gets_localhost_in_both_requests() {
        let (out, rw) = run(GRPCIO, 13);
        assert_eq!(rw.rewritten, 2);
        let mut dec = Decoder::new();
        let mut seen = 0;
        for (kind, _, stream, block) in frames(&out) {
            if kind == HEADERS {
                let got = dec.decode(&block).unwrap();
                let get = |n: &[u8]| got.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
                assert_eq!(
                    get(b":authority").as_deref(),
                    Some(&b"localhost"[..]),
                    "stream {stream}"
                );
                assert_eq!(
                    get(b":path").as_deref(),
                    Some(&b"/grpc.health.v1.Health/Check"[..])
                );
                seen += 1;
            }
        }
        assert_eq!(seen, 2);
    }

    proptest::proptest! {
        /// However the bytes are split into reads, h2 sees the same stream
        /// (or the same error), for real traffic with bytes changed.
        #[test]
        fn chunking_never_changes_the_output(
            step in 1usize..600,
            flips in proptest::collection::vec((0usize..GRPCIO.len(), proptest::num::u8::ANY), 0..4),
        ) {
            let mut input = GRPCIO.to_vec();
            for (at, b) in flips {
                input[at] = b;
            }
            let feed = |step: usize| {
                let mut rw = Rewriter::new();
                let mut out = Vec::new();
                for piece in input.chunks(step) {
                    if let Err(e) = rw.feed(piece, &mut out) {
                        return (out, Some(e));
                    }
                }
                (out, None)
            };
            let (whole, e1) = feed(input.len());
            let (split, e2) = feed(step);
            proptest::prop_assert_eq!(&e1, &e2);
            if e1.is_none() {
                proptest::prop_assert_eq!(whole, split);
            }
        }
    }
}
