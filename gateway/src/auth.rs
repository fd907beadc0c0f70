//! Authentication and tenancy: HS256 JWTs with claims `sub`, `role`, `tenant`, `exp` and, for
//! customers, `order_id`. Tokens come from `Authorization: Bearer …` or a `token` query
//! parameter (browsers cannot set headers on WebSockets).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::{FromRequest, HttpRequest, dev::Payload, web};
use hmac::{Hmac, Mac};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::error::ApiError;
use hexfleet_actors::domain::{Actor as Who, TenantId};

/// Roles a token may carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Courier,
    Customer,
    Dispatcher,
    Admin,
}

/// JWT claims.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Claims {
    pub sub: String,
    pub role: Role,
    pub tenant: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
}

/// Seconds of clock skew a token's `exp` is given (as `jsonwebtoken`'s leeway).
const LEEWAY_S: u64 = 5;

impl Claims {
    /// When a session opened with this token must end (its `exp` plus the leeway): sockets
    /// outlive their handshake, and a token that is not renewed must stop working.
    pub fn session_deadline(&self) -> tokio::time::Instant {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let left = (self.exp + LEEWAY_S).saturating_sub(now).min(365 * 24 * 3600);
        tokio::time::Instant::now() + Duration::from_secs(left)
    }
}

/// What a device key is the HMAC of, before the tenant, the courier and the device id: keeps
/// device keys apart from HS256 token signatures made with the same secret (a JWT's signing
/// input is base64url, with no `/` and no NUL). v2 added the courier (v1 keys do not match).
const DEVICE_KEY_CONTEXT: &[u8] = b"hexfleet/osmand-device-key/v2\0";
/// The context of [`Keys::node_key`]; unlike the device keys' it is not followed by ids.
const NODE_KEY_CONTEXT: &[u8] = b"hexfleet/node-forward-key/v1";
/// Bytes of the HMAC kept in a device key: 128 bits, 32 hex characters.
const DEVICE_KEY_BYTES: usize = 16;

/// Signs and verifies tokens, and derives the keys of OsmAnd/Traccar devices.
#[derive(Clone)]
pub struct Keys {
    enc: EncodingKey,
    dec: DecodingKey,
    validation: Validation,
    /// HMAC-SHA256 keyed with the secret, cloned per device key.
    device: Hmac<Sha256>,
}

impl Keys {
    pub fn new(secret: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_S;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let device = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
        Keys { enc: EncodingKey::from_secret(secret.as_bytes()), dec: DecodingKey::from_secret(secret.as_bytes()), validation, device }
    }

    /// The key an OsmAnd/Traccar device registered to `courier` of `tenant` must send with its
    /// reports (`key=`): an HMAC of the tenant, the courier and the device id under the JWT
    /// secret, so every node derives the same key without storing one. A key is revoked by
    /// giving the courier a new device id, and does not follow the device to another courier (a
    /// phone handed over, a device id registered again): the courier who held it cannot report
    /// as the next one. It changes with the secret.
    pub fn device_key(&self, tenant: &str, courier: &str, device_id: &str) -> String {
        hex::encode(&self.device_mac(tenant, courier, device_id).finalize().into_bytes()[..DEVICE_KEY_BYTES])
    }

    /// What a node sends in [`crate::markets::NODE_KEY`] with the requests it forwards to a
    /// market's owner: an HMAC of a fixed context under the JWT secret, which every node of a
    /// cluster shares and no client learns (nodes do not pass it on, and never send it to
    /// clients). The owner does not count such requests against `--http-limit-per-ip`: the
    /// node they first reached did.
    pub fn node_key(&self) -> String {
        hex::encode(self.node_mac().finalize().into_bytes())
    }

    /// Whether `key` is [`Keys::node_key`], compared in constant time.
    pub fn is_node_key(&self, key: &[u8]) -> bool {
        hex::decode(key).is_ok_and(|bytes| self.node_mac().verify_slice(&bytes).is_ok())
    }

    fn node_mac(&self) -> Hmac<Sha256> {
        let mut mac = self.device.clone();
        mac.update(NODE_KEY_CONTEXT);
        mac
    }

    /// Whether `key` is [`Keys::device_key`] of the device, compared in constant time.
    pub fn device_key_matches(&self, tenant: &str, courier: &str, device_id: &str, key: &str) -> bool {
        match hex::decode(key) {
            Ok(bytes) if bytes.len() == DEVICE_KEY_BYTES => {
                self.device_mac(tenant, courier, device_id).verify_truncated_left(&bytes).is_ok()
            }
            _ => false,
        }
    }

    /// Ids hold no NUL (`[A-Za-z0-9_.:-]`), so the NUL-separated input is unambiguous.
    fn device_mac(&self, tenant: &str, courier: &str, device_id: &str) -> Hmac<Sha256> {
        let mut mac = self.device.clone();
        mac.update(DEVICE_KEY_CONTEXT);
        for (i, part) in [tenant, courier, device_id].into_iter().enumerate() {
            if i > 0 {
                mac.update(b"\0");
            }
            mac.update(part.as_bytes());
        }
        mac
    }

    /// Mints a token valid for `ttl`.
    pub fn mint(&self, role: Role, sub: &str, tenant: &str, order_id: Option<&str>, ttl: Duration) -> String {
        let exp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() + ttl.as_secs();
        let claims = Claims { sub: sub.into(), role, tenant: tenant.into(), exp, order_id: order_id.map(Into::into) };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.enc).expect("hs256 signing cannot fail")
    }

    /// Verifies a token.
    pub fn verify(&self, token: &str) -> Result<Claims, ApiError> {
        jsonwebtoken::decode::<Claims>(token, &self.dec, &self.validation).map(|d| d.claims).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => ApiError::unauthorized("token expired"),
                _ => ApiError::unauthorized("invalid token"),
            }
        })
    }
}

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Auth {
    pub claims: Claims,
    pub tenant: TenantId,
}

impl Auth {
    /// Fails unless the caller has one of `roles`.
    pub fn require(&self, roles: &[Role]) -> Result<(), ApiError> {
        if roles.contains(&self.claims.role) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!("role {:?} may not do this", self.claims.role).to_lowercase()))
        }
    }

    /// The audit-trail actor for this caller.
    pub fn who(&self) -> Who {
        let s = self.claims.sub.clone();
        match self.claims.role {
            Role::Courier => Who::Courier(s.as_str().into()),
            Role::Customer => Who::Customer(s),
            Role::Dispatcher => Who::Dispatcher(s),
            Role::Admin => Who::Admin(s),
        }
    }

    /// Fails unless the caller is the courier `courier` itself, or staff (dispatcher/admin).
    pub fn require_self_or_staff(&self, courier: &str) -> Result<(), ApiError> {
        if self.claims.role == Role::Courier && self.claims.sub == courier {
            return Ok(());
        }
        self.require(&[Role::Dispatcher, Role::Admin])
    }

    pub fn is_staff(&self) -> bool {
        matches!(self.claims.role, Role::Dispatcher | Role::Admin)
    }
}

/// The raw token of a request: bearer header first, then `?token=`.
pub fn token_of(req: &HttpRequest) -> Option<String> {
    let header = req.headers().get(actix_web::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    token_of_parts(header, req.query_string())
}

/// [`token_of`] for a request read without actix: its `Authorization` header and query string.
pub fn token_of_parts(authorization: Option<&str>, query: &str) -> Option<String> {
    if let Some(h) = authorization
        && let Some(t) = h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer "))
    {
        return Some(t.trim().to_string());
    }
    web::Query::<TokenQuery>::from_query(query).ok().and_then(|q| q.into_inner().token)
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

impl FromRequest for Auth {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Auth, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        std::future::ready(authenticate(req))
    }
}

pub fn authenticate(req: &HttpRequest) -> Result<Auth, ApiError> {
    let keys = req.app_data::<web::Data<Keys>>().ok_or_else(|| ApiError::internal("auth keys missing"))?;
    authenticate_token(keys, token_of(req).as_deref())
}

/// Longest subject of a staff or customer token.
const MAX_SUBJECT_LEN: usize = 128;

/// Whether `sub` may be the subject of a `role` token. A courier's is its courier id (an id);
/// anyone else's is only named in the audit trail, so it may be what an identity provider
/// issues (an e-mail address, `auth0|…`, a UUID): printable ASCII without spaces, so no
/// control character (PostgreSQL refuses NUL in text) nor an invisible or right-to-left
/// character disguises the name in the audit trail. It was an id for every role:
/// `alice@example.com` got 401 everywhere.
fn valid_subject(role: Role, sub: &str) -> bool {
    match role {
        Role::Courier => hexfleet_actors::domain::valid_id(sub),
        _ => !sub.is_empty() && sub.len() <= MAX_SUBJECT_LEN && sub.bytes().all(|b| b.is_ascii_graphic()),
    }
}

/// Verifies a raw token (from [`token_of`], or [`token_of_parts`] where there is no actix
/// request) and checks its tenant and subject.
pub fn authenticate_token(keys: &Keys, token: Option<&str>) -> Result<Auth, ApiError> {
    let token = token.ok_or_else(|| ApiError::unauthorized("missing bearer token"))?;
    let claims = keys.verify(token)?;
    if !hexfleet_actors::domain::valid_id(&claims.tenant) || !valid_subject(claims.role, &claims.sub) {
        return Err(ApiError::unauthorized("token has an invalid tenant or subject"));
    }
    Ok(Auth { tenant: TenantId::new(&claims.tenant), claims })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mint_then_verify_round_trips() {
        let k = Keys::new("s3cret");
        let t = k.mint(Role::Customer, "u1", "acme", Some("o1"), Duration::from_secs(60));
        let c = k.verify(&t).unwrap();
        assert_eq!(c.role, Role::Customer);
        assert_eq!(c.order_id.as_deref(), Some("o1"));
        assert_eq!(c.tenant, "acme");
    }

    #[test]
    fn wrong_secret_and_expired_are_refused() {
        let k = Keys::new("a");
        let t = Keys::new("b").mint(Role::Admin, "x", "t", None, Duration::from_secs(60));
        assert!(k.verify(&t).unwrap_err().message.contains("invalid"));
        let claims = Claims { sub: "x".into(), role: Role::Admin, tenant: "t".into(), exp: 1_000, order_id: None };
        let old = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(b"a")).unwrap();
        assert_eq!(k.verify(&old).unwrap_err().message, "token expired");
    }

    #[test]
    fn a_device_key_belongs_to_its_device_courier_tenant_and_secret() {
        let k = Keys::new("a-secret-of-at-least-thirty-two-bytes");
        let key = k.device_key("acme", "c1", "864895030279986");
        assert_eq!(key.len(), 32);
        assert!(k.device_key_matches("acme", "c1", "864895030279986", &key));
        assert!(k.device_key_matches("acme", "c1", "864895030279986", &key.to_uppercase()), "hex is read in either case");
        assert!(!k.device_key_matches("acme", "c1", "864895030279987", &key), "another device");
        assert!(!k.device_key_matches("acme", "c2", "864895030279986", &key), "the device registered to another courier");
        assert!(!k.device_key_matches("other", "c1", "864895030279986", &key), "another tenant");
        let other_secret = Keys::new("another-secret-of-at-least-thirty-two");
        assert!(!other_secret.device_key_matches("acme", "c1", "864895030279986", &key), "another secret");
        assert!(!k.device_key_matches("acme", "c1", "864895030279986", &key[..30]), "a prefix");
        assert!(!k.device_key_matches("acme", "c1", "864895030279986", ""), "no key");
        assert!(!k.device_key_matches("acme", "c1", "864895030279986", &"z".repeat(32)), "not hex");
        // No ambiguity between the parts.
        assert_ne!(k.device_key("ab", "c", "d"), k.device_key("a", "bc", "d"));
        assert_ne!(k.device_key("a", "bc", "d"), k.device_key("a", "b", "cd"));
    }
}
