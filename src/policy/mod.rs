//! The account model of standalone mode: users, orgs and their sub-accounts,
//! service accounts, plans and session limits, rates, enforcement settings
//! and reservations, read from the policy file (DESIGN.md, "The account
//! model"; `fixtures/policy-example.toml` shows the format, which is a
//! contract). This module loads and validates the file and answers questions
//! about the model; [`admission`] decides launches and who may manage what,
//! from these answers.
//!
//! # File format
//!
//! Every table refuses unknown keys, so a misspelt key is an error naming it
//! rather than a setting silently ignored. Beyond the example file:
//!
//! - `[rates]` is optional, and so is its `default` (0.0: a class not listed
//!   is free). Rates are credits per device-second, finite and not negative.
//! - `[enforcement]` is optional, as is each key: `min_balance_seconds = 60`,
//!   `on_balance_exhausted = "stop"` (or `"continue"`), `grace_seconds = 30`.
//! - Users need a `plan` (`free` or `pro`) and may set `max_sessions`, which
//!   replaces the plan's limit; `email` is optional; `balance` defaults to 0.
//! - A top-level org needs a `plan` (`team`, `business` or `enterprise`);
//!   `name` is optional; `balance` defaults to 0. `max_sessions` replaces
//!   the plan's limit, lower or higher.
//! - A sub-account (an org with `parent`) has neither `plan` nor `balance`:
//!   it is billed to the top of its tree, whose plan must be business or
//!   enterprise. Its `max_sessions` is optional: without it only its
//!   ancestors' pools limit it.
//! - A reservation's `billing` is `"reservation"` (the default: metered, not
//!   debited) or `"balance"`. Window times are RFC 3339 in UTC
//!   (`2026-01-01T00:00:00Z`); a window includes its start and excludes its
//!   end. A device has at most one reservation window at any instant.
//! - User, org and service account ids share one namespace.
//!
//! A reservation naming a device this host does not have is a warning, not
//! an error: one policy file may describe several hosts.

pub mod admission;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::clock::UnixNanos;
use crate::gpu::DeviceUuid;
use crate::metering::{Credits, Rate};
use crate::session::BillingPath;
use crate::toml_file::{self, FileError};

/// A plan: it fixes an account's default concurrent-session limit and
/// whether it belongs on a user or on an org.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Plan {
    Free,
    Pro,
    Team,
    Business,
    Enterprise,
}

impl Plan {
    /// The concurrent sessions the plan allows when the account sets no
    /// `max_sessions`.
    pub fn default_limit(self) -> u32 {
        match self {
            Self::Free => 1,
            Self::Pro => 3,
            Self::Team => 10,
            Self::Business => 25,
            Self::Enterprise => 50,
        }
    }

    /// Personal plans are for users, the others for orgs.
    pub fn is_personal(self) -> bool {
        matches!(self, Self::Free | Self::Pro)
    }

    /// Whether an org on this plan may have sub-accounts.
    pub fn allows_sub_accounts(self) -> bool {
        matches!(self, Self::Business | Self::Enterprise)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Free => "free",
            Self::Pro => "pro",
            Self::Team => "team",
            Self::Business => "business",
            Self::Enterprise => "enterprise",
        }
    }
}

/// A member's role in an org. Ordered by power, so the stronger of two
/// roles is their `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Runs workloads; stops only its own sessions.
    Member,
    /// Manages members and resources: may stop any session of the org.
    Admin,
    /// Full control.
    Owner,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Member => "member",
            Self::Admin => "admin",
            Self::Owner => "owner",
        }
    }
}

/// What happens to a running session whose billed balance reaches zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBalanceExhausted {
    /// Stopped after the grace period.
    #[default]
    Stop,
    /// Left running: post-paid.
    Continue,
}

/// The `[enforcement]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enforcement {
    /// A launch billed to a balance needs credit for this many seconds of
    /// its devices.
    pub min_balance_seconds: u64,
    pub on_balance_exhausted: OnBalanceExhausted,
    /// How long a session whose balance ran out, or whose device a
    /// reservation window claimed, keeps running before it is stopped.
    pub grace: Duration,
}

impl Default for Enforcement {
    fn default() -> Self {
        Self {
            min_balance_seconds: DEFAULT_MIN_BALANCE_SECONDS,
            on_balance_exhausted: OnBalanceExhausted::Stop,
            grace: Duration::from_secs(DEFAULT_GRACE_SECONDS),
        }
    }
}

const DEFAULT_MIN_BALANCE_SECONDS: u64 = 60;
const DEFAULT_GRACE_SECONDS: u64 = 30;

/// A reservation window: `start` inclusive, `end` exclusive, so two
/// back-to-back windows never both hold an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: UnixNanos,
    pub end: UnixNanos,
}

impl Window {
    pub fn contains(&self, at: UnixNanos) -> bool {
        self.start <= at && at < self.end
    }

    /// Whether the two windows share an instant.
    pub fn overlaps(&self, other: &Window) -> bool {
        self.start < other.end && other.start < self.end
    }
}

/// Exclusive use of `devices` by `org` (and its sub-accounts) during
/// `windows`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub org: String,
    pub devices: Vec<DeviceUuid>,
    pub windows: Vec<Window>,
    /// How usage on the reserved devices, by those entitled, is billed.
    pub billing: BillingPath,
}

impl Reservation {
    /// Whether one of its windows holds `at`.
    pub fn is_active(&self, at: UnixNanos) -> bool {
        self.windows.iter().any(|w| w.contains(at))
    }
}

/// What kind of account an id names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccountKind {
    User,
    Org,
    ServiceAccount,
}

#[derive(Debug, Clone)]
struct UserAccount {
    plan: Plan,
    max_sessions: Option<u32>,
    balance: Credits,
}

#[derive(Debug, Clone)]
struct OrgAccount {
    /// `None` only for sub-accounts.
    plan: Option<Plan>,
    parent: Option<String>,
    max_sessions: Option<u32>,
    balance: Credits,
    members: HashMap<String, Role>,
    /// Direct sub-accounts, in file order.
    children: Vec<String>,
}

/// A validated policy: every parent exists, the parents form a forest,
/// every member is a user, ids are unique.
#[derive(Debug, Clone)]
pub struct Policy {
    users: HashMap<String, UserAccount>,
    orgs: HashMap<String, OrgAccount>,
    /// Service account id -> its org.
    service_accounts: HashMap<String, String>,
    /// Users then orgs, in file order, for a stable `accounts()`.
    account_order: Vec<String>,
    rates: HashMap<String, Rate>,
    default_rate: Rate,
    enforcement: Enforcement,
    reservations: Vec<Reservation>,
}

impl Default for Policy {
    fn default() -> Self {
        Self::empty()
    }
}

/// A policy and what is worth telling the operator about it without
/// refusing it.
#[derive(Debug, Clone)]
pub struct LoadedPolicy {
    pub policy: Policy,
    pub warnings: Vec<String>,
}

impl Policy {
    /// Reads and validates the policy file at `path`. `host_devices` are
    /// the devices this host has, to warn about reservations of others;
    /// `None` skips that check.
    pub fn load(
        path: &Path,
        host_devices: Option<&HashSet<DeviceUuid>>,
    ) -> Result<LoadedPolicy, FileError> {
        let file: PolicyFile = toml_file::load(path)?;
        validate(path, file, host_devices)
    }

    /// Validates `text`, the contents of `path` (named in errors only).
    pub fn parse(
        path: &Path,
        text: &str,
        host_devices: Option<&HashSet<DeviceUuid>>,
    ) -> Result<LoadedPolicy, FileError> {
        let file: PolicyFile = toml_file::parse(path, text)?;
        validate(path, file, host_devices)
    }

    /// Validates a policy stated in file form by another source (the
    /// control plane's snapshot); `origin` names it in errors.
    pub fn from_document(
        origin: &Path,
        document: PolicyFile,
        host_devices: Option<&HashSet<DeviceUuid>>,
    ) -> Result<LoadedPolicy, FileError> {
        validate(origin, document, host_devices)
    }

    /// A policy with no accounts, so every launch is refused as being of an
    /// unknown account; every rate is 0 and enforcement has its defaults.
    pub fn empty() -> Policy {
        Policy {
            users: HashMap::new(),
            orgs: HashMap::new(),
            service_accounts: HashMap::new(),
            account_order: Vec::new(),
            rates: HashMap::new(),
            default_rate: Rate::default(),
            enforcement: Enforcement::default(),
            reservations: Vec::new(),
        }
    }

    pub fn kind_of(&self, account: &str) -> Option<AccountKind> {
        if self.users.contains_key(account) {
            Some(AccountKind::User)
        } else if self.orgs.contains_key(account) {
            Some(AccountKind::Org)
        } else if self.service_accounts.contains_key(account) {
            Some(AccountKind::ServiceAccount)
        } else {
            None
        }
    }

    pub fn enforcement(&self) -> &Enforcement {
        &self.enforcement
    }

    /// The rate of a device class: its `[rates]` entry, else `default`.
    pub fn rate(&self, device_class: &str) -> Rate {
        self.rates
            .get(device_class)
            .copied()
            .unwrap_or(self.default_rate)
    }

    /// The balance the file gives an account: where the ledger starts it.
    /// 0 for an account without one (sub-accounts, service accounts) and
    /// for an unknown id.
    pub fn opening_balance(&self, account: &str) -> Credits {
        if let Some(user) = self.users.get(account) {
            user.balance
        } else if let Some(org) = self.orgs.get(account) {
            org.balance
        } else {
            Credits::ZERO
        }
    }

    /// The account whose balance pays for sessions of `account`: a user
    /// itself, an org the top of its tree. A service account or an unknown
    /// id is returned as it is (service accounts launch under an org, which
    /// is what gets billed).
    pub fn billed_account<'a>(&'a self, account: &'a str) -> &'a str {
        if self.orgs.contains_key(account) {
            self.ancestors(account).last().copied().unwrap_or(account)
        } else {
            account
        }
    }

    /// `org` itself, then its parent, and so on up to the top of its tree.
    /// Empty for an id that is not an org.
    pub fn ancestors<'a>(&'a self, org: &'a str) -> Vec<&'a str> {
        let mut chain = Vec::new();
        let mut at = self.orgs.get_key_value(org);
        // Validation refuses cycles; the bound keeps a loop impossible
        // even so.
        while let Some((id, account)) = at {
            if chain.len() > self.orgs.len() {
                break;
            }
            chain.push(id.as_str());
            at = account
                .parent
                .as_deref()
                .and_then(|parent| self.orgs.get_key_value(parent));
        }
        chain
    }

    /// `org` and all its descendants, `org` first, then depth first in file
    /// order. Empty for an id that is not an org.
    pub fn subtree<'a>(&'a self, org: &'a str) -> Vec<&'a str> {
        let mut tree = Vec::new();
        let Some((id, _)) = self.orgs.get_key_value(org) else {
            return tree;
        };
        let mut stack = vec![id.as_str()];
        while let Some(id) = stack.pop() {
            if tree.len() > self.orgs.len() {
                break;
            }
            tree.push(id);
            if let Some(account) = self.orgs.get(id) {
                stack.extend(account.children.iter().rev().map(String::as_str));
            }
        }
        tree
    }

    /// `account` and, when it is an org, its sub-accounts (see
    /// [`Policy::subtree`]): whose sessions and usage count as the account's.
    pub fn with_sub_accounts(&self, account: &str) -> Vec<String> {
        let tree = self.subtree(account);
        if tree.is_empty() {
            return vec![account.to_owned()];
        }
        tree.into_iter().map(str::to_owned).collect()
    }

    /// The concurrent sessions `account`'s own pool allows: `max_sessions`
    /// if set, else its plan's. `None` for a sub-account with neither (only
    /// its ancestors limit it), for a service account (it launches into its
    /// org's pools) and for an unknown id.
    pub fn session_limit(&self, account: &str) -> Option<u32> {
        if let Some(user) = self.users.get(account) {
            Some(user.max_sessions.unwrap_or(user.plan.default_limit()))
        } else if let Some(org) = self.orgs.get(account) {
            org.max_sessions.or(org.plan.map(Plan::default_limit))
        } else {
            None
        }
    }

    /// The role `user` has in `org`: the stronger of its own role there and
    /// any admin or owner role it has in an ancestor (roles apply to
    /// sub-accounts from above, but a parent's plain member is not thereby
    /// a member of the sub-account). `None`: no role at all.
    pub fn role_of(&self, user: &str, org: &str) -> Option<Role> {
        if !self.users.contains_key(user) {
            return None;
        }
        let ancestors = self.ancestors(org);
        let (own, above) = ancestors.split_first()?;
        let direct = self.orgs.get(*own).and_then(|o| o.members.get(user));
        let inherited = above
            .iter()
            .filter_map(|id| self.orgs.get(*id).and_then(|o| o.members.get(user)))
            .filter(|role| **role >= Role::Admin)
            .max();
        direct.into_iter().chain(inherited).max().copied()
    }

    /// The org a service account belongs to.
    pub fn service_account_org(&self, sa: &str) -> Option<&str> {
        self.service_accounts.get(sa).map(String::as_str)
    }

    pub fn reservations(&self) -> &[Reservation] {
        &self.reservations
    }

    /// Every user and org id: users first, then orgs, each in file order.
    pub fn accounts(&self) -> impl Iterator<Item = &str> {
        self.account_order.iter().map(String::as_str)
    }
}

// ---------------------------------------------------------------------------
// The file as written.

/// The policy as its file (or the control plane's snapshot, converted)
/// states it, before validation: [`Policy::from_document`] validates it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Sorted, so of several bad rates the same one is named every time.
    #[serde(default)]
    pub rates: BTreeMap<String, f64>,
    #[serde(default)]
    pub enforcement: EnforcementFile,
    #[serde(default)]
    pub users: Vec<UserFile>,
    #[serde(default)]
    pub orgs: Vec<OrgFile>,
    #[serde(default)]
    pub reservations: Vec<ReservationFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnforcementFile {
    pub min_balance_seconds: Option<u64>,
    pub on_balance_exhausted: Option<OnBalanceExhausted>,
    pub grace_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserFile {
    pub id: String,
    #[serde(default)]
    #[allow(dead_code)]
    pub email: Option<String>,
    pub plan: Plan,
    pub max_sessions: Option<u32>,
    pub balance: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrgFile {
    pub id: String,
    #[serde(default)]
    #[allow(dead_code)]
    pub name: Option<String>,
    pub plan: Option<Plan>,
    pub parent: Option<String>,
    pub max_sessions: Option<u32>,
    pub balance: Option<f64>,
    #[serde(default)]
    pub members: Vec<MemberFile>,
    #[serde(default)]
    pub service_accounts: Vec<ServiceAccountFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberFile {
    pub user: String,
    pub role: Role,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAccountFile {
    pub id: String,
    #[serde(default)]
    #[allow(dead_code)]
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReservationFile {
    pub org: String,
    pub devices: Vec<String>,
    pub windows: Vec<WindowFile>,
    #[serde(default)]
    pub billing: ReservationBilling,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReservationBilling {
    #[default]
    Reservation,
    Balance,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowFile {
    pub start: String,
    pub end: String,
}

// ---------------------------------------------------------------------------
// Validation.

/// The `[rates]` key of the rate for classes not listed.
const DEFAULT_RATE_KEY: &str = "default";

fn validate(
    path: &Path,
    file: PolicyFile,
    host_devices: Option<&HashSet<DeviceUuid>>,
) -> Result<LoadedPolicy, FileError> {
    let bad = |key: String, reason: String| FileError::invalid(path, key, reason);
    let mut warnings = Vec::new();

    // Rates.
    let mut rates = HashMap::with_capacity(file.rates.len());
    let mut default_rate = Rate::default();
    for (class, value) in &file.rates {
        let key = format!("rates.{}", toml_key(class));
        let rate = Rate(credits(*value).map_err(|reason| bad(key, reason))?);
        if class == DEFAULT_RATE_KEY {
            default_rate = rate;
        } else {
            rates.insert(class.clone(), rate);
        }
    }

    let enforcement = Enforcement {
        min_balance_seconds: file
            .enforcement
            .min_balance_seconds
            .unwrap_or(DEFAULT_MIN_BALANCE_SECONDS),
        on_balance_exhausted: file.enforcement.on_balance_exhausted.unwrap_or_default(),
        grace: Duration::from_secs(
            file.enforcement
                .grace_seconds
                .unwrap_or(DEFAULT_GRACE_SECONDS),
        ),
    };

    // Ids: one namespace for users, orgs and service accounts.
    let mut claims: Vec<(String, &str)> = Vec::new();
    for (i, user) in file.users.iter().enumerate() {
        claims.push((format!("users[{i}].id"), user.id.as_str()));
    }
    for (i, org) in file.orgs.iter().enumerate() {
        claims.push((format!("orgs[{i}].id"), org.id.as_str()));
        for (j, sa) in org.service_accounts.iter().enumerate() {
            claims.push((
                format!("orgs[{i}].service_accounts[{j}].id"),
                sa.id.as_str(),
            ));
        }
    }
    let mut claimed: HashMap<&str, String> = HashMap::with_capacity(claims.len());
    for (key, id) in claims {
        if id.is_empty() || id.chars().any(char::is_whitespace) {
            return Err(bad(
                key,
                format!("`{id}` is not an account id: it must be non-empty, without spaces"),
            ));
        }
        if let Some(first) = claimed.get(id) {
            return Err(bad(
                key,
                format!(
                    "`{id}` is already the id at `{first}`; users, orgs and service accounts \
                     share one namespace, so give each its own id"
                ),
            ));
        }
        claimed.insert(id, key);
    }

    // Users.
    let mut users = HashMap::with_capacity(file.users.len());
    let mut account_order = Vec::with_capacity(file.users.len() + file.orgs.len());
    for (i, user) in file.users.iter().enumerate() {
        let at = format!("users[{i}]");
        if !user.plan.is_personal() {
            return Err(bad(
                format!("{at}.plan"),
                format!(
                    "`{}` is an org plan; a user's plan is free or pro",
                    user.plan.as_str()
                ),
            ));
        }
        check_max_sessions(&at, user.max_sessions).map_err(|(key, reason)| bad(key, reason))?;
        let balance =
            opening_balance(&at, user.balance).map_err(|(key, reason)| bad(key, reason))?;
        users.insert(
            user.id.clone(),
            UserAccount {
                plan: user.plan,
                max_sessions: user.max_sessions,
                balance,
            },
        );
        account_order.push(user.id.clone());
    }

    // Orgs, each on its own.
    let org_index: HashMap<&str, usize> = file
        .orgs
        .iter()
        .enumerate()
        .map(|(i, org)| (org.id.as_str(), i))
        .collect();
    let mut orgs: HashMap<String, OrgAccount> = HashMap::with_capacity(file.orgs.len());
    let mut service_accounts = HashMap::new();
    for (i, org) in file.orgs.iter().enumerate() {
        let at = format!("orgs[{i}]");
        if let Some(plan) = org.plan
            && plan.is_personal()
        {
            return Err(bad(
                format!("{at}.plan"),
                format!(
                    "`{}` is a personal plan; an org's plan is team, business or enterprise",
                    plan.as_str()
                ),
            ));
        }
        if let Some(parent) = &org.parent {
            if !org_index.contains_key(parent.as_str()) {
                return Err(bad(
                    format!("{at}.parent"),
                    format!("`{parent}` is not an org of this file; name an org's id"),
                ));
            }
            if org.plan.is_some() {
                return Err(bad(
                    format!("{at}.plan"),
                    "a sub-account has no plan of its own: it is billed to the top of its \
                     tree and limited by its ancestors' pools; remove `plan` (set \
                     `max_sessions` to limit it)"
                        .into(),
                ));
            }
            if org.balance.is_some() {
                return Err(bad(
                    format!("{at}.balance"),
                    "a sub-account has no balance of its own: its usage is billed to the top \
                     of its tree; remove `balance` and give the credit to that org"
                        .into(),
                ));
            }
        } else if org.plan.is_none() {
            return Err(bad(
                format!("{at}.plan"),
                "a top-level org needs a plan: team, business or enterprise".into(),
            ));
        }
        check_max_sessions(&at, org.max_sessions).map_err(|(key, reason)| bad(key, reason))?;
        let balance =
            opening_balance(&at, org.balance).map_err(|(key, reason)| bad(key, reason))?;

        let mut members = HashMap::with_capacity(org.members.len());
        let mut member_keys: HashMap<&str, usize> = HashMap::new();
        for (j, member) in org.members.iter().enumerate() {
            let key = format!("{at}.members[{j}].user");
            if !users.contains_key(&member.user) {
                return Err(bad(
                    key,
                    format!(
                        "`{}` is not a user of this file; add it under [[users]] or remove \
                         the member",
                        member.user
                    ),
                ));
            }
            if let Some(first) = member_keys.insert(member.user.as_str(), j) {
                return Err(bad(
                    key,
                    format!(
                        "`{}` is already a member at `{at}.members[{first}]`; give each user \
                         one role per org",
                        member.user
                    ),
                ));
            }
            members.insert(member.user.clone(), member.role);
        }
        for sa in &org.service_accounts {
            service_accounts.insert(sa.id.clone(), org.id.clone());
        }
        orgs.insert(
            org.id.clone(),
            OrgAccount {
                plan: org.plan,
                parent: org.parent.clone(),
                max_sessions: org.max_sessions,
                balance,
                members,
                children: Vec::new(),
            },
        );
        account_order.push(org.id.clone());
    }

    // The trees: no cycles, and a business or enterprise org at each top.
    if let Some(cycle) = find_parent_cycle(&file.orgs, &org_index) {
        let first = cycle.iter().copied().min().unwrap_or(0);
        let names: Vec<&str> = cycle
            .iter()
            .chain(cycle.first())
            .map(|i| file.orgs.get(*i).map_or("?", |o| o.id.as_str()))
            .collect();
        return Err(bad(
            format!("orgs[{first}].parent"),
            format!(
                "parents form a cycle: {}; an org tree needs a top org without `parent`",
                names.join(" -> ")
            ),
        ));
    }
    for org in &file.orgs {
        if let Some(parent) = &org.parent
            && let Some(account) = orgs.get_mut(parent)
        {
            account.children.push(org.id.clone());
        }
    }
    let mut policy = Policy {
        users,
        orgs,
        service_accounts,
        account_order,
        rates,
        default_rate,
        enforcement,
        reservations: Vec::new(),
    };
    for (i, org) in file.orgs.iter().enumerate() {
        if org.parent.is_none() {
            continue;
        }
        let ancestors = policy.ancestors(&org.id);
        let top = ancestors.last().copied().unwrap_or(org.id.as_str());
        let top_plan = policy.orgs.get(top).and_then(|o| o.plan);
        if !top_plan.is_some_and(Plan::allows_sub_accounts) {
            return Err(bad(
                format!("orgs[{i}].parent"),
                format!(
                    "sub-accounts need a business or enterprise parent: the top of this tree, \
                     `{top}`, is on plan {}; move `{top}` to business or enterprise or remove \
                     `parent`",
                    top_plan.map_or("(none)", Plan::as_str)
                ),
            ));
        }
        // A sub-account limit above an ancestor's is never reached: worth
        // saying, not worth refusing.
        if let Some(own) = org.max_sessions
            && let Some((tightest, limit)) = ancestors
                .iter()
                .skip(1)
                .filter_map(|a| policy.session_limit(a).map(|l| (*a, l)))
                .min_by_key(|(_, l)| *l)
            && own > limit
        {
            warnings.push(format!(
                "{}: key `orgs[{i}].max_sessions`: {own} is above the limit of {limit} of \
                 `{tightest}`, which also counts this sub-account's sessions; it is never reached",
                path.display()
            ));
        }
    }

    // Reservations.
    let mut reservations: Vec<Reservation> = Vec::with_capacity(file.reservations.len());
    // Device -> (window, its key), to find overlaps across reservations.
    let mut booked: HashMap<DeviceUuid, Vec<(Window, String)>> = HashMap::new();
    for (i, reservation) in file.reservations.iter().enumerate() {
        let at = format!("reservations[{i}]");
        if !policy.orgs.contains_key(&reservation.org) {
            return Err(bad(
                format!("{at}.org"),
                format!(
                    "`{}` is not an org of this file; a reservation is for an org",
                    reservation.org
                ),
            ));
        }
        if reservation.devices.is_empty() {
            return Err(bad(
                format!("{at}.devices"),
                "lists no device; name the GPU or MIG UUIDs the org gets".into(),
            ));
        }
        if reservation.windows.is_empty() {
            return Err(bad(
                format!("{at}.windows"),
                "has no window; give at least one { start, end }".into(),
            ));
        }
        let mut windows = Vec::with_capacity(reservation.windows.len());
        for (j, window) in reservation.windows.iter().enumerate() {
            let key = format!("{at}.windows[{j}]");
            let start = window_time(&window.start).map_err(|r| bad(format!("{key}.start"), r))?;
            let end = window_time(&window.end).map_err(|r| bad(format!("{key}.end"), r))?;
            if end <= start {
                return Err(bad(
                    format!("{key}.end"),
                    format!(
                        "`{}` is not after start `{}`; a window ends after it starts",
                        window.end, window.start
                    ),
                ));
            }
            windows.push((Window { start, end }, key));
        }
        for (j, (window, key)) in windows.iter().enumerate() {
            if let Some((_, other)) = windows[..j].iter().find(|(w, _)| w.overlaps(window)) {
                return Err(bad(
                    key.clone(),
                    format!(
                        "overlaps `{other}`; windows of one reservation must not overlap \
                         (merge them into one)"
                    ),
                ));
            }
        }

        let mut devices = Vec::with_capacity(reservation.devices.len());
        for (j, uuid) in reservation.devices.iter().enumerate() {
            let key = format!("{at}.devices[{j}]");
            if !(uuid.starts_with("GPU-") || uuid.starts_with("MIG-")) || uuid.len() <= 4 {
                return Err(bad(
                    key,
                    format!(
                        "`{uuid}` is not a device UUID: it starts with `GPU-` or `MIG-` as NVML \
                         reports it"
                    ),
                ));
            }
            let device = DeviceUuid::new(uuid.as_str());
            if devices.contains(&device) {
                return Err(bad(
                    key,
                    format!("`{uuid}` is listed twice in this reservation"),
                ));
            }
            let slots = booked.entry(device.clone()).or_default();
            for (window, window_key) in &windows {
                if let Some((_, other)) = slots.iter().find(|(w, _)| w.overlaps(window)) {
                    return Err(bad(
                        window_key.clone(),
                        format!(
                            "overlaps `{other}` on device {uuid}; a device has one reservation \
                             at a time, so move one window or drop the device from one \
                             reservation"
                        ),
                    ));
                }
            }
            slots.extend(windows.iter().cloned());
            if let Some(host) = host_devices
                && !host.contains(&device)
            {
                warnings.push(format!(
                    "{}: key `{key}`: device {uuid} is not on this host; the reservation has no \
                     effect here",
                    path.display()
                ));
            }
            devices.push(device);
        }
        reservations.push(Reservation {
            org: reservation.org.clone(),
            devices,
            windows: windows.into_iter().map(|(w, _)| w).collect(),
            billing: match reservation.billing {
                ReservationBilling::Reservation => BillingPath::Reservation,
                ReservationBilling::Balance => BillingPath::Balance,
            },
        });
    }
    policy.reservations = reservations;
    Ok(LoadedPolicy { policy, warnings })
}

/// A key of a TOML table as it would be written: bare when it can be,
/// quoted otherwise (rate keys are device class names, with spaces).
fn toml_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}

/// The largest amount of credits a nano-credit `i64` holds.
const MAX_CREDITS: f64 = (i64::MAX / Credits::NANOS_PER_CREDIT) as f64;

/// A balance or rate as written: finite, not negative, and small enough to
/// count in nano-credits.
fn credits(value: f64) -> Result<Credits, String> {
    if !value.is_finite() || value < 0.0 {
        return Err(format!(
            "{value} is not an amount of credits: use a number >= 0"
        ));
    }
    if value > MAX_CREDITS {
        return Err(format!(
            "{value} is too large: at most {MAX_CREDITS} credits"
        ));
    }
    Ok(Credits::from_f64(value))
}

fn opening_balance(at: &str, balance: Option<f64>) -> Result<Credits, (String, String)> {
    balance
        .map(credits)
        .transpose()
        .map(Option::unwrap_or_default)
        .map_err(|reason| (format!("{at}.balance"), reason))
}

fn check_max_sessions(at: &str, max_sessions: Option<u32>) -> Result<(), (String, String)> {
    if max_sessions == Some(0) {
        return Err((
            format!("{at}.max_sessions"),
            "0 would refuse every launch; use 1 or more, or remove the key for the plan's limit"
                .into(),
        ));
    }
    Ok(())
}

fn window_time(text: &str) -> Result<UnixNanos, String> {
    humantime::parse_rfc3339_weak(text)
        .map(UnixNanos::from_system_time)
        .map_err(|e| {
            format!(
                "`{text}` is not a time ({e}): write RFC 3339 in UTC, e.g. 2026-01-01T00:00:00Z"
            )
        })
}

/// The indexes of orgs on a cycle of parents, in parent order, if there is
/// one.
fn find_parent_cycle(orgs: &[OrgFile], index: &HashMap<&str, usize>) -> Option<Vec<usize>> {
    // Orgs known to lead to a top without a cycle.
    let mut settled = vec![false; orgs.len()];
    for start in 0..orgs.len() {
        let mut path: Vec<usize> = Vec::new();
        let mut at = Some(start);
        while let Some(i) = at {
            if settled.get(i).copied().unwrap_or(true) {
                break;
            }
            if let Some(pos) = path.iter().position(|p| *p == i) {
                return Some(path.split_off(pos));
            }
            path.push(i);
            at = orgs
                .get(i)
                .and_then(|o| o.parent.as_deref())
                .and_then(|p| index.get(p).copied());
        }
        for i in path {
            if let Some(done) = settled.get_mut(i) {
                *done = true;
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::toml_file::KeyProblem;

    fn example() -> Policy {
        let loaded = Policy::load(Path::new("fixtures/policy-example.toml"), None).unwrap();
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        loaded.policy
    }

    fn parse(text: &str) -> Result<LoadedPolicy, FileError> {
        Policy::parse(Path::new("p.toml"), text, None)
    }

    /// The key and reason of a policy that must be refused.
    fn refused(text: &str) -> KeyProblem {
        match parse(text) {
            Err(FileError::Invalid { problem, .. }) => problem,
            Err(other) => panic!("expected an invalid key, got {other}"),
            Ok(_) => panic!("accepted:\n{text}"),
        }
    }

    fn assert_refused(text: &str, key: &str, reason_part: &str) {
        let problem = refused(text);
        assert_eq!(problem.key, key, "{problem}");
        assert!(
            problem.reason.contains(reason_part),
            "`{}` lacks `{reason_part}`",
            problem.reason
        );
    }

    const USERS: &str = r#"
[[users]]
id = "u-a"
plan = "free"
[[users]]
id = "u-b"
plan = "pro"
"#;

    const BIG: &str = r#"
[[orgs]]
id = "big"
plan = "business"
"#;

    #[test]
    fn the_example_has_three_users_and_three_orgs() {
        let policy = example();
        let accounts: Vec<&str> = policy.accounts().collect();
        assert_eq!(
            accounts,
            ["u-alice", "u-bob", "u-carol", "acme", "acme-vision", "tiny"]
        );
        let kinds = |kind| {
            accounts
                .iter()
                .filter(|a| policy.kind_of(a) == Some(kind))
                .count()
        };
        assert_eq!(kinds(AccountKind::User), 3);
        assert_eq!(kinds(AccountKind::Org), 3);
        assert_eq!(
            policy.kind_of("sa-acme-ci"),
            Some(AccountKind::ServiceAccount)
        );
        assert_eq!(policy.kind_of("nobody"), None);
        assert_eq!(policy.service_account_org("sa-acme-ci"), Some("acme"));
        assert_eq!(policy.service_account_org("u-alice"), None);
    }

    #[test]
    fn rates_come_from_their_class_or_the_default() {
        let policy = example();
        assert_eq!(
            policy.rate("NVIDIA A100-SXM4-80GB MIG 1g.10gb"),
            Rate(Credits::from_f64(0.00015))
        );
        assert_eq!(
            policy.rate("NVIDIA A100-SXM4-80GB"),
            Rate(Credits::from_f64(0.001))
        );
        assert_eq!(
            policy.rate("NVIDIA H100 80GB HBM3"),
            Rate(Credits::from_f64(0.001))
        );
        let bare = parse("").unwrap().policy;
        assert_eq!(bare.rate("anything"), Rate(Credits::ZERO));
    }

    #[test]
    fn enforcement_and_balances_are_read_with_their_defaults() {
        let policy = example();
        assert_eq!(
            policy.enforcement(),
            &Enforcement {
                min_balance_seconds: 60,
                on_balance_exhausted: OnBalanceExhausted::Stop,
                grace: Duration::from_secs(30),
            }
        );
        assert_eq!(policy.opening_balance("u-alice"), Credits::from_f64(40.0));
        assert_eq!(policy.opening_balance("acme"), Credits::from_f64(500.0));
        assert_eq!(policy.opening_balance("acme-vision"), Credits::ZERO);
        assert_eq!(policy.opening_balance("nobody"), Credits::ZERO);

        let custom = parse(
            "[enforcement]\non_balance_exhausted = \"continue\"\n[[users]]\nid = \"u\"\nplan = \"free\"\n",
        )
        .unwrap()
        .policy;
        assert_eq!(
            custom.enforcement().on_balance_exhausted,
            OnBalanceExhausted::Continue
        );
        assert_eq!(custom.enforcement().min_balance_seconds, 60);
        assert_eq!(custom.opening_balance("u"), Credits::ZERO);
        assert_eq!(Policy::empty().enforcement(), &Enforcement::default());
    }

    #[test]
    fn a_sub_account_is_billed_to_the_top_of_its_tree() {
        let policy = example();
        assert_eq!(policy.billed_account("acme-vision"), "acme");
        assert_eq!(policy.billed_account("acme"), "acme");
        assert_eq!(policy.billed_account("u-bob"), "u-bob");
        assert_eq!(policy.billed_account("sa-acme-ci"), "sa-acme-ci");
        assert_eq!(policy.billed_account("nobody"), "nobody");
    }

    #[test]
    fn ancestors_and_subtrees() {
        let policy = example();
        assert_eq!(policy.ancestors("acme-vision"), ["acme-vision", "acme"]);
        assert_eq!(policy.ancestors("acme"), ["acme"]);
        assert!(policy.ancestors("u-alice").is_empty());
        assert_eq!(policy.subtree("acme"), ["acme", "acme-vision"]);
        assert_eq!(policy.subtree("acme-vision"), ["acme-vision"]);
        assert_eq!(policy.subtree("tiny"), ["tiny"]);
        assert!(policy.subtree("nobody").is_empty());

        let deep = parse(
            r#"
[[orgs]]
id = "c"
parent = "b"
[[orgs]]
id = "top"
plan = "enterprise"
[[orgs]]
id = "b"
parent = "top"
[[orgs]]
id = "b2"
parent = "top"
"#,
        )
        .unwrap()
        .policy;
        assert_eq!(deep.ancestors("c"), ["c", "b", "top"]);
        assert_eq!(deep.billed_account("c"), "top");
        assert_eq!(deep.subtree("top"), ["top", "b", "c", "b2"]);
    }

    #[test]
    fn session_limits_follow_plan_or_max_sessions() {
        let policy = example();
        assert_eq!(policy.session_limit("u-alice"), Some(3));
        assert_eq!(policy.session_limit("u-bob"), Some(1));
        assert_eq!(policy.session_limit("acme"), Some(25));
        assert_eq!(policy.session_limit("acme-vision"), Some(2));
        assert_eq!(policy.session_limit("tiny"), Some(2));
        assert_eq!(policy.session_limit("sa-acme-ci"), None);
        assert_eq!(policy.session_limit("nobody"), None);

        let open = parse(&format!(
            "{BIG}[[orgs]]\nid = \"sub\"\nparent = \"big\"\n[[users]]\nid = \"u\"\nplan = \"free\"\nmax_sessions = 4\n"
        ))
        .unwrap()
        .policy;
        assert_eq!(open.session_limit("sub"), None);
        assert_eq!(open.session_limit("u"), Some(4));
        for plan in [
            Plan::Free,
            Plan::Pro,
            Plan::Team,
            Plan::Business,
            Plan::Enterprise,
        ] {
            assert_eq!(
                plan.is_personal(),
                matches!(plan, Plan::Free | Plan::Pro),
                "{plan:?}"
            );
        }
        assert_eq!(Plan::Enterprise.default_limit(), 50);
        assert_eq!(Plan::Team.default_limit(), 10);
    }

    #[test]
    fn admin_and_owner_roles_apply_to_sub_accounts_from_above() {
        let policy = example();
        assert_eq!(policy.role_of("u-alice", "acme"), Some(Role::Owner));
        assert_eq!(policy.role_of("u-alice", "acme-vision"), Some(Role::Owner));
        assert_eq!(policy.role_of("u-bob", "acme"), Some(Role::Member));
        assert_eq!(policy.role_of("u-bob", "acme-vision"), Some(Role::Admin));
        assert_eq!(policy.role_of("u-carol", "acme"), Some(Role::Admin));
        assert_eq!(policy.role_of("u-carol", "acme-vision"), Some(Role::Admin));
        assert_eq!(policy.role_of("u-carol", "tiny"), Some(Role::Owner));
        assert_eq!(policy.role_of("u-alice", "tiny"), None);
        assert_eq!(policy.role_of("nobody", "acme"), None);
        assert_eq!(policy.role_of("u-alice", "nowhere"), None);
        assert!(Role::Member < Role::Admin && Role::Admin < Role::Owner);

        // A parent's plain member is not a member of the sub-account.
        let tree = parse(&format!(
            "{USERS}{BIG}members = [{{ user = \"u-a\", role = \"member\" }}]\n\
             [[orgs]]\nid = \"sub\"\nparent = \"big\"\n"
        ))
        .unwrap()
        .policy;
        assert_eq!(tree.role_of("u-a", "big"), Some(Role::Member));
        assert_eq!(tree.role_of("u-a", "sub"), None);
    }

    #[test]
    fn reservations_are_read_with_their_windows() {
        let policy = example();
        let [reservation] = policy.reservations() else {
            panic!("one reservation expected");
        };
        assert_eq!(reservation.org, "acme");
        assert_eq!(
            reservation.devices,
            [DeviceUuid::new("GPU-6a5da790-0728-45bf-9407-3e280f594b6d")]
        );
        assert_eq!(reservation.billing, BillingPath::Reservation);
        let start = UnixNanos::parse_rfc3339("2026-01-01T00:00:00Z").unwrap();
        let end = UnixNanos::parse_rfc3339("2030-01-01T00:00:00Z").unwrap();
        assert_eq!(reservation.windows, [Window { start, end }]);
        assert!(reservation.is_active(start));
        assert!(!reservation.is_active(end));
        assert!(!reservation.is_active(UnixNanos(start.0 - 1)));
        assert!(reservation.is_active(UnixNanos(end.0 - 1)));
    }

    #[test]
    fn a_reserved_device_not_on_this_host_is_a_warning() {
        let host = HashSet::from([DeviceUuid::new("GPU-other")]);
        let loaded = Policy::load(Path::new("fixtures/policy-example.toml"), Some(&host)).unwrap();
        assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
        let warning = &loaded.warnings[0];
        assert!(
            warning.contains("GPU-6a5da790-0728-45bf-9407-3e280f594b6d"),
            "{warning}"
        );
        assert!(warning.contains("reservations[0].devices[0]"), "{warning}");
        assert!(warning.contains("policy-example.toml"), "{warning}");

        let here = HashSet::from([DeviceUuid::new("GPU-6a5da790-0728-45bf-9407-3e280f594b6d")]);
        let loaded = Policy::load(Path::new("fixtures/policy-example.toml"), Some(&here)).unwrap();
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    }

    #[test]
    fn the_empty_policy_knows_nobody() {
        let policy = Policy::empty();
        assert_eq!(policy.accounts().count(), 0);
        assert_eq!(policy.kind_of("u-alice"), None);
        assert_eq!(policy.rate("NVIDIA A100-SXM4-80GB"), Rate(Credits::ZERO));
        assert!(policy.reservations().is_empty());
    }

    #[test]
    fn reading_a_missing_file_names_it() {
        let err = Policy::load(Path::new("/nonexistent/policy.toml"), None).unwrap_err();
        assert!(matches!(err, FileError::Read { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/policy.toml"));
    }

    #[test]
    fn unknown_keys_and_plans_are_refused_by_name() {
        assert_refused(
            "[[users]]\nid = \"u\"\nplan = \"gold\"\n",
            "users[0].plan",
            "unknown variant `gold`",
        );
        assert_refused(
            "[[users]]\nid = \"u\"\nplan = \"free\"\nbalanse = 1.0\n",
            "users[0].balanse",
            "unknown field",
        );
        assert_refused(
            "[enforcement]\ngrace = 3\n",
            "enforcement.grace",
            "unknown field",
        );
        assert_refused(
            "[enforcement]\non_balance_exhausted = \"pause\"\n",
            "enforcement.on_balance_exhausted",
            "unknown variant",
        );
        assert_refused(
            &format!("{USERS}{BIG}members = [{{ user = \"u-a\", role = \"boss\" }}]\n"),
            "orgs[0].members[0].role",
            "unknown variant",
        );
        assert_refused(
            &format!(
                "{BIG}[[reservations]]\norg = \"big\"\ndevices = [\"GPU-1\"]\nwindows = [{{ start = \"2026-01-01T00:00:00Z\", end = \"2027-01-01T00:00:00Z\" }}]\nbilling = \"free\"\n"
            ),
            "reservations[0].billing",
            "unknown variant",
        );
    }

    #[test]
    fn plans_must_fit_the_kind_of_account() {
        assert_refused(
            "[[orgs]]\nid = \"o\"\nplan = \"pro\"\n",
            "orgs[0].plan",
            "personal plan",
        );
        assert_refused(
            "[[users]]\nid = \"u\"\nplan = \"team\"\n",
            "users[0].plan",
            "org plan",
        );
        assert_refused(
            "[[orgs]]\nid = \"o\"\n",
            "orgs[0].plan",
            "a top-level org needs a plan",
        );
    }

    #[test]
    fn ids_are_one_namespace() {
        assert_refused(
            &format!("{USERS}[[users]]\nid = \"u-a\"\nplan = \"free\"\n"),
            "users[2].id",
            "`u-a` is already the id at `users[0].id`",
        );
        assert_refused(
            &format!("{USERS}[[orgs]]\nid = \"u-b\"\nplan = \"team\"\n"),
            "orgs[0].id",
            "share one namespace",
        );
        assert_refused(
            &format!("{BIG}service_accounts = [{{ id = \"big\" }}]\n"),
            "orgs[0].service_accounts[0].id",
            "already the id at `orgs[0].id`",
        );
        assert_refused(
            &format!(
                "{BIG}service_accounts = [{{ id = \"sa\" }}]\n[[orgs]]\nid = \"o2\"\nplan = \"team\"\nservice_accounts = [{{ id = \"sa\" }}]\n"
            ),
            "orgs[1].service_accounts[0].id",
            "already the id",
        );
        assert_refused(
            "[[users]]\nid = \"\"\nplan = \"free\"\n",
            "users[0].id",
            "not an account id",
        );
    }

    #[test]
    fn parents_must_exist_and_form_trees() {
        assert_refused(
            &format!("{BIG}[[orgs]]\nid = \"sub\"\nparent = \"nope\"\n"),
            "orgs[1].parent",
            "`nope` is not an org",
        );
        let problem = refused(
            r#"
[[orgs]]
id = "top"
plan = "business"
[[orgs]]
id = "a"
parent = "b"
[[orgs]]
id = "b"
parent = "c"
[[orgs]]
id = "c"
parent = "a"
[[orgs]]
id = "leaf"
parent = "a"
"#,
        );
        assert_eq!(problem.key, "orgs[1].parent");
        assert!(
            problem.reason.contains("cycle: a -> b -> c -> a"),
            "{}",
            problem.reason
        );
        assert_refused(
            "[[orgs]]\nid = \"self\"\nparent = \"self\"\n",
            "orgs[0].parent",
            "cycle: self -> self",
        );
    }

    #[test]
    fn sub_accounts_need_a_business_or_enterprise_top() {
        assert_refused(
            "[[orgs]]\nid = \"t\"\nplan = \"team\"\n[[orgs]]\nid = \"sub\"\nparent = \"t\"\n",
            "orgs[1].parent",
            "sub-accounts need a business or enterprise parent",
        );
        // Deeper: the top decides, not the direct parent.
        assert_refused(
            "[[orgs]]\nid = \"t\"\nplan = \"team\"\n[[orgs]]\nid = \"mid\"\nparent = \"t\"\n[[orgs]]\nid = \"low\"\nparent = \"mid\"\n",
            "orgs[1].parent",
            "`t`, is on plan team",
        );
        assert!(
            parse("[[orgs]]\nid = \"e\"\nplan = \"enterprise\"\n[[orgs]]\nid = \"sub\"\nparent = \"e\"\n")
                .is_ok()
        );
    }

    #[test]
    fn sub_accounts_have_no_plan_or_balance_of_their_own() {
        assert_refused(
            &format!("{BIG}[[orgs]]\nid = \"sub\"\nparent = \"big\"\nplan = \"team\"\n"),
            "orgs[1].plan",
            "a sub-account has no plan of its own",
        );
        assert_refused(
            &format!("{BIG}[[orgs]]\nid = \"sub\"\nparent = \"big\"\nbalance = 1.0\n"),
            "orgs[1].balance",
            "billed to the top of its tree",
        );
    }

    #[test]
    fn members_must_be_known_users_listed_once() {
        assert_refused(
            &format!("{BIG}members = [{{ user = \"u-ghost\", role = \"member\" }}]\n"),
            "orgs[0].members[0].user",
            "`u-ghost` is not a user",
        );
        assert_refused(
            &format!(
                "{USERS}{BIG}members = [{{ user = \"u-a\", role = \"member\" }}, {{ user = \"u-b\", role = \"admin\" }}, {{ user = \"u-a\", role = \"owner\" }}]\n"
            ),
            "orgs[0].members[2].user",
            "already a member at `orgs[0].members[0]`",
        );
        // A service account is not a user either.
        assert_refused(
            &format!(
                "{BIG}service_accounts = [{{ id = \"sa\" }}]\nmembers = [{{ user = \"sa\", role = \"member\" }}]\n"
            ),
            "orgs[0].members[0].user",
            "is not a user",
        );
    }

    #[test]
    fn limits_and_amounts_must_make_sense() {
        assert_refused(
            "[[users]]\nid = \"u\"\nplan = \"free\"\nmax_sessions = 0\n",
            "users[0].max_sessions",
            "0 would refuse every launch",
        );
        assert_refused(
            &format!("{BIG}max_sessions = 0\n"),
            "orgs[0].max_sessions",
            "use 1 or more",
        );
        assert_refused(
            "[[users]]\nid = \"u\"\nplan = \"free\"\nmax_sessions = -1\n",
            "users[0].max_sessions",
            "",
        );
        assert_refused(
            "[[users]]\nid = \"u\"\nplan = \"free\"\nbalance = -0.5\n",
            "users[0].balance",
            "not an amount of credits",
        );
        assert_refused(
            &format!("{BIG}balance = nan\n"),
            "orgs[0].balance",
            "not an amount of credits",
        );
        assert_refused(
            &format!("{BIG}balance = 1e300\n"),
            "orgs[0].balance",
            "too large",
        );
        assert_refused(
            "[rates]\ndefault = -1.0\n",
            "rates.default",
            "not an amount of credits",
        );
        assert_refused(
            "[rates]\n\"NVIDIA A100-SXM4-80GB\" = inf\n",
            "rates.\"NVIDIA A100-SXM4-80GB\"",
            "not an amount of credits",
        );
    }

    const WINDOW_2026: &str =
        "{ start = \"2026-01-01T00:00:00Z\", end = \"2027-01-01T00:00:00Z\" }";

    fn reservation(org: &str, devices: &str, windows: &str) -> String {
        format!("[[reservations]]\norg = \"{org}\"\ndevices = [{devices}]\nwindows = [{windows}]\n")
    }

    #[test]
    fn reservations_need_a_known_org_and_real_windows() {
        assert_refused(
            &format!("{BIG}{}", reservation("nope", "\"GPU-1\"", WINDOW_2026)),
            "reservations[0].org",
            "`nope` is not an org",
        );
        assert_refused(
            &format!(
                "{USERS}{BIG}{}",
                reservation("u-a", "\"GPU-1\"", WINDOW_2026)
            ),
            "reservations[0].org",
            "is not an org",
        );
        assert_refused(
            &format!(
                "{BIG}{}",
                reservation(
                    "big",
                    "\"GPU-1\"",
                    "{ start = \"2027-01-01T00:00:00Z\", end = \"2027-01-01T00:00:00Z\" }"
                )
            ),
            "reservations[0].windows[0].end",
            "not after start",
        );
        assert_refused(
            &format!(
                "{BIG}{}",
                reservation(
                    "big",
                    "\"GPU-1\"",
                    "{ start = \"2027-01-01T00:00:00Z\", end = \"2026-01-01T00:00:00Z\" }"
                )
            ),
            "reservations[0].windows[0].end",
            "not after start",
        );
        assert_refused(
            &format!(
                "{BIG}{}",
                reservation(
                    "big",
                    "\"GPU-1\"",
                    "{ start = \"next tuesday\", end = \"2026-01-01T00:00:00Z\" }"
                )
            ),
            "reservations[0].windows[0].start",
            "is not a time",
        );
        assert_refused(
            &format!("{BIG}{}", reservation("big", "\"nvidia0\"", WINDOW_2026)),
            "reservations[0].devices[0]",
            "not a device UUID",
        );
        assert_refused(
            &format!("{BIG}{}", reservation("big", "", WINDOW_2026)),
            "reservations[0].devices",
            "lists no device",
        );
        assert_refused(
            &format!("{BIG}{}", reservation("big", "\"GPU-1\"", "")),
            "reservations[0].windows",
            "has no window",
        );
        assert_refused(
            &format!(
                "{BIG}{}",
                reservation("big", "\"GPU-1\", \"GPU-1\"", WINDOW_2026)
            ),
            "reservations[0].devices[1]",
            "listed twice",
        );
    }

    #[test]
    fn a_device_has_one_reservation_window_at_a_time() {
        // Within one reservation.
        assert_refused(
            &format!(
                "{BIG}{}",
                reservation(
                    "big",
                    "\"GPU-1\"",
                    &format!(
                        "{WINDOW_2026}, {{ start = \"2026-12-31T23:59:59Z\", end = \"2028-01-01T00:00:00Z\" }}"
                    )
                )
            ),
            "reservations[0].windows[1]",
            "overlaps `reservations[0].windows[0]`",
        );
        // Across reservations, on a shared device.
        assert_refused(
            &format!(
                "{BIG}[[orgs]]\nid = \"other\"\nplan = \"team\"\n{}{}",
                reservation("big", "\"GPU-1\", \"GPU-2\"", WINDOW_2026),
                reservation(
                    "other",
                    "\"GPU-3\", \"GPU-2\"",
                    "{ start = \"2026-06-01T00:00:00Z\", end = \"2026-07-01T00:00:00Z\" }"
                ),
            ),
            "reservations[1].windows[0]",
            "overlaps `reservations[0].windows[0]` on device GPU-2",
        );
        // Back-to-back windows and disjoint devices are fine.
        let fine = parse(&format!(
            "{BIG}{}{}{}",
            reservation(
                "big",
                "\"GPU-1\"",
                &format!(
                    "{WINDOW_2026}, {{ start = \"2027-01-01T00:00:00Z\", end = \"2028-01-01T00:00:00Z\" }}"
                )
            ),
            reservation(
                "big",
                "\"GPU-1\"",
                "{ start = \"2028-01-01T00:00:00Z\", end = \"2029-01-01T00:00:00Z\" }"
            ),
            reservation("big", "\"GPU-2\"", WINDOW_2026),
        ))
        .unwrap();
        assert_eq!(fine.policy.reservations().len(), 3);
    }

    #[test]
    fn reservation_billing_may_be_the_balance() {
        let policy = parse(&format!(
            "{BIG}{}billing = \"balance\"\n",
            reservation("big", "\"GPU-1\"", WINDOW_2026)
        ))
        .unwrap()
        .policy;
        assert_eq!(policy.reservations()[0].billing, BillingPath::Balance);
    }

    #[test]
    fn an_unreachable_sub_account_limit_is_a_warning() {
        let loaded = parse(
            "[[orgs]]\nid = \"top\"\nplan = \"business\"\nmax_sessions = 4\n[[orgs]]\nid = \"sub\"\nparent = \"top\"\nmax_sessions = 5\n",
        )
        .unwrap();
        assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
        assert!(
            loaded.warnings[0].contains("orgs[1].max_sessions"),
            "{:?}",
            loaded.warnings
        );
    }

    #[test]
    fn window_edges() {
        let window = Window {
            start: UnixNanos(10),
            end: UnixNanos(20),
        };
        assert!(!window.contains(UnixNanos(9)));
        assert!(window.contains(UnixNanos(10)));
        assert!(window.contains(UnixNanos(19)));
        assert!(!window.contains(UnixNanos(20)));
        let next = Window {
            start: UnixNanos(20),
            end: UnixNanos(30),
        };
        assert!(!window.overlaps(&next) && !next.overlaps(&window));
        let straddling = Window {
            start: UnixNanos(19),
            end: UnixNanos(21),
        };
        assert!(window.overlaps(&straddling) && next.overlaps(&straddling));
    }
}
