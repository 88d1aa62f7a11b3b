//! Authentication and authorization filters: who is calling, and may they.

mod acl;
mod bearer;
mod hmac_auth;
mod jwt;
mod key_auth;

pub use acl::Acl;
pub use hmac_auth::HmacAuth;
pub use jwt::Jwt;
pub use key_auth::KeyAuth;
