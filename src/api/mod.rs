//! The gRPC API: `service` converts between protobuf and the agent's domain
//! types, `status` maps refusals to statuses, `server` binds and serves the
//! Unix socket and the mTLS TCP listener, `client` reaches a running agent.

pub mod client;
pub mod convert;
pub mod server;
pub mod service;
pub mod status;
