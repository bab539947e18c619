// Convolutions computed by oneDNN, as XLA FFI custom calls on the CPU (hpl_jax/models/onednn.py builds and
// registers them; model.conv_impl 'onednn', and 'auto' on a CPU).
//
// Three handlers, one per pass of a convolution with NHWC input x [n, h, w, c], HWIO kernel k [kh, kw, c, o] and
// NHWC output y [n, oh, ow, o], stride (sh, sw) and padding (pt, pb, pl, pr):
//   hpl_onednn_conv_forward       y  = conv(x, k)
//   hpl_onednn_conv_input_grad    dx = conv_backward_data(k, dy)      (x passed for its shape only)
//   hpl_onednn_conv_kernel_grad   dk = conv_backward_weights(x, dy)   (k passed for its shape only)
// The bottom/right padding must be the one the output reads, (oh - 1) * sh + kh - h - pt >= 0 (oneDNN checks it);
// onednn.py crops an input whose last rows no output reads.
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = dnnl::memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Geometry {
  int64_t n, h, w, c, kh, kw, o, sh, sw, pt, pb, pl, pr, oh, ow;

  auto Key() const { return std::make_tuple(n, h, w, c, kh, kw, o, sh, sw, pt, pb, pl, pr); }
  // oneDNN's logical order is NCHW / OIHW whatever the layout in memory.
  memory::desc Src(Tag tag = Tag::nhwc) const { return Desc({n, c, h, w}, tag); }
  memory::desc Kernel(Tag tag = Tag::hwio) const { return Desc({o, c, kh, kw}, tag); }
  memory::desc Dst(Tag tag = Tag::nhwc) const { return Desc({n, o, oh, ow}, tag); }

  static memory::desc Desc(const memory::dims& dims, Tag tag) {
    return memory::desc(dims, memory::data_type::f32, tag);
  }
};

Geometry MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> k, int64_t sh, int64_t sw,
                      int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  Geometry g{x[0], x[1], x[2], x[3], k[0], k[1], k[3], sh, sw, pt, pb, pl, pr, 0, 0};
  g.oh = (g.h + pt + pb - g.kh) / sh + 1;
  g.ow = (g.w + pl + pr - g.kw) / sw + 1;
  return g;
}

// The three primitives of one geometry. Their memory layouts are oneDNN's choice (format_tag::any: blocked
// layouts, where its fastest kernels run); Run reorders from and to the NHWC / HWIO buffers XLA holds.
struct Primitives {
  dnnl::convolution_forward::primitive_desc forward_pd;
  dnnl::convolution_backward_data::primitive_desc input_grad_pd;
  dnnl::convolution_backward_weights::primitive_desc kernel_grad_pd;
  dnnl::convolution_forward forward;
  dnnl::convolution_backward_data input_grad;
  dnnl::convolution_backward_weights kernel_grad;

  explicit Primitives(const Geometry& g) {
    auto& engine = Engine();
    auto src = g.Src(Tag::any), kernel = g.Kernel(Tag::any), dst = g.Dst(Tag::any);
    memory::dims strides{g.sh, g.sw}, pad_l{g.pt, g.pl}, pad_r{g.pb, g.pr};
    auto algorithm = dnnl::algorithm::convolution_direct;
    // Every call brings its own scratchpad: XLA runs independent custom calls on several threads at once, and
    // a scratchpad the library keeps is shared between them.
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    forward_pd = dnnl::convolution_forward::primitive_desc(engine, dnnl::prop_kind::forward_training, algorithm,
                                                           src, kernel, dst, strides, pad_l, pad_r, attr);
    input_grad_pd = dnnl::convolution_backward_data::primitive_desc(engine, algorithm, src, kernel, dst, strides,
                                                                    pad_l, pad_r, forward_pd, attr);
    kernel_grad_pd = dnnl::convolution_backward_weights::primitive_desc(engine, algorithm, src, kernel, dst,
                                                                        strides, pad_l, pad_r, forward_pd, attr);
    forward = dnnl::convolution_forward(forward_pd);
    input_grad = dnnl::convolution_backward_data(input_grad_pd);
    kernel_grad = dnnl::convolution_backward_weights(kernel_grad_pd);
  }
};

// Building primitives takes milliseconds (oneDNN generates code); each geometry is built once per process.
Primitives& PrimitivesFor(const Geometry& g) {
  static std::mutex mutex;
  static std::map<decltype(g.Key()), std::unique_ptr<Primitives>> built;
  std::lock_guard<std::mutex> lock(mutex);
  auto& slot = built[g.Key()];
  if (!slot) slot = std::make_unique<Primitives>(g);
  return *slot;
}

struct Operand {
  int arg;              // DNNL_ARG_*
  memory::desc layout;  // of the buffer XLA holds
  const void* data;
  bool output;
};

// Memory a call needs besides XLA's buffers (the scratchpad, operands in oneDNN's layouts), kept per thread and
// reused: allocating it afresh every call costs a page fault per page touched, on every call.
char* Workspace(size_t slot, size_t bytes) {
  thread_local std::vector<std::vector<char>> slots;
  if (slots.size() <= slot) slots.resize(slot + 1);
  if (slots[slot].size() < bytes) slots[slot].resize(bytes);
  return slots[slot].data();
}

void Run(const dnnl::primitive& primitive, const dnnl::primitive_desc& pd, const std::vector<Operand>& operands) {
  auto& engine = Engine();
  dnnl::stream stream(engine);
  auto scratchpad_desc = pd.scratchpad_desc();
  std::unordered_map<int, memory> args{
      {DNNL_ARG_SCRATCHPAD, memory(scratchpad_desc, engine, Workspace(0, scratchpad_desc.get_size()))}};
  std::vector<std::pair<memory, memory>> reorder_out;  // (primitive's layout, XLA's buffer)
  for (size_t i = 0; i < operands.size(); ++i) {
    const auto& operand = operands[i];
    memory held(operand.layout, engine, const_cast<void*>(operand.data));
    auto wanted = pd.query_md(dnnl::query::exec_arg_md, operand.arg);
    if (wanted == operand.layout) {
      args.insert({operand.arg, held});
      continue;
    }
    memory inner(wanted, engine, Workspace(1 + i, wanted.get_size()));
    if (operand.output) {
      reorder_out.emplace_back(inner, held);
    } else {
      dnnl::reorder(held, inner).execute(stream, held, inner);
    }
    args.insert({operand.arg, inner});
  }
  primitive.execute(stream, args);
  for (auto& [inner, held] : reorder_out) dnnl::reorder(inner, held).execute(stream, inner, held);
  stream.wait();
}

template <typename F>
ffi::Error Guarded(F&& f) {
  try {
    f();
    return ffi::Error::Success();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN convolution: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN convolution: ") + e.what());
  }
}

using F32 = ffi::Buffer<ffi::F32>;

ffi::Error Forward(F32 x, F32 k, ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                   int64_t pl, int64_t pr) {
  return Guarded([&] {
    auto g = MakeGeometry(x.dimensions(), k.dimensions(), sh, sw, pt, pb, pl, pr);
    auto& p = PrimitivesFor(g);
    Run(p.forward, p.forward_pd,
        {{DNNL_ARG_SRC, g.Src(), x.typed_data(), false},
         {DNNL_ARG_WEIGHTS, g.Kernel(), k.typed_data(), false},
         {DNNL_ARG_DST, g.Dst(), y->typed_data(), true}});
  });
}

ffi::Error InputGrad(F32 x, F32 k, F32 dy, ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t pt,
                     int64_t pb, int64_t pl, int64_t pr) {
  return Guarded([&] {
    auto g = MakeGeometry(x.dimensions(), k.dimensions(), sh, sw, pt, pb, pl, pr);
    auto& p = PrimitivesFor(g);
    Run(p.input_grad, p.input_grad_pd,
        {{DNNL_ARG_DIFF_DST, g.Dst(), dy.typed_data(), false},
         {DNNL_ARG_WEIGHTS, g.Kernel(), k.typed_data(), false},
         {DNNL_ARG_DIFF_SRC, g.Src(), dx->typed_data(), true}});
  });
}

ffi::Error KernelGrad(F32 x, F32 k, F32 dy, ffi::ResultBuffer<ffi::F32> dk, int64_t sh, int64_t sw, int64_t pt,
                      int64_t pb, int64_t pl, int64_t pr) {
  return Guarded([&] {
    auto g = MakeGeometry(x.dimensions(), k.dimensions(), sh, sw, pt, pb, pl, pr);
    auto& p = PrimitivesFor(g);
    Run(p.kernel_grad, p.kernel_grad_pd,
        {{DNNL_ARG_SRC, g.Src(), x.typed_data(), false},
         {DNNL_ARG_DIFF_DST, g.Dst(), dy.typed_data(), false},
         {DNNL_ARG_DIFF_WEIGHTS, g.Kernel(), dk->typed_data(), true}});
  });
}

}  // namespace

#define HPL_CONV_ATTRS                                                                                          \
  Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("pt").Attr<int64_t>("pb").Attr<int64_t>("pl").Attr<int64_t>( \
      "pr")

XLA_FFI_DEFINE_HANDLER_SYMBOL(HplOnednnConvForward, Forward,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>().HPL_CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(HplOnednnConvInputGrad, InputGrad,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Arg<F32>().Ret<F32>().HPL_CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(HplOnednnConvKernelGrad, KernelGrad,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Arg<F32>().Ret<F32>().HPL_CONV_ATTRS);

// The oneDNN this library runs: major * 10000 + minor * 100 + patch.
extern "C" int64_t hpl_onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}
