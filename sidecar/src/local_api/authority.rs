//! Any `:authority` on the local socket.
//!
//! A Unix socket has no host, so stock gRPC clients put something else in
//! HTTP/2's `:authority`: Python's `grpcio` (gRPC core ≥ 1.57) the socket
//! path percent-encoded (`tmp%2Fapp%2Fsidecar.sock`), grpc-java the bare path
//! (`/secrets/.sidecar.sock`). `h2`, under hyper and tonic, parses every
//! request's `:authority` as an `http::uri::Authority` while it decodes the
//! HEADERS frame, and answers one that does not parse (a `%` outside a
//! userinfo or IPv6 zone, a `/`, an empty value) with `RST_STREAM
//! PROTOCOL_ERROR` before hyper, tonic or this service sees the request
//! (hyperium/h2#487, grpc/grpc#38142). Nothing above `h2` can relax that.
//!
//! The host carries no meaning here (callers are told apart by their UID,
//! `SO_PEERCRED`), so [`AuthorityFix`] sits between the socket and `h2` and
//! rewrites an `:authority` that `h2` would refuse, leaving every other byte
//! as the client sent it. It reads the client's HTTP/2 frames and decodes
//! the HPACK of each header block just enough to find `:authority` fields
//! (RFC 7541: integers, string lengths, Huffman, a shadow of the dynamic
//! table's names and sizes):
//!
//! - a literal field that is not indexed gets `localhost`;
//! - a literal field with incremental indexing gets the same number of
//!   octets with every character that an authority cannot hold replaced by
//!   `_` (`tmp_2Fapp_2Fsidecar.sock`): the entry `h2` adds to its dynamic
//!   table then has the size the client's encoder counts, so both tables
//!   evict alike and later references to the entry resolve to the
//!   rewritten value;
//! - the static table's empty `:authority` (index 1) becomes a literal
//!   `localhost`, not indexed.
//!
//! A block it cannot parse is passed on unchanged, and so is everything
//! after it: `h2` then fails the connection as it would have anyway.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface, passed on as it is.
const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
/// The frame size `h2` allows a client (SETTINGS_MAX_FRAME_SIZE; tonic and
/// hyper keep the protocol's default). Rewritten blocks are cut to it.
const MAX_FRAME: usize = 16_384;
/// The most header-block octets buffered for one request: twice what `h2`
/// accepts (hyper's header list limit, 16 KiB, bounds the decoded fields,
/// and an encoder Huffman-codes a string only when that makes it shorter).
/// Beyond it the rewriting stops and `h2` refuses the block itself; this
/// bounds what one connection can make the filter hold (the block, and the
/// frames as received).
const MAX_BLOCK: usize = 32 * 1024;
/// SETTINGS_HEADER_TABLE_SIZE of the server (`h2`'s default, unchanged by
/// hyper and tonic): the largest dynamic table the client may ask for.
const TABLE_SIZE: usize = 4096;

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// What replaces an `:authority` that is not indexed (gRPC's convention for
/// Unix sockets, and what grpc-go sends).
const LOCALHOST: &[u8] = b"localhost";

/// A socket whose incoming HTTP/2 `:authority` fields always parse (see the
/// module's doc). Writes pass through untouched.
pub(super) struct AuthorityFix<S> {
    inner: S,
    /// Bytes read from the socket, not yet passed on.
    raw: BytesMut,
    /// Bytes ready for `h2`.
    ready: BytesMut,
    filter: Filter,
    eof: bool,
}

impl<S> AuthorityFix<S> {
    pub(super) fn new(inner: S) -> AuthorityFix<S> {
        AuthorityFix {
            inner,
            raw: BytesMut::new(),
            ready: BytesMut::new(),
            filter: Filter::default(),
            eof: false,
        }
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
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                if this.ready.is_empty() && this.ready.capacity() > 4 * MAX_FRAME {
                    this.ready = BytesMut::new();
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // A frame cut short by the peer: hand over what there is.
                if !this.raw.is_empty() {
                    this.ready = this.raw.split();
                    continue;
                }
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                this.eof = true;
            } else {
                this.raw.extend_from_slice(read.filled());
                this.filter.process(&mut this.raw, &mut this.ready);
                if this.raw.is_empty() && this.raw.capacity() > 4 * MAX_FRAME {
                    this.raw = BytesMut::new();
                }
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

/// The frame-level state of one connection's client-to-server direction.
#[derive(Default)]
struct Filter {
    preface_done: bool,
    /// Something could not be parsed: pass everything on as it comes.
    passthrough: bool,
    /// A header block waiting for its CONTINUATION frames.
    pending: Option<Pending>,
    table: Table,
}

struct Pending {
    stream_id: u32,
    /// The HEADERS frame's flags, less PADDED and END_HEADERS.
    flags: u8,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
    /// The frames as received, passed on when the block needs no change.
    original: Vec<u8>,
}

impl Filter {
    /// Moves every complete frame from `raw` to `out`, rewritten where needed.
    fn process(&mut self, raw: &mut BytesMut, out: &mut BytesMut) {
        if self.passthrough {
            out.extend_from_slice(&raw.split());
            return;
        }
        if !self.preface_done {
            if raw.len() < PREFACE_LEN {
                return;
            }
            out.extend_from_slice(&raw.split_to(PREFACE_LEN));
            self.preface_done = true;
        }
        while raw.len() >= FRAME_HEADER_LEN {
            let len =
                (usize::from(raw[0]) << 16) | (usize::from(raw[1]) << 8) | usize::from(raw[2]);
            if len > MAX_FRAME {
                // h2 refuses it (FRAME_SIZE_ERROR); nothing to rewrite.
                self.give_up(raw, out);
                return;
            }
            if raw.len() < FRAME_HEADER_LEN + len {
                return;
            }
            let frame = raw.split_to(FRAME_HEADER_LEN + len);
            let (kind, flags) = (frame[3], frame[4]);
            let stream_id =
                u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
            let payload = &frame[FRAME_HEADER_LEN..];
            match (kind, self.pending.take()) {
                (HEADERS, None) => {
                    let Some((priority, fragment)) = headers_payload(flags, payload) else {
                        out.extend_from_slice(&frame);
                        self.give_up(raw, out);
                        return;
                    };
                    let pending = Pending {
                        stream_id,
                        flags: flags & !(PADDED | END_HEADERS),
                        priority,
                        block: fragment.to_vec(),
                        original: frame.to_vec(),
                    };
                    self.continue_block(pending, flags & END_HEADERS != 0, raw, out);
                }
                (CONTINUATION, Some(mut pending)) if pending.stream_id == stream_id => {
                    pending.block.extend_from_slice(payload);
                    pending.original.extend_from_slice(&frame);
                    self.continue_block(pending, flags & END_HEADERS != 0, raw, out);
                }
                (_, Some(pending)) => {
                    // Anything but its CONTINUATION inside a header block is a
                    // connection error for h2 to raise.
                    out.extend_from_slice(&pending.original);
                    out.extend_from_slice(&frame);
                    self.give_up(raw, out);
                    return;
                }
                (_, None) => out.extend_from_slice(&frame),
            }
            if self.passthrough {
                return;
            }
        }
    }

    fn continue_block(
        &mut self,
        pending: Pending,
        end_headers: bool,
        raw: &mut BytesMut,
        out: &mut BytesMut,
    ) {
        if !end_headers {
            if pending.block.len() > MAX_BLOCK {
                out.extend_from_slice(&pending.original);
                self.give_up(raw, out);
            } else {
                self.pending = Some(pending);
            }
            return;
        }
        match self.table.fix_block(&pending.block) {
            Ok(None) => out.extend_from_slice(&pending.original),
            Ok(Some(block)) => write_headers(&pending, &block, out),
            Err(Malformed) => {
                out.extend_from_slice(&pending.original);
                self.give_up(raw, out);
            }
        }
    }

    fn give_up(&mut self, raw: &mut BytesMut, out: &mut BytesMut) {
        self.passthrough = true;
        self.pending = None;
        out.extend_from_slice(&raw.split());
    }
}

/// The priority fields and the block fragment of a HEADERS payload, without
/// padding; `None` when the payload is shorter than its flags say.
fn headers_payload(flags: u8, payload: &[u8]) -> Option<(Option<[u8; 5]>, &[u8])> {
    let mut p = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        pad = usize::from(*p.first()?);
        p = &p[1..];
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        priority = Some(<[u8; 5]>::try_from(p.get(..5)?).ok()?);
        p = &p[5..];
    }
    let end = p.len().checked_sub(pad)?;
    Some((priority, &p[..end]))
}

/// A rewritten block as one HEADERS frame and as many CONTINUATION frames as
/// it needs.
fn write_headers(pending: &Pending, block: &[u8], out: &mut BytesMut) {
    let prefix = if pending.priority.is_some() { 5 } else { 0 };
    let first = block.len().min(MAX_FRAME - prefix);
    let frame_header = |out: &mut BytesMut, len: usize, kind: u8, flags: u8| {
        out.put_uint(len as u64, 3);
        out.put_u8(kind);
        out.put_u8(flags);
        out.put_u32(pending.stream_id);
    };
    let mut flags = pending.flags;
    if first == block.len() {
        flags |= END_HEADERS;
    }
    frame_header(out, prefix + first, HEADERS, flags);
    if let Some(p) = &pending.priority {
        out.extend_from_slice(p);
    }
    out.extend_from_slice(&block[..first]);
    let mut rest = &block[first..];
    while !rest.is_empty() {
        let n = rest.len().min(MAX_FRAME);
        let flags = if n == rest.len() { END_HEADERS } else { 0 };
        frame_header(out, n, CONTINUATION, flags);
        out.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
    }
}

/// A header block that does not decode: h2 refuses it too.
#[derive(Debug, PartialEq, Eq)]
struct Malformed;

/// What the client's HPACK encoder and h2's decoder hold in the dynamic
/// table, as far as it matters here: each entry's size, its name's length and
/// whether it is `:authority`. Newest first.
struct Table {
    entries: VecDeque<Entry>,
    size: usize,
    max: usize,
}

#[derive(Clone, Copy)]
struct Entry {
    name_len: usize,
    size: usize,
    authority: bool,
}

impl Default for Table {
    fn default() -> Table {
        Table {
            entries: VecDeque::new(),
            size: 0,
            max: TABLE_SIZE,
        }
    }
}

/// The names of RFC 7541's static table (Appendix A), indexes 1 to 61.
const STATIC_NAMES: [&str; 61] = [
    ":authority",
    ":method",
    ":method",
    ":path",
    ":path",
    ":scheme",
    ":scheme",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "accept",
    "access-control-allow-origin",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "content-disposition",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-range",
    "content-type",
    "cookie",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "link",
    "location",
    "max-forwards",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "refresh",
    "retry-after",
    "server",
    "set-cookie",
    "strict-transport-security",
    "transfer-encoding",
    "user-agent",
    "vary",
    "via",
    "www-authenticate",
];

/// How a literal field is represented (RFC 7541 §6.2).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Literal {
    Incremental,
    NotIndexed,
}

impl Table {
    /// (name length, is `:authority`) of the entry at HPACK index `index`.
    fn name(&self, index: usize) -> Result<(usize, bool), Malformed> {
        match index {
            0 => Err(Malformed),
            1..=61 => Ok((STATIC_NAMES[index - 1].len(), index == 1)),
            _ => self
                .entries
                .get(index - 62)
                .map(|e| (e.name_len, e.authority))
                .ok_or(Malformed),
        }
    }

    fn insert(&mut self, entry: Entry) {
        while self.size + entry.size > self.max {
            match self.entries.pop_back() {
                Some(old) => self.size -= old.size,
                None => return, // larger than the whole table: not added
            }
        }
        self.size += entry.size;
        self.entries.push_front(entry);
    }

    fn resize(&mut self, max: usize) -> Result<(), Malformed> {
        if max > TABLE_SIZE {
            return Err(Malformed);
        }
        self.max = max;
        while self.size > self.max {
            if let Some(old) = self.entries.pop_back() {
                self.size -= old.size;
            }
        }
        Ok(())
    }

    /// The block with every `:authority` that h2 would refuse rewritten, or
    /// `None` when it needs no change. Keeps the table in step either way.
    fn fix_block(&mut self, block: &[u8]) -> Result<Option<Vec<u8>>, Malformed> {
        let mut out: Option<Vec<u8>> = None;
        // Bytes of `block` before `copied` are already in `out`.
        let mut copied = 0;
        let mut i = 0;
        while i < block.len() {
            let start = i;
            let b = block[i];
            if b & 0x80 != 0 {
                let index = integer(block, &mut i, 7)?;
                let (_, authority) = self.name(index)?;
                if authority && index == 1 {
                    // The static entry's empty authority: a literal instead.
                    let out = out.get_or_insert_with(Vec::new);
                    out.extend_from_slice(&block[copied..start]);
                    out.push(0x01); // without indexing, name: static index 1
                    string_raw(out, LOCALHOST);
                    copied = i;
                }
                continue;
            }
            if b & 0xe0 == 0x20 {
                let max = integer(block, &mut i, 5)?;
                self.resize(max)?;
                continue;
            }
            let (literal, prefix) = if b & 0xc0 == 0x40 {
                (Literal::Incremental, 6)
            } else {
                (Literal::NotIndexed, 4)
            };
            let index = integer(block, &mut i, prefix)?;
            let (name_len, authority) = if index == 0 {
                let name = string(block, &mut i)?;
                (name.len(), name == b":authority")
            } else {
                self.name(index)?
            };
            let value_start = i;
            let value = string(block, &mut i)?;
            let replacement = if authority && !authority_parses(&value) {
                match literal {
                    Literal::NotIndexed => Some(LOCALHOST.to_vec()),
                    Literal::Incremental => Some(sanitized(&value)).filter(|v| authority_parses(v)),
                }
            } else {
                None
            };
            if let Some(new) = replacement {
                let out = out.get_or_insert_with(Vec::new);
                out.extend_from_slice(&block[copied..value_start]);
                string_raw(out, &new);
                copied = i;
            }
            if literal == Literal::Incremental {
                self.insert(Entry {
                    name_len,
                    size: name_len + value.len() + 32,
                    authority,
                });
            }
        }
        Ok(out.map(|mut out| {
            out.extend_from_slice(&block[copied..]);
            out
        }))
    }
}

/// Whether h2 accepts `value` as a request's `:authority`: the very check it
/// makes.
fn authority_parses(value: &[u8]) -> bool {
    hyper::http::uri::Authority::try_from(value).is_ok()
}

/// `value` with each octet an authority cannot hold replaced by `_`: the
/// same length, so the dynamic-table entry keeps its size.
fn sanitized(value: &[u8]) -> Vec<u8> {
    value
        .iter()
        .map(|&c| {
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                c
            } else {
                b'_'
            }
        })
        .collect()
}

/// An HPACK integer with an `n`-bit prefix at `*i` (RFC 7541 §5.1).
fn integer(block: &[u8], i: &mut usize, n: u8) -> Result<usize, Malformed> {
    let mask = ((1u16 << n) - 1) as u8;
    let mut value = usize::from(*block.get(*i).ok_or(Malformed)? & mask);
    *i += 1;
    if value < usize::from(mask) {
        return Ok(value);
    }
    let mut shift = 0;
    loop {
        let b = *block.get(*i).ok_or(Malformed)?;
        *i += 1;
        if shift > 28 {
            return Err(Malformed);
        }
        value += usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
}

/// An HPACK string literal at `*i`, decoded (RFC 7541 §5.2).
fn string(block: &[u8], i: &mut usize) -> Result<Vec<u8>, Malformed> {
    let huffman = *block.get(*i).ok_or(Malformed)? & 0x80 != 0;
    let len = integer(block, i, 7)?;
    let end = i.checked_add(len).ok_or(Malformed)?;
    let bytes = block.get(*i..end).ok_or(Malformed)?;
    *i = end;
    if huffman {
        huffman_decode(bytes)
    } else {
        Ok(bytes.to_vec())
    }
}

/// Appends `value` as a string literal without Huffman coding.
fn string_raw(out: &mut Vec<u8>, value: &[u8]) {
    let mut len = value.len();
    if len < 0x7f {
        out.push(len as u8);
    } else {
        out.push(0x7f);
        len -= 0x7f;
        while len >= 0x80 {
            out.push((len & 0x7f) as u8 | 0x80);
            len >>= 7;
        }
        out.push(len as u8);
    }
    out.extend_from_slice(value);
}

/// The length in bits of each symbol's code in HPACK's Huffman code (RFC
/// 7541 Appendix B), symbols 0 to 255 and EOS (256). The code is canonical:
/// codes of one length are consecutive in symbol order and each length's
/// first code follows the previous length's last, so the lengths define it.
const CODE_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
];

const MAX_CODE_LEN: usize = 30;
const EOS: u16 = 256;

/// The canonical code's decoding tables: for each length, its first code,
/// how many codes it has, and where its symbols start in [`Huffman::symbols`].
struct Huffman {
    first_code: [u32; MAX_CODE_LEN + 1],
    count: [u32; MAX_CODE_LEN + 1],
    offset: [u16; MAX_CODE_LEN + 1],
    /// Symbols by (code length, symbol).
    symbols: [u16; 257],
}

const HUFFMAN: Huffman = {
    let mut h = Huffman {
        first_code: [0; MAX_CODE_LEN + 1],
        count: [0; MAX_CODE_LEN + 1],
        offset: [0; MAX_CODE_LEN + 1],
        symbols: [0; 257],
    };
    let mut s = 0;
    while s < 257 {
        h.count[CODE_LENGTHS[s] as usize] += 1;
        s += 1;
    }
    let mut code = 0u32;
    let mut next = 0u16;
    let mut len = 1;
    while len <= MAX_CODE_LEN {
        h.first_code[len] = code;
        h.offset[len] = next;
        let mut s = 0;
        while s < 257 {
            if CODE_LENGTHS[s] as usize == len {
                h.symbols[next as usize] = s as u16;
                next += 1;
            }
            s += 1;
        }
        code = (code + h.count[len]) << 1;
        len += 1;
    }
    h
};

/// Decodes a Huffman-coded string; the padding must be at most 7 bits, all
/// ones (a prefix of EOS).
fn huffman_decode(bytes: &[u8]) -> Result<Vec<u8>, Malformed> {
    let mut out = Vec::with_capacity(bytes.len() * 8 / 5);
    let (mut code, mut len) = (0u32, 0usize);
    for &byte in bytes {
        for bit in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> bit) & 1);
            len += 1;
            let index = code.wrapping_sub(HUFFMAN.first_code[len]);
            if index < HUFFMAN.count[len] {
                let symbol = HUFFMAN.symbols[usize::from(HUFFMAN.offset[len]) + index as usize];
                if symbol == EOS {
                    return Err(Malformed);
                }
                out.push(symbol as u8);
                (code, len) = (0, 0);
            } else if len == MAX_CODE_LEN {
                return Err(Malformed);
            }
        }
    }
    if len > 7 || code != (1 << len) - 1 {
        return Err(Malformed);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn huffman_decodes_the_rfc_examples() {
        // RFC 7541 C.4 and C.6.
        for (coded, text) in [
            ("f1e3 c2e5 f23a 6ba0 ab90 f4ff", "www.example.com"),
            ("a8eb 1064 9cbf", "no-cache"),
            ("25a8 49e9 5ba9 7d7f", "custom-key"),
            ("25a8 49e9 5bb8 e8b4 bf", "custom-value"),
            ("6402", "302"),
            ("aec3 771a 4b", "private"),
            (
                "d07a be94 1054 d444 a820 0595 040b 8166 e082 a62d 1bff",
                "Mon, 21 Oct 2013 20:13:21 GMT",
            ),
            (
                "9d29 ad17 1863 c78f 0b97 c8e9 ae82 ae43 d3",
                "https://www.example.com",
            ),
        ] {
            assert_eq!(
                huffman_decode(&hex(coded)).unwrap(),
                text.as_bytes(),
                "{text}"
            );
        }
        // Padding longer than 7 bits, or not all ones, is an error.
        assert_eq!(huffman_decode(&hex("a8eb 1064 9cbf ff")), Err(Malformed));
        assert_eq!(huffman_decode(&hex("a8eb 1064 9cbe")), Err(Malformed));
    }

    #[test]
    fn the_code_lengths_make_a_complete_prefix_code() {
        // Kraft: a complete code sums to exactly 1.
        let sum: u64 = CODE_LENGTHS.iter().map(|&l| 1u64 << (30 - l)).sum();
        assert_eq!(sum, 1 << 30);
    }

    #[test]
    fn integers_decode_as_in_the_rfc() {
        // RFC 7541 C.1: 10 and 1337 with a 5-bit prefix, 42 with 8 bits.
        let mut i = 0;
        assert_eq!(integer(&[0x0a], &mut i, 5), Ok(10));
        let mut i = 0;
        assert_eq!(integer(&[0x1f, 0x9a, 0x0a], &mut i, 5), Ok(1337));
        assert_eq!(i, 3);
        let mut i = 0;
        assert_eq!(integer(&[0x2a], &mut i, 8), Ok(42));
        let mut i = 0;
        assert_eq!(integer(&[0x1f, 0x9a], &mut i, 5), Err(Malformed));
    }

    fn literal(prefix: u8, name: &[u8], value: &[u8]) -> Vec<u8> {
        let mut v = vec![prefix];
        string_raw(&mut v, name);
        string_raw(&mut v, value);
        v
    }

    /// What Python's grpcio sends: `:authority` as a new name, indexed.
    fn grpcio_block(path: &str) -> Vec<u8> {
        let mut b = literal(0x40, b":path", b"/secretbroker.v1.Secrets/List");
        b.extend(literal(0x40, b":authority", path.as_bytes()));
        b.extend([0x83, 0x86]); // :method POST, :scheme http
        b
    }

    #[test]
    fn an_indexed_authority_keeps_its_length_and_later_references_follow() {
        let mut t = Table::default();
        let block = grpcio_block("tmp%2Fapp%2Fsidecar.sock");
        let fixed = t.fix_block(&block).unwrap().expect("rewritten");
        assert_eq!(fixed.len(), block.len());
        let text = String::from_utf8_lossy(&fixed);
        assert!(text.contains("tmp_2Fapp_2Fsidecar.sock"), "{text}");
        assert!(text.contains("/secretbroker.v1.Secrets/List"));
        // The second call on the connection refers to both entries (62 is
        // the newest, :authority): nothing to rewrite.
        assert_eq!(t.fix_block(&[0xbe, 0xbf, 0x83, 0x86]), Ok(None));
        assert_eq!(t.entries.len(), 2);
        assert!(t.entries[0].authority && !t.entries[1].authority);
        assert_eq!(t.size, (10 + 24 + 32) + (5 + 29 + 32));
    }

    #[test]
    fn other_forms_of_a_bad_authority_become_localhost() {
        let mut t = Table::default();
        // Without indexing, name from the static table.
        let mut b = vec![0x01];
        string_raw(&mut b, b"/secrets/.sidecar.sock");
        let fixed = t.fix_block(&b).unwrap().unwrap();
        assert_eq!(fixed, [&[0x01, 9][..], b"localhost"].concat());
        // Never indexed, new name.
        let fixed = t
            .fix_block(&literal(0x10, b":authority", b"/x.sock"))
            .unwrap()
            .unwrap();
        assert!(fixed.ends_with(b"\x09localhost"), "{fixed:?}");
        // The static table's empty authority.
        let fixed = t.fix_block(&[0x83, 0x81, 0x86]).unwrap().unwrap();
        assert_eq!(
            fixed,
            [&[0x83, 0x01, 9][..], b"localhost", &[0x86]].concat()
        );
        assert!(t.entries.is_empty());
    }

    #[test]
    fn good_authorities_and_other_headers_pass_unchanged() {
        let mut t = Table::default();
        for block in [
            literal(0x40, b":authority", b"localhost"),
            literal(0x00, b":authority", b"local.sidecar:80"),
            literal(0x40, b"x-custom", b"/with/slashes%2F"),
            [&[0x41][..], &hex("8cf1e3c2e5f23a6ba0ab90f4ff")].concat(), // www.example.com, Huffman
        ] {
            assert_eq!(t.fix_block(&block), Ok(None));
        }
    }

    #[test]
    fn a_huffman_coded_bad_authority_is_rewritten_raw_with_its_decoded_length() {
        // "a/b" Huffman-coded: a=00011(5) /=011000(6) b=100011(6), then 7 ones.
        let mut t = Table::default();
        let block = [0x41, 0x83, 0x1b, 0x11, 0xff];
        assert_eq!(huffman_decode(&block[2..]).unwrap(), b"a/b");
        let fixed = t.fix_block(&block).unwrap().unwrap();
        assert_eq!(fixed, [0x41, 0x03, b'a', b'_', b'b']);
        assert_eq!(t.size, 10 + 3 + 32);
    }

    #[test]
    fn eviction_follows_the_clients_sizes() {
        let mut t = Table::default();
        t.fix_block(&[0x3f, 0x61]).unwrap(); // size update: 31 + 97 = 128
        assert_eq!(t.max, 128);
        let a = literal(0x40, b":authority", &b"a%".repeat(20)); // 10 + 40 + 32 = 82
        assert!(t.fix_block(&a).unwrap().is_some());
        let b = literal(0x40, b"x", b"y"); // 34: 82 + 34 > 128 after one more
        t.fix_block(&b).unwrap();
        t.fix_block(&b).unwrap();
        assert_eq!(t.entries.len(), 2, "the authority entry was evicted");
        assert!(!t.entries.iter().any(|e| e.authority));
        // An index past the table is malformed (h2 refuses it too).
        assert_eq!(t.fix_block(&[0xc0]), Err(Malformed));
        assert_eq!(
            t.fix_block(&[0x3f, 0xe2, 0x1f]),
            Err(Malformed),
            "over 4096"
        );
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        f.push(kind);
        f.push(flags);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn run(filter: &mut Filter, input: &[u8], chunk: usize) -> Vec<u8> {
        let mut raw = BytesMut::new();
        let mut out = BytesMut::new();
        for piece in input.chunks(chunk) {
            raw.extend_from_slice(piece);
            filter.process(&mut raw, &mut out);
        }
        assert!(raw.is_empty());
        out.to_vec()
    }

    #[test]
    fn frames_are_rewritten_across_continuations_padding_and_any_read_size() {
        let settings = frame(0x4, 0, 0, &[]);
        let block = grpcio_block("tmp%2Fapp%2Fsidecar.sock");
        // HEADERS (padded, with priority) carrying the first 10 octets, then
        // two CONTINUATIONs.
        let mut headers = vec![3];
        headers.extend_from_slice(&[0, 0, 0, 0, 16]);
        headers.extend_from_slice(&block[..10]);
        headers.extend_from_slice(&[0, 0, 0]);
        let input = [
            PREFACE,
            &settings,
            &frame(HEADERS, PADDED | PRIORITY | 0x1, 1, &headers),
            &frame(CONTINUATION, 0, 1, &block[10..30]),
            &frame(CONTINUATION, END_HEADERS, 1, &block[30..]),
            &frame(0x0, 0x1, 1, b"data"),
        ]
        .concat();
        let fixed_block = Table::default().fix_block(&block).unwrap().unwrap();
        let mut priority = vec![0, 0, 0, 0, 16];
        priority.extend_from_slice(&fixed_block);
        let expected = [
            PREFACE,
            &settings,
            &frame(HEADERS, PRIORITY | 0x1 | END_HEADERS, 1, &priority),
            &frame(0x0, 0x1, 1, b"data"),
        ]
        .concat();
        for chunk in [1, 7, 100, 10_000] {
            assert_eq!(
                run(&mut Filter::default(), &input, chunk),
                expected,
                "{chunk}"
            );
        }
    }

    #[test]
    fn a_rewritten_block_that_grows_is_cut_into_frames() {
        // A bad authority ("/x.sock", 7 octets, becomes "localhost", 9) and a
        // long header after it: the block no longer fits the frames it came in.
        let mut block = vec![0x01];
        string_raw(&mut block, b"/x.sock");
        let long = vec![b'v'; MAX_FRAME];
        block.extend(literal(0x00, b"x-long", &long));
        let mut frames = frame(HEADERS, 0, 3, &block[..MAX_FRAME - 1]);
        frames.extend(frame(CONTINUATION, END_HEADERS, 3, &block[MAX_FRAME - 1..]));
        let out = run(&mut Filter::default(), &[PREFACE, &frames].concat(), 4096);
        let mut rest = &out[PREFACE_LEN..];
        let (mut joined, mut kinds) = (Vec::new(), Vec::new());
        while !rest.is_empty() {
            let len =
                (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
            assert!(len <= MAX_FRAME);
            kinds.push((rest[3], rest[4] & END_HEADERS != 0, len));
            assert_eq!(&rest[5..9], &3u32.to_be_bytes());
            joined.extend_from_slice(&rest[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len]);
            rest = &rest[FRAME_HEADER_LEN + len..];
        }
        let total = block.len() + 2;
        assert_eq!(
            kinds,
            [
                (HEADERS, false, MAX_FRAME),
                (CONTINUATION, true, total - MAX_FRAME)
            ]
        );
        assert!(joined.starts_with(b"\x01\x09localhost\x00\x06x-long"));
        assert!(joined.ends_with(&long));
    }

    #[test]
    fn a_block_past_the_buffer_bound_passes_through() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            HEADERS,
            0,
            1,
            &literal(0x00, b":authority", b"/x.sock"),
        ));
        for _ in 0..=MAX_BLOCK / MAX_FRAME {
            input.extend(frame(CONTINUATION, 0, 1, &[0; MAX_FRAME]));
        }
        let mut filter = Filter::default();
        assert_eq!(run(&mut filter, &input, 8192), input);
        assert!(filter.passthrough && filter.pending.is_none());
    }

    #[test]
    fn what_cannot_be_parsed_passes_through_from_there_on() {
        let bad = frame(HEADERS, END_HEADERS, 1, &[0xc5]); // index past the table
        let later = frame(
            HEADERS,
            END_HEADERS,
            3,
            &literal(0x00, b":authority", b"/x.sock"),
        );
        let input = [PREFACE, &bad, &later].concat();
        assert_eq!(run(&mut Filter::default(), &input, 5), input);
        let huge = [PREFACE, &[0x01, 0, 0, 0, 0, 0, 0, 0, 1][..], b"more"].concat();
        assert_eq!(run(&mut Filter::default(), &huge, 3), huge);
    }

    proptest::proptest! {
        /// What any local process sends (the peer check comes after the
        /// HTTP/2 handshake) goes through without a panic, and a rewrite
        /// never makes the stream much longer than the client's.
        #[test]
        fn any_frames_pass_without_panic_and_stay_bounded(
            frames in proptest::collection::vec(
                (0u8..12, proptest::prelude::any::<u8>(), proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)),
                0..12,
            ),
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
            chunk in 1usize..97,
        ) {
            let mut input = PREFACE.to_vec();
            for (kind, flags, payload) in &frames {
                input.extend(frame(*kind, *flags, 1, payload));
            }
            input.extend(&tail);
            // Not `run`: a frame cut short or a block waiting for its
            // CONTINUATION stays in `raw`, as it would until more arrives.
            let (mut filter, mut raw, mut out) = (Filter::default(), BytesMut::new(), BytesMut::new());
            for piece in input.chunks(chunk) {
                raw.extend_from_slice(piece);
                filter.process(&mut raw, &mut out);
            }
            proptest::prop_assert!(raw.len() <= MAX_BLOCK + MAX_FRAME + FRAME_HEADER_LEN);
            proptest::prop_assert!(out.len() <= 2 * input.len() + 64, "{} -> {}", input.len(), out.len());
        }
    }
}
