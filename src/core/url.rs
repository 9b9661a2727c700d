//! The token endpoint URL: the one URL shape the filter accepts and the parts a callout needs.
//!
//! Envoy routes a callout to a named cluster; the URL only supplies `:authority`, `:path` and the
//! scheme. So the parser is deliberately strict and small: absolute `http`/`https`, a host (with an
//! optional port), no user info, no fragment.

/// A parsed absolute http(s) URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HttpUrl {
    pub scheme: &'static str,
    pub authority: String,
    /// Path and query, always starting with `/`.
    pub path_and_query: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum UrlError {
    #[error("not an absolute http(s) URL")]
    NotAbsoluteHttp,
    #[error("the URL has no host")]
    MissingHost,
    #[error("user info in the URL is not supported (use client_id/client_secret)")]
    UserInfo,
    #[error("a token URL cannot have a fragment")]
    Fragment,
    #[error("the URL contains a space or control character")]
    BadCharacter,
    #[error("the URL's port is not a number from 1 to 65535")]
    BadPort,
}

impl HttpUrl {
    pub(crate) fn parse(input: &str) -> Result<HttpUrl, UrlError> {
        if input.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(UrlError::BadCharacter);
        }
        let (scheme, rest) = split_scheme(input).ok_or(UrlError::NotAbsoluteHttp)?;
        if rest.contains('#') {
            return Err(UrlError::Fragment);
        }
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        if authority.contains('@') {
            return Err(UrlError::UserInfo);
        }
        validate_authority(authority)?;
        let path_and_query = match tail.chars().next() {
            None => "/".to_string(),
            Some('?') => format!("/{tail}"),
            Some(_) => tail.to_string(),
        };
        Ok(HttpUrl { scheme, authority: authority.to_string(), path_and_query })
    }
}

fn split_scheme(input: &str) -> Option<(&'static str, &str)> {
    for scheme in ["https", "http"] {
        let prefix_len = scheme.len() + 3;
        if input.len() > prefix_len
            && input.is_char_boundary(prefix_len)
            && input[..prefix_len].eq_ignore_ascii_case(&format!("{scheme}://"))
        {
            return Some((scheme, &input[prefix_len..]));
        }
    }
    None
}

fn validate_authority(authority: &str) -> Result<(), UrlError> {
    match split_authority(authority) {
        Ok(_) => Ok(()),
        Err(AuthorityError::MissingHost) => Err(UrlError::MissingHost),
        Err(AuthorityError::BadPort) => Err(UrlError::BadPort),
    }
}

/// Why an authority (`host[:port]`) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthorityError {
    MissingHost,
    BadPort,
}

/// Splits `host[:port]`; an IPv6 literal keeps its brackets (`[::1]`). The filter's one
/// authority parser: token URLs, route patterns and request authorities read ports alike, ASCII
/// digits only (RFC 3986 §3.2.3; `u16::from_str` would also take a leading `+`), 1 to 65535.
pub(crate) fn split_authority(authority: &str) -> Result<(&str, Option<u16>), AuthorityError> {
    let (host, port) = if authority.starts_with('[') {
        let close = authority.find(']').ok_or(AuthorityError::MissingHost)?;
        let (host, after) = authority.split_at(close + 1);
        let port = match after {
            "" => None,
            rest => Some(rest.strip_prefix(':').ok_or(AuthorityError::BadPort)?),
        };
        (if host == "[]" { "" } else { host }, port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(AuthorityError::MissingHost);
    }
    let port = match port {
        None => None,
        Some(port) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => match port.parse::<u16>() {
            Ok(0) | Err(_) => return Err(AuthorityError::BadPort),
            Ok(port) => Some(port),
        },
        Some(_) => return Err(AuthorityError::BadPort),
    };
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_accepted_shapes() {
        let cases = [
            ("https://idp.example.com/oauth2/token", "https", "idp.example.com", "/oauth2/token"),
            ("http://idp:8080", "http", "idp:8080", "/"),
            ("HTTPS://IdP.example.com/t?a=b", "https", "IdP.example.com", "/t?a=b"),
            ("https://idp.example.com?x=1", "https", "idp.example.com", "/?x=1"),
            ("https://[::1]:8443/token", "https", "[::1]:8443", "/token"),
        ];
        for (input, scheme, authority, path) in cases {
            let url = HttpUrl::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(
                (url.scheme, url.authority.as_str(), url.path_and_query.as_str()),
                (scheme, authority, path),
                "{input}"
            );
        }
    }

    #[test]
    fn refuses_bad_shapes() {
        let cases = [
            ("idp.example.com/token", UrlError::NotAbsoluteHttp),
            ("ftp://idp/token", UrlError::NotAbsoluteHttp),
            ("https://", UrlError::NotAbsoluteHttp),
            ("https:///token", UrlError::MissingHost),
            ("https://user:pw@idp/token", UrlError::UserInfo),
            ("https://idp/token#frag", UrlError::Fragment),
            ("https://idp/to ken", UrlError::BadCharacter),
            ("https://idp:0/token", UrlError::BadPort),
            ("https://idp:99999/token", UrlError::BadPort),
            ("https://idp:abc/token", UrlError::BadPort),
            ("", UrlError::NotAbsoluteHttp),
        ];
        for (input, expected) in cases {
            assert_eq!(HttpUrl::parse(input), Err(expected), "{input}");
        }
    }

    #[test]
    fn one_authority_parser() {
        let cases = [
            ("idp", Ok(("idp", None))),
            ("idp:8443", Ok(("idp", Some(8443)))),
            ("idp:080", Ok(("idp", Some(80)))),
            ("idp:65535", Ok(("idp", Some(65535)))),
            ("[::1]", Ok(("[::1]", None))),
            ("[::1]:443", Ok(("[::1]", Some(443)))),
            ("idp:0", Err(AuthorityError::BadPort)),
            ("idp:65536", Err(AuthorityError::BadPort)),
            ("idp:+80", Err(AuthorityError::BadPort)),
            ("idp:", Err(AuthorityError::BadPort)),
            ("idp: 80", Err(AuthorityError::BadPort)),
            ("[::1]x", Err(AuthorityError::BadPort)),
            ("[::1", Err(AuthorityError::MissingHost)),
            ("[]:80", Err(AuthorityError::MissingHost)),
            (":80", Err(AuthorityError::MissingHost)),
            ("", Err(AuthorityError::MissingHost)),
        ];
        for (input, expected) in cases {
            assert_eq!(split_authority(input), expected, "{input:?}");
        }
    }
}
