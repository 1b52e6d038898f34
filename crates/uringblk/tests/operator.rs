//! The operator's side of a running server, through the real binary: `uringblk ctl` over the
//! control socket (stats that count the client's I/O live, info, flush, write-cache, errors
//! for a missing server), and the Prometheus endpoint, checked by promtool.

#[allow(dead_code)]
mod blkio_support;
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Output};

use blkio_support::{read_vec, write_slice, Client, ClientOptions};
use common::ServerProcess;
use guestvm::testing::prometheus_sample as sample;
use serde_json::Value;

fn ctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_uringblk"))
        .arg("ctl")
        .args(args)
        .output()
        .expect("run uringblk ctl")
}

fn ctl_json(control: &str, command: &str) -> Value {
    let out = ctl(&["--control", control, command]);
    assert!(
        out.status.success(),
        "ctl {command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("ctl prints JSON")
}

/// A port that was free a moment ago on the loopback address.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn scrape(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    write!(s, "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.") && raw.contains(" 200 "), "{raw}");
    raw.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

#[test]
fn ctl_and_metrics_see_the_live_server() {
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let server = ServerProcess::start(&[
        "--image",
        "{dir}/disk.img",
        "--create",
        "64M",
        "--queues",
        "2",
        "--control",
        "{dir}/ctl.sock",
        "--metrics",
        &metrics,
    ]);
    let control = server.dir().join("ctl.sock");
    let control = control.to_str().unwrap();

    let info = ctl_json(control, "info");
    assert_eq!(info["capacity_bytes"], 64 << 20);
    assert_eq!(info["queues"], 2);
    assert_eq!(info["write_cache"], "writeback");
    assert!(info["image"].as_str().unwrap().ends_with("disk.img"));
    assert_eq!(ctl_json(control, "write-cache")["mode"], "writeback");

    assert_eq!(info["frontend"]["connected"], false);
    assert_eq!(info["frontend"]["connections"], 0);

    let before = ctl_json(control, "stats");
    assert_eq!(before["queues"][0]["write"]["ops"], 0);

    // Three 4 KiB writes and one read on queue 0, while the server runs.
    let mut client = Client::connect(
        &server.socket,
        &ClientOptions {
            num_queues: 2,
            ..ClientOptions::default()
        },
    );
    {
        let (q, buf) = client.queue(0);
        for i in 0..3u64 {
            write_slice(q, buf, i * 4096, &[i as u8 + 1; 4096]);
        }
        assert_eq!(read_vec(q, buf, 4096, 4096), vec![2; 4096]);
    }
    let info = ctl_json(control, "info");
    assert_eq!(info["frontend"]["connected"], true, "{info}");
    assert_eq!(info["frontend"]["connections"], 1);
    assert!(info["frontend"]["connected_since_unix"].as_u64().is_some());
    let acked: Vec<&str> = info["frontend"]["acked"]
        .as_array()
        .expect("the driver's features")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        acked.contains(&"MQ") && acked.contains(&"FLUSH"),
        "{acked:?}"
    );

    let live = ctl_json(control, "stats");
    assert_eq!(live["queues"][0]["write"]["ops"], 3);
    assert_eq!(live["queues"][0]["write"]["bytes"], 3 * 4096);
    assert_eq!(live["queues"][0]["read"]["ops"], 1);
    assert_eq!(live["queues"][1]["write"]["ops"], 0);
    assert_eq!(ctl_json(control, "flush"), Value::Null);

    let body = scrape(port);
    assert_eq!(
        sample(&body, r#"uringblk_requests_total{queue="0",type="write"}"#),
        3.0
    );
    assert_eq!(
        sample(
            &body,
            r#"uringblk_request_bytes_total{queue="0",type="write"}"#
        ),
        12288.0
    );
    assert_eq!(
        sample(&body, r#"uringblk_requests_total{queue="0",type="read"}"#),
        1.0
    );
    assert_eq!(
        sample(&body, r#"uringblk_requests_in_flight{queue="0"}"#),
        0.0
    );
    assert_eq!(
        sample(
            &body,
            r#"uringblk_request_latency_seconds_count{queue="0"}"#
        ),
        4.0
    );
    if guestvm::testing::tool_or_skip(
        "ctl_and_metrics_see_the_live_server",
        "promtool",
        "apt-get install prometheus",
    ) {
        if let Err(e) = guestvm::testing::promtool_check(&body) {
            panic!("{e}");
        }
    }
    drop(client);
    let status = server.stop();
    assert!(status.success(), "{status}");
}

#[test]
fn ctl_without_a_server_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.sock");
    let out = ctl(&["--control", missing.to_str().unwrap(), "stats"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect to the control socket") && err.lines().count() == 1,
        "{err}"
    );
}

#[test]
fn a_remote_metrics_address_is_refused_before_the_socket_opens() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("blk.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_uringblk"))
        .args(["--null", "16M", "--metrics", "0.0.0.0:0", "--socket"])
        .arg(&socket)
        .output()
        .expect("run uringblk");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--metrics-allow-remote"));
    assert!(!socket.exists());
}
