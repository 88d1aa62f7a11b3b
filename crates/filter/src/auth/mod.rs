//! Authentication and authorization filters: who is calling, and may they.

mod acl;
mod bearer;
mod cache;
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

/// The HTTP client an auth filter uses to reach an identity provider at `url`
/// (`field` names it in errors): http or https only, `timeout` for connecting and for
/// the whole exchange, and at most `redirects` redirects followed.
pub(crate) fn idp_client(
    field: &str,
    url: &str,
    timeout: std::time::Duration,
    redirects: usize,
) -> Result<reqwest::Client, crate::registry::BuildError> {
    let err = |m: String| crate::registry::BuildError::new(field, m);
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(err("must be an http:// or https:// URL".into()));
    }
    let redirect = match redirects {
        0 => reqwest::redirect::Policy::none(),
        n => reqwest::redirect::Policy::limited(n),
    };
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(redirect)
        .build()
        .map_err(|e| err(format!("cannot build the HTTP client: {e}")))
}
