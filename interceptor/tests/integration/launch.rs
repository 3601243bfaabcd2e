//! The launch path under the fake driver: real processes with the
//! interceptor preloaded, reaching every launch entry point (linked,
//! `dlsym`, `cuGetProcAddress`), with and without SM caps and priorities.
//! The region and tenant-table files are read back to check what the
//! limiter did. Where tenants must see each other, the node agent's part
//! (the read-only per-card tables filled from the containers' regions with
//! the priority of their allocation) runs in the test ([`TableAggregator`]).

use crate::common;

use common::{compile, value, values, with_region, Artifacts, TableAggregator, Tenant};
use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use tessera_api::card_tenants::{PRIORITY_HIGH, PRIORITY_LOW};
use tessera_api::shared_region::{CORE_FREE, CORE_LIMITED};

/// The fake driver's card 0.
const CARD0: &str = "GPU-5a5a5a5a-5a5a-5a5a-5a5a-5a5a5a5a5a00";

/// The tenant `name` (its region `<dir>/<name>.cache`) on card 0 with the
/// allocation's `priority`.
fn tenant(dir: &Path, name: &str, priority: u32) -> Tenant {
    Tenant {
        id: name.to_owned(),
        priority,
        region: dir.join(format!("{name}.cache")),
        cards: vec![CARD0.to_owned()],
    }
}

const CLIENTS: [&str; 3] = ["launch_linked", "launch_dlsym", "launch_procaddr"];

fn artifacts() -> &'static Artifacts {
    static ARTIFACTS: OnceLock<Artifacts> = OnceLock::new();
    ARTIFACTS.get_or_init(|| {
        Artifacts::prepare("tessera-launch-test", |dir| {
            for (client, mode) in CLIENTS.iter().zip(["LINKED", "DLSYM", "PROCADDR"]) {
                let link: &[&str] = if mode == "LINKED" {
                    &["-l:libcuda.so.1"]
                } else {
                    &[]
                };
                compile(
                    dir,
                    "launch_client.c",
                    &[&format!("-DMODE_{mode}")],
                    client,
                    link,
                );
            }
        })
    })
}

fn spawn(client: &str, args: &[&str], env: &[(&str, &str)]) -> Child {
    artifacts()
        .command(client, args, env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start client")
}

fn finish(child: Child) -> Output {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "client failed: {out:?}");
    out
}

fn windows(out: &Output) -> Vec<u64> {
    values(out)["windows"]
        .split(',')
        .map(|w| w.parse().unwrap())
        .collect()
}

fn pairs<'a>(vars: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    vars.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Cost of one launch in launch_client: grid 4×2×1, block 32×2×1.
const KERNEL_COST: u64 = 8 * 64;

#[test]
fn without_a_cap_every_path_forwards_and_nothing_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let region = dir.path().join("r.cache");
    for client in CLIENTS {
        let out = finish(spawn(
            client,
            &["all", "5"],
            &[("CUDA_DEVICE_MEMORY_SHARED_CACHE", region.to_str().unwrap())],
        ));
        assert_eq!(value(&out, "failed"), 0, "{client}");
        assert_eq!(
            value(&out, "launches"),
            40,
            "{client}: all 8 paths reach the driver"
        );
        assert_eq!(
            value(&out, "ptsz"),
            20,
            "{client}: _ptsz variants stay _ptsz"
        );
    }
    assert!(
        !region.exists(),
        "the ungoverned path must not open the region"
    );
}

#[test]
fn every_launch_path_is_governed_and_charged_by_size() {
    for client in CLIENTS {
        let dir = tempfile::tempdir().unwrap();
        let region = dir.path().join("r.cache");
        let out = finish(spawn(
            client,
            &["all", "5"],
            &[
                ("CUDA_DEVICE_SM_LIMIT", "30"),
                ("CUDA_DEVICE_MEMORY_SHARED_CACHE", region.to_str().unwrap()),
            ],
        ));
        assert_eq!(value(&out, "failed"), 0, "{client}");
        assert_eq!(value(&out, "launches"), 40, "{client}");
        assert_eq!(value(&out, "ptsz"), 20, "{client}");
        with_region(&region, |r| {
            let core = &r.cores[0];
            assert_eq!(core.launches.load(Ordering::Relaxed), 40, "{client}");
            // Graphs are charged as the largest kernel seen (the same here).
            assert_eq!(
                core.spent.load(Ordering::Relaxed),
                40 * KERNEL_COST,
                "{client}: cost is blocks x threads"
            );
        });
    }
}

#[test]
fn force_limits_a_tenant_alone_and_default_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let forced = dir.path().join("forced.cache");
    let alone = dir.path().join("alone.cache");
    let common = [("FAKE_NVML_SM_UTIL", "100"), ("CUDA_DEVICE_SM_LIMIT", "20")];
    let run = |region: &Path, policy: &str| {
        let mut env = common.to_vec();
        env.push(("CUDA_DEVICE_MEMORY_SHARED_CACHE", region.to_str().unwrap()));
        env.push(("GPU_CORE_UTILIZATION_POLICY", policy));
        finish(spawn("launch_dlsym", &["loop", "1.5"], &env))
    };
    let forced_out = run(&forced, "force");
    let alone_out = run(&alone, "default");
    with_region(&forced, |r| {
        let core = &r.cores[0];
        assert_eq!(core.mode.load(Ordering::Relaxed), CORE_LIMITED);
        assert_eq!(core.limit_percent.load(Ordering::Relaxed), 20);
        assert_eq!(core.utilization_permille.load(Ordering::Relaxed), 1000);
        assert!(core.refill_per_sec.load(Ordering::Relaxed) > 0);
    });
    with_region(&alone, |r| {
        assert_eq!(r.cores[0].mode.load(Ordering::Relaxed), CORE_FREE);
    });
    // The forced tenant's capacity estimate comes from its unlimited first
    // half second (the fake NVML says the card is full), and its rate is
    // 20% of that: its launch rate falls well below both its own start and
    // the pace of the tenant alone under the default policy, which the
    // limiter leaves free (CORE_FREE above: its launches never wait).
    // Whole stretches are compared, not single 100 ms windows, and either
    // unthrottled pace will do, so one stretch in which a loaded machine
    // did not run a process does not decide.
    let f = windows(&forced_out);
    let a = windows(&alone_out);
    let unthrottled = mean(&f[..3]).max(mean(&a[10..]));
    assert!(
        mean(&f[10..]) * 3 < unthrottled,
        "force did not slow launches: forced {f:?}, alone {a:?}"
    );
}

/// The mean launch count of a stretch of windows.
fn mean(windows: &[u64]) -> u64 {
    windows.iter().sum::<u64>() / windows.len() as u64
}

#[test]
fn two_tenants_under_the_default_policy_both_limit() {
    let dir = tempfile::tempdir().unwrap();
    let cards = dir.path().join("cards");
    std::fs::create_dir(&cards).unwrap();
    let _agent = TableAggregator::start(
        &cards,
        &[CARD0],
        vec![
            tenant(dir.path(), "a", PRIORITY_LOW),
            tenant(dir.path(), "b", PRIORITY_LOW),
        ],
    );
    let start = |name: &str| {
        let region = dir.path().join(format!("{name}.cache"));
        spawn(
            "launch_dlsym",
            &["loop", "1.5"],
            &[
                ("FAKE_NVML_SM_UTIL", "50"),
                ("CUDA_DEVICE_SM_LIMIT", "30"),
                ("CUDA_DEVICE_MEMORY_SHARED_CACHE", region.to_str().unwrap()),
                ("TESSERA_CARD_TENANTS_DIR", cards.to_str().unwrap()),
                ("TESSERA_TENANT_ID", name),
            ],
        )
    };
    let (a, b) = (start("a"), start("b"));
    finish(a);
    finish(b);
    for name in ["a.cache", "b.cache"] {
        with_region(dir.path().join(name), |r| {
            assert_eq!(
                r.cores[0].mode.load(Ordering::Relaxed),
                CORE_LIMITED,
                "{name}"
            );
            assert!(
                r.publish[0].launch_rate.load(Ordering::Relaxed) > 0,
                "{name} published its rate in its own region"
            );
        });
    }
    let tables: Vec<_> = std::fs::read_dir(&cards).unwrap().collect();
    assert_eq!(tables.len(), 1, "one table for the one card, none added");
}

/// Runs a low-priority tenant ("low", allocation priority low) for 4 s and,
/// from its second second, `other` for 1.5 s with `other_env`; returns the
/// low one's launches per 100 ms window.
fn low_tenant_next_to(other: Tenant, other_env: &[(&'static str, &str)]) -> Vec<u64> {
    let dir = other.region.parent().unwrap().to_owned();
    let cards = dir.join("cards");
    std::fs::create_dir(&cards).unwrap();
    let low = tenant(&dir, "low", PRIORITY_LOW);
    let _agent = TableAggregator::start(&cards, &[CARD0], vec![low.clone(), other.clone()]);
    let env = |t: &Tenant| {
        vec![
            (
                "CUDA_DEVICE_MEMORY_SHARED_CACHE",
                t.region.display().to_string(),
            ),
            ("TESSERA_CARD_TENANTS_DIR", cards.display().to_string()),
            ("TESSERA_TENANT_ID", t.id.clone()),
        ]
    };
    let mut low_env = env(&low);
    low_env.push(("CUDA_TASK_PRIORITY", "1".to_owned()));
    let mut other_vars = env(&other);
    other_vars.extend(other_env.iter().map(|(k, v)| (*k, (*v).to_owned())));
    let low_client = spawn("launch_dlsym", &["loop", "4"], &pairs(&low_env));
    std::thread::sleep(std::time::Duration::from_secs(1));
    finish(spawn("launch_dlsym", &["loop", "1.5"], &pairs(&other_vars)));
    windows(&finish(low_client))
}

#[test]
fn low_priority_yields_while_high_priority_launches_and_resumes_after() {
    let dir = tempfile::tempdir().unwrap();
    let high = tenant(dir.path(), "high", PRIORITY_HIGH);
    let w = low_tenant_next_to(high, &[("CUDA_TASK_PRIORITY", "0")]);
    let sum = |r: std::ops::Range<usize>| w[r].iter().sum::<u64>();
    let before = sum(2..8);
    let during = sum(17..23); // 0.7 s into the high-priority run
    let after = sum(34..40); // 0.9 s after it stopped
    assert!(during * 20 < before, "did not yield: {w:?}");
    assert!(after * 3 > before, "did not resume within a second: {w:?}");
}

#[test]
fn a_tenant_claiming_high_priority_for_itself_makes_nobody_yield() {
    // The allocation says low; the container's own word (its environment,
    // which used to go into the shared table) says high. Its region, the
    // only thing it writes, has no priority the agent reads.
    let dir = tempfile::tempdir().unwrap();
    let liar = tenant(dir.path(), "liar", PRIORITY_LOW);
    let w = low_tenant_next_to(liar.clone(), &[("CUDA_TASK_PRIORITY", "0")]);
    with_region(&liar.region, |r| {
        assert!(
            r.publish[0].beat_ns.load(Ordering::Relaxed) != 0,
            "the liar did publish (it was seen, just not as high priority)"
        );
    });
    let sum = |r: std::ops::Range<usize>| w[r].iter().sum::<u64>();
    let before = sum(2..8);
    let during = sum(17..23);
    assert!(
        during * 3 > before,
        "a self-declared high priority froze its neighbour: {w:?}"
    );
}
