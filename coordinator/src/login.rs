//! Dashboard logins without a credential in the URL: a login form (or a one-time link, as
//! `ferroclip train` prints) trades the viewer's credential for a random browser session id,
//! sent back as an HttpOnly cookie. Sessions live in memory: a restarted coordinator asks the
//! browser to log in again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The cookie that carries a browser session.
pub const COOKIE: &str = "ferroclip_session";
/// How long a browser session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a one-time login code may wait for its click.
pub const CODE_TTL: Duration = Duration::from_secs(24 * 3600);
/// At most this many live browser sessions (the oldest is forgotten first).
const MAX_SESSIONS: usize = 1024;

#[derive(Default)]
pub struct Logins {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    sessions: HashMap<String, Instant>,
    codes: HashMap<String, Instant>,
}

/// 32 random bytes, hex (the crypto provider's generator).
pub fn random_secret() -> String {
    let mut b = [0u8; 32];
    // Cannot fail on Linux (getrandom); a guessable session must never be issued.
    if rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut b)
        .is_err()
    {
        panic!("the system's random number generator failed");
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Logins {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new browser session id (after a valid credential or code).
    pub fn open_session(&self) -> String {
        let id = random_secret();
        let now = Instant::now();
        let mut g = self.lock();
        g.sessions
            .retain(|_, t| now.duration_since(*t) < SESSION_TTL);
        if g.sessions.len() >= MAX_SESSIONS {
            if let Some(oldest) = g
                .sessions
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(k, _)| k.clone())
            {
                g.sessions.remove(&oldest);
            }
        }
        g.sessions.insert(id.clone(), now);
        id
    }

    pub fn session_ok(&self, id: &str) -> bool {
        let g = self.lock();
        g.sessions
            .iter()
            .any(|(k, t)| crate::service::same_secret(id, k) && t.elapsed() < SESSION_TTL)
    }

    /// A code for one login (`/login?once=CODE`), valid for `CODE_TTL`.
    pub fn one_time_code(&self) -> String {
        let code = random_secret();
        let mut g = self.lock();
        g.codes.retain(|_, t| t.elapsed() < CODE_TTL);
        g.codes.insert(code.clone(), Instant::now());
        code
    }

    /// Uses up `code`; whether it was valid.
    pub fn redeem(&self, code: &str) -> bool {
        let mut g = self.lock();
        let hit = g
            .codes
            .iter()
            .find(|(k, _)| crate::service::same_secret(code, k))
            .map(|(k, t)| (k.clone(), t.elapsed() < CODE_TTL));
        match hit {
            Some((k, fresh)) => {
                g.codes.remove(&k);
                fresh
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_works_once_and_opens_a_session() {
        let l = Logins::default();
        let code = l.one_time_code();
        assert!(!l.redeem("nope"));
        assert!(l.redeem(&code));
        assert!(!l.redeem(&code), "one-time");
        let s = l.open_session();
        assert!(l.session_ok(&s));
        assert!(!l.session_ok(&random_secret()));
    }
}
