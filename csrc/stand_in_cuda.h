// A stand-in CUDA device guard for torch builds without CUDA (the fake-CUDA engine run of the tests).
#pragma once

namespace elastic_decode {

// Registers a device guard for CUDA that only keeps a current device index per thread, where torch has
// none (a CPU-only build); returns whether it did. torch's CUDA guard stays wherever it exists.
bool install_stand_in_cuda_guard();

// The stand-in's current device index on this thread (-1 where the stand-in is not installed).
int stand_in_cuda_device();

}  // namespace elastic_decode
