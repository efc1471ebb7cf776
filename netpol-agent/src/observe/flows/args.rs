//! The command line of `flows`: its flags, and the [`Filter`] they make. `--not` negates the
//! filter given right after it, so the order of the flags matters; clap keeps the position of every
//! value, which is read from the [`ArgMatches`] here.

use std::{
    collections::HashMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use clap::{ArgMatches, Args, ValueEnum};

use super::{DirectionFilter, Filter, FlowFilter, VerdictFilter, render::Format};

/// Output format of `flows`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputArg {
    Table,
    Json,
    Jsonl,
}

/// A point in time given to `--since` or `--until`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeArg {
    /// This long before now (`30s`, `1h30m`).
    Ago(Duration),
    /// An RFC 3339 time, as Unix ms.
    At(u64),
}

impl TimeArg {
    /// A duration (`1h30m`, as humantime reads it) or an RFC 3339 time.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Ok(d) = humantime::parse_duration(s) {
            return Ok(TimeArg::Ago(d));
        }
        chrono::DateTime::parse_from_rfc3339(s)
            .ok()
            .and_then(|t| u64::try_from(t.timestamp_millis()).ok())
            .map(TimeArg::At)
            .ok_or_else(|| format!("{s:?} is neither a duration (30s, 1h30m) nor an RFC 3339 time"))
    }

    /// Unix ms, with `now_ms` as now.
    pub fn unix_ms(self, now_ms: u64) -> u64 {
        match self {
            TimeArg::Ago(d) => {
                now_ms.saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            }
            TimeArg::At(ms) => ms,
        }
    }
}

/// Filters and output of `flows`. The values given to one filter are alternatives; different
/// filters must all match; `--not` hides what the filter after it matches.
#[derive(Args, Clone, Debug)]
pub struct FlowsArgs {
    /// Hide the flows the next filter matches (`--not --verdict allowed`). The filters given
    /// after --not together describe the flows hidden.
    // Append, not Count: clap keeps the position of every occurrence only for appended values.
    #[arg(long, action = clap::ArgAction::Append, num_args = 0, default_missing_value = "true")]
    pub not: Vec<bool>,
    /// Flows with a pod of this namespace on either side (also the namespace of pods given to
    /// --pod, --from, --to without one).
    #[arg(short, long)]
    pub namespace: Vec<String>,
    /// Flows with this pod (`namespace/name` or `name`) on either side.
    #[arg(long)]
    pub pod: Vec<String>,
    /// Flows from this pod (`namespace/name` or `name`) or CIDR.
    #[arg(long)]
    pub from: Vec<String>,
    /// Flows to this pod (`namespace/name` or `name`) or CIDR.
    #[arg(long)]
    pub to: Vec<String>,
    /// Flows with a pod on either side whose labels match this selector (`app=web,tier!=db`,
    /// `env in (a,b)`, `!canary`: kubectl's syntax). Needs a running agent.
    #[arg(short, long)]
    pub label: Vec<String>,
    /// Flows from a pod whose labels match this selector.
    #[arg(long)]
    pub from_label: Vec<String>,
    /// Flows to a pod whose labels match this selector.
    #[arg(long)]
    pub to_label: Vec<String>,
    /// Flows with this source or destination port.
    #[arg(long)]
    pub port: Vec<u16>,
    /// tcp, udp, sctp, icmp, icmpv6 or a protocol number.
    #[arg(long)]
    pub protocol: Vec<String>,
    /// Flows with this verdict.
    #[arg(long, value_enum)]
    pub verdict: Vec<VerdictFilter>,
    /// Flows into the local pod (ingress) or out of it (egress).
    #[arg(long, value_enum)]
    pub traffic_direction: Vec<DirectionFilter>,
    /// Flows whose verdict has this reason (`ingress-denied`, `policy`, `spoofed-source`, ...).
    #[arg(long)]
    pub reason: Vec<String>,
    /// Flows whose last packet is this recent (`30s`, `1h30m`) or later than this RFC 3339 time.
    #[arg(long, value_parser = TimeArg::parse)]
    pub since: Option<TimeArg>,
    /// Flows whose last packet is at least this old (`5m`) or before this RFC 3339 time.
    #[arg(long, value_parser = TimeArg::parse, conflicts_with = "follow")]
    pub until: Option<TimeArg>,
    /// Only the first N flows (oldest first).
    #[arg(long, conflicts_with_all = ["last", "follow"])]
    pub first: Option<usize>,
    /// Only the last N flows.
    #[arg(long)]
    pub last: Option<usize>,
    /// Keep printing new flows as they happen, of every verdict the filters ask for (after the
    /// recent ones, when --since or --last is given): drops as they happen, allowed flows once a
    /// second with that second's packets.
    #[arg(short, long)]
    pub follow: bool,
    /// Output format (with --follow, `table` prints one line per flow and `json` JSON lines).
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: OutputArg,
}

/// The ids of the filter flags, as clap names the fields of [`FlowsArgs`].
const FILTERS: [&str; 12] = [
    "namespace",
    "pod",
    "from",
    "to",
    "label",
    "from_label",
    "to_label",
    "port",
    "protocol",
    "verdict",
    "traffic_direction",
    "reason",
];

/// The ids of the other flags, which `--not` cannot negate.
const OTHERS: [&str; 6] = ["since", "until", "first", "last", "follow", "output"];

impl FlowsArgs {
    /// The output format.
    pub fn format(&self) -> Format {
        match self.output {
            OutputArg::Table => Format::Table,
            OutputArg::Json => Format::Json,
            OutputArg::Jsonl => Format::Jsonl,
        }
    }

    /// The filter these flags make; `matches` are the parsed flags (for the positions of
    /// `--not`), `now_ms` the Unix time (ms) that `--since 5m` counts back from.
    pub fn filter(&self, matches: &ArgMatches, now_ms: u64) -> Result<Filter, String> {
        let negated = negated(matches)?;
        let (mut include, mut exclude) = (FlowFilter::default(), FlowFilter::default());
        let mut sort = |id: &str, apply: &mut dyn FnMut(&mut FlowFilter, usize)| {
            let flags = negated.get(id).map(Vec::as_slice).unwrap_or_default();
            for (i, not) in flags.iter().enumerate() {
                apply(if *not { &mut exclude } else { &mut include }, i);
            }
        };
        sort("namespace", &mut |f, i| {
            f.namespace.push(self.namespace[i].clone())
        });
        sort("pod", &mut |f, i| f.pod.push(self.pod[i].clone()));
        sort("from", &mut |f, i| f.from.push(self.from[i].clone()));
        sort("to", &mut |f, i| f.to.push(self.to[i].clone()));
        sort("label", &mut |f, i| f.label.push(self.label[i].clone()));
        sort("from_label", &mut |f, i| {
            f.from_label.push(self.from_label[i].clone())
        });
        sort("to_label", &mut |f, i| {
            f.to_label.push(self.to_label[i].clone())
        });
        sort("port", &mut |f, i| f.port.push(self.port[i]));
        sort("protocol", &mut |f, i| {
            f.protocol.push(self.protocol[i].clone())
        });
        sort("verdict", &mut |f, i| f.verdict.push(self.verdict[i]));
        sort("traffic_direction", &mut |f, i| {
            f.traffic_direction.push(self.traffic_direction[i])
        });
        sort("reason", &mut |f, i| f.reason.push(self.reason[i].clone()));
        Ok(Filter {
            include,
            exclude,
            since_unix_ms: self.since.map(|t| t.unix_ms(now_ms)),
            until_unix_ms: self.until.map(|t| t.unix_ms(now_ms)),
            first: self.first,
            last: self.last,
        })
    }
}

/// Unix time now, in ms.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// For each filter id, whether each of its values (in order) was negated by a `--not` right
/// before it.
fn negated(matches: &ArgMatches) -> Result<HashMap<&'static str, Vec<bool>>, String> {
    let positions = positions(matches);
    let mut negated: HashMap<&'static str, Vec<bool>> = FILTERS
        .iter()
        .map(|id| (*id, vec![false; count(matches, id)]))
        .collect();
    let nots = positions.iter().enumerate().filter(|(_, p)| p.1 == "not");
    for (k, _) in nots {
        match positions.get(k + 1) {
            Some((_, "not", _)) => {
                return Err("--not --not: each --not negates the one filter after it".into());
            }
            Some((_, id, n)) => match negated.get_mut(id) {
                Some(flags) => flags[*n] = true,
                None => {
                    return Err(format!(
                        "--not negates a filter, not --{}",
                        id.replace('_', "-")
                    ));
                }
            },
            None => return Err("--not must be followed by the filter it negates".into()),
        }
    }
    Ok(negated)
}

/// Every flag given on the command line, as (clap index, id, occurrence of that id), in order.
fn positions(matches: &ArgMatches) -> Vec<(usize, &'static str, usize)> {
    let mut positions = Vec::new();
    for id in ["not"].into_iter().chain(FILTERS).chain(OTHERS) {
        if matches.value_source(id) != Some(clap::parser::ValueSource::CommandLine) {
            continue;
        }
        let indices = matches.indices_of(id).into_iter().flatten();
        positions.extend(indices.enumerate().map(|(n, at)| (at, id, n)));
    }
    positions.sort_unstable();
    positions
}

/// How many values filter `id` was given.
fn count(matches: &ArgMatches, id: &str) -> usize {
    matches.indices_of(id).map_or(0, Iterator::count)
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, FromArgMatches as _, Parser};

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: FlowsArgs,
    }

    const NOW_MS: u64 = 1_700_000_000_000;

    fn filter(argv: &[&str]) -> Result<Filter, String> {
        let matches = Cli::command()
            .try_get_matches_from(std::iter::once("flows").chain(argv.iter().copied()))
            .map_err(|e| e.to_string())?;
        let cli = Cli::from_arg_matches(&matches).map_err(|e| e.to_string())?;
        cli.args.filter(&matches, NOW_MS)
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn repeated_filters_add_alternatives_and_not_sends_the_next_one_to_the_hidden_set() {
        let f = filter(&[
            "--pod",
            "x/a",
            "--not",
            "--verdict",
            "allowed",
            "--pod=x/b",
            "-l",
            "app=web",
            "--not",
            "--pod",
            "x/c",
            "--port",
            "80",
            "--not",
            "-l",
            "tier=db",
            "--traffic-direction",
            "ingress",
            "--reason",
            "ingress-denied",
        ])
        .unwrap();
        assert_eq!(f.include.pod, strings(&["x/a", "x/b"]));
        assert_eq!(f.include.label, strings(&["app=web"]));
        assert_eq!(f.include.port, vec![80]);
        assert_eq!(f.include.traffic_direction, vec![DirectionFilter::Ingress]);
        assert_eq!(f.include.reason, strings(&["ingress-denied"]));
        assert_eq!(f.exclude.verdict, vec![VerdictFilter::Allowed]);
        assert_eq!(f.exclude.pod, strings(&["x/c"]));
        assert_eq!(f.exclude.label, strings(&["tier=db"]));
        assert!(f.include.verdict.is_empty());
    }

    #[test]
    fn misplaced_not_is_an_error_naming_what_follows_it() {
        let e = filter(&["--pod", "a", "--not"]).unwrap_err();
        assert!(e.contains("followed by the filter"), "{e}");
        let e = filter(&["--not", "--since", "5m", "--pod", "a"]).unwrap_err();
        assert!(e.contains("not --since"), "{e}");
        let e = filter(&["--not", "-f"]).unwrap_err();
        assert!(e.contains("not --follow"), "{e}");
        let e = filter(&["--not", "--not", "--pod", "a"]).unwrap_err();
        assert!(e.contains("--not --not"), "{e}");
    }

    #[test]
    fn times_are_durations_back_from_now_or_rfc3339() {
        let f = filter(&["--since", "1h30m", "--until", "2023-11-14T22:13:20Z"]).unwrap();
        assert_eq!(f.since_unix_ms, Some(NOW_MS - 5_400_000));
        assert_eq!(f.until_unix_ms, Some(1_700_000_000_000));
        let e = filter(&["--since", "yesterday"]).unwrap_err();
        assert!(
            e.contains("--since") && e.contains("neither a duration"),
            "{e}"
        );
    }

    #[test]
    fn counts_and_follow_exclude_what_cannot_go_together() {
        assert_eq!(filter(&["--first", "3"]).unwrap().first, Some(3));
        assert_eq!(filter(&["--last", "2", "-f"]).unwrap().last, Some(2));
        for bad in [
            &["--first", "1", "--last", "1"][..],
            &["--first", "1", "-f"],
            &["--until", "5m", "-f"],
            &["--verdict", "maybe"],
        ] {
            assert!(filter(bad).is_err(), "{bad:?}");
        }
    }
}
