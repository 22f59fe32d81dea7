//! The agreement check run before every collective: all ranks must be about to call the same
//! operation on the same dtype and element count (and root), or none of them starts it.
//!
//! Without it a mismatch is not an error but a hazard: on different sizes Gloo returns a wrong
//! sum on some ranks, or aborts the whole process from its I/O thread ("op.preamble.length <=
//! op.nbytes"), which no caller can catch. torch only checks under `TORCH_DISTRIBUTED_DEBUG`,
//! with an extra Gloo collective per call.
//!
//! An extra Gloo collective is what this was first, and on small tensors it cost 10-25% of the
//! all-reduce: a Gloo call passes through the process group's work queue, its worker thread
//! and the transport's I/O thread on every rank. Here the check is a star of plain TCP
//! connections to rank 0, written and read by the calling thread: every rank sends its
//! 32-byte signature, rank 0 compares and answers each with the verdict. Two hops of a few
//! bytes, whatever the backend, and no device work for NCCL or HCCL.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use tch::Kind;

/// A collective's kind, as the check compares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op {
    AllReduce = 1,
    Broadcast,
    Barrier,
    AllGather,
    ReduceScatter,
}

impl Op {
    fn name(code: i64) -> &'static str {
        match code {
            1 => "all_reduce",
            2 => "broadcast",
            3 => "barrier",
            4 => "all_gather",
            5 => "reduce_scatter",
            _ => "an unknown operation",
        }
    }
}

/// What a rank is about to call: the operation, the tensor's dtype and element count (none
/// for a barrier) and the operation's extra argument (the root, or the output size).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Signature([i64; 4]);

const SIG_BYTES: usize = 32;
/// Verdict: status byte, the disagreeing rank, its signature and rank 0's.
const VERDICT_BYTES: usize = 1 + 4 + 2 * SIG_BYTES;
const HELLO_MAGIC: u32 = 0xD6C0_4EC4;

const KINDS: [Kind; 3] = [Kind::Float, Kind::BFloat16, Kind::Half];

impl Signature {
    pub(super) fn new(op: Op, tensor: Option<(Kind, usize)>, extra: i64) -> Self {
        let (kind, numel) = match tensor {
            Some((k, n)) => (KINDS.iter().position(|&x| x == k).map_or(-2, |i| i as i64), n as i64),
            None => (-1, -1),
        };
        Signature([op as i64, kind, numel, extra])
    }

    fn describe(&self) -> String {
        let [op, kind, numel, _] = self.0;
        let mut s = Op::name(op).to_string();
        if numel >= 0 {
            let kind = usize::try_from(kind).ok().and_then(|i| KINDS.get(i));
            s += &format!(
                " on {numel} elements of {}",
                kind.map_or("?".into(), |k| format!("{k:?}"))
            );
        }
        s
    }

    fn to_bytes(self) -> [u8; SIG_BYTES] {
        let mut b = [0u8; SIG_BYTES];
        for (chunk, v) in b.chunks_exact_mut(8).zip(self.0) {
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    fn from_bytes(b: &[u8]) -> Self {
        let mut v = [0i64; 4];
        for (x, chunk) in v.iter_mut().zip(b.chunks_exact(8)) {
            *x = i64::from_le_bytes(chunk.try_into().unwrap_or_default());
        }
        Signature(v)
    }
}

/// The disagreement message of `me`, whose signature is `mine`, against rank `other`'s.
fn disagreement(me: u32, mine: Signature, other: u32, theirs: Signature) -> String {
    let mut msg = format!(
        "ranks disagree on the collective: rank {me} calls {}, rank {other} calls {}",
        mine.describe(),
        theirs.describe()
    );
    if mine.0[0] == theirs.0[0] && mine.0[3] != theirs.0[3] {
        msg += &format!(" (root/size argument {} vs {})", mine.0[3], theirs.0[3]);
    }
    msg
}

enum Links {
    /// Rank 0: the connection of rank r at index r − 1.
    Root(Vec<TcpStream>),
    Leaf(TcpStream),
}

/// One rank's end of the check star.
pub(super) struct CheckChannel {
    rank: u32,
    links: Links,
    timeout: Duration,
    /// Set after a failed exchange: the star is out of step, so every later check fails.
    broken: Option<String>,
}

impl std::fmt::Debug for CheckChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckChannel").field("rank", &self.rank).finish_non_exhaustive()
    }
}

/// Store access the rendezvous needs (the group's prefixed TCPStore).
pub(super) trait KeyValue {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), String>;
    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, String>;
}

const ADDR_KEY: &str = "dancegrpo_check_addr";

impl CheckChannel {
    /// Forms the star: rank 0 listens on `host` (an address every rank reaches it at) and
    /// publishes it under the group's prefix; the others connect and introduce themselves.
    pub(super) fn open(
        store: &dyn KeyValue,
        host: IpAddr,
        rank: u32,
        world_size: u32,
        timeout: Duration,
    ) -> Result<Self, String> {
        let deadline = Instant::now() + timeout;
        let links = if rank == 0 {
            let listener = TcpListener::bind(SocketAddr::new(host, 0))
                .map_err(|e| format!("check channel: cannot listen on {host}: {e}"))?;
            let addr = listener.local_addr().map_err(|e| e.to_string())?;
            store.set(ADDR_KEY, addr.to_string().as_bytes())?;
            listener.set_nonblocking(true).map_err(|e| e.to_string())?;
            let mut slots: Vec<Option<TcpStream>> = (1..world_size).map(|_| None).collect();
            let mut joined = 0;
            while joined < slots.len() {
                let stream = match listener.accept() {
                    Ok((s, _)) => s,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        if Instant::now() >= deadline {
                            let missing: Vec<usize> = (1..world_size as usize)
                                .filter(|r| slots[r - 1].is_none())
                                .collect();
                            return Err(format!(
                                "check channel: ranks {missing:?} did not connect to {addr} \
                                 within {timeout:?}"
                            ));
                        }
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    Err(e) => return Err(format!("check channel: accept on {addr}: {e}")),
                };
                configure(&stream, timeout)?;
                let mut hello = [0u8; 8];
                read_exact(&stream, &mut hello, deadline, "a joining rank")?;
                let magic = u32::from_le_bytes(hello[..4].try_into().unwrap_or_default());
                let r = u32::from_le_bytes(hello[4..].try_into().unwrap_or_default()) as usize;
                if magic != HELLO_MAGIC || r == 0 || r >= world_size as usize {
                    return Err(format!(
                        "check channel: a connection to {addr} introduced itself as rank {r} \
                         (magic {magic:#x}) in a world of {world_size}"
                    ));
                }
                if slots[r - 1].replace(stream).is_some() {
                    return Err(format!("check channel: rank {r} connected twice"));
                }
                joined += 1;
            }
            Links::Root(slots.into_iter().flatten().collect())
        } else {
            let raw = store.get(ADDR_KEY, timeout)?;
            let text = String::from_utf8_lossy(&raw).into_owned();
            let addr: SocketAddr = text
                .parse()
                .map_err(|e| format!("check channel: bad address {text:?} from the store: {e}"))?;
            let left = deadline.saturating_duration_since(Instant::now()).max(MIN_WAIT);
            let stream = TcpStream::connect_timeout(&addr, left)
                .map_err(|e| format!("check channel: cannot connect to rank 0 at {addr}: {e}"))?;
            configure(&stream, timeout)?;
            let mut hello = [0u8; 8];
            hello[..4].copy_from_slice(&HELLO_MAGIC.to_le_bytes());
            hello[4..].copy_from_slice(&rank.to_le_bytes());
            (&stream)
                .write_all(&hello)
                .map_err(|e| format!("check channel: introducing to rank 0: {e}"))?;
            Links::Leaf(stream)
        };
        Ok(CheckChannel { rank, links, timeout, broken: None })
    }

    /// Agrees with every rank that all are about to call `mine`. A disagreement is an error
    /// on every rank and leaves the channel usable; a dead or silent peer is an error within
    /// the timeout and breaks it.
    pub(super) fn agree(&mut self, mine: Signature) -> Result<(), String> {
        if let Some(b) = &self.broken {
            return Err(format!("the check channel failed earlier ({b}); form a new group"));
        }
        let deadline = Instant::now() + self.timeout;
        let r = match &self.links {
            Links::Root(peers) => root_round(peers, mine, deadline),
            Links::Leaf(root) => leaf_round(root, self.rank, mine, deadline),
        };
        match r {
            Ok(None) => Ok(()),
            Ok(Some(msg)) => Err(msg),
            Err(e) => {
                let e = format!("{e} (before {}, timeout {:?})", mine.describe(), self.timeout);
                // Closing our ends wakes the ranks still waiting on us with an error now,
                // instead of at their timeout.
                match &self.links {
                    Links::Root(peers) => peers.iter().for_each(shutdown),
                    Links::Leaf(root) => shutdown(root),
                }
                self.broken = Some(e.clone());
                Err(e)
            }
        }
    }
}

/// Rank 0's half: collect, compare, answer. `Ok(Some(_))` is a disagreement.
fn root_round(
    peers: &[TcpStream],
    mine: Signature,
    deadline: Instant,
) -> Result<Option<String>, String> {
    let mut first: Option<(u32, Signature)> = None;
    let mut buf = [0u8; SIG_BYTES];
    for (i, p) in peers.iter().enumerate() {
        let r = i as u32 + 1;
        read_exact(p, &mut buf, deadline, &format!("rank {r}"))?;
        let theirs = Signature::from_bytes(&buf);
        if theirs != mine && first.is_none() {
            first = Some((r, theirs));
        }
    }
    let mut verdict = [0u8; VERDICT_BYTES];
    if let Some((r, theirs)) = first {
        verdict[0] = 1;
        verdict[1..5].copy_from_slice(&r.to_le_bytes());
        verdict[5..5 + SIG_BYTES].copy_from_slice(&theirs.to_bytes());
    }
    verdict[5 + SIG_BYTES..].copy_from_slice(&mine.to_bytes());
    for (i, mut p) in peers.iter().enumerate() {
        p.write_all(&verdict).map_err(|e| format!("answering rank {}: {e}", i + 1))?;
    }
    Ok(first.map(|(r, theirs)| disagreement(0, mine, r, theirs)))
}

/// A non-zero rank's half: send, await the verdict.
fn leaf_round(
    root: &TcpStream,
    me: u32,
    mine: Signature,
    deadline: Instant,
) -> Result<Option<String>, String> {
    let mut root_w = root;
    root_w.write_all(&mine.to_bytes()).map_err(|e| format!("sending to rank 0: {e}"))?;
    let mut v = [0u8; VERDICT_BYTES];
    read_exact(root, &mut v, deadline, "rank 0")?;
    if v[0] == 0 {
        return Ok(None);
    }
    let r = u32::from_le_bytes(v[1..5].try_into().unwrap_or_default());
    let theirs = Signature::from_bytes(&v[5..5 + SIG_BYTES]);
    let root_sig = Signature::from_bytes(&v[5 + SIG_BYTES..]);
    // Name the rank that differs from this one: rank 0 if we differ from it, else the first
    // rank rank 0 found different.
    Ok(Some(if mine != root_sig {
        disagreement(me, mine, 0, root_sig)
    } else {
        disagreement(me, mine, r, theirs)
    }))
}

/// Shortest wait a socket operation gets, so an expired deadline still fails cleanly.
const MIN_WAIT: Duration = Duration::from_millis(1);

/// Blocking, unbuffered (the messages are tiny and latency is the cost), writes bounded by
/// the collective timeout; reads get their deadline per call.
fn configure(s: &TcpStream, timeout: Duration) -> Result<(), String> {
    s.set_nonblocking(false).map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout.max(MIN_WAIT))).map_err(|e| e.to_string())
}

/// Reads exactly `buf.len()` bytes from `who` by `deadline`.
fn read_exact(
    mut s: &TcpStream,
    buf: &mut [u8],
    deadline: Instant,
    who: &str,
) -> Result<(), String> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("{who} did not answer the check in time"));
        }
        s.set_read_timeout(Some(left.max(MIN_WAIT))).map_err(|e| e.to_string())?;
        match s.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(format!("{who} closed its check connection (it died or left)"));
            }
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(format!("{who} did not answer the check in time"));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("{who}: {e} (it died or left)")),
        }
    }
    Ok(())
}

fn shutdown(s: &TcpStream) {
    // Already-closed sockets fail here; nothing more to do for them.
    let _ = s.shutdown(std::net::Shutdown::Both);
}

/// The address rank 0 listens on: `gloo_host` when given, loopback when the store is there,
/// else the local address of the route to the store's host (which every rank reaches).
pub(super) fn listen_host(gloo_host: Option<&str>, store_host: &str, store_port: u16) -> IpAddr {
    let resolve = |h: &str| {
        use std::net::ToSocketAddrs;
        (h, store_port).to_socket_addrs().ok().and_then(|mut a| a.next()).map(|a| a.ip())
    };
    if let Some(ip) = gloo_host.filter(|h| !h.is_empty()).and_then(resolve) {
        return ip;
    }
    match resolve(store_host) {
        Some(ip) if ip.is_loopback() => ip,
        Some(ip) => {
            // A UDP "connect" sends nothing; it only picks the route, whose source address
            // is what the other ranks, which reach the store's host, can reach us at.
            let any: IpAddr = if ip.is_ipv4() {
                Ipv4Addr::UNSPECIFIED.into()
            } else {
                "::".parse().unwrap_or(ip)
            };
            UdpSocket::bind(SocketAddr::new(any, 0))
                .and_then(|u| u.connect(SocketAddr::new(ip, store_port)).map(|()| u))
                .and_then(|u| u.local_addr())
                .map(|a| a.ip())
                .unwrap_or(ip)
        }
        None => Ipv4Addr::LOCALHOST.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::{Arc, Condvar, Mutex};

    /// An in-memory store; the real TCPStore is exercised by the loopback tests.
    #[derive(Default)]
    struct Mem(Mutex<HashMap<String, Vec<u8>>>, Condvar);

    impl KeyValue for Arc<Mem> {
        fn set(&self, key: &str, value: &[u8]) -> Result<(), String> {
            self.0.lock().unwrap().insert(key.into(), value.into());
            self.1.notify_all();
            Ok(())
        }
        fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, String> {
            let g = self.0.lock().unwrap();
            let (g, _) = self.1.wait_timeout_while(g, timeout, |m| !m.contains_key(key)).unwrap();
            g.get(key).cloned().ok_or_else(|| format!("no {key}"))
        }
    }

    fn star(world: u32, timeout: Duration) -> Vec<CheckChannel> {
        let store = Arc::new(Mem::default());
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let s = store.clone();
                std::thread::spawn(move || {
                    CheckChannel::open(&s, Ipv4Addr::LOCALHOST.into(), r, world, timeout).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    fn round(
        chans: Vec<CheckChannel>,
        sigs: Vec<Signature>,
    ) -> Vec<(CheckChannel, Result<(), String>)> {
        let handles: Vec<_> = chans
            .into_iter()
            .zip(sigs)
            .map(|(mut c, s)| {
                std::thread::spawn(move || {
                    let r = c.agree(s);
                    (c, r)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn agreement_passes_and_a_mismatch_fails_everywhere_naming_both_sides() {
        let chans = star(3, Duration::from_secs(10));
        let ok = Signature::new(Op::AllReduce, Some((Kind::Float, 5)), 0);
        let out = round(chans, vec![ok; 3]);
        assert!(out.iter().all(|(_, r)| r.is_ok()));
        let chans: Vec<_> = out.into_iter().map(|(c, _)| c).collect();
        let odd = Signature::new(Op::AllReduce, Some((Kind::BFloat16, 4)), 0);
        let out = round(chans, vec![ok, ok, odd]);
        for (i, (_, r)) in out.iter().enumerate() {
            let e = r.as_ref().unwrap_err();
            assert!(e.contains("ranks disagree"), "{i}: {e}");
            assert!(
                e.contains("5 elements of Float") && e.contains("4 elements of BFloat16"),
                "{e}"
            );
            assert!(e.contains("rank 2"), "{i}: {e}");
        }
        // A disagreement leaves the star in step.
        let chans: Vec<_> = out.into_iter().map(|(c, _)| c).collect();
        let bar = Signature::new(Op::Barrier, None, 0);
        assert!(round(chans, vec![bar; 3]).iter().all(|(_, r)| r.is_ok()));
    }

    #[test]
    fn a_silent_or_departed_peer_is_an_error_within_the_timeout() {
        let mut chans = star(3, Duration::from_millis(300));
        let gone = chans.pop().unwrap();
        let silent = chans.pop().unwrap();
        let mut root = chans.pop().unwrap();
        let sig = Signature::new(Op::Barrier, None, 0);
        let start = Instant::now();
        let e = root.agree(sig).unwrap_err();
        assert!(e.contains("rank 1 did not answer the check in time"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!(root.agree(sig).unwrap_err().contains("failed earlier"));
        drop(gone);
        // The root closed its ends: the silent rank now hears so at once.
        let mut silent = silent;
        let e = silent.agree(sig).unwrap_err();
        assert!(e.contains("rank 0 closed its check connection"), "{e}");
    }

    #[test]
    fn listen_host_prefers_the_configured_address_then_loopback() {
        assert_eq!(
            listen_host(Some("127.0.0.1"), "10.0.0.1", 1),
            IpAddr::from(Ipv4Addr::LOCALHOST)
        );
        assert!(listen_host(None, "localhost", 1).is_loopback());
    }
}
