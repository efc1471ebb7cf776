use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::{
    observe::control::EndpointStatus,
    verify::{
        Outcome,
        gather::{EndpointEvidence, HookEvidence, LinkEvidence, ProgEvidence, VethEvidence},
        selftest::Probe,
    },
};

fn kernel_ok() -> KernelEvidence {
    KernelEvidence {
        release: "6.18.0-1-amd64".into(),
        bpf_syscall: Ok(12),
        jit_enable: Ok("1".into()),
        jitted_program: None,
        btf_vmlinux: Ok(6_000_000),
        pin_dir: "/sys/fs/bpf/netpol".into(),
        pin_dir_bpffs: Ok(true),
    }
}

fn outcomes(checks: &[Check]) -> Vec<(&str, Outcome)> {
    checks
        .iter()
        .map(|c| (c.name.as_ref(), c.outcome))
        .collect()
}

#[test]
fn kernel_all_good() {
    let checks = kernel(&kernel_ok());
    assert!(
        checks.iter().all(|c| c.outcome == Outcome::Pass),
        "{checks:#?}"
    );
    assert_eq!(checks.len(), 5);
}

#[test]
fn kernel_verdicts() {
    let mut k = kernel_ok();
    k.release = "6.1.0-18-amd64".into();
    k.jit_enable = Ok("0".into());
    k.btf_vmlinux = Err("No such file or directory".into());
    k.pin_dir_bpffs = Ok(false);
    k.bpf_syscall = Err("Operation not permitted".into());
    let checks = kernel(&k);
    assert_eq!(
        outcomes(&checks),
        vec![
            ("kernel.bpf", Outcome::Fail),
            ("kernel.jit", Outcome::Warn),
            ("kernel.btf", Outcome::Warn),
            ("kernel.tcx", Outcome::Fail),
            ("kernel.bpffs", Outcome::Fail),
        ]
    );
    assert!(checks[3].summary.contains("6.1.0-18-amd64"));
    k.release = "6.6.0".into();
    k.pin_dir_bpffs = Err("does not exist".into());
    let checks = kernel(&k);
    assert_eq!(checks[3].outcome, Outcome::Pass);
    assert_eq!(checks[4].outcome, Outcome::Fail);
    assert!(checks[4].summary.contains("does not exist"));
    // In a non-initial network namespace the sysctl is missing: a JIT-compiled program proves it.
    k.jit_enable = Err("No such file or directory".into());
    assert_eq!(kernel(&k)[1].outcome, Outcome::Warn);
    k.jitted_program = Some((812, "pod_egress".into()));
    let jit = &kernel(&k)[1];
    assert_eq!(jit.outcome, Outcome::Pass);
    assert!(jit.summary.contains("812 (pod_egress)"));
}

fn status() -> Status {
    Status {
        node: "n0".into(),
        pin_dir: "/sys/fs/bpf/netpol".into(),
        source: "manifests:/m".into(),
        ready: true,
        generation: 3,
        policies: 1,
        endpoints: vec![
            EndpointStatus {
                pod: "x/a".into(),
                ifname: "veth1".into(),
                ifindex: 11,
                ips: vec!["10.42.0.10".into()],
                isolated_ingress: true,
                isolated_egress: false,
                attached: true,
                ..EndpointStatus::default()
            },
            EndpointStatus {
                pod: "x/c".into(),
                ifname: "veth2".into(),
                ifindex: 12,
                ips: vec!["10.42.0.12".into()],
                isolated_ingress: false,
                isolated_egress: false,
                attached: true,
                ..EndpointStatus::default()
            },
        ],
        ..Status::default()
    }
}

fn agent_ok() -> AgentEvidence {
    AgentEvidence {
        socket: "/run/netpol-agent/agent.sock".into(),
        status: Ok(status()),
        pid: Some(4242),
        held_programs: BTreeSet::from([100, 101]),
    }
}

const EGRESS_PROG: u32 = 100;
const INGRESS_PROG: u32 = 101;
const ENDPOINTS_MAP: u32 = 7;

fn prog(id: u32, name: &str) -> (u32, ProgEvidence) {
    (
        id,
        ProgEvidence {
            id,
            name: name.into(),
            map_ids: vec![ENDPOINTS_MAP, 8, 9],
        },
    )
}

fn hook(hook: Hook, ifindex: u32, prog_id: u32) -> HookEvidence {
    HookEvidence {
        hook,
        tcx: Ok(vec![prog_id]),
        link: Ok(LinkEvidence {
            path: format!("/sys/fs/bpf/netpol/links/{ifindex}-{}", hook.name()),
            link_id: 1000 + ifindex,
            prog_id,
            tcx: true,
        }),
    }
}

fn endpoint(pod: &str, ifname: &str, ifindex: u32) -> EndpointEvidence {
    EndpointEvidence {
        pod: pod.into(),
        ifname: ifname.into(),
        ifindex,
        agent_says_attached: Some(true),
        hooks: vec![
            hook(Hook::PodEgress, ifindex, EGRESS_PROG),
            hook(Hook::PodIngress, ifindex, INGRESS_PROG),
        ],
    }
}

fn datapath_ok() -> DatapathEvidence {
    DatapathEvidence {
        programs: BTreeMap::from([
            prog(EGRESS_PROG, "pod_egress"),
            prog(INGRESS_PROG, "pod_ingress"),
            prog(55, "pod_egress"),
        ]),
        pinned_maps: BTreeMap::from([(map_names::ENDPOINTS[0].to_owned(), Ok(ENDPOINTS_MAP))]),
        endpoints_from: "agent status",
        endpoints: vec![endpoint("x/a", "veth1", 11), endpoint("x/c", "veth2", 12)],
        other_veths: vec![VethEvidence {
            ifname: "eth0".into(),
            ifindex: 2,
            peer_addrs: vec!["192.0.2.11".parse().unwrap()],
            bridge: None,
            attached: vec![],
        }],
        endpoint_map: Ok(BTreeMap::from([
            (11, endpoint_flags::ISOLATED_INGRESS),
            (12, 0),
        ])),
        generation: Ok(3),
        discovery_error: None,
    }
}

fn local_pods() -> LocalPods {
    LocalPods::Listed {
        source: "manifests:/m".into(),
        pods: vec![
            ("x/a".into(), vec!["10.42.0.10".parse().unwrap()]),
            ("x/c".into(), vec!["10.42.0.12".parse().unwrap()]),
        ],
    }
}

#[test]
fn agent_verdicts() {
    let a = agent_ok();
    let c = agent(&a);
    assert_eq!(c.outcome, Outcome::Pass, "{c:?}");
    assert!(c.summary.contains("pid 4242") && c.summary.contains("generation 3"));

    let mut a = agent_ok();
    a.status = Err("connecting to the agent at /x: No such file".into());
    assert_eq!(agent(&a).outcome, Outcome::Fail);

    let mut a = agent_ok();
    if let Ok(s) = &mut a.status {
        s.ready = false;
    }
    assert_eq!(agent(&a).outcome, Outcome::Fail);

    let mut a = agent_ok();
    if let Ok(s) = &mut a.status {
        s.errors = vec!["bad cidr".into()];
    }
    let c = agent(&a);
    assert_eq!(c.outcome, Outcome::Warn);
    assert_eq!(c.details, vec!["bad cidr".to_owned()]);
}

#[test]
fn attachments_pass() {
    let c = attachments(&agent_ok(), &datapath_ok());
    assert_eq!(c.outcome, Outcome::Pass, "{c:#?}");
    assert!(c.summary.contains("pod_egress 100"), "{}", c.summary);
    assert!(c.summary.contains("held by the agent process"));
}

#[test]
fn attachments_missing_link_fails_and_names_the_veth() {
    let mut d = datapath_ok();
    d.endpoints[1].hooks[1].link = Err("no pinned link at /p/links/12-ingress".into());
    d.endpoints[1].hooks[1].tcx = Ok(vec![]);
    let c = attachments(&agent_ok(), &d);
    assert_eq!(c.outcome, Outcome::Fail);
    assert!(c.summary.contains("1 of 2"), "{}", c.summary);
    assert!(c.summary.contains("veth2 (x/c)"), "{}", c.summary);
    assert!(c.details.iter().any(|d| d.contains("pod_ingress")));
}

#[test]
fn attachments_link_without_attachment_fails() {
    let mut d = datapath_ok();
    d.endpoints[0].hooks[0].tcx = Ok(vec![]);
    let c = attachments(&agent_ok(), &d);
    assert_eq!(c.outcome, Outcome::Fail);
    assert!(
        c.details.iter().any(|d| d.contains("is not attached")),
        "{c:#?}"
    );
}

#[test]
fn attachments_stale_program_fails() {
    // veth1 still runs an old pod_egress (55), not the one the agent holds (100).
    let mut d = datapath_ok();
    d.endpoints[0].hooks[0] = hook(Hook::PodEgress, 11, 55);
    let c = attachments(&agent_ok(), &d);
    assert_eq!(c.outcome, Outcome::Fail);
    assert!(
        c.details
            .iter()
            .any(|d| d.contains("not the agent's current pod_egress 100")),
        "{c:#?}"
    );
}

#[test]
fn attachments_without_held_programs_use_the_majority() {
    let mut a = agent_ok();
    a.held_programs.clear();
    let mut d = datapath_ok();
    d.endpoints.push(endpoint("x/d", "veth3", 13));
    d.endpoints[0].hooks[0] = hook(Hook::PodEgress, 11, 55);
    let c = attachments(&a, &d);
    assert_eq!(c.outcome, Outcome::Fail);
    assert!(
        c.details
            .iter()
            .any(|d| d.contains("x/a") && d.contains("most pinned links")),
        "{c:#?}"
    );
}

#[test]
fn attachments_program_with_other_maps_fails() {
    let mut d = datapath_ok();
    d.pinned_maps
        .insert(map_names::ENDPOINTS[0].to_owned(), Ok(99));
    let c = attachments(&agent_ok(), &d);
    assert_eq!(c.outcome, Outcome::Fail);
    assert!(c.details.iter().any(|d| d.contains("stale program")));
}

#[test]
fn attachments_other_program_after_ours_warns() {
    let mut d = datapath_ok();
    d.endpoints[0].hooks[1].tcx = Ok(vec![INGRESS_PROG, 77]);
    let c = attachments(&agent_ok(), &d);
    assert_eq!(c.outcome, Outcome::Warn, "{c:#?}");
    assert!(c.details[0].contains("77"));
}

#[test]
fn attachments_program_before_ours_fails() {
    let mut d = datapath_ok();
    d.endpoints[0].hooks[1].tcx = Ok(vec![77, INGRESS_PROG]);
    let c = attachments(&agent_ok(), &d);
    assert_eq!(c.outcome, Outcome::Fail, "{c:#?}");
    assert!(
        c.details
            .iter()
            .any(|d| d.contains("run before the agent's") && d.contains("77")),
        "{c:#?}"
    );
}

#[test]
fn attachments_agent_reports_detached() {
    let mut d = datapath_ok();
    d.endpoints[0].agent_says_attached = Some(false);
    assert_eq!(attachments(&agent_ok(), &d).outcome, Outcome::Fail);
}

#[test]
fn attachments_nothing_without_agent_fails() {
    let mut a = agent_ok();
    a.status = Err("down".into());
    let mut d = datapath_ok();
    d.endpoints.clear();
    assert_eq!(attachments(&a, &d).outcome, Outcome::Fail);
    // With the agent up and no pods here, there is nothing to attach.
    assert_eq!(attachments(&agent_ok(), &d).outcome, Outcome::Pass);
}

#[test]
fn coverage_pass() {
    let s = status();
    let c = coverage(Some(&s), &local_pods(), &datapath_ok(), NOW);
    assert_eq!(c.outcome, Outcome::Pass, "{c:#?}");
    assert!(c.summary.contains("2 local pods"));
}

#[test]
fn coverage_local_pod_without_endpoint_fails() {
    let s = status();
    let LocalPods::Listed { source, mut pods } = local_pods() else {
        unreachable!()
    };
    pods.push(("y/b".into(), vec!["10.42.0.14".parse().unwrap()]));
    let c = coverage(
        Some(&s),
        &LocalPods::Listed { source, pods },
        &datapath_ok(),
        NOW,
    );
    assert_eq!(c.outcome, Outcome::Fail);
    assert!(c.details[0].starts_with("y/b (10.42.0.14)"), "{c:#?}");
}

#[test]
fn coverage_datapath_disagreements() {
    let s = status();
    let mut d = datapath_ok();
    d.endpoint_map = Ok(BTreeMap::from([(11, 0)]));
    let c = coverage(Some(&s), &local_pods(), &d, NOW);
    assert_eq!(c.outcome, Outcome::Fail);
    assert!(
        c.details
            .iter()
            .any(|l| l.contains("x/a") && l.contains("not isolated"))
    );
    assert!(
        c.details
            .iter()
            .any(|l| l.contains("x/c") && l.contains("unknown-endpoint"))
    );

    let mut d = datapath_ok();
    d.generation = Ok(4);
    assert_eq!(
        coverage(Some(&s), &local_pods(), &d, NOW).outcome,
        Outcome::Warn
    );
}

/// The clock of the coverage checks.
const NOW: u64 = 1_800_000_000;

#[test]
fn coverage_unattached_bridge_port_fails_other_veths_do_not() {
    let s = status();
    let mut d = datapath_ok();
    d.other_veths.push(VethEvidence {
        ifname: "vethdead".into(),
        ifindex: 30,
        peer_addrs: vec!["10.42.0.99".parse().unwrap()],
        bridge: Some("cni0".into()),
        attached: vec![],
    });
    let c = coverage(Some(&s), &local_pods(), &d, NOW);
    assert_eq!(c.outcome, Outcome::Fail);
    assert_eq!(c.details.len(), 1, "{c:#?}");
    assert!(c.details[0].contains("vethdead") && c.details[0].contains("10.42.0.99"));
    assert!(c.details[0].contains("not policed"), "{c:#?}");
}

#[test]
fn coverage_warns_of_veths_pending_longer_than_the_grace() {
    let mut s = status();
    let pending = |ifindex: u32, since: u64| EndpointStatus {
        ifname: format!("vethp{ifindex}"),
        ifindex,
        ips: vec!["10.42.0.77".into()],
        isolated_ingress: true,
        isolated_egress: true,
        attached: true,
        pending: Some("unknown-pod".into()),
        pending_since_unix: Some(since),
        ..EndpointStatus::default()
    };
    s.endpoints.push(pending(21, NOW - 1));
    let mut d = datapath_ok();
    if let Ok(map) = &mut d.endpoint_map {
        map.insert(
            21,
            endpoint_flags::ISOLATED_INGRESS
                | endpoint_flags::ISOLATED_EGRESS
                | endpoint_flags::PENDING,
        );
        map.insert(
            22,
            endpoint_flags::ISOLATED_INGRESS
                | endpoint_flags::ISOLATED_EGRESS
                | endpoint_flags::PENDING,
        );
    }
    assert_eq!(
        coverage(Some(&s), &local_pods(), &d, NOW).outcome,
        Outcome::Pass,
        "a new pod is pending briefly"
    );
    s.endpoints.push(pending(22, NOW - 60));
    let c = coverage(Some(&s), &local_pods(), &d, NOW);
    assert_eq!(c.outcome, Outcome::Warn, "{c:#?}");
    assert!(
        c.details
            .iter()
            .any(|l| l.contains("vethp22") && l.contains("pending (unknown-pod) for 60s")),
        "{c:#?}"
    );
    assert!(!c.details.iter().any(|l| l.contains("vethp21")), "{c:#?}");
}

#[test]
fn coverage_without_readable_source_uses_the_agent_list() {
    let s = status();
    let c = coverage(
        Some(&s),
        &LocalPods::Unavailable("source \"kubernetes\"".into()),
        &datapath_ok(),
        NOW,
    );
    assert_eq!(c.outcome, Outcome::Pass, "{c:#?}");
    assert!(c.summary.contains("agent's own list"));
    assert_eq!(
        coverage(None, &local_pods(), &datapath_ok(), NOW).outcome,
        Outcome::Warn
    );
}

fn dump(tool: &str, out: &str) -> RulesetDump {
    RulesetDump {
        tool: tool.into(),
        output: Ok(out.into()),
    }
}

#[test]
fn engines_none() {
    let c = other_engines(&[
        dump(
            "iptables-save",
            "*filter\n:INPUT ACCEPT [0:0]\n:KUBE-FORWARD - [0:0]\nCOMMIT\n",
        ),
        dump("nft list ruleset", ""),
        RulesetDump {
            tool: "ip6tables-save".into(),
            output: Err("not installed".into()),
        },
    ]);
    assert_eq!(c.outcome, Outcome::Pass, "{c:#?}");
    assert!(c.summary.contains("iptables-save, nft list ruleset"));
}

#[test]
fn engines_kube_router_fails_with_advice() {
    let ipt = "*filter\n:INPUT ACCEPT [0:0]\n:KUBE-ROUTER-INPUT - [0:0]\n-A INPUT -j KUBE-ROUTER-INPUT\nCOMMIT\n";
    let nft = "table ip filter {\n\tchain KUBE-ROUTER-INPUT {\n\t}\n}\n";
    let c = other_engines(&[dump("iptables-save", ipt), dump("nft list ruleset", nft)]);
    assert_eq!(c.outcome, Outcome::Fail);
    assert!(c.summary.contains("kube-router"), "{}", c.summary);
    assert!(c.summary.contains("(1 chains)"), "{}", c.summary);
    let all = c.details.join("\n");
    assert!(all.contains("intersection"));
    assert!(all.contains("--disable-network-policy"));
    assert!(all.contains("iptables-save | grep -v KUBE-ROUTER | iptables-restore"));
    assert!(
        all.contains("seen by iptables-save, nft list ruleset"),
        "{all}"
    );
}

#[test]
fn engines_calico_and_cilium() {
    let c = other_engines(&[dump(
        "iptables-save",
        "*filter\n:cali-FORWARD - [0:0]\n:CILIUM_FORWARD - [0:0]\nCOMMIT\n",
    )]);
    assert_eq!(c.outcome, Outcome::Fail);
    assert!(c.summary.contains("Calico") && c.summary.contains("Cilium"));
    assert_eq!(
        Engine::of_chain("KUBE-POD-FW-ABC"),
        Some(Engine::KubeRouter)
    );
    assert_eq!(
        Engine::of_chain("KUBE-NWPLCY-ABC"),
        Some(Engine::KubeRouter)
    );
    assert_eq!(Engine::of_chain("KUBE-SERVICES"), None);
}

#[test]
fn engines_uninspectable_warns() {
    let c = other_engines(&[RulesetDump {
        tool: "iptables-save".into(),
        output: Err("not installed".into()),
    }]);
    assert_eq!(c.outcome, Outcome::Warn);
}

fn probe(phase: &str, target: &str, expect_pass: bool, passed: bool) -> Probe {
    Probe {
        phase: phase.into(),
        target: target.into(),
        expect_pass,
        passed,
        detail: String::new(),
    }
}

fn self_test_ok() -> SelfTestEvidence {
    SelfTestEvidence {
        allowed_port: 7001,
        denied_port: 7002,
        probes: vec![
            probe("baseline", "tcp 192.0.2.2:7001", true, true),
            probe("baseline", "tcp 192.0.2.2:7002", true, true),
            probe("policy", "tcp 192.0.2.2:7001", true, true),
            probe("policy", "tcp 192.0.2.2:7002", false, false),
        ],
        dropped_delta: Some(2),
        ..Default::default()
    }
}

#[test]
fn self_test_verdicts() {
    let c = self_test(&self_test_ok());
    assert_eq!(c.outcome, Outcome::Pass, "{c:#?}");
    assert!(c.summary.contains("1 allowed connections passed, 1 denied"));
    assert!(c.data.is_some());

    let mut e = self_test_ok();
    e.probes[3].passed = true;
    assert_eq!(self_test(&e).outcome, Outcome::Fail);

    let mut e = self_test_ok();
    e.dropped_delta = Some(0);
    assert_eq!(self_test(&e).outcome, Outcome::Fail);

    let mut e = self_test_ok();
    e.cleanup_errors
        .push("scratch directory still exists".into());
    assert_eq!(self_test(&e).outcome, Outcome::Fail);

    let e = SelfTestEvidence {
        error: Some("unshare: Operation not permitted".into()),
        ..Default::default()
    };
    let c = self_test(&e);
    assert_eq!(c.outcome, Outcome::Fail);
    assert!(c.summary.contains("unshare"));
}
