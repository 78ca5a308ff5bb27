// Activation checkpointing of one transformer block: tch has no custom autograd Function, so
// this shim provides one. Its forward runs the block (a Rust callback) without grad and keeps
// only the block's input; its backward runs the callback again with grad and differentiates
// that recomputation. The block's parameters are inputs of the Function and their gradients
// come back as its input gradients (torch::autograd::grad, not .backward()), so each
// parameter's AccumulateGrad, and the overlap hooks on it, runs once per backward with the sum
// over every use, as on the plain path. `tensor` pointers are tch's C_tensor (torch::Tensor*).

#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdint>
#include <cstdio>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

// Takes ownership of `x` (a new torch::Tensor*); `recompute`: 1 in backward. Returns a new
// torch::Tensor*, or nullptr with a message in err.
using Forward = void* (*)(void* ctx, void* x, int recompute, char* err, size_t err_len);
using Drop = void (*)(void* ctx);

// The Rust block and its attention mode; freed (drop) with the last autograd node holding it.
struct Block : torch::CustomClassHolder {
  Block(Forward f, Drop d, void* c) : fwd(f), drop(d), ctx(c) {}
  ~Block() override { drop(ctx); }
  Block(const Block&) = delete;
  Block& operator=(const Block&) = delete;

  at::Tensor run(const at::Tensor& x, bool recompute) const {
    char err[512] = {0};
    auto* out = static_cast<at::Tensor*>(fwd(ctx, new at::Tensor(x), recompute, err, sizeof err));
    if (out == nullptr) {
      throw std::runtime_error(std::string("checkpointed block: ") + err);
    }
    at::Tensor y = std::move(*out);
    delete out;
    return y;
  }

  Forward fwd;
  Drop drop;
  void* ctx;
};

// Autocast as the forward saw it, restored around the recomputation (the backward may run on
// another thread, and must cast as the forward did for the gradients to match).
struct Autocast {
  bool cuda, cpu;
  at::ScalarType cuda_dtype, cpu_dtype;

  static Autocast now() {
    return {at::autocast::is_autocast_enabled(at::kCUDA),
            at::autocast::is_autocast_enabled(at::kCPU),
            at::autocast::get_autocast_dtype(at::kCUDA), at::autocast::get_autocast_dtype(at::kCPU)};
  }
  void set() const {
    at::autocast::set_autocast_enabled(at::kCUDA, cuda);
    at::autocast::set_autocast_enabled(at::kCPU, cpu);
    at::autocast::set_autocast_dtype(at::kCUDA, cuda_dtype);
    at::autocast::set_autocast_dtype(at::kCPU, cpu_dtype);
  }
};

struct AutocastGuard {
  explicit AutocastGuard(const Autocast& want) : prev(Autocast::now()) { want.set(); }
  ~AutocastGuard() { prev.set(); }
  Autocast prev;
};

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Checkpoint : torch::autograd::Function<Checkpoint> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList params,
                               const c10::intrusive_ptr<Block>& block) {
    std::vector<at::Tensor> saved{x};
    saved.insert(saved.end(), params.begin(), params.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["block"] = c10::IValue::make_capsule(block);
    auto ac = Autocast::now();
    ctx->saved_data["ac_cuda"] = ac.cuda;
    ctx->saved_data["ac_cpu"] = ac.cpu;
    ctx->saved_data["ac_cuda_dtype"] = ac.cuda_dtype;
    ctx->saved_data["ac_cpu_dtype"] = ac.cpu_dtype;
    return {block->run(x, false)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    auto saved = ctx->get_saved_variables();
    auto block = c10::static_intrusive_pointer_cast<Block>(ctx->saved_data["block"].toCapsule());
    Autocast ac{ctx->saved_data["ac_cuda"].toBool(), ctx->saved_data["ac_cpu"].toBool(),
                ctx->saved_data["ac_cuda_dtype"].toScalarType(),
                ctx->saved_data["ac_cpu_dtype"].toScalarType()};
    const bool need_x = ctx->needs_input_grad(0);
    at::Tensor x = saved[0].detach().requires_grad_(need_x);
    at::Tensor y;
    {
      at::AutoGradMode grad(true);
      AutocastGuard cast(ac);
      y = block->run(x, true);
    }
    // One gradient per forward input: x, each parameter, then the (non-tensor) block.
    variable_list result(saved.size() + 1);
    variable_list wrt;
    std::vector<size_t> at;
    if (need_x) {
      wrt.push_back(x);
      at.push_back(0);
    }
    for (size_t i = 1; i < saved.size(); ++i) {
      if (ctx->needs_input_grad(i)) {
        wrt.push_back(saved[i]);
        at.push_back(i);
      }
    }
    if (wrt.empty() || !y.requires_grad()) {
      return result;
    }
    auto g = torch::autograd::grad({y}, wrt, {grad_out[0]}, /*retain_graph=*/false,
                                   /*create_graph=*/false, /*allow_unused=*/true);
    for (size_t j = 0; j < at.size(); ++j) {
      result[at[j]] = g[j];
    }
    return result;
  }
};

int fail(char* err, size_t err_len, const char* what) {
  if (err != nullptr && err_len > 0) {
    std::snprintf(err, err_len, "%s", what);
  }
  return -1;
}

}  // namespace

extern "C" {

// y = block(x), recomputed in backward instead of stored. `params`: the block's parameters
// that require grad. Ownership of `ctx` passes to the shim at once (drop runs even on error).
// Writes a new torch::Tensor* to *out and returns 0, or returns -1 with a message in err.
int ferroclip_checkpoint(void* x, void* const* params, int64_t n_params, Forward fwd, Drop drop,
                         void* ctx, void** out, char* err, size_t err_len) {
  try {
    auto block = c10::make_intrusive<Block>(fwd, drop, ctx);
    if (x == nullptr || out == nullptr || (n_params > 0 && params == nullptr)) {
      throw std::invalid_argument("null pointer");
    }
    const auto& input = *static_cast<at::Tensor*>(x);
    std::vector<at::Tensor> ps;
    ps.reserve(static_cast<size_t>(n_params));
    bool any_grad = input.requires_grad();
    for (int64_t i = 0; i < n_params; ++i) {
      ps.push_back(*static_cast<at::Tensor*>(params[i]));
      any_grad = any_grad || ps.back().requires_grad();
    }
    // Nothing to recompute for: no graph would be recorded, so run the block as it is.
    if (!at::GradMode::is_enabled() || !any_grad) {
      *out = new at::Tensor(block->run(input, false));
      return 0;
    }
    auto y = Checkpoint::apply(input, at::TensorList(ps), block);
    *out = new at::Tensor(y[0]);
    return 0;
  } catch (const std::exception& e) {
    return fail(err, err_len, e.what());
  } catch (...) {
    return fail(err, err_len, "unknown C++ exception");
  }
}

}  // extern "C"
