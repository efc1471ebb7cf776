//! Pinned maps are checked before they are adopted. aya reuses a pinned map by name without looking
//! at it, so a map pinned by a build with another layout (a different value size, say) would be
//! read and written with the wrong layout. Every pin is compared with this build's definition of
//! the map, read from the embedded object itself, and a mismatch stops the agent with a clear error.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::maps::MapData;
use aya_obj::{EbpfSectionKind, maps::PinningType};
use netpol_common::map_names;
use thiserror::Error;

/// The shape of a map: what must match for a pinned map to be adopted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapShape {
    /// `bpf_map_type`.
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// A pinned map this build cannot adopt.
#[derive(Debug, Error)]
pub enum PinnedMapError {
    #[error("reading the map definitions of the embedded eBPF object: {0}")]
    Object(String),
    #[error("reading the pinned map {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error(
        "the pinned map {name} at {path} was made by an incompatible build ({differences}); this \
         agent cannot adopt it. To upgrade, run `netpol-agent cleanup` with the same --pin-dir \
         (it detaches the programs: the node's pods are not policed until this agent has started), \
         then start this agent"
    )]
    Incompatible {
        name: String,
        path: PathBuf,
        differences: String,
    },
}

/// The shapes of the maps this build pins, by name, from the object's own definitions.
pub fn expected(object: &[u8]) -> Result<BTreeMap<String, MapShape>, PinnedMapError> {
    let obj = aya_obj::Object::parse(object).map_err(|e| PinnedMapError::Object(e.to_string()))?;
    Ok(obj
        .maps
        .iter()
        .filter(|(_, m)| {
            m.pinning() == PinningType::ByName && m.section_kind() == EbpfSectionKind::Maps
        })
        .map(|(name, m)| {
            let shape = MapShape {
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries: m.max_entries(),
                flags: m.map_flags(),
            };
            (name.clone(), shape)
        })
        .collect())
}

/// How `pinned` differs from `expected`, for people; empty when it may be adopted.
pub fn differences(expected: &MapShape, pinned: &MapShape) -> Vec<String> {
    let fields = [
        ("type", expected.map_type, pinned.map_type),
        ("key size", expected.key_size, pinned.key_size),
        ("value size", expected.value_size, pinned.value_size),
        ("max entries", expected.max_entries, pinned.max_entries),
        ("flags", expected.flags, pinned.flags),
    ];
    fields
        .into_iter()
        .filter(|(_, want, have)| want != have)
        .map(|(what, want, have)| match what {
            "max entries" => {
                format!("max entries {have}, this agent asks for {want} (--max-* flags)")
            }
            _ => format!("{what} {have}, this build expects {want}"),
        })
        .collect()
}

/// Checks every map pinned under `maps_dir` that this build would adopt, with the sizes the agent
/// asks for (`sizes`, by name) instead of the object's. A map of `sizes` (a decision map) whose
/// size or flags differ passes: [`set_aside_resized`] replaces it.
pub fn check(maps_dir: &Path, object: &[u8], sizes: &[(&str, u32)]) -> Result<(), PinnedMapError> {
    for (name, mut want) in expected(object)? {
        let decision = sizes.iter().find(|(s, _)| *s == name);
        if let Some((_, n)) = decision {
            want.max_entries = *n;
        }
        let path = maps_dir.join(&name);
        if !path.exists() {
            continue;
        }
        let have = pinned_shape(&path)?;
        let diff = differences(&want, &have);
        let replaced = decision.is_some() && resizable(&want, &have);
        if !diff.is_empty() && !replaced {
            return Err(PinnedMapError::Incompatible {
                name,
                path,
                differences: diff.join(", "),
            });
        }
    }
    Ok(())
}

/// The suffix of a decision map's pin while it is being replaced by one of another size or flags
/// (bpffs refuses names with a dot).
pub const ASIDE: &str = "_RESIZED";

/// The pin name of map `name` while it is set aside.
pub fn aside_name(name: &str) -> String {
    format!("{name}{ASIDE}")
}

/// Whether only the size or the flags differ: the entries fit the new map as they are, so the map
/// can be replaced (copied) instead of refused.
fn resizable(want: &MapShape, have: &MapShape) -> bool {
    want.map_type == have.map_type
        && want.key_size == have.key_size
        && want.value_size == have.value_size
}

/// Moves aside (renames to `<name>`[`ASIDE`]) the pins of the maps in `sizes` (the decision maps)
/// that differ from this build's definition, sized as `sizes` says, only in max entries or flags.
/// The loader then creates them anew; the agent copies the old entries over and swaps its programs
/// in before it removes the old pins. An aside already there (an agent stopped mid-way) is the map
/// the old programs read: it is kept, and the pin beside it (a new map, perhaps half-filled) goes.
/// Returns the names moved.
pub fn set_aside_resized(
    maps_dir: &Path,
    object: &[u8],
    sizes: &[(&str, u32)],
) -> Result<Vec<String>, PinnedMapError> {
    let mut moved = Vec::new();
    for (name, mut want) in expected(object)? {
        let Some((_, n)) = sizes.iter().find(|(s, _)| *s == name) else {
            continue;
        };
        want.max_entries = *n;
        let (path, aside) = (maps_dir.join(&name), maps_dir.join(aside_name(&name)));
        let io_err = |what: &str, e: std::io::Error| PinnedMapError::Read {
            path: path.clone(),
            reason: format!("{what}: {e}"),
        };
        if !path.exists() {
            continue;
        }
        if aside.exists() {
            std::fs::remove_file(&path).map_err(|e| io_err("unpinning a half-made map", e))?;
            continue;
        }
        let have = pinned_shape(&path)?;
        if have == want || !resizable(&want, &have) {
            continue;
        }
        std::fs::rename(&path, &aside).map_err(|e| io_err("moving it aside to be resized", e))?;
        moved.push(name);
    }
    Ok(moved)
}

/// Undoes [`set_aside_resized`] for `names`: the new pins go and the old maps take their names
/// back, for an agent that could not copy or swap (the old programs still read the old maps).
pub fn restore_aside(maps_dir: &Path, names: &[&str]) -> std::io::Result<()> {
    for name in names {
        let aside = maps_dir.join(aside_name(name));
        if aside.exists() {
            std::fs::rename(&aside, maps_dir.join(name))?;
        }
    }
    Ok(())
}

/// Unpins the maps of older layouts ([`map_names::OBSOLETE`], [`map_names::RETIRED`]) under
/// `maps_dir`; returns the names removed. Programs still attached keep those maps alive until they
/// are replaced.
pub fn remove_obsolete(maps_dir: &Path) -> std::io::Result<Vec<&'static str>> {
    let mut removed = Vec::new();
    for name in map_names::OBSOLETE.into_iter().chain(map_names::RETIRED) {
        match std::fs::remove_file(maps_dir.join(name)) {
            Ok(()) => removed.push(name),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

fn pinned_shape(path: &Path) -> Result<MapShape, PinnedMapError> {
    let read_err = |reason: String| PinnedMapError::Read {
        path: path.to_owned(),
        reason,
    };
    let info = MapData::from_pin(path)
        .and_then(|m| m.info())
        .map_err(|e| read_err(e.to_string()))?;
    let map_type = info.map_type().map_err(|e| read_err(e.to_string()))? as u32;
    Ok(MapShape {
        map_type,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    })
}

#[cfg(test)]
mod tests {
    use netpol_common::{EndpointInfo, capacity, map_names};

    use super::*;

    #[test]
    fn the_object_defines_every_pinned_map_with_the_shared_layouts() {
        let maps = expected(crate::datapath::EBPF_OBJECT).unwrap();
        for name in map_names::ENDPOINTS {
            let ep = maps[name];
            assert_eq!(ep.key_size, 4);
            assert_eq!(ep.value_size as usize, size_of::<EndpointInfo>());
            assert_eq!(ep.max_entries, capacity::ENDPOINTS);
        }
        assert!(maps.contains_key(map_names::CONNTRACK));
        for name in netpol_common::service::MAP_NAME {
            assert!(maps.contains_key(name));
        }
        for name in map_names::OBSOLETE.into_iter().chain(map_names::RETIRED) {
            assert!(!maps.contains_key(name));
        }
    }

    #[test]
    fn differences_name_each_field_that_differs() {
        let want = MapShape {
            map_type: 1,
            key_size: 4,
            value_size: 32,
            max_entries: 1024,
            flags: 0,
        };
        assert!(differences(&want, &want).is_empty());
        let old = MapShape {
            value_size: 8,
            ..want
        };
        assert_eq!(
            differences(&want, &old),
            ["value size 8, this build expects 32"]
        );
    }
}
