//! How `flows` prints: a table whose columns fit the longest name, one compact line per flow for
//! `--follow` (where later rows are not known yet), a JSON array, or JSON lines.

use std::{collections::BTreeSet, fmt::Write as _};

use comfy_table::{CellAlignment, Table, presets};

use super::Flow;

/// Output format of `flows`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Jsonl,
}

/// `namespace/pod:port` (or the address), the port left out for protocols without ports.
fn endpoint_label(pod: Option<&String>, ip: &str, port: u16, protocol: &str) -> String {
    let host = match pod {
        Some(p) => p.clone(),
        None if ip.contains(':') => format!("[{ip}]"),
        None => ip.to_owned(),
    };
    if port == 0 && !matches!(protocol, "tcp" | "udp" | "sctp") {
        host
    } else {
        format!("{host}:{port}")
    }
}

/// The policies of a flow, sorted and comma-separated; `-` for none.
fn policies(f: &Flow) -> String {
    let names: BTreeSet<&str> = f.policies.iter().map(String::as_str).collect();
    if names.is_empty() {
        "-".to_owned()
    } else {
        names.into_iter().collect::<Vec<_>>().join(",")
    }
}

const HEADER: [&str; 11] = [
    "TIME",
    "NODE",
    "SOURCE",
    "DESTINATION",
    "PROTO",
    "DIRECTION",
    "VERDICT",
    "REASON",
    "POLICY",
    "PACKETS",
    "BYTES",
];

/// The table: a header line, then one row per flow, each column as wide as its widest cell (long
/// pod names are never cut).
pub fn table(flows: &[Flow]) -> String {
    let mut table = Table::new();
    table.load_preset(presets::NOTHING).set_header(HEADER);
    for f in flows {
        table.add_row([
            f.time.clone(),
            f.node.clone(),
            endpoint_label(f.src_pod.as_ref(), &f.src_ip, f.src_port, &f.protocol),
            endpoint_label(f.dst_pod.as_ref(), &f.dst_ip, f.dst_port, &f.protocol),
            f.protocol.clone(),
            f.direction.clone(),
            f.verdict.clone(),
            f.reason.clone(),
            policies(f),
            f.packets.to_string(),
            f.bytes.to_string(),
        ]);
    }
    for numbers in [HEADER.len() - 2, HEADER.len() - 1] {
        if let Some(column) = table.column_mut(numbers) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    let mut out = table.to_string();
    out.push('\n');
    out
}

/// One flow on one line, as `--follow` prints it (Hubble's compact form):
/// `TIME [NODE] SOURCE -> DESTINATION PROTO DIRECTION VERDICT (REASON) policy=.. packets=N bytes=N`.
pub fn compact(f: &Flow) -> String {
    let mut line = format!(
        "{} [{}] {} -> {} {} {} {} ({})",
        f.time,
        f.node,
        endpoint_label(f.src_pod.as_ref(), &f.src_ip, f.src_port, &f.protocol),
        endpoint_label(f.dst_pod.as_ref(), &f.dst_ip, f.dst_port, &f.protocol),
        f.protocol,
        f.direction,
        f.verdict.to_uppercase(),
        f.reason
    );
    if !f.policies.is_empty() {
        let _ = write!(line, " policy={}", policies(f));
    }
    let _ = write!(line, " packets={} bytes={}", f.packets, f.bytes);
    line
}

/// Renders flows in `format` (table; JSON array; one JSON object per line).
pub fn render(flows: &[Flow], format: Format) -> String {
    match format {
        Format::Table => table(flows),
        Format::Json => {
            let mut out = serde_json::to_string_pretty(flows).unwrap_or_default();
            out.push('\n');
            out
        }
        Format::Jsonl => {
            let mut out = String::new();
            for f in flows {
                let _ = writeln!(out, "{}", serde_json::to_string(f).unwrap_or_default());
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(src_pod: &str, dst_pod: Option<&str>) -> Flow {
        Flow {
            time: "2026-01-02T03:04:05.678Z".into(),
            node: "node-with-a-long-name".into(),
            src_ip: "10.42.1.11".into(),
            src_port: 4000,
            dst_ip: "fd00::10".into(),
            dst_port: 80,
            protocol: "tcp".into(),
            direction: "ingress".into(),
            verdict: "dropped".into(),
            reason: "ingress-denied".into(),
            policies: vec!["x/deny-b".into(), "x/deny-a".into()],
            packets: 12,
            bytes: 3456,
            src_pod: Some(src_pod.into()),
            dst_pod: dst_pod.map(Into::into),
        }
    }

    #[test]
    fn table_columns_fit_the_longest_pod_name_without_cutting_it() {
        let long = "a-namespace-with-a-long-name/a-deployment-7d9f8b6c5-x2k4p-with-more";
        let rows = [flow("x/b", None), flow(long, Some("x/a"))];
        let out = table(&rows);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(lines[2].contains(&format!("{long}:4000")), "{out}");
        assert!(lines[1].contains("[fd00::10]:80"), "{out}");
        // Every column starts at the same offset on every line: DESTINATION after the long name.
        let at = |line: &str, s: &str| line.find(s).unwrap_or_else(|| panic!("{s} in {line}"));
        assert_eq!(at(lines[0], "DESTINATION"), at(lines[1], "[fd00::10]:80"));
        assert_eq!(at(lines[0], "DESTINATION"), at(lines[2], "x/a:80"));
        assert_eq!(at(lines[0], "NODE"), at(lines[2], "node-with-a-long-name"));
        // Policies sorted; numbers right-aligned under their header.
        assert!(lines[1].contains("x/deny-a,x/deny-b"), "{out}");
        assert_eq!(
            at(lines[0], "BYTES") + "BYTES".len(),
            at(lines[1], "3456") + "3456".len()
        );
    }

    #[test]
    fn compact_lines_carry_node_verdict_reason_and_counts() {
        let mut f = flow("x/b", Some("x/a"));
        assert_eq!(
            compact(&f),
            "2026-01-02T03:04:05.678Z [node-with-a-long-name] x/b:4000 -> x/a:80 tcp ingress \
             DROPPED (ingress-denied) policy=x/deny-a,x/deny-b packets=12 bytes=3456"
        );
        f.policies.clear();
        f.protocol = "icmp".into();
        (f.src_port, f.dst_port) = (0, 0);
        assert!(compact(&f).contains("x/b -> x/a icmp"), "{}", compact(&f));
        assert!(!compact(&f).contains("policy="));
    }

    #[test]
    fn json_and_json_lines_hold_the_same_flows() {
        let rows = [flow("x/b", None), flow("x/c", Some("x/a"))];
        let array: Vec<Flow> = serde_json::from_str(&render(&rows, Format::Json)).unwrap();
        assert_eq!(array, rows);
        let lines: Vec<Flow> = render(&rows, Format::Jsonl)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines, rows);
    }
}
