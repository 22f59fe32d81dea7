// The narrow C ABI between the Rust `dist` and `device` modules and libtorch's c10d.
//
// Conventions, so the Rust side stays simple:
// - every function that can fail returns NULL on success, or an error message allocated with
//   malloc that the caller releases with dg_free_error; C++ exceptions never cross this boundary;
// - tensors travel as `at::Tensor*` (what tch's `as_mut_ptr()` hands out); a tensor the shim
//   creates is returned as a new heap `at::Tensor*` that the caller owns (tch `from_ptr`);
// - handles (stores, groups) are opaque and released with their destroy function.
#ifndef DANCEGRPO_DIST_SHIM_H
#define DANCEGRPO_DIST_SHIM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct dg_store dg_store;
typedef struct dg_group dg_group;
typedef void dg_tensor;  // at::Tensor
typedef struct dg_work dg_work;

// Backends: must match `Backend` in worker/src/dist/backend.rs.
enum { DG_BACKEND_GLOO = 0, DG_BACKEND_NCCL = 1, DG_BACKEND_HCCL = 2 };

void dg_free_error(char* err);

// Which backends this build compiled in, as a bit set of (1 << DG_BACKEND_*).
uint32_t dg_backends_compiled(void);

// A c10d::TCPStore: the server when is_master, a client otherwise. Clients retry until timeout.
// The server serves listen_fd, a socket the caller has bound and put in listening state, and
// takes it over (c10d would otherwise listen on every interface); -1 lets c10d bind `port`.
// A client gives up connecting after connect_timeout_ms; timeout_ms then bounds every store
// operation (and the group rendezvous on it).
char* dg_store_create(const char* host, uint16_t port, int is_master, int64_t timeout_ms,
                      int64_t connect_timeout_ms, int listen_fd, dg_store** out);
uint16_t dg_store_port(const dg_store* store);
void dg_store_destroy(dg_store* store);
// Sets `key` to the `len` bytes at `value`.
char* dg_store_set(dg_store* store, const char* key, const uint8_t* value, size_t len);
// Waits up to timeout_ms for `key`, then copies its value into buf (at most cap bytes; longer
// is an error) and its length into *len.
char* dg_store_get(dg_store* store, const char* key, int64_t timeout_ms, uint8_t* buf,
                   size_t cap, size_t* len);

// A c10d backend over a PrefixStore(prefix, store). Blocks until every rank arrived or timeout.
// gloo_host: where Gloo binds: "if:NAME[,NAME...]" (interfaces), a host, or NULL/"" (default).
char* dg_group_create(dg_store* store, const char* prefix, int rank, int size, int backend,
                      int64_t timeout_ms, const char* gloo_host, dg_group** out);
void dg_group_destroy(dg_group* group);

// Drops a tensor's .grad (torch's zero_grad(set_to_none=True)), which tch cannot do: the next
// backward then takes its gradient as it is instead of adding it to zeros.
char* dg_clear_grad(dg_tensor* tensor);

// Fixes libtorch's intra-op thread count at `threads` (at::set_num_threads, which also turns
// off MKL's dynamic thread adjustment) and turns off OpenMP's dynamic adjustment, so the team
// size, and with it every parallel reduction's order, does not follow the machine's load.
void dg_pin_threads(int threads);
// Whether OpenMP's and MKL's dynamic thread adjustment is on (bit 0: OpenMP, bit 1: MKL);
// a runtime that is not loaded counts as off.
uint32_t dg_dynamic_threads(void);

// Collectives, all blocking until done (or timed out). `average` divides the sum by the size.
char* dg_all_reduce(dg_group* group, dg_tensor* tensor, int average);
char* dg_broadcast(dg_group* group, dg_tensor* tensor, int root);
char* dg_barrier(dg_group* group);
// output is a flat buffer of size * numel(input) elements, rank r's input landing at r * numel.
char* dg_all_gather_into(dg_group* group, dg_tensor* output, dg_tensor* input);
// input is a flat buffer of size * numel(output) elements; output gets this rank's reduced slice.
char* dg_reduce_scatter(dg_group* group, dg_tensor* output, dg_tensor* input, int average);
// dg_all_gather_into, started and not waited for: *out is the pending work, which
// dg_work_wait waits for (bounded by the group's timeout) and frees, also after the group is
// destroyed. Both tensors must stay alive and untouched until then.
char* dg_all_gather_into_start(dg_group* group, dg_tensor* output, dg_tensor* input,
                               dg_work** out);
char* dg_work_wait(dg_work* work);

// Device layer helpers for devices tch cannot name (NPU = c10 PrivateUse1). Only in npu builds.
char* dg_npu_init(int index);
char* dg_npu_to(dg_tensor* tensor, int index, dg_tensor** out);
char* dg_npu_synchronize(int index);
char* dg_npu_device_count(int* out);

#ifdef __cplusplus
}
#endif

#endif
