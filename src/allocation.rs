//! Where a device is picked: given the host's assignable devices, which of
//! them are taken or unhealthy, and what a launch asks for, choose exactly
//! the devices the session gets, or say why not. Pure: the ledger calls it
//! inside the transaction that records the holds, so two launches can never
//! pick the same device.

use std::collections::{HashMap, HashSet};

use crate::error::{Reason, Refusal};
use crate::gpu::{AssignableDevice, DeviceUuid};

/// What a launch asks for (validated: counts are at least 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSelector {
    /// `count` full GPUs, of a model whose name contains `model` (any case).
    Gpus { count: u32, model: Option<String> },
    /// `count` MIG instances of `profile`, e.g. `1g.10gb`.
    Mig { profile: String, count: u32 },
    /// Exactly these devices.
    Exact(Vec<DeviceUuid>),
}

/// Why a device cannot be given now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unavailable {
    /// Held by a session of this agent.
    Held,
    /// Its health forbids new sessions.
    Unhealthy,
    /// A running container this agent does not know claims it.
    Foreign,
    /// In an open reservation window of another org. The org is kept for
    /// the agent's own logs and audit; refusals never name it, because it is
    /// another customer.
    Reserved { org: String },
}

/// Picks the devices for `selector` among `devices`, skipping `unavailable`
/// ones. Devices are taken in inventory order, so the choice is stable.
pub fn pick(
    devices: &[AssignableDevice],
    unavailable: &HashMap<DeviceUuid, Unavailable>,
    selector: &DeviceSelector,
) -> Result<Vec<AssignableDevice>, Refusal> {
    pick_preferring(devices, unavailable, selector, &HashSet::new())
}

/// Like [`pick`], but a launch that names a count rather than exact devices
/// gets free devices in `preferred` first (the launching account's own
/// reservations), so it uses what it already has paid for before taking
/// devices others could use. Within each group the inventory order stands,
/// so the choice stays stable. Exact selectors ignore `preferred`.
pub fn pick_preferring(
    devices: &[AssignableDevice],
    unavailable: &HashMap<DeviceUuid, Unavailable>,
    selector: &DeviceSelector,
    preferred: &HashSet<DeviceUuid>,
) -> Result<Vec<AssignableDevice>, Refusal> {
    match selector {
        DeviceSelector::Exact(uuids) => pick_exact(devices, unavailable, uuids),
        DeviceSelector::Gpus { count, model } => {
            let wanted = model.as_deref().map(str::to_lowercase);
            let matches = |d: &&AssignableDevice| {
                d.mig_profile.is_none()
                    && wanted
                        .as_deref()
                        .is_none_or(|m| d.model.to_lowercase().contains(m))
            };
            let what = match model {
                Some(model) => format!("full GPU of model `{model}`"),
                None => "full GPU".to_owned(),
            };
            pick_matching(devices, unavailable, preferred, *count, &what, matches)
        }
        DeviceSelector::Mig { profile, count } => {
            let matches = |d: &&AssignableDevice| d.mig_profile.as_deref() == Some(profile);
            pick_matching(
                devices,
                unavailable,
                preferred,
                *count,
                &format!("MIG {profile} instance"),
                matches,
            )
        }
    }
}

fn pick_matching(
    devices: &[AssignableDevice],
    unavailable: &HashMap<DeviceUuid, Unavailable>,
    preferred: &HashSet<DeviceUuid>,
    count: u32,
    what: &str,
    matches: impl Fn(&&AssignableDevice) -> bool,
) -> Result<Vec<AssignableDevice>, Refusal> {
    let candidates: Vec<&AssignableDevice> = devices.iter().filter(matches).collect();
    if candidates.is_empty() {
        return Err(Refusal::new(
            Reason::UnknownDevice,
            format!("this node has no {what}; ask GetInventory what it has"),
        ));
    }
    let (first, rest): (Vec<&AssignableDevice>, Vec<&AssignableDevice>) =
        candidates.iter().partition(|d| preferred.contains(&d.uuid));
    let free: Vec<AssignableDevice> = first
        .into_iter()
        .chain(rest)
        .filter(|d| !unavailable.contains_key(&d.uuid))
        .take(count as usize)
        .cloned()
        .collect();
    if free.len() < count as usize {
        let unhealthy = candidates
            .iter()
            .filter(|d| unavailable.get(&d.uuid) == Some(&Unavailable::Unhealthy))
            .count();
        let reserved = candidates
            .iter()
            .filter(|d| matches!(unavailable.get(&d.uuid), Some(Unavailable::Reserved { .. })))
            .count();
        let reserved_note = if reserved > 0 {
            format!(", {reserved} reserved for another organisation")
        } else {
            String::new()
        };
        return Err(Refusal::new(
            Reason::NoFreeDevices,
            format!(
                "{count} {what}(s) asked for, {} free of {} on this node \
                 ({unhealthy} unhealthy{reserved_note}); ask for fewer or try another node",
                free.len(),
                candidates.len()
            ),
        )
        .with("free", free.len().to_string()));
    }
    Ok(free)
}

fn pick_exact(
    devices: &[AssignableDevice],
    unavailable: &HashMap<DeviceUuid, Unavailable>,
    uuids: &[DeviceUuid],
) -> Result<Vec<AssignableDevice>, Refusal> {
    let mut seen = HashSet::new();
    let mut picked = Vec::with_capacity(uuids.len());
    for uuid in uuids {
        if !seen.insert(uuid) {
            return Err(Refusal::new(
                Reason::InvalidRequest,
                format!("devices.device_uuids names {uuid} twice"),
            ));
        }
        let device = devices.iter().find(|d| &d.uuid == uuid).ok_or_else(|| {
            Refusal::new(
                Reason::UnknownDevice,
                format!(
                    "{uuid} is not an assignable device of this node (a GPU in MIG mode is \
                     assigned through its MIG instances); ask GetInventory"
                ),
            )
            .with("device_uuid", uuid.as_str())
        })?;
        match unavailable.get(uuid) {
            None => picked.push(device.clone()),
            Some(Unavailable::Unhealthy) => {
                return Err(Refusal::new(
                    Reason::DeviceUnhealthy,
                    format!("{uuid} is unhealthy and takes no new sessions; pick another device"),
                )
                .with("device_uuid", uuid.as_str()));
            }
            Some(Unavailable::Reserved { .. }) => {
                return Err(Refusal::new(
                    Reason::DeviceReserved,
                    format!(
                        "{uuid} is reserved for another organisation in this reservation window; \
                         pick another device or launch after the window ends"
                    ),
                )
                .with("device_uuid", uuid.as_str()));
            }
            Some(Unavailable::Held | Unavailable::Foreign) => {
                return Err(Refusal::new(
                    Reason::NoFreeDevices,
                    format!("{uuid} is in use by another session; pick another device"),
                )
                .with("device_uuid", uuid.as_str()));
            }
        }
    }
    Ok(picked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::simulated::load_fixture;
    use std::path::Path;

    fn dgx() -> Vec<AssignableDevice> {
        load_fixture(Path::new("fixtures/sim-dgx-a100.toml"))
            .unwrap()
            .assignable()
    }

    fn uuids(devices: &[AssignableDevice]) -> Vec<&str> {
        devices.iter().map(|d| d.uuid.as_str()).collect()
    }

    fn reason(result: Result<Vec<AssignableDevice>, Refusal>) -> Reason {
        result.unwrap_err().reason
    }

    const GPU2: &str = "GPU-faba74c6-7dc9-4bfd-ab4e-85cb4d26fa32";
    const GPU3: &str = "GPU-1088c26b-51c8-423d-a0f1-df76cdf8be11";
    const MIG_PARENT: &str = "GPU-b644960d-a808-45b0-b4e1-f6add005db2d";
    const GPU5: &str = "GPU-539b7fc3-164a-4bf5-a24e-4077c908e67f";
    const GPU7: &str = "GPU-6a5da790-0728-45bf-9407-3e280f594b6d";

    fn reserved_by(org: &str) -> Unavailable {
        Unavailable::Reserved { org: org.into() }
    }

    #[test]
    fn full_gpus_are_taken_in_index_order_skipping_taken_ones() {
        let devices = dgx();
        let none = HashMap::new();
        let two = pick(
            &devices,
            &none,
            &DeviceSelector::Gpus {
                count: 2,
                model: None,
            },
        )
        .unwrap();
        assert_eq!(uuids(&two), [GPU2, GPU3]);

        let held = HashMap::from([(DeviceUuid::new(GPU2), Unavailable::Held)]);
        let one = pick(
            &devices,
            &held,
            &DeviceSelector::Gpus {
                count: 1,
                model: None,
            },
        )
        .unwrap();
        assert_eq!(uuids(&one), [GPU3]);
    }

    #[test]
    fn gpu_model_matches_part_of_the_name_in_any_case() {
        let devices = dgx();
        let none = HashMap::new();
        let a100 = DeviceSelector::Gpus {
            count: 6,
            model: Some("a100-sxm4".into()),
        };
        assert_eq!(pick(&devices, &none, &a100).unwrap().len(), 6);
        let h100 = DeviceSelector::Gpus {
            count: 1,
            model: Some("H100".into()),
        };
        assert_eq!(reason(pick(&devices, &none, &h100)), Reason::UnknownDevice);
    }

    #[test]
    fn more_gpus_than_free_is_no_free_devices() {
        let devices = dgx();
        let mut unavailable = HashMap::new();
        unavailable.insert(DeviceUuid::new(GPU2), Unavailable::Unhealthy);
        let refusal = pick(
            &devices,
            &unavailable,
            &DeviceSelector::Gpus {
                count: 6,
                model: None,
            },
        )
        .unwrap_err();
        assert_eq!(refusal.reason, Reason::NoFreeDevices);
        assert!(
            refusal.message.contains("5 free of 6"),
            "{}",
            refusal.message
        );
        assert!(
            refusal.message.contains("1 unhealthy"),
            "{}",
            refusal.message
        );
    }

    #[test]
    fn mig_instances_are_picked_by_profile_and_never_full_gpus() {
        let devices = dgx();
        let none = HashMap::new();
        let picked = pick(
            &devices,
            &none,
            &DeviceSelector::Mig {
                profile: "1g.10gb".into(),
                count: 9,
            },
        )
        .unwrap();
        assert_eq!(picked.len(), 9);
        assert!(
            picked
                .iter()
                .all(|d| d.mig_profile.as_deref() == Some("1g.10gb"))
        );
        let ten = DeviceSelector::Mig {
            profile: "1g.10gb".into(),
            count: 10,
        };
        assert_eq!(reason(pick(&devices, &none, &ten)), Reason::NoFreeDevices);
        let unknown = DeviceSelector::Mig {
            profile: "4g.40gb".into(),
            count: 1,
        };
        assert_eq!(
            reason(pick(&devices, &none, &unknown)),
            Reason::UnknownDevice
        );
    }

    #[test]
    fn exact_devices_are_checked_one_by_one() {
        let devices = dgx();
        let exact = |list: &[&str]| {
            DeviceSelector::Exact(list.iter().map(|u| DeviceUuid::new(*u)).collect())
        };
        let none = HashMap::new();
        assert_eq!(
            uuids(&pick(&devices, &none, &exact(&[GPU3, GPU2])).unwrap()),
            [GPU3, GPU2]
        );
        // The parent of MIG instances is not assignable.
        assert_eq!(
            reason(pick(&devices, &none, &exact(&[MIG_PARENT]))),
            Reason::UnknownDevice
        );
        assert_eq!(
            reason(pick(&devices, &none, &exact(&["GPU-nope"]))),
            Reason::UnknownDevice
        );
        assert_eq!(
            reason(pick(&devices, &none, &exact(&[GPU2, GPU2]))),
            Reason::InvalidRequest
        );
        let held = HashMap::from([(DeviceUuid::new(GPU2), Unavailable::Held)]);
        assert_eq!(
            reason(pick(&devices, &held, &exact(&[GPU2]))),
            Reason::NoFreeDevices
        );
        let foreign = HashMap::from([(DeviceUuid::new(GPU2), Unavailable::Foreign)]);
        assert_eq!(
            reason(pick(&devices, &foreign, &exact(&[GPU2]))),
            Reason::NoFreeDevices
        );
        let sick = HashMap::from([(DeviceUuid::new(GPU2), Unavailable::Unhealthy)]);
        assert_eq!(
            reason(pick(&devices, &sick, &exact(&[GPU2]))),
            Reason::DeviceUnhealthy
        );
    }

    #[test]
    fn preferred_devices_are_taken_first_then_inventory_order() {
        let devices = dgx();
        let none = HashMap::new();
        let two = DeviceSelector::Gpus {
            count: 2,
            model: None,
        };
        let preferred = HashSet::from([DeviceUuid::new(GPU7), DeviceUuid::new(GPU5)]);
        let picked = pick_preferring(&devices, &none, &two, &preferred).unwrap();
        // Both preferred, in inventory order among themselves.
        assert_eq!(uuids(&picked), [GPU5, GPU7]);

        let three = DeviceSelector::Gpus {
            count: 3,
            model: None,
        };
        let only_seven = HashSet::from([DeviceUuid::new(GPU7)]);
        let picked = pick_preferring(&devices, &none, &three, &only_seven).unwrap();
        assert_eq!(uuids(&picked), [GPU7, GPU2, GPU3]);

        // A preferred device that is taken is skipped like any other.
        let held = HashMap::from([(DeviceUuid::new(GPU7), Unavailable::Held)]);
        let picked = pick_preferring(&devices, &held, &two, &only_seven).unwrap();
        assert_eq!(uuids(&picked), [GPU2, GPU3]);

        // A preferred device that does not match the selector is not taken.
        let mig = DeviceSelector::Mig {
            profile: "1g.10gb".into(),
            count: 1,
        };
        let picked = pick_preferring(&devices, &none, &mig, &only_seven).unwrap();
        assert_eq!(picked[0].mig_profile.as_deref(), Some("1g.10gb"));
    }

    #[test]
    fn pick_is_pick_preferring_nothing() {
        let devices = dgx();
        let none = HashMap::new();
        let selector = DeviceSelector::Gpus {
            count: 6,
            model: None,
        };
        assert_eq!(
            pick(&devices, &none, &selector).unwrap(),
            pick_preferring(&devices, &none, &selector, &HashSet::new()).unwrap()
        );
    }

    #[test]
    fn exact_selectors_ignore_preference_order() {
        let devices = dgx();
        let none = HashMap::new();
        let exact = DeviceSelector::Exact(vec![DeviceUuid::new(GPU3), DeviceUuid::new(GPU7)]);
        let preferred = HashSet::from([DeviceUuid::new(GPU7)]);
        let picked = pick_preferring(&devices, &none, &exact, &preferred).unwrap();
        assert_eq!(uuids(&picked), [GPU3, GPU7]);
    }

    #[test]
    fn an_exact_reserved_device_is_device_reserved_without_naming_the_org() {
        let devices = dgx();
        let reserved = HashMap::from([(DeviceUuid::new(GPU7), reserved_by("acme"))]);
        let refusal = pick(
            &devices,
            &reserved,
            &DeviceSelector::Exact(vec![DeviceUuid::new(GPU7)]),
        )
        .unwrap_err();
        assert_eq!(refusal.reason, Reason::DeviceReserved);
        assert!(refusal.message.contains(GPU7), "{}", refusal.message);
        assert!(
            refusal
                .message
                .contains("reserved for another organisation"),
            "{}",
            refusal.message
        );
        assert!(!refusal.message.contains("acme"), "{}", refusal.message);
        assert!(
            refusal
                .metadata
                .iter()
                .all(|(_, value)| !value.contains("acme"))
        );
    }

    #[test]
    fn reserved_devices_are_not_free_for_counted_selectors() {
        let devices = dgx();
        let reserved = HashMap::from([(DeviceUuid::new(GPU7), reserved_by("acme"))]);
        let five = DeviceSelector::Gpus {
            count: 5,
            model: None,
        };
        let picked = pick(&devices, &reserved, &five).unwrap();
        assert!(!uuids(&picked).contains(&GPU7));

        let six = DeviceSelector::Gpus {
            count: 6,
            model: None,
        };
        // Being preferred does not make a reserved device free.
        let preferred = HashSet::from([DeviceUuid::new(GPU7)]);
        let refusal = pick_preferring(&devices, &reserved, &six, &preferred).unwrap_err();
        assert_eq!(refusal.reason, Reason::NoFreeDevices);
        assert!(
            refusal.message.contains("5 free of 6"),
            "{}",
            refusal.message
        );
        assert!(
            refusal
                .message
                .contains("1 reserved for another organisation"),
            "{}",
            refusal.message
        );
        assert!(!refusal.message.contains("acme"), "{}", refusal.message);
    }
}
