//! The control-plane link under a control plane that stays up but loses a
//! call now and then: one UNAVAILABLE answer to each credit-control call,
//! calls that hang past the deadline, a burst of errors and its recovery, a
//! control plane that has no policy yet (and, as grpcio servers do, sends
//! no stream headers before one), and TLS failures logged with what to
//! change. In each, launches resume within seconds, no session is stopped,
//! and every owed message arrives exactly once.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::operator::stop;
use common::plane::{Call, TestPlane, delivered_ms, ended, launch, link, test_policy, wait_linked};
use common::tls::{Ca, write};
use common::{Daemon, wait_for_session};
use gpuwarden::api::status::reason_of;
use gpuwarden::proto;
use gpuwarden::proto::node_agent_client::NodeAgentClient;
use tonic::transport::Channel;

/// A test control plane with short grants (3 s: an update every two
/// seconds) and a daemon linked to it, see `linked_daemon`.
async fn short_grants() -> (TestPlane, Daemon, NodeAgentClient<Channel>) {
    let plane = TestPlane::start(test_policy(), 30).await;
    plane.switch(|s| s.grant_seconds = 3);
    let (daemon, client) = linked_daemon(&plane).await;
    (plane, daemon, client)
}

/// A daemon on the simulated DGX A100 (six full GPUs) linked to `plane`, cutting usage every second.
async fn linked_daemon(plane: &TestPlane) -> (Daemon, NodeAgentClient<Channel>) {
    let mut daemon = Daemon::start(
        "sim-dgx-a100.toml",
        &format!("[metering]\ncheckpoint_seconds = 1\n{}", plane.agent_config),
    );
    let mut client = daemon.client().await;
    wait_linked(&mut client).await;
    (daemon, client)
}

fn running(session: &proto::Session) -> bool {
    session.state == proto::SessionState::Running as i32
}

async fn session(client: &mut NodeAgentClient<Channel>, id: &str) -> proto::Session {
    wait_for_session(client, id, |_| true).await
}

/// Stops `id`, waits for it to end STOPPED, and returns its device
/// milliseconds as the agent billed them.
async fn stop_and_total(client: &mut NodeAgentClient<Channel>, id: &str) -> i64 {
    stop(client, id).await;
    let done = wait_for_session(client, id, ended(proto::EndReason::Stopped)).await;
    (done.device_seconds * 1000.0).round() as i64
}

/// The cc_request_numbers of the updates the control plane took for
/// `session` are 1, 2, 3...: none lost, none taken twice.
fn assert_updates_in_sequence(record: &common::plane::Record, session: &str) {
    let numbers: Vec<u64> = record
        .extensions_of(session)
        .iter()
        .map(|x| x.cc_request_number)
        .collect();
    let expected: Vec<u64> = (1..=numbers.len() as u64).collect();
    assert_eq!(numbers, expected, "updates of {session}");
}

/// How the test control plane loses a call.
#[derive(Debug, Clone, Copy)]
enum Loss {
    /// It answers UNAVAILABLE at once.
    Unavailable,
    /// It never answers; the agent's deadline cuts the call.
    Hang,
}

fn lose_next(plane: &TestPlane, call: Call, loss: Loss) {
    plane.switch(|s| {
        match loss {
            Loss::Unavailable => s.fail_next.insert(call, 1),
            Loss::Hang => s.hang_next.insert(call, 1),
        };
    });
}

/// Loses `session`'s next ExtendGrant: `more` updates are then taken, in
/// sequence, and the session runs on.
async fn update_is_sent_again(
    plane: &TestPlane,
    client: &mut NodeAgentClient<Channel>,
    session: &str,
    loss: Loss,
    more: usize,
) {
    let before = plane.record().extensions_of(session).len();
    lose_next(plane, Call::ExtendGrant, loss);
    let record = plane
        .wait_for("updates after the lost one", |r| {
            r.lost_calls(Call::ExtendGrant) == 1 && r.extensions_of(session).len() >= before + more
        })
        .await;
    assert_updates_in_sequence(&record, session);
    assert!(running(&self::session(client, session).await));
}

/// Loses `session`'s ReleaseSession and stops it: the release is taken
/// once all the same, with every usage record, each once.
async fn release_is_sent_again(
    plane: &TestPlane,
    client: &mut NodeAgentClient<Channel>,
    session: &str,
    loss: Loss,
) -> common::plane::Record {
    lose_next(plane, Call::ReleaseSession, loss);
    let total_ms = stop_and_total(client, session).await;
    let record = plane
        .wait_for("the release and every usage record", |r| {
            r.releases_of(session) == 1 && delivered_ms(r, session) == total_ms
        })
        .await;
    assert_eq!(record.lost_calls(Call::ReleaseSession), 1);
    assert_eq!(
        record.usage_received,
        record.usage.len(),
        "each usage record arrived once"
    );
    record
}

#[tokio::test]
async fn one_lost_call_of_each_kind_is_sent_again_and_the_link_stays_up() {
    let (plane, _daemon, mut client) = short_grants().await;
    let up_since = link(&mut client).await.since;

    // AuthorizeSession and ReportUsage each answer UNAVAILABLE once.
    plane.switch(|s| {
        s.fail_next.insert(Call::AuthorizeSession, 1);
        s.fail_next.insert(Call::ReportUsage, 1);
    });
    let session = client
        .launch(launch("lost-authorize", None))
        .await
        .expect("one lost AuthorizeSession is sent again within the launch")
        .into_inner();
    let record = plane.record();
    assert_eq!(record.lost_calls(Call::AuthorizeSession), 1);
    assert_eq!(
        record
            .authorizations
            .iter()
            .filter(|a| a.session_id == session.id)
            .count(),
        1
    );

    // ExtendGrant answers UNAVAILABLE once: sent again, the grant goes on
    // past the one it had.
    update_is_sent_again(&plane, &mut client, &session.id, Loss::Unavailable, 2).await;

    // ReleaseSession answers UNAVAILABLE once: delivered all the same, and
    // the usage batch lost at the start too.
    let record = release_is_sent_again(&plane, &mut client, &session.id, Loss::Unavailable).await;
    assert_eq!(record.lost_calls(Call::ReportUsage), 1);
    assert_updates_in_sequence(&record, &session.id);

    // The link never went down, and launches go on.
    let after = link(&mut client).await;
    assert!(after.up);
    assert_eq!(after.since, up_since, "the link never changed state");
    client
        .launch(launch("after-lost-calls", None))
        .await
        .unwrap();
    assert_eq!(plane.record().releases_of(&session.id), 1);
}

#[tokio::test]
async fn a_call_that_hangs_past_its_deadline_refuses_one_launch_at_most_and_its_release_is_sent() {
    let (plane, _daemon, mut client) = short_grants().await;
    let up_since = link(&mut client).await.since;

    // AuthorizeSession hangs: that launch is refused at the deadline (the
    // control plane may have granted it, so its release is owed)...
    plane.switch(|s| {
        s.hang_next.insert(Call::AuthorizeSession, 1);
    });
    refused_unavailable(&mut client, "hung-authorize").await;
    // ... and the next launch goes through at once.
    let session = client
        .launch(launch("after-hang", None))
        .await
        .unwrap()
        .into_inner();
    let record = plane
        .wait_for("the release of the launch that hung", |r| {
            r.releases
                .iter()
                .any(|x| x.end_reason == proto::EndReason::LaunchFailed as i32)
        })
        .await;
    let hung = record
        .releases
        .iter()
        .find(|x| x.end_reason == proto::EndReason::LaunchFailed as i32)
        .unwrap()
        .session_id
        .clone();
    assert_ne!(hung, session.id);

    // ExtendGrant hangs past the end of the grant: the session runs on and
    // the update is sent again.
    update_is_sent_again(&plane, &mut client, &session.id, Loss::Hang, 1).await;

    // ReleaseSession hangs: sent again.
    let record = release_is_sent_again(&plane, &mut client, &session.id, Loss::Hang).await;
    assert_eq!(record.releases_of(&hung), 1);

    let after = link(&mut client).await;
    assert!(after.up);
    assert_eq!(after.since, up_since, "the link never changed state");
}

#[tokio::test]
async fn after_bursts_of_errors_launches_resume_within_seconds_and_nothing_owed_is_lost() {
    let (plane, _daemon, mut client) = short_grants().await;
    let kept = client
        .launch(launch("burst-kept", None))
        .await
        .unwrap()
        .into_inner();
    let stopped = client
        .launch(launch("burst-stopped", Some("acme")))
        .await
        .unwrap()
        .into_inner();

    // Every call fails, the policy stream stays open: the link goes down.
    plane.switch(|s| s.down = true);
    let deadline = Instant::now() + Duration::from_secs(30);
    while link(&mut client).await.up {
        assert!(Instant::now() < deadline, "the link never went down");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    refused_unavailable(&mut client, "burst-refused").await;
    // A release and usage become owed while it is down.
    let total_ms = stop_and_total(&mut client, &stopped.id).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while link(&mut client).await.outbox_backlog == 0 {
        assert!(Instant::now() < deadline, "no usage waited");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // It answers again: launches resume within seconds.
    plane.switch(|s| s.down = false);
    launches_resume(&mut client, "burst-resumed").await;
    let record = plane
        .wait_for("the release and all usage owed", |r| {
            r.releases_of(&stopped.id) == 1 && delivered_ms(r, &stopped.id) == total_ms
        })
        .await;
    assert_eq!(record.usage_received, record.usage.len());
    assert_updates_in_sequence(&record, &kept.id);

    // A burst that only the credit calls see, while status reports are
    // answered: three lost AuthorizeSessions in a row refuse a launch; the
    // next answer of any call brings launches back.
    let stopped = client
        .launch(launch("credit-burst-stopped", None))
        .await
        .unwrap()
        .into_inner();
    plane.switch(|s| {
        s.fail_next.insert(Call::AuthorizeSession, 3);
        s.fail_next.insert(Call::ExtendGrant, 3);
        s.fail_next.insert(Call::ReleaseSession, 3);
        s.fail_next.insert(Call::ReportUsage, 3);
    });
    refused_unavailable(&mut client, "credit-burst-refused").await;
    let total_ms = stop_and_total(&mut client, &stopped.id).await;
    launches_resume(&mut client, "credit-burst-resumed").await;
    let record = plane
        .wait_for("every lost call sent again and taken once", |r| {
            [Call::ExtendGrant, Call::ReleaseSession, Call::ReportUsage]
                .iter()
                .all(|call| r.lost_calls(*call) >= 3)
                && r.releases_of(&stopped.id) == 1
                && delivered_ms(r, &stopped.id) == total_ms
        })
        .await;
    assert_eq!(record.usage_received, record.usage.len());
    assert_updates_in_sequence(&record, &kept.id);

    // The session whose grant ran out during the bursts was not stopped.
    assert!(running(&session(&mut client, &kept.id).await));
    let deadline = Instant::now() + Duration::from_secs(30);
    while link(&mut client).await.outbox_backlog != 0 {
        assert!(Instant::now() < deadline, "the outbox never emptied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A launch (as u-alice, personal) is refused CONTROL_PLANE_UNAVAILABLE.
async fn refused_unavailable(
    client: &mut NodeAgentClient<Channel>,
    request_id: &str,
) -> tonic::Status {
    let status = client.launch(launch(request_id, None)).await.unwrap_err();
    assert_eq!(
        reason_of(&status).as_deref(),
        Some("CONTROL_PLANE_UNAVAILABLE"),
        "{status:?}"
    );
    status
}

/// Launches (as u-alice, personal) until one goes through: within ten
/// seconds, each refusal CONTROL_PLANE_UNAVAILABLE.
async fn launches_resume(client: &mut NodeAgentClient<Channel>, request_id: &str) {
    let began = Instant::now();
    loop {
        match client.launch(launch(request_id, None)).await {
            Ok(_) => break,
            Err(status) => {
                assert_eq!(
                    reason_of(&status).as_deref(),
                    Some("CONTROL_PLANE_UNAVAILABLE")
                );
                assert!(
                    began.elapsed() < Duration::from_secs(10),
                    "launches did not resume: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test]
async fn a_control_plane_without_a_policy_yet_has_the_node_registered_and_reporting() {
    // Its WatchPolicy sends no response headers before the first policy.
    let plane = TestPlane::start_without_policy(30).await;
    let mut daemon = Daemon::start("sim-h100-pair.toml", &plane.agent_config);
    let mut client = daemon.client().await;
    plane
        .wait_for("a status report", |r| !r.statuses.is_empty())
        .await;
    let state = link(&mut client).await;
    assert!(state.up, "registered: the link is up");
    assert_eq!(state.policy_version, 0);
    let status = refused_unavailable(&mut client, "no-policy").await;
    assert!(status.message().contains("no policy"), "{status:?}");

    plane.publish(1, test_policy());
    wait_linked(&mut client).await;
    client.launch(launch("policy-came", None)).await.unwrap();
}

#[tokio::test]
async fn a_link_that_does_not_come_up_for_a_certificate_problem_says_which() {
    let plane = TestPlane::start(test_policy(), 30).await;
    let dir = tempfile::tempdir().unwrap();

    let other = Ca::new("another CA");
    let with = |key: &str, path: &str| -> String {
        plane
            .agent_config
            .lines()
            .map(|line| {
                if line.starts_with(&format!("{key} = ")) {
                    format!("{key} = \"{path}\"\n")
                } else {
                    format!("{line}\n")
                }
            })
            .collect()
    };
    // control_plane.ca is another CA than the one that signed the server.
    let unknown_ca = with("ca", &write(dir.path(), "other-ca.pem", &other.cert.pem()));
    // The agent's own certificate is signed by a CA the server does not trust.
    let (cert, key) = other.issue("agent", rcgen::ExtendedKeyUsagePurpose::ClientAuth);
    let untrusted_agent = with("tls_cert", &write(dir.path(), "agent.pem", &cert));
    let untrusted_agent = untrusted_agent.replace(
        plane
            .agent_config
            .lines()
            .find(|l| l.starts_with("tls_key = "))
            .unwrap(),
        &format!("tls_key = \"{}\"", write(dir.path(), "agent.key", &key)),
    );
    // The endpoint names the host by address; the certificate names localhost.
    let wrong_name = plane
        .agent_config
        .replace("https://localhost:", "https://127.0.0.1:");

    let mut daemons = Vec::new();
    for (config, words) in [
        (
            unknown_ca,
            ["does not come up", "unknown CA", "control_plane.ca"],
        ),
        (
            wrong_name,
            ["does not come up", "wrong name", "endpoint's host"],
        ),
        // Under TLS 1.3 the server's refusal of the agent's certificate
        // races its closing of the connection: the agent may read its alert
        // (and then names the problem) or only a closed connection. Either
        // way the link does not come up and says so.
        (
            untrusted_agent,
            ["does not come up", "RegisterNode", "unreachable"],
        ),
    ] {
        let mut daemon = Daemon::start_logged("sim-h100-pair.toml", &config);
        let mut client = daemon.client().await;
        let line = daemon.wait_for_log(&words).await;
        assert!(line.contains("WARN"), "logged at the default level: {line}");
        assert!(!link(&mut client).await.up);
        daemons.push(daemon);
    }
    assert!(plane.record().registrations.is_empty());
}
