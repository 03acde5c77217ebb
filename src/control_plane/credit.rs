//! The pure parts of credit control (RFC 4006): what an answer means, when
//! to ask for more, what was used since the last report. No I/O; the
//! session manager calls these around its control-plane calls.

use std::time::Duration;

use crate::api::convert;
use crate::clock::UnixNanos;
use crate::error::{Reason, Refusal};
use crate::ledger::{CreditState, FinalUnitAction};
use crate::metering::{self, Credits, MeteredDevice};
use crate::proto;
use crate::session::{BillingPath, EndReason, SessionId};

/// How long a grant is asked for (RFC 4006 Requested-Service-Unit).
pub const REQUESTED_SERVICE: Duration = Duration::from_secs(300);

/// Ask for more when this little of the grant is left (or a third of it,
/// for short grants).
const UPDATE_MARGIN: Duration = Duration::from_secs(30);

/// A granted answer to an initial or update request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted {
    pub billed_account_id: String,
    pub billing_path: Option<BillingPath>,
    /// The grant runs out here: the earlier of its Validity-Time and
    /// `now` + its service seconds.
    pub until: UnixNanos,
    pub length_ns: i64,
    pub final_unit: Option<(FinalUnitAction, EndReason)>,
}

/// Reads a Credit-Control-Answer received at `now`: a grant, or the
/// refusal the caller gets (its reason is the control plane's).
pub fn read_answer(answer: proto::CreditControlAnswer, now: UnixNanos) -> Result<Granted, Refusal> {
    match proto::CreditControlResult::try_from(answer.result) {
        Ok(proto::CreditControlResult::Success) => {}
        Ok(proto::CreditControlResult::Denied) => {
            let reason = Reason::parse(&answer.deny_reason).unwrap_or(Reason::InvalidRequest);
            let message = if answer.deny_message.is_empty() {
                format!("the control plane denied it ({})", answer.deny_reason)
            } else {
                answer.deny_message
            };
            return Err(Refusal::new(reason, message).with("denied_by", "control_plane"));
        }
        _ => {
            return Err(Refusal::new(
                Reason::ControlPlaneUnavailable,
                format!(
                    "the control plane answered without a result (result {}); retry later",
                    answer.result
                ),
            ));
        }
    }
    let grant = answer.grant.unwrap_or_default();
    let length = Duration::from_secs(u64::from(grant.granted_service_seconds));
    let length_ns = i64::try_from(length.as_nanos()).unwrap_or(i64::MAX);
    let by_length = UnixNanos(now.0.saturating_add(length_ns));
    let until = match grant.valid_until {
        Some(valid) => UnixNanos::from_timestamp(&valid).min(by_length),
        None => by_length,
    };
    let final_unit = grant.final_unit_indication.then(|| {
        let action = match proto::FinalUnitAction::try_from(grant.final_unit_action) {
            Ok(proto::FinalUnitAction::Continue) => FinalUnitAction::Continue,
            _ => FinalUnitAction::Terminate,
        };
        let reason = convert::end_reason_from_proto(grant.final_end_reason)
            .unwrap_or(EndReason::GrantDenied);
        (action, reason)
    });
    let billing_path = match proto::BillingPath::try_from(answer.billing_path) {
        Ok(proto::BillingPath::Balance) => Some(BillingPath::Balance),
        Ok(proto::BillingPath::Reservation) => Some(BillingPath::Reservation),
        _ => None,
    };
    Ok(Granted {
        billed_account_id: answer.billed_account_id,
        billing_path,
        until,
        length_ns,
        final_unit,
    })
}

/// The state before the answer to CCR-Initial, recorded before it is
/// sent: no grant yet (it runs out at `now`), and a terminate owed until
/// an answer says otherwise, since the control plane may grant and the
/// answer be lost.
pub fn pending(session: &SessionId, now: UnixNanos) -> CreditState {
    CreditState {
        session_id: session.clone(),
        cc_request_number: 0,
        granted_until: now,
        granted_ns: 0,
        final_unit: None,
        reported_until: None,
        released_at: None,
        pending_until: None,
    }
}

/// The state after an answer to request `number`.
pub fn state_after(
    session: &SessionId,
    number: u64,
    granted: &Granted,
    reported_until: Option<UnixNanos>,
) -> CreditState {
    CreditState {
        session_id: session.clone(),
        cc_request_number: number,
        granted_until: granted.until,
        granted_ns: granted.length_ns,
        final_unit: granted.final_unit,
        reported_until,
        released_at: None,
        pending_until: None,
    }
}

/// A denied update is final: the session may run to the end of the grant
/// it has, then ends with `reason`.
pub fn state_after_denial(state: &CreditState, reason: EndReason) -> CreditState {
    CreditState {
        final_unit: Some((FinalUnitAction::Terminate, reason)),
        pending_until: None,
        ..state.clone()
    }
}

/// Whether to send an update now: a grant that is not final and has less
/// than the margin left.
pub fn update_due(state: &CreditState, now: UnixNanos) -> bool {
    if state.final_unit.is_some() {
        return false;
    }
    let margin = i64::try_from(UPDATE_MARGIN.as_nanos())
        .unwrap_or(i64::MAX)
        .min(state.granted_ns / 3);
    now.0 >= state.granted_until.0.saturating_sub(margin)
}

/// What happens at the end of a final grant, once it is reached.
pub fn final_stop(state: &CreditState, now: UnixNanos) -> Option<EndReason> {
    match state.final_unit {
        Some((FinalUnitAction::Terminate, reason)) if now >= state.granted_until => Some(reason),
        _ => None,
    }
}

/// The used service units of `devices` over `from..to`, cut exactly as the
/// usage records are.
pub fn used_units(
    devices: &[MeteredDevice],
    from: UnixNanos,
    to: UnixNanos,
) -> proto::UsedServiceUnits {
    let cuts = metering::cut(devices, from, to);
    proto::UsedServiceUnits {
        period_start: Some(from.to_timestamp()),
        period_end: Some(to.max(from).to_timestamp()),
        device_milliseconds: cuts.iter().map(|c| c.device_ms).sum(),
        gpu_seconds: cuts.iter().map(|c| c.gpu_seconds).sum(),
        cost: convert::credits(cuts.iter().map(|c| c.cost).sum::<Credits>()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: UnixNanos = UnixNanos(1_800_000_000_000_000_000);

    fn success(seconds: u32) -> proto::CreditControlAnswer {
        proto::CreditControlAnswer {
            session_id: "s-1".into(),
            result: proto::CreditControlResult::Success.into(),
            billed_account_id: "acme".into(),
            billing_path: proto::BillingPath::Balance.into(),
            grant: Some(proto::CreditGrant {
                granted_service_seconds: seconds,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_grant_runs_out_at_the_earlier_of_its_length_and_validity() {
        let granted = read_answer(success(60), NOW).unwrap();
        assert_eq!(granted.until, UnixNanos(NOW.0 + 60_000_000_000));
        assert_eq!(granted.billed_account_id, "acme");
        let mut answer = success(60);
        let valid = UnixNanos(NOW.0 + 10_000_000_000);
        answer.grant.as_mut().unwrap().valid_until = Some(valid.to_timestamp());
        assert_eq!(read_answer(answer, NOW).unwrap().until, valid);
    }

    #[test]
    fn a_denial_carries_the_control_planes_reason() {
        let answer = proto::CreditControlAnswer {
            result: proto::CreditControlResult::Denied.into(),
            deny_reason: "SESSION_LIMIT_REACHED".into(),
            deny_message: "acme's fleet pool of 25 is full".into(),
            ..Default::default()
        };
        let refusal = read_answer(answer, NOW).unwrap_err();
        assert_eq!(refusal.reason, Reason::SessionLimitReached);
        assert_eq!(refusal.message, "acme's fleet pool of 25 is full");
    }

    #[test]
    fn a_final_grant_says_what_to_do_and_when() {
        let mut answer = success(20);
        let grant = answer.grant.as_mut().unwrap();
        grant.final_unit_indication = true;
        grant.final_unit_action = proto::FinalUnitAction::Terminate.into();
        grant.final_end_reason = proto::EndReason::BalanceExhausted.into();
        let granted = read_answer(answer, NOW).unwrap();
        let state = state_after(&SessionId("s-1".into()), 1, &granted, Some(NOW));
        assert!(!update_due(&state, NOW));
        assert_eq!(final_stop(&state, UnixNanos(NOW.0 + 19_999_999_999)), None);
        assert_eq!(
            final_stop(&state, UnixNanos(NOW.0 + 20_000_000_000)),
            Some(EndReason::BalanceExhausted)
        );
    }

    #[test]
    fn an_update_is_due_when_the_margin_of_the_grant_is_left() {
        let granted = read_answer(success(300), NOW).unwrap();
        let state = state_after(&SessionId("s-1".into()), 0, &granted, Some(NOW));
        assert!(!update_due(&state, UnixNanos(NOW.0 + 269_999_999_999)));
        assert!(update_due(&state, UnixNanos(NOW.0 + 270_000_000_000)));
        // A 30 s grant: a third of it.
        let short = state_after(
            &SessionId("s-1".into()),
            0,
            &read_answer(success(30), NOW).unwrap(),
            Some(NOW),
        );
        assert!(!update_due(&short, UnixNanos(NOW.0 + 19_999_999_999)));
        assert!(update_due(&short, UnixNanos(NOW.0 + 20_000_000_000)));
    }
}
