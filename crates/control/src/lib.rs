//! The control socket of a running uringblk: a unix socket (owner-only, peers checked by uid)
//! that speaks JSON lines, one request and one reply per line.
//!
//! Requests are `{"command": NAME, ...arguments}`; replies are `{"ok": true, "result": ...}` or
//! `{"ok": false, "error": "..."}`. [`protocol`] parses a line into a [`Command`] (parse, then
//! execute), [`server`] accepts connections on threads of its own (never the data path's) and
//! hands each command to a [`ControlHandler`], and [`client`] is what `uringblk ctl` uses.

pub mod client;
pub mod protocol;
pub mod server;

pub use client::{request, ClientError};
pub use protocol::{Command, ProtocolError, Reply};
pub use server::{ControlHandler, ControlServer, ServerError};
