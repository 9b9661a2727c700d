//! One request through the filter: pick its profile, write the token from this worker's copy (the
//! hit path: no lock, no clock, no allocation but the stream object), or ask the driver, pause
//! until the main thread delivers an outcome, and report the upstream's status for the purge.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::abi::{self, Level, RESPONSE_HEADER, Stream};
use crate::parked::{Outcome, Parked};
use crate::plugin::{Plugin, Thread};
use oauth2_cc_core::lifecycle::{self, RequestId, RequestOutcome, Snapshot};
use oauth2_cc_core::route::{RequestFacts, Selection};

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

thread_local! {
    static COPIES: RefCell<Copies> = const { RefCell::new(Copies { plugin: 0, epoch: 0, snapshots: Vec::new() }) };
}

/// Request ids for the driver, unique in the process.
static REQUEST_IDS: AtomicU64 = AtomicU64::new(1);

pub struct StreamFilter {
    plugin: Arc<Plugin>,
    profile: Option<usize>,
    /// The generation of the token written on this request (for the purge on 401).
    injected: Option<u64>,
    parked: Option<(RequestId, Arc<Parked>)>,
}

impl StreamFilter {
    pub fn new(plugin: Arc<Plugin>) -> StreamFilter {
        StreamFilter { plugin, profile: None, injected: None, parked: None }
    }

    pub fn on_request_headers(&mut self, stream: Stream) -> Verdict {
        // Borrowed, not cloned: an `Arc` clone is an atomic on a cache line every worker shares.
        let config = &*self.plugin.config;
        let mut facts = StreamFacts { stream, authority: None, path: None, method: None };
        let profile_index = match config.routes.select_request(&mut facts) {
            Selection::None => return Verdict::Continue,
            Selection::Profile(index) => index,
            Selection::UnknownProfile(name) => {
                abi::log_line(
                    Level::Error,
                    format_args!("route metadata names profile {name:?}, which is not configured; failing the request"),
                );
                let reply = lifecycle::unknown_profile_reply(config);
                stream.send_response(
                    reply.status,
                    &[("content-type", "application/json")],
                    reply.body.as_bytes(),
                    reply.details,
                );
                return Verdict::Stop;
            }
        };
        let Some(profile) = config.profiles.get(profile_index) else { return Verdict::Continue };
        self.profile = Some(profile_index);
        if profile.inject.keep_existing && stream.header(abi::REQUEST_HEADER, &profile.inject.header).is_some() {
            return Verdict::Continue;
        }
        if let Some((generation, written)) = self.write_copy(stream, profile_index, &profile.inject.header) {
            if !written {
                self.fail(stream, profile_index);
                return Verdict::Stop;
            }
            self.injected = Some(generation);
            self.plugin.metrics.count_on_worker(profile_index, &lifecycle::Metric::Injected, None);
            return Verdict::Continue;
        }
        let request = REQUEST_IDS.fetch_add(1, Ordering::Relaxed);
        // The mailbox is made first and listed before the driver's lock is released: the main
        // thread may resume a waiting request at once, before this thread could list it later.
        let mailbox = stream.scheduler().map(|scheduler| Arc::new(Parked::new(scheduler)));
        let outcome = self.plugin.run_with(Thread::Worker(Some(stream)), |driver, now| {
            let (outcome, actions) = driver.on_request(profile_index, request, now, &mut crate::env::ProcessEnv);
            if let (RequestOutcome::Wait, Some(mailbox)) = (&outcome, &mailbox) {
                self.plugin.park(request, Arc::clone(mailbox));
            }
            (outcome, actions)
        });
        match outcome {
            RequestOutcome::Inject { value, generation } => {
                if stream.set_request_header(&profile.inject.header, value.as_bytes()) {
                    self.injected = Some(generation);
                    Verdict::Continue
                } else {
                    self.fail(stream, profile_index);
                    Verdict::Stop
                }
            }
            RequestOutcome::Fail => {
                self.reply_failure(stream, profile_index);
                Verdict::Stop
            }
            RequestOutcome::Wait => match mailbox {
                Some(mailbox) => {
                    self.parked = Some((request, mailbox));
                    Verdict::Stop
                }
                None => {
                    abi::log_line(Level::Error, format_args!("no scheduler for a paused request; failing it"));
                    self.plugin.run(Thread::Worker(Some(stream)), |driver, _| {
                        driver.on_request_gone(request);
                        Vec::new()
                    });
                    self.fail(stream, profile_index);
                    Verdict::Stop
                }
            },
        }
    }

    /// The hit path: writes the token from this worker's copy. `None` when there is no copy;
    /// `Some((generation, written))` otherwise.
    fn write_copy(&self, stream: Stream, profile: usize, header: &str) -> Option<(u64, bool)> {
        let epoch = self.plugin.epoch();
        COPIES.with(|cell| {
            let mut copies = cell.try_borrow_mut().ok()?;
            if copies.plugin != self.plugin.id || copies.epoch != epoch {
                let snapshots = self.plugin.with_driver(|driver| {
                    (0..self.plugin.config.profiles.len()).map(|i| driver.cached(i).cloned()).collect()
                });
                *copies = Copies { plugin: self.plugin.id, epoch, snapshots };
            }
            let snapshot = copies.snapshots.get(profile)?.as_ref()?;
            Some((snapshot.generation, stream.set_request_header(header, snapshot.header_value.as_bytes())))
        })
    }

    /// The main thread delivered this paused request's outcome (on its worker).
    pub fn on_delivered(&mut self, stream: Stream) {
        let Some((_, parked)) = self.parked.take() else { return };
        let outcome = parked.take();
        parked.close();
        let Some(profile) = self.profile else { return };
        match outcome {
            Some(Outcome::Resume { header, value, generation }) => {
                if stream.set_request_header(&header, value.as_bytes()) {
                    self.injected = Some(generation);
                    stream.continue_decoding();
                } else {
                    self.fail(stream, profile);
                }
            }
            Some(Outcome::Fail) => self.reply_failure(stream, profile),
            None => {}
        }
    }

    /// Whether the request is still paused (its body and trailers must be held too).
    pub fn waiting(&self) -> bool {
        self.parked.is_some()
    }

    pub fn on_response_headers(&mut self, stream: Stream) {
        let (Some(profile), Some(generation)) = (self.profile, self.injected) else { return };
        if self.plugin.config.profiles.get(profile).is_none_or(|p| p.purge_on_status.is_empty()) {
            return; // reading `:status` costs a call on every request
        }
        let status = stream.header(RESPONSE_HEADER, ":status");
        self.plugin.run(Thread::Worker(Some(stream)), |driver, now| {
            driver.on_response_status(profile, generation, status, now, &mut crate::env::ProcessEnv)
        });
    }

    /// The stream is ending: a request still paused is forgotten by the driver.
    pub fn on_complete(&mut self) {
        if let Some((request, parked)) = self.parked.take() {
            parked.close();
            self.plugin.unpark(request);
        }
    }

    /// The header could not be written: count and answer with the failure reply.
    fn fail(&self, stream: Stream, profile: usize) {
        self.plugin.metrics.count_on_worker(profile, &lifecycle::Metric::FailedRequest, Some(stream));
        self.reply_failure(stream, profile);
    }

    /// The failure reply (the driver counted it when it decided).
    fn reply_failure(&self, stream: Stream, profile: usize) {
        let reply = lifecycle::failure_reply(&self.plugin.config, profile);
        stream.send_response(
            reply.status,
            &[("content-type", "application/json")],
            reply.body.as_bytes(),
            reply.details,
        );
    }
}

impl Drop for StreamFilter {
    fn drop(&mut self) {
        self.on_complete();
    }
}

/// Request facts read from Envoy on first use; bytes that are not UTF-8 count as absent.
struct StreamFacts<'a> {
    stream: Stream,
    authority: Option<Option<&'a str>>,
    path: Option<Option<&'a str>>,
    method: Option<Option<&'a str>>,
}

impl<'a> StreamFacts<'a> {
    fn request_header(stream: Stream, name: &str) -> Option<&'a str> {
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
}
