//! What happened on this node, as `WatchEvents` streams it: sessions
//! started and ended, launches refused, balances running low or out, stops
//! scheduled, drain changes. One bus per agent; publishers never wait for
//! subscribers (a subscriber that falls behind is told how many it missed).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::broadcast;

use crate::clock::UnixNanos;
use crate::error::Reason;
use crate::gpu::DeviceUuid;
use crate::inventory::Health;
use crate::metering::Credits;
use crate::session::{EndReason, Principal, SessionId, SessionRecord};

/// How many events a slow subscriber may fall behind before it loses some.
const CAPACITY: usize = 1024;

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Increases by one per event of this agent process.
    pub sequence: u64,
    pub at: UnixNanos,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    SessionStarted(Box<SessionRecord>),
    SessionEnded(Box<SessionRecord>),
    LaunchRefused {
        request_id: String,
        principal: Option<Principal>,
        account_id: String,
        reason: Reason,
        message: String,
    },
    BalanceLow(BalanceNotice),
    BalanceExhausted(BalanceNotice),
    SessionStopScheduled {
        session_id: SessionId,
        account_id: String,
        reason: EndReason,
        stop_at: UnixNanos,
    },
    DrainChanged {
        draining: bool,
        reason: String,
    },
    DeviceHealthChanged {
        device: DeviceUuid,
        health: Health,
        cause: String,
    },
    InventoryChanged {
        added: Vec<DeviceUuid>,
        removed: Vec<DeviceUuid>,
    },
}

/// A billed account's balance and the sessions it pays for.
#[derive(Debug, Clone, PartialEq)]
pub struct BalanceNotice {
    pub account_id: String,
    pub balance: Credits,
    pub session_ids: Vec<SessionId>,
    /// When those sessions will be stopped; `None` when they go on
    /// (`on_balance_exhausted = "continue"`, or only a low balance).
    pub stop_at: Option<UnixNanos>,
}

impl EventKind {
    /// The accounts an event is about, for `WatchEvents`' account filter;
    /// empty for node-wide events (drain), which everyone may see.
    pub fn accounts(&self) -> Vec<&str> {
        match self {
            Self::SessionStarted(session) | Self::SessionEnded(session) => {
                vec![&session.account_id, &session.billed_account_id]
            }
            Self::LaunchRefused { account_id, .. }
            | Self::SessionStopScheduled { account_id, .. } => vec![account_id],
            Self::BalanceLow(notice) | Self::BalanceExhausted(notice) => {
                vec![&notice.account_id]
            }
            Self::DrainChanged { .. }
            | Self::DeviceHealthChanged { .. }
            | Self::InventoryChanged { .. } => Vec::new(),
        }
    }
}

/// Which events a watcher gets: those about its accounts, and node-wide
/// ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// `None`: every event (the local operator's unfiltered watch).
    pub accounts: Option<HashSet<String>>,
}

impl EventFilter {
    pub fn admits(&self, kind: &EventKind) -> bool {
        let Some(accounts) = &self.accounts else {
            return true;
        };
        let about = kind.accounts();
        about.is_empty() || about.iter().any(|account| accounts.contains(*account))
    }
}

#[derive(Debug)]
pub struct EventBus {
    sender: broadcast::Sender<Event>,
    sequence: AtomicU64,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    pub fn new() -> Self {
        let (sender, _) = broadcast::channel(CAPACITY);
        Self {
            sender,
            sequence: AtomicU64::new(0),
        }
    }

    /// Publishes `kind`; with no subscriber the event is simply dropped.
    pub fn publish(&self, at: UnixNanos, kind: EventKind) {
        let sequence = self.sequence.fetch_add(1, Ordering::SeqCst) + 1;
        // An error only means nobody listens.
        let _ = self.sender.send(Event { sequence, at, kind });
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.sender.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn subscribers_see_events_in_order_with_increasing_sequence() {
        let bus = EventBus::new();
        bus.publish(
            UnixNanos(1),
            EventKind::DrainChanged {
                draining: true,
                reason: String::new(),
            },
        );
        let mut events = bus.subscribe();
        for draining in [false, true] {
            bus.publish(
                UnixNanos(2),
                EventKind::DrainChanged {
                    draining,
                    reason: "maintenance".into(),
                },
            );
        }
        let first = events.recv().await.unwrap();
        let second = events.recv().await.unwrap();
        assert_eq!((first.sequence, second.sequence), (2, 3));
        assert_eq!(
            second.kind,
            EventKind::DrainChanged {
                draining: true,
                reason: "maintenance".into()
            }
        );
    }
}
