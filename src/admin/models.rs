//! `kiln models`: import models into the model registry and list them. Imports call the
//! same domain function as the API's import jobs, as an operator.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{Output, operator};
use crate::app::App;
use crate::config::Config;
use crate::db;
use crate::registry::models::{DirectoryImport, Imported};

#[derive(Debug, Args)]
pub struct ModelsArgs {
    /// Print results as JSON instead of a table
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: ModelsCommand,
}

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Import a model directory as an OCI image (an index for linux/amd64 and linux/arm64,
    /// one layer per large file), tagged with its revision and `latest` (or --tag).
    Import {
        /// The repository name, e.g. sentence-transformers/all-minilm-l6-v2
        name: String,
        /// The model's files
        dir: PathBuf,
        /// The revision this is (e.g. the hub commit); default: derived from the files
        #[arg(long)]
        revision: Option<String>,
        /// Tags to point at it besides the revision (repeatable); default: latest
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        /// Where the model comes from (an URL), recorded in the image's annotations
        #[arg(long)]
        source: Option<String>,
        /// The model's license; default: `license:` of README.md's front matter
        #[arg(long)]
        license: Option<String>,
    },
    /// Import a revision of a Hugging Face-compatible hub repository (models.hub.endpoint),
    /// named and tagged as depot.ai does: the lower-cased id, `latest` and the commit.
    /// Interrupted downloads resume on the next run; every file is checked against the
    /// hub's hashes.
    ImportHub {
        /// The hub's repository id, e.g. sentence-transformers/all-MiniLM-L6-v2
        repository: String,
        /// A branch, tag or commit; default main
        #[arg(long)]
        revision: Option<String>,
        /// Serve it under this name instead of the lower-cased repository id
        #[arg(long)]
        name: Option<String>,
    },
    /// List models with their current revision and the line that embeds each one
    List,
}

fn report(out: &Output, imported: &Imported, started: std::time::Instant) {
    out.rows(std::slice::from_ref(imported));
    if !out.json {
        eprintln!(
            "imported in {:.2} s; embed it with:\n    {}",
            started.elapsed().as_secs_f64(),
            imported.copy_from
        );
    }
}

pub async fn run(config: Config, args: ModelsArgs) -> anyhow::Result<()> {
    let pool = db::lazy_pool(&config.database)?;
    anyhow::ensure!(
        db::is_migrated(&pool).await?,
        "the database is not migrated to this version of kiln; run `kiln migrate` first"
    );
    let app = App::new(config, pool);
    let out = Output { json: args.json };
    let me = operator();
    match args.command {
        ModelsCommand::Import {
            name,
            dir,
            revision,
            tags,
            source,
            license,
        } => {
            let started = std::time::Instant::now();
            let imported = app
                .models
                .import_directory(
                    &me,
                    DirectoryImport {
                        name,
                        source: source.or_else(|| {
                            dir.canonicalize()
                                .ok()
                                .map(|d| format!("file://{}", d.display()))
                        }),
                        dir,
                        revision,
                        tags,
                        license,
                        hub_repository: None,
                    },
                )
                .await?;
            report(&out, &imported, started);
        }
        ModelsCommand::ImportHub {
            repository,
            revision,
            name,
        } => {
            let started = std::time::Instant::now();
            let imported = app
                .models
                .import_from_hub(
                    &me,
                    crate::registry::models::HubImport {
                        repository,
                        revision,
                        name,
                    },
                )
                .await?;
            report(&out, &imported, started);
        }
        ModelsCommand::List => {
            let models = app.models.list(Some(&me)).await?;
            let rows: Vec<serde_json::Value> = models
                .iter()
                .map(|m| {
                    serde_json::json!({
                        "name": m.name, "revision": m.revision, "files": m.file_count,
                        "size_bytes": m.file_bytes, "pulls": m.pull_count,
                        "copy_from": app.models.copy_from_line(&m.name, "latest"),
                    })
                })
                .collect();
            out.rows(&rows);
        }
    }
    Ok(())
}
