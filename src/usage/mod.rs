//! Usage metering: builds, build time and time saved by cache hits per project, from the
//! hourly aggregate kept as builds finish; cache storage from the allocator's metering.

use chrono::{DateTime, Duration, Utc};
use sqlx::PgPool;

use crate::auth::Principal;
use crate::auth::authz::{self, Action};
use crate::db::usage::{self, ProjectUsage};
use crate::error::{Error, Result};
use crate::pages;
use crate::projects;

/// The longest range one request may cover.
pub const MAX_RANGE_DAYS: i64 = 400;
const PROJECTS_LISTING: &str = "project-usage";

/// A time range [start, end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl Range {
    /// Checks a requested range. Absent bounds default to the start of the current month
    /// (UTC) and now.
    pub fn new(start: Option<DateTime<Utc>>, end: Option<DateTime<Utc>>) -> Result<Range> {
        let now = Utc::now();
        let end = end.unwrap_or(now);
        let start = match start {
            Some(start) => start,
            None => {
                use chrono::Datelike;
                let month = end.date_naive().with_day(1).unwrap_or(end.date_naive());
                month.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc()
            }
        };
        let earliest = DateTime::<Utc>::UNIX_EPOCH;
        let latest = DateTime::from_timestamp(253_402_300_799, 0).unwrap_or(now); // 9999-12-31
        for (field, t) in [("start_at", start), ("end_at", end)] {
            if t < earliest || t > latest {
                return Err(Error::invalid(
                    field,
                    "is out of range: give a time between 1970 and 9999",
                ));
            }
        }
        if start >= end {
            return Err(Error::invalid("start_at", "must be before end_at"));
        }
        if end - start > Duration::days(MAX_RANGE_DAYS) {
            return Err(Error::invalid(
                "end_at",
                format!("a range covers at most {MAX_RANGE_DAYS} days; ask for several"),
            ));
        }
        Ok(Range { start, end })
    }
}

/// The organization-wide view of `GetUsage`.
#[derive(Debug, Clone)]
pub struct UsageReport {
    pub range: Range,
    pub projects: Vec<ProjectUsage>,
    pub cache_used_bytes: i64,
}

/// A page of per-project usage.
#[derive(Debug, Clone)]
pub struct UsagePage {
    pub projects: Vec<ProjectUsage>,
    pub next_page_token: String,
}

pub struct Usage {
    pool: PgPool,
}

/// A project's builds on one UTC day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DailyUsage {
    pub day: chrono::NaiveDate,
    pub builds: i64,
    pub build_seconds: i64,
    pub saved_seconds: i64,
}

/// The most projects `report` returns (projects with builds in the range).
const MAX_REPORT_PROJECTS: i64 = 10_000;

impl Usage {
    pub fn new(pool: PgPool) -> Self {
        Usage { pool }
    }

    /// Usage of every project the principal can see that built in the range, and the
    /// cache storage they use now.
    pub async fn report(&self, principal: &Principal, range: Range) -> Result<UsageReport> {
        let visible = authz::visible_projects(principal, Action::ViewProject)?;
        let Some(filter) = projects::filter_for(visible, None) else {
            return Ok(UsageReport {
                range,
                projects: Vec::new(),
                cache_used_bytes: 0,
            });
        };
        let projects = usage::projects(
            &self.pool,
            &filter,
            range.start,
            range.end,
            None,
            MAX_REPORT_PROJECTS,
            false,
        )
        .await?;
        let cache_used_bytes = usage::cache_used_bytes(&self.pool, &filter).await?;
        Ok(UsageReport {
            range,
            projects,
            cache_used_bytes,
        })
    }

    /// One project's usage.
    pub async fn project(
        &self,
        principal: &Principal,
        project_id: &str,
        range: Range,
    ) -> Result<ProjectUsage> {
        let project =
            projects::load_from(&self.pool, principal, project_id, Action::ViewProject).await?;
        let filter = crate::db::projects::ProjectFilter {
            project_ids: Some(vec![project.id.clone()]),
            ..Default::default()
        };
        usage::projects(&self.pool, &filter, range.start, range.end, None, 1, true)
            .await?
            .pop()
            .ok_or_else(|| Error::not_found("project", project_id))
    }

    /// One project's usage per UTC day (days without builds left out).
    pub async fn project_daily(
        &self,
        principal: &Principal,
        project_id: &str,
        range: Range,
    ) -> Result<Vec<DailyUsage>> {
        let project =
            projects::load_from(&self.pool, principal, project_id, Action::ViewProject).await?;
        Ok(
            usage::project_daily(&self.pool, &project.id, range.start, range.end)
                .await?
                .into_iter()
                .map(|(day, builds, build_seconds, saved_seconds)| DailyUsage {
                    day,
                    builds,
                    build_seconds,
                    saved_seconds,
                })
                .collect(),
        )
    }

    /// Usage of every project the principal can see, idle ones included, in pages.
    pub async fn list(
        &self,
        principal: &Principal,
        range: Range,
        page_token: &str,
        page_size: Option<i64>,
    ) -> Result<UsagePage> {
        let size = pages::page_size(page_size, 100)?;
        let after = pages::decode_string(PROJECTS_LISTING, page_token)?;
        let visible = authz::visible_projects(principal, Action::ViewProject)?;
        let Some(filter) = projects::filter_for(visible, None) else {
            return Ok(UsagePage {
                projects: Vec::new(),
                next_page_token: String::new(),
            });
        };
        let mut list = usage::projects(
            &self.pool,
            &filter,
            range.start,
            range.end,
            after.as_deref(),
            size + 1,
            true,
        )
        .await?;
        let next_page_token = if list.len() as i64 > size {
            list.truncate(size as usize);
            list.last()
                .map(|p| pages::encode(PROJECTS_LISTING, &p.project_id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(UsagePage {
            projects: list,
            next_page_token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked() {
        let t = |s: i64| DateTime::from_timestamp(s, 0).unwrap();
        assert!(Range::new(Some(t(100)), Some(t(50))).is_err());
        assert!(Range::new(Some(t(100)), Some(t(100))).is_err());
        assert!(Range::new(Some(t(0)), Some(t(401 * 86_400))).is_err());
        assert!(Range::new(Some(t(-10)), Some(t(3600))).is_err());
        assert!(Range::new(Some(t(300_000_000_000)), None).is_err());
        let r = Range::new(Some(t(0)), Some(t(3600))).unwrap();
        assert_eq!((r.start, r.end), (t(0), t(3600)));
        let month = Range::new(None, Some(t(1_764_633_600 + 3600))).unwrap();
        assert_eq!(month.start, t(1_764_547_200)); // 2025-12-01T00:00Z
    }
}
