//! What the operator can know about the frontend: whether one is connected and since when,
//! how many have connected, and the virtio features its driver acked.

use std::sync::Mutex;
use std::time::SystemTime;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrontendInfo {
    /// When the current frontend connected; None between connections.
    pub connected_since: Option<SystemTime>,
    /// Frontends served since the server started, the current one included.
    pub connections: u64,
    /// The virtio features the current driver acked (None before SET_FEATURES).
    pub acked_features: Option<u64>,
}

#[derive(Default)]
pub(crate) struct Frontend(Mutex<FrontendInfo>);

impl Frontend {
    fn with(&self, f: impl FnOnce(&mut FrontendInfo)) {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub(crate) fn connected(&self) {
        self.with(|i| {
            i.connected_since = Some(SystemTime::now());
            i.connections += 1;
            i.acked_features = None;
        });
    }

    pub(crate) fn disconnected(&self) {
        self.with(|i| {
            i.connected_since = None;
            i.acked_features = None;
        });
    }

    pub(crate) fn features_acked(&self, features: u64) {
        self.with(|i| i.acked_features = Some(features));
    }

    pub(crate) fn info(&self) -> FrontendInfo {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
