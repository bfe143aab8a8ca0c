//! Connection tokens: which one a connection presents, where fresh ones come from, and when to
//! refresh one before it expires.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use crate::{Error, Welcome};

/// A token provider's answer in the making.
pub(crate) type TokenFuture = Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;

/// Makes fresh tokens: see [`crate::ClientBuilder::token_provider`].
pub(crate) type TokenProvider = Arc<dyn Fn() -> TokenFuture + Send + Sync>;

/// Refreshing a token with less left than this would hardly buy time: it is left to expire
/// (4002) and the client reconnects with a fresh one.
const MIN_REFRESH_LEFT: Duration = Duration::from_secs(1);

pub(crate) struct Tokens {
    /// The token the connection presents: the one given, the provider's last, or the last one
    /// an `auth` replaced it with. Without a provider, reconnections present it too.
    current: Option<String>,
    pub(crate) provider: Option<TokenProvider>,
    /// How long before expiry to refresh (None: never).
    refresh_ahead: Option<Duration>,
    /// What the server adds to a token's `exp` (its leeway), as last seen in a welcome.
    leeway: u64,
    /// When the connection's token expires (Unix seconds): from the welcome, then from each
    /// token an `auth` sent.
    expires_at: Option<u64>,
}

impl Tokens {
    pub(crate) fn new(
        token: Option<String>,
        provider: Option<TokenProvider>,
        refresh_ahead: Option<Duration>,
    ) -> Self {
        Tokens {
            current: token,
            provider,
            refresh_ahead,
            leeway: 0,
            expires_at: None,
        }
    }

    /// The token for a connection: the first connection presents the token given, if any;
    /// every other asks the provider, if there is one.
    pub(crate) async fn for_connection(&self, first: bool) -> Result<Option<String>, Error> {
        match &self.provider {
            Some(provider) if !(first && self.current.is_some()) => {
                provider().await.map(Some).map_err(Error::Token)
            }
            _ => Ok(self.current.clone()),
        }
    }

    /// A connection opened with `token` and was welcomed.
    pub(crate) fn connected(&mut self, token: Option<String>, welcome: &Welcome) {
        if token.is_some() {
            self.current = token;
        }
        self.expires_at = welcome.expires_at;
        if let (Some(at), Some(exp)) = (self.expires_at, self.current.as_deref().and_then(exp)) {
            self.leeway = at.saturating_sub(exp);
        }
    }

    /// The server acknowledged `auth` with this token: it is the connection's now.
    pub(crate) fn authenticated(&mut self, token: String) {
        // The ack does not say when the new token expires; a JWT does (an API key never expires).
        self.expires_at = exp(&token).map(|exp| exp.saturating_add(self.leeway));
        self.current = Some(token);
    }

    /// How long until the provider should be asked for a fresh token: `refresh_ahead` before
    /// expiry, at most half the time left. None when there is nothing to refresh, or no time.
    pub(crate) fn refresh_in(&self) -> Option<Duration> {
        self.provider.as_ref()?;
        let ahead = self.refresh_ahead?;
        let expires = UNIX_EPOCH + Duration::from_secs(self.expires_at?);
        let left = expires.duration_since(SystemTime::now()).ok()?;
        if left <= MIN_REFRESH_LEFT {
            return None;
        }
        Some(left - ahead.min(left / 2))
    }
}

/// The `exp` claim of a JWT, read without checking the signature (the server checks it): only
/// to know when to refresh. None for anything else (an API key, an opaque token).
fn exp(token: &str) -> Option<u64> {
    use base64::Engine as _;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const URL_SAFE_ANY_PADDING: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    #[derive(Deserialize)]
    struct Claims {
        exp: Option<u64>,
    }
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    let json = URL_SAFE_ANY_PADDING.decode(payload).ok()?;
    serde_json::from_slice::<Claims>(&json).ok()?.exp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> String {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.sig", b64(r#"{"alg":"HS256"}"#), b64(claims))
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn exp_is_read_from_a_jwt_only() {
        assert_eq!(
            exp(&jwt(r#"{"sub":"u","exp":1700000000}"#)),
            Some(1700000000)
        );
        assert_eq!(exp(&jwt(r#"{"sub":"u"}"#)), None);
        assert_eq!(exp("an-api-key"), None);
        assert_eq!(exp("a.b.c"), None);
    }

    #[test]
    fn refreshes_ahead_of_expiry_at_most_halfway() {
        let provider: TokenProvider = Arc::new(|| Box::pin(async { Ok(String::new()) }));
        let mut tokens = Tokens::new(None, Some(provider), Some(Duration::from_secs(30)));
        tokens.authenticated(jwt(&format!(r#"{{"exp":{}}}"#, now() + 3600)));
        let wait = tokens.refresh_in().unwrap();
        assert!(wait > Duration::from_secs(3500) && wait <= Duration::from_secs(3570));
        // A short-lived token: halfway.
        tokens.authenticated(jwt(&format!(r#"{{"exp":{}}}"#, now() + 10)));
        let wait = tokens.refresh_in().unwrap();
        assert!(
            wait >= Duration::from_secs(4) && wait <= Duration::from_secs(5),
            "{wait:?}"
        );
        // Nearly expired, no expiry, or refreshing off: nothing to do.
        tokens.authenticated(jwt(&format!(r#"{{"exp":{}}}"#, now())));
        assert_eq!(tokens.refresh_in(), None);
        tokens.authenticated("api-key".into());
        assert_eq!(tokens.refresh_in(), None);
        tokens.refresh_ahead = None;
        tokens.authenticated(jwt(&format!(r#"{{"exp":{}}}"#, now() + 3600)));
        assert_eq!(tokens.refresh_in(), None);
    }
}
