//! Pinning an iothread to its CPU, once, on the first event it handles (a connection's event
//! loop thread, event_loop.rs, pins itself there).

use std::cell::Cell;

thread_local! {
    static PINNED: Cell<bool> = const { Cell::new(false) };
}

/// Pins the calling thread to `cpu` (if one is given) the first time it is called on it.
pub(crate) fn pin_current_thread(thread_id: usize, cpu: Option<usize>) {
    if PINNED.with(|p| p.replace(true)) {
        return;
    }
    if let Some(cpu) = cpu {
        if core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
            log::info!("iothread {thread_id} pinned to CPU {cpu}");
        } else {
            log::warn!("iothread {thread_id}: cannot pin to CPU {cpu}");
        }
    }
}
