//! Every RPC of the public API in the binary protobuf encoding (Connect, application/proto
//! and application/connect+proto for streams), against a real `kiln serve`: the same
//! field numbers the Node SDK's JSON is held to in tests/public_api_sdk.rs.
mod common;

use bytes::{Buf, Bytes};
use common::{Server, TestDb, tenant};
use kiln::proto::depot::build::v1 as build;
use kiln::proto::depot::buildkit::v1 as buildkit;
use kiln::proto::depot::core::v1 as core;
use prost::Message;

struct Client {
    http: reqwest::Client,
    url: String,
    token: String,
}

impl Client {
    async fn call<Req: Message, Resp: Message + Default>(
        &self,
        method: &str,
        request: Req,
    ) -> Result<Resp, (u16, String)> {
        common::connect_call(&self.http, &self.url, method, &self.token, &request).await
    }

    async fn ok<Req: Message, Resp: Message + Default>(&self, method: &str, request: Req) -> Resp {
        self.call(method, request)
            .await
            .unwrap_or_else(|e| panic!("{method}: {e:?}"))
    }

    /// A streaming call: the request messages as envelopes, the answer's messages and
    /// its end-of-stream error code, if any.
    async fn stream<Req: Message, Resp: Message + Default>(
        &self,
        method: &str,
        requests: &[Req],
    ) -> (Vec<Resp>, Option<String>) {
        let mut body = Vec::new();
        for r in requests {
            body.extend_from_slice(&kiln::api::connect::codec::encode_envelope(
                0,
                &r.encode_to_vec(),
            ));
        }
        let response = self
            .http
            .post(format!("{}/{method}", self.url))
            .header("content-type", "application/connect+proto")
            .header("authorization", format!("Bearer {}", self.token))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{method}");
        let mut bytes: Bytes = response.bytes().await.unwrap();
        let (mut messages, mut error) = (Vec::new(), None);
        while bytes.remaining() >= 5 {
            let flags = bytes.get_u8();
            let len = bytes.get_u32() as usize;
            let data = bytes.split_to(len);
            if flags & 2 == 0 {
                messages.push(Resp::decode(data).unwrap());
            } else {
                let end: serde_json::Value = serde_json::from_slice(&data).unwrap();
                error = end["error"]["code"].as_str().map(str::to_string);
            }
        }
        (messages, error)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_public_rpc_in_the_binary_encoding() {
    let db = TestDb::new().await;
    let command = common::standin_command();
    let server = Server::start(
        &db,
        &[
            ("KILN_BUILDERS__LOCAL__COMMAND", &command),
            (
                "KILN_BUILDERS__LOCAL__KILN_BINARY",
                env!("CARGO_BIN_EXE_kiln"),
            ),
        ],
    )
    .await;
    let t = tenant(&db.pool, "bin").await;
    let c = Client {
        http: reqwest::Client::new(),
        url: server.url.clone(),
        token: t.user_token.clone(),
    };
    const PS: &str = "depot.core.v1.ProjectService";

    // depot.core.v1.OrganizationService and ProjectService.
    let orgs: core::ListOrganizationsResponse = c
        .ok(
            "depot.core.v1.OrganizationService/ListOrganizations",
            core::ListOrganizationsRequest {},
        )
        .await;
    assert_eq!(orgs.organizations[0].org_id, t.org_id);
    let created: core::CreateProjectResponse = c
        .ok(
            &format!("{PS}/CreateProject"),
            core::CreateProjectRequest {
                name: "bin".into(),
                organization_id: Some(t.org_id.clone()),
                cache_policy: Some(core::CachePolicy {
                    keep_gb: 70,
                    keep_days: 5,
                    ..Default::default()
                }),
                hardware: Some(core::Hardware::Hardware64x128 as i32),
                region_id: "us-east-1".into(),
            },
        )
        .await;
    let project = created.project.unwrap();
    assert_eq!(project.hardware, core::Hardware::Hardware64x128 as i32);
    assert_eq!(project.cache_policy.unwrap().keep_gb, 70);
    let id = project.project_id.clone();
    let listed: core::ListProjectsResponse = c
        .ok(&format!("{PS}/ListProjects"), core::ListProjectsRequest {})
        .await;
    assert_eq!(listed.projects.len(), 2);
    let got: core::GetProjectResponse = c
        .ok(
            &format!("{PS}/GetProject"),
            core::GetProjectRequest {
                project_id: id.clone(),
            },
        )
        .await;
    assert_eq!(got.project.unwrap().name, "bin");
    let updated: core::UpdateProjectResponse = c
        .ok(
            &format!("{PS}/UpdateProject"),
            core::UpdateProjectRequest {
                project_id: id.clone(),
                name: Some("bin2".into()),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(updated.project.unwrap().name, "bin2");
    let _: core::ResetProjectResponse = c
        .ok(
            &format!("{PS}/ResetProject"),
            core::ResetProjectRequest {
                project_id: id.clone(),
            },
        )
        .await;
    use core::add_trust_policy_request::Provider;
    let added: core::AddTrustPolicyResponse = c
        .ok(
            &format!("{PS}/AddTrustPolicy"),
            core::AddTrustPolicyRequest {
                project_id: id.clone(),
                provider: Some(Provider::Gitlab(core::trust_policy::GitLab {
                    project_path: "acme/api".into(),
                    r#ref: String::new(),
                    ..Default::default()
                })),
            },
        )
        .await;
    let policy = added.trust_policy.unwrap();
    assert!(matches!(
        policy.provider,
        Some(core::trust_policy::Provider::Gitlab(_))
    ));
    let policies: core::ListTrustPoliciesResponse = c
        .ok(
            &format!("{PS}/ListTrustPolicies"),
            core::ListTrustPoliciesRequest {
                project_id: id.clone(),
            },
        )
        .await;
    assert_eq!(policies.trust_policies.len(), 1);
    let _: core::RemoveTrustPolicyResponse = c
        .ok(
            &format!("{PS}/RemoveTrustPolicy"),
            core::RemoveTrustPolicyRequest {
                project_id: id.clone(),
                trust_policy_id: policy.trust_policy_id,
            },
        )
        .await;
    let token: core::CreateTokenResponse = c
        .ok(
            &format!("{PS}/CreateToken"),
            core::CreateTokenRequest {
                project_id: id.clone(),
                description: "ci".into(),
            },
        )
        .await;
    let _: core::UpdateTokenResponse = c
        .ok(
            &format!("{PS}/UpdateToken"),
            core::UpdateTokenRequest {
                token_id: token.token_id.clone(),
                description: "deploys".into(),
            },
        )
        .await;
    let tokens: core::ListTokensResponse = c
        .ok(
            &format!("{PS}/ListTokens"),
            core::ListTokensRequest {
                project_id: id.clone(),
            },
        )
        .await;
    assert_eq!(tokens.tokens[0].description, "deploys");
    let _: core::DeleteTokenResponse = c
        .ok(
            &format!("{PS}/DeleteToken"),
            core::DeleteTokenRequest {
                token_id: token.token_id,
            },
        )
        .await;

    // depot.build.v1.BuildService and depot.buildkit.v1.BuildKitService.
    let new: build::CreateBuildResponse = c
        .ok(
            "depot.build.v1.BuildService/CreateBuild",
            build::CreateBuildRequest {
                project_id: id.clone(),
            },
        )
        .await;
    let as_build = Client {
        http: c.http.clone(),
        url: c.url.clone(),
        token: new.build_token.clone(),
    };
    let (endpoints, error) = as_build
        .stream::<_, buildkit::GetEndpointResponse>(
            "depot.buildkit.v1.BuildKitService/GetEndpoint",
            &[buildkit::GetEndpointRequest {
                build_id: new.build_id.clone(),
                platform: buildkit::Platform::Amd64 as i32,
            }],
        )
        .await;
    assert_eq!(error, None);
    use buildkit::get_endpoint_response::Connection;
    assert!(matches!(
        endpoints[0].connection,
        Some(Connection::Pending(_))
    ));
    let Some(Connection::Active(active)) = &endpoints.last().unwrap().connection else {
        panic!("no active endpoint: {endpoints:?}");
    };
    assert!(active.endpoint.starts_with("tcp://"));
    assert!(
        active
            .ca_cert
            .as_ref()
            .unwrap()
            .cert
            .contains("CERTIFICATE")
    );
    let (_, error) = as_build
        .stream::<_, buildkit::ReportHealthResponse>(
            "depot.buildkit.v1.BuildKitService/ReportHealth",
            &[buildkit::ReportHealthRequest {
                build_id: new.build_id.clone(),
                platform: buildkit::Platform::Amd64 as i32,
            }],
        )
        .await;
    assert_eq!(error, None);
    let _: buildkit::ReleaseEndpointResponse = as_build
        .ok(
            "depot.buildkit.v1.BuildKitService/ReleaseEndpoint",
            buildkit::ReleaseEndpointRequest {
                build_id: new.build_id.clone(),
                platform: buildkit::Platform::Amd64 as i32,
            },
        )
        .await;
    let platforms = kiln::db::builds::platforms(&db.pool, &new.build_id)
        .await
        .unwrap();
    assert_eq!(platforms[0].state, "released");
    let _: build::FinishBuildResponse = as_build
        .ok(
            "depot.build.v1.BuildService/FinishBuild",
            build::FinishBuildRequest {
                build_id: new.build_id.clone(),
                result: Some(build::finish_build_request::Result::Success(
                    build::finish_build_request::BuildSuccess {},
                )),
            },
        )
        .await;
    let steps: build::GetBuildStepsResponse = c
        .ok(
            "depot.build.v1.BuildService/GetBuildSteps",
            build::GetBuildStepsRequest {
                project_id: id.clone(),
                build_id: new.build_id.clone(),
                page_size: Some(10),
                page_token: None,
            },
        )
        .await;
    assert!(steps.build_steps.is_empty() && steps.next_page_token.is_none());
    let logs: build::GetBuildStepLogsResponse = c
        .ok(
            "depot.build.v1.BuildService/GetBuildStepLogs",
            build::GetBuildStepLogsRequest {
                project_id: id.clone(),
                build_id: new.build_id.clone(),
                build_step_digest: "sha256:none".into(),
                ..Default::default()
            },
        )
        .await;
    assert!(logs.logs.is_empty());
    for method in ["ListImages", "DeleteImage"] {
        let err = c
            .call::<_, build::ListImagesResponse>(
                &format!("depot.build.v1.RegistryService/{method}"),
                build::ListImagesRequest {
                    project_id: id.clone(),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert_eq!(err, (501, "unimplemented".to_string()));
    }

    // depot.core.v1.BuildService.
    let got: core::GetBuildResponse = c
        .ok(
            "depot.core.v1.BuildService/GetBuild",
            core::GetBuildRequest {
                build_id: new.build_id.clone(),
            },
        )
        .await;
    let b = got.build.unwrap();
    assert_eq!(b.status, core::build::Status::Success as i32);
    assert_eq!((b.total_steps, b.cached_steps), (Some(0), Some(0)));
    let listed: core::ListBuildsResponse = c
        .ok(
            "depot.core.v1.BuildService/ListBuilds",
            core::ListBuildsRequest {
                project_id: id.clone(),
                page_size: Some(10),
                page_token: None,
            },
        )
        .await;
    assert_eq!(listed.builds[0].build_id, new.build_id);
    let shared: core::ShareBuildResponse = c
        .ok(
            "depot.core.v1.BuildService/ShareBuild",
            core::ShareBuildRequest {
                build_id: new.build_id.clone(),
            },
        )
        .await;
    assert_eq!(reqwest::get(&shared.share_url).await.unwrap().status(), 200);
    let _: core::StopSharingBuildResponse = c
        .ok(
            "depot.core.v1.BuildService/StopSharingBuild",
            core::StopSharingBuildRequest {
                build_id: new.build_id.clone(),
            },
        )
        .await;
    assert_eq!(reqwest::get(&shared.share_url).await.unwrap().status(), 404);

    // depot.core.v1.UsageService.
    let now = chrono::Utc::now().timestamp();
    let ts = |s: i64| {
        Some(prost_types::Timestamp {
            seconds: s,
            nanos: 0,
        })
    };
    let usage: core::GetUsageResponse = c
        .ok(
            "depot.core.v1.UsageService/GetUsage",
            core::GetUsageRequest {
                start_at: ts(now - 3600),
                end_at: ts(now + 3600),
            },
        )
        .await;
    assert_eq!(usage.container_build.len(), 1);
    assert_eq!(usage.container_build[0].build_count, 1);
    assert_eq!(usage.period_start, ts(now - 3600));
    let project_usage: core::GetProjectUsageResponse = c
        .ok(
            "depot.core.v1.UsageService/GetProjectUsage",
            core::GetProjectUsageRequest {
                project_id: id.clone(),
                start_at: ts(now - 3600),
                end_at: ts(now + 3600),
            },
        )
        .await;
    assert_eq!(project_usage.usage.unwrap().build_count, 1);
    let page: core::ListProjectUsageResponse = c
        .ok(
            "depot.core.v1.UsageService/ListProjectUsage",
            core::ListProjectUsageRequest {
                start_at: ts(now - 3600),
                end_at: ts(now + 3600),
                page_size: Some(1),
                page_token: None,
            },
        )
        .await;
    assert_eq!(page.usage.len(), 1);
    let rest: core::ListProjectUsageResponse = c
        .ok(
            "depot.core.v1.UsageService/ListProjectUsage",
            core::ListProjectUsageRequest {
                start_at: ts(now - 3600),
                end_at: ts(now + 3600),
                page_size: Some(1),
                page_token: Some(page.next_page_token.clone()),
            },
        )
        .await;
    assert_eq!(rest.usage.len(), 1);
    assert_ne!(rest.usage[0].project_id, page.usage[0].project_id);
    assert!(rest.next_page_token.is_empty());
    let out_of_range = c
        .call::<_, core::GetUsageResponse>(
            "depot.core.v1.UsageService/GetUsage",
            core::GetUsageRequest {
                start_at: ts(i64::MAX / 2),
                end_at: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(out_of_range, (400, "invalid_argument".to_string()));

    let _: core::DeleteProjectResponse = c
        .ok(
            &format!("{PS}/DeleteProject"),
            core::DeleteProjectRequest { project_id: id },
        )
        .await;
    server.stop().await;
}
