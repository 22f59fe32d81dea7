//! The Kubernetes deployment (issue 18, part 3): the manifests of `deploy/k8s/` against the
//! Kubernetes schemas and our binaries (`deploy/k8s/validate.py`, with broken copies that must be
//! refused), the worker pods' entrypoint `deploy/k8s/node.sh` (ranks from the pod index), and
//! the `Containerfile`, whose steps are run here since no container engine runs on this machine.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dancegrpo_e2e::{bin, bin_dir, workspace_root};

fn k8s_dir() -> PathBuf {
    workspace_root().join("deploy/k8s")
}

fn manifests() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(k8s_dir())
        .expect("deploy/k8s")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    v
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The job config's keys as the coordinator prints them, for the DANCEGRPO_<KEY> check.
fn defaults(dir: &Path) -> PathBuf {
    let out = Command::new(bin("dancegrpo-coordinator"))
        .args(["config", "--print-defaults"])
        .output()
        .expect("dancegrpo-coordinator");
    assert!(out.status.success(), "{}", text(&out));
    let path = dir.join("defaults.toml");
    std::fs::write(&path, &out.stdout).expect("write defaults");
    path
}

fn validate(defaults: &Path, files: &[PathBuf]) -> Command {
    let mut c = Command::new("python");
    c.arg(k8s_dir().join("validate.py")).arg("--defaults").arg(defaults).args(files);
    c
}

#[test]
fn manifests_match_the_schemas_and_the_binaries_and_broken_ones_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let defaults = defaults(tmp.path());
    let files = manifests();
    // A broken copy of the manifests for each mutation, all validated at once.
    let broken: &[(&str, &str, &str, &str)] = &[
        // misspelled field, wrong type: the Kubernetes schemas
        (
            "coordinator.yaml",
            "containerPort: 29500",
            "containerPortt: 29500",
            "'containerPort' is a required",
        ),
        ("coordinator.yaml", "    type: Recreate", "    typ: Recreate", "'typ' was unexpected"),
        (
            "coordinator.yaml",
            "failureThreshold: 90",
            "failureThreshold: \"90\"",
            "'90' is not of type",
        ),
        ("workers-gpu.yaml", "completions: 2", "completions: two", "'two' is not of type"),
        // the Kubeflow SDK's models
        (
            "pytorchjob.yaml",
            "      replicas: 1",
            "      replicas: \"one\"",
            "expected int, got 'one'",
        ),
        ("pytorchjob.yaml", "  runPolicy:", "  runPolicyy:", "unknown field `runPolicyy`"),
        // the small schemas of the CRDs no registry publishes, and their pod templates
        ("volcano-npu.yaml", "      replicas: 2", "      replica: 2", "'replica' was unexpected"),
        (
            "ascendjob.yaml",
            "  successPolicy:",
            "  successPolicyy:",
            "'successPolicyy' was unexpected",
        ),
        (
            "ascendjob.yaml",
            "workingDir: /data",
            "workingDirectory: /data",
            "'workingDirectory' was unexpected",
        ),
        // what the schemas cannot see
        (
            "coordinator.yaml",
            "DANCEGRPO_OUTPUT_DIR",
            "DANCEGRPO_OUTPUT_DIRR",
            "`output_dirr` is not a job config key",
        ),
        ("workers-gpu.yaml", "name: DEVICE", "name: DANCEGRPO_DEVICES", "DANCEGRPO_DEVICES"),
        (
            "coordinator.yaml",
            "              port: 29500\n              service: dancegrpo.v1.Coordinator\n            periodSeconds: 10\n            failureThreshold",
            "              port: 29599\n              service: dancegrpo.v1.Coordinator\n            periodSeconds: 10\n            failureThreshold",
            "startupProbe: port 29599 is not the gRPC port 29500",
        ),
        (
            "coordinator.yaml",
            "service: dancegrpo.v1.Coordinator\n            periodSeconds: 20",
            "service: dancegrpo.v1.Coordinater\n            periodSeconds: 20",
            "'dancegrpo.v1.Coordinater' is not reported SERVING",
        ),
        (
            "workers-gpu.yaml",
            "batch.kubernetes.io/job-completion-index",
            "batch.kubernetes.io/job-index",
            "NODE_RANK must come from",
        ),
        (
            "workers-gpu.yaml",
            "nvidia.com/gpu: 8",
            "nvidia.com/gpus: 8",
            "unknown device resource nvidia.com/gpus",
        ),
        (
            "volcano-npu.yaml",
            "huawei.com/Ascend910: 8\n                requests",
            "huawei.com/Ascend910: 4\n                requests",
            "must be NPUS_PER_NODE=8",
        ),
        (
            "pytorchjob.yaml",
            "            - name: pytorch\n              image: dancegrpo:latest\n              command: [\"/opt/dancegrpo/deploy/k8s/node.sh\"]\n              workingDir: /data\n              env:\n",
            "            - name: pytorch\n              image: dancegrpo:latest\n              command: [\"/opt/dancegrpo/deploy/k8s/node.sh\"]\n              workingDir: /data\n              env:\n                - name: NODE_RANK\n                  value: \"0\"\n",
            "NODE_RANK set by hand",
        ),
        ("ascendjob.yaml", "minAvailable: 2", "minAvailable: 1", "minAvailable must be NNODES=2"),
        (
            "workers-gpu.yaml",
            "value: dancegrpo-coordinator:29500",
            "value: coordinator:29500",
            "is not the coordinator's Service",
        ),
    ];
    let mut runs = Vec::new();
    for (i, (file, from, to, want)) in broken.iter().enumerate() {
        let dir = tmp.path().join(format!("broken-{i}"));
        std::fs::create_dir(&dir).expect("mkdir");
        let mut copies = Vec::new();
        for f in &files {
            let mut s = std::fs::read_to_string(f).expect("read manifest");
            if f.file_name().is_some_and(|n| n == *file) {
                assert!(s.contains(from), "{file} no longer contains {from:?}: update this test");
                s = s.replacen(from, to, 1);
            }
            let copy = dir.join(f.file_name().expect("name"));
            std::fs::write(&copy, s).expect("write copy");
            copies.push(copy);
        }
        let child = validate(&defaults, &copies)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("python (the project venv's, on PATH)");
        runs.push((*file, *to, *want, child));
    }

    let good = validate(&defaults, &files).output().expect("python");
    let out = text(&good);
    assert!(good.status.success(), "the manifests of deploy/k8s are refused:\n{out}");
    for kind in ["Deployment", "Service", "PersistentVolumeClaim", "Job", "PyTorchJob", "AscendJob"]
    {
        assert!(out.contains(&format!(" {kind}/")), "no {kind} checked:\n{out}");
    }
    assert!(out.contains("0 problems"), "{out}");

    for (file, to, want, child) in runs {
        let o = child.wait_with_output().expect("validate.py");
        let out = text(&o);
        assert!(!o.status.success(), "{file} with {to:?} was accepted:\n{out}");
        assert!(out.contains(want), "{file} with {to:?}: no {want:?} in\n{out}");
        assert!(!out.contains("Traceback"), "{file} with {to:?}: validate.py crashed:\n{out}");
    }
}

/// A stand-in for `dancegrpo-worker` that records what node.sh gave it.
fn stub_worker(dir: &Path, fail_rank: Option<u32>) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    let fail =
        fail_rank.map_or(String::new(), |r| format!("[ \"$LOCAL_RANK\" = {r} ] && exit 3\n"));
    let script = format!(
        "#!/bin/sh\necho \"$NODE_RANK $LOCAL_RANK ${{ASCEND_RT_VISIBLE_DEVICES:+$ASCEND_RT_VISIBLE_DEVICES }}$*\" > \"{}/rank-$LOCAL_RANK\"\n{fail}exit 0\n",
        dir.display()
    );
    let path = bin.join("dancegrpo-worker");
    std::fs::write(&path, script).expect("write stub");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    bin
}

fn node_sh(dir: &Path, env: &[(&str, &str)], fail_rank: Option<u32>) -> (Output, Vec<String>) {
    let bin = stub_worker(dir, fail_rank);
    let mut c = Command::new(k8s_dir().join("node.sh"));
    for v in ["NODE_RANK", "JOB_COMPLETION_INDEX", "VC_TASK_INDEX", "RANK", "LOCAL_RANK", "NNODES"]
    {
        c.env_remove(v);
    }
    // The manifests give every pod NNODES; a case may set its own.
    c.env_remove("ASCEND_RT_VISIBLE_DEVICES")
        .env("BIN_DIR", &bin)
        .env("NNODES", "4")
        .envs(env.iter().copied());
    let out = c.output().expect("node.sh");
    let mut ranks = Vec::new();
    for i in 0.. {
        match std::fs::read_to_string(dir.join(format!("rank-{i}"))) {
            Ok(s) => ranks.push(s.trim().to_string()),
            Err(_) => break,
        }
    }
    (out, ranks)
}

#[test]
fn node_sh_takes_the_node_rank_from_the_pod_index_and_starts_one_worker_per_device() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let case = |name: &str| {
        let d = tmp.path().join(name);
        std::fs::create_dir(&d).expect("mkdir");
        d
    };
    // Indexed Job: JOB_COMPLETION_INDEX (the manifests pass it as NODE_RANK; both work).
    let (o, ranks) = node_sh(
        &case("job"),
        &[("JOB_COMPLETION_INDEX", "1"), ("NPUS_PER_NODE", "3"), ("DEVICE", "cuda")],
        None,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        ranks,
        ["1 0 run --device cuda:0", "1 1 run --device cuda:1", "1 2 run --device cuda:2"]
    );
    // Volcano: VC_TASK_INDEX; NPUs renumbered from 0 in ASCEND_RT_VISIBLE_DEVICES.
    let (o, ranks) = node_sh(
        &case("volcano"),
        &[("VC_TASK_INDEX", "2"), ("NPUS_PER_NODE", "2"), ("DEVICE", "npu")],
        None,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(ranks, ["2 0 0,1 run --device npu:0", "2 1 0,1 run --device npu:1"]);
    // PyTorchJob / AscendJob: RANK is the pod's rank; ascend-operator's LOCAL_RANK list is
    // replaced by each worker's own.
    let (o, ranks) = node_sh(
        &case("ascendjob"),
        &[("RANK", "3"), ("LOCAL_RANK", "0,1"), ("NPUS_PER_NODE", "2"), ("DEVICE", "npu")],
        None,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(ranks, ["3 0 0,1 run --device npu:0", "3 1 0,1 run --device npu:1"]);
    // NODE_RANK wins over the others.
    let (o, ranks) = node_sh(
        &case("explicit"),
        &[("NODE_RANK", "0"), ("RANK", "5"), ("NPUS_PER_NODE", "1")],
        None,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(ranks, ["0 0 run --device cuda:0"]);
    // A failing worker's status is the pod's.
    let (o, _) = node_sh(&case("fails"), &[("NODE_RANK", "0"), ("NPUS_PER_NODE", "2")], Some(1));
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    // Refused before any worker starts: no rank, a rank past NNODES, a device list that does
    // not match NPUS_PER_NODE.
    for (name, env, want) in [
        ("norank", &[("NPUS_PER_NODE", "2")][..], "no node rank"),
        ("pastend", &[("NODE_RANK", "2"), ("NNODES", "2")][..], "must be < NNODES=2"),
        (
            "devices",
            &[
                ("NODE_RANK", "0"),
                ("DEVICE", "npu"),
                ("NPUS_PER_NODE", "8"),
                ("ASCEND_RT_VISIBLE_DEVICES", "0,1"),
            ][..],
            "lists 2 devices",
        ),
    ] {
        let d = case(name);
        let mut env = env.to_vec();
        if name == "devices" {
            // node_sh clears it; put it back after.
            let bin = stub_worker(&d, None);
            let o = Command::new(k8s_dir().join("node.sh"))
                .env("BIN_DIR", &bin)
                .env_remove("RANK")
                .envs(env.drain(..))
                .output()
                .expect("node.sh");
            assert_eq!(o.status.code(), Some(2), "{}", text(&o));
            assert!(text(&o).contains(want), "{}", text(&o));
            continue;
        }
        let (o, ranks) = node_sh(&d, &env, None);
        assert_eq!(o.status.code(), Some(2), "{name}: {}", text(&o));
        assert!(text(&o).contains(want), "{name}: {}", text(&o));
        assert!(ranks.is_empty(), "{name}: workers started");
    }
}

/// One instruction of a Containerfile, continuation lines joined.
#[derive(Debug)]
struct Instruction {
    op: String,
    args: String,
}

/// The stages of a Containerfile, each a list of instructions; the ARGs before the first FROM
/// come first, as stage 0.
fn parse_containerfile(text: &str) -> Vec<Vec<Instruction>> {
    let mut stages = vec![Vec::new()];
    let mut pending = String::new();
    for line in text.lines() {
        let t = line.trim();
        if pending.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if let Some(body) = t.strip_suffix('\\') {
            pending.push_str(body);
            pending.push(' ');
            continue;
        }
        pending.push_str(t);
        let full = std::mem::take(&mut pending);
        let (op, args) = full.split_once(' ').unwrap_or((&full, ""));
        let op = op.to_ascii_uppercase();
        if op == "FROM" {
            stages.push(Vec::new());
        }
        stages.last_mut().expect("stage").push(Instruction { op, args: args.trim().to_string() });
    }
    stages
}

/// `s` with the container's absolute paths under `map`'s prefixes moved onto this machine;
/// a prefix counts only where a path starts (after a space, a quote, `=`, `:` or `(`).
fn rebase(s: &str, map: &[(&str, PathBuf)]) -> String {
    let mut out = String::new();
    let mut i = 0;
    'outer: while i < s.len() {
        let at_start =
            i == 0 || matches!(s.as_bytes()[i - 1], b' ' | b'"' | b'\'' | b'=' | b':' | b'(');
        if at_start {
            for (prefix, to) in map {
                let rest = &s[i..];
                let whole = prefix.ends_with('/')
                    || rest.len() == prefix.len()
                    || !rest
                        .as_bytes()
                        .get(prefix.len())
                        .is_some_and(|b| b.is_ascii_alphanumeric());
                if rest.starts_with(prefix) && whole {
                    out.push_str(&to.display().to_string());
                    if prefix.ends_with('/') {
                        out.push('/');
                    }
                    i += prefix.len();
                    continue 'outer;
                }
            }
        }
        let c = s[i..].chars().next().expect("char");
        out.push(c);
        i += c.len_utf8();
    }
    out
}

/// ENV's `K=V K2=V2` pairs (values without spaces, as ours are).
fn env_pairs(args: &str) -> Vec<(String, String)> {
    args.split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("ENV K=V");
            (k.to_string(), v.trim_matches('"').to_string())
        })
        .collect()
}

fn expand_vars(s: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = s.to_string();
    for (k, v) in vars {
        out = out.replace(&format!("${{{k}}}"), v).replace(&format!("${k}"), v);
    }
    out
}

#[test]
fn containerfile_steps_run_and_the_runtime_image_starts_with_only_its_env() {
    let root = workspace_root();
    let file = std::fs::read_to_string(root.join("Containerfile")).expect("Containerfile");
    let ignore = std::fs::read_to_string(root.join(".containerignore")).expect(".containerignore");
    assert!(ignore.lines().any(|l| l.trim() == "target/"), ".containerignore must exclude target/");
    // The accelerator pins are deploy/cuda-check.sh's and the torch version bootstrap.sh's.
    let cuda_check =
        std::fs::read_to_string(root.join("deploy/cuda-check.sh")).expect("cuda-check");
    for pin in ["nvidia-cuda-crt==13.0.*", "nvidia-cuda-cccl==13.0.*"] {
        assert!(
            cuda_check.contains(pin) && file.contains(pin),
            "{pin}: Containerfile and cuda-check.sh disagree"
        );
    }
    let bootstrap = std::fs::read_to_string(root.join("deploy/bootstrap.sh")).expect("bootstrap");
    assert!(bootstrap.contains("TORCH_VERSION=2.11.0") && file.contains("torch==2.11.0"));

    let stages = parse_containerfile(&file);
    assert_eq!(stages.len(), 3, "global ARGs, a build stage and a runtime stage");
    let scratch = tempfile::Builder::new()
        .prefix("containerfile-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("scratch");
    let r = scratch.path();
    // This machine's venv stands for the image's /opt/venv; bootstrap.sh finds it ready.
    let venv = Command::new("python")
        .args(["-c", "import sys; print(sys.prefix)"])
        .output()
        .expect("python");
    let venv = PathBuf::from(String::from_utf8_lossy(&venv.stdout).trim());
    for d in ["opt", "tmp", "root", "shim"] {
        std::fs::create_dir_all(r.join(d)).expect("mkdir");
    }
    std::os::unix::fs::symlink(&venv, r.join("opt/venv")).expect("symlink venv");
    // cp hard-links instead of copying where it can: the 3.6 GB of torch and nvidia
    // libraries are the same bytes either way.
    let cp = r.join("shim/cp");
    std::fs::write(&cp, "#!/bin/sh\n/bin/cp -l \"$@\" 2>/dev/null || /bin/cp \"$@\"\n")
        .expect("shim");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&cp, std::fs::Permissions::from_mode(0o755)).expect("chmod");

    let build_map: Vec<(&str, PathBuf)> = vec![
        ("/opt/", r.join("opt")),
        ("/out", r.join("out")),
        ("/src", root.clone()),
        ("/tmp/", r.join("tmp")),
    ];
    let mut args: BTreeMap<String, String> = BTreeMap::new();
    // The test's build arguments: a CPU image, from this checkout's binaries.
    let overrides = [("ACCEL", "cpu".to_string()), ("BIN_DIR", bin_dir().display().to_string())];
    let mut cargo_builds = 0;
    for ins in &stages[1] {
        match ins.op.as_str() {
            "FROM" => assert!(ins.args.contains("AS build"), "{}", ins.args),
            "ARG" => {
                let (k, v) = ins.args.split_once('=').unwrap_or((&ins.args, ""));
                let v = overrides
                    .iter()
                    .find(|(o, _)| *o == k)
                    .map_or(v.to_string(), |(_, v)| v.clone());
                args.insert(k.to_string(), v);
            }
            "ENV" => {
                for (k, v) in env_pairs(&ins.args) {
                    args.insert(k, rebase(&v, &build_map));
                }
            }
            "WORKDIR" => assert_eq!(ins.args, "/src", "the build context is this checkout"),
            "COPY" => assert_eq!(ins.args, ". .", "the build stage copies the context"),
            "RUN" if ins.args.contains("cargo build") => {
                // Not run: the test uses the binaries this checkout has built (BIN_DIR).
                assert!(ins.args.contains("--release --workspace --bins"), "{}", ins.args);
                cargo_builds += 1;
            }
            "RUN" => {
                let mut env = args.clone();
                let path = format!("{}:{}", r.join("shim").display(), env["PATH"]);
                env.insert("PATH".into(), path);
                let o = Command::new("/bin/sh")
                    .args(["-c", &rebase(&ins.args, &build_map)])
                    .current_dir(&root)
                    .env_clear()
                    .envs(&env)
                    .env("HOME", r.join("root"))
                    .output()
                    .expect("sh");
                assert!(o.status.success(), "RUN {}\n{}", ins.args, text(&o));
            }
            op => panic!("the build stage has a {op} this test does not run: {}", ins.args),
        }
    }
    assert_eq!(cargo_builds, 1);

    // The runtime stage, with "/" at r/root.
    let image = r.join("root");
    let run_map: Vec<(&str, PathBuf)> =
        vec![("/opt/", image.join("opt")), ("/data", image.join("data"))];
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let mut cmd: Vec<String> = Vec::new();
    for ins in &stages[2] {
        match ins.op.as_str() {
            "FROM" => assert!(ins.args.contains("AS runtime"), "{}", ins.args),
            "COPY" => {
                assert_eq!(ins.args, "--from=build /out/ /");
                let o = Command::new(&cp)
                    .arg("-r")
                    .arg(format!("{}/.", r.join("out").display()))
                    .arg(&image)
                    .output()
                    .expect("cp");
                assert!(o.status.success(), "{}", text(&o));
            }
            "ENV" => {
                for (k, v) in env_pairs(&ins.args) {
                    env.insert(k, rebase(&expand_vars(&v, &env), &run_map));
                }
            }
            "WORKDIR" => std::fs::create_dir_all(rebase(&ins.args, &run_map)).expect("workdir"),
            "CMD" => {
                cmd = serde_json::from_str(&ins.args).expect("CMD in JSON form");
            }
            op => panic!("the runtime stage has a {op} this test does not run: {}", ins.args),
        }
    }
    // What the manifests run exists in the image.
    for p in
        ["opt/dancegrpo/deploy/k8s/node.sh", "opt/dancegrpo/deploy/configs/dancegrpo_flux.toml"]
    {
        assert!(image.join(p).exists(), "the image has no /{p}");
    }
    let in_image = |argv: &[&str]| -> Output {
        let exe = env["PATH"]
            .split(':')
            .map(|d| Path::new(d).join(argv[0]))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{} not on the image's PATH {}", argv[0], env["PATH"]));
        Command::new(exe)
            .args(&argv[1..])
            .current_dir(image.join("data"))
            .env_clear()
            .envs(&env)
            .output()
            .expect("run in image")
    };
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let o = in_image(&cmd);
    assert!(o.status.success() && text(&o).contains("Usage"), "CMD {cmd:?}:\n{}", text(&o));
    let o = in_image(&["dancegrpo-worker", "run", "--help"]);
    assert!(o.status.success(), "dancegrpo-worker run --help:\n{}", text(&o));
    // libtorch comes from the image's copy, through its LD_LIBRARY_PATH.
    let o = Command::new("ldd")
        .arg(image.join("opt/dancegrpo/bin/dancegrpo-worker"))
        .env_clear()
        .envs(&env)
        .output()
        .expect("ldd");
    let libs = text(&o);
    let torch =
        libs.lines().find(|l| l.contains("libtorch_cpu.so")).expect("worker links libtorch_cpu");
    assert!(
        torch.contains(&image.display().to_string()),
        "libtorch_cpu not from the image: {torch}"
    );
    assert!(!libs.contains("not found"), "{libs}");
}
