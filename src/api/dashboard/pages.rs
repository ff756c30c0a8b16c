//! Dashboard pages: sign-in and out, projects, a project's settings and cache, and a
//! build's detail (the link the depot CLI prints after every build). Each handler calls
//! the same domain functions as the APIs; forms are validated on the server, and an
//! invalid submission changes nothing and says what is wrong next to the field.

use axum::Form;
use axum::extract::rejection::FormRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde::Deserialize;

use super::web::{self, Session, error_page, layout, page, problem, same_origin, secure};
use crate::api::ratelimit::ClientAddr;
use crate::app::AppState;
use crate::auth::login;
use crate::auth::trust::TrustProvider;
use crate::builds::DescribedBuild;
use crate::db::builds::{Build, StepRow};
use crate::db::projects::Project;
use crate::error::Error;
use crate::projects::ProjectSettings;

/// How long a dashboard session lasts.
const SESSION_HOURS: i64 = 12;

#[derive(Deserialize, Default)]
pub struct Next {
    next: Option<String>,
}

/// Only our own dashboard paths are followed after sign-in (no open redirect).
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with("/dashboard") && !n.starts_with("//") && !n.contains('\\') => {
            n.to_string()
        }
        _ => "/dashboard".to_string(),
    }
}

fn sign_in_form(next: &str, email: &str, error: Option<&str>) -> Markup {
    layout(
        "Sign in",
        None,
        html! {
            section.card {
                h1 { "Sign in to Kiln" }
                @if let Some(error) = error { p.error role="alert" { (error) } }
                form method="post" action="/dashboard/sign-in" {
                    input type="hidden" name="next" value=(next);
                    label for="email" { "Email" }
                    input #email type="email" name="email" value=(email) autocomplete="username" required;
                    label for="password" { "Password" }
                    input #password type="password" name="password" autocomplete="current-password" required;
                    p { button type="submit" { "Sign in" } }
                }
                p.muted { "The same account as " span.code { "depot login" } "." }
            }
        },
    )
}

pub async fn sign_in_page(Query(q): Query<Next>) -> Response {
    page(
        StatusCode::OK,
        sign_in_form(&safe_next(q.next.as_deref()), "", None),
    )
}

#[derive(Deserialize)]
pub struct SignInForm {
    email: String,
    password: String,
    next: Option<String>,
}

/// Throttled like `depot login`'s approval page: the email is checked, then an attempt is
/// reserved for it and the client's address before any password work.
pub async fn sign_in(
    State(app): State<AppState>,
    ClientAddr(address): ClientAddr,
    headers: HeaderMap,
    form: Result<Form<SignInForm>, FormRejection>,
) -> Response {
    let form = match form {
        Ok(Form(form)) => form,
        Err(rejection) => {
            let (status, msg) = super::unreadable_form(&rejection);
            return page(status, sign_in_form("/dashboard", "", Some(msg)));
        }
    };
    let next = safe_next(form.next.as_deref());
    if !same_origin(&app, &headers) {
        return page(
            StatusCode::FORBIDDEN,
            sign_in_form(
                &next,
                "",
                Some("This form must be sent from Kiln's own page."),
            ),
        );
    }
    let Ok(email) = login::validate_email(&form.email) else {
        return page(
            StatusCode::BAD_REQUEST,
            sign_in_form(
                &next,
                "",
                Some("Enter the email of your Kiln account, like name@example.com."),
            ),
        );
    };
    let attempt = match app.sign_ins.begin(&email, address) {
        Ok(attempt) => attempt,
        Err(throttled) => {
            metrics::counter!("kiln_sign_ins_total", "outcome" => "throttled").increment(1);
            return page(
                StatusCode::TOO_MANY_REQUESTS,
                sign_in_form(&next, &email, Some(&super::throttled_message(throttled))),
            );
        }
    };
    let user = match login::sign_in(&app.db, &email, &form.password).await {
        Ok(user) => {
            attempt.succeeded();
            user
        }
        Err(Error::Unauthenticated(msg)) => {
            attempt.failed();
            return page(
                StatusCode::UNAUTHORIZED,
                sign_in_form(&next, &email, Some(&msg)),
            );
        }
        Err(err) => return error_page(None, err),
    };
    match crate::auth::web::start_session(&app.db, &user, chrono::Duration::hours(SESSION_HOURS))
        .await
    {
        Ok(secret) => {
            let mut response = Redirect::to(&next).into_response();
            if let Ok(value) = web::session_cookie(&app, &secret, SESSION_HOURS * 3600).parse() {
                response.headers_mut().insert(header::SET_COOKIE, value);
            }
            secure(response)
        }
        Err(err) => error_page(None, err),
    }
}

#[derive(Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    pub csrf: String,
}

/// The answer to a form that did not come from our own page (a foreign origin or a
/// wrong CSRF token), or `None` when it did.
pub(super) fn refuse_forged(
    app: &AppState,
    session: &Session,
    headers: &HeaderMap,
    csrf: &str,
) -> Option<Response> {
    (!same_origin(app, headers) || !session.check_csrf(csrf)).then(|| forged(session))
}

fn forged(session: &Session) -> Response {
    problem(
        StatusCode::FORBIDDEN,
        Some(session),
        "Request refused",
        "This request did not come from this Kiln's own page; nothing was changed. Reload the page and try again.",
    )
}

/// Ends the session: its token is revoked on every replica.
pub async fn sign_out(
    State(app): State<AppState>,
    session: Session,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Some(refused) = refuse_forged(&app, &session, &headers, &form.csrf) {
        return refused;
    }
    let principal = session.principal.clone();
    if let Err(err) = app
        .tokens
        .revoke(&principal, None, &principal.token_id)
        .await
    {
        return error_page(Some(&session), err);
    }
    let mut response = Redirect::to("/dashboard/sign-in").into_response();
    if let Ok(value) = web::session_cookie(&app, "", 0).parse() {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    secure(response)
}

fn gib(bytes: i64) -> String {
    format!("{:.1}", bytes as f64 / crate::cache::GIB as f64)
}

/// A bar of `used` out of `size` (SVG: no inline style, so the CSP needs no exception).
fn usage_bar(used: i64, size: i64) -> Markup {
    let fraction = if size > 0 {
        (used as f64 / size as f64).clamp(0.0, 1.0)
    } else {
        0.0
    };
    html! {
        svg.bar viewBox="0 0 100 10" preserveAspectRatio="none" role="img"
            aria-label=(format!("{} of {} GiB used", gib(used), gib(size))) {
            rect.size x="0" y="0" width="100" height="10" {}
            rect.used x="0" y="0" width=(format!("{:.2}", fraction * 100.0)) height="10" {}
        }
    }
}

pub(super) fn state_label(state: &str) -> Markup {
    html! { span class=(format!("state-{state}")) { (state) } }
}

fn build_link(build: &Build) -> String {
    format!(
        "/dashboard/projects/{}/builds/{}",
        build.project_id, build.id
    )
}

/// How many projects the list shows.
const PROJECTS_SHOWN: i64 = 500;

/// What the project list says back after a refused "new project" form.
#[derive(Default)]
struct NewProjectFeedback<'a> {
    organization_id: &'a str,
    name: &'a str,
    error: Option<&'a str>,
}

/// Organizations and their projects: cache size, cache used, last build; a form per
/// organization to create a project.
async fn render_index(
    app: &AppState,
    session: &Session,
    status: StatusCode,
    feedback: &NewProjectFeedback<'_>,
) -> Response {
    let principal = &session.principal;
    let (orgs, rows) = match tokio::try_join!(
        app.orgs.list(principal),
        app.projects.overview(principal, PROJECTS_SHOWN)
    ) {
        Ok(found) => found,
        Err(err) => return error_page(Some(session), err),
    };
    let body = html! {
        h1 { "Projects" }
        @for org in &orgs {
            section.card {
                h2 { (org.name) }
                table {
                    thead { tr { th { "Project" } th { "Cache size (amd64 / arm64)" } th { "Cache used" } th { "Last build" } } }
                    tbody {
                        @for row in rows.iter().filter(|r| r.project.organization_id == org.id) {
                            @let project = &row.project;
                            tr {
                                td { a href=(format!("/dashboard/projects/{}", project.id)) { (project.name) } }
                                td { (project.cache_size_gb_amd64) " GB / " (project.cache_size_gb_arm64) " GB" }
                                td { (gib(row.cache_used_bytes)) " GiB" }
                                td {
                                    @if let (Some(id), Some(state), Some(at)) = (&row.last_build_id, &row.last_build_state, row.last_build_at) {
                                        a href=(format!("/dashboard/projects/{}/builds/{id}", project.id)) { (state_label(state)) }
                                        " " span.muted { (at.format("%Y-%m-%d %H:%M UTC")) }
                                    } @else { span.muted { "none yet" } }
                                }
                            }
                        }
                    }
                }
                @let mine = feedback.organization_id == org.id;
                @let field = format!("new-project-{}", org.id);
                form.inline method="post" action="/dashboard/projects" {
                    input type="hidden" name="csrf" value=(session.csrf);
                    input type="hidden" name="organization_id" value=(org.id);
                    label for=(field) { "New project name" }
                    input id=(field) type="text" name="name" required maxlength="100"
                        value=(if mine { feedback.name } else { "" })
                        aria-invalid=(if mine && feedback.error.is_some() { "true" } else { "false" });
                    " " button type="submit" { "Create project" }
                    @if mine { @if let Some(error) = feedback.error { p.error role="alert" { (error) } } }
                }
                @if may_operate(session, &org.id) {
                    p { a href=(format!("/dashboard/organizations/{}/operations", org.id)) { "Machines and audit log" } }
                }
            }
        }
        @if orgs.is_empty() { p { "You belong to no organization yet." } }
        p { a href="/dashboard/models" { "Models" } ": AI models to embed with one " code { "COPY --from" } " line" }
        @if may_operate_installation(session) {
            p { a href="/dashboard/operations" { "This installation: every machine and the audit log" } }
        }
    };
    page(status, layout("Projects", Some(session), body))
}

/// Whether to offer the installation's operations page (server admins).
fn may_operate_installation(session: &Session) -> bool {
    crate::auth::authorize(
        &session.principal,
        crate::auth::Action::Operate,
        crate::auth::Target::Instance,
    )
    .is_ok()
}

/// Whether to offer the organization's operations page (machines, audit log).
fn may_operate(session: &Session, organization_id: &str) -> bool {
    crate::auth::authorize(
        &session.principal,
        crate::auth::Action::ViewAuditLog,
        crate::auth::Target::Organization {
            id: organization_id,
        },
    )
    .is_ok()
}

pub async fn index(State(app): State<AppState>, session: Session) -> Response {
    render_index(
        &app,
        &session,
        StatusCode::OK,
        &NewProjectFeedback::default(),
    )
    .await
}

#[derive(Deserialize)]
pub struct NewProjectForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    organization_id: String,
    #[serde(default)]
    name: String,
}

/// Creates a project with the default settings and opens its page.
pub async fn create_project(
    State(app): State<AppState>,
    session: Session,
    headers: HeaderMap,
    Form(form): Form<NewProjectForm>,
) -> Response {
    if let Some(refused) = refuse_forged(&app, &session, &headers, &form.csrf) {
        return refused;
    }
    let settings = ProjectSettings {
        name: Some(form.name.trim().to_string()),
        ..Default::default()
    };
    match app
        .projects
        .create(&session.principal, Some(&form.organization_id), settings)
        .await
    {
        Ok(project) => {
            secure(Redirect::to(&format!("/dashboard/projects/{}", project.id)).into_response())
        }
        Err(err @ (Error::InvalidArgument { .. } | Error::AlreadyExists(_))) => {
            let message = match &err {
                Error::InvalidArgument { field, reason } if field == "name" => {
                    format!("The name {reason}.")
                }
                other => other.to_string(),
            };
            let feedback = NewProjectFeedback {
                organization_id: &form.organization_id,
                name: &form.name,
                error: Some(&message),
            };
            render_index(&app, &session, StatusCode::UNPROCESSABLE_ENTITY, &feedback).await
        }
        Err(err) => error_page(Some(&session), err),
    }
}

/// What a settings form said was wrong, by field.
#[derive(Default)]
struct FieldErrors {
    fields: Vec<(&'static str, String)>,
    general: Option<String>,
}

impl FieldErrors {
    fn of(&self, field: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(f, _)| *f == field)
            .map(|(_, e)| e.as_str())
    }
}

/// What the project page says back after a submission.
#[derive(Default)]
struct Feedback<'a> {
    /// The submitted values, shown again when they were refused.
    values: Option<&'a SettingsForm>,
    errors: FieldErrors,
    notice: Option<String>,
    reset_error: Option<&'a str>,
    token_error: Option<&'a str>,
    trust_error: Option<&'a str>,
}

#[derive(Deserialize, Default)]
pub struct ProjectQuery {
    saved: Option<String>,
    reset: Option<String>,
    revoked: Option<String>,
    trusted: Option<String>,
    untrusted: Option<String>,
}

fn number_field(
    label: &str,
    name: &'static str,
    value: &str,
    (unit, min, max): (&str, i32, Option<i32>),
    errors: &FieldErrors,
) -> Markup {
    let error = errors.of(name);
    html! {
        label for=(name) { (label) }
        input id=(name) type="number" name=(name) value=(value) min=(min) max=[max] required
            aria-invalid=(if error.is_some() { "true" } else { "false" })
            aria-describedby=(format!("{name}-error"));
        " " span.muted { (unit) }
        @if let Some(error) = error { p.error id=(format!("{name}-error")) role="alert" { (error) } }
    }
}

/// Everything the project page shows.
struct ProjectView<'a> {
    project: &'a Project,
    volumes: &'a [crate::cache::VolumeView],
    builds: &'a [Build],
    tokens: &'a [crate::db::tokens::TokenInfo],
    policies: &'a [crate::projects::trust::TrustPolicy],
    /// The configured cache size bounds, GB.
    cache_bounds: (i32, i32),
}

fn project_page(session: &Session, view: &ProjectView<'_>, feedback: &Feedback<'_>) -> Markup {
    let ProjectView {
        project,
        volumes,
        builds,
        tokens,
        policies,
        cache_bounds: (min_gb, max_gb),
    } = *view;
    let (values, errors) = (feedback.values, &feedback.errors);
    let (notice, reset_error) = (feedback.notice.as_deref(), feedback.reset_error);
    let cache_unit = format!("GB ({min_gb} to {max_gb})");
    let value = |field: fn(&SettingsForm) -> &str, current: i32| -> String {
        values.map_or_else(|| current.to_string(), |v| field(v).to_string())
    };
    layout(
        &project.name,
        Some(session),
        html! {
            h1 { (project.name) }
            @if let Some(notice) = notice { p.notice role="status" { (notice) } }
            div.grid {
                section.card {
                    h2 { "Cache" }
                    @for platform in ["amd64", "arm64"] {
                        @let size = if platform == "amd64" { project.cache_size_gb_amd64 } else { project.cache_size_gb_arm64 };
                        @let volume = volumes.iter().find(|v| v.volume.platform == platform);
                        p {
                            strong { (platform) } ": "
                            @if let Some(v) = volume {
                                (gib(v.volume.used_bytes.unwrap_or(0))) " of " (gib(v.volume.size_bytes)) " GiB used"
                                (usage_bar(v.volume.used_bytes.unwrap_or(0), v.volume.size_bytes))
                                @if let Some(pending) = &v.pending { br; span.muted { (pending) } }
                            } @else {
                                (size) " GB, not allocated yet (the first build creates it)"
                            }
                        }
                    }
                    form method="post" action=(format!("/dashboard/projects/{}/reset", project.id)) {
                        input type="hidden" name="csrf" value=(session.csrf);
                        label {
                            input type="checkbox" name="confirm" value="yes";
                            " I understand the next builds start from an empty cache"
                        }
                        @if let Some(error) = reset_error { p.error role="alert" { (error) } }
                        p { button.secondary type="submit" { "Reset cache" } }
                    }
                }
                section.card {
                    h2 { "Settings" }
                    @if let Some(error) = &errors.general { p.error role="alert" { (error) } }
                    form method="post" action=(format!("/dashboard/projects/{}/settings", project.id)) {
                        input type="hidden" name="csrf" value=(session.csrf);
                        input type="hidden" name="version" value=(project.version);
                        (number_field("Cache size, amd64", "cache_size_gb_amd64", &value(|v| &v.cache_size_gb_amd64, project.cache_size_gb_amd64), (&cache_unit, min_gb, Some(max_gb)), errors))
                        (number_field("Cache size, arm64", "cache_size_gb_arm64", &value(|v| &v.cache_size_gb_arm64, project.cache_size_gb_arm64), (&cache_unit, min_gb, Some(max_gb)), errors))
                        p.muted { "A larger cache takes effect at once; a smaller one at the next cache reset." }
                        (number_field("Keep unused cache entries for", "cache_retention_days", &value(|v| &v.cache_retention_days, project.cache_retention_days), ("days (1 to 365)", 1, Some(365)), errors))
                        (number_field("Build timeout", "build_timeout_minutes", &value(|v| &v.build_timeout_minutes, project.build_timeout_minutes), ("minutes (1 to 1440)", 1, Some(1440)), errors))
                        @let size = values.map_or(project.builder_size.as_str(), |v| v.builder_size.as_str());
                        label for="builder_size" { "Builder size" }
                        select #builder_size name="builder_size" {
                            @for option in crate::projects::BUILDER_SIZES {
                                @let (cpus, memory) = option.split_once('x').unwrap_or((option, ""));
                                option value=(option) selected[size == option] { (cpus) " CPUs, " (memory) " GB memory" }
                            }
                        }
                        @if let Some(error) = errors.of("builder_size") { p.error role="alert" { (error) } }
                        @let autoscaling = values.map_or(project.autoscaling_enabled, |v| v.autoscaling_enabled.is_some());
                        label {
                            input type="checkbox" name="autoscaling_enabled" value="on" checked[autoscaling];
                            " Autoscaling: more builders when builds queue up"
                        }
                        (number_field("Builds per builder", "autoscaling_builds_per_builder", &value(|v| &v.autoscaling_builds_per_builder, project.autoscaling_builds_per_builder), ("(1 to 100)", 1, Some(100)), errors))
                        (number_field("At most", "autoscaling_max_builders", &value(|v| &v.autoscaling_max_builders, project.autoscaling_max_builders), ("builders (1 to 100)", 1, Some(100)), errors))
                        p { button type="submit" { "Save settings" } }
                    }
                }
            }
            section.card {
                h2 { "Tokens" }
                table {
                    thead { tr { th { "Name" } th { "Token" } th { "Created" } th { "Last used" } th {} } }
                    tbody {
                        @for token in tokens.iter().filter(|t| t.revoked_at.is_none()) {
                            tr {
                                td { (token.name) }
                                td { span.code { (token.display_prefix) "…" } }
                                td { (token.created_at.format("%Y-%m-%d")) }
                                td { (token.last_used_at.map_or_else(|| "never".to_string(), |t| t.format("%Y-%m-%d %H:%M").to_string())) }
                                td {
                                    form method="post" action=(format!("/dashboard/projects/{}/tokens/{}/revoke", project.id, token.id)) {
                                        input type="hidden" name="csrf" value=(session.csrf);
                                        button.secondary type="submit" aria-label=(format!("Revoke token {}", token.name)) { "Revoke" }
                                    }
                                }
                            }
                        }
                    }
                }
                form method="post" action=(format!("/dashboard/projects/{}/tokens", project.id)) {
                    input type="hidden" name="csrf" value=(session.csrf);
                    label for="token-name" { "New token name" }
                    input #token-name type="text" name="name" required maxlength="100"
                        aria-invalid=(if feedback.token_error.is_some() { "true" } else { "false" });
                    @if let Some(error) = feedback.token_error { p.error role="alert" { (error) } }
                    p { button type="submit" { "Create token" } }
                }
            }
            (trust_section(session, project, policies, feedback.trust_error))
            section.card {
                h2 { "Recent builds" }
                p {
                    a href=(format!("/dashboard/projects/{}/builds", project.id)) { "All builds, live" }
                    " · "
                    a href=(format!("/dashboard/projects/{}/usage", project.id)) { "Usage" }
                }
                table {
                    thead { tr { th { "Build" } th { "Status" } th { "Started" } th { "Duration" } } }
                    tbody {
                        @for build in builds {
                            tr {
                                td { a href=(build_link(build)) { span.code { (build.id) } } }
                                td { (state_label(&build.state)) }
                                td { (build.created_at.format("%Y-%m-%d %H:%M:%S UTC")) }
                                td { (duration(build)) }
                            }
                        }
                    }
                }
                @if builds.is_empty() { p.muted { "No builds yet: run " span.code { "depot build --project " (project.id) " ." } } }
            }
        },
    )
}

pub(super) fn duration(build: &Build) -> String {
    match build.finished_at {
        Some(finished) => {
            let secs = (finished - build.started_at.unwrap_or(build.created_at)).num_seconds();
            format!("{}m {:02}s", secs / 60, secs % 60)
        }
        None => "running".into(),
    }
}

async fn render_project(
    app: &AppState,
    session: &Session,
    id: &str,
    status: StatusCode,
    feedback: &Feedback<'_>,
) -> Response {
    let principal = &session.principal;
    let project = match app.projects.get(principal, Some(id)).await {
        Ok(project) => project,
        Err(err) => return error_page(Some(session), err),
    };
    let (volumes, builds, tokens, policies) = match tokio::try_join!(
        app.cache.list(principal, Some(id)),
        app.builds.list(principal, Some(id), "", Some(20)),
        app.tokens.list_project_tokens(principal, Some(id)),
        app.projects.trust_policies(principal, Some(id))
    ) {
        Ok(found) => found,
        Err(err) => return error_page(Some(session), err),
    };
    page(
        status,
        project_page(
            session,
            &ProjectView {
                project: &project,
                volumes: &volumes,
                builds: &builds.builds,
                tokens: &tokens,
                policies: &policies,
                cache_bounds: (app.config.cache.min_size_gb, app.config.cache.max_size_gb),
            },
            feedback,
        ),
    )
}

/// Back to the project's page after a change, with what to say there.
fn back_to_project(id: &str, notice: &str) -> Response {
    secure(Redirect::to(&format!("/dashboard/projects/{id}?{notice}=1")).into_response())
}

/// The project's page again, saying why a form was refused (nothing changed).
async fn refused_on_project(
    app: &AppState,
    session: &Session,
    id: &str,
    feedback: &Feedback<'_>,
) -> Response {
    render_project(app, session, id, StatusCode::UNPROCESSABLE_ENTITY, feedback).await
}

pub async fn project(
    State(app): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    Query(q): Query<ProjectQuery>,
) -> Response {
    let notice = match (q.saved.is_some(), q.reset.as_deref()) {
        (true, _) => Some("Settings saved.".to_string()),
        (_, Some("done")) => Some("Cache reset: the next builds start from an empty cache.".into()),
        (_, Some("unused")) => {
            Some("The cache was not used since its last reset; nothing to do.".into())
        }
        _ if q.revoked.is_some() => Some("Token revoked.".into()),
        _ if q.trusted.is_some() => Some("Trust relationship added.".into()),
        _ if q.untrusted.is_some() => Some("Trust relationship removed.".into()),
        _ => None,
    };
    let feedback = Feedback {
        notice,
        ..Default::default()
    };
    render_project(&app, &session, &id, StatusCode::OK, &feedback).await
}

#[derive(Deserialize)]
pub struct SettingsForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    version: String,
    #[serde(default)]
    cache_size_gb_amd64: String,
    #[serde(default)]
    cache_size_gb_arm64: String,
    #[serde(default)]
    build_timeout_minutes: String,
    #[serde(default)]
    cache_retention_days: String,
    #[serde(default)]
    builder_size: String,
    /// A checkbox: present when ticked.
    autoscaling_enabled: Option<String>,
    #[serde(default)]
    autoscaling_builds_per_builder: String,
    #[serde(default)]
    autoscaling_max_builders: String,
}

pub async fn save_settings(
    State(app): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    headers: HeaderMap,
    Form(form): Form<SettingsForm>,
) -> Response {
    if let Some(refused) = refuse_forged(&app, &session, &headers, &form.csrf) {
        return refused;
    }
    let mut errors = FieldErrors::default();
    let mut number = |field: &'static str, text: &str| -> Option<i32> {
        match text.trim().parse::<i32>() {
            Ok(n) if n > 0 => Some(n),
            _ => {
                errors
                    .fields
                    .push((field, "Enter a whole number above 0.".into()));
                None
            }
        }
    };
    let amd64 = number("cache_size_gb_amd64", &form.cache_size_gb_amd64);
    let arm64 = number("cache_size_gb_arm64", &form.cache_size_gb_arm64);
    let timeout = number("build_timeout_minutes", &form.build_timeout_minutes);
    let retention = number("cache_retention_days", &form.cache_retention_days);
    let per_builder = number(
        "autoscaling_builds_per_builder",
        &form.autoscaling_builds_per_builder,
    );
    let max_builders = number("autoscaling_max_builders", &form.autoscaling_max_builders);
    let version = form.version.trim().parse::<i64>().ok();
    if errors.fields.is_empty() {
        let settings = ProjectSettings {
            cache_size_gb_amd64: amd64,
            cache_size_gb_arm64: arm64,
            build_timeout_minutes: timeout,
            cache_retention_days: retention,
            builder_size: Some(form.builder_size.trim().to_string()),
            autoscaling_enabled: Some(form.autoscaling_enabled.is_some()),
            autoscaling_builds_per_builder: per_builder,
            autoscaling_max_builders: max_builders,
            ..Default::default()
        };
        let expected = version.map(|v| vec![v]);
        match app
            .projects
            .update_if_unchanged(&session.principal, Some(&id), settings, expected.as_deref())
            .await
        {
            Ok(_) => {
                return back_to_project(&id, "saved");
            }
            Err(Error::InvalidArgument { field, reason }) => {
                let field = match field.as_str() {
                    "cache_size_gb_amd64" => "cache_size_gb_amd64",
                    "cache_size_gb_arm64" => "cache_size_gb_arm64",
                    "build_timeout_minutes" => "build_timeout_minutes",
                    "cache_retention_days" => "cache_retention_days",
                    "builder_size" => "builder_size",
                    "autoscaling_builds_per_builder" => "autoscaling_builds_per_builder",
                    "autoscaling_max_builders" => "autoscaling_max_builders",
                    _ => "",
                };
                if field.is_empty() {
                    errors.general = Some(reason);
                } else {
                    errors.fields.push((field, reason));
                }
            }
            Err(Error::PreconditionFailed(_)) => {
                errors.general = Some(
                    "Someone changed these settings since you opened this page; nothing was \
                     saved. The form now shows the current values."
                        .into(),
                );
                let feedback = Feedback {
                    errors,
                    ..Default::default()
                };
                return render_project(&app, &session, &id, StatusCode::CONFLICT, &feedback).await;
            }
            Err(err) => return error_page(Some(&session), err),
        }
    }
    let feedback = Feedback {
        values: Some(&form),
        errors,
        ..Default::default()
    };
    refused_on_project(&app, &session, &id, &feedback).await
}

#[derive(Deserialize)]
pub struct ResetForm {
    #[serde(default)]
    csrf: String,
    confirm: Option<String>,
}

pub async fn reset_cache(
    State(app): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    headers: HeaderMap,
    Form(form): Form<ResetForm>,
) -> Response {
    if let Some(refused) = refuse_forged(&app, &session, &headers, &form.csrf) {
        return refused;
    }
    if form.confirm.as_deref() != Some("yes") {
        let feedback = Feedback {
            reset_error: Some(
                "Tick the box to confirm: the next builds start from an empty cache.",
            ),
            ..Default::default()
        };
        return refused_on_project(&app, &session, &id, &feedback).await;
    }
    match app.cache.reset(&session.principal, Some(&id)).await {
        Ok(reset) => secure(
            Redirect::to(&format!(
                "/dashboard/projects/{id}?reset={}",
                if reset.took_effect { "done" } else { "unused" }
            ))
            .into_response(),
        ),
        Err(err) => error_page(Some(&session), err),
    }
}

/// A step as a build's page shows it (the signed-in page and the shared one).
pub(super) struct TimedStep<'a> {
    pub name: &'a str,
    pub cached: bool,
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
    pub completed_at: Option<chrono::DateTime<chrono::Utc>>,
    pub error: Option<&'a str>,
}

impl<'a> From<&'a StepRow> for TimedStep<'a> {
    fn from(s: &'a StepRow) -> Self {
        TimedStep {
            name: &s.name,
            cached: s.cached,
            started_at: s.started_at,
            completed_at: s.completed_at,
            error: s.error.as_deref(),
        }
    }
}

impl<'a> From<&'a crate::db::builds::Step> for TimedStep<'a> {
    fn from(s: &'a crate::db::builds::Step) -> Self {
        TimedStep {
            name: &s.name,
            cached: s.cached,
            started_at: s.started_at,
            completed_at: s.completed_at,
            error: s.error.as_deref(),
        }
    }
}

/// A build's steps: the timing chart, then a table with cache hits, times and errors.
pub(super) fn steps_section(build: &Build, steps: &[TimedStep<'_>]) -> Markup {
    html! {
        section.card {
            h2 { "Steps" }
            @if steps.is_empty() { p.muted { "No steps reported." } } @else {
                (waterfall(build, steps))
                table {
                    thead { tr { th { "Step" } th { "Cache" } th { "Time" } th { "Error" } } }
                    tbody {
                        @for step in steps {
                            tr {
                                td { (step.name) }
                                td { @if step.cached { "cached" } }
                                td {
                                    @if let (Some(s), Some(c)) = (step.started_at, step.completed_at) {
                                        (format!("{:.1}s", (c - s).num_milliseconds() as f64 / 1000.0))
                                    }
                                }
                                td.error { (step.error.unwrap_or_default()) }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A waterfall of steps over time: one bar per step from its start to its end.
fn waterfall(build: &Build, steps: &[TimedStep<'_>]) -> Markup {
    let timed: Vec<&TimedStep<'_>> = steps.iter().filter(|s| s.started_at.is_some()).collect();
    let start = timed
        .iter()
        .filter_map(|s| s.started_at)
        .min()
        .unwrap_or(build.created_at);
    let end = timed
        .iter()
        .filter_map(|s| s.completed_at.or(s.started_at))
        .max()
        .unwrap_or(start);
    let span = ((end - start).num_milliseconds().max(1)) as f64;
    let row = 18;
    let height = (timed.len() * row).max(row);
    html! {
        svg.waterfall viewBox=(format!("0 0 1000 {height}")) role="img"
            aria-label="Step timings: one bar per step from its start to its end" {
            @for (i, step) in timed.iter().enumerate() {
                @let from = step.started_at.map_or(0.0, |t| (t - start).num_milliseconds() as f64 / span);
                @let to = step.completed_at.or(step.started_at).map_or(from, |t| (t - start).num_milliseconds() as f64 / span);
                @let x = 300.0 + from * 690.0;
                @let width = ((to - from) * 690.0).max(2.0);
                text x="0" y=(i * row + 13) { (step.name.chars().take(48).collect::<String>()) }
                rect class=(if step.cached { "cached" } else { "run" }) x=(format!("{x:.1}")) y=(i * row + 3)
                    width=(format!("{width:.1}")) height="12" {
                    title { (step.name) (if step.cached { " (cached)" } else { "" }) }
                }
            }
        }
    }
}

/// A build: status, duration, error, steps with a timing chart, logs, and sharing.
pub async fn build(
    State(app): State<AppState>,
    session: Session,
    Path((project_id, build_id)): Path<(String, String)>,
) -> Response {
    let principal = &session.principal;
    let build = match app.builds.get(principal, &build_id).await {
        Ok(build) if build.project_id == project_id => build,
        Ok(_) => return error_page(Some(&session), Error::not_found("build", &build_id)),
        Err(err) => return error_page(Some(&session), err),
    };
    let steps = match app
        .builds
        .steps_page(principal, Some(&project_id), &build_id, "", Some(1000))
        .await
    {
        Ok(page) => page.steps,
        Err(err) => return error_page(Some(&session), err),
    };
    // The end of each step's log, within a budget that keeps the page light; each step
    // links to its whole log.
    let tails = match app
        .builds
        .log_tails(
            principal,
            Some(&project_id),
            &build_id,
            (LOG_TAIL_LINES, LOG_TAIL_TOTAL, LOG_TAIL_CHARS),
        )
        .await
    {
        Ok(tails) => tails,
        Err(err) => return error_page(Some(&session), err),
    };
    let logs: Vec<(&StepRow, Vec<&str>)> = steps
        .iter()
        .filter(|s| s.log_lines > 0)
        .map(|step| {
            let lines = tails
                .iter()
                .filter(|(digest, _)| *digest == step.digest)
                .map(|(_, line)| line.message.as_str())
                .collect();
            (step, lines)
        })
        .collect();
    let body = html! {
        p { a href=(format!("/dashboard/projects/{project_id}")) { "← Project" } }
        h1 { "Build " span.code { (build.id) } }
        section.card {
            p {
                "Status: " strong { (state_label(&build.state)) }
                " · " (duration(&build))
                " · started " (build.created_at.format("%Y-%m-%d %H:%M:%S UTC"))
                @if let (Some(total), Some(cached)) = (build.total_steps, build.cached_steps) {
                    " · " (cached) " of " (total) " steps cached"
                }
            }
            @if let Some(error) = &build.error { p.error role="alert" { (error) } }
            form method="post" action=(format!("/dashboard/projects/{project_id}/builds/{build_id}/share")) {
                input type="hidden" name="csrf" value=(session.csrf);
                button.secondary type="submit" { "Share a read-only link" }
            }
        }
        (steps_section(&build, &steps.iter().map(TimedStep::from).collect::<Vec<_>>()))
        @if !logs.is_empty() {
            section.card {
                h2 { "Logs" }
                @for (step, lines) in &logs {
                    details {
                        summary { (step.name) " (" (step.log_lines) " lines)" }
                        @if lines.len() < step.log_lines as usize {
                            p.muted {
                                "The last " (lines.len()) " lines. "
                                a href=(format!("/dashboard/projects/{project_id}/builds/{build_id}/logs/{}", step.digest)) { "The whole log" }
                            }
                        }
                        pre.log { @for line in lines { (line) "\n" } }
                    }
                }
            }
        }
    };
    page(
        StatusCode::OK,
        layout(&format!("Build {}", build.id), Some(&session), body),
    )
}

/// How much of the logs a build's page shows: the last lines of each step, and a cap
/// for the whole page.
const LOG_TAIL_LINES: i64 = 30;
const LOG_TAIL_TOTAL: i64 = 600;
/// Longer lines are cut on the build's page (never on the whole log's).
const LOG_TAIL_CHARS: i32 = 300;

#[derive(Deserialize, Default)]
pub struct LogQuery {
    page_token: Option<String>,
}

/// One step's whole log, 1,000 lines a page.
pub async fn step_log(
    State(app): State<AppState>,
    session: Session,
    Path((project_id, build_id, digest)): Path<(String, String, String)>,
    Query(q): Query<LogQuery>,
) -> Response {
    let principal = &session.principal;
    let steps = match app
        .builds
        .steps_page(principal, Some(&project_id), &build_id, "", Some(1000))
        .await
    {
        Ok(page) => page.steps,
        Err(err) => return error_page(Some(&session), err),
    };
    let Some(step) = steps.iter().find(|s| s.digest == digest) else {
        return error_page(Some(&session), Error::not_found("build step", &digest));
    };
    let page_token = q.page_token.unwrap_or_default();
    let lines = match app
        .builds
        .step_logs(
            principal,
            Some(&project_id),
            &build_id,
            &digest,
            &page_token,
            Some(1000),
        )
        .await
    {
        Ok(lines) => lines,
        Err(err @ Error::InvalidArgument { .. }) => {
            return problem(
                StatusCode::BAD_REQUEST,
                Some(&session),
                "Bad page link",
                &err.public_message(),
            );
        }
        Err(err) => return error_page(Some(&session), err),
    };
    let build_path = format!("/dashboard/projects/{project_id}/builds/{build_id}");
    let body = html! {
        p { a href=(build_path) { "← Build " (build_id) } }
        h1 { (step.name) }
        section.card {
            pre.log.full { @for line in &lines.lines { (line.message) "\n" } }
            @if lines.lines.is_empty() { p.muted { "No more lines." } }
            @if let Some(next) = &lines.next_page_token {
                p { a href=(format!("{build_path}/logs/{digest}?page_token={next}")) { "Next lines →" } }
            }
        }
    };
    page(
        StatusCode::OK,
        layout(&format!("Log of {}", step.name), Some(&session), body),
    )
}

/// Shares a build and shows its link.
pub async fn share_build(
    State(app): State<AppState>,
    session: Session,
    Path((project_id, build_id)): Path<(String, String)>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Some(refused) = refuse_forged(&app, &session, &headers, &form.csrf) {
        return refused;
    }
    match app.builds.get(&session.principal, &build_id).await {
        Ok(build) if build.project_id == project_id => {}
        Ok(_) => return error_page(Some(&session), Error::not_found("build", &build_id)),
        Err(err) => return error_page(Some(&session), err),
    }
    match app.builds.share(&session.principal, &build_id).await {
        Ok(path) => {
            let url = app.config.public_link(&path);
            page(
                StatusCode::OK,
                layout(
                    "Shared build",
                    Some(&session),
                    html! {
                        section.card {
                            h1 { "Build shared" }
                            p { "Anyone with this link can read the build without signing in:" }
                            p { a.code href=(url) { (url) } }
                            p { a href=(format!("/dashboard/projects/{project_id}/builds/{build_id}")) { "Back to the build" } }
                        }
                    },
                ),
            )
        }
        Err(err) => error_page(Some(&session), err),
    }
}

#[derive(Deserialize)]
pub struct TokenForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
}

/// Creates a project token and shows its secret, once.
pub async fn create_token(
    State(app): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    headers: HeaderMap,
    Form(form): Form<TokenForm>,
) -> Response {
    if let Some(refused) = refuse_forged(&app, &session, &headers, &form.csrf) {
        return refused;
    }
    let result = if form.name.trim().is_empty() {
        Err(Error::invalid("name", "Give the token a name."))
    } else {
        app.tokens
            .create_project_token(&session.principal, Some(&id), &form.name, None)
            .await
    };
    match result {
        Ok((info, secret)) => page(
            StatusCode::OK,
            layout(
                "Token created",
                Some(&session),
                html! {
                    section.card {
                        h1 { "Token " (info.name) " created" }
                        p { "Copy it now: Kiln stores only its hash and will not show it again." }
                        p { span.code data-testid="secret" { (secret) } }
                        p { a href=(format!("/dashboard/projects/{id}")) { "Back to the project" } }
                    }
                },
            ),
        ),
        Err(Error::InvalidArgument { reason, .. }) => {
            let feedback = Feedback {
                token_error: Some(&reason),
                ..Default::default()
            };
            refused_on_project(&app, &session, &id, &feedback).await
        }
        Err(err) => error_page(Some(&session), err),
    }
}

pub async fn revoke_token(
    State(app): State<AppState>,
    session: Session,
    Path((id, token_id)): Path<(String, String)>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Some(refused) = refuse_forged(&app, &session, &headers, &form.csrf) {
        return refused;
    }
    match app
        .tokens
        .revoke(&session.principal, Some(&id), &token_id)
        .await
    {
        Ok(_) => back_to_project(&id, "revoked"),
        Err(err) => error_page(Some(&session), err),
    }
}

#[derive(Deserialize, Default)]
pub struct BuildsQuery {
    status: Option<String>,
    page_token: Option<String>,
}

const STATUSES: [&str; 6] = [
    "queued",
    "running",
    "success",
    "failed",
    "canceled",
    "timed_out",
];

/// The rows of a build list (also what the live stream sends).
fn build_rows(shown: &[&DescribedBuild]) -> Markup {
    html! {
        @for row in shown {
            @let build = &row.build;
            tr {
                td { a href=(build_link(build)) { span.code { (build.id) } } }
                td { (state_label(&build.state)) }
                td { (build.created_at.format("%Y-%m-%d %H:%M:%S UTC")) }
                td { (duration(build)) }
                td { (row.platforms.join(", ")) }
                td { (row.started_by.as_deref().unwrap_or("—")) }
            }
        }
        @if shown.is_empty() { tr { td colspan="6" { span.muted { "No builds here." } } } }
    }
}

/// The status filter of a build list: none, or a known status (else the page saying so).
fn status_filter(session: &Session, status: Option<&str>) -> Result<Option<String>, Box<Response>> {
    match status.filter(|s| !s.is_empty()) {
        Some(s) if !STATUSES.contains(&s) => Err(Box::new(problem(
            StatusCode::BAD_REQUEST,
            Some(session),
            "Unknown status",
            "Filter by queued, running, success, failed, canceled or timed_out.",
        ))),
        other => Ok(other.map(str::to_string)),
    }
}

/// One page of a project's builds, then those of `status`. Filtering happens over
/// pages of the listing, so a page may hold fewer rows.
async fn builds_page(
    app: &AppState,
    session: &Session,
    project_id: &str,
    status: Option<&str>,
    page_token: &str,
) -> crate::error::Result<(Vec<DescribedBuild>, String)> {
    let (listed, next) = app
        .builds
        .list_described(&session.principal, Some(project_id), page_token, Some(100))
        .await?;
    let shown = listed
        .into_iter()
        .filter(|b| status.is_none_or(|s| b.build.state == s))
        .collect();
    Ok((shown, next))
}

/// A project's builds, newest first, filtered by status. The first page is live: a
/// small script follows the server-sent events of `builds/events`; without script,
/// the page reloads itself every 5 seconds.
pub async fn builds(
    State(app): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    Query(q): Query<BuildsQuery>,
) -> Response {
    let status = match status_filter(&session, q.status.as_deref()) {
        Ok(status) => status,
        Err(refused) => return *refused,
    };
    let status = status.as_deref();
    let principal = &session.principal;
    let project = match app.projects.get(principal, Some(&id)).await {
        Ok(project) => project,
        Err(err) => return error_page(Some(&session), err),
    };
    let page_token = q.page_token.clone().unwrap_or_default();
    let (shown, next_page_token) = match builds_page(&app, &session, &id, status, &page_token).await
    {
        Ok(found) => found,
        Err(err) => return error_page(Some(&session), err),
    };
    let shown: Vec<&DescribedBuild> = shown.iter().collect();
    let first_page = page_token.is_empty();
    let live = first_page.then(|| {
        format!(
            "/dashboard/projects/{id}/builds/events?status={}",
            status.unwrap_or_default()
        )
    });
    let body = html! {
        p { a href=(format!("/dashboard/projects/{id}")) { "← " (project.name) } }
        h1 { "Builds of " (project.name) }
        form method="get" {
            label for="status" { "Status" }
            select #status name="status" {
                option value="" selected[status.is_none()] { "any" }
                @for s in STATUSES { option value=(s) selected[status == Some(s)] { (s) } }
            }
            " " button.secondary type="submit" { "Filter" }
        }
        section.card {
            table data-live=[live.as_deref()] {
                thead { tr { th { "Build" } th { "Status" } th { "Started" } th { "Duration" } th { "Platforms" } th { "Started by" } } }
                tbody { (build_rows(&shown)) }
            }
            @if !next_page_token.is_empty() {
                p { a href=(format!("/dashboard/projects/{id}/builds?status={}&page_token={}", status.unwrap_or_default(), next_page_token)) { "Older builds →" } }
            }
            @if first_page { p.muted #live-status role="status" { "This list updates by itself." } }
        }
    };
    let head = html! {
        @if first_page {
            script src=(web::LIVE_JS_PATH.as_str()) defer {}
            noscript { meta http-equiv="refresh" content="5"; }
        }
    };
    page(
        StatusCode::OK,
        web::layout_with_head(
            &format!("Builds of {}", project.name),
            Some(&session),
            head,
            body,
        ),
    )
}

/// A live list re-reads its rows when a build of its project changes (a notification
/// from any replica), and at least this often in case one was missed; one stream lasts
/// `LIVE_FOR` (the browser reconnects by itself).
const LIVE_FALLBACK: std::time::Duration = std::time::Duration::from_secs(5);
const LIVE_FOR: std::time::Duration = std::time::Duration::from_secs(600);

/// Waits for a change to one of `project_id`'s builds, as announced on the build channel.
async fn build_changed(
    app: &AppState,
    events: &mut tokio::sync::broadcast::Receiver<std::sync::Arc<crate::db::notify::Notification>>,
    project_id: &str,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match events.recv().await {
            Ok(event) if event.channel == crate::builds::BUILD_CHANNEL => {
                match app.builds.lookup(&event.payload).await {
                    Ok(Some(build)) if build.project_id != project_id => continue,
                    _ => return,
                }
            }
            Ok(_) => continue,
            Err(RecvError::Lagged(_)) => return,
            Err(RecvError::Closed) => std::future::pending::<()>().await,
        }
    }
}

/// What a live build list's stream carries from one event to the next.
struct LiveList {
    app: AppState,
    session: Session,
    project_id: String,
    status: Option<String>,
    events: tokio::sync::broadcast::Receiver<std::sync::Arc<crate::db::notify::Notification>>,
    last: Option<String>,
    /// Holds this stream's place in the per-session and total bounds until it ends.
    _open: super::live::LiveStream,
}

/// Server-sent events for a live build list: the rows whenever they change.
pub async fn build_events(
    State(app): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    Query(q): Query<BuildsQuery>,
) -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let status = match status_filter(&session, q.status.as_deref()) {
        Ok(status) => status,
        Err(refused) => return *refused,
    };
    // Unknown or foreign projects: 404 before any stream starts.
    if let Err(err) = app.projects.get(&session.principal, Some(&id)).await {
        return error_page(Some(&session), err);
    }
    let open = match app.live_streams.open(&session.principal.token_id) {
        Ok(open) => open,
        Err(refused) => {
            metrics::counter!("kiln_dashboard_live_streams_refused_total").increment(1);
            let text = match refused {
                super::live::Refused::Session(n) => format!(
                    "This session already has {n} live views open; close some tabs, or reload \
                     this page to see the builds without live updates."
                ),
                super::live::Refused::Total => "This server has as many live views open as it \
                     serves; reload the page in a while, or without live updates."
                    .to_string(),
            };
            return problem(
                StatusCode::TOO_MANY_REQUESTS,
                Some(&session),
                "Too many live views",
                &text,
            );
        }
    };
    let deadline = tokio::time::Instant::now() + LIVE_FOR;
    let live = LiveList {
        _open: open,
        events: app.events.subscribe(),
        app,
        session,
        project_id: id,
        status,
        last: None,
    };
    let stream = futures_util::stream::unfold(live, move |mut live| async move {
        loop {
            if live.last.is_some() {
                let woken = tokio::time::timeout(
                    LIVE_FALLBACK,
                    build_changed(&live.app, &mut live.events, &live.project_id),
                );
                if tokio::time::timeout_at(deadline, woken).await.is_err() {
                    return None;
                }
            }
            // A revoked or expired session ends the stream.
            if !live.session.still_valid(&live.app).await {
                return None;
            }
            let rows = match builds_page(
                &live.app,
                &live.session,
                &live.project_id,
                live.status.as_deref(),
                "",
            )
            .await
            {
                // An event's data may not hold a carriage return.
                Ok((shown, _)) => build_rows(&shown.iter().collect::<Vec<_>>())
                    .into_string()
                    .replace('\r', "&#13;"),
                Err(err) => {
                    err.log();
                    return None;
                }
            };
            if live.last.as_deref() != Some(rows.as_str()) {
                let event = Event::default().event("rows").data(rows.clone());
                live.last = Some(rows);
                return Some((Ok::<_, std::convert::Infallible>(event), live));
            }
        }
    });
    secure(
        Sse::new(stream)
            .keep_alive(KeepAlive::default())
            .into_response(),
    )
}

fn describe_policy(provider: &TrustProvider) -> String {
    let what = match provider {
        TrustProvider::GitHub {
            repository_owner,
            repository,
            repository_id,
            ..
        } if repository_id.is_empty() => format!("GitHub {repository_owner}/{repository}"),
        TrustProvider::GitHub {
            repository_owner,
            repository,
            repository_id,
            ..
        } => format!("GitHub {repository_owner}/{repository} (id {repository_id})"),
        TrustProvider::GitLab {
            project_path,
            git_ref,
            ..
        } if git_ref.is_empty() => format!("GitLab {project_path}"),
        TrustProvider::GitLab {
            project_path,
            git_ref,
            ..
        } => format!("GitLab {project_path} ({git_ref})"),
        TrustProvider::CircleCi {
            organization_uuid,
            project_uuid,
            ..
        } => format!("CircleCI {organization_uuid}/{project_uuid}"),
        TrustProvider::Buildkite {
            organization_slug,
            pipeline_slug,
            ..
        } => format!("Buildkite {organization_slug}/{pipeline_slug}"),
    };
    format!("{what} · tokens of {}", provider.issuer())
}

/// A provider's form: its name, title, and fields (name, label, required).
type ProviderForm = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str, bool)],
);

const PROVIDER_FORMS: [ProviderForm; 4] = [
    (
        "github",
        "GitHub Actions",
        &[
            ("repository_owner", "Owner", true),
            ("repository", "Repository", true),
            ("repository_id", "Repository id (optional)", false),
            ("issuer", "Issuer (optional)", false),
        ],
    ),
    (
        "gitlab",
        "GitLab CI",
        &[
            ("project_path", "Project path", true),
            ("ref", "Ref (optional)", false),
            ("issuer", "Issuer (optional)", false),
        ],
    ),
    (
        "circleci",
        "CircleCI",
        &[
            ("organization_uuid", "Organization UUID", true),
            ("project_uuid", "Project UUID", true),
            ("issuer", "Issuer (optional)", false),
        ],
    ),
    (
        "buildkite",
        "Buildkite",
        &[
            ("organization_slug", "Organization slug", true),
            ("pipeline_slug", "Pipeline slug", true),
            ("issuer", "Issuer (optional)", false),
        ],
    ),
];

/// One small form per provider: each has its own fields, and no script is needed.
fn trust_section(
    session: &Session,
    project: &Project,
    policies: &[crate::projects::trust::TrustPolicy],
    error: Option<&str>,
) -> Markup {
    let action = format!("/dashboard/projects/{}/trust-policies", project.id);
    html! {
        section.card {
            h2 { "Trust relationships" }
            p.muted { "CI jobs whose OIDC token matches one of these build this project without a Kiln token." }
            @if let Some(error) = error { p.error role="alert" { (error) } }
            table {
                tbody {
                    @for policy in policies {
                        tr {
                            td { (describe_policy(&policy.provider)) }
                            td {
                                form method="post" action=(format!("{action}/{}/remove", policy.id)) {
                                    input type="hidden" name="csrf" value=(session.csrf);
                                    button.secondary type="submit" { "Remove" }
                                }
                            }
                        }
                    }
                }
            }
            @if policies.is_empty() { p.muted { "None yet." } }
            div.grid {
                @for (provider, title, fields) in PROVIDER_FORMS {
                    form method="post" action=(action) {
                        h3 { (title) }
                        input type="hidden" name="csrf" value=(session.csrf);
                        input type="hidden" name="provider" value=(provider);
                        @for (name, label, required) in fields {
                            @let id = format!("{provider}-{name}");
                            label for=(id) { (label) }
                            input id=(id) type="text" name=(name) maxlength="200" required[*required];
                        }
                        p { button.secondary type="submit" { "Trust " (title) } }
                    }
                }
            }
        }
    }
}

#[derive(Deserialize)]
pub struct TrustForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    provider: String,
    #[serde(default)]
    repository_owner: String,
    #[serde(default)]
    repository: String,
    #[serde(default)]
    repository_id: String,
    #[serde(default)]
    project_path: String,
    #[serde(default, rename = "ref")]
    git_ref: String,
    #[serde(default)]
    organization_uuid: String,
    #[serde(default)]
    project_uuid: String,
    #[serde(default)]
    organization_slug: String,
    #[serde(default)]
    pipeline_slug: String,
    /// Empty: the one issuer of the provider this Kiln trusts.
    #[serde(default)]
    issuer: String,
}

pub async fn add_trust_policy(
    State(app): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    headers: HeaderMap,
    Form(form): Form<TrustForm>,
) -> Response {
    if let Some(refused) = refuse_forged(&app, &session, &headers, &form.csrf) {
        return refused;
    }
    let t = |s: &str| s.trim().to_string();
    let provider = match form.provider.as_str() {
        "github" => Ok(TrustProvider::GitHub {
            repository_owner: t(&form.repository_owner),
            repository: t(&form.repository),
            repository_id: t(&form.repository_id),
            issuer: t(&form.issuer),
        }),
        "gitlab" => Ok(TrustProvider::GitLab {
            project_path: t(&form.project_path),
            git_ref: t(&form.git_ref),
            issuer: t(&form.issuer),
        }),
        "circleci" => Ok(TrustProvider::CircleCi {
            organization_uuid: t(&form.organization_uuid),
            project_uuid: t(&form.project_uuid),
            issuer: t(&form.issuer),
        }),
        "buildkite" => Ok(TrustProvider::Buildkite {
            organization_slug: t(&form.organization_slug),
            pipeline_slug: t(&form.pipeline_slug),
            issuer: t(&form.issuer),
        }),
        _ => Err(Error::invalid(
            "provider",
            "choose GitHub, GitLab, CircleCI or Buildkite",
        )),
    };
    let result = match provider {
        Ok(provider) => app
            .projects
            .add_trust_policy(&session.principal, Some(&id), provider)
            .await
            .map(|_| ()),
        Err(err) => Err(err),
    };
    match result {
        Ok(()) => back_to_project(&id, "trusted"),
        Err(err @ (Error::InvalidArgument { .. } | Error::AlreadyExists(_))) => {
            let message = err.to_string();
            let feedback = Feedback {
                trust_error: Some(&message),
                ..Default::default()
            };
            refused_on_project(&app, &session, &id, &feedback).await
        }
        Err(err) => error_page(Some(&session), err),
    }
}

pub async fn remove_trust_policy(
    State(app): State<AppState>,
    session: Session,
    Path((id, policy)): Path<(String, String)>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Some(refused) = refuse_forged(&app, &session, &headers, &form.csrf) {
        return refused;
    }
    match app
        .projects
        .remove_trust_policy(&session.principal, Some(&id), &policy)
        .await
    {
        Ok(()) => back_to_project(&id, "untrusted"),
        Err(err) => error_page(Some(&session), err),
    }
}

/// Build minutes and minutes saved per day over the last 30 days, as an SVG bar chart
/// with the figures in a table beside it (for screen readers and exact numbers).
pub async fn usage(
    State(app): State<AppState>,
    session: Session,
    Path(id): Path<String>,
) -> Response {
    let principal = &session.principal;
    let project = match app.projects.get(principal, Some(&id)).await {
        Ok(project) => project,
        Err(err) => return error_page(Some(&session), err),
    };
    let today = chrono::Utc::now().date_naive();
    let first = today - chrono::Duration::days(29);
    let start = first.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc();
    let range = match crate::usage::Range::new(Some(start), None) {
        Ok(range) => range,
        Err(err) => return error_page(Some(&session), err),
    };
    let days = match app.usage.project_daily(principal, &id, range).await {
        Ok(days) => days,
        Err(err) => return error_page(Some(&session), err),
    };
    let minutes = |s: i64| s as f64 / 60.0;
    let top = days
        .iter()
        .map(|d| minutes(d.build_seconds).max(minutes(d.saved_seconds)))
        .fold(1.0_f64, f64::max);
    let body = html! {
        p { a href=(format!("/dashboard/projects/{id}")) { "← " (project.name) } }
        h1 { "Usage of " (project.name) }
        section.card {
            h2 { "Build minutes and minutes saved, last 30 days" }
            svg.usage viewBox="0 0 900 220" role="img"
                aria-label="Build minutes (dark) and minutes saved by the cache (light) per day" {
                @for offset in 0..30i64 {
                    @let day = first + chrono::Duration::days(offset);
                    @let x = 10.0 + offset as f64 * 29.5;
                    @if let Some(d) = days.iter().find(|d| d.day == day) {
                        @let built = minutes(d.build_seconds) / top * 190.0;
                        @let saved = minutes(d.saved_seconds) / top * 190.0;
                        rect.run x=(format!("{x:.1}")) y=(format!("{:.1}", 200.0 - built)) width="12" height=(format!("{built:.1}")) {
                            title { (day) ": " (format!("{:.1}", minutes(d.build_seconds))) " build minutes" }
                        }
                        rect.cached x=(format!("{:.1}", x + 13.0)) y=(format!("{:.1}", 200.0 - saved)) width="12" height=(format!("{saved:.1}")) {
                            title { (day) ": " (format!("{:.1}", minutes(d.saved_seconds))) " minutes saved" }
                        }
                    }
                    @if offset % 5 == 0 { text x=(format!("{x:.1}")) y="215" { (day.format("%m-%d")) } }
                }
            }
            table {
                thead { tr { th { "Day (UTC)" } th { "Builds" } th { "Build minutes" } th { "Minutes saved" } } }
                tbody {
                    @for d in &days {
                        tr {
                            td { (d.day) }
                            td { (d.builds) }
                            td { (format!("{:.1}", minutes(d.build_seconds))) }
                            td { (format!("{:.1}", minutes(d.saved_seconds))) }
                        }
                    }
                }
            }
            @if days.is_empty() { p.muted { "No finished builds in the last 30 days." } }
        }
    };
    page(
        StatusCode::OK,
        layout(&format!("Usage of {}", project.name), Some(&session), body),
    )
}
