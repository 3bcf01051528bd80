// A stand-in CUDA device guard for torch builds without CUDA.
//
// torch's FakeTensorMode makes fake `cuda:N` tensors on a CPU-only build, which lets the tests run the
// engine's CUDA host path in CI with no GPU (tests/fake_cuda.py). But every op whose Python binding
// takes a device guard (indexing, copy_, expand, ...) asks c10 for the CUDA guard implementation, and a
// CPU-only build has none: "PyTorch is not linked with support for cuda devices" (torch PR #160532 meant
// to return a no-op guard there; torch 2.13 still raises). This registers one that keeps a current
// device index per thread and nothing else, only where no CUDA guard exists, so a CUDA build is never
// touched.
#include "stand_in_cuda.h"

#include <c10/core/impl/DeviceGuardImplInterface.h>

namespace elastic_decode {
namespace {

thread_local c10::DeviceIndex current_index = 0;
bool installed = false;

struct StandInCudaGuard final : public c10::impl::DeviceGuardImplInterface {
  c10::DeviceType type() const override { return c10::DeviceType::CUDA; }
  c10::Device exchangeDevice(c10::Device d) const override {
    const c10::DeviceIndex old = current_index;
    current_index = d.index();
    return c10::Device(c10::DeviceType::CUDA, old);
  }
  c10::Device getDevice() const override { return c10::Device(c10::DeviceType::CUDA, current_index); }
  void setDevice(c10::Device d) const override { current_index = d.index(); }
  void uncheckedSetDevice(c10::Device d) const noexcept override { current_index = d.index(); }
  c10::Stream getStream(c10::Device d) const override { return c10::Stream(c10::Stream::DEFAULT, d); }
  c10::Stream exchangeStream(c10::Stream s) const override {
    return c10::Stream(c10::Stream::DEFAULT, s.device());
  }
  c10::DeviceIndex deviceCount() const noexcept override { return 8; }
};

}  // namespace

bool install_stand_in_cuda_guard() {
  if (installed || c10::impl::hasDeviceGuardImpl(c10::DeviceType::CUDA)) return false;
  static c10::impl::DeviceGuardImplRegistrar registrar(c10::DeviceType::CUDA, new StandInCudaGuard());
  installed = true;
  return true;
}

int stand_in_cuda_device() { return installed ? current_index : -1; }

}  // namespace elastic_decode
