//! Server-rendered pages. Today: the approval page of `depot login`.

use axum::Form;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use chrono::Utc;
use serde::Deserialize;

use crate::app::AppState;
use crate::auth::login;
use crate::error::Error;

pub fn routes() -> Router<AppState> {
    Router::new().route("/login/{id}", get(login_page).post(login_decide))
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

fn page(title: &str, body: &str) -> String {
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · Kiln</title>
<style>
body{{font-family:system-ui,sans-serif;background:#f6f5f3;color:#1d1b19;display:flex;justify-content:center;padding:4rem 1rem}}
main{{background:#fff;border:1px solid #e2ded8;border-radius:10px;padding:2rem;max-width:26rem;width:100%}}
h1{{font-size:1.3rem;margin-top:0}} label{{display:block;margin:.8rem 0 .3rem;font-size:.9rem}}
input{{width:100%;box-sizing:border-box;padding:.55rem;border:1px solid #c9c3bb;border-radius:6px;font-size:1rem}}
.buttons{{display:flex;gap:.6rem;margin-top:1.2rem}} button{{padding:.6rem 1rem;border-radius:6px;border:1px solid #b5412a;font-size:1rem;cursor:pointer}}
button.approve{{background:#b5412a;color:#fff}} button.deny{{background:#fff;color:#b5412a}}
.code{{font-family:ui-monospace,monospace;background:#f0ede9;padding:.1rem .35rem;border-radius:4px}}
.error{{color:#a0251b}} .muted{{color:#6d665e;font-size:.9rem}}
</style></head><body><main>{body}</main></body></html>"#,
        title = escape(title),
    )
}

fn message(status: StatusCode, title: &str, text: &str) -> Response {
    (
        status,
        Html(page(
            title,
            &format!("<h1>{}</h1><p>{}</p>", escape(title), escape(text)),
        )),
    )
        .into_response()
}

fn form(id: &str, error: Option<&str>) -> String {
    let short = escape(&id.chars().take(8).collect::<String>());
    let error = error
        .map(|e| format!(r#"<p class="error" role="alert">{}</p>"#, escape(e)))
        .unwrap_or_default();
    page(
        "Approve depot login",
        &format!(
            r#"<h1>Approve <code>depot login</code></h1>
<p class="muted">A depot CLI asked to sign in (request <span class="code">{short}…</span>). Approve only if you started it.</p>
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

async fn login_page(State(app): State<AppState>, Path(id): Path<String>) -> Response {
    match login::get(&app.db, &id).await {
        Ok(Some(req))
            if req.approved_by.is_none()
                && req.denied_at.is_none()
                && req.expires_at > Utc::now() =>
        {
            Html(form(&id, None)).into_response()
        }
        Ok(Some(_)) => message(
            StatusCode::GONE,
            "Login request closed",
            "This request was already decided or has expired. Run `depot login` again.",
        ),
        Ok(None) => message(
            StatusCode::NOT_FOUND,
            "Unknown login request",
            "Run `depot login` again and open the link it prints.",
        ),
        Err(err) => err.into_response(),
    }
}

#[derive(Deserialize)]
struct Decision {
    email: String,
    password: String,
    decision: String,
}

async fn login_decide(
    State(app): State<AppState>,
    Path(id): Path<String>,
    Form(form_data): Form<Decision>,
) -> Response {
    let approve = form_data.decision == "approve";
    if let Err(wait) = app.sign_ins.check(&form_data.email) {
        let msg = format!(
            "Too many failed sign-ins for this email; try again in {} minutes.",
            wait.as_secs().div_ceil(60)
        );
        return (StatusCode::TOO_MANY_REQUESTS, Html(form(&id, Some(&msg)))).into_response();
    }
    let user = match login::sign_in(&app.db, &form_data.email, &form_data.password).await {
        Ok(user) => {
            app.sign_ins.succeeded(&form_data.email);
            user
        }
        Err(Error::Unauthenticated(msg)) => {
            app.sign_ins.failed(&form_data.email);
            return (StatusCode::UNAUTHORIZED, Html(form(&id, Some(&msg)))).into_response();
        }
        Err(err) => return err.into_response(),
    };
    match login::decide(&app.db, &id, &user.id, approve).await {
        Ok(()) if approve => {
            let _ = crate::db::audit::record(
                &app.db,
                crate::db::audit::AuditEvent::new("login.approve", ("user", Some(user.id.clone())))
                    .target("login_request", &id),
            )
            .await;
            message(
                StatusCode::OK,
                "Login approved",
                "You can close this page; the depot CLI is now signed in.",
            )
        }
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
