//! The filter's metrics, once for both hosts: their names, the closed set of failure reasons, and
//! the per-profile table of the ids a host got when it defined them.
//!
//! Names are `oauth2_cc.<profile>.<metric>` (README, "Metrics"); Envoy puts its own namespace in
//! front (`wasmcustom.` for the proxy-wasm build, `dynamicmodulescustom.` for the dynamic module).
//! Every metric of a profile is defined when the configuration loads, the `fetch_failed.<reason>`
//! counters for every reason the core can report: a dynamic module cannot define a metric later
//! (Envoy's stats are frozen once the server runs), and a dashboard sees the same names, at 0,
//! from both builds.

/// A per-profile metric to count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Metric {
    FetchOk,
    /// A failed token request by reason, one of `FETCH_FAILED_REASONS` (`TokenError::label`,
    /// `discovery`, `no_cluster`).
    FetchFailed(String),
    Injected,
    Waited,
    FailedRequest,
    Purged,
    BudgetRefused,
    /// A token-exchange profile refused a request (`Refusal::counter` names the counter).
    Refused(crate::exchange::Refusal),
}

/// Every `fetch_failed.<reason>` label: `TokenError::label` (RFC 6749 §5.2 codes kept by name,
/// the rest `other_error`) and the lifecycle's own (`discovery`, `no_cluster`).
pub(crate) const FETCH_FAILED_REASONS: &[&str] = &[
    "http_status",
    "bad_body",
    "missing_token",
    "unsafe_token",
    "bad_expires_in",
    "too_large",
    "no_response",
    "assertion_failed",
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_scope",
    "temporarily_unavailable",
    "server_error",
    "slow_down",
    "other_error",
    "discovery",
    "no_cluster",
];

/// The counters other than `fetch_failed.<reason>`, in [`MetricIds`]' order.
const COUNTERS: [&str; 6] = ["fetch_ok", "injected", "waited", "failed_requests", "purged", "budget_refused"];

/// Seconds until the cached token's usable end (0: no usable token).
const TOKEN_REMAINING: &str = "token_remaining_s";
/// Seconds the last token this process got for the profile was usable in all: from when its
/// request was sent to its usable end (0 until the first token). It outlives the token, so an
/// alert can compare `token_remaining_s` with it during an outage.
const TOKEN_LIFETIME: &str = "token_lifetime_s";

/// The ids a host got for one profile's metrics (`None`: the host refused that definition).
#[derive(Debug)]
pub struct MetricIds<Id> {
    counters: [Option<Id>; COUNTERS.len()],
    fetch_failed: Vec<Option<Id>>,
    /// `Refusal::ALL`'s counters, in order.
    refused: [Option<Id>; 4],
    token_remaining_s: Option<Id>,
    token_lifetime_s: Option<Id>,
}

impl<Id: Copy> MetricIds<Id> {
    /// Defines every metric of a client-credentials profile named `profile` through the host's
    /// `counter` and `gauge` definers, which receive the full name.
    pub fn define(
        profile: &str,
        counter: impl FnMut(&str) -> Option<Id>,
        gauge: impl FnMut(&str) -> Option<Id>,
    ) -> MetricIds<Id> {
        Self::define_with(profile, false, counter, gauge)
    }

    /// Defines every metric of `profile`: a token-exchange profile also has the counters of its
    /// refusals (`Refusal::counter`), which no other profile shows.
    pub fn define_profile(
        profile: &crate::config::Profile,
        counter: impl FnMut(&str) -> Option<Id>,
        gauge: impl FnMut(&str) -> Option<Id>,
    ) -> MetricIds<Id> {
        Self::define_with(&profile.name, profile.exchange.is_some(), counter, gauge)
    }

    fn define_with(
        profile: &str,
        exchange: bool,
        mut counter: impl FnMut(&str) -> Option<Id>,
        mut gauge: impl FnMut(&str) -> Option<Id>,
    ) -> MetricIds<Id> {
        let prefix = format!("oauth2_cc.{profile}");
        MetricIds {
            counters: COUNTERS.map(|name| counter(&format!("{prefix}.{name}"))),
            fetch_failed: FETCH_FAILED_REASONS
                .iter()
                .map(|reason| counter(&format!("{prefix}.fetch_failed.{reason}")))
                .collect(),
            refused: crate::exchange::Refusal::ALL
                .map(|r| if exchange { counter(&format!("{prefix}.{}", r.counter())) } else { None }),
            token_remaining_s: gauge(&format!("{prefix}.{TOKEN_REMAINING}")),
            token_lifetime_s: gauge(&format!("{prefix}.{TOKEN_LIFETIME}")),
        }
    }

    /// The counter `metric` goes to. A reason outside the closed set (a core bug, see the unit
    /// test) is counted as `other_error` rather than lost.
    pub fn counter(&self, metric: &Metric) -> Option<Id> {
        let slot = match metric {
            Metric::FetchOk => 0,
            Metric::Injected => 1,
            Metric::Waited => 2,
            Metric::FailedRequest => 3,
            Metric::Purged => 4,
            Metric::BudgetRefused => 5,
            Metric::Refused(refusal) => {
                let index = crate::exchange::Refusal::ALL.iter().position(|r| r == refusal);
                return index.and_then(|i| self.refused.get(i).copied().flatten());
            }
            Metric::FetchFailed(reason) => {
                let index = reason_index(reason).or_else(|| reason_index("other_error"));
                return index.and_then(|i| self.fetch_failed.get(i).copied().flatten());
            }
        };
        self.counters.get(slot).copied().flatten()
    }

    pub fn token_remaining_s(&self) -> Option<Id> {
        self.token_remaining_s
    }

    pub fn token_lifetime_s(&self) -> Option<Id> {
        self.token_lifetime_s
    }
}

fn reason_index(reason: &str) -> Option<usize> {
    FETCH_FAILED_REASONS.iter().position(|known| *known == reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assertion::AssertionError;
    use crate::token_response::TokenError;

    fn defined(profile: &str) -> (MetricIds<usize>, Vec<String>) {
        let mut names = Vec::new();
        let next = |name: &str, names: &mut Vec<String>| {
            names.push(name.to_string());
            Some(names.len() - 1)
        };
        let mut counters = Vec::new();
        let ids = MetricIds::define(profile, |n| next(n, &mut counters), |n| Some(1000 + n.len()));
        names.extend(counters);
        (ids, names)
    }

    #[test]
    fn every_metric_has_its_own_counter_with_the_documented_name() {
        let (ids, names) = defined("billing");
        let expect = |metric: Metric, name: &str| {
            let id = ids.counter(&metric).unwrap_or(usize::MAX);
            assert_eq!(names.get(id).map(String::as_str), Some(name), "{metric:?}");
        };
        expect(Metric::FetchOk, "oauth2_cc.billing.fetch_ok");
        expect(Metric::Injected, "oauth2_cc.billing.injected");
        expect(Metric::Waited, "oauth2_cc.billing.waited");
        expect(Metric::FailedRequest, "oauth2_cc.billing.failed_requests");
        expect(Metric::Purged, "oauth2_cc.billing.purged");
        expect(Metric::BudgetRefused, "oauth2_cc.billing.budget_refused");
        for reason in FETCH_FAILED_REASONS {
            expect(Metric::FetchFailed(reason.to_string()), &format!("oauth2_cc.billing.fetch_failed.{reason}"));
        }
        assert_eq!(names.len(), 6 + FETCH_FAILED_REASONS.len(), "{names:?}");
        assert_eq!(ids.counter(&Metric::Refused(crate::exchange::Refusal::SubjectMissing)), None);
        assert!(ids.token_remaining_s().is_some());
    }

    #[test]
    fn an_exchange_profile_also_counts_its_refusals() {
        let json = r#"{"profiles": {"tools": {"cluster": "idp", "token_url": "http://idp/t", "client_id": "c",
            "client_secret": "s", "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange", "token_exchange": {}}}}"#;
        let config = crate::config::parse(json.as_bytes(), &|_| None).expect("valid");
        let mut names = Vec::new();
        let ids = MetricIds::define_profile(
            &config.profiles[0],
            |name| {
                names.push(name.to_string());
                Some(names.len() - 1)
            },
            |_| None,
        );
        for refusal in crate::exchange::Refusal::ALL {
            let id = ids.counter(&Metric::Refused(refusal)).unwrap_or(usize::MAX);
            assert_eq!(
                names.get(id).map(String::as_str),
                Some(format!("oauth2_cc.tools.{}", refusal.counter()).as_str())
            );
        }
        assert_eq!(names.len(), 6 + FETCH_FAILED_REASONS.len() + 4, "{names:?}");
    }

    #[test]
    fn both_gauges_have_their_documented_names() {
        let mut gauges = Vec::new();
        let ids = MetricIds::define(
            "billing",
            |_| Some(0),
            |name| {
                gauges.push(name.to_string());
                Some(gauges.len())
            },
        );
        assert_eq!(gauges, ["oauth2_cc.billing.token_remaining_s", "oauth2_cc.billing.token_lifetime_s"]);
        assert_eq!((ids.token_remaining_s(), ids.token_lifetime_s()), (Some(1), Some(2)));
    }

    #[test]
    fn an_unknown_reason_counts_as_other_error() {
        let (ids, _) = defined("p");
        assert_eq!(
            ids.counter(&Metric::FetchFailed("made_up".into())),
            ids.counter(&Metric::FetchFailed("other_error".into()))
        );
    }

    #[test]
    fn every_label_the_token_parser_gives_is_a_known_reason() {
        let errors = [
            TokenError::OAuth { status: 400, code: "invalid_client".into() },
            TokenError::OAuth { status: 400, code: "slow_down".into() },
            TokenError::OAuth { status: 400, code: "invented_by_the_idp".into() },
            TokenError::Status { status: 500 },
            TokenError::NotJson { status: 200 },
            TokenError::MissingToken { field: "access_token".into() },
            TokenError::UnsafeToken,
            TokenError::BadExpiresIn { field: "expires_in".into() },
            TokenError::TooLarge { limit: 1 },
            TokenError::NoResponse,
            TokenError::Unreachable { status: 503, detail: "reset".into() },
            TokenError::AssertionFailed(AssertionError::ZeroLifetime),
        ];
        for error in &errors {
            assert!(reason_index(error.label()).is_some(), "{} is not in FETCH_FAILED_REASONS", error.label());
        }
    }

    #[test]
    fn a_refused_definition_is_none_not_another_metric() {
        let ids = MetricIds::<u32>::define("p", |name| (!name.ends_with(".purged")).then_some(7), |_| None);
        assert_eq!(ids.counter(&Metric::Purged), None);
        assert_eq!(ids.counter(&Metric::FetchOk), Some(7));
        assert_eq!(ids.token_remaining_s(), None);
    }
}
