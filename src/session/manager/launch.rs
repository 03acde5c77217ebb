//! Launching a session: admission and the device pick in the ledger's
//! transaction ([`admit`]), then the container with exactly its devices.

use std::collections::{BTreeMap, HashMap};

use crate::allocation::{self, DeviceSelector, Unavailable};
use crate::clock::UnixNanos;
use crate::config::DeviceInjection;
use crate::error::{Reason, Refusal};
use crate::events::EventKind;
use crate::gpu::{AssignableDevice, DeviceUuid};
use crate::ledger::{Admitted, BeginError, Begun, LedgerView, NewSession};
use crate::metering::Rate;
use crate::policy::Policy;
use crate::policy::admission::{self, LaunchAccount, OpenSession};
use crate::runtime::{
    ContainerId, ContainerSpec, ContainerState, DeviceRequest, RuntimeError, VolumeMount, labels,
};
use crate::session::request::{HOST_DEVICE_VARIABLES, LaunchPlan};
use crate::session::{EndReason, SessionId, SessionRecord};

use super::{PIDS_LIMIT, SessionManager, engine, exit_detail, volume_name};

impl SessionManager {
    /// Starts a session: reserves devices among `devices` (those in
    /// `unhealthy` excluded) and records the session in one ledger
    /// transaction, then creates and starts its container. A repeated
    /// request id returns the first session. Anything failing after the
    /// reservation removes the container and releases the devices.
    pub async fn launch(
        &self,
        plan: LaunchPlan,
        devices: Vec<AssignableDevice>,
        unhealthy: Vec<DeviceUuid>,
    ) -> Result<SessionRecord, Refusal> {
        if self.is_draining() {
            return Err(Refusal::new(
                Reason::NodeDraining,
                "this node is draining and takes no new sessions; launch on another node",
            ));
        }
        // Only a recovering reconcile takes this lock for writing, and a
        // launch that finds it free never meets one: once recovered, no
        // reconcile settles STARTING sessions again.
        let recovering = match self.recovery.try_read() {
            Ok(cause) => cause.clone(),
            Err(_) => Some(Refusal::new(
                Reason::LedgerUnavailable,
                "a reconcile after a failure is under way",
            )),
        };
        if let Some(cause) = recovering {
            return Err(Refusal::new(
                cause.reason,
                format!(
                    "this agent has not yet brought its ledger in line with the container \
                     engine since it started ({}); launches resume once it has: retry later \
                     or launch on another node",
                    cause.message
                ),
            ));
        }
        let mut unavailable: HashMap<DeviceUuid, Unavailable> = unhealthy
            .into_iter()
            .map(|uuid| (uuid, Unavailable::Unhealthy))
            .collect();
        for device in self.foreign_devices().into_keys() {
            unavailable.entry(device).or_insert(Unavailable::Foreign);
        }
        if let Some(credit) = &self.credit {
            credit.gate()?;
        }
        let policy = self.policy();
        let account =
            admission::authorize_launch(&policy, &plan.principal, plan.scope, &plan.account_id)?;
        let now = self.clock.now();
        let new = NewSession {
            id: SessionId::generate(),
            request_id: plan.request_id.clone(),
            node_id: self.settings.node_id.clone(),
            scope: plan.scope,
            account_id: account.account_id.clone(),
            billed_account_id: account.billed_account_id.clone(),
            owner: plan.principal.clone(),
            image: plan.image.clone(),
            created_at: now,
        };
        // Registered before the session is recorded and until this returns:
        // the reconcile never decides a STARTING session's fate while its
        // launch is under way.
        let _launching = self.launching(&new.id);
        let selector = plan.devices.clone();
        // With a control plane, balances are its own: local debits do not
        // count against the balance it sent.
        let local_balances = self.credit.is_none();
        // Decided on the ledger's view inside the transaction that records
        // the session: concurrent launches see each other's sessions.
        let begun = self
            .ledger
            .begin_session(new, move |view| {
                admit(
                    &policy,
                    &account,
                    view,
                    &devices,
                    unavailable,
                    &selector,
                    now,
                    local_balances,
                )
            })
            .await;
        let session = match begun {
            Ok(Begun::Existing(session)) => {
                tracing::info!(session = %session.id, request_id = %session.request_id, "repeated launch request: returning its session");
                return Ok(session);
            }
            Ok(Begun::Created(session)) => session,
            Err(BeginError::Refused(refusal)) => return Err(refusal),
            Err(BeginError::Ledger(error)) => return Err(error.into()),
        };

        let mut created = None;
        let started = async {
            let session = match &self.credit {
                Some(credit) => self.authorize_session(credit, &session).await?,
                None => session.clone(),
            };
            self.start_container(&session, &plan, &mut created).await
        };
        match started.await {
            Ok((running, state)) => {
                tracing::info!(
                    session = %running.id,
                    account = %running.account_id,
                    devices = %running.device_list(),
                    container = running.container_id.as_deref().unwrap_or(""),
                    "session started"
                );
                self.events.publish(
                    self.clock.now(),
                    EventKind::SessionStarted(Box::new(running.clone())),
                );
                if state.running {
                    return Ok(running);
                }
                // It already exited: it ran from StartedAt to FinishedAt,
                // billed so, and ends like any other session. Should the
                // ledger fail here, the session stays RUNNING and the next
                // reconcile closes it at the same FinishedAt.
                match self
                    .close(
                        &running.id,
                        state.finished_at,
                        EndReason::Exited,
                        exit_detail(&state),
                    )
                    .await
                {
                    Ok(closed) => Ok(closed.unwrap_or(running)),
                    Err(error) => {
                        tracing::warn!(session = %running.id, error = %error, "could not record that the container already exited; the next reconcile closes the session");
                        Ok(running)
                    }
                }
            }
            Err(refusal) => {
                tracing::warn!(session = %session.id, reason = %refusal, "launch failed; releasing its devices");
                if let Some(id) = created
                    && let Err(error) = self.runtime.remove(&id).await
                {
                    tracing::error!(session = %session.id, container = %id, error = %error, "could not remove the container of a failed launch; the next reconcile retries");
                }
                if let Err(error) = self
                    .ledger
                    .close(
                        &session.id,
                        None,
                        EndReason::LaunchFailed,
                        refusal.message.clone(),
                    )
                    .await
                {
                    tracing::error!(session = %session.id, error = %error, "could not record the failed launch; the next reconcile closes it");
                }
                Err(refusal)
            }
        }
    }

    async fn start_container(
        &self,
        session: &SessionRecord,
        plan: &LaunchPlan,
        created: &mut Option<ContainerId>,
    ) -> Result<(SessionRecord, ContainerState), Refusal> {
        let spec = self.container_spec(session, plan);
        for volume in &spec.volumes {
            let owner =
                BTreeMap::from([(labels::VOLUME_OWNER.to_owned(), session.account_id.clone())]);
            self.runtime
                .ensure_volume(&volume.volume, &owner)
                .await
                .map_err(engine)?;
        }
        let id = self.runtime.create(&spec).await.map_err(engine)?;
        *created = Some(id.clone());
        self.runtime.start(&id).await.map_err(engine)?;
        let state = self
            .runtime
            .inspect(&id)
            .await
            .map_err(engine)?
            .ok_or_else(|| engine(RuntimeError::NoSuchContainer(id.0.clone())))?;
        let started_at = state.started_at.ok_or_else(|| {
            engine(RuntimeError::Engine {
                call: "inspect",
                detail: format!("container {id} reports no StartedAt after its start"),
            })
        })?;
        let Some(running) = self
            .ledger
            .mark_running(&session.id, &id.0, started_at)
            .await?
        else {
            // The session is no longer STARTING: something ended it while
            // its container started. The container goes (the caller
            // removes what it created); nothing runs unmetered.
            return Err(Refusal::new(
                Reason::ContainerEngineUnavailable,
                "this launch was given up while its container started; the container is \
                 removed and nothing was billed: launch again with a new request_id",
            ));
        };
        Ok((running, state))
    }

    /// The container a plan asks for, with the session's devices and labels.
    fn container_spec(&self, session: &SessionRecord, plan: &LaunchPlan) -> ContainerSpec {
        let uuids: Vec<String> = session.devices.iter().map(|d| d.uuid.to_string()).collect();
        let visible = session.device_list();
        let mut env = plan.env.clone();
        env.insert("NVIDIA_VISIBLE_DEVICES".into(), visible.clone());
        env.insert("CUDA_VISIBLE_DEVICES".into(), visible.clone());
        for (variable, neutral) in HOST_DEVICE_VARIABLES {
            env.insert(variable.into(), neutral.into());
        }
        let devices = match self.settings.injection {
            DeviceInjection::Env => DeviceRequest::None,
            DeviceInjection::Nvidia => DeviceRequest::Devices {
                driver: "nvidia".into(),
                device_ids: uuids.clone(),
                capabilities: vec!["gpu".into()],
            },
            DeviceInjection::Cdi => DeviceRequest::Devices {
                driver: "cdi".into(),
                device_ids: uuids
                    .iter()
                    .map(|u| format!("nvidia.com/gpu={u}"))
                    .collect(),
                capabilities: Vec::new(),
            },
        };
        let labels = BTreeMap::from([
            (labels::SESSION.to_owned(), session.id.0.clone()),
            (labels::NODE.to_owned(), self.settings.node_id.clone()),
            (labels::ACCOUNT.to_owned(), session.account_id.clone()),
            (
                labels::BILLED_ACCOUNT.to_owned(),
                session.billed_account_id.clone(),
            ),
            (labels::SCOPE.to_owned(), session.scope.as_str().to_owned()),
            (labels::OWNER.to_owned(), session.owner.subject.clone()),
            (labels::DEVICES.to_owned(), visible),
        ]);
        ContainerSpec {
            name: format!("gpuwarden-{}", session.id),
            image: plan.image.clone(),
            command: plan.command.clone(),
            env,
            labels,
            volumes: plan
                .volumes
                .iter()
                .map(|v| VolumeMount {
                    volume: volume_name(&session.account_id, &v.name),
                    target: v.target.clone(),
                    read_only: v.read_only,
                })
                .collect(),
            devices,
            network: plan.network,
            pids_limit: PIDS_LIMIT,
        }
    }
}

#[allow(clippy::too_many_arguments)]
/// Where a launch is decided, on the ledger's view inside the transaction
/// that records it: the account's pools, the devices (reservations of
/// other orgs kept out, the account's own preferred), the billing path and
/// the balance, in that order.
fn admit(
    policy: &Policy,
    account: &LaunchAccount,
    view: &LedgerView,
    devices: &[AssignableDevice],
    mut unavailable: HashMap<DeviceUuid, Unavailable>,
    selector: &DeviceSelector,
    now: UnixNanos,
    local_balances: bool,
) -> Result<Admitted, Refusal> {
    let open: Vec<OpenSession<'_>> = view
        .open
        .iter()
        .map(|session| OpenSession {
            id: &session.id,
            scope: session.scope,
            account_id: &session.account_id,
            devices: &session.devices,
        })
        .collect();
    admission::check_pools(account, policy, &open)?;
    for device in view.open.iter().flat_map(|session| &session.devices) {
        unavailable.insert(device.clone(), Unavailable::Held);
    }
    // Reserved for another org is the lasting reason, whatever else holds
    // the device now: a caller told NO_FREE_DEVICES would only try again.
    for (device, reserved) in admission::reserved_for_others(policy, account, now) {
        unavailable.insert(device, reserved);
    }
    let preferred = admission::reserved_for(policy, account, now);
    let picked = allocation::pick_preferring(devices, &unavailable, selector, &preferred)?;
    let uuids: Vec<DeviceUuid> = picked.iter().map(|d| d.uuid.clone()).collect();
    let billing_path = admission::billing_path(policy, account, &uuids, now);
    let rates: Vec<Rate> = picked.iter().map(|d| policy.rate(&d.class)).collect();
    let mut balance = policy.opening_balance(&account.billed_account_id);
    if local_balances {
        balance = balance + view.billed_delta;
    }
    admission::check_balance(policy, account, billing_path, balance, &rates)?;
    Ok(Admitted {
        devices: picked.into_iter().zip(rates).collect(),
        billing_path,
    })
}
