//! Gauge families written by hand in the OpenMetrics text format, one block
//! per family (`# HELP`, `# TYPE`, then every sample), for the metrics whose
//! names and label names are fixed by HAMi rather than chosen by us: the
//! scheduler and the node agent describe each such family once as a
//! [`GaugeFamily`] and render its samples with [`write_gauge_family`].

use std::fmt::Write as _;

/// One gauge family: its name, help text and label names, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GaugeFamily {
    /// Metric name.
    pub name: &'static str,
    /// `# HELP` text.
    pub help: &'static str,
    /// Label names, in the order every sample carries them.
    pub labels: &'static [&'static str],
    /// True for HAMi's legacy CamelCase names, exported only when
    /// `metrics.legacyNames` is on.
    pub legacy: bool,
}

/// A family of the tables, in one line each.
pub const fn gauge_family(
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    legacy: bool,
) -> GaugeFamily {
    GaugeFamily {
        name,
        help,
        labels,
        legacy,
    }
}

/// One sample: label values (in [`GaugeFamily::labels`] order) and value.
pub type GaugeSample = (Vec<String>, f64);

/// Escapes a label value (`\`, `"`, newline).
pub fn escape_label_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Appends `family` as one block: `# HELP`, `# TYPE gauge`, then `samples`.
/// A family with no samples is not written at all, as Prometheus' Go client
/// (HAMi's) leaves out families without series.
///
/// # Panics
/// When a sample carries a different number of label values than the
/// family has label names (a programming error in the caller).
pub fn write_gauge_family(out: &mut String, family: &GaugeFamily, samples: &[GaugeSample]) {
    if samples.is_empty() {
        return;
    }
    let help = family.help.replace('\\', "\\\\").replace('\n', "\\n");
    let _ = writeln!(out, "# HELP {} {help}", family.name);
    let _ = writeln!(out, "# TYPE {} gauge", family.name);
    for (values, value) in samples {
        assert_eq!(
            values.len(),
            family.labels.len(),
            "a sample of {} carries {} label values for {} label names",
            family.name,
            values.len(),
            family.labels.len()
        );
        let labels: Vec<String> = family
            .labels
            .iter()
            .zip(values)
            .map(|(name, value)| format!("{name}=\"{}\"", escape_label_value(value)))
            .collect();
        let _ = writeln!(
            out,
            "{}{{{}}} {}",
            family.name,
            labels.join(","),
            format_value(*value)
        );
    }
}

/// A sample value as OpenMetrics writes it (`NaN`, `+Inf`, `-Inf`, or the
/// shortest decimal form).
fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_owned()
    } else if value == f64::INFINITY {
        "+Inf".to_owned()
    } else if value == f64::NEG_INFINITY {
        "-Inf".to_owned()
    } else {
        format!("{value}")
    }
}

/// Joins a hand-written exposition with one encoded by `prometheus-client`
/// (which ends in `# EOF`): the result has every family once and a single
/// `# EOF` at the end.
pub fn join_with_encoded(mut hand_written: String, encoded: &str) -> String {
    let encoded = encoded.trim_end();
    let encoded = encoded.strip_suffix("# EOF").unwrap_or(encoded);
    hand_written.push_str(encoded);
    if !hand_written.ends_with('\n') && !hand_written.is_empty() {
        hand_written.push('\n');
    }
    hand_written.push_str("# EOF\n");
    hand_written
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAMILY: GaugeFamily = GaugeFamily {
        name: "x_bytes",
        help: "Some help",
        labels: &["a", "b"],
        legacy: false,
    };

    #[test]
    fn writes_one_block_with_escaped_values() {
        let mut out = String::new();
        write_gauge_family(
            &mut out,
            &FAMILY,
            &[
                (vec!["1".into(), "q\"\\\n".into()], 2.5),
                (vec!["2".into(), "z".into()], 4_294_967_296.0),
            ],
        );
        assert_eq!(
            out,
            "# HELP x_bytes Some help\n# TYPE x_bytes gauge\nx_bytes{a=\"1\",b=\"q\\\"\\\\\\n\"} 2.5\nx_bytes{a=\"2\",b=\"z\"} 4294967296\n"
        );
    }

    #[test]
    fn a_family_without_samples_is_left_out() {
        let mut out = String::new();
        write_gauge_family(&mut out, &FAMILY, &[]);
        assert_eq!(out, "");
    }

    #[test]
    fn joining_keeps_a_single_eof_at_the_end() {
        let joined = join_with_encoded(
            "# TYPE a gauge\na 1\n".to_owned(),
            "# TYPE b counter\nb_total 1\n# EOF\n",
        );
        assert_eq!(
            joined,
            "# TYPE a gauge\na 1\n# TYPE b counter\nb_total 1\n# EOF\n"
        );
    }
}
