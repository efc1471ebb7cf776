//! How many entries each decision map holds: set from the agent's flags when the maps are created,
//! and what the compiler fits its output into.

use netpol_common::{capacity, map_labels, map_names, service};

/// Entries of each decision map (each of its two buffers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    pub endpoints: u32,
    pub ipcache: u32,
    pub cidrs: u32,
    pub policy: u32,
    pub services: u32,
    pub frontends: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Capacities {
            endpoints: capacity::ENDPOINTS,
            ipcache: capacity::IPCACHE,
            cidrs: capacity::CIDRS,
            policy: capacity::POLICY,
            services: service::CAPACITY,
            frontends: service::FRONTENDS_CAPACITY,
        }
    }
}

/// The smallest size a decision map may be given: room for the node's own entries.
pub const MIN_ENTRIES: u32 = 16;

impl Capacities {
    /// Each map's pinned names (both buffers), metric label and size.
    pub fn by_map(&self) -> [([&'static str; 2], &'static str, u32); 6] {
        [
            (map_names::ENDPOINTS, map_labels::ENDPOINTS, self.endpoints),
            (map_names::IPCACHE, map_labels::IPCACHE, self.ipcache),
            (map_names::CIDRS, map_labels::CIDRS, self.cidrs),
            (map_names::POLICY, map_labels::POLICY, self.policy),
            (service::MAP_NAME, map_labels::SERVICES, self.services),
            (
                service::FRONTENDS_MAP_NAME,
                map_labels::FRONTENDS,
                self.frontends,
            ),
        ]
    }

    /// The first size below [`MIN_ENTRIES`], by its metric label.
    pub fn too_small(&self) -> Option<(&'static str, u32)> {
        self.by_map()
            .into_iter()
            .find(|(_, _, n)| *n < MIN_ENTRIES)
            .map(|(_, label, n)| (label, n))
    }
}
