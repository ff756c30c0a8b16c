//! Operations pages: an organization's (its owners) with the builder machines serving its
//! projects and its audit log, and the installation's (server admins) with every machine,
//! warm pools included, and every audit event. Machines can be drained; the audit log is
//! filtered and paged.

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::{DateTime, NaiveDate, Utc};
use maud::{Markup, html};
use serde::Deserialize;

use super::pages::{CsrfForm, refuse_forged, state_label};
use super::web::{Session, error_page, layout, page, secure};
use crate::app::AppState;
use crate::db::audit::{AuditFilter, AuditRecord};
use crate::db::machines::MachineInfo;
use crate::error::Error;

/// Audit events per page.
const AUDIT_PAGE: i64 = 50;

#[derive(Deserialize, Default)]
pub struct OperationsQuery {
    #[serde(default)]
    action: String,
    #[serde(default)]
    target_kind: String,
    #[serde(default)]
    target_id: String,
    #[serde(default)]
    actor_id: String,
    #[serde(default)]
    since: String,
    #[serde(default)]
    until: String,
    #[serde(default)]
    page_token: String,
    drained: Option<String>,
}

impl OperationsQuery {
    /// The filter, or the field that is wrong and why.
    fn filter(&self) -> Result<AuditFilter, (&'static str, String)> {
        let text = |s: &str| Some(s.trim().to_string()).filter(|s| !s.is_empty());
        Ok(AuditFilter {
            action: text(&self.action),
            target_kind: text(&self.target_kind),
            target_id: text(&self.target_id),
            actor_id: text(&self.actor_id),
            since: day_or_time("since", &self.since)?,
            until: day_or_time("until", &self.until)?,
        })
    }

    /// This page's filters as a query string (for the next page's link).
    fn query_string(&self) -> String {
        url::form_urlencoded::Serializer::new(String::new())
            .append_pair("action", &self.action)
            .append_pair("target_kind", &self.target_kind)
            .append_pair("target_id", &self.target_id)
            .append_pair("actor_id", &self.actor_id)
            .append_pair("since", &self.since)
            .append_pair("until", &self.until)
            .finish()
    }
}

/// A date input's value (`2026-12-01`, midnight UTC) or an RFC 3339 time.
fn day_or_time(
    field: &'static str,
    value: &str,
) -> Result<Option<DateTime<Utc>>, (&'static str, String)> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    if let Ok(day) = NaiveDate::parse_from_str(value, "%Y-%m-%d") {
        return Ok(day.and_hms_opt(0, 0, 0).map(|t| t.and_utc()));
    }
    DateTime::parse_from_rfc3339(value)
        .map(|t| Some(t.with_timezone(&Utc)))
        .map_err(|_| (field, "Enter a date such as 2026-12-01.".to_string()))
}

fn age(since: DateTime<Utc>) -> String {
    let minutes = (Utc::now() - since).num_minutes().max(0);
    match minutes {
        m if m < 60 => format!("{m} min"),
        m if m < 48 * 60 => format!("{} h {} min", m / 60, m % 60),
        m => format!("{} days", m / (24 * 60)),
    }
}

fn machines_section(
    session: &Session,
    scope: &Scope,
    machines: &[MachineInfo],
    names: &[(String, String)],
) -> Markup {
    let project_name = |id: &str| {
        names
            .iter()
            .find(|(pid, _)| pid == id)
            .map_or(id.to_string(), |(_, name)| name.clone())
    };
    html! {
        section.card {
            h2 { "Builder machines" }
            p.muted {
                @if matches!(scope, Scope::Installation) { "Every live machine, warm pools included. " } @else { "Machines serving this organization's projects. " }
                "A drained machine takes no new builds and is terminated once its builds finish; the next build gets a fresh one."
            }
            table {
                thead { tr { th { "Machine" } th { "State" } th { "Project" } th { "Platform" } th { "Builds" } th { "Age" } th {} } }
                tbody {
                    @for machine in machines {
                        tr {
                            td { span.code { (machine.id) } @if let Some(error) = &machine.error { br; span.error { (error) } } }
                            td { (state_label(&machine.state)) }
                            td {
                                @if let Some(project) = &machine.project_id {
                                    @if matches!(scope, Scope::Installation) { span.code { (project) } }
                                    @else { a href=(format!("/dashboard/projects/{project}")) { (project_name(project)) } }
                                } @else { span.muted { "warm pool" } }
                            }
                            td { (machine.platform) }
                            td { (machine.active_builds) }
                            td { (age(machine.created_at)) }
                            td {
                                @if matches!(machine.state.as_str(), "ready" | "assigned") {
                                    form method="post" action=(scope.drain_path(&machine.id)) {
                                        input type="hidden" name="csrf" value=(session.csrf);
                                        button.secondary type="submit" aria-label=(format!("Drain machine {}", machine.id)) { "Drain" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            @if machines.is_empty() { p.muted { "No live machines." } }
        }
    }
}

fn text_filter(label: &str, name: &str, value: &str, placeholder: &str) -> Markup {
    html! {
        div {
            label for=(format!("audit-{name}")) { (label) }
            input id=(format!("audit-{name}")) type="text" name=(name) value=(value) placeholder=(placeholder) maxlength="200";
        }
    }
}

fn date_filter(label: &str, name: &str, value: &str, error: Option<&str>) -> Markup {
    html! {
        div {
            label for=(format!("audit-{name}")) { (label) }
            input id=(format!("audit-{name}")) type="date" name=(name) value=(value)
                aria-invalid=(if error.is_some() { "true" } else { "false" });
            @if let Some(error) = error { p.error role="alert" { (error) } }
        }
    }
}

fn audit_section(
    scope: &Scope,
    q: &OperationsQuery,
    events: &[AuditRecord],
    next_page_token: &str,
    error: Option<(&str, &str)>,
) -> Markup {
    let error_of = |field: &str| error.filter(|(f, _)| *f == field).map(|(_, e)| e);
    html! {
        section.card {
            h2 #audit { "Audit log" }
            form.filters method="get" action="#audit" {
                (text_filter("Action", "action", &q.action, "project.update"))
                (text_filter("Target kind", "target_kind", &q.target_kind, "project"))
                (text_filter("Target id", "target_id", &q.target_id, ""))
                (text_filter("Actor id", "actor_id", &q.actor_id, ""))
                (date_filter("From (UTC)", "since", &q.since, error_of("since")))
                (date_filter("Before (UTC)", "until", &q.until, error_of("until")))
                div { button.secondary type="submit" { "Filter" } }
            }
            @if let Some((field, message)) = error.filter(|(f, _)| !matches!(*f, "since" | "until")) {
                p.error role="alert" { (field) ": " (message) }
            }
            table {
                thead { tr {
                    th { "When (UTC)" } th { "Action" } th { "Actor" }
                    @if matches!(scope, Scope::Installation) { th { "Organization" } }
                    th { "Target" } th { "Details" }
                } }
                tbody {
                    @for event in events {
                        tr {
                            td { (event.occurred_at.format("%Y-%m-%d %H:%M:%S")) }
                            td { span.code.nowrap { (event.action) } }
                            td { (event.actor_kind) " " span.code { (event.actor_id.as_deref().unwrap_or_default()) } }
                            @if matches!(scope, Scope::Installation) { td { span.code { (event.organization_id.as_deref().unwrap_or_default()) } } }
                            td { (event.target_kind.as_deref().unwrap_or_default()) " " span.code { (event.target_id.as_deref().unwrap_or_default()) } }
                            td { @if !event.details.is_null() { span.code.details { (truncated(&event.details.to_string(), 300)) } } }
                        }
                    }
                }
            }
            @if events.is_empty() { p.muted { "No events match." } }
            @if !next_page_token.is_empty() {
                p { a href=(format!("{}?{}&page_token={}#audit", scope.path(), q.query_string(), next_page_token)) { "Older events →" } }
            }
        }
    }
}

fn truncated(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

/// Whose operations a page shows.
enum Scope {
    Organization(String),
    Installation,
}

impl Scope {
    fn path(&self) -> String {
        match self {
            Scope::Organization(id) => format!("/dashboard/organizations/{id}/operations"),
            Scope::Installation => "/dashboard/operations".into(),
        }
    }

    fn drain_path(&self, machine: &str) -> String {
        match self {
            Scope::Organization(id) => {
                format!("/dashboard/organizations/{id}/machines/{machine}/drain")
            }
            Scope::Installation => format!("/dashboard/operations/machines/{machine}/drain"),
        }
    }
}

/// An organization's operations page (its owners).
pub async fn operations(
    State(app): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    Query(q): Query<OperationsQuery>,
) -> Response {
    render(&app, &session, Scope::Organization(id), &q).await
}

/// The installation's operations page (server admins).
pub async fn installation(
    State(app): State<AppState>,
    session: Session,
    Query(q): Query<OperationsQuery>,
) -> Response {
    render(&app, &session, Scope::Installation, &q).await
}

async fn render(app: &AppState, session: &Session, scope: Scope, q: &OperationsQuery) -> Response {
    let principal = &session.principal;
    let (title, organization_id, machines, names) = match &scope {
        Scope::Organization(id) => {
            let organization = match app.orgs.list(principal).await {
                Ok(orgs) => match orgs.into_iter().find(|o| o.id == *id) {
                    Some(org) => org,
                    None => return error_page(Some(session), Error::not_found("organization", id)),
                },
                Err(err) => return error_page(Some(session), err),
            };
            let machines = match app
                .scheduler
                .organization_machines(principal, id, None)
                .await
            {
                Ok(machines) => machines,
                Err(err) => return error_page(Some(session), err),
            };
            let names: Vec<(String, String)> = match app.projects.list(principal, Some(id)).await {
                Ok(projects) => projects.into_iter().map(|p| (p.id, p.name)).collect(),
                Err(err) => return error_page(Some(session), err),
            };
            (
                format!("Operations of {}", organization.name),
                Some(id.as_str()),
                machines,
                names,
            )
        }
        Scope::Installation => {
            let machines = match app.scheduler.machines(principal, None).await {
                Ok(machines) => machines,
                Err(err) => return error_page(Some(session), err),
            };
            (
                "Operations of this installation".to_string(),
                None,
                machines,
                Vec::new(),
            )
        }
    };
    let (status, events, next, error) = match q.filter() {
        Ok(filter) => match app
            .orgs
            .audit_events(
                principal,
                organization_id,
                &filter,
                &q.page_token,
                Some(AUDIT_PAGE),
            )
            .await
        {
            Ok(page) => (StatusCode::OK, page.events, page.next_page_token, None),
            Err(Error::InvalidArgument { field, reason }) => (
                StatusCode::BAD_REQUEST,
                Vec::new(),
                String::new(),
                Some((field, reason)),
            ),
            Err(err) => return error_page(Some(session), err),
        },
        Err((field, reason)) => (
            StatusCode::BAD_REQUEST,
            Vec::new(),
            String::new(),
            Some((field.to_string(), reason)),
        ),
    };
    let notice = match q.drained.as_deref() {
        Some("1") => Some("Machine drained: it takes no new builds and goes once they finish."),
        Some("0") => Some("That machine was not ready or assigned any more; nothing changed."),
        _ => None,
    };
    let body = html! {
        p { a href="/dashboard" { "← Projects" } }
        h1 { (title) }
        @if let Some(notice) = notice { p.notice role="status" { (notice) } }
        (machines_section(session, &scope, &machines, &names))
        (audit_section(&scope, q, &events, &next, error.as_ref().map(|(f, r)| (f.as_str(), r.as_str()))))
    };
    page(status, layout(&title, Some(session), body))
}

async fn drain_and_return(
    app: &AppState,
    session: &Session,
    scope: Scope,
    machine: &str,
) -> Response {
    match app.scheduler.drain(&session.principal, machine).await {
        Ok(drained) => secure(
            Redirect::to(&format!("{}?drained={}", scope.path(), u8::from(drained)))
                .into_response(),
        ),
        Err(err) => error_page(Some(session), err),
    }
}

/// Drains one machine serving the organization's projects.
pub async fn drain(
    State(app): State<AppState>,
    session: Session,
    Path((id, machine)): Path<(String, String)>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Some(refused) = refuse_forged(&app, &session, &headers, &form.csrf) {
        return refused;
    }
    drain_and_return(&app, &session, Scope::Organization(id), &machine).await
}

/// Drains any machine (server admins).
pub async fn drain_any(
    State(app): State<AppState>,
    session: Session,
    Path(machine): Path<String>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Some(refused) = refuse_forged(&app, &session, &headers, &form.csrf) {
        return refused;
    }
    drain_and_return(&app, &session, Scope::Installation, &machine).await
}
