//! virtio-blk protocol: wire constants, device configuration (feature bits, config space)
//! and request parsing/validation. No I/O, no threads.
//!
//! (Rules enforced by the parser: see [`request`].)

pub mod config;
pub mod request;
pub mod wire;

pub use config::{parse_config_write, ConfigError, DeviceConfig};
pub use request::{parse, ParseError, Range, Request, RequestKind};
pub use wire::*;
