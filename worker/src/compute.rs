//! The compute thread. libtorch work runs here, on one OS thread that owns the device, the
//! process group and (later) the model, never on the async runtime: heartbeats must not be
//! starved by a long forward pass, and `tch::Tensor` is `Send` but not `Sync`, so that state is
//! owned by the thread, not shared.

use std::sync::mpsc;

use tokio::sync::oneshot;

use crate::error::{Error, Result};

type Job<S> = Box<dyn FnOnce(&mut S) + Send>;

/// Handle to the compute thread owning a state `S`. Dropping it lets the thread finish its
/// queue and exit; it is not joined, so a collective blocked on a dead peer cannot hold up a
/// shutdown (the collective still ends at its own timeout).
#[derive(Debug)]
pub struct ComputeThread<S> {
    tx: mpsc::SyncSender<Job<S>>,
}

impl<S: 'static> ComputeThread<S> {
    /// Starts the thread and builds its state there with `init` (device initialisation must
    /// happen on the thread that uses the device). The queue is bounded so a producer cannot
    /// run ahead of the device.
    pub fn spawn<I>(name: &str, init: I) -> Result<Self>
    where
        I: FnOnce() -> S + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel::<Job<S>>(4);
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let mut state = init();
                for job in rx {
                    job(&mut state);
                }
            })
            .map_err(|e| Error::Compute(format!("cannot start compute thread: {e}")))?;
        Ok(Self { tx })
    }

    /// Runs `f` on the compute thread and awaits its result without blocking the runtime.
    pub async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut S) -> T + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let tx = self.tx.clone();
        // A panic is caught here and becomes this job's error, so the thread lives on for the
        // next one; what the job left half-done is the caller's to discard.
        let job: Job<S> = Box::new(move |s| {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(s)));
            let _ = reply.send(r.map_err(|payload| panic_message(payload.as_ref())));
        });
        // The queue is short and jobs are long: hand the (possibly blocking) send to the
        // blocking pool rather than stall a runtime thread.
        tokio::task::spawn_blocking(move || tx.send(job))
            .await
            .map_err(|e| Error::Compute(e.to_string()))?
            .map_err(|_| Error::Compute("compute thread stopped".into()))?;
        rx.await
            .map_err(|_| Error::Compute("compute thread stopped".into()))?
            .map_err(Error::Panicked)
    }
}

/// The message a panic was raised with.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Describes the CPU device as libtorch sees it.
pub fn describe_cpu() -> String {
    format!("libtorch {} threads", tch::get_num_threads())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_torch_work_off_the_runtime_with_owned_state() {
        let c = ComputeThread::spawn("test-compute", || 10.0).unwrap();
        let (sum, thread) = c
            .run(|base: &mut f64| {
                let t = tch::Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
                *base += t.sum(tch::Kind::Float).double_value(&[]);
                (*base, std::thread::current().name().map(String::from))
            })
            .await
            .unwrap();
        assert_eq!(sum, 16.0);
        assert_eq!(thread.as_deref(), Some("test-compute"));
        assert_eq!(c.run(|base: &mut f64| *base).await.unwrap(), 16.0, "state persists");
    }

    // The runtime here has one thread: if compute ran on it, no tick could happen meanwhile.
    #[tokio::test(flavor = "current_thread")]
    async fn long_compute_does_not_starve_the_runtime() {
        let c = ComputeThread::spawn("test-compute", || ()).unwrap();
        let work = c.run(|_: &mut ()| {
            let start = std::time::Instant::now();
            let a = tch::Tensor::ones([256, 256], (tch::Kind::Float, tch::Device::Cpu));
            let mut n = 0;
            while start.elapsed() < std::time::Duration::from_millis(600) {
                let _ = a.matmul(&a);
                n += 1;
            }
            n
        });
        let ticks = async {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(20));
            let mut n = 0;
            loop {
                tick.tick().await;
                n += 1;
                if n == 10 {
                    return n;
                }
            }
        };
        tokio::pin!(work);
        let ticked = tokio::select! {
            n = ticks => n,
            _ = &mut work => panic!("compute finished before the runtime ticked 10 times"),
        };
        assert_eq!(ticked, 10);
        assert!(work.await.unwrap() > 0);
    }

    #[tokio::test]
    async fn a_panicking_job_is_an_error_and_the_thread_runs_the_next_one() {
        let c = ComputeThread::spawn("test-panic", || 0u32).unwrap();
        let e = c.run(|_: &mut u32| -> u32 { panic!("index 7 out of range") }).await.unwrap_err();
        assert!(matches!(&e, Error::Panicked(m) if m == "index 7 out of range"), "{e}");
        let e = c.run(|n: &mut u32| -> u32 { panic!("at {n}: {}", 3) }).await.unwrap_err();
        assert!(matches!(&e, Error::Panicked(m) if m == "at 0: 3"), "{e}");
        assert_eq!(
            c.run(|n: &mut u32| {
                *n += 1;
                *n
            })
            .await
            .unwrap(),
            1,
            "the state lives on"
        );
    }
}
