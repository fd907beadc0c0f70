//! JWT minting for simulated clients: HS256 with the claims the wire protocol names
//! (`sub`, `role`, `tenant`, `exp`, and `order_id` for customers).

use anyhow::Context as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

/// Roles the protocol knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Courier,
    Customer,
    Dispatcher,
    Admin,
}

/// The token claims, exactly as on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: Role,
    pub tenant: String,
    /// Expiry, Unix seconds.
    pub exp: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub order_id: Option<String>,
}

/// Mints tokens for one tenant with one secret.
#[derive(Clone)]
pub struct TokenMint {
    key: EncodingKey,
    tenant: String,
    ttl_s: u64,
}

impl std::fmt::Debug for TokenMint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenMint").field("tenant", &self.tenant).field("ttl_s", &self.ttl_s).finish_non_exhaustive()
    }
}

impl TokenMint {
    /// Tokens live `ttl_s` seconds (the simulator mints a day's worth by default).
    pub fn new(secret: &str, tenant: &str, ttl_s: u64) -> Self {
        Self { key: EncodingKey::from_secret(secret.as_bytes()), tenant: tenant.to_owned(), ttl_s }
    }

    pub fn claims(&self, role: Role, sub: &str, order_id: Option<&str>) -> Claims {
        Claims {
            sub: sub.to_owned(),
            role,
            tenant: self.tenant.clone(),
            exp: crate::unix_ms() as u64 / 1000 + self.ttl_s,
            order_id: order_id.map(str::to_owned),
        }
    }

    pub fn mint(&self, role: Role, sub: &str, order_id: Option<&str>) -> anyhow::Result<String> {
        let claims = self.claims(role, sub, order_id);
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.key).context("encoding jwt")
    }

    pub fn courier(&self, courier_id: &str) -> anyhow::Result<String> {
        self.mint(Role::Courier, courier_id, None)
    }

    pub fn dispatcher(&self) -> anyhow::Result<String> {
        self.mint(Role::Dispatcher, "sim-dispatcher", None)
    }

    pub fn customer(&self, order_id: &str) -> anyhow::Result<String> {
        self.mint(Role::Customer, &format!("sim-customer-{order_id}"), Some(order_id))
    }
}

/// The simulator's courier id for index `i` (`sim-c00001` for 1).
pub fn courier_id(i: usize) -> String {
    format!("sim-c{i:05}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation, decode};

    fn decode_with(token: &str, secret: &str) -> jsonwebtoken::errors::Result<Claims> {
        let v = Validation::new(Algorithm::HS256);
        decode::<Claims>(token, &DecodingKey::from_secret(secret.as_bytes()), &v).map(|d| d.claims)
    }

    #[test]
    fn tokens_round_trip_with_the_contract_claims() {
        let mint = TokenMint::new("s3cret", "acme", 3600);
        let c = decode_with(&mint.courier("c7").unwrap(), "s3cret").unwrap();
        assert_eq!((c.sub.as_str(), c.role, c.tenant.as_str(), c.order_id), ("c7", Role::Courier, "acme", None));
        let now_s = crate::unix_ms() as u64 / 1000;
        assert!((now_s + 3590..=now_s + 3610).contains(&c.exp));
        let cust = decode_with(&mint.customer("o9").unwrap(), "s3cret").unwrap();
        assert_eq!((cust.role, cust.order_id.as_deref()), (Role::Customer, Some("o9")));
        assert_eq!(decode_with(&mint.dispatcher().unwrap(), "s3cret").unwrap().role, Role::Dispatcher);
        // The wrong secret is refused; the header says HS256.
        assert!(decode_with(&mint.courier("c7").unwrap(), "other").is_err());
        let header = jsonwebtoken::decode_header(mint.courier("c7").unwrap()).unwrap();
        assert_eq!(header.alg, Algorithm::HS256);
    }

    #[test]
    fn claims_serialize_exactly() {
        let c = Claims { sub: "u".into(), role: Role::Admin, tenant: "t".into(), exp: 5, order_id: None };
        assert_eq!(serde_json::to_string(&c).unwrap(), r#"{"sub":"u","role":"admin","tenant":"t","exp":5}"#);
        let c = Claims { role: Role::Customer, order_id: Some("o1".into()), ..c };
        assert_eq!(serde_json::to_string(&c).unwrap(), r#"{"sub":"u","role":"customer","tenant":"t","exp":5,"order_id":"o1"}"#);
        assert_eq!(courier_id(1), "sim-c00001");
    }
}
