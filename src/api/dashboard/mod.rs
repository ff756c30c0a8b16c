//! Server-rendered pages: the dashboard (`/dashboard`, signed in with a session cookie;
//! `pages.rs`, `web.rs`), the approval page of `depot login` (`/login/<user code>`) and
//! shared builds (`/shared/builds/<build>/<token>`).

pub mod live;
mod models;
mod operations;
mod pages;
mod shared;
pub mod web;

use axum::Form;
use axum::Router;
use axum::extract::rejection::FormRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;

use crate::api::ratelimit::ClientAddr;
use crate::app::AppState;
use crate::auth::login;
use crate::error::Error;

/// The sign-in forms (dashboard and `depot login` approval) hold an email, a password and
/// a few words; anything larger is refused before it is read whole.
pub const MAX_SIGN_IN_FORM_BYTES: usize = 16 * 1024;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/login/{code}",
            get(login_page)
                .post(login_decide)
                .layer(DefaultBodyLimit::max(MAX_SIGN_IN_FORM_BYTES))
                // The dashboard's security headers (CSP, no framing, no-store) here too.
                .layer(axum::middleware::map_response(
                    |response: Response| async move { web::secure(response) },
                )),
        )
        .route(
            "/shared/builds/{build}/{token}",
            get(shared::shared_build).layer(axum::middleware::map_response(
                |response: Response| async move { web::secure(response) },
            )),
        )
        .route("/", get(web::root))
        .route("/dashboard", get(pages::index))
        .route(
            "/dashboard/sign-in",
            get(pages::sign_in_page)
                .post(pages::sign_in)
                .layer(DefaultBodyLimit::max(MAX_SIGN_IN_FORM_BYTES)),
        )
        .route("/dashboard/sign-out", post(pages::sign_out))
        .route("/dashboard/assets/{name}", get(web::asset))
        .route("/dashboard/projects", post(pages::create_project))
        .route("/dashboard/projects/{id}", get(pages::project))
        .route(
            "/dashboard/projects/{id}/settings",
            post(pages::save_settings),
        )
        .route("/dashboard/projects/{id}/reset", post(pages::reset_cache))
        .route("/dashboard/projects/{id}/tokens", post(pages::create_token))
        .route(
            "/dashboard/projects/{id}/tokens/{token}/revoke",
            post(pages::revoke_token),
        )
        .route("/dashboard/projects/{id}/builds", get(pages::builds))
        .route(
            "/dashboard/projects/{id}/builds/events",
            get(pages::build_events),
        )
        .route("/dashboard/projects/{id}/usage", get(pages::usage))
        .route(
            "/dashboard/projects/{id}/trust-policies",
            post(pages::add_trust_policy),
        )
        .route(
            "/dashboard/projects/{id}/trust-policies/{policy}/remove",
            post(pages::remove_trust_policy),
        )
        .route(
            "/dashboard/projects/{project}/builds/{build}",
            get(pages::build),
        )
        .route("/dashboard/models", get(models::models))
        .route("/dashboard/models/{*name}", get(models::model))
        .route("/dashboard/operations", get(operations::installation))
        .route(
            "/dashboard/operations/machines/{machine}/drain",
            post(operations::drain_any),
        )
        .route(
            "/dashboard/organizations/{id}/operations",
            get(operations::operations),
        )
        .route(
            "/dashboard/organizations/{id}/machines/{machine}/drain",
            post(operations::drain),
        )
        .route(
            "/dashboard/projects/{project}/builds/{build}/logs/{digest}",
            get(pages::step_log),
        )
        .route(
            "/dashboard/projects/{project}/builds/{build}/share",
            post(pages::share_build),
        )
        // Pages are text that compresses well; the event stream is left alone.
        .layer(tower_http::compression::CompressionLayer::new().gzip(true))
}

/// Escapes text for HTML element and attribute content.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The frame of the login approval pages: the dashboard's stylesheet and look.
fn page(title: &str, body: &str) -> String {
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · Kiln</title>
<link rel="stylesheet" href="{css}">
</head><body><header class="top"><a class="brand" href="/dashboard">Kiln</a></header>
<main class="narrow"><section class="card">{body}</section></main></body></html>"#,
        title = escape(title),
        css = web::CSS_PATH.as_str(),
    )
}

/// A page with a heading and one paragraph.
pub fn message_page(title: &str, text: &str) -> String {
    page(
        title,
        &format!("<h1>{}</h1><p>{}</p>", escape(title), escape(text)),
    )
}

fn message(status: StatusCode, title: &str, text: &str) -> Response {
    (status, Html(message_page(title, text))).into_response()
}

/// The sign-in form for one login request. The user code is shown so the user can check
/// it against the link their terminal printed.
fn form(user_code: &str, error: Option<&str>) -> String {
    let code = escape(user_code);
    let error = error
        .map(|e| format!(r#"<p class="error" role="alert">{}</p>"#, escape(e)))
        .unwrap_or_default();
    page(
        "Approve depot login",
        &format!(
            r#"<h1>Approve <code>depot login</code></h1>
<p>A depot CLI asked to sign in with the code</p>
<p class="usercode" data-testid="user-code">{code}</p>
<p class="muted">Check that your terminal shows the same code at the end of the link it printed. Approve only if you started it.</p>
{error}
<form method="post">
<label for="email">Email</label><input id="email" name="email" type="email" autocomplete="username" required>
<label for="password">Password</label><input id="password" name="password" type="password" autocomplete="current-password" required>
<div class="buttons"><button class="approve" name="decision" value="approve" type="submit">Sign in and approve</button>
<button class="deny" name="decision" value="deny" type="submit">Deny</button></div>
</form>"#
        ),
    )
}

/// What a throttled sign-in is told.
pub fn throttled_message(throttled: crate::auth::throttle::Throttled) -> String {
    format!(
        "Too many failed sign-ins for this email from your address; try again in {} minutes.",
        throttled.wait.as_secs().div_ceil(60).max(1)
    )
}

fn closed() -> Response {
    message(
        StatusCode::GONE,
        "Login request closed",
        "This request was already decided or has expired. Run `depot login` again.",
    )
}

fn unknown() -> Response {
    message(
        StatusCode::NOT_FOUND,
        "Unknown login request",
        "Run `depot login` again and open the link it prints.",
    )
}

/// The open request a user code names, or the page to answer with instead. Cheap: no
/// password work happens before this.
async fn open_request(app: &AppState, code: &str) -> Result<login::LoginRequest, Response> {
    match login::by_user_code(&app.db, code).await {
        Ok(Some(req)) if req.is_open() => Ok(req),
        Ok(Some(_)) => Err(closed()),
        Ok(None) => Err(unknown()),
        Err(err) => Err(err.into_response()),
    }
}

async fn login_page(State(app): State<AppState>, Path(code): Path<String>) -> Response {
    match open_request(&app, &code).await {
        Ok(req) => Html(form(&req.user_code, None)).into_response(),
        Err(page) => page,
    }
}

#[derive(Deserialize)]
struct Decision {
    email: String,
    password: String,
    decision: String,
}

/// A sign-in form that could not be read: too large, or not a form.
pub fn unreadable_form(rejection: &FormRejection) -> (StatusCode, &'static str) {
    match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => (
            StatusCode::PAYLOAD_TOO_LARGE,
            "The form is too large: an email is at most 320 characters and a password at most 1024 bytes.",
        ),
        status => (
            status,
            "The form could not be read; reload the page and try again.",
        ),
    }
}

/// Order matters: the per-client rate limit (middleware), then the request must be open,
/// then the email must be one, then an attempt is reserved for the email and the
/// client's address (atomically, so concurrent guesses cannot pass the limit together),
/// and only then is the password checked.
async fn login_decide(
    State(app): State<AppState>,
    Path(code): Path<String>,
    ClientAddr(address): ClientAddr,
    form_data: Result<Form<Decision>, FormRejection>,
) -> Response {
    let request = match open_request(&app, &code).await {
        Ok(req) => req,
        Err(page) => return page,
    };
    let form_data = match form_data {
        Ok(Form(form_data)) => form_data,
        Err(rejection) => {
            let (status, msg) = unreadable_form(&rejection);
            return (status, Html(form(&request.user_code, Some(msg)))).into_response();
        }
    };
    let Ok(email) = login::validate_email(&form_data.email) else {
        return (
            StatusCode::BAD_REQUEST,
            Html(form(
                &request.user_code,
                Some("Enter the email of your Kiln account, like name@example.com."),
            )),
        )
            .into_response();
    };
    let approve = match form_data.decision.as_str() {
        "approve" => true,
        "deny" => false,
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                Html(form(&request.user_code, Some("Choose approve or deny."))),
            )
                .into_response();
        }
    };
    let attempt = match app.sign_ins.begin(&email, address) {
        Ok(attempt) => attempt,
        Err(throttled) => {
            metrics::counter!("kiln_sign_ins_total", "outcome" => "throttled").increment(1);
            let msg = throttled_message(throttled);
            return (
                StatusCode::TOO_MANY_REQUESTS,
                Html(form(&request.user_code, Some(&msg))),
            )
                .into_response();
        }
    };
    let user = match login::sign_in(&app.db, &email, &form_data.password).await {
        Ok(user) => {
            attempt.succeeded();
            metrics::counter!("kiln_sign_ins_total", "outcome" => "ok").increment(1);
            user
        }
        Err(Error::Unauthenticated(msg)) => {
            attempt.failed();
            metrics::counter!("kiln_sign_ins_total", "outcome" => "failed").increment(1);
            return (
                StatusCode::UNAUTHORIZED,
                Html(form(&request.user_code, Some(&msg))),
            )
                .into_response();
        }
        Err(err) => return err.into_response(),
    };
    match login::decide(&app.db, &request.id, &user, approve).await {
        Ok(()) if approve => message(
            StatusCode::OK,
            "Login approved",
            "You can close this page; the depot CLI is now signed in.",
        ),
        Ok(()) => message(
            StatusCode::OK,
            "Login denied",
            "The depot CLI was not signed in.",
        ),
        Err(Error::FailedPrecondition(msg)) => {
            message(StatusCode::GONE, "Login request closed", &msg)
        }
        Err(err) => err.into_response(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_markup() {
        assert_eq!(
            super::escape(r#"<a href="x">&'"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
