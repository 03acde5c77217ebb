//! The TCP listener speaks mutual TLS only: a client with a certificate from
//! `client_ca` is served, one without a certificate or with one from another
//! CA is refused. Certificates are made at test time.

#![allow(clippy::unwrap_used)]

mod common;

use common::Daemon;
use common::tls::{Ca, free_port, write};
use gpuwarden::proto;
use gpuwarden::proto::node_agent_client::NodeAgentClient;
use rcgen::ExtendedKeyUsagePurpose;
use tonic::transport::{self, Channel, ClientTlsConfig, Identity};

async fn inventory_over_tls(
    port: u16,
    server_ca: &Ca,
    identity: Option<(String, String)>,
) -> Result<proto::Inventory, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(transport::Certificate::from_pem(server_ca.cert.pem()))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| gpuwarden::error::chain(&e))?;
    NodeAgentClient::new(channel)
        .get_inventory(proto::GetInventoryRequest {})
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| status.to_string())
}

#[tokio::test]
async fn the_tcp_listener_serves_only_clients_with_a_certificate_from_client_ca() {
    let tls_dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("gpuwarden test server CA");
    let client_ca = Ca::new("gpuwarden test client CA");
    let other_ca = Ca::new("someone else's CA");
    let (server_cert, server_key) =
        server_ca.issue("localhost", ExtendedKeyUsagePurpose::ServerAuth);
    let port = free_port();
    let extra = format!(
        "listen = \"127.0.0.1:{port}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\nclient_ca = \"{}\"\n",
        write(tls_dir.path(), "server.pem", &server_cert),
        write(tls_dir.path(), "server.key", &server_key),
        write(tls_dir.path(), "client-ca.pem", &client_ca.cert.pem()),
    );
    let mut daemon = Daemon::start("sim-h100-pair.toml", &extra);
    // The Unix socket and the TCP listener are bound before either serves.
    daemon.channel().await;

    let good = client_ca.issue("ops", ExtendedKeyUsagePurpose::ClientAuth);
    let inventory = inventory_over_tls(port, &server_ca, Some(good))
        .await
        .unwrap();
    assert_eq!(inventory.devices.len(), 2);

    let refused = inventory_over_tls(port, &server_ca, None).await;
    assert!(
        refused.is_err(),
        "a client without a certificate was served"
    );

    let stranger = other_ca.issue("ops", ExtendedKeyUsagePurpose::ClientAuth);
    let refused = inventory_over_tls(port, &server_ca, Some(stranger)).await;
    assert!(
        refused.is_err(),
        "a client with a certificate from another CA was served"
    );
}

#[tokio::test]
async fn unreadable_tls_files_stop_the_start_with_the_config_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gpuwarden.toml");
    std::fs::write(
        &config,
        format!(
            "node_id = \"n\"\nstate_dir = \"{0}/state\"\n[gpu]\nbackend = \"simulated\"\nfixture = \"{1}\"\n\
             [api]\nunix_socket = \"{0}/s.sock\"\nlisten = \"127.0.0.1:{2}\"\n\
             tls_cert = \"{0}/missing.pem\"\ntls_key = \"{0}/missing.key\"\nclient_ca = \"{0}/ca.pem\"\n",
            dir.path().display(),
            common::fixture("sim-h100-pair.toml").display(),
            free_port(),
        ),
    )
    .unwrap();
    let out = common::gpuwarden(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot read api.tls_cert"), "{stderr}");
    assert!(stderr.contains("missing.pem"), "{stderr}");
}
