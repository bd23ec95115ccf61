//! Building metric families and encoding them in the Prometheus text format 0.0.4, with the
//! `prometheus` crate's types and text encoder.
//!
//! [`Families`] collects gauges and counters read at scrape time (nothing is cached between
//! scrapes); [`RpcDurations`] is a long-lived latency histogram by action.

use std::time::Duration;

use prometheus::core::Collector;
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{HistogramOpts, HistogramVec, TextEncoder};

/// Errors building or encoding families.
#[derive(Debug, thiserror::Error)]
pub enum FamilyError {
    /// The encoder refused a family (a bug: families are built here).
    #[error("cannot encode metric families")]
    Encode(#[source] prometheus::Error),
    /// A histogram could not be created (a bug: names and buckets are constants).
    #[error("cannot create histogram {name}")]
    Histogram {
        name: String,
        #[source]
        source: prometheus::Error,
    },
}

/// An ordered set of metric families being built for one scrape.
#[derive(Debug, Default)]
pub struct Families(Vec<MetricFamily>);

fn label_pairs(names: &[&str], values: &[&str]) -> Vec<LabelPair> {
    names
        .iter()
        .zip(values)
        .map(|(n, v)| {
            let mut l = LabelPair::default();
            l.set_name((*n).to_owned());
            l.set_value((*v).to_owned());
            l
        })
        .collect()
}

fn family(name: &str, help: &str, kind: MetricType) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_owned());
    f.set_help(help.to_owned());
    f.set_field_type(kind);
    f
}

fn gauge_metric(labels: Vec<LabelPair>, value: f64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(value);
    let mut m = Metric::from_gauge(g);
    m.set_label(labels);
    m
}

impl Families {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// A gauge without labels.
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        let mut f = family(name, help, MetricType::GAUGE);
        f.mut_metric().push(gauge_metric(Vec::new(), value));
        self.0.push(f);
    }

    /// A gauge family with `labels`, one sample per `(label values, value)`.
    pub fn gauge_vec<'a, I, V>(&mut self, name: &str, help: &str, labels: &[&str], samples: I)
    where
        I: IntoIterator<Item = (V, f64)>,
        V: AsRef<[&'a str]>,
    {
        let mut f = family(name, help, MetricType::GAUGE);
        for (values, value) in samples {
            f.mut_metric()
                .push(gauge_metric(label_pairs(labels, values.as_ref()), value));
        }
        self.0.push(f);
    }

    /// A counter without labels. The name is kept as given (Kata's counters end in
    /// `_count`, not `_total`).
    pub fn counter(&mut self, name: &str, help: &str, value: f64) {
        let mut f = family(name, help, MetricType::COUNTER);
        let mut c = Counter::default();
        c.set_value(value);
        let mut m = Metric::default();
        m.set_counter(c);
        f.mut_metric().push(m);
        self.0.push(f);
    }

    /// Appends families built elsewhere (a histogram's, a parsed agent answer's).
    pub fn extend(&mut self, families: impl IntoIterator<Item = MetricFamily>) {
        self.0.extend(families);
    }

    /// The families so far.
    pub fn as_slice(&self) -> &[MetricFamily] {
        &self.0
    }

    /// Takes the families out.
    pub fn into_vec(self) -> Vec<MetricFamily> {
        self.0
    }

    /// The text format of every non-empty family, appended to `out`.
    pub fn encode_into(&self, out: &mut String) -> Result<(), FamilyError> {
        encode_into(&self.0, out)
    }
}

/// Encodes `families` (empty ones skipped) in the text format 0.0.4, appended to `out`.
pub fn encode_into(families: &[MetricFamily], out: &mut String) -> Result<(), FamilyError> {
    let non_empty: Vec<MetricFamily> = families
        .iter()
        .filter(|f| !f.get_metric().is_empty())
        .cloned()
        .collect();
    TextEncoder::new()
        .encode_utf8(&non_empty, out)
        .map_err(FamilyError::Encode)
}

/// A latency histogram by `action` in milliseconds with Kata's buckets (1 .. 512 ms),
/// shared by clones.
#[derive(Clone, Debug)]
pub struct RpcDurations(HistogramVec);

impl RpcDurations {
    /// A histogram family `name`.
    pub fn new(name: &str, help: &str) -> Result<Self, FamilyError> {
        let opts = HistogramOpts::new(name, help).buckets(crate::names::latency_buckets_ms());
        HistogramVec::new(opts, &["action"])
            .map(Self)
            .map_err(|source| FamilyError::Histogram {
                name: name.to_owned(),
                source,
            })
    }

    /// `kata_shim_rpc_durations_histogram_milliseconds`: the Task API's RPCs.
    pub fn shim_rpc() -> Self {
        Self::new(
            crate::names::SHIM_RPC_DURATIONS,
            "Task API RPC latency, ms.",
        )
        .expect("a constant name and buckets are valid")
    }

    /// `kata_shim_agent_rpc_durations_histogram_milliseconds`: the shim's agent RPCs.
    pub fn agent_rpc() -> Self {
        Self::new(
            crate::names::SHIM_AGENT_RPC_DURATIONS,
            "Agent RPC latency, ms.",
        )
        .expect("a constant name and buckets are valid")
    }

    /// Records one call of `action` that took `elapsed`.
    pub fn observe(&self, action: &str, elapsed: Duration) {
        self.0
            .with_label_values(&[action])
            .observe(elapsed.as_secs_f64() * 1000.0);
    }

    /// The family as it stands (no family when nothing was observed yet).
    pub fn families(&self) -> Vec<MetricFamily> {
        self.0
            .collect()
            .into_iter()
            .filter(|f| !f.get_metric().is_empty())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_and_counters_encode_with_katas_names() {
        let mut f = Families::new();
        f.gauge("kata_shim_threads", "Shim threads.", 7.0);
        f.gauge_vec(
            "kata_shim_proc_status",
            "Shim status.",
            &["item"],
            [(["vmrss"], 1024.0), (["vmsize"], 2048.0)],
        );
        f.counter("kata_agent_scrape_count", "Scrapes.", 3.0);
        f.gauge_vec::<_, [&str; 1]>("kata_empty", "No samples.", &["item"], []);
        let mut text = String::new();
        f.encode_into(&mut text).unwrap();
        assert!(text.contains("# TYPE kata_shim_threads gauge\nkata_shim_threads 7\n"));
        assert!(text.contains("kata_shim_proc_status{item=\"vmrss\"} 1024\n"));
        assert!(
            text.contains("# TYPE kata_agent_scrape_count counter\nkata_agent_scrape_count 3\n")
        );
        assert!(!text.contains("kata_empty"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        let mut f = Families::new();
        f.gauge_vec("m", "h", &["l"], [(["a\"b\\c\nd"], 1.0)]);
        let mut text = String::new();
        f.encode_into(&mut text).unwrap();
        assert!(text.contains(r#"m{l="a\"b\\c\nd"} 1"#), "{text}");
    }

    #[test]
    fn durations_accumulate_in_ms_buckets() {
        let d = RpcDurations::shim_rpc();
        assert!(RpcDurations::agent_rpc().families().is_empty());
        assert!(d.families().is_empty());
        d.observe("create", Duration::from_millis(3));
        d.clone().observe("create", Duration::from_millis(300));
        let mut text = String::new();
        encode_into(&d.families(), &mut text).unwrap();
        assert!(text.contains(
            "kata_shim_rpc_durations_histogram_milliseconds_bucket{action=\"create\",le=\"4\"} 1\n"
        ));
        assert!(text.contains(
            "kata_shim_rpc_durations_histogram_milliseconds_bucket{action=\"create\",le=\"512\"} 2\n"
        ));
        assert!(text.contains(
            "kata_shim_rpc_durations_histogram_milliseconds_count{action=\"create\"} 2\n"
        ));
    }
}
