// Python bindings of elastic_decode._C (pybind11 through torch's cpp_extension).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "block_allocator.h"
#include "cpu_attention.h"
#include "cpu_decoder.h"
#include "cpu_ops.h"
#include "cpu_philox.h"
#include "cpu_quant.h"
#include "stand_in_cuda.h"

namespace py = pybind11;
using elastic_decode::BlockAllocator;

PYBIND11_MODULE(_C, m) {
  m.doc() = "elastic_decode native core: the KV-cache block allocator, the CPU attention kernels and fused ops, the sampler's Philox";
  py::register_exception<elastic_decode::OutOfBlocks>(m, "OutOfBlocksError", PyExc_RuntimeError);

  py::class_<BlockAllocator>(m, "BlockAllocator")
      .def(py::init<int64_t>(), py::arg("num_blocks"))
      .def("allocate", &BlockAllocator::allocate, py::arg("n"),
           "Take n free blocks (all or none), refcount 1 each; raises OutOfBlocksError.")
      .def("fork", &BlockAllocator::fork, py::arg("blocks"), "Add one reference to each block.")
      .def("free", &BlockAllocator::free, py::arg("blocks"),
           "Drop one reference from each block; at zero it is free but keeps its hash.")
      .def("lookup", &BlockAllocator::lookup, py::arg("hash"),
           "Block holding this content hash, with one more reference; -1 if none.")
      .def("peek", &BlockAllocator::peek, py::arg("hash"),
           "Block holding this content hash without taking a reference; -1 if none.")
      .def("register_hash", &BlockAllocator::register_hash, py::arg("block"), py::arg("hash"))
      .def("reset_prefix_cache", &BlockAllocator::reset_prefix_cache)
      .def("refcount", &BlockAllocator::refcount, py::arg("block"))
      .def_property_readonly("num_blocks", &BlockAllocator::num_blocks)
      .def_property_readonly("num_free", &BlockAllocator::num_free)
      .def_property_readonly("num_cached", &BlockAllocator::num_cached)
      .def_static("hash_tokens", &BlockAllocator::hash_tokens, py::arg("parent"), py::arg("tokens"));

  m.def("paged_decode_attention", &elastic_decode::paged_decode_attention_cpu, py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("block_tables"), py::arg("context_lens"), py::arg("scale"),
        "Paged decode attention on CPU tensors (kernels/cpu.py wraps it in the op contract).");
  m.def("paged_prefill_attention", &elastic_decode::paged_prefill_attention_cpu, py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("block_tables"), py::arg("cu_seqlens_q"), py::arg("context_lens"),
        py::arg("scale"), "Paged prefill attention on CPU tensors (kernels/cpu.py wraps it in the op contract).");
  m.def("philox_uniform", &elastic_decode::philox_uniform_cpu, py::arg("seed"), py::arg("offset"),
        "Uniform float32 in [0, 1) per (seed, offset), bit for bit Triton's tl.rand.");
  m.def("rms_norm", &elastic_decode::rms_norm_cpu, py::arg("x"), py::arg("weight"), py::arg("eps"),
        py::arg("residual") = py::none(), "RMSNorm after an optional residual add: (normed, sum).");
  m.def("rope_write_kv", &elastic_decode::rope_write_kv_cpu, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("positions"), py::arg("cos_table"), py::arg("sin_table"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("slot_mapping"), py::arg("q_norm") = py::none(), py::arg("k_norm") = py::none(), py::arg("eps") = 0.0,
        "(Head RMSNorm,) RoPE on q and k, k and v into the cache slots; returns the rotated q.");
  m.def("install_stand_in_cuda_guard", &elastic_decode::install_stand_in_cuda_guard,
        "Register a CUDA device guard that only keeps a current index per thread, where torch has none (a CPU-only "
        "build): the fake-CUDA engine run of the tests. Returns whether it did.");
  m.def("stand_in_cuda_device", &elastic_decode::stand_in_cuda_device,
        "The stand-in guard's current CUDA device on this thread (-1 where it is not installed).");
  m.def("q4_linear", &elastic_decode::q4_linear_cpu, py::arg("x"), py::arg("codes"), py::arg("scale"), py::arg("low"),
        py::arg("simd") = true, "x @ w.T for 4-bit weights in groups of 32 (Q4_1: w = scale * code + low), float32.");
  m.def("q8_linear", &elastic_decode::q8_linear_cpu, py::arg("x"), py::arg("codes"), py::arg("scale"),
        py::arg("simd") = true, "x @ w.T for 8-bit weights in groups of 32 (Q8_0: w = scale * code), float32.");

  py::class_<elastic_decode::Int4Decoder>(m, "Int4Decoder",
                                          "The decoder layers of a decode step in one call (kernels/cpu.py:int4_decode_layers).")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, double>(), py::arg("q_heads"), py::arg("kv_heads"),
           py::arg("head_dim"), py::arg("width"), py::arg("scale"))
      .def("add_layer", &elastic_decode::Int4Decoder::add_layer, py::arg("in_norm"), py::arg("post_norm"), py::arg("eps"),
           py::arg("q_norm"), py::arg("k_norm"), py::arg("head_eps"), py::arg("qkv"), py::arg("o"), py::arg("gate_up"),
           py::arg("down"), "One layer: norms and (codes, scale, low, bias) of its four GEMMs.")
      .def("forward", &elastic_decode::Int4Decoder::forward, py::arg("x"), py::arg("positions"), py::arg("cos_table"),
           py::arg("sin_table"), py::arg("k_caches"), py::arg("v_caches"), py::arg("slot_mapping"),
           py::arg("block_tables"), py::arg("context_lens"), py::call_guard<py::gil_scoped_release>(),
           "(last MLP output, residual) after every layer of one decode step.")
      .def_property_readonly("num_layers", &elastic_decode::Int4Decoder::num_layers);
}
