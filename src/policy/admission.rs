//! Where a launch is decided, and who may manage what: pure functions of a
//! [`Policy`], the open sessions and the time, returning a [`Refusal`] that
//! says what to change. No I/O: the session manager gathers the facts (the
//! open sessions, the balance, the clock) and calls these in order:
//!
//! 1. [`authorize_launch`]: the principal may launch under this account;
//! 2. [`check_pools`]: the account and every ancestor have a free slot;
//! 3. [`reserved_for_others`] / [`reserved_for`] feed the allocator
//!    (`allocation::pick_preferring`);
//! 4. [`billing_path`] for the devices picked, then [`check_balance`].
//!
//! [`displaced_by_reservations`] tells the enforcement loop which running
//! sessions a window that has opened claims back.
//!
//! The role rules for stopping, listing and reading usage live at the end
//! of this module ("Who may manage what"), next to the launch rules, so that
//! every decision on an account is made in one place.

use std::collections::{HashMap, HashSet};

use super::{AccountKind, Policy, Reservation, Role};
use crate::allocation::Unavailable;
use crate::clock::UnixNanos;
use crate::error::{Reason, Refusal};
use crate::gpu::DeviceUuid;
use crate::metering::{Credits, Rate};
use crate::session::{BillingPath, Principal, PrincipalKind, Scope, SessionId};

/// The account a launch runs under, whose balance pays, and the pools it
/// counts against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchAccount {
    pub scope: Scope,
    /// The user (personal) or org (org scope) the session runs under.
    pub account_id: String,
    /// The balance that pays: the user, or the top of the org's tree.
    pub billed_account_id: String,
    /// (account, limit) for the account and every ancestor that has a
    /// limit, nearest first.
    pub pools: Vec<(String, u32)>,
}

/// An open session as admission sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenSession<'a> {
    pub id: &'a SessionId,
    pub scope: Scope,
    pub account_id: &'a str,
    pub devices: &'a [DeviceUuid],
}

/// Whether `principal` may launch a session of `scope` (under `org_id` for
/// org scope; ignored for personal scope, which the request layer keeps
/// empty), and under which account.
pub fn authorize_launch(
    policy: &Policy,
    principal: &Principal,
    scope: Scope,
    org_id: &str,
) -> Result<LaunchAccount, Refusal> {
    known_principal(policy, principal)?;
    match scope {
        Scope::Personal => {
            if principal.kind == PrincipalKind::ServiceAccount {
                return Err(Refusal::new(
                    Reason::RoleForbidden,
                    format!(
                        "{} is a service account: service accounts launch org sessions only; \
                         set scope ORG and org_id",
                        principal.subject
                    ),
                )
                .with("principal", principal.subject.as_str()));
            }
            let user = principal.subject.as_str();
            Ok(LaunchAccount {
                scope,
                account_id: user.to_owned(),
                billed_account_id: user.to_owned(),
                pools: policy
                    .session_limit(user)
                    .map(|limit| (user.to_owned(), limit))
                    .into_iter()
                    .collect(),
            })
        }
        Scope::Org => {
            if policy.kind_of(org_id) != Some(AccountKind::Org) {
                return Err(Refusal::new(
                    Reason::UnknownAccount,
                    format!(
                        "no org `{org_id}` in this node's policy; set org_id to an org you \
                         belong to, or use scope PERSONAL"
                    ),
                )
                .with("account", org_id));
            }
            let ancestors = policy.ancestors(org_id);
            let allowed = match principal.kind {
                PrincipalKind::User => policy.role_of(&principal.subject, org_id).is_some(),
                PrincipalKind::ServiceAccount => policy
                    .service_account_org(&principal.subject)
                    .is_some_and(|own| ancestors.contains(&own)),
            };
            if !allowed {
                let how = match principal.kind {
                    PrincipalKind::User => format!(
                        "ask an owner or admin of {org_id} to add you, or launch with scope \
                         PERSONAL"
                    ),
                    PrincipalKind::ServiceAccount => {
                        "a service account launches only in its own org and that org's \
                         sub-accounts; use a service account of this org"
                            .to_owned()
                    }
                };
                return Err(Refusal::new(
                    Reason::NotAMember,
                    format!("{} is not a member of {org_id}; {how}", principal.subject),
                )
                .with("account", org_id));
            }
            Ok(LaunchAccount {
                scope,
                account_id: org_id.to_owned(),
                billed_account_id: policy.billed_account(org_id).to_owned(),
                pools: ancestors
                    .iter()
                    .filter_map(|a| policy.session_limit(a).map(|l| ((*a).to_owned(), l)))
                    .collect(),
            })
        }
    }
}

/// Whether every pool of `account` has a free slot among the `open`
/// sessions (those holding a slot: starting, running or stopping). A
/// personal pool counts the user's personal sessions; an org's pool counts
/// the org sessions of the org and all its sub-accounts.
pub fn check_pools(
    account: &LaunchAccount,
    policy: &Policy,
    open: &[OpenSession],
) -> Result<(), Refusal> {
    for (pool, limit) in &account.pools {
        let (used, pooled_over) = match account.scope {
            Scope::Personal => (
                open.iter()
                    .filter(|s| s.scope == Scope::Personal && s.account_id == pool)
                    .count(),
                "its personal sessions",
            ),
            Scope::Org => {
                let tree: HashSet<&str> = policy.subtree(pool).into_iter().collect();
                (
                    open.iter()
                        .filter(|s| s.scope == Scope::Org && tree.contains(s.account_id))
                        .count(),
                    "pooled over all its members and sub-accounts",
                )
            }
        };
        if used >= *limit as usize {
            return Err(Refusal::new(
                Reason::SessionLimitReached,
                format!(
                    "{pool} has {used} of its {limit} concurrent sessions open ({pooled_over}); \
                     stop a session or ask for a larger plan"
                ),
            )
            .with("account", pool.as_str())
            .with("limit", limit.to_string()));
        }
    }
    Ok(())
}

/// Devices that `account` may not have at `now`: in an active window of a
/// reservation of an org that is neither account's org nor one of its
/// ancestors (a reservation is for its org and that org's sub-accounts).
/// Personal sessions may use no reserved device.
pub fn reserved_for_others(
    policy: &Policy,
    account: &LaunchAccount,
    now: UnixNanos,
) -> HashMap<DeviceUuid, Unavailable> {
    policy
        .reservations()
        .iter()
        .filter(|r| r.is_active(now) && !entitled(policy, account.scope, &account.account_id, r))
        .flat_map(|r| {
            r.devices
                .iter()
                .map(|d| (d.clone(), Unavailable::Reserved { org: r.org.clone() }))
        })
        .collect()
}

/// Devices reserved for `account` (its org or an ancestor's reservation)
/// in an active window: preferred by the allocator.
pub fn reserved_for(
    policy: &Policy,
    account: &LaunchAccount,
    now: UnixNanos,
) -> HashSet<DeviceUuid> {
    policy
        .reservations()
        .iter()
        .filter(|r| r.is_active(now) && entitled(policy, account.scope, &account.account_id, r))
        .flat_map(|r| r.devices.iter().cloned())
        .collect()
}

/// RESERVATION when every picked device is in an active window of a
/// reservation with billing=reservation that is for this account (as
/// above); BALANCE otherwise (a session that mixes reserved and unreserved
/// devices is billed to the balance for all of them: one billing path per
/// session). No devices: BALANCE.
pub fn billing_path(
    policy: &Policy,
    account: &LaunchAccount,
    devices: &[DeviceUuid],
    now: UnixNanos,
) -> BillingPath {
    let covered = |device: &DeviceUuid| {
        policy.reservations().iter().any(|r| {
            r.billing == BillingPath::Reservation
                && r.is_active(now)
                && r.devices.contains(device)
                && entitled(policy, account.scope, &account.account_id, r)
        })
    };
    if !devices.is_empty() && devices.iter().all(covered) {
        BillingPath::Reservation
    } else {
        BillingPath::Balance
    }
}

/// A launch billed to a balance needs credit for min_balance_seconds of its
/// devices at their rates: balance >= min_balance_seconds * sum(rates), so
/// a session does not start only to be stopped for want of credit at its
/// first checkpoint. Reservation-billed launches skip this: nothing is
/// debited. `rates` has one entry per device.
pub fn check_balance(
    policy: &Policy,
    account: &LaunchAccount,
    path: BillingPath,
    balance: Credits,
    rates: &[Rate],
) -> Result<(), Refusal> {
    if path == BillingPath::Reservation {
        return Ok(());
    }
    let seconds = policy.enforcement().min_balance_seconds;
    let per_second: i128 = rates.iter().map(|r| i128::from(r.0.0)).sum();
    let required =
        Credits(i64::try_from(per_second.saturating_mul(i128::from(seconds))).unwrap_or(i64::MAX));
    if balance >= required {
        return Ok(());
    }
    let billed = account.billed_account_id.as_str();
    Err(Refusal::new(
        Reason::BalanceExhausted,
        format!(
            "the balance of {billed} is {balance} credits; this launch needs {required} \
             ({seconds} s of its devices at {} credits/s); top up {billed} or ask for fewer or \
             cheaper devices",
            Credits(i64::try_from(per_second).unwrap_or(i64::MAX))
        ),
    )
    .with("account", billed)
    .with("balance", balance.to_string())
    .with("required", required.to_string()))
}

/// Running sessions that a reservation window open at `now` displaces:
/// sessions on a reserved device whose account is not entitled to that
/// reservation (personal sessions never are). In the order of `open`, each
/// once.
pub fn displaced_by_reservations(
    policy: &Policy,
    now: UnixNanos,
    open: &[OpenSession],
) -> Vec<SessionId> {
    let active: Vec<&Reservation> = policy
        .reservations()
        .iter()
        .filter(|r| r.is_active(now))
        .collect();
    open.iter()
        .filter(|session| {
            session.devices.iter().any(|device| {
                active.iter().any(|r| {
                    r.devices.contains(device)
                        && !entitled(policy, session.scope, session.account_id, r)
                })
            })
        })
        .map(|session| session.id.clone())
        .collect()
}

/// A reservation is for its org's sessions and its sub-accounts' org
/// sessions; never for personal ones.
fn entitled(policy: &Policy, scope: Scope, account_id: &str, reservation: &Reservation) -> bool {
    scope == Scope::Org
        && policy
            .ancestors(account_id)
            .contains(&reservation.org.as_str())
}

// ---------------------------------------------------------------------------
// Who may manage what.

/// The principal must be what it claims to be in this policy: a user id for
/// a user, a service account id for a service account.
fn known_principal(policy: &Policy, principal: &Principal) -> Result<(), Refusal> {
    let expected = match principal.kind {
        PrincipalKind::User => AccountKind::User,
        PrincipalKind::ServiceAccount => AccountKind::ServiceAccount,
    };
    if policy.kind_of(&principal.subject) == Some(expected) {
        return Ok(());
    }
    let what = match principal.kind {
        PrincipalKind::User => "user",
        PrincipalKind::ServiceAccount => "service account",
    };
    Err(Refusal::new(
        Reason::UnknownAccount,
        format!(
            "no {what} `{}` in this node's policy; check the principal's subject and kind, or \
             ask the operator to add it",
            principal.subject
        ),
    )
    .with("account", principal.subject.as_str()))
}

fn is_admin_of(policy: &Policy, principal: &Principal, org: &str) -> bool {
    principal.kind == PrincipalKind::User
        && policy
            .role_of(&principal.subject, org)
            .is_some_and(|role| role >= Role::Admin)
}

/// May `principal` stop (and see) a session of (scope, account_id) owned by
/// `owner`? The owner always may (same subject and kind); a personal
/// session only its owner; an org session also any user whose
/// role_of(user, account_id) is Admin or Owner (which covers admins and
/// owners of ancestors). Others: ROLE_FORBIDDEN saying who may. Unknown
/// principal: UNKNOWN_ACCOUNT.
pub fn may_manage_session(
    policy: &Policy,
    principal: &Principal,
    scope: Scope,
    account_id: &str,
    owner: &Principal,
) -> Result<(), Refusal> {
    known_principal(policy, principal)?;
    if principal == owner {
        return Ok(());
    }
    match scope {
        Scope::Personal => Err(Refusal::new(
            Reason::RoleForbidden,
            format!(
                "this is a personal session of {}: only its owner may see or stop it",
                owner.subject
            ),
        )),
        Scope::Org if is_admin_of(policy, principal, account_id) => Ok(()),
        Scope::Org => Err(Refusal::new(
            Reason::RoleForbidden,
            format!(
                "this session of {account_id} belongs to {}: only its owner and the admins and \
                 owners of {account_id} (or of an org above it) may see or stop it",
                owner.subject
            ),
        )
        .with("account", account_id)),
    }
}

/// May `principal` read usage and balance of `account`? A user its own
/// personal account; an org's admins and owners (inherited from ancestors)
/// that org. Members and service accounts: ROLE_FORBIDDEN. Unknown
/// principal or account: UNKNOWN_ACCOUNT.
pub fn may_view_account(
    policy: &Policy,
    principal: &Principal,
    account: &str,
) -> Result<(), Refusal> {
    known_principal(policy, principal)?;
    let allowed = match known_account(policy, account)? {
        AccountKind::User => principal.kind == PrincipalKind::User && principal.subject == account,
        AccountKind::Org => is_admin_of(policy, principal, account),
        // known_account refuses service accounts.
        AccountKind::ServiceAccount => false,
    };
    if allowed {
        return Ok(());
    }
    let who = match policy.kind_of(account) {
        Some(AccountKind::Org) => {
            format!("only the admins and owners of {account} (or of an org above it)")
        }
        _ => format!("only {account} itself"),
    };
    Err(Refusal::new(
        Reason::RoleForbidden,
        format!(
            "{} may not read the usage or balance of {account}: {who} may",
            principal.subject
        ),
    )
    .with("account", account))
}

/// May `principal` list sessions of `account` at all (each session is then
/// filtered with [`may_manage_session`])? A user its own account; for an
/// org, any member with any role (own or inherited), or a service account
/// of that org or of an org above it (where it may have launched). Else
/// ROLE_FORBIDDEN. Unknown principal or account: UNKNOWN_ACCOUNT.
pub fn may_list_account(
    policy: &Policy,
    principal: &Principal,
    account: &str,
) -> Result<(), Refusal> {
    known_principal(policy, principal)?;
    let allowed = match (known_account(policy, account)?, principal.kind) {
        (AccountKind::User, PrincipalKind::User) => principal.subject == account,
        (AccountKind::User, PrincipalKind::ServiceAccount) => false,
        (AccountKind::Org, PrincipalKind::User) => {
            policy.role_of(&principal.subject, account).is_some()
        }
        (AccountKind::Org, PrincipalKind::ServiceAccount) => policy
            .service_account_org(&principal.subject)
            .is_some_and(|own| policy.ancestors(account).contains(&own)),
        (AccountKind::ServiceAccount, _) => false,
    };
    if allowed {
        return Ok(());
    }
    let who = match policy.kind_of(account) {
        Some(AccountKind::Org) => format!("only members and service accounts of {account}"),
        _ => format!("only {account} itself"),
    };
    Err(Refusal::new(
        Reason::RoleForbidden,
        format!(
            "{} may not list the sessions of {account}: {who} may",
            principal.subject
        ),
    )
    .with("account", account))
}

/// The kind of a user or org id; a service account id is not an account
/// with sessions or a balance of its own (its sessions are its org's).
fn known_account(policy: &Policy, account: &str) -> Result<AccountKind, Refusal> {
    match policy.kind_of(account) {
        Some(kind @ (AccountKind::User | AccountKind::Org)) => Ok(kind),
        Some(AccountKind::ServiceAccount) => Err(Refusal::new(
            Reason::UnknownAccount,
            format!(
                "{account} is a service account; its sessions and usage are its org's, so ask \
                 for {}",
                policy.service_account_org(account).unwrap_or("its org")
            ),
        )
        .with("account", account)),
        None => Err(Refusal::new(
            Reason::UnknownAccount,
            format!("no account `{account}` in this node's policy; name a user or an org"),
        )
        .with("account", account)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocation::{DeviceSelector, pick, pick_preferring};
    use crate::gpu::simulated::load_fixture;
    use std::path::Path;

    const RESERVED_GPU: &str = "GPU-6a5da790-0728-45bf-9407-3e280f594b6d";
    const FREE_GPU: &str = "GPU-faba74c6-7dc9-4bfd-ab4e-85cb4d26fa32";

    fn example() -> Policy {
        Policy::load(Path::new("fixtures/policy-example.toml"), None)
            .unwrap()
            .policy
    }

    fn user(id: &str) -> Principal {
        Principal {
            subject: id.into(),
            kind: PrincipalKind::User,
        }
    }

    fn sa(id: &str) -> Principal {
        Principal {
            subject: id.into(),
            kind: PrincipalKind::ServiceAccount,
        }
    }

    fn at(text: &str) -> UnixNanos {
        UnixNanos::parse_rfc3339(text).unwrap()
    }

    /// Inside the example's reservation window.
    fn in_window() -> UnixNanos {
        at("2027-06-01T00:00:00Z")
    }

    fn launch(policy: &Policy, who: &Principal, scope: Scope, org: &str) -> LaunchAccount {
        authorize_launch(policy, who, scope, org).unwrap()
    }

    fn refused_launch(policy: &Policy, who: &Principal, scope: Scope, org: &str) -> Refusal {
        authorize_launch(policy, who, scope, org).unwrap_err()
    }

    fn metadata<'a>(refusal: &'a Refusal, key: &str) -> Option<&'a str> {
        refusal
            .metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `count` open sessions of (scope, account), with ids `prefix-N`.
    fn sessions(prefix: &str, count: usize) -> Vec<SessionId> {
        (0..count)
            .map(|n| SessionId(format!("{prefix}-{n}")))
            .collect()
    }

    fn open<'a>(ids: &'a [SessionId], scope: Scope, account: &'a str) -> Vec<OpenSession<'a>> {
        ids.iter()
            .map(|id| OpenSession {
                id,
                scope,
                account_id: account,
                devices: &[],
            })
            .collect()
    }

    #[test]
    fn personal_launches_run_under_the_user() {
        let policy = example();
        let account = launch(&policy, &user("u-alice"), Scope::Personal, "");
        assert_eq!(
            account,
            LaunchAccount {
                scope: Scope::Personal,
                account_id: "u-alice".into(),
                billed_account_id: "u-alice".into(),
                pools: vec![("u-alice".into(), 3)],
            }
        );
    }

    #[test]
    fn org_launches_are_billed_to_the_top_and_pooled_up_the_tree() {
        let policy = example();
        let vision = launch(&policy, &user("u-bob"), Scope::Org, "acme-vision");
        assert_eq!(vision.account_id, "acme-vision");
        assert_eq!(vision.billed_account_id, "acme");
        assert_eq!(
            vision.pools,
            [("acme-vision".to_owned(), 2), ("acme".to_owned(), 25)]
        );
        let acme = launch(&policy, &user("u-bob"), Scope::Org, "acme");
        assert_eq!(acme.pools, [("acme".to_owned(), 25)]);
        // Alice owns acme, so she has a role in its sub-account.
        launch(&policy, &user("u-alice"), Scope::Org, "acme-vision");
        // The CI account launches in its org and the org's sub-accounts.
        assert_eq!(
            launch(&policy, &sa("sa-acme-ci"), Scope::Org, "acme-vision").billed_account_id,
            "acme"
        );
        launch(&policy, &sa("sa-acme-ci"), Scope::Org, "acme");
    }

    #[test]
    fn unknown_principals_and_orgs_are_unknown_accounts() {
        let policy = example();
        let refusal = refused_launch(&policy, &user("u-mallory"), Scope::Personal, "");
        assert_eq!(refusal.reason, Reason::UnknownAccount);
        assert!(refusal.message.contains("u-mallory"), "{}", refusal.message);
        // An org id is not a user, and a user id not a service account.
        assert_eq!(
            refused_launch(&policy, &user("acme"), Scope::Personal, "").reason,
            Reason::UnknownAccount
        );
        assert_eq!(
            refused_launch(&policy, &sa("u-alice"), Scope::Org, "acme").reason,
            Reason::UnknownAccount
        );
        let refusal = refused_launch(&policy, &user("u-alice"), Scope::Org, "globex");
        assert_eq!(refusal.reason, Reason::UnknownAccount);
        assert!(refusal.message.contains("globex"), "{}", refusal.message);
        // A user id is not an org.
        assert_eq!(
            refused_launch(&policy, &user("u-alice"), Scope::Org, "u-bob").reason,
            Reason::UnknownAccount
        );
        assert_eq!(
            refused_launch(&Policy::empty(), &user("u-alice"), Scope::Personal, "").reason,
            Reason::UnknownAccount
        );
    }

    #[test]
    fn outsiders_are_not_members() {
        let policy = example();
        let refusal = refused_launch(&policy, &user("u-alice"), Scope::Org, "tiny");
        assert_eq!(refusal.reason, Reason::NotAMember);
        assert!(refusal.message.contains("tiny"), "{}", refusal.message);
        // Carol, its owner, may.
        launch(&policy, &user("u-carol"), Scope::Org, "tiny");
        // A service account of another org.
        let refusal = refused_launch(&policy, &sa("sa-acme-ci"), Scope::Org, "tiny");
        assert_eq!(refusal.reason, Reason::NotAMember);
    }

    #[test]
    fn a_parents_plain_member_is_not_a_member_of_its_sub_account() {
        let policy = Policy::parse(
            Path::new("p.toml"),
            r#"
[[users]]
id = "u-m"
plan = "free"
[[orgs]]
id = "top"
plan = "enterprise"
members = [{ user = "u-m", role = "member" }]
service_accounts = [{ id = "sa-sub" }]
[[orgs]]
id = "sub"
parent = "top"
service_accounts = [{ id = "sa-low" }]
"#,
            None,
        )
        .unwrap()
        .policy;
        assert_eq!(
            refused_launch(&policy, &user("u-m"), Scope::Org, "sub").reason,
            Reason::NotAMember
        );
        // A sub-account's service account may not launch in its parent.
        assert_eq!(
            refused_launch(&policy, &sa("sa-low"), Scope::Org, "top").reason,
            Reason::NotAMember
        );
        launch(&policy, &sa("sa-low"), Scope::Org, "sub");
        // Without its own limit, a sub-account counts only against its top.
        assert_eq!(
            launch(&policy, &sa("sa-sub"), Scope::Org, "sub").pools,
            [("top".to_owned(), 50)]
        );
    }

    #[test]
    fn service_accounts_launch_org_sessions_only() {
        let policy = example();
        let refusal = refused_launch(&policy, &sa("sa-acme-ci"), Scope::Personal, "");
        assert_eq!(refusal.reason, Reason::RoleForbidden);
        assert!(
            refusal
                .message
                .contains("service accounts launch org sessions only; set scope ORG and org_id"),
            "{}",
            refusal.message
        );
    }

    #[test]
    fn a_full_personal_pool_is_session_limit_reached() {
        let policy = example();
        let bob = launch(&policy, &user("u-bob"), Scope::Personal, "");
        assert_eq!(check_pools(&bob, &policy, &[]), Ok(()));
        let ids = sessions("s", 1);
        // Bob's org sessions do not use his personal slot.
        assert_eq!(
            check_pools(&bob, &policy, &open(&ids, Scope::Org, "u-bob")),
            Ok(())
        );
        let mine = open(&ids, Scope::Personal, "u-bob");
        let refusal = check_pools(&bob, &policy, &mine).unwrap_err();
        assert_eq!(refusal.reason, Reason::SessionLimitReached);
        assert!(refusal.message.contains("u-bob"), "{}", refusal.message);
        assert!(
            refusal
                .message
                .contains("stop a session or ask for a larger plan"),
            "{}",
            refusal.message
        );
        assert_eq!(metadata(&refusal, "account"), Some("u-bob"));
        assert_eq!(metadata(&refusal, "limit"), Some("1"));
        // Someone else's personal session does not count.
        let alices = open(&ids, Scope::Personal, "u-alice");
        assert_eq!(check_pools(&bob, &policy, &alices), Ok(()));
    }

    #[test]
    fn a_full_org_pool_is_session_limit_reached() {
        let policy = example();
        let tiny = launch(&policy, &user("u-carol"), Scope::Org, "tiny");
        let ids = sessions("s", 2);
        assert_eq!(
            check_pools(&tiny, &policy, &open(&ids[..1], Scope::Org, "tiny")),
            Ok(())
        );
        let refusal = check_pools(&tiny, &policy, &open(&ids, Scope::Org, "tiny")).unwrap_err();
        assert_eq!(refusal.reason, Reason::SessionLimitReached);
        assert_eq!(metadata(&refusal, "account"), Some("tiny"));
        assert_eq!(metadata(&refusal, "limit"), Some("2"));
        // Personal sessions of tiny's members do not count against it.
        assert_eq!(
            check_pools(&tiny, &policy, &open(&ids, Scope::Personal, "u-carol")),
            Ok(())
        );
    }

    #[test]
    fn a_sub_account_is_limited_by_its_own_pool_and_its_parents() {
        let policy = example();
        let vision = launch(&policy, &user("u-bob"), Scope::Org, "acme-vision");

        // Its own pool: 2.
        let ids = sessions("v", 2);
        let refusal =
            check_pools(&vision, &policy, &open(&ids, Scope::Org, "acme-vision")).unwrap_err();
        assert_eq!(refusal.reason, Reason::SessionLimitReached);
        assert_eq!(metadata(&refusal, "account"), Some("acme-vision"));
        assert_eq!(metadata(&refusal, "limit"), Some("2"));

        // Its own pool has room, but acme's (25, counting acme-vision's
        // sessions too) is full.
        let acme_ids = sessions("a", 24);
        let vision_ids = sessions("v", 1);
        let mut busy = open(&acme_ids, Scope::Org, "acme");
        busy.extend(open(&vision_ids, Scope::Org, "acme-vision"));
        let refusal = check_pools(&vision, &policy, &busy).unwrap_err();
        assert_eq!(refusal.reason, Reason::SessionLimitReached);
        assert_eq!(metadata(&refusal, "account"), Some("acme"));
        assert_eq!(metadata(&refusal, "limit"), Some("25"));
        assert!(
            refusal.message.contains("acme has 25"),
            "{}",
            refusal.message
        );

        // And the parent's launches count the sub-account's sessions.
        let acme = launch(&policy, &user("u-alice"), Scope::Org, "acme");
        assert_eq!(
            check_pools(&acme, &policy, &busy).unwrap_err().reason,
            Reason::SessionLimitReached
        );
        // One fewer and both fit.
        busy.pop();
        assert_eq!(check_pools(&vision, &policy, &busy), Ok(()));
        assert_eq!(check_pools(&acme, &policy, &busy), Ok(()));
    }

    #[test]
    fn the_balance_must_cover_min_balance_seconds_exactly() {
        let policy = example();
        let bob = launch(&policy, &user("u-bob"), Scope::Personal, "");
        let rates = [
            Rate(Credits::from_f64(0.001)),
            Rate(Credits::from_f64(0.00015)),
        ];
        // 60 s x 0.00115 credits/s.
        let required = Credits::from_f64(0.069);
        assert_eq!(
            check_balance(&policy, &bob, BillingPath::Balance, required, &rates),
            Ok(())
        );
        let short = Credits(required.0 - 1);
        let refusal =
            check_balance(&policy, &bob, BillingPath::Balance, short, &rates).unwrap_err();
        assert_eq!(refusal.reason, Reason::BalanceExhausted);
        assert!(refusal.message.contains("u-bob"), "{}", refusal.message);
        assert_eq!(metadata(&refusal, "account"), Some("u-bob"));
        assert_eq!(metadata(&refusal, "required"), Some("0.069000"));
        assert_eq!(
            metadata(&refusal, "balance"),
            Some(short.to_string().as_str())
        );

        // An org launch is checked against the top of its tree.
        let vision = launch(&policy, &user("u-bob"), Scope::Org, "acme-vision");
        let refusal = check_balance(
            &policy,
            &vision,
            BillingPath::Balance,
            Credits::ZERO,
            &rates,
        )
        .unwrap_err();
        assert_eq!(metadata(&refusal, "account"), Some("acme"));

        // Free devices need no credit.
        assert_eq!(
            check_balance(&policy, &bob, BillingPath::Balance, Credits::ZERO, &[]),
            Ok(())
        );
    }

    #[test]
    fn reservation_billed_launches_skip_the_balance_check() {
        let policy = example();
        let acme = launch(&policy, &user("u-alice"), Scope::Org, "acme");
        let rates = [Rate(Credits::from_f64(0.001))];
        assert_eq!(
            check_balance(
                &policy,
                &acme,
                BillingPath::Reservation,
                Credits(-5),
                &rates
            ),
            Ok(())
        );
    }

    #[test]
    fn a_device_reserved_for_another_org_is_device_reserved() {
        let policy = example();
        let devices = load_fixture(Path::new("fixtures/sim-dgx-a100.toml"))
            .unwrap()
            .assignable();
        let exact = DeviceSelector::Exact(vec![DeviceUuid::new(RESERVED_GPU)]);
        for account in [
            launch(&policy, &user("u-carol"), Scope::Org, "tiny"),
            launch(&policy, &user("u-alice"), Scope::Personal, ""),
        ] {
            let unavailable = reserved_for_others(&policy, &account, in_window());
            assert_eq!(
                unavailable.get(&DeviceUuid::new(RESERVED_GPU)),
                Some(&Unavailable::Reserved { org: "acme".into() })
            );
            let refusal = pick(&devices, &unavailable, &exact).unwrap_err();
            assert_eq!(refusal.reason, Reason::DeviceReserved, "{account:?}");
            // A device outside the reservation is fine.
            let other = DeviceSelector::Exact(vec![DeviceUuid::new(FREE_GPU)]);
            assert!(pick(&devices, &unavailable, &other).is_ok());
        }
        // acme and its sub-account get it, preferred over other GPUs.
        for org in ["acme", "acme-vision"] {
            let account = launch(&policy, &user("u-alice"), Scope::Org, org);
            let unavailable = reserved_for_others(&policy, &account, in_window());
            assert!(unavailable.is_empty(), "{org}");
            let preferred = reserved_for(&policy, &account, in_window());
            assert_eq!(preferred, HashSet::from([DeviceUuid::new(RESERVED_GPU)]));
            let one = DeviceSelector::Gpus {
                count: 1,
                model: None,
            };
            let picked = pick_preferring(&devices, &unavailable, &one, &preferred).unwrap();
            assert_eq!(picked[0].uuid.as_str(), RESERVED_GPU);
        }
        // Nobody's after the window.
        let tiny = launch(&policy, &user("u-carol"), Scope::Org, "tiny");
        assert!(reserved_for_others(&policy, &tiny, at("2031-01-01T00:00:00Z")).is_empty());
    }

    #[test]
    fn windows_hold_their_start_but_not_their_end() {
        let policy = example();
        let tiny = launch(&policy, &user("u-carol"), Scope::Org, "tiny");
        let acme = launch(&policy, &user("u-alice"), Scope::Org, "acme");
        let start = at("2026-01-01T00:00:00Z");
        let end = at("2030-01-01T00:00:00Z");
        let reserved = |now: UnixNanos| !reserved_for_others(&policy, &tiny, now).is_empty();
        assert!(!reserved(UnixNanos(start.0 - 1)));
        assert!(reserved(start));
        assert!(reserved(UnixNanos(end.0 - 1)));
        assert!(!reserved(end));
        assert!(reserved_for(&policy, &acme, UnixNanos(start.0 - 1)).is_empty());
        assert!(!reserved_for(&policy, &acme, start).is_empty());
        assert!(reserved_for(&policy, &acme, end).is_empty());
        let device = [DeviceUuid::new(RESERVED_GPU)];
        assert_eq!(
            billing_path(&policy, &acme, &device, UnixNanos(start.0 - 1)),
            BillingPath::Balance
        );
        assert_eq!(
            billing_path(&policy, &acme, &device, start),
            BillingPath::Reservation
        );
        assert_eq!(
            billing_path(&policy, &acme, &device, end),
            BillingPath::Balance
        );
    }

    #[test]
    fn billing_path_is_the_reservation_only_when_every_device_is_covered() {
        let policy = example();
        let now = in_window();
        let reserved = DeviceUuid::new(RESERVED_GPU);
        let free = DeviceUuid::new(FREE_GPU);
        let acme = launch(&policy, &user("u-alice"), Scope::Org, "acme");
        let vision = launch(&policy, &user("u-bob"), Scope::Org, "acme-vision");
        let personal = launch(&policy, &user("u-alice"), Scope::Personal, "");
        let tiny = launch(&policy, &user("u-carol"), Scope::Org, "tiny");
        let only_reserved = [reserved.clone()];
        assert_eq!(
            billing_path(&policy, &acme, &only_reserved, now),
            BillingPath::Reservation
        );
        // The sub-account of the reserving org is entitled.
        assert_eq!(
            billing_path(&policy, &vision, &only_reserved, now),
            BillingPath::Reservation
        );
        // Personal sessions and other orgs are not.
        assert_eq!(
            billing_path(&policy, &personal, &only_reserved, now),
            BillingPath::Balance
        );
        assert_eq!(
            billing_path(&policy, &tiny, &only_reserved, now),
            BillingPath::Balance
        );
        // Mixed: one path per session, the balance.
        assert_eq!(
            billing_path(&policy, &acme, &[reserved.clone(), free.clone()], now),
            BillingPath::Balance
        );
        assert_eq!(
            billing_path(&policy, &acme, &[free], now),
            BillingPath::Balance
        );
        assert_eq!(billing_path(&policy, &acme, &[], now), BillingPath::Balance);
    }

    #[test]
    fn a_balance_billed_reservation_keeps_the_device_but_bills_the_balance() {
        let text = std::fs::read_to_string("fixtures/policy-example.toml")
            .unwrap()
            .replace("billing = \"reservation\"", "billing = \"balance\"");
        let policy = Policy::parse(Path::new("p.toml"), &text, None)
            .unwrap()
            .policy;
        let acme = launch(&policy, &user("u-alice"), Scope::Org, "acme");
        let tiny = launch(&policy, &user("u-carol"), Scope::Org, "tiny");
        let device = [DeviceUuid::new(RESERVED_GPU)];
        assert_eq!(
            billing_path(&policy, &acme, &device, in_window()),
            BillingPath::Balance
        );
        assert!(!reserved_for_others(&policy, &tiny, in_window()).is_empty());
    }

    #[test]
    fn an_opening_window_displaces_sessions_not_entitled_to_it() {
        let policy = example();
        let ids = sessions("s", 6);
        let on_reserved = [DeviceUuid::new(RESERVED_GPU)];
        let mixed = [DeviceUuid::new(FREE_GPU), DeviceUuid::new(RESERVED_GPU)];
        let elsewhere = [DeviceUuid::new(FREE_GPU)];
        let open = [
            OpenSession {
                id: &ids[0],
                scope: Scope::Org,
                account_id: "tiny",
                devices: &on_reserved,
            },
            OpenSession {
                id: &ids[1],
                scope: Scope::Org,
                account_id: "acme",
                devices: &on_reserved,
            },
            OpenSession {
                id: &ids[2],
                scope: Scope::Org,
                account_id: "acme-vision",
                devices: &on_reserved,
            },
            OpenSession {
                id: &ids[3],
                scope: Scope::Personal,
                account_id: "u-alice",
                devices: &mixed,
            },
            OpenSession {
                id: &ids[4],
                scope: Scope::Org,
                account_id: "tiny",
                devices: &elsewhere,
            },
            OpenSession {
                id: &ids[5],
                scope: Scope::Personal,
                account_id: "u-bob",
                devices: &elsewhere,
            },
        ];
        assert_eq!(
            displaced_by_reservations(&policy, in_window(), &open),
            [ids[0].clone(), ids[3].clone()]
        );
        assert!(displaced_by_reservations(&policy, at("2025-12-31T23:59:59Z"), &open).is_empty());
    }

    // --- Who may manage what.

    fn manage(
        policy: &Policy,
        who: &Principal,
        scope: Scope,
        account: &str,
        owner: &Principal,
    ) -> Result<(), Reason> {
        may_manage_session(policy, who, scope, account, owner).map_err(|r| r.reason)
    }

    #[test]
    fn members_stop_their_own_org_sessions_only() {
        let policy = example();
        let (bob, carol) = (user("u-bob"), user("u-carol"));
        assert_eq!(manage(&policy, &bob, Scope::Org, "acme", &bob), Ok(()));
        let refusal = may_manage_session(&policy, &bob, Scope::Org, "acme", &carol).unwrap_err();
        assert_eq!(refusal.reason, Reason::RoleForbidden);
        assert!(
            refusal.message.contains("admins and owners of acme"),
            "{}",
            refusal.message
        );
    }

    #[test]
    fn admins_and_owners_stop_any_session_of_their_org_and_its_sub_accounts() {
        let policy = example();
        let (alice, bob, carol) = (user("u-alice"), user("u-bob"), user("u-carol"));
        let ci = sa("sa-acme-ci");
        for manager in [&alice, &carol] {
            assert_eq!(manage(&policy, manager, Scope::Org, "acme", &bob), Ok(()));
            assert_eq!(manage(&policy, manager, Scope::Org, "acme", &ci), Ok(()));
            assert_eq!(
                manage(&policy, manager, Scope::Org, "acme-vision", &bob),
                Ok(())
            );
        }
        // Bob, admin of acme-vision, manages it…
        assert_eq!(
            manage(&policy, &bob, Scope::Org, "acme-vision", &alice),
            Ok(())
        );
        // …but is a plain member of acme.
        assert_eq!(
            manage(&policy, &bob, Scope::Org, "acme", &alice),
            Err(Reason::RoleForbidden)
        );
        // Carol owns tiny; Alice has no role there.
        assert_eq!(
            manage(&policy, &alice, Scope::Org, "tiny", &carol),
            Err(Reason::RoleForbidden)
        );
    }

    #[test]
    fn a_personal_session_is_only_its_owners() {
        let policy = example();
        let (alice, bob) = (user("u-alice"), user("u-bob"));
        assert_eq!(
            manage(&policy, &bob, Scope::Personal, "u-bob", &bob),
            Ok(())
        );
        // Not even the owner of an org Bob belongs to.
        let refusal =
            may_manage_session(&policy, &alice, Scope::Personal, "u-bob", &bob).unwrap_err();
        assert_eq!(refusal.reason, Reason::RoleForbidden);
        assert!(
            refusal.message.contains("only its owner"),
            "{}",
            refusal.message
        );
    }

    #[test]
    fn service_accounts_manage_their_own_sessions() {
        let policy = example();
        let ci = sa("sa-acme-ci");
        assert_eq!(manage(&policy, &ci, Scope::Org, "acme", &ci), Ok(()));
        assert_eq!(
            manage(&policy, &ci, Scope::Org, "acme", &user("u-bob")),
            Err(Reason::RoleForbidden)
        );
        // Same subject, other kind: not the owner.
        assert_eq!(
            manage(&policy, &user("u-bob"), Scope::Org, "acme", &sa("u-bob")),
            Err(Reason::RoleForbidden)
        );
        assert_eq!(
            manage(
                &policy,
                &user("u-nobody"),
                Scope::Org,
                "acme",
                &user("u-nobody")
            ),
            Err(Reason::UnknownAccount)
        );
    }

    #[test]
    fn usage_is_for_the_account_itself_and_its_org_admins() {
        let policy = example();
        let view = |who: &Principal, account: &str| {
            may_view_account(&policy, who, account).map_err(|r| r.reason)
        };
        assert_eq!(view(&user("u-bob"), "u-bob"), Ok(()));
        assert_eq!(view(&user("u-alice"), "u-bob"), Err(Reason::RoleForbidden));
        assert_eq!(view(&user("u-alice"), "acme"), Ok(()));
        assert_eq!(view(&user("u-carol"), "acme-vision"), Ok(()));
        assert_eq!(view(&user("u-bob"), "acme-vision"), Ok(()));
        assert_eq!(view(&user("u-bob"), "acme"), Err(Reason::RoleForbidden));
        assert_eq!(view(&sa("sa-acme-ci"), "acme"), Err(Reason::RoleForbidden));
        assert_eq!(
            view(&user("u-alice"), "globex"),
            Err(Reason::UnknownAccount)
        );
        assert_eq!(
            view(&user("u-alice"), "sa-acme-ci"),
            Err(Reason::UnknownAccount)
        );
        assert_eq!(view(&user("u-ghost"), "acme"), Err(Reason::UnknownAccount));
    }

    #[test]
    fn listing_is_for_members_and_the_orgs_service_accounts() {
        let policy = example();
        let list = |who: &Principal, account: &str| {
            may_list_account(&policy, who, account).map_err(|r| r.reason)
        };
        assert_eq!(list(&user("u-bob"), "u-bob"), Ok(()));
        assert_eq!(list(&user("u-bob"), "u-alice"), Err(Reason::RoleForbidden));
        assert_eq!(list(&user("u-bob"), "acme"), Ok(()));
        assert_eq!(list(&user("u-bob"), "acme-vision"), Ok(()));
        assert_eq!(list(&user("u-alice"), "acme-vision"), Ok(()));
        assert_eq!(list(&user("u-alice"), "tiny"), Err(Reason::RoleForbidden));
        assert_eq!(list(&sa("sa-acme-ci"), "acme"), Ok(()));
        assert_eq!(list(&sa("sa-acme-ci"), "acme-vision"), Ok(()));
        assert_eq!(list(&sa("sa-acme-ci"), "tiny"), Err(Reason::RoleForbidden));
        assert_eq!(list(&sa("sa-acme-ci"), "u-bob"), Err(Reason::RoleForbidden));
        assert_eq!(list(&user("u-bob"), "globex"), Err(Reason::UnknownAccount));
    }
}
