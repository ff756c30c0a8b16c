//! `depot.cli.v1beta1.LoginService`: the device flow of `depot login` (`auth::login`).

use std::time::Duration;

use crate::api::connect::{Call, ConnectRouter, server_stream, unary};
use crate::auth::login::{self, Claim};
use crate::error::Result;
use crate::proto::depot::cli::v1beta1 as pb;

/// Both calls need no token; their messages are empty or one short id.
const MAX_LOGIN_BODY_BYTES: usize = 1024;

pub fn register(router: &mut ConnectRouter) {
    router
        .register(
            "depot.cli.v1beta1.LoginService",
            "StartLogin",
            unary(start_login),
        )
        .register(
            "depot.cli.v1beta1.LoginService",
            "FinishLogin",
            server_stream(finish_login),
        )
        .limit_body(
            "depot.cli.v1beta1.LoginService",
            "StartLogin",
            MAX_LOGIN_BODY_BYTES,
        )
        .limit_body(
            "depot.cli.v1beta1.LoginService",
            "FinishLogin",
            MAX_LOGIN_BODY_BYTES,
        );
}

/// `id` is the claim secret, known to this CLI only; the URL carries the user code.
async fn start_login(call: Call, _req: pb::StartLoginRequest) -> Result<pb::StartLoginResponse> {
    let config = &call.app.config.login;
    let started = login::start(
        &call.app.db,
        Duration::from_secs(config.request_ttl_seconds),
        config.max_open_requests,
    )
    .await?;
    let approve_url = call
        .app
        .config
        .public_link(&format!("/login/{}", started.user_code));
    Ok(pb::StartLoginResponse {
        id: started.claim_secret,
        approve_url,
    })
}

/// Holds the stream open until the request is decided (woken by NOTIFY, re-checked every
/// few seconds as a fallback), then sends the token once. Ends when the request expires.
async fn finish_login(
    call: Call,
    req: pb::FinishLoginRequest,
) -> Result<impl futures_util::Stream<Item = Result<pb::FinishLoginResponse>>> {
    let mut events = call.app.events.subscribe();
    let token = loop {
        let request_id = match login::claim(&call.app.db, &req.id).await? {
            Claim::Token(token) => break token,
            Claim::Pending { request_id } => request_id,
        };
        let wait = async {
            loop {
                match events.recv().await {
                    Ok(event)
                        if event.channel == login::LOGIN_CHANNEL && event.payload == request_id =>
                    {
                        return;
                    }
                    Ok(_) => continue,
                    // Missed some events: re-check now.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return,
                    // No more events (shutting down): rely on the periodic re-check.
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        std::future::pending::<()>().await
                    }
                }
            }
        };
        tokio::select! {
            _ = tokio::time::timeout(Duration::from_secs(3), wait) => {}
            _ = call.app.stopping.cancelled() => {
                return Err(crate::error::Error::Unavailable(
                    "this server is shutting down; run `depot login` again".into(),
                ));
            }
        }
    };
    Ok(futures_util::stream::once(async move {
        Ok(pb::FinishLoginResponse { token })
    }))
}
