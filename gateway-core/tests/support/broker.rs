//! A real Kafka-protocol broker (tansu, in-memory storage) for integration tests.
//!
//! Include it with `#[path = "support/broker.rs"] mod broker;`. The binary comes from
//! `TALLY_TANSU_BIN` (default `~/.cache/tally/tansu/bin/tansu`); a missing binary or a broker
//! that does not come up fails the test, it never skips.
//!
//! [`Broker::launch`] starts one on a free port; [`Broker::reserve`] picks a port without
//! starting anything (a broker that is down). [`Broker::start`] / [`Broker::stop`] bring it up
//! and down on that same port (an outage), and dropping the
//! `Broker` kills the process. Storage is `memory://`, so a restart forgets topics and messages:
//! create the topics again after each start.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

/// How long a broker may take to answer after its start.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct Broker {
    port: u16,
    bin: PathBuf,
    child: Option<Child>,
    log: tempfile::NamedTempFile,
}

/// The tansu binary, or a loud failure.
pub fn tansu_bin() -> PathBuf {
    let bin = match std::env::var_os("TALLY_TANSU_BIN") {
        Some(b) => PathBuf::from(b),
        None => {
            let home = std::env::var_os("HOME").expect("HOME is not set");
            PathBuf::from(home).join(".cache/tally/tansu/bin/tansu")
        }
    };
    assert!(
        bin.is_file(),
        "the tansu broker binary is missing at {} (set TALLY_TANSU_BIN, or install it: \
         cargo install tansu --locked --features postgres,dynostore --root ~/.cache/tally/tansu)",
        bin.display()
    );
    bin
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    l.local_addr().expect("local address").port()
}

impl Broker {
    /// A broker on a free port, not started yet: clients pointed at it see an outage.
    pub fn reserve() -> Broker {
        Broker {
            port: free_port(),
            bin: tansu_bin(),
            child: None,
            log: tempfile::NamedTempFile::new().expect("broker log file"),
        }
    }

    /// A running broker on a free port.
    pub fn launch() -> Broker {
        let mut b = Broker::reserve();
        b.start();
        b
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`, for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the broker (again) on its port and waits until it answers metadata requests.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "the broker is already running");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = self.log.reopen().expect("broker log");
        let err = self.log.reopen().expect("broker log");
        let child = Command::new(&self.bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "memory://tansu/",
            ])
            .env("RUST_LOG", "warn")
            // Whatever the environment says, this broker exports nothing and validates nothing.
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("SCHEMA_REGISTRY")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display()));
        self.child = Some(child);
        self.wait_ready();
    }

    /// Kills the broker; the port stays reserved for [`Broker::start`].
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Until the port is free again a restart could fail to bind.
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let until = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            assert!(
                Instant::now() < until,
                "the broker's port stays open after kill"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    fn wait_ready(&mut self) {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let until = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!(
                    "the tansu broker exited at start ({status}); its output:\n{}",
                    self.log_text()
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            assert!(
                Instant::now() < until,
                "the tansu broker did not listen on {addr}; its output:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()
            .expect("metadata client");
        loop {
            match consumer.fetch_metadata(None, Duration::from_secs(2)) {
                Ok(m) if !m.brokers().is_empty() => return,
                Ok(_) | Err(_) if Instant::now() < until => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                other => panic!(
                    "the tansu broker does not answer metadata requests: {other:?}; its output:\n{}",
                    self.log_text()
                ),
            }
        }
    }

    /// Creates `topic` with `partitions` partitions (already there is fine) and waits until its
    /// metadata shows every partition.
    pub async fn create_topic(&self, topic: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()
            .expect("admin client");
        let results = admin
            .create_topics(
                &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .expect("create_topics");
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, e)) => panic!("creating topic {t}: {e}"),
            }
        }
        let bootstrap = self.bootstrap();
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .create()
                .expect("metadata client");
            let until = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(m) = consumer.fetch_metadata(Some(&topic), Duration::from_secs(2))
                    && m.topics().iter().any(|t| {
                        t.name() == topic
                            && t.error().is_none()
                            && t.partitions().len() == partitions as usize
                    })
                {
                    return;
                }
                assert!(
                    Instant::now() < until,
                    "topic {topic} never showed up in the metadata"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .await
        .expect("waiting for the topic");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
