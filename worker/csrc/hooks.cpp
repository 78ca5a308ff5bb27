// Gradient hooks for ferroclip's overlapped all-reduce: tch exposes no autograd hooks, so this
// shim registers a post-accumulate-grad hook (the one DDP's reducer relies on) on a parameter
// and calls back into Rust with the parameter's index once its .grad is final for the backward.
// `tensor` is tch's C_tensor, i.e. a torch::Tensor*.

#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <cstdint>
#include <cstdio>
#include <exception>
#include <memory>
#include <stdexcept>

namespace {

using Callback = void (*)(void* ctx, int64_t index);

struct RustHook : torch::autograd::PostAccumulateGradHook {
  RustHook(Callback cb, void* ctx, int64_t index) : cb_(cb), ctx_(ctx), index_(index) {}
  void operator()(const torch::autograd::Variable& /*tensor*/) override { cb_(ctx_, index_); }

 private:
  Callback cb_;
  void* ctx_;
  int64_t index_;
};

int fail(char* err, size_t err_len, const char* what) {
  if (err != nullptr && err_len > 0) {
    std::snprintf(err, err_len, "%s", what);
  }
  return -1;
}

}  // namespace

extern "C" {

// Set (cb != nullptr) or clear (cb == nullptr) the hook of a leaf that requires grad.
// Returns 0, or -1 with a message in err.
int ferroclip_set_grad_hook(void* tensor, Callback cb, void* ctx, int64_t index, char* err,
                            size_t err_len) {
  try {
    if (tensor == nullptr) {
      throw std::invalid_argument("null tensor");
    }
    const auto& t = *static_cast<at::Tensor*>(tensor);
    if (!t.defined()) {
      throw std::invalid_argument("undefined tensor");
    }
    if (cb == nullptr) {
      torch::autograd::impl::set_post_acc_grad_hooks(t, nullptr);
      return 0;
    }
    if (!t.requires_grad() || !t.is_leaf()) {
      throw std::invalid_argument("a grad hook needs a leaf tensor that requires grad");
    }
    torch::autograd::impl::set_post_acc_grad_hooks(t, std::make_unique<RustHook>(cb, ctx, index));
    return 0;
  } catch (const std::exception& e) {
    return fail(err, err_len, e.what());
  } catch (...) {
    return fail(err, err_len, "unknown C++ exception");
  }
}

}  // extern "C"
