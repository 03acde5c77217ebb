//! gpuwarden: the per-host agent of a GPU cloud. It discovers the host's
//! GPUs and MIG instances (`gpu`), serves them and the session API over gRPC
//! (`api`), and grows session launch, metering and enforcement from there.

pub mod agent;
pub mod allocation;
pub mod api;
pub mod clock;
pub mod config;
pub mod control_plane;
pub mod ctl;
pub mod daemon;
pub mod error;
pub mod events;
pub mod gpu;
pub mod inventory;
pub mod ledger;
pub mod logging;
pub mod metering;
pub mod metrics;
pub mod policy;
pub mod runtime;
pub mod session;
pub mod systemd;
pub mod toml_file;

/// Generated from `proto/gpuwarden/v1/*.proto`.
#[allow(
    unused_qualifications,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic
)]
pub mod proto {
    tonic::include_proto!("gpuwarden.v1");

    /// The encoded descriptors of the protos, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("gpuwarden_descriptor");
}
