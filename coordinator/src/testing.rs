//! What the unit tests of several modules build the same way: a job's settings in a temporary
//! folder, and a worker's description.

use std::time::Duration;

use dancegrpo_proto::{JobConfig, WorkerInfo};

use crate::config::{CoordinatorSettings, Topology};

/// A job of `world` workers on one node over a two-prompt dataset in `dir`, with a 100 ms
/// heartbeat and a 1 s heartbeat timeout.
pub(crate) fn settings(dir: &std::path::Path, world: u32) -> CoordinatorSettings {
    let data = dir.join("videos2caption.json");
    std::fs::write(&data, r#"[{"caption": "a"}, {"caption": "b"}]"#).unwrap();
    CoordinatorSettings {
        job: JobConfig {
            data_json_path: data.display().to_string(),
            output_dir: dir.join("out").display().to_string(),
            ..JobConfig::default()
        },
        topology: Topology::new(1, world, None).unwrap(),
        db_path: dir.join("db.sqlite"),
        heartbeat_interval: Duration::from_millis(100),
        heartbeat_timeout: Duration::from_secs(1),
        store_port: 29501,
        listen: "127.0.0.1:0".parse().unwrap(),
        adopt_config: false,
    }
}

/// A CPU worker of node 0 in slot `local_rank`, on a host no pid can be watched on.
pub(crate) fn info(local_rank: u32) -> WorkerInfo {
    WorkerInfo {
        host: format!("host{local_rank}"),
        node_rank: 0,
        local_rank,
        device: "cpu".into(),
        device_description: "cpu".into(),
        pid: 1,
    }
}
