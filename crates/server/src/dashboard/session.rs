//! Dashboard sessions: signing in with a key gives a random session token, kept by the browser in an HttpOnly,
//! SameSite=Strict cookie (never in a URL; a session cookie, gone when the browser closes), and held here in memory
//! with the key it stands for. Each request checks that key again (a revoked key ends its sessions at once); a
//! server restart ends them all. Every form carries the session's own CSRF token, checked on each POST. Over TLS
//! the cookie is `__Host-` prefixed (Secure, host-only, path /): an app on a subdomain cannot set one for it.
//!
//! Apps share the dashboard's origin where they are served by path (`/apps/...`, `/queue/...`): the gateway never
//! hands them the session cookie, drops a session cookie they try to set, and sandboxes their answers
//! (`crate::gateway::sandboxed`), so a page of theirs cannot act as a signed-in user of the dashboard.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap};

/// The cookie's name over plaintext HTTP.
pub const COOKIE: &str = "fal_session";
/// Its name over TLS.
pub const SECURE_COOKIE: &str = "__Host-fal_session";

/// `headers`' `Cookie` values without the dashboard's session cookie: what an app is sent. Works on bytes: a cookie
/// of the app's that is not ASCII is kept as it was.
pub fn strip_session_cookie(headers: &mut HeaderMap) {
    let kept: Vec<&[u8]> = headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|value| value.as_bytes().split(|b| *b == b';'))
        .map(<[u8]>::trim_ascii)
        .filter(|pair| !pair.is_empty() && !is_session_cookie_bytes(cookie_name(pair)))
        .collect();
    let joined = kept.join(&b"; "[..]);
    headers.remove(header::COOKIE);
    if let (false, Ok(value)) = (joined.is_empty(), header::HeaderValue::from_bytes(&joined)) {
        headers.insert(header::COOKIE, value);
    }
}

/// The name of a `name=value` pair (all of it, without a `=`).
fn cookie_name(pair: &[u8]) -> &[u8] {
    pair.split(|b| *b == b'=').next().unwrap_or_default().trim_ascii()
}

fn is_session_cookie_bytes(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(COOKIE.as_bytes()) || name.eq_ignore_ascii_case(SECURE_COOKIE.as_bytes())
}

/// Drops the `Set-Cookie` headers of an app's answer that would set the dashboard's session cookie: those naming
/// it, and those with no name, whose value a browser sends back as a bare `name=value` (`=fal_session=TOKEN`).
pub fn drop_session_cookie_sets(headers: &mut HeaderMap) {
    let kept: Vec<header::HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|value| {
            let pair = value.as_bytes().split(|b| *b == b';').next().unwrap_or_default();
            let name = cookie_name(pair);
            !name.is_empty() && !is_session_cookie_bytes(name)
        })
        .cloned()
        .collect();
    headers.remove(header::SET_COOKIE);
    for value in kept {
        headers.append(header::SET_COOKIE, value);
    }
}

/// How long a session lasts without use (the cookie itself lasts until the browser closes).
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
    /// A message for the next page (what an action did), shown once.
    notice: Option<String>,
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
        let session = Session { key_id, key_secret, csrf: token(), used: Instant::now(), notice: None };
        sessions.insert(id.clone(), session);
        id
    }

    /// Keeps `notice` for session `id`'s next page.
    pub fn notify(&self, id: &str, notice: String) {
        if let Some(session) = self.0.lock().unwrap_or_else(|e| e.into_inner()).get_mut(id) {
            session.notice = Some(notice);
        }
    }

    /// Session `id`'s notice, if it has one, taken (shown once).
    pub fn take_notice(&self, id: &str) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get_mut(id)?.notice.take()
    }

    /// The session the request's cookie names, if it is live. Over TLS only the `__Host-` cookie counts (a plain one
    /// may have been set by someone else: a subdomain, a path-served app).
    pub fn of(&self, headers: &HeaderMap, tls: bool) -> Option<(String, Session)> {
        let id = cookie(headers, if tls { SECURE_COOKIE } else { COOKIE })?;
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

/// The value of cookie `name` in the request's `Cookie` headers (on bytes: another cookie that is not ASCII does not
/// hide it).
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|value| value.as_bytes().split(|b| *b == b';'))
        .map(<[u8]>::trim_ascii)
        .find_map(|pair| {
            let (key, value) = pair.split_at(pair.iter().position(|b| *b == b'=')?);
            (key == name.as_bytes()).then(|| String::from_utf8_lossy(&value[1..]).into_owned())
        })
}

/// The `Set-Cookie` value of a session (`__Host-` and `Secure` when the port serves TLS).
pub fn set_cookie(token: &str, secure: bool) -> String {
    match secure {
        true => format!("{SECURE_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Secure"),
        false => format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"),
    }
}

/// The `Set-Cookie` value that ends a session in the browser.
pub fn clear_cookie(secure: bool) -> String {
    match secure {
        true => format!("{SECURE_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Secure; Max-Age=0"),
        false => format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    }
}

/// Whether a form's CSRF token is the session's (in constant time).
pub fn csrf_matches(sent: &str, session: &Session) -> bool {
    use subtle::ConstantTimeEq;
    sent.len() == session.csrf.len() && bool::from(sent.as_bytes().ct_eq(session.csrf.as_bytes()))
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
        let (_, session) = sessions.of(&headers, false).unwrap();
        assert_eq!(session.key_id, "k");
        // Over TLS only the __Host- cookie counts.
        assert!(sessions.of(&headers, true).is_none());
        headers.insert(header::COOKIE, format!("{SECURE_COOKIE}={token}").parse().unwrap());
        assert!(sessions.of(&headers, true).is_some());
        // A cookie that is not ASCII beside it does not hide it.
        headers.insert(
            header::COOKIE,
            header::HeaderValue::from_bytes(format!("x=\u{e9}; {COOKIE}={token}").as_bytes()).unwrap(),
        );
        assert!(sessions.of(&headers, false).is_some());
        headers.insert(header::COOKIE, format!("{COOKIE}=not-a-session").parse().unwrap());
        assert!(sessions.of(&headers, false).is_none());
        sessions.remove(&token);
        headers.insert(header::COOKIE, format!("{COOKIE}={token}").parse().unwrap());
        assert!(sessions.of(&headers, false).is_none());
    }

    #[test]
    fn the_cookie_is_http_only_and_same_site() {
        let cookie = set_cookie("t", true);
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict") && cookie.contains("Secure"));
        assert!(cookie.starts_with("__Host-") && !cookie.contains("Domain"));
        assert!(!set_cookie("t", false).contains("Secure"));
    }

    #[test]
    fn apps_are_neither_sent_nor_may_set_the_session_cookie() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, "a=1; fal_session=secret; b=2".parse().unwrap());
        headers.append(header::COOKIE, "__Host-fal_session=s2".parse().unwrap());
        strip_session_cookie(&mut headers);
        assert_eq!(headers.get_all(header::COOKIE).iter().collect::<Vec<_>>(), ["a=1; b=2"]);
        let mut only = HeaderMap::new();
        only.insert(header::COOKIE, "fal_session=secret".parse().unwrap());
        strip_session_cookie(&mut only);
        assert!(only.get(header::COOKIE).is_none());
        let mut theirs = HeaderMap::new();
        theirs.insert(header::COOKIE, header::HeaderValue::from_bytes("x=\u{e9}; fal_session=s".as_bytes()).unwrap());
        strip_session_cookie(&mut theirs);
        assert_eq!(theirs[header::COOKIE].as_bytes(), "x=\u{e9}".as_bytes());

        let mut answer = HeaderMap::new();
        answer.append(header::SET_COOKIE, "theirs=1; Path=/".parse().unwrap());
        answer.append(header::SET_COOKIE, "FAL_SESSION=fixed; Path=/".parse().unwrap());
        answer.append(header::SET_COOKIE, "__Host-fal_session=fixed; Path=/; Secure".parse().unwrap());
        answer.append(header::SET_COOKIE, "=fal_session=fixed; Path=/workers".parse().unwrap());
        drop_session_cookie_sets(&mut answer);
        assert_eq!(answer.get_all(header::SET_COOKIE).iter().collect::<Vec<_>>(), ["theirs=1; Path=/"]);
    }
}
