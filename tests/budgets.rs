//! Safe among strangers: the server's budgets, rate limits and its handling of damaged data,
//! through real QUIC connections to a real server on 127.0.0.1:0 (issue 9).

mod common;

use common::{connect, local, login, start_server};
use qpq::client::session::SessionError;
use qpq::crypto::identity::Identity;
use qpq::proto::wire_error::ErrorCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_damaged_while_the_server_was_stopped_is_an_error_and_writes_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let alice = Identity::generate();
    let bob = Identity::generate();
    start_server(dir.path()).await.shutdown().await.unwrap();
    {
        // Rows no qpq writes, put into the file while the server is down.
        let queue: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("queue");
        let db = redb::Database::open(dir.path().join(qpq::server::DB_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(queue).unwrap();
            t.insert(&[9u8; 5][..], &[0u8; 30][..]).unwrap();
            let mut long = alice.public().0.to_vec();
            long.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 5, 1]);
            t.insert(&long[..], &[7u8; 3][..]).unwrap();
        }
        txn.commit().unwrap();
    }
    let server = start_server(dir.path()).await;
    local(async {
        let a = login(&server, &alice).await;
        match a.fetch(10).await {
            Err(SessionError::Rpc(m)) => {
                assert_eq!((m.code, m.message.as_str()), (ErrorCode::Internal, "internal storage error"))
            }
            other => panic!("a damaged row must be an rpc error, got {other:?}"),
        }
        // The sweep removes what it cannot deliver instead of killing the writer.
        server.sweep().await;
        let sender = connect(&server).await;
        sender.enqueue(&bob.public().0, b"still writing", b"").await.unwrap();
        sender.enqueue(&alice.public().0, b"for alice", b"").await.unwrap();
        let (msgs, _) = a.fetch(10).await.unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].payload, b"for alice");
        let b = login(&server, &bob).await;
        assert_eq!(b.fetch(10).await.unwrap().0.len(), 1);
    })
    .await;
    server.shutdown().await.unwrap();
}
