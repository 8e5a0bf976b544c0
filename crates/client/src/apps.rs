//! Web endpoints ("apps") as a client sees them: auth modes by name, an app's URL on the server's gateway, and what
//! registering one returns. The RPCs themselves are methods of [`crate::Client`].

use fal_proto::controller::ApplicationAuthMode;

use crate::ClientError;

/// The auth modes by the names the CLI and the SDK take (those of the original client's `--auth`).
pub const AUTH_MODES: [&str; 3] = ["private", "public", "shared"];

/// `private` (the owner's keys, or an admin's), `public` (no key) or `shared` (any valid key).
pub fn parse_auth_mode(name: &str) -> Result<ApplicationAuthMode, ClientError> {
    match name.trim().to_ascii_lowercase().as_str() {
        "private" => Ok(ApplicationAuthMode::Private),
        "public" => Ok(ApplicationAuthMode::Public),
        "shared" => Ok(ApplicationAuthMode::Shared),
        _ => Err(ClientError::UnknownAuthMode { given: name.to_string() }),
    }
}

/// The name of an auth mode as the wire carries it; a value this client does not know is shown as a number.
pub fn auth_mode_name(mode: i32) -> String {
    match ApplicationAuthMode::try_from(mode) {
        Ok(ApplicationAuthMode::Private) => "private".into(),
        Ok(ApplicationAuthMode::Public) => "public".into(),
        Ok(ApplicationAuthMode::Shared) => "shared".into(),
        Err(_) => format!("mode {mode}"),
    }
}

/// The URL of an app on the server at `server_uri` (`http(s)://host:port`, as connected to): the gateway answers on
/// the server's own port, at `/apps/<user>/<alias or revision id>`.
pub fn app_url(server_uri: &str, user_id: &str, app: &str) -> String {
    format!("{}/apps/{user_id}/{app}", server_uri.trim_end_matches('/'))
}

/// A new revision of an app: its id and its owner (the first part of its path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub revision: String,
    pub user_id: String,
}

/// Which lines of an app's logs to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogsQuery {
    /// An alias or revision id of the caller's; `None`: every app of the caller's.
    pub app: Option<String>,
    /// The last this many lines; `None`: the server's default.
    pub lines: Option<i32>,
    /// Keep the stream open for new lines.
    pub follow: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_modes_by_name_both_ways() {
        for name in AUTH_MODES {
            assert_eq!(auth_mode_name(parse_auth_mode(name).unwrap() as i32), name);
        }
        assert_eq!(parse_auth_mode(" Public ").unwrap(), ApplicationAuthMode::Public);
        let error = parse_auth_mode("open").unwrap_err().to_string();
        assert!(error.contains("\"open\"") && error.contains("private, public or shared"), "{error}");
        assert_eq!(auth_mode_name(7), "mode 7");
    }

    #[test]
    fn app_urls_are_on_the_servers_port() {
        assert_eq!(app_url("http://127.0.0.1:6005", "alice", "hello"), "http://127.0.0.1:6005/apps/alice/hello");
        assert_eq!(app_url("https://api.example.com:443/", "bob", "r1"), "https://api.example.com:443/apps/bob/r1");
    }
}
