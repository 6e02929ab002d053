//! `df preheat`: start a preheat job on the node, or follow one to its end.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use df_node::api::client::ApiClient;
use df_node::preheat::{JobState, PreheatJob, PreheatRequest, PreheatScope, PreheatTarget};
use indicatif::{ProgressBar, ProgressStyle};

use crate::args::{ClientApi, PreheatArgs, parse_header};
use crate::get;

/// The request `args` describe (without contacting anything).
pub(crate) fn request(args: &PreheatArgs, password: Option<String>) -> Result<PreheatRequest> {
    let scope: PreheatScope = args.scope.parse().map_err(|e: String| anyhow!(e))?;
    let target = match (&args.url, &args.image) {
        (Some(_), None) if args.platform.is_some() || args.username.is_some() => {
            bail!("--platform and --username go with --image")
        }
        (Some(url), None) => PreheatTarget::File {
            url: url.clone(),
            headers: args
                .headers
                .iter()
                .map(|h| parse_header(h))
                .collect::<Result<_>>()?,
            tag: args.tag.clone(),
            filtered_query_params: args.filtered_query_params.clone(),
            digest: args
                .digest
                .as_deref()
                .map(|d| d.parse().map_err(|e| anyhow!("{e}")))
                .transpose()?,
        },
        (None, Some(image)) => {
            if args.username.is_some() && password.is_none() {
                bail!("--username needs the password in $DF_REGISTRY_PASSWORD");
            }
            PreheatTarget::Image {
                image: image.clone(),
                platform: args.platform.clone(),
                username: args.username.clone(),
                password: args.username.as_ref().and(password),
            }
        }
        _ => bail!("give a URL or --image"),
    };
    Ok(PreheatRequest {
        target,
        scope,
        timeout_secs: args.timeout,
    })
}

pub(crate) async fn run(args: PreheatArgs) -> Result<()> {
    let api =
        ClientApi::from_env(args.node.api.as_deref(), args.node.api_token.as_deref())?.client()?;
    let job = match &args.job {
        Some(id) => api.preheat_job(id).await.map_err(get::describe)?,
        None => {
            let req = request(&args, std::env::var("DF_REGISTRY_PASSWORD").ok())?;
            let job = api.preheat(&req).await.map_err(get::describe)?;
            eprintln!("preheat job {} started ({})", job.id, job.target);
            job
        }
    };
    if !args.wait {
        println!("{}", serde_json::to_string_pretty(&job)?);
        return Ok(());
    }
    let job = follow(&api, job).await?;
    report(&job);
    match job.state {
        JobState::Succeeded => Ok(()),
        _ => bail!(
            "preheat job {} failed: {}",
            job.id,
            job.error.as_deref().unwrap_or("unknown error")
        ),
    }
}

/// Polls the job until it ends, drawing pieces held over pieces wanted on every host.
async fn follow(api: &ApiClient, mut job: PreheatJob) -> Result<PreheatJob> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} pieces on all hosts {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    loop {
        let (done, total) = job.pieces();
        bar.set_length(total.max(1));
        bar.set_position(done);
        let tasks_done = job.tasks.iter().filter(|t| t.state.is_finished()).count();
        bar.set_message(format!("{tasks_done}/{} tasks", job.tasks.len()));
        if job.state.is_finished() {
            bar.finish_and_clear();
            return Ok(job);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        job = api
            .preheat_job(&job.id)
            .await
            .map_err(get::describe)
            .with_context(|| format!("following preheat job {}", job.id))?;
    }
}

/// One line per task, then one per host that failed.
fn report(job: &PreheatJob) {
    for t in &job.tasks {
        let hosts_ok = t
            .hosts
            .iter()
            .filter(|h| h.state == JobState::Succeeded)
            .count();
        let state = match t.state {
            JobState::Succeeded => "ok",
            JobState::Failed => "FAILED",
            _ => "…",
        };
        println!(
            "{state:<6} {:<24} {} hosts {hosts_ok}/{} {}",
            t.what,
            t.id,
            t.hosts.len(),
            t.error.as_deref().unwrap_or("")
        );
        for h in t.hosts.iter().filter(|h| h.state == JobState::Failed) {
            println!(
                "         host {}: {}",
                h.peer,
                h.error.as_deref().unwrap_or("failed")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::Cli;
    use clap::Parser;

    fn args(v: &[&str]) -> PreheatArgs {
        match Cli::try_parse_from(v).unwrap().command {
            crate::args::Command::Preheat(a) => a,
            _ => panic!("not preheat"),
        }
    }

    #[test]
    fn flags_become_the_api_request() {
        let r = request(
            &args(&[
                "df",
                "preheat",
                "https://h/f?sig=1",
                "-H",
                "Authorization: Bearer x",
                "--filtered-query-param",
                "sig",
                "--scope",
                "all_peers",
            ]),
            None,
        )
        .unwrap();
        assert_eq!(r.scope, PreheatScope::AllPeers);
        match r.target {
            PreheatTarget::File {
                url,
                headers,
                filtered_query_params,
                ..
            } => {
                assert_eq!(url, "https://h/f?sig=1");
                assert_eq!(headers, vec![("Authorization".into(), "Bearer x".into())]);
                assert_eq!(filtered_query_params, vec!["sig".to_owned()]);
            }
            _ => panic!("not a file"),
        }
        let a = args(&[
            "df",
            "preheat",
            "--image",
            "reg.example/app:1",
            "--platform",
            "linux/arm64",
            "--username",
            "alice",
        ]);
        assert!(request(&a, None).is_err(), "a user name without a password");
        let r = request(&a, Some("pw".into())).unwrap();
        assert!(matches!(
            r.target,
            PreheatTarget::Image { password: Some(ref p), .. } if p == "pw"
        ));
        assert!(
            request(
                &args(&["df", "preheat", "https://h/f", "--scope", "all"]),
                None
            )
            .is_err()
        );
        assert!(Cli::try_parse_from(["df", "preheat"]).is_err());
        assert!(
            Cli::try_parse_from(["df", "preheat", "https://h/f", "--image", "r.example/a"])
                .is_err()
        );
        assert!(
            request(
                &args(&["df", "preheat", "--platform", "linux/amd64", "https://h/f"]),
                None
            )
            .is_err()
        );
    }
}
