//! Dashboard sessions: signing in with a key gives a random session token, kept by the browser in an HttpOnly,
//! SameSite=Strict cookie (never in a URL), and held here in memory with the key it stands for. Each request
//! checks that key again (a revoked key ends its sessions at once); a server restart ends them all.
//! Every form carries the session's own CSRF token, checked on each POST.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap};

/// The cookie's name.
pub const COOKIE: &str = "fal_session";
/// How long a session lasts without use.
const IDLE_LIMIT: Duration = Duration::from_secs(12 * 3600);
/// Sessions held at most: past it the oldest go first.
const MAX_SESSIONS: usize = 10_000;

/// What a session stands for.
#[derive(Debug, Clone)]
pub struct Session {
    pub key_id: String,
    pub key_secret: String,
    /// The token each of its forms sends back.
    pub csrf: String,
    used: Instant,
}

#[derive(Debug, Default)]
pub struct Sessions(Mutex<HashMap<String, Session>>);

fn token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

impl Sessions {
    /// A new session for a key already verified; returns its token.
    pub fn create(&self, key_id: String, key_secret: String) -> String {
        let mut sessions = self.0.lock().unwrap_or_else(|e| e.into_inner());
        sessions.retain(|_, session| session.used.elapsed() < IDLE_LIMIT);
        if sessions.len() >= MAX_SESSIONS {
            if let Some(oldest) = sessions.iter().min_by_key(|(_, s)| s.used).map(|(t, _)| t.clone()) {
                sessions.remove(&oldest);
            }
        }
        let id = token();
        sessions.insert(id.clone(), Session { key_id, key_secret, csrf: token(), used: Instant::now() });
        id
    }

    /// The session the request's cookie names, if it is live.
    pub fn of(&self, headers: &HeaderMap) -> Option<(String, Session)> {
        let id = cookie(headers, COOKIE)?;
        let mut sessions = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let session = sessions.get_mut(&id)?;
        if session.used.elapsed() >= IDLE_LIMIT {
            sessions.remove(&id);
            return None;
        }
        session.used = Instant::now();
        Some((id, session.clone()))
    }

    pub fn remove(&self, id: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.to_string())
}

/// The `Set-Cookie` value of a session (`Secure` when the port serves TLS).
pub fn set_cookie(token: &str, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}", IDLE_LIMIT.as_secs())
}

/// The `Set-Cookie` value that ends a session in the browser.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_found_by_its_cookie_only() {
        let sessions = Sessions::default();
        let token = sessions.create("k".into(), "s".into());
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, format!("other=1; {COOKIE}={token}").parse().unwrap());
        let (_, session) = sessions.of(&headers).unwrap();
        assert_eq!(session.key_id, "k");
        headers.insert(header::COOKIE, format!("{COOKIE}=not-a-session").parse().unwrap());
        assert!(sessions.of(&headers).is_none());
        sessions.remove(&token);
        headers.insert(header::COOKIE, format!("{COOKIE}={token}").parse().unwrap());
        assert!(sessions.of(&headers).is_none());
    }

    #[test]
    fn the_cookie_is_http_only_and_same_site() {
        let cookie = set_cookie("t", true);
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict") && cookie.contains("Secure"));
        assert!(!set_cookie("t", false).contains("Secure"));
    }
}
