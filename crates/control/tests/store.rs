//! The `Store` contract, checked against both stores: the embedded one in memory
//! and etcd, a real `etcd` process on ports chosen here, stopped by its PID.

use meshgate_control::store::{Change, ChangeSummary, Config, NewCommit, Op, Store, StoreError};
use meshgate_control::{Embedded, Etcd};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn put(key: &str, text: &str) -> Change {
    Change {
        key: key.into(),
        text: Some(text.into()),
    }
}

fn commit(message: &str, changes: Vec<Change>) -> NewCommit {
    NewCommit {
        author: "ana".into(),
        message: message.into(),
        time: 1_700_000_000,
        changes,
    }
}

fn texts(c: &Config) -> Vec<(&str, &str, u64)> {
    c.resources
        .iter()
        .map(|(k, s)| (k.as_str(), s.text.as_str(), s.revision))
        .collect()
}

/// What every store must do: any revision reads back, commits are compare-and-set
/// on the revision, history per resource and overall, newest first.
async fn conformance(s: &impl Store) {
    assert_eq!(s.load(None).await.map(|c| c.revision).ok(), Some(0));
    let r1 = s
        .commit(
            0,
            commit("add", vec![put("Api/a", "a1"), put("Service/s", "s1")]),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let r2 = s
        .commit(
            r1,
            commit(
                "change a, drop s",
                vec![
                    put("Api/a", "a2"),
                    Change {
                        key: "Service/s".into(),
                        text: None,
                    },
                ],
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((r1, r2), (1, 2));
    let Err(StoreError::Conflict(2)) = s.commit(1, commit("stale", vec![])).await else {
        panic!("a commit on a stale base must conflict");
    };
    let now = s.load(None).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((now.revision, texts(&now)), (2, vec![("Api/a", "a2", 2)]));
    let then = s.load(Some(1)).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        texts(&then),
        vec![("Api/a", "a1", 1), ("Service/s", "s1", 1)]
    );
    let Err(StoreError::NoRevision(3, 2)) = s.load(Some(3)).await else {
        panic!("revision 3 does not exist yet");
    };
    let all = s.history(None, 10).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(all.iter().map(|c| c.revision).collect::<Vec<_>>(), [2, 1]);
    assert_eq!(
        all[0].changes,
        vec![
            ChangeSummary {
                key: "Api/a".into(),
                op: Op::Put
            },
            ChangeSummary {
                key: "Service/s".into(),
                op: Op::Delete
            }
        ]
    );
    let of_s = s
        .history(Some("Service/s"), 10)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        of_s.iter()
            .map(|c| (c.revision, c.message.as_str()))
            .collect::<Vec<_>>(),
        [(2, "change a, drop s"), (1, "add")]
    );
    assert_eq!(s.history(None, 1).await.map(|h| h.len()).ok(), Some(1));
}

#[tokio::test]
async fn the_embedded_store_keeps_the_contract() {
    let s = Embedded::in_memory().unwrap_or_else(|e| panic!("{e}"));
    conformance(&s).await;
}

/// A single-member etcd in a temporary directory, killed on drop.
struct EtcdProcess {
    child: Child,
    dir: std::path::PathBuf,
    endpoint: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"))
}

impl EtcdProcess {
    async fn start() -> Self {
        let (client, peer) = (free_port(), free_port());
        let dir = std::env::temp_dir().join(format!("mg-etcd-{}-{client}", std::process::id()));
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(&dir)
            .args([
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args(["--initial-cluster", &format!("t={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd (scripts/setup.sh installs it): {e}"));
        let this = Self {
            child,
            dir,
            endpoint: client_url,
        };
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", client))
                .await
                .is_ok()
            {
                return this;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("etcd did not start listening");
    }

    async fn store(&self, prefix: &str) -> Etcd {
        Etcd::connect(std::slice::from_ref(&self.endpoint), prefix, None)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn the_etcd_store_keeps_the_contract_and_is_shared() {
    let etcd = EtcdProcess::start().await;
    let a = etcd.store("/t1").await;
    conformance(&a).await;

    // A second control plane on the same prefix: the same store (same id), and it
    // hears of the first one's commits.
    let b = etcd.store("/t1").await;
    assert_eq!(a.id(), b.id());
    let (tx, mut rx) = tokio::sync::watch::channel(0u64);
    let follower = tokio::spawn(async move { b.follow(tx).await });
    let seen = |rx: &mut tokio::sync::watch::Receiver<u64>, want: u64| {
        let mut rx = rx.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|r| *r == want))
                .await
                .is_ok()
        }
    };
    assert!(
        seen(&mut rx, 2).await,
        "the follower starts at the newest revision"
    );
    a.commit(2, commit("third", vec![put("Api/z", "z")]))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(seen(&mut rx, 3).await, "the follower hears of revision 3");
    follower.abort();

    // Another prefix is another store.
    let other = etcd.store("/t2").await;
    assert_ne!(other.id(), a.id());
    assert_eq!(other.load(None).await.map(|c| c.revision).ok(), Some(0));

    // Node records are shared, and dropped.
    let record = r#"{"name":"n1"}"#.to_string();
    a.share_nodes(vec![("n1".into(), Some(record.clone()))])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(a.shared_nodes().await.ok(), Some(vec![record]));
    a.share_nodes(vec![("n1".into(), None)])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(a.shared_nodes().await.ok(), Some(vec![]));
}
