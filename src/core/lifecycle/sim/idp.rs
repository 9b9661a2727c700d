//! The simulated IdP: what a token endpoint (and a metadata endpoint) answers, each failure class
//! included, and the true expiry of every token it issued.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::Rng;

/// One answer as the host would hand it to `Driver::on_answer`.
#[derive(Clone)]
pub(super) struct Reply {
    pub(crate) status: Option<Vec<u8>>,
    pub(crate) retry_after: Option<Vec<u8>>,
    /// `None`: larger than the read limit (`AnswerBody::TooLarge`).
    pub(crate) body: Option<Vec<u8>>,
    /// What the trace shows.
    pub(crate) label: String,
    /// The Retry-After the filter must honour, as an absolute time, when the answer carries one.
    pub(crate) retry_floor_ms: Option<RetryFloor>,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label)
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) enum RetryFloor {
    /// Seconds: counted from when the answer is processed.
    AfterMs(u64),
    /// An HTTP-date: an absolute time.
    At(u64),
}

/// A token the IdP issued: its true expiry (ms) whatever `expires_in` said.
pub(super) struct Issued {
    pub(crate) token: String,
    pub(crate) expiry_ms: u64,
}

fn reply(status: &[u8], body: &[u8], label: &str) -> Reply {
    Reply {
        status: Some(status.to_vec()),
        retry_after: None,
        body: Some(body.to_vec()),
        label: label.to_string(),
        retry_floor_ms: None,
    }
}

/// Envoy's answer when the callout times out: either no headers at all (status 0) or its
/// local reply.
pub(super) fn timeout(rng: &mut Rng) -> Reply {
    if rng.chance(50) {
        Reply {
            status: None,
            retry_after: None,
            body: Some(Vec::new()),
            label: "timeout (no status)".into(),
            retry_floor_ms: None,
        }
    } else {
        reply(b"504", b"upstream request timeout", "timeout (504 local reply)")
    }
}

/// A successful token answer issued at `issue_ms`, and the token's true expiry.
pub(super) fn success(rng: &mut Rng, serial: u64, issue_ms: u64) -> (Reply, Issued) {
    const LIFETIMES: [u64; 10] = [1, 2, 3, 4, 5, 5, 8, 15, 60, 300];
    let lifetime = LIFETIMES[rng.below(LIFETIMES.len() as u64) as usize];
    let jws = rng.chance(60);
    // Whole-second stamps: exp = floor(now_s) + lifetime.
    let whole_exp_ms = (issue_ms / 1000 + lifetime) * 1000;
    let (token, expiry_ms) = if jws {
        let payload = format!(r#"{{"exp":{},"n":{serial}}}"#, issue_ms / 1000 + lifetime);
        (format!("eyJhbGciOiJub25lIn0.{}.c2ln", URL_SAFE_NO_PAD.encode(payload)), whole_exp_ms)
    } else if lifetime >= 2 {
        // An opaque token from a server that stamps whole seconds: up to 1 s less than expires_in.
        (format!("opaque-{serial}"), whole_exp_ms)
    } else {
        // A 1 s opaque token cannot survive a whole-second stamp (no margin leaves a usable token):
        // the simulated IdP keeps its word exactly for these.
        (format!("opaque-{serial}"), issue_ms + 1000)
    };
    let expires_in = match rng.below(10) {
        // No expires_in: only a JWS says its own lifetime.
        0 if jws => String::new(),
        1 => format!(r#","expires_in":"{lifetime}""#),
        2 => format!(r#","expires_in":{lifetime}.7"#),
        3 => format!(r#","expires_in":{lifetime},"refresh_in":{}"#, rng.below(lifetime + 2)),
        _ => format!(r#","expires_in":{lifetime}"#),
    };
    let body = format!(r#"{{"access_token":"{token}","token_type":"Bearer"{expires_in}}}"#);
    let label = format!("200 token {serial} lifetime {lifetime} s{}", if jws { " jws" } else { "" });
    (reply(b"200", body.as_bytes(), &label), Issued { token, expiry_ms })
}

/// A failed token answer, one of every class the filter tells apart.
pub(super) fn failure(rng: &mut Rng, now_ms: u64) -> Reply {
    match rng.below(20) {
        0 => reply(b"500", b"", "500"),
        1 => reply(b"502", b"<html>bad gateway</html>", "502 html"),
        2 => reply(
            b"503",
            b"upstream connect error or disconnect/reset before headers. reset reason: connection failure",
            "503 envoy connect error",
        ),
        3 => reply(b"503", b"no healthy upstream", "503 no healthy upstream"),
        4 | 5 => {
            let seconds = rng.below(30);
            let mut r = reply(b"429", b"", &format!("429 Retry-After {seconds}"));
            r.retry_after = Some(seconds.to_string().into_bytes());
            r.retry_floor_ms = Some(RetryFloor::AfterMs(seconds * 1000));
            r
        }
        6 => {
            let at_s = now_ms / 1000 + 1 + rng.below(20);
            let date = httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(at_s));
            let mut r = reply(b"429", b"{}", &format!("429 Retry-After {date}"));
            r.retry_after = Some(date.into_bytes());
            r.retry_floor_ms = Some(RetryFloor::At(at_s * 1000));
            r
        }
        7 => {
            let mut r = reply(b"429", b"", "429 Retry-After non-UTF-8");
            r.retry_after = Some(b"\xff\xfe".to_vec());
            r
        }
        8 => reply(b"400", br#"{"error":"invalid_client"}"#, "400 invalid_client"),
        9 => reply(b"400", br#"{"error":"invalid_scope","error_description":"s3cret?"}"#, "400 invalid_scope"),
        10 => reply(b"503", br#"{"error":"temporarily_unavailable"}"#, "503 temporarily_unavailable"),
        11 => reply(b"200", br#"{"error":"slow_down"}"#, "200 with error slow_down"),
        12 => reply(b"200", b"not json", "200 not json"),
        13 => reply(b"200", br#"{"access_token":5}"#, "200 token not a string"),
        14 => reply(b"200", br#"{"access_token":"a b\r\n"}"#, "200 unsafe token"),
        15 => reply(b"200", br#"{"access_token":"x","expires_in":-1}"#, "200 bad expires_in"),
        16 => reply(b"200", b"[1]", "200 array"),
        17 => Reply {
            status: Some(b"200".to_vec()),
            retry_after: None,
            body: None,
            label: "too large".into(),
            retry_floor_ms: None,
        },
        18 => reply(b"2x0", b"{}", "garbled status"),
        _ => reply(b"401", br#"{"error":"unauthorized_client"}"#, "401 unauthorized_client"),
    }
}

/// An answer to a metadata (discovery) request.
pub(super) fn metadata(rng: &mut Rng) -> Reply {
    match rng.below(10) {
        0 => reply(b"404", b"", "metadata 404"),
        1 => reply(b"500", b"", "metadata 500"),
        2 => reply(
            b"200",
            br#"{"issuer":"http://evil.test","token_endpoint":"http://idp.test/token"}"#,
            "metadata wrong issuer",
        ),
        _ => reply(b"200", br#"{"issuer":"http://idp.test","token_endpoint":"http://idp.test/token"}"#, "metadata ok"),
    }
}
