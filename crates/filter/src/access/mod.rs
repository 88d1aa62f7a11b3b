//! Filters that decide by where a request comes from: the client's address, the
//! browser origin, and the caller's mesh identity.

mod authz;
mod cors;
mod ip_restriction;

pub use authz::Authz;
pub use cors::Cors;
pub use ip_restriction::IpRestriction;

/// An access filter's config must list something to allow or to deny.
fn allow_or_deny<A, D>(allow: &[A], deny: &[D]) -> Result<(), crate::registry::BuildError> {
    if allow.is_empty() && deny.is_empty() {
        return Err(crate::registry::BuildError::new(
            "config",
            "give at least one of `allow` and `deny`",
        ));
    }
    Ok(())
}
