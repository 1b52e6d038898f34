//! The protocol: one JSON object per line each way.
//!
//! | request | reply `result` |
//! |---|---|
//! | `{"command": "stats"}` | per-queue and per-iothread statistics (SIGUSR1's JSON) |
//! | `{"command": "info"}` | image, capacity, features, connection, queues, iothreads |
//! | `{"command": "flush"}` | `null` once everything written so far is durable |
//! | `{"command": "write-cache"}` | `{"mode": "writeback"|"writethrough"}`: the mode in force |
//! | `{"command": "resize", "size": BYTES}` | `{"from_bytes", "to_bytes", "guest_notified", "guest"}`: a file image grown to BYTES |
//! | `{"command": "resize"}` | the same, for a block device: the disk takes the size the device has now |
//!
//! `size` is a positive integer of bytes (a block device must then be exactly that large).

use serde::Deserialize;
use serde_json::{json, Value};

/// Longest request line the server reads; longer ones are refused (a control command is a
/// few dozen bytes).
pub const MAX_LINE: usize = 4096;

/// A parsed control request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Stats,
    Info,
    Flush,
    /// The write-cache mode in force (as the driver negotiated it).
    WriteCache,
    /// Grow the disk: a file image to `size` bytes; a block device to the size it has now
    /// (`size`, if given, must be that size).
    Resize {
        size: Option<u64>,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("request is not a JSON object: {0}")]
    NotJson(String),
    #[error("request has no \"command\" string")]
    NoCommand,
    #[error("unknown command {0:?} (known: stats, info, flush, write-cache, resize)")]
    Unknown(String),
    #[error("bad arguments for {command:?}: {reason}")]
    BadArguments {
        command: &'static str,
        reason: String,
    },
    #[error("request line longer than {MAX_LINE} bytes")]
    TooLong,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArguments {
    #[allow(dead_code)]
    command: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResizeArguments {
    #[allow(dead_code)]
    command: String,
    size: Option<u64>,
}

impl Command {
    /// Parses one request line (without its newline).
    pub fn parse(line: &str) -> Result<Command, ProtocolError> {
        if line.len() > MAX_LINE {
            return Err(ProtocolError::TooLong);
        }
        let value: Value =
            serde_json::from_str(line).map_err(|e| ProtocolError::NotJson(e.to_string()))?;
        if !value.is_object() {
            return Err(ProtocolError::NotJson("not an object".into()));
        }
        let name = value
            .get("command")
            .and_then(Value::as_str)
            .ok_or(ProtocolError::NoCommand)?
            .to_string();
        match name.as_str() {
            "stats" => no_arguments(value, "stats").map(|_| Command::Stats),
            "info" => no_arguments(value, "info").map(|_| Command::Info),
            "flush" => no_arguments(value, "flush").map(|_| Command::Flush),
            "write-cache" => no_arguments(value, "write-cache").map(|_| Command::WriteCache),
            "resize" => resize_arguments(value),
            _ => Err(ProtocolError::Unknown(name)),
        }
    }

    /// The request line for this command (what the client sends).
    pub fn to_line(&self) -> String {
        let v = match self {
            Command::Stats => json!({"command": "stats"}),
            Command::Info => json!({"command": "info"}),
            Command::Flush => json!({"command": "flush"}),
            Command::WriteCache => json!({"command": "write-cache"}),
            Command::Resize { size: None } => json!({"command": "resize"}),
            Command::Resize { size: Some(size) } => json!({"command": "resize", "size": size}),
        };
        v.to_string()
    }
}

fn no_arguments(value: Value, command: &'static str) -> Result<(), ProtocolError> {
    serde_json::from_value::<NoArguments>(value)
        .map(|_| ())
        .map_err(|e| ProtocolError::BadArguments {
            command,
            reason: e.to_string(),
        })
}

fn resize_arguments(value: Value) -> Result<Command, ProtocolError> {
    let bad = |reason: String| ProtocolError::BadArguments {
        command: "resize",
        reason,
    };
    let args: ResizeArguments = serde_json::from_value(value)
        .map_err(|e| bad(format!("{e} (\"size\" is a number of bytes)")))?;
    if args.size == Some(0) {
        return Err(bad("size must be greater than 0".into()));
    }
    Ok(Command::Resize { size: args.size })
}

/// A reply line.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    Ok(Value),
    Error(String),
}

impl Reply {
    pub fn to_line(&self) -> String {
        match self {
            Reply::Ok(v) => json!({"ok": true, "result": v}).to_string(),
            Reply::Error(e) => json!({"ok": false, "error": e}).to_string(),
        }
    }

    /// Parses a reply line (the client's side).
    pub fn parse(line: &str) -> Result<Reply, ProtocolError> {
        let v: Value =
            serde_json::from_str(line).map_err(|e| ProtocolError::NotJson(e.to_string()))?;
        match v.get("ok").and_then(Value::as_bool) {
            Some(true) => Ok(Reply::Ok(v.get("result").cloned().unwrap_or(Value::Null))),
            Some(false) => Ok(Reply::Error(
                v.get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("error without a message")
                    .to_string(),
            )),
            None => Err(ProtocolError::NotJson("reply has no \"ok\" boolean".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_command_and_round_trips() {
        for cmd in [
            Command::Stats,
            Command::Info,
            Command::Flush,
            Command::WriteCache,
            Command::Resize { size: None },
            Command::Resize {
                size: Some(1 << 30),
            },
            Command::Resize {
                size: Some(u64::MAX),
            },
        ] {
            assert_eq!(Command::parse(&cmd.to_line()), Ok(cmd));
        }
    }

    #[test]
    fn resize_takes_an_optional_positive_byte_count() {
        assert_eq!(
            Command::parse(r#"{"command": "resize", "size": 4096}"#),
            Ok(Command::Resize { size: Some(4096) })
        );
        assert_eq!(
            Command::parse(r#"{"command": "resize"}"#),
            Ok(Command::Resize { size: None })
        );
        assert_eq!(
            Command::parse(r#"{"command": "resize", "size": null}"#),
            Ok(Command::Resize { size: None })
        );
        for bad in [
            r#"{"command": "resize", "size": 0}"#,
            r#"{"command": "resize", "size": -4096}"#,
            r#"{"command": "resize", "size": 4096.5}"#,
            r#"{"command": "resize", "size": "1G"}"#,
            r#"{"command": "resize", "size": 18446744073709551616}"#,
            r#"{"command": "resize", "bytes": 4096}"#,
            r#"{"command": "resize", "size": 4096, "force": true}"#,
        ] {
            assert!(
                matches!(
                    Command::parse(bad),
                    Err(ProtocolError::BadArguments {
                        command: "resize",
                        ..
                    })
                ),
                "{bad}: {:?}",
                Command::parse(bad)
            );
        }
    }

    #[test]
    fn refuses_what_is_not_a_command() {
        assert!(matches!(
            Command::parse("stats"),
            Err(ProtocolError::NotJson(_))
        ));
        assert!(matches!(
            Command::parse("[1]"),
            Err(ProtocolError::NotJson(_))
        ));
        assert_eq!(Command::parse("{}"), Err(ProtocolError::NoCommand));
        assert_eq!(
            Command::parse(r#"{"command": 3}"#),
            Err(ProtocolError::NoCommand)
        );
        assert_eq!(
            Command::parse(r#"{"command": "reboot"}"#),
            Err(ProtocolError::Unknown("reboot".into()))
        );
        assert!(matches!(
            Command::parse(r#"{"command": "stats", "queue": 1}"#),
            Err(ProtocolError::BadArguments {
                command: "stats",
                ..
            })
        ));
        assert!(matches!(
            Command::parse(r#"{"command": "write-cache", "mode": "writeback"}"#),
            Err(ProtocolError::BadArguments {
                command: "write-cache",
                ..
            })
        ));
        let long = format!(r#"{{"command": "{}"}}"#, "x".repeat(MAX_LINE));
        assert_eq!(Command::parse(&long), Err(ProtocolError::TooLong));
    }

    #[test]
    fn replies_round_trip() {
        let ok = Reply::Ok(json!({"a": 1}));
        assert_eq!(Reply::parse(&ok.to_line()), Ok(ok));
        let err = Reply::Error("no".into());
        assert_eq!(Reply::parse(&err.to_line()), Ok(err));
        assert!(Reply::parse(r#"{"result": 1}"#).is_err());
    }
}
