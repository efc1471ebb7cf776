//! Each POLICY entry names the rule it comes from (policy id and `ingress[i]`/`egress[i]`), which
//! keys that rule's hit counters.

use netpol_common::{PolicyValue, rule_code};

use super::*;

#[test]
fn entries_name_the_rule_they_come_from() {
    let (mut c, web) = web_and_client();
    c.policy(
        "default",
        "p",
        "podSelector: {}\npolicyTypes: [Ingress, Egress]\ningress:\n- ports: [{port: 80}]\n- ports: [{port: 443}]\negress:\n- ports: [{port: 53, protocol: UDP}]",
    );
    let out = c.compile();
    let id = policy_id(&PodKey::new("default", "p"));
    let rule_at = |dir: Direction, protocol: u8, port: u16| {
        out.policy
            .iter()
            .find(|((k, _), _)| {
                k.endpoint == web
                    && k.direction == dir as u8
                    && k.protocol == protocol
                    && k.port_be == port.to_be_bytes()
            })
            .map(|(_, v)| *v)
    };
    let value = |dir, index| PolicyValue {
        policy: id,
        rule: rule_code::of(dir, index),
    };
    assert_eq!(rule_at(Ingress, TCP, 80), Some(value(Ingress, 0)));
    assert_eq!(rule_at(Ingress, TCP, 443), Some(value(Ingress, 1)));
    assert_eq!(rule_at(Egress, UDP, 53), Some(value(Egress, 0)));
}
