//! Reading the Prometheus text format 0.0.4 back into metric families, and the operations
//! on parsed families that the shim and kata-monitor need: keeping some prefixes, adding
//! labels to every sample and merging families of several sources by name.
//!
//! The shim parses what the agent answers (a guest may only report `kata_agent_*` and
//! `kata_guest_*` families, and only well-formed ones); kata-monitor parses each shim's
//! answer to add the sandbox labels and merge the families of all shims.

use std::collections::HashMap;

use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType, Quantile,
    Summary,
};

/// A text that is not in the exposition format.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// A line could not be parsed.
    #[error("line {line}: {reason}")]
    Line { line: usize, reason: String },
    /// A family was declared twice, or its samples are not contiguous.
    #[error("line {line}: family {name} appears twice")]
    Duplicate { line: usize, name: String },
    /// The text is larger than the caller accepts.
    #[error("metrics text of {size} bytes is larger than {limit} bytes")]
    TooLarge { size: usize, limit: usize },
}

fn is_name_start(c: char, colon: bool) -> bool {
    c.is_ascii_alphabetic() || c == '_' || (colon && c == ':')
}

fn is_name_char(c: char, colon: bool) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':')
}

/// Whether `s` is a valid metric name (`colon`) or label name.
pub fn valid_name(s: &str, colon: bool) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| is_name_start(c, colon)) && chars.all(|c| is_name_char(c, colon))
}

fn kind_of(word: &str) -> Option<MetricType> {
    Some(match word {
        "counter" => MetricType::COUNTER,
        "gauge" => MetricType::GAUGE,
        "histogram" => MetricType::HISTOGRAM,
        "summary" => MetricType::SUMMARY,
        // The encoder has no untyped form: such samples are kept as gauges.
        "untyped" => MetricType::GAUGE,
        _ => return None,
    })
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

fn unescape_help(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some(other) => out.push(other),
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// One sample line: name, labels, value, timestamp.
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
    timestamp: Option<i64>,
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| !is_name_char(c, true))
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if !valid_name(name, true) {
        return Err(format!("invalid metric name {name:?}"));
    }
    let mut rest = line[name_end..].trim_start();
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        loop {
            while chars.next_if(|(_, c)| *c == ' ' || *c == ',').is_some() {}
            match chars.peek() {
                Some((i, '}')) => {
                    rest = after[i + 1..].trim_start();
                    break;
                }
                None => return Err("unterminated label set".into()),
                _ => {}
            }
            let mut label = String::new();
            while let Some((_, c)) = chars.next_if(|(_, c)| is_name_char(*c, false)) {
                label.push(c);
            }
            if !valid_name(&label, false) {
                return Err(format!("invalid label name {label:?}"));
            }
            while chars.next_if(|(_, c)| *c == ' ').is_some() {}
            if chars.next().map(|(_, c)| c) != Some('=') {
                return Err(format!("label {label} without '='"));
            }
            while chars.next_if(|(_, c)| *c == ' ').is_some() {}
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {label} value is not quoted"));
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    None => return Err(format!("label {label} value is not terminated")),
                    Some((_, '"')) => break,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c @ ('\\' | '"'))) => value.push(c),
                        Some((_, c)) => {
                            value.push('\\');
                            value.push(c);
                        }
                        None => return Err(format!("label {label} value is not terminated")),
                    },
                    Some((_, c)) => value.push(c),
                }
            }
            if labels.iter().any(|(l, _)| *l == label) {
                return Err(format!("label {label} appears twice"));
            }
            labels.push((label, value));
        }
    }
    let mut words = rest.split_whitespace();
    let value = words
        .next()
        .and_then(parse_value)
        .ok_or_else(|| format!("{name}: missing or invalid value"))?;
    let timestamp = match words.next() {
        Some(t) => Some(
            t.parse()
                .map_err(|_| format!("{name}: invalid timestamp {t:?}"))?,
        ),
        None => None,
    };
    if words.next().is_some() {
        return Err(format!("{name}: trailing text"));
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
        timestamp,
    })
}

fn label_pairs(labels: &[(String, String)]) -> Vec<LabelPair> {
    labels
        .iter()
        .map(|(n, v)| {
            let mut l = LabelPair::default();
            l.set_name(n.clone());
            l.set_value(v.clone());
            l
        })
        .collect()
}

/// A family being assembled; histograms and summaries gather several lines per metric.
struct Building {
    family: MetricFamily,
    /// Metric index by label set (without `le` / `quantile`), for histograms and summaries.
    index: HashMap<Vec<(String, String)>, usize>,
    has_samples: bool,
}

impl Building {
    fn new(name: &str) -> Self {
        let mut family = MetricFamily::default();
        family.set_name(name.to_owned());
        // A family without TYPE is untyped: kept as a gauge (see `kind_of`).
        family.set_field_type(MetricType::GAUGE);
        Building {
            family,
            index: HashMap::new(),
            has_samples: false,
        }
    }

    /// Whether the sample `name` belongs to this family.
    fn owns(&self, name: &str) -> bool {
        let base = self.family.name();
        if name == base {
            return true;
        }
        let Some(suffix) = name.strip_prefix(base) else {
            return false;
        };
        match self.family.get_field_type() {
            MetricType::HISTOGRAM => matches!(suffix, "_bucket" | "_sum" | "_count"),
            MetricType::SUMMARY => matches!(suffix, "_sum" | "_count"),
            _ => false,
        }
    }

    fn metric_for(&mut self, labels: Vec<(String, String)>) -> &mut Metric {
        let metrics = self.family.mut_metric();
        let i = *self.index.entry(labels.clone()).or_insert_with(|| {
            let mut m = Metric::default();
            m.set_label(label_pairs(&labels));
            metrics.push(m);
            metrics.len() - 1
        });
        &mut self.family.mut_metric()[i]
    }

    fn add(&mut self, s: Sample) -> Result<(), String> {
        self.has_samples = true;
        let base_len = self.family.name().len();
        let suffix = s.name[base_len..].to_owned();
        match self.family.get_field_type() {
            MetricType::HISTOGRAM | MetricType::SUMMARY => {
                let special = if self.family.get_field_type() == MetricType::HISTOGRAM {
                    "le"
                } else {
                    "quantile"
                };
                let mut labels = s.labels;
                let bound = labels
                    .iter()
                    .position(|(n, _)| n == special)
                    .map(|i| labels.remove(i).1);
                let is_histogram = special == "le";
                let m = self.metric_for(labels);
                match (suffix.as_str(), bound) {
                    ("_sum", _) if is_histogram => {
                        let mut h = m.get_histogram().clone();
                        h.set_sample_sum(s.value);
                        m.set_histogram(h);
                    }
                    ("_count", _) if is_histogram => {
                        let mut h = m.get_histogram().clone();
                        h.set_sample_count(s.value as u64);
                        m.set_histogram(h);
                    }
                    ("_bucket", Some(le)) if is_histogram => {
                        let upper = parse_value(&le).ok_or(format!("invalid le {le:?}"))?;
                        if upper == f64::INFINITY {
                            // The encoder writes the +Inf bucket itself, from the count.
                            return Ok(());
                        }
                        let mut h: Histogram = m.get_histogram().clone();
                        let mut buckets = h.get_bucket().to_vec();
                        let mut b = Bucket::default();
                        b.set_upper_bound(upper);
                        b.set_cumulative_count(s.value as u64);
                        buckets.push(b);
                        h.set_bucket(buckets);
                        m.set_histogram(h);
                    }
                    ("_sum", _) => {
                        let mut x: Summary = m.get_summary().clone();
                        x.set_sample_sum(s.value);
                        m.set_summary(x);
                    }
                    ("_count", _) => {
                        let mut x: Summary = m.get_summary().clone();
                        x.set_sample_count(s.value as u64);
                        m.set_summary(x);
                    }
                    ("", Some(q)) if !is_histogram => {
                        let mut x: Summary = m.get_summary().clone();
                        let mut quantiles = x.get_quantile().to_vec();
                        let mut qq = Quantile::default();
                        qq.set_quantile(parse_value(&q).ok_or(format!("invalid quantile {q:?}"))?);
                        qq.set_value(s.value);
                        quantiles.push(qq);
                        x.set_quantile(quantiles);
                        m.set_summary(x);
                    }
                    _ => return Err(format!("{} sample {} is malformed", special, s.name)),
                }
                if let Some(t) = s.timestamp {
                    m.set_timestamp_ms(t);
                }
            }
            kind => {
                let mut m = Metric::default();
                m.set_label(label_pairs(&s.labels));
                if kind == MetricType::COUNTER {
                    let mut c = Counter::default();
                    c.set_value(s.value);
                    m.set_counter(c);
                } else {
                    let mut g = Gauge::default();
                    g.set_value(s.value);
                    m.set_gauge(g);
                }
                if let Some(t) = s.timestamp {
                    m.set_timestamp_ms(t);
                }
                self.family.mut_metric().push(m);
            }
        }
        Ok(())
    }
}

/// Parses `text` (at most `limit` bytes) into families, in their order of appearance.
/// Families without samples are dropped.
pub fn parse(text: &str, limit: usize) -> Result<Vec<MetricFamily>, ParseError> {
    if text.len() > limit {
        return Err(ParseError::TooLarge {
            size: text.len(),
            limit,
        });
    }
    let mut done: Vec<MetricFamily> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut current: Option<Building> = None;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let err = |reason: String| ParseError::Line {
            line: line_no,
            reason,
        };
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        // A new family starts with HELP/TYPE naming another name, or a foreign sample.
        let (starts, name) = if let Some(rest) = line.strip_prefix('#') {
            let mut words = rest.trim_start().splitn(3, ' ');
            match (words.next(), words.next()) {
                (Some(kw @ ("HELP" | "TYPE")), Some(name)) => {
                    if !valid_name(name, true) {
                        return Err(err(format!("{kw}: invalid metric name {name:?}")));
                    }
                    let same = current.as_ref().is_some_and(|c| c.family.name() == name);
                    (!same, name.to_owned())
                }
                _ => continue,
            }
        } else {
            let s = parse_sample(line).map_err(err)?;
            let owned = current.as_ref().is_some_and(|c| c.owns(&s.name));
            if owned {
                current
                    .as_mut()
                    .map(|c| c.add(s))
                    .transpose()
                    .map_err(err)?;
                continue;
            }
            let name = s.name.clone();
            finish(&mut done, &mut seen, current.take(), line_no)?;
            let mut b = Building::new(&name);
            if seen.contains_key(&name) {
                return Err(ParseError::Duplicate {
                    line: line_no,
                    name,
                });
            }
            b.add(s).map_err(err)?;
            current = Some(b);
            continue;
        };
        if starts {
            finish(&mut done, &mut seen, current.take(), line_no)?;
            if seen.contains_key(&name) {
                return Err(ParseError::Duplicate {
                    line: line_no,
                    name,
                });
            }
            current = Some(Building::new(&name));
        }
        let b = current.as_mut().expect("a family was just started");
        let rest = line[1..].trim_start();
        if let Some(help) = rest.strip_prefix("HELP ") {
            let text = help.split_once(' ').map(|(_, h)| h).unwrap_or("");
            b.family.set_help(unescape_help(text));
        } else if let Some(ty) = rest.strip_prefix("TYPE ") {
            if b.has_samples {
                return Err(err(format!("TYPE of {name} after its samples")));
            }
            let word = ty.split_whitespace().nth(1).unwrap_or("");
            let kind = kind_of(word).ok_or_else(|| err(format!("unknown type {word:?}")))?;
            b.family.set_field_type(kind);
        }
    }
    finish(&mut done, &mut seen, current.take(), 0)?;
    Ok(done)
}

fn finish(
    done: &mut Vec<MetricFamily>,
    seen: &mut HashMap<String, usize>,
    b: Option<Building>,
    line: usize,
) -> Result<(), ParseError> {
    let Some(b) = b else { return Ok(()) };
    let name = b.family.name().to_owned();
    if seen.contains_key(&name) {
        return Err(ParseError::Duplicate { line, name });
    }
    if b.family.get_metric().is_empty() {
        return Ok(());
    }
    seen.insert(name, done.len());
    done.push(b.family);
    Ok(())
}

/// Keeps the families whose name starts with one of `prefixes` followed by `_`.
pub fn keep_prefixes(families: Vec<MetricFamily>, prefixes: &[&str]) -> Vec<MetricFamily> {
    families
        .into_iter()
        .filter(|f| {
            prefixes.iter().any(|p| {
                f.name()
                    .strip_prefix(p)
                    .is_some_and(|rest| rest.starts_with('_'))
            })
        })
        .collect()
}

/// Puts `labels` first on every sample of `families`, replacing labels of the same name
/// the source may have set.
pub fn add_labels(families: &mut [MetricFamily], labels: &[(&str, &str)]) {
    for family in families {
        for metric in family.mut_metric() {
            let own: Vec<LabelPair> = metric
                .take_label()
                .into_iter()
                .filter(|l| !labels.iter().any(|(n, _)| *n == l.name()))
                .collect();
            let mut all: Vec<LabelPair> = labels
                .iter()
                .map(|(n, v)| {
                    let mut l = LabelPair::default();
                    l.set_name((*n).to_owned());
                    l.set_value((*v).to_owned());
                    l
                })
                .collect();
            all.extend(own);
            metric.set_label(all);
        }
    }
}

/// Merges `from` into `into` by family name: samples of a family already present are
/// appended to it. A family whose type differs from the one already present is returned
/// (not merged), so the caller can report it.
pub fn merge(into: &mut Vec<MetricFamily>, from: Vec<MetricFamily>) -> Vec<String> {
    let mut conflicts = Vec::new();
    for mut family in from {
        match into.iter_mut().find(|f| f.name() == family.name()) {
            Some(existing) if existing.get_field_type() == family.get_field_type() => {
                let metrics = family.take_metric();
                existing.mut_metric().extend(metrics);
            }
            Some(_) => conflicts.push(family.name().to_owned()),
            None => into.push(family),
        }
    }
    conflicts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::family::encode_into;

    const SAMPLE: &str = r#"# HELP kata_guest_meminfo Statistics about memory usage.
# TYPE kata_guest_meminfo gauge
kata_guest_meminfo{item="mem_total"} 2.0e+09
kata_guest_meminfo{item="mem_free"} 1024
# HELP kata_agent_scrape_count Metrics scrape count
# TYPE kata_agent_scrape_count counter
kata_agent_scrape_count 3
# HELP lat RPC latency \\ with "quotes"\nand a newline.
# TYPE lat histogram
lat_bucket{action="a",le="1"} 0
lat_bucket{action="a",le="+Inf"} 2
lat_sum{action="a"} 7.5
lat_count{action="a"} 2
lat_bucket{action="b",le="1"} 1
lat_bucket{action="b",le="+Inf"} 1
lat_sum{action="b"} 0.5
lat_count{action="b"} 1
untyped_thing{x="a\"b\\c"} NaN 1700000000000
"#;

    #[test]
    fn parses_and_reencodes_every_type() {
        let families = parse(SAMPLE, 1 << 20).unwrap();
        let names: Vec<&str> = families.iter().map(|f| f.name()).collect();
        assert_eq!(
            names,
            [
                "kata_guest_meminfo",
                "kata_agent_scrape_count",
                "lat",
                "untyped_thing"
            ]
        );
        assert_eq!(families[2].get_metric().len(), 2);
        let h = families[2].get_metric()[0].get_histogram();
        assert_eq!((h.get_sample_count(), h.get_sample_sum()), (2, 7.5));
        assert_eq!(
            families[2].help(),
            "RPC latency \\ with \"quotes\"\nand a newline."
        );
        let mut out = String::new();
        encode_into(&families, &mut out).unwrap();
        // Re-parsing the encoder's output gives the same families.
        let again = parse(&out, 1 << 20).unwrap();
        assert_eq!(again.len(), 4);
        assert!(
            out.contains("kata_guest_meminfo{item=\"mem_total\"} 2000000000\n"),
            "{out}"
        );
        assert!(
            out.contains("lat_bucket{action=\"b\",le=\"+Inf\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains(r#"untyped_thing{x="a\"b\\c"} NaN 1700000000000"#),
            "{out}"
        );
    }

    #[test]
    fn malformed_text_is_refused_with_its_line() {
        let cases = [
            ("9bad 1\n", 1, "invalid metric name"),
            ("ok{l=\"x} 1\n", 1, "not terminated"),
            ("ok{l=x} 1\n", 1, "not quoted"),
            ("ok 1\nok{a=\"b\",a=\"c\"} 2\n", 2, "appears twice"),
            ("ok one\n", 1, "invalid value"),
            ("# TYPE ok gauge\nok 1\n# TYPE ok gauge\n", 3, ""),
            ("# TYPE ok sometimes\n", 1, "unknown type"),
            ("ok 1 2 3\n", 1, "trailing"),
        ];
        for (text, line, reason) in cases {
            let err = parse(text, 1 << 20).unwrap_err();
            let shown = err.to_string();
            assert!(shown.contains(reason), "{text:?}: {shown}");
            match err {
                ParseError::Line { line: l, .. } | ParseError::Duplicate { line: l, .. } => {
                    assert_eq!(l, line, "{text:?}: {shown}")
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            parse("x 1\n", 2),
            Err(ParseError::TooLarge { size: 4, limit: 2 })
        ));
    }

    #[test]
    fn split_family_is_a_duplicate() {
        let err = parse("a 1\nb 2\na 3\n", 1 << 20).unwrap_err();
        assert!(
            matches!(err, ParseError::Duplicate { ref name, .. } if name == "a"),
            "{err}"
        );
    }

    #[test]
    fn prefixes_labels_and_merge() {
        let families = parse(SAMPLE, 1 << 20).unwrap();
        let kept = keep_prefixes(families, &["kata_agent", "kata_guest"]);
        assert_eq!(kept.len(), 2);
        assert!(keep_prefixes(kept.clone(), &["kata_age"]).is_empty());

        // A source cannot forge the labels added to it.
        let mut a = kept.clone();
        add_labels(&mut a, &[("sandbox_id", "forged")]);
        add_labels(&mut a, &[("sandbox_id", "s1")]);
        let mut b = kept;
        add_labels(&mut b, &[("sandbox_id", "s2")]);
        let mut merged = Vec::new();
        assert!(merge(&mut merged, a).is_empty());
        assert!(merge(&mut merged, b).is_empty());
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].get_metric().len(), 4);
        let mut out = String::new();
        encode_into(&merged, &mut out).unwrap();
        assert!(
            out.contains("kata_guest_meminfo{sandbox_id=\"s1\",item=\"mem_total\"}"),
            "{out}"
        );
        assert!(!out.contains("forged"), "{out}");
        assert!(
            out.contains("kata_guest_meminfo{sandbox_id=\"s2\",item=\"mem_free\"} 1024"),
            "{out}"
        );
        assert_eq!(out.matches("# TYPE kata_guest_meminfo").count(), 1);

        let mut conflicting = parse(
            "# TYPE kata_agent_scrape_count gauge\nkata_agent_scrape_count 1\n",
            100,
        )
        .unwrap();
        add_labels(&mut conflicting, &[("sandbox_id", "s3")]);
        assert_eq!(merge(&mut merged, conflicting), ["kata_agent_scrape_count"]);
    }
}
