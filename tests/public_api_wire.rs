//! Kiln's `.proto` files against the public API as the official SDK (@depot/sdk-node 1.4.0)
//! declares it (`tests/fixtures/public-api/sdk-node-1.4.0.txt`): every RPC, message, field
//! number, type and label, and enum value, so binary clients (the Go SDK, `buf curl`) and
//! JSON clients (the Node SDK) read the same thing. Kiln may add fields; it may not renumber.

use prost_reflect::{DescriptorPool, Kind};

/// The services Kiln serves of the public API.
const SERVED: &[&str] = &[
    "depot.core.v1.ProjectService",
    "depot.core.v1.OrganizationService",
    "depot.core.v1.BuildService",
    "depot.core.v1.UsageService",
    "depot.build.v1.BuildService",
    "depot.build.v1.RegistryService",
    "depot.buildkit.v1.BuildKitService",
];

fn pool() -> DescriptorPool {
    DescriptorPool::decode(kiln::proto::DESCRIPTORS).unwrap()
}

fn fixture() -> Vec<Vec<String>> {
    include_str!("fixtures/public-api/sdk-node-1.4.0.txt")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(' ').map(str::to_string).collect())
        .collect()
}

/// The messages the served services use, by the fixture: their RPCs' inputs and outputs
/// and, transitively, the message types of those messages' fields.
fn used_messages(fixture: &[Vec<String>]) -> std::collections::BTreeSet<String> {
    let mut used: std::collections::BTreeSet<String> = fixture
        .iter()
        .filter(|l| l[0] == "rpc" && SERVED.contains(&l[1].as_str()))
        .flat_map(|l| {
            let package = l[1].rsplit_once('.').unwrap().0;
            [format!("{package}.{}", l[3]), format!("{package}.{}", l[4])]
        })
        .collect();
    loop {
        let more: Vec<String> = fixture
            .iter()
            .filter(|l| l[0] == "field" && used.contains(&l[1]) && l[4].starts_with("depot."))
            .map(|l| l[4].clone())
            .filter(|t| fixture.iter().any(|m| m[0] == "message" && m[1] == *t))
            .filter(|t| !used.contains(t))
            .collect();
        if more.is_empty() {
            return used;
        }
        used.extend(more);
    }
}

#[test]
fn served_services_have_every_rpc_with_the_official_types_and_kind() {
    let pool = pool();
    let mut checked = 0;
    for line in fixture().iter().filter(|l| l[0] == "rpc") {
        let (service, method, input, output, kind) =
            (&line[1], &line[2], &line[3], &line[4], &line[5]);
        if !SERVED.contains(&service.as_str()) {
            continue;
        }
        let svc = pool
            .get_service_by_name(service)
            .unwrap_or_else(|| panic!("{service} is missing"));
        let m = svc
            .methods()
            .find(|m| m.name() == method)
            .unwrap_or_else(|| panic!("{service}/{method} is missing"));
        assert_eq!(m.input().name(), input, "{service}/{method} input");
        assert_eq!(m.output().name(), output, "{service}/{method} output");
        let actual = match (m.is_client_streaming(), m.is_server_streaming()) {
            (false, false) => "Unary",
            (false, true) => "ServerStreaming",
            (true, false) => "ClientStreaming",
            (true, true) => "BiDiStreaming",
        };
        assert_eq!(actual, kind, "{service}/{method}");
        checked += 1;
    }
    assert!(checked >= 14, "only {checked} RPCs checked");
}

#[test]
fn messages_and_fields_have_the_official_numbers_types_and_labels() {
    let pool = pool();
    let fixture = fixture();
    let used = used_messages(&fixture);
    for message in &used {
        assert!(
            pool.get_message_by_name(message).is_some(),
            "message {message} is missing"
        );
    }
    let mut checked = 0;
    for line in fixture
        .iter()
        .filter(|l| l[0] == "field" && used.contains(&l[1]))
    {
        let (message, field, number, ty, label) =
            (&line[1], &line[2], &line[3], &line[4], &line[5]);
        let desc = pool.get_message_by_name(message).unwrap();
        let f = desc
            .get_field_by_name(field)
            .unwrap_or_else(|| panic!("{message}.{field} is missing"));
        assert_eq!(f.number().to_string(), *number, "{message}.{field} number");
        let actual_type = match f.kind() {
            Kind::Message(m) => m.full_name().to_string(),
            Kind::Enum(e) => e.full_name().to_string(),
            other => format!("{other:?}").to_lowercase(),
        };
        assert_eq!(actual_type, *ty, "{message}.{field} type");
        let proto3_optional = f.field_descriptor_proto().proto3_optional();
        match label.as_str() {
            "repeated" => assert!(f.is_list(), "{message}.{field} is repeated"),
            "optional" => assert!(proto3_optional, "{message}.{field} is optional"),
            "oneof" => assert!(
                f.containing_oneof().is_some() && !proto3_optional,
                "{message}.{field} is in a oneof"
            ),
            _ => assert!(
                !f.is_list() && !proto3_optional && f.containing_oneof().is_none(),
                "{message}.{field} is a plain field"
            ),
        }
        checked += 1;
    }
    assert!(checked >= 40, "only {checked} fields checked");
}

#[test]
fn enums_have_the_official_values() {
    let pool = pool();
    let mut checked = 0;
    for line in fixture().iter().filter(|l| l[0] == "enum") {
        let (name, value, number) = (&line[1], &line[2], &line[3]);
        let Some(e) = pool.get_enum_by_name(name) else {
            continue;
        };
        let v = e
            .get_value_by_name(value)
            .unwrap_or_else(|| panic!("{name}.{value} is missing"));
        assert_eq!(v.number().to_string(), *number, "{name}.{value}");
        checked += 1;
    }
    assert!(checked >= 9, "Hardware's 9 values at least");
}
