//! One request through the filter, once for both hosts: which profile it gets, whether its own
//! header is kept, the hit path (this worker's copy of the token), asking the driver, a header
//! write that fails, the failure reply, and which response statuses are worth reporting.
//!
//! [`RequestPath`] is a small `Copy` state machine. The host feeds it the request's facts and its
//! own answers (this worker's copy, the driver's outcome, whether Envoy took the header, the
//! response status) and carries out the [`Step`] it returns: continue, look up a copy, write a
//! header, ask the driver, pause, resume, reply, report a status. Every counter that belongs to
//! one request comes back in [`Next::count`]; the driver counts only what it decides itself (a
//! request it fails, one it makes wait), so each event is counted once and the same way in both
//! builds.
//!
//! Cheap by construction: the machine asks only for what the configuration needs. The route table
//! reads a request fact only when a rule looks at it, the request's own header only when the
//! profile keeps an existing one, and `:status` only when the profile purges on some status
//! ([`RequestPath::wants_status`]); whether a status matters is decided here, so only a status in
//! the list reaches the driver (and its lock, in a host that has one).

use crate::config::{Config, MissingSubject};
use crate::exchange::copies::SubjectCopy;
use crate::exchange::{Refusal, Subject, SubjectFact, SubjectKey};
use crate::lifecycle::{FailureReply, RequestOutcome, Snapshot, failure_reply, unknown_profile_reply};
use crate::metrics::Metric;
pub use crate::route::RequestFacts;
use crate::route::Selection;

/// Where a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Phase {
    /// Its headers have not been seen.
    #[default]
    New,
    /// No token for it (no profile, or its own header kept): nothing more to do.
    Untouched,
    /// The host looks up its copy of the profile's token.
    LookingUp,
    /// The host asks the driver.
    Asking,
    /// The host writes the header carrying token `generation`; `resume`: the request was paused.
    Writing { generation: u64, resume: bool },
    /// Paused until the driver delivers an outcome.
    Paused,
    /// Its token is written (generation in `RequestPath::injected`).
    Injected,
    /// Answered with a failure reply.
    Failed,
}

/// One request's place in the path. See the module doc.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestPath {
    phase: Phase,
    profile: Option<usize>,
    injected: Option<u64>,
    /// The subject of a token-exchange profile's request.
    subject: Option<SubjectKey>,
}

/// What the host does next.
#[derive(PartialEq, Eq)]
pub enum Step<'a> {
    /// Let the request go on (it was never paused).
    Continue,
    /// Look up this worker's copy of `profile`'s token and give it to [`RequestPath::on_copy`].
    LookUpCopy { profile: usize },
    /// A token-exchange profile: look up this worker's copy of the token exchanged for `subject`
    /// (by the subject token's bytes) and give it to [`RequestPath::on_subject_copy`]; on
    /// `AskDriver`, ask `Driver::on_subject_request` with `subject`.
    LookUpSubjectCopy { profile: usize, subject: Subject },
    /// Ask the driver (`Driver::on_request`) and give its outcome to [`RequestPath::on_outcome`].
    AskDriver { profile: usize },
    /// Write `name: value` on the request and say whether Envoy took it
    /// ([`RequestPath::on_header_written`]).
    WriteHeader { name: &'a str, value: &'a str },
    /// Hold the request (headers, body and trailers) until the driver delivers.
    Pause,
    /// Let the paused request go on.
    Resume,
    /// Answer the request with `reply` (and log `error` at error level, when given).
    Reply { reply: FailureReply, error: Option<String> },
    /// Give the status to the driver (`Driver::on_response_status`): it is one the profile purges on.
    ReportStatus { profile: usize, generation: u64 },
    /// Nothing to do.
    Nothing,
}

impl std::fmt::Debug for Step<'_> {
    /// The header value carries the token, a credential: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Continue => f.write_str("Continue"),
            Step::LookUpCopy { profile } => write!(f, "LookUpCopy({profile})"),
            Step::LookUpSubjectCopy { profile, .. } => write!(f, "LookUpSubjectCopy({profile}, [redacted])"),
            Step::AskDriver { profile } => write!(f, "AskDriver({profile})"),
            Step::WriteHeader { name, .. } => write!(f, "WriteHeader({name}: [redacted])"),
            Step::Pause => f.write_str("Pause"),
            Step::Resume => f.write_str("Resume"),
            Step::Reply { reply, error } => write!(f, "Reply({reply:?}, {error:?})"),
            Step::ReportStatus { profile, generation } => write!(f, "ReportStatus({profile}, generation {generation})"),
            Step::Nothing => f.write_str("Nothing"),
        }
    }
}

/// A step and the counter this request's event adds to, if any.
#[derive(Debug, PartialEq, Eq)]
pub struct Next<'a> {
    pub step: Step<'a>,
    pub count: Option<(usize, Metric)>,
}

impl<'a> Next<'a> {
    fn step(step: Step<'a>) -> Next<'a> {
        Next { step, count: None }
    }
}

/// What the driver delivered to a paused request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered<'a> {
    /// Write `header: value` (token `generation` of `profile`, which a reconfiguration may have
    /// moved to a new index) and let the request go on.
    Token { profile: usize, header: &'a str, value: &'a str, generation: u64 },
    /// The driver failed the request (and counted it).
    Fail { profile: usize },
    /// The driver refused the request (and counted it).
    Refused { profile: usize, refusal: Refusal },
}

impl RequestPath {
    pub fn new() -> RequestPath {
        RequestPath::default()
    }

    /// The request's headers arrived: select its profile, keep its own header if the profile says
    /// so, or look up the token copy.
    pub fn on_request_headers<'c>(&mut self, config: &'c Config, facts: &mut dyn RequestFacts) -> Next<'c> {
        debug_assert_eq!(self.phase, Phase::New, "request headers seen twice");
        let index = match config.routes.select_request(facts) {
            Selection::None => return self.untouched(),
            Selection::Profile(index) => index,
            Selection::UnknownProfile(name) => {
                self.phase = Phase::Failed;
                let error =
                    format!("route metadata names profile {name:?}, which is not configured; failing the request");
                return Next::step(Step::Reply { reply: unknown_profile_reply(config), error: Some(error) });
            }
        };
        let Some(profile) = config.profiles.get(index) else { return self.untouched() };
        if let Some(te) = &profile.exchange {
            return match crate::exchange::read_subject(te, facts) {
                SubjectFact::Present(subject) => {
                    self.profile = Some(index);
                    self.phase = Phase::LookingUp;
                    Next::step(Step::LookUpSubjectCopy { profile: index, subject })
                }
                SubjectFact::Missing if te.missing_subject == MissingSubject::Pass => self.untouched(),
                SubjectFact::Missing => self.refuse(config, index, Refusal::SubjectMissing, true),
                SubjectFact::Unverified => self.refuse(config, index, Refusal::SubjectUnverified, true),
            };
        }
        // Any value counts as present, whatever its bytes.
        if profile.inject.keep_existing && facts.has_header(&profile.inject.header) {
            return self.untouched();
        }
        self.profile = Some(index);
        self.phase = Phase::LookingUp;
        Next::step(Step::LookUpCopy { profile: index })
    }

    /// The host's copy of the token (`None`: it has none).
    pub fn on_copy<'a>(&mut self, config: &'a Config, copy: Option<&'a Snapshot>) -> Next<'a> {
        debug_assert_eq!(self.phase, Phase::LookingUp, "a copy nobody asked for");
        let Some(profile) = self.profile else { return Next::step(Step::Nothing) };
        match copy {
            Some(snapshot) => self.write(config, profile, &snapshot.header_value, snapshot.generation, false),
            None => {
                self.phase = Phase::Asking;
                Next::step(Step::AskDriver { profile })
            }
        }
    }

    /// A token-exchange profile's copy for the request's subject (`None`: the host has none). A hit
    /// is written as any copy; on a miss the subject token is checked (one that cannot be a token
    /// counts as missing) and its key taken (the only SHA-256 of the request), and the driver asked.
    pub fn on_subject_copy<'a>(
        &mut self,
        config: &'a Config,
        subject: &Subject,
        copy: Option<&'a SubjectCopy>,
    ) -> Next<'a> {
        match copy {
            Some(copy) => {
                self.subject = Some(copy.subject);
                self.on_copy(config, Some(&copy.snapshot))
            }
            None => {
                let Some(profile) = self.profile else { return Next::step(Step::Nothing) };
                if subject.token().is_none() {
                    // Not a token (control bytes, too long): no subject, as the profile says.
                    let pass = config
                        .profiles
                        .get(profile)
                        .and_then(|p| p.exchange.as_ref())
                        .is_some_and(|te| te.missing_subject == MissingSubject::Pass);
                    return if pass {
                        self.untouched()
                    } else {
                        self.refuse(config, profile, Refusal::SubjectMissing, true)
                    };
                }
                self.subject = Some(subject.key());
                self.on_copy(config, None)
            }
        }
    }

    /// The driver's outcome for a request that found no copy.
    pub fn on_outcome<'a>(&mut self, config: &'a Config, outcome: &'a RequestOutcome) -> Next<'a> {
        debug_assert_eq!(self.phase, Phase::Asking, "an outcome nobody asked for");
        let Some(profile) = self.profile else { return Next::step(Step::Nothing) };
        match outcome {
            RequestOutcome::Inject { value, generation } => self.write(config, profile, value, *generation, false),
            RequestOutcome::Wait => {
                self.phase = Phase::Paused;
                Next::step(Step::Pause)
            }
            // The driver counted its decision.
            RequestOutcome::Fail => self.fail(config, profile, None),
            RequestOutcome::Refuse(refusal) => self.refuse(config, profile, *refusal, false),
        }
    }

    /// The driver said wait but the host cannot pause this request (it has no way to be woken):
    /// the host tells the driver it is gone, and the request fails closed.
    pub fn on_cannot_pause(&mut self, config: &Config) -> Next<'static> {
        let Some(profile) = self.profile else { return Next::step(Step::Nothing) };
        let error = "no way to resume a paused request; failing it".to_string();
        let mut next = self.fail(config, profile, Some(error));
        next.count = Some((profile, Metric::FailedRequest));
        next
    }

    /// A paused request's outcome arrived (`None`: none did, although the request was woken).
    pub fn on_delivered<'a>(&mut self, config: &'a Config, delivered: Option<Delivered<'a>>) -> Next<'a> {
        if self.phase != Phase::Paused {
            return Next::step(Step::Nothing);
        }
        match delivered {
            Some(Delivered::Token { profile, header, value, generation }) => {
                self.profile = Some(profile);
                self.phase = Phase::Writing { generation, resume: true };
                Next::step(Step::WriteHeader { name: header, value })
            }
            // The driver counted its decision.
            Some(Delivered::Fail { profile }) => self.fail(config, profile, None),
            Some(Delivered::Refused { profile, refusal }) => self.refuse(config, profile, refusal, false),
            // Woken with nothing to carry out: never left stopped, never sent on without a token.
            None => {
                let profile = self.profile.unwrap_or(0);
                let mut next = self.fail(config, profile, None);
                next.count = Some((profile, Metric::FailedRequest));
                next
            }
        }
    }

    /// Whether Envoy took the header the last step asked for.
    pub fn on_header_written(&mut self, config: &Config, written: bool) -> Next<'static> {
        let (Phase::Writing { generation, resume }, Some(profile)) = (self.phase, self.profile) else {
            debug_assert!(false, "a header write nobody asked for");
            return Next::step(Step::Nothing);
        };
        if !written {
            // Never sent on without its token.
            let mut next = self.fail(config, profile, None);
            next.count = Some((profile, Metric::FailedRequest));
            return next;
        }
        self.phase = Phase::Injected;
        self.injected = Some(generation);
        let step = if resume { Step::Resume } else { Step::Continue };
        Next { step, count: Some((profile, Metric::Injected)) }
    }

    /// The subject of a token-exchange profile's request: the host reports a purge status with it
    /// (`Driver::on_subject_status`).
    pub fn subject_key(&self) -> Option<SubjectKey> {
        self.subject
    }

    /// The profile whose token this request gets, once selected.
    pub fn profile(&self) -> Option<usize> {
        self.profile
    }

    /// Whether the request is paused (its body and trailers must be held too).
    pub fn waiting(&self) -> bool {
        self.phase == Phase::Paused
    }

    /// Whether the host should read the response's `:status`: a token was written and its profile
    /// purges on some status. Decided from the configuration alone: no host call, no lock.
    pub fn wants_status(&self, config: &Config) -> bool {
        match (self.injected, self.profile) {
            (Some(_), Some(profile)) => config.profiles.get(profile).is_some_and(|p| !p.purge_on_status.is_empty()),
            _ => false,
        }
    }

    /// The response's `:status` (bytes; `None`: absent): report it to the driver only when it is
    /// one the profile purges on.
    pub fn on_response_status(&self, config: &Config, status: Option<&[u8]>) -> Step<'static> {
        let (Some(generation), Some(profile)) = (self.injected, self.profile) else { return Step::Nothing };
        let Some(status) = status.and_then(parse_status) else { return Step::Nothing };
        match config.profiles.get(profile) {
            Some(p) if p.purge_on_status.contains(&status) => Step::ReportStatus { profile, generation },
            _ => Step::Nothing,
        }
    }

    /// The stream ends: `true` when the request was still paused, so the driver must forget it.
    pub fn on_gone(&mut self) -> bool {
        let paused = self.phase == Phase::Paused;
        if paused {
            self.phase = Phase::Failed;
        }
        paused
    }

    fn untouched(&mut self) -> Next<'static> {
        self.phase = Phase::Untouched;
        Next::step(Step::Continue)
    }

    fn write<'a>(
        &mut self,
        config: &'a Config,
        profile: usize,
        value: &'a str,
        generation: u64,
        resume: bool,
    ) -> Next<'a> {
        let Some(p) = config.profiles.get(profile) else { return self.fail(config, profile, None) };
        self.phase = Phase::Writing { generation, resume };
        Next::step(Step::WriteHeader { name: &p.inject.header, value })
    }

    /// A token-exchange profile's refusal; `count`: the path decided it (the driver counts its own).
    fn refuse(&mut self, config: &Config, profile: usize, refusal: Refusal, count: bool) -> Next<'static> {
        self.phase = Phase::Failed;
        let name = config.profiles.get(profile).map_or("", |p| p.name.as_str());
        Next {
            step: Step::Reply { reply: refusal.reply(name), error: None },
            count: count.then(|| (profile, refusal.metric())),
        }
    }

    fn fail(&mut self, config: &Config, profile: usize, error: Option<String>) -> Next<'static> {
        self.phase = Phase::Failed;
        Next::step(Step::Reply { reply: failure_reply(config, profile), error })
    }
}

/// A `:status` value: three ASCII digits; anything else is no status.
pub(crate) fn parse_status(bytes: &[u8]) -> Option<u32> {
    match bytes {
        [a, b, c] if bytes.iter().all(u8::is_ascii_digit) => {
            Some(u32::from(a - b'0') * 100 + u32::from(b - b'0') * 10 + u32::from(c - b'0'))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests;
