//! Authentication and tenancy: HS256 JWTs with claims `sub`, `role`, `tenant`, `exp` and, for
//! customers, `order_id`. Tokens come from `Authorization: Bearer …` or a `token` query
//! parameter (browsers cannot set headers on WebSockets).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::{FromRequest, HttpRequest, dev::Payload, web};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

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

/// Signs and verifies tokens.
#[derive(Clone)]
pub struct Keys {
    enc: EncodingKey,
    dec: DecodingKey,
    validation: Validation,
}

impl Keys {
    pub fn new(secret: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_S;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Keys { enc: EncodingKey::from_secret(secret.as_bytes()), dec: DecodingKey::from_secret(secret.as_bytes()), validation }
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

/// Verifies a raw token (from [`token_of`], or [`token_of_parts`] where there is no actix
/// request) and checks its tenant and subject.
pub fn authenticate_token(keys: &Keys, token: Option<&str>) -> Result<Auth, ApiError> {
    let token = token.ok_or_else(|| ApiError::unauthorized("missing bearer token"))?;
    let claims = keys.verify(token)?;
    if !hexfleet_actors::domain::valid_id(&claims.tenant) || !hexfleet_actors::domain::valid_id(&claims.sub) {
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
}
