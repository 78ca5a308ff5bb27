//! A stable-Rust fuzz harness: each target is an ordinary `#[test]` named `fuzz_*` that hands
//! [`Fuzzer::run`] its seeds (real inputs the code itself produced), the target's regression
//! inputs and a function that must accept any bytes without panicking. The loop is
//! coverage-free: it runs the seeds and regression inputs as they are, then mutates them (bit
//! flips, interesting integers at any offset, truncations, splices, repeated ranges, dictionary
//! tokens, deep nesting) until the time budget is spent.
//!
//! - Budget: `FERROCLIP_FUZZ_SECS` seconds per target (default 2, so the normal test suite
//!   stays fast; CI sets 30). The executions are printed (`fuzz <target>: N executions ...`)
//!   and appended to the file `FERROCLIP_FUZZ_REPORT` names, if set, with any slow input.
//! - Reproduction: the run's seed is printed; `FERROCLIP_FUZZ_SEED` replays it.
//! - A slow input (longer than [`SLOW`]) is saved as `slow-<hash>` next to the findings and
//!   named on stderr and in the report, without failing: a slow path shows before it hangs.
//! - A finding (a panic, an input running longer than [`HANG`], or, under [`LimitAlloc`], one
//!   allocation beyond the target's limit) writes the input to
//!   `$FERROCLIP_FUZZ_FINDINGS/<target>/` (default `target/fuzz-findings/`) and fails the test
//!   naming that file; add the file to the target's corpus directory to keep it as a
//!   regression test.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longer than this on one input is a hang (a finding). Not a speed check: real inputs take
/// milliseconds; only a loop that never ends reaches it.
pub const HANG: Duration = Duration::from_secs(60);

/// Longer than this on one input is slow: not a failure, but the input is saved (`slow-<hash>`
/// in the findings folder) and named on stderr, so that a slow path is found before it turns
/// into a hang (libFuzzer's `-report_slow_units`).
pub const SLOW: Duration = Duration::from_secs(5);

/// The default per-target budget when `FERROCLIP_FUZZ_SECS` is unset.
pub const DEFAULT_SECS: f64 = 2.0;

/// Tokens worth inserting into JSON inputs.
pub const JSON_DICT: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"null",
    b"true",
    b"-1",
    b"0",
    b"1e999",
    b"-1e999",
    b"18446744073709551615",
    b"18446744073709551616",
    b"4294967296",
    b"-9223372036854775808",
    b"1.5",
    b"NaN",
    b"\"\\u0000\"",
    b"\"\\ud800\"",
    b"[]",
    b"{}",
    b"\"format_version\"",
    b"\"\xff\xfe\"",
];

/// Tokens worth inserting into TOML inputs.
pub const TOML_DICT: &[&[u8]] = &[
    b"[",
    b"]",
    b"[[",
    b"]]",
    b"=",
    b"\n",
    b"\"",
    b"'''",
    b"\"\"\"",
    b"#",
    b".",
    b"-1",
    b"0",
    b"nan",
    b"inf",
    b"-inf",
    b"1e999",
    b"18446744073709551615",
    b"9223372036854775807",
    b"-9223372036854775808",
    b"true",
    b"1979-05-27T07:32:00Z",
    b"{}",
    b"[]",
    b"0x7fffffff",
    b"[run]\n",
    b"[model]\n",
    b"[optim]\n",
    b"[data]\n",
];

/// Per-target options.
#[derive(Clone, Debug)]
pub struct Fuzzer {
    name: String,
    budget: Duration,
    dict: Vec<Vec<u8>>,
    max_len: usize,
    /// Extra inputs run first as they are: the committed corpus of the target.
    corpus_dirs: Vec<PathBuf>,
    /// With [`LimitAlloc`] installed: the largest single allocation allowed while an input runs.
    alloc_limit: usize,
    /// An input running longer is saved as slow ([`SLOW`]).
    slow: Duration,
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct Report {
    pub executions: u64,
    pub seconds: f64,
    pub seed: u64,
    pub corpus: usize,
}

impl Fuzzer {
    pub fn new(name: &str) -> Self {
        let secs = std::env::var("FERROCLIP_FUZZ_SECS")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .unwrap_or(DEFAULT_SECS);
        Fuzzer {
            name: name.to_string(),
            budget: Duration::from_secs_f64(secs),
            dict: Vec::new(),
            max_len: 1 << 20,
            corpus_dirs: Vec::new(),
            alloc_limit: 1 << 30,
            slow: SLOW,
        }
    }

    /// Overrides [`SLOW`] (tests of the harness itself).
    pub fn slow_after(mut self, d: Duration) -> Self {
        self.slow = d;
        self
    }

    pub fn dict(mut self, tokens: &[&[u8]]) -> Self {
        self.dict.extend(tokens.iter().map(|t| t.to_vec()));
        self
    }

    /// Mutants are cut to this length.
    pub fn max_len(mut self, n: usize) -> Self {
        self.max_len = n;
        self
    }

    /// A directory of regression inputs (missing: none), run before any mutant.
    pub fn corpus_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.corpus_dirs.push(dir.as_ref().to_path_buf());
        self
    }

    pub fn alloc_limit(mut self, bytes: usize) -> Self {
        self.alloc_limit = bytes;
        self
    }

    /// Overrides `FERROCLIP_FUZZ_SECS` (tests of the harness itself).
    pub fn budget(mut self, d: Duration) -> Self {
        self.budget = d;
        self
    }

    /// Runs `target` on every regression input and seed, then on mutants until the budget is
    /// spent. Panics (failing the calling test) on the first finding, naming the saved input.
    pub fn run(&self, seeds: &[Vec<u8>], mut target: impl FnMut(&[u8])) -> Report {
        let seed = std::env::var("FERROCLIP_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                let mut h = DefaultHasher::new();
                (std::time::SystemTime::now(), std::process::id(), &self.name).hash(&mut h);
                h.finish()
            });
        let mut rng = Rng(seed | 1);
        let mut regressions: Vec<(String, Vec<u8>)> = Vec::new();
        for dir in &self.corpus_dirs {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
                .unwrap_or_default();
            files.sort();
            for f in files {
                if let Ok(b) = std::fs::read(&f) {
                    regressions.push((f.display().to_string(), b));
                }
            }
        }
        let mut pool: Vec<Vec<u8>> = seeds.to_vec();
        pool.extend(regressions.iter().map(|(_, b)| b.clone()));
        assert!(!pool.is_empty(), "fuzz {}: no seeds", self.name);
        let watchdog = Watchdog::start(&self.name);
        let start = Instant::now();
        let mut executions = 0u64;
        let mut exec = |input: &[u8], origin: &str, executions: &mut u64| {
            watchdog.begin(input);
            CURRENT.store(input.as_ptr() as *mut u8, Ordering::SeqCst);
            CURRENT_LEN.store(input.len(), Ordering::SeqCst);
            ALLOC_LIMIT.store(self.alloc_limit, Ordering::SeqCst);
            FINDINGS_TARGET
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone_from(&self.name);
            ARMED.store(true, Ordering::SeqCst);
            let t0 = Instant::now();
            let out = catch_unwind(AssertUnwindSafe(|| target(input)));
            ARMED.store(false, Ordering::SeqCst);
            watchdog.end();
            let took = t0.elapsed();
            if took > self.slow {
                let file = save_input(&self.name, "slow", input);
                eprintln!(
                    "fuzz {}: {origin} input took {:.1} s (slow); saved as {} ({} bytes)",
                    self.name,
                    took.as_secs_f64(),
                    file.display(),
                    input.len()
                );
                report_line(&format!(
                    "{}\tslow input: {:.1} s, saved as {}\n",
                    self.name,
                    took.as_secs_f64(),
                    file.display()
                ));
            }
            *executions += 1;
            if let Err(p) = out {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                let file = save_finding(&self.name, input);
                panic!(
                    "fuzz {}: {origin} input panicked ({msg}); input saved as {} ({} bytes: {})",
                    self.name,
                    file.display(),
                    input.len(),
                    preview(input)
                );
            }
        };
        for (origin, input) in &regressions {
            exec(input, origin, &mut executions);
        }
        for input in seeds {
            exec(input, "seed", &mut executions);
        }
        while start.elapsed() < self.budget {
            let input = self.mutate(&pool, &mut rng);
            exec(&input, "mutated", &mut executions);
        }
        let report = Report {
            executions,
            seconds: start.elapsed().as_secs_f64(),
            seed,
            corpus: pool.len(),
        };
        println!(
            "fuzz {}: {} executions in {:.1} s ({} seeds and regression inputs; FERROCLIP_FUZZ_SEED={})",
            self.name, report.executions, report.seconds, report.corpus, report.seed
        );
        report_line(&format!(
            "{}\t{} executions\t{:.1} s\tseed {}\n",
            self.name, report.executions, report.seconds, report.seed
        ));
        report
    }

    fn mutate(&self, pool: &[Vec<u8>], rng: &mut Rng) -> Vec<u8> {
        let mut b = pool[rng.below(pool.len())].clone();
        let most = if rng.below(4) == 0 { 16 } else { 3 };
        let rounds = 1 + rng.below(most);
        for _ in 0..rounds {
            mutate_once(&mut b, pool, &self.dict, rng);
        }
        b.truncate(self.max_len);
        b
    }
}

const INTERESTING: &[u64] = &[
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    (1 << 32) + 1,
    1 << 40,
    i64::MAX as u64,
    1 << 63,
    u64::MAX,
    u64::MAX - 1,
];

fn mutate_once(b: &mut Vec<u8>, pool: &[Vec<u8>], dict: &[Vec<u8>], rng: &mut Rng) {
    let len = b.len();
    match rng.below(12) {
        // Bit flip.
        0 if len > 0 => {
            let i = rng.below(len);
            b[i] ^= 1 << rng.below(8);
        }
        // Random byte.
        1 if len > 0 => {
            let i = rng.below(len);
            b[i] = rng.next() as u8;
        }
        // An interesting integer (LE or BE, 1, 2, 4 or 8 bytes) over any offset: length fields.
        2 if len > 0 => {
            let v = INTERESTING[rng.below(INTERESTING.len())];
            let w = [1usize, 2, 4, 8][rng.below(4)];
            let bytes = if rng.below(2) == 0 {
                v.to_le_bytes()
            } else {
                v.to_be_bytes()
            };
            let bytes = if rng.below(2) == 0 {
                &bytes[..w]
            } else {
                &bytes[8 - w..]
            };
            let i = rng.below(len);
            for (k, x) in bytes.iter().enumerate() {
                if let Some(d) = b.get_mut(i + k) {
                    *d = *x;
                }
            }
        }
        // Truncate.
        3 if len > 0 => b.truncate(rng.below(len)),
        // Delete a range.
        4 if len > 1 => {
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(64));
            b.drain(i..i + n);
        }
        // Duplicate a range in place.
        5 if len > 0 => {
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(64));
            let chunk = b[i..i + n].to_vec();
            let at = rng.below(len + 1);
            b.splice(at..at, chunk);
        }
        // Splice: head of this one, tail of another.
        6 => {
            let other = &pool[rng.below(pool.len())];
            let i = rng.below(len + 1);
            let j = rng.below(other.len() + 1);
            b.truncate(i);
            b.extend_from_slice(&other[j..]);
        }
        // A dictionary token inserted or overwriting.
        7 | 8 if !dict.is_empty() => {
            let t = &dict[rng.below(dict.len())];
            let at = rng.below(len + 1);
            if rng.below(2) == 0 {
                b.splice(at..at, t.iter().copied());
            } else {
                let end = (at + t.len()).min(len);
                b.splice(at..end, t.iter().copied());
            }
        }
        // Deep nesting: many copies of one opening token.
        9 => {
            let opener: &[u8] = [b"[".as_slice(), b"{\"a\":", b"[[", b"{"][rng.below(4)];
            let n = [64usize, 1000, 100_000][rng.below(3)];
            let at = rng.below(len + 1);
            b.splice(
                at..at,
                opener.iter().copied().cycle().take(opener.len() * n),
            );
        }
        // A random digit string over a number.
        10 if len > 0 => {
            let at = rng.below(len);
            let digits = format!("{}", rng.next() >> rng.below(64));
            let end = (at + digits.len()).min(len);
            b.splice(at..end, digits.bytes());
        }
        // Swap two bytes.
        _ if len > 1 => {
            let (i, j) = (rng.below(len), rng.below(len));
            b.swap(i, j);
        }
        _ => b.push(rng.next() as u8),
    }
}

/// xorshift64*: deterministic for a seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Appends a line to the file `FERROCLIP_FUZZ_REPORT` names, if set (test runners capture
/// stdout; CI prints the file at the end).
fn report_line(line: &str) {
    if let Some(path) = std::env::var_os("FERROCLIP_FUZZ_REPORT") {
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
    }
}

fn findings_dir() -> PathBuf {
    std::env::var_os("FERROCLIP_FUZZ_FINDINGS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // Tests run in their package's directory; the workspace's target/ is one up.
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("../target"));
            target.join("fuzz-findings")
        })
}

fn save_finding(target: &str, input: &[u8]) -> PathBuf {
    save_input(target, "crash", input)
}

fn save_input(target: &str, kind: &str, input: &[u8]) -> PathBuf {
    let mut h = DefaultHasher::new();
    input.hash(&mut h);
    let dir = findings_dir().join(target);
    let file = dir.join(format!("{kind}-{:016x}", h.finish()));
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(&file, input);
    file
}

/// The first bytes of an input, escaped.
pub fn preview(input: &[u8]) -> String {
    let head = &input[..input.len().min(200)];
    let s: String = head.escape_ascii().to_string();
    if input.len() > head.len() {
        format!("b\"{s}\"...")
    } else {
        format!("b\"{s}\"")
    }
}

/// Reports an input that runs past [`HANG`] and ends the process (a hung test would otherwise
/// only time out, with the input lost).
/// When the running input started, and the input.
type Running = Arc<Mutex<Option<(Instant, Vec<u8>)>>>;

struct Watchdog {
    state: Running,
    stop: Arc<AtomicBool>,
}

impl Watchdog {
    fn start(name: &str) -> Self {
        let state: Running = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st, name) = (state.clone(), stop.clone(), name.to_string());
        std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(200));
                let guard = s.lock().unwrap_or_else(|p| p.into_inner());
                if let Some((t, input)) = guard.as_ref() {
                    if t.elapsed() > HANG {
                        let file = save_finding(&name, input);
                        eprintln!(
                            "fuzz {name}: an input ran for more than {HANG:?} (a hang); saved as {} ({} bytes: {})",
                            file.display(),
                            input.len(),
                            preview(input)
                        );
                        std::process::abort();
                    }
                }
            }
        });
        Watchdog { state, stop }
    }

    fn begin(&self, input: &[u8]) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), input.to_vec()));
    }

    fn end(&self) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

static ARMED: AtomicBool = AtomicBool::new(false);
static ALLOC_LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);
static CURRENT: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static CURRENT_LEN: AtomicUsize = AtomicUsize::new(0);
static FINDINGS_TARGET: Mutex<String> = Mutex::new(String::new());
static LARGEST: AtomicU64 = AtomicU64::new(0);

/// A global allocator for fuzz test binaries (`#[global_allocator] static A: LimitAlloc =
/// LimitAlloc;`): while an input runs, one allocation beyond the target's
/// [`Fuzzer::alloc_limit`] is a finding. An allocator must not unwind, so it saves the input,
/// says so and aborts the process.
pub struct LimitAlloc;

/// The largest single allocation seen while inputs ran (under [`LimitAlloc`]).
pub fn largest_allocation() -> u64 {
    LARGEST.load(Ordering::Relaxed)
}

impl LimitAlloc {
    fn check(size: usize) {
        if ARMED.load(Ordering::Relaxed) {
            LARGEST.fetch_max(size as u64, Ordering::Relaxed);
            if size > ALLOC_LIMIT.load(Ordering::Relaxed) && ARMED.swap(false, Ordering::SeqCst) {
                // Disarmed: what follows may allocate.
                let ptr = CURRENT.load(Ordering::SeqCst);
                let len = CURRENT_LEN.load(Ordering::SeqCst);
                // SAFETY: the harness stores the input being run, which lives until it returns.
                let input = unsafe { std::slice::from_raw_parts(ptr, len) }.to_vec();
                let name = FINDINGS_TARGET
                    .lock()
                    .map(|n| n.clone())
                    .unwrap_or_default();
                let file = save_finding(&name, &input);
                eprintln!(
                    "fuzz {name}: an input asked for one allocation of {size} bytes (limit {}); saved as {} ({} bytes: {})\n{}",
                    ALLOC_LIMIT.load(Ordering::SeqCst),
                    file.display(),
                    input.len(),
                    preview(&input),
                    std::backtrace::Backtrace::force_capture()
                );
                std::process::abort();
            }
        }
    }
}

// SAFETY: every call goes to `System` after a check that only reads atomics (or aborts).
unsafe impl GlobalAlloc for LimitAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::check(layout.size());
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::check(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::check(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuzz_harness_runs_seeds_and_mutants_and_reports_a_panic() {
        // The harness's own targets stay out of CI's fuzz report (its deliberate slow input
        // would read as a finding there).
        std::env::remove_var("FERROCLIP_FUZZ_REPORT");
        let mut seen = 0u64;
        let r = Fuzzer::new("harness-ok")
            .dict(JSON_DICT)
            .budget(Duration::from_millis(200))
            .run(&[b"{\"a\": [1, 2]}".to_vec()], |b| {
                seen += 1;
                let _ = std::str::from_utf8(b);
            });
        assert_eq!(r.executions, seen);
        assert!(r.executions >= 1);
        let dir = std::env::temp_dir().join(format!("ferroclip-fuzz-{}", std::process::id()));
        std::env::set_var("FERROCLIP_FUZZ_FINDINGS", &dir);
        let caught = catch_unwind(|| {
            Fuzzer::new("harness-panics")
                .budget(Duration::from_secs(5))
                .run(&[b"abc".to_vec()], |b| assert!(b.len() < 3, "too long"))
        });
        let msg = caught.unwrap_err();
        let msg = msg.downcast_ref::<String>().unwrap();
        assert!(msg.contains("seed input panicked (too long)"), "{msg}");
        assert!(msg.contains("b\"abc\""), "{msg}");
        let saved: Vec<_> = std::fs::read_dir(dir.join("harness-panics"))
            .unwrap()
            .collect();
        assert_eq!(saved.len(), 1);
        // A slow input is saved and named, and the run goes on.
        let r = Fuzzer::new("harness-slow")
            .budget(Duration::ZERO)
            .slow_after(Duration::from_millis(20))
            .run(&[b"quick".to_vec(), b"slow".to_vec()], |b| {
                if b == b"slow" {
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        assert_eq!(r.executions, 2);
        let saved: Vec<PathBuf> = std::fs::read_dir(dir.join("harness-slow"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(saved.len(), 1, "{saved:?}");
        assert!(saved[0]
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("slow-"));
        assert_eq!(std::fs::read(&saved[0]).unwrap(), b"slow");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn mutants_stay_within_max_len_and_vary() {
        let f = Fuzzer::new("m").dict(TOML_DICT).max_len(100);
        let pool = vec![b"[run]\nname = \"x\"\n".to_vec()];
        let mut rng = Rng(7);
        let mutants: std::collections::HashSet<Vec<u8>> =
            (0..500).map(|_| f.mutate(&pool, &mut rng)).collect();
        assert!(mutants.iter().all(|m| m.len() <= 100));
        assert!(mutants.len() > 100, "{}", mutants.len());
    }
}
