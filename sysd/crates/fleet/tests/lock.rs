//! The reboot semaphore against a real etcd (Debian's etcd-server) on a private loopback.

use std::time::Duration;

use keelson_fleet::{Acquire, Client, Lock};
use keelson_testkit::etcd::Etcd;
use keelson_testkit::registry::private_netns;

/// Runs `f` on a thread inside a fresh network namespace with one etcd member in it.
fn with_etcd<F, Fut>(f: F)
where
    F: FnOnce(String) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    std::thread::spawn(move || {
        private_netns().expect("a private network namespace (run the tests as root)");
        let etcd = Etcd::start(23790, 23800);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(f(etcd.endpoint.clone()));
        drop(etcd);
    })
    .join()
    .expect("the test thread panicked");
}

const NOW: &str = "2026-12-06T00:00:00Z";

#[test]
fn one_holder_at_a_time_and_release_hands_over() {
    with_etcd(|ep| async move {
        let c = Client::new(&[ep]).unwrap();
        let a = Lock::new(c.clone(), "default", 1, "node1");
        let b = Lock::new(c.clone(), "default", 1, "node2");
        let la = c.grant(Duration::from_secs(60)).await.unwrap();
        let lb = c.grant(Duration::from_secs(60)).await.unwrap();
        assert_eq!(
            a.try_acquire(la, "0.2.0", NOW).await.unwrap(),
            Acquire::Held { slot: 0 }
        );
        // Asking again (e.g. after its reboot) finds its own slot.
        assert_eq!(
            a.try_acquire(la, "0.2.0", NOW).await.unwrap(),
            Acquire::Held { slot: 0 }
        );
        b.wait(lb).await.unwrap();
        match b.try_acquire(lb, "0.2.0", NOW).await.unwrap() {
            Acquire::Busy { holders } => assert_eq!(holders[0].node, "node1"),
            other => panic!("{other:?}"),
        }
        let st = a.state().await.unwrap();
        assert_eq!(st.holders.len(), 1);
        assert_eq!(st.waiting, ["node2"]);
        assert_eq!(a.release().await.unwrap(), 1);
        assert_eq!(
            b.try_acquire(lb, "0.2.0", NOW).await.unwrap(),
            Acquire::Held { slot: 0 }
        );
        // Taking the slot clears the waiting mark; releasing what one does not hold is a no-op.
        assert!(b.state().await.unwrap().waiting.is_empty());
        assert_eq!(a.release().await.unwrap(), 0);
    });
}

#[test]
fn two_holders_let_two_nodes_reboot_not_three() {
    with_etcd(|ep| async move {
        let c = Client::new(&[ep]).unwrap();
        let lease = c.grant(Duration::from_secs(60)).await.unwrap();
        let nodes: Vec<Lock> = (1..=3)
            .map(|i| Lock::new(c.clone(), "wave", 2, &format!("node{i}")))
            .collect();
        let (r1, r2, r3) = tokio::join!(
            nodes[0].try_acquire(lease, "v", NOW),
            nodes[1].try_acquire(lease, "v", NOW),
            nodes[2].try_acquire(lease, "v", NOW),
        );
        let held = [r1.unwrap(), r2.unwrap(), r3.unwrap()]
            .iter()
            .filter(|r| matches!(r, Acquire::Held { .. }))
            .count();
        assert_eq!(held, 2);
        // A node configured with one holder still counts the two slots taken.
        let strict = Lock::new(c.clone(), "wave", 1, "node4");
        assert!(matches!(
            strict.try_acquire(lease, "v", NOW).await.unwrap(),
            Acquire::Busy { .. }
        ));
    });
}

#[test]
fn a_dead_holder_frees_its_slot_when_its_lease_runs_out() {
    with_etcd(|ep| async move {
        let c = Client::new(&[ep]).unwrap();
        let dead = Lock::new(c.clone(), "default", 1, "dead");
        let live = Lock::new(c.clone(), "default", 1, "live");
        let short = c.grant(Duration::from_secs(2)).await.unwrap();
        let long = c.grant(Duration::from_secs(60)).await.unwrap();
        assert!(matches!(
            dead.try_acquire(short, "v", NOW).await.unwrap(),
            Acquire::Held { .. }
        ));
        assert!(matches!(
            live.try_acquire(long, "v", NOW).await.unwrap(),
            Acquire::Busy { .. }
        ));
        assert!(c.keepalive(long).await.unwrap());
        // No keepalive for `short`: etcd expires it (and its slot) after its TTL.
        let mut got = false;
        for _ in 0..100 {
            if matches!(
                live.try_acquire(long, "v", NOW).await.unwrap(),
                Acquire::Held { .. }
            ) {
                got = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(got, "the slot of an expired lease was never freed");
        assert!(
            !c.keepalive(short).await.unwrap(),
            "the expired lease still renews"
        );
        c.revoke(long).await.unwrap();
        c.revoke(long).await.unwrap();
        assert!(
            live.state().await.unwrap().holders.is_empty(),
            "revoking frees the slot"
        );
    });
}

#[test]
fn a_halted_rollout_refuses_that_version_only() {
    with_etcd(|ep| async move {
        let c = Client::new(&[ep]).unwrap();
        let lease = c.grant(Duration::from_secs(60)).await.unwrap();
        let n1 = Lock::new(c.clone(), "default", 1, "node1");
        let n2 = Lock::new(c.clone(), "default", 1, "node2");
        n1.halt(
            "0.2.0",
            "rolled back: critical service web not healthy within 5m",
            NOW,
        )
        .await
        .unwrap();
        match n2.try_acquire(lease, "0.2.0", NOW).await.unwrap() {
            Acquire::Halted(h) => {
                assert_eq!(h.node, "node1");
                assert!(h.reason.contains("rolled back"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            n2.try_acquire(lease, "0.3.0", NOW).await.unwrap(),
            Acquire::Held { .. }
        ));
        n2.resume().await.unwrap();
        assert!(n2.state().await.unwrap().halted.is_none());
    });
}

#[test]
fn another_member_answers_when_the_first_is_down_and_none_is_an_error() {
    with_etcd(|ep| async move {
        let c = Client::new(&["http://127.0.0.1:1".into(), ep]).unwrap();
        let l = Lock::new(c.clone(), "default", 1, "node1");
        let lease = c.grant(Duration::from_secs(60)).await.unwrap();
        assert!(matches!(
            l.try_acquire(lease, "v", NOW).await.unwrap(),
            Acquire::Held { .. }
        ));
        let down =
            Client::new(&["http://127.0.0.1:1".into(), "http://127.0.0.1:2".into()]).unwrap();
        let e = down
            .grant(Duration::from_secs(5))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("no etcd endpoint answered (http://127.0.0.1:1/: cannot connect"),
            "{e}"
        );
        assert!(e.contains("http://127.0.0.1:2/"), "{e}");
    });
}
