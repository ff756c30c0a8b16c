//! `depot.cli.v1beta1.LoginService`: the device flow of `depot login`.

use std::time::Duration;

use crate::api::connect::{Call, ConnectRouter, server_stream, unary};
use crate::auth::login::{self, Claim};
use crate::error::Result;
use crate::proto::depot::cli::v1beta1 as pb;

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
        );
}

async fn start_login(call: Call, _req: pb::StartLoginRequest) -> Result<pb::StartLoginResponse> {
    let ttl = Duration::from_secs(call.app.config.login.request_ttl_seconds);
    let request = login::start(&call.app.db, ttl).await?;
    let approve_url = call
        .app
        .config
        .public_link(&format!("/login/{}", request.id));
    Ok(pb::StartLoginResponse {
        id: request.id,
        approve_url,
    })
}

/// Holds the stream open until the request is approved (woken by NOTIFY, re-checked every
/// few seconds as a fallback), then sends the token once.
async fn finish_login(
    call: Call,
    req: pb::FinishLoginRequest,
) -> Result<impl futures_util::Stream<Item = Result<pb::FinishLoginResponse>>> {
    let mut events = call.app.events.subscribe();
    let token = loop {
        match login::claim(&call.app.db, &req.id).await? {
            Claim::Token(token) => break token,
            Claim::Pending => {}
        }
        let wait = async {
            loop {
                match events.recv().await {
                    Ok(event)
                        if event.channel == login::LOGIN_CHANNEL && event.payload == req.id =>
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
        let _ = tokio::time::timeout(Duration::from_secs(3), wait).await;
    };
    Ok(futures_util::stream::once(async move {
        Ok(pb::FinishLoginResponse { token })
    }))
}
