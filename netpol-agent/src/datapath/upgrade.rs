//! Adopting what an agent of the layout before the buffers (`_V1`) left pinned: its decision maps
//! are read and become the contents of both new buffers, so that the pods' policy holds from the
//! moment the new programs replace the old ones, even before this agent has any cluster state.

use std::path::Path;

use aya::maps::{HashMap, LpmTrie, Map, MapData, MapError};
use netpol_common::map_names;

use super::{Contents, read_trie as trie};

/// The prefix length of one address in the frontends trie (V1 held addresses in a hash map).
const HOST: u32 = 128;

/// The V1 decision maps pinned in `maps_dir`, or `None` when their endpoints map is not there.
pub fn read_v1(maps_dir: &Path) -> Result<Option<Contents>, MapError> {
    let [endpoints, ipcache, cidrs, policy, services, frontends] = map_names::OBSOLETE;
    let open = |name: &str| MapData::from_pin(maps_dir.join(name));
    let Ok(endpoints) = open(endpoints) else {
        return Ok(None);
    };
    let endpoints: HashMap<_, u32, netpol_common::EndpointInfo> =
        HashMap::try_from(Map::HashMap(endpoints))?;
    let ipcache: HashMap<_, netpol_common::IpKey, netpol_common::IpInfo> =
        HashMap::try_from(Map::HashMap(open(ipcache)?))?;
    let cidrs: LpmTrie<_, netpol_common::IpKey, u32> =
        LpmTrie::try_from(Map::LpmTrie(open(cidrs)?))?;
    let policy: LpmTrie<_, netpol_common::PolicyKey, netpol_common::PolicyValue> =
        LpmTrie::try_from(Map::LpmTrie(open(policy)?))?;
    let services: HashMap<_, netpol_common::SvcKey, netpol_common::SvcValue> =
        HashMap::try_from(Map::HashMap(open(services)?))?;
    let frontends: HashMap<_, netpol_common::IpKey, u32> =
        HashMap::try_from(Map::HashMap(open(frontends)?))?;
    Ok(Some(Contents {
        endpoints: endpoints.iter().collect::<Result<_, _>>()?,
        ipcache: ipcache.iter().collect::<Result<_, _>>()?,
        cidrs: trie(&cidrs)?,
        policy: trie(&policy)?,
        services: services.iter().collect::<Result<_, _>>()?,
        frontends: frontends
            .keys()
            .map(|k| k.map(|k| ((k, HOST), 1)))
            .collect::<Result<_, _>>()?,
    }))
}
