//! One host's request/reply accounting, sans I/O: what to write next, and
//! which request each reply answers. Bytes in, bytes out, no sockets.
//!
//! The rules (DESIGN.md, "Sequencing rules"):
//! - a reply answers exactly one request, in order; a reply that cannot be
//!   the answer (none was due, or a merged `MGET` answered with another
//!   shape) puts the stream out of step: [`Pipeline::receive`] fails, and
//!   the caller closes the connection and rejects what was waiting;
//! - a new connection's handshake (AUTH or HELLO, then SELECT) goes out
//!   first, and requests are held until every handshake reply came back
//!   good: a failed AUTH or SELECT never lets a request run as another user
//!   or in another database. Pooled connections skip it;
//! - commands that do not answer exactly once (subscriptions, `MONITOR`,
//!   `CLIENT REPLY OFF|SKIP`, replication) are refused before they are
//!   queued ([`ConnEffect::Refused`]); RESP3 pushes are out of band and
//!   dropped, since no command that rb sends is answered by one;
//! - reads come in bounded steps ([`Pipeline::read_buffer`]), and the read
//!   buffer grows to what the pending reply needs, never by doubling past
//!   it; a reply past the host's `max_reply_bytes` or `max_reply_elements`
//!   is refused.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cmd::{cmd, Cmd, Common};
use crate::config::{HostInfo, Protocol};
use crate::error::{Error, HostName, Phase, Result};
use crate::promise::Outcomes;
use crate::resp::plain_bulk_header;
use crate::resp::{Frame, ReplyStream, Value};

mod batch;
use batch::Batcher;
pub(crate) use batch::{BatchKind, CmdName, Element, Expect, Waiter};

/// Buffered request bytes past which they are written while the caller is
/// still enqueuing.
pub(crate) const WRITE_THRESHOLD: usize = 64 * 1024;
/// The read buffer's first size, and the least it asks a read for.
const READ_CHUNK: usize = 64 * 1024;
/// Most bytes one read step takes, so deadlines are checked between steps
/// even while a peer sends at full speed.
pub(crate) const READ_STEP: usize = 256 * 1024;
/// The most the read buffer grows by at once (the zeroing of new room is
/// work done between two deadline checks).
const GROW_STEP: usize = 4 * 1024 * 1024;
/// Zeros to append as new read room (a copy, fast in any build).
static ZEROS: [u8; READ_CHUNK] = [0; READ_CHUNK];
/// A read buffer grown past this for one huge reply is given back after.
const KEEP_READ_BUFFER: usize = 1024 * 1024;

/// A connection's handshake: its bytes, and the replies still to check.
#[derive(Default)]
struct Handshake {
    bytes: Vec<u8>,
    written: usize,
    /// The handshake commands whose replies are still to come, in order.
    waiting: VecDeque<&'static str>,
}

impl Handshake {
    /// AUTH (or HELLO 3 with AUTH) and SELECT, as the host needs them.
    fn for_host(host: &HostInfo) -> Handshake {
        let mut hs = Handshake::default();
        let mut push = |c: Cmd, name: &'static str| {
            c.write_packed(&mut hs.bytes);
            hs.waiting.push_back(name);
        };
        match host.protocol {
            Protocol::Resp3 => {
                let mut hello = cmd("HELLO").arg(3);
                if let Some(password) = &host.password {
                    let user = host.username.as_deref().unwrap_or("default");
                    hello = hello.arg("AUTH").arg(user).arg(password);
                }
                push(hello, "HELLO");
            }
            Protocol::Resp2 => {
                if let Some(password) = &host.password {
                    let auth = match &host.username {
                        Some(user) => cmd("AUTH").arg(user).arg(password),
                        None => cmd("AUTH").arg(password),
                    };
                    push(auth, "AUTH");
                }
            }
        }
        if host.db != 0 {
            push(cmd("SELECT").arg(host.db), "SELECT");
        }
        hs
    }

    fn unwritten(&self) -> &[u8] {
        &self.bytes[self.written..]
    }

    fn is_done(&self) -> bool {
        self.waiting.is_empty()
    }
}

/// One host's requests and replies on its current connection.
pub(crate) struct Pipeline {
    host: Arc<HostInfo>,
    /// Encoded requests; `out[written..]` is not yet sent.
    out: Vec<u8>,
    written: usize,
    /// `out.len()` at which the next write-while-enqueuing happens.
    next_flush: usize,
    batcher: Batcher,
    /// What each reply still to come answers, in order.
    expects: VecDeque<Expect>,
    handshake: Handshake,
    /// Read buffer: `rbuf[rstart..rend]` holds bytes not yet decoded.
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    /// A huge bulk reply under way, read straight to the front of `rbuf`
    /// (its header dropped). See [`Pipeline::start_big_bulk`].
    big_bulk: Option<BigBulk>,
    replies: ReplyStream,
    /// Bytes of the reply being decoded already handed over (the elements
    /// of a split `MGET` reply), for `max_reply_bytes`.
    reply_taken: usize,
    /// Some byte of a request went out on the current connection.
    sent: bool,
    /// What happened since the session last took it, for the host's stats.
    tally: Tally,
    /// Replies expected so far, and answered (or given up) so far.
    queued: u64,
    answered: u64,
    /// When requests went out: `(queued, when)` at the first write after
    /// more were queued. A reply's latency counts from its request's mark.
    sent_marks: VecDeque<(u64, Instant)>,
}

/// Counts and latencies of one pipeline since they were last taken: plain
/// numbers here, added to the host's shared atomics once per turn.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    /// Commands as the server counts them (a merged MGET is one).
    pub(crate) commands: u64,
    /// Replies that answered a command, by latency: replies to one write
    /// read in one turn share it.
    pub(crate) replies: Vec<(Duration, u64)>,
    pub(crate) server_errors: u64,
    /// Commands given up without a reply (the connection failed).
    pub(crate) abandoned: u64,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
}

impl Tally {
    /// Starts over (keeping the latency list's room).
    pub(crate) fn clear(&mut self) {
        self.commands = 0;
        self.replies.clear();
        self.server_errors = 0;
        self.abandoned = 0;
        self.bytes_in = 0;
        self.bytes_out = 0;
    }

    /// Whether there is anything to report.
    pub(crate) fn is_empty(&self) -> bool {
        self.commands == 0
            && self.replies.is_empty()
            && self.abandoned == 0
            && self.bytes_in == 0
            && self.bytes_out == 0
    }
}

impl Pipeline {
    /// An empty pipeline for `host`; [`Pipeline::connection_started`] says
    /// whether its connection needs the handshake.
    pub(crate) fn new(host: Arc<HostInfo>) -> Pipeline {
        let replies = ReplyStream::with_max_elements(host.max_reply_elements);
        Pipeline {
            host,
            out: Vec::new(),
            written: 0,
            next_flush: WRITE_THRESHOLD,
            batcher: Batcher::default(),
            expects: VecDeque::new(),
            handshake: Handshake::default(),
            rbuf: Vec::new(),
            rstart: 0,
            big_bulk: None,
            rend: 0,
            replies,
            reply_taken: 0,
            sent: false,
            tally: Tally::default(),
            queued: 0,
            answered: 0,
            sent_marks: VecDeque::new(),
        }
    }

    /// What happened since the host's stats last took it (they clear it).
    pub(crate) fn tally(&mut self) -> &mut Tally {
        &mut self.tally
    }

    /// Commands are queued: one more reply expected.
    #[inline]
    fn expect(&mut self, expect: Expect) {
        self.expects.push_back(expect);
        self.queued += 1;
        self.tally.commands += 1;
    }

    /// Replies up to `answered_now` (counted from the start) came at `now`:
    /// their latencies, from the marks of the writes that sent them.
    fn answered_up_to(&mut self, answered_now: u64, now: Instant) {
        let mut k = self.answered;
        while k < answered_now {
            match self.sent_marks.front() {
                Some(&(end, _)) if end <= k => {
                    self.sent_marks.pop_front();
                }
                Some(&(end, at)) => {
                    let n = end.min(answered_now) - k;
                    let latency = now.saturating_duration_since(at);
                    match self.tally.replies.last_mut() {
                        Some((l, count)) if *l == latency => *count += n,
                        _ => self.tally.replies.push((latency, n)),
                    }
                    k += n;
                }
                // Answered before any write was marked (not possible for a
                // reply; a failure gives up queued ones): no latency.
                None => break,
            }
        }
        self.answered = answered_now;
    }

    /// The host this pipeline talks to.
    pub(crate) fn host(&self) -> &Arc<HostInfo> {
        &self.host
    }

    /// How errors name the host.
    pub(crate) fn name(&self) -> &HostName {
        self.host.name()
    }

    /// A connection takes over: `fresh` ones get the handshake first.
    /// Queued requests are (re)sent from their start, so this is only for
    /// the first connection or one replacing a connection that sent no
    /// byte of a request ([`Pipeline::has_sent`]). `rbuf` is a spare read
    /// buffer (the connection's, when pooled).
    pub(crate) fn connection_started(&mut self, fresh: bool, rbuf: Vec<u8>) {
        debug_assert!(!self.sent, "requests were sent on the old connection");
        self.written = 0;
        self.sent = false;
        self.handshake = if fresh {
            Handshake::for_host(&self.host)
        } else {
            Handshake::default()
        };
        self.rbuf = rbuf;
        self.rstart = 0;
        self.rend = 0;
        self.big_bulk = None;
        self.replies = ReplyStream::with_max_elements(self.host.max_reply_elements);
        self.reply_taken = 0;
    }

    /// The connection goes (back to its pool, or closed): its read buffer,
    /// emptied, to keep with it. Only a connection with nothing
    /// outstanding ([`Pipeline::is_idle`]) may be pooled.
    pub(crate) fn connection_ended(&mut self) -> Vec<u8> {
        let mut rbuf = std::mem::take(&mut self.rbuf);
        if rbuf.len() > KEEP_READ_BUFFER {
            release(std::mem::take(&mut rbuf));
        }
        self.rstart = 0;
        self.rend = 0;
        self.big_bulk = None;
        self.sent = false;
        self.handshake = Handshake::default();
        rbuf
    }

    /// Queues `cmd`; `waiter` gets its reply or failure. `batch`: the
    /// command may merge into an `MGET`/`MSET` of at most `max_batch` keys.
    #[inline]
    pub(crate) fn push(
        &mut self,
        cmd: &Cmd,
        waiter: Waiter,
        batch: Option<BatchKind>,
        max_batch: usize,
    ) {
        match batch {
            Some(kind) => {
                if !self.batcher.accepts(kind) {
                    self.flush_batch();
                }
                self.batcher.push(kind, cmd, waiter);
                if self.batcher.len() >= max_batch {
                    self.flush_batch();
                }
            }
            None => {
                self.flush_batch();
                cmd.write_packed(&mut self.out);
                self.expect(Expect::One {
                    name: CmdName::of(cmd.name()),
                    waiter,
                });
            }
        }
    }

    /// Writes the batch being collected, if any, to the output.
    pub(crate) fn flush_batch(&mut self) {
        if let Some(expect) = self.batcher.flush(&mut self.out) {
            self.expect(expect);
        }
    }

    /// A threshold's worth of requests was queued since the last
    /// write-while-enqueuing; [`Pipeline::flushed_early`] starts the next.
    pub(crate) fn wants_early_write(&self) -> bool {
        self.out.len() >= self.next_flush
    }

    /// See [`Pipeline::wants_early_write`].
    pub(crate) fn flushed_early(&mut self) {
        self.next_flush = self.out.len() + WRITE_THRESHOLD;
    }

    /// The bytes to write now: the handshake's first, then the requests,
    /// which are held while handshake replies are still to come.
    pub(crate) fn output(&self) -> &[u8] {
        let handshake = self.handshake.unwritten();
        if !handshake.is_empty() {
            handshake
        } else if !self.handshake.is_done() {
            &[]
        } else {
            &self.out[self.written..]
        }
    }

    /// `n` bytes of [`Pipeline::output`] were written at `now`.
    pub(crate) fn advance(&mut self, n: usize, now: Instant) {
        self.tally.bytes_out += n as u64;
        let to_handshake = n.min(self.handshake.unwritten().len());
        self.handshake.written += to_handshake;
        let n = n - to_handshake;
        if n == 0 {
            return;
        }
        if self
            .sent_marks
            .back()
            .map_or(true, |&(end, _)| end < self.queued)
        {
            self.sent_marks.push_back((self.queued, now));
        }
        self.sent = true;
        self.written = (self.written + n).min(self.out.len());
        if self.written == self.out.len() {
            // Kept (it would only grow again); released with the pipeline.
            self.out.clear();
            self.written = 0;
            self.next_flush = WRITE_THRESHOLD;
        }
    }

    /// The handshake is done: written, and every reply came back good.
    pub(crate) fn is_ready(&self) -> bool {
        self.handshake.is_done()
    }

    /// Some byte of a request went out on the current connection: from
    /// now on a failure rejects the requests; they are never resent.
    pub(crate) fn has_sent(&self) -> bool {
        self.sent
    }

    /// How many requests are queued, unsent or unanswered (each GET of a
    /// merged MGET counts), counted up to `cap`: a count for a cheap
    /// "is anyone else waiting" check, O(`cap`).
    pub(crate) fn requests_in_flight(&self, cap: usize) -> usize {
        let mut n = self.batcher.len();
        for expect in &self.expects {
            if n >= cap {
                break;
            }
            n += expect.requests();
        }
        n.min(cap)
    }

    /// Requests are queued, unsent or unanswered.
    pub(crate) fn is_active(&self) -> bool {
        !self.expects.is_empty() || self.batcher.len() > 0 || self.written < self.out.len()
    }

    /// Nothing is outstanding and no reply is part-way read: the
    /// connection can serve someone else as it is.
    pub(crate) fn is_idle(&self) -> bool {
        !self.is_active()
            && self.is_ready()
            && self.rstart == self.rend
            && self.big_bulk.is_none()
            && !self.replies.is_mid_reply()
    }

    /// What a deadline passing now interrupts.
    pub(crate) fn phase(&self) -> Phase {
        if !self.is_ready() {
            Phase::Connect
        } else if self.written < self.out.len() || self.batcher.len() > 0 {
            Phase::Write
        } else {
            Phase::Read
        }
    }

    /// Where the next read goes: at most [`READ_STEP`] bytes, at least
    /// one. When room runs short the buffer grows, doubling up to
    /// [`GROW_STEP`] at a time and never past what the reply under way
    /// needs (as far as its headers tell), so memory follows the bytes that
    /// arrived and one huge bulk gets a buffer of its size, not the next
    /// power of two.
    pub(crate) fn read_buffer(&mut self) -> &mut [u8] {
        if let Some(BigBulk { len, .. }) = self.big_bulk {
            // A huge bulk's body and `\r\n`, and nothing past them: the
            // buffer becomes the value as it is (no move once grown).
            let want = len + 2;
            if self.rend < want {
                let have = self.rbuf.len();
                if have - self.rend < READ_CHUNK && have < want {
                    self.grow(have.clamp(READ_CHUNK, GROW_STEP).min(want - have));
                }
                let end = self.rbuf.len().min(self.rend + READ_STEP).min(want);
                return &mut self.rbuf[self.rend..end];
            }
        }
        if self.rstart == self.rend {
            self.rstart = 0;
            self.rend = 0;
        }
        if self.rbuf.len() - self.rend < READ_CHUNK {
            let pending = self.rend - self.rstart;
            if self.rstart > 0 {
                self.rbuf.copy_within(self.rstart..self.rend, 0);
                self.rend = pending;
                self.rstart = 0;
            }
            let len = self.rbuf.len();
            if len - self.rend < READ_CHUNK {
                // Double, but never past what the reply under way needs (as
                // far as its headers tell) and by at most GROW_STEP at a
                // time, so each step's zeroing is short.
                let need = self.replies.need().max(pending + READ_CHUNK);
                self.grow(
                    len.clamp(READ_CHUNK, GROW_STEP)
                        .min(need.saturating_sub(self.rend))
                        .max(READ_CHUNK),
                );
            }
        }
        let end = self.rbuf.len().min(self.rend + READ_STEP);
        &mut self.rbuf[self.rend..end]
    }

    /// Adds `n` zeroed bytes of read room.
    fn grow(&mut self, n: usize) {
        self.rbuf.reserve_exact(n);
        let mut left = n;
        while left > 0 {
            let k = left.min(ZEROS.len());
            self.rbuf.extend_from_slice(&ZEROS[..k]);
            left -= k;
        }
    }

    /// `n` bytes were read into [`Pipeline::read_buffer`].
    pub(crate) fn filled(&mut self, n: usize) {
        self.tally.bytes_in += n as u64;
        self.rend = (self.rend + n).min(self.rbuf.len());
    }

    /// Decodes what was read, handing each reply to its waiter(s).
    ///
    /// # Errors
    ///
    /// The stream cannot go on: a protocol error, a reply when none was
    /// due or of the wrong shape, a failed handshake, or a reply past the
    /// host's limits. Replies decoded before it were delivered; the caller
    /// closes the connection and calls [`Pipeline::fail`].
    pub(crate) fn receive(&mut self, outcomes: &Outcomes, now: Instant) -> Result<()> {
        let waiting = self.expects.len() as u64;
        let result = self.decode_replies(outcomes);
        let answered = waiting - self.expects.len() as u64;
        if answered > 0 {
            self.answered_up_to(self.answered + answered, now);
        }
        result
    }

    /// [`Pipeline::receive`] without the accounting.
    fn decode_replies(&mut self, outcomes: &Outcomes) -> Result<()> {
        let host = self.host.clone();
        let name = host.name();
        while self.rstart < self.rend {
            if self.big_bulk.is_none() {
                self.start_big_bulk();
            }
            let next = match self.big_bulk {
                Some(BigBulk { len, .. }) => match self.take_big_bulk(len) {
                    Ok(Some(value)) => {
                        let value = self.unless_discarded(value);
                        Some((Frame::Reply(Value::BulkString(value)), 0))
                    }
                    Ok(None) => None,
                    Err(e) => return Err(e.with_context(name, "")),
                },
                None => {
                    let split = if self.handshake.is_done() {
                        self.expects.front().and_then(Expect::split_len)
                    } else {
                        None
                    };
                    self.replies
                        .next(&self.rbuf[self.rstart..self.rend], split)
                        .map_err(|e| e.with_context(name, ""))?
                }
            };
            let Some((frame, used)) = next else {
                break;
            };
            match frame {
                Frame::Split { .. } => {}
                Frame::Bulk { bytes, last } => deliver_element(
                    &mut self.expects,
                    &mut self.batcher,
                    Element::Bulk(bytes),
                    last,
                    name,
                    outcomes,
                ),
                Frame::Element { value, last } => deliver_element(
                    &mut self.expects,
                    &mut self.batcher,
                    Element::Value(value),
                    last,
                    name,
                    outcomes,
                ),
                Frame::Reply(value) => {
                    if let Some(&command) = self.handshake.waiting.front() {
                        if let Value::Error { code, message } = value {
                            // Left waiting: the held requests stay held.
                            return Err(Error::Server {
                                host: Some(name.clone()),
                                command: command.into(),
                                code: code.into(),
                                message: message.into(),
                            });
                        }
                        self.handshake.waiting.pop_front();
                    } else if matches!(value, Value::Push(_)) {
                        // Out of band (client tracking, say): no request
                        // that rb sends is answered by a push.
                    } else {
                        match self.expects.pop_front() {
                            Some(expect) => {
                                if matches!(value, Value::Error { .. }) {
                                    self.tally.server_errors += 1;
                                }
                                if let Some(e) = expect.deliver(value, name, outcomes) {
                                    return Err(e);
                                }
                            }
                            None => {
                                return Err(Error::Protocol {
                                    host: Some(name.clone()),
                                    reason: format!(
                                        "the server sent {} when no reply was due",
                                        value.describe()
                                    )
                                    .into(),
                                })
                            }
                        }
                    }
                }
            }
            self.rstart += used;
            self.reply_taken = if self.replies.is_splitting() {
                self.reply_taken + used
            } else {
                0
            };
        }
        let pending = self.rend - self.rstart;
        let reply_bytes = (self.reply_taken + pending).max(self.reply_need());
        if reply_bytes > self.host.max_reply_bytes {
            return Err(Error::Protocol {
                host: Some(name.clone()),
                reason: format!(
                    "a reply of more than {} bytes (the host's max_reply_bytes)",
                    self.host.max_reply_bytes
                )
                .into(),
            });
        }
        Ok(())
    }

    /// Rejects everything queued or outstanding with `error`, and forgets
    /// the connection's state: the caller closes it.
    pub(crate) fn fail(&mut self, error: &Error, outcomes: &Outcomes) {
        let host = self.host.clone();
        self.batcher.fail(error, Some(host.name()), outcomes);
        self.tally.abandoned += self.expects.len() as u64;
        for expect in self.expects.drain(..) {
            expect.fail(error, Some(host.name()), outcomes);
        }
        self.answered = self.queued;
        self.sent_marks.clear();
        self.out.clear();
        self.written = 0;
        self.next_flush = WRITE_THRESHOLD;
        self.handshake = Handshake::default();
        if self.rbuf.len() > KEEP_READ_BUFFER {
            release(std::mem::take(&mut self.rbuf));
        }
        self.rstart = 0;
        self.rend = 0;
        self.big_bulk = None;
        self.replies = ReplyStream::with_max_elements(self.host.max_reply_elements);
        self.reply_taken = 0;
        self.sent = false;
    }

    /// The bytes the reply under way needs in all, as far as its headers
    /// tell (a huge bulk's header included, as the decoder counts it).
    fn reply_need(&self) -> usize {
        match self.big_bulk {
            Some(big) => big.header + big.len + 2,
            None => self.replies.need(),
        }
    }

    /// A reply that is a bulk string of over a megabyte (not an `MGET`
    /// element), as soon as its header is in: the header is dropped and
    /// the body read so far moved to the front of the read buffer (a copy
    /// of at most a few read steps), so that the body is read straight
    /// into place and the buffer itself becomes the value, with no copy of
    /// the body at the end ([`Pipeline::take_big_bulk`]). One huge bulk
    /// costs its size in memory once, and no work past its last read.
    fn start_big_bulk(&mut self) {
        if !self.handshake.is_done()
            || self.replies.is_splitting()
            || self.expects.front().and_then(Expect::split_len).is_some()
        {
            return;
        }
        let Some((len, header)) = plain_bulk_header(&self.rbuf[self.rstart..self.rend]) else {
            return;
        };
        if len <= KEEP_READ_BUFFER || header + len + 2 > self.host.max_reply_bytes {
            // Small, or refused by the limit check after decoding.
            return;
        }
        self.rbuf.copy_within(self.rstart + header..self.rend, 0);
        // Address room for all of it now where the system gives it (no
        // page is touched before the bytes come), so the buffer does not
        // move while it fills; where it does not (a limit on address
        // space), the buffer grows with the bytes, as any reply's does.
        let _ = self
            .rbuf
            .try_reserve_exact((len + 2).saturating_sub(self.rbuf.len()));
        self.rend -= self.rstart + header;
        self.rstart = 0;
        self.big_bulk = Some(BigBulk { len, header });
        // The decoder may have seen part of the header: it starts afresh
        // after the bulk.
        self.replies.reset();
    }

    /// A huge bulk's body, or an empty one when the body may be dropped
    /// unconverted ([`Expect::may_discard`]: its promise and callbacks are
    /// gone, and its conversion cannot fail): then the body is freed off
    /// this thread, so a caller's deadline does not wait for the pages.
    fn unless_discarded(&self, value: Vec<u8>) -> Vec<u8> {
        if self.expects.front().is_some_and(Expect::may_discard) {
            release(value);
            Vec::new()
        } else {
            value
        }
    }

    /// The huge bulk of `len` bytes at the front of the read buffer, once
    /// it and its `\r\n` are all in: the read buffer itself, cut to the
    /// body; the bytes after it move to a new buffer.
    ///
    /// # Errors
    ///
    /// The body is not followed by `\r\n`.
    fn take_big_bulk(&mut self, len: usize) -> Result<Option<Vec<u8>>> {
        let end = len + 2;
        let Some(terminator) = self.rbuf.get(len..end).filter(|_| self.rend >= end) else {
            // Not all in yet: nothing is decoded until it is.
            return Ok(None);
        };
        if terminator != b"\r\n" {
            return Err(Error::protocol(format!(
                "a bulk string of {len} bytes is not followed by \\r\\n"
            )));
        }
        let tail = &self.rbuf[end..self.rend];
        let mut next = vec![0u8; tail.len().max(READ_CHUNK)];
        next[..tail.len()].copy_from_slice(tail);
        let tail_len = tail.len();
        let mut value = std::mem::replace(&mut self.rbuf, next);
        value.truncate(len);
        self.rstart = 0;
        self.rend = tail_len;
        self.big_bulk = None;
        Ok(Some(value))
    }
}

/// A huge bulk reply under way (see [`Pipeline::start_big_bulk`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BigBulk {
    /// The body's length.
    len: usize,
    /// The length of its header (`$<len>\r\n`), dropped from the buffer
    /// but counted against `max_reply_bytes`.
    header: usize,
}

/// Frees a read buffer grown for a huge reply. Giving hundreds of
/// megabytes back to the OS takes milliseconds (a page at a time), which a
/// caller whose deadline just passed should not wait for: buffers past
/// [`GROW_STEP`] are dropped on a short-lived thread.
fn release(buffer: Vec<u8>) {
    if buffer.len() <= GROW_STEP {
        return;
    }
    #[cfg(test)]
    tests::RELEASED.with(|n| n.set(n.get() + buffer.len()));
    // When no thread can be spawned, the closure (and the buffer in it) is
    // dropped here instead.
    let _ = std::thread::Builder::new()
        .name("rb-free".into())
        .spawn(move || drop(buffer));
}

/// Hands the next element of a split `MGET` reply to its waiter; after the
/// last one, the batch is done and its waiter list goes back for reuse.
///
/// Elements are handed over as they arrive, so when the connection fails
/// part-way through such a reply (closed, timed out, a malformed element),
/// the keys already answered keep their values and only the rest are
/// rejected.
#[inline]
fn deliver_element(
    expects: &mut VecDeque<Expect>,
    batcher: &mut Batcher,
    element: Element<'_>,
    last: bool,
    host: &HostName,
    outcomes: &Outcomes,
) {
    if let Some(expect) = expects.front_mut() {
        expect.deliver_element(element, host, outcomes);
    }
    if last {
        if let Some(waiters) = expects.pop_front().and_then(Expect::into_waiters) {
            batcher.recycle(waiters);
        }
    }
}

/// What a command does to the connection it is sent on, beyond its reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ConnEffect {
    /// Nothing: the connection can go back to the pool.
    None,
    /// It changes the connection's state (database, transaction, reply
    /// mode, protocol, user): the connection is closed after use, never
    /// pooled, so the next user gets a clean one.
    Dirty,
    /// It is not answered exactly once (subscriptions and their
    /// unsubscribe replies, `MONITOR`, `CLIENT REPLY OFF|SKIP`, the
    /// replication stream): replies would no longer match requests, so it
    /// is refused.
    Refused(&'static str),
}

impl ConnEffect {
    /// The effect of `cmd` on its connection.
    pub(crate) fn of(cmd: &Cmd) -> ConnEffect {
        if cmd.common() != Common::Other {
            return ConnEffect::None;
        }
        let name = cmd.name();
        let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
        let sub_is = |n: &[u8]| cmd.arg_at(0).is_some_and(|s| s.eq_ignore_ascii_case(n));
        const PUSH: &str = "its replies come as a push stream (pub/sub), not one per call, which rb's pipelines do not support";
        // This runs for every command: the first letter rules most out.
        let first = name.first().map_or(0, u8::to_ascii_uppercase);
        let refused = match first {
            b'S' if is(b"SUBSCRIBE") || is(b"SSUBSCRIBE") || is(b"SUNSUBSCRIBE") => Some(PUSH),
            b'S' if is(b"SYNC") => Some("it turns the connection into a replication stream"),
            b'P' if is(b"PSUBSCRIBE") || is(b"PUNSUBSCRIBE") => Some(PUSH),
            b'P' if is(b"PSYNC") => Some("it turns the connection into a replication stream"),
            b'U' if is(b"UNSUBSCRIBE") => Some(PUSH),
            b'M' if is(b"MONITOR") => {
                Some("it turns the connection into a stream of every command the server runs")
            }
            b'C' if is(b"CLIENT")
                && sub_is(b"REPLY")
                && cmd
                    .arg_at(1)
                    .is_some_and(|m| !m.eq_ignore_ascii_case(b"ON")) =>
            {
                Some("with replies off or skipped, later replies would answer the wrong requests")
            }
            _ => None,
        };
        if let Some(reason) = refused {
            return ConnEffect::Refused(reason);
        }
        let dirty = match first {
            b'A' => is(b"AUTH"),
            b'C' => {
                is(b"CLIENT")
                    && [
                        &b"REPLY"[..],
                        b"TRACKING",
                        b"CACHING",
                        b"SETNAME",
                        b"NO-EVICT",
                        b"NO-TOUCH",
                    ]
                    .iter()
                    .any(|s| sub_is(s))
            }
            b'D' => is(b"DISCARD"),
            b'E' => is(b"EXEC"),
            b'H' => is(b"HELLO"),
            b'M' => is(b"MULTI"),
            b'Q' => is(b"QUIT"),
            b'R' => is(b"RESET") || is(b"READONLY") || is(b"READWRITE"),
            b'S' => is(b"SELECT"),
            b'U' => is(b"UNWATCH"),
            b'W' => is(b"WATCH"),
            _ => false,
        };
        if dirty {
            ConnEffect::Dirty
        } else {
            ConnEffect::None
        }
    }
}

/// Whether `cmd` may block its connection waiting for something else to
/// happen (BLPOP, XREAD BLOCK, WAIT, ...): on a connection shared by many
/// callers it would stall every request queued behind it.
pub(crate) fn blocks(cmd: &Cmd) -> bool {
    if cmd.common() != Common::Other {
        return false;
    }
    let name = cmd.name();
    let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
    match name.first().map_or(0, u8::to_ascii_uppercase) {
        b'B' => [
            &b"BLPOP"[..],
            b"BRPOP",
            b"BRPOPLPUSH",
            b"BLMOVE",
            b"BLMPOP",
            b"BZPOPMIN",
            b"BZPOPMAX",
            b"BZMPOP",
        ]
        .iter()
        .any(|n| is(n)),
        b'W' => is(b"WAIT") || is(b"WAITAOF"),
        b'X' if is(b"XREAD") || is(b"XREADGROUP") => {
            cmd.args().any(|a| a.eq_ignore_ascii_case(b"BLOCK"))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests;
