//! What the components' `/metrics` must look like: a strict checker of the
//! OpenMetrics 1.0 text format ([`parse_strict`]) and HAMi's metric
//! reference ([`hami_reference`], parsed from
//! `testkit/fixtures/hami-metrics.md`, HAMi v2.10's names, label names and
//! help texts per component).
//!
//! The checker runs the text through two parsers and fails if either
//! refuses it: the `openmetrics-parser` crate's OpenMetrics parser (which
//! follows the OpenMetrics test suite; the tests below show it refusing
//! interleaved families, a family given twice and a missing `# EOF`), and
//! our own walk, which keeps the label order (the comparison with HAMi
//! needs it) and checks: only `# HELP`/`# TYPE`/`# UNIT`
//! comments and a final `# EOF` with nothing after it; metadata before a
//! family's samples and at most once per family; every family in one
//! contiguous block (no name seen again once another family started);
//! sample names that belong to their family's type (`_total`/`_created` for
//! counters, `_bucket`/`_count`/`_sum`/`_created` for histograms, ...);
//! valid metric and label names, escapes, no repeated label name, no
//! repeated label set; values that parse as floats, counters not negative;
//! counter families not named `..._total`.

use std::collections::{BTreeMap, BTreeSet};

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Its full name (with any `_total`, `_bucket`, ... suffix).
    pub name: String,
    /// Label names and values, in written order.
    pub labels: Vec<(String, String)>,
    /// Its value.
    pub value: f64,
}

impl Sample {
    /// The label names, in written order.
    pub fn label_names(&self) -> Vec<&str> {
        self.labels.iter().map(|(name, _)| name.as_str()).collect()
    }

    /// The value of label `name`, if it has one.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One metric family.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricFamily {
    /// Family name.
    pub name: String,
    /// `# TYPE` (`unknown` when none was given).
    pub kind: String,
    /// `# HELP` text, unescaped.
    pub help: Option<String>,
    /// Its samples, in order.
    pub samples: Vec<Sample>,
}

/// A whole exposition, families in order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Exposition {
    /// The families.
    pub families: Vec<MetricFamily>,
}

impl Exposition {
    /// The family named `name`.
    pub fn family(&self, name: &str) -> Option<&MetricFamily> {
        self.families.iter().find(|f| f.name == name)
    }
}

const TYPES: &[&str] = &[
    "counter",
    "gauge",
    "histogram",
    "gaugehistogram",
    "stateset",
    "info",
    "summary",
    "unknown",
];

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Suffixes a sample of a family of `kind` may add to the family name.
fn sample_suffixes(kind: &str) -> &'static [&'static str] {
    match kind {
        "counter" => &["_total", "_created"],
        "histogram" => &["_bucket", "_count", "_sum", "_created"],
        "gaugehistogram" => &["_bucket", "_gcount", "_gsum"],
        "summary" => &["", "_count", "_sum", "_created"],
        "info" => &["_info"],
        _ => &[""],
    }
}

fn parse_value(text: &str) -> Option<f64> {
    match text {
        "NaN" => Some(f64::NAN),
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => text.parse().ok(),
    }
}

/// Label names and values, in written order.
type Labels = Vec<(String, String)>;

/// Parses `{a="b",c="d"}` at the start of `rest`; returns the labels and
/// what follows the closing brace.
fn parse_labels(rest: &str) -> Result<(Labels, &str), String> {
    let mut labels = Vec::new();
    let mut rest = rest
        .strip_prefix('{')
        .ok_or_else(|| "labels must start with `{`".to_owned())?;
    if let Some(after) = rest.strip_prefix('}') {
        return Ok((labels, after));
    }
    loop {
        let eq = rest
            .find('=')
            .ok_or_else(|| format!("label without `=` in `{rest}`"))?;
        let name = &rest[..eq];
        if !is_label_name(name) {
            return Err(format!("invalid label name `{name}`"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or_else(|| format!("the value of label `{name}` is not quoted"))?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err(format!("unterminated value of label `{name}`")),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => {
                        return Err(format!(
                            "invalid escape `\\{}` in label `{name}`",
                            other.map_or(String::new(), |(_, c)| c.to_string())
                        ))
                    }
                },
                Some((_, '\n')) => return Err(format!("raw newline in label `{name}`")),
                Some((_, c)) => value.push(c),
            }
        };
        if labels.iter().any(|(n, _): &(String, String)| n == name) {
            return Err(format!("label `{name}` given twice"));
        }
        labels.push((name.to_owned(), value));
        rest = &rest[end + 1..];
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        rest = rest
            .strip_prefix(',')
            .ok_or_else(|| format!("expected `,` or `}}` after label `{name}`"))?;
        if rest.starts_with('}') {
            return Err("trailing `,` before `}`".to_owned());
        }
    }
}

/// Checks `text` against the OpenMetrics 1.0 text format strictly (see the
/// module doc) and returns its families, or every line that is wrong.
pub fn parse_strict(text: &str) -> Result<Exposition, Vec<String>> {
    let mut errors = Vec::new();
    if let Err(e) = openmetrics_parser::openmetrics::parse_openmetrics(text) {
        errors.push(format!("openmetrics-parser refuses it: {e:?}"));
    }
    let mut exposition = Exposition::default();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut sample_keys: BTreeSet<(String, Vec<(String, String)>)> = BTreeSet::new();
    let mut eof = false;
    if !text.ends_with('\n') {
        errors.push("the exposition does not end in a newline".to_owned());
    }
    for (number, line) in text.lines().enumerate() {
        let number = number + 1;
        let mut fail = |what: String| errors.push(format!("line {number} `{line}`: {what}"));
        if eof {
            fail("content after `# EOF`".to_owned());
            continue;
        }
        if line == "# EOF" {
            eof = true;
            continue;
        }
        if line.is_empty() {
            fail("empty line".to_owned());
            continue;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.splitn(3, ' ');
            let keyword = words.next().unwrap_or("");
            let name = words.next().unwrap_or("");
            let rest = words.next();
            if !["HELP", "TYPE", "UNIT"].contains(&keyword) {
                fail("only # HELP, # TYPE, # UNIT and # EOF comments are allowed".to_owned());
                continue;
            }
            if !is_metric_name(name) {
                fail(format!("invalid metric name `{name}`"));
                continue;
            }
            let current = exposition.families.last_mut().filter(|f| f.name == name);
            let family = match current {
                Some(family) if family.samples.is_empty() => family,
                Some(_) => {
                    fail(format!("# {keyword} for `{name}` after its samples"));
                    continue;
                }
                None => {
                    if !seen.insert(name.to_owned()) {
                        fail(format!(
                            "family `{name}` appears again after another family: each family must be one block"
                        ));
                        continue;
                    }
                    exposition.families.push(MetricFamily {
                        name: name.to_owned(),
                        kind: "unknown".to_owned(),
                        help: None,
                        samples: Vec::new(),
                    });
                    exposition.families.last_mut().expect("just pushed")
                }
            };
            match keyword {
                "HELP" => {
                    if family.help.is_some() {
                        fail(format!("second # HELP for `{name}`"));
                    }
                    family.help = Some(
                        rest.unwrap_or("")
                            .replace("\\n", "\n")
                            .replace("\\\\", "\\"),
                    );
                }
                "TYPE" => {
                    let kind = rest.unwrap_or("");
                    if !TYPES.contains(&kind) {
                        fail(format!("unknown type `{kind}`"));
                    } else if family.kind != "unknown" {
                        fail(format!("second # TYPE for `{name}`"));
                    } else if kind == "counter" && name.ends_with("_total") {
                        fail("a counter family's name must not end in `_total`".to_owned());
                    }
                    family.kind = kind.to_owned();
                }
                _ => {
                    if rest.is_none_or(|unit| !name.ends_with(&format!("_{unit}"))) {
                        fail("a family with a # UNIT must be named `..._<unit>`".to_owned());
                    }
                }
            }
            continue;
        }
        if line.starts_with('#') {
            fail("a comment must be `# HELP`, `# TYPE`, `# UNIT` or `# EOF`".to_owned());
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        if !is_metric_name(name) {
            fail(format!("invalid metric name `{name}`"));
            continue;
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            match parse_labels(&line[name_end..]) {
                Ok(parsed) => parsed,
                Err(e) => {
                    fail(e);
                    continue;
                }
            }
        } else {
            (Vec::new(), &line[name_end..])
        };
        let Some(rest) = rest.strip_prefix(' ') else {
            fail("expected one space before the value".to_owned());
            continue;
        };
        let mut parts = rest.split(" # ").next().unwrap_or("").split(' ');
        let value_text = parts.next().unwrap_or("");
        let Some(value) = parse_value(value_text) else {
            fail(format!("value `{value_text}` is not a number"));
            continue;
        };
        if let Some(timestamp) = parts.next() {
            if timestamp.parse::<f64>().is_err() {
                fail(format!("timestamp `{timestamp}` is not a number"));
            }
        }
        if parts.next().is_some() {
            fail("unexpected text after the timestamp".to_owned());
        }
        let belongs = |family: &MetricFamily| {
            sample_suffixes(&family.kind)
                .iter()
                .any(|suffix| name.strip_suffix(suffix) == Some(family.name.as_str()))
        };
        let in_current = exposition.families.last().is_some_and(&belongs);
        if !in_current {
            if exposition
                .families
                .iter()
                .any(|f| belongs(f) || f.name == name)
            {
                fail(format!(
                    "sample `{name}` outside its family's block (families interleaved)"
                ));
                continue;
            }
            if !seen.insert(name.to_owned()) {
                fail(format!("family `{name}` appears twice"));
                continue;
            }
            exposition.families.push(MetricFamily {
                name: name.to_owned(),
                kind: "unknown".to_owned(),
                help: None,
                samples: Vec::new(),
            });
        }
        let family = exposition.families.last_mut().expect("a current family");
        if family.kind == "counter" && name.ends_with("_total") && (value.is_nan() || value < 0.0) {
            fail(format!("counter value {value} is negative or NaN"));
        }
        let mut key_labels = labels.clone();
        key_labels.sort();
        if !sample_keys.insert((name.to_owned(), key_labels)) {
            fail("the same series twice".to_owned());
        }
        family.samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    if !eof {
        errors.push("no `# EOF` at the end".to_owned());
    }
    if errors.is_empty() {
        Ok(exposition)
    } else {
        Err(errors)
    }
}

/// Which HAMi component exports a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum HamiComponent {
    /// `cmd/scheduler/metrics.go`: Tessera's scheduler.
    Scheduler,
    /// `cmd/vGPUmonitor/metrics.go`: Tessera's node agent.
    Monitor,
}

/// One family of HAMi's reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferenceFamily {
    /// Which component exports it.
    pub component: HamiComponent,
    /// Metric name.
    pub name: String,
    /// Label names, in HAMi's order.
    pub labels: Vec<String>,
    /// Help text.
    pub help: String,
}

impl ReferenceFamily {
    /// True for the CamelCase names HAMi exports only in legacy mode.
    pub fn is_legacy(&self) -> bool {
        !self.name.starts_with("hami_")
    }
}

/// The reference file, as copied from the shared reference.
pub const HAMI_REFERENCE_TEXT: &str = include_str!("../fixtures/hami-metrics.md");

/// HAMi's families, from [`HAMI_REFERENCE_TEXT`]: the bullet lines
/// ``- `name` | label, label | help`` under `## cmd/scheduler/...` and
/// `## cmd/vGPUmonitor/...`.
///
/// # Panics
/// When a bullet line is not in that form or sits under another heading
/// (the fixture changed shape: fix the parser with it).
pub fn hami_reference() -> Vec<ReferenceFamily> {
    let mut component = None;
    let mut families = Vec::new();
    for line in HAMI_REFERENCE_TEXT.lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            component = if heading.contains("cmd/scheduler/") {
                Some(HamiComponent::Scheduler)
            } else if heading.contains("cmd/vGPUmonitor/") {
                Some(HamiComponent::Monitor)
            } else {
                None
            };
            continue;
        }
        let Some(bullet) = line.strip_prefix("- ") else {
            continue;
        };
        let component =
            component.unwrap_or_else(|| panic!("bullet `{line}` outside a component section"));
        let fields: Vec<&str> = bullet.splitn(3, " | ").collect();
        let [name, labels, help] = fields[..] else {
            panic!("bullet `{line}` is not `name | labels | help`");
        };
        families.push(ReferenceFamily {
            component,
            name: name.trim_matches('`').to_owned(),
            labels: labels.split(',').map(|l| l.trim().to_owned()).collect(),
            help: help.trim().to_owned(),
        });
    }
    families
}

/// Compares an exposition of `component` against HAMi's reference: every
/// reference family of that component (legacy ones only when `legacy`),
/// except those in `without_series` (families with no series are not
/// written, as in HAMi, and a test cannot populate every one), must be
/// exported as a gauge with HAMi's help text, every sample of every HAMi
/// family must carry exactly HAMi's label names in HAMi's order, and no
/// family outside the reference may use HAMi's names (anything not
/// `tessera_*`). Returns every difference.
pub fn differences_from_hami(
    exposition: &Exposition,
    component: HamiComponent,
    legacy: bool,
    without_series: &[&str],
) -> Vec<String> {
    let reference: BTreeMap<String, ReferenceFamily> = hami_reference()
        .into_iter()
        .filter(|f| f.component == component)
        .map(|f| (f.name.clone(), f))
        .collect();
    let mut differences = Vec::new();
    for family in reference.values() {
        let Some(exposed) = exposition.family(&family.name) else {
            if (legacy || !family.is_legacy()) && !without_series.contains(&family.name.as_str()) {
                differences.push(format!("`{}` is not exported", family.name));
            }
            continue;
        };
        if family.is_legacy() && !legacy {
            differences.push(format!(
                "legacy `{}` is exported with legacy names off",
                family.name
            ));
        }
        if exposed.kind != "gauge" {
            differences.push(format!(
                "`{}` is a {}, not a gauge",
                family.name, exposed.kind
            ));
        }
        if exposed.help.as_deref() != Some(family.help.as_str()) {
            differences.push(format!(
                "`{}` has help {:?}, HAMi's is {:?}",
                family.name, exposed.help, family.help
            ));
        }
        for sample in &exposed.samples {
            if sample.label_names() != family.labels {
                differences.push(format!(
                    "`{}` has labels {:?}, HAMi's are {:?}",
                    family.name,
                    sample.label_names(),
                    family.labels
                ));
            }
        }
    }
    for family in &exposition.families {
        if !family.name.starts_with("tessera_") && !reference.contains_key(&family.name) {
            differences.push(format!(
                "`{}` is neither HAMi's (per the reference) nor Tessera's own (`tessera_*`)",
                family.name
            ));
        }
    }
    differences
}

/// Asserts that `families` (name, label names, help text, legacy flag), in
/// order, are exactly the reference's families of `component`, and that
/// exactly the names outside `hami_*` are marked legacy.
///
/// # Panics
/// On the first difference, naming it.
pub fn assert_matches_reference<'a>(
    component: HamiComponent,
    families: impl IntoIterator<Item = (&'a str, &'a [&'a str], &'a str, bool)>,
) {
    let reference: Vec<_> = hami_reference()
        .into_iter()
        .filter(|f| f.component == component)
        .map(|f| (f.name, f.labels, f.help))
        .collect();
    let mut ours = Vec::new();
    for (name, labels, help, legacy) in families {
        assert_eq!(legacy, !name.starts_with("hami_"), "{name}: legacy flag");
        ours.push((
            name.to_owned(),
            labels.iter().map(|l| (*l).to_owned()).collect::<Vec<_>>(),
            help.to_owned(),
        ));
    }
    assert_eq!(ours, reference);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        parse_strict(text).expect_err(&format!("`{text}` must be refused"))
    }

    #[test]
    fn accepts_a_valid_exposition() {
        let text = "# HELP a_bytes Some help\n# TYPE a_bytes gauge\na_bytes{x=\"1\",y=\"q\\\"\"} 2\na_bytes{x=\"2\",y=\"\"} NaN\n# TYPE b counter\nb_total 3\nb_created 1.5e9\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_count 1\nh_sum 0.5\n# EOF\n";
        let parsed = parse_strict(text).expect("valid");
        assert_eq!(parsed.families.len(), 3);
        let a = parsed.family("a_bytes").expect("a_bytes");
        assert_eq!(a.help.as_deref(), Some("Some help"));
        assert_eq!(a.samples[0].label("y"), Some("q\""));
        assert_eq!(a.samples[0].label_names(), ["x", "y"]);
    }

    #[test]
    fn refuses_interleaved_families() {
        let text = "# TYPE a gauge\n# TYPE b gauge\na 1\nb 1\n# EOF\n";
        assert!(errors(text).iter().any(|e| e.contains("interleaved")));
        let text = "# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\na{x=\"1\"} 2\n# EOF\n";
        assert!(errors(text).iter().any(|e| e.contains("interleaved")));
        let text = "# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\n# TYPE a gauge\n# EOF\n";
        assert!(errors(text).iter().any(|e| e.contains("one block")));
    }

    #[test]
    fn the_crate_parser_refuses_what_prometheus_refuses() {
        for text in [
            "# TYPE a gauge\n# TYPE b gauge\na 1\nb 1\n# EOF\n",
            "# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\na{x=\"1\"} 2\n# EOF\n",
            "# TYPE a gauge\na 1\n# TYPE a gauge\na 2\n# EOF\n",
            "# TYPE a gauge\na 1\n",
        ] {
            assert!(
                errors(text)
                    .iter()
                    .any(|e| e.starts_with("openmetrics-parser refuses it")),
                "{text:?}"
            );
        }
    }

    #[test]
    fn refuses_metadata_out_of_place() {
        assert!(errors("# TYPE a gauge\na 1\n# HELP a late\n# EOF\n")
            .iter()
            .any(|e| e.contains("after its samples")));
        assert!(errors("# TYPE a gauge\n# TYPE a counter\n# EOF\n")
            .iter()
            .any(|e| e.contains("second # TYPE")));
        assert!(errors("# TYPE a_total counter\n# EOF\n")
            .iter()
            .any(|e| e.contains("_total")));
        assert!(errors("# TYPE a gauge\n# some comment\n# EOF\n")
            .iter()
            .any(|e| e.contains("comment")));
    }

    #[test]
    fn refuses_bad_samples_and_a_missing_eof() {
        assert!(errors("# TYPE a gauge\na 1\n")
            .iter()
            .any(|e| e.contains("EOF")));
        assert!(errors("# TYPE a gauge\na 1\n# EOF\na 2\n")
            .iter()
            .any(|e| e.contains("after `# EOF`")));
        assert!(errors("# TYPE a gauge\na{1x=\"a\"} 1\n# EOF\n")
            .iter()
            .any(|e| e.contains("invalid label name")));
        assert!(errors("# TYPE a gauge\na{x=\"a\",x=\"b\"} 1\n# EOF\n")
            .iter()
            .any(|e| e.contains("twice")));
        assert!(
            errors("# TYPE a gauge\na{x=\"a\"} 1\na{x=\"a\"} 2\n# EOF\n")
                .iter()
                .any(|e| e.contains("same series"))
        );
        assert!(errors("# TYPE a gauge\na{x=\"\\t\"} 1\n# EOF\n")
            .iter()
            .any(|e| e.contains("escape")));
        assert!(errors("# TYPE a gauge\na one\n# EOF\n")
            .iter()
            .any(|e| e.contains("not a number")));
        assert!(errors("# TYPE c counter\nc 1\n# EOF\n")
            .iter()
            .any(|e| e.contains("interleaved") || e.contains("twice")));
    }

    #[test]
    fn the_reference_lists_both_components() {
        let reference = hami_reference();
        let count = |component| {
            reference
                .iter()
                .filter(|f| f.component == component)
                .count()
        };
        assert_eq!(count(HamiComponent::Scheduler), 23);
        assert_eq!(count(HamiComponent::Monitor), 19);
        let host = reference
            .iter()
            .find(|f| f.name == "hami_host_gpu_utilization_ratio")
            .expect("listed");
        assert_eq!(
            host.labels,
            ["node", "device_index", "device_uuid", "device_type"]
        );
        assert!(!host.is_legacy());
    }

    #[test]
    fn differences_name_a_wrong_label() {
        let text = "# HELP hami_gpu_shared_count Number of containers sharing this GPU\n# TYPE hami_gpu_shared_count gauge\nhami_gpu_shared_count{nodeid=\"n\",device_uuid=\"u\",device_index=\"0\",device_type=\"t\"} 1\n# EOF\n";
        let exposition = parse_strict(text).expect("valid");
        let differences = differences_from_hami(&exposition, HamiComponent::Scheduler, false, &[]);
        assert!(
            differences
                .iter()
                .any(|d| d.contains("hami_gpu_shared_count") && d.contains("nodeid")),
            "{differences:?}"
        );
        assert!(differences
            .iter()
            .any(|d| d.contains("`hami_gpu_core_limit_ratio` is not exported")));
    }
}
