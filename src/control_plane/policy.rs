//! The control plane's policy snapshot in the policy file's form, so one
//! validation ([`Policy::from_document`]) serves the file and the stream:
//! a snapshot the file would refuse is refused too, naming the key.

use std::collections::HashSet;
use std::path::Path;
use std::time::SystemTime;

use crate::gpu::DeviceUuid;
use crate::metering::Credits;
use crate::policy::{
    EnforcementFile, LoadedPolicy, MemberFile, OnBalanceExhausted, OrgFile, Plan, Policy,
    PolicyFile, ReservationBilling, ReservationFile, Role, ServiceAccountFile, UserFile,
    WindowFile,
};
use crate::proto;
use crate::toml_file::FileError;

/// Validates policy `version` from the control plane.
pub fn from_snapshot(
    version: u64,
    snapshot: proto::Policy,
    host_devices: Option<&HashSet<DeviceUuid>>,
) -> Result<LoadedPolicy, FileError> {
    let origin = format!("control plane policy v{version}");
    let origin = Path::new(&origin);
    let document = document(origin, snapshot)?;
    Policy::from_document(origin, document, host_devices)
}

fn credits(value: Option<proto::Credits>) -> Option<f64> {
    value.map(|c| Credits(c.nano_credits).as_f64())
}

/// A plan by the name the policy file uses for it (serde's mapping, so the
/// two never disagree); empty is none.
fn plan(origin: &Path, key: String, text: &str) -> Result<Option<Plan>, FileError> {
    use serde::Deserialize as _;
    use serde::de::IntoDeserializer as _;
    if text.is_empty() {
        return Ok(None);
    }
    Plan::deserialize(text.into_deserializer())
        .map(Some)
        .map_err(|error: serde::de::value::Error| {
            FileError::invalid(origin, key, format!("plan: {error}"))
        })
}

fn time(at: Option<prost_types::Timestamp>) -> String {
    at.and_then(|t| SystemTime::try_from(t).ok())
        .map(|t| humantime::format_rfc3339_nanos(t).to_string())
        .unwrap_or_default()
}

fn document(origin: &Path, snapshot: proto::Policy) -> Result<PolicyFile, FileError> {
    let mut rates: std::collections::BTreeMap<String, f64> = snapshot
        .rates
        .into_iter()
        .map(|(class, rate)| (class, Credits(rate.nano_credits).as_f64()))
        .collect();
    if let Some(default) = credits(snapshot.default_rate) {
        rates.insert("default".into(), default);
    }
    let enforcement = snapshot
        .enforcement
        .map(|e| EnforcementFile {
            min_balance_seconds: Some(u64::from(e.min_balance_seconds)),
            on_balance_exhausted: match proto::OnBalanceExhausted::try_from(e.on_balance_exhausted)
            {
                Ok(proto::OnBalanceExhausted::Continue) => Some(OnBalanceExhausted::Continue),
                Ok(proto::OnBalanceExhausted::Stop) => Some(OnBalanceExhausted::Stop),
                _ => None,
            },
            grace_seconds: Some(u64::from(e.grace_seconds)),
        })
        .unwrap_or_default();
    let mut users = Vec::with_capacity(snapshot.users.len());
    for (index, user) in snapshot.users.into_iter().enumerate() {
        let plan = plan(origin, format!("users[{index}].plan"), &user.plan)?.ok_or_else(|| {
            FileError::invalid(
                origin,
                format!("users[{index}].plan"),
                "a user needs a plan",
            )
        })?;
        users.push(UserFile {
            id: user.id,
            email: Some(user.email),
            plan,
            max_sessions: user.max_sessions,
            balance: credits(user.balance),
        });
    }
    let mut orgs = Vec::with_capacity(snapshot.orgs.len());
    for (index, org) in snapshot.orgs.into_iter().enumerate() {
        let mut members = Vec::with_capacity(org.members.len());
        for (m, member) in org.members.into_iter().enumerate() {
            let role = match proto::OrgRole::try_from(member.role) {
                Ok(proto::OrgRole::Owner) => Role::Owner,
                Ok(proto::OrgRole::Admin) => Role::Admin,
                Ok(proto::OrgRole::Member) => Role::Member,
                _ => {
                    return Err(FileError::invalid(
                        origin,
                        format!("orgs[{index}].members[{m}].role"),
                        "a member needs a role: owner, admin or member",
                    ));
                }
            };
            members.push(MemberFile {
                user: member.user,
                role,
            });
        }
        let is_sub_account = !org.parent.is_empty();
        orgs.push(OrgFile {
            id: org.id,
            name: Some(org.name),
            plan: plan(origin, format!("orgs[{index}].plan"), &org.plan)?,
            parent: is_sub_account.then_some(org.parent),
            max_sessions: org.max_sessions,
            // A sub-account has no balance of its own: an unset or zero one
            // is not one.
            balance: credits(org.balance).filter(|b| !(is_sub_account && *b == 0.0)),
            members,
            service_accounts: org
                .service_accounts
                .into_iter()
                .map(|sa| ServiceAccountFile {
                    id: sa.id,
                    name: Some(sa.name),
                })
                .collect(),
        });
    }
    let reservations = snapshot
        .reservations
        .into_iter()
        .map(|r| ReservationFile {
            org: r.org,
            devices: r.devices,
            windows: r
                .windows
                .into_iter()
                .map(|w| WindowFile {
                    start: time(w.start),
                    end: time(w.end),
                })
                .collect(),
            billing: match proto::BillingPath::try_from(r.billing) {
                Ok(proto::BillingPath::Balance) => ReservationBilling::Balance,
                _ => ReservationBilling::Reservation,
            },
        })
        .collect();
    Ok(PolicyFile {
        rates,
        enforcement,
        users,
        orgs,
        reservations,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> proto::Policy {
        proto::Policy {
            default_rate: Some(proto::Credits {
                nano_credits: 1_000_000,
            }),
            users: vec![proto::User {
                id: "u-alice".into(),
                email: "a@example.com".into(),
                plan: "pro".into(),
                balance: Some(proto::Credits {
                    nano_credits: 40_000_000_000,
                }),
                max_sessions: None,
            }],
            orgs: vec![
                proto::Org {
                    id: "acme".into(),
                    plan: "business".into(),
                    balance: Some(proto::Credits {
                        nano_credits: 500_000_000_000,
                    }),
                    members: vec![proto::Membership {
                        user: "u-alice".into(),
                        role: proto::OrgRole::Owner.into(),
                    }],
                    ..Default::default()
                },
                proto::Org {
                    id: "acme-vision".into(),
                    parent: "acme".into(),
                    max_sessions: Some(2),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn a_snapshot_becomes_the_same_model_as_the_file_describes() {
        let loaded = from_snapshot(3, snapshot(), None).unwrap();
        let policy = loaded.policy;
        assert_eq!(policy.opening_balance("u-alice"), Credits::from_f64(40.0));
        assert_eq!(policy.billed_account("acme-vision"), "acme");
        assert_eq!(policy.session_limit("acme-vision"), Some(2));
        assert_eq!(policy.role_of("u-alice", "acme-vision"), Some(Role::Owner));
        assert_eq!(policy.rate("anything").0, Credits(1_000_000));
    }

    #[test]
    fn a_snapshot_the_file_would_refuse_is_refused_naming_the_key() {
        let mut bad = snapshot();
        bad.orgs[0].members[0].user = "u-nobody".into();
        let error = from_snapshot(4, bad, None).unwrap_err().to_string();
        assert!(error.contains("control plane policy v4"), "{error}");
        assert!(error.contains("orgs[0].members[0]"), "{error}");

        let mut bad = snapshot();
        bad.users[0].plan = "platinum".into();
        let error = from_snapshot(5, bad, None).unwrap_err().to_string();
        assert!(error.contains("users[0].plan"), "{error}");
    }
}
