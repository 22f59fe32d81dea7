// c10d collectives behind the C ABI of dist_shim.h: a TCPStore for the rendezvous, a
// PrefixStore per group generation, and one c10d Backend (Gloo, NCCL or HCCL) per group.
//
// Every entry point catches every exception and returns its message, because an exception
// unwinding into Rust frames is undefined behaviour, and an abort would take the worker down
// with it instead of letting it report the failure and re-rendezvous.

#include "dist_shim.h"

#include <dlfcn.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#ifdef DG_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#ifdef DG_WITH_HCCL
#include <torch_npu/csrc/distributed/ProcessGroupHCCL.hpp>
#endif

#ifndef USE_C10D_GLOO
#error "dist_shim.cpp must be compiled with -DUSE_C10D_GLOO (see worker/build.rs)"
#endif

struct dg_store {
  c10::intrusive_ptr<c10d::Store> store;
  uint16_t port;
};

struct dg_group {
  c10::intrusive_ptr<c10d::Backend> backend;
  int rank;
  int size;
  int kind;
  std::chrono::milliseconds timeout;
};

// A started collective. It keeps its group's timeout: it may be waited for after the group is
// gone (a destroyed ProcessGroupGloo first finishes its queued work, and the work keeps what
// it ran on), so that its buffers are never freed while c10d writes them.
struct dg_work {
  c10::intrusive_ptr<c10d::Work> work;
  std::chrono::milliseconds timeout;
};

namespace {

char* dup_message(const std::string& msg) {
  char* out = static_cast<char*>(std::malloc(msg.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, msg.c_str(), msg.size() + 1);
  }
  return out;
}

// Runs f, turning any exception into an error message (c10 errors without their backtrace).
template <typename F>
char* guarded(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const c10::Error& e) {
    return dup_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return dup_message(e.what());
  } catch (...) {
    return dup_message("unknown C++ exception");
  }
}

at::Tensor& as_tensor(dg_tensor* t) {
  TORCH_CHECK(t != nullptr, "null tensor");
  return *static_cast<at::Tensor*>(t);
}

void check_dtype(const at::Tensor& t) {
  auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf,
              "unsupported dtype ", s, ": collectives take float32, bfloat16 or float16");
  TORCH_CHECK(t.is_contiguous(), "collectives need a contiguous tensor");
}

// Blocks until the work is done. The timeout bounds the wait itself too, so a stalled backend
// cannot outlive the configured timeout even if its own transport timeout misfires.
// With NCCL and HCCL this blocks the CPU too, because dg_group_create turns on their blocking
// wait: their default instead lets a watchdog thread abort the process on a timeout.
void wait(dg_group* g, const c10::intrusive_ptr<c10d::Work>& work) {
  work->wait(g->timeout);
}

// Gloo and HCCL have no AVG reduction for every dtype; sum and divide there.
c10d::ReduceOp reduce_op(const dg_group* g, bool average) {
#ifdef DG_WITH_NCCL
  if (average && g->kind == DG_BACKEND_NCCL) {
    return c10d::ReduceOp::AVG;
  }
#endif
  (void)g;
  (void)average;
  return c10d::ReduceOp::SUM;
}

bool divide_after(const dg_group* g, bool average) {
  return average && g->size > 1 && reduce_op(g, average) != c10d::ReduceOp::AVG;
}

// The Gloo devices of `spec`: "if:NAME[,NAME...]" one per interface (as torch reads
// GLOO_SOCKET_IFNAME), another non-empty string the host to bind to, else torch's default.
std::vector<std::shared_ptr<::gloo::transport::Device>> gloo_devices(const char* spec) {
  std::vector<std::shared_ptr<::gloo::transport::Device>> out;
  std::string s = spec == nullptr ? "" : spec;
  if (s.rfind("if:", 0) == 0) {
    std::stringstream names(s.substr(3));
    std::string name;
    while (std::getline(names, name, ',')) {
      if (!name.empty()) out.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(name));
    }
  } else if (!s.empty()) {
    out.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(s));
  }
  if (out.empty()) out.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
  return out;
}

}  // namespace

extern "C" {

void dg_free_error(char* err) { std::free(err); }

uint32_t dg_backends_compiled(void) {
  uint32_t bits = 1u << DG_BACKEND_GLOO;
#ifdef DG_WITH_NCCL
  bits |= 1u << DG_BACKEND_NCCL;
#endif
#ifdef DG_WITH_HCCL
  bits |= 1u << DG_BACKEND_HCCL;
#endif
  return bits;
}

char* dg_store_create(const char* host, uint16_t port, int is_master, int64_t timeout_ms,
                      int64_t connect_timeout_ms, int listen_fd, dg_store** out) {
  return guarded([&] {
    TORCH_CHECK(host != nullptr && out != nullptr, "null argument");
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = is_master != 0;
    // Ranks arrive through the group rendezvous, which has its own timeout; the server need not
    // wait for them here, and a later generation may have a different world size.
    opts.waitWorkers = false;
    // The client's connect retries until opts.timeout; a short one lets the caller give up on
    // a store that is gone (see Store::connect_abandonable) between tries.
    opts.timeout = std::chrono::milliseconds(connect_timeout_ms);
    if (opts.isServer && listen_fd >= 0) {
      opts.masterListenFd = listen_fd;
    }
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    store->setTimeout(std::chrono::milliseconds(timeout_ms));
    uint16_t bound = store->getPort();
    *out = new dg_store{store, bound};
  });
}

uint16_t dg_store_port(const dg_store* store) { return store->port; }

void dg_store_destroy(dg_store* store) {
  // The TCPStore destructor closes sockets and joins its thread; it does not throw.
  delete store;
}

char* dg_store_set(dg_store* store, const char* key, const uint8_t* value, size_t len) {
  return guarded([&] {
    TORCH_CHECK(store != nullptr && key != nullptr && (value != nullptr || len == 0),
                "null argument");
    store->store->set(std::string(key), std::vector<uint8_t>(value, value + len));
  });
}

char* dg_store_get(dg_store* store, const char* key, int64_t timeout_ms, uint8_t* buf,
                   size_t cap, size_t* len) {
  return guarded([&] {
    TORCH_CHECK(store != nullptr && key != nullptr && buf != nullptr && len != nullptr,
                "null argument");
    std::string k(key);
    store->store->wait({k}, std::chrono::milliseconds(timeout_ms));
    std::vector<uint8_t> v = store->store->get(k);
    TORCH_CHECK(v.size() <= cap, "store value of ", k, " has ", v.size(),
                " bytes, more than the ", cap, " expected");
    std::memcpy(buf, v.data(), v.size());
    *len = v.size();
  });
}

char* dg_group_create(dg_store* store, const char* prefix, int rank, int size, int backend,
                      int64_t timeout_ms, const char* gloo_host, dg_group** out) {
  return guarded([&] {
    TORCH_CHECK(store != nullptr && prefix != nullptr && out != nullptr, "null argument");
    TORCH_CHECK(size >= 1 && rank >= 0 && rank < size, "rank ", rank,
                " outside a world of size ", size);
    auto timeout = std::chrono::milliseconds(timeout_ms);
    if (backend != DG_BACKEND_GLOO) {
      // Errors and timeouts must come back from wait() as exceptions, never as the watchdog's
      // process abort. An explicit setting by the operator wins (no overwrite).
      setenv("TORCH_NCCL_BLOCKING_WAIT", "1", 0);
      setenv("TORCH_HCCL_BLOCKING_WAIT", "1", 0);
    }
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), store->store);
    prefixed->setTimeout(timeout);
    c10::intrusive_ptr<c10d::Backend> pg;
    switch (backend) {
      case DG_BACKEND_GLOO: {
        auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
        opts->devices = gloo_devices(gloo_host);
        pg = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, size, opts);
        break;
      }
#ifdef DG_WITH_NCCL
      case DG_BACKEND_NCCL: {
        auto opts = c10d::ProcessGroupNCCL::Options::create();
        opts->timeout = timeout;
        pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, rank, size, opts);
        break;
      }
#endif
#ifdef DG_WITH_HCCL
      case DG_BACKEND_HCCL: {
        auto opts = c10d_npu::ProcessGroupHCCL::Options::create();
        opts->timeout = timeout;
        opts->opTimeout = timeout;
        pg = c10::make_intrusive<c10d_npu::ProcessGroupHCCL>(prefixed, rank, size, opts);
        break;
      }
#endif
      default:
        TORCH_CHECK(false, "backend ", backend, " is not compiled into this build");
    }
    *out = new dg_group{pg, rank, size, backend, timeout};
  });
}

void dg_group_destroy(dg_group* group) { delete group; }

// The OpenMP runtime (torch's bundled libgomp) and MKL (inside libtorch_cpu on x86) are looked
// up at run time: the shim does not link either, and a build without MKL has no such symbol.
// MKL's C entry points are the `MKL_*` names (mkl.h maps `mkl_set_dynamic` onto them); the
// lower-case `mkl_set_dynamic` symbol is its Fortran interface, which takes a pointer.
static void* runtime_symbol(const char* name) { return dlsym(RTLD_DEFAULT, name); }

void dg_pin_threads(int threads) {
  if (auto omp_set_dynamic = reinterpret_cast<void (*)(int)>(runtime_symbol("omp_set_dynamic"))) {
    omp_set_dynamic(0);
  }
  if (auto mkl_set_dynamic = reinterpret_cast<void (*)(int)>(runtime_symbol("MKL_Set_Dynamic"))) {
    mkl_set_dynamic(0);
  }
  at::set_num_threads(threads);
}

uint32_t dg_dynamic_threads(void) {
  uint32_t bits = 0;
  if (auto omp_get_dynamic = reinterpret_cast<int (*)()>(runtime_symbol("omp_get_dynamic"))) {
    bits |= omp_get_dynamic() ? 1u : 0u;
  }
  if (auto mkl_get_dynamic = reinterpret_cast<int (*)()>(runtime_symbol("MKL_Get_Dynamic"))) {
    bits |= mkl_get_dynamic() ? 2u : 0u;
  }
  return bits;
}

char* dg_clear_grad(dg_tensor* tensor) {
  return guarded([&] { as_tensor(tensor).mutable_grad().reset(); });
}

char* dg_all_reduce(dg_group* g, dg_tensor* tensor, int average) {
  return guarded([&] {
    at::Tensor& t = as_tensor(tensor);
    check_dtype(t);
    std::vector<at::Tensor> ts{t};
    c10d::AllreduceOptions opts;
    opts.reduceOp = reduce_op(g, average != 0);
    opts.timeout = g->timeout;
    wait(g, g->backend->allreduce(ts, opts));
    if (divide_after(g, average != 0)) {
      t.div_(g->size);
    }
  });
}

char* dg_broadcast(dg_group* g, dg_tensor* tensor, int root) {
  return guarded([&] {
    at::Tensor& t = as_tensor(tensor);
    check_dtype(t);
    TORCH_CHECK(root >= 0 && root < g->size, "broadcast root ", root,
                " outside a world of size ", g->size);
    std::vector<at::Tensor> ts{t};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.timeout = g->timeout;
    wait(g, g->backend->broadcast(ts, opts));
  });
}

char* dg_barrier(dg_group* g) {
  return guarded([&] {
    c10d::BarrierOptions opts;
    opts.timeout = g->timeout;
    wait(g, g->backend->barrier(opts));
  });
}

char* dg_all_gather_into(dg_group* g, dg_tensor* output, dg_tensor* input) {
  return guarded([&] {
    at::Tensor& out = as_tensor(output);
    at::Tensor& in = as_tensor(input);
    check_dtype(in);
    check_dtype(out);
    TORCH_CHECK(out.scalar_type() == in.scalar_type(), "all_gather output dtype ",
                out.scalar_type(), " differs from input dtype ", in.scalar_type());
    TORCH_CHECK(out.numel() == in.numel() * g->size, "all_gather output has ", out.numel(),
                " elements, expected ", in.numel() * g->size, " (world size ", g->size,
                " x input ", in.numel(), ")");
    at::Tensor flat_out = out.view({-1});
    at::Tensor flat_in = in.view({-1});
    c10d::AllgatherOptions opts;
    opts.timeout = g->timeout;
    wait(g, g->backend->_allgather_base(flat_out, flat_in, opts));
  });
}

char* dg_all_gather_into_start(dg_group* g, dg_tensor* output, dg_tensor* input,
                               dg_work** out) {
  *out = nullptr;
  return guarded([&] {
    at::Tensor& o = as_tensor(output);
    at::Tensor& in = as_tensor(input);
    check_dtype(in);
    check_dtype(o);
    TORCH_CHECK(o.scalar_type() == in.scalar_type(), "all_gather output dtype ",
                o.scalar_type(), " differs from input dtype ", in.scalar_type());
    TORCH_CHECK(o.numel() == in.numel() * g->size, "all_gather output has ", o.numel(),
                " elements, expected ", in.numel() * g->size, " (world size ", g->size,
                " x input ", in.numel(), ")");
    at::Tensor flat_out = o.view({-1});
    at::Tensor flat_in = in.view({-1});
    c10d::AllgatherOptions opts;
    opts.timeout = g->timeout;
    *out = new dg_work{g->backend->_allgather_base(flat_out, flat_in, opts), g->timeout};
  });
}

char* dg_work_wait(dg_work* work) {
  std::unique_ptr<dg_work> owned(work);
  return guarded([&] { owned->work->wait(owned->timeout); });
}

char* dg_reduce_scatter(dg_group* g, dg_tensor* output, dg_tensor* input, int average) {
  return guarded([&] {
    at::Tensor& out = as_tensor(output);
    at::Tensor& in = as_tensor(input);
    check_dtype(in);
    check_dtype(out);
    TORCH_CHECK(out.scalar_type() == in.scalar_type(), "reduce_scatter output dtype ",
                out.scalar_type(), " differs from input dtype ", in.scalar_type());
    TORCH_CHECK(in.numel() == out.numel() * g->size, "reduce_scatter input has ", in.numel(),
                " elements, expected ", out.numel() * g->size, " (world size ", g->size,
                " x output ", out.numel(), ")");
    at::Tensor flat_out = out.view({-1});
    at::Tensor flat_in = in.view({-1});
    c10d::ReduceScatterOptions opts;
    opts.reduceOp = reduce_op(g, average != 0);
    opts.timeout = g->timeout;
    wait(g, g->backend->_reduce_scatter_base(flat_out, flat_in, opts));
    if (divide_after(g, average != 0)) {
      out.div_(g->size);
    }
  });
}

}  // extern "C"
