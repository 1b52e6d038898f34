//! The write cache mode in force, as the driver negotiated it (QEMU's virtio_blk_set_status
//! and virtio_blk_reset rules, adapted to what a vhost-user backend can see):
//!
//! - a driver that did not negotiate VIRTIO_BLK_F_FLUSH cannot flush: the device is
//!   writethrough, whatever was configured or written to the config space;
//! - FLUSH without CONFIG_WCE: the configured mode, and the driver cannot change it;
//! - FLUSH and CONFIG_WCE: the configured mode until the driver writes `writeback`;
//! - every new driver starts from the configured mode, never from what the previous one
//!   wrote ("do not relay a previous driver's WCE configuration"). A new driver is one on a
//!   new connection (a new frontend, a reconnect) or after RESET_DEVICE. A stop and restart of
//!   the rings inside one connection is not one: it is also what a paused and resumed VM does,
//!   and a frontend that caches the config space would then show its driver a mode that is no
//!   longer in force.
//!
//! One case this cannot tell apart: a frontend that reconnects (QEMU `reconnect=`) while its
//! guest's driver lives on is a new connection, so that driver, if it had switched the cache
//! off, is served the configured mode again without being told (QEMU does not replay the
//! config write). A configured writeback device then completes that driver's writes before
//! they are durable while it believes them durable; run such a setup with `--writethrough`.
//!
//! Config reads report the mode in force. The engine reads the same flag for every
//! write-type op (RWF_DSYNC / a sync when it is off).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH};

/// What the current driver negotiated about the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Driver {
    /// No SET_FEATURES yet: config writes are taken, and checked again when it comes.
    Negotiating,
    /// The driver cannot flush: writethrough, fixed.
    NoFlush,
    /// The driver flushes but cannot change the mode: configured, fixed.
    FlushOnly,
    /// The driver flushes and owns the mode.
    FlushAndConfigWce,
}

pub(crate) struct CacheMode {
    configured: bool,
    /// The mode in force; shared with every iothread's engine.
    writeback: Arc<AtomicBool>,
    driver: Mutex<Driver>,
}

impl CacheMode {
    pub(crate) fn new(configured_writeback: bool) -> CacheMode {
        CacheMode {
            configured: configured_writeback,
            writeback: Arc::new(AtomicBool::new(configured_writeback)),
            driver: Mutex::new(Driver::Negotiating),
        }
    }

    /// The flag the engines read.
    pub(crate) fn flag(&self) -> Arc<AtomicBool> {
        self.writeback.clone()
    }

    /// The mode in force (the config space's `writeback`).
    pub(crate) fn writeback(&self) -> bool {
        self.writeback.load(Ordering::SeqCst)
    }

    fn driver(&self) -> std::sync::MutexGuard<'_, Driver> {
        self.driver.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new driver (new connection, device reset): back to the configured mode.
    pub(crate) fn reset(&self) {
        let mut driver = self.driver();
        *driver = Driver::Negotiating;
        self.writeback.store(self.configured, Ordering::SeqCst);
    }

    /// SET_FEATURES: the virtio features the driver acked.
    pub(crate) fn features_acked(&self, features: u64) {
        let flush = features & (1 << VIRTIO_BLK_F_FLUSH) != 0;
        let config_wce = features & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0;
        let mut driver = self.driver();
        *driver = match (flush, config_wce) {
            (false, _) => Driver::NoFlush,
            (true, false) => Driver::FlushOnly,
            (true, true) => Driver::FlushAndConfigWce,
        };
        let mode = match *driver {
            Driver::NoFlush => false,
            Driver::FlushOnly => self.configured,
            // A write of this driver's before SET_FEATURES stands (QEMU: the "auto
            // writethrough" rule does not apply to a CONFIG_WCE driver).
            Driver::FlushAndConfigWce | Driver::Negotiating => self.writeback(),
        };
        self.writeback.store(mode, Ordering::SeqCst);
        log::info!(
            "driver negotiated FLUSH {flush}, CONFIG_WCE {config_wce}: write cache {}",
            if mode { "on" } else { "off" }
        );
    }

    /// A config-space write of `writeback`: applied where the driver may change the mode.
    /// Returns whether it was.
    pub(crate) fn guest_write(&self, writeback: bool) -> bool {
        let driver = self.driver();
        let allowed = match *driver {
            Driver::Negotiating | Driver::FlushAndConfigWce => true,
            Driver::FlushOnly => false,
            // Switching it off is what it already is; on would lose its writes.
            Driver::NoFlush => !writeback,
        };
        if allowed {
            self.writeback.store(writeback, Ordering::SeqCst);
        }
        allowed
    }
}
