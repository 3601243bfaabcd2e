//! Printing a [`SimulationReport`] (`tessera simulate`) and an inspection
//! [`Report`] (`tessera inspect`) as aligned text tables or JSON.

use std::fmt::Write as _;

use crate::inspect::Report;
use crate::simulate::SimulationReport;

fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, cell)| {
                if i + 1 == row.len() {
                    cell.clone()
                } else {
                    format!("{cell:<width$}", width = widths[i])
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Human-readable tables: placements, unplaced pods, shared cards.
pub fn render_table(report: &SimulationReport) -> String {
    let mut out = String::new();
    let mut rows = vec![[
        "POD",
        "NODE",
        "CONTAINER",
        "CARD",
        "TYPE",
        "MEMORY(MiB)",
        "CORES(%)",
        "NVIDIA-SMI TOTAL",
    ]
    .map(String::from)
    .to_vec()];
    for pod in &report.placed {
        for container in &pod.containers {
            if container.devices.is_empty() {
                rows.push(vec![
                    pod.pod.clone(),
                    pod.node.clone(),
                    container.name.clone(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ]);
            }
            for device in &container.devices {
                rows.push(vec![
                    pod.pod.clone(),
                    pod.node.clone(),
                    container.name.clone(),
                    device.uuid.clone(),
                    device.device_type.trim_start_matches("NVIDIA-").to_owned(),
                    device.memory_mib.to_string(),
                    device.cores.to_string(),
                    format!("{}MiB", device.nvidia_smi_memory_total_mib),
                ]);
            }
        }
    }
    let _ = writeln!(out, "Placed {} pod(s):", report.placed.len());
    out.push_str(&table(&rows));
    if !report.unplaced.is_empty() {
        let _ = writeln!(out, "\nNot placed {} pod(s):", report.unplaced.len());
        let mut rows = vec![vec!["POD".to_owned(), "REASON".to_owned()]];
        rows.extend(
            report
                .unplaced
                .iter()
                .map(|u| vec![u.pod.clone(), u.reason.clone()]),
        );
        out.push_str(&table(&rows));
    }
    if !report.cards.is_empty() {
        let _ = writeln!(out, "\nCards in use:");
        let mut rows = vec![
            ["NODE", "CARD", "TYPE", "MEMORY ALLOCATED", "CORES", "PODS"]
                .map(String::from)
                .to_vec(),
        ];
        rows.extend(report.cards.iter().map(|c| {
            vec![
                c.node.clone(),
                c.uuid.clone(),
                c.device_type.trim_start_matches("NVIDIA-").to_owned(),
                format!("{}/{} MiB", c.allocated_memory_mib, c.memory_mib),
                format!("{}%", c.allocated_cores),
                c.pods.join(","),
            ]
        }));
        out.push_str(&table(&rows));
    }
    for warning in &report.warnings {
        let _ = writeln!(out, "\nwarning: {warning}");
    }
    if !report.skipped.is_empty() {
        let _ = writeln!(
            out,
            "\nSkipped {} object(s) that are not nodes or workloads: {}",
            report.skipped.len(),
            report.skipped.join(", ")
        );
    }
    out
}

/// The JSON form (stable: fields are only ever added).
pub fn render_json(report: &SimulationReport) -> String {
    serde_json::to_string_pretty(report).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// `tessera inspect` as a table: one row per card with its allocated and
/// total memory and cores, then one row per further container holding a
/// share of it; warnings at the end.
pub fn render_inspect_table(report: &Report) -> String {
    let mut rows = vec![[
        "NODE",
        "IDX",
        "CARD",
        "TYPE",
        "HEALTH",
        "MEMORY(MiB)",
        "CORES(%)",
        "POD",
        "CONTAINER",
        "POD MEMORY(MiB)",
        "POD CORES(%)",
    ]
    .map(String::from)
    .to_vec()];
    for node in &report.nodes {
        for card in &node.cards {
            let mut row = vec![
                node.name.clone(),
                card.index.to_string(),
                card.uuid.clone(),
                card.device_type.trim_start_matches("NVIDIA-").to_owned(),
                if card.healthy { "ok" } else { "unhealthy" }.to_owned(),
                format!("{}/{}", card.allocated_memory_mib, card.memory_mib),
                format!("{}/{}", card.allocated_cores, card.cores),
            ];
            match card.holders.split_first() {
                None => row.extend(["-", "-", "-", "-"].map(String::from)),
                Some((first, rest)) => {
                    row.extend([
                        first.pod.clone(),
                        first.container.clone(),
                        first.memory_mib.to_string(),
                        first.cores.to_string(),
                    ]);
                    rows.push(row);
                    for holder in rest {
                        let mut more = vec![String::new(); 7];
                        more.extend([
                            holder.pod.clone(),
                            holder.container.clone(),
                            holder.memory_mib.to_string(),
                            holder.cores.to_string(),
                        ]);
                        rows.push(more);
                    }
                    continue;
                }
            }
            rows.push(row);
        }
    }
    let mut out = String::new();
    if report.nodes.is_empty() {
        out.push_str("No GPU nodes: no node carries the hami.io/node-nvidia-register annotation (is the node agent running?).\n");
    } else {
        out.push_str(&table(&rows));
    }
    for warning in &report.warnings {
        let _ = writeln!(out, "warning: {warning}");
    }
    out
}

/// `tessera inspect --output json` (stable: fields are only ever added).
pub fn render_inspect_json(report: &Report) -> String {
    serde_json::to_string_pretty(report).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}
