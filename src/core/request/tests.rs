//! The request path, table-driven: each case is one request's facts and the host's answers, and
//! the steps and counts the machine must give.

use super::*;
use crate::config;

/// Request facts that record which ones were read.
#[derive(Default)]
struct Facts {
    headers: Vec<(&'static str, &'static str)>,
    metadata_profile: Option<&'static str>,
    read: Vec<String>,
}

impl RequestFacts for Facts {
    fn authority(&mut self) -> Option<&str> {
        self.read.push(":authority".into());
        Some("api.test")
    }
    fn path(&mut self) -> Option<&str> {
        self.read.push(":path".into());
        Some("/v1/things")
    }
    fn method(&mut self) -> Option<&str> {
        self.read.push(":method".into());
        Some("GET")
    }
    fn header(&mut self, name: &str) -> Option<Vec<u8>> {
        self.read.push(name.to_string());
        self.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_bytes().to_vec())
    }
    fn route_name(&mut self) -> Option<String> {
        self.read.push("route_name".into());
        None
    }
    fn metadata_profile(&mut self) -> Option<String> {
        self.read.push("metadata_profile".into());
        self.metadata_profile.map(str::to_string)
    }
    fn metadata_disabled(&mut self) -> bool {
        self.read.push("metadata_disabled".into());
        false
    }
}

fn config(profile_extra: &str, top_extra: &str, route_match: &str) -> Config {
    let json = format!(
        r#"{{"profiles": {{"p": {{"cluster": "idp", "token_url": "http://idp.test/token",
            "client_id": "svc", "client_secret": "s3cret" {profile_extra}}}}},
            "routes": [{{"match": {route_match}, "profile": "p"}}] {top_extra}}}"#
    );
    match config::parse(json.as_bytes(), &|_| None) {
        Ok(config) => config,
        Err(error) => panic!("test config refused: {error}"),
    }
}

fn plain() -> Config {
    config("", "", r#"{"path_prefix": "/"}"#)
}

fn snapshot(generation: u64) -> Snapshot {
    Snapshot { generation, header_value: "Bearer tok".into(), valid_until_ms: u64::MAX }
}

fn failure(config: &Config) -> Step<'static> {
    Step::Reply { reply: failure_reply(config, 0), error: None }
}

/// The host's answers in one case.
#[derive(Clone, Copy)]
enum Answer {
    Copy(Option<u64>),
    Outcome(&'static str),
    Written(bool),
    Delivered(Option<&'static str>),
}

/// Runs a request through the machine with the host's `answers` in order; returns each step (as
/// text) and every count.
fn run(config: &Config, facts: &mut Facts, answers: &[Answer]) -> (Vec<String>, Vec<Metric>, RequestPath) {
    let mut path = RequestPath::new();
    let mut steps = Vec::new();
    let mut counts = Vec::new();
    let mut note = |next: Next<'_>, steps: &mut Vec<String>| {
        steps.push(format!("{:?}", next.step).split([' ', '(']).next().unwrap_or("").to_string());
        counts.extend(next.count.map(|(_, m)| m));
    };
    note(path.on_request_headers(config, facts), &mut steps);
    for answer in answers {
        let next = match *answer {
            Answer::Copy(generation) => {
                let copy = generation.map(snapshot);
                let next = path.on_copy(config, copy.as_ref());
                // Steps borrow the copy: compare them before it goes.
                note(next, &mut steps);
                continue;
            }
            Answer::Outcome("inject") => {
                let outcome = RequestOutcome::Inject { value: "Bearer t".into(), generation: 7 };
                let next = path.on_outcome(config, &outcome);
                note(next, &mut steps);
                continue;
            }
            Answer::Outcome("wait") => path.on_outcome(config, &RequestOutcome::Wait),
            Answer::Outcome(_) => path.on_outcome(config, &RequestOutcome::Fail),
            Answer::Written(ok) => path.on_header_written(config, ok),
            Answer::Delivered(Some("token")) => path.on_delivered(
                config,
                Some(Delivered::Token { profile: 0, header: "authorization", value: "Bearer t", generation: 9 }),
            ),
            Answer::Delivered(Some(_)) => path.on_delivered(config, Some(Delivered::Fail { profile: 0 })),
            Answer::Delivered(None) => path.on_delivered(config, None),
        };
        note(next, &mut steps);
    }
    (steps, counts, path)
}

/// A name, the host's answers, the steps, the counts, the generation left injected.
type Case = (&'static str, &'static [Answer], &'static [&'static str], &'static [Metric], Option<u64>);

#[test]
fn every_request_path_gives_its_steps_and_counts_once() {
    use Answer::*;
    use Metric::{FailedRequest, Injected};
    let cases: &[Case] = &[
        ("hit", &[Copy(Some(3)), Written(true)], &["LookUpCopy", "WriteHeader", "Continue"], &[Injected], Some(3)),
        (
            "hit, header refused",
            &[Copy(Some(3)), Written(false)],
            &["LookUpCopy", "WriteHeader", "Reply"],
            &[FailedRequest],
            None,
        ),
        (
            "miss, driver has a token",
            &[Copy(None), Outcome("inject"), Written(true)],
            &["LookUpCopy", "AskDriver", "WriteHeader", "Continue"],
            &[Injected],
            Some(7),
        ),
        (
            "miss, header refused",
            &[Copy(None), Outcome("inject"), Written(false)],
            &["LookUpCopy", "AskDriver", "WriteHeader", "Reply"],
            &[FailedRequest],
            None,
        ),
        (
            "miss, driver fails it (and counts)",
            &[Copy(None), Outcome("fail")],
            &["LookUpCopy", "AskDriver", "Reply"],
            &[],
            None,
        ),
        (
            "paused, then resumed",
            &[Copy(None), Outcome("wait"), Delivered(Some("token")), Written(true)],
            &["LookUpCopy", "AskDriver", "Pause", "WriteHeader", "Resume"],
            &[Injected],
            Some(9),
        ),
        (
            "paused, resumed, header refused",
            &[Copy(None), Outcome("wait"), Delivered(Some("token")), Written(false)],
            &["LookUpCopy", "AskDriver", "Pause", "WriteHeader", "Reply"],
            &[FailedRequest],
            None,
        ),
        (
            "paused, driver fails it (and counts)",
            &[Copy(None), Outcome("wait"), Delivered(Some("fail"))],
            &["LookUpCopy", "AskDriver", "Pause", "Reply"],
            &[],
            None,
        ),
        (
            "paused, woken with nothing",
            &[Copy(None), Outcome("wait"), Delivered(None)],
            &["LookUpCopy", "AskDriver", "Pause", "Reply"],
            &[FailedRequest],
            None,
        ),
        (
            "a second delivery is ignored",
            &[Copy(None), Outcome("wait"), Delivered(Some("fail")), Delivered(Some("token"))],
            &["LookUpCopy", "AskDriver", "Pause", "Reply", "Nothing"],
            &[],
            None,
        ),
    ];
    let config = plain();
    for (name, answers, steps, counts, injected) in cases {
        let (got_steps, got_counts, path) = run(&config, &mut Facts::default(), answers);
        println!("{name}: {got_steps:?} {got_counts:?}");
        assert_eq!(&got_steps, steps, "{name}");
        assert_eq!(&got_counts, counts, "{name}");
        assert_eq!(path.injected, *injected, "{name}");
        assert!(!path.waiting(), "{name}: left paused");
    }
}

#[test]
fn the_reply_steps_carry_the_failure_reply() {
    let config = plain();
    let mut path = RequestPath::new();
    let _ = path.on_request_headers(&config, &mut Facts::default());
    let copy = snapshot(1);
    let _ = path.on_copy(&config, Some(&copy));
    assert_eq!(path.on_header_written(&config, false).step, failure(&config));
}

#[test]
fn keep_existing_reads_the_header_only_when_configured_and_keeps_a_present_one() {
    let keep = config(r#", "inject": {"keep_existing": true}"#, "", r#"{"path_prefix": "/"}"#);
    let mut with_header = Facts { headers: vec![("authorization", "Basic x")], ..Facts::default() };
    let mut path = RequestPath::new();
    assert_eq!(path.on_request_headers(&keep, &mut with_header), Next { step: Step::Continue, count: None });
    assert_eq!(with_header.read, ["authorization"]);
    assert!(!path.wants_status(&keep), "an untouched request reports no status");

    let mut without = Facts::default();
    let mut path = RequestPath::new();
    assert_eq!(path.on_request_headers(&keep, &mut without).step, Step::LookUpCopy { profile: 0 });

    let mut plain_facts = Facts { headers: vec![("authorization", "Basic x")], ..Facts::default() };
    let mut path = RequestPath::new();
    assert_eq!(path.on_request_headers(&plain(), &mut plain_facts).step, Step::LookUpCopy { profile: 0 });
    assert!(plain_facts.read.is_empty(), "read {:?} for a `/` prefix without keep_existing", plain_facts.read);
}

#[test]
fn the_route_table_reads_only_what_a_rule_looks_at() {
    let cases: &[(&str, &[&str])] = &[
        (r#"{"path_prefix": "/"}"#, &[]),
        (r#"{}"#, &[]),
        (r#"{"path_prefix": "/v1"}"#, &[":path"]),
        (r#"{"authority": "api.test"}"#, &[":authority"]),
        (r#"{"authority": "api.test", "path_prefix": "/v1", "method": "GET"}"#, &[":authority", ":path", ":method"]),
    ];
    for (route_match, read) in cases {
        let config = config("", "", route_match);
        let mut facts = Facts::default();
        let mut path = RequestPath::new();
        assert_eq!(path.on_request_headers(&config, &mut facts).step, Step::LookUpCopy { profile: 0 }, "{route_match}");
        assert_eq!(&facts.read, read, "{route_match}");
    }
}

#[test]
fn no_match_continues_and_an_unknown_profile_fails_with_its_reply() {
    let config = config("", "", r#"{"path_prefix": "/other"}"#);
    let mut path = RequestPath::new();
    assert_eq!(path.on_request_headers(&config, &mut Facts::default()), Next { step: Step::Continue, count: None });

    let metadata = config_with_metadata();
    let mut facts = Facts { metadata_profile: Some("nope"), ..Facts::default() };
    let mut path = RequestPath::new();
    let next = path.on_request_headers(&metadata, &mut facts);
    assert_eq!(next.count, None, "no profile to count it against");
    match next.step {
        Step::Reply { reply, error: Some(error) } => {
            assert_eq!(reply, unknown_profile_reply(&metadata));
            assert!(error.contains("\"nope\""), "{error}");
        }
        other => panic!("{other:?}"),
    }
}

fn config_with_metadata() -> Config {
    config("", r#", "route_metadata": true"#, r#"{"path_prefix": "/"}"#)
}

fn injected(config: &Config, generation: u64) -> RequestPath {
    let mut path = RequestPath::new();
    let _ = path.on_request_headers(config, &mut Facts::default());
    let copy = snapshot(generation);
    let _ = path.on_copy(config, Some(&copy));
    let _ = path.on_header_written(config, true);
    path
}

#[test]
fn only_a_status_in_the_purge_list_is_reported() {
    let config = plain(); // purge_on_status defaults to [401]
    let path = injected(&config, 5);
    assert!(path.wants_status(&config));
    let cases: &[(Option<&[u8]>, Step<'static>)] = &[
        (Some(b"401"), Step::ReportStatus { profile: 0, generation: 5 }),
        (Some(b"200"), Step::Nothing),
        (Some(b"403"), Step::Nothing),
        (Some(b"40"), Step::Nothing),
        (Some(b"4x1"), Step::Nothing),
        (None, Step::Nothing),
    ];
    for (status, step) in cases {
        assert_eq!(&path.on_response_status(&config, *status), step, "{status:?}");
    }
    let no_purge = config_purging("[]");
    let path = injected(&no_purge, 5);
    assert!(!path.wants_status(&no_purge), "an empty purge list needs no :status");
    let purging = config_purging("[401, 403]");
    assert_eq!(
        injected(&purging, 2).on_response_status(&purging, Some(b"403")),
        Step::ReportStatus { profile: 0, generation: 2 }
    );
    // A request that got no token reports nothing.
    let mut failed = RequestPath::new();
    let _ = failed.on_request_headers(&config, &mut Facts::default());
    let _ = failed.on_copy(&config, None);
    let _ = failed.on_outcome(&config, &RequestOutcome::Fail);
    assert!(!failed.wants_status(&config));
    assert_eq!(failed.on_response_status(&config, Some(b"401")), Step::Nothing);
}

fn config_purging(list: &str) -> Config {
    config(&format!(r#", "purge_on_status": {list}"#), "", r#"{"path_prefix": "/"}"#)
}

#[test]
fn a_paused_request_that_goes_away_is_forgotten_once() {
    let config = plain();
    let mut path = RequestPath::new();
    let _ = path.on_request_headers(&config, &mut Facts::default());
    let _ = path.on_copy(&config, None);
    assert_eq!(path.on_outcome(&config, &RequestOutcome::Wait).step, Step::Pause);
    assert!(path.waiting());
    assert!(path.on_gone(), "the driver must forget it");
    assert!(!path.on_gone(), "only once");
    assert_eq!(path.on_delivered(&config, Some(Delivered::Fail { profile: 0 })).step, Step::Nothing);
    let mut hit = injected(&config, 1);
    assert!(!hit.on_gone());
}

#[test]
fn a_request_that_cannot_pause_fails_closed_and_is_counted() {
    let config = plain();
    let mut path = RequestPath::new();
    let _ = path.on_request_headers(&config, &mut Facts::default());
    let _ = path.on_copy(&config, None);
    let _ = path.on_outcome(&config, &RequestOutcome::Wait);
    let next = path.on_cannot_pause(&config);
    assert!(matches!(next.step, Step::Reply { error: Some(_), .. }), "{:?}", next.step);
    assert_eq!(next.count, Some((0, Metric::FailedRequest)));
}

#[test]
fn load_gives_the_log_line_or_the_rejection() {
    let json = br#"{"profiles": {"a": {"cluster": "idp", "token_url": "http://idp.test/t", "client_id": "c", "client_secret": "s3cret"}}}"#;
    match config::load(json, &|_| None) {
        Ok(loaded) => assert_eq!(loaded.log_line, "configured 1 profile(s): a"),
        Err(error) => panic!("{error}"),
    }
    match config::load(br#"{"profiles": {}}"#, &|_| None) {
        Ok(_) => panic!("accepted"),
        Err(error) => assert_eq!(error, "configuration rejected: profiles: at least one profile is required"),
    }
}

#[test]
fn debug_output_never_prints_a_token() {
    let step = Step::WriteHeader { name: "authorization", value: "Bearer tok-secret" };
    let printed = format!("{step:?}");
    assert!(!printed.contains("tok-secret") && printed.contains("authorization"), "{printed}");
}
