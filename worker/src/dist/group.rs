//! [`Store`] (a c10d TCPStore) and [`ProcessGroup`] (one c10d backend over a prefix of it).
//!
//! A group generation is a key prefix on the store (`dancegrpo/<job>/gen<N>/`, chosen by the
//! coordinator), so after a failure the survivors can form a new group on the same live store,
//! or on a new one, without restarting.

use std::ffi::CString;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dancegrpo_proto::RankAssignment;
use tch::{Kind, Tensor};

use super::backend::Backend;
use super::check::{self, CheckChannel, KeyValue, Op, Signature};
use super::error::{DistError, Result};
use super::ffi;

/// A c10d `TCPStore`: rank 0 hosts it, every rank connects to it. Shared by the groups of
/// successive generations.
#[derive(Debug)]
pub struct Store {
    ptr: NonNull<ffi::DgStore>,
    host: String,
    port: u16,
}

// SAFETY: c10d's TCPStore is used from many threads by torch itself (every request takes its
// client lock); the handle is only freed in Drop.
unsafe impl Send for Store {}
// SAFETY: as above; all methods on the C++ side are thread-safe.
unsafe impl Sync for Store {}

/// How often a rendezvous in progress looks whether it has been abandoned. A store answers a
/// wait that ran out with a cancel on the same connection, so polling costs one round trip.
const POLL: Duration = Duration::from_millis(200);

/// The generations the coordinator has assigned to this rank, shared between the thread that
/// hears of them and the one forming a group. Once a newer one exists, a rendezvous still in
/// progress can never complete (its peers have moved on, or one of them is dead): it is
/// abandoned at once instead of waiting out its timeout, 300 s at the defaults.
#[derive(Clone, Debug, Default)]
pub struct Generations(Arc<AtomicU64>);

impl Generations {
    /// Records that `generation` has been assigned.
    pub fn assigned(&self, generation: u64) {
        self.0.fetch_max(generation, Ordering::SeqCst);
    }

    /// The newest generation assigned so far.
    pub fn newest(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

impl Store {
    /// Hosts (`is_master`) or connects to the store at `host:port`. A client retries until
    /// `timeout`. Port 0 on the master picks a free port; see [`Store::port`].
    pub fn connect(
        host: &str,
        port: u16,
        is_master: bool,
        timeout: Duration,
    ) -> Result<Arc<Store>> {
        Store::connect_abandonable(
            host,
            port,
            is_master,
            &GroupOptions::default().with_timeout(timeout),
        )
    }

    /// [`Store::connect`] for the group of `options`: a client gives up as soon as a newer
    /// generation than the group's is assigned ([`GroupOptions::abandon_when_superseded`]).
    pub fn connect_abandonable(
        host: &str,
        port: u16,
        is_master: bool,
        options: &GroupOptions,
    ) -> Result<Arc<Store>> {
        let deadline = Instant::now() + options.timeout;
        loop {
            // Tries of a second at most, so that a store that is gone for good (its host
            // died) is given up on when the generation is abandoned.
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt =
                if is_master || options.abandon.is_none() { left } else { left.min(POLL * 5) };
            match Store::connect_once(host, port, is_master, options.timeout, attempt) {
                Ok(store) => return Ok(store),
                Err(e) if is_master || Instant::now() >= deadline => return Err(e),
                Err(_) => options.check_abandoned()?,
            }
        }
    }

    fn connect_once(
        host: &str,
        port: u16,
        is_master: bool,
        timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<Arc<Store>> {
        let err = |message: String| DistError::Rendezvous {
            addr: format!("{host}:{port}"),
            prefix: String::new(),
            timeout,
            message,
        };
        let c_host = CString::new(host).map_err(|_| err("host contains a NUL byte".into()))?;
        // The master listens on the interface of `host` only (what the other ranks dial), not
        // on every interface as c10d does when it binds the port itself.
        let (port, listen_fd) = if is_master {
            let l = std::net::TcpListener::bind((host, port))
                .map_err(|e| err(format!("cannot listen on {host}:{port}: {e}")))?;
            let bound = l.local_addr().map_err(|e| err(e.to_string()))?.port();
            (bound, std::os::fd::IntoRawFd::into_raw_fd(l))
        } else {
            (port, -1)
        };
        let mut out = std::ptr::null_mut();
        // SAFETY: valid C string and out-pointer; the shim catches every C++ exception. The
        // listening socket's ownership passes to the store.
        ffi::check(unsafe {
            ffi::dg_store_create(
                c_host.as_ptr(),
                port,
                is_master.into(),
                millis(timeout),
                millis(connect_timeout.max(Duration::from_millis(1))),
                listen_fd,
                &mut out,
            )
        })
        .map_err(err)?;
        let ptr = NonNull::new(out).ok_or_else(|| err("store creation returned null".into()))?;
        // SAFETY: a live store handle.
        let port = unsafe { ffi::dg_store_port(ptr.as_ptr()) };
        Ok(Arc::new(Store { ptr, host: host.to_string(), port }))
    }

    /// The port the store listens on (the bound one when created with port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `host:port`.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// A store seen through a group's key prefix.
struct Prefixed<'a> {
    store: &'a Store,
    prefix: &'a str,
}

impl KeyValue for Prefixed<'_> {
    fn set(&self, key: &str, value: &[u8]) -> std::result::Result<(), String> {
        let k = CString::new(format!("{}{key}", self.prefix)).map_err(|e| e.to_string())?;
        // SAFETY: live store, valid C string, `value` readable for its length.
        ffi::check(unsafe {
            ffi::dg_store_set(self.store.ptr.as_ptr(), k.as_ptr(), value.as_ptr(), value.len())
        })
    }

    fn get(&self, key: &str, timeout: Duration) -> std::result::Result<Vec<u8>, String> {
        let k = CString::new(format!("{}{key}", self.prefix)).map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 256];
        let mut len = 0usize;
        // SAFETY: live store, valid C string, `buf` writable for its length, `len` valid.
        ffi::check(unsafe {
            ffi::dg_store_get(
                self.store.ptr.as_ptr(),
                k.as_ptr(),
                millis(timeout),
                buf.as_mut_ptr(),
                buf.len(),
                &mut len,
            )
        })?;
        buf.truncate(len);
        Ok(buf)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: we own the handle; groups hold an Arc to us, so none outlives it.
        unsafe { ffi::dg_store_destroy(self.ptr.as_ptr()) }
    }
}

/// Settings of a group.
#[derive(Clone, Debug)]
pub struct GroupOptions {
    /// Bound on the rendezvous and on every collective: a dead or missing peer is an error
    /// naming the operation within this time.
    pub timeout: Duration,
    /// Agree on (op, dtype, element count, root) before each collective, so a rank that calls
    /// something else is an error naming the disagreement. Without it Gloo either returns a
    /// wrong sum on some ranks or aborts the process from its I/O thread ("op.preamble.length
    /// <= op.nbytes"), which no caller can catch; torch's default has that hazard. Costs two
    /// hops of 32 bytes over plain TCP per collective (see `check.rs` and `BENCHMARKS.md`).
    pub verify: bool,
    /// The address Gloo binds to. `None`: loopback when the store is on loopback, else the
    /// interfaces `GLOO_SOCKET_IFNAME` names, else the local address of the route to the
    /// store's host (see `gloo_device`).
    pub gloo_host: Option<String>,
    /// This group's generation and where newer ones are announced: its rendezvous is
    /// abandoned once one is. `None`: only the timeout ends it.
    pub abandon: Option<(Generations, u64)>,
}

impl Default for GroupOptions {
    fn default() -> Self {
        GroupOptions {
            timeout: Duration::from_secs(300),
            verify: true,
            gloo_host: None,
            abandon: None,
        }
    }
}

impl GroupOptions {
    /// These options with another timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// These options with shape verification on or off.
    pub fn with_verify(mut self, verify: bool) -> Self {
        self.verify = verify;
        self
    }

    /// These options for the group of `generation`, whose rendezvous is abandoned with
    /// [`DistError::Abandoned`] once `generations` holds a newer one.
    pub fn abandon_when_superseded(mut self, generations: Generations, generation: u64) -> Self {
        self.abandon = Some((generations, generation));
        self
    }

    /// `Err(Abandoned)` once a newer generation than this group's is assigned.
    fn check_abandoned(&self) -> Result<()> {
        match &self.abandon {
            Some((g, generation)) if g.newest() > *generation => {
                Err(DistError::Abandoned { generation: *generation, newer: g.newest() })
            }
            _ => Ok(()),
        }
    }
}

/// How a reduction combines the ranks' values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    /// Elementwise sum.
    Sum,
    /// Elementwise sum divided by the world size.
    Average,
}

/// One rank's handle on a c10d process group. Collectives block until done, and must be
/// called in the same order on every rank (hence `&mut self`).
#[derive(Debug)]
pub struct ProcessGroup {
    ptr: NonNull<ffi::DgGroup>,
    store: Arc<Store>,
    prefix: String,
    rank: u32,
    world_size: u32,
    backend: Backend,
    timeout: Duration,
    /// The agreement check; `None` when turned off or alone.
    check: Option<CheckChannel>,
}

// SAFETY: the group is used by one thread at a time (`&mut self` on every collective) and c10d
// backends may be driven from any thread.
unsafe impl Send for ProcessGroup {}

impl ProcessGroup {
    /// Joins the group the coordinator assigned: rank 0 hosts the TCPStore at
    /// `store.host:store.port`, everybody uses the generation's prefix.
    pub fn from_assignment(
        assignment: &RankAssignment,
        backend: Backend,
        options: &GroupOptions,
    ) -> Result<ProcessGroup> {
        let a = assignment;
        let store = Store::connect_abandonable(&a.store.host, a.store.port, a.rank == 0, options)?;
        ProcessGroup::with_store(store, &a.store.prefix, a.rank, a.world_size, backend, options)
    }

    /// Forms a group over `prefix` of an existing store: the re-rendezvous path, where the
    /// store outlives the generations.
    pub fn with_store(
        store: Arc<Store>,
        prefix: &str,
        rank: u32,
        world_size: u32,
        backend: Backend,
        options: &GroupOptions,
    ) -> Result<ProcessGroup> {
        let err = |message: String| DistError::Rendezvous {
            addr: store.addr(),
            prefix: prefix.to_string(),
            timeout: options.timeout,
            message,
        };
        backend.ensure_compiled()?;
        if world_size == 0 || rank >= world_size {
            return Err(err(format!("rank {rank} outside a world of size {world_size}")));
        }
        let c_prefix =
            CString::new(prefix).map_err(|_| err("prefix contains a NUL byte".into()))?;
        let gloo =
            gloo_device(options.gloo_host.as_deref(), &store.host, store.port, socket_ifname())
                .map_err(err)?;
        let c_gloo = CString::new(gloo).map_err(|_| err("gloo host contains NUL".into()))?;
        if world_size > 1 {
            arrive(&Prefixed { store: &store, prefix }, rank, world_size, options).map_err(
                |e| match e {
                    Arrival::Abandoned(a) => a,
                    Arrival::Missing(m) => err(m),
                },
            )?;
        }
        let mut out = std::ptr::null_mut();
        // SAFETY: live store, valid C strings and out-pointer; exceptions are caught in C++.
        ffi::check(unsafe {
            ffi::dg_group_create(
                store.ptr.as_ptr(),
                c_prefix.as_ptr(),
                rank as i32,
                world_size as i32,
                backend as i32,
                millis(options.timeout),
                c_gloo.as_ptr(),
                &mut out,
            )
        })
        .map_err(err)?;
        let ptr = NonNull::new(out).ok_or_else(|| err("group creation returned null".into()))?;
        // Every rank passed the backend's rendezvous, so the star forms at once.
        let check = if options.verify && world_size > 1 {
            let host = check::listen_host(options.gloo_host.as_deref(), &store.host, store.port);
            let kv = Prefixed { store: &store, prefix };
            match CheckChannel::open(&kv, host, rank, world_size, options.timeout) {
                Ok(c) => Some(c),
                Err(e) => {
                    // SAFETY: created above, not shared yet.
                    unsafe { ffi::dg_group_destroy(ptr.as_ptr()) };
                    return Err(err(e));
                }
            }
        } else {
            None
        };
        Ok(ProcessGroup {
            ptr,
            store,
            prefix: prefix.to_string(),
            rank,
            world_size,
            backend,
            timeout: options.timeout,
            check,
        })
    }

    /// This rank.
    pub fn rank(&self) -> u32 {
        self.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> u32 {
        self.world_size
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The generation's store prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The store, to form the next generation on.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Reduces `tensor` in place across all ranks.
    pub fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<()> {
        const OP: &str = "all_reduce";
        check_tensor(OP, tensor)?;
        self.agree(OP, Signature::new(Op::AllReduce, described(tensor), 0))?;
        let t = tensor.as_mut_ptr().cast();
        // SAFETY: live group and tensor; the shim blocks until c10d is done with the tensor.
        let r = unsafe { ffi::dg_all_reduce(self.ptr.as_ptr(), t, average(op)) };
        self.done(OP, r)
    }

    /// Reduces many tensors in place, packed into one flat buffer per dtype so small
    /// parameters cost one collective instead of one each. Works for parameters and gradients
    /// alike; autograd does not see the write.
    pub fn all_reduce_many(&mut self, tensors: &mut [Tensor], op: ReduceOp) -> Result<()> {
        const OP: &str = "all_reduce";
        let _guard = tch::no_grad_guard();
        let mut kinds: Vec<Kind> = Vec::new();
        for t in tensors.iter() {
            check_tensor(OP, t)?;
            if !kinds.contains(&t.kind()) {
                kinds.push(t.kind());
            }
        }
        for kind in kinds {
            let idx: Vec<usize> =
                (0..tensors.len()).filter(|&i| tensors[i].kind() == kind).collect();
            let flats: Vec<Tensor> =
                idx.iter().map(|&i| tensors[i].f_reshape([-1])).collect::<Result<_, _>>()?;
            let mut buf = Tensor::f_cat(&flats, 0)?;
            self.all_reduce(&mut buf, op)?;
            let mut offset = 0;
            for &i in &idx {
                let n = tensors[i].numel() as i64;
                let part = buf.f_narrow(0, offset, n)?.f_view_as(&tensors[i])?;
                tensors[i].f_copy_(&part)?;
                offset += n;
            }
        }
        Ok(())
    }

    /// Every rank's `tensor`, in rank order. All ranks must pass the same shape and dtype.
    pub fn all_gather(&mut self, tensor: &Tensor) -> Result<Vec<Tensor>> {
        let input = tensor.f_contiguous()?;
        check_tensor("all_gather", &input)?;
        let mut shape = vec![self.world_size as i64];
        shape.extend(input.size());
        // Allocated from the input (an expanded view has no storage of its own, so empty_like
        // makes a fresh contiguous buffer): tch cannot name NPU devices.
        let mut out = input.f_unsqueeze(0)?.f_expand(shape.as_slice(), false)?.f_empty_like()?;
        self.all_gather_into(&mut out, &input)?;
        Ok((0..self.world_size as i64).map(|r| out.select(0, r)).collect())
    }

    /// Gathers every rank's `input` into the flat `output` (`world_size * numel(input)`
    /// elements, rank r's at offset `r * numel(input)`): the sharded optimizer's gather.
    pub fn all_gather_into(&mut self, output: &mut Tensor, input: &Tensor) -> Result<()> {
        const OP: &str = "all_gather";
        // The input is only read, so a contiguous copy serves; the output is written in place.
        let input = input.f_contiguous()?;
        check_tensor(OP, &input)?;
        check_tensor(OP, output)?;
        self.check_sizes(OP, output, &input)?;
        let sig = Signature::new(Op::AllGather, described(&input), output.numel() as i64);
        self.agree(OP, sig)?;
        let out = output.as_mut_ptr().cast();
        let inp = input.as_ptr().cast_mut().cast();
        // SAFETY: live group and tensors; c10d only reads the input.
        let r = unsafe { ffi::dg_all_gather_into(self.ptr.as_ptr(), out, inp) };
        self.done(OP, r)
    }

    /// [`Self::all_gather_into`], started: returns at once with the pending gather, which
    /// [`Pending::wait`] finishes. The ranks agree on the collective before it starts, as for
    /// every other; collectives are then issued in call order on every rank, so later ones
    /// (a reduce-scatter, the next gather) may be called while this one runs.
    pub fn start_all_gather_into(&mut self, output: Tensor, input: &Tensor) -> Result<Pending> {
        const OP: &str = "all_gather";
        let input = input.f_contiguous()?;
        check_tensor(OP, &input)?;
        check_tensor(OP, &output)?;
        self.check_sizes(OP, &output, &input)?;
        let sig = Signature::new(Op::AllGather, described(&input), output.numel() as i64);
        self.agree(OP, sig)?;
        let mut output = output;
        let out = output.as_mut_ptr().cast();
        let inp = input.as_ptr().cast_mut().cast();
        let mut work = std::ptr::null_mut();
        // SAFETY: live group and tensors; `Pending` keeps both tensors until the work is done.
        let r = unsafe { ffi::dg_all_gather_into_start(self.ptr.as_ptr(), out, inp, &mut work) };
        self.done(OP, r)?;
        let work = NonNull::new(work).ok_or_else(|| self.failed(OP, "no work returned".into()))?;
        let failed = Some(self.failed(OP, String::new()));
        Ok(Pending { work: Some(work), output, _input: input, failed })
    }

    /// Reduces the flat `input` (`world_size * numel(output)` elements) across ranks and
    /// leaves this rank's slice (offset `rank * numel(output)`) in `output`.
    pub fn reduce_scatter(
        &mut self,
        output: &mut Tensor,
        input: &Tensor,
        op: ReduceOp,
    ) -> Result<()> {
        const OP: &str = "reduce_scatter";
        // The input is only read, so a contiguous copy serves; the output is written in place.
        let input = input.f_contiguous()?;
        check_tensor(OP, &input)?;
        check_tensor(OP, output)?;
        self.check_sizes(OP, &input, output)?;
        let sig = Signature::new(Op::ReduceScatter, described(&input), output.numel() as i64);
        self.agree(OP, sig)?;
        let out = output.as_mut_ptr().cast();
        let inp = input.as_ptr().cast_mut().cast();
        // SAFETY: live group and tensors; the shim blocks until c10d is done with both.
        let r = unsafe { ffi::dg_reduce_scatter(self.ptr.as_ptr(), out, inp, average(op)) };
        self.done(OP, r)
    }

    /// Overwrites `tensor` on every rank with rank `root`'s.
    pub fn broadcast(&mut self, tensor: &mut Tensor, root: u32) -> Result<()> {
        const OP: &str = "broadcast";
        check_tensor(OP, tensor)?;
        if root >= self.world_size {
            return Err(DistError::BadTensor {
                op: OP,
                message: format!("root {root} outside a world of size {}", self.world_size),
            });
        }
        self.agree(OP, Signature::new(Op::Broadcast, described(tensor), i64::from(root)))?;
        let t = tensor.as_mut_ptr().cast();
        // SAFETY: live group and tensor; the shim blocks until c10d is done with it.
        let r = unsafe { ffi::dg_broadcast(self.ptr.as_ptr(), t, root as i32) };
        self.done(OP, r)
    }

    /// Returns once every rank has reached the barrier.
    pub fn barrier(&mut self) -> Result<()> {
        self.agree("barrier", Signature::new(Op::Barrier, None, 0))?;
        // SAFETY: live group.
        let r = unsafe { ffi::dg_barrier(self.ptr.as_ptr()) };
        self.done("barrier", r)
    }

    fn done(&self, op: &'static str, r: *mut std::ffi::c_char) -> Result<()> {
        ffi::check(r).map_err(|message| self.failed(op, message))
    }

    fn failed(&self, op: &'static str, message: String) -> DistError {
        DistError::Collective {
            op,
            rank: self.rank,
            world_size: self.world_size,
            timeout: self.timeout,
            message,
        }
    }

    /// Runs the agreement check, when on.
    fn agree(&mut self, op: &'static str, sig: Signature) -> Result<()> {
        let r = match &mut self.check {
            Some(c) => c.agree(sig),
            None => return Ok(()),
        };
        r.map_err(|m| self.failed(op, m))
    }

    /// `big` must hold `world_size` times the elements of `small`, in the same dtype (the
    /// gather's output, the scatter's input); refused before any rank communicates.
    fn check_sizes(&self, op: &'static str, big: &Tensor, small: &Tensor) -> Result<()> {
        let (big_n, small_n) = (big.numel(), small.numel());
        let message = if big.kind() != small.kind() {
            format!("dtypes differ: {:?} and {:?}", big.kind(), small.kind())
        } else if big_n != small_n * self.world_size as usize {
            format!(
                "the flat buffer has {big_n} elements, expected {} (world size {} x {small_n})",
                small_n * self.world_size as usize,
                self.world_size
            )
        } else {
            return Ok(());
        };
        Err(DistError::BadTensor { op, message })
    }
}

/// A started all-gather ([`ProcessGroup::start_all_gather_into`]). Its tensors live as long as
/// it does; dropped without [`Pending::wait`], it still waits (bounded by the group's timeout),
/// so that c10d never writes into freed memory.
#[derive(Debug)]
pub struct Pending {
    work: Option<NonNull<ffi::DgWork>>,
    output: Tensor,
    _input: Tensor,
    /// The error a failed wait reports, its message filled in then.
    failed: Option<DistError>,
}

impl Pending {
    /// Waits for the gather and returns its output.
    pub fn wait(mut self) -> Result<Tensor> {
        let work = self.work.take().expect("a pending work until waited for");
        // SAFETY: the work came from dg_all_gather_into_start and is waited for once.
        let r = unsafe { ffi::dg_work_wait(work.as_ptr()) };
        if let Err(m) = ffi::check(r) {
            let mut e = self.failed.take().expect("set at start");
            if let DistError::Collective { message, .. } = &mut e {
                *message = m;
            }
            return Err(e);
        }
        Ok(self.output.shallow_clone())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(work) = self.work.take() {
            // SAFETY: as in `wait`; an error here has no one to go to.
            let _ = ffi::check(unsafe { ffi::dg_work_wait(work.as_ptr()) });
        }
    }
}

// SAFETY: the work is only touched by its owner (wait or drop), from one thread at a time.
unsafe impl Send for Pending {}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: we own the handle; the store (held by our Arc) outlives it.
        unsafe { ffi::dg_group_destroy(self.ptr.as_ptr()) }
    }
}

/// Refuses what c10d would refuse, before any rank starts communicating.
fn check_tensor(op: &'static str, t: &Tensor) -> Result<()> {
    let bad = |message: String| Err(DistError::BadTensor { op, message });
    match t.kind() {
        Kind::Float | Kind::BFloat16 | Kind::Half => {}
        k => {
            return bad(format!(
                "dtype {k:?} is not supported: collectives take Float, BFloat16 or Half"
            ));
        }
    }
    if !t.is_contiguous() {
        return bad(format!(
            "tensor of shape {:?} is not contiguous; call .contiguous() first",
            t.size()
        ));
    }
    Ok(())
}

fn described(t: &Tensor) -> Option<(Kind, usize)> {
    Some((t.kind(), t.numel()))
}

fn average(op: ReduceOp) -> i32 {
    i32::from(op == ReduceOp::Average)
}

enum Arrival {
    Abandoned(DistError),
    Missing(String),
}

/// Waits until every rank of the group has arrived on its prefix, looking every [`POLL`]
/// whether the generation has been abandoned. The backend's own rendezvous (Gloo's pair
/// exchange, NCCL's unique id) blocks for its whole timeout and cannot be called off, so it
/// starts only once every peer is known to be there.
fn arrive(
    kv: &dyn KeyValue,
    rank: u32,
    world_size: u32,
    options: &GroupOptions,
) -> Result<(), Arrival> {
    const KEY: &str = "dancegrpo_arrived/";
    kv.set(&format!("{KEY}{rank}"), b"1").map_err(Arrival::Missing)?;
    let deadline = Instant::now() + options.timeout;
    let mut missing: Vec<u32> = (0..world_size).filter(|r| *r != rank).collect();
    while let Some(&peer) = missing.first() {
        let asked = Instant::now();
        match kv.get(&format!("{KEY}{peer}"), POLL) {
            Ok(_) => {
                missing.remove(0);
            }
            Err(e) => {
                options.check_abandoned().map_err(Arrival::Abandoned)?;
                if Instant::now() >= deadline {
                    return Err(Arrival::Missing(format!(
                        "rank(s) {missing:?} of {world_size} did not arrive within {:?} ({e})",
                        options.timeout
                    )));
                }
                // A broken store answers at once: do not spin on it.
                std::thread::sleep(POLL.saturating_sub(asked.elapsed()));
            }
        }
    }
    Ok(())
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The variable that names the network interfaces Gloo's sockets use, as in torch.
const GLOO_SOCKET_IFNAME: &str = "GLOO_SOCKET_IFNAME";

/// `GLOO_SOCKET_IFNAME` when set and not empty.
fn socket_ifname() -> Option<String> {
    std::env::var(GLOO_SOCKET_IFNAME).ok().filter(|v| !v.trim().is_empty())
}

/// Where Gloo's sockets go, as the shim takes it: `if:NAME[,NAME...]` for interfaces, else a
/// host to bind to. In order: `gloo_host`; loopback when the store is there; the interfaces
/// of `GLOO_SOCKET_IFNAME` (torch's rule: a comma-separated list, one Gloo device each), each
/// checked to exist here; else the local address of the route to the store's host. torch's
/// last resort is the address this host's name resolves to, which on clusters is often
/// 127.0.1.1 or an interface the other hosts cannot reach, and then every rank hangs in
/// connectFullMesh; every rank reaches the store's host, so the route there is reachable.
fn gloo_device(
    gloo_host: Option<&str>,
    store_host: &str,
    store_port: u16,
    ifname: Option<String>,
) -> std::result::Result<String, String> {
    if let Some(h) = gloo_host.filter(|h| !h.is_empty()) {
        return Ok(h.to_string());
    }
    if is_loopback(store_host) {
        return Ok("127.0.0.1".into());
    }
    if let Some(list) = ifname {
        return Ok(format!("if:{}", ifnames(&list)?.join(",")));
    }
    Ok(check::listen_host(None, store_host, store_port).to_string())
}

/// The interfaces of a `GLOO_SOCKET_IFNAME` value, each checked to exist here.
fn ifnames(list: &str) -> std::result::Result<Vec<&str>, String> {
    let names: Vec<&str> = list.split(',').map(str::trim).filter(|n| !n.is_empty()).collect();
    let have = interfaces();
    match names.iter().find(|n| !have.iter().any(|h| h == *n)) {
        Some(missing) => Err(format!(
            "{GLOO_SOCKET_IFNAME}={list}: no interface {missing} on this host (it has: {})",
            have.join(", ")
        )),
        None => Ok(names),
    }
}

/// Checks `GLOO_SOCKET_IFNAME`, when set, at start-up: a misspelt interface is then one
/// message before the worker joins, not a failed rendezvous of every generation.
pub fn check_socket_ifname() -> std::result::Result<(), String> {
    socket_ifname().map_or(Ok(()), |list| ifnames(&list).map(drop))
}

/// This network namespace's interfaces, sorted.
fn interfaces() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host.parse::<std::net::IpAddr>().map(|ip| ip.is_loopback()).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gloo_binds_where_it_is_told_then_to_loopback_then_to_the_interfaces() {
        let d = |host, store, ifname: Option<&str>| {
            gloo_device(host, store, 1, ifname.map(String::from))
        };
        assert_eq!(d(Some("10.1.2.3"), "10.9.9.9", Some("lo")).unwrap(), "10.1.2.3");
        assert_eq!(d(None, "localhost", Some("lo")).unwrap(), "127.0.0.1");
        assert_eq!(d(None, "127.0.0.1", None).unwrap(), "127.0.0.1");
        assert_eq!(d(None, "10.9.9.9", Some("lo")).unwrap(), "if:lo");
        assert_eq!(d(None, "10.9.9.9", Some(" lo, lo ,")).unwrap(), "if:lo,lo");
    }

    #[test]
    fn an_interface_that_is_not_here_is_named_with_the_ones_that_are() {
        let e = gloo_device(None, "10.9.9.9", 1, Some("lo,nope7".into())).unwrap_err();
        assert!(e.starts_with("GLOO_SOCKET_IFNAME=lo,nope7: no interface nope7"), "{e}");
        assert!(e.contains("it has: ") && e.contains("lo"), "{e}");
    }

    #[test]
    fn without_ifname_gloo_binds_to_the_address_that_routes_to_the_store() {
        // Any address that is not loopback and is routed: the result is one of this host's.
        let host = gloo_device(None, "192.0.2.1", 1, None).unwrap();
        let ip: std::net::IpAddr = host.parse().unwrap_or_else(|e| panic!("{host}: {e}"));
        std::net::UdpSocket::bind((ip, 0)).unwrap_or_else(|e| panic!("bind {ip}: {e}"));
    }
}
