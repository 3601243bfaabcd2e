//! Containers with several cards (`nvidia.com/gpu: 2`), against the fake
//! two-card driver: each card its own cap, out-of-memory on one card leaving
//! the other alone, `cuMemGetInfo` per current context's card and NVML per
//! card, the cap following the physical card through the container's UUID
//! list whatever CUDA's numbering (`CUDA_VISIBLE_DEVICES`, enumeration
//! order), a card outside the container refused, and peer access passing
//! through untouched.
//!
//! The fake machine: card 0 has 16 GiB, card 1 24 GiB; a context costs
//! 64 MiB. Card `p`'s UUID is `GPU-5a5a5a5a-5a5a-5a5a-5a5a-5a5a5a5a5a<p>`.

use crate::common;

use common::{compile, key_values, with_region, Artifacts};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const CONTEXT: u64 = 64 * MIB;
const UUID0: &str = "GPU-5a5a5a5a-5a5a-5a5a-5a5a-5a5a5a5a5a00";
const UUID1: &str = "GPU-5a5a5a5a-5a5a-5a5a-5a5a-5a5a5a5a5a01";

fn artifacts() -> &'static Artifacts {
    static ARTIFACTS: OnceLock<Artifacts> = OnceLock::new();
    ARTIFACTS.get_or_init(|| {
        Artifacts::prepare("tessera-multi-card-test", |dir| {
            compile(dir, "multi_card_client.c", &[], "multi", &[]);
            compile(dir, "nvml_client.c", &["-DMODE_DLSYM"], "nvml", &[]);
        })
    })
}

/// A client on the fake two-card machine; `env` may override its shape.
fn command(program: &str, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = artifacts().command(
        program,
        args,
        &[
            ("FAKE_CUDA_DEVICES", "2"),
            ("FAKE_CUDA_TOTAL_MIB", "16384,24576"),
        ],
    );
    cmd.envs(env.iter().copied());
    cmd
}

fn run(program: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let out = command(program, args, env).output().expect("run client");
    assert!(
        out.status.code().is_some(),
        "{program} {args:?} died: {out:?}"
    );
    out
}

/// Lines of stdout as `key=value` maps.
fn lines(out: &Output) -> Vec<HashMap<String, String>> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(key_values)
        .collect()
}

/// The line whose `key` is `value`.
fn line(out: &Output, key: &str, value: &str) -> HashMap<String, String> {
    lines(out)
        .into_iter()
        .find(|l| l.get(key).map(String::as_str) == Some(value))
        .unwrap_or_else(|| {
            panic!(
                "no line with {key}={value} in\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

fn num(map: &HashMap<String, String>, key: &str) -> u64 {
    map.get(key)
        .unwrap_or_else(|| panic!("no {key} in {map:?}"))
        .parse()
        .unwrap()
}

const TWO_CAPS: [(&str, &str); 3] = [
    ("CUDA_DEVICE_MEMORY_LIMIT_0", "1g"),
    ("CUDA_DEVICE_MEMORY_LIMIT_1", "2g"),
    (
        "NVIDIA_VISIBLE_DEVICES",
        "GPU-5a5a5a5a-5a5a-5a5a-5a5a-5a5a5a5a5a00,GPU-5a5a5a5a-5a5a-5a5a-5a5a-5a5a5a5a5a01",
    ),
];

#[test]
fn each_card_reports_its_own_cap() {
    let out = run("multi", &["cards"], &TWO_CAPS);
    assert_eq!(num(&line(&out, "init", "0"), "count"), 2);
    let card0 = line(&out, "card", "0");
    let card1 = line(&out, "card", "1");
    assert_eq!(num(&card0, "total"), GIB);
    assert_eq!(num(&card0, "free"), GIB - CONTEXT);
    assert_eq!(num(&card0, "totalmem"), GIB);
    assert_eq!(num(&card1, "total"), 2 * GIB);
    assert_eq!(num(&card1, "free"), 2 * GIB - CONTEXT);
    assert_eq!(num(&card1, "totalmem"), 2 * GIB);
}

#[test]
fn only_one_card_capped_leaves_the_other_whole() {
    let out = run("multi", &["cards"], &[("CUDA_DEVICE_MEMORY_LIMIT_1", "2g")]);
    let card0 = line(&out, "card", "0");
    assert_eq!(num(&card0, "total"), 16 * GIB);
    assert_eq!(num(&card0, "totalmem"), 16 * GIB);
    assert_eq!(num(&line(&out, "card", "1"), "total"), 2 * GIB);
}

#[test]
fn out_of_memory_on_one_card_does_not_touch_the_other() {
    let out = run("multi", &["fill", "0", "256"], &TWO_CAPS);
    let filled = line(&out, "last_rc", "2");
    assert_eq!(
        num(&filled, "filled"),
        3,
        "1 GiB - 64 MiB holds three 256 MiB chunks"
    );
    let other = line(&out, "other", "1");
    assert_eq!(num(&other, "alloc"), 0, "card 1 still has its own room");
    assert_eq!(num(&other, "total"), 2 * GIB);
    assert_eq!(num(&other, "free"), 2 * GIB - CONTEXT - GIB);

    let out = run("multi", &["fill", "1", "512"], &TWO_CAPS);
    assert_eq!(num(&line(&out, "last_rc", "2"), "filled"), 3);
    let other = line(&out, "other", "0");
    assert_eq!(
        num(&other, "alloc"),
        2,
        "1 GiB never fits card 0 next to its context"
    );
    assert_eq!(num(&other, "free"), GIB - CONTEXT);
}

#[test]
fn cuda_visible_devices_renumbering_keeps_the_physical_cards_cap() {
    // The container holds both cards; the application narrows to the second.
    for (visible, note) in [("1", "by index"), (UUID1, "by UUID")] {
        let mut env = TWO_CAPS.to_vec();
        env.push(("CUDA_VISIBLE_DEVICES", visible));
        let out = run("multi", &["cards"], &env);
        assert_eq!(num(&line(&out, "init", "0"), "count"), 1, "{note}");
        let card = line(&out, "card", "0");
        assert_eq!(
            card["uuid_last"], "01",
            "{note}: ordinal 0 is physical card 1"
        );
        assert_eq!(
            num(&card, "total"),
            2 * GIB,
            "{note}: cap _1 follows the card"
        );
        assert_eq!(num(&card, "totalmem"), 2 * GIB, "{note}");
    }
    // The agent's own list wins over a rewritten NVIDIA_VISIBLE_DEVICES.
    let out = run(
        "multi",
        &["cards"],
        &[
            ("CUDA_DEVICE_MEMORY_LIMIT_0", "1g"),
            ("CUDA_DEVICE_MEMORY_LIMIT_1", "2g"),
            ("NVIDIA_VISIBLE_DEVICES", "all"),
            ("TESSERA_VISIBLE_UUIDS", &format!("{UUID0},{UUID1}")),
            ("CUDA_VISIBLE_DEVICES", "1"),
        ],
    );
    assert_eq!(num(&line(&out, "card", "0"), "total"), 2 * GIB);
}

#[test]
fn the_containers_card_order_decides_not_cudas() {
    // The scheduler gave the cards in the order (card 1, card 0): cap _0 is
    // card 1's, whatever ordinal CUDA gives it.
    let list = format!("{UUID1},{UUID0}");
    let env = [
        ("CUDA_DEVICE_MEMORY_LIMIT_0", "3g"),
        ("CUDA_DEVICE_MEMORY_LIMIT_1", "1g"),
        ("TESSERA_VISIBLE_UUIDS", list.as_str()),
    ];
    let out = run("multi", &["cards"], &env);
    assert_eq!(num(&line(&out, "card", "0"), "total"), GIB);
    assert_eq!(num(&line(&out, "card", "1"), "total"), 3 * GIB);
}

#[test]
fn the_shared_region_counts_per_physical_card() {
    // Two processes of one container, each narrowed to a different card (a
    // tensor-parallel pair), share the region: each charges its own card's
    // counter, numbered by the container's list.
    let dir = tempfile::tempdir().unwrap();
    let region = dir.path().join("region.cache");
    let region_text = region.display().to_string();
    let mut env = TWO_CAPS.to_vec();
    env.push(("CUDA_DEVICE_MEMORY_SHARED_CACHE", &region_text));
    let mut holders = Vec::new();
    for (visible, mib) in [("1", "700"), ("0", "300")] {
        let mut env = env.clone();
        env.push(("CUDA_VISIBLE_DEVICES", visible));
        let mut holder = command("multi", &["hold", "0", mib], &env)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let held = BufReader::new(holder.stdout.take().unwrap())
            .lines()
            .map(Result::unwrap)
            .find(|l| l.starts_with("held="))
            .expect("holder output");
        assert_eq!(held, "held=0");
        holders.push(holder);
    }
    with_region(&region, |r| {
        assert_eq!(r.device_used(1), 700 * MIB + CONTEXT);
        assert_eq!(r.device_used(0), 300 * MIB + CONTEXT);
    });
    // A third process seeing both cards sees each card's use by the others.
    let out = run("multi", &["cards"], &env);
    assert_eq!(
        num(&line(&out, "card", "1"), "free"),
        2 * GIB - 700 * MIB - 2 * CONTEXT
    );
    assert_eq!(
        num(&line(&out, "card", "0"), "free"),
        GIB - 300 * MIB - 2 * CONTEXT
    );
    for mut holder in holders {
        holder.kill().unwrap();
        holder.wait().unwrap();
    }
}

#[test]
fn a_card_outside_the_container_is_refused() {
    let env = [
        ("CUDA_DEVICE_MEMORY_LIMIT_0", "1g"),
        ("TESSERA_VISIBLE_UUIDS", UUID0),
    ];
    let out = run("multi", &["cards"], &env);
    assert_eq!(num(&line(&out, "card", "0"), "context"), 0);
    assert_eq!(num(&line(&out, "card", "0"), "total"), GIB);
    assert_eq!(
        num(&line(&out, "card", "1"), "context"),
        101,
        "CUDA_ERROR_INVALID_DEVICE"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not one of the container's cards"),
        "{stderr}"
    );
}

#[test]
fn nvml_reports_each_card_by_its_uuid() {
    // NVML numbers cards physically; the container's list says card 1 is
    // its first card (cap _0).
    let list = format!("{UUID1},{UUID0}");
    let env = [
        ("CUDA_DEVICE_MEMORY_LIMIT_0", "3g"),
        ("CUDA_DEVICE_MEMORY_LIMIT_1", "1g"),
        ("TESSERA_VISIBLE_UUIDS", list.as_str()),
    ];
    let out = run("nvml", &[], &env);
    assert_eq!(num(&line(&out, "card", "0"), "total"), GIB);
    assert_eq!(num(&line(&out, "card", "0"), "total2"), GIB);
    assert_eq!(num(&line(&out, "card", "1"), "total"), 3 * GIB);
    // Without a list, NVML's index is the card index.
    let out = run("nvml", &[], &[("CUDA_DEVICE_MEMORY_LIMIT_1", "1g")]);
    assert_eq!(num(&line(&out, "card", "0"), "total"), 16 * GIB);
    assert_eq!(num(&line(&out, "card", "1"), "total"), GIB);
}

#[test]
fn peer_access_passes_through_untouched() {
    let out = run("multi", &["peer"], &TWO_CAPS);
    let peer = line(&out, "can_rc", "0,0");
    assert_eq!(peer["can"], "1,1");
    assert_eq!(peer["enable"], "0");
    assert_eq!(peer["again"], "704", "the driver's own answer, unchanged");
    let owners = line(&out, "can_in", "driver");
    assert_eq!(owners["enable_in"], "driver");
    assert_eq!(line(&out, "proc_enable_in", "driver").len(), 1);
}
