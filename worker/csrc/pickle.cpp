// Reads a PyTorch zip pickle (`torch.save` output) with libtorch's own unpickler and hands
// its tensors to Rust one by one.
//
// Why libtorch and not a Rust pickle VM: the C++ unpickler is the reader PyTorch maintains
// for exactly this format (storages shared between views, offsets, fp16/bf16, OrderedDict,
// `_rebuild_tensor_v2`), and it only resolves a fixed set of globals, so a hostile file
// cannot run code. The archive is read from the file lazily, never copied whole into memory.
#include <torch/csrc/jit/serialization/import_read.h>
#include <caffe2/serialize/inline_container.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace {

char* dup_error(const std::string& msg) {
  char* out = static_cast<char*>(std::malloc(msg.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, msg.c_str(), msg.size() + 1);
  }
  return out;
}

}  // namespace

extern "C" {

// Called once per tensor entry. Ownership of `tensor` (allocated with `new`) passes to the
// callee, which wraps it as a `tch::Tensor` (freed with `delete` by tch).
typedef void (*dg_pickle_emit)(void* ctx, const char* name, size_t name_len,
                                at::Tensor* tensor);

// Loads `path`. The root must be a dict; when it holds `key` (e.g. "state_dict") and that
// value is a dict, the inner dict is used. Every value of the chosen dict must be a tensor.
// Returns 0 on success; otherwise 1 and `*err` holds a malloc'ed message (free with
// dg_pickle_free_error).
int dg_pickle_load(const char* path, const char* key, dg_pickle_emit emit, void* ctx,
                   char** err) {
  *err = nullptr;
  try {
    caffe2::serialize::PyTorchStreamReader reader{std::string(path)};
    c10::IValue root = torch::jit::readArchiveAndTensors(
        "data", "", "", std::nullopt, std::nullopt, at::Device(at::kCPU), reader);
    if (!root.isGenericDict()) {
      *err = dup_error("root object is a " + root.tagKind() + ", not a dict");
      return 1;
    }
    c10::Dict<c10::IValue, c10::IValue> dict = root.toGenericDict();
    if (key != nullptr && key[0] != '\0') {
      auto it = dict.find(c10::IValue(std::string(key)));
      if (it != dict.end()) {
        if (!it->value().isGenericDict()) {
          *err = dup_error(std::string("entry '") + key + "' is a " +
                           it->value().tagKind() + ", not a dict");
          return 1;
        }
        dict = it->value().toGenericDict();
      }
    }
    for (const auto& entry : dict) {
      if (!entry.key().isString()) {
        *err = dup_error("a key of kind " + entry.key().tagKind() + " is not a string");
        return 1;
      }
      const std::string& name = entry.key().toStringRef();
      if (!entry.value().isTensor()) {
        *err = dup_error("entry '" + name + "' is a " + entry.value().tagKind() +
                         ", not a tensor");
        return 1;
      }
      emit(ctx, name.data(), name.size(), new at::Tensor(entry.value().toTensor()));
    }
    return 0;
  } catch (const std::exception& e) {
    *err = dup_error(e.what());
    return 1;
  } catch (...) {
    *err = dup_error("unknown C++ exception");
    return 1;
  }
}

void dg_pickle_free_error(char* err) { std::free(err); }

}  // extern "C"
