//! The SM limiter's controller, pure arithmetic with no I/O: the refill
//! rate of a container's token bucket on one card.
//!
//! The rate is open-loop: `rate = cap × C`, where `C` is the card's
//! capacity in cost units (blocks × threads) per second, the launch rate
//! that keeps it fully busy. Each tenant of the card publishes its own
//! launched-cost rate (exact and immediate, from its spend counters), so
//! the card's total launch rate `R` is known without delay; NVML's
//! device-wide utilisation `U` says how busy that kept the card, about a
//! second late. `C` is a slow estimate of `R / U`, and NVML's lag touches
//! only that slowly varying constant, never the fast loop. Nothing in a
//! tenant's rate depends on another tenant's share, so tenants do not chase
//! each other.
//!
//! The estimate is updated only when it can be right:
//! - `U` is meaningful (above [`Tuning::min_busy`]; a nearly idle card says
//!   little about its capacity), averaged over [`Tuning::window`] intervals
//!   against NVML's noise and integer percents;
//! - `R` was known (every active tenant publishes its rate) and steady
//!   (block means within [`Tuning::steady_ratio`]) for a whole
//!   [`Tuning::span`] — NVML's sampling period plus its lag — so the lagged
//!   `U` describes the same load as `R`'s mean over the last window;
//! - after an update the history starts over, so the next one waits for a
//!   whole span of the load that update caused. This is what keeps the
//!   lag out of the loop: each update sees the consequence of the last, and
//!   the estimate moves in steps (about every two seconds while it is off)
//!   rather than chasing a reading that describes an older rate.
//!
//! Each update moves `ln C` by [`Tuning::gain`] of its error, the error
//! clamped to a factor of [`Tuning::max_step`]. `C` is kept between a tenth
//! of the fastest total seen (no starvation, whatever NVML says) and that
//! total over `min_busy`. The first estimate is taken after
//! [`Tuning::seed_after`] intervals of known load (the cap cannot
//! apply before: the container runs unlimited for about half a second),
//! taking the card as fully busy: NVML's reading may still describe the
//! card before these launches, and under unlimited compute-bound work the
//! card is full. A lighter load gives a low first estimate (limiting
//! harder than the cap), raised by the next updates once `U` counts.

use std::collections::VecDeque;

/// Tunables. The defaults are what the interceptor runs with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tuning {
    /// Control intervals averaged for the numerator `R`.
    pub window: usize,
    /// Intervals of steady load an update needs (at least `window`):
    /// NVML's sampling period plus its lag, so that `U` describes the
    /// same load as `R`.
    pub span: usize,
    /// Fraction of the log error of `C` corrected per update.
    pub gain: f64,
    /// `U` at or below this is not used.
    pub min_busy: f64,
    /// Largest ratio between the mean `R` of the last window and that of
    /// the rest of the span that counts as steady.
    pub steady_ratio: f64,
    /// The error of one update is clamped to this factor either way.
    pub max_step: f64,
    /// `C` never drops below this fraction of the fastest total seen.
    pub floor_fraction: f64,
    /// Intervals of steady, known load before the first estimate.
    pub seed_after: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            window: 10,
            span: 30,
            gain: 0.8,
            min_busy: 0.1,
            steady_ratio: 1.1,
            max_step: 4.0,
            floor_fraction: 0.1,
            seed_after: 6,
        }
    }
}

/// One control interval's observation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// Launched cost per second of every active tenant of the card, this
    /// container's included; `None` when some active tenant does not
    /// publish its rate (the card's load is not known).
    pub total_rate: Option<f64>,
    /// NVML's device-wide busy fraction, 0.0–1.0, if read.
    pub busy: Option<f64>,
}

/// Controller state for one (container, card).
#[derive(Debug, Clone, PartialEq)]
pub struct Controller {
    tuning: Tuning,
    /// Target share, 0.0–1.0.
    target: f64,
    /// Estimated capacity, cost units per second.
    capacity: Option<f64>,
    /// The last `span` totals since the last update (`None`: unknown).
    history: VecDeque<Option<f64>>,
    /// The last `window` meaningful busy readings.
    busy_history: VecDeque<f64>,
    /// Fastest total seen.
    peak_total: f64,
}

impl Controller {
    /// A controller aiming at `target_percent` of the card.
    pub fn new(target_percent: u8, tuning: Tuning) -> Controller {
        Controller {
            tuning,
            target: f64::from(target_percent.clamp(1, 100)) / 100.0,
            capacity: None,
            history: VecDeque::with_capacity(tuning.span.max(tuning.window).max(1)),
            busy_history: VecDeque::with_capacity(tuning.window.max(1)),
            peak_total: 0.0,
        }
    }

    /// The target share, 0.0–1.0.
    pub fn target(&self) -> f64 {
        self.target
    }

    /// The card's estimated capacity (cost units per second), once known.
    pub fn capacity(&self) -> Option<f64> {
        self.capacity
    }

    /// The refill rate (cost units per second): `target × capacity`, once
    /// the capacity is known.
    pub fn rate(&self) -> Option<f64> {
        self.capacity.map(|c| (c * self.target).max(1.0))
    }

    /// The lowest capacity it will ever assume once it has seen launches.
    pub fn floor(&self) -> f64 {
        (self.peak_total * self.tuning.floor_fraction).max(1.0)
    }

    /// Feeds one interval's observation (every interval, limited or not);
    /// returns the refill rate for the next one, once known.
    pub fn observe(&mut self, obs: Observation) -> Option<f64> {
        let t = self.tuning;
        let window = t.window.max(1);
        let span = t.span.max(window);
        let total = obs.total_rate.filter(|r| r.is_finite() && *r >= 0.0);
        if self.history.len() >= span {
            self.history.pop_front();
        }
        self.history.push_back(total);
        if let Some(r) = total {
            self.peak_total = self.peak_total.max(r);
        }
        // NVML's readings, averaged over the window against its noise and
        // its integer percents.
        match obs.busy.filter(|u| u.is_finite() && *u > t.min_busy) {
            Some(u) => {
                if self.busy_history.len() >= window {
                    self.busy_history.pop_front();
                }
                self.busy_history.push_back(u.min(1.0));
            }
            None => self.busy_history.clear(),
        }
        let busy = (self.busy_history.len() == window)
            .then(|| self.busy_history.iter().sum::<f64>() / window as f64);
        let updated = match self.capacity {
            // The first estimate: the card taken as fully busy (NVML's
            // reading may still describe the time before these launches).
            None => self
                .seed()
                .map(|loaded| self.capacity = Some(loaded))
                .is_some(),
            Some(capacity) => match (busy, self.steady_mean(span, window)) {
                (Some(busy), Some(loaded)) => {
                    let error = (loaded / busy / capacity)
                        .ln()
                        .clamp(-t.max_step.ln(), t.max_step.ln());
                    self.capacity = Some(capacity * (t.gain * error).exp());
                    true
                }
                _ => false,
            },
        };
        if updated {
            // The next update waits for a whole span of the new load.
            self.history.clear();
        }
        let ceiling = (self.peak_total / t.min_busy).max(1.0);
        let floor = self.floor().min(ceiling);
        if let Some(c) = self.capacity.as_mut() {
            *c = c.clamp(floor, ceiling);
        }
        self.rate()
    }

    /// The latest total once the last `seed_after` are known and positive
    /// (each is already smoothed over a few intervals by its publisher).
    fn seed(&self) -> Option<f64> {
        let need = self.tuning.seed_after.max(1);
        if self.history.len() < need {
            return None;
        }
        let recent = self.history.iter().skip(self.history.len() - need);
        let known: Vec<f64> = recent.copied().collect::<Option<_>>()?;
        known.iter().all(|r| *r > 0.0).then(|| known[need - 1])
    }

    /// The mean total over the last `window` intervals, if the last `span`
    /// are known and positive and the load was steady: the mean of the
    /// last window within [`Tuning::steady_ratio`] of the mean of the
    /// intervals before it (block means, so a noisy but stationary load
    /// counts as steady, a step or a trend does not).
    fn steady_mean(&self, span: usize, window: usize) -> Option<f64> {
        if self.history.len() < span {
            return None;
        }
        let known: Vec<f64> = self
            .history
            .iter()
            .skip(self.history.len() - span)
            .copied()
            .collect::<Option<_>>()?;
        if known.iter().any(|r| *r <= 0.0) {
            return None;
        }
        let mean = |rs: &[f64]| rs.iter().sum::<f64>() / rs.len() as f64;
        let last = mean(&known[span - window..]);
        if span > window {
            let before = mean(&known[..span - window]);
            if last.max(before) / last.min(before) > self.tuning.steady_ratio {
                return None;
            }
        }
        Some(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// How the card divides itself when the tenants offer more than it can
    /// run.
    #[derive(Debug, Clone, Copy)]
    enum Slicing {
        /// In proportion to the launch rates.
        Proportional,
        /// Each tenant gets what it offers up to an even split; what one
        /// leaves goes to the others (how time slices behave when a
        /// tenant's queue drains).
        MaxMin,
    }

    /// A simulated card: capacity `capacity` cost units/s, tenants offering
    /// launch rates, NVML's busy reading averaged over `nvml_window`
    /// intervals and `lag` intervals late, plus multiplicative noise.
    struct Card {
        capacity: f64,
        slicing: Slicing,
        lag: usize,
        nvml_window: usize,
        busy_history: Vec<f64>,
    }

    impl Card {
        fn new(capacity: f64, slicing: Slicing, lag: usize) -> Card {
            Card {
                capacity,
                slicing,
                lag,
                nvml_window: 10,
                // The card was idle before.
                busy_history: vec![0.0; 40],
            }
        }

        /// Runs one interval with the tenants offering `offered`; returns
        /// what each got (cost units/s).
        fn run(&mut self, offered: &[f64]) -> Vec<f64> {
            let sum: f64 = offered.iter().sum();
            let served = if sum <= self.capacity {
                offered.to_vec()
            } else {
                match self.slicing {
                    Slicing::Proportional => {
                        offered.iter().map(|o| o / sum * self.capacity).collect()
                    }
                    Slicing::MaxMin => {
                        let mut served = vec![0.0; offered.len()];
                        let mut left = self.capacity;
                        let mut open: Vec<usize> = (0..offered.len()).collect();
                        while !open.is_empty() {
                            let fair = left / open.len() as f64;
                            let (small, big): (Vec<usize>, Vec<usize>) =
                                open.iter().partition(|&&i| offered[i] <= fair);
                            if small.is_empty() {
                                for i in big {
                                    served[i] = fair;
                                }
                                break;
                            }
                            for i in small {
                                served[i] = offered[i];
                                left -= offered[i];
                            }
                            open = big;
                        }
                        served
                    }
                }
            };
            self.busy_history
                .push((served.iter().sum::<f64>() / self.capacity).min(1.0));
            served
        }

        /// NVML's reading now.
        fn busy(&self, noise: f64) -> f64 {
            let end = self.busy_history.len() - self.lag;
            let w = &self.busy_history[end - self.nvml_window..end];
            (w.iter().sum::<f64>() / w.len() as f64 * (1.0 + noise)).clamp(0.0, 1.0)
        }
    }

    /// A tenant as the updater sees it: its controller, the smoothed rate
    /// it publishes, whether its cap applies, how much it wants.
    struct Tenant {
        ctl: Controller,
        published: f64,
        capped: bool,
        demand: f64,
    }

    impl Tenant {
        fn new(cap: u8, capped: bool) -> Tenant {
            Tenant {
                ctl: Controller::new(cap, Tuning::default()),
                published: 0.0,
                capped,
                demand: f64::INFINITY,
            }
        }

        fn offer(&self) -> f64 {
            match (self.capped, self.ctl.rate()) {
                (true, Some(rate)) => rate.min(self.demand),
                _ => self.demand,
            }
        }
    }

    /// Runs `steps` intervals; returns each interval's shares of the card
    /// (served over capacity), per tenant.
    fn run(card: &mut Card, tenants: &mut [Tenant], steps: usize, noise: &[f64]) -> Vec<Vec<f64>> {
        // 100 ms intervals, 200 ms EMA of the tenant's own launches.
        let ema = 1.0 - (-0.5f64).exp();
        let mut trace = Vec::new();
        for i in 0..steps {
            let offered: Vec<f64> = tenants
                .iter()
                .map(|t| t.offer().min(card.capacity * 4.0))
                .collect();
            let served = card.run(&offered);
            for (t, s) in tenants.iter_mut().zip(&served) {
                t.published += ema * (s - t.published);
            }
            let total: f64 = tenants.iter().map(|t| t.published).sum();
            let busy = card.busy(noise.get(i).copied().unwrap_or(0.0));
            for t in tenants.iter_mut() {
                t.ctl.observe(Observation {
                    total_rate: Some(total),
                    busy: Some(busy),
                });
            }
            trace.push(served.iter().map(|s| s / card.capacity).collect());
        }
        trace
    }

    fn sign_changes(errors: &[f64], band: f64) -> usize {
        let signs: Vec<i8> = errors
            .iter()
            .filter(|e| e.abs() > band)
            .map(|e| if *e > 0.0 { 1 } else { -1 })
            .collect();
        signs.windows(2).filter(|w| w[0] != w[1]).count()
    }

    /// Shares of tenant `i` from interval `from` on.
    fn column(trace: &[Vec<f64>], i: usize, from: usize) -> Vec<f64> {
        trace[from..].iter().map(|s| s[i]).collect()
    }

    #[test]
    fn two_capped_tenants_get_their_caps_on_a_lagged_time_sliced_card() {
        for slicing in [Slicing::Proportional, Slicing::MaxMin] {
            for lag in [2, 5, 10] {
                for (a, b) in [(30u8, 70u8), (50, 50), (10, 90)] {
                    let mut card = Card::new(2.4e6, slicing, lag);
                    // Both run unlimited for a second, then their caps apply.
                    let mut tenants = [Tenant::new(a, false), Tenant::new(b, false)];
                    run(&mut card, &mut tenants, 10, &[]);
                    for t in tenants.iter_mut() {
                        t.capped = true;
                    }
                    let trace = run(&mut card, &mut tenants, 100, &[]);
                    for (i, cap) in [(0, a), (1, b)] {
                        let want = f64::from(cap) / 100.0;
                        let shares = column(&trace, i, 0);
                        assert!(
                            shares[30..].iter().all(|s| (s - want).abs() < 0.03),
                            "{slicing:?} lag {lag} {a}/{b}: tenant {i} {shares:?}"
                        );
                        let errors: Vec<f64> = shares.iter().map(|s| s - want).collect();
                        assert!(
                            sign_changes(&errors, 0.01) <= 1,
                            "{slicing:?} lag {lag} {a}/{b}: tenant {i} oscillates {shares:?}"
                        );
                    }
                    let busy: f64 = trace[99].iter().sum();
                    assert!(busy > 0.97, "card under-used: {busy}");
                }
            }
        }
    }

    #[test]
    fn a_tenant_capped_from_its_first_launch_converges() {
        // `force` alone: no unlimited run to learn from, NVML still
        // reporting the idle card at first.
        for lag in [2, 5, 10] {
            for cap in [10u8, 30, 50, 70] {
                let mut card = Card::new(1e9, Slicing::Proportional, lag);
                let mut tenants = [Tenant::new(cap, true)];
                let trace = run(&mut card, &mut tenants, 120, &[]);
                let want = f64::from(cap) / 100.0;
                let shares = column(&trace, 0, 1);
                assert!(
                    shares[60..].iter().all(|s| (s - want).abs() < 0.03),
                    "lag {lag} cap {cap}: {shares:?}"
                );
                let errors: Vec<f64> = shares.iter().map(|s| s - want).collect();
                assert!(
                    sign_changes(&errors, 0.01) <= 1,
                    "lag {lag} cap {cap}: oscillates {shares:?}"
                );
            }
        }
    }

    #[test]
    fn follows_a_change_of_workload() {
        // Kernels get 3× longer (the capacity in cost units drops to a
        // third), then 6× shorter.
        let mut card = Card::new(3e6, Slicing::MaxMin, 8);
        let mut tenants = [Tenant::new(30, false), Tenant::new(70, false)];
        run(&mut card, &mut tenants, 10, &[]);
        for t in tenants.iter_mut() {
            t.capped = true;
        }
        run(&mut card, &mut tenants, 60, &[]);
        for capacity in [1e6, 6e6] {
            card.capacity = capacity;
            let trace = run(&mut card, &mut tenants, 200, &[]);
            for (i, want) in [(0, 0.3), (1, 0.7)] {
                let shares = column(&trace, i, 0);
                assert!(
                    shares[150..].iter().all(|s| (s - want).abs() < 0.03),
                    "capacity {capacity}: tenant {i} {shares:?}"
                );
            }
        }
    }

    #[test]
    fn idle_demand_leaves_the_estimate_alone() {
        // The 30% tenant wants 5% for a long time, then everything; its
        // budget stays 30% of the card throughout (no wind-up, no burst).
        let mut card = Card::new(1e6, Slicing::MaxMin, 8);
        let mut tenants = [Tenant::new(30, false), Tenant::new(70, false)];
        run(&mut card, &mut tenants, 10, &[]);
        for t in tenants.iter_mut() {
            t.capped = true;
        }
        run(&mut card, &mut tenants, 60, &[]);
        tenants[0].demand = 0.05 * card.capacity;
        let trace = run(&mut card, &mut tenants, 200, &[]);
        assert!(column(&trace, 0, 0).iter().all(|s| (s - 0.05).abs() < 0.01));
        let rate = tenants[0].ctl.rate().unwrap();
        assert!((rate / card.capacity - 0.3).abs() < 0.03, "{rate}");
        tenants[0].demand = f64::INFINITY;
        let trace = run(&mut card, &mut tenants, 50, &[]);
        let shares = column(&trace, 0, 0);
        assert!(shares.iter().all(|s| *s <= 0.33), "burst: {shares:?}");
        assert!((shares[49] - 0.3).abs() < 0.03, "{shares:?}");
    }

    #[test]
    fn never_starves_even_when_measurements_lie() {
        // NVML says the card is full whatever is launched: each update
        // lowers the estimate, but never below a tenth of the peak.
        let mut ctl = Controller::new(30, Tuning::default());
        let peak = 1e6;
        for _ in 0..Tuning::default().seed_after {
            ctl.observe(Observation {
                total_rate: Some(peak),
                busy: Some(1.0),
            });
        }
        let mut rate = ctl.rate().unwrap();
        for _ in 0..2000 {
            rate = ctl
                .observe(Observation {
                    total_rate: Some(rate),
                    busy: Some(1.0),
                })
                .unwrap();
        }
        assert!(rate >= peak * 0.1 * 0.3 * 0.999, "starved: {rate}");
    }

    #[test]
    fn a_steady_load_seeds_the_capacity() {
        let seed_after = Tuning::default().seed_after;
        let mut ctl = Controller::new(25, Tuning::default());
        let idle = Observation {
            total_rate: Some(0.0),
            busy: Some(0.0),
        };
        assert_eq!(ctl.observe(idle), None);
        let half = Observation {
            total_rate: Some(4000.0),
            busy: Some(0.5),
        };
        for _ in 1..seed_after {
            assert_eq!(ctl.observe(half), None);
        }
        // The first estimate takes the card as full (NVML's reading may
        // still describe the card before these launches).
        assert_eq!(ctl.observe(half), Some(1000.0));
        assert_eq!(ctl.capacity(), Some(4000.0));
        // A whole span later, NVML's reading counts: half busy, so the
        // capacity is twice the launches (approached by the gain).
        let t = Tuning::default();
        for _ in 0..t.span {
            ctl.observe(half);
        }
        let want = 4000.0 * (t.gain * 2f64.ln()).exp();
        assert!(
            (ctl.capacity().unwrap() - want).abs() < 1e-6,
            "{:?}",
            ctl.capacity()
        );
    }

    #[test]
    fn unknown_or_unsteady_load_does_not_move_the_estimate() {
        let mut ctl = Controller::new(50, Tuning::default());
        for _ in 0..Tuning::default().seed_after {
            ctl.observe(Observation {
                total_rate: Some(1000.0),
                busy: Some(1.0),
            });
        }
        let seeded = ctl.capacity();
        assert_eq!(seeded, Some(1000.0));
        // A neighbour that publishes nothing: the load is unknown.
        for _ in 0..50 {
            ctl.observe(Observation {
                total_rate: None,
                busy: Some(0.5),
            });
        }
        assert_eq!(ctl.capacity(), seeded);
        // A load growing by 3% every interval (a trend: NVML's lagged
        // reading describes a smaller load than the recent mean).
        for i in 0..60 {
            ctl.observe(Observation {
                total_rate: Some(500.0 * 1.03f64.powi(i)),
                busy: Some(0.4),
            });
        }
        assert_eq!(ctl.capacity(), seeded);
    }

    proptest! {
        /// Any capacity, any pair of caps summing to at most 100, either
        /// slicing, any lag, noisy NVML readings (±5% each; readings clip at
        /// 100%, so much larger noise biases the capacity estimate high near
        /// a full card): each tenant's average share over the last half
        /// lands within 3 points of its cap and never falls to zero.
        #[test]
        fn noisy_pairs_settle_near_their_caps(
            a in 5u8..95,
            b_room in 0u8..100,
            log_capacity in 5.0f64..25.0,
            lag in 1usize..12,
            proportional in any::<bool>(),
            noise in proptest::collection::vec(-0.05f64..0.05, 160),
        ) {
            let b = (b_room % (101 - a)).max(1);
            let slicing = if proportional { Slicing::Proportional } else { Slicing::MaxMin };
            let mut card = Card::new(log_capacity.exp(), slicing, lag);
            let mut tenants = [Tenant::new(a, false), Tenant::new(b, false)];
            run(&mut card, &mut tenants, 10, &noise);
            for t in tenants.iter_mut() {
                t.capped = true;
            }
            let trace = run(&mut card, &mut tenants, 160, &noise);
            for (i, cap) in [(0, a), (1, b)] {
                let tail = column(&trace, i, 80);
                let mean = tail.iter().sum::<f64>() / tail.len() as f64;
                let want = f64::from(cap) / 100.0;
                prop_assert!((mean - want).abs() < 0.03, "tenant {} mean {} for {}", i, mean, want);
                prop_assert!(trace.iter().all(|s| s[i] > 0.0));
            }
        }
    }
}
