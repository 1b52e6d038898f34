//! What the control socket and the metrics endpoint see of the running server: one adapter
//! over the vhost-user device and its storage, answering on their own threads (statistics are
//! read under each iothread's lock, which the data path releases between batches).

use std::path::PathBuf;
use std::sync::Arc;

use control::{Command, ControlHandler};
use engine::Storage;
use serde_json::{json, Value};
use vhost_server::VhostUserBlk;

pub struct Operator {
    pub backend: VhostUserBlk,
    pub storage: Arc<Storage>,
    pub image: Option<PathBuf>,
    pub readonly: bool,
    pub queues: u16,
    pub iothreads: usize,
    pub logical_block_size: u32,
}

impl Operator {
    fn info(&self) -> Value {
        json!({
            "image": self.image.as_ref().map(|p| p.display().to_string()),
            "storage": format!("{:?}", self.storage.kind()).to_lowercase(),
            // The capacity in force (it changes with `resize`).
            "capacity_bytes": self.backend.capacity_bytes(),
            "logical_block_size": self.logical_block_size,
            "direct": self.storage.is_direct(),
            "readonly": self.readonly,
            "write_cache": cache_mode(self.backend.write_cache_enabled()),
            "queues": self.queues,
            "iothreads": self.iothreads,
            "version": env!("CARGO_PKG_VERSION"),
            "frontend": frontend_json(&self.backend.frontend_info()),
        })
    }
}

fn frontend_json(f: &vhost_server::FrontendInfo) -> Value {
    let since = f
        .connected_since
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    json!({
        "connected": f.connected_since.is_some(),
        "connected_since_unix": since,
        "connections": f.connections,
        "acked_features": f.acked_features.map(|v| format!("{v:#x}")),
        "acked": f.acked_features.map(feature_names),
    })
}

/// The names of the virtio feature bits set in `features` that a block device negotiates.
fn feature_names(features: u64) -> Vec<&'static str> {
    use virtio_bindings::virtio_blk as blk;
    use virtio_bindings::virtio_config as cfg;
    use virtio_bindings::virtio_ring as ring;
    let known = [
        (blk::VIRTIO_BLK_F_SIZE_MAX, "SIZE_MAX"),
        (blk::VIRTIO_BLK_F_SEG_MAX, "SEG_MAX"),
        (blk::VIRTIO_BLK_F_RO, "RO"),
        (blk::VIRTIO_BLK_F_BLK_SIZE, "BLK_SIZE"),
        (blk::VIRTIO_BLK_F_FLUSH, "FLUSH"),
        (blk::VIRTIO_BLK_F_TOPOLOGY, "TOPOLOGY"),
        (blk::VIRTIO_BLK_F_CONFIG_WCE, "CONFIG_WCE"),
        (blk::VIRTIO_BLK_F_MQ, "MQ"),
        (blk::VIRTIO_BLK_F_DISCARD, "DISCARD"),
        (blk::VIRTIO_BLK_F_WRITE_ZEROES, "WRITE_ZEROES"),
        (ring::VIRTIO_RING_F_INDIRECT_DESC, "RING_INDIRECT_DESC"),
        (ring::VIRTIO_RING_F_EVENT_IDX, "RING_EVENT_IDX"),
        (cfg::VIRTIO_F_VERSION_1, "VERSION_1"),
    ];
    known
        .iter()
        .filter(|(bit, _)| features & (1u64 << bit) != 0)
        .map(|&(_, name)| name)
        .collect()
}

fn resized_json(r: &vhost_server::Resized) -> Value {
    json!({
        "from_bytes": r.from_bytes,
        "to_bytes": r.to_bytes,
        "guest_notified": r.guest == vhost_server::GuestNotice::Notified,
        // "guest notified", or "guest not notified (why)".
        "guest": r.guest.to_string(),
    })
}

fn cache_mode(writeback: bool) -> &'static str {
    if writeback {
        "writeback"
    } else {
        "writethrough"
    }
}

impl ControlHandler for Operator {
    fn handle(&self, command: &Command) -> Result<Value, String> {
        match command {
            Command::Stats => Ok(self.backend.stats_json()),
            Command::Info => Ok(self.info()),
            Command::Flush => self
                .storage
                .sync()
                .map(|()| Value::Null)
                .map_err(|e| format!("flush failed: {e}")),
            Command::WriteCache => Ok(json!({
                "mode": cache_mode(self.backend.write_cache_enabled())
            })),
            Command::Resize { size } => self
                .backend
                .resize(*size)
                .map(|r| resized_json(&r))
                .map_err(|e| format!("resize: {e}")),
        }
    }
}

impl metrics::StatsSource for Operator {
    fn snapshot(&self) -> Vec<metrics::QueueMetrics> {
        self.backend
            .queue_stats()
            .into_iter()
            .enumerate()
            .map(|(q, (stats, in_flight))| metrics::QueueMetrics {
                queue: q as u16,
                stats,
                in_flight: u64::from(in_flight),
            })
            .collect()
    }
}
