//! The container's SM updater: one thread, in the process that won the
//! election (see [`crate::sm_limiter`]), started on the first governed
//! launch. Every [`REFILL_PERIOD`] it refills each active card's token
//! bucket at the controller's rate; every [`CONTROL_PERIOD`] it
//!
//! 1. updates the container's own launched-cost rate on the card (cost
//!    units per second from the region's spend counter, smoothed over
//!    [`RATE_SMOOTHING`]) and publishes it, with a heartbeat and the time of
//!    the last launch, in its own region's publish block (the node agent
//!    copies it into the card's node-wide tenant table, with the priority
//!    of the container's allocation); reads the others' entries of that
//!    table, read-only (who is active, at which priority, their rates),
//!    leaving out its own (`TESSERA_TENANT_ID`);
//! 2. reads NVML: the card-wide busy fraction (`nvmlDeviceGetUtilizationRates`,
//!    or the sum of the per-process samples), and the container's own share
//!    (per-process samples of the pids in the region's slots; inside a pid
//!    namespace, where NVML reports host pids, the card-wide figure) for the
//!    node agent's metrics;
//! 3. feeds the [`Controller`] the card's total launch rate (ours plus the
//!    active others') and the busy fraction, from which it estimates the
//!    card's capacity; the refill rate is `cap × capacity`, applied when the
//!    cap applies (`force`: always; default: while another tenant is active,
//!    by the tenant table or by NVML listing a process that is not ours;
//!    `disable`: never);
//! 4. for a low-priority container, sets or clears the card's yield flag
//!    from whether a high-priority tenant launched within [`ACTIVE_WINDOW`].

use crate::card_table::CardTable;
use crate::ffi::{
    NvmlDevice, NvmlProcessInfo, NvmlProcessUtilizationSample, NvmlUtilization, NVML_SUCCESS,
};
use crate::log::{log, INFO, WARN};
use crate::nvml::NvmlLibrary;
use crate::sm_config::ComputeConfig;
use crate::sm_controller::{Controller, Observation, Tuning};
use crate::sm_limiter::monotonic_ns;
use std::ffi::{c_uint, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tessera_api::card_tenants::tenant_key;
use tessera_api::container_env::{CorePolicy, TaskPriority, TENANT_ID};
use tessera_api::shared_region::{
    CoreAccount, LaunchFigures, SharedRegion, CORE_FREE, CORE_LIMITED, MAX_DEVICES, SLOT_ACTIVE,
};

/// How often buckets are refilled.
pub const REFILL_PERIOD: Duration = Duration::from_millis(5);
/// How often utilisation is measured and the rate adjusted.
pub const CONTROL_PERIOD: Duration = Duration::from_millis(100);
/// A tenant that launched within this window is active.
pub const ACTIVE_WINDOW: Duration = Duration::from_millis(500);
/// Time constant of the launch rate each container publishes.
pub const RATE_SMOOTHING: Duration = Duration::from_millis(200);
/// The bucket holds at most this much time's worth of the rate.
const BURST: Duration = Duration::from_millis(20);

/// Starts the updater thread; `running` is cleared if it ever stops.
pub fn spawn(
    region: &'static SharedRegion,
    config: &'static ComputeConfig,
    running: &'static AtomicBool,
) {
    let spawned = std::thread::Builder::new()
        .name("tessera-sm".into())
        .spawn(move || {
            Updater::new(region, config).run();
            running.store(false, Ordering::Release);
        });
    if let Err(e) = spawned {
        log!(WARN, "cannot start the SM updater thread: {e}");
        running.store(false, Ordering::Release);
    }
}

/// The NVML calls the updater makes (the real functions, not our hooks),
/// through the process's one NVML binding.
struct Nvml(&'static NvmlLibrary);

impl Nvml {
    /// NVML loaded and initialised for the updater (NVML counts
    /// initialisations), `None` when it cannot be.
    fn load() -> Option<Nvml> {
        crate::state::nvml()
            .filter(|nvml| nvml.initialise())
            .map(Nvml)
    }

    fn handle(&self, uuid: &str) -> Option<NvmlDevice> {
        let handle_by_uuid = self.0.handle_by_uuid?;
        let text = CString::new(uuid).ok()?;
        let mut handle: NvmlDevice = std::ptr::null_mut();
        // SAFETY: NVML's lookup with a NUL-terminated UUID and an out-pointer.
        (unsafe { handle_by_uuid(text.as_ptr(), &mut handle) } == NVML_SUCCESS).then_some(handle)
    }

    /// Per-pid SM utilisation (percent, averaged over the samples) newer
    /// than `since_us`, and the newest timestamp seen. `None` when NVML has
    /// no new samples or lacks the call.
    fn process_utilisation(
        &self,
        device: NvmlDevice,
        since_us: u64,
    ) -> Option<(Vec<(u32, f64)>, u64)> {
        let process_utilization = self.0.process_utilization?;
        let mut samples = [NvmlProcessUtilizationSample::default(); 512];
        let mut count = samples.len() as c_uint;
        // SAFETY: NVML's query with a buffer of `count` samples.
        let rc = unsafe { process_utilization(device, samples.as_mut_ptr(), &mut count, since_us) };
        if rc != NVML_SUCCESS {
            return None;
        }
        let samples = &samples[..(count as usize).min(samples.len())];
        let newest = samples.iter().map(|s| s.time_stamp).max()?;
        let mut per_pid: Vec<(u32, f64, u32)> = Vec::new();
        for s in samples.iter().filter(|s| s.time_stamp > since_us) {
            match per_pid.iter_mut().find(|(pid, _, _)| *pid == s.pid) {
                Some(entry) => {
                    entry.1 += f64::from(s.sm_util);
                    entry.2 += 1;
                }
                None => per_pid.push((s.pid, f64::from(s.sm_util), 1)),
            }
        }
        let averaged = per_pid
            .into_iter()
            .map(|(pid, sum, n)| (pid, sum / f64::from(n)))
            .collect();
        Some((averaged, newest))
    }

    /// The card-wide SM utilisation in percent.
    fn card_utilisation(&self, device: NvmlDevice) -> Option<f64> {
        let utilization_rates = self.0.utilization_rates?;
        let mut u = NvmlUtilization::default();
        // SAFETY: NVML's query with a valid out-pointer.
        (unsafe { utilization_rates(device, &mut u) } == NVML_SUCCESS).then_some(f64::from(u.gpu))
    }

    /// Pids NVML lists as computing on the card.
    fn running_pids(&self, device: NvmlDevice) -> Option<Vec<u32>> {
        let running_processes = self.0.running_processes?;
        let mut list = [NvmlProcessInfo::default(); 256];
        let mut count = list.len() as c_uint;
        // SAFETY: NVML's query with a buffer of `count` entries.
        let rc = unsafe { running_processes(device, &mut count, list.as_mut_ptr()) };
        (rc == NVML_SUCCESS).then(|| {
            list[..(count as usize).min(list.len())]
                .iter()
                .map(|p| p.pid)
                .collect()
        })
    }
}

/// What the updater keeps per card.
struct CardState {
    nvml_device: Option<NvmlDevice>,
    table: Option<CardTable>,
    controller: Option<Controller>,
    limited: bool,
    last_spent: u64,
    last_launches: u64,
    /// When the container last launched on the card (0 = not yet seen).
    last_launch_ns: u64,
    /// The container's launched cost per second on the card, smoothed
    /// over [`RATE_SMOOTHING`], and when it was last updated.
    own_rate: f64,
    rate_at_ns: u64,
    samples_seen_us: u64,
}

struct Updater {
    region: &'static SharedRegion,
    config: &'static ComputeConfig,
    nvml: Option<Nvml>,
    cards: Vec<Option<CardState>>,
}

/// Which of the container's processes NVML can see: the pids in the slots.
fn container_pids(region: &SharedRegion) -> Vec<u32> {
    region
        .processes
        .iter()
        .filter(|s| s.state.load(Ordering::Acquire) == SLOT_ACTIVE)
        .map(|s| s.pid.load(Ordering::Relaxed))
        .filter(|&p| p != 0)
        .collect()
}

impl Updater {
    fn new(region: &'static SharedRegion, config: &'static ComputeConfig) -> Updater {
        let nvml = Nvml::load();
        if nvml.is_none() {
            log!(
                WARN,
                "NVML is not available: SM caps are enforced without measurement (rates stay at their first estimate)"
            );
        }
        Updater {
            region,
            config,
            nvml,
            cards: (0..MAX_DEVICES).map(|_| None).collect(),
        }
    }

    fn run(mut self) {
        let mut last_refill = monotonic_ns();
        let mut last_control = 0;
        loop {
            std::thread::sleep(REFILL_PERIOD);
            let now = monotonic_ns();
            self.region
                .core_control
                .updater_beat_ns
                .store(now, Ordering::Relaxed);
            let dt = now.saturating_sub(last_refill);
            last_refill = now;
            for (card, core) in self.region.cores.iter().enumerate() {
                if self.cards[card].is_none() {
                    continue;
                }
                let rate = core.refill_per_sec.load(Ordering::Relaxed);
                if core.mode.load(Ordering::Relaxed) == CORE_LIMITED {
                    let amount = (rate as f64 * dt as f64 / 1e9) as u64;
                    let burst = (rate as f64 * BURST.as_secs_f64()) as u64;
                    core.refill(amount, burst.max(1));
                }
            }
            if now.saturating_sub(last_control) >= CONTROL_PERIOD.as_nanos() as u64 {
                last_control = now;
                for card in 0..MAX_DEVICES {
                    self.control(card, now);
                }
            }
        }
    }

    /// One control period for `card`.
    fn control(&mut self, card: usize, now: u64) {
        let core: &CoreAccount = &self.region.cores[card];
        let launches = core.launches.load(Ordering::Relaxed);
        if self.cards[card].is_none() {
            if launches == 0 {
                return; // the container never launched on this card
            }
            // Measured from the next period on: nothing is known yet.
            self.cards[card] = Some(self.start_card(card, now));
            return;
        }
        let config = self.config;
        let pids = container_pids(self.region);
        let state = self.cards[card].as_mut().expect("just set");
        let spent = core.spent.load(Ordering::Relaxed);
        let spent_now = spent.wrapping_sub(state.last_spent);
        state.last_spent = spent;
        let dt_ns = now.saturating_sub(state.rate_at_ns);
        if dt_ns > 0 {
            state.rate_at_ns = now;
            let dt = dt_ns as f64 / 1e9;
            let weight = 1.0 - (-dt / RATE_SMOOTHING.as_secs_f64()).exp();
            state.own_rate += weight * (spent_now as f64 / dt - state.own_rate);
        }
        if launches != state.last_launches {
            state.last_launch_ns = now;
        }
        state.last_launches = launches;

        // The node-wide view: publish our figures in our own region (the
        // node agent aggregates them), read the others' from the agent's
        // table.
        self.region.publish[card].publish(LaunchFigures {
            launch_rate: state.own_rate.round().max(1.0) as u64,
            last_launch_ns: state.last_launch_ns,
            beat_ns: now,
        });
        let neighbours = state
            .table
            .as_mut()
            .and_then(|table| table.neighbours(now, ACTIVE_WINDOW.as_nanos() as u64))
            .unwrap_or_default();

        // NVML's view: how busy the card is, our share (for the node
        // agent), and whether someone else computes here.
        let mut share = None;
        let mut busy = None;
        let mut foreign_process = false;
        if let (Some(nvml), Some(device)) = (&self.nvml, state.nvml_device) {
            let listed = nvml.running_pids(device).unwrap_or_default();
            let matchable = listed.iter().any(|p| pids.contains(p));
            foreign_process = matchable && listed.iter().any(|p| !pids.contains(p));
            let card_wide = nvml.card_utilisation(device);
            let samples = nvml.process_utilisation(device, state.samples_seen_us);
            busy = card_wide.or_else(|| {
                samples
                    .as_ref()
                    .map(|(samples, _)| samples.iter().map(|(_, u)| u).sum::<f64>())
            });
            share = match samples {
                Some((samples, newest)) => {
                    state.samples_seen_us = newest;
                    if matchable || samples.iter().any(|(p, _)| pids.contains(p)) {
                        Some(
                            samples
                                .iter()
                                .filter(|(pid, _)| pids.contains(pid))
                                .map(|(_, u)| u)
                                .sum(),
                        )
                    } else {
                        card_wide
                    }
                }
                // No per-process figures from this NVML at all: the card's.
                None if nvml.0.process_utilization.is_none() => card_wide,
                None => None,
            };
        }
        if let Some(percent) = share {
            core.utilization_permille.store(
                (percent * 10.0).clamp(0.0, 1000.0) as u32,
                Ordering::Relaxed,
            );
            core.measured_at_ns.store(now, Ordering::Relaxed);
        }

        // Priority.
        let yield_now =
            config.priority == Some(TaskPriority::Low) && neighbours.high_priority_active;
        core.yield_to_priority
            .store(u32::from(yield_now), Ordering::Relaxed);

        // The cap.
        let limit = config.effective_limit(card);
        let applies = match (limit, config.policy) {
            (None, _) | (_, CorePolicy::Disable) => false,
            (Some(_), CorePolicy::Force) => true,
            (Some(_), CorePolicy::Default) => neighbours.other_active || foreign_process,
        };
        let Some(controller) = state.controller.as_mut() else {
            return;
        };
        // The capacity is estimated whether or not the cap applies now, so
        // it is known when a neighbour arrives.
        let before = controller.capacity();
        let total_rate = (!neighbours.unpublished)
            .then_some(state.own_rate + neighbours.others_launch_rate as f64);
        let rate = controller.observe(Observation {
            total_rate,
            busy: busy.map(|percent| percent / 100.0),
        });
        if controller.capacity() != before {
            log!(
                INFO,
                "card {card}: capacity estimate {:.0} cost units/s (card total {:.0}/s, NVML busy {:?}%)",
                controller.capacity().unwrap_or(0.0),
                total_rate.unwrap_or(0.0),
                busy
            );
        }
        if !applies {
            if state.limited {
                log!(INFO, "card {card}: alone, SM cap lifted");
            }
            state.limited = false;
            core.mode.store(CORE_FREE, Ordering::Relaxed);
            return;
        }
        // Until the capacity is known (the first half second of launches)
        // the container runs unlimited.
        if let Some(rate) = rate {
            Self::limit(core, rate, &mut state.limited, card);
        }
    }

    fn limit(core: &CoreAccount, rate: f64, limited: &mut bool, card: usize) {
        core.refill_per_sec
            .store(rate.max(1.0) as u64, Ordering::Relaxed);
        if !*limited {
            core.tokens
                .store((rate * BURST.as_secs_f64()) as i64, Ordering::Relaxed);
            log!(INFO, "card {card}: SM cap applies");
        }
        *limited = true;
        core.mode.store(CORE_LIMITED, Ordering::Relaxed);
    }

    fn start_card(&self, card: usize, now: u64) -> CardState {
        let core = &self.region.cores[card];
        let limit = self.config.effective_limit(card);
        core.limit_percent
            .store(limit.map_or(0, u32::from), Ordering::Relaxed);
        let uuid = crate::cards::cuda_uuid(ordinal_of(card));
        let nvml_device = match (&self.nvml, &uuid) {
            (Some(nvml), Some(uuid)) => nvml.handle(uuid),
            _ => None,
        };
        let table = match (&self.config.tenants_dir, &self.config.tenant_id, &uuid) {
            (Some(dir), Some(id), Some(uuid)) => Some(CardTable::new(dir, uuid, tenant_key(id))),
            (Some(dir), None, _) => {
                log!(
                    WARN,
                    "{TENANT_ID} is not set, so this container cannot tell its own entry in the card tenant tables under {}; other tenants are seen through NVML only",
                    dir.display()
                );
                None
            }
            _ => None,
        };
        log!(
            INFO,
            "card {card} ({}): SM cap {:?}, policy {:?}, priority {:?}",
            uuid.as_deref().unwrap_or("uuid unknown"),
            limit,
            self.config.policy,
            self.config.priority
        );
        CardState {
            nvml_device,
            table,
            controller: limit.map(|l| Controller::new(l, Tuning::default())),
            limited: false,
            last_spent: core.spent.load(Ordering::Relaxed),
            last_launches: 0,
            last_launch_ns: 0,
            own_rate: 0.0,
            rate_at_ns: now,
            samples_seen_us: 0,
        }
    }
}

/// The CUDA ordinal of container card `card` (the inverse of
/// `cards::container_index`, searched over the ordinals the driver has).
fn ordinal_of(card: usize) -> crate::ffi::CuDevice {
    (0..MAX_DEVICES as crate::ffi::CuDevice)
        .find(|&o| crate::cards::container_index(o) == Some(card))
        .unwrap_or(card as crate::ffi::CuDevice)
}
