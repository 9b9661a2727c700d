//! One request through the filter, as the core's request path (`oauth2_cc_core::request`) says:
//! this host only reads and writes Envoy's headers, pauses, resumes and replies. It owns this
//! worker's token copies (the hit path: no lock, no clock, no allocation but the stream object),
//! the driver's lock around a miss, and the mailbox of a paused request.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::abi::{self, Level, RESPONSE_HEADER, Stream};
use crate::parked::{Outcome, Parked};
use crate::plugin::{Plugin, Thread};
use oauth2_cc_core::exchange::Subject;
use oauth2_cc_core::exchange::copies::{SubjectCopies, SubjectCopy, bounds};
use oauth2_cc_core::lifecycle::{Metric, RequestId, RequestOutcome, Snapshot};
use oauth2_cc_core::request::RequestFacts;
use oauth2_cc_core::request::{Delivered, Next, RequestPath, Step};

/// What a request-headers or body hook tells Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    /// Hold the request (headers, body and trailers) until the filter continues or answers it.
    Stop,
}

/// This worker's copy of one configuration's token copies, valid while its epoch is current.
struct Copies {
    plugin: u64,
    epoch: u64,
    snapshots: Vec<Option<Snapshot>>,
}

/// This worker's copies of exchanged tokens (token-exchange profiles), valid while the epoch is
/// current; each copy is used until its own `use_until_ms`, checked against the process clock.
struct ExchangedCopies {
    plugin: u64,
    epoch: u64,
    copies: SubjectCopies,
}

thread_local! {
    static COPIES: RefCell<Copies> = const { RefCell::new(Copies { plugin: 0, epoch: 0, snapshots: Vec::new() }) };
    static EXCHANGED: RefCell<ExchangedCopies> =
        RefCell::new(ExchangedCopies { plugin: 0, epoch: 0, copies: SubjectCopies::default() });
}

/// Request ids for the driver, unique in the process.
static REQUEST_IDS: AtomicU64 = AtomicU64::new(1);

pub struct StreamFilter {
    plugin: Arc<Plugin>,
    path: RequestPath,
    parked: Option<(RequestId, Arc<Parked>)>,
}

impl StreamFilter {
    pub fn new(plugin: Arc<Plugin>) -> StreamFilter {
        StreamFilter { plugin, path: RequestPath::new(), parked: None }
    }

    pub fn on_request_headers(&mut self, stream: Stream) -> Verdict {
        // Borrowed, not cloned: an `Arc` clone is an atomic on a cache line every worker shares.
        let plugin = &*self.plugin;
        let config = &*plugin.config;
        let mut facts = StreamFacts { stream: &stream, authority: None, path: None, method: None };
        let first = self.path.on_request_headers(config, &mut facts);
        let next = match first.step {
            Step::LookUpSubjectCopy { profile, subject } => return self.subject_request(stream, profile, subject),
            Step::LookUpCopy { profile } => match Self::write_copy(plugin, &mut self.path, stream, profile) {
                Some(next) => next,
                None => self.path.on_copy(config, None),
            },
            step => Next { step, count: first.count },
        };
        match next.step {
            Step::AskDriver { profile } => self.ask_driver(stream, profile, None),
            step => self.finish(stream, step, next.count),
        }
    }

    /// A token-exchange profile: this worker's copy of the token exchanged for the request's
    /// subject (one SHA-256, already taken, and one clock read), or the driver.
    fn subject_request(&mut self, stream: Stream, profile: usize, subject: Subject) -> Verdict {
        let plugin = Arc::clone(&self.plugin);
        let config = &*plugin.config;
        let hit = Self::write_subject_copy(&plugin, &mut self.path, stream, profile, &subject);
        let next = match hit {
            Some(next) => next,
            None => self.path.on_subject_copy(config, &subject, None),
        };
        match next.step {
            Step::AskDriver { profile } => self.ask_driver(stream, profile, Some(&subject)),
            step => self.finish(stream, step, next.count),
        }
    }

    fn write_subject_copy(
        plugin: &Plugin,
        path: &mut RequestPath,
        stream: Stream,
        profile: usize,
        subject: &Subject,
    ) -> Option<Next<'static>> {
        let epoch = plugin.epoch();
        EXCHANGED.with(|cell| {
            let mut exchanged = cell.try_borrow_mut().ok()?;
            if exchanged.plugin != plugin.id || exchanged.epoch != epoch {
                exchanged.copies.clear();
                exchanged.plugin = plugin.id;
                exchanged.epoch = epoch;
            }
            let copy = exchanged.copies.get(profile, subject.bytes(), Some(crate::env::now_ms()))?;
            let next = path.on_subject_copy(&plugin.config, subject, Some(copy));
            match next.step {
                Step::WriteHeader { name, value } => {
                    let written = stream.set_request_header(name, value.as_bytes());
                    Some(path.on_header_written(&plugin.config, written))
                }
                _ => None,
            }
        })
    }

    /// Keeps the driver's copy of an exchanged token in this worker's copies.
    fn keep_subject_copy(plugin: &Plugin, profile: usize, subject: &Subject, copy: SubjectCopy) {
        let Some(bounds) = bounds(&plugin.config, profile) else { return };
        let epoch = plugin.epoch();
        EXCHANGED.with(|cell| {
            let Ok(mut exchanged) = cell.try_borrow_mut() else { return };
            if exchanged.plugin != plugin.id || exchanged.epoch != epoch {
                exchanged.copies.clear();
                exchanged.plugin = plugin.id;
                exchanged.epoch = epoch;
            }
            exchanged.copies.insert(profile, subject.bytes(), copy, bounds);
        });
    }

    /// The hit path: this worker's copy of the token, refreshed under the driver's lock only when
    /// the epoch moved. `None`: the copies are busy (a re-entered hook), so the driver decides.
    fn write_copy(plugin: &Plugin, path: &mut RequestPath, stream: Stream, profile: usize) -> Option<Next<'static>> {
        let epoch = plugin.epoch();
        COPIES.with(|cell| {
            let mut copies = cell.try_borrow_mut().ok()?;
            if copies.plugin != plugin.id || copies.epoch != epoch {
                let snapshots = plugin.with_driver(|driver| {
                    (0..plugin.config.profiles.len()).map(|i| driver.cached(i).cloned()).collect()
                });
                *copies = Copies { plugin: plugin.id, epoch, snapshots };
            }
            let copy = copies.snapshots.get(profile).and_then(Option::as_ref);
            let next = path.on_copy(&plugin.config, copy);
            Some(match next.step {
                Step::WriteHeader { name, value } => {
                    let written = stream.set_request_header(name, value.as_bytes());
                    path.on_header_written(&plugin.config, written)
                }
                Step::AskDriver { profile } => Next { step: Step::AskDriver { profile }, count: next.count },
                _ => Next { step: Step::Nothing, count: None },
            })
        })
    }

    /// No copy: the driver decides under its lock; a request told to wait is parked there.
    fn ask_driver(&mut self, stream: Stream, profile: usize, subject: Option<&Subject>) -> Verdict {
        let plugin = Arc::clone(&self.plugin);
        let config = &*plugin.config;
        let request = REQUEST_IDS.fetch_add(1, Ordering::Relaxed);
        // The mailbox is made first and listed before the driver's lock is released: the main
        // thread may resume a waiting request at once, before this thread could list it later.
        let mailbox = stream.scheduler().map(|scheduler| Arc::new(Parked::new(scheduler)));
        let (outcome, copy) = plugin.run_with(Thread::Worker(Some(stream)), |driver, now| {
            let env = &mut crate::env::ProcessEnv;
            let (outcome, actions) = match subject {
                Some(subject) => driver.on_subject_request(profile, request, subject, now, env),
                None => driver.on_request(profile, request, now, env),
            };
            if let (RequestOutcome::Wait, Some(mailbox)) = (&outcome, &mailbox) {
                plugin.park(request, Arc::clone(mailbox));
            }
            let copy = match (&outcome, subject) {
                (RequestOutcome::Inject { .. }, Some(subject)) => {
                    driver.cached_subject(profile, subject.bytes()).cloned()
                }
                _ => None,
            };
            ((outcome, copy), actions)
        });
        if let (Some(copy), Some(subject)) = (copy, subject) {
            Self::keep_subject_copy(&plugin, profile, subject, copy);
        }
        let mut next = self.path.on_outcome(config, &outcome);
        if let Step::WriteHeader { name, value } = next.step {
            let written = stream.set_request_header(name, value.as_bytes());
            next = self.path.on_header_written(config, written);
        }
        if next.step == Step::Pause {
            match mailbox {
                Some(mailbox) => self.parked = Some((request, mailbox)),
                None => {
                    plugin.run(Thread::Worker(Some(stream)), |driver, _| {
                        driver.on_request_gone(request);
                        Vec::new()
                    });
                    next = self.path.on_cannot_pause(config);
                }
            }
        }
        self.finish(stream, next.step, next.count)
    }

    /// Carries out a final step of the request hook and counts what the path says.
    fn finish(&self, stream: Stream, step: Step<'_>, count: Option<(usize, Metric)>) -> Verdict {
        if let Some((profile, metric)) = count {
            self.plugin.metrics.count_on_worker(profile, &metric, Some(stream));
        }
        match step {
            Step::Reply { reply, error } => {
                if let Some(error) = error {
                    abi::log_line(Level::Error, format_args!("{error}"));
                }
                stream.send_response(
                    reply.status,
                    &[("content-type", "application/json")],
                    reply.body.as_bytes(),
                    reply.details,
                );
                Verdict::Stop
            }
            Step::Pause => Verdict::Stop,
            Step::Resume => {
                stream.continue_decoding();
                Verdict::Continue
            }
            _ => Verdict::Continue,
        }
    }

    /// The main thread delivered this paused request's outcome (on its worker).
    pub fn on_delivered(&mut self, stream: Stream) {
        let Some((request, parked)) = self.parked.take() else { return };
        let Some(outcome) = parked.take() else {
            // A wake without an outcome is none: the request stays paused and listed.
            self.parked = Some((request, parked));
            return;
        };
        parked.close();
        let plugin = Arc::clone(&self.plugin);
        let config = &*plugin.config;
        // One configuration per plugin here: a paused request keeps its profile index.
        let profile = self.path.profile().unwrap_or(0);
        let delivered = match &outcome {
            Outcome::Resume { header, value, generation } => {
                Delivered::Token { profile, header, value, generation: *generation }
            }
            Outcome::Fail => Delivered::Fail { profile },
            Outcome::Refuse(refusal) => Delivered::Refused { profile, refusal: *refusal },
        };
        let mut next = self.path.on_delivered(config, Some(delivered));
        if let Step::WriteHeader { name, value } = next.step {
            let written = stream.set_request_header(name, value.as_bytes());
            next = self.path.on_header_written(config, written);
        }
        let _ = self.finish(stream, next.step, next.count);
    }

    /// Whether the request is still paused (its body and trailers must be held too).
    pub fn waiting(&self) -> bool {
        self.path.waiting()
    }

    /// The upstream's answer: `:status` is read only when the profile purges on some status, and
    /// only a status in its list takes the driver's lock.
    pub fn on_response_headers(&mut self, stream: Stream) {
        let config = &*self.plugin.config;
        if !self.path.wants_status(config) {
            return;
        }
        let status = stream.header(RESPONSE_HEADER, ":status");
        if let Step::ReportStatus { profile, generation } = self.path.on_response_status(config, status) {
            let subject = self.path.subject_key();
            self.plugin.run(Thread::Worker(Some(stream)), |driver, now| {
                let env = &mut crate::env::ProcessEnv;
                match subject {
                    Some(key) => driver.on_subject_status(profile, &key, generation, status, now, env),
                    None => driver.on_response_status(profile, generation, status, now, env),
                }
            });
        }
    }

    /// The stream is ending: a request still paused is forgotten by the driver.
    pub fn on_complete(&mut self) {
        let paused = self.path.on_gone();
        if let Some((request, parked)) = self.parked.take() {
            debug_assert!(paused, "a parked request the path did not pause");
            parked.close();
            self.plugin.unpark(request);
        }
    }
}

impl Drop for StreamFilter {
    fn drop(&mut self) {
        self.on_complete();
    }
}

/// Request facts read from Envoy on first use; bytes that are not UTF-8 count as absent.
struct StreamFacts<'a> {
    stream: &'a Stream,
    authority: Option<Option<&'a str>>,
    path: Option<Option<&'a str>>,
    method: Option<Option<&'a str>>,
}

impl<'a> StreamFacts<'a> {
    fn request_header(stream: &'a Stream, name: &str) -> Option<&'a str> {
        stream.header(abi::REQUEST_HEADER, name).and_then(|b| std::str::from_utf8(b).ok())
    }
}

impl RequestFacts for StreamFacts<'_> {
    fn authority(&mut self) -> Option<&str> {
        let stream = self.stream;
        *self.authority.get_or_insert_with(|| Self::request_header(stream, ":authority"))
    }
    fn path(&mut self) -> Option<&str> {
        let stream = self.stream;
        *self.path.get_or_insert_with(|| Self::request_header(stream, ":path"))
    }
    fn method(&mut self) -> Option<&str> {
        let stream = self.stream;
        *self.method.get_or_insert_with(|| Self::request_header(stream, ":method"))
    }
    fn header(&mut self, lower_case_name: &str) -> Option<Vec<u8>> {
        self.stream.header(abi::REQUEST_HEADER, lower_case_name).map(<[u8]>::to_vec)
    }
    fn has_header(&mut self, lower_case_name: &str) -> bool {
        self.stream.header(abi::REQUEST_HEADER, lower_case_name).is_some()
    }
    fn route_name(&mut self) -> Option<String> {
        self.stream.route_name().and_then(|b| std::str::from_utf8(b).ok()).map(str::to_string)
    }
    fn metadata_profile(&mut self) -> Option<String> {
        // A name that is not UTF-8 names no configured profile: it fails closed as unknown.
        self.stream.route_metadata_string("oauth2_cc", "profile").map(|b| String::from_utf8_lossy(b).into_owned())
    }
    fn metadata_disabled(&mut self) -> bool {
        self.stream.route_metadata_bool("oauth2_cc", "disabled").unwrap_or(false)
    }
    fn dynamic_metadata_string(&mut self, namespace: &str, key: &str) -> Option<Vec<u8>> {
        self.stream.dynamic_metadata_string(namespace, key).map(<[u8]>::to_vec)
    }
    fn dynamic_metadata_has_key(&mut self, namespace: &str, key: &str) -> bool {
        self.stream.dynamic_metadata_has_key(namespace, key)
    }
}
