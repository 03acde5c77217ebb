//! Hostile input: what a careless or malicious client can put on the wire,
//! sent to the real daemon over its Unix socket. Each request gets a clear
//! refusal that names what to change (INVALID_ARGUMENT for what the agent
//! decodes; what tonic refuses before the agent sees it is checked as tonic
//! answers it), no container is created, and the daemon stays up: a
//! GetInventory after each succeeds.
//!
//! The last test replays the fuzz seeds (`fuzz/seeds/`), the inputs that
//! once crashed a fuzz target (`fuzz/regressions/`) and a few thousand
//! pseudo-random mutations of them (fixed seed) through the four parsers
//! the fuzz targets cover, with the fuzz targets' own checks
//! (`fuzz/src/lib.rs`): the bounded fuzzing that `cargo test` does without
//! cargo-fuzz. `scripts/fuzz.sh` runs the coverage-guided fuzzers.

#![allow(clippy::unwrap_used)]

mod common;

#[path = "../fuzz/src/lib.rs"]
mod fuzz_checks;

use std::path::{Path, PathBuf};

use common::Daemon;
use common::launch::{SLEEP, exact, gpus, launch_request};
use gpuwarden::api::status::reason_of;
use gpuwarden::proto;
use gpuwarden::proto::node_agent_client::NodeAgentClient;
use prost::Message;
use prost::bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// tonic's default limit on a decoded request, which the agent keeps.
const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// A launch the daemon would accept (one GPU of the H100 pair, personal).
fn good_request(request_id: &str) -> proto::LaunchRequest {
    launch_request(request_id, gpus(1), SLEEP)
}

fn container(request: &mut proto::LaunchRequest) -> &mut proto::ContainerSpec {
    request.container.as_mut().unwrap()
}

/// The daemon still answers.
async fn still_up(client: &mut NodeAgentClient<Channel>) {
    let inventory = client
        .get_inventory(proto::GetInventoryRequest {})
        .await
        .expect("the daemon answers GetInventory after hostile input")
        .into_inner();
    assert_eq!(inventory.devices.len(), 2);
}

/// A refusal that is INVALID_ARGUMENT with the given reason, whose message
/// is short and contains `hint` (what to change).
fn assert_invalid(status: &Status, reason: &str, hint: &str, case: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{case}: {status:?}");
    assert_eq!(reason_of(status).as_deref(), Some(reason), "{case}");
    assert!(
        status.message().contains(hint),
        "{case}: the message does not say `{hint}`: {}",
        status.message()
    );
    assert!(
        status.message().len() < 1024,
        "{case}: a message of {} bytes",
        status.message().len()
    );
}

fn no_containers(daemon: &Daemon) {
    let containers = daemon.all_containers();
    assert!(
        containers.is_empty(),
        "containers were created: {containers}"
    );
}

// ---- raw gRPC: bytes the generated client would never send ----

/// Sends its bytes as the message, unchanged; returns the response's bytes.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

#[derive(Debug)]
struct RawEncoder;

#[derive(Debug)]
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// Calls Launch with `body` as the request message's bytes.
async fn raw_launch(channel: Channel, body: Vec<u8>) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(body),
        PathAndQuery::from_static("/gpuwarden.v1.NodeAgent/Launch"),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// A length-delimited protobuf field.
fn len_field(number: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_key(number, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(payload.len() as u64, &mut out);
    out.extend_from_slice(payload);
    out
}

/// `good_request` followed by a second `container` (field 6), which
/// protobuf merges into the first: a way to add what prost's types cannot
/// hold, such as an env entry that is not UTF-8.
fn with_container_bytes(request_id: &str, container: &[u8]) -> Vec<u8> {
    let mut bytes = good_request(request_id).encode_to_vec();
    bytes.extend(len_field(6, container));
    bytes
}

/// An env entry (ContainerSpec.env is field 3; a map entry is key 1, value 2).
fn env_entry(key: &[u8], value: &[u8]) -> Vec<u8> {
    len_field(3, &[len_field(1, key), len_field(2, value)].concat())
}

#[tokio::test]
async fn oversized_undecodable_and_deeply_nested_messages_are_refused_and_the_daemon_stays_up() {
    let mut daemon = Daemon::start("sim-h100-pair.toml", "");
    let mut client = daemon.client().await;
    let channel = daemon.channel().await;

    // Over the limit: refused before the agent decodes anything, as
    // INVALID_REQUEST naming the limit (tonic's own answer, OUT_OF_RANGE, is
    // rewritten by the server's layer).
    let mut request = good_request("oversized");
    container(&mut request)
        .env
        .insert("BIG".into(), "x".repeat(MAX_REQUEST_BYTES + 1));
    let status = client.launch(request).await.unwrap_err();
    assert_invalid(
        &status,
        "INVALID_REQUEST",
        &format!("the limit is: {MAX_REQUEST_BYTES} bytes"),
        "oversized",
    );
    assert!(
        status.message().contains("too large"),
        "{}",
        status.message()
    );
    still_up(&mut client).await;

    // Just under the limit, in the field with no count limit: decoded, then
    // refused by the agent as a command too long to exec.
    let mut request = good_request("huge-command");
    container(&mut request).command = vec!["x".repeat(MAX_REQUEST_BYTES - 4096)];
    let status = client.launch(request).await.unwrap_err();
    assert_invalid(
        &status,
        "INVALID_REQUEST",
        "container.command[0] is",
        "huge argument",
    );
    still_up(&mut client).await;

    // Bytes that are not a LaunchRequest, and protobuf groups nested 100 000
    // deep: prost refuses both (its recursion limit is 100), the agent never
    // sees them.
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let depth = 100_000;
    let mut nested = Vec::new();
    for _ in 0..depth {
        prost::encoding::encode_key(99, prost::encoding::WireType::StartGroup, &mut nested);
    }
    for _ in 0..depth {
        prost::encoding::encode_key(99, prost::encoding::WireType::EndGroup, &mut nested);
    }
    let mut nested_in_container = good_request("nested").encode_to_vec();
    nested_in_container.extend(len_field(6, &nested));
    let truncated = {
        let bytes = good_request("truncated").encode_to_vec();
        bytes[..bytes.len() - 3].to_vec()
    };
    for (case, body) in [
        ("garbage", garbage),
        ("nested groups", nested),
        ("nested groups in the container", nested_in_container),
        ("truncated", truncated),
        (
            "a length past the end",
            vec![0x32, 0xff, 0xff, 0xff, 0x0f, 0x01],
        ),
    ] {
        let status = raw_launch(channel.clone(), body).await.unwrap_err();
        assert_invalid(&status, "INVALID_REQUEST", "decode", case);
        assert!(
            status
                .message()
                .contains("not a readable gpuwarden.v1 message"),
            "{case}: {}",
            status.message()
        );
        still_up(&mut client).await;
    }

    // Invalid UTF-8 in proto `string` fields: an env value, an env name,
    // the image. prost refuses them while decoding, naming the field.
    for (case, container_bytes, field) in [
        (
            "env value",
            env_entry(b"GOOD", b"\xff\xfe bad"),
            "ContainerSpec.env",
        ),
        (
            "env name",
            env_entry(b"\xc3\x28", b"x"),
            "ContainerSpec.env",
        ),
        ("image", len_field(1, b"busybox\xff"), "ContainerSpec.image"),
    ] {
        let body = with_container_bytes(&format!("utf8-{case}"), &container_bytes);
        let status = raw_launch(channel.clone(), body).await.unwrap_err();
        assert_invalid(&status, "INVALID_REQUEST", field, case);
        assert!(
            status.message().contains("UTF-8"),
            "{case}: {}",
            status.message()
        );
        still_up(&mut client).await;
    }

    // The same raw path with well-formed bytes reaches the agent, which
    // refuses what it should: the raw client is not what is refused above.
    let body = with_container_bytes(
        "raw-device-variable",
        &env_entry(b"NVIDIA_VISIBLE_DEVICES", b"all"),
    );
    let status = raw_launch(channel.clone(), body).await.unwrap_err();
    assert_invalid(
        &status,
        "FORBIDDEN_CONTAINER_OPTION",
        "NVIDIA_VISIBLE_DEVICES",
        "raw device variable",
    );
    still_up(&mut client).await;
    no_containers(&daemon);
}

#[tokio::test]
async fn hostile_fields_get_invalid_argument_naming_what_to_change() {
    let mut daemon = Daemon::start("sim-h100-pair.toml", "");
    let mut client = daemon.client().await;
    type Change = Box<dyn FnOnce(&mut proto::LaunchRequest)>;
    let uuids = |list: &[&str]| -> Change {
        let devices = exact(list);
        Box::new(move |r| r.devices = Some(devices))
    };
    let volume = |name: &str, target: &str| -> Change {
        let mount = proto::VolumeMount {
            name: name.into(),
            target: target.into(),
            read_only: false,
        };
        Box::new(move |r| container(r).volumes = vec![mount])
    };
    let huge = "\u{1}x".repeat(1 << 20);
    let cases: Vec<(&str, &str, &str, Change)> = vec![
        // Thousands of env entries, and env that is too big in bytes.
        (
            "5000 env entries",
            "INVALID_REQUEST",
            "container.env has 5000 entries; at most 1024",
            Box::new(|r| {
                container(r).env = (0..5000).map(|i| (format!("V{i}"), "x".into())).collect()
            }),
        ),
        (
            "1000 env entries of 1 KiB",
            "INVALID_REQUEST",
            "at most 262144",
            Box::new(|r| {
                container(r).env = (0..1000)
                    .map(|i| (format!("V{i}"), "x".repeat(1024)))
                    .collect()
            }),
        ),
        (
            "env name with =",
            "INVALID_REQUEST",
            "is not a variable name",
            Box::new(|r| {
                container(r).env.insert("A=B".into(), "x".into());
            }),
        ),
        (
            "empty env name",
            "INVALID_REQUEST",
            "is not a variable name",
            Box::new(|r| {
                container(r).env.insert(String::new(), "x".into());
            }),
        ),
        (
            "NUL in an env value",
            "INVALID_REQUEST",
            "NUL",
            Box::new(|r| {
                container(r).env.insert("A".into(), "x\0y".into());
            }),
        ),
        (
            "a huge env name",
            "INVALID_REQUEST",
            "bytes)",
            Box::new({
                let huge = huge.clone();
                move |r| {
                    container(r).env.insert(huge, "x".into());
                }
            }),
        ),
        // Huge command lines.
        (
            "2000 arguments",
            "INVALID_REQUEST",
            "container.command has 2000 arguments; at most 1024",
            Box::new(|r| container(r).command = vec!["x".into(); 2000]),
        ),
        (
            "3 x 100 KB of arguments",
            "INVALID_REQUEST",
            "container.command is 300000 bytes",
            Box::new(|r| container(r).command = vec!["x".repeat(100_000); 3]),
        ),
        (
            "NUL in an argument",
            "INVALID_REQUEST",
            "container.command[1] contains a NUL byte",
            Box::new(|r| container(r).command = vec!["sh".into(), "-c\0rm".into()]),
        ),
        // Bogus device UUIDs: not UUIDs at all, and well-formed unknown ones.
        (
            "not a UUID",
            "INVALID_REQUEST",
            "is not a device UUID",
            uuids(&["not-a-uuid"]),
        ),
        (
            "an empty UUID",
            "INVALID_REQUEST",
            "is not a device UUID",
            uuids(&[""]),
        ),
        (
            "a device path as UUID",
            "INVALID_REQUEST",
            "is not a device UUID",
            uuids(&["/dev/nvidia0"]),
        ),
        (
            "a UUID with spaces",
            "INVALID_REQUEST",
            "is not a device UUID",
            uuids(&["GPU-1 GPU-2"]),
        ),
        (
            "a 1 MiB UUID",
            "INVALID_REQUEST",
            "bytes)",
            uuids(&[&huge[..1 << 20]]),
        ),
        (
            "65 UUIDs",
            "INVALID_REQUEST",
            "at most 64 per session",
            uuids(&["GPU-x"; 65]),
        ),
        (
            "a huge gpu_model",
            "INVALID_REQUEST",
            "devices.gpu_model",
            Box::new({
                let huge = huge.clone();
                move |r| r.devices.as_mut().unwrap().gpu_model = huge
            }),
        ),
        // Volume names with path tricks, and bad targets.
        (
            "volume ../x",
            "FORBIDDEN_CONTAINER_OPTION",
            "host bind mounts are not allowed",
            volume("../x", "/data"),
        ),
        (
            "volume /etc",
            "FORBIDDEN_CONTAINER_OPTION",
            "host bind mounts are not allowed",
            volume("/etc", "/data"),
        ),
        (
            "volume a/b",
            "FORBIDDEN_CONTAINER_OPTION",
            "host bind mounts are not allowed",
            volume("a/b", "/data"),
        ),
        (
            "volume .",
            "FORBIDDEN_CONTAINER_OPTION",
            "host bind mounts are not allowed",
            volume(".", "/data"),
        ),
        (
            "volume ~root",
            "FORBIDDEN_CONTAINER_OPTION",
            "host bind mounts are not allowed",
            volume("~root", "/data"),
        ),
        (
            "volume with NUL",
            "INVALID_REQUEST",
            "container.volumes.name",
            volume("a\0b", "/data"),
        ),
        (
            "volume with a dot",
            "INVALID_REQUEST",
            "has a `.`",
            volume("x.data", "/data"),
        ),
        (
            "empty volume name",
            "INVALID_REQUEST",
            "container.volumes.name",
            volume("", "/data"),
        ),
        (
            "relative target",
            "INVALID_REQUEST",
            "must be an absolute path",
            volume("data", "data"),
        ),
        (
            "target /",
            "INVALID_REQUEST",
            "must be an absolute path",
            volume("data", "/"),
        ),
        (
            "target with ..",
            "INVALID_REQUEST",
            "without `.` or `..`",
            volume("data", "/data/../etc"),
        ),
        // Ids and the image.
        (
            "a principal that is a path",
            "INVALID_REQUEST",
            "principal.subject",
            Box::new(|r| r.principal.as_mut().unwrap().subject = "../u-alice".into()),
        ),
        (
            // 4 KiB, not 1 MiB: the agent still logs and audits the raw
            // principal of a refused request (see the ignored test below).
            "a long principal",
            "INVALID_REQUEST",
            "bytes)",
            Box::new({
                let long = huge[..4096].to_owned();
                move |r| r.principal.as_mut().unwrap().subject = long
            }),
        ),
        (
            "a request id with a newline",
            "INVALID_REQUEST",
            "request_id",
            Box::new(|r| r.request_id = "a\nb".into()),
        ),
        (
            "an image that is a path",
            "INVALID_REQUEST",
            "container.image",
            Box::new(|r| container(r).image = "../../etc/passwd".into()),
        ),
        (
            "an uppercase image",
            "INVALID_REQUEST",
            "container.image",
            Box::new(|r| container(r).image = "BusyBox".into()),
        ),
        (
            "a huge network mode",
            "FORBIDDEN_CONTAINER_OPTION",
            "bytes)",
            Box::new(move |r| container(r).network_mode = huge),
        ),
        (
            "an unknown scope",
            "INVALID_REQUEST",
            "is not a Scope",
            Box::new(|r| r.scope = 99),
        ),
    ];
    for (i, (case, reason, hint, change)) in cases.into_iter().enumerate() {
        let mut request = good_request(&format!("hostile-{i}"));
        change(&mut request);
        let status = client.launch(request).await.unwrap_err();
        assert_invalid(&status, reason, hint, case);
        if reason == "FORBIDDEN_CONTAINER_OPTION" {
            let info = status.get_details_error_info().unwrap();
            assert!(info.metadata.contains_key("option"), "{case}: {info:?}");
        }
        still_up(&mut client).await;
    }

    // A well-formed UUID this node does not have is NOT_FOUND, naming it.
    let mut request = good_request("unknown-uuid");
    request.devices = Some(exact(&["GPU-00000000-0000-0000-0000-000000000000"]));
    let status = client.launch(request).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(reason_of(&status).as_deref(), Some("UNKNOWN_DEVICE"));
    assert!(status.message().contains("GetInventory"), "{status:?}");
    still_up(&mut client).await;
    no_containers(&daemon);
}

/// A refused request is recorded (log, audit trail, events) with what it
/// said about itself; recording megabytes of it per request would let any
/// client fill the state directory, and with it stop every launch.
#[tokio::test]
async fn a_huge_refused_request_leaves_a_bounded_record() {
    let mut daemon = Daemon::start("sim-h100-pair.toml", "");
    let mut client = daemon.client().await;
    let huge = "y".repeat(1 << 20);
    let mut request = good_request(&huge);
    request.principal.as_mut().unwrap().subject = huge.clone();
    request.scope = proto::Scope::Org.into();
    request.org_id = huge.clone();
    let status = client.launch(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let entries = client
        .list_audit(proto::ListAuditRequest {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let refusal = entries
        .iter()
        .find(|e| e.action == "refuse")
        .expect("the refusal is audited");
    let size = refusal.actor.len() + refusal.account_id.len() + refusal.detail.len();
    assert!(size < 4096, "an audit entry of {size} bytes");
    still_up(&mut client).await;
}

// ---- the fuzz corpus, replayed without cargo-fuzz ----

/// xorshift64*: a fixed sequence, so a failure here replays.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Tokens worth splicing into TOML and protobuf inputs.
const TOKENS: &[&[u8]] = &[
    b"\n",
    b"=",
    b"\"",
    b"'",
    b"[",
    b"]",
    b"[[",
    b"]]",
    b"{",
    b"}",
    b",",
    b".",
    b"-",
    b"0",
    b"-1",
    b"4294967296",
    b"9223372036854775807",
    b"-9223372036854775808",
    b"1e309",
    b"nan",
    b"inf",
    b"-0.0",
    b"true",
    b"\"\"",
    b"\\u0000",
    b"1979-05-27T07:32:00Z",
    b"9999-12-31T23:59:59Z",
    b"0000-01-01T00:00:00Z",
    b"GPU-",
    b"MIG-",
    b"parent = \"",
    b"[[orgs]]\nid = \"o\"\n",
    b"[[gpus.mig_instances]]\n",
    b"\xff",
    b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",
    b"\x0b",
    b"\x0c",
];

fn mutate(rng: &mut Rng, input: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(7) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] = rng.next() as u8;
            }
            2 => {
                let token = TOKENS[rng.below(TOKENS.len())];
                out.splice(at..at, token.iter().copied());
            }
            3 if !out.is_empty() => {
                let end = (at + 1 + rng.below(64)).min(out.len());
                out.drain(at.min(end)..end);
            }
            4 if !out.is_empty() => {
                let start = rng.below(out.len());
                let end = (start + 1 + rng.below(256)).min(out.len());
                let copy = out[start..end].to_vec();
                out.splice(at..at, copy);
            }
            5 if !others.is_empty() => {
                let other = &others[rng.below(others.len())];
                let start = rng.below(other.len() + 1);
                let end = (start + rng.below(512)).min(other.len());
                out.splice(at..at, other[start..end].iter().copied());
            }
            _ => out.truncate(at),
        }
    }
    out
}

fn files_in(dir: &Path) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
    paths.sort();
    paths
        .into_iter()
        .filter(|p| p.is_file())
        .map(|p| std::fs::read(p).unwrap())
        .collect()
}

/// The committed inputs of a fuzz target: its seeds and its regressions.
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut inputs = files_in(&root.join("seeds").join(target));
    inputs.extend(files_in(&root.join("regressions").join(target)));
    inputs
}

fn text_check(check: fn(&str)) -> impl Fn(&[u8]) {
    move |bytes| {
        if let Ok(text) = std::str::from_utf8(bytes) {
            check(text);
        }
    }
}

#[test]
fn the_fuzz_corpus_and_its_mutations_pass_the_fuzz_checks() {
    const MUTATIONS_PER_TARGET: usize = 2000;
    type Check = Box<dyn Fn(&[u8])>;
    let targets: [(&str, Check); 4] = [
        ("launch_proto", Box::new(fuzz_checks::check_launch_bytes)),
        ("policy", Box::new(text_check(fuzz_checks::check_policy))),
        ("config", Box::new(text_check(fuzz_checks::check_config))),
        ("fixture", Box::new(text_check(fuzz_checks::check_fixture))),
    ];
    for (target, check) in targets {
        let inputs = corpus(target);
        assert!(
            inputs.len() >= 3,
            "fuzz/seeds/{target} has {} inputs",
            inputs.len()
        );
        for input in &inputs {
            check(input);
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ target.len() as u64);
        for i in 0..MUTATIONS_PER_TARGET {
            let seed = &inputs[i % inputs.len()];
            let input = mutate(&mut rng, seed, &inputs);
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&input)));
            if outcome.is_err() {
                let path = std::env::temp_dir().join(format!("gpuwarden-{target}-crash-{i}"));
                std::fs::write(&path, &input).unwrap();
                panic!(
                    "{target}: mutation {i} panicked; the input is in {} (replay it with \
                     `scripts/fuzz.sh --replay {target} FILE`)",
                    path.display()
                );
            }
        }
    }
}
