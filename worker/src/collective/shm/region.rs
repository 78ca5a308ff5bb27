//! The shared-memory regions: files in /dev/shm with their pages reserved, mapped read-write by
//! their owner and read-only by its right neighbour; names checked when a neighbour sends them;
//! and the host id that tells whether every rank shares this /dev/shm.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

const SHM_DIR: &str = "/dev/shm";
const PREFIX: &str = "ferroclip-ar-";

/// Distinguishes the regions of several rings in one process (tests run ranks as threads).
static REGIONS: AtomicU64 = AtomicU64::new(0);

/// Identifies "this host's /dev/shm": kernel boot, UTS hostname and the tmpfs device, so two
/// containers with private /dev/shm mounts on one kernel do not match. `None` when unknown or
/// when /dev/shm cannot hold a region here (so "auto" picks TCP).
pub(crate) fn host_id() -> Option<u64> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let dev = std::fs::metadata(SHM_DIR).ok()?;
    let mut h = fnv(0xcbf2_9ce4_8422_2325, boot.trim().as_bytes());
    h = fnv(h, host.trim().as_bytes());
    h = fnv(h, &dev.dev().to_le_bytes());
    let probe = format!(
        "{SHM_DIR}/{PREFIX}{}-{}-probe",
        std::process::id(),
        REGIONS.fetch_add(1, Ordering::Relaxed)
    );
    let usable = create_region(Path::new(&probe), 4096);
    if usable.is_ok() {
        let _ = std::fs::remove_file(&probe);
    }
    if let Err(e) = usable {
        tracing::info!(error = %e, "/dev/shm is not usable for shared-memory all-reduce");
        return None;
    }
    Some(h)
}

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A shared file mapping, unmapped on drop.
pub(super) struct Mapping {
    pub ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory; access is coordinated by the doorbell protocol.
unsafe impl Send for Mapping {}

impl Mapping {
    fn map(file: &File, len: usize, writable: bool) -> io::Result<Self> {
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh mapping of an open file of at least `len` bytes; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr: p.cast(), len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len come from a successful mmap and nothing borrows them any more.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// Create this rank's region file with its pages reserved (a full tmpfs then fails here with
/// an error instead of a SIGBUS on first touch) and map it.
pub(super) fn create_region(path: &Path, len: usize) -> io::Result<Mapping> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    let reserve_and_map = || {
        let len_off = libc::off_t::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "region too large"))?;
        // SAFETY: a valid open file descriptor.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len_off) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Mapping::map(&file, len, true)
    };
    let mapped = reserve_and_map();
    if mapped.is_err() {
        let _ = std::fs::remove_file(path);
    }
    mapped
}

pub(super) fn open_region(path: &Path, len: usize) -> io::Result<Mapping> {
    let file = File::open(path)?;
    let have = file.metadata()?.len();
    if have < len as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} holds {have} bytes, expected {len}", path.display()),
        ));
    }
    Mapping::map(&file, len, false)
}

/// A region path received from a neighbour: only our own kind of file in /dev/shm.
pub(super) fn checked_path(raw: &[u8]) -> Option<&Path> {
    let s = std::str::from_utf8(raw).ok()?;
    let name = s.strip_prefix(SHM_DIR)?.strip_prefix('/')?;
    let ok = name.starts_with(PREFIX)
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    ok.then_some(Path::new(s))
}

/// A fresh name for `rank`'s region in `generation`: unique in this process and among processes.
pub(super) fn region_path(generation: u64, rank: usize) -> String {
    format!(
        "{SHM_DIR}/{PREFIX}{}-{}-g{}-r{}",
        std::process::id(),
        REGIONS.fetch_add(1, Ordering::Relaxed),
        generation,
        rank
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_names_from_peers_are_checked() {
        assert!(checked_path(b"/dev/shm/ferroclip-ar-12-0-g3-r1").is_some());
        assert!(checked_path(b"/dev/shm/ferroclip-ar-../../etc/passwd").is_none());
        assert!(checked_path(b"/etc/ferroclip-ar-1").is_none());
        assert!(checked_path(b"/dev/shm/other").is_none());
        assert!(checked_path(b"").is_none());
    }
}
