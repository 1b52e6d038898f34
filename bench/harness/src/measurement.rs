//! What every client reports for one run, whichever client it is, and how the two clients'
//! native outputs (uringblk-loadgen JSON, fio JSON) turn into it.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uringblk_loadgen::LoadgenReport;

use crate::BenchError;

/// Client-side figures of one run. Latencies are submission-to-completion, in microseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    pub iops: f64,
    pub mib_per_s: f64,
    pub lat_mean_us: f64,
    pub lat_p50_us: f64,
    pub lat_p99_us: f64,
    pub lat_p99_9_us: f64,
    /// I/Os counted in the measured window.
    pub ios: u64,
    /// Length of the measured window in seconds.
    pub runtime_s: f64,
}

impl Measurement {
    pub fn from_loadgen(report: &LoadgenReport) -> Measurement {
        let us = |ns: u64| ns as f64 / 1000.0;
        Measurement {
            iops: report.iops,
            mib_per_s: report.mib_per_s,
            lat_mean_us: report.latency.mean_ns / 1000.0,
            lat_p50_us: us(report.latency.p50_ns),
            lat_p99_us: us(report.latency.p99_ns),
            lat_p99_9_us: us(report.latency.p99_9_ns),
            ios: report.total_ios(),
            runtime_s: report.runtime_s,
        }
    }
}

/// Extracts the first JSON document from fio's stdout. fio may print warnings (e.g. "fio: ...")
/// before the JSON even with `--output-format=json`.
fn fio_json_document(stdout: &str) -> Result<Value, BenchError> {
    let start = stdout
        .find("{\n")
        .or_else(|| stdout.find('{'))
        .ok_or_else(|| BenchError::Parse("fio printed no JSON".into()))?;
    let mut stream = serde_json::Deserializer::from_str(&stdout[start..]).into_iter::<Value>();
    match stream.next() {
        Some(Ok(value)) => Ok(value),
        Some(Err(e)) => Err(BenchError::Parse(format!("fio JSON: {e}"))),
        None => Err(BenchError::Parse("fio printed no JSON".into())),
    }
}

/// Parses fio's JSON output of one job group run with `group_reporting`,
/// `unified_rw_reporting=mixed` (reads and writes summed into one "mixed" section) and
/// `lat_percentiles=1 percentile_list=50:99:99.9`.
pub fn parse_fio(stdout: &str) -> Result<Measurement, BenchError> {
    parse_fio_value(&fio_json_document(stdout)?)
}

/// As [`parse_fio`], for a JSON document already parsed (the guest's fio output).
pub fn parse_fio_value(doc: &Value) -> Result<Measurement, BenchError> {
    let bad = |what: &str| BenchError::Parse(format!("fio JSON: {what}"));
    let job = doc
        .get("jobs")
        .and_then(Value::as_array)
        .and_then(|jobs| jobs.first())
        .ok_or_else(|| bad("no jobs"))?;
    if let Some(error) = job.get("error").and_then(Value::as_i64) {
        if error != 0 {
            return Err(BenchError::Client(format!(
                "fio job failed: {}",
                std::io::Error::from_raw_os_error(error as i32)
            )));
        }
    }
    let mixed = job
        .get("mixed")
        .ok_or_else(|| bad("no \"mixed\" section (run fio with unified_rw_reporting=mixed)"))?;
    let number = |v: &Value, key: &str| -> Result<f64, BenchError> {
        v.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| bad(&format!("missing number {key}")))
    };
    let lat = mixed.get("lat_ns").ok_or_else(|| bad("no lat_ns"))?;
    let percentiles = lat
        .get("percentile")
        .ok_or_else(|| bad("no latency percentiles (run fio with lat_percentiles=1)"))?;
    // Keys are formatted like "99.900000"; compare numerically rather than by spelling.
    let percentile = |wanted: f64| -> Result<f64, BenchError> {
        percentiles
            .as_object()
            .into_iter()
            .flatten()
            .find(|(key, _)| key.parse::<f64>().is_ok_and(|p| (p - wanted).abs() < 1e-6))
            .and_then(|(_, v)| v.as_f64())
            .map(|ns| ns / 1000.0)
            .ok_or_else(|| bad(&format!("no p{wanted} latency")))
    };
    let bw_bytes = number(mixed, "bw_bytes")?;
    let runtime_ms = number(mixed, "runtime")?;
    Ok(Measurement {
        iops: number(mixed, "iops")?,
        mib_per_s: bw_bytes / (1024.0 * 1024.0),
        lat_mean_us: number(lat, "mean")? / 1000.0,
        lat_p50_us: percentile(50.0)?,
        lat_p99_us: percentile(99.0)?,
        lat_p99_9_us: percentile(99.9)?,
        ios: number(mixed, "total_ios")? as u64,
        runtime_s: runtime_ms / 1000.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured on this machine: fio 3.33, io_uring, direct=1, against a 256 MiB file.
    const RANDREAD_QD1: &str = include_str!("../fixtures/fio-3.33-randread-4k-qd1.json");
    const RANDRW_QD32_2JOBS: &str = include_str!("../fixtures/fio-3.33-randrw-4k-qd32-2jobs.json");

    #[test]
    fn parses_a_single_job_read() {
        let m = parse_fio(RANDREAD_QD1).unwrap();
        assert!((m.iops - 17948.051948).abs() < 1e-6);
        assert!((m.mib_per_s - 73519312.0 / 1048576.0).abs() < 1e-9);
        assert_eq!(m.lat_p50_us, 54.528);
        assert_eq!(m.lat_p99_us, 73.216);
        assert_eq!(m.lat_p99_9_us, 119.296);
        assert!((m.lat_mean_us - 55.449578816).abs() < 1e-9);
        assert_eq!(m.ios, 17966);
        assert_eq!(m.runtime_s, 1.001);
    }

    #[test]
    fn parses_mixed_group_of_two_jobs() {
        let m = parse_fio(RANDRW_QD32_2JOBS).unwrap();
        assert!((m.iops - 113067.932068).abs() < 1e-6);
        assert_eq!(m.lat_p50_us, 518.144);
        assert_eq!(m.lat_p99_us, 3162.112);
        assert_eq!(m.lat_p99_9_us, 4489.216);
    }

    #[test]
    fn tolerates_warnings_before_the_json() {
        let noisy = format!("fio: some warning\n{RANDREAD_QD1}");
        assert_eq!(parse_fio(&noisy).unwrap().ios, 17966);
    }

    #[test]
    fn missing_sections_are_errors_not_zeroes() {
        assert!(parse_fio("").is_err());
        assert!(parse_fio("{\"jobs\": []}").is_err());
        let without_mixed = RANDREAD_QD1.replace("\"mixed\"", "\"read\"");
        assert!(parse_fio(&without_mixed).is_err());
        let without_p99 = RANDREAD_QD1.replace("\"99.000000\"", "\"98.000000\"");
        assert!(parse_fio(&without_p99).is_err());
    }

    #[test]
    fn failed_job_is_a_client_error() {
        let failed = RANDREAD_QD1.replacen("\"error\" : 0", "\"error\" : 5", 1);
        assert!(matches!(parse_fio(&failed), Err(BenchError::Client(_))));
    }

    #[test]
    fn loadgen_report_converts_to_microseconds() {
        let report = LoadgenReport {
            socket: "s".into(),
            rw: "randread".into(),
            rwmixread: 100,
            block_size: 4096,
            iodepth: 1,
            queues: 1,
            completion: "blocking".into(),
            capacity_bytes: 1 << 30,
            region_bytes: 1 << 30,
            ramp_s: 0.0,
            runtime_s: 2.0,
            reads: 100,
            writes: 0,
            read_bytes: 409600,
            write_bytes: 0,
            iops: 50.0,
            mib_per_s: 0.2,
            latency: uringblk_loadgen::LatencySummary {
                samples: 100,
                min_ns: 1000,
                mean_ns: 2500.0,
                p50_ns: 2000,
                p99_ns: 9000,
                p99_9_ns: 12000,
                max_ns: 15000,
            },
            per_queue_ios: vec![100],
            errors: 0,
            first_error: None,
        };
        let m = Measurement::from_loadgen(&report);
        assert_eq!(
            (m.lat_p50_us, m.lat_p99_us, m.lat_p99_9_us, m.lat_mean_us),
            (2.0, 9.0, 12.0, 2.5)
        );
        assert_eq!((m.ios, m.iops), (100, 50.0));
    }
}
