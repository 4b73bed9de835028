// Autograd for the differentiable agentforge ops: the straight-through estimator (STE).
//
// Registered in C++ under the Autograd dispatch key (every device), so a call made without
// gradients costs no Python: a Python autograd formula (torch.library.register_autograd) runs
// on every call, even under no_grad, and tripled the cost of a small packed BitLinear.
// Each forward redispatches below autograd to the device kernel; each backward is built from
// other agentforge ops, so it runs on whatever device the kernels exist for.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace agentforge {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

Tensor ternary_fake_quant_op(const Tensor& w, bool per_channel) {
  static auto h = op<Tensor(const Tensor&, bool)>("agentforge::ternary_fake_quant");
  return h.call(w, per_channel);
}

Tensor act_fake_quant_op(const Tensor& x, int64_t bits) {
  static auto h = op<Tensor(const Tensor&, int64_t)>("agentforge::act_fake_quant");
  return h.call(x, bits);
}

// grad_y summed over every leading dim: the bias gradient.
Tensor sum_to_bias(const Tensor& grad_y) { return grad_y.reshape({-1, grad_y.size(-1)}).sum(0); }

// grad_yᵀ · x over every leading dim: the weight gradient of y = x · Wᵀ.
Tensor weight_grad(const Tensor& grad_y, const Tensor& x) {
  return grad_y.reshape({-1, grad_y.size(-1)}).t().matmul(x.reshape({-1, x.size(-1)}).to(grad_y.scalar_type()));
}

struct TernaryFakeQuant : torch::autograd::Function<TernaryFakeQuant> {
  static Tensor forward(AutogradContext* ctx, const Tensor& w, bool per_channel) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return ternary_fake_quant_op(w, per_channel);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) { return {grads[0], Tensor()}; }
};

struct ActFakeQuant : torch::autograd::Function<ActFakeQuant> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, int64_t bits) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return act_fake_quant_op(x, bits);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) { return {grads[0], Tensor()}; }
};

// y = Q_a(x) · Q_w(w)ᵀ + b with both quantizers treated as the identity in the backward pass:
// grad_x = grad_y · Q_w(w), grad_w = grad_yᵀ · Q_a(x).
struct BitLinear : torch::autograd::Function<BitLinear> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias,
                        bool per_channel) {
    static auto h = op<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, bool)>(
        "agentforge::bitlinear");
    ctx->save_for_backward({x, w});
    ctx->saved_data["per_channel"] = per_channel;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    at::AutoDispatchBelowADInplaceOrView guard;
    return h.call(x, w, bias, per_channel);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& grad_y = grads[0];
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w = saved[1];
    Tensor grad_x, grad_w, grad_b;
    if (ctx->needs_input_grad(0)) {
      Tensor w_q = ternary_fake_quant_op(w, ctx->saved_data["per_channel"].toBool());
      grad_x = grad_y.matmul(w_q.to(grad_y.scalar_type())).to(x.scalar_type());
    }
    if (ctx->needs_input_grad(1)) grad_w = weight_grad(grad_y, act_fake_quant_op(x, 8)).to(w.scalar_type());
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) grad_b = sum_to_bias(grad_y);
    return {grad_x, grad_w, grad_b, Tensor()};
  }
};

// Packed weights and their scales are frozen: only x (through the activation quantizer, STE)
// and the bias receive gradients.
struct TernaryMatmul : torch::autograd::Function<TernaryMatmul> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w_prepacked, const Tensor& w_scale,
                        const std::optional<Tensor>& bias, int64_t act_bits) {
    static auto h = op<Tensor(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, int64_t)>(
        "agentforge::ternary_matmul");
    Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      y = h.call(x, w_prepacked, w_scale, bias, act_bits);  // validates the inputs first
    }
    ctx->save_for_backward({w_prepacked, w_scale});
    ctx->saved_data["K"] = x.size(-1);
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto unprepack = op<Tensor(const Tensor&, int64_t)>("agentforge::unprepack_ternary");
    static auto unpack = op<Tensor(const Tensor&, int64_t)>("agentforge::unpack_ternary");
    const Tensor& grad_y = grads[0];
    auto saved = ctx->get_saved_variables();
    const Tensor &w_prepacked = saved[0], &w_scale = saved[1];
    Tensor grad_x, grad_b;
    if (ctx->needs_input_grad(0)) {
      const int64_t K = ctx->saved_data["K"].toInt();
      Tensor codes = unpack.call(unprepack.call(w_prepacked, K), K);
      Tensor scale = w_scale.size(0) > 1 ? w_scale.unsqueeze(1) : w_scale;
      grad_x = grad_y.matmul(codes.to(grad_y.scalar_type()) * scale.to(grad_y.scalar_type()));
    }
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3)) grad_b = sum_to_bias(grad_y);
    return {grad_x, Tensor(), Tensor(), grad_b, Tensor()};
  }
};

Tensor ternary_fake_quant_autograd(const Tensor& w, bool per_channel) {
  return TernaryFakeQuant::apply(w, per_channel);
}

Tensor act_fake_quant_autograd(const Tensor& x, int64_t bits) { return ActFakeQuant::apply(x, bits); }

Tensor bitlinear_autograd(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias, bool per_channel) {
  return BitLinear::apply(x, w, bias, per_channel);
}

Tensor ternary_matmul_autograd(const Tensor& x, const Tensor& w_prepacked, const Tensor& w_scale,
                               const std::optional<Tensor>& bias, int64_t act_bits) {
  // Inference (the decode loop) needs no graph: skipping Function::apply saves ~1 us per call,
  // 3 % of a 4096x4096 GEMV streamed from memory.
  const bool bias_grad = bias.has_value() && bias->defined() && bias->requires_grad();
  if (!at::GradMode::is_enabled() || !(x.requires_grad() || bias_grad)) {
    static auto h = op<Tensor(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, int64_t)>(
        "agentforge::ternary_matmul");
    at::AutoDispatchBelowADInplaceOrView guard;
    return h.call(x, w_prepacked, w_scale, bias, act_bits);
  }
  return TernaryMatmul::apply(x, w_prepacked, w_scale, bias, act_bits);
}

}  // namespace
}  // namespace agentforge

TORCH_LIBRARY_IMPL(agentforge, Autograd, m) {
  m.impl("ternary_fake_quant", &agentforge::ternary_fake_quant_autograd);
  m.impl("act_fake_quant", &agentforge::act_fake_quant_autograd);
  m.impl("bitlinear", &agentforge::bitlinear_autograd);
  m.impl("ternary_matmul", &agentforge::ternary_matmul_autograd);
}
