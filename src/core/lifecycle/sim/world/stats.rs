//! What a simulated run did, counted per kind of event, and how runs add up.

#[derive(Debug, Default, Clone)]
pub(crate) struct Stats {
    pub(crate) steps: u64,
    pub(crate) fetches: u64,
    pub(crate) takeovers: u64,
    pub(crate) served: u64,
    pub(crate) resumed: u64,
    pub(crate) failed: u64,
    pub(crate) budget_refusals: u64,
    pub(crate) restarts: u64,
    pub(crate) lost_requests: u64,
    pub(crate) ticks: u64,
    /// Exchanges started, and tokens served to a subject (token-exchange schedules).
    pub(crate) exchanges: u64,
    pub(crate) subject_served: u64,
}

impl Stats {
    pub(crate) fn add(&mut self, other: &Stats) {
        self.steps += other.steps;
        self.fetches += other.fetches;
        self.takeovers += other.takeovers;
        self.served += other.served;
        self.resumed += other.resumed;
        self.failed += other.failed;
        self.budget_refusals += other.budget_refusals;
        self.restarts += other.restarts;
        self.lost_requests += other.lost_requests;
        self.ticks += other.ticks;
        self.exchanges += other.exchanges;
        self.subject_served += other.subject_served;
    }
}
