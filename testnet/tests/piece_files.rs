//! `GET /v1/tasks/{id}/files`: a node lists each verified piece with the file holding it (and
//! where in it), as the pieces arrive, for a client on its host to copy or link (`df get -o`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::Result;
use df_node::api::client::{ApiClient, ApiError};
use df_node::content::ListOrder;
use df_node::{DownloadRequest, Role, TaskError};
use df_testnet::{TestNode, TestOrigin, content, sha256_hex};
use futures::StreamExt;

const MIB: usize = 1 << 20;

/// A digest task fetched from a slow origin: the listing starts while the task still downloads,
/// names every piece once with the file holding its bytes — the task's content file, each piece at
/// its offset in the content — and names the last piece last
/// (only once the whole content has matched its digest).
#[tokio::test(flavor = "multi_thread")]
async fn pieces_are_listed_as_they_arrive_and_the_digests_last_piece_last() -> Result<()> {
    let origin = TestOrigin::start().await?;
    let data = content(6 * MIB + 5, 31);
    origin.put("/files.bin", data.clone());
    // Slow enough (per range response) that the listing certainly starts before the end.
    origin.set_rate(MIB as u64);
    let node = TestNode::start(Role::Node, vec![], |_| {}).await?;
    let api = ApiClient::new(node.node.api_addr());
    let req = DownloadRequest {
        url: origin.url("/files.bin"),
        digest: Some(format!("sha256:{}", sha256_hex(&data)).parse()?),
        ..DownloadRequest::default()
    };
    let info = api.create_task(&req).await?;
    let (len, mut pieces) = api.content_files(&info.id, ListOrder::AsVerified).await?;
    assert_eq!(len, data.len() as u64);
    // A second reader asks for index order, as `df get -O -` does.
    let (_, by_index) = api.content_files(&info.id, ListOrder::ByIndex).await?;
    let by_index = tokio::spawn(by_index.map(|p| p.map(|p| p.index)).collect::<Vec<_>>());

    let mut listed = Vec::new();
    let mut running_at_first = None;
    while let Some(p) = pieces.next().await {
        let p = p?;
        if running_at_first.is_none() {
            running_at_first = Some(api.task(&info.id).await?.state != "complete");
        }
        let path = p.path.clone().expect("the node keeps pieces in files");
        assert_eq!(p.path_offset, p.offset, "piece {}", p.index);
        let mut bytes = vec![0u8; p.length as usize];
        std::os::unix::fs::FileExt::read_exact_at(
            &std::fs::File::open(&path)?,
            &mut bytes,
            p.path_offset,
        )?;
        let at = p.offset as usize;
        assert!(
            bytes == data[at..at + bytes.len()],
            "piece {} differs",
            p.index
        );
        listed.push(p.index);
    }
    assert_eq!(
        running_at_first,
        Some(true),
        "the first piece was listed only after the download"
    );
    let n = info.pieces_total;
    assert!(n >= 2, "{n} pieces");
    let mut sorted = listed.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "listed {listed:?}");
    assert_eq!(listed.last(), Some(&(n - 1)), "listed {listed:?}");
    let by_index: Result<Vec<u32>, _> = by_index.await?.into_iter().collect();
    assert_eq!(by_index?, (0..n).collect::<Vec<_>>());
    Ok(())
}

/// A task that fails ends its listing with the reason; an unknown task is a 404.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_task_ends_its_listing_and_an_unknown_one_is_not_found() -> Result<()> {
    let origin = TestOrigin::start().await?;
    origin.put("/bad.bin", content(3 * MIB, 32));
    let node = TestNode::start(Role::Node, vec![], |_| {}).await?;
    let api = ApiClient::new(node.node.api_addr());
    let req = DownloadRequest {
        url: origin.url("/bad.bin"),
        digest: Some(format!("sha256:{}", "cd".repeat(32)).parse()?),
        ..DownloadRequest::default()
    };
    let info = api.create_task(&req).await?;
    let (_, pieces) = api.content_files(&info.id, ListOrder::AsVerified).await?;
    let all: Vec<_> = pieces.collect().await;
    assert!(
        all.last().is_some_and(|r| r.is_err()),
        "the listing did not end with an error"
    );
    let why = api
        .failure(&info.id, std::time::Duration::from_secs(30))
        .await
        .expect("the task failed");
    assert!(why.to_string().contains("digest mismatch"), "{why}");
    // The last piece never came: a reader holds no byte past what was verified.
    let listed = all.iter().filter(|r| r.is_ok()).count() as u32;
    assert!(
        listed < info.pieces_total,
        "{listed} of {}",
        info.pieces_total
    );

    let other = df_testnet::url_task_key(&origin.url("/never"))?;
    match api
        .content_files(&other.to_string(), ListOrder::AsVerified)
        .await
    {
        Err(ApiError::Task(TaskError::NotFound { .. })) => {}
        r => panic!("an unknown task answered {:?}", r.map(|(l, _)| l)),
    }
    Ok(())
}
