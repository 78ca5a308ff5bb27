//! Same-host all-reduce through shared memory, as NCCL does within a node.
//!
//! Each rank owns one small region in /dev/shm, mapped by itself (read-write) and by its right
//! neighbour (read-only). The ring algorithm is unchanged, only "send a chunk" becomes "copy it
//! into a slot of my region and ring the right neighbour's doorbell", and "receive" becomes
//! "wait for the left doorbell, then read that slot of the left region". Doorbells are 4-byte
//! chunk ids on the ring's TCP links, so a waiting rank sleeps in read() instead of spinning,
//! and a dead or silent neighbour still gives the link's EOF or timeout error.
//!
//! Round k moves chunk k of every segment through slots (segment, k mod SLOTS), so a region
//! holds n × SLOTS chunks (at most REGION_BYTES) whatever the buffer size. Why no slot is
//! overwritten while its reader is still on it: within a round, a second write of a slot happens
//! causally after the right neighbour read the first one (the data flows through it first);
//! across rounds, each rank acknowledges every round on the reverse direction of its left link,
//! and a rank reuses round k's slots only after its right neighbour acknowledged round k; an
//! operation ends when all its rounds are acknowledged.
//!
//! The files are unlinked as soon as the right neighbour has mapped them (or on any failure),
//! so a SIGKILL leaves nothing behind.
//!
//! `region` holds the files and mappings (and the host id that says whether every rank shares
//! this /dev/shm); this file the all-reduce over them.

mod region;

use std::io;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};

use super::pipe::Link;
use super::ring::invalid;
use super::wire::{self, link_error};
use super::Result;
pub(crate) use region::host_id;
use region::{checked_path, create_region, open_region, region_path, Mapping};

/// Regions grow in steps of this size, so a run's varying bucket sizes remap rarely.
const GROW_STEP: usize = 1 << 20;
/// Rounds in flight: a rank may be this many rounds ahead of its right neighbour.
const SLOTS: usize = 2;
/// Bound on one rank's region (a container's /dev/shm is often only 64 MB).
const REGION_BYTES: usize = 8 << 20;
const ROUND_DONE: u8 = 0xD0;
const MAPPED: u8 = 0x3A;

/// The shared-memory side of a ring: this rank's region and a read-only view of the left one.
pub(crate) struct Shm {
    rank: usize,
    generation: u64,
    mine: Option<Mapping>,
    left: Option<Mapping>,
    /// Bytes mapped in both (equal on every rank: regions grow at the same operations).
    cap: usize,
}

impl Shm {
    pub fn new(rank: usize, generation: u64) -> Self {
        Shm {
            rank,
            generation,
            mine: None,
            left: None,
            cap: 0,
        }
    }

    /// Make both regions hold at least `bytes`. Every rank calls this with the same `bytes`
    /// (the operation header checked it), so all grow together.
    fn ensure(&mut self, link: &Link<'_>, bytes: usize) -> Result<()> {
        if bytes <= self.cap && self.mine.is_some() && self.left.is_some() {
            return Ok(());
        }
        let cap = bytes.div_ceil(GROW_STEP).max(1) * GROW_STEP;
        // Drop the old regions first: their memory goes back before the new one is reserved.
        self.mine = None;
        self.left = None;
        self.cap = 0;
        let path = region_path(self.generation, self.rank);
        let path = Path::new(&path);
        let created = create_region(path, cap);
        // Tell the right neighbour even when creating failed (an empty name), so that it
        // fails at once instead of after the timeout.
        let name: &[u8] = if created.is_ok() {
            path.as_os_str().as_encoded_bytes()
        } else {
            &[]
        };
        let left = self.exchange(link, name, cap);
        // Whatever happened, the name has served its purpose: the right neighbour mapped it,
        // or the operation failed. Nothing stays in /dev/shm.
        if created.is_ok() {
            let _ = std::fs::remove_file(path);
        }
        let mine = created.map_err(|e| {
            invalid(
                link.op,
                format!("creating {} ({cap} bytes): {e}", path.display()),
            )
        })?;
        let left = left?;
        self.mine = Some(mine);
        self.left = Some(left);
        self.cap = cap;
        tracing::debug!(
            rank = self.rank,
            bytes = cap,
            "shared-memory regions mapped"
        );
        Ok(())
    }

    /// Send our region's name right, map the left one's, and wait until the right neighbour
    /// has mapped ours.
    fn exchange(&self, link: &Link<'_>, name: &[u8], cap: usize) -> Result<Mapping> {
        let mut msg = Vec::with_capacity(4 + name.len());
        msg.extend_from_slice(&(name.len() as u32).to_le_bytes());
        msg.extend_from_slice(name);
        wire::write_all(link.right, &msg).map_err(|e| link.write_err(e))?;
        let mut len = [0u8; 4];
        wire::read_exact(link.left, &mut len).map_err(|e| link.read_err(e))?;
        let len = u32::from_le_bytes(len) as usize;
        if len > 4096 {
            return Err(invalid(
                link.op,
                format!("rank {} sent a {len}-byte region name", link.left_rank),
            ));
        }
        let mut raw = vec![0u8; len];
        wire::read_exact(link.left, &mut raw).map_err(|e| link.read_err(e))?;
        if name.is_empty() {
            return Err(invalid(
                link.op,
                "could not create the shared-memory region",
            ));
        }
        let path = checked_path(&raw).ok_or_else(|| {
            invalid(
                link.op,
                format!(
                    "rank {} has no shared-memory region (sent {:?})",
                    link.left_rank,
                    String::from_utf8_lossy(&raw)
                ),
            )
        })?;
        let left = open_region(path, cap).map_err(|e| {
            invalid(
                link.op,
                format!(
                    "mapping rank {}'s region {}: {e}",
                    link.left_rank,
                    path.display()
                ),
            )
        })?;
        // Reverse directions: "mapped" goes left, the right neighbour's comes back.
        wire::write_all(link.left, &[MAPPED]).map_err(|e| link.read_err(e))?;
        expect_byte(link, MAPPED)?;
        Ok(left)
    }

    /// Ring all-reduce (sum) of `data` through the regions, chunked by `chunk` floats.
    /// Same segments, hops and addition order as the TCP ring, so results are bit-identical.
    pub fn all_reduce(
        &mut self,
        link: &Link<'_>,
        rank: usize,
        n: usize,
        data: &mut [f32],
        chunk: usize,
    ) -> Result<()> {
        // Chunks are region slots: n × SLOTS of them fit REGION_BYTES.
        let max_seg = data.len().div_ceil(n);
        let slot = chunk
            .min(REGION_BYTES / 4 / (n * SLOTS))
            .min(max_seg)
            .max(1);
        self.ensure(link, n * SLOTS * slot * 4)?;
        let (Some(mine), Some(left)) = (&self.mine, &self.left) else {
            return Err(invalid(link.op, "shared-memory regions are not mapped"));
        };
        let (mine, left) = (mine.ptr.cast::<f32>(), left.ptr.cast::<f32>().cast_const());
        let plan = Plan::new(data.len(), n, slot);
        let at = |seg: usize, k: usize| (seg * SLOTS + k % SLOTS) * slot;
        let mut bells = Bells::new(link, plan.recvs(rank));
        for k in 0..plan.rounds {
            if k >= SLOTS {
                // This round's slots held round k − SLOTS: wait until the right neighbour is off them.
                expect_byte(link, ROUND_DONE)?;
            }
            // Reduce-scatter: send segment r; receive r−1−s, add, pass it on.
            if let Some(c) = plan.chunk(rank, k) {
                // SAFETY (all region accesses below): a slot holds `slot` ≥ c.len() floats and
                // `ensure` made both regions hold n × SLOTS slots; the protocol in the module
                // comment keeps the neighbour off a slot while we touch it.
                unsafe { copy_out(&data[c.clone()], mine.add(at(rank, k))) };
                bells.ring(plan.id(rank, k))?;
            }
            for s in 0..n - 1 {
                let seg = (rank + 2 * n - s - 1) % n;
                if let Some(c) = plan.chunk(seg, k) {
                    bells.wait(plan.id(seg, k))?;
                    let slot_at = at(seg, k);
                    unsafe { add_both(&mut data[c], left.add(slot_at), mine.add(slot_at)) };
                    bells.ring(plan.id(seg, k))?;
                }
            }
            // All-gather: receive segment r−s, pass it on unless it is the last hop.
            for s in 0..n - 1 {
                let seg = (rank + n - s) % n;
                if let Some(c) = plan.chunk(seg, k) {
                    bells.wait(plan.id(seg, k))?;
                    let out = &mut data[c];
                    unsafe { copy_in(out, left.add(at(seg, k))) };
                    if s < n - 2 {
                        unsafe { copy_out(out, mine.add(at(seg, k))) };
                        bells.ring(plan.id(seg, k))?;
                    }
                }
            }
            // We are off round k's slots of the left region.
            wire::write_all(link.left, &[ROUND_DONE]).map_err(|e| link.read_err(e))?;
        }
        // The next operation may write any slot: wait for the rounds not yet acknowledged.
        for _ in plan.rounds.saturating_sub(SLOTS)..plan.rounds {
            expect_byte(link, ROUND_DONE)?;
        }
        Ok(())
    }
}

/// Read one control byte from the right neighbour (reverse direction of the right link).
fn expect_byte(link: &Link<'_>, want: u8) -> Result<()> {
    let mut b = [0u8; 1];
    wire::read_exact(link.right, &mut b).map_err(|e| link.write_err(e))?;
    if b[0] != want {
        return Err(invalid(
            link.op,
            format!(
                "rank {} sent control byte {:#x}, expected {want:#x}",
                link.right_rank, b[0]
            ),
        ));
    }
    Ok(())
}

/// The ring's segments cut into chunks; round k handles chunk k of every segment.
struct Plan {
    segs: Vec<Range<usize>>,
    chunk: usize,
    rounds: usize,
}

impl Plan {
    fn new(len: usize, n: usize, chunk: usize) -> Self {
        let mut segs = Vec::with_capacity(n);
        let mut at = 0;
        for i in 0..n {
            let l = len / n + usize::from(i < len % n);
            segs.push(at..at + l);
            at += l;
        }
        let rounds = segs
            .iter()
            .map(|s| s.len().div_ceil(chunk))
            .max()
            .unwrap_or(0);
        Plan {
            segs,
            chunk,
            rounds,
        }
    }

    fn chunk(&self, seg: usize, k: usize) -> Option<Range<usize>> {
        let s = &self.segs[seg];
        let start = s.start + k * self.chunk;
        (start < s.end).then(|| start..(start + self.chunk).min(s.end))
    }

    fn id(&self, seg: usize, k: usize) -> u32 {
        (seg * self.rounds + k) as u32
    }

    /// Doorbells `rank` receives: every chunk of every segment but its own, twice (reduce and
    /// gather), except the gather of the segment it reduced itself.
    fn recvs(&self, rank: usize) -> usize {
        let n = self.segs.len();
        let chunks = |seg: usize| self.segs[seg].len().div_ceil(self.chunk);
        let rs: usize = (0..n - 1).map(|s| chunks((rank + 2 * n - s - 1) % n)).sum();
        let ag: usize = (0..n - 1).map(|s| chunks((rank + n - s) % n)).sum();
        rs + ag
    }
}

/// Doorbells: ring the right neighbour with a chunk id, wait for the left one's. Reads take
/// every pending bell at once but never more than this operation's, so the next operation's
/// header stays in the socket.
struct Bells<'l> {
    link: &'l Link<'l>,
    buf: [u8; 512],
    have: usize,
    at: usize,
    left_to_read: usize,
}

impl<'l> Bells<'l> {
    fn new(link: &'l Link<'l>, recvs: usize) -> Self {
        Bells {
            link,
            buf: [0; 512],
            have: 0,
            at: 0,
            left_to_read: recvs * 4,
        }
    }

    fn ring(&mut self, id: u32) -> Result<()> {
        fence(Ordering::Release);
        wire::write_all(self.link.right, &id.to_le_bytes()).map_err(|e| self.link.write_err(e))
    }

    fn wait(&mut self, want: u32) -> Result<()> {
        use std::io::Read;
        while self.have - self.at < 4 {
            if self.at > 0 {
                self.buf.copy_within(self.at..self.have, 0);
                self.have -= self.at;
                self.at = 0;
            }
            let room = (self.buf.len() - self.have).min(self.left_to_read);
            if room == 0 {
                return Err(invalid(self.link.op, "more doorbells than chunks"));
            }
            let mut s = self.link.left;
            let got = match s.read(&mut self.buf[self.have..self.have + room]) {
                Ok(0) => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                Ok(got) => Ok(got),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
                Err(e) => Err(e),
            }
            .map_err(|e| link_error(e, self.link.left_rank, self.link.op, self.link.timeout))?;
            self.have += got;
            self.left_to_read -= got;
        }
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.buf[self.at..self.at + 4]);
        self.at += 4;
        fence(Ordering::Acquire);
        let id = u32::from_le_bytes(b);
        if id != want {
            return Err(invalid(
                self.link.op,
                format!(
                    "out of step with rank {}: it announced chunk {id}, this rank expects {want}",
                    self.link.left_rank
                ),
            ));
        }
        Ok(())
    }
}

/// `dst[i] = src[i]` into a region.
///
/// # Safety
/// `dst` must be valid for `src.len()` floats that no one else touches meanwhile.
unsafe fn copy_out(src: &[f32], dst: *mut f32) {
    std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len());
}

/// `dst[i] = src[i]` from a region.
///
/// # Safety
/// `src` must be valid for `dst.len()` floats that no one writes meanwhile.
unsafe fn copy_in(dst: &mut [f32], src: *const f32) {
    std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len());
}

/// `acc[i] += left[i]`, also written to `out` (one pass over memory for reduce and forward).
///
/// # Safety
/// `left` and `out` must be valid for `acc.len()` floats, `left` not written and `out` not
/// read by anyone else meanwhile.
unsafe fn add_both(acc: &mut [f32], left: *const f32, out: *mut f32) {
    let left = std::slice::from_raw_parts(left, acc.len());
    let out = std::slice::from_raw_parts_mut(out, acc.len());
    for ((a, l), o) in acc.iter_mut().zip(left).zip(out.iter_mut()) {
        let v = *a + *l;
        *a = v;
        *o = v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_covers_every_element_once_and_counts_bells() {
        for (len, n, chunk) in [(10, 3, 2), (7, 5, 1), (1, 2, 4), (0, 2, 3), (100, 4, 7)] {
            let plan = Plan::new(len, n, chunk);
            let mut seen = vec![0; len];
            for seg in 0..n {
                for k in 0..plan.rounds {
                    for i in plan.chunk(seg, k).into_iter().flatten() {
                        seen[i] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "{len} {n} {chunk}");
            // What a rank rings (its segment, n−1 reduce hops, n−2 gather forwards) is what
            // its right neighbour waits for.
            let chunks = |seg: usize| {
                (0..plan.rounds)
                    .filter(|&k| plan.chunk(seg, k).is_some())
                    .count()
            };
            for r in 0..n {
                let mut sends = chunks(r);
                sends += (0..n - 1)
                    .map(|s| chunks((r + 2 * n - s - 1) % n))
                    .sum::<usize>();
                sends += (0..n.saturating_sub(2))
                    .map(|s| chunks((r + n - s) % n))
                    .sum::<usize>();
                assert_eq!(sends, plan.recvs((r + 1) % n), "{len} {n} {chunk} rank {r}");
            }
        }
    }
}
