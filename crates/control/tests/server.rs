//! The control server over a real unix socket: commands reach the handler and replies come
//! back; malformed requests get a JSON error and the server keeps serving; the socket is
//! owner-only, a live one is not stolen, a stale one is replaced, a stuck client does not
//! block another one.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use control::{request, Command, ControlHandler, ControlServer, Reply, ServerError};
use serde_json::{json, Value};

#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<Command>>,
}

impl ControlHandler for Recorder {
    fn handle(&self, command: &Command) -> Result<Value, String> {
        self.seen.lock().unwrap().push(command.clone());
        match command {
            Command::Stats => Ok(json!({"queues": []})),
            Command::Flush => Err("flush failed: EIO".into()),
            _ => Ok(Value::Null),
        }
    }
}

const T: Duration = Duration::from_secs(5);

fn raw_exchange(path: &std::path::Path, line: &str) -> String {
    let s = UnixStream::connect(path).expect("connect");
    s.set_read_timeout(Some(T)).unwrap();
    let mut w = s.try_clone().unwrap();
    writeln!(w, "{line}").unwrap();
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).unwrap();
    reply
}

#[test]
fn commands_reach_the_handler_and_errors_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl.sock");
    let handler = Arc::new(Recorder::default());
    let server = ControlServer::start(&path, handler.clone()).expect("start");

    assert_eq!(
        request(&path, &Command::Stats, T).unwrap(),
        Reply::Ok(json!({"queues": []}))
    );
    assert_eq!(
        request(&path, &Command::Flush, T).unwrap(),
        Reply::Error("flush failed: EIO".into())
    );
    assert_eq!(
        request(&path, &Command::WriteCache, T).unwrap(),
        Reply::Ok(Value::Null)
    );

    // Malformed and unknown requests: a JSON error each, on the same connection, and the
    // server still serves afterwards.
    for bad in ["not json", "{}", r#"{"command": "reboot"}"#] {
        let reply: Value = serde_json::from_str(&raw_exchange(&path, bad)).unwrap();
        assert_eq!(reply["ok"], false, "{bad}");
        assert!(reply["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    let long = format!(r#"{{"command": "{}"}}"#, "x".repeat(10_000));
    let reply: Value = serde_json::from_str(&raw_exchange(&path, &long)).unwrap();
    assert_eq!(reply["ok"], false);
    assert!(request(&path, &Command::Info, T).unwrap() == Reply::Ok(Value::Null));

    assert_eq!(
        *handler.seen.lock().unwrap(),
        vec![
            Command::Stats,
            Command::Flush,
            Command::WriteCache,
            Command::Info
        ]
    );
    drop(server);
    assert!(!path.exists(), "the socket file goes with the server");
}

#[test]
fn the_socket_is_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl.sock");
    let _server = ControlServer::start(&path, Arc::new(Recorder::default())).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn a_live_socket_is_not_stolen_and_a_stale_one_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl.sock");
    let first = ControlServer::start(&path, Arc::new(Recorder::default())).unwrap();
    assert!(matches!(
        ControlServer::start(&path, Arc::new(Recorder::default())),
        Err(ServerError::InUse { .. })
    ));
    drop(first);

    // A socket file nobody listens on (a killed server's) is replaced.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let _second = ControlServer::start(&path, Arc::new(Recorder::default())).unwrap();
    assert_eq!(
        request(&path, &Command::Stats, T).unwrap(),
        Reply::Ok(json!({"queues": []}))
    );

    // Anything else at the path is left alone.
    let file = dir.path().join("file");
    std::fs::write(&file, b"data").unwrap();
    assert!(matches!(
        ControlServer::start(&file, Arc::new(Recorder::default())),
        Err(ServerError::NotASocket { .. })
    ));
    assert_eq!(std::fs::read(&file).unwrap(), b"data");
}

#[test]
fn a_stuck_client_does_not_block_another() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl.sock");
    let _server = ControlServer::start(&path, Arc::new(Recorder::default())).unwrap();
    // Connected, half a request, never finished.
    let mut stuck = UnixStream::connect(&path).unwrap();
    stuck.write_all(br#"{"command": "st"#).unwrap();
    assert_eq!(
        request(&path, &Command::Stats, T).unwrap(),
        Reply::Ok(json!({"queues": []}))
    );
}
