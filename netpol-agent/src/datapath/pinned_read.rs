//! Reading decision maps from their pins, without loading the programs: the buffer packets read now
//! (`explain --live`), and what an agent of the layout before the buffers (`_V1`) left, which an
//! agent of this build adopts into both of its buffers.

use std::path::Path;

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, MapError};
use netpol_common::{
    CONFIG_GENERATION, EndpointInfo, IpInfo, IpKey, PolicyKey, PolicyValue, SvcKey, SvcValue,
    buffer, map_names, service,
};

use super::{Contents, read_shared, read_trie};

/// The prefix length of one address in the frontends trie (V1 held addresses in a hash map).
const HOST: u32 = 128;

fn open(maps_dir: &Path, name: &str) -> Result<MapData, MapError> {
    MapData::from_pin(maps_dir.join(name))
}

/// Everything but the frontends, from the maps named `[endpoints, ipcache, cidrs, policy, services]`.
fn read_common(maps_dir: &Path, names: [&str; 5]) -> Result<Contents, MapError> {
    let [endpoints, ipcache, cidrs, policy, services] = names;
    let endpoints: HashMap<_, u32, EndpointInfo> =
        HashMap::try_from(Map::HashMap(open(maps_dir, endpoints)?))?;
    let ipcache: HashMap<_, IpKey, IpInfo> =
        HashMap::try_from(Map::HashMap(open(maps_dir, ipcache)?))?;
    let cidrs: LpmTrie<_, IpKey, u32> = LpmTrie::try_from(Map::LpmTrie(open(maps_dir, cidrs)?))?;
    let policy: LpmTrie<_, PolicyKey, PolicyValue> =
        LpmTrie::try_from(Map::LpmTrie(open(maps_dir, policy)?))?;
    let services: HashMap<_, SvcKey, SvcValue> =
        HashMap::try_from(Map::HashMap(open(maps_dir, services)?))?;
    read_shared(&endpoints, &ipcache, (&cidrs, &policy), &services)
}

/// The V1 decision maps pinned in `maps_dir`, or `None` when their endpoints map is not there.
pub fn read_v1(maps_dir: &Path) -> Result<Option<Contents>, MapError> {
    let [endpoints, ipcache, cidrs, policy, services, frontends] = map_names::OBSOLETE;
    if !maps_dir.join(endpoints).exists() {
        return Ok(None);
    }
    let mut c = read_common(maps_dir, [endpoints, ipcache, cidrs, policy, services])?;
    let frontends: HashMap<_, IpKey, u32> =
        HashMap::try_from(Map::HashMap(open(maps_dir, frontends)?))?;
    c.frontends = frontends
        .keys()
        .map(|k| k.map(|k| ((k, HOST), 1)))
        .collect::<Result<_, _>>()?;
    Ok(Some(c))
}

/// The decision maps of buffer `b`, each read from the pin `pin(name)` names.
pub fn read_buffer(
    maps_dir: &Path,
    b: usize,
    pin: impl Fn(&'static str) -> String,
) -> Result<Contents, MapError> {
    let names = [
        map_names::ENDPOINTS[b],
        map_names::IPCACHE[b],
        map_names::CIDRS[b],
        map_names::POLICY[b],
        service::MAP_NAME[b],
    ];
    let names = names.map(&pin);
    let mut c = read_common(
        maps_dir,
        [&names[0], &names[1], &names[2], &names[3], &names[4]],
    )?;
    let frontends: LpmTrie<_, IpKey, u32> = LpmTrie::try_from(Map::LpmTrie(open(
        maps_dir,
        &pin(service::FRONTENDS_MAP_NAME[b]),
    )?))?;
    c.frontends = read_trie(&frontends)?;
    Ok(c)
}

/// The policy generation and the contents of the buffer it names, as pinned in `maps_dir` by a
/// running (or stopped) agent of this build.
pub fn read_live(maps_dir: &Path) -> Result<(u32, Contents), MapError> {
    let config: Array<_, u32> = Array::try_from(Map::Array(open(maps_dir, map_names::CONFIG)?))?;
    let generation = config.get(&CONFIG_GENERATION, 0)?;
    let c = read_buffer(maps_dir, buffer::of(generation), str::to_owned)?;
    Ok((generation, c))
}
