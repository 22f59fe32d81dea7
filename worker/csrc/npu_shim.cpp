// The NPU half of the device layer: tch has no NPU device, so tensors reach `npu:N` (c10's
// PrivateUse1, which torch_npu renames "npu") through these entry points. Compiled only with
// the `npu` feature, against the torch-npu wheel's headers (see deploy/ASCEND.md).

#include "dist_shim.h"

#include <cstdlib>
#include <cstring>
#include <string>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch_npu/csrc/core/npu/NPUFunctions.h>
#include <torch_npu/csrc/libs/init_npu.h>

namespace {

char* npu_message(const std::string& msg) {
  char* out = static_cast<char*>(std::malloc(msg.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, msg.c_str(), msg.size() + 1);
  }
  return out;
}

template <typename F>
char* npu_guarded(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const c10::Error& e) {
    return npu_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return npu_message(e.what());
  } catch (...) {
    return npu_message("unknown C++ exception");
  }
}

at::Device npu(int index) {
  return at::Device(c10::DeviceType::PrivateUse1, static_cast<c10::DeviceIndex>(index));
}

}  // namespace

extern "C" {

char* dg_npu_init(int index) {
  // init_npu reads ASCEND_RT_VISIBLE_DEVICES through the CANN runtime: index counts visible
  // devices only.
  return npu_guarded([&] { torch_npu::init_npu(npu(index)); });
}

char* dg_npu_to(dg_tensor* tensor, int index, dg_tensor** out) {
  return npu_guarded([&] {
    TORCH_CHECK(tensor != nullptr && out != nullptr, "null argument");
    const at::Tensor& t = *static_cast<at::Tensor*>(tensor);
    at::Tensor moved = index < 0 ? t.cpu() : t.to(npu(index));
    *out = new at::Tensor(std::move(moved));
  });
}

char* dg_npu_synchronize(int index) {
  return npu_guarded([&] { torch::npu::synchronize(index); });
}

char* dg_npu_device_count(int* out) {
  return npu_guarded([&] {
    TORCH_CHECK(out != nullptr, "null argument");
    *out = static_cast<int>(c10_npu::device_count());
  });
}

}  // extern "C"
