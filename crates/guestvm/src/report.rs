//! Parses what `scripts/run-vm.sh` prints on stdout: a summary written by the script, then the
//! stream the guest's `/init` (`scripts/guest-init.sh`) sent over its results port.
//!
//! ```text
//! accel=tcg
//! status=ok
//! reason=
//! elapsed=4.5
//! @@GUESTVM RESULTS
//! @@GUESTVM BEGIN facts
//! key=value ...
//! @@GUESTVM END facts
//! @@GUESTVM BEGIN cmd 000-name
//! output ...
//! @@GUESTVM END cmd 000-name rc=0
//! @@GUESTVM BEGIN fio
//! {json}
//! @@GUESTVM END fio rc=0
//! @@GUESTVM BEGIN fio-log
//! fio's stderr
//! @@GUESTVM END fio-log
//! @@GUESTVM DONE
//! ```
//!
//! A guest asked to reboot prints `@@GUESTVM REBOOT` and then the sections of its next boot.
//!
//! Only `/init` writes to the results port, so anything outside a section that is not a marker
//! means the stream is corrupt and is an error.

use std::collections::BTreeMap;

use serde_json::Value;

const MARK: &str = "@@GUESTVM ";
const RESULTS: &str = "@@GUESTVM RESULTS";

/// Why the output of a run could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("the summary has no {0} line")]
    MissingSummary(&'static str),
    #[error("unknown summary line {0:?}")]
    BadSummaryLine(String),
    #[error("section {0:?} has no end marker (output truncated?)")]
    Unterminated(String),
    #[error("section {section:?} ends with {found:?}")]
    BadEnd { section: String, found: String },
    #[error("bad exit code in {0:?}")]
    BadExitCode(String),
    #[error("fact line {0:?} is not key=value")]
    BadFact(String),
    #[error("section {0:?} appears twice")]
    Duplicate(String),
    #[error("unexpected line outside any section: {0:?}")]
    UnexpectedLine(String),
    #[error("unknown marker {0:?}")]
    UnknownMarker(String),
}

/// What the host-side script says about the run.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub accel: String,
    /// ok, timeout, panic, qemu, guest-error, missing-output or fio.
    pub status: String,
    pub reason: String,
    /// Wall time of the QEMU process in seconds.
    pub elapsed_seconds: Option<f64>,
}

/// One shell snippet run in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    /// The name given to `--pre`/`--cmd`, without the order prefix the script adds.
    pub name: String,
    /// stdout and stderr, interleaved.
    pub output: String,
    pub exit_code: i32,
}

/// fio's result.
#[derive(Debug, Clone, PartialEq)]
pub struct FioOutput {
    pub exit_code: i32,
    /// The JSON document, if fio wrote one.
    pub json: Option<Value>,
    /// Text fio wrote to its output file ahead of the JSON (warnings).
    pub preamble: String,
}

/// What one boot of the guest reported.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BootReport {
    pub facts: BTreeMap<String, String>,
    pub facts_seen: bool,
    pub commands: Vec<CommandOutput>,
    pub fio: Option<FioOutput>,
    pub fio_log: Option<String>,
}

/// Everything one run reported.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub summary: Summary,
    /// One entry per boot, in order; the first is always there.
    pub boots: Vec<BootReport>,
    /// The guest's `@@GUESTVM ERROR` message, if it gave up.
    pub guest_error: Option<String>,
    /// The guest got to its last line.
    pub done: bool,
}

/// Parses the whole stdout of `scripts/run-vm.sh`.
pub fn parse(text: &str) -> Result<Report, ParseError> {
    let mut lines = text.lines().map(|l| l.strip_suffix('\r').unwrap_or(l));
    let summary = parse_summary(&mut lines)?;
    let mut report = Report {
        summary,
        boots: vec![BootReport::default()],
        guest_error: None,
        done: false,
    };
    parse_stream(&mut lines, &mut report)?;
    Ok(report)
}

fn parse_summary<'a>(lines: &mut impl Iterator<Item = &'a str>) -> Result<Summary, ParseError> {
    let (mut accel, mut status, mut reason, mut elapsed) = (None, None, None, None);
    for line in lines.by_ref() {
        if line == RESULTS {
            return Ok(Summary {
                accel: accel.ok_or(ParseError::MissingSummary("accel="))?,
                status: status.ok_or(ParseError::MissingSummary("status="))?,
                reason: reason.unwrap_or_default(),
                elapsed_seconds: elapsed,
            });
        }
        match line.split_once('=') {
            Some(("accel", v)) => accel = Some(v.to_string()),
            Some(("status", v)) => status = Some(v.to_string()),
            Some(("reason", v)) => reason = Some(v.to_string()),
            Some(("elapsed", v)) => elapsed = v.parse::<f64>().ok(),
            _ => return Err(ParseError::BadSummaryLine(line.to_string())),
        }
    }
    Err(ParseError::MissingSummary(RESULTS))
}

fn parse_stream<'a>(
    lines: &mut impl Iterator<Item = &'a str>,
    report: &mut Report,
) -> Result<(), ParseError> {
    while let Some(line) = lines.next() {
        let Some(boot) = report.boots.last_mut() else {
            return Err(ParseError::Unterminated("boot".into()));
        };
        let Some(marker) = line.strip_prefix(MARK) else {
            // Blank lines between sections carry nothing; anything else is corruption.
            if line.trim().is_empty() {
                continue;
            }
            return Err(ParseError::UnexpectedLine(line.to_string()));
        };
        if marker == "DONE" {
            report.done = true;
        } else if marker == "REBOOT" {
            report.boots.push(BootReport::default());
        } else if let Some(message) = marker.strip_prefix("ERROR ") {
            report.guest_error = Some(message.to_string());
        } else if marker == "BEGIN facts" {
            if boot.facts_seen {
                return Err(ParseError::Duplicate("facts".into()));
            }
            boot.facts_seen = true;
            let (body, _) = read_section(lines, "facts")?;
            for fact in body {
                let (key, value) = fact
                    .split_once('=')
                    .filter(|(k, _)| !k.is_empty())
                    .ok_or_else(|| ParseError::BadFact(fact.to_string()))?;
                boot.facts.insert(key.to_string(), value.to_string());
            }
        } else if marker == "BEGIN fio" {
            if boot.fio.is_some() {
                return Err(ParseError::Duplicate("fio".into()));
            }
            let (body, rest) = read_section(lines, "fio")?;
            let exit_code = parse_rc("fio", rest)?;
            boot.fio = Some(parse_fio(&body.join("\n"), exit_code));
        } else if marker == "BEGIN fio-log" {
            if boot.fio_log.is_some() {
                return Err(ParseError::Duplicate("fio-log".into()));
            }
            let (body, _) = read_section(lines, "fio-log")?;
            boot.fio_log = Some(join_output(&body));
        } else if let Some(full_name) = marker.strip_prefix("BEGIN cmd ") {
            let section = format!("cmd {full_name}");
            let (body, rest) = read_section(lines, &section)?;
            let exit_code = parse_rc(&section, rest)?;
            // The script prefixes names with their position ("000-") to keep them in order.
            let name = match full_name.split_once('-') {
                Some((order, name)) if order.bytes().all(|b| b.is_ascii_digit()) => name,
                _ => full_name,
            };
            boot.commands.push(CommandOutput {
                name: name.to_string(),
                output: join_output(&body),
                exit_code,
            });
        } else {
            return Err(ParseError::UnknownMarker(line.to_string()));
        }
    }
    Ok(())
}

/// Reads the lines up to `@@GUESTVM END <section>`; returns them and what follows the name on
/// the end line (e.g. " rc=0").
fn read_section<'a>(
    lines: &mut impl Iterator<Item = &'a str>,
    section: &str,
) -> Result<(Vec<&'a str>, &'a str), ParseError> {
    let end = format!("{MARK}END {section}");
    let mut body = Vec::new();
    for line in lines.by_ref() {
        if let Some(rest) = line.strip_prefix(end.as_str()) {
            if rest.is_empty() || rest.starts_with(' ') {
                return Ok((body, rest));
            }
        }
        if line.starts_with(MARK) && line.contains(" END ") {
            return Err(ParseError::BadEnd {
                section: section.to_string(),
                found: line.to_string(),
            });
        }
        body.push(line);
    }
    Err(ParseError::Unterminated(section.to_string()))
}

fn parse_rc(section: &str, rest: &str) -> Result<i32, ParseError> {
    rest.trim()
        .strip_prefix("rc=")
        .and_then(|rc| rc.parse().ok())
        .ok_or_else(|| ParseError::BadExitCode(format!("{section}{rest}")))
}

fn join_output(body: &[&str]) -> String {
    let mut text = body.join("\n");
    if !body.is_empty() {
        text.push('\n');
    }
    text
}

/// fio may print warnings into its output file ahead of the JSON document.
fn parse_fio(text: &str, exit_code: i32) -> FioOutput {
    let json_start = text
        .match_indices('{')
        .map(|(i, _)| i)
        .find(|&i| i == 0 || text[..i].ends_with('\n'));
    let (preamble, json) = match json_start {
        Some(start) => {
            let mut stream =
                serde_json::Deserializer::from_str(&text[start..]).into_iter::<Value>();
            (&text[..start], stream.next().and_then(Result::ok))
        }
        None => (text, None),
    };
    FioOutput {
        exit_code,
        json,
        preamble: preamble.trim().to_string(),
    }
}

/// The jobs of a fio JSON document whose `error` is not 0, as (job name, error).
pub fn fio_job_errors(json: &Value) -> Vec<(String, i64)> {
    fio_jobs(json)
        .filter_map(|job| {
            let error = job.get("error").and_then(Value::as_i64).unwrap_or(-1);
            (error != 0).then(|| (job_name(job), error))
        })
        .collect()
}

/// Bytes moved in one direction ("read", "write" or "trim") summed over all jobs.
pub fn fio_io_bytes(json: &Value, direction: &str) -> u64 {
    fio_jobs(json)
        .filter_map(|job| job.get(direction)?.get("io_bytes")?.as_u64())
        .sum()
}

/// The number of jobs in a fio JSON document.
pub fn fio_job_count(json: &Value) -> usize {
    fio_jobs(json).count()
}

fn fio_jobs(json: &Value) -> impl Iterator<Item = &Value> {
    json.get("jobs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

fn job_name(job: &Value) -> String {
    job.get("jobname")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUMMARY: &str = "accel=tcg\nstatus=ok\nreason=\nelapsed=4.5\n@@GUESTVM RESULTS\n";

    fn with_summary(stream: &str) -> String {
        format!("{SUMMARY}{stream}")
    }

    #[test]
    fn parses_a_complete_run() {
        let text = with_summary(
            "@@GUESTVM BEGIN facts\nro=0\nwrite_cache=write back\nserial=\n@@GUESTVM END facts\n\
             @@GUESTVM BEGIN cmd 000-zeroes\nabc\ndef\n@@GUESTVM END cmd 000-zeroes rc=0\n\
             @@GUESTVM BEGIN fio\nfio: a warning\n{\"jobs\": [{\"jobname\": \"a\", \"error\": 0,\
             \"write\": {\"io_bytes\": 4096}}]}\n\n@@GUESTVM END fio rc=0\n\
             @@GUESTVM BEGIN fio-log\n\n@@GUESTVM END fio-log\n\
             @@GUESTVM BEGIN cmd 001-after-fio\n@@GUESTVM END cmd 001-after-fio rc=3\n\
             @@GUESTVM DONE\n",
        );
        let report = parse(&text).expect("parse");
        assert_eq!(report.summary.accel, "tcg");
        assert_eq!(report.summary.status, "ok");
        assert_eq!(report.summary.elapsed_seconds, Some(4.5));
        assert_eq!(report.boots[0].facts["ro"], "0");
        assert_eq!(report.boots[0].facts["write_cache"], "write back");
        assert_eq!(report.boots[0].facts["serial"], "");
        assert_eq!(
            report.boots[0].commands,
            vec![
                CommandOutput {
                    name: "zeroes".into(),
                    output: "abc\ndef\n".into(),
                    exit_code: 0
                },
                CommandOutput {
                    name: "after-fio".into(),
                    output: String::new(),
                    exit_code: 3
                },
            ]
        );
        let fio = report.boots[0].fio.clone().expect("fio section");
        assert_eq!(fio.exit_code, 0);
        assert_eq!(fio.preamble, "fio: a warning");
        let json = fio.json.expect("fio json");
        assert_eq!(fio_io_bytes(&json, "write"), 4096);
        assert_eq!(fio_io_bytes(&json, "read"), 0);
        assert!(fio_job_errors(&json).is_empty());
        assert!(report.done);
        assert_eq!(report.guest_error, None);
    }

    #[test]
    fn truncated_section_is_an_error() {
        let text = with_summary("@@GUESTVM BEGIN fio\n{\"jobs\": [\n");
        assert_eq!(parse(&text), Err(ParseError::Unterminated("fio".into())));
    }

    #[test]
    fn run_without_done_marker_is_not_done() {
        let text = with_summary("@@GUESTVM BEGIN facts\nro=1\n@@GUESTVM END facts\n");
        let report = parse(&text).expect("parse");
        assert!(!report.done);
        assert_eq!(report.boots[0].facts["ro"], "1");
    }

    #[test]
    fn guest_error_is_reported() {
        let text = with_summary("@@GUESTVM ERROR no disk /dev/vda after 20 s\n");
        let report = parse(&text).expect("parse");
        assert_eq!(
            report.guest_error.as_deref(),
            Some("no disk /dev/vda after 20 s")
        );
        assert!(!report.done);
    }

    #[test]
    fn missing_summary_is_an_error() {
        assert_eq!(
            parse("@@GUESTVM DONE\n"),
            Err(ParseError::BadSummaryLine("@@GUESTVM DONE".into()))
        );
        assert_eq!(
            parse("accel=tcg\n"),
            Err(ParseError::MissingSummary(RESULTS))
        );
        assert_eq!(
            parse("accel=tcg\n@@GUESTVM RESULTS\n"),
            Err(ParseError::MissingSummary("status="))
        );
    }

    #[test]
    fn stray_text_outside_sections_is_an_error() {
        let text = with_summary("garbage\n@@GUESTVM DONE\n");
        assert_eq!(
            parse(&text),
            Err(ParseError::UnexpectedLine("garbage".into()))
        );
    }

    #[test]
    fn mismatched_end_marker_is_an_error() {
        let text = with_summary("@@GUESTVM BEGIN cmd 000-a\nx\n@@GUESTVM END cmd 000-b rc=0\n");
        assert!(matches!(parse(&text), Err(ParseError::BadEnd { .. })));
    }

    #[test]
    fn end_marker_without_rc_is_an_error() {
        let text = with_summary("@@GUESTVM BEGIN cmd 000-a\n@@GUESTVM END cmd 000-a\n");
        assert!(matches!(parse(&text), Err(ParseError::BadExitCode(_))));
    }

    #[test]
    fn command_name_prefix_must_be_an_end_marker_prefix_not_a_substring() {
        // "cmd 000-a" must not be closed by the end marker of "cmd 000-ab".
        let text = with_summary("@@GUESTVM BEGIN cmd 000-a\n@@GUESTVM END cmd 000-ab rc=0\n");
        assert!(matches!(parse(&text), Err(ParseError::BadEnd { .. })));
    }

    #[test]
    fn bad_fact_line_is_an_error() {
        let text = with_summary("@@GUESTVM BEGIN facts\nnot a fact\n@@GUESTVM END facts\n");
        assert_eq!(parse(&text), Err(ParseError::BadFact("not a fact".into())));
    }

    #[test]
    fn fio_failure_without_json_is_kept() {
        let text = with_summary(
            "@@GUESTVM BEGIN fio\n\n@@GUESTVM END fio rc=1\n@@GUESTVM BEGIN fio-log\n\
             fio: verify failed\n@@GUESTVM END fio-log\n@@GUESTVM DONE\n",
        );
        let report = parse(&text).expect("parse");
        let fio = report.boots[0].fio.clone().expect("fio section");
        assert_eq!(fio.exit_code, 1);
        assert_eq!(fio.json, None);
        assert_eq!(
            report.boots[0].fio_log.as_deref(),
            Some("fio: verify failed\n")
        );
    }

    #[test]
    fn fio_job_errors_lists_failed_jobs() {
        let json: Value = serde_json::from_str(
            r#"{"jobs": [{"jobname": "ok", "error": 0}, {"jobname": "bad", "error": 84}, {"jobname": "odd"}]}"#,
        )
        .expect("json");
        assert_eq!(
            fio_job_errors(&json),
            vec![("bad".to_string(), 84), ("odd".to_string(), -1)]
        );
        assert_eq!(fio_job_count(&json), 3);
    }

    #[test]
    fn each_boot_gets_its_own_sections() {
        let text = with_summary(
            "@@GUESTVM BEGIN facts\nboot=0\n@@GUESTVM END facts\n\
             @@GUESTVM BEGIN cmd 000-a\nfirst\n@@GUESTVM END cmd 000-a rc=0\n\
             @@GUESTVM REBOOT\n\
             @@GUESTVM BEGIN facts\nboot=1\n@@GUESTVM END facts\n\
             @@GUESTVM BEGIN cmd 000-a\nsecond\n@@GUESTVM END cmd 000-a rc=1\n\
             @@GUESTVM DONE\n",
        );
        let report = parse(&text).expect("parse");
        assert_eq!(report.boots.len(), 2);
        assert_eq!(report.boots[0].facts["boot"], "0");
        assert_eq!(report.boots[1].facts["boot"], "1");
        assert_eq!(report.boots[0].commands[0].output, "first\n");
        assert_eq!(report.boots[1].commands[0].output, "second\n");
        assert_eq!(report.boots[1].commands[0].exit_code, 1);
        assert!(report.done);
    }

    #[test]
    fn two_facts_sections_in_one_boot_are_an_error() {
        let text = with_summary(
            "@@GUESTVM BEGIN facts\n@@GUESTVM END facts\n@@GUESTVM BEGIN facts\n@@GUESTVM END facts\n",
        );
        assert_eq!(parse(&text), Err(ParseError::Duplicate("facts".into())));
    }

    #[test]
    fn crlf_line_endings_are_accepted() {
        let text = with_summary(
            "@@GUESTVM BEGIN facts\r\nro=1\r\n@@GUESTVM END facts\r\n@@GUESTVM DONE\r\n",
        );
        let report = parse(&text).expect("parse");
        assert_eq!(report.boots[0].facts["ro"], "1");
        assert!(report.done);
    }
}
