//! Who may use a TCP API: the checks that keep web pages (CSRF, DNS rebinding) and, on a
//! non-loopback address, other hosts out.

use std::net::{IpAddr, SocketAddr};

use http::{Method, Request, header};

use super::Refusal;
use super::token::TokenVerifier;

/// The access policy of one TCP listener.
pub(crate) struct Access {
    /// Present when the listener's address is not loopback.
    token: Option<TokenVerifier>,
    /// Extra host names accepted in `Host` and `Origin` (lower case, no trailing dot).
    allowed_hosts: Vec<String>,
}

impl Access {
    pub(crate) fn new(token: Option<TokenVerifier>, allowed_hosts: &[String]) -> Access {
        Access {
            token,
            allowed_hosts: allowed_hosts
                .iter()
                .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
        }
    }

    /// Checks a request that arrived on a connection whose local address is `local`.
    pub(crate) fn check<B>(&self, req: &Request<B>, local: SocketAddr) -> Result<(), Refusal> {
        let headers = req.headers();
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
        match host {
            Some(h) if self.names_listener(h, local) => {}
            Some(h) => {
                return Err(forbidden(format!(
                    "Host {h:?} does not name this API (use {})",
                    canonical(local)
                )));
            }
            None => return Err(forbidden("a Host header is required".into())),
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let own = origin
                .to_str()
                .ok()
                .and_then(|o| o.strip_prefix("http://"))
                .is_some_and(|rest| self.names_listener(rest, local));
            if !own {
                return Err(forbidden(format!(
                    "requests from origin {origin:?} are not allowed"
                )));
            }
        }
        if let Some(token) = &self.token {
            // `Bearer <token>`, or HTTP Basic with the token as the password (what a browser
            // sends for the status page after asking its user).
            let presented = headers.get(header::AUTHORIZATION).and_then(|v| {
                bearer(v.as_bytes())
                    .map(<[u8]>::to_vec)
                    .or_else(|| basic_password(v.as_bytes()))
            });
            match presented {
                Some(p) if token.verify(&p) => {}
                Some(_) => {
                    return Err(Refusal::Unauthorized {
                        message: "wrong API token".into(),
                    });
                }
                None => {
                    return Err(Refusal::Unauthorized {
                        message: "this API needs \"Authorization: Bearer <token>\" with the \
                                  token in the node's data directory, file api-token"
                            .into(),
                    });
                }
            }
        }
        if carries_body(req) && !is_json(headers.get(header::CONTENT_TYPE)) {
            return Err(Refusal::UnsupportedMediaType {
                message: "request bodies must be Content-Type: application/json".into(),
            });
        }
        Ok(())
    }

    /// Whether `authority` (`host[:port]`, as in `Host` and after `http://` in `Origin`) names
    /// the listener reached at `local`: its IP literal, `localhost` on loopback, or an allowed
    /// host name, with the listener's port (80 when none is given).
    fn names_listener(&self, authority: &str, local: SocketAddr) -> bool {
        let Ok(a) = authority.parse::<http::uri::Authority>() else {
            return false;
        };
        if a.as_str().contains('@') || a.port_u16().unwrap_or(80) != local.port() {
            return false;
        }
        let host = a.host();
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = literal.parse::<IpAddr>() {
            return ip.to_canonical() == local.ip().to_canonical();
        }
        let name = host.trim_end_matches('.').to_ascii_lowercase();
        (name == "localhost" && local.ip().to_canonical().is_loopback())
            || self.allowed_hosts.contains(&name)
    }
}

fn forbidden(message: String) -> Refusal {
    Refusal::Forbidden { message }
}

/// The listener address as clients should name it.
fn canonical(local: SocketAddr) -> SocketAddr {
    SocketAddr::new(local.ip().to_canonical(), local.port())
}

/// The password of `Basic base64(user:password)` (scheme case-insensitive; the user is ignored).
fn basic_password(value: &[u8]) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"basic ") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim_ascii())
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    Some(decoded[colon + 1..].to_vec())
}

/// The token of `Bearer <token>` (scheme case-insensitive).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
}

/// POST, PUT and PATCH always carry a body; other methods when they announce one.
fn carries_body<B>(req: &Request<B>) -> bool {
    let h = req.headers();
    matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH)
        || h.contains_key(header::TRANSFER_ENCODING)
        || h.get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

fn is_json(ct: Option<&header::HeaderValue>) -> bool {
    ct.and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::api::token::ApiToken;

    fn req(method: Method, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().method(method).uri("/v1/tasks");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn local(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn open() -> Access {
        Access::new(None, &["df.example.".into()])
    }

    #[test]
    fn host_must_name_the_listener() {
        let a = open();
        let l = local("127.0.0.1:7000");
        for ok in [
            "127.0.0.1:7000",
            "localhost:7000",
            "LocalHost.:7000",
            "df.example:7000",
        ] {
            assert_eq!(
                a.check(&req(Method::GET, &[("host", ok)]), l),
                Ok(()),
                "{ok}"
            );
        }
        for bad in [
            "evil.example:7000",
            "127.0.0.1:7001",
            "127.0.0.1",
            "127.0.0.2:7000",
            "user@127.0.0.1:7000",
            "",
        ] {
            assert!(
                matches!(
                    a.check(&req(Method::GET, &[("host", bad)]), l),
                    Err(Refusal::Forbidden { .. })
                ),
                "{bad}"
            );
        }
        assert!(a.check(&req(Method::GET, &[]), l).is_err());
        // localhost names a loopback listener only.
        let lan = local("10.1.2.3:7000");
        assert!(
            a.check(&req(Method::GET, &[("host", "localhost:7000")]), lan)
                .is_err()
        );
        assert!(
            a.check(&req(Method::GET, &[("host", "10.1.2.3:7000")]), lan)
                .is_ok()
        );
        // IPv6 and IPv4-mapped local addresses.
        let v6 = local("[::1]:7000");
        assert!(
            a.check(&req(Method::GET, &[("host", "[::1]:7000")]), v6)
                .is_ok()
        );
        let mapped = local("[::ffff:127.0.0.1]:7000");
        assert!(
            a.check(&req(Method::GET, &[("host", "127.0.0.1:7000")]), mapped)
                .is_ok()
        );
    }

    #[test]
    fn origin_must_be_the_api_itself() {
        let a = open();
        let l = local("127.0.0.1:7000");
        let with = |o: &str| req(Method::GET, &[("host", "127.0.0.1:7000"), ("origin", o)]);
        assert!(a.check(&with("http://127.0.0.1:7000"), l).is_ok());
        assert!(a.check(&with("http://localhost:7000"), l).is_ok());
        for bad in [
            "http://evil.example",
            "http://evil.example:7000",
            "https://127.0.0.1:7000",
            "null",
            "http://127.0.0.1:7000/x",
        ] {
            assert!(
                matches!(a.check(&with(bad), l), Err(Refusal::Forbidden { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn bodies_must_be_json() {
        let a = open();
        let l = local("127.0.0.1:7000");
        let h = ("host", "127.0.0.1:7000");
        let post = |ct: &[(&str, &str)]| {
            let mut hs = vec![h];
            hs.extend_from_slice(ct);
            req(Method::POST, &hs)
        };
        assert!(
            a.check(&post(&[("content-type", "application/json")]), l)
                .is_ok()
        );
        assert!(
            a.check(
                &post(&[("content-type", "Application/JSON; charset=utf-8")]),
                l
            )
            .is_ok()
        );
        for bad in [
            &[("content-type", "text/plain")][..],
            &[("content-type", "application/x-www-form-urlencoded")],
            &[("content-type", "multipart/form-data; boundary=x")],
            &[],
        ] {
            assert!(
                matches!(
                    a.check(&post(bad), l),
                    Err(Refusal::UnsupportedMediaType { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(a.check(&req(Method::DELETE, &[h]), l).is_ok());
        assert!(
            a.check(
                &req(
                    Method::DELETE,
                    &[h, ("content-length", "3"), ("content-type", "text/plain")]
                ),
                l
            )
            .is_err()
        );
    }

    #[test]
    fn token_checked_when_required() {
        let t = ApiToken::parse("s3cret", "test").unwrap();
        let a = Access::new(Some(TokenVerifier::new(&t)), &[]);
        let l = local("10.0.0.1:7000");
        let with = |auth: Option<&str>| {
            let mut hs = vec![("host", "10.0.0.1:7000")];
            if let Some(v) = auth {
                hs.push(("authorization", v));
            }
            req(Method::GET, &hs)
        };
        assert!(a.check(&with(Some("Bearer s3cret")), l).is_ok());
        assert!(a.check(&with(Some("bearer s3cret")), l).is_ok());
        // Basic with the token as the password (a browser on the status page), any user.
        assert!(a.check(&with(Some("Basic ZGY6czNjcmV0")), l).is_ok());
        assert!(a.check(&with(Some("basic OnMzY3JldA==")), l).is_ok());
        for bad in [
            Some("Basic ZGY6czNjcmU="),
            Some("Basic not-base64!"),
            None,
            Some("Bearer s3cre"),
            Some("Bearer "),
            Some("Basic czNjcmV0"),
            Some("s3cret"),
        ] {
            assert!(
                matches!(a.check(&with(bad), l), Err(Refusal::Unauthorized { .. })),
                "{bad:?}"
            );
        }
        // A token does not lift the Host check.
        let evil = req(
            Method::GET,
            &[
                ("host", "evil.example:7000"),
                ("authorization", "Bearer s3cret"),
            ],
        );
        assert!(matches!(a.check(&evil, l), Err(Refusal::Forbidden { .. })));
    }
}
