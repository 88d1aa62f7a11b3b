//! Authentication and authorization filters: who is calling, and may they.

mod acl;
mod bearer;
mod claims;
mod hmac_auth;
mod introspection;
mod jwt;
mod key_auth;

pub use acl::Acl;
pub use hmac_auth::HmacAuth;
pub use introspection::Introspection;
pub use jwt::Jwt;
pub use key_auth::KeyAuth;
