//! The pipelined transfer engine under every ring operation.
//!
//! A buffer is cut into chunks. The caller's algorithm says, chunk by chunk, "send this to the
//! right neighbour" and "receive this from the left one (store or add)". Sending runs on its own
//! thread so that a rank can receive while its sends are still in flight: neither side can
//! deadlock on full socket buffers, and a chunk is forwarded as soon as it has been reduced.
//!
//! Ownership makes this safe without locks: a chunk is a `&mut [u8]` that moves to the sender
//! thread with the send and comes back when it has been written; the algorithm waits for it
//! before touching that chunk again. Small operations skip the thread (their writes always fit
//! in the socket buffers).

use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread;
use std::time::Duration;

use super::wire::{self, link_error};
use super::{CollectiveError, Result};

/// Operations whose whole payload is at most this many bytes run without a sender thread.
pub(crate) const INLINE_BYTES: usize = 64 * 1024;

/// How a chunk's bytes travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Codec {
    /// Bytes as they are.
    Raw,
    /// The chunk holds f32s; the wire carries them as bf16 (half the bytes).
    Bf16,
}

impl Codec {
    fn wire_len(self, chunk_len: usize) -> usize {
        match self {
            Codec::Raw => chunk_len,
            Codec::Bf16 => chunk_len / 2,
        }
    }
}

/// The two sockets of a rank and who is at their other end.
pub(crate) struct Link<'l> {
    pub left: &'l TcpStream,
    pub right: &'l TcpStream,
    pub left_rank: usize,
    pub right_rank: usize,
    pub timeout: Duration,
    pub op: &'static str,
}

impl Link<'_> {
    pub fn read_err(&self, e: std::io::Error) -> CollectiveError {
        link_error(e, self.left_rank, self.op, self.timeout)
    }

    pub fn write_err(&self, e: std::io::Error) -> CollectiveError {
        link_error(e, self.right_rank, self.op, self.timeout)
    }

    fn invalid(&self, message: &str) -> CollectiveError {
        CollectiveError::Invalid {
            op: self.op,
            message: message.to_string(),
        }
    }
}

type Chunk<'a> = (usize, &'a mut [u8]);

/// Who failed first, so the root cause is reported rather than its echo.
const NOBODY: u8 = 0;
const MAIN: u8 = 1;
const SENDER: u8 = 2;

enum Mode<'a> {
    Inline,
    Threaded {
        to_sender: Sender<Chunk<'a>>,
        from_sender: Receiver<Chunk<'a>>,
    },
}

/// What the algorithm drives: one per operation.
pub(crate) struct Pipe<'a, 'l> {
    link: &'l Link<'l>,
    codec: Codec,
    slots: Vec<Option<&'a mut [u8]>>,
    mode: Mode<'a>,
    scratch_f32: Vec<f32>,
    scratch_u16: Vec<u16>,
}

/// Run `body` over `chunks`, with a sender thread unless `threaded` is false.
pub(crate) fn run<'a, R>(
    link: &Link<'_>,
    codec: Codec,
    chunks: Vec<&'a mut [u8]>,
    threaded: bool,
    body: impl FnOnce(&mut Pipe<'a, '_>) -> Result<R>,
) -> Result<R> {
    let slots: Vec<Option<&'a mut [u8]>> = chunks.into_iter().map(Some).collect();
    if !threaded {
        let mut pipe = Pipe::new(link, codec, slots, Mode::Inline);
        return body(&mut pipe);
    }
    let first = AtomicU8::new(NOBODY);
    thread::scope(|s| {
        let (to_sender, sender_rx) = channel::<Chunk<'a>>();
        let (sender_tx, from_sender) = channel::<Chunk<'a>>();
        let first = &first;
        let sender = s.spawn(move || sender_loop(link, codec, sender_rx, sender_tx, first));
        let mode = Mode::Threaded {
            to_sender,
            from_sender,
        };
        let mut pipe = Pipe::new(link, codec, slots, mode);
        let out = body(&mut pipe);
        if out.is_err()
            && first
                .compare_exchange(NOBODY, MAIN, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            // Unblock a sender stuck in write() at once instead of after the timeout.
            let _ = link.right.shutdown(Shutdown::Both);
        }
        drop(pipe); // closes the channel: the sender finishes its queue and exits
        let sent = sender
            .join()
            .unwrap_or_else(|_| Err(link.invalid("the sender thread panicked")));
        match (out, sent) {
            (Ok(r), Ok(())) => Ok(r),
            (Err(e), Ok(())) | (Ok(_), Err(e)) => Err(e),
            (Err(main_err), Err(send_err)) => {
                if first.load(Ordering::SeqCst) == SENDER {
                    Err(send_err)
                } else {
                    Err(main_err)
                }
            }
        }
    })
}

fn sender_loop<'a>(
    link: &Link<'_>,
    codec: Codec,
    queue: Receiver<Chunk<'a>>,
    back: Sender<Chunk<'a>>,
    first: &AtomicU8,
) -> Result<()> {
    let mut failed: Option<CollectiveError> = None;
    let mut wire_buf = Vec::new();
    for (id, chunk) in queue {
        if failed.is_none() {
            if let Err(e) = write_chunk(link, codec, chunk, &mut wire_buf) {
                if first
                    .compare_exchange(NOBODY, SENDER, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    // Wake the main thread blocked on a read from the left.
                    let _ = link.left.shutdown(Shutdown::Both);
                }
                failed = Some(e);
            }
        }
        // Always hand the chunk back so the main thread never waits for it forever.
        let _ = back.send((id, chunk));
    }
    failed.map_or(Ok(()), Err)
}

fn write_chunk(link: &Link<'_>, codec: Codec, chunk: &[u8], wire_buf: &mut Vec<u16>) -> Result<()> {
    match codec {
        Codec::Raw => wire::write_all(link.right, chunk).map_err(|e| link.write_err(e)),
        Codec::Bf16 => {
            let f = as_f32(chunk, link)?;
            wire_buf.resize(f.len(), 0);
            wire::encode_bf16(f, wire_buf);
            wire::write_all(link.right, bytemuck::cast_slice(wire_buf))
                .map_err(|e| link.write_err(e))
        }
    }
}

fn as_f32<'b>(b: &'b [u8], link: &Link<'_>) -> Result<&'b [f32]> {
    bytemuck::try_cast_slice(b).map_err(|e| link.invalid(&format!("f32 buffer: {e}")))
}

fn as_f32_mut<'b>(b: &'b mut [u8], link: &Link<'_>) -> Result<&'b mut [f32]> {
    bytemuck::try_cast_slice_mut(b).map_err(|e| link.invalid(&format!("f32 buffer: {e}")))
}

impl<'a, 'l> Pipe<'a, 'l> {
    fn new(
        link: &'l Link<'l>,
        codec: Codec,
        slots: Vec<Option<&'a mut [u8]>>,
        mode: Mode<'a>,
    ) -> Self {
        Pipe {
            link,
            codec,
            slots,
            mode,
            scratch_f32: Vec::new(),
            scratch_u16: Vec::new(),
        }
    }

    /// Queue chunk `id` for the right neighbour (written now when inline).
    pub fn send(&mut self, id: usize) -> Result<()> {
        let chunk = self.take(id)?;
        match &self.mode {
            Mode::Inline => {
                let mut wire_buf = std::mem::take(&mut self.scratch_u16);
                let r = write_chunk(self.link, self.codec, chunk, &mut wire_buf);
                self.scratch_u16 = wire_buf;
                self.slots[id] = Some(chunk);
                r
            }
            Mode::Threaded { to_sender, .. } => to_sender
                .send((id, chunk))
                .map_err(|_| self.link.invalid("the sender thread is gone")),
        }
    }

    /// Receive chunk `id` from the left neighbour, overwriting it.
    pub fn recv_store(&mut self, id: usize) -> Result<()> {
        let link = self.link;
        let chunk = self.take(id)?;
        let r = match self.codec {
            Codec::Raw => wire::read_exact(link.left, chunk).map_err(|e| link.read_err(e)),
            Codec::Bf16 => {
                let wire_buf = read_bf16(link, &mut self.scratch_u16, chunk.len())?;
                wire::store_bf16(as_f32_mut(chunk, link)?, wire_buf);
                Ok(())
            }
        };
        self.slots[id] = Some(chunk);
        r
    }

    /// Receive chunk `id`'s f32 values from the left neighbour and add them into it.
    pub fn recv_add(&mut self, id: usize) -> Result<()> {
        let link = self.link;
        let chunk = self.take(id)?;
        let n = chunk.len() / 4;
        let r = match self.codec {
            Codec::Raw => {
                self.scratch_f32.resize(n, 0.0);
                wire::read_exact(link.left, bytemuck::cast_slice_mut(&mut self.scratch_f32))
                    .map_err(|e| link.read_err(e))
                    .and_then(|()| {
                        wire::add_f32(as_f32_mut(chunk, link)?, &self.scratch_f32);
                        Ok(())
                    })
            }
            Codec::Bf16 => read_bf16(link, &mut self.scratch_u16, chunk.len()).and_then(|w| {
                wire::add_bf16(as_f32_mut(chunk, link)?, w);
                Ok(())
            }),
        };
        self.slots[id] = Some(chunk);
        r
    }

    /// With bf16 on the wire, round chunk `id` to bf16 so its owner agrees with everyone else.
    pub fn round_for_wire(&mut self, id: usize) -> Result<()> {
        if self.codec == Codec::Bf16 {
            let link = self.link;
            let chunk = self.take(id)?;
            let r = as_f32_mut(chunk, link).map(wire::round_to_bf16);
            self.slots[id] = Some(chunk);
            r?;
        }
        Ok(())
    }

    /// Chunk `id`, waiting for the sender thread to hand it back if it is away.
    fn take(&mut self, id: usize) -> Result<&'a mut [u8]> {
        if id >= self.slots.len() {
            return Err(self.link.invalid(&format!("chunk {id} out of range")));
        }
        loop {
            if let Some(chunk) = self.slots[id].take() {
                return Ok(chunk);
            }
            match &self.mode {
                Mode::Threaded { from_sender, .. } => match from_sender.recv() {
                    Ok((back_id, chunk)) => self.slots[back_id] = Some(chunk),
                    Err(_) => return Err(self.link.invalid("the sender thread is gone")),
                },
                Mode::Inline => {
                    return Err(self.link.invalid(&format!("chunk {id} is missing")));
                }
            }
        }
    }
}

fn read_bf16<'s>(
    link: &Link<'_>,
    scratch: &'s mut Vec<u16>,
    chunk_len: usize,
) -> Result<&'s [u16]> {
    let n = Codec::Bf16.wire_len(chunk_len) / 2;
    scratch.resize(n, 0);
    wire::read_exact(link.left, bytemuck::cast_slice_mut(scratch.as_mut_slice()))
        .map_err(|e| link.read_err(e))?;
    Ok(scratch)
}
