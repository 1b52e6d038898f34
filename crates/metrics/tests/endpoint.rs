//! The endpoint over real HTTP: what a scrape returns, that promtool accepts it, that the
//! counters and the histogram say what was recorded, and that remote addresses need consent.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};

use engine::{QueueStats, StatKind};
use guestvm::testing::prometheus_sample as sample;
use metrics::{MetricsError, MetricsServer, QueueMetrics, StatsSource};

struct Fixed(Mutex<Vec<QueueMetrics>>);

impl StatsSource for Fixed {
    fn snapshot(&self) -> Vec<QueueMetrics> {
        self.0.lock().unwrap().clone()
    }
}

fn sample_stats() -> Vec<QueueMetrics> {
    let mut q0 = QueueStats::default();
    q0.record(StatKind::Read, 4096, true, 30);
    q0.record(StatKind::Read, 4096, true, 70);
    q0.record(StatKind::Read, 4096, false, 20_000);
    q0.record(StatKind::Write, 8192, true, 120);
    q0.merged = 5;
    let mut q1 = QueueStats::default();
    q1.record(StatKind::Flush, 0, true, 900);
    q1.rejected = 2;
    vec![
        QueueMetrics {
            queue: 0,
            stats: q0,
            in_flight: 3,
        },
        QueueMetrics {
            queue: 1,
            stats: q1,
            in_flight: 0,
        },
    ]
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn start() -> MetricsServer {
    let source = Arc::new(Fixed(Mutex::new(sample_stats())));
    MetricsServer::start("127.0.0.1:0".parse().unwrap(), false, source).expect("start")
}

#[test]
fn a_scrape_says_what_was_recorded() {
    let server = start();
    let (status, body) = get(server.addr(), "/metrics");
    assert_eq!(status, 200);
    assert_eq!(
        sample(&body, r#"uringblk_requests_total{queue="0",type="read"}"#),
        3.0
    );
    assert_eq!(
        sample(
            &body,
            r#"uringblk_request_bytes_total{queue="0",type="read"}"#
        ),
        8192.0
    );
    assert_eq!(
        sample(
            &body,
            r#"uringblk_request_errors_total{queue="0",type="read"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(&body, r#"uringblk_requests_total{queue="0",type="write"}"#),
        1.0
    );
    assert_eq!(
        sample(&body, r#"uringblk_requests_total{queue="1",type="flush"}"#),
        1.0
    );
    assert_eq!(
        sample(&body, r#"uringblk_merged_requests_total{queue="0"}"#),
        5.0
    );
    assert_eq!(
        sample(&body, r#"uringblk_rejected_requests_total{queue="1"}"#),
        2.0
    );
    assert_eq!(
        sample(&body, r#"uringblk_requests_in_flight{queue="0"}"#),
        3.0
    );
    // Cumulative buckets: 30 and 70 us are under 100 us, 120 us under 250 us, 20 ms only
    // under 25 ms; 4 in all.
    let bucket = |le: &str| {
        sample(
            &body,
            &format!(r#"uringblk_request_latency_seconds_bucket{{queue="0",le="{le}"}}"#),
        )
    };
    assert_eq!(bucket("0.00001"), 0.0);
    assert_eq!(bucket("0.0001"), 2.0);
    assert_eq!(bucket("0.00025"), 3.0);
    assert_eq!(bucket("0.01"), 3.0);
    assert_eq!(bucket("0.025"), 4.0);
    assert_eq!(bucket("+Inf"), 4.0);
    assert_eq!(
        sample(
            &body,
            r#"uringblk_request_latency_seconds_count{queue="0"}"#
        ),
        4.0
    );
    let sum = sample(&body, r#"uringblk_request_latency_seconds_sum{queue="0"}"#);
    assert!((sum - 0.02022).abs() < 0.0002, "sum {sum}");

    let (status, _) = get(server.addr(), "/");
    assert_eq!(status, 404);
}

#[test]
fn promtool_accepts_the_exposition() {
    if !guestvm::testing::tool_or_skip(
        "promtool_accepts_the_exposition",
        "promtool",
        "apt-get install prometheus",
    ) {
        return;
    }
    let server = start();
    let (_, body) = get(server.addr(), "/metrics");
    if let Err(e) = guestvm::testing::promtool_check(&body) {
        panic!("{e}");
    }
}

#[test]
fn a_remote_address_needs_consent() {
    let source = Arc::new(Fixed(Mutex::new(Vec::new())));
    let remote: SocketAddr = "0.0.0.0:0".parse().unwrap();
    assert!(matches!(
        MetricsServer::start(remote, false, source.clone()),
        Err(MetricsError::NotLoopback(_))
    ));
    let server = MetricsServer::start(remote, true, source).expect("with consent");
    let (status, _) = get(
        SocketAddr::from(([127, 0, 0, 1], server.addr().port())),
        "/metrics",
    );
    assert_eq!(status, 200);
}
