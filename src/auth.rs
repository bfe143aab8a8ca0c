//! Who may do what: the credentials clients present (JWT connection tokens, API keys, the metrics
//! token), verified here and nowhere else, and the grants they carry.
//!
//! A connection or HTTP request ends up with an [`Identity`]; the broker consults its [`Grants`]
//! before every subscribe, publish and history read. Tokens are verified with the configured
//! key's algorithm only, never the one a token's header names.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::config::Config;
use crate::topic::{self, Subject};

/// Verifies credentials against what the configuration trusts.
pub(crate) struct Authenticator {
    jwt: Option<Jwt>,
    /// SHA-256 digests of the keys.
    api_keys: Vec<[u8; 32]>,
    metrics_token: Option<[u8; 32]>,
    open: Arc<Identity>,
    anonymous: Arc<Identity>,
}

struct Jwt {
    key: DecodingKey,
    validation: Validation,
    leeway: Duration,
}

/// Who a connection or request is, as far as permissions go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    /// The token's `sub`.
    pub user: Option<Arc<str>>,
    pub credential: Credential,
    pub grants: Grants,
    /// When the credential stops being valid: its token's `exp` plus the leeway.
    pub expires_at: Option<SystemTime>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Credential {
    /// The broker runs without authentication: everyone may do everything.
    Open,
    /// Not authenticated (yet): nothing is granted.
    Anonymous,
    ApiKey,
    Token,
}

/// What an identity may subscribe to and publish on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Grants {
    subscribe: Grant,
    publish: Grant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Grant {
    Everything,
    /// Topics and patterns in the subscription syntax.
    Patterns(Vec<Box<str>>),
}

/// Why credentials were not accepted; the text is shown to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InvalidToken(pub String);

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    exp: u64,
    #[serde(default)]
    crier: CrierClaim,
}

/// Fields Crier does not know are ignored, so that issuers can add their own.
#[derive(Deserialize, Default)]
struct CrierClaim {
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
}

impl Authenticator {
    /// Reads the keys the configuration names.
    pub(crate) fn from_config(config: &Config) -> Result<Authenticator, String> {
        let jwt = jwt_key(config)?.map(|(key, algorithm)| {
            let mut validation = Validation::new(algorithm);
            validation.leeway = config.jwt_leeway.as_secs();
            validation.validate_nbf = true;
            // jsonwebtoken checks aud and iss only when a token has them: require them too.
            match &config.jwt_audience {
                Some(aud) => {
                    validation.set_audience(&[aud]);
                    validation.required_spec_claims.insert("aud".into());
                }
                None => validation.validate_aud = false,
            }
            if let Some(iss) = &config.jwt_issuer {
                validation.set_issuer(&[iss]);
                validation.required_spec_claims.insert("iss".into());
            }
            Jwt {
                key,
                validation,
                leeway: Duration::from_secs(config.jwt_leeway.as_secs()),
            }
        });
        let everything = Grants {
            subscribe: Grant::Everything,
            publish: Grant::Everything,
        };
        Ok(Authenticator {
            jwt,
            api_keys: config
                .api_keys
                .iter()
                .map(|k| digest(k.as_bytes()))
                .collect(),
            metrics_token: config
                .metrics_token
                .as_deref()
                .map(|t| digest(t.as_bytes())),
            open: Arc::new(Identity {
                user: None,
                credential: Credential::Open,
                grants: everything,
                expires_at: None,
            }),
            anonymous: Arc::new(Identity {
                user: None,
                credential: Credential::Anonymous,
                grants: Grants::none(),
                expires_at: None,
            }),
        })
    }

    /// Whether clients must present credentials: a JWT key or an API key is configured.
    pub(crate) fn required(&self) -> bool {
        self.jwt.is_some() || !self.api_keys.is_empty()
    }

    /// The identity of a client that presented nothing: everything when the broker runs open,
    /// nothing otherwise.
    pub(crate) fn unauthenticated(&self) -> Arc<Identity> {
        if self.required() {
            self.anonymous.clone()
        } else {
            self.open.clone()
        }
    }

    /// Verifies a connection token or API key.
    pub(crate) fn authenticate(&self, presented: &str) -> Result<Arc<Identity>, InvalidToken> {
        if !self.required() {
            // Nothing to check a token against: the broker is open to everyone anyway.
            return Ok(self.open.clone());
        }
        if self.is_api_key(presented) {
            return Ok(Arc::new(Identity {
                user: None,
                credential: Credential::ApiKey,
                grants: Grants {
                    subscribe: Grant::Everything,
                    publish: Grant::Everything,
                },
                expires_at: None,
            }));
        }
        let Some(jwt) = &self.jwt else {
            return Err(InvalidToken("not a valid API key".into()));
        };
        let claims = jsonwebtoken::decode::<Claims>(presented, &jwt.key, &jwt.validation)
            .map_err(|e| InvalidToken(token_error(&e, jwt.validation.algorithms[0])))?
            .claims;
        let grant = |patterns: Vec<String>, what: &str| -> Result<Grant, InvalidToken> {
            for pattern in &patterns {
                Subject::parse(pattern).map_err(|e| {
                    InvalidToken(format!("the token's crier.{what} grant {pattern:?}: {e}"))
                })?;
            }
            Ok(Grant::Patterns(
                patterns.into_iter().map(String::into_boxed_str).collect(),
            ))
        };
        Ok(Arc::new(Identity {
            user: claims.sub.map(Arc::from),
            credential: Credential::Token,
            grants: Grants {
                subscribe: grant(claims.crier.subscribe, "subscribe")?,
                publish: grant(claims.crier.publish, "publish")?,
            },
            expires_at: Some(
                UNIX_EPOCH
                    .checked_add(Duration::from_secs(claims.exp))
                    .and_then(|exp| exp.checked_add(jwt.leeway))
                    .ok_or_else(|| InvalidToken("the token's exp is out of range".into()))?,
            ),
        }))
    }

    /// Whether `presented` is one of the API keys, compared in constant time: digests of equal
    /// length are compared, so not even a key's length leaks.
    pub(crate) fn is_api_key(&self, presented: &str) -> bool {
        let presented = digest(presented.as_bytes());
        let mut found = subtle::Choice::from(0);
        for key in &self.api_keys {
            found |= key.ct_eq(&presented);
        }
        found.into()
    }

    pub(crate) fn metrics_token_required(&self) -> bool {
        self.metrics_token.is_some()
    }

    /// Whether the HTTP API is open to requests without credentials.
    pub(crate) fn api_open(&self) -> bool {
        !self.required()
    }

    /// Whether a `/metrics` request may be served: no metrics token is set, or it was presented.
    pub(crate) fn metrics_allowed(&self, presented: Option<&str>) -> bool {
        match (&self.metrics_token, presented) {
            (None, _) => true,
            (Some(token), Some(presented)) => token.ct_eq(&digest(presented.as_bytes())).into(),
            (Some(_), None) => false,
        }
    }
}

fn digest(secret: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(secret).into()
}

/// The JWT key the configuration names, and the one algorithm it verifies.
fn jwt_key(config: &Config) -> Result<Option<(DecodingKey, Algorithm)>, String> {
    let secret = match (&config.jwt_secret, &config.jwt_secret_file) {
        (Some(secret), _) => Some(secret.trim().to_owned()),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("--jwt-secret-file {}: {e}", path.display()))?
                .trim()
                .to_owned(),
        ),
        (None, None) => None,
    };
    if let Some(secret) = secret {
        if secret.is_empty() {
            return Err("the JWT secret is empty".into());
        }
        if secret.len() < 32 {
            tracing::warn!(
                bytes = secret.len(),
                "the JWT secret is short: HS256 secrets should have at least 32 random bytes"
            );
        }
        let key = DecodingKey::from_secret(secret.as_bytes())
            .map_err(|e| format!("the JWT secret: {e}"))?;
        return Ok(Some((key, Algorithm::HS256)));
    }
    let Some(path) = &config.jwt_public_key else {
        return Ok(None);
    };
    let pem =
        std::fs::read(path).map_err(|e| format!("--jwt-public-key {}: {e}", path.display()))?;
    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        return Ok(Some((key, Algorithm::RS256)));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
        return Ok(Some((key, Algorithm::ES256)));
    }
    Err(format!(
        "--jwt-public-key {}: not a PEM RSA or EC (P-256) public key",
        path.display()
    ))
}

fn token_error(e: &jsonwebtoken::errors::Error, expected: Algorithm) -> String {
    match e.kind() {
        ErrorKind::ExpiredSignature => "the token has expired".into(),
        ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)".into(),
        ErrorKind::InvalidSignature => "the token's signature does not verify".into(),
        ErrorKind::InvalidAlgorithm => {
            format!("the token is not signed with {expected:?}, the only algorithm accepted")
        }
        ErrorKind::InvalidAudience => "the token's audience (aud) is not this server".into(),
        ErrorKind::InvalidIssuer => "the token's issuer (iss) is not trusted".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("the token has no {claim} claim"),
        _ => format!("malformed token: {e}"),
    }
}

impl Identity {
    /// Whether the identity has authenticated (or needs not, on an open broker).
    pub(crate) fn is_authenticated(&self) -> bool {
        self.credential != Credential::Anonymous
    }

    /// Whether this identity may use the whole HTTP API (topics, connections): an API key, or
    /// anyone on an open broker.
    pub(crate) fn is_operator(&self) -> bool {
        matches!(self.credential, Credential::Open | Credential::ApiKey)
    }

    /// How long until the credential expires; zero once it has.
    pub(crate) fn expires_in(&self, now: SystemTime) -> Option<Duration> {
        self.expires_at
            .map(|at| at.duration_since(now).unwrap_or(Duration::ZERO))
    }

    /// `expires_at` as Unix seconds, for clients.
    pub(crate) fn expires_at_unix(&self) -> Option<u64> {
        self.expires_at
            .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
    }
}

impl Grants {
    fn none() -> Grants {
        Grants {
            subscribe: Grant::Patterns(Vec::new()),
            publish: Grant::Patterns(Vec::new()),
        }
    }

    /// Whether every topic `subject` can match may be subscribed to.
    pub(crate) fn may_subscribe(&self, subject: &Subject) -> bool {
        self.subscribe.covers(subject)
    }

    /// Whether `topic` (a valid topic, no wildcards) may be published to.
    pub(crate) fn may_publish(&self, topic: &str) -> bool {
        self.publish.allows(topic)
    }

    /// Whether a subscription to exactly `topic` may be made (for reading its history).
    pub(crate) fn may_read(&self, topic: &str) -> bool {
        self.subscribe.allows(topic)
    }
}

impl Grant {
    /// Whether one topic is granted: some pattern matches it.
    fn allows(&self, topic: &str) -> bool {
        match self {
            Grant::Everything => true,
            Grant::Patterns(grants) => grants.iter().any(|g| topic::matches(g, topic)),
        }
    }

    fn covers(&self, subject: &Subject) -> bool {
        let (grants, pattern) = match (self, subject) {
            (_, Subject::Topic(topic)) => return self.allows(topic),
            (Grant::Everything, _) => return true,
            (Grant::Patterns(grants), Subject::Pattern(pattern)) => (grants, pattern),
        };
        let segments: Vec<&str> = pattern.split('.').collect();
        // Only grants that name the broker's namespace reach its topics (as patterns do).
        let system = segments[0] == topic::SYSTEM_NAMESPACE;
        let grants: Vec<Vec<&str>> = grants
            .iter()
            .filter(|g| !system || topic::namespace(g) == topic::SYSTEM_NAMESPACE)
            .map(|g| g.split('.').collect())
            .collect();
        let grants: Vec<&[&str]> = grants.iter().map(Vec::as_slice).collect();
        covered(&segments, &grants)
    }
}

/// Whether every topic the pattern `p` matches is matched by one of `grants` (all in segments).
/// Exact even when no single grant covers `p` but several together do (`a.>` by `a.*` and
/// `a.*.>`). A `*` stands for any segment, including ones no grant names, so only grants with
/// `*` (or `>`) there can cover it; `>` is one segment (`*`) or more (`*.>`).
fn covered(p: &[&str], grants: &[&[&str]]) -> bool {
    if grants.is_empty() {
        return false;
    }
    let Some((&first, rest)) = p.split_first() else {
        return grants.iter().any(|g| g.is_empty());
    };
    if grants.iter().any(|g| g.first() == Some(&">")) {
        return true;
    }
    if first == ">" {
        return covered(&["*"], grants) && covered(&["*", ">"], grants);
    }
    let next: Vec<&[&str]> = grants
        .iter()
        .filter_map(|g| match g.split_first() {
            Some((&head, tail)) if head == "*" || (first != "*" && head == first) => Some(tail),
            _ => None,
        })
        .collect();
    covered(rest, &next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(subscribe: &[&str]) -> Grants {
        Grants {
            subscribe: Grant::Patterns(subscribe.iter().map(|&s| s.into()).collect()),
            publish: Grant::Patterns(Vec::new()),
        }
    }

    fn may(granted: &[&str], subject: &str) -> bool {
        grants(granted).may_subscribe(&Subject::parse(subject).unwrap())
    }

    #[test]
    fn a_pattern_is_granted_only_if_every_topic_it_matches_is() {
        let cases: &[(&[&str], &str, bool)] = &[
            (&["notify.user42"], "notify.user42", true),
            (&["notify.user42"], "notify.user43", false),
            (&["notify.user42"], "notify.*", false),
            (&["notify.*"], "notify.user42", true),
            (&["notify.*"], "notify.*", true),
            (&["notify.*"], "notify.>", false),
            (&["notify.*"], "*.user42", false),
            (&["notify.>"], "notify.*.x", true),
            (&["notify.>"], "notify.>", true),
            (&["notify.>"], "notify", false),
            (&["notify.>"], ">", false),
            (&[">"], ">", true),
            (&[">"], "a.*.>", true),
            (&["*"], "*", true),
            (&["*"], ">", false),
            (&["a.*", "a.*.>"], "a.>", true),
            (&["a.*", "a.*.*"], "a.>", false),
            (&["a.b", "a.*"], "a.*", true),
            (&["a.b", "a.c"], "a.*", false),
            (&["a.*.c", "a.b.*"], "a.b.c", true),
            (&["a.*.c", "a.b.*"], "a.*.c", true),
            (&["a.*.c", "a.b.*"], "a.*.*", false),
            (&["*.b", "a.*"], "*.*", false),
            (&[], "a", false),
            (&[">"], "_crier.stats", false),
            (&[">"], "_crier.*", false),
            (&["*.stats"], "_crier.stats", false),
            (&["_crier.>"], "_crier.stats", true),
            (&["_crier.>"], "_crier.*", true),
            (&["_crier.stats"], "_crier.*", false),
        ];
        for &(granted, subject, expected) in cases {
            assert_eq!(may(granted, subject), expected, "{granted:?} {subject}");
        }
    }

    #[test]
    fn keys_are_compared_whole() {
        let config = Config {
            api_keys: vec!["k1-secret".into(), "k2-secret".into()],
            metrics_token: Some("m".into()),
            ..Config::default()
        };
        let auth = Authenticator::from_config(&config).unwrap();
        assert!(auth.is_api_key("k1-secret") && auth.is_api_key("k2-secret"));
        assert!(
            !auth.is_api_key("k1-secre") && !auth.is_api_key("k1-secretx") && !auth.is_api_key("")
        );
        assert!(auth.metrics_allowed(Some("m")) && !auth.metrics_allowed(Some("mm")));
        assert!(!auth.metrics_allowed(None));
    }

    #[test]
    fn an_exp_out_of_range_is_an_invalid_token_not_a_panic() {
        let secret = "a test secret that is long enough for HS256";
        let config = Config {
            jwt_secret: Some(secret.into()),
            ..Config::default()
        };
        let auth = Authenticator::from_config(&config).unwrap();
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "u", "exp": u64::MAX}),
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).unwrap(),
        )
        .unwrap();
        assert!(auth.authenticate(&token).is_err());
    }

    #[test]
    fn publish_grants_are_checked_per_topic() {
        let g = Grants {
            subscribe: Grant::Patterns(Vec::new()),
            publish: Grant::Patterns(vec!["chat.*".into(), "notify.user42".into()]),
        };
        assert!(g.may_publish("chat.room1"));
        assert!(g.may_publish("notify.user42"));
        assert!(!g.may_publish("notify.user43"));
        assert!(!g.may_publish("chat.room1.x"));
    }
}
