//! What happened in a build, for the public API and the dashboard: its steps in the
//! order BuildKit reported them and each step's log lines, both in keyset pages; and the
//! log lines themselves, taken from the BuildKit status stream the depot CLI uploads.

use super::Builds;
use crate::auth::Principal;
use crate::auth::authz::Action;
use crate::db::builds::{self, LogLine, NewLogLine, StepRow};
use crate::error::{Error, Result};
use crate::pages;

const STEPS_LISTING: &str = "build-steps";
const LOGS_LISTING: &str = "step-logs";

/// Longest log line kept, in bytes; longer lines are cut (at a character boundary).
pub const MAX_LOG_LINE_BYTES: usize = 8 * 1024;
/// Most log lines stored from one status report.
const MAX_LOG_LINES_PER_REPORT: usize = 10_000;

/// One page of a build's steps.
#[derive(Debug, Clone)]
pub struct StepPage {
    pub steps: Vec<StepRow>,
    /// `None` on the last page.
    pub next_page_token: Option<String>,
}

/// One page of a step's log lines.
#[derive(Debug, Clone)]
pub struct LogPage {
    pub lines: Vec<LogLine>,
    pub next_page_token: Option<String>,
}

impl Builds {
    /// The build, checked to belong to `project_id` when one is given (a build of
    /// another project is `not_found`, as an unknown one is).
    async fn readable(
        &self,
        principal: &Principal,
        project_id: Option<&str>,
        build_id: &str,
    ) -> Result<String> {
        let build = self
            .authorize(principal, build_id, Action::ViewBuild)
            .await?;
        if let Some(project) = project_id.filter(|p| !p.is_empty())
            && project != build.project_id
        {
            return Err(Error::not_found("build", build_id));
        }
        Ok(build.id.clone())
    }

    /// A build and, while it runs, its step counts so far (total, cached); a finished
    /// build carries its own.
    pub async fn get_with_step_counts(
        &self,
        principal: &Principal,
        build_id: &str,
    ) -> Result<(crate::db::builds::Build, Option<(i32, i32)>)> {
        let build = self.get(principal, build_id).await?;
        let live = match build.total_steps {
            Some(_) => None,
            None => Some(builds::live_step_counts(&self.pool, &build.id).await?),
        };
        Ok((build, live))
    }

    /// A page of a build's steps, in the order they were first reported.
    pub async fn steps_page(
        &self,
        principal: &Principal,
        project_id: Option<&str>,
        build_id: &str,
        page_token: &str,
        page_size: Option<i64>,
    ) -> Result<StepPage> {
        let size = pages::page_size(page_size, 100)?;
        let after = pages::decode_number(STEPS_LISTING, page_token)?;
        let id = self.readable(principal, project_id, build_id).await?;
        let mut steps = builds::steps_page(&self.pool, &id, after, size + 1).await?;
        let next_page_token = (steps.len() as i64 > size).then(|| {
            steps.truncate(size as usize);
            pages::encode_number(STEPS_LISTING, steps.last().map_or(0, |s| s.position))
        });
        Ok(StepPage {
            steps,
            next_page_token,
        })
    }

    /// A page of one step's log lines, oldest first.
    pub async fn step_logs(
        &self,
        principal: &Principal,
        project_id: Option<&str>,
        build_id: &str,
        digest: &str,
        page_token: &str,
        page_size: Option<i64>,
    ) -> Result<LogPage> {
        let size = pages::page_size(page_size, 500)?;
        let after = i32::try_from(pages::decode_number(LOGS_LISTING, page_token)?)
            .map_err(|_| Error::invalid("page_token", "is out of range"))?;
        if digest.is_empty() {
            return Err(Error::invalid("build_step_digest", "is required"));
        }
        let id = self.readable(principal, project_id, build_id).await?;
        let mut lines = builds::step_logs(&self.pool, &id, digest, after, size + 1).await?;
        let next_page_token = (lines.len() as i64 > size).then(|| {
            lines.truncate(size as usize);
            pages::encode_number(LOGS_LISTING, lines.last().map_or(0, |l| i64::from(l.seq)))
        });
        Ok(LogPage {
            lines,
            next_page_token,
        })
    }

    /// The end of each step's log, for a page that shows a whole build: the last
    /// `per_step` lines of each step, `total` lines at most, lines cut to
    /// `max_chars` characters.
    pub async fn log_tails(
        &self,
        principal: &Principal,
        project_id: Option<&str>,
        build_id: &str,
        (per_step, total, max_chars): (i64, i64, i32),
    ) -> Result<Vec<(String, LogLine)>> {
        let id = self.readable(principal, project_id, build_id).await?;
        builds::log_tails(&self.pool, &id, per_step, total, max_chars).await
    }

    /// Stores step log lines the CLI reports, bounded per step and per build
    /// (`builds.log_lines_per_step`, `builds.log_lines_per_build`).
    pub async fn record_logs(
        &self,
        principal: &Principal,
        build_id: &str,
        lines: Vec<NewLogLine>,
    ) -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let build = self
            .authorize(principal, build_id, Action::WriteBuild)
            .await?;
        let lines: Vec<NewLogLine> = lines.into_iter().take(MAX_LOG_LINES_PER_REPORT).collect();
        let stored = builds::append_logs(
            &self.pool,
            &build.id,
            &lines,
            self.config.log_lines_per_step,
            self.config.log_lines_per_build,
        )
        .await?;
        if stored < lines.len() {
            metrics::counter!("kiln_build_log_lines_dropped_total")
                .increment((lines.len() - stored) as u64);
        }
        Ok(())
    }
}

/// Cuts `line` to at most `max` bytes at a character boundary.
pub fn cut_line(line: &str, max: usize) -> &str {
    if line.len() <= max {
        return line;
    }
    let mut end = max;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    &line[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_cut_at_character_boundaries() {
        assert_eq!(cut_line("abc", 8), "abc");
        assert_eq!(cut_line("abcdef", 3), "abc");
        assert_eq!(cut_line("aé", 2), "a");
    }
}
