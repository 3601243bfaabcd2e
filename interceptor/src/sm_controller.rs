//! The SM limiter's controller, pure arithmetic with no I/O: from the
//! container's measured share of the card (NVML) and what it spent in the
//! last interval, the refill rate of its token bucket for the next one.
//!
//! The plant is "cost units per second in, share of the card out", with an
//! unknown and drifting gain (how long a thread of *this* workload runs) and
//! about one interval of delay (NVML averages over its sampling period).
//! The controller therefore works on the logarithm of the rate: a damped
//! proportional-integral step on `ln(target / measured)`, so an error of 2×
//! moves the rate by the same factor whatever its scale. Gains are chosen so
//! that with one interval of delay the loop's poles stay real (no ringing);
//! each step is clamped to a factor of two either way.
//!
//! Two guards keep it honest:
//! - **anti-windup**: when the container spends less than its budget
//!   (demand below the cap), the rate is held near what it actually spends
//!   (×2 headroom) instead of integrating upwards without bound, so when
//!   demand returns it is met within a step or two but cannot burst far past
//!   the cap;
//! - **no starvation**: the rate never drops below a floor of a tenth of the
//!   target share of the fastest spending seen, so a noisy or wrongly high
//!   measurement can slow a tenant but never stop it.

/// Tunables. The defaults are what the interceptor runs with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tuning {
    /// Proportional gain on the log error.
    pub kp: f64,
    /// Integral gain on the log error.
    pub ki: f64,
    /// Largest change of the log rate in one step (`ln 2`: at most ×2 or ÷2).
    pub max_log_step: f64,
    /// Measurements below this share are read as this share (avoids
    /// dividing by zero on an idle or unsampled interval).
    pub min_share: f64,
    /// The floor as a fraction of `target × fastest spending seen`.
    pub floor_fraction: f64,
    /// Headroom over actual spending that an under-using tenant keeps.
    pub idle_headroom: f64,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            kp: 0.15,
            ki: 0.25,
            max_log_step: std::f64::consts::LN_2,
            min_share: 0.01,
            floor_fraction: 0.1,
            idle_headroom: 2.0,
        }
    }
}

/// One interval's observation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// The container's measured share of the card's compute, 0.0–1.0.
    pub share: f64,
    /// Cost units the container launched per second over the interval.
    pub spent_per_sec: f64,
}

/// Controller state for one (container, card).
#[derive(Debug, Clone, PartialEq)]
pub struct Controller {
    tuning: Tuning,
    /// Target share, 0.0–1.0.
    target: f64,
    /// Integral term: log of the rate before the proportional part.
    integral: Option<f64>,
    /// Fastest spending seen (cost units per second).
    peak_spent: f64,
    /// The rate last returned.
    rate: f64,
}

impl Controller {
    /// A controller aiming at `target_percent` of the card.
    pub fn new(target_percent: u8, tuning: Tuning) -> Controller {
        Controller {
            tuning,
            target: f64::from(target_percent.clamp(1, 100)) / 100.0,
            integral: None,
            peak_spent: 0.0,
            rate: 0.0,
        }
    }

    /// The target share, 0.0–1.0.
    pub fn target(&self) -> f64 {
        self.target
    }

    /// The rate last returned (0 before the first observation).
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Forgets the integral (the next observation re-seeds it), e.g. when
    /// limiting resumes after the tenant ran alone; the peak is kept.
    pub fn reset(&mut self) {
        self.integral = None;
    }

    /// The lowest rate it will ever return once it has seen spending.
    pub fn floor(&self) -> f64 {
        (self.peak_spent * self.target * self.tuning.floor_fraction).max(1.0)
    }

    /// Feeds one interval's observation; returns the refill rate (cost units
    /// per second) for the next interval.
    pub fn observe(&mut self, obs: Observation) -> f64 {
        let t = self.tuning;
        let spent = obs.spent_per_sec.max(0.0);
        self.peak_spent = self.peak_spent.max(spent);
        let share = obs.share.clamp(t.min_share, 1.0);
        let floor = self.floor();
        let log_rate = match self.integral {
            None => {
                // First look: estimate the gain as spent / share and aim the
                // rate straight at the target.
                let seeded = if spent > 0.0 {
                    spent * self.target / share
                } else {
                    floor
                };
                let seeded = seeded.max(floor).ln();
                self.integral = Some(seeded);
                seeded
            }
            Some(integral) => {
                let error = (self.target / share)
                    .ln()
                    .clamp(-t.max_log_step, t.max_log_step);
                let mut next = integral + t.ki * error;
                // Anti-windup: a tenant spending under its budget keeps
                // headroom over what it spends, no more.
                let ceiling = (spent.max(floor) * t.idle_headroom).ln();
                if error > 0.0 {
                    next = next.min(ceiling);
                }
                next = next.max(floor.ln());
                self.integral = Some(next);
                (next + t.kp * error).max(floor.ln())
            }
        };
        self.rate = log_rate.exp();
        self.rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A simulated tenant: a share of the card proportional to the rate
    /// (gain `gain` share per unit/s), bounded by its demand, measured one
    /// interval late with multiplicative noise from `noise`.
    struct Plant {
        gain: f64,
        demand: f64,
        pending: f64,
    }

    impl Plant {
        /// Runs one interval at `rate`; returns the observation of the
        /// previous interval (the delay) and what was spent.
        fn step(&mut self, rate: f64, noise: f64) -> Observation {
            let share_now = (self.gain * rate).min(self.demand).min(1.0);
            let spent = share_now / self.gain;
            let measured = (self.pending * (1.0 + noise)).clamp(0.0, 1.0);
            self.pending = share_now;
            Observation {
                share: measured,
                spent_per_sec: spent,
            }
        }
    }

    /// Runs `steps` intervals; returns the true shares.
    fn run(ctl: &mut Controller, plant: &mut Plant, steps: usize, noise: &[f64]) -> Vec<f64> {
        // Before the first tick the tenant ran unlimited.
        let mut rate = plant.demand / plant.gain;
        let mut shares = Vec::new();
        for i in 0..steps {
            let obs = plant.step(rate, noise.get(i).copied().unwrap_or(0.0));
            rate = ctl.observe(obs);
            shares.push(plant.pending);
        }
        shares
    }

    fn sign_changes(errors: &[f64], band: f64) -> usize {
        let signs: Vec<i8> = errors
            .iter()
            .filter(|e| e.abs() > band)
            .map(|e| if *e > 0.0 { 1 } else { -1 })
            .collect();
        signs.windows(2).filter(|w| w[0] != w[1]).count()
    }

    #[test]
    fn converges_to_the_cap_without_oscillating() {
        for (target, gain) in [(30u8, 1e-9), (50, 3e-7), (10, 0.02), (70, 5e-5)] {
            let mut ctl = Controller::new(target, Tuning::default());
            let mut plant = Plant {
                gain,
                demand: 1.0,
                pending: 1.0,
            };
            let shares = run(&mut ctl, &mut plant, 40, &[]);
            let want = f64::from(target) / 100.0;
            let last = *shares.last().unwrap();
            assert!(
                (last - want).abs() < 0.01,
                "target {target}: settled at {last}, {shares:?}"
            );
            let errors: Vec<f64> = shares.iter().map(|s| s - want).collect();
            assert!(
                sign_changes(&errors, 0.02) <= 1,
                "target {target}: oscillates {shares:?}"
            );
            // Settles within 10 intervals to ±3 points.
            assert!(
                shares[10..].iter().all(|s| (s - want).abs() < 0.03),
                "target {target}: slow {shares:?}"
            );
        }
    }

    #[test]
    fn follows_a_change_of_workload() {
        // Kernels get 4× longer half-way (the gain quadruples).
        let mut ctl = Controller::new(30, Tuning::default());
        let mut plant = Plant {
            gain: 1e-6,
            demand: 1.0,
            pending: 1.0,
        };
        run(&mut ctl, &mut plant, 30, &[]);
        plant.gain *= 4.0;
        let mut rate = ctl.rate();
        let mut shares = Vec::new();
        for _ in 0..30 {
            rate = ctl.observe(plant.step(rate, 0.0));
            shares.push(plant.pending);
        }
        assert!((shares[29] - 0.30).abs() < 0.01, "{shares:?}");
        let errors: Vec<f64> = shares.iter().map(|s| s - 0.30).collect();
        assert!(sign_changes(&errors[1..], 0.02) <= 1, "{shares:?}");
    }

    #[test]
    fn idle_demand_does_not_wind_up() {
        // The tenant wants 5% for a long time, then everything.
        let mut ctl = Controller::new(30, Tuning::default());
        let mut plant = Plant {
            gain: 1e-6,
            demand: 1.0,
            pending: 1.0,
        };
        run(&mut ctl, &mut plant, 20, &[]);
        plant.demand = 0.05;
        let mut rate = ctl.rate();
        for _ in 0..200 {
            rate = ctl.observe(plant.step(rate, 0.0));
        }
        // The rate stayed near what is spent (×2 headroom, plus at most
        // one proportional step of kp·ln 2), not far above the cap.
        let p_step = (Tuning::default().kp * std::f64::consts::LN_2).exp();
        assert!(
            rate * plant.gain <= 0.05 * 2.0 * p_step + 1e-9,
            "wound up: {rate}"
        );
        plant.demand = 1.0;
        let mut shares = Vec::new();
        for _ in 0..20 {
            rate = ctl.observe(plant.step(rate, 0.0));
            shares.push(plant.pending);
        }
        assert!(
            shares.iter().all(|s| *s <= 0.30 * 1.35),
            "burst past the cap: {shares:?}"
        );
        assert!((shares[19] - 0.30).abs() < 0.01, "{shares:?}");
    }

    #[test]
    fn never_starves_even_when_measurements_lie() {
        // NVML reads the whole card (another tenant's load included): the
        // measurement is always 100%.
        let mut ctl = Controller::new(30, Tuning::default());
        let peak = 1e6;
        ctl.observe(Observation {
            share: 1.0,
            spent_per_sec: peak,
        });
        let mut rate = 0.0;
        for _ in 0..500 {
            rate = ctl.observe(Observation {
                share: 1.0,
                spent_per_sec: rate,
            });
        }
        assert!(rate >= peak * 0.3 * 0.1 * 0.999, "starved: {rate}");
    }

    #[test]
    fn first_observation_aims_at_the_target() {
        let mut ctl = Controller::new(25, Tuning::default());
        let rate = ctl.observe(Observation {
            share: 1.0,
            spent_per_sec: 4000.0,
        });
        assert!((rate - 1000.0).abs() < 1e-6, "{rate}");
        ctl.reset();
        let rate = ctl.observe(Observation {
            share: 0.5,
            spent_per_sec: 4000.0,
        });
        assert!((rate - 2000.0).abs() < 1e-6, "{rate}");
    }

    proptest! {
        /// Any gain, any target, noisy measurements (±10%): the tenant's
        /// average share over the last half lands within 3 points of the
        /// cap, and it never falls to zero.
        #[test]
        fn noisy_traces_settle_near_the_cap(
            target in 5u8..95,
            log_gain in -20.0f64..-2.0,
            noise in proptest::collection::vec(-0.1f64..0.1, 80),
        ) {
            let mut ctl = Controller::new(target, Tuning::default());
            let mut plant = Plant { gain: log_gain.exp(), demand: 1.0, pending: 1.0 };
            let shares = run(&mut ctl, &mut plant, 80, &noise);
            let want = f64::from(target) / 100.0;
            let tail = &shares[40..];
            let mean = tail.iter().sum::<f64>() / tail.len() as f64;
            prop_assert!((mean - want).abs() < 0.03, "mean {} for {}", mean, want);
            prop_assert!(shares.iter().all(|s| *s > 0.0));
        }
    }
}
