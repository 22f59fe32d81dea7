//! Who may talk to the coordinator: the job's shared token, checked on every call but health,
//! and the per-registration session secret that a worker's later calls must carry.
//!
//! Both are compared in constant time ([`subtle`]), so timing reveals nothing of them, and
//! neither ever appears in a `Debug` print, a log line or the job status.

use std::path::Path;
use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::Reason;

/// The environment variable holding the token itself (the flag `--auth-token-file` names a
/// file holding it instead, and wins).
pub const TOKEN_ENV: &str = "DANCEGRPO_AUTH_TOKEN";
/// The environment variable naming the token file (what `--auth-token-file` defaults to).
pub const TOKEN_FILE_ENV: &str = "DANCEGRPO_AUTH_TOKEN_FILE";
/// Shorter tokens are refused: 16 random characters are the least that resists guessing over
/// the network.
pub const MIN_TOKEN_LEN: usize = 16;

/// A token that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The token file cannot be read.
    #[error("cannot read the auth token file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The token is too short or holds characters that cannot travel in a header.
    #[error("the auth token from {from} is unusable: {why}")]
    Invalid {
        /// The file or the variable it came from.
        from: String,
        /// What is wrong.
        why: String,
    },
}

/// The job's shared secret. Cheap to clone; its `Debug` form hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthToken(Arc<str>);

impl std::fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthToken(<redacted>)")
    }
}

impl AuthToken {
    /// A token read from `from` (a file or a variable, for the error), surrounding whitespace
    /// (a file's final newline) trimmed.
    pub fn new(text: &str, from: &str) -> Result<Self, AuthError> {
        let t = text.trim();
        let invalid = |why: String| AuthError::Invalid { from: from.to_string(), why };
        if t.len() < MIN_TOKEN_LEN {
            return Err(invalid(format!(
                "it has {} characters, at least {MIN_TOKEN_LEN} are needed (for example \
                 `openssl rand -hex 32`)",
                t.len()
            )));
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                "only printable ASCII without spaces can travel in a header".into(),
            ));
        }
        Ok(Self(t.into()))
    }

    /// Reads the token from `path`.
    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| AuthError::Read { path: path.display().to_string(), source })?;
        Self::new(&text, &path.display().to_string())
    }

    /// The token a process uses: from `file` (the `--auth-token-file` flag or
    /// [`TOKEN_FILE_ENV`]) if given, else from `env_token` (the value of [`TOKEN_ENV`]), else
    /// none.
    pub fn resolve(
        file: Option<&Path>,
        env_token: Option<&str>,
    ) -> Result<Option<Self>, AuthError> {
        match (file, env_token.filter(|t| !t.is_empty())) {
            (Some(p), _) => Self::from_file(p).map(Some),
            (None, Some(t)) => Self::new(t, TOKEN_ENV).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// [`AuthToken::resolve`] with [`TOKEN_ENV`] from this process's environment. `file` is
    /// the `--auth-token-file` flag, which every binary declares with [`TOKEN_FILE_ENV`] as its
    /// variable, so that variable is read there, once.
    pub fn from_env(file: Option<&Path>) -> Result<Option<Self>, AuthError> {
        Self::resolve(file, std::env::var(TOKEN_ENV).ok().as_deref())
    }

    fn header(&self) -> MetadataValue<tonic::metadata::Ascii> {
        format!("Bearer {}", self.0).parse().expect("checked: printable ASCII")
    }

    /// Whether `presented` is this token, in time independent of where they differ.
    pub fn matches(&self, presented: &str) -> bool {
        ct_eq(&self.0, presented)
    }
}

/// Constant-time string equality (the lengths may leak, the contents do not).
pub fn ct_eq(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

/// The metadata key the token travels in.
pub const AUTHORIZATION: &str = "authorization";

/// Client side: puts the token on every call (nothing when there is none).
#[derive(Clone, Debug, Default)]
pub struct ClientAuth(Option<AuthToken>);

impl ClientAuth {
    /// Sends `token` with every call.
    pub fn new(token: Option<AuthToken>) -> Self {
        Self(token)
    }
}

impl Interceptor for ClientAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert(AUTHORIZATION, t.header());
        }
        Ok(req)
    }
}

/// Server side: refuses calls without the token with UNAUTHENTICATED. Without a token of its
/// own it lets everything through (a loopback coordinator, or `--insecure`).
#[derive(Clone, Debug, Default)]
pub struct ServerAuth(Option<AuthToken>);

impl ServerAuth {
    /// Requires `token` on every call it guards.
    pub fn new(token: Option<AuthToken>) -> Self {
        Self(token)
    }
}

impl Interceptor for ServerAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.0 else { return Ok(req) };
        let presented = req
            .metadata()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match presented {
            Some(p) if token.matches(p) => Ok(req),
            Some(_) => Err(Reason::Unauthenticated.status(
                "wrong auth token: give the job's token with --auth-token-file or \
                 DANCEGRPO_AUTH_TOKEN",
            )),
            None => Err(Reason::Unauthenticated.status(
                "this coordinator needs the job's auth token: give it with --auth-token-file \
                 or DANCEGRPO_AUTH_TOKEN",
            )),
        }
    }
}

/// A worker registration's secret: random, shown to that worker only.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionSecret(String);

impl std::fmt::Debug for SessionSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionSecret(<redacted>)")
    }
}

impl SessionSecret {
    /// 244 random bits from the operating system's generator (two v4 UUIDs).
    pub fn new() -> Self {
        Self(format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple()))
    }

    /// The secret, to send to its worker.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this secret, in constant time.
    pub fn matches(&self, presented: &str) -> bool {
        ct_eq(&self.0, presented)
    }
}

impl From<String> for SessionSecret {
    /// The secret as the coordinator sent it.
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl Default for SessionSecret {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> AuthToken {
        AuthToken::new("0123456789abcdef-token\n", "test").unwrap()
    }

    #[test]
    fn tokens_are_trimmed_checked_and_never_printed() {
        let t = token();
        assert!(t.matches("0123456789abcdef-token"));
        assert!(!t.matches("0123456789abcdef-tokeN"));
        assert!(!t.matches(""));
        assert!(!format!("{t:?}").contains("0123"), "{t:?}");
        let e = AuthToken::new("short", "/etc/token").unwrap_err().to_string();
        assert!(e.contains("/etc/token") && e.contains("at least 16"), "{e}");
        let e = AuthToken::new("0123456789 abcdef", "X").unwrap_err().to_string();
        assert!(e.contains("printable ASCII"), "{e}");
    }

    #[test]
    fn a_file_wins_over_the_variable_and_a_missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "from-the-file-0123456789\n").unwrap();
        let t = AuthToken::resolve(Some(&f), Some("from-the-environment-0123")).unwrap();
        assert!(t.unwrap().matches("from-the-file-0123456789"));
        let t = AuthToken::resolve(None, Some("from-the-environment-0123")).unwrap();
        assert!(t.unwrap().matches("from-the-environment-0123"));
        assert!(AuthToken::resolve(None, Some("")).unwrap().is_none());
        let e = AuthToken::resolve(Some(&dir.path().join("nope")), None).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }

    fn call(server: &mut ServerAuth, client: &mut ClientAuth) -> Result<(), Status> {
        server.call(client.call(Request::new(())).unwrap()).map(drop)
    }

    #[test]
    fn the_server_wants_the_right_token() {
        let mut server = ServerAuth::new(Some(token()));
        assert!(call(&mut server, &mut ClientAuth::new(Some(token()))).is_ok());
        for mut client in [
            ClientAuth::new(None),
            ClientAuth::new(Some(AuthToken::new("another-token-0123456789", "t").unwrap())),
        ] {
            let s = call(&mut server, &mut client).unwrap_err();
            assert_eq!(s.code(), tonic::Code::Unauthenticated);
            assert_eq!(Reason::of(&s), Some(Reason::Unauthenticated));
        }
        // Another scheme, or the token without its scheme.
        let mut req = Request::new(());
        req.metadata_mut().insert(AUTHORIZATION, "0123456789abcdef-token".parse().unwrap());
        assert!(server.call(req).is_err());
        // A server without a token lets everyone in.
        assert!(call(&mut ServerAuth::new(None), &mut ClientAuth::new(None)).is_ok());
    }

    #[test]
    fn secrets_are_fresh_long_and_hidden() {
        let (a, b) = (SessionSecret::new(), SessionSecret::new());
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), 64);
        assert!(a.matches(a.expose()) && !a.matches(b.expose()));
        assert!(!format!("{a:?}").contains(a.expose()));
    }
}
