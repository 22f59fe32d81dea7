//! The learning-rate schedule end to end: a job under a cosine schedule with warmup, stopped at
//! a checkpoint in the middle of the curve and resumed, trains at the learning rates of an
//! uninterrupted one (its weights and optimizer state end as the same bytes), and the schedule
//! is what it trained with (the weights differ from a constant learning rate's).

use dancegrpo_e2e::{read_bytes as read, train_two as train};

/// 4 iterations x 4 trajectories per rank / gradient_accumulation_steps 2 = 8 optimizer steps:
/// 3 of warmup, then the cosine; checkpoint-2 is after step 4, where the curve is at 0.9.
const JOB: &str = "job_name = \"lr\"\nmax_train_steps = 4\ncheckpointing_steps = 2\n\
                   lr_scheduler = \"cosine\"\nlr_warmup_steps = 3\n";

const WEIGHTS: &str = "checkpoint-4/transformer/diffusion_pytorch_model.safetensors";

#[tokio::test(flavor = "multi_thread")]
async fn a_resumed_job_continues_the_learning_rate_schedule() {
    let straight = train(JOB);
    let a = straight.path("out");
    let resumed = train(&format!(
        "{JOB}resume_from_checkpoint = {:?}\n",
        a.join("checkpoint-2").display().to_string()
    ));
    let b = resumed.path("out");
    assert!(!b.join("checkpoint-2").exists(), "the resumed job started after step 2");
    assert_eq!(read(&a.join("reward.txt")), read(&b.join("reward.txt")), "reward logs differ");
    for f in [WEIGHTS, "checkpoint-4/optimizer.safetensors"] {
        assert!(read(&a.join(f)) == read(&b.join(f)), "{f} differs after the resume");
    }
    let constant = train(&JOB.replace(
        "lr_scheduler = \"cosine\"\nlr_warmup_steps = 3\n",
        "lr_scheduler = \"constant\"\n",
    ));
    let c = constant.path("out");
    assert!(read(&a.join(WEIGHTS)) != read(&c.join(WEIGHTS)), "the schedule changed nothing");
}
