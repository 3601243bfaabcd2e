//! End-to-end tests of `libtessera_cuda.so`: real processes run with the
//! interceptor preloaded against the workspace's fake `libcuda.so.1` and
//! `libnvidia-ml.so.1` (crates `fake-cuda`, `fake-nvml`, dev-dependencies of
//! this crate, so `cargo test` has built their `.so` files before this runs).
//!
//! The C clients in `tests/programs/` are compiled here with `cc`, once per
//! way of reaching the driver: linked, `dlopen`+`dlsym`, `cuGetProcAddress`.
//! The fake card has 16 GiB, and a context costs 64 MiB on it.

use crate::common;

use common::{compile, value, values, with_region, Artifacts};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const CONTEXT: u64 = 64 * MIB;
const CARD: u64 = 16384 * MIB;

fn artifacts() -> &'static Artifacts {
    static ARTIFACTS: OnceLock<Artifacts> = OnceLock::new();
    ARTIFACTS.get_or_init(|| {
        Artifacts::prepare("tessera-interceptor-test", |dir| {
            let cuda = ["-l:libcuda.so.1"];
            let nvml = ["-l:libnvidia-ml.so.1"];
            compile(
                dir,
                "cuda_client.c",
                &["-DMODE_LINKED"],
                "cuda_linked",
                &cuda,
            );
            compile(dir, "cuda_client.c", &["-DMODE_DLSYM"], "cuda_dlsym", &[]);
            compile(
                dir,
                "cuda_client.c",
                &["-DMODE_PROCADDR"],
                "cuda_procaddr",
                &[],
            );
            compile(
                dir,
                "nvml_client.c",
                &["-DMODE_LINKED"],
                "nvml_linked",
                &nvml,
            );
            compile(dir, "nvml_client.c", &["-DMODE_DLSYM"], "nvml_dlsym", &[]);
        })
    })
}

/// The three ways a program reaches the driver.
const CLIENTS: [&str; 3] = ["cuda_linked", "cuda_dlsym", "cuda_procaddr"];

fn command(client: &str, args: &[&str], env: &[(&str, &str)]) -> Command {
    artifacts().command(client, args, env)
}

fn run(client: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut child = command(client, args, env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start client");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().ok();
            panic!("{client} {args:?} hung");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn shared_path(name: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name).display().to_string();
    (dir, path)
}

#[test]
fn reports_the_cap_on_every_path() {
    for client in CLIENTS {
        let out = run(client, &["info"], &[("CUDA_DEVICE_MEMORY_LIMIT", "4g")]);
        assert!(out.status.success(), "{client}: {out:?}");
        assert_eq!(value(&out, "total"), 4096 * MIB, "{client}");
        assert_eq!(value(&out, "totalmem"), 4096 * MIB, "{client}");
        // The context really costs 64 MiB on the card: it is charged.
        assert_eq!(value(&out, "free"), 4096 * MIB - CONTEXT, "{client}");
    }
}

#[test]
fn context_cost_is_measured_without_nvml_process_list_too() {
    // Inside a pid namespace NVML lists host pids: fall back to the card's usage.
    let out = run(
        "cuda_dlsym",
        &["info"],
        &[
            ("CUDA_DEVICE_MEMORY_LIMIT", "4g"),
            ("FAKE_NVML_NO_PROCESSES", "1"),
            // As inside a pid namespace, whatever namespace the test runs in.
            ("TESSERA_MEASURE_CONTEXT_CARD_WIDE", "1"),
        ],
    );
    assert_eq!(value(&out, "free"), 4096 * MIB - CONTEXT);
}

#[test]
fn passes_through_without_a_cap() {
    let (_dir, path) = shared_path("unused.cache");
    for client in CLIENTS {
        let out = run(
            client,
            &["info"],
            &[("CUDA_DEVICE_MEMORY_SHARED_CACHE", &path)],
        );
        assert!(out.status.success(), "{client}: {out:?}");
        assert_eq!(value(&out, "total"), CARD);
        assert_eq!(value(&out, "totalmem"), CARD);
        assert_eq!(value(&out, "free"), CARD - CONTEXT);
    }
    assert!(
        !Path::new(&path).exists(),
        "pass-through must not touch the region"
    );
}

#[test]
fn cap_larger_than_the_card_reports_the_card() {
    let out = run(
        "cuda_dlsym",
        &["info"],
        &[("CUDA_DEVICE_MEMORY_LIMIT_0", "64g")],
    );
    assert_eq!(value(&out, "total"), CARD);
    assert_eq!(value(&out, "totalmem"), CARD);
    assert_eq!(value(&out, "free"), CARD - CONTEXT);
}

#[test]
fn out_of_memory_exactly_at_the_cap() {
    for client in CLIENTS {
        let out = run(client, &["exact"], &[("CUDA_DEVICE_MEMORY_LIMIT", "1g")]);
        assert_eq!(value(&out, "free_before"), 1024 * MIB - CONTEXT, "{client}");
        assert_eq!(
            value(&out, "whole"),
            0,
            "{client}: the whole reported free must fit"
        );
        assert_eq!(
            value(&out, "one_more"),
            2,
            "{client}: one byte more is CUDA_ERROR_OUT_OF_MEMORY"
        );
        assert_eq!(value(&out, "free_at_cap"), 0, "{client}");
        assert_eq!(
            value(&out, "again"),
            0,
            "{client}: a free gives the room back"
        );

        let out = run(
            client,
            &["fill", "256"],
            &[("CUDA_DEVICE_MEMORY_LIMIT", "1g")],
        );
        assert_eq!(value(&out, "filled"), 3, "{client}");
        assert_eq!(value(&out, "last_rc"), 2, "{client}");
        assert_eq!(
            value(&out, "free"),
            1024 * MIB - CONTEXT,
            "{client}: frees release all"
        );
    }
}

#[test]
fn every_allocation_path_is_charged_and_released() {
    let expected: &[(&str, u64)] = &[
        ("alloc", MIB),
        ("pitch", 1024 * 100),
        ("managed", 2 * MIB),
        ("async", 3 * MIB),
        ("pool", 4 * MIB),
        ("pool_sync_free", 4 * MIB),
        ("create", 2 * MIB),
        ("create_other_card", 0),
        ("array", 256 * 256 * 16),
        ("array3d", 64 * 64 * 64),
        ("context", CONTEXT),
    ];
    for client in CLIENTS {
        let out = run(client, &["paths"], &[("CUDA_DEVICE_MEMORY_LIMIT", "4g")]);
        let text = String::from_utf8_lossy(&out.stdout);
        for (name, bytes) in expected {
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("path={name} ")))
                .unwrap_or_else(|| panic!("{client}: no {name} in\n{text}"));
            assert!(line.contains(" rc=0 "), "{client}: {line}");
            assert!(
                line.contains(&format!(" charged={bytes} ")),
                "{client}: {line}"
            );
            assert!(line.ends_with(" left=0"), "{client}: {line}");
        }
    }
}

/// `stage -> (rc, charged, held)` from a `vmm` scenario's output.
fn stages(out: &Output) -> std::collections::HashMap<String, (u64, u64, u64)> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("stage="))
        .map(|l| {
            let v = common::key_values(l);
            let n = |k: &str| v[k].parse::<u64>().unwrap_or_else(|_| panic!("{k} in {l}"));
            (v["stage"].clone(), (n("rc"), n("charged"), n("held")))
        })
        .collect()
}

/// Asserts each `(stage, (rc, charged, held))` of `expected` in `out`.
fn assert_stages(client: &str, out: &Output, expected: &[(&str, (u64, u64, u64))]) {
    let s = stages(out);
    for (stage, want) in expected {
        assert_eq!(
            s.get(*stage),
            Some(want),
            "{client} {stage}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn mapped_vmm_memory_stays_charged_after_its_handle_is_released() {
    // vectorAddMMAP's pattern in a loop under a 1 GiB cap: create 256 MiB,
    // map, set access, release the handle. The mapping keeps the memory, so
    // the charge must stay: 3 fit beside the 64 MiB context, the 4th is
    // refused (before the fix all 16 went through, 4 GiB held).
    for client in CLIENTS {
        let out = run(
            client,
            &["vmm", "escape"],
            &[("CUDA_DEVICE_MEMORY_LIMIT", "1g")],
        );
        assert_eq!(value(&out, "vmm_mapped"), 3, "{client}: {out:?}");
        assert_eq!(value(&out, "last_rc"), 2, "{client}");
        assert_stages(
            client,
            &out,
            &[("after_release_loop", (2, 768 * MIB, 768 * MIB))],
        );
    }
}

#[test]
fn vmm_charges_follow_what_the_card_holds() {
    let seg = 64 * MIB;
    let expected: &[(&str, &str, u64, u64, u64)] = &[
        // vLLM's sleep mode.
        ("sleep", "awake", 0, 4 * seg, 4 * seg),
        ("sleep", "asleep", 0, 0, 0),
        ("sleep", "awake_again", 0, 4 * seg, 4 * seg),
        ("sleep", "freed", 0, 0, 0),
        // PyTorch's expandable segments.
        ("expandable", "grown", 0, 8 * seg, 8 * seg),
        (
            "expandable",
            "unmapped_middle_handles_kept",
            0,
            8 * seg,
            8 * seg,
        ),
        ("expandable", "middle_released", 0, 4 * seg, 4 * seg),
        ("expandable", "retained_after_unmap", 0, 4 * seg, 4 * seg),
        ("expandable", "retained_released", 0, 3 * seg, 3 * seg),
        ("expandable", "refused_unmap", 1, 3 * seg, 3 * seg),
        ("expandable", "released_while_mapped", 0, 3 * seg, 3 * seg),
        ("expandable", "all_gone", 0, 0, 0),
        // An import is charged to the importer from its first mapping until
        // its last reference goes; while the exporter (here the same
        // process) holds it too, it is charged to both.
        ("import", "imported", 0, 2 * seg, 2 * seg),
        ("import", "import_mapped", 0, 4 * seg, 2 * seg),
        ("import", "exporter_gone", 0, 2 * seg, 2 * seg),
        (
            "import",
            "import_released_still_mapped",
            0,
            2 * seg,
            2 * seg,
        ),
        ("import", "import_gone", 0, 0, 0),
        // Host-located memory (NCCL's) is not the card's.
        ("host", "host_created", 0, 0, 0),
    ];
    for client in CLIENTS {
        for scenario in ["sleep", "expandable", "import", "host"] {
            let out = run(
                client,
                &["vmm", scenario],
                &[("CUDA_DEVICE_MEMORY_LIMIT", "4g")],
            );
            let s = stages(&out);
            for &(_, stage, rc, charged, held) in expected.iter().filter(|e| e.0 == scenario) {
                assert_eq!(
                    s.get(stage).copied(),
                    Some((rc, charged, held)),
                    "{client} {scenario} {stage}: {}",
                    String::from_utf8_lossy(&out.stdout)
                );
            }
        }
        let out = run(
            client,
            &["vmm", "expandable"],
            &[("CUDA_DEVICE_MEMORY_LIMIT", "4g")],
        );
        assert_eq!(value(&out, "retained_same"), 1, "{client}");
    }
}

#[test]
fn mipmapped_arrays_and_context_limits_are_charged_what_the_driver_reserves() {
    for client in CLIENTS {
        let env = [("CUDA_DEVICE_MEMORY_LIMIT", "4g")];
        let out = run(client, &["vmm", "mipmap"], &env);
        // 1024x1024 float4 in 5 levels: 16 + 4 + 1 + 0.25 + 0.0625 MiB of
        // texels; the (fake) driver pads each level to 2 MiB: 26 MiB, and
        // the charge is corrected to that.
        assert_stages(
            client,
            &out,
            &[
                ("mipmap_created", (0, 26 * MIB, 26 * MIB)),
                ("mipmap_destroyed", (0, 0, 0)),
            ],
        );

        let out = run(client, &["vmm", "heap"], &env);
        assert_stages(
            client,
            &out,
            &[
                ("heap_grown", (0, 248 * MIB, 248 * MIB)),
                ("fifo_grown", (0, 264 * MIB, 264 * MIB)),
                ("limits_back", (0, 0, 0)),
                // An 8 GiB heap does not fit a 4 GiB cap: refused before the driver.
                ("heap_past_cap", (2, 0, 0)),
            ],
        );
    }
}

#[test]
fn local_memory_the_driver_reserves_at_launch_is_charged() {
    for client in CLIENTS {
        let out = run(
            client,
            &["vmm", "lmem"],
            &[("CUDA_DEVICE_MEMORY_LIMIT", "4g")],
        );
        // Within the initial 1 KiB stack: nothing reserved, nothing charged.
        assert_stages(
            client,
            &out,
            &[
                ("lmem_small", (0, 0, 0)),
                // 63 KiB more per thread for the card's 4096 threads: 252 MiB,
                // charged before the launch, once.
                ("lmem_big", (0, 252 * MIB, 252 * MIB)),
                ("lmem_big_again", (0, 252 * MIB, 252 * MIB)),
                // 8 GiB of stack does not fit a 4 GiB cap: refused before the
                // driver grows anything.
                ("lmem_past_cap", (2, 252 * MIB, 252 * MIB)),
                ("lmem_library_past_cap", (2, 252 * MIB, 252 * MIB)),
                // 128 KiB per thread from a kernel the driver does not describe:
                // what the driver reports afterwards is charged.
                ("lmem_opaque", (0, 508 * MIB, 508 * MIB)),
                ("lmem_stack_set_back", (0, 0, 0)),
                ("lmem_stack_set_past_cap", (2, 0, 0)),
            ],
        );
    }
}

#[test]
fn code_the_driver_loads_at_first_launches_is_charged() {
    for client in CLIENTS {
        // 1 GiB cap, 64 MiB context, 96 MiB per function's code.
        let out = run(
            client,
            &["vmm", "load"],
            &[
                ("CUDA_DEVICE_MEMORY_LIMIT", "1g"),
                ("FAKE_CUDA_LOAD_MIB", "96"),
            ],
        );
        // Charged after each function's first launch, from NVML's reading.
        assert_stages(
            client,
            &out,
            &[
                ("load_first", (0, 96 * MIB, 96 * MIB)),
                ("load_again", (0, 96 * MIB, 96 * MIB)),
                ("load_second", (0, 192 * MIB, 192 * MIB)),
            ],
        );
        // 1024 - 64 - 192 = 768 MiB left: 12 chunks, and the card holds no
        // more than the cap (before, 15 fitted and it held 1152 MiB).
        assert_eq!(value(&out, "load_chunks"), 12, "{client}");
        assert_stages(client, &out, &[("load_full", (2, 960 * MIB, 960 * MIB))]);
        // One function's code unloaded: the refused allocation reconciles
        // and fits.
        assert_eq!(value(&out, "unloaded"), 1, "{client}");
        assert_stages(
            client,
            &out,
            &[("load_after_unload", (0, 928 * MIB, 928 * MIB))],
        );
    }
}

#[test]
fn pool_allocations_are_charged_to_the_pools_card() {
    for client in CLIENTS {
        let out = run(
            client,
            &["vmm", "pool"],
            &[
                ("CUDA_DEVICE_MEMORY_LIMIT_0", "4g"),
                ("CUDA_DEVICE_MEMORY_LIMIT_1", "100m"),
            ],
        );
        // Card 1 has room for one 64 MiB allocation, not two; card 0's
        // account (the current context's card) is untouched.
        assert_eq!(value(&out, "pool_first"), 0, "{client}: {out:?}");
        assert_eq!(value(&out, "pool_second"), 2, "{client}");
        assert_eq!(stages(&out)["pool_on_card1"], (0, 0, 0), "{client}");
        assert_eq!(value(&out, "default_pool_card1"), 0, "{client}");
    }
}

#[test]
fn memory_a_pool_keeps_after_frees_stays_charged() {
    for client in CLIENTS {
        let out = run(
            client,
            &["vmm", "retain"],
            &[("CUDA_DEVICE_MEMORY_LIMIT", "1g")],
        );
        let expected: &[(&str, (u64, u64, u64))] = &[
            ("freed_into_pool", (0, 256 * MIB, 256 * MIB)),
            // Served from what the pool kept: nothing more held or charged.
            ("reused_from_pool", (0, 256 * MIB, 256 * MIB)),
            // 64 (context) + 256 (kept by the pool) + 800 > 1024: refused
            // (before the fix the pool's 256 MiB were uncharged at the free).
            ("plain_alloc_past_retained", (2, 256 * MIB, 256 * MIB)),
            ("trimmed", (0, 0, 0)),
            ("threshold_64m", (0, 64 * MIB, 64 * MIB)),
            ("destroyed", (0, 0, 0)),
            ("default_pool_retains", (0, 128 * MIB, 128 * MIB)),
            ("default_pool_trimmed", (0, 0, 0)),
        ];
        assert_stages(client, &out, expected);
    }
}

#[test]
fn graph_memory_is_charged_what_the_driver_reserves_for_it() {
    for client in CLIENTS {
        let out = run(
            client,
            &["vmm", "graph"],
            &[("CUDA_DEVICE_MEMORY_LIMIT", "1g")],
        );
        let expected: &[(&str, (u64, u64, u64))] = &[
            ("graph_built", (0, 0, 0)),
            ("graph_launched", (0, 512 * MIB, 512 * MIB)),
            // 64 (context) + 512 (the graph's) + 512 > 1024: refused (before
            // the fix the graph's memory was not charged and this fitted).
            ("plain_alloc_past_graph", (2, 512 * MIB, 512 * MIB)),
            ("graph_trimmed", (0, 0, 0)),
        ];
        assert_stages(client, &out, expected);
    }
}

#[test]
fn memory_on_another_card_is_charged_to_that_card() {
    let (_dir, path) = shared_path("cards.cache");
    let env = [
        ("CUDA_DEVICE_MEMORY_LIMIT_0", "1g"),
        ("CUDA_DEVICE_MEMORY_LIMIT_1", "2g"),
        ("CUDA_DEVICE_MEMORY_SHARED_CACHE", path.as_str()),
        ("CLIENT_DEVICE", "1"),
    ];
    let out = run("cuda_procaddr", &["info"], &env);
    assert_eq!(value(&out, "total"), 2048 * MIB);
    // cuDeviceTotalMem asks about card 0 explicitly.
    assert_eq!(value(&out, "totalmem"), 1024 * MIB);
    let out = run("cuda_procaddr", &["fill", "512"], &env);
    assert_eq!(value(&out, "filled"), 3);
}

#[test]
fn unknown_frees_are_forwarded_untouched() {
    for client in CLIENTS {
        let out = run(
            client,
            &["unknownfree"],
            &[("CUDA_DEVICE_MEMORY_LIMIT", "1g")],
        );
        // The fake driver's answer for a pointer it never gave out.
        assert_eq!(value(&out, "unknown_free"), 1, "{client}");
        assert_eq!(value(&out, "unchanged"), 1, "{client}");
    }
}

#[test]
fn proc_address_honours_versions_flags_and_addresses() {
    let out = run(
        "cuda_procaddr",
        &["procaddr"],
        &[("CUDA_DEVICE_MEMORY_LIMIT", "1g")],
    );
    assert_eq!(value(&out, "ptsz_rc"), 0);
    assert_eq!(
        value(&out, "ptsz_calls"),
        1,
        "the _ptsz variant must reach the driver"
    );
    assert_eq!(value(&out, "ptsz_charged"), 8 * MIB);
    let v = values(&out);
    assert_eq!(v["ptsz_in"], "tessera");
    assert_eq!(
        v["getproc_in"], "tessera",
        "cuGetProcAddress found through itself is hooked"
    );
    assert_eq!(
        v["unhooked_in"], "driver",
        "functions we don't intercept are the driver's"
    );
    assert_eq!(
        value(&out, "legacy_untouched"),
        1,
        "the 32-bit cuMemAlloc ABI is not ours to replace"
    );
}

#[test]
fn bad_caps_stop_cuda_initialisation() {
    for (var, value_text) in [
        ("CUDA_DEVICE_MEMORY_LIMIT_0", "lots"),
        ("CUDA_DEVICE_MEMORY_LIMIT", "1.5g"),
        ("CUDA_DEVICE_MEMORY_LIMIT_X", "1g"),
    ] {
        for client in CLIENTS {
            let out = run(client, &["info"], &[(var, value_text)]);
            assert_eq!(
                value(&out, "init"),
                3,
                "{client} {var}={value_text}: CUDA_ERROR_NOT_INITIALIZED"
            );
            assert!(!out.status.success());
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(stderr.lines().count(), 1, "one message: {stderr}");
            assert!(
                stderr.contains(var) && stderr.contains("refused"),
                "{stderr}"
            );
        }
    }
}

#[test]
fn zero_caps_and_unknown_policies_are_taken_as_hami_core_does() {
    // HAMi-core: a cap of 0 is no cap; an unknown policy is the default.
    for client in CLIENTS {
        for (var, value_text) in [
            ("CUDA_DEVICE_MEMORY_LIMIT", "0m"),
            ("CUDA_DEVICE_MEMORY_LIMIT", "0"),
            ("GPU_CORE_UTILIZATION_POLICY", "sometimes"),
        ] {
            let out = run(client, &["info"], &[(var, value_text)]);
            assert!(out.status.success(), "{client} {var}={value_text}: {out:?}");
            assert_eq!(value(&out, "init"), 0, "{client} {var}={value_text}");
            assert_eq!(value(&out, "total"), CARD, "{client}: not capped");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                stderr.contains("WARN") && stderr.contains(var),
                "{client} {var}={value_text}: a warning names it: {stderr}"
            );
        }
    }
}

#[test]
fn a_free_after_the_exit_handler_does_not_uncharge_twice() {
    let (_dir, path) = shared_path("late.cache");
    let env = [
        ("CUDA_DEVICE_MEMORY_LIMIT", "2g"),
        ("CUDA_DEVICE_MEMORY_SHARED_CACHE", path.as_str()),
    ];
    let mut holder = command("cuda_dlsym", &["hold", "600"], &env)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    BufReader::new(holder.stdout.take().unwrap())
        .lines()
        .map(Result::unwrap)
        .find(|l| l.starts_with("held="))
        .expect("holder output");
    for client in CLIENTS {
        let mut late_env = env.to_vec();
        late_env.push(("CLIENT_LATE_FREE", "300"));
        let out = run(client, &["info"], &late_env);
        assert_eq!(value(&out, "late_alloc"), 0, "{client}");
        // The client's exit handler gave its charges back; its late free
        // must not take the holder's bytes off the card again.
        with_region(&path, |r| {
            assert_eq!(r.device_used(0), 600 * MIB + CONTEXT, "{client}");
        });
    }
    holder.kill().unwrap();
    holder.wait().unwrap();
}

#[test]
fn processes_share_one_cap_and_kill_9_gives_memory_back() {
    let (_dir, path) = shared_path("shared.cache");
    let env = [
        ("CUDA_DEVICE_MEMORY_LIMIT", "1g"),
        ("CUDA_DEVICE_MEMORY_SHARED_CACHE", path.as_str()),
    ];
    let mut holder = command("cuda_dlsym", &["hold", "600"], &env)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .lines()
        .map(Result::unwrap)
        .find(|l| l.starts_with("held="))
        .map(|l| line = l)
        .expect("holder output");
    assert_eq!(line, "held=0");
    with_region(&path, |r| {
        assert_eq!(r.device_used(0), 600 * MIB + CONTEXT);
        assert_eq!(
            r.devices[0]
                .limit_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            1024 * MIB
        );
        assert_eq!(r.active_processes().len(), 1);
    });
    // 64 + 600 held, 64 for this process's context: 600 more does not fit.
    let out = run("cuda_linked", &["try", "600"], &env);
    assert_eq!(value(&out, "try"), 2);
    let out = run("cuda_linked", &["try", "296"], &env);
    assert_eq!(value(&out, "try"), 0, "exactly the rest fits");
    let out = run("cuda_linked", &["info"], &env);
    assert_eq!(value(&out, "free"), 1024 * MIB - 600 * MIB - 2 * CONTEXT);

    // SAFETY: signalling our own child.
    unsafe { libc::kill(holder.id() as i32, libc::SIGKILL) };
    holder.wait().unwrap();
    let out = run("cuda_procaddr", &["try", "900"], &env);
    assert_eq!(
        value(&out, "try"),
        0,
        "the killed holder's memory came back"
    );
    // Processes that exit normally give their charges back at exit.
    with_region(&path, |r| {
        assert_eq!(r.device_used(0), 0);
        assert!(r.active_processes().is_empty());
    });
}

#[test]
fn concurrent_processes_never_exceed_the_shared_cap() {
    let (_dir, path) = shared_path("race.cache");
    let env = [
        ("CUDA_DEVICE_MEMORY_LIMIT", "2g"),
        ("CUDA_DEVICE_MEMORY_SHARED_CACHE", path.as_str()),
    ];
    let children: Vec<_> = (0..4)
        .map(|i| {
            command(CLIENTS[i % 3], &["fillhold", "32", "2"], &env)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = children
        .into_iter()
        .map(|c| values(&c.wait_with_output().unwrap()))
        .collect();
    // A process whose context no longer fits is refused at context creation.
    let with_context = outputs
        .iter()
        .filter(|v| v.get("context").map(String::as_str) == Some("0"))
        .count() as u64;
    let chunks: u64 = outputs
        .iter()
        .filter_map(|v| v.get("filled"))
        .map(|n| n.parse::<u64>().unwrap())
        .sum();
    let charged = chunks * 32 * MIB + with_context * CONTEXT;
    assert!(
        charged <= 2048 * MIB,
        "{chunks} chunks and {with_context} contexts overshoot the cap"
    );
    assert!(
        charged > 2048 * MIB - CONTEXT,
        "{chunks} chunks and {with_context} contexts leave room"
    );
    // All exited without freeing: nothing stays charged.
    let out = run("cuda_dlsym", &["info"], &env);
    assert_eq!(value(&out, "free"), 2048 * MIB - CONTEXT);
}

#[test]
fn a_forked_child_has_its_own_account() {
    let (_dir, path) = shared_path("fork.cache");
    for client in CLIENTS {
        let out = run(
            client,
            &["fork"],
            &[
                ("CUDA_DEVICE_MEMORY_LIMIT", "1g"),
                ("CUDA_DEVICE_MEMORY_SHARED_CACHE", path.as_str()),
            ],
        );
        assert_eq!(value(&out, "child_alloc"), 0, "{client}");
        // The child's 50 MiB went back when it exited; the parent's 164 MiB
        // stayed charged, so exactly the rest fits and no byte more.
        assert_eq!(value(&out, "parent_rest"), 0, "{client}: {out:?}");
        assert_eq!(value(&out, "parent_one_more"), 2, "{client}");
    }
}

#[test]
fn nvml_shows_the_cap_and_the_containers_usage() {
    let (_dir, path) = shared_path("nvml.cache");
    let env = [
        ("CUDA_DEVICE_MEMORY_LIMIT_0", "7500m"),
        ("CUDA_DEVICE_MEMORY_SHARED_CACHE", path.as_str()),
    ];
    for client in ["nvml_dlsym", "nvml_linked"] {
        let out = run(client, &[], &env);
        let text = String::from_utf8_lossy(&out.stdout);
        let card0 = text.lines().find(|l| l.starts_with("card=0 ")).unwrap();
        let card1 = text.lines().find(|l| l.starts_with("card=1 ")).unwrap();
        assert!(
            card0.contains(&format!(" total={} ", 7500 * MIB)),
            "{client}: {card0}"
        );
        assert!(card0.contains(" used=0 "), "{client}: {card0}");
        assert!(
            card0.contains(&format!(" total2={} ", 7500 * MIB)),
            "{client}: {card0}"
        );
        assert!(card0.contains(" reserved2=0 "), "{client}: {card0}");
        assert!(
            card1.contains(&format!(" total={CARD} ")),
            "{client}: uncapped card: {card1}"
        );
    }
    // With a CUDA process of the container holding memory, NVML shows it.
    let mut holder = command("cuda_linked", &["hold", "1000"], &env)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    BufReader::new(holder.stdout.take().unwrap())
        .lines()
        .map(Result::unwrap)
        .find(|l| l.starts_with("held="))
        .expect("holder output");
    let out = run("nvml_dlsym", &[], &env);
    let text = String::from_utf8_lossy(&out.stdout);
    let used = 1000 * MIB + CONTEXT;
    assert!(
        text.contains(&format!(" used={used} free={} ", 7500 * MIB - used)),
        "{text}"
    );
    holder.kill().unwrap();
    holder.wait().unwrap();
}

#[test]
fn rtld_next_lookups_keep_their_meaning() {
    // A program that wraps `puts` and finds the real one with RTLD_NEXT,
    // as preload libraries and sanitizers do.
    let a = artifacts();
    let src = a.dir.join("rtld_next.c");
    std::fs::write(
        &src,
        r#"#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
int puts(const char *s) {
    int (*next)(const char *) = (int (*)(const char *))dlsym(RTLD_NEXT, "puts");
    if (!next || next == puts) return -1;
    return next(s);
}
int main(void) { return puts("rtld_next=ok") < 0; }
"#,
    )
    .unwrap();
    let status = Command::new("cc")
        .arg("-o")
        .arg(a.dir.join("rtld_next"))
        .arg(&src)
        .arg("-ldl")
        .status()
        .unwrap();
    assert!(status.success());
    let out = run("rtld_next", &[], &[]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "rtld_next=ok");
}

/// A stand-in for the node agent's host-pid socket: answers each peer with
/// its pid (`SO_PEERCRED`; the same namespace here) plus `offset`, as the
/// agent answers a pod's process with its host pid, and records the pids
/// that asked.
struct PidServer {
    _dir: tempfile::TempDir,
    path: String,
    asked: std::sync::Arc<std::sync::Mutex<Vec<u32>>>,
}

impl PidServer {
    fn start(offset: u32) -> Self {
        use std::io::Write;
        use std::os::unix::io::AsRawFd;
        let (dir, path) = shared_path("pid.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind the pid socket");
        let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = std::sync::Arc::clone(&asked);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut cred = libc::ucred {
                    pid: 0,
                    uid: 0,
                    gid: 0,
                };
                let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
                // SAFETY: getsockopt(SO_PEERCRED) into a ucred of the stated size.
                let rc = unsafe {
                    libc::getsockopt(
                        stream.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_PEERCRED,
                        std::ptr::addr_of_mut!(cred).cast(),
                        &mut len,
                    )
                };
                assert_eq!(rc, 0, "SO_PEERCRED");
                let pid = cred.pid as u32;
                record.lock().unwrap().push(pid);
                stream.write_all(&(pid + offset).to_le_bytes()).ok();
            }
        });
        PidServer {
            _dir: dir,
            path,
            asked,
        }
    }

    fn asked(&self) -> Vec<u32> {
        self.asked.lock().unwrap().clone()
    }
}

/// NVML lists the fake's process under its pid plus this, as a host pid.
const HOST_PID_OFFSET: u32 = 100_000;

fn in_pid_namespace<'a>(socket: &'a str, nvml_pid_offset: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CUDA_DEVICE_MEMORY_LIMIT", "4g"),
        ("FAKE_NVML_PID_OFFSET", nvml_pid_offset),
        // As inside a pid namespace, whatever namespace the test runs in.
        ("TESSERA_ASSUME_PID_NAMESPACE", "1"),
        ("TESSERA_PID_SOCKET", socket),
        ("LIBCUDA_LOG_LEVEL", "3"),
    ]
}

#[test]
fn a_host_pid_from_the_agent_spares_the_card_wide_reading() {
    // NVML lists host pids (offset 100000, as the agent answers), or
    // translates them into the caller's namespace (offset 0: our own pid,
    // as driver 580 does): exact either way, with no reading before.
    for nvml_offset in ["100000", "0"] {
        let server = PidServer::start(HOST_PID_OFFSET);
        for client in CLIENTS {
            let out = run(
                client,
                &["info"],
                &in_pid_namespace(&server.path, nvml_offset),
            );
            assert!(out.status.success(), "{client}: {out:?}");
            let log = String::from_utf8_lossy(&out.stderr);
            let what = format!("{client}, NVML pid offset {nvml_offset}");
            // Charged exactly, from NVML's process list.
            assert_eq!(value(&out, "free"), 4096 * MIB - CONTEXT, "{what}: {log}");
            assert!(
                log.contains("NVML before the context") && log.contains("(none needed"),
                "{what}: no reading before the context: {log}"
            );
            assert!(!log.contains("does not list this process"), "{what}: {log}");
            let asker = *server.asked().last().expect("the client asked");
            assert!(
                log.contains(&format!(
                    "host pid {} (own pid {asker})",
                    asker + HOST_PID_OFFSET
                )),
                "{what}: {log}"
            );
        }
        assert_eq!(
            server.asked().len(),
            CLIENTS.len(),
            "one question per process"
        );
    }
}

#[test]
fn without_the_agents_socket_contexts_are_measured_card_wide() {
    let (_dir, missing) = shared_path("no-agent.sock");
    for client in CLIENTS {
        let out = run(client, &["info"], &in_pid_namespace(&missing, "100000"));
        assert!(out.status.success(), "{client}: {out:?}");
        let log = String::from_utf8_lossy(&out.stderr);
        assert_eq!(value(&out, "free"), 4096 * MIB - CONTEXT, "{client}: {log}");
        assert!(log.contains("no host pid from"), "{client}: {log}");
        assert!(
            log.contains("NVML before the context") && log.contains("(read)"),
            "{client}: the card-wide reading is taken: {log}"
        );
    }
}

#[test]
fn a_forked_child_asks_for_its_own_host_pid() {
    let server = PidServer::start(HOST_PID_OFFSET);
    let (_dir, path) = shared_path("fork-pid.cache");
    let mut env = in_pid_namespace(&server.path, "100000");
    env[0] = ("CUDA_DEVICE_MEMORY_LIMIT", "1g");
    env.push(("CUDA_DEVICE_MEMORY_SHARED_CACHE", path.as_str()));
    let out = run("cuda_dlsym", &["fork"], &env);
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(value(&out, "child_alloc"), 0, "{log}");
    assert_eq!(value(&out, "parent_rest"), 0, "{log}");
    // The child made its own context: it asked under its own pid, and
    // NVML listed it under that pid's host pid.
    let mut asked = server.asked();
    asked.dedup();
    assert_eq!(asked.len(), 2, "parent and child each asked: {asked:?}");
    assert!(!log.contains("does not list this process"), "{log}");
}

#[test]
fn first_launch_overhead_is_reconciled_inside_a_pid_namespace_with_the_agents_answer() {
    let server = PidServer::start(HOST_PID_OFFSET);
    let mut env = in_pid_namespace(&server.path, "100000");
    env[0] = ("CUDA_DEVICE_MEMORY_LIMIT", "1g");
    env.push(("FAKE_CUDA_LOAD_MIB", "96"));
    let out = run("cuda_procaddr", &["vmm", "load"], &env);
    // NVML lists the process under its host pid, which the agent told it.
    assert_stages(
        "cuda_procaddr",
        &out,
        &[
            ("load_first", (0, 96 * MIB, 96 * MIB)),
            ("load_full", (2, 960 * MIB, 960 * MIB)),
        ],
    );
}
