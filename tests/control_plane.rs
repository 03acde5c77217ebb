//! Control-plane mode against a control plane written in the tests (mutual
//! TLS, certificates made at test time): registration and policy, credit
//! control of each session (RFC 4006 initial / update / terminate), fail
//! closed when it is unreachable, the offline grace, and usage delivered
//! exactly once at the receiver through outages, a kill between send and
//! acknowledgement, and duplicate acknowledgements.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::operator::stop;
use common::plane::{TestPlane, delivered_ms, ended, launch, link, test_policy, wait_linked};
use common::{Daemon, wait_for_session};
use gpuwarden::api::status::reason_of;
use gpuwarden::proto;

#[tokio::test]
async fn sessions_are_authorized_reported_released_and_their_usage_delivered() {
    let plane = TestPlane::start(test_policy(), 30).await;
    let mut daemon = Daemon::start(
        "sim-h100-pair.toml",
        &format!("[metering]\ncheckpoint_seconds = 1\n{}", plane.agent_config),
    );
    let mut client = daemon.client().await;
    wait_linked(&mut client).await;
    let registered = plane.record().registrations;
    assert_eq!(registered[0].node_id, daemon.node_id);
    assert_eq!(registered[0].inventory.as_ref().unwrap().devices.len(), 2);

    let session = client
        .launch(launch("cp-1", Some("acme")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(session.billed_account_id, "acme");
    let record = plane.record();
    let authorization = &record.authorizations[0];
    assert_eq!(authorization.session_id, session.id);
    assert_eq!(authorization.org_id, "acme");
    assert_eq!(authorization.devices[0].uuid, session.device_uuids[0]);
    plane
        .wait_for("a status with the session", |r| {
            r.statuses
                .iter()
                .any(|s| s.sessions.iter().any(|x| x.id == session.id))
        })
        .await;

    // A few checkpoints' worth of usage, then the stop.
    plane
        .wait_for("usage records", |r| delivered_ms(r, &session.id) > 0)
        .await;
    stop(&mut client, &session.id).await;
    let done = wait_for_session(&mut client, &session.id, ended(proto::EndReason::Stopped)).await;
    let record = plane
        .wait_for("the release", |r| {
            r.releases.iter().any(|x| x.session_id == session.id)
        })
        .await;
    let release = record
        .releases
        .iter()
        .find(|x| x.session_id == session.id)
        .unwrap();
    assert_eq!(release.end_reason, proto::EndReason::Stopped as i32);
    assert!(release.cc_request_number >= 1);
    let total_ms = (done.device_seconds * 1000.0).round() as i64;
    let record = plane
        .wait_for("every usage record", |r| {
            delivered_ms(r, &session.id) == total_ms
        })
        .await;
    assert!(
        record
            .usage
            .values()
            .any(|r| r.session_id == session.id && r.r#final),
        "the last record is marked final"
    );
    let link = link(&mut client).await;
    assert_eq!(link.outbox_backlog, 0);
}

#[tokio::test]
async fn a_denied_authorization_refuses_the_launch_with_the_control_planes_reason() {
    let plane = TestPlane::start(test_policy(), 30).await;
    let mut daemon = Daemon::start("sim-h100-pair.toml", &plane.agent_config);
    let mut client = daemon.client().await;
    wait_linked(&mut client).await;
    plane.switch(|s| {
        s.deny = Some((
            "SESSION_LIMIT_REACHED".into(),
            "acme's fleet-wide pool of 50 is full".into(),
        ))
    });
    let status = client
        .launch(launch("denied", Some("acme")))
        .await
        .unwrap_err();
    assert_eq!(reason_of(&status).as_deref(), Some("SESSION_LIMIT_REACHED"));
    assert!(status.message().contains("fleet-wide pool"), "{status:?}");
    // Nothing holds a device, nothing runs.
    let inventory = client
        .get_inventory(proto::GetInventoryRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(inventory.devices.iter().all(|d| d.session_id.is_empty()));
    let running = daemon.running_containers();
    assert!(running.is_empty(), "{running}");
}

#[tokio::test]
async fn unreachable_control_plane_fails_launches_closed_and_stops_sessions_after_the_offline_grace()
 {
    let mut plane = TestPlane::start(test_policy(), 2).await;
    plane.switch(|s| s.grant_seconds = 2);
    let mut daemon = Daemon::start("sim-h100-pair.toml", &plane.agent_config);
    let mut client = daemon.client().await;
    wait_linked(&mut client).await;
    let session = client
        .launch(launch("offline-1", None))
        .await
        .unwrap()
        .into_inner();

    plane.stop();
    let deadline = Instant::now() + Duration::from_secs(30);
    while link(&mut client).await.up {
        assert!(Instant::now() < deadline, "the link never went down");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = client.launch(launch("offline-2", None)).await.unwrap_err();
    assert_eq!(
        reason_of(&status).as_deref(),
        Some("CONTROL_PLANE_UNAVAILABLE")
    );
    let done = wait_for_session(
        &mut client,
        &session.id,
        ended(proto::EndReason::ControlPlaneUnavailable),
    )
    .await;

    // Back: the release owed and the usage are delivered.
    plane.restart().await;
    let total_ms = (done.device_seconds * 1000.0).round() as i64;
    let record = plane
        .wait_for("the release and all usage", |r| {
            r.releases.iter().any(|x| x.session_id == session.id)
                && delivered_ms(r, &session.id) == total_ms
        })
        .await;
    let release = record
        .releases
        .iter()
        .find(|x| x.session_id == session.id)
        .unwrap();
    assert_eq!(
        release.end_reason,
        proto::EndReason::ControlPlaneUnavailable as i32
    );
    client.launch(launch("offline-3", None)).await.unwrap();
}

#[tokio::test]
async fn a_final_grant_or_a_denied_extension_ends_the_session_with_the_answers_reason() {
    let plane = TestPlane::start(test_policy(), 30).await;
    let mut daemon = Daemon::start("sim-h100-pair.toml", &plane.agent_config);
    let mut client = daemon.client().await;
    wait_linked(&mut client).await;

    plane.switch(|s| {
        s.grant_seconds = 2;
        s.final_grant = Some(proto::EndReason::BalanceExhausted);
    });
    let last = client
        .launch(launch("final-grant", None))
        .await
        .unwrap()
        .into_inner();
    wait_for_session(
        &mut client,
        &last.id,
        ended(proto::EndReason::BalanceExhausted),
    )
    .await;

    plane.switch(|s| {
        s.grant_seconds = 3;
        s.final_grant = None;
        s.deny_extend = Some("BALANCE_EXHAUSTED".into());
    });
    let denied = client
        .launch(launch("extension-denied", None))
        .await
        .unwrap()
        .into_inner();
    wait_for_session(
        &mut client,
        &denied.id,
        ended(proto::EndReason::BalanceExhausted),
    )
    .await;
    let record = plane
        .wait_for("both releases", |r| {
            [&last.id, &denied.id]
                .iter()
                .all(|id| r.releases.iter().any(|x| &&x.session_id == id))
        })
        .await;
    let extension = record
        .extensions
        .iter()
        .find(|x| x.session_id == denied.id)
        .expect("an update was asked before the grant ran out");
    assert_eq!(extension.cc_request_number, 1);
    assert!(extension.used.as_ref().unwrap().device_milliseconds > 0);
}

#[tokio::test]
async fn usage_is_delivered_exactly_once_through_outages_a_kill_before_the_ack_and_duplicate_acks()
{
    let plane = TestPlane::start(test_policy(), 300).await;
    let mut daemon = Daemon::start(
        "sim-h100-pair.toml",
        &format!("[metering]\ncheckpoint_seconds = 1\n{}", plane.agent_config),
    );
    let mut client = daemon.client().await;
    wait_linked(&mut client).await;
    let sessions = [
        client
            .launch(launch("u-1", None))
            .await
            .unwrap()
            .into_inner(),
        client
            .launch(launch("u-2", Some("acme")))
            .await
            .unwrap()
            .into_inner(),
    ];

    // The control plane is down for a while: records wait in the outbox.
    plane.switch(|s| s.down = true);
    let deadline = Instant::now() + Duration::from_secs(30);
    while link(&mut client).await.outbox_backlog < 6 {
        assert!(Instant::now() < deadline, "the outbox never filled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Back, but it stores and never acknowledges: the agent is killed
    // between send and acknowledgement.
    let before = plane.record().usage_received;
    plane.switch(|s| {
        s.down = false;
        s.hold_usage_acks = true;
    });
    plane
        .wait_for("a batch sent and not acknowledged", |r| {
            r.usage_received > before
        })
        .await;
    daemon.kill9().await;
    // Then it acknowledges every id twice and one it never got.
    plane.switch(|s| {
        s.hold_usage_acks = false;
        s.duplicate_acks = true;
    });
    daemon.restart();
    let mut client = daemon.client().await;
    wait_linked(&mut client).await;
    for session in &sessions {
        stop(&mut client, &session.id).await;
    }
    let mut totals = BTreeMap::new();
    for session in &sessions {
        let done =
            wait_for_session(&mut client, &session.id, ended(proto::EndReason::Stopped)).await;
        totals.insert(
            session.id.clone(),
            (done.device_seconds * 1000.0).round() as i64,
        );
    }
    let record = plane
        .wait_for("every second of both sessions", |r| {
            totals.iter().all(|(id, ms)| delivered_ms(r, id) == *ms)
        })
        .await;
    // Some records did arrive more than once; each counts once.
    assert!(
        record.usage_received > record.usage.len(),
        "received {} for {} records",
        record.usage_received,
        record.usage.len()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while link(&mut client).await.outbox_backlog != 0 {
        assert!(Instant::now() < deadline, "the outbox never emptied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
