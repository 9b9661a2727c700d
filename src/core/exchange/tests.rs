//! Reading the subject from a request, and the refusals' replies.

use super::*;
use crate::config::{MissingSubject, SubjectSource, TokenExchange, parse};
use crate::lifecycle::RequestOutcome;
use crate::request::{RequestPath, Step};

#[derive(Default)]
struct Facts {
    headers: Vec<(String, Vec<u8>)>,
    metadata: Vec<(String, String, Vec<u8>)>,
}

impl RequestFacts for Facts {
    fn authority(&mut self) -> Option<&str> {
        None
    }
    fn path(&mut self) -> Option<&str> {
        Some("/")
    }
    fn method(&mut self) -> Option<&str> {
        None
    }
    fn header(&mut self, name: &str) -> Option<Vec<u8>> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
    }
    fn route_name(&mut self) -> Option<String> {
        None
    }
    fn metadata_profile(&mut self) -> Option<String> {
        None
    }
    fn metadata_disabled(&mut self) -> bool {
        false
    }
    fn dynamic_metadata_string(&mut self, namespace: &str, key: &str) -> Option<Vec<u8>> {
        self.metadata.iter().find(|(n, k, _)| n == namespace && k == key).map(|(_, _, v)| v.clone())
    }
    fn dynamic_metadata_has_key(&mut self, namespace: &str, key: &str) -> bool {
        self.metadata.iter().any(|(n, k, _)| n == namespace && k == key)
    }
}

fn authorization(value: &[u8]) -> Facts {
    Facts { headers: vec![("authorization".into(), value.to_vec())], ..Facts::default() }
}

fn config(token_exchange: &str) -> crate::config::Config {
    let json = format!(
        r#"{{"profiles": {{"x": {{"cluster": "idp", "token_url": "http://idp.test/token", "client_id": "gw",
            "client_secret": "s", "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "token_exchange": {token_exchange}}}}}, "routes": [{{"match": {{"path_prefix": "/"}}, "profile": "x"}}]}}"#
    );
    match parse(json.as_bytes(), &|_| None) {
        Ok(config) => config,
        Err(error) => panic!("{error}"),
    }
}

fn exchange_of(config: &crate::config::Config) -> &TokenExchange {
    config.profiles[0].exchange.as_ref().expect("exchange")
}

#[test]
fn the_bearer_is_read_without_regard_to_case_and_only_a_plausible_token_counts() {
    let config = config("{}");
    let te = exchange_of(&config);
    let present = |value: &[u8]| match read_subject(te, &mut authorization(value)) {
        SubjectFact::Present(subject) => subject.token().map(str::to_string),
        _ => None,
    };
    assert_eq!(present(b"Bearer abc.def"), Some("abc.def".into()));
    assert_eq!(present(b"bearer   abc"), Some("abc".into()));
    for bad in [&b"Basic abc"[..], b"Bearer ", b"Bearer", b"Bearer a b", b"Bearer \xff\xfe", b"Bearer a\x01", b""] {
        assert_eq!(present(bad), None, "{bad:?}");
    }
    assert_eq!(present(format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES + 1)).as_bytes()), None);
    assert_eq!(read_subject(te, &mut Facts::default()), SubjectFact::Missing);
}

#[test]
fn a_subject_from_metadata_and_the_jwt_authn_fact() {
    let config = config(
        r#"{"subject": {"metadata": {"namespace": "lua", "key": "subject"}}, "verified_by_jwt_authn": "jwt_payload"}"#,
    );
    let te = exchange_of(&config);
    assert_eq!(te.subject, SubjectSource::Metadata { namespace: "lua".into(), key: "subject".into() });
    let mut facts = Facts { metadata: vec![("lua".into(), "subject".into(), b"tok".to_vec())], ..Facts::default() };
    assert_eq!(read_subject(te, &mut facts), SubjectFact::Unverified, "jwt_authn verified nothing");
    facts.metadata.push((crate::config::JWT_AUTHN_NAMESPACE.into(), "jwt_payload".into(), Vec::new()));
    assert_eq!(read_subject(te, &mut facts), SubjectFact::Present(Subject::new("tok")));
    assert_eq!(read_subject(te, &mut Facts::default()), SubjectFact::Missing, "missing comes first");
}

#[test]
fn the_request_path_refuses_passes_or_looks_up_the_subjects_copy() {
    let reject = config("{}");
    let mut path = RequestPath::new();
    let next = path.on_request_headers(&reject, &mut Facts::default());
    let Step::Reply { reply, .. } = &next.step else { panic!("{next:?}") };
    assert_eq!((reply.status, reply.body.as_str()), (401, r#"{"error":"subject_token_missing","profile":"x"}"#));
    assert_eq!(next.count, Some((0, Metric::Refused(Refusal::SubjectMissing))), "the path counts its own refusal");

    let pass = config(r#"{"missing_subject": "pass"}"#);
    assert_eq!(exchange_of(&pass).missing_subject, MissingSubject::Pass);
    let mut path = RequestPath::new();
    assert_eq!(path.on_request_headers(&pass, &mut Facts::default()).step, Step::Continue);

    let mut path = RequestPath::new();
    let next = path.on_request_headers(&reject, &mut authorization(b"Bearer alice"));
    assert_eq!(next.step, Step::LookUpSubjectCopy { profile: 0, subject: Subject::new("alice") });
    assert_eq!(path.subject_key(), None, "no digest before a miss");
    let subject = Subject::new("alice");
    assert_eq!(path.on_subject_copy(&reject, &subject, None).step, Step::AskDriver { profile: 0 });
    assert_eq!(path.subject_key(), Some(SubjectKey::of(b"alice")));
    // A value that cannot be a token is checked on the miss only: then it counts as missing.
    let mut malformed = RequestPath::new();
    let next = malformed.on_request_headers(&reject, &mut authorization(b"Bearer a\x01b"));
    let Step::LookUpSubjectCopy { subject: bad, .. } = next.step else { panic!("{next:?}") };
    let next = malformed.on_subject_copy(&reject, &bad, None);
    let Step::Reply { reply, .. } = &next.step else { panic!("{next:?}") };
    assert_eq!(reply.status, 401);
    assert_eq!(next.count, Some((0, Metric::Refused(Refusal::SubjectMissing))));
    let mut passed = RequestPath::new();
    let next = passed.on_request_headers(&pass, &mut authorization(b"Bearer a\x01b"));
    let Step::LookUpSubjectCopy { subject: bad, .. } = next.step else { panic!("{next:?}") };
    assert_eq!(passed.on_subject_copy(&pass, &bad, None).step, Step::Continue);
    let outcome = RequestOutcome::Refuse(Refusal::ExchangeLimited);
    let next = path.on_outcome(&reject, &outcome);
    let Step::Reply { reply, .. } = &next.step else { panic!("{next:?}") };
    assert_eq!((reply.status, reply.details), (429, "oauth2_cc_exchange_limited"));
    assert_eq!(next.count, None, "the driver counted its refusal");
}

#[test]
fn refusals_have_distinct_replies_and_counters() {
    let replies: Vec<(u32, &str, &str)> = Refusal::ALL.iter().map(|r| (r.status(), r.error(), r.counter())).collect();
    assert_eq!(
        replies,
        vec![
            (401, "subject_token_missing", "subject_missing"),
            (401, "subject_token_unverified", "subject_unverified"),
            (401, "subject_token_rejected", "subject_rejected"),
            (429, "exchange_limited", "exchange_limited"),
        ]
    );
    assert!(!format!("{:?}", Subject::new("secret-subject")).contains("secret-subject"));
}
