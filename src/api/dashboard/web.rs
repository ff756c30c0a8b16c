//! What every dashboard page shares: the session cookie and its extractor, CSRF checks,
//! the layout, the stylesheet (served under a content hash, cached for good), and the
//! security headers.

use std::sync::{Arc, LazyLock};

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use maud::{DOCTYPE, Markup, html};

use crate::app::AppState;
use crate::auth::web::{csrf_matches, csrf_token};
use crate::auth::{Principal, TokenKind};

pub const SESSION_COOKIE: &str = "kiln_session";

const CSS: &str = include_str!("assets/app.css");
const LIVE_JS: &str = include_str!("assets/live.js");

/// The stylesheet's path: named by its content hash, so it can be cached forever.
pub static CSS_PATH: LazyLock<String> = LazyLock::new(|| hashed_path("app", "css", CSS));

/// The live build list's script, named the same way.
pub static LIVE_JS_PATH: LazyLock<String> = LazyLock::new(|| hashed_path("live", "js", LIVE_JS));

fn hashed_path(stem: &str, extension: &str, content: &str) -> String {
    use sha2::Digest;
    let hash = hex::encode(sha2::Sha256::digest(content.as_bytes()));
    format!("/dashboard/assets/{stem}.{}.{extension}", &hash[..12])
}

/// The embedded assets, by their hashed names only: cached for good.
pub async fn asset(axum::extract::Path(name): axum::extract::Path<String>) -> Response {
    let path = format!("/dashboard/assets/{name}");
    let (content_type, body) = if path == *CSS_PATH {
        ("text/css; charset=utf-8", CSS)
    } else if path == *LIVE_JS_PATH {
        ("text/javascript; charset=utf-8", LIVE_JS)
    } else {
        return StatusCode::NOT_FOUND.into_response();
    };
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
        ],
        body,
    )
        .into_response()
}

/// Scripts and styles only from our own files (never inline), server-sent events only
/// from us, no framing, forms only to us.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; \
    base-uri 'none'";

/// Adds the dashboard's security headers to a page.
pub fn secure(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// A page answer with its status.
pub fn page(status: StatusCode, markup: Markup) -> Response {
    secure((status, Html(markup.into_string())).into_response())
}

/// A signed-in user.
pub struct Session {
    pub principal: Arc<Principal>,
    /// For forms: the session's CSRF token.
    pub csrf: String,
    secret: String,
}

impl Session {
    /// Whether a submitted form's CSRF token is this session's.
    pub fn check_csrf(&self, submitted: &str) -> bool {
        csrf_matches(&self.secret, submitted)
    }

    /// Whether the session still holds (not signed out, revoked or expired): long-lived
    /// streams check this as they go.
    pub async fn still_valid(&self, app: &AppState) -> bool {
        app.auth.verify(&self.secret).await.is_ok()
    }
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Not signed in: GET pages send the browser to the sign-in page and back.
pub struct SignInFirst(String);

impl IntoResponse for SignInFirst {
    fn into_response(self) -> Response {
        let next = url::form_urlencoded::byte_serialize(self.0.as_bytes()).collect::<String>();
        secure(Redirect::to(&format!("/dashboard/sign-in?next={next}")).into_response())
    }
}

impl FromRequestParts<AppState> for Session {
    type Rejection = SignInFirst;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, SignInFirst> {
        let back = || {
            SignInFirst(
                parts
                    .uri
                    .path_and_query()
                    .map_or("/dashboard", |p| p.as_str())
                    .to_string(),
            )
        };
        let Some(secret) = cookie(&parts.headers, SESSION_COOKIE) else {
            return Err(back());
        };
        match app.auth.verify(secret).await {
            Ok(principal) if principal.is(TokenKind::User) => Ok(Session {
                csrf: csrf_token(secret),
                secret: secret.to_string(),
                principal,
            }),
            _ => Err(back()),
        }
    }
}

/// Whether a state-changing request comes from our own pages: a browser names the page's
/// origin, and it must be ours (forms also carry the CSRF token, checked separately).
pub fn same_origin(app: &AppState, headers: &HeaderMap) -> bool {
    if headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() == b"cross-site")
    {
        return false;
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let ours = app.config.server.public_url.origin().ascii_serialization();
    let host_origin = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|host| {
            let scheme = app.config.server.public_url.scheme();
            format!("{scheme}://{host}")
        });
    origin
        .to_str()
        .is_ok_and(|o| o == ours || Some(o) == host_origin.as_deref())
}

/// The session cookie's attributes: HttpOnly, SameSite=Lax, Secure when served over TLS.
pub fn session_cookie(app: &AppState, value: &str, max_age_seconds: i64) -> String {
    let secure = app.config.server.public_url.scheme() == "https"
        || !app.config.server.tls.cert_path.as_os_str().is_empty();
    format!(
        "{SESSION_COOKIE}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age_seconds}{}",
        if secure { "; Secure" } else { "" }
    )
}

/// The page frame: title, navigation, the signed-in user's sign-out form.
pub fn layout(title: &str, session: Option<&Session>, body: Markup) -> Markup {
    layout_with_head(title, session, html! {}, body)
}

/// [`layout`] with more in the page's head (a script, say).
pub fn layout_with_head(
    title: &str,
    session: Option<&Session>,
    head: Markup,
    body: Markup,
) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Kiln" }
                link rel="stylesheet" href=(CSS_PATH.as_str());
                (head)
            }
            body {
                header.top {
                    a.brand href="/dashboard" { "Kiln" }
                    @if let Some(session) = session {
                        form method="post" action="/dashboard/sign-out" {
                            input type="hidden" name="csrf" value=(session.csrf);
                            button.secondary type="submit" { "Sign out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// A page saying something went wrong, with the status it deserves.
pub fn problem(status: StatusCode, session: Option<&Session>, title: &str, text: &str) -> Response {
    page(
        status,
        layout(
            title,
            session,
            html! { section.card { h1 { (title) } p { (text) } p { a href="/dashboard" { "Back to your projects" } } } },
        ),
    )
}

/// The answer for a domain error on a page: a 404 page for anything not found (ids of
/// other organizations included), the message for other 4xx, a generic 5xx.
pub fn error_page(session: Option<&Session>, err: crate::error::Error) -> Response {
    let status = err.http_status();
    if status == StatusCode::NOT_FOUND {
        return problem(
            status,
            session,
            "Not found",
            "There is nothing here, or you cannot see it.",
        );
    }
    err.log();
    problem(
        status,
        session,
        "Something went wrong",
        &err.public_message(),
    )
}

pub async fn root(State(_): State<AppState>) -> Response {
    secure(Redirect::to("/dashboard").into_response())
}
