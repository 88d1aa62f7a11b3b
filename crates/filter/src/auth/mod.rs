//! Authentication and authorization filters: who is calling, and may they.

mod acl;
mod key_auth;

pub use acl::Acl;
pub use key_auth::KeyAuth;
