//! The agent's side of `flows` and `flows --follow` on the control socket.

use std::sync::Arc;

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::unix::{OwnedReadHalf, OwnedWriteHalf},
};

use super::{
    ObserveMaps, Observer, clock,
    flows::{self, Filter, Flow, Matcher, View},
    follow,
};

/// Answers a `flows` or `follow` request, as node `node`. The argument is a JSON [`Filter`]
/// (empty: no filter). `flows` answers `{"flows": [...]}` (or `{"error": ...}`); `follow` streams
/// one JSON [`Flow`] per line, for every new flow that matches (see [`follow`]), until the client
/// goes away (`read`, the rest of its side of the socket, ends); a bad filter gets one
/// `{"error": ...}` line.
pub async fn answer_flows(
    follow: bool,
    arg: &str,
    observer: Arc<Observer>,
    node: String,
    read: BufReader<OwnedReadHalf>,
    mut write: OwnedWriteHalf,
) -> anyhow::Result<()> {
    let (filter, matcher) = match parse_request(arg) {
        Ok(fm) => fm,
        Err(e) => {
            let body = serde_json::json!({ "error": e });
            write.write_all(format!("{body}\n").as_bytes()).await?;
            return Ok(());
        }
    };
    if follow {
        return tokio::select! {
            r = answer_follow(&observer, &node, &filter, &matcher, &mut write) => r,
            () = closed(read) => Ok(()),
        };
    }
    let body = match recent(observer, node, matcher).await {
        Ok(f) => serde_json::json!({ "flows": f }),
        Err(e) => serde_json::json!({ "error": format!("{e:#}") }),
    };
    write.write_all(body.to_string().as_bytes()).await?;
    write.shutdown().await?;
    Ok(())
}

/// The filter of a request, checked.
fn parse_request(arg: &str) -> Result<(Filter, Matcher), String> {
    let filter = if arg.trim().is_empty() {
        Filter::default()
    } else {
        serde_json::from_str::<Filter>(arg).map_err(|e| format!("bad filter: {e}"))?
    };
    let matcher = filter.compile().map_err(|e| e.to_string())?;
    Ok((filter, matcher))
}

/// The flows in the flow table now that `matcher` lets through.
async fn recent(
    observer: Arc<Observer>,
    node: String,
    matcher: Matcher,
) -> anyhow::Result<Vec<Flow>> {
    tokio::task::spawn_blocking(move || {
        let maps = ObserveMaps::open(observer.layout())?;
        let resolver = observer.resolver();
        let view = View {
            resolver: &resolver,
            clock: clock(),
            node: &node,
        };
        Ok(flows::select(&maps.flows(), &view, &matcher))
    })
    .await?
}

/// Streams new matching flows as JSON lines until the drop events end or a write fails.
async fn answer_follow(
    observer: &Arc<Observer>,
    node: &str,
    filter: &Filter,
    matcher: &Matcher,
    write: &mut OwnedWriteHalf,
) -> anyhow::Result<()> {
    let obs = observer.clone();
    let sources = follow::Sources {
        drops: observer.subscribe(),
        layout: observer.layout(),
        resolver: move || obs.resolver(),
        node,
        lost: &observer.follow_lost,
    };
    let mut follow = follow::Follow::start(sources, filter).await?;
    while let Some(batch) = follow.next(matcher).await? {
        for flow in batch {
            let mut line = serde_json::to_vec(&flow)?;
            line.push(b'\n');
            write.write_all(&line).await?;
        }
    }
    Ok(())
}

/// Returns once the client has closed its side: a follower that matches nothing never writes, so
/// a write error alone would not end it (and it would read the flow table every second forever).
async fn closed(mut read: BufReader<OwnedReadHalf>) {
    let mut buf = [0u8; 256];
    while let Ok(n) = read.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::UnixStream;

    use super::*;
    use crate::datapath::PinLayout;

    /// A follower whose filter matches nothing new ends when its client goes, instead of waiting
    /// for a write to fail.
    #[tokio::test]
    async fn a_follow_ends_when_its_client_closes() {
        let observer = Observer::new(PinLayout::new("/nonexistent/netpol-test"));
        let (agent_side, client) = UnixStream::pair().unwrap();
        let (read, write) = agent_side.into_split();
        let filter = r#"{"include":{"verdict":["dropped"]}}"#;
        let task = tokio::spawn(async move {
            answer_flows(
                true,
                filter,
                observer,
                "n0".into(),
                BufReader::new(read),
                write,
            )
            .await
        });
        tokio::task::yield_now().await;
        assert!(!task.is_finished(), "it follows while the client is there");
        drop(client);
        let ended = tokio::time::timeout(Duration::from_secs(5), task).await;
        assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
    }

    #[tokio::test]
    async fn a_bad_filter_is_answered_with_the_flag_it_names() {
        let observer = Observer::new(PinLayout::new("/nonexistent/netpol-test"));
        let (agent_side, mut client) = UnixStream::pair().unwrap();
        let (read, write) = agent_side.into_split();
        let filter = r#"{"exclude":{"reason":["nope"]}}"#;
        answer_flows(
            false,
            filter,
            observer,
            "n0".into(),
            BufReader::new(read),
            write,
        )
        .await
        .unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(answer.contains(r#"--not --reason \"nope\""#), "{answer}");
    }
}
